//! The real-device checks: QEMU's `edu` PCI device (1234:11e8, no PRI) behind QEMU's emulated
//! Intel IOMMU, bound to `vfio-pci` in this guest, used as a VMM uses it through the VFIO cdev
//! and iommufd (`faultd_client::vfio`), in faultd's pinned mode.
//!
//! 1. The fault-capable attach is refused, and the client's error says "no PRI" and "pinned
//!    mode".
//! 2. faultd refuses a pinned device whose "iommufd" is not /dev/iommu, and one whose IOAS id
//!    is not the client's IOAS, undoing what it mapped.
//! 3. Pinned mode: faultd makes the DMA range resident and maps it in the device's IOAS. This
//!    VMM writes a pattern into guest page A, programs edu's DMA engine through BAR0 (mmap of
//!    the VFIO region) to copy A (half a page) into the device's buffer and the buffer into
//!    guest page B,
//!    and checks B holds the pattern and B's neighbours are untouched: the device read and
//!    wrote exactly the guest pages faultd mapped at those IOVAs (IOVA == GPA).
//! 4. remove_device: faultd unmaps all of it (the IOAS is free there again) and a DMA into
//!    guest RAM no longer lands.

use std::fs;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faultd_client::proto::DmaRange;
use faultd_client::vfio::{open_iommufd, VfioAttachError, VfioDevice};
use faultd_client::{
    create_uffd, Client, ClientError, DeviceIommu, DeviceQueue, GuestRam, RamPageSize, RegionSpec,
};

use crate::mock;

type Res<T> = Result<T, String>;

/// Guest RAM of this VM: 1 MiB at 16 MiB (IOVA == GPA; edu's DMA mask is 28 bits, so every
/// IOVA must be below 256 MiB).
const RAM_GPA: u64 = 16 << 20;
const RAM_SIZE: u64 = 1 << 20;
/// The DMA-able range handed to faultd: the first half of RAM (within the guest faultd's
/// 2 MiB pin limit, and a mapping shifted by a page still lands inside RAM).
const DMA_SIZE: u64 = 512 << 10;
/// The pages the device copies from and to, and the page it must no longer reach after
/// remove_device; all inside the DMA range, in different granules.
const PAGE_A: u64 = RAM_GPA + 0x3000;
const PAGE_B: u64 = RAM_GPA + 0x2_1000;
const PAGE_C: u64 = RAM_GPA + 0x4_2000;
const PAGE: u64 = 4096;
/// Fill of every page of RAM this check did not write on purpose.
const SENTINEL: u8 = 0xee;
/// faultd's config in the guest (tests/kernel/faultd.toml).
const GRANULE: u64 = 64 << 10;

/// edu (QEMU hw/misc/edu.c): identification register, DMA registers, its DMA buffer.
const EDU_ID: usize = 0x00;
const EDU_DMA_SRC: usize = 0x80;
const EDU_DMA_DST: usize = 0x88;
const EDU_DMA_CNT: usize = 0x90;
const EDU_DMA_CMD: usize = 0x98;
const EDU_DMA_RUN: u64 = 1;
/// Direction bit: set = device buffer to RAM, clear = RAM to device buffer.
const EDU_DMA_TO_RAM: u64 = 2;
const EDU_BUF: u64 = 0x4_0000;
/// Bytes per transfer: half a page. QEMU 7.2's edu refuses a transfer that ends exactly at the
/// end of its 4 KiB buffer ("DMA range 0x40000-0x40fff out of bounds (0x40000-0x40fff)", a
/// hardware error that stops QEMU), so a whole page cannot be moved at once.
const XFER: u64 = 2048;
/// PCI vendor:device of edu.
const EDU_IDS: (&str, &str) = ("0x1234", "0x11e8");
/// VFIO_PCI_CONFIG_REGION_INDEX and the PCI command register's memory and bus-master bits.
const CONFIG_REGION: u32 = 7;
const PCI_COMMAND: u64 = 4;
const PCI_COMMAND_MEMORY_MASTER: u16 = 0x2 | 0x4;

/// Runs the checks against the faultd at `socket`; numbering goes on from `passed`. Returns
/// the number passed in all.
pub fn run(socket: &Path, passed: usize) -> Res<usize> {
    let mut n = passed;
    let mut ok = |what: String| {
        n += 1;
        println!("iommufd-check: ok {n:>2} {what}");
    };

    let bdf = find_edu()?;
    let cdev = bind_to_vfio_pci(&bdf)?;
    ok(format!(
        "edu (1234:11e8) at {bdf} bound to vfio-pci: {}",
        cdev.display()
    ));

    let iommufd = open_iommufd().map_err(|e| chain(&e))?;
    let dev = VfioDevice::bind(&cdev, &iommufd).map_err(|e| chain(&e))?;
    match dev.attach_faulting(&iommufd) {
        Err(e @ VfioAttachError::NoPri { .. }) => {
            let msg = e.to_string();
            if !msg.contains("no PRI") || !msg.contains("pinned mode") {
                return Err(format!(
                    "the refusal does not say no PRI / pinned mode: {msg}"
                ));
            }
            ok(format!(
                "VFIO_DEVICE_BIND_IOMMUFD (dev_id {}), IOAS {}, fault queue and fault-capable HWPT allocated; the attach was refused: {msg}",
                dev.dev_id(),
                dev.ioas_id()
            ));
        }
        Err(e) => return Err(format!("fault-capable attach: {}", chain(&e))),
        Ok(f) => {
            return Err(format!(
            "the kernel attached edu (no PRI) to fault-capable HWPT {}: nothing would ever fault",
            f.hwpt_id()
        ))
        }
    }
    dev.attach_pinned().map_err(|e| chain(&e))?;

    // Guest RAM; every page holds SENTINEL once faultd made it resident.
    let ram = GuestRam::new("vfio-ram", RAM_SIZE, RamPageSize::Size4K)
        .map_err(|e| format!("guest RAM: {e}"))?;
    let uffd = create_uffd().map_err(|e| format!("userfaultfd: {e}"))?;
    ram.register(&uffd)
        .map_err(|e| format!("uffd register: {e}"))?;
    let mut session = Client::connect(socket)
        .and_then(|c| {
            c.register(
                "vfio-check",
                &uffd,
                &[RegionSpec::zero(RAM_GPA, &ram)],
                None,
            )
        })
        .map_err(|e| format!("registering with faultd: {e}"))?;
    let ranges = [DmaRange {
        gpa: RAM_GPA,
        size: DMA_SIZE,
    }];
    let pinned = || DeviceQueue::Pinned {
        ranges: Some(&ranges),
    };

    // Not /dev/iommu: the VFIO device fd itself. A bad fd ends the session it came on, so
    // this one is a throwaway VM of its own.
    {
        let junk = GuestRam::new("vfio-junk", GRANULE, RamPageSize::Size4K)
            .map_err(|e| format!("guest RAM: {e}"))?;
        let junk_uffd = create_uffd().map_err(|e| format!("userfaultfd: {e}"))?;
        junk.register(&junk_uffd)
            .map_err(|e| format!("uffd register: {e}"))?;
        let mut junk_session = Client::connect(socket)
            .and_then(|c| {
                c.register(
                    "vfio-junk",
                    &junk_uffd,
                    &[RegionSpec::zero(RAM_GPA, &junk)],
                    None,
                )
            })
            .map_err(|e| format!("registering with faultd: {e}"))?;
        let wrong_fd = junk_session.add_device(
            dev.dev_id(),
            DeviceQueue::Pinned { ranges: None },
            DeviceIommu::Iommufd {
                iommufd: dev.fd(),
                ioas_id: dev.ioas_id(),
            },
        );
        match wrong_fd {
            Err(ClientError::Refused { message, .. }) if message.contains("not an iommufd") => ok(
                format!("faultd refused the VFIO device fd as the device's iommufd: {message}"),
            ),
            other => return Err(format!("add_device with the VFIO fd as iommufd: {other:?}")),
        }
    }
    // An IOAS id that is none of the client's.
    let bogus = dev.ioas_id() + 1000;
    let wrong_ioas = session.add_device(
        dev.dev_id(),
        pinned(),
        DeviceIommu::Iommufd {
            iommufd: iommufd.as_fd(),
            ioas_id: bogus,
        },
    );
    match wrong_ioas {
        Err(ClientError::Refused { message, .. })
            if message.contains("IOMMU_IOAS_MAP") && message.contains("unmapped") =>
        {
            let mapped = session
                .stats()
                .map_err(|e| format!("stats: {e}"))?
                .device
                .mapped_bytes;
            if mapped != 0 {
                return Err(format!(
                    "after the refused attach faultd still counts {mapped} mapped bytes"
                ));
            }
            ok(format!(
                "faultd refused IOAS id {bogus} (not the client's) and left nothing mapped: {message}"
            ))
        }
        other => return Err(format!("add_device with IOAS {bogus}: {other:?}")),
    }

    // An IOVA of the range that the client had mapped itself (to memory of its own): faultd
    // must not count it as its mapping of guest RAM.
    let probe = vec![0x5au8; (GRANULE + PAGE) as usize];
    let probe_va = (probe.as_ptr() as u64 + PAGE - 1) & !(PAGE - 1);
    let taken = RAM_GPA + GRANULE;
    mock::ioas_map_fixed(iommufd.as_fd(), dev.ioas_id(), taken, GRANULE, probe_va)
        .map_err(|e| format!("mapping the VMM's own memory at {taken:#x}: {e}"))?;
    let pre_mapped = session.add_device(
        dev.dev_id(),
        pinned(),
        DeviceIommu::Iommufd {
            iommufd: iommufd.as_fd(),
            ioas_id: dev.ioas_id(),
        },
    );
    mock::ioas_unmap(iommufd.as_fd(), dev.ioas_id(), taken, GRANULE)
        .map_err(|e| format!("unmapping the VMM's own memory at {taken:#x}: {e}"))?;
    match pre_mapped {
        Err(ClientError::Refused { message, .. }) if message.contains("already mapped") => {
            let mapped = session
                .stats()
                .map_err(|e| format!("stats: {e}"))?
                .device
                .mapped_bytes;
            let first_free =
                mock::iova_is_free(iommufd.as_fd(), dev.ioas_id(), RAM_GPA, GRANULE, probe_va)
                    .map_err(|e| format!("probing IOAS at {RAM_GPA:#x}: {e}"))?;
            if mapped != 0 || !first_free {
                return Err(format!(
                    "after the refused attach: {mapped} bytes counted mapped, IOAS free at {RAM_GPA:#x}: {first_free}"
                ));
            }
            ok(format!(
                "faultd refused a range whose IOVA {taken:#x} the client had mapped itself, and unmapped what it had mapped: {message}"
            ))
        }
        other => {
            return Err(format!(
                "add_device over an IOVA the client had mapped: {other:?}"
            ))
        }
    }

    let t0 = Instant::now();
    let granule = session
        .add_device(
            dev.dev_id(),
            pinned(),
            DeviceIommu::Iommufd {
                iommufd: iommufd.as_fd(),
                ioas_id: dev.ioas_id(),
            },
        )
        .map_err(|e| format!("add_device (pinned, iommufd IOAS): {e}"))?;
    let mapped = session
        .stats()
        .map_err(|e| format!("stats: {e}"))?
        .device
        .mapped_bytes;
    if granule != GRANULE || mapped != DMA_SIZE {
        return Err(format!(
            "pinned attach: granule {granule}, {mapped} bytes mapped; expected {GRANULE} and {DMA_SIZE}"
        ));
    }
    for g in (RAM_GPA..RAM_GPA + DMA_SIZE).step_by(GRANULE as usize) {
        if mock::iova_is_free(iommufd.as_fd(), dev.ioas_id(), g, GRANULE, probe_va)
            .map_err(|e| format!("probing IOAS {} at {g:#x}: {e}", dev.ioas_id()))?
        {
            return Err(format!(
                "IOAS {} has nothing at {g:#x} after the pinned attach",
                dev.ioas_id()
            ));
        }
    }
    ok(format!(
        "pinned attach in {} ms: faultd made {} KiB resident and mapped it in IOAS {} ({} KiB granules)",
        t0.elapsed().as_millis(),
        mapped >> 10,
        dev.ioas_id(),
        granule >> 10
    ));

    // The VMM's own view of guest RAM: every page SENTINEL, page A the pattern.
    // SAFETY: `ram` is this process's MAP_SHARED mapping of RAM_SIZE bytes, alive until the end
    // of this function; the device writes it only by the DMA this function starts and waits for.
    let mem = unsafe { std::slice::from_raw_parts_mut(ram.host_ptr().as_ptr(), RAM_SIZE as usize) };
    mem.fill(SENTINEL);
    let pattern: Vec<u8> = (0..PAGE).map(|i| (i * 7 + 13) as u8 ^ 0x5c).collect();
    page_mut(mem, PAGE_A).copy_from_slice(&pattern);

    let bar = Bar0::map(&dev)?;
    enable_bus_master(&dev)?;
    let id = bar.read32(EDU_ID);
    if id & 0xffff != 0x00ed {
        return Err(format!(
            "edu's BAR0 identification register reads {id:#x}, not 0x..ed"
        ));
    }
    bar.dma(PAGE_A, EDU_BUF, XFER, false)?;
    bar.dma(EDU_BUF, PAGE_B, XFER, true)?;
    check_landed(mem, &pattern)?;
    ok(format!(
        "edu DMA through the emulated IOMMU: {XFER} bytes of guest page {PAGE_A:#x} -> device buffer -> guest page {PAGE_B:#x} (edu id {id:#x}); page {PAGE_B:#x} holds the VMM's pattern and nothing else around it changed"
    ));

    let unmapped = session
        .remove_device(dev.dev_id())
        .map_err(|e| format!("remove_device: {e}"))?;
    for g in (RAM_GPA..RAM_GPA + DMA_SIZE).step_by(GRANULE as usize) {
        if !mock::iova_is_free(iommufd.as_fd(), dev.ioas_id(), g, GRANULE, probe_va)
            .map_err(|e| format!("probing IOAS {} at {g:#x}: {e}", dev.ioas_id()))?
        {
            return Err(format!(
                "IOAS {} still maps {g:#x} after remove_device",
                dev.ioas_id()
            ));
        }
    }
    bar.dma(EDU_BUF, PAGE_C, XFER, true)?;
    if page(mem, PAGE_C).iter().any(|&b| b != SENTINEL) {
        return Err(format!(
            "after remove_device the device still wrote guest page {PAGE_C:#x}"
        ));
    }
    if unmapped != DMA_SIZE {
        return Err(format!(
            "remove_device unmapped {unmapped} bytes, expected {DMA_SIZE}"
        ));
    }
    ok(format!(
        "remove_device: faultd unmapped {} KiB, the IOAS is empty there, and a DMA to {PAGE_C:#x} no longer lands",
        unmapped >> 10
    ));
    drop(bar);
    drop(session);
    Ok(n)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}

fn page(mem: &[u8], gpa: u64) -> &[u8] {
    let at = (gpa - RAM_GPA) as usize;
    &mem[at..at + PAGE as usize]
}

fn page_mut(mem: &mut [u8], gpa: u64) -> &mut [u8] {
    let at = (gpa - RAM_GPA) as usize;
    &mut mem[at..at + PAGE as usize]
}

/// Page B starts with the XFER bytes of `pattern` and holds SENTINEL after them, its
/// neighbours only SENTINEL; otherwise says where the pattern is.
fn check_landed(mem: &[u8], pattern: &[u8]) -> Res<()> {
    let x = XFER as usize;
    let b = page(mem, PAGE_B);
    let b_ok = b[..x] == pattern[..x] && b[x..].iter().all(|&v| v == SENTINEL);
    let neighbours_ok = [PAGE_B - PAGE, PAGE_B + PAGE]
        .iter()
        .all(|&p| page(mem, p).iter().all(|&b| b == SENTINEL));
    if b_ok && neighbours_ok {
        return Ok(());
    }
    let found: Vec<String> = (RAM_GPA..RAM_GPA + RAM_SIZE)
        .step_by(PAGE as usize)
        .filter(|&p| p != PAGE_A && page(mem, p)[..x] == pattern[..x])
        .map(|p| format!("{p:#x}"))
        .collect();
    Err(format!(
        "the device's copy did not land where faultd mapped it: page {PAGE_B:#x} starts {:02x?} (pattern starts {:02x?}); neighbours untouched: {neighbours_ok}; the pattern is (also) at [{}]",
        &b[..8],
        &pattern[..8],
        found.join(", ")
    ))
}

/// The PCI device at /sys/bus/pci/devices/BDF with edu's ids.
fn find_edu() -> Res<String> {
    let dir = Path::new("/sys/bus/pci/devices");
    let entries = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let read = |f: &str| fs::read_to_string(entry.path().join(f)).unwrap_or_default();
        if read("vendor").trim() == EDU_IDS.0 && read("device").trim() == EDU_IDS.1 {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Err("no edu device (1234:11e8) on the PCI bus: QEMU runs without -device edu?".into())
}

/// driver_override + bind to vfio-pci; returns the VFIO cdev's path.
fn bind_to_vfio_pci(bdf: &str) -> Res<PathBuf> {
    let dev = Path::new("/sys/bus/pci/devices").join(bdf);
    let write = |p: &Path, v: &str| {
        fs::write(p, v).map_err(|e| format!("writing {v} to {}: {e}", p.display()))
    };
    write(&dev.join("driver_override"), "vfio-pci")?;
    if dev.join("driver").exists() {
        write(&dev.join("driver/unbind"), bdf)?;
    }
    write(Path::new("/sys/bus/pci/drivers/vfio-pci/bind"), bdf)?;
    let vfio_dev = dev.join("vfio-dev");
    let name = fs::read_dir(&vfio_dev)
        .map_err(|e| {
            format!(
                "reading {} (CONFIG_VFIO_DEVICE_CDEV): {e}",
                vfio_dev.display()
            )
        })?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vfio"))
        .ok_or_else(|| format!("{} lists no vfioN", vfio_dev.display()))?;
    let cdev = Path::new("/dev/vfio/devices").join(name);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cdev.exists() {
        if Instant::now() > deadline {
            return Err(format!("{} did not appear", cdev.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(cdev)
}

/// Sets memory decoding and bus mastering in the command register (through the VFIO config
/// region): without bus mastering QEMU drops the device's DMA.
fn enable_bus_master(dev: &VfioDevice) -> Res<()> {
    let cfg = dev.region(CONFIG_REGION).map_err(|e| chain(&e))?;
    let at = (cfg.offset + PCI_COMMAND) as i64;
    let mut buf = [0u8; 2];
    nix::sys::uio::pread(dev.fd(), &mut buf, at)
        .map_err(|e| format!("reading PCI_COMMAND: {e}"))?;
    let cmd = u16::from_le_bytes(buf) | PCI_COMMAND_MEMORY_MASTER;
    nix::sys::uio::pwrite(dev.fd(), &cmd.to_le_bytes(), at)
        .map_err(|e| format!("writing PCI_COMMAND: {e}"))?;
    Ok(())
}

/// edu's BAR0, mapped from the VFIO region.
struct Bar0 {
    ptr: *mut u8,
    len: usize,
}

impl Bar0 {
    fn map(dev: &VfioDevice) -> Res<Bar0> {
        let r = dev.region(0).map_err(|e| chain(&e))?;
        if r.size < 0x100 {
            return Err(format!("edu's BAR0 is {} bytes", r.size));
        }
        let len = r.size as usize;
        // SAFETY: a new shared mapping chosen by the kernel (no address hint), of the device
        // fd's BAR0 region at the offset VFIO reported; unmapped in Drop, nothing else aliases.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                dev.fd().as_raw_fd(),
                r.offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap of edu's BAR0 (VFIO region 0, {len} bytes at {:#x}): {}",
                r.offset,
                std::io::Error::last_os_error()
            ));
        }
        Ok(Bar0 {
            ptr: ptr.cast(),
            len,
        })
    }

    fn read32(&self, off: usize) -> u32 {
        assert!(off + 4 <= self.len);
        // SAFETY: inside the mapping (asserted), 4-byte aligned register; MMIO needs volatile.
        unsafe { self.ptr.add(off).cast::<u32>().read_volatile() }
    }

    fn read64(&self, off: usize) -> u64 {
        assert!(off + 8 <= self.len);
        // SAFETY: as in read32, an 8-byte register.
        unsafe { self.ptr.add(off).cast::<u64>().read_volatile() }
    }

    fn write64(&self, off: usize, v: u64) {
        assert!(off + 8 <= self.len);
        // SAFETY: as in read64.
        unsafe { self.ptr.add(off).cast::<u64>().write_volatile(v) }
    }

    /// One DMA of `cnt` bytes from `src` to `dst` (one of them in the device's buffer), waited
    /// for. edu finishes a transfer about 100 ms (virtual) after it is started.
    fn dma(&self, src: u64, dst: u64, cnt: u64, to_ram: bool) -> Res<()> {
        self.write64(EDU_DMA_SRC, src);
        self.write64(EDU_DMA_DST, dst);
        self.write64(EDU_DMA_CNT, cnt);
        let dir = if to_ram { EDU_DMA_TO_RAM } else { 0 };
        self.write64(EDU_DMA_CMD, EDU_DMA_RUN | dir);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.read64(EDU_DMA_CMD) & EDU_DMA_RUN != 0 {
            if Instant::now() > deadline {
                return Err(format!(
                    "edu DMA {src:#x} -> {dst:#x} did not finish within 30 s"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

impl Drop for Bar0 {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

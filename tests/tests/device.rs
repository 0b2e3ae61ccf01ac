//! faultd's device-fault path across processes: the test process is the VMM, with a KVM guest
//! and the emulated PRI device (`testvmm::PriDevice`), and a separately started faultd serves
//! both the guest's userfaults and the device's page-request groups against one unpinned RAM.

use std::collections::BTreeSet;
use std::num::NonZeroUsize;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faultd_client::{create_uffd, Client, GuestRam, RamPageSize, RegionSpec};
use faultd_tests::{
    pattern_page, read_with_timeout, resident_settled, settled_stats, write_with_timeout, Faultd,
    Ram,
};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use testvmm::{
    dword_offsets, page_sequence, pattern, DeviceConfig, DmaError, PriDevice, RamRange, VcpuReport,
    Workload,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const GRANULE: u64 = 64 * KIB;
/// A guest run that takes longer fails (runs here take well under a second).
const GUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// A test still running after this kills faultd (see [`Watchdog`]).
const TEST_BUDGET: Duration = Duration::from_secs(30);

/// Kills faultd if the test outlives its budget. Guest runs, device transfers and host
/// touches have their own timeouts, but a control request (`stats`, `add_device`) blocks
/// until faultd answers; with faultd gone it fails with `Closed` instead, so a wedged faultd
/// fails the test loudly rather than hanging it.
struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn new(faultd: &Faultd) -> Watchdog {
        let pid = faultd.pid();
        let (done, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if rx.recv_timeout(TEST_BUDGET) != Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            // Only our faultd: the pid is still its (the Faultd outlives the watchdog).
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "faultd" {
                eprintln!("test still running after {TEST_BUDGET:?}: killing faultd {pid}");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        Watchdog {
            done: Some(done),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.done.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cfg(workers: u32) -> DeviceConfig {
    // The default answers within 5 s; faultd answers every group within device.deadline_ms.
    DeviceConfig {
        workers,
        ..DeviceConfig::default()
    }
}

/// A device over all of `ram` at GPA 0.
fn device_on(ram: &GuestRam, cfg: DeviceConfig) -> PriDevice {
    // SAFETY: every test declares the RAM before the device, so the mapping outlives it, and
    // nothing in the tests holds a Rust reference into guest RAM.
    unsafe { PriDevice::new(ram.host_ptr(), 0, ram.size(), cfg) }.expect("creating the device")
}

fn dword(buf: &[u8], off: u64) -> u32 {
    let o = off as usize;
    u32::from_le_bytes(buf[o..o + 4].try_into().unwrap())
}

/// The 4 KiB pages of the granule holding page `p`.
fn granule_pages(p: u32) -> std::ops::Range<u32> {
    let per = (GRANULE / PAGE) as u32;
    let first = p / per * per;
    first..first + per
}

fn check_guest(reports: &[VcpuReport], pages: u32, what: &str) {
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(
            r.mismatches, 0,
            "{what}: vCPU {i} first mismatch at {:?}",
            r.first_mismatch_gpa
        );
        assert_eq!(r.pages, pages, "{what}: vCPU {i} pages visited");
    }
}

#[test]
fn kvm_guest_and_emulated_device_share_unpinned_ram_through_one_faultd() {
    const SIZE: u64 = 512 * MIB;
    const WORKERS: u32 = 2;
    let faultd = Faultd::start(&[]);
    let _watchdog = Watchdog::new(&faultd);
    let ram = Ram::new("vm-dev", SIZE);
    let mut session = ram.serve(&faultd, "vm-dev");
    let dev = device_on(&ram.ram, cfg(WORKERS));
    let granule = dev.attach(&mut session).expect("add_device");
    assert_eq!(granule, GRANULE);
    let half = (SIZE / PAGE / 2) as u32;
    // Region A (first half) is the guest's, region B (second half) the device's.
    let (seed_a, seed_b) = (0xA11C_E001, 0x0B0B_0002);
    let (touches_a, touches_b) = (2000u32, 2000u32);
    let a_seq = page_sequence(seed_a, touches_a, 0, half);
    // The same LCG the guest's Verify runs: it will visit exactly the pages the device wrote.
    let b_seq = page_sequence(seed_b, touches_b, half, half);
    let a_pages: BTreeSet<u32> = a_seq.iter().copied().collect();
    let b_pages: BTreeSet<u32> = b_seq.iter().copied().collect();
    let mut vm = ram.vm(GUEST_TIMEOUT);

    // Phase 1: the guest writes A while the device writes B.
    let t1 = Instant::now();
    let guest1 = std::thread::scope(|s| {
        for w in 0..WORKERS {
            let (dev, b_seq) = (&dev, &b_seq);
            s.spawn(move || {
                for &p in b_seq.iter().skip(w as usize).step_by(WORKERS as usize) {
                    let gpa = u64::from(p) * PAGE;
                    dev.dma_write(w, gpa, &pattern_page(gpa, seed_b))
                        .unwrap_or_else(|e| panic!("device write at {gpa:#x}: {e}"));
                }
            });
        }
        vm.run(
            vec![Workload::WriteVerify {
                seed: seed_a,
                touches: touches_a,
                first_page: 0,
                page_count: half,
            }],
            &|_, _| {},
        )
    })
    .expect("phase 1 guest run");
    let phase1 = t1.elapsed();
    let after1 = dev.stats();

    // Phase 2: the guest verifies what the device wrote in B while the device reads A.
    let t2 = Instant::now();
    let a_list: Vec<u32> = a_pages.iter().copied().collect();
    let (guest2, device_mismatches) = std::thread::scope(|s| {
        let readers: Vec<_> = (0..WORKERS)
            .map(|w| {
                let (dev, a_list) = (&dev, &a_list);
                s.spawn(move || {
                    let mut buf = vec![0u8; PAGE as usize];
                    let mut bad = Vec::new();
                    for &p in a_list.iter().skip(w as usize).step_by(WORKERS as usize) {
                        let gpa = u64::from(p) * PAGE;
                        dev.dma_read(w, gpa, &mut buf)
                            .unwrap_or_else(|e| panic!("device read at {gpa:#x}: {e}"));
                        bad.extend(
                            dword_offsets()
                                .filter(|&o| dword(&buf, o) != pattern(gpa + o, seed_a))
                                .map(|o| gpa + o),
                        );
                    }
                    bad
                })
            })
            .collect();
        let guest = vm.run(
            vec![Workload::Verify {
                seed: seed_b,
                touches: touches_b,
                first_page: half,
                page_count: half,
            }],
            &|_, _| {},
        );
        let bad: Vec<u64> = readers
            .into_iter()
            .flat_map(|h| h.join().expect("device reader"))
            .collect();
        (guest, bad)
    });
    let guest2 = guest2.expect("phase 2 guest run");
    let phase2 = t2.elapsed();

    check_guest(&guest1, 2 * touches_a, "guest WriteVerify of A");
    check_guest(
        &guest2,
        touches_b,
        "guest Verify of the device's pages in B",
    );
    assert!(
        device_mismatches.is_empty(),
        "{} dwords the guest wrote read back wrong through the device, first at {:#x}",
        device_mismatches.len(),
        device_mismatches[0]
    );
    let st = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    let ds = dev.stats();
    // Resident: the guest's pages, plus every granule the device touched (faultd makes a
    // granule resident whole before mapping it for a device).
    let mut resident: BTreeSet<u32> = a_pages.clone();
    resident.extend(b_pages.iter().flat_map(|&p| granule_pages(p)));
    resident.extend(a_pages.iter().flat_map(|&p| granule_pages(p)));
    let resident_bytes = resident.len() as u64 * PAGE;
    println!(
        "phase 1 (guest writes {} pages of A | device writes {} pages of B): {phase1:.2?}, \
         device {} groups / {} pages; phase 2 (guest verifies B | device reads A): {phase2:.2?}",
        a_pages.len(),
        b_pages.len(),
        after1.groups,
        after1.requests
    );
    println!(
        "faultd: vcpu faults {}, device groups {} ({} pages, {} SUCCESS, {} INVALID), \
         device p50 {:.1} us p99 {:.1} us, vcpu p50 {:.1} us; resident {} MiB of {} MiB; \
         device max outstanding {}",
        st.vcpu_faults,
        st.device.groups,
        st.device.pages,
        st.device.success,
        st.device.invalid,
        st.device_latency_us.p50,
        st.device_latency_us.p99,
        st.latency_us.p50,
        st.resident_bytes / MIB,
        SIZE / MIB,
        ds.max_outstanding
    );
    assert!(st.vcpu_faults >= a_pages.len() as u64, "{st:?}");
    assert!(st.device.groups > 0 && st.device.success > 0, "{st:?}");
    assert_eq!(st.device.invalid, 0, "{st:?}");
    assert_eq!(st.errors, 0, "{st:?}");
    // Both ends agree on every group and every answer.
    assert_eq!(
        (ds.groups, ds.requests, ds.success, ds.invalid),
        (st.device.groups, st.device.pages, st.device.success, 0)
    );
    assert_eq!((ds.unmapped_after_success, ds.stray_responses), (0, 0));
    assert_eq!(st.resident_bytes, resident_bytes);
    assert_eq!(
        ram.ram.allocated_bytes().unwrap(),
        resident_bytes,
        "the memfd holds pages neither the guest nor the device touched"
    );
    assert_eq!(st.zero_fills, resident.len() as u64);
    assert!(
        resident_bytes < SIZE / 2,
        "too much of the RAM touched for the residency check to mean anything"
    );
}

#[test]
fn multi_page_groups_are_answered_once_after_all_pages_are_mapped() {
    const SIZE: u64 = 64 * MIB;
    let faultd = Faultd::start(&[]);
    let _watchdog = Watchdog::new(&faultd);
    let ram = Ram::new("vm-groups", SIZE);
    let mut session = ram.serve(&faultd, "vm-groups");
    let dev = device_on(
        &ram.ram,
        DeviceConfig {
            max_group_pages: 32,
            ..cfg(1)
        },
    );
    dev.attach(&mut session).expect("add_device");
    // 1 MiB from 0x103000: granules 0x100000..0x210000 (17 of 64 KiB), none mapped.
    let (gpa, len) = (0x10_3000u64, MIB);
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    let t = Instant::now();

    dev.dma_write(0, gpa, &data).expect("DMA write");

    let took = t.elapsed();
    let ds = dev.stats();
    let st = session.stats().unwrap();
    let translates = dev.translates(0, gpa, len, true).unwrap();
    let mut back = vec![0u8; len as usize];
    dev.dma_read(0, gpa, &mut back).expect("DMA read");
    let after_read = dev.stats();
    println!(
        "1 MiB DMA over 17 unmapped granules: {} groups, {} page requests, {took:.2?}; \
         faultd group latency p50 {:.1} us max {:.1} us",
        ds.groups, ds.requests, st.device_latency_us.p50, st.device_latency_us.max
    );

    // Groups of up to 32 pages, each spanning two or three granules: 32 pages from 0x103000
    // (granules 0x10, 0x11, 0x12), six of 32 (two whole granules each), then granule 0x1f
    // and the three pages of granule 0x20: 19. Pages of a granule already mapped by an
    // earlier group are never requested.
    assert_eq!((ds.groups, ds.requests), (8, 32 + 6 * 32 + 19));
    // One answer per group, every one SUCCESS, and each left all its pages translated.
    assert_eq!((ds.success, ds.invalid, ds.stray_responses), (8, 0, 0));
    assert_eq!(ds.unmapped_after_success, 0);
    assert_eq!(ds.retries, 8);
    assert_eq!(
        (
            st.device.groups,
            st.device.pages,
            st.device.success,
            st.device.invalid
        ),
        (8, ds.requests, 8, 0)
    );
    assert_eq!(st.device.respond_errors, 0);
    assert_eq!(st.device.mapped_bytes, 17 * GRANULE);
    assert_eq!(st.resident_bytes, 17 * GRANULE);
    assert_eq!(ram.ram.allocated_bytes().unwrap(), 17 * GRANULE);
    assert!(
        translates,
        "a page of the transfer does not translate after SUCCESS"
    );
    // No second request was needed for any of those pages.
    assert_eq!(after_read.requests, ds.requests);
    assert!(back == data, "read back differs from what was written");
    assert_eq!(st.errors, 0);
}

#[test]
fn requests_outside_ram_and_writes_to_read_only_are_invalid_and_touch_nothing() {
    const RW: u64 = 16 * MIB;
    const RO_GPA: u64 = 64 * MIB;
    const RO: u64 = 4 * MIB;
    const OUTSIDE: u64 = 32 * MIB;
    let faultd = Faultd::start(&[]);
    let _watchdog = Watchdog::new(&faultd);
    let ram = GuestRam::new("vm-rw", RW, RamPageSize::Size4K).unwrap();
    let rom = GuestRam::new("vm-ro", RO, RamPageSize::Size4K).unwrap();
    // Declared after the RAM so that it closes first (an unmap never waits on an event
    // nobody reads).
    let uffd = create_uffd().unwrap();
    ram.register(&uffd).unwrap();
    rom.register(&uffd).unwrap();
    let mut session = Client::connect(faultd.socket())
        .unwrap()
        .register(
            "vm-ro",
            &uffd,
            &[
                RegionSpec::zero(0, &ram),
                RegionSpec::zero(RO_GPA, &rom).read_only(),
            ],
            None,
        )
        .expect("register");
    let ranges = [
        RamRange {
            gpa: 0,
            host: ram.host_ptr(),
            size: RW,
        },
        RamRange {
            gpa: RO_GPA,
            host: rom.host_ptr(),
            size: RO,
        },
    ];
    // The table translates 0..128 MiB, more than the layout: requests for the hole between
    // the regions and past them reach faultd instead of failing in the device.
    let dev_cfg = DeviceConfig {
        iova_end: Some(128 * MIB),
        ..cfg(1)
    };
    // SAFETY: both mappings are declared before the device and outlive it; no Rust reference
    // into guest RAM exists.
    let dev = unsafe { PriDevice::with_ram(&ranges, dev_cfg) }.expect("device");
    dev.attach(&mut session).expect("add_device");
    let allocated = || ram.allocated_bytes().unwrap() + rom.allocated_bytes().unwrap();
    let invalid_at = |res: Result<(), DmaError>, want: u64, what: &str| match res {
        Err(DmaError::Invalid { gpa }) => assert_eq!(gpa, want, "{what}"),
        other => panic!("{what}: expected INVALID, got {other:?}"),
    };
    let mut buf = vec![0xEEu8; 3 * PAGE as usize];

    let ro_write = dev.dma_write(0, RO_GPA + 2 * PAGE, &[1; 100]);
    let after_ro_write = allocated();
    let hole_write = dev.dma_write(0, OUTSIDE + PAGE, &[2; 100]);
    let hole_read = dev.dma_read(0, OUTSIDE, &mut buf);
    let past_read = dev.dma_read(0, 100 * MIB, &mut buf);
    let after_outside = allocated();
    let hole_translates = dev.translates(0, OUTSIDE, 2 * PAGE, false).unwrap();
    let ro_read = dev.dma_read(0, RO_GPA + PAGE, &mut buf);
    let after_ro_read = allocated();
    // Mapped read-only now: a write still misses, asks for WRITE, and is refused again.
    let ro_write_again = dev.dma_write(0, RO_GPA + PAGE, &[3; 8]);
    let rw_write = dev.dma_write(0, PAGE, &[4; 8]);
    let st = session.stats().unwrap();
    let ds = dev.stats();
    println!(
        "faultd: {} groups, {} INVALID ({} outside the layout, {} read-only), {} SUCCESS; \
         device: {} INVALID, {} failed transfers",
        st.device.groups,
        st.device.invalid,
        st.device.outside_layout,
        st.device.read_only,
        st.device.success,
        ds.invalid,
        ds.failed_transfers
    );

    invalid_at(
        ro_write,
        RO_GPA + 2 * PAGE,
        "write into the read-only region",
    );
    invalid_at(hole_write, OUTSIDE + PAGE, "write outside the layout");
    invalid_at(hole_read, OUTSIDE, "read outside the layout");
    invalid_at(past_read, 100 * MIB, "read past the layout");
    invalid_at(
        ro_write_again,
        RO_GPA + PAGE,
        "write into read-only, mapped for reads",
    );
    assert_eq!(after_ro_write, 0, "a refused write made memory resident");
    assert_eq!(after_outside, 0, "a refused request made memory resident");
    assert!(
        !hole_translates,
        "faultd mapped an address outside the layout"
    );
    ro_read.expect("read of the read-only region");
    assert!(
        buf.iter().all(|&b| b == 0),
        "the read-only region reads as zeros"
    );
    assert_eq!(
        after_ro_read, GRANULE,
        "the read made exactly its granule resident"
    );
    assert_eq!(
        rom.allocated_bytes().unwrap(),
        GRANULE,
        "the refused second write grew the read-only region"
    );
    rw_write.expect("write into ordinary RAM");
    assert_eq!(allocated(), 2 * GRANULE);
    assert_eq!(st.device.outside_layout, 3, "{st:?}");
    assert_eq!(st.device.read_only, 2, "{st:?}");
    assert_eq!(st.device.invalid, 5, "{st:?}");
    assert_eq!(st.device.success, 2, "{st:?}");
    assert_eq!(
        (st.device.failed, st.device.malformed, st.errors),
        (0, 0, 0)
    );
    assert_eq!((ds.invalid, ds.success, ds.failed_transfers), (5, 2, 5));
    assert_eq!(st.resident_bytes, 2 * GRANULE);
}

/// splitmix64: small, seedable, good enough to pick hostile inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A read-write shared mapping of a ring memfd, as a hostile VMM holds it.
struct RingMap {
    base: usize,
    len: usize,
}

impl RingMap {
    fn new(fd: BorrowedFd<'_>) -> RingMap {
        let len = nix::sys::stat::fstat(fd).unwrap().st_size as usize;
        // SAFETY: a fresh shared mapping of the ring memfd (sealed against resizing by its
        // creator); Rust code accesses it only through the volatile helpers below.
        let ptr = unsafe {
            mmap(
                None,
                NonZeroUsize::new(len).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .unwrap();
        RingMap {
            base: ptr.as_ptr() as usize,
            len,
        }
    }

    fn w32(&self, off: usize, v: u32) {
        assert!(off.is_multiple_of(4) && off + 4 <= self.len);
        // SAFETY: aligned and inside the mapping (asserted); volatile, no reference.
        unsafe { ((self.base + off) as *mut u32).write_volatile(v) }
    }

    fn r32(&self, off: usize) -> u32 {
        assert!(off.is_multiple_of(4) && off + 4 <= self.len);
        // SAFETY: as in w32.
        unsafe { ((self.base + off) as *const u32).read_volatile() }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; no reference into it exists.
        let _ = unsafe {
            munmap(
                std::ptr::NonNull::new(self.base as *mut std::ffi::c_void).unwrap(),
                self.len,
            )
        };
    }
}

/// Ring layout v1 offsets (docs/device-faults.md).
const OFF_REQ_PROD: usize = 64;
const OFF_REQ_CONS: usize = 128;
const OFF_RESP_PROD: usize = 192;
const OFF_RESP_CONS: usize = 256;
const OFF_REQ_RING: usize = 512;
const RECORD: usize = 40;

/// One hostile step against the ring of a device with `slots` request slots and id `dev_id`,
/// whose guest RAM is `ram` bytes at GPA 0.
fn scribble(ring: &RingMap, rng: &mut Rng, slots: u32, dev_id: u32, ram: u64) {
    match rng.below(8) {
        // Random bytes over a random span, sometimes the whole ring, header included.
        0 => {
            let (start, len) = if rng.below(4) == 0 {
                (0, ring.len)
            } else {
                let start = (rng.below(ring.len as u64 / 4) * 4) as usize;
                (start, (rng.below(512) as usize * 4).min(ring.len - start))
            };
            for off in (start..start + len).step_by(4) {
                ring.w32(off, rng.next() as u32);
            }
        }
        // Impossible or random indices, all four of them.
        1 => {
            let off =
                [OFF_REQ_PROD, OFF_REQ_CONS, OFF_RESP_PROD, OFF_RESP_CONS][rng.below(4) as usize];
            ring.w32(off, rng.next() as u32);
        }
        // A plausible advance over whatever the slots hold now.
        2 => {
            let cons = ring.r32(OFF_REQ_CONS);
            ring.w32(
                OFF_REQ_PROD,
                cons.wrapping_add(rng.below(u64::from(slots) + 1) as u32),
            );
        }
        // Groups that look right, with a field corrupted half of the time; addresses inside
        // the RAM and outside it, LAST sometimes missing, cookies changing mid-group.
        3..=5 => {
            let cons = ring.r32(OFF_REQ_CONS);
            let n = 1 + rng.below(u64::from(slots).min(24)) as u32;
            let mut cookie = 1 + rng.below(u64::from(u32::MAX)) as u32;
            for i in 0..n {
                let slot = OFF_REQ_RING + RECORD * (cons.wrapping_add(i) & (slots - 1)) as usize;
                let addr = rng.below(2 * ram / PAGE) * PAGE;
                let mut rec = [
                    if i + 1 == n && rng.below(8) != 0 {
                        2
                    } else {
                        0
                    }, // flags: LAST
                    dev_id,
                    0,                       // pasid
                    rng.below(512) as u32,   // grpid
                    1 + rng.below(3) as u32, // perm: READ, WRITE, or both
                    0,                       // reserved
                    addr as u32,             // addr low
                    (addr >> 32) as u32,     // addr high
                    0,                       // length
                    cookie,
                ];
                if rng.below(2) == 0 {
                    rec[rng.below(10) as usize] = rng.next() as u32;
                }
                if rng.below(16) == 0 {
                    cookie = 1 + rng.below(u64::from(u32::MAX)) as u32;
                }
                for (k, v) in rec.iter().enumerate() {
                    ring.w32(slot + 4 * k, *v);
                }
            }
            ring.w32(OFF_REQ_PROD, cons.wrapping_add(n));
        }
        // Leave the rest to the kick flood in the caller.
        _ => {}
    }
}

fn kick(fd: BorrowedFd<'_>) {
    // A saturated (EAGAIN) or otherwise failing write only means fewer kicks.
    let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
}

/// What session 2 (the victim) has done so far: device pages per worker and host pages,
/// each walked in a shuffled order so that every step hits fresh memory for as long as the
/// supply lasts (then it wraps around to resident memory).
struct Victim {
    granules: [Vec<u32>; 2],
    next_granule: [usize; 2],
    dma_written: [BTreeSet<u32>; 2],
    host_pages: Vec<u32>,
    next_host: usize,
    host_written: BTreeSet<u32>,
}

fn shuffled(mut v: Vec<u32>, rng: &mut Rng) -> Vec<u32> {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i as u64 + 1) as usize);
    }
    v
}

impl Victim {
    /// The device gets the first half of `pages` (worker w the granules g % 2 == w), the host
    /// the second half.
    fn new(pages: u32, rng: &mut Rng) -> Victim {
        let per = (GRANULE / PAGE) as u32;
        let granules = pages / 2 / per;
        let g0 = shuffled((0..granules).step_by(2).collect(), rng);
        let g1 = shuffled((1..granules).step_by(2).collect(), rng);
        Victim {
            granules: [g0, g1],
            next_granule: [0, 0],
            dma_written: [BTreeSet::new(), BTreeSet::new()],
            host_pages: shuffled((pages / 2..pages).collect(), rng),
            next_host: 0,
            host_written: BTreeSet::new(),
        }
    }
}

fn dma_seed(w: u32) -> u32 {
    0xD0A0 + w
}

fn host_value(p: u32) -> u8 {
    (p.wrapping_mul(0x9E37_79B9) >> 24) as u8 | 1
}

const HOST_OFFSET: u64 = 123;

/// Runs session 2's work until `done()`: each device worker writes a pattern page into its
/// next granule and reads it back at once, the host writes bytes into its next pages. Paced,
/// so the fresh memory lasts through the hostile window on a small machine.
fn run_victim(
    dev: &PriDevice,
    ram: &GuestRam,
    v: &mut Victim,
    rng: &mut Rng,
    done: &(dyn Fn() -> bool + Sync),
) {
    let per = GRANULE / PAGE;
    std::thread::scope(|s| {
        let workers: Vec<_> = v
            .granules
            .iter()
            .zip(v.next_granule.iter_mut())
            .zip(v.dma_written.iter_mut())
            .enumerate()
            .map(|(w, ((granules, next), written))| {
                let w = w as u32;
                let mut rng = Rng(rng.next());
                s.spawn(move || {
                    let mut buf = vec![0u8; PAGE as usize];
                    while !done() {
                        let g = granules[*next % granules.len()];
                        *next += 1;
                        let p = (u64::from(g) * per + rng.below(per)) as u32;
                        let gpa = u64::from(p) * PAGE;
                        let want = pattern_page(gpa, dma_seed(w));
                        dev.dma_write(w, gpa, &want)
                            .unwrap_or_else(|e| panic!("session 2 DMA write {gpa:#x}: {e}"));
                        dev.dma_read(w, gpa, &mut buf)
                            .unwrap_or_else(|e| panic!("session 2 DMA read {gpa:#x}: {e}"));
                        assert!(buf == want, "session 2 page {gpa:#x} read back wrong");
                        written.insert(p);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        while !done() {
            let batch: Vec<u32> = (0..8)
                .map(|i| v.host_pages[(v.next_host + i) % v.host_pages.len()])
                .collect();
            v.next_host += batch.len();
            write_with_timeout(
                ram,
                batch
                    .iter()
                    .map(|&p| (u64::from(p) * PAGE + HOST_OFFSET, host_value(p)))
                    .collect(),
                Duration::from_secs(5),
            );
            v.host_written.extend(batch);
            std::thread::sleep(Duration::from_millis(2));
        }
        for h in workers {
            h.join().expect("session 2 device worker");
        }
    });
}

#[test]
fn hostile_ring_producer_does_not_crash_faultd_or_affect_another_session() {
    const SIZE: u64 = 64 * MIB;
    const VICTIM_SIZE: u64 = 256 * MIB;
    const HOSTILE_FOR: Duration = Duration::from_secs(3);
    let seed = faultd_tests::seed_from("FAULTD_HOSTILE_SEED");
    let mut rng = Rng(seed);
    let mut faultd = Faultd::start(&[]);
    let _watchdog = Watchdog::new(&faultd);
    let ram1 = Ram::new("vm-hostile", SIZE);
    let mut session1 = ram1.serve(&faultd, "vm-hostile");
    let hostile_cfg = DeviceConfig {
        req_slots: 256,
        ..cfg(1)
    };
    let dev1 = device_on(&ram1.ram, hostile_cfg);
    dev1.attach(&mut session1).expect("add_device 1");
    let ram2 = Ram::new("vm-victim", VICTIM_SIZE);
    let mut session2 = ram2.serve(&faultd, "vm-victim");
    let dev2 = device_on(&ram2.ram, cfg(2));
    dev2.attach(&mut session2).expect("add_device 2");
    let ring = RingMap::new(dev1.fds().ring());
    let mut victim = Victim::new((VICTIM_SIZE / PAGE) as u32, &mut rng);
    let stop = AtomicBool::new(false);
    let kicks = AtomicU64::new(0);
    let steps = AtomicU64::new(0);

    let t = Instant::now();
    std::thread::scope(|s| {
        let mut hrng = Rng(rng.next());
        let (ring, dev1, stop, kicks, steps) = (&ring, &dev1, &stop, &kicks, &steps);
        s.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                scribble(ring, &mut hrng, hostile_cfg.req_slots, 1, SIZE);
                let n = if hrng.below(4) == 0 {
                    hrng.below(1000)
                } else {
                    1
                };
                for _ in 0..n {
                    kick(dev1.fds().kick());
                }
                kicks.fetch_add(n, Ordering::Relaxed);
                steps.fetch_add(1, Ordering::Relaxed);
                // A flood, but one that leaves the victim some CPU on a 2-core machine.
                std::thread::sleep(Duration::from_micros(20));
            }
        });
        run_victim(&dev2, &ram2.ram, &mut victim, &mut rng, &|| {
            t.elapsed() >= HOSTILE_FOR
        });
        stop.store(true, Ordering::Relaxed);
    });
    let during = session2.stats().expect("session 2 stats");
    let dev_during = dev2.stats();

    // After the hostility: session 2 keeps working, and faultd still serves session 1's own
    // vCPU-style faults (its hostile device cost only itself).
    let t2 = Instant::now();
    run_victim(&dev2, &ram2.ram, &mut victim, &mut rng, &|| {
        t2.elapsed() >= Duration::from_millis(500)
    });
    let ram1_bytes = read_with_timeout(
        &ram1.ram,
        (0..16).map(|i| SIZE - (i + 1) * 3 * MIB).collect(),
        Duration::from_secs(5),
    );
    assert!(faultd.alive(), "faultd died:\n{}", faultd.log());

    // Everything session 2 wrote checks out, through the device and through the host.
    let mut buf = vec![0u8; PAGE as usize];
    for (w, written) in victim.dma_written.iter().enumerate() {
        for &p in written {
            let gpa = u64::from(p) * PAGE;
            dev2.dma_read(w as u32, gpa, &mut buf)
                .expect("final DMA read");
            assert!(
                buf == pattern_page(gpa, dma_seed(w as u32)),
                "page {gpa:#x} differs"
            );
        }
    }
    let host_offs: Vec<u64> = victim
        .host_written
        .iter()
        .map(|&p| u64::from(p) * PAGE + HOST_OFFSET)
        .collect();
    let got = read_with_timeout(&ram2.ram, host_offs, Duration::from_secs(5));
    for (&p, &v) in victim.host_written.iter().zip(&got) {
        assert_eq!(v, host_value(p), "host byte of page {p} differs");
    }
    assert!(
        ram1_bytes.iter().all(|&b| b == 0),
        "session 1's RAM holds non-zero bytes"
    );
    let st1 = session1.stats().expect("session 1 stats");
    let st2 = session2.stats().expect("session 2 stats");
    let ds2 = dev2.stats();
    println!(
        "hostile: {} steps, {} kicks in {HOSTILE_FOR:?}; session 1: {} groups, {} malformed, \
         {} INVALID, {} SUCCESS, {} respond errors, {} errors",
        steps.load(Ordering::Relaxed),
        kicks.load(Ordering::Relaxed),
        st1.device.groups,
        st1.device.malformed,
        st1.device.invalid,
        st1.device.success,
        st1.device.respond_errors,
        st1.errors
    );
    println!(
        "victim during the hostility: {} device groups (p50 {:.1} us, p99 {:.1} us, max {:.1} \
         us), {} vCPU-style faults (p50 {:.1} us, p99 {:.1} us); in all {} DMA pages, {} host \
         pages",
        during.device.groups,
        during.device_latency_us.p50,
        during.device_latency_us.p99,
        during.device_latency_us.max,
        during.vcpu_faults,
        during.latency_us.p50,
        during.latency_us.p99,
        victim.dma_written.iter().map(BTreeSet::len).sum::<usize>(),
        victim.host_written.len()
    );
    assert!(
        st1.device.malformed > 0,
        "no malformed input counted: {st1:?}"
    );
    // Session 2 was served fresh faults from both sources while session 1 was hostile.
    assert!(
        during.device.groups >= 100 && during.vcpu_faults >= 100,
        "session 2 barely progressed during the hostility: {during:?}"
    );
    assert_eq!(during.device.groups, dev_during.groups);
    assert_eq!(
        (st2.device.invalid, st2.device.malformed, st2.errors),
        (0, 0, 0),
        "{st2:?}"
    );
    assert_eq!(st2.device.success, ds2.groups);
    assert_eq!((ds2.invalid, ds2.timeouts, ds2.failed_transfers), (0, 0, 0));
    assert_eq!(ds2.unmapped_after_success, 0);
}

/// The notify eventfd's open file description is shared with the VMM, which can clear
/// O_NONBLOCK on it and fill its counter to the maximum; faultd's next answer then blocks in
/// write(2). faultd's watchdog interrupts that write and quarantines the device; the session
/// thread is joined off the async runtime, so other VMs' control requests, new registrations
/// and SIGTERM are never held up. (Found as a real hang before the watchdog existed.)
#[test]
fn a_vmm_saturating_its_notify_eventfd_does_not_stall_other_sessions() {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let faultd = Faultd::start(&[]);
    let _watchdog = Watchdog::new(&faultd);
    let good = Ram::new("vm-good", 16 * MIB);
    let mut good_session = good.serve(&faultd, "vm-good");
    let bad = Ram::new("vm-bad", 16 * MIB);
    let mut bad_session = bad.serve(&faultd, "vm-bad");
    let dev = device_on(&bad.ram, cfg(1));
    dev.attach(&mut bad_session).expect("add_device");
    let notify = dev.fds().notify();
    let flags = OFlag::from_bits_retain(fcntl(notify, FcntlArg::F_GETFL).unwrap());
    fcntl(notify, FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK)).unwrap();
    nix::unistd::write(notify, &(u64::MAX - 1).to_ne_bytes()).unwrap();
    // One well-formed group (READ of GPA 0, LAST, cookie 7), posted raw: the device itself
    // would drain the notify counter while waiting for the answer.
    let mut rec = [0u8; RECORD];
    for (off, v) in [(0, 2u32), (4, 1), (16, 1), (36, 7)] {
        rec[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    let ring = dev.fds().ring();
    nix::sys::uio::pwrite(ring, &rec, OFF_REQ_RING as i64).unwrap();
    nix::sys::uio::pwrite(ring, &1u32.to_le_bytes(), OFF_REQ_PROD as i64).unwrap();
    kick(dev.fds().kick());
    let quarantined = settled_stats(&mut bad_session, |s| s.device.quarantined == 1);
    assert_eq!(quarantined.device.quarantined, 1, "{quarantined:?}");
    // The hostile VM's own vCPU faults are still served once its device is quarantined.
    write_with_timeout(&bad.ram, vec![(8 * 4096, 1)], Duration::from_secs(5));

    drop(bad_session);
    std::thread::sleep(Duration::from_millis(200));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(good_session.stats().is_ok());
    });
    let answered = rx.recv_timeout(Duration::from_secs(5));

    assert_eq!(
        answered,
        Ok(true),
        "another VM's stats request was not answered after the hostile session ended"
    );
    let mut faultd = faultd;
    assert!(
        faultd.terminate().success(),
        "faultd did not exit cleanly on SIGTERM"
    );
}

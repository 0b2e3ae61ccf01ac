//! A VMM built on rust-vmm's `vm-memory` that hands the guest memory it already owns to faultd:
//! the runnable companion of `docs/embedding.md`.
//!
//! What it does, end to end, with a real faultd process and a real KVM guest:
//! 1. Guest memory is one memfd the VMM owns, mapped by a vm-memory `GuestMemoryMmap` as two
//!    regions around a hole in guest physical memory (where a real VMM puts its PCI MMIO
//!    window): RAM below the hole is the memfd from offset 0, RAM above it the rest of the
//!    same memfd. Both regions are registered with one userfaultfd and with faultd, which
//!    gets the memfd once.
//! 2. Boot: a guest writes a pattern into pages of both regions (every page it touches faults
//!    to faultd first). The VMM then saves guest memory as a snapshot file (through
//!    vm-memory, as any VMM would) and ends the session with `finish`.
//! 3. Restore: new guest memory of the same shape, registered lazily restored from that
//!    snapshot, kept registered by the client's `Supervisor`. The guest verifies its pages;
//!    then the VMM evicts half of each region to faultd's store and faultd is killed
//!    (SIGKILL) and started again: the Supervisor registers the VM again (`resume`) and the
//!    guest, whose faults waited meanwhile, verifies every page it wrote again, the evicted
//!    ones served from the restarted faultd's store.
//! 4. Teardown: `finish` (faultd fills whatever only it could still provide), the session
//!    ends, the uffd is closed, and every page of guest memory is compared with the
//!    snapshot, which is itself checked page by page against what the guest wrote.
//!
//! Any difference, refusal or timeout exits non-zero. Usage:
//! `faultd-example-vm-memory [--faultd PATH]` (default: `faultd` next to this binary), as
//! root, with `/dev/kvm` and `/dev/userfaultfd`.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use faultd_client::{
    create_uffd, vm_memory_regions, Client, ClientError, Reattach, RegionSpec, Session, Supervisor,
    Uffd,
};
use testvmm::{dword_offsets, page_sequence, pattern, RamSlot, Vm, Workload};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_memory::{GuestMemoryRegion, GuestRegionMmap};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// The VM's name at faultd.
const VM: &str = "embed-example";
/// The guest's pattern seed.
const SEED: u32 = 0x0014_e3bd;

/// One region of guest RAM: where it is in the guest, in the memfd and in the snapshot file.
#[derive(Debug, Clone, Copy)]
struct Part {
    gpa: u64,
    size: u64,
    memfd_offset: u64,
    snapshot_offset: u64,
}

/// RAM below the hole, the hole `[40 MiB, 64 MiB)`, RAM above it: one memfd of 64 MiB, and a
/// snapshot file laid out the same way.
const PARTS: [Part; 2] = [
    Part {
        gpa: 0,
        size: 40 * MIB,
        memfd_offset: 0,
        snapshot_offset: 0,
    },
    Part {
        gpa: 64 * MIB,
        size: 24 * MIB,
        memfd_offset: 40 * MIB,
        snapshot_offset: 40 * MIB,
    },
];
const MEMFD_SIZE: u64 = 64 * MIB;

fn main() -> ExitCode {
    match run() {
        Ok(()) => {
            println!("embed example: ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("embed example FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let bin = faultd_binary()?;
    let dir = tempfile::tempdir().context("temporary directory")?;
    let mut faultd = Faultd::start(bin, dir.path())?;
    let socket = faultd.socket();
    let snapshot_path = dir.path().join("guest.mem");

    // ---- 1, 2: boot, write, snapshot ----
    {
        let memory = guest_memory("source-ram")?;
        let uffd = create_uffd()?;
        let regions = vm_memory_regions(&memory)?;
        for r in &regions {
            r.memory.register(&uffd)?;
        }
        let mut session = Client::connect(&socket)?
            .register(&format!("{VM}-source"), &uffd, &regions, None)
            .context("registering the booting VM")?;
        let mut vm = Vm::new(ram_slots(&memory)?)?;
        vm.set_timeout(Some(Duration::from_secs(120)));
        let reports = vm.run(PARTS.map(|p| workload(p, true)).to_vec(), &|_, _| {})?;
        guest_verified("boot", &reports)?;
        drop(vm);
        save_snapshot(&memory, &snapshot_path)?;
        let finished = session.finish()?;
        ensure!(finished.remaining == 0, "boot: finish left {finished:?}");
        let st = session.stats()?;
        println!(
            "boot: guest wrote {} pages in 2 regions of one memfd around the hole \
             [{:#x}, {:#x}); faultd served {} faults; snapshot saved",
            touched_pages().len(),
            PARTS[0].gpa + PARTS[0].size,
            PARTS[1].gpa,
            st.vcpu_faults
        );
        // Teardown order: the session, the uffd, then the memory.
    }
    let nonzero = check_snapshot(&snapshot_path)?;

    // ---- 3: restore under the Supervisor, with a faultd restart ----
    let snapshot = Arc::new(File::open(&snapshot_path).context("opening the snapshot")?);
    let memory = guest_memory("restored-ram")?;
    let uffd = Arc::new(create_uffd()?);
    let hooks = Hooks {
        memory: memory.clone(),
        uffd: uffd.clone(),
        snapshot: snapshot.clone(),
    };
    for r in restore_regions(&memory)? {
        r.memory.register(&uffd)?;
    }
    let session = Client::connect(&socket)?
        .register(
            VM,
            &uffd,
            &restore_regions(&memory)?,
            Some(snapshot.as_fd()),
        )
        .context("registering the restored VM")?;
    let supervisor = Supervisor::spawn(&socket, session, hooks)?;
    let mut vm = Vm::new(ram_slots(&memory)?)?;
    vm.set_timeout(Some(Duration::from_secs(120)));

    let reports = vm.run(PARTS.map(|p| workload(p, false)).to_vec(), &|_, _| {})?;
    guest_verified("restore, before the restart", &reports)?;
    // Half of each region to faultd's store: the pages above the hole are saved from, and
    // punched out of, the memfd at that region's offset.
    let allocated_before = allocated_bytes(&memory)?;
    let (mut evicted, mut zero) = (0, 0);
    for p in PARTS {
        let (e, z, failed) = supervisor
            .with_session(|s| s.evict(p.gpa, p.size / 2, None))
            .context("no session to evict with")??;
        ensure!(
            e > 0 && failed == 0,
            "evicting half the region at {:#x}: {e} evicted, {failed} failed",
            p.gpa
        );
        (evicted, zero) = (evicted + e, zero + z);
    }
    // Each evicted page was punched out of the memfd, none other: an eviction at the wrong
    // offset of the memfd would have punched another region's page (or a hole) instead.
    let punched = allocated_before - allocated_bytes(&memory)?;
    ensure!(
        punched == evicted * PAGE,
        "eviction freed {punched} bytes of the memfd; {evicted} pages were evicted"
    );
    // Only pages the guest wrote are resident, so none of them reads zero.
    ensure!(zero == 0, "{zero} evicted pages read all zero");
    faultd.crash()?;
    let restarted = Instant::now();
    faultd.start_again()?;
    // The guest runs at once: its faults wait in the uffd until the Supervisor has registered
    // the VM with the new faultd.
    let reports = vm.run(PARTS.map(|p| workload(p, false)).to_vec(), &|_, _| {})?;
    guest_verified("restore, after the restart", &reports)?;
    let sup = supervisor.stats();
    ensure!(
        sup.losses == 1 && sup.resumes == 1,
        "the Supervisor saw {sup:?}, not one loss and one resume"
    );
    let st = supervisor
        .with_session(|s| s.stats())
        .context("no session after the restart")??;
    ensure!(
        st.store_fills == evicted - zero,
        "the restarted faultd filled {} pages from its store; {} were evicted with data \
         (its counters: {st:?}); faultd's log:\n{}",
        st.store_fills,
        evicted - zero,
        faultd.log_lines(&["resum", "WARN", "ERROR"])
    );
    println!(
        "restart: {evicted} pages evicted to faultd's store, faultd killed (SIGKILL) and \
         started again; the Supervisor resumed the VM in {} ms (guest ran on: {} ms); the new \
         faultd served {} faults, {} of them from its store",
        sup.last_outage.as_millis(),
        restarted.elapsed().as_millis(),
        st.vcpu_faults,
        st.store_fills
    );

    // ---- 4: teardown ----
    let finished = supervisor
        .with_session(|s| s.finish())
        .context("no session to finish")??;
    ensure!(finished.remaining == 0, "finish left {finished:?}");
    drop(vm);
    let session = supervisor
        .stop()
        .context("the session was lost at the end")?;
    drop(session);
    drop(Arc::try_unwrap(uffd).map_err(|_| anyhow::anyhow!("the uffd is still shared"))?);
    let pages = compare_with_snapshot(&memory, &snapshot)?;
    println!(
        "teardown: finish filled {} pages; all {pages} pages of guest memory equal the \
         snapshot ({nonzero} of them written by the guest)",
        finished.filled
    );
    faultd.stop()?;
    Ok(())
}

/// What the Supervisor does when faultd comes back: register the same memory again.
struct Hooks {
    memory: GuestMemoryMmap,
    uffd: Arc<Uffd>,
    snapshot: Arc<File>,
}

impl Reattach for Hooks {
    fn resume(&mut self, client: Client) -> Result<Session, ClientError> {
        let regions = restore_regions(&self.memory)?;
        client.resume(VM, &self.uffd, &regions, Some(self.snapshot.as_fd()))
    }
}

/// `memory`'s regions, restored lazily from the snapshot file.
fn restore_regions(memory: &GuestMemoryMmap) -> Result<Vec<RegionSpec<'_>>, ClientError> {
    Ok(vm_memory_regions(memory)?
        .into_iter()
        .map(|r| {
            let part = PARTS.iter().find(|p| p.gpa == r.gpa).expect("one of PARTS");
            r.from_snapshot(part.snapshot_offset)
        })
        .collect())
}

/// A memfd of [`MEMFD_SIZE`] the VMM owns, mapped as [`PARTS`] by vm-memory.
fn guest_memory(name: &str) -> anyhow::Result<GuestMemoryMmap> {
    let memfd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .context("memfd_create")?;
    let memfd = Arc::new(File::from(memfd));
    memfd.set_len(MEMFD_SIZE).context("sizing the memfd")?;
    let regions = PARTS
        .iter()
        .map(|p| {
            GuestRegionMmap::from_range(
                GuestAddress(p.gpa),
                p.size as usize,
                Some(FileOffset::from_arc(memfd.clone(), p.memfd_offset)),
            )
        })
        .collect::<Result<Vec<_>, _>>()
        .context("mapping guest memory")?;
    GuestMemoryMmap::from_regions(regions).context("guest memory")
}

/// Bytes of the memfd under `memory` that hold pages (`fstat`'s blocks).
fn allocated_bytes(memory: &GuestMemoryMmap) -> anyhow::Result<u64> {
    let region = memory.iter().next().context("no guest memory")?;
    let file = region.file_offset().context("anonymous guest memory")?;
    let st = nix::sys::stat::fstat(file.file().as_fd()).context("fstat of the memfd")?;
    Ok(st.st_blocks as u64 * 512)
}

/// KVM memory slots for `memory`'s regions (the guest program's ROM is testvmm's).
fn ram_slots(memory: &GuestMemoryMmap) -> anyhow::Result<Vec<RamSlot>> {
    memory
        .iter()
        .map(|r| {
            Ok(RamSlot {
                gpa: r.start_addr().0,
                host: NonNull::new(r.as_ptr()).context("null mapping")?,
                size: r.len(),
            })
        })
        .collect()
}

/// The guest's work on `part`: write then verify its pattern (`write`), or verify only.
/// Page numbers count from guest address 0.
fn workload(part: Part, write: bool) -> Workload {
    let (seed, touches, first_page, page_count) = sequence(part);
    if write {
        Workload::WriteVerify {
            seed,
            touches,
            first_page,
            page_count,
        }
    } else {
        Workload::Verify {
            seed,
            touches,
            first_page,
            page_count,
        }
    }
}

/// The guest's page sequence over `part`: as many touches as pages (some repeat).
fn sequence(part: Part) -> (u32, u32, u32, u32) {
    let pages = (part.size / PAGE) as u32;
    (SEED, pages, (part.gpa / PAGE) as u32, pages)
}

/// Guest page numbers the boot guest wrote.
fn touched_pages() -> std::collections::BTreeSet<u64> {
    PARTS
        .iter()
        .flat_map(|&p| {
            let (seed, touches, first, count) = sequence(p);
            page_sequence(seed, touches, first, count)
        })
        .map(u64::from)
        .collect()
}

/// What guest page `page` holds after the boot guest ran.
fn expected_page(page: u64, touched: &std::collections::BTreeSet<u64>) -> Vec<u8> {
    let mut bytes = vec![0u8; PAGE as usize];
    if touched.contains(&page) {
        for off in dword_offsets() {
            let v = pattern(page * PAGE + off, SEED);
            bytes[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

fn guest_verified(when: &str, reports: &[testvmm::VcpuReport]) -> anyhow::Result<()> {
    for (i, r) in reports.iter().enumerate() {
        if r.mismatches > 0 {
            bail!(
                "{when}: the guest (vCPU {i}) found {} wrong dwords, the first at gpa {:#x?}",
                r.mismatches,
                r.first_mismatch_gpa
            );
        }
    }
    Ok(())
}

/// Saves guest memory as the snapshot file, region by region, read through vm-memory (pages
/// the guest never touched fault to faultd and read zero).
fn save_snapshot(memory: &GuestMemoryMmap, path: &Path) -> anyhow::Result<()> {
    let file = File::create(path).context("creating the snapshot")?;
    let mut buf = vec![0u8; MIB as usize];
    for p in PARTS {
        for off in (0..p.size).step_by(buf.len()) {
            memory
                .read_slice(&mut buf, GuestAddress(p.gpa + off))
                .context("reading guest memory")?;
            file.write_all_at(&buf, p.snapshot_offset + off)
                .context("writing the snapshot")?;
        }
    }
    file.sync_all().context("syncing the snapshot")?;
    Ok(())
}

/// Checks every page of the snapshot against what the guest wrote; returns how many are not
/// zero.
fn check_snapshot(path: &Path) -> anyhow::Result<u64> {
    let file = File::open(path).context("opening the snapshot")?;
    let touched = touched_pages();
    let mut buf = vec![0u8; PAGE as usize];
    for p in PARTS {
        for i in 0..p.size / PAGE {
            let page = p.gpa / PAGE + i;
            file.read_exact_at(&mut buf, p.snapshot_offset + i * PAGE)?;
            ensure!(
                buf == expected_page(page, &touched),
                "snapshot page of gpa {:#x} is not what the guest wrote",
                page * PAGE
            );
        }
    }
    Ok(touched.len() as u64)
}

/// Compares every page of `memory` with the snapshot; returns the pages compared.
fn compare_with_snapshot(memory: &GuestMemoryMmap, snapshot: &File) -> anyhow::Result<u64> {
    let (mut got, mut want) = (vec![0u8; PAGE as usize], vec![0u8; PAGE as usize]);
    let mut pages = 0;
    for p in PARTS {
        for i in 0..p.size / PAGE {
            memory.read_slice(&mut got, GuestAddress(p.gpa + i * PAGE))?;
            snapshot.read_exact_at(&mut want, p.snapshot_offset + i * PAGE)?;
            ensure!(
                got == want,
                "restored guest page at gpa {:#x} differs from the snapshot",
                p.gpa + i * PAGE
            );
            pages += 1;
        }
    }
    Ok(pages)
}

/// The faultd binary: `--faultd PATH`, else `faultd` next to this program.
fn faultd_binary() -> anyhow::Result<PathBuf> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (Some("--faultd"), Some(path)) => Ok(path.into()),
        (None, None) => {
            let me = std::env::current_exe().context("finding this program")?;
            Ok(me.with_file_name("faultd"))
        }
        _ => bail!("usage: faultd-example-vm-memory [--faultd PATH]"),
    }
}

/// faultd as this example runs it: a child process on a private socket and store directory,
/// killed and started again as a service manager's `Restart=` would.
struct Faultd {
    bin: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl Faultd {
    fn start(bin: PathBuf, dir: &Path) -> anyhow::Result<Faultd> {
        let child = Faultd::spawn(&bin, dir)?;
        let mut f = Faultd {
            bin,
            dir: dir.to_owned(),
            child,
        };
        f.wait_accepting()?;
        Ok(f)
    }

    fn spawn(bin: &Path, dir: &Path) -> anyhow::Result<Child> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(dir.join("faultd.log"))?;
        Command::new(bin)
            .arg("--socket")
            .arg(dir.join("faultd.sock"))
            .arg("--store-dir")
            .arg(dir.join("store"))
            .args(["--metrics-listen", "", "--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("faultd.sock")
    }

    fn wait_accepting(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if Client::connect(self.socket())
                .and_then(Client::status)
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("faultd exited ({status}) before accepting:\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "faultd did not accept in time:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills faultd with SIGKILL: nothing of it runs any more.
    fn crash(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    fn start_again(&mut self) -> anyhow::Result<()> {
        self.child = Faultd::spawn(&self.bin, &self.dir)?;
        self.wait_accepting()
    }

    /// Stops faultd with SIGTERM, as a service manager would; it must exit cleanly.
    fn stop(&mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "faultd exited {status}:\n{}", self.log());
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "faultd did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The lines of faultd's log that contain one of `words`.
    fn log_lines(&self, words: &[&str]) -> String {
        let log = self.log();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| words.iter().any(|w| l.contains(w)))
            .collect();
        lines.join("\n")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("faultd.log")).unwrap_or_default()
    }
}

impl Drop for Faultd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

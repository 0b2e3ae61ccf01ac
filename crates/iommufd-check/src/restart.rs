//! faultd killed with page requests waiting, and a new faultd serving the same device: the
//! restart path of docs/device-faults.md, run against the kernel's iommufd and its selftest
//! mock IOMMU.
//!
//! This process is the VMM: guest RAM backed by a snapshot file (so every page has bytes of
//! its own), a mock device on a fault-capable HWPT, and the session kept by the client's
//! [`Supervisor`], whose [`Reattach::devices`] hook moves the device to a new fault queue with
//! [`requeue_iommufd`] when faultd comes back. What the device reads is read by the kernel's
//! emulated device access (`IOMMU_TEST_OP_ACCESS_RW`) through the device's IOAS, and
//! MD_CHECK_MAP checks the mock domain's translation of each granule against this process's
//! own pages.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::process::Child;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use faultd_client::{
    create_uffd, requeue_iommufd, Client, ClientError, DeviceIommu, DeviceQueue, GuestRam,
    RamPageSize, Reattach, RegionSpec, Session, Supervisor, Uffd,
};
use faultd_proto::SessionStats;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::mock::{self, MockDev, MOCK_APERTURE_START};
use crate::trace;

/// Guest RAM: 4 MiB at the start of the mock IOMMU's aperture (IOVA == GPA), all of it backed
/// by the snapshot file.
const RAM_GPA: u64 = MOCK_APERTURE_START;
const RAM_SIZE: u64 = 4 << 20;
/// faultd's granule in the guest (tests/kernel/faultd.toml).
const GRANULE: u64 = 64 << 10;
const PERM_READ: u32 = 1;
const WAIT: Duration = Duration::from_secs(30);
const VM: &str = "iommufd-restart";
const SNAPSHOT: &str = "/tmp/iommufd-restart.snapshot";

type Res<T> = Result<T, String>;

/// The snapshot's byte at offset `off`: every page differs from its neighbours, and bytes
/// within a page differ.
fn pattern(off: u64) -> u8 {
    ((off >> 12) as u8).wrapping_mul(37) ^ (off as u8) ^ 0x5a
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The device's wiring, shared by the test and the supervisor's hooks.
struct Wiring {
    iommu: OwnedFd,
    dev: MockDev,
    ioas: u32,
    fault_id: u32,
    fault_fd: OwnedFd,
    hwpt: u32,
    /// Fault queues and HWPTs replaced by [`requeue_iommufd`]: (fault fd, fault id, HWPT).
    retired: Vec<(OwnedFd, u32, u32)>,
}

/// The VMM's side of a faultd restart.
struct Hooks {
    ram: Arc<GuestRam>,
    uffd: Arc<Uffd>,
    snapshot: Arc<File>,
    wiring: Arc<Mutex<Wiring>>,
    /// A failed attempt was reported (once: the supervisor retries every few ms).
    said: bool,
}

impl Reattach for Hooks {
    fn resume(&mut self, client: Client) -> Result<Session, ClientError> {
        client.resume(
            VM,
            &self.uffd,
            &[RegionSpec::snapshot(RAM_GPA, &*self.ram, 0)],
            Some(self.snapshot.as_fd()),
        )
    }

    /// The old faultd's mappings out of the IOAS, a new fault queue and HWPT in place of the
    /// old (the kernel answers the old HWPT's groups), and the new queue to the new faultd.
    fn devices(&mut self, session: &mut Session) -> Result<(), ClientError> {
        let mut guard = lock(&self.wiring);
        let w = &mut *guard;
        let (iommu, dev) = (w.iommu.as_fd(), w.dev);
        let q = requeue_iommufd(iommu, dev.idev_id, w.ioas, &[(RAM_GPA, RAM_SIZE)], |h| {
            mock::mock_replace(iommu, &dev, h)
        })
        .map_err(|source| {
            if !self.said {
                self.said = true;
                println!("iommufd-check: requeue failed (the supervisor tries again): {source}");
            }
            ClientError::Reattach {
                dev_id: dev.idev_id,
                source,
            }
        })?;
        let old_fd = std::mem::replace(&mut w.fault_fd, q.fault_fd);
        w.retired.push((old_fd, w.fault_id, w.hwpt));
        w.fault_id = q.fault_id;
        w.hwpt = q.hwpt_id;
        let added = session.add_device(
            dev.idev_id,
            DeviceQueue::Iommufd {
                fault_fd: w.fault_fd.as_fd(),
            },
            DeviceIommu::Iommufd {
                iommufd: iommu,
                ioas_id: w.ioas,
            },
        );
        if let Err(e) = &added {
            if !self.said {
                self.said = true;
                println!("iommufd-check: add_device after the requeue failed: {e}");
            }
        }
        added.map(|_| ())
    }
}

struct Test {
    wiring: Arc<Mutex<Wiring>>,
    ram: Arc<GuestRam>,
    access: OwnedFd,
    supervisor: Option<Supervisor>,
    /// The iommufd, for the test's own calls (the hooks hold a duplicate in the wiring).
    iommu: OwnedFd,
    grpid: u32,
    probe: Vec<u8>,
    passed: usize,
}

impl Test {
    fn ok(&mut self, what: String) {
        self.passed += 1;
        println!("iommufd-check: ok {:>2} {what}", self.passed);
    }

    fn stats(&self) -> Res<SessionStats> {
        let sup = self.supervisor.as_ref().ok_or("no supervisor")?;
        match sup.with_session(|s| s.stats()) {
            Some(Ok(s)) => Ok(s),
            Some(Err(e)) => Err(format!("faultd stats: {e}")),
            None => Err("the session is lost".into()),
        }
    }

    fn trigger(&mut self, gpa: u64) -> Res<()> {
        self.grpid = (self.grpid + 1) % 512;
        let dev = lock(&self.wiring).dev;
        mock::trigger_iopf(self.iommu.as_fd(), &dev, self.grpid, PERM_READ, gpa)
            .map_err(|e| format!("IOMMU_TEST_CMD TRIGGER_IOPF at {gpa:#x}: {e}"))
    }

    /// Requests at `pages`, one group each, all answered SUCCESS by the faultd serving now:
    /// each page's granule translates to this process's page (MD_CHECK_MAP) and the device
    /// reads the snapshot's bytes there.
    fn served(&mut self, pages: &[u64]) -> Res<SessionStats> {
        let before = self.stats()?.device;
        for &p in pages {
            self.trigger(p)?;
        }
        let n = pages.len() as u64;
        let deadline = Instant::now() + WAIT;
        let s = loop {
            let s = self.stats()?;
            let d = s.device;
            if d.success + d.invalid >= before.success + before.invalid + n {
                break s;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{n} page requests not answered within {WAIT:?}: {d:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let d = s.device;
        if d.success != before.success + n || d.respond_errors != before.respond_errors {
            return Err(format!("{n} page requests: faultd stats {d:?}"));
        }
        for &p in pages {
            self.check_reads(p)?;
        }
        Ok(s)
    }

    /// The mock domain translates `page`'s granule to this process's pages, and the device
    /// reads the snapshot's bytes of the page through the IOAS.
    fn check_reads(&self, page: u64) -> Res<()> {
        let w = lock(&self.wiring);
        let g = page & !(GRANULE - 1);
        let va = self.ram.host_addr() + (g - RAM_GPA);
        let mut buf = vec![0u8; 4096];
        mock::access_read(self.iommu.as_fd(), self.access.as_fd(), page, &mut buf)
            .map_err(|e| format!("ACCESS_RW read of {page:#x} through IOAS {}: {e}", w.ioas))?;
        let off = page - RAM_GPA;
        if let Some(i) = (0..4096).find(|&i| buf[i] != pattern(off + i as u64)) {
            return Err(format!(
                "the device read {:#04x} at {:#x}, the snapshot has {:#04x} there",
                buf[i],
                page + i as u64,
                pattern(off + i as u64)
            ));
        }
        mock::md_check_map(self.iommu.as_fd(), w.hwpt, g, GRANULE, va)
            .map_err(|e| format!("MD_CHECK_MAP of granule {g:#x} in HWPT {}: {e}", w.hwpt))?;
        Ok(())
    }

    fn iova_free(&self, g: u64) -> Res<bool> {
        let va = (self.probe.as_ptr() as u64 + 4095) & !4095;
        let ioas = lock(&self.wiring).ioas;
        mock::iova_is_free(self.iommu.as_fd(), ioas, g, GRANULE, va)
            .map_err(|e| format!("probing IOAS {ioas} at {g:#x}: {e}"))
    }
}

/// Whether `fd` (a fault queue) has groups the kernel has not handed out.
fn readable(fd: BorrowedFd<'_>) -> Res<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    let n = poll(&mut fds, PollTimeout::ZERO).map_err(|e| format!("poll fault fd: {e}"))?;
    Ok(n > 0
        && fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN)))
}

fn setup(socket: &Path, passed: usize) -> Res<Test> {
    let iommu: OwnedFd = File::options()
        .read(true)
        .write(true)
        .open("/dev/iommu")
        .map_err(|e| format!("opening /dev/iommu: {e}"))?
        .into();
    let ioas =
        iopf::iommufd::alloc_ioas(iommu.as_fd()).map_err(|e| format!("IOMMU_IOAS_ALLOC: {e}"))?;
    let dev = mock::mock_domain(iommu.as_fd(), ioas)
        .map_err(|e| format!("IOMMU_TEST_CMD MOCK_DOMAIN: {e}"))?;
    let (fault_id, fault_fd) = iopf::iommufd::alloc_fault_queue(iommu.as_fd())
        .map_err(|e| format!("IOMMU_FAULT_QUEUE_ALLOC: {e}"))?;
    let hwpt = iopf::iommufd::alloc_fault_hwpt(iommu.as_fd(), dev.idev_id, ioas, fault_id)
        .map_err(|e| format!("fault-capable HWPT: {e}"))?;
    mock::mock_replace(iommu.as_fd(), &dev, hwpt)
        .map_err(|e| format!("attaching the mock device to HWPT {hwpt}: {e}"))?;
    let access = mock::create_access(iommu.as_fd(), ioas)
        .map_err(|e| format!("IOMMU_TEST_CMD CREATE_ACCESS on IOAS {ioas}: {e}"))?;

    let bytes: Vec<u8> = (0..RAM_SIZE).map(pattern).collect();
    let mut f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(SNAPSHOT)
        .map_err(|e| format!("creating {SNAPSHOT}: {e}"))?;
    f.write_all(&bytes)
        .map_err(|e| format!("writing {SNAPSHOT}: {e}"))?;
    let snapshot = Arc::new(f);
    let ram = Arc::new(
        GuestRam::new("restart-ram", RAM_SIZE, RamPageSize::Size4K)
            .map_err(|e| format!("guest RAM: {e}"))?,
    );
    let uffd = Arc::new(create_uffd().map_err(|e| format!("userfaultfd: {e}"))?);
    ram.register(&uffd)
        .map_err(|e| format!("uffd register: {e}"))?;
    let mut session = Client::connect(socket)
        .and_then(|c| {
            c.register(
                VM,
                &uffd,
                &[RegionSpec::snapshot(RAM_GPA, &*ram, 0)],
                Some(snapshot.as_fd()),
            )
        })
        .map_err(|e| format!("registering with faultd: {e}"))?;
    session
        .add_device(
            dev.idev_id,
            DeviceQueue::Iommufd {
                fault_fd: fault_fd.as_fd(),
            },
            DeviceIommu::Iommufd {
                iommufd: iommu.as_fd(),
                ioas_id: ioas,
            },
        )
        .map_err(|e| format!("add_device: {e}"))?;
    let wiring = Arc::new(Mutex::new(Wiring {
        // The same iommufd (a second open would be another context, without these objects).
        iommu: iommu
            .try_clone()
            .map_err(|e| format!("dup of /dev/iommu: {e}"))?,
        dev,
        ioas,
        fault_id,
        fault_fd,
        hwpt,
        retired: Vec::new(),
    }));
    let hooks = Hooks {
        ram: ram.clone(),
        uffd,
        snapshot,
        wiring: wiring.clone(),
        said: false,
    };
    let supervisor = Supervisor::spawn(socket, session, hooks)
        .map_err(|e| format!("starting the supervisor: {e}"))?;
    Ok(Test {
        wiring,
        ram,
        access,
        supervisor: Some(supervisor),
        iommu,
        grpid: 0,
        probe: vec![0x5a; (GRANULE + 4096) as usize],
        passed,
    })
}

/// Runs the restart checks against `faultd` (started by this process, serving `socket`),
/// numbering them on from `passed`. On return `faultd` is the faultd started in its place.
pub fn run(socket: &Path, faultd: &mut Child, passed: usize) -> Res<usize> {
    let mut t = setup(socket, passed)?;
    let old_pid = Pid::from_raw(faultd.id() as i32);
    let g = |i: u64| RAM_GPA + i * GRANULE;

    // faultd #1 serves two requests.
    t.served(&[g(0) + 0x3000, g(1) + 0x1000])?;
    let session = t.stats()?.session;
    let hwpt1 = lock(&t.wiring).hwpt;
    t.ok(format!(
        "restart: faultd #1 (pid {old_pid}, session {session}) served 2 page requests through HWPT {hwpt1}; the device reads the snapshot's bytes there (ACCESS_RW through the IOAS, MD_CHECK_MAP matches)"
    ));

    // faultd #1 killed holding one read group, with two more queued in the kernel.
    let tid = trace::thread(old_pid, &format!("faultd-s{session}"))?;
    let fd = trace::fd_of_kind(old_pid, iopf::iommufd::FAULT_FD_KIND)?;
    let mut tracer = trace::Tracer::seize(tid)?;
    t.trigger(g(2) + 0x2000)?;
    let read = tracer.run_to_read_exit(fd)?;
    t.trigger(g(3))?;
    t.trigger(g(4))?;
    let queued = readable(lock(&t.wiring).fault_fd.as_fd())?;
    kill(old_pid, Signal::SIGKILL).map_err(|e| format!("SIGKILL to faultd: {e}"))?;
    let killed_at = Instant::now();
    tracer.reap()?;
    let status = faultd
        .wait()
        .map_err(|e| format!("waiting for faultd #1: {e}"))?;
    if read != 40 || !queued {
        return Err(format!(
            "before the kill: faultd's read took {read} bytes (expected one 40-byte group), groups queued in the kernel: {queued} (expected true)"
        ));
    }
    *faultd = crate::start_faultd()?;
    let new_pid = faultd.id();
    let deadline = Instant::now() + WAIT;
    let stats = loop {
        let sup = t.supervisor.as_ref().ok_or("no supervisor")?;
        let st = sup.stats();
        if st.resumes >= 1 && sup.is_served() {
            break st;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the supervisor did not bring the session back within {WAIT:?}: {st:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let outage = killed_at.elapsed();
    let (hwpt2, old_queue_readable) = {
        let w = lock(&t.wiring);
        let old = w.retired.first().map(|(fd, ..)| readable(fd.as_fd()));
        (w.hwpt, old)
    };
    if hwpt2 == hwpt1 || old_queue_readable != Some(Ok(false)) {
        return Err(format!(
            "after the resume: device on HWPT {hwpt2} (was {hwpt1}), old fault queue readable: {old_queue_readable:?} (expected Some(Ok(false)): the kernel answers its groups at the replace)"
        ));
    }
    for i in 0..2 {
        if !t.iova_free(g(i))? {
            return Err(format!(
                "granule {:#x}, mapped by faultd #1, is still in the IOAS after the requeue",
                g(i)
            ));
        }
    }
    t.ok(format!(
        "restart: faultd #1 SIGKILLed ({status}) holding 1 read group (ptrace-stopped after its read(2)) with 2 more queued; faultd #2 (pid {new_pid}) started; the supervisor resumed the session and requeued the device (HWPT {hwpt1} -> {hwpt2} with a new fault queue): the old queue is empty (the kernel answered its groups), faultd #1's 2 granules are out of the IOAS; {} lost, {} resumed, kill to served {:.0} ms",
        stats.losses,
        stats.resumes,
        outage.as_secs_f64() * 1000.0
    ));

    // faultd #2 serves what the device asks again and what it had never asked.
    let again = [g(2) + 0x2000, g(3), g(4), g(0) + 0x3000, g(5) + 0xf000];
    let s = t.served(&again)?;
    let d = s.device;
    if d.groups != again.len() as u64 || d.stale_cookies != 0 || s.errors != 0 {
        return Err(format!("faultd #2 after the restart: {s:?}"));
    }
    t.ok(format!(
        "restart: faultd #2 served the device's next {} page requests (the held one, the 2 queued ones again, one faultd #1 had mapped, a new one) through HWPT {hwpt2}: all SUCCESS, none refused; the device reads the snapshot's bytes at each (ACCESS_RW), MD_CHECK_MAP matches",
        again.len()
    ));

    if let Some(sup) = t.supervisor.take() {
        drop(sup.stop());
    }
    let mut w = lock(&t.wiring);
    for (fd, fault_id, hwpt) in std::mem::take(&mut w.retired) {
        let _ = iopf::iommufd::destroy(w.iommu.as_fd(), hwpt);
        drop(fd);
        let _ = iopf::iommufd::destroy(w.iommu.as_fd(), fault_id);
    }
    drop(w);
    Ok(t.passed)
}

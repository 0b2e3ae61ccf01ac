//! The checks: this process plays the VMM, the kernel's mock IOMMU plays the device, faultd
//! serves the device's page requests from the real iommufd fault queue.
//!
//! Every mapping faultd makes is checked in the kernel with MD_CHECK_MAP (the mock domain's
//! translation of the IOVA against the physical page behind this process's own mapping of the
//! same guest RAM), every mapping faultd must not have (outside the layout, read-only write,
//! evicted, discarded, after the session) by probing the IOAS: a FIXED_IOVA map there succeeds
//! only on free IOVA. faultd's counters are checked against what was asked of it.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use faultd_client::{
    create_uffd, Client, DeviceIommu, DeviceQueue, GuestRam, RamPageSize, RegionSpec, Session, Uffd,
};
use faultd_proto::SessionStats;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::mock::{self, MockDev, MOCK_APERTURE_START};
use crate::trace;

/// Guest RAM: 16 MiB at the start of the mock IOMMU's aperture (IOVA == GPA).
const RAM_GPA: u64 = MOCK_APERTURE_START;
const RAM_SIZE: u64 = 16 << 20;
/// A read-only region (a ROM): devices may read it, never write it.
const ROM_GPA: u64 = 48 << 20;
const ROM_SIZE: u64 = 1 << 20;
/// Inside the mock's aperture, outside the guest layout.
const OUTSIDE_GPA: u64 = 0x4000_0000;
/// faultd's config in the guest (tests/kernel/faultd.toml): granule_kib = 64, pin_limit_mib = 2.
const GRANULE: u64 = 64 << 10;
const PIN_LIMIT: u64 = 2 << 20;

const PERM_READ: u32 = 1;
const PERM_WRITE: u32 = 2;

/// How long faultd gets for anything (TCG is slow, and the host may be busy).
const WAIT: Duration = Duration::from_secs(30);

type Res<T> = Result<T, String>;

/// Runs every check against the faultd listening on `socket` (process `faultd_pid`), numbering
/// them on from `passed`. Returns how many passed in all; the first failure ends the run.
pub fn run(socket: &Path, faultd_pid: i32, passed: usize) -> Res<usize> {
    let mut t = Test::setup(socket, Pid::from_raw(faultd_pid), passed)?;
    t.good_cases()?;
    t.bad_addresses()?;
    t.replace_with_groups_queued_in_the_kernel()?;
    t.replace_with_groups_held_by_faultd()?;
    t.cookie_reuse()?;
    t.recovery_after_replace()?;
    t.eviction()?;
    t.discard()?;
    t.session_end()?;
    Ok(t.passed)
}

/// The LRU faultd keeps under its pin limit, as this side predicts it: granules in mapping
/// order, and those evicted to stay within the limit.
#[derive(Debug, Default)]
struct Pins {
    mapped: VecDeque<u64>,
    evicted: Vec<u64>,
    /// Granules whose page requests were never served (answered INVALID by the kernel).
    never: Vec<u64>,
}

impl Pins {
    /// faultd mapped `g` (a second request inside a mapped granule maps nothing new).
    fn map(&mut self, g: u64) {
        if self.mapped.contains(&g) {
            return;
        }
        self.mapped.push_back(g);
        while self.mapped.len() as u64 * GRANULE > PIN_LIMIT {
            if let Some(old) = self.mapped.pop_front() {
                self.evicted.push(old);
            }
        }
    }
}

struct Test {
    faultd: Pid,
    // Declaration order is drop order: the session ends (faultd lets go of every fd) first.
    session: Option<Session>,
    /// The VMM keeps its userfaultfd open (faultd serves its own copy).
    _uffd: Uffd,
    ram: GuestRam,
    rom: GuestRam,
    iommu: OwnedFd,
    fault_fd: OwnedFd,
    ioas: u32,
    fault_id: u32,
    dev: MockDev,
    /// The fault-capable HWPT the mock device is attached to now, and the other one.
    hwpt: u32,
    spare_hwpt: Option<u32>,
    pins: Pins,
    next_fresh: u64,
    grpid: u32,
    /// Resident anonymous memory for IOAS probes.
    probe: Vec<u8>,
    passed: usize,
}

impl Test {
    fn ok(&mut self, what: String) {
        self.passed += 1;
        println!("iommufd-check: ok {:>2} {what}", self.passed);
    }

    fn session(&mut self) -> &mut Session {
        self.session
            .as_mut()
            .expect("session is open until session_end")
    }

    fn iommu(&self) -> BorrowedFd<'_> {
        self.iommu.as_fd()
    }

    fn setup(socket: &Path, faultd: Pid, passed: usize) -> Res<Test> {
        let iommu: OwnedFd = File::options()
            .read(true)
            .write(true)
            .open("/dev/iommu")
            .map_err(|e| format!("opening /dev/iommu (CONFIG_IOMMUFD): {e}"))?
            .into();
        let ioas = iopf::iommufd::alloc_ioas(iommu.as_fd())
            .map_err(|e| format!("IOMMU_IOAS_ALLOC: {e}"))?;
        let dev = mock::mock_domain(iommu.as_fd(), ioas)
            .map_err(|e| format!("IOMMU_TEST_CMD MOCK_DOMAIN (needs CONFIG_IOMMUFD_TEST): {e}"))?;
        let (fault_id, fault_fd) = iopf::iommufd::alloc_fault_queue(iommu.as_fd())
            .map_err(|e| format!("IOMMU_FAULT_QUEUE_ALLOC: {e}"))?;
        let hwpt = iopf::iommufd::alloc_fault_hwpt(iommu.as_fd(), dev.idev_id, ioas, fault_id)
            .map_err(|e| format!("allocating a fault-capable paging HWPT over IOAS {ioas}: {e}"))?;
        mock::mock_replace(iommu.as_fd(), &dev, hwpt)
            .map_err(|e| format!("attaching the mock device to fault HWPT {hwpt}: {e}"))?;

        let ram = GuestRam::new("guest-ram", RAM_SIZE, RamPageSize::Size4K)
            .map_err(|e| format!("guest RAM: {e}"))?;
        let rom = GuestRam::new("guest-rom", ROM_SIZE, RamPageSize::Size4K)
            .map_err(|e| format!("guest ROM: {e}"))?;
        let uffd = create_uffd().map_err(|e| format!("userfaultfd: {e}"))?;
        ram.register(&uffd)
            .and_then(|()| rom.register(&uffd))
            .map_err(|e| format!("uffd register: {e}"))?;
        let regions = [
            RegionSpec::zero(RAM_GPA, &ram),
            RegionSpec::zero(ROM_GPA, &rom).read_only(),
        ];
        let mut session = Client::connect(socket)
            .and_then(|c| c.register("iommufd-check", &uffd, &regions, None))
            .map_err(|e| format!("registering with faultd: {e}"))?;
        let granule = session
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
            .map_err(|e| format!("add_device (iommufd fault queue + IOAS): {e}"))?;
        let mut t = Test {
            faultd,
            session: Some(session),
            _uffd: uffd,
            ram,
            rom,
            iommu,
            fault_fd,
            ioas,
            fault_id,
            dev,
            hwpt,
            spare_hwpt: None,
            pins: Pins::default(),
            next_fresh: 8,
            grpid: 0,
            probe: vec![0x5a; (GRANULE + 4096) as usize],
            passed,
        };
        let session_id = t.session().id();
        t.ok(format!(
            "setup: IOAS {ioas}, mock device (dev_id {}) moved from HWPT {} to paging HWPT {hwpt} (FAULT_ID_VALID, fault queue {fault_id}); faultd session {session_id} with the device",
            dev.idev_id,
            dev.hwpt_id,
        ));
        if granule != GRANULE {
            return Err(format!(
                "faultd maps granules of {granule} bytes, expected {GRANULE}"
            ));
        }
        t.ok(format!("faultd maps {} KiB granules", granule >> 10));
        Ok(t)
    }

    /// This process's address of guest page `gpa` (which must be in the layout).
    fn host_va(&self, gpa: u64) -> u64 {
        if (ROM_GPA..ROM_GPA + ROM_SIZE).contains(&gpa) {
            self.rom.host_addr() + (gpa - ROM_GPA)
        } else {
            assert!((RAM_GPA..RAM_GPA + RAM_SIZE).contains(&gpa));
            self.ram.host_addr() + (gpa - RAM_GPA)
        }
    }

    fn granule_of(gpa: u64) -> u64 {
        gpa & !(GRANULE - 1)
    }

    /// A RAM granule no request has touched yet.
    fn fresh(&mut self) -> u64 {
        let g = RAM_GPA + self.next_fresh * GRANULE;
        self.next_fresh += 1;
        assert!(g < RAM_GPA + RAM_SIZE, "out of fresh granules");
        g
    }

    fn trigger(&mut self, gpa: u64, perm: u32) -> Res<()> {
        self.grpid = (self.grpid + 1) % 512;
        mock::trigger_iopf(self.iommu(), &self.dev, self.grpid, perm, gpa)
            .map_err(|e| format!("IOMMU_TEST_CMD TRIGGER_IOPF at {gpa:#x}: {e}"))
    }

    fn stats(&mut self) -> Res<SessionStats> {
        self.session()
            .stats()
            .map_err(|e| format!("faultd stats: {e}"))
    }

    /// faultd's stats once `done` holds; an error naming `what` if it does not within WAIT.
    fn settle(&mut self, what: &str, done: impl Fn(&SessionStats) -> bool) -> Res<SessionStats> {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.stats()?;
            if done(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{what}: faultd did not get there within {WAIT:?}; stats: {:?}",
                    s.device
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// One page request, waited for until faultd has answered it. Returns the stats then.
    fn fault(&mut self, gpa: u64, perm: u32) -> Res<SessionStats> {
        let before = self.stats()?.device;
        self.trigger(gpa, perm)?;
        self.settle(&format!("page request at {gpa:#x}"), |s| {
            s.device.success + s.device.invalid > before.success + before.invalid
        })
    }

    /// MD_CHECK_MAP of granule `g` in the current HWPT against this process's view of it.
    fn check_mapped(&self, g: u64) -> Res<()> {
        mock::md_check_map(self.iommu(), self.hwpt, g, GRANULE, self.host_va(g)).map_err(|e| {
            format!(
                "MD_CHECK_MAP: HWPT {} does not translate granule {g:#x} to this VMM's guest pages: {e}",
                self.hwpt
            )
        })
    }

    /// Nothing in the IOAS at granule `g` (and so nothing in any HWPT built on it), and the
    /// mock domain does not translate its first page to the guest page either.
    fn check_unmapped(&self, g: u64) -> Res<()> {
        let in_layout = (RAM_GPA..RAM_GPA + RAM_SIZE).contains(&g)
            || (ROM_GPA..ROM_GPA + ROM_SIZE).contains(&g);
        if in_layout
            && mock::md_check_map(self.iommu(), self.hwpt, g, 4096, self.host_va(g)).is_ok()
        {
            return Err(format!(
                "MD_CHECK_MAP: HWPT {} still translates {g:#x} to guest RAM",
                self.hwpt
            ));
        }
        let va = (self.probe.as_ptr() as u64 + 4095) & !4095;
        match mock::iova_is_free(self.iommu(), self.ioas, g, GRANULE, va) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!("IOAS {} has a mapping at {g:#x}", self.ioas)),
            Err(e) => Err(format!("probing IOAS {} at {g:#x}: {e}", self.ioas)),
        }
    }

    /// Every granule the model says is mapped is mapped to the right pages, every evicted or
    /// never-served one is not, and faultd's counters agree.
    fn verify_pins(&mut self, phase: &str) -> Res<()> {
        for &g in &self.pins.mapped {
            self.check_mapped(g)?;
        }
        for &g in self.pins.evicted.iter().chain(&self.pins.never) {
            self.check_unmapped(g)?;
        }
        let want_bytes = self.pins.mapped.len() as u64 * GRANULE;
        let want_evictions = self.pins.evicted.len() as u64;
        let s = self.stats()?.device;
        if s.mapped_bytes != want_bytes || s.pin_evictions != want_evictions {
            return Err(format!(
                "{phase}: faultd reports {} mapped bytes and {} evictions, expected {want_bytes} and {want_evictions}",
                s.mapped_bytes, s.pin_evictions
            ));
        }
        self.ok(format!(
            "{phase}: MD_CHECK_MAP matches all {} mapped granules in HWPT {}; {} evicted and {} never-served granules are absent from the IOAS; faultd: {} KiB mapped, {} evictions",
            self.pins.mapped.len(),
            self.hwpt,
            self.pins.evicted.len(),
            self.pins.never.len(),
            s.mapped_bytes >> 10,
            s.pin_evictions
        ));
        Ok(())
    }

    fn good_cases(&mut self) -> Res<()> {
        let cases = [
            (RAM_GPA, PERM_READ, "first page of RAM, read"),
            (
                RAM_GPA + 5 * 4096,
                PERM_WRITE,
                "another page of the same granule, write",
            ),
            (
                RAM_GPA + (1 << 20) + 0x3000,
                PERM_WRITE,
                "mid-granule page, write",
            ),
            (RAM_GPA + (2 << 20), PERM_READ | PERM_WRITE, "read+write"),
            (RAM_GPA + RAM_SIZE - 4096, PERM_READ, "last page of RAM"),
            (ROM_GPA + 0x2000, PERM_READ, "read of the read-only region"),
        ];
        let before = self.stats()?.device;
        for (i, (gpa, perm, what)) in cases.into_iter().enumerate() {
            let s = self.fault(gpa, perm)?.device;
            if s.success != before.success + i as u64 + 1 || s.invalid != before.invalid {
                return Err(format!(
                    "{what} ({gpa:#x}): not answered SUCCESS; stats {s:?}"
                ));
            }
            let g = Self::granule_of(gpa);
            self.pins.map(g);
            self.check_mapped(g)?;
            self.ok(format!(
                "page request at {gpa:#x} ({what}): answered SUCCESS, MD_CHECK_MAP of granule {g:#x} matches"
            ));
        }
        let s = self.stats()?;
        let d = s.device;
        let n = cases.len() as u64;
        if d.groups != before.groups + n
            || d.pages != before.pages + n
            || d.success != before.success + n
            || d.respond_errors != 0
            || s.errors != 0
        {
            return Err(format!("good cases: faultd stats {s:?}"));
        }
        self.ok(format!(
            "faultd stats: {} groups, {} pages, {} SUCCESS, 0 respond errors, 0 errors; device latency p50 {:.0} us, max {:.0} us",
            d.groups, d.pages, d.success, s.device_latency_us.p50, s.device_latency_us.max
        ));
        self.verify_pins("after the good cases")
    }

    fn bad_addresses(&mut self) -> Res<()> {
        let cases = [
            (OUTSIDE_GPA, PERM_READ, false, "outside the layout (1 GiB)"),
            (
                RAM_GPA + RAM_SIZE,
                PERM_WRITE,
                false,
                "just past the end of RAM",
            ),
            (
                ROM_GPA + 0x4_0000,
                PERM_WRITE,
                true,
                "write to the read-only region",
            ),
        ];
        for (gpa, perm, read_only, what) in cases {
            let before = self.stats()?.device;
            let s = self.fault(gpa, perm)?;
            let d = s.device;
            let (outside, ro) = (
                d.outside_layout - before.outside_layout,
                d.read_only - before.read_only,
            );
            let ok = d.invalid == before.invalid + 1
                && d.success == before.success
                && if read_only {
                    ro == 1 && outside == 0
                } else {
                    outside == 1 && ro == 0
                };
            if !ok {
                return Err(format!("{what} ({gpa:#x}): stats {d:?}"));
            }
            self.check_unmapped(Self::granule_of(gpa))?;
            self.ok(format!(
                "page request at {gpa:#x} ({what}): answered INVALID ({}), nothing mapped there",
                if read_only {
                    "read_only"
                } else {
                    "outside_layout"
                }
            ));
        }
        let s = self.stats()?;
        if s.device.respond_errors != 0 || s.errors != 0 {
            return Err(format!("bad addresses: faultd stats {s:?}"));
        }
        self.verify_pins("after the bad addresses")
    }

    /// Waits until every thread of faultd is stopped (SIGSTOP is asynchronous).
    fn wait_stopped(&self) -> Res<()> {
        let deadline = Instant::now() + WAIT;
        let dir = format!("/proc/{}/task", self.faultd);
        loop {
            let mut all = true;
            let tasks = std::fs::read_dir(&dir).map_err(|e| format!("reading {dir}: {e}"))?;
            for task in tasks.flatten() {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
                if !matches!(state, Some('T' | 't')) {
                    all = false;
                }
            }
            if all {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("faultd did not stop on SIGSTOP".into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn signal(&self, sig: Signal) -> Res<()> {
        kill(self.faultd, sig).map_err(|e| format!("{sig} to faultd: {e}"))
    }

    /// Whether the fault queue has groups the kernel has not handed out yet.
    fn fault_queue_readable(&self) -> Res<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(self.fault_fd.as_fd(), PollFlags::POLLIN)];
        let n = poll(&mut fds, PollTimeout::ZERO).map_err(|e| format!("poll fault fd: {e}"))?;
        Ok(n > 0
            && fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN)))
    }

    /// Replaces the mock device's HWPT with the other fault-capable one (same IOAS, same fault
    /// queue), allocating it the first time.
    fn replace_hwpt(&mut self) -> Res<u32> {
        let next = match self.spare_hwpt {
            Some(h) => h,
            None => iopf::iommufd::alloc_fault_hwpt(
                self.iommu(),
                self.dev.idev_id,
                self.ioas,
                self.fault_id,
            )
            .map_err(|e| format!("allocating a second fault HWPT: {e}"))?,
        };
        mock::mock_replace(self.iommu(), &self.dev, next)
            .map_err(|e| format!("MOCK_DOMAIN_REPLACE to HWPT {next}: {e}"))?;
        self.spare_hwpt = Some(self.hwpt);
        self.hwpt = next;
        Ok(next)
    }

    /// Groups the kernel still holds (faultd stopped, has not read them) when the HWPT is
    /// replaced: the kernel answers them INVALID itself; faultd never sees them.
    fn replace_with_groups_queued_in_the_kernel(&mut self) -> Res<()> {
        let before = self.stats()?.device;
        self.signal(Signal::SIGSTOP)?;
        self.wait_stopped()?;
        let mut queued = Vec::new();
        for _ in 0..4 {
            let g = self.fresh();
            self.trigger(g + 0x1000, PERM_READ)?;
            queued.push(g);
        }
        let readable_before = self.fault_queue_readable()?;
        let old = self.hwpt;
        let replaced = self.replace_hwpt();
        let readable_after = self.fault_queue_readable();
        self.signal(Signal::SIGCONT)?;
        let new = replaced?;
        let readable_after = readable_after?;
        if !readable_before || readable_after {
            return Err(format!(
                "fault queue readable before the replace: {readable_before} (expected true), after: {readable_after} (expected false)"
            ));
        }
        self.pins.never.extend(queued);
        // faultd wakes up to an empty queue; nothing for it to answer.
        std::thread::sleep(Duration::from_millis(200));
        let s = self.stats()?;
        if s.device.groups != before.groups || s.device.respond_errors != before.respond_errors {
            return Err(format!(
                "faultd read groups the kernel had answered at the replace: {:?}",
                s.device
            ));
        }
        self.ok(format!(
            "HWPT {old} replaced by {new} with 4 groups queued in the kernel (faultd stopped): the kernel answered them and emptied the queue; faultd read none"
        ));
        Ok(())
    }

    /// Groups faultd has read but not answered when the HWPT is replaced: the kernel answers
    /// them INVALID, and faultd's own answers then name cookies the kernel no longer knows
    /// (EINVAL -> RespondError::UnknownCookie, counted in respond_errors). faultd must carry on.
    fn replace_with_groups_held_by_faultd(&mut self) -> Res<()> {
        const BATCH: usize = 24;
        // faultd may answer a whole batch before the replace lands (the host decides who runs):
        // about one attempt in seven here. Every attempt uses fresh granules.
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let before = self.stats()?;
            self.signal(Signal::SIGSTOP)?;
            self.wait_stopped()?;
            let mut batch = Vec::new();
            for _ in 0..BATCH {
                let g = self.fresh();
                self.trigger(g, PERM_WRITE)?;
                batch.push(g);
            }
            let allocated = self
                .ram
                .allocated_bytes()
                .map_err(|e| format!("fstat guest RAM: {e}"))?;
            self.signal(Signal::SIGCONT)?;
            // faultd has read the whole batch (one read(2) takes every queued group) once it
            // starts filling the first granule.
            let deadline = Instant::now() + WAIT;
            while self.ram.allocated_bytes().unwrap_or(0) == allocated {
                if Instant::now() > deadline {
                    return Err("faultd did not start serving the batch".into());
                }
                std::hint::spin_loop();
            }
            let old = self.hwpt;
            let new = self.replace_hwpt()?;
            let want = before.device.groups + BATCH as u64;
            let s = self.settle("the batch after the replace", |s| {
                s.device.groups >= want
                    && s.device.success + s.device.invalid
                        >= before.device.success + before.device.invalid + BATCH as u64
            })?;
            // faultd maps every granule it read, then answers (the answer may be refused).
            for g in batch {
                self.pins.map(g);
            }
            let d = s.device;
            let stale = d.respond_errors - before.device.respond_errors;
            if d.groups != want || d.success != before.device.success + BATCH as u64 {
                return Err(format!("batch of {BATCH}: faultd stats {d:?}"));
            }
            if stale > 0 {
                self.ok(format!(
                    "HWPT {old} replaced by {new} while faultd held a batch of {BATCH} read groups (attempt {attempt}): the kernel answered them; {stale} of faultd's answers came back EINVAL (unknown cookie), counted in respond_errors; faultd carried on"
                ));
                return self.verify_pins("after the replace with groups held by faultd");
            }
            println!(
                "iommufd-check: note: attempt {attempt}: faultd answered all {BATCH} groups before the replace; trying again"
            );
        }
        Err(format!(
            "could not provoke a stale-cookie answer in {ATTEMPTS} attempts"
        ))
    }

    /// The cookie guard against the real kernel. faultd's fault thread is stopped (ptrace) right
    /// after a read(2) of its fault queue returned group "old", before it answers it; the VMM
    /// replaces the HWPT (the kernel answers "old" and frees its cookie) and the device raises
    /// group "new" through the new HWPT (same fault queue); faultd's next read(2) in the same
    /// pass hands it "new" under the freed cookie (the kernel's lowest free one). Without the
    /// guard faultd answers "old" SUCCESS first and the kernel takes it as the answer of "new",
    /// whose page faultd has not mapped yet; "new"'s own answer then comes back EINVAL. With it
    /// faultd drops "old" unanswered (counted in stale_cookies) and answers "new" once, after
    /// mapping it.
    fn cookie_reuse(&mut self) -> Res<()> {
        let before = self.stats()?.device;
        let name = format!("faultd-s{}", self.session().id());
        let tid = trace::thread(self.faultd, &name)?;
        let fd = trace::fd_of_kind(self.faultd, iopf::iommufd::FAULT_FD_KIND)?;
        let mut tracer = trace::Tracer::seize(tid)?;
        let old = self.fresh();
        self.trigger(old, PERM_READ)?;
        let read = tracer.run_to_read_exit(fd)?;
        if read != 40 {
            return Err(format!(
                "faultd's first read(2) took {read} bytes, expected the one 40-byte record of \"old\""
            ));
        }
        let old_hwpt = self.hwpt;
        let new_hwpt = self.replace_hwpt()?;
        let new = self.fresh();
        self.trigger(new, PERM_READ)?;
        tracer.detach()?;
        self.settle("the groups around the replace", |s| {
            s.device.groups >= before.groups + 2
                && s.device.success + s.device.invalid > before.success + before.invalid
        })?;
        // A second answer, if faultd writes one, follows at once: give it time to show.
        std::thread::sleep(Duration::from_millis(300));
        let d = self.stats()?.device;
        let (success, stale, refused) = (
            d.success - before.success,
            d.stale_cookies - before.stale_cookies,
            d.respond_errors - before.respond_errors,
        );
        if d.groups != before.groups + 2 || success != 1 || stale != 1 || refused != 0 {
            return Err(format!(
                "cookie reuse: faultd read {} groups (\"old\" before the replace of HWPT {old_hwpt} by {new_hwpt}, \"new\" after it under the cookie the kernel freed) and answered {success} SUCCESS, {refused} refused by the kernel (EINVAL), {stale} dropped as stale; expected 2 read, 1 SUCCESS, 0 refused, 1 dropped: {}",
                d.groups - before.groups,
                if refused > 0 {
                    "a late answer for \"old\" reached \"new\" (the kernel took it, then refused \"new\"'s own)"
                } else {
                    "see the counts"
                }
            ));
        }
        self.pins.never.push(old);
        self.pins.map(new);
        self.check_mapped(new)?;
        self.check_unmapped(old)?;
        self.ok(format!(
            "cookie reuse: faultd held \"old\" (ptrace-stopped after its read(2)) while HWPT {old_hwpt} was replaced by {new_hwpt} and \"new\" came under the freed cookie: \"old\" dropped unanswered (stale_cookies +1), \"new\" answered once, SUCCESS, no answer refused; \"new\" mapped, \"old\" not"
        ));
        self.verify_pins("after the cookie reuse")
    }

    /// After two replaces, the device's requests reach faultd through the HWPT attached now,
    /// and are served.
    fn recovery_after_replace(&mut self) -> Res<()> {
        let before = self.stats()?.device;
        for i in 0..4 {
            let g = self.fresh();
            let s = self.fault(g + 0x2000, PERM_READ | PERM_WRITE)?.device;
            if s.success != before.success + i + 1 {
                return Err(format!("request after the replace at {g:#x}: {s:?}"));
            }
            self.pins.map(g);
            self.check_mapped(g)?;
        }
        let d = self.stats()?.device;
        if d.groups != before.groups + 4 {
            return Err(format!(
                "faultd read {} groups for 4 requests (a group the kernel answered at the replace reached it?)",
                d.groups - before.groups
            ));
        }
        self.ok(format!(
            "after the replaces: 4 requests through HWPT {} served SUCCESS and mapped",
            self.hwpt
        ));
        self.verify_pins("after the recovery")
    }

    /// More granules than the pin limit holds: faultd unmaps the least recently mapped.
    fn eviction(&mut self) -> Res<()> {
        let limit = (PIN_LIMIT / GRANULE) as usize;
        let need = limit + 4 - self.pins.mapped.len().min(limit);
        for _ in 0..need {
            let g = self.fresh();
            self.fault(g, PERM_READ)?;
            self.pins.map(g);
        }
        if self.pins.evicted.len() < 4 {
            return Err(format!(
                "eviction: the model expected evictions, has {}",
                self.pins.evicted.len()
            ));
        }
        self.verify_pins(&format!(
            "eviction ({} KiB pin limit, {need} more granules)",
            PIN_LIMIT >> 10
        ))
    }

    /// The VMM discards a mapped granule (MADV_REMOVE): faultd unmaps it from the IOAS on the
    /// REMOVE event; a new request maps the new pages.
    fn discard(&mut self) -> Res<()> {
        let Some(&g) = self.pins.mapped.back() else {
            return Err("discard: nothing mapped".into());
        };
        let before = self.stats()?;
        let va = self.host_va(g);
        // SAFETY: [va, va+GRANULE) lies inside this process's shared mapping of guest RAM; no
        // Rust reference points into it, and discarding shared memfd pages is what a VMM does
        // to balloon memory.
        let r =
            unsafe { libc::madvise(va as *mut libc::c_void, GRANULE as usize, libc::MADV_REMOVE) };
        if r != 0 {
            return Err(format!(
                "madvise(MADV_REMOVE) of granule {g:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let s = self.settle("unmap after the discard", |s| {
            s.device.mapped_bytes + GRANULE == before.device.mapped_bytes
        })?;
        self.pins.mapped.retain(|&x| x != g);
        self.check_unmapped_after_discard(g)?;
        self.ok(format!(
            "MADV_REMOVE of mapped granule {g:#x}: faultd unmapped it (IOAS free there), {} pages discarded",
            s.discarded_pages - before.discarded_pages
        ));
        self.fault(g + 0x4000, PERM_WRITE)?;
        self.pins.map(g);
        self.check_mapped(g)?;
        self.ok(
            "request at the discarded granule again: mapped to the new pages (MD_CHECK_MAP matches)"
                .to_string(),
        );
        self.verify_pins("after the discard")
    }

    /// After a discard the guest pages are gone: probe only the IOAS (MD_CHECK_MAP would
    /// look the page up, and a fresh page never matches anyway).
    fn check_unmapped_after_discard(&self, g: u64) -> Res<()> {
        let va = (self.probe.as_ptr() as u64 + 4095) & !4095;
        match mock::iova_is_free(self.iommu(), self.ioas, g, GRANULE, va) {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "IOAS {} still maps discarded granule {g:#x}",
                self.ioas
            )),
            Err(e) => Err(format!("probing IOAS {} at {g:#x}: {e}", self.ioas)),
        }
    }

    /// Ending the session makes faultd unmap every granule; faultd keeps running.
    fn session_end(&mut self) -> Res<()> {
        let s = self.stats()?;
        println!(
            "iommufd-check: faultd stats at the end: {:?}; errors {}, vcpu_faults {}",
            s.device, s.errors, s.vcpu_faults
        );
        drop(self.session.take());
        let mapped: Vec<u64> = self.pins.mapped.iter().copied().collect();
        let deadline = Instant::now() + WAIT;
        let va = (self.probe.as_ptr() as u64 + 4095) & !4095;
        for &g in &mapped {
            loop {
                match mock::iova_is_free(self.iommu(), self.ioas, g, GRANULE, va) {
                    Ok(true) => break,
                    Ok(false) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    Ok(false) => {
                        return Err(format!(
                            "granule {g:#x} still mapped {WAIT:?} after the session ended"
                        ))
                    }
                    Err(e) => return Err(format!("probing IOAS at {g:#x}: {e}")),
                }
            }
        }
        kill(self.faultd, None).map_err(|e| format!("faultd is gone after the session: {e}"))?;
        self.ok(format!(
            "session closed: faultd unmapped all {} granules and is still running",
            mapped.len()
        ));
        Ok(())
    }
}

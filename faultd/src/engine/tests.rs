//! Fault service against a fake userfaultfd that keeps the kernel's rules: an install into a
//! present page fails EEXIST, every install fails EAGAIN while a layout event is queued and
//! unread, and a REMOVE takes effect once it has been read.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};

use s2map::{Backing, Gpa, Layout, PageSize, PageState, RegionSpec};

use super::*;
use crate::engine::session::{RegionMemory, ServedRegion};
use crate::engine::store::Record;
use crate::kernel::uffd::{MappedSource, OpError};
use nix::sys::eventfd::EventFd;

const HVA: u64 = 0x7f00_0000_0000;
const LIMITS: DeviceLimits = DeviceLimits {
    pin_limit: 1 << 30,
    deadline: Duration::from_millis(250),
    malformed_run: 4096,
};
const PAGE: u64 = 4096;

#[derive(Debug)]
struct FakeUffd {
    present: RefCell<BTreeMap<u64, Vec<u8>>>,
    queue: RefCell<VecDeque<UffdEvent>>,
    registered: (u64, u64),
    wakes: RefCell<Vec<u64>>,
    installs: RefCell<u32>,
    /// Installs still to fail with EAGAIN (as if a layout event were pending).
    force_retry: RefCell<u32>,
    /// Write-protect calls, in order.
    log_wp: RefCell<Vec<String>>,
    /// Guest memory as a memfd instead of `present` (see [`Memory`]).
    memory: Option<Memory>,
    /// Pages write-protected now.
    protected: RefCell<std::collections::BTreeSet<u64>>,
    /// A VMM thread that writes a page while it is being evicted.
    racer: RefCell<Option<Racer>>,
    fd: EventFd,
    /// Multi-page copies done whole, and pages installed by multi-page copies.
    runs: RefCell<u32>,
    run_pages: RefCell<u32>,
}

/// Guest memory in a memfd, as a VMM's shared guest RAM is: installs write into it, and an
/// eviction reads and punches it behind the fake's back (a page is present where the memfd
/// has data). Each write-protect change is logged, with what the eviction had done by then,
/// into the log the device fakes write too.
#[derive(Debug)]
struct Memory {
    fd: Arc<OwnedFd>,
    session: Arc<Session>,
    store_dir: std::path::PathBuf,
    log: Log,
    /// Where VMM addresses are in the memfd, as `(hva, len, memfd offset)`, as the VMM mapped
    /// it; an address outside every entry is at its distance from the registered start.
    placement: Vec<(u64, u64, u64)>,
}

/// When a racing write comes, relative to the eviction's write-protect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Race {
    /// Just before the write-protect takes effect: the write lands at once.
    BeforeProtect,
    /// Just after: the write blocks until the page is un-protected.
    AfterProtect,
}

/// A VMM thread's write of `byte` at `addr`: once started, it lands as soon as the page is
/// neither write-protected nor absent (an absent page is faulted in first, as the kernel does).
#[derive(Debug)]
struct Racer {
    addr: u64,
    byte: u8,
    when: Race,
    started: bool,
    faulted: bool,
}

impl FakeUffd {
    fn new(start: u64, len: u64) -> Self {
        FakeUffd {
            present: RefCell::default(),
            queue: RefCell::default(),
            registered: (start, start + len),
            wakes: RefCell::default(),
            installs: RefCell::new(0),
            force_retry: RefCell::new(0),
            log_wp: RefCell::default(),
            memory: None,
            protected: RefCell::default(),
            racer: RefCell::default(),
            fd: EventFd::new().unwrap(),
            runs: RefCell::new(0),
            run_pages: RefCell::new(0),
        }
    }

    fn with_memory(mut self, memory: Memory) -> Self {
        self.memory = Some(memory);
        self
    }

    /// Offset of `addr` in the memfd: by the placement the VMM mapped it with, else its
    /// distance from the registered start.
    fn offset(&self, addr: u64) -> u64 {
        let placed = self.memory.as_ref().and_then(|m| {
            m.placement
                .iter()
                .find(|&&(hva, len, _)| (hva..hva + len).contains(&addr))
                .map(|&(hva, _, off)| off + (addr - hva))
        });
        placed.unwrap_or(addr - self.registered.0)
    }

    fn is_present(&self, addr: u64) -> bool {
        let Some(m) = &self.memory else {
            return self.present.borrow().contains_key(&addr);
        };
        let off = self.offset(addr) as i64;
        // SEEK_DATA on shmem: the first offset at or after `off` that has a page.
        nix::unistd::lseek(m.fd.as_fd(), off, nix::unistd::Whence::SeekData) == Ok(off)
    }

    fn put(&self, addr: u64, bytes: Vec<u8>) {
        match &self.memory {
            Some(m) => {
                let n = nix::sys::uio::pwrite(m.fd.as_fd(), &bytes, self.offset(addr) as i64);
                assert_eq!(n, Ok(bytes.len()));
            }
            None => {
                self.present.borrow_mut().insert(addr, bytes);
            }
        }
    }

    /// What the eviction of the page at `addr` had done when the fake saw `call`.
    fn note(&self, call: &str, addr: u64) {
        let Some(m) = &self.memory else { return };
        let state = page_state(&m.session, addr);
        let memory = if self.is_present(addr) {
            "in memory"
        } else {
            "punched"
        };
        let stored = std::fs::metadata(m.store_dir.join("t.pages")).map_or(0, |md| md.len()) / PAGE;
        m.log.lock().unwrap().push(format!(
            "{call} {addr:#x}: {state}, {memory}, {stored} stored"
        ));
    }

    /// Lets a started racing write go as far as it can now.
    fn race(&self) {
        let mut racer = self.racer.borrow_mut();
        let Some(r) = racer.as_mut().filter(|r| r.started) else {
            return;
        };
        let page = r.addr & !(PAGE - 1);
        if self.protected.borrow().contains(&page) {
            return; // blocked in a write-protect fault
        }
        if !self.is_present(page) {
            if !r.faulted {
                r.faulted = true;
                self.queue
                    .borrow_mut()
                    .push_back(UffdEvent::Fault { addr: Hva(r.addr) });
            }
            return; // blocked in a MISSING fault
        }
        let m = self.memory.as_ref().expect("racing writes need memory");
        let off = self.offset(r.addr) as i64;
        assert_eq!(nix::sys::uio::pwrite(m.fd.as_fd(), &[r.byte], off), Ok(1));
        *racer = None;
    }

    fn start_racer(&self, when: Race) {
        if let Some(r) = self.racer.borrow_mut().as_mut() {
            r.started |= r.when == when;
        }
        self.race();
    }

    /// A VMM thread touches `addr`: no event if present, else a MISSING fault is queued.
    fn touch(&self, addr: u64) {
        if !self.is_present(addr & !(PAGE - 1)) {
            self.queue
                .borrow_mut()
                .push_back(UffdEvent::Fault { addr: Hva(addr) });
        }
    }

    fn remove(&self, start: u64, end: u64) {
        self.queue.borrow_mut().push_back(UffdEvent::Remove {
            start: Hva(start),
            end: Hva(end),
        });
    }

    fn layout_event_unread(&self) -> bool {
        self.queue
            .borrow()
            .iter()
            .any(|e| matches!(e, UffdEvent::Remove { .. } | UffdEvent::Unmap { .. }))
    }

    /// Zero-fills a range of 4 KiB pages page by page, as the kernel does: it stops at the
    /// first present page with EEXIST, keeping the pages before it.
    fn zero_range(&self, at: Hva, len: u64) -> Result<(), OpError> {
        for i in 0..len / PAGE {
            self.install(Hva(at.0 + i * PAGE), vec![0; PAGE as usize])?;
        }
        Ok(())
    }

    fn install(&self, at: Hva, bytes: Vec<u8>) -> Result<(), OpError> {
        if *self.force_retry.borrow() > 0 {
            *self.force_retry.borrow_mut() -= 1;
            return Err(OpError::Retry);
        }
        if self.layout_event_unread() {
            return Err(OpError::Retry);
        }
        if at.0 < self.registered.0 || at.0 >= self.registered.1 {
            return Err(OpError::NotRegistered);
        }
        if self.is_present(at.0) {
            return Err(OpError::Exists);
        }
        self.put(at.0, bytes);
        *self.installs.borrow_mut() += 1;
        // The install woke the threads blocked on the page.
        self.race();
        Ok(())
    }

    fn page(&self, addr: u64) -> Option<Vec<u8>> {
        let Some(m) = &self.memory else {
            return self.present.borrow().get(&addr).cloned();
        };
        if !self.is_present(addr) {
            return None;
        }
        let mut buf = vec![0; PAGE as usize];
        let n = nix::sys::uio::pread(m.fd.as_fd(), &mut buf, self.offset(addr) as i64);
        assert_eq!(n, Ok(buf.len()));
        Some(buf)
    }
}

impl UffdOps for FakeUffd {
    fn read_events(&mut self, out: &mut Vec<UffdEvent>, max: usize) -> io::Result<()> {
        let mut q = self.queue.borrow_mut();
        for _ in 0..max {
            let Some(ev) = q.pop_front() else { break };
            if let UffdEvent::Remove { start, end } = ev {
                // The kernel zaps the range after the event is read.
                self.present
                    .borrow_mut()
                    .retain(|&a, _| a + PAGE <= start.0 || a >= end.0);
                assert!(self.memory.is_none(), "REMOVE of a memfd: not modelled");
            }
            out.push(ev);
        }
        Ok(())
    }

    fn zeropage(&self, at: Hva, len: u64) -> Result<(), OpError> {
        self.zero_range(at, len)
    }

    fn copy(&self, src: &[u8], at: Hva) -> Result<(), OpError> {
        self.install(at, src.to_vec())
    }

    fn copy_mapped(&self, src: MappedSource, at: Hva) -> Result<(), OpError> {
        // SAFETY: the session's snapshot mapping is live while the session is, the range is
        // within the file's length (Session::mapped_snapshot checks), and tests never shrink
        // their snapshot files. Test code may read it; faultd itself never does.
        let bytes = unsafe { std::slice::from_raw_parts(src.addr as *const u8, src.len as usize) };
        self.install(at, bytes.to_vec())
    }

    fn copy_run(&self, src: MappedSource, at: Hva) -> Result<u64, OpError> {
        // As the kernel: page by page, stopping at the first page it cannot install; an
        // error only if that is the first.
        for i in 0..src.len / PAGE {
            let page = MappedSource {
                addr: src.addr + i * PAGE,
                len: PAGE,
            };
            match self.copy_mapped(page, Hva(at.0 + i * PAGE)) {
                Ok(()) => *self.run_pages.borrow_mut() += 1,
                Err(e) if i == 0 => return Err(e),
                Err(_) => return Ok(i * PAGE),
            }
        }
        *self.runs.borrow_mut() += 1;
        Ok(src.len)
    }

    fn wake(&self, at: Hva, _len: u64) -> Result<(), OpError> {
        self.wakes.borrow_mut().push(at.0);
        Ok(())
    }

    fn write_protect(&self, at: Hva, len: u64) -> Result<(), OpError> {
        self.start_racer(Race::BeforeProtect);
        self.log_wp.borrow_mut().push(format!("wp {:#x}", at.0));
        self.note("wp", at.0);
        let mut protected = self.protected.borrow_mut();
        protected.extend((0..len / PAGE).map(|i| at.0 + i * PAGE));
        drop(protected);
        self.start_racer(Race::AfterProtect);
        Ok(())
    }

    fn unprotect(&self, at: Hva, len: u64) -> Result<(), OpError> {
        self.protected
            .borrow_mut()
            .retain(|&a| a < at.0 || a >= at.0 + len);
        self.log_wp.borrow_mut().push(format!("unwp {:#x}", at.0));
        self.note("unwp", at.0);
        // The writers blocked in write-protect faults wake.
        self.race();
        Ok(())
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Shared memory on a dummy fd (the fake uffd never touches it).
fn shared() -> RegionMemory {
    RegionMemory::Shared {
        fd: Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap())),
        offset: 0,
    }
}

/// A session with one region of `pages` 4 KiB pages at GPA 0x10_0000, mapped at HVA.
fn session(pages: u64, backing: Backing, snapshot: Option<std::fs::File>) -> Arc<Session> {
    let layout = Layout::new(vec![RegionSpec {
        gpa: Gpa(0x10_0000),
        size: pages * PAGE,
        page_size: PageSize::Size4K,
        backing,
        read_only: false,
    }])
    .unwrap();
    let regions = vec![ServedRegion {
        hva: Hva(HVA),
        memory: shared(),
    }];
    Arc::new(Session::new(1, "t".into(), layout, regions, snapshot))
}

fn server(s: &Arc<Session>, pages: u64) -> FaultServer<FakeUffd> {
    FaultServer::new(s.clone(), FakeUffd::new(HVA, pages * PAGE), 8, LIMITS)
}

fn page_state(s: &Session, hva: u64) -> PageState {
    let at = s.locate(Hva(hva)).unwrap();
    s.map().state(at.page)
}

/// A snapshot file whose page `i` is filled with byte `i + 1`.
fn snapshot(pages: u64) -> std::fs::File {
    let mut f = tempfile::tempfile().unwrap();
    for i in 0..pages {
        f.write_all(&vec![i as u8 + 1; PAGE as usize]).unwrap();
    }
    f
}

#[test]
fn zero_backed_fault_installs_a_zero_page_and_marks_it_resident() {
    let s = session(4, Backing::Zero, None);
    let mut srv = server(&s, 4);
    srv.ops().touch(HVA + 2 * PAGE + 123);

    assert_eq!(srv.serve_ready().unwrap(), 1);

    assert_eq!(srv.ops().page(HVA + 2 * PAGE), Some(vec![0; PAGE as usize]));
    assert_eq!(page_state(&s, HVA + 2 * PAGE), PageState::Resident);
    let st = s.stats();
    assert_eq!(
        (st.vcpu_faults, st.zero_fills, st.resident_bytes),
        (1, 1, PAGE)
    );
    assert_eq!(st.latency_us.count, 1);
}

#[test]
fn snapshot_backed_fault_copies_the_files_page() {
    let s = session(4, Backing::File { offset: PAGE }, Some(snapshot(5)));
    let mut srv = server(&s, 4);
    srv.ops().touch(HVA + 3 * PAGE);

    srv.serve_ready().unwrap();

    // Region offset is one page into the file: region page 3 is file page 4, filled with 5.
    assert_eq!(srv.ops().page(HVA + 3 * PAGE), Some(vec![5; PAGE as usize]));
    assert_eq!(s.stats().file_fills, 1);
}

#[test]
fn only_snapshot_ranges_within_the_mapped_file_are_copied_from_the_mapping() {
    let s = session(4, Backing::File { offset: 0 }, Some(snapshot(4)));

    assert!(s.mapped_snapshot(3 * PAGE, PAGE).is_some());
    assert!(s.mapped_snapshot(3 * PAGE + 1, PAGE).is_none());
    assert!(s.mapped_snapshot(u64::MAX, PAGE).is_none());
    assert!(session(4, Backing::Zero, None)
        .mapped_snapshot(0, PAGE)
        .is_none());
}

#[test]
fn duplicate_fault_on_a_resident_page_wakes_without_installing() {
    let s = session(2, Backing::Zero, None);
    let mut srv = server(&s, 2);
    // Two threads fault on the page before faultd reads either event.
    srv.ops().touch(HVA);
    srv.ops().touch(HVA + 8);

    srv.serve_ready().unwrap();

    assert_eq!(*srv.ops().installs.borrow(), 1);
    assert_eq!(*srv.ops().wakes.borrow(), vec![HVA]);
    assert_eq!(s.stats().already_present, 1);
}

#[test]
fn eagain_is_retried_after_the_remove_event_is_read() {
    let s = session(2, Backing::Zero, None);
    let mut srv = FaultServer::new(s.clone(), FakeUffd::new(HVA, 2 * PAGE), 1, LIMITS);
    srv.ops().touch(HVA);
    srv.ops().remove(HVA + PAGE, HVA + 2 * PAGE);

    srv.serve_ready().unwrap(); // reads the fault only: the unread REMOVE makes it EAGAIN
    assert!(srv.has_retries());
    assert_eq!(page_state(&s, HVA), PageState::Absent);
    srv.serve_ready().unwrap(); // reads the REMOVE, then retries the fault

    assert!(!srv.has_retries());
    assert_eq!(page_state(&s, HVA), PageState::Resident);
    assert_eq!(s.stats().retries, 1);
}

#[test]
fn removed_snapshot_page_is_zero_filled_when_touched_again() {
    let s = session(2, Backing::File { offset: 0 }, Some(snapshot(2)));
    let mut srv = server(&s, 2);
    srv.ops().touch(HVA + PAGE);
    srv.serve_ready().unwrap();
    assert_eq!(srv.ops().page(HVA + PAGE), Some(vec![2; PAGE as usize]));

    srv.ops().remove(HVA + PAGE, HVA + 2 * PAGE);
    srv.serve_ready().unwrap();
    assert_eq!(page_state(&s, HVA + PAGE), PageState::Absent);
    srv.ops().touch(HVA + PAGE);
    srv.serve_ready().unwrap();

    assert_eq!(srv.ops().page(HVA + PAGE), Some(vec![0; PAGE as usize]));
    let st = s.stats();
    assert_eq!(
        (st.discarded_pages, st.zero_fills, st.file_fills),
        (1, 1, 1)
    );
}

#[test]
fn fault_outside_every_region_is_counted_and_touches_nothing() {
    let s = session(2, Backing::Zero, None);
    // The VMM registered more than it declared: the kernel reports a fault faultd does not own.
    let mut srv = FaultServer::new(s.clone(), FakeUffd::new(HVA, 4 * PAGE), 8, LIMITS);
    srv.ops().touch(HVA + 3 * PAGE);

    srv.serve_ready().unwrap();

    assert_eq!(*srv.ops().installs.borrow(), 0);
    assert!(srv.ops().wakes.borrow().is_empty());
    assert_eq!(s.stats().errors, 1);
}

#[test]
fn short_snapshot_is_an_error_and_the_page_stays_absent() {
    // The file shrank after registration (validation saw it whole).
    let s = session(2, Backing::File { offset: 0 }, Some(snapshot(1)));
    let mut srv = server(&s, 2);
    srv.ops().touch(HVA + PAGE);

    srv.serve_ready().unwrap();

    assert_eq!(srv.ops().page(HVA + PAGE), None);
    assert_eq!(page_state(&s, HVA + PAGE), PageState::Absent);
    assert_eq!(s.stats().errors, 1);
}

#[test]
fn finish_fills_every_snapshot_page_not_yet_faulted_in() {
    let s = session(4, Backing::File { offset: 0 }, Some(snapshot(4)));
    let mut srv = server(&s, 4);
    srv.ops().touch(HVA + PAGE);
    srv.serve_ready().unwrap();

    let report = srv.finish();

    assert_eq!(
        report,
        crate::engine::FinishReport {
            filled: 3,
            remaining: 0
        }
    );
    for i in 0..4 {
        assert_eq!(
            srv.ops().page(HVA + i * PAGE),
            Some(vec![i as u8 + 1; PAGE as usize]),
            "page {i}"
        );
    }
}

#[test]
fn finish_leaves_zero_pages_absent() {
    let s = session(4, Backing::Zero, None);
    let mut srv = server(&s, 4);

    let report = srv.finish();

    assert_eq!((report.filled, report.remaining), (0, 0));
    assert_eq!(*srv.ops().installs.borrow(), 0);
}

#[test]
fn finish_counts_the_pages_it_could_not_fill_as_remaining() {
    // The file shrank after registration: page 1 cannot be read.
    let s = session(2, Backing::File { offset: 0 }, Some(snapshot(1)));
    let mut srv = server(&s, 2);

    let report = srv.finish();

    assert_eq!((report.filled, report.remaining), (1, 1));
    assert_eq!(page_state(&s, HVA + PAGE), PageState::Absent);
}

#[test]
fn huge_page_zero_fill_installs_two_mib_of_zeros() {
    const HUGE: u64 = 2 << 20;
    let layout = Layout::new(vec![RegionSpec {
        gpa: Gpa(0),
        size: 2 * HUGE,
        page_size: PageSize::Size2M,
        backing: Backing::Zero,
        read_only: false,
    }])
    .unwrap();
    let regions = vec![ServedRegion {
        hva: Hva(HVA),
        memory: shared(),
    }];
    let s = Arc::new(Session::new(1, "t".into(), layout, regions, None));
    let mut srv = FaultServer::new(s.clone(), FakeUffd::new(HVA, 2 * HUGE), 8, LIMITS);
    srv.ops().queue.borrow_mut().push_back(UffdEvent::Fault {
        addr: Hva(HVA + HUGE + 5000),
    });

    srv.serve_ready().unwrap();

    assert_eq!(
        srv.ops().page(HVA + HUGE).map(|p| p.len()),
        Some(HUGE as usize)
    );
    assert_eq!(s.stats().resident_bytes, HUGE);
}

#[test]
fn fault_thread_serves_and_stops() {
    let s = session(4, Backing::Zero, None);
    let fake = FakeUffd::new(HVA, 4 * PAGE);
    fake.touch(HVA);
    let t = FaultThread::spawn(
        FaultServer::new(s.clone(), fake, 8, LIMITS),
        Duration::from_micros(50),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.stats().zero_fills == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    t.stop();
    assert_eq!(s.stats().zero_fills, 1);
}

#[test]
fn standby_thread_serves_the_session_its_job_builds() {
    let s = session(4, Backing::Zero, None);
    let standby = StandbyThread::new("standby".into(), Duration::from_micros(50)).unwrap();
    let job_session = s.clone();

    let t = standby.start(Box::new(move || {
        let fake = FakeUffd::new(HVA, 4 * PAGE);
        fake.touch(HVA);
        Some(FaultServer::new(job_session, fake, 8, LIMITS))
    }));

    let deadline = Instant::now() + Duration::from_secs(5);
    while s.stats().zero_fills == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    t.stop();
    assert_eq!(s.stats().zero_fills, 1);
}

#[test]
fn standby_thread_whose_job_builds_nothing_ends_and_is_joined() {
    let standby: StandbyThread<FakeUffd> =
        StandbyThread::new("standby".into(), Duration::ZERO).unwrap();

    let t = standby.start(Box::new(|| None));

    t.stop(); // Returns: the thread ended without serving.
}

// ---- device page requests ----

use std::sync::Mutex;

use iopf::{
    DevId, FaultQueue, Group, Incoming, Iova, MapError, MapTarget, Mapper, Perm, ResponseCode,
};

/// What the fakes saw, in order: ("map"|"unmap", iova) and ("answer", cookie, code).
type Log = Arc<Mutex<Vec<String>>>;

struct FakeQueue {
    incoming: Arc<Mutex<Vec<Incoming>>>,
    log: Log,
    fd: EventFd,
}

impl FaultQueue for FakeQueue {
    fn read(&mut self, out: &mut Vec<Incoming>) -> io::Result<()> {
        out.append(&mut self.incoming.lock().unwrap());
        Ok(())
    }
    fn respond(&mut self, cookie: u32, code: ResponseCode) -> Result<(), iopf::RespondError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("answer {cookie} {code:?}"));
        Ok(())
    }
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

struct FakeMapper {
    granule: u64,
    log: Log,
}

impl Mapper for FakeMapper {
    fn granule(&self) -> u64 {
        self.granule
    }
    fn map(
        &mut self,
        iova: Iova,
        len: u64,
        _: MapTarget<'_>,
        writable: bool,
    ) -> Result<(), MapError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("map {:#x}+{len:#x} w={writable}", iova.0));
        Ok(())
    }
    fn unmap(&mut self, iova: Iova, len: u64) -> Result<(), MapError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("unmap {:#x}+{len:#x}", iova.0));
        Ok(())
    }
}

const GPA: u64 = 0x10_0000;

struct Dev {
    srv: FaultServer<FakeUffd>,
    session: Arc<Session>,
    incoming: Arc<Mutex<Vec<Incoming>>>,
    log: Log,
    /// The store directory of a Dev with memory.
    store: Option<tempfile::TempDir>,
}

impl Dev {
    /// `pages` zero-backed pages (a read-only second region of 4 pages after them), one device
    /// with `granule` bytes, `limits`.
    fn new(pages: u64, granule: u64, limits: DeviceLimits) -> Dev {
        Dev::build(pages, granule, limits, false)
    }

    /// [`Dev::new`] with guest memory in a memfd (see [`Memory`]) and a store in a temporary
    /// directory: pages can be evicted.
    fn with_memory(pages: u64, granule: u64, limits: DeviceLimits) -> Dev {
        Dev::build(pages, granule, limits, true)
    }

    fn build(pages: u64, granule: u64, limits: DeviceLimits, memory: bool) -> Dev {
        let memfd = Arc::new(
            nix::sys::memfd::memfd_create("guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap(),
        );
        nix::unistd::ftruncate(&memfd, ((pages + 4) * PAGE) as i64).unwrap();
        let region_memory = |offset: u64| {
            if memory {
                RegionMemory::Shared {
                    fd: memfd.clone(),
                    offset,
                }
            } else {
                shared()
            }
        };
        let layout = Layout::new(vec![
            RegionSpec {
                gpa: Gpa(GPA),
                size: pages * PAGE,
                page_size: PageSize::Size4K,
                backing: Backing::Zero,
                read_only: false,
            },
            RegionSpec {
                gpa: Gpa(GPA + pages * PAGE),
                size: 4 * PAGE,
                page_size: PageSize::Size4K,
                backing: Backing::Zero,
                read_only: true,
            },
        ])
        .unwrap();
        let regions = vec![
            ServedRegion {
                hva: Hva(HVA),
                memory: region_memory(0),
            },
            ServedRegion {
                hva: Hva(HVA + pages * PAGE),
                memory: region_memory(pages * PAGE),
            },
        ];
        let session = Arc::new(Session::new(1, "t".into(), layout, regions, None));
        let (incoming, log): (Arc<Mutex<Vec<Incoming>>>, Log) = Default::default();
        let mut fake = FakeUffd::new(HVA, (pages + 4) * PAGE);
        let store = memory.then(|| tempfile::tempdir().unwrap());
        if let Some(dir) = &store {
            fake = fake.with_memory(Memory {
                fd: memfd,
                session: session.clone(),
                store_dir: dir.path().to_owned(),
                log: log.clone(),
                placement: Vec::new(),
            });
        }
        let mut srv = FaultServer::new(session.clone(), fake, 8, limits);
        if let Some(dir) = &store {
            srv = srv.with_store_dir(dir.path().to_owned());
        }
        srv.add_device(crate::engine::device::Device::new(
            s2map::DeviceIdx(0),
            DevId(1),
            Box::new(FakeQueue {
                incoming: incoming.clone(),
                log: log.clone(),
                fd: EventFd::new().unwrap(),
            }),
            Box::new(FakeMapper {
                granule,
                log: log.clone(),
            }),
        ));
        Dev {
            srv,
            session,
            incoming,
            log,
            store,
        }
    }

    fn post(&self, cookie: u32, pages: &[(u64, Perm)]) {
        self.incoming.lock().unwrap().push(Incoming::Group(Group {
            cookie,
            dev_id: DevId(1),
            pasid: None,
            grpid: 3,
            pages: pages.iter().map(|&(gpa, p)| (Iova(gpa), p)).collect(),
        }));
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

#[test]
fn multi_page_group_is_answered_once_after_every_page_is_mapped() {
    let mut d = Dev::new(16, PAGE, LIMITS);
    d.post(
        7,
        &[
            (GPA, Perm::READ),
            (GPA + 5 * PAGE, Perm::WRITE),
            (GPA + 9 * PAGE, Perm::READ),
        ],
    );

    d.srv.serve_ready().unwrap();

    assert_eq!(
        d.log(),
        vec![
            "map 0x100000+0x1000 w=true",
            "map 0x105000+0x1000 w=true",
            "map 0x109000+0x1000 w=true",
            "answer 7 Success",
        ]
    );
    assert_eq!(*d.srv.ops().installs.borrow(), 3);
    let st = d.session.stats();
    assert_eq!(
        (st.device.groups, st.device.pages, st.device.success),
        (1, 3, 1)
    );
    assert_eq!(st.device.mapped_bytes, 3 * PAGE);
}

#[test]
fn granule_mapping_makes_every_page_of_the_granule_resident_first() {
    let mut d = Dev::new(16, 4 * PAGE, LIMITS);
    d.post(1, &[(GPA + 6 * PAGE, Perm::READ)]);

    d.srv.serve_ready().unwrap();

    assert_eq!(
        d.log(),
        vec!["map 0x104000+0x4000 w=true", "answer 1 Success"]
    );
    for p in 4..8 {
        assert!(
            d.srv.ops().page(HVA + p * PAGE).is_some(),
            "page {p} installed"
        );
    }
    assert!(d.srv.ops().page(HVA + 3 * PAGE).is_none());
}

#[test]
fn granule_with_a_page_already_present_is_completed_page_by_page() {
    let mut d = Dev::new(16, 4 * PAGE, LIMITS);
    // A vCPU installed page 6; the device's granule 4..8 then has a present page mid-run.
    d.srv.ops().touch(HVA + 6 * PAGE);
    d.srv.serve_ready().unwrap();
    // s2map forgets page 6 (as after a discard race): the zero run meets EEXIST in the kernel.
    let page6 = d.session.locate(Hva(HVA + 6 * PAGE)).unwrap().page;
    d.session.map().discard(Gpa(GPA + 6 * PAGE), PAGE);
    d.srv
        .ops()
        .present
        .borrow_mut()
        .insert(HVA + 6 * PAGE, vec![7; PAGE as usize]);
    d.post(1, &[(GPA + 4 * PAGE, Perm::READ)]);

    d.srv.serve_ready().unwrap();

    assert_eq!(
        d.log(),
        vec!["map 0x104000+0x4000 w=true", "answer 1 Success"]
    );
    assert_eq!(d.session.map().state(page6), PageState::Resident);
    // The present page kept its bytes; the others were zero-filled.
    assert_eq!(
        d.srv.ops().page(HVA + 6 * PAGE),
        Some(vec![7; PAGE as usize])
    );
    assert_eq!(
        d.srv.ops().page(HVA + 7 * PAGE),
        Some(vec![0; PAGE as usize])
    );
}

#[test]
fn address_outside_the_layout_is_answered_invalid_and_touches_nothing() {
    let mut d = Dev::new(16, PAGE, LIMITS);
    d.post(2, &[(GPA, Perm::READ), (0x4000_0000, Perm::READ)]);

    d.srv.serve_ready().unwrap();

    // The first page was mapped before the bad one was seen; the group as a whole is INVALID
    // (the device treats the access as failed), and nothing outside the layout was touched.
    assert_eq!(d.log().last().unwrap(), "answer 2 Invalid");
    assert!(d.log().iter().all(|l| !l.contains("0x40000000")));
    let st = d.session.stats();
    assert_eq!((st.device.invalid, st.device.outside_layout), (1, 1));
}

#[test]
fn write_into_a_read_only_region_is_answered_invalid_without_installing() {
    let mut d = Dev::new(16, PAGE, LIMITS);
    let ro = GPA + 16 * PAGE;
    d.post(3, &[(ro, Perm::READ | Perm::WRITE)]);

    d.srv.serve_ready().unwrap();

    assert_eq!(d.log(), vec!["answer 3 Invalid"]);
    assert_eq!(*d.srv.ops().installs.borrow(), 0);
    assert_eq!(d.session.stats().device.read_only, 1);
}

#[test]
fn read_of_a_read_only_region_is_mapped_read_only() {
    let mut d = Dev::new(16, PAGE, LIMITS);
    d.post(4, &[(GPA + 16 * PAGE, Perm::READ)]);

    d.srv.serve_ready().unwrap();

    assert_eq!(
        d.log(),
        vec!["map 0x110000+0x1000 w=false", "answer 4 Success"]
    );
}

#[test]
fn malformed_input_with_a_cookie_is_answered_invalid_and_all_is_counted() {
    let mut d = Dev::new(16, PAGE, LIMITS);
    d.incoming.lock().unwrap().extend([
        Incoming::Malformed {
            cookie: Some(9),
            reason: "test",
        },
        Incoming::Malformed {
            cookie: None,
            reason: "test",
        },
    ]);

    d.srv.serve_ready().unwrap();

    assert_eq!(d.log(), vec!["answer 9 Invalid"]);
    assert_eq!(d.session.stats().device.malformed, 2);
}

#[test]
fn group_blocked_by_eagain_is_answered_after_the_retry() {
    let mut d = Dev::new(16, PAGE, LIMITS);
    *d.srv.ops().force_retry.borrow_mut() = 1;
    d.post(5, &[(GPA, Perm::READ)]);

    d.srv.serve_ready().unwrap();
    assert!(d.log().is_empty());
    assert!(d.srv.has_retries());
    d.srv.serve_ready().unwrap();

    assert_eq!(
        d.log(),
        vec!["map 0x100000+0x1000 w=true", "answer 5 Success"]
    );
}

/// The kernel's iommufd fault queue as faultd meets it: a group gets its cookie when it is
/// read (the lowest free one, as the kernel's xa_alloc hands them out), the cookie is freed when
/// the group is answered, by faultd or, at an HWPT replace, by the kernel itself, and an answer
/// under a cookie no group holds is refused (EINVAL). `split` models a replace landing between
/// two read(2)s of one [`FaultQueue::read`].
#[derive(Default)]
struct KernelState {
    /// Raised, not read yet: (group, page).
    deliver: Vec<(&'static str, u64)>,
    /// Read, not answered: cookie -> group.
    response: BTreeMap<u32, &'static str>,
    /// Every answer: (group, code, by whom).
    answers: Vec<(&'static str, ResponseCode, &'static str)>,
    /// Run once after the first read(2) of the next read.
    split: Option<Between>,
}

/// What happens between two read(2)s (see [`KernelState::split`]).
type Between = Box<dyn FnOnce(&mut KernelState) + Send>;

impl KernelState {
    /// The VMM replaces the device's HWPT: the kernel answers every group it holds INVALID.
    fn replace(&mut self) {
        let read = std::mem::take(&mut self.response).into_values();
        let unread = std::mem::take(&mut self.deliver)
            .into_iter()
            .map(|(g, _)| g);
        for g in read.chain(unread).collect::<Vec<_>>() {
            self.answers.push((g, ResponseCode::Invalid, "kernel"));
        }
    }

    fn read_once(&mut self, out: &mut Vec<Incoming>) {
        for (name, gpa) in std::mem::take(&mut self.deliver) {
            let cookie = (0..).find(|c| !self.response.contains_key(c)).unwrap();
            self.response.insert(cookie, name);
            out.push(Incoming::Group(Group {
                cookie,
                dev_id: DevId(2),
                pasid: None,
                grpid: 1,
                pages: vec![(Iova(gpa), Perm::READ)],
            }));
        }
    }
}

struct KernelQueue {
    k: Arc<Mutex<KernelState>>,
    log: Log,
    fd: EventFd,
}

impl FaultQueue for KernelQueue {
    fn read(&mut self, out: &mut Vec<Incoming>) -> io::Result<()> {
        let mut k = self.k.lock().unwrap();
        k.read_once(out);
        if let Some(between) = k.split.take() {
            between(&mut k);
            k.read_once(out);
        }
        Ok(())
    }
    fn respond(&mut self, cookie: u32, code: ResponseCode) -> Result<(), iopf::RespondError> {
        let mut k = self.k.lock().unwrap();
        let Some(group) = k.response.remove(&cookie) else {
            return Err(iopf::RespondError::UnknownCookie(cookie));
        };
        k.answers.push((group, code, "faultd"));
        self.log
            .lock()
            .unwrap()
            .push(format!("answer {group} {code:?}"));
        Ok(())
    }
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A [`Dev`] with a second device (dev_id 2) on a [`KernelQueue`].
fn kernel_dev() -> (Dev, Arc<Mutex<KernelState>>) {
    let mut d = Dev::new(16, PAGE, LIMITS);
    let k: Arc<Mutex<KernelState>> = Default::default();
    d.srv.add_device(crate::engine::device::Device::new(
        s2map::DeviceIdx(1),
        DevId(2),
        Box::new(KernelQueue {
            k: k.clone(),
            log: d.log.clone(),
            fd: EventFd::new().unwrap(),
        }),
        Box::new(FakeMapper {
            granule: PAGE,
            log: d.log.clone(),
        }),
    ));
    (d, k)
}

#[test]
fn a_held_group_whose_cookie_comes_again_is_dropped_and_the_new_group_answered_after_its_mapping() {
    let (mut d, k) = kernel_dev();
    *d.srv.ops().force_retry.borrow_mut() = u32::MAX; // both groups wait (EAGAIN)
    k.lock().unwrap().deliver.push(("old", GPA));
    d.srv.serve_ready().unwrap(); // "old" read under cookie 0, held

    k.lock().unwrap().replace(); // the kernel answers "old", cookie 0 is free again
    k.lock().unwrap().deliver.push(("new", GPA + 4 * PAGE));
    d.srv.serve_ready().unwrap(); // "new" read under cookie 0
    *d.srv.ops().force_retry.borrow_mut() = 0;
    d.srv.serve_ready().unwrap();

    assert_eq!(
        d.log(),
        vec!["map 0x104000+0x1000 w=true", "answer new Success"],
        "the only answer faultd wrote must be the new group's, after its mapping"
    );
    assert_eq!(
        k.lock().unwrap().answers,
        vec![
            ("old", ResponseCode::Invalid, "kernel"),
            ("new", ResponseCode::Success, "faultd")
        ]
    );
    let st = d.session.stats().device;
    assert_eq!((st.stale_cookies, st.respond_errors), (1, 0));
    assert!(!d.srv.has_retries());
}

#[test]
fn a_cookie_read_twice_in_one_read_answers_only_the_later_group() {
    let (mut d, k) = kernel_dev();
    {
        let mut k = k.lock().unwrap();
        k.deliver.push(("old", GPA));
        // The replace lands between two read(2)s of one read, then the device faults again.
        k.split = Some(Box::new(|k: &mut KernelState| {
            k.replace();
            k.deliver.push(("new", GPA + 4 * PAGE));
        }));
    }

    d.srv.serve_ready().unwrap();

    assert_eq!(
        d.log(),
        vec!["map 0x104000+0x1000 w=true", "answer new Success"]
    );
    assert_eq!(
        k.lock().unwrap().answers,
        vec![
            ("old", ResponseCode::Invalid, "kernel"),
            ("new", ResponseCode::Success, "faultd")
        ]
    );
    let st = d.session.stats().device;
    assert_eq!((st.groups, st.stale_cookies, st.respond_errors), (2, 1, 0));
}

#[test]
fn group_not_resolved_by_its_deadline_is_answered_invalid() {
    let limits = DeviceLimits {
        deadline: Duration::from_millis(1),
        ..LIMITS
    };
    let mut d = Dev::new(16, PAGE, limits);
    *d.srv.ops().force_retry.borrow_mut() = u32::MAX;
    d.post(6, &[(GPA, Perm::READ)]);

    d.srv.serve_ready().unwrap();
    std::thread::sleep(Duration::from_millis(3));
    d.srv.serve_ready().unwrap();

    assert_eq!(d.log(), vec!["answer 6 Invalid"]);
    assert_eq!(d.session.stats().device.deadline, 1);
    assert!(!d.srv.has_retries());
}

#[test]
fn vcpu_and_device_faults_on_one_page_install_it_once() {
    let mut d = Dev::new(16, PAGE, LIMITS);
    d.post(1, &[(GPA + 2 * PAGE, Perm::WRITE)]);
    d.srv.serve_ready().unwrap();
    d.srv.ops().queue.borrow_mut().push_back(UffdEvent::Fault {
        addr: Hva(HVA + 2 * PAGE),
    });
    d.srv.ops().touch(HVA + 3 * PAGE);
    d.srv.serve_ready().unwrap();
    d.post(2, &[(GPA + 3 * PAGE, Perm::READ)]);
    d.srv.serve_ready().unwrap();

    // Page 2: device first, the vCPU's event finds it present. Page 3: vCPU first, the device
    // only maps it.
    assert_eq!(*d.srv.ops().installs.borrow(), 2);
    assert_eq!(*d.srv.ops().wakes.borrow(), vec![HVA + 2 * PAGE]);
    assert_eq!(
        d.log(),
        vec![
            "map 0x102000+0x1000 w=true",
            "answer 1 Success",
            "map 0x103000+0x1000 w=true",
            "answer 2 Success",
        ]
    );
}

#[test]
fn pin_limit_unmaps_the_least_recently_mapped_granule() {
    let limits = DeviceLimits {
        pin_limit: 2 * PAGE,
        ..LIMITS
    };
    let mut d = Dev::new(16, PAGE, limits);
    for (c, p) in [(1, 0), (2, 1), (3, 2)] {
        d.post(c, &[(GPA + p * PAGE, Perm::READ)]);
        d.srv.serve_ready().unwrap();
    }

    assert_eq!(d.log()[4], "unmap 0x100000+0x1000");
    assert_eq!(d.log()[5], "map 0x102000+0x1000 w=true");
    let st = d.session.stats();
    assert_eq!(
        (st.device.mapped_bytes, st.device.pin_evictions),
        (2 * PAGE, 1)
    );
    // The unmapped page stays resident; only its pin is gone.
    assert_eq!(st.resident_bytes, 3 * PAGE);
}

#[test]
fn a_granule_mapped_again_after_a_discard_is_not_evicted_by_its_old_pin_entry() {
    let limits = DeviceLimits {
        pin_limit: 2 * PAGE,
        ..LIMITS
    };
    let mut d = Dev::new(16, PAGE, limits);
    d.post(1, &[(GPA, Perm::READ)]);
    d.srv.serve_ready().unwrap();
    d.srv.ops().remove(HVA, HVA + PAGE);
    d.srv.serve_ready().unwrap(); // page 0 discarded: its mapping goes
    d.post(2, &[(GPA + PAGE, Perm::READ)]);
    d.srv.serve_ready().unwrap();
    d.post(3, &[(GPA, Perm::READ)]); // page 0 mapped again: now the youngest
    d.srv.serve_ready().unwrap();

    d.post(4, &[(GPA + 2 * PAGE, Perm::READ)]); // needs room: page 1 is the oldest mapping
    d.srv.serve_ready().unwrap();

    let log = d.log();
    assert_eq!(log[log.len() - 3], "unmap 0x101000+0x1000", "{log:?}");
    assert_eq!(d.session.stats().device.mapped_bytes, 2 * PAGE);
}

#[test]
fn vmm_discard_unmaps_the_device_mapping_before_the_page_goes() {
    let mut d = Dev::new(16, 4 * PAGE, LIMITS);
    d.post(1, &[(GPA, Perm::READ)]);
    d.srv.serve_ready().unwrap();
    d.srv.ops().remove(HVA + PAGE, HVA + 2 * PAGE);

    d.srv.serve_ready().unwrap();

    assert_eq!(d.log().last().unwrap(), "unmap 0x100000+0x4000");
    let st = d.session.stats();
    assert_eq!((st.device.mapped_bytes, st.discarded_pages), (0, 1));
    assert_eq!(st.errors, 0, "no mapping was left for discard to drop");
}

#[test]
fn shutdown_answers_pending_groups_and_unmaps_everything() {
    let mut d = Dev::new(16, PAGE, LIMITS);
    d.post(1, &[(GPA, Perm::READ)]);
    d.srv.serve_ready().unwrap();
    *d.srv.ops().force_retry.borrow_mut() = u32::MAX;
    d.post(2, &[(GPA + PAGE, Perm::READ)]);
    d.srv.serve_ready().unwrap();

    d.srv.shutdown_devices();

    let log = d.log();
    assert!(log.contains(&"answer 2 Invalid".to_string()), "{log:?}");
    assert!(
        log.contains(&"unmap 0x100000+0x1000".to_string()),
        "{log:?}"
    );
    assert_eq!(d.session.stats().device.mapped_bytes, 0);
}

// ---- eviction (see evict.rs) ----

/// A Dev with memory whose page 1 is resident, device-mapped, and written by the guest with
/// 0x11; returns it and the page.
fn resident_written_page() -> (Dev, s2map::PageRef) {
    let mut d = Dev::with_memory(4, PAGE, LIMITS);
    d.post(1, &[(GPA + PAGE, Perm::WRITE)]);
    d.srv.serve_ready().unwrap();
    d.srv.ops().put(HVA + PAGE, vec![0x11; PAGE as usize]);
    let page = d.session.locate(Hva(HVA + PAGE)).unwrap().page;
    (d, page)
}

/// Arms a VMM thread that writes 0xab at byte 8 of page 1 at `when`.
fn race(d: &Dev, when: Race) {
    *d.srv.ops().racer.borrow_mut() = Some(Racer {
        addr: HVA + PAGE + 8,
        byte: 0xab,
        when,
        started: false,
        faulted: false,
    });
}

/// The byte every byte of `page` is, if one is (keeps failures short).
fn uniform(page: Option<Vec<u8>>) -> Option<u8> {
    let page = page?;
    page.iter().all(|&b| b == page[0]).then_some(page[0])
}

/// Page 1 as the guest reads it after the eviction: faulted back in if absent, once every
/// blocked writer has been served.
fn read_back(d: &mut Dev) -> Vec<u8> {
    d.srv.serve_ready().unwrap(); // a writer that re-faulted after the un-protect
    d.srv.ops().touch(HVA + PAGE);
    d.srv.serve_ready().unwrap();
    assert!(
        d.srv.ops().racer.borrow().is_none(),
        "the racing write was made"
    );
    d.srv.ops().page(HVA + PAGE).unwrap()
}

#[test]
fn eviction_of_a_device_mapped_page_unmaps_protects_saves_punches_marks_and_unprotects_in_order() {
    let (mut d, page) = resident_written_page();

    let stored = d.srv.evict_page(page).unwrap();

    assert!(stored);
    // Each line: a call, and what the eviction had done when the fake saw it.
    assert_eq!(
        d.log()[2..],
        [
            "unmap 0x101000+0x1000",
            "wp 0x7f0000001000: evicting, in memory, 0 stored",
            "unwp 0x7f0000001000: absent, punched, 1 stored",
        ]
    );
    assert_eq!(
        *d.srv.ops().log_wp.borrow(),
        ["wp 0x7f0000001000", "unwp 0x7f0000001000"]
    );
    assert_eq!(d.session.stats().device.mapped_bytes, 0);
    // Saved before the punch: the guest's bytes come back from the store.
    assert_eq!(uniform(Some(read_back(&mut d))), Some(0x11));
    assert_eq!(d.session.stats().store_fills, 1);
}

#[test]
fn evicting_with_save_before_write_protect_loses_a_write_made_between_them() {
    let (mut d, page) = resident_written_page();
    d.srv.save_before_protect = true;
    race(&d, Race::BeforeProtect);

    d.srv.evict_page(page).unwrap();

    let page = read_back(&mut d);
    assert_eq!(
        uniform(Some(page)),
        Some(0x11),
        "the write made after the save is lost"
    );
}

#[test]
fn evicting_in_order_keeps_a_write_made_just_before_the_write_protect() {
    let (mut d, page) = resident_written_page();
    race(&d, Race::BeforeProtect);

    d.srv.evict_page(page).unwrap();

    let page = read_back(&mut d);
    assert_eq!((page[0], page[8], page[9]), (0x11, 0xab, 0x11));
}

#[test]
fn evicting_in_order_keeps_a_write_blocked_by_the_write_protect_on_top_of_the_saved_page() {
    let (mut d, page) = resident_written_page();
    race(&d, Race::AfterProtect);

    d.srv.evict_page(page).unwrap();
    // The write is blocked until the un-protect, then faults the absent page in.
    assert_eq!(d.srv.ops().queue.borrow().len(), 1);

    let page = read_back(&mut d);
    assert_eq!((page[0], page[8], page[9]), (0x11, 0xab, 0x11));
}

// ---- restart-resume (see resume.rs) ----

#[test]
fn resume_keeps_present_pages_and_takes_the_journals_last_word_for_absent_ones() {
    let d = Dev::with_memory(8, PAGE, LIMITS);
    let dir = d.store.as_ref().unwrap().path().to_owned();
    let fill = |b: u8| vec![b; PAGE as usize];
    // The dead faultd's store.
    let (mut old, _) = crate::engine::store::Store::open(&dir, "t", PAGE, false).unwrap();
    let mut stored = |page: u64, b: u8| {
        let slot = old.save(&fill(b)).unwrap();
        old.record(Record::Stored {
            gpa: GPA + page * PAGE,
            slot,
        })
        .unwrap();
    };
    stored(1, 0x22); // page 1: stored, but present again since
    stored(2, 0x33); // page 2: stored, then discarded
    stored(3, 0x44); // page 3: stored
    let zero = |page: u64| Record::Zero {
        gpa: page,
        len: PAGE,
    };
    old.record(zero(GPA + 2 * PAGE)).unwrap();
    old.record(zero(GPA + 5 * PAGE)).unwrap(); // page 5: zeroed, then stored
    let slot = old.save(&fill(0x66)).unwrap();
    old.record(Record::Stored {
        gpa: GPA + 5 * PAGE,
        slot,
    })
    .unwrap();
    old.record(zero(0x4000_0000)).unwrap(); // outside this layout
    old.keep();
    drop(old);
    d.srv.ops().put(HVA + PAGE, fill(0x55));
    let (store, records) = crate::engine::store::Store::open(&dir, "t", PAGE, true).unwrap();
    let Dev {
        srv, session, log, ..
    } = d;
    let mut srv = srv.with_store(
        store,
        Some(Resume {
            records,
            vmm_pid: None,
        }),
    );

    let report = srv.resume().unwrap();

    assert_eq!(
        report,
        ResumeReport {
            present: 1,
            stored: 2,
            zeroed: 1,
            unknown: 1
        }
    );
    let state = |page: u64| page_state(&session, HVA + page * PAGE);
    assert_eq!(
        (0..6).map(state).collect::<Vec<_>>(),
        [
            PageState::Absent,
            PageState::Resident,
            PageState::Absent,
            PageState::Absent,
            PageState::Absent,
            PageState::Absent
        ]
    );
    // Write protection is cleared and waiters woken over all guest RAM, both regions.
    assert_eq!(*srv.ops().wakes.borrow(), [HVA, HVA + 8 * PAGE]);
    assert_eq!(
        *srv.ops().log_wp.borrow(),
        ["unwp 0x7f0000000000", "unwp 0x7f0000008000"]
    );
    drop(log);
    for page in [2, 3, 5] {
        srv.ops().touch(HVA + page * PAGE);
    }
    srv.serve_ready().unwrap();
    assert_eq!(srv.ops().page(HVA + PAGE), Some(fill(0x55)), "present wins");
    assert_eq!(srv.ops().page(HVA + 2 * PAGE), Some(fill(0)), "last: zero");
    assert_eq!(srv.ops().page(HVA + 3 * PAGE), Some(fill(0x44)));
    assert_eq!(
        srv.ops().page(HVA + 5 * PAGE),
        Some(fill(0x66)),
        "last: stored"
    );
    let st = session.stats();
    assert_eq!((st.store_fills, st.zero_fills), (2, 1));
}

// ---- regions at offsets of one memfd (a VMM's own memory, split around a hole) ----

/// Guest RAM of one memfd of 8 pages split around a hole, its halves the other way round in
/// the memfd than in the VMM: region 0 (at GPA, mapped at HVA) is memfd pages 4..8, region 1
/// (1 MiB higher in the guest, mapped at HVA + 4 pages) is memfd pages 0..4. Every page the
/// engine reads, punches, installs through or finds present in the memfd must be found by the
/// region's offset: by its distance from the first region it would be the other region's.
fn split_around_a_hole() -> (
    FaultServer<FakeUffd>,
    Arc<Session>,
    Arc<OwnedFd>,
    tempfile::TempDir,
) {
    const HALF: u64 = 4 * PAGE;
    let memfd = Arc::new(
        nix::sys::memfd::memfd_create("guest", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap(),
    );
    nix::unistd::ftruncate(&memfd, (2 * HALF) as i64).unwrap();
    let region = |gpa: u64| RegionSpec {
        gpa: Gpa(gpa),
        size: HALF,
        page_size: PageSize::Size4K,
        backing: Backing::Zero,
        read_only: false,
    };
    let layout = Layout::new(vec![region(GPA), region(GPA + (1 << 20))]).unwrap();
    let served = |hva: u64, offset: u64| ServedRegion {
        hva: Hva(hva),
        memory: RegionMemory::Shared {
            fd: memfd.clone(),
            offset,
        },
    };
    let regions = vec![served(HVA, HALF), served(HVA + HALF, 0)];
    let session = Arc::new(Session::new(1, "t".into(), layout, regions, None));
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeUffd::new(HVA, 2 * HALF).with_memory(Memory {
        fd: memfd.clone(),
        session: session.clone(),
        store_dir: dir.path().to_owned(),
        log: Log::default(),
        placement: vec![(HVA, HALF, HALF), (HVA + HALF, HALF, 0)],
    });
    let srv = FaultServer::new(session.clone(), fake, 8, LIMITS).with_store_dir(dir.path().into());
    (srv, session, memfd, dir)
}

/// Every byte `0x10 + i`: the page at HVA + i pages, as the test writes it.
fn page_byte(i: u64) -> Vec<u8> {
    vec![0x10 + i as u8; PAGE as usize]
}

#[test]
fn a_region_at_an_offset_of_its_memfd_is_evicted_restored_and_found_present_at_that_offset() {
    let (mut srv, s, memfd, _dir) = split_around_a_hole();
    for i in 0..8 {
        srv.ops().touch(HVA + i * PAGE);
    }
    srv.serve_ready().unwrap();
    for i in 0..8 {
        srv.ops().put(HVA + i * PAGE, page_byte(i));
    }
    // The VMM's page 0 is memfd page 4 (the fake maps as the VMM did).
    let mut raw = vec![0; PAGE as usize];
    nix::sys::uio::pread(memfd.as_fd(), &mut raw, (4 * PAGE) as i64).unwrap();
    assert_eq!(raw, page_byte(0));
    let page = |i: u64| s.locate(Hva(HVA + i * PAGE)).unwrap().page;
    // What the device path maps and the eviction path reads and punches.
    assert_eq!(s.mem_location(page(1)).unwrap().1, 5 * PAGE);
    assert_eq!(s.mem_location(page(5)).unwrap().1, PAGE);
    let granule = s2map::Granule {
        first: page(6),
        pages: 1,
    };
    assert_eq!(s.map_target(granule).unwrap().1 .2, 2 * PAGE);

    // Evict the first two pages of region 0.
    for i in 0..2 {
        assert!(srv.evict_page(page(i)).unwrap(), "page {i} stored");
    }

    // Region 1 is untouched: an eviction by the wrong offset would have punched its pages.
    for i in 4..8 {
        assert_eq!(
            uniform(srv.ops().page(HVA + i * PAGE)),
            Some(0x10 + i as u8),
            "page {i}"
        );
    }
    assert_eq!(srv.ops().page(HVA), None, "evicted");
    // What a restarted faultd would find present in the memfd, region by region.
    assert_eq!(srv.present_pages(0, None).unwrap(), [2, 3]);
    assert_eq!(srv.present_pages(1, None).unwrap(), [0, 1, 2, 3]);
    // Faulted back in, the evicted pages hold what was saved from them (not region 1's bytes).
    for i in 0..2 {
        srv.ops().touch(HVA + i * PAGE);
    }
    srv.serve_ready().unwrap();
    for i in 0..8 {
        assert_eq!(
            uniform(srv.ops().page(HVA + i * PAGE)),
            Some(0x10 + i as u8),
            "page {i}"
        );
    }
    assert_eq!(s.stats().store_fills, 2);
}

// Working-set replay (see `working_set`), against the fake uffd.

/// A server of `s` (a snapshot-backed session owned by uid 0) replaying `offsets` from a
/// library in `dir`, the snapshot analysed (no zero pages: `snapshot()` has none).
fn replaying(
    s: &Arc<Session>,
    pages: u64,
    offsets: &[u64],
    dir: &std::path::Path,
) -> FaultServer<FakeUffd> {
    use crate::engine::recording::Recording;
    use crate::engine::snapshots::SnapshotInfo;
    use crate::engine::working_set::WsConfig;
    let file = s.snapshot().unwrap();
    let scan = crate::kernel::scan::scan(file, u64::MAX, || true).unwrap();
    let library = crate::engine::ws_library::Library::new(dir, 4);
    library
        .save(
            Some(0),
            &Recording {
                snapshot_size: scan.key.size,
                digest: scan.digest,
                offsets: offsets.to_vec(),
                zero: None,
            },
        )
        .unwrap();
    s.set_snapshot_info(Arc::new(SnapshotInfo::ready(scan)));
    let mut srv = server(s, pages).with_working_set(WsConfig {
        record: false,
        record_pages: 1,
        record_for: std::time::Duration::from_secs(10),
        replay: true,
        library,
    });
    // The recording loads on a thread of its own: here, before the test's faults.
    srv.ws_start();
    srv.ws_wait_loaded();
    srv
}

#[test]
fn the_first_fault_is_served_while_a_large_recording_is_still_loading() {
    use crate::engine::recording::{Recording, MAX_PAGES};
    use crate::engine::snapshots::SnapshotInfo;
    use crate::engine::working_set::WsConfig;
    let dir = tempfile::tempdir().unwrap();
    let s = session(8, Backing::File { offset: 0 }, Some(snapshot(8)));
    // A snapshot said to be 4 GiB (digest and size are what the recording is matched on),
    // and a recording of the largest size for it: 1 Mi pages, 8 MiB to read, check and index.
    let mut scan = crate::kernel::scan::scan(s.snapshot().unwrap(), u64::MAX, || true).unwrap();
    scan.key.size = MAX_PAGES * PAGE;
    scan.digest = [0x5A; 32];
    let library = crate::engine::ws_library::Library::new(dir.path(), 4);
    let rec = Recording {
        snapshot_size: scan.key.size,
        digest: scan.digest,
        offsets: (0..MAX_PAGES).rev().map(|p| p * PAGE).collect(),
        zero: None,
    };
    library.save(Some(0), &rec).unwrap();
    s.set_snapshot_info(Arc::new(SnapshotInfo::ready(scan)));
    let mut srv = server(&s, 8).with_working_set(WsConfig {
        record: false,
        record_pages: 1,
        record_for: std::time::Duration::from_secs(10),
        replay: true,
        library,
    });

    // The fault thread's start: the lookup begins, and the guest's first fault comes.
    srv.ws_start();
    srv.ops().touch(HVA + 3 * PAGE);
    let served = srv.serve_ready().unwrap();
    let still_loading = srv.ws_loading();

    assert_eq!(served, 1);
    assert_eq!(srv.ops().page(HVA + 3 * PAGE), Some(vec![4; PAGE as usize]));
    assert!(
        still_loading,
        "the recording was loaded before the first fault was served"
    );
    // Then it arrives, and replay starts in the next slice.
    srv.ws_wait_loaded();
    assert!(srv.prefetch_slice() || !s.stats().working_set.replay_stop.is_empty());
    assert_eq!(s.stats().working_set.replay_pages, MAX_PAGES);
}

#[test]
fn replay_installs_recorded_pages_in_runs_and_later_faults_find_them_present() {
    let dir = tempfile::tempdir().unwrap();
    let s = session(32, Backing::File { offset: 0 }, Some(snapshot(32)));
    // Pages 4..12 in order (one run), then 20, then 2.
    let mut offsets: Vec<u64> = (4..12).map(|p| p * PAGE).collect();
    offsets.extend([20 * PAGE, 2 * PAGE]);
    let mut srv = replaying(&s, 32, &offsets, dir.path());

    while srv.prefetch_slice() {}
    srv.ops().touch(HVA + 5 * PAGE);
    srv.ops().touch(HVA + 30 * PAGE);
    srv.serve_ready().unwrap();

    for p in [2u64, 4, 5, 11, 20] {
        assert_eq!(
            srv.ops().page(HVA + p * PAGE),
            Some(vec![p as u8 + 1; PAGE as usize])
        );
    }
    assert_eq!(
        (*srv.ops().runs.borrow(), *srv.ops().run_pages.borrow()),
        (1, 8)
    );
    let w = s.stats().working_set;
    assert_eq!((w.replay_pages, w.prefetched, w.skipped), (10, 10, 0));
    assert_eq!((w.late, w.misses, w.replay_stop.as_str()), (0, 1, "done"));
    // The fault on page 5 found it present: 11 installs in all (10 + page 30).
    assert_eq!(*srv.ops().installs.borrow(), 11);
}

#[test]
fn replay_never_fills_a_range_the_vmm_discarded_even_with_the_remove_unread() {
    let dir = tempfile::tempdir().unwrap();
    let s = session(16, Backing::File { offset: 0 }, Some(snapshot(16)));
    let offsets: Vec<u64> = (0..16).map(|p| p * PAGE).collect();
    let mut srv = replaying(&s, 16, &offsets, dir.path());
    // The VMM discards pages 8..16 (balloon) before replay reaches them; the REMOVE is unread.
    srv.ops().remove(HVA + 8 * PAGE, HVA + 16 * PAGE);

    // Replay's copy fails EAGAIN; it yields, the events are read, and replay goes on.
    while srv.prefetch_slice() {
        srv.serve_ready().unwrap();
    }
    srv.ops().touch(HVA + 9 * PAGE);
    srv.serve_ready().unwrap();

    // (First bytes compared: a whole page in a failure message is 4096 numbers.)
    let first = |p: u64| {
        srv.ops()
            .page(HVA + p * PAGE)
            .map(|b| (b[0], b == vec![b[0]; PAGE as usize]))
    };
    assert_eq!(first(7), Some((8, true)));
    assert_eq!(first(9), Some((0, true)));
    assert_eq!(first(10), None);
    let w = s.stats().working_set;
    assert_eq!((w.prefetched, w.skipped), (8, 8));
}

#[test]
fn replay_judged_wrong_stops_when_demand_faults_miss_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = session(256, Backing::File { offset: 0 }, Some(snapshot(256)));
    let offsets: Vec<u64> = (0..128).map(|p| p * PAGE).collect();
    let mut srv = replaying(&s, 256, &offsets, dir.path());
    assert!(srv.prefetch_slice()); // one slice: 64 pages, more to come
    for p in 128..128 + crate::engine::working_set::JUDGE_AFTER {
        srv.ops().touch(HVA + p * PAGE);
    }
    while srv.serve_ready().unwrap() > 0 {}

    assert!(!srv.prefetch_slice());

    let w = s.stats().working_set;
    assert_eq!(w.misses, crate::engine::working_set::JUDGE_AFTER);
    assert_eq!((w.prefetched, w.replay_stop.as_str()), (64, "wrong"));
}

#[test]
fn recording_keeps_demand_fills_only_not_finish_filling_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let s = session(8, Backing::File { offset: 0 }, Some(snapshot(8)));
    let library = crate::engine::ws_library::Library::new(dir.path(), 4);
    let mut srv = server(&s, 8).with_working_set(crate::engine::working_set::WsConfig {
        record: true,
        record_pages: 100,
        record_for: std::time::Duration::from_secs(60),
        replay: false,
        library,
    });
    srv.ops().touch(HVA + 5 * PAGE);
    srv.ops().touch(HVA + 2 * PAGE);
    srv.serve_ready().unwrap();

    srv.finish();

    assert_eq!(s.stats().working_set.recorded, 2);
}

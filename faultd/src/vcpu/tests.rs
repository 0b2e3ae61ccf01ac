//! Fault service against a fake userfaultfd that keeps the kernel's rules: an install into a
//! present page fails EEXIST, every install fails EAGAIN while a layout event is queued and
//! unread, and a REMOVE takes effect once it has been read.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::os::fd::OwnedFd;

use s2map::{Backing, Gpa, Layout, PageSize, PageState, RegionSpec};

use super::*;
use crate::session::ServedRegion;

const HVA: u64 = 0x7f00_0000_0000;
const PAGE: u64 = 4096;

#[derive(Debug)]
struct FakeUffd {
    present: RefCell<BTreeMap<u64, Vec<u8>>>,
    queue: RefCell<VecDeque<UffdEvent>>,
    registered: (u64, u64),
    wakes: RefCell<Vec<u64>>,
    installs: RefCell<u32>,
    fd: EventFd,
}

impl FakeUffd {
    fn new(start: u64, len: u64) -> Self {
        FakeUffd {
            present: RefCell::default(),
            queue: RefCell::default(),
            registered: (start, start + len),
            wakes: RefCell::default(),
            installs: RefCell::new(0),
            fd: EventFd::new().unwrap(),
        }
    }

    /// A VMM thread touches `addr`: no event if present, else a MISSING fault is queued.
    fn touch(&self, addr: u64) {
        if !self.present.borrow().contains_key(&(addr & !(PAGE - 1))) {
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

    fn install(&self, at: Hva, bytes: Vec<u8>) -> Result<(), OpError> {
        if self.layout_event_unread() {
            return Err(OpError::Retry);
        }
        if at.0 < self.registered.0 || at.0 >= self.registered.1 {
            return Err(OpError::NotRegistered);
        }
        let mut present = self.present.borrow_mut();
        if present.contains_key(&at.0) {
            return Err(OpError::Exists);
        }
        present.insert(at.0, bytes);
        *self.installs.borrow_mut() += 1;
        Ok(())
    }

    fn page(&self, addr: u64) -> Option<Vec<u8>> {
        self.present.borrow().get(&addr).cloned()
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
            }
            out.push(ev);
        }
        Ok(())
    }

    fn zeropage(&self, at: Hva, len: u64) -> Result<(), OpError> {
        self.install(at, vec![0; len as usize])
    }

    fn copy(&self, src: &[u8], at: Hva) -> Result<(), OpError> {
        self.install(at, src.to_vec())
    }

    fn wake(&self, at: Hva, _len: u64) -> Result<(), OpError> {
        self.wakes.borrow_mut().push(at.0);
        Ok(())
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn dummy_fd() -> Arc<OwnedFd> {
    Arc::new(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()))
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
        mem: dummy_fd(),
        mem_offset: 0,
    }];
    Arc::new(Session::new(1, "t".into(), layout, regions, snapshot))
}

fn server(s: &Arc<Session>, pages: u64) -> FaultServer<FakeUffd> {
    FaultServer::new(s.clone(), FakeUffd::new(HVA, pages * PAGE), 8)
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
    let mut srv = FaultServer::new(s.clone(), FakeUffd::new(HVA, 2 * PAGE), 1);
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
    let mut srv = FaultServer::new(s.clone(), FakeUffd::new(HVA, 4 * PAGE), 8);
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
        mem: dummy_fd(),
        mem_offset: 0,
    }];
    let s = Arc::new(Session::new(1, "t".into(), layout, regions, None));
    let mut srv = FaultServer::new(s.clone(), FakeUffd::new(HVA, 2 * HUGE), 8);
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
        FaultServer::new(s.clone(), fake, 8),
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

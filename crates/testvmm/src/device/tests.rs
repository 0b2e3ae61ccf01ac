//! The device against an in-test responder playing faultd: it consumes the ring with
//! `RingConsumer`, makes pages "resident" by writing them (plain memfd RAM, no uffd), maps
//! granules with `EmulatedIommu` and answers. No faultd, no KVM.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use iopf::emulated::EmulatedIommu;
use iopf::ring::RingConsumer;
use iopf::{FaultQueue, Group, Incoming, MapTarget, Mapper};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use super::*;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;
const G: u64 = 64 * KIB;
const RAM: u64 = 8 * MIB;

/// Guest RAM for the tests: a memfd mapped shared, at GPA 0.
struct TestRam {
    fd: OwnedFd,
    ptr: NonNull<u8>,
}

impl TestRam {
    fn new() -> TestRam {
        let fd = nix::sys::memfd::memfd_create("pri-test-ram", nix::sys::memfd::MFdFlags::empty())
            .unwrap();
        nix::unistd::ftruncate(&fd, RAM as i64).unwrap();
        // SAFETY: a fresh shared mapping of our own memfd; nothing aliases it, and Rust code
        // accesses it only through raw pointers.
        let ptr = unsafe {
            mmap(
                None,
                NonZeroUsize::new(RAM as usize).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }
        .unwrap()
        .cast();
        TestRam { fd, ptr }
    }

    fn byte(&self, gpa: u64) -> u8 {
        assert!(gpa < RAM);
        // SAFETY: inside the live mapping (checked); a volatile read creates no reference.
        unsafe { self.ptr.as_ptr().add(gpa as usize).read_volatile() }
    }

    /// Bytes of the memfd actually allocated: pages the responder or the device wrote.
    fn allocated(&self) -> u64 {
        nix::sys::stat::fstat(&self.fd).unwrap().st_blocks as u64 * 512
    }
}

impl Drop for TestRam {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; every device using it was dropped first
        // (devices are declared after the RAM in each test, so they drop before it).
        let _ = unsafe { munmap(self.ptr.cast(), RAM as usize) };
    }
}

fn device(ram: &TestRam, cfg: DeviceConfig) -> PriDevice {
    // SAFETY: the RAM outlives the device in every test (declared before it), and Rust holds
    // no reference into the mapping.
    unsafe { PriDevice::new(ram.ptr, 0, RAM, cfg) }.unwrap()
}

fn cfg() -> DeviceConfig {
    DeviceConfig {
        response_timeout: Duration::from_secs(10),
        ..DeviceConfig::default()
    }
}

/// How the responder answers.
#[derive(Clone, Default)]
struct Policy {
    /// Groups with a page in here are answered INVALID (nothing is written or mapped).
    refuse: Option<Range<u64>>,
    /// Hold every batch read this long before answering it (to let requests pile up).
    hold: Duration,
}

/// What the responder saw.
#[derive(Debug, Default)]
struct Log {
    groups: Vec<Group>,
    answered: usize,
    /// Most pages read and not yet answered at once.
    max_outstanding: usize,
}

struct Responder {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Log>>,
}

impl Responder {
    fn spawn(dev: &PriDevice, ram: &TestRam, policy: Policy) -> Responder {
        let fds = dev.fds();
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().unwrap();
        let mut queue = RingConsumer::new(
            dup(fds.ring()),
            dup(fds.kick()),
            dup(fds.notify()),
            DevId(dev.config().dev_id),
        )
        .unwrap();
        let mut iommu = EmulatedIommu::from_fd(dup(fds.table())).unwrap();
        let granule = iommu.granule();
        let ram_fd = ram.fd.try_clone().unwrap();
        let base = ram.ptr.as_ptr() as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut log = Log::default();
            let mut mapped = HashSet::new();
            let mut incoming = Vec::new();
            let mut pending: Vec<Group> = Vec::new();
            let mut outstanding = 0;
            let mut read = |queue: &mut RingConsumer, pending: &mut Vec<Group>, out: &mut usize| {
                incoming.clear();
                queue.read(&mut incoming).unwrap();
                for item in incoming.drain(..) {
                    match item {
                        Incoming::Group(g) => {
                            *out += g.pages.len();
                            pending.push(g);
                        }
                        Incoming::Malformed { reason, .. } => panic!("malformed: {reason}"),
                    }
                }
            };
            while !stopped.load(Ordering::Relaxed) {
                let mut fds = [PollFd::new(queue.fd(), PollFlags::POLLIN)];
                poll(&mut fds, PollTimeout::from(5u16)).unwrap();
                read(&mut queue, &mut pending, &mut outstanding);
                if pending.is_empty() {
                    continue;
                }
                if !policy.hold.is_zero() {
                    std::thread::sleep(policy.hold);
                    read(&mut queue, &mut pending, &mut outstanding);
                }
                log.max_outstanding = log.max_outstanding.max(outstanding);
                for g in pending.drain(..) {
                    let refused = g.pages.iter().any(|(iova, _)| {
                        policy.refuse.as_ref().is_some_and(|r| r.contains(&iova.0))
                    });
                    let code = if refused {
                        ResponseCode::Invalid
                    } else {
                        for &(iova, _) in &g.pages {
                            let first = iova.0 & !(granule - 1);
                            if !mapped.insert(first) {
                                continue;
                            }
                            // "Resident": write every page of the granule, keeping its bytes.
                            if first < RAM {
                                for page in (first..first + granule).step_by(PAGE_SIZE as usize) {
                                    let p = (base + page as usize) as *mut u8;
                                    // SAFETY: inside the test RAM mapping (page < RAM, the
                                    // RAM is a multiple of the granule), which outlives this
                                    // thread; volatile access creates no reference.
                                    unsafe { p.write_volatile(p.read_volatile()) };
                                }
                            }
                            let target = MapTarget {
                                va: (base as u64) + first,
                                fd: ram_fd.as_fd(),
                                offset: first,
                            };
                            iommu.map(Iova(first), granule, target, true).unwrap();
                        }
                        ResponseCode::Success
                    };
                    queue.respond(g.cookie, code).unwrap();
                    outstanding -= g.pages.len();
                    log.answered += 1;
                    log.groups.push(g);
                }
            }
            log
        });
        Responder {
            stop,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> Log {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Deterministic bytes (splitmix64), so a wrong offset shows up as a mismatch.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut s = seed;
    (0..len)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

fn pages(range: Range<u64>) -> Vec<u64> {
    range.step_by(PAGE_SIZE as usize).collect()
}

#[test]
fn unaligned_transfer_round_trips_and_a_second_access_needs_no_request() {
    let ram = TestRam::new();
    let dev = device(&ram, cfg());
    let resp = Responder::spawn(&dev, &ram, Policy::default());
    let (gpa, data) = (3 * G + 0x1234, bytes(1, 300 * KIB as usize));

    dev.dma_write(0, gpa, &data).unwrap();
    let after_write = dev.stats();
    let mut back = vec![0u8; data.len()];
    dev.dma_read(1, gpa, &mut back).unwrap();
    let s = dev.stats();
    let log = resp.finish();

    assert!(back == data, "read back differs");
    let direct: Vec<u8> = (gpa..gpa + data.len() as u64)
        .map(|a| ram.byte(a))
        .collect();
    assert!(direct == data, "guest RAM differs from what was written");
    assert_eq!(ram.byte(gpa - 1), 0, "byte before the transfer touched");
    assert_eq!(
        ram.byte(gpa + data.len() as u64),
        0,
        "byte after the transfer touched"
    );
    assert_eq!(s.requests, after_write.requests, "the read raised requests");
    // Only pages in granules that missed are requested, each once: 0x31000..0x41000 (the
    // first group ends in granule 4, which then translates whole), then 0x50000..0x7d000.
    let requested: Vec<u64> = log
        .groups
        .iter()
        .flat_map(|g| g.pages.iter().map(|p| p.0 .0))
        .collect();
    assert_eq!(requested.len() as u64, s.requests);
    assert_eq!(
        requested,
        [pages(0x31000..0x41000), pages(0x50000..0x7d000)].concat()
    );
    assert_eq!(
        (s.transfers, s.failed_transfers, s.bytes),
        (2, 0, 2 * data.len() as u64)
    );
    assert_eq!(
        (s.success, s.invalid, s.unmapped_after_success),
        (s.groups, 0, 0)
    );
    assert_eq!(log.answered as u64, s.groups);
}

#[test]
fn misses_spanning_granules_go_out_as_multi_page_groups_answered_once_each() {
    let ram = TestRam::new();
    let dev = device(&ram, cfg());
    let resp = Responder::spawn(&dev, &ram, Policy::default());
    let data = bytes(2, 256 * KIB as usize);

    dev.dma_write(0, G / 2, &data).unwrap();
    let s = dev.stats();
    let log = resp.finish();

    let got: Vec<Vec<u64>> = log
        .groups
        .iter()
        .map(|g| g.pages.iter().map(|p| p.0 .0).collect())
        .collect();
    // The consumer reports a group only once its LAST record arrives, so each of these was
    // closed by LAST on its last page. The first group spans the second half of granule 0 and
    // the first half of granule 1;
    // after it both translate, so the next miss is granule 2.
    assert_eq!(
        got,
        vec![
            pages(G / 2..G + G / 2),
            pages(2 * G..3 * G),
            pages(3 * G..4 * G),
            pages(4 * G..4 * G + G / 2),
        ]
    );
    assert!(log
        .groups
        .iter()
        .all(|g| g.pages.iter().all(|&(_, p)| p == Perm::READ | Perm::WRITE)));
    // 56 of the 64 pages: the second half of granule 1 translated after the first group.
    assert_eq!((s.groups, s.success, s.requests), (4, 4, 56));
    assert_eq!(s.unmapped_after_success, 0);
    assert_eq!(s.retries, 4);
    assert!(dev.translates(0, G / 2, data.len() as u64, true).unwrap());
}

#[test]
fn an_invalid_answer_fails_the_transfer_and_nothing_past_it_is_written() {
    let ram = TestRam::new();
    let dev = device(&ram, cfg());
    let refused = 16 * G..17 * G;
    let resp = Responder::spawn(
        &dev,
        &ram,
        Policy {
            refuse: Some(refused.clone()),
            ..Policy::default()
        },
    );
    let data = vec![0xAB; 3 * G as usize];

    let write = dev.dma_write(0, 15 * G, &data);
    let mut buf = vec![0u8; 100];
    let read = dev.dma_read(0, 16 * G + 50, &mut buf);
    let s = dev.stats();
    let log = resp.finish();

    assert!(
        matches!(write, Err(DmaError::Invalid { gpa }) if gpa == refused.start),
        "{write:?}"
    );
    assert!(
        matches!(read, Err(DmaError::Invalid { gpa }) if gpa == refused.start),
        "{read:?}"
    );
    assert_eq!(ram.byte(16 * G - 1), 0xAB, "the granule before was written");
    assert!(
        (16 * G..18 * G).step_by(997).all(|a| ram.byte(a) == 0),
        "something at or past the refused granule was written"
    );
    assert_eq!((s.invalid, s.failed_transfers, s.transfers), (2, 2, 0));
    assert_eq!(log.answered as u64, s.groups);
}

#[test]
fn credits_bound_the_page_requests_outstanding_across_workers() {
    let ram = TestRam::new();
    let dev = device(
        &ram,
        DeviceConfig {
            workers: 4,
            credits: 32,
            max_group_pages: 16,
            ..cfg()
        },
    );
    let resp = Responder::spawn(
        &dev,
        &ram,
        Policy {
            hold: Duration::from_millis(3),
            ..Policy::default()
        },
    );
    let region = RAM / 4;
    let data: Vec<Vec<u8>> = (0..4).map(|w| bytes(10 + w, MIB as usize)).collect();

    std::thread::scope(|s| {
        for (w, d) in data.iter().enumerate() {
            let dev = &dev;
            s.spawn(move || dev.dma_write(w as u32, w as u64 * region, d).unwrap());
        }
    });
    let st = dev.stats();
    let log = resp.finish();

    for (w, d) in data.iter().enumerate() {
        let mut back = vec![0u8; d.len()];
        dev.dma_read(w as u32, w as u64 * region, &mut back)
            .unwrap();
        assert!(&back == d, "worker {w}'s data differs");
    }
    println!(
        "groups {}, pages {}, max outstanding: device {}, seen by the responder {}",
        st.groups, st.requests, st.max_outstanding, log.max_outstanding
    );
    assert!(st.max_outstanding <= 32);
    assert!(log.max_outstanding <= 32);
    // The bound was actually pressed on: more than one worker's group was in flight at once.
    assert!(log.max_outstanding > 16);
    assert_eq!(st.requests, 4 * MIB / PAGE_SIZE);
    assert_eq!((st.success, st.unmapped_after_success), (st.groups, 0));
}

#[test]
fn a_group_nobody_answers_times_out() {
    let ram = TestRam::new();
    let dev = device(
        &ram,
        DeviceConfig {
            response_timeout: Duration::from_millis(200),
            ..cfg()
        },
    );
    let t0 = Instant::now();

    let res = dev.dma_write(0, 0, &[1, 2, 3]);

    let waited = t0.elapsed();
    assert!(
        matches!(res, Err(DmaError::Timeout { gpa: 0, .. })),
        "{res:?}"
    );
    assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(2));
    assert_eq!(dev.stats().timeouts, 1);
    // The credits came back: a second attempt waits again rather than failing at once.
    let t1 = Instant::now();
    assert!(dev.dma_write(0, 0, &[1]).is_err());
    assert!(t1.elapsed() >= Duration::from_millis(200));
}

#[test]
fn a_translation_outside_the_devices_ram_is_never_copied() {
    let ram = TestRam::new();
    let dev = device(
        &ram,
        DeviceConfig {
            iova_end: Some(RAM + 4 * G),
            ..cfg()
        },
    );
    // This responder maps whatever it is asked (a broken faultd would): the device must
    // still refuse to touch memory that is not its RAM.
    let resp = Responder::spawn(&dev, &ram, Policy::default());

    let res = dev.dma_write(0, RAM + G, &[7; 16]);
    resp.finish();

    assert!(
        matches!(res, Err(DmaError::Unbacked { gpa }) if gpa == RAM + G),
        "{res:?}"
    );
    assert_eq!(dev.iova_range(), (0, RAM + 4 * G));
}

#[test]
fn the_responder_only_populates_granules_it_was_asked_for() {
    let ram = TestRam::new();
    let dev = device(&ram, cfg());
    let resp = Responder::spawn(&dev, &ram, Policy::default());

    dev.dma_write(0, 5 * G + 100, &[9; 10]).unwrap();
    resp.finish();

    assert_eq!(ram.allocated(), G);
}

#[test]
fn bad_configurations_are_refused() {
    let ram = TestRam::new();
    let make = |cfg: DeviceConfig, gpa: u64| {
        // SAFETY: as in `device`; the device is dropped at once.
        unsafe { PriDevice::new(ram.ptr, gpa, RAM, cfg) }.map(drop)
    };

    let too_many_credits = make(
        DeviceConfig {
            credits: 128,
            req_slots: 64,
            ..cfg()
        },
        0,
    );
    let group_over_credits = make(
        DeviceConfig {
            credits: 8,
            max_group_pages: 16,
            ..cfg()
        },
        0,
    );
    let unaligned = make(cfg(), 0x1000);
    let workers = make(
        DeviceConfig {
            workers: 17,
            ..cfg()
        },
        0,
    );

    assert!(matches!(too_many_credits, Err(DeviceError::Config(_))));
    assert!(matches!(group_over_credits, Err(DeviceError::Config(_))));
    assert!(matches!(unaligned, Err(DeviceError::Config(_))));
    assert!(matches!(workers, Err(DeviceError::Table(_))));
    assert!(make(cfg(), 0).is_ok());
}

#[test]
fn an_unknown_worker_index_is_an_error() {
    let ram = TestRam::new();
    let dev = device(&ram, cfg());

    assert!(matches!(
        dev.dma_write(5, 0, &[1]),
        Err(DmaError::NoWorker(5))
    ));
}

//! End-to-end tests: real KVM guests on anonymous RAM and on a memfd served
//! through a userfaultfd. Need root and /dev/kvm.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::os::raw::c_void;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::mman::{MapFlags, ProtFlags};
use testvmm::{dword_offsets, page_sequence, pattern, RamSlot, VcpuReport, Vm, VmError, Workload};
use userfaultfd::{Event, Uffd, UffdBuilder};

const MIB: usize = 1 << 20;
const PAGE: u64 = 4096;
const TIMEOUT: Duration = Duration::from_secs(120);

/// A host mapping used as guest RAM at gpa 0.
struct Ram {
    ptr: NonNull<c_void>,
    len: usize,
}

impl Ram {
    fn anonymous(len: usize) -> Ram {
        // SAFETY: a fresh anonymous mapping aliases no existing memory.
        let ptr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                NonZeroUsize::new(len).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .unwrap();
        Ram { ptr, len }
    }

    fn shared(fd: &OwnedFd, len: usize) -> Ram {
        // SAFETY: a fresh shared mapping of our own memfd; Rust code only
        // accesses it through `read`/`write` below.
        let ptr = unsafe {
            nix::sys::mman::mmap(
                None,
                NonZeroUsize::new(len).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                0,
            )
        }
        .unwrap();
        Ram { ptr, len }
    }

    fn slot(&self) -> RamSlot {
        RamSlot {
            gpa: 0,
            host: self.ptr.cast(),
            size: self.len as u64,
        }
    }

    fn read(&self, gpa: u64) -> u32 {
        assert!(gpa & 3 == 0 && gpa + 4 <= self.len as u64);
        // SAFETY: in bounds and aligned (checked); volatile because the guest
        // wrote it behind the compiler's back.
        unsafe {
            self.ptr
                .cast::<u8>()
                .add(gpa as usize)
                .cast::<u32>()
                .read_volatile()
        }
    }

    fn write(&self, gpa: u64, value: u32) {
        assert!(gpa & 3 == 0 && gpa + 4 <= self.len as u64);
        // SAFETY: in bounds and aligned (checked); no guest runs concurrently.
        unsafe {
            self.ptr
                .cast::<u8>()
                .add(gpa as usize)
                .cast::<u32>()
                .write_volatile(value)
        }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; the Vm using it is gone.
        unsafe { nix::sys::mman::munmap(self.ptr, self.len) }.unwrap();
    }
}

fn memfd(len: usize) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(c"testvmm-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .unwrap();
    nix::unistd::ftruncate(&fd, len as i64).unwrap();
    fd
}

fn resident_pages(fd: &OwnedFd) -> u64 {
    nix::sys::stat::fstat(fd).unwrap().st_blocks as u64 * 512 / PAGE
}

/// A minimal userfaultfd server: answers every missing fault with a zero page.
struct UffdServer {
    stop: Arc<AtomicBool>,
    faults: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl UffdServer {
    fn register(ram: &Ram) -> Uffd {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false) // KVM's accesses are kernel-mode faults
            .create()
            .unwrap();
        uffd.register(ram.ptr.as_ptr(), ram.len).unwrap();
        uffd
    }

    fn start(uffd: Uffd) -> UffdServer {
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicU64::new(0));
        let (s, f) = (stop.clone(), faults.clone());
        let thread = std::thread::spawn(move || serve(&uffd, &s, &f));
        UffdServer {
            stop,
            faults,
            thread: Some(thread),
        }
    }
}

impl Drop for UffdServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn serve(uffd: &Uffd, stop: &AtomicBool, faults: &AtomicU64) {
    use nix::poll::{poll, PollFd, PollFlags};
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(uffd.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, 50u16).unwrap() == 0 {
            continue;
        }
        while let Some(event) = uffd.read_event().unwrap() {
            if let Event::Pagefault { addr, .. } = event {
                let page = (addr as usize & !(PAGE as usize - 1)) as *mut c_void;
                // SAFETY: `page` lies in the registered range, which holds no
                // Rust data; zero-filling a missing page is what the guest expects.
                match unsafe { uffd.zeropage(page, PAGE as usize, true) } {
                    Ok(_) => {
                        faults.fetch_add(1, Ordering::Relaxed);
                    }
                    // Raced with another fault on the same page: already there.
                    Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => {}
                    Err(e) => panic!("zeropage {page:?}: {e}"),
                }
            }
        }
    }
}

fn write_verify(seed: u32, touches: u32, first_page: u32, page_count: u32) -> Workload {
    Workload::WriteVerify {
        seed,
        touches,
        first_page,
        page_count,
    }
}

fn params(w: &Workload) -> (u32, u32, u32, u32) {
    match *w {
        Workload::WriteVerify {
            seed,
            touches,
            first_page,
            page_count,
        }
        | Workload::Verify {
            seed,
            touches,
            first_page,
            page_count,
        } => (seed, touches, first_page, page_count),
        Workload::TouchSequential { .. } | Workload::WriteVerifySequential { .. } => unreachable!(),
    }
}

/// Runs `workloads`, checking progress reports are increasing and end at `pages`.
fn run(vm: &mut Vm, workloads: &[Workload]) -> Result<Vec<VcpuReport>, VmError> {
    let seen = Mutex::new(vec![Vec::new(); workloads.len()]);
    let reports = vm.run(workloads.to_vec(), &|vcpu, done| {
        seen.lock().unwrap()[vcpu].push(done)
    })?;
    for (r, seen) in reports.iter().zip(seen.into_inner().unwrap()) {
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        assert_eq!(seen.last(), Some(&r.pages));
    }
    Ok(reports)
}

/// Checks the guest's writes on the host: every sequence page holds pattern()
/// at every written dword. Returns the distinct pages touched.
fn check_written(ram: &Ram, workloads: &[Workload]) -> HashSet<u32> {
    let mut touched = HashSet::new();
    for w in workloads {
        let (seed, touches, first, count) = params(w);
        for page in page_sequence(seed, touches, first, count) {
            touched.insert(page);
            for off in dword_offsets() {
                let gpa = u64::from(page) * PAGE + off;
                assert_eq!(ram.read(gpa), pattern(gpa, seed), "gpa {gpa:#x}");
            }
        }
    }
    touched
}

fn assert_clean(reports: &[VcpuReport], workloads: &[Workload]) {
    for (r, w) in reports.iter().zip(workloads) {
        assert_eq!(r.mismatches, 0, "{r:?}");
        assert_eq!(r.first_mismatch_gpa, None);
        assert_eq!(r.pages, 2 * params(w).1);
    }
}

#[test]
fn write_verify_on_anonymous_ram() {
    let ram = Ram::anonymous(64 * MIB);
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    vm.set_timeout(Some(TIMEOUT));
    vm.set_progress_interval(500); // -> 512
    let workloads = [
        write_verify(1, 3000, 0, 4096),
        write_verify(2, 3000, 8192, 4096),
    ];
    let reports = run(&mut vm, &workloads).unwrap();
    assert_clean(&reports, &workloads);

    let touched = check_written(&ram, &workloads);
    let untouched_in_range = (0..4096).find(|p| !touched.contains(p)).unwrap();
    for page in [untouched_in_range, 6000, 16383] {
        for off in (0..PAGE).step_by(4) {
            assert_eq!(ram.read(u64::from(page) * PAGE + off), 0, "page {page}");
        }
    }
}

#[test]
fn write_verify_on_uffd_memfd_touches_only_guest_pages() {
    let len = 256 * MIB;
    let fd = memfd(len);
    let ram = Ram::shared(&fd, len);
    let server = UffdServer::start(UffdServer::register(&ram));
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    vm.set_timeout(Some(TIMEOUT));
    assert_eq!(resident_pages(&fd), 0, "Vm::new touched RAM");

    let workloads = [
        write_verify(11, 4000, 0, 16384),
        write_verify(12, 4000, 32768, 16384),
    ];
    let reports = run(&mut vm, &workloads).unwrap();
    assert_clean(&reports, &workloads);

    // Count before the host reads anything (reads of sequence pages are
    // resident anyway, but keep the count purely the guest's).
    let resident = resident_pages(&fd);
    let touched = check_written(&ram, &workloads);
    assert_eq!(resident, touched.len() as u64);
    assert_eq!(server.faults.load(Ordering::Relaxed), touched.len() as u64);
}

#[test]
fn verify_prefilled_ram_and_wrong_seed_fails() {
    let ram = Ram::anonymous(32 * MIB);
    let (seed, first, count) = (0xdead_beef, 1000, 2000);
    for page in first..first + count {
        for off in (0..PAGE).step_by(4) {
            let gpa = u64::from(page) * PAGE + off;
            ram.write(gpa, pattern(gpa, seed));
        }
    }
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    vm.set_timeout(Some(TIMEOUT));
    let verify = |seed| Workload::Verify {
        seed,
        touches: 1500,
        first_page: first,
        page_count: count,
    };
    let ok = run(&mut vm, &[verify(seed)]).unwrap();
    assert_eq!((ok[0].pages, ok[0].mismatches), (1500, 0));
    assert_eq!(ok[0].first_mismatch_gpa, None);

    // Same Vm, vCPU reused: a wrong seed mismatches every checked dword.
    let bad = run(&mut vm, &[verify(seed ^ 1)]).unwrap();
    assert_eq!(bad[0].mismatches, 1500 * testvmm::DWORDS_PER_PAGE);
    let first_page = page_sequence(seed ^ 1, 1, first, count)[0];
    assert_eq!(
        bad[0].first_mismatch_gpa,
        Some(u64::from(first_page) * PAGE)
    );
}

#[test]
fn touch_sequential_times_every_touch() {
    let ram = Ram::anonymous(16 * MIB);
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    vm.set_timeout(Some(TIMEOUT));
    let w = Workload::TouchSequential {
        first_page: 10,
        count: 200,
    };
    let r = run(&mut vm, &[w, w]).unwrap();
    for r in r {
        assert_eq!(r.pages, 200);
        assert_eq!(r.touch_times.len(), 200);
        assert!(r.touch_times.iter().sum::<Duration>() <= r.elapsed);
    }
}

#[test]
fn eight_vcpus_and_no_more() {
    let ram = Ram::anonymous(64 * MIB);
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    vm.set_timeout(Some(TIMEOUT));
    let workloads: Vec<_> = (0..8)
        .map(|i| write_verify(i, 300, i * 2048, 2048))
        .collect();
    let reports = run(&mut vm, &workloads).unwrap();
    assert_clean(&reports, &workloads);
    check_written(&ram, &workloads);

    let nine = vec![write_verify(0, 1, 0, 1); 9];
    assert!(matches!(
        vm.run(nine, &|_, _| {}),
        Err(VmError::VcpuCount(9))
    ));
}

#[test]
fn rejects_pages_outside_ram() {
    let ram = Ram::anonymous(4 * MIB);
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    let e = vm.run(vec![write_verify(0, 10, 1000, 100)], &|_, _| {});
    assert!(
        matches!(e, Err(VmError::InvalidWorkload { vcpu: 0, .. })),
        "{e:?}"
    );
}

#[test]
fn timeout_stops_a_spinning_guest() {
    let ram = Ram::anonymous(4 * MIB);
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    vm.set_timeout(Some(Duration::from_millis(300)));
    let start = Instant::now();
    // ~2 billion resident page visits: minutes of guest time.
    let e = vm.run(vec![write_verify(0, u32::MAX / 2, 0, 16)], &|_, _| {});
    assert!(matches!(e, Err(VmError::Timeout { vcpu: 0, .. })), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn timeout_interrupts_an_unserved_userfault() {
    let len = 16 * MIB;
    let fd = memfd(len);
    let ram = Ram::shared(&fd, len);
    let _uffd = UffdServer::register(&ram); // registered, never served
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    vm.set_timeout(Some(Duration::from_millis(300)));
    let start = Instant::now();
    let e = vm.run(vec![write_verify(0, 10, 0, 100)], &|_, _| {});
    assert!(matches!(e, Err(VmError::Timeout { vcpu: 0, .. })), "{e:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn failing_vcpu_stops_the_others_and_is_reported() {
    // Slot 0: anonymous RAM where vCPU 0 spins for minutes. Slot 1: a memfd
    // truncated to nothing, so vCPU 1's first access cannot be backed.
    let ram = Ram::anonymous(4 * MIB);
    let fd = memfd(4 * MIB);
    let broken = Ram::shared(&fd, 4 * MIB);
    nix::unistd::ftruncate(&fd, 0).unwrap();
    let mut broken_slot = broken.slot();
    broken_slot.gpa = 4 * MIB as u64;
    let mut vm = Vm::new(vec![ram.slot(), broken_slot]).unwrap();
    let start = Instant::now();
    let e = vm.run(
        vec![
            write_verify(0, u32::MAX / 2, 0, 16),
            write_verify(0, 10, 1024, 16),
        ],
        &|_, _| {},
    );
    match e {
        Err(VmError::RunVcpu { vcpu: 1, .. } | VmError::UnexpectedExit { vcpu: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn vm_is_send() {
    fn send<T: Send>() {}
    send::<Vm>();
}

/// Guest speed; run with `cargo test -p testvmm --release -- --ignored --nocapture speed`.
#[test]
#[ignore = "a measurement, not a check: run by hand (see above)"]
fn speed() {
    let len = 1024 * MIB;
    let pages_per_vcpu = 65536; // 256 MiB each
    for vcpus in [1u32, 2] {
        let workloads: Vec<_> = (0..vcpus)
            .map(|i| write_verify(i, pages_per_vcpu, i * pages_per_vcpu, pages_per_vcpu))
            .collect();
        let report = |what: &str, reports: &[VcpuReport]| {
            let slowest = reports.iter().map(|r| r.elapsed).max().unwrap();
            let visits: u32 = reports.iter().map(|r| r.pages).sum();
            let distinct: usize = workloads
                .iter()
                .map(|w| {
                    let (s, t, f, c) = params(w);
                    page_sequence(s, t, f, c)
                        .into_iter()
                        .collect::<HashSet<_>>()
                        .len()
                })
                .sum();
            println!(
                "{what}, {vcpus} vCPU: {visits} visits ({distinct} distinct pages first-touched) in {slowest:?}: \
                 {:.0} visits/s, {:.0} first touches/s",
                f64::from(visits) / slowest.as_secs_f64(),
                distinct as f64 / slowest.as_secs_f64(),
            );
        };
        let ram = Ram::anonymous(len);
        let mut vm = Vm::new(vec![ram.slot()]).unwrap();
        report("anonymous", &run(&mut vm, &workloads).unwrap());
        drop(vm);

        let fd = memfd(len);
        let ram = Ram::shared(&fd, len);
        let server = UffdServer::start(UffdServer::register(&ram));
        let mut vm = Vm::new(vec![ram.slot()]).unwrap();
        report("memfd+uffd", &run(&mut vm, &workloads).unwrap());
        drop((vm, server));
    }
    // Per-touch latency: a port-I/O exit plus, on the first pass, the fault.
    let w = Workload::TouchSequential {
        first_page: 0,
        count: 20000,
    };
    let touch = |what: &str, vm: &mut Vm| {
        let mut t = run(vm, &[w]).unwrap().remove(0).touch_times;
        t.sort();
        println!(
            "TouchSequential, {what}: median {:?}, p99 {:?} per touch",
            t[t.len() / 2],
            t[t.len() * 99 / 100]
        );
    };
    let ram = Ram::anonymous(len);
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    touch("anonymous, first read", &mut vm);
    touch("anonymous, resident", &mut vm);
    drop(vm);
    let fd = memfd(len);
    let ram = Ram::shared(&fd, len);
    let _server = UffdServer::start(UffdServer::register(&ram));
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    touch("memfd+uffd, first read", &mut vm);
    touch("memfd+uffd, resident", &mut vm);
}

#[test]
fn a_mismatch_above_4_gib_is_reported_at_its_full_address() {
    // 8 GiB of sparse anonymous RAM: only the pages the guest touches become resident.
    let ram = Ram::anonymous(8 << 30);
    let mut vm = Vm::new(vec![ram.slot()]).unwrap();
    vm.set_timeout(Some(TIMEOUT));
    let (seed, first, count) = (0x600d, ((5u64 << 30) / PAGE) as u32, 64);
    let written = run(&mut vm, &[write_verify(seed, 32, first, count)]).unwrap();
    assert_clean(&written, &[write_verify(seed, 32, first, count)]);
    let bad = run(
        &mut vm,
        &[Workload::Verify {
            seed: seed ^ 1,
            touches: 32,
            first_page: first,
            page_count: count,
        }],
    )
    .unwrap();
    let first_page = page_sequence(seed ^ 1, 1, first, count)[0];
    assert!(u64::from(first_page) * PAGE >= 5 << 30);
    assert_eq!(
        bad[0].first_mismatch_gpa,
        Some(u64::from(first_page) * PAGE)
    );
}

//! What a VMM hands faultd, and how it leaves: every handover that would lose the client's own
//! data silently is refused with a reason naming it, a session beside it keeps serving with its
//! data intact, and `finish` lets a VMM end its session and close its uffd without losing a page.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use faultd_client::{create_uffd, Client, ClientError, GuestRam, RamPageSize, RegionSpec};
use faultd_proto::{ErrorCode, Request, Response};
use faultd_tests::{
    read_with_timeout, refused_raw, write_with_timeout, zero_register_bytes, Faultd, Ram,
};

const T: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// The refusal of a registration that faultd should not accept.
fn refusal(result: Result<faultd_client::Session, ClientError>) -> (ErrorCode, String) {
    match result {
        Err(ClientError::Refused { code, message }) => (code, message),
        Err(other) => panic!("expected a refusal, got {other}"),
        Ok(s) => panic!("registration accepted (session {})", s.id()),
    }
}

/// Reopens `fd` through /proc with `flags` (a new open file description of the same file).
fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> OwnedFd {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    // SAFETY: a plain open(2) of a NUL-terminated path; the result is checked below.
    let raw = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    assert!(raw >= 0, "reopen: {}", std::io::Error::last_os_error());
    // SAFETY: `raw` is a fresh fd this process owns and nothing else refers to.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// The byte each page of the victim's pattern holds at `offset 7`.
fn mark(page: u64) -> u8 {
    (page as u8).wrapping_mul(31).wrapping_add(1)
}

/// Writes the pattern into `pages` of `ram` (through faults faultd serves).
fn write_marks(ram: &GuestRam, pages: impl Iterator<Item = u64>) {
    write_with_timeout(ram, pages.map(|p| (p * PAGE + 7, mark(p))).collect(), T);
}

/// Reads byte 7 of every page of `ram` (faults included) and checks: `marked` pages hold the
/// pattern, every other page zero.
fn assert_every_page(ram: &GuestRam, marked: impl Fn(u64) -> bool) {
    let pages = ram.size() / PAGE;
    let got = read_with_timeout(ram, (0..pages).map(|p| p * PAGE + 7).collect(), T);
    for (p, v) in (0..pages).zip(got) {
        let want = if marked(p) { mark(p) } else { 0 };
        assert_eq!(v, want, "victim page {p}");
    }
}

#[test]
fn uffd_without_the_api_handshake_is_refused() {
    let faultd = Faultd::start(&[]);
    let ram = GuestRam::new("ram", MIB, RamPageSize::Size4K).unwrap();
    // SAFETY: the userfaultfd syscall takes flags only; the result is checked below.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert!(raw >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd this process owns.
    let uffd = unsafe { OwnedFd::from_raw_fd(raw as i32) };

    let (code, message) = refused_raw(
        &faultd,
        &zero_register_bytes("noapi", &ram),
        &[uffd.as_fd(), ram.memfd()],
    );

    assert_eq!(code, ErrorCode::BadFd, "{message}");
    assert!(message.contains("UFFDIO_API"), "{message}");
}

#[test]
fn guest_ram_not_registered_with_the_uffd_is_refused() {
    let faultd = Faultd::start(&[]);
    let ram = GuestRam::new("ram", MIB, RamPageSize::Size4K).unwrap();
    let uffd = create_uffd().unwrap();
    let mut snapshot = tempfile::tempfile().unwrap();
    snapshot.write_all(&vec![0xA5; MIB as usize]).unwrap();

    let (code, message) = refusal(Client::connect(faultd.socket()).unwrap().register(
        "unreg",
        &uffd,
        &[RegionSpec::snapshot(0, &ram, 0)],
        Some(snapshot.as_fd()),
    ));

    assert_eq!(code, ErrorCode::BadMapping, "{message}");
    assert!(
        message.contains("regions[0]") && message.contains("not registered"),
        "{message}"
    );
}

#[test]
fn memfd_of_a_live_session_is_refused_and_the_victim_keeps_its_data() {
    let faultd = Faultd::start(&[]);
    let victim = Ram::new("victim", MIB);
    let mut session = victim.serve(&faultd, "victim");
    write_marks(&victim.ram, (0..256).step_by(2));
    // The same memfd mapped again, registered with a uffd of its own.
    let twin = GuestRam::map(
        victim.ram.memfd().try_clone_to_owned().unwrap(),
        MIB,
        RamPageSize::Size4K,
    )
    .unwrap();
    let uffd = create_uffd().unwrap();
    twin.register(&uffd).unwrap();

    let (code, message) = refusal(Client::connect(faultd.socket()).unwrap().register(
        "thief",
        &uffd,
        &[RegionSpec::zero(0, &twin)],
        None,
    ));

    assert_eq!(code, ErrorCode::BadFd, "{message}");
    assert!(
        message.contains("fd 1") && message.contains("another live session"),
        "{message}"
    );
    assert_every_page(&victim.ram, |p| p % 2 == 0);
    assert_eq!(session.stats().unwrap().errors, 0);
}

#[test]
fn uffd_of_a_live_session_is_refused_and_the_victim_keeps_being_served() {
    let faultd = Faultd::start(&[]);
    let victim = Ram::new("victim", MIB);
    let mut session = victim.serve(&faultd, "victim");
    write_marks(&victim.ram, (0..128).step_by(3));
    // Other RAM, registered with the victim's uffd, handed over with it.
    let other = GuestRam::new("other", MIB, RamPageSize::Size4K).unwrap();
    other.register(&victim.uffd).unwrap();

    let (code, message) = refusal(Client::connect(faultd.socket()).unwrap().register(
        "thief",
        &victim.uffd,
        &[RegionSpec::zero(0, &other)],
        None,
    ));

    assert_eq!(code, ErrorCode::BadFd, "{message}");
    assert!(
        message.contains("fd 0") && message.contains("another live session"),
        "{message}"
    );
    assert_every_page(&victim.ram, |p| p < 128 && p % 3 == 0);
    assert_eq!(session.stats().unwrap().errors, 0);
}

#[test]
fn memory_fd_opened_o_path_is_refused() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", MIB);
    let path_fd = reopen(r.ram.memfd(), libc::O_PATH);

    let (code, message) = refused_raw(
        &faultd,
        &zero_register_bytes("opath", &r.ram),
        &[r.uffd.as_fd(), path_fd.as_fd()],
    );

    assert_eq!(code, ErrorCode::BadFd, "{message}");
    assert!(
        message.contains("fd 1") && message.contains("O_PATH"),
        "{message}"
    );
}

#[test]
fn memory_fd_opened_read_only_is_refused() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", MIB);
    let ro = reopen(r.ram.memfd(), libc::O_RDONLY);

    let (code, message) = refused_raw(
        &faultd,
        &zero_register_bytes("rdonly", &r.ram),
        &[r.uffd.as_fd(), ro.as_fd()],
    );

    assert_eq!(code, ErrorCode::BadFd, "{message}");
    assert!(
        message.contains("fd 1") && message.contains("read-write"),
        "{message}"
    );
}

#[test]
fn more_fds_than_a_message_may_carry_are_refused_naming_count_and_limit() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", MIB);
    for count in [65usize, 250] {
        let mut fds = vec![r.uffd.as_fd()];
        fds.resize(count, r.ram.memfd());

        let (code, message) = refused_raw(&faultd, &zero_register_bytes("many", &r.ram), &fds);

        assert_eq!(code, ErrorCode::Oversize, "{count} fds: {message}");
        assert!(
            message.contains(&format!("{count} fds")) && message.contains("64"),
            "{message}"
        );
    }
    // And on a registered session, which is then handed over (not ended as VM gone).
    let session = r.serve(&faultd, "many");
    let mut raw = session.into_raw();
    let fds = vec![r.ram.memfd(); 65];
    raw.send(&faultd_proto::encode(&Request::Stats {}).unwrap(), &fds)
        .unwrap();
    match raw.recv_response().unwrap() {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::Oversize, "{message}");
            assert!(message.contains("65 fds"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn zero_length_packet_is_refused_and_the_store_is_kept_for_resume() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", MIB);
    let mut session = r.serve(&faultd, "zl");
    write_marks(&r.ram, 0..64);
    let (evicted, _, failed) = session.evict(0, 64 * PAGE, None).unwrap();
    assert_eq!((evicted, failed), (64, 0));
    let mut raw = session.into_raw();

    raw.send(&[], &[]).unwrap();

    match raw.recv_response() {
        Ok(Response::Error { code, message }) => {
            assert_eq!(code, ErrorCode::Malformed, "{message}");
            assert!(message.contains("zero-length"), "{message}");
        }
        other => panic!("expected a refusal of the empty packet, got {other:?}"),
    }
    assert!(raw.recv().unwrap().is_none(), "session left open");
    // The VM lives on: it registers again with resume and finds the evicted pages.
    let _again = Client::connect(faultd.socket())
        .unwrap()
        .resume("zl", &r.uffd, &[RegionSpec::zero(0, &r.ram)], None)
        .unwrap();
    assert_every_page(&r.ram, |p| p < 64);
}

#[test]
fn a_vmm_that_hangs_up_ends_its_vm_and_its_store_is_deleted_not_taken_for_an_empty_packet() {
    // A hang-up also reads as 0 bytes; it must stay a hang-up (the VM is gone, and so are its
    // stored pages), not a zero-length packet (which keeps the store for a resume).
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", MIB);
    let mut session = r.serve(&faultd, "gone");
    write_marks(&r.ram, 0..16);
    let (evicted, _, failed) = session.evict(0, 16 * PAGE, None).unwrap();
    assert_eq!((evicted, failed), (16, 0));
    // The test's VMM is root: its stores are in store.dir/0.
    let journal = faultd.store_dir().join("0").join("gone.journal");
    assert!(journal.exists(), "no store after an eviction");

    drop(session);

    let deadline = std::time::Instant::now() + T;
    while journal.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !journal.exists(),
        "the store outlived its VM:\n{}",
        faultd.log()
    );
    assert!(
        !faultd.log().contains("zero-length"),
        "a hang-up was taken for a zero-length packet:\n{}",
        faultd.log()
    );
}

/// The bytes of page `p` of the test snapshot: its number everywhere, a marker at 100.
fn snapshot_page(p: u64) -> Vec<u8> {
    let mut page = vec![(p as u8) ^ 0x5A; PAGE as usize];
    page[100] = 0xA5;
    page[4000] = (p >> 8) as u8;
    page
}

#[test]
fn after_finish_the_vmm_closes_its_uffd_and_every_snapshot_page_reads_back() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", 4 * MIB);
    let pages = r.ram.size() / PAGE;
    let mut snapshot = tempfile::tempfile().unwrap();
    for p in 0..pages {
        snapshot.write_all(&snapshot_page(p)).unwrap();
    }
    let mut session = Client::connect(faultd.socket())
        .unwrap()
        .register(
            "fin",
            &r.uffd,
            &[RegionSpec::snapshot(0, &r.ram, 0)],
            Some(snapshot.as_fd()),
        )
        .unwrap();
    // Pages 0..32 written by the guest, 0..16 of them then evicted to faultd's store; pages
    // 32.. never faulted in.
    write_with_timeout(&r.ram, (0..32).map(|p| (p * PAGE + 7, 0xEE)).collect(), T);
    let (evicted, _, failed) = session.evict(0, 16 * PAGE, None).unwrap();
    assert_eq!((evicted, failed), (16, 0));

    let finished = session.finish().unwrap();

    assert_eq!(finished.remaining, 0);
    assert_eq!(finished.filled, pages - 16);
    // The VMM ends its session and closes its uffd: guest RAM must hold everything now.
    drop(session);
    let Ram { uffd, ram } = r;
    drop(uffd);
    // SAFETY: `ram` maps `ram.size()` bytes shared and stays alive for this borrow; with the
    // uffd closed no access blocks, and nothing writes the mapping meanwhile.
    let bytes = unsafe { std::slice::from_raw_parts(ram.host_ptr().as_ptr(), ram.size() as usize) };
    for p in 0..pages {
        let mut want = snapshot_page(p);
        if p < 32 {
            want[7] = 0xEE;
        }
        let got = &bytes[(p * PAGE) as usize..((p + 1) * PAGE) as usize];
        assert!(
            got == want.as_slice(),
            "page {p} differs from what the guest had"
        );
    }
}

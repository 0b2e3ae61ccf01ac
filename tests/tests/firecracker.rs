//! faultd serving Firecracker snapshot restores through Firecracker's own external page-fault
//! handler protocol, with a stand-in that behaves like Firecracker on the wire and in memory
//! ([`faultd_tests::firecracker`]): anonymous private guest RAM, one sendmsg of JSON + uffd,
//! its own thread touching pages during the load, a real KVM guest after it.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use faultd_client::{Client, ClientError, FirecrackerListen, RamPageSize};
use faultd_proto::{ErrorCode, SessionStats};
use faultd_tests::firecracker::{
    balloon_discard, closed_by_peer, copy_with_timeout, own_pages, pattern_snapshot,
    refused_at_once, send_raw, FcRestore, WireForm, PAGE,
};
use faultd_tests::{Faultd, HugePages};
use testvmm::{page_sequence, RamSlot, Vm, Workload};

const MIB: u64 = 1 << 20;
const HUGE: u64 = 2 * MIB;
const T: Duration = Duration::from_secs(20);

/// One guest region: guest physical address, size, offset in the snapshot file.
#[derive(Clone, Copy)]
struct Region {
    gpa: u64,
    size: u64,
    offset: u64,
}

/// A VM as a test sees it: its regions, its snapshot file, its socket, in one directory.
struct Setup {
    dir: tempfile::TempDir,
    regions: Vec<Region>,
    snapshot: std::fs::File,
    seed: u32,
}

impl Setup {
    fn new(regions: &[Region], seed: u32) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let spec: Vec<(u64, u64, u64)> =
            regions.iter().map(|r| (r.gpa, r.size, r.offset)).collect();
        let snapshot = pattern_snapshot(&dir.path().join("mem"), &spec, seed);
        Setup {
            dir,
            regions: regions.to_vec(),
            snapshot,
            seed,
        }
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.path().join("mem")
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn restore(&self, page: RamPageSize) -> FcRestore {
        let layout: Vec<(u64, u64)> = self.regions.iter().map(|r| (r.size, r.offset)).collect();
        FcRestore::new(&layout, page).unwrap()
    }

    /// The snapshot file's bytes of region `r` at `off`, `len` long.
    fn file_bytes(&self, r: usize, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.snapshot
            .read_exact_at(&mut v, self.regions[r].offset + off)
            .unwrap();
        v
    }

    fn vm(&self, restore: &FcRestore) -> Vm {
        let slots = self
            .regions
            .iter()
            .zip(&restore.regions)
            .map(|(r, fc)| RamSlot {
                gpa: r.gpa,
                host: fc.ram.host_ptr(),
                size: r.size,
            })
            .collect();
        let mut vm = Vm::new(slots).expect("creating the KVM VM");
        vm.set_timeout(Some(Duration::from_secs(120)));
        vm
    }
}

/// Whether any live session is a restore of listener `listener` (named `listener-N`).
fn any_session_of(faultd: &Faultd, listener: &str) -> bool {
    let prefix = format!("{listener}-");
    Client::connect(faultd.socket())
        .unwrap()
        .sessions()
        .unwrap()
        .iter()
        .any(|r| r.vm.starts_with(&prefix))
}

fn only_session(stats: Vec<SessionStats>) -> SessionStats {
    assert_eq!(stats.len(), 1, "{stats:?}");
    stats.into_iter().next().unwrap()
}

#[test]
fn firecracker_restore_serves_its_load_thread_and_a_kvm_guest_the_snapshot_and_balloon_pages_read_zero(
) {
    // Two regions with a hole between them in guest physical memory (as Firecracker's below
    // and above the MMIO gap), back to back in the snapshot file.
    let regions = [
        Region {
            gpa: 0,
            size: 96 * MIB,
            offset: 0,
        },
        Region {
            gpa: 128 * MIB,
            size: 64 * MIB,
            offset: 96 * MIB,
        },
    ];
    let setup = Setup::new(&regions, 0xF1C0);
    let faultd = Faultd::start(&[]);
    let socket = setup.socket("fc.sock");
    faultd
        .listen_firecracker("fc-a", &socket, &setup.snapshot_path(), None, None)
        .unwrap();
    let mut restore = setup.restore(RamPageSize::Size4K);

    // The load: one message, then Firecracker's own thread reads guest pages at once (device
    // state restore), without waiting for anything from faultd.
    restore.send(&socket, WireForm::Current).unwrap();
    let load: Vec<(usize, u64)> = (0..200u64)
        .map(|i| ((i % 2) as usize, (i * 7919 % 16384) * PAGE))
        .collect();
    let got = copy_with_timeout(
        load.iter().map(|&(r, off)| restore.addr(r, off)).collect(),
        PAGE as usize,
        T,
    );

    for (&(r, off), page) in load.iter().zip(&got) {
        assert!(
            *page == setup.file_bytes(r, off, PAGE as usize),
            "load thread: region {r} offset {off:#x} differs from the snapshot"
        );
    }

    // A real KVM guest over the same anonymous memory verifies random pages of both regions.
    let work = [
        (3000, 0, (96 * MIB / PAGE) as u32),
        (3000, (128 * MIB / PAGE) as u32, (64 * MIB / PAGE) as u32),
    ];
    let mut vm = setup.vm(&restore);
    let reports = vm
        .run(
            work.iter()
                .map(|&(touches, first_page, page_count)| Workload::Verify {
                    seed: setup.seed,
                    touches,
                    first_page,
                    page_count,
                })
                .collect(),
            &|_, _| {},
        )
        .expect("guest run");
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(
            r.mismatches, 0,
            "vCPU {i}: first mismatch at {:?}",
            r.first_mismatch_gpa
        );
    }

    // Whole pages the guest touched equal the file, not only the dwords it checked.
    let guest: BTreeSet<(usize, u64)> = work
        .iter()
        .enumerate()
        .flat_map(|(r, &(t, first, count))| {
            page_sequence(setup.seed, t, first, count)
                .into_iter()
                .map(move |p| (r, p as u64 * PAGE - regions[r].gpa))
        })
        .collect();
    let sample: Vec<(usize, u64)> = guest.iter().copied().step_by(7).collect();
    let pages = copy_with_timeout(
        sample
            .iter()
            .map(|&(r, off)| restore.addr(r, off))
            .collect(),
        PAGE as usize,
        T,
    );
    for (&(r, off), page) in sample.iter().zip(&pages) {
        assert!(
            *page == setup.file_bytes(r, off, PAGE as usize),
            "guest page: region {r} offset {off:#x} differs from the snapshot"
        );
    }
    let touched: BTreeSet<(usize, u64)> = guest
        .union(&load.iter().copied().collect())
        .copied()
        .collect();
    let stats = only_session(faultd.settled_vm_stats("fc-a-1", |s| {
        s.first()
            .is_some_and(|s| s.file_fills >= touched.len() as u64)
    }));
    assert_eq!(stats.file_fills, touched.len() as u64);
    assert_eq!(stats.resident_bytes, touched.len() as u64 * PAGE);
    assert_eq!(stats.guest_bytes, 160 * MIB);
    assert_eq!((stats.zero_fills, stats.errors), (0, 0));

    // Balloon inflation: the first 1 MiB of region 1 is discarded; it reads back as zeros,
    // the pages around it still hold the snapshot.
    let resident_in_balloon = touched
        .iter()
        .filter(|&&(r, off)| r == 1 && off < MIB)
        .count() as u64;
    assert!(
        resident_in_balloon > 0,
        "the balloon must hit resident pages"
    );
    balloon_discard(restore.addr(1, 0), MIB, T);
    let probe: Vec<u64> = (0..MIB / PAGE + 4).map(|p| p * PAGE).collect();
    let after = copy_with_timeout(
        probe.iter().map(|&off| restore.addr(1, off)).collect(),
        PAGE as usize,
        T,
    );
    for (&off, page) in probe.iter().zip(&after) {
        if off < MIB {
            assert!(
                page.iter().all(|&b| b == 0),
                "ballooned offset {off:#x} is not zero"
            );
        } else {
            assert!(
                *page == setup.file_bytes(1, off, PAGE as usize),
                "offset {off:#x} next to the balloon differs from the snapshot"
            );
        }
    }
    let stats = only_session(faultd.settled_vm_stats("fc-a-1", |s| {
        s.first().is_some_and(|s| s.zero_fills >= MIB / PAGE)
    }));
    assert_eq!(stats.discarded_pages, resident_in_balloon);
    assert_eq!(stats.zero_fills, MIB / PAGE);
    assert_eq!(stats.errors, 0);

    // The guest's check can fail: verified against another seed's pattern, the snapshot's
    // pages mismatch.
    let wrong = vm
        .run(
            work.iter()
                .map(|&(_, first_page, page_count)| Workload::Verify {
                    seed: setup.seed + 1,
                    touches: 50,
                    first_page,
                    page_count,
                })
                .collect(),
            &|_, _| {},
        )
        .expect("guest run");
    assert!(wrong.iter().all(|r| r.mismatches > 0));
    println!(
        "restore: {} pages from the file, {} balloon pages zero-filled; faultd's service p50 \
         {:.1} us, p99 {:.1} us",
        stats.file_fills, stats.zero_fills, stats.latency_us.p50, stats.latency_us.p99
    );

    // Firecracker exits: the hang-up ends the session.
    drop(vm);
    restore.hang_up();
    assert!(faultd.wait_for_log("session ended", T), "{}", faultd.log());
    assert!(faultd
        .settled_vm_stats("fc-a-1", |s| s.is_empty())
        .is_empty());
}

#[test]
fn firecracker_restore_on_2mib_hugetlb_memory_gets_whole_huge_pages_from_the_snapshot() {
    const SIZE: u64 = 64 * MIB;
    let _reserved = HugePages::reserve(SIZE / HUGE);
    let regions = [Region {
        gpa: 0,
        size: SIZE,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 0xB16);
    let faultd = Faultd::start(&[]);
    let socket = setup.socket("fc.sock");
    faultd
        .listen_firecracker("fc-huge", &socket, &setup.snapshot_path(), None, None)
        .unwrap();
    let mut restore = setup.restore(RamPageSize::Size2M);
    restore.send(&socket, WireForm::Current).unwrap();
    // The guest works in the first half only: the second half's huge pages stay absent.
    let small_pages = (SIZE / PAGE / 2) as u32;
    let mut vm = setup.vm(&restore);

    let reports = vm
        .run(
            vec![Workload::Verify {
                seed: setup.seed,
                touches: 400,
                first_page: 0,
                page_count: small_pages,
            }],
            &|_, _| {},
        )
        .unwrap();

    assert_eq!(
        reports[0].mismatches, 0,
        "{:?}",
        reports[0].first_mismatch_gpa
    );
    let huge: BTreeSet<u64> = page_sequence(setup.seed, 400, 0, small_pages)
        .into_iter()
        .map(|p| p as u64 * PAGE / HUGE)
        .collect();
    let first = *huge.iter().next().unwrap() * HUGE;
    let page = copy_with_timeout(vec![restore.addr(0, first)], HUGE as usize, T);
    assert!(page[0] == setup.file_bytes(0, first, HUGE as usize));
    let stats = only_session(faultd.settled_vm_stats("fc-huge-1", |s| {
        s.first().is_some_and(|s| s.file_fills >= huge.len() as u64)
    }));
    assert_eq!(stats.file_fills, huge.len() as u64);
    assert_eq!(stats.resident_bytes, huge.len() as u64 * HUGE);
    assert!(huge.len() < (SIZE / HUGE) as usize);

    // hugetlb memory is not paged out by the kernel: an eviction is refused saying so, and
    // nothing changes.
    let out = std::process::Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(faultd.socket())
        .args(["ctl", "evict", "--vm", "fc-huge-1", "--pages", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("hugetlb memory, which the kernel does not page out"),
        "{err}"
    );
    let after = only_session(faultd.vm_stats("fc-huge-1"));
    assert_eq!(
        (after.resident_bytes, after.evictions),
        (stats.resident_bytes, 0)
    );
}

#[test]
fn bad_firecracker_connections_are_refused_with_the_reason_logged_and_a_live_restore_keeps_being_served(
) {
    let regions = [Region {
        gpa: 0,
        size: 8 * MIB,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 7);
    let faultd = Faultd::start(&[]);
    let live_socket = setup.socket("live.sock");
    faultd
        .listen_firecracker("fc-live", &live_socket, &setup.snapshot_path(), None, None)
        .unwrap();
    let mut live = setup.restore(RamPageSize::Size4K);
    live.send(&live_socket, WireForm::Current).unwrap();
    let checks = std::cell::Cell::new(0u64);
    let check_live = |what: &str| {
        let off = checks.get() * PAGE;
        checks.set(checks.get() + 1);
        let got = copy_with_timeout(vec![live.addr(0, off)], PAGE as usize, T);
        assert!(
            got[0] == setup.file_bytes(0, off, PAGE as usize),
            "live restore after {what}"
        );
    };
    check_live("start");

    let bad_socket = setup.socket("bad.sock");
    faultd
        .listen_firecracker("fc-bad", &bad_socket, &setup.snapshot_path(), None, None)
        .unwrap();
    let bad = setup.restore(RamPageSize::Size4K);
    let good_json = bad.message(WireForm::Current);
    let base = bad.regions[0].ram.host_addr();
    let region = |base: u64, size: u64, offset: u64| {
        format!(
            r#"{{"base_host_virt_addr":{base},"size":{size},"offset":{offset},"page_size":4096,"page_size_kib":4096}}"#
        )
    };
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    let uffd = bad.uffd.as_fd();
    // SAFETY: the userfaultfd syscall takes flags only; the result is checked below.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert!(raw >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd this process owns.
    let no_api = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    // What is wrong, the bytes, the fds, and what faultd's log line must say.
    let cases: Vec<(&str, String, Vec<std::os::fd::BorrowedFd<'_>>, &str)> = vec![
        (
            "not JSON",
            "{not json".into(),
            vec![uffd],
            "message is not valid JSON",
        ),
        (
            "JSON of another shape",
            r#"{"regions":[]}"#.into(),
            vec![uffd],
            "not an array of GuestRegionUffdMapping",
        ),
        ("no fd", good_json.clone(), vec![], "no fd attached"),
        (
            "a uffd without UFFDIO_API",
            good_json.clone(),
            vec![no_api.as_fd()],
            "has not completed UFFDIO_API",
        ),
        (
            "a pipe instead of the uffd",
            good_json.clone(),
            vec![pipe_r.as_fd()],
            "not a userfaultfd",
        ),
        (
            "two fds",
            good_json.clone(),
            vec![uffd, pipe_r.as_fd()],
            "2 fds attached",
        ),
        (
            "regions overlapping in memory",
            format!(
                "[{},{}]",
                region(base, 4 * MIB, 0),
                region(base + MIB, 2 * MIB, 4 * MIB)
            ),
            vec![uffd],
            "overlap in Firecracker's address space",
        ),
        (
            "regions overlapping in the file",
            format!(
                "[{},{}]",
                region(base, 4 * MIB, 0),
                region(base + 4 * MIB, 4 * MIB, MIB)
            ),
            vec![uffd],
            "overlap in the snapshot file",
        ),
        (
            "a region beyond the file",
            format!("[{}]", region(base, 4 * MIB, 6 * MIB)),
            vec![uffd],
            "does not fit the snapshot file",
        ),
        (
            "a page size in KiB",
            good_json.replace(
                r#""page_size":4096,"page_size_kib":4096"#,
                r#""page_size_kib":4"#,
            ),
            vec![uffd],
            "page size 4 must be 4096 or 2097152",
        ),
    ];
    for (what, bytes, fds, needle) in cases {
        let mut conn = send_raw(&bad_socket, bytes.as_bytes(), &fds).unwrap();
        assert!(closed_by_peer(&mut conn, T), "{what}: connection left open");
        assert!(
            faultd.wait_for_log(needle, T),
            "{what}: log lacks {needle:?}:\n{}",
            faultd.log()
        );
        assert!(
            !any_session_of(&faultd, "fc-bad"),
            "{what}: a session was opened"
        );
        check_live(what);
    }

    // Hanging up in the middle of the message.
    let half = &good_json.as_bytes()[..good_json.len() / 2];
    drop(send_raw(&bad_socket, half, &[uffd]).unwrap());
    assert!(faultd.wait_for_log("hung up after", T), "{}", faultd.log());
    check_live("a hang-up mid-message");

    // The live restore's own uffd, sent again on another socket: one uffd serves one session.
    assert!(refused_at_once(
        &bad_socket,
        good_json.as_bytes(),
        &[live.uffd.as_fd()],
        T
    ));
    assert!(
        faultd.wait_for_log("the userfaultfd is held by another live session", T),
        "{}",
        faultd.log()
    );
    assert!(!any_session_of(&faultd, "fc-bad"));
    check_live("the live restore's uffd sent again");

    // Peers that are not the expected process: another uid, another pid.
    let uid_socket = setup.socket("uid.sock");
    faultd
        .listen_firecracker(
            "fc-uid",
            &uid_socket,
            &setup.snapshot_path(),
            Some(4242),
            None,
        )
        .unwrap();
    assert!(refused_at_once(
        &uid_socket,
        good_json.as_bytes(),
        &[uffd],
        T
    ));
    assert!(
        faultd.wait_for_log("peer uid 0 is not the expected uid 4242", T),
        "{}",
        faultd.log()
    );
    let pid_socket = setup.socket("pid.sock");
    let other = faultd.pid() as i32;
    faultd
        .listen_firecracker(
            "fc-pid",
            &pid_socket,
            &setup.snapshot_path(),
            None,
            Some(other),
        )
        .unwrap();
    assert!(refused_at_once(
        &pid_socket,
        good_json.as_bytes(),
        &[uffd],
        T
    ));
    assert!(
        faultd.wait_for_log(&format!("is not the expected pid {other}"), T),
        "{}",
        faultd.log()
    );
    check_live("peers of another uid and pid");

    // The uid rule also hands the socket to that uid, and nobody else may open it.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&uid_socket).unwrap();
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (4242, 0o600)
    );

    let stats = only_session(faultd.settled_vm_stats("fc-live-1", |s| {
        s.first().is_some_and(|s| s.file_fills >= checks.get())
    }));
    assert_eq!(stats.errors, 0);
    assert_eq!(stats.file_fills, checks.get(), "{stats:?}");
}

/// Sends `firecracker_listen` and returns the refusal.
fn listen_refused(faultd: &Faultd, listen: FirecrackerListen) -> (ErrorCode, String) {
    match Client::connect(faultd.socket())
        .unwrap()
        .firecracker_listen(listen.clone())
    {
        Err(ClientError::Refused { code, message }) => (code, message),
        other => panic!("{listen:?}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn firecracker_listen_requests_with_unusable_paths_are_refused_naming_them() {
    let faultd = Faultd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("mem");
    std::fs::write(&snapshot, vec![0u8; 4096]).unwrap();
    let occupied = dir.path().join("file");
    std::fs::write(&occupied, b"x").unwrap();
    let listen = |vm: &str, socket: &Path, snap: &Path| FirecrackerListen {
        vm: vm.into(),
        socket: socket.into(),
        snapshot: Some(snap.into()),
        object: None,
        uid: None,
        pid: None,
    };
    let taken = dir.path().join("taken.sock");
    faultd
        .listen_firecracker("fc-taken", &taken, &snapshot, None, None)
        .unwrap();
    let sock = dir.path().join("a.sock");

    let cases = [
        (
            listen("fc1", Path::new("rel.sock"), &snapshot),
            ErrorCode::BadPath,
            "must be an absolute path",
        ),
        (
            listen("fc1", &sock, &dir.path().join("missing")),
            ErrorCode::BadPath,
            "opening snapshot file",
        ),
        (
            listen("fc1", &sock, dir.path()),
            ErrorCode::BadPath,
            "not a regular file",
        ),
        (
            listen("fc1", &taken, &snapshot),
            ErrorCode::BadPath,
            "already listens on",
        ),
        (
            listen("fc-taken", &sock, &snapshot),
            ErrorCode::BadPath,
            "already listens for VM fc-taken",
        ),
        (
            listen("fc1", &occupied, &snapshot),
            ErrorCode::BadPath,
            "is not a socket",
        ),
        (
            listen("a b", &sock, &snapshot),
            ErrorCode::BadLayout,
            "vm = a b",
        ),
        (
            FirecrackerListen {
                pid: Some(i32::MAX),
                ..listen("fc1", &sock, &snapshot)
            },
            ErrorCode::BadPath,
            "looking up process",
        ),
        (
            FirecrackerListen {
                snapshot: None,
                ..listen("fc1", &sock, &snapshot)
            },
            ErrorCode::BadRequest,
            "names neither a snapshot file nor an object",
        ),
        (
            FirecrackerListen {
                object: Some(faultd_proto::ObjectName {
                    store: "s".into(),
                    key: "k".into(),
                }),
                ..listen("fc1", &sock, &snapshot)
            },
            ErrorCode::BadRequest,
            "names both a snapshot file and an object",
        ),
        (
            FirecrackerListen {
                snapshot: None,
                object: Some(faultd_proto::ObjectName {
                    store: "s".into(),
                    key: "k".into(),
                }),
                ..listen("fc1", &sock, &snapshot)
            },
            ErrorCode::BadRequest,
            "no object store is configured",
        ),
    ];
    for (req, code, needle) in cases {
        let (got, message) = listen_refused(&faultd, req.clone());
        assert_eq!(got, code, "{req:?}: {message}");
        assert!(
            message.contains(needle),
            "{req:?}: {message:?} lacks {needle:?}"
        );
    }
    // Refusals leave nothing behind: the socket path is still free.
    assert!(!sock.exists());
    faultd
        .listen_firecracker("fc1", &sock, &snapshot, None, None)
        .unwrap();
    assert!(sock.exists());
}

#[test]
fn firecracker_listen_from_a_user_that_is_not_root_is_refused_by_the_cli() {
    let faultd = Faultd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("mem");
    std::fs::write(&snapshot, vec![0u8; 4096]).unwrap();
    // Let user nobody reach the control socket at all, so faultd itself must refuse it.
    use std::os::unix::fs::PermissionsExt;
    let open = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
    open(faultd.socket().parent().unwrap(), 0o755).unwrap();
    open(faultd.socket(), 0o666).unwrap();

    let out = std::process::Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(faultd.socket())
        .args([
            "ctl",
            "firecracker-listen",
            "--vm",
            "fc-nobody",
            "--backend-path",
        ])
        .arg(dir.path().join("n.sock"))
        .arg("--snapshot")
        .arg(&snapshot)
        .uid(65534)
        .output()
        .unwrap();

    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PermissionDenied") && err.contains("the client's uid is 65534"),
        "{err}"
    );
    assert!(!dir.path().join("n.sock").exists());
}

use std::os::unix::process::CommandExt;

#[test]
fn cli_listens_and_reports_stats_and_a_config_entry_listens_from_the_start() {
    let regions = [Region {
        gpa: 0,
        size: 4 * MIB,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 99);
    let static_socket = setup.socket("static.sock");
    let config = setup.dir.path().join("faultd.toml");
    std::fs::write(
        &config,
        format!(
            "[[firecracker]]\nvm = \"fc-static\"\nsocket = \"{}\"\nsnapshot = \"{}\"\n",
            static_socket.display(),
            setup.snapshot_path().display()
        ),
    )
    .unwrap();
    let faultd = Faultd::start(&["--config", config.to_str().unwrap()]);
    let ctl = |args: &[&str]| ctl(&faultd, args);
    let cli_socket = setup.socket("cli.sock");
    let said = ctl(&[
        "firecracker-listen",
        "--vm",
        "fc-cli",
        "--backend-path",
        cli_socket.to_str().unwrap(),
        "--snapshot",
        setup.snapshot_path().to_str().unwrap(),
    ]);
    assert!(said.contains("listens for Firecracker VM fc-cli"), "{said}");

    let mut restores = Vec::new();
    for (vm, socket) in [("fc-static", &static_socket), ("fc-cli", &cli_socket)] {
        let mut r = setup.restore(RamPageSize::Size4K);
        r.send(socket, WireForm::Current).unwrap();
        let offs: Vec<u64> = (0..10).map(|p| p * 3 * PAGE).collect();
        let got = copy_with_timeout(
            offs.iter().map(|&o| r.addr(0, o)).collect(),
            PAGE as usize,
            T,
        );
        for (&o, page) in offs.iter().zip(&got) {
            assert!(
                *page == setup.file_bytes(0, o, PAGE as usize),
                "{vm} offset {o:#x}"
            );
        }
        restores.push(r);
    }
    faultd.settled_vm_stats("fc-cli-1", |s| {
        s.first().is_some_and(|s| s.file_fills >= 10)
    });
    // `--json` prints faultd's answer object whole.
    let printed =
        match serde_json::from_str(&ctl(&["stats", "--vm", "fc-cli-1", "--json"])).unwrap() {
            faultd_proto::Response::SessionDetail { sessions, .. } => sessions,
            other => panic!("not a session_detail answer: {other:?}"),
        };
    assert_eq!(printed.len(), 1);
    assert_eq!(printed[0].kind, faultd_proto::SessionKind::Firecracker);
    assert_eq!(printed[0].stats.file_fills, 10);
}

#[test]
fn a_config_entry_whose_snapshot_is_missing_stops_faultd_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("faultd.toml");
    std::fs::write(
        &config,
        format!(
            "[[firecracker]]\nvm = \"fc0\"\nsocket = \"{}\"\nsnapshot = \"{}\"\n",
            dir.path().join("fc.sock").display(),
            dir.path().join("missing").display()
        ),
    )
    .unwrap();

    let out = std::process::Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(dir.path().join("faultd.sock"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();

    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listening for Firecracker VM fc0: opening snapshot file"),
        "{err}"
    );
    assert!(!dir.path().join("faultd.sock").exists());
}

/// Environment variable that turns [`legacy_firecracker_child`] into an old Firecracker
/// restoring through the socket it names.
const CHILD_SOCKET: &str = "FAULTD_TEST_LEGACY_FC_SOCKET";

/// Not a test on its own: run by
/// [`an_older_firecracker_that_closes_its_socket_is_served_until_its_process_exits`] as a
/// separate process playing a Firecracker older than 1.12 (it must exit for its session to
/// end). Ignored, so that it never counts as a test that passed; without the environment
/// variable it fails.
#[test]
#[ignore = "a child process of an_older_firecracker_that_closes_its_socket_is_served_until_its_process_exits, which runs it"]
fn legacy_firecracker_child() {
    let socket = std::env::var_os(CHILD_SOCKET).unwrap_or_else(|| {
        panic!("{CHILD_SOCKET} is not set: run by an_older_firecracker_that_closes_its_socket_is_served_until_its_process_exits")
    });
    let snapshot =
        std::fs::File::open(std::env::var_os("FAULTD_TEST_LEGACY_FC_SNAPSHOT").unwrap()).unwrap();
    let mut restore = FcRestore::new(&[(4 * MIB, 0)], RamPageSize::Size4K).unwrap();
    restore.send(Path::new(&socket), WireForm::Legacy).unwrap();
    // The socket is closed already; the pages are still served.
    std::thread::sleep(Duration::from_millis(100));
    let offs: Vec<u64> = (0..16).map(|p| p * 5 * PAGE).collect();
    let got = copy_with_timeout(
        offs.iter().map(|&o| restore.addr(0, o)).collect(),
        PAGE as usize,
        T,
    );
    for (&o, page) in offs.iter().zip(&got) {
        let mut want = vec![0u8; PAGE as usize];
        snapshot.read_exact_at(&mut want, o).unwrap();
        assert!(*page == want, "offset {o:#x}");
    }
    println!("legacy child served");
}

#[test]
fn an_older_firecracker_that_closes_its_socket_is_served_until_its_process_exits() {
    let regions = [Region {
        gpa: 0,
        size: 4 * MIB,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 5);
    let faultd = Faultd::start(&[]);
    let socket = setup.socket("old.sock");
    faultd
        .listen_firecracker("fc-old", &socket, &setup.snapshot_path(), None, None)
        .unwrap();

    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "legacy_firecracker_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_SOCKET, &socket)
        .env("FAULTD_TEST_LEGACY_FC_SNAPSHOT", setup.snapshot_path())
        .output()
        .unwrap();

    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("legacy child served"),
        "{text}"
    );
    assert!(
        faultd.log().contains("\"peer process exit\""),
        "{}",
        faultd.log()
    );
    // The child has exited: its session ends.
    assert!(faultd.wait_for_log("session ended", T), "{}", faultd.log());
    assert!(faultd
        .settled_vm_stats("fc-old-1", |s| s.is_empty())
        .is_empty());
}

/// Runs `faultd ctl ARGS` against `faultd`; panics with its stderr unless it succeeds.
fn ctl(faultd: &Faultd, args: &[&str]) -> String {
    let out = std::process::Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(faultd.socket())
        .arg("ctl")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The eviction `faultd ctl evict --json` printed (faultd's answer object whole).
fn evicted_answer(printed: &str) -> faultd_proto::SessionEvicted {
    match serde_json::from_str(printed).unwrap() {
        faultd_proto::Response::SessionEvicted(e) => e,
        other => panic!("not an eviction's answer: {other:?}"),
    }
}

#[test]
fn firecracker_memory_is_paged_out_to_swap_by_ctl_evict_and_keeps_every_write() {
    let _swap = faultd_tests::Swap::enable();
    let regions = [Region {
        gpa: 0,
        size: 16 * MIB,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 0x5A9);
    let faultd = Faultd::start(&[]);
    let socket = setup.socket("fc.sock");
    faultd
        .listen_firecracker("fc-swap", &socket, &setup.snapshot_path(), None, None)
        .unwrap();
    let mut restore = setup.restore(RamPageSize::Size4K);
    restore.send(&socket, WireForm::Current).unwrap();

    // Every other page, in order: the order faultd installs them in, so the order the oldest
    // go in; and no two touched pages adjacent, so each is a range of its own to page out.
    const TOUCHED: u64 = 1024;
    let offs: Vec<u64> = (0..TOUCHED).map(|p| p * 2 * PAGE).collect();
    let addrs: Vec<u64> = offs.iter().map(|&o| restore.addr(0, o)).collect();
    let got = copy_with_timeout(addrs.clone(), PAGE as usize, T);
    for (&o, page) in offs.iter().zip(&got) {
        assert!(
            *page == setup.file_bytes(0, o, PAGE as usize),
            "offset {o:#x}"
        );
    }
    // The VM writes to every page after the restore: a mark over the first 8 bytes. The pages
    // are present (just read), so the writes do not fault.
    let mark = |i: usize| 0x5eed_0000_0000_0000u64 | i as u64;
    for (i, &a) in addrs.iter().enumerate() {
        // SAFETY: `a` is a page of the stand-in's live anonymous mapping, 8-byte aligned, and
        // present (read above); a volatile write creates no reference.
        unsafe { std::ptr::write_volatile(a as *mut u64, mark(i)) };
    }
    let before = only_session(faultd.settled_vm_stats("fc-swap-1", |s| {
        s.first().is_some_and(|s| s.file_fills >= TOUCHED)
    }));
    assert_eq!(before.resident_bytes, TOUCHED * PAGE);
    assert!(own_pages(&addrs).iter().all(|&(ram, _)| ram));

    // The kernel may leave a page in RAM: one it has not put on its LRU lists yet (it batches
    // those per CPU, and a page-out drains only its own CPU's batch), so a few of a request
    // can stay. The report must then say so, and the pagemap must agree with it page by page.
    // (15 pages per CPU's batch: the kernel's folio batch size.)
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let stay_at_most = 15 * cpus;
    let in_swap = |from: usize, to: usize| {
        own_pages(&addrs[from..to])
            .iter()
            .filter(|&&p| p == (false, true))
            .count() as u64
    };

    // The 600 oldest pages.
    let done = evicted_answer(&ctl(
        &faultd,
        &["evict", "--vm", "fc-swap-1", "--pages", "600", "--json"],
    ));
    println!("--pages 600: {done:?}");
    assert_eq!((done.evicted + done.failed, done.zero), (600, 0));
    assert!(done.failed <= stay_at_most, "{done:?}");
    assert_eq!(
        in_swap(0, 600),
        done.evicted,
        "the report and the pagemap disagree"
    );
    assert!(
        own_pages(&addrs[600..]).iter().all(|&(ram, _)| ram),
        "young ones left RAM"
    );
    assert_eq!(done.resident_bytes, (TOUCHED - done.evicted) * PAGE);
    let mut evicted = done.evicted;

    // A range: the next 200 touched pages (guest 1200 * 4 KiB onwards).
    let range = format!("{:#x}:{:#x}", offs[600], offs[800] - offs[600]);
    let done = evicted_answer(&ctl(
        &faultd,
        &["evict", "--vm", "fc-swap-1", "--range", &range, "--json"],
    ));
    println!("--range {range}: {done:?}");
    // Pages of the range already in swap are not asked for again (none here: the range is
    // past the first request's pages).
    assert_eq!(done.evicted + done.failed, 200);
    assert!(done.failed <= stay_at_most, "{done:?}");
    assert_eq!(in_swap(600, 800), done.evicted);
    assert!(own_pages(&addrs[800..]).iter().all(|&(ram, _)| ram));
    evicted += done.evicted;
    assert_eq!(done.resident_bytes, (TOUCHED - evicted) * PAGE);
    assert!(evicted >= 800 - 2 * stay_at_most);

    // Read back: the kernel swaps the pages in (no fault reaches faultd), and each holds the
    // VM's write over the snapshot's bytes, not the snapshot again.
    let back = copy_with_timeout(addrs.clone(), PAGE as usize, T);
    for (i, (&o, page)) in offs.iter().zip(&back).enumerate() {
        assert_eq!(
            u64::from_ne_bytes(page[..8].try_into().unwrap()),
            mark(i),
            "offset {o:#x} lost the VM's write"
        );
        assert!(
            page[8..] == setup.file_bytes(0, o, PAGE as usize)[8..],
            "offset {o:#x} differs from the snapshot"
        );
    }
    let after = only_session(faultd.settled_vm_stats("fc-swap-1", |s| {
        s.first()
            .is_some_and(|s| s.resident_bytes == TOUCHED * PAGE)
    }));
    assert_eq!(after.resident_bytes, TOUCHED * PAGE);
    assert_eq!(
        (
            after.vcpu_faults,
            after.file_fills,
            after.evictions,
            after.errors
        ),
        (before.vcpu_faults, TOUCHED, evicted, 0)
    );
}

#[test]
fn a_firecracker_restore_under_a_budget_is_paged_out_to_stay_within_it_even_after_swap_ins() {
    let _swap = faultd_tests::Swap::enable();
    let regions = [Region {
        gpa: 0,
        size: 32 * MIB,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 0xB0D6);
    let config = setup.dir.path().join("faultd.toml");
    // 4 MiB per VM: paged out above 95% (3.8 MiB) down to 85% (3.4 MiB).
    std::fs::write(&config, "[budget]\nsession_mib = 4\n").unwrap();
    let faultd = Faultd::start(&["--config", config.to_str().unwrap()]);
    let socket = setup.socket("fc.sock");
    faultd
        .listen_firecracker("fc-budget", &socket, &setup.snapshot_path(), None, None)
        .unwrap();
    let mut restore = setup.restore(RamPageSize::Size4K);
    restore.send(&socket, WireForm::Current).unwrap();

    // 16 MiB touched: four times the budget.
    const TOUCHED: u64 = 4096;
    const LIMIT: u64 = 4 * MIB;
    let offs: Vec<u64> = (0..TOUCHED).map(|p| p * PAGE).collect();
    let addrs: Vec<u64> = offs.iter().map(|&o| restore.addr(0, o)).collect();
    let check = |round: &str| {
        let got = copy_with_timeout(addrs.clone(), PAGE as usize, T);
        for (&o, page) in offs.iter().zip(&got) {
            assert!(
                *page == setup.file_bytes(0, o, PAGE as usize),
                "{round}: offset {o:#x} differs from the snapshot"
            );
        }
    };
    check("restore");
    let st = only_session(faultd.settled_vm_stats("fc-budget-1", |s| {
        s.first()
            .is_some_and(|s| s.file_fills >= TOUCHED && s.resident_bytes <= LIMIT)
    }));
    let in_ram = |a: &[u64]| own_pages(a).iter().filter(|&&(ram, _)| ram).count() as u64;
    println!(
        "after the restore: resident {} KiB (this process's pagemap: {} KiB), {} evictions",
        st.resident_bytes / 1024,
        in_ram(&addrs) * 4,
        st.evictions
    );
    assert!(st.resident_bytes <= LIMIT, "{st:?}");
    assert!(in_ram(&addrs) * PAGE <= LIMIT);
    assert!(st.evictions >= (TOUCHED * PAGE - LIMIT) / PAGE, "{st:?}");

    // The VM reads everything again: the kernel swaps pages back in, which faultd is not told
    // of; its idle check finds the VM over its budget and pages out again.
    check("after swap-ins");
    let st2 = only_session(faultd.settled_vm_stats("fc-budget-1", |s| {
        s.first()
            .is_some_and(|s| s.resident_bytes <= LIMIT && s.evictions > st.evictions)
    }));
    assert!(st2.resident_bytes <= LIMIT, "{st2:?}");
    assert!(in_ram(&addrs) * PAGE <= LIMIT);
    assert!(st2.evictions > st.evictions);
    // Every page came from the snapshot once; after that only the kernel's swap served it.
    assert_eq!(
        (st2.vcpu_faults, st2.file_fills, st2.errors),
        (TOUCHED, TOUCHED, 0),
        "{}",
        faultd.log()
    );
}

#[test]
fn a_kvm_guest_on_a_firecracker_restore_under_a_budget_reads_the_snapshot_and_keeps_its_writes() {
    let _swap = faultd_tests::Swap::enable();
    const SIZE: u64 = 64 * MIB;
    const LIMIT: u64 = 8 * MIB;
    let regions = [Region {
        gpa: 0,
        size: SIZE,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 0xC0DE);
    let config = setup.dir.path().join("faultd.toml");
    std::fs::write(&config, "[budget]\nsession_mib = 8\n").unwrap();
    let faultd = Faultd::start(&["--config", config.to_str().unwrap()]);
    let socket = setup.socket("fc.sock");
    faultd
        .listen_firecracker("fc-kvm", &socket, &setup.snapshot_path(), None, None)
        .unwrap();
    let mut restore = setup.restore(RamPageSize::Size4K);
    restore.send(&socket, WireForm::Current).unwrap();
    let mut vm = setup.vm(&restore);
    let pages = (SIZE / PAGE) as u32;
    let run = |vm: &mut Vm, w: Workload| {
        let r = vm.run(vec![w], &|_, _| {}).expect("guest run");
        (r[0].mismatches, r[0].first_mismatch_gpa)
    };

    // 1. The restore: 4,000 random pages (about 15 MiB, twice the budget) read against the
    //    snapshot while faultd pages the oldest out to stay within 8 MiB.
    let restored = run(
        &mut vm,
        Workload::Verify {
            seed: setup.seed,
            touches: 4000,
            first_page: 0,
            page_count: pages,
        },
    );
    assert_eq!(
        restored,
        (0, None),
        "the guest read a page unlike the snapshot"
    );
    // 2. The guest writes its own pattern to 4,000 random pages and reads it back, pages
    //    going out to swap and coming back (by KVM's fault and the kernel's swap-in) meanwhile.
    let (seed, touches) = (0x51u32, 4000u32);
    let written = run(
        &mut vm,
        Workload::WriteVerify {
            seed,
            touches,
            first_page: 0,
            page_count: pages,
        },
    );
    assert_eq!(written, (0, None), "the guest lost a write while paged out");
    // 3. Once more after the budget pushed most of it out again.
    let st = only_session(faultd.settled_vm_stats("fc-kvm-1", |s| {
        s.first().is_some_and(|s| s.resident_bytes <= LIMIT)
    }));
    let again = run(
        &mut vm,
        Workload::Verify {
            seed,
            touches,
            first_page: 0,
            page_count: pages,
        },
    );
    assert_eq!(again, (0, None), "a page came back from swap wrong");

    let distinct: BTreeSet<u32> = page_sequence(setup.seed, 4000, 0, pages)
        .into_iter()
        .chain(page_sequence(seed, touches, 0, pages))
        .collect();
    let end = only_session(faultd.settled_vm_stats("fc-kvm-1", |s| {
        s.first().is_some_and(|s| s.resident_bytes <= LIMIT)
    }));
    println!(
        "guest touched {} distinct pages ({} MiB) under an 8 MiB budget: {} paged out, resident \
         {} KiB after step 2, {} KiB at the end",
        distinct.len(),
        distinct.len() as u64 * PAGE / MIB,
        end.evictions,
        st.resident_bytes / 1024,
        end.resident_bytes / 1024
    );
    assert!(st.resident_bytes <= LIMIT, "{st:?}");
    assert!(end.resident_bytes <= LIMIT, "{end:?}");
    assert!(
        end.evictions >= distinct.len() as u64 - LIMIT / PAGE,
        "{end:?}"
    );
    // Each page was faulted to faultd once, and filled from the snapshot once; swap did the rest.
    assert_eq!(
        (end.vcpu_faults, end.file_fills, end.errors),
        (distinct.len() as u64, distinct.len() as u64, 0),
        "{}",
        faultd.log()
    );
}

#[test]
fn a_firecracker_restore_is_served_again_after_faultd_is_killed_and_started_again_by_its_service_manager(
) {
    let regions = [Region {
        gpa: 0,
        size: 16 * MIB,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 0x4E57);
    let manager = faultd_tests::service_manager::ServiceManager::new(setup.dir.path());
    let mut faultd = Faultd::start_managed(&manager, &[]);
    let socket = setup.socket("fc.sock");
    faultd
        .listen_firecracker("fc-kept", &socket, &setup.snapshot_path(), None, None)
        .unwrap();
    let mut restore = setup.restore(RamPageSize::Size4K);
    restore.send(&socket, WireForm::Current).unwrap();

    // Before the crash: pages 0..64 restored, and written over by the VM (a mark in their
    // first 8 bytes); a balloon takes 1 MiB at 8 MiB, some of it restored before.
    let touched: Vec<u64> = (0..64).map(|p| p * PAGE).collect();
    let addrs: Vec<u64> = touched.iter().map(|&o| restore.addr(0, o)).collect();
    copy_with_timeout(addrs.clone(), PAGE as usize, T);
    let mark = |i: usize| 0x6b65_7074_0000_0000u64 | i as u64;
    for (i, &a) in addrs.iter().enumerate() {
        // SAFETY: a present page (read above) of the stand-in's live mapping, 8-byte aligned.
        unsafe { std::ptr::write_volatile(a as *mut u64, mark(i)) };
    }
    let balloon = 8 * MIB;
    copy_with_timeout(vec![restore.addr(0, balloon)], PAGE as usize, T);
    balloon_discard(restore.addr(0, balloon), MIB, T);
    faultd.settled_vm_stats("fc-kept-1", |s| {
        s.first().is_some_and(|s| s.discarded_pages == 1)
    });
    // The snapshot the listener opened is kept beside the session.
    let (snap, name) = ("faultd-fcsnap-fc-kept-1", "faultd-fc-fc-kept-1");
    assert_eq!(
        manager.wait_for_store(&[snap, name, name, name], T),
        [snap, name, name, name],
        "the session was not put in the fd store:\n{}",
        faultd.log()
    );
    // Kept until faultd removes it: not dropped by the manager on a hang-up it polls.
    assert!(
        manager
            .messages()
            .iter()
            .any(|m| m.contains("FDSTORE=1") && m.contains("FDPOLL=0")),
        "{:?}",
        manager.messages()
    );

    // The crash. While faultd is down the VM faults on pages never restored and on ballooned
    // ones: those threads wait.
    faultd.kill9();
    let waiting: Vec<u64> = [
        (0..32).map(|p| (100 + p * 5) * PAGE).collect::<Vec<_>>(),
        vec![balloon, balloon + 17 * PAGE],
    ]
    .concat();
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let addrs: Vec<u64> = waiting.iter().map(|&o| restore.addr(0, o)).collect();
        std::thread::spawn(move || {
            let _ = tx.send(copy_with_timeout(
                addrs,
                PAGE as usize,
                Duration::from_secs(60),
            ));
        });
    }
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a fault was served with faultd down"
    );

    // The service manager starts faultd again and passes it the kept fds.
    faultd.restart();
    let got = rx
        .recv_timeout(T)
        .expect("faults waiting across the restart were not served");
    for (&o, page) in waiting.iter().zip(&got) {
        if (balloon..balloon + MIB).contains(&o) {
            assert!(page.iter().all(|&b| b == 0), "ballooned {o:#x} is not zero");
        } else {
            assert!(
                *page == setup.file_bytes(0, o, PAGE as usize),
                "offset {o:#x}"
            );
        }
    }
    // The pages restored before the crash still hold the VM's writes (not the file again).
    let before = copy_with_timeout(addrs, PAGE as usize, T);
    for (i, page) in before.iter().enumerate() {
        assert_eq!(u64::from_ne_bytes(page[..8].try_into().unwrap()), mark(i));
    }
    let log = faultd.log();
    assert!(
        log.contains("serving a Firecracker restore again after a faultd restart"),
        "{log}"
    );
    let st = only_session(faultd.settled_vm_stats("fc-kept-1", |s| {
        s.first()
            .is_some_and(|s| s.file_fills + s.zero_fills >= waiting.len() as u64)
    }));
    assert_eq!(
        (st.file_fills, st.zero_fills, st.errors),
        (32, 2, 0),
        "{st:?}"
    );

    // A stop (SIGTERM, as `systemctl restart` sends) keeps it too, with a balloon made since.
    let balloon2 = 12 * MIB;
    copy_with_timeout(vec![restore.addr(0, balloon2)], PAGE as usize, T);
    balloon_discard(restore.addr(0, balloon2), MIB, T);
    faultd.settled_vm_stats("fc-kept-1", |s| {
        s.first().is_some_and(|s| s.discarded_pages == 1)
    });
    assert!(faultd.terminate().success(), "{}", faultd.log());
    assert_eq!(manager.stored_names(), [snap, name, name, name]);
    faultd.restart();
    let after_stop = copy_with_timeout(
        vec![restore.addr(0, balloon2), restore.addr(0, 14 * MIB)],
        PAGE as usize,
        T,
    );
    assert!(
        after_stop[0].iter().all(|&b| b == 0),
        "ballooned page not zero"
    );
    assert!(after_stop[1] == setup.file_bytes(0, 14 * MIB, PAGE as usize));

    // A second VM, restored now, whose Firecracker will exit while faultd is down.
    let socket2 = setup.socket("fc2.sock");
    faultd
        .listen_firecracker("fc-gone", &socket2, &setup.snapshot_path(), None, None)
        .unwrap();
    let mut restore2 = setup.restore(RamPageSize::Size4K);
    restore2.send(&socket2, WireForm::Current).unwrap();
    copy_with_timeout(vec![restore2.addr(0, 0)], PAGE as usize, T);
    balloon_discard(restore2.addr(0, 0), MIB, T); // so its store has a journal
                                                  // Counted after the journal record is written.
    faultd.settled_vm_stats("fc-gone-1", |s| {
        s.first().is_some_and(|s| s.discarded_pages == 1)
    });
    let (snap2, name2) = ("faultd-fcsnap-fc-gone-1", "faultd-fc-fc-gone-1");
    let both = [snap, name, name, name, snap2, name2, name2, name2];
    assert_eq!(manager.wait_for_store(&both, T), both);
    // A socket without a uid rule is the operator's: its VMs' stores are root's.
    let store_dir = faultd.store_dir().join("0");
    let files = |vm: &str| {
        ["pages", "journal"]
            .iter()
            .filter(|ext| store_dir.join(format!("{vm}.{ext}")).exists())
            .count()
    };
    assert!(files("fc-gone-1") > 0, "fc-gone has no store to clean up");

    // The first Firecracker exits: its session ends and leaves the fd store.
    restore.hang_up();
    assert!(faultd.wait_for_log("session ended", T), "{}", faultd.log());
    assert_eq!(
        manager.wait_for_store(&[snap2, name2, name2, name2], T),
        [snap2, name2, name2, name2]
    );

    // The second exits while faultd is down: the next faultd drops it, fd store and store.
    faultd.kill9();
    restore2.hang_up();
    faultd.restart();
    assert!(
        faultd.wait_for_log("a kept Firecracker VM ended while faultd was down", T),
        "{}",
        faultd.log()
    );
    assert!(manager.wait_for_store(&[], T).is_empty());
    assert_eq!(files("fc-gone-1"), 0, "the gone VM's store was left behind");
    assert!(faultd.vm_stats("fc-gone-1").is_empty());
}

/// Reads every 4 KiB page of every region of `r` (from helper threads, failing after `T` if
/// one is not served) and checks it against the snapshot file, page by page.
fn verify_every_page(setup: &Setup, r: &FcRestore, who: &str) {
    for (n, region) in setup.regions.iter().enumerate() {
        let offs: Vec<u64> = (0..region.size / PAGE).map(|p| p * PAGE).collect();
        let got = copy_with_timeout(
            offs.iter().map(|&o| r.addr(n, o)).collect(),
            PAGE as usize,
            T,
        );
        for (&o, page) in offs.iter().zip(&got) {
            assert!(
                *page == setup.file_bytes(n, o, PAGE as usize),
                "{who}: region {n} offset {o:#x} differs from the snapshot"
            );
        }
    }
}

fn ctl_output(faultd: &Faultd, args: &[&str]) -> std::process::Output {
    std::process::Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(faultd.socket())
        .arg("ctl")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn four_restores_of_one_snapshot_at_once_through_one_listener_are_each_served_every_page() {
    let regions = [
        Region {
            gpa: 0,
            size: 12 * MIB,
            offset: 0,
        },
        Region {
            gpa: 64 * MIB,
            size: 4 * MIB,
            offset: 12 * MIB,
        },
    ];
    let setup = Setup::new(&regions, 0x4444);
    let faultd = Faultd::start(&[]);
    let socket = setup.socket("fleet.sock");
    faultd
        .listen_firecracker("fc-four", &socket, &setup.snapshot_path(), None, None)
        .unwrap();

    // Four Firecrackers connect at once, then all four touch every page at once.
    let mut restores: Vec<FcRestore> = (0..4).map(|_| setup.restore(RamPageSize::Size4K)).collect();
    std::thread::scope(|s| {
        for r in restores.iter_mut() {
            s.spawn(|| r.send(&socket, WireForm::Current).unwrap());
        }
    });
    std::thread::scope(|s| {
        for (i, r) in restores.iter().enumerate() {
            let setup = &setup;
            s.spawn(move || verify_every_page(setup, r, &format!("restore {i}")));
        }
    });

    // Each is its own session, named from the listener, in `ctl sessions` and the metrics.
    let rows = Client::connect(faultd.socket())
        .unwrap()
        .sessions()
        .unwrap();
    let names: BTreeSet<String> = rows.iter().map(|r| r.vm.clone()).collect();
    let want: BTreeSet<String> = (1..=4).map(|n| format!("fc-four-{n}")).collect();
    assert_eq!(names, want, "{rows:?}");
    assert!(rows
        .iter()
        .all(|r| r.kind == faultd_proto::SessionKind::Firecracker));
    let pages = 16 * MIB / PAGE;
    for n in 1..=4 {
        let st = only_session(faultd.settled_vm_stats(&format!("fc-four-{n}"), |s| {
            s.first().is_some_and(|s| s.file_fills >= pages)
        }));
        assert_eq!(
            (st.file_fills, st.errors),
            (pages, 0),
            "fc-four-{n}: {st:?}"
        );
    }
    let table = String::from_utf8(ctl_output(&faultd, &["sessions"]).stdout).unwrap();
    let (_, metrics) = faultd_tests::http_get(&faultd.metrics_addr(), "/metrics");
    for n in 1..=4 {
        assert!(table.contains(&format!("fc-four-{n}")), "{table}");
        assert!(
            metrics.contains(&format!("vm=\"fc-four-{n}\"")),
            "fc-four-{n} not in metrics"
        );
    }

    // Each ends on its own hang-up; the others go on being served.
    restores.remove(0).hang_up();
    let deadline = std::time::Instant::now() + T;
    while Client::connect(faultd.socket())
        .unwrap()
        .sessions()
        .unwrap()
        .len()
        != 3
    {
        assert!(std::time::Instant::now() < deadline, "{}", faultd.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    for r in &restores {
        let got = copy_with_timeout(vec![r.addr(0, PAGE)], PAGE as usize, T);
        assert!(got[0] == setup.file_bytes(0, PAGE, PAGE as usize));
    }
}

#[test]
fn unlisten_removes_the_socket_refuses_new_restores_and_leaves_running_ones_served() {
    let regions = [Region {
        gpa: 0,
        size: 8 * MIB,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 0x0FF);
    let faultd = Faultd::start(&[]);
    let socket = setup.socket("un.sock");
    faultd
        .listen_firecracker("fc-un", &socket, &setup.snapshot_path(), None, None)
        .unwrap();
    let mut running = setup.restore(RamPageSize::Size4K);
    running.send(&socket, WireForm::Current).unwrap();
    let first = copy_with_timeout(vec![running.addr(0, 0)], PAGE as usize, T);
    assert!(first[0] == setup.file_bytes(0, 0, PAGE as usize));

    // Only the uid that added it, or the operator: user nobody is refused, nothing changes.
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let open = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
    open(faultd.socket().parent().unwrap(), 0o755).unwrap();
    open(faultd.socket(), 0o666).unwrap();
    let nobody = std::process::Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(faultd.socket())
        .args(["ctl", "firecracker-unlisten", "fc-un"])
        .uid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&nobody.stderr);
    assert_eq!(nobody.status.code(), Some(4), "{err}");
    assert!(err.contains("only that uid or the operator"), "{err}");
    assert!(socket.exists());

    let out = ctl_output(&faultd, &["firecracker-unlisten", "fc-un"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("no longer listens for Firecracker VM fc-un"),
        "{said}"
    );

    // The socket is gone when the answer comes, and a new Firecracker cannot connect.
    assert!(!socket.exists(), "the socket is still there");
    let e = std::os::unix::net::UnixStream::connect(&socket).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    let st = Client::connect(faultd.socket()).unwrap().status().unwrap();
    assert!(st.firecracker.iter().all(|l| l.vm != "fc-un"), "{st:?}");

    // The running restore is still served, every page.
    verify_every_page(&setup, &running, "the running restore");
    assert_eq!(only_session(faultd.vm_stats("fc-un-1")).errors, 0);

    // A second unlisten names what is wrong; the name can be listened on again.
    let again = ctl_output(&faultd, &["firecracker-unlisten", "fc-un"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("no Firecracker listener named"));
    faultd
        .listen_firecracker("fc-un", &socket, &setup.snapshot_path(), None, None)
        .unwrap();
    let mut next = setup.restore(RamPageSize::Size4K);
    next.send(&socket, WireForm::Current).unwrap();
    let got = copy_with_timeout(vec![next.addr(0, 5 * PAGE)], PAGE as usize, T);
    assert!(got[0] == setup.file_bytes(0, 5 * PAGE, PAGE as usize));
}

#[test]
fn a_listener_added_at_run_time_is_listened_on_again_after_a_restart_with_its_owner() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let regions = [Region {
        gpa: 0,
        size: 4 * MIB,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 0x2E57);
    // User nobody may reach the snapshot, so that a listener may admit it.
    std::fs::set_permissions(setup.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        setup.snapshot_path(),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let mut faultd = Faultd::start(&[]);
    let (kept, owned, gone) = (
        setup.socket("kept.sock"),
        setup.socket("owned.sock"),
        setup.socket("gone.sock"),
    );
    let snapshot = setup.snapshot_path();
    faultd
        .listen_firecracker("fc-kept", &kept, &snapshot, None, None)
        .unwrap();
    faultd
        .listen_firecracker("fc-owned", &owned, &snapshot, Some(65534), None)
        .unwrap();
    faultd
        .listen_firecracker("fc-gone", &gone, &snapshot, None, None)
        .unwrap();
    let out = ctl_output(&faultd, &["firecracker-unlisten", "fc-gone"]);
    assert!(out.status.success());

    let state = faultd.store_dir().join("firecracker-listeners.json");
    let meta = std::fs::metadata(&state).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o600));

    assert!(faultd.terminate().success(), "{}", faultd.log());
    assert!(
        !kept.exists() && !owned.exists(),
        "sockets left after the stop"
    );
    faultd.restart();

    // Both are listened on again, each socket as it was made the first time; the removed
    // one is not.
    let st = Client::connect(faultd.socket()).unwrap().status().unwrap();
    let listening: BTreeSet<String> = st.firecracker.iter().map(|l| l.vm.clone()).collect();
    assert_eq!(
        listening,
        ["fc-kept", "fc-owned"]
            .map(String::from)
            .into_iter()
            .collect(),
        "{}",
        faultd.log()
    );
    assert!(!gone.exists());
    let m = std::fs::symlink_metadata(&owned).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (65534, 0o600));
    let m = std::fs::symlink_metadata(&kept).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o600));
    let mut r = setup.restore(RamPageSize::Size4K);
    r.send(&kept, WireForm::Current).unwrap();
    verify_every_page(&setup, &r, "a restore after the restart");
}

#[test]
fn firecracker_restores_past_the_listener_uid_and_guest_size_limits_are_refused_naming_them() {
    let regions = [Region {
        gpa: 0,
        size: 4 * MIB,
        offset: 0,
    }];
    let setup = Setup::new(&regions, 0x11);
    let faultd = Faultd::start_with_config(
        "[limits]\nrestores_per_listener = 2\nsessions_per_uid = 3\nsession_guest_gib = 1\n",
    );
    let (a, b) = (setup.socket("a.sock"), setup.socket("b.sock"));
    for (vm, s) in [("fc-la", &a), ("fc-lb", &b)] {
        faultd
            .listen_firecracker(vm, s, &setup.snapshot_path(), None, None)
            .unwrap();
    }
    let served = |r: &FcRestore| {
        let got = copy_with_timeout(vec![r.addr(0, PAGE)], PAGE as usize, T);
        assert!(got[0] == setup.file_bytes(0, PAGE, PAGE as usize));
    };
    let mut live = Vec::new();
    for _ in 0..2 {
        let mut r = setup.restore(RamPageSize::Size4K);
        r.send(&a, WireForm::Current).unwrap();
        served(&r);
        live.push(r);
    }

    // A third restore on listener a: refused, closed, logged.
    let third = setup.restore(RamPageSize::Size4K);
    assert!(refused_at_once(
        &a,
        third.message(WireForm::Current).as_bytes(),
        &[third.uffd.as_fd()],
        T
    ));
    assert!(
        faultd.wait_for_log("limit restores_per_listener = 2 reached", T),
        "{}",
        faultd.log()
    );
    drop(third);

    // Listener b: its first restore makes root's third session; a second is past the uid's.
    let mut on_b = setup.restore(RamPageSize::Size4K);
    on_b.send(&b, WireForm::Current).unwrap();
    served(&on_b);
    let fourth = setup.restore(RamPageSize::Size4K);
    assert!(refused_at_once(
        &b,
        fourth.message(WireForm::Current).as_bytes(),
        &[fourth.uffd.as_fd()],
        T
    ));
    assert!(
        faultd.wait_for_log("limit sessions_per_uid = 3 reached", T),
        "{}",
        faultd.log()
    );
    drop(fourth);

    // With room again, a guest over session_guest_gib is refused before anything is built.
    live.remove(0).hang_up();
    assert!(faultd.wait_for_log("session ended", T));
    let big = FcRestore::new(&[(2 << 30, 0)], RamPageSize::Size4K).unwrap();
    assert!(refused_at_once(
        &b,
        big.message(WireForm::Current).as_bytes(),
        &[big.uffd.as_fd()],
        T
    ));
    assert!(
        faultd.wait_for_log("limit session_guest_gib = 1 reached", T),
        "{}",
        faultd.log()
    );
    drop(big);

    let (_, metrics) = faultd_tests::http_get(&faultd.metrics_addr(), "/metrics");
    for limit in [
        "restores_per_listener",
        "sessions_per_uid",
        "session_guest_gib",
    ] {
        assert!(
            metrics.contains(&format!("faultd_refusals_total{{limit=\"{limit}\"}} 1")),
            "{limit} not counted:\n{metrics}"
        );
    }
    // The restores admitted are served throughout.
    served(&live[0]);
    served(&on_b);
}

//! faultd as a separate process serving host-thread faults, and the control protocol's answers
//! to bad input: each bad registration is refused with a clear error, only its own connection
//! is closed, and a live session keeps being served throughout.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use faultd_client::{Client, ClientError, RegionSpec};
use faultd_proto::{BackingDesc, ErrorCode, FdIndex, Register, Request, Response};
use faultd_tests::{
    read_with_timeout, refused_raw, settled_stats, write_with_timeout, zero_register, Faultd, Ram,
};

const T: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

#[test]
fn host_thread_faults_are_served_and_only_touched_pages_become_resident() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", 64 * MIB);
    let mut session = r.serve(&faultd, "host");
    let pages: Vec<u64> = (0..200).map(|i| (i * 37 % 16384) * 4096).collect();

    let before = read_with_timeout(&r.ram, pages.iter().map(|p| p + 11).collect(), T);
    write_with_timeout(
        &r.ram,
        pages.iter().map(|&p| (p + 11, (p / 4096) as u8)).collect(),
        T,
    );
    let after = read_with_timeout(&r.ram, pages.iter().map(|p| p + 11).collect(), T);

    assert!(before.iter().all(|&b| b == 0));
    let want: Vec<u8> = pages.iter().map(|&p| (p / 4096) as u8).collect();
    assert_eq!(after, want);
    let distinct = pages
        .iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let stats = faultd_tests::resident_settled(&mut session, || r.ram.allocated_bytes().unwrap());
    assert_eq!(stats.resident_bytes, distinct * 4096);
    assert_eq!(r.ram.allocated_bytes().unwrap(), distinct * 4096);
    assert_eq!(stats.zero_fills, distinct);
    assert_eq!(stats.errors, 0);
}

#[test]
fn snapshot_backed_ram_reads_exactly_the_files_bytes() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", 4 * MIB);
    // The region starts 8 KiB into the file; each file page holds its page number's low byte
    // at every offset, and a marker at offset 100.
    let mut file = tempfile::tempfile().unwrap();
    for p in 0..(4 * MIB / 4096 + 2) {
        let mut page = vec![p as u8; 4096];
        page[100] = 0xA5;
        file.write_all(&page).unwrap();
    }
    let _session = Client::connect(faultd.socket())
        .unwrap()
        .register(
            "snap",
            &r.uffd,
            &[RegionSpec::snapshot(0, &r.ram, 8192)],
            Some(file.as_fd()),
        )
        .unwrap();

    let offs: Vec<u64> = (0..1024)
        .step_by(7)
        .flat_map(|p| [p * 4096, p * 4096 + 100])
        .collect();
    let got = read_with_timeout(&r.ram, offs.clone(), T);

    for (o, v) in offs.iter().zip(got) {
        let want = if o % 4096 == 100 {
            0xA5
        } else {
            (o / 4096 + 2) as u8
        };
        assert_eq!(v, want, "byte at offset {o:#x}");
    }
}

fn register(r: &Ram, mutate: impl FnOnce(&mut Register)) -> Vec<u8> {
    let mut reg = zero_register("bad", &r.ram);
    mutate(&mut reg);
    faultd_proto::encode(&Request::Register(reg)).unwrap()
}

/// What is wrong, the packet, its fds, the expected code, and a word the message must contain.
type Case<'a> = (
    &'static str,
    Vec<u8>,
    Vec<BorrowedFd<'a>>,
    ErrorCode,
    &'static str,
);

#[test]
fn bad_registrations_are_refused_and_a_live_session_keeps_being_served() {
    let faultd = Faultd::start(&[]);
    let live = Ram::new("live", 16 * MIB);
    let mut live_session = live.serve(&faultd, "live");
    let mut next_live_page = 0u64;
    let mut check_live = || {
        let off = next_live_page * 4096 + 1;
        next_live_page += 1;
        write_with_timeout(&live.ram, vec![(off, 0x5A)], T);
        assert_eq!(read_with_timeout(&live.ram, vec![off], T), vec![0x5A]);
    };

    let r = Ram::new("bad", 8 * MIB);
    let other = Ram::new("other", 8 * MIB);
    let uffd = r.uffd.as_fd();
    let mem = r.ram.memfd();
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    let disk_file = tempfile::tempfile().unwrap();
    disk_file.set_len(8 * MIB).unwrap();

    let cases: Vec<Case<'_>> = vec![
        (
            "not json",
            b"{register".to_vec(),
            vec![],
            ErrorCode::Malformed,
            "malformed",
        ),
        (
            "unknown type",
            br#"{"type":"reboot"}"#.to_vec(),
            vec![],
            ErrorCode::Malformed,
            "reboot",
        ),
        (
            "oversize",
            vec![b' '; 70_000],
            vec![],
            ErrorCode::Oversize,
            "65536",
        ),
        (
            "stats first",
            br#"{"type":"stats"}"#.to_vec(),
            vec![],
            ErrorCode::UnexpectedMessage,
            "register",
        ),
        (
            "version",
            register(&r, |g| g.version = 9),
            vec![uffd, mem],
            ErrorCode::UnsupportedVersion,
            "version 9",
        ),
        (
            "uffd index out of range",
            register(&r, |g| g.uffd = FdIndex(5)),
            vec![uffd, mem],
            ErrorCode::BadFd,
            "fd index 5",
        ),
        (
            "uffd is a pipe",
            register(&r, |_| {}),
            vec![pipe_r.as_fd(), mem],
            ErrorCode::BadFd,
            "not a userfaultfd",
        ),
        (
            "guest RAM on disk, not a memfd",
            register(&r, |_| {}),
            vec![uffd, disk_file.as_fd()],
            ErrorCode::BadFd,
            "memfd",
        ),
        (
            "size not a page multiple",
            register(&r, |g| g.regions[0].size = 4097),
            vec![uffd, mem],
            ErrorCode::BadLayout,
            "size 0x1001",
        ),
        (
            "overlapping regions",
            register(&r, |g| {
                let mut second = g.regions[0].clone();
                second.gpa = 4 * MIB;
                second.hva = other.ram.host_addr();
                second.mem = FdIndex(2);
                g.regions.push(second);
            }),
            vec![uffd, mem, other.ram.memfd()],
            ErrorCode::BadLayout,
            "overlap",
        ),
        (
            "hva is not the memfd's mapping",
            register(&r, |g| g.regions[0].hva = other.ram.host_addr()),
            vec![uffd, mem],
            ErrorCode::BadMapping,
            "another file",
        ),
        (
            "snapshot backing without a snapshot fd",
            register(&r, |g| {
                g.regions[0].backing = BackingDesc::Snapshot { offset: 0 }
            }),
            vec![uffd, mem],
            ErrorCode::BadFd,
            "no snapshot fd",
        ),
        (
            "an fd nobody refers to",
            register(&r, |_| {}),
            vec![uffd, mem, pipe_r.as_fd()],
            ErrorCode::BadFd,
            "fd 2 was attached",
        ),
        (
            "bad vm name",
            register(&r, |g| g.vm = "../../etc".into()),
            vec![uffd, mem],
            ErrorCode::BadLayout,
            "vm =",
        ),
    ];
    for (what, bytes, fds, code, needle) in cases {
        let (got, message) = refused_raw(&faultd, &bytes, &fds);
        assert_eq!(got, code, "{what}: {message}");
        assert!(
            message.contains(needle),
            "{what}: {message:?} lacks {needle:?}"
        );
        check_live();
    }

    // A registered connection that sends a second register loses its session, only it.
    let r2 = Ram::new("twice", 4 * MIB);
    let mut s2 = r2.serve(&faultd, "twice").into_raw();
    s2.send(&register(&r2, |_| {}), &[r2.uffd.as_fd(), r2.ram.memfd()])
        .unwrap();
    assert!(matches!(
        s2.recv_response().unwrap(),
        Response::Error {
            code: ErrorCode::UnexpectedMessage,
            ..
        }
    ));
    assert!(s2.recv().unwrap().is_none());
    check_live();

    // The last fault's thread is woken a moment before faultd counts the fill.
    let stats = faultd_tests::settled_stats(&mut live_session, |s| s.zero_fills >= 15);
    assert_eq!(stats.errors, 0);
    assert!(stats.zero_fills >= 15, "{stats:?}");
}

#[test]
fn hanging_up_ends_the_session_and_releases_its_fds() {
    let faultd = Faultd::start(&[]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", faultd.pid()))
            .unwrap()
            .count()
    };
    let baseline = fds();
    let r = Ram::new("ram", 4 * MIB);
    let session = r.serve(&faultd, "bye");
    assert!(fds() > baseline);

    drop(session);

    let deadline = std::time::Instant::now() + T;
    while fds() > baseline {
        assert!(
            std::time::Instant::now() < deadline,
            "faultd kept the session's fds"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(faultd.log().contains("session ended"));
}

#[test]
fn a_second_faultd_refuses_to_steal_a_live_socket() {
    let faultd = Faultd::start(&[]);
    let out = std::process::Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(faultd.socket())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another faultd is already serving"), "{err}");
}

#[test]
fn client_error_names_the_refusal() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", 4 * MIB);
    let err = Client::connect(faultd.socket())
        .unwrap()
        .register("x y", &r.uffd, &[RegionSpec::zero(0, &r.ram)], None)
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { code: ErrorCode::BadLayout, message } if message.contains("x y")),
        "{err}"
    );
}

#[test]
fn discarded_snapshot_pages_read_as_zero_afterwards() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", 2 * MIB);
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(&vec![0x77; 2 * MIB as usize]).unwrap();
    let mut session = Client::connect(faultd.socket())
        .unwrap()
        .register(
            "balloon",
            &r.uffd,
            &[RegionSpec::snapshot(0, &r.ram, 0)],
            Some(file.as_fd()),
        )
        .unwrap();
    let offs: Vec<u64> = (0..8).map(|p| p * 4096 + 9).collect();
    assert_eq!(read_with_timeout(&r.ram, offs.clone(), T), vec![0x77; 8]);

    // The VMM discards pages 2..6 (as a balloon would). MADV_REMOVE waits until faultd has
    // read the REMOVE event, so it must run while faultd serves.
    let base = r.ram.host_addr() as usize;
    // SAFETY: the range lies inside the live shared mapping; MADV_REMOVE drops its pages and
    // no Rust reference points into guest RAM.
    let rc = unsafe { libc::madvise((base + 2 * 4096) as *mut _, 4 * 4096, libc::MADV_REMOVE) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());

    let want: Vec<u8> = (0..8)
        .map(|p| if (2..6).contains(&p) { 0 } else { 0x77 })
        .collect();
    assert_eq!(read_with_timeout(&r.ram, offs, T), want);
    // Residency is recorded a moment after the fill is counted (see resident_settled).
    let stats = settled_stats(&mut session, |s| {
        s.zero_fills >= 4 && s.resident_bytes == r.ram.allocated_bytes().unwrap()
    });
    assert_eq!(stats.discarded_pages, 4);
    assert_eq!((stats.file_fills, stats.zero_fills), (8, 4));
    assert_eq!(stats.resident_bytes, 8 * 4096);
}

#[test]
fn many_sessions_are_served_concurrently() {
    let faultd = Faultd::start(&[]);
    let rams: Vec<Ram> = (0..12)
        .map(|i| Ram::new(&format!("r{i}"), 8 * MIB))
        .collect();
    let mut sessions: Vec<_> = rams
        .iter()
        .enumerate()
        .map(|(i, r)| r.serve(&faultd, &format!("vm{i}")))
        .collect();

    std::thread::scope(|s| {
        for (i, r) in rams.iter().enumerate() {
            s.spawn(move || {
                let writes = (0..256)
                    .map(|p| (p * 4096 + i as u64, i as u8 + 1))
                    .collect();
                write_with_timeout(&r.ram, writes, T);
            });
        }
    });

    for (i, (r, s)) in rams.iter().zip(&mut sessions).enumerate() {
        let got = read_with_timeout(&r.ram, (0..256).map(|p| p * 4096 + i as u64).collect(), T);
        assert!(got.iter().all(|&b| b == i as u8 + 1), "session {i}");
        assert_eq!(
            settled_stats(s, |st| st.zero_fills >= 256).zero_fills,
            256,
            "session {i}"
        );
    }
}

/// What is wrong, how to attach, the expected code, and a word the message must contain.
type AttachCase<'a> = (
    &'static str,
    Box<dyn Fn(&mut faultd_client::Session) -> Result<u64, ClientError> + 'a>,
    ErrorCode,
    &'static str,
);

/// A ring and an emulated IOMMU table for a device over `ram`, as a VMM would make them.
fn device_fds(ram: &Ram, granule_shift: u32) -> (iopf::ring::RingChannel, std::os::fd::OwnedFd) {
    let ring = iopf::ring::RingChannel::create(64, 64).unwrap();
    let entries = ram.ram.size() >> granule_shift;
    let table =
        iopf::emulated::EmulatedTable::create(granule_shift, 1, iopf::Iova(0), entries).unwrap();
    (ring, table)
}

#[test]
fn bad_device_attachments_are_refused_with_the_reason_named() {
    use faultd_client::{DeviceIommu, DeviceQueue};
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", 4 * MIB);
    let (ring, table) = device_fds(&r, 16);
    let good = |s: &mut faultd_client::Session,
                dev_id,
                ring: &iopf::ring::RingChannel,
                table: &std::os::fd::OwnedFd| {
        s.add_device(
            dev_id,
            DeviceQueue::Ring {
                ring: ring.memfd.as_fd(),
                kick: ring.kick.as_fd(),
                notify: ring.notify.as_fd(),
            },
            DeviceIommu::Emulated {
                table: table.as_fd(),
            },
        )
    };
    let mut s = r.serve(&faultd, "dev");
    assert_eq!(good(&mut s, 1, &ring, &table).unwrap(), 64 * 1024);

    // The same dev_id again.
    let (ring2, table2) = device_fds(&r, 16);
    let err = good(&mut s, 1, &ring2, &table2).unwrap_err();
    assert!(
        matches!(
            &err,
            ClientError::Refused {
                code: ErrorCode::DuplicateDevice,
                ..
            }
        ),
        "{err}"
    );

    // Each refusal closes the session; every case gets a fresh one next to the live device.
    let wrong_kinds: Vec<AttachCase<'_>> = vec![
        (
            "ring memfd is not a ring",
            Box::new(|s| {
                let (ring, table) = device_fds(&r, 16);
                let junk =
                    faultd_client::GuestRam::new("junk", 4096, faultd_client::RamPageSize::Size4K)
                        .unwrap();
                s.add_device(
                    2,
                    DeviceQueue::Ring {
                        ring: junk.memfd(),
                        kick: ring.kick.as_fd(),
                        notify: ring.notify.as_fd(),
                    },
                    DeviceIommu::Emulated {
                        table: table.as_fd(),
                    },
                )
            }),
            ErrorCode::BadFd,
            "queue",
        ),
        (
            "kick is not an eventfd",
            Box::new(|s| {
                let (ring, table) = device_fds(&r, 16);
                let (p, _w) = nix::unistd::pipe().unwrap();
                s.add_device(
                    2,
                    DeviceQueue::Ring {
                        ring: ring.memfd.as_fd(),
                        kick: p.as_fd(),
                        notify: ring.notify.as_fd(),
                    },
                    DeviceIommu::Emulated {
                        table: table.as_fd(),
                    },
                )
            }),
            ErrorCode::BadFd,
            "queue",
        ),
    ];
    drop(s);
    for (what, attach, code, needle) in wrong_kinds {
        let mut s = r.serve(&faultd, "dev2");
        let err = attach(&mut s).unwrap_err();
        match &err {
            ClientError::Refused { code: c, message } => {
                assert_eq!(*c, code, "{what}: {message}");
                assert!(message.contains(needle), "{what}: {message}");
            }
            other => panic!("{what}: {other}"),
        }
    }
    // A granule the layout does not fit: 2 MiB granules over a 3 MiB region.
    let r3 = Ram::new("r3", 3 * MIB);
    let mut s3 = r3.serve(&faultd, "dev3");
    let (ring3, _) = device_fds(&r3, 12);
    let big = iopf::emulated::EmulatedTable::create(21, 1, iopf::Iova(0), 2).unwrap();
    let err = s3
        .add_device(
            3,
            DeviceQueue::Ring {
                ring: ring3.memfd.as_fd(),
                kick: ring3.kick.as_fd(),
                notify: ring3.notify.as_fd(),
            },
            DeviceIommu::Emulated { table: big.as_fd() },
        )
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { code: ErrorCode::BadLayout, message } if message.contains("granule")),
        "{err}"
    );
    assert!(faultd.log().contains("device attached"));
}

#[test]
fn a_vm_cannot_attach_more_devices_than_configured() {
    use faultd_client::{DeviceIommu, DeviceQueue};
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("f.toml");
    std::fs::write(&cfg, "[device]\nmax_devices = 2\n").unwrap();
    let faultd = Faultd::start(&["--config", cfg.to_str().unwrap()]);
    let r = Ram::new("ram", 4 * MIB);
    let mut s = r.serve(&faultd, "many");
    let mut attach = |dev_id| {
        let (ring, table) = device_fds(&r, 12);
        s.add_device(
            dev_id,
            DeviceQueue::Ring {
                ring: ring.memfd.as_fd(),
                kick: ring.kick.as_fd(),
                notify: ring.notify.as_fd(),
            },
            DeviceIommu::Emulated {
                table: table.as_fd(),
            },
        )
    };
    assert_eq!(attach(1).unwrap(), 4096);
    assert_eq!(attach(2).unwrap(), 4096);
    let err = attach(3).unwrap_err();
    assert!(
        matches!(&err, ClientError::Refused { code: ErrorCode::Busy, message } if message.contains("2 devices")),
        "{err}"
    );
}

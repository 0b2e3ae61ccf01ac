//! `faultd ctl`, the operator's CLI, run as its own process against a real faultd serving real
//! sessions (host threads fault on memfd guest RAM through userfaultfd; one test runs a KVM
//! guest). Each command is checked against what the session itself reports and against the
//! memfd: which pages it holds (SEEK_DATA/SEEK_HOLE) and what they contain.

use std::os::fd::AsFd;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use faultd::ctl::{human_bytes, human_us};
use faultd_proto::{DaemonStatus, SessionDetail, SessionEvicted, SessionKind, SessionRow};
use faultd_tests::{read_with_timeout, settled_stats, write_with_timeout, Faultd, Ram};
use testvmm::{page_sequence, RamSlot, Vm, Workload};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(10);

/// Runs `faultd --socket SOCKET ctl ARGS...`.
fn ctl_at(socket: &Path, args: &[&str]) -> Output {
    std::process::Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(socket)
        .arg("ctl")
        .args(args)
        .output()
        .expect("running faultd ctl")
}

/// Runs a ctl command that must succeed; its stdout.
fn ctl(faultd: &Faultd, args: &[&str]) -> String {
    let out = ctl_at(faultd.socket(), args);
    assert!(
        out.status.success(),
        "faultd ctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!("$ faultd ctl {}\n{}", args.join(" "), stdout(&out));
    stdout(&out)
}

/// Runs a ctl command that must fail; (exit code, stderr).
fn ctl_fails(socket: &Path, args: &[&str]) -> (i32, String) {
    let out = ctl_at(socket, args);
    assert!(
        !out.status.success(),
        "faultd ctl {args:?} succeeded: {}",
        stdout(&out)
    );
    assert!(
        out.stdout.is_empty(),
        "printed on failure: {}",
        stdout(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("$ faultd ctl {} -> {:?}\n{err}", args.join(" "), out.status);
    (out.status.code().unwrap_or(-1), err)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not the expected JSON ({e}):\n{text}"))
}

/// A table's data lines as cells: columns are separated by at least two spaces and no cell
/// holds two spaces in a row.
fn table_rows(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .skip(1)
        .map(|line| {
            line.trim()
                .split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

/// Writes `tag(page)` to the first and last byte of each page in `pages`, in that order.
fn write_pages(r: &Ram, pages: impl IntoIterator<Item = u64>) {
    let writes = pages
        .into_iter()
        .flat_map(|p| [(p * PAGE, tag(p)), (p * PAGE + PAGE - 1, tag(p) ^ 0xff)])
        .collect();
    write_with_timeout(&r.ram, writes, T);
}

fn tag(page: u64) -> u8 {
    (page % 251) as u8 + 1
}

/// Whether each page in `pages` reads back as [`write_pages`] wrote it.
fn pages_intact(r: &Ram, pages: &[u64]) -> Vec<u64> {
    let offs: Vec<u64> = pages
        .iter()
        .flat_map(|&p| [p * PAGE, p * PAGE + PAGE - 1])
        .collect();
    let got = read_with_timeout(&r.ram, offs, T);
    pages
        .iter()
        .zip(got.chunks(2))
        .filter(|(&p, bytes)| bytes != &[tag(p), tag(p) ^ 0xff])
        .map(|(&p, _)| p)
        .collect()
}

/// The pages the memfd holds now (allocated), by SEEK_DATA/SEEK_HOLE: what faultd dropped is a
/// hole.
fn memfd_pages(r: &Ram) -> Vec<u64> {
    use nix::unistd::{lseek, Whence};
    let fd = r.ram.memfd();
    let size = r.ram.size() as i64;
    let mut pages = Vec::new();
    let mut at = 0i64;
    while at < size {
        let Ok(data) = lseek(fd.as_fd(), at, Whence::SeekData) else {
            break; // ENXIO: no data after `at`
        };
        let hole = lseek(fd.as_fd(), data, Whence::SeekHole).expect("SEEK_HOLE");
        pages.extend((data as u64 / PAGE)..(hole as u64).div_ceil(PAGE));
        at = hole;
    }
    pages
}

#[test]
fn sessions_lists_every_vm_with_the_resident_bytes_its_own_stats_report() {
    let faultd = Faultd::start(&[]);
    let (a, b) = (Ram::new("alpha", 4 * MIB), Ram::new("beta", 8 * MIB));
    let mut sa = a.serve(&faultd, "alpha");
    let mut sb = b.serve(&faultd, "beta");
    write_pages(&a, 0..10);
    write_pages(&b, (0..50).map(|p| p * 3));
    let stats_a = settled_stats(&mut sa, |s| s.resident_bytes == 10 * PAGE);
    let stats_b = settled_stats(&mut sb, |s| s.resident_bytes == 50 * PAGE);

    let rows: Vec<SessionRow> = json(&ctl(&faultd, &["sessions", "--json"]));
    let table = ctl(&faultd, &["sessions"]);

    let names: Vec<&str> = rows.iter().map(|r| r.vm.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    for (row, stats, ram) in [(&rows[0], &stats_a, &a), (&rows[1], &stats_b, &b)] {
        assert_eq!(row.session, stats.session);
        assert_eq!(row.kind, SessionKind::Vmm);
        assert_eq!(row.pid, Some(std::process::id() as i32));
        assert_eq!(row.guest_bytes, ram.ram.size());
        assert_eq!(row.resident_bytes, stats.resident_bytes);
        assert_eq!(row.resident_bytes, ram.ram.allocated_bytes().unwrap());
        assert_eq!(row.vcpu_faults, stats.vcpu_faults);
        assert_eq!(row.stored_pages, 0);
        assert_eq!(row.pinned_bytes, 0);
    }
    // The table says what the JSON says, row by row and cell by cell.
    assert!(table.starts_with("SESSION  VM "), "{table}");
    let expected: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.session.to_string(),
                r.vm.clone(),
                "vmm".into(),
                r.pid.unwrap().to_string(),
                human_bytes(r.guest_bytes),
                human_bytes(r.resident_bytes),
                human_bytes(r.pinned_bytes),
                r.stored_pages.to_string(),
                r.vcpu_faults.to_string(),
                r.device_groups.to_string(),
                human_us(r.vcpu_p99_us, r.vcpu_faults),
                "-".into(),
            ]
        })
        .collect();
    assert_eq!(table_rows(&table), expected);
    assert_eq!(expected[0][5], "40.0 KiB");

    // A session that ends leaves the list.
    drop(sb);
    drop(b);
    let deadline = std::time::Instant::now() + T;
    let left = loop {
        let rows: Vec<SessionRow> = json(&ctl(&faultd, &["sessions", "--json"]));
        if rows.len() == 1 || std::time::Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].vm, "alpha");
}

#[test]
fn evict_pages_takes_the_oldest_pages_and_their_data_faults_back_intact() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("vm-pages", 4 * MIB);
    let mut session = r.serve(&faultd, "vm-pages");
    // Installed in this order: 5, 6, ..., 36. The eight oldest are 5..13.
    let touched: Vec<u64> = (5..37).collect();
    write_pages(&r, touched.iter().copied());
    let before = settled_stats(&mut session, |s| s.resident_bytes == 32 * PAGE);
    assert_eq!(memfd_pages(&r), touched);

    let table = ctl(&faultd, &["evict", "--vm", "vm-pages", "--pages", "8"]);

    let after = session.stats().unwrap();
    assert_eq!(after.resident_bytes, before.resident_bytes - 8 * PAGE);
    assert_eq!(after.evictions, 8);
    assert_eq!(after.stored_pages, 8);
    assert_eq!(r.ram.allocated_bytes().unwrap(), after.resident_bytes);
    assert_eq!(memfd_pages(&r), (13..37).collect::<Vec<u64>>());
    assert_eq!(
        table_rows(&table),
        [[
            before.session.to_string(),
            "vm-pages".into(),
            "8".into(),
            "0".into(),
            "0".into(),
            human_bytes(24 * PAGE),
        ]]
    );

    // By session id, as JSON: the next four oldest.
    let id = before.session.to_string();
    let done: SessionEvicted = json(&ctl(
        &faultd,
        &["evict", "--session", &id, "--pages", "4", "--json"],
    ));
    assert_eq!(
        done,
        SessionEvicted {
            session: before.session,
            vm: "vm-pages".into(),
            evicted: 4,
            zero: 0,
            failed: 0,
            resident_bytes: 20 * PAGE,
        }
    );
    assert_eq!(memfd_pages(&r), (17..37).collect::<Vec<u64>>());

    // Everything comes back from the store as it was written.
    assert_eq!(pages_intact(&r, &touched), Vec::<u64>::new());
    let back = settled_stats(&mut session, |s| {
        s.store_fills == 12 && s.resident_bytes == 32 * PAGE
    });
    assert_eq!(back.store_fills, 12);
    assert_eq!(back.resident_bytes, 32 * PAGE);
    assert_eq!(back.errors, 0, "{}", faultd.log());

    // Asking for more pages than are resident evicts what there is.
    let all: SessionEvicted = json(&ctl(
        &faultd,
        &["evict", "--vm", "vm-pages", "--pages", "1000", "--json"],
    ));
    assert_eq!((all.evicted, all.resident_bytes), (32, 0));
    assert_eq!(memfd_pages(&r), Vec::<u64>::new());
}

#[test]
fn evict_range_evicts_exactly_the_resident_pages_of_that_range() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("vm-range", 4 * MIB);
    let mut session = r.serve(&faultd, "vm-range");
    // Pages 0..48 except 20 and 21: the range 16..32 holds 14 resident pages.
    let touched: Vec<u64> = (0..48).filter(|p| !(20..22).contains(p)).collect();
    write_pages(&r, touched.iter().copied());
    settled_stats(&mut session, |s| s.resident_bytes == 46 * PAGE);

    let done: SessionEvicted = json(&ctl(
        &faultd,
        &[
            "evict",
            "--vm",
            "vm-range",
            "--range",
            "0x10000:64K",
            "--json",
        ],
    ));

    assert_eq!((done.evicted, done.zero, done.failed), (14, 0, 0));
    assert_eq!(done.resident_bytes, 32 * PAGE);
    let kept: Vec<u64> = touched
        .iter()
        .copied()
        .filter(|p| !(16..32).contains(p))
        .collect();
    assert_eq!(memfd_pages(&r), kept);
    let stats = session.stats().unwrap();
    assert_eq!(stats.stored_pages, 14);
    assert_eq!(stats.resident_bytes, r.ram.allocated_bytes().unwrap());
    assert_eq!(pages_intact(&r, &touched), Vec::<u64>::new());
    // The untouched pages of the range are still never-written zero pages.
    assert_eq!(
        read_with_timeout(&r.ram, vec![20 * PAGE, 21 * PAGE], T),
        [0, 0]
    );
}

#[test]
fn stats_by_vm_or_session_shows_fills_latency_and_memory_as_the_session_sees_them() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("vm-stats", 4 * MIB);
    let mut session = r.serve(&faultd, "vm-stats");
    write_pages(&r, 0..20);
    settled_stats(&mut session, |s| s.resident_bytes == 20 * PAGE);
    ctl(&faultd, &["evict", "--vm", "vm-stats", "--pages", "5"]);
    assert_eq!(pages_intact(&r, &[0, 1, 2]), Vec::<u64>::new());
    // The latency is recorded last, after the fill and the residency: all 23 faults are done.
    let own = settled_stats(&mut session, |s| s.latency_us.count == 23);

    let by_vm: Vec<SessionDetail> = json(&ctl(&faultd, &["stats", "--vm", "vm-stats", "--json"]));
    let id = own.session.to_string();
    let by_id: Vec<SessionDetail> = json(&ctl(&faultd, &["--json", "stats", "--session", &id]));
    let table = ctl(&faultd, &["stats", "--session", &id]);

    assert_eq!(by_vm, by_id);
    let d = &by_vm[0];
    assert_eq!((d.vm.as_str(), d.kind), ("vm-stats", SessionKind::Vmm));
    assert_eq!(d.pid, Some(std::process::id() as i32));
    let s = &d.stats;
    assert_eq!(s.session, own.session);
    assert_eq!((s.zero_fills, s.file_fills, s.store_fills), (20, 0, 3));
    assert_eq!((s.evictions, s.stored_pages), (5, 2));
    assert_eq!(s.resident_bytes, own.resident_bytes);
    assert_eq!(s.latency_us.count, 23);
    assert!(s.latency_us.p50 > 0.0 && s.latency_us.p50 <= s.latency_us.p99);
    assert!(s.latency_us.p99 <= s.latency_us.max);
    // The table shows the same figures.
    assert!(
        table.starts_with(&format!(
            "session {id} (vm-stats, vmm, pid {})",
            std::process::id()
        )),
        "{table}"
    );
    assert!(table.contains("filled zero 20, file 0, store 3"), "{table}");
    assert!(table.contains("5 pages evicted"), "{table}");
    assert!(
        table.contains(&format!("resident {}", human_bytes(s.resident_bytes))),
        "{table}"
    );
    let lat = table
        .lines()
        .find(|l| l.starts_with("vcpu fault "))
        .expect("a vcpu latency line");
    let cells: Vec<&str> = lat
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    let l = &s.latency_us;
    assert_eq!(
        cells,
        [
            "vcpu fault".to_string(),
            "23".into(),
            human_us(l.p50, 23),
            human_us(l.p90, 23),
            human_us(l.p99, 23),
            human_us(l.max, 23),
        ]
    );
}

#[test]
fn status_sums_the_sessions_against_the_global_budget_and_lists_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("faultd.toml");
    std::fs::write(&config, "[budget]\nglobal_mib = 64\n").unwrap();
    let faultd = Faultd::start(&["--config", config.to_str().unwrap()]);
    let (a, b) = (Ram::new("st-a", 4 * MIB), Ram::new("st-b", 4 * MIB));
    let mut sa = a.serve(&faultd, "st-a");
    let mut sb = b.serve(&faultd, "st-b");
    write_pages(&a, 0..30);
    write_pages(&b, 0..70);
    settled_stats(&mut sa, |s| s.resident_bytes == 30 * PAGE);
    settled_stats(&mut sb, |s| s.resident_bytes == 70 * PAGE);
    ctl(&faultd, &["evict", "--vm", "st-b", "--pages", "10"]);
    let snapshot = dir.path().join("mem");
    std::fs::write(&snapshot, vec![0u8; 4096]).unwrap();
    let fc_socket = dir.path().join("fc.sock");
    ctl(
        &faultd,
        &[
            "firecracker-listen",
            "--vm",
            "fc-st",
            "--backend-path",
            fc_socket.to_str().unwrap(),
            "--snapshot",
            snapshot.to_str().unwrap(),
        ],
    );

    let st: DaemonStatus = json(&ctl(&faultd, &["status", "--json"]));
    let table = ctl(&faultd, &["status"]);

    assert_eq!(st.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(st.pid, faultd.pid());
    assert_eq!((st.sessions, st.max_sessions), (2, 64));
    assert_eq!(st.guest_bytes, 8 * MIB);
    let resident = sa.stats().unwrap().resident_bytes + sb.stats().unwrap().resident_bytes;
    assert_eq!(st.resident_bytes, resident);
    assert_eq!(st.resident_bytes, 90 * PAGE);
    assert_eq!(st.budget.global_bytes, 64 * MIB);
    assert_eq!((st.budget.high_pct, st.budget.low_pct), (95, 85));
    assert_eq!((st.evicted_pages, st.stored_pages), (10, 10));
    assert_eq!(st.firecracker_listeners, 1);
    assert_eq!(st.firecracker[0].vm, "fc-st");
    assert_eq!(st.firecracker[0].socket, fc_socket);
    assert!(st.store_dir.ends_with("store"), "{:?}", st.store_dir);
    // The table shows the same.
    for want in [
        format!("faultd         {}, pid {}", st.version, st.pid),
        "sessions       2 of 64".into(),
        format!(
            "resident       {}, 0.5% of the global budget 64.0 MiB (evicts above 95%",
            human_bytes(resident)
        ),
        "evicted        10 pages".into(),
        format!("fc-st  {}", fc_socket.display()),
    ] {
        assert!(table.contains(&want), "{want:?} not in:\n{table}");
    }
}

#[test]
fn unknown_vm_or_session_and_bad_ranges_fail_with_a_message_and_touch_no_session() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("vm-ok", 4 * MIB);
    let mut session = r.serve(&faultd, "vm-ok");
    write_pages(&r, 0..8);
    let before = settled_stats(&mut session, |s| s.resident_bytes == 8 * PAGE);
    let socket = faultd.socket();

    let (code, err) = ctl_fails(socket, &["stats", "--vm", "nobody"]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no live session of vm \"nobody\""), "{err}");
    let (code, err) = ctl_fails(socket, &["evict", "--session", "999", "--pages", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("no live session 999"), "{err}");
    let refused = [
        (&["--range", "0:0"][..], "the range is empty"),
        (&["--range", "4M:4K"][..], "0x400000 is in no region"),
        (&["--range", "0x800:4K"][..], "not aligned"),
    ];
    for (args, why) in refused {
        let mut all = vec!["evict", "--vm", "vm-ok"];
        all.extend_from_slice(args);
        let (code, err) = ctl_fails(socket, &all);
        assert_eq!(code, 1);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // Usage errors are clap's (exit 2), before faultd is asked.
    let (code, err) = ctl_fails(socket, &["evict", "--vm", "vm-ok", "--range", "12"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not a range"), "{err}");
    let (code, _) = ctl_fails(socket, &["evict", "--vm", "vm-ok", "--pages", "0"]);
    assert_eq!(code, 2);
    let (code, _) = ctl_fails(socket, &["evict", "--vm", "vm-ok"]);
    assert_eq!(code, 2);
    let (code, _) = ctl_fails(socket, &["stats", "--vm", "vm-ok", "--session", "1"]);
    assert_eq!(code, 2);

    // Nothing happened to the session, and it is still served.
    let after = session.stats().unwrap();
    assert_eq!(after.resident_bytes, before.resident_bytes);
    assert_eq!((after.evictions, after.errors), (0, 0));
    assert_eq!(memfd_pages(&r), (0..8).collect::<Vec<u64>>());
    write_pages(&r, 8..9);
    assert_eq!(pages_intact(&r, &[0, 8]), Vec::<u64>::new());
}

#[test]
fn a_second_vmm_with_a_live_vm_name_is_refused_and_the_first_keeps_it() {
    // The VM name keys the VM's store, so it names one live session: evict --vm and
    // stats --vm always mean that one.
    let faultd = Faultd::start(&[]);
    let (a, b) = (Ram::new("twin", 4 * MIB), Ram::new("twin", 4 * MIB));
    let _sa = a.serve(&faultd, "twin");
    let refused = faultd_client::Client::connect(faultd.socket())
        .unwrap()
        .register(
            "twin",
            &b.uffd,
            &[faultd_client::RegionSpec::zero(0, &b.ram)],
            None,
        )
        .unwrap_err();

    let shown: Vec<SessionDetail> = json(&ctl(&faultd, &["stats", "--vm", "twin", "--json"]));
    let evicted = ctl(&faultd, &["evict", "--vm", "twin", "--pages", "1"]);

    assert!(
        matches!(
            &refused,
            faultd_client::ClientError::Refused { code: faultd_proto::ErrorCode::Busy, message }
                if message.contains("in use by another session")
        ),
        "{refused:?}"
    );
    assert_eq!(shown.len(), 1);
    assert!(evicted.contains(" twin "), "{evicted}");
}

#[test]
fn without_a_running_faultd_every_command_says_so_and_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("faultd.sock");
    // A socket file nobody listens on: what a killed faultd leaves behind.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());

    for (socket, why) in [
        (&missing, "no control socket"),
        (&stale, "nothing accepts connections"),
    ] {
        for args in [
            &["status"][..],
            &["sessions", "--json"],
            &["stats", "--vm", "x"],
        ] {
            let (code, err) = ctl_fails(socket, args);
            assert_eq!(code, 3, "{err}");
            assert_eq!(
                err.trim_end(),
                format!("faultd: not running ({why} at {})", socket.display())
            );
        }
    }
}

#[test]
fn evict_pages_on_a_kvm_guest_frees_memory_and_the_guest_reads_back_what_it_wrote() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("vm-kvm", 16 * MIB);
    let mut session = r.serve(&faultd, "vm-kvm");
    let pages = (16 * MIB / PAGE) as u32;
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: r.ram.host_ptr(),
        size: r.ram.size(),
    }])
    .unwrap();
    vm.set_timeout(Some(Duration::from_secs(120)));
    let (seed, touches) = (0x5eed, 600);
    let wrote = vm
        .run(
            vec![Workload::WriteVerify {
                seed,
                touches,
                first_page: 0,
                page_count: pages,
            }],
            &|_, _| {},
        )
        .expect("guest run");
    assert_eq!(wrote[0].mismatches, 0);
    let distinct = page_sequence(seed, touches, 0, pages)
        .into_iter()
        .collect::<std::collections::BTreeSet<u32>>()
        .len() as u64;
    let before = settled_stats(&mut session, |s| {
        s.vcpu_faults >= distinct && s.resident_bytes == r.ram.allocated_bytes().unwrap()
    });

    let done: SessionEvicted = json(&ctl(
        &faultd,
        &["evict", "--vm", "vm-kvm", "--pages", "200", "--json"],
    ));

    assert_eq!((done.evicted, done.failed), (200, 0));
    assert_eq!(done.resident_bytes, before.resident_bytes - 200 * PAGE);
    assert_eq!(r.ram.allocated_bytes().unwrap(), done.resident_bytes);
    let verify = vm
        .run(
            vec![Workload::Verify {
                seed,
                touches,
                first_page: 0,
                page_count: pages,
            }],
            &|_, _| {},
        )
        .expect("guest run");
    assert_eq!(
        verify[0].mismatches, 0,
        "a page came back from the store wrong"
    );
    let stats = settled_stats(&mut session, |s| s.store_fills >= done.evicted - done.zero);
    assert!(stats.store_fills > 0);
    assert_eq!(stats.errors, 0, "{}", faultd.log());
}

#[test]
fn evict_from_a_user_that_is_not_root_is_refused_and_evicts_nothing() {
    use std::os::unix::process::CommandExt;
    let faultd = Faultd::start(&[]);
    let r = Ram::new("vm-uid", 4 * MIB);
    let mut session = r.serve(&faultd, "vm-uid");
    write_pages(&r, 0..4);
    settled_stats(&mut session, |s| s.resident_bytes == 4 * PAGE);
    // Let user nobody reach the control socket at all, so faultd itself must refuse it.
    use std::os::unix::fs::PermissionsExt;
    let open = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
    open(faultd.socket().parent().unwrap(), 0o755).unwrap();
    open(faultd.socket(), 0o666).unwrap();

    let out = std::process::Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(faultd.socket())
        .args(["ctl", "evict", "--vm", "vm-uid", "--pages", "4"])
        .uid(65534)
        .output()
        .unwrap();

    // The VM is root's: uid 65534 may evict its own VMs only (exit code 4: another user's).
    assert_eq!(out.status.code(), Some(4));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Forbidden") && err.contains("not to uid 65534"),
        "{err}"
    );
    assert_eq!(session.stats().unwrap().evictions, 0);
    assert_eq!(memfd_pages(&r), (0..4).collect::<Vec<u64>>());
}

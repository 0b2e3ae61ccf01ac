//! `faultd ctl`, the operator's CLI, run as its own process against a real faultd serving real
//! sessions (host threads fault on memfd guest RAM through userfaultfd; one test runs a KVM
//! guest). Each command is checked against what the session itself reports and against the
//! memfd: which pages it holds (SEEK_DATA/SEEK_HOLE) and what they contain.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use faultd::ctl::{human_bytes, human_us};
use faultd_proto::{
    DaemonStatus, Response, SessionDetail, SessionEvicted, SessionKind, SessionRef, SessionRow,
};
use faultd_tests::rgw::UNREACHABLE_STORE;
use faultd_tests::{read_with_timeout, settled_stats, write_with_timeout, Faultd, Ram};
use serde_json::Value;
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

/// `faultd ctl ARGS` (with `--json` among them): the protocol's answer it printed, checked to
/// be that object as it is: it decodes as a [`Response`] (which refuses unknown fields), and
/// encoding that again gives the very JSON printed (so no field was left out either).
fn answer(faultd: &Faultd, args: &[&str]) -> Response {
    let text = ctl(faultd, args);
    let printed: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}):\n{text}"));
    let answer: Response = faultd_proto::decode(text.as_bytes())
        .unwrap_or_else(|e| panic!("{args:?} printed no protocol answer ({e}):\n{text}"));
    assert_eq!(
        differences(&printed, &serde_json::to_value(&answer).unwrap(), "answer"),
        Vec::<String>::new()
    );
    answer
}

fn session_rows(answer: Response) -> Vec<SessionRow> {
    match answer {
        Response::Sessions { sessions, more } => {
            assert!(!more, "ctl printed a page, not every session");
            sessions
        }
        other => panic!("not a sessions answer: {other:?}"),
    }
}

fn details(answer: Response) -> Vec<SessionDetail> {
    match answer {
        Response::SessionDetail { sessions, omitted } => {
            assert_eq!(omitted, 0);
            sessions
        }
        other => panic!("not a session_detail answer: {other:?}"),
    }
}

fn evicted(answer: Response) -> SessionEvicted {
    match answer {
        Response::SessionEvicted(e) => e,
        other => panic!("not a session_evicted answer: {other:?}"),
    }
}

fn status(answer: Response) -> DaemonStatus {
    match answer {
        Response::Status(st) => *st,
        other => panic!("not a status answer: {other:?}"),
    }
}

/// Where two JSON values differ, field by field, as "path: printed A, protocol B" (a field
/// one side lacks shows as `None` there).
fn differences(printed: &Value, proto: &Value, at: &str) -> Vec<String> {
    match (printed, proto) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let at = format!("{at}.{k}");
                    match (a.get(k), b.get(k)) {
                        (Some(x), Some(y)) => differences(x, y, &at),
                        (x, y) => vec![format!("{at}: printed {x:?}, protocol {y:?}")],
                    }
                })
                .collect()
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .flat_map(|(i, (x, y))| differences(x, y, &format!("{at}[{i}]")))
            .collect(),
        (a, b) if a == b => Vec::new(),
        (a, b) => vec![format!("{at}: printed {a}, protocol {b}")],
    }
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

    let rows = session_rows(answer(&faultd, &["sessions", "--json"]));
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
        let rows = session_rows(answer(&faultd, &["sessions", "--json"]));
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
    let done = evicted(answer(
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
    let all = evicted(answer(
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

    let done = evicted(answer(
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

    let by_vm = details(answer(&faultd, &["stats", "--vm", "vm-stats", "--json"]));
    let id = own.session.to_string();
    let by_id = details(answer(&faultd, &["--json", "stats", "--session", &id]));
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

    let st = status(answer(&faultd, &["status", "--json"]));
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

    let shown = details(answer(&faultd, &["stats", "--vm", "twin", "--json"]));
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

    let done = evicted(answer(
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

/// Runs `faultd ARGS` and waits at most `limit` for it (then kills it and fails: it hangs);
/// its output and how long it ran.
fn faultd_within<S: AsRef<OsStr> + std::fmt::Debug>(
    args: &[S],
    limit: Duration,
) -> (Output, Duration) {
    let started = Instant::now();
    let child = std::process::Command::new(faultd_tests::faultd_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running faultd");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => (out.expect("waiting for faultd"), started.elapsed()),
        Err(_) => {
            // Our own child, still unreaped (its waiter is blocked in wait).
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let out = rx.recv().expect("waiter").expect("waiting for faultd");
            panic!(
                "faultd {args:?} still ran after {limit:?} (killed): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A SOCK_SEQPACKET socket listening at `path` with `backlog`, as faultd's is.
fn seqpacket_listener(path: &Path, backlog: i32) -> OwnedFd {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType};
    let sock = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    bind(
        sock.as_raw_fd(),
        &nix::sys::socket::UnixAddr::new(path).unwrap(),
    )
    .unwrap();
    listen(&sock, Backlog::new(backlog).unwrap()).unwrap();
    sock
}

/// Accepts one connection on `listener`.
fn accept_one(listener: &OwnedFd) -> OwnedFd {
    let fd = nix::sys::socket::accept(listener.as_raw_fd()).expect("accept");
    // SAFETY: accept returned a new fd that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Receives one packet on `conn` (empty: the peer hung up).
fn recv_packet(conn: &OwnedFd) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let n = nix::sys::socket::recv(
        conn.as_raw_fd(),
        &mut buf,
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap_or(0);
    buf.truncate(n);
    buf
}

#[test]
fn socket_and_config_are_taken_after_ctl_and_after_its_command_too() {
    let faultd = Faultd::start(&[]);
    let socket = faultd.socket().to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("faultd.toml");
    std::fs::write(&config, format!("[control]\nsocket = \"{socket}\"\n")).unwrap();
    let config = config.to_str().unwrap();
    let missing = dir.path().join("none.sock");
    let missing = missing.to_str().unwrap();
    let head = format!(
        "faultd         {}, pid {}",
        env!("CARGO_PKG_VERSION"),
        faultd.pid()
    );

    for args in [
        &["--socket", socket, "ctl", "status"][..],
        &["ctl", "--socket", socket, "status"],
        &["ctl", "status", "--socket", socket],
        &["ctl", "--config", config, "status"],
        &["ctl", "status", "--config", config, "--timeout", "5s"],
        &[
            "--config",
            config,
            "ctl",
            "--connect-timeout",
            "2s",
            "status",
        ],
    ] {
        let (out, _) = faultd_within(args, T);

        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout(&out).starts_with(&head),
            "{args:?}: {}",
            stdout(&out)
        );
    }
    // The flag after ctl is the one used: a socket where nothing runs is reported as such.
    let (out, _) = faultd_within(
        &["--socket", socket, "ctl", "--socket", missing, "status"],
        T,
    );
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim_end(),
        format!("faultd: not running (no control socket at {missing})")
    );
}

#[test]
fn ctl_help_lists_the_socket_config_and_timeout_flags_and_every_exit_status() {
    for args in [&["ctl", "--help"][..], &["ctl", "-h"]] {
        let (out, _) = faultd_within(args, T);
        let help = stdout(&out);

        assert_eq!(out.status.code(), Some(0));
        for flag in [
            "--socket <SOCKET>",
            "--config <CONFIG>",
            "--connect-timeout <DURATION>",
            "--timeout <DURATION>",
            "--json",
            "[default: 5s]",
            "[default: 30s]",
        ] {
            assert!(help.contains(flag), "{flag} not in:\n{help}");
        }
        let listed: Vec<(u8, String)> = help
            .split_once("Exit status:\n")
            .expect("an exit status section")
            .1
            .lines()
            .map_while(|l| {
                let (code, what) = l.trim_start().split_once("  ")?;
                Some((code.parse().ok()?, what.to_owned()))
            })
            .collect();
        let codes: Vec<u8> = listed.iter().map(|l| l.0).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6], "{help}");
        // The codes the other tests see, with what they mean.
        for (code, says) in [
            (2, "usage"),
            (3, "not running"),
            (4, "forbidden"),
            (5, "timed out"),
            (6, "not a faultd control socket"),
        ] {
            assert!(listed[code].1.contains(says), "{code}: {}", listed[code].1);
        }
    }
    // A command's own help lists the flags too.
    let (out, _) = faultd_within(&["ctl", "stats", "--help"], T);
    assert!(
        stdout(&out).contains("--socket <SOCKET>"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("--timeout <DURATION>"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_socket_that_accepts_and_never_answers_times_out_with_exit_5() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mute.sock");
    let listener = seqpacket_listener(&path, 8);
    // Accepts, reads the request, and never answers (until ctl hangs up).
    let mute = std::thread::spawn(move || {
        let conn = accept_one(&listener);
        let request = recv_packet(&conn);
        let hung_up = recv_packet(&conn).is_empty();
        (request, hung_up)
    });

    let (out, took) = faultd_within(
        &[
            "ctl",
            "--socket",
            path.to_str().unwrap(),
            "--timeout",
            "1s",
            "status",
        ],
        T,
    );

    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "faultd: timed out after 1s waiting for an answer from {} (--timeout sets the wait; \
             faultd may still complete a request it received)",
            path.display()
        )
    );
    assert!(out.stdout.is_empty());
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "{took:?}"
    );
    let (request, hung_up) = mute.join().unwrap();
    assert_eq!(
        faultd_proto::decode::<faultd_proto::Request>(&request).unwrap(),
        faultd_proto::Request::Status {}
    );
    assert!(hung_up);
}

#[test]
fn a_socket_whose_backlog_stays_full_times_out_connecting_with_exit_5() {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stuck.sock");
    // Listening, never accepting: fill its backlog as a stuck or flooded daemon's would be.
    let _listener = seqpacket_listener(&path, 0);
    let mut queued = Vec::new();
    loop {
        let c = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        match connect(c.as_raw_fd(), &UnixAddr::new(&path).unwrap()) {
            Ok(()) => queued.push(c),
            Err(nix::Error::EAGAIN) => break,
            Err(e) => panic!("filling the backlog: {e}"),
        }
        assert!(queued.len() < 100, "the backlog never fills");
    }

    let (out, took) = faultd_within(
        &[
            "ctl",
            "status",
            "--socket",
            path.to_str().unwrap(),
            "--connect-timeout",
            "1500ms",
        ],
        T,
    );

    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "faultd: timed out after 1.5s connecting to {} (nothing accepted the connection; \
             --connect-timeout sets the wait)",
            path.display()
        )
    );
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(4500),
        "{took:?}"
    );
}

#[test]
fn a_path_that_is_no_faultd_control_socket_is_named_so_with_exit_6() {
    use std::os::unix::net::{UnixDatagram, UnixListener};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, "not a socket").unwrap();
    let directory = dir.path().join("dir");
    std::fs::create_dir(&directory).unwrap();
    let stream = dir.path().join("stream.sock");
    let _stream = UnixListener::bind(&stream).unwrap();
    let datagram = dir.path().join("dgram.sock");
    let _datagram = UnixDatagram::bind(&datagram).unwrap();
    // A seqpacket socket, as faultd's, whose peer answers another protocol.
    let garbage = dir.path().join("garbage.sock");
    let listener = seqpacket_listener(&garbage, 8);
    let stranger = std::thread::spawn(move || {
        let conn = accept_one(&listener);
        recv_packet(&conn);
        nix::sys::socket::send(
            conn.as_raw_fd(),
            b"SSH-2.0-OpenSSH_9.6\r\n",
            nix::sys::socket::MsgFlags::empty(),
        )
        .unwrap();
        recv_packet(&conn);
    });

    let cases = [
        (&file, "is a regular file, not a socket"),
        (&directory, "is a directory, not a socket"),
        (
            &stream,
            "is a socket of another type (faultd's is a seqpacket socket)",
        ),
        (
            &datagram,
            "is a socket of another type (faultd's is a seqpacket socket)",
        ),
        (
            &garbage,
            "answered something that is not faultd's protocol (malformed message: expected value at line 1 column 1)",
        ),
    ];
    for (path, why) in cases {
        let (code, err) = ctl_fails(path, &["status"]);

        assert_eq!(code, 6, "{err}");
        assert_eq!(
            err.trim_end(),
            format!(
                "faultd: not a faultd control socket: {} {why}",
                path.display()
            )
        );
    }
    stranger.join().unwrap();
}

#[test]
fn a_closed_stdout_ends_quietly_with_exit_0() {
    let faultd = Faultd::start(&[]);
    let r = Ram::new("vm-pipe", 4 * MIB);
    let mut session = r.serve(&faultd, "vm-pipe");
    write_pages(&r, 0..4);
    settled_stats(&mut session, |s| s.resident_bytes == 4 * PAGE);
    let socket = faultd.socket().to_str().unwrap();

    for args in [
        &["ctl", "--socket", socket, "status"][..],
        &["ctl", "--socket", socket, "sessions"],
        &["ctl", "--socket", socket, "stats", "--vm", "vm-pipe"],
        &[
            "ctl", "--socket", socket, "stats", "--vm", "vm-pipe", "--json",
        ],
        &["--check-config"],
    ] {
        // `faultd ctl stats | head -c1` where head has already gone: the reading end is closed
        // before faultd writes a byte, so every write gets EPIPE.
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let out = std::process::Command::new(faultd_tests::faultd_bin())
            .args(args)
            .stdout(Stdio::from(write))
            .output()
            .unwrap();

        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}");
    }
}

#[test]
fn json_prints_every_answer_whole_field_by_field_as_the_protocol_gives_it() {
    let faultd = Faultd::start(&[]);
    let (a, b) = (Ram::new("js-a", 4 * MIB), Ram::new("js-b", 4 * MIB));
    let mut sa = a.serve(&faultd, "js-a");
    let mut sb = b.serve(&faultd, "js-b");
    write_pages(&a, 0..12);
    write_pages(&b, 0..5);
    settled_stats(&mut sa, |s| s.latency_us.count == 12);
    settled_stats(&mut sb, |s| s.latency_us.count == 5);
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("mem");
    std::fs::write(&snapshot, vec![0u8; 4096]).unwrap();
    let fc = dir.path().join("fc.sock");
    let printed = |args: &[&str]| -> Value {
        let text = ctl(&faultd, args);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}:\n{text}"))
    };
    let proto = |answer: Response| serde_json::to_value(answer).unwrap();
    let client = || faultd_client::Client::connect(faultd.socket()).unwrap();

    let listen = printed(&[
        "firecracker-listen",
        "--vm",
        "js-fc",
        "--backend-path",
        fc.to_str().unwrap(),
        "--snapshot",
        snapshot.to_str().unwrap(),
        "--json",
    ]);
    let mut st = printed(&["status", "--json"]);
    let mut st_proto = proto(Response::Status(Box::new(client().status().unwrap())));
    let sessions = printed(&["--json", "sessions"]);
    let sessions_proto = proto(Response::Sessions {
        sessions: client().sessions().unwrap(),
        more: false,
    });
    let detail = printed(&["stats", "--json", "--vm", "js-a"]);
    let (d, omitted) = client()
        .session_detail(SessionRef::Vm("js-a".into()))
        .unwrap();
    let detail_proto = proto(Response::SessionDetail {
        sessions: d,
        omitted,
    });
    let evict = printed(&["evict", "--vm", "js-b", "--pages", "2", "--json"]);
    let resident_after = sb.stats().unwrap().resident_bytes;

    let listen_proto = proto(Response::Listening {
        vm: "js-fc".into(),
        socket: fc.clone(),
    });
    assert_eq!(
        differences(&listen, &listen_proto, "listening"),
        Vec::<String>::new()
    );
    // The one field that moves between the two asks.
    for v in [&mut st, &mut st_proto] {
        v.as_object_mut()
            .unwrap()
            .remove("uptime_secs")
            .expect("uptime_secs");
    }
    assert_eq!(differences(&st, &st_proto, "status"), Vec::<String>::new());
    assert_eq!(st["type"], "status");
    assert_eq!(st["firecracker"][0]["vm"], "js-fc");
    assert_eq!(
        differences(&sessions, &sessions_proto, "sessions"),
        Vec::<String>::new()
    );
    assert_eq!(sessions["sessions"].as_array().unwrap().len(), 2);
    assert_eq!(
        differences(&detail, &detail_proto, "session_detail"),
        Vec::<String>::new()
    );
    assert_eq!(detail["omitted"], 0);
    assert_eq!(detail["sessions"][0]["stats"]["latency_us"]["count"], 12);
    let evict_proto = proto(Response::SessionEvicted(SessionEvicted {
        session: sb.id(),
        vm: "js-b".into(),
        evicted: 2,
        zero: 0,
        failed: 0,
        resident_bytes: resident_after,
    }));
    assert_eq!(
        differences(&evict, &evict_proto, "session_evicted"),
        Vec::<String>::new()
    );
    assert_eq!(resident_after, 3 * PAGE);
}

#[test]
fn check_config_prints_toml_that_loads_back_as_the_same_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("faultd.toml");
    std::fs::write(
        &file,
        "[control]\nmax_sessions = 9\n[budget]\nsession_mib = 128\nhigh_pct = 90\nlow_pct = 70\n\
         [metrics]\nlisten = \"\"\n[limits]\nhandshake_ms = 1234\nsession_guest_gib = 3\n\
         [[firecracker]]\nvm = \"fc0\"\nsocket = \"/run/fc0.sock\"\nsnapshot = \"/srv/fc0.mem\"\n\
         uid = 1000\n",
    )
    .unwrap();
    let socket = dir.path().join("s.sock");
    let overrides = faultd::Overrides {
        socket: Some(socket.clone()),
        spin_us: Some(7),
        log_filter: Some("faultd=trace".into()),
        ..Default::default()
    };
    let want = faultd::Config::load(Some(&file), &overrides).unwrap();

    let (out, _) = faultd_within(
        &[
            OsStr::new("--config"),
            file.as_os_str(),
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--spin-us"),
            OsStr::new("7"),
            OsStr::new("--log"),
            OsStr::new("faultd=trace"),
            OsStr::new("--check-config"),
        ],
        T,
    );

    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = stdout(&out);
    let loaded = faultd::Config::from_toml(&printed)
        .unwrap_or_else(|e| panic!("the printed config does not load ({e}):\n{printed}"));
    assert_eq!(loaded, want, "{printed}");
    // ... and it is this file's and these flags' config, not the default.
    assert_ne!(
        want,
        faultd::Config::load(None, &Default::default()).unwrap()
    );
    for line in [
        format!("socket = \"{}\"", socket.display()),
        "spin_us = 7".into(),
        "max_sessions = 9".into(),
        "handshake_ms = 1234".into(),
        "[[firecracker]]".into(),
        "uid = 1000".into(),
    ] {
        assert!(
            printed.lines().any(|l| l == line),
            "{line:?} not in:\n{printed}"
        );
    }
}

#[test]
fn ctl_firecracker_listen_on_an_object_checks_the_admitted_uids_prefix_and_lists_the_listener() {
    // A store that is never reached: a listen makes no request to it.
    let faultd = Faultd::start_with_config(UNREACHABLE_STORE);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fc.sock");
    let listen = |key: &str| {
        [
            "firecracker-listen",
            "--vm",
            "fc-obj",
            "--backend-path",
            socket.to_str().unwrap(),
            "--object-store",
            "rgw",
            "--object-key",
            key,
            "--uid",
            "1000",
        ]
        .map(str::to_owned)
    };
    fn args(a: &[String; 11]) -> Vec<&str> {
        a.iter().map(String::as_str).collect()
    }

    // Another uid's key, for a socket that admits uid 1000: refused with the reason.
    let (code, err) = ctl_fails(faultd.socket(), &args(&listen("tenants/0/vm/mem")));
    assert_eq!(code, faultd::ctl::EXIT_FORBIDDEN as i32, "{err}");
    assert!(
        err.contains("not under") && err.contains("tenants/1000/"),
        "{err}"
    );
    assert!(!socket.exists());
    // --object-key without --object-store, or with --snapshot: usage errors.
    let (code, err) = ctl_fails(
        faultd.socket(),
        &[
            "firecracker-listen",
            "--vm",
            "x",
            "--backend-path",
            "/tmp/x.sock",
            "--object-key",
            "k",
        ],
    );
    assert_eq!(code, faultd::ctl::EXIT_USAGE as i32, "{err}");
    let (code, err) = ctl_fails(
        faultd.socket(),
        &[
            "firecracker-listen",
            "--vm",
            "x",
            "--backend-path",
            "/tmp/x.sock",
            "--snapshot",
            "/tmp/mem",
            "--object-store",
            "rgw",
            "--object-key",
            "k",
        ],
    );
    assert_eq!(code, faultd::ctl::EXIT_USAGE as i32, "{err}");

    // Its own prefix: listening, the socket handed to uid 1000, listed in status.
    let out = ctl(&faultd, &args(&listen("tenants/1000/vm/mem")));
    assert!(out.contains("listens for Firecracker VM fc-obj"), "{out}");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), 1000);
    let st = status(answer(&faultd, &["status", "--json"]));
    assert_eq!(st.firecracker_listeners, 1);
    assert_eq!(
        (st.firecracker[0].vm.as_str(), &st.firecracker[0].socket),
        ("fc-obj", &socket)
    );
}

//! Floods and sizes without bounds (issue 12, class 3): every resource a tenant can make faultd
//! spend has a limit (`[limits]` in the config), refused early with the limit named, counted in
//! `faultd_refusals_total{limit}`, and given back after. The attacker runs as a uid of its own
//! (the `flood` helper, setuid in pre_exec); the victim's guest keeps its data.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultd_client::{
    Client, ClientError, DeviceIommu, DeviceQueue, GuestRam, RamPageSize, RegionSpec, Session,
};
use faultd_proto::{ErrorCode, Response};
use faultd_tests::raw_ring::DeviceChannel;
use faultd_tests::{http_get, read_with_timeout, write_with_timeout, Faultd, Ram};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// The attacker's uid and gid: fixed, high, and nobody else's.
const ATTACKER: u32 = 64_917;

/// faultd with `toml` as its config file, its control socket open to every uid (so that
/// faultd itself, not file modes, must hold the attacker back). `under` runs faultd under a
/// program (e.g. prlimit).
fn start(toml: &str, under: &[&str]) -> (Faultd, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("faultd.toml");
    std::fs::write(&config, toml).unwrap();
    let under: Vec<&OsStr> = under.iter().map(OsStr::new).collect();
    let mut faultd = Faultd::spawn(&["--config", config.to_str().unwrap()], &[], &under);
    faultd.wait_accepting();
    let mode = |p: &Path, m| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m));
    mode(faultd.socket().parent().unwrap(), 0o755).unwrap();
    mode(faultd.socket(), 0o666).unwrap();
    (faultd, dir)
}

/// The `flood` helper as uid/gid [`ATTACKER`], and its first line (it is in place then).
struct Attacker {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Attacker {
    fn spawn(args: &[&str]) -> Attacker {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flood"));
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: runs in the child between fork and exec and calls only setgroups, setgid
        // and setuid, which are async-signal-safe; nothing is allocated.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(ATTACKER) != 0
                    || libc::setuid(ATTACKER) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawning the flood helper");
        let out = BufReader::new(child.stdout.take().unwrap());
        Attacker { child, out }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .expect("reading the flood helper");
        line.trim_end().to_owned()
    }

    /// Closes its stdin: it lets go of everything and exits.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn proc_status(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

fn threads(pid: u32) -> u64 {
    proc_status(pid, "Threads:")
}

fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) start at state, field 3.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    f[11] + f[12]
}

/// The sum of every sample in faultd's /metrics whose line starts with `prefix`.
fn metric_sum(faultd: &Faultd, prefix: &str) -> u64 {
    let (_, text) = http_get(&faultd.metrics_addr(), "/metrics");
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn refusals(faultd: &Faultd, limit: &str) -> u64 {
    let (_, text) = http_get(&faultd.metrics_addr(), "/metrics");
    let key = format!("faultd_refusals_total{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key)?.parse().ok())
        .unwrap_or(0)
}

/// Registers `ram` as `vm` from this (root) process, or says it did not finish in `within`.
fn register_within(faultd: &Faultd, ram: &Arc<Ram>, vm: &str, within: Duration) -> Session {
    let (tx, rx) = std::sync::mpsc::channel();
    let (socket, ram, name) = (faultd.socket().to_owned(), ram.clone(), vm.to_owned());
    let started = Instant::now();
    std::thread::spawn(move || {
        let r = Client::connect(&socket)
            .and_then(|c| c.register(&name, &ram.uffd, &[RegionSpec::zero(0, &ram.ram)], None));
        let _ = tx.send(r);
    });
    let session = rx
        .recv_timeout(within)
        .unwrap_or_else(|_| panic!("register of {vm} did not finish within {within:?}"))
        .expect("register");
    eprintln!("register of {vm} took {:?}", started.elapsed());
    session
}

/// Writes a pattern over every page of `ram` (through faultd's fault service).
fn fill(ram: &GuestRam) {
    let writes = (0..ram.size() / PAGE).map(|p| (p * PAGE, (p % 251) as u8 + 1));
    write_with_timeout(ram, writes.collect(), Duration::from_secs(10));
}

/// Every page of `ram` still holds its pattern.
fn assert_intact(ram: &GuestRam) {
    let pages: Vec<u64> = (0..ram.size() / PAGE).collect();
    let got = read_with_timeout(
        ram,
        pages.iter().map(|p| p * PAGE).collect(),
        Duration::from_secs(10),
    );
    let bad: Vec<u64> = pages
        .iter()
        .zip(&got)
        .filter(|(p, v)| **v != (**p % 251) as u8 + 1)
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(bad, Vec::<u64>::new(), "pages that lost their data");
}

#[test]
fn idle_connection_flood_past_the_cap_leaves_a_vmm_registering_promptly_and_fds_bounded() {
    // faultd with 1024 fds, as a unit without LimitNOFILE has: the flood outnumbers them.
    let (faultd, _cfg) = start(
        "[limits]\nconnections = 256\nconnections_per_uid = 32\nhandshake_ms = 60000\n",
        &["prlimit", "--nofile=1024:1024"],
    );
    let victim = Arc::new(Ram::new("victim", 4 * MIB));
    let _victim_session = register_within(&faultd, &victim, "victim", Duration::from_secs(5));
    fill(&victim.ram);

    let mut attacker = Attacker::spawn(&["idle", faultd.socket().to_str().unwrap(), "1500"]);
    let opened = attacker.line();
    let fds_during = open_fds(faultd.pid());
    let late = Arc::new(Ram::new("late", 4 * MIB));
    let late_session = register_within(&faultd, &late, "late", Duration::from_secs(3));

    assert!(opened.starts_with("opened "), "{opened}");
    assert!(
        fds_during < 32 + 64,
        "faultd holds {fds_during} fds during a flood of idle connections"
    );
    assert!(refusals(&faultd, "connections_per_uid") > 0);
    drop(late_session);
    attacker.finish();
    assert_intact(&victim.ram);
}

#[test]
fn a_connection_that_sends_nothing_is_closed_after_the_handshake_deadline() {
    use nix::sys::socket::{
        connect, recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockType,
        UnixAddr,
    };
    let (faultd, _cfg) = start("[limits]\nhandshake_ms = 200\n", &[]);
    let conn: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    connect(conn.as_raw_fd(), &UnixAddr::new(faultd.socket()).unwrap()).unwrap();
    let timeout = nix::sys::time::TimeVal::new(5, 0);
    setsockopt(&conn, sockopt::ReceiveTimeout, &timeout).unwrap();
    let started = Instant::now();

    let mut buf = vec![0u8; 65536];
    let n = recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty());
    let said: Option<Response> = n.ok().and_then(|n| faultd_proto::decode(&buf[..n]).ok());
    let then = recv(conn.as_raw_fd(), &mut buf, MsgFlags::empty());

    assert!(
        matches!(&said, Some(Response::Error { code: ErrorCode::Busy, message }) if message.contains("handshake_ms = 200")),
        "{said:?} after {:?}",
        started.elapsed()
    );
    assert_eq!(then.ok(), Some(0), "the connection is not closed");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(refusals(&faultd, "handshake_ms"), 1);
}

#[test]
fn registration_flood_for_a_live_name_costs_bounded_threads_and_memory_given_back() {
    let (faultd, _cfg) = start("", &[]);
    let pid = faultd.pid();
    let victim = Arc::new(Ram::new("victim", 4 * MIB));
    let _victim_session = register_within(&faultd, &victim, "victim", Duration::from_secs(5));
    fill(&victim.ram);
    std::thread::sleep(Duration::from_millis(300));
    let (threads_before, rss_before) = (threads(pid), rss_kib(pid));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(threads(pid));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };

    let mut attacker = Attacker::spawn(&[
        "register",
        faultd.socket().to_str().unwrap(),
        "victim",
        "600",
    ]);
    let sent = attacker.line();
    let bystander = Arc::new(Ram::new("bystander", 4 * MIB));
    let asked = Instant::now();
    let bystander_session =
        register_within(&faultd, &bystander, "bystander", Duration::from_secs(10));
    let bystander_took = asked.elapsed();
    // The window in which a waiting registration used to hold a thread (2 s).
    std::thread::sleep(Duration::from_millis(2500));
    stop.store(true, Ordering::Relaxed);
    let peak_threads = sampler.join().unwrap();
    // Names are per owner: one registration of the flood may become the attacker's own VM
    // "victim" (uid 64917), never the victim's; every other one is refused: by a limit, or,
    // racing that one, for its fds (the flood sends the same uffd and memfd each time).
    let live = metric_sum(&faultd, "faultd_sessions ");
    attacker.finish();
    drop(bystander_session);
    let settled = Instant::now() + Duration::from_secs(15);
    let mut rss_after = rss_kib(pid);
    while rss_after > rss_before + 16 * 1024 && Instant::now() < settled {
        std::thread::sleep(Duration::from_millis(200));
        rss_after = rss_kib(pid);
    }

    // Registrations validated at once are bounded by the uid's burst (registrations_burst,
    // 40), each on a blocking thread for a few milliseconds; the unfixed daemon held one per
    // waiting registration (5 -> 517 threads).
    assert!(
        peak_threads <= threads_before + 48,
        "faultd went from {threads_before} to {peak_threads} threads"
    );
    // A connection the per-uid cap closes at accept can fail its send (EPIPE): faultd still
    // counts it (connections_per_uid), so the accounting below covers all 600 either way.
    let sent: u64 = sent
        .strip_prefix("sent ")
        .and_then(|n| n.parse().ok())
        .expect("the flood says how many it sent");
    assert!(sent >= 500, "the flood sent only {sent}");
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "faultd's RSS went from {rss_before} KiB to {rss_after} KiB and stayed"
    );
    assert!(
        bystander_took < Duration::from_secs(1),
        "another VMM's register took {bystander_took:?}"
    );
    let by_limit: u64 = [
        "live_name",
        "registrations_per_sec",
        "connections_per_uid",
        "sessions_per_uid",
    ]
    .iter()
    .map(|limit| refusals(&faultd, limit))
    .sum();
    // Live then: the victim, the bystander, and at most the attacker's own VM of that name.
    let attackers_own = live.checked_sub(2).expect("victim and bystander are live");
    assert!(
        attackers_own <= 1,
        "{attackers_own} attacker sessions of one name"
    );
    let for_its_fds = metric_sum(&faultd, "faultd_protocol_errors_total{code=\"bad_fd\"}");
    assert_eq!(
        by_limit + for_its_fds + attackers_own,
        600,
        "each registration of the flood is refused by a limit or for its fds (the flood sends \
         one uffd and memfd each time), but for the attacker's own VM"
    );
    assert_intact(&victim.ram);
}

#[test]
fn an_oversize_guest_and_a_session_over_the_per_uid_cap_are_refused_naming_the_limit() {
    let (faultd, _cfg) = start(
        "[limits]\nsession_guest_gib = 1\nsessions_per_uid = 2\n",
        &[],
    );
    let victim = Arc::new(Ram::new("victim", 4 * MIB));
    let _victim_session = register_within(&faultd, &victim, "victim", Duration::from_secs(5));
    fill(&victim.ram);
    // 2 GiB of memfd RAM: sparse, nothing of it is touched.
    let huge = GuestRam::new("huge", 2 << 30, RamPageSize::Size4K).unwrap();
    let huge_uffd = faultd_client::create_uffd().unwrap();
    huge.register(&huge_uffd).unwrap();

    let oversize = Client::connect(faultd.socket())
        .unwrap()
        .register("huge", &huge_uffd, &[RegionSpec::zero(0, &huge)], None)
        .map(|s| s.id());
    let mut attacker = Attacker::spawn(&["sessions", faultd.socket().to_str().unwrap(), "t", "3"]);
    let answers: Vec<String> = (0..4).map(|_| attacker.line()).collect();

    assert!(
        matches!(&oversize, Err(ClientError::Refused { code: ErrorCode::Busy, message })
            if message.contains("session_guest_gib = 1")),
        "{oversize:?}"
    );
    assert_eq!(answers[..2], ["ok", "ok"]);
    assert!(
        answers[2].starts_with("refused Busy") && answers[2].contains("sessions_per_uid = 2"),
        "{answers:?}"
    );
    assert_eq!(refusals(&faultd, "session_guest_gib"), 1);
    assert_eq!(refusals(&faultd, "sessions_per_uid"), 1);
    attacker.finish();
    let gone = Instant::now() + Duration::from_secs(10);
    while ["t-0", "t-1"]
        .iter()
        .any(|vm| !faultd.vm_stats(vm).is_empty())
        && Instant::now() < gone
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Given back: the attacker's uid may register again once its sessions are gone.
    let mut again = Attacker::spawn(&["sessions", faultd.socket().to_str().unwrap(), "u", "1"]);
    assert_eq!(again.line(), "ok");
    again.finish();
    assert_intact(&victim.ram);
}

/// Attaches an "iommufd" device whose fault fd is `fault_fd` to a fresh session.
fn add_iommufd_device(faultd: &Faultd, fault_fd: &std::fs::File) -> Result<u64, ClientError> {
    let ram = Ram::new("dev", 4 * MIB);
    let mut session = ram.serve(faultd, "dev");
    let iommufd = std::fs::File::open("/dev/null").unwrap();
    session.add_device(
        1,
        DeviceQueue::Iommufd {
            fault_fd: fault_fd.as_fd(),
        },
        DeviceIommu::Iommufd {
            iommufd: iommufd.as_fd(),
            ioas_id: 1,
        },
    )
}

#[test]
fn dev_zero_or_a_regular_file_as_a_device_fault_fd_is_refused_at_add_device() {
    let (faultd, _cfg) = start("", &[]);
    let zero = std::fs::File::open("/dev/zero").unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), vec![0u8; 4096]).unwrap();
    let regular = std::fs::File::open(file.path()).unwrap();

    let with_zero = add_iommufd_device(&faultd, &zero);
    let with_file = add_iommufd_device(&faultd, &regular);

    for (refused, named) in [
        (&with_zero, "/dev/zero"),
        (&with_file, file.path().to_str().unwrap()),
    ] {
        assert!(
            matches!(refused, Err(ClientError::Refused { code: ErrorCode::BadFd, message })
                if message.contains(named) && message.contains("iommufd-pgfault")),
            "{refused:?}"
        );
    }
}

#[test]
fn a_pinned_device_whose_iommufd_is_not_dev_iommu_is_refused_before_any_ioctl() {
    // (A refused add_device ends the session, as for any bad fd.)
    let (faultd, _cfg) = start("", &[]);
    let ram = Ram::new("pin", 4 * MIB);
    let mut session = ram.serve(&faultd, "pin");
    // faultd would issue IOMMU_IOAS_MAP on it: on another driver's fd that number means
    // whatever that driver makes of it.
    let not_iommu = std::fs::File::open("/dev/null").unwrap();

    let refused = session.add_device(
        1,
        DeviceQueue::Pinned { ranges: None },
        DeviceIommu::Iommufd {
            iommufd: not_iommu.as_fd(),
            ioas_id: 1,
        },
    );

    assert!(
        matches!(&refused, Err(ClientError::Refused { code: ErrorCode::BadFd, message })
            if message.contains("/dev/null") && message.contains("not an iommufd")),
        "{refused:?}"
    );
}

/// Ring layout v1 offsets (docs/device-faults.md).
const OFF_REQ_PROD: u64 = 64;
const OFF_REQ_CONS: u64 = 128;

#[test]
fn a_device_flooding_malformed_records_is_quarantined_and_costs_far_below_a_core() {
    let (faultd, _cfg) = start("", &[]);
    let ram = Ram::new("noisy", 4 * MIB);
    let mut session = ram.serve(&faultd, "noisy");
    let channel = DeviceChannel::create(4 * MIB, 16, 1024).unwrap();
    session
        .add_device(1, channel.queue(), channel.table())
        .unwrap();
    let DeviceQueue::Ring { ring, kick, .. } = channel.queue() else {
        unreachable!("a DeviceChannel is a ring")
    };
    let (ring, kick): (OwnedFd, OwnedFd) = (
        ring.try_clone_to_owned().unwrap(),
        kick.try_clone_to_owned().unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    // The device: publishes whole rings of zeroed slots (each record malformed: cookie 0,
    // another dev_id) as fast as faultd consumes them, and kicks.
    let device = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut word = [0u8; 4];
            while !stop.load(Ordering::Relaxed) {
                let _ = nix::sys::uio::pread(&ring, &mut word, OFF_REQ_CONS as i64);
                let prod = u32::from_le_bytes(word).wrapping_add(1024);
                let _ = nix::sys::uio::pwrite(&ring, &prod.to_le_bytes(), OFF_REQ_PROD as i64);
                let _ = nix::unistd::write(&kick, &1u64.to_ne_bytes());
                std::thread::yield_now();
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let before = cpu_ticks(faultd.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(faultd.pid()) - before;
    stop.store(true, Ordering::Relaxed);
    device.join().unwrap();
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;

    assert!(
        used * 4 < ticks_per_sec,
        "faultd used {used} of {ticks_per_sec} ticks in a second"
    );
    let st = session.stats().unwrap();
    assert_eq!(st.device.quarantined, 1, "{st:?}");
    assert_eq!(
        faultd.log().matches("device_malformed_run").count(),
        1,
        "{}",
        faultd.log()
    );
    // The session itself is still served.
    write_with_timeout(&ram.ram, vec![(0, 7)], Duration::from_secs(5));
    assert_eq!(
        read_with_timeout(&ram.ram, vec![0], Duration::from_secs(5)),
        [7]
    );
}

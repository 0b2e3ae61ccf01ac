//! faultd as a systemd service, checked with systemd's own tools where they work without
//! systemd running as PID 1 (as on this machine): `systemd-analyze verify` and `security` on
//! the shipped units, `systemd-socket-activate` handing faultd its control socket, and a
//! test-owned NOTIFY_SOCKET receiving faultd's readiness and watchdog notifications. The
//! unit's privileges are exercised without systemd: faultd runs with exactly the unit's
//! capabilities (and its NoNewPrivileges=, UMask= and ProtectProc=) through the Firecracker
//! flow the README documents.

use std::ffi::{OsStr, OsString};
use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultd_client::{Client, RamPageSize};
use faultd_tests::firecracker::{
    copy_with_timeout, own_pages, pattern_snapshot, FcRestore, WireForm,
};
use faultd_tests::{faultd_bin, read_with_timeout, settled_stats, tool, Faultd, Ram};
use testvmm::{page_sequence, RamSlot, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn unit(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/systemd")
        .join(name)
}

/// `systemd-analyze verify` checks that ExecStart's binary exists, so it runs on copies of the
/// units (same names, so the socket still activates faultd.service) whose ExecStart names the
/// faultd this workspace built instead of the install path /usr/local/bin/faultd. Only that
/// path is changed; everything else is verified as shipped.
#[test]
fn service_and_socket_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().unwrap();
    let service = std::fs::read_to_string(unit("faultd.service")).unwrap();
    let installed = "ExecStart=/usr/local/bin/faultd ";
    assert_eq!(service.matches(installed).count(), 1, "{service}");
    let built = format!("ExecStart={} ", faultd_bin().display());
    std::fs::write(
        dir.path().join("faultd.service"),
        service.replace(installed, &built),
    )
    .unwrap();
    std::fs::copy(unit("faultd.socket"), dir.path().join("faultd.socket")).unwrap();

    let out = Command::new(tool("systemd-analyze"))
        .args(["verify", "--man=no"])
        .arg(dir.path().join("faultd.socket"))
        .arg(dir.path().join("faultd.service"))
        .output()
        .unwrap();

    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.is_empty(), "systemd-analyze had remarks:\n{said}");
}

#[test]
fn socket_unit_listens_where_faultd_and_vmms_expect_the_control_socket() {
    let socket = std::fs::read_to_string(unit("faultd.socket")).unwrap();
    let service = std::fs::read_to_string(unit("faultd.service")).unwrap();

    let listen: Vec<&str> = socket
        .lines()
        .filter_map(|l| l.strip_prefix("ListenSequentialPacket="))
        .collect();

    assert_eq!(listen, [faultd_proto::DEFAULT_SOCKET_PATH]);
    let config = faultd::Config::load(None, &Default::default()).unwrap();
    assert_eq!(config.socket, Path::new(faultd_proto::DEFAULT_SOCKET_PATH));
    for line in [
        "Type=notify",
        "WatchdogSec=10s",
        "Restart=on-failure",
        "RuntimeDirectory=faultd",
        "RuntimeDirectoryPreserve=yes",
        "StateDirectory=faultd",
    ] {
        assert!(service.lines().any(|l| l == line), "missing {line}");
    }
}

#[test]
fn faultd_under_systemd_socket_activate_serves_a_kvm_guest_through_the_inherited_socket() {
    const SIZE: u64 = 64 * MIB;
    let activate = tool("systemd-socket-activate");
    // systemd-socket-activate binds and listens on the socket, and on the first connection
    // execs faultd in its own place with LISTEN_FDS=1, LISTEN_PID=<faultd>, the socket as fd 3.
    // faultd is given the same path as --socket: had it not taken the inherited socket, it
    // would find a live listener there and refuse to start.
    let mut faultd = Faultd::spawn(
        &[],
        &[],
        &[
            activate.as_os_str(),
            OsStr::new("--seqpacket"),
            OsStr::new("--listen"),
            OsStr::new("{socket}"),
        ],
    );
    faultd.wait_accepting();
    let ram = Ram::new("vm-activated", SIZE);
    let mut session = ram.serve(&faultd, "vm-activated");
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.ram.host_ptr(),
        size: SIZE,
    }])
    .unwrap();
    vm.set_timeout(Some(Duration::from_secs(120)));
    let pages = (SIZE / PAGE) as u32;

    let reports = vm
        .run(
            vec![Workload::WriteVerify {
                seed: 7,
                touches: 1500,
                first_page: 0,
                page_count: pages,
            }],
            &|_, _| {},
        )
        .expect("guest run");

    assert_eq!(reports[0].mismatches, 0);
    let touched = page_sequence(7, 1500, 0, pages)
        .into_iter()
        .collect::<std::collections::BTreeSet<_>>()
        .len() as u64;
    let stats = settled_stats(&mut session, |s| s.zero_fills == touched);
    assert_eq!(stats.zero_fills, touched);
    assert_eq!(stats.errors, 0);
    let log = faultd.log();
    assert!(
        log.contains("serving the control socket passed by the service manager"),
        "{log}"
    );
    // The socket belongs to the activator (systemd): faultd leaves it in place at exit.
    drop(session);
    assert!(faultd.terminate().success(), "{}", faultd.log());
    assert!(faultd.socket().exists());
}

/// Receives datagrams from the NOTIFY_SOCKET for `window`, as one string per datagram.
fn notifications(sock: &UnixDatagram, window: Duration) -> Vec<String> {
    let end = Instant::now() + window;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return got
            }
            // See recv_ready.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("receiving notifications: {e}"),
        }
    }
}

/// The first datagram on `sock` (each try waits its read timeout). A recv with a timeout fails
/// with EINTR whenever a signal wakes its thread, even one that is then ignored, and the kernel
/// does not restart it: e.g. a SIGCHLD for a tool another test spawned (queued for the whole
/// process while the spawning thread had it blocked inside posix_spawn). So it is tried again.
fn recv_ready(sock: &UnixDatagram, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match sock.recv(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            done => return done,
        }
    }
}

fn keep_alives(got: &[String]) -> usize {
    got.iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .count()
}

/// Stops one thread of another process with ptrace (PTRACE_SEIZE + PTRACE_INTERRUPT): the rest
/// of the process runs on. Resumed (detached) on drop.
struct StoppedThread(libc::pid_t);

impl StoppedThread {
    fn stop(tid: libc::pid_t) -> StoppedThread {
        // SAFETY: ptrace requests on a thread id with null addr/data, as PTRACE_SEIZE and
        // PTRACE_INTERRUPT take; they touch no memory of this process.
        let seized = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0) };
        assert_eq!(
            seized,
            0,
            "PTRACE_SEIZE: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: as above.
        let interrupted = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0) };
        assert_eq!(
            interrupted,
            0,
            "PTRACE_INTERRUPT: {}",
            std::io::Error::last_os_error()
        );
        let mut status = 0;
        // SAFETY: waits for the tracee's stop; `status` is a live local the call writes.
        let waited = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        assert_eq!(waited, tid, "waitpid: {}", std::io::Error::last_os_error());
        StoppedThread(tid)
    }
}

impl Drop for StoppedThread {
    fn drop(&mut self) {
        // SAFETY: detaching a tracee stopped by this thread; null addr/data (no signal).
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0) };
    }
}

/// The kernel thread id of faultd's thread named `name`.
fn thread_named(pid: u32, name: &str) -> libc::pid_t {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .and_then(|e| e.file_name().to_str()?.parse().ok())
        .unwrap_or_else(|| panic!("faultd has no thread {name}"))
}

#[test]
fn readiness_comes_once_serving_and_watchdog_keep_alives_stop_while_a_session_thread_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&path).unwrap();
    // 200 ms: faultd checks its session threads and pings every 100 ms.
    let mut faultd = Faultd::spawn(
        &[],
        &[
            ("NOTIFY_SOCKET", path.as_os_str()),
            ("WATCHDOG_USEC", OsStr::new("200000")),
        ],
        &[],
    );

    // READY=1 comes first, and only once the control socket accepts: connecting right after
    // it must work on the first try.
    let mut buf = [0u8; 4096];
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let n = recv_ready(&notify, &mut buf).expect("no notification from faultd");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        ready.lines().any(|l| l == "READY=1"),
        "first notification {ready:?}:\n{}",
        faultd.log()
    );
    Client::connect(faultd.socket()).expect("connecting right after READY=1");
    // Keep-alives every 100 ms while nothing is served (no sessions), and while a session
    // is idle.
    let idle = notifications(&notify, Duration::from_secs(1));
    assert!(keep_alives(&idle) >= 5, "{idle:?}");
    // Not unmapped if the test fails while a thread is blocked faulting on it (that thread
    // would get SIGSEGV and hide the failure): dropped explicitly at the end.
    let ram = std::mem::ManuallyDrop::new(Ram::new("vm-stall", 16 * MIB));
    let mut session = ram.serve(&faultd, "vm-stall");
    read_with_timeout(&ram.ram, vec![0], Duration::from_secs(10));
    let served = notifications(&notify, Duration::from_secs(1));
    assert!(keep_alives(&served) >= 5, "{served:?}");

    // Stop the session's fault thread, then fault: the fault waits on its userfaultfd and
    // nobody serves it. faultd must withhold the keep-alive.
    let stopped = StoppedThread::stop(thread_named(
        faultd.pid(),
        &format!("faultd-s{}", session.id()),
    ));
    let base = ram.ram.host_addr() as usize;
    let faulting = std::thread::spawn(move || {
        // SAFETY: byte 8 pages into the 16 MiB shared mapping, which is never unmapped before
        // this thread is joined (ManuallyDrop above); a volatile read creates no reference.
        unsafe { std::ptr::read_volatile((base + 8 * PAGE as usize) as *const u8) }
    });
    let _settling = notifications(&notify, Duration::from_millis(400));
    let stalled = notifications(&notify, Duration::from_secs(1));
    assert_eq!(keep_alives(&stalled), 0, "{stalled:?}");
    assert!(
        faultd.log().contains("fault service stalled"),
        "{}",
        faultd.log()
    );

    // Resume the thread: the fault is served and the keep-alives come back.
    drop(stopped);
    assert_eq!(faulting.join().unwrap(), 0);
    let resumed = notifications(&notify, Duration::from_secs(1));
    assert!(keep_alives(&resumed) >= 3, "{resumed:?}");
    let stats = settled_stats(&mut session, |s| s.zero_fills == 2);
    assert_eq!(stats.zero_fills, 2);

    // STOPPING=1 at shutdown.
    assert!(faultd.terminate().success());
    let last = notifications(&notify, Duration::from_millis(500));
    assert!(
        last.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "{last:?}"
    );
    assert!(!faultd.alive());
    drop(session);
    drop(std::mem::ManuallyDrop::into_inner(ram));
}

/// Values of every `Key=` line of `unit`, in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}=");
    unit.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .collect()
}

#[test]
fn systemd_analyze_security_rates_the_service_unit_at_most_2_6() {
    let out = Command::new(tool("systemd-analyze"))
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(unit("faultd.service"))
        .output()
        .unwrap();

    let said = String::from_utf8_lossy(&out.stdout);
    let exposure: f64 = said
        .split("Overall exposure level for faultd.service: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in:\n{said}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    println!("exposure {exposure}");
    assert!(exposure <= 2.6, "{said}");
}

#[test]
fn the_sysusers_file_makes_the_group_the_socket_unit_gives_the_control_socket() {
    let socket = std::fs::read_to_string(unit("faultd.socket")).unwrap();
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("etc")).unwrap();

    let out = Command::new(tool("systemd-sysusers"))
        .arg(format!("--root={}", root.path().display()))
        .arg(unit("faultd.sysusers"))
        .output()
        .unwrap();

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(values(&socket, "SocketGroup"), ["faultd"]);
    assert_eq!(values(&socket, "SocketMode"), ["0660"]);
    let groups = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    assert!(
        groups.lines().any(|l| l.starts_with("faultd:x:")),
        "{groups}"
    );
}

/// How faultd.service runs faultd, as far as that can be reproduced without systemd.
#[derive(Clone, Debug)]
struct Sandbox {
    /// Capabilities, as setpriv spells them (`sys_ptrace`).
    caps: Vec<String>,
    /// UMask=.
    umask: String,
    /// ProtectProc= (the hidepid= of a /proc of its own), if set.
    protect_proc: Option<String>,
}

impl Sandbox {
    /// The shipped unit's.
    fn of_unit() -> Sandbox {
        let service = std::fs::read_to_string(unit("faultd.service")).unwrap();
        // No User=: faultd runs as root, and a root process's capabilities are the bounding
        // set (AmbientCapabilities= would matter only for another user).
        assert_eq!(
            (values(&service, "User"), values(&service, "DynamicUser")),
            (vec![], vec![])
        );
        assert_eq!(values(&service, "NoNewPrivileges"), ["yes"]);
        let names = |key| -> Vec<String> {
            values(&service, key)
                .into_iter()
                .flat_map(str::split_whitespace)
                .map(|c| {
                    c.strip_prefix("CAP_")
                        .unwrap_or_else(|| panic!("{key}: {c} is not a CAP_ name"))
                        .to_lowercase()
                })
                .collect()
        };
        let caps = names("CapabilityBoundingSet");
        let ambient = names("AmbientCapabilities");
        assert!(ambient.iter().all(|c| caps.contains(c)), "{ambient:?}");
        let umask = values(&service, "UMask").first().copied().unwrap_or("0022");
        Sandbox {
            caps,
            umask: umask.to_owned(),
            protect_proc: values(&service, "ProtectProc")
                .first()
                .map(|&p| p.to_owned()),
        }
    }

    /// This sandbox less `cap`, which it has.
    fn without(&self, cap: &str) -> Sandbox {
        assert!(self.caps.iter().any(|c| c == cap), "{self:?}");
        Sandbox {
            caps: self.caps.iter().filter(|&c| c != cap).cloned().collect(),
            ..self.clone()
        }
    }

    /// The capability mask of `caps` (as /proc/PID/status shows one), by setpriv's numbering.
    fn mask(&self) -> u64 {
        let out = Command::new(tool("setpriv"))
            .arg("--list-caps")
            .output()
            .unwrap();
        let known: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        self.caps
            .iter()
            .map(|c| {
                let n = known.iter().position(|k| k == c);
                1 << n.unwrap_or_else(|| panic!("setpriv knows no {c}"))
            })
            .sum()
    }

    /// The program and arguments (faultd and its own arguments follow) that run faultd in this
    /// sandbox: in a mount namespace of its own with /proc mounted `hidepid=ProtectProc` (what
    /// systemd does for ProtectProc=), under the umask, with no new privileges, and as root
    /// with exactly `caps` as its bounding set, hence as its permitted and effective sets
    /// (uid 0 execs with the bounding set), none inheritable or ambient.
    fn under(&self) -> Vec<OsString> {
        let mut script = String::new();
        if let Some(p) = &self.protect_proc {
            script += &format!("mount -t proc -o hidepid={p} proc /proc && ");
        }
        script += &format!("umask {} && exec \"$@\"", self.umask);
        let set: Vec<String> = std::iter::once("-all".to_owned())
            .chain(self.caps.iter().map(|c| format!("+{c}")))
            .collect();
        let mut under: Vec<OsString> = vec![tool("unshare").into()];
        for a in [
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "faultd-sandbox",
        ] {
            under.push(a.into());
        }
        under.push(tool("setpriv").into());
        for a in [
            "--no-new-privs",
            "--bounding-set",
            &set.join(","),
            "--inh-caps",
            "-all",
            "--ambient-caps",
            "-all",
        ] {
            under.push(a.into());
        }
        under
    }
}

/// The jail's user: the jailer's `--uid`, which Firecracker runs as.
const JAIL_UID: u32 = 4242;
/// Guest RAM of the restore, its pages touched, and the pages `ctl evict` is asked for.
const FC_SIZE: u64 = 8 * MIB;
const FC_TOUCHED: u64 = 512;
const FC_EVICT: u64 = 300;
const FC_SEED: u32 = 0xCA95;
const T: Duration = Duration::from_secs(20);
/// Environment variables that make [`jailed_firecracker_child`] the stand-in Firecracker.
const CHILD_SOCKET: &str = "FAULTD_TEST_JAILED_FC_SOCKET";
const CHILD_SNAPSHOT: &str = "FAULTD_TEST_JAILED_FC_SNAPSHOT";

/// What became of the Firecracker flow ([`firecracker_flow`]) in a sandbox.
#[derive(Debug, Default)]
struct FlowEnd {
    /// faultd's exit status, if it stopped at start (nothing else was done then).
    exited: Option<std::process::ExitStatus>,
    /// faultd's effective capabilities while it ran.
    cap_eff: u64,
    /// `faultd ctl evict --vm fc-unit --pages FC_EVICT --json`: its report, or its stderr.
    evict: Option<Result<faultd_proto::SessionEvicted, String>>,
    /// Whether the stand-in found every page it read right, before and after the evict.
    served: bool,
    /// Touched pages the stand-in's own pagemap showed in swap after the evict.
    swapped: Option<u64>,
    /// What the stand-in printed.
    child: String,
    /// faultd's log.
    log: String,
}

/// The README's Firecracker flow, with faultd run in `sandbox`: faultd starts with a
/// `[[firecracker]]` entry whose `uid` is the jail's user, so it binds the socket in the jail
/// (root's, 0755, as the jailer makes a jail's root) and hands it to that user; the stand-in
/// Firecracker, a process of that user, restores through it and reads FC_TOUCHED pages; the
/// operator pages FC_EVICT of them out with `faultd ctl evict`; the stand-in reads them back.
fn firecracker_flow(sandbox: &Sandbox) -> FlowEnd {
    use std::os::unix::fs::PermissionsExt;
    let _swap = faultd_tests::Swap::enable();
    let jail = tempfile::tempdir().unwrap();
    std::fs::set_permissions(jail.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let snapshot = jail.path().join("mem");
    pattern_snapshot(&snapshot, &[(0, FC_SIZE, 0)], FC_SEED);
    let socket = jail.path().join("uffd.sock");
    let config = jail.path().join("faultd.toml");
    std::fs::write(
        &config,
        format!(
            "[[firecracker]]\nvm = \"fc-unit\"\nsocket = \"{}\"\n\
             snapshot = \"{}\"\nuid = {JAIL_UID}\n",
            socket.display(),
            snapshot.display()
        ),
    )
    .unwrap();
    let under = sandbox.under();
    let under: Vec<&OsStr> = under.iter().map(OsString::as_os_str).collect();
    let mut faultd = Faultd::spawn(&["--config", config.to_str().unwrap()], &[], &under);
    // faultd serves its control socket before it listens for its [[firecracker]] entries: it
    // has started once it says it listens, or it has stopped.
    let deadline = Instant::now() + T;
    let mut stopped = faultd.try_wait_accepting().err();
    while stopped.is_none()
        && !faultd
            .log()
            .contains("listening for Firecracker vm=\"fc-unit\"")
    {
        assert!(Instant::now() < deadline, "{}", faultd.log());
        stopped = faultd.wait_exit(Duration::from_millis(10));
    }
    if stopped.is_some() {
        return FlowEnd {
            exited: stopped,
            log: faultd.log(),
            ..FlowEnd::default()
        };
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", faultd.pid())).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:\t"))
        .map(|hex| u64::from_str_radix(hex, 16).unwrap())
        .unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "jailed_firecracker_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_SOCKET, &socket)
        .env(CHILD_SNAPSHOT, &snapshot)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    while said.read_line(&mut printed).unwrap() > 0 && !printed.contains("fc-child restored") {}
    let evict = printed.contains("fc-child restored").then(|| {
        let out = Command::new(faultd_bin())
            .arg("--socket")
            .arg(faultd.socket())
            .args(["ctl", "evict", "--vm", "fc-unit-1", "--pages"])
            .arg(FC_EVICT.to_string())
            .arg("--json")
            .output()
            .unwrap();
        if out.status.success() {
            // `--json` prints faultd's answer object whole.
            match serde_json::from_slice(&out.stdout).unwrap() {
                faultd_proto::Response::SessionEvicted(e) => Ok(e),
                other => Err(format!("not an eviction's answer: {other:?}")),
            }
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    // Closing its stdin tells the stand-in to look at its pages again.
    drop(child.stdin.take());
    std::io::Read::read_to_string(&mut said, &mut printed).unwrap();
    let out = child.wait_with_output().unwrap();
    printed += &String::from_utf8_lossy(&out.stderr);
    let swapped = printed
        .split("fc-child verified swapped=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|n| n.parse().unwrap());
    FlowEnd {
        exited: None,
        cap_eff,
        evict,
        served: out.status.success() && swapped.is_some(),
        swapped,
        child: printed,
        log: faultd.log(),
    }
}

/// Makes this process the jail's user as the jailer's exec of Firecracker does: uid and gid
/// JAIL_UID, no supplementary groups, dumpable (as an exec'd process is; the uid change
/// cleared it). glibc applies set*id calls to every thread.
fn become_jail_user() {
    // SAFETY: set*id and prctl take integers (setgroups a list of length 0, which it does not
    // read); they change this process's credentials and touch none of its memory.
    let rcs = unsafe {
        [
            libc::setgroups(0, std::ptr::null()),
            libc::setresgid(JAIL_UID, JAIL_UID, JAIL_UID),
            libc::setresuid(JAIL_UID, JAIL_UID, JAIL_UID),
            libc::prctl(libc::PR_SET_DUMPABLE, 1),
        ]
    };
    assert_eq!(rcs, [0; 4], "{}", std::io::Error::last_os_error());
}

/// Not a test on its own: run by [`firecracker_flow`] as a separate process playing Firecracker
/// under the jailer, a process of JAIL_UID. Without the environment variable it does nothing.
#[test]
fn jailed_firecracker_child() {
    let Some(socket) = std::env::var_os(CHILD_SOCKET) else {
        return;
    };
    // Opened and the restore prepared as root: the jail's user may read neither the snapshot
    // (the test compares with it) nor /dev/userfaultfd (the jailer makes one in the jail).
    let snapshot = std::fs::File::open(std::env::var_os(CHILD_SNAPSHOT).unwrap()).unwrap();
    let mut restore = FcRestore::new(&[(FC_SIZE, 0)], RamPageSize::Size4K).unwrap();
    become_jail_user();
    restore.send(Path::new(&socket), WireForm::Current).unwrap();
    let offs: Vec<u64> = (0..FC_TOUCHED).map(|p| p * PAGE).collect();
    let addrs: Vec<u64> = offs.iter().map(|&o| restore.addr(0, o)).collect();
    let want = |o: u64| {
        let mut v = vec![0u8; PAGE as usize];
        snapshot.read_exact_at(&mut v, o).unwrap();
        v
    };

    let got = copy_with_timeout(addrs.clone(), PAGE as usize, T);
    for (&o, page) in offs.iter().zip(&got) {
        assert!(*page == want(o), "offset {o:#x}");
    }
    // The VM writes a mark over the first 8 bytes of every page (present: no fault).
    let mark = |i: usize| 0x5eed_0000_0000_0000u64 | i as u64;
    for (i, &a) in addrs.iter().enumerate() {
        // SAFETY: `a` is a page of the stand-in's live anonymous mapping, 8-byte aligned and
        // present (read above); a volatile write creates no reference.
        unsafe { std::ptr::write_volatile(a as *mut u64, mark(i)) };
    }
    println!("fc-child restored");
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new()).unwrap();
    let swapped = own_pages(&addrs)
        .iter()
        .filter(|&&p| p == (false, true))
        .count();
    let back = copy_with_timeout(addrs.clone(), PAGE as usize, T);
    for (i, (&o, page)) in offs.iter().zip(&back).enumerate() {
        assert_eq!(
            u64::from_ne_bytes(page[..8].try_into().unwrap()),
            mark(i),
            "offset {o:#x} lost the VM's write"
        );
        assert!(page[8..] == want(o)[8..], "offset {o:#x}");
    }
    println!("fc-child verified swapped={swapped}");
}

/// Pages the kernel may leave in RAM on a page-out: 15 per CPU (its per-CPU LRU batch; see
/// the Firecracker eviction test).
fn may_stay() -> u64 {
    15 * std::thread::available_parallelism().map_or(1, |n| n.get()) as u64
}

#[test]
fn with_exactly_the_units_capabilities_a_firecracker_restore_with_uid_is_served_and_evicted() {
    let sandbox = Sandbox::of_unit();

    let end = firecracker_flow(&sandbox);

    assert_eq!(end.exited, None, "{}", end.log);
    assert_eq!(end.cap_eff, sandbox.mask(), "{sandbox:?}");
    assert!(end.served, "{}\n{}", end.child, end.log);
    let done = end
        .evict
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", end.log));
    println!("{done:?}");
    assert_eq!(done.evicted + done.failed, FC_EVICT);
    assert!(done.failed <= may_stay(), "{done:?}\n{}", end.log);
    assert_eq!(end.swapped, Some(done.evicted), "{}", end.child);
}

#[test]
fn without_cap_chown_a_firecracker_entry_with_uid_stops_faultd_at_start() {
    let end = firecracker_flow(&Sandbox::of_unit().without("chown"));

    assert_eq!(end.exited.and_then(|s| s.code()), Some(1), "{}", end.log);
    assert!(
        end.log.contains("setting owner and mode of")
            && end.log.contains("Operation not permitted"),
        "{}",
        end.log
    );
}

#[test]
fn without_cap_sys_nice_ctl_evict_pages_out_nothing_of_a_firecracker_restore() {
    let end = firecracker_flow(&Sandbox::of_unit().without("sys_nice"));

    assert!(end.served, "{}\n{}", end.child, end.log);
    let done = end
        .evict
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", end.log));
    assert_eq!((done.evicted, done.failed), (0, FC_EVICT));
    assert_eq!(end.swapped, Some(0));
    assert!(
        end.log
            .contains("(process_madvise): Operation not permitted"),
        "{}",
        end.log
    );
}

/// The jail's user's pagemap is 0400 and that user's: ptrace access alone does not open it.
#[test]
fn without_cap_dac_read_search_ctl_evict_of_a_firecracker_restore_is_refused() {
    let end = firecracker_flow(&Sandbox::of_unit().without("dac_read_search"));

    assert!(end.served, "{}\n{}", end.child, end.log);
    let refused = end.evict.unwrap().unwrap_err();
    assert!(
        refused.contains("faultd could not open the VMM's memory"),
        "{refused}"
    );
    assert!(
        end.log.contains(
            "the VM's memory cannot be paged out (opening the peer's memory: Permission denied"
        ),
        "{}",
        end.log
    );
}

#[test]
fn without_cap_sys_ptrace_ctl_evict_of_a_firecracker_restore_is_refused() {
    let end = firecracker_flow(&Sandbox::of_unit().without("sys_ptrace"));

    assert!(end.served, "{}\n{}", end.child, end.log);
    let refused = end.evict.unwrap().unwrap_err();
    assert!(
        refused.contains("faultd could not open the VMM's memory"),
        "{refused}"
    );
    assert!(
        end.log.contains("the VM's memory cannot be paged out"),
        "{}",
        end.log
    );
}

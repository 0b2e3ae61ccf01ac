//! faultd as a systemd service, checked with systemd's own tools where they work without
//! systemd running as PID 1 (as on this machine): `systemd-analyze verify` on the shipped
//! units, `systemd-socket-activate` handing faultd its control socket, and a test-owned
//! NOTIFY_SOCKET receiving faultd's readiness and watchdog notifications.

use std::ffi::OsStr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use faultd_client::Client;
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

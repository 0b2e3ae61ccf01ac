//! Harness for faultd's integration tests and benchmarks: runs the real `faultd` binary as its
//! own process on a private socket, and gives the test (which plays the VMM) guest RAM that
//! faultd serves.

pub mod bench;
pub mod fc_example;
pub mod firecracker;
pub mod raw;
pub mod raw_ring;
pub mod rgw;
pub mod service_manager;

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use faultd_client::{create_uffd, Client, GuestRam, RamPageSize, RegionSpec, Session, Uffd};

/// Path of a `faultd` binary built from this workspace in the test's own profile.
pub fn faultd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        escargot::CargoBuild::new()
            .package("faultd")
            .bin("faultd")
            .current_release()
            .run()
            .expect("building faultd")
            .path()
            .to_owned()
    })
}

/// A running faultd process on a private socket; killed (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub struct Faultd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    /// How it was started, to start it again ([`Faultd::restart`]).
    launch: Launch,
    _dir: tempfile::TempDir,
}

#[derive(Debug, Clone)]
struct Launch {
    extra: Vec<std::ffi::OsString>,
    env: Vec<(String, std::ffi::OsString)>,
    under: Vec<std::ffi::OsString>,
    store: PathBuf,
    /// The service manager faultd notifies and is passed its kept fds by, if any.
    manager: Option<(PathBuf, Arc<Mutex<service_manager::State>>)>,
}

impl Faultd {
    /// Starts faultd with default config and `extra` arguments; waits until it accepts.
    ///
    /// Metrics are served on a free loopback port ([`Faultd::metrics_addr`]) unless `extra`
    /// sets `--metrics-listen`: the configured default port would collide between the
    /// faultds that tests run side by side.
    pub fn start(extra: &[&str]) -> Faultd {
        Faultd::start_with_env(extra, &[])
    }

    /// As [`Faultd::start`], with environment variables set for faultd.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &OsStr)]) -> Faultd {
        let mut f = Faultd::spawn(extra, env, &[]);
        f.wait_accepting();
        f
    }

    /// Starts faultd as [`Faultd::start_with_env`] does, without waiting for it. With
    /// `under`, faultd is run by that program (`under[0]`, with the rest as its arguments;
    /// an argument `{socket}` stands for the control socket's path), e.g. a socket activator.
    pub fn spawn(extra: &[&str], env: &[(&str, &OsStr)], under: &[&OsStr]) -> Faultd {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = extra.iter().map(Into::into).collect();
        Faultd::spawn_in(dir, extra, env, under, None)
    }

    /// Starts faultd with `toml` as its configuration file (`--config`), kept in faultd's own
    /// directory so that [`Faultd::restart`] reads it again; waits until it accepts.
    pub fn start_with_config(toml: &str) -> Faultd {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("faultd.toml");
        write_config(&config, toml);
        let extra = vec!["--config".into(), config.into_os_string()];
        let mut f = Faultd::spawn_in(dir, extra, &[], &[], None);
        f.wait_accepting();
        f
    }

    /// Starts faultd as `manager`'s service: it notifies `manager`, and every start (this one
    /// and each [`Faultd::restart`]) is passed the fds in `manager`'s fd store, as systemd
    /// does. Waits until it accepts.
    pub fn start_managed(manager: &service_manager::ServiceManager, extra: &[&str]) -> Faultd {
        let dir = tempfile::tempdir().expect("tempdir");
        let extra = extra.iter().map(Into::into).collect();
        let mut f = Faultd::spawn_in(dir, extra, &[], &[], Some(manager));
        f.wait_accepting();
        f
    }

    /// [`Faultd::start_managed`] with `toml` as its configuration file, which
    /// [`Faultd::rewrite_config`] may change before a [`Faultd::restart`].
    pub fn start_managed_with_config(
        manager: &service_manager::ServiceManager,
        toml: &str,
    ) -> Faultd {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("faultd.toml");
        write_config(&config, toml);
        let extra = vec!["--config".into(), config.into_os_string()];
        let mut f = Faultd::spawn_in(dir, extra, &[], &[], Some(manager));
        f.wait_accepting();
        f
    }

    /// Replaces the configuration file a faultd started with a config reads at its next
    /// [`Faultd::restart`].
    pub fn rewrite_config(&self, toml: &str) {
        write_config(&self._dir.path().join("faultd.toml"), toml);
    }

    fn spawn_in(
        dir: tempfile::TempDir,
        extra: Vec<std::ffi::OsString>,
        env: &[(&str, &OsStr)],
        under: &[&OsStr],
        manager: Option<&service_manager::ServiceManager>,
    ) -> Faultd {
        let socket = dir.path().join("faultd.sock");
        let log = dir.path().join("faultd.log");
        let launch = Launch {
            extra,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            under: under.iter().map(|&u| u.to_owned()).collect(),
            store: dir.path().join("store"),
            manager: manager.map(|m| (m.notify_socket().to_owned(), m.state.clone())),
        };
        let child = launch.start(&socket, &log);
        Faultd {
            child,
            socket,
            log,
            launch,
            _dir: dir,
        }
    }

    /// Kills faultd with SIGKILL (a crash: nothing of it runs any more) and waits for it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts faultd again as it was started, on the same socket, store directory and log
    /// (appended to), as systemd's Restart= would; waits until it accepts. The previous one
    /// must have exited.
    pub fn restart(&mut self) {
        assert!(!self.alive(), "faultd is still running");
        self.child = self.launch.start(&self.socket, &self.log);
        self.wait_accepting();
    }

    /// The log file (faultd's stderr, every run of it).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The swap store directory.
    pub fn store_dir(&self) -> &Path {
        &self.launch.store
    }
}

impl Launch {
    fn start(&self, socket: &Path, log: &Path) -> Child {
        let mut under = self.under.clone();
        // Passed fds: LISTEN_PID must be the started process's own pid, which a shell that
        // execs faultd knows as $$.
        let passed = self
            .manager
            .as_ref()
            .map(|(_, state)| service_manager::to_pass(state))
            .filter(|(fds, _)| !fds.is_empty());
        if passed.is_some() {
            under = ["sh", "-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\""]
                .iter()
                .map(Into::into)
                .collect();
        }
        let mut cmd = match under.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                for a in args {
                    if *a == "{socket}" {
                        cmd.arg(socket);
                    } else {
                        cmd.arg(a);
                    }
                }
                cmd.arg(faultd_bin());
                cmd
            }
            None => Command::new(faultd_bin()),
        };
        cmd.arg("--socket")
            .arg(socket)
            .arg("--store-dir")
            .arg(&self.store)
            .arg("--log")
            .arg("info");
        if !self.extra.iter().any(|a| a == "--metrics-listen") {
            cmd.args(["--metrics-listen", "127.0.0.1:0"]);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some((notify, _)) = &self.manager {
            cmd.env("NOTIFY_SOCKET", notify);
        }
        if let Some((fds, names)) = passed {
            cmd.env("LISTEN_FDS", fds.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
            let raw: Vec<i32> = fds.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
            // SAFETY: runs in the child between fork and exec, and only calls dup2(2), which is
            // async-signal-safe; `raw` was allocated before the fork. The sources are above
            // fd 100 (see to_pass), so moving them to 3.. overwrites none of them.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                    for (i, &fd) in raw.iter().enumerate() {
                        if libc::dup2(fd, 3 + i as i32) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
            // The duplicates live until the child has them (spawn returns after exec).
            let child = self.finish_spawn(cmd, log);
            drop(fds);
            return child;
        }
        self.finish_spawn(cmd, log)
    }

    fn finish_spawn(&self, mut cmd: Command, log: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        cmd.args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning faultd")
    }
}

impl Faultd {
    /// Waits until the control socket accepts connections.
    pub fn wait_accepting(&mut self) {
        if let Err(status) = self.try_wait_accepting() {
            panic!("faultd exited with {status} at start:\n{}", self.log());
        }
    }

    /// Waits until the control socket accepts connections, or faultd exits: its status then.
    pub fn try_wait_accepting(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Client::connect(&self.socket).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "faultd did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything faultd logged so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The value of an unlabelled metric on faultd's endpoint (panics if it is not there).
    pub fn metric(&self, name: &str) -> u64 {
        let (status, body) = http_get(&self.metrics_addr(), "/metrics");
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {name} in:\n{body}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Where faultd serves metrics (`IP:PORT`), from the address it logs at start (the last
    /// start's, after a [`Faultd::restart`]).
    pub fn metrics_addr(&self) -> String {
        const AT: &str = "metrics served at http://";
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if let Some(rest) = log.rfind(AT).map(|i| &log[i + AT.len()..]) {
                if let Some(addr) = rest.split("/metrics").next() {
                    return addr.to_owned();
                }
            }
            assert!(
                Instant::now() < deadline,
                "faultd logged no metrics address:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks faultd to serve Firecracker restores of `vm` on `socket` from `snapshot`.
    pub fn listen_firecracker(
        &self,
        vm: &str,
        socket: &Path,
        snapshot: &Path,
        uid: Option<u32>,
        pid: Option<i32>,
    ) -> Result<(), faultd_client::ClientError> {
        Client::connect(&self.socket)?.firecracker_listen(faultd_client::FirecrackerListen {
            vm: vm.to_owned(),
            socket: socket.to_owned(),
            snapshot: Some(snapshot.to_owned()),
            object: None,
            uid,
            pid,
        })
    }

    /// Asks faultd to serve Firecracker restores of `vm` on `socket` from object `key` of
    /// store `store`.
    pub fn listen_firecracker_object(
        &self,
        vm: &str,
        socket: &Path,
        store: &str,
        key: &str,
        uid: Option<u32>,
    ) -> Result<(), faultd_client::ClientError> {
        Client::connect(&self.socket)?.firecracker_listen(faultd_client::FirecrackerListen {
            vm: vm.to_owned(),
            socket: socket.to_owned(),
            snapshot: None,
            object: Some(faultd_proto::ObjectName {
                store: store.to_owned(),
                key: key.to_owned(),
            }),
            uid,
            pid: None,
        })
    }

    /// The counters of every live session named `vm`.
    pub fn vm_stats(&self, vm: &str) -> Vec<faultd_proto::SessionStats> {
        Client::connect(&self.socket)
            .and_then(|c| c.vm_stats(vm))
            .expect("vm_stats")
    }

    /// [`Faultd::vm_stats`] once `done` holds (or after 5 s, whatever they are then): counters
    /// trail the faults they count by a moment (see [`settled_stats`]).
    pub fn settled_vm_stats(
        &self,
        vm: &str,
        done: impl Fn(&[faultd_proto::SessionStats]) -> bool,
    ) -> Vec<faultd_proto::SessionStats> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.vm_stats(vm);
            if done(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits up to `timeout` for `needle` to appear in the log; whether it did.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `sig` to faultd.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, sig).expect("signalling faultd");
    }

    /// Waits up to `timeout` for faultd to exit; its status, or None if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait faultd");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Faultd {
    fn drop(&mut self) {
        if self.alive() {
            self.terminate();
        }
    }
}

/// Guest RAM registered with a uffd, not yet handed to faultd.
#[derive(Debug)]
pub struct Ram {
    // Field order is drop order: the uffd closes before the RAM is unmapped, so the unmap never
    // waits on an event nobody reads.
    /// Its userfaultfd.
    pub uffd: Uffd,
    /// The RAM.
    pub ram: GuestRam,
}

impl Ram {
    /// `size` bytes of 4 KiB-page memfd RAM, registered MISSING with a fresh uffd.
    pub fn new(name: &str, size: u64) -> Ram {
        Ram::with_page_size(name, size, RamPageSize::Size4K)
    }

    /// As [`Ram::new`] with a chosen page size.
    pub fn with_page_size(name: &str, size: u64, page: RamPageSize) -> Ram {
        let ram = GuestRam::new(name, size, page).expect("guest RAM");
        let uffd = create_uffd().expect("uffd");
        ram.register(&uffd).expect("uffd register");
        Ram { ram, uffd }
    }

    /// A KVM VM with this RAM as its one memory slot at GPA 0. A run stops with an error after
    /// `timeout`: a fault faultd never answers must fail the test, not hang it.
    pub fn vm(&self, timeout: Duration) -> testvmm::Vm {
        bench::one_slot_vm(self.ram.host_ptr(), self.ram.size(), timeout)
    }

    /// Registers with faultd as a zero-filled region at GPA 0.
    pub fn serve(&self, faultd: &Faultd, vm: &str) -> Session {
        Client::connect(faultd.socket())
            .expect("connect")
            .register(vm, &self.uffd, &[RegionSpec::zero(0, &self.ram)], None)
            .expect("register")
    }

    /// Registers with faultd as a VMM restoring `snapshot` lazily: one region at GPA 0, filled
    /// from file offset 0.
    pub fn serve_snapshot(&self, faultd: &Faultd, vm: &str, snapshot: &std::fs::File) -> Session {
        use std::os::fd::AsFd;
        Client::connect(faultd.socket())
            .expect("connect")
            .register(
                vm,
                &self.uffd,
                &[RegionSpec::snapshot(0, &self.ram, 0)],
                Some(snapshot.as_fd()),
            )
            .expect("register")
    }
}

/// A raw `register` of all of `ram` as one zero-filled region at GPA 0, naming the uffd as fd 0
/// and the memory as fd 1: the packet a test sends by hand to see what faultd makes of it.
pub fn zero_register(vm: &str, ram: &GuestRam) -> faultd_proto::Register {
    faultd_proto::Register {
        version: faultd_proto::PROTOCOL_VERSION,
        vm: vm.into(),
        uffd: faultd_proto::FdIndex(0),
        regions: vec![faultd_proto::RegionDesc {
            gpa: 0,
            size: ram.size(),
            page_size: 4096,
            hva: ram.host_addr(),
            mem: faultd_proto::FdIndex(1),
            mem_offset: 0,
            backing: faultd_proto::BackingDesc::Zero,
            read_only: false,
        }],
        snapshot: None,
        object: None,
        resume: false,
    }
}

/// [`zero_register`] encoded for the wire.
pub fn zero_register_bytes(vm: &str, ram: &GuestRam) -> Vec<u8> {
    faultd_proto::encode(&faultd_proto::Request::Register(zero_register(vm, ram)))
        .expect("encoding register")
}

/// Sends `bytes` with `fds` on a fresh connection and returns faultd's refusal, after checking
/// that faultd closed that connection (an error ends the session it arrived on).
pub fn refused_raw(
    faultd: &Faultd,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> (faultd_proto::ErrorCode, String) {
    let mut conn = Client::connect(faultd.socket()).unwrap().into_raw();
    conn.send(bytes, fds).unwrap();
    let refusal = match conn.recv_response().unwrap() {
        faultd_proto::Response::Error { code, message } => (code, message),
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(
        conn.recv().unwrap().is_none(),
        "connection left open after {refusal:?}"
    );
    refusal
}

/// The session's stats once `done` holds (or after 5 s, whatever they are then).
///
/// faultd's counters trail the fault by a moment: the uffd ioctl that installs a page also
/// wakes the faulting thread, before faultd counts the fault. So a test that reads stats right
/// after touching memory waits for the figure it expects instead of racing for it.
pub fn settled_stats(
    session: &mut Session,
    done: impl Fn(&faultd_proto::SessionStats) -> bool,
) -> faultd_proto::SessionStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = session.stats().expect("stats");
        if done(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The session's stats once faultd's count of resident bytes has caught up with what the memfd
/// holds (`allocated`), or after 5 s. A faulting thread is woken by the very uffd copy that
/// installs its page, a moment before faultd records the page resident, so stats read right
/// after a workload can lag by the page(s) still being completed; after that moment they agree
/// exactly, and a test then compares them exactly.
pub fn resident_settled(
    session: &mut Session,
    allocated: impl Fn() -> u64,
) -> faultd_proto::SessionStats {
    settled_stats(session, |s| s.resident_bytes == allocated())
}

/// Reads byte `off` of `ram` from a helper thread; a fault there blocks until faultd serves it,
/// so a dead or stuck faultd makes this panic after `timeout` instead of hanging the test.
pub fn read_with_timeout(ram: &GuestRam, offs: Vec<u64>, timeout: Duration) -> Vec<u8> {
    let base = ram.host_addr() as usize;
    let size = ram.size();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let v: Vec<u8> = offs
            .iter()
            .map(|&o| {
                assert!(o < size);
                // SAFETY: `base + o` lies in the live shared mapping of the RAM (checked
                // against its size above); a volatile byte read creates no reference.
                unsafe { std::ptr::read_volatile((base + o as usize) as *const u8) }
            })
            .collect();
        let _ = tx.send(v);
    });
    rx.recv_timeout(timeout)
        .expect("guest RAM access was not served in time")
}

/// Writes `val` at byte `off` of each page in `offs` from a helper thread, with a timeout.
pub fn write_with_timeout(ram: &GuestRam, writes: Vec<(u64, u8)>, timeout: Duration) {
    let base = ram.host_addr() as usize;
    let size = ram.size();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (o, v) in writes {
            assert!(o < size);
            // SAFETY: as in read_with_timeout; a volatile byte write creates no reference.
            unsafe { std::ptr::write_volatile((base + o as usize) as *mut u8, v) };
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(timeout)
        .expect("guest RAM access was not served in time");
}

/// A plain HTTP/1.0 GET of `path` (with its query) from `addr` (`IP:PORT`) on loopback:
/// the status and the body. HTTP/1.0 keeps the reply unchunked and closes the connection.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::Write;
    let mut conn = std::net::TcpStream::connect(addr).expect("connecting to the HTTP server");
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").expect("sending the request");
    let mut reply = String::new();
    conn.read_to_string(&mut reply).expect("reading the reply");
    let (head, body) = reply.split_once("\r\n\r\n").unwrap_or((&reply, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {head}"));
    (status, body.to_owned())
}

/// `s` percent-encoded for a URL query value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Path of a tool the test needs, or a panic saying how to get it (`scripts/setup` installs
/// every tool the tests use).
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: run scripts/setup");
}

/// Reserves `n` more 2 MiB huge pages (for hugetlb guest RAM) for the holder's lifetime and
/// gives them back on drop.
#[derive(Debug)]
pub struct HugePages {
    before: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePages {
    /// Raises the pool by `n`; panics if the kernel grants fewer.
    pub fn reserve(n: u64) -> HugePages {
        let read = || -> u64 {
            std::fs::read_to_string(NR_HUGEPAGES)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let before = read();
        std::fs::write(NR_HUGEPAGES, (before + n).to_string()).unwrap();
        let now = read();
        assert!(
            now >= before + n,
            "could reserve only {} of {n} huge pages",
            now - before
        );
        HugePages { before }
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

/// Swap for the holder's lifetime, for tests that page anonymous memory out (the kernel pages
/// it out only to swap). If the machine has no swap, 256 MiB are made and enabled: a zram
/// device where the kernel has zram (memory-backed, so a test's swap-ins do not wait on a disk
/// that a build may be busy writing to), else a swap file in /var/tmp (a disk file system: the
/// kernel refuses swap files on tmpfs). It is disabled and removed when the last holder in this
/// process drops it; swap that was there is left alone.
#[derive(Debug)]
pub struct Swap(());

/// Swap made for the holders of [`Swap`].
#[derive(Debug)]
enum MadeSwap {
    /// zram device number N (/dev/zramN).
    Zram(u32),
    File(PathBuf),
}

/// Holders of [`Swap`] in this process, and the swap made for them (None: it was there).
static SWAP: std::sync::Mutex<(usize, Option<MadeSwap>)> = std::sync::Mutex::new((0, None));

const ZRAM_CONTROL: &str = "/sys/class/zram-control";

fn swap_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("SwapTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("SwapTotal in /proc/meminfo")
}

fn run_tool(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Swap {
    /// Makes sure swap is enabled; panics (saying why) if it cannot be.
    pub fn enable() -> Swap {
        let mut held = SWAP.lock().unwrap_or_else(|p| p.into_inner());
        if held.0 == 0 && swap_total_kib() == 0 {
            held.1 = Some(if Path::new(ZRAM_CONTROL).exists() {
                let n: u32 = std::fs::read_to_string(format!("{ZRAM_CONTROL}/hot_add"))
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                std::fs::write(format!("/sys/block/zram{n}/disksize"), "256M").unwrap();
                let dev = format!("/dev/zram{n}");
                run_tool("mkswap", &[&dev]);
                run_tool("swapon", &[&dev]);
                MadeSwap::Zram(n)
            } else {
                let path =
                    PathBuf::from(format!("/var/tmp/faultd-test-{}.swap", std::process::id()));
                let p = path.to_str().unwrap();
                // Allocated, not sparse: the kernel refuses a swap file with holes.
                run_tool("fallocate", &["-l", "256M", p]);
                std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
                run_tool("mkswap", &[p]);
                run_tool("swapon", &[p]);
                MadeSwap::File(path)
            });
        }
        held.0 += 1;
        Swap(())
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        let mut held = SWAP.lock().unwrap_or_else(|p| p.into_inner());
        held.0 -= 1;
        if held.0 == 0 {
            match held.1.take() {
                Some(MadeSwap::Zram(n)) => {
                    let _ = Command::new("swapoff")
                        .arg(format!("/dev/zram{n}"))
                        .status();
                    let _ = std::fs::write(format!("{ZRAM_CONTROL}/hot_remove"), n.to_string());
                }
                Some(MadeSwap::File(path)) => {
                    let _ = Command::new("swapoff").arg(&path).status();
                    let _ = std::fs::remove_file(&path);
                }
                None => {}
            }
        }
    }
}

/// The seed of a randomised test: `FAULTD_SEED` if set, else the clock. Printed, so that a
/// failure can be rerun with the same one.
pub fn seed() -> u64 {
    seed_from("FAULTD_SEED")
}

/// As [`seed`], read from the environment variable `var`.
pub fn seed_from(var: &str) -> u64 {
    let s = std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("the clock is past 1970")
                .as_nanos() as u64
        });
    println!("seed {s} (rerun with {var}={s})");
    s
}

/// One 4 KiB page of [`testvmm::pattern`] for `gpa` and `seed`: what device rounds write.
pub fn pattern_page(gpa: u64, seed: u32) -> Vec<u8> {
    (0..4096 / 4)
        .flat_map(|i| testvmm::pattern(gpa + 4 * i, seed).to_le_bytes())
        .collect()
}

/// An unnamed snapshot file of `size` bytes (whole pages) whose every dword at guest address
/// `a` is `pattern(a, seed)`.
pub fn pattern_snapshot(size: u64, seed: u32) -> std::fs::File {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(tempfile::tempfile().expect("snapshot tempfile"));
    for p in 0..size / 4096 {
        f.write_all(&pattern_page(p * 4096, seed))
            .expect("writing snapshot file");
    }
    f.into_inner().expect("flushing snapshot file")
}

/// One round of the device workload of the chaos and restart tests: DMA-writes
/// [`pattern_page`]s to `touches` pseudo-random 4 KiB pages of `[first, first + count)`
/// (alternating workers 0 and 1), then reads every page back (worker 0) and checks it holds
/// its write. Panics naming the page and `context` on a failed transfer or a lost write.
pub fn device_round(
    device: &testvmm::PriDevice,
    seed: u32,
    touches: u32,
    first: u32,
    count: u32,
    context: &str,
) {
    let seq = testvmm::page_sequence(seed, touches, first, count);
    for &p in &seq {
        let gpa = u64::from(p) * 4096;
        device
            .dma_write(p % 2, gpa, &pattern_page(gpa, seed))
            .unwrap_or_else(|e| panic!("DMA write {gpa:#x}: {e} ({context})"));
    }
    let mut buf = vec![0u8; 4096];
    // Every write of a round has the same pattern, so each page once, in any order.
    for &p in seq.iter().collect::<std::collections::BTreeSet<_>>() {
        let gpa = u64::from(p) * 4096;
        device
            .dma_read(0, gpa, &mut buf)
            .unwrap_or_else(|e| panic!("DMA read {gpa:#x}: {e} ({context})"));
        assert!(
            buf == pattern_page(gpa, seed),
            "page {gpa:#x} lost a DMA write ({context})"
        );
    }
}

/// Writes a faultd configuration file as an operator should: mode 0600, whatever the umask
/// (faultd refuses a file others may write, or read when it holds a secret key).
pub fn write_config(path: &Path, toml: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, toml).expect("writing the faultd config");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 the faultd config");
}

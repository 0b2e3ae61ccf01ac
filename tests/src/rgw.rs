//! A private single-node Ceph radosgw (S3) on 127.0.0.1 for tests: one mon, one memstore OSD
//! and one radosgw, each in the foreground as a child of the test, in a directory and on ports
//! of its own (parallel tests do not collide), with one user and one bucket. Everything is
//! killed and removed on drop.
//!
//! The settings that a single-node radosgw needs, each learnt from a failure, are the comments
//! in `ceph_conf`. Every step runs under a deadline: a radosgw that cannot authenticate hangs
//! forever instead of failing.
//!
//! Why memstore: it is ready in about a second (bluestore on a sparse file takes about five),
//! and the restart the tests need is of radosgw itself ([`Rgw::kill_gateway`] then
//! [`Rgw::start_gateway`]): the S3 endpoint vanishes and comes back on the same port while the
//! OSD, and with it every object, stays up. memstore loses its data only when the OSD process
//! goes, which no test does; a test that must restart the OSD too needs bluestore.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Access key of the test user.
pub const ACCESS_KEY: &str = "faultdtestkey";
/// Secret key of the test user.
pub const SECRET_KEY: &str = "faultdtestsecret";
/// Region the gateway accepts in signatures (radosgw takes any; the client must name one).
pub const REGION: &str = "us-east-1";
/// The bucket every [`Rgw`] creates.
pub const BUCKET: &str = "faultd-test";

/// faultd's config for one store, `rgw`, that is never reached (port 9, discard): for the
/// checks faultd makes before any request to a store (a uid's prefix, the store's name).
pub const UNREACHABLE_STORE: &str = r#"[[object_store.stores]]
name = "rgw"
endpoint = "http://127.0.0.1:9"
region = "us-east-1"
bucket = "b"
access_key = "k"
secret_key = "s"
prefix = "tenants/{uid}/"
"#;

/// How long any one step of the start may take before the start fails.
const STEP_DEADLINE: Duration = Duration::from_secs(60);

/// A running radosgw with its mon and OSD; all killed and their directory removed on drop.
#[derive(Debug)]
pub struct Rgw {
    dir: tempfile::TempDir,
    conf: PathBuf,
    rgw_port: u16,
    mon: Option<Child>,
    osd: Option<Child>,
    gateway: Option<Child>,
    started_in: Duration,
}

impl Rgw {
    /// Starts mon, OSD and radosgw in a fresh directory on free loopback ports, creates the
    /// user and [`BUCKET`]; panics (with the daemons' logs) when a step fails or overruns.
    pub fn start() -> Rgw {
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("faultd-rgw-")
            .tempdir()
            .expect("rgw tempdir");
        let d = dir.path();
        for sub in ["mon", "osd", "rgw", "run", "log", "crash"] {
            std::fs::create_dir_all(d.join(sub)).expect("rgw subdir");
        }
        let mon_port = free_port();
        let rgw_port = free_port();
        let (ms_min, ms_max) = free_port_range(12);
        let fsid = uuid();
        let conf = d.join("ceph.conf");
        std::fs::write(
            &conf,
            ceph_conf(d, &fsid, mon_port, rgw_port, ms_min, ms_max),
        )
        .expect("ceph.conf");
        let mut rgw = Rgw {
            conf: conf.clone(),
            rgw_port,
            mon: None,
            osd: None,
            gateway: None,
            started_in: Duration::ZERO,
            dir,
        };
        let d = rgw.dir.path().to_owned();
        let c = conf.to_str().expect("utf-8 path").to_owned();
        let monmap = d.join("monmap");
        let keyring = d.join("keyring");
        rgw.run(
            "monmaptool",
            &[
                "--create",
                "--fsid",
                &fsid,
                "--addv",
                "a",
                &format!("[v2:127.0.0.1:{mon_port}]"),
                monmap.to_str().unwrap(),
            ],
        );
        rgw.run(
            "ceph-authtool",
            &[
                "--create-keyring",
                keyring.to_str().unwrap(),
                "--gen-key",
                "-n",
                "mon.",
                "--cap",
                "mon",
                "allow *",
            ],
        );
        rgw.run(
            "ceph-mon",
            &[
                "-c",
                &c,
                "--mkfs",
                "-i",
                "a",
                "--monmap",
                monmap.to_str().unwrap(),
                "--keyring",
                keyring.to_str().unwrap(),
            ],
        );
        rgw.mon = Some(daemon("ceph-mon", &["-f", "-c", &c, "-i", "a"]));
        let osd_uuid = uuid();
        let osd_id = rgw.run("ceph", &["-c", &c, "osd", "new", &osd_uuid]);
        let osd_id = osd_id.trim().to_owned();
        assert!(
            osd_id.chars().all(|ch| ch.is_ascii_digit()) && !osd_id.is_empty(),
            "ceph osd new printed {osd_id:?}"
        );
        std::fs::create_dir_all(d.join("osd").join(&osd_id)).expect("osd dir");
        rgw.run(
            "ceph-osd",
            &["-c", &c, "-i", &osd_id, "--mkfs", "--osd-uuid", &osd_uuid],
        );
        rgw.osd = Some(daemon("ceph-osd", &["-f", "-c", &c, "-i", &osd_id]));
        let deadline = Instant::now() + STEP_DEADLINE;
        loop {
            let stat = rgw.run("ceph", &["-c", &c, "osd", "stat", "-f", "json"]);
            if stat.contains("\"num_up_osds\":1") {
                break;
            }
            rgw.check_deadline(deadline, "the OSD coming up");
            std::thread::sleep(Duration::from_millis(100));
        }
        rgw.start_gateway();
        rgw.run(
            "radosgw-admin",
            &[
                "-c",
                &c,
                "user",
                "create",
                "--uid=faultdtest",
                "--display-name=faultd test",
                &format!("--access-key={ACCESS_KEY}"),
                &format!("--secret={SECRET_KEY}"),
            ],
        );
        rgw.create_bucket(BUCKET);
        rgw.started_in = t0.elapsed();
        rgw
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint (path-style).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.rgw_port)
    }

    /// How long [`Rgw::start`] took, from nothing to a bucket that takes objects.
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// Kills radosgw with SIGKILL and waits for it: the endpoint stops answering. The mon and
    /// the OSD (and so every object) stay.
    pub fn kill_gateway(&mut self) {
        if let Some(mut g) = self.gateway.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
    }

    /// Starts radosgw (again) on the same port and data; returns once it answers HTTP.
    pub fn start_gateway(&mut self) {
        assert!(self.gateway.is_none(), "radosgw is already running");
        let c = self.conf.to_str().expect("utf-8 path").to_owned();
        self.gateway = Some(daemon("radosgw", &["-f", "-c", &c, "-n", "client.rgw.a"]));
        let deadline = Instant::now() + STEP_DEADLINE;
        while !self.answers_http() {
            if let Some(status) = self.gateway.as_mut().and_then(|g| g.try_wait().ok()?) {
                panic!("radosgw exited with {status}\n{}", self.logs());
            }
            self.check_deadline(deadline, "radosgw answering HTTP");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates `bucket` with a SigV4-signed PUT (curl signs it; `object_store` cannot create
    /// buckets).
    pub fn create_bucket(&self, bucket: &str) {
        let out = self.curl(30, &["-X", "PUT", &format!("{}/{bucket}", self.endpoint())]);
        assert!(
            out.starts_with("200"),
            "creating bucket {bucket}: {out}\n{}",
            self.logs()
        );
    }

    /// Signed PUT of `body` as `bucket/key`; returns the HTTP status line's code.
    pub fn put(&self, bucket: &str, key: &str, body: &Path) -> String {
        // 30 s, and a second more per 16 MiB: a 1 GiB PUT into memstore takes longer than 30 s
        // on this machine (curl gave up: no HTTP status).
        let len = std::fs::metadata(body).map_or(0, |m| m.len());
        self.curl(
            30 + len / (16 << 20),
            &[
                "-X",
                "PUT",
                // Streamed from the file (`--data-binary @file` reads it all into memory first).
                "-T",
                &body.display().to_string(),
                &format!("{}/{bucket}/{key}", self.endpoint()),
            ],
        )
    }

    fn curl(&self, max_secs: u64, args: &[&str]) -> String {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time"])
            .arg(max_secs.to_string())
            .args(["--aws-sigv4", &format!("aws:amz:{REGION}:s3")])
            .args(["--user", &format!("{ACCESS_KEY}:{SECRET_KEY}")])
            // radosgw refuses a signed request without the payload hash header; UNSIGNED-PAYLOAD
            // covers any body (curl hashes none).
            .args(["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .args(args);
        let out = cmd.output().expect("running curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn answers_http(&self) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.rgw_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut head = [0u8; 12];
        s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 ")
    }

    /// Runs a Ceph tool to completion under [`STEP_DEADLINE`]; panics with its output and the
    /// daemons' logs if it fails or overruns. Returns its stdout.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program} (scripts/setup installs Ceph): {e}"));
        let deadline = Instant::now() + STEP_DEADLINE;
        loop {
            match child.try_wait().expect("waiting for a ceph tool") {
                Some(_) => break,
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "{program} {args:?} overran {STEP_DEADLINE:?}\n{}",
                        self.logs()
                    );
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let out = child.wait_with_output().expect("ceph tool output");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{program} {args:?}: {}\n{stdout}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        stdout
    }

    fn check_deadline(&self, deadline: Instant, what: &str) {
        assert!(
            Instant::now() < deadline,
            "{what} overran {STEP_DEADLINE:?}\n{}",
            self.logs()
        );
    }

    /// The tail of every daemon log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) else {
            return out;
        };
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out += &format!("--- {}\n", e.path().display());
            for l in tail.into_iter().rev() {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Rgw {
    fn drop(&mut self) {
        // SIGKILL: the directory (memstore's data is in the OSD's memory) is thrown away, and
        // SIGTERM takes radosgw about 5 s.
        for child in [&mut self.gateway, &mut self.osd, &mut self.mon]
            .into_iter()
            .flat_map(Option::take)
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts a Ceph daemon in the foreground (`-f`) as a child of the test, so that the test owns
/// and reaps it.
fn daemon(program: &str, args: &[&str]) -> Child {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {program} (scripts/setup installs Ceph): {e}"))
}

fn uuid() -> String {
    let out = Command::new("uuidgen").output().expect("uuidgen");
    String::from_utf8(out.stdout)
        .expect("uuidgen utf-8")
        .trim()
        .to_owned()
}

/// A loopback port free now (the kernel's choice for port 0).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("binding a free port")
        .port()
}

/// `n` consecutive loopback ports free now, for the OSD's messenger range.
fn free_port_range(n: u16) -> (u16, u16) {
    for _ in 0..200 {
        let base = free_port();
        if base.checked_add(n).is_none() {
            continue;
        }
        let held: Vec<_> = (base..base + n)
            .map_while(|p| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return (base, base + n - 1);
        }
    }
    panic!("no {n} consecutive free loopback ports");
}

/// The cluster's configuration: one mon, one memstore OSD, one radosgw, no auth, loopback only.
fn ceph_conf(d: &Path, fsid: &str, mon: u16, rgw: u16, ms_min: u16, ms_max: u16) -> String {
    let d = d.display();
    format!(
        r#"[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
# a range of our own: parallel tests do not collide
ms bind port min = {ms_min}
ms bind port max = {ms_max}
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon cluster log file = {d}/log/cluster.log
crash dir = {d}/crash
keyring = {d}/keyring
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd objectstore = memstore
# a cap, not an allocation: room for the benchmark's 1 GiB snapshot and its metadata
memstore device bytes = 4294967296
osd op num shards = 1
osd op num threads per shard = 2
debug ms = 0
# each osdmap change (the gateway's pool creates) otherwise waits ~1 s
paxos propose interval = 0.01
paxos min wait = 0.001
[mon]
mon data = {d}/mon/$id
[osd]
osd data = {d}/osd/$id
[client.rgw.a]
rgw data = {d}/rgw
# without tcp_nodelay a 4 KiB GET takes 48 ms at p50
rgw frontends = beast endpoint=127.0.0.1:{rgw} tcp_nodelay=1
rgw thread pool size = 32
# radosgw defaults to ms_mon_client_mode=secure, which auth=none cannot satisfy: it hangs
ms mon client mode = crc
"#
    )
}

//! Privileged work on paths a user can change (DESIGN-SKETCH invariant 6): the Firecracker
//! socket faultd creates in a directory an unprivileged user owns, and the snapshot file it
//! serves from. The attacker is a separate process running as [`ATTACKER`] (a fixed high
//! uid/gid with no account), which owns the jail directory, as Firecracker's jailer sets it up.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use faultd_client::{ClientError, RamPageSize};
use faultd_tests::firecracker::{copy_with_timeout, pattern_snapshot, FcRestore, WireForm, PAGE};
use faultd_tests::Faultd;

const MIB: u64 = 1 << 20;
/// The attacker's uid and gid (no passwd entry).
const ATTACKER: u32 = 61_012;
/// Pages every restore in these tests reads: 16, spread over the 4 MiB region.
const PAGES: u64 = 16;
const PAGE_STRIDE: u64 = 61 * PAGE;

/// Environment variable that turns [`attacker_child`] into the attacker: `race` or `restore`.
const CHILD: &str = "FAULTD_TEST_ATTACKER";

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A directory owned by the attacker (mode 0755), as a jailer makes for Firecracker.
fn jail() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(ATTACKER), Some(ATTACKER)).unwrap();
    set_mode(dir.path(), 0o755);
    dir
}

/// A root-owned file of `mode` with 4 MiB of pattern `seed`, in a root-owned directory of
/// `dir_mode`: its path (the directory is kept alive by the returned guard).
fn root_file(mode: u32, dir_mode: u32, seed: u32) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    set_mode(dir.path(), dir_mode);
    let path = dir.path().join("root-file");
    pattern_snapshot(&path, &[(0, 4 * MIB, 0)], seed);
    set_mode(&path, mode);
    (dir, path)
}

/// The bytes a restore reads: [`PAGES`] pages of `file` at the offsets the attacker reads.
fn expected_pages(file: &Path) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(file).unwrap();
    let mut out = vec![0u8; (PAGES * PAGE) as usize];
    for (i, chunk) in out.chunks_mut(PAGE as usize).enumerate() {
        f.read_exact_at(chunk, i as u64 * PAGE_STRIDE).unwrap();
    }
    out
}

/// Runs `f` on a thread; its result, or None if it took longer than `timeout` (the thread is
/// left behind).
fn within<T: Send + 'static>(
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(timeout).ok()
}

/// A refusal's message from a `firecracker_listen` that must be refused within 5 s.
fn listen_refused(faultd: &Faultd, vm: &str, socket: &Path, snapshot: &Path, uid: u32) -> String {
    let control = faultd.socket().to_owned();
    let req = faultd_client::FirecrackerListen {
        vm: vm.into(),
        socket: socket.into(),
        snapshot: Some(snapshot.into()),
        object: None,
        uid: Some(uid),
        pid: None,
    };
    let shown = format!("{req:?}");
    let answer = within(Duration::from_secs(5), move || {
        faultd_client::Client::connect(&control)?.firecracker_listen(req)
    })
    .unwrap_or_else(|| panic!("{shown}: no answer within 5 s"));
    match answer {
        Err(ClientError::Refused { message, .. }) => message,
        other => panic!("{shown}: expected a refusal, got {other:?}"),
    }
}

/// Runs [`attacker_child`] in `mode` as the attacker, with `env`.
fn attacker(mode: &str, env: &[(&str, &Path)]) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "attacker_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, mode)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Not a test on its own: the attacker, run by the tests below as a separate process.
/// - `race`: as the attacker from the start, forever (until killed): every socket that
///   appears in `JAIL` still owned by root is replaced by a symlink to `VICTIM`, and every
///   root-owned directory there (a private directory of faultd's) is moved aside and
///   replaced by one of the attacker's holding such a symlink as `s`.
/// - `restore`: maps guest RAM and creates its userfaultfd (as root, since unprivileged
///   userfaultfd is off here), becomes the attacker, renames `SWAP_FROM` over `SWAP_TO` if
///   given, restores through `SOCKET` and writes the pages it got to `OUT`.
#[test]
fn attacker_child() {
    match std::env::var(CHILD).as_deref() {
        Ok("race") => race(),
        Ok("restore") => restore(),
        _ => {}
    }
}

fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name).unwrap().into()
}

fn race() {
    let jail = env_path("JAIL");
    let victim = env_path("VICTIM");
    let link = jail.join(".attacker-link");
    // The racer shares its CPU with faultd, which runs SCHED_IDLE: a wake-up of the racer
    // preempts faultd right where it is (see the test).
    pin(0, RACE_CPU);
    // SAFETY: inotify_init1 takes flags only; its fd is owned by `_owned` below.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    assert!(
        fd >= 0,
        "inotify_init1: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just returned by inotify_init1 and nothing else owns it.
    let _owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let dir = std::ffi::CString::new(jail.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `dir` is a NUL-terminated path that lives across the call.
    let wd =
        unsafe { libc::inotify_add_watch(fd, dir.as_ptr(), libc::IN_CREATE | libc::IN_MOVED_TO) };
    assert!(
        wd >= 0,
        "inotify_add_watch: {}",
        std::io::Error::last_os_error()
    );
    let _ = std::os::unix::fs::symlink(&victim, &link);
    let mut buf = [0u8; 4096];
    let mut dirs = 0u64;
    // Blocks in read(2): each new name in the directory wakes the racer, which swaps it
    // before faultd runs on.
    loop {
        // SAFETY: `buf` is writable for its length, which is what read(2) is told.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        let mut at = 0;
        let header = std::mem::size_of::<libc::inotify_event>();
        while at + header <= n as usize {
            // SAFETY: the kernel wrote a whole event at `at` (n bytes are events); read
            // unaligned since `buf` has no particular alignment.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
            let raw = &buf[at + header..at + header + ev.len as usize];
            at += header + ev.len as usize;
            // The name is NUL-padded.
            let raw = raw.split(|&b| b == 0).next().unwrap_or_default();
            let name = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(raw);
            let target = jail.join(name);
            if name.as_encoded_bytes().ends_with(b".sock") {
                // Whatever faultd just made there becomes a link to the victim.
                let _ = std::fs::rename(&link, &target);
                let _ = std::os::unix::fs::symlink(&victim, &link);
            } else if name.as_encoded_bytes().starts_with(b".faultd")
                && ev.mask & libc::IN_ISDIR != 0
            {
                // Every other private directory of faultd's is moved aside for the
                // attacker's own, holding the link where faultd binds its socket.
                dirs += 1;
                let aside = jail.join(format!(".aside-{dirs}"));
                if dirs.is_multiple_of(2)
                    && std::fs::rename(&target, &aside).is_ok()
                    && std::fs::create_dir(&target).is_ok()
                {
                    let _ = std::os::unix::fs::symlink(&victim, target.join("s"));
                }
            }
        }
    }
}

/// The CPU the race is run on.
const RACE_CPU: usize = 0;

/// Pins thread `tid` (0: the caller) to `cpu`.
fn pin(tid: i32, cpu: usize) {
    // SAFETY: cpu_set_t is a plain bit array: all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes bit `cpu` (< CPU_SETSIZE) of `set`, which it borrows mutably.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the kernel reads size_of::<cpu_set_t>() bytes at `&set`, which `set` holds.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    assert_eq!(
        r,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

/// Puts every thread of process `pid` on [`RACE_CPU`] with SCHED_IDLE: any other thread that
/// wakes up there runs at once, in between two of faultd's system calls. (A racer with more
/// CPUs or more luck gets the same; this only makes the test not depend on luck.) Threads
/// made later inherit both.
fn idle_on_race_cpu(pid: u32) {
    for _ in 0..2 {
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
        {
            let tid: i32 = task.file_name().to_str().unwrap().parse().unwrap();
            pin(tid, RACE_CPU);
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: the kernel reads one sched_param at `&param`, which lives across the call.
            unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) };
        }
    }
}

fn restore() {
    let mut r = FcRestore::new(&[(4 * MIB, 0)], RamPageSize::Size4K).unwrap();
    let gid = nix::unistd::Gid::from_raw(ATTACKER);
    nix::unistd::setgroups(&[]).unwrap();
    nix::unistd::setgid(gid).unwrap();
    nix::unistd::setuid(nix::unistd::Uid::from_raw(ATTACKER)).unwrap();
    if let Some(from) = std::env::var_os("SWAP_FROM") {
        std::fs::rename(from, env_path("SWAP_TO")).unwrap();
    }
    r.send(&env_path("SOCKET"), WireForm::Current).unwrap();
    let addrs = (0..PAGES).map(|p| r.addr(0, p * PAGE_STRIDE)).collect();
    let got = copy_with_timeout(addrs, PAGE as usize, Duration::from_secs(5));
    std::fs::write(env_path("OUT"), got.concat()).unwrap();
    println!("attacker restored");
}

/// Runs a `restore` attacker through `socket`, renaming `swap` (from, to) first: the bytes it
/// got, or None if its restore was not served (with its output, for the failure message).
fn attacker_restore(
    jail: &Path,
    socket: &Path,
    swap: Option<(&Path, &Path)>,
) -> Result<Vec<u8>, String> {
    let out = jail.join("got");
    let mut env = vec![("SOCKET", socket), ("OUT", out.as_path())];
    if let Some((from, to)) = swap {
        env.extend([("SWAP_FROM", from), ("SWAP_TO", to)]);
    }
    let done = attacker("restore", &env).output().unwrap();
    let text = String::from_utf8_lossy(&done.stdout);
    if !(done.status.success() && text.contains("attacker restored")) {
        return Err(format!("{text}\n{}", String::from_utf8_lossy(&done.stderr)));
    }
    Ok(std::fs::read(&out).unwrap())
}

#[test]
fn a_racer_swapping_new_sockets_for_symlinks_never_gets_a_root_file_chowned_or_chmodded() {
    let jail = jail();
    let (_victim_dir, victim) = root_file(0o644, 0o700, 1);
    let before = std::fs::metadata(&victim).unwrap();
    let (_snap_dir, snapshot) = root_file(0o644, 0o755, 2);
    let mut racer = attacker("race", &[("JAIL", jail.path()), ("VICTIM", &victim)])
        .uid(ATTACKER)
        .gid(ATTACKER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // faultd listens and stops listening (its shutdown removes the sockets) round after round.
    let mut listened = 0;
    for round in 0..2 {
        let faultd = Faultd::start(&[]);
        idle_on_race_cpu(faultd.pid());
        for i in 0..25 {
            let socket = jail.path().join(format!("fc{round}-{i}.sock"));
            let vm = format!("fc{round}-{i}");
            if faultd
                .listen_firecracker(&vm, &socket, &snapshot, Some(ATTACKER), None)
                .is_ok()
            {
                listened += 1;
            }
        }
        drop(faultd);
    }
    racer.kill().unwrap();
    racer.wait().unwrap();

    let after = std::fs::metadata(&victim).unwrap();
    assert_eq!(
        (after.uid(), after.gid(), after.mode() & 0o7777),
        (before.uid(), before.gid(), 0o644),
        "the root file's owner or mode changed ({listened} listens went through)"
    );
    assert!(listened > 0, "no listen went through the race at all");
}

#[test]
fn a_snapshot_symlink_to_a_root_only_file_is_refused_naming_it_and_no_byte_of_it_reaches_the_peer()
{
    let jail = jail();
    let (_secret_dir, secret) = root_file(0o600, 0o700, 7);
    let secret_pages = expected_pages(&secret);
    // The attacker's own snapshot, and a link it made to the root-only file.
    let mem = jail.path().join("mem");
    pattern_snapshot(&mem, &[(0, 4 * MIB, 0)], 3);
    std::os::unix::fs::chown(&mem, Some(ATTACKER), Some(ATTACKER)).unwrap();
    set_mode(&mem, 0o600);
    let own_pages = expected_pages(&mem);
    let link = jail.path().join("link");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(ATTACKER), Some(ATTACKER)).unwrap();
    let faultd = Faultd::start(&[]);

    // Named as the snapshot: refused, naming it.
    let message = listen_refused(
        &faultd,
        "fc-link",
        &jail.path().join("link.sock"),
        &link,
        ATTACKER,
    );
    assert!(
        message.contains(&link.display().to_string()) && message.contains("symbolic link"),
        "{message}"
    );
    assert!(!jail.path().join("link.sock").exists());

    // Swapped in after faultd listens: the restore is served the file faultd was told of.
    let socket = jail.path().join("fc.sock");
    faultd
        .listen_firecracker("fc-swap", &socket, &mem, Some(ATTACKER), None)
        .unwrap();
    let got = attacker_restore(jail.path(), &socket, Some((&link, &mem))).unwrap();

    assert!(
        got != secret_pages,
        "the root-only file's pages reached the peer"
    );
    assert!(
        got == own_pages,
        "the restore was not served the snapshot faultd opened"
    );
}

#[test]
fn a_fifo_snapshot_is_refused_at_once_other_listeners_keep_working_and_faultd_exits_on_sigterm() {
    let jail = jail();
    let fifo = jail.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    std::os::unix::fs::chown(&fifo, Some(ATTACKER), Some(ATTACKER)).unwrap();
    let mem = jail.path().join("mem");
    pattern_snapshot(&mem, &[(0, 4 * MIB, 0)], 4);
    std::os::unix::fs::chown(&mem, Some(ATTACKER), Some(ATTACKER)).unwrap();
    let own_pages = expected_pages(&mem);
    let (_ok_dir, ok_snapshot) = root_file(0o600, 0o700, 5);
    let mut faultd = Faultd::start(&[]);
    let ok_socket = tempfile::tempdir().unwrap();
    let ok_socket = ok_socket.path().join("ok.sock");
    faultd
        .listen_firecracker("fc-ok", &ok_socket, &ok_snapshot, None, None)
        .unwrap();

    // Named as the snapshot: refused at once, naming it.
    let message = listen_refused(
        &faultd,
        "fc-fifo",
        &jail.path().join("fifo.sock"),
        &fifo,
        ATTACKER,
    );
    assert!(
        message.contains(&fifo.display().to_string()) && message.contains("not a regular file"),
        "{message}"
    );
    // Swapped in after faultd listens: the restore is still served, from the file.
    let socket = jail.path().join("fc.sock");
    faultd
        .listen_firecracker("fc-swap", &socket, &mem, Some(ATTACKER), None)
        .unwrap();
    let got = attacker_restore(jail.path(), &socket, Some((&fifo, &mem)));
    // Another VM's restore is served meanwhile and after.
    let mut ok = FcRestore::new(&[(4 * MIB, 0)], RamPageSize::Size4K).unwrap();
    ok.send(&ok_socket, WireForm::Current).unwrap();
    let ok_got = copy_with_timeout(
        (0..PAGES).map(|p| ok.addr(0, p * PAGE_STRIDE)).collect(),
        PAGE as usize,
        Duration::from_secs(5),
    );
    ok.hang_up();
    faultd.signal(nix::sys::signal::Signal::SIGTERM);
    let exit = faultd.wait_exit(Duration::from_secs(10));

    assert!(
        got.unwrap() == own_pages,
        "the swapped restore got other bytes"
    );
    assert!(ok_got.concat() == expected_pages(&ok_snapshot));
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "{}", faultd.log());
}

#[test]
fn a_root_only_snapshot_is_refused_when_the_admitted_uid_is_someone_else() {
    let jail = jail();
    let (_dir, root_only) = root_file(0o600, 0o755, 8);
    // Readable by all, but in a directory only root may enter.
    let (_hidden_dir, hidden) = root_file(0o644, 0o700, 9);
    let faultd = Faultd::start(&[]);
    let started = Instant::now();

    for (vm, snapshot) in [("fc-root-only", &root_only), ("fc-hidden", &hidden)] {
        let socket = jail.path().join(format!("{vm}.sock"));
        let message = listen_refused(&faultd, vm, &socket, snapshot, ATTACKER);
        assert!(
            message.contains(&snapshot.display().to_string())
                && message.contains(&format!("uid {ATTACKER}")),
            "{message}"
        );
        assert!(!socket.exists());
    }
    // Root (no rule: only root may connect) may be served it.
    faultd
        .listen_firecracker(
            "fc-root",
            &jail.path().join("root.sock"),
            &root_only,
            None,
            None,
        )
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_config_entry_whose_snapshot_is_a_symlink_stops_faultd_at_start_naming_it() {
    let jail = jail();
    let (_secret_dir, secret) = root_file(0o600, 0o700, 10);
    let link = jail.path().join("mem");
    std::os::unix::fs::symlink(&secret, &link).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("faultd.toml");
    std::fs::write(
        &config,
        format!(
            "[[firecracker]]\nvm = \"fc0\"\nsocket = \"{}\"\nsnapshot = \"{}\"\nuid = {ATTACKER}\n",
            jail.path().join("fc.sock").display(),
            link.display()
        ),
    )
    .unwrap();

    let mut faultd = Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(dir.path().join("faultd.sock"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = faultd.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            faultd.kill().unwrap();
            faultd.wait().unwrap();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut faultd.stderr.take().unwrap(), &mut err).unwrap();

    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(
        err.contains(&link.display().to_string()) && err.contains("symbolic link"),
        "{err}"
    );
    assert!(!jail.path().join("fc.sock").exists());
}

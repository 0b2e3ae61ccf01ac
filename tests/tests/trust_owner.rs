//! A VM, its sessions and its store belong to the uid that created them (SO_PEERCRED).
//!
//! Victim and attacker are VMMs of two different uids that are not root, both able to connect
//! to the control socket (its mode is opened to everyone here, as a group would in
//! production). Each runs as its own process (`owner-vmm`, which drops to its uid before it
//! connects). The attacker knows the victim's VM name and session id, and tries every request
//! that names a VM: resume, a fresh register over it, stats, detail and eviction. Each is
//! refused or reaches only the attacker's own VM; the victim's store files are byte-identical
//! afterwards, and the victim reads back every page it wrote.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use faultd_tests::Faultd;

const VICTIM: u32 = 61_001;
const ATTACKER: u32 = 61_002;
const PAGES: u64 = 64;

/// An `owner-vmm` process of one uid, driven a command a line.
struct Vmm {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<String>,
}

impl Vmm {
    fn start(faultd: &Faultd, uid: u32) -> Vmm {
        let mut child = Command::new(env!("CARGO_BIN_EXE_owner-vmm"))
            .arg(faultd.socket())
            .arg(uid.to_string())
            .arg(PAGES.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning owner-vmm");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, answers) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Vmm {
            child,
            stdin,
            answers,
        }
    }

    fn ask(&mut self, command: &str) -> String {
        writeln!(self.stdin, "{command}").expect("writing to owner-vmm");
        self.answers
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("owner-vmm did not answer {command:?}"))
    }

    /// Registers `vm` (with `resume`); the session id.
    fn register(&mut self, vm: &str, resume: bool) -> u64 {
        let answer = self.ask(&format!("register {vm} {}", u8::from(resume)));
        let id = answer
            .strip_prefix("ok ")
            .unwrap_or_else(|| panic!("{answer}"));
        id.parse().expect("session id")
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lets every uid connect to the control socket (the test stands in for the socket's group).
fn open_socket(faultd: &Faultd) {
    let open = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode));
    open(faultd.socket().parent().unwrap(), 0o755).unwrap();
    open(faultd.socket(), 0o666).unwrap();
}

/// Every file under `dir` and its bytes, but for those under `except` (the attacker's own).
fn files(dir: &Path, except: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.starts_with(except) {
                continue;
            }
            if entry.file_type().unwrap().is_dir() {
                todo.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

/// `faultd ctl ARGS` run as `uid`: its exit code and stderr.
fn ctl_as(faultd: &Faultd, uid: u32, args: &[&str]) -> (Option<i32>, String, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new(faultd_tests::faultd_bin())
        .arg("--socket")
        .arg(faultd.socket())
        .arg("ctl")
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn another_uids_resume_of_a_vm_is_refused_and_its_owner_resumes_every_page_intact() {
    let mut faultd = Faultd::start(&[]);
    open_socket(&faultd);
    let mut victim = Vmm::start(&faultd, VICTIM);
    victim.register("victim", false);
    assert_eq!(victim.ask("fill 7"), "ok");
    assert_eq!(victim.ask("evict"), format!("ok {PAGES} 0 0"));
    faultd.kill9();
    faultd.restart();
    open_socket(&faultd);
    let attacker_dir = faultd.store_dir().join(ATTACKER.to_string());
    let before = files(faultd.store_dir(), &attacker_dir);
    assert!(!before.is_empty(), "the victim's store was not kept");

    // The attacker, after faultd restarted, resumes under the victim's VM name.
    let mut attacker = Vmm::start(&faultd, ATTACKER);
    let resumed = attacker.ask("register victim 1");

    assert!(
        resumed.starts_with("refused forbidden ") && resumed.contains("belongs to another user"),
        "the attacker's resume of the victim's VM was not refused: {resumed}\n{}",
        faultd.log()
    );
    assert_eq!(files(faultd.store_dir(), &attacker_dir), before);

    // A fresh register of that name is the attacker's own VM: none of the victim's pages, and
    // the victim's store untouched. It stays live: the name does not block the victim.
    attacker.register("victim", false);
    assert_eq!(
        attacker.ask("zero"),
        "ok",
        "the attacker read the victim's pages"
    );
    assert_eq!(files(faultd.store_dir(), &attacker_dir), before);

    victim.register("victim", true);
    assert_eq!(
        victim.ask("check 7"),
        "ok",
        "the victim lost pages: {}",
        faultd.log()
    );
    let dir = faultd.store_dir().join(VICTIM.to_string());
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir.clone()), 0o700);
    assert_eq!(mode(dir.join("victim.pages")), 0o600);
    assert_eq!(mode(dir.join("victim.journal")), 0o600);
}

#[test]
fn another_uids_stats_and_evictions_of_a_live_vm_are_refused_and_change_nothing() {
    let faultd = Faultd::start(&[]);
    open_socket(&faultd);
    let mut victim = Vmm::start(&faultd, VICTIM);
    let id = victim.register("victim", false);
    assert_eq!(victim.ask("fill 9"), "ok");
    assert_eq!(victim.ask("evict"), format!("ok {PAGES} 0 0"));
    assert_eq!(victim.ask("check 9"), "ok");
    let attacker_dir = faultd.store_dir().join(ATTACKER.to_string());
    let before = files(faultd.store_dir(), &attacker_dir);
    let mut attacker = Vmm::start(&faultd, ATTACKER);

    let by_name = attacker.ask("vm_stats victim");
    let by_uid = attacker.ask(&format!("vm_stats {VICTIM}/victim"));
    let detail = attacker.ask(&format!("detail {id}"));
    let evict = attacker.ask(&format!("evict_session {id}"));
    let session = id.to_string();
    let ctl_evict = ctl_as(
        &faultd,
        ATTACKER,
        &["evict", "--session", &session, "--pages", "64"],
    );
    let ctl_detail = ctl_as(
        &faultd,
        ATTACKER,
        &["stats", "--vm", &format!("{VICTIM}/victim")],
    );
    let ctl_sessions = ctl_as(&faultd, ATTACKER, &["--json", "sessions"]);

    for answer in [&by_name, &by_uid, &detail, &evict] {
        assert!(
            answer.starts_with("refused forbidden "),
            "the attacker reached the victim's VM: {answer}"
        );
    }
    for (code, _, err) in [&ctl_evict, &ctl_detail] {
        assert_eq!(*code, Some(4), "{err}");
        assert!(
            err.contains("Forbidden") && err.contains("uid 61002"),
            "{err}"
        );
    }
    assert_eq!(ctl_sessions.0, Some(0), "{}", ctl_sessions.2);
    assert!(
        !ctl_sessions.1.contains("\"victim\""),
        "the attacker sees the victim's session: {}",
        ctl_sessions.1
    );
    assert_eq!(files(faultd.store_dir(), &attacker_dir), before);
    // The owner itself may look at and evict its own VM.
    assert_eq!(victim.ask(&format!("detail {id}")), "ok");
    assert_eq!(victim.ask("check 9"), "ok");
    assert_eq!(victim.ask(&format!("evict_session {id}")), "ok");
    assert_eq!(victim.ask("check 9"), "ok");
}

#[test]
fn a_vm_name_held_by_one_uid_does_not_block_another_uids_vm_of_that_name() {
    let faultd = Faultd::start(&[]);
    open_socket(&faultd);
    let mut squatter = Vmm::start(&faultd, ATTACKER);
    squatter.register("shared", false);
    assert_eq!(squatter.ask("fill 1"), "ok");
    let mut owner = Vmm::start(&faultd, VICTIM);

    let registered = owner.ask("register shared 0");

    assert!(
        registered.starts_with("ok "),
        "a VM name of another uid blocked this one: {registered}"
    );
    assert_eq!(owner.ask("fill 2"), "ok");
    assert_eq!(squatter.ask("evict"), format!("ok {PAGES} 0 0"));
    assert_eq!(owner.ask("evict"), format!("ok {PAGES} 0 0"));
    assert_eq!(squatter.ask("check 1"), "ok");
    assert_eq!(owner.ask("check 2"), "ok");
}

#[test]
fn a_store_left_by_an_older_faultd_is_resumed_by_root_only_and_moved_into_roots_directory() {
    let mut faultd = Faultd::start(&[]);
    open_socket(&faultd);
    let mut vmm = Vmm::start(&faultd, 0);
    vmm.register("old", false);
    assert_eq!(vmm.ask("fill 5"), "ok");
    assert_eq!(vmm.ask("evict"), format!("ok {PAGES} 0 0"));
    faultd.kill9();
    // Where an older faultd kept it: store.dir/<vm>.*, no owner recorded.
    let (store, root) = (faultd.store_dir().to_owned(), faultd.store_dir().join("0"));
    for f in ["old.pages", "old.journal"] {
        std::fs::rename(root.join(f), store.join(f)).unwrap();
    }
    faultd.restart();
    open_socket(&faultd);
    let attacker_dir = store.join(ATTACKER.to_string());
    let before = files(&store, &attacker_dir);
    let mut attacker = Vmm::start(&faultd, ATTACKER);

    let claimed = attacker.ask("register old 1");

    assert!(
        claimed.starts_with("refused forbidden ") && claimed.contains("only root may resume it"),
        "{claimed}"
    );
    assert_eq!(files(&store, &attacker_dir), before);
    vmm.register("old", true);
    assert_eq!(vmm.ask("check 5"), "ok", "{}", faultd.log());
    assert!(root.join("old.journal").exists() && !store.join("old.journal").exists());
}

/// Runs `f` on a thread of its own whose effective uid and gid are `uid` (raw setresuid and
/// setresgid: the kernel keeps credentials per thread, and only the C library makes setuid
/// process-wide), so what it connects is seen by its peer as `uid` (SO_PEERCRED).
fn on_a_thread_as<R: Send>(uid: u32, f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|s| {
        s.spawn(|| {
            let keep = u32::MAX; // -1: leave that id as it is.
                                 // SAFETY: plain syscalls with integer arguments; they change this thread's
                                 // credentials only, and the thread ends right after `f`.
            let (g, u) = unsafe {
                (
                    libc::syscall(libc::SYS_setresgid, keep, uid, keep),
                    libc::syscall(libc::SYS_setresuid, keep, uid, keep),
                )
            };
            assert_eq!((g, u), (0, 0), "{}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn a_firecracker_restore_belongs_to_the_uid_its_socket_admits() {
    use faultd_client::RamPageSize;
    use faultd_tests::firecracker::{pattern_snapshot, FcRestore, WireForm};
    let faultd = Faultd::start(&[]);
    open_socket(&faultd);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let snapshot = dir.path().join("mem");
    drop(pattern_snapshot(&snapshot, &[(0, 4 << 20, 0)], 3));
    let socket = dir.path().join("fc.sock");
    faultd
        .listen_firecracker("fc-own", &socket, &snapshot, Some(VICTIM), None)
        .unwrap();
    let mut restore = FcRestore::new(&[(4 << 20, 0)], RamPageSize::Size4K).unwrap();
    on_a_thread_as(VICTIM, || restore.send(&socket, WireForm::Current)).unwrap();
    let shown = faultd.settled_vm_stats("fc-own-1", |s| s.len() == 1);
    assert_eq!(shown.len(), 1, "{}", faultd.log());
    let mut owner = Vmm::start(&faultd, VICTIM);
    let mut other = Vmm::start(&faultd, ATTACKER);

    let by_owner = owner.ask("vm_stats fc-own-1");
    let by_other = other.ask("vm_stats fc-own-1");
    let by_other_named = other.ask(&format!("vm_stats {VICTIM}/fc-own-1"));

    assert_eq!(by_owner, "ok 1");
    assert!(by_other.starts_with("refused forbidden "), "{by_other}");
    assert!(
        by_other_named.starts_with("refused forbidden "),
        "{by_other_named}"
    );
    restore.hang_up();
}

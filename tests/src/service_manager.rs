//! A stand-in for systemd's side of the two protocols faultd uses to keep sessions across its
//! restarts, for machines where systemd is not PID 1 (this one; `systemd-analyze` and
//! `systemd-socket-activate`, the tools that run without it, are used as the real thing
//! elsewhere). It does what sd_notify(3) and sd_listen_fds(3) document, and nothing more:
//! - the notification socket (`NOTIFY_SOCKET`, datagrams): `FDSTORE=1` with `FDNAME=` keeps
//!   the fds attached (SCM_RIGHTS) under that name, `FDSTOREREMOVE=1` with `FDNAME=` drops
//!   every fd of that name; other lines (READY=1, WATCHDOG=1, ...) are only recorded;
//! - at each start, the kept fds are passed as fds 3.. with `LISTEN_FDS`, `LISTEN_FDNAMES`
//!   (names joined by ':') and `LISTEN_PID` (the started process's pid).

use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the manager holds: the fd store, and every notification received.
#[derive(Debug, Default)]
pub struct State {
    store: Vec<(String, OwnedFd)>,
    messages: Vec<String>,
}

/// The stand-in service manager; see the module documentation.
#[derive(Debug)]
pub struct ServiceManager {
    socket: PathBuf,
    pub(crate) state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServiceManager {
    /// Listens for notifications at `dir/notify.sock`.
    pub fn new(dir: &Path) -> ServiceManager {
        let socket = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&socket).expect("binding NOTIFY_SOCKET");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                if let Some((text, fds)) = receive(&sock) {
                    apply(&mut st.lock().unwrap(), text, fds);
                }
            }
        });
        ServiceManager {
            socket,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// The notification socket's path (`NOTIFY_SOCKET`).
    pub fn notify_socket(&self) -> &Path {
        &self.socket
    }

    /// Names in the fd store, one per fd, in store order.
    pub fn stored_names(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.store.iter().map(|(n, _)| n.clone()).collect()
    }

    /// Waits up to `timeout` for the fd store's names to be `want`; returns what they are.
    pub fn wait_for_store(&self, want: &[&str], timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let names = self.stored_names();
            if names == want || Instant::now() > deadline {
                return names;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every notification received, one string per datagram.
    pub fn messages(&self) -> Vec<String> {
        self.state.lock().unwrap().messages.clone()
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One datagram and the fds attached to it; None on timeout.
fn receive(sock: &UnixDatagram) -> Option<(String, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = vec![0u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 16]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .ok()?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().ok()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for fd in raw {
                // SAFETY: the kernel installed `fd` in this process for this message; nothing
                // else knows it, so it is owned here.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let n = msg.bytes;
    Some((String::from_utf8_lossy(&buf[..n]).into_owned(), fds))
}

/// What systemd does with a notification: FDSTORE / FDSTOREREMOVE by FDNAME.
fn apply(st: &mut State, text: String, fds: Vec<OwnedFd>) {
    let has = |kv: &str| text.lines().any(|l| l == kv);
    let name = text
        .lines()
        .find_map(|l| l.strip_prefix("FDNAME="))
        .unwrap_or("stored")
        .to_owned();
    if has("FDSTORE=1") {
        st.store
            .extend(fds.into_iter().map(|fd| (name.clone(), fd)));
    } else if has("FDSTOREREMOVE=1") {
        st.store.retain(|(n, _)| *n != name);
    }
    st.messages.push(text);
}

/// What a start passes: duplicates of the stored fds (above fd 100, close-on-exec, so they
/// cannot collide with 3.. while being moved there) and their names.
pub(crate) fn to_pass(state: &Mutex<State>) -> (Vec<OwnedFd>, Vec<String>) {
    let st = state.lock().unwrap();
    st.store
        .iter()
        .map(|(name, fd)| {
            let high = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100))
                .expect("duplicating a stored fd");
            // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
            (unsafe { OwnedFd::from_raw_fd(high) }, name.clone())
        })
        .unzip()
}

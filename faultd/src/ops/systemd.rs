//! The service manager's side of faultd: socket activation (`LISTEN_FDS`), readiness and the
//! watchdog (`NOTIFY_SOCKET`, `WATCHDOG_USEC`). All of it is optional: without those variables
//! faultd binds its own socket and sends nothing.
//!
//! The watchdog keep-alive means "faults are being served", not "the process exists": it is
//! sent only while every session thread is either making progress or idle with nothing to do
//! ([`Liveness`]). A session thread stuck in one pass, or asleep while its userfaultfd has
//! faults waiting, withholds it, and systemd restarts faultd after `WatchdogSec`.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio_seqpacket::UnixSeqpacketListener;
use tokio_util::sync::CancellationToken;

/// Why an inherited socket cannot be the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// LISTEN_FDS/LISTEN_PID are malformed.
    #[error("reading LISTEN_FDS")]
    Env(#[source] io::Error),
    /// More than one socket was passed (faultd.socket has one).
    #[error("{0} sockets passed by the service manager; faultd takes exactly one")]
    TooMany(usize),
    /// The socket is not a listening AF_UNIX SOCK_SEQPACKET socket.
    #[error("the passed socket is not a listening unix SOCK_SEQPACKET socket ({0})")]
    WrongKind(&'static str),
    /// Querying or adopting the socket failed.
    #[error("adopting the passed socket")]
    Adopt(#[source] io::Error),
}

/// Names of the fds faultd keeps in the service manager's fd store start with this; any other
/// passed fd is the control socket (socket activation).
pub const STORED_PREFIX: &str = "faultd-";

/// What the service manager passed at start (`LISTEN_FDS`, `LISTEN_FDNAMES`).
#[derive(Debug, Default)]
pub struct Inherited {
    /// The control socket (socket activation).
    pub control: Option<OwnedFd>,
    /// fds faultd put in the fd store before it last stopped, by name.
    pub stored: Vec<(String, OwnedFd)>,
}

/// Takes what the service manager passed. Called once, at start.
pub fn inherited() -> Result<Inherited, ActivationError> {
    let mut got = Inherited::default();
    let mut control = Vec::new();
    for (fd, name) in sd_notify::listen_fds_with_names().map_err(ActivationError::Env)? {
        // SAFETY: LISTEN_PID names this process, so the service manager passed `fd` to it for
        // it to own; nothing else in faultd uses fd numbers from LISTEN_FDS, and each is taken
        // once here, so this is its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if name.starts_with(STORED_PREFIX) {
            got.stored.push((name, fd));
        } else {
            control.push(fd);
        }
    }
    if control.len() > 1 {
        return Err(ActivationError::TooMany(control.len()));
    }
    got.control = control.pop();
    Ok(got)
}

/// Whether a service manager listens for notifications (and so may keep an fd store).
pub fn has_manager() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

/// Puts `fds` in the service manager's fd store under `name` (`FDSTORE=1`): it keeps them
/// while faultd restarts, crashes included, and passes them back at the next start. The unit
/// must allow it (`FileDescriptorStoreMax=`). `FDPOLL=0`: systemd would otherwise drop a stored
/// fd on its own when it polls POLLHUP, and a socket whose peer closed does (an older
/// Firecracker closes its end right after its message, while its VM runs on); what is kept
/// is faultd's to remove (`remove_stored`).
pub fn store_fds(name: &str, fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<()> {
    use sd_notify::NotifyState::{Custom, FdName, FdStore};
    sd_notify::notify_with_fds(&[FdStore, FdName(name), Custom("FDPOLL=0")], fds)
}

/// Takes the fds stored under `name` out of the fd store (`FDSTOREREMOVE=1`).
pub fn remove_stored(name: &str) -> io::Result<()> {
    use sd_notify::NotifyState::{FdName, FdStoreRemove};
    sd_notify::notify(&[FdStoreRemove, FdName(name)])
}

/// Serves `fd`, the control socket the service manager passed (socket activation), if any.
/// Must be called inside the tokio runtime (the listener registers with it).
pub fn inherited_listener(
    fd: Option<OwnedFd>,
) -> Result<Option<UnixSeqpacketListener>, ActivationError> {
    let Some(fd) = fd else {
        return Ok(None);
    };
    check_seqpacket_listener(&fd)?;
    // tokio needs a non-blocking socket (an accept after a spurious wake-up must not block the
    // reactor). The flag is on the open file description it shares with the service manager,
    // which only polls it.
    let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| ActivationError::Adopt(e.into()))?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| ActivationError::Adopt(e.into()))?;
    UnixSeqpacketListener::try_from(fd)
        .map(Some)
        .map_err(ActivationError::Adopt)
}

fn check_seqpacket_listener(fd: &OwnedFd) -> Result<(), ActivationError> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};
    let adopt = |e: nix::errno::Errno| ActivationError::Adopt(e.into());
    if getsockopt(fd, sockopt::SockType).map_err(adopt)? != SockType::SeqPacket {
        return Err(ActivationError::WrongKind("not SOCK_SEQPACKET"));
    }
    // Only an AF_UNIX address parses as a UnixAddr.
    if getsockname::<UnixAddr>(fd.as_raw_fd()).is_err() {
        return Err(ActivationError::WrongKind("not AF_UNIX"));
    }
    if !getsockopt(fd, sockopt::AcceptConn).map_err(adopt)? {
        return Err(ActivationError::WrongKind("not listening"));
    }
    Ok(())
}

/// Tells the service manager something; a failure is logged, never fatal (faultd serves VMs
/// whether or not anyone listens).
pub fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!("sd_notify failed: {e}");
    }
}

/// The watchdog interval the service manager asks for (`WATCHDOG_USEC`), if any.
pub fn watchdog_timeout() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|t| !t.is_zero())
}

/// What a session thread is doing, as the watchdog sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadState {
    /// Serving (or spinning between) passes.
    Busy,
    /// Asleep in poll(2), waiting for work.
    Idle,
    /// Gone: the session's service ended.
    Exited,
}

/// A session thread's heartbeat: its pass count and state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// Service passes started.
    pub passes: u64,
    /// What it is doing.
    pub state: ThreadState,
}

/// Decides from two looks at every session thread, one check interval apart, whether fault
/// service stalled. Pure state: the daemon feeds it what it sees.
#[derive(Debug, Default)]
pub struct Liveness {
    last: HashMap<u64, (Beat, bool)>,
}

impl Liveness {
    /// Records what each live session's thread shows now (`ready`: its userfaultfd has events
    /// waiting), and returns the sessions that are stalled: the same pass as at the previous
    /// check, and either busy in it all along or asleep all along with faults waiting.
    pub fn check(&mut self, now: impl IntoIterator<Item = (u64, Beat, bool)>) -> Vec<u64> {
        let mut stalled = Vec::new();
        let mut seen = HashMap::with_capacity(self.last.len());
        for (id, beat, ready) in now {
            if let Some(&(before, was_ready)) = self.last.get(&id) {
                let same_pass = before == beat;
                let stuck = match beat.state {
                    ThreadState::Busy => same_pass,
                    ThreadState::Idle => same_pass && ready && was_ready,
                    ThreadState::Exited => false,
                };
                if stuck {
                    stalled.push(id);
                }
            }
            seen.insert(id, (beat, ready));
        }
        self.last = seen;
        stalled.sort_unstable();
        stalled
    }
}

/// Sends `WATCHDOG=1` every `timeout / 2` while [`Liveness`] finds no stalled session among
/// those `sessions` returns (id, heartbeat, faults waiting), until `cancel` fires.
pub async fn keep_alive(
    timeout: Duration,
    sessions: Arc<dyn Fn() -> Vec<(u64, Beat, bool)> + Send + Sync>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(timeout / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut liveness = Liveness::default();
    let mut was_stalled: Vec<u64> = Vec::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let stalled = liveness.check(sessions());
        if stalled.is_empty() {
            notify(&[sd_notify::NotifyState::Watchdog]);
        } else if stalled != was_stalled {
            tracing::error!(
                sessions = ?stalled,
                "fault service stalled; withholding the watchdog keep-alive"
            );
        }
        if !was_stalled.is_empty() && stalled.is_empty() {
            tracing::warn!("fault service resumed; watchdog keep-alive resumed");
        }
        was_stalled = stalled;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(passes: u64, state: ThreadState) -> Beat {
        Beat { passes, state }
    }

    #[test]
    fn a_thread_making_progress_is_alive() {
        let mut l = Liveness::default();
        l.check([(1, beat(5, ThreadState::Busy), false)]);

        let stalled = l.check([(1, beat(9, ThreadState::Busy), false)]);

        assert_eq!(stalled, Vec::<u64>::new());
    }

    #[test]
    fn a_thread_busy_in_the_same_pass_across_a_check_is_stalled() {
        let mut l = Liveness::default();
        l.check([(1, beat(5, ThreadState::Busy), false)]);

        let stalled = l.check([(1, beat(5, ThreadState::Busy), false)]);

        assert_eq!(stalled, vec![1]);
    }

    #[test]
    fn an_idle_thread_with_nothing_to_do_is_alive() {
        let mut l = Liveness::default();
        l.check([(1, beat(5, ThreadState::Idle), false)]);

        let stalled = l.check([(1, beat(5, ThreadState::Idle), false)]);

        assert_eq!(stalled, Vec::<u64>::new());
    }

    #[test]
    fn an_idle_thread_with_faults_waiting_across_a_check_is_stalled() {
        let mut l = Liveness::default();
        l.check([(1, beat(5, ThreadState::Idle), true)]);

        let stalled = l.check([
            (1, beat(5, ThreadState::Idle), true),
            (2, beat(1, ThreadState::Idle), true),
        ]);

        assert_eq!(stalled, vec![1]);
    }

    #[test]
    fn faults_that_just_arrived_at_an_idle_thread_are_not_a_stall() {
        let mut l = Liveness::default();
        l.check([(1, beat(5, ThreadState::Idle), false)]);

        let stalled = l.check([(1, beat(5, ThreadState::Idle), true)]);

        assert_eq!(stalled, Vec::<u64>::new());
    }

    #[test]
    fn a_thread_that_ended_is_not_a_stall() {
        let mut l = Liveness::default();
        l.check([(1, beat(5, ThreadState::Exited), true)]);

        let stalled = l.check([(1, beat(5, ThreadState::Exited), true)]);

        assert_eq!(stalled, Vec::<u64>::new());
    }
}

//! Keeping a VM served across faultd restarts: [`Supervisor`] watches the session's control
//! connection and, when faultd goes away (crash, restart, upgrade), registers the VM again
//! with `resume` as soon as a faultd accepts on the socket.
//!
//! What survives a faultd restart, and why this is enough: the VMM keeps its guest RAM, its
//! userfaultfd and the registrations on it, so faults raised meanwhile just wait in the uffd;
//! the new faultd takes evicted pages from its store, and wakes every thread the old one had
//! left blocked (see [`Client::resume`]). Devices are the VMM's business: their page requests
//! in flight are lost with the old faultd, which is what [`Reattach::lost`] is for, and they
//! are attached again by [`Reattach::devices`] (an iommufd device with a new fault queue:
//! [`requeue_iommufd`]).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::{Client, ClientError, Session};

/// What the VMM does when its session is lost and when it comes back.
pub trait Reattach: Send {
    /// faultd went away. Called once per loss, before reconnecting: e.g. reset the page
    /// request interface of emulated devices, whose unanswered groups died with faultd.
    fn lost(&mut self) {}

    /// Registers the VM again on `client` (with [`Client::resume`]).
    fn resume(&mut self, client: Client) -> Result<Session, ClientError>;

    /// Attaches the VM's devices to the session [`Self::resume`] just registered, before the
    /// supervisor publishes it. An error drops that session and the supervisor tries again
    /// (resume, then this) after a pause. For an iommufd device see [`requeue_iommufd`]: the
    /// old faultd's read groups and mappings must not outlive it.
    fn devices(&mut self, session: &mut Session) -> Result<(), ClientError> {
        let _ = session;
        Ok(())
    }
}

/// An iommufd device's new fault queue and HWPT (see [`requeue_iommufd`]).
#[derive(Debug)]
pub struct Requeued {
    /// The new fault object.
    pub fault_id: u32,
    /// Its fault fd, for the new faultd ([`crate::DeviceQueue::Iommufd`]).
    pub fault_fd: OwnedFd,
    /// The new fault-capable HWPT, which the device is attached to now.
    pub hwpt_id: u32,
}

/// What a VMM does for a faulting iommufd device when faultd comes back after a restart
/// (docs/device-faults.md, "faultd restarts with an iommufd device"), before handing the
/// device to the new faultd:
///
/// 1. unmaps `ranges` (the guest layout, IOVA == GPA) from the device's IOAS `ioas_id`: what
///    the old faultd mapped there no one can unmap any more (for the pin limit, nor before a
///    discard, when the IOMMU would keep the discarded page); the new faultd maps again what
///    the device asks for;
/// 2. allocates a new fault queue and a fault-capable HWPT over the IOAS reporting to it;
/// 3. calls `replace(hwpt)`, the VMM's replace of the device's HWPT by the new one
///    (`VFIO_DEVICE_ATTACH_IOMMUFD_PT` on an attached VFIO cdev; the selftest mock's
///    `MOCK_DOMAIN_REPLACE` in tests/kernel). The kernel answers INVALID every group of the
///    old HWPT, those the old faultd read (their cookies died with it) and those it did not;
///    the device retries them through the new HWPT.
///
/// The caller then hands `fault_fd` to the new faultd ([`crate::Session::add_device`]) and
/// closes and destroys the old fault queue and HWPT. A new queue rather than the old one: no
/// answer an old faultd still writes (one that hung rather than died) can reach a group of
/// the new queue, whose cookies are its own. On error the new objects are destroyed and the
/// device stays where it was.
pub fn requeue_iommufd(
    iommufd: BorrowedFd<'_>,
    dev_id: u32,
    ioas_id: u32,
    ranges: &[(u64, u64)],
    replace: impl FnOnce(u32) -> std::io::Result<()>,
) -> std::io::Result<Requeued> {
    for &(iova, len) in ranges {
        iopf::iommufd::unmap_range(iommufd, ioas_id, iova, len)?;
    }
    let (fault_id, fault_fd) = iopf::iommufd::alloc_fault_queue(iommufd)?;
    let hwpt_id = match iopf::iommufd::alloc_fault_hwpt(iommufd, dev_id, ioas_id, fault_id) {
        Ok(h) => h,
        Err(e) => {
            drop(fault_fd);
            let _ = iopf::iommufd::destroy(iommufd, fault_id);
            return Err(e);
        }
    };
    if let Err(e) = replace(hwpt_id) {
        let _ = iopf::iommufd::destroy(iommufd, hwpt_id);
        drop(fault_fd);
        let _ = iopf::iommufd::destroy(iommufd, fault_id);
        return Err(e);
    }
    Ok(Requeued {
        fault_id,
        fault_fd,
        hwpt_id,
    })
}

/// What the supervisor saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SupervisorStats {
    /// Sessions lost (faultd went away or closed the session).
    pub losses: u64,
    /// Sessions registered again.
    pub resumes: u64,
    /// Failed attempts to register again (faultd not back yet, or refused).
    pub attempts_failed: u64,
    /// Loss to resumed, of the last outage.
    pub last_outage: Duration,
    /// The longest outage.
    pub max_outage: Duration,
}

#[derive(Debug)]
struct Shared {
    session: Mutex<Option<Session>>,
    stats: Mutex<SupervisorStats>,
    stop: AtomicBool,
}

/// Watches a session and brings it back after faultd restarts. See the module documentation.
///
/// ```no_run
/// use std::sync::Arc;
/// use faultd_client::*;
///
/// /// What it takes to register the VM again: the same memory and uffd.
/// struct Hooks {
///     ram: Arc<GuestRam>,
///     uffd: Arc<Uffd>,
/// }
///
/// impl Reattach for Hooks {
///     fn resume(&mut self, client: Client) -> Result<Session, ClientError> {
///         client.resume("vm0", &self.uffd, &[RegionSpec::zero(0, &*self.ram)], None)
///     }
/// }
///
/// let ram = Arc::new(GuestRam::new("vm0-ram", 1 << 30, RamPageSize::Size4K)?);
/// let uffd = Arc::new(create_uffd()?);
/// ram.register(&uffd)?;
/// let session = Client::connect(DEFAULT_SOCKET_PATH)?
///     .register("vm0", &uffd, &[RegionSpec::zero(0, &*ram)], None)?;
/// let supervisor = Supervisor::spawn(DEFAULT_SOCKET_PATH, session, Hooks { ram, uffd })?;
/// // ... run the guest; faultd may restart meanwhile ...
/// let finished = supervisor.with_session(|s| s.finish()).expect("served now")?;
/// assert_eq!(finished.remaining, 0);
/// drop(supervisor.stop()); // ends the session
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Supervisor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// How often the watching thread looks at `stop` while the session is fine.
const WATCH_SLICE: Duration = Duration::from_millis(50);
/// Longest pause between attempts to reach faultd again.
const MAX_BACKOFF: Duration = Duration::from_millis(50);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Supervisor {
    /// Starts watching `session`, registered on faultd's socket `path`; `hooks` handle a loss.
    pub fn spawn(
        path: impl Into<PathBuf>,
        session: Session,
        hooks: impl Reattach + 'static,
    ) -> std::io::Result<Supervisor> {
        let shared = Arc::new(Shared {
            session: Mutex::new(Some(session)),
            stats: Mutex::new(SupervisorStats::default()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let path = path.into();
        let thread = std::thread::Builder::new()
            .name("faultd-supervisor".into())
            .spawn(move || watch(&path, &s, hooks))?;
        Ok(Supervisor {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `f` on the session; None while it is lost.
    pub fn with_session<R>(&self, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
        lock(&self.shared.session).as_mut().map(f)
    }

    /// Whether a session is registered now.
    pub fn is_served(&self) -> bool {
        lock(&self.shared.session).is_some()
    }

    /// What the supervisor saw so far.
    pub fn stats(&self) -> SupervisorStats {
        *lock(&self.shared.stats)
    }

    /// Stops watching; returns the session, if one is registered.
    pub fn stop(mut self) -> Option<Session> {
        self.halt();
        lock(&self.shared.session).take()
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.halt();
    }
}

fn watch(path: &std::path::Path, shared: &Shared, mut hooks: impl Reattach) {
    let stopped = || shared.stop.load(Ordering::Acquire);
    while !stopped() {
        // A duplicate of the connection, to poll without holding the session.
        let sock: Option<OwnedFd> = lock(&shared.session)
            .as_ref()
            .and_then(|s| s.raw.sock.try_clone().ok());
        let Some(sock) = sock else {
            return;
        };
        // faultd never speaks unasked, so only a hang-up matters here (POLLIN would also
        // fire for an answer the VMM is about to read itself).
        while !stopped() && !hung_up(&sock) {}
        if stopped() {
            return;
        }
        let lost_at = Instant::now();
        drop(lock(&shared.session).take());
        drop(sock);
        lock(&shared.stats).losses += 1;
        hooks.lost();
        let mut backoff = Duration::from_millis(1);
        let session = loop {
            if stopped() {
                return;
            }
            let resumed = Client::connect(path)
                .and_then(|c| hooks.resume(c))
                .and_then(|mut s| hooks.devices(&mut s).map(|()| s));
            match resumed {
                Ok(s) => break s,
                Err(_) => {
                    lock(&shared.stats).attempts_failed += 1;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        };
        *lock(&shared.session) = Some(session);
        let took = lost_at.elapsed();
        let mut st = lock(&shared.stats);
        st.resumes += 1;
        st.last_outage = took;
        st.max_outage = st.max_outage.max(took);
    }
}

/// Waits up to [`WATCH_SLICE`] for `sock` to hang up.
fn hung_up(sock: &OwnedFd) -> bool {
    // No events asked for: POLLHUP is always reported, and a peer that closed a seqpacket
    // connection sets it. (Asking for POLLRDHUP would add a bit nix's flags cannot parse.)
    let mut fds = [PollFd::new(sock.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::from(WATCH_SLICE.as_millis() as u16)) {
        Ok(_) => fds[0]
            .revents()
            .is_none_or(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        Err(nix::errno::Errno::EINTR) => false,
        // An fd that cannot be polled is no connection any more.
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

    #[test]
    fn a_closed_peer_is_a_hang_up_and_an_open_one_is_not() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        assert!(!hung_up(&a));
        drop(b);
        assert!(hung_up(&a));
    }
}

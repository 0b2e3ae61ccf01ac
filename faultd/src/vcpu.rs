//! vCPU fault service: reads a VMM's userfaultfd and installs the faulting pages.
//!
//! One fault, end to end: a vCPU (or the VMM, or KVM on its behalf) touches an absent page of
//! guest RAM; the kernel blocks that thread and queues a MISSING event on the VMM's userfaultfd,
//! which faultd holds. The session's fault thread reads it ([`UffdOps::read_events`]), maps the
//! address to a page ([`Session::locate`]), asks s2map whether to resolve it
//! ([`s2map::S2Map::begin_fault`]: coalesces with a resolution already in flight), fills it from
//! its backing with `UFFDIO_ZEROPAGE` or `UFFDIO_COPY` (the kernel installs the page in the memfd
//! and wakes every thread blocked on it), and tells s2map it is resident.
//!
//! Errno is lifted into meaning once, in [`KernelUffd`]: EEXIST means someone installed the page
//! first (fine: it is present), EAGAIN means a layout event (REMOVE/UNMAP) is queued and unread
//! (read events, then retry), ESRCH means the VMM's address space is gone.
//!
//! Threads, not tokio tasks: each session's uffd is served by a dedicated OS thread with
//! adaptive polling ([`run`]). A fault is a few microseconds of work, and the dominant cost on
//! an idle host is waking the serving thread. A dedicated thread can spin for a bounded window
//! after each fault (catching bursts without any wake-up) and then sleep in poll(2); a tokio
//! task would add a reactor hop and a task wake-up to every fault and could not spin without
//! starving other tasks. The benchmark (`cargo bench -p faultd-tests`) measures this choice.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use s2map::{Begin, Fill};

use crate::session::{Counters, Hva, Located, Session};

/// A userfaultfd event, reduced to what faultd acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdEvent {
    /// A thread faulted at `addr` on a missing page.
    Fault {
        /// Faulting VMM address.
        addr: Hva,
    },
    /// The VMM discarded `[start, end)` (MADV_DONTNEED / MADV_REMOVE: balloon, hole punch).
    Remove {
        /// Start (inclusive).
        start: Hva,
        /// End (exclusive).
        end: Hva,
    },
    /// The VMM unmapped `[start, end)`.
    Unmap {
        /// Start (inclusive).
        start: Hva,
        /// End (exclusive).
        end: Hva,
    },
    /// An event faultd does not act on (fork, remap, a fault kind it did not register).
    Ignored(&'static str),
}

/// Outcome of a uffd operation that did not install the page, lifted from errno once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpError {
    /// EEXIST: the page is already present (someone installed it first).
    #[error("page already present")]
    Exists,
    /// EAGAIN: a layout event is queued and unread; read events, then retry.
    #[error("layout changing, retry after reading events")]
    Retry,
    /// ESRCH: the VMM's address space is gone.
    #[error("the VMM's address space is gone")]
    PeerGone,
    /// ENOENT: the address is no longer a registered mapping (the VMM unmapped it).
    #[error("address no longer registered")]
    NotRegistered,
    /// Any other errno.
    #[error("uffd operation failed: {0}")]
    Failed(nix::errno::Errno),
}

impl OpError {
    fn from_errno(errno: i32) -> OpError {
        match errno {
            libc::EEXIST => OpError::Exists,
            libc::EAGAIN => OpError::Retry,
            libc::ESRCH => OpError::PeerGone,
            libc::ENOENT => OpError::NotRegistered,
            e => OpError::Failed(nix::errno::Errno::from_raw(e)),
        }
    }
}

/// The kernel's userfaultfd, as the fault service uses it. Implemented by [`KernelUffd`] and,
/// in tests, by a fake that keeps pages in memory.
pub trait UffdOps {
    /// Appends up to `max` pending events to `out` without blocking.
    fn read_events(&mut self, out: &mut Vec<UffdEvent>, max: usize) -> io::Result<()>;
    /// Installs a zero page of `len` bytes at `at`, waking waiters.
    fn zeropage(&self, at: Hva, len: u64) -> Result<(), OpError>;
    /// Installs `src` at `at` (one page), waking waiters.
    fn copy(&self, src: &[u8], at: Hva) -> Result<(), OpError>;
    /// Wakes threads blocked on `[at, at+len)` without installing anything.
    fn wake(&self, at: Hva, len: u64) -> Result<(), OpError>;
    /// The fd to poll for readiness.
    fn fd(&self) -> BorrowedFd<'_>;
}

/// The real userfaultfd handed over by a VMM.
pub struct KernelUffd {
    uffd: userfaultfd::Uffd,
    buf: userfaultfd::EventBuffer,
}

impl KernelUffd {
    /// Takes ownership of a userfaultfd (validated as one). Sets O_NONBLOCK: the service never
    /// blocks in read(2), it polls.
    pub fn new(fd: OwnedFd, batch: usize) -> io::Result<KernelUffd> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: `fd` is an owned, open userfaultfd; ownership moves into the Uffd, which
        // closes it on drop, and nothing else keeps the raw number.
        let uffd = unsafe { userfaultfd::Uffd::from_raw_fd(fd.into_raw_fd()) };
        Ok(KernelUffd {
            uffd,
            buf: userfaultfd::EventBuffer::new(batch),
        })
    }
}

impl std::fmt::Debug for KernelUffd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelUffd")
            .field("uffd", &self.uffd)
            .finish_non_exhaustive()
    }
}

fn lift(e: userfaultfd::Error) -> OpError {
    match e {
        userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno) => {
            OpError::from_errno(errno as i32)
        }
        // The crate reports EAGAIN on copy as a partial copy; a one-page copy is all or nothing.
        userfaultfd::Error::PartiallyCopied(_) => OpError::Retry,
        userfaultfd::Error::SystemError(errno) => OpError::from_errno(errno as i32),
        _ => OpError::Failed(nix::errno::Errno::EIO),
    }
}

impl UffdOps for KernelUffd {
    fn read_events(&mut self, out: &mut Vec<UffdEvent>, max: usize) -> io::Result<()> {
        use userfaultfd::{Event, FaultKind};
        let _ = max; // the event buffer was sized to the batch at construction
        let events = match self.uffd.read_events(&mut self.buf) {
            Ok(events) => events,
            Err(userfaultfd::Error::SystemError(e)) => {
                return Err(io::Error::from_raw_os_error(e as i32))
            }
            Err(e) => return Err(io::Error::other(e)),
        };
        for ev in events {
            out.push(match ev.map_err(io::Error::other)? {
                Event::Pagefault {
                    kind: FaultKind::Missing,
                    addr,
                    ..
                } => UffdEvent::Fault {
                    addr: Hva(addr as u64),
                },
                Event::Pagefault { .. } => UffdEvent::Ignored("non-MISSING page fault"),
                Event::Remove { start, end } => UffdEvent::Remove {
                    start: Hva(start as u64),
                    end: Hva(end as u64),
                },
                Event::Unmap { start, end } => UffdEvent::Unmap {
                    start: Hva(start as u64),
                    end: Hva(end as u64),
                },
                Event::Fork { .. } => UffdEvent::Ignored("fork"),
                Event::Remap { .. } => UffdEvent::Ignored("remap"),
            });
        }
        Ok(())
    }

    fn zeropage(&self, at: Hva, len: u64) -> Result<(), OpError> {
        // SAFETY: the destination is in the VMM's address space (the uffd's mm), inside a range
        // the VMM registered; the kernel checks that, and faultd holds no reference into it.
        unsafe { self.uffd.zeropage(at.0 as *mut _, len as usize, true) }
            .map(drop)
            .map_err(lift)
    }

    fn copy(&self, src: &[u8], at: Hva) -> Result<(), OpError> {
        // SAFETY: `src` is a live slice of exactly the copied length; the destination is in the
        // VMM's address space, checked by the kernel to be registered, not aliased by faultd.
        unsafe {
            self.uffd
                .copy(src.as_ptr().cast(), at.0 as *mut _, src.len(), true)
        }
        .map(drop)
        .map_err(lift)
    }

    fn wake(&self, at: Hva, len: u64) -> Result<(), OpError> {
        self.uffd.wake(at.0 as *mut _, len as usize).map_err(lift)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}

/// Serves one session's userfaultfd events. Driver-agnostic: [`run`] drives it from a thread.
#[derive(Debug)]
pub struct FaultServer<O> {
    session: Arc<Session>,
    ops: O,
    batch: usize,
    events: Vec<UffdEvent>,
    retries: Vec<Hva>,
    page_buf: Vec<u8>,
    zero_buf: Vec<u8>,
    logged: u32,
}

/// Most error log lines one session emits; the counters keep counting after that.
const MAX_LOGGED_ERRORS: u32 = 16;

impl<O: UffdOps> FaultServer<O> {
    /// A server for `session` over `ops`, reading `batch` events at a time.
    pub fn new(session: Arc<Session>, ops: O, batch: usize) -> Self {
        let max_page = session
            .layout()
            .regions()
            .iter()
            .map(|r| r.page_size().bytes() as usize)
            .max()
            .unwrap_or(4096);
        FaultServer {
            session,
            ops,
            batch,
            events: Vec::with_capacity(batch),
            retries: Vec::new(),
            page_buf: vec![0; max_page],
            // Huge pages have no UFFDIO_ZEROPAGE: they are zero-filled with a copy.
            zero_buf: if max_page > 4096 {
                vec![0; max_page]
            } else {
                Vec::new()
            },
            logged: 0,
        }
    }

    /// The uffd, to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ops.fd()
    }

    /// The operations (tests inspect the fake).
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// Reads one batch of events and serves it, then retries faults that met EAGAIN. Returns
    /// how many events and retries it handled (0: nothing was pending).
    pub fn serve_ready(&mut self) -> io::Result<usize> {
        self.events.clear();
        self.ops.read_events(&mut self.events, self.batch)?;
        let t0 = Instant::now();
        let mut events = std::mem::take(&mut self.events);
        // Layout events first: a fault read in the same batch must see the discard, and every
        // ioctl fails EAGAIN while one is unread anyway.
        for ev in &events {
            self.handle_layout_event(*ev);
        }
        let retries = std::mem::take(&mut self.retries);
        let handled = events.len() + retries.len();
        for addr in retries {
            self.handle_fault(addr, t0);
        }
        for ev in &events {
            if let UffdEvent::Fault { addr } = *ev {
                Counters::bump(&self.session.counters.vcpu_faults);
                self.handle_fault(addr, t0);
            }
        }
        events.clear();
        self.events = events;
        Ok(handled)
    }

    /// Faults waiting for a retry (EAGAIN).
    pub fn has_retries(&self) -> bool {
        !self.retries.is_empty()
    }

    fn handle_layout_event(&mut self, ev: UffdEvent) {
        match ev {
            UffdEvent::Remove { start, end } => {
                let ranges = self.session.hva_range_to_gpa(start, end);
                let mut map = self.session.map();
                let mut pages = 0;
                for (gpa, len) in ranges {
                    pages += map.discard(gpa, len).resident_pages;
                }
                drop(map);
                self.session
                    .counters
                    .discarded_pages
                    .fetch_add(pages, Ordering::Relaxed);
            }
            UffdEvent::Unmap { start, end } => {
                // The memfd keeps the pages; only the VMM's view is gone, and faults cannot come
                // from an unmapped range. Nothing in s2map changes.
                tracing::debug!(
                    session = self.session.id(),
                    start = start.0,
                    end = end.0,
                    "VMM unmapped a range"
                );
            }
            UffdEvent::Ignored(what) => {
                tracing::debug!(session = self.session.id(), what, "ignored uffd event");
            }
            UffdEvent::Fault { .. } => {}
        }
    }

    fn handle_fault(&mut self, addr: Hva, t0: Instant) {
        let Some(at) = self.session.locate(addr) else {
            // The kernel reports only registered ranges, so the VMM registered more than it
            // declared. Leave that thread blocked (its memory is not ours to fill) and say so.
            self.error(format_args!(
                "fault at {:#x} outside every declared region",
                addr.0
            ));
            return;
        };
        let begin = self.session.map().begin_fault(at.page, None);
        match begin {
            Begin::Present => {
                // A duplicate event (several threads faulted before the install). Waking is
                // enough: the page is in the memfd.
                Counters::bump(&self.session.counters.already_present);
                if let Err(e) = self.ops.wake(at.hva, at.size) {
                    self.error(format_args!("wake at {:#x}: {e}", at.hva.0));
                }
            }
            Begin::Joined => {
                // Another source is installing it; the install wakes this thread too.
            }
            Begin::Resolve(fill) => self.resolve(at, fill, t0),
        }
    }

    fn resolve(&mut self, at: Located, fill: Fill, t0: Instant) {
        let counters = &self.session.counters;
        let result = match fill {
            Fill::Zero if at.size == 4096 => self.ops.zeropage(at.hva, at.size),
            Fill::Zero => self.ops.copy(&self.zero_buf[..at.size as usize], at.hva),
            Fill::File { offset } => {
                let buf = &mut self.page_buf[..at.size as usize];
                let read = match self.session.snapshot() {
                    Some(f) => f.read_exact_at(buf, offset),
                    None => Err(io::Error::other("no snapshot file")),
                };
                match read {
                    Ok(()) => self.ops.copy(buf, at.hva),
                    Err(e) => {
                        self.abort(at);
                        self.error(format_args!(
                            "reading snapshot offset {offset:#x} for {:#x}: {e}",
                            at.hva.0
                        ));
                        return;
                    }
                }
            }
        };
        match result {
            Ok(()) | Err(OpError::Exists) => {
                let counter = match (result, fill) {
                    (Err(_), _) => &counters.already_present,
                    (Ok(()), Fill::Zero) => &counters.zero_fills,
                    (Ok(()), Fill::File { .. }) => &counters.file_fills,
                };
                Counters::bump(counter);
                let completed = self.session.map().complete(at.page);
                if let Err(e) = completed {
                    self.error(format_args!("s2map refused completion: {e}"));
                }
                self.session
                    .record_latency(t0.elapsed().as_nanos().min(u64::MAX as u128) as u64);
            }
            Err(OpError::Retry) => {
                Counters::bump(&counters.retries);
                self.abort(at);
                self.retries.push(at.hva);
            }
            Err(e) => {
                self.abort(at);
                self.error(format_args!("installing page at {:#x}: {e}", at.hva.0));
            }
        }
    }

    fn abort(&self, at: Located) {
        // Nothing else waits in this step (no device waiters yet): the blocked vCPU thread
        // either gets a retry or stays blocked on an error that was logged and counted.
        let _ = self.session.map().abort(at.page);
    }

    fn error(&mut self, what: std::fmt::Arguments<'_>) {
        Counters::bump(&self.session.counters.errors);
        if self.logged < MAX_LOGGED_ERRORS {
            self.logged += 1;
            tracing::warn!(
                session = self.session.id(),
                vm = self.session.vm(),
                "{what}"
            );
        }
    }
}

/// A running fault thread; [`FaultThread::stop`] ends it.
#[derive(Debug)]
pub struct FaultThread {
    stop: Arc<Stop>,
    handle: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Stop {
    flag: AtomicBool,
    event: EventFd,
}

impl FaultThread {
    /// Starts serving `server` on a new thread named after the session, spinning for `spin`
    /// after each burst of faults before sleeping.
    pub fn spawn<O: UffdOps + Send + 'static>(
        server: FaultServer<O>,
        spin: Duration,
    ) -> io::Result<FaultThread> {
        let stop = Arc::new(Stop {
            flag: AtomicBool::new(false),
            event: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        });
        let name = format!("faultd-s{}", server.session.id());
        let st = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(server, spin, &st))?;
        Ok(FaultThread {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.flag.store(true, Ordering::Release);
        let _ = self.stop.event.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The adaptive polling loop: serve while events come, spin `spin` after the last one, then
/// sleep in poll(2) on the uffd and the stop eventfd.
fn run<O: UffdOps>(mut server: FaultServer<O>, spin: Duration, stop: &Stop) {
    let mut last_work = Instant::now();
    while !stop.flag.load(Ordering::Acquire) {
        match server.serve_ready() {
            Ok(0) if !server.has_retries() => {}
            Ok(_) => {
                last_work = Instant::now();
                continue;
            }
            Err(e) => {
                tracing::error!(
                    session = server.session.id(),
                    "reading the userfaultfd failed, fault service stops: {e}"
                );
                return;
            }
        }
        if last_work.elapsed() < spin {
            std::hint::spin_loop();
            continue;
        }
        let mut fds = [
            PollFd::new(server.fd(), PollFlags::POLLIN),
            PollFd::new(stop.event.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(
                    session = server.session.id(),
                    "poll failed, fault service stops: {e}"
                );
                return;
            }
        }
        let hup = fds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)
        });
        if hup {
            tracing::debug!(
                session = server.session.id(),
                fd = server.fd().as_raw_fd(),
                "userfaultfd hung up"
            );
            return;
        }
    }
}

#[cfg(test)]
mod tests;

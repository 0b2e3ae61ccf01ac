//! Raw userfaultfd handlers: the least a process can do to serve MISSING faults on 4 KiB memfd
//! RAM, as baselines for faultd in the fault round-trip benchmark (`benches/fault_roundtrip.rs`).
//!
//! Each handler owns a duplicate of the RAM's uffd and serves it on one OS thread, answering
//! every fault with `UFFDIO_COPY` of a 4 KiB zero buffer (which also wakes the faulting thread).
//! They differ only in how that thread waits for the next event:
//!
//! - [`RawKind::Blocking`]: sleeps in poll(2), reads one event, copies, polls again;
//! - [`RawKind::Polling`]: never sleeps: spins on non-blocking reads (burns a core);
//! - [`RawKind::Tokio`]: a current-thread tokio runtime with the uffd in an `AsyncFd`, the
//!   design faultd rejected for a dedicated thread (see `faultd/src/kernel/uffd.rs`).
//!
//! The serving thread, its stop signal and its CPU time are [`crate::bench`]'s, shared with the
//! ring handlers of [`crate::raw_ring`].

use std::io;
use std::os::fd::AsFd;
use std::os::raw::c_void;
use std::time::Instant;

use userfaultfd::{Event, Uffd};

use crate::bench::{dup_uffd, ServingThread, Stop};

/// Page size of the RAM the handlers serve.
pub const PAGE: usize = 4096;

/// The source of every `UFFDIO_COPY`: a static buffer, so no handler allocates per fault.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// How a raw handler waits for events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawKind {
    /// poll(2) until readable, read one event, copy, repeat.
    Blocking,
    /// Non-blocking reads in a tight loop; never sleeps.
    Polling,
    /// A current-thread tokio runtime: `AsyncFd::readable`, then events read inside `try_io`
    /// until `WouldBlock`.
    Tokio,
}

impl RawKind {
    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            RawKind::Blocking => "raw-blocking",
            RawKind::Polling => "raw-polling",
            RawKind::Tokio => "raw-tokio",
        }
    }
}

/// What a handler did, returned when it stops.
#[derive(Debug, Default)]
pub struct RawStats {
    /// Faults resolved.
    pub served: u64,
    /// For every fault after the first: ns from the end of the previous resolution (its
    /// `UFFDIO_COPY` returned) to reading this fault's event. For the polling handler, which
    /// reads an event within a read(2) of its arrival, this is the gap between faults that a
    /// handler must bridge to catch the next one without sleeping; for the others it also
    /// includes their own wake-up.
    pub gaps_ns: Vec<u64>,
}

/// Per-thread bookkeeping: kept on the serving thread, so recording costs no shared writes.
struct Tally {
    stats: RawStats,
    last_done: Option<Instant>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            stats: RawStats {
                served: 0,
                // Sized up front so a reallocation never lands between an event and its copy.
                gaps_ns: Vec::with_capacity(1 << 16),
            },
            last_done: None,
        }
    }
}

/// A raw handler serving one uffd on its own thread; [`RawHandler::stop`] ends it.
#[derive(Debug)]
pub struct RawHandler {
    kind: RawKind,
    thread: ServingThread<RawStats>,
}

impl RawHandler {
    /// Starts a `kind` handler on a duplicate of `uffd` (which must be non-blocking, as
    /// `faultd_client::create_uffd` makes it). Returns once the thread runs and knows its tid.
    pub fn spawn(kind: RawKind, uffd: &Uffd) -> io::Result<RawHandler> {
        let uffd = dup_uffd(uffd)?;
        let thread = ServingThread::spawn(kind.name().to_owned(), "handler", move |stop| {
            let mut tally = Tally::new();
            match kind {
                RawKind::Blocking => serve_blocking(&uffd, stop, &mut tally),
                RawKind::Polling => serve_polling(&uffd, stop, &mut tally),
                RawKind::Tokio => serve_tokio(uffd, stop, &mut tally),
            }?;
            Ok(tally.stats)
        })?;
        Ok(RawHandler { kind, thread })
    }

    /// Which handler this is.
    pub fn kind(&self) -> RawKind {
        self.kind
    }

    /// Kernel thread id of the serving thread (for its schedstat).
    pub fn tid(&self) -> i32 {
        self.thread.tid()
    }

    /// CPU time the serving thread has used, in ns.
    pub fn cpu_ns(&self) -> io::Result<u64> {
        self.thread.cpu_ns()
    }

    /// Stops the thread and returns what it did, or the error that ended it. (Dropping the
    /// handler stops it too.)
    pub fn stop(self) -> io::Result<RawStats> {
        self.thread.stop()
    }
}

/// Resolves one fault event with a zero-page copy. Non-fault events (there are none unless
/// the RAM is discarded or remapped) are ignored.
fn serve_event(uffd: &Uffd, ev: Event, tally: &mut Tally) -> io::Result<()> {
    let Event::Pagefault { addr, .. } = ev else {
        return Ok(());
    };
    // One vDSO clock read before the copy (tens of ns, as faultd's own t0 costs it).
    if let Some(done) = tally.last_done {
        tally.stats.gaps_ns.push(done.elapsed().as_nanos() as u64);
    }
    let page = (addr as usize & !(PAGE - 1)) as *mut c_void;
    // SAFETY: the source is a live static of exactly PAGE bytes; the destination is a page of
    // the registered RAM (the kernel reported the fault there and checks the range), which no
    // Rust reference points into.
    let copied = unsafe { uffd.copy(ZERO_PAGE.as_ptr().cast(), page, PAGE, true) };
    match copied {
        Ok(_) => {}
        // Someone installed it first: it is present, only the waiter needs waking.
        Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
            uffd.wake(page, PAGE).map_err(io::Error::other)?;
        }
        Err(e) => return Err(io::Error::other(e)),
    }
    tally.stats.served += 1;
    tally.last_done = Some(Instant::now());
    Ok(())
}

fn read_one(uffd: &Uffd) -> io::Result<Option<Event>> {
    uffd.read_event().map_err(io::Error::other)
}

fn serve_blocking(uffd: &Uffd, stop: &Stop, tally: &mut Tally) -> io::Result<()> {
    while stop.wait(uffd.as_fd())? {
        // One event per poll, as the simplest handler does; a spurious wake-up reads nothing.
        if let Some(ev) = read_one(uffd)? {
            serve_event(uffd, ev, tally)?;
        }
    }
    Ok(())
}

fn serve_polling(uffd: &Uffd, stop: &Stop, tally: &mut Tally) -> io::Result<()> {
    while !stop.requested() {
        if let Some(ev) = read_one(uffd)? {
            serve_event(uffd, ev, tally)?;
        }
    }
    Ok(())
}

fn serve_tokio(uffd: Uffd, stop: &Stop, tally: &mut Tally) -> io::Result<()> {
    use tokio::io::unix::AsyncFd;
    use tokio::io::Interest;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        // SAFETY: the Uffd owns its fd and closes it only on drop, which happens after the
        // AsyncFd (which owns the Uffd) deregisters it; nothing swaps the fd meanwhile.
        let afd = unsafe { AsyncFd::register_with_interest(uffd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        loop {
            tokio::select! {
                // Stop is rare: check readiness first so a fault never waits behind it.
                biased;
                guard = afd.readable() => {
                    let mut guard = guard?;
                    loop {
                        let read = guard.try_io(|fd| {
                            read_one(fd.get_ref())?.ok_or_else(|| io::ErrorKind::WouldBlock.into())
                        });
                        match read {
                            Ok(Ok(ev)) => serve_event(afd.get_ref(), ev, tally)?,
                            Ok(Err(e)) => return Err(e),
                            // Drained: readiness is cleared, wait for the reactor again.
                            Err(_would_block) => break,
                        }
                    }
                }
                _ = stop.notified() => return Ok(()),
            }
        }
    })
}

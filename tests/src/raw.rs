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
//!
//! [`RawHandler::spawn_from`] serves a snapshot instead ([`Source::File`]): the same loop, each
//! fault answered with one `UFFDIO_COPY` from the file mapped read-only, as the minimal
//! restore handler of the prefetch benchmark (`benches/prefetch.rs`).

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

/// What a raw handler copies into a faulting page.
#[derive(Debug)]
pub enum Source {
    /// A zero page.
    Zero,
    /// The page of a snapshot file at the fault's offset into the RAM.
    File(FileSource),
}

/// A snapshot file mapped read-only for a raw handler: the RAM's byte at `ram_base + o` is the
/// file's byte at `o` (zero past the file's end).
#[derive(Debug)]
pub struct FileSource {
    map: std::ptr::NonNull<c_void>,
    len: usize,
    ram_base: u64,
}

// SAFETY: the mapping is read-only and owned by the FileSource alone (unmapped on its drop);
// reading it from another thread is as sound as from this one.
unsafe impl Send for FileSource {}

impl FileSource {
    /// Maps all of `file` (`MAP_PRIVATE`, read-only) for RAM whose first byte is at
    /// `ram_base`.
    pub fn map(file: &std::fs::File, ram_base: u64) -> io::Result<FileSource> {
        let len = file.metadata()?.len() as usize;
        let len_nz = std::num::NonZeroUsize::new(len)
            .ok_or_else(|| io::Error::other("empty snapshot file"))?;
        // SAFETY: a fresh read-only private mapping of an open file; nothing else refers to
        // the address range it returns, and it is unmapped only on drop.
        let map = unsafe {
            nix::sys::mman::mmap(
                None,
                len_nz,
                nix::sys::mman::ProtFlags::PROT_READ,
                nix::sys::mman::MapFlags::MAP_PRIVATE,
                file,
                0,
            )
        }?;
        Ok(FileSource { map, len, ram_base })
    }

    /// The source of the page at `page` (a page of the RAM), or None past the file's end.
    fn page(&self, page: u64) -> Option<*const c_void> {
        let off = page.checked_sub(self.ram_base)? as usize;
        if off.checked_add(PAGE)? > self.len {
            return None;
        }
        // SAFETY: `off + PAGE <= len` (checked above), so the pointer stays inside the
        // mapping.
        let at = unsafe { self.map.as_ptr().cast::<u8>().add(off) };
        Some(at.cast_const().cast())
    }
}

impl Drop for FileSource {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`; the serving thread that read it is done.
        let _ = unsafe { nix::sys::mman::munmap(self.map, self.len) };
    }
}

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
        RawHandler::spawn_from(kind, uffd, Source::Zero)
    }

    /// As [`RawHandler::spawn`], copying each page from `source`.
    pub fn spawn_from(kind: RawKind, uffd: &Uffd, source: Source) -> io::Result<RawHandler> {
        let uffd = dup_uffd(uffd)?;
        let thread = ServingThread::spawn(kind.name().to_owned(), "handler", move |stop| {
            let mut tally = Tally::new();
            let src = &source;
            match kind {
                RawKind::Blocking => serve_blocking(&uffd, src, stop, &mut tally),
                RawKind::Polling => serve_polling(&uffd, src, stop, &mut tally),
                RawKind::Tokio => serve_tokio(uffd, src, stop, &mut tally),
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

/// Resolves one fault event with a copy from `src`. Non-fault events (there are none unless
/// the RAM is discarded or remapped) are ignored.
fn serve_event(uffd: &Uffd, src: &Source, ev: Event, tally: &mut Tally) -> io::Result<()> {
    let Event::Pagefault { addr, .. } = ev else {
        return Ok(());
    };
    // One vDSO clock read before the copy (tens of ns, as faultd's own t0 costs it).
    if let Some(done) = tally.last_done {
        tally.stats.gaps_ns.push(done.elapsed().as_nanos() as u64);
    }
    let page = (addr as usize & !(PAGE - 1)) as *mut c_void;
    let from = match src {
        Source::File(f) => f.page(page as u64),
        Source::Zero => None,
    }
    .unwrap_or(ZERO_PAGE.as_ptr().cast());
    // SAFETY: the source is PAGE readable bytes (a live static, or a page inside the file
    // mapping `src` owns); the destination is a page of the registered RAM (the kernel
    // reported the fault there and checks the range), which no Rust reference points into.
    let copied = unsafe { uffd.copy(from, page, PAGE, true) };
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

fn serve_blocking(uffd: &Uffd, src: &Source, stop: &Stop, tally: &mut Tally) -> io::Result<()> {
    while stop.wait(uffd.as_fd())? {
        // One event per poll, as the simplest handler does; a spurious wake-up reads nothing.
        if let Some(ev) = read_one(uffd)? {
            serve_event(uffd, src, ev, tally)?;
        }
    }
    Ok(())
}

fn serve_polling(uffd: &Uffd, src: &Source, stop: &Stop, tally: &mut Tally) -> io::Result<()> {
    while !stop.requested() {
        if let Some(ev) = read_one(uffd)? {
            serve_event(uffd, src, ev, tally)?;
        }
    }
    Ok(())
}

fn serve_tokio(uffd: Uffd, src: &Source, stop: &Stop, tally: &mut Tally) -> io::Result<()> {
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
                            Ok(Ok(ev)) => serve_event(afd.get_ref(), src, ev, tally)?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Duration;

    #[test]
    fn a_file_source_handler_fills_each_page_with_the_files_page_and_zeros_past_its_end() {
        // 8 pages of RAM over a 5-page file whose page p is all byte p + 1.
        let ram = crate::Ram::new("raw-file", 8 * PAGE as u64);
        let mut file = tempfile::tempfile().unwrap();
        for p in 0..5u8 {
            file.write_all(&[p + 1; PAGE]).unwrap();
        }
        let src = Source::File(FileSource::map(&file, ram.ram.host_addr()).unwrap());
        let handler = RawHandler::spawn_from(RawKind::Blocking, &ram.uffd, src).unwrap();

        // The first and last byte of each page, pages in reverse order.
        let offs: Vec<u64> = (0..8u64)
            .rev()
            .flat_map(|p| [p * PAGE as u64, (p + 1) * PAGE as u64 - 1])
            .collect();
        let got = crate::read_with_timeout(&ram.ram, offs, Duration::from_secs(10));

        let want: Vec<u8> = (0..8u8)
            .rev()
            .flat_map(|p| if p < 5 { [p + 1; 2] } else { [0; 2] })
            .collect();
        assert_eq!(got, want);
        assert_eq!(handler.stop().unwrap().served, 8);
    }
}

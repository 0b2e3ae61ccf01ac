//! The VMM's userfaultfd as faultd uses it: the operations behind a trait ([`UffdOps`]), so the
//! engine runs against the kernel ([`KernelUffd`]) or a fake in unit tests. The vCPU fault path
//! that uses it is [`crate::engine`]'s `vcpu` module.
//!
//! Errno is lifted into meaning once, in [`KernelUffd`]: EEXIST means someone installed the page
//! first (fine: it is present), EAGAIN means a layout event (REMOVE/UNMAP) is queued and unread
//! (read events, then retry), ESRCH means the VMM's address space is gone.
//!
//! Threads, not tokio tasks: each session's uffd is served by a dedicated OS thread with
//! adaptive polling (the engine's fault thread). A fault is a few microseconds of work, and the
//! dominant cost on an idle host is waking the serving thread. A dedicated thread can spin for a
//! bounded window after each fault (catching bursts without any wake-up) and then sleep in
//! poll(2); a tokio task would add a reactor hop and a task wake-up to every fault and could not
//! spin without starving other tasks. The benchmark (`cargo bench -p faultd-tests`) measures
//! this choice.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// A host virtual address in the VMM's address space (not faultd's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hva(pub u64);

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

/// Bytes in faultd's address space that faultd itself never reads: a range of its read-only
/// mapping of a snapshot file ([`crate::engine::session::SnapshotView`]). Only the kernel reads them,
/// as UFFDIO_COPY's source; if the file shrank under the mapping, the copy fails with EFAULT
/// instead of faultd taking SIGBUS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedSource {
    /// First byte, in faultd's address space.
    pub addr: u64,
    /// Bytes (one page).
    pub len: u64,
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
            // EINTR: a signal (the watchdog's, or a stray one) cut the ioctl short; the page
            // was not installed and the thread is still waiting: try again.
            libc::EAGAIN | libc::EINTR => OpError::Retry,
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
    /// Installs the page at `src` (a mapping faultd never reads) at `at`, waking waiters.
    fn copy_mapped(&self, src: MappedSource, at: Hva) -> Result<(), OpError>;
    /// Installs the pages at `src` (several, contiguous; a mapping faultd never reads) at `at`
    /// in one UFFDIO_COPY, waking waiters. Returns the bytes installed: fewer than `src.len`
    /// when the kernel stopped at a page (already present, or a layout event came); an error
    /// only when not even the first page was installed.
    fn copy_run(&self, src: MappedSource, at: Hva) -> Result<u64, OpError>;
    /// Wakes threads blocked on `[at, at+len)` without installing anything.
    fn wake(&self, at: Hva, len: u64) -> Result<(), OpError>;
    /// Write-protects `[at, at+len)` in the VMM: writers block (a WP fault) until unprotected.
    fn write_protect(&self, at: Hva, len: u64) -> Result<(), OpError>;
    /// Removes write protection of `[at, at+len)` and wakes the writers blocked on it.
    fn unprotect(&self, at: Hva, len: u64) -> Result<(), OpError>;
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
            // A signal (the doorbell watchdog's, or a stray one) cut the read short: nothing
            // was consumed; the next pass reads again.
            Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EINTR => return Ok(()),
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

    fn copy_mapped(&self, src: MappedSource, at: Hva) -> Result<(), OpError> {
        // SAFETY: `src` is a range of faultd's live read-only snapshot mapping, which faultd
        // never dereferences; only the kernel reads it here (EFAULT if the file shrank). The
        // destination is in the VMM's address space, checked by the kernel to be registered.
        unsafe {
            self.uffd.copy(
                src.addr as *const std::ffi::c_void,
                at.0 as *mut _,
                src.len as usize,
                true,
            )
        }
        .map(drop)
        .map_err(lift)
    }

    fn copy_run(&self, src: MappedSource, at: Hva) -> Result<u64, OpError> {
        // SAFETY: as in `copy_mapped`: `src` is a range of faultd's read-only snapshot mapping
        // that only the kernel reads; the destination is checked by the kernel.
        let done = unsafe {
            self.uffd.copy(
                src.addr as *const std::ffi::c_void,
                at.0 as *mut _,
                src.len as usize,
                true,
            )
        };
        match done {
            Ok(n) => Ok(n as u64),
            // The kernel stopped after `n` bytes (EAGAIN with a positive count: a page was
            // present, or a layout event came); a negative count is its errno.
            Err(userfaultfd::Error::PartiallyCopied(n)) if (n as i64) > 0 => Ok(n as u64),
            Err(userfaultfd::Error::PartiallyCopied(_)) => Err(OpError::Retry),
            Err(e) => Err(lift(e)),
        }
    }

    fn wake(&self, at: Hva, len: u64) -> Result<(), OpError> {
        self.uffd.wake(at.0 as *mut _, len as usize).map_err(lift)
    }

    fn write_protect(&self, at: Hva, len: u64) -> Result<(), OpError> {
        self.uffd
            .write_protect(at.0 as *mut _, len as usize)
            .map_err(lift)
    }

    fn unprotect(&self, at: Hva, len: u64) -> Result<(), OpError> {
        self.uffd
            .remove_write_protection(at.0 as *mut _, len as usize, true)
            .map_err(lift)
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.uffd.as_fd()
    }
}

/// `struct uffdio_range` (include/uapi/linux/userfaultfd.h).
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 16);

/// `UFFDIO_WAKE`: `_IOR(0xAA, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;

/// Whether the VMM completed the `UFFDIO_API` handshake on `fd`, probed with a `UFFDIO_WAKE`
/// of the one page at `probe` (page aligned, mapped in the uffd's address space). Before the
/// handshake the kernel refuses every ioctl but `UFFDIO_API` with EINVAL (fs/userfaultfd.c,
/// `userfaultfd_ioctl`); after it, a wake of a valid range succeeds whether or not anything
/// waits there (a thread woken spuriously faults again). `/proc/self/fdinfo`'s `API:` line
/// would do too, but shows the handshake (the `UFFD_FEATURE_INITIALIZED` bit) only on newer
/// kernels; the ioctl is the same on all of them.
pub fn api_handshake_done(fd: BorrowedFd<'_>, probe: Hva) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let range = UffdioRange {
        start: probe.0,
        len: 4096,
    };
    // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range` from the pointer, which points to a
    // live value of that layout (size asserted above); the fd is borrowed for the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_WAKE as _, &range) };
    if rc == 0 {
        return Ok(true);
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        e => Err(e),
    }
}

//! Memory shared with another process (the VMM) and the fds around it.
//!
//! This is one of the few places with `unsafe`: the mapping itself, and typed access to bytes
//! that the other side may rewrite at any moment. Access goes only through atomics (indices,
//! table words, counters) and volatile copies of plain records. No Rust reference to non-atomic
//! shared data is ever created, so a concurrent write cannot invalidate a reference. It can
//! only make a copied record garbage, which the caller then validates.

use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use nix::fcntl::{fcntl, FcntlArg, OFlag, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::sys::{iommu_hwpt_page_response, iommu_hwpt_pgfault};

/// A record that may be copied in and out of shared memory as raw bytes.
///
/// # Safety
/// Every bit pattern must be a valid value, and the type must have no padding (its bytes are
/// written to memory another process reads).
pub(crate) unsafe trait Plain: Copy {}

// SAFETY: ten u32/u64 fields with explicit reserved words; 40 bytes, no padding (asserted in
// `sys`); any bit pattern is a valid value.
unsafe impl Plain for iommu_hwpt_pgfault {}
// SAFETY: two u32 fields, 8 bytes, no padding; any bit pattern is a valid value.
unsafe impl Plain for iommu_hwpt_page_response {}

/// A `MAP_SHARED`, read-write mapping of a whole memfd.
#[derive(Debug)]
pub(crate) struct SharedMapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value until drop. All access goes through
// atomics or volatile copies (see the module header), which are sound from any thread.
unsafe impl Send for SharedMapping {}
// SAFETY: as for Send: `&self` methods only hand out atomics or copy values.
unsafe impl Sync for SharedMapping {}

impl SharedMapping {
    /// Maps `len` bytes of `fd` from offset 0, shared and read-write. The caller has made sure
    /// the file cannot shrink below `len` (F_SEAL_SHRINK), so touching the mapping never
    /// raises SIGBUS.
    pub(crate) fn map(fd: BorrowedFd<'_>, len: usize) -> io::Result<SharedMapping> {
        let size = NonZeroUsize::new(len).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh mapping at an address the kernel chooses: it cannot overlap any
        // existing Rust object. It is unmapped only by Drop, after every borrow of self ends.
        let ptr = unsafe {
            mmap(
                None,
                size,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }?;
        Ok(SharedMapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// A pointer to `size` bytes at `offset`, aligned to `align`.
    ///
    /// Callers pass offsets computed from a layout validated at construction, so the
    /// assertion cannot fire on any input from the other side; it guards this crate's own
    /// arithmetic.
    fn at(&self, offset: usize, size: usize, align: usize) -> *mut u8 {
        assert!(
            offset.checked_add(size).is_some_and(|end| end <= self.len)
                && offset.is_multiple_of(align),
            "shared memory access {offset}+{size} outside a {} byte mapping",
            self.len
        );
        // SAFETY: in bounds of the mapping, checked just above.
        unsafe { self.ptr.as_ptr().add(offset) }
    }

    /// The 32-bit word at `offset` (4-aligned), as an atomic.
    pub(crate) fn u32_at(&self, offset: usize) -> &AtomicU32 {
        let p = self.at(offset, 4, 4).cast::<AtomicU32>();
        // SAFETY: in bounds and aligned (checked by `at`), the mapping outlives `&self`, and
        // this memory is only ever accessed atomically by this process; AtomicU32 accepts any
        // bit pattern another process stores.
        unsafe { &*p }
    }

    /// The 64-bit word at `offset` (8-aligned), as an atomic.
    pub(crate) fn u64_at(&self, offset: usize) -> &AtomicU64 {
        let p = self.at(offset, 8, 8).cast::<AtomicU64>();
        // SAFETY: as in `u32_at`, with 8 bytes and 8-byte alignment.
        unsafe { &*p }
    }

    /// A volatile copy of the record at `offset`: what the other side wrote, possibly torn
    /// by a concurrent rewrite. The caller validates it.
    pub(crate) fn read<T: Plain>(&self, offset: usize) -> T {
        let p = self.at(offset, size_of::<T>(), align_of::<T>()).cast::<T>();
        // SAFETY: in bounds and aligned (checked by `at`); T is Plain, so whatever bytes are
        // there form a valid T.
        unsafe { p.read_volatile() }
    }

    /// A volatile store of `value` at `offset`.
    pub(crate) fn write<T: Plain>(&self, offset: usize, value: T) {
        let p = self.at(offset, size_of::<T>(), align_of::<T>()).cast::<T>();
        // SAFETY: in bounds and aligned (checked by `at`); no Rust reference points into this
        // shared memory except atomics, which are at other offsets by layout.
        unsafe { p.write_volatile(value) }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; every borrow of self has ended.
        // munmap of a valid mapping cannot fail, and there is nothing to do if it did.
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

/// A new sealable memfd of `len` bytes, zero-filled, sealed against shrinking and growing.
pub(crate) fn create_memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
    nix::unistd::ftruncate(
        &fd,
        i64::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?,
    )?;
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
    )?;
    Ok(fd)
}

/// Makes sure `fd` (from the other side) can never shrink: F_SEAL_SHRINK, added here if the
/// creator did not. Fails for anything that is not a sealable memfd. Without the seal the other
/// side could truncate the file under faultd's mapping and kill faultd with SIGBUS.
pub(crate) fn seal_against_shrink(fd: BorrowedFd<'_>) -> io::Result<()> {
    let seals = SealFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GET_SEALS)?);
    if !seals.contains(SealFlag::F_SEAL_SHRINK) {
        fcntl(fd, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK))?;
    }
    Ok(())
}

/// The size of the file behind `fd`.
pub(crate) fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let st = nix::sys::stat::fstat(fd)?;
    Ok(u64::try_from(st.st_size).unwrap_or(0))
}

/// Rounds `len` up to whole 4 KiB pages.
pub(crate) fn page_round_up(len: u64) -> u64 {
    len.div_ceil(4096) * 4096
}

/// What `fd` is, as /proc/self/fd names it: `anon_inode:[eventfd]`, a path, `socket:[N]`...
pub(crate) fn fd_kind(fd: BorrowedFd<'_>) -> io::Result<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Whether `fd` is an eventfd (per /proc/self/fd).
pub(crate) fn is_eventfd(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(fd_kind(fd)?.as_os_str() == "anon_inode:[eventfd]")
}

/// Sets O_NONBLOCK on `fd`. Note the flag lives in the open file description, which the
/// other side shares.
pub(crate) fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// An eventfd received from the other side, used without ever blocking.
#[derive(Debug)]
pub(crate) struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    /// Takes `fd`, which must be an eventfd. Sets O_NONBLOCK (for writes, and for reads on a
    /// kernel without RWF_NOWAIT on eventfd).
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Option<Doorbell>> {
        if !is_eventfd(fd.as_fd())? {
            return Ok(None);
        }
        set_nonblocking(fd.as_fd())?;
        Ok(Some(Doorbell { fd }))
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Resets the counter; returns whether it was set.
    ///
    /// Reads with RWF_NOWAIT: O_NONBLOCK is in the file description the other side shares and
    /// could clear, RWF_NOWAIT is per call. Kernels without it for eventfd (< 5.10) answer
    /// EOPNOTSUPP, and then a plain read relies on O_NONBLOCK.
    pub(crate) fn drain(&self) -> io::Result<bool> {
        let mut value = [0u8; 8];
        let iov = libc::iovec {
            iov_base: value.as_mut_ptr().cast(),
            iov_len: value.len(),
        };
        // SAFETY: one iovec describing `value`, a live 8-byte buffer; the fd is owned by self;
        // offset -1 means "current position", the only meaning an eventfd has.
        let n = unsafe { libc::preadv2(self.fd.as_raw_fd(), &iov, 1, -1, libc::RWF_NOWAIT) };
        if n >= 0 {
            return Ok(n > 0);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) => Ok(false),
            Some(libc::EOPNOTSUPP) => match nix::unistd::read(&self.fd, &mut value) {
                Ok(n) => Ok(n > 0),
                Err(nix::errno::Errno::EAGAIN) => Ok(false),
                Err(e) => Err(e.into()),
            },
            _ => Err(err),
        }
    }

    /// Adds 1 to the counter. A saturated counter (EAGAIN) already wakes the other side.
    ///
    /// This write can block: O_NONBLOCK lives in the file description the other side shares,
    /// and eventfd writes take no per-call RWF_NOWAIT. It blocks only if the other side both
    /// cleared O_NONBLOCK and saturated its own counter, i.e. on purpose. A caller that must
    /// not stall bounds it from outside: a signal without SA_RESTART makes it fail EINTR
    /// (`io::ErrorKind::Interrupted`), which is returned as is.
    pub(crate) fn ring(&self) -> io::Result<()> {
        match nix::unistd::write(&self.fd, &1u64.to_ne_bytes()) {
            Ok(_) | Err(nix::errno::Errno::EAGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

//! iopf: device I/O page faults (PCIe PRI page request groups) for faultd.
//!
//! Owns the device side of fault service: the raw iommufd ABI ([`sys`]), the page request
//! model and group assembly ([`model`]), the two transports that deliver page requests
//! ([`iommufd::IommufdQueue`] over the kernel's fault fd, [`ring::RingConsumer`] over the
//! eventfd ring of `docs/device-faults.md`), and the two ways to install a translation
//! ([`iommufd::IoasMapper`], [`emulated::EmulatedIommu`]). Both sides of the ring and of the
//! emulated IOMMU table live here too, so the VMM's emulated device and faultd share one
//! definition of each layout.
//!
//! It does not own deciding what to map: which page is where, residency, permissions of guest
//! RAM regions and deadlines belong to s2map and faultd. Everything read from the other side
//! (ring slots and indices, table words, kernel records) is validated before use and never
//! causes a panic.

#![deny(unsafe_op_in_unsafe_fn)]

use std::io;
use std::os::fd::BorrowedFd;
use std::time::Duration;

pub mod emulated;
pub mod iommufd;
pub mod model;
pub mod ring;
mod shm;
pub mod sys;

pub use model::{DevId, Group, GroupAssembler, Iova, PageRequest, Perm, RecordError, ResponseCode};

/// What a [`FaultQueue`] delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A closed, valid page request group: answer it once.
    Group(Group),
    /// Input that is not a valid group. With a cookie, the caller must answer it INVALID;
    /// without one there is nothing to answer and it is only counted.
    Malformed {
        /// The cookie of the group it belonged to, if it had one.
        cookie: Option<u32>,
        /// What was wrong (a fixed text; counters and logs group by it).
        reason: &'static str,
    },
}

/// A source of page request groups and the sink of their answers.
pub trait FaultQueue: Send {
    /// Appends what is available now, never blocking. Appending nothing means nothing is
    /// available (the caller's would-block: wait for [`FaultQueue::fd`] to poll readable).
    fn read(&mut self, out: &mut Vec<Incoming>) -> io::Result<()>;
    /// Answers one group (or one Malformed entry with a cookie).
    fn respond(&mut self, cookie: u32, code: ResponseCode) -> Result<(), RespondError>;
    /// The fd to poll for readiness (POLLIN).
    fn fd(&self) -> BorrowedFd<'_>;
}

/// Why an answer was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum RespondError {
    /// The cookie is not awaiting an answer (never delivered, or already answered).
    #[error("cookie {0} is not awaiting an answer")]
    UnknownCookie(u32),
    /// The device is not taking answers: this one was dropped (and counted).
    #[error("response dropped: the device is not consuming responses")]
    QueueFull,
    /// The transport failed. On the ring the answer is already queued and only the wake-up
    /// of the producer failed: do not answer again.
    #[error("writing the response failed")]
    Io(#[source] io::Error),
}

/// Where the guest RAM behind an IOVA range is, for the mapper that needs it.
#[derive(Clone, Copy, Debug)]
pub struct MapTarget<'a> {
    /// faultd's own mapping of the memfd at the granule's first byte.
    pub va: u64,
    /// The guest RAM memfd.
    pub fd: BorrowedFd<'a>,
    /// The granule's offset in `fd`.
    pub offset: u64,
}

/// Installs and removes device translations, one whole granule at a time.
pub trait Mapper: Send {
    /// Bytes per granule: every map/unmap covers exactly one whole, aligned granule. The
    /// emulated IOMMU's table dictates it; for iommufd it is faultd's choice (config).
    fn granule(&self) -> u64;
    /// Maps `[iova, iova+len)` (one granule, IOVA == GPA) to guest RAM. The caller guarantees
    /// every page in it is resident in the memfd. `target` says where that RAM is for faultd.
    fn map(
        &mut self,
        iova: Iova,
        len: u64,
        target: MapTarget<'_>,
        writable: bool,
    ) -> Result<(), MapError>;
    /// Unmaps exactly a range mapped before; returns only when the device can no longer
    /// access it (IOTLB invalidated / emulated device quiescent).
    fn unmap(&mut self, iova: Iova, len: u64) -> Result<(), MapError>;
}

/// Why a map or unmap did not happen.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The range is already mapped (iommufd: EEXIST/EBUSY on FIXED_IOVA).
    #[error("IOVA range already mapped")]
    Exists,
    /// Unmap of a range that is not mapped (iommufd: ENOENT).
    #[error("IOVA range not mapped")]
    NotMapped,
    /// The range is not one whole, aligned granule.
    #[error("{iova:#x}+{len:#x} is not one aligned granule of {granule:#x} bytes")]
    NotAGranule {
        /// Start of the range.
        iova: u64,
        /// Its length.
        len: u64,
        /// The mapper's granule.
        granule: u64,
    },
    /// The range is outside what the IOMMU translates.
    #[error("IOVA {iova:#x} is outside the translated range")]
    OutOfRange {
        /// Start of the range.
        iova: u64,
    },
    /// A granule size that is not a power of two of at least 4 KiB.
    #[error("granule {0:#x} is not a power of two of at least 4 KiB")]
    InvalidGranule(u64),
    /// A device worker stayed inside one access for longer than the unmap timeout, so it may
    /// still use the old translation. The entry is already cleared.
    #[error("device worker {worker} still in an access after {waited:?}")]
    Timeout {
        /// The worker that did not finish.
        worker: u32,
        /// How long unmap waited.
        waited: Duration,
    },
    /// The kernel refused the operation.
    #[error("{op} failed")]
    Io {
        /// The ioctl that failed.
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

/// Checks that `[iova, iova+len)` is exactly one aligned granule.
fn check_granule(iova: Iova, len: u64, granule: u64) -> Result<(), MapError> {
    if len != granule || iova.0 & (granule - 1) != 0 {
        return Err(MapError::NotAGranule {
            iova: iova.0,
            len,
            granule,
        });
    }
    Ok(())
}

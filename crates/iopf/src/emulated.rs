//! The emulated IOMMU, table layout version 1 (`docs/device-faults.md`): an IO page table in a
//! memfd that faultd writes ([`EmulatedIommu`], a [`Mapper`]) and the VMM's emulated device
//! walks ([`IommuView`]), as hardware walks a real one.
//!
//! The hard part is unmap. Clearing an entry does not stop a device worker that already read
//! it and is still copying. So each worker brackets every access with a generation counter
//! (odd while inside), and unmap waits for every worker it saw inside to leave. Both sides use
//! SeqCst for the counter and the entry. Then either the worker's increment comes first in the
//! single total order, so unmap sees it odd and waits, or unmap's clear comes first, so the
//! worker reads the cleared entry. The device side is [`Access`], a guard that a worker cannot
//! forget to end and, through `&mut Worker`, cannot nest.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::shm::{self, SharedMapping};
use crate::{check_granule, Iova, MapError, MapTarget, Mapper};

/// `"IMMU"` read as a little-endian u32.
pub const TABLE_MAGIC: u32 = 0x554d_4d49;
/// The layout this module speaks.
pub const TABLE_VERSION: u32 = 1;
/// Smallest granule: 4 KiB.
pub const MIN_GRANULE_SHIFT: u32 = 12;
/// Largest granule: 2 MiB.
pub const MAX_GRANULE_SHIFT: u32 = 21;
/// Most device worker threads (generation counters in the header).
pub const MAX_WORKERS: u32 = 16;
/// Most entries: 2^28 (a 1 GiB table, 1 TiB of IOVA at 4 KiB granules).
pub const MAX_ENTRIES: u64 = 1 << 28;
/// Entry bit: mapped readable.
pub const ENTRY_READ: u32 = 1;
/// Entry bit: mapped writable.
pub const ENTRY_WRITE: u32 = 2;
/// How long unmap waits for a worker inside an access, unless set otherwise. An access copies
/// at most a granule, microseconds; a worker still inside after this is stuck or hostile.
pub const DEFAULT_UNMAP_TIMEOUT: Duration = Duration::from_millis(100);

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_GRANULE_SHIFT: usize = 8;
const OFF_WORKERS: usize = 12;
const OFF_IOVA_BASE: usize = 16;
const OFF_ENTRIES: usize = 24;
const OFF_GEN: usize = 64;
const GEN_STRIDE: usize = 64;
const OFF_ENTRY: usize = 1088;
const _: () = assert!(OFF_GEN + GEN_STRIDE * MAX_WORKERS as usize == OFF_ENTRY);

/// Why a table could not be created or opened.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// A granule shift outside 12..=21.
    #[error("granule shift {0} is outside 12..=21")]
    GranuleShift(u32),
    /// A worker count outside 1..=16.
    #[error("worker count {0} is outside 1..=16")]
    Workers(u32),
    /// An entry count outside 1..=2^28.
    #[error("entry count {0} is outside 1..=2^28")]
    Entries(u64),
    /// An IOVA base not aligned to the granule, or a range past 2^64.
    #[error("IOVA base {0:#x} is unaligned or the range overflows")]
    IovaBase(u64),
    /// The header does not start with the table magic.
    #[error("table magic is {0:#x}, not {TABLE_MAGIC:#x}")]
    Magic(u32),
    /// A layout version other than 1.
    #[error("table layout version {0}, this side speaks {TABLE_VERSION}")]
    Version(u32),
    /// The memfd's size does not match the layout its header describes.
    #[error("table memfd is {actual} bytes, its header implies {expected}")]
    Size {
        /// The memfd's size.
        actual: u64,
        /// The size the header implies.
        expected: u64,
    },
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },
}

impl TableError {
    fn io(op: &'static str) -> impl FnOnce(io::Error) -> TableError {
        move |source| TableError::Io { op, source }
    }
}

/// The shape of a table, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableGeometry {
    granule_shift: u32,
    workers: u32,
    iova_base: Iova,
    entries: u64,
}

impl TableGeometry {
    /// Validates a table's shape.
    pub fn new(
        granule_shift: u32,
        workers: u32,
        iova_base: Iova,
        entries: u64,
    ) -> Result<TableGeometry, TableError> {
        if !(MIN_GRANULE_SHIFT..=MAX_GRANULE_SHIFT).contains(&granule_shift) {
            return Err(TableError::GranuleShift(granule_shift));
        }
        if !(1..=MAX_WORKERS).contains(&workers) {
            return Err(TableError::Workers(workers));
        }
        if !(1..=MAX_ENTRIES).contains(&entries) {
            return Err(TableError::Entries(entries));
        }
        let aligned = iova_base.0 & ((1u64 << granule_shift) - 1) == 0;
        let fits = (entries << granule_shift)
            .checked_add(iova_base.0)
            .is_some();
        if !aligned || !fits {
            return Err(TableError::IovaBase(iova_base.0));
        }
        Ok(TableGeometry {
            granule_shift,
            workers,
            iova_base,
            entries,
        })
    }

    /// Bytes per granule.
    pub fn granule(&self) -> u64 {
        1 << self.granule_shift
    }

    /// Device worker threads.
    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// First translated IOVA.
    pub fn iova_base(&self) -> Iova {
        self.iova_base
    }

    /// Granules translated.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Bytes of the memfd: header, counters, entries, rounded up to 4 KiB.
    pub fn size(&self) -> u64 {
        shm::page_round_up(OFF_ENTRY as u64 + 4 * self.entries)
    }

    /// The entry index of the granule holding `iova`, if translated.
    fn index(&self, iova: Iova) -> Option<u64> {
        let idx = iova.0.checked_sub(self.iova_base.0)? >> self.granule_shift;
        (idx < self.entries).then_some(idx)
    }
}

/// The table memfd and its validated geometry, mapped.
#[derive(Debug)]
struct Table {
    map: SharedMapping,
    geo: TableGeometry,
}

impl Table {
    /// Opens a table memfd from the other side: seals it against shrinking, checks header and
    /// size, maps it. The header is read once, here.
    fn open(fd: &OwnedFd) -> Result<Table, TableError> {
        shm::seal_against_shrink(fd.as_fd()).map_err(TableError::io(
            "sealing the table memfd against shrinking (is it a memfd?)",
        ))?;
        let actual =
            shm::file_size(fd.as_fd()).map_err(TableError::io("fstat of the table memfd"))?;
        let mut header = [0u8; 32];
        let n = nix::sys::uio::pread(fd, &mut header, 0).map_err(|e| TableError::Io {
            op: "reading the table header",
            source: e.into(),
        })?;
        if n < header.len() {
            return Err(TableError::Size {
                actual,
                expected: 4096,
            });
        }
        let u32_at = |at: usize| {
            u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
        };
        let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
        if u32_at(OFF_MAGIC) != TABLE_MAGIC {
            return Err(TableError::Magic(u32_at(OFF_MAGIC)));
        }
        if u32_at(OFF_VERSION) != TABLE_VERSION {
            return Err(TableError::Version(u32_at(OFF_VERSION)));
        }
        let geo = TableGeometry::new(
            u32_at(OFF_GRANULE_SHIFT),
            u32_at(OFF_WORKERS),
            Iova(u64_at(OFF_IOVA_BASE)),
            u64_at(OFF_ENTRIES),
        )?;
        if actual != geo.size() {
            return Err(TableError::Size {
                actual,
                expected: geo.size(),
            });
        }
        // At most ~1 GiB (MAX_ENTRIES), which fits usize on the 64-bit hosts faultd runs on.
        let map = SharedMapping::map(fd.as_fd(), geo.size() as usize)
            .map_err(TableError::io("mapping the table memfd"))?;
        Ok(Table { map, geo })
    }

    fn entry(&self, idx: u64) -> &AtomicU32 {
        self.map.u32_at(OFF_ENTRY + 4 * idx as usize)
    }

    fn gen(&self, worker: u32) -> &AtomicU64 {
        self.map.u64_at(OFF_GEN + GEN_STRIDE * worker as usize)
    }

    /// The entry of the granule `[iova, iova+len)`, checked to be exactly one in the table.
    fn granule_entry(&self, iova: Iova, len: u64) -> Result<&AtomicU32, MapError> {
        check_granule(iova, len, self.geo.granule())?;
        let idx = self
            .geo
            .index(iova)
            .ok_or(MapError::OutOfRange { iova: iova.0 })?;
        Ok(self.entry(idx))
    }
}

/// Creates table memfds (VMM side).
#[derive(Debug)]
pub struct EmulatedTable;

impl EmulatedTable {
    /// A new table: header written, every entry unmapped, every worker quiescent, sealed
    /// against resizing. Hand it to faultd (`add_device`) and to the device ([`IommuView`]).
    pub fn create(
        granule_shift: u32,
        workers: u32,
        iova_base: Iova,
        entries: u64,
    ) -> Result<OwnedFd, TableError> {
        let geo = TableGeometry::new(granule_shift, workers, iova_base, entries)?;
        let fd = shm::create_memfd("faultd-iopf-iommu", geo.size())
            .map_err(TableError::io("creating the table memfd"))?;
        let mut header = [0u8; 32];
        header[OFF_MAGIC..OFF_MAGIC + 4].copy_from_slice(&TABLE_MAGIC.to_le_bytes());
        header[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&TABLE_VERSION.to_le_bytes());
        header[OFF_GRANULE_SHIFT..OFF_GRANULE_SHIFT + 4]
            .copy_from_slice(&granule_shift.to_le_bytes());
        header[OFF_WORKERS..OFF_WORKERS + 4].copy_from_slice(&workers.to_le_bytes());
        header[OFF_IOVA_BASE..OFF_IOVA_BASE + 8].copy_from_slice(&iova_base.0.to_le_bytes());
        header[OFF_ENTRIES..OFF_ENTRIES + 8].copy_from_slice(&entries.to_le_bytes());
        let n = nix::sys::uio::pwrite(&fd, &header, 0).map_err(|e| TableError::Io {
            op: "writing the table header",
            source: e.into(),
        })?;
        if n != header.len() {
            return Err(TableError::Io {
                op: "writing the table header",
                source: io::ErrorKind::WriteZero.into(),
            });
        }
        Ok(fd)
    }
}

/// faultd's end of the table: a [`Mapper`].
#[derive(Debug)]
pub struct EmulatedIommu {
    table: Table,
    unmap_timeout: Duration,
}

impl EmulatedIommu {
    /// Opens a table from the VMM: checks that it is a sealable memfd whose size and header
    /// match layout v1, seals it against shrinking, maps it.
    pub fn from_fd(fd: OwnedFd) -> Result<EmulatedIommu, TableError> {
        Ok(EmulatedIommu {
            table: Table::open(&fd)?,
            unmap_timeout: DEFAULT_UNMAP_TIMEOUT,
        })
    }

    /// Sets how long unmap waits for workers inside an access.
    pub fn with_unmap_timeout(mut self, timeout: Duration) -> EmulatedIommu {
        self.unmap_timeout = timeout;
        self
    }

    /// The validated geometry.
    pub fn geometry(&self) -> TableGeometry {
        self.table.geo
    }

    /// Unmaps every granule at once and waits for the workers: what an IOMMU driver does when
    /// it takes the device's translations away wholesale (the emulated device's PRI reset
    /// after its fault handler died, whose mappings nobody tracks any more). Returns how many
    /// granules were mapped.
    pub fn unmap_all(&mut self) -> Result<u64, MapError> {
        let mut cleared = 0;
        for idx in 0..self.table.geo.entries() {
            if self.table.entry(idx).swap(0, Ordering::SeqCst) != 0 {
                cleared += 1;
            }
        }
        self.quiesce()?;
        Ok(cleared)
    }

    /// Waits until every worker that was inside an access when sampled has left it.
    fn quiesce(&self) -> Result<(), MapError> {
        let start = Instant::now();
        for worker in 0..self.table.geo.workers {
            let gen = self.table.gen(worker);
            let seen = gen.load(Ordering::SeqCst);
            if seen.is_multiple_of(2) {
                continue;
            }
            // Any change means the access seen has ended. A later access started after this
            // load, so after the entry was cleared: it reads the cleared entry.
            let mut spins = 0u32;
            while gen.load(Ordering::SeqCst) == seen {
                let waited = start.elapsed();
                if waited >= self.unmap_timeout {
                    return Err(MapError::Timeout { worker, waited });
                }
                // An access is a short copy: spin briefly, then give the CPU away.
                if spins < 128 {
                    spins += 1;
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        Ok(())
    }
}

impl Mapper for EmulatedIommu {
    fn granule(&self) -> u64 {
        self.table.geo.granule()
    }

    fn map(
        &mut self,
        iova: Iova,
        len: u64,
        _target: MapTarget<'_>,
        writable: bool,
    ) -> Result<(), MapError> {
        // The device reaches guest RAM through the VMM's own mapping: only the permission
        // is recorded here.
        let entry = self.table.granule_entry(iova, len)?;
        let bits = ENTRY_READ | if writable { ENTRY_WRITE } else { 0 };
        entry
            .compare_exchange(0, bits, Ordering::SeqCst, Ordering::SeqCst)
            .map(drop)
            .map_err(|_| MapError::Exists)
    }

    fn unmap(&mut self, iova: Iova, len: u64) -> Result<(), MapError> {
        let entry = self.table.granule_entry(iova, len)?;
        if entry.swap(0, Ordering::SeqCst) == 0 {
            return Err(MapError::NotMapped);
        }
        self.quiesce()
    }
}

/// Why a device worker handle was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    /// The table has fewer workers.
    #[error("worker {index} does not exist, the table has {workers}")]
    OutOfRange {
        /// The index asked for.
        index: u32,
        /// Workers in the table.
        workers: u32,
    },
    /// Another handle for this worker is alive in this process.
    #[error("worker {0} is already taken")]
    Taken(u32),
}

#[derive(Debug)]
struct ViewInner {
    table: Table,
    /// Bit w set while a [`Worker`] for index w exists.
    taken: AtomicU32,
}

/// The device's end of the table (VMM side). Hands out one [`Worker`] per DMA engine thread.
#[derive(Clone, Debug)]
pub struct IommuView {
    inner: Arc<ViewInner>,
}

impl IommuView {
    /// Opens a table, validated as faultd does.
    pub fn from_fd(fd: OwnedFd) -> Result<IommuView, TableError> {
        Ok(IommuView {
            inner: Arc::new(ViewInner {
                table: Table::open(&fd)?,
                taken: AtomicU32::new(0),
            }),
        })
    }

    /// The validated geometry.
    pub fn geometry(&self) -> TableGeometry {
        self.inner.table.geo
    }

    /// Takes worker `index`'s generation counter. One handle per index may exist at a time:
    /// two threads sharing a counter would break its odd/even meaning.
    pub fn worker(&self, index: u32) -> Result<Worker, WorkerError> {
        let workers = self.inner.table.geo.workers;
        if index >= workers {
            return Err(WorkerError::OutOfRange { index, workers });
        }
        let bit = 1 << index;
        if self.inner.taken.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            return Err(WorkerError::Taken(index));
        }
        // A previous holder (an earlier device process) may have died inside an access: make
        // the counter even again, or the next access would read as quiescent.
        let gen = self.inner.table.gen(index);
        if !gen.load(Ordering::SeqCst).is_multiple_of(2) {
            gen.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Worker {
            inner: Arc::clone(&self.inner),
            index,
        })
    }
}

/// One device worker thread's right to access guest RAM through the table.
#[derive(Debug)]
pub struct Worker {
    inner: Arc<ViewInner>,
    index: u32,
}

impl Worker {
    /// This worker's index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Enters an access (generation odd). Translate, and while the guard lives perform the
    /// access. Drop it (or [`Access::end`]) when done or when a translation missed, before
    /// raising the page request: unmap waits for it.
    pub fn begin_access(&mut self) -> Access<'_> {
        self.inner
            .table
            .gen(self.index)
            .fetch_add(1, Ordering::SeqCst);
        Access { worker: self }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.inner
            .taken
            .fetch_and(!(1 << self.index), Ordering::AcqRel);
    }
}

/// A worker inside an access: translations read now stay valid until this guard drops.
#[derive(Debug)]
pub struct Access<'w> {
    worker: &'w mut Worker,
}

impl Access<'_> {
    /// Whether `iova` is mapped with the permission the access needs (write, or read).
    pub fn translate(&self, iova: Iova, write: bool) -> bool {
        let table = &self.worker.inner.table;
        let Some(idx) = table.geo.index(iova) else {
            return false;
        };
        let needed = if write { ENTRY_WRITE } else { ENTRY_READ };
        table.entry(idx).load(Ordering::SeqCst) & needed != 0
    }

    /// Ends the access (the same as dropping the guard).
    pub fn end(self) {}
}

impl Drop for Access<'_> {
    fn drop(&mut self) {
        self.worker
            .inner
            .table
            .gen(self.worker.index)
            .fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::sync::mpsc;

    use super::*;

    const G: u64 = 0x1_0000;
    const BASE: u64 = 0x4000_0000;

    fn setup(workers: u32) -> (EmulatedIommu, IommuView, OwnedFd) {
        let fd = EmulatedTable::create(16, workers, Iova(BASE), 64).unwrap();
        let iommu = EmulatedIommu::from_fd(fd.try_clone().unwrap()).unwrap();
        let view = IommuView::from_fd(fd.try_clone().unwrap()).unwrap();
        (iommu, view, fd)
    }

    fn target(fd: &OwnedFd) -> MapTarget<'_> {
        MapTarget {
            va: 0,
            fd: fd.as_fd(),
            offset: 0,
        }
    }

    #[test]
    fn mapped_granule_translates_with_its_permission_until_unmapped() {
        let (mut iommu, view, fd) = setup(1);
        let mut w = view.worker(0).unwrap();

        iommu.map(Iova(BASE + G), G, target(&fd), false).unwrap();
        let (read, write, neighbour) = {
            let a = w.begin_access();
            (
                a.translate(Iova(BASE + G + 0x123), false),
                a.translate(Iova(BASE + G), true),
                a.translate(Iova(BASE + 2 * G), false),
            )
        };
        iommu.unmap(Iova(BASE + G), G).unwrap();
        let after = w.begin_access().translate(Iova(BASE + G), false);

        assert_eq!(iommu.granule(), G);
        assert!(read);
        assert!(!write);
        assert!(!neighbour);
        assert!(!after);
    }

    #[test]
    fn writable_mapping_allows_writes() {
        let (mut iommu, view, fd) = setup(1);
        let mut w = view.worker(0).unwrap();

        iommu.map(Iova(BASE), G, target(&fd), true).unwrap();

        assert!(w.begin_access().translate(Iova(BASE + 8), true));
    }

    #[test]
    fn mapping_a_mapped_granule_reports_exists() {
        let (mut iommu, _view, fd) = setup(1);
        iommu.map(Iova(BASE), G, target(&fd), false).unwrap();

        let again = iommu.map(Iova(BASE), G, target(&fd), true);

        assert!(matches!(again, Err(MapError::Exists)));
    }

    #[test]
    fn unmap_all_clears_every_mapping_and_counts_them() {
        let (mut iommu, view, fd) = setup(1);
        let mut w = view.worker(0).unwrap();
        for g in [0, 5, 63] {
            iommu.map(Iova(BASE + g * G), G, target(&fd), true).unwrap();
        }

        assert_eq!(iommu.unmap_all().unwrap(), 3);
        let a = w.begin_access();
        assert!([0, 5, 63]
            .iter()
            .all(|g| !a.translate(Iova(BASE + g * G), false)));
        drop(a);
        // Mapping again works: the table is empty, not broken.
        iommu.map(Iova(BASE), G, target(&fd), false).unwrap();
        assert_eq!(iommu.unmap_all().unwrap(), 1);
    }

    #[test]
    fn unmapping_an_unmapped_granule_reports_not_mapped() {
        let (mut iommu, _view, _fd) = setup(1);

        assert!(matches!(
            iommu.unmap(Iova(BASE), G),
            Err(MapError::NotMapped)
        ));
    }

    #[test]
    fn ranges_that_are_not_one_granule_in_the_table_are_refused() {
        let (mut iommu, _view, fd) = setup(1);

        let short = iommu.map(Iova(BASE), G / 2, target(&fd), false);
        let unaligned = iommu.map(Iova(BASE + 0x1000), G, target(&fd), false);
        let below = iommu.map(Iova(BASE - G), G, target(&fd), false);
        let above = iommu.map(Iova(BASE + 64 * G), G, target(&fd), false);

        assert!(matches!(short, Err(MapError::NotAGranule { .. })));
        assert!(matches!(unaligned, Err(MapError::NotAGranule { .. })));
        assert!(matches!(below, Err(MapError::OutOfRange { .. })));
        assert!(matches!(above, Err(MapError::OutOfRange { .. })));
    }

    #[test]
    fn unmap_waits_for_a_worker_inside_an_access_and_returns_when_it_ends() {
        let (mut iommu, view, fd) = setup(2);
        iommu.map(Iova(BASE), G, target(&fd), true).unwrap();
        let mut busy = view.worker(0).unwrap();
        let mut probe = view.worker(1).unwrap();
        let access = busy.begin_access();
        assert!(access.translate(Iova(BASE), true));
        let (done_tx, done_rx) = mpsc::channel();
        let unmapper = std::thread::spawn(move || {
            let mut iommu = iommu.with_unmap_timeout(Duration::from_secs(30));
            let res = iommu.unmap(Iova(BASE), G);
            done_tx.send(()).unwrap();
            res
        });
        // Wait until the unmapper has cleared the entry: from then on it is in its wait.
        while probe.begin_access().translate(Iova(BASE), false) {
            std::thread::yield_now();
        }

        let returned_while_inside = done_rx.recv_timeout(Duration::from_millis(50)).is_ok();
        access.end();
        let result = unmapper.join().unwrap();

        assert!(!returned_while_inside);
        assert!(result.is_ok());
    }

    #[test]
    fn unmap_times_out_if_an_access_never_ends() {
        let (iommu, view, fd) = setup(1);
        let mut iommu = iommu.with_unmap_timeout(Duration::from_millis(20));
        iommu.map(Iova(BASE), G, target(&fd), false).unwrap();
        let mut w = view.worker(0).unwrap();
        let access = w.begin_access();

        let res = iommu.unmap(Iova(BASE), G);

        assert!(matches!(res, Err(MapError::Timeout { worker: 0, .. })));
        assert!(!access.translate(Iova(BASE), false));
    }

    #[test]
    fn a_worker_index_can_be_held_once_and_must_exist() {
        let (_iommu, view, _fd) = setup(2);
        let first = view.worker(1).unwrap();

        let twice = view.worker(1);
        drop(first);
        let again = view.worker(1);
        let missing = view.worker(2);

        assert_eq!(twice.unwrap_err(), WorkerError::Taken(1));
        assert!(again.is_ok());
        assert_eq!(
            missing.unwrap_err(),
            WorkerError::OutOfRange {
                index: 2,
                workers: 2
            }
        );
    }

    #[test]
    fn a_worker_that_died_inside_an_access_is_made_quiescent_by_the_next_holder() {
        let (mut iommu, view, fd) = setup(1);
        iommu = iommu.with_unmap_timeout(Duration::from_millis(20));
        iommu.map(Iova(BASE), G, target(&fd), false).unwrap();
        let mut w = view.worker(0).unwrap();
        std::mem::forget(w.begin_access());
        drop(w);

        let _next = view.worker(0).unwrap();

        assert!(iommu.unmap(Iova(BASE), G).is_ok());
    }

    fn patched(offset: u64, bytes: &[u8]) -> OwnedFd {
        let fd = EmulatedTable::create(12, 1, Iova(0), 16).unwrap();
        nix::sys::uio::pwrite(&fd, bytes, offset as i64).unwrap();
        fd
    }

    #[test]
    fn from_fd_rejects_bad_magic_version_and_geometry() {
        let magic = EmulatedIommu::from_fd(patched(0, &7u32.to_le_bytes()));
        let version = EmulatedIommu::from_fd(patched(4, &2u32.to_le_bytes()));
        let shift = EmulatedIommu::from_fd(patched(8, &22u32.to_le_bytes()));
        let workers = EmulatedIommu::from_fd(patched(12, &17u32.to_le_bytes()));
        let base = EmulatedIommu::from_fd(patched(16, &0x800u64.to_le_bytes()));
        let entries = EmulatedIommu::from_fd(patched(24, &0u64.to_le_bytes()));
        let size = EmulatedIommu::from_fd(patched(24, &4096u64.to_le_bytes()));

        assert!(matches!(magic, Err(TableError::Magic(7))));
        assert!(matches!(version, Err(TableError::Version(2))));
        assert!(matches!(shift, Err(TableError::GranuleShift(22))));
        assert!(matches!(workers, Err(TableError::Workers(17))));
        assert!(matches!(base, Err(TableError::IovaBase(0x800))));
        assert!(matches!(entries, Err(TableError::Entries(0))));
        assert!(matches!(size, Err(TableError::Size { actual: 4096, .. })));
    }

    #[test]
    fn from_fd_rejects_a_regular_file() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();

        assert!(matches!(
            EmulatedIommu::from_fd(file.into()),
            Err(TableError::Io { .. })
        ));
    }

    #[test]
    fn create_rejects_an_iova_range_past_the_end_of_the_address_space() {
        let res = EmulatedTable::create(21, 1, Iova(u64::MAX - (1 << 21) + 1), 2);

        assert!(matches!(res, Err(TableError::IovaBase(_))));
    }
}

//! A session: one VMM's registered guest, its stage-2 state and its counters.
//!
//! The session owns the fds the VMM handed over and the one [`s2map::S2Map`] that every fault
//! source of this VM (the vCPU fault thread now, device fault queues later) asks before it
//! installs a page. Fault service itself lives in [`crate::kernel::uffd`].

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use faultd_proto::{DeviceStats, LatencySummary, SessionStats};
use hdrhistogram::Histogram;
use s2map::{Gpa, Granule, Layout, PageRef, S2Map};

use crate::kernel::remote::{PageStatus, RemoteMm};
use crate::kernel::uffd::MappedSource;

pub use crate::kernel::Hva;

/// Where one layout region lives in the VMM.
#[derive(Debug)]
pub struct ServedRegion {
    /// Start of the VMM's mapping of the region.
    pub hva: Hva,
    /// What the mapping is.
    pub memory: RegionMemory,
}

/// What a region's memory is in the VMM, which decides what faultd can do with it besides
/// serving its userfaults.
#[derive(Debug)]
pub enum RegionMemory {
    /// A memfd or hugetlbfs file the VMM maps shared (a `register`ed VMM). faultd can map it
    /// itself, so devices can be attached.
    Shared {
        /// The guest RAM fd (shared by regions carved from one memfd).
        fd: Arc<OwnedFd>,
        /// Offset of the region in `fd`.
        offset: u64,
    },
    /// Anonymous private memory of the VMM (Firecracker's guest RAM). There is no fd: only the
    /// VMM's userfaultfd reaches it, so faultd serves its faults but cannot map it for a
    /// device.
    AnonymousPrivate,
}

/// A shared mapping that faultd hands only to the kernel and never dereferences itself. Two
/// uses, one reason each not to touch it:
/// - [`FaultdView`], a region's memfd mapped read-write, for the IOMMU to pin pages through
///   (IOMMU_IOAS_MAP takes a user address in faultd's address space). Touching an absent page
///   through this unregistered mapping would silently allocate a zero page in the memfd, hiding
///   the page from the guest's userfaultfd (the guest would then read zeros instead of its
///   data). Only granules s2map says are resident are ever handed to the IOMMU.
/// - [`SnapshotView`], a snapshot file mapped read-only: the source of UFFDIO_COPY for
///   snapshot-backed pages, so a fill is one copy (by the kernel, from the page cache) instead
///   of a pread(2) into a buffer and a copy from there. If the file shrank after it was mapped,
///   reading past its new end would kill faultd with SIGBUS; the kernel's copy from it instead
///   fails with EFAULT, which costs that one fault. Only ranges within the length the file had
///   when it was mapped are handed out ([`Session::mapped_snapshot`]).
///
/// Mapping reads, reserves and touches nothing: one mmap(2).
#[derive(Debug)]
pub struct KernelOnlyMapping {
    addr: std::ptr::NonNull<std::ffi::c_void>,
    len: u64,
}

/// A region's memfd as faultd maps it for the IOMMU (see [`KernelOnlyMapping`]).
pub type FaultdView = KernelOnlyMapping;
/// A snapshot file as faultd maps it to copy from (see [`KernelOnlyMapping`]).
pub type SnapshotView = KernelOnlyMapping;

// SAFETY: the mapping is an address range faultd never dereferences; it is only passed to the
// kernel, which may be done from any thread.
unsafe impl Send for KernelOnlyMapping {}
// SAFETY: as above: shared references only read the address.
unsafe impl Sync for KernelOnlyMapping {}

impl KernelOnlyMapping {
    /// Maps `len` bytes of `fd` at `offset`, shared, read-write if `writable`.
    fn map(fd: BorrowedFd<'_>, offset: u64, len: u64, writable: bool) -> std::io::Result<Self> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let n = usize::try_from(len)
            .ok()
            .and_then(std::num::NonZeroUsize::new)
            .ok_or_else(|| std::io::Error::other("nothing to map: empty or too large"))?;
        let offset = i64::try_from(offset).map_err(std::io::Error::other)?;
        let prot = if writable {
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE
        } else {
            ProtFlags::PROT_READ
        };
        // SAFETY: a fresh mapping at a kernel-chosen address (no MAP_FIXED) cannot alias any
        // Rust object; it is unmapped only in Drop, and nothing ever dereferences it.
        let addr = unsafe {
            mmap(
                None,
                n,
                prot,
                MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
                fd,
                offset,
            )
        }?;
        Ok(KernelOnlyMapping { addr, len })
    }

    /// A region's memfd, `len` bytes at `offset`, read-write ([`FaultdView`]).
    pub fn memfd(fd: &OwnedFd, offset: u64, len: u64) -> std::io::Result<FaultdView> {
        Self::map(fd.as_fd(), offset, len, true)
    }

    /// All of a snapshot file, read-only ([`SnapshotView`]).
    pub fn snapshot(file: &File) -> std::io::Result<SnapshotView> {
        Self::map(file.as_fd(), 0, file.metadata()?.len(), false)
    }

    /// The address of byte `off` of the mapping.
    pub fn addr(&self, off: u64) -> u64 {
        self.addr.as_ptr() as u64 + off
    }

    /// Bytes mapped (never zero: an empty mapping is refused).
    pub fn bytes(&self) -> u64 {
        self.len
    }
}

impl Drop for KernelOnlyMapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`, never dereferenced.
        let _ = unsafe { nix::sys::mman::munmap(self.addr, self.len as usize) };
    }
}

/// A session's snapshot file, with faultd's mapping of it where one could be made.
#[derive(Debug)]
struct Snapshot {
    file: File,
    /// None if the file could not be mapped (empty, or a file system without mmap): fills
    /// then read it with pread(2).
    view: Option<SnapshotView>,
}

/// What waits on an in-flight resolution besides uffd-blocked threads (which the kernel wakes
/// by itself when the page is installed). Device page-request groups join here in a later step.
pub type Waiter = ();

/// A page located from a faulting VMM address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Located {
    /// The page in s2map terms.
    pub page: PageRef,
    /// The page's first byte in the VMM.
    pub hva: Hva,
    /// Page size in bytes.
    pub size: u64,
}

/// Event counters, updated by the fault thread and read by the control plane.
#[derive(Debug, Default)]
pub struct Counters {
    /// vCPU faults read.
    pub vcpu_faults: AtomicU64,
    /// Faults resolved by zero fill.
    pub zero_fills: AtomicU64,
    /// Faults resolved from the snapshot.
    pub file_fills: AtomicU64,
    /// Faults resolved from the swap store.
    pub store_fills: AtomicU64,
    /// Pages evicted.
    pub evictions: AtomicU64,
    /// Bytes of those pages (a 2 MiB page counts one eviction and 2 MiB).
    pub evicted_bytes: AtomicU64,
    /// ... of which to keep within a budget.
    pub budget_evictions: AtomicU64,
    /// Faults on pages found present.
    pub already_present: AtomicU64,
    /// EAGAIN retries.
    pub retries: AtomicU64,
    /// Pages discarded by the VMM.
    pub discarded_pages: AtomicU64,
    /// Bytes of those pages.
    pub discarded_bytes: AtomicU64,
    /// Faults that could not be served.
    pub errors: AtomicU64,
    /// Devices attached.
    pub devices: AtomicU64,
    /// Device page-request groups read.
    pub device_groups: AtomicU64,
    /// Page requests in those groups.
    pub device_pages: AtomicU64,
    /// Groups answered SUCCESS.
    pub device_success: AtomicU64,
    /// Groups answered INVALID.
    pub device_invalid: AtomicU64,
    /// ... for an address outside the layout.
    pub device_outside: AtomicU64,
    /// ... for a write into a read-only region.
    pub device_read_only: AtomicU64,
    /// Malformed records/groups.
    pub device_malformed: AtomicU64,
    /// ... past the deadline.
    pub device_deadline: AtomicU64,
    /// ... because a page could not be installed or mapped.
    pub device_failed: AtomicU64,
    /// Granules unmapped at the pin limit.
    pub device_pin_evictions: AtomicU64,
    /// Responses the transport refused.
    pub device_respond_errors: AtomicU64,
    /// Devices no longer served because their VMM made faultd's notification block.
    pub device_quarantined: AtomicU64,
    /// Groups dropped unanswered: a newer group came with their cookie (the cookie guard).
    pub device_stale_cookies: AtomicU64,
    /// Fault-around (engine/around.rs, docs/fault-around.md): look-ahead rounds after vCPU
    /// faults.
    pub around_vcpu_rounds: AtomicU64,
    /// ... pages they installed.
    pub around_vcpu_pages: AtomicU64,
    /// ... look-ahead rounds after device groups.
    pub around_device_rounds: AtomicU64,
    /// ... granules they mapped.
    pub around_device_granules: AtomicU64,
    /// ... look-aheads cut short.
    pub around_stopped: AtomicU64,
    /// Snapshot pages served as zero pages (all zero in the file: no copy from it).
    pub snapshot_zero_pages: AtomicU64,
    /// Working-set recording and replay (see `engine::working_set`).
    pub ws: crate::engine::ws_stats::WsCounters,
}

impl Counters {
    /// Adds one to `c` (relaxed: counters order nothing).
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lets the daemon's watchdog interrupt the session thread when a call that the VMM can make
/// block stays blocked: writing a device's notify eventfd blocks forever if the VMM cleared
/// O_NONBLOCK on it (the flag is in the file description it shares) and saturated its counter.
/// The thread marks such calls; the watchdog sends it [`WATCHDOG_SIGNAL`] (a no-op handler
/// without SA_RESTART) when one lasts too long, and the call fails with EINTR.
///
/// It also carries the thread's heartbeat for the service manager's watchdog
/// ([`crate::ops::systemd::Liveness`]): which service pass the thread is in and whether it is busy
/// in it or asleep waiting for work.
#[derive(Debug, Default)]
pub struct Watch {
    /// Kernel thread id of the session thread (0 until it starts).
    tid: AtomicU64,
    /// When the current guarded call began, ns since [`epoch`]; 0 when not in one.
    since: AtomicU64,
    /// `passes << 2 | state`: one store per pass, read by the watchdog.
    beat: AtomicU64,
    /// A duplicate of the session's userfaultfd, to see whether faults are waiting.
    source: std::sync::OnceLock<OwnedFd>,
}

pub use crate::ops::systemd::{Beat, ThreadState};

/// The signal the watchdog interrupts a stuck session thread with.
pub const WATCHDOG_SIGNAL: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGURG;

fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn now_ns() -> u64 {
    // +1 so that a call starting at the epoch is not read as "not in a call".
    epoch().elapsed().as_nanos() as u64 + 1
}

impl Watch {
    /// Records the calling thread as the session thread.
    pub fn register_current_thread(&self) {
        self.tid
            .store(nix::unistd::gettid().as_raw() as u64, Ordering::Release);
    }

    /// Marks the start of a guarded call.
    pub fn enter(&self) {
        self.since.store(now_ns(), Ordering::Release);
    }

    /// Marks its end.
    pub fn exit(&self) {
        self.since.store(0, Ordering::Release);
    }

    /// Records the start of service pass `passes` (a plain store: the thread loops on this).
    #[inline]
    pub fn busy(&self, passes: u64) {
        self.beat.store(passes << 2, Ordering::Relaxed);
    }

    /// Records that the thread is about to sleep after pass `passes`.
    pub fn idle(&self, passes: u64) {
        self.beat.store(passes << 2 | 1, Ordering::Relaxed);
    }

    /// Records that the thread has ended.
    pub fn exited(&self) {
        self.beat.fetch_or(2, Ordering::Relaxed);
    }

    /// The thread's heartbeat now.
    pub fn beat(&self) -> Beat {
        let b = self.beat.load(Ordering::Relaxed);
        let state = match b & 3 {
            0 => ThreadState::Busy,
            1 => ThreadState::Idle,
            _ => ThreadState::Exited,
        };
        Beat {
            passes: b >> 2,
            state,
        }
    }

    /// Keeps `fd`, a duplicate of the session's userfaultfd, for [`Watch::source_ready`].
    pub fn set_source(&self, fd: OwnedFd) {
        let _ = self.source.set(fd);
    }

    /// Whether the session's userfaultfd has events waiting (polled without blocking; nothing
    /// is read). False when no source was set.
    pub fn source_ready(&self) -> bool {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Some(fd) = self.source.get() else {
            return false;
        };
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
            && fds[0]
                .revents()
                .is_some_and(|r| r.contains(PollFlags::POLLIN))
    }

    /// Interrupts the session thread if it has been in a guarded call for longer than
    /// `limit`, counting only from `ran_since`: time before it, when faultd itself was not
    /// running (stopped, frozen, starved), is no evidence against the VMM. Returns whether it
    /// did.
    pub fn interrupt_if_stuck(
        &self,
        limit: std::time::Duration,
        ran_since: std::time::Instant,
    ) -> bool {
        let ran_since = ran_since.saturating_duration_since(epoch()).as_nanos() as u64 + 1;
        let since = match self.since.load(Ordering::Acquire) {
            0 => return false, // not in a guarded call
            s => s.max(ran_since),
        };
        let tid = self.tid.load(Ordering::Acquire);
        if since == 0 || tid == 0 || now_ns().saturating_sub(since) < limit.as_nanos() as u64 {
            return false;
        }
        // tgkill by kernel tid: if the thread has just left the call, or even exited, the
        // worst case is one spurious EINTR in a faultd thread, which every caller handles.
        // (nix has no tgkill, and its pthread_kill needs a pthread_t that must still be live.)
        // SAFETY: tgkill only sends a signal; a handler for it is installed (no-op).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                tid as libc::pid_t,
                WATCHDOG_SIGNAL as libc::c_int,
            )
        };
        rc == 0
    }
}

/// One registered VM.
#[derive(Debug)]
pub struct Session {
    id: u64,
    vm: String,
    /// The uid of the peer that created the session (SO_PEERCRED): the VM and its store are
    /// its (0, the operator's, unless set).
    owner: u32,
    map: Mutex<S2Map<Waiter>>,
    /// A copy of the (immutable) layout, so locating a fault takes no lock.
    layout: Layout,
    regions: Vec<ServedRegion>,
    /// Region indexes sorted by HVA, for locating a faulting address.
    by_hva: Vec<usize>,
    snapshot: Option<Snapshot>,
    /// faultd's views of the regions' memory, made when the first device is attached.
    views: std::sync::OnceLock<Vec<FaultdView>>,
    /// Counters.
    pub counters: Counters,
    /// Watchdog hook of the session thread.
    pub watch: Watch,
    latency: Mutex<Histogram<u64>>,
    device_latency: Mutex<Histogram<u64>>,
    /// dev_ids attached now, with their s2map device index.
    pub(crate) device_ids: Mutex<Vec<(u32, s2map::DeviceIdx)>>,
    /// The VMM's memory as reached from outside, for anonymous regions (set once the peer is
    /// known; see [`crate::kernel::remote`]).
    remote: std::sync::OnceLock<RemoteMm>,
    /// The snapshot file's analysis, shared with the other sessions of that file (set once,
    /// at the start; see [`crate::engine::snapshots`]).
    snapshot_info: std::sync::OnceLock<Arc<crate::engine::snapshots::SnapshotInfo>>,
    /// Why the session failed (its snapshot object could not be read), once it has.
    failure: std::sync::OnceLock<String>,
    /// The snapshot object's version, when the snapshot is an object (set once, at the start).
    object: std::sync::OnceLock<Arc<objstore::ObjectVersion>>,
    /// Notified once when `failure` is set: the control connection tells the VMM.
    pub failed: tokio::sync::Notify,
}

impl Session {
    /// What a metrics scrape reads of this session: its counters and gauges, as plain numbers.
    pub fn sample(&self) -> crate::ops::metrics::Sample {
        self.read().sample()
    }

    /// [`Session::stats`] and [`Session::sample`] from one read, so the two agree (for the
    /// end of a session: its final counters retire into the metrics and are logged).
    pub fn stats_and_sample(&self) -> (SessionStats, crate::ops::metrics::Sample) {
        let reading = self.read();
        let sample = reading.sample();
        (self.with_latency(reading.stats), sample)
    }

    /// Builds a session from a validated registration (regions in layout order).
    pub fn new(
        id: u64,
        vm: String,
        layout: Layout,
        regions: Vec<ServedRegion>,
        snapshot: Option<File>,
    ) -> Session {
        let mut by_hva: Vec<usize> = (0..regions.len()).collect();
        by_hva.sort_unstable_by_key(|&i| regions[i].hva);
        let snapshot = snapshot.map(|file| {
            let view = SnapshotView::snapshot(&file)
                .inspect_err(|e| {
                    tracing::debug!(session = id, "snapshot not mapped, read with pread: {e}")
                })
                .ok();
            Snapshot { file, view }
        });
        Session {
            id,
            vm,
            owner: 0,
            map: Mutex::new(S2Map::new(layout.clone())),
            layout,
            regions,
            by_hva,
            snapshot,
            views: std::sync::OnceLock::new(),
            counters: Counters::default(),
            watch: Watch::default(),
            latency: Mutex::new(histogram()),
            device_latency: Mutex::new(histogram()),
            device_ids: Mutex::new(Vec::new()),
            remote: std::sync::OnceLock::new(),
            snapshot_info: std::sync::OnceLock::new(),
            failure: std::sync::OnceLock::new(),
            object: std::sync::OnceLock::new(),
            failed: tokio::sync::Notify::new(),
        }
    }

    /// Fails the session for `why` (the first reason is kept): its control connection tells
    /// the VMM and ends it.
    pub fn fail(&self, why: String) {
        if self.failure.set(why).is_ok() {
            self.failed.notify_one();
        }
    }

    /// Why the session failed, if it has.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Records that the session's snapshot is `version` of an object (once; a second call is
    /// ignored).
    pub fn set_object(&self, version: Arc<objstore::ObjectVersion>) {
        let _ = self.object.set(version);
    }

    /// The snapshot object's version, if the snapshot is an object.
    pub fn object(&self) -> Option<&Arc<objstore::ObjectVersion>> {
        self.object.get()
    }

    /// Gives the session its snapshot file's analysis (once; a second call is ignored).
    pub fn set_snapshot_info(&self, info: Arc<crate::engine::snapshots::SnapshotInfo>) {
        let _ = self.snapshot_info.set(info);
    }

    /// The snapshot file's analysis, if the session has one (ready or not).
    pub fn snapshot_info(&self) -> Option<&Arc<crate::engine::snapshots::SnapshotInfo>> {
        self.snapshot_info.get()
    }

    /// Whether the snapshot's bytes `[offset, offset + len)` are known to be all zero.
    pub fn snapshot_is_zero(&self, offset: u64, len: u64) -> bool {
        self.snapshot_info
            .get()
            .is_some_and(|i| i.is_zero(offset, len))
    }

    /// Whether `fill` of a page of `size` bytes is served as a zero page: a snapshot page the
    /// session's analysis knows to be all zero.
    pub(crate) fn serves_as_zero(&self, fill: s2map::Fill, size: u64) -> bool {
        matches!(fill, s2map::Fill::File { offset } if self.snapshot_is_zero(offset, size))
    }

    /// The session as owned by `uid` (see [`Session::owner`]).
    pub fn owned_by(mut self, uid: u32) -> Session {
        self.owner = uid;
        self
    }

    /// The uid the VM and its store belong to.
    pub fn owner(&self) -> u32 {
        self.owner
    }

    /// Gives an anonymous-memory session the VMM's memory as reached from outside (once; a
    /// second call is ignored).
    pub fn set_remote(&self, mm: RemoteMm) {
        let _ = self.remote.set(mm);
    }

    /// The VMM's memory as reached from outside, if set.
    pub fn remote(&self) -> Option<&RemoteMm> {
        self.remote.get()
    }

    /// Whether guest RAM is the VMM's anonymous private memory (a Firecracker restore): the
    /// memory that is not mappable (a session's regions are all one or all the other).
    pub fn is_anonymous(&self) -> bool {
        !self.memory_is_mappable()
    }

    /// Each region's pages as the VMM's pagemap has them (None: no [`RemoteMm`]).
    pub fn remote_status(&self) -> Option<std::io::Result<Vec<Vec<PageStatus>>>> {
        let mm = self.remote()?;
        Some(
            self.layout
                .regions()
                .iter()
                .zip(&self.regions)
                .map(|(r, served)| mm.status(served.hva.0, r.page_count(), r.page_size().bytes()))
                .collect(),
        )
    }

    /// Bytes of guest RAM in RAM by the VMM's pagemap (None: no [`RemoteMm`], or it could not
    /// be read).
    pub fn remote_present_bytes(&self) -> Option<u64> {
        Some(self.present_bytes(&self.remote_status()?.ok()?))
    }

    /// Bytes in RAM by `status`, a pagemap reading ([`Session::remote_status`]).
    pub fn present_bytes(&self, status: &[Vec<PageStatus>]) -> u64 {
        status
            .iter()
            .zip(self.layout.regions())
            .map(|(st, r)| {
                st.iter().filter(|&&s| s == PageStatus::Present).count() as u64
                    * r.page_size().bytes()
            })
            .sum()
    }

    /// Frees `dev_id`'s slot (and its s2map device index) once it is detached.
    pub(crate) fn release_device(&self, dev_id: u32) {
        self.device_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&(id, _)| id != dev_id);
    }

    /// Whether a device has been attached to this VM.
    pub fn has_devices(&self) -> bool {
        !self
            .device_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// The guest layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Session id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// VM name.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// The stage-2 map. Held only for state transitions, never across a syscall.
    pub fn map(&self) -> MutexGuard<'_, S2Map<Waiter>> {
        // A poisoned lock means a thread panicked mid-transition; the state is still a valid
        // S2Map (every transition is a single method call), so keep serving.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The snapshot file, if any.
    pub fn snapshot(&self) -> Option<&File> {
        self.snapshot.as_ref().map(|s| &s.file)
    }

    /// Where the snapshot's bytes `[offset, offset + len)` are in faultd's mapping of the file,
    /// for the kernel to copy from; None without a mapping or beyond the length the file had
    /// when it was mapped (then the caller reads the file).
    pub fn mapped_snapshot(&self, offset: u64, len: u64) -> Option<MappedSource> {
        let view = self.snapshot.as_ref()?.view.as_ref()?;
        let end = offset.checked_add(len)?;
        (end <= view.bytes()).then(|| MappedSource {
            addr: view.addr(offset),
            len,
        })
    }

    /// Regions in layout order.
    pub fn regions(&self) -> &[ServedRegion] {
        &self.regions
    }

    /// Finds the page containing VMM address `addr`, if it is inside a registered region.
    pub fn locate(&self, addr: Hva) -> Option<Located> {
        let layout = &self.layout;
        let pos = self
            .by_hva
            .partition_point(|&i| self.regions[i].hva <= addr)
            .checked_sub(1)?;
        let ri = self.by_hva[pos];
        let region = &layout.regions()[ri];
        let off = addr.0 - self.regions[ri].hva.0;
        if off >= region.size() {
            return None;
        }
        let size = region.page_size().bytes();
        let page_off = off & !(size - 1);
        let page = layout.lookup(Gpa(region.gpa().0 + page_off))?;
        Some(Located {
            page,
            hva: Hva(self.regions[ri].hva.0 + page_off),
            size,
        })
    }

    /// The VMM address range of `[start, end)` intersected with each region, as GPA ranges.
    pub fn hva_range_to_gpa(&self, start: Hva, end: Hva) -> Vec<(Gpa, u64)> {
        let layout = &self.layout;
        let mut out = Vec::new();
        for (ri, r) in self.regions.iter().enumerate() {
            let size = layout.regions()[ri].size();
            let lo = start.0.max(r.hva.0);
            let hi = end.0.min(r.hva.0 + size);
            if lo < hi {
                out.push((Gpa(layout.regions()[ri].gpa().0 + (lo - r.hva.0)), hi - lo));
            }
        }
        out
    }

    /// Records one vCPU fault's service time.
    pub fn record_latency(&self, nanos: u64) {
        record(&self.latency, nanos);
    }

    /// Records one device group's service time (read to answer).
    pub fn record_device_latency(&self, nanos: u64) {
        record(&self.device_latency, nanos);
    }

    /// The page's location in the VMM.
    pub fn located(&self, page: PageRef) -> Located {
        let ri = page.region.0 as usize;
        let size = self.layout.regions()[ri].page_size().bytes();
        Located {
            page,
            hva: Hva(self.regions[ri].hva.0 + page.page.0 * size),
            size,
        }
    }

    /// The memory fd and offset holding `page`.
    pub fn mem_location(&self, page: PageRef) -> Option<(BorrowedFd<'_>, u64)> {
        let ri = page.region.0 as usize;
        let size = self.layout.regions()[ri].page_size().bytes();
        match &self.regions[ri].memory {
            RegionMemory::Shared { fd, offset } => Some((fd.as_fd(), offset + page.page.0 * size)),
            // Anonymous private memory (Firecracker): faultd has no fd to save or drop it by.
            _ => None,
        }
    }

    /// Resident pages touching `[gpa, gpa+len)`, in gpa order.
    pub fn resident_pages_in(&self, gpa: Gpa, len: u64) -> Vec<PageRef> {
        let map = self.map();
        let end = gpa.0.saturating_add(len);
        let mut out = Vec::new();
        for (ri, r) in self.layout.regions().iter().enumerate() {
            let (lo, hi) = (gpa.0.max(r.gpa().0), end.min(r.end().0));
            if lo >= hi {
                continue;
            }
            let ps = r.page_size().bytes();
            for p in (lo - r.gpa().0) / ps..(hi - r.gpa().0).div_ceil(ps) {
                let page = PageRef {
                    region: s2map::RegionIdx(ri as u32),
                    page: s2map::PageIdx(p),
                };
                if map.state(page) == s2map::PageState::Resident {
                    out.push(page);
                }
            }
        }
        out
    }

    /// Bytes in granule `g`.
    pub fn granule_bytes(&self, g: Granule) -> u64 {
        g.pages * self.layout.region(g.first.region).page_size().bytes()
    }

    /// Whether every region is memory faultd can map itself (a device can be attached).
    pub fn memory_is_mappable(&self) -> bool {
        self.regions
            .iter()
            .all(|r| matches!(r.memory, RegionMemory::Shared { .. }))
    }

    /// Creates faultd's views of guest memory (once; for the IOMMU). Fails for anonymous
    /// memory, which has no fd to map.
    pub fn ensure_views(&self) -> std::io::Result<()> {
        if self.views.get().is_some() {
            return Ok(());
        }
        let views = self
            .regions
            .iter()
            .zip(self.layout.regions())
            .enumerate()
            .map(|(n, (r, l))| match &r.memory {
                RegionMemory::Shared { fd, offset } => FaultdView::memfd(fd, *offset, l.size()),
                RegionMemory::AnonymousPrivate => Err(std::io::Error::other(format!(
                    "region {n} is anonymous private memory of the VMM: no fd to map"
                ))),
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        // Only the control task calls this, one request at a time: a lost race is impossible,
        // and harmless (the loser's views are dropped).
        let _ = self.views.set(views);
        Ok(())
    }

    /// The IOVA (== GPA) of granule `g`.
    pub fn iova_of(&self, g: Granule) -> u64 {
        let region = self.layout.region(g.first.region);
        region.gpa().0 + g.first.page.0 * region.page_size().bytes()
    }

    /// Where granule `g` is for an IOMMU mapping: its IOVA (== GPA), and (faultd's address of
    /// it, the memfd, the offset in the memfd). Views must exist ([`Session::ensure_views`]).
    /// None for anonymous memory (devices are never attached to it).
    pub fn map_target(&self, g: Granule) -> Option<(u64, (u64, BorrowedFd<'_>, u64))> {
        let ri = g.first.region.0 as usize;
        let region = &self.layout.regions()[ri];
        let off = g.first.page.0 * region.page_size().bytes();
        let va = self.views.get().map_or(0, |v| v[ri].addr(off));
        match &self.regions[ri].memory {
            RegionMemory::Shared { fd, offset } => {
                Some((region.gpa().0 + off, (va, fd.as_fd(), offset + off)))
            }
            RegionMemory::AnonymousPrivate => None,
        }
    }

    /// Bytes of guest RAM in RAM: s2map's count, or for anonymous memory the VMM's pagemap's
    /// (it can be paged out to swap and come back by the kernel's swap-in, unseen by faultd).
    pub fn resident_bytes(&self) -> u64 {
        self.remote_present_bytes()
            .unwrap_or_else(|| self.map().stats().resident_bytes)
    }

    /// A snapshot of the counters for the control protocol.
    pub fn stats(&self) -> SessionStats {
        self.with_latency(self.read().stats)
    }

    /// `stats` with the latency summaries filled in (left out of [`Session::read`]: a scrape
    /// needs none, and computing them locks the histograms the fault thread records into).
    fn with_latency(&self, mut stats: SessionStats) -> SessionStats {
        stats.latency_us = summary(&self.latency);
        stats.device_latency_us = summary(&self.device_latency);
        stats
    }

    /// One read of every counter and of the stage-2 map's totals (one lock), which both
    /// [`Session::stats`] and [`Session::sample`] are made from.
    fn read(&self) -> Reading {
        let map = self.map().stats();
        // After the map lock is released: for anonymous memory this reads the VMM's pagemap.
        let resident_bytes = self.remote_present_bytes().unwrap_or(map.resident_bytes);
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let device = DeviceStats {
            devices: get(&c.devices),
            groups: get(&c.device_groups),
            pages: get(&c.device_pages),
            success: get(&c.device_success),
            invalid: get(&c.device_invalid),
            outside_layout: get(&c.device_outside),
            read_only: get(&c.device_read_only),
            malformed: get(&c.device_malformed),
            deadline: get(&c.device_deadline),
            failed: get(&c.device_failed),
            mapped_bytes: map.device_mapped_bytes,
            pin_evictions: get(&c.device_pin_evictions),
            respond_errors: get(&c.device_respond_errors),
            quarantined: get(&c.device_quarantined),
            stale_cookies: get(&c.device_stale_cookies),
        };
        Reading {
            stats: SessionStats {
                session: self.id,
                guest_bytes: self.layout.total_bytes(),
                resident_bytes,
                vcpu_faults: get(&c.vcpu_faults),
                zero_fills: get(&c.zero_fills),
                file_fills: get(&c.file_fills),
                store_fills: get(&c.store_fills),
                evictions: get(&c.evictions),
                stored_pages: map.stored_pages,
                already_present: get(&c.already_present),
                retries: get(&c.retries),
                discarded_pages: get(&c.discarded_pages),
                errors: get(&c.errors),
                latency_us: LatencySummary::default(),
                device,
                device_latency_us: LatencySummary::default(),
                around: faultd_proto::AroundStats {
                    vcpu_rounds: get(&c.around_vcpu_rounds),
                    vcpu_pages: get(&c.around_vcpu_pages),
                    device_rounds: get(&c.around_device_rounds),
                    device_granules: get(&c.around_device_granules),
                    stopped: get(&c.around_stopped),
                },
                working_set: c.ws.read(get(&c.snapshot_zero_pages)),
            },
            evicted_bytes: get(&c.evicted_bytes),
            discarded_bytes: get(&c.discarded_bytes),
            stored_bytes: map.stored_bytes,
        }
    }
}

/// One read of a session ([`Session::read`]): the control protocol's stats (without the
/// latency summaries) and the byte counts only the metrics export.
struct Reading {
    stats: SessionStats,
    evicted_bytes: u64,
    discarded_bytes: u64,
    stored_bytes: u64,
}

impl Reading {
    fn sample(&self) -> crate::ops::metrics::Sample {
        use crate::ops::metrics::{Levels, Sample, Totals};
        let st = &self.stats;
        Sample {
            totals: Totals {
                vcpu_faults: st.vcpu_faults,
                device_success: st.device.success,
                device_invalid: st.device.invalid,
                device_deadline: st.device.deadline,
                pin_evictions: st.device.pin_evictions,
                errors: st.errors,
                discarded_pages: st.discarded_pages,
                discarded_bytes: self.discarded_bytes,
                evictions: st.evictions,
                evicted_bytes: self.evicted_bytes,
                around_vcpu_pages: st.around.vcpu_pages,
                around_device_granules: st.around.device_granules,
                around_stopped: st.around.stopped,
                snapshot_zero_pages: st.working_set.zero_pages,
                ws_recorded: st.working_set.recorded,
                ws_prefetched: st.working_set.prefetched,
                ws_prefetched_zero: st.working_set.prefetched_zero,
                ws_late: st.working_set.late,
                ws_misses: st.working_set.misses,
            },
            levels: Levels {
                guest_bytes: st.guest_bytes,
                resident_bytes: st.resident_bytes,
                mapped_bytes: st.device.mapped_bytes,
                stored_pages: st.stored_pages,
                stored_bytes: self.stored_bytes,
                devices: st.device.devices,
            },
        }
    }
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 60 s: fixed bounds keep recording allocation-free. 2 significant digits (1%
    // resolution) is 3,840 counters, made in about a microsecond; 3 digits were 26,624, whose
    // zeroing took 40-170 us here, twice per session, before the session's first fault.
    Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("constant, valid histogram bounds")
}

fn record(h: &Mutex<Histogram<u64>>, nanos: u64) {
    let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
    // Saturate instead of failing on an out-of-range sample (a 60 s stall is still news).
    h.saturating_record(nanos.max(1));
}

fn summary(h: &Mutex<Histogram<u64>>) -> LatencySummary {
    let h = h.lock().unwrap_or_else(|p| p.into_inner());
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    LatencySummary {
        count: h.len(),
        p50: us(0.5),
        p90: us(0.9),
        p99: us(0.99),
        max: h.max() as f64 / 1000.0,
    }
}

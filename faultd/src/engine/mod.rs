//! The session's fault thread: one OS thread per VM serves its userfaultfd (vCPU faults) and
//! every device queue (device page requests) against the session's one s2map.
//!
//! One thread per VM, not per source, on purpose: a vCPU fault and a device fault on the same
//! page are then resolved once, in order, without cross-thread hand-offs on the hot path, and
//! the s2map lock is never contended by the VM's own sources. Different VMs are served in
//! parallel by their own threads.
//!
//! Adaptive polling (`run` in `thread.rs`, `SpinPolicy` and `ReadFirst` in `spin.rs`): serve
//! while work comes, keep polling for a window that follows the source's pace (while spinning
//! pays), then sleep in poll(2) on the uffd, the device queues and the control eventfd (after
//! one more read where that keeps finding work). Why a thread and not a tokio task: see [`crate::kernel::uffd`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iopf::Incoming;
use s2map::{DeviceIdx, Fill, Granule};

use crate::engine::device::Device;
use crate::engine::session::{Counters, Hva, Located, Session};
use crate::engine::store::Store;
use crate::kernel::uffd::{OpError, UffdEvent, UffdOps};
use crate::ops::metrics::{FaultOutcome, SessionMetrics};

/// Limits of the device path, from config.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLimits {
    /// Bytes of guest RAM this VM's devices may have mapped (pinned) at once.
    pub pin_limit: u64,
    /// Every page-request group is answered within this time, INVALID if need be.
    pub deadline: Duration,
    /// Malformed records in a row (no valid group between) after which a device is
    /// quarantined: garbage would otherwise cost as much as the device can send.
    pub malformed_run: u64,
}

/// Why a page could not be made resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InstallFail {
    /// EAGAIN: a layout event is unread; try again after reading events.
    Retry,
    /// The page was discarded while it was being installed; it is absent again.
    Stale,
    /// The page could not be installed (logged and counted).
    Failed,
    /// The page's snapshot object chunk is not cached; it is being fetched (see [`objects`]).
    /// The page is absent again.
    Deferred {
        /// The chunk waited for.
        chunk: u64,
    },
}

/// Serves one session's fault sources. Driver-agnostic: [`FaultThread`] drives it from a thread.
#[derive(Debug)]
pub struct FaultServer<O> {
    pub(crate) session: Arc<Session>,
    pub(crate) ops: O,
    batch: usize,
    events: Vec<UffdEvent>,
    retries: Vec<Hva>,
    page_buf: Vec<u8>,
    zero_buf: Vec<u8>,
    logged: std::cell::Cell<u32>,
    pub(crate) devices: Vec<Device>,
    pub(crate) incoming: Vec<Incoming>,
    /// Device-mapped granules, least recently mapped first (evicted first at the pin limit).
    /// Each entry carries the generation of the mapping it was pushed for: a granule unmapped
    /// (say by a discard) and mapped again gets a new entry, and the old one is skipped.
    pub(crate) lru: VecDeque<(DeviceIdx, Granule, u64)>,
    /// Current generation of each live device mapping (see `lru`).
    pub(crate) mapping_gen: std::collections::HashMap<(DeviceIdx, Granule), u64>,
    pub(crate) next_gen: u64,
    /// Bytes mapped by pinned devices (a granule two pinned devices map counts twice).
    pub(crate) pinned_bytes: u64,
    /// This VM's part of the pin limit of all VMs together (None: no such limit).
    pub(crate) pin_share: Option<pinned::PinShare>,
    /// A pinned attach in progress ([`pinned`]).
    pub(crate) pinning: Option<pinned::Pinning>,
    pub(crate) limits: DeviceLimits,
    new_devices: Option<Receiver<Command>>,
    /// Where fault latencies and faults in flight are recorded (handles resolved once).
    pub(crate) metrics: SessionMetrics,
    /// The last fill [`FaultServer::install`] did, in [`FaultOutcome`] order since the device
    /// path last reset it: labels a device group's latency by what it needed.
    pub(crate) filled: FaultOutcome,
    /// Where evicted pages go, and the journal of where absent pages are: opened with the
    /// session (a resumed one finds its pages there), or at the first eviction.
    store: Option<Store>,
    store_dir: std::path::PathBuf,
    /// Journal records to rebuild page state from before serving (a resumed session).
    resume: Option<Resume>,
    /// Pages in the order they were installed, oldest first: the eviction order. Entries of
    /// pages no longer resident are dropped when they reach the front.
    pub(crate) install_order: VecDeque<s2map::PageRef>,
    budget: Option<BudgetState>,
    /// Anonymous memory's residency as the VMM's pagemap said last (see [`pageout`]).
    anon: pageout::AnonResidency,
    /// The VMM asked to finish ([`finish`]): every page is restored, and nothing is evicted
    /// any more.
    pub(crate) finished: bool,
    /// Evict in the wrong order, saving before write-protecting: only the unit test that shows
    /// what that order loses sets it.
    #[cfg(test)]
    save_before_protect: bool,
    /// Fault-around: stream heads and settings ([`around`]).
    pub(crate) around: around::AroundState,
    /// Working-set recording and replay ([`working_set`]).
    pub(crate) ws: working_set::WsState,
    /// The snapshot object, when the session's snapshot is one ([`objects`]).
    pub(crate) object: Option<objects::ObjectFill>,
}

/// Most error log lines one session emits; the counters keep counting after that.
const MAX_LOGGED_ERRORS: u32 = 16;

impl<O: UffdOps> FaultServer<O> {
    /// A server for `session` over `ops`, reading `batch` events at a time.
    pub fn new(session: Arc<Session>, ops: O, batch: usize, limits: DeviceLimits) -> Self {
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
            logged: std::cell::Cell::new(0),
            devices: Vec::new(),
            incoming: Vec::new(),
            lru: VecDeque::new(),
            mapping_gen: std::collections::HashMap::new(),
            next_gen: 0,
            pinned_bytes: 0,
            pin_share: None,
            pinning: None,
            limits,
            new_devices: None,
            store: None,
            store_dir: std::path::PathBuf::from("/var/lib/faultd/store"),
            resume: None,
            install_order: VecDeque::new(),
            budget: None,
            anon: pageout::AnonResidency::default(),
            finished: false,
            metrics: SessionMetrics::detached(),
            filled: FaultOutcome::Present,
            #[cfg(test)]
            save_before_protect: false,
            around: around::AroundState::off(),
            ws: working_set::WsState::default(),
            object: None,
        }
    }

    /// Fills snapshot-backed pages from `object` instead of a snapshot file. Fault-around is
    /// off for such a session: its runs copy from a file mapping.
    pub fn with_object(mut self, object: objects::ObjectFill) -> Self {
        self.session.set_object(object.version().clone());
        self.object = Some(object);
        self.around = around::AroundState::off();
        // Recorded too: its recording goes beside the object (see `working_set`).
        self.ws_new_recorder();
        self
    }

    /// Holds this VM's pinned devices to `pool`, the pin limit of all VMs together.
    pub fn with_pin_pool(mut self, pool: Arc<pinned::PinPool>) -> Self {
        self.pin_share = Some(pinned::PinShare::new(pool));
        self
    }

    /// Enforces `limits` for this VM, with `global` shared by all VMs of the daemon.
    pub fn with_budget(
        mut self,
        limits: crate::ops::config::Budget,
        global: Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        self.budget = Some(BudgetState {
            limits,
            global,
            reported: 0,
        });
        self
    }

    /// Where this server's store file goes (config `store.dir`).
    pub fn with_store_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.store_dir = dir;
        self
    }

    /// Uses `store` (the VM's, opened by the caller); with `resume`, the page state is rebuilt
    /// from guest memory and the store's journal before the first fault is served
    /// ([`FaultServer::resume`]).
    pub fn with_store(mut self, store: Store, resume: Option<Resume>) -> Self {
        self.store = Some(store);
        self.resume = resume;
        self
    }

    /// Records into `metrics` (a daemon's) instead of detached handles.
    pub fn with_metrics(mut self, metrics: SessionMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The uffd, to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ops.fd()
    }

    /// The operations (tests inspect the fake).
    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// Attaches a device now (the thread gets devices through [`Command::AddDevice`]).
    pub fn add_device(&mut self, device: Device) {
        Counters::bump(&self.session.counters.devices);
        self.devices.push(device);
    }

    /// Serves everything pending: one batch of uffd events, EAGAIN retries, and every device
    /// queue. Returns how much work it did (0: nothing was pending).
    pub fn serve_ready(&mut self) -> io::Result<usize> {
        let commands: Vec<Command> = match &self.new_devices {
            Some(rx) => rx.try_iter().collect(),
            None => Vec::new(),
        };
        let evicted = !commands.is_empty();
        for c in commands {
            match c {
                Command::AddDevice(d) => self.add_device(d),
                Command::PinDevice {
                    device,
                    ranges,
                    reply,
                } => self.start_pinning(device, ranges, reply),
                Command::RemoveDevice { dev_id, reply } => {
                    let _ = reply.send(self.remove_device(dev_id));
                }
                // After finish, nothing goes back to where only faultd has it.
                Command::Evict { reply, .. } | Command::EvictOldest { reply, .. }
                    if self.finished =>
                {
                    let _ = reply.send(EvictReport::default());
                }
                Command::Finish { reply } => {
                    let report = self.finish();
                    let _ = reply.send(report);
                }
                Command::Evict {
                    gpa,
                    len,
                    max,
                    reply,
                } => {
                    let report = self.evict_range(gpa, len, max);
                    let _ = reply.send(report);
                }
                Command::EvictOldest { pages, reply } => {
                    let report = self.evict_oldest(Quota::Pages(pages), None);
                    let _ = reply.send(report);
                }
            }
        }
        if evicted {
            // Evictions freed memory: the global budget count must see it now, not at the
            // next fault.
            self.report_resident();
        }
        let mut work = self.serve_landed();
        work += self.serve_uffd()?;
        if !self.devices.is_empty() {
            work += self.serve_devices();
        }
        // One bounded slice of a pinned attach per pass, after the faults that were waiting.
        work += self.pin_slice();
        if work > 0 {
            self.enforce_budget();
        }
        Ok(work)
    }
}

impl<O: UffdOps> FaultServer<O> {
    /// Serves the faults deferred on object chunks that landed since the last pass; a chunk
    /// that failed fails the session (see [`objects`]). Returns the faults served again.
    fn serve_landed(&mut self) -> usize {
        let Some(object) = &mut self.object else {
            return 0;
        };
        let (again, failure) = object.take_landed();
        if let Some(e) = failure {
            if object.failed.is_none() {
                let why = format!(
                    "snapshot object {}: {e}; faults waiting on it are not served",
                    object.version().label()
                );
                tracing::error!(session = self.session.id(), vm = self.session.vm(), "{why}");
                object.failed = Some(why.clone());
                Counters::bump(&self.session.counters.errors);
                self.session.fail(why);
            }
        }
        let n = again.len();
        let t0 = Instant::now();
        for hva in again {
            self.handle_fault(hva, t0);
        }
        if let Some(object) = &mut self.object {
            object.clear_landed();
        }
        n
    }

    /// Whether `fill` of a page of `size` bytes is served as a zero page: a snapshot file's
    /// page its analysis knows to be zero, or a page in a chunk of the object known to be.
    pub(crate) fn zero_fill(&self, fill: Fill, size: u64) -> bool {
        self.session.serves_as_zero(fill, size)
            || matches!((fill, &self.object), (Fill::File { offset }, Some(o)) if o.is_zero(offset))
    }

    /// Records that `page` was just installed (the young end of the eviction order).
    pub(crate) fn installed(&mut self, page: s2map::PageRef) {
        self.install_order.push_back(page);
        // Entries of pages evicted or discarded since accumulate; compact when the queue is
        // much longer than the VM has pages.
        let total = self
            .session
            .layout()
            .regions()
            .iter()
            .map(|r| r.page_count())
            .sum::<u64>();
        if self.install_order.len() as u64 > 2 * total + 1024 {
            let map = self.session.map();
            let mut seen = std::collections::HashSet::new();
            let mut kept: VecDeque<s2map::PageRef> = VecDeque::new();
            // Keep each resident page's most recent entry.
            for &p in self.install_order.iter().rev() {
                if map.state(p) == s2map::PageState::Resident && seen.insert(p) {
                    kept.push_front(p);
                }
            }
            drop(map);
            self.install_order = kept;
        }
    }
}

impl<O: UffdOps> FaultServer<O> {
    /// Fills a page that s2map put in Resolving for us, and completes or aborts it. Shared by
    /// the vCPU and device paths: the page comes from its backing into the VMM's memfd by a uffd
    /// operation on the VMM's address, which also wakes every thread blocked on it.
    pub(crate) fn install(&mut self, at: Located, fill: Fill) -> Result<(), InstallFail> {
        // A snapshot page known to be all zero is installed as a zero page (see `snapshots`;
        // an object's zero chunks: `objects`).
        let zeroed = self.zero_fill(fill, at.size);
        let result = match if zeroed { Fill::Zero } else { fill } {
            Fill::Zero if at.size == 4096 => self.ops.zeropage(at.hva, at.size),
            Fill::Zero => self.ops.copy(&self.zero_buf[..at.size as usize], at.hva),
            Fill::Store { slot } => {
                let buf = &mut self.page_buf[..at.size as usize];
                let read = match &self.store {
                    Some(store) => store.load(slot, buf).map_err(io::Error::other),
                    None => Err(io::Error::other("no store")),
                };
                match read {
                    Ok(()) => self.ops.copy(buf, at.hva),
                    Err(e) => {
                        self.abort(at);
                        self.error(format_args!(
                            "reading store slot {slot} for {:#x}: {e}",
                            at.hva.0
                        ));
                        return Err(InstallFail::Failed);
                    }
                }
            }
            Fill::File { offset } if self.object.is_some() => {
                let buf = &mut self.page_buf[..at.size as usize];
                let read = match &mut self.object {
                    Some(o) => o.read(offset, buf),
                    None => Err(io::Error::other("no snapshot object")),
                };
                match read {
                    Ok(objects::ObjectRead::Read) => self.ops.copy(buf, at.hva),
                    Ok(objects::ObjectRead::Pending { chunk }) => {
                        self.abort(at);
                        return Err(InstallFail::Deferred { chunk });
                    }
                    Err(e) => {
                        self.abort(at);
                        self.error(format_args!(
                            "reading snapshot object offset {offset:#x} for {:#x}: {e}",
                            at.hva.0
                        ));
                        return Err(InstallFail::Failed);
                    }
                }
            }
            Fill::File { offset } => match self.session.mapped_snapshot(offset, at.size) {
                // The kernel copies straight from faultd's mapping of the file: one copy and
                // no read(2). Measured here (firecracker_restore bench, alternating builds):
                // faultd's service p50 9-12 µs instead of 12-14 µs with pread.
                Some(src) => self.ops.copy_mapped(src, at.hva),
                None => {
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
                            return Err(InstallFail::Failed);
                        }
                    }
                }
            },
        };
        let counters = &self.session.counters;
        if result.is_ok() {
            self.filled = self.filled.max(outcome_of(fill));
        }
        match result {
            Ok(()) | Err(OpError::Exists) => {
                let completed = self.session.map().complete(at.page);
                // Counted once s2map has it resident: whoever sees the fill counted sees the
                // page resident too (the faulting thread already runs: the copy woke it).
                Counters::bump(match (result, fill) {
                    (Err(_), _) => &counters.already_present,
                    (Ok(()), Fill::Zero) => &counters.zero_fills,
                    (Ok(()), Fill::File { .. }) => &counters.file_fills,
                    (Ok(()), Fill::Store { .. }) => &counters.store_fills,
                });
                if let (Ok(c), Some(store)) = (&completed, &mut self.store) {
                    if let Some(slot) = c.freed_slot {
                        store.free(slot);
                    }
                }
                if zeroed && result.is_ok() {
                    Counters::bump(&counters.snapshot_zero_pages);
                }
                if let (Ok(()), Fill::File { offset }) = (result, fill) {
                    self.ws_filled(offset);
                }
                if completed.as_ref().is_ok_and(|c| c.resident) {
                    self.installed(at.page);
                }
                match completed {
                    Ok(c) if c.resident => Ok(()),
                    Ok(_) => Err(InstallFail::Stale),
                    Err(e) => {
                        self.error(format_args!("s2map refused completion: {e}"));
                        Err(InstallFail::Failed)
                    }
                }
            }
            Err(OpError::Retry) => {
                Counters::bump(&counters.retries);
                self.abort(at);
                Err(InstallFail::Retry)
            }
            Err(e) => {
                self.abort(at);
                self.error(format_args!("installing page at {:#x}: {e}", at.hva.0));
                Err(InstallFail::Failed)
            }
        }
    }
}

impl<O: UffdOps> FaultServer<O> {
    /// Serves what is outstanding for up to `bound` before the thread stops with the VM still
    /// running: device groups already read or still queued, and faults. Returns when nothing
    /// is pending and nothing new arrived in the last pass, or at the bound.
    fn drain(&mut self, bound: Duration) {
        let end = Instant::now() + bound;
        while Instant::now() < end {
            match self.serve_ready() {
                Ok(0) if !self.has_retries() => return,
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

impl<O: UffdOps> FaultServer<O> {
    fn abort(&self, at: Located) {
        // Waiters are never queued in s2map by this thread (it is the only resolver of this
        // VM), so there is nobody to hand back.
        let _ = self.session.map().abort(at.page);
    }

    pub(crate) fn error(&self, what: std::fmt::Arguments<'_>) {
        Counters::bump(&self.session.counters.errors);
        if self.logged.get() < MAX_LOGGED_ERRORS {
            self.logged.set(self.logged.get() + 1);
            tracing::warn!(
                session = self.session.id(),
                vm = self.session.vm(),
                "{what}"
            );
        }
    }
}

/// The `outcome` label of a fill.
pub(crate) fn outcome_of(fill: Fill) -> FaultOutcome {
    match fill {
        Fill::Zero => FaultOutcome::Zero,
        Fill::File { .. } => FaultOutcome::File,
        Fill::Store { .. } => FaultOutcome::Store,
    }
}

mod around;
mod budget;
mod evict;
mod finish;
mod pageout;
pub mod pinned;
mod resume;
mod spin;
mod thread;
mod vcpu;

pub mod device;
pub mod objects;
pub mod recording;
pub mod session;
pub mod snapshots;
pub mod store;
pub mod working_set;
pub mod ws_library;
pub mod ws_stats;

use budget::BudgetState;
use evict::Quota;
use spin::{ReadFirst, SpinPolicy};

pub use evict::{EvictError, EvictReport};
pub use finish::FinishReport;
pub use resume::{Resume, ResumeReport};
pub use thread::{Command, Commander, FaultThread, StandbyJob, StandbyThread};

#[cfg(test)]
mod tests;

//! The session's fault thread: one OS thread per VM serves its userfaultfd (vCPU faults) and
//! every device queue (device page requests) against the session's one s2map.
//!
//! One thread per VM, not per source, on purpose: a vCPU fault and a device fault on the same
//! page are then resolved once, in order, without cross-thread hand-offs on the hot path, and
//! the s2map lock is never contended by the VM's own sources. Different VMs are served in
//! parallel by their own threads.
//!
//! Adaptive polling ([`run`], [`SpinPolicy`], [`ReadFirst`]): serve while work comes, keep
//! polling for a window that follows the source's pace (while spinning pays), then sleep in
//! poll(2) on the uffd, the device queues and the control eventfd (after one more read where
//! that keeps finding work). Why a thread and not a tokio task: see [`crate::vcpu`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use iopf::Incoming;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use s2map::{Begin, DeviceIdx, Fill, Granule};

use crate::device::Device;
use crate::metrics::{FaultOutcome, SessionMetrics, Source};
use crate::session::{Counters, Hva, Located, Session};
use crate::store::{Record, Store};
use crate::vcpu::{OpError, UffdEvent, UffdOps};

/// Limits of the device path, from config.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLimits {
    /// Bytes of guest RAM this VM's devices may have mapped (pinned) at once.
    pub pin_limit: u64,
    /// Every page-request group is answered within this time, INVALID if need be.
    pub deadline: Duration,
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
}

/// Serves one session's fault sources. Driver-agnostic: [`run`] drives it from a thread.
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
}

/// Budget enforcement of one VM (see config `[budget]`).
#[derive(Debug)]
struct BudgetState {
    limits: crate::config::Budget,
    /// Resident bytes of all VMs, kept by every session thread adding its own changes.
    global: Arc<std::sync::atomic::AtomicU64>,
    /// This VM's resident bytes as last added to `global`.
    reported: u64,
}

/// Work handed to the session thread by the control plane.
#[derive(Debug)]
pub enum Command {
    /// Attach a device.
    AddDevice(Device),
    /// Evict the resident pages of `[gpa, gpa+len)` (at most `max` of them), and report.
    Evict {
        /// Start of the range.
        gpa: s2map::Gpa,
        /// Bytes.
        len: u64,
        /// Most pages to evict.
        max: u64,
        /// Where the report goes.
        reply: std::sync::mpsc::Sender<EvictReport>,
    },
    /// Evict `pages` resident pages chosen as budget enforcement chooses them (oldest
    /// installed first, device-mapped ones last), and report. An operator's request.
    EvictOldest {
        /// Pages to evict.
        pages: u64,
        /// Where the report goes.
        reply: std::sync::mpsc::Sender<EvictReport>,
    },
}

/// How much [`FaultServer::evict_oldest`] takes back, and for whom.
#[derive(Debug, Clone, Copy)]
enum Quota {
    /// At least this many bytes, for a budget.
    BudgetBytes(u64),
    /// This many pages, for an operator.
    Pages(u64),
}

impl Quota {
    fn met(self, freed_bytes: u64, evicted: u64) -> bool {
        match self {
            Quota::BudgetBytes(b) => freed_bytes >= b,
            Quota::Pages(n) => evicted >= n,
        }
    }
}

/// What an eviction request did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictReport {
    /// Pages evicted (saved and dropped).
    pub evicted: u64,
    /// ... of which were all zero (nothing stored).
    pub zero: u64,
    /// Pages that could not be evicted (logged and counted as errors).
    pub failed: u64,
}

/// What a resumed session starts from: a VMM that re-registers after faultd restarted.
#[derive(Debug)]
pub struct Resume {
    /// The store journal's records, oldest first.
    pub records: Vec<Record>,
    /// The VMM (its page tables tell which huge pages are present).
    pub vmm_pid: Option<i32>,
}

/// What [`FaultServer::resume`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResumeReport {
    /// Pages present in guest memory (resident from now on).
    pub present: u64,
    /// Absent pages whose contents are in the store.
    pub stored: u64,
    /// Absent pages that read zero whatever their backing says.
    pub zeroed: u64,
    /// Journal records that named no page of the layout (a different layout was registered).
    pub unknown: u64,
}

/// Why a page eviction failed. The page stays resident.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    /// s2map refused (not resident, device-mapped).
    #[error(transparent)]
    State(#[from] s2map::StateError),
    /// Write-protecting the page in the VMM failed (did it register the range with
    /// write-protect mode?).
    #[error("write-protecting the page at {hva:#x}: {source}")]
    WriteProtect {
        /// VMM address.
        hva: u64,
        #[source]
        source: OpError,
    },
    /// Reading the page from the memfd failed.
    #[error("reading the page from guest memory")]
    Read(#[source] io::Error),
    /// The store refused the page.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Punching the page out of the memfd failed.
    #[error("dropping the page from guest memory")]
    Drop(#[source] nix::Error),
    /// The session has no memory fd for the page (not memfd-backed).
    #[error("the page has no memory fd")]
    NoMemory,
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
            limits,
            new_devices: None,
            store: None,
            store_dir: std::path::PathBuf::from("/var/lib/faultd/store"),
            resume: None,
            install_order: VecDeque::new(),
            budget: None,
            anon: pageout::AnonResidency::default(),
            metrics: SessionMetrics::detached(),
            filled: FaultOutcome::Present,
        }
    }

    /// Enforces `limits` for this VM, with `global` shared by all VMs of the daemon.
    pub fn with_budget(
        mut self,
        limits: crate::config::Budget,
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

    /// Attaches a device now (the thread gets devices through [`FaultThread::add_device`]).
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
        let mut work = self.serve_uffd()?;
        if !self.devices.is_empty() {
            work += self.serve_devices();
        }
        if work > 0 {
            self.enforce_budget();
        }
        Ok(work)
    }

    /// Adds this VM's resident change to the global count; returns (own, global) bytes.
    fn report_resident(&mut self) -> (u64, u64) {
        let own = self.own_resident();
        let Some(b) = &mut self.budget else {
            return (own, 0);
        };
        if own >= b.reported {
            b.global.fetch_add(own - b.reported, Ordering::Relaxed);
        } else {
            b.global.fetch_sub(b.reported - own, Ordering::Relaxed);
        }
        b.reported = own;
        (own, b.global.load(Ordering::Relaxed))
    }

    /// Evicts down to the low watermark when this VM, or all VMs together, went above the
    /// high one. Over the global budget, each VM gives back its share of the excess (in
    /// proportion to its resident memory), so no VM pays for the others.
    pub fn enforce_budget(&mut self) {
        self.enforce(false)
    }

    /// [`FaultServer::enforce_budget`]; `idle`: no event came for a while, so for anonymous
    /// memory read the pagemap even if the estimate is within the budget (swap-ins raise no
    /// event).
    fn enforce(&mut self, idle: bool) {
        let Some(limits) = self.budget.as_ref().map(|b| b.limits) else {
            return;
        };
        if !limits.is_set() {
            // No budget (the default): nothing reads the global count, so this runs after every
            // batch of faults for nothing but a lock and an atomic.
            return;
        }
        let excess = |(own, global): (u64, u64)| {
            let pct = |v: u64, p: u64| (v as u128 * p as u128 / 100) as u64;
            let mut free = 0;
            if limits.session > 0 && own > pct(limits.session, limits.high_pct) {
                free = own - pct(limits.session, limits.low_pct);
            }
            if limits.global > 0 && global > pct(limits.global, limits.high_pct) && global > 0 {
                let excess = global - pct(limits.global, limits.low_pct);
                free = free.max((excess as u128 * own as u128 / global as u128) as u64);
            }
            free
        };
        let mut free = excess(self.report_resident());
        // Anonymous memory: over the line by an estimate, look at the pagemap before paging
        // out (and, idle, look anyway).
        let mut pagemap = None;
        if free > 0 || idle {
            pagemap = self.remeasure_if_stale();
            if pagemap.is_some() {
                free = excess(self.report_resident());
            }
        }
        if free > 0 {
            self.evict_oldest(Quota::BudgetBytes(free), pagemap);
            self.report_resident();
        }
    }

    /// Evicts resident pages, oldest-installed first, device-mapped ones only when nothing
    /// else is left, until `quota` is met or no resident page is left. Anonymous memory is
    /// paged out instead, by `pagemap` if the caller has just read it.
    fn evict_oldest(
        &mut self,
        quota: Quota,
        pagemap: Option<Vec<Vec<crate::remote::PageStatus>>>,
    ) -> EvictReport {
        if self.session.is_anonymous() {
            return self.page_out_oldest(quota, pagemap);
        }
        let mut report = EvictReport::default();
        let mut freed = 0;
        let mut device_mapped = VecDeque::new();
        while !quota.met(freed, report.evicted) {
            let Some(page) = self.install_order.pop_front() else {
                break;
            };
            let (state, mapped) = {
                let map = self.session.map();
                (map.state(page), map.is_device_mapped(page))
            };
            if state != s2map::PageState::Resident {
                continue; // evicted or discarded since it was installed
            }
            if mapped {
                device_mapped.push_back(page);
                continue;
            }
            freed += self.evict_counted(page, quota, &mut report);
        }
        while !quota.met(freed, report.evicted) {
            let Some(page) = device_mapped.pop_front() else {
                break;
            };
            freed += self.evict_counted(page, quota, &mut report);
        }
        // Device-mapped pages that were passed over keep their place at the old end.
        while let Some(page) = device_mapped.pop_back() {
            self.install_order.push_front(page);
        }
        report
    }

    /// Evicts `page` for `quota`, adding the outcome to `report`; returns the bytes freed (0
    /// on failure, logged).
    fn evict_counted(
        &mut self,
        page: s2map::PageRef,
        quota: Quota,
        report: &mut EvictReport,
    ) -> u64 {
        let size = self.session.located(page).size;
        match self.evict_page(page) {
            Ok(stored) => {
                if let Quota::BudgetBytes(_) = quota {
                    Counters::bump(&self.session.counters.budget_evictions);
                }
                report.evicted += 1;
                report.zero += u64::from(!stored);
                size
            }
            Err(e) => {
                report.failed += 1;
                let why = match quota {
                    Quota::BudgetBytes(_) => "budget",
                    Quota::Pages(_) => "operator",
                };
                self.error(format_args!("{why} eviction of {page}: {e}"));
                0
            }
        }
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

    fn serve_uffd(&mut self) -> io::Result<usize> {
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
        let faults = events
            .iter()
            .filter(|e| matches!(e, UffdEvent::Fault { .. }))
            .count();
        self.metrics.vcpu_in_flight.set(retries.len() + faults);
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
        self.metrics.vcpu_in_flight.set(self.retries.len());
        Ok(handled)
    }

    /// Whether work is waiting for a retry (uffd EAGAIN, device groups not yet resolved).
    pub fn has_retries(&self) -> bool {
        !self.retries.is_empty()
            || self
                .devices
                .iter()
                .any(|d| !d.quarantined && !d.pending.is_empty())
    }

    fn handle_layout_event(&mut self, ev: UffdEvent) {
        match ev {
            UffdEvent::Remove { start, end } => {
                for (gpa, len) in self.session.hva_range_to_gpa(start, end) {
                    // A device must lose its mapping before the page goes (the kernel zaps it
                    // once this event has been read).
                    self.unmap_devices_in(gpa, len);
                    let discarded = self.session.map().discard(gpa, len);
                    // The pages read zero from now on, whatever their backing: a restarted
                    // faultd must know (the journal's last word on them).
                    self.journal(Record::Zero { gpa: gpa.0, len });
                    self.session
                        .counters
                        .discarded_pages
                        .fetch_add(discarded.resident_pages, Ordering::Relaxed);
                    if let Some(store) = &mut self.store {
                        discarded
                            .freed_slots
                            .iter()
                            .for_each(|&slot| store.free(slot));
                    }
                    for (dev, g) in discarded.dropped_mappings {
                        self.error(format_args!(
                            "{g:?} of device {} was still mapped at discard",
                            dev.0
                        ));
                    }
                }
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
            self.metrics
                .observe(Source::Vcpu, FaultOutcome::Invalid, t0.elapsed());
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
                self.metrics
                    .observe(Source::Vcpu, FaultOutcome::Present, t0.elapsed());
            }
            Begin::Joined => {
                // Another source is installing it; the install wakes this thread too.
            }
            // Evictions finish before this thread reads events, so this is not seen; if it
            // were, the fault is retried once the eviction is done.
            Begin::Evicting => self.retries.push(at.hva),
            Begin::Resolve(fill) => match self.install(at, fill) {
                Ok(()) => {
                    let took = t0.elapsed();
                    self.session
                        .record_latency(took.as_nanos().min(u64::MAX as u128) as u64);
                    self.metrics.observe(Source::Vcpu, outcome_of(fill), took);
                }
                Err(InstallFail::Retry) => self.retries.push(at.hva),
                // Stale: the page was discarded meanwhile; the thread re-faults if it still
                // needs it.
                Err(InstallFail::Stale) => {}
                // Failed: logged and counted; the thread stays blocked.
                Err(InstallFail::Failed) => {
                    self.metrics
                        .observe(Source::Vcpu, FaultOutcome::Invalid, t0.elapsed())
                }
            },
        }
    }

    /// Fills a page that s2map put in Resolving for us, and completes or aborts it. Shared by
    /// the vCPU and device paths: the page comes from its backing into the VMM's memfd by a uffd
    /// operation on the VMM's address, which also wakes every thread blocked on it.
    pub(crate) fn install(&mut self, at: Located, fill: Fill) -> Result<(), InstallFail> {
        let result = match fill {
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

    /// Evicts up to `max` resident pages touching `[gpa, gpa+len)`.
    pub fn evict_range(&mut self, gpa: s2map::Gpa, len: u64, max: u64) -> EvictReport {
        if self.session.is_anonymous() {
            return self.page_out_range(gpa, len, max);
        }
        let mut report = EvictReport::default();
        let pages = self.session.resident_pages_in(gpa, len);
        for page in pages.into_iter().take(max as usize) {
            match self.evict_page(page) {
                Ok(stored) => {
                    report.evicted += 1;
                    report.zero += u64::from(!stored);
                }
                Err(e) => {
                    report.failed += 1;
                    self.error(format_args!("evicting {page}: {e}"));
                }
            }
        }
        report
    }

    /// Evicts one resident page; returns whether its contents went to the store (false: they
    /// were all zero, nothing stored).
    ///
    /// The order is the point (it was run on this kernel and loses nothing; see
    /// ../shared/reference/userfaultfd-shmem.md):
    /// 1. Device mappings go first: once the IOMMU unmap returns, no DMA can write the page
    ///    (a device's next access faults and is served after the eviction).
    /// 2. s2map marks it Evicting (refused while a device still maps it).
    /// 3. Write-protect it in the VMM: from now on a vCPU (through KVM's MMU notifier) or VMM
    ///    write blocks in a WP fault instead of landing in a page that is being saved.
    /// 4. Save it: pread on the memfd, never through a mapping (touching faultd's own mapping
    ///    of an absent page would create a zero page and lose data); all-zero pages are not
    ///    stored.
    /// 5. Drop it: punch the hole in the memfd, so every mapping loses the page.
    /// 6. s2map: Absent, filled from the slot (or zeros) by the next fault.
    /// 7. Clear write-protect: blocked writers wake, re-fault as MISSING on the absent page,
    ///    are served from the store (by this thread, after this function returns), and their
    ///    writes land on top of the saved contents.
    pub fn evict_page(&mut self, page: s2map::PageRef) -> Result<bool, EvictError> {
        let at = self.session.located(page);
        let gpa = self
            .session
            .layout()
            .region(page.region)
            .page_gpa(page.page);
        // 1.
        self.unmap_devices_in(gpa, at.size);
        // 2.
        self.session.map().begin_evict(page)?;
        // 3.
        if let Err(source) = self.ops.write_protect(at.hva, at.size) {
            let _ = self.session.map().cancel_evict(page);
            return Err(EvictError::WriteProtect {
                hva: at.hva.0,
                source,
            });
        }
        let saved = self.save_and_drop(page, at.size);
        // 6.
        let slot = match saved {
            Ok(slot) => slot,
            Err(e) => {
                let _ = self.session.map().cancel_evict(page);
                let _ = self.ops.unprotect(at.hva, at.size);
                return Err(e);
            }
        };
        let finished = self.session.map().finish_evict(page, slot);
        if let (Ok(Some(freed)), Some(store)) = (&finished, &mut self.store) {
            store.free(*freed);
            // Discarded meanwhile: zero is the page's content, not the saved copy.
            self.journal(Record::Zero {
                gpa: gpa.0,
                len: at.size,
            });
        }
        // 7.
        if let Err(e) = self.ops.unprotect(at.hva, at.size) {
            // The page is gone and stored; writers stay blocked until the VMM's next
            // write-protect change. Say so loudly.
            self.error(format_args!(
                "clearing write-protect at {:#x}: {e}",
                at.hva.0
            ));
        }
        Counters::bump(&self.session.counters.evictions);
        self.maybe_compact();
        finished?;
        Ok(slot.is_some())
    }

    /// Steps 4 and 5 of [`FaultServer::evict_page`]: returns the slot (None: all zero).
    fn save_and_drop(
        &mut self,
        page: s2map::PageRef,
        size: u64,
    ) -> Result<Option<u32>, EvictError> {
        let (fd, off) = self
            .session
            .mem_location(page)
            .ok_or(EvictError::NoMemory)?;
        let slot_bytes = self.page_buf.len() as u64;
        let buf = &mut self.page_buf[..size as usize];
        // 4.
        nix::sys::uio::pread(fd, buf, off as i64)
            .map_err(|e| EvictError::Read(e.into()))
            .and_then(|n| {
                if n == buf.len() {
                    Ok(())
                } else {
                    Err(EvictError::Read(io::Error::other("short read")))
                }
            })?;
        let store = open_store(
            &mut self.store,
            &self.store_dir,
            self.session.vm(),
            slot_bytes,
        )?;
        let gpa = self
            .session
            .layout()
            .region(page.region)
            .page_gpa(page.page)
            .0;
        let (slot, record) = if buf.iter().all(|&b| b == 0) {
            (None, Record::Zero { gpa, len: size })
        } else {
            let slot = store.save(buf)?;
            (Some(slot), Record::Stored { gpa, slot })
        };
        // Recorded before the page is dropped: from the punch on, the store (and this record)
        // is the only place its contents exist, and a restarted faultd finds them here.
        if let Err(e) = store.record(record) {
            if let Some(slot) = slot {
                store.free(slot);
            }
            return Err(e.into());
        }
        // 5.
        let punched = nix::fcntl::fallocate(
            fd,
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off as i64,
            size as i64,
        );
        if let Err(e) = punched {
            if let (Some(slot), Some(store)) = (slot, &mut self.store) {
                store.free(slot);
            }
            return Err(EvictError::Drop(e));
        }
        Ok(slot)
    }

    /// Appends `record` to the store's journal (opening the store if need be). A failure is
    /// logged and counted: the page state in memory is right, only a restart would miss it.
    fn journal(&mut self, record: Record) {
        let slot_bytes = self.page_buf.len() as u64;
        let opened = open_store(
            &mut self.store,
            &self.store_dir,
            self.session.vm(),
            slot_bytes,
        );
        let store = match opened {
            Ok(store) => store,
            Err(e) => {
                self.error(format_args!("opening the store to journal {record:?}: {e}"));
                return;
            }
        };
        if let Err(e) = store.record(record) {
            self.error(format_args!("journaling {record:?}: {e}"));
        }
        self.maybe_compact();
    }

    /// Rewrites the journal as the state now once it has grown well past it (see
    /// [`Store::wants_compaction`]), so that it stays proportional to the evicted pages.
    fn maybe_compact(&mut self) {
        if !self.store.as_ref().is_some_and(Store::wants_compaction) {
            return;
        }
        let records = self.state_records();
        if let Some(store) = &mut self.store {
            if let Err(e) = store.compact(records) {
                self.error(format_args!("compacting the store journal: {e}"));
            }
        }
    }

    /// The journal records that describe the page state now: every stored page and every
    /// run of zeroed pages of file-backed regions.
    fn state_records(&self) -> Vec<Record> {
        let map = self.session.map();
        let layout = self.session.layout();
        let gpa_of = |p: s2map::PageRef| layout.region(p.region).page_gpa(p.page).0;
        let mut out: Vec<Record> = map
            .stored_pages()
            .map(|(p, slot)| Record::Stored {
                gpa: gpa_of(p),
                slot,
            })
            .collect();
        out.extend(map.zeroed_runs().into_iter().map(|(p, n)| Record::Zero {
            gpa: gpa_of(p),
            len: n * layout.region(p.region).page_size().bytes(),
        }));
        out
    }

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

    /// Rebuilds the state of a VMM that registers again after faultd restarted, before any of
    /// its faults is served:
    /// 1. Pages present in guest memory are resident: the memory is the truth for them (an
    ///    eviction that died before its punch left the page there, intact, because it was
    ///    write-protected).
    /// 2. Absent pages take the journal's last word: a store slot, or zero; without one they
    ///    fill from the backing registered now. The slots of those pages are in use, every
    ///    other slot is free.
    /// 3. The journal is rewritten as that state.
    /// 4. Write protection is cleared and every waiting thread woken, over all guest RAM: the
    ///    dead faultd may have left pages write-protected mid-eviction, and threads blocked on
    ///    faults it had read but not served. Woken, they fault again and this server sees it.
    pub fn resume(&mut self) -> Option<ResumeReport> {
        let r = self.resume.take()?;
        let mut report = ResumeReport::default();
        // 1.
        for ri in 0..self.session.regions().len() {
            match self.present_pages(ri, r.vmm_pid) {
                Ok(pages) => {
                    for p in pages {
                        let page = s2map::PageRef {
                            region: s2map::RegionIdx(ri as u32),
                            page: s2map::PageIdx(p),
                        };
                        if self.session.map().mark_present(page) {
                            report.present += 1;
                            self.installed(page);
                        }
                    }
                }
                // Taken as absent: a present page then only costs an EEXIST install, while a
                // page wrongly taken as present would never be served.
                Err(e) => self.error(format_args!(
                    "finding the present pages of region {ri} (taken as absent): {e}"
                )),
            }
        }
        // 2.
        let session = self.session.clone();
        let layout = session.layout();
        let mut last: std::collections::HashMap<s2map::PageRef, Option<u32>> =
            std::collections::HashMap::new();
        for rec in &r.records {
            let (gpa, len, slot) = match *rec {
                Record::Stored { gpa, slot } => (gpa, 1, Some(slot)),
                Record::Zero { gpa, len } => (gpa, len, None),
            };
            let end = gpa.saturating_add(len);
            let mut at = gpa;
            while at < end {
                match layout.lookup(s2map::Gpa(at)) {
                    Some(p) => {
                        let region = layout.region(p.region);
                        last.insert(p, slot);
                        at = region.page_gpa(p.page).0 + region.page_size().bytes();
                    }
                    None => {
                        report.unknown += 1;
                        break;
                    }
                }
            }
        }
        let mut used = Vec::new();
        {
            let mut map = self.session.map();
            for (page, slot) in last {
                if map.state(page) != s2map::PageState::Absent {
                    continue;
                }
                if map.restore_absent(page, slot).is_ok() {
                    match slot {
                        Some(s) => {
                            used.push(s);
                            report.stored += 1;
                        }
                        None => report.zeroed += 1,
                    }
                }
            }
        }
        // 3.
        let records = self.state_records();
        if let Some(store) = &mut self.store {
            store.adopt(used);
            if let Err(e) = store.compact(records) {
                self.error(format_args!("rewriting the resumed journal: {e}"));
            }
        }
        // 4.
        for (region, r) in self.session.regions().iter().zip(layout.regions()) {
            let (hva, size) = (region.hva, r.size());
            if let Err(e) = self.ops.unprotect(hva, size) {
                tracing::debug!(session = self.session.id(), "clearing write-protect: {e}");
            }
            if let Err(e) = self.ops.wake(hva, size) {
                self.error(format_args!("waking the threads of {:#x}: {e}", hva.0));
            }
        }
        self.report_resident();
        Some(report)
    }

    /// Page indexes of region `ri` present in guest memory.
    fn present_pages(&self, ri: usize, vmm_pid: Option<i32>) -> io::Result<Vec<u64>> {
        let region = &self.session.regions()[ri];
        let r = &self.session.layout().regions()[ri];
        let (page, size) = (r.page_size().bytes(), r.size());
        let crate::session::RegionMemory::Shared { fd, offset } = &region.memory else {
            // Anonymous memory (Firecracker's): its pagemap. A page in swap is populated too
            // (the kernel swaps it in; no userfault comes for it).
            let status = match self.session.remote_status() {
                Some(s) => s?,
                None => return Err(io::Error::other("the VMM's memory is not open")),
            };
            return Ok(status[ri]
                .iter()
                .enumerate()
                .filter(|(_, &st)| st != crate::remote::PageStatus::None)
                .map(|(i, _)| i as u64)
                .collect());
        };
        if page == 4096 {
            crate::residency::shmem_present(fd.as_fd(), *offset, size, page)
        } else {
            let pid = vmm_pid.ok_or_else(|| io::Error::other("the VMM's pid is unknown"))?;
            crate::residency::mapped_present(pid, region.hva.0, size, page)
        }
    }

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

/// The VM's store in `store`, opened afresh in `dir` if the session has none yet: a session
/// whose start had to stay minimal (Firecracker's) opens it at its first eviction or journal
/// record. `slot_bytes` is the VM's largest page, as for a store opened at session start.
fn open_store<'s>(
    store: &'s mut Option<Store>,
    dir: &std::path::Path,
    vm: &str,
    slot_bytes: u64,
) -> Result<&'s mut Store, crate::store::StoreError> {
    if store.is_none() {
        *store = Some(Store::open(dir, vm, slot_bytes, false)?.0);
    }
    Ok(store.as_mut().expect("opened above"))
}

/// The `outcome` label of a fill.
pub(crate) fn outcome_of(fill: Fill) -> FaultOutcome {
    match fill {
        Fill::Zero => FaultOutcome::Zero,
        Fill::File { .. } => FaultOutcome::File,
        Fill::Store { .. } => FaultOutcome::Store,
    }
}

/// A running fault thread; [`FaultThread::stop`] ends it.
#[derive(Debug)]
pub struct FaultThread {
    ctl: Arc<Control>,
    commands: Sender<Command>,
    handle: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Control {
    stop: AtomicBool,
    /// Set with `stop` when faultd stops but the VM does not: finish the device groups
    /// outstanding (for at most this long) and keep the store for a resume.
    handover: std::sync::Mutex<Option<Duration>>,
    /// Wakes the thread from poll(2): to stop, or to pick up a new device.
    event: EventFd,
}

impl FaultThread {
    /// Starts serving `server` on a new thread named after the session, spinning for `spin`
    /// after each burst of work before sleeping.
    pub fn spawn<O: UffdOps + Send + 'static>(
        mut server: FaultServer<O>,
        spin: Duration,
    ) -> io::Result<FaultThread> {
        let ctl = Arc::new(Control {
            stop: AtomicBool::new(false),
            handover: std::sync::Mutex::new(None),
            event: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        });
        let (tx, rx) = std::sync::mpsc::channel();
        server.new_devices = Some(rx);
        let name = format!("faultd-s{}", server.session.id());
        let c = ctl.clone();
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(server, spin, &c))?;
        Ok(FaultThread {
            ctl,
            commands: tx,
            handle: Some(handle),
        })
    }

    /// Hands a command to the thread; it runs at the thread's next wake-up, between faults.
    pub fn send(&self, command: Command) -> Result<(), Command> {
        self.commands.send(command).map_err(|e| e.0)?;
        let _ = self.ctl.event.write(1);
        Ok(())
    }

    /// A handle that hands commands to this thread from elsewhere (an operator's connection).
    pub fn commander(&self) -> Commander {
        Commander {
            ctl: self.ctl.clone(),
            commands: self.commands.clone(),
        }
    }

    /// Stops the thread and waits for it: the VM is gone. Outstanding device groups are
    /// answered and device mappings removed before it returns; the store is deleted.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    /// Stops the thread and waits for it while the VM lives on (faultd is stopping, or closed
    /// the session): for up to `drain`, outstanding device groups and faults are still served,
    /// then what is left is answered INVALID, device mappings are removed, and the store is
    /// kept (and synced) for the VMM to resume with.
    pub fn hand_over(mut self, drain: Duration) {
        *self.ctl.handover.lock().unwrap_or_else(|p| p.into_inner()) = Some(drain);
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.ctl.stop.store(true, Ordering::Release);
        let _ = self.ctl.event.write(1);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Hands commands to a fault thread without owning it: operator requests reach a session from
/// a connection other than the one that owns its [`FaultThread`]. Once the thread has ended,
/// sending fails.
#[derive(Debug, Clone)]
pub struct Commander {
    ctl: Arc<Control>,
    commands: Sender<Command>,
}

impl Commander {
    /// As [`FaultThread::send`].
    pub fn send(&self, command: Command) -> Result<(), Command> {
        self.commands.send(command).map_err(|e| e.0)?;
        let _ = self.ctl.event.write(1);
        Ok(())
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What a standby thread runs first: builds the server of the session it will serve (None:
/// there is none, e.g. the request was refused, and the thread ends).
pub type StandbyJob<O> = Box<dyn FnOnce() -> Option<FaultServer<O>> + Send>;

/// A fault thread created before its session exists, parked until it is given one.
///
/// Creating a thread costs tens to hundreds of microseconds here; a Firecracker restore waits
/// for its first pages from the moment it sends its message. So a Firecracker socket keeps one
/// standby thread, and the thread itself validates the message and starts serving: the
/// restore's first fault waits for one wake-up, not a thread creation and a hand-off.
#[derive(Debug)]
pub struct StandbyThread<O> {
    job: Sender<StandbyJob<O>>,
    ctl: Arc<Control>,
    commands: Sender<Command>,
    handle: Option<JoinHandle<()>>,
}

impl<O: UffdOps + Send + 'static> StandbyThread<O> {
    /// Creates the thread, named `name`; it will spin for `spin` after bursts of work.
    pub fn new(name: String, spin: Duration) -> io::Result<StandbyThread<O>> {
        let ctl = Arc::new(Control {
            stop: AtomicBool::new(false),
            handover: std::sync::Mutex::new(None),
            event: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        });
        let (job_tx, job_rx) = std::sync::mpsc::channel::<StandbyJob<O>>();
        let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
        let c = ctl.clone();
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            // Sender dropped (the socket closed) or no session: nothing to serve.
            let Some(mut server) = job_rx.recv().ok().and_then(|job| job()) else {
                return;
            };
            server.new_devices = Some(cmd_rx);
            run(server, spin, &c);
        })?;
        Ok(StandbyThread {
            job: job_tx,
            ctl,
            commands: cmd_tx,
            handle: Some(handle),
        })
    }

    /// Wakes the thread to run `job` and then serve the server it builds, if any. (An unused
    /// standby is just dropped: its job channel closes and the parked thread ends.)
    pub fn start(self, job: StandbyJob<O>) -> FaultThread {
        let StandbyThread {
            job: jobs,
            ctl,
            commands,
            handle,
        } = self;
        // A send fails only if the thread is gone (it panicked): the FaultThread joins it.
        let _ = jobs.send(job);
        FaultThread {
            ctl,
            commands,
            handle,
        }
    }
}

/// How long the fault thread keeps polling after work before it sleeps in poll(2).
///
/// Spinning pays only when the next fault comes before the spin ends; otherwise it burns a core
/// and the fault still pays the wake-up. So the window follows the source's pace: it keeps the
/// last [`GAPS`] gaps (idle time from the end of one burst of work to the start of the next),
/// and spins 1.5x the second-largest of them (robust to one idle outlier), at least
/// [`MIN_WINDOW`], as long as that fits the configured maximum; if it does not, faults come too
/// far apart to catch and it does not spin at all. Measured here (`cargo bench -p faultd-tests`):
/// a host thread bursting faults leaves ~10-15 us gaps, a KVM vCPU touching fresh memory
/// ~50-90 us (its exits are expensive under PVM), an isolated fault hundreds of us.
///
/// A short pace is not enough, though: the spin must also *catch* the fault, i.e. the faulter
/// must run on another CPU while this thread polls. The faulter is woken by this thread's own
/// UFFDIO_COPY, and the kernel often queues that wake-up on the waker's CPU (wake-affine; on a
/// busy machine there is no idle CPU to put it on). Then the spin cannot catch anything: either
/// the faulter preempts the spinner (the fault is then served as a sleeping thread would serve
/// it, at the CPU cost of the spin), or it does not, and waits behind the spinner until the
/// window ends, so the spin *delays* the fault it waits for by up to the whole window.
/// Measured (firecracker_restore scenario D: one PVM vCPU, another engineer's build on the other
/// CPU; sched tracepoints): the vCPU was woken onto the fault thread's CPU for 95% of its faults,
/// 5% of its wake-ups then waited > 50 µs to run (p99 164 µs; spin 0: 0.2%, p99 14 µs), 98% of
/// those until the spinner went to sleep; that alone made the restore 18% slower than spin 0.
/// The pace of such faults looks spinnable (the gaps are short), so the policy also keeps score
/// ([`SpinPolicy::record_spin`]): a spin *paid* if work arrived within the window while this
/// thread kept its CPU (no involuntary context switch). If fewer than half of the last
/// [`Payoff::HISTORY`] spins paid, it sleeps at once after work instead, and spins only on every
/// [`PROBE_EVERY`]th burst to notice when spinning pays again (say the other CPU became free).
#[derive(Debug, Clone)]
pub(crate) struct SpinPolicy {
    max: Duration,
    gaps: [Duration; GAPS],
    next: usize,
    /// Whether recent spins paid.
    score: Payoff,
}

/// Gaps remembered by [`SpinPolicy`].
const GAPS: usize = 8;
/// Shortest spin when spinning at all (back-to-back work records gaps of ~0).
const MIN_WINDOW: Duration = Duration::from_micros(10);
/// While spinning does not pay, one burst in this many spins anyway (a probe). A probe that
/// does not pay can delay the next fault by a whole window (the faulter queued behind it), up
/// to 200 µs against faults that come every 10-50 µs: probing every 4th burst made restores
/// several times slower. At most 4 paying probes (256 bursts) turn spinning back on.
const PROBE_EVERY: u32 = 64;

impl SpinPolicy {
    pub(crate) fn new(max: Duration) -> SpinPolicy {
        // Start as if faults came back to back and spinning paid: a VM starting up or
        // restoring faults densely.
        SpinPolicy {
            max,
            gaps: [Duration::ZERO; GAPS],
            next: 0,
            score: Payoff::new(true, PROBE_EVERY),
        }
    }

    pub(crate) fn record_gap(&mut self, gap: Duration) {
        self.gaps[self.next] = gap;
        self.next = (self.next + 1) % GAPS;
    }

    /// Records how a spin ended: `paid` if work came within the window while this thread kept
    /// its CPU.
    pub(crate) fn record_spin(&mut self, paid: bool) {
        self.score.record(paid);
    }

    /// The pace-based window: what to spin if spinning pays.
    pub(crate) fn window(&self) -> Duration {
        if self.max.is_zero() {
            return Duration::ZERO;
        }
        let mut sorted = self.gaps;
        sorted.sort_unstable();
        let want = (sorted[GAPS - 2] * 3 / 2).max(MIN_WINDOW);
        if want <= self.max {
            want
        } else {
            Duration::ZERO
        }
    }

    /// The window to spin after the burst that starts now: [`SpinPolicy::window`] if spinning
    /// pays or this burst is a probe, else none.
    pub(crate) fn next_window(&mut self) -> Duration {
        if self.score.try_now() {
            self.window()
        } else {
            Duration::ZERO
        }
    }
}

/// The score the fault thread keeps of a habit that pays only in some regimes (spinning after
/// work, [`SpinPolicy`]; reading before polling, [`ReadFirst`]): the outcomes of its last
/// [`Payoff::HISTORY`] tries. It pays while at least half of them did; while it does not, every
/// `probe_every`th burst tries it anyway, so a change of regime is noticed.
#[derive(Debug, Clone)]
pub(crate) struct Payoff {
    /// Outcomes of the last tries, newest in bit 0: 1 = it paid.
    paid: u8,
    /// Bursts since the last try while the habit does not pay.
    skipped: u32,
    probe_every: u32,
}

impl Payoff {
    /// Tries remembered.
    pub(crate) const HISTORY: u32 = u8::BITS;

    /// A score that starts as if every try had paid (`paying`) or none had.
    pub(crate) fn new(paying: bool, probe_every: u32) -> Payoff {
        Payoff {
            paid: if paying { u8::MAX } else { 0 },
            skipped: 0,
            probe_every,
        }
    }

    /// Records how a try ended.
    pub(crate) fn record(&mut self, paid: bool) {
        self.paid = (self.paid << 1) | u8::from(paid);
    }

    /// Whether at least half of the last [`Payoff::HISTORY`] tries paid.
    pub(crate) fn pays(&self) -> bool {
        self.paid.count_ones() * 2 >= Self::HISTORY
    }

    /// Whether to try after the burst that just ended: while it pays, or as a probe.
    pub(crate) fn try_now(&mut self) -> bool {
        if self.pays() {
            self.skipped = 0;
            return true;
        }
        self.skipped += 1;
        if self.skipped >= self.probe_every {
            self.skipped = 0;
            return true;
        }
        false
    }
}

/// Whether the fault thread, done with work and not spinning, reads the uffd once more before
/// it polls.
///
/// Two regimes meet here. Faults that come while the thread sleeps are best met by poll(2)
/// first: a read first would find nothing and cost each fault one more syscall (an EAGAIN
/// read, ~1 µs per fault measured here, 5-10% of a back-to-back restore). But when this thread
/// shares its CPU with the faulter (a busy machine, where spinning does not pay either), the
/// faulter preempts it as its UFFDIO_COPY wakes it, runs, faults again and sleeps, all before
/// this thread runs on: the next fault is then always pending when the thread looks, and poll(2)
/// first is the syscall too many (`firecracker_restore`, one CPU busy: the thread was preempted
/// on its COPY and found the next fault pending for nearly every fault of a restore).
///
/// So it keeps score as [`SpinPolicy`] does ([`Payoff`]): a read first *paid* if it found
/// work. It reads first while at least half of the last [`Payoff::HISTORY`] did, and otherwise
/// on every [`READ_PROBE_EVERY`]th burst only; a probe that finds nothing costs one EAGAIN read.
/// It starts as not paying: idle faults must not pay that read each.
#[derive(Debug, Clone)]
pub(crate) struct ReadFirst(Payoff);

/// While reading first does not pay, one burst in this many reads first anyway.
const READ_PROBE_EVERY: u32 = 16;

impl Default for ReadFirst {
    fn default() -> ReadFirst {
        ReadFirst(Payoff::new(false, READ_PROBE_EVERY))
    }
}

impl ReadFirst {
    /// Whether to read again before polling, after the burst that just ended.
    pub(crate) fn read_first(&mut self) -> bool {
        self.0.try_now()
    }

    /// Records whether a read first found work.
    pub(crate) fn record(&mut self, found: bool) {
        self.0.record(found);
    }
}

/// Involuntary context switches of the calling thread so far: one more means another thread
/// took this thread's CPU (in the spin: the faulter it woke, or anything else runnable here).
fn preemptions() -> i64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_THREAD).map_or(0, |u| u.involuntary_context_switches())
}

/// The adaptive polling loop: serve while work comes, spin for the [`SpinPolicy`] window after
/// the last of it, then sleep in poll(2) on the uffd, the device queues and the control eventfd.
fn run<O: UffdOps>(mut server: FaultServer<O>, spin: Duration, ctl: &Control) {
    server.session.watch.register_current_thread();
    let t0 = Instant::now();
    if let Some(r) = server.resume() {
        tracing::info!(
            session = server.session.id(),
            vm = server.session.vm(),
            present = r.present,
            stored = r.stored,
            zeroed = r.zeroed,
            unknown_records = r.unknown,
            took_us = t0.elapsed().as_micros() as u64,
            "resumed: page state rebuilt from guest memory and the store journal, waiters woken"
        );
    }
    let mut policy = SpinPolicy::new(spin);
    let mut last_work = Instant::now();
    let mut window = policy.window();
    // Whether the last iteration found work: a gap is measured from the end of a burst.
    let mut in_burst = false;
    // While spinning: the thread's involuntary context switches when the spin began (to tell
    // whether the spin paid, see SpinPolicy).
    let mut spinning: Option<i64> = None;
    let mut reads = ReadFirst::default();
    // Whether this pass reads the uffd right after work instead of polling first.
    let mut reading_first = false;
    let mut passes = 0u64;
    while !ctl.stop.load(Ordering::Acquire) {
        passes += 1;
        server.session.watch.busy(passes);
        match server.serve_ready() {
            Ok(0) if !server.has_retries() => {
                if std::mem::take(&mut reading_first) {
                    reads.record(false);
                }
                in_burst = false;
            }
            Ok(_) => {
                if std::mem::take(&mut reading_first) {
                    reads.record(true);
                }
                let now = Instant::now();
                if !in_burst {
                    if let Some(at_start) = spinning.take() {
                        // Work came within the window; it paid only if this thread held its
                        // CPU throughout (read after serving: off the fault's path).
                        policy.record_spin(preemptions() == at_start);
                    }
                    policy.record_gap(now - last_work);
                    window = policy.next_window();
                    in_burst = true;
                }
                last_work = now;
                if !window.is_zero() || server.has_retries() {
                    continue;
                }
                // No spin after this burst: read again first only where that finds work (see
                // ReadFirst), else sleep in poll(2) at once.
                in_burst = false;
                if reads.read_first() {
                    reading_first = true;
                    continue;
                }
            }
            Err(e) => {
                tracing::error!(
                    session = server.session.id(),
                    "reading the userfaultfd failed, fault service stops: {e}"
                );
                break;
            }
        }
        if last_work.elapsed() < window {
            if spinning.is_none() {
                spinning = Some(preemptions());
            }
            std::hint::spin_loop();
            continue;
        }
        if spinning.take().is_some() {
            policy.record_spin(false);
        }
        let mut fds = Vec::with_capacity(2 + server.devices.len());
        fds.push(PollFd::new(server.fd(), PollFlags::POLLIN));
        fds.push(PollFd::new(ctl.event.as_fd(), PollFlags::POLLIN));
        fds.extend(
            server
                .devices
                .iter()
                .filter(|d| !d.quarantined)
                .map(|d| PollFd::new(d.queue.fd(), PollFlags::POLLIN)),
        );
        server.session.watch.idle(passes);
        let timeout = if server.needs_idle_check() {
            PollTimeout::from(pageout::IDLE_CHECK.as_millis() as u16)
        } else {
            PollTimeout::NONE
        };
        let mut timed_out = false;
        match poll(&mut fds, timeout) {
            Ok(0) => timed_out = true,
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                tracing::error!(
                    session = server.session.id(),
                    "poll failed, fault service stops: {e}"
                );
                break;
            }
        }
        let hup = fds[0].revents().is_some_and(|r| {
            r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)
        });
        if fds[1]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLIN))
        {
            let _ = ctl.event.read();
        }
        drop(fds);
        if timed_out {
            // Nothing came: an anonymous-memory VM's pages may have been swapped back in.
            server.enforce(true);
        }
        if hup {
            tracing::debug!(session = server.session.id(), "userfaultfd hung up");
            break;
        }
    }
    let handover = *ctl.handover.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(drain) = handover {
        server.drain(drain);
    }
    server.shutdown_devices();
    if handover.is_some() {
        if let Some(store) = &mut server.store {
            store.keep();
            if let Err(e) = store.sync() {
                tracing::error!(session = server.session.id(), "syncing the store: {e}");
            }
        }
    }
    if let Some(b) = &server.budget {
        b.global.fetch_sub(b.reported, Ordering::Relaxed);
    }
    server.session.watch.exited();
}

mod pageout;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod spin_tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    fn policy_after(max_us: u64, gaps_us: &[u64]) -> Duration {
        let mut p = SpinPolicy::new(Duration::from_micros(max_us));
        for &g in gaps_us {
            p.record_gap(Duration::from_micros(g));
        }
        p.window()
    }

    #[test]
    fn back_to_back_work_spins_the_minimum() {
        assert_eq!(policy_after(200, &[0, 1, 0]), MIN_WINDOW);
    }

    #[test]
    fn steady_vcpu_pace_is_covered_with_margin() {
        assert_eq!(
            policy_after(200, &[52, 60, 48, 71, 55, 66, 58, 50]),
            US * 99
        );
    }

    #[test]
    fn one_idle_outlier_does_not_stop_spinning() {
        assert_eq!(
            policy_after(200, &[12, 10, 5000, 11, 9, 14, 10, 12]),
            US * 21
        );
    }

    #[test]
    fn isolated_faults_do_not_spin() {
        assert_eq!(
            policy_after(200, &[310, 305, 320, 300, 330, 301, 315, 309]),
            Duration::ZERO
        );
    }

    fn spins_after(policy: &mut SpinPolicy, bursts: usize) -> usize {
        (0..bursts)
            .filter(|_| !policy.next_window().is_zero())
            .count()
    }

    #[test]
    fn spins_that_do_not_pay_stop_spinning_but_for_probes() {
        let mut p = SpinPolicy::new(US * 200);
        assert!(p.score.pays(), "starts spinning");
        // Half of the remembered spins still paid: keep spinning.
        (0..4).for_each(|_| p.record_spin(false));
        assert!(p.score.pays());
        assert_eq!(spins_after(&mut p, 8), 8);
        p.record_spin(false);
        assert!(!p.score.pays());
        // One burst in PROBE_EVERY spins, with the pace-based window.
        assert_eq!(spins_after(&mut p, 16), 16 / PROBE_EVERY as usize);
        assert_eq!(p.window(), MIN_WINDOW);
    }

    #[test]
    fn paying_probes_turn_spinning_back_on() {
        let mut p = SpinPolicy::new(US * 200);
        (0..Payoff::HISTORY).for_each(|_| p.record_spin(false));
        for _ in 0..Payoff::HISTORY / 2 {
            assert!(!p.score.pays());
            p.record_spin(true);
        }
        assert!(p.score.pays());
        assert_eq!(spins_after(&mut p, 8), 8);
    }

    #[test]
    fn a_zero_maximum_never_spins() {
        assert_eq!(policy_after(0, &[0, 0]), Duration::ZERO);
    }

    /// Of `bursts` bursts, how many read first when each read finds work iff `found`.
    fn reads_first(r: &mut ReadFirst, bursts: usize, found: bool) -> usize {
        (0..bursts)
            .filter(|_| {
                let first = r.read_first();
                if first {
                    r.record(found);
                }
                first
            })
            .count()
    }

    #[test]
    fn reads_first_start_as_probes_only() {
        // Idle faults (the quiet default) must not pay an EAGAIN read each.
        let mut r = ReadFirst::default();
        assert_eq!(reads_first(&mut r, 160, false), 10);
    }

    #[test]
    fn reads_that_find_work_keep_reading_first() {
        let mut r = ReadFirst::default();
        // Probes that find work turn it on after 4 of them (half the history)...
        assert_eq!(reads_first(&mut r, 4 * READ_PROBE_EVERY as usize, true), 4);
        // ...and then every burst reads first while they keep finding work.
        assert_eq!(reads_first(&mut r, 100, true), 100);
    }

    #[test]
    fn reads_that_find_nothing_fall_back_to_poll_first() {
        let mut r = ReadFirst::default();
        for _ in 0..8 {
            r.record(true);
        }
        // The regime changed: after 5 misses fewer than half paid; then probes only.
        let n = reads_first(&mut r, 5 + 2 * READ_PROBE_EVERY as usize, false);
        assert_eq!(n, 5 + 2);
    }
}

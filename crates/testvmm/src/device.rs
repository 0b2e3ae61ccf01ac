//! An emulated PCIe device with PRI: a DMA engine in the VMM process whose every access to
//! guest RAM goes through the emulated IOMMU table that faultd maps granules in
//! (`docs/device-faults.md`), and whose translation misses become page-request groups on the
//! eventfd ring.
//!
//! The point is to exercise faultd's device path from a separate process exactly as a device
//! would: the device never touches a page it cannot translate, asks for the missing pages in
//! groups, waits for the one answer per group, and retries. Guest RAM is reached through the
//! VMM's own mapping of the memfd. That is sound only because faultd maps a granule only after
//! every page of it is resident, so the copy never faults into the userfaultfd; if faultd
//! broke that invariant the copy would block on a uffd fault (which faultd would then serve),
//! it would never read or write anything but guest RAM.
//!
//! Concurrency: any number of threads may run transfers, each on its own worker index (the
//! table's generation counters are per worker). Page requests share one ring producer behind a
//! mutex. Answers are dispatched by whichever waiting thread currently holds the "poller" role:
//! it polls the notify eventfd, collects every published answer and hands each to the thread
//! that waits for its cookie, so no thread is dedicated to the device. PRI credits bound the
//! page requests outstanding across all workers, as a real device's Page Request Capacity does.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use faultd_client::{ClientError, DeviceIommu, DeviceQueue, Session};
use iopf::emulated::{EmulatedIommu, EmulatedTable, IommuView, TableError, Worker, WorkerError};
use iopf::model::{GRPID_MASK, MAX_GROUP_PAGES, PAGE_SIZE};
use iopf::ring::{PostError, RingChannel, RingError, RingProducer};
use iopf::{DevId, Iova, Perm, ResponseCode};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// How long the thread holding the poller role sleeps in poll(2) at most before it looks at
/// its own deadline again and lets another waiter take over.
const POLL_SLICE: Duration = Duration::from_millis(20);
/// Rounds one page may be requested again after a SUCCESS that covered it before the transfer
/// gives up. A page can legitimately miss again after SUCCESS only if faultd unmapped it in
/// between (pin-limit eviction, a discard); doing so every time means no progress.
const MAX_REREQUESTS: u32 = 8;
/// Granules scanned past the first miss when gathering the pages of one group.
const GATHER_GRANULES: u64 = 64;

/// Shape and limits of a [`PriDevice`].
#[derive(Clone, Copy, Debug)]
pub struct DeviceConfig {
    /// The device id its page requests carry (and faultd attaches it under).
    pub dev_id: u32,
    /// log2 of the emulated IOMMU's granule, 12..=21 (16: 64 KiB).
    pub granule_shift: u32,
    /// DMA worker indices (one generation counter each in the table), 1..=16.
    pub workers: u32,
    /// Page requests outstanding at most, across all workers (PRI Page Request Capacity).
    /// At most `req_slots`, so posting never finds the request ring full.
    pub credits: u32,
    /// Request ring slots (power of two, 2..=4096).
    pub req_slots: u32,
    /// Response ring slots (power of two, 2..=4096).
    pub resp_slots: u32,
    /// Pages per group at most, 1..=min(credits, 512).
    pub max_group_pages: u32,
    /// How long a transfer waits for a credit or an answer before failing with
    /// [`DmaError::Timeout`]. faultd answers every group within its deadline, so this only
    /// fires if faultd is broken or gone.
    pub response_timeout: Duration,
    /// The emulated IOMMU translates `[lowest RAM gpa, iova_end)`; `None`: up to the end of
    /// the RAM. A larger window lets the device raise page requests for addresses outside the
    /// guest layout, which faultd must refuse.
    pub iova_end: Option<u64>,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        DeviceConfig {
            dev_id: 1,
            granule_shift: 16,
            workers: 2,
            credits: 32,
            req_slots: 64,
            resp_slots: 64,
            max_group_pages: 16,
            response_timeout: Duration::from_secs(5),
            iova_end: None,
        }
    }
}

/// One stretch of guest RAM the device can reach, and where the VMM has it mapped.
#[derive(Clone, Copy, Debug)]
pub struct RamRange {
    /// Guest physical address (== IOVA), aligned to the device's granule.
    pub gpa: u64,
    /// The VMM's mapping of it.
    pub host: NonNull<u8>,
    /// Bytes, a multiple of the device's granule.
    pub size: u64,
}

/// Why a device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A configuration value out of range.
    #[error("device configuration: {0}")]
    Config(String),
    /// Creating or opening the ring failed.
    #[error("page request ring")]
    Ring(#[from] RingError),
    /// Creating or opening the emulated IOMMU table failed.
    #[error("emulated IOMMU table")]
    Table(#[from] TableError),
    /// Taking a worker's generation counter failed.
    #[error("device worker")]
    Worker(#[from] WorkerError),
    /// Duplicating an fd failed.
    #[error("duplicating a device fd")]
    Io(#[from] io::Error),
}

/// Why a DMA transfer failed. Nothing was copied for the part of the transfer from `gpa` on.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// faultd answered INVALID to the group holding `gpa` (its first page).
    #[error("page request for {gpa:#x} answered INVALID")]
    Invalid {
        /// First page of the refused group.
        gpa: u64,
    },
    /// No credit or no answer within the response timeout.
    #[error("no answer to the page request for {gpa:#x} after {waited:?}")]
    Timeout {
        /// First page of the group (or of the miss, waiting for a credit).
        gpa: u64,
        /// How long it waited.
        waited: Duration,
    },
    /// The IOMMU translates `gpa`, but it is not RAM this device was given: faultd mapped
    /// something outside guest RAM. Nothing is copied.
    #[error("{gpa:#x} translates but is not guest RAM of this device")]
    Unbacked {
        /// The address.
        gpa: u64,
    },
    /// `gpa` kept missing after SUCCESS answers that covered it.
    #[error("{gpa:#x} still does not translate after {MAX_REREQUESTS} SUCCESS answers")]
    NoProgress {
        /// The page.
        gpa: u64,
    },
    /// The transfer's end is past 2^64.
    #[error("transfer {gpa:#x}+{len:#x} overflows")]
    Range {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// No such worker index.
    #[error("worker {0} does not exist")]
    NoWorker(u32),
    /// Posting a group failed.
    #[error("posting a page request group")]
    Post(#[source] PostError),
    /// Reading answers or waiting for them failed.
    #[error("collecting page request answers")]
    Ring(#[source] io::Error),
}

/// The device's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PriStats {
    /// Transfers completed.
    pub transfers: u64,
    /// Transfers failed.
    pub failed_transfers: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// Page requests (4 KiB pages) posted.
    pub requests: u64,
    /// Groups posted.
    pub groups: u64,
    /// Groups answered SUCCESS.
    pub success: u64,
    /// Groups answered INVALID.
    pub invalid: u64,
    /// Translations retried after an answer (one per SUCCESS a transfer resumed from).
    pub retries: u64,
    /// Pages of a SUCCESS group that did not translate right after the answer (faultd must
    /// answer only once every page is mapped: expected 0 without unmaps in between).
    pub unmapped_after_success: u64,
    /// Answers for cookies nobody waits for (duplicates, or after a timeout).
    pub stray_responses: u64,
    /// Waits that timed out.
    pub timeouts: u64,
    /// Most page requests outstanding at once.
    pub max_outstanding: u64,
    /// PRI resets ([`PriDevice::reset_pri`]).
    pub pri_resets: u64,
    /// Groups outstanding at a reset (their transfers translate again instead of waiting).
    pub reset_groups: u64,
}

#[derive(Debug, Default)]
struct Counters {
    transfers: AtomicU64,
    failed_transfers: AtomicU64,
    bytes: AtomicU64,
    requests: AtomicU64,
    groups: AtomicU64,
    success: AtomicU64,
    invalid: AtomicU64,
    retries: AtomicU64,
    unmapped_after_success: AtomicU64,
    stray_responses: AtomicU64,
    timeouts: AtomicU64,
    pri_resets: AtomicU64,
    reset_groups: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// The fds faultd needs to serve the device (`add_device`). The device keeps its own
/// duplicates: these may be closed once handed over.
#[derive(Debug)]
pub struct DeviceFds {
    ring: OwnedFd,
    kick: OwnedFd,
    notify: OwnedFd,
    table: OwnedFd,
}

impl DeviceFds {
    /// The ring memfd.
    pub fn ring(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }

    /// The producer's kick eventfd.
    pub fn kick(&self) -> BorrowedFd<'_> {
        self.kick.as_fd()
    }

    /// faultd's notify eventfd.
    pub fn notify(&self) -> BorrowedFd<'_> {
        self.notify.as_fd()
    }

    /// The emulated IOMMU table memfd.
    pub fn table(&self) -> BorrowedFd<'_> {
        self.table.as_fd()
    }

    /// The queue description for [`Session::add_device`].
    pub fn queue(&self) -> DeviceQueue<'_> {
        DeviceQueue::Ring {
            ring: self.ring(),
            kick: self.kick(),
            notify: self.notify(),
        }
    }

    /// The IOMMU description for [`Session::add_device`].
    pub fn iommu(&self) -> DeviceIommu<'_> {
        DeviceIommu::Emulated {
            table: self.table(),
        }
    }
}

/// RAM as the device holds it: addresses as numbers, so the device is Send and Sync without
/// claims about pointers (the contract is on [`PriDevice::with_ram`]).
#[derive(Clone, Copy, Debug)]
struct HostRange {
    gpa: u64,
    host: usize,
    size: u64,
}

/// The counting semaphore of PRI credits.
#[derive(Debug)]
struct Credits {
    state: Mutex<CreditState>,
    freed: Condvar,
}

#[derive(Debug)]
struct CreditState {
    free: u32,
    outstanding: u32,
    max_outstanding: u32,
}

impl Credits {
    fn new(n: u32) -> Credits {
        Credits {
            state: Mutex::new(CreditState {
                free: n,
                outstanding: 0,
                max_outstanding: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// Takes `n` credits at once (never part of them: two workers each holding half of what
    /// they need would wait for each other forever). False at the deadline.
    fn acquire(&self, n: u32, deadline: Instant) -> bool {
        let mut s = lock(&self.state);
        while s.free < n {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            s = self
                .freed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.free -= n;
        s.outstanding += n;
        s.max_outstanding = s.max_outstanding.max(s.outstanding);
        true
    }

    fn release(&self, n: u32) {
        let mut s = lock(&self.state);
        s.free += n;
        s.outstanding -= n;
        drop(s);
        self.freed.notify_all();
    }

    fn max_outstanding(&self) -> u32 {
        lock(&self.state).max_outstanding
    }
}

/// What ends the wait for a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// The page request handler answered.
    Code(ResponseCode),
    /// The device's page request state was reset: no answer will come; translate again.
    Reset,
}

/// Answers on their way to the threads waiting for them.
#[derive(Debug, Default)]
struct Dispatch {
    /// Cookies waited for, with the answer once it arrived.
    waiting: HashMap<u32, Option<Answer>>,
    /// Whether some waiter is polling the ring now.
    polling: bool,
}

/// Locks `m`, ignoring poisoning: every critical section here leaves consistent state (a
/// panicking test thread must not turn every other worker's wait into a second panic).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The emulated PRI-capable DMA device. See the module documentation.
#[derive(Debug)]
pub struct PriDevice {
    cfg: DeviceConfig,
    ram: Vec<HostRange>,
    granule: u64,
    iova_range: (u64, u64),
    fds: DeviceFds,
    workers: Vec<Mutex<Worker>>,
    producer: Mutex<RingProducer>,
    /// The IOMMU driver's end of the table, for [`PriDevice::reset_pri`].
    iommu: Mutex<EmulatedIommu>,
    /// The device's own duplicate of the notify eventfd, polled without the producer lock.
    notify: OwnedFd,
    dispatch: Mutex<Dispatch>,
    answered: Condvar,
    credits: Credits,
    next_grpid: AtomicU32,
    counters: Counters,
}

/// Direction of a transfer.
enum Dir<'a> {
    /// Device writes guest RAM from this buffer.
    Write(&'a [u8]),
    /// Device reads guest RAM into this buffer.
    Read(&'a mut [u8]),
}

impl Dir<'_> {
    fn len(&self) -> usize {
        match self {
            Dir::Write(b) => b.len(),
            Dir::Read(b) => b.len(),
        }
    }

    fn is_write(&self) -> bool {
        matches!(self, Dir::Write(_))
    }
}

impl PriDevice {
    /// A device over one stretch of guest RAM: `ram_size` bytes at `ram_gpa`, mapped in this
    /// process at `ram_host`. Creates the ring and the table; hand [`PriDevice::fds`] to
    /// faultd (or call [`PriDevice::attach`]).
    ///
    /// # Safety
    /// `ram_host .. ram_host + ram_size` must be a mapping that stays valid (mapped,
    /// read-write) for the device's lifetime, and no Rust reference may point into it: the
    /// device writes it from any thread.
    pub unsafe fn new(
        ram_host: NonNull<u8>,
        ram_gpa: u64,
        ram_size: u64,
        cfg: DeviceConfig,
    ) -> Result<PriDevice, DeviceError> {
        let ram = [RamRange {
            gpa: ram_gpa,
            host: ram_host,
            size: ram_size,
        }];
        // SAFETY: the caller's contract is exactly with_ram's for this one range.
        unsafe { PriDevice::with_ram(&ram, cfg) }
    }

    /// A device over several stretches of guest RAM (e.g. a RAM region and a read-only one).
    /// The table translates from the lowest `gpa` to the end of the highest range (or to
    /// `cfg.iova_end` if that is further).
    ///
    /// # Safety
    /// Every `host .. host + size` must be a mapping that stays valid (mapped, read-write or,
    /// for ranges the device is only ever asked to read, readable) for the device's lifetime,
    /// and no Rust reference may point into any of them: the device accesses them from any
    /// thread.
    pub unsafe fn with_ram(ram: &[RamRange], cfg: DeviceConfig) -> Result<PriDevice, DeviceError> {
        let bad = |why: String| Err(DeviceError::Config(why));
        if !(12..=21).contains(&cfg.granule_shift) {
            return bad(format!(
                "granule shift {} outside 12..=21",
                cfg.granule_shift
            ));
        }
        let granule = 1u64 << cfg.granule_shift;
        if cfg.credits == 0 || cfg.credits > cfg.req_slots {
            return bad(format!(
                "{} credits: must be 1..=req_slots ({})",
                cfg.credits, cfg.req_slots
            ));
        }
        let max_group = cfg.credits.min(MAX_GROUP_PAGES as u32);
        if cfg.max_group_pages == 0 || cfg.max_group_pages > max_group {
            return bad(format!(
                "{} pages per group: must be 1..={max_group}",
                cfg.max_group_pages
            ));
        }
        if ram.is_empty() {
            return bad("no RAM".into());
        }
        let mut sorted: Vec<HostRange> = ram
            .iter()
            .map(|r| HostRange {
                gpa: r.gpa,
                host: r.host.as_ptr() as usize,
                size: r.size,
            })
            .collect();
        sorted.sort_by_key(|r| r.gpa);
        for (i, r) in sorted.iter().enumerate() {
            if r.size == 0 || (r.gpa | r.size) & (granule - 1) != 0 {
                return bad(format!(
                    "RAM {:#x}+{:#x} is empty or not aligned to the granule {granule:#x}",
                    r.gpa, r.size
                ));
            }
            if r.gpa.checked_add(r.size).is_none() {
                return bad(format!("RAM {:#x}+{:#x} overflows", r.gpa, r.size));
            }
            if i > 0 && sorted[i - 1].gpa + sorted[i - 1].size > r.gpa {
                return bad(format!("RAM at {:#x} overlaps the range before it", r.gpa));
            }
        }
        let base = sorted[0].gpa;
        let last = sorted[sorted.len() - 1];
        let end = cfg
            .iova_end
            .unwrap_or(0)
            .max(last.gpa + last.size)
            .checked_next_multiple_of(granule)
            .ok_or_else(|| DeviceError::Config("IOVA window overflows".into()))?;
        let entries = (end - base) >> cfg.granule_shift;

        let channel = RingChannel::create(cfg.req_slots, cfg.resp_slots)?;
        let table = EmulatedTable::create(cfg.granule_shift, cfg.workers, Iova(base), entries)?;
        let kick = OwnedFd::from(channel.kick);
        let notify = OwnedFd::from(channel.notify);
        let producer = RingProducer::new(
            channel.memfd.try_clone()?,
            kick.try_clone()?,
            notify.try_clone()?,
        )?;
        let view = IommuView::from_fd(table.try_clone()?)?;
        let iommu = EmulatedIommu::from_fd(table.try_clone()?)?;
        let workers = (0..cfg.workers)
            .map(|w| view.worker(w).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PriDevice {
            cfg,
            ram: sorted,
            granule,
            iova_range: (base, end),
            notify: notify.try_clone()?,
            fds: DeviceFds {
                ring: channel.memfd,
                kick,
                notify,
                table,
            },
            workers,
            producer: Mutex::new(producer),
            iommu: Mutex::new(iommu),
            dispatch: Mutex::new(Dispatch::default()),
            answered: Condvar::new(),
            credits: Credits::new(cfg.credits),
            next_grpid: AtomicU32::new(0),
            counters: Counters::default(),
        })
    }

    /// The fds to hand to faultd.
    pub fn fds(&self) -> &DeviceFds {
        &self.fds
    }

    /// Attaches the device to a faultd session. Returns the granule faultd maps at (the
    /// table's).
    pub fn attach(&self, session: &mut Session) -> Result<u64, ClientError> {
        session.add_device(self.cfg.dev_id, self.fds.queue(), self.fds.iommu())
    }

    /// The configuration.
    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// Bytes per IOMMU granule.
    pub fn granule(&self) -> u64 {
        self.granule
    }

    /// The IOVA window the table translates, `[start, end)`.
    pub fn iova_range(&self) -> (u64, u64) {
        self.iova_range
    }

    /// The device's counters.
    pub fn stats(&self) -> PriStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PriStats {
            transfers: get(&c.transfers),
            failed_transfers: get(&c.failed_transfers),
            bytes: get(&c.bytes),
            requests: get(&c.requests),
            groups: get(&c.groups),
            success: get(&c.success),
            invalid: get(&c.invalid),
            retries: get(&c.retries),
            unmapped_after_success: get(&c.unmapped_after_success),
            stray_responses: get(&c.stray_responses),
            timeouts: get(&c.timeouts),
            max_outstanding: self.credits.max_outstanding().into(),
            pri_resets: get(&c.pri_resets),
            reset_groups: get(&c.reset_groups),
        }
    }

    /// Resets the device's page request interface, as a host does (PRI Control: clear Enable,
    /// set Reset) when the handler of its page requests died with requests unanswered: every
    /// translation is taken away (the dead handler's mappings are tracked by nobody now, and
    /// the next one must not find pages it does not know to be pinned), and every group still
    /// waiting is forgotten, its credits returned, its transfer translating again, so that it
    /// asks the next handler. Answers the old handler left in the ring then find no waiter
    /// and are counted as stray.
    ///
    /// Call it before attaching the device to a new handler. Returns the granules unmapped.
    pub fn reset_pri(&self) -> Result<u64, iopf::MapError> {
        let cleared = lock(&self.iommu).unmap_all()?;
        let mut d = lock(&self.dispatch);
        let mut reset = 0;
        for answer in d.waiting.values_mut().filter(|a| a.is_none()) {
            *answer = Some(Answer::Reset);
            reset += 1;
        }
        drop(d);
        self.answered.notify_all();
        bump(&self.counters.pri_resets, 1);
        bump(&self.counters.reset_groups, reset);
        Ok(cleared)
    }

    /// Device writes `data` to guest RAM at `gpa`, on worker `worker`.
    pub fn dma_write(&self, worker: u32, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        self.transfer(worker, gpa, Dir::Write(data))
    }

    /// Device reads guest RAM at `gpa` into `buf`, on worker `worker`.
    pub fn dma_read(&self, worker: u32, gpa: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.transfer(worker, gpa, Dir::Read(buf))
    }

    /// Whether every granule of `[gpa, gpa+len)` translates now with the permission an access
    /// of that kind needs (no page request is raised).
    pub fn translates(
        &self,
        worker: u32,
        gpa: u64,
        len: u64,
        write: bool,
    ) -> Result<bool, DmaError> {
        let end = gpa.checked_add(len).ok_or(DmaError::Range { gpa, len })?;
        let mut w = lock(
            self.workers
                .get(worker as usize)
                .ok_or(DmaError::NoWorker(worker))?,
        );
        let access = w.begin_access();
        let mut at = gpa & !(self.granule - 1);
        while at < end {
            if !access.translate(Iova(at), write) {
                return Ok(false);
            }
            at += self.granule;
        }
        Ok(true)
    }

    fn transfer(&self, worker: u32, gpa: u64, mut dir: Dir<'_>) -> Result<(), DmaError> {
        let len = dir.len() as u64;
        let result = self.run_transfer(worker, gpa, &mut dir);
        let c = &self.counters;
        match &result {
            Ok(()) => {
                bump(&c.transfers, 1);
                bump(&c.bytes, len);
            }
            Err(_) => bump(&c.failed_transfers, 1),
        }
        result
    }

    fn run_transfer(&self, worker: u32, gpa: u64, dir: &mut Dir<'_>) -> Result<(), DmaError> {
        let len = dir.len() as u64;
        let end = gpa.checked_add(len).ok_or(DmaError::Range { gpa, len })?;
        let write = dir.is_write();
        let mut w = lock(
            self.workers
                .get(worker as usize)
                .ok_or(DmaError::NoWorker(worker))?,
        );
        // Pages a SUCCESS answer covered in this transfer, and how often they missed since.
        let mut granted: HashMap<u64, u32> = HashMap::new();
        let mut pos = gpa;
        while pos < end {
            let seg_end = ((pos & !(self.granule - 1)) + self.granule).min(end);
            let mut misses = Vec::new();
            {
                // One access per granule: translations stay valid while the guard lives, and
                // faultd's unmap waits for it, so keep it to one granule's copy.
                let access = w.begin_access();
                if access.translate(Iova(pos), write) {
                    self.copy(pos, seg_end, gpa, dir)?;
                    drop(access);
                    pos = seg_end;
                    continue;
                }
                self.gather_misses(&access, pos, end, write, &mut misses);
            }
            for &page in &misses {
                if let Some(n) = granted.get_mut(&page) {
                    *n += 1;
                    if *n > MAX_REREQUESTS {
                        return Err(DmaError::NoProgress { gpa: page });
                    }
                }
            }
            self.request(&mut w, &misses, write)?;
            for page in misses {
                granted.entry(page).or_insert(0);
            }
            bump(&self.counters.retries, 1);
        }
        Ok(())
    }

    /// Pages of the transfer from `pos` (which missed) on whose granule does not translate,
    /// at most `max_group_pages`, scanning a bounded number of granules.
    fn gather_misses(
        &self,
        access: &iopf::emulated::Access<'_>,
        pos: u64,
        end: u64,
        write: bool,
        out: &mut Vec<u64>,
    ) {
        let max = self.cfg.max_group_pages as usize;
        let first_granule = pos & !(self.granule - 1);
        let scan_end = end.min(first_granule.saturating_add(GATHER_GRANULES * self.granule));
        let mut granule = first_granule;
        while granule < scan_end && out.len() < max {
            let from = granule.max(pos);
            let to = (granule + self.granule).min(scan_end);
            if !access.translate(Iova(granule), write) {
                let mut page = from & !(PAGE_SIZE - 1);
                while page < to && out.len() < max {
                    out.push(page);
                    page += PAGE_SIZE;
                }
            }
            granule += self.granule;
        }
    }

    /// Copies `[from, to)` (inside one translated granule) between guest RAM and the
    /// transfer's buffer, whose first byte is at `start`.
    fn copy(&self, from: u64, to: u64, start: u64, dir: &mut Dir<'_>) -> Result<(), DmaError> {
        let r = self
            .ram
            .iter()
            .find(|r| r.gpa <= from && to <= r.gpa + r.size)
            .ok_or(DmaError::Unbacked { gpa: from })?;
        let host = r.host + (from - r.gpa) as usize;
        let n = (to - from) as usize;
        let off = (from - start) as usize;
        match dir {
            // SAFETY: `host .. host+n` lies inside one RAM range (found above), which the
            // creator of the device promised stays mapped and unreferenced by Rust for the
            // device's lifetime; the buffer slice is in bounds (from..to is inside the
            // transfer). The IOMMU translated this granule inside the live access, and faultd
            // maps only granules whose every page is resident, so the copy does not fault (and
            // if it did, it would wait for faultd to fill the page, never touch other memory).
            Dir::Write(src) => unsafe {
                std::ptr::copy_nonoverlapping(src[off..off + n].as_ptr(), host as *mut u8, n)
            },
            // SAFETY: as above, copying the other way.
            Dir::Read(dst) => unsafe {
                std::ptr::copy_nonoverlapping(host as *const u8, dst[off..off + n].as_mut_ptr(), n)
            },
        }
        Ok(())
    }

    /// Posts one group for `pages`, waits for its answer, and checks that a SUCCESS left every
    /// page translated.
    fn request(&self, w: &mut Worker, pages: &[u64], write: bool) -> Result<(), DmaError> {
        let first = pages[0];
        let n = pages.len() as u32;
        let started = Instant::now();
        let deadline = started + self.cfg.response_timeout;
        let timeout = |c: &Counters| {
            bump(&c.timeouts, 1);
            DmaError::Timeout {
                gpa: first,
                waited: started.elapsed(),
            }
        };
        if !self.credits.acquire(n, deadline) {
            return Err(timeout(&self.counters));
        }
        let perm = if write {
            Perm::WRITE | Perm::READ
        } else {
            Perm::READ
        };
        let group: Vec<(Iova, Perm)> = pages.iter().map(|&p| (Iova(p), perm)).collect();
        let answer = self
            .post(&group, deadline)
            .and_then(|cookie| self.wait(cookie, deadline));
        self.credits.release(n);
        let c = &self.counters;
        match answer {
            Ok(Answer::Reset) => Ok(()),
            Ok(Answer::Code(ResponseCode::Success)) => {
                bump(&c.success, 1);
                let access = w.begin_access();
                let missing = pages
                    .iter()
                    .filter(|&&p| !access.translate(Iova(p), write))
                    .count();
                bump(&c.unmapped_after_success, missing as u64);
                Ok(())
            }
            Ok(Answer::Code(ResponseCode::Invalid)) => {
                bump(&c.invalid, 1);
                Err(DmaError::Invalid { gpa: first })
            }
            Err(None) => Err(timeout(c)),
            Err(Some(e)) => Err(e),
        }
    }

    /// Publishes the group and registers its cookie as waited for. Err(None) at the deadline.
    fn post(&self, group: &[(Iova, Perm)], deadline: Instant) -> Result<u32, Option<DmaError>> {
        let grpid = self.next_grpid.fetch_add(1, Ordering::Relaxed) & GRPID_MASK;
        loop {
            let mut producer = lock(&self.producer);
            match producer.post_group(DevId(self.cfg.dev_id), grpid, group) {
                // The group is published even if the kick failed; faultd's next read finds it
                // (a failing eventfd write is not something to recover from here anyway).
                Ok(cookie) => {
                    // Registered before the producer lock is released: the answer can only be
                    // collected under that lock, so it cannot arrive before the registration.
                    lock(&self.dispatch).waiting.insert(cookie, None);
                    drop(producer);
                    let c = &self.counters;
                    bump(&c.groups, 1);
                    bump(&c.requests, group.len() as u64);
                    return Ok(cookie);
                }
                // Credits never exceed req_slots, so this is faultd not consuming: wait a bit.
                Err(PostError::Full { .. }) => {
                    drop(producer);
                    if Instant::now() >= deadline {
                        return Err(None);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(Some(DmaError::Post(e))),
            }
        }
    }

    /// Waits for the answer to `cookie`, taking the poller role when nobody has it.
    /// Err(None) at the deadline.
    fn wait(&self, cookie: u32, deadline: Instant) -> Result<Answer, Option<DmaError>> {
        let mut d = lock(&self.dispatch);
        loop {
            if let Some(Some(code)) = d.waiting.get(&cookie) {
                let code = *code;
                d.waiting.remove(&cookie);
                return Ok(code);
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                // Forget the cookie: a late answer is then counted as stray.
                d.waiting.remove(&cookie);
                return Err(None);
            };
            if d.polling {
                d = self
                    .answered
                    .wait_timeout(d, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
            d.polling = true;
            drop(d);
            let mut got = Vec::new();
            let polled = self.poll_answers(left.min(POLL_SLICE), &mut got);
            d = lock(&self.dispatch);
            d.polling = false;
            for (c, code) in got {
                match d.waiting.get_mut(&c) {
                    Some(slot @ None) => *slot = Some(Answer::Code(code)),
                    _ => bump(&self.counters.stray_responses, 1),
                }
            }
            // Wake every waiter: answers may be theirs, and one must take over polling.
            self.answered.notify_all();
            if let Err(e) = polled {
                d.waiting.remove(&cookie);
                return Err(Some(DmaError::Ring(e)));
            }
        }
    }

    /// Collects published answers; if there are none, sleeps on the notify eventfd for at
    /// most `slice` and collects again.
    fn poll_answers(&self, slice: Duration, out: &mut Vec<(u32, ResponseCode)>) -> io::Result<()> {
        lock(&self.producer).poll_responses(out)?;
        if !out.is_empty() {
            return Ok(());
        }
        // poll_responses drained the eventfd before loading faultd's index, so an answer
        // published after that load has rung it again: this poll cannot miss it.
        let ms = u16::try_from(slice.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.notify.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        lock(&self.producer).poll_responses(out)
    }
}

#[cfg(test)]
mod tests;

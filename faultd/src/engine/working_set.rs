//! Working-set recording and replay: the order in which a restore's guest first touches
//! snapshot pages, kept per snapshot contents, and installed ahead of the guest on the next
//! restore of that snapshot.
//!
//! **Record.** From the session's start, every page filled from the snapshot for a demand fault
//! (a vCPU fault or a device page request; never a page replay installs) appends its file
//! offset, until `working_set.record_pages` pages or `working_set.record_ms` have passed. The
//! recording is then written (off the fault thread) to the [`Library`](super::ws_library::Library), keyed by the session
//! owner's uid and the snapshot's SHA-256 digest ([`crate::engine::snapshots`]). A session that
//! replays a recording records nothing.
//!
//! **Replay.** When the fault thread has nothing pending, it installs the next few recorded
//! pages ([`SLICE_PAGES`] at most, then it looks at its sources again: a ready fault never
//! waits for more than one slice), contiguous runs in one `UFFDIO_COPY`. A page is installed
//! only if s2map has it absent and to be filled from the snapshot: a page the VM has, a page
//! it discarded (s2map then fills it with zeros) or one in the store is skipped. A copy that
//! fails with EAGAIN (a layout event unread) is aborted and the page tried again after the
//! events are read, so a discarded range is never filled again. Replay stops when the
//! recording is done, when demand faults come mostly outside it ("wrong"), when the VM's
//! budget has no room below its low watermark, or when the VMM finishes the session.
//!
//! faultd cannot see the guest touch a page it installed ahead (no accessed bits, and no
//! `page_idle` on this kernel), so it counts what it sees: pages prefetched, demand faults on
//! recorded pages not installed yet (late) and outside the recording (misses).
//!
//! **Format** (version 1, little-endian; `docs/protocol.md` has the same):
//!
//! | bytes | what |
//! |---|---|
//! | 0..8 | magic `FAULTDWS` |
//! | 8..12 | version, 1 |
//! | 12..16 | page size of the offsets, 4096 |
//! | 16..24 | snapshot file size, bytes |
//! | 24..56 | SHA-256 of the snapshot file's contents |
//! | 56..64 | count N of offsets, at most 1048576 |
//! | 64..64+8N | file offsets of the pages, in first-touch order: page aligned, below the file size, no repeats |
//! | last 32 | SHA-256 of all the bytes before |
//!
//! Zero pages are not in the format: whoever serves the snapshot finds them in it.

use faultd_proto::WorkingSetStats;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Why replay stopped, as stored in [`WsCounters::stop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ReplayStop {
    /// Still running, or none.
    None = 0,
    /// Every recorded page was installed or skipped.
    Done = 1,
    /// Demand faults came mostly outside the recording.
    Wrong = 2,
    /// The VM's budget left no room.
    Budget = 3,
    /// The VMM finished the session.
    Finished = 4,
    /// An install failed.
    Error = 5,
}

impl ReplayStop {
    fn name(code: u64) -> &'static str {
        match code {
            1 => "done",
            2 => "wrong",
            3 => "budget",
            4 => "finished",
            5 => "error",
            _ => "",
        }
    }
}

/// A session's working-set counters, updated by its fault thread.
#[derive(Debug, Default)]
pub struct WsCounters {
    /// Pages recorded.
    pub recorded: AtomicU64,
    /// Pages in the recording replayed.
    pub replay_pages: AtomicU64,
    /// Pages installed from the recording.
    pub prefetched: AtomicU64,
    /// Recorded pages skipped.
    pub skipped: AtomicU64,
    /// Demand faults on recorded pages not yet installed.
    pub late: AtomicU64,
    /// Demand faults on snapshot pages outside the recording.
    pub misses: AtomicU64,
    /// A [`ReplayStop`].
    pub stop: AtomicU64,
    /// Microseconds from session start to replay's end.
    pub replay_us: AtomicU64,
}

impl WsCounters {
    /// The counters for the control protocol, with `zero_pages` (counted elsewhere).
    pub fn read(&self, zero_pages: u64) -> WorkingSetStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkingSetStats {
            zero_pages,
            recorded: get(&self.recorded),
            replay_pages: get(&self.replay_pages),
            prefetched: get(&self.prefetched),
            skipped: get(&self.skipped),
            late: get(&self.late),
            misses: get(&self.misses),
            replay_stop: ReplayStop::name(get(&self.stop)).to_owned(),
            replay_us: get(&self.replay_us),
        }
    }
}

/// Magic of a recording.
pub const MAGIC: [u8; 8] = *b"FAULTDWS";
/// The format version written and read.
pub const VERSION: u32 = 1;
/// Header bytes.
const HEADER: usize = 64;
/// Trailer (checksum) bytes.
const TRAILER: usize = 32;
/// Granule of the offsets.
pub const PAGE: u64 = 4096;
/// Most offsets one recording holds.
pub const MAX_PAGES: u64 = crate::ops::config::MAX_RECORD_PAGES;
/// Most bytes of an encoded recording.
pub const MAX_BYTES: usize = HEADER + 8 * MAX_PAGES as usize + TRAILER;
/// Pages one replay slice installs at most before the sources are looked at again.
pub const SLICE_PAGES: usize = 64;
/// Pages one UFFDIO_COPY of a run installs at most.
pub const RUN_PAGES: usize = 16;
/// Demand faults seen during replay before it may be judged wrong.
pub const JUDGE_AFTER: u64 = 32;

/// A working-set recording: the snapshot it is of, and its pages in first-touch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recording {
    /// The snapshot file's size.
    pub snapshot_size: u64,
    /// The snapshot file's SHA-256.
    pub digest: [u8; 32],
    /// File offsets of the pages.
    pub offsets: Vec<u64>,
}

/// Why bytes are not a recording.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than a header and trailer, or longer than any recording.
    #[error("{0} bytes is not the size of a recording ({min}..={MAX_BYTES})", min = HEADER + TRAILER)]
    Size(usize),
    /// Not the magic.
    #[error("not a faultd working-set recording (bad magic)")]
    Magic,
    /// A version this faultd does not read.
    #[error("recording format version {0}; this faultd reads version {VERSION}")]
    Version(u32),
    /// Another page size.
    #[error("page size {0}; only 4096 is read")]
    PageSize(u32),
    /// The count does not match the length, or is beyond the bound.
    #[error("the header counts {count} pages but the recording has room for {room}")]
    Count {
        /// Counted.
        count: u64,
        /// Present.
        room: u64,
    },
    /// The checksum is wrong.
    #[error("checksum mismatch: the recording is damaged")]
    Checksum,
    /// An offset is not page aligned, beyond the snapshot, or repeated.
    #[error("entry {index}: offset {offset:#x} is {why}")]
    Offset {
        /// Entry.
        index: usize,
        /// Offset.
        offset: u64,
        /// What is wrong with it.
        why: &'static str,
    },
}

impl Recording {
    /// The recording in the file format.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + 8 * self.offsets.len() + TRAILER);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(PAGE as u32).to_le_bytes());
        out.extend_from_slice(&self.snapshot_size.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&(self.offsets.len() as u64).to_le_bytes());
        for o in &self.offsets {
            out.extend_from_slice(&o.to_le_bytes());
        }
        let sum: [u8; 32] = Sha256::digest(&out).into();
        out.extend_from_slice(&sum);
        out
    }

    /// Reads a recording, checking every byte (bounded: nothing is allocated beyond what
    /// `bytes` holds).
    pub fn decode(bytes: &[u8]) -> Result<Recording, DecodeError> {
        if bytes.len() < HEADER + TRAILER || bytes.len() > MAX_BYTES {
            return Err(DecodeError::Size(bytes.len()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or_default());
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or_default());
        if bytes[..8] != MAGIC {
            return Err(DecodeError::Magic);
        }
        if u32_at(8) != VERSION {
            return Err(DecodeError::Version(u32_at(8)));
        }
        if u32_at(12) as u64 != PAGE {
            return Err(DecodeError::PageSize(u32_at(12)));
        }
        let count = u64_at(56);
        let room = ((bytes.len() - HEADER - TRAILER) / 8) as u64;
        if count != room || !(bytes.len() - HEADER - TRAILER).is_multiple_of(8) || count > MAX_PAGES
        {
            return Err(DecodeError::Count { count, room });
        }
        let body = bytes.len() - TRAILER;
        let sum: [u8; 32] = Sha256::digest(&bytes[..body]).into();
        if sum[..] != bytes[body..] {
            return Err(DecodeError::Checksum);
        }
        let snapshot_size = u64_at(16);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&bytes[24..56]);
        let mut seen = HashSet::with_capacity(count as usize);
        let mut offsets = Vec::with_capacity(count as usize);
        for index in 0..count as usize {
            let offset = u64_at(HEADER + 8 * index);
            let why = if !offset.is_multiple_of(PAGE) {
                Some("not page aligned")
            } else if offset >= snapshot_size {
                Some("beyond the snapshot")
            } else if !seen.insert(offset) {
                Some("repeated")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(DecodeError::Offset { index, offset, why });
            }
            offsets.push(offset);
        }
        Ok(Recording {
            snapshot_size,
            digest,
            offsets,
        })
    }
}

/// Working-set settings of a server (from config `[working_set]`).
#[derive(Clone, Debug)]
pub struct WsConfig {
    /// Record.
    pub record: bool,
    /// Pages per recording.
    pub record_pages: u64,
    /// How long after the start.
    pub record_for: std::time::Duration,
    /// Replay.
    pub replay: bool,
    /// Where recordings are.
    pub library: Arc<super::ws_library::Library>,
}

/// One session's recording in progress.
#[derive(Debug)]
struct Recorder {
    offsets: Vec<u64>,
    seen: HashSet<u64>,
    max: u64,
    until: Instant,
    done: bool,
}

/// One session's replay in progress.
#[derive(Debug)]
struct Replay {
    rec: Arc<Recording>,
    next: usize,
    /// Offsets of the recording not yet processed.
    pending: HashSet<u64>,
    /// Every offset of the recording.
    all: HashSet<u64>,
    /// Demand fills during replay, and those outside the recording.
    demand: u64,
    misses: u64,
    failures: u32,
}

/// A server's working-set state (none unless configured: [`FaultServer::with_working_set`]).
#[derive(Debug, Default)]
pub(crate) struct WsState {
    cfg: Option<WsConfig>,
    started: Option<Instant>,
    recorder: Option<Recorder>,
    replay: Option<Replay>,
    /// Whether the library was asked for a recording (once the digest is known).
    looked_up: bool,
    /// Set while replay installs: [`FaultServer::install`] is then not a demand fill.
    pub(crate) prefetching: bool,
    /// The pages of the recording replay ended with: demand fills outside them are still
    /// counted as misses.
    replayed: Option<HashSet<u64>>,
}

use super::{FaultServer, InstallFail};
use crate::engine::session::{Counters, Located};
use crate::kernel::uffd::{OpError, UffdOps};
use s2map::{Begin, Fill, PageRef, PageState};

impl<O: UffdOps> FaultServer<O> {
    /// Records and replays working sets as `cfg` says.
    pub fn with_working_set(mut self, cfg: WsConfig) -> Self {
        let now = Instant::now();
        if cfg.record && self.session.snapshot().is_some() {
            self.ws.recorder = Some(Recorder {
                offsets: Vec::new(),
                seen: HashSet::new(),
                max: cfg.record_pages.min(MAX_PAGES),
                until: now + cfg.record_for,
                done: false,
            });
        }
        self.ws.started = Some(now);
        self.ws.cfg = Some(cfg);
        self
    }

    /// Called by [`FaultServer::install`] for every page it filled from the snapshot at
    /// `offset`: a demand fill unless replay is installing.
    pub(crate) fn ws_filled(&mut self, offset: u64) {
        // Replay's own installs, and `finish` filling every page, are not the guest's touches.
        if self.ws.prefetching || self.finished {
            return;
        }
        let c = &self.session.counters.ws;
        if let Some(r) = &mut self.ws.replay {
            r.demand += 1;
            if r.pending.contains(&offset) {
                Counters::bump(&c.late);
            } else if !r.all.contains(&offset) {
                r.misses += 1;
                Counters::bump(&c.misses);
            }
        } else if let Some(all) = &self.ws.replayed {
            if !all.contains(&offset) {
                Counters::bump(&c.misses);
            }
        }
        let Some(rec) = &mut self.ws.recorder else {
            return;
        };
        if rec.done {
            return;
        }
        if Instant::now() >= rec.until || rec.offsets.len() as u64 >= rec.max {
            self.ws_save();
            return;
        }
        if rec.seen.insert(offset) {
            rec.offsets.push(offset);
            Counters::bump(&c.recorded);
        }
    }

    /// Ends the recording and hands it to a thread that writes it (nothing is written without
    /// pages, or before the snapshot's digest is known).
    pub(crate) fn ws_save(&mut self) {
        let Some(rec) = self.ws.recorder.as_mut().filter(|r| !r.done) else {
            return;
        };
        rec.done = true;
        let offsets = std::mem::take(&mut rec.offsets);
        rec.seen = HashSet::new();
        let (Some(cfg), Some(scan)) = (
            &self.ws.cfg,
            self.session.snapshot_info().and_then(|i| i.scan()),
        ) else {
            tracing::info!(
                session = self.session.id(),
                "working set not recorded: the snapshot's digest is not known"
            );
            return;
        };
        if offsets.is_empty() {
            return;
        }
        let recording = Recording {
            snapshot_size: scan.key.size,
            digest: scan.digest,
            offsets,
        };
        let library = cfg.library.clone();
        let owner = self.session.owner();
        let id = self.session.id();
        let _ = std::thread::Builder::new()
            .name("faultd-ws-save".into())
            .spawn(move || match library.save(Some(owner), &recording) {
                Ok(()) => tracing::info!(
                    session = id,
                    pages = recording.offsets.len(),
                    "working set recorded"
                ),
                Err(e) => tracing::warn!(session = id, "saving the working set: {e}"),
            });
    }

    /// One slice of background work: recording's time limit, finding a recording, installing
    /// up to [`SLICE_PAGES`] of it. Returns whether more remains (the caller comes back once
    /// its sources have nothing pending).
    pub fn prefetch_slice(&mut self) -> bool {
        if self.ws.cfg.is_none() {
            return false;
        }
        if self
            .ws
            .recorder
            .as_ref()
            .is_some_and(|r| !r.done && Instant::now() >= r.until)
        {
            self.ws_save();
        }
        if !self.ws.looked_up {
            self.ws_look_up();
        }
        if self.ws.replay.is_none() {
            return false;
        }
        if let Some(stop) = self.ws_should_stop() {
            self.ws_stop(stop);
            return false;
        }
        self.ws.prefetching = true;
        let more = self.ws_install_slice();
        self.ws.prefetching = false;
        if !more && self.ws.replay.is_some() {
            let stop = if self.ws.replay.as_ref().is_some_and(|r| r.failures > 8) {
                ReplayStop::Error
            } else {
                ReplayStop::Done
            };
            self.ws_stop(stop);
        }
        more
    }

    /// Looks for a recording to replay now (when the snapshot's digest is already known; else
    /// the first replay slices look again).
    pub fn ws_start(&mut self) {
        if self.ws.cfg.is_some() && !self.ws.looked_up {
            self.ws_look_up();
        }
    }

    /// Looks for a recording of this session's snapshot, once its digest is known.
    fn ws_look_up(&mut self) {
        let Some(cfg) = &self.ws.cfg else { return };
        let Some(scan) = self.session.snapshot_info().and_then(|i| i.scan()) else {
            // Not scanned (yet): nothing to replay before it is; give up once recording time
            // is over (the guest's start is then past).
            if self
                .ws
                .started
                .is_some_and(|t| t.elapsed() > cfg.record_for)
            {
                self.ws.looked_up = true;
            }
            return;
        };
        self.ws.looked_up = true;
        if !cfg.replay {
            return;
        }
        let Some(rec) = cfg.library.find(self.session.owner(), &scan.digest) else {
            return;
        };
        if rec.snapshot_size != scan.key.size {
            return;
        }
        let c = &self.session.counters.ws;
        c.replay_pages
            .store(rec.offsets.len() as u64, Ordering::Relaxed);
        // A recording exists: this session's own demand faults are not a new one.
        self.ws.recorder = None;
        self.ws.replay = Some(Replay {
            pending: rec.offsets.iter().copied().collect(),
            all: rec.offsets.iter().copied().collect(),
            rec,
            next: 0,
            demand: 0,
            misses: 0,
            failures: 0,
        });
    }

    fn ws_should_stop(&mut self) -> Option<ReplayStop> {
        let r = self.ws.replay.as_ref()?;
        if self.finished {
            return Some(ReplayStop::Finished);
        }
        if r.demand >= JUDGE_AFTER && r.misses * 4 > r.demand * 3 {
            return Some(ReplayStop::Wrong);
        }
        if let Some(b) = &self.budget {
            let room = |budget: u64, used: u64| {
                budget == 0
                    || used + RUN_PAGES as u64 * PAGE
                        <= super::budget::share(budget, b.limits.low_pct)
            };
            let own = self.own_resident();
            let global = b.global.load(Ordering::Relaxed);
            if !room(b.limits.session, own) || !room(b.limits.global, global) {
                return Some(ReplayStop::Budget);
            }
        }
        None
    }

    fn ws_stop(&mut self, why: ReplayStop) {
        let Some(r) = self.ws.replay.take() else {
            return;
        };
        let c = &self.session.counters.ws;
        let left = r.rec.offsets.len().saturating_sub(r.next) as u64;
        self.ws.replayed = Some(r.all);
        c.stop.store(why as u64, Ordering::Relaxed);
        let us = self
            .ws
            .started
            .map_or(0, |t| t.elapsed().as_micros() as u64);
        c.replay_us.store(us, Ordering::Relaxed);
        tracing::info!(
            session = self.session.id(),
            stop = ReplayStop::name(why as u64),
            left,
            prefetched = c.prefetched.load(Ordering::Relaxed),
            late = c.late.load(Ordering::Relaxed),
            misses = c.misses.load(Ordering::Relaxed),
            took_us = us,
            "working-set replay ended"
        );
    }

    /// The page holding snapshot byte `offset`, and its location (None: no region has it).
    fn ws_page_of(&self, offset: u64) -> Option<Located> {
        self.session
            .layout()
            .regions()
            .iter()
            .enumerate()
            .find_map(|(ri, r)| match r.backing() {
                s2map::Backing::File { offset: base }
                    if (base..base + r.size()).contains(&offset) =>
                {
                    let ps = r.page_size().bytes();
                    let page = PageRef {
                        region: s2map::RegionIdx(ri as u32),
                        page: s2map::PageIdx((offset - base) / ps),
                    };
                    // Only the first 4 KiB of a huge page is recorded for it.
                    (offset - base)
                        .is_multiple_of(ps)
                        .then(|| self.session.located(page))
                }
                _ => None,
            })
    }

    /// Whether `at` is absent and to be filled from the snapshot at `offset`, not as zero.
    fn ws_wanted(&self, at: Located, offset: u64) -> bool {
        let map = self.session.map();
        map.state(at.page) == PageState::Absent
            && map.fill_for(at.page) == Fill::File { offset }
            && !super::snapshots::served_as_zero(&self.session, Fill::File { offset }, at.size)
    }

    /// Installs up to [`SLICE_PAGES`] recorded pages. Returns whether the recording has more.
    fn ws_install_slice(&mut self) -> bool {
        let mut budget = SLICE_PAGES;
        while budget > 0 {
            let Some(r) = &self.ws.replay else {
                return false;
            };
            let Some(&offset) = r.rec.offsets.get(r.next) else {
                return false;
            };
            let rec = r.rec.clone();
            let start = r.next;
            let Some(at) = self.ws_page_of(offset) else {
                self.ws_done(start, 1, 0);
                budget -= 1;
                continue;
            };
            // The run: recorded next to each other, contiguous in the file and in one
            // region, each absent and to be copied.
            let mut run = vec![at];
            if self.ws_wanted(at, offset) && at.size == PAGE {
                while run.len() < RUN_PAGES.min(budget) {
                    let k = run.len();
                    let (Some(&o), Some(next)) = (
                        rec.offsets.get(start + k),
                        self.ws_page_of(offset + k as u64 * PAGE),
                    ) else {
                        break;
                    };
                    if o != offset + k as u64 * PAGE
                        || next.page.region != at.page.region
                        || !self.ws_wanted(next, o)
                    {
                        break;
                    }
                    run.push(next);
                }
            }
            let n = run.len();
            let installed = if n > 1 {
                match self.ws_copy_run(&run, offset) {
                    Ok(done) => done,
                    // A layout event is unread: read it first, then try again.
                    Err(()) => return true,
                }
            } else {
                0
            };
            if installed == n {
                self.ws_done(start, n, n as u64);
                budget -= n;
                continue;
            }
            // The rest one page at a time (a run stopped short, or a single page).
            let (i, at) = (installed, run[installed]);
            let o = offset + i as u64 * PAGE;
            let done = self.ws_one(at, o);
            match done {
                One::Retry => {
                    self.ws_done(start, i, i as u64);
                    return true;
                }
                One::Installed => self.ws_done(start, i + 1, i as u64 + 1),
                One::Skipped => self.ws_done(start, i + 1, i as u64),
            }
            budget -= (i + 1).min(budget);
        }
        self.ws
            .replay
            .as_ref()
            .is_some_and(|r| r.next < r.rec.offsets.len())
    }

    /// Marks `n` recorded pages from `start` processed, `installed` of them installed.
    fn ws_done(&mut self, start: usize, n: usize, installed: u64) {
        let Some(r) = &mut self.ws.replay else { return };
        for o in &r.rec.offsets[start..start + n] {
            r.pending.remove(o);
        }
        r.next = start + n;
        let c = &self.session.counters.ws;
        c.prefetched.fetch_add(installed, Ordering::Relaxed);
        c.skipped.fetch_add(n as u64 - installed, Ordering::Relaxed);
    }

    /// Installs the pages of `run` (contiguous, absent, snapshot-backed from `offset`) in one
    /// copy. Returns how many were installed and completed; Err: a layout event is unread.
    fn ws_copy_run(&mut self, run: &[Located], offset: u64) -> Result<usize, ()> {
        {
            let mut map = self.session.map();
            for (k, at) in run.iter().enumerate() {
                if map.begin_fault(at.page, None)
                    != Begin::Resolve(Fill::File {
                        offset: offset + k as u64 * PAGE,
                    })
                {
                    // Checked just before under the same thread: only this thread resolves.
                    for done in &run[..=k] {
                        let _ = map.abort(done.page);
                    }
                    return Ok(0);
                }
            }
        }
        let len = run.len() as u64 * PAGE;
        let result = match self.session.mapped_snapshot(offset, len) {
            Some(src) => self.ops.copy_run(src, run[0].hva),
            None => Ok(0),
        };
        let copied = match result {
            Ok(bytes) => (bytes / PAGE) as usize,
            Err(OpError::Retry) => {
                for at in run {
                    self.abort(*at);
                }
                Counters::bump(&self.session.counters.retries);
                return Err(());
            }
            Err(_) => 0,
        };
        for at in &run[..copied] {
            let completed = self.session.map().complete(at.page);
            Counters::bump(&self.session.counters.file_fills);
            if completed.is_ok_and(|c| c.resident) {
                self.installed(at.page);
            }
        }
        for at in &run[copied..] {
            self.abort(*at);
        }
        Ok(copied)
    }

    /// Installs one recorded page if it is wanted.
    fn ws_one(&mut self, at: Located, offset: u64) -> One {
        let fill = {
            let mut map = self.session.map();
            if map.state(at.page) != PageState::Absent
                || map.fill_for(at.page) != (Fill::File { offset })
            {
                return One::Skipped;
            }
            match map.begin_fault(at.page, None) {
                Begin::Resolve(fill) => fill,
                _ => return One::Skipped,
            }
        };
        match self.install(at, fill) {
            Ok(()) => One::Installed,
            Err(InstallFail::Retry) => One::Retry,
            Err(InstallFail::Stale | InstallFail::Deferred { .. }) => One::Skipped,
            Err(InstallFail::Failed) => {
                if let Some(r) = &mut self.ws.replay {
                    r.failures += 1;
                }
                One::Skipped
            }
        }
    }
}

/// What became of one recorded page.
enum One {
    Installed,
    Skipped,
    /// A layout event is unread: try it again after reading it.
    Retry,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Recording {
        Recording {
            snapshot_size: 64 * PAGE,
            digest: [7; 32],
            offsets: vec![3 * PAGE, 0, 63 * PAGE],
        }
    }

    #[test]
    fn a_recording_reads_back_as_written() {
        assert_eq!(Recording::decode(&sample().encode()), Ok(sample()));
    }

    #[test]
    fn damaged_or_foreign_bytes_are_refused_by_name() {
        let good = sample().encode();
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            v[i] ^= b;
            v
        };
        let resum = |mut v: Vec<u8>| {
            let body = v.len() - TRAILER;
            let sum: [u8; 32] = Sha256::digest(&v[..body]).into();
            v[body..].copy_from_slice(&sum);
            v
        };

        assert_eq!(Recording::decode(&good[..10]), Err(DecodeError::Size(10)));
        assert_eq!(Recording::decode(&with(0, 1)), Err(DecodeError::Magic));
        assert_eq!(Recording::decode(&with(8, 1)), Err(DecodeError::Version(0)));
        assert_eq!(Recording::decode(&with(70, 1)), Err(DecodeError::Checksum));
        assert!(matches!(
            Recording::decode(&good[..good.len() - 8]),
            Err(DecodeError::Count { count: 3, .. })
        ));
        // Checksummed but wrong: an unaligned offset, one beyond the snapshot, a repeat.
        let mut r = sample();
        r.offsets[1] = 5;
        assert!(matches!(
            Recording::decode(&r.encode()),
            Err(DecodeError::Offset {
                index: 1,
                why: "not page aligned",
                ..
            })
        ));
        r.offsets[1] = 64 * PAGE;
        assert!(matches!(
            Recording::decode(&r.encode()),
            Err(DecodeError::Offset {
                why: "beyond the snapshot",
                ..
            })
        ));
        r.offsets[1] = 3 * PAGE;
        assert!(matches!(
            Recording::decode(&r.encode()),
            Err(DecodeError::Offset {
                why: "repeated",
                ..
            })
        ));
        // A count that claims more than the bound, checksummed.
        let mut big = good.clone();
        big[56..64].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            Recording::decode(&resum(big)),
            Err(DecodeError::Count { .. })
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Recording::decode(&bytes);
        }

        #[test]
        fn a_flipped_byte_is_always_refused(i in 0usize..(HEADER + 24 + TRAILER), bit in 0u8..8) {
            let mut v = sample().encode();
            v[i] ^= 1 << bit;
            prop_assert!(Recording::decode(&v).is_err());
        }
    }
}

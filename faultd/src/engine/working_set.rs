//! Working-set recording and replay: the order in which a restore's guest first touches
//! snapshot pages, kept per snapshot contents, and installed ahead of the guest on the next
//! restore of that snapshot.
//!
//! **Record.** From the session's start, every page filled from the snapshot for a demand fault
//! (a vCPU fault or a device page request; never a page replay installs) appends its file
//! offset, until `working_set.record_pages` pages or `working_set.record_ms` have passed. The
//! recording ([`super::recording`] has the file format) is then written (off the fault thread)
//! to the [`Library`](super::ws_library::Library), keyed by the session owner's uid and the
//! snapshot's SHA-256 digest ([`crate::engine::snapshots`]). A session that replays a recording
//! records nothing.
//!
//! **Replay.** The recording of the snapshot is looked for as soon as its digest is known, on
//! a loader thread (reading, checking and indexing up to [`MAX_BYTES`](super::recording::MAX_BYTES) takes milliseconds),
//! which wakes the fault thread when it is ready: the guest's first faults are served
//! meanwhile, and replay starts in the next slice after it arrives. When the fault thread has
//! nothing pending, it installs the next few recorded pages ([`SLICE_PAGES`] at most, then it
//! looks at its sources again: a ready fault never waits for more than one slice), contiguous
//! runs in one `UFFDIO_COPY`. A page is installed only if s2map has it absent and to be filled from the snapshot: a page the VM has, a page
//! it discarded (s2map then fills it with zeros) or one in the store is skipped. A copy that
//! fails with EAGAIN (a layout event unread) is aborted and the page tried again after the
//! events are read, so a discarded range is never filled again. Replay stops when the
//! recording is done, when demand faults come mostly outside it ("wrong"), when the VM's
//! budget has no room below its low watermark, or when the VMM finishes the session.
//!
//! faultd cannot see the guest touch a page it installed ahead (no accessed bits, and no
//! `page_idle` on this kernel), so it counts what it sees: pages prefetched, demand faults on
//! recorded pages not installed yet (late) and outside the recording (misses).

use super::recording::{Recording, MAX_PAGES, PAGE};
use super::ws_stats::ReplayStop;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Pages one replay slice installs at most before the sources are looked at again (fewer
/// when the VM's budget has less room below its low watermark).
pub const SLICE_PAGES: usize = 64;
/// Pages one UFFDIO_COPY of a run installs at most.
pub const RUN_PAGES: usize = 16;
/// Demand faults seen during replay before it may be judged wrong.
pub const JUDGE_AFTER: u64 = 32;
/// Chunks one session's replay has in flight at most when its snapshot is an object (GETs
/// ahead of the guest; see [`super::objects`]).
pub const PREFETCH_WINDOW: usize = 8;

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
    /// When the snapshot is an object: its chunks holding recorded pages, in the order of
    /// their first recorded page, each once; and the next one to ask for.
    chunks: Vec<u64>,
    next_chunk: usize,
}

impl Replay {
    /// The replay of `rec` from its start.
    fn new(rec: Arc<Recording>) -> Replay {
        Replay {
            pending: rec.offsets.iter().copied().collect(),
            all: rec.offsets.iter().copied().collect(),
            rec,
            next: 0,
            demand: 0,
            misses: 0,
            failures: 0,
            chunks: Vec::new(),
            next_chunk: 0,
        }
    }

    /// The replay of `rec` against an object of chunks of `chunk_bytes`: its pages are
    /// installed as their chunks land, asked for in recorded order.
    fn of_object(rec: Arc<Recording>, chunk_bytes: u64) -> Replay {
        let mut seen = HashSet::new();
        let chunks = rec
            .offsets
            .iter()
            .map(|o| o / chunk_bytes.max(1))
            .filter(|c| seen.insert(*c))
            .collect();
        Replay {
            chunks,
            ..Replay::new(rec)
        }
    }
}

/// A recording read from beside `version`, if it is one of this version: its digest binds
/// (endpoint/bucket/key, ETag, size), so a recording of another version (planted at this
/// version's key or not) is never replayed. Logs why one is not used.
fn object_recording(
    service: &super::objects::ObjectService,
    version: &Arc<objstore::ObjectVersion>,
    session: u64,
) -> Option<Replay> {
    let bytes = match service
        .fetcher()
        .get_recording(version, super::recording::MAX_OBJECT_BYTES as u64)
    {
        Ok(Some(b)) => b,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(session, "no replay: {}", crate::ops::logging::chain(&e));
            return None;
        }
    };
    let rec = match Recording::decode_object(&bytes) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                session,
                object = version.label(),
                "no replay: the recording beside the object: {e}"
            );
            return None;
        }
    };
    if rec.digest != super::objects::recording_digest(version)
        || rec.snapshot_size != version.size()
    {
        tracing::warn!(
            session,
            object = version.label(),
            etag = version.etag(),
            "no replay: the recording beside the object is of another version of it"
        );
        return None;
    }
    // Its zero chunks serve zeros in place of data: taken only from a store whose recordings
    // faultd writes (their keys are the operator's for faultd), at this chunk size.
    match &rec.zero {
        Some(z) if z.chunk_bytes != version.chunk_size().bytes() => tracing::info!(
            session,
            "the recording's zero chunks are of another chunk size: not used"
        ),
        Some(z) if service.writes_recordings(version) => version.learn_zero(&z.chunks),
        Some(_) => tracing::info!(
            session,
            "the recording's zero chunks are not used: its store's write_recordings is off"
        ),
        None => {}
    }
    Some(Replay::of_object(
        Arc::new(rec),
        version.chunk_size().bytes(),
    ))
}

/// A server's working-set state (none unless configured: [`FaultServer::with_working_set`]).
#[derive(Default)]
pub(crate) struct WsState {
    cfg: Option<WsConfig>,
    started: Option<Instant>,
    recorder: Option<Recorder>,
    replay: Option<Replay>,
    /// Whether the library was asked for a recording (once the digest is known).
    looked_up: bool,
    /// The lookup in flight: a loader thread reads, checks and indexes the recording (up to
    /// [`MAX_BYTES`](super::recording::MAX_BYTES)) off the fault thread, and sends it here (None: there is none).
    loading: Option<std::sync::mpsc::Receiver<Option<Replay>>>,
    /// Wakes the fault thread from poll(2) when the loader is done (none: nobody sleeps, as
    /// in unit tests).
    pub(crate) waker: Option<Arc<dyn Fn() + Send + Sync>>,
    /// Set while replay installs: [`FaultServer::install`] is then not a demand fill.
    pub(crate) prefetching: bool,
    /// The pages of the recording replay ended with: demand fills outside them are still
    /// counted as misses.
    replayed: Option<HashSet<u64>>,
    /// Replay waits for a chunk of the object to land (the doorbell wakes the thread).
    waiting: bool,
}

impl std::fmt::Debug for WsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsState")
            .field("recording", &self.recorder.is_some())
            .field("replaying", &self.replay.is_some())
            .field("looked_up", &self.looked_up)
            .field("loading", &self.loading.is_some())
            .finish_non_exhaustive()
    }
}

use super::{FaultServer, InstallFail};
use crate::engine::session::{Counters, Located};
use crate::kernel::uffd::{OpError, UffdOps};
use s2map::{Begin, Fill, PageRef, PageState};

impl<O: UffdOps> FaultServer<O> {
    /// Records and replays working sets as `cfg` says.
    pub fn with_working_set(mut self, cfg: WsConfig) -> Self {
        let now = Instant::now();
        self.ws.started = Some(now);
        self.ws.cfg = Some(cfg);
        if self.session.snapshot().is_some() || self.object.is_some() {
            self.ws_new_recorder();
        }
        self
    }

    /// Starts recording, when configured and not started (a session whose snapshot is an
    /// object gets its object after [`FaultServer::with_working_set`]).
    pub(crate) fn ws_new_recorder(&mut self) {
        let (Some(cfg), Some(started)) = (&self.ws.cfg, self.ws.started) else {
            return;
        };
        if cfg.record && self.ws.recorder.is_none() {
            self.ws.recorder = Some(Recorder {
                offsets: Vec::new(),
                seen: HashSet::new(),
                max: cfg.record_pages.min(MAX_PAGES),
                until: started + cfg.record_for,
                done: false,
            });
        }
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
        // A recording may be on its way: saving now would replace it with this session's
        // partial one. Not known yet: ask again at the next fill (or at the end).
        if !self.ws_poll_loader(false) {
            return;
        }
        let Some(rec) = self.ws.recorder.as_mut().filter(|r| !r.done) else {
            return;
        };
        rec.done = true;
        let offsets = std::mem::take(&mut rec.offsets);
        rec.seen = HashSet::new();
        if self.object.is_some() {
            self.ws_save_beside_object(offsets);
            return;
        }
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
            zero: None,
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

    /// Writes `offsets` as the recording beside the session's object (on a thread of its own,
    /// `If-None-Match: *`: the first writer wins), when its store allows faultd to write.
    fn ws_save_beside_object(&mut self, offsets: Vec<u64>) {
        let Some(o) = &self.object else { return };
        let id = self.session.id();
        if offsets.is_empty() {
            return;
        }
        let (service, version) = (o.service().clone(), o.version().clone());
        if !service.writes_recordings(&version) {
            tracing::info!(
                session = id,
                object = version.label(),
                "working set not written beside the object: its store's write_recordings is off"
            );
            return;
        }
        // The chunks faultd saw to be all zero (or learnt from a recording it trusts).
        let zero = version.zero_chunks();
        let recording = Recording {
            snapshot_size: version.size(),
            digest: super::objects::recording_digest(&version),
            offsets,
            zero: (!zero.is_empty()).then(|| super::recording::ZeroChunks {
                chunk_bytes: version.chunk_size().bytes(),
                chunks: zero,
            }),
        };
        let pages = recording.offsets.len();
        let _ = std::thread::Builder::new()
            .name("faultd-ws-put".into())
            .spawn(move || {
                match service
                    .fetcher()
                    .put_recording(&version, recording.encode())
                {
                    Ok(true) => tracing::info!(
                        session = id,
                        object = version.label(),
                        pages,
                        "working set recorded beside the object"
                    ),
                    Ok(false) => tracing::info!(
                        session = id,
                        object = version.label(),
                        "working set not written: a recording of this version is there already"
                    ),
                    Err(e) => tracing::warn!(
                        session = id,
                        "writing the working set beside the object: {}",
                        crate::ops::logging::chain(&e)
                    ),
                }
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
        self.ws_poll_loader(false);
        if self.ws.replay.is_none() {
            return false;
        }
        if let Some(stop) = self.ws_should_stop() {
            self.ws_stop(stop);
            return false;
        }
        self.ws.prefetching = true;
        self.ws.waiting = false;
        let more = self.ws_install_slice();
        self.ws.prefetching = false;
        // Waiting for a chunk: nothing to do until the doorbell rings.
        if self.ws.waiting {
            return false;
        }
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

    /// Starts looking for a recording to replay (when the snapshot's digest is already known;
    /// else the first replay slices look again). It loads on a thread of its own; faults are
    /// served meanwhile, and replay starts in the first slice after it arrives.
    pub fn ws_start(&mut self) {
        if self.ws.cfg.is_some() && !self.ws.looked_up {
            self.ws_look_up();
        }
    }

    /// Whether replay has pages left to install.
    pub fn ws_replaying(&self) -> bool {
        self.ws.replay.is_some()
    }

    /// Whether a recording is still loading.
    pub fn ws_loading(&self) -> bool {
        self.ws.loading.is_some()
    }

    /// Waits for the recording being loaded, if any, and starts replaying it.
    pub fn ws_wait_loaded(&mut self) {
        self.ws_poll_loader(true);
    }

    /// At the session's end: the lookup in flight is waited for (a recording found means this
    /// session's touches are not saved over it), then what was recorded is saved.
    pub(crate) fn ws_end(&mut self) {
        self.ws_poll_loader(true);
        self.ws_save();
    }

    /// Takes the loader's answer if it has come (`block`: waits for it) and starts replaying
    /// what it found. Returns whether no lookup is in flight any more.
    fn ws_poll_loader(&mut self, block: bool) -> bool {
        let Some(rx) = &self.ws.loading else {
            return true;
        };
        let got = if block {
            rx.recv()
                .map_err(|_| std::sync::mpsc::TryRecvError::Disconnected)
        } else {
            rx.try_recv()
        };
        let found = match got {
            Err(std::sync::mpsc::TryRecvError::Empty) => return false,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
            Ok(found) => found,
        };
        self.ws.loading = None;
        if let Some(replay) = found {
            self.ws_begin_replay(replay);
        }
        true
    }

    /// Looks for a recording of this session's snapshot, once its digest is known.
    fn ws_look_up(&mut self) {
        let Some(cfg) = &self.ws.cfg else { return };
        if let Some(o) = &self.object {
            self.ws.looked_up = true;
            if !cfg.replay {
                return;
            }
            // One GET of the recording beside the object, bounded, on a thread of its own:
            // the guest's first faults are served meanwhile.
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let (service, version) = (o.service().clone(), o.version().clone());
            let waker = self.ws.waker.clone();
            let id = self.session.id();
            let spawned = std::thread::Builder::new()
                .name("faultd-ws-get".into())
                .spawn(move || {
                    let _ = tx.send(object_recording(&service, &version, id));
                    if let Some(wake) = waker {
                        wake();
                    }
                });
            match spawned {
                Ok(_) => self.ws.loading = Some(rx),
                Err(e) => tracing::warn!(
                    session = id,
                    "no working-set replay: starting its loader: {e}"
                ),
            }
            return;
        }
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
        // Reading, checking and indexing a recording of up to MAX_BYTES takes milliseconds: on
        // a thread of its own, so the guest's first faults never wait for it.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let library = cfg.library.clone();
        let owner = self.session.owner();
        let (digest, size) = (scan.digest, scan.key.size);
        let waker = self.ws.waker.clone();
        let spawned = std::thread::Builder::new()
            .name("faultd-ws-load".into())
            .spawn(move || {
                let found = library
                    .find(owner, &digest)
                    .filter(|r| r.snapshot_size == size)
                    .map(Replay::new);
                let _ = tx.send(found);
                if let Some(wake) = waker {
                    wake();
                }
            });
        match spawned {
            Ok(_) => self.ws.loading = Some(rx),
            Err(e) => tracing::warn!(
                session = self.session.id(),
                "no working-set replay: starting its loader: {e}"
            ),
        }
    }

    /// Starts `replay` (loaded and prepared by [`FaultServer::ws_look_up`]'s thread).
    fn ws_begin_replay(&mut self, mut replay: Replay) {
        let c = &self.session.counters.ws;
        c.replay_pages
            .store(replay.rec.offsets.len() as u64, Ordering::Relaxed);
        // A recording exists: this session's own demand faults are not a new one. Those
        // served while it loaded are judged against it now, as if it had been there: late
        // (recorded, not installed in time) or misses (outside it).
        if let Some(rec) = self.ws.recorder.take() {
            for o in &rec.offsets {
                replay.demand += 1;
                if replay.all.contains(o) {
                    Counters::bump(&c.late);
                } else {
                    replay.misses += 1;
                    Counters::bump(&c.misses);
                }
            }
        }
        self.ws.replay = Some(replay);
    }

    fn ws_should_stop(&mut self) -> Option<ReplayStop> {
        let r = self.ws.replay.as_ref()?;
        if self.finished {
            return Some(ReplayStop::Finished);
        }
        if self.object.as_ref().is_some_and(|o| o.failed.is_some()) {
            return Some(ReplayStop::Error);
        }
        if r.demand >= JUDGE_AFTER && r.misses * 4 > r.demand * 3 {
            return Some(ReplayStop::Wrong);
        }
        if self.ws_room() < RUN_PAGES {
            return Some(ReplayStop::Budget);
        }
        None
    }

    /// Pages replay may still install below the low watermarks of the VM's and the global
    /// budget (all of a slice when there is no budget).
    fn ws_room(&self) -> usize {
        let Some(b) = &self.budget else {
            return SLICE_PAGES;
        };
        let room = |budget: u64, used: u64| {
            if budget == 0 {
                SLICE_PAGES as u64
            } else {
                super::budget::share(budget, b.limits.low_pct).saturating_sub(used) / PAGE
            }
        };
        let own = room(b.limits.session, self.own_resident());
        let global = room(b.limits.global, b.global.load(Ordering::Relaxed));
        own.min(global).min(SLICE_PAGES as u64) as usize
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
            prefetched_zero = c.prefetched_zero.load(Ordering::Relaxed),
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
            && !self.session.serves_as_zero(Fill::File { offset }, at.size)
    }

    /// Installs up to [`SLICE_PAGES`] recorded pages. Returns whether the recording has more.
    fn ws_install_slice(&mut self) -> bool {
        // A slice never takes the VM past its budget's low watermark.
        let mut budget = self.ws_room();
        while budget > 0 {
            let Some(r) = &self.ws.replay else {
                return false;
            };
            let Some(&offset) = r.rec.offsets.get(r.next) else {
                return false;
            };
            let rec = r.rec.clone();
            let start = r.next;
            if self.ws_wait_for_chunk(offset) {
                self.ws.waiting = true;
                return true;
            }
            let Some(at) = self.ws_page_of(offset) else {
                self.ws_done(start, 1, 0, 0);
                budget -= 1;
                continue;
            };
            // The run: recorded next to each other, contiguous in the file and in one
            // region, each absent and to be copied.
            let mut run = vec![at];
            // An object's pages are copied one at a time (no file mapping to copy a run from).
            if self.object.is_none() && self.ws_wanted(at, offset) && at.size == PAGE {
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
                self.ws_done(start, n, n as u64, 0);
                budget -= n;
                continue;
            }
            // The rest one page at a time (a run stopped short, or a single page).
            let (i, at) = (installed, run[installed]);
            let o = offset + i as u64 * PAGE;
            let done = self.ws_one(at, o);
            match done {
                One::Retry => {
                    self.ws_done(start, i, i as u64, 0);
                    return true;
                }
                One::Installed => self.ws_done(start, i + 1, i as u64 + 1, 0),
                One::Zero => self.ws_done(start, i + 1, i as u64, 1),
                One::Skipped => self.ws_done(start, i + 1, i as u64, 0),
            }
            budget -= (i + 1).min(budget);
        }
        self.ws
            .replay
            .as_ref()
            .is_some_and(|r| r.next < r.rec.offsets.len())
    }

    /// For a session whose snapshot is an object: keeps [`PREFETCH_WINDOW`] chunks of the
    /// recording in flight (in recorded order, each asked for once), and says whether the
    /// chunk of the recorded page at `offset` is still on its way (the slice then waits for
    /// the doorbell). A chunk asked for and landed is read from the cache by the install.
    fn ws_wait_for_chunk(&mut self, offset: u64) -> bool {
        let (Some(o), Some(r)) = (self.object.as_mut(), self.ws.replay.as_mut()) else {
            return false;
        };
        while o.prefetching() < PREFETCH_WINDOW && r.next_chunk < r.chunks.len() {
            let chunk = r.chunks[r.next_chunk];
            r.next_chunk += 1;
            o.prefetch(chunk);
        }
        let chunk = o.version().chunk_of(offset).0;
        o.is_prefetching(chunk)
    }

    /// Marks `n` recorded pages from `start` processed: `installed` of them copied, `zero`
    /// mapped as zero pages, the rest skipped.
    fn ws_done(&mut self, start: usize, n: usize, installed: u64, zero: u64) {
        let Some(r) = &mut self.ws.replay else { return };
        for o in &r.rec.offsets[start..start + n] {
            r.pending.remove(o);
        }
        r.next = start + n;
        let c = &self.session.counters.ws;
        c.prefetched.fetch_add(installed, Ordering::Relaxed);
        c.prefetched_zero.fetch_add(zero, Ordering::Relaxed);
        c.skipped
            .fetch_add(n as u64 - installed - zero, Ordering::Relaxed);
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

    /// Installs one recorded page if it is wanted (a zero page of the snapshot as a zero
    /// page: [`One::Zero`], counted apart from the copies).
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
        let zero = self.zero_fill(fill, at.size);
        match self.install(at, fill) {
            Ok(()) if zero => One::Zero,
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
    /// Copied from the snapshot.
    Installed,
    /// A zero page of the snapshot, mapped as a zero page (nothing copied).
    Zero,
    Skipped,
    /// A layout event is unread: try it again after reading it.
    Retry,
}

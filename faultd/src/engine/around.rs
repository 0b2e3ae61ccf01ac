//! Fault-around: serving a sequential stream of faults ahead of it (config `[around]`).
//!
//! A guest streaming through fresh memory faults once per page, and a device's DMA walking a
//! buffer sends one page request per granule; each costs a round trip (a vCPU exit and wake-up;
//! hundreds of µs to ms for a PRI round trip on real hardware). When a source's faults follow
//! each other in address order, the pages (granules) just past the latest are served before the
//! stream asks for them.
//!
//! Detection ([`Streams`], pure state): each source (the vCPU path; each device) keeps a small
//! table of recent stream heads, so a few interleaved streams are each recognised. A fault that
//! continues a stream (lands at its head, or just past what was served ahead of it) advances it;
//! any other fault starts a new entry in place of the least recently used one. From the third
//! fault in a row a stream is served ahead, first by a few pages; the distance doubles each time
//! the stream's next fault lands just past what was served (it was all used), up to
//! `around.max_kib`, and halves when a fault lands inside it (pages served ahead were taken away
//! before they were used). Random faults continue no stream, so they get no look-ahead.
//!
//! Serving (here, on the fault thread, after the fault that triggered it has been answered: the
//! faulting vCPU is woken by its own install, a device's group is answered right after its
//! look-ahead):
//! - vCPU: absent pages are installed from their backing as s2map says, runs of zero pages and
//!   contiguous snapshot runs in one ioctl. A present page is skipped (and the kernel refuses to
//!   install over one anyway: EEXIST); a page being evicted or resolved stops the look-ahead, as
//!   does EAGAIN (an unread layout event, say a REMOVE: nothing is installed into a range being
//!   discarded before the discard is read) and reaching a budget's high watermark.
//! - Devices: the next granules are made resident and mapped in the device's IOMMU before the
//!   group is answered, only into free pin room (never unmapping a granule to make room) and
//!   only within half the group deadline.
//!
//! Pages installed ahead are not vCPU faults: they count in `around` (and in the fill counters,
//! as every install does).

use std::ops::Range;

use s2map::{Begin, Fill, Granule, PageIdx, PageRef, PageState, RegionIdx};

use super::{FaultServer, InstallFail};
use crate::engine::session::Counters;
use crate::kernel::uffd::{OpError, UffdOps};
use crate::ops::config::Around;
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Distance of a stream's first look-ahead, in units (pages or granules).
const START_UNITS: u64 = 4;

/// Faults in a row, the first included, after which a stream is served ahead.
const RUN_TO_START: u32 = 3;

/// One stream head of a source.
#[derive(Debug, Clone, Copy)]
struct Stream {
    region: u32,
    /// The latest unit faulted.
    last: u64,
    /// The unit after the last one served (faulted or served ahead): `> last`.
    ahead_end: u64,
    /// Units to serve ahead next time.
    distance: u64,
    /// Faults in a row on this stream.
    run: u32,
    /// When it was last continued (for replacing the least recently used entry).
    used: u64,
}

/// The stream heads of one source (pure state; units are pages for the vCPU path, granules
/// for a device).
#[derive(Debug, Clone)]
pub(crate) struct Streams {
    entries: Vec<Stream>,
    cap: usize,
    tick: u64,
}

/// A look-ahead to do for a stream: serve `window`, then report where it got to with
/// [`Streams::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ahead {
    slot: usize,
    pub window: Range<u64>,
}

impl Streams {
    /// A table of at most `cap` streams.
    pub(crate) fn new(cap: usize) -> Streams {
        Streams {
            entries: Vec::with_capacity(cap),
            cap: cap.max(1),
            tick: 0,
        }
    }

    /// Records a fault on units `first..=last` of `region` (which has `units` units; at most
    /// `max` may be served ahead). Returns the look-ahead to do, if this fault continues a
    /// stream that has run long enough.
    pub(crate) fn on_fault(
        &mut self,
        region: u32,
        first: u64,
        last: u64,
        units: u64,
        max: u64,
    ) -> Option<Ahead> {
        self.tick += 1;
        let tick = self.tick;
        let found = self.entries.iter().position(|e| {
            e.region == region && first >= e.last && first <= e.ahead_end.max(e.last + 1)
        });
        let Some(slot) = found else {
            let fresh = Stream {
                region,
                last,
                ahead_end: last + 1,
                distance: START_UNITS.min(max),
                run: 1,
                used: tick,
            };
            if self.entries.len() < self.cap {
                self.entries.push(fresh);
            } else if let Some(oldest) = self.entries.iter_mut().min_by_key(|e| e.used) {
                *oldest = fresh;
            }
            return None;
        };
        let e = &mut self.entries[slot];
        e.used = tick;
        if last <= e.last {
            // The same unit again (a duplicate, a retry): no progress.
            return None;
        }
        if e.ahead_end > e.last + 1 {
            if first >= e.ahead_end {
                // Everything served ahead was passed over without a fault: it was used.
                e.distance = (e.distance * 2).min(max);
            } else {
                // A fault inside what was served ahead: some of it went before it was used.
                e.distance = (e.distance / 2).max(1).min(max);
            }
        }
        e.run = e.run.saturating_add(1);
        e.last = last;
        e.ahead_end = e.ahead_end.max(last + 1);
        if e.run < RUN_TO_START || e.distance == 0 {
            return None;
        }
        let start = e.ahead_end;
        let end = (last + 1 + e.distance).min(units);
        (start < end).then_some(Ahead {
            slot,
            window: start..end,
        })
    }

    /// A look-ahead of `ahead` served up to (not including) `reached`.
    pub(crate) fn settle(&mut self, ahead: &Ahead, reached: u64) {
        if let Some(e) = self.entries.get_mut(ahead.slot) {
            e.ahead_end = e.ahead_end.max(reached);
        }
    }
}

/// The fault-around state of a [`FaultServer`].
#[derive(Debug)]
pub(crate) struct AroundState {
    pub(crate) config: Around,
    vcpu: Streams,
    /// Per device, by position in `FaultServer::devices`.
    devices: Vec<Streams>,
}

impl AroundState {
    /// Fault-around as configured.
    pub(crate) fn new(config: Around) -> AroundState {
        AroundState {
            config,
            vcpu: Streams::new(config.streams),
            devices: Vec::new(),
        }
    }

    /// Device `d` was detached: the devices after it move down one position.
    pub(crate) fn forget_device(&mut self, d: usize) {
        if d < self.devices.len() {
            self.devices.remove(d);
        }
    }

    /// Off (the state before [`FaultServer::with_around`]).
    pub(crate) fn off() -> AroundState {
        AroundState::new(Around {
            enabled: false,
            max_bytes: 4096,
            streams: 1,
        })
    }
}

/// Why a look-ahead stopped short.
struct Stop;

impl<O: UffdOps> FaultServer<O> {
    /// Serves fault-around as `config` says.
    pub fn with_around(mut self, config: Around) -> Self {
        self.around = AroundState::new(config);
        self
    }

    /// After vCPU fault on `page` was installed: serve ahead if it continues a stream.
    pub(crate) fn around_vcpu(&mut self, page: PageRef) {
        if !self.around.config.enabled {
            return;
        }
        let region = self.session.layout().region(page.region);
        let (size, units) = (region.page_size().bytes(), region.page_count());
        let max = self.around.config.max_bytes / size;
        let p = page.page.0;
        let Some(ahead) = self.around.vcpu.on_fault(page.region.0, p, p, units, max) else {
            return;
        };
        Counters::bump(&self.session.counters.around_vcpu_rounds);
        let reached = match self.fill_ahead(page.region, ahead.window.clone(), size) {
            Ok(end) => end,
            Err((at, Stop)) => {
                Counters::bump(&self.session.counters.around_stopped);
                at
            }
        };
        self.around.vcpu.settle(&ahead, reached);
    }

    /// Bytes that may still be made resident before a budget's high watermark (`u64::MAX`
    /// without a budget).
    fn room_below_watermark(&self) -> u64 {
        let Some(b) = &self.budget else {
            return u64::MAX;
        };
        let mut room = u64::MAX;
        let own = self.own_resident();
        if b.limits.session > 0 {
            room = room
                .min(super::budget::share(b.limits.session, b.limits.high_pct).saturating_sub(own));
        }
        if b.limits.global > 0 {
            // Other VMs' resident bytes as they last reported them, plus this VM's now.
            let others = b.global.load(Ordering::Relaxed).saturating_sub(b.reported);
            let high = super::budget::share(b.limits.global, b.limits.high_pct);
            room = room.min(high.saturating_sub(others + own));
        }
        room
    }

    /// Installs the absent pages of `window` in `region` (pages of `size` bytes). Returns the
    /// end of the window, or where it stopped and why.
    fn fill_ahead(
        &mut self,
        region: RegionIdx,
        window: Range<u64>,
        size: u64,
    ) -> Result<u64, (u64, Stop)> {
        let mut room = self.room_below_watermark();
        let page_at = |p| PageRef {
            region,
            page: PageIdx(p),
        };
        let mut p = window.start;
        while p < window.end {
            if room < size {
                return Err((p, Stop));
            }
            let begin = self.session.map().begin_fault(page_at(p), None);
            let fill = match begin {
                Begin::Present => {
                    p += 1;
                    continue;
                }
                // Being resolved or evicted: never install over it.
                Begin::Joined | Begin::Evicting => return Err((p, Stop)),
                Begin::Resolve(fill) => fill,
            };
            // Extend to a run that one ioctl fills: zero pages (4 KiB), or a contiguous
            // stretch of the snapshot faultd has mapped.
            let runnable = match fill {
                Fill::Zero => size == 4096,
                Fill::File { .. } => true,
                Fill::Store { .. } => false,
            };
            let mut end = p + 1;
            if runnable {
                let mut map = self.session.map();
                while end < window.end
                    && room / size > end - p
                    && map.state(page_at(end)) == PageState::Absent
                    && continues(fill, map.fill_for(page_at(end)), end - p, size)
                {
                    map.begin_fault(page_at(end), None);
                    end += 1;
                }
            }
            let pages: Vec<PageRef> = (p..end).map(page_at).collect();
            match self.install_ahead(&pages, fill, size) {
                Ok(()) => {}
                Err(Stop) => return Err((p, Stop)),
            }
            let n = end - p;
            self.session
                .counters
                .around_vcpu_pages
                .fetch_add(n, Ordering::Relaxed);
            room = room.saturating_sub(n * size);
            p = end;
        }
        Ok(window.end)
    }

    /// Fills `pages` (contiguous, all Resolving for us, the first's fill being `fill`) and
    /// completes them.
    fn install_ahead(&mut self, pages: &[PageRef], fill: Fill, size: u64) -> Result<(), Stop> {
        let first = self.session.located(pages[0]);
        let len = size * pages.len() as u64;
        let result = match fill {
            _ if pages.len() == 1 => {
                return match self.install(first, fill) {
                    Ok(()) => Ok(()),
                    Err(
                        InstallFail::Retry
                        | InstallFail::Stale
                        | InstallFail::Failed
                        | InstallFail::Deferred { .. },
                    ) => Err(Stop),
                };
            }
            Fill::Zero => self.ops.zeropage(first.hva, len),
            Fill::File { offset } => match self.session.mapped_snapshot(offset, len) {
                Some(src) => self.ops.copy_mapped(src, first.hva),
                // Not mapped: page by page (each read with pread by install).
                None => Err(OpError::Exists),
            },
            Fill::Store { .. } => Err(OpError::Exists),
        };
        match result {
            Ok(()) => {
                let mut done = Vec::with_capacity(pages.len());
                let mut map = self.session.map();
                for &page in pages {
                    if map.complete(page).is_ok_and(|c| c.resident) {
                        done.push(page);
                    }
                }
                drop(map);
                let c = &self.session.counters;
                match fill {
                    Fill::Zero => &c.zero_fills,
                    _ => &c.file_fills,
                }
                .fetch_add(pages.len() as u64, Ordering::Relaxed);
                let stale = done.len() < pages.len();
                for page in done {
                    self.installed(page);
                }
                if stale {
                    return Err(Stop);
                }
                Ok(())
            }
            // EAGAIN on a run can be a partial fill (the kernel stopped at a present page
            // after filling some: it reports that as EAGAIN, not EEXIST), so it is settled
            // page by page as well; a genuinely pending layout event fails the first page.
            Err(OpError::Exists | OpError::Retry) => {
                // Some page is present already (or the run cannot be one copy): page by page,
                // which settles each as installed or already present.
                for &page in pages {
                    let _ = self.session.map().abort(page);
                }
                for &page in pages {
                    let begin = self.session.map().begin_fault(page, None);
                    match begin {
                        Begin::Present => {}
                        Begin::Joined | Begin::Evicting => return Err(Stop),
                        Begin::Resolve(fill) => {
                            if self.install(self.session.located(page), fill).is_err() {
                                return Err(Stop);
                            }
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                for &page in pages {
                    let _ = self.session.map().abort(page);
                }
                self.error(format_args!(
                    "fault-around: filling {} pages at {:#x}: {e}",
                    pages.len(),
                    first.hva.0
                ));
                Err(Stop)
            }
        }
    }

    /// After device `d`'s group (read at `received`) resolved, before it is answered: maps
    /// the next granules if the group continues a stream of that device.
    pub(crate) fn around_device(&mut self, d: usize, group: &iopf::Group, received: Instant) {
        if !self.around.config.enabled || group.pages.is_empty() {
            return;
        }
        let granule_bytes = self.devices[d].mapper.granule();
        let layout = self.session.layout();
        let mut lo: Option<(PageRef, u64)> = None;
        let mut hi = 0;
        for &(iova, _) in &group.pages {
            let Some(page) = layout.lookup(s2map::Gpa(iova.0)) else {
                return;
            };
            if lo.is_some_and(|(f, _)| f.region != page.region) {
                return; // a group across regions continues no stream
            }
            let ps = layout.region(page.region).page_size().bytes();
            let per = (granule_bytes / ps).max(1);
            let unit = page.page.0 / per;
            lo = Some(match lo {
                Some((f, u)) if u <= unit => (f, u),
                _ => (page, unit),
            });
            hi = hi.max(unit);
        }
        let Some((first, lo_unit)) = lo else {
            return;
        };
        let region = layout.region(first.region);
        let ps = region.page_size().bytes();
        let per = (granule_bytes / ps).max(1);
        let units = region.page_count() / per;
        let max = self.around.config.max_bytes / (per * ps);
        let read_only = region.read_only();
        while self.around.devices.len() <= d {
            self.around
                .devices
                .push(Streams::new(self.around.config.streams));
        }
        let Some(ahead) = self.around.devices[d].on_fault(first.region.0, lo_unit, hi, units, max)
        else {
            return;
        };
        Counters::bump(&self.session.counters.around_device_rounds);
        let dev = self.devices[d].idx;
        // The look-ahead's fills must not relabel the group's latency.
        let filled = self.filled;
        let mut reached = ahead.window.end;
        for unit in ahead.window.clone() {
            let page = PageRef {
                region: first.region,
                page: PageIdx(unit * per),
            };
            let g = match self.session.map().granule_of(page, granule_bytes) {
                Ok(g) => g,
                Err(_) => {
                    reached = unit;
                    break;
                }
            };
            if self.session.map().is_mapped_for(dev, g) {
                continue;
            }
            if !self.map_ahead(d, g, !read_only, received) {
                Counters::bump(&self.session.counters.around_stopped);
                reached = unit;
                break;
            }
            Counters::bump(&self.session.counters.around_device_granules);
        }
        self.filled = filled;
        self.around.devices[d].settle(&ahead, reached);
    }

    /// Makes `g` resident and maps it for device `d`, if it fits the free pin room and half of
    /// the deadline of the group read at `received` is left.
    fn map_ahead(&mut self, d: usize, g: Granule, writable: bool, received: Instant) -> bool {
        if received.elapsed() >= self.limits.deadline / 2 {
            return false;
        }
        let bytes = self.session.granule_bytes(g);
        let pinned = self.session.map().stats().device_mapped_bytes;
        if pinned + bytes > self.limits.pin_limit {
            // Only free room: a look-ahead never unmaps a granule the device may be using.
            return false;
        }
        if self.make_resident(g).is_some() {
            return false;
        }
        self.map_for(d, g, writable).is_none()
    }
}

/// Whether a page whose fill is `next` continues, `k` pages on, a run whose first page's fill is
/// `first` (pages of `size` bytes): zero after zero, or the snapshot's next page.
fn continues(first: Fill, next: Fill, k: u64, size: u64) -> bool {
    match (first, next) {
        (Fill::Zero, Fill::Zero) => true,
        (Fill::File { offset: a }, Fill::File { offset: b }) => a + k * size == b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNITS: u64 = 1 << 20;

    #[test]
    fn a_stream_is_served_ahead_from_its_third_fault_and_the_distance_doubles_while_used() {
        let mut s = Streams::new(4);

        let a = s.on_fault(0, 10, 10, UNITS, 64);
        let b = s.on_fault(0, 11, 11, UNITS, 64);
        let c = s.on_fault(0, 12, 12, UNITS, 64).unwrap();

        assert_eq!((a, b), (None, None));
        assert_eq!(c.window, 13..17);
        s.settle(&c, 17);
        // The next fault lands just past the window: it was used, the distance doubles.
        let d = s.on_fault(0, 17, 17, UNITS, 64).unwrap();
        assert_eq!(d.window, 18..26);
    }

    #[test]
    fn random_faults_get_no_look_ahead() {
        let mut s = Streams::new(4);
        let mut state = 12345u32;
        let mut aheads = 0;
        for _ in 0..10_000 {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let p = u64::from(state) % UNITS;
            aheads += usize::from(s.on_fault(0, p, p, UNITS, 64).is_some());
        }
        assert_eq!(aheads, 0);
    }

    #[test]
    fn interleaved_streams_are_each_recognised() {
        let mut s = Streams::new(4);
        let mut aheads = [0; 3];
        for i in 0..10u64 {
            for (k, base) in [0u64, 1000, 5000].into_iter().enumerate() {
                if let Some(a) = s.on_fault(0, base + i, base + i, UNITS, 64) {
                    aheads[k] += 1;
                    s.settle(&a, base + i + 1);
                }
            }
        }
        assert_eq!(aheads, [8, 8, 8]);
    }

    #[test]
    fn the_distance_never_passes_the_maximum_nor_the_region_end() {
        let mut s = Streams::new(1);
        let mut last = None;
        let mut p = 0;
        while p < 200 {
            match s.on_fault(0, p, p, 200, 16) {
                Some(a) => {
                    assert!(a.window.end - p - 1 <= 16 && a.window.end <= 200);
                    p = a.window.end;
                    s.settle(&a, a.window.end);
                    last = Some(a);
                }
                None => p += 1,
            }
        }
        assert_eq!(last.unwrap().window.end, 200);
    }

    #[test]
    fn a_fault_inside_the_window_halves_the_distance() {
        let mut s = Streams::new(1);
        for p in 0..2 {
            s.on_fault(0, p, p, UNITS, 64);
        }
        let a = s.on_fault(0, 2, 2, UNITS, 64).unwrap();
        s.settle(&a, a.window.end); // 3..7 served
                                    // Page 4 was taken away (say evicted) and faults: the distance halves to 2.
        let b = s.on_fault(0, 4, 4, UNITS, 64);
        // ... 5 and 6 are still there; the stream passes them and faults at 7, the distance
        // doubles back to 4 (it would be 8 had it not halved).
        let c = s.on_fault(0, 7, 7, UNITS, 64).unwrap();

        assert_eq!(b, None);
        assert_eq!(c.window, 8..12);
    }
}

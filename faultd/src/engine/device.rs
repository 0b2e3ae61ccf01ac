//! Device page faults: serving page-request groups from a device's queue.
//!
//! One group, end to end (see docs/device-faults.md): for each page of the group, IOVA == GPA
//! is looked up in the layout (outside: INVALID), a write into a read-only region is refused
//! (INVALID), the page's whole mapping granule is made resident exactly as a vCPU fault would
//! (the same s2map, the same uffd install into the VMM's memfd), then the granule is mapped in
//! the device's IOMMU and recorded in s2map. Only when every page of the group is mapped is the
//! group answered SUCCESS, once. A group that cannot finish now (EAGAIN) waits and is retried;
//! past the deadline it is answered INVALID, so a device never waits forever.
//!
//! Pins: every mapped granule pins its pages. A VM's devices may pin at most
//! `device.pin_limit_mib`; beyond it the least recently mapped granule is unmapped first (the
//! page stays resident; the device faults again if it needs it).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Instant;

use iopf::{DevId, FaultQueue, Group, Incoming, Iova, MapError, MapTarget, Mapper, ResponseCode};
use s2map::{Begin, DeviceIdx, Gpa, Granule};

use crate::engine::session::Counters;
use crate::engine::{FaultServer, InstallFail};
use crate::kernel::uffd::{OpError, UffdOps};
use crate::ops::metrics::{FaultOutcome, Source};

/// A device attached to a session.
pub struct Device {
    /// faultd's index of the device within its VM (s2map's device bit).
    pub idx: DeviceIdx,
    /// The device id its page requests carry.
    pub dev_id: DevId,
    /// Where its page requests arrive; none for a pinned device (it cannot fault).
    pub queue: Option<Box<dyn FaultQueue>>,
    /// Where its mappings go.
    pub mapper: Box<dyn Mapper>,
    /// Groups read but not answered yet, oldest first, with the time they were read and the
    /// fills they needed so far.
    pub(crate) pending: VecDeque<(Group, Instant, FaultOutcome)>,
    /// The VMM made faultd's notification block (see [`crate::engine::session::Watch`]): the device
    /// is no longer served. Only that VM's device pays for its VMM's misbehaviour.
    pub(crate) quarantined: bool,
    /// Malformed entries read since the last valid group (see `DeviceLimits::malformed_run`).
    malformed_run: u64,
    /// Pinned mode (see [`crate::engine::pinned`]): its granules are mapped at attach, never
    /// evicted nor unmapped for the pin limit while it is attached.
    pub(crate) pinned: bool,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("idx", &self.idx)
            .field("dev_id", &self.dev_id)
            .field("granule", &self.mapper.granule())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Device {
    /// A device served from `queue`, mapping into `mapper`.
    pub fn new(
        idx: DeviceIdx,
        dev_id: DevId,
        queue: Box<dyn FaultQueue>,
        mapper: Box<dyn Mapper>,
    ) -> Device {
        Device {
            idx,
            dev_id,
            queue: Some(queue),
            mapper,
            pending: VecDeque::new(),
            quarantined: false,
            malformed_run: 0,
            pinned: false,
        }
    }

    /// A device in pinned mode: no page requests; faultd maps its DMA-able RAM up front.
    pub fn pinned(idx: DeviceIdx, dev_id: DevId, mapper: Box<dyn Mapper>) -> Device {
        Device {
            idx,
            dev_id,
            queue: None,
            mapper,
            pending: VecDeque::new(),
            quarantined: false,
            malformed_run: 0,
            pinned: true,
        }
    }
}

/// Why a device is no longer served.
#[derive(Debug, Clone, Copy)]
enum Quarantine {
    /// Its VMM made faultd's notification block.
    Blocked,
    /// It sent this many malformed records in a row.
    Malformed(u64),
}

/// Why a group is answered INVALID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refuse {
    OutsideLayout,
    ReadOnly,
    Failed,
    /// Not resolved within device.deadline_ms (counted as failed too).
    Deadline,
}

/// What became of a group this time round.
pub(crate) enum Outcome {
    Success,
    Invalid(Refuse),
    /// Not finished (EAGAIN, or a page discarded mid-install): retry later.
    Retry,
}

impl<O: UffdOps> FaultServer<O> {
    /// Reads and serves every device queue once, and retries groups still pending. Returns
    /// how many groups and malformed entries it handled.
    pub(crate) fn serve_devices(&mut self) -> usize {
        let mut work = 0;
        for d in 0..self.devices.len() {
            if self.devices[d].quarantined || self.devices[d].queue.is_none() {
                continue;
            }
            work += self.retry_pending(d);
            self.incoming.clear();
            // Guarded: reading may flush held-back answers and ring the device's doorbell.
            self.session.watch.enter();
            let read = match self.devices[d].queue.as_mut() {
                Some(q) => q.read(&mut self.incoming),
                None => Ok(()),
            };
            self.session.watch.exit();
            if let Err(e) = read {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    self.quarantine(d, Quarantine::Blocked);
                } else {
                    self.error(format_args!(
                        "reading page requests of device {}: {e}",
                        self.devices[d].dev_id.0
                    ));
                }
                continue;
            }
            let mut incoming = std::mem::take(&mut self.incoming);
            self.drop_reused_cookies(d, &mut incoming);
            let now = Instant::now();
            work += incoming.len();
            let in_flight = self.pending_groups() + incoming.len();
            self.metrics.device_in_flight.set(in_flight);
            for item in &incoming {
                match item {
                    Incoming::Group(g) => {
                        self.devices[d].malformed_run = 0;
                        let c = &self.session.counters;
                        Counters::bump(&c.device_groups);
                        c.device_pages
                            .fetch_add(g.pages.len() as u64, Ordering::Relaxed);
                        self.serve_group(d, g.clone(), now, FaultOutcome::Present);
                    }
                    Incoming::Malformed { cookie, reason } => {
                        self.devices[d].malformed_run += 1;
                        Counters::bump(&self.session.counters.device_malformed);
                        if let Some(cookie) = cookie {
                            // Counted before it is answered, as every answer is.
                            Counters::bump(&self.session.counters.device_invalid);
                            self.respond(
                                d,
                                *cookie,
                                ResponseCode::Invalid,
                                now,
                                FaultOutcome::Invalid,
                            );
                        }
                        tracing::debug!(
                            session = self.session.id(),
                            dev_id = self.devices[d].dev_id.0,
                            reason,
                            "malformed page request"
                        );
                    }
                }
            }
            self.incoming = incoming;
            if self.devices[d].malformed_run >= self.limits.malformed_run {
                // Garbage costs faultd as much as the device can send: stop reading it.
                self.quarantine(d, Quarantine::Malformed(self.limits.malformed_run));
            }
        }
        let in_flight = self.pending_groups();
        self.metrics.device_in_flight.set(in_flight);
        work
    }

    /// The cookie guard. A cookie names one outstanding group of one queue: the kernel picks it
    /// when faultd reads the group (the lowest free one) and frees it when the group is
    /// answered, by faultd or by the kernel itself (it answers every group of the old HWPT
    /// when the VMM replaces it). A cookie faultd reads again while it still holds a group
    /// under it therefore means the held group was answered behind faultd's back and its
    /// cookie handed on: answering it now would answer the new group instead (SUCCESS before
    /// its pages are mapped, or INVALID). So the older group is dropped, unanswered and
    /// counted, whether it waits in `pending` or earlier in this same read (the replace can
    /// land between two read(2)s of one [`FaultQueue::read`]). Only faultd reads its queues
    /// and it answers from the thread that reads them, so every reuse of a cookie is seen
    /// here before any answer under it is written.
    fn drop_reused_cookies(&mut self, d: usize, incoming: &mut Vec<Incoming>) {
        let cookie_of = |item: &Incoming| match item {
            Incoming::Group(g) => Some(g.cookie),
            Incoming::Malformed { cookie, .. } => *cookie,
        };
        let mut newest = std::collections::HashSet::new();
        let mut keep = vec![true; incoming.len()];
        // Newest first: of two entries with one cookie, the later one is the live group.
        for (i, item) in incoming.iter().enumerate().rev() {
            if let Some(c) = cookie_of(item) {
                keep[i] = newest.insert(c);
            }
        }
        let mut dropped = 0u64;
        let c = &self.session.counters;
        let mut i = 0;
        incoming.retain(|item| {
            let kept = keep[i];
            i += 1;
            if !kept {
                dropped += 1;
                if let Incoming::Group(g) = item {
                    // Read all the same: counted as read, never as answered.
                    Counters::bump(&c.device_groups);
                    c.device_pages
                        .fetch_add(g.pages.len() as u64, Ordering::Relaxed);
                }
            }
            kept
        });
        let pending = &mut self.devices[d].pending;
        let held = pending.len();
        pending.retain(|(g, ..)| !newest.contains(&g.cookie));
        dropped += (held - pending.len()) as u64;
        if dropped > 0 {
            c.device_stale_cookies.fetch_add(dropped, Ordering::Relaxed);
            tracing::debug!(
                session = self.session.id(),
                dev_id = self.devices[d].dev_id.0,
                dropped,
                "groups dropped unanswered: their cookies came again (the kernel answered them)"
            );
        }
    }

    /// Groups read and not answered yet, over every device.
    fn pending_groups(&self) -> usize {
        self.devices.iter().map(|d| d.pending.len()).sum()
    }

    fn retry_pending(&mut self, d: usize) -> usize {
        let n = self.devices[d].pending.len();
        for _ in 0..n {
            let Some((group, received, filled)) = self.devices[d].pending.pop_front() else {
                break;
            };
            if received.elapsed() > self.limits.deadline {
                Counters::bump(&self.session.counters.device_deadline);
                let deadline = Outcome::Invalid(Refuse::Deadline);
                self.answer(d, &group, deadline, received, filled);
                continue;
            }
            self.serve_group(d, group, received, filled);
        }
        n
    }

    /// Resolves `group` (read at `received`, having needed `filled` so far) and answers it, or
    /// queues it for a retry.
    fn serve_group(&mut self, d: usize, group: Group, received: Instant, filled: FaultOutcome) {
        self.filled = filled;
        let outcome = self.resolve_group(d, &group);
        let filled = self.filled;
        if let Outcome::Success = outcome {
            self.around_device(d, &group, received);
        }
        match outcome {
            Outcome::Retry => self.devices[d].pending.push_back((group, received, filled)),
            done => self.answer(d, &group, done, received, filled),
        }
    }

    fn answer(
        &mut self,
        d: usize,
        group: &Group,
        outcome: Outcome,
        received: Instant,
        filled: FaultOutcome,
    ) {
        let c = &self.session.counters;
        let (code, served) = match outcome {
            Outcome::Success => {
                Counters::bump(&c.device_success);
                (ResponseCode::Success, filled)
            }
            Outcome::Invalid(why) => {
                // The reason first, the total last: whoever sees the INVALID counted sees why
                // (the iommufd check once read the total between the two).
                Counters::bump(match why {
                    Refuse::OutsideLayout => &c.device_outside,
                    Refuse::ReadOnly => &c.device_read_only,
                    Refuse::Failed | Refuse::Deadline => &c.device_failed,
                });
                Counters::bump(&c.device_invalid);
                let served = match why {
                    Refuse::Deadline => FaultOutcome::Deadline,
                    _ => FaultOutcome::Invalid,
                };
                (ResponseCode::Invalid, served)
            }
            Outcome::Retry => unreachable!("retried groups are not answered"),
        };
        self.respond(d, group.cookie, code, received, served);
    }

    fn respond(
        &mut self,
        d: usize,
        cookie: u32,
        code: ResponseCode,
        received: Instant,
        served: FaultOutcome,
    ) {
        if self.devices[d].quarantined {
            return;
        }
        let Some(queue) = self.devices[d].queue.as_mut() else {
            return; // a pinned device: no groups, nothing to answer
        };
        // Guarded: answering rings the device's doorbell, which its VMM can make block.
        self.session.watch.enter();
        let answered = queue.respond(cookie, code);
        self.session.watch.exit();
        match answered {
            Ok(()) => {}
            Err(iopf::RespondError::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
                // The answer is in the ring; only the wake-up was cut short by the watchdog.
                self.quarantine(d, Quarantine::Blocked);
            }
            Err(e) => {
                Counters::bump(&self.session.counters.device_respond_errors);
                self.error(format_args!(
                    "answering group {cookie} of device {}: {e}",
                    self.devices[d].dev_id.0
                ));
            }
        }
        let took = received.elapsed();
        self.session
            .record_device_latency(took.as_nanos().min(u64::MAX as u128) as u64);
        self.metrics.observe(Source::Device, served, took);
    }

    /// Stops serving device `d`: its VMM made faultd's notification block (the watchdog had to
    /// interrupt it). Its mappings stay until the session ends (the memory stays pinned and
    /// resident meanwhile); its pending groups are dropped unanswered, since answering means
    /// ringing the doorbell that blocked.
    /// Stops serving device `d` (no longer polled nor read); counted, and logged once.
    fn quarantine(&mut self, d: usize, why: Quarantine) {
        let dev = &mut self.devices[d];
        if dev.quarantined {
            return;
        }
        dev.quarantined = true;
        dev.pending.clear();
        Counters::bump(&self.session.counters.device_quarantined);
        let session = self.session.id();
        let (vm, dev_id) = (self.session.vm(), dev.dev_id.0);
        match why {
            Quarantine::Blocked => tracing::warn!(
                session,
                vm,
                dev_id,
                "device quarantined: its VMM made faultd's notification eventfd block"
            ),
            Quarantine::Malformed(run) => tracing::warn!(
                session,
                vm,
                dev_id,
                "device quarantined: limit device_malformed_run = {run} reached (malformed \
                 records in a row)"
            ),
        }
    }

    /// Makes every page of the group resident and mapped for the device.
    fn resolve_group(&mut self, d: usize, group: &Group) -> Outcome {
        let dev = self.devices[d].idx;
        let granule_bytes = self.devices[d].mapper.granule();
        for &(iova, perm) in &group.pages {
            let Some(page) = self.session.layout().lookup(Gpa(iova.0)) else {
                return Outcome::Invalid(Refuse::OutsideLayout);
            };
            let read_only = self.session.layout().region(page.region).read_only();
            if perm.is_write() && read_only {
                return Outcome::Invalid(Refuse::ReadOnly);
            }
            let granule = self.session.map().granule_of(page, granule_bytes);
            let g = match granule {
                Ok(g) => g,
                Err(e) => {
                    self.error(format_args!("device {}: {e}", self.devices[d].dev_id.0));
                    return Outcome::Invalid(Refuse::Failed);
                }
            };
            if self.session.map().is_mapped_for(dev, g) {
                continue;
            }
            if let Some(out) = self.make_resident(g) {
                return out;
            }
            if let Some(out) = self.map_for(d, g, !read_only) {
                return out;
            }
        }
        Outcome::Success
    }

    /// Installs every absent page of `g`. None when all are resident.
    ///
    /// A run of absent zero-fill 4 KiB pages is installed with one UFFDIO_ZEROPAGE for the whole
    /// run: a 64 KiB granule then costs one ioctl instead of sixteen (measured: ~25 us against
    /// ~40 us here).
    pub(crate) fn make_resident(&mut self, g: Granule) -> Option<Outcome> {
        let page_at = |p| s2map::PageRef {
            region: g.first.region,
            page: s2map::PageIdx(p),
        };
        let small = self.session.granule_bytes(g) == g.pages * 4096;
        let end = g.first.page.0 + g.pages;
        let mut p = g.first.page.0;
        while p < end {
            let begin = self.session.map().begin_fault(page_at(p), None);
            match begin {
                Begin::Present => p += 1,
                // Only this thread resolves this VM's pages; a resolution in flight means
                // an earlier one of ours is still pending: come back to it.
                Begin::Joined | Begin::Evicting => return Some(Outcome::Retry),
                Begin::Resolve(s2map::Fill::Zero) if small => {
                    let run_end = {
                        let mut map = self.session.map();
                        let mut q = p + 1;
                        while q < end
                            && map.state(page_at(q)) == s2map::PageState::Absent
                            && map.fill_for(page_at(q)) == s2map::Fill::Zero
                        {
                            map.begin_fault(page_at(q), None);
                            q += 1;
                        }
                        q
                    };
                    let pages: Vec<_> = (p..run_end).map(page_at).collect();
                    if let Err(out) = self.zero_run(&pages) {
                        return Some(out);
                    }
                    p = run_end;
                }
                Begin::Resolve(fill) => {
                    match self.install(self.session.located(page_at(p)), fill) {
                        Ok(()) => {}
                        // Deferred: the page's object chunk is being fetched; the group is tried
                        // again (and answered INVALID at its deadline if it never lands).
                        Err(
                            InstallFail::Retry | InstallFail::Stale | InstallFail::Deferred { .. },
                        ) => return Some(Outcome::Retry),
                        Err(InstallFail::Failed) => return Some(Outcome::Invalid(Refuse::Failed)),
                    }
                    p += 1;
                }
            }
        }
        None
    }

    /// Zero-fills `pages` (contiguous, all Resolving for us) with one ioctl and completes
    /// them. If some turn out present already (EEXIST: the kernel stops there), falls back to
    /// one install per page, which settles each as installed or already present.
    fn zero_run(&mut self, pages: &[s2map::PageRef]) -> Result<(), Outcome> {
        let first = self.session.located(pages[0]);
        let result = self
            .ops
            .zeropage(first.hva, first.size * pages.len() as u64);
        match result {
            Ok(()) => {
                self.filled = self.filled.max(FaultOutcome::Zero);
                let mut stale = false;
                let mut installed = Vec::with_capacity(pages.len());
                let mut map = self.session.map();
                for &page in pages {
                    let resident = map.complete(page).is_ok_and(|c| c.resident);
                    stale |= !resident;
                    if resident {
                        installed.push(page);
                    }
                }
                drop(map);
                // Counted once s2map has them resident (as FaultServer::install does).
                self.session
                    .counters
                    .zero_fills
                    .fetch_add(pages.len() as u64, Ordering::Relaxed);
                for page in installed {
                    self.installed(page);
                }
                if stale {
                    return Err(Outcome::Retry);
                }
                Ok(())
            }
            Err(OpError::Exists) => {
                for &page in pages {
                    let _ = self.session.map().abort(page);
                }
                for &page in pages {
                    let begin = self.session.map().begin_fault(page, None);
                    if let Begin::Resolve(fill) = begin {
                        match self.install(self.session.located(page), fill) {
                            Ok(()) => {}
                            Err(InstallFail::Failed) => {
                                return Err(Outcome::Invalid(Refuse::Failed))
                            }
                            Err(_) => return Err(Outcome::Retry),
                        }
                    }
                }
                Ok(())
            }
            Err(e) => {
                for &page in pages {
                    let _ = self.session.map().abort(page);
                }
                if e == OpError::Retry {
                    Counters::bump(&self.session.counters.retries);
                    return Err(Outcome::Retry);
                }
                self.error(format_args!(
                    "zero-filling {} pages at {:#x}: {e}",
                    pages.len(),
                    first.hva.0
                ));
                Err(Outcome::Invalid(Refuse::Failed))
            }
        }
    }

    /// Maps resident granule `g` in device `d`'s IOMMU and records it. None on success.
    pub(crate) fn map_for(&mut self, d: usize, g: Granule, writable: bool) -> Option<Outcome> {
        let bytes = self.session.granule_bytes(g);
        if !self.make_pin_room(bytes) {
            self.error(format_args!(
                "device {}: pin limit of {} bytes leaves no room for a granule",
                self.devices[d].dev_id.0, self.limits.pin_limit
            ));
            return Some(Outcome::Invalid(Refuse::Failed));
        }
        if let Some(out) = self.map_granule_in(d, g, writable) {
            return Some(out);
        }
        let dev = self.devices[d].idx;
        if !self.devices[d].pinned {
            // Only granules of faulting devices may be taken back for the pin limit.
            self.lru.push_back((dev, g, self.next_gen));
        }
        None
    }

    /// Maps resident granule `g` in device `d`'s IOMMU and records it in s2map, without
    /// making room under the pin limit. None on success.
    pub(crate) fn map_granule_in(
        &mut self,
        d: usize,
        g: Granule,
        writable: bool,
    ) -> Option<Outcome> {
        match self.try_map_granule(d, g, writable) {
            Ok(()) => None,
            Err(why) => {
                self.error(format_args!("device {}: {why}", self.devices[d].dev_id.0));
                Some(Outcome::Invalid(Refuse::Failed))
            }
        }
    }

    /// [`Self::map_granule_in`] with the reason of a failure, for a caller that reports it
    /// (a pinned attach refuses with it).
    pub(crate) fn try_map_granule(
        &mut self,
        d: usize,
        g: Granule,
        writable: bool,
    ) -> Result<(), String> {
        let bytes = self.session.granule_bytes(g);
        let Some((iova, target)) = self.session.map_target(g) else {
            // Devices are refused at attach for such memory; never reached.
            return Err("guest RAM has no fd to map".into());
        };
        let target = MapTarget {
            va: target.0,
            fd: target.1,
            offset: target.2,
        };
        let pinned = self.devices[d].pinned;
        let mapped = self.devices[d]
            .mapper
            .map(Iova(iova), bytes, target, writable);
        match mapped {
            // Exists for a faulting device: the IOMMU had it already (e.g. a mapping s2map
            // lost track of after a discard race); it maps the same memory, so record it.
            Ok(()) => {}
            Err(MapError::Exists) if !pinned => {}
            // A pinned attach maps only granules s2map says are not mapped for the device: an
            // IOVA already taken in its IOMMU holds whatever the client put there, not the
            // guest RAM faultd would map, so it is not taken as done.
            Err(e) => {
                let e = crate::ops::logging::chain(&e);
                return Err(format!("mapping {iova:#x}+{bytes:#x}: {e}"));
            }
        }
        let dev = self.devices[d].idx;
        let recorded = self.session.map().map_granule(dev, g);
        if let Err(e) = recorded {
            // Cannot happen (every page was made resident above, nothing ran between), but if
            // it did, the device must not keep a mapping s2map does not know: take it back.
            let _ = self.devices[d].mapper.unmap(Iova(iova), bytes);
            return Err(format!("s2map refused a device mapping: {e}"));
        }
        self.next_gen += 1;
        self.mapping_gen.insert((dev, g), self.next_gen);
        if pinned {
            self.pinned_bytes += bytes;
        }
        Ok(())
    }

    /// Unmaps least recently mapped granules until `bytes` more fit the pin limit.
    fn make_pin_room(&mut self, bytes: u64) -> bool {
        loop {
            let pinned = self.session.map().stats().device_mapped_bytes;
            if pinned + bytes <= self.limits.pin_limit {
                return true;
            }
            let Some((dev, g, generation)) = self.lru.pop_front() else {
                return false;
            };
            if self.mapping_gen.get(&(dev, g)) != Some(&generation) {
                continue; // unmapped (and maybe mapped again) since this entry was pushed
            }
            if self.unmap_granule(dev, g) {
                Counters::bump(&self.session.counters.device_pin_evictions);
            }
        }
    }

    /// Removes device `dev`'s mapping of `g` from its IOMMU, then from s2map. Returns whether
    /// anything was unmapped.
    pub(crate) fn unmap_granule(&mut self, dev: DeviceIdx, g: Granule) -> bool {
        if !self.session.map().is_mapped_for(dev, g) {
            return false;
        }
        let Some(d) = self.devices.iter().position(|x| x.idx == dev) else {
            return false;
        };
        let iova = self.session.iova_of(g);
        let bytes = self.session.granule_bytes(g);
        // The IOMMU first: the device can no longer reach the memory once this returns.
        if let Err(e) = self.devices[d].mapper.unmap(Iova(iova), bytes) {
            self.error(format_args!(
                "device {}: unmapping {iova:#x}+{bytes:#x}: {e}",
                self.devices[d].dev_id.0
            ));
            if !matches!(e, MapError::NotMapped) {
                return false;
            }
        }
        let _ = self.session.map().unmap_granule(dev, g);
        self.mapping_gen.remove(&(dev, g));
        if self.devices[d].pinned {
            self.pinned_bytes -= bytes;
            if let Some(share) = self.pin_share.as_mut() {
                share.release(bytes);
            }
        }
        true
    }

    /// Unmaps every device mapping of pages touching `[gpa, gpa+len)` (before a discard).
    pub(crate) fn unmap_devices_in(&mut self, gpa: Gpa, len: u64) {
        let mapped = self.session.map().device_granules_in(gpa, len);
        for (dev, g) in mapped {
            self.unmap_granule(dev, g);
        }
    }

    /// Answers every group device `d` left pending INVALID (a device must never be left
    /// waiting).
    pub(crate) fn shutdown_device(&mut self, d: usize) {
        while let Some((group, received, filled)) = self.devices[d].pending.pop_front() {
            if self.devices[d].quarantined {
                break;
            }
            let failed = Outcome::Invalid(Refuse::Failed);
            self.answer(d, &group, failed, received, filled);
        }
    }

    /// At the end of the session: answer every pending group INVALID (a device must never be
    /// left waiting), and unmap every granule (unpinning its pages).
    pub(crate) fn shutdown_devices(&mut self) {
        self.abandon_pinning();
        for d in 0..self.devices.len() {
            self.shutdown_device(d);
            let dev = self.devices[d].idx;
            let granules = self.session.map().granules_of(dev);
            for g in granules {
                self.unmap_granule(dev, g);
            }
        }
    }
}

//! Pinned mode: a device that cannot fault (no PRI) gets its DMA-able RAM resident and mapped
//! up front, and kept so while it is attached.
//!
//! The attach runs on the session's fault thread, in slices of at most [`PIN_SLICE_BYTES`]
//! per pass of the serving loop: each pass first serves the uffd events and device groups that
//! are waiting, then one slice. A large attach therefore delays this VM's other faults by one
//! slice at most, and other VMs (other threads) not at all. Each granule is filled by the path
//! a device fault takes (`FaultServer::make_resident`: the snapshot, faultd's store or zeros,
//! installed by uffd into the VMM's memory) and then mapped in the device's IOMMU and recorded
//! in s2map as device-mapped. Only when every granule is mapped is the attach reported done.
//!
//! Limits are checked before anything is mapped: the bytes pinned devices map must stay within
//! `device.pin_limit_mib` (granules of faulting devices are not counted: they are taken back
//! under that limit as before), and the pages to fill must fit below the high watermarks of the
//! VM's and the global memory budget. On any failure, everything the attach mapped is unmapped
//! and the device is removed: nothing is left half-mapped.
//!
//! While attached, pinned granules are never evicted: eviction, budget enforcement and the
//! pin limit pass over them. A discard (REMOVE) of a pinned range unmaps it as for any device
//! mapping (the VMM gave the memory up). Removing the device or ending the session unmaps all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use s2map::{DeviceIdx, Gpa, PageRef};

use crate::engine::device::{Device, Outcome};
use crate::engine::FaultServer;
use crate::kernel::uffd::UffdOps;

/// Most bytes one pass of the serving loop makes resident and maps for a pinned attach.
/// At the zero-fill cost measured for device granules (~25 µs per 64 KiB), a slice is about
/// 1 ms of work.
pub const PIN_SLICE_BYTES: u64 = 2 << 20;

/// A pinned attach that has not finished within this long is abandoned (undone).
const PIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a pinned attach was refused or undone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// Over `device.pin_limit_mib`.
    #[error(
        "pinning {want} bytes would exceed the pin limit: pinned devices of this VM map {pinned} \
         bytes already, the limit (device.pin_limit_mib) is {limit} bytes"
    )]
    PinLimit {
        /// Bytes the attach would map.
        want: u64,
        /// Bytes pinned devices of this VM map now.
        pinned: u64,
        /// The limit.
        limit: u64,
    },
    /// Over `device.pin_total_mib`: all VMs' pinned devices together.
    #[error(
        "pinning {want} bytes would exceed the pin limit of all VMs together: pinned devices map \
         {pinned} bytes already, the limit (device.pin_total_mib) is {limit} bytes"
    )]
    PinTotal {
        /// Bytes the attach would map.
        want: u64,
        /// Bytes all VMs' pinned devices hold now.
        pinned: u64,
        /// The limit.
        limit: u64,
    },
    /// Over a memory budget's high watermark.
    #[error(
        "pinning needs {absent} more resident bytes; with {resident} resident now that exceeds \
         the {which} memory budget's high watermark of {high} bytes"
    )]
    Budget {
        /// "VM's" or "global".
        which: &'static str,
        /// Bytes to make resident.
        absent: u64,
        /// Resident bytes now (this VM's, or all VMs').
        resident: u64,
        /// The high watermark.
        high: u64,
    },
    /// Filling or mapping a granule failed; everything mapped was undone.
    #[error("pinning failed at {gpa:#x}: {why}; everything it had mapped was unmapped")]
    Failed {
        /// The granule's guest address.
        gpa: u64,
        /// What failed.
        why: String,
    },
    /// The session ended or the device was removed before the attach finished.
    #[error("the attach was abandoned: the device was removed or the session ended")]
    Abandoned,
}

/// The bytes all VMs' pinned devices may map together (`device.pin_total_mib`), shared by
/// every fault thread. Pinned memory cannot be evicted, so without it a few tenants could pin
/// what every other VM needs to fault into (each VM alone is held to `device.pin_limit_mib`).
#[derive(Debug)]
pub struct PinPool {
    limit: u64,
    used: AtomicU64,
}

impl PinPool {
    /// A pool of `limit` bytes, none used.
    pub fn new(limit: u64) -> PinPool {
        PinPool {
            limit,
            used: AtomicU64::new(0),
        }
    }

    /// Bytes held now by all VMs.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit; else the bytes used now.
    fn reserve(&self, bytes: u64) -> Result<(), u64> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(bytes).filter(|&n| n <= self.limit)
            })
            .map(|_| ())
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
    }
}

/// One VM's part of the [`PinPool`]: an attach takes what it asks for up front, gives back
/// what it did not map when it ends, and each pinned granule unmapped gives its bytes back;
/// whatever is left goes back when the VM's fault server is dropped.
#[derive(Debug)]
pub(crate) struct PinShare {
    pool: Arc<PinPool>,
    held: u64,
}

impl PinShare {
    pub(crate) fn new(pool: Arc<PinPool>) -> PinShare {
        PinShare { pool, held: 0 }
    }

    pub(crate) fn release(&mut self, bytes: u64) {
        let bytes = bytes.min(self.held);
        self.held -= bytes;
        self.pool.release(bytes);
    }
}

impl Drop for PinShare {
    fn drop(&mut self) {
        self.pool.release(self.held);
    }
}

/// A pinned attach in progress.
#[derive(Debug)]
pub(crate) struct Pinning {
    dev: DeviceIdx,
    ranges: Vec<(Gpa, u64)>,
    /// Index into `ranges` and offset within it of the next granule.
    range: usize,
    offset: u64,
    granule: u64,
    mapped: u64,
    started: Instant,
    /// The last slice stopped on a fill in flight (an object chunk) or an unread layout event:
    /// the thread may sleep until the chunk's doorbell or the uffd wakes it.
    waiting: bool,
    reply: Sender<Result<u64, PinError>>,
}

impl<O: UffdOps> FaultServer<O> {
    /// Checks the limits and starts a pinned attach of `device` over `ranges` (granule
    /// aligned, inside the layout: validated by the control plane). The outcome goes to `reply`
    /// once the last slice is mapped.
    pub(crate) fn start_pinning(
        &mut self,
        device: Device,
        ranges: Vec<(Gpa, u64)>,
        reply: Sender<Result<u64, PinError>>,
    ) {
        let dev_id = device.dev_id.0;
        if self.pinning.is_some() {
            // The control plane waits for each attach; a second one cannot arrive meanwhile.
            self.session.release_device(dev_id);
            let _ = reply.send(Err(PinError::Abandoned));
            return;
        }
        if let Err(e) = self.check_pin_limits(&ranges) {
            self.session.release_device(dev_id);
            let _ = reply.send(Err(e));
            return;
        }
        // Last, so that nothing is held for an attach refused above.
        if let Some(share) = self.pin_share.as_mut() {
            let want: u64 = ranges.iter().map(|r| r.1).sum();
            if let Err(pinned) = share.pool.reserve(want) {
                let limit = share.pool.limit;
                self.session.release_device(dev_id);
                let _ = reply.send(Err(PinError::PinTotal {
                    want,
                    pinned,
                    limit,
                }));
                return;
            }
            share.held += want;
        }
        let granule = device.mapper.granule();
        let dev = device.idx;
        self.add_device(device);
        self.pinning = Some(Pinning {
            dev,
            ranges,
            range: 0,
            offset: 0,
            granule,
            mapped: 0,
            started: Instant::now(),
            waiting: false,
            reply,
        });
    }

    fn check_pin_limits(&mut self, ranges: &[(Gpa, u64)]) -> Result<(), PinError> {
        let want: u64 = ranges.iter().map(|r| r.1).sum();
        let limit = self.limits.pin_limit;
        if self.pinned_bytes.saturating_add(want) > limit {
            return Err(PinError::PinLimit {
                want,
                pinned: self.pinned_bytes,
                limit,
            });
        }
        let Some(limits) = self.budget.as_ref().map(|b| b.limits) else {
            return Ok(());
        };
        let mut absent = 0;
        {
            let (map, layout) = (self.session.map(), self.session.layout());
            for &(start, len) in ranges {
                let mut off = 0;
                while off < len {
                    let Some(p) = layout.lookup(Gpa(start.0 + off)) else {
                        break;
                    };
                    let size = layout.region(p.region).page_size().bytes();
                    if map.state(p) != s2map::PageState::Resident {
                        absent += size;
                    }
                    off += size;
                }
            }
        }
        let (own, global) = self.report_resident();
        for (which, budget, resident) in [
            ("VM's", limits.session, own),
            ("global", limits.global, global),
        ] {
            let high = super::budget::share(budget, limits.high_pct);
            if budget > 0 && resident + absent > high {
                return Err(PinError::Budget {
                    which,
                    absent,
                    resident,
                    high,
                });
            }
        }
        Ok(())
    }

    /// Whether a pinned attach has slices left that nothing but the serving loop will run:
    /// the loop must then come back at once instead of sleeping in poll(2), since no fd
    /// becomes ready for them.
    pub fn pin_pending(&self) -> bool {
        self.pinning.as_ref().is_some_and(|p| !p.waiting)
    }

    /// Runs one slice of the pinned attach in progress, if any. Returns 1 while it is not
    /// done, else 0.
    pub(crate) fn pin_slice(&mut self) -> usize {
        let Some(p) = self.pinning.as_mut() else {
            return 0;
        };
        p.waiting = false;
        let (dev, granule) = (p.dev, p.granule);
        let Some(d) = self.devices.iter().position(|x| x.idx == dev) else {
            self.end_pinning(Err(PinError::Abandoned));
            return 0;
        };
        if p.started.elapsed() > PIN_TIMEOUT {
            let gpa = p.ranges.get(p.range).map_or(0, |r| r.0 .0 + p.offset);
            self.fail_pinning(d, gpa, format!("not done within {PIN_TIMEOUT:?}"));
            return 0;
        }
        let mut done = 0;
        while done < PIN_SLICE_BYTES {
            let Some(p) = self.pinning.as_mut() else {
                return 0;
            };
            let Some(&(start, len)) = p.ranges.get(p.range) else {
                let mapped = p.mapped;
                tracing::info!(
                    session = self.session.id(),
                    dev_id = self.devices[d].dev_id.0,
                    mapped,
                    took_ms = p.started.elapsed().as_millis() as u64,
                    "pinned device mapped"
                );
                self.end_pinning(Ok(mapped));
                return 0;
            };
            let gpa = Gpa(start.0 + p.offset);
            let Some(page) = self.session.layout().lookup(gpa) else {
                self.fail_pinning(d, gpa.0, "outside the guest layout".into());
                return 0;
            };
            let g = self.session.map().granule_of(page, granule);
            let g = match g {
                Ok(g) => g,
                Err(e) => {
                    self.fail_pinning(d, gpa.0, e.to_string());
                    return 0;
                }
            };
            if !self.session.map().is_mapped_for(dev, g) {
                match self.make_resident(g) {
                    None => {}
                    // A fill of ours is in flight, or a layout event is unread: the next pass
                    // serves it first.
                    Some(Outcome::Retry) => {
                        if let Some(p) = self.pinning.as_mut() {
                            p.waiting = true;
                        }
                        return 1;
                    }
                    Some(_) => {
                        self.fail_pinning(d, gpa.0, "filling the page failed (see log)".into());
                        return 0;
                    }
                }
                let writable = !self.session.layout().region(page.region).read_only();
                if let Err(e) = self.try_map_granule(d, g, writable) {
                    let why = format!("mapping it in the device's IOMMU failed: {e}");
                    self.fail_pinning(d, gpa.0, why);
                    return 0;
                }
            }
            done += granule;
            if let Some(p) = self.pinning.as_mut() {
                p.mapped += granule;
                p.offset += granule;
                if p.offset >= len {
                    p.range += 1;
                    p.offset = 0;
                }
            }
        }
        1
    }

    /// The session ends: a pinned attach in progress is reported abandoned (its mappings go
    /// with every other device's).
    pub(crate) fn abandon_pinning(&mut self) {
        self.end_pinning(Err(PinError::Abandoned));
    }

    fn end_pinning(&mut self, result: Result<u64, PinError>) {
        // What the attach took and did not map (it failed, or was abandoned) goes back.
        if let Some(share) = self.pin_share.as_mut() {
            share.release(share.held.saturating_sub(self.pinned_bytes));
        }
        if let Some(p) = self.pinning.take() {
            let _ = p.reply.send(result);
        }
    }

    /// Undoes the attach in progress on device `d`: unmaps everything, removes the device.
    fn fail_pinning(&mut self, d: usize, gpa: u64, why: String) {
        let dev_id = self.devices[d].dev_id.0;
        self.error(format_args!("pinned device {dev_id}: at {gpa:#x}: {why}"));
        self.detach(d);
        self.end_pinning(Err(PinError::Failed { gpa, why }));
    }

    /// Detaches device `dev_id` (a `remove_device` request): its pending groups are answered
    /// INVALID, all its mappings removed. Returns the bytes unmapped (None: no such device).
    pub(crate) fn remove_device(&mut self, dev_id: u32) -> Option<u64> {
        let d = self.devices.iter().position(|x| x.dev_id.0 == dev_id)?;
        if self
            .pinning
            .as_ref()
            .is_some_and(|p| p.dev == self.devices[d].idx)
        {
            self.end_pinning(Err(PinError::Abandoned));
        }
        Some(self.detach(d))
    }

    fn detach(&mut self, d: usize) -> u64 {
        self.shutdown_device(d);
        let dev = self.devices[d].idx;
        let mut unmapped = 0;
        let pinned = self.devices[d].pinned;
        let granules = self.session.map().granules_of(dev);
        for g in granules {
            let bytes = self.session.granule_bytes(g);
            if self.unmap_granule(dev, g) {
                unmapped += bytes;
                if pinned {
                    // Evictable again: back at the old end of the eviction order (eviction
                    // drops pinned pages from it; a page still listed is skipped when stale).
                    for p in (0..g.pages).rev() {
                        let page = PageRef {
                            region: g.first.region,
                            page: s2map::PageIdx(g.first.page.0 + p),
                        };
                        self.install_order.push_front(page);
                    }
                }
            }
        }
        let device = self.devices.remove(d);
        self.around.forget_device(d);
        self.session.release_device(device.dev_id.0);
        unmapped
    }

    /// Whether `page` is mapped by a pinned device (never evicted while it is).
    pub(crate) fn is_pinned(&self, page: PageRef) -> bool {
        if self.pinned_bytes == 0 {
            return false;
        }
        let map = self.session.map();
        if !map.is_device_mapped(page) {
            return false;
        }
        let region = self.session.layout().region(page.region);
        let (gpa, size) = (region.page_gpa(page.page), region.page_size().bytes());
        map.device_granules_in(gpa, size)
            .iter()
            .any(|(dev, _)| self.devices.iter().any(|x| x.idx == *dev && x.pinned))
    }
}

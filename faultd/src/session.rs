//! A session: one VMM's registered guest, its stage-2 state and its counters.
//!
//! The session owns the fds the VMM handed over and the one [`s2map::S2Map`] that every fault
//! source of this VM (the vCPU fault thread now, device fault queues later) asks before it
//! installs a page. Fault service itself lives in [`crate::vcpu`].

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use faultd_proto::{LatencySummary, SessionStats};
use hdrhistogram::Histogram;
use s2map::{Gpa, Layout, PageRef, S2Map};

/// A host virtual address in the VMM's address space (not faultd's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hva(pub u64);

/// Where one layout region lives in the VMM.
#[derive(Debug)]
pub struct ServedRegion {
    /// Start of the VMM's shared mapping of the region.
    pub hva: Hva,
    /// The guest RAM fd (shared by regions carved from one memfd).
    pub mem: Arc<OwnedFd>,
    /// Offset of the region in `mem`.
    pub mem_offset: u64,
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
    /// Faults on pages found present.
    pub already_present: AtomicU64,
    /// EAGAIN retries.
    pub retries: AtomicU64,
    /// Pages discarded by the VMM.
    pub discarded_pages: AtomicU64,
    /// Faults that could not be served.
    pub errors: AtomicU64,
}

impl Counters {
    /// Adds one to `c` (relaxed: counters order nothing).
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// One registered VM.
#[derive(Debug)]
pub struct Session {
    id: u64,
    vm: String,
    map: Mutex<S2Map<Waiter>>,
    /// A copy of the (immutable) layout, so locating a fault takes no lock.
    layout: Layout,
    regions: Vec<ServedRegion>,
    /// Region indexes sorted by HVA, for locating a faulting address.
    by_hva: Vec<usize>,
    snapshot: Option<File>,
    /// Counters.
    pub counters: Counters,
    latency: Mutex<Histogram<u64>>,
}

impl Session {
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
        Session {
            id,
            vm,
            map: Mutex::new(S2Map::new(layout.clone())),
            layout,
            regions,
            by_hva,
            snapshot,
            counters: Counters::default(),
            // 1 ns .. 60 s at 3 significant digits: fixed bounds keep recording allocation-free.
            latency: Mutex::new(
                Histogram::new_with_bounds(1, 60_000_000_000, 3)
                    .expect("constant, valid histogram bounds"),
            ),
        }
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
        self.snapshot.as_ref()
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

    /// Records one fault's service time.
    pub fn record_latency(&self, nanos: u64) {
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        // Saturate instead of failing on an out-of-range sample (a 60 s stall is still news).
        h.saturating_record(nanos.max(1));
    }

    /// A snapshot of the counters for the control protocol.
    pub fn stats(&self) -> SessionStats {
        let (guest_bytes, resident_bytes) = {
            let map = self.map();
            (map.layout().total_bytes(), map.stats().resident_bytes)
        };
        let latency_us = {
            let h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
            let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            LatencySummary {
                count: h.len(),
                p50: us(0.5),
                p90: us(0.9),
                p99: us(0.99),
                max: h.max() as f64 / 1000.0,
            }
        };
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SessionStats {
            session: self.id,
            guest_bytes,
            resident_bytes,
            vcpu_faults: get(&c.vcpu_faults),
            zero_fills: get(&c.zero_fills),
            file_fills: get(&c.file_fills),
            already_present: get(&c.already_present),
            retries: get(&c.retries),
            discarded_pages: get(&c.discarded_pages),
            errors: get(&c.errors),
            latency_us,
        }
    }
}

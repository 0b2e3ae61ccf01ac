//! The guest-physical map of one VM: its layout (validated regions, O(1) gpa -> page lookup) and
//! the residency state of every guest page, with coalescing of concurrent faults on one page into
//! a single resolution.
//!
//! Owns: layout validation, address translation, per-page state and its transitions, in-flight
//! resolutions and their waiters, discard bookkeeping, counters. Refuses: all I/O (reading
//! snapshots, installing pages, talking to userfaultfd or the IOMMU), threads and locking (the
//! caller serialises access), and eviction policy. Every illegal transition is refused with an
//! error, never a panic; only a `PageRef`/`RegionIdx` that did not come from this layout panics,
//! as slice indexing does.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;

// Page indices are u64 and index per-page Vecs; `as usize` on them is lossless only on 64-bit.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("s2map indexes per-page metadata with u64 page indices and needs a 64-bit usize");

/// Most regions one layout may hold (matches the protocol's limit). Keeps directory entries u16.
pub const MAX_REGIONS: usize = 256;

/// Lookup directory slot size: 2 MiB, the largest page size, so a slot never splits a page.
const DIR_SHIFT: u32 = 21;
/// Hard ceiling on directory entries (8 MiB of u16), whatever the RAM size.
const DIR_MAX_SLOTS: u64 = 1 << 22;
/// A directory this small (8 KiB, 8 GiB of span) is always affordable.
const DIR_MIN_SLOTS: u64 = 1 << 12;
/// Beyond the minimum, allow 16 slots per 2 MiB of RAM (16 KiB per GiB): a sparser layout (e.g.
/// RAM at 0 and at 1 TiB) falls back to binary search, which is O(log 256) anyway.
const DIR_SPARSITY: u64 = 16;

/// Guest physical address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gpa(pub u64);

impl fmt::Display for Gpa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Index into [`Layout::regions`] (sorted by gpa, not the order the specs were given in).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegionIdx(pub u32);

/// Index of a page within its region, in units of the region's page size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageIdx(pub u64);

/// One guest page: the unit of state and of resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageRef {
    pub region: RegionIdx,
    pub page: PageIdx,
}

impl fmt::Display for PageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "region {} page {}", self.region.0, self.page.0)
    }
}

/// Page size of a region: the granularity at which it is faulted, resolved and discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
}

impl PageSize {
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
        }
    }

    pub const fn bytes(self) -> u64 {
        1 << self.shift()
    }

    pub const fn from_bytes(bytes: u64) -> Option<Self> {
        match bytes {
            0x1000 => Some(PageSize::Size4K),
            0x20_0000 => Some(PageSize::Size2M),
            _ => None,
        }
    }
}

/// Where a never-resident page's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backing {
    Zero,
    /// A snapshot file; the region's page `i` is at `offset + i * page size`.
    File {
        offset: u64,
    },
}

/// A region as the caller describes it; [`Layout::new`] validates it into a [`Region`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSpec {
    pub gpa: Gpa,
    pub size: u64,
    pub page_size: PageSize,
    pub backing: Backing,
    pub read_only: bool,
}

/// A validated region: page-aligned, non-empty, not wrapping the address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    spec: RegionSpec,
}

impl Region {
    pub fn gpa(&self) -> Gpa {
        self.spec.gpa
    }

    pub fn size(&self) -> u64 {
        self.spec.size
    }

    /// Exclusive end. Cannot overflow: `Layout::new` refused `gpa + size > u64::MAX`.
    pub fn end(&self) -> Gpa {
        Gpa(self.spec.gpa.0 + self.spec.size)
    }

    pub fn page_size(&self) -> PageSize {
        self.spec.page_size
    }

    pub fn backing(&self) -> Backing {
        self.spec.backing
    }

    pub fn read_only(&self) -> bool {
        self.spec.read_only
    }

    pub fn page_count(&self) -> u64 {
        self.spec.size >> self.spec.page_size.shift()
    }

    /// First byte of `page`.
    ///
    /// # Panics
    /// If `page` is not below [`Region::page_count`].
    pub fn page_gpa(&self, page: PageIdx) -> Gpa {
        assert!(
            page.0 < self.page_count(),
            "page {} outside region of {} pages",
            page.0,
            self.page_count()
        );
        Gpa(self.spec.gpa.0 + (page.0 << self.spec.page_size.shift()))
    }
}

/// Why a list of [`RegionSpec`]s is not a valid layout. `index` is the spec's position as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("layout has no regions")]
    NoRegions,
    #[error("layout has {count} regions, more than the maximum {max}")]
    TooManyRegions { count: usize, max: usize },
    #[error("region {index}: size is zero")]
    ZeroSize { index: usize },
    #[error("region {index}: size {size:#x} is not a multiple of its page size {page_size:#x}")]
    SizeNotPageMultiple {
        index: usize,
        size: u64,
        page_size: u64,
    },
    #[error("region {index}: gpa {gpa} is not aligned to its page size {page_size:#x}")]
    GpaMisaligned {
        index: usize,
        gpa: Gpa,
        page_size: u64,
    },
    #[error("region {index}: gpa {gpa} + size {size:#x} overflows the address space")]
    GpaOverflow { index: usize, gpa: Gpa, size: u64 },
    #[error(
        "region {index}: file offset {offset:#x} is not aligned to its page size {page_size:#x}"
    )]
    FileOffsetMisaligned {
        index: usize,
        offset: u64,
        page_size: u64,
    },
    #[error("region {index}: file offset {offset:#x} + size {size:#x} overflows u64")]
    FileOffsetOverflow {
        index: usize,
        offset: u64,
        size: u64,
    },
    #[error("region {first} [{first_gpa}, {first_end}) overlaps region {second} at {second_gpa}")]
    Overlap {
        first: usize,
        first_gpa: Gpa,
        first_end: Gpa,
        second: usize,
        second_gpa: Gpa,
    },
}

fn validate(index: usize, s: &RegionSpec) -> Result<(), LayoutError> {
    let page_size = s.page_size.bytes();
    // Page sizes are powers of two; masks instead of `is_multiple_of`, which is newer than the
    // workspace's rust-version (1.85).
    let misaligned = |v: u64| v & (page_size - 1) != 0;
    if s.size == 0 {
        return Err(LayoutError::ZeroSize { index });
    }
    if misaligned(s.gpa.0) {
        return Err(LayoutError::GpaMisaligned {
            index,
            gpa: s.gpa,
            page_size,
        });
    }
    if misaligned(s.size) {
        return Err(LayoutError::SizeNotPageMultiple {
            index,
            size: s.size,
            page_size,
        });
    }
    if s.gpa.0.checked_add(s.size).is_none() {
        return Err(LayoutError::GpaOverflow {
            index,
            gpa: s.gpa,
            size: s.size,
        });
    }
    if let Backing::File { offset } = s.backing {
        if misaligned(offset) {
            return Err(LayoutError::FileOffsetMisaligned {
                index,
                offset,
                page_size,
            });
        }
        // Checked once here so that fill offsets (offset + page * page size) never overflow.
        if offset.checked_add(s.size).is_none() {
            return Err(LayoutError::FileOffsetOverflow {
                index,
                offset,
                size: s.size,
            });
        }
    }
    Ok(())
}

/// The validated, gpa-sorted regions of one VM, with an O(1) lookup directory.
#[derive(Clone)]
pub struct Layout {
    regions: Vec<Region>,
    /// Lowest gpa of any region: directory slot 0 starts here.
    base: u64,
    /// Slot `s` covers `[base + s * 2 MiB, base + (s + 1) * 2 MiB)` and holds the index of the
    /// first region ending above the slot's start (`regions.len()` when none: the sentinel).
    /// Empty when the layout is too sparse for it; lookups then binary-search `regions`.
    dir: Vec<u16>,
    total_bytes: u64,
}

impl fmt::Debug for Layout {
    // The directory can have millions of entries; its size is all a reader needs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layout")
            .field("regions", &self.regions)
            .field("dir_slots", &self.dir.len())
            .field("total_bytes", &self.total_bytes)
            .finish()
    }
}

impl Layout {
    pub fn new(specs: Vec<RegionSpec>) -> Result<Layout, LayoutError> {
        if specs.is_empty() {
            return Err(LayoutError::NoRegions);
        }
        if specs.len() > MAX_REGIONS {
            return Err(LayoutError::TooManyRegions {
                count: specs.len(),
                max: MAX_REGIONS,
            });
        }
        for (index, spec) in specs.iter().enumerate() {
            validate(index, spec)?;
        }
        let mut sorted: Vec<(usize, RegionSpec)> = specs.into_iter().enumerate().collect();
        sorted.sort_by_key(|(_, s)| s.gpa);
        // Sorted by start, any overlap shows up between neighbours: if a overlaps c, then b
        // (between them) starts before a ends.
        for pair in sorted.windows(2) {
            let ((first, a), (second, b)) = (&pair[0], &pair[1]);
            let first_end = Gpa(a.gpa.0 + a.size);
            if b.gpa < first_end {
                return Err(LayoutError::Overlap {
                    first: *first,
                    first_gpa: a.gpa,
                    first_end,
                    second: *second,
                    second_gpa: b.gpa,
                });
            }
        }
        let regions: Vec<Region> = sorted
            .into_iter()
            .map(|(_, spec)| Region { spec })
            .collect();
        // Disjoint regions all end at or below u64::MAX, so their sizes sum to at most u64::MAX.
        let total_bytes = regions.iter().map(Region::size).sum();
        let base = regions[0].gpa().0; // non-empty: checked above
        let dir = build_directory(&regions, base, total_bytes);
        Ok(Layout {
            regions,
            base,
            dir,
            total_bytes,
        })
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// # Panics
    /// If `idx` is not an index of this layout.
    pub fn region(&self, idx: RegionIdx) -> &Region {
        &self.regions[idx.0 as usize]
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The page holding `gpa`, or None in a hole or outside every region. O(1) through the
    /// directory; a layout too sparse for a small directory (more than 16 slots per 2 MiB of
    /// RAM beyond an 8 KiB floor, 8 MiB at most) has none and binary-searches its <= 256 regions.
    pub fn lookup(&self, gpa: Gpa) -> Option<PageRef> {
        let i = self.first_ending_after(gpa);
        let r = self.regions.get(i)?;
        if gpa < r.gpa() {
            return None;
        }
        Some(PageRef {
            region: RegionIdx(i as u32), // i < MAX_REGIONS
            page: PageIdx((gpa.0 - r.gpa().0) >> r.page_size().shift()),
        })
    }

    /// Index of the first region whose end is above `gpa`; `regions.len()` if none.
    fn first_ending_after(&self, gpa: Gpa) -> usize {
        if self.dir.is_empty() {
            return self.regions.partition_point(|r| r.end() <= gpa);
        }
        let Some(off) = gpa.0.checked_sub(self.base) else {
            return 0;
        };
        let slot = usize::try_from(off >> DIR_SHIFT).ok();
        let Some(&start) = slot.and_then(|s| self.dir.get(s)) else {
            return self.regions.len();
        };
        // Every region skipped here ends after the slot's start and at or below gpa, i.e.
        // inside this 2 MiB slot: bounded by the region boundaries within one slot.
        let mut i = usize::from(start);
        while self.regions.get(i).is_some_and(|r| r.end() <= gpa) {
            i += 1;
        }
        i
    }

    fn directory_bytes(&self) -> usize {
        self.dir.capacity() * std::mem::size_of::<u16>()
    }
}

fn build_directory(regions: &[Region], base: u64, total_bytes: u64) -> Vec<u16> {
    let Some(last) = regions.last() else {
        return Vec::new();
    };
    let slots = (last.end().0 - base).div_ceil(1 << DIR_SHIFT);
    let ram_slots = total_bytes.div_ceil(1 << DIR_SHIFT);
    let limit = DIR_MAX_SLOTS.min(DIR_MIN_SLOTS.max(ram_slots.saturating_mul(DIR_SPARSITY)));
    if slots > limit {
        return Vec::new();
    }
    let mut dir = Vec::with_capacity(slots as usize);
    let mut i = 0;
    for s in 0..slots {
        // s * 2 MiB < span, so this stays below the last region's end: no overflow.
        let slot_start = Gpa(base + (s << DIR_SHIFT));
        while regions.get(i).is_some_and(|r| r.end() <= slot_start) {
            i += 1;
        }
        dir.push(i as u16); // i <= MAX_REGIONS < u16::MAX
    }
    dir
}

/// Residency of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PageState {
    /// Never installed, or discarded/aborted since: a fault must resolve it.
    Absent = 0,
    /// A resolution is in flight; further faults join it.
    Resolving = 1,
    /// Installed: faults on it are answered at once.
    Resident = 2,
    /// Being evicted: write-protected, its contents being saved, about to be dropped. Faults
    /// on it join (they are served from the store once the eviction finishes).
    Evicting = 3,
}

impl fmt::Display for PageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PageState::Absent => "absent",
            PageState::Resolving => "resolving",
            PageState::Resident => "resident",
            PageState::Evicting => "evicting",
        })
    }
}

// Per-page byte: bits 0-2 hold the state code (0-2 used; 3-7 reserved for Evicting, ...),
// bits 3-5 are spare flags, bit 6 is DEVICE_MAPPED, bit 7 is ZEROED.
const STATE_MASK: u8 = 0b0000_0111;
/// The page lies in a granule some device has mapped (pinned). Only ever set on a Resident page,
/// and no transition leaves Resident while it is set: device-mapped implies resident.
const FLAG_DEVICE_MAPPED: u8 = 0b0100_0000;
/// The page was discarded: its content is zero, whatever the backing says. Sticky, so that a
/// discarded page never resurrects stale snapshot bytes.
const FLAG_ZEROED: u8 = 0b1000_0000;
const STATE_COUNT: usize = 4;

fn decode(byte: u8) -> PageState {
    match byte & STATE_MASK {
        1 => PageState::Resolving,
        2 => PageState::Resident,
        3 => PageState::Evicting,
        // Only `set_state` writes the code, and only with the values above and 0.
        _ => PageState::Absent,
    }
}

/// Where a resolution takes the page's bytes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fill {
    Zero,
    /// Absolute offset in the region's backing file.
    File {
        offset: u64,
    },
    /// A slot of the daemon's swap store, where an eviction saved the page.
    Store {
        slot: u32,
    },
}

/// What the caller must do about a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Begin {
    /// The page was absent and is now resolving: fill it from here, then `complete` or `abort`.
    Resolve(Fill),
    /// Another resolution is in flight; the waiter is queued on it. Nothing more to do.
    Joined,
    /// The page is resident; answer at once. The waiter was not queued.
    Present,
    /// The page is being evicted; the waiter was not queued. Retry once the eviction is done
    /// (the page is then absent and resolves from the store).
    Evicting,
}

/// The end of a successful resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion<W> {
    /// Every waiter queued on the resolution, in arrival order.
    pub waiters: Vec<W>,
    /// False if the page was discarded mid-resolution: it is absent again, and the waiters must
    /// retry (their re-fault resolves with zero fill; an "already present" answer settles it).
    pub resident: bool,
    /// The store slot the page was installed from, now free for reuse.
    pub freed_slot: Option<u32>,
}

/// Counters kept up to date on every transition (O(1) to read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    pub total_pages: u64,
    pub absent_pages: u64,
    pub resolving_pages: u64,
    pub resident_pages: u64,
    pub resident_bytes: u64,
    /// In-flight resolutions (always equal to `resolving_pages`).
    pub in_flight: u64,
    /// Waiters queued on in-flight resolutions.
    pub waiters: u64,
    /// Bytes in granules some device has mapped (pinned).
    pub device_mapped_bytes: u64,
    /// Granules some device has mapped.
    pub device_granules: u64,
    /// Pages whose contents are in the store.
    pub stored_pages: u64,
    /// Bytes of those pages (each counted at its region's page size).
    pub stored_bytes: u64,
    /// Pages being evicted.
    pub evicting_pages: u64,
}

/// A refused page transition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("complete on {page}: page is {state}, not resolving")]
    CompleteNotResolving { page: PageRef, state: PageState },
    #[error("abort on {page}: page is {state}, not resolving")]
    AbortNotResolving { page: PageRef, state: PageState },
    #[error("granule of {pages} pages at {first}: {why}")]
    BadGranule {
        first: PageRef,
        pages: u64,
        why: &'static str,
    },
    #[error("mapping the granule at {first} for a device: {page} is {state}, not resident")]
    GranuleNotResident {
        first: PageRef,
        page: PageRef,
        state: PageState,
    },
    #[error("unmapping the granule at {first}: not mapped for device {device}")]
    GranuleNotMapped { first: PageRef, device: u8 },
    #[error("device index {0} is out of range (at most {MAX_DEVICES} devices per VM)")]
    BadDevice(u8),
    #[error("evicting {page}: page is {state}, not resident")]
    EvictNotResident { page: PageRef, state: PageState },
    #[error("evicting {page}: a device has it mapped; unmap the granule first")]
    EvictDeviceMapped { page: PageRef },
    #[error("finishing the eviction of {page}: page is {state}, not evicting")]
    FinishNotEvicting { page: PageRef, state: PageState },
    #[error("restoring {page} from the journal: page is {state}, not absent")]
    RestoreNotAbsent { page: PageRef, state: PageState },
}

/// Most devices one VM may have mapping its memory (one bit each in a granule's device mask).
pub const MAX_DEVICES: usize = 32;

/// A device of this VM, numbered by the daemon (0..MAX_DEVICES).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceIdx(pub u8);

/// The unit a device maps in its IOMMU: `pages` pages (a power of two) of one region, starting
/// at a page index aligned to `pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Granule {
    pub first: PageRef,
    pub pages: u64,
}

/// What `map_granule` changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapped {
    /// No device had the granule: it is now pinned (counted in device-mapped bytes).
    Pinned,
    /// Another device had it already; this device is added, nothing more is pinned.
    Shared,
    /// This device had it already.
    Already,
}

/// The result of a discard.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Discarded {
    /// Pages that were resident.
    pub resident_pages: u64,
    /// Bytes of those pages (each counted at its region's page size).
    pub resident_bytes: u64,
    /// Device mappings the discard had to drop from the state because the caller had not
    /// unmapped them first: the caller must now unmap these in the IOMMU. Empty for a caller
    /// that unmaps `device_granules_in` the range before discarding.
    pub dropped_mappings: Vec<(DeviceIdx, Granule)>,
    /// Store slots of discarded evicted pages, now free.
    pub freed_slots: Vec<u32>,
}

#[derive(Debug)]
struct InFlight<W> {
    waiters: Vec<W>,
    /// The page was discarded while this resolution ran, so its install may be stale.
    stale: bool,
}

/// Page states of one VM. `W` is the daemon's waiter token (e.g. a page-request-group id).
#[derive(Debug)]
pub struct S2Map<W> {
    layout: Layout,
    /// One byte per page, per region (see STATE_MASK / FLAG_ZEROED).
    pages: Vec<Vec<u8>>,
    /// Exactly the Resolving pages.
    in_flight: HashMap<PageRef, InFlight<W>>,
    /// Pages per state code.
    counts: [u64; STATE_COUNT],
    resident_bytes: u64,
    waiters: u64,
    /// Device-mapped granules, keyed by (region, first page), with the mask of devices mapping
    /// each. Bounded by the pin limit the daemon enforces, so a map and not a per-page array.
    granules: HashMap<(RegionIdx, u64), (u64, u32)>,
    device_mapped_bytes: u64,
    /// Evicted pages whose contents are in a store slot. Only evicted pages: bounded by what
    /// the budget pushed out, so a map rather than a per-page array.
    stored: HashMap<PageRef, u32>,
    /// Bytes of the pages in `stored`, kept with it ([`S2Map::store_slot`], [`S2Map::unstore`]).
    stored_bytes: u64,
    /// Evicting pages the VMM discarded meanwhile.
    evict_discarded: std::collections::HashSet<PageRef>,
}

impl<W> S2Map<W> {
    /// All pages start absent. Allocates one byte per page.
    pub fn new(layout: Layout) -> Self {
        let pages: Vec<Vec<u8>> = layout
            .regions
            .iter()
            .map(|r| vec![PageState::Absent as u8; r.page_count() as usize])
            .collect();
        let mut counts = [0; STATE_COUNT];
        counts[PageState::Absent as usize] = layout.regions.iter().map(Region::page_count).sum();
        S2Map {
            layout,
            pages,
            in_flight: HashMap::new(),
            counts,
            resident_bytes: 0,
            waiters: 0,
            granules: HashMap::new(),
            device_mapped_bytes: 0,
            stored: HashMap::new(),
            stored_bytes: 0,
            evict_discarded: std::collections::HashSet::new(),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// # Panics
    /// If `page` is not a page of this layout (as for every method taking a `PageRef`).
    pub fn state(&self, page: PageRef) -> PageState {
        decode(self.byte(page))
    }

    pub fn fill_for(&self, page: PageRef) -> Fill {
        if let Some(&slot) = self.stored.get(&page) {
            return Fill::Store { slot };
        }
        let zeroed = self.byte(page) & FLAG_ZEROED != 0;
        let region = self.layout.region(page.region);
        match region.backing() {
            Backing::File { offset } if !zeroed => {
                // Below offset + size, which Layout::new checked for overflow.
                Fill::File {
                    offset: offset + (page.page.0 << region.page_size().shift()),
                }
            }
            _ => Fill::Zero,
        }
    }

    /// A fault arrived on `page`. `waiter` is handed back when the resolution ends; None when
    /// the caller needs no release (e.g. the kernel wakes uffd-blocked threads itself).
    pub fn begin_fault(&mut self, page: PageRef, waiter: Option<W>) -> Begin {
        match self.state(page) {
            PageState::Absent => {
                let fill = self.fill_for(page);
                self.set_state(page, PageState::Resolving);
                self.waiters += u64::from(waiter.is_some());
                self.in_flight.insert(
                    page,
                    InFlight {
                        waiters: waiter.into_iter().collect(),
                        stale: false,
                    },
                );
                Begin::Resolve(fill)
            }
            PageState::Resolving => {
                if let (Some(w), Some(entry)) = (waiter, self.in_flight.get_mut(&page)) {
                    entry.waiters.push(w);
                    self.waiters += 1;
                }
                Begin::Joined
            }
            PageState::Evicting => Begin::Evicting,
            PageState::Resident => Begin::Present,
        }
    }

    /// The resolution of `page` ended with the page installed (or found already present).
    pub fn complete(&mut self, page: PageRef) -> Result<Completion<W>, StateError> {
        // The in-flight map holds exactly the Resolving pages, so it is the state check.
        let Some(entry) = self.in_flight.remove(&page) else {
            return Err(StateError::CompleteNotResolving {
                page,
                state: self.state(page),
            });
        };
        let resident = !entry.stale;
        // Installed from the store (or over it): the stored copy is now stale.
        let freed_slot = if resident { self.unstore(page) } else { None };
        self.set_state(
            page,
            if resident {
                PageState::Resident
            } else {
                PageState::Absent
            },
        );
        self.waiters -= entry.waiters.len() as u64;
        Ok(Completion {
            waiters: entry.waiters,
            resident,
            freed_slot,
        })
    }

    /// The resolution of `page` failed: the page is absent again; its waiters must retry or be
    /// answered with an error.
    pub fn abort(&mut self, page: PageRef) -> Result<Vec<W>, StateError> {
        let Some(entry) = self.in_flight.remove(&page) else {
            return Err(StateError::AbortNotResolving {
                page,
                state: self.state(page),
            });
        };
        self.set_state(page, PageState::Absent);
        self.waiters -= entry.waiters.len() as u64;
        Ok(entry.waiters)
    }

    /// `page` was found installed without a fault (e.g. another request's resolution got
    /// EEXIST). Absent becomes Resident; a Resolving page is left to its in-flight resolution.
    /// Returns whether the state changed.
    pub fn mark_present(&mut self, page: PageRef) -> bool {
        if self.state(page) != PageState::Absent {
            return false;
        }
        self.set_state(page, PageState::Resident);
        true
    }

    /// The VMM discarded `[gpa, gpa + len)` (userfaultfd REMOVE: balloon, MADV_REMOVE). Every page
    /// touching the range, even partly (the kernel discards whole pages), fills with zero from now
    /// on; resident ones become absent, resolving ones have their resolution marked stale.
    ///
    /// A device-mapped page must be unmapped first (see [`S2Map::device_granules_in`]); one that
    /// is not has its mappings dropped here and reported, so device-mapped still implies
    /// resident.
    pub fn discard(&mut self, gpa: Gpa, len: u64) -> Discarded {
        let mut out = Discarded::default();
        for (dev, g) in self.device_granules_in(gpa, len) {
            // Infallible: the granule was just listed as mapped for `dev`.
            let _ = self.unmap_granule(dev, g);
            out.dropped_mappings.push((dev, g));
        }
        for page in self.pages_in(gpa, len) {
            self.pages[page.region.0 as usize][page.page.0 as usize] |= FLAG_ZEROED;
            out.freed_slots.extend(self.unstore(page));
            match self.state(page) {
                PageState::Resident => {
                    self.set_state(page, PageState::Absent);
                    out.resident_pages += 1;
                    out.resident_bytes += self.page_bytes(page);
                }
                PageState::Resolving => {
                    if let Some(entry) = self.in_flight.get_mut(&page) {
                        entry.stale = true;
                    }
                }
                // Discarded mid-eviction: the saved copy must not come back (finish_evict
                // hands its slot back instead of keeping it).
                PageState::Evicting => {
                    self.evict_discarded.insert(page);
                }
                PageState::Absent => {}
            }
        }
        out
    }

    /// Every page touching `[gpa, gpa + len)`, in gpa order.
    fn pages_in(&self, gpa: Gpa, len: u64) -> Vec<PageRef> {
        let mut out = Vec::new();
        if len == 0 {
            return out;
        }
        // Regions end at or below u64::MAX, so saturating loses no page.
        let end = gpa.0.saturating_add(len);
        let mut i = self.layout.first_ending_after(gpa);
        while let Some(r) = self.layout.regions.get(i) {
            if r.gpa().0 >= end {
                break;
            }
            let (start, shift) = (r.gpa().0, r.page_size().shift());
            let first = (gpa.0.max(start) - start) >> shift;
            let last = (end.min(r.end().0) - start).div_ceil(r.page_size().bytes());
            out.extend((first..last).map(|p| PageRef {
                region: RegionIdx(i as u32),
                page: PageIdx(p),
            }));
            i += 1;
        }
        out
    }

    /// Starts evicting resident `page`: Resident -> Evicting. Refused while a device maps it:
    /// the IOMMU mapping must go first, so no DMA can write the page while it is saved.
    pub fn begin_evict(&mut self, page: PageRef) -> Result<(), StateError> {
        let state = self.state(page);
        if state != PageState::Resident {
            return Err(StateError::EvictNotResident { page, state });
        }
        if self.is_device_mapped(page) {
            return Err(StateError::EvictDeviceMapped { page });
        }
        self.set_state(page, PageState::Evicting);
        Ok(())
    }

    /// The eviction of `page` is done: its contents were saved to `slot` (None: they were all
    /// zero, nothing saved) and it was dropped. Evicting -> Absent; the next fault fills it
    /// from the slot (or with zeros). Returns a slot the caller must free: `slot` itself if the
    /// VMM discarded the page meanwhile (its contents are zero now, not the saved ones).
    pub fn finish_evict(
        &mut self,
        page: PageRef,
        slot: Option<u32>,
    ) -> Result<Option<u32>, StateError> {
        let state = self.state(page);
        if state != PageState::Evicting {
            return Err(StateError::FinishNotEvicting { page, state });
        }
        let discarded = self.evict_discarded.remove(&page);
        let freed = match slot {
            Some(slot) if !discarded => {
                self.store_slot(page, slot);
                None
            }
            Some(slot) => Some(slot),
            None => {
                self.pages[page.region.0 as usize][page.page.0 as usize] |= FLAG_ZEROED;
                None
            }
        };
        self.set_state(page, PageState::Absent);
        Ok(freed)
    }

    /// The eviction of `page` failed before it was dropped: Evicting -> Resident.
    pub fn cancel_evict(&mut self, page: PageRef) -> Result<(), StateError> {
        let state = self.state(page);
        if state != PageState::Evicting {
            return Err(StateError::FinishNotEvicting { page, state });
        }
        let discarded = self.evict_discarded.remove(&page);
        self.set_state(
            page,
            if discarded {
                PageState::Absent
            } else {
                PageState::Resident
            },
        );
        Ok(())
    }

    /// A restarted daemon rebuilds the state of an absent page from its journal: the page's
    /// contents are in store `slot` (Some) or are zero whatever the backing says (None).
    /// Refused unless the page is Absent: a page found in guest memory is authoritative there.
    pub fn restore_absent(&mut self, page: PageRef, slot: Option<u32>) -> Result<(), StateError> {
        let state = self.state(page);
        if state != PageState::Absent {
            return Err(StateError::RestoreNotAbsent { page, state });
        }
        match slot {
            Some(slot) => {
                self.store_slot(page, slot);
            }
            None => {
                self.unstore(page);
                self.pages[page.region.0 as usize][page.page.0 as usize] |= FLAG_ZEROED;
            }
        }
        Ok(())
    }

    fn page_bytes(&self, page: PageRef) -> u64 {
        self.layout.region(page.region).page_size().bytes()
    }

    /// Records `page`'s contents as in store `slot` (replacing a slot it had).
    fn store_slot(&mut self, page: PageRef, slot: u32) {
        if self.stored.insert(page, slot).is_none() {
            self.stored_bytes += self.page_bytes(page);
        }
    }

    /// Forgets `page`'s store slot, returning it if it had one.
    fn unstore(&mut self, page: PageRef) -> Option<u32> {
        let slot = self.stored.remove(&page);
        if slot.is_some() {
            self.stored_bytes -= self.page_bytes(page);
        }
        slot
    }

    /// Every stored page with its slot, in no particular order (what a journal compaction
    /// writes).
    pub fn stored_pages(&self) -> impl Iterator<Item = (PageRef, u32)> + '_ {
        self.stored.iter().map(|(&p, &s)| (p, s))
    }

    /// Absent pages of file-backed regions that fill with zero instead of the file (discarded
    /// or evicted as zero), as runs of (first page, pages). Zero-backed regions have none:
    /// zero is their default. What a journal compaction writes besides the stored pages.
    pub fn zeroed_runs(&self) -> Vec<(PageRef, u64)> {
        let mut out = Vec::new();
        for (ri, r) in self.layout.regions.iter().enumerate() {
            if !matches!(r.backing(), Backing::File { .. }) {
                continue;
            }
            let mut run: Option<(u64, u64)> = None;
            for (pi, &b) in self.pages[ri].iter().enumerate() {
                let zeroed = b & FLAG_ZEROED != 0 && decode(b) == PageState::Absent;
                match (&mut run, zeroed) {
                    (Some((_, n)), true) => *n += 1,
                    (None, true) => run = Some((pi as u64, 1)),
                    (Some(_), false) => {
                        let (first, n) = run.take().expect("matched Some");
                        out.push((page_ref(ri, first), n));
                    }
                    (None, false) => {}
                }
            }
            if let Some((first, n)) = run {
                out.push((page_ref(ri, first), n));
            }
        }
        out
    }

    /// The granule of `granule_bytes` containing `page`. Errors if `granule_bytes` is not a
    /// power-of-two multiple of the region's page size or the granule does not fit the region.
    pub fn granule_of(&self, page: PageRef, granule_bytes: u64) -> Result<Granule, StateError> {
        let region = self.layout.region(page.region);
        let ps = region.page_size().bytes();
        let pages = granule_bytes / ps;
        let bad = |why| StateError::BadGranule {
            first: page,
            pages,
            why,
        };
        if granule_bytes < ps || !granule_bytes.is_power_of_two() {
            return Err(bad(
                "granule is not a power-of-two multiple of the page size",
            ));
        }
        let first = PageRef {
            region: page.region,
            page: PageIdx(page.page.0 & !(pages - 1)),
        };
        if first.page.0 + pages > region.page_count() {
            return Err(bad("granule extends past the end of its region"));
        }
        Ok(Granule { first, pages })
    }

    /// Device `dev` maps granule `g` (after the IOMMU mapping is installed). Every page of it
    /// must be resident: a device must never reach a missing page.
    pub fn map_granule(&mut self, dev: DeviceIdx, g: Granule) -> Result<Mapped, StateError> {
        let bit = device_bit(dev)?;
        self.check_granule(g)?;
        let key = (g.first.region, g.first.page.0);
        if let Some((_, mask)) = self.granules.get_mut(&key) {
            if *mask & bit != 0 {
                return Ok(Mapped::Already);
            }
            *mask |= bit;
            return Ok(Mapped::Shared);
        }
        for page in granule_pages(g) {
            let state = self.state(page);
            if state != PageState::Resident {
                return Err(StateError::GranuleNotResident {
                    first: g.first,
                    page,
                    state,
                });
            }
        }
        for page in granule_pages(g) {
            self.pages[page.region.0 as usize][page.page.0 as usize] |= FLAG_DEVICE_MAPPED;
        }
        self.granules.insert(key, (g.pages, bit));
        self.device_mapped_bytes += self.granule_bytes(g);
        Ok(Mapped::Pinned)
    }

    /// Device `dev` no longer maps `g` (after the IOMMU unmap completed). Returns true when no
    /// device maps it any more (it is unpinned; its pages may be evicted).
    pub fn unmap_granule(&mut self, dev: DeviceIdx, g: Granule) -> Result<bool, StateError> {
        let bit = device_bit(dev)?;
        let key = (g.first.region, g.first.page.0);
        let not_mapped = StateError::GranuleNotMapped {
            first: g.first,
            device: dev.0,
        };
        let Some((pages, mask)) = self.granules.get_mut(&key) else {
            return Err(not_mapped);
        };
        if *mask & bit == 0 || *pages != g.pages {
            return Err(not_mapped);
        }
        *mask &= !bit;
        if *mask != 0 {
            return Ok(false);
        }
        self.granules.remove(&key);
        for page in granule_pages(g) {
            self.pages[page.region.0 as usize][page.page.0 as usize] &= !FLAG_DEVICE_MAPPED;
        }
        self.device_mapped_bytes -= self.granule_bytes(g);
        Ok(true)
    }

    /// Whether some device maps the granule holding `page`.
    pub fn is_device_mapped(&self, page: PageRef) -> bool {
        self.byte(page) & FLAG_DEVICE_MAPPED != 0
    }

    /// Whether device `dev` maps granule `g`.
    pub fn is_mapped_for(&self, dev: DeviceIdx, g: Granule) -> bool {
        let key = (g.first.region, g.first.page.0);
        device_bit(dev).is_ok_and(|bit| {
            self.granules
                .get(&key)
                .is_some_and(|&(pages, mask)| pages == g.pages && mask & bit != 0)
        })
    }

    /// Every (device, granule) mapping that covers a page touching `[gpa, gpa + len)`.
    pub fn device_granules_in(&self, gpa: Gpa, len: u64) -> Vec<(DeviceIdx, Granule)> {
        let mut out: Vec<(DeviceIdx, Granule)> = Vec::new();
        if self.granules.is_empty() {
            return out;
        }
        // Granules are aligned powers of two, so a page's granule key follows from its size;
        // a VM uses one or a few sizes.
        let mut sizes: Vec<u64> = self.granules.values().map(|&(pages, _)| pages).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let mut seen = std::collections::HashSet::new();
        for page in self.pages_in(gpa, len) {
            if !self.is_device_mapped(page) {
                continue;
            }
            for &pages in &sizes {
                let first = page.page.0 & !(pages - 1);
                let Some(&(p, mask)) = self.granules.get(&(page.region, first)) else {
                    continue;
                };
                if p != pages || !seen.insert((page.region, first)) {
                    continue;
                }
                let g = Granule {
                    first: PageRef {
                        region: page.region,
                        page: PageIdx(first),
                    },
                    pages,
                };
                out.extend(
                    (0..MAX_DEVICES as u8)
                        .filter(|d| mask & (1 << d) != 0)
                        .map(|d| (DeviceIdx(d), g)),
                );
            }
        }
        out
    }

    /// Every granule device `dev` maps (to unmap them all when the device goes away).
    pub fn granules_of(&self, dev: DeviceIdx) -> Vec<Granule> {
        let Ok(bit) = device_bit(dev) else {
            return Vec::new();
        };
        let mut out: Vec<Granule> = self
            .granules
            .iter()
            .filter(|(_, &(_, mask))| mask & bit != 0)
            .map(|(&(region, first), &(pages, _))| Granule {
                first: PageRef {
                    region,
                    page: PageIdx(first),
                },
                pages,
            })
            .collect();
        out.sort_unstable();
        out
    }

    fn check_granule(&self, g: Granule) -> Result<(), StateError> {
        let bad = |why| StateError::BadGranule {
            first: g.first,
            pages: g.pages,
            why,
        };
        let region = self.layout.regions.get(g.first.region.0 as usize);
        let Some(region) = region else {
            return Err(bad("region is not in this layout"));
        };
        if !g.pages.is_power_of_two() || g.first.page.0 & (g.pages - 1) != 0 {
            return Err(bad("granule is not a power of two pages, aligned"));
        }
        if g.first.page.0 + g.pages > region.page_count() {
            return Err(bad("granule extends past the end of its region"));
        }
        Ok(())
    }

    fn granule_bytes(&self, g: Granule) -> u64 {
        g.pages * self.layout.region(g.first.region).page_size().bytes()
    }

    pub fn stats(&self) -> Stats {
        let count = |s: PageState| self.counts[s as usize];
        Stats {
            total_pages: self.counts.iter().sum(),
            absent_pages: count(PageState::Absent),
            resolving_pages: count(PageState::Resolving),
            resident_pages: count(PageState::Resident),
            resident_bytes: self.resident_bytes,
            in_flight: self.in_flight.len() as u64,
            waiters: self.waiters,
            device_mapped_bytes: self.device_mapped_bytes,
            device_granules: self.granules.len() as u64,
            stored_pages: self.stored.len() as u64,
            stored_bytes: self.stored_bytes,
            evicting_pages: count(PageState::Evicting),
        }
    }

    /// Heap bytes of the per-page state and the lookup directory (not the in-flight map, which
    /// only holds pages being resolved).
    pub fn metadata_bytes(&self) -> usize {
        self.pages.iter().map(Vec::capacity).sum::<usize>() + self.layout.directory_bytes()
    }

    fn byte(&self, page: PageRef) -> u8 {
        self.pages[page.region.0 as usize][page.page.0 as usize]
    }

    fn set_state(&mut self, page: PageRef, new: PageState) {
        let bytes = self.layout.region(page.region).page_size().bytes();
        let byte = &mut self.pages[page.region.0 as usize][page.page.0 as usize];
        let old = decode(*byte);
        // Every path that leaves Resident unmaps the page's granule first (discard does).
        debug_assert!(
            *byte & FLAG_DEVICE_MAPPED == 0 || new == PageState::Resident,
            "{page}: device-mapped page leaving resident"
        );
        *byte = (*byte & !STATE_MASK) | new as u8;
        self.counts[old as usize] -= 1;
        self.counts[new as usize] += 1;
        if old == PageState::Resident {
            self.resident_bytes -= bytes;
        }
        if new == PageState::Resident {
            self.resident_bytes += bytes;
        }
    }
}

fn device_bit(dev: DeviceIdx) -> Result<u32, StateError> {
    if (dev.0 as usize) < MAX_DEVICES {
        Ok(1 << dev.0)
    } else {
        Err(StateError::BadDevice(dev.0))
    }
}

fn page_ref(region: usize, page: u64) -> PageRef {
    PageRef {
        region: RegionIdx(region as u32),
        page: PageIdx(page),
    }
}

fn granule_pages(g: Granule) -> impl Iterator<Item = PageRef> {
    (g.first.page.0..g.first.page.0 + g.pages).map(move |p| PageRef {
        region: g.first.region,
        page: PageIdx(p),
    })
}

#[cfg(test)]
mod tests;

//! Eviction: taking a page back from a VM. The sequence for one page, in [`FaultServer::evict_page`]:
//! unmap it from every device, write-protect it, save it to the store and journal where it is,
//! punch it out of guest memory, mark it absent in s2map, un-protect.

use super::FaultServer;
use crate::engine::session::Counters;
use crate::engine::store::{Record, Store};
use crate::kernel::uffd::{OpError, UffdOps};
use std::collections::VecDeque;
use std::io;

/// How much [`FaultServer::evict_oldest`] takes back, and for whom.
#[derive(Debug, Clone, Copy)]
pub(super) enum Quota {
    /// At least this many bytes, for a budget.
    BudgetBytes(u64),
    /// This many pages, for an operator.
    Pages(u64),
}

impl Quota {
    pub(super) fn met(self, freed_bytes: u64, evicted: u64) -> bool {
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
    Store(#[from] crate::engine::store::StoreError),
    /// Punching the page out of the memfd failed.
    #[error("dropping the page from guest memory")]
    Drop(#[source] nix::Error),
    /// A pinned device maps the page: it stays resident while that device is attached.
    #[error("the page is pinned for a device")]
    Pinned,
    /// The session has no memory fd for the page (not memfd-backed).
    #[error("the page has no memory fd")]
    NoMemory,
}

impl<O: UffdOps> FaultServer<O> {
    /// Evicts resident pages, oldest-installed first, device-mapped ones only when nothing
    /// else is left, until `quota` is met or no resident page is left. Anonymous memory is
    /// paged out instead, by `pagemap` if the caller has just read it.
    pub(super) fn evict_oldest(
        &mut self,
        quota: Quota,
        pagemap: Option<Vec<Vec<crate::kernel::remote::PageStatus>>>,
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
            if mapped && self.is_pinned(page) {
                // Dropped from the eviction order while pinned (scanning it again at every
                // enforcement would cost each fault batch the whole pinned range); the detach
                // puts its pages back ([`FaultServer::remove_device`]).
                continue;
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
            // Evictions above may have read a discard (REMOVE) that took this page since it
            // was passed over: it is absent now, which is no failure.
            if self.session.map().state(page) != s2map::PageState::Resident {
                continue;
            }
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
    pub(super) fn evict_counted(
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
            // A layout event is unread (a discard): the page stays resident, nothing failed.
            Err(EvictError::WriteProtect {
                source: OpError::Retry,
                ..
            })
            | Err(EvictError::Pinned) => 0,
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
}

impl<O: UffdOps> FaultServer<O> {
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
                // A layout event is unread (a discard): the page stays resident, nothing failed.
                Err(EvictError::WriteProtect {
                    source: OpError::Retry,
                    ..
                }) => {}
                // Pinned for a device: passed over, not a failure.
                Err(EvictError::Pinned) => {}
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
    /// The order is the point (it was run on this kernel and loses nothing):
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
    ///
    /// Saving before write-protecting would lose a write that lands between the two: the
    /// unit test `evicting_with_save_before_write_protect_loses_a_write_made_between_them`
    /// runs that order and shows it.
    pub fn evict_page(&mut self, page: s2map::PageRef) -> Result<bool, EvictError> {
        let at = self.session.located(page);
        let gpa = self
            .session
            .layout()
            .region(page.region)
            .page_gpa(page.page);
        // 0. A pinned device's page stays (its device cannot fault it back in).
        if self.is_pinned(page) {
            return Err(EvictError::Pinned);
        }
        // 1.
        self.unmap_devices_in(gpa, at.size);
        // 2.
        self.session.map().begin_evict(page)?;
        // 4. before 3.: only a test does that, to show what it loses.
        let saved_early = self
            .saves_before_protecting()
            .then(|| self.save(page, at.size));
        // 3.
        if let Err(source) = self.ops.write_protect(at.hva, at.size) {
            let _ = self.session.map().cancel_evict(page);
            if let (Some(Ok(Some(slot))), Some(store)) = (saved_early, &mut self.store) {
                store.free(slot);
            }
            return Err(EvictError::WriteProtect {
                hva: at.hva.0,
                source,
            });
        }
        // 4. and 5.
        let saved = saved_early
            .unwrap_or_else(|| self.save(page, at.size))
            .and_then(|slot| self.punch(page, at.size, slot));
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
            // EAGAIN here is a discard's REMOVE event not read yet. A writer blocked in the WP
            // fault would stay blocked (faultd ignores WP fault events): wake it instead (no
            // EAGAIN for a wake). It re-faults MISSING on the absent page and is served from
            // the store like any other fault. The chaos test with discards hung without this.
            if e == OpError::Retry && self.ops.wake(at.hva, at.size).is_ok() {
                Counters::bump(&self.session.counters.retries);
            } else {
                self.error(format_args!(
                    "clearing write-protect at {:#x}: {e}",
                    at.hva.0
                ));
            }
        }
        Counters::bump(&self.session.counters.evictions);
        self.session
            .counters
            .evicted_bytes
            .fetch_add(at.size, std::sync::atomic::Ordering::Relaxed);
        self.maybe_compact();
        finished?;
        Ok(slot.is_some())
    }

    /// Whether [`FaultServer::evict_page`] saves before write-protecting: never, except in the
    /// unit test that shows what that order loses.
    #[cfg(not(test))]
    fn saves_before_protecting(&self) -> bool {
        false
    }

    #[cfg(test)]
    fn saves_before_protecting(&self) -> bool {
        self.save_before_protect
    }

    /// Step 4 of [`FaultServer::evict_page`]: reads the page from the memfd, stores it and
    /// journals where it is. Returns the slot (None: all zero, journaled as zero).
    fn save(&mut self, page: s2map::PageRef, size: u64) -> Result<Option<u32>, EvictError> {
        let (fd, off) = self
            .session
            .mem_location(page)
            .ok_or(EvictError::NoMemory)?;
        let slot_bytes = self.page_buf.len() as u64;
        let buf = &mut self.page_buf[..size as usize];
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
        Ok(slot)
    }

    /// Step 5 of [`FaultServer::evict_page`]: punches the saved page (in `slot`) out of the
    /// memfd; on failure the slot is freed. Returns `slot`.
    fn punch(
        &mut self,
        page: s2map::PageRef,
        size: u64,
        slot: Option<u32>,
    ) -> Result<Option<u32>, EvictError> {
        let (fd, off) = self
            .session
            .mem_location(page)
            .ok_or(EvictError::NoMemory)?;
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
    pub(super) fn journal(&mut self, record: Record) {
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
    pub(super) fn maybe_compact(&mut self) {
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
    pub(super) fn state_records(&self) -> Vec<Record> {
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
}

/// The VM's store in `store`, opened afresh in `dir` if the session has none yet: a session
/// whose start had to stay minimal (Firecracker's) opens it at its first eviction or journal
/// record. `slot_bytes` is the VM's largest page, as for a store opened at session start.
fn open_store<'s>(
    store: &'s mut Option<Store>,
    dir: &std::path::Path,
    vm: &str,
    slot_bytes: u64,
) -> Result<&'s mut Store, crate::engine::store::StoreError> {
    if store.is_none() {
        *store = Some(Store::open(dir, vm, slot_bytes, false)?.0);
    }
    Ok(store.as_mut().expect("opened above"))
}

//! Restart-resume: a VMM that registers again after faultd restarted gets its session back
//! from guest memory (what is present) and the store's journal (where every absent page is).

use super::FaultServer;
use crate::engine::store::Record;
use crate::kernel::uffd::UffdOps;
use std::io;
use std::os::fd::AsFd;

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

impl<O: UffdOps> FaultServer<O> {
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
    pub(super) fn present_pages(&self, ri: usize, vmm_pid: Option<i32>) -> io::Result<Vec<u64>> {
        let region = &self.session.regions()[ri];
        let r = &self.session.layout().regions()[ri];
        let (page, size) = (r.page_size().bytes(), r.size());
        let crate::engine::session::RegionMemory::Shared { fd, offset } = &region.memory else {
            // Anonymous memory (Firecracker's): its pagemap. A page in swap is populated too
            // (the kernel swaps it in; no userfault comes for it).
            let status = match self.session.remote_status() {
                Some(s) => s?,
                None => return Err(io::Error::other("the VMM's memory is not open")),
            };
            return Ok(status[ri]
                .iter()
                .enumerate()
                .filter(|(_, &st)| st != crate::kernel::remote::PageStatus::None)
                .map(|(i, _)| i as u64)
                .collect());
        };
        if page == 4096 {
            crate::kernel::residency::shmem_present(fd.as_fd(), *offset, size, page)
        } else {
            let pid = vmm_pid.ok_or_else(|| io::Error::other("the VMM's pid is unknown"))?;
            crate::kernel::residency::mapped_present(pid, region.hva.0, size, page)
        }
    }
}

//! A VMM's safe teardown: before it ends its session and closes its uffd, every page that is
//! absent from guest RAM but not zero (its bytes are in the snapshot file or in faultd's store)
//! is filled in, so that nothing the guest had depends on faultd any more. Once the uffd is
//! closed, an absent page reads zeros without a fault; with the uffd kept open and nobody
//! serving it, a fault blocks forever. After `finish` the session evicts nothing (an eviction
//! would put a page back where only faultd has it).

use super::{FaultServer, InstallFail};
use crate::kernel::uffd::UffdOps;
use s2map::{Begin, Fill, PageIdx, PageRef, PageState, RegionIdx};

/// What the session's `finish` (`FaultServer::finish`, in this file) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FinishReport {
    /// Pages filled from the snapshot file or the store.
    pub filled: u64,
    /// Pages still absent whose bytes only faultd has (their fills failed: see the log).
    pub remaining: u64,
}

/// Pages filled between two looks at the uffd: faults of vCPUs still running are served
/// meanwhile instead of waiting for the whole pass.
const FILLS_BETWEEN_FAULTS: u64 = 64;

/// Attempts per page when a layout event is pending (EAGAIN): the events are read in between.
const ATTEMPTS: u32 = 8;

impl<O: UffdOps> FaultServer<O> {
    /// Fills every absent page whose fill is not zero, and stops evicting for good.
    pub(crate) fn finish(&mut self) -> FinishReport {
        self.finished = true;
        let mut report = FinishReport::default();
        let counts: Vec<u64> = self
            .session
            .layout()
            .regions()
            .iter()
            .map(|r| r.page_count())
            .collect();
        for (ri, &count) in counts.iter().enumerate() {
            for pi in 0..count {
                let page = PageRef {
                    region: RegionIdx(ri as u32),
                    page: PageIdx(pi),
                };
                if self.fill_page(page) {
                    report.filled += 1;
                    if report.filled.is_multiple_of(FILLS_BETWEEN_FAULTS) {
                        let _ = self.serve_uffd();
                    }
                }
            }
        }
        let map = self.session.map();
        for (ri, &count) in counts.iter().enumerate() {
            for pi in 0..count {
                let page = PageRef {
                    region: RegionIdx(ri as u32),
                    page: PageIdx(pi),
                };
                if map.state(page) != PageState::Resident && map.fill_for(page) != Fill::Zero {
                    report.remaining += 1;
                }
            }
        }
        report
    }

    /// Fills `page` if it is absent and not zero; whether this call filled it.
    fn fill_page(&mut self, page: PageRef) -> bool {
        for _ in 0..ATTEMPTS {
            let begin = {
                let mut map = self.session.map();
                if map.state(page) != PageState::Absent || map.fill_for(page) == Fill::Zero {
                    return false;
                }
                map.begin_fault(page, None)
            };
            let Begin::Resolve(fill) = begin else {
                return false;
            };
            let at = self.session.located(page);
            match self.install(at, fill) {
                Ok(()) => return true,
                // A layout event is unread: read it (and serve what came with it), then again.
                Err(InstallFail::Retry) => {
                    let _ = self.serve_uffd();
                }
                // Discarded meanwhile: it reads zero now, which needs nobody.
                Err(InstallFail::Stale) => return false,
                Err(InstallFail::Failed) => return false,
                // An object chunk not fetched yet: finish does not wait on the network (the
                // VMM is told the page was not filled).
                Err(InstallFail::Deferred { .. }) => return false,
            }
        }
        false
    }
}

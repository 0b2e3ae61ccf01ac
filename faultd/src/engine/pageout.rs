//! Eviction of anonymous guest RAM (a Firecracker restore's) by paging it out to swap.
//!
//! faultd cannot save such a page and drop it (no fd; see [`crate::kernel::remote`]), so the kernel
//! pages it out and swaps it back in on touch. The page stays populated as far as s2map and the
//! userfaultfd are concerned (it never faults to faultd again); what changes is whether it is in
//! RAM, which only the VMM's pagemap knows, so budgets here work from that.

use std::time::{Duration, Instant};

use s2map::{PageRef, PageState};

use super::{EvictReport, FaultServer, Quota, UffdOps};
use crate::kernel::remote::{runs, swap_available, PageStatus};

/// How old a pagemap measurement may be before budget enforcement reads it again. In between,
/// pages installed since are added to it; only the kernel's own swap-ins go unseen that long.
pub(super) const MEASURE_EVERY: Duration = Duration::from_millis(100);

/// How often an idle fault thread of an anonymous-memory VM under a budget looks again: its
/// pages come back by swap-in without any event faultd would see.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(1);

/// What the VMM's pagemap said last.
#[derive(Debug, Default)]
pub(super) struct AnonResidency {
    measured: Option<Measured>,
    /// Whether "no swap" was logged (once per spell without swap, not per batch).
    no_swap_logged: bool,
}

#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Bytes in RAM.
    present: u64,
    /// s2map's populated bytes at the time: installs since are added to `present`.
    populated: u64,
    at: Instant,
}

impl<O: UffdOps> FaultServer<O> {
    /// This VM's bytes in RAM for the budget: for anonymous memory the last pagemap reading
    /// plus what was installed since; otherwise s2map's count.
    pub(super) fn own_resident(&self) -> u64 {
        let populated = self.session.map().stats().resident_bytes;
        match self.anon.measured {
            Some(m) if self.session.is_anonymous() => {
                (m.present as i128 + populated as i128 - m.populated as i128).max(0) as u64
            }
            _ => populated,
        }
    }

    /// Reads the VMM's pagemap again if the last reading is older than [`MEASURE_EVERY`].
    /// Returns what it read, for paging out by it.
    pub(super) fn remeasure_if_stale(&mut self) -> Option<Vec<Vec<PageStatus>>> {
        if !self.session.is_anonymous()
            || self
                .anon
                .measured
                .is_some_and(|m| m.at.elapsed() < MEASURE_EVERY)
            // Without swap nothing can be paged out: not worth reading the pagemap for.
            || !swap_available().unwrap_or(false)
        {
            return None;
        }
        let status = self.session.remote_status()?.ok()?;
        self.measured(&status);
        Some(status)
    }

    /// Records `status`, the pagemap just read, as the last measurement.
    fn measured(&mut self, status: &[Vec<PageStatus>]) {
        self.anon.measured = Some(Measured {
            present: self.session.present_bytes(status),
            populated: self.session.map().stats().resident_bytes,
            at: Instant::now(),
        });
    }

    /// Whether an idle fault thread should wake to look at the budget (see [`IDLE_CHECK`]).
    pub(super) fn needs_idle_check(&self) -> bool {
        self.budget.as_ref().is_some_and(|b| b.limits.is_set())
            && self.session.is_anonymous()
            && self.session.remote().is_some()
    }

    /// Pages out `quota` of the oldest-installed pages that are in RAM, by `pagemap` if it was
    /// just read.
    pub(super) fn page_out_oldest(
        &mut self,
        quota: Quota,
        pagemap: Option<Vec<Vec<PageStatus>>>,
    ) -> EvictReport {
        let Some(status) = self.paging_status(pagemap) else {
            return EvictReport::default();
        };
        let mut chosen = Vec::new();
        let mut kept = Vec::new();
        let mut freed = 0;
        let budget = matches!(quota, Quota::BudgetBytes(_));
        while !quota.met(freed, chosen.len() as u64) {
            let Some(page) = self.install_order.pop_front() else {
                break;
            };
            if self.session.map().state(page) != PageState::Resident {
                continue; // discarded (a balloon) since it was installed
            }
            // A page stays in the order while populated: paged out, it may be swapped back in
            // by the kernel and become a candidate again.
            kept.push(page);
            if status[page.region.0 as usize][page.page.0 as usize] == PageStatus::Present
                && self.session.located(page).size == 4096
            {
                freed += 4096;
                chosen.push(page);
            }
        }
        self.install_order.extend(kept);
        self.page_out(chosen, budget)
    }

    /// Pages out up to `max` pages of `[gpa, gpa+len)` that are in RAM.
    pub(super) fn page_out_range(&mut self, gpa: s2map::Gpa, len: u64, max: u64) -> EvictReport {
        let Some(status) = self.paging_status(None) else {
            return EvictReport::default();
        };
        let chosen: Vec<PageRef> = self
            .session
            .resident_pages_in(gpa, len)
            .into_iter()
            .filter(|p| status[p.region.0 as usize][p.page.0 as usize] == PageStatus::Present)
            .take(max as usize)
            .collect();
        self.page_out(chosen, false)
    }

    /// The pagemap (`known` if given, else read now), if paging out can work now (else logged,
    /// once per spell).
    fn paging_status(
        &mut self,
        known: Option<Vec<Vec<PageStatus>>>,
    ) -> Option<Vec<Vec<PageStatus>>> {
        // Swap first: it is one small read, the pagemap one of 8 bytes per page.
        let why = match swap_available() {
            Ok(false) => crate::kernel::remote::NO_SWAP.into(),
            Err(e) => format!("reading /proc/meminfo: {e}"),
            Ok(true) => match known.map(Ok).or_else(|| self.session.remote_status()) {
                None => "the VMM's memory could not be opened (see the session's start)".into(),
                Some(Err(e)) => format!("reading the VMM's pagemap: {e}"),
                Some(Ok(status)) => {
                    self.anon.no_swap_logged = false;
                    return Some(status);
                }
            },
        };
        if !std::mem::replace(&mut self.anon.no_swap_logged, true) {
            self.error(format_args!(
                "cannot page out this VM's anonymous memory: {why}"
            ));
        }
        None
    }

    /// Pages out `pages` (each in RAM, 4 KiB) and counts what the pagemap then shows gone.
    fn page_out(&mut self, mut pages: Vec<PageRef>, budget: bool) -> EvictReport {
        let mut report = EvictReport::default();
        if pages.is_empty() {
            return report;
        }
        pages.sort_unstable();
        let addrs: Vec<u64> = pages
            .iter()
            .map(|&p| self.session.located(p).hva.0)
            .collect();
        let Some(mm) = self.session.remote() else {
            return report;
        };
        if let Err(e) = mm.page_out(&runs(&addrs, 4096)) {
            report.failed = pages.len() as u64;
            self.error(format_args!(
                "paging out {} pages (process_madvise): {e}",
                pages.len()
            ));
            return report;
        }
        // The kernel takes the advice without saying which pages went: the pagemap does.
        let after = self.session.remote_status();
        let status = match after {
            Some(Ok(s)) => s,
            _ => {
                report.failed = pages.len() as u64;
                return report;
            }
        };
        let mut evicted_bytes = 0;
        for p in &pages {
            if status[p.region.0 as usize][p.page.0 as usize] == PageStatus::Present {
                report.failed += 1;
            } else {
                report.evicted += 1;
                evicted_bytes += self.session.located(*p).size;
            }
        }
        let c = &self.session.counters;
        c.evictions
            .fetch_add(report.evicted, std::sync::atomic::Ordering::Relaxed);
        c.evicted_bytes
            .fetch_add(evicted_bytes, std::sync::atomic::Ordering::Relaxed);
        if budget {
            c.budget_evictions
                .fetch_add(report.evicted, std::sync::atomic::Ordering::Relaxed);
        }
        if report.failed > 0 {
            // Not an error of faultd's: the kernel skips a page the VM is touching at that
            // moment (or one it cannot write out: swap full). The report counts them; a budget
            // takes other pages next time.
            tracing::debug!(
                session = self.session.id(),
                vm = self.session.vm(),
                "{} of {} pages stayed in RAM after MADV_PAGEOUT",
                report.failed,
                pages.len()
            );
        }
        // The pagemap just read is the new measurement: no need to read it again.
        self.measured(&status);
        report
    }
}

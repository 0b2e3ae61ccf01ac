//! Budgets: how much of a VM's memory may be resident (config `[budget]`), and enforcement:
//! the arithmetic of what a VM owes, and evicting oldest-first until it is paid.

use super::{FaultServer, Quota};
use crate::kernel::uffd::UffdOps;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Budget enforcement of one VM (see config `[budget]`).
#[derive(Debug)]
pub(super) struct BudgetState {
    pub(super) limits: crate::ops::config::Budget,
    /// Resident bytes of all VMs, kept by every session thread adding its own changes.
    pub(super) global: Arc<std::sync::atomic::AtomicU64>,
    /// This VM's resident bytes as last added to `global`.
    pub(super) reported: u64,
}

impl<O: UffdOps> FaultServer<O> {
    /// Adds this VM's resident change to the global count; returns (own, global) bytes.
    pub(super) fn report_resident(&mut self) -> (u64, u64) {
        let own = self.own_resident();
        let Some(b) = &mut self.budget else {
            return (own, 0);
        };
        if own >= b.reported {
            b.global.fetch_add(own - b.reported, Ordering::Relaxed);
        } else {
            b.global.fetch_sub(b.reported - own, Ordering::Relaxed);
        }
        b.reported = own;
        (own, b.global.load(Ordering::Relaxed))
    }

    /// Evicts down to the low watermark when this VM, or all VMs together, went above the
    /// high one. Over the global budget, each VM gives back its share of the excess (in
    /// proportion to its resident memory), so no VM pays for the others.
    pub fn enforce_budget(&mut self) {
        self.enforce(false)
    }

    /// [`FaultServer::enforce_budget`]; `idle`: no event came for a while, so for anonymous
    /// memory read the pagemap even if the estimate is within the budget (swap-ins raise no
    /// event).
    pub(super) fn enforce(&mut self, idle: bool) {
        let Some(limits) = self.budget.as_ref().map(|b| b.limits) else {
            return;
        };
        if self.finished {
            // Finished: no page goes back to where only faultd has it.
            return;
        }
        if !limits.is_set() {
            // No budget (the default): nothing reads the global count, so this runs after every
            // batch of faults for nothing but a lock and an atomic.
            return;
        }
        let excess = |(own, global): (u64, u64)| {
            let pct = |v: u64, p: u64| (v as u128 * p as u128 / 100) as u64;
            let mut free = 0;
            if limits.session > 0 && own > pct(limits.session, limits.high_pct) {
                free = own - pct(limits.session, limits.low_pct);
            }
            if limits.global > 0 && global > pct(limits.global, limits.high_pct) && global > 0 {
                let excess = global - pct(limits.global, limits.low_pct);
                free = free.max((excess as u128 * own as u128 / global as u128) as u64);
            }
            free
        };
        let mut free = excess(self.report_resident());
        // Anonymous memory: over the line by an estimate, look at the pagemap before paging
        // out (and, idle, look anyway).
        let mut pagemap = None;
        if free > 0 || idle {
            pagemap = self.remeasure_if_stale();
            if pagemap.is_some() {
                free = excess(self.report_resident());
            }
        }
        if free > 0 {
            self.evict_oldest(Quota::BudgetBytes(free), pagemap);
            self.report_resident();
        }
    }
}

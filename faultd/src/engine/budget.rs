//! Budgets: how much of a VM's memory may be resident (config `[budget]`), and enforcement:
//! the arithmetic of what a VM owes, and evicting oldest-first until it is paid.

use super::{FaultServer, Quota};
use crate::kernel::uffd::UffdOps;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// `pct` percent of `bytes` (a watermark of a budget), exact for every `u64`.
pub(super) fn share(bytes: u64, pct: u64) -> u64 {
    (bytes as u128 * pct as u128 / 100) as u64
}

/// Bytes a VM with `own` resident bytes gives back when all VMs together have `global`: above
/// the high watermark of its own budget, down to the low one; above the high watermark of the
/// global budget, its share of the excess over the global low one, in proportion to `own`
/// (so no VM pays for the others); the larger of the two. A budget of 0 is not set.
pub(super) fn excess(limits: &crate::ops::config::Budget, own: u64, global: u64) -> u64 {
    let mut free = 0;
    if limits.session > 0 && own > share(limits.session, limits.high_pct) {
        free = own - share(limits.session, limits.low_pct);
    }
    if limits.global > 0 && global > share(limits.global, limits.high_pct) && global > 0 {
        let excess = global - share(limits.global, limits.low_pct);
        free = free.max((excess as u128 * own as u128 / global as u128) as u64);
    }
    free
}

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
        let owed = |(own, global): (u64, u64)| excess(&limits, own, global);
        let mut free = owed(self.report_resident());
        // Anonymous memory: over the line by an estimate, look at the pagemap before paging
        // out (and, idle, look anyway).
        let mut pagemap = None;
        if free > 0 || idle {
            pagemap = self.remeasure_if_stale();
            if pagemap.is_some() {
                free = owed(self.report_resident());
            }
        }
        if free > 0 {
            self.evict_oldest(Quota::BudgetBytes(free), pagemap);
            self.report_resident();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{excess, share};
    use crate::ops::config::Budget;

    const MIB: u64 = 1 << 20;

    /// 100 MiB per VM, 1000 MiB in all, high watermark 90 %, low 70 %.
    const LIMITS: Budget = Budget {
        session: 100 * MIB,
        global: 1000 * MIB,
        high_pct: 90,
        low_pct: 70,
    };

    #[test]
    fn watermarks_are_shares_of_the_budget_exact_at_the_extremes() {
        assert_eq!(share(100 * MIB, 90), 90 * MIB);
        assert_eq!(share(1000, 33), 330);
        assert_eq!(share(999, 50), 499);
        assert_eq!(share(u64::MAX, 100), u64::MAX);
        assert_eq!(share(u64::MAX, 50), u64::MAX / 2);
    }

    #[test]
    fn a_vm_at_or_below_both_high_watermarks_owes_nothing() {
        assert_eq!(excess(&LIMITS, 90 * MIB, 900 * MIB), 0);
        assert_eq!(excess(&LIMITS, 0, 0), 0);
    }

    #[test]
    fn a_vm_above_its_high_watermark_gives_back_down_to_its_low_one() {
        assert_eq!(excess(&LIMITS, 90 * MIB + 1, 90 * MIB + 1), 20 * MIB + 1);
        assert_eq!(excess(&LIMITS, 150 * MIB, 150 * MIB), 80 * MIB);
    }

    #[test]
    fn over_the_global_budget_each_vm_gives_back_its_share_of_the_excess() {
        // 1200 MiB in all: 500 MiB over the global low watermark (700 MiB).
        assert_eq!(excess(&LIMITS, 60 * MIB, 1200 * MIB), 25 * MIB);
        assert_eq!(excess(&LIMITS, 0, 1200 * MIB), 0);
        let no_vm_budget = Budget {
            session: 0,
            ..LIMITS
        };
        assert_eq!(excess(&no_vm_budget, 600 * MIB, 1200 * MIB), 250 * MIB);
    }

    #[test]
    fn over_both_budgets_the_larger_debt_is_paid() {
        // Own: 150 - 70 = 80 MiB. Global share: 500 * 150 / 1200 = 62.5 MiB.
        assert_eq!(excess(&LIMITS, 150 * MIB, 1200 * MIB), 80 * MIB);
        // Own: 95 - 70 = 25 MiB. Global share: 500 * 95 / 1200 = 39.58 MiB.
        assert_eq!(excess(&LIMITS, 95 * MIB, 1200 * MIB), 500 * MIB * 95 / 1200);
    }

    #[test]
    fn a_budget_of_zero_is_not_set() {
        let none = Budget {
            session: 0,
            global: 0,
            ..LIMITS
        };
        assert_eq!(excess(&none, u64::MAX, u64::MAX), 0);
    }

    #[test]
    fn arithmetic_near_u64_max_neither_overflows_nor_wraps() {
        let huge = Budget {
            session: u64::MAX,
            global: u64::MAX,
            high_pct: 100,
            low_pct: 50,
        };
        assert_eq!(excess(&huge, u64::MAX, u64::MAX), 0);
        let tight = Budget {
            session: u64::MAX / 2,
            global: u64::MAX / 2,
            high_pct: 100,
            low_pct: 0,
        };
        assert_eq!(excess(&tight, u64::MAX, u64::MAX), u64::MAX);
    }
}

//! The spin policy: how long the fault thread keeps polling after work before it sleeps.

use std::time::Duration;

/// How long the fault thread keeps polling after work before it sleeps in poll(2).
///
/// Spinning pays only when the next fault comes before the spin ends; otherwise it burns a core
/// and the fault still pays the wake-up. So the window follows the source's pace: it keeps the
/// last [`GAPS`] gaps (idle time from the end of one burst of work to the start of the next),
/// and spins 1.5x the second-largest of them (robust to one idle outlier), at least
/// [`MIN_WINDOW`], as long as that fits the configured maximum; if it does not, faults come too
/// far apart to catch and it does not spin at all. Measured here (`cargo bench -p faultd-tests`):
/// a host thread bursting faults leaves ~10-15 us gaps, a KVM vCPU touching fresh memory
/// ~50-90 us (its exits are expensive under PVM), an isolated fault hundreds of us.
///
/// A short pace is not enough, though: the spin must also *catch* the fault, i.e. the faulter
/// must run on another CPU while this thread polls. The faulter is woken by this thread's own
/// UFFDIO_COPY, and the kernel often queues that wake-up on the waker's CPU (wake-affine; on a
/// busy machine there is no idle CPU to put it on). Then the spin cannot catch anything: either
/// the faulter preempts the spinner (the fault is then served as a sleeping thread would serve
/// it, at the CPU cost of the spin), or it does not, and waits behind the spinner until the
/// window ends, so the spin *delays* the fault it waits for by up to the whole window.
/// Measured (firecracker_restore scenario D: one PVM vCPU, another engineer's build on the other
/// CPU; sched tracepoints): the vCPU was woken onto the fault thread's CPU for 95% of its faults,
/// 5% of its wake-ups then waited > 50 µs to run (p99 164 µs; spin 0: 0.2%, p99 14 µs), 98% of
/// those until the spinner went to sleep; that alone made the restore 18% slower than spin 0.
/// The pace of such faults looks spinnable (the gaps are short), so the policy also keeps score
/// ([`SpinPolicy::record_spin`]): a spin *paid* if work arrived within the window while this
/// thread kept its CPU (no involuntary context switch). If fewer than half of the last
/// [`Payoff::HISTORY`] spins paid, it sleeps at once after work instead, and spins only on every
/// [`PROBE_EVERY`]th burst to notice when spinning pays again (say the other CPU became free).
#[derive(Debug, Clone)]
pub(crate) struct SpinPolicy {
    max: Duration,
    gaps: [Duration; GAPS],
    next: usize,
    /// Whether recent spins paid.
    score: Payoff,
}

/// Gaps remembered by [`SpinPolicy`].
const GAPS: usize = 8;
/// Shortest spin when spinning at all (back-to-back work records gaps of ~0).
const MIN_WINDOW: Duration = Duration::from_micros(10);
/// While spinning does not pay, one burst in this many spins anyway (a probe). A probe that
/// does not pay can delay the next fault by a whole window (the faulter queued behind it), up
/// to 200 µs against faults that come every 10-50 µs: probing every 4th burst made restores
/// several times slower. At most 4 paying probes (256 bursts) turn spinning back on.
const PROBE_EVERY: u32 = 64;

impl SpinPolicy {
    pub(crate) fn new(max: Duration) -> SpinPolicy {
        // Start as if faults came back to back and spinning paid: a VM starting up or
        // restoring faults densely.
        SpinPolicy {
            max,
            gaps: [Duration::ZERO; GAPS],
            next: 0,
            score: Payoff::new(true, PROBE_EVERY),
        }
    }

    pub(crate) fn record_gap(&mut self, gap: Duration) {
        self.gaps[self.next] = gap;
        self.next = (self.next + 1) % GAPS;
    }

    /// Records how a spin ended: `paid` if work came within the window while this thread kept
    /// its CPU.
    pub(crate) fn record_spin(&mut self, paid: bool) {
        self.score.record(paid);
    }

    /// The pace-based window: what to spin if spinning pays.
    pub(crate) fn window(&self) -> Duration {
        if self.max.is_zero() {
            return Duration::ZERO;
        }
        let mut sorted = self.gaps;
        sorted.sort_unstable();
        let want = (sorted[GAPS - 2] * 3 / 2).max(MIN_WINDOW);
        if want <= self.max {
            want
        } else {
            Duration::ZERO
        }
    }

    /// The window to spin after the burst that starts now: [`SpinPolicy::window`] if spinning
    /// pays or this burst is a probe, else none.
    pub(crate) fn next_window(&mut self) -> Duration {
        if self.score.try_now() {
            self.window()
        } else {
            Duration::ZERO
        }
    }
}

/// The score the fault thread keeps of a habit that pays only in some regimes (spinning after
/// work, [`SpinPolicy`]; reading before polling, [`ReadFirst`]): the outcomes of its last
/// [`Payoff::HISTORY`] tries. It pays while at least half of them did; while it does not, every
/// `probe_every`th burst tries it anyway, so a change of regime is noticed.
#[derive(Debug, Clone)]
pub(crate) struct Payoff {
    /// Outcomes of the last tries, newest in bit 0: 1 = it paid.
    paid: u8,
    /// Bursts since the last try while the habit does not pay.
    skipped: u32,
    probe_every: u32,
}

impl Payoff {
    /// Tries remembered.
    pub(crate) const HISTORY: u32 = u8::BITS;

    /// A score that starts as if every try had paid (`paying`) or none had.
    pub(crate) fn new(paying: bool, probe_every: u32) -> Payoff {
        Payoff {
            paid: if paying { u8::MAX } else { 0 },
            skipped: 0,
            probe_every,
        }
    }

    /// Records how a try ended.
    pub(crate) fn record(&mut self, paid: bool) {
        self.paid = (self.paid << 1) | u8::from(paid);
    }

    /// Whether at least half of the last [`Payoff::HISTORY`] tries paid.
    pub(crate) fn pays(&self) -> bool {
        self.paid.count_ones() * 2 >= Self::HISTORY
    }

    /// Whether to try after the burst that just ended: while it pays, or as a probe.
    pub(crate) fn try_now(&mut self) -> bool {
        if self.pays() {
            self.skipped = 0;
            return true;
        }
        self.skipped += 1;
        if self.skipped >= self.probe_every {
            self.skipped = 0;
            return true;
        }
        false
    }
}

/// Whether the fault thread, done with work and not spinning, reads the uffd once more before
/// it polls.
///
/// Two regimes meet here. Faults that come while the thread sleeps are best met by poll(2)
/// first: a read first would find nothing and cost each fault one more syscall (an EAGAIN
/// read, ~1 µs per fault measured here, 5-10% of a back-to-back restore). But when this thread
/// shares its CPU with the faulter (a busy machine, where spinning does not pay either), the
/// faulter preempts it as its UFFDIO_COPY wakes it, runs, faults again and sleeps, all before
/// this thread runs on: the next fault is then always pending when the thread looks, and poll(2)
/// first is the syscall too many (`firecracker_restore`, one CPU busy: the thread was preempted
/// on its COPY and found the next fault pending for nearly every fault of a restore).
///
/// So it keeps score as [`SpinPolicy`] does ([`Payoff`]): a read first *paid* if it found
/// work. It reads first while at least half of the last [`Payoff::HISTORY`] did, and otherwise
/// on every [`READ_PROBE_EVERY`]th burst only; a probe that finds nothing costs one EAGAIN read.
/// It starts as not paying: idle faults must not pay that read each.
#[derive(Debug, Clone)]
pub(crate) struct ReadFirst(Payoff);

/// While reading first does not pay, one burst in this many reads first anyway.
const READ_PROBE_EVERY: u32 = 16;

impl Default for ReadFirst {
    fn default() -> ReadFirst {
        ReadFirst(Payoff::new(false, READ_PROBE_EVERY))
    }
}

impl ReadFirst {
    /// Whether to read again before polling, after the burst that just ended.
    pub(crate) fn read_first(&mut self) -> bool {
        self.0.try_now()
    }

    /// Records whether a read first found work.
    pub(crate) fn record(&mut self, found: bool) {
        self.0.record(found);
    }
}

#[cfg(test)]
mod spin_tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    fn policy_after(max_us: u64, gaps_us: &[u64]) -> Duration {
        let mut p = SpinPolicy::new(Duration::from_micros(max_us));
        for &g in gaps_us {
            p.record_gap(Duration::from_micros(g));
        }
        p.window()
    }

    #[test]
    fn back_to_back_work_spins_the_minimum() {
        assert_eq!(policy_after(200, &[0, 1, 0]), MIN_WINDOW);
    }

    #[test]
    fn steady_vcpu_pace_is_covered_with_margin() {
        assert_eq!(
            policy_after(200, &[52, 60, 48, 71, 55, 66, 58, 50]),
            US * 99
        );
    }

    #[test]
    fn one_idle_outlier_does_not_stop_spinning() {
        assert_eq!(
            policy_after(200, &[12, 10, 5000, 11, 9, 14, 10, 12]),
            US * 21
        );
    }

    #[test]
    fn isolated_faults_do_not_spin() {
        assert_eq!(
            policy_after(200, &[310, 305, 320, 300, 330, 301, 315, 309]),
            Duration::ZERO
        );
    }

    fn spins_after(policy: &mut SpinPolicy, bursts: usize) -> usize {
        (0..bursts)
            .filter(|_| !policy.next_window().is_zero())
            .count()
    }

    #[test]
    fn spins_that_do_not_pay_stop_spinning_but_for_probes() {
        let mut p = SpinPolicy::new(US * 200);
        assert!(p.score.pays(), "starts spinning");
        // Half of the remembered spins still paid: keep spinning.
        (0..4).for_each(|_| p.record_spin(false));
        assert!(p.score.pays());
        assert_eq!(spins_after(&mut p, 8), 8);
        p.record_spin(false);
        assert!(!p.score.pays());
        // One burst in PROBE_EVERY spins, with the pace-based window.
        assert_eq!(spins_after(&mut p, 16), 16 / PROBE_EVERY as usize);
        assert_eq!(p.window(), MIN_WINDOW);
    }

    #[test]
    fn paying_probes_turn_spinning_back_on() {
        let mut p = SpinPolicy::new(US * 200);
        (0..Payoff::HISTORY).for_each(|_| p.record_spin(false));
        for _ in 0..Payoff::HISTORY / 2 {
            assert!(!p.score.pays());
            p.record_spin(true);
        }
        assert!(p.score.pays());
        assert_eq!(spins_after(&mut p, 8), 8);
    }

    #[test]
    fn a_zero_maximum_never_spins() {
        assert_eq!(policy_after(0, &[0, 0]), Duration::ZERO);
    }

    /// Of `bursts` bursts, how many read first when each read finds work iff `found`.
    fn reads_first(r: &mut ReadFirst, bursts: usize, found: bool) -> usize {
        (0..bursts)
            .filter(|_| {
                let first = r.read_first();
                if first {
                    r.record(found);
                }
                first
            })
            .count()
    }

    #[test]
    fn reads_first_start_as_probes_only() {
        // Idle faults (the quiet default) must not pay an EAGAIN read each.
        let mut r = ReadFirst::default();
        assert_eq!(reads_first(&mut r, 160, false), 10);
    }

    #[test]
    fn reads_that_find_work_keep_reading_first() {
        let mut r = ReadFirst::default();
        // Probes that find work turn it on after 4 of them (half the history)...
        assert_eq!(reads_first(&mut r, 4 * READ_PROBE_EVERY as usize, true), 4);
        // ...and then every burst reads first while they keep finding work.
        assert_eq!(reads_first(&mut r, 100, true), 100);
    }

    #[test]
    fn reads_that_find_nothing_fall_back_to_poll_first() {
        let mut r = ReadFirst::default();
        for _ in 0..8 {
            r.record(true);
        }
        // The regime changed: after 5 misses fewer than half paid; then probes only.
        let n = reads_first(&mut r, 5 + 2 * READ_PROBE_EVERY as usize, false);
        assert_eq!(n, 5 + 2);
    }
}

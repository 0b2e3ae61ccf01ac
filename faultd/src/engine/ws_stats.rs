//! A session's working-set counters, updated by its fault thread and read by `ctl stats`, and
//! why replay stopped. Kept apart from the replay itself ([`super::working_set`]) because the
//! session ([`super::session`]) holds them and replay uses the session.

use faultd_proto::WorkingSetStats;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why replay stopped, as stored in [`WsCounters::stop`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ReplayStop {
    /// Still running, or none.
    None = 0,
    /// Every recorded page was installed or skipped.
    Done = 1,
    /// Demand faults came mostly outside the recording.
    Wrong = 2,
    /// The VM's budget left no room.
    Budget = 3,
    /// The VMM finished the session.
    Finished = 4,
    /// An install failed.
    Error = 5,
}

impl ReplayStop {
    pub(crate) fn name(code: u64) -> &'static str {
        match code {
            1 => "done",
            2 => "wrong",
            3 => "budget",
            4 => "finished",
            5 => "error",
            _ => "",
        }
    }
}

/// A session's working-set counters, updated by its fault thread.
#[derive(Debug, Default)]
pub struct WsCounters {
    /// Pages recorded.
    pub recorded: AtomicU64,
    /// Pages in the recording replayed.
    pub replay_pages: AtomicU64,
    /// Pages copied ahead from the recording (not its zero pages).
    pub prefetched: AtomicU64,
    /// Recorded zero pages mapped ahead as zero pages.
    pub prefetched_zero: AtomicU64,
    /// Recorded pages skipped.
    pub skipped: AtomicU64,
    /// Demand faults on recorded pages not yet installed.
    pub late: AtomicU64,
    /// Demand faults on snapshot pages outside the recording.
    pub misses: AtomicU64,
    /// A [`ReplayStop`].
    pub stop: AtomicU64,
    /// Microseconds from session start to replay's end.
    pub replay_us: AtomicU64,
}

impl WsCounters {
    /// The counters for the control protocol, with `zero_pages` (counted elsewhere).
    pub fn read(&self, zero_pages: u64) -> WorkingSetStats {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkingSetStats {
            zero_pages,
            recorded: get(&self.recorded),
            replay_pages: get(&self.replay_pages),
            prefetched: get(&self.prefetched),
            prefetched_zero: get(&self.prefetched_zero),
            skipped: get(&self.skipped),
            late: get(&self.late),
            misses: get(&self.misses),
            replay_stop: ReplayStop::name(get(&self.stop)).to_owned(),
            replay_us: get(&self.replay_us),
        }
    }
}

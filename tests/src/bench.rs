//! What the benchmarks (`benches/fault_roundtrip.rs`, `benches/device_roundtrip.rs`,
//! `benches/firecracker_restore.rs`, `benches/prefetch.rs`) and their raw baseline handlers
//! ([`crate::raw`], [`crate::raw_ring`]) share:
//!
//! - CPU accounting from `/proc/.../schedstat`: per thread, per process, and snapshots of a
//!   handler's CPU time taken around a measurement ([`CpuSnap`]);
//! - the plumbing of a raw handler's serving thread: spawned knowing its tid, told to stop by a
//!   [`Stop`], joined for what it did ([`ServingThread`]);
//! - the thread a benchmark measures from ([`on_fresh_thread`]), the two faultd daemons it
//!   measures ([`Daemons`]), a KVM guest over one RAM slot ([`one_slot_vm`]), a file read into
//!   the page cache for every handler alike ([`warm_page_cache`]) and which pages of guest RAM
//!   are resident ([`resident_pages`]);
//! - the statistics: nearest-rank quantiles, samples pooled over rounds and kept per round
//!   ([`Pooled`]), rounds that run every handler in a rotated order ([`interleaved`]), and
//!   targets held as ratios of two handlers' figures ([`Target`]): pooled quantiles
//!   ([`Target::ratio`]) or the median of per-round ratios with its interquartile range, met,
//!   missed or unclear ([`Target::rounds`], [`Verdict`]);
//! - the report: the header a run prints, the machine it ran on and its load average at the
//!   start and the end, the target summary, and the JSON file it writes ([`Run`]).
//!
//! This library does not depend on serde_json (only the benchmarks do), so the parts of a report
//! shaped here are `serde_json::Value`s.

use serde_json::Value;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use userfaultfd::Uffd;

use crate::Faultd;

// ---- CPU accounting ----------------------------------------------------------------------

/// A thread's scheduler accounting, from `/proc/<pid>/task/<tid>/schedstat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Schedstat {
    /// Time spent on a CPU, ns.
    pub run_ns: u64,
    /// Time spent runnable but waiting on a run queue, ns.
    pub wait_ns: u64,
}

impl Schedstat {
    /// What the thread accrued from `before` to `self`.
    pub fn since(self, before: Schedstat) -> Schedstat {
        Schedstat {
            run_ns: self.run_ns - before.run_ns,
            wait_ns: self.wait_ns - before.wait_ns,
        }
    }
}

/// Thread `tid` of process `pid`'s [`Schedstat`].
pub fn thread_schedstat(pid: u32, tid: i32) -> io::Result<Schedstat> {
    parse_schedstat(&std::fs::read_to_string(format!(
        "/proc/{pid}/task/{tid}/schedstat"
    ))?)
}

/// CPU time (ns) thread `tid` of process `pid` has run: the first field of its schedstat.
pub fn thread_cpu_ns(pid: u32, tid: i32) -> io::Result<u64> {
    Ok(thread_schedstat(pid, tid)?.run_ns)
}

/// CPU time (ns) of each live thread of process `pid`, by tid. Threads that exited are gone
/// from /proc, so a caller diffing two snapshots should keep the threads of both.
pub fn process_cpu_ns(pid: u32) -> io::Result<HashMap<i32, u64>> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            continue;
        };
        // A thread can exit between the listing and the read: skip it.
        if let Ok(ns) = thread_cpu_ns(pid, tid) {
            out.insert(tid, ns);
        }
    }
    Ok(out)
}

/// CPU time used between two [`process_cpu_ns`] snapshots: threads born in between count from
/// zero; threads that died in between are lost (the caller keeps sessions alive across both).
pub fn cpu_delta_ns(before: &HashMap<i32, u64>, after: &HashMap<i32, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, &ns)| ns.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

fn parse_schedstat(text: &str) -> io::Result<Schedstat> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(run_ns)), Some(Ok(wait_ns))) => Ok(Schedstat { run_ns, wait_ns }),
        _ => Err(io::Error::other(format!("bad schedstat: {text:?}"))),
    }
}

/// The calling thread's kernel thread id.
fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// CPU-time snapshot of a handler: its one serving thread (a raw handler: the run time of a
/// thread of this process) or every thread of a process (faultd, by tid).
#[derive(Debug)]
pub enum CpuSnap {
    /// A thread's run time, ns.
    Thread(u64),
    /// A [`process_cpu_ns`] snapshot.
    Process(HashMap<i32, u64>),
}

impl CpuSnap {
    /// CPU used from `before` to `self` (a snapshot of the same thread or process), ns: for a
    /// process, all its threads'.
    pub fn since(&self, before: &CpuSnap) -> u64 {
        match (self, before) {
            (CpuSnap::Thread(now), CpuSnap::Thread(then)) => now - then,
            (CpuSnap::Process(now), CpuSnap::Process(then)) => cpu_delta_ns(then, now),
            _ => unreachable!("snapshot of another kind of server"),
        }
    }

    /// Of [`CpuSnap::since`] for a process, thread `tid`'s share (0 where it is missing).
    pub fn thread_since(&self, before: &CpuSnap, tid: i32) -> u64 {
        match (self, before) {
            (CpuSnap::Process(now), CpuSnap::Process(then)) => {
                let thread = |m: &HashMap<i32, u64>| m.get(&tid).copied().unwrap_or(0);
                thread(now) - thread(then)
            }
            _ => unreachable!("a thread of a snapshot that is not a process's"),
        }
    }
}

// ---- A raw handler's serving thread ------------------------------------------------------

/// A `Uffd` of its own on a duplicate of `uffd`'s fd, for a serving thread to own.
pub fn dup_uffd(uffd: &Uffd) -> io::Result<Uffd> {
    let dup: OwnedFd = uffd.as_fd().try_clone_to_owned()?;
    // SAFETY: `dup` is an open duplicate of a userfaultfd that nothing else owns; the Uffd
    // takes it over and closes it on drop.
    Ok(unsafe { Uffd::from_raw_fd(dup.into_raw_fd()) })
}

/// How a serving thread is told to stop: a flag for a polling loop (which never sleeps), an
/// eventfd for a blocking one (which sleeps in poll), a `Notify` for a tokio task (raw-tokio;
/// a thread that never waits on it ignores it).
#[derive(Debug)]
pub struct Stop {
    flag: AtomicBool,
    event: EventFd,
    notify: tokio::sync::Notify,
}

impl Stop {
    fn new() -> io::Result<Stop> {
        Ok(Stop {
            flag: AtomicBool::new(false),
            event: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
            notify: tokio::sync::Notify::new(),
        })
    }

    /// Whether the thread has been told to stop.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    /// Sleeps in poll(2) until `fd` is readable or the thread is told to stop (or a signal
    /// interrupts the wait); false once it has been told to stop.
    pub fn wait(&self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        let mut fds = [
            PollFd::new(fd, PollFlags::POLLIN),
            PollFd::new(self.event.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(!self.requested())
    }

    /// Completes once the thread is told to stop (for a tokio task).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    fn request(&self) {
        self.flag.store(true, Ordering::Release);
        let _ = self.event.write(1);
        self.notify.notify_one();
    }
}

/// A raw handler's serving thread, returning what it did (`S`) when it stops; stopped and
/// joined on drop.
#[derive(Debug)]
pub struct ServingThread<S> {
    /// "handler", "ring handler": what the thread is, for errors.
    what: &'static str,
    tid: i32,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<io::Result<S>>>,
}

impl<S: Default + Send + 'static> ServingThread<S> {
    /// Starts a thread named `name` running `serve` until it returns (it should once
    /// [`Stop`] says so). Returns once the thread runs and has told its tid.
    pub fn spawn(
        name: String,
        what: &'static str,
        serve: impl FnOnce(&Stop) -> io::Result<S> + Send + 'static,
    ) -> io::Result<ServingThread<S>> {
        let stop = Arc::new(Stop::new()?);
        let (tid_tx, tid_rx) = mpsc::channel();
        let st = stop.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let _ = tid_tx.send(gettid());
            serve(&st)
        })?;
        let tid = tid_rx
            .recv()
            .map_err(|_| io::Error::other(format!("{what} thread died at start")))?;
        Ok(ServingThread {
            what,
            tid,
            stop,
            thread: Some(thread),
        })
    }

    /// Kernel thread id of the serving thread (for its schedstat).
    pub fn tid(&self) -> i32 {
        self.tid
    }

    /// CPU time the serving thread has used, in ns.
    pub fn cpu_ns(&self) -> io::Result<u64> {
        thread_cpu_ns(std::process::id(), self.tid)
    }

    /// Stops the thread and returns what it did, or the error that ended it.
    pub fn stop(mut self) -> io::Result<S> {
        match self.stop_and_join() {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other(format!("{} thread panicked", self.what))),
            None => Ok(S::default()),
        }
    }
}

impl<S> ServingThread<S> {
    /// Tells the thread to stop and joins it, unless that was done already.
    fn stop_and_join(&mut self) -> Option<std::thread::Result<io::Result<S>>> {
        self.stop.request();
        self.thread.take().map(JoinHandle::join)
    }
}

impl<S> Drop for ServingThread<S> {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

// ---- What a benchmark measures from and against ------------------------------------------

/// Runs `prepare` and then the closure it returns on a fresh thread (a new placement draw),
/// and returns what that returns with the thread's [`Schedstat`] over it alone (`prepare`,
/// e.g. allocating, is outside). Panics with `late` if the thread is not done within
/// `timeout`: a handler stopped serving. The timed loop itself stays in each benchmark, as it
/// is what each measures (a touch of guest RAM; a group posted until its answer is seen, the
/// answer checked after the clock stops).
pub fn on_fresh_thread<R, F>(
    timeout: Duration,
    late: &str,
    prepare: impl FnOnce() -> F + Send + 'static,
) -> (R, Schedstat)
where
    F: FnOnce() -> R,
    R: Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let tid = gettid();
        let me = || thread_schedstat(std::process::id(), tid).expect("own schedstat");
        let measured = prepare();
        let s0 = me();
        let r = measured();
        let s1 = me();
        let _ = tx.send((r, s1.since(s0)));
    });
    rx.recv_timeout(timeout).expect(late)
}

/// A KVM VM ([`testvmm`]) whose RAM is the one slot `size` bytes at `host`, at guest address
/// 0, failing a run after `timeout` (a fault nobody serves must fail the benchmark, not hang
/// it). The caller keeps the RAM mapped for the VM's life.
pub fn one_slot_vm(host: std::ptr::NonNull<u8>, size: u64, timeout: Duration) -> testvmm::Vm {
    let mut vm = testvmm::Vm::new(vec![testvmm::RamSlot { gpa: 0, host, size }]).expect("VM");
    vm.set_timeout(Some(timeout));
    vm
}

/// Reads all of `path` once, so every handler finds it in the page cache alike.
pub fn warm_page_cache(path: &std::path::Path) {
    use std::io::Read;
    let mut file = std::fs::File::open(path).expect("opening a file to warm");
    let mut buf = vec![0u8; 1 << 20];
    while file.read(&mut buf).expect("reading a file to warm") > 0 {}
}

/// Which of the `len / 4096` pages at `addr` (page aligned, mapped in this process) are
/// resident, by mincore(2): a page a handler installed, whether or not anyone touched it.
pub fn resident_pages(addr: u64, len: u64) -> Vec<bool> {
    let mut vec = vec![0u8; len.div_ceil(4096) as usize];
    // SAFETY: mincore only reads the page tables of `[addr, addr + len)`, a mapping of this
    // process the caller keeps alive, and writes one byte per page into `vec`, which is that
    // long.
    let rc = unsafe { libc::mincore(addr as *mut libc::c_void, len as usize, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
    vec.into_iter().map(|b| b & 1 == 1).collect()
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`'s first three fields): on a shared
/// machine, what the figures of a run competed with.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The two daemons a benchmark holds against the raw handlers, started once and kept for the
/// whole run (each attach is a new session): default config, and `--spin-us 0`.
#[derive(Debug)]
pub struct Daemons {
    /// faultd with its default config.
    pub default: Faultd,
    /// faultd with `--spin-us 0`.
    pub spin0: Faultd,
}

impl Daemons {
    /// Starts both.
    pub fn start() -> Daemons {
        Daemons {
            default: Faultd::start(&[]),
            spin0: Faultd::start(&["--spin-us", "0"]),
        }
    }
}

// ---- Statistics --------------------------------------------------------------------------

/// The `q` quantile of `ns` (nearest rank), in µs.
pub fn pct(ns: &[u64], q: f64) -> f64 {
    if ns.is_empty() {
        return f64::NAN;
    }
    let mut v = ns.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1] as f64 / 1e3
}

/// The median of `v` (NaN if empty).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `total_ns` spread over `n` events (at least one), in µs.
pub fn per_unit_us(total_ns: u64, n: u64) -> f64 {
    total_ns as f64 / n.max(1) as f64 / 1e3
}

/// One handler's latency samples in one scenario (ns), pooled over rounds for the quantiles
/// and kept per round for per-round ratios.
#[derive(Debug, Default)]
pub struct Pooled {
    /// Every sample of every round.
    pub samples: Vec<u64>,
    /// The samples of each round.
    pub rounds: Vec<Vec<u64>>,
}

impl Pooled {
    /// Adds one round's samples.
    pub fn add_round(&mut self, samples: Vec<u64>) {
        self.samples.extend_from_slice(&samples);
        self.rounds.push(samples);
    }

    /// The pooled `q` quantile, µs.
    pub fn p(&self, q: f64) -> f64 {
        pct(&self.samples, q)
    }

    /// The `q` quantile of each round, µs.
    pub fn per_round(&self, q: f64) -> Vec<f64> {
        self.rounds.iter().map(|r| pct(r, q)).collect()
    }

    /// A handler's figures in a report: `{"samples", "p50_us", "p99_us", "per_round_p50_us",
    /// "per_round_p99_us"}` and the benchmark's own `rest`.
    pub fn json_with(&self, rest: impl IntoIterator<Item = (&'static str, Value)>) -> Value {
        [
            ("samples", Value::from(self.samples.len() as u64)),
            ("p50_us", Value::from(self.p(0.5))),
            ("p99_us", Value::from(self.p(0.99))),
            ("per_round_p50_us", Value::from(self.per_round(0.5))),
            ("per_round_p99_us", Value::from(self.per_round(0.99))),
        ]
        .into_iter()
        .chain(rest)
        .collect()
    }
}

/// Runs `f(handler, round)` for `rounds` rounds of every handler, the order rotated by one each
/// round, so no handler always goes first or last (or always follows another).
pub fn interleaved<H: Copy>(rounds: usize, handlers: &[H], mut f: impl FnMut(H, usize)) {
    for round in 0..rounds {
        for i in 0..handlers.len() {
            f(handlers[(i + round) % handlers.len()], round);
        }
    }
}

/// The first quartile, the median and the third quartile of `v` (each the median of its half,
/// the middle value left out of both halves when `v` has an odd length; NaN if empty).
pub fn quartiles(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_unstable_by(f64::total_cmp);
    let half = v.len() / 2;
    let upper = v.len() - half;
    match v.len() {
        0 => (f64::NAN, f64::NAN, f64::NAN),
        1 => (v[0], v[0], v[0]),
        _ => (median(&v[..half]), median(&v), median(&v[upper..])),
    }
}

/// What a target's figure says against its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limit (for a per-round target: the whole interquartile range is).
    Met,
    /// Beyond it (the whole interquartile range is).
    Missed,
    /// The interquartile range straddles the limit: at the noise edge, neither.
    Unclear,
}

impl Verdict {
    /// "MET", "MISSED", "UNCLEAR".
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Met => "MET",
            Verdict::Missed => "MISSED",
            Verdict::Unclear => "UNCLEAR",
        }
    }

    /// The verdict on per-round ratios held to at most `limit`: met if the third quartile is
    /// within it, missed if the first quartile is beyond it, else unclear. Rounds with no
    /// ratio (NaN: nothing to divide by) make it unclear.
    pub fn of_rounds(per_round: &[f64], limit: f64) -> Verdict {
        let (q1, _, q3) = quartiles(per_round);
        if per_round.is_empty() || per_round.iter().any(|r| r.is_nan()) {
            Verdict::Unclear
        } else if q3 <= limit {
            Verdict::Met
        } else if q1 > limit {
            Verdict::Missed
        } else {
            Verdict::Unclear
        }
    }
}

/// How a [`Target`] is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judged {
    /// On the ratio of quantiles pooled over rounds ([`Target::ratio`]).
    Pooled,
    /// On the median of per-round ratios and its interquartile range ([`Target::rounds`]).
    Rounds,
}

/// A target on the ratio of two handlers' figures: its line and its JSON.
#[derive(Debug)]
pub struct Target {
    /// "faultd p50"
    what: String,
    /// "raw-blocking"
    of: String,
    limit: f64,
    value: f64,
    per_round: Vec<f64>,
    judged: Judged,
}

impl Target {
    /// `a`'s `q` quantile over `b`'s (`b` is the handler named `of`), held to at most `limit`:
    /// pooled over rounds, and per round.
    pub fn ratio(what: &str, limit: f64, of: &str, a: &Pooled, b: &Pooled, q: f64) -> Target {
        Target {
            what: what.to_owned(),
            of: of.to_owned(),
            limit,
            value: a.p(q) / b.p(q),
            per_round: a
                .rounds
                .iter()
                .zip(&b.rounds)
                .map(|(x, y)| pct(x, q) / pct(y, q))
                .collect(),
            judged: Judged::Pooled,
        }
    }

    /// A ratio measured once per round (`per_round[i]`: round i's figure of `what` over the
    /// same round's figure of `of`), held to at most `limit`: judged on the median of the
    /// rounds and its interquartile range ([`Verdict::of_rounds`]).
    pub fn rounds(what: &str, limit: f64, of: &str, per_round: Vec<f64>) -> Target {
        Target {
            what: what.to_owned(),
            of: of.to_owned(),
            limit,
            value: median(&per_round),
            per_round,
            judged: Judged::Rounds,
        }
    }

    /// What the figure says: for a pooled target, met or missed by the pooled ratio; for a
    /// per-round one, [`Verdict::of_rounds`].
    pub fn verdict(&self) -> Verdict {
        match self.judged {
            Judged::Pooled if self.value <= self.limit => Verdict::Met,
            Judged::Pooled => Verdict::Missed,
            Judged::Rounds => Verdict::of_rounds(&self.per_round, self.limit),
        }
    }

    /// Whether the target is met (an unclear one is not).
    pub fn met(&self) -> bool {
        self.verdict() == Verdict::Met
    }

    /// `target <what> <= <limit>x <of>: <value>x MET|MISSED   (per round: ...; median ...)`;
    /// per-round targets: `... : median <m>x, IQR <q1>x..<q3>x MET|MISSED|UNCLEAR   (per round:
    /// ...)`.
    pub fn line(&self) -> String {
        let rounds: Vec<String> = self.per_round.iter().map(|&r| ratio_text(r)).collect();
        if self.judged == Judged::Rounds {
            let (q1, m, q3) = quartiles(&self.per_round);
            return format!(
                "target {} <= {}x {}: median {}x, IQR {}x..{}x {}   (per round: {})",
                self.what,
                ratio_text(self.limit),
                self.of,
                ratio_text(m),
                ratio_text(q1),
                ratio_text(q3),
                self.verdict().name(),
                rounds.join(" ")
            );
        }
        format!(
            "target {} <= {}x {}: {}x {}   (per round: {}; median {})",
            self.what,
            ratio_text(self.limit),
            self.of,
            ratio_text(self.value),
            self.verdict().name(),
            rounds.join(" "),
            ratio_text(median(&self.per_round))
        )
    }

    /// `{"target", "limit", "value", "met", "per_round", "per_round_median"}`
    pub fn json(&self) -> Value {
        [
            (
                "target",
                Value::from(format!(
                    "{} <= {}x {}",
                    self.what,
                    ratio_text(self.limit),
                    self.of
                )),
            ),
            ("limit", Value::from(self.limit)),
            ("value", Value::from(self.value)),
            ("met", Value::from(self.met())),
            ("verdict", Value::from(self.verdict().name())),
            ("per_round", Value::from(self.per_round.clone())),
            ("per_round_median", Value::from(median(&self.per_round))),
            (
                "per_round_iqr",
                Value::from({
                    let (q1, _, q3) = quartiles(&self.per_round);
                    vec![q1, q3]
                }),
            ),
        ]
        .into_iter()
        .collect()
    }
}

/// A ratio as a target line shows it: two decimals, or (below 0.01, e.g. a target of 1/1000)
/// three significant digits in exponent form, which two decimals would print as 0.00.
pub fn ratio_text(x: f64) -> String {
    if x == 0.0 || x.abs() >= 0.01 || !x.is_finite() {
        format!("{x:.2}")
    } else {
        format!("{x:.2e}")
    }
}

/// Appends `  <name>: p50 <r>x p99 <r>x` to a ratio line, `a`'s p50 and p99 over `b`'s (`b`
/// is the handler named `name`); returns the two ratios as `{"p50", "p99"}`.
pub fn write_ratios(line: &mut String, name: &str, a: &Pooled, b: &Pooled) -> Value {
    let r = |q: f64| a.p(q) / b.p(q);
    let _ = write!(line, "  {}: p50 {:.2}x p99 {:.2}x", name, r(0.5), r(0.99));
    [("p50", Value::from(r(0.5))), ("p99", Value::from(r(0.99)))]
        .into_iter()
        .collect()
}

/// Writes the idle-CPU lines, `  <name> <ms> ms` with names padded to `width` (each bench's
/// handler column), and returns `{name: ms}`.
pub fn write_idle(
    out: &mut String,
    width: usize,
    handlers: impl IntoIterator<Item = (&'static str, u64)>,
) -> Value {
    handlers
        .into_iter()
        .map(|(name, ns)| {
            let _ = writeln!(out, "  {:<width$} {:>10.3} ms", name, ns as f64 / 1e6);
            (name, Value::from(ns as f64 / 1e6))
        })
        .collect()
}

// ---- The report --------------------------------------------------------------------------

/// What a benchmark says about itself in its header and where it writes its figures.
#[derive(Debug)]
pub struct Bench<'a> {
    /// Its JSON report's file name, in the target directory.
    pub json: &'static str,
    /// The header's first line.
    pub title: &'a str,
    /// Rounds per scenario.
    pub rounds: usize,
    /// What every handler gets fresh each round ("RAM").
    pub fresh: &'a str,
    /// The header's last line, what the table columns mean.
    pub columns: &'a str,
    /// Whether it runs KVM guests: then the machine line names the KVM module.
    pub kvm: bool,
}

/// The machine a run ran on: what its figures depend on.
#[derive(Debug)]
struct Machine {
    nproc: usize,
    kernel: String,
    cpu: String,
    clocksource: String,
    /// The KVM module (`kvm_pvm` or `kvm`), for a benchmark that runs guests.
    kvm: Option<&'static str>,
}

impl Machine {
    fn read(kvm: bool) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: format!(
                "{} {}",
                read("/proc/sys/kernel/osrelease").trim(),
                read("/proc/sys/kernel/version").trim()
            ),
            cpu: read("/proc/cpuinfo")
                .lines()
                .find_map(|l| {
                    l.strip_prefix("model name")
                        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
                })
                .unwrap_or_default(),
            clocksource: read("/sys/devices/system/clocksource/clocksource0/current_clocksource")
                .trim()
                .to_owned(),
            kvm: kvm.then(|| {
                if std::path::Path::new("/sys/module/kvm_pvm").exists() {
                    "kvm_pvm"
                } else {
                    "kvm"
                }
            }),
        }
    }

    fn line(&self) -> String {
        let Machine {
            nproc,
            kernel,
            cpu,
            clocksource,
            kvm,
        } = self;
        let mut text = format!(
            "machine: nproc {nproc}, kernel {kernel}, cpu {cpu}, clocksource {clocksource}"
        );
        if let Some(kvm) = kvm {
            let _ = write!(text, ", {kvm}");
        }
        text
    }

    fn json(&self) -> Value {
        let mut fields = vec![
            ("nproc", Value::from(self.nproc as u64)),
            ("kernel", Value::from(self.kernel.clone())),
            ("cpu", Value::from(self.cpu.clone())),
            ("clocksource", Value::from(self.clocksource.clone())),
        ];
        if let Some(kvm) = self.kvm {
            fields.push(("kvm", Value::from(kvm.to_owned())));
        }
        fields.into_iter().collect()
    }
}

/// One run of a benchmark: when it started, whether it is a quick one, the machine.
#[derive(Debug)]
pub struct Run {
    started: Instant,
    json: &'static str,
    rounds: usize,
    quick: bool,
    machine: Machine,
}

impl Run {
    /// Starts a run (`FAULT_RT_QUICK` set and not "0": a quick one) and prints its header: the
    /// title, the machine, how rounds run, the columns.
    pub fn start(bench: &Bench<'_>) -> Run {
        let run = Run {
            started: Instant::now(),
            json: bench.json,
            rounds: bench.rounds,
            quick: std::env::var_os("FAULT_RT_QUICK").is_some_and(|v| v != "0"),
            machine: Machine::read(bench.kvm),
        };
        println!("{}", bench.title);
        println!("{}", run.machine.line());
        println!("load average at start: {}", load_average());
        println!(
            "{} rounds per scenario; every round runs every handler on fresh {}, order rotated \
             each round; samples pooled over rounds{}",
            bench.rounds,
            bench.fresh,
            if run.quick {
                " (FAULT_RT_QUICK: sizes / 10)"
            } else {
                ""
            }
        );
        println!("{}", bench.columns);
        run
    }

    /// What every size is divided by: 10 in a quick run, else 1.
    pub fn div(&self) -> usize {
        if self.quick {
            10
        } else {
            1
        }
    }

    /// Ends the run: prints `out` (the scenarios) followed by every target again and the total
    /// time, and writes `report` with the machine, rounds, quick and `all_targets_met` added as
    /// JSON text (`pretty`, e.g. `serde_json::to_string_pretty`) to the benchmark's file in the
    /// target directory.
    pub fn finish(
        self,
        mut out: String,
        targets: &[Target],
        mut report: Vec<(&'static str, Value)>,
    ) {
        let _ = writeln!(out, "\nTargets:");
        for t in targets {
            let _ = writeln!(out, "{}", t.line());
        }
        let _ = writeln!(
            out,
            "total time {:.1} s; load average at end: {}",
            self.started.elapsed().as_secs_f64(),
            load_average()
        );
        print!("{out}");

        report.extend([
            ("machine", self.machine.json()),
            ("rounds", Value::from(self.rounds as u64)),
            ("quick", Value::from(self.quick)),
            (
                "all_targets_met",
                Value::from(targets.iter().all(Target::met)),
            ),
        ]);
        let path = json_path(self.json);
        let text = serde_json::to_string_pretty(&report.into_iter().collect::<Value>())
            .expect("JSON report")
            + "\n";
        std::fs::write(&path, text).expect("writing the JSON report");
        println!("figures written to {}", path.display());
    }
}

/// `file` in the target directory the running bench binary was built in.
fn json_path(file: &str) -> PathBuf {
    // The bench binary is target/<profile>/deps/<name>: its target dir is three levels up,
    // wherever CARGO_TARGET_DIR put it.
    let exe = std::env::current_exe().expect("current exe");
    exe.ancestors()
        .nth(3)
        .expect("bench binary is under target/<profile>/deps")
        .join(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quartiles_are_the_medians_of_each_half() {
        assert_eq!(quartiles(&[4.0, 1.0, 3.0, 2.0]), (1.5, 2.5, 3.5));
        // Odd length: the middle value is in neither half.
        assert_eq!(quartiles(&[5.0, 1.0, 3.0, 2.0, 4.0]), (1.5, 3.0, 4.5));
        assert_eq!(quartiles(&[7.0]), (7.0, 7.0, 7.0));
        assert!(quartiles(&[]).1.is_nan());
    }

    #[test]
    fn a_per_round_target_is_met_missed_or_unclear_by_its_interquartile_range() {
        // All of the IQR within the limit; all of it beyond; straddling it.
        assert_eq!(
            Verdict::of_rounds(&[0.1, 0.2, 0.25, 0.28], 0.3),
            Verdict::Met
        );
        assert_eq!(
            Verdict::of_rounds(&[0.32, 0.35, 0.4, 0.5], 0.3),
            Verdict::Missed
        );
        assert_eq!(
            Verdict::of_rounds(&[0.2, 0.25, 0.35, 0.4], 0.3),
            Verdict::Unclear
        );
        // The median alone would say met; the spread says it is at the noise edge.
        assert_eq!(
            Verdict::of_rounds(&[0.1, 0.2, 0.28, 0.31, 0.9, 1.0], 0.3),
            Verdict::Unclear
        );
        // A round with nothing to divide by says nothing either way.
        assert_eq!(Verdict::of_rounds(&[0.1, f64::NAN], 0.3), Verdict::Unclear);
        assert_eq!(Verdict::of_rounds(&[], 0.3), Verdict::Unclear);
    }

    #[test]
    fn a_per_round_target_line_names_its_median_spread_and_verdict() {
        let t = Target::rounds("time", 0.3, "demand", vec![0.2, 0.1, 0.26, 0.04]);
        assert_eq!(t.verdict(), Verdict::Met);
        assert!(t.met());
        assert_eq!(
            t.line(),
            "target time <= 0.30x demand: median 0.15x, IQR 0.07x..0.23x MET   \
             (per round: 0.20 0.10 0.26 0.04)"
        );
        let j = t.json();
        assert_eq!(j["verdict"], "MET");
        assert!((j["per_round_median"].as_f64().unwrap() - 0.15).abs() < 1e-9);
        let missed = Target::rounds("faults", 0.05, "demand", vec![0.5, 0.6]);
        assert!(!missed.met());
        assert!(missed.line().contains("MISSED"));
    }
}

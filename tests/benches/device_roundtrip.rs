//! Device fault round trip: how long an emulated device waits from posting a page-request group
//! on its eventfd ring to seeing the answer, with faultd serving it, against raw ring handlers
//! measured in the same run on the same kind of RAM, ring and IOMMU table.
//!
//! `cargo bench -p faultd-tests --bench device_roundtrip` (needs root and /dev/userfaultfd).
//! Prints a table per scenario and writes the figures to `target/device_roundtrip.json`.
//! `FAULT_RT_QUICK=1` shrinks every size tenfold (a smoke run).
//!
//! The device is a thread of this benchmark playing the VMM's device with a `RingProducer`: it
//! posts one group for pages never touched, polls the notify eventfd until the answer is
//! published, and times post -> answer seen. Every group starts on a fresh 64 KiB-aligned page
//! (groups are 64 KiB apart), so every request needs an install and a map, whatever the
//! granule. Guest RAM: a 4 KiB-page memfd registered MISSING with its own uffd, zero-backed;
//! IOMMU: an emulated table (IOVA == GPA), 4 KiB granules unless the handler says 64k.
//!
//! Handlers (each on fresh RAM, ring and table, with a fresh serving thread):
//! raw-blocking, raw-polling ([`faultd_tests::raw_ring`]: `RingConsumer::read` ->
//! `UFFDIO_ZEROPAGE` of the granule -> `EmulatedIommu::map` -> SUCCESS, from a thread of this
//! process), raw-blocking-64k (the same with a 64 KiB table: one 64 KiB ZEROPAGE per granule),
//! faultd (default config), faultd-spin0 (`--spin-us 0`) and faultd-64k (default config, 64 KiB
//! table), the faultd ones real daemon processes serving through `add_device`.
//!
//! Scenarios: groups of 1 page and of 8 pages, isolated by a sleep longer than faultd's spin
//! window (every request finds the handler asleep; faultd is held to raw-blocking) and back to
//! back (faultd is held to raw-polling); then idle CPU over one second with every handler
//! attached and no requests.
//!
//! Noise, as in `fault_roundtrip`: on this machine (2 vCPUs of a VM whose idle vCPUs halt) a
//! round trip depends above all on where the scheduler puts the device thread relative to the
//! serving thread (same CPU: two local switches; different CPUs: two wake-ups of a halted vCPU),
//! and that placement sticks for a thread's life. So every scenario runs ROUNDS short rounds;
//! each round runs every handler once on fresh RAM with a fresh device thread and a fresh
//! serving thread (a new placement draw), in an order rotated by one each round. Samples are
//! pooled over rounds for the percentiles; each target line also prints the per-round ratios
//! and their median. A warm-up pass runs every handler once before anything is recorded.
//! Nothing asserts on time: targets print MET or MISSED. Correctness is asserted: every answer
//! is SUCCESS, every requested page is mapped in the table afterwards and the memfd holds
//! exactly the pages installed.
//!
//! Columns: CPU is the serving thread's (raw) or the whole faultd process's schedstat run time
//! during the requests; "device rq/req" is the device thread's run-queue wait per request (time
//! it was woken but not running); "svc p50" is the handler's own service time, from the ring
//! read returning the group to its answer published (faultd: its session's device latency
//! histogram; raw: measured the same way on its thread; both include the notify write, which
//! wakes the device). Round trip minus service is the kick, the serving thread's wake-up and
//! whatever it does before reading the ring, and the device's wake-up. After every attachment
//! the bench waits until faultd has released the RAM, so that no session teardown (freeing
//! guest RAM) overlaps the next handler's measurement.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use faultd_client::Session;
use faultd_tests::bench::{
    cpu_delta_ns, interleaved, on_fresh_thread, pct, per_unit_us, process_cpu_ns, write_idle,
    write_ratios, Bench, CpuSnap, Daemons, Pooled, Run, Schedstat, Target,
};
use faultd_tests::raw::PAGE;
use faultd_tests::raw_ring::{DeviceChannel, RingHandler, RingKind};
use faultd_tests::{settled_stats, Ram};
use iopf::ring::RingProducer;
use iopf::{DevId, Iova, Perm, ResponseCode};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};

/// Rounds per scenario (each runs every handler once).
const ROUNDS: usize = 24;
/// Isolated scenarios: groups per handler per round, and the sleep before each.
const ISOLATED_GROUPS: usize = 250;
const ISOLATED_GAP: Duration = Duration::from_micros(300);
/// Burst scenarios: groups per handler per round.
const BURST_GROUPS_1: usize = 2500;
const BURST_GROUPS_8: usize = 1200;
/// Pages in a multi-page group.
const MULTI: usize = 8;
/// Distance between the first pages of consecutive groups: one 64 KiB granule, so each group
/// lands on fresh granules for every handler.
const STRIDE: u64 = 64 << 10;
/// Idle CPU: groups before the idle second, and its length.
const IDLE_WARM_GROUPS: usize = 500;
const IDLE_WINDOW: Duration = Duration::from_secs(1);
/// Ring slots (requests and responses): one group is outstanding at a time.
const RING_SLOTS: u32 = 64;
/// The device id every handler serves.
const DEV: DevId = DevId(1);
/// faultd's default maximum spin window (its config default), for the report.
const FAULTD_SPIN_US: u64 = 200;
/// An answer that takes this long means a handler stopped serving: fail instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(60);
const ANSWER_TIMEOUT_MS: u16 = 10_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handler {
    Raw(RingKind),
    Raw64k,
    Faultd,
    FaultdSpin0,
    Faultd64k,
}

const HANDLERS: [Handler; 6] = [
    Handler::Raw(RingKind::Blocking),
    Handler::Raw(RingKind::Polling),
    Handler::Raw64k,
    Handler::Faultd,
    Handler::FaultdSpin0,
    Handler::Faultd64k,
];
const BLOCKING: Handler = Handler::Raw(RingKind::Blocking);
const POLLING: Handler = Handler::Raw(RingKind::Polling);

impl Handler {
    fn name(self) -> &'static str {
        match self {
            Handler::Raw(k) => k.name(),
            Handler::Raw64k => "raw-blocking-64k",
            Handler::Faultd => "faultd",
            Handler::FaultdSpin0 => "faultd-spin0",
            Handler::Faultd64k => "faultd-64k",
        }
    }

    fn index(self) -> usize {
        HANDLERS.iter().position(|&h| h == self).unwrap()
    }

    fn granule_shift(self) -> u32 {
        match self {
            Handler::Raw64k | Handler::Faultd64k => 16,
            _ => 12,
        }
    }
}

/// A handler serving one device.
enum Server {
    Raw(RingHandler),
    Faultd {
        session: Session,
        pid: u32,
        /// The session's fault thread (`faultd-s<id>`), which serves the device.
        tid: i32,
    },
}

/// One handler attached to fresh RAM, ring and table. Field order is drop order: the server
/// stops before the RAM it installs into goes away.
struct Attached {
    server: Server,
    ch: DeviceChannel,
    ram: Ram,
    /// The RAM memfd's name (unique among live attachments).
    ram_name: String,
    handler: Handler,
}

impl Attached {
    fn new(h: Handler, groups: usize, tag: &str, daemons: &Daemons) -> Attached {
        let size = groups as u64 * STRIDE;
        let ram_name = format!("{tag}-{}", h.name());
        let ram = Ram::new(&ram_name, size);
        let ch = DeviceChannel::create(size, h.granule_shift(), RING_SLOTS).expect("channel");
        let raw = match h {
            Handler::Raw(kind) => Some(kind),
            Handler::Raw64k => Some(RingKind::Blocking),
            _ => None,
        };
        let server = match raw {
            Some(kind) => {
                let queue = ch.consumer(DEV).expect("ring consumer");
                let iommu = ch.iommu().expect("emulated IOMMU");
                Server::Raw(
                    RingHandler::spawn(kind, queue, iommu, &ram.uffd, &ram.ram)
                        .expect("ring handler"),
                )
            }
            None => {
                let daemon = match h {
                    Handler::FaultdSpin0 => &daemons.spin0,
                    _ => &daemons.default,
                };
                // One live session per VM name: each attachment is its own VM.
                let mut session = ram.serve(daemon, &ram_name);
                let granule = session
                    .add_device(DEV.0, ch.queue(), ch.table())
                    .expect("add_device");
                assert_eq!(granule, ch.granule(), "{} granule", h.name());
                let (pid, tid) = (daemon.pid(), session_thread(daemon.pid(), session.id()));
                Server::Faultd { session, pid, tid }
            }
        };
        Attached {
            server,
            ch,
            ram,
            ram_name,
            handler: h,
        }
    }

    fn cpu(&self) -> CpuSnap {
        match &self.server {
            Server::Raw(r) => CpuSnap::Thread(r.cpu_ns().expect("handler schedstat")),
            // All of faultd's threads: the session thread does the work, but a design that
            // handed work to the control threads would show up here too.
            Server::Faultd { pid, .. } => {
                CpuSnap::Process(process_cpu_ns(*pid).expect("faultd schedstat"))
            }
        }
    }

    /// CPU used since `before`: (all the server's threads, its serving thread), ns.
    fn cpu_since(&self, before: &CpuSnap) -> (u64, u64) {
        let now = self.cpu();
        let serving = match &self.server {
            Server::Raw(_) => now.since(before),
            Server::Faultd { tid, .. } => now.thread_since(before, *tid),
        };
        (now.since(before), serving)
    }

    /// Checks that exactly `groups` groups of `pages` pages were served, every page is mapped
    /// and the memfd holds exactly the pages installed; detaches; adds the handler's own
    /// service-time median to `fig`. Returns once the handler is gone: a raw thread joined, or
    /// faultd done tearing the session down (so that no teardown overlaps a measurement).
    fn finish(self, groups: usize, pages: usize, fig: &mut Figures) {
        let name = self.handler.name();
        let granule = self.ch.granule();
        let view = self.ch.view().expect("IOMMU view");
        let mut worker = view.worker(0).expect("IOMMU worker");
        {
            let access = worker.begin_access();
            for g in 0..groups as u64 {
                for p in 0..pages as u64 {
                    let iova = Iova(g * STRIDE + p * PAGE as u64);
                    assert!(access.translate(iova, true), "{name}: {iova:?} not mapped");
                }
            }
        }
        let installed = groups as u64 * (pages as u64 * PAGE as u64).div_ceil(granule) * granule;
        assert_eq!(
            self.ram.ram.allocated_bytes().expect("fstat"),
            installed,
            "{name}: bytes resident in the memfd"
        );
        match self.server {
            Server::Raw(r) => {
                let stats = r.stop().expect("ring handler failed");
                assert_eq!(stats.success, groups as u64, "{name} groups answered");
                assert_eq!(stats.invalid, 0, "{name} INVALID answers");
                assert_eq!(stats.pages, (groups * pages) as u64, "{name} pages");
                fig.service_p50_us.push(pct(&stats.service_ns, 0.5));
            }
            Server::Faultd {
                mut session, pid, ..
            } => {
                // The latency sample is recorded just after the answer is published.
                let st =
                    settled_stats(&mut session, |s| s.device_latency_us.count >= groups as u64);
                assert_eq!(st.device.groups, groups as u64, "{name} groups");
                assert_eq!(st.device.success, groups as u64, "{name} SUCCESS");
                assert_eq!(st.device.pages, (groups * pages) as u64, "{name} pages");
                assert_eq!(st.errors, 0, "{name} errors");
                fig.service_p50_us.push(st.device_latency_us.p50);
                drop(session);
                wait_released(pid, &self.ram_name);
            }
        }
    }
}

/// Waits until faultd holds neither an fd nor a mapping of the RAM memfd `name`: its session is
/// torn down, and whatever freeing that costs faultd is paid, outside every measurement.
fn wait_released(pid: u32, name: &str) {
    let want = format!("/memfd:{name} (deleted)");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mapped = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .expect("faultd's maps")
            .lines()
            .any(|l| l.ends_with(&want));
        let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("faultd's fds")
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .any(|link| link.as_os_str() == want.as_str());
        if !mapped && !open {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "faultd still holds {name} 10 s after its session ended"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The tid of faultd's fault thread for session `id` (named `faultd-s<id>`). The thread is
/// spawned before `register` is answered, but names itself only once it runs: wait for that.
fn session_thread(pid: u32, id: u64) -> i32 {
    let want = format!("faultd-s{id}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("faultd's threads")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .find(|tid| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                    .is_ok_and(|c| c.trim_end() == want)
            });
        match found {
            Some(tid) => return tid,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_micros(200)),
            None => panic!("no thread {want} in faultd"),
        }
    }
}

/// Posts `groups` groups of `pages` pages from a fresh thread playing the device, sleeping
/// `gap` before each, and times each from post to answer seen (poll on the notify eventfd,
/// then read the response ring). Also returns the thread's schedstat over the loop.
fn device_requests(
    mut producer: RingProducer,
    groups: usize,
    pages: usize,
    gap: Option<Duration>,
) -> (Vec<u64>, Schedstat) {
    assert!((pages * PAGE) as u64 <= STRIDE);
    on_fresh_thread(
        TIMEOUT,
        "device requests were not answered in time",
        move || {
            let rw = Perm::READ | Perm::WRITE;
            let requests: Vec<Vec<(Iova, Perm)>> = (0..groups as u64)
                .map(|g| {
                    (0..pages as u64)
                        .map(|p| (Iova(g * STRIDE + p * PAGE as u64), rw))
                        .collect()
                })
                .collect();
            let mut times = Vec::with_capacity(groups);
            let mut answers = Vec::with_capacity(4);
            move || {
                for (i, req) in requests.iter().enumerate() {
                    if let Some(gap) = gap {
                        std::thread::sleep(gap);
                    }
                    let t0 = Instant::now();
                    let cookie = producer
                        .post_group(DEV, i as u32 & 0x1ff, req)
                        .expect("post_group");
                    loop {
                        let mut fds = [PollFd::new(producer.notify_fd(), PollFlags::POLLIN)];
                        let n = poll(&mut fds, PollTimeout::from(ANSWER_TIMEOUT_MS)).expect("poll");
                        assert!(n > 0, "group {i} not answered in {ANSWER_TIMEOUT_MS} ms");
                        producer.poll_responses(&mut answers).expect("responses");
                        if !answers.is_empty() {
                            break;
                        }
                    }
                    times.push(t0.elapsed().as_nanos() as u64);
                    assert_eq!(answers.as_slice(), &[(cookie, ResponseCode::Success)]);
                    answers.clear();
                }
                times
            }
        },
    )
}

/// One handler's figures in one scenario, pooled over rounds.
#[derive(Default)]
struct Figures {
    /// Round-trip times.
    lat: Pooled,
    cpu_ns: u64,
    /// Of `cpu_ns`, the serving thread's (faultd: the session's fault thread).
    thread_cpu_ns: u64,
    groups: u64,
    /// Device thread's run-queue wait.
    device_wait_ns: u64,
    /// The handler's own service-time medians, one per round.
    service_p50_us: Vec<f64>,
}

impl Figures {
    fn add(&mut self, samples: Vec<u64>, (cpu_ns, thread_ns): (u64, u64), device: Schedstat) {
        self.groups += samples.len() as u64;
        self.lat.add_round(samples);
        self.cpu_ns += cpu_ns;
        self.thread_cpu_ns += thread_ns;
        self.device_wait_ns += device.wait_ns;
    }

    fn cpu_per_req_us(&self) -> f64 {
        per_unit_us(self.cpu_ns, self.groups)
    }

    /// Mean of the per-round medians. Every handler here measures its own service time, so
    /// unlike `fault_roundtrip`'s (where the raw handlers have none to show) this is a number.
    fn service_us(&self) -> f64 {
        self.service_p50_us.iter().sum::<f64>() / self.service_p50_us.len().max(1) as f64
    }
}

type Scenario = [Figures; 6];

fn scenario(
    daemons: &Daemons,
    groups: usize,
    pages: usize,
    gap: Option<Duration>,
    tag: &str,
) -> Scenario {
    let mut out: Scenario = Default::default();
    interleaved(ROUNDS, &HANDLERS, |h, round| {
        let att = Attached::new(h, groups, &format!("{tag}-{round}"), daemons);
        let producer = att.ch.producer().expect("ring producer");
        let cpu = att.cpu();
        let (times, device) = device_requests(producer, groups, pages, gap);
        let used = att.cpu_since(&cpu);
        let fig = &mut out[h.index()];
        fig.add(times, used, device);
        att.finish(groups, pages, fig);
    });
    out
}

/// CPU each handler's serving thread used over one quiet second after a burst, all attached at
/// once; and each daemon process's whole CPU over the same second (default, spin0).
fn idle_cpu(daemons: &Daemons, groups: usize) -> ([u64; 6], [u64; 2]) {
    let attached: Vec<Attached> = HANDLERS
        .iter()
        .map(|&h| {
            let att = Attached::new(h, groups, "idle", daemons);
            device_requests(att.ch.producer().expect("producer"), groups, 1, None);
            att
        })
        .collect();
    let procs = [daemons.default.pid(), daemons.spin0.pid()];
    let procs_before = procs.map(|p| process_cpu_ns(p).expect("faultd schedstat"));
    let before: Vec<CpuSnap> = attached.iter().map(Attached::cpu).collect();
    std::thread::sleep(IDLE_WINDOW);
    let used: Vec<u64> = attached
        .iter()
        .zip(&before)
        .map(|(a, b)| a.cpu_since(b).1)
        .collect();
    let mut procs_used = [0; 2];
    for (i, p) in procs.iter().enumerate() {
        procs_used[i] = cpu_delta_ns(&procs_before[i], &process_cpu_ns(*p).expect("schedstat"));
    }
    for a in attached {
        a.finish(groups, 1, &mut Figures::default());
    }
    (used.try_into().unwrap(), procs_used)
}

/// The per-handler table of a scenario and its ratio lines. Its own, not shared with
/// `fault_roundtrip`'s: the columns are what this bench measures (device wait, every handler's
/// service time, the session thread's share of faultd's CPU) and it compares other pairs.
fn table(out: &mut String, sc: &Scenario) -> Value {
    let _ = writeln!(
        out,
        "  {:<16} {:>8} {:>8} {:>9} {:>11} {:>13} {:>9}",
        "handler", "p50 µs", "p99 µs", "CPU ms", "CPU/req µs", "device rq/req", "svc p50"
    );
    let mut handlers = serde_json::Map::new();
    for h in HANDLERS {
        let f = &sc[h.index()];
        let wait = per_unit_us(f.device_wait_ns, f.groups);
        let _ = writeln!(
            out,
            "  {:<16} {:>8.1} {:>8.1} {:>9.1} {:>11.2} {:>10.2} µs {:>6.1} µs",
            h.name(),
            f.lat.p(0.5),
            f.lat.p(0.99),
            f.cpu_ns as f64 / 1e6,
            f.cpu_per_req_us(),
            wait,
            f.service_us(),
        );
        handlers.insert(
            h.name().into(),
            f.lat.json_with([
                ("cpu_ms", json!(f.cpu_ns as f64 / 1e6)),
                ("cpu_per_request_us", json!(f.cpu_per_req_us())),
                ("serving_thread_cpu_ms", json!(f.thread_cpu_ns as f64 / 1e6)),
                ("device_runqueue_wait_per_request_us", json!(wait)),
                ("service_p50_us", json!(f.service_us())),
                ("per_round_service_p50_us", json!(f.service_p50_us)),
            ]),
        );
    }
    let shares: Vec<String> = [Handler::Faultd, Handler::FaultdSpin0, Handler::Faultd64k]
        .iter()
        .map(|&h| {
            let f = &sc[h.index()];
            let share = 100.0 * f.thread_cpu_ns as f64 / f.cpu_ns.max(1) as f64;
            format!("{} {share:.1}%", h.name())
        })
        .collect();
    let _ = writeln!(
        out,
        "  share of faultd's CPU in the session's fault thread: {}",
        shares.join(", ")
    );
    let mut ratios = serde_json::Map::new();
    let pairs: [(Handler, &[Handler]); 3] = [
        (Handler::Faultd, &[BLOCKING, POLLING]),
        (Handler::FaultdSpin0, &[BLOCKING, POLLING]),
        (Handler::Faultd64k, &[Handler::Raw64k, Handler::Faultd]),
    ];
    for (fd, bases) in pairs {
        let a = &sc[fd.index()].lat;
        let mut line = format!("  {:<16} vs", fd.name());
        for &base in bases {
            let j = write_ratios(&mut line, base.name(), a, &sc[base.index()].lat);
            ratios.insert(format!("{}/{}", fd.name(), base.name()), j);
        }
        let _ = writeln!(out, "{line}");
    }
    json!({"handlers": handlers, "ratios": ratios})
}

/// One scenario to run and report.
struct Plan {
    key: &'static str,
    title: String,
    groups: usize,
    pages: usize,
    gap: Option<Duration>,
    /// The baseline faultd is held to, and the limit on its p50 ratio.
    baseline: Handler,
    limit: f64,
}

fn main() {
    let run = Run::start(&Bench {
        json: "device_roundtrip.json",
        title: "device fault round trip: faultd vs raw ring handlers, eventfd ring + emulated \
                IOMMU, 4 KiB memfd RAM, post -> answer seen",
        rounds: ROUNDS,
        fresh: "RAM/ring/table with a fresh device thread",
        columns: "columns: CPU = serving thread run time (faultd: whole process); device rq/req = \
                  device thread's run-queue wait per request; svc p50 = handler's own \
                  read-to-answer median (mean over rounds)",
        kvm: false,
    });
    let div = run.div();
    let (iso, burst1, burst8) = (
        ISOLATED_GROUPS / div,
        BURST_GROUPS_1 / div,
        BURST_GROUPS_8 / div,
    );
    let gap_us = ISOLATED_GAP.as_micros();
    let plans = [
        Plan {
            key: "isolated_1",
            title: format!(
                "A1. isolated requests, 1 page per group, {gap_us} µs sleep before each"
            ),
            groups: iso,
            pages: 1,
            gap: Some(ISOLATED_GAP),
            baseline: BLOCKING,
            limit: 1.25,
        },
        Plan {
            key: "isolated_8",
            title: format!(
                "A8. isolated requests, {MULTI} pages per group, {gap_us} µs sleep before each"
            ),
            groups: iso,
            pages: MULTI,
            gap: Some(ISOLATED_GAP),
            baseline: BLOCKING,
            limit: 1.25,
        },
        Plan {
            key: "burst_1",
            title: "B1. burst, 1 page per group, back to back".to_owned(),
            groups: burst1,
            pages: 1,
            gap: None,
            baseline: POLLING,
            limit: 1.3,
        },
        Plan {
            key: "burst_8",
            title: format!("B8. burst, {MULTI} pages per group, back to back"),
            groups: burst8,
            pages: MULTI,
            gap: None,
            baseline: POLLING,
            limit: 1.3,
        },
    ];

    let mut out = String::new();
    let daemons = Daemons::start();

    // Warm-up, not recorded: first requests of a process and daemon, allocators and caches.
    for h in HANDLERS {
        for pages in [1, MULTI] {
            let att = Attached::new(h, 64, "warmup", &daemons);
            device_requests(att.ch.producer().expect("producer"), 64, pages, None);
            att.finish(64, pages, &mut Figures::default());
        }
    }

    let mut targets = Vec::new();
    let mut report = Vec::new();
    for plan in &plans {
        let sc = scenario(&daemons, plan.groups, plan.pages, plan.gap, plan.key);
        let _ = writeln!(
            out,
            "\n{}: {} groups per handler ({} rounds x {})",
            plan.title,
            plan.groups * ROUNDS,
            ROUNDS,
            plan.groups
        );
        let figures = table(&mut out, &sc);
        let what = format!(
            "faultd p50, {} page{}",
            plan.pages,
            if plan.pages == 1 { "" } else { "s" }
        );
        let t = Target::ratio(
            &what,
            plan.limit,
            plan.baseline.name(),
            &sc[Handler::Faultd.index()].lat,
            &sc[plan.baseline.index()].lat,
            0.5,
        );
        let _ = writeln!(out, "{}", t.line());
        report.push((
            plan.key,
            json!({"groups_per_handler": plan.groups * ROUNDS, "pages_per_group": plan.pages,
                   "gap_us": plan.gap.map(|g| g.as_micros() as u64),
                   "figures": figures, "targets": [t.json()]}),
        ));
        targets.push(t);
    }

    let (idle, idle_procs) = idle_cpu(&daemons, IDLE_WARM_GROUPS / div);
    let _ = writeln!(
        out,
        "\nIdle: serving thread CPU over the same {} s with no requests, every handler attached \
         after a {}-group burst (faultd spins at most {FAULTD_SPIN_US} µs after work)",
        IDLE_WINDOW.as_secs(),
        IDLE_WARM_GROUPS / div
    );
    let idle_json: Value = write_idle(&mut out, 16, HANDLERS.map(|h| (h.name(), idle[h.index()])));
    let _ = writeln!(
        out,
        "  whole faultd processes (all their sessions and control threads): default {:.3} ms, \
         spin0 {:.3} ms",
        idle_procs[0] as f64 / 1e6,
        idle_procs[1] as f64 / 1e6
    );
    report.push((
        "idle_cpu_ms",
        json!({"window_s": IDLE_WINDOW.as_secs(), "handlers": idle_json,
               "faultd_processes": {"default": idle_procs[0] as f64 / 1e6,
                                    "spin0": idle_procs[1] as f64 / 1e6}}),
    ));

    run.finish(out, &targets, report);
}

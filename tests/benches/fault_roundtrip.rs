//! Fault round trip: how long a thread blocked on a missing page of guest RAM waits for faultd,
//! against raw userfaultfd handlers measured in the same run on the same kind of RAM.
//!
//! `cargo bench -p faultd-tests --bench fault_roundtrip` (needs root, /dev/userfaultfd and
//! /dev/kvm). Prints a table per scenario and writes the figures to
//! `target/fault_roundtrip.json`. `FAULT_RT_QUICK=1` shrinks every size tenfold (a smoke run).
//!
//! Handlers (each on fresh 4 KiB memfd RAM registered MISSING with its own uffd):
//! raw-blocking, raw-polling, raw-tokio ([`faultd_tests::raw`]), faultd (default 50 µs spin)
//! and faultd with `--spin-us 0`, both real daemon processes.
//!
//! Scenarios: A, host-thread faults isolated by a sleep longer than faultd's spin window (every
//! fault finds the handler asleep); B, host-thread faults back to back; C, a KVM vCPU touching
//! pages in order (each touch also pays a port-I/O exit, measured separately over resident
//! pages); then idle CPU over one second with every handler attached and no faults.
//!
//! Noise: timings on this machine (2 vCPUs of a VM whose idle vCPUs halt at once) drift by
//! tens of percent over seconds, and above all depend on where the scheduler puts the faulting
//! thread relative to the handler thread: on the same CPU a round trip is two local context
//! switches, on different CPUs it is two wake-ups of a halted vCPU, several times slower. That
//! placement tends to stick for a thread's life. So ratios are only taken between handlers
//! measured close together, in ROUNDS short rounds; every round runs every handler once on
//! fresh RAM with fresh serving threads (a new placement draw), in an order rotated by one each
//! round, so no handler always goes first or last (or always follows the CPU-burning poller).
//! Samples are pooled over rounds for the percentiles; each target line also prints the
//! per-round ratios and their median, so a reader sees how much it moves. A warm-up pass runs
//! every handler once before anything is recorded. Nothing asserts on time: targets print MET
//! or MISSED.
//!
//! Columns: CPU is the serving thread's (raw) or the whole faultd process's schedstat run time
//! during the scenario; "faulter rq/f" is the faulting thread's run-queue wait per fault (time
//! it was woken but not running: a handler that keeps the CPU after waking it shows here);
//! "faultd svc" is faultd's own service-time median (event read to page installed, from its
//! session stats). "next fault after a fill" is the raw poller's view of the gap between
//! finishing one fault and the next one arriving: what a spin window has to cover.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use faultd_client::{GuestRam, Session};
use faultd_tests::bench::{
    interleaved, on_fresh_thread, one_slot_vm, pct, per_unit_us, process_cpu_ns, write_idle,
    write_ratios, Bench, CpuSnap, Daemons, Pooled, Run, Schedstat, Target,
};
use faultd_tests::raw::{RawHandler, RawKind, PAGE};
use faultd_tests::Ram;
use serde_json::{json, Value};
use testvmm::{Vm, Workload};

/// Rounds per scenario (each runs every handler once).
const ROUNDS: usize = 16;
/// Scenario A: faults per handler per round, and the gap before each.
const ISOLATED_PAGES: usize = 400;
const ISOLATED_GAP: Duration = Duration::from_micros(300);
/// Scenario B: faults per handler per round.
const BURST_PAGES: usize = 6000;
/// Scenario C: touches per handler per round.
const VCPU_PAGES: usize = 1000;
/// Idle CPU: faults before the idle second, and its length.
const IDLE_WARM_PAGES: usize = 1000;
const IDLE_WINDOW: Duration = Duration::from_secs(1);
/// faultd's default spin window (its config default), for the report.
const FAULTD_SPIN_US: u64 = 50;
/// A touch that takes this long means a handler stopped serving: fail instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handler {
    Raw(RawKind),
    Faultd,
    FaultdSpin0,
}

const HANDLERS: [Handler; 5] = [
    Handler::Raw(RawKind::Blocking),
    Handler::Raw(RawKind::Polling),
    Handler::Raw(RawKind::Tokio),
    Handler::Faultd,
    Handler::FaultdSpin0,
];
const RAW: [RawKind; 3] = [RawKind::Blocking, RawKind::Polling, RawKind::Tokio];
const FAULTDS: [Handler; 2] = [Handler::Faultd, Handler::FaultdSpin0];

impl Handler {
    fn name(self) -> &'static str {
        match self {
            Handler::Raw(k) => k.name(),
            Handler::Faultd => "faultd",
            Handler::FaultdSpin0 => "faultd-spin0",
        }
    }

    fn index(self) -> usize {
        HANDLERS.iter().position(|&h| h == self).unwrap()
    }
}

/// A handler serving one RAM.
enum Server {
    Raw(RawHandler),
    Faultd { session: Session, pid: u32 },
}

impl Server {
    fn attach(h: Handler, ram: &Ram, daemons: &Daemons) -> Server {
        let faultd = match h {
            Handler::Raw(kind) => {
                return Server::Raw(RawHandler::spawn(kind, &ram.uffd).expect("raw handler"))
            }
            Handler::Faultd => &daemons.default,
            Handler::FaultdSpin0 => &daemons.spin0,
        };
        // One live session per VM name (it keys the VM's store): each attachment is its own
        // VM, so one never waits for the previous one's session to end.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let vm = format!(
            "bench-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        Server::Faultd {
            session: ram.serve(faultd, &vm),
            pid: faultd.pid(),
        }
    }

    fn cpu(&self) -> CpuSnap {
        match self {
            Server::Raw(r) => CpuSnap::Thread(r.cpu_ns().expect("handler schedstat")),
            // All of faultd's threads: the fault thread does the work, but a design that
            // handed work to the control threads would show up here too.
            Server::Faultd { pid, .. } => {
                CpuSnap::Process(process_cpu_ns(*pid).expect("faultd schedstat"))
            }
        }
    }

    fn cpu_since(&self, before: &CpuSnap) -> u64 {
        self.cpu().since(before)
    }

    /// Checks the server resolved exactly `faults` faults, detaches it, and adds what it
    /// reports about itself to `fig`: a raw handler's inter-fault gaps, faultd's own
    /// service-time median (event read to page installed).
    fn finish(self, h: Handler, faults: usize, fig: &mut Figures) {
        match self {
            Server::Raw(r) => {
                let stats = r.stop().expect("raw handler failed");
                assert_eq!(stats.served, faults as u64, "{} served", h.name());
                fig.gaps_ns.extend(stats.gaps_ns);
            }
            Server::Faultd { mut session, .. } => {
                // faultd counts a fill after the ioctl that woke the faulter, so the last
                // fault's count can trail the faulter by a moment.
                let deadline = Instant::now() + Duration::from_secs(2);
                let st = loop {
                    let st = session.stats().expect("stats");
                    if st.zero_fills >= faults as u64 || Instant::now() > deadline {
                        break st;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                };
                assert_eq!(st.zero_fills, faults as u64, "{} zero fills", h.name());
                assert_eq!(st.errors, 0, "{} errors", h.name());
                fig.service_p50_us.push(st.latency_us.p50);
            }
        }
    }
}

/// Times a volatile read of the first byte of each of `pages` pages, from a fresh thread,
/// sleeping `gap` before each. Also returns the thread's schedstat over the loop: its run-queue
/// wait shows time a woken faulter spent waiting for a CPU rather than for the handler.
fn host_touches(ram: &GuestRam, pages: usize, gap: Option<Duration>) -> (Vec<u64>, Schedstat) {
    assert!((pages * PAGE) as u64 <= ram.size());
    let base = ram.host_addr() as usize;
    on_fresh_thread(TIMEOUT, "host touches were not served in time", move || {
        let mut times = Vec::with_capacity(pages);
        move || {
            for i in 0..pages {
                if let Some(gap) = gap {
                    std::thread::sleep(gap);
                }
                let t0 = Instant::now();
                // SAFETY: page `i` lies inside the live shared RAM mapping (checked against its
                // size above); a volatile byte read creates no reference into it.
                unsafe { std::ptr::read_volatile((base + i * PAGE) as *const u8) };
                times.push(t0.elapsed().as_nanos() as u64);
            }
            times
        }
    })
}

/// Runs TouchSequential over `pages` pages on `vm`; touch times in ns, without the first (it
/// also counts the vCPU's start).
fn vcpu_touches(vm: &mut Vm, pages: usize) -> Vec<u64> {
    let w = Workload::TouchSequential {
        first_page: 0,
        count: pages as u32,
    };
    let mut reports = vm.run(vec![w], &|_, _| {}).expect("vCPU run");
    let r = reports.pop().unwrap();
    assert_eq!(r.touch_times.len(), pages);
    r.touch_times[1..]
        .iter()
        .map(|d| d.as_nanos() as u64)
        .collect()
}

fn new_vm(ram: &GuestRam) -> Vm {
    one_slot_vm(ram.host_ptr(), ram.size(), TIMEOUT)
}

/// One handler's figures in one scenario, pooled over rounds.
#[derive(Default)]
struct Figures {
    /// Round-trip times.
    lat: Pooled,
    cpu_ns: u64,
    faults: u64,
    /// Faulting thread's run-queue wait (host scenarios).
    faulter_wait_ns: u64,
    /// faultd's own service-time medians, one per round.
    service_p50_us: Vec<f64>,
    /// Raw handlers: end of one resolution to reading the next event (see `RawStats`).
    gaps_ns: Vec<u64>,
}

impl Figures {
    /// `faults` counts every fault of the round: the vCPU scenario leaves the first touch out
    /// of `samples` (it also counts the vCPU's start) but not out of the CPU per fault.
    fn add(&mut self, samples: Vec<u64>, cpu_ns: u64, faults: usize) {
        self.lat.add_round(samples);
        self.cpu_ns += cpu_ns;
        self.faults += faults as u64;
    }

    fn cpu_per_fault_us(&self) -> f64 {
        per_unit_us(self.cpu_ns, self.faults)
    }
}

type Scenario = [Figures; 5];

struct Sizes {
    isolated: usize,
    burst: usize,
    vcpu: usize,
    idle_warm: usize,
}

fn scenario_host(daemons: &Daemons, pages: usize, gap: Option<Duration>, tag: &str) -> Scenario {
    let mut out: Scenario = Default::default();
    interleaved(ROUNDS, &HANDLERS, |h, round| {
        let ram = Ram::new(
            &format!("{tag}-{}-{round}", h.name()),
            (pages * PAGE) as u64,
        );
        let server = Server::attach(h, &ram, daemons);
        let cpu = server.cpu();
        let (times, faulter) = host_touches(&ram.ram, pages, gap);
        let used = server.cpu_since(&cpu);
        let fig = &mut out[h.index()];
        fig.add(times, used, pages);
        fig.faulter_wait_ns += faulter.wait_ns;
        server.finish(h, pages, fig);
    });
    out
}

/// Scenario C: a vCPU faulting each page; and two baselines over the same pages once resident:
/// the same VM again (every page mapped in KVM too: the port-I/O exit alone) and a fresh VM
/// (KVM maps each page on first touch, without a userfault).
fn scenario_vcpu(daemons: &Daemons, pages: usize) -> (Scenario, Pooled, Pooled) {
    let mut out: Scenario = Default::default();
    let (mut exit_only, mut kvm_map) = (Pooled::default(), Pooled::default());
    interleaved(ROUNDS, &HANDLERS, |h, round| {
        let ram = Ram::new(&format!("vcpu-{}-{round}", h.name()), (pages * PAGE) as u64);
        let server = Server::attach(h, &ram, daemons);
        let mut vm = new_vm(&ram.ram);
        let cpu = server.cpu();
        let times = vcpu_touches(&mut vm, pages);
        let used = server.cpu_since(&cpu);
        out[h.index()].add(times, used, pages);
        exit_only.add_round(vcpu_touches(&mut vm, pages));
        drop(vm);
        kvm_map.add_round(vcpu_touches(&mut new_vm(&ram.ram), pages));
        server.finish(h, pages, &mut out[h.index()]);
    });
    (out, exit_only, kvm_map)
}

/// CPU each handler's thread(s) used over one quiet second after a burst, all attached at once.
fn idle_cpu(daemons: &Daemons, pages: usize) -> [u64; 5] {
    let rams: Vec<Ram> = HANDLERS
        .iter()
        .map(|h| Ram::new(&format!("idle-{}", h.name()), (pages * PAGE) as u64))
        .collect();
    let servers: Vec<Server> = HANDLERS
        .iter()
        .zip(&rams)
        .map(|(&h, ram)| {
            let s = Server::attach(h, ram, daemons);
            host_touches(&ram.ram, pages, None);
            s
        })
        .collect();
    let before: Vec<CpuSnap> = servers.iter().map(Server::cpu).collect();
    std::thread::sleep(IDLE_WINDOW);
    let used: Vec<u64> = servers
        .iter()
        .zip(&before)
        .map(|(s, b)| s.cpu_since(b))
        .collect();
    for (s, h) in servers.into_iter().zip(HANDLERS) {
        s.finish(h, pages, &mut Figures::default());
    }
    used.try_into().unwrap()
}

/// The per-handler table of a scenario, optionally with a baseline subtracted from the
/// latencies before the ratios (`base_us`). Its own, not shared with `device_roundtrip`'s: the
/// columns are what this bench measures (faulter wait, faultd's service time where it has one,
/// the poller's inter-fault gaps).
fn table(out: &mut String, sc: &Scenario, base_us: Option<f64>) -> Value {
    let _ = writeln!(
        out,
        "  {:<13} {:>9} {:>9} {:>10} {:>11} {:>13} {:>12}",
        "handler", "p50 µs", "p99 µs", "CPU ms", "CPU/fault µs", "faulter rq/f", "faultd svc"
    );
    let mut handlers = serde_json::Map::new();
    for h in HANDLERS {
        let f = &sc[h.index()];
        let wait = per_unit_us(f.faulter_wait_ns, f.faults);
        // Only faultd reports its service time here (the raw uffd handlers do not measure one,
        // unlike device_roundtrip's ring handlers): "-" and null for the others.
        let svc = (!f.service_p50_us.is_empty())
            .then(|| f.service_p50_us.iter().sum::<f64>() / f.service_p50_us.len() as f64);
        let _ = writeln!(
            out,
            "  {:<13} {:>9.1} {:>9.1} {:>10.1} {:>11.2} {:>13} {:>12}",
            h.name(),
            f.lat.p(0.5),
            f.lat.p(0.99),
            f.cpu_ns as f64 / 1e6,
            f.cpu_per_fault_us(),
            if base_us.is_none() {
                format!("{wait:.2} µs")
            } else {
                "-".into()
            },
            svc.map_or("-".into(), |s| format!("p50 {s:.1} µs")),
        );
        handlers.insert(
            h.name().into(),
            f.lat.json_with([
                ("cpu_ms", json!(f.cpu_ns as f64 / 1e6)),
                ("cpu_per_fault_us", json!(f.cpu_per_fault_us())),
                ("faulter_runqueue_wait_per_fault_us", json!(wait)),
                ("faultd_service_p50_us", json!(svc)),
            ]),
        );
    }
    let mut ratios = serde_json::Map::new();
    for fd in FAULTDS {
        let a = &sc[fd.index()].lat;
        let mut line = format!("  {:<13} vs", fd.name());
        for raw in RAW {
            let b = &sc[Handler::Raw(raw).index()].lat;
            let mut j: Value = write_ratios(&mut line, raw.name(), a, b);
            if let Some(base) = base_us {
                let s = |q: f64| (a.p(q) - base) / (b.p(q) - base);
                let _ = write!(line, " (minus exit: {:.2}x {:.2}x)", s(0.5), s(0.99));
                j["p50_minus_exit"] = json!(s(0.5));
                j["p99_minus_exit"] = json!(s(0.99));
            }
            ratios.insert(format!("{}/{}", fd.name(), raw.name()), j);
        }
        let _ = writeln!(out, "{line}");
    }
    // What an adaptive poller has to bridge: the poller reads each event within a read(2) of
    // its arrival, so its gaps are the faulter's own time between faults.
    let poll = &sc[Handler::Raw(RawKind::Polling).index()];
    let gap = |q: f64| pct(&poll.gaps_ns, q);
    let _ = writeln!(
        out,
        "  next fault after a fill (raw-polling's view): p10 {:.1} p50 {:.1} p90 {:.1} µs; \
         faultd spins {} µs",
        gap(0.1),
        gap(0.5),
        gap(0.9),
        FAULTD_SPIN_US
    );
    let gaps = json!({"p10_us": gap(0.1), "p50_us": gap(0.5), "p90_us": gap(0.9)});
    json!({"handlers": handlers, "ratios": ratios, "inter_fault_gap_raw_polling": gaps})
}

fn main() {
    let run = Run::start(&Bench {
        json: "fault_roundtrip.json",
        title: "fault round trip: faultd vs raw userfaultfd handlers, 4 KiB memfd RAM",
        rounds: ROUNDS,
        fresh: "RAM",
        columns: "columns: CPU = serving thread(s) run time (faultd: whole process); faulter \
                  rq/f = faulting thread's run-queue wait per fault; faultd svc = faultd's own \
                  read-to-installed median",
        kvm: true,
    });
    let div = run.div();
    let sizes = Sizes {
        isolated: ISOLATED_PAGES / div,
        burst: BURST_PAGES / div,
        vcpu: VCPU_PAGES / div,
        idle_warm: IDLE_WARM_PAGES / div,
    };
    let mut out = String::new();
    let daemons = Daemons::start();

    // Warm-up, not recorded: first faults of a process, page allocator and caches.
    for h in HANDLERS {
        let ram = Ram::new("warmup", 256 * PAGE as u64);
        let server = Server::attach(h, &ram, &daemons);
        host_touches(&ram.ram, 256, None);
        server.finish(h, 256, &mut Figures::default());
    }

    let mut targets = Vec::new();
    let mut report = Vec::new();

    // A: isolated host-thread faults.
    let a = scenario_host(&daemons, sizes.isolated, Some(ISOLATED_GAP), "iso");
    let _ = writeln!(
        out,
        "\nA. host thread, isolated faults: {} per handler ({} rounds x {}), {} µs sleep before each",
        sizes.isolated * ROUNDS,
        ROUNDS,
        sizes.isolated,
        ISOLATED_GAP.as_micros()
    );
    let aj = table(&mut out, &a, None);
    let blocking = &a[Handler::Raw(RawKind::Blocking).index()].lat;
    let fd = &a[Handler::Faultd.index()].lat;
    let ta = [
        Target::ratio("faultd p50", 1.10, "raw-blocking", fd, blocking, 0.5),
        Target::ratio("faultd p99", 1.5, "raw-blocking", fd, blocking, 0.99),
    ];
    for t in &ta {
        let _ = writeln!(out, "{}", t.line());
    }
    report.push((
        "A_isolated",
        json!({"pages_per_handler": sizes.isolated * ROUNDS, "gap_us": ISOLATED_GAP.as_micros() as u64,
               "figures": aj, "targets": ta.iter().map(Target::json).collect::<Vec<_>>()}),
    ));
    targets.extend(ta);

    // B: bursts.
    let b = scenario_host(&daemons, sizes.burst, None, "burst");
    let _ = writeln!(
        out,
        "\nB. host thread, burst: {} back-to-back faults per handler ({} rounds x {})",
        sizes.burst * ROUNDS,
        ROUNDS,
        sizes.burst
    );
    let bj = table(&mut out, &b, None);
    let polling = &b[Handler::Raw(RawKind::Polling).index()].lat;
    let tb = Target::ratio(
        "faultd p50",
        1.2,
        "raw-polling",
        &b[Handler::Faultd.index()].lat,
        polling,
        0.5,
    );
    let _ = writeln!(out, "{}", tb.line());
    report.push((
        "B_burst",
        json!({"pages_per_handler": sizes.burst * ROUNDS, "figures": bj,
               "targets": [tb.json()]}),
    ));
    targets.push(tb);

    // C: KVM vCPU.
    let (c, exit_only, kvm_map) = scenario_vcpu(&daemons, sizes.vcpu);
    let exit_p50 = exit_only.p(0.5);
    let _ = writeln!(
        out,
        "\nC. KVM vCPU, TouchSequential: {} touches per handler ({} rounds x {}); each touch \
         includes a port-I/O exit",
        (sizes.vcpu - 1) * ROUNDS,
        ROUNDS,
        sizes.vcpu - 1
    );
    let _ = writeln!(
        out,
        "  baseline, resident pages, same VM (exit alone): p50 {:.1} µs p99 {:.1} µs; fresh VM \
         (exit + KVM maps the page, no userfault): p50 {:.1} µs p99 {:.1} µs",
        exit_p50,
        exit_only.p(0.99),
        kvm_map.p(0.5),
        kvm_map.p(0.99)
    );
    let _ = writeln!(
        out,
        "  (\"minus exit\": the exit-alone p50 subtracted from both sides of a ratio)"
    );
    let cj = table(&mut out, &c, Some(exit_p50));
    report.push((
        "C_vcpu",
        json!({"touches_per_handler": (sizes.vcpu - 1) * ROUNDS,
               "exit_alone": {"p50_us": exit_p50, "p99_us": exit_only.p(0.99)},
               "fresh_vm_resident": {"p50_us": kvm_map.p(0.5), "p99_us": kvm_map.p(0.99)},
               "figures": cj}),
    ));

    // Idle.
    let idle = idle_cpu(&daemons, sizes.idle_warm);
    let _ = writeln!(
        out,
        "\nIdle: CPU over the same {} s with no faults, every handler attached after a {}-fault burst",
        IDLE_WINDOW.as_secs(),
        sizes.idle_warm
    );
    let idle_json: Value = write_idle(&mut out, 13, HANDLERS.map(|h| (h.name(), idle[h.index()])));
    report.push((
        "idle_cpu_ms",
        json!({"window_s": IDLE_WINDOW.as_secs(), "handlers": idle_json}),
    ));

    run.finish(out, &targets, report);
}

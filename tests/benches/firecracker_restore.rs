//! Firecracker restore: how long serving every fault of a snapshot restore takes through
//! faultd, against a minimal single-threaded handler of the kind Firecracker ships as an
//! example ([`faultd_tests::fc_example`]), measured in the same run.
//!
//! `cargo bench -p faultd-tests --bench firecracker_restore` (needs root, /dev/userfaultfd and
//! /dev/kvm). Prints a table per scenario and writes the figures to
//! `target/firecracker_restore.json`. `FAULT_RT_QUICK=1` shrinks every size tenfold;
//! `FC_RESTORE_SCENARIOS=D` (letters) runs only those scenarios.
//!
//! A round restores fresh anonymous guest RAM through one handler, as
//! [`faultd_tests::firecracker`]'s stand-in does it (one sendmsg of JSON + uffd): the clock
//! starts before that message is sent and stops when the last page has been touched, so it
//! includes everything the handler does from receiving the message on (faultd's validation
//! and session start; the example's mmap of the file). Both handlers' sockets are ready
//! before the clock starts, as an operator's `firecracker_listen` is before the load. The
//! snapshot file is in the page cache for both.
//!
//! Scenarios: A, one thread touches every page in order (a linear restore); B, one thread
//! touches every page in a random order; C, two threads each touch half of the pages in a
//! random order (two vCPUs); D, a real KVM vCPU verifies random pages against the snapshot
//! (the guest checks every dword it reads, so this also proves both handlers right).
//!
//! Handlers: `minimal` (poll + read + one UFFDIO_COPY per fault from the mapped file, a process
//! of its own as Firecracker's example handlers are), `faultd` (the real daemon, default
//! config); for reference, without targets: `minimal-inproc` (the same loop on a thread of the
//! restoring process: no address-space switch between faulter and handler, which no external
//! handler has), `minimal-threads` (the `minimal` process with as many idle threads as faultd
//! has: what a handler pays for living in a multi-threaded process, measured at about 1 µs per
//! fault here when faults come back to back on one CPU) and `faultd-spin0` (`--spin-us 0`: no
//! polling window). Rounds interleave the
//! handlers, order rotated each round (see `fault_roundtrip.rs` for why: placement noise on a
//! 2-vCPU machine). The target: the median restore time of faultd over the minimal handler's,
//! <= 1.0. Also printed: the time from the message to the first page served ("1st page", host
//! scenarios), which is how long a handler keeps Firecracker's load call waiting before it
//! serves at all.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use faultd_client::RamPageSize;
use faultd_tests::bench::{
    interleaved, on_fresh_thread, one_slot_vm, process_cpu_ns, warm_page_cache, Bench, CpuSnap,
    Daemons, Pooled, Run, Target,
};
use faultd_tests::fc_example::{ExampleHandler, ExampleProcess};
use faultd_tests::firecracker::{copy_with_timeout, pattern_snapshot, FcRestore, WireForm, PAGE};
use faultd_tests::Faultd;
use serde_json::{json, Value};
use testvmm::{page_sequence, Workload};

/// Rounds per scenario (each runs every handler once).
const ROUNDS: usize = 16;
/// Pages of guest RAM per restore (host scenarios: every one is touched).
const PAGES: usize = 8192;
/// Scenario D: the guest's random touches (some pages twice: each page faults once).
const VCPU_TOUCHES: u32 = 3000;
const SEED: u32 = 0x5EED;
/// A restore that takes this long means a handler stopped serving: fail instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handler {
    Minimal,
    MinimalInProcess,
    MinimalThreads,
    Faultd,
    FaultdSpin0,
}

const HANDLERS: [Handler; 5] = [
    Handler::Minimal,
    Handler::MinimalInProcess,
    Handler::MinimalThreads,
    Handler::Faultd,
    Handler::FaultdSpin0,
];

/// Threads of `minimal-threads` besides its serving one: as many as faultd has besides the
/// fault thread of the restore (main, two runtime workers, the fault thread kept ready for
/// the socket's next restore).
const DAEMON_IDLE_THREADS: usize = 4;

impl Handler {
    fn name(self) -> &'static str {
        match self {
            Handler::Minimal => "minimal",
            Handler::MinimalInProcess => "minimal-inproc",
            Handler::MinimalThreads => "minimal-threads",
            Handler::Faultd => "faultd",
            Handler::FaultdSpin0 => "faultd-spin0",
        }
    }

    fn index(self) -> usize {
        HANDLERS.iter().position(|&h| h == self).unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    InOrder,
    Random,
    RandomTwoThreads,
    Vcpu,
}

/// What every round shares: the daemons, the snapshot file, a directory for sockets.
struct Env {
    daemons: Daemons,
    dir: tempfile::TempDir,
    snapshot: PathBuf,
    pages: usize,
    next: std::cell::Cell<u64>,
}

impl Env {
    /// A fresh socket path.
    fn socket(&self, tag: &str) -> PathBuf {
        let n = self.next.get();
        self.next.set(n + 1);
        self.dir.path().join(format!("{tag}-{n}.sock"))
    }
}

/// A handler ready to serve one restore on its socket.
enum Server<'a> {
    Minimal(ExampleProcess),
    MinimalInProcess(ExampleHandler),
    Faultd { faultd: &'a Faultd, vm: String },
}

impl<'a> Server<'a> {
    fn ready(h: Handler, env: &'a Env, socket: &Path) -> Server<'a> {
        let faultd = match h {
            Handler::Minimal | Handler::MinimalThreads => {
                let idle = match h {
                    Handler::MinimalThreads => DAEMON_IDLE_THREADS,
                    _ => 0,
                };
                return Server::Minimal(
                    ExampleProcess::spawn(socket, &env.snapshot, idle).expect("example handler"),
                );
            }
            Handler::MinimalInProcess => {
                return Server::MinimalInProcess(
                    ExampleHandler::spawn(socket, &env.snapshot).expect("example handler"),
                )
            }
            Handler::Faultd => &env.daemons.default,
            Handler::FaultdSpin0 => &env.daemons.spin0,
        };
        let vm = socket.file_stem().unwrap().to_string_lossy().into_owned();
        faultd
            .listen_firecracker(&vm, socket, &env.snapshot, None, None)
            .expect("firecracker_listen");
        Server::Faultd { faultd, vm }
    }

    fn cpu(&self) -> CpuSnap {
        match self {
            Server::Minimal(m) => {
                CpuSnap::Process(process_cpu_ns(m.pid()).expect("handler schedstat"))
            }
            Server::MinimalInProcess(m) => CpuSnap::Thread(m.cpu_ns().expect("handler schedstat")),
            Server::Faultd { faultd, .. } => {
                CpuSnap::Process(process_cpu_ns(faultd.pid()).expect("faultd schedstat"))
            }
        }
    }

    /// Checks the handler filled exactly `faults` pages, without errors, and ends the restore
    /// (its hang-up ends the handler's session).
    /// faultd's own service-time median (event read to page installed), where it has one.
    fn finish(self, h: Handler, faults: u64, restore: FcRestore) -> Option<f64> {
        match self {
            Server::Minimal(m) => {
                drop(restore);
                let stats = m.finish().expect("example handler failed");
                assert_eq!(stats.copied, faults, "{}: pages copied", h.name());
                None
            }
            Server::MinimalInProcess(m) => {
                let stats = m.stop().expect("example handler failed");
                assert_eq!(stats.copied, faults, "minimal-inproc: pages copied");
                None
            }
            Server::Faultd { faultd, vm } => {
                let st = faultd.settled_vm_stats(&format!("{vm}-1"), |s| {
                    s.first().is_some_and(|s| s.file_fills >= faults)
                });
                assert_eq!(st.len(), 1, "{}: one session", h.name());
                assert_eq!(st[0].file_fills, faults, "{}: pages filled", h.name());
                assert_eq!(st[0].errors, 0, "{}: errors", h.name());
                Some(st[0].latency_us.p50)
            }
        }
    }
}

/// A permutation of `0..n`, fixed by `seed` (xorshift64 Fisher-Yates).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// Reads the first byte of each page at `offs` of the RAM at `base`.
fn touch(base: u64, offs: &[usize]) {
    for &p in offs {
        // SAFETY: `base + p * PAGE` lies inside the live guest RAM mapping of the restore (the
        // page indexes are below its page count); a volatile read creates no reference.
        unsafe { std::ptr::read_volatile((base + p as u64 * PAGE) as *const u8) };
    }
}

/// What one round measured.
struct RoundResult {
    /// Message sent -> last page touched.
    ns: u64,
    /// Message sent -> first page touched (host scenarios): how soon the handler serves.
    first_ns: Option<u64>,
    /// Handler CPU time.
    cpu_ns: u64,
    /// Pages faulted.
    faults: u64,
    /// faultd's service-time median.
    service_p50_us: Option<f64>,
}

/// One round of `sc` through `h`.
fn round(env: &Env, sc: Scenario, h: Handler, round: usize) -> RoundResult {
    let pages = env.pages;
    let socket = env.socket(h.name());
    let mut restore = FcRestore::new(&[(pages as u64 * PAGE, 0)], RamPageSize::Size4K)
        .expect("guest RAM and uffd");
    let base = restore.regions[0].ram.host_addr();
    let server = Server::ready(h, env, &socket);
    let cpu = server.cpu();
    let (ns, first_ns, faults, restore) = match sc {
        Scenario::Vcpu => {
            let mut vm = one_slot_vm(
                restore.regions[0].ram.host_ptr(),
                pages as u64 * PAGE,
                TIMEOUT,
            );
            let t0 = Instant::now();
            restore.send(&socket, WireForm::Current).expect("send");
            let reports = vm
                .run(
                    vec![Workload::Verify {
                        seed: SEED,
                        touches: VCPU_TOUCHES,
                        first_page: 0,
                        page_count: pages as u32,
                    }],
                    &|_, _| {},
                )
                .expect("guest run");
            let ns = t0.elapsed().as_nanos() as u64;
            assert_eq!(
                reports[0].mismatches,
                0,
                "{}: guest saw wrong bytes",
                h.name()
            );
            let distinct: std::collections::BTreeSet<u32> =
                page_sequence(SEED, VCPU_TOUCHES, 0, pages as u32)
                    .into_iter()
                    .collect();
            (ns, None, distinct.len() as u64, restore)
        }
        _ => {
            let order = match sc {
                Scenario::InOrder => (0..pages).collect(),
                _ => shuffled(pages, 0x9E37_79B9 + round as u64),
            };
            let two = sc == Scenario::RandomTwoThreads;
            let late = "restore touches were not served in time";
            let ((ns, first, restore), _) = on_fresh_thread(TIMEOUT, late, move || {
                move || {
                    let t0 = Instant::now();
                    restore.send(&socket, WireForm::Current).expect("send");
                    // The load's first access: served as soon as the handler is ready.
                    touch(base, &order[..1]);
                    let first = t0.elapsed().as_nanos() as u64;
                    let rest = &order[1..];
                    if two {
                        let (a, b) = rest.split_at(rest.len() / 2);
                        std::thread::scope(|s| {
                            s.spawn(|| touch(base, a));
                            touch(base, b);
                        });
                    } else {
                        touch(base, rest);
                    }
                    (t0.elapsed().as_nanos() as u64, first, restore)
                }
            });
            (ns, Some(first), pages as u64, restore)
        }
    };
    let used = server.cpu().since(&cpu);
    if sc != Scenario::Vcpu {
        // Outside the clock: whole pages equal the file (the vCPU scenario's guest checks its
        // own).
        let sample: Vec<u64> = (0..pages as u64).step_by(97).map(|p| p * PAGE).collect();
        let got = copy_with_timeout(
            sample.iter().map(|&o| base + o).collect(),
            PAGE as usize,
            TIMEOUT,
        );
        let file = std::fs::File::open(&env.snapshot).unwrap();
        let mut want = vec![0u8; PAGE as usize];
        for (&o, page) in sample.iter().zip(&got) {
            use std::os::unix::fs::FileExt;
            file.read_exact_at(&mut want, o).unwrap();
            assert!(
                *page == want,
                "{}: page at {o:#x} differs from the snapshot",
                h.name()
            );
        }
    }
    let service_p50_us = server.finish(h, faults, restore);
    RoundResult {
        ns,
        first_ns,
        cpu_ns: used,
        faults,
        service_p50_us,
    }
}

/// One handler's figures in one scenario.
#[derive(Default)]
struct Figures {
    /// Restore times, one sample per round.
    restore: Pooled,
    cpu_ns: u64,
    faults: u64,
    /// faultd's service-time medians, one per round.
    service_p50_us: Vec<f64>,
    /// Message sent -> first page touched, one sample per round (host scenarios).
    first: Pooled,
}

fn scenario(env: &Env, sc: Scenario) -> [Figures; HANDLERS.len()] {
    let mut out: [Figures; HANDLERS.len()] = Default::default();
    interleaved(ROUNDS, &HANDLERS, |h, r| {
        let r = round(env, sc, h, r);
        let f = &mut out[h.index()];
        f.service_p50_us.extend(r.service_p50_us);
        f.restore.add_round(vec![r.ns]);
        if let Some(first) = r.first_ns {
            f.first.add_round(vec![first]);
        }
        f.cpu_ns += r.cpu_ns;
        f.faults += r.faults;
    });
    out
}

fn table(out: &mut String, figs: &[Figures; HANDLERS.len()]) -> Value {
    let _ = writeln!(
        out,
        "  {:<15} {:>11} {:>9} {:>11} {:>9} {:>13} {:>12}",
        "handler", "restore ms", "µs/fault", "1st page µs", "CPU ms", "CPU/fault µs", "faultd svc"
    );
    let mut handlers = serde_json::Map::new();
    for h in HANDLERS {
        let f = &figs[h.index()];
        let median_ms = f.restore.p(0.5) / 1e3;
        let faults_per_round = f.faults as f64 / ROUNDS as f64;
        let per_fault = f.restore.p(0.5) / faults_per_round;
        let cpu_per_fault = f.cpu_ns as f64 / f.faults.max(1) as f64 / 1e3;
        // Only faultd reports its service time (event read to page installed).
        let svc = (!f.service_p50_us.is_empty())
            .then(|| f.service_p50_us.iter().sum::<f64>() / f.service_p50_us.len() as f64);
        let first = (!f.first.samples.is_empty()).then(|| f.first.p(0.5));
        let _ = writeln!(
            out,
            "  {:<15} {:>11.1} {:>9.2} {:>11} {:>9.1} {:>13.2} {:>12}",
            h.name(),
            median_ms,
            per_fault,
            first.map_or("-".into(), |us| format!("{us:.0}")),
            f.cpu_ns as f64 / 1e6,
            cpu_per_fault,
            svc.map_or("-".into(), |s| format!("p50 {s:.1} µs"))
        );
        handlers.insert(
            h.name().into(),
            json!({
                "restore_ms_median": median_ms,
                "restore_ms_per_round": f.restore.per_round(0.5).iter().map(|us| us / 1e3).collect::<Vec<_>>(),
                "us_per_fault": per_fault,
                "cpu_ms": f.cpu_ns as f64 / 1e6,
                "cpu_per_fault_us": cpu_per_fault,
                "faults_per_round": faults_per_round,
                "faultd_service_p50_us": svc,
                "first_page_us_median": first,
            }),
        );
    }
    Value::Object(handlers)
}

fn main() {
    let run = Run::start(&Bench {
        json: "firecracker_restore.json",
        title: "Firecracker restore: faultd vs a minimal example-style handler (poll + read + \
                one UFFDIO_COPY per fault), anonymous 4 KiB guest RAM, snapshot in page cache",
        rounds: ROUNDS,
        fresh: "guest RAM, uffd and socket",
        columns: "columns: restore ms = median over rounds of message sent -> last page touched; \
                  1st page = message sent -> first page touched (median); \
                  µs/fault = that over the faults of a round; CPU = handler process (minimal, minimal-threads), \
                  thread (minimal-inproc) or whole faultd process; faultd svc = faultd's own \
                  event-read-to-installed median",
        kvm: true,
    });
    let pages = PAGES / run.div();
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = dir.path().join("mem");
    let file = pattern_snapshot(&snapshot, &[(0, pages as u64 * PAGE, 0)], SEED);
    // Into the page cache, for every handler alike.
    warm_page_cache(&snapshot);
    drop(file);
    let env = Env {
        daemons: Daemons::start(),
        dir,
        snapshot,
        pages,
        next: std::cell::Cell::new(0),
    };
    // Warm-up, not recorded.
    for h in HANDLERS {
        round(&env, Scenario::Random, h, 0);
    }

    let mut out = String::new();
    let mut targets = Vec::new();
    let mut report = Vec::new();
    let scenarios = [
        (
            Scenario::InOrder,
            "A_in_order",
            format!("A. one thread touches all {pages} pages in order"),
        ),
        (
            Scenario::Random,
            "B_random",
            format!("B. one thread touches all {pages} pages in a random order"),
        ),
        (
            Scenario::RandomTwoThreads,
            "C_random_two_threads",
            format!("C. two threads each touch half of the {pages} pages in a random order"),
        ),
        (
            Scenario::Vcpu,
            "D_kvm_vcpu",
            format!(
                "D. a KVM vCPU verifies {VCPU_TOUCHES} random pages of {pages} against the snapshot"
            ),
        ),
    ];
    // FC_RESTORE_SCENARIOS=D (or "AD", ...): only those scenarios, for investigating one.
    let only = std::env::var("FC_RESTORE_SCENARIOS").ok();
    for (sc, key, title) in scenarios {
        if only.as_deref().is_some_and(|o| !o.contains(&key[..1])) {
            continue;
        }
        let figs = scenario(&env, sc);
        let _ = writeln!(out, "\n{title} ({ROUNDS} rounds)");
        let j = table(&mut out, &figs);
        let t = Target::ratio(
            "faultd restore time",
            1.0,
            "minimal",
            &figs[Handler::Faultd.index()].restore,
            &figs[Handler::Minimal.index()].restore,
            0.5,
        );
        // For reference only (no target): what faultd's polling window buys, and what the
        // baseline would gain if it could live in the restoring process.
        let over = |a: Handler, b: Handler| {
            figs[a.index()].restore.p(0.5) / figs[b.index()].restore.p(0.5)
        };
        let spin0 = over(Handler::FaultdSpin0, Handler::Minimal);
        let inproc = over(Handler::MinimalInProcess, Handler::Minimal);
        let threads = over(Handler::MinimalThreads, Handler::Minimal);
        let _ = writeln!(out, "{}", t.line());
        let _ = writeln!(
            out,
            "  reference, no target: faultd-spin0/minimal {spin0:.2}x, \
             minimal-inproc/minimal {inproc:.2}x, faultd/minimal-inproc {:.2}x, \
             minimal-threads/minimal {threads:.2}x, faultd/minimal-threads {:.2}x",
            over(Handler::Faultd, Handler::MinimalInProcess),
            over(Handler::Faultd, Handler::MinimalThreads)
        );
        report.push((
            key,
            json!({"title": title, "handlers": j, "target": t.json(),
                   "faultd_spin0_over_minimal": spin0,
                   "minimal_inproc_over_minimal": inproc,
                   "minimal_threads_over_minimal": threads}),
        ));
        targets.push(t);
    }
    run.finish(out, &targets, report);
}

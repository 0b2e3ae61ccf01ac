//! Prefetch: what working-set replay and fault-around buy, each against faultd without them
//! and against a minimal handler, measured in the same run (issue 15's benchmarks).
//!
//! `cargo bench -p faultd-tests --bench prefetch` (needs root, /dev/userfaultfd and /dev/kvm).
//! Prints a table per scenario and writes the figures to `target/prefetch.json`.
//! `FAULT_RT_QUICK=1` divides every working set, stream and round count tenfold (rounds: to 2;
//! a smoke run, its ratios mean little); `PREFETCH_PARTS=R` (restore) or `A` (fault-around)
//! runs one part.
//!
//! **Restore (R).** A 1 GiB snapshot: its first 384 MiB hold data (every dword
//! `testvmm::pattern(gpa, seed)`), the rest is a hole in a sparse file. A real KVM guest
//! (testvmm, one vCPU) touches its working set in a fixed order: 32 MiB in ascending order
//! (write-then-verify of the pattern it already holds), then a fixed pseudo-random sequence of
//! 8960 touches (about 32 MiB of distinct pages) over 192 MiB, each page checked against the
//! snapshot by the guest. That is 64 MiB; every page is snapshot data. The clock starts at the
//! restore's resume (VMM: before the registration; Firecracker stand-in: before the message
//! is sent) and stops when the guest has touched its whole working set.
//! Handlers, each round in a rotated order, every one on fresh guest RAM:
//! `faultd+rec` (faultd replaying a recording of this working set, made by a recording
//! restore earlier in the same run), `faultd` (demand-only, default config), `faultd-spin0`
//! (demand-only, no polling window), `minimal` (poll + read + one `UFFDIO_COPY` per fault
//! from the mapped file: for the VMM, a thread of the benchmark process,
//! [`faultd_tests::raw`]; for the Firecracker stand-in, a process of its own,
//! [`faultd_tests::fc_example`]) and `faultd+wrong` (faultd replaying a recording of another
//! working set of the same snapshot: 32 MiB in order and about 29 MiB at random over other
//! pages). "wasted" is the guest RAM resident after the run (mincore) outside the working set:
//! pages a handler installed that the guest never touched (faultd cannot see a touch of a page
//! it installed, so the benchmark, which knows the working set, counts them).
//!
//! **Fault-around (A).** `faultd` with `[around]` off (the default) and on, on fresh
//! zero-filled memfd RAM each round: a vCPU writing then verifying 64 MiB in ascending order
//! (faults and time); a vCPU writing then verifying 2000 random pages of 64 MiB, each page
//! visit timed through an I/O exit (p99 of the write pass: faults plus the exit); the emulated
//! PRI device DMA-writing 64 MiB in 256 KiB transfers in ascending order (page-request
//! groups and time); the device writing 2000 random 4 KiB pages, each timed (p99).
//!
//! Every ratio is taken per round (the two figures of one round, measured seconds apart) and
//! reported as the median over rounds with its interquartile range; a target says MET when
//! the whole IQR is within it, MISSED when all of it is beyond, else UNCLEAR. CPU is the whole
//! faultd process's (or the minimal handler's thread or process) from before the clock starts
//! until its counters have settled after the guest is done.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use faultd_client::{RamPageSize, Session};
use faultd_proto::SessionStats;
use faultd_tests::bench::{
    interleaved, load_average, one_slot_vm, pct, process_cpu_ns, quartiles, ratio_text,
    resident_pages, warm_page_cache, Bench, CpuSnap, Run, Target,
};
use faultd_tests::fc_example::ExampleProcess;
use faultd_tests::firecracker::{copy_with_timeout, pattern_snapshot, FcRestore, WireForm};
use faultd_tests::raw::{FileSource, RawHandler, RawKind, Source};
use faultd_tests::{pattern_page, settled_stats, Faultd, Ram};
use serde_json::{json, Value};
use testvmm::{page_sequence, DeviceConfig, PriDevice, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// The snapshot and the guest RAM of a restore.
const SNAPSHOT_BYTES: u64 = 1 << 30;
/// The snapshot's data, from offset 0; the rest is a hole.
const DATA_BYTES: u64 = 384 * MIB;
const SNAP_SEED: u32 = 0x9E7C;
/// Rounds of each part (each runs every handler once).
const ROUNDS: usize = 8;
/// Fault-around: the streams' length, and the random scenarios' touches.
const STREAM_BYTES: u64 = 64 * MIB;
const RANDOM_TOUCHES: u32 = 2000;
/// A run that takes this long means a handler stopped serving: fail instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(120);

/// faultd recording working sets and replaying them.
const REC_CONFIG: &str = "[working_set]\nrecord = true\nreplay = true\nrecord_ms = 60000\n\
                          record_pages = 65536\n";

/// A working set: pages touched in ascending order, then a fixed pseudo-random sequence (the
/// guest's `Verify` sequence: its LCG runs from the pattern's seed, [`SNAP_SEED`], so two
/// working sets differ by their ranges).
#[derive(Clone, Copy, Debug)]
struct WorkingSet {
    seq_first: u32,
    seq_pages: u32,
    rnd_touches: u32,
    rnd_first: u32,
    rnd_pages: u32,
}

impl WorkingSet {
    /// The one the measured guests touch: 32 MiB from 16 MiB on, then random over
    /// [64 MiB, 256 MiB).
    fn measured(div: u32) -> WorkingSet {
        WorkingSet {
            seq_first: (16 * MIB / PAGE) as u32,
            seq_pages: 8192 / div,
            rnd_touches: 8960 / div,
            rnd_first: (64 * MIB / PAGE) as u32,
            rnd_pages: (192 * MIB / PAGE) as u32,
        }
    }

    /// Another (the wrong recording's): 32 MiB from 256 MiB on, then random over
    /// [288 MiB, 384 MiB): no page in common with [`WorkingSet::measured`].
    fn other(div: u32) -> WorkingSet {
        WorkingSet {
            seq_first: (256 * MIB / PAGE) as u32,
            seq_pages: 8192 / div,
            rnd_touches: 8960 / div,
            rnd_first: (288 * MIB / PAGE) as u32,
            rnd_pages: (96 * MIB / PAGE) as u32,
        }
    }

    /// The guest's two runs, in order. The sequential part writes the pattern the snapshot
    /// already holds, then verifies it; the random part verifies the snapshot's pattern.
    fn workloads(&self) -> [Workload; 2] {
        [
            Workload::WriteVerifySequential {
                seed: SNAP_SEED,
                first_page: self.seq_first,
                page_count: self.seq_pages,
            },
            Workload::Verify {
                seed: SNAP_SEED,
                touches: self.rnd_touches,
                first_page: self.rnd_first,
                page_count: self.rnd_pages,
            },
        ]
    }

    /// Its distinct pages (page numbers).
    fn pages(&self) -> BTreeSet<u64> {
        (self.seq_first..self.seq_first + self.seq_pages)
            .chain(page_sequence(
                SNAP_SEED,
                self.rnd_touches,
                self.rnd_first,
                self.rnd_pages,
            ))
            .map(u64::from)
            .collect()
    }
}

/// Runs the working set's workloads on `vm`; panics if the guest read a wrong byte.
fn touch_working_set(vm: &mut Vm, ws: &WorkingSet, who: &str) {
    for w in ws.workloads() {
        let r = vm.run(vec![w], &|_, _| {}).expect("guest run");
        assert_eq!(
            r[0].mismatches, 0,
            "{who}: the guest read a wrong dword at {:?}",
            r[0].first_mismatch_gpa
        );
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handler {
    Rec,
    Demand,
    Spin0,
    Minimal,
    Wrong,
}

const HANDLERS: [Handler; 5] = [
    Handler::Rec,
    Handler::Demand,
    Handler::Spin0,
    Handler::Minimal,
    Handler::Wrong,
];

impl Handler {
    fn name(self) -> &'static str {
        match self {
            Handler::Rec => "faultd+rec",
            Handler::Demand => "faultd",
            Handler::Spin0 => "faultd-spin0",
            Handler::Minimal => "minimal",
            Handler::Wrong => "faultd+wrong",
        }
    }

    fn index(self) -> usize {
        HANDLERS.iter().position(|&h| h == self).unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Vmm,
    Firecracker,
}

/// The daemons of the run, started once: each measured session is a session of its own.
struct Daemons {
    /// Replaying a recording of the measured working set.
    rec: Faultd,
    /// Replaying a recording of another working set.
    wrong: Faultd,
    /// Default config: demand-only, fault-around off.
    demand: Faultd,
    /// `--spin-us 0`, demand-only.
    spin0: Faultd,
    /// `[around]` on.
    around: Faultd,
}

/// What every round shares.
struct Env {
    daemons: Daemons,
    dir: tempfile::TempDir,
    snapshot: PathBuf,
    ws: WorkingSet,
    ws_pages: BTreeSet<u64>,
    next: std::cell::Cell<u64>,
}

impl Env {
    /// A fresh name.
    fn name(&self, tag: &str) -> String {
        let n = self.next.get();
        self.next.set(n + 1);
        format!("{tag}-{n}")
    }

    fn faultd(&self, h: Handler) -> &Faultd {
        match h {
            Handler::Rec => &self.daemons.rec,
            Handler::Wrong => &self.daemons.wrong,
            Handler::Demand => &self.daemons.demand,
            Handler::Spin0 => &self.daemons.spin0,
            Handler::Minimal => unreachable!("the minimal handler is not a faultd"),
        }
    }
}

/// Registers `ram` with `faultd` as a VMM restoring `snapshot` (one region at GPA 0, file
/// offset 0).
fn register_snapshot(faultd: &Faultd, vm: &str, ram: &Ram, snapshot: &Path) -> Session {
    let file = std::fs::File::open(snapshot).expect("opening the snapshot");
    ram.serve_snapshot(faultd, vm, &file)
}

/// Makes `faultd` scan the snapshot (a session that touches nothing) and, with `record`,
/// record a restore whose guest touches `record`.
fn prepare(faultd: &Faultd, snapshot: &Path, record: Option<&WorkingSet>) {
    {
        let ram = Ram::new("scan", SNAPSHOT_BYTES);
        let _session = register_snapshot(faultd, "scan", &ram, snapshot);
        assert!(
            faultd.wait_for_log("snapshot file scanned", TIMEOUT),
            "faultd did not scan the snapshot:\n{}",
            faultd.log()
        );
    }
    if let Some(ws) = record {
        let ram = Ram::new("record", SNAPSHOT_BYTES);
        let session = register_snapshot(faultd, "record", &ram, snapshot);
        let mut vm = one_slot_vm(ram.ram.host_ptr(), SNAPSHOT_BYTES, TIMEOUT);
        touch_working_set(&mut vm, ws, "recording restore");
        drop(vm);
        drop(session);
        assert!(
            faultd.wait_for_log("working set recorded", TIMEOUT),
            "faultd recorded no working set:\n{}",
            faultd.log()
        );
    }
}

/// What one restore measured.
#[derive(Clone, Debug, Default)]
struct Sample {
    /// Resume -> working set touched.
    ns: u64,
    /// Faults the guest took (faultd: vCPU faults; minimal: pages it copied).
    faults: u64,
    /// Handler CPU.
    cpu_ns: u64,
    /// faultd: pages replay installed ahead.
    prefetched: u64,
    /// Resident pages outside the working set.
    wasted: u64,
    /// faultd: why replay stopped.
    stop: String,
    /// faultd: demand faults on recorded pages not installed yet.
    late: u64,
}

/// A restore's server: a faultd session (VMM), a faultd listener (Firecracker), or the
/// minimal handler of either kind.
enum Server<'a> {
    FaultdVmm(Session, &'a Faultd),
    FaultdFc(String, &'a Faultd),
    RawVmm(RawHandler),
    ExampleFc(ExampleProcess),
}

impl Server<'_> {
    fn cpu(&self) -> CpuSnap {
        match self {
            Server::FaultdVmm(_, f) | Server::FaultdFc(_, f) => {
                CpuSnap::Process(process_cpu_ns(f.pid()).expect("faultd schedstat"))
            }
            Server::RawVmm(r) => CpuSnap::Thread(r.cpu_ns().expect("handler schedstat")),
            Server::ExampleFc(p) => {
                CpuSnap::Process(process_cpu_ns(p.pid()).expect("handler schedstat"))
            }
        }
    }
}

/// faultd's counters once settled: demand-only until the faults counted reach `pages`
/// (every page of the working set faults once), replaying until replay has stopped.
fn settled(h: Handler, pages: u64, mut get: impl FnMut() -> SessionStats) -> SessionStats {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = get();
        let done = match h {
            Handler::Rec | Handler::Wrong => !s.working_set.replay_stop.is_empty(),
            _ => s.vcpu_faults >= pages,
        };
        if done || Instant::now() > deadline {
            // The last fault's count trails its wake-up by a moment.
            std::thread::sleep(Duration::from_millis(5));
            return get();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn from_stats(s: &SessionStats, sample: &mut Sample, h: Handler) {
    assert_eq!(s.errors, 0, "{}: errors", h.name());
    sample.faults = s.vcpu_faults;
    sample.prefetched = s.working_set.prefetched;
    sample.stop = s.working_set.replay_stop.clone();
    sample.late = s.working_set.late;
}

/// Checks whole pages of the working set (every 61st) against the snapshot, outside the
/// clock (the guest checks 64 dwords of each page it verifies).
fn check_pages(env: &Env, base: u64, who: &str) {
    use std::os::unix::fs::FileExt;
    let sample: Vec<u64> = env.ws_pages.iter().step_by(61).copied().collect();
    let got = copy_with_timeout(
        sample.iter().map(|p| base + p * PAGE).collect(),
        PAGE as usize,
        TIMEOUT,
    );
    let file = std::fs::File::open(&env.snapshot).unwrap();
    let mut want = vec![0u8; PAGE as usize];
    for (p, page) in sample.iter().zip(&got) {
        file.read_exact_at(&mut want, p * PAGE).unwrap();
        assert!(*page == want, "{who}: page {p} differs from the snapshot");
    }
}

/// Resident pages of the RAM at `base` outside the working set.
fn wasted(env: &Env, base: u64) -> u64 {
    resident_pages(base, SNAPSHOT_BYTES)
        .iter()
        .enumerate()
        .filter(|&(p, &r)| r && !env.ws_pages.contains(&(p as u64)))
        .count() as u64
}

/// One restore of `kind` through `h`.
fn restore_round(env: &Env, kind: Kind, h: Handler) -> Sample {
    let pages = env.ws_pages.len() as u64;
    let mut sample = Sample::default();
    match kind {
        Kind::Vmm => {
            let ram = Ram::new(&env.name("vmm"), SNAPSHOT_BYTES);
            let base = ram.ram.host_addr();
            let mut vm = one_slot_vm(ram.ram.host_ptr(), SNAPSHOT_BYTES, TIMEOUT);
            let file = std::fs::File::open(&env.snapshot).expect("snapshot");
            let before = match h {
                Handler::Minimal => CpuSnap::Thread(0),
                _ => CpuSnap::Process(process_cpu_ns(env.faultd(h).pid()).expect("schedstat")),
            };
            let t0 = Instant::now();
            let server = match h {
                Handler::Minimal => {
                    let src = Source::File(FileSource::map(&file, base).expect("map snapshot"));
                    Server::RawVmm(
                        RawHandler::spawn_from(RawKind::Blocking, &ram.uffd, src)
                            .expect("minimal handler"),
                    )
                }
                _ => {
                    let f = env.faultd(h);
                    Server::FaultdVmm(
                        register_snapshot(f, &env.name("vmm"), &ram, &env.snapshot),
                        f,
                    )
                }
            };
            touch_working_set(&mut vm, &env.ws, h.name());
            sample.ns = t0.elapsed().as_nanos() as u64;
            // Before the counters are polled (that is not the restore's work).
            let after = server.cpu();
            match server {
                Server::FaultdVmm(mut session, _) => {
                    sample.cpu_ns = after.since(&before);
                    let s = settled(h, pages, || session.stats().expect("stats"));
                    from_stats(&s, &mut sample, h);
                    check_pages(env, base, h.name());
                    sample.wasted = wasted(env, base);
                    drop(session);
                }
                Server::RawVmm(r) => {
                    sample.cpu_ns = after.since(&before);
                    check_pages(env, base, h.name());
                    sample.wasted = wasted(env, base);
                    sample.faults = r.stop().expect("minimal handler failed").served;
                }
                _ => unreachable!(),
            }
            drop(vm);
        }
        Kind::Firecracker => {
            let mut restore = FcRestore::new(&[(SNAPSHOT_BYTES, 0)], RamPageSize::Size4K)
                .expect("guest RAM and uffd");
            let base = restore.regions[0].ram.host_addr();
            let mut vm = one_slot_vm(restore.regions[0].ram.host_ptr(), SNAPSHOT_BYTES, TIMEOUT);
            let name = env.name("fc");
            let socket = env.dir.path().join(format!("{name}.sock"));
            let server = match h {
                Handler::Minimal => Server::ExampleFc(
                    ExampleProcess::spawn(&socket, &env.snapshot, 0).expect("example handler"),
                ),
                _ => {
                    let f = env.faultd(h);
                    f.listen_firecracker(&name, &socket, &env.snapshot, None, None)
                        .expect("firecracker_listen");
                    Server::FaultdFc(name.clone(), f)
                }
            };
            let before = server.cpu();
            let t0 = Instant::now();
            restore.send(&socket, WireForm::Current).expect("send");
            touch_working_set(&mut vm, &env.ws, h.name());
            sample.ns = t0.elapsed().as_nanos() as u64;
            sample.cpu_ns = server.cpu().since(&before);
            match server {
                Server::FaultdFc(name, f) => {
                    let vm_name = format!("{name}-1");
                    let s = settled(h, pages, || {
                        let mut v = f.vm_stats(&vm_name);
                        assert_eq!(v.len(), 1, "{}: one session", h.name());
                        v.pop().unwrap()
                    });
                    from_stats(&s, &mut sample, h);
                    check_pages(env, base, h.name());
                    sample.wasted = wasted(env, base);
                }
                Server::ExampleFc(p) => {
                    check_pages(env, base, h.name());
                    sample.wasted = wasted(env, base);
                    drop(vm);
                    drop(restore);
                    sample.faults = p.finish().expect("example handler failed").copied;
                    return sample;
                }
                _ => unreachable!(),
            }
            drop(vm);
            drop(restore);
        }
    }
    sample
}

/// Per-round ratios of `f` between two handlers' samples.
fn per_round(a: &[Sample], b: &[Sample], f: impl Fn(&Sample) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect()
}

/// `median <m>x (IQR <q1>..<q3>)`.
fn spread(v: &[f64]) -> String {
    let (q1, m, q3) = quartiles(v);
    format!(
        "median {}x (IQR {}..{})",
        ratio_text(m),
        ratio_text(q1),
        ratio_text(q3)
    )
}

fn spread_json(v: &[f64]) -> Value {
    let (q1, m, q3) = quartiles(v);
    json!({"median": m, "q1": q1, "q3": q3, "per_round": v})
}

fn med(v: impl Iterator<Item = f64>) -> f64 {
    faultd_tests::bench::median(&v.collect::<Vec<_>>())
}

/// The restore part of one kind: table, targets, reference ratios.
fn restore_part(env: &Env, kind: Kind, rounds: usize, out: &mut String) -> (Vec<Target>, Value) {
    let mut samples: [Vec<Sample>; HANDLERS.len()] = Default::default();
    interleaved(rounds, &HANDLERS, |h, _| {
        samples[h.index()].push(restore_round(env, kind, h));
    });
    let pages = env.ws_pages.len() as f64;
    let _ = writeln!(
        out,
        "  {:<13} {:>9} {:>8} {:>8} {:>12} {:>11} {:>10} {:>8} {:>6}  replay stop",
        "handler",
        "time ms",
        "faults",
        "CPU ms",
        "CPU/fault µs",
        "CPU/page µs",
        "prefetched",
        "wasted",
        "late",
    );
    let mut handlers = serde_json::Map::new();
    for h in HANDLERS {
        let s = &samples[h.index()];
        let m = |f: fn(&Sample) -> f64| med(s.iter().map(f));
        let time_ms = m(|x| x.ns as f64 / 1e6);
        let faults = m(|x| x.faults as f64);
        let cpu_ms = m(|x| x.cpu_ns as f64 / 1e6);
        // Rounds without a fault have no CPU per fault (NaN: "-").
        let cpu_fault = med(s
            .iter()
            .filter(|x| x.faults > 0)
            .map(|x| x.cpu_ns as f64 / 1e3 / x.faults as f64));
        let cpu_page = cpu_ms * 1e3 / pages;
        let stops: BTreeSet<&str> = s.iter().map(|x| x.stop.as_str()).collect();
        let stops = stops.into_iter().collect::<Vec<_>>().join(",");
        let _ = writeln!(
            out,
            "  {:<13} {:>9.1} {:>8.0} {:>8.1} {:>12} {:>11.2} {:>10.0} {:>8.0} {:>6.0}  {}",
            h.name(),
            time_ms,
            faults,
            cpu_ms,
            if cpu_fault.is_nan() {
                "-".into()
            } else {
                format!("{cpu_fault:.2}")
            },
            cpu_page,
            m(|x| x.prefetched as f64),
            m(|x| x.wasted as f64),
            m(|x| x.late as f64),
            if stops.is_empty() { "-" } else { &stops }
        );
        handlers.insert(
            h.name().into(),
            json!({
                "time_ms_median": time_ms,
                "time_ms_per_round": s.iter().map(|x| x.ns as f64 / 1e6).collect::<Vec<_>>(),
                "faults_per_round": s.iter().map(|x| x.faults).collect::<Vec<_>>(),
                "cpu_ms_per_round": s.iter().map(|x| x.cpu_ns as f64 / 1e6).collect::<Vec<_>>(),
                "cpu_per_fault_us_median": cpu_fault,
                "cpu_per_working_set_page_us_median": cpu_page,
                "prefetched_per_round": s.iter().map(|x| x.prefetched).collect::<Vec<_>>(),
                "wasted_per_round": s.iter().map(|x| x.wasted).collect::<Vec<_>>(),
                "late_per_round": s.iter().map(|x| x.late).collect::<Vec<_>>(),
                "replay_stop": stops,
            }),
        );
    }
    let of = |h: Handler| &samples[h.index()][..];
    let time = |x: &Sample| x.ns as f64;
    let faults = |x: &Sample| x.faults as f64;
    let k = match kind {
        Kind::Vmm => "VMM",
        Kind::Firecracker => "FC",
    };
    let targets = vec![
        Target::rounds(
            &format!("{k} faultd+rec time to working set"),
            0.3,
            "faultd demand-only",
            per_round(of(Handler::Rec), of(Handler::Demand), time),
        ),
        Target::rounds(
            &format!("{k} faultd+rec faults"),
            0.05,
            "faultd demand-only",
            per_round(of(Handler::Rec), of(Handler::Demand), faults),
        ),
        Target::rounds(
            &format!("{k} faultd+wrong time to working set"),
            1.1,
            "faultd demand-only",
            per_round(of(Handler::Wrong), of(Handler::Demand), time),
        ),
    ];
    for t in &targets {
        let _ = writeln!(out, "{}", t.line());
    }
    let cpu = |x: &Sample| x.cpu_ns as f64;
    let refs = [
        (
            "time faultd-spin0/minimal (like for like: demand-only, no spinning)",
            per_round(of(Handler::Spin0), of(Handler::Minimal), time),
        ),
        (
            "time faultd/minimal (demand-only)",
            per_round(of(Handler::Demand), of(Handler::Minimal), time),
        ),
        (
            "time faultd+rec/minimal",
            per_round(of(Handler::Rec), of(Handler::Minimal), time),
        ),
        (
            "CPU faultd+rec/faultd (whole restore)",
            per_round(of(Handler::Rec), of(Handler::Demand), cpu),
        ),
        (
            "CPU faultd-spin0/minimal (whole restore)",
            per_round(of(Handler::Spin0), of(Handler::Minimal), cpu),
        ),
    ];
    let mut refs_json = serde_json::Map::new();
    for (what, v) in refs {
        let _ = writeln!(out, "  reference, no target: {what}: {}", spread(&v));
        refs_json.insert(what.into(), spread_json(&v));
    }
    let j = json!({"handlers": handlers, "targets": targets.iter().map(Target::json).collect::<Vec<_>>(),
                   "reference": refs_json});
    (targets, j)
}

// ---- Fault-around --------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Around {
    Off,
    On,
}

const AROUND: [Around; 2] = [Around::Off, Around::On];

impl Around {
    fn name(self) -> &'static str {
        match self {
            Around::Off => "around off",
            Around::On => "around on",
        }
    }

    fn faultd(self, d: &Daemons) -> &Faultd {
        match self {
            Around::Off => &d.demand,
            Around::On => &d.around,
        }
    }
}

/// What one fault-around round measured.
#[derive(Clone, Debug, Default)]
struct AroundSample {
    ns: u64,
    /// vCPU faults, or device page-request groups.
    faults: u64,
    cpu_ns: u64,
    /// Pages (vCPU) or granules (device) served ahead.
    ahead: u64,
    /// Per-touch times, ns (random scenarios).
    touches: Vec<u64>,
    /// faultd's own service time (event read to answered), p99 and largest, µs: a slow
    /// touch with a fast service waited outside faultd's work (wake-up, run queue).
    svc_p99_us: f64,
    svc_max_us: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AroundScenario {
    VcpuStream,
    VcpuRandom,
    DmaStream,
    DmaRandom,
}

/// The streams' length: [`STREAM_BYTES`], divided in a quick run (whole MiB).
fn stream_bytes(div: u64) -> u64 {
    STREAM_BYTES / div / MIB * MIB
}

fn around_round(env: &Env, sc: AroundScenario, a: Around, div: u64, data: &[u8]) -> AroundSample {
    let faultd = a.faultd(&env.daemons);
    let bytes = stream_bytes(div);
    let pages = (bytes / PAGE) as u32;
    let touches = RANDOM_TOUCHES / div as u32;
    // A window of look-ahead past the stream's end stays inside the RAM.
    let ram = Ram::new(&env.name("around"), bytes + 2 * MIB);
    let mut session = ram.serve(faultd, &env.name("around"));
    let cpu = || CpuSnap::Process(process_cpu_ns(faultd.pid()).expect("faultd schedstat"));
    let mut s = AroundSample::default();
    let seed = 0xA20D;
    match sc {
        AroundScenario::VcpuStream | AroundScenario::VcpuRandom => {
            let mut vm = one_slot_vm(ram.ram.host_ptr(), ram.ram.size(), TIMEOUT);
            let times = Mutex::new(Vec::with_capacity(2 * touches as usize + 2));
            let w = if sc == AroundScenario::VcpuStream {
                Workload::WriteVerifySequential {
                    seed,
                    first_page: 0,
                    page_count: pages,
                }
            } else {
                // Every page visit exits to report: its time is the gap since the last.
                vm.set_progress_interval(1);
                Workload::WriteVerify {
                    seed,
                    touches,
                    first_page: 0,
                    page_count: pages,
                }
            };
            let record = |_: usize, _: u32| times.lock().unwrap().push(Instant::now());
            let before = cpu();
            let t0 = Instant::now();
            let r = vm.run(vec![w], &record).expect("guest run");
            s.ns = t0.elapsed().as_nanos() as u64;
            assert_eq!(r[0].mismatches, 0, "{}: guest saw wrong bytes", a.name());
            let distinct = match sc {
                AroundScenario::VcpuStream => u64::from(pages),
                _ => page_sequence(seed, touches, 0, pages)
                    .into_iter()
                    .collect::<BTreeSet<_>>()
                    .len() as u64,
            };
            s.cpu_ns = cpu().since(&before);
            let st = settled_stats(&mut session, |st| {
                st.vcpu_faults + st.around.vcpu_pages >= distinct
            });
            assert_eq!(st.errors, 0, "{}", a.name());
            s.faults = st.vcpu_faults;
            s.ahead = st.around.vcpu_pages;
            (s.svc_p99_us, s.svc_max_us) = (st.latency_us.p99, st.latency_us.max);
            if sc == AroundScenario::VcpuRandom {
                let t = times.into_inner().unwrap();
                // The write pass: visits 1..=touches (the first's gap includes the start).
                s.touches = t
                    .windows(2)
                    .take(touches as usize - 1)
                    .map(|w| (w[1] - w[0]).as_nanos() as u64)
                    .collect();
            }
        }
        AroundScenario::DmaStream | AroundScenario::DmaRandom => {
            // SAFETY: the RAM is declared before the device and outlives it; nothing holds a
            // Rust reference into guest RAM.
            let dev = unsafe {
                PriDevice::new(
                    ram.ram.host_ptr(),
                    0,
                    ram.ram.size(),
                    DeviceConfig::default(),
                )
            }
            .expect("device");
            dev.attach(&mut session).expect("add_device");
            let before = cpu();
            if sc == AroundScenario::DmaStream {
                let chunk = 256 * 1024;
                let t0 = Instant::now();
                for (i, c) in data[..bytes as usize].chunks(chunk).enumerate() {
                    dev.dma_write(0, (i * chunk) as u64, c).expect("DMA write");
                }
                s.ns = t0.elapsed().as_nanos() as u64;
                // Outside the clock: every 16th chunk reads back what was written.
                let mut back = vec![0u8; chunk];
                for i in (0..bytes as usize / chunk).step_by(16) {
                    dev.dma_read(0, (i * chunk) as u64, &mut back)
                        .expect("DMA read");
                    assert!(back == data[i * chunk..(i + 1) * chunk], "{}", a.name());
                }
            } else {
                let seq = page_sequence(seed, touches, 0, pages);
                let t0 = Instant::now();
                for &p in &seq {
                    let gpa = u64::from(p) * PAGE;
                    let page = &data[gpa as usize..(gpa + PAGE) as usize];
                    let t = Instant::now();
                    dev.dma_write(0, gpa, page).expect("DMA write");
                    s.touches.push(t.elapsed().as_nanos() as u64);
                }
                s.ns = t0.elapsed().as_nanos() as u64;
            }
            s.cpu_ns = cpu().since(&before);
            let ds = dev.stats();
            let st = settled_stats(&mut session, |st| st.device.success == ds.success);
            assert_eq!(st.errors, 0, "{}", a.name());
            assert_eq!(ds.invalid, 0, "{}", a.name());
            s.faults = ds.groups;
            s.ahead = st.around.device_granules;
            (s.svc_p99_us, s.svc_max_us) = (st.device_latency_us.p99, st.device_latency_us.max);
        }
    }
    s
}

fn around_part(
    env: &Env,
    rounds: usize,
    div: u64,
    out: &mut String,
) -> (Vec<Target>, Vec<(&'static str, Value)>) {
    let bytes = stream_bytes(div);
    let data: Vec<u8> = (0..bytes / PAGE)
        .flat_map(|p| pattern_page(p * PAGE, 0xD3A))
        .collect();
    let mut targets = Vec::new();
    let mut report = Vec::new();
    let touches = RANDOM_TOUCHES / div as u32;
    let scenarios = [
        (
            AroundScenario::VcpuStream,
            "A1_vcpu_stream",
            format!(
                "A1. a vCPU writes then verifies {} MiB of fresh memory in ascending order",
                bytes / MIB
            ),
            "faults",
        ),
        (
            AroundScenario::VcpuRandom,
            "A2_vcpu_random",
            format!(
                "A2. a vCPU writes then verifies {touches} random pages of {} MiB, each visit \
                 timed through an I/O exit",
                bytes / MIB
            ),
            "faults",
        ),
        (
            AroundScenario::DmaStream,
            "A3_dma_stream",
            format!(
                "A3. the PRI device DMA-writes {} MiB in 256 KiB transfers in ascending order",
                bytes / MIB
            ),
            "groups",
        ),
        (
            AroundScenario::DmaRandom,
            "A4_dma_random",
            format!(
                "A4. the PRI device DMA-writes {touches} random 4 KiB pages of {} MiB, each timed",
                bytes / MIB
            ),
            "groups",
        ),
    ];
    for (sc, key, title, unit) in scenarios {
        let mut samples: [Vec<AroundSample>; 2] = Default::default();
        interleaved(rounds, &AROUND, |a, _| {
            samples[a as usize].push(around_round(env, sc, a, div, &data));
        });
        let _ = writeln!(out, "\n{title} ({rounds} rounds)");
        eprintln!("done: {title}");
        let random = matches!(sc, AroundScenario::VcpuRandom | AroundScenario::DmaRandom);
        let _ = writeln!(
            out,
            "  {:<11} {:>9} {:>8} {:>9} {:>9} {:>8} {:>11} {:>13} {:>20}",
            "faultd",
            "time ms",
            unit,
            "p50 µs",
            "p99 µs",
            "CPU ms",
            "CPU/fault µs",
            "ahead",
            "svc p99/max µs"
        );
        let mut handlers = serde_json::Map::new();
        for a in AROUND {
            let s = &samples[a as usize];
            let m = |f: &dyn Fn(&AroundSample) -> f64| med(s.iter().map(f));
            let all: Vec<u64> = s.iter().flat_map(|x| x.touches.iter().copied()).collect();
            let (p50, p99) = if random {
                (pct(&all, 0.5), pct(&all, 0.99))
            } else {
                (f64::NAN, f64::NAN)
            };
            let cpu_fault = m(&|x| x.cpu_ns as f64 / 1e3 / x.faults.max(1) as f64);
            let _ = writeln!(
                out,
                "  {:<11} {:>9.1} {:>8.0} {:>9} {:>9} {:>8.1} {:>11.2} {:>13.0} {:>20}",
                a.name(),
                m(&|x| x.ns as f64 / 1e6),
                m(&|x| x.faults as f64),
                if random {
                    format!("{p50:.1}")
                } else {
                    "-".into()
                },
                if random {
                    format!("{p99:.1}")
                } else {
                    "-".into()
                },
                m(&|x| x.cpu_ns as f64 / 1e6),
                cpu_fault,
                m(&|x| x.ahead as f64),
                format!("{:.0} / {:.0}", m(&|x| x.svc_p99_us), m(&|x| x.svc_max_us)),
            );
            handlers.insert(
                a.name().into(),
                json!({
                    "time_ms_per_round": s.iter().map(|x| x.ns as f64 / 1e6).collect::<Vec<_>>(),
                    "faults_or_groups_per_round": s.iter().map(|x| x.faults).collect::<Vec<_>>(),
                    "cpu_ms_per_round": s.iter().map(|x| x.cpu_ns as f64 / 1e6).collect::<Vec<_>>(),
                    "cpu_per_fault_us_median": cpu_fault,
                    "ahead_per_round": s.iter().map(|x| x.ahead).collect::<Vec<_>>(),
                    "faultd_service_p99_us_per_round": s.iter().map(|x| x.svc_p99_us).collect::<Vec<_>>(),
                    "faultd_service_max_us_per_round": s.iter().map(|x| x.svc_max_us).collect::<Vec<_>>(),
                    "pooled_p50_us": if random { Some(p50) } else { None },
                    "pooled_p99_us": if random { Some(p99) } else { None },
                }),
            );
        }
        let (off, on) = (&samples[0], &samples[1]);
        let ratio = |f: &dyn Fn(&AroundSample) -> f64| -> Vec<f64> {
            on.iter().zip(off).map(|(x, y)| f(x) / f(y)).collect()
        };
        let t = if random {
            Target::rounds(
                &format!("{key} p99 with fault-around"),
                1.1,
                "without",
                ratio(&|x| pct(&x.touches, 0.99)),
            )
        } else {
            Target::rounds(
                &format!("{key} {unit} with fault-around"),
                0.125,
                "without",
                ratio(&|x| x.faults as f64),
            )
        };
        let _ = writeln!(out, "{}", t.line());
        let time = ratio(&|x| x.ns as f64);
        let cpu = ratio(&|x| x.cpu_ns as f64);
        let _ = writeln!(
            out,
            "  reference, no target: time on/off {}; faultd CPU on/off {}",
            spread(&time),
            spread(&cpu)
        );
        report.push((
            key,
            json!({"title": title, "handlers": handlers, "target": t.json(),
                   "time_on_over_off": spread_json(&time), "cpu_on_over_off": spread_json(&cpu)}),
        ));
        targets.push(t);
    }
    (targets, report)
}

fn main() {
    let quick = std::env::var_os("FAULT_RT_QUICK").is_some_and(|v| v != "0");
    let rounds = if quick { 2 } else { ROUNDS };
    let run = Run::start(&Bench {
        json: "prefetch.json",
        title: "prefetch: working-set replay and fault-around, each against faultd without it \
                and a minimal handler; real KVM guests (testvmm), 4 KiB pages",
        rounds,
        fresh: "guest RAM, uffd and session",
        columns: "columns: time = median over rounds (restore: resume -> working set touched); \
                  faults = the guest's demand faults (device: page-request groups); CPU = \
                  handler CPU per round (faultd: whole process; minimal: its thread or \
                  process), per fault and per working-set page; prefetched / late / replay \
                  stop = faultd's working-set counters; wasted = resident pages outside the \
                  working set (mincore); ahead = pages (vCPU) or granules (device) served \
                  ahead; svc = faultd's own service time (event read to answered), median over \
                  rounds of each round's p99 and largest; every ratio is taken per round, then its median and interquartile \
                  range over the rounds",
        kvm: true,
    });
    let div = run.div() as u64;
    let parts = std::env::var("PREFETCH_PARTS").unwrap_or_else(|_| "RA".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let snapshot = dir.path().join("mem");
    let t = Instant::now();
    let file = pattern_snapshot(&snapshot, &[(0, DATA_BYTES, 0)], SNAP_SEED);
    file.set_len(SNAPSHOT_BYTES).expect("sizing the snapshot");
    drop(file);
    warm_page_cache(&snapshot);
    let ws = WorkingSet::measured(div as u32);
    let other = WorkingSet::other(div as u32);
    let ws_pages = ws.pages();
    let daemons = Daemons {
        rec: Faultd::start_with_config(REC_CONFIG),
        wrong: Faultd::start_with_config(REC_CONFIG),
        demand: Faultd::start(&[]),
        spin0: Faultd::start(&["--spin-us", "0"]),
        around: Faultd::start_with_config("[around]\nenabled = true\n"),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nsnapshot: {} MiB, data in the first {} MiB, the rest a hole; working set {} pages \
         ({} MiB: {} in order, {} random touches over {} MiB); the wrong recording {} pages, \
         none in common",
        SNAPSHOT_BYTES / MIB,
        DATA_BYTES / MIB,
        ws_pages.len(),
        ws_pages.len() as u64 * PAGE / MIB,
        ws.seq_pages,
        ws.rnd_touches,
        u64::from(ws.rnd_pages) * PAGE / MIB,
        other.pages().len(),
    );
    let env = Env {
        daemons,
        snapshot,
        ws,
        ws_pages,
        next: std::cell::Cell::new(0),
        dir,
    };
    let mut targets = Vec::new();
    let mut report = Vec::new();
    if parts.contains('R') {
        let d = &env.daemons;
        prepare(&d.rec, &env.snapshot, Some(&env.ws));
        prepare(&d.wrong, &env.snapshot, Some(&other));
        prepare(&d.demand, &env.snapshot, None);
        prepare(&d.spin0, &env.snapshot, None);
        let _ = writeln!(
            out,
            "snapshot written, scanned by each faultd and both recordings made in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // Warm-up, not recorded: one restore of each handler and kind.
        for kind in [Kind::Vmm, Kind::Firecracker] {
            for h in HANDLERS {
                restore_round(&env, kind, h);
            }
        }
        for (kind, key, title) in [
            (
                Kind::Vmm,
                "R1_vmm",
                "R1. VMM session (memfd RAM, snapshot file registered)",
            ),
            (
                Kind::Firecracker,
                "R2_firecracker",
                "R2. Firecracker stand-in (anonymous RAM, uffd sent on a socket)",
            ),
        ] {
            let _ = writeln!(out, "\n{title} ({rounds} rounds)");
            let (t, j) = restore_part(&env, kind, rounds, &mut out);
            eprintln!("done: {title}");
            report.push((key, j));
            targets.extend(t);
        }
    }
    if parts.contains('A') {
        let (t, r) = around_part(&env, rounds, div, &mut out);
        targets.extend(t);
        report.extend(r);
    }
    let _ = writeln!(out, "\nload average before the summary: {}", load_average());
    run.finish(out, &targets, report);
}

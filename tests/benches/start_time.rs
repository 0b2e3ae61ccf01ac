//! Start time: how long from handing guest RAM over to the guest running, for a real KVM guest
//! whose RAM faultd serves on demand, against the same guest on RAM populated and pinned up
//! front (`mlock` of the memfd mapping), in the same run.
//!
//! `cargo bench -p faultd-tests --bench start_time` (needs root, /dev/userfaultfd, /dev/kvm).
//! Prints a table per guest size and writes the figures to `target/start_time.json`.
//!
//! Both modes start from the same point: a fresh 4 KiB-page memfd of the guest's size, mapped
//! shared, nothing in it. The clock starts there.
//! - `demand`: register the mapping with a userfaultfd, register it with faultd (connect and
//!   `register`; one faultd for the whole run, a session per round), create the KVM VM with the
//!   RAM as one memory slot, run one vCPU.
//! - `pin-all`: `mlock` the whole mapping (which populates every page and pins it), create the
//!   VM, run one vCPU.
//!
//! The guest's first instruction is an `out` (testvmm's start port), before any RAM access:
//! "start" is the clock to that exit. Its next instruction reads the last page of RAM (the top
//! of the identity map), then `out`s again: "1st fault" is the clock to that exit, which for
//! `demand` includes faultd serving the fault (and for `pin-all` only KVM's own mapping of an
//! already resident page). Both include one I/O exit round trip (~30 µs under PVM).
//!
//! Rounds interleave every (size, mode) measured, order rotated each round; the table shows
//! the median and the spread (min..max) over rounds. The target: at 16 GiB, the median start of
//! `demand` over `pin-all`'s, <= 1/1000.
//!
//! Pinning is capped: this machine has 24 GiB and is shared, so `pin-all` runs only for sizes up
//! to [`PIN_MAX`] and only while `MemAvailable` exceeds the size by [`PIN_HEADROOM`] (a round
//! without that headroom is skipped and counted). Sizes above are extrapolated from the largest
//! measured size's per-GiB time, which the output marks as such.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use faultd_client::{create_uffd, Client, GuestRam, RamPageSize, RegionSpec};
use faultd_tests::bench::{interleaved, median, Bench, Pooled, Run, Target};
use faultd_tests::Faultd;
use serde_json::{json, Value};
use testvmm::{RamSlot, Vm, Workload};

const GIB: u64 = 1 << 30;
const PAGE: u64 = 4096;
/// Guest sizes, GiB.
const SIZES: [u64; 3] = [1, 16, 64];
/// Rounds: each runs every (size, mode) once.
const ROUNDS: usize = 7;
/// Largest RAM this benchmark pins (the brief of this machine: at most 16 GiB, and only here).
const PIN_MAX: u64 = 16 * GIB;
/// `MemAvailable` must exceed the pinned size by this much, for the other work on the machine.
const PIN_HEADROOM: u64 = 3 * GIB;
/// The size the target is held at.
const TARGET_SIZE: u64 = 16 * GIB;
/// demand / pin-all start time at TARGET_SIZE must be at most this.
const TARGET: f64 = 1e-3;
const TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Demand,
    PinAll,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Demand => "demand",
            Mode::PinAll => "pin-all",
        }
    }
}

/// One round's times, from the clock's start.
#[derive(Debug, Clone, Copy)]
struct Times {
    /// RAM handed over: faultd registered (demand) or every page populated and pinned.
    ready: Duration,
    /// The KVM VM created with its memory slots.
    vm: Duration,
    /// The guest's first instruction exited.
    start: Duration,
    /// The guest's first RAM access was served and its next instruction exited.
    first_fault: Duration,
}

/// The `MemAvailable` line of /proc/meminfo, bytes.
fn mem_available() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("MemAvailable in /proc/meminfo")
        * 1024
}

/// Runs one guest of `size` bytes in `mode` from a fresh memfd; None when `pin-all` lacks the
/// memory headroom.
fn one(faultd: &Faultd, mode: Mode, size: u64, round: usize) -> Option<Times> {
    if mode == Mode::PinAll && mem_available() < size + PIN_HEADROOM {
        return None;
    }
    let name = format!("start-{}g-{round}", size / GIB);
    let ram = GuestRam::new(&name, size, RamPageSize::Size4K).expect("guest RAM memfd");
    let top_page = u32::try_from(size / PAGE - 1).expect("pages fit u32");

    let t0 = Instant::now();
    // Held until the guest has run: the session (and its uffd) must outlive the VM's use of RAM.
    let served = match mode {
        Mode::Demand => {
            let uffd = create_uffd().expect("uffd");
            ram.register(&uffd).expect("uffd register");
            let session = Client::connect(faultd.socket())
                .expect("connect")
                .register(&name, &uffd, &[RegionSpec::zero(0, &ram)], None)
                .expect("register with faultd");
            Some((uffd, session))
        }
        Mode::PinAll => {
            // SAFETY: the range is exactly the live mapping of `ram`; mlock only populates and
            // pins it.
            unsafe { nix::sys::mman::mlock(ram.host_ptr().cast(), size as usize) }
                .expect("mlock of the guest RAM mapping");
            None
        }
    };
    let ready = t0.elapsed();
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.host_ptr(),
        size,
    }])
    .expect("creating the KVM VM");
    let vm_done = t0.elapsed();
    vm.set_timeout(Some(TIMEOUT));
    let report = vm
        .run(
            vec![Workload::TouchSequential {
                first_page: top_page,
                count: 1,
            }],
            &|_, _| {},
        )
        .expect("guest run")
        .remove(0);
    let started = report.started_at.expect("the guest's start exit");
    let times = Times {
        ready,
        vm: vm_done,
        start: started - t0,
        first_fault: started - t0 + report.touch_times[0],
    };
    if let Some((_uffd, mut session)) = served {
        let stats = session.stats().expect("session stats");
        assert_eq!(stats.errors, 0);
        assert!(stats.vcpu_faults >= 1, "faultd served no fault: {stats:?}");
    }
    drop(vm);
    // Dropping `ram` unmaps (and unlocks) the memfd and frees it, outside the clock.
    drop(ram);
    Some(times)
}

/// Samples of one (size, mode): each field pooled (ns), one sample per round.
#[derive(Debug, Default)]
struct Samples {
    ready: Pooled,
    vm: Pooled,
    start: Pooled,
    first_fault: Pooled,
    skipped: usize,
}

impl Samples {
    fn add(&mut self, t: Times) {
        let ns = |d: Duration| vec![d.as_nanos() as u64];
        self.ready.add_round(ns(t.ready));
        self.vm.add_round(ns(t.vm));
        self.start.add_round(ns(t.start));
        self.first_fault.add_round(ns(t.first_fault));
    }
}

/// `median ms (min..max)` of one sample per round.
fn spread_ms(p: &Pooled) -> String {
    if p.samples.is_empty() {
        return "-".into();
    }
    let ms = |ns: u64| ns as f64 / 1e6;
    let min = p.samples.iter().copied().min().unwrap_or(0);
    let max = p.samples.iter().copied().max().unwrap_or(0);
    format!("{:.3} ({:.3}..{:.3})", p.p(0.5) / 1e3, ms(min), ms(max))
}

fn stats_json(p: &Pooled) -> Value {
    let ms: Vec<f64> = p.samples.iter().map(|&ns| ns as f64 / 1e6).collect();
    json!({
        "median_ms": median(&ms),
        "min_ms": ms.iter().copied().fold(f64::INFINITY, f64::min),
        "max_ms": ms.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        "per_round_ms": ms,
    })
}

fn main() {
    let run = Run::start(&Bench {
        json: "start_time.json",
        title: "Start time: a real KVM guest on RAM faultd serves on demand vs the same RAM \
                populated and pinned up front (mlock of the memfd mapping), 4 KiB pages",
        rounds: ROUNDS,
        fresh: "memfd guest RAM, KVM VM (and faultd session)",
        columns:
            "columns, ms from the clock's start (a fresh memfd, mapped, nothing in it), median \
                  over rounds (min..max): ready = RAM handed over (demand: uffd + faultd \
                  register; pin-all: mlock populates and pins every page); vm = KVM VM created; \
                  start = guest's first instruction exited; 1st fault = its first RAM access \
                  (the top page) served and the next exit",
        kvm: true,
    });
    let faultd = Faultd::start(&[]);
    let available = mem_available();
    let mut cases: Vec<(u64, Mode)> = Vec::new();
    for gib in SIZES {
        let size = gib * GIB;
        cases.push((size, Mode::Demand));
        if size <= PIN_MAX && size + PIN_HEADROOM <= available {
            cases.push((size, Mode::PinAll));
        }
    }
    let mut samples: Vec<Samples> = cases.iter().map(|_| Samples::default()).collect();
    let index: Vec<usize> = (0..cases.len()).collect();
    interleaved(ROUNDS, &index, |i, round| {
        let (size, mode) = cases[i];
        match one(&faultd, mode, size, round) {
            Some(t) => samples[i].add(t),
            None => samples[i].skipped += 1,
        }
    });

    let mut out = String::new();
    let mut report_sizes = Vec::new();
    // The largest pinned size's per-GiB start time, for the sizes that were not pinned.
    let pin_rate = cases
        .iter()
        .zip(&samples)
        .filter(|((_, m), s)| *m == Mode::PinAll && !s.start.samples.is_empty())
        // Pooled::p is in µs.
        .map(|((size, _), s)| (*size, s.start.p(0.5) / (*size / GIB) as f64))
        .next_back();
    let mut target = None;
    for gib in SIZES {
        let size = gib * GIB;
        let _ = writeln!(out, "\n{gib} GiB guest ({} pages of 4 KiB)", size / PAGE);
        let _ = writeln!(
            out,
            "  {:<8} {:>26} {:>26} {:>26} {:>26}",
            "mode", "ready ms", "vm ms", "start ms", "1st fault ms"
        );
        let mut by_mode = Vec::new();
        for mode in [Mode::Demand, Mode::PinAll] {
            let Some(i) = cases.iter().position(|&c| c == (size, mode)) else {
                continue;
            };
            let s = &samples[i];
            let skipped = if s.skipped > 0 {
                format!(
                    "   ({} rounds skipped: MemAvailable below size + headroom)",
                    s.skipped
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  {:<8} {:>26} {:>26} {:>26} {:>26}{skipped}",
                mode.name(),
                spread_ms(&s.ready),
                spread_ms(&s.vm),
                spread_ms(&s.start),
                spread_ms(&s.first_fault)
            );
            by_mode.push((
                mode.name(),
                json!({
                    "ready": stats_json(&s.ready),
                    "vm": stats_json(&s.vm),
                    "start": stats_json(&s.start),
                    "first_fault": stats_json(&s.first_fault),
                    "rounds": s.start.samples.len(),
                    "skipped_rounds": s.skipped,
                }),
            ));
        }
        let demand = &samples[cases
            .iter()
            .position(|&c| c == (size, Mode::Demand))
            .unwrap()];
        let pinned = cases
            .iter()
            .position(|&c| c == (size, Mode::PinAll))
            .map(|i| &samples[i])
            .filter(|s| !s.start.samples.is_empty());
        let ratio = |d: f64, p: f64| format!("1/{:.0} ({:.2e})", p / d, d / p);
        let mut entry = json!({"size_gib": gib, "modes": by_mode.into_iter().collect::<Value>()});
        match pinned {
            Some(p) => {
                let per_round: Vec<f64> = demand
                    .start
                    .samples
                    .iter()
                    .zip(&p.start.samples)
                    .map(|(&d, &p)| d as f64 / p as f64)
                    .collect();
                let _ = writeln!(
                    out,
                    "  demand / pin-all: start {}, 1st fault {}; per round (start): {}",
                    ratio(demand.start.p(0.5), p.start.p(0.5)),
                    ratio(demand.first_fault.p(0.5), p.first_fault.p(0.5)),
                    per_round
                        .iter()
                        .map(|r| format!("1/{:.0}", 1.0 / r))
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                entry["demand_over_pin_all"] = json!({
                    "start": demand.start.p(0.5) / p.start.p(0.5),
                    "first_fault": demand.first_fault.p(0.5) / p.first_fault.p(0.5),
                    "start_per_round": per_round,
                    "extrapolated": false,
                });
                if size == TARGET_SIZE {
                    target = Some(Target::ratio(
                        "demand start at 16 GiB",
                        TARGET,
                        "pin-all",
                        &demand.start,
                        &p.start,
                        0.5,
                    ));
                }
            }
            None => match pin_rate {
                Some((from, us_per_gib)) => {
                    let pin_us = us_per_gib * gib as f64;
                    let _ = writeln!(
                        out,
                        "  pin-all not run at {gib} GiB (pins are capped at {} GiB here); \
                         EXTRAPOLATED from {} GiB's {:.1} ms/GiB: pin-all start ~{:.0} ms, \
                         demand / pin-all start ~{}, 1st fault ~{}",
                        PIN_MAX / GIB,
                        from / GIB,
                        us_per_gib / 1e3,
                        pin_us / 1e3,
                        ratio(demand.start.p(0.5), pin_us),
                        ratio(demand.first_fault.p(0.5), pin_us)
                    );
                    entry["demand_over_pin_all"] = json!({
                        "start": demand.start.p(0.5) / pin_us,
                        "first_fault": demand.first_fault.p(0.5) / pin_us,
                        "extrapolated": true,
                        "extrapolated_from_gib": from / GIB,
                        "pin_all_ms_per_gib": us_per_gib / 1e3,
                    });
                }
                None => {
                    let _ = writeln!(out, "  pin-all not run at any size: no ratio");
                }
            },
        }
        report_sizes.push(entry);
    }
    let targets: Vec<Target> = target.into_iter().collect();
    let measured = !targets.is_empty();
    if targets.is_empty() {
        let _ = writeln!(
            out,
            "\nno target: pin-all did not run at 16 GiB (too little MemAvailable)"
        );
    }
    run.finish(
        out,
        &targets,
        vec![
            ("sizes", Value::from(report_sizes)),
            ("pin_max_gib", Value::from(PIN_MAX / GIB)),
            // Without it, `all_targets_met` holds vacuously.
            ("target_measured", Value::from(measured)),
            (
                "mem_available_at_start_gib",
                Value::from(available as f64 / GIB as f64),
            ),
        ],
    );
}

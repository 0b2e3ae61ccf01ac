//! Restores from an S3 object store (issue 17's benchmark): time to the working set, GETs and
//! bytes fetched, against a restore from a local snapshot file (demand only), in one run.
//!
//! `cargo bench -p faultd-tests --bench object_restore` (root, /dev/kvm, /dev/userfaultfd and
//! Ceph's radosgw, which the benchmark starts on 127.0.0.1 as the tests do). A snapshot of
//! `SIZE` bytes (1 GiB; every dword `testvmm::pattern(gpa, seed)`) is PUT to radosgw and
//! written to a local file (its page cache warmed). A KVM guest with two vCPUs verifies a
//! working set of `WS` bytes (64 MiB): each vCPU every page of a window of `WS / 2` bytes
//! (at 1/8 and at 5/8 of the snapshot, 2 MiB aligned) in a fixed pseudo-random order, so the
//! chunks it needs are exactly `WS / chunk size` and a chunk's pages are wanted at scattered
//! times. The clock runs from before the registration to the guest's last check.
//!
//! Handlers, each round in a rotated order, each on fresh guest RAM and a fresh faultd (so an
//! object restore starts with a cold chunk cache): `local` (the file, demand only), and for
//! chunks of 512 KiB and 2 MiB, `obj` (demand only) and `obj+rec` (the recording beside the
//! object, made once before the rounds by a recording restore, replayed as prefetch while the
//! guest runs). Each ratio is taken per round against `local` of that round and reported as
//! the median over rounds with its interquartile range. `FAULT_RT_QUICK=1`: 128 MiB, 8 MiB,
//! 2 rounds (a smoke run); `OBJ_BENCH_ROUNDS=N`: N rounds. Figures: docs/object-store.md.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use faultd_client::{Client, RegionSpec};
use faultd_tests::bench::{interleaved, load_average, quartiles, warm_page_cache};
use faultd_tests::rgw::{Rgw, ACCESS_KEY, BUCKET, REGION, SECRET_KEY};
use faultd_tests::{http_get, Faultd, Ram};
use testvmm::{page_sequence, pattern, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const SEED: u32 = 0x0B1E_C717;
const KEY: &str = "tenants/0/bench/mem";

#[derive(Clone, Copy, Debug)]
enum Handler {
    Local,
    Obj { chunk_kib: u64, rec: bool },
}

impl Handler {
    fn name(self) -> String {
        match self {
            Handler::Local => "local".into(),
            Handler::Obj { chunk_kib, rec } => {
                format!("obj{}/{chunk_kib}K", if rec { "+rec" } else { "" })
            }
        }
    }
}

fn config(rgw: &Rgw, chunk_kib: u64, record: bool, replay: bool) -> String {
    format!(
        "[object_store]\ncache_mib = 4096\nchunk_kib = {chunk_kib}\ndeadline_ms = 30000\n\n\
         [[object_store.stores]]\nname = \"rgw\"\nendpoint = \"{}\"\nregion = \"{REGION}\"\n\
         bucket = \"{BUCKET}\"\naccess_key = \"{ACCESS_KEY}\"\nsecret_key = \"{SECRET_KEY}\"\n\
         prefix = \"tenants/{{uid}}/\"\nwrite_recordings = {record}\n\n\
         [working_set]\nrecord = {record}\nreplay = {replay}\nrecord_ms = 600000\n\
         record_pages = 1048576\n",
        rgw.endpoint()
    )
}

fn metric(faultd: &Faultd, name: &str) -> u64 {
    let (_, body) = http_get(&faultd.metrics_addr(), "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap_or(0))
}

struct Sample {
    secs: f64,
    gets: u64,
    bytes: u64,
}

/// One restore: registers (file or object), runs the guest (a `Verify` of each window),
/// returns the time and the GETs.
fn restore(
    faultd: &Faultd,
    size: u64,
    windows: &[(u32, u32, u32)],
    file: Option<&std::fs::File>,
) -> Sample {
    let ram = Ram::new("bench", size);
    let t0 = Instant::now();
    let client = Client::connect(faultd.socket()).unwrap();
    let regions = [RegionSpec::snapshot(0, &ram.ram, 0)];
    let session = match file {
        Some(f) => client.register("bench", &ram.uffd, &regions, Some(f.as_fd())),
        None => client.register_object("bench", &ram.uffd, &regions, "rgw", KEY),
    }
    .unwrap();
    let mut vm = ram.vm(Duration::from_secs(600));
    let reports = vm
        .run(
            windows
                .iter()
                .map(|&(first_page, page_count, touches)| Workload::Verify {
                    seed: SEED,
                    touches,
                    first_page,
                    page_count,
                })
                .collect(),
            &|_, _| {},
        )
        .expect("guest run");
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        reports.iter().all(|r| r.mismatches == 0),
        "a page was wrong"
    );
    let sample = Sample {
        secs,
        gets: metric(faultd, "faultd_object_gets_total"),
        bytes: metric(faultd, "faultd_object_fetched_bytes_total"),
    };
    drop(vm);
    drop(session);
    sample
}

/// Touches of a `Verify` over `count` pages from `first` that reach every one of them.
fn covering(first: u32, count: u32) -> u32 {
    let mut touches = count;
    while page_sequence(SEED, touches, first, count)
        .into_iter()
        .collect::<BTreeSet<_>>()
        .len()
        < count as usize
    {
        touches += count / 8;
    }
    touches
}

fn main() {
    let quick = std::env::var_os("FAULT_RT_QUICK").is_some();
    let (size, ws, rounds) = if quick {
        (128 * MIB, 8 * MIB, 2)
    } else {
        (1024 * MIB, 64 * MIB, 5)
    };
    // `OBJ_BENCH_ROUNDS=N`: N rounds instead.
    let rounds = std::env::var("OBJ_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(rounds);
    let pages = (size / PAGE) as u32;
    let half = (ws / 2 / PAGE) as u32;
    let windows: Vec<(u32, u32, u32)> = [pages / 8, pages / 8 * 5]
        .iter()
        .map(|&first| (first, half, covering(first, half)))
        .collect();
    let distinct = 2 * half as usize;
    println!(
        "object_restore: snapshot {} MiB, working set {} MiB in 2 windows ({} touches), {rounds} rounds; load {}",
        size >> 20,
        ws >> 20,
        windows.iter().map(|w| w.2).sum::<u32>(),
        load_average()
    );

    let rgw = Rgw::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mem");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        for i in 0..size / 4 {
            f.write_all(&pattern(i * 4, SEED).to_le_bytes()).unwrap();
        }
    }
    let t = Instant::now();
    assert_eq!(rgw.put(BUCKET, KEY, &path), "200", "PUT {KEY}");
    println!("PUT {} MiB in {:?}", size >> 20, t.elapsed());
    warm_page_cache(&path);
    let file = std::fs::File::open(&path).unwrap();

    // The recording, once: a restore that records and writes it beside the object.
    {
        let f = Faultd::start_with_config(&config(&rgw, 512, true, false));
        restore(&f, size, &windows, None);
        let until = Instant::now() + Duration::from_secs(60);
        while metric(&f, "faultd_object_recording_puts_total") == 0 {
            assert!(Instant::now() < until, "recording written");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    let handlers = [
        Handler::Local,
        Handler::Obj {
            chunk_kib: 512,
            rec: false,
        },
        Handler::Obj {
            chunk_kib: 512,
            rec: true,
        },
        Handler::Obj {
            chunk_kib: 2048,
            rec: false,
        },
        Handler::Obj {
            chunk_kib: 2048,
            rec: true,
        },
    ];
    let mut results: Vec<Vec<Sample>> = handlers.iter().map(|_| Vec::new()).collect();
    interleaved(rounds, &handlers, |h, _round| {
        let i = handlers.iter().position(|x| x.name() == h.name()).unwrap();
        let sample = match h {
            Handler::Local => {
                let f = Faultd::start_with_config(&config(&rgw, 512, false, false));
                restore(&f, size, &windows, Some(&file))
            }
            Handler::Obj { chunk_kib, rec } => {
                let f = Faultd::start_with_config(&config(&rgw, chunk_kib, false, rec));
                restore(&f, size, &windows, None)
            }
        };
        println!(
            "  {:<14} {:>8.1} ms  {:>6} GETs  {:>6} MiB fetched",
            h.name(),
            sample.secs * 1e3,
            sample.gets,
            sample.bytes >> 20
        );
        results[i].push(sample);
    });

    println!("\nmedian over {rounds} rounds [IQR]; ratios per round against local:");
    for (h, samples) in handlers.iter().zip(&results) {
        let secs: Vec<f64> = samples.iter().map(|s| s.secs * 1e3).collect();
        let ratio: Vec<f64> = samples
            .iter()
            .zip(&results[0])
            .map(|(s, l)| s.secs / l.secs)
            .collect();
        let (q1, m, q3) = quartiles(&secs);
        let (r1, rm, r3) = quartiles(&ratio);
        let line = match h {
            Handler::Local => String::new(),
            Handler::Obj { chunk_kib, .. } => {
                let ideal = (distinct as u64 * PAGE) as f64 / (*chunk_kib * 1024) as f64;
                let gets: Vec<f64> = samples.iter().map(|s| s.gets as f64).collect();
                let (_, g, _) = quartiles(&gets);
                format!(
                    "  GETs {g:.0} = {:.2}x (working-set bytes / chunk size = {ideal:.0}); {} MiB fetched",
                    g / ideal,
                    samples.last().map_or(0, |s| s.bytes >> 20)
                )
            }
        };
        println!(
            "{:<14} {m:>8.1} ms [{q1:.1}..{q3:.1}]  {rm:.2}x [{r1:.2}..{r3:.2}]{line}",
            h.name()
        );
    }
    println!("load after: {}", load_average());
}

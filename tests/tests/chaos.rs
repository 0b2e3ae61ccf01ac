//! The chaos suite: a real KVM guest on two vCPUs and the emulated PRI device write and verify
//! data across one VM's unpinned RAM while a seeded chaos driver evicts random pages, ranges,
//! device granules and bursts (and a global budget evicts on its own), including pages with
//! faults or DMA in flight.
//!
//! Invariants checked: no lost write and no stale read (the guest verifies every page it wrote
//! after each round, the device reads back every page it wrote); every device group answered in
//! time (no DMA timeout, no INVALID, no deadline miss); device-mapped => resident (s2map refuses
//! anything else: an eviction of a mapped page that skipped the unmap would be an error);
//! resident memory within the budget at the end; faultd's accounting equals the memfd's.
//!
//! Two more scenarios: fault-around, and working-set replay, each with evictions, discards and
//! device DMA running (see their docs).
//!
//! Quick mode (CI): at least 100,000 evictions. Long mode: `FAULTD_CHAOS_EVICTIONS=1000000
//! cargo test --release -p faultd-tests --test chaos -- --nocapture`. The seed is printed; rerun
//! with `FAULTD_SEED=<seed>` for the same eviction sequence (thread timing still varies).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faultd_client::Session;
use faultd_proto::SessionStats;
use faultd_tests::firecracker::{copy_with_timeout, pattern_snapshot};
use faultd_tests::{device_round, resident_settled, settled_stats, Faultd, Ram};
use testvmm::{DeviceConfig, PriDevice, RamSlot, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const RAM: u64 = 48 * MIB;
const BUDGET_MIB: u64 = 24;

/// The driver of the fault-around and replay scenarios: evicts 1 to 64 pages at seeded random
/// places of `ram_bytes` of RAM (from `rng`) until `done(pages evicted so far)`, failing on any
/// eviction faultd fails (naming `seed`). Returns the pages evicted.
fn evict_randomly(
    session: &mut Session,
    faultd: &Faultd,
    ram_bytes: u64,
    seed: u64,
    mut rng: u64,
    done: impl Fn(u64) -> bool,
) -> u64 {
    let mut evicted = 0;
    while !done(evicted) {
        let n = 1 + xorshift(&mut rng) % 64;
        let gpa = xorshift(&mut rng) % (ram_bytes / PAGE) * PAGE;
        let len = (n * PAGE).min(ram_bytes - gpa);
        let (e, _, failed) = session.evict(gpa, len, None).expect("evict request");
        assert_eq!(
            failed,
            0,
            "faultd failed an eviction (seed {seed}):\n{}",
            faultd.log()
        );
        evicted += e;
    }
    evicted
}

/// How every scenario must end: each device group answered in time and each transfer done, no
/// fault faultd failed, and faultd's count of resident bytes equal to what the memfd holds.
fn assert_served_cleanly(st: &SessionStats, device: &PriDevice, faultd: &Faultd, ram: &Ram) {
    let ds = device.stats();
    assert_eq!((st.device.invalid, st.device.deadline), (0, 0), "{st:?}");
    assert_eq!(
        (ds.invalid, ds.timeouts, ds.failed_transfers),
        (0, 0, 0),
        "{ds:?}"
    );
    assert_eq!(st.errors, 0, "{}", faultd.log());
    assert_eq!(ram.ram.allocated_bytes().unwrap(), st.resident_bytes);
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[test]
fn chaos_evictions_under_guest_and_device_load_lose_nothing() {
    let target: u64 = std::env::var("FAULTD_CHAOS_EVICTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed = faultd_tests::seed();
    println!("chaos target {target} evictions");
    let faultd = Faultd::start_with_config(&format!("[budget]\nglobal_mib = {BUDGET_MIB}\n"));
    let ram = Ram::new("chaos", RAM);
    let mut session = ram.serve(&faultd, "chaos");
    // SAFETY: `ram` outlives the device (declared before it), and this test holds no Rust
    // reference into guest RAM.
    let device = unsafe {
        PriDevice::new(
            ram.ram.host_ptr(),
            0,
            RAM,
            DeviceConfig {
                workers: 2,
                ..DeviceConfig::default()
            },
        )
    }
    .expect("device");
    let granule = device.attach(&mut session).expect("attach device");
    let pages = (RAM / PAGE) as u32;
    let third = pages / 3;
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.ram.host_ptr(),
        size: RAM,
    }])
    .unwrap();
    vm.set_timeout(Some(Duration::from_secs(300)));

    let stop = AtomicBool::new(false);
    let evictions = AtomicU64::new(0);
    let started = Instant::now();
    let (guest_rounds, device_rounds, chaos) = std::thread::scope(|s| {
        // The guest: rounds of write-then-verify on two vCPUs, each over its third of RAM,
        // with a new seed per round (a page written in round r must read round r's pattern).
        let guest = s.spawn(|| {
            let mut rounds = 0u32;
            while !stop.load(Ordering::Acquire) {
                let w = |i: u32| Workload::WriteVerify {
                    seed: 1000 * rounds + i,
                    touches: 600,
                    first_page: i * third,
                    page_count: third,
                };
                let r = vm.run(vec![w(0), w(1)], &|_, _| {}).expect("guest run");
                for (i, rep) in r.iter().enumerate() {
                    assert_eq!(
                        rep.mismatches, 0,
                        "guest vCPU {i} round {rounds}: lost write or stale read at {:?} (seed {seed})",
                        rep.first_mismatch_gpa
                    );
                }
                rounds += 1;
            }
            rounds
        });
        // The device: rounds of DMA-writing whole pages of the last third, then reading every
        // one back.
        let dev = s.spawn(|| {
            let mut rounds = 0u32;
            while !stop.load(Ordering::Acquire) {
                let what = format!("device round {rounds}, seed {seed}");
                device_round(
                    &device,
                    0xD000 + rounds,
                    200,
                    2 * third,
                    pages - 2 * third,
                    &what,
                );
                rounds += 1;
            }
            rounds
        });
        // The chaos driver: seeded evictions of single pages, ranges, device granules and
        // bursts anywhere in RAM, until the target is reached.
        let mut rng = seed | 1;
        let mut kinds = [0u64; 4];
        while evictions.load(Ordering::Relaxed) < target {
            let kind = xorshift(&mut rng) % 4;
            let (gpa, len, repeat) = match kind {
                0 => (xorshift(&mut rng) % pages as u64 * PAGE, PAGE, 1),
                1 => {
                    let n = 1 + xorshift(&mut rng) % 256;
                    (xorshift(&mut rng) % pages as u64 * PAGE, n * PAGE, 1)
                }
                2 => {
                    let g = (2 * third as u64 * PAGE) / granule
                        + xorshift(&mut rng) % ((pages - 2 * third) as u64 * PAGE / granule);
                    (g * granule, granule, 1)
                }
                _ => (xorshift(&mut rng) % pages as u64 * PAGE, 8 * PAGE, 16),
            };
            kinds[kind as usize] += 1;
            for i in 0..repeat {
                let at = (gpa + i * 8 * PAGE) % RAM;
                let (e, _, failed) = session.evict(at, len, None).expect("evict request");
                assert_eq!(
                    failed,
                    0,
                    "faultd failed an eviction (seed {seed}):\n{}",
                    faultd.log()
                );
                evictions.fetch_add(e, Ordering::Relaxed);
            }
        }
        stop.store(true, Ordering::Release);
        let g = guest.join().expect("guest thread");
        let d = dev.join().expect("device thread");
        (g, d, kinds)
    });

    let st = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    println!(
        "{:.1} s: driver evictions {} ({:?} singles/ranges/granules/bursts), faultd evictions {} \
         (budget ones included), served from the store {}, vCPU faults {}, device groups {} \
         ({} SUCCESS), guest rounds {guest_rounds}, device rounds {device_rounds}, resident {} KiB",
        started.elapsed().as_secs_f64(),
        evictions.load(Ordering::Relaxed),
        chaos,
        st.evictions,
        st.store_fills,
        st.vcpu_faults,
        st.device.groups,
        st.device.success,
        st.resident_bytes / 1024
    );
    assert!(evictions.load(Ordering::Relaxed) >= target);
    assert!(
        guest_rounds >= 1 && device_rounds >= 1,
        "no round completed"
    );
    assert!(st.store_fills > 0, "nothing was ever served from the store");
    // Device mappings pin pages outside the budget's reach only while mapped; the device's
    // last round leaves at most its working set mapped.
    assert!(
        st.resident_bytes <= BUDGET_MIB * MIB + st.device.mapped_bytes,
        "resident {} over the budget",
        st.resident_bytes
    );
    assert_served_cleanly(&st, &device, &faultd, &ram);
}

/// Fault-around in the chaos: a guest streaming through its third of RAM (served ahead), the
/// device streaming DMA through the last third (mapped ahead), a balloon discarding stretches of
/// the middle third that a host thread wrote and streams through (so look-aheads run into
/// pending and past discards), and seeded evictions everywhere, under a global budget.
///
/// Checked besides the invariants above: a discarded stretch reads zero afterwards, even where
/// its pages had been evicted to the store (a look-ahead must not bring old contents back).
/// Quick by default (20,000 driver evictions); `FAULTD_CHAOS_AROUND_EVICTIONS` for more.
#[test]
fn chaos_fault_around_with_evictions_discards_and_device_dma_loses_nothing() {
    let target: u64 = std::env::var("FAULTD_CHAOS_AROUND_EVICTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seed = faultd_tests::seed();
    println!("chaos (fault-around) target {target} evictions, seed {seed}");
    let faultd = Faultd::start_with_config(&format!(
        "[budget]\nglobal_mib = {BUDGET_MIB}\n[around]\nenabled = true\nmax_kib = 512\n"
    ));
    let ram = Ram::new("chaos-around", RAM);
    let mut session = ram.serve(&faultd, "chaos-around");
    // SAFETY: `ram` outlives the device (declared before it), and this test holds no Rust
    // reference into guest RAM.
    let device = unsafe { PriDevice::new(ram.ram.host_ptr(), 0, RAM, DeviceConfig::default()) }
        .expect("device");
    let granule = device.attach(&mut session).expect("attach device");
    let pages = (RAM / PAGE) as u32;
    let third = pages / 3;
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.ram.host_ptr(),
        size: RAM,
    }])
    .unwrap();
    vm.set_timeout(Some(Duration::from_secs(60)));
    let timeout = Duration::from_secs(60);

    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (guest_rounds, device_rounds, balloon_rounds, evicted) = std::thread::scope(|s| {
        // The guest: write then verify 8 MiB of its third in ascending order, a new seed and
        // a new place each round.
        let guest = s.spawn(|| {
            let mut rounds = 0u32;
            while !stop.load(Ordering::Acquire) {
                let count = 2048;
                let first = (rounds * 512) % (third - count);
                let w = Workload::WriteVerifySequential {
                    seed: 7000 + rounds,
                    first_page: first,
                    page_count: count,
                };
                let r = vm.run(vec![w], &|_, _| {}).expect("guest run");
                assert_eq!(
                    r[0].mismatches, 0,
                    "guest round {rounds}: lost write or stale read at {:?} (seed {seed})",
                    r[0].first_mismatch_gpa
                );
                rounds += 1;
            }
            rounds
        });
        // The device: DMA-writes 4 MiB of the last third in ascending 256 KiB transfers, then
        // reads it back.
        let dev = s.spawn(|| {
            let mut rounds = 0u32;
            let base = u64::from(2 * third) * PAGE;
            let span = 4 * MIB;
            let room = RAM - base - span;
            while !stop.load(Ordering::Acquire) {
                let at = base + (u64::from(rounds) * MIB) % room / granule * granule;
                let s = 0xA000 + rounds;
                let data: Vec<u8> = (0..span / PAGE)
                    .flat_map(|p| faultd_tests::pattern_page(at + p * PAGE, s))
                    .collect();
                for (i, c) in data.chunks(256 * 1024).enumerate() {
                    let gpa = at + (i * 256 * 1024) as u64;
                    device
                        .dma_write(0, gpa, c)
                        .unwrap_or_else(|e| panic!("DMA write {gpa:#x}: {e} (seed {seed})"));
                }
                let mut back = vec![0u8; span as usize];
                for (i, c) in back.chunks_mut(256 * 1024).enumerate() {
                    let gpa = at + (i * 256 * 1024) as u64;
                    device
                        .dma_read(0, gpa, c)
                        .unwrap_or_else(|e| panic!("DMA read {gpa:#x}: {e} (seed {seed})"));
                }
                assert!(
                    back == data,
                    "device round {rounds}: lost DMA write (seed {seed})"
                );
                rounds += 1;
            }
            rounds
        });
        // The balloon: writes a stretch of the middle third (the host thread faults it in,
        // sequentially), lets the driver evict some of it, discards it, then streams through it
        // reading: every byte must be zero.
        let balloon = s.spawn(|| {
            let mut rounds = 0u32;
            let stretch = 512u64;
            while !stop.load(Ordering::Acquire) {
                let first =
                    u64::from(third) + (u64::from(rounds) * 97) % (u64::from(third) - stretch);
                let writes: Vec<(u64, u8)> = (0..stretch)
                    .map(|p| ((first + p) * PAGE + p % 4096, 0x5A))
                    .collect();
                faultd_tests::write_with_timeout(&ram.ram, writes, timeout);
                std::thread::sleep(Duration::from_millis(2));
                let (addr, len) = (ram.ram.host_addr() + first * PAGE, stretch * PAGE);
                // SAFETY: the stretch lies inside the live shared mapping of guest RAM, in the
                // middle third nobody else touches; no Rust reference points into guest RAM.
                let rc = unsafe { libc::madvise(addr as *mut _, len as usize, libc::MADV_REMOVE) };
                assert_eq!(rc, 0, "MADV_REMOVE: {}", std::io::Error::last_os_error());
                let offs: Vec<u64> = (0..stretch)
                    .map(|p| (first + p) * PAGE + p % 4096)
                    .collect();
                let back = faultd_tests::read_with_timeout(&ram.ram, offs, timeout);
                assert!(
                    back.iter().all(|&b| b == 0),
                    "balloon round {rounds}: a discarded page came back non-zero (seed {seed})"
                );
                rounds += 1;
            }
            rounds
        });
        let evicted = evict_randomly(&mut session, &faultd, RAM, seed, seed | 1, |e| e >= target);
        stop.store(true, Ordering::Release);
        (
            guest.join().expect("guest thread"),
            dev.join().expect("device thread"),
            balloon.join().expect("balloon thread"),
            evicted,
        )
    });

    let st = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    println!(
        "{:.1} s: driver evictions {}, faultd evictions {}, store fills {}, vCPU faults {}, \
         pages ahead {} ({} look-aheads, {} cut short), device groups {}, granules ahead {}, \
         discarded {}, rounds guest {guest_rounds} device {device_rounds} balloon \
         {balloon_rounds}",
        started.elapsed().as_secs_f64(),
        evicted,
        st.evictions,
        st.store_fills,
        st.vcpu_faults,
        st.around.vcpu_pages,
        st.around.vcpu_rounds,
        st.around.stopped,
        st.device.groups,
        st.around.device_granules,
        st.discarded_pages,
    );
    assert!(guest_rounds >= 1 && device_rounds >= 1 && balloon_rounds >= 1);
    assert!(st.around.vcpu_pages > 0 && st.around.device_granules > 0);
    assert!(st.discarded_pages > 0 && st.store_fills > 0);
    assert_served_cleanly(&st, &device, &faultd, &ram);
}

/// What a page of the replay scenario must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// The snapshot's contents: every dword `pattern(gpa, SNAP_SEED)`.
    Snapshot,
    /// Zero (discarded by the balloon).
    Zero,
    /// A whole [`faultd_tests::pattern_page`] of this seed (a device write or the balloon's).
    Page(u32),
    /// The snapshot's, but for the guest's dwords ([`testvmm::dword_offsets`]), written with
    /// this seed by a `WriteVerify`.
    Dwords(u32),
}

impl Expect {
    fn page(self, gpa: u64) -> Vec<u8> {
        match self {
            Expect::Snapshot => faultd_tests::pattern_page(gpa, SNAP_SEED),
            Expect::Zero => vec![0; PAGE as usize],
            Expect::Page(s) => faultd_tests::pattern_page(gpa, s),
            Expect::Dwords(s) => {
                let mut p = faultd_tests::pattern_page(gpa, SNAP_SEED);
                for o in testvmm::dword_offsets() {
                    let at = o as usize;
                    p[at..at + 4].copy_from_slice(&testvmm::pattern(gpa + o, s).to_le_bytes());
                }
                p
            }
        }
    }
}

/// The seed of the replay scenario's snapshot pattern (no round uses it).
const SNAP_SEED: u32 = 0x5A5A_0015;

/// Writes whole pages `(offset, bytes)` of `ram` from a helper thread (a fault there blocks
/// until faultd serves it, so a stuck faultd fails the test after `timeout`).
fn write_pages_with_timeout(
    ram: &faultd_client::GuestRam,
    pages: Vec<(u64, Vec<u8>)>,
    timeout: Duration,
) {
    let base = ram.host_addr() as usize;
    let size = ram.size();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (o, data) in pages {
            assert!(o + data.len() as u64 <= size);
            // SAFETY: `[base + o, + len)` lies in the live shared mapping of the RAM (checked
            // against its size above); copying in creates no reference into it.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    data.as_ptr(),
                    (base + o as usize) as *mut u8,
                    data.len(),
                )
            };
        }
        let _ = tx.send(());
    });
    rx.recv_timeout(timeout)
        .expect("guest RAM access was not served in time");
}

/// Working-set replay in the chaos. A first restore of a snapshot-backed VMM session records
/// a host thread reading all of RAM in a seeded random order (so the recording has almost no
/// runs and replay installs page by page, for long). The second restore replays it while, at
/// once: two vCPUs verify the snapshot's contents, then write and verify their own patterns
/// (each in its quarter of RAM); the emulated PRI device reads snapshot pages and DMA-writes
/// and reads back its own (the last quarter); a balloon discards stretches of the third
/// quarter (MADV_REMOVE) that replay still means to install, reads every page of each back as
/// zero, and writes half of it again; and a seeded driver evicts anywhere.
///
/// Checked: replay ran during the chaos (not ended when the chaos began, ended "done" with
/// pages prefetched, and at least one discard finished while it still ran); a discarded
/// page reads zero (replay must not resurrect it); no lost write or stale read; at the end
/// every page of RAM holds exactly what was last written there (the snapshot's contents, the
/// guest's dwords, a device or balloon page, or zeros). Quick by default (40,000 driver
/// evictions and 3 guest rounds, a few seconds); `FAULTD_CHAOS_REPLAY_EVICTIONS` for more.
#[test]
fn chaos_replay_with_evictions_discards_and_device_dma_loses_nothing_and_discards_read_zero() {
    const RRAM: u64 = 96 * MIB;
    let target: u64 = std::env::var("FAULTD_CHAOS_REPLAY_EVICTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40_000);
    let seed = faultd_tests::seed();
    println!("chaos (replay) target {target} evictions, seed {seed}");
    let timeout = Duration::from_secs(60);
    let faultd = Faultd::start_with_config(
        "[working_set]\nrecord = true\nreplay = true\nrecord_ms = 60000\nrecord_pages = 65536\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let snap = pattern_snapshot(&dir.path().join("mem"), &[(0, RRAM, 0)], SNAP_SEED);
    let pages = RRAM / PAGE;
    let started = Instant::now();

    // The recording: every page once, in a seeded random order, each checked.
    {
        let ram = Ram::new("chaos-rec", RRAM);
        let mut session = ram.serve_snapshot(&faultd, "chaos-rec", &snap);
        assert!(
            faultd.wait_for_log("snapshot file scanned", timeout),
            "{}",
            faultd.log()
        );
        let mut order: Vec<u64> = (0..pages).collect();
        let mut rng = seed | 1;
        for i in (1..order.len()).rev() {
            order.swap(i, (xorshift(&mut rng) % (i as u64 + 1)) as usize);
        }
        for part in order.chunks(4096) {
            let got = copy_with_timeout(
                part.iter()
                    .map(|p| ram.ram.host_addr() + p * PAGE)
                    .collect(),
                PAGE as usize,
                timeout,
            );
            for (&p, page) in part.iter().zip(&got) {
                assert!(
                    *page == Expect::Snapshot.page(p * PAGE),
                    "recording restore: page {p} differs from the snapshot"
                );
            }
        }
        let st = settled_stats(&mut session, |s| s.working_set.recorded == pages);
        assert_eq!(st.working_set.recorded, pages, "{st:?}");
    }
    assert!(
        faultd.wait_for_log("working set recorded", timeout),
        "{}",
        faultd.log()
    );
    let recorded_at = started.elapsed();

    let ram = Ram::new("chaos-replay", RRAM);
    let mut session = ram.serve_snapshot(&faultd, "chaos-replay", &snap);
    // SAFETY: `ram` outlives the device (declared before it), and this test holds no Rust
    // reference into guest RAM.
    let device = unsafe {
        PriDevice::new(
            ram.ram.host_ptr(),
            0,
            RRAM,
            DeviceConfig {
                workers: 2,
                ..DeviceConfig::default()
            },
        )
    }
    .expect("device");
    device.attach(&mut session).expect("attach device");
    let mut vm = ram.vm(timeout);
    let q = (pages / 4) as u32;
    let at_start = session.stats().expect("stats").working_set;
    assert!(
        at_start.replay_stop.is_empty(),
        "replay ended before the chaos began: {at_start:?}"
    );

    let stop = AtomicBool::new(false);
    let guest_rounds = AtomicU64::new(0);
    let chaos_from = Instant::now();
    let (guest, dev, balloon, evicted) = std::thread::scope(|s| {
        // The balloon first (its first discard should meet replay early): discard a stretch
        // of the third quarter, read it back (all zero), write every other page of it.
        let balloon = s.spawn(|| {
            let mut expect = vec![Expect::Snapshot; q as usize];
            let (mut rounds, mut during_replay) = (0u32, 0u32);
            let mut rng = (seed ^ 0xBA11_0000) | 1;
            let stretch = 256u64;
            while !stop.load(Ordering::Acquire) {
                let first = xorshift(&mut rng) % (u64::from(q) - stretch);
                let gpa = (2 * u64::from(q) + first) * PAGE;
                let (addr, len) = (ram.ram.host_addr() + gpa, stretch * PAGE);
                // SAFETY: the stretch lies inside the live shared mapping of guest RAM, in the
                // quarter nobody else writes; no Rust reference points into guest RAM.
                let rc = unsafe { libc::madvise(addr as *mut _, len as usize, libc::MADV_REMOVE) };
                assert_eq!(rc, 0, "MADV_REMOVE: {}", std::io::Error::last_os_error());
                let replaying = faultd
                    .vm_stats("chaos-replay")
                    .first()
                    .is_some_and(|s| s.working_set.replay_stop.is_empty());
                during_replay += u32::from(replaying);
                let back = copy_with_timeout(
                    (0..stretch).map(|p| addr + p * PAGE).collect(),
                    PAGE as usize,
                    timeout,
                );
                for (p, page) in back.iter().enumerate() {
                    let at = gpa + p as u64 * PAGE;
                    assert!(
                        page.iter().all(|&b| b == 0),
                        "balloon round {rounds} (replay running: {replaying}): discarded page \
                         {at:#x} is not zero{} (seed {seed})",
                        if *page == Expect::Snapshot.page(at) {
                            ": it holds the snapshot's contents again"
                        } else {
                            ""
                        }
                    );
                }
                let bseed = 0xB000 + rounds;
                let writes: Vec<(u64, Vec<u8>)> = (0..stretch)
                    .step_by(2)
                    .map(|p| {
                        let at = gpa + p * PAGE;
                        (at, faultd_tests::pattern_page(at, bseed))
                    })
                    .collect();
                write_pages_with_timeout(&ram.ram, writes, timeout);
                for p in 0..stretch {
                    expect[(first + p) as usize] = if p % 2 == 0 {
                        Expect::Page(bseed)
                    } else {
                        Expect::Zero
                    };
                }
                rounds += 1;
            }
            (expect, rounds, during_replay)
        });
        // The guest: vCPU i in quarter i. Round 0 verifies the snapshot's contents; then
        // rounds of write-then-verify with a new seed each.
        let guest = s.spawn(|| {
            let mut expect = vec![Expect::Snapshot; 2 * q as usize];
            let mut rounds = 0u32;
            while !stop.load(Ordering::Acquire) {
                let w = |i: u32| {
                    if rounds == 0 {
                        Workload::Verify {
                            seed: SNAP_SEED,
                            touches: 3000,
                            first_page: i * q,
                            page_count: q,
                        }
                    } else {
                        Workload::WriteVerify {
                            seed: 1000 * rounds + i,
                            touches: 600,
                            first_page: i * q,
                            page_count: q,
                        }
                    }
                };
                let r = vm.run(vec![w(0), w(1)], &|_, _| {}).expect("guest run");
                for (i, rep) in r.iter().enumerate() {
                    assert_eq!(
                        rep.mismatches, 0,
                        "guest vCPU {i} round {rounds}: lost write or stale read at {:?} \
                         (seed {seed})",
                        rep.first_mismatch_gpa
                    );
                }
                if rounds > 0 {
                    for i in 0..2 {
                        let s = 1000 * rounds + i;
                        for p in testvmm::page_sequence(s, 600, i * q, q) {
                            expect[p as usize] = Expect::Dwords(s);
                        }
                    }
                }
                rounds += 1;
                guest_rounds.fetch_add(1, Ordering::Relaxed);
            }
            (expect, rounds)
        });
        // The device, in the last quarter: reads 64 pages and checks them against what they
        // must hold, then a round of DMA writes read back.
        let dev = s.spawn(|| {
            let mut expect = vec![Expect::Snapshot; q as usize];
            let mut rounds = 0u32;
            let mut buf = vec![0u8; PAGE as usize];
            while !stop.load(Ordering::Acquire) {
                let dseed = 0xD000 + rounds;
                for p in testvmm::page_sequence(dseed ^ 0xFFFF, 64, 3 * q, q) {
                    let gpa = u64::from(p) * PAGE;
                    device
                        .dma_read(0, gpa, &mut buf)
                        .unwrap_or_else(|e| panic!("DMA read {gpa:#x}: {e} (seed {seed})"));
                    let want = expect[(p - 3 * q) as usize];
                    assert!(
                        buf == want.page(gpa),
                        "device round {rounds}: page {gpa:#x} is not {want:?} (seed {seed})"
                    );
                }
                let what = format!("device round {rounds}, seed {seed}");
                device_round(&device, dseed, 200, 3 * q, q, &what);
                for p in testvmm::page_sequence(dseed, 200, 3 * q, q) {
                    expect[(p - 3 * q) as usize] = Expect::Page(dseed);
                }
                rounds += 1;
            }
            (expect, rounds)
        });
        let evicted = evict_randomly(
            &mut session,
            &faultd,
            RRAM,
            seed,
            (seed ^ 0xE000_0000) | 1,
            |e| e >= target && guest_rounds.load(Ordering::Relaxed) >= 3,
        );
        stop.store(true, Ordering::Release);
        (
            guest.join().expect("guest thread"),
            dev.join().expect("device thread"),
            balloon.join().expect("balloon thread"),
            evicted,
        )
    });
    let chaos_took = chaos_from.elapsed();

    // Every page of RAM, against what was last written there.
    let mut expect = guest.0;
    expect.extend(balloon.0);
    expect.extend(dev.0);
    assert_eq!(expect.len() as u64, pages);
    for (c, part) in expect.chunks(4096).enumerate() {
        let first = c as u64 * 4096;
        let got = copy_with_timeout(
            (0..part.len() as u64)
                .map(|p| ram.ram.host_addr() + (first + p) * PAGE)
                .collect(),
            PAGE as usize,
            timeout,
        );
        for (p, (want, page)) in part.iter().zip(&got).enumerate() {
            let gpa = (first + p as u64) * PAGE;
            assert!(
                *page == want.page(gpa),
                "at the end, page {gpa:#x} is not {want:?} (seed {seed})"
            );
        }
    }

    // Replay may still be going through the rest of its recording (skipping what the final
    // check faulted in) on a slow machine: its end is waited for, not raced.
    settled_stats(&mut session, |s| !s.working_set.replay_stop.is_empty());
    let st = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    let ws = &st.working_set;
    println!(
        "recorded in {:.1} s; chaos {:.1} s: driver evictions {}, faultd evictions {}, store \
         fills {}, file fills {}, vCPU faults {}, device groups {}, discarded {}, rounds guest \
         {} device {} balloon {} ({} of whose discards finished while replay ran); replay at \
         the chaos's start {at_start:?}, at the end {ws:?}",
        recorded_at.as_secs_f64(),
        chaos_took.as_secs_f64(),
        evicted,
        st.evictions,
        st.store_fills,
        st.file_fills,
        st.vcpu_faults,
        st.device.groups,
        st.discarded_pages,
        guest.1,
        dev.1,
        balloon.1,
        balloon.2,
    );
    assert!(guest.1 >= 3 && dev.1 >= 1 && balloon.1 >= 1);
    assert_eq!(ws.replay_pages, pages, "{ws:?}");
    assert_eq!(ws.replay_stop, "done", "{ws:?}");
    assert!(ws.prefetched > 0, "{ws:?}");
    assert!(
        balloon.2 >= 1,
        "no discard finished while replay ran: {ws:?}"
    );
    assert!(st.discarded_pages > 0 && st.store_fills > 0, "{st:?}");
    assert_served_cleanly(&st, &device, &faultd, &ram);
}

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
//! Quick mode (CI): at least 100,000 evictions. Long mode: `FAULTD_CHAOS_EVICTIONS=1000000
//! cargo test --release -p faultd-tests --test chaos -- --nocapture`. The seed is printed; rerun
//! with `FAULTD_SEED=<seed>` for the same eviction sequence (thread timing still varies).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faultd_tests::{device_round, resident_settled, Faultd, Ram};
use testvmm::{DeviceConfig, PriDevice, RamSlot, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const RAM: u64 = 48 * MIB;
const BUDGET_MIB: u64 = 24;

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
    let ds = device.stats();
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
    assert_eq!((st.device.invalid, st.device.deadline), (0, 0), "{st:?}");
    assert_eq!(
        (ds.invalid, ds.timeouts, ds.failed_transfers),
        (0, 0, 0),
        "{ds:?}"
    );
    assert_eq!(st.errors, 0, "{}", faultd.log());
    // Device mappings pin pages outside the budget's reach only while mapped; the device's
    // last round leaves at most its working set mapped.
    assert!(
        st.resident_bytes <= BUDGET_MIB * MIB + st.device.mapped_bytes,
        "resident {} over the budget",
        st.resident_bytes
    );
    assert_eq!(ram.ram.allocated_bytes().unwrap(), st.resident_bytes);
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
    let evictions = AtomicU64::new(0);
    let started = Instant::now();
    let (guest_rounds, device_rounds, balloon_rounds) = std::thread::scope(|s| {
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
        let mut rng = seed | 1;
        while evictions.load(Ordering::Relaxed) < target {
            let n = 1 + xorshift(&mut rng) % 64;
            let gpa = xorshift(&mut rng) % u64::from(pages) * PAGE;
            let len = (n * PAGE).min(RAM - gpa);
            let (e, _, failed) = session.evict(gpa, len, None).expect("evict request");
            assert_eq!(
                failed,
                0,
                "faultd failed an eviction (seed {seed}):\n{}",
                faultd.log()
            );
            evictions.fetch_add(e, Ordering::Relaxed);
        }
        stop.store(true, Ordering::Release);
        (
            guest.join().expect("guest thread"),
            dev.join().expect("device thread"),
            balloon.join().expect("balloon thread"),
        )
    });

    let st = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    let ds = device.stats();
    println!(
        "{:.1} s: driver evictions {}, faultd evictions {}, store fills {}, vCPU faults {}, \
         pages ahead {} ({} look-aheads, {} cut short), device groups {}, granules ahead {}, \
         discarded {}, rounds guest {guest_rounds} device {device_rounds} balloon \
         {balloon_rounds}",
        started.elapsed().as_secs_f64(),
        evictions.load(Ordering::Relaxed),
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
    assert_eq!((st.device.invalid, st.device.deadline), (0, 0), "{st:?}");
    assert_eq!(
        (ds.invalid, ds.timeouts, ds.failed_transfers),
        (0, 0, 0),
        "{ds:?}"
    );
    assert_eq!(st.errors, 0, "{}", faultd.log());
    assert_eq!(ram.ram.allocated_bytes().unwrap(), st.resident_bytes);
}

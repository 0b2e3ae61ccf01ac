//! Eviction under load: pages are taken back (saved to faultd's store and dropped from guest
//! RAM) while host threads and a real KVM guest write and read them. No write may be lost and
//! no read may see stale or zero data. Seeded; the seed is printed.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faultd_tests::{resident_settled, settled_stats, Faultd, Ram};
use testvmm::{page_sequence, RamSlot, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// xorshift64*: small, seeded, reproducible.
fn next(x: &mut u64) -> u64 {
    *x ^= *x >> 12;
    *x ^= *x << 25;
    *x ^= *x >> 27;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

#[test]
fn host_writes_survive_random_evictions_and_reads_never_see_stale_data() {
    const PAGES: u64 = 256;
    const ROUNDS: u64 = 60;
    const MIN_EVICTIONS: u64 = 2000;
    let mut rng = faultd_tests::seed() | 1;
    let faultd = Faultd::start(&[]);
    let r = Ram::new("ram", PAGES * PAGE);
    let mut session = r.serve(&faultd, "evict");
    let stop = AtomicBool::new(false);
    // The writer goes on past ROUNDS until the evictor has taken enough pages, so the test
    // means the same however the two threads happen to be scheduled.
    let evicted_so_far = AtomicU64::new(0);
    let base = r.ram.host_addr() as usize;

    let (mismatch, evicted) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            // Every page's first u64 and last u64 hold the round last written; each write is
            // read back at once (a stale or zero read is a lost write).
            let mut bad = Vec::new();
            let started = Instant::now();
            for round in 1.. {
                if round > ROUNDS
                    && (evicted_so_far.load(Ordering::Relaxed) >= MIN_EVICTIONS
                        || started.elapsed() > Duration::from_secs(60))
                {
                    break;
                }
                for p in 0..PAGES {
                    let head = (base + (p * PAGE) as usize) as *mut u64;
                    let tail = (base + ((p + 1) * PAGE - 8) as usize) as *mut u64;
                    // SAFETY: both addresses lie inside the live guest RAM mapping, 8-byte
                    // aligned; volatile accesses create no reference, and a fault on them
                    // blocks until faultd serves it.
                    unsafe {
                        let before = std::ptr::read_volatile(head);
                        if before != round - 1 {
                            bad.push((p, round, before));
                        }
                        std::ptr::write_volatile(head, round);
                        std::ptr::write_volatile(tail, round);
                        if std::ptr::read_volatile(tail) != round {
                            bad.push((p, round, u64::MAX));
                        }
                    }
                }
            }
            stop.store(true, Ordering::Release);
            bad
        });
        let mut evicted = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Acquire) && Instant::now() < deadline {
            let first = next(&mut rng) % PAGES;
            let n = 1 + next(&mut rng) % 16;
            let (e, _, failed) = session
                .evict(first * PAGE, n * PAGE, None)
                .expect("evict request");
            assert_eq!(failed, 0, "faultd failed to evict:\n{}", faultd.log());
            evicted += e;
            evicted_so_far.store(evicted, Ordering::Relaxed);
        }
        (writer.join().unwrap(), evicted)
    });

    assert!(
        mismatch.is_empty(),
        "lost or stale writes (page, round, seen): {:?}",
        &mismatch[..mismatch.len().min(10)]
    );
    let stats = settled_stats(&mut session, |s| {
        s.errors > 0
            || (s.evictions >= evicted && s.resident_bytes == r.ram.allocated_bytes().unwrap())
    });
    println!(
        "evictions {evicted}, served from the store {}, stats {stats:?}",
        stats.store_fills
    );
    assert!(
        evicted >= MIN_EVICTIONS,
        "too few evictions ({evicted}) for the test to mean anything"
    );
    assert!(stats.store_fills > 0);
    assert_eq!(stats.errors, 0, "{}", faultd.log());
    // Nothing evicted is left resident in the memfd beyond what faultd counts.
    assert_eq!(r.ram.allocated_bytes().unwrap(), stats.resident_bytes);
}

#[test]
fn a_kvm_guest_loses_no_write_while_its_pages_are_evicted() {
    let mut rng = faultd_tests::seed() | 1;
    let faultd = Faultd::start(&[]);
    let r = Ram::new("vm-evict", 64 * MIB);
    let mut session = r.serve(&faultd, "vm-evict");
    let pages = (64 * MIB / PAGE) as u32;
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: r.ram.host_ptr(),
        size: r.ram.size(),
    }])
    .unwrap();
    vm.set_timeout(Some(Duration::from_secs(120)));
    let stop = AtomicBool::new(false);
    let work = (0x77u32, 3000u32);

    let (reports, evicted) = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            let r = vm.run(
                vec![Workload::WriteVerify {
                    seed: work.0,
                    touches: work.1,
                    first_page: 0,
                    page_count: pages,
                }],
                &|_, _| {},
            );
            stop.store(true, Ordering::Release);
            r
        });
        let mut evicted = 0;
        while !stop.load(Ordering::Acquire) {
            let first = next(&mut rng) % pages as u64;
            let (e, _, failed) = session.evict(first * PAGE, 64 * PAGE, None).expect("evict");
            assert_eq!(failed, 0, "{}", faultd.log());
            evicted += e;
        }
        (guest.join().unwrap().expect("guest run"), evicted)
    });
    // Evict everything still resident, then verify every touched page again from the store.
    let (all, _, failed) = session.evict(0, 64 * MIB, None).unwrap();
    assert_eq!(failed, 0);
    let emptied = session.stats().unwrap();
    assert_eq!(
        emptied.resident_bytes, 0,
        "pages stayed resident after evicting all"
    );
    assert_eq!(
        r.ram.allocated_bytes().unwrap(),
        0,
        "the memfd still holds pages"
    );
    let verify = vm
        .run(
            vec![Workload::Verify {
                seed: work.0,
                touches: work.1,
                first_page: 0,
                page_count: pages,
            }],
            &|_, _| {},
        )
        .unwrap();

    assert_eq!(
        reports[0].mismatches, 0,
        "the guest saw a lost write during evictions"
    );
    assert_eq!(
        verify[0].mismatches, 0,
        "a page came back from the store wrong"
    );
    let touched: std::collections::BTreeSet<u32> = page_sequence(work.0, work.1, 0, pages)
        .into_iter()
        .collect();
    let stats = settled_stats(&mut session, |s| {
        s.store_fills >= emptied.store_fills + touched.len() as u64
    });
    println!(
        "evicted during the run {evicted}, then {all}; store fills {}",
        stats.store_fills
    );
    assert!(evicted > 0, "no eviction overlapped the guest's run");
    // Every touched page came back from the store for the verify pass (none is all zero).
    assert_eq!(
        stats.store_fills - emptied.store_fills,
        touched.len() as u64
    );
    assert_eq!(stats.errors, 0, "{}", faultd.log());
}

/// Starts faultd with `toml` as its config file.
fn write_verify(r: &Ram, seed: u32, touches: u32) -> u32 {
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: r.ram.host_ptr(),
        size: r.ram.size(),
    }])
    .unwrap();
    vm.set_timeout(Some(Duration::from_secs(120)));
    let pages = (r.ram.size() / PAGE) as u32;
    let w = |seed| Workload::WriteVerify {
        seed,
        touches,
        first_page: 0,
        page_count: pages,
    };
    let first = vm.run(vec![w(seed)], &|_, _| {}).expect("guest run")[0].mismatches;
    // And verify everything once more, long after most of it was evicted.
    let again = vm
        .run(
            vec![Workload::Verify {
                seed,
                touches,
                first_page: 0,
                page_count: pages,
            }],
            &|_, _| {},
        )
        .expect("guest run")[0]
        .mismatches;
    first + again
}

#[test]
fn overcommitted_vms_run_to_completion_within_the_global_budget() {
    const BUDGET: u64 = 16 * MIB;
    let faultd = Faultd::start_with_config("[budget]\nglobal_mib = 16\n");
    let rams: Vec<Ram> = (0..3)
        .map(|i| Ram::new(&format!("oc{i}"), 64 * MIB))
        .collect();
    let mut sessions: Vec<_> = rams
        .iter()
        .enumerate()
        .map(|(i, r)| r.serve(&faultd, &format!("oc{i}")))
        .collect();

    // Each guest touches ~11.7 MiB: together more than twice the budget.
    let mismatches: Vec<u32> = std::thread::scope(|s| {
        let hs: Vec<_> = rams
            .iter()
            .enumerate()
            .map(|(i, r)| s.spawn(move || write_verify(r, 40 + i as u32, 3000)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });

    assert_eq!(
        mismatches,
        vec![0, 0, 0],
        "a guest lost data under overcommit"
    );
    let stats: Vec<_> = sessions
        .iter_mut()
        .zip(&rams)
        .map(|(s, r)| resident_settled(s, || r.ram.allocated_bytes().unwrap()))
        .collect();
    let resident: u64 = stats.iter().map(|s| s.resident_bytes).sum();
    let allocated: u64 = rams.iter().map(|r| r.ram.allocated_bytes().unwrap()).sum();
    println!(
        "resident {} KiB of a {} KiB budget; evictions {:?}; store fills {:?}",
        resident / 1024,
        BUDGET / 1024,
        stats.iter().map(|s| s.evictions).collect::<Vec<_>>(),
        stats.iter().map(|s| s.store_fills).collect::<Vec<_>>()
    );
    assert!(resident <= BUDGET, "resident {resident} over the budget");
    assert_eq!(
        allocated, resident,
        "the memfds hold more than faultd accounts for"
    );
    assert!(
        stats
            .iter()
            .all(|s| s.evictions > 0 && s.store_fills > 0 && s.errors == 0),
        "{stats:?}"
    );
}

#[test]
fn a_vm_is_kept_within_its_own_budget() {
    let faultd = Faultd::start_with_config("[budget]\nsession_mib = 4\n");
    let r = Ram::new("small", 32 * MIB);
    let mut session = r.serve(&faultd, "small");

    let mismatches = write_verify(&r, 9, 2500);

    assert_eq!(mismatches, 0);
    // Budget enforcement follows each batch of faults, a moment after their threads woke.
    let st = settled_stats(&mut session, |s| {
        s.resident_bytes <= 4 * MIB && s.evictions >= 1500
    });
    println!(
        "resident {} KiB, evictions {}, store fills {}",
        st.resident_bytes / 1024,
        st.evictions,
        st.store_fills
    );
    assert!(st.resident_bytes <= 4 * MIB, "{st:?}");
    assert!(st.evictions >= 1500, "{st:?}");
    assert_eq!(st.errors, 0);
}

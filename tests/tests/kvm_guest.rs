//! Real KVM guests whose RAM is never pinned or pre-populated: a separately started faultd
//! serves every page the guest touches. The VMM (this test process, through testvmm) never
//! touches guest RAM, so every resident page was faulted in by the guest and filled by faultd.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::time::Duration;

use faultd_client::{Client, RegionSpec};
use faultd_tests::{resident_settled, Faultd, Ram};
use testvmm::{page_sequence, pattern, Vm, Workload};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// A guest run that takes longer fails (a fault faultd never answers must not hang the test).
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

fn distinct_pages(w: &[(u32, u32, u32, u32)]) -> BTreeSet<u32> {
    w.iter()
        .flat_map(|&(seed, touches, first, count)| page_sequence(seed, touches, first, count))
        .collect()
}

/// Reads dword `off` of guest page `page` from the VMM's mapping (the page is resident).
fn host_dword(ram: &Ram, page: u32, off: u64) -> u32 {
    let addr = ram.ram.host_addr() + page as u64 * PAGE + off;
    assert!(addr + 4 <= ram.ram.host_addr() + ram.ram.size());
    // SAFETY: inside the live mapping (checked above), 4-byte aligned; the page is resident so
    // the read does not fault; a volatile read creates no reference.
    unsafe { std::ptr::read_volatile(addr as *const u32) }
}

#[test]
fn one_gib_guest_touching_random_pages_is_served_and_only_those_pages_become_resident() {
    let faultd = Faultd::start(&[]);
    let ram = Ram::new("vm-1g", GIB);
    let mut session = ram.serve(&faultd, "vm-1g");
    let half = (GIB / PAGE / 2) as u32;
    // Two vCPUs, each over its half of the guest's RAM.
    let work = [(0x1234, 6000, 0, half), (0x9876, 6000, half, half)];
    let mut vm = ram.vm(GUEST_TIMEOUT);

    let reports = vm
        .run(
            work.iter()
                .map(
                    |&(seed, touches, first_page, page_count)| Workload::WriteVerify {
                        seed,
                        touches,
                        first_page,
                        page_count,
                    },
                )
                .collect(),
            &|_, _| {},
        )
        .expect("guest run");

    for (i, r) in reports.iter().enumerate() {
        assert_eq!(
            r.mismatches, 0,
            "vCPU {i}: first mismatch at {:?}",
            r.first_mismatch_gpa
        );
        assert_eq!(r.pages, 2 * work[i].1);
    }
    let touched = distinct_pages(&work);
    // Every touched page holds what the guest wrote, as seen through the VMM's own mapping.
    for &(seed, touches, first, count) in &work {
        for p in page_sequence(seed, touches, first, count)
            .into_iter()
            .step_by(17)
        {
            for off in testvmm::dword_offsets() {
                let gpa = p as u64 * PAGE + off;
                assert_eq!(host_dword(&ram, p, off), pattern(gpa, seed), "gpa {gpa:#x}");
            }
        }
    }
    let stats = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    let touched_bytes = touched.len() as u64 * PAGE;
    println!(
        "guest {} MiB, touched {} pages, resident {} MiB (memfd: {} MiB), faults {}, p50 {:.1} us, p99 {:.1} us",
        GIB / MIB,
        touched.len(),
        stats.resident_bytes / MIB,
        ram.ram.allocated_bytes().unwrap() / MIB,
        stats.vcpu_faults,
        stats.latency_us.p50,
        stats.latency_us.p99
    );
    assert_eq!(stats.resident_bytes, touched_bytes);
    assert_eq!(
        ram.ram.allocated_bytes().unwrap(),
        touched_bytes,
        "memfd holds more than the guest touched"
    );
    assert!(
        touched_bytes < GIB / 20,
        "the subset must be small for this check to mean anything"
    );
    assert_eq!(stats.zero_fills, touched.len() as u64);
    assert_eq!(stats.errors, 0);
}

#[test]
fn guest_restored_lazily_from_a_snapshot_sees_exactly_the_files_contents() {
    const SIZE: u64 = 256 * MIB;
    const SEED: u32 = 0xC0FFEE;
    let faultd = Faultd::start(&[]);
    let ram = Ram::new("vm-snap", SIZE);
    let file = faultd_tests::pattern_snapshot(SIZE, SEED);
    let mut session = Client::connect(faultd.socket())
        .unwrap()
        .register(
            "vm-snap",
            &ram.uffd,
            &[RegionSpec::snapshot(0, &ram.ram, 0)],
            Some(file.as_fd()),
        )
        .unwrap();
    let pages = (SIZE / PAGE) as u32;
    // (touches, first page, page count) per vCPU: each verifies random pages of its half.
    let work = [(3000, 0, pages / 2), (3000, pages / 2, pages / 2)];
    let mut vm = ram.vm(GUEST_TIMEOUT);
    // The Verify workload's seed picks the pages and the expected pattern alike.
    let verify = |vm: &mut Vm, seed: u32| {
        vm.run(
            work.iter()
                .map(|&(touches, first_page, page_count)| Workload::Verify {
                    seed,
                    touches,
                    first_page,
                    page_count,
                })
                .collect(),
            &|_, _| {},
        )
        .expect("guest run")
    };

    let reports = verify(&mut vm, SEED);

    for r in &reports {
        assert_eq!(
            r.mismatches, 0,
            "first mismatch at {:?}",
            r.first_mismatch_gpa
        );
    }
    let touched: BTreeSet<u32> = work
        .iter()
        .flat_map(|&(t, first, count)| page_sequence(SEED, t, first, count))
        .collect();
    // Whole pages, not just the dwords the guest checked, equal the file.
    use std::os::unix::fs::FileExt;
    let mut want = vec![0u8; PAGE as usize];
    for &p in touched.iter().step_by(5) {
        file.read_exact_at(&mut want, p as u64 * PAGE).unwrap();
        let got: Vec<u8> = (0..PAGE / 4)
            .flat_map(|i| host_dword(&ram, p, i * 4).to_le_bytes())
            .collect();
        assert!(got == want, "page {p} differs from the snapshot");
    }
    let stats = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    assert_eq!(stats.file_fills, touched.len() as u64);
    assert_eq!(stats.resident_bytes, touched.len() as u64 * PAGE);
    assert_eq!(
        ram.ram.allocated_bytes().unwrap(),
        touched.len() as u64 * PAGE
    );

    // The check can fail: verified against another seed's pattern, the snapshot mismatches.
    let wrong = verify(&mut vm, SEED + 1);
    assert!(wrong.iter().all(|r| r.mismatches > 0));
}

#[test]
fn one_faultd_serves_two_vms_at_once() {
    let faultd = Faultd::start(&[]);
    let rams = [Ram::new("vm-a", 256 * MIB), Ram::new("vm-b", 256 * MIB)];
    let mut sessions: Vec<_> = rams
        .iter()
        .zip(["vm-a", "vm-b"])
        .map(|(r, name)| r.serve(&faultd, name))
        .collect();
    let pages = (256 * MIB / PAGE) as u32;

    let reports: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = rams
            .iter()
            .enumerate()
            .map(|(i, r)| {
                s.spawn(move || {
                    r.vm(GUEST_TIMEOUT)
                        .run(
                            vec![Workload::WriteVerify {
                                seed: 100 + i as u32,
                                touches: 4000,
                                first_page: 0,
                                page_count: pages,
                            }],
                            &|_, _| {},
                        )
                        .expect("guest run")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    for (i, r) in reports.iter().enumerate() {
        assert_eq!(r[0].mismatches, 0, "VM {i}");
        let touched: BTreeSet<u32> = page_sequence(100 + i as u32, 4000, 0, pages)
            .into_iter()
            .collect();
        let stats = resident_settled(&mut sessions[i], || rams[i].ram.allocated_bytes().unwrap());
        assert_eq!(stats.zero_fills, touched.len() as u64, "VM {i}");
        assert_eq!(
            rams[i].ram.allocated_bytes().unwrap(),
            touched.len() as u64 * PAGE
        );
    }
    assert_ne!(sessions[0].id(), sessions[1].id());
}

//! Guest RAM on 2 MiB hugetlbfs pages: faultd fills whole huge pages (UFFDIO_COPY of 2 MiB;
//! hugetlbfs has no UFFDIO_ZEROPAGE) for a real KVM guest.

use std::collections::BTreeSet;
use std::time::Duration;

use faultd_client::RamPageSize;
use faultd_tests::{Faultd, HugePages, Ram};
use testvmm::{page_sequence, RamSlot, Vm, Workload};

const MIB: u64 = 1 << 20;
const HUGE: u64 = 2 * MIB;

#[test]
fn kvm_guest_on_2mib_hugetlb_ram_gets_whole_huge_pages_from_faultd() {
    const SIZE: u64 = 128 * MIB;
    let _reserved = HugePages::reserve(SIZE / HUGE);
    let faultd = Faultd::start(&[]);
    let ram = Ram::with_page_size("vm-huge", SIZE, RamPageSize::Size2M);
    let mut session = ram.serve(&faultd, "vm-huge");
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.ram.host_ptr(),
        size: SIZE,
    }])
    .unwrap();
    vm.set_timeout(Some(Duration::from_secs(120)));
    // The guest works in the first half of RAM only: the second half's huge pages must stay
    // absent.
    let small_pages = (SIZE / 4096 / 2) as u32;

    let reports = vm
        .run(
            vec![Workload::WriteVerify {
                seed: 3,
                touches: 300,
                first_page: 0,
                page_count: small_pages,
            }],
            &|_, _| {},
        )
        .unwrap();

    assert_eq!(reports[0].mismatches, 0);
    let huge_touched: BTreeSet<u64> = page_sequence(3, 300, 0, small_pages)
        .into_iter()
        .map(|p| p as u64 * 4096 / HUGE)
        .collect();
    let stats = faultd_tests::settled_stats(&mut session, |s| {
        s.zero_fills + s.already_present >= huge_touched.len() as u64
            && s.resident_bytes == ram.ram.allocated_bytes().unwrap()
    });
    println!("{stats:?}");
    assert_eq!(stats.zero_fills, huge_touched.len() as u64);
    assert_eq!(stats.resident_bytes, huge_touched.len() as u64 * HUGE);
    assert_eq!(
        ram.ram.allocated_bytes().unwrap(),
        huge_touched.len() as u64 * HUGE
    );
    assert!(
        huge_touched.len() < (SIZE / HUGE) as usize,
        "the guest must leave some huge pages untouched"
    );
}

//! Pinned mode (a device that cannot fault): a real faultd process, a snapshot-backed VM with a
//! real KVM guest, and the emulated device (`testvmm::PriDevice`) whose IOMMU table faultd
//! maps. The device is attached with the pinned queue, so its page-request ring is never
//! handed to faultd: a DMA that missed a mapping would raise a request nobody answers and
//! fail with a timeout. Every DMA here must therefore find its mapping already in place.

use std::time::Duration;

use faultd_client::{ClientError, DeviceQueue, Session};
use faultd_proto::{DmaRange, ErrorCode};
use faultd_tests::{Faultd, Ram};
use testvmm::{page_sequence, pattern, DeviceConfig, PriDevice, VcpuReport, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Guest RAM: the first half is DMA-able (pinned), the second half is the guest's only.
const SIZE: u64 = 64 * MIB;
const PINNED: u64 = SIZE / 2;
const SEED: u32 = 0x5EED_0016;
/// A guest run that takes longer fails (a fault faultd never answers must not hang the test).
const GUEST_TIMEOUT: Duration = Duration::from_secs(20);
const DEV_ID: u32 = 9;

/// A VM restored lazily from a snapshot, served by `faultd`.
struct Setup {
    // Drop order: the device before the session, the session before the RAM.
    dev: PriDevice,
    session: Session,
    ram: Ram,
    _snapshot: std::fs::File,
}

fn setup(faultd: &Faultd, vm: &str) -> Setup {
    let ram = Ram::new(vm, SIZE);
    let snapshot = faultd_tests::pattern_snapshot(SIZE, SEED);
    let session = ram.serve_snapshot(faultd, vm, &snapshot);
    let cfg = DeviceConfig {
        dev_id: DEV_ID,
        // No one answers page requests: a miss must fail fast, not hang the test.
        response_timeout: Duration::from_millis(500),
        ..DeviceConfig::default()
    };
    // SAFETY: the RAM outlives the device (field order above), and nothing in the test holds
    // a Rust reference into guest RAM.
    let dev = unsafe { PriDevice::new(ram.ram.host_ptr(), 0, ram.ram.size(), cfg) }
        .expect("creating the device");
    Setup {
        dev,
        session,
        ram,
        _snapshot: snapshot,
    }
}

fn pin(s: &mut Setup, ranges: &[DmaRange]) -> Result<u64, ClientError> {
    s.session.add_device(
        DEV_ID,
        DeviceQueue::Pinned {
            ranges: Some(ranges),
        },
        s.dev.fds().iommu(),
    )
}

const HALF: DmaRange = DmaRange {
    gpa: 0,
    size: PINNED,
};

fn check_guest(reports: &[VcpuReport], what: &str) {
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(
            r.mismatches, 0,
            "{what}: vCPU {i} first mismatch at {:?}",
            r.first_mismatch_gpa
        );
    }
}

/// Reads `[0, len)` through the device and returns the first dword that is not the
/// snapshot's (None: all are).
fn first_dma_mismatch(dev: &PriDevice, len: u64, seed: u32) -> Option<u64> {
    let mut buf = vec![0u8; MIB as usize];
    for chunk in 0..len / MIB {
        let gpa = chunk * MIB;
        dev.dma_read(0, gpa, &mut buf)
            .unwrap_or_else(|e| panic!("device read at {gpa:#x}: {e}"));
        // Every dword of it.
        for o in (0..MIB).step_by(4) {
            let got = u32::from_le_bytes(buf[o as usize..o as usize + 4].try_into().unwrap());
            if got != pattern(gpa + o, seed) {
                return Some(gpa + o);
            }
        }
    }
    None
}

#[test]
fn pinned_attach_fills_from_the_snapshot_and_maps_before_device_added() {
    let faultd = Faultd::start(&[]);
    let mut s = setup(&faultd, "vm-pin-fill");

    let mapped = pin(&mut s, &[HALF]).expect("pinned add_device");

    // Before anything else ran: every granule of the range translates, nothing beyond it.
    assert_eq!(mapped, 64 * 1024, "the granule faultd maps at");
    assert!(
        s.dev.translates(0, 0, PINNED, true).unwrap(),
        "pinned range not all mapped"
    );
    assert!(!s.dev.translates(0, PINNED, 64 * 1024, false).unwrap());
    let st = s.session.stats().unwrap();
    assert_eq!(st.device.mapped_bytes, PINNED, "{st:?}");
    assert_eq!(st.resident_bytes, PINNED, "{st:?}");
    assert_eq!(
        st.file_fills,
        PINNED / PAGE,
        "filled from the snapshot: {st:?}"
    );
    assert_eq!(st.vcpu_faults, 0);
    assert_eq!(s.ram.ram.allocated_bytes().unwrap(), PINNED);

    // The device reads the snapshot's bytes without one page request.
    assert_eq!(first_dma_mismatch(&s.dev, PINNED, SEED), None);
    // ... and writes pages the guest then reads; the guest also reads the unpinned half,
    // restored lazily from the snapshot by vCPU faults as before.
    let seed2 = SEED ^ 0xFFFF;
    let pinned_pages = (PINNED / PAGE) as u32;
    let written: Vec<u32> = page_sequence(seed2, 1000, 0, pinned_pages);
    for &p in &written {
        let gpa = u64::from(p) * PAGE;
        let data: Vec<u8> = (0..PAGE / 4)
            .flat_map(|i| pattern(gpa + 4 * i, seed2).to_le_bytes())
            .collect();
        s.dev.dma_write(1, gpa, &data).expect("device write");
    }
    let ds = s.dev.stats();
    assert_eq!(
        (ds.requests, ds.timeouts, ds.failed_transfers),
        (0, 0, 0),
        "{ds:?}"
    );
    let mut vm = s.ram.vm(GUEST_TIMEOUT);
    let reports = vm
        .run(
            vec![
                Workload::Verify {
                    seed: seed2,
                    touches: 1000,
                    first_page: 0,
                    page_count: pinned_pages,
                },
                Workload::Verify {
                    seed: SEED,
                    touches: 1000,
                    first_page: pinned_pages,
                    page_count: pinned_pages,
                },
            ],
            &|_, _| {},
        )
        .expect("guest run");
    check_guest(&reports, "guest reads of device writes / of the snapshot");
    let st = s.session.stats().unwrap();
    assert!(
        st.vcpu_faults > 0,
        "the unpinned half is served by faults: {st:?}"
    );
    assert!(st.resident_bytes > PINNED);
    assert_eq!(st.device.mapped_bytes, PINNED);
    assert_eq!((st.errors, st.device.groups), (0, 0), "{st:?}");
}

#[test]
fn eviction_and_budget_enforcement_pass_over_pinned_pages() {
    // High watermark 90 % of 40 MiB = 36 MiB: the pinned 32 MiB fit, a guest touching most
    // of the other half does not; the low watermark (70 %: 28 MiB) is below the pinned
    // bytes, so enforcement would take pinned pages too if it did not pass over them.
    let faultd = Faultd::start_with_config("[budget]\nsession_mib = 40\n");
    let mut s = setup(&faultd, "vm-pin-evict");
    pin(&mut s, &[HALF]).expect("pinned add_device");
    let pinned_pages = (PINNED / PAGE) as u32;
    let mut vm = s.ram.vm(GUEST_TIMEOUT);
    let reports = vm
        .run(
            vec![Workload::Verify {
                seed: SEED,
                touches: 3 * pinned_pages,
                first_page: pinned_pages,
                page_count: pinned_pages,
            }],
            &|_, _| {},
        )
        .expect("guest run");
    check_guest(&reports, "guest over the unpinned half");
    let st = s.session.stats().unwrap();
    assert!(st.evictions > 0, "the budget was enforced: {st:?}");
    assert_eq!(st.device.mapped_bytes, PINNED, "{st:?}");
    assert!(st.resident_bytes >= PINNED, "{st:?}");

    // An eviction request over all RAM evicts what is not pinned, and nothing pinned.
    let (evicted, _, failed) = s.session.evict(0, SIZE, None).expect("evict");
    assert!(evicted > 0);
    assert_eq!(failed, 0);
    let st = s.session.stats().unwrap();
    assert_eq!(
        st.resident_bytes, PINNED,
        "only the pinned pages stay: {st:?}"
    );
    assert_eq!(s.ram.ram.allocated_bytes().unwrap(), PINNED);
    assert!(s.dev.translates(0, 0, PINNED, true).unwrap());
    // The device still reads the snapshot's bytes: had a pinned page been evicted and read
    // back through the VMM's mapping, the read would have raised a vCPU-side fault.
    let faults = st.vcpu_faults;
    assert_eq!(first_dma_mismatch(&s.dev, PINNED, SEED), None);
    assert_eq!(s.session.stats().unwrap().vcpu_faults, faults);
    assert_eq!(s.dev.stats().requests, 0);
}

#[test]
fn a_pinned_attach_over_the_pin_limit_is_refused_with_nothing_mapped() {
    let faultd = Faultd::start_with_config("[device]\npin_limit_mib = 16\n");
    let mut s = setup(&faultd, "vm-pin-limit");

    let err = pin(&mut s, &[HALF]).expect_err("32 MiB over a 16 MiB pin limit");

    let ClientError::Refused { code, message } = err else {
        panic!("not a refusal: {err:?}");
    };
    assert_eq!(code, ErrorCode::PinLimit, "{message}");
    assert!(
        message.contains(&PINNED.to_string()) && message.contains(&(16 * MIB).to_string()),
        "the numbers: {message}"
    );
    let st = s.session.stats().unwrap();
    assert_eq!(
        (st.device.mapped_bytes, st.resident_bytes),
        (0, 0),
        "{st:?}"
    );
    assert!(!s.dev.translates(0, 0, 64 * 1024, false).unwrap());
    // The session goes on, and a range within the limit is accepted (the dev_id is free).
    let within = DmaRange {
        gpa: 0,
        size: 16 * MIB,
    };
    pin(&mut s, &[within]).expect("16 MiB within the limit");
    assert_eq!(s.session.stats().unwrap().device.mapped_bytes, 16 * MIB);
}

#[test]
fn all_vms_pinned_devices_together_are_held_to_pin_total() {
    // 48 MiB for all VMs: one VM's 32 MiB fits, a second one's does not until the first gives
    // its pages back (its device removed, or its session ended).
    let faultd = Faultd::start_with_config("[device]\npin_total_mib = 48\n");
    let mut a = setup(&faultd, "vm-pin-total-a");
    let mut b = setup(&faultd, "vm-pin-total-b");
    pin(&mut a, &[HALF]).expect("32 MiB of 48");
    assert_eq!(faultd.metric("faultd_device_pin_total_bytes"), 48 * MIB);
    assert_eq!(faultd.metric("faultd_pinned_bytes"), 32 * MIB);

    let refused = |r: Result<u64, ClientError>| match r {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::PinLimit, "{message}");
            message
        }
        other => panic!("expected a pin_limit refusal, got {other:?}"),
    };
    let message = refused(pin(&mut b, &[HALF]));
    assert!(
        message.contains("device.pin_total_mib") && message.contains(&(48 * MIB).to_string()),
        "{message}"
    );
    assert_eq!(b.session.stats().unwrap().device.mapped_bytes, 0);
    // What fits beside it is accepted; what was refused held nothing.
    let sixteen = DmaRange {
        gpa: 0,
        size: 16 * MIB,
    };
    pin(&mut b, &[sixteen]).expect("16 MiB fits beside 32");
    assert_eq!(faultd.metric("faultd_pinned_bytes"), 48 * MIB);
    b.session.remove_device(DEV_ID).expect("remove_device");
    assert_eq!(faultd.metric("faultd_pinned_bytes"), 32 * MIB);

    // Removing a device gives its bytes back.
    a.session.remove_device(DEV_ID).expect("remove_device");
    pin(&mut b, &[HALF]).expect("32 MiB once the first VM's device is gone");

    // So does a VM that ends with its device attached.
    let mut c = setup(&faultd, "vm-pin-total-c");
    refused(pin(&mut c, &[HALF]));
    drop(b);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match pin(&mut c, &[HALF]) {
            Ok(granule) => {
                assert_eq!(granule, 64 * 1024);
                assert_eq!(c.session.stats().unwrap().device.mapped_bytes, PINNED);
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                refused(Err(e));
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("the ended VM's pinned bytes were never given back: {e:?}"),
        }
    }
}

#[test]
fn removing_a_pinned_device_unmaps_and_unpins() {
    let faultd = Faultd::start(&[]);
    let mut s = setup(&faultd, "vm-pin-detach");
    pin(&mut s, &[HALF]).expect("pinned add_device");
    let (evicted, _, _) = s.session.evict(0, PINNED, None).expect("evict");
    assert_eq!(evicted, 0, "pinned pages evicted");

    let unmapped = s.session.remove_device(DEV_ID).expect("remove_device");

    assert_eq!(unmapped, PINNED);
    assert!(!s.dev.translates(0, 0, 64 * 1024, false).unwrap());
    assert_eq!(s.session.stats().unwrap().device.mapped_bytes, 0);
    let (evicted, _, failed) = s.session.evict(0, PINNED, None).expect("evict");
    assert_eq!((evicted, failed), (PINNED / PAGE, 0));
    assert_eq!(s.session.stats().unwrap().resident_bytes, 0);
    // Removing it again is refused, and the session goes on.
    assert!(s.session.remove_device(DEV_ID).is_err());
    assert_eq!(s.session.stats().unwrap().resident_bytes, 0);

    // The same device attached again in the same session is pinned and mapped again. This hung
    // once: the second `add_device` was never answered.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = pin(&mut s, &[HALF]).map_err(|e| e.to_string());
        let _ = tx.send((r, s));
    });
    let (r, mut s) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the second add_device of the same device got no answer in 60 s");
    assert_eq!(r, Ok(64 * 1024), "re-add");
    assert!(s.dev.translates(0, 0, PINNED, true).unwrap());
    assert_eq!(s.session.stats().unwrap().device.mapped_bytes, PINNED);
    assert_eq!(first_dma_mismatch(&s.dev, PINNED, SEED), None);
}

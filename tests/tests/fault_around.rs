//! Fault-around (config `[around]`): sequential fault streams served ahead, from real KVM guests
//! and the emulated PRI device, each against a faultd with fault-around off in the same test.
//! Every check compares what the guest or device reads back with what it wrote (or the file /
//! zero it must read), and the faults or page-request groups it took.

use std::os::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use faultd_client::{Client, GuestRam, RegionSpec};
use faultd_proto::SessionStats;
use faultd_tests::{pattern_page, read_with_timeout, resident_settled, settled_stats, Faultd, Ram};
use testvmm::{page_sequence, pattern, DeviceConfig, PriDevice, VcpuReport, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const GRANULE: u64 = 64 * 1024;
const ON: &str = "[around]\nenabled = true\n";
const OFF: &str = "[around]\nenabled = false\n";
const T: Duration = Duration::from_secs(20);

fn run(vm: &mut Vm, w: Workload) -> VcpuReport {
    let mut r = vm.run(vec![w], &|_, _| {}).expect("guest run");
    r.pop().unwrap()
}

fn check(r: &VcpuReport, pages: u32, what: &str) {
    assert_eq!(
        r.mismatches, 0,
        "{what}: first mismatch at {:?}",
        r.first_mismatch_gpa
    );
    assert_eq!(r.pages, pages, "{what}: pages visited");
}

/// Reads dword `off` of page `page` from the VMM's mapping (faulting it in through faultd if
/// absent, from a helper thread with a timeout).
fn host_dwords(ram: &GuestRam, pages: impl Iterator<Item = u64>) -> Vec<u32> {
    let offs: Vec<u64> = pages
        .flat_map(|p| testvmm::dword_offsets().map(move |o| p * PAGE + o))
        .flat_map(|a| a..a + 4)
        .collect();
    read_with_timeout(ram, offs, T)
        .chunks(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// A guest writing then verifying every dword of `pages` fresh pages in ascending order, under
/// a faultd started with `config`. Returns its stats once settled.
fn sequential_guest(config: &str, vm_name: &str, pages: u32) -> (SessionStats, Duration) {
    let faultd = Faultd::start_with_config(config);
    let ram = Ram::new(vm_name, 2 * u64::from(pages) * PAGE);
    let mut session = ram.serve(&faultd, vm_name);
    let mut vm = ram.vm(T);
    let seed = 0x5EC0;
    let t = Instant::now();

    let r = run(
        &mut vm,
        Workload::WriteVerifySequential {
            seed,
            first_page: 0,
            page_count: pages,
        },
    );

    let took = t.elapsed();
    check(&r, 2 * pages, vm_name);
    // What the guest wrote is in the memfd, seen through the VMM's own mapping.
    let step = (pages / 64).max(1) as u64;
    let sample: Vec<u64> = (0..u64::from(pages)).step_by(step as usize).collect();
    let got = host_dwords(&ram.ram, sample.iter().copied());
    let want: Vec<u32> = sample
        .iter()
        .flat_map(|&p| testvmm::dword_offsets().map(move |o| pattern(p * PAGE + o, seed)))
        .collect();
    assert!(
        got == want,
        "{vm_name}: the VMM's mapping differs from the guest's writes"
    );
    let stats = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    assert_eq!(stats.errors, 0, "{vm_name}");
    (stats, took)
}

#[test]
fn a_guest_streaming_through_fresh_memory_takes_an_eighth_of_the_faults_with_fault_around() {
    const PAGES: u32 = 8192; // 32 MiB

    let (off, off_took) = sequential_guest(OFF, "vm-seq-off", PAGES);
    let (on, on_took) = sequential_guest(ON, "vm-seq-on", PAGES);

    println!(
        "32 MiB sequential write+verify: off {} faults in {off_took:.2?}, on {} faults + {} \
         pages ahead in {} look-aheads ({} cut short) in {on_took:.2?}; resident on {} MiB",
        off.vcpu_faults,
        on.vcpu_faults,
        on.around.vcpu_pages,
        on.around.vcpu_rounds,
        on.around.stopped,
        on.resident_bytes / MIB
    );
    // Off: every page faulted once, nothing served ahead.
    assert_eq!(off.vcpu_faults, u64::from(PAGES));
    assert_eq!(off.around, Default::default());
    assert!(
        on.vcpu_faults * 8 <= off.vcpu_faults,
        "{} faults with fault-around, {} without",
        on.vcpu_faults,
        off.vcpu_faults
    );
    // Pages served ahead are counted apart from faults, and every page was one or the other.
    assert!(on.around.vcpu_pages > 0);
    assert_eq!(
        on.vcpu_faults + on.around.vcpu_pages,
        on.resident_bytes / PAGE
    );
    // The look-ahead stays within reach of the stream: at most one window (1 MiB) past it.
    assert!(on.resident_bytes <= u64::from(PAGES) * PAGE + MIB);
}

/// A guest writing then verifying `touches` pseudo-random pages under `config`.
fn random_guest(config: &str, vm_name: &str) -> SessionStats {
    const PAGES: u32 = 16384;
    const TOUCHES: u32 = 3000;
    let faultd = Faultd::start_with_config(config);
    let ram = Ram::new(vm_name, u64::from(PAGES) * PAGE);
    let mut session = ram.serve(&faultd, vm_name);
    let mut vm = ram.vm(T);

    let r = run(
        &mut vm,
        Workload::WriteVerify {
            seed: 0xD1CE,
            touches: TOUCHES,
            first_page: 0,
            page_count: PAGES,
        },
    );

    check(&r, 2 * TOUCHES, vm_name);
    let distinct: std::collections::BTreeSet<u32> = page_sequence(0xD1CE, TOUCHES, 0, PAGES)
        .into_iter()
        .collect();
    let stats = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    assert_eq!(stats.vcpu_faults, distinct.len() as u64, "{vm_name}");
    assert_eq!(stats.errors, 0, "{vm_name}");
    stats
}

#[test]
fn a_guest_touching_random_pages_gets_no_look_ahead_and_the_same_faults() {
    let off = random_guest(OFF, "vm-rand-off");
    let on = random_guest(ON, "vm-rand-on");

    println!(
        "random: off {} faults, on {} faults, {} pages ahead",
        off.vcpu_faults, on.vcpu_faults, on.around.vcpu_pages
    );
    assert_eq!(on.vcpu_faults, off.vcpu_faults);
    assert_eq!(on.around.vcpu_rounds, 0);
    assert_eq!(on.around.vcpu_pages, 0);
    assert_eq!(on.resident_bytes, off.resident_bytes);
}

/// The emulated PRI device DMA-writes `mib` MiB in 256 KiB transfers in ascending order, then
/// reads it all back; under `config`. Returns faultd's stats and the device's group count.
fn device_stream(config: &str, vm_name: &str, mib: u64) -> (SessionStats, u64) {
    let faultd = Faultd::start_with_config(config);
    let ram = Ram::new(vm_name, 64 * MIB);
    let mut session = ram.serve(&faultd, vm_name);
    // SAFETY: the RAM is declared before the device and outlives it; nothing holds a Rust
    // reference into guest RAM.
    let dev = unsafe {
        PriDevice::new(
            ram.ram.host_ptr(),
            0,
            ram.ram.size(),
            DeviceConfig::default(),
        )
    }
    .expect("creating the device");
    dev.attach(&mut session).expect("add_device");
    let seed = 0xD3A;
    let chunk = 256 * 1024;
    let data: Vec<u8> = (0..mib * MIB / PAGE)
        .flat_map(|p| pattern_page(p * PAGE, seed))
        .collect();

    for (i, c) in data.chunks(chunk).enumerate() {
        dev.dma_write(0, (i * chunk) as u64, c).expect("DMA write");
    }

    let written = dev.stats().groups;
    let mut back = vec![0u8; data.len()];
    for (i, c) in back.chunks_mut(chunk).enumerate() {
        dev.dma_read(0, (i * chunk) as u64, c).expect("DMA read");
    }
    assert!(
        back == data,
        "{vm_name}: read back differs from what was written"
    );
    let ds = dev.stats();
    assert_eq!(
        (ds.invalid, ds.stray_responses, ds.unmapped_after_success),
        (0, 0, 0)
    );
    let stats = settled_stats(&mut session, |s| s.device.success == ds.success);
    assert_eq!(stats.errors, 0, "{vm_name}");
    println!(
        "{vm_name}: {mib} MiB DMA: {written} groups writing, {} in all; {} granules ahead in {} \
         look-aheads ({} cut short), mapped {} MiB, pin evictions {}",
        ds.groups,
        stats.around.device_granules,
        stats.around.device_rounds,
        stats.around.stopped,
        stats.device.mapped_bytes / MIB,
        stats.device.pin_evictions
    );
    (stats, ds.groups)
}

#[test]
fn a_device_streaming_dma_sends_an_eighth_of_the_page_request_groups_with_fault_around() {
    let (off, off_groups) = device_stream(OFF, "vm-dma-off", 16);
    let (on, on_groups) = device_stream(ON, "vm-dma-on", 16);

    // Off: one group per 64 KiB granule.
    assert_eq!(off_groups, 16 * MIB / GRANULE);
    assert!(
        on_groups * 8 <= off_groups,
        "{on_groups} groups with fault-around, {off_groups} without"
    );
    assert!(on.around.device_granules > 0);
    assert_eq!(off.around, Default::default());
}

#[test]
fn device_look_ahead_only_uses_free_pin_room_and_the_pin_limit_holds() {
    let config = format!("{ON}[device]\npin_limit_mib = 4\n");

    let (on, _) = device_stream(&config, "vm-dma-pin", 16);

    assert!(
        on.device.mapped_bytes <= 4 * MIB,
        "{} bytes mapped",
        on.device.mapped_bytes
    );
    // The stream outgrew the limit: granules were unmapped by the demand path, and the
    // look-ahead, finding no free room, stopped instead of unmapping any.
    assert!(on.device.pin_evictions > 0);
    assert!(on.around.device_granules > 0);
    assert!(on.around.stopped > 0);
}

/// MADV_REMOVE of `pages` pages from `first` (a balloon's discard). It returns once faultd has
/// read the REMOVE event.
fn discard(ram: &GuestRam, first: u64, pages: u64) {
    let (addr, len) = (ram.host_addr() + first * PAGE, pages * PAGE);
    assert!((first + pages) * PAGE <= ram.size());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: the range lies inside the live shared mapping of guest RAM (checked above);
        // MADV_REMOVE drops its pages and no Rust reference points into guest RAM.
        let rc = unsafe { libc::madvise(addr as *mut _, len as usize, libc::MADV_REMOVE) };
        let _ = tx.send((rc, std::io::Error::last_os_error()));
    });
    let (rc, err) = rx
        .recv_timeout(T)
        .expect("MADV_REMOVE did not return in time");
    assert_eq!(rc, 0, "MADV_REMOVE: {err}");
}

#[test]
fn a_discarded_range_in_the_look_ahead_window_reads_zero_afterwards() {
    const SIZE: u64 = 16 * MIB;
    const FILE_SEED: u32 = 0xF11E;
    let faultd = Faultd::start_with_config(ON);
    let ram = Ram::new("vm-discard", SIZE);
    let file = faultd_tests::pattern_snapshot(SIZE, FILE_SEED);
    let mut session = Client::connect(faultd.socket())
        .unwrap()
        .register(
            "vm-discard",
            &ram.uffd,
            &[RegionSpec::snapshot(0, &ram.ram, 0)],
            Some(file.as_fd()),
        )
        .unwrap();
    let mut vm = ram.vm(T);
    // Pages 256..512 are discarded before anyone touched them: they read zero from now on.
    discard(&ram.ram, 256, 256);

    // The guest streams through 0..256, right up to the discarded range: the look-ahead
    // reaches into it.
    let r = run(
        &mut vm,
        Workload::WriteVerifySequential {
            seed: 0x6E57,
            first_page: 0,
            page_count: 256,
        },
    );
    check(&r, 512, "guest");
    let st = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    let ahead_into_discarded = st.resident_bytes / PAGE - 256;
    // Then it streams through 1024..1280 (file pages), served ahead up to 1280 + a window,
    // and pages 1280..1536 are discarded after they were served ahead.
    let r = run(
        &mut vm,
        Workload::WriteVerifySequential {
            seed: 0x6E57,
            first_page: 1024,
            page_count: 256,
        },
    );
    check(&r, 512, "guest");
    let st2 = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    let ahead_past_second = st2.resident_bytes / PAGE - st.resident_bytes / PAGE - 256;
    // Pages served ahead from the snapshot (runs copied in one ioctl) hold the file's contents.
    let ahead = host_dwords(&ram.ram, 1280..1280 + ahead_past_second);
    let want: Vec<u32> = (1280..1280 + ahead_past_second)
        .flat_map(|p| testvmm::dword_offsets().map(move |o| pattern(p * PAGE + o, FILE_SEED)))
        .collect();
    assert!(
        ahead == want,
        "a page served ahead differs from the snapshot"
    );
    let unfaulted = settled_stats(&mut session, |_| true);
    assert_eq!(
        unfaulted.vcpu_faults, st2.vcpu_faults,
        "reading them faulted"
    );
    discard(&ram.ram, 1280, 256);

    println!(
        "{ahead_into_discarded} pages served ahead into the range discarded before, \
         {ahead_past_second} into the one discarded after; {} pages ahead in all",
        st2.around.vcpu_pages
    );
    // The checks below look at pages the look-ahead did reach.
    assert!(ahead_into_discarded > 0 && ahead_past_second > 0);
    let zeros = host_dwords(&ram.ram, (256..512).chain(1280..1536));
    assert!(
        zeros.iter().all(|&d| d == 0),
        "a discarded page reads non-zero: {} dwords",
        zeros.iter().filter(|&&d| d != 0).count()
    );
    // Past both: the snapshot's contents, as ever.
    let file_pages = host_dwords(&ram.ram, 2048..2056);
    let want: Vec<u32> = (2048..2056u64)
        .flat_map(|p| testvmm::dword_offsets().map(move |o| pattern(p * PAGE + o, FILE_SEED)))
        .collect();
    assert!(file_pages == want);
    let st3 = session.stats().unwrap();
    assert_eq!(st3.errors, 0);
}

#[test]
fn a_guest_streaming_under_a_budget_keeps_every_write_and_look_ahead_stops_at_the_watermark() {
    const PAGES: u32 = 8192; // 32 MiB through a 16 MiB budget
    let config = format!("{ON}[budget]\nsession_mib = 16\n");
    let faultd = Faultd::start_with_config(&config);
    let ram = Ram::new("vm-budget", u64::from(PAGES) * PAGE);
    let mut session = ram.serve(&faultd, "vm-budget");
    let mut vm = ram.vm(T);

    let r = run(
        &mut vm,
        Workload::WriteVerifySequential {
            seed: 0xB0D6,
            first_page: 0,
            page_count: PAGES,
        },
    );

    // The verify pass found every write, though most pages went to the store and came back.
    check(&r, 2 * PAGES, "guest");
    let st = session.stats().unwrap();
    println!(
        "budget 16 MiB, 32 MiB streamed: {} faults, {} pages ahead ({} cut short), {} \
         evictions, {} store fills, resident {} MiB",
        st.vcpu_faults,
        st.around.vcpu_pages,
        st.around.stopped,
        st.evictions,
        st.store_fills,
        st.resident_bytes / MIB
    );
    assert!(st.evictions > 0 && st.store_fills > 0);
    assert!(st.around.vcpu_pages > 0);
    assert!(st.around.stopped > 0, "look-ahead never met the watermark");
    assert!(st.resident_bytes <= 16 * MIB);
    assert_eq!(st.errors, 0);
}

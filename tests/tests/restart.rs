//! Crash and restart without loss: faultd is killed with SIGKILL, three times, while a KVM
//! guest on two vCPUs and the emulated PRI device write and verify data across unpinned RAM
//! that a memory budget keeps evicting to faultd's store. Each time a new faultd is started on
//! the same socket and store directory (as systemd's `Restart=` would), and the VMM's
//! `faultd_client::Supervisor` registers the VM again with `resume`: the new faultd finds the
//! evicted pages in the store, and the vCPU and DMA threads that were blocked on the dead one
//! are released.
//!
//! Checked: every guest round verifies (no lost write, no stale read across a crash), the
//! device reads back every page it wrote, no DMA transfer fails or times out, the guest's last
//! round still verifies after the last restart, the new faultd did take pages from the store,
//! and its accounting equals guest memory. The stall the guest saw is printed.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultd_client::{Client, ClientError, Reattach, RegionSpec, Session, Supervisor};
use faultd_tests::{device_round, pattern_page, Faultd, Ram};
use testvmm::{pattern, DeviceConfig, PriDevice, RamSlot, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const RAM: u64 = 48 * MIB;
const BUDGET_MIB: u64 = 12;
const KILLS: usize = 3;
const VM: &str = "restart";

/// The VMM's side of a lost session.
struct Hooks {
    ram: Arc<Ram>,
    device: Arc<PriDevice>,
}

impl Reattach for Hooks {
    fn lost(&mut self) {
        self.device.reset_pri().expect("PRI reset");
    }

    fn resume(&mut self, client: Client) -> Result<Session, ClientError> {
        let mut s = client.resume(
            VM,
            &self.ram.uffd,
            &[RegionSpec::zero(0, &self.ram.ram)],
            None,
        )?;
        self.device.attach(&mut s)?;
        Ok(s)
    }
}

#[test]
fn a_guest_and_a_device_lose_nothing_when_faultd_is_killed_and_restarted() {
    let mut faultd = Faultd::start_with_config(&format!("[budget]\nglobal_mib = {BUDGET_MIB}\n"));
    let ram = Arc::new(Ram::new(VM, RAM));
    let mut session = ram.serve(&faultd, VM);
    // SAFETY: the device lives in an Arc dropped (below) before `ram`'s last owner is; this
    // test holds no Rust reference into guest RAM.
    let device = Arc::new(
        unsafe {
            PriDevice::new(
                ram.ram.host_ptr(),
                0,
                RAM,
                DeviceConfig {
                    workers: 2,
                    response_timeout: Duration::from_secs(60),
                    ..DeviceConfig::default()
                },
            )
        }
        .expect("device"),
    );
    device.attach(&mut session).expect("attach device");
    let sup = Supervisor::spawn(
        faultd.socket(),
        session,
        Hooks {
            ram: ram.clone(),
            device: device.clone(),
        },
    )
    .unwrap();

    let pages = (RAM / PAGE) as u32;
    let third = pages / 3;
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.ram.host_ptr(),
        size: RAM,
    }])
    .unwrap();
    vm.set_timeout(Some(Duration::from_secs(300)));
    vm.set_progress_interval(32);
    let round = |r: u32, i: u32| Workload::WriteVerify {
        seed: 1000 * r + i,
        touches: 1500,
        first_page: i * third,
        page_count: third,
    };

    let stop = AtomicBool::new(false);
    let guest_rounds = AtomicU32::new(0);
    let device_rounds = AtomicU32::new(0);
    let progress: Mutex<Vec<Instant>> = Mutex::new(Vec::new());
    let mut kills: Vec<(Instant, Duration)> = Vec::new();
    let t0 = Instant::now();
    let log_path = faultd.log_path().to_owned();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        std::thread::scope(|s| {
            let guest = s.spawn(|| {
                let mut r = 0u32;
                while !stop.load(Ordering::Acquire) {
                    let reports = vm
                        .run(vec![round(r, 0), round(r, 1)], &|_, _| {
                            progress.lock().unwrap().push(Instant::now())
                        })
                        .expect("guest run");
                    for (i, rep) in reports.iter().enumerate() {
                        if let Some(gpa) = rep.first_mismatch_gpa {
                            // Which round's data the page holds, if any: tells a stale page from
                            // one that got another page's contents.
                            let b = faultd_tests::read_with_timeout(
                                &ram.ram,
                                (0..4).map(|k| gpa + k).collect(),
                                Duration::from_secs(5),
                            );
                            let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                            let rounds: Vec<u32> = (0..=r)
                                .filter(|&rr| pattern(gpa, 1000 * rr + i as u32) == v)
                                .collect();
                            eprintln!("{gpa:#x} holds {v:#x}, the pattern of rounds {rounds:?}");
                        }
                        assert_eq!(
                            rep.mismatches,
                            0,
                            "vCPU {i} round {r} (ended {:?}): lost write or stale read at {:?}",
                            t0.elapsed(),
                            rep.first_mismatch_gpa
                        );
                    }
                    r += 1;
                    guest_rounds.store(r, Ordering::Release);
                }
                r
            });
            let dev = s.spawn(|| {
                let mut r = 0u32;
                while !stop.load(Ordering::Acquire) {
                    let what = format!("device round {r}");
                    device_round(
                        &device,
                        0xD000 + r,
                        300,
                        2 * third,
                        pages - 2 * third,
                        &what,
                    );
                    r += 1;
                    device_rounds.store(r, Ordering::Release);
                }
            });

            // The crashes: each once the budget has pushed pages to the store, mid-round.
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ std::process::id() as u64;
            for k in 0..KILLS {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let stored = sup
                        .with_session(|s| s.stats().map(|st| st.stored_pages).unwrap_or(0))
                        .unwrap_or(0);
                    if stored > 100 && guest_rounds.load(Ordering::Acquire) as usize > k {
                        break;
                    }
                    assert!(Instant::now() < deadline, "the budget never evicted");
                    std::thread::sleep(Duration::from_millis(20));
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                std::thread::sleep(Duration::from_millis(rng % 200));
                let killed = Instant::now();
                println!("kill {k} at {:?}", t0.elapsed());
                faultd.kill9();
                // systemd's RestartSec=100ms.
                std::thread::sleep(Duration::from_millis(100));
                faultd.restart();
                let deadline = Instant::now() + Duration::from_secs(20);
                while sup.stats().resumes < k as u64 + 1 {
                    assert!(
                        Instant::now() < deadline,
                        "the VMM did not get its session back:\n{}",
                        faultd.log()
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
                kills.push((killed, sup.stats().last_outage));
            }
            // Both workloads complete whole rounds after the last restart.
            let (g0, d0) = (
                guest_rounds.load(Ordering::Acquire),
                device_rounds.load(Ordering::Acquire),
            );
            let deadline = Instant::now() + Duration::from_secs(120);
            while guest_rounds.load(Ordering::Acquire) < g0 + 2
                || device_rounds.load(Ordering::Acquire) < d0 + 2
            {
                assert!(Instant::now() < deadline, "workloads stalled after restart");
                std::thread::sleep(Duration::from_millis(10));
            }
            stop.store(true, Ordering::Release);
            guest.join().expect("guest thread");
            dev.join().expect("device thread");
        })
    }));
    if let Err(panic) = outcome {
        eprintln!(
            "faultd's log:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default()
        );
        std::panic::resume_unwind(panic);
    }

    // The guest's last round, verified once more after everything: pages written before the
    // final crashes (and evicted to the store since) read back as written.
    let last = guest_rounds.load(Ordering::Acquire) - 1;
    let verify = |i: u32| match round(last, i) {
        Workload::WriteVerify {
            seed,
            touches,
            first_page,
            page_count,
        } => Workload::Verify {
            seed,
            touches,
            first_page,
            page_count,
        },
        _ => unreachable!(),
    };
    for (i, rep) in vm
        .run(vec![verify(0), verify(1)], &|_, _| {})
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(rep.mismatches, 0, "vCPU {i}: the last round lost data");
    }

    let progress = progress.into_inner().unwrap();
    for (k, (killed, outage)) in kills.iter().enumerate() {
        let before = progress.iter().rev().find(|&&t| t <= *killed);
        let after = progress.iter().find(|&&t| t > *killed);
        let stall = match (before, after) {
            (Some(b), Some(a)) => a.duration_since(*b),
            _ => Duration::ZERO,
        };
        println!(
            "kill {k}: VMM outage (hang-up seen -> resumed) {:.1} ms; guest progress stalled \
             {:.1} ms (last report before the kill -> first after)",
            outage.as_secs_f64() * 1e3,
            stall.as_secs_f64() * 1e3
        );
    }
    let log = faultd.log();
    let resumed: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("resumed: page state rebuilt"))
        .filter_map(|l| l.split(" stored=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    println!("stored pages found by each new faultd: {resumed:?}");
    assert_eq!(resumed.len(), KILLS, "{log}");
    assert!(
        resumed.iter().all(|&n| n > 0),
        "a restarted faultd found no stored page"
    );

    let ds = device.stats();
    println!("device: {ds:?}");
    assert_eq!(
        (ds.invalid, ds.timeouts, ds.failed_transfers),
        (0, 0, 0),
        "{ds:?}"
    );
    assert_eq!(ds.pri_resets, KILLS as u64);
    let st = sup.stats();
    assert_eq!((st.losses, st.resumes), (KILLS as u64, KILLS as u64));

    let mut session = sup.stop().expect("a session at the end");
    let stats = faultd_tests::settled_stats(&mut session, |s| {
        s.resident_bytes == ram.ram.allocated_bytes().unwrap()
    });
    println!(
        "last faultd: {} vCPU faults, {} from the store, {} evictions, resident {} KiB",
        stats.vcpu_faults,
        stats.store_fills,
        stats.evictions,
        stats.resident_bytes / 1024
    );
    assert_eq!(stats.errors, 0, "{log}");
    assert_eq!(stats.resident_bytes, ram.ram.allocated_bytes().unwrap());
    assert!(stats.store_fills > 0);
    drop(session);
    drop(device);
}

/// The store's journal alone, without load: pages written, some evicted with data, some as
/// zero, then faultd killed and restarted; the VMM resumes and every page reads back.
#[test]
fn evicted_pages_are_found_in_the_store_after_a_kill() {
    const PAGES: u64 = 512;
    let mut faultd = Faultd::start(&[]);
    let ram = Ram::new("journal", PAGES * PAGE);
    let mut session = ram.serve(&faultd, "journal");
    // Every page gets a byte that names it, except every 8th, which stays zero.
    let writes: Vec<(u64, u8)> = (0..PAGES)
        .filter(|p| p % 8 != 0)
        .map(|p| (p * PAGE + p % 4000, (p % 251) as u8 + 1))
        .collect();
    faultd_tests::write_with_timeout(&ram.ram, writes.clone(), Duration::from_secs(10));
    faultd_tests::read_with_timeout(
        &ram.ram,
        (0..PAGES).step_by(8).map(|p| p * PAGE).collect(),
        Duration::from_secs(10),
    );
    // Evict the first half (data and zero pages), then bring a few back and evict them again,
    // so slots are freed and reused before the crash.
    let (evicted, zero, failed) = session.evict(0, PAGES / 2 * PAGE, None).unwrap();
    assert_eq!((evicted, zero, failed), (PAGES / 2, PAGES / 16, 0));
    faultd_tests::read_with_timeout(&ram.ram, vec![PAGE, 2 * PAGE], Duration::from_secs(10));
    session.evict(PAGE, 2 * PAGE, None).unwrap();
    let resident = ram.ram.allocated_bytes().unwrap();

    faultd.kill9();
    drop(session);
    faultd.restart();
    let mut session = Client::connect(faultd.socket())
        .unwrap()
        .resume("journal", &ram.uffd, &[RegionSpec::zero(0, &ram.ram)], None)
        .unwrap();
    // The new faultd rebuilds page state on its fault thread after answering register.
    let st = faultd_tests::settled_stats(&mut session, |s| {
        s.resident_bytes == resident && s.stored_pages == PAGES / 2 - PAGES / 16
    });
    assert_eq!(st.resident_bytes, resident, "present pages are resident");
    assert_eq!(st.stored_pages, PAGES / 2 - PAGES / 16);

    let got = faultd_tests::read_with_timeout(
        &ram.ram,
        writes.iter().map(|&(o, _)| o).collect(),
        Duration::from_secs(10),
    );
    let want: Vec<u8> = writes.iter().map(|&(_, v)| v).collect();
    assert_eq!(got, want, "a page lost its contents across the restart");
    let st = faultd_tests::settled_stats(&mut session, |s| s.store_fills >= PAGES / 2 - PAGES / 16);
    assert_eq!(st.store_fills, PAGES / 2 - PAGES / 16);
}

/// Budget evictions right up to each kill, six times over: the pages written before each
/// crash read back after it, whether they were in guest memory, in the store, or being
/// evicted when faultd died; and a slot is never handed to two pages (a resumed store's free
/// list once did exactly that).
#[test]
fn writes_before_each_of_several_kills_read_back_after_it() {
    const PAGES: u64 = 2048;
    let mut faultd = Faultd::start_with_config("[budget]\nglobal_mib = 2\n");
    let ram = Ram::new("cycles", PAGES * PAGE);
    let mut session = Some(ram.serve(&faultd, "cycles"));
    for g in 0..6u64 {
        // One byte per page, at a place and with a value that change every cycle.
        let writes: Vec<(u64, u8)> = (0..PAGES)
            .map(|p| {
                (
                    p * PAGE + (p * 7 + g) % 4000,
                    ((p * 13 + g * 71) % 251) as u8 + 1,
                )
            })
            .collect();
        faultd_tests::write_with_timeout(&ram.ram, writes.clone(), Duration::from_secs(20));
        faultd.kill9();
        drop(session.take());
        faultd.restart();
        session = Some(
            Client::connect(faultd.socket())
                .unwrap()
                .resume("cycles", &ram.uffd, &[RegionSpec::zero(0, &ram.ram)], None)
                .unwrap(),
        );
        let got = faultd_tests::read_with_timeout(
            &ram.ram,
            writes.iter().map(|&(o, _)| o).collect(),
            Duration::from_secs(20),
        );
        let bad: Vec<(u64, u8, u8)> = (0..writes.len())
            .filter(|&i| got[i] != writes[i].1)
            .map(|i| (writes[i].0 / PAGE, got[i], writes[i].1))
            .collect();
        assert!(
            bad.is_empty(),
            "cycle {g}: {} pages lost their byte (page, read, written): {:?}",
            bad.len(),
            &bad[..bad.len().min(8)]
        );
    }
    let st = session.as_mut().unwrap().stats().unwrap();
    assert!(st.store_fills > 0 && st.evictions > 0, "{st:?}");
}

/// SIGTERM with device page requests queued and pages in the store: faultd answers the
/// queued groups SUCCESS (it finishes them rather than failing them), exits 0 within its
/// bound, and keeps the store. The VMM then does what it does when faultd goes away (a PRI
/// reset, a resume with the next faultd): the DMAs complete (a device whose translation was
/// unmapped at shutdown right after its SUCCESS asks the next faultd), and the pages evicted
/// before the stop come back from the kept store.
#[test]
fn sigterm_finishes_queued_device_groups_exits_0_within_its_bound_and_keeps_the_store() {
    use nix::sys::signal::Signal;
    const DEV_GPA: u64 = 8 * MIB;
    let mut faultd = Faultd::start(&[]);
    let ram = Ram::new("term", 16 * MIB);
    let mut session = ram.serve(&faultd, "term");
    // SAFETY: `ram` outlives the device (declared before it); no Rust reference points into
    // guest RAM.
    let device = unsafe {
        PriDevice::new(
            ram.ram.host_ptr(),
            0,
            16 * MIB,
            DeviceConfig {
                workers: 2,
                response_timeout: Duration::from_secs(30),
                ..DeviceConfig::default()
            },
        )
    }
    .expect("device");
    device.attach(&mut session).expect("attach");
    let writes: Vec<(u64, u8)> = (0..256u64).map(|p| (p * PAGE + 5, p as u8 | 1)).collect();
    faultd_tests::write_with_timeout(&ram.ram, writes.clone(), Duration::from_secs(10));
    assert_eq!(session.evict(0, 256 * PAGE, None).unwrap(), (256, 0, 0));

    // Stopped, faultd reads nothing: both DMA writes post their groups and wait.
    faultd.signal(Signal::SIGSTOP);
    std::thread::scope(|s| {
        let dmas: Vec<_> = (0..2u32)
            .map(|w| {
                let device = &device;
                s.spawn(move || {
                    let gpa = DEV_GPA + u64::from(w) * 64 * PAGE;
                    device.dma_write(w, gpa, &pattern_page(gpa, 7))
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while device.stats().groups < 2 {
            assert!(Instant::now() < deadline, "the DMAs posted no groups");
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        faultd.signal(Signal::SIGTERM);
        faultd.signal(Signal::SIGCONT);
        let exit = faultd.wait_exit(Duration::from_secs(10));
        let took = t.elapsed();
        println!("SIGTERM to exit: {:.1} ms", took.as_secs_f64() * 1e3);
        assert!(
            exit.is_some_and(|st| st.success()),
            "{exit:?}\n{}",
            faultd.log()
        );
        // device.deadline_ms (250) + 2 s.
        assert!(took < Duration::from_millis(2250), "took {took:?}");
        let ds = device.stats();
        assert!(
            ds.success >= 2 && ds.invalid == 0,
            "queued groups not finished: {ds:?}"
        );
        for f in ["term.pages", "term.journal"] {
            // The VMM is root: its VM's store is in root's directory.
            let kept = faultd.store_dir().join("0").join(f);
            assert!(kept.exists(), "{f} was not kept");
        }

        drop(std::mem::replace(&mut session, {
            device.reset_pri().unwrap();
            faultd.restart();
            let mut s = Client::connect(faultd.socket())
                .unwrap()
                .resume("term", &ram.uffd, &[RegionSpec::zero(0, &ram.ram)], None)
                .unwrap();
            device.attach(&mut s).expect("attach again");
            s
        }));
        for (w, h) in dmas.into_iter().enumerate() {
            let done = h.join().unwrap();
            assert!(done.is_ok(), "DMA {w}: {done:?}\n{}", faultd.log());
        }
    });
    let ds = device.stats();
    assert_eq!((ds.invalid, ds.timeouts), (0, 0), "{ds:?}");
    let mut buf = vec![0u8; PAGE as usize];
    for w in 0..2u64 {
        let gpa = DEV_GPA + w * 64 * PAGE;
        device.dma_read(0, gpa, &mut buf).unwrap();
        assert!(buf == pattern_page(gpa, 7), "DMA {w}'s write was lost");
    }
    let got = faultd_tests::read_with_timeout(
        &ram.ram,
        writes.iter().map(|&(o, _)| o).collect(),
        Duration::from_secs(10),
    );
    assert_eq!(got, writes.iter().map(|&(_, v)| v).collect::<Vec<_>>());
    let st = faultd_tests::settled_stats(&mut session, |s| s.store_fills == 256);
    assert_eq!(st.store_fills, 256);
    drop(session);
    drop(device);
}

//! testvmm: a minimal KVM VMM that hands its guest RAM faults to faultd.
//!
//! `testvmm demo` starts faultd (or uses a running one), creates guest RAM that nothing
//! populates or pins, registers it with faultd, attaches an emulated PRI-capable DMA device,
//! runs a real KVM guest that writes and verifies a pattern on random pages across its RAM
//! while the device DMAs into and out of the same unpinned RAM, and reports what faultd did.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use faultd_client::{create_uffd, Client, GuestRam, RamPageSize, RegionSpec};
use testvmm::{page_sequence, DeviceConfig, PriDevice, RamSlot, Vm, Workload};

#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a guest on unpinned RAM served by faultd and print a summary.
    Demo(DemoArgs),
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// faultd binary to start for the demo (on a private socket).
    #[arg(long, conflicts_with = "socket")]
    faultd: Option<PathBuf>,
    /// Control socket of an already running faultd.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// The VM's name in faultd (`ctl sessions`, `ctl stats --vm`, metrics). faultd serves one
    /// live session per name and uid, so demos running at once need names of their own; the
    /// default, `demo-<pid>`, is one.
    #[arg(long)]
    vm: Option<String>,
    /// Guest RAM in MiB (up to 256 GiB; nothing of it is populated or pinned up front).
    #[arg(long, default_value_t = 1024)]
    ram_mib: u64,
    /// vCPUs (each works on its own slice of RAM).
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Random pages each vCPU writes and then verifies.
    #[arg(long, default_value_t = 12_000)]
    touches: u32,
    /// Seed of the guest's page choice and data pattern.
    #[arg(long, default_value_t = 0x5eed)]
    seed: u32,
    /// Random pages the emulated PRI device DMA-writes (0: no device).
    #[arg(long, default_value_t = 2000)]
    device_pages: u32,
    /// After the summary, keep the session and its RAM this many seconds, so `faultd ctl`
    /// can be pointed at it.
    #[arg(long, default_value_t = 0)]
    hold_secs: u64,
}

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// A faultd child process, stopped with SIGTERM on drop.
struct Daemon {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn start_faultd(bin: &PathBuf) -> Result<(Daemon, PathBuf)> {
    let dir = tempfile::tempdir().context("creating the demo's socket directory")?;
    let socket = dir.path().join("faultd.sock");
    let child = Command::new(bin)
        .arg("--socket")
        .arg(&socket)
        .arg("--log")
        .arg("warn")
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut daemon = Daemon { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Client::connect(&socket).is_err() {
        if let Some(st) = daemon.child.try_wait()? {
            bail!("faultd exited at start: {st}");
        }
        if Instant::now() > deadline {
            bail!("faultd did not start serving {}", socket.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok((daemon, socket))
}

fn demo(a: DemoArgs) -> Result<bool> {
    let (daemon, socket) = match (&a.faultd, &a.socket) {
        (Some(bin), _) => {
            let (d, s) = start_faultd(bin)?;
            println!(
                "faultd started (pid {}), socket {}",
                d.child.id(),
                s.display()
            );
            (Some(d), s)
        }
        (None, Some(s)) => (None, s.clone()),
        (None, None) => (None, PathBuf::from(faultd_proto::DEFAULT_SOCKET_PATH)),
    };
    let size = a
        .ram_mib
        .checked_mul(MIB)
        .filter(|&s| s > 0 && s <= testvmm::RAM_LIMIT)
        .with_context(|| {
            format!(
                "--ram-mib {}: must be 1..={}",
                a.ram_mib,
                testvmm::RAM_LIMIT / MIB
            )
        })?;
    let vm_name =
        a.vm.clone()
            .unwrap_or_else(|| format!("demo-{}", std::process::id()));
    let ram = GuestRam::new("testvmm-ram", size, RamPageSize::Size4K)?;
    let uffd = create_uffd()?;
    ram.register(&uffd)?;
    let mut session = Client::connect(&socket)?
        .register(&vm_name, &uffd, &[RegionSpec::zero(0, &ram)], None)
        .with_context(|| format!("registering guest RAM of VM \"{vm_name}\" with faultd"))?;
    println!(
        "guest RAM: {} MiB memfd, unpinned, nothing populated (resident now: {} MiB); VM \"{vm_name}\", session {}",
        a.ram_mib,
        ram.allocated_bytes()? / MIB,
        session.id()
    );

    let pages = u32::try_from(size / PAGE).context("guest RAM too large")?;
    // The last eighth of RAM is the device's buffer area; the vCPUs share the rest.
    let device_first = if a.device_pages > 0 {
        pages - pages / 8
    } else {
        pages
    };
    let per = device_first / a.vcpus.max(1);
    let work: Vec<(u32, u32, u32, u32)> = (0..a.vcpus)
        .map(|i| (a.seed.wrapping_add(i), a.touches, i * per, per))
        .collect();
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.host_ptr(),
        size,
    }])?;
    vm.set_timeout(Some(Duration::from_secs(600)));
    let device = if a.device_pages > 0 {
        // SAFETY: `ram` outlives `device` (declared earlier, dropped later), and this program
        // never holds a Rust reference into guest RAM.
        let dev = unsafe { PriDevice::new(ram.host_ptr(), 0, size, DeviceConfig::default()) }?;
        let granule = dev
            .attach(&mut session)
            .context("attaching the device to faultd")?;
        println!(
            "emulated PRI device attached: dev_id 1, eventfd ring, emulated IOMMU, {} KiB granules",
            granule / 1024
        );
        Some(dev)
    } else {
        None
    };
    let device_seed = a.seed ^ 0xD3;
    let device_seq = page_sequence(
        device_seed,
        a.device_pages,
        device_first,
        pages - device_first,
    );

    println!(
        "phase 1: {} vCPU(s) each write a pattern to {} random pages of a {} MiB slice and verify them{}",
        a.vcpus,
        a.touches,
        per as u64 * PAGE / MIB,
        if device.is_some() {
            format!("; meanwhile the device DMA-writes {} random pages of the last {} MiB", a.device_pages, (pages - device_first) as u64 * PAGE / MIB)
        } else {
            String::new()
        }
    );
    let done: Vec<AtomicU32> = (0..a.vcpus).map(|_| AtomicU32::new(0)).collect();
    let total = 2 * a.touches * a.vcpus;
    let t0 = Instant::now();
    let (reports, dma) = std::thread::scope(|s| {
        let dma = device.as_ref().map(|dev| {
            let seq = &device_seq;
            s.spawn(move || -> Result<(), testvmm::DmaError> {
                for &p in seq {
                    let gpa = p as u64 * PAGE;
                    dev.dma_write(0, gpa, &pattern_page(gpa, device_seed))?;
                }
                Ok(())
            })
        });
        let reports = vm.run(
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
            &|vcpu, n| {
                done[vcpu].store(n, Ordering::Relaxed);
                let sum: u32 = done.iter().map(|d| d.load(Ordering::Relaxed)).sum();
                println!(
                    "  [{:>6.2}s] vCPU{vcpu}: {n} page visits; all vCPUs {:>3}%",
                    t0.elapsed().as_secs_f64(),
                    sum as u64 * 100 / total as u64
                );
            },
        );
        (reports, dma.map(|h| h.join().expect("device thread")))
    });
    let reports = reports?;
    dma.transpose().context("device DMA write")?;
    let elapsed = t0.elapsed();

    // Phase 2: the guest verifies what the device wrote while the device reads back and checks
    // what the guest wrote.
    let mut device_mismatches = 0u64;
    let mut guest_checks_device = 0u32;
    let mut device_read_pages: Vec<u32> = Vec::new();
    if let Some(dev) = &device {
        println!("phase 2: vCPU0 verifies every page the device wrote; the device DMA-reads and checks pages vCPU0 wrote");
        let (seed0, t, f, c) = work[0];
        let guest_pages = page_sequence(seed0, t, f, c);
        device_read_pages = guest_pages
            .iter()
            .take(a.device_pages as usize)
            .copied()
            .collect();
        let (verify, read) = std::thread::scope(|s| {
            let h = s.spawn(|| -> Result<u64, testvmm::DmaError> {
                let mut bad = 0;
                let mut buf = vec![0u8; PAGE as usize];
                for &p in guest_pages.iter().take(a.device_pages as usize) {
                    let gpa = p as u64 * PAGE;
                    dev.dma_read(1, gpa, &mut buf)?;
                    for off in testvmm::dword_offsets() {
                        let o = off as usize;
                        let v = u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
                        bad += u64::from(v != testvmm::pattern(gpa + off, seed0));
                    }
                }
                Ok(bad)
            });
            let verify = vm.run(
                vec![Workload::Verify {
                    seed: device_seed,
                    touches: a.device_pages,
                    first_page: device_first,
                    page_count: pages - device_first,
                }],
                &|_, _| {},
            );
            (verify, h.join().expect("device thread"))
        });
        let verify = verify?;
        guest_checks_device = verify[0].mismatches;
        device_mismatches = read.context("device DMA read")?;
    }

    let stats = session.stats()?;
    let mut touched: BTreeSet<u32> = work
        .iter()
        .flat_map(|&(s, t, f, c)| page_sequence(s, t, f, c))
        .collect();
    let mismatches: u32 = reports.iter().map(|r| r.mismatches).sum();
    let allocated = ram.allocated_bytes()?;
    let l = stats.latency_us;
    println!();
    println!("summary");
    println!(
        "  guest run:          {:.2} s, {} vCPU(s)",
        elapsed.as_secs_f64(),
        a.vcpus
    );
    println!("  guest verification: {} mismatching dwords", mismatches);
    println!("  pages touched:      {} distinct by vCPUs", touched.len());
    println!(
        "  vCPU faults:        {} served by faultd ({} already present, {} errors)",
        stats.vcpu_faults, stats.already_present, stats.errors
    );
    println!(
        "  fault service time: p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us ({} samples)",
        l.p50, l.p90, l.p99, l.max, l.count
    );
    let mut device_ok = true;
    if let Some(dev) = &device {
        let d = stats.device;
        let dl = stats.device_latency_us;
        let ds = dev.stats();
        println!(
            "  device DMA:         {} pages written, {} read back; {} page-request groups ({} pages) -> {} SUCCESS, {} INVALID",
            device_seq.len(), device_read_pages.len(), d.groups, d.pages, d.success, d.invalid
        );
        println!(
            "  device group time:  p50 {:.1} us, p99 {:.1} us in faultd; {} MiB pinned (device-mapped) now",
            dl.p50,
            dl.p99,
            d.mapped_bytes / MIB
        );
        println!(
            "  cross-checks:       guest found {} mismatching dwords in device-written pages, device found {} in guest-written pages",
            guest_checks_device, device_mismatches
        );
        device_ok = guest_checks_device == 0
            && device_mismatches == 0
            && d.invalid == 0
            && ds.failed_transfers == 0;
        // Device faults make whole granules resident.
        let per_granule = (dev.granule() / PAGE) as u32;
        for &p in device_seq.iter().chain(&device_read_pages) {
            let first = p - p % per_granule;
            touched.extend(first..first + per_granule);
        }
    }
    println!(
        "  pages zero-filled:  {} (vCPU faults, and whole granules for device faults)",
        stats.zero_fills
    );
    println!(
        "  resident guest RAM: {:.1} MiB of {} MiB ({:.2}%), memfd allocation {:.1} MiB",
        stats.resident_bytes as f64 / MIB as f64,
        a.ram_mib,
        stats.resident_bytes as f64 * 100.0 / size as f64,
        allocated as f64 / MIB as f64
    );
    // Under a memory budget faultd evicts pages to its store (taking them out of the memfd),
    // so then the memfd holds at most the touched pages; the guest's verification above shows
    // whether their contents survived.
    let touched_bytes = touched.len() as u64 * PAGE;
    let memory_ok = if stats.evictions > 0 {
        println!(
            "  evicted:            {} pages to faultd's store (a budget), {} held there now",
            stats.evictions, stats.stored_pages
        );
        allocated <= touched_bytes
    } else {
        allocated == touched_bytes
    };
    let ok = mismatches == 0
        && device_ok
        && stats.errors == 0
        && memory_ok
        && stats.resident_bytes == allocated;
    println!("  result:             {}", if ok { "PASS" } else { "FAIL" });
    if a.hold_secs > 0 {
        println!(
            "holding VM \"{vm_name}\" (session {}) for {} s",
            session.id(),
            a.hold_secs
        );
        std::thread::sleep(Duration::from_secs(a.hold_secs));
    }
    drop(device);
    drop(session);
    drop(daemon);
    Ok(ok)
}

/// A page whose every dword at guest address `a` holds `pattern(a, seed)`.
fn pattern_page(gpa: u64, seed: u32) -> Vec<u8> {
    (0..PAGE / 4)
        .flat_map(|i| testvmm::pattern(gpa + 4 * i, seed).to_le_bytes())
        .collect()
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.cmd {
        Cmd::Demo(a) => demo(a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("testvmm: {e:#}");
            ExitCode::from(2)
        }
    }
}

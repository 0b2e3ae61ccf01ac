//! testvmm: a minimal KVM VMM that hands its guest RAM faults to faultd.
//!
//! `testvmm demo` starts faultd (or uses a running one), creates guest RAM that nothing
//! populates or pins, registers it with faultd, runs a real KVM guest that writes and verifies
//! a pattern on random pages across its RAM, and reports what faultd did.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use faultd_client::{create_uffd, Client, GuestRam, RamPageSize, RegionSpec};
use testvmm::{page_sequence, RamSlot, Vm, Workload};

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
    /// Guest RAM in MiB.
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
    let size = a.ram_mib * MIB;
    let ram = GuestRam::new("testvmm-ram", size, RamPageSize::Size4K)?;
    let uffd = create_uffd()?;
    ram.register(&uffd)?;
    let mut session = Client::connect(&socket)?
        .register("demo", &uffd, &[RegionSpec::zero(0, &ram)], None)
        .context("registering guest RAM with faultd")?;
    println!(
        "guest RAM: {} MiB memfd, unpinned, nothing populated (resident now: {} MiB); session {}",
        a.ram_mib,
        ram.allocated_bytes()? / MIB,
        session.id()
    );

    let pages = u32::try_from(size / PAGE).context("guest RAM too large")?;
    let per = pages / a.vcpus.max(1);
    let work: Vec<(u32, u32, u32, u32)> = (0..a.vcpus)
        .map(|i| (a.seed.wrapping_add(i), a.touches, i * per, per))
        .collect();
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.host_ptr(),
        size,
    }])?;
    vm.set_timeout(Some(Duration::from_secs(600)));
    println!(
        "running {} vCPU(s): each writes a pattern to {} random pages of its {} MiB slice, then verifies them",
        a.vcpus,
        a.touches,
        per as u64 * PAGE / MIB
    );
    let done: Vec<AtomicU32> = (0..a.vcpus).map(|_| AtomicU32::new(0)).collect();
    let total = 2 * a.touches * a.vcpus;
    let t0 = Instant::now();
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
    )?;
    let elapsed = t0.elapsed();

    let stats = session.stats()?;
    let touched: BTreeSet<u32> = work
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
    println!("  pages touched:      {} distinct", touched.len());
    println!(
        "  faults served:      {} by faultd ({} zero-filled, {} already present, {} errors)",
        stats.vcpu_faults, stats.zero_fills, stats.already_present, stats.errors
    );
    println!(
        "  fault service time: p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us ({} samples)",
        l.p50, l.p90, l.p99, l.max, l.count
    );
    println!(
        "  resident guest RAM: {:.1} MiB of {} MiB ({:.2}%), memfd allocation {:.1} MiB",
        stats.resident_bytes as f64 / MIB as f64,
        a.ram_mib,
        stats.resident_bytes as f64 * 100.0 / size as f64,
        allocated as f64 / MIB as f64
    );
    let ok = mismatches == 0
        && stats.errors == 0
        && allocated == touched.len() as u64 * PAGE
        && stats.resident_bytes == allocated;
    println!("  result:             {}", if ok { "PASS" } else { "FAIL" });
    drop(session);
    drop(daemon);
    Ok(ok)
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

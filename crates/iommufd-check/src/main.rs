//! iommufd-check: the guest side of `tests/kernel/run`, the proof that faultd's iommufd backend
//! speaks the real kernel ABI.
//!
//! Inside a QEMU guest whose kernel has iommufd and its selftest mock IOMMU, this program is
//! `/init`: it mounts the basics, starts `/bin/faultd`, runs [`vfio::run`] (a real PCI device,
//! QEMU's edu, behind QEMU's emulated Intel IOMMU, bound to vfio-pci and used through the VFIO
//! cdev in faultd's pinned mode, with real device DMA) and [`checks::run`] (it plays the VMM:
//! iommufd objects, a mock device with a fault-capable paging HWPT, guest RAM registered with
//! faultd, page requests raised through the mock) and [`restart::run`] (the faultd it started is
//! SIGKILLed with page requests waiting and a new one started; the client's supervisor brings
//! the session and the device back), prints one result line, `IOMMUFD-CHECK: PASS ...` or
//! `IOMMUFD-CHECK: FAIL: ...`, and powers the guest off.
//!
//! Not as PID 1 it runs the same checks but the restart against a faultd that is already running:
//! `iommufd-check --socket PATH --faultd-pid PID` (a kernel with CONFIG_IOMMUFD_TEST and an edu
//! device behind an IOMMU needed).

mod checks;
mod mock;
mod restart;
mod trace;
mod vfio;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

const SOCKET: &str = "/run/faultd/faultd.sock";

fn main() -> ExitCode {
    if std::process::id() == 1 {
        init()
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(socket), Some(pid)) = (arg(&args, "--socket"), arg(&args, "--faultd-pid")) else {
        eprintln!("usage: iommufd-check --socket PATH --faultd-pid PID (or run as /init)");
        return ExitCode::from(2);
    };
    let Ok(pid) = pid.parse::<i32>() else {
        eprintln!("--faultd-pid: not a number: {pid}");
        return ExitCode::from(2);
    };
    report(all_checks(Path::new(&socket), pid, None))
}

/// The real-device checks (edu through vfio-pci, pinned mode), then the mock IOMMU's. With
/// `faultd_vfio=off` on the kernel command line (tests/kernel/run sets it for Linux 6.12, whose
/// selftest mock IOMMU refuses MOCK_DOMAIN with EINVAL when QEMU's Intel IOMMU is present) the
/// mock's only, and the result line says so.
///
/// Then, given the faultd it started (`faultd`, as PID 1), [`restart::run`]: that faultd is
/// killed with page requests waiting and a new one started in its place (left in `faultd`).
fn all_checks(socket: &Path, faultd_pid: i32, faultd: Option<&mut Child>) -> Result<usize, String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mut n = 0;
    if cmdline.split_whitespace().any(|w| w == "faultd_vfio=off") {
        println!("iommufd-check: VFIO checks NOT run (faultd_vfio=off): mock IOMMU checks only");
    } else {
        n = vfio::run(socket, n)?;
    }
    n = checks::run(socket, faultd_pid, n)?;
    match faultd {
        Some(faultd) => restart::run(socket, faultd, n),
        None => {
            println!("iommufd-check: restart checks NOT run (faultd not started by this process)");
            Ok(n)
        }
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

/// Prints the result line; the exit code says the same.
fn report(result: Result<usize, String>) -> ExitCode {
    match result {
        Ok(n) => {
            println!("IOMMUFD-CHECK: PASS ({n} checks)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("IOMMUFD-CHECK: FAIL: {e}");
            ExitCode::FAILURE
        }
    }
}

/// PID 1: set up, start faultd, check, power off. Never returns (PID 1 must not exit).
fn init() -> ! {
    let result = setup().and_then(|mut faultd| {
        let pid = faultd.id() as i32;
        let r = all_checks(Path::new(SOCKET), pid, Some(&mut faultd));
        stop(&mut faultd);
        r
    });
    report(result);
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // No ACPI power-off: a restart ends QEMU too (it runs with -no-reboot).
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Mounts proc, sys, devtmpfs and tmpfs, points stdio at the console, starts faultd.
fn setup() -> Result<Child, String> {
    for (src, dir, fs) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("devtmpfs", "/dev", "devtmpfs"),
        ("tmpfs", "/run", "tmpfs"),
        ("tmpfs", "/tmp", "tmpfs"),
    ] {
        mount(Some(src), dir, Some(fs), MsFlags::empty(), None::<&str>)
            .map_err(|e| format!("mounting {fs} on {dir}: {e}"))?;
    }
    if let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors, which this process owns; `console`
            // stays open for the call.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
    println!(
        "iommufd-check: kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    start_faultd()
}

/// Starts `/bin/faultd` on [`SOCKET`] and waits until it accepts there.
pub fn start_faultd() -> Result<Child, String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let log = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("faultd_log="))
        .unwrap_or("info")
        .to_owned();
    let child = Command::new("/bin/faultd")
        .args(["--config", "/etc/faultd.toml", "--socket", SOCKET, "--log"])
        .arg(&log)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting /bin/faultd: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while faultd_client::Client::connect(PathBuf::from(SOCKET)).is_err() {
        if Instant::now() > deadline {
            return Err("faultd did not open its socket within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "iommufd-check: faultd running (pid {}, log {log})",
        child.id()
    );
    Ok(child)
}

/// SIGTERM, then SIGKILL after 10 s; reports how faultd ended.
fn stop(faultd: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(faultd.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = faultd.try_wait() {
            println!("iommufd-check: faultd exited: {status}");
            return;
        }
        if Instant::now() > deadline {
            let _ = faultd.kill();
            println!("iommufd-check: faultd did not exit on SIGTERM; killed");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

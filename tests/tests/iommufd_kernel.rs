//! The iommufd proof: `tests/kernel/run` boots a real Linux kernel (with iommufd's selftest mock
//! IOMMU) under QEMU TCG, where faultd serves the mock device's page requests from the kernel's
//! iommufd fault queue and `crates/iommufd-check` checks every mapping in the kernel (see
//! tests/kernel/run). On 7.3, before that, a real PCI device (QEMU's `edu`, no PRI) behind QEMU's
//! emulated Intel IOMMU is bound to vfio-pci, refused a fault-capable attach, and DMAs through
//! its IOAS into guest RAM that faultd pinned and mapped (`crates/iommufd-check/src/vfio.rs`).
//! After the mock checks (among them the cookie guard against the kernel's reuse of a cookie
//! after an HWPT replace), faultd is SIGKILLed with page requests waiting and a new faultd serves
//! the device after the client's `Supervisor` requeued it (`crates/iommufd-check/src/restart.rs`).
//! Two kernels: 6.12, the oldest supported (with the fault-capable paging HWPT backport,
//! tests/kernel/*.patch; mock checks only), and 7.3 as Debian ships it (trixie-backports, no
//! patch).
//!
//! CI runs 7.3; 6.12 is `#[ignore]`d (see there) and runs with `-- --ignored`. The first run on a
//! machine builds each guest kernel it needs (about 5 minutes each on an idle 2-core machine
//! before the VFIO options; with them 7.3 took 416 s idle, and 1600 s (6.12) and 3048 s (7.3) at
//! nice 10 under load 7-8) into a cache
//! outside the checkout; later runs reuse them and
//! take well under a minute each plus the static build of faultd. Needs root for apt-get when a
//! package is missing (and, for 7.3, to add the pinned trixie-backports apt source). It never
//! skips itself: to leave it out, filter it out (`cargo test -- --skip iommufd`), which cargo
//! reports as filtered, not passed.

use std::path::Path;
use std::process::Command;

/// Runs `tests/kernel/run ARGS` and asserts that it passed and that the guest said PASS.
fn proof(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel/run");
    let out = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .expect("running tests/kernel/run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Shown by cargo test on failure (and with --nocapture).
    println!("{stdout}");
    eprintln!("{stderr}");
    let pass = stdout
        .lines()
        .find(|l| l.starts_with("IOMMUFD-CHECK: PASS"));
    assert!(
        out.status.success() && pass.is_some(),
        "tests/kernel/run {} exited with {} and the guest printed {}",
        args.join(" "),
        out.status,
        stdout
            .lines()
            .find(|l| l.starts_with("IOMMUFD-CHECK:"))
            .unwrap_or("no IOMMUFD-CHECK line")
    );
}

// Not in CI: a second kernel build costs about 5 minutes of both cores on a fresh machine; with
// both, a fresh-clone CI took 24.8 of its 30 minutes here with every download already done. 7.3 (below) is the kernel users run, unpatched;
// this one is 6.12 with our own backport, which no user runs, over the same iommufd uAPI.
// Run it with `cargo test --release -p faultd-tests --test iommufd_kernel -- --ignored`.
#[test]
#[ignore = "a second guest kernel build does not fit CI's 30 minutes; run with --ignored"]
fn faultd_serves_page_requests_from_a_real_iommufd_fault_queue_on_linux_6_12_with_the_backport() {
    proof(&[]);
}

#[test]
fn faultd_serves_page_requests_from_a_real_iommufd_fault_queue_on_linux_7_3_unpatched() {
    proof(&["--kernel", "7.3"]);
}

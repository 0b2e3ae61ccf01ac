//! The iommufd proof: `tests/kernel/run` boots a real Linux kernel (6.12 + the fault-capable
//! paging HWPT backport, with iommufd's selftest mock IOMMU) under QEMU TCG, where faultd
//! serves the mock device's page requests from the kernel's iommufd fault queue and
//! `crates/iommufd-check` checks every mapping in the kernel (see tests/kernel/run).
//!
//! The first run on a machine builds the guest kernel (about 5 minutes on 2 cores) into a cache
//! outside the checkout; later runs reuse it and take a few seconds plus the static build of
//! faultd. Needs root for apt-get when a package is missing. It never skips itself: to leave it
//! out, filter it out (`cargo test -- --skip iommufd`), which cargo reports as filtered, not
//! passed.

use std::path::Path;
use std::process::Command;

#[test]
fn faultd_serves_page_requests_from_a_real_iommufd_fault_queue() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel/run");
    let out = Command::new("bash")
        .arg(&script)
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
        "tests/kernel/run exited with {} and the guest printed {}",
        out.status,
        stdout
            .lines()
            .find(|l| l.starts_with("IOMMUFD-CHECK:"))
            .unwrap_or("no IOMMUFD-CHECK line")
    );
}

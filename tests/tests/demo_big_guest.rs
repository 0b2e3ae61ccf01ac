//! Large sparse guests and concurrent demos: a real KVM guest with 64 GiB of guest RAM that
//! nothing populates, served by faultd, touching pages at the bottom, the middle and the top of
//! its RAM; and two `testvmm demo` processes served by one faultd at the same time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use faultd_tests::{resident_settled, Faultd, Ram};
use testvmm::{dword_offsets, page_sequence, pattern, RamSlot, Vm, Workload};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// Reads dword `off` of guest page `page` through the VMM's own mapping (the page is resident,
/// so this does not fault).
fn host_dword(ram: &Ram, page: u32, off: u64) -> u32 {
    let addr = ram.ram.host_addr() + u64::from(page) * PAGE + off;
    assert!(addr + 4 <= ram.ram.host_addr() + ram.ram.size());
    // SAFETY: inside the live mapping (checked above), 4-byte aligned; the page is resident so
    // the read does not fault; a volatile read creates no reference.
    unsafe { std::ptr::read_volatile(addr as *const u32) }
}

#[test]
fn sixty_four_gib_guest_touches_low_middle_and_top_pages_and_only_those_become_resident() {
    let size = 64 * GIB;
    let faultd = Faultd::start(&[]);
    let ram = Ram::new("vm-64g", size);
    let mut session = ram.serve(&faultd, "vm-64g");
    let pages = u32::try_from(size / PAGE).unwrap();
    let mid = pages / 2;
    // (seed, touches, first page, page count): random pages near the bottom, around the
    // middle (32 GiB) and near the top, and the very first and very last page on their own
    // (the last dword of the last page is the guest's highest RAM address).
    let work: [(u32, u32, u32, u32); 5] = [
        (0x1001, 400, 1, 4096),
        (0x2002, 400, mid - 2048, 4096),
        (0x3003, 400, pages - 1 - 4096, 4096),
        (0x4004, 1, 0, 1),
        (0x5005, 1, pages - 1, 1),
    ];
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.ram.host_ptr(),
        size,
    }])
    .expect("creating a KVM VM with 64 GiB of guest RAM");
    // A fault faultd never answers must fail the test, not hang it.
    vm.set_timeout(Some(Duration::from_secs(120)));
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
    for (r, w) in reports.iter().zip(&work) {
        assert_eq!(
            (r.mismatches, r.first_mismatch_gpa),
            (0, None),
            "workload {w:?}"
        );
        assert_eq!(r.pages, 2 * w.1, "workload {w:?}");
    }

    // Every page the guest touched holds what it wrote, read through the VMM's own mapping.
    let mut touched = BTreeSet::new();
    for &(seed, touches, first, count) in &work {
        for p in page_sequence(seed, touches, first, count) {
            touched.insert(p);
            for off in dword_offsets() {
                let gpa = u64::from(p) * PAGE + off;
                assert_eq!(host_dword(&ram, p, off), pattern(gpa, seed), "gpa {gpa:#x}");
            }
        }
    }
    assert!(touched.contains(&0) && touched.contains(&(pages - 1)));
    assert!(touched.iter().any(|&p| p >= mid && p < mid + 2048));

    let stats = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    let touched_bytes = touched.len() as u64 * PAGE;
    println!(
        "guest {} GiB, touched {} pages, faultd resident {} KiB, memfd {} KiB, faults {}, p50 {:.1} us",
        size / GIB,
        touched.len(),
        stats.resident_bytes / 1024,
        ram.ram.allocated_bytes().unwrap() / 1024,
        stats.vcpu_faults,
        stats.latency_us.p50
    );
    assert_eq!(stats.guest_bytes, size);
    // faultd counts exactly the pages the guest touched, the memfd holds exactly those, and
    // that is a few MiB of the 64 GiB.
    assert_eq!(stats.resident_bytes, touched_bytes);
    assert_eq!(ram.ram.allocated_bytes().unwrap(), touched_bytes);
    assert!(stats.resident_bytes < 8 * MIB, "{stats:?}");
    assert_eq!(stats.zero_fills, touched.len() as u64);
    assert_eq!(stats.errors, 0);
}

/// The `testvmm` binary, built in this test's profile.
fn testvmm_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        escargot::CargoBuild::new()
            .package("testvmm")
            .bin("testvmm")
            .current_release()
            .run()
            .expect("building testvmm")
            .path()
            .to_owned()
    })
}

#[test]
fn two_demos_run_at_once_against_one_faultd_each_under_its_own_vm_name() {
    let faultd = Faultd::start(&[]);
    let demo = |vm: &str, extra: &[&str]| {
        Command::new(testvmm_bin())
            .args(["demo", "--socket"])
            .arg(faultd.socket())
            .args(["--vm", vm, "--ram-mib", "512", "--touches", "20000"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting testvmm demo")
    };
    let a = demo("demo-a", &[]);
    let b = demo("demo-b", &["--device-pages", "0"]);

    // Both sessions must be live at one moment: the demos ran at once, not one after the other.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut both_live = false;
    while Instant::now() < deadline {
        let (sa, sb) = (faultd.vm_stats("demo-a"), faultd.vm_stats("demo-b"));
        if sa.len() == 1 && sb.len() == 1 {
            both_live = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let text = |o: &Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    for (vm, out) in [("demo-a", &a), ("demo-b", &b)] {
        let t = text(out);
        println!("--- {vm}:\n{t}");
        assert!(out.status.success(), "{vm}: {:?}\n{t}", out.status);
        assert!(t.contains(&format!("VM \"{vm}\"")), "{vm}:\n{t}");
        assert!(t.contains("result:             PASS"), "{vm}:\n{t}");
    }
    assert!(
        both_live,
        "the two demos never had live sessions at the same time"
    );
    assert!(text(&a).contains("emulated PRI device attached"));
    assert!(!text(&b).contains("emulated PRI device attached"));
}

#[test]
fn demo_without_vm_names_itself_after_its_pid_so_two_plain_demos_coexist() {
    let faultd = Faultd::start(&[]);
    let demo = || {
        Command::new(testvmm_bin())
            .args(["demo", "--socket"])
            .arg(faultd.socket())
            .args([
                "--ram-mib",
                "256",
                "--touches",
                "20000",
                "--device-pages",
                "0",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting testvmm demo")
    };
    let (a, b) = (demo(), demo());
    let names = [format!("demo-{}", a.id()), format!("demo-{}", b.id())];
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut both_live = false;
    while Instant::now() < deadline && !both_live {
        both_live = names.iter().all(|n| faultd.vm_stats(n).len() == 1);
        std::thread::sleep(Duration::from_millis(2));
    }
    for (name, child) in names.iter().zip([a, b]) {
        let out = child.wait_with_output().unwrap();
        let t = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {:?}\n{t}", out.status);
        assert!(t.contains(&format!("VM \"{name}\"")), "{name}:\n{t}");
    }
    assert!(both_live, "the two demos never had live sessions at once");
}

//! The files faultd writes hold guest memory: they are faultd's alone, whoever starts it and
//! whatever its umask.

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use faultd_tests::{settled_stats, write_with_timeout, Faultd, Ram};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const T: Duration = Duration::from_secs(20);

/// `(name, mode in octal, is a regular file)` of every entry of `dir`, sorted by name.
fn entries(dir: &std::path::Path) -> Vec<(String, String, bool)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                format!("{:04o}", meta.permissions().mode() & 0o7777),
                meta.file_type().is_file(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn the_store_directory_is_0700_and_its_pages_journal_and_compacted_journal_0600_under_umask_0() {
    // 8192 pages evicted in one request: the journal passes its compaction threshold (4096
    // records) on the way, so the journal at the end is the compaction's rewrite.
    const SIZE: u64 = 32 * MIB;
    let mut faultd = Faultd::spawn(
        &[],
        &[],
        &[
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new("umask 0 && exec \"$@\""),
            OsStr::new("umask0"),
        ],
    );
    faultd.wait_accepting();
    let status = std::fs::read_to_string(format!("/proc/{}/status", faultd.pid())).unwrap();
    assert!(
        status.lines().any(|l| l == "Umask:\t0000"),
        "faultd does not run with umask 0:\n{status}"
    );
    let ram = Ram::new("vm-files", SIZE);
    let mut session = ram.serve(&faultd, "vm-files");
    let pages = SIZE / PAGE;
    write_with_timeout(&ram.ram, (0..pages).map(|p| (p * PAGE, 0x5a)).collect(), T);
    settled_stats(&mut session, |s| s.zero_fills == pages);

    let (first, _, failed) = session.evict(0, PAGE, None).unwrap();
    assert_eq!((first, failed), (1, 0), "{}", faultd.log());
    // The store is the VM owner's: store.dir/<uid>/ (this test's VMM is root).
    let owner_dir = faultd.store_dir().join("0");
    let journal = owner_dir.join("vm-files.journal");
    let before = std::fs::metadata(&journal).unwrap().ino();
    let (rest, _, failed) = session.evict(0, SIZE, None).unwrap();
    assert_eq!((rest, failed), (pages - 1, 0), "{}", faultd.log());

    let after = std::fs::metadata(&journal).unwrap().ino();
    assert_ne!(before, after, "the journal was not compacted");
    let mode = |p: &std::path::Path| {
        format!(
            "{:04o}",
            std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
        )
    };
    assert_eq!(
        (
            mode(faultd.store_dir()),
            entries(faultd.store_dir()),
            mode(&owner_dir),
            entries(&owner_dir)
        ),
        (
            "0700".to_owned(),
            vec![("0".to_owned(), "0700".to_owned(), false)],
            "0700".to_owned(),
            vec![
                ("vm-files.journal".to_owned(), "0600".to_owned(), true),
                ("vm-files.pages".to_owned(), "0600".to_owned(), true),
            ]
        )
    );
    drop(session);
    assert!(faultd.terminate().success(), "{}", faultd.log());
}

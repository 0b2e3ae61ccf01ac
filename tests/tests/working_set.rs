//! Snapshot zero pages and working-set recording and replay, through faultd serving Firecracker
//! restores ([`faultd_tests::firecracker`]'s stand-in: anonymous private guest RAM in this
//! process, one sendmsg of JSON + uffd).

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use faultd_client::RamPageSize;
use faultd_proto::SessionStats;
use faultd_tests::firecracker::{copy_with_timeout, pattern_snapshot, FcRestore, WireForm, PAGE};
use faultd_tests::Faultd;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(20);
/// Guest RAM of the restores here: one region, at file offset 0.
const RAM: u64 = 16 * MIB;

/// A snapshot of [`RAM`] bytes with a pattern, in which every 4th 64 KiB chunk is zeroed (as
/// data) and `[8 MiB, 10 MiB)` is a hole punched in the file.
struct Snapshot {
    dir: tempfile::TempDir,
    file: std::fs::File,
}

impl Snapshot {
    fn new(seed: u32) -> Snapshot {
        let dir = tempfile::tempdir().unwrap();
        let file = pattern_snapshot(&dir.path().join("mem"), &[(0, RAM, 0)], seed);
        let zeros = vec![0u8; 64 << 10];
        for chunk in (0..RAM / (64 << 10)).step_by(4) {
            file.write_all_at(&zeros, chunk * (64 << 10)).unwrap();
        }
        // SAFETY: fallocate on an fd this test owns; no memory is involved.
        let rc = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (8 * MIB) as i64,
                (2 * MIB) as i64,
            )
        };
        assert_eq!(
            rc,
            0,
            "punching a hole: {}",
            std::io::Error::last_os_error()
        );
        Snapshot { dir, file }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("mem")
    }

    fn page(&self, off: u64) -> Vec<u8> {
        let mut v = vec![0u8; PAGE as usize];
        self.file.read_exact_at(&mut v, off).unwrap();
        v
    }

    fn is_zero(&self, off: u64) -> bool {
        self.page(off).iter().all(|&b| b == 0)
    }
}

/// The page frame of each of this process's pages at `addrs` (pagemap; root sees frames).
fn own_frames(addrs: &[u64]) -> Vec<u64> {
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    addrs
        .iter()
        .map(|&a| {
            let mut e = [0u8; 8];
            pagemap.read_exact_at(&mut e, a / PAGE * 8).unwrap();
            let e = u64::from_le_bytes(e);
            assert!(e >> 63 & 1 == 1, "page at {a:#x} is not present");
            e & ((1 << 55) - 1)
        })
        .collect()
}

/// The RSS of this process's mapping starting at `start` (smaps), bytes.
fn rss_of(start: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let head = format!("{start:x}-");
    let at = smaps
        .lines()
        .position(|l| l.starts_with(&head))
        .unwrap_or_else(|| panic!("no mapping at {start:#x}"));
    smaps
        .lines()
        .skip(at + 1)
        .find_map(|l| l.strip_prefix("Rss:"))
        .map(|v| {
            v.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                * 1024
        })
        .unwrap()
}

fn only(stats: Vec<SessionStats>) -> SessionStats {
    assert_eq!(stats.len(), 1, "{stats:?}");
    stats.into_iter().next().unwrap()
}

/// Listens for restores of `snap` as `vm` and waits until faultd has scanned the snapshot.
fn listen(faultd: &Faultd, vm: &str, snap: &Snapshot) -> PathBuf {
    let socket = snap.dir.path().join(format!("{vm}.sock"));
    faultd
        .listen_firecracker(vm, &socket, &snap.path(), None, None)
        .unwrap();
    assert!(
        faultd.wait_for_log("snapshot file scanned", T),
        "faultd did not scan the snapshot:\n{}",
        faultd.log()
    );
    socket
}

#[test]
fn snapshot_zero_pages_read_zero_take_no_ram_until_written_and_are_counted() {
    let snap = Snapshot::new(0x2E80);
    let faultd = Faultd::start(&[]);
    let socket = listen(&faultd, "fcz", &snap);
    let mut restore = FcRestore::new(&[(RAM, 0)], RamPageSize::Size4K).unwrap();
    restore.send(&socket, WireForm::Current).unwrap();

    // Every 5th page: some in zeroed chunks, some in the hole, most with data.
    let offs: Vec<u64> = (0..RAM / PAGE).step_by(5).map(|p| p * PAGE).collect();
    let got = copy_with_timeout(
        offs.iter().map(|&o| restore.addr(0, o)).collect(),
        PAGE as usize,
        T,
    );

    for (&off, page) in offs.iter().zip(&got) {
        assert!(
            *page == snap.page(off),
            "offset {off:#x} differs from the snapshot"
        );
    }
    let zero: Vec<u64> = offs.iter().copied().filter(|&o| snap.is_zero(o)).collect();
    let data: Vec<u64> = offs.iter().copied().filter(|&o| !snap.is_zero(o)).collect();
    assert!(
        zero.iter().any(|&o| (8 * MIB..10 * MIB).contains(&o)),
        "the hole is probed"
    );
    assert!(zero.iter().any(|&o| o < 8 * MIB), "zeroed data is probed");
    let stats = only(faultd.settled_vm_stats("fcz-1", |s| {
        s.first().is_some_and(|s| s.file_fills >= offs.len() as u64)
    }));
    assert_eq!(stats.working_set.zero_pages, zero.len() as u64);
    assert_eq!(stats.file_fills, offs.len() as u64);
    assert_eq!(stats.errors, 0);
    // The zero pages map the kernel's one shared zero page: they all have one frame, and the
    // mapping's RSS counts the data pages only.
    let addrs = |v: &[u64]| -> Vec<u64> { v.iter().map(|&o| restore.addr(0, o)).collect() };
    let zero_frames: std::collections::BTreeSet<u64> =
        own_frames(&addrs(&zero)).into_iter().collect();
    let data_frames: std::collections::BTreeSet<u64> =
        own_frames(&addrs(&data)).into_iter().collect();
    assert_eq!(zero_frames.len(), 1, "zero pages on frames {zero_frames:?}");
    assert_eq!(data_frames.len(), data.len());
    assert!(data_frames.is_disjoint(&zero_frames));
    assert_eq!(rss_of(restore.addr(0, 0)), data.len() as u64 * PAGE);
    // Written, a zero page becomes the process's own and keeps what was written.
    let w = restore.addr(0, zero[0]);
    // SAFETY: a byte of live guest RAM of this process, already served (no fault blocks).
    unsafe { std::ptr::write_volatile(w as *mut u8, 0x5A) };
    let back = copy_with_timeout(vec![w], 1, T);
    assert_eq!(back[0], vec![0x5A]);
    assert_eq!(rss_of(restore.addr(0, 0)), (data.len() as u64 + 1) * PAGE);
}

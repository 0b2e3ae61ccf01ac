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

/// faultd recording and replaying working sets (recordings in its store dir).
fn recording_faultd() -> Faultd {
    Faultd::start_with_config(
        "[working_set]\nrecord = true\nreplay = true\nrecord_ms = 60000\nrecord_pages = 65536\n",
    )
}

/// The working set the guest touches: 1024 pages from 1 MiB on in order, then 1024 pages
/// scattered over the rest (a fixed pseudo-random order).
fn working_set() -> Vec<u64> {
    let mut w: Vec<u64> = (256..1280).map(|p| p * PAGE).collect();
    let pages = RAM / PAGE;
    let mut x = 12345u64;
    while w.len() < 2048 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let p = 1280 + (x >> 33) % (pages - 1280);
        if !w.contains(&(p * PAGE)) {
            w.push(p * PAGE);
        }
    }
    w
}

/// Restores `snap` through `socket` as the listener's `n`th restore, touches `offs` in order
/// and checks every page against the snapshot; returns the restore (still live) and its stats.
fn restore_and_touch(
    faultd: &Faultd,
    socket: &std::path::Path,
    vm: &str,
    snap: &Snapshot,
    offs: &[u64],
    before: impl Fn(&FcRestore),
) -> (FcRestore, SessionStats) {
    let mut restore = FcRestore::new(&[(RAM, 0)], RamPageSize::Size4K).unwrap();
    restore.send(socket, WireForm::Current).unwrap();
    before(&restore);
    let got = copy_with_timeout(
        offs.iter().map(|&o| restore.addr(0, o)).collect(),
        PAGE as usize,
        T,
    );
    for (&off, page) in offs.iter().zip(&got) {
        assert!(
            *page == snap.page(off),
            "{vm}: offset {off:#x} differs from the snapshot"
        );
    }
    let stats = only(
        faultd
            .settled_vm_stats(vm, |_| false)
            .into_iter()
            .take(1)
            .collect(),
    );
    (restore, stats)
}

#[test]
fn a_recorded_working_set_is_replayed_on_the_next_restore_with_far_fewer_faults() {
    let snap = Snapshot::new(0x3E51);
    let faultd = recording_faultd();
    let socket = listen(&faultd, "fcw", &snap);
    let w = working_set();

    // First restore: every page of the working set is a demand fault, recorded in order.
    let (mut first, s1) = restore_and_touch(&faultd, &socket, "fcw-1", &snap, &w, |_| {});
    assert_eq!(s1.vcpu_faults, w.len() as u64);
    assert_eq!(s1.working_set.recorded, w.len() as u64);
    first.hang_up();
    assert!(
        faultd.wait_for_log("working set recorded", T),
        "{}",
        faultd.log()
    );

    // Second restore: replay installs the working set ahead of the guest; once it is done,
    // the guest's touches fault on none of it.
    let (_second, s2) = restore_and_touch(&faultd, &socket, "fcw-2", &snap, &w, |_| {
        let done = faultd.settled_vm_stats("fcw-2", |s| {
            s.first()
                .is_some_and(|s| !s.working_set.replay_stop.is_empty())
        });
        assert_eq!(only(done).working_set.replay_stop, "done");
    });
    let ws = &s2.working_set;
    eprintln!(
        "demand-only restore: {} vCPU faults; replayed restore: {} vCPU faults, {ws:?}",
        s1.vcpu_faults, s2.vcpu_faults
    );
    assert_eq!(ws.replay_pages, w.len() as u64);
    assert_eq!(ws.prefetched + ws.skipped, w.len() as u64);
    assert!(ws.prefetched >= w.len() as u64 * 9 / 10, "{ws:?}");
    assert!(
        s2.vcpu_faults * 20 <= s1.vcpu_faults,
        "{} faults, demand-only {}",
        s2.vcpu_faults,
        s1.vcpu_faults
    );
    assert_eq!((ws.misses, s2.errors), (0, 0));
    assert!(ws.replay_us > 0);
}

#[test]
fn demand_faults_outside_a_replayed_recording_are_counted_as_misses() {
    let snap = Snapshot::new(0x3E52);
    let faultd = recording_faultd();
    let socket = listen(&faultd, "fcm", &snap);
    let w = working_set();
    let (mut first, _) = restore_and_touch(&faultd, &socket, "fcm-1", &snap, &w[..512], |_| {});
    first.hang_up();
    assert!(
        faultd.wait_for_log("working set recorded", T),
        "{}",
        faultd.log()
    );

    // The next guest touches other pages: all misses (data pages only: zero pages too are
    // snapshot pages, so every page counts).
    let other: Vec<u64> = (2048..2048 + 256).map(|p| p * PAGE).collect();
    let (_second, s2) = restore_and_touch(&faultd, &socket, "fcm-2", &snap, &other, |_| {});

    assert_eq!(s2.working_set.misses, other.len() as u64);
    assert_eq!(s2.working_set.replay_pages, 512);
}

#[test]
fn a_range_discarded_during_replay_reads_zero_afterwards() {
    let snap = Snapshot::new(0x3E53);
    let faultd = recording_faultd();
    let socket = listen(&faultd, "fcd", &snap);
    // The whole of RAM, page by page in reverse (no runs: replay takes longest).
    let all: Vec<u64> = (0..RAM / PAGE).rev().map(|p| p * PAGE).collect();
    let (mut first, _) = restore_and_touch(&faultd, &socket, "fcd-1", &snap, &all, |_| {});
    first.hang_up();
    assert!(
        faultd.wait_for_log("working set recorded", T),
        "{}",
        faultd.log()
    );

    // While replay runs, the balloon takes 4 MiB in the middle.
    let balloon = 6 * MIB..10 * MIB;
    let probe: Vec<u64> = (4 * MIB / PAGE..12 * MIB / PAGE)
        .map(|p| p * PAGE)
        .collect();
    let mut second = FcRestore::new(&[(RAM, 0)], RamPageSize::Size4K).unwrap();
    second.send(&socket, WireForm::Current).unwrap();
    faultd_tests::firecracker::balloon_discard(second.addr(0, balloon.start), 4 * MIB, T);
    let done = faultd.settled_vm_stats("fcd-2", |s| {
        s.first()
            .is_some_and(|s| !s.working_set.replay_stop.is_empty())
    });
    let got = copy_with_timeout(
        probe.iter().map(|&o| second.addr(0, o)).collect(),
        PAGE as usize,
        T,
    );

    for (&off, page) in probe.iter().zip(&got) {
        if balloon.contains(&off) {
            assert!(
                page.iter().all(|&b| b == 0),
                "ballooned offset {off:#x} is not zero"
            );
        } else {
            assert!(
                *page == snap.page(off),
                "offset {off:#x} differs from the snapshot"
            );
        }
    }
    let ws = only(done).working_set;
    assert_eq!(ws.replay_stop, "done");
}

#[test]
fn a_recording_copied_into_another_faultds_imported_directory_is_replayed_there() {
    let snap = Snapshot::new(0x3E54);
    let w = working_set();
    let recorder = recording_faultd();
    let socket = listen(&recorder, "fca", &snap);
    let (mut first, _) = restore_and_touch(&recorder, &socket, "fca-1", &snap, &w, |_| {});
    first.hang_up();
    assert!(
        recorder.wait_for_log("working set recorded", T),
        "{}",
        recorder.log()
    );
    // Recorded under the owner's uid (root: this test), named by the snapshot's digest.
    let owned = recorder.store_dir().join("working-sets/0");
    let files: Vec<_> = std::fs::read_dir(&owned)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");

    // Another host: a faultd with another store dir, the operator's copy in `imported`.
    let other = recording_faultd();
    let imported = other.store_dir().join("working-sets/imported");
    std::fs::create_dir_all(&imported).unwrap();
    std::fs::copy(&files[0], imported.join(files[0].file_name().unwrap())).unwrap();
    let socket = snap.dir.path().join("other.sock");
    other
        .listen_firecracker("fcb", &socket, &snap.path(), None, None)
        .unwrap();
    assert!(
        other.wait_for_log("snapshot file scanned", T),
        "{}",
        other.log()
    );
    let (_second, s2) = restore_and_touch(&other, &socket, "fcb-1", &snap, &w, |_| {
        other.settled_vm_stats("fcb-1", |s| {
            s.first()
                .is_some_and(|s| !s.working_set.replay_stop.is_empty())
        });
    });

    assert_eq!(s2.working_set.replay_pages, w.len() as u64);
    assert_eq!(s2.working_set.replay_stop, "done");
    assert!(
        s2.vcpu_faults * 20 <= w.len() as u64,
        "{} faults",
        s2.vcpu_faults
    );
}

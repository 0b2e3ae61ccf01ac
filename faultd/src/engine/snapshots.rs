//! What faultd knows about each snapshot file it serves, learnt once per file and shared by
//! every session restoring it: its zero pages (served with `UFFDIO_ZEROPAGE` instead of a copy
//! from the file) and its content digest (the identity working-set recordings are keyed by).
//!
//! A Firecracker listener serves many restores of one snapshot, so the one pass over the file
//! ([`crate::kernel::scan`]) runs once, on a scanner thread of its own, never on a fault
//! thread: until it is done, the sessions fill pages from the file as they always did. A file
//! is known by its [`FileKey`] (device, inode, size, mtime, ctime), so a file rewritten in
//! place is scanned again and its old map is never applied to its new contents. The catalog
//! is bounded ([`MAX_FILES`] entries, oldest forgotten first; [`MAX_QUEUED`] scans waiting);
//! a scan that cannot be queued is skipped (the session serves as before) and retried by the
//! next session of that file.

use crate::kernel::scan::{self, FileKey, Scan};
use std::collections::VecDeque;
use std::fs::File;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

/// Snapshot files the catalog remembers.
pub const MAX_FILES: usize = 64;
/// Scans waiting for the scanner thread.
pub const MAX_QUEUED: usize = 8;

/// One snapshot file's analysis, ready once its scan is done.
#[derive(Debug)]
pub struct SnapshotInfo {
    key: FileKey,
    scan: OnceLock<Scan>,
    /// Whether zero pages are served as such (config `working_set.zero_pages`).
    serve_zero: bool,
}

impl SnapshotInfo {
    /// An analysis already done (tests, or a scan made elsewhere).
    pub fn ready(scan: Scan) -> SnapshotInfo {
        let info = SnapshotInfo {
            key: scan.key,
            scan: OnceLock::new(),
            serve_zero: true,
        };
        let _ = info.scan.set(scan);
        info
    }

    /// The scan, once it is done.
    pub fn scan(&self) -> Option<&Scan> {
        self.scan.get()
    }

    /// Whether the file's bytes `[offset, offset + len)` are known to be all zero (false while
    /// the scan is not done).
    pub fn is_zero(&self, offset: u64, len: u64) -> bool {
        self.serve_zero && self.scan.get().is_some_and(|s| s.zero.is_zero(offset, len))
    }

    /// The file's identity.
    pub fn key(&self) -> FileKey {
        self.key
    }
}

/// The snapshot files faultd serves, each analysed once ([`SnapshotInfo`]).
#[derive(Debug)]
pub struct Catalog {
    files: Mutex<VecDeque<Arc<SnapshotInfo>>>,
    /// None: analysis is off (config `working_set.zero_pages` and recording both off).
    jobs: Option<SyncSender<(Arc<SnapshotInfo>, File)>>,
    /// Whether sessions serve the zero pages found as zero pages.
    serve_zero: bool,
}

impl Catalog {
    /// A catalog whose scanner thread reads files of at most `max_bytes`; `enabled` false: a
    /// catalog that never analyses anything. `serve_zero`: the zero pages found are served as
    /// zero pages.
    pub fn new(enabled: bool, serve_zero: bool, max_bytes: u64) -> std::io::Result<Catalog> {
        let jobs = if enabled {
            let (tx, rx) = sync_channel::<(Arc<SnapshotInfo>, File)>(MAX_QUEUED);
            std::thread::Builder::new()
                .name("faultd-scan".into())
                .spawn(move || {
                    // Ends when the catalog (the sender) is dropped.
                    for (info, file) in rx {
                        // Nobody else holds it: every session and the catalog forgot it.
                        let keep_going = || Arc::strong_count(&info) > 1;
                        let t0 = std::time::Instant::now();
                        match scan::scan(&file, max_bytes, keep_going) {
                            Ok(s) if s.key == info.key => {
                                tracing::info!(
                                    ino = s.key.ino,
                                    bytes = s.key.size,
                                    zero_pages = s.zero.pages(),
                                    took_ms = t0.elapsed().as_millis() as u64,
                                    "snapshot file scanned"
                                );
                                let _ = info.scan.set(s);
                            }
                            Ok(_) => tracing::info!(
                                ino = info.key.ino,
                                "snapshot file changed before its scan; not used"
                            ),
                            Err(e) => tracing::info!(
                                ino = info.key.ino,
                                "snapshot file not analysed: {}",
                                crate::ops::logging::chain(&e)
                            ),
                        }
                    }
                })?;
            Some(tx)
        } else {
            None
        };
        Ok(Catalog {
            files: Mutex::new(VecDeque::new()),
            jobs,
            serve_zero,
        })
    }

    /// A catalog that analyses nothing.
    pub fn off() -> Catalog {
        Catalog {
            files: Mutex::new(VecDeque::new()),
            jobs: None,
            serve_zero: false,
        }
    }

    /// The analysis of `file` (a session's snapshot): the one already known for its current
    /// identity, or a new one whose scan is queued now. None when analysis is off, or the file
    /// cannot be stat'ed or duplicated, or the scan queue is full.
    pub fn info_for(&self, file: &File) -> Option<Arc<SnapshotInfo>> {
        let jobs = self.jobs.as_ref()?;
        let key = FileKey::of(file).ok()?;
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = files.iter().find(|i| i.key == key) {
            return Some(i.clone());
        }
        let info = Arc::new(SnapshotInfo {
            key,
            scan: OnceLock::new(),
            serve_zero: self.serve_zero,
        });
        let dup = file.try_clone().ok()?;
        match jobs.try_send((info.clone(), dup)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => return None,
        }
        files.push_back(info.clone());
        while files.len() > MAX_FILES {
            files.pop_front();
        }
        Some(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sessions_of_one_file_share_one_scan_and_a_rewrite_gets_a_new_one() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 8192]).unwrap();
        let catalog = Catalog::new(true, true, u64::MAX).unwrap();

        let a = catalog.info_for(f.as_file()).unwrap();
        let b = catalog.info_for(f.as_file()).unwrap();
        let t0 = std::time::Instant::now();
        while a.scan().is_none() && t0.elapsed() < std::time::Duration::from_secs(10) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        assert!(Arc::ptr_eq(&a, &b));
        assert!(a.is_zero(0, 8192));
        // Rewritten: another size and mtime, so another identity, analysed anew.
        f.write_all(&[1u8; 4096]).unwrap();
        let c = catalog.info_for(f.as_file()).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
    }

    #[test]
    fn a_catalog_that_is_off_analyses_nothing() {
        let f = tempfile::tempfile().unwrap();

        assert!(Catalog::new(false, false, u64::MAX)
            .unwrap()
            .info_for(&f)
            .is_none());
    }
}

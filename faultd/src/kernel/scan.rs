//! One pass over a snapshot file: which of its 4 KiB pages are all zero, and the SHA-256 digest
//! of its contents (the snapshot's identity for working-set recordings).
//!
//! Holes of a sparse file are found with `SEEK_DATA`/`SEEK_HOLE` and never read (they are zero
//! by definition; the digest hashes their zeros from a static buffer). Data is read with
//! pread(2), never through a mapping: a file that shrinks under the scan then fails the scan
//! instead of killing faultd with SIGBUS. The scan is bounded: files larger than the caller's
//! bound are refused, and so are zero maps with more runs than [`MAX_ZERO_RUNS`] (a file of
//! alternating zero and data pages would otherwise cost a run per two pages).

use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileExt, MetadataExt};

/// Bytes of a page of the zero map.
pub const ZERO_PAGE: u64 = 4096;
/// Most runs of zero pages one map holds (16 bytes each: 16 MiB at most).
pub const MAX_ZERO_RUNS: usize = 1 << 20;
/// Bytes read per pread(2).
const CHUNK: usize = 1 << 20;

/// What identifies a file's contents without reading them: a rewritten file has another
/// mtime/ctime (or size, or inode), so a scan is reused only for the contents it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileKey {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns.
    pub mtime_ns: i128,
    /// Status change time, ns.
    pub ctime_ns: i128,
}

impl FileKey {
    /// The key of `file` now (one fstat).
    pub fn of(file: &File) -> io::Result<FileKey> {
        let m = file.metadata()?;
        Ok(FileKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
        })
    }
}

/// The 4 KiB pages of a file that are all zero, as sorted, disjoint, non-adjacent runs of page
/// numbers `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZeroMap {
    runs: Vec<(u64, u64)>,
}

impl ZeroMap {
    /// Whether every byte of `[offset, offset + len)` is in zero pages (`offset` and `len`
    /// multiples of 4 KiB; anything else is answered false).
    pub fn is_zero(&self, offset: u64, len: u64) -> bool {
        if !offset.is_multiple_of(ZERO_PAGE) || !len.is_multiple_of(ZERO_PAGE) || len == 0 {
            return false;
        }
        let (first, end) = (offset / ZERO_PAGE, (offset + len) / ZERO_PAGE);
        // The last run starting at or before `first`.
        let i = self.runs.partition_point(|&(s, _)| s <= first);
        i > 0 && self.runs[i - 1].1 >= end
    }

    /// Zero pages in the map.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }

    /// The runs, `[start, end)` page numbers in order.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// A map of `runs` (sorted, disjoint; adjacent ones are merged). None if they are not.
    pub fn from_runs(runs: &[(u64, u64)]) -> Option<ZeroMap> {
        let mut map = ZeroMap::default();
        for &(s, e) in runs {
            if s >= e || map.runs.last().is_some_and(|&(_, le)| s < le) {
                return None;
            }
            map.push(s, e);
        }
        Some(map)
    }

    fn push(&mut self, start: u64, end: u64) {
        match self.runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => self.runs.push((start, end)),
        }
    }
}

/// What one pass over a file found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scan {
    /// The file's identity when scanned (the same before and after the pass).
    pub key: FileKey,
    /// SHA-256 of the contents.
    pub digest: [u8; 32],
    /// Its zero pages.
    pub zero: ZeroMap,
}

/// Why a scan produced nothing.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The file could not be read.
    #[error("reading the snapshot file")]
    Read(#[source] io::Error),
    /// Larger than the bound.
    #[error("the snapshot file has {size} bytes, more than the {max} a scan reads")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// Zero and data pages alternate too often for a bounded map.
    #[error("the snapshot file's zero pages form more than {MAX_ZERO_RUNS} runs")]
    TooFragmented,
    /// The file changed while it was read.
    #[error("the snapshot file changed while it was scanned")]
    Changed,
    /// The caller gave up on it.
    #[error("the scan was cancelled")]
    Cancelled,
}

/// Where the next data starts at or after `at` (`SEEK_DATA`), or None: only a hole to the end.
fn next_data(file: &File, at: u64) -> io::Result<Option<u64>> {
    use nix::unistd::{lseek, Whence};
    match lseek(file.as_fd(), at as i64, Whence::SeekData) {
        Ok(off) => Ok(Some(off as u64)),
        Err(nix::errno::Errno::ENXIO) => Ok(None),
        // A file system without SEEK_DATA: all of it is data.
        Err(nix::errno::Errno::EINVAL) => Ok(Some(at)),
        Err(e) => Err(e.into()),
    }
}

/// Where the hole after `at` starts (`SEEK_HOLE`; the end of the file at worst).
fn next_hole(file: &File, at: u64, size: u64) -> io::Result<u64> {
    use nix::unistd::{lseek, Whence};
    match lseek(file.as_fd(), at as i64, Whence::SeekHole) {
        Ok(off) => Ok((off as u64).min(size)),
        Err(nix::errno::Errno::EINVAL) => Ok(size),
        Err(e) => Err(e.into()),
    }
}

/// Scans `file` (at most `max_bytes` long), calling `keep_going` between chunks (false:
/// cancelled).
pub fn scan(
    file: &File,
    max_bytes: u64,
    mut keep_going: impl FnMut() -> bool,
) -> Result<Scan, ScanError> {
    static ZEROS: [u8; CHUNK] = [0; CHUNK];
    let key = FileKey::of(file).map_err(ScanError::Read)?;
    let size = key.size;
    if size > max_bytes {
        return Err(ScanError::TooLarge {
            size,
            max: max_bytes,
        });
    }
    let mut hash = Sha256::new();
    let mut zero = ZeroMap::default();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    let add_zero = |zero: &mut ZeroMap, from: u64, to: u64| -> Result<(), ScanError> {
        // `from` is page aligned, and `to` too unless it is the end of the file (a partial last
        // page reads zero past the end).
        let (s, e) = (from / ZERO_PAGE, to.div_ceil(ZERO_PAGE));
        if s < e {
            zero.push(s, e);
            if zero.runs.len() > MAX_ZERO_RUNS {
                return Err(ScanError::TooFragmented);
            }
        }
        Ok(())
    };
    while pos < size {
        if !keep_going() {
            return Err(ScanError::Cancelled);
        }
        let data = next_data(file, pos)
            .map_err(ScanError::Read)?
            .unwrap_or(size);
        // Page boundaries keep every read and zero page aligned (a file system with blocks
        // smaller than a page may report holes inside one: its data part is read as data).
        let data = (data.min(size) / ZERO_PAGE * ZERO_PAGE).max(pos);
        if data > pos {
            // A hole [pos, data): hashed as zeros, never read.
            let mut left = data - pos;
            while left > 0 {
                let n = left.min(CHUNK as u64) as usize;
                hash.update(&ZEROS[..n]);
                left -= n as u64;
            }
            add_zero(&mut zero, pos, data)?;
            pos = data;
            continue;
        }
        let hole = next_hole(file, pos, size)
            .map_err(ScanError::Read)?
            .next_multiple_of(ZERO_PAGE)
            .clamp(pos + 1, size);
        // Data [pos, hole), read a chunk at a time on page boundaries.
        while pos < hole {
            if !keep_going() {
                return Err(ScanError::Cancelled);
            }
            let n = (hole - pos).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, pos).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    ScanError::Changed
                } else {
                    ScanError::Read(e)
                }
            })?;
            hash.update(&*chunk);
            for (i, page) in chunk.chunks(ZERO_PAGE as usize).enumerate() {
                if page.iter().all(|&b| b == 0) {
                    let at = pos + i as u64 * ZERO_PAGE;
                    // A short last page is whole only at the end of the file.
                    if page.len() as u64 == ZERO_PAGE || at + page.len() as u64 == size {
                        add_zero(&mut zero, at, at + page.len() as u64)?;
                    }
                }
            }
            pos += n as u64;
        }
    }
    if FileKey::of(file).map_err(ScanError::Read)? != key {
        return Err(ScanError::Changed);
    }
    Ok(Scan {
        key,
        digest: hash.finalize().into(),
        zero,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(pages: &[u8]) -> File {
        // Page i is filled with byte pages[i] (0: a zero page, written as data).
        let mut f = tempfile::tempfile().unwrap();
        for &b in pages {
            f.write_all(&[b; 4096]).unwrap();
        }
        f
    }

    #[test]
    fn zero_pages_written_as_data_and_holes_are_found() {
        let f = file_with(&[0, 1, 0, 0, 2]);
        // A hole of 3 pages past the end, then one data page.
        f.write_all_at(&[3; 4096], 8 * 4096).unwrap();

        let s = scan(&f, u64::MAX, || true).unwrap();

        assert_eq!(s.zero.runs(), &[(0, 1), (2, 4), (5, 8)]);
        assert!(s.zero.is_zero(2 * 4096, 2 * 4096));
        assert!(!s.zero.is_zero(4096, 4096));
        assert!(!s.zero.is_zero(3 * 4096, 3 * 4096));
        let mut all = Vec::new();
        for b in [0u8, 1, 0, 0, 2, 0, 0, 0, 3] {
            all.extend_from_slice(&[b; 4096]);
        }
        assert_eq!(s.digest, <[u8; 32]>::from(Sha256::digest(&all)));
    }

    #[test]
    fn a_file_larger_than_the_bound_is_not_scanned() {
        let f = file_with(&[1, 1]);

        let e = scan(&f, 4096, || true).unwrap_err();

        assert!(matches!(e, ScanError::TooLarge { size: 8192, .. }), "{e}");
    }

    #[test]
    fn a_cancelled_scan_gives_nothing() {
        let f = file_with(&[1]);

        assert!(matches!(
            scan(&f, u64::MAX, || false),
            Err(ScanError::Cancelled)
        ));
    }

    #[test]
    fn zero_map_from_runs_refuses_overlap_and_merges_neighbours() {
        assert!(ZeroMap::from_runs(&[(0, 4), (2, 6)]).is_none());
        assert!(ZeroMap::from_runs(&[(3, 3)]).is_none());
        let m = ZeroMap::from_runs(&[(0, 2), (2, 4), (8, 9)]).unwrap();
        assert_eq!(m.runs(), &[(0, 4), (8, 9)]);
        assert_eq!(m.pages(), 5);
    }
}

//! Which pages of guest memory are present, asked of the kernel: what a restarted faultd
//! trusts over its journal (see [`crate::engine::FaultServer::resume`]).
//!
//! Both answers err only towards "absent" (a page present but reported absent costs an install
//! that finds it there, EEXIST); never towards "present", which would leave a page nobody
//! serves.

use std::io;
use std::os::fd::BorrowedFd;

use nix::unistd::{lseek, Whence};

/// Page indexes of `[offset, offset + size)` of a shmem (memfd) file that hold data, by
/// `SEEK_DATA`/`SEEK_HOLE`: shmem answers from its page cache, counting swapped-out pages as
/// data. Cost: two calls per run of present pages.
pub fn shmem_present(
    fd: BorrowedFd<'_>,
    offset: u64,
    size: u64,
    page: u64,
) -> io::Result<Vec<u64>> {
    let end = offset + size;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match lseek(fd, pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            // No data at or after pos.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = (lseek(fd, data as i64, Whence::SeekHole)? as u64).min(end);
        let first = (data - offset) / page;
        let last = (hole - offset).div_ceil(page);
        out.extend(first..last);
        pos = hole.max(data + 1);
    }
    Ok(out)
}

/// Page indexes of the VMM's mapping `[hva, hva + size)` that its page tables map, from
/// `/proc/<pid>/pagemap` (present: in RAM). For hugetlbfs memory, which has no
/// `SEEK_DATA`: a huge page gets into the file only by being faulted in or installed through
/// the VMM's registered mapping (faultd never touches its own mapping of an absent page), so
/// present in the file means mapped there.
pub fn mapped_present(pid: i32, hva: u64, size: u64, page: u64) -> io::Result<Vec<u64>> {
    let pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    Ok(
        crate::kernel::remote::pagemap_status(&pagemap, hva, size / page, page)?
            .iter()
            .enumerate()
            .filter(|(_, &s)| s == crate::kernel::remote::PageStatus::Present)
            .map(|(i, _)| i as u64)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;

    #[test]
    fn shmem_pages_written_are_present_and_holes_are_not() {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::empty()).unwrap();
        let f = std::fs::File::from(fd);
        f.set_len(64 * 4096).unwrap();
        for p in [0u64, 1, 2, 10, 63] {
            f.write_all_at(&[1], p * 4096 + 7).unwrap();
        }
        assert_eq!(
            shmem_present(f.as_fd(), 0, 64 * 4096, 4096).unwrap(),
            vec![0, 1, 2, 10, 63]
        );
        // A region carved from the middle of the file counts from its own start.
        assert_eq!(
            shmem_present(f.as_fd(), 8 * 4096, 8 * 4096, 4096).unwrap(),
            vec![2]
        );
        assert!(shmem_present(f.as_fd(), 3 * 4096, 7 * 4096, 4096)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn pagemap_shows_the_touched_pages_of_a_mapping() {
        let len = 16 * 4096;
        let mut v = vec![0u8; len + 4096];
        let base = (v.as_ptr() as u64).next_multiple_of(4096);
        let skip = (base - v.as_ptr() as u64) as usize;
        v[skip + 3 * 4096] = 1;
        std::hint::black_box(&v);
        let present = mapped_present(std::process::id() as i32, base, len as u64, 4096).unwrap();
        assert!(present.contains(&3), "{present:?}");
        drop(v);
    }
}

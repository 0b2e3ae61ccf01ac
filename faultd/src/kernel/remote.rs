//! Guest RAM that is another process's anonymous private memory (Firecracker's): faultd has no
//! fd for it, so it cannot save a page and punch it out as it does for a memfd. The kernel
//! offers two things across processes, and eviction of such memory is built on them:
//! - `/proc/<pid>/pagemap`: which pages are in RAM (bit 63), which are in swap (bit 62);
//! - `process_madvise(MADV_PAGEOUT)`: reclaim pages now, anonymous ones to swap. It is the one
//!   reclaiming advice the kernel takes for another process (MADV_DONTNEED is refused with
//!   EINVAL there: checked on this kernel, 6.18).
//!
//! A paged-out page goes to the kernel's swap, not to faultd's store, and comes back by the
//! kernel's own swap-in when the VM touches it: its PTE holds a swap entry, so no userfault is
//! raised and the page never needs faultd again. No write can be lost on the way: the kernel
//! unmaps the page before writing it out, and a write meanwhile faults and waits for it. Without
//! swap the kernel keeps anonymous pages where they are, so this needs swap to be enabled.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// pagemap entry bit: the page is in RAM.
const PRESENT: u64 = 1 << 63;
/// pagemap entry bit: the page is in swap.
const SWAPPED: u64 = 1 << 62;
/// The pagemap's unit: one entry per base page, whatever the mapping's page size.
const BASE_PAGE: u64 = 4096;
/// Ranges per process_madvise call (the kernel's UIO_MAXIOV).
const MAX_IOV: usize = 1024;
/// `MADV_PAGEOUT` (linux/mman-common.h).
const MADV_PAGEOUT: i32 = 21;

/// One page's state in the other process, as its pagemap says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageStatus {
    /// In RAM.
    Present,
    /// In swap (paged out; the kernel brings it back on touch).
    Swapped,
    /// Neither: never populated, or dropped (a userfault brings it back).
    None,
}

impl PageStatus {
    fn of(entry: u64) -> PageStatus {
        if entry & PRESENT != 0 {
            PageStatus::Present
        } else if entry & SWAPPED != 0 {
            PageStatus::Swapped
        } else {
            PageStatus::None
        }
    }
}

/// Another process's memory, held by a pidfd (for process_madvise) and its pagemap, both opened
/// while the process was known to be the one connected, so a later pid reuse cannot redirect
/// either to another process.
#[derive(Debug)]
pub struct RemoteMm {
    pidfd: OwnedFd,
    pagemap: File,
}

impl RemoteMm {
    /// Opens the memory of the process `pidfd` refers to, whose pid is `pid`. The pagemap is
    /// opened by pid, so the pidfd is checked afterwards: a process that has not exited still
    /// owns its pid, so the pagemap opened is its own.
    pub fn open(pidfd: OwnedFd, pid: i32) -> io::Result<RemoteMm> {
        let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
        let mut fds = [nix::poll::PollFd::new(
            pidfd.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO)?;
        if fds[0].any().unwrap_or(true) {
            return Err(io::Error::other(format!(
                "process {pid} exited before its memory could be opened"
            )));
        }
        Ok(RemoteMm { pidfd, pagemap })
    }

    /// The status of each of the `count` pages of `page_size` bytes from `addr` (see
    /// [`pagemap_status`]).
    pub fn status(&self, addr: u64, count: u64, page_size: u64) -> io::Result<Vec<PageStatus>> {
        pagemap_status(&self.pagemap, addr, count, page_size)
    }

    /// Asks the kernel to page out `ranges` (address, length) now. Returns the bytes it took
    /// the advice for; whether each page went is for [`RemoteMm::status`] to say (a page
    /// another process maps too, or one under I/O, stays).
    pub fn page_out(&self, ranges: &[(u64, u64)]) -> io::Result<u64> {
        let mut advised = 0;
        for chunk in ranges.chunks(MAX_IOV) {
            let iov: Vec<libc::iovec> = chunk
                .iter()
                .map(|&(addr, len)| libc::iovec {
                    iov_base: addr as *mut libc::c_void,
                    iov_len: len as usize,
                })
                .collect();
            // SAFETY: process_madvise reads `iov.len()` iovecs from `iov`, which lives across
            // the call; the addresses in them are the other process's and are never
            // dereferenced here; the pidfd is open (owned by self).
            let n = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    self.pidfd.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len(),
                    MADV_PAGEOUT,
                    0u32,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            advised += n as u64;
        }
        Ok(advised)
    }
}

/// Base pages whose pagemap entries one read takes: 64 KiB at a time, however large the
/// memory (8 bytes per 4 KiB page would be 2 MiB per GiB in one buffer).
const READ_ENTRIES: u64 = 8192;

/// The status of each of the `count` pages of `page_size` bytes from `addr`, from `pagemap`
/// (a process's `/proc/<pid>/pagemap`), read in runs of `READ_ENTRIES`; the first base page of
/// each page speaks for it.
pub fn pagemap_status(
    pagemap: &File,
    addr: u64,
    count: u64,
    page_size: u64,
) -> io::Result<Vec<PageStatus>> {
    let per = (page_size / BASE_PAGE).max(1);
    // Whole pages per read (at least one, even a 1 GiB one).
    let pages_per_read = (READ_ENTRIES / per).max(1);
    let mut out = Vec::with_capacity(count as usize);
    let mut raw = Vec::new();
    let mut page = 0;
    while page < count {
        let n = pages_per_read.min(count - page);
        raw.resize((n * per * 8) as usize, 0);
        let first_entry = addr / BASE_PAGE + page * per;
        pagemap.read_exact_at(&mut raw, first_entry * 8)?;
        out.extend(
            raw.chunks_exact(8 * per as usize)
                .map(|e| PageStatus::of(u64::from_le_bytes(e[..8].try_into().expect("8 bytes")))),
        );
        page += n;
    }
    Ok(out)
}

/// A pidfd of process `pid` (readable once it exits).
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as std::os::fd::RawFd) })
}

/// Why anonymous memory cannot be paged out while [`swap_available`] says no.
pub const NO_SWAP: &str =
    "no swap is enabled, and the kernel pages anonymous memory out only to swap";

/// Whether the kernel has swap to page anonymous memory out to (any free swap space).
pub fn swap_available() -> io::Result<bool> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let free_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("SwapFree:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| io::Error::other("no SwapFree line in /proc/meminfo"))?;
    Ok(free_kib > 0)
}

/// Merges sorted page addresses into (address, length) runs, for fewer iovecs.
pub fn runs(addrs: &[u64], page_size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &a in addrs {
        match out.last_mut() {
            Some((start, len)) if *start + *len == a => *len += page_size,
            _ => out.push((a, page_size)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_adjacent_pages_only() {
        assert_eq!(
            runs(&[0x1000, 0x2000, 0x3000, 0x5000, 0x7000, 0x8000], 0x1000),
            vec![(0x1000, 0x3000), (0x5000, 0x1000), (0x7000, 0x2000)]
        );
        assert!(runs(&[], 0x1000).is_empty());
    }

    #[test]
    fn pagemap_of_this_process_shows_touched_pages_present_and_untouched_none() {
        use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
        let len = 8 * 4096;
        // SAFETY: a fresh private anonymous mapping, touched only through `p` below within its
        // length, and unmapped at the end.
        let p = unsafe {
            mmap_anonymous(
                None,
                std::num::NonZeroUsize::new(len).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .unwrap();
        let base = p.as_ptr() as u64;
        for page in [1u64, 5] {
            // SAFETY: inside the mapping made above.
            unsafe { std::ptr::write_volatile((base + page * 4096) as *mut u8, 7) };
        }
        let me = nix::unistd::getpid().as_raw();
        let fd = pidfd_open(me).unwrap();
        let mm = RemoteMm::open(fd, me).unwrap();
        let st = mm.status(base, 8, 4096).unwrap();
        let present: Vec<usize> = (0..8).filter(|&i| st[i] == PageStatus::Present).collect();
        assert_eq!(present, vec![1, 5]);
        assert!(st
            .iter()
            .enumerate()
            .all(|(i, s)| present.contains(&i) || *s == PageStatus::None));
        // SAFETY: the mapping made above, no longer used.
        unsafe { munmap(p, len) }.unwrap();
    }

    #[test]
    fn a_pagemap_larger_than_one_read_is_read_whole_and_in_order() {
        use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
        // Three reads and a bit: pages either side of each read boundary are touched.
        let pages = 3 * READ_ENTRIES + 5;
        let len = (pages * 4096) as usize;
        // SAFETY: a fresh private anonymous mapping, touched only through `p` below within its
        // length, and unmapped at the end.
        let p = unsafe {
            mmap_anonymous(
                None,
                std::num::NonZeroUsize::new(len).unwrap(),
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .unwrap();
        // 4 KiB pages only: a transparent huge page would make 511 untouched neighbours present.
        // SAFETY: advice on the mapping made above; it changes no contents.
        unsafe { nix::sys::mman::madvise(p, len, nix::sys::mman::MmapAdvise::MADV_NOHUGEPAGE) }
            .unwrap();
        let base = p.as_ptr() as u64;
        let touched = [
            0,
            READ_ENTRIES - 1,
            READ_ENTRIES,
            2 * READ_ENTRIES + 1,
            pages - 1,
        ];
        for page in touched {
            // SAFETY: inside the mapping made above.
            unsafe { std::ptr::write_volatile((base + page * 4096) as *mut u8, 1) };
        }
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let st = pagemap_status(&pagemap, base, pages, 4096).unwrap();
        assert_eq!(st.len() as u64, pages);
        let present: Vec<u64> = (0..pages)
            .filter(|&i| st[i as usize] == PageStatus::Present)
            .collect();
        assert_eq!(present, touched);
        // SAFETY: the mapping made above, no longer used.
        unsafe { munmap(p, len) }.unwrap();
    }
}

//! A Firecracker stand-in for tests and the restore benchmark: it restores guest memory the way
//! Firecracker's `PUT /snapshot/load` with a Uffd `mem_backend` does, on the wire and in memory.
//!
//! - guest RAM: one **anonymous private** mapping per region (`MAP_HUGETLB | MAP_HUGE_2MB` for
//!   2 MiB pages), never touched before the restore;
//! - a userfaultfd created non-blocking and close-on-exec, with EVENT_REMOVE, not
//!   user-mode-only (KVM's own accesses must fault into it too), every region registered
//!   MISSING;
//! - a `SOCK_STREAM` connection to the handler's socket and ONE `sendmsg` carrying the JSON
//!   array of `GuestRegionUffdMapping` and the uffd as `SCM_RIGHTS`; the socket is then held
//!   open (1.12+) or closed at once (older versions, [`WireForm::Legacy`]).
//!
//! The JSON is written here by hand, independently of faultd's parser, as Firecracker's serde
//! derive writes it.

use std::fs::File;
use std::io::{IoSlice, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;
use std::time::Duration;

use faultd_client::RamPageSize;
use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};

/// 4 KiB.
pub const PAGE: u64 = 4096;

/// Guest RAM as Firecracker maps it: anonymous, private, untouched.
#[derive(Debug)]
pub struct AnonRam {
    host: NonNull<u8>,
    size: u64,
    page_size: RamPageSize,
}

// SAFETY: only the address of a private mapping this type owns is held; no reference into it
// is ever created, so the handle may move between and be shared by threads.
unsafe impl Send for AnonRam {}
// SAFETY: as above.
unsafe impl Sync for AnonRam {}

impl AnonRam {
    /// Maps `size` bytes, anonymous private, of `page_size` pages (2 MiB: hugetlb, which needs
    /// reserved huge pages).
    pub fn new(size: u64, page_size: RamPageSize) -> std::io::Result<AnonRam> {
        let len = std::num::NonZeroUsize::new(size as usize)
            .ok_or_else(|| std::io::Error::other("empty region"))?;
        let mut flags = MapFlags::MAP_PRIVATE | MapFlags::MAP_ANONYMOUS | MapFlags::MAP_NORESERVE;
        if page_size == RamPageSize::Size2M {
            flags |= MapFlags::MAP_HUGETLB | MapFlags::MAP_HUGE_2MB;
        }
        // SAFETY: a fresh mapping at a kernel-chosen address cannot alias any Rust object; it
        // is unmapped only in Drop.
        let host = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                flags,
            )
        }?;
        Ok(AnonRam {
            host: host.cast(),
            size,
            page_size,
        })
    }

    /// Start of the mapping (what KVM's memory slot points at).
    pub fn host_ptr(&self) -> NonNull<u8> {
        self.host
    }

    /// Start of the mapping, as a number.
    pub fn host_addr(&self) -> u64 {
        self.host.as_ptr() as u64
    }

    /// Bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Page size.
    pub fn page_size(&self) -> RamPageSize {
        self.page_size
    }
}

impl Drop for AnonRam {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; no reference into it exists.
        let _ = unsafe { munmap(self.host.cast(), self.size as usize) };
    }
}

/// One guest memory region: its memory and where its contents are in the snapshot file.
#[derive(Debug)]
pub struct FcRegion {
    /// The region's memory.
    pub ram: AnonRam,
    /// Offset of its contents in the memory snapshot file.
    pub offset: u64,
}

/// How the message is written, by Firecracker version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireForm {
    /// 1.12 and later: `page_size` and the deprecated `page_size_kib` (bytes), socket kept open.
    Current,
    /// Before 1.12: `page_size_kib` only (bytes), socket closed right after the message.
    Legacy,
}

/// A restore in progress, as Firecracker holds it.
#[derive(Debug)]
pub struct FcRestore {
    // Field order is drop order: the socket (the session) goes first, then the uffd, then RAM.
    socket: Option<UnixStream>,
    /// The userfaultfd every region is registered with.
    pub uffd: Uffd,
    /// The regions, in the order of the message.
    pub regions: Vec<FcRegion>,
}

impl FcRestore {
    /// Maps one region per `(size, file offset)` with `page_size` pages, creates the uffd as
    /// Firecracker does and registers every region MISSING.
    pub fn new(layout: &[(u64, u64)], page_size: RamPageSize) -> std::io::Result<FcRestore> {
        let regions = layout
            .iter()
            .map(|&(size, offset)| {
                Ok(FcRegion {
                    ram: AnonRam::new(size, page_size)?,
                    offset,
                })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::EVENT_REMOVE)
            .create()
            .map_err(std::io::Error::other)?;
        for r in &regions {
            uffd.register(r.ram.host_ptr().as_ptr().cast(), r.ram.size() as usize)
                .map_err(std::io::Error::other)?;
        }
        Ok(FcRestore {
            socket: None,
            uffd,
            regions,
        })
    }

    /// The JSON Firecracker sends for these regions.
    pub fn message(&self, form: WireForm) -> String {
        let entries: Vec<String> = self
            .regions
            .iter()
            .map(|r| {
                let page = r.ram.page_size().bytes();
                let sizes = match form {
                    WireForm::Current => format!(r#""page_size":{page},"page_size_kib":{page}"#),
                    WireForm::Legacy => format!(r#""page_size_kib":{page}"#),
                };
                format!(
                    r#"{{"base_host_virt_addr":{},"size":{},"offset":{},{sizes}}}"#,
                    r.ram.host_addr(),
                    r.ram.size(),
                    r.offset
                )
            })
            .collect();
        format!("[{}]", entries.join(","))
    }

    /// Connects to `socket` and sends the message with the uffd in one sendmsg. `Current`
    /// keeps the socket open (the session lives until [`FcRestore::hang_up`] or drop);
    /// `Legacy` closes it at once, as older Firecrackers do.
    pub fn send(&mut self, socket: &Path, form: WireForm) -> std::io::Result<()> {
        let message = self.message(form);
        let stream = send_raw(socket, message.as_bytes(), &[self.uffd.as_fd()])?;
        if form == WireForm::Current {
            self.socket = Some(stream);
        }
        Ok(())
    }

    /// Closes the socket, as Firecracker's exit does: faultd ends the session.
    pub fn hang_up(&mut self) {
        self.socket = None;
    }

    /// Host address of byte `off` of region `r`.
    pub fn addr(&self, r: usize, off: u64) -> u64 {
        assert!(off < self.regions[r].ram.size());
        self.regions[r].ram.host_addr() + off
    }
}

/// Connects to `socket` and sends `bytes` with `fds` attached in one sendmsg, as Firecracker
/// does; returns the connection.
pub fn send_raw(
    socket: &Path,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect(socket)?;
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    assert_eq!(sent, bytes.len(), "one sendmsg carries the whole message");
    Ok(stream)
}

/// Connects to `socket` and sends `bytes` with `fds` as [`send_raw`] does, for a peer that
/// may refuse the connection before reading anything: whether it did close the connection
/// within `timeout` (the send itself may already find it closed).
pub fn refused_at_once(
    socket: &Path,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    timeout: Duration,
) -> bool {
    match send_raw(socket, bytes, fds) {
        Ok(mut stream) => closed_by_peer(&mut stream, timeout),
        Err(e) => matches!(e.raw_os_error(), Some(libc::EPIPE) | Some(libc::ECONNRESET)),
    }
}

/// Whether the peer closed `stream` within `timeout` (reads until EOF, dropping any bytes). A
/// peer that closes without reading what was sent resets the connection instead: that counts.
pub fn closed_by_peer(stream: &mut UnixStream, timeout: Duration) -> bool {
    use std::io::Read;
    stream
        .set_read_timeout(Some(timeout))
        .expect("socket timeout");
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

/// Writes a memory snapshot file for regions `(gpa, size, file offset)`: every dword of a
/// region holds `testvmm::pattern(gpa of that dword, seed)`, what a guest's `Verify` workload
/// expects. The file is as long as the furthest region end.
pub fn pattern_snapshot(path: &Path, regions: &[(u64, u64, u64)], seed: u32) -> File {
    use std::os::unix::fs::FileExt;
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .expect("creating snapshot file");
    const CHUNK: u64 = 1 << 20;
    let mut buf = Vec::with_capacity(CHUNK as usize);
    for &(gpa, size, offset) in regions {
        let mut done = 0;
        while done < size {
            let n = CHUNK.min(size - done);
            buf.clear();
            for i in 0..n / 4 {
                buf.extend_from_slice(&testvmm::pattern(gpa + done + i * 4, seed).to_le_bytes());
            }
            f.write_all_at(&buf, offset + done)
                .expect("writing snapshot file");
            done += n;
        }
    }
    let end = regions.iter().map(|&(_, s, o)| o + s).max().unwrap_or(0);
    f.set_len(end).expect("sizing snapshot file");
    let mut f = f;
    f.flush().expect("flushing snapshot file");
    f
}

/// Copies `len` bytes at each of `addrs` (this process's memory) from a helper thread; a fault
/// there blocks until the handler serves it, so a stuck handler fails the caller after
/// `timeout` instead of hanging it.
pub fn copy_with_timeout(addrs: Vec<u64>, len: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let pages: Vec<Vec<u8>> = addrs
            .iter()
            .map(|&a| {
                let mut v = vec![0u8; len];
                // SAFETY: the callers pass addresses of live guest RAM mappings of this process
                // with `len` bytes behind them; copying out creates no reference into it.
                unsafe { std::ptr::copy_nonoverlapping(a as *const u8, v.as_mut_ptr(), len) };
                v
            })
            .collect();
        let _ = tx.send(pages);
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| stuck("guest RAM access was not served in time", timeout))
}

/// Fails a test whose helper thread is stuck on a fault nobody serves. The panic unwinds
/// through the restore, which unmaps guest RAM under that thread, so the process dies of
/// SIGSEGV before the harness prints the captured panic: the reason goes to fd 2 first.
fn stuck(what: &str, timeout: Duration) -> ! {
    use std::io::Write;
    let msg = format!("{what} ({timeout:?}): the fault is not being served\n");
    let _ = std::io::stderr().write_all(msg.as_bytes());
    panic!("{msg}");
}

/// Discards `[addr, addr + len)` with MADV_DONTNEED, as Firecracker's balloon does, from a
/// helper thread: with EVENT_REMOVE the call waits until the handler has read the REMOVE
/// event, so a stuck handler fails the caller after `timeout`.
pub fn balloon_discard(addr: u64, len: u64, timeout: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: the range is inside a live private mapping of guest RAM; MADV_DONTNEED drops
        // its pages and no Rust reference points into guest RAM.
        let rc = unsafe { libc::madvise(addr as *mut _, len as usize, libc::MADV_DONTNEED) };
        let _ = tx.send(if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        });
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| stuck("MADV_DONTNEED did not return in time", timeout))
        .expect("MADV_DONTNEED");
}

/// (in RAM, in swap) for each of this process's pages at `addrs`, from its own pagemap: the
/// stand-in's memory is this process's, as Firecracker's is Firecracker's.
pub fn own_pages(addrs: &[u64]) -> Vec<(bool, bool)> {
    use std::os::unix::fs::FileExt;
    let pagemap = File::open("/proc/self/pagemap").expect("opening /proc/self/pagemap");
    addrs
        .iter()
        .map(|&a| {
            let mut e = [0u8; 8];
            pagemap
                .read_exact_at(&mut e, a / PAGE * 8)
                .expect("reading /proc/self/pagemap");
            let e = u64::from_le_bytes(e);
            (e >> 63 & 1 == 1, e >> 62 & 1 == 1)
        })
        .collect()
}

//! The baseline of the Firecracker restore benchmark (`benches/firecracker_restore.rs`): a
//! minimal single-threaded page-fault handler of the kind Firecracker ships as an example
//! (its `uffd` example handlers), serving a [`crate::firecracker`] restore.
//!
//! What it does, and no more: listens on a socket; accepts one connection; receives the JSON
//! regions with the uffd; maps the memory snapshot file (`MAP_PRIVATE`, read-only); then
//! loops: poll(2) on the uffd, read every pending event, and answer each page fault with one
//! `UFFDIO_COPY` from the mapped file at `offset + (addr - base_host_virt_addr)` (EEXIST:
//! wake). REMOVE events are not needed by the benchmark and are ignored.
//!
//! Firecracker's example handlers are processes of their own, and so is the benchmark's
//! baseline ([`ExampleProcess`], the `fc-example-handler` binary). The same loop on a thread of
//! the restoring process ([`ExampleHandler`]) is measured for reference: it saves the address
//! space switches between the faulting thread and the handler, which no real external handler
//! can.

use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use userfaultfd::{Event, Uffd};

use crate::bench::ServingThread;

/// One region of Firecracker's message, as the example handlers read it.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    base: u64,
    size: u64,
    offset: u64,
    page_size: u64,
}

/// What the handler did, returned when it stops.
#[derive(Debug, Default)]
pub struct ExampleStats {
    /// Faults answered with a copy.
    pub copied: u64,
    /// Faults found present (EEXIST: woken only).
    pub already_present: u64,
}

/// Serves the restore that connected on `stream` from `snapshot`: receives the message, maps
/// the file, then serves faults for as long as `wait(uffd)` (which sleeps until the uffd is
/// readable) says to go on.
pub fn serve_restore(
    stream: &UnixStream,
    snapshot: &Path,
    mut wait: impl FnMut(BorrowedFd<'_>) -> io::Result<bool>,
) -> io::Result<ExampleStats> {
    let (regions, uffd) = receive(stream.as_raw_fd())?;
    let file = std::fs::File::open(snapshot)?;
    let len = file.metadata()?.len();
    let backing = map_file(&file, len)?;
    let mut stats = ExampleStats::default();
    while wait(uffd.as_fd())? {
        while let Some(event) = uffd.read_event().map_err(io::Error::other)? {
            let Event::Pagefault { addr, .. } = event else {
                continue;
            };
            serve_fault(&uffd, &regions, backing.0, addr as u64, &mut stats)?;
        }
    }
    // SAFETY: exactly the mapping map_file made; the loop above is done with it.
    let _ = unsafe { nix::sys::mman::munmap(backing.0, backing.1) };
    Ok(stats)
}

/// The process form (Firecracker's example handlers are processes of their own): serves the
/// first restore that connects to `listener` until its socket hangs up.
pub fn serve_process(listener: &UnixListener, snapshot: &Path) -> io::Result<ExampleStats> {
    let (stream, _) = listener.accept()?;
    serve_restore(&stream, snapshot, |uffd| {
        let mut fds = [
            PollFd::new(uffd, PollFlags::POLLIN),
            PollFd::new(stream.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        // Nothing is ever sent on the socket: readable means hung up.
        Ok(fds[1].revents().is_none_or(|r| r.is_empty()))
    })
}

/// The example-style handler serving one restore on a thread of this process (the process
/// form is the `fc-example-handler` binary, [`ExampleProcess`]).
#[derive(Debug)]
pub struct ExampleHandler {
    thread: ServingThread<ExampleStats>,
}

impl ExampleHandler {
    /// Binds `socket` (before returning, so a restore may connect at once) and serves the first
    /// restore that connects there from `snapshot`.
    pub fn spawn(socket: &Path, snapshot: &Path) -> io::Result<ExampleHandler> {
        let listener = UnixListener::bind(socket)?;
        listener.set_nonblocking(true)?;
        let snapshot: PathBuf = snapshot.to_owned();
        let thread = ServingThread::spawn("fc-example".into(), "example handler", move |stop| {
            // Accept, waking to stop if nothing connects.
            let stream = loop {
                if !stop.wait(listener.as_fd())? {
                    return Ok(ExampleStats::default());
                }
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            };
            stream.set_nonblocking(false)?;
            serve_restore(&stream, &snapshot, |uffd| stop.wait(uffd))
        })?;
        Ok(ExampleHandler { thread })
    }

    /// CPU time the serving thread has used, in ns.
    pub fn cpu_ns(&self) -> io::Result<u64> {
        self.thread.cpu_ns()
    }

    /// Stops the handler and returns what it did.
    pub fn stop(self) -> io::Result<ExampleStats> {
        self.thread.stop()
    }
}

/// Path of the `fc-example-handler` binary, built in the caller's profile.
pub fn example_handler_bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        escargot::CargoBuild::new()
            .package("faultd-tests")
            .bin("fc-example-handler")
            .current_release()
            .run()
            .expect("building fc-example-handler")
            .path()
            .to_owned()
    })
}

/// The example-style handler as a process of its own, serving one restore.
#[derive(Debug)]
pub struct ExampleProcess {
    child: Child,
}

impl ExampleProcess {
    /// Starts the handler on `socket`, in a process that also has `idle_threads` threads that
    /// never run (see the binary); returns once it listens.
    pub fn spawn(
        socket: &Path,
        snapshot: &Path,
        idle_threads: usize,
    ) -> io::Result<ExampleProcess> {
        let mut child = Command::new(example_handler_bin())
            .arg("--idle-threads")
            .arg(idle_threads.to_string())
            .arg(socket)
            .arg(snapshot)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        let stdout = child.stdout.as_mut().expect("piped stdout");
        BufReader::new(stdout).read_line(&mut line)?;
        if line.trim() != "listening" {
            let _ = child.kill();
            return Err(io::Error::other(format!("handler said {line:?}")));
        }
        Ok(ExampleProcess { child })
    }

    /// Its pid (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for it to exit (after the restore hung up) and returns what it did.
    pub fn finish(mut self) -> io::Result<ExampleStats> {
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .expect("piped stdout")
            .read_to_string(&mut out)?;
        let status = self.child.wait()?;
        let copied = out
            .lines()
            .find_map(|l| l.strip_prefix("copied "))
            .and_then(|n| n.trim().parse().ok());
        match (status.success(), copied) {
            (true, Some(copied)) => Ok(ExampleStats {
                copied,
                already_present: 0,
            }),
            _ => Err(io::Error::other(format!("handler exited {status}: {out}"))),
        }
    }
}

impl Drop for ExampleProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Receives the one message: the JSON regions and the uffd.
fn receive(fd: RawFd) -> io::Result<(Vec<Mapping>, Uffd)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = vec![0u8; 64 << 10];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let n = msg.bytes;
    let mut uffd = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel installed this fd for this message; it gets one owner.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                uffd.get_or_insert(owned);
            }
        }
    }
    let uffd = uffd.ok_or_else(|| io::Error::other("no uffd with the message"))?;
    let value: serde_json::Value = serde_json::from_slice(&buf[..n]).map_err(io::Error::other)?;
    let field = |r: &serde_json::Value, k: &str| {
        r[k].as_u64()
            .ok_or_else(|| io::Error::other(format!("region without {k}")))
    };
    let regions = value
        .as_array()
        .ok_or_else(|| io::Error::other("message is not an array"))?
        .iter()
        .map(|r| {
            Ok(Mapping {
                base: field(r, "base_host_virt_addr")?,
                size: field(r, "size")?,
                offset: field(r, "offset")?,
                page_size: field(r, "page_size")?,
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    use std::os::fd::IntoRawFd;
    // SAFETY: `uffd` is an owned userfaultfd; the Uffd takes it over and closes it on drop.
    Ok((regions, unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) }))
}

/// Maps the snapshot file read-only, private (as the example handlers do).
fn map_file(
    file: &std::fs::File,
    len: u64,
) -> io::Result<(std::ptr::NonNull<libc::c_void>, usize)> {
    use nix::sys::mman::{mmap, MapFlags, ProtFlags};
    let n = std::num::NonZeroUsize::new(len as usize)
        .ok_or_else(|| io::Error::other("empty snapshot"))?;
    // SAFETY: a fresh read-only mapping at a kernel-chosen address aliases no Rust object; it
    // is only read by the kernel (UFFDIO_COPY's source) and unmapped when the handler stops.
    let addr = unsafe {
        mmap(
            None,
            n,
            ProtFlags::PROT_READ,
            MapFlags::MAP_PRIVATE,
            file,
            0,
        )
    }?;
    Ok((addr, n.get()))
}

/// One fault: one UFFDIO_COPY of its page from the mapped file.
fn serve_fault(
    uffd: &Uffd,
    regions: &[Mapping],
    backing: std::ptr::NonNull<libc::c_void>,
    addr: u64,
    stats: &mut ExampleStats,
) -> io::Result<()> {
    let r = regions
        .iter()
        .find(|r| addr >= r.base && addr < r.base + r.size)
        .ok_or_else(|| io::Error::other(format!("fault at {addr:#x} outside every region")))?;
    let page = addr & !(r.page_size - 1);
    let src = backing.as_ptr() as u64 + r.offset + (page - r.base);
    // SAFETY: `src` lies in the live file mapping (the region fits the file, as the benchmark
    // makes it); the destination is a registered page of the restoring process, checked by the
    // kernel, which no Rust reference in this process points into.
    let copied = unsafe {
        uffd.copy(
            src as *const libc::c_void,
            page as *mut libc::c_void,
            r.page_size as usize,
            true,
        )
    };
    match copied {
        Ok(_) => stats.copied += 1,
        Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
            uffd.wake(page as *mut _, r.page_size as usize)
                .map_err(io::Error::other)?;
            stats.already_present += 1;
        }
        Err(e) => return Err(io::Error::other(e)),
    }
    Ok(())
}

//! The VMM side of faultd: what a VMM embeds to hand its guest RAM faults to faultd.
//!
//! Owns: creating guest RAM the way faultd can serve it (a memfd or hugetlbfs memfd mapped
//! `MAP_SHARED`), creating and registering the userfaultfd, and the blocking client of the
//! control protocol ([`faultd_proto`]). Refuses: serving faults (faultd does that) and anything
//! KVM (the VMM does that with the mapping this crate hands it).
//!
//! ```no_run
//! # use faultd_client::*;
//! let ram = GuestRam::new("vm0-ram", 1 << 30, RamPageSize::Size4K)?;
//! let uffd = create_uffd()?;
//! ram.register(&uffd)?;
//! let session = Client::connect(faultd_proto::DEFAULT_SOCKET_PATH)?
//!     .register("vm0", &uffd, &[RegionSpec::zero(0, &ram)], None)?;
//! // ... give ram.host_addr() to KVM as guest memory and run the guest ...
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::ptr::NonNull;

mod supervise;

use faultd_proto::{
    AddDevice, BackingDesc, ErrorCode, FdIndex, IommuDesc, QueueDesc, RegionDesc, Register,
    Request, Response, SessionStats, MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};
pub use faultd_proto::{
    DaemonStatus, EvictAmount, FirecrackerListen, SessionDetail, SessionEvicted, SessionRef,
    SessionRow,
};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{
    connect, recv, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
pub use supervise::{Reattach, Supervisor, SupervisorStats};
pub use userfaultfd::Uffd;

/// Failure of a client operation, named for the operation.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `memfd_create` failed.
    #[error("memfd_create({name}) failed")]
    CreateMemfd {
        /// Name given.
        name: String,
        #[source]
        source: nix::Error,
    },
    /// Sizing the memfd failed.
    #[error("ftruncate of guest RAM to {size} bytes failed")]
    SizeMemfd {
        /// Size asked for.
        size: u64,
        #[source]
        source: nix::Error,
    },
    /// Mapping guest RAM failed.
    #[error("mmap of {size} bytes of guest RAM failed")]
    MapRam {
        /// Size asked for.
        size: u64,
        #[source]
        source: nix::Error,
    },
    /// A size that is zero or not a multiple of the page size.
    #[error("guest RAM size {size} is not a non-zero multiple of the page size {page_size}")]
    BadSize {
        /// Size asked for.
        size: u64,
        /// Page size.
        page_size: u64,
    },
    /// Creating the userfaultfd failed.
    #[error("creating the userfaultfd failed")]
    CreateUffd(#[source] userfaultfd::Error),
    /// Registering guest RAM with the userfaultfd failed.
    #[error("registering {size} bytes at {addr:#x} with the userfaultfd failed")]
    RegisterUffd {
        /// Host address.
        addr: u64,
        /// Length.
        size: u64,
        #[source]
        source: userfaultfd::Error,
    },
    /// Connecting to faultd failed.
    #[error("connecting to faultd at {path} failed")]
    Connect {
        /// Socket path.
        path: String,
        #[source]
        source: nix::Error,
    },
    /// Sending a message failed.
    #[error("sending to faultd failed")]
    Send(#[source] nix::Error),
    /// Receiving a message failed.
    #[error("receiving from faultd failed")]
    Recv(#[source] nix::Error),
    /// faultd closed the connection.
    #[error("faultd closed the connection")]
    Closed,
    /// A message could not be encoded or decoded.
    #[error("bad message")]
    Codec(#[from] faultd_proto::CodecError),
    /// faultd refused the request.
    #[error("faultd refused the request ({code:?}): {message}")]
    Refused {
        /// Class of error.
        code: ErrorCode,
        /// faultd's explanation.
        message: String,
    },
    /// faultd answered with a message that does not fit the request.
    #[error("unexpected answer from faultd: {0:?}")]
    Unexpected(Box<Response>),
}

/// Page size of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RamPageSize {
    /// 4 KiB pages on tmpfs (a plain memfd).
    Size4K,
    /// 2 MiB pages on hugetlbfs (`MFD_HUGETLB | MFD_HUGE_2MB`); needs reserved huge pages.
    Size2M,
}

impl RamPageSize {
    /// Bytes per page.
    pub fn bytes(self) -> u64 {
        match self {
            RamPageSize::Size4K => 4096,
            RamPageSize::Size2M => 2 << 20,
        }
    }
}

/// Guest RAM: a memfd mapped shared in this process, never touched by this crate.
///
/// Every page starts absent; the first access (by a vCPU through KVM, by the VMM, or by a
/// device) faults into the userfaultfd it is registered with, and faultd fills it.
#[derive(Debug)]
pub struct GuestRam {
    memfd: OwnedFd,
    host: NonNull<u8>,
    size: u64,
    page_size: RamPageSize,
}

// SAFETY: GuestRam only holds the address of a shared mapping it owns; it never creates
// references into it, so moving or sharing the handle between threads is sound.
unsafe impl Send for GuestRam {}
// SAFETY: as above: &GuestRam gives out only the address and the fd.
unsafe impl Sync for GuestRam {}

impl GuestRam {
    /// Creates `size` bytes of guest RAM as a memfd named `name` and maps it shared.
    pub fn new(name: &str, size: u64, page_size: RamPageSize) -> Result<Self, ClientError> {
        use nix::sys::memfd::{memfd_create, MFdFlags};
        if size == 0 || !size.is_multiple_of(page_size.bytes()) {
            return Err(ClientError::BadSize {
                size,
                page_size: page_size.bytes(),
            });
        }
        let mut flags = MFdFlags::MFD_CLOEXEC;
        if page_size == RamPageSize::Size2M {
            flags |= MFdFlags::MFD_HUGETLB | MFdFlags::MFD_HUGE_2MB;
        }
        let memfd = memfd_create(name, flags).map_err(|source| ClientError::CreateMemfd {
            name: name.to_owned(),
            source,
        })?;
        let len = i64::try_from(size).map_err(|_| ClientError::BadSize {
            size,
            page_size: page_size.bytes(),
        })?;
        nix::unistd::ftruncate(&memfd, len)
            .map_err(|source| ClientError::SizeMemfd { size, source })?;
        Self::map(memfd, size, page_size)
    }

    /// Maps an existing guest RAM fd (memfd or hugetlbfs file) of at least `size` bytes.
    pub fn map(memfd: OwnedFd, size: u64, page_size: RamPageSize) -> Result<Self, ClientError> {
        let bad_size = || ClientError::BadSize {
            size,
            page_size: page_size.bytes(),
        };
        let len = std::num::NonZeroUsize::new(usize::try_from(size).map_err(|_| bad_size())?)
            .ok_or_else(bad_size)?;
        // SAFETY: a fresh mapping chosen by the kernel (no address hint, no MAP_FIXED), so it
        // cannot alias any existing Rust object; it is unmapped only in Drop.
        let host = unsafe {
            mmap(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED | MapFlags::MAP_NORESERVE,
                &memfd,
                0,
            )
        }
        .map_err(|source| ClientError::MapRam { size, source })?;
        Ok(GuestRam {
            memfd,
            host: host.cast(),
            size,
            page_size,
        })
    }

    /// Registers the whole mapping with `uffd` in MISSING and write-protect modes (faultd
    /// write-protects a page while it evicts it, so no write is lost).
    pub fn register(&self, uffd: &Uffd) -> Result<(), ClientError> {
        use userfaultfd::RegisterMode;
        uffd.register_with_mode(
            self.host.as_ptr().cast(),
            self.size as usize,
            RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
        )
        .map_err(|source| ClientError::RegisterUffd {
            addr: self.host_addr(),
            size: self.size,
            source,
        })?;
        Ok(())
    }

    /// Start of the mapping in this process (what KVM's memory slot points at).
    pub fn host_ptr(&self) -> NonNull<u8> {
        self.host
    }

    /// Start of the mapping in this process, as a number for the protocol.
    pub fn host_addr(&self) -> u64 {
        self.host.as_ptr() as u64
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Page size.
    pub fn page_size(&self) -> RamPageSize {
        self.page_size
    }

    /// The memfd.
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// Bytes of this RAM actually allocated (resident in the memfd), from `fstat`: the measure
    /// of how much guest RAM exists, whoever touched it.
    pub fn allocated_bytes(&self) -> std::io::Result<u64> {
        let st = nix::sys::stat::fstat(&self.memfd)?;
        Ok(st.st_blocks as u64 * 512)
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `host`/`size` are exactly the mapping made in `map`, and no reference into it
        // exists (this type never creates one).
        let _ = unsafe { munmap(self.host.cast(), self.size as usize) };
    }
}

/// Creates a userfaultfd the way faultd expects: non-blocking, close-on-exec, kernel-mode
/// faults included (so KVM's own accesses to guest RAM fault into it), REMOVE events (so faultd
/// learns of pages the VMM discards), and write-protect on shared memory (for eviction).
///
/// Not UNMAP: with EVENT_UNMAP, `munmap` of registered RAM blocks until the event is read, so a
/// VMM tearing down after its session ended would hang; and for shared memfd RAM an unmap
/// changes nothing faultd tracks (the memfd keeps the pages).
pub fn create_uffd() -> Result<Uffd, ClientError> {
    use userfaultfd::{FeatureFlags, UffdBuilder};
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        // WP on shmem/hugetlbfs (UFFD_FEATURE_WP_HUGETLBFS_SHMEM, bit 12, which the crate does
        // not name): faultd write-protects pages it evicts.
        .require_features(FeatureFlags::EVENT_REMOVE | FeatureFlags::from_bits_retain(1 << 12))
        .create()
        .map_err(ClientError::CreateUffd)
}

/// One region to register: where it is in the guest, and what backs it.
#[derive(Debug, Clone, Copy)]
pub struct RegionSpec<'a> {
    /// Guest physical base.
    pub gpa: u64,
    /// The RAM (the whole mapping is the region).
    pub ram: &'a GuestRam,
    /// Where never-resident pages come from.
    pub backing: BackingDesc,
    /// Guest may not write it.
    pub read_only: bool,
}

impl<'a> RegionSpec<'a> {
    /// A zero-filled region at `gpa`.
    pub fn zero(gpa: u64, ram: &'a GuestRam) -> Self {
        RegionSpec {
            gpa,
            ram,
            backing: BackingDesc::Zero,
            read_only: false,
        }
    }

    /// A region restored lazily from the snapshot file at `offset`.
    pub fn snapshot(gpa: u64, ram: &'a GuestRam, offset: u64) -> Self {
        RegionSpec {
            gpa,
            ram,
            backing: BackingDesc::Snapshot { offset },
            read_only: false,
        }
    }
}

/// A connection to faultd that has not registered yet.
#[derive(Debug)]
pub struct Client {
    sock: OwnedFd,
}

impl Client {
    /// Connects to faultd's control socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let connect_err = |source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        };
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(connect_err)?;
        let addr = UnixAddr::new(path).map_err(connect_err)?;
        connect(sock.as_raw_fd(), &addr).map_err(connect_err)?;
        Ok(Client { sock })
    }

    /// Opens a session: sends the layout with the uffd, every region's memory fd and the
    /// snapshot fd, and waits for faultd's answer. The session lives as long as the returned
    /// [`Session`]; dropping it (or this process exiting) ends it.
    pub fn register(
        self,
        vm: &str,
        uffd: &Uffd,
        regions: &[RegionSpec<'_>],
        snapshot: Option<BorrowedFd<'_>>,
    ) -> Result<Session, ClientError> {
        self.register_as(vm, uffd, regions, snapshot, false)
    }

    /// Registers a VM faultd served before, after faultd restarted or closed the session: the
    /// same uffd, memory and layout as before. faultd takes the pages it had evicted from its
    /// store, and wakes every thread that was blocked on the faultd that went away.
    pub fn resume(
        self,
        vm: &str,
        uffd: &Uffd,
        regions: &[RegionSpec<'_>],
        snapshot: Option<BorrowedFd<'_>>,
    ) -> Result<Session, ClientError> {
        self.register_as(vm, uffd, regions, snapshot, true)
    }

    fn register_as(
        self,
        vm: &str,
        uffd: &Uffd,
        regions: &[RegionSpec<'_>],
        snapshot: Option<BorrowedFd<'_>>,
        resume: bool,
    ) -> Result<Session, ClientError> {
        let mut fds: Vec<BorrowedFd<'_>> = vec![uffd.as_fd()];
        let mut descs = Vec::with_capacity(regions.len());
        for r in regions {
            descs.push(RegionDesc {
                gpa: r.gpa,
                size: r.ram.size(),
                page_size: r.ram.page_size().bytes(),
                hva: r.ram.host_addr(),
                mem: FdIndex(fds.len() as u32),
                mem_offset: 0,
                backing: r.backing,
                read_only: r.read_only,
            });
            fds.push(r.ram.memfd());
        }
        let snapshot = snapshot.map(|fd| {
            fds.push(fd);
            FdIndex(fds.len() as u32 - 1)
        });
        let req = Request::Register(Register {
            version: PROTOCOL_VERSION,
            vm: vm.to_owned(),
            uffd: FdIndex(0),
            regions: descs,
            snapshot,
            resume,
        });
        let mut raw = RawConnection { sock: self.sock };
        raw.send(&faultd_proto::encode(&req)?, &fds)?;
        match raw.recv_response()? {
            Response::Registered { session, .. } => Ok(Session { raw, id: session }),
            other => Err(refusal(other)),
        }
    }

    /// The connection as raw packets, for tests that send what a well-behaved client never
    /// would.
    pub fn into_raw(self) -> RawConnection {
        RawConnection { sock: self.sock }
    }

    /// Tells faultd to serve Firecracker restores of `listen.vm` on `listen.socket` (this
    /// client is not a VMM; it needs root or faultd's uid). Returns once faultd listens.
    pub fn firecracker_listen(self, listen: FirecrackerListen) -> Result<(), ClientError> {
        match self.admin(&Request::FirecrackerListen(listen))? {
            Response::Listening { .. } => Ok(()),
            other => Err(refusal(other)),
        }
    }

    /// The counters of every live session named `vm` (none: empty).
    pub fn vm_stats(self, vm: &str) -> Result<Vec<SessionStats>, ClientError> {
        match self.admin(&Request::VmStats { vm: vm.to_owned() })? {
            Response::VmStats { sessions, .. } => Ok(sessions),
            other => Err(refusal(other)),
        }
    }

    /// Daemon-wide figures (an operator request).
    pub fn status(self) -> Result<DaemonStatus, ClientError> {
        match self.admin(&Request::Status {})? {
            Response::Status(st) => Ok(*st),
            other => Err(refusal(other)),
        }
    }

    /// One row per live session, by session id (an operator request; asks page after page on
    /// this connection until faultd has listed them all).
    pub fn sessions(self) -> Result<Vec<SessionRow>, ClientError> {
        let mut raw = RawConnection { sock: self.sock };
        let mut rows: Vec<SessionRow> = Vec::new();
        loop {
            let after = rows.last().map(|r| r.session);
            raw.send(&faultd_proto::encode(&Request::Sessions { after })?, &[])?;
            match raw.recv_response()? {
                Response::Sessions { sessions, more } => {
                    // A page that adds nothing while claiming more would loop forever.
                    let stalled = sessions.is_empty();
                    rows.extend(sessions);
                    if !more || stalled {
                        return Ok(rows);
                    }
                }
                other => return Err(refusal(other)),
            }
        }
    }

    /// The counters of the live sessions `target` names (an operator request), and how many
    /// more matched than faultd listed. faultd refuses a target with no live session
    /// ([`ErrorCode::UnknownSession`]).
    pub fn session_detail(
        self,
        target: SessionRef,
    ) -> Result<(Vec<SessionDetail>, u64), ClientError> {
        match self.admin(&Request::SessionDetail { target })? {
            Response::SessionDetail { sessions, omitted } => Ok((sessions, omitted)),
            other => Err(refusal(other)),
        }
    }

    /// Evicts `amount` from the one live session `target` names, on faultd's side (an operator
    /// request; needs root or faultd's uid).
    pub fn evict_session(
        self,
        target: SessionRef,
        amount: EvictAmount,
    ) -> Result<SessionEvicted, ClientError> {
        match self.admin(&Request::EvictSession { target, amount })? {
            Response::SessionEvicted(e) => Ok(e),
            other => Err(refusal(other)),
        }
    }

    /// Sends one request that takes no fds and returns faultd's answer.
    fn admin(self, req: &Request) -> Result<Response, ClientError> {
        let mut raw = RawConnection { sock: self.sock };
        raw.send(&faultd_proto::encode(req)?, &[])?;
        raw.recv_response()
    }
}

fn refusal(resp: Response) -> ClientError {
    match resp {
        Response::Error { code, message } => ClientError::Refused { code, message },
        other => ClientError::Unexpected(Box::new(other)),
    }
}

/// A live session: faultd serves this VM's faults while it exists.
#[derive(Debug)]
pub struct Session {
    raw: RawConnection,
    id: u64,
}

impl Session {
    /// The session id faultd assigned.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The connection as raw packets (for tests that misbehave after registering). Dropping it
    /// ends the session as dropping the `Session` would.
    pub fn into_raw(self) -> RawConnection {
        self.raw
    }

    /// Attaches a device: faultd serves its page requests from `queue`, mapping granules in
    /// `iommu`. Returns the granule faultd maps at, in bytes.
    pub fn add_device<'a>(
        &mut self,
        dev_id: u32,
        queue: DeviceQueue<'a>,
        iommu: DeviceIommu<'a>,
    ) -> Result<u64, ClientError> {
        let mut fds: Vec<BorrowedFd<'a>> = Vec::new();
        let mut idx = |fd: BorrowedFd<'a>| {
            fds.push(fd);
            FdIndex(fds.len() as u32 - 1)
        };
        let queue = match queue {
            DeviceQueue::Ring { ring, kick, notify } => QueueDesc::Ring {
                ring: idx(ring),
                kick: idx(kick),
                notify: idx(notify),
            },
            DeviceQueue::Iommufd { fault_fd } => QueueDesc::Iommufd {
                fault_fd: idx(fault_fd),
            },
        };
        let iommu = match iommu {
            DeviceIommu::Emulated { table } => IommuDesc::Emulated { table: idx(table) },
            DeviceIommu::Iommufd { iommufd, ioas_id } => IommuDesc::Iommufd {
                iommufd: idx(iommufd),
                ioas_id,
            },
        };
        let req = Request::AddDevice(AddDevice {
            dev_id,
            queue,
            iommu,
        });
        self.raw.send(&faultd_proto::encode(&req)?, &fds)?;
        match self.raw.recv_response()? {
            Response::DeviceAdded { granule, .. } => Ok(granule),
            other => Err(refusal(other)),
        }
    }

    /// Asks faultd to evict resident pages of `[gpa, gpa+len)` (at most `max_pages`) to its
    /// store. Returns (evicted, of which all-zero, failed).
    pub fn evict(
        &mut self,
        gpa: u64,
        len: u64,
        max_pages: Option<u64>,
    ) -> Result<(u64, u64, u64), ClientError> {
        let req = Request::Evict {
            gpa,
            len,
            max_pages,
        };
        self.raw.send(&faultd_proto::encode(&req)?, &[])?;
        match self.raw.recv_response()? {
            Response::Evicted {
                evicted,
                zero,
                failed,
            } => Ok((evicted, zero, failed)),
            other => Err(refusal(other)),
        }
    }

    /// Asks faultd to fill every page not yet restored from its backing (snapshot file or
    /// faultd's store), before the VMM ends the session and closes its uffd: after a
    /// [`Finished`] with `remaining == 0`, guest RAM holds everything and no fault needs
    /// faultd any more. Without it, closing the uffd leaves those pages reading zeros.
    pub fn finish(&mut self) -> Result<Finished, ClientError> {
        self.raw
            .send(&faultd_proto::encode(&Request::Finish {})?, &[])?;
        match self.raw.recv_response()? {
            Response::Finished { filled, remaining } => Ok(Finished { filled, remaining }),
            other => Err(refusal(other)),
        }
    }

    /// Asks faultd for this session's counters.
    pub fn stats(&mut self) -> Result<SessionStats, ClientError> {
        self.raw
            .send(&faultd_proto::encode(&Request::Stats {})?, &[])?;
        match self.raw.recv_response()? {
            Response::Stats(s) => Ok(*s),
            other => Err(refusal(other)),
        }
    }
}

/// What [`Session::finish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    /// Pages filled from the snapshot file or faultd's store.
    pub filled: u64,
    /// Pages still holding data only faultd can provide; 0 on success.
    pub remaining: u64,
}

/// Where a device's page requests arrive (see docs/device-faults.md).
#[derive(Debug, Clone, Copy)]
pub enum DeviceQueue<'a> {
    /// The eventfd ring: its memfd, the producer's kick eventfd, faultd's notify eventfd.
    Ring {
        /// Ring memfd.
        ring: BorrowedFd<'a>,
        /// Signalled by the producer.
        kick: BorrowedFd<'a>,
        /// Signalled by faultd.
        notify: BorrowedFd<'a>,
    },
    /// The kernel's iommufd fault queue.
    Iommufd {
        /// Fault fd from IOMMU_FAULT_QUEUE_ALLOC.
        fault_fd: BorrowedFd<'a>,
    },
}

/// The IOMMU faultd maps a device's granules in.
#[derive(Debug, Clone, Copy)]
pub enum DeviceIommu<'a> {
    /// The emulated IOMMU's shared table.
    Emulated {
        /// Table memfd.
        table: BorrowedFd<'a>,
    },
    /// An iommufd IOAS.
    Iommufd {
        /// /dev/iommu.
        iommufd: BorrowedFd<'a>,
        /// IOAS id.
        ioas_id: u32,
    },
}

/// A control connection as raw packets.
#[derive(Debug)]
pub struct RawConnection {
    sock: OwnedFd,
}

impl RawConnection {
    /// Sends one packet with `fds` attached.
    pub fn send(&mut self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(bytes)],
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(ClientError::Send)?;
        Ok(())
    }

    /// Receives one packet; `Ok(None)` when faultd has closed the connection.
    pub fn recv(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES];
        let n = loop {
            match recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Err(nix::Error::EINTR) => continue,
                other => break other.map_err(ClientError::Recv)?,
            }
        };
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some(buf))
    }

    /// Receives and decodes one response.
    pub fn recv_response(&mut self) -> Result<Response, ClientError> {
        let bytes = self.recv()?.ok_or(ClientError::Closed)?;
        Ok(faultd_proto::decode(&bytes)?)
    }
}

//! The VMM side of faultd: what a VMM embeds to hand its guest RAM faults to faultd.
//!
//! Owns: describing guest RAM the way faultd can serve it (a memfd or hugetlbfs file mapped
//! `MAP_SHARED`, whole or at offsets: [`GuestRam`], [`SharedMemory`], and a vm-memory
//! `GuestMemoryMmap` through [`vm_memory_regions`]), creating and registering the
//! userfaultfd ([`create_uffd`]), the blocking client of the control protocol ([`Client`],
//! [`Session`]) and keeping a session across faultd restarts ([`Supervisor`]). Refuses:
//! serving faults (faultd does that) and anything KVM (the VMM does that with the mapping it
//! already has). The protocol's types that this API takes or returns are re-exported here
//! (and the whole protocol crate as [`proto`]); `docs/embedding.md` walks through a complete
//! VMM.
//!
//! A VMM that lets this crate make its guest RAM:
//!
//! ```no_run
//! use faultd_client::{create_uffd, Client, GuestRam, RamPageSize, RegionSpec};
//!
//! let ram = GuestRam::new("vm0-ram", 1 << 30, RamPageSize::Size4K)?;
//! let uffd = create_uffd()?;
//! ram.register(&uffd)?;
//! let mut session = Client::connect(faultd_client::DEFAULT_SOCKET_PATH)?
//!     .register("vm0", &uffd, &[RegionSpec::zero(0, &ram)], None)?;
//! // ... give ram.host_addr() to KVM as guest memory and run the guest ...
//! let stats: faultd_client::SessionStats = session.stats()?;
//! println!("{} faults served", stats.vcpu_faults);
//! // Before closing the uffd: faultd fills whatever only it could still provide.
//! assert_eq!(session.finish()?.remaining, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A VMM that already has its memory: one memfd split around a hole in the guest's address
//! space, both parts registered at their offsets in it (the memfd is sent once):
//!
//! ```no_run
//! use faultd_client::{create_uffd, Client, GuestRam, RamPageSize, RegionSpec};
//!
//! let ram = GuestRam::new("vm0-ram", 3 << 30, RamPageSize::Size4K)?;
//! let (low, high) = (ram.slice(0, 2 << 30)?, ram.slice(2 << 30, 1 << 30)?);
//! let uffd = create_uffd()?;
//! low.register(&uffd)?;
//! high.register(&uffd)?;
//! let regions = [RegionSpec::zero(0, low), RegionSpec::zero(4 << 30, high)];
//! let session = Client::connect(faultd_client::DEFAULT_SOCKET_PATH)?
//!     .register("vm0", &uffd, &regions, None)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;
use std::ptr::NonNull;

mod supervise;
pub mod vfio;

#[cfg(feature = "vm-memory")]
mod vmm;

/// The control protocol, for what this crate does not re-export.
pub use faultd_proto as proto;
use faultd_proto::{
    AddDevice, FdIndex, IommuDesc, QueueDesc, RegionDesc, Register, Request, MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
};
/// The protocol's types that this crate's API takes or returns.
pub use faultd_proto::{
    BackingDesc, BudgetStatus, CodecError, DaemonStatus, DeviceStats, ErrorCode, EvictAmount,
    FirecrackerListen, LatencySummary, ListenerStatus, Response, SessionDetail, SessionEvicted,
    SessionKind, SessionRef, SessionRow, SessionStats, DEFAULT_SOCKET_PATH,
};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::sys::socket::{
    connect, recv, sendmsg, socket, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    UnixAddr,
};
pub use supervise::{requeue_iommufd, Reattach, Requeued, Supervisor, SupervisorStats};
pub use userfaultfd::Uffd;
#[cfg(feature = "vm-memory")]
pub use vmm::vm_memory_regions;

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
    /// A range of memory that is not page aligned, wraps around, or is not inside the memory
    /// it was carved from.
    #[error(
        "memory range of {size:#x} bytes at offset {offset:#x} (host {host:#x}) is not page \
         aligned ({page_size}) or not inside its memory"
    )]
    BadRange {
        /// Host address of the memory (or of the range).
        host: u64,
        /// Offset in the memory fd.
        offset: u64,
        /// Size.
        size: u64,
        /// Page size.
        page_size: u64,
    },
    /// A region of a vm-memory `GuestMemoryMmap` that faultd cannot serve.
    #[error("guest memory region at gpa {gpa:#x}: {reason}")]
    UnsharedRegion {
        /// The region's guest physical base.
        gpa: u64,
        /// Why.
        reason: &'static str,
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
    /// The VMM's own work for a device in [`Reattach::devices`] failed (e.g.
    /// [`requeue_iommufd`]).
    #[error("reattaching device {dev_id} failed")]
    Reattach {
        /// The device.
        dev_id: u32,
        #[source]
        source: std::io::Error,
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
        SharedMemory::from(self).register(uffd)
    }

    /// `size` bytes of this RAM from byte `offset` on, as one region's memory: several
    /// regions can be carved from one `GuestRam` (e.g. RAM below and above a hole in the
    /// guest's address space).
    pub fn slice(&self, offset: u64, size: u64) -> Result<SharedMemory<'_>, ClientError> {
        let page = self.page_size.bytes();
        let end = offset.checked_add(size);
        if end.is_none_or(|e| e > self.size) {
            return Err(ClientError::BadRange {
                host: self.host_addr(),
                offset,
                size,
                page_size: page,
            });
        }
        // `offset <= self.size`: inside the mapping or one past its end, so not null.
        let host = NonNull::new(self.host.as_ptr().wrapping_add(offset as usize))
            .expect("inside a mapping, so not null");
        SharedMemory::new(self.memfd(), offset, host, size, self.page_size)
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

/// A range of guest RAM that this process maps `MAP_SHARED` from a memory fd (a memfd, or a
/// hugetlbfs file): what one region hands faultd. The VMM keeps owning the memory; this only
/// names it.
///
/// Several regions may be carved from one memfd (say guest RAM below and above a PCI hole,
/// at two offsets of one file): each names the same fd at its own offset, and
/// [`Client::register`] sends that fd to faultd once.
///
/// Made from a [`GuestRam`] (`(&ram).into()`, [`GuestRam::slice`]), from a vm-memory
/// `GuestMemoryMmap` ([`vm_memory_regions`]), or from any mapping with [`SharedMemory::new`].
#[derive(Debug, Clone, Copy)]
pub struct SharedMemory<'a> {
    memfd: BorrowedFd<'a>,
    offset: u64,
    host: NonNull<u8>,
    size: u64,
    page_size: RamPageSize,
}

impl<'a> SharedMemory<'a> {
    /// Names `size` bytes of `memfd` from `offset` on, which this process maps shared at
    /// `host`. Only the arithmetic is checked here (page-aligned offset, address and size, no
    /// wrap-around); faultd checks, in this process's `/proc/<pid>/maps`, that `host` really
    /// maps `memfd` at `offset`, and refuses the registration otherwise. The mapping must stay
    /// in place for as long as a session serves it.
    pub fn new(
        memfd: BorrowedFd<'a>,
        offset: u64,
        host: NonNull<u8>,
        size: u64,
        page_size: RamPageSize,
    ) -> Result<Self, ClientError> {
        let page = page_size.bytes();
        let addr = host.as_ptr() as u64;
        if size == 0 || !size.is_multiple_of(page) {
            return Err(ClientError::BadSize {
                size,
                page_size: page,
            });
        }
        if !offset.is_multiple_of(page)
            || !addr.is_multiple_of(page)
            || offset.checked_add(size).is_none()
            || addr.checked_add(size).is_none()
        {
            return Err(ClientError::BadRange {
                host: addr,
                offset,
                size,
                page_size: page,
            });
        }
        Ok(SharedMemory {
            memfd,
            offset,
            host,
            size,
            page_size,
        })
    }

    /// Registers the range with `uffd` in MISSING and write-protect modes (faultd
    /// write-protects a page while it evicts it, so no write is lost). Every region must be
    /// registered before [`Client::register`].
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

    /// The memory fd.
    pub fn memfd(&self) -> BorrowedFd<'a> {
        self.memfd
    }

    /// Offset of the range's first byte in the memory fd.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Start of the range in this process.
    pub fn host_ptr(&self) -> NonNull<u8> {
        self.host
    }

    /// Start of the range in this process, as a number for the protocol.
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
}

impl<'a> From<&'a GuestRam> for SharedMemory<'a> {
    /// All of `ram`: its memfd from offset 0.
    fn from(ram: &'a GuestRam) -> SharedMemory<'a> {
        SharedMemory {
            memfd: ram.memfd(),
            offset: 0,
            host: ram.host_ptr(),
            size: ram.size(),
            page_size: ram.page_size(),
        }
    }
}

/// One region to register: where it is in the guest, which memory holds it, and what fills
/// a page that was never there.
#[derive(Debug, Clone, Copy)]
pub struct RegionSpec<'a> {
    /// Guest physical base.
    pub gpa: u64,
    /// The memory (the whole range is the region).
    pub memory: SharedMemory<'a>,
    /// Where never-resident pages come from.
    pub backing: BackingDesc,
    /// Guest may not write it.
    pub read_only: bool,
}

impl<'a> RegionSpec<'a> {
    /// A zero-filled region at `gpa` held by `memory` (a [`SharedMemory`] or a `&GuestRam`).
    pub fn zero(gpa: u64, memory: impl Into<SharedMemory<'a>>) -> Self {
        RegionSpec {
            gpa,
            memory: memory.into(),
            backing: BackingDesc::Zero,
            read_only: false,
        }
    }

    /// A region at `gpa` held by `memory`, restored lazily from the snapshot file, whose byte
    /// `offset` is the region's first byte.
    pub fn snapshot(gpa: u64, memory: impl Into<SharedMemory<'a>>, offset: u64) -> Self {
        RegionSpec {
            gpa,
            memory: memory.into(),
            backing: BackingDesc::Snapshot { offset },
            read_only: false,
        }
    }

    /// The same region, restored lazily from the snapshot file at `offset` instead.
    pub fn from_snapshot(self, offset: u64) -> Self {
        RegionSpec {
            backing: BackingDesc::Snapshot { offset },
            ..self
        }
    }

    /// The same region, which the guest may not write.
    pub fn read_only(self) -> Self {
        RegionSpec {
            read_only: true,
            ..self
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
        self.register_as(vm, uffd, regions, snapshot, None, false)
    }

    /// Opens a session whose snapshot is object `key` of the object store faultd's config
    /// names `store` (regions with [`RegionSpec::snapshot`] backing read from it, the offsets
    /// being offsets in the object): faultd fetches it with its own credentials, so the config
    /// must let this process's uid read that key.
    pub fn register_object(
        self,
        vm: &str,
        uffd: &Uffd,
        regions: &[RegionSpec<'_>],
        store: &str,
        key: &str,
    ) -> Result<Session, ClientError> {
        let object = faultd_proto::ObjectName {
            store: store.to_owned(),
            key: key.to_owned(),
        };
        self.register_as(vm, uffd, regions, None, Some(object), false)
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
        self.register_as(vm, uffd, regions, snapshot, None, true)
    }

    fn register_as(
        self,
        vm: &str,
        uffd: &Uffd,
        regions: &[RegionSpec<'_>],
        snapshot: Option<BorrowedFd<'_>>,
        object: Option<faultd_proto::ObjectName>,
        resume: bool,
    ) -> Result<Session, ClientError> {
        let mut fds: Vec<BorrowedFd<'_>> = vec![uffd.as_fd()];
        let descs = describe(regions, &mut fds);
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
            object,
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

    /// Tells faultd to stop listening on the socket of the Firecracker listener named `vm`
    /// (only the uid that added it, or root / faultd's uid). Returns the socket, removed.
    pub fn firecracker_unlisten(self, vm: &str) -> Result<std::path::PathBuf, ClientError> {
        match self.admin(&Request::FirecrackerUnlisten { vm: vm.to_owned() })? {
            Response::Unlistened { socket, .. } => Ok(socket),
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

/// The protocol's descriptions of `regions`, with their memory fds appended to `fds`: once
/// each, so regions carved from one memfd name one fd entry and faultd takes the file once.
fn describe<'a>(regions: &[RegionSpec<'a>], fds: &mut Vec<BorrowedFd<'a>>) -> Vec<RegionDesc> {
    let first = fds.len();
    regions
        .iter()
        .map(|r| {
            let m = &r.memory;
            let raw = m.memfd().as_raw_fd();
            let mem = match fds[first..].iter().position(|f| f.as_raw_fd() == raw) {
                Some(i) => first + i,
                None => {
                    fds.push(m.memfd());
                    fds.len() - 1
                }
            };
            RegionDesc {
                gpa: r.gpa,
                size: m.size(),
                page_size: m.page_size().bytes(),
                hva: m.host_addr(),
                mem: FdIndex(mem as u32),
                mem_offset: m.offset(),
                backing: r.backing,
                read_only: r.read_only,
            }
        })
        .collect()
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
    /// ends the session as dropping the [`Session`] would.
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
            DeviceQueue::Pinned { ranges } => QueueDesc::Pinned {
                ranges: ranges.map(<[_]>::to_vec),
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

    /// Detaches device `dev_id`: faultd unmaps everything it mapped for it (unpinning a
    /// pinned device's RAM). Returns the bytes unmapped.
    pub fn remove_device(&mut self, dev_id: u32) -> Result<u64, ClientError> {
        let req = Request::RemoveDevice { dev_id };
        self.raw.send(&faultd_proto::encode(&req)?, &[])?;
        match self.raw.recv_response()? {
            Response::DeviceRemoved { unmapped_bytes, .. } => Ok(unmapped_bytes),
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
    /// No page requests (a device without PRI): faultd makes `ranges` (all guest RAM when
    /// None) resident and maps them before `add_device` returns, and keeps them pinned until
    /// [`Session::remove_device`] or the session's end.
    Pinned {
        /// The DMA-able guest ranges (granule aligned, inside guest RAM, at most
        /// [`faultd_proto::MAX_DMA_RANGES`]).
        ranges: Option<&'a [faultd_proto::DmaRange]>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_of_one_memfd_name_one_fd_entry_at_their_offsets() {
        let ram = GuestRam::new("t", 16 * 4096, RamPageSize::Size4K).unwrap();
        let other = GuestRam::new("u", 4096, RamPageSize::Size4K).unwrap();
        let uffd = create_uffd().unwrap();
        let regions = [
            RegionSpec::zero(0, ram.slice(0, 4 * 4096).unwrap()),
            RegionSpec::zero(1 << 20, &other),
            RegionSpec::snapshot(2 << 20, ram.slice(8 * 4096, 8 * 4096).unwrap(), 4096),
        ];
        let mut fds = vec![uffd.as_fd()];
        let descs = describe(&regions, &mut fds);
        assert_eq!(fds.len(), 3, "the uffd, ram's memfd once, other's memfd");
        assert_eq!(
            descs
                .iter()
                .map(|d| (d.gpa, d.mem.0, d.mem_offset, d.size, d.hva))
                .collect::<Vec<_>>(),
            [
                (0, 1, 0, 4 * 4096, ram.host_addr()),
                (1 << 20, 2, 0, 4096, other.host_addr()),
                (2 << 20, 1, 8 * 4096, 8 * 4096, ram.host_addr() + 8 * 4096),
            ]
        );
        assert_eq!(descs[2].backing, BackingDesc::Snapshot { offset: 4096 });
    }

    #[test]
    fn a_slice_must_be_page_aligned_and_inside_the_ram() {
        let ram = GuestRam::new("t", 4 * 4096, RamPageSize::Size4K).unwrap();
        assert!(ram.slice(4096, 3 * 4096).is_ok());
        assert!(matches!(
            ram.slice(4096, 4 * 4096),
            Err(ClientError::BadRange { .. })
        ));
        assert!(matches!(
            ram.slice(100, 4096),
            Err(ClientError::BadRange { .. })
        ));
        assert!(matches!(
            ram.slice(u64::MAX - 4095, 4096),
            Err(ClientError::BadRange { .. })
        ));
        assert!(matches!(ram.slice(0, 0), Err(ClientError::BadSize { .. })));
    }

    #[cfg(feature = "vm-memory")]
    #[test]
    fn a_vm_memory_guest_split_around_a_hole_becomes_regions_at_their_memfd_offsets() {
        use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
        let memfd = std::fs::File::from(
            nix::sys::memfd::memfd_create("t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap(),
        );
        memfd.set_len(12 * 4096).unwrap();
        let memory: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files([
            (
                GuestAddress(0),
                4 * 4096,
                Some(FileOffset::new(memfd.try_clone().unwrap(), 8 * 4096)),
            ),
            (
                GuestAddress(1 << 20),
                8 * 4096,
                Some(FileOffset::new(memfd.try_clone().unwrap(), 0)),
            ),
        ])
        .unwrap();
        let regions = vm_memory_regions(&memory).unwrap();
        let got: Vec<_> = regions
            .iter()
            .map(|r| (r.gpa, r.memory.offset(), r.memory.size()))
            .collect();
        assert_eq!(got, [(0, 8 * 4096, 4 * 4096), (1 << 20, 0, 8 * 4096)]);
        assert!(regions
            .iter()
            .all(|r| r.memory.page_size() == RamPageSize::Size4K));

        let anonymous: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        assert!(matches!(
            vm_memory_regions(&anonymous),
            Err(ClientError::UnsharedRegion { gpa: 0, .. })
        ));
    }
}

//! The faultd control protocol, version 1: the messages a VMM and faultd exchange on faultd's
//! unix socket, and their encoding.
//!
//! Owns: message types, limits, (de)serialisation. Refuses: sockets and fd passing (the client
//! crate and the daemon each do their side), and validation against the kernel (the daemon does
//! that, because only it can check an fd's kind).
//!
//! The socket is `SOCK_SEQPACKET`: one packet is one message, so message boundaries and the fds
//! attached to a message by `SCM_RIGHTS` can never be confused, and an oversize packet is seen
//! as truncated instead of being split. Every message is one JSON object with a `"type"` tag.
//! Fds travel in the same packet as the request that uses them; fields of type [`FdIndex`] index
//! into that packet's fd array. The full description, with examples, is in `docs/protocol.md`.

use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks. A `register` with another version is refused with
/// [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest message either side sends or accepts, in bytes. A larger packet is refused with
/// [`ErrorCode::Oversize`] and closes the session.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Most fds one message may carry.
pub const MAX_FDS: usize = 64;

/// Most regions one VM may register.
pub const MAX_REGIONS: usize = 256;

/// Longest VM name, in bytes.
pub const MAX_VM_NAME: usize = 64;

/// Default path of faultd's control socket.
pub const DEFAULT_SOCKET_PATH: &str = "/run/faultd/faultd.sock";

/// Index into the fds attached (by `SCM_RIGHTS`) to the message that carries this field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FdIndex(pub u32);

/// A message from the VMM to faultd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Opens a session: must be the first message, and is accepted once per connection.
    Register(Register),
    /// Asks for the session's counters. Only valid after `register`.
    Stats {},
    /// Attaches a device whose page faults faultd serves (after `register`), with its fds.
    AddDevice(AddDevice),
    /// Detaches device `dev_id` (after `add_device`): its mappings are removed from its IOMMU
    /// and its pages unpinned; groups it left pending are answered INVALID. Answered
    /// [`Response::DeviceRemoved`]. Takes no fds.
    RemoveDevice {
        /// The device id given to `add_device`.
        dev_id: u32,
    },
    /// Evicts resident pages of `[gpa, gpa+len)` to faultd's store (at most `max_pages`).
    Evict {
        /// Start (guest physical).
        gpa: u64,
        /// Bytes.
        len: u64,
        /// Most pages to evict; all resident pages in the range when absent.
        #[serde(default)]
        max_pages: Option<u64>,
    },
    /// Before the VMM ends its session and closes its uffd: fills every page not yet restored
    /// from its backing (the snapshot file, or faultd's store) so that nothing is left that
    /// only faultd could provide. Answered [`Response::Finished`]. Takes no fds. Only valid
    /// after `register`.
    Finish {},
    /// Not a VMM session: tells faultd to serve Firecracker snapshot restores of VM `vm` on a
    /// socket of its own (Firecracker's external page-fault handler protocol). Answered
    /// [`Response::Listening`]. Takes no fds.
    FirecrackerListen(FirecrackerListen),
    /// Not a VMM session: the counters of every live session named `vm`. Answered
    /// [`Response::VmStats`]. Takes no fds.
    VmStats {
        /// The VM name the sessions were opened with.
        vm: String,
    },
    /// Not a VMM session: daemon-wide figures. Answered [`Response::Status`]. Takes no fds.
    Status {},
    /// Not a VMM session: one summary row per live session, by session id, starting after
    /// session `after` (paging: an answer holds at most [`MAX_SESSION_ROWS`]). Answered
    /// [`Response::Sessions`]. Takes no fds.
    Sessions {
        /// Only sessions with a larger id (none: from the first).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<u64>,
    },
    /// Not a VMM session: the counters of the named session(s), with what they are. Answered
    /// [`Response::SessionDetail`]; a name or id with no live session is refused with
    /// [`ErrorCode::UnknownSession`]. Takes no fds.
    SessionDetail {
        /// Which session(s).
        target: SessionRef,
    },
    /// Not a VMM session: evicts pages of one live session to faultd's store, as its own
    /// `evict` would, or as budget enforcement would. Needs root or faultd's uid. Answered
    /// [`Response::SessionEvicted`]. Takes no fds.
    EvictSession {
        /// Which session; a VM name must name exactly one live session.
        target: SessionRef,
        /// What to evict.
        amount: EvictAmount,
    },
    /// Not a VMM session: stops listening on the socket of the Firecracker listener named
    /// `vm` (a `firecracker_listen`'s or a config entry's). The socket is removed before the
    /// answer, [`Response::Unlistened`]; restores already served go on until their VMs are
    /// gone. Only the uid that added the listener, or root / faultd's uid. Takes no fds.
    FirecrackerUnlisten {
        /// The listener's name (its `vm`).
        vm: String,
    },
    /// Not a VMM session: the working-set recordings the caller may see (its own uid's; the
    /// operator's: every uid's and the imported ones, or those `uid` / `imported` name).
    /// Answered [`Response::WorkingSets`]. Takes no fds.
    WorkingSetList {
        /// Only this uid's (the operator only, or the caller's own uid).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        /// Only the imported ones (the operator only).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        imported: bool,
    },
    /// Not a VMM session: one chunk of a recording's file, from `offset`, at most
    /// [`WS_CHUNK_BYTES`]. A transfer starts at offset 0, which opens the file for this
    /// connection; later chunks are read from that same file, so a recording replaced meanwhile
    /// never mixes into one export. Answered [`Response::WorkingSetChunk`]. Takes no fds.
    WorkingSetExport {
        /// Whose recording: this uid's (none: the caller's own; only the operator names
        /// another uid).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        /// The operator's imports, which every uid's sessions replay (the operator only).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        imported: bool,
        /// The snapshot's SHA-256, 64 lowercase hex digits.
        digest: String,
        /// Byte offset in the recording's file.
        offset: u64,
    },
    /// Not a VMM session: one chunk of a recording to import, in order from offset 0. faultd
    /// stages it in a temporary file of the library (one upload per connection, bounded in
    /// total bytes), and only when the last chunk has come, the whole file has SHA-256
    /// `sha256` and decodes as a recording of snapshot `digest`, renames it into place. An
    /// upload abandoned (connection closed, or a refusal) is removed. Answered
    /// [`Response::WorkingSetReceived`], the last chunk [`Response::WorkingSetImported`].
    /// Takes no fds.
    WorkingSetImport {
        /// Whose recording it becomes: this uid's (none: the caller's own; only the operator names
        /// another uid).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        /// The operator's imports, which every uid's sessions replay (the operator only).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        imported: bool,
        /// The snapshot's SHA-256, 64 lowercase hex digits (as in the recording's header).
        digest: String,
        /// The SHA-256 of the recording's whole file, 64 lowercase hex digits.
        sha256: String,
        /// The recording's size in bytes (at most [`WS_MAX_RECORDING_BYTES`]).
        total: u64,
        /// Where this chunk goes: the bytes received so far.
        offset: u64,
        /// The chunk, lowercase hex, at most [`WS_CHUNK_BYTES`] bytes.
        data: String,
    },
    /// Not a VMM session: removes a recording. Answered [`Response::WorkingSetRemoved`].
    /// Takes no fds.
    WorkingSetRemove {
        /// Whose recording: this uid's (none: the caller's own; only the operator names
        /// another uid).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        uid: Option<u32>,
        /// The operator's imports, which every uid's sessions replay (the operator only).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        imported: bool,
        /// The snapshot's SHA-256, 64 lowercase hex digits.
        digest: String,
    },
}

/// Most bytes of a working-set recording file (a header, 1 Mi offsets, a checksum).
pub const WS_MAX_RECORDING_BYTES: u64 = 64 + 8 * (1 << 20) + 32;

/// Most recording bytes in one [`Request::WorkingSetImport`] or [`Response::WorkingSetChunk`]:
/// hex doubles them, and the rest of the message stays well within [`MAX_MESSAGE_BYTES`].
pub const WS_CHUNK_BYTES: usize = 24 * 1024;

/// Most rows in one [`Response::WorkingSets`] (each ~200 bytes of JSON).
pub const MAX_WS_ROWS: usize = 256;

/// One working-set recording as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingSetRow {
    /// The uid whose sessions replay it; none: imported (every uid's).
    pub uid: Option<u32>,
    /// The snapshot's SHA-256, hex.
    pub digest: String,
    /// Pages recorded.
    pub pages: u64,
    /// The snapshot file's size, bytes.
    pub snapshot_size: u64,
    /// The recording file's size, bytes.
    pub bytes: u64,
}

/// Most rows in one [`Response::Sessions`]: 64 rows of at most ~700 bytes each stay well within
/// [`MAX_MESSAGE_BYTES`]; a client asks again with `after` for the rest.
pub const MAX_SESSION_ROWS: usize = 64;

/// Most sessions in one [`Response::SessionDetail`] (each ~1 KiB of JSON).
pub const MAX_DETAIL_SESSIONS: usize = 32;

/// Most Firecracker listeners listed in a [`DaemonStatus`] (each up to ~200 bytes); the count
/// is always complete.
pub const MAX_STATUS_LISTENERS: usize = 64;

/// How an operator names a live session: `{"vm": "vm0"}` or `{"session": 3}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SessionRef {
    /// Every live session opened with this VM name.
    Vm(String),
    /// The session with this id.
    Session(u64),
}

/// What [`Request::EvictSession`] evicts: `{"range": {"gpa": 0, "len": 4096}}` or
/// `{"pages": 8}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EvictAmount {
    /// Every resident page of `[gpa, gpa+len)`: non-empty, page aligned, inside the layout.
    Range {
        /// Start (guest physical).
        gpa: u64,
        /// Bytes.
        len: u64,
    },
    /// This many resident pages, chosen by the session's eviction policy (oldest installed
    /// first, device-mapped pages last), as budget enforcement chooses them. Not zero.
    Pages(u64),
}

/// Where Firecracker will connect for VM `vm`'s restore, and what backs its memory.
///
/// faultd listens on `socket` (`SOCK_STREAM`, the socket Firecracker's `backend_path` names)
/// and serves each connection there as a session named `vm`, filling pages from `snapshot`
/// (Firecracker's memory snapshot file) or from `object` (the same bytes as an object in one
/// of the object stores faultd's config names). Exactly one of the two is given.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerListen {
    /// A name for logs and metrics (1..=64 bytes of `[A-Za-z0-9._-]`).
    pub vm: String,
    /// Absolute path of the socket faultd creates and listens on.
    pub socket: std::path::PathBuf,
    /// Absolute path of the memory snapshot file; opened once, when listening.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<std::path::PathBuf>,
    /// Instead of `snapshot`: the memory snapshot is this object. faultd reads it with its
    /// own credentials, so only a key the store's rules let the uid the socket admits read is
    /// accepted; each restore pins the object's version (ETag) when it connects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectName>,
    /// Only a process with this uid may connect; the socket is also owned by this uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Only the process with this pid may connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
}

/// A device of the registered VM: where its page requests arrive and which IOMMU faultd maps
/// granules in. IOVA == GPA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDevice {
    /// The device id in page requests (iommufd dev_id, or the ring's records' dev_id).
    pub dev_id: u32,
    /// Where page requests arrive.
    pub queue: QueueDesc,
    /// Where faultd installs mappings.
    pub iommu: IommuDesc,
}

/// Most ranges a pinned device may name (see [`QueueDesc::Pinned`]).
pub const MAX_DMA_RANGES: usize = 64;

/// A guest-physical range a pinned device may reach by DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmaRange {
    /// Guest physical start (aligned to the device's granule).
    pub gpa: u64,
    /// Bytes (a non-zero multiple of the device's granule).
    pub size: u64,
}

/// The transport of a device's page requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum QueueDesc {
    /// The eventfd ring (docs/device-faults.md): its memfd and both eventfds.
    Ring {
        /// The ring memfd.
        ring: FdIndex,
        /// Eventfd the producer signals after posting requests.
        kick: FdIndex,
        /// Eventfd faultd signals after posting responses.
        notify: FdIndex,
    },
    /// The kernel's iommufd fault queue (from IOMMU_FAULT_QUEUE_ALLOC).
    Iommufd {
        /// The fault fd.
        fault_fd: FdIndex,
    },
    /// No page requests at all: the device cannot fault (no PRI). Before answering
    /// [`Response::DeviceAdded`] faultd makes every page of `ranges` resident, maps it in the
    /// device's IOMMU and keeps it pinned (never evicted) until the device is removed or the
    /// session ends. Takes no fd.
    Pinned {
        /// The DMA-able guest ranges, at most [`MAX_DMA_RANGES`], inside guest RAM and not
        /// overlapping; absent: all guest RAM.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ranges: Option<Vec<DmaRange>>,
    },
}

/// The IOMMU a device's mappings go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum IommuDesc {
    /// The emulated IOMMU's shared table (docs/device-faults.md).
    Emulated {
        /// The table memfd.
        table: FdIndex,
    },
    /// An iommufd IOAS (the device's fault-capable HWPT is built on it).
    Iommufd {
        /// /dev/iommu fd.
        iommufd: FdIndex,
        /// The IOAS id.
        ioas_id: u32,
    },
}

/// The guest layout and the fds faultd needs to serve its faults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u32,
    /// A name for logs and metrics (1..=64 bytes of `[A-Za-z0-9._-]`).
    pub vm: String,
    /// The VMM's userfaultfd, after `UFFDIO_API`, with every region registered in MISSING mode.
    pub uffd: FdIndex,
    /// Guest RAM regions.
    pub regions: Vec<RegionDesc>,
    /// A snapshot file, required when a region has [`BackingDesc::Snapshot`] (unless
    /// `object` is given instead).
    #[serde(default)]
    pub snapshot: Option<FdIndex>,
    /// Instead of a snapshot fd: the snapshot is an object in one of the object stores
    /// faultd's config names, read with faultd's credentials, so only a key the config lets
    /// this peer's uid read is accepted. [`BackingDesc::Snapshot`] offsets are then offsets in
    /// the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectName>,
    /// The VM was served before (by a faultd that restarted or closed the session) and goes
    /// on: faultd takes the pages it evicted from its store for `vm`, and the rest of guest
    /// memory as it is now. False: a new VM; any store left under `vm` is discarded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
}

/// A snapshot object: a store faultd's config names, and a key in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectName {
    /// The store's name in faultd's config (`[[object_store.stores]] name`).
    pub store: String,
    /// The object's key in that store's bucket.
    pub key: String,
}

/// One guest RAM region: where it is in the guest, in the VMM, and in its memory fd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionDesc {
    /// Guest physical base address (aligned to `page_size`).
    pub gpa: u64,
    /// Size in bytes (a multiple of `page_size`).
    pub size: u64,
    /// 4096, or 2097152 for hugetlbfs-backed RAM.
    pub page_size: u64,
    /// Where the VMM maps the region (`MAP_SHARED` of `mem` at `mem_offset`); userfaultfd
    /// operations name VMM addresses, so faultd needs this.
    pub hva: u64,
    /// The guest RAM fd: a memfd (tmpfs) or a hugetlbfs file.
    pub mem: FdIndex,
    /// Offset of the region's first byte in `mem`.
    pub mem_offset: u64,
    /// Where a page that was never resident gets its contents.
    pub backing: BackingDesc,
    /// The guest must not write this region (device writes are refused).
    #[serde(default)]
    pub read_only: bool,
}

/// Source of a never-resident page's contents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[serde(from = "BackingWire")]
pub enum BackingDesc {
    /// Zero fill.
    Zero,
    /// The snapshot file, starting at `offset` for the region's first byte.
    Snapshot {
        /// File offset of the region's first byte (aligned to the page size).
        offset: u64,
    },
}

/// [`BackingDesc`] as it is read. `Zero {}`, not `Zero`: serde lets a unit variant of an
/// internally tagged enum through with unknown fields despite `deny_unknown_fields`
/// (serde-rs/serde#2123), an empty struct variant refuses them.
#[derive(Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum BackingWire {
    Zero {},
    Snapshot { offset: u64 },
}

impl From<BackingWire> for BackingDesc {
    fn from(wire: BackingWire) -> BackingDesc {
        match wire {
            BackingWire::Zero {} => BackingDesc::Zero,
            BackingWire::Snapshot { offset } => BackingDesc::Snapshot { offset },
        }
    }
}

/// A message from faultd to the VMM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    /// The registration was accepted; faults are being served from now on.
    Registered {
        /// Daemon-wide unique session id.
        session: u64,
        /// The protocol version in use.
        version: u32,
    },
    /// The session's counters.
    Stats(Box<SessionStats>),
    /// An `evict` request's result.
    Evicted {
        /// Pages evicted.
        evicted: u64,
        /// ... of which were all zero (nothing stored).
        zero: u64,
        /// Pages that could not be evicted (see faultd's log).
        failed: u64,
    },
    /// A `finish` request's result: the session no longer needs faultd when `remaining` is 0.
    Finished {
        /// Pages filled from the snapshot file or faultd's store by this request.
        filled: u64,
        /// Pages that still hold data only faultd can provide (see faultd's log); 0 on success.
        remaining: u64,
    },
    /// The device was attached; its page requests are served from now on.
    DeviceAdded {
        /// The device id.
        dev_id: u32,
        /// Bytes per IOMMU mapping granule for this device.
        granule: u64,
    },
    /// The device was detached (the answer to [`Request::RemoveDevice`]).
    DeviceRemoved {
        /// The device id.
        dev_id: u32,
        /// Bytes of guest RAM its IOMMU mapped until now (all unmapped and unpinned).
        unmapped_bytes: u64,
    },
    /// faultd listens for Firecracker on `socket` (the answer to
    /// [`Request::FirecrackerListen`]).
    Listening {
        /// The VM name.
        vm: String,
        /// The socket path.
        socket: std::path::PathBuf,
    },
    /// The counters of every live session named `vm` (none: an empty list).
    VmStats {
        /// The VM name asked for.
        vm: String,
        /// One entry per live session of that name.
        sessions: Vec<SessionStats>,
    },
    /// Daemon-wide figures (the answer to [`Request::Status`]).
    Status(Box<DaemonStatus>),
    /// Summary rows of live sessions (the answer to [`Request::Sessions`]).
    Sessions {
        /// At most [`MAX_SESSION_ROWS`] rows, by session id.
        sessions: Vec<SessionRow>,
        /// Whether sessions with larger ids were left out (ask again with `after`).
        more: bool,
    },
    /// The counters of the sessions a [`Request::SessionDetail`] named, by session id.
    SessionDetail {
        /// At most [`MAX_DETAIL_SESSIONS`] of them.
        sessions: Vec<SessionDetail>,
        /// How many more matched and were left out.
        omitted: u64,
    },
    /// What a [`Request::EvictSession`] did.
    SessionEvicted(SessionEvicted),
    /// The request was refused. After an error faultd closes the connection.
    Error {
        /// Machine-readable class of the error.
        code: ErrorCode,
        /// What was wrong, naming the field and the value.
        message: String,
    },
    /// faultd no longer listens on `socket` (the answer to [`Request::FirecrackerUnlisten`]).
    Unlistened {
        /// The listener's name.
        vm: String,
        /// The socket, now removed.
        socket: std::path::PathBuf,
    },
    /// The recordings a [`Request::WorkingSetList`] asked for, by uid then digest.
    WorkingSets {
        /// At most [`MAX_WS_ROWS`] of them.
        recordings: Vec<WorkingSetRow>,
        /// How many more there are, left out.
        omitted: u64,
    },
    /// A chunk of a recording's file (the answer to [`Request::WorkingSetExport`]).
    WorkingSetChunk {
        /// The snapshot's SHA-256, hex.
        digest: String,
        /// The SHA-256 of the whole file, hex: the exporter checks what it put together.
        sha256: String,
        /// The file's size.
        total: u64,
        /// Where `data` starts.
        offset: u64,
        /// The bytes, lowercase hex (none at or past the end).
        data: String,
    },
    /// A chunk of an import was staged (the answer to each [`Request::WorkingSetImport`] but
    /// the last).
    WorkingSetReceived {
        /// Bytes staged so far.
        received: u64,
        /// Of the recording's size.
        total: u64,
    },
    /// The import is complete, checked and in place (the answer to the last chunk).
    WorkingSetImported(WorkingSetRow),
    /// The recording is removed (the answer to [`Request::WorkingSetRemove`]).
    WorkingSetRemoved {
        /// Whose it was (none: imported).
        uid: Option<u32>,
        /// The snapshot's SHA-256, hex.
        digest: String,
    },
}

/// What kind of client a session serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionKind {
    /// A VMM that sent `register` (memfd guest RAM).
    #[default]
    Vmm,
    /// A Firecracker restore on a `firecracker_listen` socket (anonymous private guest RAM:
    /// faultd can serve its faults but neither evict it nor map it for a device).
    Firecracker,
}

/// Daemon-wide figures (the answer to [`Request::Status`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonStatus {
    /// faultd's version (its Cargo package version).
    pub version: String,
    /// faultd's process id.
    pub pid: u32,
    /// Seconds since faultd started.
    pub uptime_secs: u64,
    /// Live sessions.
    pub sessions: u64,
    /// The session limit (config `control.max_sessions`).
    pub max_sessions: u64,
    /// Guest RAM registered by all live sessions, bytes.
    pub guest_bytes: u64,
    /// Guest RAM resident in all live sessions, bytes.
    pub resident_bytes: u64,
    /// Guest RAM mapped for devices (pinned) in all live sessions, bytes.
    pub pinned_bytes: u64,
    /// The resident budgets (config `[budget]`).
    pub budget: BudgetStatus,
    /// Pages of all live sessions held in the store now.
    pub stored_pages: u64,
    /// Pages evicted by all live sessions so far.
    pub evicted_pages: u64,
    /// Devices attached to live sessions.
    pub devices: u64,
    /// Device page-request groups read by live sessions.
    pub device_groups: u64,
    /// Where evicted pages are kept (config `store.dir`).
    pub store_dir: std::path::PathBuf,
    /// Sockets faultd listens on for Firecracker (all of them).
    pub firecracker_listeners: u64,
    /// The first [`MAX_STATUS_LISTENERS`] of them, by socket path.
    pub firecracker: Vec<ListenerStatus>,
}

/// The resident budgets in force, bytes (0: none) and watermarks (percent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetStatus {
    /// All VMs together.
    pub global_bytes: u64,
    /// Each VM.
    pub session_bytes: u64,
    /// Eviction starts above this share of a budget.
    pub high_pct: u64,
    /// ... and stops below this one.
    pub low_pct: u64,
}

/// One socket faultd listens on for Firecracker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerStatus {
    /// The VM its restores are served as.
    pub vm: String,
    /// The socket path.
    pub socket: std::path::PathBuf,
}

/// One live session, in a line (the rows of [`Response::Sessions`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRow {
    /// Session id.
    pub session: u64,
    /// VM name.
    pub vm: String,
    /// What kind of client it serves.
    pub kind: SessionKind,
    /// The VMM's process id, where the kernel told it (SO_PEERCRED).
    pub pid: Option<i32>,
    /// Guest RAM registered, bytes.
    pub guest_bytes: u64,
    /// Guest RAM resident, bytes.
    pub resident_bytes: u64,
    /// Guest RAM mapped for devices (pinned), bytes.
    pub pinned_bytes: u64,
    /// Pages held in the store.
    pub stored_pages: u64,
    /// vCPU (userfaultfd) faults read.
    pub vcpu_faults: u64,
    /// Device page-request groups read.
    pub device_groups: u64,
    /// 99th percentile of vCPU fault service time, microseconds (0 before the first fault).
    pub vcpu_p99_us: f64,
    /// 99th percentile of device group service time, microseconds (0 before the first group).
    pub device_p99_us: f64,
}

/// What an operator's eviction did (the answer to [`Request::EvictSession`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionEvicted {
    /// The session evicted from.
    pub session: u64,
    /// Its VM name.
    pub vm: String,
    /// Pages evicted.
    pub evicted: u64,
    /// ... of which were all zero (nothing stored).
    pub zero: u64,
    /// Pages that could not be evicted (see faultd's log).
    pub failed: u64,
    /// The session's resident bytes after the eviction.
    pub resident_bytes: u64,
}

/// One session's counters with what it is (the entries of [`Response::SessionDetail`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionDetail {
    /// VM name.
    pub vm: String,
    /// What kind of client it serves.
    pub kind: SessionKind,
    /// The VMM's process id, where known.
    pub pid: Option<i32>,
    /// Its counters (`stats.session` is its id).
    pub stats: SessionStats,
    /// For a session whose snapshot is an object: the object and the chunk fetcher's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<ObjectStatus>,
}

/// A session's snapshot object, and the figures of the chunk fetcher and cache that serve it.
/// The fetcher and cache are shared by every session of the daemon: the counters are
/// daemon-wide (the `faultd_object_*` metrics), not this session's alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectStatus {
    /// endpoint/bucket/key.
    pub object: String,
    /// The version (ETag) the session is pinned to.
    pub etag: String,
    /// Object size, bytes.
    pub size: u64,
    /// Chunk size, bytes.
    pub chunk_bytes: u64,
    /// Why the session's object backing failed, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Page reads served from the cache (all sessions).
    pub cache_hits: u64,
    /// Page reads that waited for a GET, started or joined (all sessions).
    pub cache_misses: u64,
    /// GETs made, every attempt (all sessions).
    pub gets: u64,
    /// GETs that failed (all sessions).
    pub get_errors: u64,
    /// Bytes fetched by successful GETs (all sessions).
    pub bytes_fetched: u64,
    /// Chunks being fetched now (all sessions).
    pub in_flight: u64,
    /// Bytes in the chunk cache now.
    pub cache_bytes: u64,
    /// Chunks in the chunk cache now.
    pub cache_chunks: u64,
}

/// Counters of one session.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionStats {
    /// Session id.
    pub session: u64,
    /// Total guest RAM registered, bytes.
    pub guest_bytes: u64,
    /// Guest RAM faultd has made resident, bytes.
    pub resident_bytes: u64,
    /// vCPU (userfaultfd) faults read.
    pub vcpu_faults: u64,
    /// Faults resolved by zero fill.
    pub zero_fills: u64,
    /// Faults resolved from the snapshot file.
    pub file_fills: u64,
    /// Faults resolved from faultd's swap store.
    #[serde(default)]
    pub store_fills: u64,
    /// Pages evicted.
    #[serde(default)]
    pub evictions: u64,
    /// Pages whose contents are in the store now.
    #[serde(default)]
    pub stored_pages: u64,
    /// Faults on pages already present (a duplicate event, or a page someone else installed).
    pub already_present: u64,
    /// Resolutions retried because the kernel said EAGAIN (an unread layout event).
    pub retries: u64,
    /// Pages the VMM discarded (REMOVE events).
    pub discarded_pages: u64,
    /// Faults that could not be served (see faultd's log).
    pub errors: u64,
    /// Device page-request counters.
    #[serde(default)]
    pub device: DeviceStats,
    /// Device group service time percentiles (read to answer), microseconds.
    #[serde(default)]
    pub device_latency_us: LatencySummary,
    /// Service time percentiles (event read to page installed), microseconds.
    pub latency_us: LatencySummary,
    /// Fault-around: pages and granules served ahead of sequential fault streams.
    #[serde(default)]
    pub around: AroundStats,
    /// Snapshot zero pages, working-set recording and replay.
    #[serde(default)]
    pub working_set: WorkingSetStats,
}

/// Fault-around counters of one session: what was served ahead of sequential streams of faults
/// (config `[around]`). Pages installed ahead are not vCPU faults; they are counted here only
/// (and in the fill counters, as every install is).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AroundStats {
    /// Look-ahead rounds after a sequential vCPU fault.
    pub vcpu_rounds: u64,
    /// Pages installed ahead of vCPU fault streams.
    pub vcpu_pages: u64,
    /// Look-ahead rounds after a sequential device page-request group.
    pub device_rounds: u64,
    /// Granules mapped ahead for devices (made resident first where needed).
    pub device_granules: u64,
    /// Look-aheads cut short: budget watermark, pin room, deadline, a page being evicted or a
    /// pending layout event (EAGAIN).
    pub stopped: u64,
}

/// A session's snapshot zero pages and working-set recording and replay. faultd cannot see a
/// guest touch a page it installed ahead of it (no accessed bits here), so there is no "hits"
/// figure: what it sees is which demand faults came on pages of the recording it had not
/// installed yet (`late`) and outside the recording (`misses`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingSetStats {
    /// Snapshot pages served as zero pages (all zero in the file: not copied from it).
    #[serde(default)]
    pub zero_pages: u64,
    /// Pages recorded so far by this session (first demand faults on snapshot pages).
    #[serde(default)]
    pub recorded: u64,
    /// Pages of the recording being replayed (0: none replayed).
    #[serde(default)]
    pub replay_pages: u64,
    /// Pages copied ahead of the guest from the recording (snapshot data; not its zero pages).
    #[serde(default)]
    pub prefetched: u64,
    /// Recorded snapshot pages that are all zero, mapped ahead of the guest as zero pages
    /// (nothing copied; also in `zero_pages`). Not in `prefetched`.
    #[serde(default)]
    pub prefetched_zero: u64,
    /// Recorded pages skipped: already present, discarded by the VMM, or not snapshot pages.
    #[serde(default)]
    pub skipped: u64,
    /// Demand faults on pages of the recording not installed yet.
    #[serde(default)]
    pub late: u64,
    /// Demand faults on snapshot pages outside the recording.
    #[serde(default)]
    pub misses: u64,
    /// Why replay stopped ("" while it runs or when there was none): "done", "wrong"
    /// (demand faults mostly outside the recording), "budget", "finished", "error".
    #[serde(default)]
    pub replay_stop: String,
    /// Microseconds from the session's start to the end of replay (0: not ended).
    #[serde(default)]
    pub replay_us: u64,
}

/// Device page-request counters of one session (all devices).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStats {
    /// Devices attached.
    pub devices: u64,
    /// Page-request groups read.
    pub groups: u64,
    /// Page requests (records) in those groups.
    pub pages: u64,
    /// Groups answered SUCCESS.
    pub success: u64,
    /// Groups answered INVALID (all reasons below).
    pub invalid: u64,
    /// ... because an address was outside the guest layout.
    pub outside_layout: u64,
    /// ... because a write asked for a read-only region.
    pub read_only: u64,
    /// ... because records were malformed (also counts malformed records without a cookie).
    pub malformed: u64,
    /// ... because the group was not resolved within the deadline.
    pub deadline: u64,
    /// ... because a page could not be installed or mapped.
    pub failed: u64,
    /// Bytes of guest RAM mapped for devices (pinned) now.
    pub mapped_bytes: u64,
    /// Granules unmapped to stay within the pin limit.
    pub pin_evictions: u64,
    /// Responses the transport could not take (counted, the group stays unanswered).
    pub respond_errors: u64,
    /// Devices faultd stopped serving because their VMM made its notification block.
    #[serde(default)]
    pub quarantined: u64,
    /// Groups read and dropped unanswered because a newer group came with the same cookie:
    /// the kernel had answered the older one itself (an HWPT replace) and handed its cookie on
    /// (the cookie guard, docs/device-faults.md).
    #[serde(default)]
    pub stale_cookies: u64,
}

/// Percentiles of a latency distribution, microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySummary {
    /// Samples recorded.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

/// Class of a refused request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not valid JSON, or not a known message.
    Malformed,
    /// The packet was larger than [`MAX_MESSAGE_BYTES`], or carried too many fds.
    Oversize,
    /// `version` is not one faultd speaks.
    UnsupportedVersion,
    /// A message that is not valid in this state (e.g. a second `register`).
    UnexpectedMessage,
    /// An fd index is missing, out of range, or the fd is of the wrong kind.
    BadFd,
    /// The layout is inconsistent (overlap, alignment, sizes, backing).
    BadLayout,
    /// A region's `hva` is not a mapping of its `mem` fd at `mem_offset` in the VMM.
    BadMapping,
    /// faultd is at its session limit, or the VM at its device limit.
    Busy,
    /// A device with this dev_id is attached already.
    DuplicateDevice,
    /// A pinned device would pin more than the pin limit or the memory budget allows.
    PinLimit,
    /// A socket or snapshot path of `firecracker_listen` is unusable (relative, too long,
    /// taken, missing, not a regular file).
    BadPath,
    /// The client may not make this request (`firecracker_listen` and `evict_session` need
    /// root or faultd's uid).
    PermissionDenied,
    /// No live session has the name or id an operator request gave.
    UnknownSession,
    /// An operator request's own values are unusable (an empty range, a range outside the
    /// session's layout, zero pages, a VM name of several sessions where one is needed, a
    /// session whose memory faultd cannot evict).
    BadRequest,
    /// faultd failed for a reason of its own.
    Internal,
    /// The VM (its session or its store) belongs to another user: a VM and its store are the
    /// uid's that created them (SO_PEERCRED), and only it, or root, may reach them. Also: an
    /// object the config does not let this uid read.
    Forbidden,
    /// The session's snapshot object could not be read (it changed or was deleted since the
    /// restore started, or the store did not answer before the deadline), or could not be
    /// opened at `register`. A live session is over: the faults waiting for it were never
    /// served.
    BackingFailed,
}

/// Bytes as lowercase hex (how recording chunks and digests travel in JSON).
pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// Lowercase hex as bytes; None if `text` is not an even number of lowercase hex digits.
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let t = text.as_bytes();
    if !t.len().is_multiple_of(2) {
        return None;
    }
    t.chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

/// Failure to encode or decode a message.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The message does not fit [`MAX_MESSAGE_BYTES`].
    #[error("message of {len} bytes exceeds the limit of {MAX_MESSAGE_BYTES}")]
    Oversize {
        /// Encoded length.
        len: usize,
    },
    /// The bytes are not a valid message.
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
}

/// Encodes a message for one packet.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = serde_json::to_vec(msg).map_err(CodecError::Malformed)?;
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::Oversize { len: bytes.len() });
    }
    Ok(bytes)
}

/// Decodes one packet.
///
/// Records are JSON objects: the message itself and every element of its arrays (the
/// protocol's arrays all hold records). serde would also take a record spelled as the array of
/// its field values (`["status"]`, a region as `[0, 4096, ...]`), a second spelling that no
/// client sends and nothing documents; it is refused as malformed, naming where it was.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::Oversize { len: bytes.len() });
    }
    let msg = serde_json::from_slice(bytes).map_err(CodecError::Malformed)?;
    // Parsed again as plain JSON only once it is known to be valid, so this cannot fail.
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(CodecError::Malformed)?;
    if let Some(at) = record_not_an_object(&value) {
        return Err(CodecError::Malformed(serde::de::Error::custom(format!(
            "{at} is not a JSON object (messages, records and the elements of arrays are)"
        ))));
    }
    match tag_not_a_string(&value) {
        None => Ok(msg),
        Some(at) => Err(CodecError::Malformed(serde::de::Error::custom(format!(
            "{at} is not a string (a record's `type` or `kind` names its variant)"
        )))),
    }
}

/// Where `v` has a `type` or `kind` field whose value is not a string, as a path
/// (`queue.kind`). serde takes an integer there as the variant's index (`"kind": 0` is the
/// first variant), a second spelling that no client sends and nothing documents.
fn tag_not_a_string(v: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match v {
        Value::Object(fields) => fields.iter().find_map(|(k, v)| {
            if (k == "type" || k == "kind") && !v.is_string() {
                return Some(k.clone());
            }
            tag_not_a_string(v)
                .map(|p| format!("{k}{}{p}", if p.starts_with('[') { "" } else { "." }))
        }),
        Value::Array(elements) => elements
            .iter()
            .enumerate()
            .find_map(|(i, e)| tag_not_a_string(e).map(|p| format!("[{i}].{p}"))),
        _ => None,
    }
}

/// Where `message` has a record that is not a JSON object: the message itself, or the first
/// such array element, as a path (`regions[0]`); `None` if all are objects.
fn record_not_an_object(message: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    /// The path below `v` of the first array element in it that is not an object.
    fn below(v: &Value) -> Option<String> {
        match v {
            Value::Object(fields) => fields
                .iter()
                .find_map(|(k, v)| below(v).map(|p| format!(".{k}{p}"))),
            Value::Array(elements) => elements.iter().enumerate().find_map(|(i, e)| {
                let inside = match e {
                    Value::Object(_) => below(e),
                    _ => Some(String::new()),
                };
                inside.map(|p| format!("[{i}]{p}"))
            }),
            _ => None,
        }
    }
    match message {
        Value::Object(_) => below(message).map(|p| p.trim_start_matches('.').to_owned()),
        _ => Some("the message".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_odd_lengths_and_other_digits() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&bytes)), Some(bytes));
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("AB"), None);
        assert_eq!(hex_decode("0g"), None);
    }

    #[test]
    fn a_full_working_set_chunk_fits_one_message() {
        let chunk = Response::WorkingSetChunk {
            digest: "f".repeat(64),
            sha256: "f".repeat(64),
            total: WS_MAX_RECORDING_BYTES,
            offset: WS_MAX_RECORDING_BYTES,
            data: hex_encode(&[0xff; WS_CHUNK_BYTES]),
        };
        let import = Request::WorkingSetImport {
            uid: Some(u32::MAX),
            imported: true,
            digest: "f".repeat(64),
            sha256: "f".repeat(64),
            total: WS_MAX_RECORDING_BYTES,
            offset: WS_MAX_RECORDING_BYTES,
            data: hex_encode(&[0xff; WS_CHUNK_BYTES]),
        };
        assert!(encode(&chunk).is_ok());
        assert!(encode(&import).is_ok());
    }

    #[test]
    fn a_variant_tag_spelled_as_its_index_is_malformed() {
        // serde would take `"kind": 0` as the first variant (`ring`), `"type": 1` likewise.
        let json = br#"{"type":"add_device","dev_id":0,"queue":{"kind":0,"ring":0,"kick":0,"notify":0},"iommu":{"kind":"emulated","table":0}}"#;
        match decode::<Request>(json) {
            Err(CodecError::Malformed(e)) => assert!(e.to_string().contains("queue.kind"), "{e}"),
            other => panic!("accepted or refused otherwise: {other:?}"),
        }
        assert!(matches!(
            decode::<Request>(br#"{"type":2}"#),
            Err(CodecError::Malformed(_))
        ));
        let good = json_string_tag();
        assert!(decode::<Request>(good.as_bytes()).is_ok(), "{good}");
    }

    fn json_string_tag() -> String {
        r#"{"type":"add_device","dev_id":0,"queue":{"kind":"ring","ring":0,"kick":0,"notify":0},"iommu":{"kind":"emulated","table":0}}"#.to_owned()
    }

    fn sample() -> Request {
        Request::Register(Register {
            version: PROTOCOL_VERSION,
            vm: "vm0".into(),
            uffd: FdIndex(0),
            regions: vec![RegionDesc {
                gpa: 0,
                size: 1 << 30,
                page_size: 4096,
                hva: 0x7f00_0000_0000,
                mem: FdIndex(1),
                mem_offset: 0,
                backing: BackingDesc::Snapshot { offset: 4096 },
                read_only: false,
            }],
            snapshot: Some(FdIndex(2)),
            object: None,
            resume: false,
        })
    }

    /// The `register` example of docs/protocol.md is one faultd would accept as far as the
    /// message alone tells: it decodes, and its regions overlap neither in the guest, nor in
    /// the VMM, nor in a memory file, and are aligned to their page sizes.
    #[test]
    fn the_documented_register_example_is_a_consistent_layout() {
        let doc = include_str!("../../../docs/protocol.md");
        let start = doc
            .find("## `register` (VMM -> faultd)\n```json\n")
            .expect("the register section")
            + "## `register` (VMM -> faultd)\n```json\n".len();
        let json = &doc[start..start + doc[start..].find("```").expect("end of the example")];
        let Request::Register(reg) = decode::<Request>(json.as_bytes()).unwrap() else {
            panic!("not a register: {json}");
        };
        let overlap = |a: (u64, u64), b: (u64, u64)| a.0 < b.0 + b.1 && b.0 < a.0 + a.1;
        for (i, a) in reg.regions.iter().enumerate() {
            for x in [a.gpa, a.hva, a.mem_offset, a.size] {
                assert_eq!(x % a.page_size, 0, "regions[{i}] is not aligned");
            }
            for (j, b) in reg.regions.iter().enumerate().skip(i + 1) {
                assert!(!overlap((a.gpa, a.size), (b.gpa, b.size)), "gpa {i} {j}");
                assert!(!overlap((a.hva, a.size), (b.hva, b.size)), "hva {i} {j}");
                assert!(
                    a.mem != b.mem || !overlap((a.mem_offset, a.size), (b.mem_offset, b.size)),
                    "memory file range {i} {j}"
                );
            }
        }
    }

    #[test]
    fn register_round_trips_through_json() {
        let bytes = encode(&sample()).unwrap();
        assert_eq!(decode::<Request>(&bytes).unwrap(), sample());
    }

    #[test]
    fn wire_form_is_the_documented_one() {
        let text = String::from_utf8(encode(&sample()).unwrap()).unwrap();
        assert!(text.starts_with(r#"{"type":"register","version":1,"vm":"vm0","uffd":0,"#));
        assert!(text.contains(r#""backing":{"kind":"snapshot","offset":4096}"#));
    }

    #[test]
    fn add_device_wire_form_is_the_documented_one() {
        let r = Request::AddDevice(AddDevice {
            dev_id: 1,
            queue: QueueDesc::Ring {
                ring: FdIndex(0),
                kick: FdIndex(1),
                notify: FdIndex(2),
            },
            iommu: IommuDesc::Emulated { table: FdIndex(3) },
        });
        let text = String::from_utf8(encode(&r).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"type":"add_device","dev_id":1,"queue":{"kind":"ring","ring":0,"kick":1,"notify":2},"iommu":{"kind":"emulated","table":3}}"#
        );
        assert_eq!(decode::<Request>(text.as_bytes()).unwrap(), r);
    }

    #[test]
    fn firecracker_listen_wire_form_is_the_documented_one() {
        let r = Request::FirecrackerListen(FirecrackerListen {
            vm: "fc0".into(),
            socket: "/run/fc0/uffd.sock".into(),
            snapshot: Some("/srv/fc0/mem".into()),
            object: None,
            uid: Some(1000),
            pid: None,
        });
        let text = String::from_utf8(encode(&r).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"type":"firecracker_listen","vm":"fc0","socket":"/run/fc0/uffd.sock","snapshot":"/srv/fc0/mem","uid":1000}"#
        );
        assert_eq!(decode::<Request>(text.as_bytes()).unwrap(), r);
    }

    #[test]
    fn vm_stats_answer_round_trips() {
        let r = Response::VmStats {
            vm: "fc0".into(),
            sessions: vec![SessionStats::default()],
        };
        let bytes = encode(&r).unwrap();
        assert_eq!(decode::<Response>(&bytes).unwrap(), r);
    }

    #[test]
    fn evict_session_wire_form_is_the_documented_one() {
        let r = Request::EvictSession {
            target: SessionRef::Vm("vm0".into()),
            amount: EvictAmount::Range {
                gpa: 4096,
                len: 8192,
            },
        };
        let text = String::from_utf8(encode(&r).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"type":"evict_session","target":{"vm":"vm0"},"amount":{"range":{"gpa":4096,"len":8192}}}"#
        );
        assert_eq!(decode::<Request>(text.as_bytes()).unwrap(), r);
        let by_id = br#"{"type":"evict_session","target":{"session":3},"amount":{"pages":8}}"#;
        assert_eq!(
            decode::<Request>(by_id).unwrap(),
            Request::EvictSession {
                target: SessionRef::Session(3),
                amount: EvictAmount::Pages(8),
            }
        );
    }

    #[test]
    fn status_and_sessions_requests_take_no_fields_but_after() {
        assert_eq!(
            decode::<Request>(br#"{"type":"status"}"#).unwrap(),
            Request::Status {}
        );
        assert_eq!(
            decode::<Request>(br#"{"type":"sessions","after":7}"#).unwrap(),
            Request::Sessions { after: Some(7) }
        );
        assert_eq!(
            encode(&Request::Sessions { after: None }).unwrap(),
            br#"{"type":"sessions"}"#
        );
    }

    #[test]
    fn a_full_page_of_longest_session_rows_fits_one_message() {
        let row = SessionRow {
            session: u64::MAX,
            vm: "v".repeat(MAX_VM_NAME),
            kind: SessionKind::Firecracker,
            pid: Some(i32::MAX),
            guest_bytes: u64::MAX,
            resident_bytes: u64::MAX,
            pinned_bytes: u64::MAX,
            stored_pages: u64::MAX,
            vcpu_faults: u64::MAX,
            device_groups: u64::MAX,
            vcpu_p99_us: f64::MAX,
            device_p99_us: f64::MAX,
        };
        let r = Response::Sessions {
            sessions: vec![row; MAX_SESSION_ROWS],
            more: true,
        };
        assert!(encode(&r).is_ok());
    }

    #[test]
    fn unknown_field_is_malformed() {
        let bad = br#"{"type":"stats","extra":1}"#;
        assert!(matches!(
            decode::<Request>(bad),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn unknown_type_is_malformed() {
        assert!(matches!(
            decode::<Request>(br#"{"type":"reboot"}"#),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn oversize_packet_is_refused_before_parsing() {
        let big = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            decode::<Request>(&big),
            Err(CodecError::Oversize { len }) if len == MAX_MESSAGE_BYTES + 1
        ));
    }

    #[test]
    fn error_response_names_its_code() {
        let r = Response::Error {
            code: ErrorCode::BadLayout,
            message: "x".into(),
        };
        let text = String::from_utf8(encode(&r).unwrap()).unwrap();
        assert_eq!(
            text,
            r#"{"type":"error","code":"bad_layout","message":"x"}"#
        );
    }
}

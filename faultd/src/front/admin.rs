//! Operator requests on the control socket: `status`, `sessions`, `session_detail`,
//! `evict_session` and the `working_set_*` requests (what `faultd ctl` sends). They come from a connection that has not
//! registered, and address sessions that other connections own.
//!
//! Owns: answering them from the daemon's live sessions, deciding who may reach which session
//! (`Caller`), and checking an operator's eviction before any session sees it. Refuses:
//! doing the eviction (the session's fault thread does, between faults, through its command
//! channel, as for the VMM's own `evict`).

use faultd_proto::{
    BudgetStatus, DaemonStatus, ErrorCode, EvictAmount, ListenerStatus, Request, Response,
    SessionDetail, SessionEvicted, SessionRef, SessionRow, WorkingSetRow, MAX_DETAIL_SESSIONS,
    MAX_SESSION_ROWS, MAX_STATUS_LISTENERS, MAX_WS_ROWS, WS_CHUNK_BYTES,
};
use s2map::{Gpa, Layout};

use crate::daemon::{Daemon, Served};
use crate::engine::ws_library::{ExportFile, LibraryError, Listed, Upload};
use crate::engine::{Command, EvictReport};
use crate::front::validate::Refusal;

fn refusal(code: ErrorCode, message: String) -> Refusal {
    Refusal { code, message }
}

/// Who asks, as the kernel told it (SO_PEERCRED). A VM, its sessions and its store belong to
/// the uid that created them: that uid reaches its own VMs, the operator (root, or faultd's own
/// uid) every VM, and nobody else any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    /// Root or faultd's uid.
    Operator,
    /// Any other uid (None: the kernel did not say, so it owns nothing).
    User(Option<u32>),
}

impl Caller {
    /// The caller of a connection with credentials `cred`.
    pub(crate) fn of(cred: Option<&tokio_seqpacket::UCred>) -> Caller {
        let me = nix::unistd::geteuid().as_raw();
        match cred.map(|c| c.uid()) {
            Some(uid) if uid == 0 || uid == me => Caller::Operator,
            uid => Caller::User(uid),
        }
    }

    /// Whether the caller may reach a VM of `owner`.
    fn reaches(self, owner: u32) -> bool {
        match self {
            Caller::Operator => true,
            Caller::User(uid) => uid == Some(owner),
        }
    }

    /// Whether the caller may remove a Firecracker listener that uid `added_by` added (None:
    /// the config file): that uid, or the operator.
    pub(crate) fn may_unlisten(self, added_by: Option<u32>) -> bool {
        match self {
            Caller::Operator => true,
            Caller::User(uid) => uid.is_some() && uid == added_by,
        }
    }

    fn describe(self) -> String {
        match self {
            Caller::Operator => "the operator".into(),
            Caller::User(Some(uid)) => format!("uid {uid}"),
            Caller::User(None) => "a client of unknown uid".into(),
        }
    }
}

/// A VM name as an operator request gives it: `vm` (the caller's own VM of that name; for the
/// operator, that name under every uid) or `uid/vm` (the VM of that uid). VM names never hold
/// a `/`, so the two cannot be confused.
fn parse_vm(name: &str) -> (Option<u32>, &str) {
    match name.split_once('/') {
        Some((uid, vm)) => match uid.parse::<u32>() {
            Ok(uid) => (Some(uid), vm),
            // Not a uid: a name no VM has (refused as unknown).
            Err(_) => (None, name),
        },
        None => (None, name),
    }
}

fn forbidden(caller: Caller, what: String, owner: Option<u32>) -> Refusal {
    let whose = owner.map_or_else(|| "another user".into(), |o| format!("uid {o}"));
    refusal(
        ErrorCode::Forbidden,
        format!(
            "{what} belongs to {whose}, not to {}: a VM and its store are reached only by the \
             uid that created it, or by root",
            caller.describe()
        ),
    )
}

/// The live sessions (admitted or not) named `name` (see [`parse_vm`]) that `caller` may
/// reach; refused `forbidden` when the name is only another user's.
fn named(
    daemon: &Daemon,
    name: &str,
    caller: Caller,
) -> Result<Vec<std::sync::Arc<crate::engine::session::Session>>, Refusal> {
    let (uid, vm) = parse_vm(name);
    if let Some(uid) = uid.filter(|&u| !caller.reaches(u)) {
        return Err(forbidden(caller, format!("vm {vm:?}"), Some(uid)));
    }
    let mut all = daemon.live_sessions();
    all.retain(|s| s.vm() == vm && uid.is_none_or(|u| s.owner() == u));
    all.sort_unstable_by_key(|s| s.id());
    let (mine, others): (Vec<_>, Vec<_>) = all.into_iter().partition(|s| caller.reaches(s.owner()));
    if mine.is_empty() && !others.is_empty() {
        // Which user is not said: another user's VM names are none of the caller's business.
        return Err(forbidden(caller, format!("vm {vm:?}"), None));
    }
    Ok(mine)
}

/// The counters of every live session named `name` that `caller` may see, by session id
/// (none is an empty answer, as before; a name only another user has is refused).
pub(crate) fn vm_stats(daemon: &Daemon, name: String, caller: Caller) -> Result<Response, Refusal> {
    let sessions = named(daemon, &name, caller)?
        .iter()
        .map(|s| s.stats())
        .collect();
    Ok(Response::VmStats { vm: name, sessions })
}

/// Daemon-wide figures.
pub(crate) fn status(daemon: &Daemon) -> Response {
    let served = daemon.served();
    let mut st = DaemonStatus {
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        uptime_secs: daemon.uptime().as_secs(),
        sessions: served.len() as u64,
        max_sessions: daemon.config.max_sessions as u64,
        budget: BudgetStatus {
            global_bytes: daemon.config.budget.global,
            session_bytes: daemon.config.budget.session,
            high_pct: daemon.config.budget.high_pct,
            low_pct: daemon.config.budget.low_pct,
        },
        store_dir: daemon.config.store_dir.clone(),
        ..DaemonStatus::default()
    };
    for s in &served {
        let stats = s.session.stats();
        st.guest_bytes += stats.guest_bytes;
        st.resident_bytes += stats.resident_bytes;
        st.pinned_bytes += stats.device.mapped_bytes;
        st.stored_pages += stats.stored_pages;
        st.evicted_pages += stats.evictions;
        st.devices += stats.device.devices;
        st.device_groups += stats.device.groups;
    }
    let listeners = daemon.firecracker.list();
    st.firecracker_listeners = listeners.len() as u64;
    st.firecracker = listeners
        .into_iter()
        .take(MAX_STATUS_LISTENERS)
        .map(|(socket, vm)| ListenerStatus { vm, socket })
        .collect();
    Response::Status(Box::new(st))
}

/// One row per live session with an id above `after`, at most [`MAX_SESSION_ROWS`].
/// A caller that is not the operator sees its own sessions only.
pub(crate) fn sessions(daemon: &Daemon, after: Option<u64>, caller: Caller) -> Response {
    let mut served = daemon.served();
    served
        .retain(|s| after.is_none_or(|a| s.session.id() > a) && caller.reaches(s.session.owner()));
    let more = served.len() > MAX_SESSION_ROWS;
    let sessions = served
        .iter()
        .take(MAX_SESSION_ROWS)
        .map(|s| {
            let stats = s.session.stats();
            SessionRow {
                session: stats.session,
                vm: s.session.vm().to_owned(),
                kind: s.kind,
                pid: s.pid,
                guest_bytes: stats.guest_bytes,
                resident_bytes: stats.resident_bytes,
                pinned_bytes: stats.device.mapped_bytes,
                stored_pages: stats.stored_pages,
                vcpu_faults: stats.vcpu_faults,
                device_groups: stats.device.groups,
                vcpu_p99_us: stats.latency_us.p99,
                device_p99_us: stats.device_latency_us.p99,
            }
        })
        .collect();
    Response::Sessions { sessions, more }
}

/// The live sessions `target` names, by id; refused when there is none, and `forbidden` when
/// they are not `caller`'s.
fn find(daemon: &Daemon, target: &SessionRef, caller: Caller) -> Result<Vec<Served>, Refusal> {
    let mut served = daemon.served();
    match target {
        SessionRef::Vm(name) => {
            let ids: Vec<u64> = named(daemon, name, caller)?
                .iter()
                .map(|s| s.id())
                .collect();
            served.retain(|s| ids.contains(&s.session.id()));
        }
        SessionRef::Session(id) => {
            served.retain(|s| s.session.id() == *id);
            if let Some(s) = served
                .first()
                .filter(|s| !caller.reaches(s.session.owner()))
            {
                return Err(forbidden(
                    caller,
                    format!("session {id} (vm {:?})", s.session.vm()),
                    Some(s.session.owner()),
                ));
            }
        }
    }
    if served.is_empty() {
        let what = match target {
            SessionRef::Vm(vm) => format!("no live session of vm {vm:?}"),
            SessionRef::Session(id) => format!("no live session {id}"),
        };
        return Err(refusal(ErrorCode::UnknownSession, what));
    }
    Ok(served)
}

/// The snapshot object of `session` (if it has one) and the shared fetcher's figures.
fn object_status(
    daemon: &Daemon,
    session: &crate::engine::session::Session,
) -> Option<faultd_proto::ObjectStatus> {
    let version = session.object()?;
    let fetcher = daemon.objects.as_ref()?.fetcher();
    let sample = crate::daemon::object_sample(fetcher);
    Some(faultd_proto::ObjectStatus {
        object: version.label().to_owned(),
        etag: version.etag().to_owned(),
        size: version.size(),
        chunk_bytes: version.chunk_size().bytes(),
        failure: session.failure().map(str::to_owned),
        cache_hits: sample.hits,
        cache_misses: sample.misses,
        gets: sample.gets,
        get_errors: sample.get_errors,
        bytes_fetched: sample.bytes_fetched,
        in_flight: fetcher.in_flight() as u64,
        cache_bytes: sample.cache_bytes,
        cache_chunks: sample.cache_chunks,
    })
}

/// The counters of the sessions `target` names.
pub(crate) fn detail(
    daemon: &Daemon,
    target: &SessionRef,
    caller: Caller,
) -> Result<Response, Refusal> {
    let found = find(daemon, target, caller)?;
    let omitted = found.len().saturating_sub(MAX_DETAIL_SESSIONS) as u64;
    let sessions = found
        .iter()
        .take(MAX_DETAIL_SESSIONS)
        .map(|s| SessionDetail {
            vm: s.session.vm().to_owned(),
            kind: s.kind,
            pid: s.pid,
            stats: s.session.stats(),
            object: object_status(daemon, &s.session),
        })
        .collect();
    Ok(Response::SessionDetail { sessions, omitted })
}

/// Evicts `amount` from the one session `target` names, on its fault thread; waits for the
/// report off the reactor.
pub(crate) async fn evict(
    daemon: &Daemon,
    target: &SessionRef,
    amount: EvictAmount,
    cred: Option<&tokio_seqpacket::UCred>,
) -> Result<Response, Refusal> {
    // Eviction changes a VM's memory: the operator may evict any VM, a VM's owner its own,
    // nobody else any (the socket's group is VMMs of many users, which must not evict each
    // other's).
    let caller = Caller::of(cred);
    let mut found = find(daemon, target, caller)?;
    if found.len() > 1 {
        let ids: Vec<String> = found.iter().map(|s| s.session.id().to_string()).collect();
        return Err(refusal(
            ErrorCode::BadRequest,
            format!(
                "vm {:?} has {} live sessions ({}): name one by its session id",
                found[0].session.vm(),
                found.len(),
                ids.join(", ")
            ),
        ));
    }
    let served = found.remove(0);
    let session = &served.session;
    if session.is_anonymous() {
        // A Firecracker restore's anonymous memory is paged out to swap (see crate::kernel::remote):
        // say up front what would make that a no-op.
        let why = if session.remote().is_none() {
            Some(
                "faultd could not open the VMM's memory when the session started (see its log)"
                    .to_owned(),
            )
        } else if session
            .layout()
            .regions()
            .iter()
            .all(|r| r.page_size().bytes() != 4096)
        {
            Some("its guest RAM is hugetlb memory, which the kernel does not page out".to_owned())
        } else if !crate::kernel::remote::swap_available().unwrap_or(false) {
            Some(format!(
                "{} (enable a swap device or file)",
                crate::kernel::remote::NO_SWAP
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(refusal(
                ErrorCode::BadRequest,
                format!(
                    "session {} ({}) is a Firecracker restore, whose anonymous memory is \
                     evicted by paging it out to swap; it cannot be now: {why}",
                    session.id(),
                    session.vm()
                ),
            ));
        }
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let command = match amount {
        EvictAmount::Range { gpa, len } => {
            check_range(session.layout(), gpa, len)
                .map_err(|m| refusal(ErrorCode::BadRequest, m))?;
            Command::Evict {
                gpa: Gpa(gpa),
                len,
                max: u64::MAX,
                reply: tx,
            }
        }
        EvictAmount::Pages(0) => {
            return Err(refusal(
                ErrorCode::BadRequest,
                "pages must be at least 1".into(),
            ))
        }
        EvictAmount::Pages(pages) => Command::EvictOldest { pages, reply: tx },
    };
    let stopped = || {
        refusal(
            ErrorCode::Internal,
            format!("session {}'s fault service has stopped", session.id()),
        )
    };
    served.commands.send(command).map_err(|_| stopped())?;
    // The thread evicts between faults, each page a few syscalls: wait on a blocking-pool
    // thread, never on the reactor. A thread that ends first drops the reply sender.
    let report: EvictReport = tokio::task::spawn_blocking(move || rx.recv())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(stopped)?;
    let resident_bytes = session.resident_bytes();
    Ok(Response::SessionEvicted(SessionEvicted {
        session: session.id(),
        vm: session.vm().to_owned(),
        evicted: report.evicted,
        zero: report.zero,
        failed: report.failed,
        resident_bytes,
    }))
}

/// Why `[gpa, gpa+len)` is not a range an operator may evict in `layout`, if it is not: it
/// must be non-empty, lie wholly in guest RAM regions, and start and end on page boundaries of
/// the regions its ends fall in (a partial page would evict the whole page, which is not what
/// the operator asked for).
pub(crate) fn check_range(layout: &Layout, gpa: u64, len: u64) -> Result<(), String> {
    if len == 0 {
        return Err("the range is empty (len 0)".into());
    }
    let end = gpa
        .checked_add(len)
        .ok_or_else(|| format!("the range {gpa:#x} + {len:#x} overflows the address space"))?;
    let mut at = gpa;
    while at < end {
        let Some(page) = layout.lookup(Gpa(at)) else {
            return Err(format!(
                "the range [{gpa:#x}, {end:#x}) is not all guest RAM: {at:#x} is in no region \
                 ({})",
                describe(layout)
            ));
        };
        let region = layout.region(page.region);
        let ps = region.page_size().bytes();
        if at == gpa && !gpa.is_multiple_of(ps) {
            return Err(format!(
                "the range start {gpa:#x} is not aligned to its region's page size {ps:#x}"
            ));
        }
        at = region.end().0.min(end);
        if at == end && !end.is_multiple_of(ps) {
            return Err(format!(
                "the range end {end:#x} is not aligned to its region's page size {ps:#x}"
            ));
        }
    }
    Ok(())
}

/// The layout's regions, for a message (the first few).
fn describe(layout: &Layout) -> String {
    const SHOWN: usize = 4;
    let mut parts: Vec<String> = layout
        .regions()
        .iter()
        .take(SHOWN)
        .map(|r| format!("[{:#x}, {:#x})", r.gpa().0, r.end().0))
        .collect();
    if layout.regions().len() > SHOWN {
        parts.push(format!("and {} more", layout.regions().len() - SHOWN));
    }
    format!("guest RAM is {}", parts.join(", "))
}

/// A connection's working-set transfers in progress: at most one export and one import (a
/// new one replaces the last). Dropped with the connection, which removes a staged import.
#[derive(Debug, Default)]
pub(crate) struct WsTransfer {
    export: Option<(Option<u32>, ExportFile)>,
    upload: Option<Upload>,
}

/// The directory of recordings a working-set request names (None: the imported ones), if
/// `caller` (of uid `uid`) may reach it: a uid its own; the operator any uid's, and the
/// imported ones; by default the caller's own uid's.
fn ws_owner(
    caller: Caller,
    uid: Option<u32>,
    asked: Option<u32>,
    imported: bool,
) -> Result<Option<u32>, Refusal> {
    let whose = if imported {
        "the imported working-set recordings".to_owned()
    } else {
        format!(
            "the working-set recordings of uid {}",
            asked.or(uid).unwrap_or(u32::MAX)
        )
    };
    let forbid = || {
        refusal(
            ErrorCode::Forbidden,
            format!(
                "{whose} are not {}'s: a uid reaches its own recordings only, root every uid's",
                caller.describe()
            ),
        )
    };
    match (caller, asked, imported) {
        (_, Some(_), true) => Err(refusal(
            ErrorCode::BadRequest,
            "name a uid or the imported recordings, not both".into(),
        )),
        (Caller::Operator, _, true) => Ok(None),
        (Caller::Operator, Some(u), false) => Ok(Some(u)),
        (Caller::Operator, None, false) => Ok(Some(uid.unwrap_or(0))),
        (Caller::User(Some(me)), None, false) => Ok(Some(me)),
        (Caller::User(Some(me)), Some(u), false) if u == me => Ok(Some(me)),
        _ => Err(forbid()),
    }
}

fn ws_refusal(e: LibraryError) -> Refusal {
    let code = match e {
        LibraryError::Busy(_) => ErrorCode::Busy,
        LibraryError::Io { .. } => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    };
    let message = match std::error::Error::source(&e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    };
    refusal(code, message)
}

fn row(l: Listed) -> WorkingSetRow {
    WorkingSetRow {
        uid: l.owner,
        digest: l.digest,
        pages: l.pages,
        snapshot_size: l.snapshot_size,
        bytes: l.bytes,
    }
}

/// Answers a working-set request (`working_set_list`, `_export`, `_import`, `_remove`) of a
/// caller of uid `uid`, with the connection's transfers in `transfer`. Blocking (file I/O):
/// run off the reactor.
pub(crate) fn working_set(
    daemon: &Daemon,
    request: Request,
    caller: Caller,
    uid: Option<u32>,
    transfer: &mut WsTransfer,
) -> Result<Response, Refusal> {
    let library = &daemon.working_sets;
    match request {
        Request::WorkingSetList {
            uid: asked,
            imported,
        } => {
            let only = match (caller, asked, imported) {
                // The operator without a choice: every directory.
                (Caller::Operator, None, false) => None,
                _ => Some(ws_owner(caller, uid, asked, imported)?),
            };
            let all = library.list(|o| only.is_none_or(|w| w == o));
            let omitted = all.len().saturating_sub(MAX_WS_ROWS) as u64;
            let recordings = all.into_iter().take(MAX_WS_ROWS).map(row).collect();
            Ok(Response::WorkingSets {
                recordings,
                omitted,
            })
        }
        Request::WorkingSetExport {
            uid: asked,
            imported,
            digest,
            offset,
        } => {
            let owner = ws_owner(caller, uid, asked, imported)?;
            if offset == 0 {
                transfer.export = None;
                let file = library.open_export(owner, &digest).map_err(ws_refusal)?;
                transfer.export = Some((owner, file));
            }
            let Some((_, file)) = transfer
                .export
                .as_ref()
                .filter(|(o, f)| *o == owner && f.digest == digest)
            else {
                return Err(refusal(
                    ErrorCode::BadRequest,
                    format!(
                        "no export of {digest:?} in progress on this connection: an \
                         export starts at offset 0"
                    ),
                ));
            };
            if offset > file.total {
                return Err(refusal(
                    ErrorCode::BadRequest,
                    format!(
                        "offset {offset} is past the recording's end ({} bytes)",
                        file.total
                    ),
                ));
            }
            let data = file.chunk(offset, WS_CHUNK_BYTES).map_err(ws_refusal)?;
            Ok(Response::WorkingSetChunk {
                digest: file.digest.clone(),
                sha256: file.sha256.clone(),
                total: file.total,
                offset,
                data: faultd_proto::hex_encode(&data),
            })
        }
        Request::WorkingSetImport {
            uid: asked,
            imported,
            digest,
            sha256,
            total,
            offset,
            data,
        } => {
            let owner = ws_owner(caller, uid, asked, imported)?;
            let bytes = faultd_proto::hex_decode(&data).ok_or_else(|| {
                refusal(
                    ErrorCode::BadRequest,
                    "data is not lowercase hex of whole bytes".into(),
                )
            })?;
            if offset == 0 {
                // A new upload replaces this connection's last one (whose file goes).
                transfer.upload = None;
                let requester = uid.unwrap_or(u32::MAX);
                transfer.upload = Some(
                    library
                        .begin_upload(owner, requester, &digest, &sha256, total)
                        .map_err(ws_refusal)?,
                );
            }
            let Some(upload) = transfer.upload.as_mut().filter(|u| {
                u.owner == owner && u.digest == digest && u.sha256 == sha256 && u.total == total
            }) else {
                return Err(refusal(
                    ErrorCode::BadRequest,
                    format!(
                        "no import of {digest:?} with that size and SHA-256 in progress on \
                         this connection: an import starts at offset 0"
                    ),
                ));
            };
            let received = upload.write(offset, &bytes).map_err(ws_refusal)?;
            if !upload.complete() {
                return Ok(Response::WorkingSetReceived { received, total });
            }
            let upload = transfer
                .upload
                .take()
                .ok_or_else(|| refusal(ErrorCode::Internal, "the import vanished".into()))?;
            let listed = upload.finish().map_err(ws_refusal)?;
            tracing::info!(
                uid = ?listed.owner,
                digest = listed.digest,
                pages = listed.pages,
                by = caller.describe(),
                "working-set recording imported"
            );
            Ok(Response::WorkingSetImported(row(listed)))
        }
        Request::WorkingSetRemove {
            uid: asked,
            imported,
            digest,
        } => {
            let owner = ws_owner(caller, uid, asked, imported)?;
            library.remove(owner, &digest).map_err(ws_refusal)?;
            Ok(Response::WorkingSetRemoved { uid: owner, digest })
        }
        _ => Err(refusal(
            ErrorCode::Internal,
            "not a working-set request".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use s2map::{Backing, PageSize, RegionSpec};

    /// 1 MiB of 4 KiB pages at 0, a hole, 4 MiB of 2 MiB pages at 4 MiB.
    fn layout() -> Layout {
        Layout::new(vec![
            RegionSpec {
                gpa: Gpa(0),
                size: 1 << 20,
                page_size: PageSize::Size4K,
                backing: Backing::Zero,
                read_only: false,
            },
            RegionSpec {
                gpa: Gpa(4 << 20),
                size: 4 << 20,
                page_size: PageSize::Size2M,
                backing: Backing::Zero,
                read_only: false,
            },
        ])
        .unwrap()
    }

    #[test]
    fn a_vm_name_may_name_its_owner_before_a_slash() {
        assert_eq!(parse_vm("vm0"), (None, "vm0"));
        assert_eq!(parse_vm("1000/vm0"), (Some(1000), "vm0"));
        // Not a uid: kept whole, a name no VM can have (VM names hold no '/').
        assert_eq!(parse_vm("x/vm0"), (None, "x/vm0"));
    }

    #[test]
    fn the_operator_reaches_every_owner_a_user_only_its_own() {
        assert!(Caller::Operator.reaches(1000));
        assert!(Caller::User(Some(1000)).reaches(1000));
        assert!(!Caller::User(Some(1001)).reaches(1000));
        assert!(!Caller::User(None).reaches(0));
    }

    #[test]
    fn a_page_aligned_range_inside_a_region_is_accepted() {
        assert_eq!(check_range(&layout(), 0x1000, 0x3000), Ok(()));
        assert_eq!(check_range(&layout(), 4 << 20, 2 << 20), Ok(()));
        assert_eq!(check_range(&layout(), 0, 1 << 20), Ok(()));
    }

    #[test]
    fn an_empty_range_is_refused() {
        let e = check_range(&layout(), 0x1000, 0).unwrap_err();
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn a_range_into_a_hole_or_beyond_the_layout_is_refused() {
        let hole = check_range(&layout(), 0xff000, 0x2000).unwrap_err();
        assert!(hole.contains("0x100000 is in no region"), "{hole}");
        let beyond = check_range(&layout(), 8 << 20, 0x1000).unwrap_err();
        assert!(beyond.contains("in no region"), "{beyond}");
    }

    #[test]
    fn an_overflowing_range_is_refused() {
        let e = check_range(&layout(), u64::MAX - 0xfff, 0x2000).unwrap_err();
        assert!(e.contains("overflows"), "{e}");
    }

    #[test]
    fn a_range_not_on_its_regions_page_boundaries_is_refused() {
        let start = check_range(&layout(), 0x800, 0x1000).unwrap_err();
        assert!(start.contains("start 0x800"), "{start}");
        let huge_end = check_range(&layout(), 4 << 20, 0x1000).unwrap_err();
        assert!(huge_end.contains("page size 0x200000"), "{huge_end}");
    }
}

//! Firecracker's external page-fault handler protocol, served unmodified: faultd is what
//! Firecracker's `"mem_backend": {"backend_type": "Uffd", "backend_path": SOCK}` points at.
//!
//! An operator first tells faultd that SOCK belongs to VM `vm` and which memory snapshot file
//! backs it ([`ListenSpec`]: a `[[firecracker]]` config entry, or a `firecracker_listen`
//! control request). faultd creates SOCK (`SOCK_STREAM`, as Firecracker connects) and, for
//! each connection there:
//!
//! 1. checks the peer against the spec's [`PeerRule`] (SO_PEERCRED);
//! 2. reads Firecracker's one message: a JSON array of `GuestRegionUffdMapping`s with the
//!    userfaultfd attached as SCM_RIGHTS (`receive_message`);
//! 3. validates it with no more than JSON, fd and stat checks ([`check_regions`],
//!    [`check_fds`]): Firecracker fills guest pages inside its load call and waits for them,
//!    so nothing expensive may stand before the first fault. For the same reason the socket
//!    keeps a fault thread ready ([`StandbyThread`]): the message is validated on the thread
//!    that then serves the VM, so the first fault waits for no thread creation or hand-off;
//! 4. serves the VM as an ordinary session (same fault thread, counters, `vm_stats`): its RAM
//!    is Firecracker's anonymous private memory ([`RegionMemory::AnonymousPrivate`]), so faults
//!    are answered with UFFDIO_COPY from the snapshot file at
//!    `offset + (addr - base_host_virt_addr)` and REMOVE events (balloon) make later faults in
//!    their range zero-fill;
//! 5. ends the session when the VM is gone (`SessionEnd`).
//!
//! Anything wrong with a connection is logged (warn) with the reason and the connection is
//! closed; nothing else is affected.
//!
//! Choices this module makes:
//! - **Which process may connect.** With no rule, whoever can open SOCK: faultd creates it mode
//!   0600, owned by its own uid (root), so only root processes. `uid` admits only that uid and
//!   hands it the socket (owner uid, mode 0600); `pid` admits only that process (and hands the
//!   socket to that process's uid). Both may be given.
//! - **Regions in s2map.** Firecracker does not tell guest physical addresses; faultd keys each
//!   region by its snapshot-file offset instead (regions cover disjoint file ranges), which keeps
//!   the layout dense. The address space is internal: devices are refused for these sessions.
//! - **Snapshot file.** Opened once, when listening, with the rights of the user the socket
//!   admits and no symbolic link on the way, and kept for every restore on the socket: later
//!   changes at the path do not matter (a snapshot rewritten in place is served with its new
//!   contents; one renamed over the path needs a new listen). See `paths.rs`.
//! - **The socket** is made without following a link or leaving a moment in which someone
//!   else could swap what faultd chowns (`paths.rs`).
//! - **One live session per socket.** A second connection while a restore is served is refused.
//! - **Message form.** Unknown fields are ignored (faultd serves Firecracker across versions and
//!   needs only four fields). `page_size` (1.12+) and `page_size_kib` (older; bytes despite the
//!   name) must agree if both are present; with neither (before huge page support) 4 KiB.
//! - **End of the session.** 1.12+ (messages with `page_size`) keeps the socket open for the
//!   VM's lifetime: its hang-up ends the session. Older versions close the socket right after
//!   the message, so their sessions end when the peer process exits (a pidfd).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use faultd_proto::{ErrorCode, FirecrackerListen, Response, MAX_MESSAGE_BYTES, MAX_REGIONS};
use s2map::{Backing, Gpa, Layout, PageSize, RegionSpec};
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::daemon::{Daemon, Live};
use crate::engine::objects::{ObjectFill, ObjectRefusal, ObjectService};
use crate::engine::session::{Hva, RegionMemory, ServedRegion, Session};
use crate::engine::{FaultServer, StandbyThread};
use crate::front::validate::Refusal;
use crate::kernel::uffd::KernelUffd;
use crate::ops::config::Limit;
pub use crate::ops::config::{ListenSource, ListenSpec, PeerRule, SpecError};

/// How long a connected peer has to send its message. Firecracker sends it right after
/// connecting; a peer that does not is refused instead of holding the socket's one session.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most fds one recvmsg(2) can carry (the kernel's SCM_MAX_FD): with room for all of them the
/// control data is never truncated, so every fd that arrives is owned (and closed) by faultd.
const SCM_MAX_FD: usize = 253;

/// Failure to start listening, named for the step.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// faultd listens on this socket already.
    #[error("faultd already listens on {socket} (for VM {vm})")]
    AlreadyListening {
        /// Socket path.
        socket: String,
        /// The VM it listens for.
        vm: String,
    },
    /// faultd listens for this VM already, on another socket.
    #[error("faultd already listens for VM {vm} (on {socket})")]
    VmTaken {
        /// VM name.
        vm: String,
        /// The socket it listens on.
        socket: String,
    },
    /// The snapshot file cannot be opened.
    #[error("opening snapshot file {path}")]
    OpenSnapshot {
        /// Path.
        path: String,
        #[source]
        source: io::Error,
    },
    /// The snapshot is not a regular file.
    #[error("snapshot {path} is not a regular file")]
    SnapshotNotAFile {
        /// Path.
        path: String,
    },
    /// The snapshot path is, or goes through, a symbolic link.
    #[error("snapshot {path} is or goes through a symbolic link (faultd follows none)")]
    SnapshotLink {
        /// Path.
        path: String,
    },
    /// The user the socket admits could not read the snapshot itself.
    #[error("snapshot {path} is not readable by uid {uid}, whom the socket admits")]
    SnapshotNotReadable {
        /// Path.
        path: String,
        /// The admitted uid.
        uid: u32,
    },
    /// The socket's directory cannot be opened (without following a link).
    #[error("opening the directory of {path}")]
    SocketDirectory {
        /// Socket path.
        path: String,
        #[source]
        source: io::Error,
    },
    /// Something appeared at the socket path while faultd made the socket.
    #[error("something appeared at {path} while faultd made its socket")]
    SocketAppeared {
        /// Path.
        path: String,
    },
    /// The process a `pid` rule names does not exist.
    #[error("looking up process {pid} (the pid rule)")]
    PeerProcess {
        /// Pid.
        pid: i32,
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is at the path.
    #[error("{path} exists and is not a socket")]
    NotASocket {
        /// Path.
        path: String,
    },
    /// Another process accepts connections on the socket.
    #[error("another process listens on {path}")]
    SocketInUse {
        /// Path.
        path: String,
    },
    /// A stale socket file could not be removed.
    #[error("removing stale socket {path}")]
    RemoveStale {
        /// Path.
        path: String,
        #[source]
        source: io::Error,
    },
    /// Binding failed.
    #[error("binding {path}")]
    Bind {
        /// Path.
        path: String,
        #[source]
        source: io::Error,
    },
    /// Restricting the socket to its peer failed.
    #[error("setting owner and mode of {path}")]
    Permissions {
        /// Path.
        path: String,
        #[source]
        source: io::Error,
    },
    /// The snapshot object names no configured store, or faultd has none.
    #[error("{0}")]
    ObjectStore(String),
    /// The uid the socket admits may not read that object.
    #[error("{0}")]
    ObjectForbidden(String),
}

/// Starts listening for `spec` (a `[[firecracker]]` config entry) on the daemon's runtime;
/// the socket is served (and removed at shutdown) by a task of the daemon. Must be called
/// within the runtime.
pub async fn listen(daemon: &Arc<Daemon>, spec: ListenSpec) -> Result<(), ListenError> {
    listen_as(daemon, spec, None).await
}

/// Starts listening for `spec`: for a request of uid `added_by` (kept in faultd's state
/// directory, so a restarted faultd listens again), or, with None, for the config file.
pub(crate) async fn listen_as(
    daemon: &Arc<Daemon>,
    spec: ListenSpec,
    added_by: Option<u32>,
) -> Result<(), ListenError> {
    let stop = daemon.cancel.child_token();
    let stopped = CancellationToken::new();
    let entry = crate::daemon::Listener {
        vm: spec.vm.clone(),
        added_by,
        kept: None,
        stop: stop.clone(),
        stopped: stopped.clone(),
    };
    daemon
        .firecracker
        .reserve(&spec.socket, entry)
        .map_err(|taken| match taken {
            crate::daemon::Taken::Socket(vm) => ListenError::AlreadyListening {
                socket: spec.socket.display().to_string(),
                vm,
            },
            crate::daemon::Taken::Vm(socket) => ListenError::VmTaken {
                vm: spec.vm.clone(),
                socket: socket.display().to_string(),
            },
        })?;
    let spec = Arc::new(spec);
    let s = spec.clone();
    // File system work (open, stat, bind, chown): off the reactor.
    let spin = daemon.config.spin;
    let objects = daemon.objects.clone();
    let bound = tokio::task::spawn_blocking(move || {
        let bound = bind(&s, objects.as_deref())?;
        Ok((bound, new_standby(&s, spin)))
    })
    .await
    .unwrap_or_else(|e| {
        Err(ListenError::Bind {
            path: spec.socket.display().to_string(),
            source: io::Error::other(e),
        })
    });
    let (bound, standby) = match bound {
        Ok((b, standby)) => (Ok(b), standby),
        Err(e) => (Err(e), None),
    };
    let (listener, placed, snapshot, admitted) =
        match bound.and_then(|b| match UnixListener::from_std(b.listener) {
            Ok(l) => Ok((l, b.placed, b.snapshot, b.admitted)),
            Err(source) => {
                b.placed.remove();
                Err(ListenError::Bind {
                    path: spec.socket.display().to_string(),
                    source,
                })
            }
        }) {
            Ok(l) => l,
            Err(e) => {
                daemon.firecracker.release(&spec.socket);
                return Err(e);
            }
        };
    if added_by.is_some() {
        // Kept with the uid it admits now pinned: after a restart a `pid` rule's pid may be
        // another process, which must not get the socket for its own uid.
        let mut kept = (*spec).clone();
        if kept.peer.uid.is_some() || kept.peer.pid.is_some() {
            kept.peer.uid = Some(admitted);
        }
        daemon.firecracker.set_kept(&spec.socket, kept);
    }
    tracing::info!(
        vm = spec.vm,
        socket = %spec.socket.display(),
        snapshot = %spec.source.describe(),
        uid = spec.peer.uid,
        pid = spec.peer.pid,
        "listening for Firecracker"
    );
    // The snapshot is analysed now, once for every restore this socket will serve.
    let analysis = snapshot.as_ref().and_then(|f| daemon.snapshots.info_for(f));
    let socket = Arc::new(Socket {
        analysis,
        spec: Arc::unwrap_or_clone(spec),
        snapshot,
        placed,
        next: AtomicU64::new(1),
        standby: Mutex::new(standby),
    });
    daemon
        .tracker
        .spawn(accept_loop(daemon.clone(), listener, socket, stop, stopped));
    Ok(())
}

/// A standby fault thread for `spec`'s next restore (None, logged, if one cannot be made now:
/// the restore then creates its thread itself).
fn new_standby(spec: &ListenSpec, spin: Duration) -> Option<StandbyThread<KernelUffd>> {
    StandbyThread::new("faultd-fc".into(), spin)
        .inspect_err(|e| {
            tracing::warn!(vm = spec.vm, "creating a standby fault thread: {e}");
        })
        .ok()
}

/// A socket faultd listens on: its order, the number its next restore's name takes, and the
/// fault thread that is ready for its next restore.
#[derive(Debug)]
struct Socket {
    spec: ListenSpec,
    /// The snapshot file, opened when listening (None: the snapshot is an object, pinned by
    /// each restore when it connects).
    snapshot: Option<File>,
    /// The socket file, to remove at the end.
    placed: paths::PlacedSocket,
    /// The suffix the next restore's session name tries (`vm-N`).
    next: AtomicU64,
    standby: Mutex<Option<StandbyThread<KernelUffd>>>,
    /// The snapshot's analysis, started at listen (kept so the catalog does not forget it).
    #[allow(dead_code)] // Held, not read: its sessions find it in the catalog.
    analysis: Option<Arc<crate::engine::snapshots::SnapshotInfo>>,
}

impl Socket {
    fn take_standby(&self) -> Option<StandbyThread<KernelUffd>> {
        self.standby
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Makes a standby thread for the next restore if there is none (off the reactor: thread
    /// creation is a few hundred microseconds here).
    async fn refill(self: &Arc<Self>, spin: Duration) {
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut slot = me.standby.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = new_standby(&me.spec, spin);
            }
        })
        .await;
    }
}

/// Answers a `firecracker_listen` control request from a peer with credentials `cred`.
pub(crate) async fn listen_request(
    daemon: &Arc<Daemon>,
    req: FirecrackerListen,
    cred: Option<&tokio_seqpacket::UCred>,
) -> Result<Response, Refusal> {
    // Listening makes faultd open a file and create a socket on the client's behalf, with
    // faultd's privileges: only root or faultd's own user may ask.
    let me = nix::unistd::geteuid().as_raw();
    match cred.map(|c| c.uid()) {
        Some(uid) if uid == 0 || uid == me => {}
        other => {
            return Err(Refusal {
                code: ErrorCode::PermissionDenied,
                message: format!(
                    "firecracker_listen needs root or faultd's uid {me}; the client's uid is {}",
                    other.map_or_else(|| "unknown".into(), |u| u.to_string())
                ),
            })
        }
    }
    let source = ListenSource::from_parts(req.snapshot, req.object.map(|o| (o.store, o.key)))
        .map_err(|why| Refusal {
            code: ErrorCode::BadRequest,
            message: format!("firecracker_listen {why}"),
        })?;
    let spec = ListenSpec::new(
        req.vm,
        req.socket,
        source,
        PeerRule {
            uid: req.uid,
            pid: req.pid,
        },
    )
    .map_err(|e| Refusal {
        code: if e.field == "vm" {
            ErrorCode::BadLayout
        } else {
            ErrorCode::BadPath
        },
        message: e.to_string(),
    })?;
    let (vm, socket) = (spec.vm.clone(), spec.socket.clone());
    let added_by = cred.map_or(me, |c| c.uid());
    match listen_as(daemon, spec, Some(added_by)).await {
        Ok(()) => {
            state::save(daemon).await;
            Ok(Response::Listening { vm, socket })
        }
        Err(e) => Err(Refusal {
            code: match e {
                ListenError::ObjectStore(_) => ErrorCode::BadRequest,
                ListenError::ObjectForbidden(_) => ErrorCode::Forbidden,
                _ => ErrorCode::BadPath,
            },
            message: crate::front::validate::chain(&e),
        }),
    }
}

/// Answers a `firecracker_unlisten` control request: stops listening on the socket of listener
/// `vm` (removed before the answer; restores it serves go on until their VMs are gone) and
/// forgets it in the state directory. Only the uid that added the listener, or the operator.
pub(crate) async fn unlisten_request(
    daemon: &Arc<Daemon>,
    vm: String,
    caller: crate::front::admin::Caller,
) -> Result<Response, Refusal> {
    let Some((socket, listener)) = daemon.firecracker.named(&vm) else {
        return Err(Refusal {
            code: ErrorCode::UnknownSession,
            message: format!("faultd has no Firecracker listener named {vm:?}"),
        });
    };
    if !caller.may_unlisten(listener.added_by) {
        return Err(Refusal {
            code: ErrorCode::Forbidden,
            message: format!(
                "the Firecracker listener {vm:?} was added by {}; only that uid or the \
                 operator (root, faultd's uid) may remove it",
                listener
                    .added_by
                    .map_or_else(|| "the config file".into(), |u| format!("uid {u}"))
            ),
        });
    }
    listener.stop.cancel();
    listener.stopped.cancelled().await;
    state::save(daemon).await;
    tracing::info!(vm, socket = %socket.display(), "stopped listening for Firecracker");
    Ok(Response::Unlistened { vm, socket })
}

/// What [`bind`] makes: the listening socket, in place, the snapshot it serves, and the uid
/// it admits.
struct Bound {
    listener: std::os::unix::net::UnixListener,
    placed: paths::PlacedSocket,
    snapshot: Option<File>,
    admitted: u32,
}

/// Opens the snapshot as the admitted user may (a file: with that user's rights; an object:
/// if the store's rules let that uid read its key), and makes the socket, restricted to that
/// user.
fn bind(spec: &ListenSpec, objects: Option<&ObjectService>) -> Result<Bound, ListenError> {
    let admitted = admitted_uid(spec)?;
    let snapshot = match &spec.source {
        ListenSource::File(path) => Some(paths::open_snapshot(path, admitted)?.0),
        ListenSource::Object { store, key } => {
            let service = objects.ok_or_else(|| {
                ListenError::ObjectStore(
                    "the snapshot is an object, but no object store is configured \
                     ([[object_store.stores]])"
                        .into(),
                )
            })?;
            service.allows(store, key, admitted).map_err(|e| match e {
                ObjectRefusal::Forbidden(why) => ListenError::ObjectForbidden(why),
                other => ListenError::ObjectStore(other.to_string()),
            })?;
            None
        }
    };
    let (listener, placed) = paths::place_socket(&spec.socket, admitted)?;
    Ok(Bound {
        listener,
        placed,
        snapshot,
        admitted,
    })
}

/// The user a spec admits, who owns its socket and whose rights its snapshot is opened with:
/// the rule's uid, else the uid of the process its pid names, else faultd's own.
fn admitted_uid(spec: &ListenSpec) -> Result<u32, ListenError> {
    Ok(match (spec.peer.uid, spec.peer.pid) {
        (Some(uid), _) => uid,
        (None, Some(pid)) => std::fs::metadata(format!("/proc/{pid}"))
            .map_err(|source| ListenError::PeerProcess { pid, source })?
            .uid(),
        (None, None) => nix::unistd::geteuid().as_raw(),
    })
}

/// The length of the snapshot file a socket keeps open (the file may have been rewritten in
/// place since the listen).
fn snapshot_len(snapshot: &File, path: &Path) -> Result<u64, String> {
    snapshot
        .metadata()
        .map(|m| m.len())
        .map_err(|e| format!("the snapshot file {}: {e}", path.display()))
}

/// Accepts Firecracker connections on `listener` until `stop` fires (unlisten, or shutdown),
/// then removes the socket and releases its name; `stopped` fires once that is done.
/// Connections accepted before are served on their own tasks until their VMs are gone.
async fn accept_loop(
    daemon: Arc<Daemon>,
    listener: UnixListener,
    socket: Arc<Socket>,
    stop: CancellationToken,
    stopped: CancellationToken,
) {
    let spec = &socket.spec;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (daemon2, socket2) = (daemon.clone(), socket.clone());
                    daemon.tracker.spawn(async move {
                        connection(daemon2, stream, socket2).await
                    });
                }
                Err(e) => {
                    tracing::warn!(vm = spec.vm, socket = %spec.socket.display(), "accept failed: {e}");
                    // EMFILE and friends: back off instead of spinning on the error.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // Closed first: a Firecracker connecting from here on is refused by the kernel (and once
    // the name is gone, finds no socket), never left queued in a backlog nobody reads.
    drop(listener);
    socket.placed.remove();
    daemon.firecracker.release(&spec.socket);
    stopped.cancel();
}

/// What a restore holds of faultd's limits and files until its session has ended.
struct Held {
    _slot: crate::daemon::RestoreSlot,
    _admission: crate::daemon::Admission,
    _claims: crate::daemon::Claims,
}

/// Serves one Firecracker connection: check, receive, validate, serve until the VM is gone.
/// Every refusal closes the connection, with the reason logged (Firecracker has no way to
/// hear it: see the README).
async fn connection(daemon: Arc<Daemon>, stream: UnixStream, socket: Arc<Socket>) {
    let spec = &socket.spec;
    let limits = &daemon.config.limits;
    let (uid, pid) = match stream.peer_cred() {
        Ok(c) => (c.uid(), c.pid()),
        Err(e) => return refused(spec, None, &format!("reading peer credentials: {e}")),
    };
    if let Err(why) = spec.peer.admits(uid, pid) {
        return refused(spec, pid, &why);
    }
    // The limits first, before the message is read: a flood of connections is refused here,
    // cheaply, and what it took is given back when the connection goes.
    let slot = match daemon
        .firecracker
        .enter(&spec.vm, limits.restores_per_listener)
    {
        Ok(slot) => slot,
        Err(n) => {
            let r = daemon.limit_reached(
                Limit::RestoresPerListener,
                limits.restores_per_listener,
                format!("listener {} serves {n} restores", spec.vm),
            );
            return refused(spec, pid, &r.message);
        }
    };
    if let Some(why) = daemon.session_limit_reached() {
        return refused(spec, pid, &why);
    }
    // The VM and its store are the uid's the socket admits (its rule's uid, or the uid of its
    // rule's process), or the operator's (0) on a socket of faultd's own.
    let owner = match (spec.peer.uid, spec.peer.pid) {
        (Some(rule_uid), _) => rule_uid,
        (None, Some(_)) => uid,
        (None, None) => 0,
    };
    let mut admission = match daemon.admit_uid(owner) {
        Ok(a) => a,
        Err(r) => return refused(spec, pid, &r.message),
    };
    let received = tokio::select! {
        _ = daemon.cancel.cancelled() => return,
        r = tokio::time::timeout(MESSAGE_TIMEOUT, receive_message(&stream)) => r,
    };
    let message = match received {
        Ok(Ok(m)) => m,
        Ok(Err(why)) => return refused(spec, pid, &why),
        Err(_) => {
            return refused(
                spec,
                pid,
                &format!(
                    "no complete message within {} s of connecting",
                    MESSAGE_TIMEOUT.as_secs()
                ),
            )
        }
    };
    // Guest size is known from the message alone: refused before anything is built for it.
    let guest = message
        .regions
        .iter()
        .try_fold(0u64, |sum, r| sum.checked_add(r.size))
        .unwrap_or(u64::MAX);
    if let Err(r) = daemon.admit_guest(&mut admission, guest) {
        return refused(spec, pid, &r.message);
    }
    // A snapshot object: this restore reads the version the store holds now (one HEAD pins
    // its ETag), and only if the store's rules let the peer's uid read the key.
    let object = match &spec.source {
        ListenSource::File(_) => None,
        ListenSource::Object { store, key } => match open_object(&daemon, store, key, uid).await {
            Ok(v) => Some(v),
            Err(why) => return refused(spec, pid, &why),
        },
    };
    // One uffd serves one live session, whichever door it came through.
    let claims = match daemon.claim(&uffd_file(&message.fds)) {
        Ok(c) => c,
        Err(r) => return refused(spec, pid, &r.message),
    };
    let name = match session_name(&daemon, &socket, owner) {
        Ok(n) => n,
        Err(why) => return refused(spec, pid, &why),
    };
    let held = Held {
        _slot: slot,
        _admission: admission,
        _claims: claims,
    };
    let restore = Restore {
        message,
        object,
        pid,
        uid,
        owner,
        name,
    };
    serve_restore(&daemon, &socket, stream, restore, held).await;
}

/// Pins the version of object `key` of store `store` for a restore by a peer of uid `uid`
/// (the store's rules checked again: the config may have changed since the listen).
async fn open_object(
    daemon: &Daemon,
    store: &str,
    key: &str,
    uid: u32,
) -> Result<Arc<objstore::ObjectVersion>, String> {
    let service = daemon
        .objects
        .as_ref()
        .ok_or_else(|| "the snapshot is an object, but no object store is configured".to_owned())?;
    service
        .open_for(store, key, uid)
        .await
        .map_err(|e| crate::ops::logging::chain(&e))
}

/// What one restore brings: Firecracker's message, the snapshot object's version (None: the
/// socket's file), the peer, and the session's owner and name.
struct Restore {
    message: Message,
    object: Option<Arc<objstore::ObjectVersion>>,
    pid: Option<i32>,
    /// The peer's uid (the one the object's key was checked for).
    uid: u32,
    owner: u32,
    name: String,
}

/// The uffd a message carries, by identity, for [`Daemon::claim`] (none if the message has
/// not exactly one fd, or it cannot be inspected: `prepare` refuses those).
fn uffd_file(fds: &[OwnedFd]) -> Vec<(crate::daemon::FileId, String)> {
    match fds {
        [fd] => nix::sys::stat::fstat(fd.as_fd())
            .map(|st| {
                vec![(
                    crate::daemon::FileId {
                        dev: st.st_dev,
                        ino: st.st_ino,
                    },
                    "the userfaultfd".to_owned(),
                )]
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The session name of a new restore on `socket`: the listener's name and the next number
/// that names no live or ending session of `owner` and no session kept across a restart.
fn session_name(daemon: &Daemon, socket: &Socket, owner: u32) -> Result<String, String> {
    loop {
        let n = socket.next.fetch_add(1, Ordering::Relaxed);
        let name = format!("{}-{n}", socket.spec.vm);
        if name.len() > crate::ops::config::MAX_VM_NAME {
            return Err(format!(
                "listener {} has used up its restore numbers",
                socket.spec.vm
            ));
        }
        if daemon.firecracker.name_reserved(&name) {
            continue;
        }
        if matches!(
            daemon.name_state(owner, &name),
            crate::daemon::NameState::Free
        ) {
            return Ok(name);
        }
    }
}

/// Hands `message` to the socket's standby fault thread, which validates it (opening the
/// snapshot and stat()ing fds: cheap, but blocking, so not on the reactor) and serves the VM at
/// once; then waits for the VM to be gone and ends the session.
async fn serve_restore(
    daemon: &Arc<Daemon>,
    socket: &Arc<Socket>,
    stream: UnixStream,
    restore: Restore,
    held: Held,
) {
    let spec = &socket.spec;
    let (pid, owner) = (restore.pid, restore.owner);
    // Refused: what the restore held is given back before the connection closes (when
    // `stream` drops).
    let refuse = |held: Held, why: &str| {
        drop(held);
        refused(spec, pid, why);
    };
    let standby = match socket.take_standby() {
        Some(t) => {
            // The next restore, maybe already connecting, finds a thread ready too.
            let (s, spin) = (socket.clone(), daemon.config.spin);
            daemon.tracker.spawn(async move { s.refill(spin).await });
            Ok(t)
        }
        None => StandbyThread::new("faultd-fc".into(), daemon.config.spin),
    };
    let standby = match standby {
        Ok(t) => t,
        Err(e) => return refuse(held, &format!("starting a fault thread: {e}")),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (d, s) = (daemon.clone(), socket.clone());
    // What the fd store keeps of the session (see kept), if a service manager is there. A
    // restore from an object keeps the version it pinned (ETag and size): the restarted
    // faultd serves it again only if the store still holds that very version.
    let keeping = crate::ops::systemd::has_manager();
    let kept = keeping.then(|| kept::Kept {
        vm: restore.name.clone(),
        owner,
        snapshot: match &spec.source {
            ListenSource::File(path) => Some(path.clone()),
            ListenSource::Object { .. } => None,
        },
        object: match (&spec.source, &restore.object) {
            (ListenSource::Object { store, key }, Some(version)) => Some(kept::KeptObject {
                store: store.clone(),
                key: key.clone(),
                etag: version.etag().to_owned(),
                size: version.size(),
                uid: restore.uid,
            }),
            _ => None,
        },
        regions: restore.message.regions.clone(),
        listener: Some(spec.vm.clone()),
    });
    let keeping = kept.is_some();
    let thread = standby.start(Box::new(move || {
        match prepare(&d, &s, restore) {
            Ok((session, server, end)) => {
                // A duplicate of the uffd for the fd store: one dup(2), only under a manager.
                let uffd = keeping.then(|| uffd_dup(&server)).flatten();
                // Straight to serving: registering and logging are done on the async side.
                let _ = tx.send(Ok((session, end, uffd)));
                Some(server)
            }
            Err(why) => {
                let _ = tx.send(Err(why));
                None
            }
        }
    }));
    let (session, end, uffd) = match rx.await {
        Ok(Ok(prepared)) => prepared,
        outcome => {
            // The thread has ended (nothing to serve): joining it is immediate.
            let _ = tokio::task::spawn_blocking(move || thread.stop()).await;
            let why = match outcome {
                Ok(Err(why)) => why,
                _ => "the fault thread ended before its session started".into(),
            };
            return refuse(held, &why);
        }
    };
    // Off the restore's path: what paging the VM's memory out needs (see crate::kernel::remote).
    // Without it the session is served but its memory cannot be evicted.
    match open_remote(peer_pidfd(&stream), pid) {
        Ok(mm) => session.set_remote(mm),
        Err(e) => tracing::warn!(
            session = session.id(),
            vm = session.vm(),
            "the VM's memory cannot be paged out (opening the peer's memory: {e})"
        ),
    }
    daemon.register_session(&session);
    daemon.admit(
        &session,
        &thread,
        pid,
        faultd_proto::SessionKind::Firecracker,
    );
    tracing::info!(
        session = session.id(),
        vm = session.vm(),
        listener = spec.vm,
        peer_pid = pid,
        ends_on = end.describe(),
        "serving a Firecracker restore"
    );
    let kept_as = match (&kept, &uffd, &socket.snapshot) {
        (Some(k), Some(uffd), Some(snapshot)) if k.object.is_none() => {
            kept::keep(k, uffd, &stream, Some(snapshot))
        }
        (Some(k), Some(uffd), None) if k.object.is_some() => kept::keep(k, uffd, &stream, None),
        _ => None,
    };
    drop(uffd);
    end.wait(stream, &daemon.cancel, session.vm()).await;
    kept::end(daemon, Live { session, thread }, kept_as).await;
    drop(held);
}

/// A duplicate of `server`'s userfaultfd, to keep in the fd store.
fn uffd_dup(server: &FaultServer<KernelUffd>) -> Option<OwnedFd> {
    server
        .fd()
        .try_clone_to_owned()
        .inspect_err(|e| tracing::warn!("duplicating the userfaultfd for the fd store: {e}"))
        .ok()
}

/// Serves again the Firecracker sessions a previous faultd kept (see `kept.rs`).
pub use kept::resume_all as resume_kept;

mod kept;
mod paths;
mod state;

/// Listens again on the sockets added at run time before faultd's restart (see `state.rs`).
pub use state::relisten as relisten_kept;

/// The peer's pidfd (SO_PEERPIDFD: the very process that connected, whatever happened to its
/// pid since).
fn peer_pidfd(stream: &impl AsFd) -> io::Result<OwnedFd> {
    Ok(nix::sys::socket::getsockopt(
        stream,
        nix::sys::socket::sockopt::PeerPidfd,
    )?)
}

/// Opens the peer's memory for paging out: by its pidfd (from [`peer_pidfd`]), then its
/// pagemap.
fn open_remote(
    pidfd: io::Result<OwnedFd>,
    pid: Option<i32>,
) -> io::Result<crate::kernel::remote::RemoteMm> {
    let pid = pid
        .filter(|&p| p > 0)
        .ok_or_else(|| io::Error::other("the kernel did not tell the peer's pid"))?;
    crate::kernel::remote::RemoteMm::open(pidfd?, pid)
}

fn refused(spec: &ListenSpec, pid: Option<i32>, why: &str) {
    tracing::warn!(
        vm = spec.vm,
        socket = %spec.socket.display(),
        peer_pid = pid,
        "refused a Firecracker connection: {why}"
    );
}

/// What a Firecracker peer sent: its regions and the fds attached.
#[derive(Debug)]
pub struct Message {
    /// The regions, as sent.
    pub regions: Vec<Mapping>,
    /// Every fd that arrived with the message.
    pub fds: Vec<OwnedFd>,
}

/// One element of Firecracker's message (its `GuestRegionUffdMapping`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Mapping {
    /// Where Firecracker mapped the region.
    pub base_host_virt_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset of the region's contents in the memory snapshot file.
    pub offset: u64,
    /// Page size in bytes (Firecracker 1.12 and later).
    #[serde(default)]
    pub page_size: Option<u64>,
    /// Page size in bytes, despite the name (deprecated; the only one before 1.12).
    #[serde(default)]
    pub page_size_kib: Option<u64>,
}

/// Reads Firecracker's message: bytes until they are one complete JSON value, with the fds
/// attached to them. Errors say what was wrong.
async fn receive_message(stream: &UnixStream) -> Result<Message, String> {
    let mut bytes: Vec<u8> = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
    loop {
        let room = MAX_MESSAGE_BYTES + 1 - bytes.len();
        let n = stream
            .async_io(Interest::READABLE, || {
                recv_chunk(stream.as_raw_fd(), &mut buf[..room], &mut fds)
            })
            .await
            .map_err(|e| format!("receiving the message: {e}"))?;
        if n == 0 {
            return Err(if bytes.is_empty() {
                "the peer hung up without sending a message".into()
            } else {
                format!(
                    "the peer hung up after {} bytes, before a complete message",
                    bytes.len()
                )
            });
        }
        bytes.extend_from_slice(&buf[..n]);
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(format!("message exceeds {MAX_MESSAGE_BYTES} bytes"));
        }
        match parse_message(&bytes) {
            Ok(regions) => return Ok(Message { regions, fds }),
            Err(Parse::Incomplete) => continue,
            Err(Parse::Invalid(why)) => return Err(why),
        }
    }
}

/// One recvmsg(2): appends the fds that came with the bytes to `fds`.
fn recv_chunk(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!([RawFd; SCM_MAX_FD]);
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let n = msg.bytes;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these fds in faultd for this message; nothing
            // else knows their numbers, so each gets exactly one owner here.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    Ok(n)
}

/// Why bytes are not (yet) a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// Valid so far, but cut short: more bytes may follow.
    Incomplete,
    /// Not a message; why.
    Invalid(String),
}

/// Parses Firecracker's message: JSON first, then its shape, so the error says which is
/// wrong. Each mapping must be an object: serde would also take the array of its field values.
pub fn parse_message(bytes: &[u8]) -> Result<Vec<Mapping>, Parse> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        if e.is_eof() {
            Parse::Incomplete
        } else {
            Parse::Invalid(format!("message is not valid JSON: {e}"))
        }
    })?;
    let elements = value.as_array().map_or(&[][..], Vec::as_slice);
    if let Some(n) = elements.iter().position(|m| !m.is_object()) {
        return Err(Parse::Invalid(format!(
            "message is JSON but regions[{n}] is not a JSON object (a GuestRegionUffdMapping)"
        )));
    }
    serde_json::from_value(value).map_err(|e| {
        Parse::Invalid(format!(
            "message is JSON but not an array of GuestRegionUffdMapping: {e}"
        ))
    })
}

/// The fds of a message: exactly one, a userfaultfd.
pub fn check_fds(mut fds: Vec<OwnedFd>) -> Result<OwnedFd, String> {
    match fds.len() {
        0 => Err("no fd attached: Firecracker sends its userfaultfd with the message".into()),
        1 => {
            let fd = fds.pop().expect("one fd, checked above");
            crate::front::validate::check_uffd(fd.as_fd()).map_err(|r| r.message)?;
            Ok(fd)
        }
        n => Err(format!(
            "{n} fds attached: Firecracker sends exactly one, its userfaultfd"
        )),
    }
}

/// What a message's regions become: the session's layout and regions (layout order).
#[derive(Debug)]
pub struct Regions {
    /// Layout, each region keyed by its snapshot-file offset.
    pub layout: Layout,
    /// Where each layout region is in Firecracker.
    pub served: Vec<ServedRegion>,
    /// Which Firecracker sent them.
    pub form: WireForm,
}

/// How a Firecracker version sends its message, which tells how its session ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireForm {
    /// With `page_size` (1.12+): the socket stays open while the VM lives.
    Current,
    /// Without it: the socket is closed after the message.
    Legacy,
}

/// Checks a message's regions against a snapshot file of `snapshot_len` bytes.
pub fn check_regions(regions: &[Mapping], snapshot_len: u64) -> Result<Regions, String> {
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(format!(
            "{} regions given, 1..={MAX_REGIONS} allowed",
            regions.len()
        ));
    }
    let with_page_size = regions.iter().filter(|r| r.page_size.is_some()).count();
    let form = match with_page_size {
        0 => WireForm::Legacy,
        n if n == regions.len() => WireForm::Current,
        _ => {
            return Err("some regions have page_size and some do not".into());
        }
    };
    let mut checked = Vec::with_capacity(regions.len());
    for (n, r) in regions.iter().enumerate() {
        let bytes = match (r.page_size, r.page_size_kib) {
            (Some(a), Some(b)) if a != b => {
                return Err(format!(
                    "regions[{n}]: page_size {a} and page_size_kib {b} disagree (both are bytes)"
                ))
            }
            (Some(a), _) | (None, Some(a)) => a,
            // Before huge page support Firecracker sent no page size: 4 KiB pages.
            (None, None) => 4096,
        };
        let page = PageSize::from_bytes(bytes).ok_or_else(|| {
            format!("regions[{n}]: page size {bytes} must be 4096 or 2097152 bytes")
        })?;
        let p = page.bytes();
        let end = r.base_host_virt_addr.checked_add(r.size);
        if r.size == 0 || !r.size.is_multiple_of(p) {
            return Err(format!(
                "regions[{n}]: size {:#x} is not a non-zero multiple of the page size {p:#x}",
                r.size
            ));
        }
        if r.base_host_virt_addr == 0 || !r.base_host_virt_addr.is_multiple_of(p) || end.is_none() {
            return Err(format!(
                "regions[{n}]: base_host_virt_addr {:#x} must be non-zero, aligned to {p:#x}, \
                 and not wrap",
                r.base_host_virt_addr
            ));
        }
        if !r.offset.is_multiple_of(p) {
            return Err(format!(
                "regions[{n}]: offset {:#x} is not aligned to the page size {p:#x}",
                r.offset
            ));
        }
        if r.offset
            .checked_add(r.size)
            .is_none_or(|e| e > snapshot_len)
        {
            return Err(format!(
                "regions[{n}]: file range {:#x}+{:#x} does not fit the snapshot file \
                 ({snapshot_len} bytes)",
                r.offset, r.size
            ));
        }
        checked.push((n, r, page));
    }
    // Overlaps, named by the regions' positions in the message.
    let overlap = |key: fn(&Mapping) -> u64, what: &str| -> Result<(), String> {
        let mut by: Vec<(u64, u64, usize)> = checked
            .iter()
            .map(|&(n, r, _)| (key(r), key(r) + r.size, n))
            .collect();
        by.sort_unstable();
        match by.windows(2).find(|w| w[1].0 < w[0].1) {
            Some(w) => Err(format!(
                "regions[{}] and regions[{}] overlap in {what}",
                w[0].2, w[1].2
            )),
            None => Ok(()),
        }
    };
    overlap(|r| r.base_host_virt_addr, "Firecracker's address space")?;
    overlap(|r| r.offset, "the snapshot file")?;
    // Layout order is file-offset order (the key); served regions follow it.
    checked.sort_unstable_by_key(|&(_, r, _)| r.offset);
    let specs = checked
        .iter()
        .map(|&(_, r, page)| RegionSpec {
            gpa: Gpa(r.offset),
            size: r.size,
            page_size: page,
            backing: Backing::File { offset: r.offset },
            read_only: false,
        })
        .collect();
    let layout = Layout::new(specs).map_err(|e| e.to_string())?;
    let served = checked
        .iter()
        .map(|&(_, r, _)| ServedRegion {
            hva: Hva(r.base_host_virt_addr),
            memory: RegionMemory::AnonymousPrivate,
        })
        .collect();
    Ok(Regions {
        layout,
        served,
        form,
    })
}

/// How a Firecracker session learns that its VM is gone.
#[derive(Debug)]
enum SessionEnd {
    /// The socket's hang-up (1.12+ keeps it open for the VM's lifetime).
    HangUp,
    /// The peer process's exit (older versions close the socket after the message).
    ProcessExit(OwnedFd),
}

impl SessionEnd {
    fn describe(&self) -> &'static str {
        match self {
            SessionEnd::HangUp => "socket hang-up",
            SessionEnd::ProcessExit(_) => "peer process exit",
        }
    }

    /// Waits until the VM is gone (or faultd shuts down).
    async fn wait(
        self,
        stream: UnixStream,
        cancel: &tokio_util::sync::CancellationToken,
        vm: &str,
    ) {
        match self {
            SessionEnd::HangUp => {
                let mut buf = [0u8; 4096];
                let mut warned = false;
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        ready = stream.readable() => if ready.is_err() { return },
                    }
                    match stream.try_read(&mut buf) {
                        Ok(0) => return,
                        // Firecracker never sends anything else; the VM is still running, so
                        // the bytes are dropped rather than the VM's memory service.
                        Ok(n) => {
                            if !warned {
                                tracing::warn!(
                                    vm,
                                    "ignoring {n} unexpected bytes from Firecracker"
                                );
                                warned = true;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return,
                    }
                }
            }
            SessionEnd::ProcessExit(pidfd) => {
                drop(stream);
                // SAFETY: the AsyncFd owns the pidfd and deregisters it before closing it (on
                // drop, here); nothing else holds or swaps the fd meanwhile.
                let registered = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(pidfd, Interest::READABLE)
                };
                let afd = match registered {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::error!(vm, "watching the peer process: {e}");
                        return;
                    }
                };
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = afd.readable() => {}
                }
            }
        }
    }
}

/// Every page is read from one chunk of the object (chunks are powers of two, regions
/// page-aligned): a page larger than a chunk cannot be.
fn pages_fit_chunks(
    layout: &s2map::Layout,
    version: &objstore::ObjectVersion,
) -> Result<(), String> {
    let chunk = version.chunk_size().bytes();
    match layout
        .regions()
        .iter()
        .find(|r| r.page_size().bytes() > chunk)
    {
        Some(r) => Err(format!(
            "pages of {} bytes are larger than the object chunk ({chunk} bytes)",
            r.page_size().bytes()
        )),
        None => Ok(()),
    }
}

/// Validates a received message and builds its session and server (blocking: stats the
/// snapshot the socket keeps, and duplicates it). Runs on the fault thread that will serve it.
fn prepare(
    daemon: &Daemon,
    socket: &Socket,
    restore: Restore,
) -> Result<(Arc<Session>, FaultServer<KernelUffd>, SessionEnd), String> {
    let Restore {
        message,
        object,
        pid,
        owner,
        name,
        ..
    } = restore;
    let uffd = check_fds(message.fds)?;
    let (len, snapshot) = match (&object, &socket.snapshot, &socket.spec.source) {
        (Some(version), _, _) => (version.size(), None),
        (None, Some(file), ListenSource::File(path)) => {
            let len = snapshot_len(file, path)?;
            let dup = file
                .try_clone()
                .map_err(|e| format!("duplicating the snapshot file's fd: {e}"))?;
            (len, Some(dup))
        }
        _ => return Err("the restore has neither its snapshot file nor its object".into()),
    };
    let regions = check_regions(&message.regions, len)?;
    if let Some(version) = &object {
        pages_fit_chunks(&regions.layout, version)?;
    }
    // A uffd without UFFDIO_API fails every copy: the restore would hang at its first fault.
    let probe = regions.served.first().map(|r| r.hva).ok_or("no regions")?;
    match crate::kernel::uffd::api_handshake_done(uffd.as_fd(), probe) {
        Ok(true) => {}
        Ok(false) => {
            return Err(
                "the userfaultfd has not completed UFFDIO_API: every page faultd \
                        installed would fail and every fault would block"
                    .into(),
            )
        }
        Err(e) => return Err(format!("probing the userfaultfd's API handshake: {e}")),
    }
    let end = match regions.form {
        WireForm::Current => SessionEnd::HangUp,
        WireForm::Legacy => {
            let pid = pid.filter(|&p| p > 0).ok_or(
                "a Firecracker older than 1.12 (no page_size) closes its socket after the \
                 message, and the kernel did not tell the peer's pid to watch instead",
            )?;
            SessionEnd::ProcessExit(
                crate::kernel::remote::pidfd_open(pid)
                    .map_err(|e| format!("watching peer process {pid}: {e}"))?,
            )
        }
    };
    let (session, mut server) = daemon
        .new_server(name, owner, regions.layout, regions.served, snapshot, uffd)
        .map_err(|e| format!("starting fault service: {e}"))?;
    // The same object path as a VMM session's (engine::objects): chunks fetched off this
    // thread, faults on a chunk not yet here deferred until it lands.
    if let Some(version) = object {
        let service = daemon
            .objects
            .clone()
            .ok_or("no object store is configured")?;
        let fill = ObjectFill::new(service, version, owner)
            .map_err(|e| format!("starting the object backing: {e}"))?;
        server = server.with_object(fill);
    }
    Ok((session, server, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 0x7f00_0000_0000;

    fn region(base: u64, size: u64, offset: u64) -> Mapping {
        Mapping {
            base_host_virt_addr: base,
            size,
            offset,
            page_size: Some(4096),
            page_size_kib: Some(4096),
        }
    }

    fn err(regions: &[Mapping], len: u64) -> String {
        check_regions(regions, len).unwrap_err()
    }

    #[test]
    fn firecracker_1_12_message_parses_and_keys_regions_by_file_offset() {
        let text = br#"[{"base_host_virt_addr":139637976727552,"size":2097152,"offset":0,"page_size":4096,"page_size_kib":4096},{"base_host_virt_addr":139637980000256,"size":4194304,"offset":2097152,"page_size":4096,"page_size_kib":4096}]"#;
        let regions = parse_message(text).unwrap();

        let r = check_regions(&regions, 6 * MIB).unwrap();

        assert_eq!(r.form, WireForm::Current);
        let l = r.layout.regions();
        assert_eq!((l[0].gpa(), l[1].gpa()), (Gpa(0), Gpa(2 * MIB)));
        assert_eq!(l[1].backing(), Backing::File { offset: 2 * MIB });
        assert_eq!(r.served[1].hva, Hva(139637980000256));
    }

    #[test]
    fn older_messages_are_legacy_and_default_to_their_page_size() {
        let kib_only = br#"[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size_kib":2097152}]"#;
        let neither = br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0}]"#;

        let a = check_regions(&parse_message(kib_only).unwrap(), 4 * MIB).unwrap();
        let b = check_regions(&parse_message(neither).unwrap(), 4 * MIB).unwrap();

        assert_eq!(a.form, WireForm::Legacy);
        assert_eq!(a.layout.regions()[0].page_size(), PageSize::Size2M);
        assert_eq!(b.form, WireForm::Legacy);
        assert_eq!(b.layout.regions()[0].page_size(), PageSize::Size4K);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let text =
            br#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"future":1}]"#;
        assert_eq!(parse_message(text).unwrap().len(), 1);
    }

    #[test]
    fn cut_short_json_is_incomplete_and_garbage_is_invalid() {
        assert_eq!(
            parse_message(br#"[{"base_host_virt_addr":4096,"si"#),
            Err(Parse::Incomplete)
        );
        assert!(matches!(
            parse_message(b"{not json"),
            Err(Parse::Invalid(m)) if m.contains("not valid JSON")
        ));
        assert!(matches!(
            parse_message(br#"{"regions":[]}"#),
            Err(Parse::Invalid(m)) if m.contains("not an array")
        ));
        assert!(matches!(
            parse_message(br#"[{"size":4096}]"#),
            Err(Parse::Invalid(m)) if m.contains("base_host_virt_addr")
        ));
    }

    #[test]
    fn regions_overlapping_in_memory_are_refused() {
        let m = err(
            &[
                region(BASE, 2 * MIB, 0),
                region(BASE + MIB, 2 * MIB, 2 * MIB),
            ],
            4 * MIB,
        );
        assert!(
            m.contains("regions[0] and regions[1] overlap in Firecracker's"),
            "{m}"
        );
    }

    #[test]
    fn regions_overlapping_in_the_file_are_refused() {
        let m = err(
            &[
                region(BASE, 2 * MIB, 0),
                region(BASE + 4 * MIB, 2 * MIB, MIB),
            ],
            4 * MIB,
        );
        assert!(m.contains("overlap in the snapshot file"), "{m}");
    }

    #[test]
    fn region_beyond_the_snapshot_file_is_refused() {
        let m = err(&[region(BASE, 2 * MIB, 3 * MIB)], 4 * MIB);
        assert!(m.contains("does not fit the snapshot file"), "{m}");
    }

    #[test]
    fn disagreeing_page_sizes_are_refused() {
        let mut r = region(BASE, 2 * MIB, 0);
        r.page_size_kib = Some(4);
        let m = err(&[r], 4 * MIB);
        assert!(m.contains("disagree"), "{m}");
    }

    #[test]
    fn page_size_in_kib_after_all_is_refused() {
        let r = Mapping {
            page_size: None,
            page_size_kib: Some(4),
            ..region(BASE, 2 * MIB, 0)
        };
        let m = err(&[r], 4 * MIB);
        assert!(m.contains("page size 4 must be"), "{m}");
    }

    #[test]
    fn misaligned_and_empty_regions_are_refused() {
        assert!(err(&[region(BASE + 1, 4096, 0)], MIB).contains("base_host_virt_addr"));
        assert!(err(&[region(BASE, 0, 0)], MIB).contains("size 0x0"));
        assert!(err(&[region(BASE, 4096, 100)], MIB).contains("offset 0x64"));
        assert!(err(&[], MIB).contains("0 regions"));
    }

    #[test]
    fn a_mix_of_message_forms_is_refused() {
        let old = Mapping {
            page_size: None,
            ..region(BASE + 4 * MIB, MIB, MIB)
        };
        assert!(err(&[region(BASE, MIB, 0), old], 4 * MIB).contains("some regions"));
    }

    #[test]
    fn a_missing_extra_or_wrong_fd_is_refused() {
        let pipe = || nix::unistd::pipe().unwrap().0;
        assert!(check_fds(vec![]).unwrap_err().contains("no fd attached"));
        assert!(check_fds(vec![pipe(), pipe()])
            .unwrap_err()
            .contains("2 fds attached"));
        assert!(check_fds(vec![pipe()])
            .unwrap_err()
            .contains("not a userfaultfd"));
    }

    #[test]
    fn peer_rules_name_what_did_not_match() {
        let rule = PeerRule {
            uid: Some(1000),
            pid: Some(42),
        };
        assert!(rule.admits(1000, Some(42)).is_ok());
        assert!(rule.admits(0, Some(42)).unwrap_err().contains("uid 0"));
        assert!(rule.admits(1000, Some(7)).unwrap_err().contains("pid 7"));
        assert!(PeerRule::default().admits(5, None).is_ok());
    }

    #[test]
    fn listen_specs_need_absolute_paths_and_a_good_name() {
        let spec = |vm: &str, socket: &str, snapshot: &str| {
            ListenSpec::new(
                vm.into(),
                socket.into(),
                ListenSource::File(snapshot.into()),
                PeerRule::default(),
            )
        };
        assert!(spec("fc0", "/run/a.sock", "/srv/mem").is_ok());
        assert_eq!(
            spec("a b", "/run/a.sock", "/srv/mem").unwrap_err().field,
            "vm"
        );
        assert_eq!(
            spec("fc0", "a.sock", "/srv/mem").unwrap_err().field,
            "socket"
        );
        assert_eq!(
            spec("fc0", &format!("/{}", "x".repeat(120)), "/srv/mem")
                .unwrap_err()
                .field,
            "socket"
        );
        assert_eq!(
            spec("fc0", "/run/a.sock", "mem").unwrap_err().field,
            "snapshot"
        );
    }
}

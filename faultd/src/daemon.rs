//! The daemon's registry: the live sessions and their labels, handles and limits, the
//! Firecracker sockets listened on, and how a validated VM becomes a served session. Every front
//! door (the control socket, admin requests, Firecracker) shares it; it sits above the engine
//! and below the doors, and imports none of them.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use faultd_proto::{ErrorCode, SessionKind};
use s2map::Layout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::session::{ServedRegion, Session};
use crate::engine::store::{Store, StoreError};
use crate::engine::{Commander, DeviceLimits, FaultServer, FaultThread, Resume};
use crate::kernel::uffd::KernelUffd;
use crate::ops::config::{Config, Limit, Limits, ListenSpec};
use crate::ops::metrics::DaemonMetrics;

/// A refused request: the protocol error class and a message naming field and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Class for the client.
    pub code: ErrorCode,
    /// Explanation.
    pub message: String,
}

/// A registration that passed every check, with the fds it owns.
#[derive(Debug)]
pub struct Validated {
    /// VM name.
    pub vm: String,
    /// Guest layout.
    pub layout: Layout,
    /// Per region of `layout` (same order): where it lives in the VMM.
    pub regions: Vec<ServedRegion>,
    /// The VMM's userfaultfd.
    pub uffd: OwnedFd,
    /// Snapshot file, if any region is snapshot-backed (and no object backs them).
    pub snapshot: Option<File>,
    /// Snapshot object, when the registration named one instead of a file.
    pub object: Option<Arc<objstore::ObjectVersion>>,
}

/// A file by identity: `fstat`'s device and inode. Every userfaultfd has an inode of its own
/// (since Linux 5.12; faultd needs 6.1), so this tells one uffd from another too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

/// The files one live session holds alone (its uffd, its guest RAM), released when dropped:
/// once the session has ended.
#[derive(Debug)]
pub(crate) struct Claims {
    daemon: Arc<Daemon>,
    ids: Vec<FileId>,
}

impl Drop for Claims {
    fn drop(&mut self) {
        let mut claimed = self.daemon.claimed();
        for id in &self.ids {
            claimed.remove(id);
        }
    }
}

/// One socket faultd listens on for Firecracker, as the registry knows it.
#[derive(Debug, Clone)]
pub(crate) struct Listener {
    /// The listener's name (its restores' sessions are named `NAME-N`).
    pub(crate) vm: String,
    /// The uid whose request added it (None: the config file).
    pub(crate) added_by: Option<u32>,
    /// What faultd's state directory keeps of it, to listen again after a restart (None: a
    /// config entry, which the config names again).
    pub(crate) kept: Option<ListenSpec>,
    /// Fired to stop listening (`firecracker_unlisten`, or shutdown).
    pub(crate) stop: CancellationToken,
    /// Fired once the socket is removed and the name released.
    pub(crate) stopped: CancellationToken,
}

/// The sockets faultd listens on for Firecracker (by socket path), the restores each serves,
/// and the session names that sessions kept across a restart hold.
#[derive(Debug, Default)]
pub struct Listeners {
    by_socket: Mutex<HashMap<PathBuf, Listener>>,
    /// Restores being served (and connections not yet past their message), by listener name.
    restores: Arc<Mutex<HashMap<String, usize>>>,
    /// Session names of kept sessions being served again: never given to a new restore.
    reserved: Mutex<std::collections::HashSet<String>>,
    /// Serializes writes of the listeners kept in the state directory.
    pub(crate) state_write: Mutex<()>,
}

/// Why a Firecracker socket cannot be reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// faultd listens on this socket already, for this VM.
    Socket(String),
    /// This VM is listened for already, on this socket.
    Vm(PathBuf),
}

/// A restore's place under its listener's `restores_per_listener`, given back on drop.
#[derive(Debug)]
pub(crate) struct RestoreSlot {
    restores: Arc<Mutex<HashMap<String, usize>>>,
    listener: String,
}

impl Drop for RestoreSlot {
    fn drop(&mut self) {
        let mut map = self.restores.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.listener) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.listener);
            }
        }
    }
}

impl Listeners {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Listener>> {
        self.by_socket.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `socket` for `listener`, or says which of the two is taken.
    pub(crate) fn reserve(&self, socket: &Path, listener: Listener) -> Result<(), Taken> {
        let mut map = self.lock();
        if let Some(held) = map.get(socket) {
            return Err(Taken::Socket(held.vm.clone()));
        }
        if let Some((held, _)) = map.iter().find(|(_, l)| l.vm == listener.vm) {
            return Err(Taken::Vm(held.clone()));
        }
        map.insert(socket.to_path_buf(), listener);
        Ok(())
    }

    /// Every socket listened on and its VM, by socket path.
    pub(crate) fn list(&self) -> Vec<(PathBuf, String)> {
        let mut all: Vec<(PathBuf, String)> = self
            .lock()
            .iter()
            .map(|(socket, l)| (socket.clone(), l.vm.clone()))
            .collect();
        all.sort();
        all
    }

    /// The listener named `vm` and its socket.
    pub(crate) fn named(&self, vm: &str) -> Option<(PathBuf, Listener)> {
        self.lock()
            .iter()
            .find(|(_, l)| l.vm == vm)
            .map(|(s, l)| (s.clone(), l.clone()))
    }

    /// What the state directory keeps: the listeners added at run time, by socket path.
    pub(crate) fn kept(&self) -> Vec<(ListenSpec, Option<u32>)> {
        let mut all: Vec<(ListenSpec, Option<u32>)> = self
            .lock()
            .values()
            .filter_map(|l| l.kept.clone().map(|k| (k, l.added_by)))
            .collect();
        all.sort_by(|a, b| a.0.socket.cmp(&b.0.socket));
        all
    }

    /// Records what the state directory keeps of the listener on `socket`.
    pub(crate) fn set_kept(&self, socket: &Path, kept: ListenSpec) {
        if let Some(l) = self.lock().get_mut(socket) {
            l.kept = Some(kept);
        }
    }

    /// Frees `socket`.
    pub(crate) fn release(&self, socket: &Path) {
        self.lock().remove(socket);
    }

    /// A place for one more restore of `listener`, or the restores it serves now when it has
    /// `limit` already.
    pub(crate) fn enter(&self, listener: &str, limit: usize) -> Result<RestoreSlot, usize> {
        let mut map = self.restores.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(listener.to_owned()).or_insert(0);
        if *n >= limit {
            return Err(*n);
        }
        *n += 1;
        Ok(RestoreSlot {
            restores: self.restores.clone(),
            listener: listener.to_owned(),
        })
    }

    /// A place for a restore kept across a restart (never refused: its VM is running).
    pub(crate) fn enter_kept(&self, listener: &str) -> RestoreSlot {
        let mut map = self.restores.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(listener.to_owned()).or_insert(0) += 1;
        RestoreSlot {
            restores: self.restores.clone(),
            listener: listener.to_owned(),
        }
    }

    /// Holds session name `name` for a kept session (until [`Listeners::unreserve_name`]).
    pub(crate) fn reserve_name(&self, name: &str) {
        self.reserved_names().insert(name.to_owned());
    }

    /// Gives back a name [`Listeners::reserve_name`] held.
    pub(crate) fn unreserve_name(&self, name: &str) {
        self.reserved_names().remove(name);
    }

    /// Whether a kept session holds `name`.
    pub(crate) fn name_reserved(&self, name: &str) -> bool {
        self.reserved_names().contains(name)
    }

    fn reserved_names(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Daemon-wide state shared by connection tasks.
#[derive(Debug)]
pub struct Daemon {
    pub(crate) config: Config,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    next_id: AtomicU64,
    /// Wakes the watchdog when a device is attached (it sleeps while no VM has one).
    pub(crate) device_attached: tokio::sync::Notify,
    /// The sockets faultd listens on for Firecracker.
    pub(crate) firecracker: Listeners,
    /// Every task of the daemon (connections, Firecracker listeners), waited for at shutdown.
    pub(crate) tracker: TaskTracker,
    /// Fires at shutdown.
    pub(crate) cancel: CancellationToken,
    /// Resident guest RAM of all sessions, bytes (for the global budget).
    resident: Arc<AtomicU64>,
    /// Bytes all VMs' pinned devices map (`device.pin_total_mib`).
    pin_pool: Arc<crate::engine::pinned::PinPool>,
    pub(crate) metrics: DaemonMetrics,
    /// Each session's `vm` metrics label, by session id (taken when its server is built,
    /// released when it ends).
    labels: Mutex<HashMap<u64, Arc<str>>>,
    /// The sessions operator requests can reach, by session id (added once its thread runs,
    /// removed when it ends).
    handles: Mutex<HashMap<u64, Served>>,
    /// When the daemon started (for `status`).
    started: std::time::Instant,
    /// The uffds and guest RAM files live sessions hold (see [`Daemon::claim`]).
    claimed: Mutex<std::collections::HashSet<FileId>>,
    /// What each uid and all sessions hold of the [`Limits`].
    quotas: Arc<Mutex<Quotas>>,
    /// VM names whose session is ending, and who waits for them (see [`Daemon::name_free`]).
    ending: Mutex<HashMap<(u32, String), Arc<tokio::sync::Notify>>>,
    /// Control-socket connections open; one permit per connection.
    connections: Arc<tokio::sync::Semaphore>,
    /// Control-socket connections open, by uid.
    uid_connections: Arc<Mutex<HashMap<u32, usize>>>,
    /// Snapshot files' analyses, shared by their sessions.
    pub(crate) snapshots: crate::engine::snapshots::Catalog,
    /// Working-set recordings.
    pub(crate) working_sets: Arc<crate::engine::ws_library::Library>,
    /// Object stores snapshots are served from, with the shared chunk fetcher and cache
    /// (None: none configured, or the cache could not be opened).
    pub(crate) objects: Option<Arc<crate::engine::objects::ObjectService>>,
}

/// A control-socket connection's place under the connection limits, given back on drop.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    by_uid: Arc<Mutex<HashMap<u32, usize>>>,
    uid: u32,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                by_uid.remove(&self.uid);
            }
        }
    }
}

/// What uids and sessions hold of the [`Limits`] now.
#[derive(Debug, Default)]
struct Quotas {
    by_uid: HashMap<u32, UidUse>,
    /// Guest RAM of all admitted sessions, bytes.
    guest: u64,
}

/// One uid's sessions and its registration token bucket.
#[derive(Debug)]
struct UidUse {
    sessions: usize,
    tokens: f64,
    refilled: std::time::Instant,
}

/// Uids remembered before idle ones (no session, a full bucket) are forgotten.
const UIDS_KEPT: usize = 1024;

impl Quotas {
    /// Takes one registration token of `uid`, refilled at `limits.registrations_per_sec`.
    fn take_token(&mut self, uid: u32, limits: &Limits, now: std::time::Instant) -> bool {
        let burst = f64::from(limits.registrations_burst);
        if self.by_uid.len() >= UIDS_KEPT {
            let rate = f64::from(limits.registrations_per_sec);
            self.by_uid.retain(|_, u| {
                let full = u.tokens + now.duration_since(u.refilled).as_secs_f64() * rate >= burst;
                u.sessions > 0 || !full
            });
        }
        let u = self.by_uid.entry(uid).or_insert(UidUse {
            sessions: 0,
            tokens: burst,
            refilled: now,
        });
        let earned =
            now.duration_since(u.refilled).as_secs_f64() * f64::from(limits.registrations_per_sec);
        u.tokens = (u.tokens + earned).min(burst);
        u.refilled = now;
        if u.tokens < 1.0 {
            return false;
        }
        u.tokens -= 1.0;
        true
    }
}

/// A registration's share of the [`Limits`]: a session of its uid and its guest RAM, given
/// back when dropped (refused, or the session ended).
#[derive(Debug)]
pub(crate) struct Admission {
    quotas: Arc<Mutex<Quotas>>,
    uid: u32,
    guest: u64,
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut q = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        q.guest = q.guest.saturating_sub(self.guest);
        if let Some(u) = q.by_uid.get_mut(&self.uid) {
            u.sessions = u.sessions.saturating_sub(1);
        }
    }
}

/// Whether a VM name can take a new session (see [`Daemon::name_state`]).
pub(crate) enum NameState {
    /// No session has it.
    Free,
    /// A live session has it: a registration for it is refused at once.
    Live(u64),
    /// Its session is ending; the store is released when this fires.
    Ending(Arc<tokio::sync::Notify>),
}

/// A live session as operator requests see it, though another connection owns it (and its
/// fault thread, in a [`Live`]): its state and how to reach its thread.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    pub(crate) session: Arc<Session>,
    /// Its fault thread's command channel.
    pub(crate) commands: Commander,
    /// The VMM's pid (SO_PEERCRED), if the kernel told it.
    pub(crate) pid: Option<i32>,
    /// What kind of client it serves.
    pub(crate) kind: SessionKind,
}

/// How long a registration waits for the store of its VM name to be released by a session
/// that is ending (see [`Daemon::start_session`]).
const STORE_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a session ends, which decides what happens to its VM's pages in faultd's store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The VMM hung up: the VM is gone, and so are its stored pages.
    VmGone,
    /// faultd stops, or closed the session, while the VMM lives: outstanding work is finished
    /// and the store kept, for the VMM to register again with `resume`.
    Handover,
}

/// How a session's store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Opening {
    /// A new VM (`register` without `resume`): any store of the name and owner is discarded.
    Fresh,
    /// A client's `register` with `resume`: its own store of the name, if it has one.
    Resume,
    /// A session faultd kept across its restart (a Firecracker restore), with the owner it
    /// recorded.
    Kept,
}

/// A session being served: its state and its fault thread.
#[derive(Debug)]
pub(crate) struct Live {
    pub(crate) session: Arc<Session>,
    pub(crate) thread: FaultThread,
}

impl Daemon {
    /// New daemon state; `cancel` ends everything it runs.
    pub fn new(config: Config, cancel: CancellationToken) -> Arc<Daemon> {
        let metrics = DaemonMetrics::new(
            config.metrics_vm_labels,
            config.pin_limit,
            config.pin_total,
            config.budget,
        );
        let connections = Arc::new(tokio::sync::Semaphore::new(config.limits.connections));
        let pin_pool = Arc::new(crate::engine::pinned::PinPool::new(config.pin_total));
        let ws = config.working_set;
        let snapshots = crate::engine::snapshots::Catalog::new(
            ws.zero_pages || ws.record || ws.replay,
            ws.zero_pages,
            ws.scan_max,
        )
        .unwrap_or_else(|e| {
            tracing::warn!("no snapshot analysis: starting its thread: {e}");
            crate::engine::snapshots::Catalog::off()
        });
        let working_sets =
            crate::engine::ws_library::Library::new(&config.store_dir, ws.max_recordings);
        // Imports and saves a faultd that died left half-written: nobody finishes them now.
        working_sets.sweep();
        let cache_dir = config.store_dir.join("object-cache");
        let objects =
            match crate::engine::objects::ObjectService::new(&config.object_store, &cache_dir) {
                Ok(o) => o.map(Arc::new),
                Err(e) => {
                    tracing::error!(
                        "object stores unusable (registrations naming an object are refused): \
                     opening the chunk cache {}: {e}",
                        cache_dir.display()
                    );
                    None
                }
            };
        Arc::new(Daemon {
            working_sets,
            snapshots,
            objects,
            config,
            resident: Arc::new(AtomicU64::new(0)),
            pin_pool,
            metrics,
            labels: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
            claimed: Mutex::new(std::collections::HashSet::new()),
            quotas: Arc::new(Mutex::new(Quotas::default())),
            ending: Mutex::new(HashMap::new()),
            connections,
            uid_connections: Arc::new(Mutex::new(HashMap::new())),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            device_attached: tokio::sync::Notify::new(),
            firecracker: Listeners::default(),
            tracker: TaskTracker::new(),
            cancel,
        })
    }

    pub(crate) fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions currently served.
    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }

    fn labels(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<str>>> {
        self.labels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Served>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn claimed(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<FileId>> {
        self.claimed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `files` (each with what it is in the request, for the refusal) for a new session,
    /// or refuses at once the one another live session holds. No waiting here: a blocking
    /// wait would hold a thread per waiter, which a flood of registrations sharing one fd turns
    /// into hundreds; the control socket retries on the reactor instead, for a session that is
    /// just ending.
    pub(crate) fn claim(self: &Arc<Self>, files: &[(FileId, String)]) -> Result<Claims, Refusal> {
        let mut claimed = self.claimed();
        if let Some((_, what)) = files.iter().find(|(id, _)| claimed.contains(id)) {
            return Err(Refusal {
                code: ErrorCode::BadFd,
                message: format!(
                    "{what} is held by another live session: a uffd or a guest RAM file serves \
                     one session at a time"
                ),
            });
        }
        let ids: Vec<FileId> = files.iter().map(|(id, _)| *id).collect();
        claimed.extend(ids.iter().copied());
        Ok(Claims {
            daemon: self.clone(),
            ids,
        })
    }

    /// How long the daemon has been running.
    pub(crate) fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Makes a running session reachable by operator requests (`evict_session`, and its pid
    /// and kind in `sessions`).
    pub(crate) fn admit(
        &self,
        session: &Arc<Session>,
        thread: &FaultThread,
        pid: Option<i32>,
        kind: SessionKind,
    ) {
        let served = Served {
            session: session.clone(),
            commands: thread.commander(),
            pid,
            kind,
        };
        self.handles().insert(session.id(), served);
    }

    /// The live sessions operator requests can reach, by session id.
    pub(crate) fn served(&self) -> Vec<Served> {
        let sessions = self.sessions();
        let handles = self.handles();
        // A session between registration and admission is not reachable yet.
        let mut served: Vec<Served> = handles
            .iter()
            .filter(|(id, _)| sessions.contains_key(id))
            .map(|(_, s)| s.clone())
            .collect();
        served.sort_unstable_by_key(|s| s.session.id());
        served
    }

    /// The sessions served now.
    pub fn live_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions().values().cloned().collect()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render_metrics(&self) -> String {
        // Both tables stay locked while counters are read, so a session that ends meanwhile
        // is counted once: live here, or retired (see DaemonMetrics::release).
        let sessions = self.sessions();
        let labels = self.labels();
        let other: Arc<str> = Arc::from("other");
        let objects = self
            .objects
            .as_ref()
            .map(|o| crate::ops::metrics::ObjectSample {
                kept_refused: o.kept_refused.load(Ordering::Relaxed),
                ..object_sample(o.fetcher())
            });
        self.metrics.set_pinned(self.pin_pool.used());
        self.metrics.render_with_objects(
            sessions.iter().map(|(id, s)| {
                let label = labels.get(id).unwrap_or(&other);
                (&**label, s.sample())
            }),
            objects,
        )
    }

    /// Why a new session cannot be opened now, if it cannot.
    pub(crate) fn session_limit_reached(&self) -> Option<String> {
        (self.session_count() >= self.config.max_sessions).then(|| {
            format!(
                "faultd serves its limit of {} sessions",
                self.config.max_sessions
            )
        })
    }

    /// A refusal because `limit` was reached: counted, logged by the caller's refusal.
    pub(crate) fn limit_reached(
        &self,
        limit: Limit,
        value: impl std::fmt::Display,
        why: String,
    ) -> Refusal {
        self.metrics.refusal(limit);
        Refusal {
            code: ErrorCode::Busy,
            message: format!("limit {} = {value} reached: {why}", limit.name()),
        }
    }

    /// A place for a new connection of `uid` under the connection limits (all uids, and
    /// this one), or the limit reached and its value.
    pub(crate) fn admit_connection(&self, uid: u32) -> Result<ConnectionSlot, (Limit, usize)> {
        let limits = &self.config.limits;
        let mut by_uid = self
            .uid_connections
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let open = by_uid.get(&uid).copied().unwrap_or(0);
        if open >= limits.connections_per_uid {
            return Err((Limit::ConnectionsPerUid, limits.connections_per_uid));
        }
        let permit = self
            .connections
            .clone()
            .try_acquire_owned()
            .map_err(|_| (Limit::Connections, limits.connections))?;
        *by_uid.entry(uid).or_insert(0) += 1;
        Ok(ConnectionSlot {
            _permit: permit,
            by_uid: self.uid_connections.clone(),
            uid,
        })
    }

    /// Admits a registration of `uid` under the per-uid limits (registrations per second,
    /// sessions at once), or refuses it naming the limit. Cheap: no I/O, nothing allocated
    /// beyond the uid's entry.
    pub(crate) fn admit_uid(&self, uid: u32) -> Result<Admission, Refusal> {
        let limits = &self.config.limits;
        let mut q = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        if !q.take_token(uid, limits, std::time::Instant::now()) {
            return Err(self.limit_reached(
                Limit::RegistrationsPerSec,
                limits.registrations_per_sec,
                format!(
                    "uid {uid} registers too often (bursts of {})",
                    limits.registrations_burst
                ),
            ));
        }
        // take_token made the entry.
        let Some(u) = q.by_uid.get_mut(&uid) else {
            return Err(Refusal {
                code: ErrorCode::Internal,
                message: format!("uid {uid} has no quota entry"),
            });
        };
        if u.sessions >= limits.sessions_per_uid {
            return Err(self.limit_reached(
                Limit::SessionsPerUid,
                limits.sessions_per_uid,
                format!("uid {uid} has {} sessions", u.sessions),
            ));
        }
        u.sessions += 1;
        Ok(Admission {
            quotas: self.quotas.clone(),
            uid,
            guest: 0,
        })
    }

    /// Counts a session faultd kept across its restart (a Firecracker restore) against its
    /// owner's sessions and the guest total, without refusing it: its VM is running, and
    /// refusing would leave it with nobody to serve its faults.
    pub(crate) fn admit_kept(&self, uid: u32, guest: u64) -> Admission {
        let mut q = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        let burst = f64::from(self.config.limits.registrations_burst);
        let u = q.by_uid.entry(uid).or_insert(UidUse {
            sessions: 0,
            tokens: burst,
            refilled: std::time::Instant::now(),
        });
        u.sessions += 1;
        q.guest = q.guest.saturating_add(guest);
        Admission {
            quotas: self.quotas.clone(),
            uid,
            guest,
        }
    }

    /// Adds `bytes` of guest RAM to `admission`, within the per-session and total limits, or
    /// refuses naming the limit. Checked before anything is built for the guest.
    pub(crate) fn admit_guest(&self, admission: &mut Admission, bytes: u64) -> Result<(), Refusal> {
        let limits = &self.config.limits;
        let gib = |b: u64| b >> 30;
        if bytes > limits.session_guest {
            return Err(self.limit_reached(
                Limit::SessionGuest,
                gib(limits.session_guest),
                format!("the guest has {bytes} bytes of RAM"),
            ));
        }
        let mut q = self.quotas.lock().unwrap_or_else(|p| p.into_inner());
        let total = q.guest.saturating_add(bytes);
        if total > limits.total_guest {
            return Err(self.limit_reached(
                Limit::TotalGuest,
                gib(limits.total_guest),
                format!(
                    "sessions hold {} bytes of guest RAM; this guest has {bytes}",
                    q.guest
                ),
            ));
        }
        q.guest = total;
        admission.guest += bytes;
        Ok(())
    }

    /// Whether `owner`'s `vm` is free for a new session, taken by a live one, or being released
    /// (names are per owner: another uid's VM of the same name is another VM).
    pub(crate) fn name_state(&self, owner: u32, vm: &str) -> NameState {
        // Ending first: an ending session is still in the session table until it is gone.
        if let Some(n) = self.ending().get(&(owner, vm.to_owned())) {
            return NameState::Ending(n.clone());
        }
        match self
            .sessions()
            .values()
            .find(|s| s.owner() == owner && s.vm() == vm)
        {
            Some(s) => NameState::Live(s.id()),
            None => NameState::Free,
        }
    }

    /// Waits until `owner`'s `vm` has no session, or refuses: at once if its session is live, after
    /// at most [`STORE_BUSY_WAIT`] if it is ending. Waiting holds no thread.
    pub(crate) async fn name_free(&self, owner: u32, vm: &str) -> Result<(), Refusal> {
        let notify = match self.name_state(owner, vm) {
            NameState::Free => return Ok(()),
            NameState::Live(id) => {
                return Err(self.limit_reached(
                    Limit::LiveName,
                    1,
                    format!("VM {vm} is in use by another session (live session {id})"),
                ))
            }
            NameState::Ending(n) => n,
        };
        let released = notify.notified();
        // notify_waiters wakes only futures that exist: look again, now that this one does.
        if !matches!(self.name_state(owner, vm), NameState::Ending(_)) {
            return Ok(());
        }
        match tokio::time::timeout(STORE_BUSY_WAIT, released).await {
            Ok(()) => Ok(()),
            Err(_) => Err(Refusal {
                code: ErrorCode::Busy,
                message: format!(
                    "VM {vm}'s previous session is still ending after {STORE_BUSY_WAIT:?}"
                ),
            }),
        }
    }

    fn ending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(u32, String), Arc<tokio::sync::Notify>>> {
        self.ending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Builds the session of a validated VM and the server of its faults (not yet running,
    /// not yet registered).
    pub(crate) fn new_server(
        &self,
        vm: String,
        owner: u32,
        layout: Layout,
        regions: Vec<ServedRegion>,
        snapshot: Option<File>,
        uffd: OwnedFd,
    ) -> std::io::Result<(Arc<Session>, FaultServer<KernelUffd>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session::new(id, vm, layout, regions, snapshot).owned_by(owner));
        if let Some(info) = session.snapshot().and_then(|f| self.snapshots.info_for(f)) {
            session.set_snapshot_info(info);
        }
        let config = &self.config;
        // The systemd watchdog looks at the uffd through a duplicate (to see faults waiting);
        // without one it judges the thread by its progress alone.
        match uffd.try_clone() {
            Ok(dup) => session.watch.set_source(dup),
            Err(e) => tracing::warn!(session = id, "duplicating the userfaultfd: {e}"),
        }
        let ops = KernelUffd::new(uffd, config.batch)?;
        let label = self.metrics.acquire_label(session.vm());
        self.labels().insert(id, label.clone());
        let server = FaultServer::new(
            session.clone(),
            ops,
            config.batch,
            DeviceLimits {
                pin_limit: config.pin_limit,
                deadline: config.device_deadline,
                malformed_run: config.limits.device_malformed_run,
            },
        )
        .with_store_dir(self.store_dir_of(owner))
        .with_budget(config.budget, self.resident.clone())
        .with_pin_pool(self.pin_pool.clone())
        .with_around(config.around)
        .with_metrics(self.metrics.session(&label));
        let ws = config.working_set;
        let server = if ws.record || ws.replay {
            server.with_working_set(crate::engine::working_set::WsConfig {
                record: ws.record,
                record_pages: ws.record_pages,
                record_for: ws.record_for,
                replay: ws.replay,
                library: self.working_sets.clone(),
            })
        } else {
            server
        };
        Ok((session, server))
    }

    /// Where the stores of `owner`'s VMs are: `store.dir/<uid>` (see [`crate::engine::store`]).
    pub(crate) fn store_dir_of(&self, owner: u32) -> PathBuf {
        crate::engine::store::owner_dir(&self.config.store_dir, owner)
    }

    /// Before `owner` resumes `vm` (`by_peer`: because a client asked; otherwise faultd resumes
    /// a session it kept, whose owner it recorded itself): finds the store to resume in
    /// `owner`'s directory, or says why the one there is not `owner`'s to resume. A store of
    /// `vm` that an older faultd left in `store.dir` itself records no owner: it becomes root's
    /// (moved into `store.dir/0`) when root resumes it, and nobody else may. A store of `vm`
    /// that only another uid has is never served to `owner`: the resume is refused, and nothing
    /// of that store changes. Without any store of `vm`, the resume goes on with none (as
    /// before). A kept session is never refused for another uid's store: that would let any
    /// uid stop it being served again by making a store of its name.
    fn claim_store(&self, owner: u32, vm: &str, by_peer: bool) -> Result<(), Refusal> {
        use crate::engine::store;
        let root = &self.config.store_dir;
        let mine = self.store_dir_of(owner);
        if store::exists(&mine, vm) {
            return Ok(());
        }
        let forbidden = |message: String| Refusal {
            code: ErrorCode::Forbidden,
            message,
        };
        if store::exists(root, vm) {
            if owner != 0 {
                return Err(forbidden(format!(
                    "vm {vm:?} has no store of uid {owner} to resume; the store {} left by an \
                     older faultd records no owner, so only root may resume it (an operator \
                     who knows it is uid {owner}'s moves {vm}.pages and {vm}.journal into {})",
                    root.display(),
                    mine.display()
                )));
            }
            return match store::adopt_legacy(root, &mine, vm) {
                Ok(_) => {
                    tracing::info!(vm, dir = %mine.display(), "moved an older faultd's store to root's");
                    Ok(())
                }
                Err(e) => Err(Refusal {
                    code: ErrorCode::Internal,
                    message: format!(
                        "moving vm {vm:?}'s store from {} into {}: {e}",
                        root.display(),
                        mine.display()
                    ),
                }),
            };
        }
        if !by_peer {
            return Ok(());
        }
        let others = std::fs::read_dir(root).into_iter().flatten().flatten();
        let held_elsewhere = others.into_iter().any(|entry| {
            let name = entry.file_name();
            let other = name.to_str().and_then(|n| n.parse::<u32>().ok());
            other.is_some_and(|uid| uid != owner) && store::exists(&entry.path(), vm)
        });
        if held_elsewhere {
            return Err(forbidden(format!(
                "vm {vm:?} has no store of uid {owner} to resume: the store of that name belongs \
                 to another user, and a VM's store is served only to the uid that created it"
            )));
        }
        Ok(())
    }

    /// Makes a served session known (stats, watchdog, the session limit).
    pub(crate) fn register_session(&self, session: &Arc<Session>) {
        self.sessions().insert(session.id(), session.clone());
        tracing::info!(
            session = session.id(),
            vm = session.vm(),
            guest_bytes = session.layout().total_bytes(),
            regions = session.layout().regions().len(),
            "session registered"
        );
    }

    /// Starts serving a validated VM on a new fault thread, registered in the daemon. Faults
    /// are served from the moment this returns. The VM's store is opened first: afresh, or
    /// with `resume` the one a previous faultd left (see [`crate::engine::store`]); either way a VM
    /// name has one live session at a time, because its store is locked.
    ///
    /// The VM is `owner`'s (the uid of its VMM, SO_PEERCRED): its name is looked up, and its
    /// store kept, among `owner`'s VMs only (see [`Daemon::claim_store`]).
    pub(crate) fn start_session(
        &self,
        v: Validated,
        owner: u32,
        open: Opening,
        vmm_pid: Option<i32>,
        remote: Option<crate::kernel::remote::RemoteMm>,
    ) -> Result<Live, Refusal> {
        let slot_bytes = v
            .layout
            .regions()
            .iter()
            .map(|r| r.page_size().bytes())
            .max()
            .unwrap_or(4096);
        let resume = open != Opening::Fresh;
        if resume {
            self.claim_store(owner, &v.vm, open == Opening::Resume)?;
        }
        let dir = self.store_dir_of(owner);
        // One live session per owner and name: a registration waits for an ending one before
        // this (asynchronously, see [`Daemon::name_free`]), so a busy store here is a live one
        // or a race with another registration: refused at once, holding no thread.
        let opened = Store::open(&dir, &v.vm, slot_bytes, resume);
        let (store, records) = opened.map_err(|e| {
            let code = match e {
                StoreError::Busy { .. } => ErrorCode::Busy,
                StoreError::Journal { .. } => ErrorCode::BadLayout,
                _ => ErrorCode::Internal,
            };
            Refusal {
                code,
                message: crate::ops::logging::chain(&e),
            }
        })?;
        let internal = |e: std::io::Error| Refusal {
            code: ErrorCode::Internal,
            message: format!("starting fault service: {e}"),
        };
        let object = v.object;
        let (session, server) = self
            .new_server(v.vm, owner, v.layout, v.regions, v.snapshot, v.uffd)
            .map_err(internal)?;
        // Anonymous memory is reached from outside (resume reads its pagemap).
        if let Some(mm) = remote {
            session.set_remote(mm);
        }
        let resume = resume.then_some(Resume { records, vmm_pid });
        let mut server = server.with_store(store, resume);
        if let Some(version) = object {
            let service = self.objects.clone().ok_or_else(|| Refusal {
                code: ErrorCode::BackingFailed,
                message: "no object store is configured".into(),
            })?;
            let fill = crate::engine::objects::ObjectFill::new(service, version, owner)
                .map_err(internal)?;
            server = server.with_object(fill);
        }
        let thread = FaultThread::spawn(server, self.config.spin).map_err(internal)?;
        self.register_session(&session);
        Ok(Live { session, thread })
    }

    /// Marks `session`'s name as ending, not live (idempotent): a registration for it now
    /// waits for [`Daemon::end_session`] to release the store. The notification it fires then.
    pub(crate) fn begin_ending(&self, session: &Session) -> Arc<tokio::sync::Notify> {
        self.ending()
            .entry((session.owner(), session.vm().to_owned()))
            .or_insert_with(|| Arc::new(tokio::sync::Notify::new()))
            .clone()
    }

    /// Ends a session: stops its fault thread, forgets it, and logs its figures.
    pub(crate) async fn end_session(&self, live: Live, ending: Ending) {
        let Live { session, thread } = live;
        // From here the name is ending, not live: a registration for it waits for the store.
        let released = self.begin_ending(&session);
        let drain = self.config.device_deadline;
        // Joining waits for the thread to finish what it is doing (the watchdog bounds that);
        // never on the reactor, which serves every other session's control requests.
        let _ = tokio::task::spawn_blocking(move || match ending {
            Ending::VmGone => thread.stop(),
            Ending::Handover => thread.hand_over(drain),
        })
        .await;
        // The thread has stopped: these are the final counters, retired into the metrics and
        // logged, from one read.
        let (stats, sample) = session.stats_and_sample();
        {
            // Both tables together, as render_metrics reads them.
            let mut sessions = self.sessions();
            sessions.remove(&session.id());
            self.handles().remove(&session.id());
            if let Some(label) = self.labels().remove(&session.id()) {
                self.metrics.release(&label, &sample.totals);
            }
            // The thread has stopped and dropped the store: the name is free.
            self.ending()
                .remove(&(session.owner(), session.vm().to_owned()));
            released.notify_waiters();
        }
        tracing::info!(
            session = session.id(),
            vm = session.vm(),
            faults = stats.vcpu_faults,
            file_fills = stats.file_fills,
            zero_fills = stats.zero_fills,
            resident_bytes = stats.resident_bytes,
            errors = stats.errors,
            "session ended"
        );
    }
}

/// The fetcher's and cache's counters as the metrics read them.
pub(crate) fn object_sample(f: &objstore::Fetcher) -> crate::ops::metrics::ObjectSample {
    let (c, cache) = (f.counters(), f.cache());
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    crate::ops::metrics::ObjectSample {
        hits: get(&c.hits),
        misses: get(&c.misses),
        gets: get(&c.gets),
        get_errors: get(&c.get_errors),
        bytes_fetched: get(&c.bytes_fetched),
        changed: get(&c.changed),
        cache_bytes: cache.bytes(),
        cache_chunks: cache.len() as u64,
        evicted: get(&cache.counters.evicted),
        prefetch_gets: get(&c.prefetch_gets),
        recording_gets: get(&c.recording_gets),
        recording_puts: get(&c.recording_puts),
        // The service's, not the fetcher's (see the metrics sample).
        kept_refused: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> Limits {
        Config::from_toml("[limits]\nregistrations_per_sec = 2\nregistrations_burst = 3\n")
            .unwrap()
            .limits
    }

    #[test]
    fn registration_tokens_allow_a_burst_then_refill_at_the_rate_per_uid() {
        let (limits, mut q) = (limits(), Quotas::default());
        let t0 = std::time::Instant::now();

        let burst: Vec<bool> = (0..4).map(|_| q.take_token(7, &limits, t0)).collect();
        let other_uid = q.take_token(8, &limits, t0);
        let half_second_later = q.take_token(7, &limits, t0 + Duration::from_millis(500));
        let right_after = q.take_token(7, &limits, t0 + Duration::from_millis(500));

        assert_eq!(burst, [true, true, true, false]);
        assert!(other_uid);
        assert!(half_second_later);
        assert!(!right_after);
    }

    #[test]
    fn an_admission_gives_back_its_session_and_guest_bytes_when_dropped() {
        let config =
            Config::from_toml("[limits]\nsessions_per_uid = 1\ntotal_guest_gib = 1\n").unwrap();
        let daemon = Daemon::new(config, CancellationToken::new());
        let mut first = daemon.admit_uid(5).unwrap();
        daemon.admit_guest(&mut first, 1 << 30).unwrap();

        let second = daemon.admit_uid(5).unwrap_err();
        let mut other = daemon.admit_uid(6).unwrap();
        let over = daemon.admit_guest(&mut other, 1).unwrap_err();
        drop(first);
        let again = daemon
            .admit_uid(5)
            .map(|mut a| daemon.admit_guest(&mut a, 1 << 30));

        assert!(
            second
                .message
                .starts_with("limit sessions_per_uid = 1 reached"),
            "{second}"
        );
        assert!(
            over.message
                .starts_with("limit total_guest_gib = 1 reached"),
            "{over}"
        );
        assert!(matches!(again, Ok(Ok(()))), "{again:?}");
    }
}

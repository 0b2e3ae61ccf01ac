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
use crate::ops::config::Config;
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
    /// Snapshot file, if any region is snapshot-backed.
    pub snapshot: Option<File>,
}

/// The sockets faultd listens on for Firecracker: socket path -> VM name.
#[derive(Debug, Default)]
pub struct Listeners {
    by_socket: Mutex<HashMap<PathBuf, String>>,
}

/// Why a Firecracker socket cannot be reserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// faultd listens on this socket already, for this VM.
    Socket(String),
    /// This VM is listened for already, on this socket.
    Vm(PathBuf),
}

impl Listeners {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, String>> {
        self.by_socket.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `socket` for `vm`, or says which of the two is taken.
    pub(crate) fn reserve(&self, socket: &Path, vm: &str) -> Result<(), Taken> {
        let mut map = self.lock();
        if let Some(held) = map.get(socket) {
            return Err(Taken::Socket(held.clone()));
        }
        if let Some((held, _)) = map.iter().find(|(_, v)| v.as_str() == vm) {
            return Err(Taken::Vm(held.clone()));
        }
        map.insert(socket.to_path_buf(), vm.to_owned());
        Ok(())
    }

    /// Every socket listened on and its VM, by socket path.
    pub(crate) fn list(&self) -> Vec<(PathBuf, String)> {
        let mut all: Vec<(PathBuf, String)> = self
            .lock()
            .iter()
            .map(|(socket, vm)| (socket.clone(), vm.clone()))
            .collect();
        all.sort();
        all
    }

    /// Frees `socket`.
    pub(crate) fn release(&self, socket: &Path) {
        self.lock().remove(socket);
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
    pub(crate) metrics: DaemonMetrics,
    /// Each session's `vm` metrics label, by session id (taken when its server is built,
    /// released when it ends).
    labels: Mutex<HashMap<u64, Arc<str>>>,
    /// What operator requests need of a session besides its state, by session id (added
    /// once its thread runs, removed when it ends).
    handles: Mutex<HashMap<u64, Handle>>,
    /// When the daemon started (for `status`).
    started: std::time::Instant,
}

/// How operator requests reach a live session that another connection owns.
#[derive(Debug, Clone)]
pub(crate) struct Handle {
    /// Its fault thread's command channel.
    pub(crate) commands: Commander,
    /// The VMM's pid (SO_PEERCRED), if the kernel told it.
    pub(crate) pid: Option<i32>,
    /// What kind of client it serves.
    pub(crate) kind: SessionKind,
}

/// A live session as operator requests see it.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    pub(crate) session: Arc<Session>,
    pub(crate) commands: Commander,
    pub(crate) pid: Option<i32>,
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
        let metrics = DaemonMetrics::new(config.metrics_vm_labels, config.pin_limit);
        Arc::new(Daemon {
            config,
            resident: Arc::new(AtomicU64::new(0)),
            metrics,
            labels: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
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

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Handle>> {
        self.handles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long the daemon has been running.
    pub(crate) fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Makes a running session reachable by operator requests (`evict_session`, and its pid
    /// and kind in `sessions`).
    pub(crate) fn admit(
        &self,
        session: &Session,
        thread: &FaultThread,
        pid: Option<i32>,
        kind: SessionKind,
    ) {
        let handle = Handle {
            commands: thread.commander(),
            pid,
            kind,
        };
        self.handles().insert(session.id(), handle);
    }

    /// The live sessions operator requests can reach, by session id.
    pub(crate) fn served(&self) -> Vec<Served> {
        let sessions = self.sessions();
        let handles = self.handles();
        let mut served: Vec<Served> = sessions
            .iter()
            .filter_map(|(id, s)| {
                // A session between registration and admission is not reachable yet.
                let h = handles.get(id)?;
                Some(Served {
                    session: s.clone(),
                    commands: h.commands.clone(),
                    pid: h.pid,
                    kind: h.kind,
                })
            })
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
        self.metrics.render(sessions.iter().map(|(id, s)| {
            let label = labels.get(id).unwrap_or(&other);
            (&**label, s.sample())
        }))
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
            },
        )
        .with_store_dir(self.store_dir_of(owner))
        .with_budget(config.budget, self.resident.clone())
        .with_metrics(self.metrics.session(&label));
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
        // A session of the same name that just ended (its VMM hung up, or reconnects right
        // after a refusal) may still be finishing and hold the store for a moment: wait for it
        // briefly rather than refuse a VMM for a race it cannot see.
        let open = || Store::open(&dir, &v.vm, slot_bytes, resume);
        let waited_until = std::time::Instant::now() + STORE_BUSY_WAIT;
        let mut opened = open();
        while matches!(opened, Err(StoreError::Busy { .. }))
            && std::time::Instant::now() < waited_until
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
            opened = open();
        }
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
        let (session, server) = self
            .new_server(v.vm, owner, v.layout, v.regions, v.snapshot, v.uffd)
            .map_err(internal)?;
        // Anonymous memory is reached from outside (resume reads its pagemap).
        if let Some(mm) = remote {
            session.set_remote(mm);
        }
        let resume = resume.then_some(Resume { records, vmm_pid });
        let server = server.with_store(store, resume);
        let thread = FaultThread::spawn(server, self.config.spin).map_err(internal)?;
        self.register_session(&session);
        Ok(Live { session, thread })
    }

    /// Ends a session: stops its fault thread, forgets it, and logs its figures.
    pub(crate) async fn end_session(&self, live: Live, ending: Ending) {
        let Live { session, thread } = live;
        let drain = self.config.device_deadline;
        // Joining waits for the thread to finish what it is doing (the watchdog bounds that);
        // never on the reactor, which serves every other session's control requests.
        let _ = tokio::task::spawn_blocking(move || match ending {
            Ending::VmGone => thread.stop(),
            Ending::Handover => thread.hand_over(drain),
        })
        .await;
        {
            // Both tables together, as render_metrics reads them.
            let mut sessions = self.sessions();
            sessions.remove(&session.id());
            self.handles().remove(&session.id());
            if let Some(label) = self.labels().remove(&session.id()) {
                self.metrics.release(&label, &session.sample().totals);
            }
        }
        let stats = session.stats();
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

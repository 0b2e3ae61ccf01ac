//! The control socket: accepts VMM connections, turns a valid `register` into a session with a
//! running fault thread, answers `stats`, and ends the session when the VMM hangs up. It also
//! answers clients that are not VMMs: `firecracker_listen` (see [`crate::firecracker`]),
//! `vm_stats`, and the operator requests of [`crate::admin`].
//!
//! Every connection is its own task; anything wrong with one (malformed JSON, oversize packets,
//! bad fds, a second `register`) gets an error message and closes that connection only.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use faultd_proto::{
    CodecError, ErrorCode, EvictAmount, Request, Response, SessionKind, SessionRef, SessionStats,
    MAX_FDS, MAX_MESSAGE_BYTES,
};
use s2map::Layout;
use tokio_seqpacket::ancillary::OwnedAncillaryMessage;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::firecracker::Listeners;
use crate::metrics::DaemonMetrics;
use crate::server::{Command, Commander, DeviceLimits, FaultServer, FaultThread, Resume};
use crate::session::{ServedRegion, Session};
use crate::store::{Store, StoreError};
use crate::validate::{validate, Refusal};
use crate::vcpu::KernelUffd;

/// Daemon-wide state shared by connection tasks.
#[derive(Debug)]
pub struct Daemon {
    pub(crate) config: Config,
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    next_id: AtomicU64,
    /// Wakes the watchdog when a device is attached (it sleeps while no VM has one).
    device_attached: tokio::sync::Notify,
    /// The sockets faultd listens on for Firecracker.
    pub(crate) firecracker: Listeners,
    /// Every task of the daemon (connections, Firecracker listeners), waited for at shutdown.
    pub(crate) tracker: TaskTracker,
    /// Fires at shutdown.
    pub(crate) cancel: CancellationToken,
    /// Resident guest RAM of all sessions, bytes (for the global budget).
    resident: Arc<AtomicU64>,
    metrics: DaemonMetrics,
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

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Session>>> {
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
            (&**label, &**s)
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

    /// The counters of every live session named `vm`, by session id.
    pub(crate) fn stats_of(&self, vm: &str) -> Vec<SessionStats> {
        let mut matching: Vec<Arc<Session>> = self
            .sessions()
            .values()
            .filter(|s| s.vm() == vm)
            .cloned()
            .collect();
        matching.sort_unstable_by_key(|s| s.id());
        matching.iter().map(|s| s.stats()).collect()
    }

    /// Builds the session of a validated VM and the server of its faults (not yet running,
    /// not yet registered).
    pub(crate) fn new_server(
        &self,
        vm: String,
        layout: Layout,
        regions: Vec<ServedRegion>,
        snapshot: Option<File>,
        uffd: OwnedFd,
    ) -> std::io::Result<(Arc<Session>, FaultServer<KernelUffd>)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session::new(id, vm, layout, regions, snapshot));
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
        .with_store_dir(config.store_dir.clone())
        .with_budget(config.budget, self.resident.clone())
        .with_metrics(self.metrics.session(&label));
        Ok((session, server))
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
    /// with `resume` the one a previous faultd left (see [`crate::store`]); either way a VM
    /// name has one live session at a time, because its store is locked.
    pub(crate) fn start_session(
        &self,
        v: crate::validate::Validated,
        resume: bool,
        vmm_pid: Option<i32>,
        remote: Option<crate::remote::RemoteMm>,
    ) -> Result<Live, Refusal> {
        let slot_bytes = v
            .layout
            .regions()
            .iter()
            .map(|r| r.page_size().bytes())
            .max()
            .unwrap_or(4096);
        // A session of the same name that just ended (its VMM hung up, or reconnects right
        // after a refusal) may still be finishing and hold the store for a moment: wait for it
        // briefly rather than refuse a VMM for a race it cannot see.
        let open = || Store::open(&self.config.store_dir, &v.vm, slot_bytes, resume);
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
                message: crate::validate::chain(&e),
            }
        })?;
        let internal = |e: std::io::Error| Refusal {
            code: ErrorCode::Internal,
            message: format!("starting fault service: {e}"),
        };
        let (session, server) = self
            .new_server(v.vm, v.layout, v.regions, v.snapshot, v.uffd)
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
                self.metrics.release(&label, &session);
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

/// Accepts connections until the daemon's cancel token fires; each connection runs in its own
/// task, and every session (Firecracker's too) is ended before this returns.
pub async fn serve(mut listener: UnixSeqpacketListener, daemon: Arc<Daemon>) {
    let cancel = daemon.cancel.clone();
    let tracker = daemon.tracker.clone();
    tracker.spawn(watchdog(daemon.clone(), cancel.clone()));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    let daemon = daemon.clone();
                    let cancel = cancel.clone();
                    tracker.spawn(async move { connection(conn, daemon, cancel).await });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    // EMFILE and friends: back off instead of spinning on the error.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// How long a session thread may stay in a call its VMM can make block before the watchdog
/// interrupts it (see [`crate::session::Watch`]).
const STUCK_LIMIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Interrupts session threads stuck in a VMM-blockable call, until `cancel` fires. Only device
/// doorbells can block, so it ticks only while some VM has a device, and otherwise sleeps
/// (an idle faultd costs no CPU).
async fn watchdog(daemon: Arc<Daemon>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(STUCK_LIMIT / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_tick = std::time::Instant::now();
    let mut running_since = last_tick;
    loop {
        let sessions: Vec<Arc<Session>> = daemon
            .sessions()
            .values()
            .filter(|s| s.has_devices())
            .cloned()
            .collect();
        if sessions.is_empty() {
            // notify_one stores a permit, so an attach between the check and this wait is not
            // missed.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = daemon.device_attached.notified() => continue,
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // A tick far later than asked means faultd did not run meanwhile (SIGSTOP, a frozen
        // cgroup, a starved host): a call that looks long may have been stopped with it.
        // Judge calls only by the time since faultd runs again.
        let now = std::time::Instant::now();
        if now.duration_since(last_tick) > STUCK_LIMIT {
            running_since = now;
        }
        last_tick = now;
        for s in sessions {
            if s.watch.interrupt_if_stuck(STUCK_LIMIT, running_since) {
                tracing::warn!(
                    session = s.id(),
                    vm = s.vm(),
                    "interrupted a session thread blocked by its VMM"
                );
            }
        }
    }
}

/// One packet received from a client.
struct Packet {
    bytes: Vec<u8>,
    fds: Vec<OwnedFd>,
}

enum RecvError {
    Closed,
    Oversize(String),
    Io(std::io::Error),
}

async fn recv_packet(conn: &UnixSeqpacket) -> Result<Packet, RecvError> {
    // One byte more than the limit: a packet that fills it was truncated, i.e. oversize.
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
    let mut anc = vec![0u8; 64 + MAX_FDS * 4];
    let (info, reader) = conn
        .recv_with_ancillary(&mut buf, &mut anc)
        .await
        .map_err(RecvError::Io)?;
    let mut fds = Vec::new();
    let anc_truncated = reader.is_truncated();
    for msg in reader.into_messages() {
        if let OwnedAncillaryMessage::FileDescriptors(owned) = msg {
            fds.extend(owned);
        }
    }
    if info.truncated() || info.bytes_read() > MAX_MESSAGE_BYTES {
        return Err(RecvError::Oversize(format!(
            "message exceeds {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    if anc_truncated || info.ancillary_truncated() {
        return Err(RecvError::Oversize(format!(
            "more than {MAX_FDS} fds attached"
        )));
    }
    if info.bytes_read() == 0 {
        return Err(RecvError::Closed);
    }
    buf.truncate(info.bytes_read());
    Ok(Packet { bytes: buf, fds })
}

async fn send(conn: &UnixSeqpacket, resp: &Response) {
    let bytes = faultd_proto::encode(resp).or_else(|e| {
        // Every request is answered once: a client waiting for an answer that never comes
        // would hang. Answers are bounded to fit (paging); this is the backstop.
        tracing::error!("encoding a response failed: {e}");
        faultd_proto::encode(&Response::Error {
            code: ErrorCode::Internal,
            message: format!("faultd could not encode its answer: {e}"),
        })
    });
    if let Ok(bytes) = bytes {
        // A client that hung up cannot be told anything; that is not faultd's error.
        let _ = conn.send(&bytes).await;
    }
}

/// Refuses a request of a registered VMM, which closes its session. The VMM lives on (it may
/// register again with `resume`), so the session is handed over, not ended with the VM.
async fn refuse_session(
    daemon: &Daemon,
    conn: &UnixSeqpacket,
    code: ErrorCode,
    message: String,
) -> Ending {
    refuse(daemon, conn, code, message).await;
    Ending::Handover
}

/// Hands `cmd` to the session's fault thread. A thread that has stopped cannot serve the
/// session any more: the request is refused and the session closed (the returned ending).
async fn command(
    daemon: &Daemon,
    conn: &UnixSeqpacket,
    thread: &FaultThread,
    cmd: Command,
) -> Result<(), Ending> {
    if thread.send(cmd).is_ok() {
        return Ok(());
    }
    Err(refuse_session(
        daemon,
        conn,
        ErrorCode::Internal,
        "the session's fault service has stopped".into(),
    )
    .await)
}

async fn refuse(daemon: &Daemon, conn: &UnixSeqpacket, code: ErrorCode, message: String) {
    tracing::info!(?code, "refusing client: {message}");
    daemon.metrics.protocol_error(code);
    send(conn, &Response::Error { code, message }).await;
}

fn decode_error(e: CodecError) -> (ErrorCode, String) {
    match e {
        CodecError::Oversize { .. } => (ErrorCode::Oversize, e.to_string()),
        CodecError::Malformed(src) => (ErrorCode::Malformed, format!("malformed message: {src}")),
    }
}

async fn connection(conn: UnixSeqpacket, daemon: Arc<Daemon>, cancel: CancellationToken) {
    let cred = conn.peer_cred().ok();
    let peer_pid = cred.as_ref().and_then(|c| c.pid());
    let mut packet = match recv_request(&daemon, &conn, &cancel).await {
        Some(p) => p,
        None => return,
    };
    // A client that is not a VMM sends any number of admin requests, each answered, until it
    // hangs up (or one is refused).
    loop {
        let admin = match faultd_proto::decode::<Request>(&packet.bytes) {
            Ok(Request::Register(reg)) => {
                return register(conn, reg, packet.fds, peer_pid, daemon, cancel).await
            }
            Ok(Request::FirecrackerListen(listen)) => Admin::Listen(listen),
            Ok(Request::VmStats { vm }) => Admin::VmStats(vm),
            Ok(Request::Status {}) => Admin::Status,
            Ok(Request::Sessions { after }) => Admin::Sessions(after),
            Ok(Request::SessionDetail { target }) => Admin::Detail(target),
            Ok(Request::EvictSession { target, amount }) => Admin::Evict(target, amount),
            Ok(_) => {
                return refuse(
                    &daemon,
                    &conn,
                    ErrorCode::UnexpectedMessage,
                    "the first message must be register (or, from a client that is not a VMM, \
                     firecracker_listen, vm_stats, status, sessions, session_detail or \
                     evict_session)"
                        .into(),
                )
                .await
            }
            Err(e) => {
                let (code, m) = decode_error(e);
                return refuse(&daemon, &conn, code, m).await;
            }
        };
        if !packet.fds.is_empty() {
            return refuse(
                &daemon,
                &conn,
                ErrorCode::BadFd,
                "fds attached to a message that takes none".into(),
            )
            .await;
        }
        let answer = match admin {
            Admin::VmStats(vm) => Ok(Response::VmStats {
                sessions: daemon.stats_of(&vm),
                vm,
            }),
            Admin::Listen(listen) => {
                crate::firecracker::listen_request(&daemon, listen, cred.as_ref()).await
            }
            Admin::Status => Ok(crate::admin::status(&daemon)),
            Admin::Sessions(after) => Ok(crate::admin::sessions(&daemon, after)),
            Admin::Detail(target) => crate::admin::detail(&daemon, &target),
            Admin::Evict(target, amount) => {
                crate::admin::evict(&daemon, &target, amount, cred.as_ref()).await
            }
        };
        match answer {
            Ok(resp) => send(&conn, &resp).await,
            Err(Refusal { code, message }) => return refuse(&daemon, &conn, code, message).await,
        }
        packet = match recv_request(&daemon, &conn, &cancel).await {
            Some(p) => p,
            None => return,
        };
    }
}

/// A request from a client that is not a VMM session.
enum Admin {
    Listen(faultd_proto::FirecrackerListen),
    VmStats(String),
    Status,
    Sessions(Option<u64>),
    Detail(SessionRef),
    Evict(SessionRef, EvictAmount),
}

/// The next packet of a connection; None when it is closed, failed, or was refused (answered).
async fn recv_request(
    daemon: &Daemon,
    conn: &UnixSeqpacket,
    cancel: &CancellationToken,
) -> Option<Packet> {
    let next = tokio::select! {
        _ = cancel.cancelled() => return None,
        p = recv_packet(conn) => p,
    };
    match next {
        Ok(p) => Some(p),
        Err(RecvError::Closed) => None,
        Err(RecvError::Oversize(m)) => {
            refuse(daemon, conn, ErrorCode::Oversize, m).await;
            None
        }
        Err(RecvError::Io(e)) => {
            tracing::debug!("receive failed before registration: {e}");
            None
        }
    }
}

/// Serves a VMM's `register` and then its session until it hangs up.
async fn register(
    conn: UnixSeqpacket,
    reg: faultd_proto::Register,
    fds: Vec<OwnedFd>,
    peer_pid: Option<i32>,
    daemon: Arc<Daemon>,
    cancel: CancellationToken,
) {
    if let Some(why) = daemon.session_limit_reached() {
        return refuse(&daemon, &conn, ErrorCode::Busy, why).await;
    }
    // Validation reads /proc and fstat()s fds: cheap, but blocking; keep it off the reactor.
    let resume = reg.resume;
    let validated = match tokio::task::spawn_blocking(move || validate(&reg, fds, peer_pid)).await {
        Ok(Ok(v)) => v,
        Ok(Err(Refusal { code, message })) => return refuse(&daemon, &conn, code, message).await,
        Err(e) => {
            return refuse(
                &daemon,
                &conn,
                ErrorCode::Internal,
                format!("validation failed: {e}"),
            )
            .await
        }
    };
    // Opening the store and replaying its journal is file I/O: off the reactor.
    let d = daemon.clone();
    let started =
        tokio::task::spawn_blocking(move || d.start_session(validated, resume, peer_pid, None))
            .await;
    let live = match started {
        Ok(Ok(live)) => live,
        Ok(Err(Refusal { code, message })) => return refuse(&daemon, &conn, code, message).await,
        Err(e) => {
            return refuse(
                &daemon,
                &conn,
                ErrorCode::Internal,
                format!("starting fault service: {e}"),
            )
            .await
        }
    };
    daemon.admit(&live.session, &live.thread, peer_pid, SessionKind::Vmm);
    send(
        &conn,
        &Response::Registered {
            session: live.session.id(),
            version: faultd_proto::PROTOCOL_VERSION,
        },
    )
    .await;

    let ending = session_loop(&conn, &live.session, &live.thread, &daemon, &cancel).await;

    daemon.end_session(live, ending).await;
}

/// Serves requests on a registered connection until the VMM hangs up or sends something bad;
/// says how the session ends.
async fn session_loop(
    conn: &UnixSeqpacket,
    session: &Arc<Session>,
    thread: &FaultThread,
    daemon: &Daemon,
    cancel: &CancellationToken,
) -> Ending {
    let config = &daemon.config;
    loop {
        let packet = tokio::select! {
            _ = cancel.cancelled() => return Ending::Handover,
            p = recv_packet(conn) => p,
        };
        let packet = match packet {
            Ok(p) => p,
            Err(RecvError::Closed) => return Ending::VmGone,
            Err(RecvError::Oversize(m)) => {
                return refuse_session(daemon, conn, ErrorCode::Oversize, m).await;
            }
            Err(RecvError::Io(e)) => {
                tracing::debug!(session = session.id(), "receive failed: {e}");
                return Ending::VmGone;
            }
        };
        match faultd_proto::decode::<Request>(&packet.bytes) {
            Ok(Request::Stats {} | Request::Evict { .. }) if !packet.fds.is_empty() => {
                return refuse_session(
                    daemon,
                    conn,
                    ErrorCode::BadFd,
                    "fds attached to a message that takes none".into(),
                )
                .await;
            }
            Ok(Request::Stats {}) => send(conn, &Response::Stats(Box::new(session.stats()))).await,
            Ok(Request::AddDevice(add)) => {
                let (s, granule, max) = (session.clone(), config.granule, config.max_devices);
                let fds = packet.fds;
                let built = tokio::task::spawn_blocking(move || {
                    crate::validate::device(&s, &add, fds, granule, max)
                })
                .await;
                let device = match built {
                    Ok(Ok(d)) => d,
                    Ok(Err(Refusal { code, message })) => {
                        return refuse_session(daemon, conn, code, message).await;
                    }
                    Err(e) => {
                        return refuse_session(
                            daemon,
                            conn,
                            ErrorCode::Internal,
                            format!("attaching: {e}"),
                        )
                        .await;
                    }
                };
                let (dev_id, granule) = (device.dev_id.0, device.mapper.granule());
                if let Err(ending) = command(daemon, conn, thread, Command::AddDevice(device)).await
                {
                    return ending;
                }
                tracing::info!(session = session.id(), dev_id, granule, "device attached");
                daemon.device_attached.notify_one();
                send(conn, &Response::DeviceAdded { dev_id, granule }).await;
            }
            Ok(Request::Register(_)) => {
                return refuse_session(
                    daemon,
                    conn,
                    ErrorCode::UnexpectedMessage,
                    "this connection is registered already".into(),
                )
                .await;
            }
            Ok(Request::Evict {
                gpa,
                len,
                max_pages,
            }) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let cmd = Command::Evict {
                    gpa: s2map::Gpa(gpa),
                    len,
                    max: max_pages.unwrap_or(u64::MAX),
                    reply: tx,
                };
                if let Err(ending) = command(daemon, conn, thread, cmd).await {
                    return ending;
                }
                // The thread evicts between faults; wait for it off the reactor.
                let report = tokio::task::spawn_blocking(move || rx.recv()).await;
                match report {
                    Ok(Ok(r)) => {
                        send(
                            conn,
                            &Response::Evicted {
                                evicted: r.evicted,
                                zero: r.zero,
                                failed: r.failed,
                            },
                        )
                        .await
                    }
                    _ => {
                        return refuse_session(
                            daemon,
                            conn,
                            ErrorCode::Internal,
                            "the session's fault service stopped during eviction".into(),
                        )
                        .await;
                    }
                }
            }
            Ok(
                Request::FirecrackerListen(_)
                | Request::VmStats { .. }
                | Request::Status {}
                | Request::Sessions { .. }
                | Request::SessionDetail { .. }
                | Request::EvictSession { .. },
            ) => {
                return refuse_session(
                    daemon,
                    conn,
                    ErrorCode::UnexpectedMessage,
                    "a VMM session takes register, stats, add_device and evict only".into(),
                )
                .await;
            }
            Err(e) => {
                let (code, m) = decode_error(e);
                return refuse_session(daemon, conn, code, m).await;
            }
        }
    }
}

//! The control socket: accepts VMM connections, turns a valid `register` into a session with a
//! running fault thread, answers `stats`, and ends the session when the VMM hangs up.
//!
//! Every connection is its own task; anything wrong with one (malformed JSON, oversize packets,
//! bad fds, a second `register`) gets an error message and closes that connection only.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use faultd_proto::{CodecError, ErrorCode, Request, Response, MAX_FDS, MAX_MESSAGE_BYTES};
use tokio_seqpacket::ancillary::OwnedAncillaryMessage;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::DaemonMetrics;
use crate::server::{Command, DeviceLimits, FaultServer, FaultThread};
use crate::session::Session;
use crate::validate::{validate, Refusal};
use crate::vcpu::KernelUffd;

/// Daemon-wide state shared by connection tasks.
#[derive(Debug)]
pub struct Daemon {
    config: Config,
    sessions: Mutex<HashMap<u64, Live>>,
    next_id: AtomicU64,
    /// Wakes the watchdog when a device is attached (it sleeps while no VM has one).
    device_attached: tokio::sync::Notify,
    /// Resident guest RAM of all sessions, bytes (for the global budget).
    resident: Arc<AtomicU64>,
    metrics: DaemonMetrics,
}

/// A session being served, with its `vm` metrics label.
#[derive(Debug)]
struct Live {
    session: Arc<Session>,
    label: Arc<str>,
}

impl Daemon {
    /// New daemon state.
    pub fn new(config: Config) -> Arc<Daemon> {
        let metrics = DaemonMetrics::new(config.metrics_vm_labels, config.pin_limit);
        Arc::new(Daemon {
            config,
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            device_attached: tokio::sync::Notify::new(),
            resident: Arc::new(AtomicU64::new(0)),
            metrics,
        })
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions currently served.
    pub fn session_count(&self) -> usize {
        self.sessions().len()
    }

    /// The sessions served now.
    pub fn live_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions()
            .values()
            .map(|l| l.session.clone())
            .collect()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render_metrics(&self) -> String {
        // The table stays locked while counters are read, so a session that ends meanwhile
        // is counted once: live here, or retired (see DaemonMetrics::release).
        let sessions = self.sessions();
        self.metrics
            .render(sessions.values().map(|l| (&*l.label, &*l.session)))
    }

    /// Takes session `id` out of the table and retires its metrics.
    fn end_session(&self, id: u64) {
        let mut sessions = self.sessions();
        if let Some(live) = sessions.remove(&id) {
            self.metrics.release(&live.label, &live.session);
        }
    }
}

/// Accepts connections until `cancel` fires; each connection runs in its own task, and every
/// session is ended before this returns.
pub async fn serve(
    mut listener: UnixSeqpacketListener,
    daemon: Arc<Daemon>,
    cancel: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
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
    loop {
        let sessions: Vec<Arc<Session>> = daemon
            .sessions()
            .values()
            .filter(|l| l.session.has_devices())
            .map(|l| l.session.clone())
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
        for s in sessions {
            if s.watch.interrupt_if_stuck(STUCK_LIMIT) {
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
    match faultd_proto::encode(resp) {
        Ok(bytes) => {
            // A client that hung up cannot be told anything; that is not faultd's error.
            let _ = conn.send(&bytes).await;
        }
        Err(e) => tracing::error!("encoding a response failed: {e}"),
    }
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
    let peer_pid = conn.peer_cred().ok().and_then(|c| c.pid());
    let first = tokio::select! {
        _ = cancel.cancelled() => return,
        p = recv_packet(&conn) => p,
    };
    let packet = match first {
        Ok(p) => p,
        Err(RecvError::Closed) => return,
        Err(RecvError::Oversize(m)) => return refuse(&daemon, &conn, ErrorCode::Oversize, m).await,
        Err(RecvError::Io(e)) => {
            tracing::debug!("receive failed before registration: {e}");
            return;
        }
    };
    let reg = match faultd_proto::decode::<Request>(&packet.bytes) {
        Ok(Request::Register(reg)) => reg,
        Ok(_) => {
            return refuse(
                &daemon,
                &conn,
                ErrorCode::UnexpectedMessage,
                "the first message must be register".into(),
            )
            .await
        }
        Err(e) => {
            let (code, m) = decode_error(e);
            return refuse(&daemon, &conn, code, m).await;
        }
    };
    if daemon.session_count() >= daemon.config.max_sessions {
        return refuse(
            &daemon,
            &conn,
            ErrorCode::Busy,
            format!(
                "faultd serves its limit of {} sessions",
                daemon.config.max_sessions
            ),
        )
        .await;
    }
    // Validation reads /proc and fstat()s fds: cheap, but blocking; keep it off the reactor.
    let validated = match tokio::task::spawn_blocking(move || validate(&reg, packet.fds, peer_pid))
        .await
    {
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
    let id = daemon.next_id.fetch_add(1, Ordering::Relaxed);
    let session = Arc::new(Session::new(
        id,
        validated.vm,
        validated.layout,
        validated.regions,
        validated.snapshot,
    ));
    // The watchdog looks at the uffd through a duplicate (to see faults waiting); without one
    // it judges the thread by its progress alone.
    match validated.uffd.try_clone() {
        Ok(dup) => session.watch.set_source(dup),
        Err(e) => tracing::warn!(session = id, "duplicating the userfaultfd: {e}"),
    }
    let label = daemon.metrics.acquire_label(session.vm());
    let thread = match KernelUffd::new(validated.uffd, daemon.config.batch).and_then(|ops| {
        FaultThread::spawn(
            FaultServer::new(
                session.clone(),
                ops,
                daemon.config.batch,
                DeviceLimits {
                    pin_limit: daemon.config.pin_limit,
                    deadline: daemon.config.device_deadline,
                },
            )
            .with_store_dir(daemon.config.store_dir.clone())
            .with_budget(daemon.config.budget, daemon.resident.clone())
            .with_metrics(daemon.metrics.session(&label)),
            daemon.config.spin,
        )
    }) {
        Ok(t) => t,
        Err(e) => {
            daemon.metrics.release(&label, &session);
            return refuse(
                &daemon,
                &conn,
                ErrorCode::Internal,
                format!("starting fault service: {e}"),
            )
            .await;
        }
    };
    daemon.sessions().insert(
        id,
        Live {
            session: session.clone(),
            label,
        },
    );
    tracing::info!(
        session = id,
        vm = session.vm(),
        guest_bytes = session.layout().total_bytes(),
        regions = session.layout().regions().len(),
        "session registered"
    );
    send(
        &conn,
        &Response::Registered {
            session: id,
            version: faultd_proto::PROTOCOL_VERSION,
        },
    )
    .await;

    session_loop(&conn, &session, &thread, &daemon, &cancel).await;

    // Joining waits for the thread to finish what it is doing (the watchdog bounds that);
    // never on the reactor, which serves every other session's control requests.
    let _ = tokio::task::spawn_blocking(move || thread.stop()).await;
    daemon.end_session(id);
    let stats = session.stats();
    tracing::info!(
        session = id,
        vm = session.vm(),
        faults = stats.vcpu_faults,
        resident_bytes = stats.resident_bytes,
        errors = stats.errors,
        "session ended"
    );
}

/// Serves requests on a registered connection until the VMM hangs up or sends something bad.
async fn session_loop(
    conn: &UnixSeqpacket,
    session: &Arc<Session>,
    thread: &FaultThread,
    daemon: &Daemon,
    cancel: &CancellationToken,
) {
    let config = &daemon.config;
    loop {
        let packet = tokio::select! {
            _ = cancel.cancelled() => return,
            p = recv_packet(conn) => p,
        };
        let packet = match packet {
            Ok(p) => p,
            Err(RecvError::Closed) => return,
            Err(RecvError::Oversize(m)) => {
                return refuse(daemon, conn, ErrorCode::Oversize, m).await
            }
            Err(RecvError::Io(e)) => {
                tracing::debug!(session = session.id(), "receive failed: {e}");
                return;
            }
        };
        match faultd_proto::decode::<Request>(&packet.bytes) {
            Ok(Request::Stats {}) if !packet.fds.is_empty() => {
                return refuse(
                    daemon,
                    conn,
                    ErrorCode::BadFd,
                    "fds attached to a message that takes none".into(),
                )
                .await
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
                        return refuse(daemon, conn, code, message).await
                    }
                    Err(e) => {
                        return refuse(daemon, conn, ErrorCode::Internal, format!("attaching: {e}"))
                            .await
                    }
                };
                let (dev_id, granule) = (device.dev_id.0, device.mapper.granule());
                if thread.send(Command::AddDevice(device)).is_err() {
                    return refuse(
                        daemon,
                        conn,
                        ErrorCode::Internal,
                        "the session's fault service has stopped".into(),
                    )
                    .await;
                }
                tracing::info!(session = session.id(), dev_id, granule, "device attached");
                daemon.device_attached.notify_one();
                send(conn, &Response::DeviceAdded { dev_id, granule }).await;
            }
            Ok(Request::Register(_)) => {
                return refuse(
                    daemon,
                    conn,
                    ErrorCode::UnexpectedMessage,
                    "this connection is registered already".into(),
                )
                .await
            }
            Ok(Request::Evict { .. }) if !packet.fds.is_empty() => {
                return refuse(
                    daemon,
                    conn,
                    ErrorCode::BadFd,
                    "fds attached to a message that takes none".into(),
                )
                .await
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
                if thread.send(cmd).is_err() {
                    return refuse(
                        daemon,
                        conn,
                        ErrorCode::Internal,
                        "the session's fault service has stopped".into(),
                    )
                    .await;
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
                        return refuse(
                            daemon,
                            conn,
                            ErrorCode::Internal,
                            "the session's fault service stopped during eviction".into(),
                        )
                        .await
                    }
                }
            }
            Err(e) => {
                let (code, m) = decode_error(e);
                return refuse(daemon, conn, code, m).await;
            }
        }
    }
}

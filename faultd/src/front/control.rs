//! The control socket: accepts VMM connections, turns a valid `register` into a session with a
//! running fault thread, answers `stats`, and ends the session when the VMM hangs up. It also
//! answers clients that are not VMMs: `firecracker_listen` (see [`crate::front::firecracker`]),
//! `vm_stats`, and the operator requests of [`crate::front::admin`].
//!
//! Every connection is its own task; anything wrong with one (malformed JSON, oversize packets,
//! bad fds, a second `register`) gets an error message and closes that connection only.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use faultd_proto::{
    CodecError, ErrorCode, EvictAmount, Request, Response, SessionKind, SessionRef, MAX_FDS,
    MAX_MESSAGE_BYTES,
};
use tokio_seqpacket::ancillary::OwnedAncillaryMessage;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tokio_util::sync::CancellationToken;

use crate::daemon::{Daemon, Ending, Opening};
use crate::engine::session::Session;
use crate::engine::{Command, FaultThread};
use crate::front::validate::{validate, Refusal};

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
/// interrupts it (see [`crate::engine::session::Watch`]).
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
                let peer_uid = cred.as_ref().map(|c| c.uid());
                return register(conn, reg, packet.fds, peer_pid, peer_uid, daemon, cancel).await;
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
        let caller = crate::front::admin::Caller::of(cred.as_ref());
        let answer = match admin {
            Admin::VmStats(vm) => crate::front::admin::vm_stats(&daemon, vm, caller),
            Admin::Listen(listen) => {
                crate::front::firecracker::listen_request(&daemon, listen, cred.as_ref()).await
            }
            Admin::Status => Ok(crate::front::admin::status(&daemon)),
            Admin::Sessions(after) => Ok(crate::front::admin::sessions(&daemon, after, caller)),
            Admin::Detail(target) => crate::front::admin::detail(&daemon, &target, caller),
            Admin::Evict(target, amount) => {
                crate::front::admin::evict(&daemon, &target, amount, cred.as_ref()).await
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
    peer_uid: Option<u32>,
    daemon: Arc<Daemon>,
    cancel: CancellationToken,
) {
    // The VM and its store will be this uid's: without it, nobody could be told apart.
    let Some(owner) = peer_uid else {
        return refuse(
            &daemon,
            &conn,
            ErrorCode::Internal,
            "the kernel did not tell the client's uid (SO_PEERCRED), which owns its VM".into(),
        )
        .await;
    };
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
    let started = tokio::task::spawn_blocking(move || {
        let open = if resume {
            Opening::Resume
        } else {
            Opening::Fresh
        };
        d.start_session(validated, owner, open, peer_pid, None)
    })
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
                    crate::front::validate::device(&s, &add, fds, granule, max)
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

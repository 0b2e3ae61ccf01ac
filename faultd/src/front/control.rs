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
use crate::front::validate::{handed_files, validate, Refusal};
use crate::ops::config::Limit;

/// Accepts connections until the daemon's cancel token fires; each connection runs in its own
/// task, and every session (Firecracker's too) is ended before this returns.
pub async fn serve(mut listener: UnixSeqpacketListener, daemon: Arc<Daemon>) {
    let cancel = daemon.cancel.clone();
    let tracker = daemon.tracker.clone();
    tracker.spawn(watchdog(daemon.clone(), cancel.clone()));
    let mut refused = Refused::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    // Past a cap the connection is closed at once: it never holds an fd for
                    // long, so a flood cannot run the listener out of them. A peer the kernel
                    // does not name counts as one uid of its own (u32::MAX, no real uid).
                    let uid = conn.peer_cred().map_or(u32::MAX, |c| c.uid());
                    let slot = match daemon.admit_connection(uid) {
                        Ok(slot) => slot,
                        Err((limit, max)) => {
                            over_connection_limit(&daemon, conn, uid, limit, max, &mut refused);
                            continue;
                        }
                    };
                    let daemon = daemon.clone();
                    let cancel = cancel.clone();
                    tracker.spawn(async move {
                        connection(conn, daemon, cancel).await;
                        drop(slot);
                    });
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

/// Connections refused over the connection limit, logged at most once a second.
#[derive(Default)]
struct Refused {
    since_log: u64,
    logged: Option<std::time::Instant>,
}

/// Refuses a connection of `uid` over a connection limit: counted, told why (a non-blocking
/// send on a fresh socket), closed; logged at most once a second with how many were refused.
fn over_connection_limit(
    daemon: &Daemon,
    conn: UnixSeqpacket,
    uid: u32,
    limit: Limit,
    max: usize,
    refused: &mut Refused,
) {
    let whose = match limit {
        Limit::ConnectionsPerUid => format!("uid {uid} has"),
        _ => "faultd has".to_owned(),
    };
    let Refusal { code, message } =
        daemon.limit_reached(limit, max, format!("{whose} {max} connections open"));
    refused.since_log += 1;
    let now = std::time::Instant::now();
    if refused
        .logged
        .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
    {
        tracing::warn!(
            refused = refused.since_log,
            "refusing connections: {message}"
        );
        refused.since_log = 0;
        refused.logged = Some(now);
    }
    if let Ok(bytes) = faultd_proto::encode(&Response::Error { code, message }) {
        // A full or closed socket is not worth waiting for: it is closed either way.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = conn.poll_send(&mut cx, &bytes);
    }
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
    /// A packet of zero bytes (not the peer hanging up): no message at all.
    Empty,
    Oversize(String),
    Io(std::io::Error),
}

async fn recv_packet(conn: &UnixSeqpacket) -> Result<Packet, RecvError> {
    // One byte more than the limit: a packet that fills it was truncated, i.e. oversize.
    let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
    // Room for every fd the kernel lets one message carry (SCM_MAX_FD), so that a packet with
    // more than MAX_FDS is seen, counted and refused, not cut short.
    let mut anc = vec![0u8; 64 + SCM_MAX_FD * 4];
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
    if fds.len() > MAX_FDS {
        return Err(RecvError::Oversize(format!(
            "{} fds attached; a message carries at most {MAX_FDS}",
            fds.len()
        )));
    }
    if info.bytes_read() == 0 {
        // A hang-up and a zero-length packet both read as 0 bytes; only a hang-up leaves the
        // socket shut down for reading. (A zero-length packet sent just before hanging up
        // reads as the hang-up: the VMM closed the session either way.)
        return Err(if fds.is_empty() && peer_hung_up(conn) {
            RecvError::Closed
        } else {
            RecvError::Empty
        });
    }
    buf.truncate(info.bytes_read());
    Ok(Packet { bytes: buf, fds })
}

/// Most fds one `SCM_RIGHTS` message can carry (include/net/scm.h): a sender cannot attach
/// more.
const SCM_MAX_FD: usize = 253;

/// Whether the peer of `conn` has shut the connection down (closed it or exited).
fn peer_hung_up(conn: &UnixSeqpacket) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    // POLLHUP is reported whether asked for or not, once the peer has closed its end (and
    // with it POLLRDHUP, were that asked for: nix cannot name it, and revents() with a bit it
    // cannot name is None, which read every hang-up as a zero-length packet). A zero-length
    // packet from a live peer shows POLLIN alone.
    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::empty())];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
        // Cannot tell: take it as the hang-up it nearly always is.
        Err(_) => true,
    }
}

/// What a zero-length packet is told.
const EMPTY_PACKET: &str = "zero-length packet: every message is one JSON object";

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
    session: &Session,
    conn: &UnixSeqpacket,
    code: ErrorCode,
    message: String,
) -> Ending {
    // Ending before the VMM hears it: a VMM that registers again at once is then waited for
    // (the name is ending), not refused as if the session were still live.
    daemon.begin_ending(session);
    refuse(daemon, conn, code, message).await;
    Ending::Handover
}

/// Hands `cmd` to the session's fault thread. A thread that has stopped cannot serve the
/// session any more: the request is refused and the session closed (the returned ending).
async fn command(
    daemon: &Daemon,
    session: &Session,
    conn: &UnixSeqpacket,
    thread: &FaultThread,
    cmd: Command,
) -> Result<(), Ending> {
    if thread.send(cmd).is_ok() {
        return Ok(());
    }
    Err(refuse_session(
        daemon,
        session,
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
    let mut packet = match recv_before_deadline(&daemon, &conn, &cancel).await {
        Some(p) => p,
        None => return,
    };
    // This connection's working-set export and import, if any: dropped (a staged import
    // removed) whenever the connection ends, however it ends.
    let mut transfer = crate::front::admin::WsTransfer::default();
    // A client that is not a VMM sends any number of admin requests, each answered, until it
    // hangs up (or one is refused).
    loop {
        let admin = match faultd_proto::decode::<Request>(&packet.bytes) {
            Ok(Request::Register(reg)) => {
                let Some(uid) = cred.as_ref().map(|c| c.uid()) else {
                    return refuse(
                        &daemon,
                        &conn,
                        ErrorCode::Internal,
                        "the kernel did not say who the peer is (SO_PEERCRED)".into(),
                    )
                    .await;
                };
                let peer = Peer { uid, pid: peer_pid };
                return register(conn, reg, packet.fds, peer, daemon, cancel).await;
            }
            Ok(Request::FirecrackerListen(listen)) => Admin::Listen(listen),
            Ok(Request::VmStats { vm }) => Admin::VmStats(vm),
            Ok(Request::Status {}) => Admin::Status,
            Ok(Request::Sessions { after }) => Admin::Sessions(after),
            Ok(Request::SessionDetail { target }) => Admin::Detail(target),
            Ok(Request::EvictSession { target, amount }) => Admin::Evict(target, amount),
            Ok(Request::FirecrackerUnlisten { vm }) => Admin::Unlisten(vm),
            Ok(
                r @ (Request::WorkingSetList { .. }
                | Request::WorkingSetExport { .. }
                | Request::WorkingSetImport { .. }
                | Request::WorkingSetRemove { .. }),
            ) => Admin::WorkingSet(r),
            Ok(_) => {
                return refuse(
                    &daemon,
                    &conn,
                    ErrorCode::UnexpectedMessage,
                    "the first message must be register (or, from a client that is not a VMM, \
                     firecracker_listen, vm_stats, status, sessions, session_detail, \
                     evict_session, firecracker_unlisten or working_set_*)"
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
            Admin::Unlisten(vm) => {
                crate::front::firecracker::unlisten_request(&daemon, vm, caller).await
            }
            Admin::WorkingSet(request) => {
                // File reads, hashing and decoding up to a recording's size: off the reactor.
                let d = daemon.clone();
                let uid = cred.as_ref().map(|c| c.uid());
                let mut t = std::mem::take(&mut transfer);
                match tokio::task::spawn_blocking(move || {
                    let answer = crate::front::admin::working_set(&d, request, caller, uid, &mut t);
                    (answer, t)
                })
                .await
                {
                    Ok((answer, t)) => {
                        transfer = t;
                        answer
                    }
                    Err(e) => Err(Refusal {
                        code: ErrorCode::Internal,
                        message: format!("serving a working-set request: {e}"),
                    }),
                }
            }
        };
        match answer {
            Ok(resp) => send(&conn, &resp).await,
            Err(Refusal { code, message }) => return refuse(&daemon, &conn, code, message).await,
        }
        packet = match recv_before_deadline(&daemon, &conn, &cancel).await {
            Some(p) => p,
            None => return,
        };
    }
}

/// The outcome of a blocking step of a registration: its own refusal, or `Internal` naming
/// `what` if its task failed (panicked or was cancelled).
fn joined<T>(
    result: Result<Result<T, Refusal>, tokio::task::JoinError>,
    what: &str,
) -> Result<T, Refusal> {
    result.unwrap_or_else(|e| {
        Err(Refusal {
            code: ErrorCode::Internal,
            message: format!("{what}: {e}"),
        })
    })
}

/// How long a registration waits for its uffd and memory files to be released by a session
/// that is ending (see [`register`]).
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Who is on the other end of a connection, as the kernel says (SO_PEERCRED).
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    pid: Option<i32>,
}

/// The next request of a connection that is not a registered VMM: as [`recv_request`], and
/// closed (answered, counted) if none comes within `limits.handshake`.
async fn recv_before_deadline(
    daemon: &Daemon,
    conn: &UnixSeqpacket,
    cancel: &CancellationToken,
) -> Option<Packet> {
    let deadline = daemon.config.limits.handshake;
    match tokio::time::timeout(deadline, recv_request(daemon, conn, cancel)).await {
        Ok(p) => p,
        Err(_) => {
            let Refusal { code, message } = daemon.limit_reached(
                Limit::Handshake,
                deadline.as_millis(),
                "no request came in time; closing the connection".into(),
            );
            refuse(daemon, conn, code, message).await;
            None
        }
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
    Unlisten(String),
    WorkingSet(Request),
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
        Err(RecvError::Empty) => {
            refuse(daemon, conn, ErrorCode::Malformed, EMPTY_PACKET.into()).await;
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
    peer: Peer,
    daemon: Arc<Daemon>,
    cancel: CancellationToken,
) {
    // The VM and its store will be this uid's (names are per owner).
    let owner = peer.uid;
    if let Some(why) = daemon.session_limit_reached() {
        return refuse(&daemon, &conn, ErrorCode::Busy, why).await;
    }
    // The limits first, before anything is read, opened or built: a flood is refused here,
    // cheaply, and what it took is given back when `admission` drops.
    let peer_pid = peer.pid;
    let admitted = daemon.admit_uid(peer.uid).and_then(|mut admission| {
        let guest = reg
            .regions
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.size))
            .unwrap_or(u64::MAX);
        daemon.admit_guest(&mut admission, guest)?;
        Ok(admission)
    });
    let admission = match admitted {
        Ok(a) => a,
        Err(Refusal { code, message }) => return refuse(&daemon, &conn, code, message).await,
    };
    // An owner's VM name has one session at a time: refused at once while it is live; an ending one is
    // waited for, briefly and without a thread.
    if let Err(Refusal { code, message }) = daemon.name_free(owner, &reg.vm).await {
        return refuse(&daemon, &conn, code, message).await;
    }
    // A snapshot object: the config must let this uid read that key (faultd reads it with
    // its own credentials), and a HEAD pins its version before anything else is done with it.
    let object = match &reg.object {
        Some(name) => match open_object(&daemon, name, &reg, peer.uid).await {
            Ok(v) => Some(v),
            Err(Refusal { code, message }) => return refuse(&daemon, &conn, code, message).await,
        },
        None => None,
    };
    let object_len = object.as_ref().map(|o| o.size());
    // Validation reads /proc and fstat()s fds: cheap, but blocking; keep it off the reactor.
    // The uffd and guest RAM files are claimed for this session until it has ended (the claims
    // drop after end_session), so no other live session can be handed them.
    let resume = reg.resume;
    let checked = tokio::task::spawn_blocking(move || {
        let files = handed_files(&reg, &fds);
        let validated = validate(&reg, fds, peer_pid, object_len)?;
        Ok::<_, Refusal>((validated, files))
    })
    .await;
    let (mut validated, files) = match joined(checked, "validation failed") {
        Ok(v) => v,
        Err(Refusal { code, message }) => return refuse(&daemon, &conn, code, message).await,
    };
    validated.object = object;
    // The claims of a session that is just ending go a moment after its name does: a VMM
    // registering again with the same fds waits for them briefly, here on the reactor (a
    // sleep between tries, no thread held per waiter).
    let claim_until = tokio::time::Instant::now() + CLAIM_WAIT;
    let _claims = loop {
        match daemon.claim(&files) {
            Ok(claims) => break claims,
            Err(_) if tokio::time::Instant::now() < claim_until => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await
            }
            Err(Refusal { code, message }) => return refuse(&daemon, &conn, code, message).await,
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
    let live = match joined(started, "starting fault service") {
        Ok(live) => live,
        Err(Refusal { code, message }) => return refuse(&daemon, &conn, code, message).await,
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
    drop(admission);
}

/// Opens the snapshot object a registration named, for a peer of uid `uid`: refused unless a
/// store of that name is configured and lets `uid` read that key, and unless every
/// snapshot-backed page lies within one chunk.
async fn open_object(
    daemon: &Daemon,
    name: &faultd_proto::ObjectName,
    reg: &faultd_proto::Register,
    uid: u32,
) -> Result<Arc<objstore::ObjectVersion>, Refusal> {
    let Some(service) = daemon.objects.as_ref() else {
        return Err(Refusal {
            code: ErrorCode::BackingFailed,
            message: "register named a snapshot object, but faultd has no object store \
                      configured ([[object_store.stores]])"
                .into(),
        });
    };
    let chunk = daemon.config.object_store.chunk_bytes;
    if let Some(n) = reg.regions.iter().position(|r| {
        matches!(r.backing, faultd_proto::BackingDesc::Snapshot { .. }) && r.page_size > chunk
    }) {
        return Err(Refusal {
            code: ErrorCode::BadLayout,
            message: format!(
                "regions[{n}]: pages of {} bytes are larger than the object chunk ({chunk} bytes)",
                reg.regions[n].page_size
            ),
        });
    }
    use crate::engine::objects::ObjectRefusal;
    service
        .open_for(&name.store, &name.key, uid)
        .await
        .map_err(|e| {
            let code = match e {
                ObjectRefusal::UnknownStore(_) => ErrorCode::BadRequest,
                ObjectRefusal::Forbidden(_) => ErrorCode::Forbidden,
                ObjectRefusal::Open(_) => ErrorCode::BackingFailed,
            };
            Refusal {
                code,
                message: crate::ops::logging::chain(&e),
            }
        })
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
            // The snapshot object could not be read: the VMM hears it now, unasked.
            _ = session.failed.notified() => {
                let why = session.failure().unwrap_or("the session failed").to_owned();
                return refuse_session(daemon, session, conn, ErrorCode::BackingFailed, why).await;
            }
            p = recv_packet(conn) => p,
        };
        let packet = match packet {
            Ok(p) => p,
            Err(RecvError::Closed) => return Ending::VmGone,
            Err(RecvError::Oversize(m)) => {
                return refuse_session(daemon, session, conn, ErrorCode::Oversize, m).await;
            }
            // Malformed, not a hang-up: the VMM lives, and so does its store.
            Err(RecvError::Empty) => {
                return refuse_session(
                    daemon,
                    session,
                    conn,
                    ErrorCode::Malformed,
                    EMPTY_PACKET.into(),
                )
                .await;
            }
            Err(RecvError::Io(e)) => {
                tracing::debug!(session = session.id(), "receive failed: {e}");
                return Ending::VmGone;
            }
        };
        match faultd_proto::decode::<Request>(&packet.bytes) {
            Ok(
                Request::Stats {}
                | Request::Evict { .. }
                | Request::Finish {}
                | Request::RemoveDevice { .. },
            ) if !packet.fds.is_empty() => {
                return refuse_session(
                    daemon,
                    session,
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
                let crate::front::validate::Built { device, pin } = match built {
                    Ok(Ok(d)) => d,
                    Ok(Err(Refusal { code, message })) => {
                        return refuse_session(daemon, session, conn, code, message).await;
                    }
                    Err(e) => {
                        return refuse_session(
                            daemon,
                            session,
                            conn,
                            ErrorCode::Internal,
                            format!("attaching: {e}"),
                        )
                        .await;
                    }
                };
                let (dev_id, granule) = (device.dev_id.0, device.mapper.granule());
                if let Some(ranges) = pin {
                    // Pinned: the thread fills and maps every range first, between faults.
                    let (tx, rx) = std::sync::mpsc::channel();
                    let cmd = Command::PinDevice {
                        device,
                        ranges,
                        reply: tx,
                    };
                    if let Err(ending) = command(daemon, session, conn, thread, cmd).await {
                        return ending;
                    }
                    let pinned = tokio::task::spawn_blocking(move || rx.recv()).await;
                    match pinned {
                        Ok(Ok(Ok(bytes))) => {
                            tracing::info!(session = session.id(), dev_id, bytes, "pinned device")
                        }
                        Ok(Ok(Err(e))) => {
                            // Nothing is left mapped: the session goes on without the device.
                            let code = match e {
                                crate::engine::pinned::PinError::PinLimit { .. }
                                | crate::engine::pinned::PinError::PinTotal { .. }
                                | crate::engine::pinned::PinError::Budget { .. } => {
                                    ErrorCode::PinLimit
                                }
                                _ => ErrorCode::Internal,
                            };
                            refuse(daemon, conn, code, format!("pinned device {dev_id}: {e}"))
                                .await;
                            continue;
                        }
                        _ => {
                            return refuse_session(
                                daemon,
                                session,
                                conn,
                                ErrorCode::Internal,
                                "the session's fault service has stopped".into(),
                            )
                            .await;
                        }
                    }
                } else if let Err(ending) =
                    command(daemon, session, conn, thread, Command::AddDevice(device)).await
                {
                    return ending;
                }
                tracing::info!(session = session.id(), dev_id, granule, "device attached");
                daemon.device_attached.notify_one();
                send(conn, &Response::DeviceAdded { dev_id, granule }).await;
            }
            Ok(Request::RemoveDevice { dev_id }) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let cmd = Command::RemoveDevice { dev_id, reply: tx };
                if let Err(ending) = command(daemon, session, conn, thread, cmd).await {
                    return ending;
                }
                match tokio::task::spawn_blocking(move || rx.recv()).await {
                    Ok(Ok(Some(unmapped_bytes))) => {
                        tracing::info!(
                            session = session.id(),
                            dev_id,
                            unmapped_bytes,
                            "device removed"
                        );
                        send(
                            conn,
                            &Response::DeviceRemoved {
                                dev_id,
                                unmapped_bytes,
                            },
                        )
                        .await
                    }
                    Ok(Ok(None)) => {
                        let m = format!("remove_device: no device {dev_id} is attached");
                        refuse(daemon, conn, ErrorCode::BadRequest, m).await;
                    }
                    _ => {
                        return refuse_session(
                            daemon,
                            session,
                            conn,
                            ErrorCode::Internal,
                            "the session's fault service stopped during remove_device".into(),
                        )
                        .await;
                    }
                }
            }
            Ok(Request::Register(_)) => {
                return refuse_session(
                    daemon,
                    session,
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
                if let Err(ending) = command(daemon, session, conn, thread, cmd).await {
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
                            session,
                            conn,
                            ErrorCode::Internal,
                            "the session's fault service stopped during eviction".into(),
                        )
                        .await;
                    }
                }
            }
            Ok(Request::Finish {}) => {
                let (tx, rx) = std::sync::mpsc::channel();
                if let Err(ending) =
                    command(daemon, session, conn, thread, Command::Finish { reply: tx }).await
                {
                    return ending;
                }
                // The thread fills pages between faults; wait for it off the reactor.
                match tokio::task::spawn_blocking(move || rx.recv()).await {
                    Ok(Ok(r)) => {
                        tracing::info!(
                            session = session.id(),
                            filled = r.filled,
                            remaining = r.remaining,
                            "finish: pages restored from their backing"
                        );
                        send(
                            conn,
                            &Response::Finished {
                                filled: r.filled,
                                remaining: r.remaining,
                            },
                        )
                        .await
                    }
                    _ => {
                        return refuse_session(
                            daemon,
                            session,
                            conn,
                            ErrorCode::Internal,
                            "the session's fault service stopped during finish".into(),
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
                | Request::EvictSession { .. }
                | Request::FirecrackerUnlisten { .. }
                | Request::WorkingSetList { .. }
                | Request::WorkingSetExport { .. }
                | Request::WorkingSetImport { .. }
                | Request::WorkingSetRemove { .. },
            ) => {
                return refuse_session(
                    daemon,
                    session,
                    conn,
                    ErrorCode::UnexpectedMessage,
                    "a VMM session takes register, stats, add_device, remove_device, evict and finish \
                     only".into(),
                )
                .await;
            }
            Err(e) => {
                let (code, m) = decode_error(e);
                return refuse_session(daemon, session, conn, code, m).await;
            }
        }
    }
}

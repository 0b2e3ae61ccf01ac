//! `faultd ctl ...`: requests to a running faultd from the command line, through its control
//! socket (the same protocol any client speaks, as `faultd-client` speaks it).
//!
//! Owns: the operator's commands, parsing their sizes, ranges and timeouts, the connection
//! (bounded waits, telling "not running" from "not faultd"), and printing answers as aligned
//! tables, or with `--json` as the protocol's own answer objects whole (their field names are
//! the protocol's, documented in docs/protocol.md, so they stay stable). Refuses: anything
//! faultd decides (which session, what is evictable); faultd's refusals are printed as they
//! come.
//!
//! The connection is made here rather than with `faultd_client::Client`: bounding the connect
//! and every answer needs socket options on the socket before it connects, and telling a
//! socket of another kind or a peer speaking another protocol from faultd needs the raw errno
//! and the raw answer, which the VMM-facing client does not expose.

use std::fmt::Write as _;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use faultd_proto::{
    CodecError, DaemonStatus, ErrorCode, EvictAmount, FirecrackerListen, LatencySummary, Request,
    Response, SessionDetail, SessionEvicted, SessionKind, SessionRef, SessionRow,
    MAX_MESSAGE_BYTES,
};
use nix::sys::socket::{
    connect, recv, send, setsockopt, sockopt, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr,
};
use nix::sys::time::TimeVal;
use sha2::Digest as _;

/// Exit status: the request was answered and the answer printed.
pub const EXIT_DONE: u8 = 0;
/// Exit status: faultd refused the request, or talking to it failed otherwise.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: a usage error (clap's), or a configuration that does not load.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: faultd is not running (nothing to ask, as opposed to asked and refused).
pub const EXIT_NOT_RUNNING: u8 = 3;
/// Exit status: the VM belongs to another user (`forbidden`).
pub const EXIT_FORBIDDEN: u8 = 4;
/// Exit status: no connection or no answer within the timeout.
pub const EXIT_TIMED_OUT: u8 = 5;
/// Exit status: something is at the path, but it is not a faultd control socket.
pub const EXIT_NOT_FAULTD: u8 = 6;

/// Every exit status of `faultd ctl` with what it means, as `faultd ctl --help` lists them.
pub const EXIT_STATUSES: [(u8, &str); 7] = [
    (
        EXIT_DONE,
        "done (also when standard output is closed early, as by `| head`)",
    ),
    (
        EXIT_FAILED,
        "faultd refused the request (the message says why) or talking to it failed",
    ),
    (
        EXIT_USAGE,
        "usage error, or a configuration that does not load",
    ),
    (
        EXIT_NOT_RUNNING,
        "faultd is not running: no socket at the path, or nothing accepts connections on it",
    ),
    (EXIT_FORBIDDEN, "the VM belongs to another user (forbidden)"),
    (
        EXIT_TIMED_OUT,
        "timed out connecting (--connect-timeout) or waiting for an answer (--timeout)",
    ),
    (
        EXIT_NOT_FAULTD,
        "not a faultd control socket: a file that is not a socket, a socket of another type, \
         or a peer answering something other than faultd's protocol",
    ),
];

/// The "Exit status" section of `faultd ctl --help`, from [`EXIT_STATUSES`].
pub fn exit_status_help() -> String {
    let mut text = String::from("Exit status:");
    for (code, what) in EXIT_STATUSES {
        let _ = write!(text, "\n  {code}  {what}");
    }
    text
}

/// Default of `--connect-timeout`: a faultd that is up accepts at once; its backlog stays full
/// only when it is stuck or flooded.
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
/// Default of `--timeout`: status and stats answer in milliseconds; an eviction of many GiB to
/// a slow disk is the slowest answer, and may need longer.
pub const DEFAULT_ANSWER_TIMEOUT: &str = "30s";
/// Longest timeout taken.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `faultd ctl`'s own flags and its command.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// Print faultd's answer as JSON: the protocol's answer object whole, as docs/protocol.md
    /// shows it, instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// How long to wait for faultd to accept the connection, e.g. 500ms, 5s, 1m.
    #[arg(long, global = true, value_name = "DURATION", default_value = DEFAULT_CONNECT_TIMEOUT,
          value_parser = parse_timeout)]
    pub connect_timeout: Duration,
    /// How long to wait for each answer, e.g. 500ms, 30s, 5m (a request already sent may still
    /// complete in faultd after ctl gave up waiting).
    #[arg(long, global = true, value_name = "DURATION", default_value = DEFAULT_ANSWER_TIMEOUT,
          value_parser = parse_timeout)]
    pub timeout: Duration,
    /// The request.
    #[command(subcommand)]
    pub request: CtlCommand,
}

/// A request to a running faultd.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// Serve Firecracker snapshot restores of a VM: faultd creates the socket BACKEND_PATH (give
    /// Firecracker the same path as the Uffd mem_backend's backend_path) and fills pages from
    /// SNAPSHOT, or from the object OBJECT_KEY of the object store OBJECT_STORE.
    FirecrackerListen {
        /// VM name for logs and stats.
        #[arg(long)]
        vm: String,
        /// The socket faultd creates and Firecracker connects to (relative paths are taken from
        /// this command's directory).
        #[arg(long = "backend-path", value_name = "BACKEND_PATH")]
        socket: PathBuf,
        /// The memory snapshot file.
        #[arg(long, required_unless_present = "object_store")]
        snapshot: Option<PathBuf>,
        /// Instead of --snapshot: the object store (its name in faultd's config) holding the
        /// memory snapshot.
        #[arg(long, requires = "object_key", conflicts_with = "snapshot")]
        object_store: Option<String>,
        /// The memory snapshot's key in --object-store.
        #[arg(long, requires = "object_store")]
        object_key: Option<String>,
        /// Admit only processes of this uid (the socket is handed to it).
        #[arg(long)]
        uid: Option<u32>,
        /// Admit only this process.
        #[arg(long)]
        pid: Option<i32>,
    },
    /// Stop serving a Firecracker listener: faultd removes its socket (restores already
    /// served go on until their VMs are gone) and no longer listens on it after a restart.
    FirecrackerUnlisten {
        /// The listener's name (its --vm).
        name: String,
    },
    /// Daemon-wide figures: version, uptime, sessions, resident memory against the global
    /// budget, the store, devices, Firecracker listeners.
    Status,
    /// One line per live session: id, VM, kind, VMM pid, memory, faults, p99 latency.
    Sessions,
    /// The counters of one VM's live sessions, or of one session: fills, latency percentiles,
    /// memory, evictions, devices.
    Stats {
        #[command(flatten)]
        target: Target,
    },
    /// Evict pages of one session to faultd's store: a range, or N resident pages chosen as
    /// the session's budget enforcement would choose them (oldest installed first).
    Evict {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        amount: Amount,
    },
    /// Working-set recordings (what faultd replays on a restore of the same snapshot): list,
    /// export to a file, import from one (another host's export), remove. A uid reaches its
    /// own recordings; root any uid's (--uid) and the imported ones every uid replays
    /// (--imported).
    #[command(subcommand)]
    WorkingSet(WsCommand),
}

/// A `faultd ctl working-set` command.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum WsCommand {
    /// One line per recording: uid (or "imported"), snapshot digest, pages, sizes.
    List {
        #[command(flatten)]
        owner: WsOwner,
    },
    /// Write one recording to FILE (the versioned format of docs/protocol.md), checked against
    /// the SHA-256 faultd gives.
    Export {
        /// The snapshot's SHA-256 (as `list` shows it).
        digest: String,
        /// Where to write it.
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        owner: WsOwner,
    },
    /// Import a recording FILE (another faultd's export); faultd checks it whole before it
    /// replaces any recording of the same snapshot.
    Import {
        /// The recording file.
        file: PathBuf,
        #[command(flatten)]
        owner: WsOwner,
    },
    /// Remove one recording.
    Remove {
        /// The snapshot's SHA-256.
        digest: String,
        #[command(flatten)]
        owner: WsOwner,
    },
}

/// Whose recordings a `working-set` command is about (none given: your own uid's).
#[derive(Debug, Clone, Copy, clap::Args)]
#[group(required = false, multiple = false)]
pub struct WsOwner {
    /// This uid's recordings (root only, for a uid not your own).
    #[arg(long)]
    uid: Option<u32>,
    /// The imported recordings every uid's sessions replay (root only).
    #[arg(long)]
    imported: bool,
}

/// Which session(s) a command is about.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Target {
    /// The VM name its VMM registered with: one of your own VMs; root names a VM of another
    /// uid as UID/NAME (a bare NAME is that name under every uid, for root).
    #[arg(long)]
    vm: Option<String>,
    /// The session id (`faultd ctl sessions` lists them).
    #[arg(long)]
    session: Option<u64>,
}

impl Target {
    fn to_ref(&self) -> SessionRef {
        match (&self.vm, self.session) {
            (_, Some(id)) => SessionRef::Session(id),
            // clap requires exactly one of the two.
            (Some(vm), None) => SessionRef::Vm(vm.clone()),
            (None, None) => SessionRef::Vm(String::new()),
        }
    }
}

/// What an eviction takes.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct Amount {
    /// Every resident page of GPA:LEN, e.g. 0x100000:2M (hex or decimal, suffixes K, M, G, T
    /// for KiB, MiB, GiB, TiB).
    #[arg(long, value_name = "GPA:LEN", value_parser = parse_range)]
    range: Option<GpaRange>,
    /// This many resident pages, oldest installed first (as a budget would pick them).
    #[arg(long, value_name = "N", value_parser = parse_pages)]
    pages: Option<u64>,
}

impl Amount {
    fn to_amount(&self) -> EvictAmount {
        match (self.range, self.pages) {
            (Some(r), _) => EvictAmount::Range {
                gpa: r.gpa,
                len: r.len,
            },
            // clap requires exactly one of the two.
            (None, Some(n)) => EvictAmount::Pages(n),
            (None, None) => EvictAmount::Pages(0),
        }
    }
}

/// A guest physical range given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpaRange {
    /// Start.
    pub gpa: u64,
    /// Bytes.
    pub len: u64,
}

/// How answers are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Aligned tables for people.
    Table,
    /// The protocol's JSON objects, pretty-printed.
    Json,
}

/// A size or range on the command line that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Empty, or not a number with an optional suffix.
    #[error("{text:?} is not a size: a decimal or 0x-hex number, optionally with K, M, G or T")]
    NotASize {
        /// What was given.
        text: String,
    },
    /// A number with its suffix does not fit 64 bits.
    #[error("{text:?} does not fit 64 bits")]
    TooLarge {
        /// What was given.
        text: String,
    },
    /// Not `GPA:LEN`.
    #[error("{text:?} is not a range: give GPA:LEN, e.g. 0x100000:2M")]
    NotARange {
        /// What was given.
        text: String,
    },
    /// A page count of zero.
    #[error("the page count must be at least 1")]
    NoPages,
    /// Not a number with an optional `ms`, `s` or `m`.
    #[error("{text:?} is not a duration: a whole number with ms, s or m (e.g. 500ms, 5s, 1m)")]
    NotADuration {
        /// What was given.
        text: String,
    },
    /// Zero, or longer than a day.
    #[error("{text:?} is out of range: a timeout must be at least 1ms and at most 24h")]
    TimeoutOutOfRange {
        /// What was given.
        text: String,
    },
}

/// Parses a size: a decimal or `0x` hexadecimal number with an optional binary suffix
/// (`K`/`KiB`, `M`/`MiB`, `G`/`GiB`, `T`/`TiB`, case-insensitive, `B` alone for bytes).
pub fn parse_size(text: &str) -> Result<u64, ParseError> {
    let not_a_size = || ParseError::NotASize { text: text.into() };
    let t = text.trim();
    let (digits, radix) = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (t, 10),
    };
    let split = digits
        .find(|c: char| !c.is_digit(radix))
        .unwrap_or(digits.len());
    let (number, suffix) = digits.split_at(split);
    if number.is_empty() {
        return Err(not_a_size());
    }
    let value = u64::from_str_radix(number, radix)
        .map_err(|_| ParseError::TooLarge { text: text.into() })?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(not_a_size()),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| ParseError::TooLarge { text: text.into() })
}

/// Parses `GPA:LEN`, each as [`parse_size`] takes it.
pub fn parse_range(text: &str) -> Result<GpaRange, ParseError> {
    let (gpa, len) = text
        .split_once(':')
        .ok_or_else(|| ParseError::NotARange { text: text.into() })?;
    Ok(GpaRange {
        gpa: parse_size(gpa)?,
        len: parse_size(len)?,
    })
}

/// Parses a timeout: a whole number of milliseconds (`ms`), seconds (`s`, or no unit) or
/// minutes (`m`), from 1ms to 24h.
pub fn parse_timeout(text: &str) -> Result<Duration, ParseError> {
    let not_a_duration = || ParseError::NotADuration { text: text.into() };
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: u64 = number.parse().map_err(|_| not_a_duration())?;
    let millis = match unit {
        "ms" => Some(value),
        "" | "s" => value.checked_mul(1000),
        "m" => value.checked_mul(60_000),
        _ => return Err(not_a_duration()),
    };
    match millis.map(Duration::from_millis) {
        Some(d) if !d.is_zero() && d <= MAX_TIMEOUT => Ok(d),
        _ => Err(ParseError::TimeoutOutOfRange { text: text.into() }),
    }
}

/// Parses a page count (at least 1).
pub fn parse_pages(text: &str) -> Result<u64, ParseError> {
    match parse_size(text)? {
        0 => Err(ParseError::NoPages),
        n => Ok(n),
    }
}

/// A `faultd ctl` command that failed, named for the step.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// A path could not be made absolute.
    #[error("resolving path {path}")]
    Path {
        /// The path given.
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Nothing serves the control socket.
    #[error("not running ({why} at {socket})")]
    NotRunning {
        /// Control socket.
        socket: String,
        /// What connecting found.
        why: &'static str,
    },
    /// Something is at the path, but it is not faultd's control socket.
    #[error("not a faultd control socket: {socket} {why}")]
    NotFaultd {
        /// The path.
        socket: String,
        /// What is there instead.
        why: String,
    },
    /// No connection or no answer in time.
    #[error("timed out after {after:?} {step} {socket} ({hint})")]
    TimedOut {
        /// Control socket.
        socket: String,
        /// What was waited for.
        step: &'static str,
        /// The timeout.
        after: Duration,
        /// Which flag sets it, and what it means for the request.
        hint: &'static str,
    },
    /// faultd refused the request.
    #[error("refused ({code:?}): {message}")]
    Refused {
        /// Class of error.
        code: ErrorCode,
        /// faultd's explanation.
        message: String,
    },
    /// Creating the socket, setting its timeouts or connecting failed otherwise (e.g. no
    /// permission on the socket).
    #[error("connecting to {socket}")]
    Connect {
        /// Control socket.
        socket: String,
        #[source]
        source: nix::Error,
    },
    /// The request could not be encoded (too large).
    #[error("encoding the request")]
    Encode(#[source] CodecError),
    /// Sending the request failed.
    #[error("sending the request to {socket}")]
    Send {
        /// Control socket.
        socket: String,
        #[source]
        source: nix::Error,
    },
    /// Receiving the answer failed.
    #[error("receiving the answer from {socket}")]
    Recv {
        /// Control socket.
        socket: String,
        #[source]
        source: nix::Error,
    },
    /// The peer hung up without answering.
    #[error(
        "{socket} closed the connection without answering (faultd does so past its connection \
         limits; see its log)"
    )]
    Closed {
        /// Control socket.
        socket: String,
    },
    /// A protocol message this ctl cannot read: faultd's protocol, another version of it.
    #[error("reading the answer from {socket} (a faultd of another version?)")]
    Unreadable {
        /// Control socket.
        socket: String,
        #[source]
        source: CodecError,
    },
    /// A protocol answer that does not fit the request.
    #[error("{socket} answered {answer:?}, which does not answer the request")]
    Unexpected {
        /// Control socket.
        socket: String,
        /// What came.
        answer: Box<Response>,
    },
    /// Writing an exported recording failed, or what came does not hash as announced.
    #[error("exporting to {path}")]
    Export {
        /// The output file.
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading a recording to import failed, or it is not one.
    #[error("importing {path}")]
    Import {
        /// The file.
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// An answer could not be printed as JSON.
    #[error("printing the answer as JSON")]
    Json(#[source] serde_json::Error),
}

impl CtlError {
    /// The process exit code for this failure (see [`EXIT_STATUSES`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::NotRunning { .. } => EXIT_NOT_RUNNING,
            CtlError::NotFaultd { .. } => EXIT_NOT_FAULTD,
            CtlError::TimedOut { .. } => EXIT_TIMED_OUT,
            CtlError::Refused {
                code: ErrorCode::Forbidden,
                ..
            } => EXIT_FORBIDDEN,
            _ => EXIT_FAILED,
        }
    }
}

/// Sends `args.request` to the faultd at `control`; what to print on success.
///
/// A command is one or more requests on one connection (`Connection::ask`), the protocol's
/// answer checked for its kind, and two ways to print it: the answer object whole (`--json`)
/// or a table made from it.
pub fn run(control: &Path, args: CtlArgs) -> Result<String, CtlError> {
    let output = if args.json {
        Output::Json
    } else {
        Output::Table
    };
    let mut conn = Connection::open(control, args.connect_timeout, args.timeout)?;
    match args.request {
        CtlCommand::FirecrackerListen {
            vm,
            socket,
            snapshot,
            object_store,
            object_key,
            uid,
            pid,
        } => {
            // faultd runs elsewhere: relative paths mean this command's directory.
            let socket = absolute(socket)?;
            let snapshot = snapshot.map(absolute).transpose()?;
            let object = object_store
                .zip(object_key)
                .map(|(store, key)| faultd_proto::ObjectName { store, key });
            let request = Request::FirecrackerListen(FirecrackerListen {
                vm,
                socket,
                snapshot,
                object,
                uid,
                pid,
            });
            let answer = conn.ask(&request)?;
            let Response::Listening { vm, socket } = &answer else {
                return Err(conn.unexpected(answer));
            };
            show(output, &answer, || {
                format!(
                    "faultd listens for Firecracker VM {vm} on {}",
                    socket.display()
                )
            })
        }
        CtlCommand::FirecrackerUnlisten { name } => {
            let answer = conn.ask(&Request::FirecrackerUnlisten { vm: name })?;
            let Response::Unlistened { vm, socket } = &answer else {
                return Err(conn.unexpected(answer));
            };
            show(output, &answer, || {
                format!(
                    "faultd no longer listens for Firecracker VM {vm} on {}",
                    socket.display()
                )
            })
        }
        CtlCommand::Status => {
            let answer = conn.ask(&Request::Status {})?;
            let Response::Status(st) = &answer else {
                return Err(conn.unexpected(answer));
            };
            show(output, &answer, || status_table(st))
        }
        CtlCommand::Sessions => {
            // The pages put together, as one answer that leaves nothing out.
            let rows = conn.all_sessions()?;
            let answer = Response::Sessions {
                sessions: rows.clone(),
                more: false,
            };
            show(output, &answer, || sessions_table(&rows))
        }
        CtlCommand::Stats { target } => {
            let request = Request::SessionDetail {
                target: target.to_ref(),
            };
            let answer = conn.ask(&request)?;
            let Response::SessionDetail { sessions, omitted } = &answer else {
                return Err(conn.unexpected(answer));
            };
            show(output, &answer, || stats_text(sessions, *omitted))
        }
        CtlCommand::Evict { target, amount } => {
            let request = Request::EvictSession {
                target: target.to_ref(),
                amount: amount.to_amount(),
            };
            let answer = conn.ask(&request)?;
            let Response::SessionEvicted(e) = &answer else {
                return Err(conn.unexpected(answer));
            };
            show(output, &answer, || evicted_table(e))
        }
        CtlCommand::WorkingSet(ws) => working_set(&mut conn, output, ws),
    }
}

/// Runs a `working-set` command on `conn`.
fn working_set(conn: &mut Connection, output: Output, ws: WsCommand) -> Result<String, CtlError> {
    match ws {
        WsCommand::List { owner } => {
            let answer = conn.ask(&Request::WorkingSetList {
                uid: owner.uid,
                imported: owner.imported,
            })?;
            let Response::WorkingSets {
                recordings,
                omitted,
            } = &answer
            else {
                return Err(conn.unexpected(answer));
            };
            show(output, &answer, || ws_table(recordings, *omitted))
        }
        WsCommand::Remove { digest, owner } => {
            let answer = conn.ask(&Request::WorkingSetRemove {
                uid: owner.uid,
                imported: owner.imported,
                digest,
            })?;
            let Response::WorkingSetRemoved { uid, digest } = &answer else {
                return Err(conn.unexpected(answer));
            };
            show(output, &answer, || {
                format!("removed the recording of snapshot {digest} {}", whose(*uid))
            })
        }
        WsCommand::Export {
            digest,
            output: path,
            owner,
        } => {
            let mut bytes: Vec<u8> = Vec::new();
            let mut first: Option<(String, u64)> = None;
            loop {
                let answer = conn.ask(&Request::WorkingSetExport {
                    uid: owner.uid,
                    imported: owner.imported,
                    digest: digest.clone(),
                    offset: bytes.len() as u64,
                })?;
                let Response::WorkingSetChunk {
                    sha256,
                    total,
                    offset,
                    data,
                    ..
                } = &answer
                else {
                    return Err(conn.unexpected(answer));
                };
                let chunk = faultd_proto::hex_decode(data);
                let (sha, size) = first.get_or_insert_with(|| (sha256.clone(), *total));
                let fits = *offset == bytes.len() as u64
                    && (sha.as_str(), *size) == (sha256.as_str(), *total)
                    && *total <= faultd_proto::WS_MAX_RECORDING_BYTES;
                let Some(chunk) = chunk.filter(|c| {
                    fits && (!c.is_empty() || bytes.len() as u64 == *total)
                        && bytes.len() as u64 + c.len() as u64 <= *total
                }) else {
                    return Err(conn.unexpected(answer));
                };
                bytes.extend_from_slice(&chunk);
                if bytes.len() as u64 == *total {
                    break;
                }
            }
            let (sha, total) = first.unwrap_or_default();
            let got = faultd_proto::hex_encode(&sha2::Sha256::digest(&bytes));
            if got != sha {
                return Err(CtlError::Export {
                    path: path.display().to_string(),
                    source: std::io::Error::other(format!(
                        "the bytes received hash to {got}, faultd announced {sha}"
                    )),
                });
            }
            std::fs::write(&path, &bytes).map_err(|source| CtlError::Export {
                path: path.display().to_string(),
                source,
            })?;
            Ok(format!(
                "exported the recording of snapshot {digest} ({total} bytes, sha256 {sha}) to {}",
                path.display()
            ))
        }
        WsCommand::Import { file, owner } => {
            let read_failed = |source| CtlError::Import {
                path: file.display().to_string(),
                source,
            };
            let meta = std::fs::metadata(&file).map_err(read_failed)?;
            if meta.len() > faultd_proto::WS_MAX_RECORDING_BYTES {
                return Err(read_failed(std::io::Error::other(format!(
                    "{} bytes: a recording is at most {}",
                    meta.len(),
                    faultd_proto::WS_MAX_RECORDING_BYTES
                ))));
            }
            let bytes = std::fs::read(&file).map_err(read_failed)?;
            // The snapshot digest from the header (faultd checks the file whole).
            let digest = match bytes.get(24..56) {
                Some(d) if bytes.starts_with(b"FAULTDWS") => faultd_proto::hex_encode(d),
                _ => {
                    return Err(read_failed(std::io::Error::other(
                        "not a faultd working-set recording (no FAULTDWS header)",
                    )))
                }
            };
            let sha256 = faultd_proto::hex_encode(&sha2::Sha256::digest(&bytes));
            let mut offset = 0usize;
            loop {
                let end = (offset + faultd_proto::WS_CHUNK_BYTES).min(bytes.len());
                let answer = conn.ask(&Request::WorkingSetImport {
                    uid: owner.uid,
                    imported: owner.imported,
                    digest: digest.clone(),
                    sha256: sha256.clone(),
                    total: bytes.len() as u64,
                    offset: offset as u64,
                    data: faultd_proto::hex_encode(&bytes[offset..end]),
                })?;
                match &answer {
                    Response::WorkingSetReceived { received, .. }
                        if *received == end as u64 && end < bytes.len() =>
                    {
                        offset = end;
                    }
                    Response::WorkingSetImported(row) => {
                        let row = row.clone();
                        return show(output, &answer, || {
                            format!(
                                "imported the recording of snapshot {} ({} pages) {}",
                                row.digest,
                                row.pages,
                                whose(row.uid)
                            )
                        });
                    }
                    _ => return Err(conn.unexpected(answer)),
                }
            }
        }
    }
}

fn whose(uid: Option<u32>) -> String {
    uid.map_or_else(
        || "as imported (every uid)".into(),
        |u| format!("of uid {u}"),
    )
}

fn ws_table(rows: &[faultd_proto::WorkingSetRow], omitted: u64) -> String {
    let mut t = Table::new(&[
        ("UID", false),
        ("SNAPSHOT DIGEST", false),
        ("PAGES", true),
        ("SNAPSHOT", true),
        ("FILE", true),
    ]);
    for r in rows {
        t.row(vec![
            r.uid.map_or_else(|| "imported".into(), |u| u.to_string()),
            r.digest.clone(),
            r.pages.to_string(),
            human_bytes(r.snapshot_size),
            human_bytes(r.bytes),
        ]);
    }
    let mut out = t.render();
    if omitted > 0 {
        let _ = write!(out, "\n({omitted} more not shown)");
    }
    out
}

/// The answer as `output` asks: the protocol's object whole, or `table` made from it.
fn show(
    output: Output,
    answer: &Response,
    table: impl FnOnce() -> String,
) -> Result<String, CtlError> {
    match output {
        Output::Table => Ok(table()),
        Output::Json => serde_json::to_string_pretty(answer).map_err(CtlError::Json),
    }
}

/// A connection to a control socket, every wait on it bounded.
struct Connection {
    sock: OwnedFd,
    /// The path, for messages.
    socket: String,
    /// How long each answer may take.
    answer: Duration,
}

impl Connection {
    /// Connects within `connect` (the kernel waits while the listener's backlog is full, up to
    /// the socket's send timeout), telling "faultd is not running" and "this is not a faultd
    /// control socket" from other failures.
    fn open(control: &Path, connect_within: Duration, answer: Duration) -> Result<Self, CtlError> {
        let socket = control.display().to_string();
        let failed = |source| CtlError::Connect {
            socket: socket.clone(),
            source,
        };
        let sock = nix::sys::socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(failed)?;
        setsockopt(&sock, sockopt::SendTimeout, &timeval(connect_within)).map_err(failed)?;
        let addr = UnixAddr::new(control).map_err(failed)?;
        match connect(sock.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::Error::ENOENT) => {
                return Err(CtlError::NotRunning {
                    socket,
                    why: "no control socket",
                })
            }
            // Linux answers ECONNREFUSED both for a socket nobody listens on (what a killed
            // faultd leaves) and for a path that is no socket at all; only the second is
            // "not faultd".
            Err(nix::Error::ECONNREFUSED) => {
                return Err(match not_a_socket(control) {
                    Some(what) => CtlError::NotFaultd {
                        socket,
                        why: format!("is {what}, not a socket"),
                    },
                    None => CtlError::NotRunning {
                        socket,
                        why: "nothing accepts connections",
                    },
                })
            }
            // A stream or datagram socket: faultd's is SOCK_SEQPACKET.
            Err(nix::Error::EPROTOTYPE) => {
                return Err(CtlError::NotFaultd {
                    socket,
                    why: "is a socket of another type (faultd's is a seqpacket socket)".into(),
                })
            }
            Err(nix::Error::EAGAIN) => {
                return Err(CtlError::TimedOut {
                    socket,
                    step: "connecting to",
                    after: connect_within,
                    hint: "nothing accepted the connection; --connect-timeout sets the wait",
                })
            }
            Err(source) => return Err(failed(source)),
        }
        setsockopt(&sock, sockopt::SendTimeout, &timeval(answer)).map_err(failed)?;
        setsockopt(&sock, sockopt::ReceiveTimeout, &timeval(answer)).map_err(failed)?;
        Ok(Connection {
            sock,
            socket,
            answer,
        })
    }

    /// Sends `request` and returns faultd's answer; a refusal is [`CtlError::Refused`], an
    /// answer that is not the protocol at all is [`CtlError::NotFaultd`].
    fn ask(&mut self, request: &Request) -> Result<Response, CtlError> {
        let bytes = faultd_proto::encode(request).map_err(CtlError::Encode)?;
        match send(self.sock.as_raw_fd(), &bytes, MsgFlags::MSG_NOSIGNAL) {
            Ok(_) => {}
            Err(nix::Error::EAGAIN) => return Err(self.timed_out()),
            Err(source) => {
                return Err(CtlError::Send {
                    socket: self.socket.clone(),
                    source,
                })
            }
        }
        // One byte more than the protocol allows, so that an oversize answer is seen as such
        // rather than cut to a size that happens to decode.
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
        let n = loop {
            match recv(self.sock.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return Err(self.timed_out()),
                Err(source) => {
                    return Err(CtlError::Recv {
                        socket: self.socket.clone(),
                        source,
                    })
                }
            }
        };
        if n == 0 {
            return Err(CtlError::Closed {
                socket: self.socket.clone(),
            });
        }
        let bytes = &buf[..n];
        match faultd_proto::decode::<Response>(bytes) {
            Ok(Response::Error { code, message }) => Err(CtlError::Refused { code, message }),
            Ok(answer) => Ok(answer),
            Err(source) if speaks_the_protocol(bytes) => Err(CtlError::Unreadable {
                socket: self.socket.clone(),
                source,
            }),
            Err(source) => Err(CtlError::NotFaultd {
                socket: self.socket.clone(),
                why: format!(
                    "answered something that is not faultd's protocol ({})",
                    with_cause(&source)
                ),
            }),
        }
    }

    /// Every live session's row: page after page on this connection until faultd has listed
    /// them all.
    fn all_sessions(&mut self) -> Result<Vec<SessionRow>, CtlError> {
        let mut rows: Vec<SessionRow> = Vec::new();
        loop {
            let after = rows.last().map(|r| r.session);
            match self.ask(&Request::Sessions { after })? {
                Response::Sessions { sessions, more } => {
                    // A page that adds nothing while claiming more would loop forever.
                    let stalled = sessions.is_empty();
                    rows.extend(sessions);
                    if !more || stalled {
                        return Ok(rows);
                    }
                }
                other => return Err(self.unexpected(other)),
            }
        }
    }

    fn timed_out(&self) -> CtlError {
        CtlError::TimedOut {
            socket: self.socket.clone(),
            step: "waiting for an answer from",
            after: self.answer,
            hint: "--timeout sets the wait; faultd may still complete a request it received",
        }
    }

    fn unexpected(&self, answer: Response) -> CtlError {
        CtlError::Unexpected {
            socket: self.socket.clone(),
            answer: Box::new(answer),
        }
    }
}

/// What `path` is when it exists and is not a socket ("a regular file", "a directory"); None
/// when it is a socket, or cannot be looked at.
fn not_a_socket(path: &Path) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let kind = std::fs::metadata(path).ok()?.file_type();
    if kind.is_socket() {
        None
    } else if kind.is_file() {
        Some("a regular file")
    } else if kind.is_dir() {
        Some("a directory")
    } else {
        Some("a special file")
    }
}

/// Whether `bytes` look like a message of faultd's protocol (a JSON object with a string
/// `type`) even though this ctl could not decode it: a faultd of another version, not a
/// stranger.
fn speaks_the_protocol(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .is_ok_and(|v| v.get("type").is_some_and(serde_json::Value::is_string))
}

/// `e` and its cause, as one phrase.
fn with_cause(e: &dyn std::error::Error) -> String {
    match e.source() {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

fn timeval(d: Duration) -> TimeVal {
    // parse_timeout bounds it to a day: both fit.
    TimeVal::new(d.as_secs() as _, d.subsec_micros() as _)
}

fn absolute(path: PathBuf) -> Result<PathBuf, CtlError> {
    std::path::absolute(&path).map_err(|source| CtlError::Path {
        path: path.display().to_string(),
        source,
    })
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Bytes for people: `B` below 1 KiB, then KiB and MiB with one decimal, GiB with two.
pub fn human_bytes(bytes: u64) -> String {
    let f = bytes as f64;
    match bytes {
        b if b < KIB => format!("{b} B"),
        b if b < MIB => format!("{:.1} KiB", f / KIB as f64),
        b if b < GIB => format!("{:.1} MiB", f / MIB as f64),
        _ => format!("{:.2} GiB", f / GIB as f64),
    }
}

/// Microseconds for people; `-` for none recorded.
pub fn human_us(us: f64, count: u64) -> String {
    if count == 0 {
        return "-".into();
    }
    if us >= 1000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{us:.1} us")
    }
}

fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m"),
    }
}

fn kind_name(kind: SessionKind) -> &'static str {
    match kind {
        SessionKind::Vmm => "vmm",
        SessionKind::Firecracker => "firecracker",
    }
}

fn pid_text(pid: Option<i32>) -> String {
    pid.map_or_else(|| "-".into(), |p| p.to_string())
}

/// Columns padded to their widest cell; numeric columns (`right`) aligned right.
struct Table {
    header: Vec<&'static str>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, bool)]) -> Table {
        Table {
            header: columns.iter().map(|c| c.0).collect(),
            right: columns.iter().map(|c| c.1).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.header.iter().map(|h| h.to_string()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                let w = widths.get(i).copied().unwrap_or(0);
                if i > 0 {
                    line.push_str("  ");
                }
                if self.right.get(i).copied().unwrap_or(false) {
                    let _ = write!(line, "{cell:>w$}");
                } else {
                    let _ = write!(line, "{cell:<w$}");
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.pop(); // the caller prints the last newline
        out
    }
}

/// Two columns: what, and its value.
fn pairs(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<w$}  {v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn status_table(st: &DaemonStatus) -> String {
    let budget = match st.budget.global_bytes {
        0 => ", no global budget".to_string(),
        b => format!(
            ", {:.1}% of the global budget {} (evicts above {}%, down to {}%)",
            st.resident_bytes as f64 * 100.0 / b as f64,
            human_bytes(b),
            st.budget.high_pct,
            st.budget.low_pct
        ),
    };
    let per_vm = match st.budget.session_bytes {
        0 => "none".to_string(),
        b => human_bytes(b),
    };
    let mut rows = vec![
        ("faultd", format!("{}, pid {}", st.version, st.pid)),
        ("uptime", human_duration(st.uptime_secs)),
        (
            "sessions",
            format!("{} of {}", st.sessions, st.max_sessions),
        ),
        ("guest RAM", human_bytes(st.guest_bytes)),
        (
            "resident",
            format!("{}{budget}", human_bytes(st.resident_bytes)),
        ),
        ("per-VM budget", per_vm),
        ("pinned", human_bytes(st.pinned_bytes)),
        ("stored", format!("{} pages", st.stored_pages)),
        ("evicted", format!("{} pages", st.evicted_pages)),
        (
            "devices",
            format!("{}, {} page-request groups", st.devices, st.device_groups),
        ),
        ("store dir", st.store_dir.display().to_string()),
        (
            "firecracker",
            format!("{} listener(s)", st.firecracker_listeners),
        ),
    ];
    for l in &st.firecracker {
        rows.push(("", format!("{}  {}", l.vm, l.socket.display())));
    }
    let shown = st.firecracker.len() as u64;
    if st.firecracker_listeners > shown {
        rows.push((
            "",
            format!("... and {} more", st.firecracker_listeners - shown),
        ));
    }
    pairs(&rows)
}

fn sessions_table(rows: &[SessionRow]) -> String {
    if rows.is_empty() {
        return "no live sessions".into();
    }
    let mut t = Table::new(&[
        ("SESSION", true),
        ("VM", false),
        ("KIND", false),
        ("PID", true),
        ("GUEST", true),
        ("RESIDENT", true),
        ("PINNED", true),
        ("STORED", true),
        ("VCPU FAULTS", true),
        ("DEV GROUPS", true),
        ("VCPU P99", true),
        ("DEV P99", true),
    ]);
    for r in rows {
        t.row(vec![
            r.session.to_string(),
            r.vm.clone(),
            kind_name(r.kind).into(),
            pid_text(r.pid),
            human_bytes(r.guest_bytes),
            human_bytes(r.resident_bytes),
            human_bytes(r.pinned_bytes),
            r.stored_pages.to_string(),
            r.vcpu_faults.to_string(),
            r.device_groups.to_string(),
            human_us(r.vcpu_p99_us, r.vcpu_faults),
            human_us(r.device_p99_us, r.device_groups),
        ]);
    }
    t.render()
}

fn latency_row(t: &mut Table, what: &str, l: &LatencySummary) {
    t.row(vec![
        what.into(),
        l.count.to_string(),
        human_us(l.p50, l.count),
        human_us(l.p90, l.count),
        human_us(l.p99, l.count),
        human_us(l.max, l.count),
    ]);
}

/// A session's snapshot object and the chunk cache's figures (shared by every session).
fn object_lines(o: &faultd_proto::ObjectStatus) -> String {
    let mut rows = vec![(
        "object",
        format!(
            "{} (ETag {}, {}, chunks of {})",
            o.object,
            o.etag,
            human_bytes(o.size),
            human_bytes(o.chunk_bytes)
        ),
    )];
    if let Some(why) = &o.failure {
        rows.push(("object failed", why.clone()));
    }
    rows.push((
        "object cache",
        format!(
            "all sessions: {} hits, {} misses, {} GETs ({} failed), {} fetched, {} in flight; \
             cache {} in {} chunks",
            o.cache_hits,
            o.cache_misses,
            o.gets,
            o.get_errors,
            human_bytes(o.bytes_fetched),
            o.in_flight,
            human_bytes(o.cache_bytes),
            o.cache_chunks
        ),
    ));
    pairs(&rows)
}

fn stats_text(sessions: &[SessionDetail], omitted: u64) -> String {
    let mut out = Vec::new();
    for d in sessions {
        let s = &d.stats;
        let dev = &s.device;
        let head = format!(
            "session {} ({}, {}, pid {})",
            s.session,
            d.vm,
            kind_name(d.kind),
            pid_text(d.pid)
        );
        let body = pairs(&[
            (
                "memory",
                format!(
                    "guest {}, resident {}, pinned {}, stored {} pages",
                    human_bytes(s.guest_bytes),
                    human_bytes(s.resident_bytes),
                    human_bytes(dev.mapped_bytes),
                    s.stored_pages
                ),
            ),
            (
                "vcpu faults",
                format!(
                    "{}: filled zero {}, file {}, store {}; already present {}, retries {}, \
                     errors {}",
                    s.vcpu_faults,
                    s.zero_fills,
                    s.file_fills,
                    s.store_fills,
                    s.already_present,
                    s.retries,
                    s.errors
                ),
            ),
            (
                "evictions",
                format!(
                    "{} pages evicted, {} discarded by the VMM",
                    s.evictions, s.discarded_pages
                ),
            ),
            (
                "fault-around",
                format!(
                    "vcpu {} pages in {} look-aheads, device {} granules in {} look-aheads, \
                     {} cut short",
                    s.around.vcpu_pages,
                    s.around.vcpu_rounds,
                    s.around.device_granules,
                    s.around.device_rounds,
                    s.around.stopped
                ),
            ),
            (
                "devices",
                format!(
                    "{} attached: {} groups ({} pages), {} success, {} invalid (outside {}, \
                     read-only {}, malformed {}, deadline {}, failed {}), pin evictions {}, \
                     respond errors {}, quarantined {}, stale cookies dropped {}",
                    dev.devices,
                    dev.groups,
                    dev.pages,
                    dev.success,
                    dev.invalid,
                    dev.outside_layout,
                    dev.read_only,
                    dev.malformed,
                    dev.deadline,
                    dev.failed,
                    dev.pin_evictions,
                    dev.respond_errors,
                    dev.quarantined,
                    dev.stale_cookies
                ),
            ),
            ("working set", working_set_line(&s.working_set)),
        ]);
        let body = match &d.object {
            Some(o) => format!("{body}\n{}", object_lines(o)),
            None => body,
        };
        let mut lat = Table::new(&[
            ("LATENCY", false),
            ("COUNT", true),
            ("P50", true),
            ("P90", true),
            ("P99", true),
            ("MAX", true),
        ]);
        latency_row(&mut lat, "vcpu fault", &s.latency_us);
        latency_row(&mut lat, "device group", &s.device_latency_us);
        out.push(format!("{head}\n{body}\n{}", lat.render()));
    }
    if omitted > 0 {
        out.push(format!(
            "... and {omitted} more sessions of this name (name one with --session)"
        ));
    }
    out.join("\n\n")
}

fn evicted_table(e: &SessionEvicted) -> String {
    let mut t = Table::new(&[
        ("SESSION", true),
        ("VM", false),
        ("EVICTED", true),
        ("ZERO", true),
        ("FAILED", true),
        ("RESIDENT NOW", true),
    ]);
    t.row(vec![
        e.session.to_string(),
        e.vm.clone(),
        e.evicted.to_string(),
        e.zero.to_string(),
        e.failed.to_string(),
        human_bytes(e.resident_bytes),
    ]);
    t.render()
}

/// The `working set` line of `ctl stats`: zero pages, recording, and replay (with why it
/// stopped and when).
fn working_set_line(w: &faultd_proto::WorkingSetStats) -> String {
    let mut line = format!(
        "{} snapshot zero pages, {} pages recorded",
        w.zero_pages, w.recorded
    );
    if w.replay_pages > 0 {
        line.push_str(&format!(
            "; replay of {} pages: {} prefetched, {} zero pages mapped, {} skipped, {} late \
             faults, {} misses",
            w.replay_pages, w.prefetched, w.prefetched_zero, w.skipped, w.late, w.misses
        ));
        if !w.replay_stop.is_empty() {
            line.push_str(&format!(
                ", stopped ({}) {:.1} ms after start",
                w.replay_stop,
                w.replay_us as f64 / 1000.0
            ));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_decimal_hex_and_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("2MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0x2M"), Ok(2 << 20));
        assert_eq!(parse_size("0x10K"), Ok(16 << 10));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn sizes_that_are_not_numbers_are_refused_by_name() {
        for bad in ["", "K", "0x", "4X", "1.5G", "-1", "4 K B"] {
            assert_eq!(
                parse_size(bad),
                Err(ParseError::NotASize { text: bad.into() }),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sizes_beyond_64_bits_are_refused() {
        assert!(matches!(
            parse_size("16777216T"),
            Err(ParseError::TooLarge { .. })
        ));
        assert!(matches!(
            parse_size("0x10000000000000000"),
            Err(ParseError::TooLarge { .. })
        ));
    }

    #[test]
    fn ranges_are_gpa_colon_len() {
        assert_eq!(
            parse_range("0x100000:2M"),
            Ok(GpaRange {
                gpa: 1 << 20,
                len: 2 << 20
            })
        );
        assert_eq!(
            parse_range("4K:4096"),
            Ok(GpaRange {
                gpa: 4096,
                len: 4096
            })
        );
        assert_eq!(
            parse_range("0x1000"),
            Err(ParseError::NotARange {
                text: "0x1000".into()
            })
        );
        assert!(matches!(
            parse_range("0x1000:lots"),
            Err(ParseError::NotASize { .. })
        ));
    }

    #[test]
    fn a_page_count_must_be_positive() {
        assert_eq!(parse_pages("8"), Ok(8));
        assert_eq!(parse_pages("0"), Err(ParseError::NoPages));
    }

    #[test]
    fn timeouts_take_ms_s_or_m_and_refuse_zero_and_more_than_a_day() {
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_timeout("1440m"), Ok(MAX_TIMEOUT));
        for bad in ["", "s", "1.5s", "-1s", "5h", "5 s"] {
            assert_eq!(
                parse_timeout(bad),
                Err(ParseError::NotADuration { text: bad.into() }),
                "{bad:?}"
            );
        }
        for out in ["0", "0ms", "1441m", "99999999999999999999m"] {
            assert!(
                matches!(
                    parse_timeout(out),
                    Err(ParseError::TimeoutOutOfRange { .. } | ParseError::NotADuration { .. })
                ),
                "{out:?}"
            );
        }
        assert_eq!(
            parse_timeout("0"),
            Err(ParseError::TimeoutOutOfRange { text: "0".into() })
        );
        assert_eq!(
            parse_timeout(DEFAULT_CONNECT_TIMEOUT),
            Ok(Duration::from_secs(5))
        );
        assert_eq!(
            parse_timeout(DEFAULT_ANSWER_TIMEOUT),
            Ok(Duration::from_secs(30))
        );
    }

    #[test]
    fn every_failure_exits_with_a_status_the_help_lists() {
        let codes: Vec<u8> = EXIT_STATUSES.iter().map(|e| e.0).collect();
        assert_eq!(codes, (0..=6).collect::<Vec<u8>>());
        let help = exit_status_help();
        for (code, what) in EXIT_STATUSES {
            assert!(help.contains(&format!("\n  {code}  {what}")), "{help}");
        }
        let socket = String::from("/s");
        let failures = [
            (
                CtlError::NotRunning {
                    socket: socket.clone(),
                    why: "no control socket",
                },
                EXIT_NOT_RUNNING,
            ),
            (
                CtlError::NotFaultd {
                    socket: socket.clone(),
                    why: "is a regular file".into(),
                },
                EXIT_NOT_FAULTD,
            ),
            (
                CtlError::TimedOut {
                    socket: socket.clone(),
                    step: "connecting to",
                    after: Duration::from_secs(1),
                    hint: "",
                },
                EXIT_TIMED_OUT,
            ),
            (
                CtlError::Refused {
                    code: ErrorCode::Forbidden,
                    message: String::new(),
                },
                EXIT_FORBIDDEN,
            ),
            (
                CtlError::Refused {
                    code: ErrorCode::BadRequest,
                    message: String::new(),
                },
                EXIT_FAILED,
            ),
            (CtlError::Closed { socket }, EXIT_FAILED),
        ];
        for (e, code) in failures {
            assert_eq!(e.exit_code(), code, "{e}");
        }
    }

    #[test]
    fn bytes_are_shown_in_the_largest_fitting_binary_unit() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(261 * MIB + MIB / 5), "261.2 MiB");
        assert_eq!(human_bytes(GIB), "1.00 GiB");
    }

    #[test]
    fn table_columns_are_aligned_and_numbers_right_aligned() {
        let mut t = Table::new(&[("ID", true), ("VM", false), ("RESIDENT", true)]);
        t.row(vec!["1".into(), "vm-long-name".into(), "4.0 KiB".into()]);
        t.row(vec!["12".into(), "b".into(), "261.2 MiB".into()]);
        let want = [
            "ID  VM             RESIDENT",
            " 1  vm-long-name    4.0 KiB",
            "12  b             261.2 MiB",
        ];
        assert_eq!(t.render(), want.join("\n"));
    }
}

//! `faultd ctl ...`: requests to a running faultd from the command line, through its control
//! socket (the same protocol any client speaks, `faultd-client`'s side of it).
//!
//! Owns: the operator's commands, parsing their sizes and ranges, and printing answers as
//! aligned tables, or with `--json` as the protocol's own JSON objects (their field names are
//! the protocol's, documented in docs/protocol.md, so they stay stable). Refuses: anything
//! faultd decides (which session, what is evictable); faultd's refusals are printed as they
//! come.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use faultd_client::{
    Client, ClientError, DaemonStatus, EvictAmount, FirecrackerListen, SessionDetail,
    SessionEvicted, SessionRef, SessionRow,
};
use faultd_proto::{ErrorCode, LatencySummary, SessionKind};

/// A request to a running faultd.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// Serve Firecracker snapshot restores of a VM: faultd creates the socket BACKEND_PATH (give
    /// Firecracker the same path as the Uffd mem_backend's backend_path) and fills pages from
    /// SNAPSHOT.
    FirecrackerListen {
        /// VM name for logs and stats.
        #[arg(long)]
        vm: String,
        /// The socket faultd creates and Firecracker connects to (relative paths are taken from
        /// this command's directory).
        #[arg(long = "backend-path", value_name = "BACKEND_PATH")]
        socket: PathBuf,
        /// The memory snapshot file.
        #[arg(long)]
        snapshot: PathBuf,
        /// Admit only processes of this uid (the socket is handed to it).
        #[arg(long)]
        uid: Option<u32>,
        /// Admit only this process.
        #[arg(long)]
        pid: Option<i32>,
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
    /// faultd refused the request.
    #[error("refused ({code:?}): {message}")]
    Refused {
        /// Class of error.
        code: ErrorCode,
        /// faultd's explanation.
        message: String,
    },
    /// Talking to faultd failed.
    #[error("asking faultd at {socket}")]
    Request {
        /// Control socket.
        socket: String,
        #[source]
        source: ClientError,
    },
    /// An answer could not be printed as JSON.
    #[error("printing the answer as JSON")]
    Json(#[source] serde_json::Error),
}

impl CtlError {
    /// The process exit code for this failure: 3 when faultd is not running (so scripts can
    /// tell "nothing to ask" from "asked and refused"), 4 when the VM belongs to another user
    /// (`forbidden`), 1 otherwise. (2 is clap's, for usage.)
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::NotRunning { .. } => 3,
            CtlError::Refused {
                code: ErrorCode::Forbidden,
                ..
            } => 4,
            _ => 1,
        }
    }
}

/// Sends `cmd` to the faultd at `control`; what to print on success.
pub fn run(control: &Path, cmd: CtlCommand, output: Output) -> Result<String, CtlError> {
    let socket = control.display().to_string();
    let asking = |source| match source {
        ClientError::Refused { code, message } => CtlError::Refused { code, message },
        source => CtlError::Request {
            socket: socket.clone(),
            source,
        },
    };
    let client = connect(control)?;
    match cmd {
        CtlCommand::FirecrackerListen {
            vm,
            socket,
            snapshot,
            uid,
            pid,
        } => {
            // faultd runs elsewhere: relative paths mean this command's directory.
            let socket = absolute(socket)?;
            let snapshot = absolute(snapshot)?;
            let listening = serde_json::json!({"vm": vm, "socket": socket});
            let shown = format!(
                "faultd listens for Firecracker VM {vm} on {}",
                socket.display()
            );
            client
                .firecracker_listen(FirecrackerListen {
                    vm,
                    socket,
                    snapshot,
                    uid,
                    pid,
                })
                .map_err(asking)?;
            match output {
                Output::Table => Ok(shown),
                Output::Json => json(&listening),
            }
        }
        CtlCommand::Status => {
            let st = client.status().map_err(asking)?;
            match output {
                Output::Table => Ok(status_table(&st)),
                Output::Json => json(&st),
            }
        }
        CtlCommand::Sessions => {
            let rows = client.sessions().map_err(asking)?;
            match output {
                Output::Table => Ok(sessions_table(&rows)),
                Output::Json => json(&rows),
            }
        }
        CtlCommand::Stats { target } => {
            let (sessions, omitted) = client.session_detail(target.to_ref()).map_err(asking)?;
            match output {
                Output::Table => Ok(stats_text(&sessions, omitted)),
                Output::Json => json(&sessions),
            }
        }
        CtlCommand::Evict { target, amount } => {
            let done = client
                .evict_session(target.to_ref(), amount.to_amount())
                .map_err(asking)?;
            match output {
                Output::Table => Ok(evicted_table(&done)),
                Output::Json => json(&done),
            }
        }
    }
}

/// Connects, telling "faultd is not running" apart from other failures.
fn connect(control: &Path) -> Result<Client, CtlError> {
    let socket = control.display().to_string();
    Client::connect(control).map_err(|source| {
        let why = match &source {
            ClientError::Connect { source, .. } => match source {
                nix::Error::ENOENT => Some("no control socket"),
                nix::Error::ECONNREFUSED => Some("nothing accepts connections"),
                _ => None,
            },
            _ => None,
        };
        match why {
            Some(why) => CtlError::NotRunning {
                socket: socket.clone(),
                why,
            },
            None => CtlError::Request {
                socket: socket.clone(),
                source,
            },
        }
    })
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, CtlError> {
    serde_json::to_string_pretty(value).map_err(CtlError::Json)
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
                "devices",
                format!(
                    "{} attached: {} groups ({} pages), {} success, {} invalid (outside {}, \
                     read-only {}, malformed {}, deadline {}, failed {}), pin evictions {}, \
                     respond errors {}, quarantined {}",
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
                    dev.quarantined
                ),
            ),
        ]);
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

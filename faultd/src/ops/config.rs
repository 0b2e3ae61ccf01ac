//! Configuration: TOML -> raw structs that refuse unknown keys -> a validated [`Config`].
//!
//! The embedded default is `config/faultd.toml`; a file given with `--config` is read over it
//! key by key (missing keys keep the default), and command-line flags override both.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The default configuration, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../../../config/faultd.toml");

/// Longest spin window accepted: longer only burns CPU without helping latency.
const MAX_SPIN_US: u64 = 10_000;
/// Most uffd events read at once (each is 32 bytes).
const MAX_BATCH: usize = 4096;
/// Most sessions accepted in config (each owns a thread).
const MAX_SESSIONS: usize = 4096;
/// Most connections accepted in config (each costs an fd).
const MAX_CONNECTIONS: usize = 65536;
/// Largest guest-size limit accepted in config, GiB (64 TiB).
const MAX_GUEST_GIB: u64 = 65536;
/// Most VMs with a `vm` label of their own: each costs a few hundred series.
const MAX_VM_LABELS: usize = 256;

/// A configuration that failed to load, naming the field and value at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config file {path}")]
    Read {
        /// File path.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys or wrong types.
    #[error("parsing config {origin}")]
    Parse {
        /// Where the text came from.
        origin: String,
        #[source]
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("config field {field} = {value}: {why}")]
    Invalid {
        /// Dotted field name.
        field: &'static str,
        /// The value given.
        value: String,
        /// What the value must be.
        why: &'static str,
    },
    /// An `[[object_store.stores]]` entry has a bad value.
    #[error("config field {field}[{index}] = {value}: {why}")]
    ObjectStore {
        /// Position of the entry in the file.
        index: usize,
        /// The entry's field.
        field: &'static str,
        /// The value given.
        value: String,
        /// What the value must be.
        why: &'static str,
    },
    /// The file is one faultd must not trust: another user may write it, or it holds a
    /// secret others may read.
    #[error("config file {path}: {why}")]
    Unsafe {
        /// File path.
        path: PathBuf,
        /// What is wrong and how to fix it.
        why: String,
    },
    /// A `[[firecracker]]` entry has a bad value.
    #[error("config field firecracker[{index}].{field} = {value}: {why}")]
    Firecracker {
        /// Position of the entry in the file.
        index: usize,
        /// The entry's field.
        field: &'static str,
        /// The value given.
        value: String,
        /// What the value must be.
        why: &'static str,
    },
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    control: RawControl,
    #[serde(default)]
    fault: RawFault,
    #[serde(default)]
    device: RawDevice,
    #[serde(default)]
    budget: RawBudget,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    firecracker: Vec<RawFirecracker>,
    #[serde(default)]
    around: RawAround,
    #[serde(default)]
    working_set: RawWorkingSet,
    #[serde(default)]
    object_store: RawObjectStore,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawObjectStore {
    cache_mib: Option<u64>,
    chunk_kib: Option<u64>,
    deadline_ms: Option<u64>,
    gets_in_flight: Option<usize>,
    gets_per_uid: Option<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    stores: Vec<RawObjectStoreEntry>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawObjectStoreEntry {
    name: String,
    endpoint: String,
    region: String,
    bucket: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    access_key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_key: Option<String>,
    prefix: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    uids: Vec<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    write_recordings: bool,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawAround {
    enabled: Option<bool>,
    max_kib: Option<u64>,
    streams: Option<usize>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawWorkingSet {
    zero_pages: Option<bool>,
    scan_max_gib: Option<u64>,
    record: Option<bool>,
    record_pages: Option<u64>,
    record_ms: Option<u64>,
    replay: Option<bool>,
    max_recordings: Option<usize>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    connections: Option<usize>,
    connections_per_uid: Option<usize>,
    handshake_ms: Option<u64>,
    registrations_per_sec: Option<u32>,
    registrations_burst: Option<u32>,
    sessions_per_uid: Option<usize>,
    session_guest_gib: Option<u64>,
    total_guest_gib: Option<u64>,
    device_malformed_run: Option<u64>,
    restores_per_listener: Option<usize>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
    vm_labels: Option<usize>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    session_mib: Option<u64>,
    global_mib: Option<u64>,
    high_pct: Option<u64>,
    low_pct: Option<u64>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    dir: Option<PathBuf>,
}

/// A static Firecracker listen order (see [`crate::front::firecracker`]). No `pid`: a pid is not
/// known before the process exists.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawFirecracker {
    vm: String,
    socket: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    object: Option<RawObjectName>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
}

/// `object = { store = "...", key = "..." }` of a `[[firecracker]]` entry.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawObjectName {
    store: String,
    key: String,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    deadline_ms: Option<u64>,
    pin_limit_mib: Option<u64>,
    pin_total_mib: Option<u64>,
    granule_kib: Option<u64>,
    max_devices: Option<usize>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<PathBuf>,
    max_sessions: Option<usize>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    spin_us: Option<u64>,
    batch: Option<usize>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    filter: Option<String>,
}

/// Validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Control socket path.
    pub socket: PathBuf,
    /// Sessions served at once.
    pub max_sessions: usize,
    /// The longest a fault thread keeps polling after work before it sleeps (adaptive below).
    pub spin: Duration,
    /// Userfaultfd events read per read(2).
    pub batch: usize,
    /// Deadline for answering a device page-request group.
    pub device_deadline: Duration,
    /// Bytes one VM's devices may pin.
    pub pin_limit: u64,
    /// Bytes all VMs' pinned devices may map together.
    pub pin_total: u64,
    /// iommufd mapping granule, bytes.
    pub granule: u64,
    /// Devices per VM.
    pub max_devices: usize,
    /// Resident budgets.
    pub budget: Budget,
    /// Directory of the swap store files.
    pub store_dir: PathBuf,
    /// tracing filter.
    pub log_filter: String,
    /// Where Prometheus metrics are served over HTTP (loopback only); `None`: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// VMs that get a `vm` label of their own; the rest are counted under `vm="other"`.
    pub metrics_vm_labels: usize,
    /// Sockets to serve Firecracker restores on from the start.
    pub firecracker: Vec<ListenSpec>,
    /// What a client may make faultd spend.
    pub limits: Limits,
    /// Fault-around: serving sequential fault streams ahead (the `[around]` section).
    pub around: Around,
    /// Snapshot analysis, working-set recording and replay (`[working_set]`).
    pub working_set: WorkingSet,
    /// Object stores snapshots may be served from (`[object_store]`).
    pub object_store: ObjectStores,
}

/// Object stores snapshot memory may be served from (the `[object_store]` section; see
/// `engine::objects` and docs/object-store.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStores {
    /// Bytes the local chunk cache (`store.dir/object-cache`) may hold.
    pub cache_bytes: u64,
    /// Chunk size, bytes: a power of two from 512 KiB to 4 MiB.
    pub chunk_bytes: u64,
    /// From a chunk's first request to the failure of the sessions waiting on it.
    pub deadline: Duration,
    /// GETs in flight at once over every object.
    pub gets_in_flight: usize,
    /// GETs of one uid's sessions in flight at once (the rest stays for other uids).
    pub gets_per_uid: usize,
    /// The stores a client may name.
    pub stores: Vec<ObjectStoreSpec>,
}

/// One store a client may name in `register` (`[[object_store.stores]]`). faultd reads it
/// with its own credentials, so the client names only this entry and a key, and the key must
/// be under `prefix` as it reads for the client's uid. Its `Debug` never shows the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStoreSpec {
    /// What clients call it.
    pub name: String,
    /// `http://host:port` or `https://...` (path-style requests).
    pub endpoint: String,
    /// Region named in signatures.
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// Access key id and secret; None: the standard `AWS_*` environment of faultd.
    pub credentials: Option<objstore::Credentials>,
    /// Keys a client may name start with this; `{uid}` stands for the client's uid.
    pub prefix: String,
    /// The uids that may use this store; empty: any uid (then `prefix` must hold `{uid}`, so
    /// that each reads only its own keys).
    pub uids: Vec<u32>,
    /// Whether faultd writes working-set recordings beside the objects it restores (with its
    /// own credentials, `If-None-Match: *`, at a key it derives from the object's: see
    /// `engine::working_set`). Off: recordings there are read, never written.
    pub write_recordings: bool,
}

impl ObjectStoreSpec {
    /// Whether a client of uid `uid` may read `key` of this store; the refusal says why.
    pub fn allows(&self, uid: u32, key: &str) -> Result<(), String> {
        if !self.uids.is_empty() && !self.uids.contains(&uid) {
            return Err(format!(
                "uid {uid} may not use object store {:?} (config object_store.stores uids)",
                self.name
            ));
        }
        if !valid_object_key(key) {
            return Err(format!(
                "object key {key:?}: must be 1..={MAX_OBJECT_KEY} bytes of printable ASCII, \
                 '/'-separated, without empty, '.' or '..' segments"
            ));
        }
        let prefix = self.prefix.replace("{uid}", &uid.to_string());
        if !key.starts_with(&prefix) {
            return Err(format!(
                "object key {key:?} is not under {prefix:?}, the prefix uid {uid} may read in \
                 store {:?}",
                self.name
            ));
        }
        Ok(())
    }
}

/// Longest object key a client may name, bytes.
pub const MAX_OBJECT_KEY: usize = 1024;

/// A key with no way out of its prefix: printable ASCII, no empty, `.` or `..` segment, no
/// leading `/`.
pub fn valid_object_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_OBJECT_KEY
        && key.bytes().all(|b| b.is_ascii_graphic())
        && key
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

/// Fault-around settings (the `[around]` section; see docs/fault-around.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Around {
    /// Whether sequential streams are served ahead at all.
    pub enabled: bool,
    /// The farthest a look-ahead reaches past the fault, bytes (a multiple of 4 KiB).
    pub max_bytes: u64,
    /// Streams tracked at once per source (the vCPU path, each device).
    pub streams: usize,
}

/// Snapshot analysis (zero pages, digest), working-set recording and replay (the
/// `[working_set]` section; see `engine::snapshots` and `engine::working_set`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkingSet {
    /// Serve a snapshot's all-zero pages as zero pages (each snapshot file is scanned once).
    pub zero_pages: bool,
    /// Snapshot files larger than this are not scanned (bytes).
    pub scan_max: u64,
    /// Record the order of a restore's first demand faults on snapshot pages.
    pub record: bool,
    /// Pages one recording holds at most.
    pub record_pages: u64,
    /// How long after a session's start its first faults are recorded.
    pub record_for: Duration,
    /// Install a recording's pages ahead of the guest on a restore of its snapshot.
    pub replay: bool,
    /// Recordings kept in the store directory at most (the oldest are removed first).
    pub max_recordings: usize,
}

/// Most pages a recording may hold (`working_set.record_pages`): 1M pages, 8 MiB of offsets.
pub const MAX_RECORD_PAGES: u64 = 1 << 20;

/// Bounds on what clients may make faultd spend (the `[limits]` section). Each is refused,
/// named and counted when reached (see [`Limit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Control-socket connections open at once (registered or not), all uids together.
    pub connections: usize,
    /// Control-socket connections one uid may have open at once.
    pub connections_per_uid: usize,
    /// How long a connection may stay open without a request (the first, or the next admin
    /// request); a registered VMM is not held to it.
    pub handshake: Duration,
    /// Registrations per uid per second (the refill rate of its token bucket).
    pub registrations_per_sec: u32,
    /// Registrations a uid may make at once after a quiet spell (the bucket's size).
    pub registrations_burst: u32,
    /// Sessions one uid may have at once.
    pub sessions_per_uid: usize,
    /// Guest RAM of one session, bytes.
    pub session_guest: u64,
    /// Guest RAM of all sessions together, bytes.
    pub total_guest: u64,
    /// Malformed device records in a row (no valid group between) before the device is
    /// quarantined.
    pub device_malformed_run: u64,
    /// Firecracker restores one listener serves at once (connections being read count too).
    pub restores_per_listener: usize,
}

/// One of the [`Limits`], as refusals, logs and the `limit` metrics label name it (its key in
/// `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// [`Limits::connections`].
    Connections,
    /// [`Limits::connections_per_uid`].
    ConnectionsPerUid,
    /// [`Limits::handshake`].
    Handshake,
    /// [`Limits::registrations_per_sec`].
    RegistrationsPerSec,
    /// [`Limits::sessions_per_uid`].
    SessionsPerUid,
    /// [`Limits::session_guest`].
    SessionGuest,
    /// [`Limits::total_guest`].
    TotalGuest,
    /// A VM name has one live session at a time (not configurable).
    LiveName,
    /// [`Limits::restores_per_listener`].
    RestoresPerListener,
}

impl Limit {
    /// Every limit, for the metrics (each label is exported from the start, at 0).
    pub const ALL: [Limit; 9] = [
        Limit::Connections,
        Limit::ConnectionsPerUid,
        Limit::Handshake,
        Limit::RegistrationsPerSec,
        Limit::SessionsPerUid,
        Limit::SessionGuest,
        Limit::TotalGuest,
        Limit::LiveName,
        Limit::RestoresPerListener,
    ];

    /// The `limit` label and the key in `[limits]`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::ConnectionsPerUid => "connections_per_uid",
            Limit::Handshake => "handshake_ms",
            Limit::RegistrationsPerSec => "registrations_per_sec",
            Limit::SessionsPerUid => "sessions_per_uid",
            Limit::SessionGuest => "session_guest_gib",
            Limit::TotalGuest => "total_guest_gib",
            Limit::LiveName => "live_name",
            Limit::RestoresPerListener => "restores_per_listener",
        }
    }
}

/// Resident-memory budgets (bytes; 0: none) and their watermarks (percent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Per VM.
    pub session: u64,
    /// All VMs together.
    pub global: u64,
    /// Eviction starts above this share of a budget.
    pub high_pct: u64,
    /// ... and stops below this one.
    pub low_pct: u64,
}

impl Budget {
    /// Whether any budget is set (per VM or global).
    pub fn is_set(&self) -> bool {
        self.session > 0 || self.global > 0
    }
}

/// Command-line overrides; `None` keeps the configured value.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--spin-us`.
    pub spin_us: Option<u64>,
    /// `--log`.
    pub log_filter: Option<String>,
    /// `--store-dir`.
    pub store_dir: Option<PathBuf>,
    /// `--metrics-listen` ("" turns metrics off).
    pub metrics_listen: Option<String>,
}

impl Config {
    /// Loads the embedded default, then `path` over it (if given), then `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut raw = parse(DEFAULT_TOML, "embedded default")?;
        if let Some(path) = path {
            let (text, meta) = read_file(path)?;
            let file = parse(&text, &path.display().to_string())?;
            trust_file(path, &meta, &file)?;
            raw.merge(file);
        }
        raw.control.socket = overrides.socket.clone().or(raw.control.socket);
        raw.fault.spin_us = overrides.spin_us.or(raw.fault.spin_us);
        raw.log.filter = overrides.log_filter.clone().or(raw.log.filter);
        raw.store.dir = overrides.store_dir.clone().or(raw.store.dir);
        raw.metrics.listen = overrides.metrics_listen.clone().or(raw.metrics.listen);
        Config::try_from(raw)
    }

    /// Parses a TOML text over the embedded default (for tests and `--check-config`).
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut raw = parse(DEFAULT_TOML, "embedded default")?;
        raw.merge(parse(text, "text")?);
        Config::try_from(raw)
    }
}

impl Config {
    /// The configuration as a TOML file in the format [`Config::load`] reads, every key set
    /// (`--check-config` prints it). Loading it gives this configuration back, exactly for
    /// every configuration loaded from TOML (its sizes are whole MiB, KiB and GiB there).
    /// Fails only for a path that is not UTF-8, which TOML cannot hold.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(&RawConfig::from(self))
    }
}

/// The file form of a validated configuration: the inverse of `TryFrom<RawConfig>`.
impl From<&Config> for RawConfig {
    fn from(c: &Config) -> RawConfig {
        // Validated durations are at most minutes: their counts fit u64.
        let ms = |d: Duration| Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        RawConfig {
            control: RawControl {
                socket: Some(c.socket.clone()),
                max_sessions: Some(c.max_sessions),
            },
            fault: RawFault {
                spin_us: Some(u64::try_from(c.spin.as_micros()).unwrap_or(u64::MAX)),
                batch: Some(c.batch),
            },
            device: RawDevice {
                deadline_ms: ms(c.device_deadline),
                pin_limit_mib: Some(c.pin_limit >> 20),
                pin_total_mib: Some(c.pin_total >> 20),
                granule_kib: Some(c.granule >> 10),
                max_devices: Some(c.max_devices),
            },
            budget: RawBudget {
                session_mib: Some(c.budget.session >> 20),
                global_mib: Some(c.budget.global >> 20),
                high_pct: Some(c.budget.high_pct),
                low_pct: Some(c.budget.low_pct),
            },
            store: RawStore {
                dir: Some(c.store_dir.clone()),
            },
            log: RawLog {
                filter: Some(c.log_filter.clone()),
            },
            metrics: RawMetrics {
                listen: Some(c.metrics_listen.map_or_else(String::new, |a| a.to_string())),
                vm_labels: Some(c.metrics_vm_labels),
            },
            limits: RawLimits {
                connections: Some(c.limits.connections),
                connections_per_uid: Some(c.limits.connections_per_uid),
                handshake_ms: ms(c.limits.handshake),
                registrations_per_sec: Some(c.limits.registrations_per_sec),
                registrations_burst: Some(c.limits.registrations_burst),
                sessions_per_uid: Some(c.limits.sessions_per_uid),
                session_guest_gib: Some(c.limits.session_guest >> 30),
                total_guest_gib: Some(c.limits.total_guest >> 30),
                device_malformed_run: Some(c.limits.device_malformed_run),
                restores_per_listener: Some(c.limits.restores_per_listener),
            },
            working_set: RawWorkingSet {
                zero_pages: Some(c.working_set.zero_pages),
                scan_max_gib: Some(c.working_set.scan_max >> 30),
                record: Some(c.working_set.record),
                record_pages: Some(c.working_set.record_pages),
                record_ms: ms(c.working_set.record_for),
                replay: Some(c.working_set.replay),
                max_recordings: Some(c.working_set.max_recordings),
            },
            // A pid is never in a file (see RawFirecracker): it has none to write.
            firecracker: c
                .firecracker
                .iter()
                .map(|l| RawFirecracker {
                    vm: l.vm.clone(),
                    socket: l.socket.clone(),
                    snapshot: match &l.source {
                        ListenSource::File(path) => Some(path.clone()),
                        ListenSource::Object { .. } => None,
                    },
                    object: match &l.source {
                        ListenSource::File(_) => None,
                        ListenSource::Object { store, key } => Some(RawObjectName {
                            store: store.clone(),
                            key: key.clone(),
                        }),
                    },
                    uid: l.peer.uid,
                })
                .collect(),
            around: RawAround {
                enabled: Some(c.around.enabled),
                max_kib: Some(c.around.max_bytes >> 10),
                streams: Some(c.around.streams),
            },
            // Credentials are written too: the file must load back to this configuration.
            object_store: RawObjectStore {
                cache_mib: Some(c.object_store.cache_bytes >> 20),
                chunk_kib: Some(c.object_store.chunk_bytes >> 10),
                deadline_ms: ms(c.object_store.deadline),
                gets_in_flight: Some(c.object_store.gets_in_flight),
                gets_per_uid: Some(c.object_store.gets_per_uid),
                stores: c
                    .object_store
                    .stores
                    .iter()
                    .map(|s| RawObjectStoreEntry {
                        name: s.name.clone(),
                        endpoint: s.endpoint.clone(),
                        region: s.region.clone(),
                        bucket: s.bucket.clone(),
                        access_key: s.credentials.as_ref().map(|c| c.access_key.clone()),
                        secret_key: s.credentials.as_ref().map(|c| c.secret_key.clone()),
                        prefix: s.prefix.clone(),
                        uids: s.uids.clone(),
                        write_recordings: s.write_recordings,
                    })
                    .collect(),
            },
        }
    }
}

/// Reads `path` and stats the file it read (the same open file, so a rename between the two
/// cannot show a different file's owner and mode).
fn read_file(path: &Path) -> Result<(String, std::fs::Metadata), ConfigError> {
    use std::io::Read;
    let read = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(read)?;
    let meta = f.metadata().map_err(read)?;
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(read)?;
    Ok((text, meta))
}

/// Refuses a config file faultd must not trust. faultd runs as root and the file decides
/// which uid may read which object store prefix, so a file another user may write is a way to
/// another tenant's data: it must belong to root or to faultd's own user and be writable by
/// no one else. A file that holds an object store's secret key must also be unreadable by
/// others and by any group but root's (`--check-config` prints it, as the file already is).
fn trust_file(path: &Path, meta: &std::fs::Metadata, file: &RawConfig) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let refuse = |why: String| ConfigError::Unsafe {
        path: path.to_owned(),
        why,
    };
    let euid = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 && meta.uid() != euid {
        return Err(refuse(format!(
            "owned by uid {}, not by root or faultd's uid {euid}: that user could change which \
             clients reach which memory and stores (chown root it)",
            meta.uid()
        )));
    }
    if mode & 0o022 != 0 {
        return Err(refuse(format!(
            "mode {mode:04o} lets its group or others write it (chmod go-w it)"
        )));
    }
    let secret = file
        .object_store
        .stores
        .iter()
        .any(|s| s.secret_key.is_some());
    let readable = mode & 0o004 != 0 || (mode & 0o040 != 0 && meta.gid() != 0);
    if secret && readable {
        return Err(refuse(format!(
            "mode {mode:04o} (group {}) lets others read the object store secret_key it \
             holds (chmod 600 it, or give the credentials in faultd's AWS_* environment)",
            meta.gid()
        )));
    }
    Ok(())
}

fn parse(text: &str, origin: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        origin: origin.to_owned(),
        source,
    })
}

impl RawConfig {
    fn merge(&mut self, over: RawConfig) {
        self.control.socket = over.control.socket.or(self.control.socket.take());
        self.control.max_sessions = over.control.max_sessions.or(self.control.max_sessions);
        self.fault.spin_us = over.fault.spin_us.or(self.fault.spin_us);
        self.fault.batch = over.fault.batch.or(self.fault.batch);
        self.log.filter = over.log.filter.or(self.log.filter.take());
        self.device.deadline_ms = over.device.deadline_ms.or(self.device.deadline_ms);
        self.device.pin_limit_mib = over.device.pin_limit_mib.or(self.device.pin_limit_mib);
        self.device.pin_total_mib = over.device.pin_total_mib.or(self.device.pin_total_mib);
        self.device.granule_kib = over.device.granule_kib.or(self.device.granule_kib);
        self.device.max_devices = over.device.max_devices.or(self.device.max_devices);
        self.store.dir = over.store.dir.or(self.store.dir.take());
        self.budget.session_mib = over.budget.session_mib.or(self.budget.session_mib);
        self.budget.global_mib = over.budget.global_mib.or(self.budget.global_mib);
        self.budget.high_pct = over.budget.high_pct.or(self.budget.high_pct);
        self.budget.low_pct = over.budget.low_pct.or(self.budget.low_pct);
        self.metrics.listen = over.metrics.listen.or(self.metrics.listen.take());
        self.metrics.vm_labels = over.metrics.vm_labels.or(self.metrics.vm_labels);
        let (l, o) = (&mut self.limits, over.limits);
        l.connections = o.connections.or(l.connections);
        l.connections_per_uid = o.connections_per_uid.or(l.connections_per_uid);
        l.handshake_ms = o.handshake_ms.or(l.handshake_ms);
        l.registrations_per_sec = o.registrations_per_sec.or(l.registrations_per_sec);
        l.registrations_burst = o.registrations_burst.or(l.registrations_burst);
        l.sessions_per_uid = o.sessions_per_uid.or(l.sessions_per_uid);
        l.session_guest_gib = o.session_guest_gib.or(l.session_guest_gib);
        l.total_guest_gib = o.total_guest_gib.or(l.total_guest_gib);
        l.device_malformed_run = o.device_malformed_run.or(l.device_malformed_run);
        l.restores_per_listener = o.restores_per_listener.or(l.restores_per_listener);
        let (w, o) = (&mut self.working_set, over.working_set);
        w.zero_pages = o.zero_pages.or(w.zero_pages);
        w.scan_max_gib = o.scan_max_gib.or(w.scan_max_gib);
        w.record = o.record.or(w.record);
        w.record_pages = o.record_pages.or(w.record_pages);
        w.record_ms = o.record_ms.or(w.record_ms);
        w.replay = o.replay.or(w.replay);
        w.max_recordings = o.max_recordings.or(w.max_recordings);
        // Entries are a list, not keys: a file that lists any replaces the default's (none).
        if !over.firecracker.is_empty() {
            self.firecracker = over.firecracker;
        }
        let (a, o) = (&mut self.around, over.around);
        a.enabled = o.enabled.or(a.enabled);
        a.max_kib = o.max_kib.or(a.max_kib);
        a.streams = o.streams.or(a.streams);
        let (s, o) = (&mut self.object_store, over.object_store);
        s.cache_mib = o.cache_mib.or(s.cache_mib);
        s.chunk_kib = o.chunk_kib.or(s.chunk_kib);
        s.deadline_ms = o.deadline_ms.or(s.deadline_ms);
        s.gets_in_flight = o.gets_in_flight.or(s.gets_in_flight);
        s.gets_per_uid = o.gets_per_uid.or(s.gets_per_uid);
        // A list, as [[firecracker]]: a file that lists any replaces the default's (none).
        if !o.stores.is_empty() {
            s.stores = o.stores;
        }
    }
}

fn required<T>(v: Option<T>, field: &'static str) -> Result<T, ConfigError> {
    v.ok_or(ConfigError::Invalid {
        field,
        value: "(missing)".into(),
        why: "must be set (the embedded default sets it)",
    })
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Config, ConfigError> {
        let socket = required(raw.control.socket, "control.socket")?;
        if !socket.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "control.socket",
                value: socket.display().to_string(),
                why: "must be an absolute path",
            });
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if socket.as_os_str().len() >= 108 {
            return Err(ConfigError::Invalid {
                field: "control.socket",
                value: socket.display().to_string(),
                why: "must be shorter than 108 bytes (unix socket path limit)",
            });
        }
        let max_sessions = required(raw.control.max_sessions, "control.max_sessions")?;
        if !(1..=MAX_SESSIONS).contains(&max_sessions) {
            return Err(ConfigError::Invalid {
                field: "control.max_sessions",
                value: max_sessions.to_string(),
                why: "must be 1..=4096",
            });
        }
        let spin_us = required(raw.fault.spin_us, "fault.spin_us")?;
        if spin_us > MAX_SPIN_US {
            return Err(ConfigError::Invalid {
                field: "fault.spin_us",
                value: spin_us.to_string(),
                why: "must be 0..=10000",
            });
        }
        let batch = required(raw.fault.batch, "fault.batch")?;
        if !(1..=MAX_BATCH).contains(&batch) {
            return Err(ConfigError::Invalid {
                field: "fault.batch",
                value: batch.to_string(),
                why: "must be 1..=4096",
            });
        }
        let deadline_ms = required(raw.device.deadline_ms, "device.deadline_ms")?;
        if !(1..=60_000).contains(&deadline_ms) {
            return Err(ConfigError::Invalid {
                field: "device.deadline_ms",
                value: deadline_ms.to_string(),
                why: "must be 1..=60000",
            });
        }
        let pin_limit_mib = required(raw.device.pin_limit_mib, "device.pin_limit_mib")?;
        if !(2..=1 << 30).contains(&pin_limit_mib) {
            return Err(ConfigError::Invalid {
                field: "device.pin_limit_mib",
                value: pin_limit_mib.to_string(),
                why: "must be 2..=1073741824 (at least one 2 MiB granule)",
            });
        }
        let pin_total_mib = required(raw.device.pin_total_mib, "device.pin_total_mib")?;
        if !(2..=1 << 30).contains(&pin_total_mib) {
            return Err(ConfigError::Invalid {
                field: "device.pin_total_mib",
                value: pin_total_mib.to_string(),
                why: "must be 2..=1073741824 (at least one 2 MiB granule)",
            });
        }
        let granule_kib = required(raw.device.granule_kib, "device.granule_kib")?;
        if !(4..=1 << 20).contains(&granule_kib) || !granule_kib.is_power_of_two() {
            return Err(ConfigError::Invalid {
                field: "device.granule_kib",
                value: granule_kib.to_string(),
                why: "must be a power of two, 4..=1048576",
            });
        }
        let max_devices = required(raw.device.max_devices, "device.max_devices")?;
        if !(1..=s2map::MAX_DEVICES).contains(&max_devices) {
            return Err(ConfigError::Invalid {
                field: "device.max_devices",
                value: max_devices.to_string(),
                why: "must be 1..=32",
            });
        }
        let high_pct = required(raw.budget.high_pct, "budget.high_pct")?;
        let low_pct = required(raw.budget.low_pct, "budget.low_pct")?;
        if !(1..=100).contains(&high_pct) || low_pct >= high_pct {
            return Err(ConfigError::Invalid {
                field: "budget.low_pct",
                value: format!("{low_pct} (high_pct {high_pct})"),
                why: "must be below high_pct, which must be 1..=100",
            });
        }
        let mib = |v: Option<u64>, field: &'static str| -> Result<u64, ConfigError> {
            let v = required(v, field)?;
            v.checked_mul(1 << 20).ok_or(ConfigError::Invalid {
                field,
                value: v.to_string(),
                why: "too large",
            })
        };
        let budget = Budget {
            session: mib(raw.budget.session_mib, "budget.session_mib")?,
            global: mib(raw.budget.global_mib, "budget.global_mib")?,
            high_pct,
            low_pct,
        };
        let store_dir = required(raw.store.dir, "store.dir")?;
        if !store_dir.is_absolute() {
            return Err(ConfigError::Invalid {
                field: "store.dir",
                value: store_dir.display().to_string(),
                why: "must be an absolute path",
            });
        }
        let log_filter = required(raw.log.filter, "log.filter")?;
        if let Err(_e) = tracing_subscriber::EnvFilter::try_new(&log_filter) {
            return Err(ConfigError::Invalid {
                field: "log.filter",
                value: log_filter,
                why: "must be a valid tracing filter",
            });
        }
        let listen = required(raw.metrics.listen, "metrics.listen")?;
        let metrics_listen = if listen.is_empty() {
            None
        } else {
            let addr: SocketAddr = listen.parse().map_err(|_| ConfigError::Invalid {
                field: "metrics.listen",
                value: listen.clone(),
                why: "must be IP:PORT (or \"\" for no metrics)",
            })?;
            // The endpoint is unauthenticated and names VMs: it stays on the host. A remote
            // Prometheus reaches it through whatever the host already trusts (a proxy, a
            // node agent), not by faultd listening on the network.
            if !addr.ip().is_loopback() {
                return Err(ConfigError::Invalid {
                    field: "metrics.listen",
                    value: listen,
                    why: "must be a loopback address (the endpoint is unauthenticated)",
                });
            }
            Some(addr)
        };
        let metrics_vm_labels = required(raw.metrics.vm_labels, "metrics.vm_labels")?;
        if metrics_vm_labels > MAX_VM_LABELS {
            return Err(ConfigError::Invalid {
                field: "metrics.vm_labels",
                value: metrics_vm_labels.to_string(),
                why: "must be 0..=256",
            });
        }
        let firecracker = firecracker_entries(raw.firecracker, &socket)?;
        let limits = limits(raw.limits)?;
        let around = around(raw.around)?;
        let working_set = working_set(raw.working_set)?;
        let object_store = object_store(raw.object_store)?;
        Ok(Config {
            around,
            working_set,
            object_store,
            firecracker,
            limits,
            socket,
            max_sessions,
            spin: Duration::from_micros(spin_us),
            batch,
            device_deadline: Duration::from_millis(deadline_ms),
            pin_limit: pin_limit_mib << 20,
            pin_total: pin_total_mib << 20,
            granule: granule_kib << 10,
            max_devices,
            budget,
            store_dir,
            log_filter,
            metrics_listen,
            metrics_vm_labels,
        })
    }
}

/// Most `[[object_store.stores]]` entries.
pub const MAX_OBJECT_STORES: usize = 16;

/// Validates `[object_store]`.
fn object_store(raw: RawObjectStore) -> Result<ObjectStores, ConfigError> {
    let cache_mib = required(raw.cache_mib, "object_store.cache_mib")?;
    let chunk_kib = required(raw.chunk_kib, "object_store.chunk_kib")?;
    if !chunk_kib.is_power_of_two() || !(512..=4096).contains(&chunk_kib) {
        return Err(ConfigError::Invalid {
            field: "object_store.chunk_kib",
            value: chunk_kib.to_string(),
            why: "must be a power of two, 512..=4096",
        });
    }
    // At least one whole chunk fits (with its file trailer).
    if cache_mib == 0 || cache_mib << 10 <= chunk_kib {
        return Err(ConfigError::Invalid {
            field: "object_store.cache_mib",
            value: cache_mib.to_string(),
            why: "must be more than one chunk (object_store.chunk_kib)",
        });
    }
    let deadline_ms = required(raw.deadline_ms, "object_store.deadline_ms")?;
    if !(100..=600_000).contains(&deadline_ms) {
        return Err(ConfigError::Invalid {
            field: "object_store.deadline_ms",
            value: deadline_ms.to_string(),
            why: "must be 100..=600000",
        });
    }
    let gets_in_flight = required(raw.gets_in_flight, "object_store.gets_in_flight")?;
    if !(1..=256).contains(&gets_in_flight) {
        return Err(ConfigError::Invalid {
            field: "object_store.gets_in_flight",
            value: gets_in_flight.to_string(),
            why: "must be 1..=256",
        });
    }
    let gets_per_uid = required(raw.gets_per_uid, "object_store.gets_per_uid")?;
    if !(1..=gets_in_flight).contains(&gets_per_uid) {
        return Err(ConfigError::Invalid {
            field: "object_store.gets_per_uid",
            value: gets_per_uid.to_string(),
            why: "must be 1..=object_store.gets_in_flight",
        });
    }
    if raw.stores.len() > MAX_OBJECT_STORES {
        return Err(ConfigError::Invalid {
            field: "object_store.stores",
            value: raw.stores.len().to_string(),
            why: "at most 16 entries",
        });
    }
    let mut stores: Vec<ObjectStoreSpec> = Vec::with_capacity(raw.stores.len());
    for (index, e) in raw.stores.into_iter().enumerate() {
        let bad = |field: &'static str, value: &str, why: &'static str| ConfigError::ObjectStore {
            index,
            field,
            value: value.to_owned(),
            why,
        };
        if !valid_vm_name(&e.name) || stores.iter().any(|s| s.name == e.name) {
            return Err(bad(
                "object_store.stores.name",
                &e.name,
                "must be 1..=64 bytes of [A-Za-z0-9._-], unique",
            ));
        }
        if !(e.endpoint.starts_with("http://") || e.endpoint.starts_with("https://")) {
            return Err(bad(
                "object_store.stores.endpoint",
                &e.endpoint,
                "must be an http:// or https:// URL",
            ));
        }
        if e.region.is_empty() {
            return Err(bad("object_store.stores.region", "", "must be set"));
        }
        if e.bucket.is_empty() || e.bucket.contains('/') {
            return Err(bad(
                "object_store.stores.bucket",
                &e.bucket,
                "must be a bucket name (no '/')",
            ));
        }
        let credentials =
            match (e.access_key, e.secret_key) {
                (Some(access_key), Some(secret_key)) => Some(objstore::Credentials {
                    access_key,
                    secret_key,
                }),
                (None, None) => None,
                _ => return Err(bad(
                    "object_store.stores.access_key",
                    "(one of access_key, secret_key)",
                    "access_key and secret_key go together (neither: faultd's AWS_* environment)",
                )),
            };
        // Without {uid} every allowed uid reads the same keys: only for a listed few.
        if !e.prefix.contains("{uid}") && e.uids.is_empty() {
            return Err(bad(
                "object_store.stores.prefix",
                &e.prefix,
                "must contain {uid} unless uids lists who may use the store",
            ));
        }
        // Each uid's prefix must be no other uid's prefix's start: "tenants/{uid}" would give
        // uid 1 the keys of uids 10, 11, 100, ... A '/' right after each {uid} ends the number.
        if e.prefix
            .split("{uid}")
            .skip(1)
            .any(|rest| !rest.starts_with('/'))
        {
            return Err(bad(
                "object_store.stores.prefix",
                &e.prefix,
                "{uid} must be followed by '/' (\"tenants/{uid}/\"), or uid 1 would reach the \
                 keys of uid 10, 11, 100, ...",
            ));
        }
        // A prefix is a key's first segments, with or without the '/' that ends the last.
        let sample = e.prefix.replace("{uid}", "0");
        let segments = sample.strip_suffix('/').unwrap_or(&sample);
        if e.prefix.starts_with('/') || (!sample.is_empty() && !valid_object_key(segments)) {
            return Err(bad(
                "object_store.stores.prefix",
                &e.prefix,
                "must be printable ASCII without a leading '/' or empty, '.' or '..' segments",
            ));
        }
        stores.push(ObjectStoreSpec {
            name: e.name,
            endpoint: e.endpoint,
            region: e.region,
            bucket: e.bucket,
            credentials,
            prefix: e.prefix,
            uids: e.uids,
            write_recordings: e.write_recordings,
        });
    }
    Ok(ObjectStores {
        cache_bytes: cache_mib << 20,
        chunk_bytes: chunk_kib << 10,
        deadline: Duration::from_millis(deadline_ms),
        gets_in_flight,
        gets_per_uid,
        stores,
    })
}

/// Validates `[around]`.
fn around(raw: RawAround) -> Result<Around, ConfigError> {
    let enabled = required(raw.enabled, "around.enabled")?;
    let max_kib = required(raw.max_kib, "around.max_kib")?;
    // Up to 64 MiB: one look-ahead is one burst of the fault thread's work, and every other
    // source of the VM waits behind it.
    if !(4..=65_536).contains(&max_kib) || max_kib % 4 != 0 {
        return Err(ConfigError::Invalid {
            field: "around.max_kib",
            value: max_kib.to_string(),
            why: "must be a multiple of 4, 4..=65536",
        });
    }
    let streams = required(raw.streams, "around.streams")?;
    if !(1..=64).contains(&streams) {
        return Err(ConfigError::Invalid {
            field: "around.streams",
            value: streams.to_string(),
            why: "must be 1..=64",
        });
    }
    Ok(Around {
        enabled,
        max_bytes: max_kib << 10,
        streams,
    })
}

/// Validates `[working_set]`.
fn working_set(raw: RawWorkingSet) -> Result<WorkingSet, ConfigError> {
    let scan_max_gib = required(raw.scan_max_gib, "working_set.scan_max_gib")?;
    if !(1..=1 << 20).contains(&scan_max_gib) {
        return Err(ConfigError::Invalid {
            field: "working_set.scan_max_gib",
            value: scan_max_gib.to_string(),
            why: "must be 1..=1048576",
        });
    }
    let record_pages = required(raw.record_pages, "working_set.record_pages")?;
    if !(1..=MAX_RECORD_PAGES).contains(&record_pages) {
        return Err(ConfigError::Invalid {
            field: "working_set.record_pages",
            value: record_pages.to_string(),
            why: "must be 1..=1048576",
        });
    }
    let record_ms = required(raw.record_ms, "working_set.record_ms")?;
    if !(1..=3_600_000).contains(&record_ms) {
        return Err(ConfigError::Invalid {
            field: "working_set.record_ms",
            value: record_ms.to_string(),
            why: "must be 1..=3600000",
        });
    }
    let max_recordings = required(raw.max_recordings, "working_set.max_recordings")?;
    if !(1..=4096).contains(&max_recordings) {
        return Err(ConfigError::Invalid {
            field: "working_set.max_recordings",
            value: max_recordings.to_string(),
            why: "must be 1..=4096",
        });
    }
    Ok(WorkingSet {
        zero_pages: required(raw.zero_pages, "working_set.zero_pages")?,
        scan_max: scan_max_gib << 30,
        record: required(raw.record, "working_set.record")?,
        record_pages,
        record_for: Duration::from_millis(record_ms),
        replay: required(raw.replay, "working_set.replay")?,
        max_recordings,
    })
}

/// Validates `[limits]`: every bound set and within its range.
fn limits(raw: RawLimits) -> Result<Limits, ConfigError> {
    fn within<T: PartialOrd + ToString>(
        v: Option<T>,
        field: &'static str,
        range: std::ops::RangeInclusive<T>,
        why: &'static str,
    ) -> Result<T, ConfigError> {
        let v = required(v, field)?;
        if !range.contains(&v) {
            return Err(ConfigError::Invalid {
                field,
                value: v.to_string(),
                why,
            });
        }
        Ok(v)
    }
    let session_gib = within(
        raw.session_guest_gib,
        "limits.session_guest_gib",
        1..=MAX_GUEST_GIB,
        "must be 1..=65536",
    )?;
    let total_gib = within(
        raw.total_guest_gib,
        "limits.total_guest_gib",
        1..=MAX_GUEST_GIB,
        "must be 1..=65536",
    )?;
    Ok(Limits {
        connections: within(
            raw.connections,
            "limits.connections",
            1..=MAX_CONNECTIONS,
            "must be 1..=65536",
        )?,
        connections_per_uid: within(
            raw.connections_per_uid,
            "limits.connections_per_uid",
            1..=MAX_CONNECTIONS,
            "must be 1..=65536",
        )?,
        handshake: Duration::from_millis(within(
            raw.handshake_ms,
            "limits.handshake_ms",
            1..=600_000,
            "must be 1..=600000",
        )?),
        registrations_per_sec: within(
            raw.registrations_per_sec,
            "limits.registrations_per_sec",
            1..=100_000,
            "must be 1..=100000",
        )?,
        registrations_burst: within(
            raw.registrations_burst,
            "limits.registrations_burst",
            1..=100_000,
            "must be 1..=100000",
        )?,
        sessions_per_uid: within(
            raw.sessions_per_uid,
            "limits.sessions_per_uid",
            1..=MAX_SESSIONS,
            "must be 1..=4096",
        )?,
        session_guest: session_gib << 30,
        total_guest: total_gib << 30,
        device_malformed_run: within(
            raw.device_malformed_run,
            "limits.device_malformed_run",
            1..=1 << 30,
            "must be 1..=1073741824",
        )?,
        restores_per_listener: within(
            raw.restores_per_listener,
            "limits.restores_per_listener",
            1..=MAX_SESSIONS,
            "must be 1..=4096",
        )?,
    })
}

/// Validates `[[firecracker]]` entries: each as a listen order, sockets and VM names unique,
/// none on the control socket.
fn firecracker_entries(
    raw: Vec<RawFirecracker>,
    control: &Path,
) -> Result<Vec<ListenSpec>, ConfigError> {
    let mut out: Vec<ListenSpec> = Vec::with_capacity(raw.len());
    for (index, e) in raw.into_iter().enumerate() {
        let source = ListenSource::from_parts(e.snapshot, e.object.map(|o| (o.store, o.key)))
            .map_err(|why| ConfigError::Firecracker {
                index,
                field: "snapshot",
                value: String::new(),
                why,
            })?;
        let spec = ListenSpec::new(
            e.vm,
            e.socket,
            source,
            PeerRule {
                uid: e.uid,
                pid: None,
            },
        )
        .map_err(|e| ConfigError::Firecracker {
            index,
            field: e.field,
            value: e.value,
            why: e.why,
        })?;
        let bad = |field, value: String, why| ConfigError::Firecracker {
            index,
            field,
            value,
            why,
        };
        if spec.socket == control {
            return Err(bad(
                "socket",
                spec.socket.display().to_string(),
                "is the control socket",
            ));
        }
        if out.iter().any(|o| o.socket == spec.socket) {
            return Err(bad(
                "socket",
                spec.socket.display().to_string(),
                "is listed by an earlier entry",
            ));
        }
        if out.iter().any(|o| o.vm == spec.vm) {
            return Err(bad("vm", spec.vm, "is listed by an earlier entry"));
        }
        out.push(spec);
    }
    Ok(out)
}

/// sun_path holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Longest VM name.
pub const MAX_VM_NAME: usize = 64;

/// Longest Firecracker listener name: each restore's session is named `NAME-N` (N up to 10
/// digits), a VM name of at most [`MAX_VM_NAME`] bytes.
pub const MAX_LISTENER_NAME: usize = MAX_VM_NAME - 11;

/// Whether `vm` is a VM name faultd takes: 1..=[`MAX_VM_NAME`] bytes of `[A-Za-z0-9._-]` (it
/// names store files and metric labels).
pub fn valid_vm_name(vm: &str) -> bool {
    !vm.is_empty()
        && vm.len() <= MAX_VM_NAME
        && vm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Which process may connect to a Firecracker socket (checked with SO_PEERCRED).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerRule {
    /// The peer's uid must be this.
    pub uid: Option<u32>,
    /// The peer's pid must be this.
    pub pid: Option<i32>,
}

impl PeerRule {
    /// Whether a peer with `uid` and `pid` (None: the kernel did not say) is admitted; the
    /// reason if not.
    pub fn admits(&self, uid: u32, pid: Option<i32>) -> Result<(), String> {
        if let Some(want) = self.uid {
            if uid != want {
                return Err(format!(
                    "peer uid {uid} is not the expected uid {want} (pid {})",
                    shown_pid(pid)
                ));
            }
        }
        if let Some(want) = self.pid {
            if pid != Some(want) {
                return Err(format!(
                    "peer pid {} is not the expected pid {want}",
                    shown_pid(pid)
                ));
            }
        }
        Ok(())
    }
}

fn shown_pid(pid: Option<i32>) -> String {
    pid.map_or_else(|| "unknown".into(), |p| p.to_string())
}

/// What a Firecracker listener's restores read their memory from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenSource {
    /// The memory snapshot file (an absolute path).
    File(PathBuf),
    /// An object in a configured store (`[[object_store.stores]]`), read with faultd's own
    /// credentials: only a key the store's rules let the admitted uid read is served.
    Object {
        /// The store's name in the config.
        store: String,
        /// The object's key.
        key: String,
    },
}

impl ListenSource {
    /// Exactly one of a snapshot path and an object (store, key), else why not.
    pub fn from_parts(
        snapshot: Option<PathBuf>,
        object: Option<(String, String)>,
    ) -> Result<ListenSource, &'static str> {
        match (snapshot, object) {
            (Some(path), None) => Ok(ListenSource::File(path)),
            (None, Some((store, key))) => Ok(ListenSource::Object { store, key }),
            (None, None) => Err("names neither a snapshot file nor an object: give one"),
            (Some(_), Some(_)) => Err("names both a snapshot file and an object: give one"),
        }
    }

    /// For logs: the path, or `store:key`.
    pub fn describe(&self) -> String {
        match self {
            ListenSource::File(path) => path.display().to_string(),
            ListenSource::Object { store, key } => format!("object {store}:{key}"),
        }
    }
}

/// A validated order to serve Firecracker restores of `vm` on `socket` from `source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// VM name for logs and metrics.
    pub vm: String,
    /// The socket Firecracker's `backend_path` names.
    pub socket: PathBuf,
    /// The memory snapshot: a file or an object.
    pub source: ListenSource,
    /// Who may connect.
    pub peer: PeerRule,
}

/// A listen order with a field faultd refuses without looking at the file system.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value}: {why}")]
pub struct SpecError {
    /// `vm`, `socket` or `snapshot`.
    pub field: &'static str,
    /// The value given.
    pub value: String,
    /// What it must be.
    pub why: &'static str,
}

impl ListenSpec {
    /// Checks what needs no I/O: the VM name, absolute paths, the socket path's length.
    pub fn new(
        vm: String,
        socket: PathBuf,
        source: ListenSource,
        peer: PeerRule,
    ) -> Result<ListenSpec, SpecError> {
        if !valid_vm_name(&vm) || vm.len() > MAX_LISTENER_NAME {
            return Err(SpecError {
                field: "vm",
                value: vm,
                why: "must be 1..=53 bytes of [A-Za-z0-9._-] (a restore's session is named \
                      NAME-N, which must fit a VM name's 64)",
            });
        }
        if !socket.is_absolute() {
            return Err(SpecError {
                field: "socket",
                value: socket.display().to_string(),
                why: "must be an absolute path",
            });
        }
        // faultd makes the socket in its directory under its file name, and follows no
        // symbolic link on the way: neither may be left to resolution (a `..`, a trailing `/`).
        if !plain_path(&socket) || socket.file_name().is_none() {
            return Err(SpecError {
                field: "socket",
                value: socket.display().to_string(),
                why: "must name a file in a directory, with no `.` or `..` component",
            });
        }
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(SpecError {
                field: "socket",
                value: socket.display().to_string(),
                why: "must be shorter than 108 bytes (unix socket path limit)",
            });
        }
        match &source {
            ListenSource::File(snapshot) if !snapshot.is_absolute() => {
                return Err(SpecError {
                    field: "snapshot",
                    value: snapshot.display().to_string(),
                    why: "must be an absolute path",
                });
            }
            ListenSource::File(snapshot) if !plain_path(snapshot) => {
                return Err(SpecError {
                    field: "snapshot",
                    value: snapshot.display().to_string(),
                    why: "must have no `.` or `..` component",
                });
            }
            // An object's key is checked, with the store's rules, when listening
            // (ObjectStoreSpec::allows), as a registration's is.
            ListenSource::File(_) | ListenSource::Object { .. } => {}
        }
        Ok(ListenSpec {
            vm,
            socket,
            source,
            peer,
        })
    }
}

/// Whether `path` has only normal components after its root (no `.`, no `..`, which
/// `Path::components` would otherwise hide or keep) and does not end in `/`.
fn plain_path(path: &Path) -> bool {
    let bytes = path.as_os_str().as_encoded_bytes();
    !bytes.ends_with(b"/")
        && bytes
            .split(|&b| b == b'/')
            .skip(1)
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_stores_secret_never_shows_in_debug() {
        let spec = ObjectStoreSpec {
            name: "s".into(),
            endpoint: "http://127.0.0.1:1".into(),
            region: "r".into(),
            bucket: "b".into(),
            credentials: Some(objstore::Credentials {
                access_key: "AKIDEXAMPLE".into(),
                secret_key: "wJalrXUtnFEMI-secret".into(),
            }),
            prefix: "tenants/{uid}/".into(),
            uids: vec![],
            write_recordings: false,
        };
        let shown = format!("{spec:?} {spec:#?}");
        assert!(shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(!shown.contains("wJalrXUtnFEMI-secret"), "{shown}");
    }

    #[test]
    fn an_object_store_prefix_where_one_uid_reaches_anothers_keys_is_refused() {
        let store = |prefix: &str| {
            format!(
                "[[object_store.stores]]\nname = \"s\"\nendpoint = \"http://127.0.0.1:1\"\n\
                 region = \"r\"\nbucket = \"b\"\nprefix = \"{prefix}\"\n"
            )
        };
        for prefix in ["tenants/{uid}", "snap-{uid}", "t/{uid}-x/", "{uid}/a/{uid}"] {
            match Config::from_toml(&store(prefix)) {
                Err(ConfigError::ObjectStore { field, why, .. }) => {
                    assert_eq!(field, "object_store.stores.prefix");
                    assert!(why.contains("followed by '/'"), "{prefix}: {why}");
                }
                other => panic!("{prefix}: expected a refusal, got {other:?}"),
            }
        }
        for prefix in ["tenants/{uid}/", "{uid}/", "a/{uid}/b/", "snap-{uid}/"] {
            let c = Config::from_toml(&store(prefix)).unwrap();
            let s = &c.object_store.stores[0];
            assert!(s
                .allows(1, &format!("{}k", prefix.replace("{uid}", "1")))
                .is_ok());
            // No uid's keys are another's: 1 never reaches 10's.
            let tens = format!("{}k", prefix.replace("{uid}", "10"));
            assert!(
                s.allows(1, &tens).is_err(),
                "{prefix}: uid 1 reaches {tens}"
            );
        }
    }

    /// Writes `text` to a file of mode `mode` owned by `uid` and loads it.
    fn load_file(text: &str, mode: u32, uid: u32) -> Result<Config, ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faultd.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let uid = nix::unistd::Uid::from_raw(uid);
        nix::unistd::chown(&path, Some(uid), None).unwrap();
        Config::load(Some(&path), &Overrides::default())
    }

    #[test]
    fn a_config_file_others_may_change_or_read_secrets_from_is_refused() {
        let me = nix::unistd::geteuid().as_raw();
        let secret = r#"
[[object_store.stores]]
name = "s"
endpoint = "http://127.0.0.1:7480"
region = "r"
bucket = "b"
access_key = "k"
secret_key = "s3cr3t"
prefix = "tenants/{uid}/"
"#;
        let unsafe_why = |r: Result<Config, ConfigError>| match r {
            Err(ConfigError::Unsafe { why, .. }) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        // A secret only the owner reads, and a file without one that others read: fine.
        assert!(load_file(secret, 0o600, me).is_ok());
        assert!(load_file("", 0o644, me).is_ok());
        // Others may read the secret.
        let why = unsafe_why(load_file(secret, 0o644, me));
        assert!(why.contains("secret_key") && why.contains("0644"), "{why}");
        assert!(!why.contains("s3cr3t"), "{why}");
        // Others may change it, with or without a secret.
        for mode in [0o664, 0o646, 0o666] {
            let why = unsafe_why(load_file("", mode, me));
            assert!(why.contains("write"), "{mode:o}: {why}");
        }
        // Another user owns it (only root can hand a file to another uid).
        if me == 0 {
            let why = unsafe_why(load_file("", 0o644, 4242));
            assert!(why.contains("uid 4242"), "{why}");
        }
    }

    #[test]
    fn socket_and_snapshot_paths_must_be_plain() {
        let spec = |socket: &str, snapshot: &str| {
            ListenSpec::new(
                "fc0".into(),
                socket.into(),
                ListenSource::File(snapshot.into()),
                PeerRule::default(),
            )
        };
        assert!(spec("/run/fc/a.sock", "/srv/fc/mem").is_ok());
        for socket in [
            "/run/fc/",
            "/run/fc/..",
            "/run/../a.sock",
            "/run/./a.sock",
            "/",
        ] {
            assert_eq!(
                spec(socket, "/srv/mem").unwrap_err().field,
                "socket",
                "{socket}"
            );
        }
        for snapshot in ["/srv/../mem", "/srv/./mem", "/srv/mem/"] {
            assert_eq!(spec("/run/a.sock", snapshot).unwrap_err().field, "snapshot");
        }
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.socket, PathBuf::from(faultd_proto::DEFAULT_SOCKET_PATH));
        assert_eq!(c.spin, Duration::from_micros(200));
    }

    #[test]
    fn file_overrides_default_and_flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.toml");
        std::fs::write(&path, "[fault]\nspin_us = 7\n").unwrap();
        let flags = Overrides {
            socket: Some("/tmp/x.sock".into()),
            ..Default::default()
        };
        let c = Config::load(Some(&path), &flags).unwrap();
        assert_eq!(c.spin, Duration::from_micros(7));
        assert_eq!(c.batch, 64);
        assert_eq!(c.socket, PathBuf::from("/tmp/x.sock"));
    }

    #[test]
    fn unknown_key_is_refused_naming_it() {
        let err = Config::from_toml("[fault]\nspinn_us = 3\n").unwrap_err();
        let text = format!("{:#}", anyhow::Error::from(err));
        assert!(text.contains("spinn_us"), "{text}");
    }

    #[test]
    fn out_of_range_value_names_field_and_value() {
        let err = Config::from_toml("[fault]\nspin_us = 99999\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "config field fault.spin_us = 99999: must be 0..=10000"
        );
    }

    #[test]
    fn object_store_get_slots_are_bounded_and_one_uids_share_is_at_most_all() {
        let ok =
            Config::from_toml("[object_store]\ngets_in_flight = 8\ngets_per_uid = 8\n").unwrap();
        assert_eq!(
            (ok.object_store.gets_in_flight, ok.object_store.gets_per_uid),
            (8, 8)
        );
        let d = Config::from_toml("").unwrap().object_store;
        assert_eq!((d.gets_in_flight, d.gets_per_uid), (16, 12));
        for (toml, field) in [
            ("gets_in_flight = 0", "object_store.gets_in_flight"),
            ("gets_in_flight = 257", "object_store.gets_in_flight"),
            ("gets_per_uid = 0", "object_store.gets_per_uid"),
            ("gets_per_uid = 17", "object_store.gets_per_uid"),
        ] {
            let err = Config::from_toml(&format!("[object_store]\n{toml}\n")).unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { field: f, .. } if f == field),
                "{toml}: {err}"
            );
        }
    }

    #[test]
    fn relative_socket_is_refused() {
        let err = Config::from_toml("[control]\nsocket = \"x.sock\"\n").unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                field: "control.socket",
                ..
            }
        ));
    }

    #[test]
    fn budget_watermarks_must_be_ordered() {
        let err = Config::from_toml("[budget]\nhigh_pct = 80\nlow_pct = 90\n").unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                field: "budget.low_pct",
                ..
            }
        ));
        let ok = Config::from_toml("[budget]\nsession_mib = 64\n").unwrap();
        assert_eq!(ok.budget.session, 64 << 20);
    }

    #[test]
    fn metrics_default_to_loopback_port_9597() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9597".parse().unwrap()));
    }

    #[test]
    fn empty_metrics_listen_turns_metrics_off() {
        let flags = Overrides {
            metrics_listen: Some(String::new()),
            ..Default::default()
        };
        let c = Config::load(None, &flags).unwrap();
        assert_eq!(c.metrics_listen, None);
    }

    #[test]
    fn metrics_on_a_non_loopback_address_are_refused() {
        let err = Config::from_toml("[metrics]\nlisten = \"0.0.0.0:9597\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "config field metrics.listen = 0.0.0.0:9597: must be a loopback address (the endpoint is unauthenticated)"
        );
    }

    #[test]
    fn malformed_metrics_address_is_refused_naming_it() {
        let err = Config::from_toml("[metrics]\nlisten = \"localhost\"\n").unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                field: "metrics.listen",
                ..
            }
        ));
    }

    #[test]
    fn firecracker_entries_are_read_with_their_peer_rule() {
        let c = Config::from_toml(
            "[[firecracker]]\nvm = \"fc0\"\nsocket = \"/run/fc0.sock\"\nsnapshot = \"/srv/fc0.mem\"\nuid = 1000\n\
             [[firecracker]]\nvm = \"fc1\"\nsocket = \"/run/fc1.sock\"\nsnapshot = \"/srv/fc1.mem\"\n",
        )
        .unwrap();
        assert_eq!(c.firecracker.len(), 2);
        assert_eq!(c.firecracker[0].peer.uid, Some(1000));
        assert_eq!(c.firecracker[1].socket, PathBuf::from("/run/fc1.sock"));
    }

    #[test]
    fn a_stores_write_recordings_is_off_unless_set_and_round_trips() {
        let store = |extra: &str| {
            format!(
                "[[object_store.stores]]\nname = \"s\"\nendpoint = \"http://127.0.0.1:1\"\n\
                 region = \"r\"\nbucket = \"b\"\nprefix = \"tenants/{{uid}}/\"\n{extra}"
            )
        };
        let off = Config::from_toml(&store("")).unwrap();
        assert!(!off.object_store.stores[0].write_recordings);
        let on = Config::from_toml(&store("write_recordings = true\n")).unwrap();
        assert!(on.object_store.stores[0].write_recordings);
        for c in [off, on] {
            assert_eq!(Config::from_toml(&c.to_toml().unwrap()).unwrap(), c);
        }
    }

    #[test]
    fn a_firecracker_entry_may_name_an_object_instead_of_a_file_and_round_trips() {
        let c = Config::from_toml(
            "[[firecracker]]\nvm = \"fc0\"\nsocket = \"/run/fc0.sock\"\nuid = 1000\n\
             object = { store = \"rgw\", key = \"tenants/1000/fc0/mem\" }\n",
        )
        .unwrap();
        assert_eq!(
            c.firecracker[0].source,
            ListenSource::Object {
                store: "rgw".into(),
                key: "tenants/1000/fc0/mem".into()
            }
        );
        assert_eq!(Config::from_toml(&c.to_toml().unwrap()).unwrap(), c);
        for (body, why) in [
            ("", "names neither"),
            (
                "snapshot = \"/s\"\nobject = { store = \"r\", key = \"k\" }\n",
                "names both",
            ),
        ] {
            let toml = format!("[[firecracker]]\nvm = \"a\"\nsocket = \"/r/a\"\n{body}");
            let err = Config::from_toml(&toml).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn bad_firecracker_entries_are_refused_naming_entry_and_field() {
        let entry = |vm: &str, socket: &str| {
            format!("[[firecracker]]\nvm = \"{vm}\"\nsocket = \"{socket}\"\nsnapshot = \"/s\"\n")
        };
        let relative = Config::from_toml(&entry("fc0", "x.sock")).unwrap_err();
        assert_eq!(
            relative.to_string(),
            "config field firecracker[0].socket = x.sock: must be an absolute path"
        );
        let twice = Config::from_toml(&(entry("a", "/r/a") + &entry("b", "/r/a"))).unwrap_err();
        assert!(
            twice
                .to_string()
                .starts_with("config field firecracker[1].socket"),
            "{twice}"
        );
        let same_vm = Config::from_toml(&(entry("a", "/r/a") + &entry("a", "/r/b"))).unwrap_err();
        assert!(
            same_vm
                .to_string()
                .starts_with("config field firecracker[1].vm"),
            "{same_vm}"
        );
        let pid = Config::from_toml(&(entry("a", "/r/a") + "pid = 7\n")).unwrap_err();
        let text = format!("{:#}", anyhow::Error::from(pid));
        assert!(text.contains("pid"), "{text}");
    }

    #[test]
    fn limits_default_to_finite_bounds_and_refuse_zero_naming_the_field() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(c.limits.connections, 512);
        assert_eq!(c.limits.connections_per_uid, 64);
        assert_eq!(c.limits.session_guest, 256 << 30);
        let err = Config::from_toml("[limits]\nconnections = 0\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "config field limits.connections = 0: must be 1..=65536"
        );
    }

    #[test]
    fn the_default_printed_as_toml_loads_back_the_same() {
        let c = Config::load(None, &Overrides::default()).unwrap();
        assert_eq!(Config::from_toml(&c.to_toml().unwrap()).unwrap(), c);
    }

    #[test]
    fn a_config_with_every_key_changed_printed_as_toml_loads_back_the_same() {
        let text = "[control]\nsocket = \"/run/x/f.sock\"\nmax_sessions = 7\n\
             [fault]\nspin_us = 3\nbatch = 5\n\
             [device]\ndeadline_ms = 9\npin_limit_mib = 6\npin_total_mib = 10\ngranule_kib = 8\nmax_devices = 2\n\
             [budget]\nsession_mib = 11\nglobal_mib = 13\nhigh_pct = 70\nlow_pct = 60\n\
             [store]\ndir = \"/srv/st\"\n[log]\nfilter = \"faultd=debug\"\n\
             [metrics]\nlisten = \"[::1]:0\"\nvm_labels = 3\n\
             [limits]\nconnections = 17\nconnections_per_uid = 4\nhandshake_ms = 19\n\
             registrations_per_sec = 23\nregistrations_burst = 29\nsessions_per_uid = 2\n\
             session_guest_gib = 31\ntotal_guest_gib = 37\ndevice_malformed_run = 41\n\
             [around]\nenabled = false\nmax_kib = 12\nstreams = 5\n\
             [[firecracker]]\nvm = \"fc0\"\nsocket = \"/run/fc0.sock\"\n\
             snapshot = \"/srv/fc0.mem\"\nuid = 1000\n\
             [[firecracker]]\nvm = \"fc1\"\nsocket = \"/run/fc1.sock\"\nsnapshot = \"/srv/fc1.mem\"\n";
        let c = Config::from_toml(text).unwrap();

        let printed = c.to_toml().unwrap();

        // Every key above differs from the default, so a key the print left out would load
        // back as the default and differ.
        assert_eq!(Config::from_toml(&printed).unwrap(), c, "{printed}");
        assert_eq!(c.metrics_listen, Some("[::1]:0".parse().unwrap()));
    }

    #[test]
    fn no_metrics_prints_as_the_empty_listen_address() {
        let c = Config::from_toml("[metrics]\nlisten = \"\"\n").unwrap();
        let printed = c.to_toml().unwrap();
        assert!(printed.contains("listen = \"\""), "{printed}");
        assert_eq!(Config::from_toml(&printed).unwrap(), c);
    }

    #[test]
    fn wrong_type_is_refused() {
        let err = Config::from_toml("[control]\nmax_sessions = \"many\"\n").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }));
    }
}

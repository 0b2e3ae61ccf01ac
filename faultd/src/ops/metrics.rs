//! Prometheus metrics: what is recorded on the fault path, what is read at scrape time, and the
//! HTTP endpoint that serves them.
//!
//! Owns: the registry, the bounded `vm` label, the per-session handles the session threads
//! record into, and `/metrics`. Refuses to own: the counters themselves (`Session::counters`, in the engine,
//! stay the one source of truth that the control protocol's `stats` reads too).
//!
//! Two kinds of metric, chosen by cost on the fault path:
//! - Recorded as faults happen: the fault-latency histograms and the faults in flight. A session
//!   resolves its handles once, when it starts ([`DaemonMetrics::session`]); a fault then costs
//!   one `Histogram::observe` (a handful of relaxed atomics), never a label lookup.
//! - Computed at scrape time from each live session's counters and s2map totals (resident and
//!   pinned bytes, device groups by code, deadline misses, ...): nothing extra on the fault
//!   path. Counters of sessions that ended are kept per label while the label lives, so a
//!   counter never goes backwards while its series exists.
//!
//! The `vm` label is bounded (`metrics.vm_labels`): the first VMs to run get a label each, the
//! rest share `vm="other"`. A label is freed, and its series removed, when the last session of
//! its VM ends; so labels follow the VMs running now, not the first ones ever seen.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::ops::config::{Budget, Limit};
use faultd_proto::ErrorCode;
use http_body_util::Full;
use hyper::body::Bytes;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use tokio_util::sync::CancellationToken;

/// The label shared by the VMs beyond `metrics.vm_labels`.
pub const OTHER_VM: &str = "other";

/// Where a fault came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A vCPU (or the VMM) touched an absent page: a userfaultfd event.
    Vcpu,
    /// A device page-request group.
    Device,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Vcpu => "vcpu",
            Source::Device => "device",
        }
    }
}

/// How a fault ended, for the `outcome` label. Ordered: a device group that needed several
/// fills is labelled with the last of them in this order ([`FaultOutcome::max`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultOutcome {
    /// Nothing to fill: the page was resident already (a vCPU's duplicate event; a device
    /// group whose pages were resident and only needed mapping, or were mapped already).
    Present,
    /// Filled with zeros.
    Zero,
    /// Filled from the snapshot file.
    File,
    /// Filled from the swap store (the page had been evicted).
    Store,
    /// Not served: answered INVALID (device), or left unserved as an error (vCPU).
    Invalid,
    /// A device group answered INVALID because its deadline passed.
    Deadline,
}

impl FaultOutcome {
    const ALL: [FaultOutcome; 6] = [
        FaultOutcome::Present,
        FaultOutcome::Zero,
        FaultOutcome::File,
        FaultOutcome::Store,
        FaultOutcome::Invalid,
        FaultOutcome::Deadline,
    ];

    fn label(self) -> &'static str {
        match self {
            FaultOutcome::Present => "present",
            FaultOutcome::Zero => "zero",
            FaultOutcome::File => "file",
            FaultOutcome::Store => "store",
            FaultOutcome::Invalid => "invalid",
            FaultOutcome::Deadline => "deadline",
        }
    }

    /// Whether `source` can end this way (only those series are created).
    fn applies_to(self, source: Source) -> bool {
        self != FaultOutcome::Deadline || source == Source::Device
    }
}

/// Fault latency buckets: 1 us doubling to ~1.05 s (21 buckets). Fault service is a few to a
/// few hundred microseconds; doubling keeps `histogram_quantile` within a factor of 2 anywhere
/// in that range at a bounded number of series.
fn latency_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(1e-6, 2.0, 21).expect("constant, valid bucket parameters")
}

/// A faults-in-flight gauge as one session sees it: the session's own contribution is kept
/// here, so a gauge shared with other sessions (`vm="other"`) is moved by deltas, and the
/// contribution is taken back when the session's thread ends.
#[derive(Debug)]
pub struct InFlight {
    gauge: IntGauge,
    mine: i64,
}

impl InFlight {
    fn new(gauge: IntGauge) -> InFlight {
        InFlight { gauge, mine: 0 }
    }

    /// Sets this session's faults in flight to `n` (one atomic add, only when it changed).
    pub fn set(&mut self, n: usize) {
        let n = n as i64;
        if n != self.mine {
            self.gauge.add(n - self.mine);
            self.mine = n;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// One session's pre-resolved handles, owned by its fault thread.
#[derive(Debug)]
pub struct SessionMetrics {
    vcpu: Vec<Histogram>,
    device: Vec<Histogram>,
    /// vCPU faults read and not yet resolved (waiting for a retry).
    pub vcpu_in_flight: InFlight,
    /// Device groups read and not yet answered.
    pub device_in_flight: InFlight,
}

impl SessionMetrics {
    /// Handles registered nowhere: for a server that is not part of a daemon (unit tests).
    pub fn detached() -> SessionMetrics {
        let h = detached_histogram();
        let g = IntGauge::new("faultd_detached", "unregistered").expect("constant, valid name");
        SessionMetrics {
            vcpu: vec![h.clone(); FaultOutcome::ALL.len()],
            device: vec![h; FaultOutcome::ALL.len()],
            vcpu_in_flight: InFlight::new(g.clone()),
            device_in_flight: InFlight::new(g),
        }
    }

    /// Records one fault's service time.
    #[inline]
    pub fn observe(&self, source: Source, outcome: FaultOutcome, latency: Duration) {
        let by_outcome = match source {
            Source::Vcpu => &self.vcpu,
            Source::Device => &self.device,
        };
        by_outcome[outcome as usize].observe(latency.as_secs_f64());
    }
}

fn detached_histogram() -> Histogram {
    let opts =
        HistogramOpts::new("faultd_detached_seconds", "unregistered").buckets(latency_buckets());
    Histogram::with_opts(opts).expect("constant, valid histogram options")
}

/// `faultd_build_info`: what this faultd was built from, as labels of a constant 1 (join it
/// on `instance` to label other series with the version). `git_commit` is the commit the
/// build's tree was at (`unknown` when built outside a git checkout; a tree with uncommitted
/// changes reports its HEAD all the same).
fn build_info() -> IntGaugeVec {
    let info = gauge(
        "faultd_build_info",
        "What this faultd was built from: version, git commit, rustc version (always 1).",
        &["version", "git_commit", "rustc_version"],
    );
    info.with_label_values(&[
        env!("CARGO_PKG_VERSION"),
        env!("FAULTD_GIT_COMMIT"),
        env!("FAULTD_RUSTC_VERSION"),
    ])
    .set(1);
    info
}

/// The `process_*` metrics of faultd itself: the prometheus crate's process collector (open
/// and maximum fds, resident and virtual memory, threads, start time, from /proc/self), with
/// its CPU counter replaced. The crate's (0.14) counts whole seconds ((utime + stime) /
/// CLK_TCK in integer arithmetic), so a faultd that served a million faults in 0.9 s of CPU
/// would show 0 and CPU per fault could not be measured; this one reads getrusage(2)
/// (microseconds).
struct ProcessMetrics {
    inner: prometheus::process_collector::ProcessCollector,
}

/// The name the crate's collector and this one give the CPU counter.
const PROCESS_CPU: &str = "process_cpu_seconds_total";

impl ProcessMetrics {
    fn new() -> ProcessMetrics {
        ProcessMetrics {
            inner: prometheus::process_collector::ProcessCollector::for_self(),
        }
    }

    /// User and system CPU time of the whole process (every thread), seconds.
    fn cpu_seconds() -> Option<f64> {
        use nix::sys::resource::{getrusage, UsageWho};
        let u = getrusage(UsageWho::RUSAGE_SELF).ok()?;
        let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 * 1e-6;
        Some(secs(u.user_time()) + secs(u.system_time()))
    }
}

impl Collector for ProcessMetrics {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        // The crate's descriptions, its CPU counter's included: the replacement has the same
        // name, help and (no) labels.
        self.inner.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families: Vec<MetricFamily> = self
            .inner
            .collect()
            .into_iter()
            .filter(|f| f.name() != PROCESS_CPU)
            .collect();
        if let Some(cpu) = Self::cpu_seconds() {
            // A fresh counter per scrape, at the process's total: monotone because the
            // kernel's count is, and concurrent scrapes cannot race on an update.
            let counter = prometheus::Counter::new(
                PROCESS_CPU,
                "Total user and system CPU time spent in seconds.",
            )
            .expect("constant, valid counter options");
            counter.inc_by(cpu);
            families.extend(counter.collect());
        }
        families
    }
}

/// The monotone counters of a session (or, summed, of a label's sessions that ended).
#[derive(Debug, Default, Clone, Copy)]
#[allow(missing_docs)] // Each is the counter of the same name in the session's counters.
pub struct Totals {
    pub vcpu_faults: u64,
    pub device_success: u64,
    pub device_invalid: u64,
    pub device_deadline: u64,
    pub pin_evictions: u64,
    pub errors: u64,
    pub discarded_pages: u64,
    pub discarded_bytes: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    pub around_vcpu_pages: u64,
    pub around_device_granules: u64,
    pub around_stopped: u64,
    pub snapshot_zero_pages: u64,
    pub ws_recorded: u64,
    pub ws_prefetched: u64,
    pub ws_prefetched_zero: u64,
    pub ws_late: u64,
    pub ws_misses: u64,
}

/// What a scrape reads of one live session: plain numbers, so metrics need not know sessions.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sample {
    /// Its monotone counters.
    pub totals: Totals,
    /// Its gauges.
    pub levels: Levels,
}

impl Totals {
    fn add(&mut self, o: &Totals) {
        self.vcpu_faults += o.vcpu_faults;
        self.device_success += o.device_success;
        self.device_invalid += o.device_invalid;
        self.device_deadline += o.device_deadline;
        self.pin_evictions += o.pin_evictions;
        self.errors += o.errors;
        self.discarded_pages += o.discarded_pages;
        self.discarded_bytes += o.discarded_bytes;
        self.evictions += o.evictions;
        self.evicted_bytes += o.evicted_bytes;
        self.around_vcpu_pages += o.around_vcpu_pages;
        self.around_device_granules += o.around_device_granules;
        self.around_stopped += o.around_stopped;
        self.snapshot_zero_pages += o.snapshot_zero_pages;
        self.ws_recorded += o.ws_recorded;
        self.ws_prefetched += o.ws_prefetched;
        self.ws_prefetched_zero += o.ws_prefetched_zero;
        self.ws_late += o.ws_late;
        self.ws_misses += o.ws_misses;
    }
}

/// Gauges of one session (or of one label, summed over its live sessions).
#[derive(Debug, Default, Clone, Copy)]
#[allow(missing_docs)] // Named as the gauges they feed.
pub struct Levels {
    pub guest_bytes: u64,
    pub resident_bytes: u64,
    pub mapped_bytes: u64,
    pub stored_pages: u64,
    pub stored_bytes: u64,
    pub devices: u64,
}

impl Levels {
    fn add(&mut self, o: &Levels) {
        self.guest_bytes += o.guest_bytes;
        self.resident_bytes += o.resident_bytes;
        self.mapped_bytes += o.mapped_bytes;
        self.stored_pages += o.stored_pages;
        self.stored_bytes += o.stored_bytes;
        self.devices += o.devices;
    }
}

#[derive(Debug, Default)]
struct Labels {
    /// VM name -> live sessions using its own label.
    held: HashMap<String, usize>,
    /// Label -> counters of its sessions that ended.
    retired: HashMap<String, Totals>,
}

/// Daemon-wide metrics.
#[derive(Debug)]
pub struct DaemonMetrics {
    registry: Registry,
    latency: HistogramVec,
    in_flight: IntGaugeVec,
    protocol_errors: IntCounterVec,
    refusals: IntCounterVec,
    /// Bytes all VMs' pinned devices map now (set at each scrape).
    pinned: IntGauge,
    labels: Mutex<Labels>,
    vm_labels: usize,
}

impl DaemonMetrics {
    /// Metrics with at most `vm_labels` VMs labelled by name; `pin_limit` (the per-VM pin
    /// limit), `pin_total` (all VMs' pinned devices) and `budget` are exported as configured,
    /// for dashboards and alerts to compare with.
    pub fn new(vm_labels: usize, pin_limit: u64, pin_total: u64, budget: Budget) -> DaemonMetrics {
        let registry = Registry::new();
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "faultd_fault_latency_seconds",
                "Fault service time. vcpu: from reading the userfaultfd event to installing the \
                 page (which wakes the faulting thread); device: from reading the page-request \
                 group to answering it. outcome: present (nothing to fill), zero, file \
                 (snapshot), store (swap store, after an eviction), \
                 invalid (answered INVALID, or a vCPU fault left unserved as an error), \
                 deadline (device group answered INVALID at its deadline).",
            )
            .buckets(latency_buckets()),
            &["vm", "source", "outcome"],
        )
        .expect("constant, valid histogram options");
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "faultd_faults_in_flight",
                "Faults read and not finished: vcpu faults waiting for a retry, device groups \
                 not yet answered. Updated once per service pass of the session thread.",
            ),
            &["vm", "source"],
        )
        .expect("constant, valid gauge options");
        let protocol_errors = IntCounterVec::new(
            Opts::new(
                "faultd_protocol_errors_total",
                "Control-socket requests refused, by error code (the connection is closed).",
            ),
            &["code"],
        )
        .expect("constant, valid counter options");
        let refusals = IntCounterVec::new(
            Opts::new(
                "faultd_refusals_total",
                "Requests and connections refused because a [limits] bound was reached, by \
                 limit (its key in [limits]).",
            ),
            &["limit"],
        )
        .expect("constant, valid counter options");
        for limit in Limit::ALL {
            refusals.with_label_values(&[limit.name()]);
        }
        let pinned = IntGauge::new(
            "faultd_pinned_bytes",
            "Bytes all VMs' pinned devices (no PRI) map now; bounded by \
             faultd_device_pin_total_bytes.",
        )
        .expect("constant, valid gauge options");
        let configured = |name: &str, help: &str, value: u64| {
            let g = IntGauge::new(name, help).expect("constant, valid gauge options");
            g.set(i64::try_from(value).unwrap_or(i64::MAX));
            Box::new(g) as Box<dyn Collector>
        };
        for c in [
            Box::new(latency.clone()) as Box<dyn Collector>,
            Box::new(in_flight.clone()),
            Box::new(protocol_errors.clone()),
            Box::new(refusals.clone()),
            Box::new(pinned.clone()),
            Box::new(build_info()),
            Box::new(ProcessMetrics::new()),
            configured(
                "faultd_device_pin_limit_bytes",
                "Configured limit of device-mapped (pinned) bytes per VM (device.pin_limit_mib).",
                pin_limit,
            ),
            configured(
                "faultd_device_pin_total_bytes",
                "Configured limit of the bytes all VMs' pinned devices may map together \
                 (device.pin_total_mib).",
                pin_total,
            ),
            configured(
                "faultd_budget_per_vm_bytes",
                "Configured resident budget of each VM (budget.session_mib; 0: none). What it \
                 bounds is faultd_resident_bytes of the VM.",
                budget.session,
            ),
            configured(
                "faultd_budget_global_bytes",
                "Configured resident budget of all VMs together (budget.global_mib; 0: none). \
                 What it bounds is the sum of faultd_resident_bytes.",
                budget.global,
            ),
        ] {
            registry
                .register(c)
                .expect("distinct names in a fresh registry");
        }
        DaemonMetrics {
            registry,
            latency,
            in_flight,
            protocol_errors,
            refusals,
            pinned,
            labels: Mutex::new(Labels::default()),
            vm_labels,
        }
    }

    fn labels(&self) -> std::sync::MutexGuard<'_, Labels> {
        self.labels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Picks the `vm` label of a new session of VM `vm`: its own name while fewer than
    /// `vm_labels` VMs hold one (or this VM holds one already), `other` beyond. Release it
    /// with [`DaemonMetrics::release`] when the session ends.
    pub fn acquire_label(&self, vm: &str) -> Arc<str> {
        let mut labels = self.labels();
        if vm != OTHER_VM {
            if let Some(n) = labels.held.get_mut(vm) {
                *n += 1;
                return vm.into();
            }
            if labels.held.len() < self.vm_labels {
                labels.held.insert(vm.to_owned(), 1);
                return vm.into();
            }
        }
        OTHER_VM.into()
    }

    /// The handles a session with `label` records into, resolved once.
    pub fn session(&self, label: &str) -> SessionMetrics {
        let resolve = |source: Source| {
            FaultOutcome::ALL
                .iter()
                .map(|o| {
                    if o.applies_to(source) {
                        self.latency
                            .with_label_values(&[label, source.label(), o.label()])
                    } else {
                        // Never observed; a detached handle keeps the indexing by outcome.
                        detached_histogram()
                    }
                })
                .collect()
        };
        SessionMetrics {
            vcpu: resolve(Source::Vcpu),
            device: resolve(Source::Device),
            vcpu_in_flight: InFlight::new(
                self.in_flight
                    .with_label_values(&[label, Source::Vcpu.label()]),
            ),
            device_in_flight: InFlight::new(
                self.in_flight
                    .with_label_values(&[label, Source::Device.label()]),
            ),
        }
    }

    /// Ends a session's use of `label`: its counters join the label's retired totals, and a
    /// label no live session holds any more is freed with all its series. Call with the
    /// daemon's session table locked and the session already out of it, so a scrape sees the
    /// session either live or retired, never both or neither.
    pub fn release(&self, label: &str, ended: &Totals) {
        let mut labels = self.labels();
        labels
            .retired
            .entry(label.to_owned())
            .or_default()
            .add(ended);
        if label == OTHER_VM {
            return;
        }
        let Some(n) = labels.held.get_mut(label) else {
            return;
        };
        *n -= 1;
        if *n > 0 {
            return;
        }
        labels.held.remove(label);
        labels.retired.remove(label);
        for source in [Source::Vcpu, Source::Device] {
            for o in FaultOutcome::ALL {
                let _ = self
                    .latency
                    .remove_label_values(&[label, source.label(), o.label()]);
            }
            let _ = self.in_flight.remove_label_values(&[label, source.label()]);
        }
    }

    /// Counts a refused control request.
    pub fn protocol_error(&self, code: ErrorCode) {
        let label = serde_json::to_value(code)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{code:?}"));
        self.protocol_errors.with_label_values(&[&label]).inc();
    }

    /// Sets the bytes all VMs' pinned devices map now (before a scrape renders).
    pub fn set_pinned(&self, bytes: u64) {
        self.pinned.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Counts a refusal because `limit` was reached.
    pub fn refusal(&self, limit: Limit) {
        self.refusals.with_label_values(&[limit.name()]).inc();
    }

    /// The text exposition of every metric, with `live` the sessions being served now and
    /// their labels. Call with the daemon's session table locked (see [`Self::release`]).
    pub fn render<'a>(&self, live: impl Iterator<Item = (&'a str, Sample)>) -> String {
        self.render_with_objects(live, None)
    }

    /// [`DaemonMetrics::render`], with the object-store fetcher's and chunk cache's figures
    /// when object stores are configured.
    pub fn render_with_objects<'a>(
        &self,
        live: impl Iterator<Item = (&'a str, Sample)>,
        objects: Option<ObjectSample>,
    ) -> String {
        let mut totals: HashMap<String, Totals> = HashMap::new();
        let mut levels: HashMap<String, Levels> = HashMap::new();
        let mut sessions = 0i64;
        {
            let labels = self.labels();
            for (label, t) in &labels.retired {
                totals.entry(label.clone()).or_default().add(t);
            }
        }
        for (label, s) in live {
            sessions += 1;
            totals.entry(label.to_owned()).or_default().add(&s.totals);
            levels.entry(label.to_owned()).or_default().add(&s.levels);
        }
        let mut families = self.registry.gather();
        families.extend(scrape_families(&totals, &levels, sessions));
        if let Some(o) = objects {
            families.extend(object_families(&o));
        }
        families.retain(|f| !f.get_metric().is_empty());
        families.sort_by(|a, b| a.name().cmp(b.name()));
        TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| {
                tracing::error!("encoding metrics failed: {e}");
                String::new()
            })
    }
}

/// The object-store fetcher's and chunk cache's figures at a scrape (plain numbers: ops knows
/// nothing of the fetcher).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ObjectSample {
    /// Page reads served from the chunk cache.
    pub hits: u64,
    /// Page reads that waited for a GET (started or joined).
    pub misses: u64,
    /// GETs made (each attempt).
    pub gets: u64,
    /// GETs that failed.
    pub get_errors: u64,
    /// Bytes fetched.
    pub bytes_fetched: u64,
    /// Chunks refused because the object changed since its restore started.
    pub changed: u64,
    /// Bytes the chunk cache holds.
    pub cache_bytes: u64,
    /// Chunks the chunk cache holds.
    pub cache_chunks: u64,
    /// Chunks evicted from the cache to keep its bound.
    pub evicted: u64,
    /// Chunk fetches started ahead of the guest (replay of a recording beside the object).
    pub prefetch_gets: u64,
    /// GETs of recordings beside objects.
    pub recording_gets: u64,
    /// PUTs of recordings beside objects.
    pub recording_puts: u64,
    /// Restores from an object kept across a faultd restart and not served again (the object
    /// changed or is gone, or the store's rules no longer let their uid read it).
    pub kept_refused: u64,
}

fn object_families(o: &ObjectSample) -> Vec<MetricFamily> {
    let mut out = Vec::new();
    for (name, help, v, is_counter) in [
        (
            "faultd_object_cache_hits_total",
            "Snapshot-object page reads served from the local chunk cache.",
            o.hits,
            true,
        ),
        (
            "faultd_object_cache_misses_total",
            "Snapshot-object page reads that waited for a chunk GET (started or joined).",
            o.misses,
            true,
        ),
        (
            "faultd_object_gets_total",
            "Range GETs made to object stores (every attempt).",
            o.gets,
            true,
        ),
        (
            "faultd_object_get_errors_total",
            "Range GETs that failed (retried, or given up at the deadline).",
            o.get_errors,
            true,
        ),
        (
            "faultd_object_fetched_bytes_total",
            "Bytes fetched from object stores.",
            o.bytes_fetched,
            true,
        ),
        (
            "faultd_object_changed_total",
            "Chunks refused because their object changed since the restore started.",
            o.changed,
            true,
        ),
        (
            "faultd_object_kept_refused_total",
            "Restores from an object kept across a faultd restart and not served again: the \
             object changed or is gone, or its uid may no longer read it.",
            o.kept_refused,
            true,
        ),
        (
            "faultd_object_cache_evicted_total",
            "Chunks evicted from the local chunk cache to keep its bound.",
            o.evicted,
            true,
        ),
        (
            "faultd_object_prefetch_gets_total",
            "Chunk fetches started ahead of the guest by a recording's replay (their GETs are in faultd_object_gets_total too).",
            o.prefetch_gets,
            true,
        ),
        (
            "faultd_object_recording_gets_total",
            "GETs of working-set recordings beside snapshot objects.",
            o.recording_gets,
            true,
        ),
        (
            "faultd_object_recording_puts_total",
            "PUTs (If-None-Match: *) of working-set recordings beside snapshot objects.",
            o.recording_puts,
            true,
        ),
        (
            "faultd_object_cache_bytes",
            "Bytes the local chunk cache holds.",
            o.cache_bytes,
            false,
        ),
        (
            "faultd_object_cache_chunks",
            "Chunks the local chunk cache holds.",
            o.cache_chunks,
            false,
        ),
    ] {
        let v = i64::try_from(v).unwrap_or(i64::MAX);
        if is_counter {
            let c = counter(name, help, &[]);
            c.with_label_values(&[] as &[&str]).inc_by(v as u64);
            out.extend(c.collect());
        } else {
            let g = gauge(name, help, &[]);
            g.with_label_values(&[] as &[&str]).set(v);
            out.extend(g.collect());
        }
    }
    out
}

fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("constant, valid counter options")
}

fn gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("constant, valid gauge options")
}

/// The families computed at scrape time.
fn scrape_families(
    totals: &HashMap<String, Totals>,
    levels: &HashMap<String, Levels>,
    sessions: i64,
) -> Vec<MetricFamily> {
    let vcpu_faults = counter(
        "faultd_vcpu_faults_total",
        "vCPU fault events read from userfaultfds.",
        &["vm"],
    );
    let groups = counter(
        "faultd_device_groups_total",
        "Device page-request groups answered, by response code.",
        &["vm", "code"],
    );
    let deadline = counter(
        "faultd_device_deadline_misses_total",
        "Device page-request groups answered INVALID because device.deadline_ms passed.",
        &["vm"],
    );
    let pin_evictions = counter(
        "faultd_device_pin_evictions_total",
        "Device-mapped granules unmapped to stay within device.pin_limit_mib.",
        &["vm"],
    );
    let errors = counter(
        "faultd_fault_errors_total",
        "Faults faultd could not serve (logged, first few per session).",
        &["vm"],
    );
    let discarded = counter(
        "faultd_discarded_pages_total",
        "Resident pages the VMM discarded (balloon, hole punch), counted as pages of the \
         region's page size (4 KiB or 2 MiB): discards done. Bytes: \
         faultd_discarded_bytes_total.",
        &["vm"],
    );
    let discarded_bytes = counter(
        "faultd_discarded_bytes_total",
        "Bytes of the resident pages the VMM discarded (balloon, hole punch).",
        &["vm"],
    );
    let evicted = counter(
        "faultd_evicted_pages_total",
        "Pages evicted (to the swap store, or paged out for anonymous memory; on request or \
         to keep a budget), counted as pages of the region's page size (4 KiB or 2 MiB): \
         evictions done, each a refault if touched again. Bytes: faultd_evicted_bytes_total.",
        &["vm"],
    );
    let evicted_bytes = counter(
        "faultd_evicted_bytes_total",
        "Bytes of the pages evicted (to the swap store, or paged out for anonymous memory).",
        &["vm"],
    );
    let around_pages = counter(
        "faultd_fault_around_pages_total",
        "Pages installed ahead of sequential vCPU fault streams (fault-around, [around]); \
         not vCPU faults.",
        &["vm"],
    );
    let around_granules = counter(
        "faultd_fault_around_granules_total",
        "Granules mapped ahead of sequential device page-request streams (fault-around).",
        &["vm"],
    );
    let around_stopped = counter(
        "faultd_fault_around_stopped_total",
        "Look-aheads cut short (budget watermark, pin room, deadline, eviction, pending \
         layout event).",
        &["vm"],
    );
    let ws = working_set_families(totals);
    for (label, t) in totals {
        let vm = label.as_str();
        around_pages
            .with_label_values(&[vm])
            .inc_by(t.around_vcpu_pages);
        around_granules
            .with_label_values(&[vm])
            .inc_by(t.around_device_granules);
        around_stopped
            .with_label_values(&[vm])
            .inc_by(t.around_stopped);
        vcpu_faults.with_label_values(&[vm]).inc_by(t.vcpu_faults);
        groups
            .with_label_values(&[vm, "success"])
            .inc_by(t.device_success);
        groups
            .with_label_values(&[vm, "invalid"])
            .inc_by(t.device_invalid);
        deadline.with_label_values(&[vm]).inc_by(t.device_deadline);
        pin_evictions
            .with_label_values(&[vm])
            .inc_by(t.pin_evictions);
        errors.with_label_values(&[vm]).inc_by(t.errors);
        discarded.with_label_values(&[vm]).inc_by(t.discarded_pages);
        discarded_bytes
            .with_label_values(&[vm])
            .inc_by(t.discarded_bytes);
        evicted.with_label_values(&[vm]).inc_by(t.evictions);
        evicted_bytes
            .with_label_values(&[vm])
            .inc_by(t.evicted_bytes);
    }
    let guest = gauge(
        "faultd_guest_bytes",
        "Guest RAM registered by live sessions.",
        &["vm"],
    );
    let resident = gauge(
        "faultd_resident_bytes",
        "Guest RAM resident (filled by faultd) in live sessions.",
        &["vm"],
    );
    let mapped = gauge(
        "faultd_device_mapped_bytes",
        "Guest RAM mapped for devices, i.e. pinned, in live sessions.",
        &["vm"],
    );
    let stored = gauge(
        "faultd_stored_pages",
        "Pages held in the swap store now, of the region's page size (4 KiB or 2 MiB). \
         Bytes: faultd_stored_bytes.",
        &["vm"],
    );
    let stored_bytes = gauge(
        "faultd_stored_bytes",
        "Bytes of the pages held in the swap store now.",
        &["vm"],
    );
    let devices = gauge(
        "faultd_devices",
        "Devices attached to live sessions.",
        &["vm"],
    );
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for (label, l) in levels {
        let vm = label.as_str();
        guest.with_label_values(&[vm]).set(to_i64(l.guest_bytes));
        resident
            .with_label_values(&[vm])
            .set(to_i64(l.resident_bytes));
        mapped.with_label_values(&[vm]).set(to_i64(l.mapped_bytes));
        stored.with_label_values(&[vm]).set(to_i64(l.stored_pages));
        stored_bytes
            .with_label_values(&[vm])
            .set(to_i64(l.stored_bytes));
        devices.with_label_values(&[vm]).set(to_i64(l.devices));
    }
    let live = gauge("faultd_sessions", "Sessions (VMs) served now.", &[]);
    live.with_label_values::<&str>(&[]).set(sessions);
    [
        vcpu_faults,
        groups,
        deadline,
        pin_evictions,
        errors,
        discarded,
        discarded_bytes,
        evicted,
        evicted_bytes,
        around_pages,
        around_granules,
        around_stopped,
    ]
    .iter()
    .chain(ws.iter())
    .flat_map(|c| c.collect())
    .chain(
        [guest, resident, mapped, stored, stored_bytes, devices, live]
            .iter()
            .flat_map(|g| g.collect()),
    )
    .collect()
}

/// The snapshot zero-page and working-set counters.
fn working_set_families(totals: &HashMap<String, Totals>) -> [IntCounterVec; 6] {
    let families = [
        (
            "faultd_snapshot_zero_pages_total",
            "Snapshot pages served as zero pages (all zero in the snapshot file: not copied).",
        ),
        (
            "faultd_working_set_recorded_pages_total",
            "Snapshot pages recorded into working-set recordings (first demand faults).",
        ),
        (
            "faultd_prefetched_pages_total",
            "Pages copied ahead of the guest from a working-set recording (not its zero pages).",
        ),
        (
            "faultd_prefetched_zero_pages_total",
            "Snapshot zero pages of a working-set recording mapped ahead as zero pages.",
        ),
        (
            "faultd_prefetch_late_faults_total",
            "Demand faults on recorded pages that replay had not installed yet.",
        ),
        (
            "faultd_prefetch_missed_faults_total",
            "Demand faults on snapshot pages outside the recording being replayed.",
        ),
    ]
    .map(|(name, help)| counter(name, help, &["vm"]));
    for (label, t) in totals {
        let values = [
            t.snapshot_zero_pages,
            t.ws_recorded,
            t.ws_prefetched,
            t.ws_prefetched_zero,
            t.ws_late,
            t.ws_misses,
        ];
        for (family, v) in families.iter().zip(values) {
            family.with_label_values(&[label.as_str()]).inc_by(v);
        }
    }
    families
}

/// Serves `GET /metrics` on `listener` until `cancel` fires.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    cancel: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                // EMFILE and friends: back off instead of spinning on the error.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let render = render.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(respond(&req, &*render)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A scraper that keeps its connection open idle holds only this task, and not past
            // a bound or shutdown.
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::timeout(Duration::from_secs(60), conn) => {}
            }
        });
    }
    tracker.close();
    tracker.wait().await;
}

fn respond(
    req: &hyper::Request<hyper::body::Incoming>,
    render: &dyn Fn() -> String,
) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, ctype: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header(hyper::header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("constant, valid response parts")
    };
    match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => reply(200, prometheus::TEXT_FORMAT, render()),
        (_, "/metrics") => reply(405, "text/plain", "only GET\n".into()),
        _ => reply(404, "text/plain", "faultd serves /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_BUDGET: Budget = Budget {
        session: 0,
        global: 0,
        high_pct: 90,
        low_pct: 80,
    };

    #[test]
    fn vm_labels_are_bounded_and_the_rest_share_other() {
        let m = DaemonMetrics::new(2, 1 << 30, 8 << 30, NO_BUDGET);

        let labels: Vec<Arc<str>> = ["a", "b", "c", "a"]
            .iter()
            .map(|vm| m.acquire_label(vm))
            .collect();

        let labels: Vec<&str> = labels.iter().map(|l| &**l).collect();
        assert_eq!(labels, ["a", "b", OTHER_VM, "a"]);
    }

    #[test]
    fn a_vm_literally_named_other_is_counted_as_other() {
        let m = DaemonMetrics::new(4, 1 << 30, 8 << 30, NO_BUDGET);

        assert_eq!(&*m.acquire_label(OTHER_VM), OTHER_VM);
    }

    #[test]
    fn latency_buckets_span_a_microsecond_to_a_second() {
        let b = latency_buckets();

        assert_eq!(b.first(), Some(&1e-6));
        assert!(b.last().is_some_and(|&l| (1.0..2.0).contains(&l)), "{b:?}");
    }

    #[test]
    fn observed_faults_appear_under_their_labels() {
        let m = DaemonMetrics::new(4, 1 << 30, 8 << 30, NO_BUDGET);
        let label = m.acquire_label("vm1");
        let s = m.session(&label);

        s.observe(Source::Vcpu, FaultOutcome::Zero, Duration::from_micros(12));

        let text = m.render(std::iter::empty());
        assert!(
            text.contains(
                "faultd_fault_latency_seconds_count{outcome=\"zero\",source=\"vcpu\",vm=\"vm1\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("faultd_sessions 0"), "{text}");
    }

    #[test]
    fn in_flight_contribution_is_taken_back_when_the_session_ends() {
        let m = DaemonMetrics::new(4, 1 << 30, 8 << 30, NO_BUDGET);
        let gauge = m.in_flight.with_label_values(&["x", "vcpu"]);
        let mut a = InFlight::new(gauge.clone());
        let mut b = InFlight::new(gauge.clone());

        a.set(3);
        b.set(2);
        a.set(1);
        drop(b);

        assert_eq!(gauge.get(), 1);
    }
}

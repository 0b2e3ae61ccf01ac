//! faultd's Prometheus metrics, checked with the real tools: a real Prometheus server scrapes
//! faultd while a KVM guest faults, `promtool check metrics` lints the exposition, and the
//! alert rules shipped in deploy/ pass `promtool check rules` and their `promtool test rules`
//! unit tests. (`scripts/setup` installs Debian's `prometheus` package, which has both tools.)

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use faultd_tests::{http_get, read_with_timeout, settled_stats, tool, url_encode, Faultd, Ram};
use testvmm::{RamSlot, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// A Prometheus server on a private loopback port and data directory; killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (`IP:PORT`, path /metrics) every second as job
    /// "faultd", and waits until it is ready.
    fn scraping(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: faultd\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        // A free port now; nothing else on this machine binds ephemeral ports on purpose.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(&p.addr).is_ok()
                && http_get(&p.addr, "/-/ready").0 == 200
            {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn query(&self, expr: &str) -> Vec<(serde_json::Value, f64)> {
        query(&self.addr, expr)
    }

    fn value(&self, expr: &str) -> Option<f64> {
        value(&self.addr, expr)
    }
}

/// The samples of instant query `expr` from the Prometheus at `addr`: (labels, value).
fn query(addr: &str, expr: &str) -> Vec<(serde_json::Value, f64)> {
    let (status, body) = http_get(addr, &format!("/api/v1/query?query={}", url_encode(expr)));
    assert_eq!(status, 200, "query {expr}: {body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["status"], "success", "{body}");
    reply["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let v = s["value"][1].as_str().unwrap().parse::<f64>().unwrap();
            (s["metric"].clone(), v)
        })
        .collect()
}

/// The one value of `expr`, or None when it has no sample.
fn value(addr: &str, expr: &str) -> Option<f64> {
    let samples = query(addr, expr);
    assert!(samples.len() <= 1, "{expr}: {samples:?}");
    samples.first().map(|s| s.1)
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn real_prometheus_sees_fault_latency_histograms_move_while_a_kvm_guest_runs() {
    const SIZE: u64 = 512 * MIB;
    const ROUND_PAGES: u32 = 2000;
    let faultd = Faultd::start(&[]);
    let prom = Prometheus::scraping(&faultd.metrics_addr());
    let ram = Ram::new("vm-prom", SIZE);
    let mut session = ram.serve(&faultd, "vm-prom");
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.ram.host_ptr(),
        size: SIZE,
    }])
    .unwrap();
    vm.set_timeout(Some(Duration::from_secs(120)));
    let served = "sum(faultd_fault_latency_seconds_count{job=\"faultd\",vm=\"vm-prom\",source=\"vcpu\",outcome=\"zero\"})";
    // Prometheus has scraped faultd (the series exist, pre-created at 0) before the guest runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while prom.value(served).is_none() {
        assert!(
            Instant::now() < deadline,
            "no scrape of faultd:\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // The guest touches fresh pages round after round while an observer thread records every
    // distinct value Prometheus reports, until it has seen the count rise three times.
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let observer = {
        let done = done.clone();
        let addr = prom.addr.clone();
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            let deadline = Instant::now() + Duration::from_secs(90);
            while seen.len() < 4 && Instant::now() < deadline {
                if let Some(v) = value(&addr, served) {
                    seen.insert(v as u64);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            done.store(true, Ordering::Release);
            let _ = tx.send(seen);
        })
    };
    let mut rounds = 0u32;
    while !done.load(Ordering::Acquire) && (rounds + 1) * ROUND_PAGES <= (SIZE / PAGE) as u32 {
        let reports = vm
            .run(
                vec![Workload::TouchSequential {
                    first_page: rounds * ROUND_PAGES,
                    count: ROUND_PAGES,
                }],
                &|_, _| {},
            )
            .expect("guest run");
        assert_eq!(reports[0].mismatches, 0);
        rounds += 1;
        // A pace Prometheus's 1 s scrapes can follow: several rounds per scrape would do too,
        // but the count should be seen rising more than once.
        std::thread::sleep(Duration::from_millis(300));
    }
    let seen = rx.recv().unwrap();
    observer.join().unwrap();
    println!("{rounds} guest rounds; Prometheus saw the zero-fill fault count at {seen:?}");
    assert!(
        seen.len() >= 4,
        "the fault histogram did not move in Prometheus: {seen:?}"
    );

    // Once the guest is done, the count Prometheus scrapes reaches exactly what faultd served.
    let stats = settled_stats(&mut session, |s| {
        s.zero_fills >= (rounds * ROUND_PAGES) as u64
    });
    assert_eq!(stats.zero_fills, (rounds * ROUND_PAGES) as u64);
    let deadline = Instant::now() + Duration::from_secs(20);
    while prom.value(served) != Some(stats.zero_fills as f64) {
        assert!(
            Instant::now() < deadline,
            "Prometheus shows {:?}, faultd served {}",
            prom.value(served),
            stats.zero_fills
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The buckets are there and give a latency in the microsecond range: every fault lies in
    // some bucket below +Inf, and the p99 Prometheus computes lies between 1 us and 1 s.
    let buckets = prom.query(
        "faultd_fault_latency_seconds_bucket{vm=\"vm-prom\",source=\"vcpu\",outcome=\"zero\"}",
    );
    assert_eq!(buckets.len(), 22, "21 bounds and +Inf: {buckets:?}");
    let p99 = prom
        .value(
            "histogram_quantile(0.99, sum by (le) (faultd_fault_latency_seconds_bucket{vm=\"vm-prom\",source=\"vcpu\",outcome=\"zero\"}))",
        )
        .unwrap();
    println!(
        "p99 vCPU fault latency per Prometheus: {:.1} us (faultd's own histogram: {:.1} us)",
        p99 * 1e6,
        stats.latency_us.p99
    );
    assert!((1e-6..1.0).contains(&p99), "p99 {p99}");
    // The other series are there too: device latency (no device: 0), resident bytes.
    assert_eq!(
        prom.value("sum(faultd_fault_latency_seconds_count{vm=\"vm-prom\",source=\"device\"})"),
        Some(0.0)
    );
    assert_eq!(
        prom.value("faultd_resident_bytes{vm=\"vm-prom\"}"),
        Some(stats.resident_bytes as f64)
    );
    assert_eq!(prom.value("faultd_sessions"), Some(1.0));
}

/// faultd's /metrics text with a session that has served a few faults, and a refused request.
fn metrics_with_a_session() -> String {
    let faultd = Faultd::start(&[]);
    let ram = Ram::new("vm-lint", 16 * MIB);
    let mut session = ram.serve(&faultd, "vm-lint");
    read_with_timeout(
        &ram.ram,
        vec![0, 5 * PAGE, 9 * PAGE],
        Duration::from_secs(10),
    );
    // Latency is recorded last, after the fill and the residency (the metrics right after).
    settled_stats(&mut session, |s| s.latency_us.count == 3);
    // A refused request, so the protocol error counter has a series.
    let mut raw = faultd_client::Client::connect(faultd.socket())
        .unwrap()
        .into_raw();
    raw.send(b"{not json", &[]).unwrap();
    let _ = raw.recv();
    let (status, body) = http_get(&faultd.metrics_addr(), "/metrics");
    assert_eq!(status, 200);
    body
}

#[test]
fn promtool_check_metrics_finds_nothing_wrong_with_faultds_output() {
    let text = metrics_with_a_session();
    let mut promtool = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();

    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.is_empty(), "{said}\n{text}");
    // What was linted had the metrics in question, with their values.
    for want in [
        "faultd_fault_latency_seconds_bucket{outcome=\"zero\",source=\"vcpu\",vm=\"vm-lint\",le=\"0.000001\"}",
        "faultd_fault_latency_seconds_count{outcome=\"zero\",source=\"vcpu\",vm=\"vm-lint\"} 3",
        "faultd_resident_bytes{vm=\"vm-lint\"} 12288",
        "faultd_protocol_errors_total{code=\"malformed\"} 1",
        "faultd_sessions 1",
        "faultd_evicted_pages_total{vm=\"vm-lint\"} 0",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
}

/// Names of faultd metrics an expression text uses (histogram series map to their family).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("faultd_") {
        // `faultd:` recording-rule names and label values like "faultd" are not metrics.
        if i > 0 && text.as_bytes()[i - 1] == b':' {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| f.ends_with("_seconds"))
            .map_or(name.clone(), str::to_owned);
        names.insert(family);
    }
    names
}

#[test]
fn the_dashboard_and_alert_rules_use_only_metrics_faultd_exports() {
    let exported: BTreeSet<String> = metrics_with_a_session()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    let dashboard =
        std::fs::read_to_string(repo_file("deploy/grafana/faultd-dashboard.json")).unwrap();
    let rules = std::fs::read_to_string(repo_file("deploy/prometheus/faultd-rules.yml")).unwrap();

    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard JSON");
    let used: BTreeSet<String> = metric_names(&dashboard)
        .into_iter()
        .chain(metric_names(&rules))
        .collect();

    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() > 10));
    let unknown: Vec<&String> = used.difference(&exported).collect();
    assert!(unknown.is_empty(), "not exported by faultd: {unknown:?}");
    assert!(used.len() >= 12, "{used:?}");
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo_file("deploy/prometheus");

    let check = Command::new(tool("promtool"))
        .args(["check", "rules", "faultd-rules.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let test = Command::new(tool("promtool"))
        .args(["test", "rules", "faultd-rules.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();

    let show = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(check.status.success(), "{}", show(&check));
    assert!(
        show(&check).contains("SUCCESS: 7 rules found"),
        "{}",
        show(&check)
    );
    assert!(test.status.success(), "{}", show(&test));
    assert!(show(&test).contains("SUCCESS"), "{}", show(&test));
}

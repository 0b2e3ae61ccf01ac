//! faultd's Prometheus metrics, checked with the real tools: a real Prometheus server, run
//! with the scrape config and alert rules shipped in deploy/prometheus, scrapes faultd while a
//! KVM guest faults; `promtool check metrics` lints the exposition; the shipped config passes
//! `promtool check config` and the rules `promtool check rules` and their `promtool test
//! rules` unit tests. (`scripts/setup` installs Debian's `prometheus` package, which has both
//! tools.)

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use faultd_client::RamPageSize;
use faultd_tests::{
    http_get, read_with_timeout, settled_stats, tool, url_encode, write_with_timeout, Faultd,
    HugePages, Ram,
};
use testvmm::{RamSlot, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const HUGE: u64 = 2 * MIB;
const T: Duration = Duration::from_secs(10);

/// The shipped scrape configuration, and the target in it (faultd's default metrics address).
const SHIPPED_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const SHIPPED_TARGET: &str = "['127.0.0.1:9597']";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// The job name of the shipped scrape configuration (its one `job_name:`).
fn shipped_job() -> String {
    let config = std::fs::read_to_string(repo_file(SHIPPED_CONFIG)).unwrap();
    let jobs: Vec<&str> = config
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- job_name:"))
        .map(|j| j.trim().trim_matches(['\'', '"']))
        .collect();
    assert_eq!(
        jobs.len(),
        1,
        "one scrape job in {SHIPPED_CONFIG}: {jobs:?}"
    );
    jobs[0].to_owned()
}

/// `text` with `from` replaced by `to`, which must occur exactly once.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "{from:?} once in:\n{text}");
    text.replacen(from, to, 1)
}

/// A Prometheus server on a private loopback port and data directory; killed on drop.
struct Prometheus {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with the shipped configuration (deploy/prometheus/prometheus.yml and
    /// the rule file it loads, copied side by side), changed only in where faultd is (`target`,
    /// `IP:PORT`) and in scraping and evaluating every second instead of every 15; waits until
    /// it is ready.
    fn shipped(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let shipped = std::fs::read_to_string(repo_file(SHIPPED_CONFIG)).unwrap();
        let ours = replace_once(&shipped, SHIPPED_TARGET, &format!("['{target}']"));
        let ours = replace_once(&ours, "scrape_interval: 15s", "scrape_interval: 1s");
        let ours = replace_once(&ours, "evaluation_interval: 15s", "evaluation_interval: 1s");
        std::fs::write(&config, ours).unwrap();
        std::fs::copy(
            repo_file("deploy/prometheus/faultd-rules.yml"),
            dir.path().join("faultd-rules.yml"),
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

    /// Waits until `expr` has exactly the value `want` (Prometheus scrapes every second).
    fn wait_value(&self, expr: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.value(expr) != Some(want) {
            assert!(
                Instant::now() < deadline,
                "{expr}: Prometheus shows {:?}, expected {want}\n{}",
                self.value(expr),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The alerts Prometheus has now (pending or firing): (name, state, labels).
    fn alerts(&self) -> Vec<(String, String, serde_json::Value)> {
        let (status, body) = http_get(&self.addr, "/api/v1/alerts");
        assert_eq!(status, 200, "{body}");
        let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
        reply["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap().to_owned(),
                    a["state"].as_str().unwrap().to_owned(),
                    a["labels"].clone(),
                )
            })
            .collect()
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

/// faultd's CPU time so far (user + system, all threads), seconds, from /proc/PID/stat.
fn proc_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command (which may hold spaces) are counted from its closing paren:
    // utime and stime are fields 14 and 15, the 12th and 13th after it.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / clock_ticks()
}

/// Clock ticks per second (the unit of /proc's CPU times).
fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// A field of /proc/PID/status in kB, as bytes.
fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{field} in {status}"));
    let kb: u64 = line.trim().trim_end_matches("kB").trim().parse().unwrap();
    kb * 1024
}

/// The commit the workspace is at, as faultd_build_info should report it.
fn git_head() -> String {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "git rev-parse HEAD");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn real_prometheus_with_the_shipped_config_sees_faults_cpu_budgets_and_faultd_going_down() {
    const SIZE: u64 = 512 * MIB;
    const ROUND_PAGES: u32 = 2000;
    // Budgets above what the guest touches: this is about the gauges showing them.
    const VM_BUDGET_MIB: u64 = 1024;
    const GLOBAL_BUDGET_MIB: u64 = 3072;
    let mut faultd = Faultd::start_with_config(&format!(
        "[budget]\nsession_mib = {VM_BUDGET_MIB}\nglobal_mib = {GLOBAL_BUDGET_MIB}\n"
    ));
    let job = shipped_job();
    let prom = Prometheus::shipped(&faultd.metrics_addr());
    let ram = Ram::new("vm-prom", SIZE);
    let mut session = ram.serve(&faultd, "vm-prom");
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: ram.ram.host_ptr(),
        size: SIZE,
    }])
    .unwrap();
    vm.set_timeout(Some(Duration::from_secs(120)));
    let served = format!("sum(faultd_fault_latency_seconds_count{{job=\"{job}\",vm=\"vm-prom\",source=\"vcpu\",outcome=\"zero\"}})");
    let served = served.as_str();
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
        let served = served.to_owned();
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            let deadline = Instant::now() + Duration::from_secs(90);
            while seen.len() < 4 && Instant::now() < deadline {
                if let Some(v) = value(&addr, &served) {
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

    // What faultd was built from, scraped through the shipped job.
    let info = prom.query(&format!("faultd_build_info{{job=\"{job}\"}}"));
    assert_eq!(info.len(), 1, "{info:?}");
    let (labels, one) = &info[0];
    assert_eq!(*one, 1.0);
    assert_eq!(labels["version"], env!("CARGO_PKG_VERSION"), "{labels}");
    assert_eq!(labels["git_commit"], git_head().as_str(), "{labels}");
    assert!(
        labels["rustc_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("rustc ")),
        "{labels}"
    );

    // Process metrics: CPU, memory and fds of faultd, with the real values /proc has.
    let pid = faultd.pid();
    let cpu_query = format!("process_cpu_seconds_total{{job=\"{job}\"}}");
    let cpu = prom.value(&cpu_query).expect("process CPU scraped");
    let cpu_now = proc_cpu_seconds(pid);
    println!(
        "faultd CPU per Prometheus: {cpu:.3} s for {} faults ({:.2} us of CPU per fault, \
         all threads); /proc says {cpu_now:.2} s now",
        stats.vcpu_faults,
        cpu * 1e6 / stats.vcpu_faults as f64
    );
    // Scraped before /proc was read: at most that, give or take /proc's accounting in clock
    // ticks, which can lose up to a tick for each thread.
    let threads = prom
        .value(&format!("process_threads{{job=\"{job}\"}}"))
        .unwrap();
    let ticks = 1.0 / clock_ticks();
    assert!(
        cpu > 0.0 && cpu <= cpu_now + (threads + 1.0) * ticks,
        "{cpu} vs {cpu_now} ({threads} threads)"
    );
    let rss = prom
        .value(&format!("process_resident_memory_bytes{{job=\"{job}\"}}"))
        .unwrap();
    let vm_rss = proc_status_bytes(pid, "VmRSS:") as f64;
    assert!(
        rss > 0.0 && (rss - vm_rss).abs() < vm_rss / 2.0,
        "RSS {rss} vs VmRSS {vm_rss}"
    );
    let fds = prom
        .value(&format!("process_open_fds{{job=\"{job}\"}}"))
        .unwrap();
    let max_fds = prom
        .value(&format!("process_max_fds{{job=\"{job}\"}}"))
        .unwrap();
    // At least the control socket, the metrics listener, the session's uffd and memfd.
    assert!(fds >= 4.0 && fds < max_fds, "{fds} of {max_fds}");

    // Budgets as configured, and the VM's resident bytes within its budget.
    assert_eq!(
        prom.value(&format!("faultd_budget_per_vm_bytes{{job=\"{job}\"}}")),
        Some((VM_BUDGET_MIB * MIB) as f64)
    );
    assert_eq!(
        prom.value(&format!("faultd_budget_global_bytes{{job=\"{job}\"}}")),
        Some((GLOBAL_BUDGET_MIB * MIB) as f64)
    );
    assert_eq!(
        prom.value(&format!(
            "faultd_resident_bytes{{job=\"{job}\",vm=\"vm-prom\"}} <= on (job, instance) \
             group_left faultd_budget_per_vm_bytes"
        )),
        Some(stats.resident_bytes as f64)
    );

    // faultd goes away: the shipped rules, selecting the shipped job, see it down (pending
    // for their 2 minutes).
    drop(vm);
    drop(session);
    faultd.terminate();
    prom.wait_value(&format!("up{{job=\"{job}\"}}"), 0.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alerts = prom.alerts();
        if let Some((_, state, labels)) = alerts.iter().find(|a| a.0 == "FaultdDown") {
            println!("FaultdDown {state}: {labels}");
            assert_eq!(labels["job"], job.as_str());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "FaultdDown never pending with faultd down: {alerts:?}\n{}",
            prom.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
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
        "faultd_evicted_bytes_total{vm=\"vm-lint\"} 0",
        "faultd_discarded_bytes_total{vm=\"vm-lint\"} 0",
        "faultd_stored_bytes{vm=\"vm-lint\"} 0",
        "# TYPE faultd_fault_around_pages_total counter",
        "# TYPE faultd_fault_around_granules_total counter",
        "# TYPE faultd_fault_around_stopped_total counter",
        // No [budget] configured: 0, none.
        "faultd_budget_per_vm_bytes 0",
        "faultd_budget_global_bytes 0",
        &format!("faultd_build_info{{git_commit=\"{}\",", git_head()),
        "# TYPE process_cpu_seconds_total counter",
        "# TYPE process_resident_memory_bytes gauge",
        "# TYPE process_open_fds gauge",
    ] {
        assert!(text.contains(want), "missing {want}:\n{text}");
    }
    // Three faults and a refused request are far less than a second of CPU: the count has
    // sub-second resolution (the prometheus crate's own collector counts whole seconds).
    let cpu: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
        .expect("process_cpu_seconds_total sample")
        .parse()
        .unwrap();
    assert!(cpu > 0.0 && cpu < 1.0, "process_cpu_seconds_total {cpu}");
}

/// Pages `pages` of `ram` (of `size` bytes each) discarded by the VMM, as a balloon does.
/// MADV_REMOVE returns once faultd has read the REMOVE event, so it runs while faultd serves.
fn discard(ram: &Ram, first: u64, pages: u64, size: u64) {
    let (addr, len) = (ram.ram.host_addr() + first * size, pages * size);
    assert!(first * size + len <= ram.ram.size());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: the range lies inside the live shared mapping of guest RAM (checked above);
        // MADV_REMOVE drops its pages and no Rust reference points into guest RAM.
        let rc = unsafe { libc::madvise(addr as *mut _, len as usize, libc::MADV_REMOVE) };
        let _ = tx.send((rc, std::io::Error::last_os_error()));
    });
    let (rc, err) = rx
        .recv_timeout(T)
        .expect("MADV_REMOVE did not return in time");
    assert_eq!(rc, 0, "MADV_REMOVE: {err}");
}

#[test]
fn bytes_counters_are_pages_times_the_page_size_for_4k_and_2m_sessions() {
    let _reserved = HugePages::reserve(8);
    let faultd = Faultd::start(&[]);
    let job = shipped_job();
    let prom = Prometheus::shipped(&faultd.metrics_addr());
    // (vm, page size, RAM, pages written, evicted, discarded): each VM writes its first
    // `written` pages (non-zero, so evicted pages are stored), evicts the first `evicted` and
    // discards the next `discarded`.
    let cases = [
        ("vm-4k", RamPageSize::Size4K, PAGE, 16 * MIB, 12, 8, 3),
        ("vm-2m", RamPageSize::Size2M, HUGE, 16 * MIB, 5, 3, 1),
    ];
    let mut kept = Vec::new();
    for (vm, page_size, size, ram_bytes, written, evicted, discarded) in cases {
        let ram = Ram::with_page_size(vm, ram_bytes, page_size);
        let mut session = ram.serve(&faultd, vm);
        write_with_timeout(
            &ram.ram,
            (0..written).map(|p| (p * size + 7, 0xa5)).collect(),
            T,
        );
        settled_stats(&mut session, |s| s.resident_bytes == written * size);
        let (n, zero, failed) = session.evict(0, evicted * size, None).unwrap();
        assert_eq!(
            (n, zero, failed),
            (evicted, 0, 0),
            "{vm}:\n{}",
            faultd.log()
        );
        discard(&ram, evicted, discarded, size);
        let stats = settled_stats(&mut session, |s| s.discarded_pages == discarded);
        assert_eq!(
            (stats.evictions, stats.stored_pages, stats.discarded_pages),
            (evicted, evicted, discarded),
            "{vm}: {stats:?}"
        );
        for (metric, pages) in [
            ("evicted_pages_total", evicted),
            ("stored_pages", evicted),
            ("discarded_pages_total", discarded),
        ] {
            prom.wait_value(
                &format!("faultd_{metric}{{job=\"{job}\",vm=\"{vm}\"}}"),
                pages as f64,
            );
        }
        for (metric, pages) in [
            ("evicted_bytes_total", evicted),
            ("stored_bytes", evicted),
            ("discarded_bytes_total", discarded),
        ] {
            prom.wait_value(
                &format!("faultd_{metric}{{job=\"{job}\",vm=\"{vm}\"}}"),
                (pages * size) as f64,
            );
        }
        println!(
            "{vm}: {evicted} pages evicted = {} bytes, {discarded} discarded = {} bytes",
            evicted * size,
            discarded * size
        );
        kept.push((ram, session));
    }
    // Every dashboard query is one Prometheus takes (query() asserts success).
    let queries = dashboard_queries();
    assert!(queries.len() > 25, "{queries:?}");
    for q in &queries {
        prom.query(q);
    }
    // The two page sizes side by side: the same page counts would say nothing of the bytes.
    assert_eq!(
        prom.value(
            "faultd_evicted_bytes_total{vm=\"vm-2m\"} / faultd_evicted_pages_total{vm=\"vm-2m\"}"
        ),
        Some(HUGE as f64)
    );
}

/// Names of faultd metrics an expression text uses (histogram series map to their family).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let starts = text
        .match_indices("faultd_")
        .chain(text.match_indices("process_"));
    for (i, _) in starts {
        // `faultd:` recording-rule names and label values like "faultd" are not metrics.
        if i > 0
            && (text.as_bytes()[i - 1] == b':'
                || text.as_bytes()[i - 1].is_ascii_alphanumeric()
                || text.as_bytes()[i - 1] == b'_')
        {
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

    let config = Command::new(tool("promtool"))
        .args(["check", "config", "prometheus.yml"])
        .current_dir(&dir)
        .output()
        .unwrap();
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
    assert!(config.status.success(), "{}", show(&config));
    // The config loads the rule file (checked with it).
    assert!(
        show(&config).contains("SUCCESS: 1 rule files found"),
        "{}",
        show(&config)
    );
    assert!(check.status.success(), "{}", show(&check));
    assert!(
        show(&check).contains("SUCCESS: 8 rules found"),
        "{}",
        show(&check)
    );
    assert!(test.status.success(), "{}", show(&test));
    assert!(show(&test).contains("SUCCESS"), "{}", show(&test));
}

/// Every job `text` names (`job="X"`, or `job=\"X\"` inside a string).
fn jobs_named(text: &str) -> BTreeSet<String> {
    text.match_indices("job=")
        .map(|(i, _)| {
            let rest = text[i + 4..]
                .trim_start_matches('\\')
                .trim_start_matches('"');
            rest.split(['"', '\\']).next().unwrap().to_owned()
        })
        .collect()
}

#[test]
fn the_alert_rules_and_dashboard_select_the_job_the_shipped_scrape_config_sets() {
    let job = shipped_job();
    let rules = std::fs::read_to_string(repo_file("deploy/prometheus/faultd-rules.yml")).unwrap();
    let dashboard =
        std::fs::read_to_string(repo_file("deploy/grafana/faultd-dashboard.json")).unwrap();

    let in_rules = jobs_named(&rules);
    let in_dashboard = jobs_named(&dashboard);

    let want = BTreeSet::from([job]);
    assert_eq!(
        in_rules, want,
        "the rules select jobs the shipped scrape config ({SHIPPED_CONFIG}) does not set"
    );
    assert_eq!(
        in_dashboard, want,
        "the dashboard selects jobs the shipped scrape config ({SHIPPED_CONFIG}) does not set"
    );
}

/// Each dashboard query with Grafana's variables given values Prometheus takes.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/faultd-dashboard.json")).unwrap(),
    )
    .unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$instance", ".*")
                .replace("$vm", ".*")
                .replace("$__rate_interval", "1m")
                .replace("$__range", "1h")
        })
        .collect()
}

//! Real KVM guests restored from a snapshot object in a real radosgw (started by each test,
//! tests/src/rgw.rs): faultd fetches the object's chunks with range GETs, off the fault thread,
//! into its chunk cache, and serves every page the guest touches from them. The GETs are
//! counted by faultd's own metric (`faultd_object_gets_total`). The same through the
//! Firecracker stand-in: a listener whose snapshot is an object.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use faultd_client::{Client, ClientError, RamPageSize, RegionSpec};
use faultd_proto::ErrorCode;
use faultd_tests::firecracker::{copy_with_timeout, FcRestore, WireForm};
use faultd_tests::rgw::{Rgw, ACCESS_KEY, BUCKET, REGION, SECRET_KEY, UNREACHABLE_STORE};
use faultd_tests::{read_with_timeout, resident_settled, Faultd, Ram};
use testvmm::{page_sequence, pattern, RamSlot, VcpuReport, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const CHUNK: u64 = 512 * 1024;
/// A guest run that takes longer fails (a fault faultd never answers must not hang the test).
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const SEED: u32 = 0x000B_1EC7;

/// faultd's config: one store, `rgw`, whose keys under `tenants/<uid>/` each uid may read.
fn config(rgw: &Rgw) -> String {
    format!(
        r#"[object_store]
cache_mib = 256
chunk_kib = {}
deadline_ms = 20000

[[object_store.stores]]
name = "rgw"
endpoint = "{}"
region = "{REGION}"
bucket = "{BUCKET}"
access_key = "{ACCESS_KEY}"
secret_key = "{SECRET_KEY}"
prefix = "tenants/{{uid}}/"
"#,
        CHUNK >> 10,
        rgw.endpoint()
    )
}

/// A snapshot of `size` bytes whose every dword at guest address `a` is `pattern(a, SEED)`,
/// PUT as `key`; returns its bytes.
fn put_snapshot(rgw: &Rgw, key: &str, size: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..size / 4)
        .flat_map(|i| pattern(i * 4, SEED).to_le_bytes())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("mem");
    std::fs::File::create(&body)
        .unwrap()
        .write_all(&data)
        .unwrap();
    assert_eq!(rgw.put(BUCKET, key, &body), "200", "PUT {key}");
    data
}

/// Two vCPUs, each verifying `touches` random pages of its half against `seed`'s pattern.
fn verify(vm: &mut Vm, pages: u32, touches: u32, seed: u32) -> Vec<VcpuReport> {
    vm.run(
        [(0, pages / 2), (pages / 2, pages / 2)]
            .iter()
            .map(|&(first_page, page_count)| Workload::Verify {
                seed,
                touches,
                first_page,
                page_count,
            })
            .collect(),
        &|_, _| {},
    )
    .expect("guest run")
}

fn touched(pages: u32, touches: u32) -> BTreeSet<u32> {
    [(0, pages / 2), (pages / 2, pages / 2)]
        .iter()
        .flat_map(|&(first, count)| page_sequence(SEED, touches, first, count))
        .collect()
}

/// Reads guest page `page` from the VMM's mapping (it is resident).
fn host_page(ram: &Ram, page: u32) -> Vec<u8> {
    let addr = ram.ram.host_addr() + page as u64 * PAGE;
    assert!(addr + PAGE <= ram.ram.host_addr() + ram.ram.size());
    // SAFETY: inside the live mapping (checked above); the page is resident (the guest touched
    // it), so the read does not fault; the slice is copied out at once.
    unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE as usize) }.to_vec()
}

#[test]
fn guest_restored_from_an_object_reads_exactly_its_contents_one_get_per_chunk() {
    const SIZE: u64 = 64 * MIB;
    let rgw = Rgw::start();
    eprintln!("radosgw ready in {:?}", rgw.started_in());
    let data = put_snapshot(&rgw, "tenants/0/vm-obj/mem", SIZE);
    let faultd = Faultd::start_with_config(&config(&rgw));
    let ram = Ram::new("vm-obj", SIZE);
    let mut session = Client::connect(faultd.socket())
        .unwrap()
        .register_object(
            "vm-obj",
            &ram.uffd,
            &[RegionSpec::snapshot(0, &ram.ram, 0)],
            "rgw",
            "tenants/0/vm-obj/mem",
        )
        .unwrap();
    let pages = (SIZE / PAGE) as u32;
    let mut vm = ram.vm(GUEST_TIMEOUT);

    let reports = verify(&mut vm, pages, 60, SEED);

    for r in &reports {
        assert_eq!(
            r.mismatches, 0,
            "first mismatch at {:?}",
            r.first_mismatch_gpa
        );
    }
    let touched = touched(pages, 60);
    // Whole pages, not just the dwords the guest checked, equal the object.
    for &p in touched.iter().step_by(3) {
        let at = p as usize * PAGE as usize;
        assert!(
            host_page(&ram, p) == data[at..at + PAGE as usize],
            "page {p} differs from the object"
        );
    }
    let stats = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    assert_eq!(stats.file_fills, touched.len() as u64);
    assert_eq!(stats.errors, 0);
    let chunks: BTreeSet<u64> = touched.iter().map(|&p| p as u64 * PAGE / CHUNK).collect();
    let gets = faultd.metric("faultd_object_gets_total");
    println!(
        "touched {} pages in {} of {} chunks: {gets} GETs, {} bytes fetched, cache hits {}, misses {}",
        touched.len(),
        chunks.len(),
        SIZE / CHUNK,
        faultd.metric("faultd_object_fetched_bytes_total"),
        faultd.metric("faultd_object_cache_hits_total"),
        faultd.metric("faultd_object_cache_misses_total"),
    );
    assert_eq!(gets, chunks.len() as u64, "one GET per chunk touched");
    assert!(
        chunks.len() < (SIZE / CHUNK) as usize,
        "a subset of the chunks, to mean anything"
    );
    assert_eq!(
        faultd.metric("faultd_object_fetched_bytes_total"),
        chunks.len() as u64 * CHUNK
    );
    // `faultd ctl stats` shows the object and the cache's figures, as the metrics have them.
    let o = ctl_stats_object(&faultd, "vm-obj");
    assert_eq!(
        o.object,
        format!("{}/{BUCKET}/tenants/0/vm-obj/mem", rgw.endpoint())
    );
    assert_eq!((o.size, o.chunk_bytes, o.failure), (SIZE, CHUNK, None));
    assert_eq!(
        (o.gets, o.get_errors, o.bytes_fetched, o.in_flight),
        (chunks.len() as u64, 0, chunks.len() as u64 * CHUNK, 0)
    );
    assert_eq!(
        (o.cache_hits, o.cache_misses),
        (
            faultd.metric("faultd_object_cache_hits_total"),
            faultd.metric("faultd_object_cache_misses_total")
        )
    );
    // Each touched page read once through the fetcher: found cached, or waited for.
    assert_eq!(o.cache_hits + o.cache_misses, touched.len() as u64);
    assert!(o.cache_misses >= chunks.len() as u64);
    assert_eq!(o.cache_chunks, chunks.len() as u64);
    assert_eq!(o.cache_bytes, faultd.metric("faultd_object_cache_bytes"));

    // The check can fail: verified against another seed's pattern, the object mismatches.
    let wrong = verify(&mut vm, pages, 200, SEED + 1);
    assert!(wrong.iter().all(|r| r.mismatches > 0));
}

/// `faultd ctl stats --vm VM --json`'s object figures (the table form is printed and must
/// show them too).
fn ctl_stats_object(faultd: &Faultd, vm: &str) -> faultd_proto::ObjectStatus {
    let run = |json: bool| {
        let mut cmd = std::process::Command::new(faultd_tests::faultd_bin());
        cmd.arg("--socket")
            .arg(faultd.socket())
            .args(["ctl", "stats", "--vm", vm]);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(false);
    println!("$ faultd ctl stats --vm {vm}\n{table}");
    assert!(table.contains("object cache"), "{table}");
    match serde_json::from_str(&run(true)).unwrap() {
        faultd_proto::Response::SessionDetail { mut sessions, .. } => sessions
            .pop()
            .and_then(|d| d.object)
            .expect("the session's object figures"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn four_sessions_of_one_object_at_once_fetch_each_chunk_once() {
    const SIZE: u64 = 32 * MIB;
    let rgw = Rgw::start();
    put_snapshot(&rgw, "tenants/0/clone/mem", SIZE);
    let faultd = Faultd::start_with_config(&config(&rgw));
    let names = ["clone-a", "clone-b", "clone-c", "clone-d"];
    let rams: Vec<Ram> = names.iter().map(|n| Ram::new(n, SIZE)).collect();
    let mut sessions: Vec<_> = rams
        .iter()
        .zip(names)
        .map(|(ram, name)| {
            Client::connect(faultd.socket())
                .unwrap()
                .register_object(
                    name,
                    &ram.uffd,
                    &[RegionSpec::snapshot(0, &ram.ram, 0)],
                    "rgw",
                    "tenants/0/clone/mem",
                )
                .unwrap()
        })
        .collect();
    let pages = (SIZE / PAGE) as u32;

    // The same pages in the same order in every clone, all at once: their faults meet on the
    // same chunks while those are in flight.
    let reports: Vec<Vec<VcpuReport>> = std::thread::scope(|s| {
        let handles: Vec<_> = rams
            .iter()
            .map(|ram| s.spawn(move || verify(&mut ram.vm(GUEST_TIMEOUT), pages, 800, SEED)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    for (i, r) in reports.iter().enumerate() {
        assert!(r.iter().all(|r| r.mismatches == 0), "clone {i}: {r:?}");
    }
    let touched = touched(pages, 800);
    for (i, ram) in rams.iter().enumerate() {
        let stats = resident_settled(&mut sessions[i], || ram.ram.allocated_bytes().unwrap());
        assert_eq!(stats.file_fills, touched.len() as u64, "clone {i}");
    }
    let chunks: BTreeSet<u64> = touched.iter().map(|&p| p as u64 * PAGE / CHUNK).collect();
    let gets = faultd.metric("faultd_object_gets_total");
    let (hits, misses) = (
        faultd.metric("faultd_object_cache_hits_total"),
        faultd.metric("faultd_object_cache_misses_total"),
    );
    println!(
        "4 clones x {} pages in {} chunks: {gets} GETs, cache hits {hits}, misses {misses}",
        touched.len(),
        chunks.len()
    );
    assert_eq!(
        gets,
        chunks.len() as u64,
        "each chunk fetched once for 4 clones"
    );
}

fn refusal(result: Result<faultd_client::Session, ClientError>) -> (ErrorCode, String) {
    match result {
        Err(ClientError::Refused { code, message }) => (code, message),
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn an_object_outside_the_uids_prefix_or_of_an_unknown_store_is_refused() {
    // No radosgw: refused before any request is made to a store.
    let faultd = Faultd::start_with_config(UNREACHABLE_STORE);
    let ram = Ram::new("vm-trust", 4 * MIB);
    let try_key = |store: &str, key: &str| {
        refusal(Client::connect(faultd.socket()).unwrap().register_object(
            "vm-trust",
            &ram.uffd,
            &[RegionSpec::snapshot(0, &ram.ram, 0)],
            store,
            key,
        ))
    };
    for key in [
        "tenants/1000/vm/mem",
        "tenants/0/../1000/vm/mem",
        "tenants/0//mem",
        "other/mem",
        "tenants/0",
    ] {
        let (code, message) = try_key("rgw", key);
        assert_eq!(code, ErrorCode::Forbidden, "{key}: {message}");
        println!("{key}: {message}");
    }
    let (code, message) = try_key("elsewhere", "tenants/0/vm/mem");
    assert_eq!(code, ErrorCode::BadRequest, "{message}");
    assert!(message.contains("no object store is named"), "{message}");
}

#[test]
fn object_replaced_mid_restore_fails_the_session_and_never_serves_the_new_version() {
    const SIZE: u64 = 4 * MIB;
    let rgw = Rgw::start();
    let old = put_snapshot(&rgw, "tenants/0/swap/mem", SIZE);
    let faultd = Faultd::start_with_config(&config(&rgw));
    let ram = Ram::new("vm-swap", SIZE);
    let session = Client::connect(faultd.socket())
        .unwrap()
        .register_object(
            "vm-swap",
            &ram.uffd,
            &[RegionSpec::snapshot(0, &ram.ram, 0)],
            "rgw",
            "tenants/0/swap/mem",
        )
        .unwrap();
    let first = read_with_timeout(&ram.ram, vec![100], Duration::from_secs(20));
    assert_eq!(first[0], old[100]);
    // Another version under the same key: every byte differs from the old one.
    let new: Vec<u8> = old.iter().map(|b| !b).collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mem"), &new).unwrap();
    assert_eq!(
        rgw.put(BUCKET, "tenants/0/swap/mem", &dir.path().join("mem")),
        "200"
    );

    // A page of a chunk not fetched yet: its fault must never be served.
    let (tx, rx) = std::sync::mpsc::channel();
    let offset = 3 * CHUNK as usize + 4096;
    let addr = ram.ram.host_addr() as usize + offset;
    std::thread::spawn(move || {
        // SAFETY: inside the live shared mapping of the RAM (3.5 of its 4 MiB), which this
        // test never unmaps (the RAM is leaked); a volatile byte read makes no reference.
        let b = unsafe { std::ptr::read_volatile(addr as *const u8) };
        let _ = tx.send(b);
    });
    // The blocked thread holds a fault on this RAM until the process exits: the RAM is never
    // unmapped (not even when an assertion below fails).
    std::mem::forget(ram);

    // Never served, neither the new version's byte nor any other.
    if let Ok(b) = rx.recv_timeout(Duration::from_secs(2)) {
        panic!(
            "the faulting thread was served after the object changed: it read {b:#04x} (the \
             old version has {:#04x}, the new one {:#04x})",
            old[offset], new[offset]
        );
    }
    // faultd ends the session and says why, unasked, on the session's connection.
    let mut conn = session.into_raw();
    let (told, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = told.send(conn.recv_response());
    });
    let said = heard
        .recv_timeout(Duration::from_secs(30))
        .expect("faultd said nothing on the session");
    match said.unwrap() {
        faultd_proto::Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::BackingFailed, "{message}");
            assert!(message.contains("changed"), "{message}");
            println!("{message}");
        }
        other => panic!("not an error: {other:?}"),
    }
    assert!(
        rx.try_recv().is_err(),
        "the faulting thread was served after the object changed"
    );
    assert_eq!(faultd.metric("faultd_object_changed_total"), 1);
}

/// A Firecracker restore (the stand-in, [`faultd_tests::firecracker`]) of one region of `size`
/// bytes at guest physical 0, offset 0 of the snapshot, and a KVM guest on its memory.
fn firecracker_restore(socket: &std::path::Path, size: u64) -> (FcRestore, Vm) {
    let mut restore = FcRestore::new(&[(size, 0)], RamPageSize::Size4K).unwrap();
    restore.send(socket, WireForm::Current).unwrap();
    let mut vm = Vm::new(vec![RamSlot {
        gpa: 0,
        host: restore.regions[0].ram.host_ptr(),
        size,
    }])
    .expect("creating the KVM VM");
    vm.set_timeout(Some(GUEST_TIMEOUT));
    (restore, vm)
}

#[test]
fn firecracker_restore_from_an_object_serves_every_page_the_guest_touches_one_get_per_chunk() {
    const SIZE: u64 = 32 * MIB;
    let rgw = Rgw::start();
    let data = put_snapshot(&rgw, "tenants/0/fc-obj/mem", SIZE);
    let faultd = Faultd::start_with_config(&config(&rgw));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fc.sock");
    faultd
        .listen_firecracker_object("fc-obj", &socket, "rgw", "tenants/0/fc-obj/mem", None)
        .unwrap();
    let (restore, mut vm) = firecracker_restore(&socket, SIZE);
    let pages = (SIZE / PAGE) as u32;

    // Firecracker's own load thread touches the first page of every 8th chunk before the guest
    // runs (as its load does), then the guest verifies random pages.
    let early: Vec<u64> = (0..SIZE / CHUNK)
        .step_by(8)
        .map(|c| restore.addr(0, c * CHUNK))
        .collect();
    let loaded = copy_with_timeout(early.clone(), PAGE as usize, Duration::from_secs(20));
    let reports = verify(&mut vm, pages, 60, SEED);

    for (i, page) in loaded.iter().enumerate() {
        let at = (early[i] - restore.addr(0, 0)) as usize;
        assert!(
            *page == data[at..at + PAGE as usize],
            "load thread's page at {at:#x}"
        );
    }
    for r in &reports {
        assert_eq!(
            r.mismatches, 0,
            "first mismatch at {:?}",
            r.first_mismatch_gpa
        );
    }
    let mut touched = touched(pages, 60);
    touched.extend(
        early
            .iter()
            .map(|&a| ((a - restore.addr(0, 0)) / PAGE) as u32),
    );
    // Whole pages, not just the dwords the guest checked, equal the object.
    let addrs: Vec<u64> = touched
        .iter()
        .map(|&p| restore.addr(0, p as u64 * PAGE))
        .collect();
    let now = copy_with_timeout(addrs, PAGE as usize, Duration::from_secs(20));
    for (&p, page) in touched.iter().zip(&now) {
        let at = p as usize * PAGE as usize;
        assert!(
            *page == data[at..at + PAGE as usize],
            "page {p} differs from the object"
        );
    }
    let stats = faultd.settled_vm_stats("fc-obj-1", |s| {
        s.first()
            .is_some_and(|s| s.file_fills == touched.len() as u64)
    });
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(
        (stats[0].file_fills, stats[0].errors),
        (touched.len() as u64, 0)
    );
    let chunks: BTreeSet<u64> = touched.iter().map(|&p| p as u64 * PAGE / CHUNK).collect();
    let gets = faultd.metric("faultd_object_gets_total");
    println!(
        "Firecracker restore: {} pages in {} of {} chunks: {gets} GETs, {} bytes fetched",
        touched.len(),
        chunks.len(),
        SIZE / CHUNK,
        faultd.metric("faultd_object_fetched_bytes_total"),
    );
    assert_eq!(gets, chunks.len() as u64, "one GET per chunk touched");
    assert!(chunks.len() < (SIZE / CHUNK) as usize);

    // The check can fail: verified against another seed's pattern, the object mismatches.
    let wrong = verify(&mut vm, pages, 200, SEED + 1);
    assert!(wrong.iter().all(|r| r.mismatches > 0));
}

#[test]
fn a_firecracker_listener_on_an_object_outside_the_admitted_uids_prefix_is_refused() {
    // No radosgw: refused before any request is made to a store.
    let faultd = Faultd::start_with_config(UNREACHABLE_STORE);
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fc.sock");
    let refused = |store: &str, key: &str, uid: Option<u32>| match faultd
        .listen_firecracker_object("fc-trust", &socket, store, key, uid)
    {
        Err(ClientError::Refused { code, message }) => (code, message),
        other => panic!("{store}:{key} for {uid:?}: not refused: {other:?}"),
    };
    // The socket admits uid 1000: its prefix, not the operator's, is what it may read.
    for (key, uid) in [
        ("tenants/0/vm/mem", Some(1000)),
        ("tenants/1000/../0/vm/mem", Some(1000)),
        ("tenants/1000/vm/mem", None),
        ("other/mem", None),
    ] {
        let (code, message) = refused("rgw", key, uid);
        println!("{key} for {uid:?}: {code:?} {message}");
        assert_eq!(code, ErrorCode::Forbidden, "{key}: {message}");
        assert!(
            message.contains("not under") || message.contains("segments"),
            "{key}: {message}"
        );
    }
    let (code, message) = refused("elsewhere", "tenants/0/vm/mem", None);
    assert_eq!(code, ErrorCode::BadRequest, "{message}");
    assert!(message.contains("no object store is named"), "{message}");
    assert!(!socket.exists(), "a refused listen left its socket");
    // Its own prefix is accepted (the listen makes no request to the store).
    faultd
        .listen_firecracker_object(
            "fc-trust",
            &socket,
            "rgw",
            "tenants/1000/vm/mem",
            Some(1000),
        )
        .unwrap();
    assert!(socket.exists());
}

#[test]
fn radosgw_killed_mid_restore_and_started_again_the_guest_waits_then_reads_every_page_right() {
    const SIZE: u64 = 64 * MIB;
    let rgw = std::sync::Mutex::new(Rgw::start());
    let data = {
        let rgw = rgw.lock().unwrap();
        put_snapshot(&rgw, "tenants/0/kill/mem", SIZE)
    };
    // 20 s deadline: the outage (a SIGKILL and a restart, a few seconds) is shorter.
    let faultd = Faultd::start_with_config(&config(&rgw.lock().unwrap()));
    let ram = Ram::new("vm-kill", SIZE);
    let mut session = Client::connect(faultd.socket())
        .unwrap()
        .register_object(
            "vm-kill",
            &ram.uffd,
            &[RegionSpec::snapshot(0, &ram.ram, 0)],
            "rgw",
            "tenants/0/kill/mem",
        )
        .unwrap();
    let pages = (SIZE / PAGE) as u32;
    // A guest that fails the run if a fault is never served (the session failed).
    let mut vm = ram.vm(Duration::from_secs(40));
    vm.set_progress_interval(16);
    let killed = std::sync::atomic::AtomicBool::new(false);
    let gets_at_kill = std::sync::atomic::AtomicU64::new(0);
    let guest_done = std::sync::atomic::AtomicBool::new(false);

    let (reports, outage) = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            // vCPU 0, 16 pages into its walk: radosgw is killed (SIGKILL) from the guest's own
            // progress report, so the guest is mid-restore, its other pages' chunks not fetched.
            let r = vm.run(
                [(0, pages / 2), (pages / 2, pages / 2)]
                    .iter()
                    .map(|&(first_page, page_count)| Workload::Verify {
                        seed: SEED,
                        touches: 200,
                        first_page,
                        page_count,
                    })
                    .collect(),
                &|vcpu, done| {
                    if vcpu == 0 && done >= 16 && !killed.swap(true, Ordering::SeqCst) {
                        gets_at_kill
                            .store(faultd.metric("faultd_object_gets_total"), Ordering::SeqCst);
                        rgw.lock().unwrap().kill_gateway();
                    }
                },
            );
            guest_done.store(true, Ordering::SeqCst);
            r
        });
        // The guest waits: GETs fail while radosgw is gone.
        let t0 = std::time::Instant::now();
        while !(killed.load(Ordering::SeqCst)
            && faultd.metric("faultd_object_get_errors_total") >= 2)
        {
            assert!(t0.elapsed() < Duration::from_secs(30), "no GET failed");
            std::thread::sleep(Duration::from_millis(20));
        }
        let down = std::time::Instant::now();
        assert!(
            !guest_done.load(Ordering::SeqCst),
            "the guest finished without radosgw"
        );
        rgw.lock().unwrap().start_gateway();
        let outage = down.elapsed();
        (guest.join().unwrap().expect("guest run"), outage)
    });

    for r in &reports {
        assert_eq!(
            r.mismatches, 0,
            "first mismatch at {:?}",
            r.first_mismatch_gpa
        );
    }
    let touched = touched(pages, 200);
    for &p in &touched {
        let at = p as usize * PAGE as usize;
        assert!(
            host_page(&ram, p) == data[at..at + PAGE as usize],
            "page {p} differs from the object"
        );
    }
    let chunks: BTreeSet<u64> = touched.iter().map(|&p| p as u64 * PAGE / CHUNK).collect();
    let at_kill = gets_at_kill.load(Ordering::SeqCst);
    let errors = faultd.metric("faultd_object_get_errors_total");
    println!(
        "killed after {at_kill} GETs of {} chunks; down {outage:?}; {errors} GETs failed; {} \
         GETs in all",
        chunks.len(),
        faultd.metric("faultd_object_gets_total")
    );
    assert!(at_kill < chunks.len() as u64, "chunks were left to fetch");
    // The session lives on, without an error, and served every page it was asked for.
    let stats = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    assert_eq!(
        (stats.file_fills, stats.errors),
        (touched.len() as u64, 0),
        "{stats:?}"
    );
    assert_eq!(faultd.metric("faultd_object_changed_total"), 0);
}

#[test]
fn a_store_gone_for_good_fails_the_vcpu_session_at_the_deadline_and_answers_the_device_invalid() {
    const SIZE: u64 = 4 * MIB;
    const DEADLINE: Duration = Duration::from_millis(3000);
    let mut rgw = Rgw::start();
    let data = put_snapshot(&rgw, "tenants/0/gone/mem", SIZE);
    let toml = config(&rgw).replace(
        "deadline_ms = 20000",
        &format!("deadline_ms = {}", DEADLINE.as_millis()),
    );
    assert!(toml.contains("deadline_ms = 3000"));
    let faultd = Faultd::start_with_config(&toml);
    let ram = Ram::new("vm-gone", SIZE);
    let mut session = Client::connect(faultd.socket())
        .unwrap()
        .register_object(
            "vm-gone",
            &ram.uffd,
            &[RegionSpec::snapshot(0, &ram.ram, 0)],
            "rgw",
            "tenants/0/gone/mem",
        )
        .unwrap();
    // A faulting device (the emulated PRI device, its page requests on a ring to faultd).
    let dev_cfg = testvmm::DeviceConfig {
        response_timeout: Duration::from_secs(20),
        ..testvmm::DeviceConfig::default()
    };
    // SAFETY: the RAM is leaked below (never unmapped) and the device is dropped before the
    // end of the test; nothing holds a Rust reference into guest RAM.
    let dev = unsafe { testvmm::PriDevice::new(ram.ram.host_ptr(), 0, SIZE, dev_cfg) }
        .expect("creating the device");
    dev.attach(&mut session).expect("add_device");
    // Chunk 0 is fetched while the store is there.
    let first = read_with_timeout(&ram.ram, vec![100], Duration::from_secs(20));
    assert_eq!(first[0], data[100]);
    rgw.kill_gateway();

    // The device asks for a page of chunk 2: answered INVALID at the device deadline
    // (device.deadline_ms), long before the object's; the DMA fails instead of hanging.
    let mut buf = vec![0u8; 4096];
    // The first fetch the dead store cannot answer starts here: its deadline runs from now.
    let t = std::time::Instant::now();
    let first_miss = t;
    let dma = dev.dma_read(0, 2 * CHUNK + 8192, &mut buf);
    assert!(
        dma.is_err(),
        "a DMA from a chunk nobody can fetch succeeded"
    );
    assert!(
        t.elapsed() < DEADLINE,
        "the device waited {:?}",
        t.elapsed()
    );
    let st = session.stats().unwrap();
    assert!(
        st.device.invalid >= 1 && st.device.deadline >= 1,
        "{:?}",
        st.device
    );
    println!("device: {:?} after {:?}", dma.unwrap_err(), t.elapsed());

    // A vCPU faults on chunk 3: never served; at the object deadline of the first fetch that
    // failed (chunk 2's, which the device's request started) faultd ends the session and says
    // why, unasked, on the session's connection.
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = ram.ram.host_addr() as usize + 3 * CHUNK as usize + 4096;
    std::thread::spawn(move || {
        // SAFETY: inside the live shared mapping of the RAM, which this test never unmaps (the
        // RAM is leaked below); a volatile byte read makes no reference.
        let b = unsafe { std::ptr::read_volatile(addr as *const u8) };
        let _ = tx.send(b);
    });
    drop(dev);
    // The blocked thread holds a fault on this RAM until the process exits.
    std::mem::forget(ram);
    let mut conn = session.into_raw();
    let (told, heard) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = told.send(conn.recv_response());
    });
    let said = heard
        .recv_timeout(DEADLINE * 4)
        .expect("faultd said nothing on the session");
    let waited = first_miss.elapsed();
    match said.unwrap() {
        faultd_proto::Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::BackingFailed, "{message}");
            assert!(
                message.contains("tenants/0/gone/mem") && message.contains("not fetched within 3s"),
                "{message}"
            );
            println!("after {waited:?}: {message}");
        }
        other => panic!("not an error: {other:?}"),
    }
    assert!(
        waited + Duration::from_millis(200) >= DEADLINE,
        "failed after {waited:?}, before the {DEADLINE:?} deadline"
    );
    assert!(
        rx.try_recv().is_err(),
        "the faulting thread was served though the store is gone"
    );
    assert!(faultd.metric("faultd_object_get_errors_total") >= 1);
}

/// One vCPU verifying `touches` random pages of `[first, first + count)` against `SEED`'s
/// pattern.
fn verify_range(vm: &mut Vm, first: u32, count: u32, touches: u32) -> VcpuReport {
    let mut r = vm
        .run(
            vec![Workload::Verify {
                seed: SEED,
                touches,
                first_page: first,
                page_count: count,
            }],
            &|_, _| {},
        )
        .expect("guest run");
    r.pop().expect("one vCPU's report")
}

fn chunks_of(pages: &BTreeSet<u32>) -> BTreeSet<u64> {
    pages.iter().map(|&p| p as u64 * PAGE / CHUNK).collect()
}

/// The fd store names of a kept Firecracker restore from an object: the memfd, the uffd and
/// the connection, and no snapshot fd.
fn kept_names(vm: &str) -> Vec<String> {
    vec![format!("faultd-fc-{vm}"); 3]
}

#[test]
fn a_firecracker_restore_from_an_object_is_served_again_after_a_faultd_restart_cached_chunks_not_fetched_again(
) {
    const SIZE: u64 = 32 * MIB;
    let pages = (SIZE / PAGE) as u32;
    let rgw = Rgw::start();
    let data = put_snapshot(&rgw, "tenants/0/fc-okept/mem", SIZE);
    let dir = tempfile::tempdir().unwrap();
    let manager = faultd_tests::service_manager::ServiceManager::new(dir.path());
    let mut faultd = Faultd::start_managed_with_config(&manager, &config(&rgw));
    let socket = dir.path().join("fc.sock");
    faultd
        .listen_firecracker_object("fc-okept", &socket, "rgw", "tenants/0/fc-okept/mem", None)
        .unwrap();
    let (restore, mut vm) = firecracker_restore(&socket, SIZE);

    // Before the restart the guest verifies pages of the first half.
    let before = verify_range(&mut vm, 0, pages / 2, 150);
    assert_eq!(before.mismatches, 0, "{before:?}");
    let want: Vec<String> = kept_names("fc-okept-1");
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    assert_eq!(
        manager.wait_for_store(&want, Duration::from_secs(10)),
        want,
        "the restore from an object was not kept:\n{}",
        faultd.log()
    );
    let t1: BTreeSet<u32> = page_sequence(SEED, 150, 0, pages / 2).into_iter().collect();
    let gets_before = faultd.metric("faultd_object_gets_total");
    assert_eq!(gets_before, chunks_of(&t1).len() as u64);

    // A crash, and the service manager starts faultd again with the kept fds.
    faultd.kill9();
    faultd.restart();
    assert!(
        faultd.wait_for_log(
            "serving a Firecracker restore again after a faultd restart",
            Duration::from_secs(20)
        ),
        "{}",
        faultd.log()
    );

    // The guest goes on: pages of the middle half, most of them never touched before, some in
    // chunks the first faultd fetched (in the cache, kept across the restart).
    let after = verify_range(&mut vm, pages / 4, pages / 2, 150);
    assert_eq!(after.mismatches, 0, "{after:?}");
    let t2: BTreeSet<u32> = page_sequence(SEED, 150, pages / 4, pages / 2)
        .into_iter()
        .collect();
    let new: BTreeSet<u32> = t2.difference(&t1).copied().collect();
    let (c1, cnew) = (chunks_of(&t1), chunks_of(&new));
    let fetched_now: BTreeSet<u64> = cnew.difference(&c1).copied().collect();
    let in_cached = new
        .iter()
        .filter(|&&p| c1.contains(&(p as u64 * PAGE / CHUNK)))
        .count();
    // Whole pages, before the restart and after, equal the object.
    let all: Vec<u32> = t1.union(&t2).copied().collect();
    let now = copy_with_timeout(
        all.iter()
            .map(|&p| restore.addr(0, p as u64 * PAGE))
            .collect(),
        PAGE as usize,
        Duration::from_secs(20),
    );
    for (&p, page) in all.iter().zip(&now) {
        let at = p as usize * PAGE as usize;
        assert!(
            *page == data[at..at + PAGE as usize],
            "page {p} differs from the object"
        );
    }
    let stats = faultd.settled_vm_stats("fc-okept-1", |s| {
        s.first().is_some_and(|s| s.file_fills == new.len() as u64)
    });
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(
        (stats[0].file_fills, stats[0].errors),
        (new.len() as u64, 0)
    );
    let (gets, hits) = (
        faultd.metric("faultd_object_gets_total"),
        faultd.metric("faultd_object_cache_hits_total"),
    );
    println!(
        "before the restart: {} pages in {} chunks, {gets_before} GETs; after: {} new pages, {} \
         of them in chunks cached before the restart; {gets} GETs for {} chunks not cached, {hits} \
         cache hits",
        t1.len(),
        c1.len(),
        new.len(),
        in_cached,
        fetched_now.len()
    );
    assert!(
        in_cached > 0,
        "no page after the restart in a cached chunk, to mean anything"
    );
    assert_eq!(
        gets,
        fetched_now.len() as u64,
        "cached chunks fetched again"
    );
    assert!(hits >= in_cached as u64, "{hits} hits");
    assert_eq!(faultd.metric("faultd_object_kept_refused_total"), 0);

    // The check can fail: verified against another seed's pattern, the object mismatches.
    let wrong = vm
        .run(
            vec![Workload::Verify {
                seed: SEED + 1,
                touches: 50,
                first_page: 0,
                page_count: pages / 2,
            }],
            &|_, _| {},
        )
        .expect("guest run");
    assert!(wrong[0].mismatches > 0);
}

/// [`config`] with a second store, `rgwb`, on the same bucket, whose uids may read only keys
/// under `tenants/<uid>/<sub>/`.
fn config_two(rgw: &Rgw, sub: &str) -> String {
    format!(
        r#"{}
[[object_store.stores]]
name = "rgwb"
endpoint = "{}"
region = "{REGION}"
bucket = "{BUCKET}"
access_key = "{ACCESS_KEY}"
secret_key = "{SECRET_KEY}"
prefix = "tenants/{{uid}}/{sub}/"
"#,
        config(rgw),
        rgw.endpoint()
    )
}

/// Starts a thread that reads one byte at `addr`; its result, if it is ever served.
fn probe(addr: u64) -> std::sync::mpsc::Receiver<u8> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: inside a live mapping of the stand-in's guest RAM, which the test never
        // unmaps (the restore is leaked); a volatile byte read makes no reference.
        let b = unsafe { std::ptr::read_volatile(addr as *const u8) };
        let _ = tx.send(b);
    });
    rx
}

#[test]
fn a_kept_object_restore_whose_object_was_replaced_or_whose_key_is_no_longer_allowed_is_not_served_again(
) {
    const SIZE: u64 = 4 * MIB;
    let rgw = Rgw::start();
    let old = put_snapshot(&rgw, "tenants/0/fc-swap/mem", SIZE);
    put_snapshot(&rgw, "tenants/0/b/mem", SIZE);
    let dir = tempfile::tempdir().unwrap();
    let manager = faultd_tests::service_manager::ServiceManager::new(dir.path());
    let mut faultd = Faultd::start_managed_with_config(&manager, &config_two(&rgw, "b"));
    let (swap, rule) = (dir.path().join("swap.sock"), dir.path().join("rule.sock"));
    faultd
        .listen_firecracker_object("fc-swap", &swap, "rgw", "tenants/0/fc-swap/mem", None)
        .unwrap();
    faultd
        .listen_firecracker_object("fc-rule", &rule, "rgwb", "tenants/0/b/mem", None)
        .unwrap();
    let mut restores = Vec::new();
    for (socket, vm) in [(&swap, "fc-swap-1"), (&rule, "fc-rule-1")] {
        let mut r = FcRestore::new(&[(SIZE, 0)], RamPageSize::Size4K).unwrap();
        r.send(socket, WireForm::Current).unwrap();
        // Firecracker's load thread reads the first page of chunk 0 (one GET).
        let got = copy_with_timeout(vec![r.addr(0, 0)], PAGE as usize, Duration::from_secs(20));
        assert!(got[0] == old[..PAGE as usize] || vm == "fc-rule-1");
        let want = kept_names(vm);
        let stored = manager.wait_for_store(
            &[manager.stored_names(), want.clone()]
                .concat()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            Duration::from_secs(10),
        );
        assert!(stored.ends_with(&want), "{stored:?}\n{}", faultd.log());
        restores.push(r);
    }

    // faultd goes down; meanwhile the object is replaced (every byte inverted) and the config
    // no longer lets uid 0 read rgwb's tenants/0/b/.
    faultd.kill9();
    let new: Vec<u8> = old.iter().map(|b| !b).collect();
    std::fs::write(dir.path().join("new"), &new).unwrap();
    assert_eq!(
        rgw.put(BUCKET, "tenants/0/fc-swap/mem", &dir.path().join("new")),
        "200"
    );
    faultd.rewrite_config(&config_two(&rgw, "c"));
    faultd.restart();

    // Faults on a page of the cached chunk 0 (not yet in RAM) and of a chunk never fetched, in
    // each VM.
    let probes: Vec<(usize, u64, std::sync::mpsc::Receiver<u8>)> = restores
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            [PAGE, 3 * CHUNK + PAGE]
                .into_iter()
                .map(move |o| (i, o, probe(r.addr(0, o))))
                .collect::<Vec<_>>()
        })
        .collect();
    // The threads blocked on those faults keep the RAM until the process exits.
    std::mem::forget(restores);
    // Both kept restores handled (refused, or, were the checks broken, served again), and
    // time for a served fault to land.
    let t0 = std::time::Instant::now();
    while faultd.log().matches("not served again").count()
        + faultd
            .log()
            .matches("serving a Firecracker restore again")
            .count()
        < 2
    {
        assert!(t0.elapsed() < Duration::from_secs(20), "{}", faultd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    for (i, o, rx) in &probes {
        if let Ok(b) = rx.try_recv() {
            panic!(
                "restore {i}: the fault at {o:#x} was served after the restart: it read {b:#04x} \
                 (old version {:#04x}, new {:#04x})\n{}",
                old[*o as usize],
                new[*o as usize],
                faultd.log()
            );
        }
    }
    let log = faultd.log();
    for what in ["changed while faultd was down", "is not under"] {
        assert!(log.contains(what), "{what}:\n{log}");
    }
    for line in log.lines().filter(|l| l.contains("not served again")) {
        println!("{line}");
    }
    assert_eq!(
        faultd.metric("faultd_object_kept_refused_total"),
        2,
        "{log}"
    );
    assert_eq!(
        faultd.metric("faultd_object_gets_total"),
        0,
        "a GET after the restart"
    );
    assert!(faultd.vm_stats("fc-swap-1").is_empty() && faultd.vm_stats("fc-rule-1").is_empty());
    assert!(
        manager
            .wait_for_store(&[], Duration::from_secs(10))
            .is_empty(),
        "{:?}",
        manager.stored_names()
    );
}

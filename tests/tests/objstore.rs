//! The object-store chunk fetcher (`crates/objstore`) against a real radosgw started by each
//! test (tests/src/rgw.rs): byte-exact chunks, single flight, version pinning, the cache bound,
//! the cache kept across a reopen, retries across a gateway restart and the deadline.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faultd_tests::rgw::{Rgw, ACCESS_KEY, BUCKET, REGION, SECRET_KEY};
use objstore::{
    s3_store, Bytes, ChunkCache, ChunkSize, ChunkWaiter, CountingStore, FetchConfig, FetchError,
    Fetcher, Requester, S3Spec, Served, Tenant,
};

const KIB: u64 = 1024;
/// The tenant the single-tenant tests fetch for.
const ME: Requester = Requester {
    tenant: Tenant(0),
    class: objstore::Class::Demand,
};

/// Deterministic bytes that differ per `seed` and per offset (no two 4 KiB pages alike).
fn pattern(len: u64, seed: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = (i / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ seed.wrapping_mul(0xD6E8_FEB8);
            (x >> ((i % 8) * 8)) as u8
        })
        .collect()
}

fn put(rgw: &Rgw, key: &str, data: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    std::fs::write(&body, data).unwrap();
    assert_eq!(rgw.put(BUCKET, key, &body), "200", "PUT {key}");
}

fn client(rgw: &Rgw) -> Arc<CountingStore> {
    Arc::new(CountingStore::new(s3(rgw)))
}

fn s3(rgw: &Rgw) -> Arc<dyn objstore::object_store::ObjectStore> {
    let spec = S3Spec {
        endpoint: rgw.endpoint(),
        region: REGION.into(),
        bucket: BUCKET.into(),
        credentials: Some(objstore::Credentials {
            access_key: ACCESS_KEY.into(),
            secret_key: SECRET_KEY.into(),
        }),
    };
    s3_store(&spec, Duration::from_secs(5)).unwrap()
}

fn fetcher(dir: &Path, chunk: u64, bound: u64) -> Fetcher {
    let mut config = FetchConfig::new(ChunkSize::new(chunk).unwrap());
    config.deadline = Duration::from_secs(10);
    Fetcher::new(ChunkCache::open(dir, bound).unwrap(), config).unwrap()
}

#[test]
fn radosgw_starts_and_serves_a_put_object() {
    let rgw = Rgw::start();
    eprintln!("radosgw ready in {:?}", rgw.started_in());
    put(&rgw, "k", b"hello");
}

#[test]
fn every_chunk_read_is_byte_exact_including_the_short_last() {
    let rgw = Rgw::start();
    let data = pattern(3 * 512 * KIB + 100 * KIB + 3, 1);
    put(&rgw, "obj", &data);
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), 512 * KIB, 64 << 20);
    let store = client(&rgw);
    let obj = f
        .open(store.clone(), &rgw.endpoint(), BUCKET, "obj")
        .unwrap();
    assert_eq!(obj.size(), data.len() as u64);
    assert_eq!(obj.chunks(), 4);
    for c in 0..obj.chunks() {
        let r = obj.chunk_range(c);
        let got = f.read_chunk_blocking(&obj, c, ME).unwrap();
        assert!(
            got[..] == data[r.start as usize..r.end as usize],
            "chunk {c} differs"
        );
    }
    assert_eq!(store.gets(), 4);
    assert!(matches!(
        f.read_chunk_blocking(&obj, 4, ME),
        Err(FetchError::OutOfRange { .. })
    ));
}

/// Collects what a waiter was told.
#[derive(Default)]
struct Collect(Mutex<Vec<(u64, Result<Bytes, FetchError>)>>);

impl ChunkWaiter for Collect {
    fn chunk_landed(&self, chunk: u64, result: Result<Bytes, FetchError>) {
        self.0.lock().unwrap().push((chunk, result));
    }
}

fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "{what} within {deadline:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn concurrent_waiters_on_one_chunk_cause_exactly_one_get() {
    let rgw = Rgw::start();
    let data = pattern(2 * 4096 * KIB, 2);
    put(&rgw, "big", &data);
    let cache = tempfile::tempdir().unwrap();
    let f = Arc::new(fetcher(cache.path(), 4096 * KIB, 64 << 20));
    let store = client(&rgw);
    let obj = f
        .open(store.clone(), &rgw.endpoint(), BUCKET, "big")
        .unwrap();
    let waiters: Vec<Arc<Collect>> = (0..16).map(|_| Arc::default()).collect();
    // 16 readers of one 4 MiB chunk from 4 threads at once: all must find it in flight (a
    // 4 MiB GET takes milliseconds; these reads take microseconds), none may start a GET.
    std::thread::scope(|s| {
        for group in waiters.chunks(4) {
            let (f, obj) = (f.clone(), obj.clone());
            s.spawn(move || {
                for w in group {
                    let w: Arc<dyn ChunkWaiter> = w.clone();
                    let mut buf = [0u8; 4096];
                    let served = f.read(&obj, 4096 * KIB + 8192, &mut buf, &w, ME).unwrap();
                    assert_eq!(served, Served::Pending);
                }
            });
        }
    });
    wait_for("every waiter told", Duration::from_secs(10), || {
        waiters.iter().all(|w| !w.0.lock().unwrap().is_empty())
    });
    assert_eq!(store.gets(), 1, "GETs for one chunk with 16 waiters");
    for w in &waiters {
        let told = w.0.lock().unwrap();
        assert_eq!(told.len(), 1);
        let (chunk, bytes) = &told[0];
        assert_eq!(*chunk, 1);
        assert!(bytes.as_ref().unwrap()[..] == data[4096 * KIB as usize..]);
    }
    let mut buf = [0u8; 4096];
    let any: Arc<dyn ChunkWaiter> = waiters[0].clone();
    assert_eq!(
        f.read(&obj, 4096 * KIB + 8192, &mut buf, &any, ME).unwrap(),
        Served::Read
    );
    assert!(buf[..] == data[(4096 * KIB + 8192) as usize..][..4096]);
    assert_eq!(store.gets(), 1, "a cached chunk is read without a GET");
}

#[test]
fn object_replaced_midway_fails_with_object_changed_and_never_mixes() {
    let rgw = Rgw::start();
    let old = pattern(4 * 512 * KIB, 3);
    put(&rgw, "obj", &old);
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), 512 * KIB, 64 << 20);
    let obj = f
        .open(client(&rgw), &rgw.endpoint(), BUCKET, "obj")
        .unwrap();
    let first = f.read_chunk_blocking(&obj, 0, ME).unwrap();
    assert!(first[..] == old[..512 * KIB as usize]);
    put(&rgw, "obj", &pattern(4 * 512 * KIB, 4));
    let err = f.read_chunk_blocking(&obj, 1, ME).unwrap_err();
    assert!(
        matches!(err, FetchError::ObjectChanged { .. }),
        "replaced object gave {err}"
    );
    eprintln!("{err}");
    assert_eq!(
        f.counters()
            .changed
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn cache_bound_holds_when_more_chunks_are_read_than_fit() {
    let rgw = Rgw::start();
    let data = pattern(10 * 512 * KIB, 5);
    put(&rgw, "obj", &data);
    let cache = tempfile::tempdir().unwrap();
    let bound = 3 * (512 * KIB + objstore::TRAILER_LEN);
    let f = fetcher(cache.path(), 512 * KIB, bound);
    let obj = f
        .open(client(&rgw), &rgw.endpoint(), BUCKET, "obj")
        .unwrap();
    for c in 0..obj.chunks() {
        let got = f.read_chunk_blocking(&obj, c, ME).unwrap();
        let r = obj.chunk_range(c);
        assert!(got[..] == data[r.start as usize..r.end as usize]);
        let on_disk: u64 = std::fs::read_dir(cache.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= bound, "{on_disk} bytes on disk > bound {bound}");
        assert!(f.cache().bytes() <= bound);
    }
    assert_eq!(f.cache().len(), 3);
    let evicted = f
        .cache()
        .counters
        .evicted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(evicted, 7);
}

#[test]
fn cache_reopened_after_drop_serves_every_chunk_without_a_get() {
    let rgw = Rgw::start();
    let data = pattern(5 * 512 * KIB, 6);
    put(&rgw, "obj", &data);
    let cache = tempfile::tempdir().unwrap();
    {
        let f = fetcher(cache.path(), 512 * KIB, 64 << 20);
        let obj = f
            .open(client(&rgw), &rgw.endpoint(), BUCKET, "obj")
            .unwrap();
        for c in 0..obj.chunks() {
            f.read_chunk_blocking(&obj, c, ME).unwrap();
        }
    }
    let f = fetcher(cache.path(), 512 * KIB, 64 << 20);
    let store = client(&rgw);
    let obj = f
        .open(store.clone(), &rgw.endpoint(), BUCKET, "obj")
        .unwrap();
    for c in 0..obj.chunks() {
        let got = f.read_chunk_blocking(&obj, c, ME).unwrap();
        let r = obj.chunk_range(c);
        assert!(got[..] == data[r.start as usize..r.end as usize]);
    }
    assert_eq!(store.gets(), 0, "GETs after the cache was reopened");
    assert_eq!(store.heads(), 1, "the version is still checked once");
}

#[test]
fn gateway_killed_and_restarted_within_the_deadline_is_retried_to_success() {
    let mut rgw = Rgw::start();
    let data = pattern(2 * 512 * KIB, 7);
    put(&rgw, "obj", &data);
    let cache = tempfile::tempdir().unwrap();
    let f = Arc::new(fetcher(cache.path(), 512 * KIB, 64 << 20));
    let store = client(&rgw);
    let obj = f
        .open(store.clone(), &rgw.endpoint(), BUCKET, "obj")
        .unwrap();
    rgw.kill_gateway();
    let reader = {
        let (f, obj) = (f.clone(), obj.clone());
        std::thread::spawn(move || f.read_chunk_blocking(&obj, 1, ME))
    };
    wait_for("GETs failing", Duration::from_secs(5), || store.gets() >= 2);
    rgw.start_gateway();
    let got = reader.join().unwrap().unwrap();
    assert!(got[..] == data[512 * KIB as usize..]);
    assert!(
        f.counters()
            .get_errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

#[test]
fn gateway_gone_past_the_deadline_gives_waiters_a_deadline_error() {
    let mut rgw = Rgw::start();
    put(&rgw, "obj", &pattern(512 * KIB, 8));
    let cache = tempfile::tempdir().unwrap();
    let mut config = FetchConfig::new(ChunkSize::new(512 * KIB).unwrap());
    config.deadline = Duration::from_secs(1);
    let f = Fetcher::new(ChunkCache::open(cache.path(), 64 << 20).unwrap(), config).unwrap();
    let obj = f
        .open(client(&rgw), &rgw.endpoint(), BUCKET, "obj")
        .unwrap();
    rgw.kill_gateway();
    let t0 = Instant::now();
    let err = f.read_chunk_blocking(&obj, 0, ME).unwrap_err();
    let took = t0.elapsed();
    assert!(matches!(err, FetchError::Deadline { .. }), "{err}");
    assert!(
        took < Duration::from_secs(3),
        "deadline error after {took:?}"
    );
    eprintln!("{err} (after {took:?})");
}

#[test]
fn one_tenants_flood_of_chunks_never_queues_another_tenants_fault_behind_it() {
    // A slow store (every GET 20 ms longer) and 2 GET slots: tenant 1 asks for all 96
    // chunks of its object at once, about a second of GETs. Tenant 2 then faults on one
    // chunk of its own object: its GET must start as soon as a slot frees, not after tenant
    // 1's queue (a FIFO of slots put it behind ~90 GETs).
    let rgw = Rgw::start();
    const CHUNKS: u64 = 96;
    let chunk = 512 * KIB;
    put(&rgw, "tenant-1/flood", &pattern(CHUNKS * chunk, 7));
    put(&rgw, "tenant-2/one", &pattern(chunk, 8));
    let store = Arc::new(CountingStore::new(s3(&rgw)).with_get_delay(Duration::from_millis(20)));
    let cache = tempfile::tempdir().unwrap();
    let mut config = FetchConfig::new(ChunkSize::new(chunk).unwrap());
    config.deadline = Duration::from_secs(30);
    config.max_in_flight = 2;
    config.per_tenant_in_flight = 2;
    let f = Fetcher::new(ChunkCache::open(cache.path(), 256 << 20).unwrap(), config).unwrap();
    let flood = f
        .open(store.clone(), &rgw.endpoint(), BUCKET, "tenant-1/flood")
        .unwrap();
    let one = f
        .open(store.clone(), &rgw.endpoint(), BUCKET, "tenant-2/one")
        .unwrap();
    let (t1, t2) = (Requester::demand(Tenant(1)), Requester::demand(Tenant(2)));
    let w1 = Arc::new(Collect::default());
    let w1d: Arc<dyn ChunkWaiter> = w1.clone();
    let mut buf = [0u8; 4096];
    for c in 0..CHUNKS {
        let served = f.read(&flood, c * chunk, &mut buf, &w1d, t1).unwrap();
        assert_eq!(served, Served::Pending);
    }
    // A few of tenant 1's GETs have run: its queue is long, the slots busy.
    wait_for("tenant 1's GETs under way", Duration::from_secs(10), || {
        store.gets() >= 4
    });
    let before = store.gets() as usize;
    let w2 = Arc::new(Collect::default());
    let w2d: Arc<dyn ChunkWaiter> = w2.clone();
    assert_eq!(
        f.read(&one, 0, &mut buf, &w2d, t2).unwrap(),
        Served::Pending
    );
    wait_for("tenant 2's chunk", Duration::from_secs(30), || {
        !w2.0.lock().unwrap().is_empty()
    });
    let started = store.started();
    let at = started
        .iter()
        .position(|p| p.as_ref() == "tenant-2/one")
        .expect("tenant 2's GET");
    // Slots free one at a time; the next one handed out is tenant 2's (one more of tenant
    // 1's may have been handed out just before tenant 2 asked, and start just after).
    let ahead = at.saturating_sub(before);
    assert!(
        ahead <= 1,
        "tenant 2's GET started after {ahead} more of tenant 1's GETs ({before} had started \
         when it asked; tenant 1 queued {CHUNKS})"
    );
    let got = w2.0.lock().unwrap();
    assert!(got[0].1.as_ref().unwrap()[..] == pattern(chunk, 8)[..]);
    drop(got);
    wait_for("tenant 1's chunks", Duration::from_secs(30), || {
        w1.0.lock().unwrap().len() == CHUNKS as usize
    });
    assert_eq!(store.gets(), CHUNKS + 1, "one GET per chunk");
}

/// The key a recording of an object of key `key` and ETag `etag` has beside it, computed
/// here from the documented rule (docs/object-store.md), not by the crate's code.
fn expected_recording_key(key: &str, etag: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(etag.as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{key}.faultd-ws/{hex}")
}

#[test]
fn a_recording_beside_an_object_is_written_once_and_read_back_only_within_its_bound() {
    let rgw = Rgw::start();
    put(&rgw, "tenants/0/vm/mem", &pattern(1024 * KIB, 7));
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), 512 * KIB, 64 << 20);
    let store = client(&rgw);
    let obj = f
        .open(store.clone(), &rgw.endpoint(), BUCKET, "tenants/0/vm/mem")
        .unwrap();
    assert_eq!(
        obj.recording_key().unwrap(),
        expected_recording_key("tenants/0/vm/mem", obj.etag())
    );
    assert_eq!(f.get_recording(&obj, 1 << 20).unwrap(), None, "none yet");
    // The first writer wins (If-None-Match: *): a second PUT leaves the first's bytes.
    assert!(f.put_recording(&obj, b"first".to_vec()).unwrap());
    assert!(!f.put_recording(&obj, b"second".to_vec()).unwrap());
    let got = f.get_recording(&obj, 1 << 20).unwrap().unwrap();
    assert_eq!(&got[..], b"first");
    // Larger than the caller's bound: refused, not read.
    assert!(matches!(
        f.get_recording(&obj, 4),
        Err(objstore::RecordingError::TooLarge {
            size: 5,
            max: 4,
            ..
        })
    ));
    assert_eq!(f.counters().recording_puts.load(Ordering::Relaxed), 2);
    assert_eq!(f.counters().recording_gets.load(Ordering::Relaxed), 3);
    // The store saw the recording's GETs; none was a chunk GET.
    assert_eq!(store.gets(), 3);
    assert_eq!(f.counters().gets.load(Ordering::Relaxed), 0);
}

#[test]
fn prefetch_starts_one_get_per_chunk_and_nothing_for_a_cached_one() {
    let rgw = Rgw::start();
    let data = pattern(4 * 512 * KIB, 8);
    put(&rgw, "pf", &data);
    let cache = tempfile::tempdir().unwrap();
    let f = fetcher(cache.path(), 512 * KIB, 64 << 20);
    let store = client(&rgw);
    let obj = f
        .open(store.clone(), &rgw.endpoint(), BUCKET, "pf")
        .unwrap();
    let w = Arc::new(Collect::default());
    let waiter: Arc<dyn ChunkWaiter> = w.clone();
    assert_eq!(
        f.prefetch(&obj, 1, &waiter, Tenant(0)),
        objstore::Prefetched::Pending
    );
    assert_eq!(
        f.prefetch(&obj, 1, &waiter, Tenant(0)),
        objstore::Prefetched::Pending
    );
    wait_for("the chunk told", Duration::from_secs(10), || {
        !w.0.lock().unwrap().is_empty()
    });
    assert_eq!(
        f.prefetch(&obj, 1, &waiter, Tenant(0)),
        objstore::Prefetched::Cached
    );
    assert_eq!(store.gets(), 1);
    assert_eq!(f.counters().prefetch_gets.load(Ordering::Relaxed), 1);
    assert_eq!(w.0.lock().unwrap().len(), 1, "told once");
    // The page reads it back from the cache, byte exact.
    let mut buf = [0u8; 4096];
    let served = f
        .read(&obj, 512 * KIB + 8192, &mut buf, &waiter, ME)
        .unwrap();
    assert_eq!(served, Served::Read);
    assert!(buf[..] == data[(512 * KIB + 8192) as usize..(512 * KIB + 12288) as usize]);
}

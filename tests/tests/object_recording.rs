//! Working-set recordings beside a snapshot object (docs/object-store.md): written by faultd at
//! the end of a restore's recording window (`If-None-Match: *`, only to a store whose config
//! says `write_recordings`), read with one bounded GET at the next restore of the same object
//! version, and replayed as prefetch: the recorded chunks fetched ahead of the guest, a window
//! of them in flight, and their recorded pages installed before the guest asks. Real KVM
//! guests, a real radosgw (tests/src/rgw.rs); each "host" is a faultd of its own, with a cache
//! of its own, so a second restore fetches from the store again.

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use faultd_client::{Client, ClientError, RegionSpec};
use faultd_proto::ErrorCode;
use faultd_tests::rgw::{Rgw, ACCESS_KEY, BUCKET, REGION, SECRET_KEY};
use faultd_tests::{resident_settled, Faultd, Ram};
use futures::TryStreamExt;
use objstore::object_store::{path::Path as ObjPath, ObjectStore, ObjectStoreExt};
use testvmm::{page_sequence, pattern, Vm, Workload};

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const CHUNK: u64 = 512 * 1024;
const SIZE: u64 = 64 * MIB;
const TOUCHES: u32 = 60;
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
const SEED: u32 = 0x5EC0_12D5;

/// Two stores on the one bucket, both letting uid U read `tenants/U/...`: `rgw` where faultd
/// writes recordings, `rgw-ro` where it does not; recording and replay on.
fn config(rgw: &Rgw) -> String {
    let store = |name: &str, write: bool| {
        format!(
            "[[object_store.stores]]\nname = \"{name}\"\nendpoint = \"{}\"\nregion = \"{REGION}\"\n\
             bucket = \"{BUCKET}\"\naccess_key = \"{ACCESS_KEY}\"\nsecret_key = \"{SECRET_KEY}\"\n\
             prefix = \"tenants/{{uid}}/\"\nwrite_recordings = {write}\n",
            rgw.endpoint()
        )
    };
    format!(
        "[object_store]\ncache_mib = 256\nchunk_kib = {}\ndeadline_ms = 20000\n\n{}\n{}\n\
         [working_set]\nrecord = true\nreplay = true\nrecord_ms = 60000\nrecord_pages = 65536\n",
        CHUNK >> 10,
        store("rgw", true),
        store("rgw-ro", false),
    )
}

/// PUTs a snapshot whose dwords are `pattern(a, seed)` as `key`; returns its bytes.
fn put_snapshot(rgw: &Rgw, key: &str, seed: u32) -> Vec<u8> {
    let data: Vec<u8> = (0..SIZE / 4)
        .flat_map(|i| pattern(i * 4, seed).to_le_bytes())
        .collect();
    put_bytes(rgw, key, &data);
    data
}

fn put_bytes(rgw: &Rgw, key: &str, data: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body");
    std::fs::File::create(&body)
        .unwrap()
        .write_all(data)
        .unwrap();
    assert_eq!(rgw.put(BUCKET, key, &body), "200", "PUT {key}");
}

/// The test's own client of the bucket (to list it, HEAD and GET).
struct Bucket {
    rt: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
}

impl Bucket {
    fn new(rgw: &Rgw) -> Bucket {
        let spec = objstore::S3Spec {
            endpoint: rgw.endpoint(),
            region: REGION.into(),
            bucket: BUCKET.into(),
            credentials: Some(objstore::Credentials {
                access_key: ACCESS_KEY.into(),
                secret_key: SECRET_KEY.into(),
            }),
        };
        Bucket {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            store: objstore::s3_store(&spec, Duration::from_secs(10)).unwrap(),
        }
    }

    /// `op` tried up to 3 times: the client's retries are off, and radosgw may close a
    /// pooled connection that sat idle.
    fn retried<T>(
        &self,
        what: &str,
        op: impl Fn() -> Result<T, objstore::object_store::Error>,
    ) -> T {
        let mut last = None;
        for _ in 0..3 {
            match op() {
                Ok(v) => return v,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{what}: {last:?}")
    }

    /// Every key in the bucket.
    fn keys(&self) -> BTreeSet<String> {
        self.retried("listing", || {
            self.rt.block_on(async {
                self.store
                    .list(None)
                    .map_ok(|m| m.location.to_string())
                    .try_collect()
                    .await
            })
        })
    }

    fn etag(&self, key: &str) -> String {
        let meta = self.retried("HEAD", || {
            self.rt.block_on(self.store.head(&ObjPath::from(key)))
        });
        meta.e_tag.unwrap()
    }

    fn get(&self, key: &str) -> Vec<u8> {
        self.retried("GET", || {
            self.rt.block_on(async {
                let got = self.store.get(&ObjPath::from(key)).await?;
                Ok(got.bytes().await?.to_vec())
            })
        })
    }
}

/// Where a recording of `key` at `etag` goes, by the documented rule (computed here, not by
/// faultd's code): `KEY.faultd-ws/` and the hex of the first 16 bytes of SHA-256(ETag).
fn recording_key(key: &str, etag: &str) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(etag.as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{key}.faultd-ws/{hex}")
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < until, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pages the guest touches (two vCPUs, each `TOUCHES` random pages of its half).
fn touched() -> BTreeSet<u32> {
    let pages = (SIZE / PAGE) as u32;
    [(0, pages / 2), (pages / 2, pages / 2)]
        .iter()
        .flat_map(|&(first, count)| page_sequence(SEED, TOUCHES, first, count))
        .collect()
}

fn chunks_of(pages: &BTreeSet<u32>) -> BTreeSet<u64> {
    pages.iter().map(|&p| p as u64 * PAGE / CHUNK).collect()
}

/// Restores `key` of `store` as VM `vm` on `faultd`: with `replay_first`, waits until replay
/// has ended before the guest runs; the guest (two vCPUs) verifies its pages against `seed`'s
/// pattern, whole pages are compared with `data`; the session then ends. Returns its stats.
fn restore(
    faultd: &Faultd,
    store: &str,
    key: &str,
    vm_name: &str,
    data: &[u8],
    seed: u32,
    replay_first: bool,
) -> faultd_proto::SessionStats {
    let ram = Ram::new(vm_name, SIZE);
    let mut session = Client::connect(faultd.socket())
        .unwrap()
        .register_object(
            vm_name,
            &ram.uffd,
            &[RegionSpec::snapshot(0, &ram.ram, 0)],
            store,
            key,
        )
        .unwrap();
    if replay_first {
        wait_until("replay ended", Duration::from_secs(20), || {
            !session.stats().unwrap().working_set.replay_stop.is_empty()
        });
    }
    let pages = (SIZE / PAGE) as u32;
    let mut vm: Vm = ram.vm(GUEST_TIMEOUT);
    let reports = vm
        .run(
            [(0, pages / 2), (pages / 2, pages / 2)]
                .iter()
                .map(|&(first_page, page_count)| Workload::Verify {
                    seed,
                    touches: TOUCHES,
                    first_page,
                    page_count,
                })
                .collect(),
            &|_, _| {},
        )
        .expect("guest run");
    for r in &reports {
        assert_eq!(
            r.mismatches, 0,
            "first mismatch at {:?}",
            r.first_mismatch_gpa
        );
    }
    for &p in touched().iter().step_by(2) {
        let at = (p as u64 * PAGE) as usize;
        let addr = ram.ram.host_addr() + p as u64 * PAGE;
        // SAFETY: inside the live mapping of the guest's RAM; the page is resident (the guest
        // touched it), so the read does not fault; copied out at once.
        let host = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE as usize) };
        assert!(host == &data[at..at + PAGE as usize], "page {p} differs");
    }
    let stats = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
    drop(vm);
    drop(session);
    stats
}

#[test]
fn a_second_restore_from_an_object_replays_the_recording_beside_it_as_prefetch() {
    let rgw = Rgw::start();
    let bucket = Bucket::new(&rgw);
    let key = "tenants/0/vm-rec/mem";
    let data = put_snapshot(&rgw, key, SEED);
    let rec_key = recording_key(key, &bucket.etag(key));
    let touched = touched();
    let chunks = chunks_of(&touched);
    assert!(
        chunks.len() < (SIZE / CHUNK) as usize,
        "a subset, to mean anything"
    );

    // Host A: nothing recorded yet; the guest's first touches are recorded and, when the
    // session ends, written beside the object.
    let a = Faultd::start_with_config(&config(&rgw));
    let s1 = restore(&a, "rgw", key, "vm-rec", &data, SEED, false);
    assert_eq!(s1.working_set.replay_pages, 0);
    assert_eq!(s1.working_set.recorded, touched.len() as u64);
    wait_until("the recording written", Duration::from_secs(20), || {
        bucket.keys().contains(&rec_key)
    });
    assert_eq!(a.metric("faultd_object_recording_puts_total"), 1);
    assert_eq!(a.metric("faultd_object_recording_gets_total"), 1);
    drop(a);

    // Host B (a cache of its own): the recording is read (one GET) and replayed before the
    // guest runs: every recorded chunk fetched ahead, once, every page installed ahead.
    let b = Faultd::start_with_config(&config(&rgw));
    let s2 = restore(&b, "rgw", key, "vm-rec", &data, SEED, true);
    let ws = &s2.working_set;
    println!(
        "replay: {} pages recorded in {} of {} chunks of {} KiB; prefetched {}, late {}, misses {}, \
         stop {:?} after {} us; GETs {} (prefetch {}), recording GETs {}",
        touched.len(),
        chunks.len(),
        SIZE / CHUNK,
        CHUNK >> 10,
        ws.prefetched,
        ws.late,
        ws.misses,
        ws.replay_stop,
        ws.replay_us,
        b.metric("faultd_object_gets_total"),
        b.metric("faultd_object_prefetch_gets_total"),
        b.metric("faultd_object_recording_gets_total"),
    );
    assert_eq!(ws.replay_pages, touched.len() as u64);
    assert_eq!(ws.replay_stop, "done");
    assert_eq!(ws.prefetched, touched.len() as u64, "every page ahead");
    assert_eq!((ws.late, ws.misses), (0, 0));
    assert_eq!(s2.file_fills, touched.len() as u64, "each page filled once");
    assert_eq!(s2.errors, 0);
    assert_eq!(b.metric("faultd_object_recording_gets_total"), 1);
    assert_eq!(
        b.metric("faultd_object_gets_total"),
        chunks.len() as u64,
        "one GET per recorded chunk"
    );
    assert_eq!(
        b.metric("faultd_object_prefetch_gets_total"),
        chunks.len() as u64,
        "all of them ahead of the guest"
    );
    // A replayed session records nothing new: the first recording stays.
    assert_eq!(s2.working_set.recorded, 0);
    drop(b);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(bucket.keys().len(), 2);
}

#[test]
fn a_recording_of_another_etag_is_never_used() {
    let rgw = Rgw::start();
    let bucket = Bucket::new(&rgw);
    let key = "tenants/0/vm-v/mem";
    let old = put_snapshot(&rgw, key, SEED);
    let old_rec = recording_key(key, &bucket.etag(key));
    let a = Faultd::start_with_config(&config(&rgw));
    restore(&a, "rgw", key, "vm-v", &old, SEED, false);
    wait_until("the recording written", Duration::from_secs(20), || {
        bucket.keys().contains(&old_rec)
    });
    drop(a);
    let recording = bucket.get(&old_rec);

    // The object replaced: a new ETag, another recording key. Host B finds no recording there
    // (the old one is beside the old version's key, never read for the new version).
    let new = put_snapshot(&rgw, key, SEED + 1);
    let new_rec = recording_key(key, &bucket.etag(key));
    assert_ne!(new_rec, old_rec);
    let b = Faultd::start_with_config(&config(&rgw));
    let s = restore(&b, "rgw", key, "vm-v", &new, SEED + 1, false);
    assert_eq!(s.working_set.replay_pages, 0);
    assert_eq!(s.working_set.prefetched, 0);
    assert_eq!(b.metric("faultd_object_prefetch_gets_total"), 0);
    drop(b);

    // The old version's recording put at the new version's key (by anyone who may write the
    // bucket): read, and refused, as its digest binds the old ETag.
    // Host B wrote its own recording there when its session ended; replace it.
    wait_until(
        "host B's recording written",
        Duration::from_secs(20),
        || bucket.keys().contains(&new_rec),
    );
    put_bytes(&rgw, &new_rec, &recording);
    let c = Faultd::start_with_config(&config(&rgw));
    let s = restore(&c, "rgw", key, "vm-v", &new, SEED + 1, false);
    assert_eq!(
        c.metric("faultd_object_recording_gets_total"),
        1,
        "it was read"
    );
    assert_eq!(
        (s.working_set.replay_pages, s.working_set.prefetched),
        (0, 0),
        "a recording of another ETag replayed"
    );
    assert_eq!(c.metric("faultd_object_prefetch_gets_total"), 0);
    // The first writer wins: faultd does not write over it either.
    wait_until("the PUT tried", Duration::from_secs(20), || {
        c.metric("faultd_object_recording_puts_total") == 1
    });
    assert_eq!(bucket.get(&new_rec), recording);
}

#[test]
fn a_client_cannot_make_faultd_read_or_write_a_recording_outside_its_prefix_or_store() {
    let rgw = Rgw::start();
    let bucket = Bucket::new(&rgw);
    let mine = "tenants/0/vm-p/mem";
    let data = put_snapshot(&rgw, mine, SEED);
    // Another uid's object, and a recording beside it.
    let theirs = "tenants/1000/vm-p/mem";
    put_snapshot(&rgw, theirs, SEED);
    let their_rec = recording_key(theirs, &bucket.etag(theirs));
    put_bytes(&rgw, &their_rec, b"not a recording");
    let before = bucket.keys();
    let f = Faultd::start_with_config(&config(&rgw));

    // Naming another uid's key, or escaping the prefix: refused before any request.
    for key in [
        theirs,
        "tenants/0/../1000/vm-p/mem",
        "tenants/1000/vm-p/mem.faultd-ws/x",
    ] {
        let ram = Ram::new("vm-x", SIZE);
        let got = Client::connect(f.socket()).unwrap().register_object(
            "vm-x",
            &ram.uffd,
            &[RegionSpec::snapshot(0, &ram.ram, 0)],
            "rgw",
            key,
        );
        match got {
            Err(ClientError::Refused { code, .. }) => {
                assert!(matches!(code, ErrorCode::Forbidden), "{key}: {code:?}")
            }
            other => panic!("{key}: not refused: {other:?}"),
        }
    }
    assert_eq!(f.metric("faultd_object_recording_gets_total"), 0);

    // A store without write_recordings: read (one GET, nothing there), never written.
    restore(&f, "rgw-ro", mine, "vm-p", &data, SEED, false);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(f.metric("faultd_object_recording_gets_total"), 1);
    assert_eq!(f.metric("faultd_object_recording_puts_total"), 0);
    assert_eq!(
        bucket.keys(),
        before,
        "nothing written by a read-only store"
    );

    // The writing store: exactly one new key, the recording beside the client's own object.
    restore(&f, "rgw", mine, "vm-p", &data, SEED, false);
    let rec = recording_key(mine, &bucket.etag(mine));
    wait_until("a recording written", Duration::from_secs(20), || {
        bucket.keys().len() > before.len()
    });
    let after = bucket.keys();
    let new: Vec<&String> = after.difference(&before).collect();
    assert_eq!(
        new,
        vec![&rec],
        "faultd wrote outside the recording key beside the object"
    );
    assert!(new[0].starts_with("tenants/0/"));
    assert_eq!(bucket.get(&their_rec), b"not a recording");
}

#[test]
fn zero_chunks_seen_on_a_first_restore_are_never_fetched_on_the_second() {
    const DATA: u64 = 32 * MIB;
    const ZERO_PAGES: u32 = 2048; // 8 MiB: 16 chunks of zeros
    let rgw = Rgw::start();
    let bucket = Bucket::new(&rgw);
    let key = "tenants/0/vm-z/mem";
    // The first half a pattern, the second half zeros.
    let mut data: Vec<u8> = (0..DATA / 4)
        .flat_map(|i| pattern(i * 4, SEED).to_le_bytes())
        .collect();
    data.resize(SIZE as usize, 0);
    put_bytes(&rgw, key, &data);
    let rec_key = recording_key(key, &bucket.etag(key));
    let data_pages = (DATA / PAGE) as u32;
    let verified: BTreeSet<u32> = page_sequence(SEED, TOUCHES, 0, data_pages)
        .into_iter()
        .collect();
    let data_chunks = chunks_of(&verified);
    let zero_chunks: Vec<u64> = (DATA / CHUNK..(DATA + ZERO_PAGES as u64 * PAGE) / CHUNK).collect();

    // vCPU 0 verifies pages of the pattern; vCPU 1 reads the first 8 MiB of zeros in order.
    let run = |faultd: &Faultd, replay_first: bool| {
        let ram = Ram::new("vm-z", SIZE);
        let mut session = Client::connect(faultd.socket())
            .unwrap()
            .register_object(
                "vm-z",
                &ram.uffd,
                &[RegionSpec::snapshot(0, &ram.ram, 0)],
                "rgw",
                key,
            )
            .unwrap();
        if replay_first {
            wait_until("replay ended", Duration::from_secs(20), || {
                !session.stats().unwrap().working_set.replay_stop.is_empty()
            });
        }
        let mut vm: Vm = ram.vm(GUEST_TIMEOUT);
        let reports = vm
            .run(
                vec![
                    Workload::Verify {
                        seed: SEED,
                        touches: TOUCHES,
                        first_page: 0,
                        page_count: data_pages,
                    },
                    Workload::TouchSequential {
                        first_page: data_pages,
                        count: ZERO_PAGES,
                    },
                ],
                &|_, _| {},
            )
            .expect("guest run");
        assert_eq!(
            reports[0].mismatches, 0,
            "{:?}",
            reports[0].first_mismatch_gpa
        );
        for p in (0..ZERO_PAGES)
            .map(|i| data_pages + i)
            .chain(verified.iter().copied())
        {
            let at = (p as u64 * PAGE) as usize;
            let addr = ram.ram.host_addr() + p as u64 * PAGE;
            // SAFETY: inside the live mapping of the guest's RAM; the page is resident (the
            // guest touched it), so the read does not fault; copied out at once.
            let host = unsafe { std::slice::from_raw_parts(addr as *const u8, PAGE as usize) };
            assert!(host == &data[at..at + PAGE as usize], "page {p} differs");
        }
        let stats = resident_settled(&mut session, || ram.ram.allocated_bytes().unwrap());
        drop(vm);
        drop(session);
        stats
    };

    // Host A fetches every chunk touched, the zero ones too, and sees they are zero: their
    // pages are then zero pages, and the recording beside the object lists them.
    let a = Faultd::start_with_config(&config(&rgw));
    let s1 = run(&a, false);
    assert_eq!(
        a.metric("faultd_object_gets_total"),
        (data_chunks.len() + zero_chunks.len()) as u64
    );
    assert!(s1.working_set.zero_pages >= ZERO_PAGES as u64 - zero_chunks.len() as u64);
    wait_until("the recording written", Duration::from_secs(20), || {
        bucket.keys().contains(&rec_key)
    });
    let rec = faultd::engine::recording::Recording::decode_object(&bucket.get(&rec_key)).unwrap();
    let listed = rec.zero.expect("zero chunks in the recording");
    assert_eq!((listed.chunk_bytes, &listed.chunks), (CHUNK, &zero_chunks));
    drop(a);

    // Host B (a cache of its own): the zero chunks are never fetched; their pages are zero
    // pages, mapped ahead by the replay.
    let b = Faultd::start_with_config(&config(&rgw));
    let s2 = run(&b, true);
    let gets = b.metric("faultd_object_gets_total");
    println!(
        "second restore: {gets} GETs for {} data chunks and {} zero chunks; zero pages {}, \
         prefetched {} (+{} zero), late {}, misses {}",
        data_chunks.len(),
        zero_chunks.len(),
        s2.working_set.zero_pages,
        s2.working_set.prefetched,
        s2.working_set.prefetched_zero,
        s2.working_set.late,
        s2.working_set.misses,
    );
    assert_eq!(gets, data_chunks.len() as u64, "a zero chunk was fetched");
    assert_eq!(s2.working_set.zero_pages, ZERO_PAGES as u64);
    assert_eq!(s2.working_set.prefetched_zero, ZERO_PAGES as u64);
    assert_eq!(s2.working_set.prefetched, verified.len() as u64);
    assert_eq!(s2.errors, 0);
}

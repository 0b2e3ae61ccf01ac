//! The fetcher: opens an object version (HEAD: its ETag and size), and fetches its chunks on a
//! runtime of its own, one GET per chunk in flight, into the cache, telling every waiter.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
};
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;
use tokio::time::{sleep, timeout_at, Instant};

use crate::cache::{ChunkCache, ChunkName};
use crate::slots::{Class, FairSlots, Requester, Slot, Tenant, Ticket};
use crate::ChunkSize;

/// How chunks are fetched.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Size of every chunk but an object's last.
    pub chunk_size: ChunkSize,
    /// From a chunk's first request to the error its waiters get if it has not landed.
    pub deadline: Duration,
    /// GETs in flight at once over all objects (the rest queue, their deadline running),
    /// handed out in turn between tenants, demand before prefetch (see `slots`).
    pub max_in_flight: usize,
    /// GETs one tenant may have in flight at once: the rest of `max_in_flight` stays free for
    /// others when a store is slow.
    pub per_tenant_in_flight: usize,
    /// First wait after a failed GET; doubled after each further failure.
    pub first_backoff: Duration,
    /// Longest wait between two GETs of one chunk.
    pub max_backoff: Duration,
    /// Worker threads of the fetcher's runtime.
    pub threads: usize,
}

impl FetchConfig {
    /// Defaults for `chunk_size`: 30 s deadline, 16 GETs in flight (12 for one tenant),
    /// 50 ms..1 s backoff, 2 threads.
    pub fn new(chunk_size: ChunkSize) -> FetchConfig {
        FetchConfig {
            chunk_size,
            deadline: Duration::from_secs(30),
            max_in_flight: 16,
            per_tenant_in_flight: 12,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            threads: 2,
        }
    }
}

/// Why a chunk could not be had. Cloned to every waiter of the chunk.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    /// The store holds another version than the one the restore started with (`If-Match`
    /// failed, or the answer carried another ETag).
    #[error("object {object} changed since the restore started (it was ETag {etag}): refusing to mix versions")]
    ObjectChanged {
        /// endpoint/bucket/key.
        object: String,
        /// The ETag the restore started with.
        etag: String,
    },
    /// The object was deleted since the restore started.
    #[error("object {object} was deleted since the restore started")]
    ObjectGone {
        /// endpoint/bucket/key.
        object: String,
    },
    /// No GET succeeded before the deadline.
    #[error(
        "chunk {chunk} of {object} not fetched within {deadline:?} ({attempts} GETs; last: {last})"
    )]
    Deadline {
        /// endpoint/bucket/key.
        object: String,
        /// Chunk index.
        chunk: u64,
        /// The configured deadline.
        deadline: Duration,
        /// GETs tried.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The chunk index is past the object's end.
    #[error("chunk {chunk} is past the end of {object} ({chunks} chunks)")]
    OutOfRange {
        /// endpoint/bucket/key.
        object: String,
        /// Chunk index asked for.
        chunk: u64,
        /// Chunks the object has.
        chunks: u64,
    },
    /// The fetcher shut down before the chunk landed.
    #[error("the chunk fetcher stopped")]
    Stopped,
}

/// What [`Fetcher::ask`] did.
enum Asked {
    /// The chunk is cached: nothing was asked.
    Cached,
    /// Its GET was in flight; the waiter was added to it.
    Joined,
    /// Its GET was started.
    Started,
}

/// What [`Fetcher::prefetch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetched {
    /// The chunk is cached already: nothing to fetch.
    Cached,
    /// The chunk is known to be all zero: never fetched.
    Zero,
    /// A GET was started, or one in flight was joined: the waiter is told when it lands.
    Pending,
}

/// Why a recording beside an object could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// The object's key is too long for a recording key beside it.
    #[error("no recording key beside {object}: the key would pass {max} bytes")]
    KeyTooLong {
        /// endpoint/bucket/key.
        object: String,
        /// The longest key.
        max: usize,
    },
    /// The recording is larger than the caller's bound: not read.
    #[error("recording {key} is {size} bytes, more than the {max} a recording may have")]
    TooLarge {
        /// Its key.
        key: String,
        /// Its size.
        size: u64,
        /// The bound.
        max: u64,
    },
    /// The store failed.
    #[error("recording {key}")]
    Store {
        /// Its key.
        key: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// No answer within the fetcher's deadline.
    #[error("recording {key}: no answer within {deadline:?}")]
    Deadline {
        /// Its key.
        key: String,
        /// The deadline.
        deadline: Duration,
    },
    /// The fetcher's runtime is gone.
    #[error("the chunk fetcher stopped")]
    Stopped,
}

/// Longest object key a recording key is made beside (S3's bound on keys).
pub const MAX_KEY: usize = 1024;

/// Further tries of a recording's GET or PUT after a failure that may pass.
const RECORDING_TRIES: u32 = 3;

/// Whether a store's answer is final (retrying cannot change it).
fn is_final(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotModified { .. }
            | object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. }
            | object_store::Error::NotImplemented { .. }
    )
}

/// Runs `op` until it succeeds, fails finally ([`is_final`]), or has been tried again
/// [`RECORDING_TRIES`] times, waiting `backoff`, twice that, ... between tries: a pooled
/// connection the store closed fails once.
async fn with_recording_retries<T, F, Fut>(backoff: Duration, mut op: F) -> object_store::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = object_store::Result<T>>,
{
    let mut tries = 0;
    loop {
        match op().await {
            Err(e) if tries < RECORDING_TRIES && !is_final(&e) => {
                tries += 1;
                sleep(backoff * tries).await;
            }
            done => return done,
        }
    }
}

/// The key of `object`'s recording, or why it has none.
fn recording_key(object: &ObjectVersion) -> Result<String, RecordingError> {
    object
        .recording_key()
        .ok_or_else(|| RecordingError::KeyTooLong {
            object: object.label.clone(),
            max: MAX_KEY,
        })
}

/// Why an object could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// HEAD failed.
    #[error("HEAD {object}")]
    Head {
        /// endpoint/bucket/key.
        object: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
    },
    /// HEAD did not answer within the deadline.
    #[error("HEAD {object} did not answer within {0:?}", .deadline)]
    Deadline {
        /// endpoint/bucket/key.
        object: String,
        /// The configured deadline.
        deadline: Duration,
    },
    /// The store gave no ETag, so versions cannot be pinned.
    #[error("{object} has no ETag: its version cannot be pinned")]
    NoEtag {
        /// endpoint/bucket/key.
        object: String,
    },
    /// The key is not a valid object path.
    #[error("object key {key:?} is not a valid path")]
    BadKey {
        /// The key.
        key: String,
        /// Why.
        #[source]
        source: object_store::path::Error,
    },
    /// The fetcher's runtime is gone.
    #[error("the chunk fetcher stopped")]
    Stopped,
}

/// One version of one object: the ETag and size its HEAD gave when the restore started.
#[derive(Debug)]
pub struct ObjectVersion {
    store: Arc<dyn ObjectStore>,
    path: Path,
    etag: String,
    size: u64,
    chunk_size: ChunkSize,
    /// Hash of (endpoint, bucket, key, ETag, chunk size): the cache key.
    hash: Arc<str>,
    /// endpoint/bucket/key, for messages.
    label: String,
    /// Chunks known to be all zero: seen so when fetched, or learnt from a recording the
    /// caller trusts ([`ObjectVersion::learn_zero`]). Bounded by the object's chunks.
    zero: Mutex<BTreeSet<u64>>,
}

impl ObjectVersion {
    /// The object's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The ETag every GET is pinned to.
    pub fn etag(&self) -> &str {
        &self.etag
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> ChunkSize {
        self.chunk_size
    }

    /// endpoint/bucket/key.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The number of chunks.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk_size.bytes())
    }

    /// The chunk holding object offset `offset`, and the offset within it.
    pub fn chunk_of(&self, offset: u64) -> (u64, u64) {
        let cs = self.chunk_size.bytes();
        (offset / cs, offset % cs)
    }

    /// Byte range of chunk `chunk` in the object (the last may be short).
    pub fn chunk_range(&self, chunk: u64) -> Range<u64> {
        let cs = self.chunk_size.bytes();
        let start = chunk.saturating_mul(cs).min(self.size);
        start..start.saturating_add(cs).min(self.size)
    }

    fn name(&self, chunk: u64) -> ChunkName {
        ChunkName::new(&self.hash, chunk)
    }

    /// The key of this version's working-set recording, beside the object:
    /// `KEY.faultd-ws/H`, H the hex of the first 16 bytes of SHA-256 of the ETag. Derived
    /// here, never taken from anyone: it starts with the object's key (so whatever may name
    /// the object covers it), and the ETag, whatever bytes a store puts in it, only ever
    /// reaches the name as hex. None when it would pass [`MAX_KEY`] bytes.
    pub fn recording_key(&self) -> Option<String> {
        let digest = Sha256::digest(self.etag.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        let key = format!("{}.faultd-ws/{hex}", self.path.as_ref());
        (key.len() <= MAX_KEY).then_some(key)
    }

    /// Whether chunk `chunk` is known to be all zero (it need not be fetched).
    pub fn is_zero_chunk(&self, chunk: u64) -> bool {
        self.zero
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&chunk)
    }

    /// The chunks known to be all zero, ascending.
    pub fn zero_chunks(&self) -> Vec<u64> {
        let zero = self.zero.lock().unwrap_or_else(|p| p.into_inner());
        zero.iter().copied().collect()
    }

    /// Takes `chunks` (of this version's chunk size) as all zero: from then on they are never
    /// fetched. A wrong claim serves zeros in place of data, so the caller passes only what
    /// it trusts (bound to this ETag); indexes past the end are ignored.
    pub fn learn_zero(&self, chunks: &[u64]) {
        let n = self.chunks();
        let mut zero = self.zero.lock().unwrap_or_else(|p| p.into_inner());
        zero.extend(chunks.iter().copied().filter(|&c| c < n));
    }

    /// Whether this version is read through `store` (the same client).
    pub fn is_of(&self, store: &Arc<dyn ObjectStore>) -> bool {
        Arc::ptr_eq(&self.store, store)
    }
}

/// Tells a waiter that a chunk it asked for landed or failed. Called on the fetcher's runtime:
/// it must only hand the result on (queue it, ring a doorbell), never block.
pub trait ChunkWaiter: Send + Sync {
    /// Chunk `chunk` of the object the waiter asked about: its bytes, or why there are none.
    fn chunk_landed(&self, chunk: u64, result: Result<Bytes, FetchError>);
}

/// What [`Fetcher::read`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The bytes were cached and are in the buffer.
    Read,
    /// Not cached: the waiter is told when the chunk lands (a GET was started, or joined).
    Pending,
}

/// Counters of a fetcher (monotonic).
#[derive(Debug, Default)]
pub struct FetchCounters {
    /// Reads served from the cache.
    pub hits: AtomicU64,
    /// Reads that had to wait for a GET (started or joined).
    pub misses: AtomicU64,
    /// GETs made (every attempt).
    pub gets: AtomicU64,
    /// GETs that failed (retried, or given up).
    pub get_errors: AtomicU64,
    /// Bytes fetched by successful GETs.
    pub bytes_fetched: AtomicU64,
    /// Chunks refused because the object changed.
    pub changed: AtomicU64,
    /// Fetched chunks the cache could not store (they were still handed to their waiters).
    pub store_errors: AtomicU64,
    /// Chunk fetches started ahead of the guest ([`Fetcher::prefetch`]; their GETs are in
    /// `gets` too).
    pub prefetch_gets: AtomicU64,
    /// GETs of recordings beside objects.
    pub recording_gets: AtomicU64,
    /// PUTs of recordings beside objects.
    pub recording_puts: AtomicU64,
}

type InflightKey = (Arc<str>, u64);

/// A chunk being fetched: who waits for it, and its claim to a GET slot.
#[derive(Debug)]
struct Flight {
    waiters: Vec<Arc<dyn ChunkWaiter>>,
    ticket: Arc<Ticket>,
}

#[derive(Debug)]
struct Shared {
    cache: ChunkCache,
    config: FetchConfig,
    in_flight: Mutex<HashMap<InflightKey, Flight>>,
    slots: FairSlots,
    counters: FetchCounters,
}

impl std::fmt::Debug for dyn ChunkWaiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkWaiter")
    }
}

/// Fetches chunks into a [`ChunkCache`] on a runtime of its own; shared by every session.
#[derive(Debug)]
pub struct Fetcher {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
}

impl Fetcher {
    /// A fetcher over `cache`, with its runtime (`config.threads` workers) started.
    pub fn new(cache: ChunkCache, config: FetchConfig) -> io::Result<Fetcher> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads.max(1))
            .max_blocking_threads(4)
            .thread_name("objstore-fetch")
            .enable_all()
            .build()?;
        Ok(Fetcher {
            runtime: Some(runtime),
            shared: Arc::new(Shared {
                slots: FairSlots::new(config.max_in_flight, config.per_tenant_in_flight),
                cache,
                config,
                in_flight: Mutex::new(HashMap::new()),
                counters: FetchCounters::default(),
            }),
        })
    }

    fn runtime(&self) -> &Runtime {
        // Taken only by Drop.
        self.runtime
            .as_ref()
            .expect("fetcher runtime present until drop")
    }

    /// Opens the current version of `bucket/key` at `endpoint` in `store` (a HEAD under the
    /// deadline); every chunk read through the result is pinned to the ETag it finds. Blocks
    /// the calling thread; from async code use [`Fetcher::open_async`].
    pub fn open(
        &self,
        store: Arc<dyn ObjectStore>,
        endpoint: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Arc<ObjectVersion>, OpenError> {
        let job = self.spawn_open(store, endpoint, bucket, key)?;
        futures::executor::block_on(job).map_err(|_| OpenError::Stopped)?
    }

    /// [`Fetcher::open`] for async callers (on any runtime: the HEAD runs on the fetcher's).
    pub async fn open_async(
        &self,
        store: Arc<dyn ObjectStore>,
        endpoint: &str,
        bucket: &str,
        key: &str,
    ) -> Result<Arc<ObjectVersion>, OpenError> {
        let job = self.spawn_open(store, endpoint, bucket, key)?;
        job.await.map_err(|_| OpenError::Stopped)?
    }

    fn spawn_open(
        &self,
        store: Arc<dyn ObjectStore>,
        endpoint: &str,
        bucket: &str,
        key: &str,
    ) -> Result<tokio::task::JoinHandle<Result<Arc<ObjectVersion>, OpenError>>, OpenError> {
        let path = Path::parse(key).map_err(|source| OpenError::BadKey {
            key: key.to_owned(),
            source,
        })?;
        let label = format!("{endpoint}/{bucket}/{key}");
        let deadline = self.shared.config.deadline;
        let chunk_size = self.shared.config.chunk_size;
        let id = [endpoint, bucket, key];
        let id: Vec<String> = id.iter().map(|s| (*s).to_owned()).collect();
        Ok(self.runtime().spawn(async move {
            let meta = match tokio::time::timeout(deadline, store.head(&path)).await {
                Err(_) => {
                    return Err(OpenError::Deadline {
                        object: label,
                        deadline,
                    })
                }
                Ok(Err(source)) => {
                    return Err(OpenError::Head {
                        object: label,
                        source,
                    })
                }
                Ok(Ok(meta)) => meta,
            };
            let Some(etag) = meta.e_tag else {
                return Err(OpenError::NoEtag { object: label });
            };
            let mut h = Sha256::new();
            for part in id.iter().map(String::as_str).chain([etag.as_str()]) {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part.as_bytes());
            }
            h.update(chunk_size.bytes().to_le_bytes());
            let digest = h.finalize();
            let hash: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            Ok(Arc::new(ObjectVersion {
                store,
                path,
                etag,
                size: meta.size,
                chunk_size,
                hash: hash.into(),
                label,
                zero: Mutex::new(BTreeSet::new()),
            }))
        }))
    }

    /// Reads `buf.len()` bytes at object offset `offset` (within one chunk) of `object` from
    /// the cache. When the chunk is not cached, starts its GET unless one is in flight, and
    /// `waiter` is told when it lands ([`Served::Pending`]); nothing is read then. The GET
    /// waits for a slot in `who`'s turn (or, when another requester's GET of the chunk is
    /// queued already, in whichever of their turns comes first). Never blocks on the network:
    /// safe on a fault thread.
    pub fn read(
        &self,
        object: &Arc<ObjectVersion>,
        offset: u64,
        buf: &mut [u8],
        waiter: &Arc<dyn ChunkWaiter>,
        who: Requester,
    ) -> io::Result<Served> {
        let (chunk, within) = object.chunk_of(offset);
        let range = object.chunk_range(chunk);
        let len = range.end - range.start;
        if within + buf.len() as u64 > len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "read of {} bytes at {offset} crosses chunk {chunk} of {}",
                    buf.len(),
                    object.label
                ),
            ));
        }
        let name = object.name(chunk);
        loop {
            if self.shared.cache.read(&name, len, within, buf)? {
                self.shared.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Served::Read);
            }
            match self.ask(object, chunk, waiter, who) {
                // Landed (and left the in-flight table) since the cache read: read it.
                Asked::Cached => continue,
                Asked::Joined | Asked::Started => {
                    self.shared.counters.misses.fetch_add(1, Ordering::Relaxed);
                    return Ok(Served::Pending);
                }
            }
        }
    }

    /// Asks for chunk `chunk` of `object` for `who`, `waiter` to be told when it lands: joins
    /// its GET in flight, or starts one unless the chunk is cached. One GET per chunk however
    /// many ask.
    fn ask(
        &self,
        object: &Arc<ObjectVersion>,
        chunk: u64,
        waiter: &Arc<dyn ChunkWaiter>,
        who: Requester,
    ) -> Asked {
        let mut in_flight = self
            .shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let key = (object.hash.clone(), chunk);
        if let Some(flight) = in_flight.get_mut(&key) {
            if !flight.waiters.iter().any(|w| Arc::ptr_eq(w, waiter)) {
                flight.waiters.push(waiter.clone());
                // Still queued for a slot: in this requester's turn too, so that it never
                // waits behind the queue of whoever asked first.
                if flight.ticket.waiting() {
                    self.shared.slots.enqueue(&flight.ticket, who);
                }
            }
            return Asked::Joined;
        }
        // Under the in-flight lock: a GET that lands stores the chunk before it leaves the
        // table, so a chunk neither in flight nor cached here is not being fetched.
        if self.shared.cache.contains(&object.name(chunk)) {
            return Asked::Cached;
        }
        let (ticket, slot) = Ticket::new();
        in_flight.insert(
            key,
            Flight {
                waiters: vec![waiter.clone()],
                ticket: ticket.clone(),
            },
        );
        drop(in_flight);
        // Queued before the task runs: turns follow the order of requests.
        self.shared.slots.enqueue(&ticket, who);
        let shared = self.shared.clone();
        let object = object.clone();
        self.runtime()
            .spawn(fetch(shared, object, chunk, FirstSlot { slot, who }));
        Asked::Started
    }

    /// Asks for chunk `chunk` of `object` ahead of the guest, for `tenant`: nothing when it
    /// is cached; else its GET is queued as prefetch (after every demand GET waiting) unless
    /// one is in flight, and `waiter` is told when it lands. Counts no hit or miss (no page
    /// was read). Never blocks on the network.
    pub fn prefetch(
        &self,
        object: &Arc<ObjectVersion>,
        chunk: u64,
        waiter: &Arc<dyn ChunkWaiter>,
        tenant: Tenant,
    ) -> Prefetched {
        let who = Requester {
            tenant,
            class: Class::Prefetch,
        };
        if chunk >= object.chunks() {
            return Prefetched::Cached;
        }
        if object.is_zero_chunk(chunk) {
            return Prefetched::Zero;
        }
        match self.ask(object, chunk, waiter, who) {
            Asked::Cached => Prefetched::Cached,
            Asked::Joined => Prefetched::Pending,
            Asked::Started => {
                self.shared
                    .counters
                    .prefetch_gets
                    .fetch_add(1, Ordering::Relaxed);
                Prefetched::Pending
            }
        }
    }

    /// Whether chunk `chunk` of `object` is in the cache now.
    pub fn is_cached(&self, object: &ObjectVersion, chunk: u64) -> bool {
        self.shared.cache.contains(&object.name(chunk))
    }

    /// Reads `object`'s recording (at [`ObjectVersion::recording_key`]) with one GET of at
    /// most `max + 1` bytes: None when there is none; refused when the store says it is larger
    /// than `max`. Blocks the calling thread (never a fault thread's work: a loader's).
    pub fn get_recording(
        &self,
        object: &Arc<ObjectVersion>,
        max: u64,
    ) -> Result<Option<Bytes>, RecordingError> {
        let key = recording_key(object)?;
        let deadline = self.shared.config.deadline;
        let store = object.store.clone();
        let shared = self.shared.clone();
        let job = self.runtime().spawn(async move {
            let path = Path::from(key.as_str());
            shared
                .counters
                .recording_gets
                .fetch_add(1, Ordering::Relaxed);
            let opts = GetOptions {
                range: Some(GetRange::Bounded(0..max.saturating_add(1))),
                ..GetOptions::default()
            };
            let attempt = || async {
                let got = match store.get_opts(&path, opts.clone()).await {
                    Ok(got) => got,
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(e),
                };
                if got.meta.size > max {
                    return Ok(Some(Err(got.meta.size)));
                }
                Ok(Some(Ok(got.bytes().await?)))
            };
            let retried = with_recording_retries(shared.config.first_backoff, attempt);
            let got = tokio::time::timeout(deadline, retried).await;
            match got {
                Err(_) => Err(RecordingError::Deadline { key, deadline }),
                Ok(Err(source)) => Err(RecordingError::Store { key, source }),
                Ok(Ok(None)) => Ok(None),
                Ok(Ok(Some(Err(size)))) => Err(RecordingError::TooLarge { key, size, max }),
                // The range bounds what was read even if the store ignored it.
                Ok(Ok(Some(Ok(bytes)))) if bytes.len() as u64 > max => {
                    Err(RecordingError::TooLarge {
                        key,
                        size: bytes.len() as u64,
                        max,
                    })
                }
                Ok(Ok(Some(Ok(bytes)))) => Ok(Some(bytes)),
            }
        });
        futures::executor::block_on(job).map_err(|_| RecordingError::Stopped)?
    }

    /// Writes `object`'s recording (at [`ObjectVersion::recording_key`]) with
    /// `If-None-Match: *`: the first writer wins. Returns whether this call wrote it (false:
    /// one was there). Blocks the calling thread.
    pub fn put_recording(
        &self,
        object: &Arc<ObjectVersion>,
        bytes: Vec<u8>,
    ) -> Result<bool, RecordingError> {
        let key = recording_key(object)?;
        let deadline = self.shared.config.deadline;
        let store = object.store.clone();
        let shared = self.shared.clone();
        let job = self.runtime().spawn(async move {
            let path = Path::from(key.as_str());
            shared
                .counters
                .recording_puts
                .fetch_add(1, Ordering::Relaxed);
            let opts = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            let payload = PutPayload::from(bytes);
            // Retried as a GET is; a PUT that was made but whose answer was lost then finds
            // its own recording: AlreadyExists.
            let put = with_recording_retries(shared.config.first_backoff, || {
                store.put_opts(&path, payload.clone(), opts.clone())
            });
            match tokio::time::timeout(deadline, put).await {
                Err(_) => Err(RecordingError::Deadline { key, deadline }),
                Ok(Ok(_)) => Ok(true),
                Ok(Err(object_store::Error::AlreadyExists { .. })) => Ok(false),
                Ok(Err(source)) => Err(RecordingError::Store { key, source }),
            }
        });
        futures::executor::block_on(job).map_err(|_| RecordingError::Stopped)?
    }

    /// The whole of chunk `chunk`: from the cache, or fetched for `who` (blocking the calling
    /// thread until it lands or fails). For tools and tests; a fault thread uses
    /// [`Fetcher::read`].
    pub fn read_chunk_blocking(
        &self,
        object: &Arc<ObjectVersion>,
        chunk: u64,
        who: Requester,
    ) -> Result<Bytes, FetchError> {
        if chunk >= object.chunks() {
            return Err(FetchError::OutOfRange {
                object: object.label.clone(),
                chunk,
                chunks: object.chunks(),
            });
        }
        let range = object.chunk_range(chunk);
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter: Arc<dyn ChunkWaiter> = Arc::new(ChannelWaiter(Mutex::new(tx)));
        match self.read(object, range.start, &mut buf, &waiter, who) {
            Ok(Served::Read) => Ok(buf.into()),
            Ok(Served::Pending) => rx.recv().map_err(|_| FetchError::Stopped)?,
            Err(e) => Err(FetchError::Deadline {
                object: object.label.clone(),
                chunk,
                deadline: Duration::ZERO,
                attempts: 0,
                last: format!("reading the cache: {e}"),
            }),
        }
    }

    /// Chunks being fetched now (GETs in flight or waiting for a slot, and their retries).
    pub fn in_flight(&self) -> usize {
        self.shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// The fetcher's counters.
    pub fn counters(&self) -> &FetchCounters {
        &self.shared.counters
    }

    /// The chunk cache.
    pub fn cache(&self) -> &ChunkCache {
        &self.shared.cache
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &FetchConfig {
        &self.shared.config
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        // Dropping a runtime inside another's async context panics; this never waits.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

struct ChannelWaiter(Mutex<std::sync::mpsc::Sender<Result<Bytes, FetchError>>>);

impl ChunkWaiter for ChannelWaiter {
    fn chunk_landed(&self, _chunk: u64, result: Result<Bytes, FetchError>) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(result);
    }
}

/// Where a fetch's first GET slot arrives, and who asked first (its retries queue again in
/// that requester's turn).
struct FirstSlot {
    slot: tokio::sync::oneshot::Receiver<Slot>,
    who: Requester,
}

/// Fetches one chunk (with retries, under the deadline), stores it, tells every waiter.
async fn fetch(shared: Arc<Shared>, object: Arc<ObjectVersion>, chunk: u64, first: FirstSlot) {
    let result = get_with_retries(&shared, &object, chunk, first).await;
    if let Ok(bytes) = &result {
        // Seen: a chunk of zeros is known as one (its pages are then served without a read).
        if bytes.iter().all(|&b| b == 0) {
            object
                .zero
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(chunk);
        }
        let (store_to, name, data) = (shared.clone(), object.name(chunk), bytes.clone());
        let stored = tokio::task::spawn_blocking(move || store_to.cache.store(&name, &data)).await;
        if !matches!(stored, Ok(Ok(()))) {
            shared.counters.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(object = %object.label, chunk, ?stored, "chunk not cached");
        }
    }
    // After the store: a reader who misses the in-flight entry finds the chunk cached.
    let waiters = shared
        .in_flight
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&(object.hash.clone(), chunk))
        .map(|f| f.waiters)
        .unwrap_or_default();
    for w in waiters {
        w.chunk_landed(chunk, result.clone());
    }
}

async fn get_with_retries(
    shared: &Shared,
    object: &ObjectVersion,
    chunk: u64,
    first: FirstSlot,
) -> Result<Bytes, FetchError> {
    let cfg = &shared.config;
    let deadline = Instant::now() + cfg.deadline;
    let counters = &shared.counters;
    let mut attempts = 0u32;
    let mut last = String::from("waiting for a GET slot");
    let too_late = |attempts, last| FetchError::Deadline {
        object: object.label.clone(),
        chunk,
        deadline: cfg.deadline,
        attempts,
        last,
    };
    let range = object.chunk_range(chunk);
    let want = range.end - range.start;
    let mut backoff = cfg.first_backoff;
    let mut waiting = first.slot;
    loop {
        // A slot per attempt: a chunk backing off after a failure holds none.
        let Ok(Ok(slot)) = timeout_at(deadline, &mut waiting).await else {
            return Err(too_late(attempts, last));
        };
        if Instant::now() >= deadline {
            return Err(too_late(attempts, last));
        }
        attempts += 1;
        counters.gets.fetch_add(1, Ordering::Relaxed);
        let opts = GetOptions {
            if_match: Some(object.etag.clone()),
            range: Some(GetRange::Bounded(range.clone())),
            ..GetOptions::default()
        };
        let attempt = timeout_at(deadline, async {
            let got = object.store.get_opts(&object.path, opts).await?;
            let etag = got.meta.e_tag.clone();
            Ok::<_, object_store::Error>((etag, got.bytes().await?))
        })
        .await;
        match attempt {
            Err(_) => {
                counters.get_errors.fetch_add(1, Ordering::Relaxed);
                return Err(too_late(attempts, format!("GET still running ({last})")));
            }
            Ok(Ok((etag, bytes))) => {
                if etag.as_deref().is_some_and(|e| e != object.etag) {
                    // A store that ignored If-Match: the ETag it answered with still tells.
                    counters.changed.fetch_add(1, Ordering::Relaxed);
                    return Err(FetchError::ObjectChanged {
                        object: object.label.clone(),
                        etag: object.etag.clone(),
                    });
                }
                if bytes.len() as u64 == want {
                    counters.bytes_fetched.fetch_add(want, Ordering::Relaxed);
                    return Ok(bytes);
                }
                last = format!("short answer: {} of {want} bytes", bytes.len());
            }
            Ok(Err(object_store::Error::Precondition { .. })) => {
                counters.changed.fetch_add(1, Ordering::Relaxed);
                return Err(FetchError::ObjectChanged {
                    object: object.label.clone(),
                    etag: object.etag.clone(),
                });
            }
            Ok(Err(object_store::Error::NotFound { .. })) => {
                counters.changed.fetch_add(1, Ordering::Relaxed);
                return Err(FetchError::ObjectGone {
                    object: object.label.clone(),
                });
            }
            Ok(Err(e)) => last = e.to_string(),
        }
        counters.get_errors.fetch_add(1, Ordering::Relaxed);
        drop(slot);
        // Retried until the deadline itself: giving up when the next backoff would pass it
        // failed chunks up to a backoff (1 s) early, missing a store back just before it.
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(too_late(attempts, last));
        }
        sleep(backoff.min(remaining)).await;
        backoff = (backoff * 2).min(cfg.max_backoff);
        let (ticket, slot) = Ticket::new();
        // Requesters who join from now on queue this claim in their turn too.
        if let Some(flight) = shared
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&(object.hash.clone(), chunk))
        {
            flight.ticket = ticket.clone();
        }
        shared.slots.enqueue(&ticket, first.who);
        waiting = slot;
    }
}

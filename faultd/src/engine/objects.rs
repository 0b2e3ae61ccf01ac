//! Snapshot memory served from an object in an S3-compatible store (config `[object_store]`),
//! beside the snapshot file: a session whose `register` named an object fills its
//! snapshot-backed pages from chunks of that object version ([`objstore`]) instead of a file.
//!
//! The fault thread never waits on the network. A fault on a chunk that is cached is served
//! at once from the cache file; one on a chunk not cached is deferred: the page goes back to
//! absent in s2map, the faulting vCPU stays blocked in the kernel, the fetcher is asked for the
//! chunk (one GET however many sessions and faults wait on it), and the thread goes on serving
//! other faults. The fetcher's completion rings this session's [`Doorbell`], an eventfd the
//! thread polls; the deferred faults are then served again from the chunk's bytes.
//!
//! A chunk that cannot be had (the object changed, was deleted, or the store did not answer
//! before the deadline) fails the session loudly: logged as an error, counted, reported to the
//! VMM on its control connection ([`crate::engine::session::Session::failure`]), and its
//! deferred faults are never served: no page of another version, and no zero page in place of
//! a snapshot page, ever reaches the guest.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::eventfd::{EfdFlags, EventFd};
use objstore::object_store::ObjectStore;
use objstore::{
    Bytes, ChunkCache, ChunkSize, ChunkWaiter, FetchConfig, FetchError, Fetcher, ObjectVersion,
    Prefetched, Requester, S3Spec, Served, Tenant,
};
use sha2::{Digest, Sha256};

use crate::engine::session::Hva;
use crate::ops::config::{ObjectStoreSpec, ObjectStores};

/// The daemon's object stores and the one fetcher (and chunk cache) every session shares.
#[derive(Debug)]
pub struct ObjectService {
    fetcher: Fetcher,
    stores: Vec<(ObjectStoreSpec, Arc<dyn ObjectStore>)>,
    /// Restores kept across a faultd restart that were not served again because their object
    /// changed, is gone, or may no longer be read by their uid (monotonic; metrics).
    pub kept_refused: std::sync::atomic::AtomicU64,
}

/// Why a client's object could not be opened for it.
#[derive(Debug, thiserror::Error)]
pub enum ObjectRefusal {
    /// The name is not a configured store.
    #[error("no object store is named {0:?}")]
    UnknownStore(String),
    /// The peer may not read that key of that store.
    #[error("{0}")]
    Forbidden(String),
    /// HEAD failed or the object cannot be served.
    #[error("opening the object")]
    Open(#[source] objstore::OpenError),
}

impl ObjectService {
    /// The service for `config` with its cache in `cache_dir` (created 0700 if missing);
    /// None when no store is configured.
    pub fn new(config: &ObjectStores, cache_dir: &Path) -> io::Result<Option<ObjectService>> {
        if config.stores.is_empty() {
            return Ok(None);
        }
        let chunk = ChunkSize::new(config.chunk_bytes).map_err(io::Error::other)?;
        let mut fetch = FetchConfig::new(chunk);
        fetch.deadline = config.deadline;
        fetch.max_in_flight = config.gets_in_flight;
        fetch.per_tenant_in_flight = config.gets_per_uid;
        let cache = ChunkCache::open(cache_dir, config.cache_bytes)?;
        let fetcher = Fetcher::new(cache, fetch)?;
        let request_timeout = config.deadline.min(Duration::from_secs(10));
        let stores = config
            .stores
            .iter()
            .map(|spec| {
                let s3 = S3Spec {
                    endpoint: spec.endpoint.clone(),
                    region: spec.region.clone(),
                    bucket: spec.bucket.clone(),
                    credentials: spec.credentials.clone(),
                };
                let client = objstore::s3_store(&s3, request_timeout).map_err(io::Error::other)?;
                Ok((spec.clone(), client))
            })
            .collect::<io::Result<_>>()?;
        Ok(Some(ObjectService {
            fetcher,
            stores,
            kept_refused: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Whether a peer of uid `uid` may read `key` of store `store` (no request is made).
    pub fn allows(&self, store: &str, key: &str, uid: u32) -> Result<(), ObjectRefusal> {
        let (spec, _) = self
            .stores
            .iter()
            .find(|(s, _)| s.name == store)
            .ok_or_else(|| ObjectRefusal::UnknownStore(store.to_owned()))?;
        spec.allows(uid, key).map_err(ObjectRefusal::Forbidden)
    }

    /// Opens `key` of store `store` for a peer of uid `uid`: refused unless the store's
    /// rules let that uid read that key; then a HEAD pins the version (off the caller's
    /// runtime: it runs on the fetcher's).
    pub async fn open_for(
        &self,
        store: &str,
        key: &str,
        uid: u32,
    ) -> Result<Arc<ObjectVersion>, ObjectRefusal> {
        self.allows(store, key, uid)?;
        let (spec, client) = self
            .stores
            .iter()
            .find(|(s, _)| s.name == store)
            .ok_or_else(|| ObjectRefusal::UnknownStore(store.to_owned()))?;
        self.fetcher
            .open_async(client.clone(), &spec.endpoint, &spec.bucket, key)
            .await
            .map_err(ObjectRefusal::Open)
    }

    /// The fetcher (its counters and cache: metrics).
    pub fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// Whether the store `version` is read from lets faultd write recordings beside its
    /// objects (config `write_recordings`).
    pub fn writes_recordings(&self, version: &ObjectVersion) -> bool {
        self.stores
            .iter()
            .any(|(spec, client)| spec.write_recordings && version.is_of(client))
    }
}

/// The identity a recording of `version` is bound to (its header's digest field): SHA-256 of
/// the object's endpoint/bucket/key, its ETag and its size, each length-prefixed. The ETag
/// pins the bytes, so a recording of another version never matches.
pub fn recording_digest(version: &ObjectVersion) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"faultd object recording\0");
    for part in [version.label(), version.etag()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    h.update(version.size().to_le_bytes());
    h.finalize().into()
}

/// Rung by the fetcher when a chunk this session waits for lands (or fails): the results
/// queue here, and an eventfd the session's thread polls wakes it.
#[derive(Debug)]
pub struct Doorbell {
    landed: Mutex<Vec<(u64, Result<Bytes, FetchError>)>>,
    event: EventFd,
}

impl Doorbell {
    fn new() -> io::Result<Doorbell> {
        Ok(Doorbell {
            landed: Mutex::new(Vec::new()),
            event: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        })
    }

    /// The eventfd, to poll.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.event.as_fd()
    }

    fn take(&self) -> Vec<(u64, Result<Bytes, FetchError>)> {
        let _ = self.event.read();
        std::mem::take(&mut *self.landed.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ChunkWaiter for Doorbell {
    fn chunk_landed(&self, chunk: u64, result: Result<Bytes, FetchError>) {
        // Bounded: the fetcher tells a waiter once per chunk it asked for, and a session asks
        // for a chunk again only after it was told.
        self.landed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((chunk, result));
        let _ = self.event.write(1);
    }
}

/// What reading a page of the object gave.
#[derive(Debug)]
pub(crate) enum ObjectRead {
    /// The bytes are in the buffer.
    Read,
    /// Not cached: the chunk was asked for; the fault waits for the doorbell.
    Pending {
        /// The chunk waited for.
        chunk: u64,
    },
}

/// A session's object backing, held by its fault thread: the version, the faults deferred
/// per chunk, and the chunks that just landed.
#[derive(Debug)]
pub struct ObjectFill {
    service: Arc<ObjectService>,
    version: Arc<ObjectVersion>,
    /// Whose turn its GETs wait for in the shared fetcher (the session owner's uid): one
    /// tenant's flood of chunks never queues another's faults behind it.
    tenant: Tenant,
    doorbell: Arc<Doorbell>,
    /// Faults waiting per chunk (each chunk asked for once; bounded by the VM's vCPUs and
    /// pages, as the kernel's own queue of blocked faults is).
    deferred: HashMap<u64, Vec<Hva>>,
    /// Chunks landed and not yet used to serve their deferred faults.
    landed: HashMap<u64, Bytes>,
    /// Chunks asked for ahead of the guest and not landed yet (replay's window: bounded by
    /// [`crate::engine::working_set::PREFETCH_WINDOW`]).
    prefetching: HashSet<u64>,
    /// Why the session failed, once it has.
    pub(crate) failed: Option<String>,
}

impl ObjectFill {
    /// The backing of a session of uid `owner` restoring `version` through `service`.
    pub fn new(
        service: Arc<ObjectService>,
        version: Arc<ObjectVersion>,
        owner: u32,
    ) -> io::Result<Self> {
        Ok(ObjectFill {
            service,
            version,
            tenant: Tenant(owner),
            doorbell: Arc::new(Doorbell::new()?),
            deferred: HashMap::new(),
            landed: HashMap::new(),
            prefetching: HashSet::new(),
            failed: None,
        })
    }

    /// The doorbell's eventfd, for the thread's poll set.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.doorbell.fd()
    }

    /// Reads `buf.len()` bytes at object offset `offset` (one page, within one chunk): from a
    /// chunk that just landed, or the cache; else asks for the chunk.
    pub(crate) fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<ObjectRead> {
        let (chunk, within) = self.version.chunk_of(offset);
        if let Some(bytes) = self.landed.get(&chunk) {
            let src = bytes
                .get(within as usize..within as usize + buf.len())
                .ok_or_else(|| io::Error::other("page past the chunk's end"))?;
            buf.copy_from_slice(src);
            return Ok(ObjectRead::Read);
        }
        if self.failed.is_some() {
            return Err(io::Error::other("the object backing failed"));
        }
        let waiter: Arc<dyn ChunkWaiter> = self.doorbell.clone();
        match self.service.fetcher.read(
            &self.version,
            offset,
            buf,
            &waiter,
            Requester::demand(self.tenant),
        )? {
            Served::Read => Ok(ObjectRead::Read),
            Served::Pending => Ok(ObjectRead::Pending { chunk }),
        }
    }

    /// Remembers that the fault at `hva` waits for `chunk`.
    pub(crate) fn defer(&mut self, chunk: u64, hva: Hva) {
        self.deferred.entry(chunk).or_default().push(hva);
    }

    /// Takes what landed: returns the faults to serve again (their chunks are now in
    /// `landed`) and the first failure, if any.
    pub(crate) fn take_landed(&mut self) -> (Vec<Hva>, Option<FetchError>) {
        let mut again = Vec::new();
        let mut failure = None;
        for (chunk, result) in self.doorbell.take() {
            self.prefetching.remove(&chunk);
            match result {
                Ok(bytes) => {
                    self.landed.insert(chunk, bytes);
                    again.extend(self.deferred.remove(&chunk).unwrap_or_default());
                }
                Err(e) => {
                    // Its faults stay blocked: nothing else may be served for them.
                    self.deferred.remove(&chunk);
                    failure.get_or_insert(e);
                }
            }
        }
        (again, failure)
    }

    /// Forgets the landed chunks' bytes once their deferred faults were served (later faults
    /// read the cache).
    pub(crate) fn clear_landed(&mut self) {
        self.landed.clear();
    }

    /// Asks for `chunk` ahead of the guest. Returns whether it is now in flight for this
    /// session (false: cached already, or the backing failed).
    pub(crate) fn prefetch(&mut self, chunk: u64) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if self.prefetching.contains(&chunk) {
            return true;
        }
        let waiter: Arc<dyn ChunkWaiter> = self.doorbell.clone();
        match self
            .service
            .fetcher
            .prefetch(&self.version, chunk, &waiter, self.tenant)
        {
            Prefetched::Cached | Prefetched::Zero => false,
            Prefetched::Pending => {
                self.prefetching.insert(chunk);
                true
            }
        }
    }

    /// Whether the page at object offset `offset` is in a chunk known to be all zero (served
    /// as a zero page, never fetched).
    pub(crate) fn is_zero(&self, offset: u64) -> bool {
        self.version.is_zero_chunk(self.version.chunk_of(offset).0)
    }

    /// Chunks asked for ahead of the guest and not landed yet.
    pub(crate) fn prefetching(&self) -> usize {
        self.prefetching.len()
    }

    /// Whether `chunk` is being fetched for this session's replay.
    pub(crate) fn is_prefetching(&self, chunk: u64) -> bool {
        self.prefetching.contains(&chunk)
    }

    /// The service (recordings are read and written through its fetcher).
    pub fn service(&self) -> &Arc<ObjectService> {
        &self.service
    }

    /// Faults waiting for chunks.
    pub fn deferred_faults(&self) -> usize {
        self.deferred.values().map(Vec::len).sum()
    }

    /// The object version.
    pub fn version(&self) -> &Arc<ObjectVersion> {
        &self.version
    }
}

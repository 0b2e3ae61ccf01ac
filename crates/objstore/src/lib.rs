//! Fixed-size chunks of one version of one object in an S3-compatible store, fetched with range
//! GETs on a small tokio runtime of this crate's own and kept in a bounded local chunk cache.
//!
//! Owns: the chunk geometry ([`ChunkSize`]), pinning a restore to the object version it started
//! with (every GET carries `If-Match: <ETag>`, so a replaced object fails with
//! [`FetchError::ObjectChanged`] and never mixes bytes), single flight (one GET per chunk in
//! flight however many waiters), retries with backoff under a deadline, and the cache
//! ([`ChunkCache`]). Refuses to own: who may name which object (faultd's config decides), guest
//! memory and faults (the caller is told through [`ChunkWaiter`] and copies bytes itself).
//!
//! The client is the `object_store` crate (feature `aws`): the Apache Arrow project's, kept
//! up, async on tokio, with conditional GETs (`GetOptions::if_match`) and range GETs; it works
//! against radosgw path-style over plain HTTP (tested: `tests/tests/objstore.rs`).

mod cache;
mod counting;
mod fetch;
mod slots;

pub use bytes::Bytes;
pub use cache::{CacheCounters, ChunkCache, ChunkName, TRAILER_LEN};
pub use counting::CountingStore;
pub use fetch::{
    ChunkWaiter, FetchConfig, FetchCounters, FetchError, Fetcher, ObjectVersion, OpenError,
    Prefetched, RecordingError, Served, MAX_KEY,
};
pub use object_store;
pub use slots::{Class, Requester, Tenant};

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, ObjectStore, RetryConfig};

/// The size of every chunk but an object's last: a power of two from 512 KiB to 4 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkSize(u64);

/// A chunk size outside 512 KiB..=4 MiB or not a power of two.
#[derive(Debug, thiserror::Error)]
#[error("chunk size {0} is not a power of two from 512 KiB to 4 MiB")]
pub struct ChunkSizeError(pub u64);

impl ChunkSize {
    /// The smallest chunk: 512 KiB.
    pub const MIN: u64 = 512 << 10;
    /// The largest chunk: 4 MiB.
    pub const MAX: u64 = 4 << 20;

    /// `bytes` as a chunk size, if a power of two in [`ChunkSize::MIN`]..=[`ChunkSize::MAX`].
    pub fn new(bytes: u64) -> Result<ChunkSize, ChunkSizeError> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Ok(ChunkSize(bytes))
        } else {
            Err(ChunkSizeError(bytes))
        }
    }

    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

/// An access key id and its secret. Its `Debug` shows the key id, never the secret: a spec in
/// a log or an error must not leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id.
    pub access_key: String,
    /// The secret access key.
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &"<secret>")
            .finish()
    }
}

/// Where an S3-compatible store is and how to sign for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Spec {
    /// `http://host:port` or `https://...`; path-style requests are made to it.
    pub endpoint: String,
    /// Region named in signatures.
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// `None` takes the standard `AWS_*` environment variables.
    pub credentials: Option<Credentials>,
}

/// Builds the `object_store` client for `spec`. Its own retries are off (the fetcher retries
/// under its deadline) and each request times out after `request_timeout`.
pub fn s3_store(
    spec: &S3Spec,
    request_timeout: Duration,
) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
    let mut b = AmazonS3Builder::from_env()
        .with_endpoint(&spec.endpoint)
        .with_allow_http(spec.endpoint.starts_with("http://"))
        .with_region(&spec.region)
        .with_bucket_name(&spec.bucket)
        .with_virtual_hosted_style_request(false)
        .with_retry(RetryConfig {
            max_retries: 0,
            retry_timeout: request_timeout,
            ..RetryConfig::default()
        })
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(spec.endpoint.starts_with("http://"))
                .with_timeout(request_timeout)
                .with_connect_timeout(request_timeout.min(Duration::from_secs(5))),
        );
    if let Some(c) = &spec.credentials {
        b = b
            .with_access_key_id(&c.access_key)
            .with_secret_access_key(&c.secret_key);
    }
    Ok(Arc::new(b.build()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_accepts_powers_of_two_in_range_only() {
        assert!(ChunkSize::new(512 << 10).is_ok());
        assert!(ChunkSize::new(4 << 20).is_ok());
        assert!(ChunkSize::new(256 << 10).is_err());
        assert!(ChunkSize::new(8 << 20).is_err());
        assert!(ChunkSize::new(3 << 19).is_err());
        assert!(ChunkSize::new(0).is_err());
    }
}

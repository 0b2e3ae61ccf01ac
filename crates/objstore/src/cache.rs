//! The local chunk cache: one file per chunk in one directory, bounded in bytes (the least
//! recently used chunk goes first), kept across restarts.
//!
//! Every file is opened relative to the directory's fd with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so that nothing placed in the directory (a
//! symlink to another file) makes the cache read or write outside it. Names are made here only
//! (hex of a hash and a chunk index), never from a client's text.
//!
//! A chunk is written to a temporary name, fsynced and renamed into place, with a trailer
//! (magic and length) after its bytes: a file under a chunk's name is complete, and one that is
//! not (a crash mid-write, a file truncated by hand) fails the length check and is removed, never
//! served.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

/// Marks the end of a complete chunk file; followed by the chunk's length (u64 LE).
const TRAILER_MAGIC: &[u8; 8] = b"FDCHUNK1";
/// Bytes of the trailer after a chunk's data.
pub const TRAILER_LEN: u64 = 16;
/// Prefix of files being written (removed when the cache is opened: a crash left them).
const TMP_PREFIX: &str = "tmp.";

/// The name of one chunk's file: `{object hash}.{chunk index in hex}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkName(String);

impl ChunkName {
    /// The file name of chunk `index` of the object version hashed to `object` (32 hex digits).
    pub fn new(object: &str, index: u64) -> ChunkName {
        ChunkName(format!("{object}.{index:x}"))
    }

    /// Whether `name` is one this cache makes (32 hex digits, a dot, hex digits).
    fn parse(name: &str) -> Option<ChunkName> {
        let (hash, index) = name.split_once('.')?;
        let hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        (hash.len() == 32 && hex(hash) && !index.is_empty() && index.len() <= 16 && hex(index))
            .then(|| ChunkName(name.to_owned()))
    }

    /// The file name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Counters of a cache (monotonic since it was opened).
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Reads served from a cached chunk.
    pub hits: AtomicU64,
    /// Reads that found no (complete) chunk.
    pub misses: AtomicU64,
    /// Chunks stored.
    pub stored: AtomicU64,
    /// Chunks removed to keep the bound.
    pub evicted: AtomicU64,
    /// Chunk files found torn or of the wrong length, removed and not served.
    pub torn: AtomicU64,
}

#[derive(Debug)]
struct Entry {
    tick: u64,
    /// File bytes (data and trailer): what counts against the bound.
    bytes: u64,
}

#[derive(Debug, Default)]
struct Index {
    tick: u64,
    entries: HashMap<ChunkName, Entry>,
    /// tick -> name, oldest first.
    lru: BTreeMap<u64, ChunkName>,
    bytes: u64,
}

impl Index {
    fn touch(&mut self, name: &ChunkName) -> bool {
        self.tick += 1;
        let tick = self.tick;
        let Some(e) = self.entries.get_mut(name) else {
            return false;
        };
        self.lru.remove(&e.tick);
        e.tick = tick;
        self.lru.insert(tick, name.clone());
        true
    }

    fn insert(&mut self, name: ChunkName, bytes: u64) {
        self.remove(&name);
        self.tick += 1;
        self.lru.insert(self.tick, name.clone());
        self.entries.insert(
            name,
            Entry {
                tick: self.tick,
                bytes,
            },
        );
        self.bytes += bytes;
    }

    fn remove(&mut self, name: &ChunkName) -> bool {
        match self.entries.remove(name) {
            Some(e) => {
                self.lru.remove(&e.tick);
                self.bytes -= e.bytes;
                true
            }
            None => false,
        }
    }
}

/// A directory of chunk files, bounded in bytes, shared by every reader in the process.
#[derive(Debug)]
pub struct ChunkCache {
    dir: OwnedFd,
    bound: u64,
    index: Mutex<Index>,
    tmp_seq: AtomicU64,
    /// Hit, miss, store, eviction and torn-file counts.
    pub counters: CacheCounters,
}

fn how(flags: OFlag, mode: Mode) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
        .mode(mode)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
}

impl ChunkCache {
    /// Opens (creating it and missing parents 0700) the cache directory `dir`, bounded to
    /// `bound` bytes.
    /// Chunks a previous run left are kept (oldest written first to go); temporary files and
    /// chunk files without a valid trailer are removed; files of other names are left alone
    /// and not counted.
    pub fn open(dir: &Path, bound: u64) -> io::Result<ChunkCache> {
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let dir = nix::fcntl::open(
            dir,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )?;
        let cache = ChunkCache {
            dir,
            bound,
            index: Mutex::new(Index::default()),
            tmp_seq: AtomicU64::new(0),
            counters: CacheCounters::default(),
        };
        cache.load()?;
        Ok(cache)
    }

    /// Scans the directory: indexes complete chunk files oldest first, removes the rest of ours.
    fn load(&self) -> io::Result<()> {
        let dup = self.dir.try_clone()?;
        let mut listing = nix::dir::Dir::from_fd(dup)?;
        let mut found: Vec<(i64, i64, ChunkName, u64)> = Vec::new();
        let mut remove: Vec<String> = Vec::new();
        for entry in listing.iter() {
            let entry = entry?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if name.starts_with(TMP_PREFIX) {
                remove.push(name.to_owned());
                continue;
            }
            let Some(chunk) = ChunkName::parse(name) else {
                continue;
            };
            match self
                .open_chunk(&chunk)
                .and_then(|f| complete_len(&f).map(|l| (f, l)))
            {
                Ok((f, Some(_len))) => {
                    let st = nix::sys::stat::fstat(f.as_fd())?;
                    found.push((st.st_mtime, st.st_mtime_nsec, chunk, st.st_size as u64));
                }
                Ok((_, None)) => {
                    self.counters.torn.fetch_add(1, Ordering::Relaxed);
                    remove.push(name.to_owned());
                }
                Err(_) => remove.push(name.to_owned()),
            }
        }
        for name in remove {
            let _ = self.unlink(&name);
        }
        found.sort();
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        for (_, _, name, bytes) in found {
            index.insert(name, bytes);
        }
        self.evict_locked(&mut index, 0);
        Ok(())
    }

    fn open_chunk(&self, name: &ChunkName) -> io::Result<File> {
        let fd = openat2(
            self.dir.as_fd(),
            name.as_str(),
            how(OFlag::O_RDONLY, Mode::empty()),
        )?;
        let file = File::from(fd);
        if !file.metadata()?.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "chunk is not a regular file",
            ));
        }
        Ok(file)
    }

    fn unlink(&self, name: &str) -> io::Result<()> {
        nix::unistd::unlinkat(&self.dir, name, UnlinkatFlags::NoRemoveDir)?;
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` of chunk `name`, which must hold exactly `len`
    /// bytes. `Ok(false)` when the chunk is not cached (or was torn: then it is removed).
    pub fn read(
        &self,
        name: &ChunkName,
        len: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> io::Result<bool> {
        let known = self
            .index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .touch(name);
        if !known {
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        let file = match self.open_chunk(name) {
            Ok(f) => f,
            // Evicted between the index and the open.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.counters.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() != len + TRAILER_LEN {
            self.counters.torn.fetch_add(1, Ordering::Relaxed);
            self.counters.misses.fetch_add(1, Ordering::Relaxed);
            self.forget(name);
            return Ok(false);
        }
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "read past the chunk"))?;
        debug_assert!(end <= len);
        file.read_exact_at(buf, offset)?;
        self.counters.hits.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Whether chunk `name` is in the index (a later read may still miss: eviction).
    pub fn contains(&self, name: &ChunkName) -> bool {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .contains_key(name)
    }

    fn forget(&self, name: &ChunkName) {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let _ = self.unlink(name.as_str());
    }

    /// Stores `data` as chunk `name` (temporary file, fsync, rename), evicting least recently
    /// used chunks to stay within the bound. A chunk larger than the whole bound is not stored.
    pub fn store(&self, name: &ChunkName, data: &[u8]) -> io::Result<()> {
        let bytes = data.len() as u64 + TRAILER_LEN;
        if bytes > self.bound {
            return Ok(());
        }
        let tmp = format!(
            "{TMP_PREFIX}{}.{}",
            std::process::id(),
            self.tmp_seq.fetch_add(1, Ordering::Relaxed)
        );
        let fd = openat2(
            self.dir.as_fd(),
            tmp.as_str(),
            how(
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                Mode::from_bits_truncate(0o600),
            ),
        )?;
        let file = File::from(fd);
        let written = (|| {
            file.write_all_at(data, 0)?;
            let mut trailer = [0u8; TRAILER_LEN as usize];
            trailer[..8].copy_from_slice(TRAILER_MAGIC);
            trailer[8..].copy_from_slice(&(data.len() as u64).to_le_bytes());
            file.write_all_at(&trailer, data.len() as u64)?;
            // Durable before it has its name: a name never stands for a torn file.
            file.sync_data()
        })();
        if let Err(e) = written {
            let _ = self.unlink(&tmp);
            return Err(e);
        }
        let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
        // Room first, so the bound holds at every moment a reader could look.
        index.remove(name);
        self.evict_locked(&mut index, bytes);
        if let Err(e) = nix::fcntl::renameat(&self.dir, tmp.as_str(), &self.dir, name.as_str()) {
            drop(index);
            let _ = self.unlink(&tmp);
            return Err(e.into());
        }
        index.insert(name.clone(), bytes);
        self.counters.stored.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Evicts least recently used chunks until `extra` more bytes fit within the bound.
    fn evict_locked(&self, index: &mut Index, extra: u64) {
        while index.bytes + extra > self.bound {
            let Some((_, name)) = index.lru.pop_first() else {
                break;
            };
            if let Some(e) = index.entries.remove(&name) {
                index.bytes -= e.bytes;
            }
            let _ = self.unlink(name.as_str());
            self.counters.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bytes the cached chunk files take (data and trailers).
    pub fn bytes(&self) -> u64 {
        self.index.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }

    /// Number of cached chunks.
    pub fn len(&self) -> usize {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entries
            .len()
    }

    /// Whether no chunk is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bound in bytes.
    pub fn bound(&self) -> u64 {
        self.bound
    }
}

/// The data length of a complete chunk file (size = length + trailer, trailer valid), or None.
fn complete_len(file: &File) -> io::Result<Option<u64>> {
    let size = file.metadata()?.len();
    let Some(data) = size.checked_sub(TRAILER_LEN) else {
        return Ok(None);
    };
    let mut trailer = [0u8; TRAILER_LEN as usize];
    file.read_exact_at(&mut trailer, data)?;
    let len = u64::from_le_bytes(trailer[8..].try_into().expect("8 bytes"));
    Ok((&trailer[..8] == TRAILER_MAGIC && len == data).then_some(len))
}

use std::os::unix::fs::DirBuilderExt;

#[cfg(test)]
mod tests {
    use super::*;

    fn name(i: u64) -> ChunkName {
        ChunkName::new(&"ab".repeat(16), i)
    }

    #[test]
    fn stored_chunk_reads_back_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
        {
            let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
            c.store(&name(3), &data).unwrap();
        }
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let mut buf = vec![0u8; 100];
        assert!(c.read(&name(3), 8192, 4000, &mut buf).unwrap());
        assert_eq!(buf, data[4000..4100]);
    }

    #[test]
    fn torn_chunk_file_is_removed_on_open_and_never_served() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
            c.store(&name(1), &[7u8; 4096]).unwrap();
        }
        // A crash after part of the data reached the file under its final name.
        let path = dir.path().join(name(1).as_str());
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(2048).unwrap();
        std::fs::write(dir.path().join("tmp.1.1"), [1u8; 10]).unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let mut buf = [0u8; 16];
        assert!(!c.read(&name(1), 4096, 0, &mut buf).unwrap());
        assert!(!path.exists());
        assert!(!dir.path().join("tmp.1.1").exists());
        assert_eq!(c.counters.torn.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn chunk_of_wrong_length_is_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        c.store(&name(1), &[7u8; 4096]).unwrap();
        let mut buf = [0u8; 16];
        assert!(!c.read(&name(1), 8192, 0, &mut buf).unwrap());
    }

    #[test]
    fn symlinked_chunk_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), [9u8; 4096 + 16]).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join(name(2).as_str())).unwrap();
        let c = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        let mut buf = [0u8; 16];
        assert!(!c.read(&name(2), 4096, 0, &mut buf).unwrap());
    }

    #[test]
    fn bound_holds_and_least_recently_used_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let per = 4096 + TRAILER_LEN;
        let c = ChunkCache::open(dir.path(), 3 * per).unwrap();
        let mut buf = [0u8; 1];
        for i in 0..3 {
            c.store(&name(i), &[i as u8; 4096]).unwrap();
        }
        assert!(c.read(&name(0), 4096, 0, &mut buf).unwrap());
        c.store(&name(3), &[3; 4096]).unwrap();
        assert!(c.bytes() <= 3 * per);
        assert!(!c.contains(&name(1)), "chunk 1 was the least recently used");
        assert!(c.contains(&name(0)));
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 3);
    }
}

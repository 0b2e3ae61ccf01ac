//! Where working-set recordings are kept: `store.dir/working-sets/<owner uid>/<digest>.ws` for
//! what faultd recorded of an owner's restores, `store.dir/working-sets/imported/<digest>.ws`
//! for what the operator imported (it applies to every owner). Every directory is faultd's
//! own, 0700; every file 0600, written to a temporary name and renamed into place. All of it is
//! reached from one directory fd with `openat(O_NOFOLLOW)`: no link is ever followed, and a
//! directory faultd does not own is refused. Each directory holds at most `max` recordings
//! (the least recently written are removed first), each at most
//! [`super::recording::MAX_BYTES`].
//!
//! Trust: a recording reveals the access pattern of the guest it was recorded from, so an
//! owner's recordings are replayed only for that owner's sessions. Over the control socket
//! (`faultd ctl working-set ...`, [`crate::front::admin`]) a uid lists, exports, imports and
//! removes its own recordings only; the operator (root or faultd's uid) any uid's and the
//! imported ones. An import lands in the importer's directory (the operator may name another):
//! a recording that names another tenant's snapshot digest is harmless (a digest is content, and
//! replay checks the recording against the pages it installs), and it is replayed only for the
//! sessions of the uid it landed under.
//!
//! An import is staged ([`Upload`]) in a `.upload-*` file of the directory it lands in, 0600,
//! bounded ([`MAX_STAGED_BYTES`] in all, [`MAX_STAGED_PER_UID`] per requesting uid, one per
//! connection), and renamed to its `<digest>.ws` name only once the whole file has the SHA-256
//! the importer announced and decodes as a recording of the named snapshot. Dropping an
//! upload (abandoned, refused) removes its file; files a faultd that died left behind are removed
//! when the next one starts ([`Library::sweep`]).

use super::recording::{DecodeError, Header, Recording, HEADER_BYTES, MAX_BYTES, MIN_BYTES};
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstat, mkdirat, Mode};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::Mutex;

/// The directory of imported recordings.
pub const IMPORTED: &str = "imported";

/// One recording as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The owner uid, or None: imported (applies to everyone).
    pub owner: Option<u32>,
    /// The snapshot digest, hex.
    pub digest: String,
    /// Pages.
    pub pages: u64,
    /// The snapshot's size.
    pub snapshot_size: u64,
    /// File bytes.
    pub bytes: u64,
}

/// Most bytes of imports staged at once, daemon-wide (four recordings of the largest size).
pub const MAX_STAGED_BYTES: u64 = 4 * MAX_BYTES as u64;
/// Most bytes of imports one uid has staged at once.
pub const MAX_STAGED_PER_UID: u64 = 2 * MAX_BYTES as u64;

/// The recordings under `store.dir/working-sets`.
#[derive(Debug)]
pub struct Library {
    root: PathBuf,
    max: usize,
    tmp: AtomicU64,
    /// Bytes of uploads staged now: in all, and by requesting uid.
    staged: Mutex<(u64, HashMap<u32, u64>)>,
}

/// A request on the library that failed, named for what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    /// Not 64 lowercase hex digits.
    #[error("{0:?} is not a snapshot digest: a digest is 64 lowercase hex digits")]
    BadDigest(String),
    /// No such recording.
    #[error("no working-set recording of snapshot {digest} {whose}")]
    NotFound {
        /// The digest.
        digest: String,
        /// "of uid N" / "among the imported ones".
        whose: String,
    },
    /// Over a bound on staged uploads.
    #[error("{0}")]
    Busy(String),
    /// An import chunk or announcement that does not fit the upload.
    #[error("{0}")]
    BadUpload(String),
    /// The whole file does not hash to what the importer announced.
    #[error("the recording's SHA-256 is {got}, not {announced} as announced: damaged or truncated in transit")]
    Sha {
        /// Announced.
        announced: String,
        /// Computed.
        got: String,
    },
    /// The file is not a recording.
    #[error("not a valid working-set recording")]
    Decode(#[source] DecodeError),
    /// A recording of another snapshot than the one named.
    #[error("the recording is of snapshot {inside}, not {named} as named")]
    OtherSnapshot {
        /// Named in the request.
        named: String,
        /// In the recording's header.
        inside: String,
    },
    /// A file operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> LibraryError {
    let what = what.into();
    move |source| LibraryError::Io { what, source }
}

/// The digest named by `text` (64 lowercase hex digits), checked before any path is made of it.
pub fn parse_digest(text: &str) -> Result<[u8; 32], LibraryError> {
    parse_name(&format!("{text}.ws")).ok_or_else(|| LibraryError::BadDigest(text.to_owned()))
}

fn whose(owner: Option<u32>) -> String {
    owner.map_or_else(
        || "among the imported ones".into(),
        |u| format!("of uid {u}"),
    )
}

/// A recording opened for export: the file, its size and SHA-256, read once when opened.
#[derive(Debug)]
pub struct ExportFile {
    file: File,
    /// The snapshot digest, hex.
    pub digest: String,
    /// The file's size.
    pub total: u64,
    /// The file's SHA-256, hex.
    pub sha256: String,
}

impl ExportFile {
    /// Up to `max` bytes from `offset` (none at or past the end).
    pub fn chunk(&self, offset: u64, max: usize) -> Result<Vec<u8>, LibraryError> {
        let len = self.total.saturating_sub(offset).min(max as u64) as usize;
        let mut buf = vec![0u8; len];
        self.file
            .read_exact_at(&mut buf, offset)
            .map_err(io_err(format!("reading the recording of {}", self.digest)))?;
        Ok(buf)
    }
}

/// An import being staged: a `.upload-*` file in the directory it lands in. Dropped before
/// [`Upload::finish`], it removes its file and gives its bytes back.
#[derive(Debug)]
pub struct Upload {
    library: Arc<Library>,
    dir: OwnedFd,
    tmp: String,
    file: File,
    /// Whose it becomes (None: imported).
    pub owner: Option<u32>,
    /// Who is uploading (for the per-uid bound).
    requester: u32,
    /// The snapshot digest, hex.
    pub digest: String,
    /// The announced SHA-256 of the whole file, hex.
    pub sha256: String,
    /// The announced size.
    pub total: u64,
    /// Bytes staged so far.
    pub received: u64,
    hasher: Sha256,
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = nix::unistd::unlinkat(
            self.dir.as_fd(),
            self.tmp.as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        self.library.unstage(self.requester, self.total);
    }
}

impl Upload {
    /// Stages `data` at `offset`, which must be where the last chunk ended.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<u64, LibraryError> {
        if offset != self.received {
            return Err(LibraryError::BadUpload(format!(
                "chunk at offset {offset}, but {} bytes are staged: chunks come in order",
                self.received
            )));
        }
        if data.len() > faultd_proto::WS_CHUNK_BYTES {
            return Err(LibraryError::BadUpload(format!(
                "a chunk of {} bytes; at most {} are taken",
                data.len(),
                faultd_proto::WS_CHUNK_BYTES
            )));
        }
        if data.is_empty() || self.received + data.len() as u64 > self.total {
            return Err(LibraryError::BadUpload(format!(
                "a chunk of {} bytes at {offset} does not fit the announced size {}",
                data.len(),
                self.total
            )));
        }
        self.file
            .write_all_at(data, offset)
            .map_err(io_err("staging the import"))?;
        self.hasher.update(data);
        self.received += data.len() as u64;
        Ok(self.received)
    }

    /// Whether every announced byte has come.
    pub fn complete(&self) -> bool {
        self.received == self.total
    }

    /// Checks the staged file (its SHA-256, then decoding it whole from the file, and that it
    /// is of the named snapshot) and renames it into place; on any failure the staged file is
    /// removed (by drop).
    pub fn finish(self) -> Result<Listed, LibraryError> {
        let got = hex(&self.hasher.clone().finalize().into());
        if got != self.sha256 {
            return Err(LibraryError::Sha {
                announced: self.sha256.clone(),
                got,
            });
        }
        let mut bytes = vec![0u8; self.total as usize];
        self.file
            .read_exact_at(&mut bytes, 0)
            .map_err(io_err("reading the staged import back"))?;
        if hex(&Sha256::digest(&bytes).into()) != self.sha256 {
            return Err(LibraryError::BadUpload(
                "the staged file changed under faultd".into(),
            ));
        }
        let rec = Recording::decode(&bytes).map_err(LibraryError::Decode)?;
        if hex(&rec.digest) != self.digest {
            return Err(LibraryError::OtherSnapshot {
                named: self.digest.clone(),
                inside: hex(&rec.digest),
            });
        }
        self.file
            .sync_all()
            .map_err(io_err("syncing the staged import"))?;
        let name = format!("{}.ws", self.digest);
        renameat(
            self.dir.as_fd(),
            self.tmp.as_str(),
            self.dir.as_fd(),
            name.as_str(),
        )
        .map_err(|e| io_err("moving the import into place")(e.into()))?;
        self.library.prune(&self.dir);
        Ok(Listed {
            owner: self.owner,
            digest: self.digest.clone(),
            pages: rec.offsets.len() as u64,
            snapshot_size: rec.snapshot_size,
            bytes: self.total,
        })
        // Drop: the temporary name is gone (unlink fails harmlessly), the bytes are given back.
    }
}

fn hex(d: &[u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest of a `<64 hex>.ws` name.
fn parse_name(name: &str) -> Option<[u8; 32]> {
    let h = name.strip_suffix(".ws")?;
    if h.len() != 64
        || !h
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, b) in d.iter_mut().enumerate() {
        *b = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(d)
}

fn dir_name(owner: Option<u32>) -> String {
    owner.map_or_else(|| IMPORTED.to_owned(), |u| u.to_string())
}

impl Library {
    /// The library under `store_dir`, at most `max` recordings per directory.
    pub fn new(store_dir: &Path, max: usize) -> Arc<Library> {
        Arc::new(Library {
            root: store_dir.join("working-sets"),
            max: max.max(1),
            tmp: AtomicU64::new(0),
            staged: Mutex::new((0, HashMap::new())),
        })
    }

    /// Opens (`create`: makes) a directory below `parent` by one name, no link followed,
    /// refused unless faultd owns it.
    fn sub(parent: impl AsFd, name: &str, create: bool) -> io::Result<OwnedFd> {
        if create {
            match mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let fd = openat(
            parent,
            name,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )?;
        let st = fstat(&fd)?;
        if st.st_uid != nix::unistd::geteuid().as_raw() {
            return Err(io::Error::other(format!(
                "{name} is owned by uid {}, not faultd's",
                st.st_uid
            )));
        }
        Ok(fd)
    }

    /// The directory of `owner`'s recordings (None: imported).
    fn dir(&self, owner: Option<u32>, create: bool) -> io::Result<OwnedFd> {
        let parent = self
            .root
            .parent()
            .ok_or_else(|| io::Error::other("store.dir has no parent"))?;
        if create {
            std::fs::create_dir_all(parent)?;
        }
        let store = openat(
            nix::fcntl::AT_FDCWD,
            parent,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )?;
        let ws = Self::sub(store, "working-sets", create)?;
        Self::sub(ws, &dir_name(owner), create)
    }

    /// Reads one recording file, bounded, no link followed.
    fn read(dir: impl AsFd, name: &str) -> io::Result<Recording> {
        let (mut f, len) = Self::open(dir, name)?;
        let mut bytes = Vec::with_capacity(len as usize);
        Read::by_ref(&mut f)
            .take(MAX_BYTES as u64 + 1)
            .read_to_end(&mut bytes)?;
        Recording::decode(&bytes).map_err(io::Error::other)
    }

    /// The recording of snapshot `digest` that `owner`'s sessions replay: their own, else the
    /// operator's import.
    pub fn find(&self, owner: u32, digest: &[u8; 32]) -> Option<Arc<Recording>> {
        let name = format!("{}.ws", hex(digest));
        [Some(owner), None].into_iter().find_map(|o| {
            let dir = self.dir(o, false).ok()?;
            Self::read(dir, &name)
                .inspect_err(|e| {
                    if e.kind() != io::ErrorKind::NotFound {
                        tracing::warn!("working-set recording {name} not used: {e}");
                    }
                })
                .ok()
                .filter(|r| &r.digest == digest)
                .map(Arc::new)
        })
    }

    /// A new file `<prefix>-<pid>-<n>` in `dir`, 0600, opened `access` (never an existing file
    /// or a link): where a recording is written before it is renamed into place.
    fn create_temp(
        &self,
        dir: &OwnedFd,
        prefix: &str,
        access: OFlag,
    ) -> io::Result<(String, File)> {
        let tmp = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            self.tmp.fetch_add(1, Ordering::Relaxed)
        );
        let fd = openat(
            dir.as_fd(),
            tmp.as_str(),
            access | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        Ok((tmp, File::from(fd)))
    }

    /// Writes `rec` as `owner`'s (None: imported), atomically, then removes the oldest
    /// recordings beyond the bound.
    pub fn save(&self, owner: Option<u32>, rec: &Recording) -> io::Result<()> {
        let dir = self.dir(owner, true)?;
        let name = format!("{}.ws", hex(&rec.digest));
        let (tmp, mut f) = self.create_temp(&dir, ".tmp", OFlag::O_WRONLY)?;
        let written = f.write_all(&rec.encode()).and_then(|()| f.sync_all());
        let renamed = written.and_then(|()| {
            renameat(dir.as_fd(), tmp.as_str(), dir.as_fd(), name.as_str()).map_err(Into::into)
        });
        if let Err(e) = renamed {
            let _ = nix::unistd::unlinkat(
                dir.as_fd(),
                tmp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            return Err(e);
        }
        self.prune(&dir);
        Ok(())
    }

    /// `(name, mtime)` of each recording in `dir`.
    fn entries(dir: &OwnedFd) -> Vec<(String, i64)> {
        Self::names(dir)
            .into_iter()
            .filter_map(|name| {
                parse_name(&name)?;
                let st = nix::sys::stat::fstatat(
                    dir.as_fd(),
                    name.as_str(),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .ok()?;
                Some((name, st.st_mtime))
            })
            .collect()
    }

    fn prune(&self, dir: &OwnedFd) {
        let mut all = Self::entries(dir);
        if all.len() <= self.max {
            return;
        }
        all.sort_by_key(|(n, t)| (*t, n.clone()));
        for (name, _) in &all[..all.len() - self.max] {
            let _ = nix::unistd::unlinkat(
                dir.as_fd(),
                name.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
        }
    }

    /// The recordings of the directories `want` takes (None: imported), by owner and digest.
    /// Each is read as far as its header: the counts come from there, the size from `fstat` of
    /// the opened file (a damaged body is found when the recording is used or exported).
    pub fn list(&self, want: impl Fn(Option<u32>) -> bool) -> Vec<Listed> {
        let Ok(store) = openat(
            nix::fcntl::AT_FDCWD,
            self.root.as_path(),
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        ) else {
            return Vec::new();
        };
        let owners: Vec<Option<u32>> = Self::names(&store)
            .into_iter()
            .filter_map(|n| {
                if n == IMPORTED {
                    Some(None)
                } else {
                    n.parse::<u32>()
                        .ok()
                        // Only the canonical spelling: "007" is not uid 7's directory.
                        .filter(|u| u.to_string() == n)
                        .map(Some)
                }
            })
            .filter(|o| want(*o))
            .collect();
        let mut out = Vec::new();
        for owner in owners {
            let Ok(dir) = self.dir(owner, false) else {
                continue;
            };
            for (name, _) in Self::entries(&dir) {
                if let Ok(l) = Self::peek(&dir, &name, owner) {
                    out.push(l);
                }
            }
        }
        out.sort_by(|a, b| (a.owner, &a.digest).cmp(&(b.owner, &b.digest)));
        out
    }

    /// Opens one recording file, no link followed, refused unless a regular file of at most
    /// [`MAX_BYTES`].
    fn open(dir: impl AsFd, name: &str) -> io::Result<(File, u64)> {
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let f = File::from(fd);
        let m = f.metadata()?;
        if !m.is_file() || m.len() > MAX_BYTES as u64 {
            return Err(io::Error::other(format!(
                "{name} is not a regular file of at most {MAX_BYTES} bytes"
            )));
        }
        Ok((f, m.len()))
    }

    /// One recording's row from its header and its size.
    fn peek(dir: &OwnedFd, name: &str, owner: Option<u32>) -> io::Result<Listed> {
        let (f, bytes) = Self::open(dir.as_fd(), name)?;
        let mut head = [0u8; HEADER_BYTES];
        f.read_exact_at(&mut head, 0)?;
        let Some(h) = Header::read(&head, bytes) else {
            return Err(io::Error::other(format!("{name} is not a recording")));
        };
        Ok(Listed {
            owner,
            digest: name.trim_end_matches(".ws").to_owned(),
            pages: h.pages,
            snapshot_size: h.snapshot_size,
            bytes,
        })
    }

    fn names(dir: &OwnedFd) -> Vec<String> {
        let Ok(d) = dir
            .try_clone()
            .map_err(|e| nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
            .and_then(nix::dir::Dir::from_fd)
        else {
            return Vec::new();
        };
        d.into_iter()
            .flatten()
            .filter_map(|e| e.file_name().to_str().ok().map(str::to_owned))
            .filter(|n| n != "." && n != "..")
            .collect()
    }

    /// `owner`'s (None: imported) recording of snapshot `digest` (hex), opened for export: its
    /// size and SHA-256 are taken now, and its chunks read from this one open file.
    pub fn open_export(
        &self,
        owner: Option<u32>,
        digest: &str,
    ) -> Result<ExportFile, LibraryError> {
        let d = parse_digest(digest)?;
        let not_found = || LibraryError::NotFound {
            digest: digest.to_owned(),
            whose: whose(owner),
        };
        let name = format!("{}.ws", hex(&d));
        let dir = self.dir(owner, false).map_err(|_| not_found())?;
        let (file, total) = match Self::open(dir, &name) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
            Err(e) => return Err(io_err(format!("opening {name}"))(e)),
        };
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut at = 0u64;
        while at < total {
            let n = (total - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at)
                .map_err(io_err(format!("reading {name}")))?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(ExportFile {
            file,
            digest: hex(&d),
            total,
            sha256: hex(&hasher.finalize().into()),
        })
    }

    /// Removes `owner`'s (None: imported) recording of snapshot `digest` (hex).
    pub fn remove(&self, owner: Option<u32>, digest: &str) -> Result<(), LibraryError> {
        let d = parse_digest(digest)?;
        let not_found = || LibraryError::NotFound {
            digest: digest.to_owned(),
            whose: whose(owner),
        };
        let dir = self.dir(owner, false).map_err(|_| not_found())?;
        match nix::unistd::unlinkat(
            dir.as_fd(),
            format!("{}.ws", hex(&d)).as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::ENOENT) => Err(not_found()),
            Err(e) => Err(io_err("removing the recording")(e.into())),
        }
    }

    /// Starts staging an import of `total` bytes as `owner`'s (None: imported), asked by uid
    /// `requester`; refused past the staging bounds.
    pub fn begin_upload(
        self: &Arc<Self>,
        owner: Option<u32>,
        requester: u32,
        digest: &str,
        sha256: &str,
        total: u64,
    ) -> Result<Upload, LibraryError> {
        let d = parse_digest(digest)?;
        parse_digest(sha256).map_err(|_| {
            LibraryError::BadUpload(format!(
                "{sha256:?} is not a SHA-256: 64 lowercase hex digits"
            ))
        })?;
        if total > MAX_BYTES as u64 || total < MIN_BYTES as u64 {
            return Err(LibraryError::BadUpload(format!(
                "a recording of {total} bytes: a recording is {MIN_BYTES} to {MAX_BYTES} bytes"
            )));
        }
        self.stage(requester, total)?;
        // From here on a failure gives the bytes back (the Upload's drop, or here).
        let made = (|| {
            let dir = self
                .dir(owner, true)
                .map_err(io_err("opening the library"))?;
            let (tmp, file) = self
                .create_temp(&dir, ".upload", OFlag::O_RDWR)
                .map_err(io_err("creating the staging file"))?;
            Ok::<_, LibraryError>((dir, tmp, file))
        })();
        let (dir, tmp, file) = match made {
            Ok(m) => m,
            Err(e) => {
                self.unstage(requester, total);
                return Err(e);
            }
        };
        Ok(Upload {
            library: self.clone(),
            dir,
            tmp,
            file,
            owner,
            requester,
            digest: hex(&d),
            sha256: sha256.to_owned(),
            total,
            received: 0,
            hasher: Sha256::new(),
        })
    }

    fn stage(&self, requester: u32, bytes: u64) -> Result<(), LibraryError> {
        let mut st = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        let mine = st.1.get(&requester).copied().unwrap_or(0);
        if st.0 + bytes > MAX_STAGED_BYTES {
            return Err(LibraryError::Busy(format!(
                "imports staged now hold {} of {MAX_STAGED_BYTES} bytes; try again later",
                st.0
            )));
        }
        if mine + bytes > MAX_STAGED_PER_UID {
            return Err(LibraryError::Busy(format!(
                "uid {requester}'s imports staged now hold {mine} of {MAX_STAGED_PER_UID} bytes"
            )));
        }
        st.0 += bytes;
        *st.1.entry(requester).or_insert(0) += bytes;
        Ok(())
    }

    fn unstage(&self, requester: u32, bytes: u64) {
        let mut st = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        st.0 = st.0.saturating_sub(bytes);
        if let Some(n) = st.1.get_mut(&requester) {
            *n = n.saturating_sub(bytes);
            if *n == 0 {
                st.1.remove(&requester);
            }
        }
    }

    /// Bytes of imports staged now.
    pub fn staged_bytes(&self) -> u64 {
        self.staged.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Removes the temporary files (`.tmp-*`, `.upload-*`) a faultd that died left behind in
    /// every directory of the library. Called once at start, before any request is served.
    pub fn sweep(&self) {
        let Ok(store) = openat(
            nix::fcntl::AT_FDCWD,
            self.root.as_path(),
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        ) else {
            return;
        };
        for sub in Self::names(&store) {
            let Ok(dir) = Self::sub(store.as_fd(), &sub, false) else {
                continue;
            };
            for name in Self::names(&dir) {
                if name.starts_with(".tmp-") || name.starts_with(".upload-") {
                    let _ = nix::unistd::unlinkat(
                        dir.as_fd(),
                        name.as_str(),
                        nix::unistd::UnlinkatFlags::NoRemoveDir,
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(digest: u8, pages: u64) -> Recording {
        Recording {
            snapshot_size: 1 << 20,
            digest: [digest; 32],
            offsets: (0..pages).map(|p| p * 4096).collect(),
            zero: None,
        }
    }

    #[test]
    fn an_owners_recording_is_found_for_that_owner_and_an_import_for_everyone() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::new(dir.path(), 4);

        lib.save(Some(1000), &rec(1, 3)).unwrap();
        lib.save(None, &rec(2, 2)).unwrap();

        assert_eq!(lib.find(1000, &[1; 32]).unwrap().offsets.len(), 3);
        assert!(lib.find(1001, &[1; 32]).is_none());
        assert_eq!(lib.find(1001, &[2; 32]).unwrap().offsets.len(), 2);
        assert_eq!(lib.list(|_| true).len(), 2);
    }

    #[test]
    fn the_oldest_recordings_beyond_the_bound_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::new(dir.path(), 2);

        for d in 1..=3 {
            lib.save(Some(7), &rec(d, 1)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }

        let left: Vec<String> = lib.list(|_| true).into_iter().map(|l| l.digest).collect();
        assert_eq!(left, vec![hex(&[2; 32]), hex(&[3; 32])]);
    }

    #[test]
    fn a_link_in_place_of_a_directory_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("working-sets")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), dir.path().join("working-sets/5")).unwrap();
        let lib = Library::new(dir.path(), 2);

        assert!(lib.save(Some(5), &rec(1, 1)).is_err());
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }
}

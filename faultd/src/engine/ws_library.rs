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
//! owner's recordings are replayed only for that owner's sessions; only the operator (root or
//! faultd's uid) lists, exports, imports or removes recordings, over the control socket.

use super::recording::{Recording, MAX_BYTES};
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstat, mkdirat, Mode};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

/// The recordings under `store.dir/working-sets`.
#[derive(Debug)]
pub struct Library {
    root: PathBuf,
    max: usize,
    tmp: AtomicU64,
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
        let fd = openat(
            dir,
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let mut f = File::from(fd);
        let m = f.metadata()?;
        if !m.is_file() || m.len() > MAX_BYTES as u64 {
            return Err(io::Error::other(format!(
                "{name} is not a regular file of at most {MAX_BYTES} bytes"
            )));
        }
        let mut bytes = Vec::with_capacity(m.len() as usize);
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

    /// Writes `rec` as `owner`'s (None: imported), atomically, then removes the oldest
    /// recordings beyond the bound.
    pub fn save(&self, owner: Option<u32>, rec: &Recording) -> io::Result<()> {
        let dir = self.dir(owner, true)?;
        let name = format!("{}.ws", hex(&rec.digest));
        let tmp = format!(
            ".tmp-{}-{}",
            std::process::id(),
            self.tmp.fetch_add(1, Ordering::Relaxed)
        );
        let fd = openat(
            dir.as_fd(),
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )?;
        let mut f = File::from(fd);
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

    /// Every recording: each owner's and the imported ones.
    pub fn list(&self) -> Vec<Listed> {
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
                    n.parse::<u32>().ok().map(Some)
                }
            })
            .collect();
        let mut out = Vec::new();
        for owner in owners {
            let Ok(dir) = self.dir(owner, false) else {
                continue;
            };
            for (name, _) in Self::entries(&dir) {
                let Ok(rec) = Self::read(dir.as_fd(), &name) else {
                    continue;
                };
                out.push(Listed {
                    owner,
                    digest: name.trim_end_matches(".ws").to_owned(),
                    pages: rec.offsets.len() as u64,
                    snapshot_size: rec.snapshot_size,
                    bytes: rec.encode().len() as u64,
                });
            }
        }
        out.sort_by(|a, b| (a.owner, &a.digest).cmp(&(b.owner, &b.digest)));
        out
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

    /// The encoded recording of `owner` (None: imported) for snapshot `digest` (hex).
    pub fn export(&self, owner: Option<u32>, digest: &str) -> io::Result<Vec<u8>> {
        let d = parse_name(&format!("{digest}.ws"))
            .ok_or_else(|| io::Error::other("a digest is 64 lowercase hex digits"))?;
        let dir = self.dir(owner, false)?;
        Ok(Self::read(dir, &format!("{}.ws", hex(&d)))?.encode())
    }

    /// Removes `owner`'s (None: imported) recording of snapshot `digest` (hex).
    pub fn remove(&self, owner: Option<u32>, digest: &str) -> io::Result<()> {
        let d = parse_name(&format!("{digest}.ws"))
            .ok_or_else(|| io::Error::other("a digest is 64 lowercase hex digits"))?;
        let dir = self.dir(owner, false)?;
        nix::unistd::unlinkat(
            dir.as_fd(),
            format!("{}.ws", hex(&d)).as_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        )
        .map_err(Into::into)
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
        assert_eq!(lib.list().len(), 2);
    }

    #[test]
    fn the_oldest_recordings_beyond_the_bound_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::new(dir.path(), 2);

        for d in 1..=3 {
            lib.save(Some(7), &rec(d, 1)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1100));
        }

        let left: Vec<String> = lib.list().into_iter().map(|l| l.digest).collect();
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

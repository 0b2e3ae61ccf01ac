//! The two files faultd handles, as root, on a Firecracker VM's behalf, both named by paths
//! that pass through directories the VM's user may write (a jailer makes the VM's directory
//! the user's). Nothing here follows a symbolic link or works on a path twice (DESIGN-SKETCH
//! invariant 6).
//!
//! - **The socket** ([`place_socket`]). Its directory is opened once, with no symbolic link in
//!   any component, and everything after is relative to that fd. The socket is bound in a
//!   private directory faultd makes inside it (root's, 0700: nobody else can enter, so nobody
//!   can swap what faultd then chowns), given its owner and mode there, and renamed into place
//!   (never over anything). The peer only ever sees the finished socket. At shutdown it is
//!   removed only if the name still holds that very socket ([`PlacedSocket::remove`]).
//! - **The snapshot** ([`open_snapshot`]). Opened once, when faultd is told to listen, and
//!   kept: later changes at the path do not matter. It is opened with the rights of the user
//!   the socket admits (see [`open_as`]), so faultd serves that user nothing it could not read
//!   itself; with no symbolic link in any component; `O_NONBLOCK` so a FIFO cannot block the
//!   open; and it must be a regular file before a byte is read.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, RenameFlags, ResolveFlag, AT_FDCWD};
use nix::sys::stat::{fstat, fstatat, FileStat, Mode, SFlag};
use nix::unistd::{Uid, UnlinkatFlags};

use super::ListenError;

/// The gid faultd reads a snapshot with for a uid that has no account (the kernel's overflow
/// gid, "nogroup"), with no supplementary groups.
const NO_ACCOUNT_GID: u32 = 65534;

/// A socket faultd made and moved into place: removable later only while it is still there.
#[derive(Debug)]
pub(super) struct PlacedSocket {
    dir: OwnedFd,
    name: OsString,
    /// Device and inode of the socket file.
    id: (u64, u64),
}

impl PlacedSocket {
    /// Removes the socket if its name still holds it (whatever is there now stays otherwise).
    pub(super) fn remove(&self) {
        if let Ok(st) = fstatat(&self.dir, self.name.as_os_str(), AT_NOFOLLOW) {
            if file_id(&st) == self.id {
                let _ = nix::unistd::unlinkat(
                    &self.dir,
                    self.name.as_os_str(),
                    UnlinkatFlags::NoRemoveDir,
                );
            }
        }
    }
}

const AT_NOFOLLOW: nix::fcntl::AtFlags = nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW;

fn file_id(st: &FileStat) -> (u64, u64) {
    (st.st_dev, st.st_ino)
}

fn is_type(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == kind
}

/// `/proc/self/fd/<dir>/<name>`: a short sun_path for `name` in `dir`, resolved through faultd's
/// own fd (so it is that very directory whatever happened to its path).
fn via_fd(dir: &impl AsRawFd, name: &str) -> String {
    format!("/proc/self/fd/{}/{name}", dir.as_raw_fd())
}

/// Opens the directory at `path` (absolute) with no symbolic link in any component.
fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    Ok(openat2(AT_FDCWD, path, how)?)
}

/// Creates the unix socket `path` owned by `owner`, mode 0600, listening, non-blocking (see the
/// module's header for how).
pub(super) fn place_socket(
    path: &Path,
    owner: u32,
) -> Result<(UnixListener, PlacedSocket), ListenError> {
    let shown = || path.display().to_string();
    // ListenSpec::new admits only paths with a file name under a directory.
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(ListenError::NotASocket { path: shown() });
    };
    let dir = open_dir(parent).map_err(|source| ListenError::SocketDirectory {
        path: shown(),
        source: explain_loop(source),
    })?;
    let private = Private::make(&dir).map_err(|source| ListenError::Bind {
        path: shown(),
        source,
    })?;
    let placed = clear_stale(&dir, name, &private, path)
        .and_then(|()| private.bind_and_place(&dir, name, owner, path));
    private.remove(&dir);
    placed
}

/// Refuses what is at `name` unless it is a socket nobody listens on, which is removed.
fn clear_stale(
    dir: &OwnedFd,
    name: &OsStr,
    private: &Private,
    path: &Path,
) -> Result<(), ListenError> {
    let shown = || path.display().to_string();
    let st = match fstatat(dir, name, AT_NOFOLLOW) {
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => {
            return Err(ListenError::Bind {
                path: shown(),
                source: e.into(),
            })
        }
        Ok(st) => st,
    };
    if !is_type(&st, SFlag::S_IFSOCK) {
        return Err(ListenError::NotASocket { path: shown() });
    }
    // Connecting by path would follow whatever is there by then: a hard link to it in the
    // private directory is that very inode (linkat follows no link), where nobody can swap it.
    const PROBE: &str = "probe";
    nix::unistd::linkat(dir, name, &private.fd, PROBE, AT_NOFOLLOW_LINK).map_err(|e| {
        ListenError::RemoveStale {
            path: shown(),
            source: e.into(),
        }
    })?;
    let probed = fstatat(&private.fd, PROBE, AT_NOFOLLOW);
    // Only a refused connection says nobody listens: a SEQPACKET or DGRAM socket (faultd's own
    // control socket, say) fails a stream connect with EPROTOTYPE while it is very much alive.
    let in_use = probed.is_ok_and(|p| is_type(&p, SFlag::S_IFSOCK))
        && !stale(std::os::unix::net::UnixStream::connect(via_fd(
            &private.fd,
            PROBE,
        )));
    let _ = nix::unistd::unlinkat(&private.fd, PROBE, UnlinkatFlags::NoRemoveDir);
    if in_use {
        return Err(ListenError::SocketInUse { path: shown() });
    }
    if probed.is_ok_and(|p| file_id(&p) == file_id(&st)) {
        nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(|e| {
            ListenError::RemoveStale {
                path: shown(),
                source: e.into(),
            }
        })?;
    }
    Ok(())
}

/// Whether a stream connect's outcome shows a socket nobody listens on.
fn stale(connected: io::Result<std::os::unix::net::UnixStream>) -> bool {
    matches!(connected, Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED))
}

const AT_NOFOLLOW_LINK: nix::fcntl::AtFlags = nix::fcntl::AtFlags::empty();

/// A directory faultd made inside the socket's directory, that only faultd's uid can enter.
#[derive(Debug)]
struct Private {
    name: String,
    fd: OwnedFd,
}

impl Private {
    /// Makes it (faultd's uid's, 0700) and opens it, checking that what it opened is such a
    /// directory: a user who may write the parent may have swapped another in meanwhile, but
    /// not one only faultd's uid can enter (another faultd made is as good: nobody else can
    /// enter it either, and a name taken there makes the bind fail).
    fn make(dir: &OwnedFd) -> io::Result<Private> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let me = nix::unistd::geteuid().as_raw();
        for _ in 0..16 {
            let name = format!(
                ".faultd-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            match nix::sys::stat::mkdirat(dir, name.as_str(), Mode::S_IRWXU) {
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(e.into()),
                Ok(()) => {}
            }
            let how = OpenHow::new()
                .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH);
            let fd = openat2(dir, name.as_str(), how)?;
            let st = fstat(&fd)?;
            if !is_type(&st, SFlag::S_IFDIR) || st.st_uid != me || st.st_mode & 0o7777 != 0o700 {
                return Err(io::Error::other(format!(
                    "the private directory {name} faultd made was replaced before it was opened"
                )));
            }
            return Ok(Private { name, fd });
        }
        Err(io::Error::other(
            "16 names for a private directory were all taken",
        ))
    }

    /// Binds the socket in here, sets its owner and mode, moves it to `name` in `dir`.
    fn bind_and_place(
        &self,
        dir: &OwnedFd,
        name: &OsStr,
        owner: u32,
        path: &Path,
    ) -> Result<(UnixListener, PlacedSocket), ListenError> {
        const SOCKET: &str = "s";
        let shown = || path.display().to_string();
        let listener =
            UnixListener::bind(via_fd(&self.fd, SOCKET)).map_err(|source| ListenError::Bind {
                path: shown(),
                source,
            })?;
        // Nobody but faultd's uid can reach SOCKET in here: following it is following nothing.
        let restricted = (|| -> io::Result<FileStat> {
            nix::sys::stat::fchmodat(
                &self.fd,
                SOCKET,
                Mode::S_IRUSR | Mode::S_IWUSR,
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )?;
            nix::unistd::fchownat(
                &self.fd,
                SOCKET,
                Some(Uid::from_raw(owner)),
                None,
                AT_NOFOLLOW,
            )?;
            listener.set_nonblocking(true)?;
            Ok(fstatat(&self.fd, SOCKET, AT_NOFOLLOW)?)
        })();
        let st = restricted.map_err(|source| {
            let _ = nix::unistd::unlinkat(&self.fd, SOCKET, UnlinkatFlags::NoRemoveDir);
            ListenError::Permissions {
                path: shown(),
                source,
            }
        })?;
        nix::fcntl::renameat2(&self.fd, SOCKET, dir, name, RenameFlags::RENAME_NOREPLACE).map_err(
            |e| {
                let _ = nix::unistd::unlinkat(&self.fd, SOCKET, UnlinkatFlags::NoRemoveDir);
                match e {
                    Errno::EEXIST => ListenError::SocketAppeared { path: shown() },
                    e => ListenError::Bind {
                        path: shown(),
                        source: e.into(),
                    },
                }
            },
        )?;
        Ok((
            listener,
            PlacedSocket {
                dir: dir.try_clone().map_err(|source| ListenError::Bind {
                    path: shown(),
                    source,
                })?,
                name: name.to_owned(),
                id: file_id(&st),
            },
        ))
    }

    /// Removes the directory (empty by now), if its name still holds it.
    fn remove(self, dir: &OwnedFd) {
        let (Ok(here), Ok(mine)) = (
            fstatat(dir, self.name.as_str(), AT_NOFOLLOW),
            fstat(&self.fd),
        ) else {
            return;
        };
        if file_id(&here) == file_id(&mine) {
            let _ = nix::unistd::unlinkat(dir, self.name.as_str(), UnlinkatFlags::RemoveDir);
        }
    }
}

/// ELOOP from a RESOLVE_NO_SYMLINKS open, said in words.
fn explain_loop(e: impl Into<io::Error>) -> io::Error {
    let e = e.into();
    if e.raw_os_error() == Some(libc::ELOOP) {
        io::Error::other("a symbolic link in the path (faultd follows none)")
    } else {
        e
    }
}

/// Opens the snapshot at `path` for reading as `reader` may (see the module's header); the
/// file and its length.
pub(super) fn open_snapshot(path: &Path, reader: u32) -> Result<(File, u64), ListenError> {
    let shown = || path.display().to_string();
    let file = open_as(path, reader).map_err(|source| match source.raw_os_error() {
        Some(libc::ELOOP) => ListenError::SnapshotLink { path: shown() },
        Some(libc::EACCES) => ListenError::SnapshotNotReadable {
            path: shown(),
            uid: reader,
        },
        _ => ListenError::OpenSnapshot {
            path: shown(),
            source,
        },
    })?;
    let meta = file
        .metadata()
        .map_err(|source| ListenError::OpenSnapshot {
            path: shown(),
            source,
        })?;
    if !meta.is_file() {
        return Err(ListenError::SnapshotNotAFile { path: shown() });
    }
    Ok((file, meta.len()))
}

/// Opens `path` read-only with no symbolic link in any component, `O_NONBLOCK` (a FIFO does
/// not block the open; faultd never reads it), only if `uid` could open it: every directory on
/// the way searchable and the file readable by `uid`, by the mode bits that apply to it (owner,
/// else one of its groups: its account's primary and supplementary groups, or
/// [`NO_ACCOUNT_GID`] alone without an account, else other). The walk goes one component at a
/// time, each opened relative to the directory just checked, so what is checked is what is
/// opened. Done without taking `uid`'s credentials, which would need CAP_SETUID and
/// CAP_SETGID (a wider unit than faultd's). ACLs are not read: a file or directory whose ACL
/// grants `uid` more than its mode bits show is refused; one whose ACL takes away what its
/// group bits (the ACL mask) grant to its owning group is not seen.
fn open_as(path: &Path, uid: u32) -> io::Result<File> {
    let groups = if uid == nix::unistd::geteuid().as_raw() || uid == 0 {
        None
    } else {
        Some(groups_of(uid)?)
    };
    let check = |fd: &dyn AsFd, bit: u32| -> io::Result<()> {
        let Some(groups) = &groups else {
            return Ok(());
        };
        let st = fstat(fd.as_fd())?;
        let mode = st.st_mode;
        let shift = if st.st_uid == uid {
            6
        } else if groups.contains(&st.st_gid) {
            3
        } else {
            0
        };
        if (mode >> shift) & bit == 0 {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        Ok(())
    };
    let names: Vec<&std::ffi::OsStr> = path
        .components()
        .filter_map(|c| match c {
            std::path::Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let (last, dirs) = names
        .split_last()
        .ok_or_else(|| io::Error::other("the snapshot path names no file"))?;
    let no_links = ResolveFlag::RESOLVE_NO_SYMLINKS
        | ResolveFlag::RESOLVE_NO_MAGICLINKS
        | ResolveFlag::RESOLVE_BENEATH;
    let dir_how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(no_links);
    // "/" itself is absolute, which RESOLVE_BENEATH refuses (EXDEV); it is no link either.
    let mut dir = openat2(
        AT_FDCWD,
        "/",
        OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS),
    )?;
    check(&dir, 0o1)?;
    for name in dirs {
        let next = openat2(&dir, *name, dir_how)?;
        check(&next, 0o1)?;
        dir = next;
    }
    let how = OpenHow::new()
        .flags(
            OFlag::O_RDONLY
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC
                | OFlag::O_NOCTTY
                | OFlag::O_NOFOLLOW,
        )
        .resolve(no_links);
    let file = File::from(openat2(&dir, *last, how)?);
    check(&file, 0o4)?;
    Ok(file)
}

/// The groups whose mode bits apply to `uid`: its account's primary and supplementary groups,
/// or [`NO_ACCOUNT_GID`] alone if it has no account.
fn groups_of(uid: u32) -> io::Result<Vec<u32>> {
    Ok(match nix::unistd::User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(user)) => {
            let name = std::ffi::CString::new(user.name.as_bytes()).map_err(io::Error::other)?;
            nix::unistd::getgrouplist(&name, user.gid)?
                .into_iter()
                .map(|g| g.as_raw())
                .chain([user.gid.as_raw()])
                .collect()
        }
        Ok(None) => vec![NO_ACCOUNT_GID],
        Err(e) => return Err(e.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_path_is_not_a_snapshot_and_a_link_in_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mem");
        std::fs::write(&file, b"x").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let me = nix::unistd::geteuid().as_raw();

        assert!(open_snapshot(&file, me).is_ok());
        assert!(matches!(
            open_snapshot(dir.path(), me),
            Err(ListenError::SnapshotNotAFile { .. })
        ));
        assert!(matches!(
            open_snapshot(&link, me),
            Err(ListenError::SnapshotLink { .. })
        ));
    }

    #[test]
    fn a_live_socket_of_another_type_is_not_taken_for_stale() {
        // faultd's control socket is SEQPACKET: a stream connect to it fails, with EPROTOTYPE,
        // while it listens. A listen spelled onto it must be refused, not unlink it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag};
        use nix::sys::socket::{SockType, UnixAddr};
        let live = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(live.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&live, Backlog::new(1).unwrap()).unwrap();
        let me = nix::unistd::geteuid().as_raw();
        assert!(matches!(
            place_socket(&path, me),
            Err(ListenError::SocketInUse { .. })
        ));
        assert!(path.exists(), "the live socket was removed");
    }

    #[test]
    fn a_socket_is_placed_owned_and_removed_only_while_it_is_still_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fc.sock");
        let me = nix::unistd::geteuid().as_raw();

        let (_listener, placed) = place_socket(&path, me).unwrap();

        let meta = std::fs::symlink_metadata(&path).unwrap();
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o7777, 0o600);
        // Only the socket is left in the directory (the private directory is gone).
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        std::fs::rename(&path, dir.path().join("moved")).unwrap();
        std::fs::write(&path, b"someone else's").unwrap();
        placed.remove();
        assert!(path.exists());
    }
}

//! The Firecracker listeners added at run time (`firecracker_listen`), kept in faultd's state
//! directory so that a restarted faultd listens on them again.
//!
//! The file is `store.dir/firecracker-listeners.json` (`store.dir` is faultd's own directory
//! of what outlives it, under systemd's `StateDirectory=`): faultd's uid, mode 0600, in a
//! directory of faultd's uid opened with no symbolic link on the way. It is written whole,
//! atomically (a new file made `O_EXCL` beside it, synced, renamed over it, the directory
//! synced), after every listen and unlisten; so it always holds one complete list.
//!
//! At start each entry is listened on again exactly as a request is ([`super::listen_as`]: the
//! snapshot opened with the admitted uid's rights, the socket made in a private directory and
//! moved into place, owned by that uid), with the uid it admitted when it was added pinned
//! (a `pid` rule's process may be gone, its pid another's). An entry that cannot be listened
//! on again is logged and dropped: a tenant who removes its snapshot must not stop faultd from
//! starting. Config entries are not kept here: the config names them again.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

use super::{listen_as, ListenSource, ListenSpec, PeerRule};
use crate::daemon::Daemon;

/// The file's name in `store.dir`.
pub(crate) const FILE: &str = "firecracker-listeners.json";
/// What is written before it is renamed over [`FILE`].
const TEMP: &str = ".firecracker-listeners.json.new";
/// The largest file read back (a listener takes ~300 bytes).
const MAX_BYTES: u64 = 4 << 20;

/// The file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    listeners: Vec<KeptListener>,
}

/// One listener as kept: its listen order, and who added it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeptListener {
    vm: String,
    socket: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<PathBuf>,
    /// Instead of `snapshot`: the object the restores read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    object: Option<faultd_proto::ObjectName>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    pid: Option<i32>,
    /// The uid whose request added it (who, besides the operator, may remove it).
    added_by: Option<u32>,
}

/// Writes the listeners added at run time (logged, not returned, on failure: they are served,
/// only not listened on again after a restart).
pub(super) async fn save(daemon: &Arc<Daemon>) {
    let d = daemon.clone();
    let written = tokio::task::spawn_blocking(move || {
        // Under the lock the list is taken and written: the last write holds the last list.
        let _one_at_a_time = d
            .firecracker
            .state_write
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let listeners = d
            .firecracker
            .kept()
            .into_iter()
            .map(|(spec, added_by)| {
                let (snapshot, object) = match spec.source {
                    ListenSource::File(path) => (Some(path), None),
                    ListenSource::Object { store, key } => {
                        (None, Some(faultd_proto::ObjectName { store, key }))
                    }
                };
                KeptListener {
                    vm: spec.vm,
                    socket: spec.socket,
                    snapshot,
                    object,
                    uid: spec.peer.uid,
                    pid: spec.peer.pid,
                    added_by,
                }
            })
            .collect();
        let bytes =
            serde_json::to_vec_pretty(&StateFile { listeners }).map_err(io::Error::other)?;
        write(&d.config.store_dir, &bytes)
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)));
    if let Err(e) = written {
        tracing::error!(
            dir = %daemon.config.store_dir.display(),
            "writing {FILE}: {e}; listeners added at run time will not be listened on again \
             after a restart"
        );
    }
}

/// Listens again on every listener the state directory keeps (see the module's header).
pub async fn relisten(daemon: &Arc<Daemon>) {
    let dir = daemon.config.store_dir.clone();
    let read = tokio::task::spawn_blocking(move || read(&dir))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
    let state = match read {
        Ok(Some(s)) => s,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(
                dir = %daemon.config.store_dir.display(),
                "reading {FILE}: {e}; no listener added at run time is listened on again"
            );
            return;
        }
    };
    let mut dropped = 0;
    for k in state.listeners {
        let vm = k.vm.clone();
        let spec = ListenSource::from_parts(k.snapshot, k.object.map(|o| (o.store, o.key)))
            .map_err(|why| why.to_owned())
            .and_then(|source| {
                ListenSpec::new(
                    k.vm,
                    k.socket,
                    source,
                    PeerRule {
                        uid: k.uid,
                        pid: k.pid,
                    },
                )
                .map_err(|e| e.to_string())
            });
        let listened = match spec {
            Ok(spec) => listen_as(daemon, spec, k.added_by)
                .await
                .map_err(|e| crate::front::validate::chain(&e)),
            Err(e) => Err(e),
        };
        match listened {
            Ok(()) => tracing::info!(vm, "listening again on a listener added before the restart"),
            Err(why) => {
                dropped += 1;
                tracing::error!(
                    vm,
                    "a Firecracker listener added before the restart cannot be listened on \
                     again, and is dropped: {why}"
                );
            }
        }
    }
    if dropped > 0 {
        save(daemon).await;
    }
}

/// Opens `dir` (absolute), with no symbolic link in any component, and checks it is faultd's.
fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = openat2(AT_FDCWD, dir, how)?;
    let owner = nix::sys::stat::fstat(fd.as_fd())?.st_uid;
    let me = nix::unistd::geteuid().as_raw();
    if owner != me {
        return Err(io::Error::other(format!(
            "{} is owned by uid {owner}, not faultd's uid {me}",
            dir.display()
        )));
    }
    Ok(fd)
}

/// Opens `name` in `dir` with `flags`, never through a link.
fn open_in(dir: &OwnedFd, name: &str, flags: OFlag, mode: Mode) -> io::Result<File> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
    Ok(File::from(openat2(dir, name, how)?))
}

/// Replaces the file in `dir` with `bytes`, atomically.
fn write(dir: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let d = open_dir(dir)?;
    // A leftover of a write that did not finish is faultd's own: it goes.
    match nix::unistd::unlinkat(&d, TEMP, nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let mut f = open_in(
        &d,
        TEMP,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
        Mode::from_bits_truncate(0o600),
    )?;
    // 0600 whatever the umask.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    nix::fcntl::renameat(&d, TEMP, &d, FILE)?;
    nix::unistd::fsync(&d)?;
    Ok(())
}

/// The file in `dir`, if there is one. Refused unless it is a regular file of faultd's uid
/// that nobody else may write.
fn read(dir: &Path) -> io::Result<Option<StateFile>> {
    let d = match open_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let f = match open_in(&d, FILE, OFlag::O_RDONLY | OFlag::O_NONBLOCK, Mode::empty()) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_file() || meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(io::Error::other(format!(
            "{FILE} must be a regular file of faultd's uid {me} that only it may write \
             (uid {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    let mut bytes = Vec::new();
    f.take(MAX_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(io::Error::other(format!(
            "{FILE} exceeds {MAX_BYTES} bytes"
        )));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| io::Error::other(format!("{FILE} is not a list of listeners: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(vm: &str) -> KeptListener {
        KeptListener {
            vm: vm.into(),
            socket: format!("/run/{vm}.sock").into(),
            snapshot: Some("/srv/mem".into()),
            object: None,
            uid: Some(1000),
            pid: None,
            added_by: Some(0),
        }
    }

    #[test]
    fn the_file_is_written_whole_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let on_object = KeptListener {
            snapshot: None,
            object: Some(faultd_proto::ObjectName {
                store: "rgw".into(),
                key: "tenants/1000/c/mem".into(),
            }),
            ..listener("c")
        };
        let state = StateFile {
            listeners: vec![listener("a"), listener("b"), on_object],
        };

        write(&store, &serde_json::to_vec(&state).unwrap()).unwrap();
        write(&store, &serde_json::to_vec(&state).unwrap()).unwrap();
        let back = read(&store).unwrap().unwrap();

        assert_eq!(back.listeners, state.listeners);
        let meta = std::fs::metadata(store.join(FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&store).unwrap().mode() & 0o777, 0o700);
        assert!(!store.join(TEMP).exists());
    }

    #[test]
    fn no_file_is_no_listener_and_a_file_others_may_write_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(&dir.path().join("none")).unwrap().is_none());
        assert!(read(dir.path()).unwrap().is_none());
        std::fs::write(dir.path().join(FILE), br#"{"listeners":[]}"#).unwrap();
        std::fs::set_permissions(
            dir.path().join(FILE),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("only it may write"), "{e}");
    }

    #[test]
    fn a_symlink_in_place_of_the_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, br#"{"listeners":[]}"#).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(FILE)).unwrap();
        assert!(read(dir.path()).is_err());
    }
}

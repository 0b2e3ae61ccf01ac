//! Firecracker sessions that outlive a faultd restart, crash included.
//!
//! Firecracker sends its one message once and never connects again, so what faultd needs to
//! serve the VM after a restart is kept by the service manager in its fd store
//! (`FDSTORE=1`, systemd's `FileDescriptorStoreMax=`), under one name per VM
//! (`faultd-fc-<vm>`, `vm` the session's name), as three fds:
//! - a memfd holding [`Kept`]: the VM, its owner and listener, its snapshot path and
//!   Firecracker's regions as sent;
//! - the userfaultfd;
//! - faultd's end of Firecracker's connection: its hang-up still ends the session, and its
//!   `SO_PEERPIDFD` still names Firecracker;
//!
//! and, under `faultd-fcsnap-<vm>`, the snapshot file as the listener opened it (after the
//! checks of `paths.rs`): the restarted faultd serves that very file, whatever is at its path
//! by then. A session kept by an older faultd, without it, has its snapshot reopened by path
//! with the same checks, as the kept connection's peer uid.
//!
//! They are stored once the session serves and removed when the VM is gone. At the next
//! start the service manager passes them back (`LISTEN_FDS`, `LISTEN_FDNAMES`), and each VM
//! is served again as a resumed session: pages in Firecracker's memory (in RAM or in swap, by
//! its pagemap) are taken as populated, balloon discards come from the VM's store journal
//! (kept, not removed, when faultd stops), and every thread blocked on a fault the old faultd
//! had read is woken to fault again ([`crate::engine::FaultServer::resume`]).
//!
//! A restore whose snapshot is an object keeps no snapshot fd: its memfd names the object
//! (store, key), the version the restore pinned (ETag and size) and the uid its key was checked
//! for ([`KeptObject`]). The restarted faultd checks that uid against the store's rules as they
//! are now (the config may have changed), HEADs the object again and serves it only if the
//! store still holds that very version; every GET is pinned to the ETag as before, and chunks
//! in the local cache (kept across restarts) are hits. Otherwise the session is not served
//! again: the reason is logged as an error and counted (`faultd_object_kept_refused_total`),
//! and the faults of the VM stay unanswered (Firecracker, which holds its own userfaultfd, has
//! no channel to hear why): never a page of another version.
//!
//! The fds are told apart by kind, not by order (the fd store's order is the manager's).

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

use super::paths::open_snapshot;
use super::{check_fds, check_regions, open_remote, peer_pidfd, Mapping, SessionEnd, WireForm};
use crate::daemon::{Daemon, Ending, Live, Opening};
use crate::ops::systemd;

/// What a kept session's memfd holds.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Kept {
    /// The VM (its store, its sessions' name).
    pub vm: String,
    /// The uid the VM and its store belong to (0, the operator, in what an older faultd kept).
    #[serde(default)]
    pub owner: u32,
    /// The memory snapshot file (None: the snapshot is [`Kept::object`]).
    #[serde(default)]
    pub snapshot: Option<PathBuf>,
    /// The snapshot object and its pinned version (None: a file; and in what an older faultd
    /// kept).
    #[serde(default)]
    pub object: Option<KeptObject>,
    /// Firecracker's regions, as it sent them.
    pub regions: Vec<Mapping>,
    /// The listener whose restore it is (its `restores_per_listener` counts it; None in what
    /// an older faultd kept).
    #[serde(default)]
    pub listener: Option<String>,
}

/// The snapshot object of a kept restore, and the version it was served from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct KeptObject {
    /// The store's name in the config.
    pub store: String,
    /// The object's key.
    pub key: String,
    /// The ETag the restore pinned.
    pub etag: String,
    /// The object's size then.
    pub size: u64,
    /// The uid the key was checked for (Firecracker's, as the listener admitted it).
    pub uid: u32,
}

/// The largest kept description read back: a few hundred bytes per region, and at most
/// [`faultd_proto::MAX_REGIONS`] of them; anything longer is not faultd's.
const MAX_DESCRIPTION: u64 = 1 << 20;

/// The fd store name of `vm`'s kept session.
fn name_of(vm: &str) -> String {
    format!("{}fc-{vm}", systemd::STORED_PREFIX)
}

/// The fd store name of `vm`'s kept snapshot file.
fn snapshot_name_of(vm: &str) -> String {
    format!("{}fcsnap-{vm}", systemd::STORED_PREFIX)
}

/// The session's name in a kept session's fd store name.
fn vm_of(name: &str) -> Option<&str> {
    name.strip_prefix(systemd::STORED_PREFIX)?
        .strip_prefix("fc-")
}

/// The session's name in a kept snapshot's fd store name.
fn snapshot_vm_of(name: &str) -> Option<&str> {
    name.strip_prefix(systemd::STORED_PREFIX)?
        .strip_prefix("fcsnap-")
}

/// Puts a session that has just started serving in the fd store, if a service manager is
/// there to keep it. Returns the name it is kept under (for [`forget`]); failures are logged:
/// the VM is served, only not across a restart.
pub(super) fn keep(
    kept: &Kept,
    uffd: &OwnedFd,
    conn: &UnixStream,
    snapshot: Option<&File>,
) -> Option<String> {
    let name = name_of(&kept.vm);
    // The snapshot first: a session is resumed only once its own entry is there, and then
    // finds its snapshot beside it. An object's restore keeps none.
    let stored = snapshot.map(|f| systemd::store_fds(&snapshot_name_of(&kept.vm), &[f.as_fd()]));
    if let Some(Err(e)) = stored {
        tracing::warn!(
            vm = kept.vm,
            "the snapshot fd cannot be kept (fd store: {e}); after a restart it is reopened by \
             path"
        );
    }
    let stored = (|| -> io::Result<()> {
        let fd =
            nix::sys::memfd::memfd_create(c"faultd-fc", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
        let mut file = File::from(fd);
        file.write_all(&serde_json::to_vec(kept).map_err(io::Error::other)?)?;
        systemd::store_fds(&name, &[file.as_fd(), uffd.as_fd(), conn.as_fd()])
    })();
    match stored {
        Ok(()) => {
            tracing::info!(
                vm = kept.vm,
                name,
                "session kept in the service manager's fd store"
            );
            Some(name)
        }
        Err(e) => {
            tracing::warn!(
                vm = kept.vm,
                "the session cannot be kept across a faultd restart (fd store: {e})"
            );
            None
        }
    }
}

/// Takes a session (and its snapshot) out of the fd store: its VM is gone.
pub(super) fn forget(name: &str) {
    if let Err(e) = systemd::remove_stored(name) {
        tracing::warn!(name, "removing a session from the fd store: {e}");
    }
    if let Some(vm) = vm_of(name) {
        forget_snapshot(&snapshot_name_of(vm));
    }
}

fn forget_snapshot(name: &str) {
    if let Err(e) = systemd::remove_stored(name) {
        tracing::warn!(name, "removing a snapshot from the fd store: {e}");
    }
}

/// Ends a Firecracker session whose VM is gone or which faultd stops. Firecracker cannot
/// register again, so unless the session is kept (`kept_as`, its fd store name) for the next
/// faultd, its VM's pages in the store have nobody to come back for them. A kept one is
/// handed over when faultd stops (store kept), and forgotten when its VM is gone.
pub(super) async fn end(daemon: &Daemon, live: Live, kept_as: Option<String>) {
    let ending = if kept_as.is_some() && daemon.cancel.is_cancelled() {
        Ending::Handover
    } else {
        Ending::VmGone
    };
    daemon.end_session(live, ending).await;
    if let (Ending::VmGone, Some(name)) = (ending, kept_as) {
        forget(&name);
    }
}

/// Serves again every session the service manager passed back, each on its own task.
/// Their session names are held at once (before this returns), so that no new restore is
/// given one of them.
pub fn resume_all(daemon: &Arc<Daemon>, stored: Vec<(String, OwnedFd)>) {
    let mut by_name: Vec<(String, Vec<OwnedFd>)> = Vec::new();
    let mut snapshots: Vec<(String, Vec<OwnedFd>)> = Vec::new();
    for (name, fd) in stored {
        let into = match snapshot_vm_of(&name) {
            Some(vm) => (&mut snapshots, vm.to_owned()),
            None => (&mut by_name, name),
        };
        match into.0.iter_mut().find(|(n, _)| *n == into.1) {
            Some((_, fds)) => fds.push(fd),
            None => into.0.push((into.1, vec![fd])),
        }
    }
    for (name, fds) in by_name {
        let snapshot = vm_of(&name).and_then(|vm| {
            let at = snapshots.iter().position(|(v, _)| v == vm)?;
            Some(snapshots.swap_remove(at).1)
        });
        if let Some(vm) = vm_of(&name) {
            daemon.firecracker.reserve_name(vm);
        }
        let d = daemon.clone();
        daemon
            .tracker
            .spawn(async move { resume(d, name, fds, snapshot).await });
    }
    // A snapshot whose session is not there (it was never stored, or its VM ended between
    // the two removals) serves nothing.
    for (vm, _) in snapshots {
        forget_snapshot(&snapshot_name_of(&vm));
    }
}

/// The three fds of a kept session, told apart by kind.
struct Parts {
    desc: File,
    uffd: OwnedFd,
    conn: std::os::unix::net::UnixStream,
}

fn sort_out(fds: Vec<OwnedFd>) -> Result<Parts, String> {
    let (mut desc, mut uffd, mut conn) = (None, None, None);
    let n = fds.len();
    for fd in fds {
        let meta = File::from(fd.try_clone().map_err(|e| e.to_string())?)
            .metadata()
            .map_err(|e| e.to_string())?;
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            conn = Some(std::os::unix::net::UnixStream::from(fd));
        } else if meta.is_file() {
            desc = Some(File::from(fd));
        } else {
            uffd = Some(fd);
        }
    }
    match (desc, uffd, conn) {
        (Some(desc), Some(uffd), Some(conn)) if n == 3 => Ok(Parts { desc, uffd, conn }),
        _ => Err(format!(
            "{n} fds, not the memfd, userfaultfd and connection a kept session has"
        )),
    }
}

/// Serves one kept session again, until its VM is gone; then gives back its name.
async fn resume(
    daemon: Arc<Daemon>,
    name: String,
    fds: Vec<OwnedFd>,
    snapshot: Option<Vec<OwnedFd>>,
) {
    resume_one(&daemon, &name, fds, snapshot).await;
    if let Some(vm) = vm_of(&name) {
        daemon.firecracker.unreserve_name(vm);
    }
}

async fn resume_one(
    daemon: &Arc<Daemon>,
    name: &str,
    fds: Vec<OwnedFd>,
    snapshot: Option<Vec<OwnedFd>>,
) {
    let name = name.to_owned();
    // Opening the store and starting the thread block: not on the reactor.
    let d = daemon.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&d, fds, snapshot))
        .await
        .unwrap_or_else(|e| Err(format!("preparing it panicked: {e}").into()));
    let (live, conn, end, vm, held) = match prepared {
        Ok(p) => p,
        Err(NotResumed::Gone(vm, owner)) => {
            // Firecracker exited while faultd was down: its pages have nobody to come back
            // for them (a store opened afresh and dropped removes its files).
            tracing::info!(vm, "a kept Firecracker VM ended while faultd was down");
            drop(crate::engine::store::Store::open(
                &daemon.store_dir_of(owner),
                &vm,
                4096,
                false,
            ));
            forget(&name);
            return;
        }
        Err(NotResumed::Object(vm, owner, why)) => {
            // Its VM runs on, but the version it was restored from cannot be had: its faults
            // stay unanswered rather than be served from another version.
            tracing::error!(
                vm,
                "a kept Firecracker restore from an object is not served again: {why}; its \
                 faults are not answered"
            );
            if let Some(o) = &daemon.objects {
                o.kept_refused
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            drop(crate::engine::store::Store::open(
                &daemon.store_dir_of(owner),
                &vm,
                4096,
                false,
            ));
            forget(&name);
            return;
        }
        Err(NotResumed::Failed(why)) => {
            // Nothing can serve it: drop it from the store rather than fail every start.
            tracing::error!(
                name,
                "a kept Firecracker session cannot be served again: {why}"
            );
            forget(&name);
            return;
        }
    };
    tracing::info!(
        session = live.session.id(),
        vm,
        ends_on = end.describe(),
        "serving a Firecracker restore again after a faultd restart"
    );
    end.wait(conn, &daemon.cancel, &vm).await;
    self::end(daemon, live, Some(name)).await;
    drop(held);
}

/// What a kept session holds of faultd's limits and files while it is served.
struct Held {
    _slot: Option<crate::daemon::RestoreSlot>,
    _admission: crate::daemon::Admission,
    _claims: crate::daemon::Claims,
}

type Resumed = (Live, UnixStream, SessionEnd, String, Held);

/// Why a kept session is not served again.
enum NotResumed {
    /// Its VM (this one, of this owner) ended while faultd was down.
    Gone(String, u32),
    /// Its snapshot object cannot be served again (changed, gone, or no longer allowed):
    /// the VM, its owner, and why.
    Object(String, u32, String),
    /// Something else, said.
    Failed(String),
}

impl From<String> for NotResumed {
    fn from(why: String) -> Self {
        NotResumed::Failed(why)
    }
}

/// Whether Firecracker has gone: it hung up (1.12+ keeps the socket open while the VM runs),
/// or, for older ones that close it at once, its process (`pidfd`) exited.
fn peer_gone(
    conn: &std::os::unix::net::UnixStream,
    form: WireForm,
    pidfd: Option<&OwnedFd>,
) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    // `when`: the events that mean gone (a unix stream whose peer closed polls POLLHUP; a
    // pidfd of an exited process polls readable).
    let polls = |fd: std::os::fd::BorrowedFd<'_>, when: PollFlags| {
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).is_ok()
            && fds[0].revents().is_some_and(|r| r.intersects(when))
    };
    match form {
        WireForm::Current => polls(conn.as_fd(), PollFlags::POLLHUP),
        WireForm::Legacy => {
            pidfd.is_none_or(|p| polls(p.as_fd(), PollFlags::POLLIN | PollFlags::POLLHUP))
        }
    }
}

/// The snapshot fd kept beside a session: one regular file.
fn kept_snapshot(fds: Vec<OwnedFd>) -> Result<(File, u64), String> {
    let n = fds.len();
    let mut fds = fds.into_iter();
    match (fds.next(), n) {
        (Some(fd), 1) => {
            let file = File::from(fd);
            let meta = file
                .metadata()
                .map_err(|e| format!("the kept snapshot fd: {e}"))?;
            if !meta.is_file() {
                return Err("the kept snapshot fd is not a regular file".into());
            }
            Ok((file, meta.len()))
        }
        _ => Err(format!("{n} snapshot fds kept, not one")),
    }
}

fn prepare(
    daemon: &Arc<Daemon>,
    fds: Vec<OwnedFd>,
    snapshot: Option<Vec<OwnedFd>>,
) -> Result<Resumed, NotResumed> {
    let Parts {
        mut desc,
        uffd,
        conn,
    } = sort_out(fds)?;
    let mut json = Vec::new();
    desc.rewind()
        .and_then(|()| (&mut desc).take(MAX_DESCRIPTION + 1).read_to_end(&mut json))
        .map_err(|e| format!("reading the kept description: {e}"))?;
    let kept = parse_kept(&json)?;
    let uffd = check_fds(vec![uffd])?;
    if let Some(object) = &kept.object {
        if snapshot.is_some() {
            return Err("a kept restore from an object has a snapshot fd beside it"
                .to_owned()
                .into());
        }
        let object = object.clone();
        return serve_kept(daemon, kept, uffd, conn, Source::Object(object));
    }
    let (snapshot, len) = match snapshot {
        // The file the listener opened, checked then: whatever is at its path now is not
        // looked at.
        Some(fds) => kept_snapshot(fds)?,
        // Kept by an older faultd, without the fd: reopened by path as the user Firecracker
        // runs as, who was admitted when it connected, so whatever is at the path now is
        // served only if that user could read it itself.
        None => {
            let path = kept.snapshot.as_deref().ok_or_else(|| {
                "the kept description names neither a snapshot file nor an object".to_owned()
            })?;
            let reader =
                nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
                    .map_err(|e| format!("the kept connection's peer: {e}"))?
                    .uid();
            tracing::info!(
                vm = kept.vm,
                snapshot = %path.display(),
                "no snapshot fd kept: reopening the snapshot by path"
            );
            open_snapshot(path, reader).map_err(|e| crate::front::validate::chain(&e))?
        }
    };
    serve_kept(daemon, kept, uffd, conn, Source::File(snapshot, len))
}

/// What a kept session's snapshot is.
enum Source {
    /// The file, and its length.
    File(File, u64),
    /// The object, its version to be pinned again.
    Object(KeptObject),
}

/// Parses a kept description (faultd's own, but read back from a file: a bad one is an error,
/// never a panic).
fn parse_kept(json: &[u8]) -> Result<Kept, String> {
    if json.len() as u64 > MAX_DESCRIPTION {
        return Err(format!(
            "the kept description is longer than {MAX_DESCRIPTION} bytes"
        ));
    }
    let kept: Kept =
        serde_json::from_slice(json).map_err(|e| format!("the kept description: {e}"))?;
    if kept.snapshot.is_some() && kept.object.is_some() {
        return Err("the kept description names both a snapshot file and an object".into());
    }
    Ok(kept)
}

/// Pins `object`'s version again for a restarted faultd: the store's rules as they are now
/// must still let its uid read the key, and the store must still hold the version the restore
/// was served from (same ETag and size). Blocks (a HEAD, on the fetcher's runtime).
fn revive_object(
    daemon: &Daemon,
    object: &KeptObject,
) -> Result<Arc<objstore::ObjectVersion>, String> {
    let service = daemon
        .objects
        .as_ref()
        .ok_or("no object store is configured any more")?;
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|e| format!("no runtime to pin the object's version on: {e}"))?;
    let version = handle
        .block_on(service.open_for(&object.store, &object.key, object.uid))
        .map_err(|e| {
            format!(
                "store {} key {}: {}",
                object.store,
                object.key,
                crate::ops::logging::chain(&e)
            )
        })?;
    same_version(object, version.etag(), version.size())?;
    Ok(version)
}

/// Whether the version the store holds now (`etag`, `size`) is the one `object` was served
/// from.
fn same_version(object: &KeptObject, etag: &str, size: u64) -> Result<(), String> {
    if etag != object.etag || size != object.size {
        return Err(format!(
            "store {} key {} changed while faultd was down (served from ETag {}, {} bytes; \
             the store now holds ETag {etag}, {size} bytes): refusing to mix versions",
            object.store, object.key, object.etag, object.size
        ));
    }
    Ok(())
}

/// Serves a kept session from `source`, unless its VM is gone (or its object cannot be had).
fn serve_kept(
    daemon: &Arc<Daemon>,
    kept: Kept,
    uffd: OwnedFd,
    conn: std::os::unix::net::UnixStream,
    source: Source,
) -> Result<Resumed, NotResumed> {
    let len = match &source {
        Source::File(_, len) => *len,
        // Checked against the size the store gives below.
        Source::Object(o) => o.size,
    };
    let regions = check_regions(&kept.regions, len)?;
    // Firecracker's pidfd: to tell whether it is gone, then to reach its memory.
    let pidfd = peer_pidfd(&conn);
    if peer_gone(&conn, regions.form, pidfd.as_ref().ok()) {
        return Err(NotResumed::Gone(kept.vm, kept.owner));
    }
    // The VM runs: its snapshot object must be the version it was restored from.
    let (snapshot, object) = match source {
        Source::File(file, _) => (Some(file), None),
        Source::Object(o) => {
            let version = revive_object(daemon, &o)
                .map_err(|why| NotResumed::Object(kept.vm.clone(), kept.owner, why))?;
            super::pages_fit_chunks(&regions.layout, &version)?;
            (None, Some(version))
        }
    };
    conn.set_nonblocking(true)
        .map_err(|e| format!("the kept connection: {e}"))?;
    let conn = UnixStream::from_std(conn).map_err(|e| format!("the kept connection: {e}"))?;
    let pid = conn
        .peer_cred()
        .ok()
        .and_then(|c| c.pid())
        .filter(|&p| p > 0);
    let remote = open_remote(pidfd, pid).map_err(|e| format!("Firecracker's memory: {e}"))?;
    let end = match regions.form {
        WireForm::Current => SessionEnd::HangUp,
        WireForm::Legacy => SessionEnd::ProcessExit(
            peer_pidfd(&conn).map_err(|e| format!("watching Firecracker's process: {e}"))?,
        ),
    };
    // One uffd serves one live session; the kept session counts against its owner's limits
    // (never refused by them: its VM runs) and its listener's restores.
    let claims = daemon
        .claim(&super::uffd_file(std::slice::from_ref(&uffd)))
        .map_err(|r| NotResumed::Failed(r.message))?;
    let admission = daemon.admit_kept(kept.owner, regions.layout.total_bytes());
    let slot = kept
        .listener
        .as_deref()
        .map(|l| daemon.firecracker.enter_kept(l));
    let held = Held {
        _slot: slot,
        _admission: admission,
        _claims: claims,
    };
    let validated = crate::front::validate::Validated {
        vm: kept.vm.clone(),
        layout: regions.layout,
        regions: regions.served,
        uffd,
        snapshot,
        object,
    };
    let live = daemon
        .start_session(validated, kept.owner, Opening::Kept, pid, Some(remote))
        .map_err(|r| NotResumed::Failed(r.message))?;
    daemon.admit(
        &live.session,
        &live.thread,
        pid,
        faultd_proto::SessionKind::Firecracker,
    );
    Ok((live, conn, end, kept.vm, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memfd_with(bytes: &[u8]) -> OwnedFd {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::empty()).unwrap();
        let mut f = File::from(fd);
        f.write_all(bytes).unwrap();
        f.into()
    }

    #[test]
    fn a_kept_sessions_fds_are_told_apart_by_kind_in_any_order() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap(); // stands for the uffd: neither file nor socket
        let parts = sort_out(vec![a.into(), memfd_with(b"{}"), r]).unwrap();
        assert!(parts.desc.metadata().unwrap().is_file());
        assert!(parts.conn.peer_addr().is_ok());
        // Too few, or two of a kind, is refused by name.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let err = sort_out(vec![a.into(), memfd_with(b"{}")]).err().unwrap();
        assert!(err.contains("2 fds"), "{err}");
        let err = sort_out(vec![memfd_with(b"1"), memfd_with(b"2"), memfd_with(b"3")])
            .err()
            .unwrap();
        assert!(err.contains("3 fds"), "{err}");
    }

    #[test]
    fn the_kept_description_round_trips_firecrackers_regions_as_sent() {
        let kept = Kept {
            vm: "fc0".into(),
            owner: 1000,
            snapshot: Some("/srv/fc0/mem".into()),
            object: None,
            listener: Some("fc".into()),
            regions: vec![Mapping {
                base_host_virt_addr: 0x7f00_0000_0000,
                size: 1 << 30,
                offset: 0,
                page_size: Some(4096),
                page_size_kib: None,
            }],
        };
        let back: Kept = serde_json::from_slice(&serde_json::to_vec(&kept).unwrap()).unwrap();
        assert_eq!(back.vm, kept.vm);
        assert_eq!(back.owner, kept.owner);
        assert_eq!(back.snapshot, kept.snapshot);
        assert_eq!(back.regions, kept.regions);
        assert_eq!(back.listener, kept.listener);
        // What an older faultd kept has no listener.
        let old = br#"{"vm":"fc0","owner":0,"snapshot":"/m","regions":[]}"#;
        let old = parse_kept(old).unwrap();
        assert_eq!((old.listener, old.object), (None, None));
        assert_eq!(old.snapshot.as_deref(), Some(std::path::Path::new("/m")));
    }

    fn object() -> KeptObject {
        KeptObject {
            store: "rgw".into(),
            key: "tenants/1000/fc/mem".into(),
            etag: "\"abc\"".into(),
            size: 1 << 25,
            uid: 1000,
        }
    }

    #[test]
    fn a_kept_object_restore_round_trips_its_pinned_version() {
        let kept = Kept {
            vm: "fc-1".into(),
            owner: 1000,
            snapshot: None,
            object: Some(object()),
            regions: vec![],
            listener: Some("fc".into()),
        };
        let back = parse_kept(&serde_json::to_vec(&kept).unwrap()).unwrap();
        assert_eq!((back.snapshot, back.object), (None, Some(object())));
    }

    #[test]
    fn a_bad_kept_description_is_an_error_not_a_panic() {
        let both = br#"{"vm":"v","snapshot":"/m","regions":[],"object":{"store":"s","key":"k","etag":"e","size":1,"uid":0}}"#;
        assert!(parse_kept(both).unwrap_err().contains("both"));
        let long = vec![b' '; MAX_DESCRIPTION as usize + 1];
        assert!(parse_kept(&long).unwrap_err().contains("longer"));
        for bad in [
            &b""[..],
            b"{",
            b"[]",
            b"\xff\xfe",
            br#"{"vm":"v","regions":[],"object":{"store":"s","key":"k"}}"#,
            br#"{"vm":"v","regions":[],"object":{"store":"s","key":"k","etag":"e","size":-1,"uid":0}}"#,
            br#"{"vm":"v","regions":[{"size":1}]}"#,
        ] {
            assert!(parse_kept(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_revived_object_is_served_only_at_the_version_it_was_served_from() {
        let o = object();
        assert!(same_version(&o, &o.etag, o.size).is_ok());
        let err = same_version(&o, "\"def\"", o.size).unwrap_err();
        assert!(err.contains("changed while faultd was down"), "{err}");
        assert!(same_version(&o, &o.etag, o.size + 1).is_err());
    }

    #[test]
    fn fd_store_names_tell_a_session_from_its_snapshot() {
        assert_eq!(vm_of(&name_of("fc-3")), Some("fc-3"));
        assert_eq!(snapshot_vm_of(&snapshot_name_of("fc-3")), Some("fc-3"));
        assert_eq!(vm_of(&snapshot_name_of("fc-3")), None);
        assert_eq!(snapshot_vm_of(&name_of("snap-3")), None);
    }
}

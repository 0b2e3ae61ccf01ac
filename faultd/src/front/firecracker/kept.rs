//! Firecracker sessions that outlive a faultd restart, crash included.
//!
//! Firecracker sends its one message once and never connects again, so what faultd needs to
//! serve the VM after a restart is kept by the service manager in its fd store
//! (`FDSTORE=1`, systemd's `FileDescriptorStoreMax=`), under one name per VM
//! (`faultd-fc-<vm>`), as three fds:
//! - a memfd holding [`Kept`]: the VM, its snapshot path and Firecracker's regions as sent;
//! - the userfaultfd;
//! - faultd's end of Firecracker's connection: its hang-up still ends the session, and its
//!   `SO_PEERPIDFD` still names Firecracker.
//!
//! They are stored once the session serves and removed when the VM is gone. At the next
//! start the service manager passes them back (`LISTEN_FDS`, `LISTEN_FDNAMES`), and each VM
//! is served again as a resumed session: pages in Firecracker's memory (in RAM or in swap, by
//! its pagemap) are taken as populated, balloon discards come from the VM's store journal
//! (kept, not removed, when faultd stops), and every thread blocked on a fault the old faultd
//! had read is woken to fault again ([`crate::engine::FaultServer::resume`]).
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
    /// The memory snapshot file.
    pub snapshot: PathBuf,
    /// Firecracker's regions, as it sent them.
    pub regions: Vec<Mapping>,
}

/// The fd store name of `vm`'s kept session.
fn name_of(vm: &str) -> String {
    format!("{}fc-{vm}", systemd::STORED_PREFIX)
}

/// Puts a session that has just started serving in the fd store, if a service manager is
/// there to keep it. Returns the name it is kept under (for [`forget`]); failures are logged:
/// the VM is served, only not across a restart.
pub(super) fn keep(kept: &Kept, uffd: &OwnedFd, conn: &UnixStream) -> Option<String> {
    let name = name_of(&kept.vm);
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

/// Takes a session out of the fd store: its VM is gone.
pub(super) fn forget(name: &str) {
    if let Err(e) = systemd::remove_stored(name) {
        tracing::warn!(name, "removing a session from the fd store: {e}");
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
pub fn resume_all(daemon: &Arc<Daemon>, stored: Vec<(String, OwnedFd)>) {
    let mut by_name: Vec<(String, Vec<OwnedFd>)> = Vec::new();
    for (name, fd) in stored {
        match by_name.iter_mut().find(|(n, _)| *n == name) {
            Some((_, fds)) => fds.push(fd),
            None => by_name.push((name, vec![fd])),
        }
    }
    for (name, fds) in by_name {
        let d = daemon.clone();
        daemon
            .tracker
            .spawn(async move { resume(d, name, fds).await });
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

/// Serves one kept session again, until its VM is gone.
async fn resume(daemon: Arc<Daemon>, name: String, fds: Vec<OwnedFd>) {
    // Opening the store and starting the thread block: not on the reactor.
    let d = daemon.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&d, fds))
        .await
        .unwrap_or_else(|e| Err(format!("preparing it panicked: {e}").into()));
    let (live, conn, end, vm) = match prepared {
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
    self::end(&daemon, live, Some(name)).await;
}

type Resumed = (Live, UnixStream, SessionEnd, String);

/// Why a kept session is not served again.
enum NotResumed {
    /// Its VM (this one, of this owner) ended while faultd was down.
    Gone(String, u32),
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

fn prepare(daemon: &Arc<Daemon>, fds: Vec<OwnedFd>) -> Result<Resumed, NotResumed> {
    let Parts {
        mut desc,
        uffd,
        conn,
    } = sort_out(fds)?;
    let mut json = Vec::new();
    desc.rewind()
        .and_then(|()| desc.read_to_end(&mut json))
        .map_err(|e| format!("reading the kept description: {e}"))?;
    let kept: Kept =
        serde_json::from_slice(&json).map_err(|e| format!("the kept description: {e}"))?;
    let uffd = check_fds(vec![uffd])?;
    // Reopened by path (the fd store keeps no snapshot fd): as the user Firecracker runs as,
    // who was admitted when it connected, so whatever is at the path now is served only if
    // that user could read it itself.
    let reader = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("the kept connection's peer: {e}"))?
        .uid();
    let (snapshot, len) =
        open_snapshot(&kept.snapshot, reader).map_err(|e| crate::front::validate::chain(&e))?;
    let regions = check_regions(&kept.regions, len)?;
    // Firecracker's pidfd: to tell whether it is gone, then to reach its memory.
    let pidfd = peer_pidfd(&conn);
    if peer_gone(&conn, regions.form, pidfd.as_ref().ok()) {
        return Err(NotResumed::Gone(kept.vm, kept.owner));
    }
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
    let validated = crate::front::validate::Validated {
        vm: kept.vm.clone(),
        layout: regions.layout,
        regions: regions.served,
        uffd,
        snapshot: Some(snapshot),
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
    Ok((live, conn, end, kept.vm))
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
            snapshot: "/srv/fc0/mem".into(),
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
    }
}

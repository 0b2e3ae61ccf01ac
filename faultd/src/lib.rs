//! faultd: serves the page faults of VMs whose guest RAM is not pinned.
//!
//! In layers, lowest first; a layer uses only itself and the layers below it
//! (`faultd/tests/layers.rs` checks):
//! - [`ops`]: configuration ([`config`]), Prometheus metrics ([`metrics`]), what the service
//!   manager sees: socket activation, readiness and the watchdog ([`systemd`]), logging;
//! - [`kernel`]: the userfaultfd operations and another process's memory;
//! - [`engine`]: one VM's fault thread: vCPU faults ([`engine::FaultServer`]), device page
//!   requests ([`engine::device`]), eviction, budgets, restart-resume;
//! - [`daemon`]: the registry of live sessions that every front door shares;
//! - [`front`]: the control socket ([`control`]) and the validation of what VMMs hand over
//!   ([`front::validate`]), the operator's admin requests, Firecracker's page-fault handler
//!   protocol ([`firecracker`]);
//! - and above them all, this wiring and the `faultd ctl` client commands ([`ctl`]).
//!
//! The stage-2 state itself is the `s2map` crate; the wire format is `faultd-proto`.
//! `main.rs` only parses arguments and calls [`run`].

pub mod ctl;
pub mod daemon;
pub mod engine;
pub mod front;
pub mod kernel;
pub mod ops;

use front::{control, firecracker};
use ops::{config, metrics, systemd};

use std::io;
use std::path::Path;
use std::sync::Arc;

use tokio_seqpacket::UnixSeqpacketListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, ConfigError, Overrides};

/// Failure to start or run the daemon, named for the step.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The tokio runtime could not be built.
    #[error("building the async runtime")]
    Runtime(#[source] io::Error),
    /// The socket directory could not be created.
    #[error("creating socket directory {path}")]
    SocketDir {
        /// Directory.
        path: String,
        #[source]
        source: io::Error,
    },
    /// Another faultd answers on the socket.
    #[error("another faultd is already serving {path}")]
    AlreadyRunning {
        /// Socket path.
        path: String,
    },
    /// Binding the socket failed.
    #[error("binding control socket {path}")]
    Bind {
        /// Socket path.
        path: String,
        #[source]
        source: io::Error,
    },
    /// Installing signal handlers failed.
    #[error("installing signal handlers")]
    Signals(#[source] io::Error),
    /// The socket the service manager passed cannot be used.
    #[error("socket activation")]
    Activation(#[source] systemd::ActivationError),
    /// Binding the metrics endpoint failed.
    #[error("binding the metrics endpoint {addr}")]
    MetricsBind {
        /// metrics.listen.
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    /// A `[[firecracker]]` config entry could not be listened on.
    #[error("listening for Firecracker VM {vm}")]
    FirecrackerListen {
        /// The entry's VM.
        vm: String,
        #[source]
        source: firecracker::ListenError,
    },
}

/// Installs the no-op handler of [`engine::session::WATCHDOG_SIGNAL`], without SA_RESTART, so the
/// signal makes a blocked system call fail with EINTR instead of killing faultd or being
/// ignored.
fn install_watchdog_handler() -> io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet};
    extern "C" fn interrupt(_: libc::c_int) {}
    let action = SigAction::new(
        SigHandler::Handler(interrupt),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler does nothing, so it is async-signal-safe; replacing SIGURG's
    // default (ignore) affects only faultd, which sends the signal only to its own threads.
    unsafe { sigaction(engine::session::WATCHDOG_SIGNAL, &action) }.map_err(io::Error::from)?;
    Ok(())
}

/// Binds the control socket at `path`: creates its directory, replaces a stale socket file left
/// by a dead faultd, and refuses to steal the socket of a live one.
pub fn bind(path: &Path) -> Result<UnixSeqpacketListener, RunError> {
    let shown = path.display().to_string();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| RunError::SocketDir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    if path.exists() {
        if faultd_client_probe(path) {
            return Err(RunError::AlreadyRunning { path: shown });
        }
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixSeqpacketListener::bind(path).map_err(|source| RunError::Bind {
        path: shown.clone(),
        source,
    })?;
    // VMMs run as root or in the socket's group; nobody else may register guests.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(|source| {
        RunError::Bind {
            path: shown,
            source,
        }
    })?;
    Ok(listener)
}

/// Whether something accepts connections at `path` (a live daemon).
fn faultd_client_probe(path: &Path) -> bool {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let Ok(sock) = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return false;
    };
    UnixAddr::new(path).is_ok_and(|addr| connect(sock.as_raw_fd(), &addr).is_ok())
}

/// Time allowed at shutdown beyond the device deadline (see [`run`]).
const SHUTDOWN_SLACK: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the daemon until SIGTERM or SIGINT.
///
/// Shutdown: new connections are no longer accepted; every session finishes the device
/// groups and faults outstanding for up to `device.deadline_ms`, answers what is left
/// INVALID, unmaps its devices, and keeps its VM's store for the VMM to resume with the next
/// faultd; then faultd exits 0, within the device deadline plus two seconds.
///
/// The control socket is the one the service manager passed (socket activation), else
/// `config.socket`, bound here. Readiness (`READY=1`) is sent once the control socket and the
/// metrics endpoint are being served; the watchdog keep-alive runs when the service manager
/// asks for one (see [`systemd`]).
pub fn run(config: Config) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("faultd-ctl")
        .build()
        .map_err(RunError::Runtime)?;
    install_watchdog_handler().map_err(RunError::Signals)?;
    runtime.block_on(async {
        // A socket we bound is ours to remove at exit; an inherited one belongs to the
        // service manager, which keeps it open (and queues VMMs on it) across our restarts.
        let inherited = systemd::inherited().map_err(RunError::Activation)?;
        let stored = inherited.stored;
        let (listener, bound) =
            match systemd::inherited_listener(inherited.control).map_err(RunError::Activation)? {
                Some(l) => {
                    tracing::info!("serving the control socket passed by the service manager");
                    (l, None)
                }
                None => (bind(&config.socket)?, Some(config.socket.clone())),
            };
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| RunError::MetricsBind { addr, source })?,
            ),
            None => None,
        };
        let cancel = CancellationToken::new();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(RunError::Signals)?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(RunError::Signals)?;
        if let Some(socket) = &bound {
            tracing::info!(socket = %socket.display(), "faultd serving");
        }
        let static_listens = config.firecracker.clone();
        // At shutdown each session finishes its outstanding work for up to the device
        // deadline; joining and flushing get a little more.
        let shutdown_bound = config.device_deadline + SHUTDOWN_SLACK;
        let daemon = daemon::Daemon::new(config, cancel.clone());
        // Firecracker sessions a previous faultd kept in the service manager's fd store: their
        // names are held before any listener could give one to a new restore.
        if !stored.is_empty() {
            firecracker::resume_kept(&daemon, stored);
        }
        for spec in static_listens {
            let vm = spec.vm.clone();
            if let Err(source) = firecracker::listen(&daemon, spec).await {
                cancel.cancel();
                daemon.tracker.close();
                daemon.tracker.wait().await;
                if let Some(socket) = &bound {
                    let _ = std::fs::remove_file(socket);
                }
                return Err(RunError::FirecrackerListen { vm, source });
            }
        }
        // Listeners added at run time before a restart (after the config's, which win).
        firecracker::relisten_kept(&daemon).await;
        let tasks = tokio_util::task::TaskTracker::new();
        tasks.spawn(control::serve(listener, daemon.clone()));
        if let Some(listener) = metrics_listener {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!("metrics served at http://{addr}/metrics");
            }
            let d = daemon.clone();
            let render = Arc::new(move || d.render_metrics());
            tasks.spawn(metrics::serve_http(listener, render, cancel.clone()));
        }
        if let Some(timeout) = systemd::watchdog_timeout() {
            tracing::info!(
                ?timeout,
                "watchdog keep-alive while fault service progresses"
            );
            let d = daemon.clone();
            let sessions = Arc::new(move || {
                d.live_sessions()
                    .iter()
                    .map(|s| (s.id(), s.watch.beat(), s.watch.source_ready()))
                    .collect()
            });
            tasks.spawn(systemd::keep_alive(timeout, sessions, cancel.clone()));
        }
        systemd::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("serving"),
        ]);
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        systemd::notify(&[sd_notify::NotifyState::Stopping]);
        let stopping = std::time::Instant::now();
        cancel.cancel();
        tasks.close();
        if tokio::time::timeout(shutdown_bound, tasks.wait())
            .await
            .is_err()
        {
            // A session thread is stuck (its VMM blocks a call the watchdog could not cut
            // short). Exit anyway: the stores are consistent at every instant (see engine/store.rs),
            // and the VMMs resume with the next faultd.
            tracing::error!(
                ?shutdown_bound,
                "sessions did not end in time; exiting anyway"
            );
        }
        tracing::info!(
            took_ms = stopping.elapsed().as_millis() as u64,
            "stopped: device groups answered, stores kept for the VMMs to resume"
        );
        if let Some(socket) = bound {
            let _ = std::fs::remove_file(socket);
        }
        Ok(())
    })
}

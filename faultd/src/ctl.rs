//! `faultd ctl ...`: requests to a running faultd from the command line, through its control
//! socket (the same protocol any client speaks, `faultd-client`'s side of it).

use std::path::{Path, PathBuf};

use faultd_client::{Client, ClientError, FirecrackerListen};

/// A request to a running faultd.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// Serve Firecracker snapshot restores of a VM: faultd creates the socket BACKEND_PATH (give
    /// Firecracker the same path as the Uffd mem_backend's backend_path) and fills pages from
    /// SNAPSHOT.
    FirecrackerListen {
        /// VM name for logs and stats.
        #[arg(long)]
        vm: String,
        /// The socket faultd creates and Firecracker connects to (relative paths are taken from
        /// this command's directory).
        #[arg(long = "backend-path", value_name = "BACKEND_PATH")]
        socket: PathBuf,
        /// The memory snapshot file.
        #[arg(long)]
        snapshot: PathBuf,
        /// Admit only processes of this uid (the socket is handed to it).
        #[arg(long)]
        uid: Option<u32>,
        /// Admit only this process.
        #[arg(long)]
        pid: Option<i32>,
    },
    /// Print the counters of a VM's live sessions as JSON (an empty list if none).
    Stats {
        /// VM name.
        #[arg(long)]
        vm: String,
    },
}

/// A `faultd ctl` command that failed, named for the step.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// A path could not be made absolute.
    #[error("resolving path {path}")]
    Path {
        /// The path given.
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Talking to faultd failed, or faultd refused.
    #[error("asking faultd at {socket}")]
    Request {
        /// Control socket.
        socket: String,
        #[source]
        source: ClientError,
    },
}

/// Sends `cmd` to the faultd at `control`; what to print on success.
pub fn run(control: &Path, cmd: CtlCommand) -> Result<String, CtlError> {
    let asking = |source| CtlError::Request {
        socket: control.display().to_string(),
        source,
    };
    let client = Client::connect(control).map_err(asking)?;
    match cmd {
        CtlCommand::FirecrackerListen {
            vm,
            socket,
            snapshot,
            uid,
            pid,
        } => {
            // faultd runs elsewhere: relative paths mean this command's directory.
            let socket = absolute(socket)?;
            let snapshot = absolute(snapshot)?;
            let shown = format!(
                "faultd listens for Firecracker VM {vm} on {}",
                socket.display()
            );
            client
                .firecracker_listen(FirecrackerListen {
                    vm,
                    socket,
                    snapshot,
                    uid,
                    pid,
                })
                .map_err(asking)?;
            Ok(shown)
        }
        CtlCommand::Stats { vm } => {
            let sessions = client.vm_stats(&vm).map_err(asking)?;
            // SessionStats is plain data; serialising it cannot fail.
            Ok(serde_json::to_string_pretty(&sessions).expect("stats serialise to JSON"))
        }
    }
}

fn absolute(path: PathBuf) -> Result<PathBuf, CtlError> {
    std::path::absolute(&path).map_err(|source| CtlError::Path {
        path: path.display().to_string(),
        source,
    })
}

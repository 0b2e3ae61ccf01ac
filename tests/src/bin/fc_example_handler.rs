//! `fc-example-handler SOCKET SNAPSHOT`: the Firecracker restore benchmark's baseline as a
//! process of its own (see `faultd_tests::fc_example`). Prints `listening` once SOCKET is
//! bound, serves the first restore that connects until its socket hangs up, then prints
//! `copied N` and exits.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [socket, snapshot] = args.as_slice() else {
        eprintln!("usage: fc-example-handler SOCKET SNAPSHOT");
        return ExitCode::from(2);
    };
    let listener = match UnixListener::bind(socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fc-example-handler: binding {}: {e}", socket.display());
            return ExitCode::FAILURE;
        }
    };
    println!("listening");
    match faultd_tests::fc_example::serve_process(&listener, snapshot) {
        Ok(stats) => {
            println!("copied {}", stats.copied);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fc-example-handler: {e}");
            ExitCode::FAILURE
        }
    }
}

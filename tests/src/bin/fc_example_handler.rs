//! `fc-example-handler [--idle-threads N] SOCKET SNAPSHOT`: the Firecracker restore benchmark's
//! baseline as a process of its own (see `faultd_tests::fc_example`). Prints `listening` once
//! SOCKET is bound, serves the first restore that connects until its socket hangs up, then
//! prints `copied N` and exits.
//!
//! `--idle-threads N` starts N threads that only sleep before it listens: the same loop in a
//! process with as many threads as a daemon has, which the benchmark uses to tell the cost of
//! living in a multi-threaded process from the cost of faultd's own code.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let usage = || {
        eprintln!("usage: fc-example-handler [--idle-threads N] SOCKET SNAPSHOT");
        ExitCode::from(2)
    };
    let mut args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let mut idle_threads = 0usize;
    if args
        .first()
        .is_some_and(|a| a.as_os_str() == "--idle-threads")
    {
        match args.get(1).and_then(|n| n.to_str()?.parse().ok()) {
            Some(n) => idle_threads = n,
            None => return usage(),
        }
        args.drain(..2);
    }
    let [socket, snapshot] = args.as_slice() else {
        return usage();
    };
    for _ in 0..idle_threads {
        // Parked for good: they exist, as a daemon's other threads do, and never run.
        std::thread::spawn(|| loop {
            std::thread::park();
        });
    }
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

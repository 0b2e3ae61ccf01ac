//! faultd: parse arguments, load config, run. Everything else is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Serves the page faults of VMs whose guest RAM is not pinned.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Without a command: run the daemon.
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file (TOML), read over the embedded default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Control socket path (overrides control.socket).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Adaptive polling window in microseconds (overrides fault.spin_us).
    #[arg(long)]
    spin_us: Option<u64>,
    /// Swap store directory (overrides store.dir).
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// Log filter (overrides log.filter), e.g. "debug".
    #[arg(long)]
    log: Option<String>,
    /// Metrics endpoint, loopback IP:PORT, "" for none (overrides metrics.listen).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Print the effective configuration and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a request to a running faultd (its control socket: --socket, or the config's).
    Ctl {
        /// Print the answer as JSON (the protocol's field names) instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        request: faultd::ctl::CtlCommand,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let overrides = faultd::Overrides {
        socket: args.socket,
        spin_us: args.spin_us,
        log_filter: args.log,
        store_dir: args.store_dir,
        metrics_listen: args.metrics_listen,
    };
    let config = match faultd::Config::load(args.config.as_deref(), &overrides) {
        Ok(c) => c,
        Err(e) => return fail(&e, 2),
    };
    if let Some(Command::Ctl { json, request }) = args.command {
        let output = if json {
            faultd::ctl::Output::Json
        } else {
            faultd::ctl::Output::Table
        };
        return match faultd::ctl::run(&config.socket, request, output) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e, e.exit_code()),
        };
    }
    if args.check_config {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    faultd::ops::logging::init(&config.log_filter);
    match faultd::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, 1),
    }
}

/// Prints the error with its cause chain and returns `code`.
fn fail(e: &dyn std::error::Error, code: u8) -> ExitCode {
    eprint!("faultd: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        eprint!(": {s}");
        src = s.source();
    }
    eprintln!();
    ExitCode::from(code)
}

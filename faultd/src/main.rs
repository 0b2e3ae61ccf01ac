//! faultd: parse arguments, load config, run. Everything else is in the library.

use std::io::Write as _;
#[cfg(test)]
use std::path::Path;
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
    // Global flags share one name space with every command's arguments (clap propagates them
    // by id): ids of their own keep a command's `socket` field (firecracker-listen's
    // --backend-path) from being taken for the control socket.
    #[arg(long, global = true, id = "global_config", value_name = "CONFIG")]
    config: Option<PathBuf>,
    /// Control socket path (overrides control.socket).
    #[arg(long, global = true, id = "global_socket", value_name = "SOCKET")]
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
    /// Print the effective configuration as TOML (a file --config takes back) and exit.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send a request to a running faultd (its control socket: --socket, or the config's).
    #[command(after_help = faultd::ctl::exit_status_help())]
    Ctl(faultd::ctl::CtlArgs),
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
        Err(e) => return fail(&e, faultd::ctl::EXIT_USAGE),
    };
    if let Some(Command::Ctl(ctl)) = args.command {
        return match faultd::ctl::run(&config.socket, ctl) {
            Ok(out) => print(&out),
            Err(e) => fail(&e, e.exit_code()),
        };
    }
    if args.check_config {
        return match config.to_toml() {
            Ok(toml) => print(&toml),
            Err(e) => {
                let what = format!("printing the configuration as TOML: {e}");
                fail(&std::io::Error::other(what), 1)
            }
        };
    }
    faultd::ops::logging::init(&config.log_filter);
    match faultd::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, 1),
    }
}

/// Prints `text` and a newline on stdout. A reader that went away (`faultd ctl sessions |
/// head`) has what it wanted: that ends quietly with success, as ripgrep does, instead of the
/// panic `println!` makes of EPIPE (Rust ignores SIGPIPE, so a write gets EPIPE).
fn print(text: &str) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&e, 1),
    }
}

/// Prints the error with its cause chain on stderr (a closed stderr is not worth a panic) and
/// returns `code`.
fn fail(e: &dyn std::error::Error, code: u8) -> ExitCode {
    let mut line = format!("faultd: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        line.push_str(&format!(": {s}"));
        src = s.source();
    }
    let _ = writeln!(std::io::stderr(), "{line}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arguments_are_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn a_commands_own_socket_argument_is_not_the_control_socket() {
        let args = Args::try_parse_from([
            "faultd",
            "ctl",
            "--socket",
            "/run/c.sock",
            "firecracker-listen",
            "--vm",
            "fc0",
            "--backend-path",
            "/run/fc.sock",
            "--snapshot",
            "/srv/mem",
        ])
        .unwrap();
        assert_eq!(args.socket, Some(PathBuf::from("/run/c.sock")));
        let Some(Command::Ctl(ctl)) = args.command else {
            panic!("not ctl: {:?}", args.command);
        };
        assert!(matches!(
            ctl.request,
            faultd::ctl::CtlCommand::FirecrackerListen { socket, .. }
                if socket == Path::new("/run/fc.sock")
        ));
    }
}

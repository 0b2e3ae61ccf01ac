//! Logging set-up: `tracing` to stderr, in the form the reader of stderr wants.
//!
//! Under systemd, stderr is a stream into the journal (`JOURNAL_STREAM` names it): the journal
//! timestamps every line itself and shows colour codes as garbage, so lines carry neither, and
//! each starts with its syslog priority (`<3>` ... `<7>`, sd-daemon(3)), which the journal
//! stores as the entry's PRIORITY: `journalctl -p warning -u faultd` then works. On a terminal,
//! lines are coloured; written to a file or pipe, they are plain. Only events worth a line are
//! logged: sessions, devices, refusals, failures; never one per fault (the metrics count those).

use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Installs the global subscriber with `filter` (an `EnvFilter` directive, e.g. "info").
pub fn init(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::new(filter);
    if stderr_is_journal() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(Journal(Format::default().without_time().with_level(false)))
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .init();
    }
}

/// Whether stderr is the journal stream systemd connected (`JOURNAL_STREAM=<dev>:<inode>`
/// matching stderr's), not merely inherited from a parent that had one.
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    dev.parse::<u64>().is_ok_and(|d| d == st.st_dev)
        && ino.parse::<u64>().is_ok_and(|i| i == st.st_ino)
}

/// The syslog priority prefix of a level (sd-daemon(3)).
pub fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        Level::DEBUG | Level::TRACE => "<7>",
    }
}

/// The default format, prefixed with the event's priority.
struct Journal(Format<Full, ()>);

impl<S, N> FormatEvent<S, N> for Journal
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        writer.write_str(priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// An error with its sources, for messages sent to clients.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priorities_follow_sd_daemon() {
        assert_eq!(priority(&Level::ERROR), "<3>");
        assert_eq!(priority(&Level::WARN), "<4>");
        assert_eq!(priority(&Level::INFO), "<6>");
        assert_eq!(priority(&Level::DEBUG), "<7>");
    }
}

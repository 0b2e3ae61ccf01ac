//! Operations: configuration (plain data), metrics, the service manager (systemd) and logging.
//! Imports nothing else of the crate, so every layer above may use it.

pub mod config;
pub mod logging;
pub mod metrics;
pub mod systemd;

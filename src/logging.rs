//! The process's log: `tracing-subscriber` in the format of `log.format` (text or JSON),
//! at the level of `RUST_LOG` (default `info`), on stderr.
//!
//! Pingora logs through the `log` crate. Its records are forwarded here as events with
//! target `pingora` (the module in a `module` field), with one change: the errors a client
//! causes (it closed its connection, reset it, or timed out: pingora's "Fail to proxy:
//! Downstream ...") go to DEBUG, not ERROR, because one ERROR line per client that
//! disconnects buries the errors that matter; so does a harmless race in pingora's
//! connection pool (`level_of`). hagate counts requests in its own metrics.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber and the `log` bridge. Call once, first thing.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let max = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => tracing::subscriber::set_global_default(
            builder
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .finish(),
        ),
        LogFormat::Json => tracing::subscriber::set_global_default(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        ),
    };
    if installed.is_ok() && log::set_logger(&BRIDGE).is_ok() {
        // Pingora's `debug!` calls on the request path cost one comparison when they are
        // off (the `log` crate checks this static first).
        log::set_max_level(log_level(max));
    }
}

fn log_level(max: LevelFilter) -> log::LevelFilter {
    match max.into_level() {
        None => log::LevelFilter::Off,
        Some(tracing::Level::ERROR) => log::LevelFilter::Error,
        Some(tracing::Level::WARN) => log::LevelFilter::Warn,
        Some(tracing::Level::INFO) => log::LevelFilter::Info,
        Some(tracing::Level::DEBUG) => log::LevelFilter::Debug,
        Some(tracing::Level::TRACE) => log::LevelFilter::Trace,
    }
}

/// Forwards `log` records (pingora's) to `tracing`.
struct Bridge;

static BRIDGE: Bridge = Bridge;

/// The level a `log` record is logged at: a client's own trouble is not an ERROR, and
/// neither is a race inside pingora's connection pool that costs nothing (an idle upstream
/// connection still watched when a request wants it: the request connects afresh).
pub fn level_of(record_level: log::Level, message: &str) -> log::Level {
    let harmless = message.starts_with("Fail to proxy: Downstream ")
        || message.starts_with("Downstream handshake ")
        || message == "failed to acquire reusable stream";
    if record_level <= log::Level::Warn && harmless {
        log::Level::Debug
    } else {
        record_level
    }
}

impl log::Log for Bridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let message = record.args().to_string();
        let module = record.target();
        match level_of(record.level(), &message) {
            log::Level::Error => tracing::error!(target: "pingora", module, "{message}"),
            log::Level::Warn => tracing::warn!(target: "pingora", module, "{message}"),
            log::Level::Info => tracing::info!(target: "pingora", module, "{message}"),
            log::Level::Debug => tracing::debug!(target: "pingora", module, "{message}"),
            log::Level::Trace => tracing::trace!(target: "pingora", module, "{message}"),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clients_disconnect_is_not_an_error() {
        let closed = "Fail to proxy: Downstream ConnectionClosed context: Peer closed, status: 0";
        assert_eq!(level_of(log::Level::Error, closed), log::Level::Debug);
        let handshake = "Downstream handshake error from 127.0.0.1:5: reset";
        assert_eq!(level_of(log::Level::Error, handshake), log::Level::Debug);
        let upstream = "Fail to proxy: Upstream ConnectRefused context: ..., status: 502";
        assert_eq!(level_of(log::Level::Error, upstream), log::Level::Error);
        assert_eq!(level_of(log::Level::Info, closed), log::Level::Info);
        let pool = "failed to acquire reusable stream";
        assert_eq!(level_of(log::Level::Error, pool), log::Level::Debug);
        // a client cannot demote an upstream error by naming "Downstream" in its path
        let sneaky = "Fail to proxy: Upstream ReadError, GET /Downstream%20x, status: 502";
        assert_eq!(level_of(log::Level::Error, sneaky), log::Level::Error);
    }
}

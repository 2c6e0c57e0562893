//! Process logging: `tracing` to standard error, filtered by `SLUICE_LOG`
//! (default `info`), changeable at run time through the admin API.

use std::sync::Arc;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

use crate::admin::LogControl;

/// Installs the global subscriber; `None` when one is already installed
/// (tests that start several servers in one process).
pub fn init() -> Option<LogControl> {
    let initial = std::env::var("SLUICE_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&initial).unwrap_or_else(|_| EnvFilter::new("info"));
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .try_init()
        .ok()?;
    let control: LogControl = Arc::new(move |spec: &str| {
        let f = EnvFilter::try_new(spec).map_err(|e| format!("invalid log filter `{spec}`: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    });
    Some(control)
}

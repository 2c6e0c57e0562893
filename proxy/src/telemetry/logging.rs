//! Process logging: `tracing` to standard error, filtered by `SLUICE_LOG`
//! (default `info`), changeable at run time through the admin API
//! (`POST /logging?level=…`). Colour only when standard error is a
//! terminal: a log file or a pipe gets plain text.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

type Setter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// Reads and changes the process's log filter; made by [`init`].
#[derive(Clone)]
pub struct LogControl {
    set: Arc<Setter>,
    current: Arc<Mutex<String>>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl").field("current", &self.current()).finish()
    }
}

impl LogControl {
    /// A control over any filter: `set` installs a filter or says why not.
    pub fn new(initial: &str, set: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) -> Self {
        Self {
            set: Arc::new(set),
            current: Arc::new(Mutex::new(initial.to_owned())),
        }
    }

    /// Installs `spec` (any `tracing` filter: `debug`, `sluice=trace,info`).
    pub fn set(&self, spec: &str) -> Result<(), String> {
        (self.set)(spec)?;
        *self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = spec.to_owned();
        Ok(())
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Installs the global subscriber; `None` when one is already installed
/// (tests that start several servers in one process).
pub fn init() -> Option<LogControl> {
    let requested = std::env::var("SLUICE_LOG").unwrap_or_else(|_| "info".to_owned());
    let (filter, initial) = match EnvFilter::try_new(&requested) {
        Ok(f) => (f, requested),
        Err(_) => (EnvFilter::new("info"), "info".to_owned()),
    };
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false),
        )
        .try_init()
        .ok()?;
    Some(LogControl::new(&initial, move |spec: &str| {
        let f = EnvFilter::try_new(spec).map_err(|e| format!("invalid log filter `{spec}`: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    }))
}

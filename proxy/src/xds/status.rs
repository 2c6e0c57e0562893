//! What the admin API shows of the xDS client: the server it talks to,
//! what was accepted, and the last refusal with its reason.

use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, Default)]
pub struct XdsStatus {
    inner: Mutex<State>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct State {
    /// The server of the current or last attempt.
    pub server: Option<String>,
    pub connected: bool,
    /// Streams opened since the start.
    pub streams: u64,
    /// Updates applied and ACKed.
    pub applied: u64,
    /// Updates refused and NACKed.
    pub rejected: u64,
    /// Per type: the version accepted (State of the World; empty in
    /// Delta) and how many resources.
    pub accepted: Vec<Accepted>,
    /// Why the last refused update was refused.
    pub last_rejection: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Accepted {
    pub type_url: String,
    pub version: String,
    pub resources: usize,
}

impl XdsStatus {
    fn with(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }

    pub fn state(&self) -> State {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(super) fn connecting(&self, server: &str) {
        self.with(|s| {
            s.server = Some(server.to_owned());
            s.connected = false;
        });
    }

    pub(super) fn connected(&self, server: &str) {
        self.with(|s| {
            s.server = Some(server.to_owned());
            s.connected = true;
            s.streams += 1;
        });
        metrics::counter!("sluice_xds_streams_total").increment(1);
        metrics::gauge!("sluice_xds_connected").set(1.0);
    }

    pub(super) fn disconnected(&self, _server: &str) {
        self.with(|s| s.connected = false);
        metrics::gauge!("sluice_xds_connected").set(0.0);
    }

    pub(super) fn applied(&self, accepted: &[(&'static str, String, usize)]) {
        self.with(|s| {
            s.applied += 1;
            s.accepted = accepted
                .iter()
                .map(|(u, v, n)| Accepted {
                    type_url: (*u).to_owned(),
                    version: v.clone(),
                    resources: *n,
                })
                .collect();
        });
        metrics::counter!("sluice_xds_updates_total", "outcome" => "applied").increment(1);
    }

    pub(super) fn rejected(&self, why: &str) {
        self.with(|s| {
            s.rejected += 1;
            s.last_rejection = Some(why.to_owned());
        });
        metrics::counter!("sluice_xds_updates_total", "outcome" => "rejected").increment(1);
    }
}

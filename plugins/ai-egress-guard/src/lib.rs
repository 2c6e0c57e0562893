//! `ai-egress-guard`: only workloads labelled for AI may reach the LLM
//! providers, and each may open at most a budget of new connections to
//! them per minute.
//!
//! Configuration (JSON):
//!
//! ```json
//! {"providers": "llm-providers", "ai_groups": ["ai-workloads"], "per_minute": 60}
//! ```
//!
//! - a flow to a name in WebGroup `providers` from a source in none of the
//!   SmartGroups `ai_groups` is denied (`why: not labelled for AI`);
//! - from a source in one of them, the flow is counted against the
//!   source address's budget for the current clock minute, kept in shared
//!   data (one key per source address, its count restarting each minute)
//!   so every instance (one per worker) counts together; past `per_minute`
//!   it is denied (`why: budget exhausted`); the record notes
//!   `budget.used`;
//! - every other flow is left to the policy.

use serde::Deserialize;
use sluice_sdk::proxy_wasm::traits::Context;
use sluice_sdk::{add_in_window, connection_policy, now, unix_seconds, ConnectionPolicy, Flow, Notes, Verdict};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Guard {
    providers: String,
    ai_groups: Vec<String>,
    per_minute: u64,
}

impl ConnectionPolicy for Guard {
    fn configure(&mut self, config: &[u8]) -> Result<(), String> {
        *self = serde_json::from_slice(config).map_err(|e| format!("ai-egress-guard configuration: {e}"))?;
        if self.providers.is_empty() || self.ai_groups.is_empty() {
            return Err("ai-egress-guard configuration: `providers` and `ai_groups` must name groups".into());
        }
        Ok(())
    }

    fn decide(&mut self, flow: &Flow, notes: &mut Notes, ctx: &dyn Context) -> Verdict {
        if !flow.in_webgroup(&self.providers) {
            return Verdict::Abstain;
        }
        if !self.ai_groups.iter().any(|g| flow.in_smartgroup(g)) {
            notes.add("why", "not labelled for AI");
            return Verdict::Deny;
        }
        // One key per source address, its count restarting each minute.
        let minute = unix_seconds(now(ctx)) / 60;
        let key = format!("ai-egress-guard/{}", flow.source_ip());
        let Some(used) = add_in_window(ctx, &key, minute, 1) else {
            notes.add("why", "budget could not be counted");
            return Verdict::Deny;
        };
        notes.add("budget.used", used.to_string());
        if used > self.per_minute {
            notes.add("why", "budget exhausted");
            return Verdict::Deny;
        }
        Verdict::Abstain
    }
}

connection_policy!(Guard);

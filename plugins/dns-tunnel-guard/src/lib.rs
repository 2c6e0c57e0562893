//! `dns-tunnel-guard`: deny DNS queries that look like a tunnel — a label
//! longer than a limit, or a long label whose characters are close to
//! random (high Shannon entropy), as encoded data is.
//!
//! Configuration (JSON), every field optional:
//!
//! ```json
//! {"max_label": 40, "entropy_over": 3.8, "entropy_min_len": 20}
//! ```
//!
//! Declare it on a `dns` listener (`listeners: [dns]`): a DNS listener
//! presents each query to the plugin as a flow of protocol `dns`. The
//! record of a denied query has reason `plugin-denied` and the plugin's
//! name as its rule; the client gets the listener's `deny_answer`.

use serde::Deserialize;
use sluice_sdk::proxy_wasm::traits::Context;
use sluice_sdk::{connection_policy, ConnectionPolicy, Flow, Notes, Verdict};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Guard {
    max_label: usize,
    entropy_over: f64,
    entropy_min_len: usize,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            max_label: 40,
            entropy_over: 3.8,
            entropy_min_len: 20,
        }
    }
}

/// Shannon entropy of `s` in bits per character.
fn entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

impl Guard {
    /// Why `name` looks like a tunnel, if it does.
    fn suspicious(&self, name: &str) -> Option<String> {
        for label in name.split('.') {
            if label.len() > self.max_label {
                return Some(format!("label of {} characters", label.len()));
            }
            if label.len() >= self.entropy_min_len {
                let e = entropy(label);
                if e > self.entropy_over {
                    return Some(format!("label entropy {e:.2} bits per character"));
                }
            }
        }
        None
    }
}

impl ConnectionPolicy for Guard {
    fn configure(&mut self, config: &[u8]) -> Result<(), String> {
        *self = if config.is_empty() {
            Guard::default()
        } else {
            serde_json::from_slice(config).map_err(|e| format!("dns-tunnel-guard configuration: {e}"))?
        };
        if self.max_label == 0 || self.entropy_over <= 0.0 || self.entropy_min_len == 0 {
            return Err("dns-tunnel-guard configuration: limits must be positive".into());
        }
        Ok(())
    }

    fn decide(&mut self, flow: &Flow, notes: &mut Notes, _ctx: &dyn Context) -> Verdict {
        if flow.protocol != "dns" {
            return Verdict::Abstain;
        }
        match flow.host.as_deref().and_then(|h| self.suspicious(h)) {
            Some(why) => {
                notes.add("why", why);
                Verdict::Deny
            }
            None => Verdict::Abstain,
        }
    }
}

connection_policy!(Guard);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_or_random_labels_are_suspicious() {
        let g = Guard::default();
        assert_eq!(g.suspicious("www.example.com"), None);
        assert_eq!(g.suspicious("login.microsoftonline.com"), None);
        assert!(g.suspicious(&format!("{}.t.example", "a".repeat(41))).is_some());
        assert!(g.suspicious("mzxw6ytboi4dgnzqgq2tmobzha3tkmrs.t.example").is_some());
        assert!(entropy("aaaa") < 0.01);
    }
}

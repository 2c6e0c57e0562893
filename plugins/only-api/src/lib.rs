use sluice_sdk::proxy_wasm::traits::Context;
use sluice_sdk::{connection_policy, ConnectionPolicy, Flow, Notes, Verdict};

#[derive(Default)]
struct OnlyApi {
    prefix: String,
}

impl ConnectionPolicy for OnlyApi {
    fn configure(&mut self, config: &[u8]) -> Result<(), String> {
        self.prefix = String::from_utf8(config.to_vec()).map_err(|_| "the prefix is not UTF-8")?;
        Ok(())
    }

    fn decide(&mut self, flow: &Flow, notes: &mut Notes, _ctx: &dyn Context) -> Verdict {
        match &flow.host {
            Some(h) if h.starts_with(&self.prefix) => Verdict::Abstain,
            _ => {
                notes.add("why", "not an API host");
                Verdict::Deny
            }
        }
    }
}

connection_policy!(OnlyApi);

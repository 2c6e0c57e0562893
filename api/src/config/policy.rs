//! `policy` (mode, default, rules and the groups they name) and `plugins`.

use std::collections::HashMap;
use std::path::PathBuf;

use super::raw::{self, RawPort, S};
use super::{ConfigErrorKind, GroupKind, NameKind, Validator, pos, suggest};
use crate::model::*;

impl Validator {
    /// `policy:` (named `default`), or the policy at `path` under
    /// `policies:` (whose name is required).
    pub(super) fn policy(
        &mut self,
        raw: Option<&raw::RawPolicy>,
        at: Option<(&str, serde_saphyr::Location)>,
        web: &[WebGroup],
        smart: &[SmartGroup],
        plugins: &[String],
    ) -> PolicyConfig {
        let Some(p) = raw else {
            return PolicyConfig {
                name: super::DEFAULT_POLICY.to_owned(),
                mode: Mode::Enforce,
                default: Action::Deny,
                guard_private_ranges: false,
                rules: Vec::new(),
            };
        };
        let root = at.map_or("policy", |(path, _)| path).to_owned();
        let name = match (&p.name, at) {
            (Some(n), _) => {
                if !super::valid_name(&n.value) {
                    self.err(
                        n.referenced,
                        format!("{root}.name"),
                        ConfigErrorKind::InvalidName { name: n.value.clone() },
                    );
                }
                n.value.clone()
            }
            (None, Some((path, loc))) => {
                let _ = self.require(&raw::missing::<String>(), loc, path, "name");
                String::new()
            }
            (None, None) => super::DEFAULT_POLICY.to_owned(),
        };
        let web_names: Vec<&str> = web.iter().map(|g| g.name.as_str()).collect();
        let smart_names: Vec<&str> = smart.iter().map(|g| g.name.as_str()).collect();
        let mut seen = HashMap::new();
        let mut rules = Vec::new();
        for (i, r) in p.rules.iter().enumerate() {
            let at = r.referenced;
            let r = &r.value;
            let path = format!("{root}.rules[{i}]");
            let has_action = self.require(&r.action, at, &path, "action");
            let ok = self.require(&r.name, at, &path, "name")
                && has_action
                && self.name(&r.name, &format!("{path}.name"), NameKind::Rule, &mut seen);
            let from: Vec<String> = r
                .from
                .iter()
                .enumerate()
                .filter_map(|(j, g)| {
                    self.group_ref(g, format!("{path}.from[{j}]"), GroupKind::SmartGroup, &smart_names)
                })
                .collect();
            let mut to = Destination::default();
            if let Some(d) = &r.to {
                to.webgroups = d
                    .webgroups
                    .iter()
                    .enumerate()
                    .filter_map(|(j, g)| {
                        self.group_ref(g, format!("{path}.to.webgroups[{j}]"), GroupKind::WebGroup, &web_names)
                    })
                    .collect();
                to.smartgroups = d
                    .smartgroups
                    .iter()
                    .enumerate()
                    .filter_map(|(j, g)| {
                        self.group_ref(
                            g,
                            format!("{path}.to.smartgroups[{j}]"),
                            GroupKind::SmartGroup,
                            &smart_names,
                        )
                    })
                    .collect();
            }
            let mut delegate = Vec::new();
            for (j, d) in r.delegate.iter().enumerate() {
                if plugins.contains(&d.value) {
                    delegate.push(d.value.clone());
                } else {
                    self.err(
                        d.referenced,
                        format!("{path}.delegate[{j}]"),
                        ConfigErrorKind::UnknownPlugin {
                            name: d.value.clone(),
                            suggestion: suggest(&d.value, plugins.iter().map(String::as_str)),
                        },
                    );
                }
            }
            let mut protocols: Vec<Protocol> = r.protocols.iter().map(|p| p.value).collect();
            protocols.sort();
            protocols.dedup();
            let ports = r
                .ports
                .iter()
                .enumerate()
                .filter_map(|(j, p)| self.port(p, format!("{path}.ports[{j}]")))
                .collect();
            if ok {
                rules.push(Rule {
                    name: r.name.value.clone(),
                    from,
                    to,
                    protocols,
                    ports,
                    action: r.action.value,
                    watch: r.watch,
                    delegate,
                    at: pos(at),
                });
            }
        }
        PolicyConfig {
            name,
            mode: p.mode.as_ref().map_or(Mode::Enforce, |m| m.value),
            default: p.default.as_ref().map_or(Action::Deny, |d| d.value),
            guard_private_ranges: p.guard_private_ranges,
            rules,
        }
    }

    /// `policies:`: named policies, each checked like `policy:`.
    pub(super) fn policies(
        &mut self,
        raw: &[S<raw::RawPolicy>],
        default: &PolicyConfig,
        web: &[WebGroup],
        smart: &[SmartGroup],
        plugins: &[String],
    ) -> Vec<PolicyConfig> {
        let mut seen = HashMap::new();
        // `default` is taken by `policy:`.
        seen.insert(default.name.clone(), 0);
        let mut out = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let path = format!("policies[{i}]");
            let policy = self.policy(Some(&p.value), Some((&path, p.referenced)), web, smart, plugins);
            if let Some(n) = &p.value.name
                && self.name(n, &format!("{path}.name"), NameKind::Policy, &mut seen)
            {
                out.push(policy);
            }
        }
        out
    }

    /// `targets:`: which nodes get which policy.
    pub(super) fn targets(
        &mut self,
        raw: &[S<raw::RawTarget>],
        default: &PolicyConfig,
        policies: &[PolicyConfig],
        plugins: &[String],
        listeners: &[String],
    ) -> Vec<Target> {
        let names: Vec<&str> = std::iter::once(default.name.as_str())
            .chain(policies.iter().map(|p| p.name.as_str()))
            .collect();
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (i, t) in raw.iter().enumerate() {
            let (at, t) = (t.referenced, &t.value);
            let path = format!("targets[{i}]");
            let named = self.require(&t.name, at, &path, "name")
                && self.name(&t.name, &format!("{path}.name"), NameKind::Target, &mut seen);
            let has_policy = self.require(&t.policy, at, &path, "policy");
            let known = has_policy && names.contains(&t.policy.value.as_str());
            if has_policy && !known {
                self.err(
                    t.policy.referenced,
                    format!("{path}.policy"),
                    ConfigErrorKind::UnknownPolicy {
                        name: t.policy.value.clone(),
                        suggestion: suggest(&t.policy.value, names.iter().copied()),
                    },
                );
            }
            let texts = |v: &[S<String>]| v.iter().map(|s| s.value.clone()).collect::<Vec<_>>();
            let (ids, clusters, labels) = t.nodes.as_ref().map_or_else(Default::default, |n| {
                (texts(&n.value.ids), texts(&n.value.clusters), n.value.labels.clone())
            });
            let mut chosen = None;
            if let Some(list) = &t.plugins {
                let mut names = Vec::with_capacity(list.len());
                for (j, n) in list.iter().enumerate() {
                    if plugins.contains(&n.value) {
                        names.push(n.value.clone());
                    } else {
                        self.err(
                            n.referenced,
                            format!("{path}.plugins[{j}]"),
                            ConfigErrorKind::UnknownPlugin {
                                name: n.value.clone(),
                                suggestion: suggest(&n.value, plugins.iter().map(String::as_str)),
                            },
                        );
                    }
                }
                chosen = Some(names);
            }
            let mut chosen_listeners = None;
            if let Some(list) = &t.listeners {
                let mut names = Vec::with_capacity(list.len());
                for (j, n) in list.iter().enumerate() {
                    if listeners.contains(&n.value) {
                        names.push(n.value.clone());
                    } else {
                        self.err(
                            n.referenced,
                            format!("{path}.listeners[{j}]"),
                            ConfigErrorKind::UnknownListener {
                                name: n.value.clone(),
                                suggestion: suggest(&n.value, listeners.iter().map(String::as_str)),
                            },
                        );
                    }
                }
                chosen_listeners = Some(names);
            }
            if named && known {
                out.push(Target {
                    name: t.name.value.clone(),
                    ids,
                    clusters,
                    labels,
                    policy: t.policy.value.clone(),
                    plugins: chosen,
                    listeners: chosen_listeners,
                });
            }
        }
        out
    }

    pub(super) fn port(&mut self, p: &S<RawPort>, path: String) -> Option<PortRange> {
        let one = |v: i128| u16::try_from(v).ok().filter(|p| *p != 0);
        let parse = |s: &str| s.trim().parse::<i128>().ok();
        let result = match &p.value {
            RawPort::Number(n) => one(*n)
                .map(|v| PortRange { lo: v, hi: v })
                .ok_or_else(|| ConfigErrorKind::PortOutOfRange { value: n.to_string() }),
            RawPort::Text(t) => match t.split_once('-') {
                None => match parse(t) {
                    Some(n) => one(n)
                        .map(|v| PortRange { lo: v, hi: v })
                        .ok_or_else(|| ConfigErrorKind::PortOutOfRange { value: n.to_string() }),
                    None => Err(ConfigErrorKind::InvalidPortRange { value: t.clone() }),
                },
                Some((lo, hi)) => match (parse(lo), parse(hi)) {
                    (Some(lo), Some(hi)) => match (one(lo), one(hi)) {
                        (Some(l), Some(h)) if l <= h => Ok(PortRange { lo: l, hi: h }),
                        (Some(l), Some(h)) => Err(ConfigErrorKind::ReversedPortRange {
                            value: t.clone(),
                            fixed: format!("{h}-{l}"),
                        }),
                        (None, _) => Err(ConfigErrorKind::PortOutOfRange { value: lo.to_string() }),
                        (_, None) => Err(ConfigErrorKind::PortOutOfRange { value: hi.to_string() }),
                    },
                    _ => Err(ConfigErrorKind::InvalidPortRange { value: t.clone() }),
                },
            },
        };
        match result {
            Ok(r) => Some(r),
            Err(kind) => {
                self.err(p.referenced, path, kind);
                None
            }
        }
    }

    pub(super) fn plugins(&mut self, raw: &[S<raw::RawPlugin>], listeners: &[crate::Listener]) -> Vec<Plugin> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (i, p) in raw.iter().enumerate() {
            let (at, p) = (p.referenced, &p.value);
            let path = format!("plugins[{i}]");
            let ok = self.require(&p.name, at, &path, "name")
                && self.name(&p.name, &format!("{path}.name"), NameKind::Plugin, &mut seen);
            if self.require(&p.path, at, &path, "path") && p.path.value.trim().is_empty() {
                self.err(
                    p.path.referenced,
                    format!("{path}.path"),
                    ConfigErrorKind::InvalidValue {
                        message: "plugin path is empty; give the .wasm file".into(),
                    },
                );
            }
            let sha256 = p.sha256.as_ref().and_then(|s| {
                let v = s.value.trim().to_ascii_lowercase();
                if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
                    Some(v)
                } else {
                    self.err(
                        s.referenced,
                        format!("{path}.sha256"),
                        ConfigErrorKind::InvalidSha256 { value: s.value.clone() },
                    );
                    None
                }
            });
            let http = match p.kind.as_ref().map(|k| k.value.as_str()) {
                None | Some("network") => false,
                Some("http") => true,
                Some(other) => {
                    let k = p.kind.as_ref().map_or(at, |k| k.referenced);
                    self.err(
                        k,
                        format!("{path}.kind"),
                        ConfigErrorKind::InvalidValue {
                            message: format!(
                                "`{other}` is not a plugin kind; write `network` (a stream per flow, the default) or `http` (an HTTP context per plain-HTTP request)"
                            ),
                        },
                    );
                    false
                }
            };
            let deadline = self.duration(
                &p.deadline,
                format!("{path}.deadline"),
                Plugin::DEFAULT_DEADLINE,
                Plugin::MAX_DEADLINE,
            );
            let max_memory = match &p.max_memory {
                None => Plugin::DEFAULT_MAX_MEMORY,
                Some(v) => match parse_size(&v.value) {
                    Some(n) if (1 << 16..=Plugin::MAX_MAX_MEMORY).contains(&n) => n,
                    _ => {
                        self.err(
                            v.referenced,
                            format!("{path}.max_memory"),
                            ConfigErrorKind::InvalidValue {
                                message: format!(
                                    "`{}` is not a memory size from 64KiB to 256MiB; write e.g. `32MiB`",
                                    v.value
                                ),
                            },
                        );
                        Plugin::DEFAULT_MAX_MEMORY
                    }
                },
            };
            let failure = match (p.failure.as_ref(), p.fail_open) {
                (None, false) => PluginFailure::Closed,
                (None, true) => PluginFailure::Open,
                (Some(f), fail_open) => {
                    let policy = match f.value.as_str() {
                        "closed" | "fail_closed" => Some(PluginFailure::Closed),
                        "open" | "fail_open" => Some(PluginFailure::Open),
                        "reload" | "fail_reload" => Some(PluginFailure::Reload),
                        _ => None,
                    };
                    match policy {
                        Some(_) if fail_open => {
                            self.err(
                                f.referenced,
                                format!("{path}.failure"),
                                ConfigErrorKind::InvalidValue {
                                    message: "give `failure` or `fail_open`, not both".into(),
                                },
                            );
                            PluginFailure::Closed
                        }
                        Some(p) => p,
                        None => {
                            self.err(
                                f.referenced,
                                format!("{path}.failure"),
                                ConfigErrorKind::InvalidValue {
                                    message: format!(
                                        "`{}` is not a failure policy; write `closed` (the default), `open` or `reload`",
                                        f.value
                                    ),
                                },
                            );
                            PluginFailure::Closed
                        }
                    }
                }
            };
            let max_body = match &p.max_body {
                None => Plugin::DEFAULT_MAX_BODY,
                Some(v) => match parse_size(&v.value) {
                    Some(n) if n <= Plugin::MAX_MAX_BODY => n,
                    _ => {
                        self.err(
                            v.referenced,
                            format!("{path}.max_body"),
                            ConfigErrorKind::InvalidValue {
                                message: format!(
                                    "`{}` is not a body size up to 64MiB; write e.g. `1MiB`, or `0` for bodies the plugin never sees",
                                    v.value
                                ),
                            },
                        );
                        Plugin::DEFAULT_MAX_BODY
                    }
                },
            };
            let max_pairs = self.bounded(
                &p.max_pairs,
                format!("{path}.max_pairs"),
                Plugin::DEFAULT_MAX_PAIRS,
                1,
                Plugin::MAX_MAX_PAIRS,
            ) as usize;
            let max_value = match &p.max_value {
                None => Plugin::DEFAULT_MAX_VALUE,
                Some(v) => match parse_size(&v.value) {
                    Some(n) if (1 << 10..=Plugin::MAX_MAX_VALUE).contains(&n) => n,
                    _ => {
                        self.err(
                            v.referenced,
                            format!("{path}.max_value"),
                            ConfigErrorKind::InvalidValue {
                                message: format!("`{}` is not a size from 1KiB to 64MiB; write e.g. `1MiB`", v.value),
                            },
                        );
                        Plugin::DEFAULT_MAX_VALUE
                    }
                },
            };
            let mut upstreams = Vec::new();
            for (name, addr) in p.upstreams.iter().flatten() {
                let a = addr.value.trim();
                let host_port = a
                    .strip_prefix("https://")
                    .or_else(|| a.strip_prefix("http://"))
                    .unwrap_or(a);
                let valid = host_port.rsplit_once(':').is_some_and(|(host, port)| {
                    !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
                });
                if valid {
                    upstreams.push((name.clone(), a.to_owned()));
                } else {
                    self.err(
                        addr.referenced,
                        format!("{path}.upstreams.{name}"),
                        ConfigErrorKind::InvalidValue {
                            message: format!(
                                "`{}` is not an upstream address; write `host:port` (plain HTTP) or `https://host:port` (TLS), e.g. `127.0.0.1:9000` or `https://auth.internal:443`",
                                addr.value
                            ),
                        },
                    );
                }
            }
            let mut served = Vec::new();
            for (j, l) in p.listeners.iter().flatten().enumerate() {
                match listeners.iter().any(|x| x.name == l.value) || self.external_listeners.contains(&l.value) {
                    true => served.push(l.value.clone()),
                    false => {
                        let names: Vec<&str> = listeners.iter().map(|x| x.name.as_str()).collect();
                        self.err(
                            l.referenced,
                            format!("{path}.listeners[{j}]"),
                            ConfigErrorKind::UnknownListener {
                                name: l.value.clone(),
                                suggestion: suggest(&l.value, names.iter().copied()),
                            },
                        );
                    }
                }
            }
            if ok {
                out.push(Plugin {
                    name: p.name.value.clone(),
                    path: PathBuf::from(p.path.value.trim()),
                    sha256,
                    failure,
                    config: p.config.clone(),
                    listeners: served,
                    data: p.data,
                    env: p.env.clone().unwrap_or_default().into_iter().collect(),
                    http,
                    root_id: p.root_id.as_ref().map(|r| r.value.clone()),
                    deadline,
                    max_memory,
                    upstreams,
                    max_body,
                    max_pairs,
                    max_value,
                });
            }
        }
        out
    }
}

/// `64MiB`, `512KiB`, `1GiB` or a number of bytes.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

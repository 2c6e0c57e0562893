//! One configuration from several sources: the files of a directory (the
//! control server's source), or a gateway's own file with the resources a
//! control server sent (the proxy's xDS client).
//!
//! Every source is turned into the file format's raw types and checked by
//! the same validator as a single `sluice.yaml`, so a WebGroup is held to
//! the same rules whether it was written in a file or arrived over xDS.
//! What differs is only how a problem is placed: in a file, by
//! file:line:column and the path inside that file; in a resource, by its
//! type, its name and the field path inside it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use serde_saphyr::{Location, Spanned};

use super::error::{ConfigError, ConfigErrorKind, ConfigErrors};
use super::raw::{self, RawConfig, RawPort, S};
use super::{Validator, io_message, yaml};
use crate::model::{Action, Config, Mode, Protocol};
use crate::proto::v1 as pb;

/// The kinds of Sluice resource a control server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    WebGroup,
    SmartGroup,
    Workload,
    Policy,
    /// A WASM plugin: an ECDS `TypedExtensionConfig` holding Envoy's Wasm
    /// filter configuration.
    Plugin,
    /// An Envoy `Listener` (with the `Cluster` it relays to), when the
    /// gateway takes its listeners from xDS (`xds.listeners: true`); not in
    /// [`ResourceKind::ALL`], which every gateway subscribes to.
    Listener,
}

impl ResourceKind {
    /// In the order a gateway applies them: groups before the policy that
    /// names them.
    pub const ALL: [Self; 5] = [
        Self::WebGroup,
        Self::SmartGroup,
        Self::Workload,
        Self::Plugin,
        Self::Policy,
    ];

    pub fn type_url(self) -> &'static str {
        use crate::proto::type_url as t;
        match self {
            Self::WebGroup => t::WEB_GROUP,
            Self::SmartGroup => t::SMART_GROUP,
            Self::Workload => t::WORKLOAD,
            Self::Policy => t::POLICY,
            Self::Plugin => t::EXTENSION_CONFIG,
            Self::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
        }
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .chain([Self::Listener])
            .find(|k| k.type_url() == url)
    }

    /// The section of `sluice.yaml` the resources of this kind make.
    fn section(self) -> &'static str {
        match self {
            Self::WebGroup => "webgroups",
            Self::SmartGroup => "smartgroups",
            Self::Workload => "inventory",
            Self::Policy => "policy",
            Self::Plugin => "plugins",
            Self::Listener => "listeners",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Self::WebGroup => "sluice.v1.WebGroup",
            Self::SmartGroup => "sluice.v1.SmartGroup",
            Self::Workload => "sluice.v1.Workload",
            Self::Policy => "sluice.v1.Policy",
            Self::Plugin => "plugin (ECDS)",
            Self::Listener => "Envoy Listener",
        }
    }
}

/// The name the `policy:` of a file is served under.
pub const DEFAULT_POLICY: &str = "default";

/// Sluice's resources of a configuration, in the file's vocabulary. On the
/// control server: what a directory defines. On a gateway: what the
/// control server sent, `None` for a kind it has not sent (the gateway's
/// own file keeps that section).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    pub webgroups: Option<Vec<pb::WebGroup>>,
    pub smartgroups: Option<Vec<pb::SmartGroup>>,
    pub workloads: Option<Vec<pb::Workload>>,
    pub policies: Option<Vec<pb::Policy>>,
    /// Plugins, their code already on the gateway's disk.
    pub plugins: Option<Vec<pb::Plugin>>,
    /// Listeners from Envoy's Listener and Cluster resources.
    pub listeners: Option<Vec<crate::xds::gateway::ListenerSpec>>,
}

/// Where a part of the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    File(String),
    Resource { kind: ResourceKind, name: String },
}

/// A configuration being put together from sources, not yet validated.
#[derive(Debug)]
pub struct Assembly {
    raw: RawConfig,
    /// Problems found while reading the sources (syntax, shape, a section
    /// given twice): when there are any, nothing is validated.
    errors: Vec<ConfigError>,
    /// For each list section, where each element came from and its index
    /// there.
    items: BTreeMap<&'static str, Vec<(Origin, usize)>>,
    /// For each single section (`policy`, `admin`, …), where it came from.
    sections: BTreeMap<&'static str, Origin>,
    /// The first file read: what names the whole configuration.
    first_file: Option<String>,
    /// Listeners defined outside the sources, which targets and plugins
    /// may name.
    external_listeners: Vec<String>,
}

impl Default for Assembly {
    fn default() -> Self {
        Self::new()
    }
}

impl Assembly {
    pub fn new() -> Self {
        Self {
            raw: yaml::empty(),
            errors: Vec::new(),
            items: BTreeMap::new(),
            sections: BTreeMap::new(),
            first_file: None,
            external_listeners: Vec::new(),
        }
    }

    /// Names listeners defined outside the sources (a control server's
    /// plain Envoy listeners): targets and plugins may name them too.
    pub fn listeners_defined_elsewhere(&mut self, names: Vec<String>) {
        self.external_listeners = names;
    }

    /// Adds one file's text (`source` names it in messages).
    pub fn add_file(&mut self, text: &str, source: &str) {
        self.first_file.get_or_insert_with(|| source.to_owned());
        let parsed = match yaml::parse(text, source) {
            Ok(p) => p,
            Err(e) => {
                self.errors.push(*e);
                return;
            }
        };
        self.errors.extend(parsed.errors);
        let origin = Origin::File(source.to_owned());
        let r = parsed.raw;
        self.extend("listeners", &origin, r.listeners, |c| &mut c.listeners);
        self.extend("webgroups", &origin, r.webgroups, |c| &mut c.webgroups);
        self.extend("smartgroups", &origin, r.smartgroups, |c| &mut c.smartgroups);
        self.extend("inventory", &origin, r.inventory, |c| &mut c.inventory);
        self.extend("plugins", &origin, r.plugins, |c| &mut c.plugins);
        self.extend("policies", &origin, r.policies, |c| &mut c.policies);
        self.extend("targets", &origin, r.targets, |c| &mut c.targets);
        self.single("admin", &origin, r.admin, |c| &mut c.admin);
        self.single("audit", &origin, r.audit, |c| &mut c.audit);
        self.single("gateway", &origin, r.gateway, |c| &mut c.gateway);
        self.single("policy", &origin, r.policy, |c| &mut c.policy);
        self.single("resolver", &origin, r.resolver, |c| &mut c.resolver);
        self.single("runtime", &origin, r.runtime, |c| &mut c.runtime);
        self.single("xds", &origin, r.xds, |c| &mut c.xds);
    }

    /// The module paths the plugins read so far declare, as written
    /// (whether or not the rest validates): what a configuration store must
    /// carry along with the files.
    pub fn plugin_paths(&self) -> Vec<std::path::PathBuf> {
        self.raw
            .plugins
            .iter()
            .map(|p| p.value.path.value.as_str())
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from)
            .collect()
    }

    /// Reads and adds a file.
    pub fn add_path(&mut self, path: &Path) {
        let name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => self.add_file(&text, &name),
            Err(e) => {
                self.first_file.get_or_insert_with(|| name.clone());
                self.errors.push(ConfigError {
                    file: name,
                    line: 0,
                    column: 0,
                    path: String::new(),
                    kind: ConfigErrorKind::Io {
                        message: io_message(path, &e),
                    },
                });
            }
        }
    }

    /// Puts the resources a control server sent in place of the sections
    /// they make (each kind present replaces its whole section).
    pub fn replace_with(&mut self, resources: &Resources) {
        if let Some(groups) = &resources.webgroups {
            let raw = groups.iter().map(|g| spanned(webgroup_from_pb(g))).collect();
            self.replace(ResourceKind::WebGroup, groups.iter().map(|g| &g.name), raw, |c| {
                &mut c.webgroups
            });
        }
        if let Some(groups) = &resources.smartgroups {
            let raw = groups.iter().map(|g| spanned(smartgroup_from_pb(g))).collect();
            self.replace(ResourceKind::SmartGroup, groups.iter().map(|g| &g.name), raw, |c| {
                &mut c.smartgroups
            });
        }
        if let Some(workloads) = &resources.workloads {
            let raw = workloads.iter().map(|w| spanned(workload_from_pb(w))).collect();
            self.replace(ResourceKind::Workload, workloads.iter().map(|w| &w.name), raw, |c| {
                &mut c.inventory
            });
        }
        if let Some(plugins) = &resources.plugins {
            let mut raw = Vec::with_capacity(plugins.len());
            for p in plugins {
                match plugin_from_pb(p) {
                    Ok(r) => raw.push(spanned(r)),
                    Err(e) => {
                        let origin = Origin::Resource {
                            kind: ResourceKind::Plugin,
                            name: p.name.clone(),
                        };
                        self.errors
                            .extend(e.into_iter().map(|(path, kind)| place(&origin, path, kind)));
                    }
                }
            }
            let names: Vec<&String> = plugins.iter().map(|p| &p.name).collect();
            self.replace(ResourceKind::Plugin, names.into_iter(), raw, |c| &mut c.plugins);
        }
        if let Some(listeners) = &resources.listeners {
            let mut raw = Vec::with_capacity(listeners.len());
            for l in listeners {
                match listener_from_spec(l) {
                    Ok(r) => raw.push(spanned(r)),
                    Err(e) => {
                        let origin = Origin::Resource {
                            kind: ResourceKind::Listener,
                            name: l.name.clone(),
                        };
                        self.errors
                            .extend(e.into_iter().map(|(path, kind)| place(&origin, path, kind)));
                    }
                }
            }
            self.replace(ResourceKind::Listener, listeners.iter().map(|l| &l.name), raw, |c| {
                &mut c.listeners
            });
        }
        if let Some(policies) = &resources.policies {
            self.sections.remove("policy");
            self.raw.policy = None;
            match policies.as_slice() {
                [] => {}
                [p] => {
                    let origin = Origin::Resource {
                        kind: ResourceKind::Policy,
                        name: p.name.clone(),
                    };
                    match policy_from_pb(p) {
                        Ok(raw) => self.raw.policy = Some(raw),
                        Err(e) => self
                            .errors
                            .extend(e.into_iter().map(|(path, kind)| place(&origin, path, kind))),
                    }
                    self.sections.insert("policy", origin);
                }
                many => {
                    let names: Vec<&str> = many.iter().map(|p| p.name.as_str()).collect();
                    self.errors.push(ConfigError {
                        file: ResourceKind::Policy.short().to_owned(),
                        line: 0,
                        column: 0,
                        path: String::new(),
                        kind: ConfigErrorKind::InvalidValue {
                            message: format!(
                                "{} Policy resources were sent ({}); a gateway enforces one: target one policy per node",
                                many.len(),
                                names.join(", ")
                            ),
                        },
                    });
                }
            }
        }
    }

    /// Validates the whole, placing each problem in the source it is in.
    pub fn build(self) -> Result<Config, ConfigErrors> {
        if !self.errors.is_empty() {
            return Err(ConfigErrors(self.errors));
        }
        let file = self.first_file.clone().unwrap_or_else(|| "<no file>".to_owned());
        let validator = Validator {
            file: file.clone(),
            errors: Vec::new(),
            user_refs: Vec::new(),
            skipped: Default::default(),
            external_listeners: self.external_listeners.clone(),
        };
        let items = self.items;
        let sections = self.sections;
        validator.config(self.raw).map_err(|ConfigErrors(errors)| {
            ConfigErrors(errors.into_iter().map(|e| relocate(e, &items, &sections)).collect())
        })
    }

    /// Sluice's resources in what was added, for a control server to
    /// serve. Only what the sources wrote: built-in groups are every
    /// gateway's already.
    pub fn resources(&self) -> Resources {
        let policy = self.raw.policy.as_ref().map(|p| {
            let name = p.name.as_ref().map_or(DEFAULT_POLICY, |n| n.value.as_str());
            policy_to_pb(name, p)
        });
        let named = self.raw.policies.iter().map(|p| {
            let name = p.value.name.as_ref().map_or("", |n| n.value.as_str());
            policy_to_pb(name, &p.value)
        });
        Resources {
            webgroups: Some(self.raw.webgroups.iter().map(|g| webgroup_to_pb(&g.value)).collect()),
            smartgroups: Some(
                self.raw
                    .smartgroups
                    .iter()
                    .map(|g| smartgroup_to_pb(&g.value))
                    .collect(),
            ),
            workloads: Some(self.raw.inventory.iter().map(|w| workload_to_pb(&w.value)).collect()),
            policies: Some(policy.into_iter().chain(named).collect()),
            // Served as ECDS resources, made from the validated
            // configuration and the module files.
            plugins: None,
            listeners: None,
        }
    }

    fn extend<T>(
        &mut self,
        section: &'static str,
        origin: &Origin,
        values: Vec<T>,
        field: impl Fn(&mut RawConfig) -> &mut Vec<T>,
    ) {
        let at = self.items.entry(section).or_default();
        at.extend((0..values.len()).map(|i| (origin.clone(), i)));
        field(&mut self.raw).extend(values);
    }

    fn single<T>(
        &mut self,
        section: &'static str,
        origin: &Origin,
        value: Option<T>,
        field: impl Fn(&mut RawConfig) -> &mut Option<T>,
    ) {
        let Some(value) = value else { return };
        if let Some(first) = self.sections.get(section) {
            let (Origin::File(first) | Origin::Resource { name: first, .. }) = first;
            let Origin::File(file) = origin else { return };
            self.errors.push(ConfigError {
                file: file.clone(),
                line: 0,
                column: 0,
                path: section.to_owned(),
                kind: ConfigErrorKind::InvalidValue {
                    message: format!("`{section}` is already given in {first}; keep it in one file"),
                },
            });
            return;
        }
        self.sections.insert(section, origin.clone());
        *field(&mut self.raw) = Some(value);
    }

    fn replace<'a, T>(
        &mut self,
        kind: ResourceKind,
        names: impl Iterator<Item = &'a String>,
        values: Vec<T>,
        field: impl Fn(&mut RawConfig) -> &mut Vec<T>,
    ) {
        let origins = names
            .map(|n| {
                let origin = Origin::Resource { kind, name: n.clone() };
                (origin, 0)
            })
            .collect();
        self.items.insert(kind.section(), origins);
        *field(&mut self.raw) = values;
    }
}

/// Moves a validator's error from the merged configuration's paths to the
/// source it is in: `webgroups[7].domains[0]` is `webgroups[2].domains[0]`
/// of the file that wrote the eighth group, or `domains[0]` of the
/// WebGroup resource it came from.
fn relocate(
    mut e: ConfigError,
    items: &BTreeMap<&'static str, Vec<(Origin, usize)>>,
    sections: &BTreeMap<&'static str, Origin>,
) -> ConfigError {
    let head_end = e.path.find(['.', '[']).unwrap_or(e.path.len());
    let head = &e.path[..head_end];
    let rest = &e.path[head_end..];
    let found = if let Some(list) = items.iter().find(|(k, _)| **k == head).map(|(_, v)| v) {
        rest.strip_prefix('[')
            .and_then(|r| r.split_once(']'))
            .and_then(|(i, tail)| Some((list.get(i.parse::<usize>().ok()?)?, tail)))
            .map(|((origin, j), tail)| (origin, format!("{head}[{j}]"), tail.to_owned()))
    } else {
        sections
            .iter()
            .find(|(k, _)| **k == head)
            .map(|(_, origin)| (origin, head.to_owned(), rest.to_owned()))
    };
    let Some((origin, prefix, tail)) = found else {
        return e;
    };
    match origin {
        Origin::File(file) => {
            e.file.clone_from(file);
            e.path = format!("{prefix}{tail}");
        }
        Origin::Resource { .. } => {
            let placed = place(origin, tail.trim_start_matches('.').to_owned(), e.kind);
            return placed;
        }
    }
    e
}

/// An error inside a resource: named by the resource, no position.
fn place(origin: &Origin, path: String, kind: ConfigErrorKind) -> ConfigError {
    let file = match origin {
        Origin::File(f) => f.clone(),
        Origin::Resource { kind, name } => format!("{} `{name}`", kind.short()),
    };
    ConfigError {
        file,
        line: 0,
        column: 0,
        path,
        kind,
    }
}

/// A position for values that came from a resource: present (line 1), so
/// the validator does not take them for missing fields. Errors inside
/// resources are placed by [`relocate`], which drops it.
fn present() -> Location {
    static AT: LazyLock<Location> =
        LazyLock::new(|| serde_saphyr::from_str::<Spanned<String>>("x").map_or(Location::UNKNOWN, |s| s.referenced));
    *AT
}

fn spanned<T>(value: T) -> S<T> {
    Spanned::new(value, present(), present())
}

/// A required text field: empty means absent, as proto3 cannot tell them
/// apart.
fn required(s: &str) -> S<String> {
    if s.is_empty() {
        raw::missing()
    } else {
        spanned(s.to_owned())
    }
}

fn texts(v: &[String]) -> Vec<S<String>> {
    v.iter().map(|s| spanned(s.clone())).collect()
}

fn optional_text(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

fn webgroup_from_pb(g: &pb::WebGroup) -> raw::RawWebGroup {
    raw::RawWebGroup {
        name: required(&g.name),
        description: optional_text(&g.description),
        domains: texts(&g.domains),
        include: texts(&g.include),
    }
}

fn webgroup_to_pb(g: &raw::RawWebGroup) -> pb::WebGroup {
    pb::WebGroup {
        name: g.name.value.clone(),
        description: g.description.clone().unwrap_or_default(),
        domains: g.domains.iter().map(|d| d.value.clone()).collect(),
        include: g.include.iter().map(|d| d.value.clone()).collect(),
    }
}

fn smartgroup_from_pb(g: &pb::SmartGroup) -> raw::RawSmartGroup {
    raw::RawSmartGroup {
        name: required(&g.name),
        description: optional_text(&g.description),
        cidrs: texts(&g.cidrs),
        selectors: g.selectors.iter().map(|s| spanned(s.labels.clone())).collect(),
        workloads: texts(&g.workloads),
        include: texts(&g.include),
    }
}

fn smartgroup_to_pb(g: &raw::RawSmartGroup) -> pb::SmartGroup {
    pb::SmartGroup {
        name: g.name.value.clone(),
        description: g.description.clone().unwrap_or_default(),
        cidrs: g.cidrs.iter().map(|c| c.value.clone()).collect(),
        selectors: g
            .selectors
            .iter()
            .map(|s| pb::Selector {
                labels: s.value.clone(),
            })
            .collect(),
        workloads: g.workloads.iter().map(|w| w.value.clone()).collect(),
        include: g.include.iter().map(|i| i.value.clone()).collect(),
    }
}

fn workload_from_pb(w: &pb::Workload) -> raw::RawWorkload {
    raw::RawWorkload {
        name: required(&w.name),
        ips: texts(&w.ips),
        labels: w.labels.clone(),
    }
}

fn workload_to_pb(w: &raw::RawWorkload) -> pb::Workload {
    pb::Workload {
        name: w.name.value.clone(),
        ips: w.ips.iter().map(|i| i.value.clone()).collect(),
        labels: w.labels.clone(),
    }
}

type FieldErrors = Vec<(String, ConfigErrorKind)>;

fn unknown_enum(value: i32, expected: &[&str]) -> ConfigErrorKind {
    ConfigErrorKind::UnknownValue {
        value: value.to_string(),
        expected: expected.iter().map(|s| (*s).to_owned()).collect(),
        suggestion: None,
    }
}

fn policy_from_pb(p: &pb::Policy) -> Result<raw::RawPolicy, FieldErrors> {
    let mut errors = Vec::new();
    let mode = match pb::Mode::try_from(p.mode) {
        Ok(pb::Mode::Unspecified | pb::Mode::Enforce) => Mode::Enforce,
        Ok(pb::Mode::Watch) => Mode::Watch,
        Err(_) => {
            errors.push(("mode".to_owned(), unknown_enum(p.mode, &["MODE_ENFORCE", "MODE_WATCH"])));
            Mode::Enforce
        }
    };
    let default = match pb::Action::try_from(p.default) {
        Ok(pb::Action::Unspecified | pb::Action::Deny) => Action::Deny,
        Ok(pb::Action::Allow) => Action::Allow,
        Err(_) => {
            errors.push((
                "default".to_owned(),
                unknown_enum(p.default, &["ACTION_ALLOW", "ACTION_DENY"]),
            ));
            Action::Deny
        }
    };
    let mut rules = Vec::with_capacity(p.rules.len());
    for (i, r) in p.rules.iter().enumerate() {
        let action = match pb::Action::try_from(r.action) {
            Ok(pb::Action::Allow) => spanned(Action::Allow),
            Ok(pb::Action::Deny) => spanned(Action::Deny),
            // The validator says the action is missing.
            Ok(pb::Action::Unspecified) => Spanned::new(Action::Deny, Location::UNKNOWN, Location::UNKNOWN),
            Err(_) => {
                errors.push((
                    format!("rules[{i}].action"),
                    unknown_enum(r.action, &["ACTION_ALLOW", "ACTION_DENY"]),
                ));
                spanned(Action::Deny)
            }
        };
        let mut protocols = Vec::with_capacity(r.protocols.len());
        for (j, &n) in r.protocols.iter().enumerate() {
            let p = match pb::Protocol::try_from(n) {
                Ok(pb::Protocol::Tls) => Protocol::Tls,
                Ok(pb::Protocol::Http) => Protocol::Http,
                Ok(pb::Protocol::Dns) => Protocol::Dns,
                Ok(pb::Protocol::Tcp) => Protocol::Tcp,
                Ok(pb::Protocol::Udp) => Protocol::Udp,
                Ok(pb::Protocol::Quic) => Protocol::Quic,
                Ok(pb::Protocol::Unspecified) | Err(_) => {
                    errors.push((
                        format!("rules[{i}].protocols[{j}]"),
                        unknown_enum(
                            n,
                            &[
                                "PROTOCOL_TLS",
                                "PROTOCOL_HTTP",
                                "PROTOCOL_DNS",
                                "PROTOCOL_TCP",
                                "PROTOCOL_UDP",
                                "PROTOCOL_QUIC",
                            ],
                        ),
                    ));
                    continue;
                }
            };
            protocols.push(spanned(p));
        }
        let to = r.to.as_ref().map(|d| raw::RawDestination {
            webgroups: texts(&d.webgroups),
            smartgroups: texts(&d.smartgroups),
        });
        rules.push(spanned(raw::RawRule {
            name: required(&r.name),
            from: texts(&r.from),
            to,
            protocols,
            ports: r.ports.iter().map(|p| spanned(RawPort::Text(p.clone()))).collect(),
            action,
            watch: r.watch,
            delegate: texts(&r.delegate),
        }));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(raw::RawPolicy {
        name: optional_text(&p.name).map(spanned),
        mode: Some(spanned(mode)),
        default: Some(spanned(default)),
        guard_private_ranges: p.guard_private_ranges,
        rules,
    })
}

fn policy_to_pb(name: &str, p: &raw::RawPolicy) -> pb::Policy {
    let action = |a: Action| match a {
        Action::Allow => pb::Action::Allow,
        Action::Deny => pb::Action::Deny,
    } as i32;
    let protocol = |p: Protocol| match p {
        Protocol::Tls => pb::Protocol::Tls,
        Protocol::Http => pb::Protocol::Http,
        Protocol::Dns => pb::Protocol::Dns,
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Quic => pb::Protocol::Quic,
    } as i32;
    pb::Policy {
        name: name.to_owned(),
        mode: match p.mode.as_ref().map_or(Mode::Enforce, |m| m.value) {
            Mode::Enforce => pb::Mode::Enforce,
            Mode::Watch => pb::Mode::Watch,
        } as i32,
        default: action(p.default.as_ref().map_or(Action::Deny, |d| d.value)),
        guard_private_ranges: p.guard_private_ranges,
        rules: p
            .rules
            .iter()
            .map(|r| {
                let r = &r.value;
                pb::Rule {
                    name: r.name.value.clone(),
                    from: r.from.iter().map(|s| s.value.clone()).collect(),
                    to: r.to.as_ref().map(|d| pb::Destination {
                        webgroups: d.webgroups.iter().map(|s| s.value.clone()).collect(),
                        smartgroups: d.smartgroups.iter().map(|s| s.value.clone()).collect(),
                    }),
                    protocols: r.protocols.iter().map(|p| protocol(p.value)).collect(),
                    ports: r
                        .ports
                        .iter()
                        .map(|p| match &p.value {
                            RawPort::Number(n) => n.to_string(),
                            RawPort::Text(t) => t.clone(),
                        })
                        .collect(),
                    action: action(r.action.value),
                    watch: r.watch,
                    delegate: r.delegate.iter().map(|s| s.value.clone()).collect(),
                }
            })
            .collect(),
    }
}

fn plugin_from_pb(p: &pb::Plugin) -> Result<raw::RawPlugin, FieldErrors> {
    let text = |s: &str| optional_text(s).map(spanned);
    // The configuration is the bytes the plugin is handed, already: a
    // text, which the plugin host passes on as it is.
    let config = (!p.config.is_empty()).then(|| serde_json::Value::String(p.config.clone()));
    let o = p.options.clone().unwrap_or_default();
    Ok(raw::RawPlugin {
        name: required(&p.name),
        path: required(&p.path),
        sha256: text(&p.sha256),
        fail_open: false,
        config,
        listeners: (!o.listeners.is_empty()).then(|| texts(&o.listeners)),
        data: o.data,
        env: (!p.env.is_empty()).then(|| p.env.clone()),
        kind: text(&p.kind),
        root_id: text(&p.root_id),
        deadline: text(&o.deadline),
        max_memory: text(&o.max_memory),
        failure: text(&p.failure),
        upstreams: (!o.upstreams.is_empty()).then(|| {
            o.upstreams
                .iter()
                .map(|(k, v)| (k.clone(), spanned(v.clone())))
                .collect()
        }),
        max_body: text(&o.max_body),
        max_pairs: (o.max_pairs != 0).then(|| spanned(o.max_pairs)),
        max_value: text(&o.max_value),
    })
}

fn listener_from_spec(l: &crate::xds::gateway::ListenerSpec) -> Result<raw::RawListener, FieldErrors> {
    use crate::xds::gateway::SpecKind;
    let envoy = match &l.kind {
        SpecKind::Envoy(e) => e,
        SpecKind::Sluice { kind, options } => return sluice_listener_from_spec(l, *kind, options),
    };
    Ok(raw::RawListener {
        name: required(&l.name),
        kind: spanned(crate::model::ListenerType::Envoy),
        address: spanned(l.address.to_string()),
        max_connections: None,
        peek_timeout: None,
        connect_timeout: None,
        idle_timeout: None,
        max_client_hello: None,
        ech: None,
        connect_no_sni: None,
        sni_check: None,
        upstream_port: None,
        upstream: None,
        users: Vec::new(),
        quic: None,
        migration: None,
        transparent: None,
        upstreams: Vec::new(),
        deny_answer: None,
        sinkhole: Vec::new(),
        strip_ech: None,
        cache_entries: None,
        binding_min_ttl: None,
        binding_grace: None,
        max_bindings: None,
        exfiltration: None,
        upstream_sockets: None,
        upstream_socket_max_queries: None,
        upstream_socket_max_age: None,
        envoy: Some(envoy.clone()),
    })
}

/// A listener of Sluice's own kind from xDS: its filter's settings read as
/// that kind of listener in `sluice.yaml` is (the same reader, so the same
/// checks).
fn sluice_listener_from_spec(
    l: &crate::xds::gateway::ListenerSpec,
    kind: crate::model::ListenerType,
    options: &str,
) -> Result<raw::RawListener, FieldErrors> {
    const AT: &str = "filter_chains[0].filters.typed_config";
    let invalid = |path: &str, message: String| vec![(path.to_owned(), ConfigErrorKind::InvalidValue { message })];
    let mut fields = match serde_json::from_str::<serde_json::Value>(if options.is_empty() { "{}" } else { options }) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => {
            return Err(invalid(
                AT,
                format!("expected a mapping of the `{}` listener's settings", kind.as_str()),
            ));
        }
    };
    for k in ["name", "kind", "address"] {
        if fields.contains_key(k) {
            return Err(invalid(
                &format!("{AT}.{k}"),
                format!("`{k}` is the Listener's own; remove it from the filter's settings"),
            ));
        }
    }
    fields.insert("name".into(), l.name.clone().into());
    fields.insert("kind".into(), kind.as_str().into());
    fields.insert("address".into(), l.address.to_string().into());
    let text = serde_json::Value::Object(fields).to_string();
    serde_saphyr::from_str::<raw::RawListener>(&text).map_err(|e| {
        let message = e.to_string();
        // The reader's message names the field; the line and column of
        // text made here would mean nothing.
        let message = message.split(" at line ").next().unwrap_or(&message).to_owned();
        invalid(AT, message)
    })
}

//! Loading `sluice.yaml`: YAML → positioned raw types → validated `Config`.
//!
//! All problems in a file are reported together, each with file:line:column,
//! the field path and a fix. A config either validates completely or is not
//! used at all, so a bad reload keeps the last good one running.

mod assemble;
mod error;
mod groups;
mod listeners;
mod policy;
mod process;
mod raw;
mod track;
mod yaml;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde_saphyr::Location;

pub use assemble::{Assembly, DEFAULT_POLICY, ResourceKind, Resources};
pub use error::{ConfigError, ConfigErrorKind, ConfigErrors, GroupKind, NameKind, suggest};
pub use groups::{selected_workloads, unmatched_selectors};
pub use listeners::listener_settings;
use raw::{RawConfig, S, is_missing};

use crate::model::*;
use crate::net::canonical_ip;

/// The configuration `sluice` runs with when given none: an explicit proxy
/// on 127.0.0.1:3128, a DNS proxy on 127.0.0.1:5353, the admin API on
/// 127.0.0.1:9901, watch mode.
pub const EMBEDDED_DEFAULT: &str = include_str!("default.yaml");
pub const EMBEDDED_DEFAULT_NAME: &str = "<embedded default>";

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";
pub const DEFAULT_AUDIT_QUEUE: usize = 65_536;

/// Loads and validates a file.
pub fn load_file(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            path: String::new(),
            kind: ConfigErrorKind::Io {
                message: io_message(path, &e),
            },
        }])
    })?;
    load_str(&text, &path.display().to_string())
}

/// Why a file cannot be read, in words, with what to do about it.
fn io_message(path: &Path, e: &std::io::Error) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => {
            let cwd = std::env::current_dir().map_or_else(|_| "?".to_owned(), |d| d.display().to_string());
            if path.is_absolute() {
                "there is no such file; check the path".to_owned()
            } else {
                format!("there is no such file in {cwd}; check the path, or give an absolute one")
            }
        }
        ErrorKind::PermissionDenied => "permission denied; make the file readable by this user".to_owned(),
        ErrorKind::IsADirectory => "this is a directory; give the configuration file inside it".to_owned(),
        ErrorKind::InvalidData => "the file is not UTF-8 text; save it as UTF-8".to_owned(),
        _ => e.to_string(),
    }
}

/// Loads and validates a directory of configuration files: every `.yaml`
/// and `.yml` file in it (not in subdirectories), in name order, as one
/// configuration. Lists (listeners, groups, inventory, plugins) are
/// concatenated; a single section (`policy`, `admin`, …) may be given by
/// one file only. Returns the validated configuration and the resources
/// it defines, for a control server to serve.
pub fn load_dir(dir: &Path) -> Result<(Config, Resources), ConfigErrors> {
    load_dir_with(dir, Vec::new())
}

/// Like [`load_dir`], where targets and plugins may also name
/// `external_listeners`: listeners defined beside the files (a control
/// server's plain Envoy listeners).
pub fn load_dir_with(dir: &Path, external_listeners: Vec<String>) -> Result<(Config, Resources), ConfigErrors> {
    let io = |message: String| {
        ConfigErrors(vec![ConfigError {
            file: dir.display().to_string(),
            line: 0,
            column: 0,
            path: String::new(),
            kind: ConfigErrorKind::Io { message },
        }])
    };
    let entries = std::fs::read_dir(dir).map_err(|e| io(io_message(dir, &e)))?;
    let mut files: Vec<std::path::PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(io(
            "the directory holds no .yaml or .yml file; put the configuration's files in it".to_owned(),
        ));
    }
    let mut assembly = Assembly::new();
    assembly.listeners_defined_elsewhere(external_listeners);
    for f in &files {
        assembly.add_path(f);
    }
    let resources = assembly.resources();
    Ok((assembly.build()?, resources))
}

/// The embedded default configuration.
pub fn embedded_default() -> Result<Config, ConfigErrors> {
    load_str(EMBEDDED_DEFAULT, EMBEDDED_DEFAULT_NAME)
}

/// Loads and validates YAML text; `source` names it in messages.
///
/// Every problem is reported: the YAML layer's (unknown fields and values,
/// wrong types, all of them) and the validator's, in file order. Only a
/// syntax error, past which nothing can be read, is reported alone.
pub fn load_str(text: &str, source: &str) -> Result<Config, ConfigErrors> {
    let parsed = yaml::parse(text, source).map_err(|e| ConfigErrors(vec![*e]))?;
    Validator {
        file: source.to_owned(),
        errors: parsed.errors,
        user_refs: Vec::new(),
        skipped: parsed.skipped,
        external_listeners: Vec::new(),
    }
    .config(parsed.raw)
}

fn pos(loc: Location) -> Pos {
    Pos {
        line: loc.line() as u32,
        column: loc.column() as u32,
    }
}

/// The port of `host:port` when it is a number but not a port (0, or
/// above 65535): said as such rather than as a malformed address.
fn port_out_of_range(addr: &str) -> Option<String> {
    let (_, port) = addr.trim().rsplit_once(':')?;
    let n: u128 = port.parse().ok()?;
    (n == 0 || n > 65_535).then(|| port.to_owned())
}

fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

struct Validator {
    file: String,
    errors: Vec<ConfigError>,
    /// Proxy users' SmartGroups, checked once the groups are known.
    user_refs: Vec<(String, Location, String)>,
    /// Paths of nodes the YAML layer skipped (and reported), as in the file.
    skipped: HashSet<String>,
    /// Listeners defined outside these files (a control server's plain
    /// Envoy listeners), which targets and plugins may name too.
    external_listeners: Vec<String>,
}

impl Validator {
    fn err(&mut self, loc: Location, path: impl Into<String>, kind: ConfigErrorKind) {
        let path = self.file_path(&path.into());
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: loc.line() as u32,
            column: loc.column() as u32,
            path,
            kind,
        });
    }

    /// The path as in the file of a path built from indexes into the raw
    /// lists, which lack the elements the YAML layer skipped.
    fn file_path(&self, raw: &str) -> String {
        if self.skipped.is_empty() {
            return raw.to_owned();
        }
        let mut out = String::with_capacity(raw.len() + 4);
        let mut rest = raw;
        while let Some(open) = rest.find('[') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find(']').map(|c| open + c) else {
                break;
            };
            match rest[open + 1..close].parse::<usize>() {
                Ok(mut i) => {
                    let mut gone: Vec<usize> = self
                        .skipped
                        .iter()
                        .filter_map(|p| {
                            p.strip_prefix(out.as_str())?
                                .strip_prefix('[')?
                                .strip_suffix(']')?
                                .parse()
                                .ok()
                        })
                        .collect();
                    gone.sort_unstable();
                    for g in gone {
                        if g <= i {
                            i += 1;
                        }
                    }
                    out.push_str(&format!("[{i}]"));
                }
                Err(_) => out.push_str(&rest[open..=close]),
            }
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        out
    }

    /// Reports a required field that is absent (unless the YAML layer
    /// skipped it for a problem already reported), at the mapping it is
    /// missing from. Returns whether it is present.
    fn require<T>(&mut self, v: &S<T>, at: Location, path: &str, field: &str) -> bool {
        if !is_missing(v) {
            return true;
        }
        let full = format!("{path}.{field}");
        let parent = self.file_path(path);
        // A misspelt key already reported as unknown, with this field as
        // its suggestion, says all there is to say.
        let misspelt = self.errors.iter().any(|e| {
            matches!(&e.kind, ConfigErrorKind::UnknownField { suggestion: Some(s), .. } if s == field)
                && e.path.rsplit_once('.').is_some_and(|(p, _)| p == parent)
        });
        if !misspelt && !self.skipped.contains(&self.file_path(&full)) {
            self.err(
                at,
                full,
                ConfigErrorKind::MissingField {
                    field: field.to_owned(),
                },
            );
        }
        false
    }

    fn config(mut self, raw: RawConfig) -> Result<Config, ConfigErrors> {
        let admin = self.admin(raw.admin.as_ref());
        let audit = self.audit(raw.audit.as_ref());
        let listeners = self.listeners(&raw.listeners);

        let mut gateway_addresses = Vec::new();
        if let Some(g) = &raw.gateway {
            for (i, a) in g.addresses.iter().enumerate() {
                if let Some(ip) = self.ip(a, &format!("gateway.addresses[{i}]")) {
                    gateway_addresses.push(ip);
                }
            }
        }
        // A listener bound to a specific address is the gateway too.
        for l in &listeners {
            let ip = canonical_ip(l.address.ip());
            if !ip.is_unspecified() && !gateway_addresses.contains(&ip) {
                gateway_addresses.push(ip);
            }
        }

        let inventory = self.inventory(&raw.inventory);
        let webgroups = self.webgroups(&raw.webgroups);
        let gateway_nets: Vec<IpNet> = gateway_addresses.iter().map(|ip| IpNet::from(*ip)).collect();
        let smartgroups = self.smartgroups(&raw.smartgroups, &gateway_nets, &inventory);
        let plugin_names: Vec<String> = raw.plugins.iter().map(|p| p.value.name.value.clone()).collect();
        let policy = self.policy(raw.policy.as_ref(), None, &webgroups, &smartgroups, &plugin_names);
        let policies = self.policies(&raw.policies, &policy, &webgroups, &smartgroups, &plugin_names);
        let listener_names: Vec<String> = listeners
            .iter()
            .map(|l| l.name.clone())
            .chain(self.external_listeners.iter().cloned())
            .collect();
        let targets = self.targets(&raw.targets, &policy, &policies, &plugin_names, &listener_names);
        let smart_names: Vec<&str> = smartgroups.iter().map(|g| g.name.as_str()).collect();
        for (name, loc, path) in std::mem::take(&mut self.user_refs) {
            if !smart_names.contains(&name.as_str()) {
                let suggestion = suggest(&name, smart_names.iter().copied());
                self.err(
                    loc,
                    path,
                    ConfigErrorKind::UnknownGroup {
                        kind: GroupKind::SmartGroup,
                        name,
                        suggestion,
                    },
                );
            }
        }
        let resolver = self.resolver(raw.resolver.as_ref());
        let (workers, drain_timeout) = self.runtime(raw.runtime.as_ref());
        let plugin_cache = self.plugin_cache(raw.runtime.as_ref());
        let plugin_ca = self.plugin_ca(raw.runtime.as_ref());
        let xds = raw.xds.as_ref().and_then(|x| self.xds(x));
        let plugins = self.plugins(&raw.plugins, &listeners);

        if !self.errors.is_empty() {
            self.errors.sort_by_key(|e| (e.line, e.column));
            return Err(ConfigErrors(self.errors));
        }
        Ok(Config {
            source: self.file,
            bootstrap: Bootstrap {
                admin,
                audit,
                drain_timeout,
                workers,
                plugin_cache,
                plugin_ca,
                xds,
            },
            listeners,
            webgroups,
            smartgroups,
            inventory,
            policy,
            policies,
            targets,
            plugins,
            gateway_addresses,
            resolver,
        })
    }

    fn socket(&mut self, v: &S<String>, path: &str) -> SocketAddr {
        match v.value.trim().parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) => {
                let kind = match port_out_of_range(&v.value) {
                    Some(port) => ConfigErrorKind::PortOutOfRange { value: port },
                    None => ConfigErrorKind::InvalidSocketAddress { value: v.value.clone() },
                };
                self.err(v.referenced, path, kind);
                SocketAddr::from(([0, 0, 0, 0], 0))
            }
        }
    }

    fn ip(&mut self, v: &S<String>, path: &str) -> Option<IpAddr> {
        match v.value.trim().parse::<IpAddr>() {
            Ok(ip) => Some(canonical_ip(ip)),
            Err(_) => {
                self.err(
                    v.referenced,
                    path,
                    ConfigErrorKind::InvalidIp { value: v.value.clone() },
                );
                None
            }
        }
    }

    /// Checks a name's spelling and uniqueness; returns whether it is usable.
    fn name(&mut self, name: &S<String>, path: &str, kind: NameKind, seen: &mut HashMap<String, u32>) -> bool {
        if !valid_name(&name.value) {
            self.err(
                name.referenced,
                path,
                ConfigErrorKind::InvalidName {
                    name: name.value.clone(),
                },
            );
            return false;
        }
        if let Some(first_line) = seen.get(&name.value) {
            let first_line = *first_line;
            self.err(
                name.referenced,
                path,
                ConfigErrorKind::DuplicateName {
                    kind,
                    name: name.value.clone(),
                    first_line,
                },
            );
            return false;
        }
        seen.insert(name.value.clone(), name.referenced.line() as u32);
        true
    }

    fn duration(&mut self, v: &Option<S<String>>, path: String, default: Duration, max: Duration) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.value.trim()) {
            Ok(d) if !d.is_zero() && d <= max => d,
            Ok(_) => {
                self.err(
                    v.referenced,
                    path,
                    ConfigErrorKind::InvalidValue {
                        message: format!(
                            "duration `{}` is out of range; use more than 0 and at most {}",
                            v.value,
                            humantime::format_duration(max)
                        ),
                    },
                );
                default
            }
            Err(_) => {
                self.err(
                    v.referenced,
                    path,
                    ConfigErrorKind::InvalidValue {
                        message: format!("`{}` is not a duration; write e.g. `5s`, `250ms` or `2m`", v.value),
                    },
                );
                default
            }
        }
    }

    fn bounded(&mut self, v: &Option<S<u64>>, path: String, default: u64, lo: u64, hi: u64) -> u64 {
        match v {
            None => default,
            Some(n) if (lo..=hi).contains(&n.value) => n.value,
            Some(n) => {
                self.err(
                    n.referenced,
                    path,
                    ConfigErrorKind::InvalidValue {
                        message: format!("{} is out of range; use {lo} to {hi}", n.value),
                    },
                );
                default
            }
        }
    }
}

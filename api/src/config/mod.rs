//! Loading `sluice.yaml`: YAML → positioned raw types → validated `Config`.
//!
//! All problems in a file are reported together, each with file:line:column,
//! the field path and a fix. A config either validates completely or is not
//! used at all, so a bad reload keeps the last good one running.

mod error;
mod raw;
mod track;
mod yaml;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde_saphyr::Location;

pub use error::{ConfigError, ConfigErrorKind, ConfigErrors, GroupKind, NameKind, suggest};
use raw::{RawConfig, RawPort, S, is_missing};

use crate::builtin;
use crate::domain::DomainPattern;
use crate::model::*;
use crate::net::{canonical_ip, parse_cidr};

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
        let default_admin = SocketAddr::from(([127, 0, 0, 1], 9901));
        let admin = match &raw.admin {
            Some(a) if self.require(&a.value.address, a.referenced, "admin", "address") => AdminConfig {
                address: self.socket(&a.value.address, "admin.address"),
            },
            _ => AdminConfig { address: default_admin },
        };
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
        let policy = self.policy(raw.policy.as_ref(), &webgroups, &smartgroups, &plugin_names);
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
        let workers = raw
            .runtime
            .as_ref()
            .map(|r| self.bounded(&r.workers, "runtime.workers".into(), 0, 0, 1024) as usize);
        let drain_timeout = match &raw.runtime {
            Some(r) => self.duration(
                &r.drain_timeout,
                "runtime.drain_timeout".into(),
                Duration::from_secs(10),
                Duration::from_secs(3600),
            ),
            None => Duration::from_secs(10),
        };
        let plugins = self.plugins(&raw.plugins);

        if !self.errors.is_empty() {
            self.errors.sort_by_key(|e| (e.line, e.column));
            return Err(ConfigErrors(self.errors));
        }
        Ok(Config {
            source: self.file,
            admin,
            audit,
            listeners,
            webgroups,
            smartgroups,
            inventory,
            policy,
            plugins,
            gateway_addresses,
            resolver,
            drain_timeout,
            workers: workers.filter(|w| *w > 0),
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

    fn audit(&mut self, raw: Option<&S<raw::RawAudit>>) -> AuditConfig {
        let stdout = AuditConfig {
            destination: AuditDestination::Stdout,
            queue: DEFAULT_AUDIT_QUEUE,
        };
        let Some(a) = raw else {
            return stdout;
        };
        if !self.require(&a.value.destination, a.referenced, "audit", "destination") {
            return stdout;
        }
        let a = &a.value;
        let destination = match a.destination.value.trim() {
            "stdout" | "-" => AuditDestination::Stdout,
            "stderr" => AuditDestination::Stderr,
            "" => {
                self.err(
                    a.destination.referenced,
                    "audit.destination",
                    ConfigErrorKind::InvalidValue {
                        message: "audit destination is empty; write `stdout`, `stderr` or a file path".into(),
                    },
                );
                AuditDestination::Stdout
            }
            p => AuditDestination::File(PathBuf::from(p)),
        };
        let queue = match &a.queue {
            None => DEFAULT_AUDIT_QUEUE,
            Some(q) if q.value == 0 || q.value > 16_777_216 => {
                self.err(
                    q.referenced,
                    "audit.queue",
                    ConfigErrorKind::InvalidValue {
                        message: format!("audit queue size {} is out of range; use 1 to 16777216", q.value),
                    },
                );
                DEFAULT_AUDIT_QUEUE
            }
            Some(q) => q.value as usize,
        };
        AuditConfig { destination, queue }
    }

    fn listeners(&mut self, raw: &[S<raw::RawListener>]) -> Vec<Listener> {
        let mut seen = HashMap::new();
        let mut bound: Vec<(SocketAddr, String)> = Vec::new();
        let mut out = Vec::new();
        for (i, l) in raw.iter().enumerate() {
            let (at, l) = (l.referenced, &l.value);
            let path = format!("listeners[{i}]");
            let complete = [
                self.require(&l.name, at, &path, "name"),
                self.require(&l.kind, at, &path, "kind"),
                self.require(&l.address, at, &path, "address"),
            ];
            if complete.contains(&false) {
                continue;
            }
            let ok = self.name(&l.name, &format!("{path}.name"), NameKind::Listener, &mut seen);
            let address = self.socket(&l.address, &format!("{path}.address"));
            let kind = l.kind.value;
            let canonical = SocketAddr::new(canonical_ip(address.ip()), address.port());
            if address.port() != 0 {
                // Every kind binds TCP (dns binds UDP too), so two listeners
                // clash on the same port when their addresses are equal or
                // either is a wildcard.
                let clash = bound.iter().find(|(a, _)| {
                    a.port() == canonical.port()
                        && (a.ip() == canonical.ip() || a.ip().is_unspecified() || canonical.ip().is_unspecified())
                });
                if let Some((_, other)) = clash {
                    self.err(
                        l.address.referenced,
                        format!("{path}.address"),
                        ConfigErrorKind::InvalidValue {
                            message: format!(
                                "address {address} overlaps listener `{other}` on the same port; give each listener its own port"
                            ),
                        },
                    );
                }
                bound.push((canonical, l.name.value.clone()));
            }
            let opts = self.listener_options(l, kind, &path);
            if ok {
                out.push(Listener {
                    name: l.name.value.clone(),
                    kind,
                    address,
                    ..opts
                });
            }
        }
        out
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

    /// Per-listener options, defaulted, and rejected where they do not
    /// apply to the listener's kind.
    fn listener_options(&mut self, l: &raw::RawListener, kind: ListenerKind, path: &str) -> Listener {
        use ListenerKind::*;
        let only = |this: &mut Self, present: Option<Location>, field: &str, kinds: &[ListenerKind]| {
            if let Some(loc) = present
                && !kinds.contains(&kind)
            {
                let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                this.err(
                    loc,
                    format!("{path}.{field}"),
                    ConfigErrorKind::InvalidValue {
                        message: format!(
                            "`{field}` does not apply to a `{}` listener (only to: {}); remove it",
                            kind.as_str(),
                            names.join(", ")
                        ),
                    },
                );
            }
        };
        only(
            self,
            l.ech.as_ref().map(|v| v.referenced),
            "ech",
            &[HttpProxy, Transparent, Sni],
        );
        only(
            self,
            l.connect_no_sni.as_ref().map(|v| v.referenced),
            "connect_no_sni",
            &[HttpProxy],
        );
        only(
            self,
            l.sni_check.as_ref().map(|v| v.referenced),
            "sni_check",
            &[Transparent],
        );
        only(
            self,
            l.upstream_port.as_ref().map(|v| v.referenced),
            "upstream_port",
            &[Sni],
        );
        only(self, l.upstream.as_ref().map(|v| v.referenced), "upstream", &[Tcp]);
        only(self, l.users.first().map(|v| v.referenced), "users", &[HttpProxy]);
        only(
            self,
            l.max_client_hello.as_ref().map(|v| v.referenced),
            "max_client_hello",
            &[HttpProxy, Transparent, Sni],
        );
        let upstream = l.upstream.as_ref().and_then(|u| {
            let v = u.value.trim();
            match v.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0) => Some(v.to_owned()),
                _ => {
                    let kind = match port_out_of_range(v) {
                        Some(port) => ConfigErrorKind::PortOutOfRange { value: port },
                        None => ConfigErrorKind::InvalidValue {
                            message: format!(
                                "`{v}` is not `host:port`; write e.g. `db.internal:5432` or `10.0.0.5:5432`"
                            ),
                        },
                    };
                    self.err(u.referenced, format!("{path}.upstream"), kind);
                    None
                }
            }
        });
        let mut users = Vec::new();
        let mut seen = HashMap::new();
        for (i, u) in l.users.iter().enumerate() {
            let (at, u) = (u.referenced, &u.value);
            let user_path = format!("{path}.users[{i}]");
            let complete = [
                self.require(&u.name, at, &user_path, "name"),
                self.require(&u.password, at, &user_path, "password"),
                self.require(&u.smartgroup, at, &user_path, "smartgroup"),
            ];
            if !complete.contains(&false)
                && self.name(
                    &u.name,
                    &format!("{path}.users[{i}].name"),
                    NameKind::ProxyUser,
                    &mut seen,
                )
            {
                users.push(ProxyUser {
                    name: u.name.value.clone(),
                    password: u.password.value.clone(),
                    smartgroup: u.smartgroup.value.clone(),
                });
                self.user_refs.push((
                    u.smartgroup.value.clone(),
                    u.smartgroup.referenced,
                    format!("{path}.users[{i}].smartgroup"),
                ));
            }
        }
        const HOUR: Duration = Duration::from_secs(3600);
        let secs = Duration::from_secs;
        Listener {
            name: String::new(),
            kind,
            address: SocketAddr::from(([0, 0, 0, 0], 0)),
            max_connections: self.bounded(
                &l.max_connections,
                format!("{path}.max_connections"),
                10_000,
                1,
                10_000_000,
            ) as usize,
            peek_timeout: self.duration(&l.peek_timeout, format!("{path}.peek_timeout"), secs(5), secs(60)),
            connect_timeout: self.duration(
                &l.connect_timeout,
                format!("{path}.connect_timeout"),
                secs(10),
                secs(120),
            ),
            idle_timeout: self.duration(&l.idle_timeout, format!("{path}.idle_timeout"), secs(300), 24 * HOUR),
            max_client_hello: self.bounded(
                &l.max_client_hello,
                format!("{path}.max_client_hello"),
                16_384,
                512,
                65_536,
            ) as usize,
            ech: l.ech.as_ref().map_or(EchPolicy::Deny, |e| e.value),
            connect_no_sni: l.connect_no_sni.as_ref().map_or(Action::Deny, |e| e.value),
            sni_check: l.sni_check.as_ref().map_or(SniCheck::Verify, |e| e.value),
            upstream_port: self.bounded(&l.upstream_port, format!("{path}.upstream_port"), 443, 1, 65_535) as u16,
            upstream,
            users,
            dns: self.dns_options(l, kind, path),
        }
    }

    /// `dns` listener options; `None` for other kinds.
    fn dns_options(&mut self, l: &raw::RawListener, kind: ListenerKind, path: &str) -> Option<DnsListener> {
        let present = [
            l.upstreams.first().map(|v| (v.referenced, "upstreams")),
            l.deny_answer.as_ref().map(|v| (v.referenced, "deny_answer")),
            l.sinkhole.first().map(|v| (v.referenced, "sinkhole")),
            l.strip_ech.as_ref().map(|v| (v.referenced, "strip_ech")),
            l.cache_entries.as_ref().map(|v| (v.referenced, "cache_entries")),
            l.binding_min_ttl.as_ref().map(|v| (v.referenced, "binding_min_ttl")),
            l.binding_grace.as_ref().map(|v| (v.referenced, "binding_grace")),
            l.max_bindings.as_ref().map(|v| (v.referenced, "max_bindings")),
            l.exfiltration.as_ref().map(|v| (v.referenced, "exfiltration")),
            l.upstream_sockets.as_ref().map(|v| (v.referenced, "upstream_sockets")),
            l.upstream_socket_max_queries
                .as_ref()
                .map(|v| (v.referenced, "upstream_socket_max_queries")),
            l.upstream_socket_max_age
                .as_ref()
                .map(|v| (v.referenced, "upstream_socket_max_age")),
        ];
        if kind != ListenerKind::Dns {
            for (loc, field) in present.into_iter().flatten() {
                self.err(
                    loc,
                    format!("{path}.{field}"),
                    ConfigErrorKind::InvalidValue {
                        message: format!("`{field}` applies only to `dns` listeners; remove it"),
                    },
                );
            }
            return None;
        }
        let mut upstreams = Vec::new();
        for (i, u) in l.upstreams.iter().enumerate() {
            match parse_dns_upstream(&u.value) {
                Some(up) => upstreams.push(up),
                None => self.err(
                    u.referenced,
                    format!("{path}.upstreams[{i}]"),
                    ConfigErrorKind::InvalidValue {
                        message: format!(
                            "`{}` is not a DNS upstream; write `10.0.0.2`, `10.0.0.2:53`, `tcp://10.0.0.2:53` or `tls://1.1.1.1:853#one.one.one.one`",
                            u.value
                        ),
                    },
                ),
            }
        }
        let mut v4 = None;
        let mut v6 = None;
        for (i, s) in l.sinkhole.iter().enumerate() {
            match self.ip(s, &format!("{path}.sinkhole[{i}]")) {
                Some(IpAddr::V4(a)) => v4 = Some(a),
                Some(IpAddr::V6(a)) => v6 = Some(a),
                None => {}
            }
        }
        let deny_answer = match l.deny_answer.as_ref().map(|d| d.value) {
            None | Some(raw::DnsDenyKind::Nxdomain) => DnsDeny::Nxdomain,
            Some(raw::DnsDenyKind::Refused) => DnsDeny::Refused,
            Some(raw::DnsDenyKind::Sinkhole) => DnsDeny::Sinkhole {
                v4: v4.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED),
                v6: v6.unwrap_or(std::net::Ipv6Addr::UNSPECIFIED),
            },
        };
        let secs = Duration::from_secs;
        Some(DnsListener {
            upstreams,
            deny_answer,
            strip_ech: l.strip_ech.as_ref().map(|v| v.value),
            cache_entries: self.bounded(&l.cache_entries, format!("{path}.cache_entries"), 10_000, 0, 10_000_000)
                as usize,
            binding_min_ttl: self.duration(
                &l.binding_min_ttl,
                format!("{path}.binding_min_ttl"),
                secs(60),
                secs(86_400),
            ),
            binding_grace: self.duration(
                &l.binding_grace,
                format!("{path}.binding_grace"),
                secs(30),
                secs(86_400),
            ),
            max_bindings: self.bounded(
                &l.max_bindings,
                format!("{path}.max_bindings"),
                1_000_000,
                1,
                100_000_000,
            ) as usize,
            exfiltration: l.exfiltration.as_ref().is_some_and(|v| v.value),
            upstream_sockets: self.bounded(&l.upstream_sockets, format!("{path}.upstream_sockets"), 16, 1, 1_024)
                as usize,
            upstream_socket_max_queries: self.bounded(
                &l.upstream_socket_max_queries,
                format!("{path}.upstream_socket_max_queries"),
                1_024,
                1,
                1_000_000,
            ) as u32,
            upstream_socket_max_age: self.duration(
                &l.upstream_socket_max_age,
                format!("{path}.upstream_socket_max_age"),
                secs(10),
                secs(3_600),
            ),
        })
    }

    fn resolver(&mut self, raw: Option<&raw::RawResolver>) -> ResolverConfig {
        let Some(r) = raw else { return ResolverConfig::default() };
        let mut out = ResolverConfig::default();
        for (i, ns) in r.nameservers.iter().enumerate() {
            let v = ns.value.trim();
            // A bare address means port 53.
            let parsed = v
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
            match parsed {
                Some(a) => out.nameservers.push(a),
                None => self.err(
                    ns.referenced,
                    format!("resolver.nameservers[{i}]"),
                    ConfigErrorKind::InvalidSocketAddress { value: v.to_owned() },
                ),
            }
        }
        for (name, ips) in &r.hosts {
            let canonical = match crate::domain::DomainName::parse(name) {
                Ok(n) => n.to_string(),
                Err(source) => {
                    self.err(
                        ips.referenced,
                        format!("resolver.hosts.{name}"),
                        ConfigErrorKind::InvalidDomain {
                            pattern: name.clone(),
                            source,
                        },
                    );
                    continue;
                }
            };
            let addrs = ips
                .value
                .iter()
                .enumerate()
                .filter_map(|(i, ip)| self.ip(ip, &format!("resolver.hosts.{name}[{i}]")))
                .collect();
            out.hosts_at.insert(canonical.clone(), pos(ips.referenced));
            out.hosts.insert(canonical, addrs);
        }
        out
    }

    fn inventory(&mut self, raw: &[S<raw::RawWorkload>]) -> Vec<Workload> {
        let mut seen = HashMap::new();
        let mut out = Vec::new();
        for (i, w) in raw.iter().enumerate() {
            let (at, w) = (w.referenced, &w.value);
            let path = format!("inventory[{i}]");
            let ok = self.require(&w.name, at, &path, "name")
                && self.name(&w.name, &format!("{path}.name"), NameKind::Workload, &mut seen);
            let ips: Vec<IpAddr> = w
                .ips
                .iter()
                .enumerate()
                .filter_map(|(j, ip)| self.ip(ip, &format!("{path}.ips[{j}]")))
                .collect();
            if ok {
                out.push(Workload {
                    name: w.name.value.clone(),
                    ips,
                    labels: w.labels.clone(),
                });
            }
        }
        out
    }

    fn webgroups(&mut self, raw: &[S<raw::RawWebGroup>]) -> Vec<WebGroup> {
        let mut groups = match builtin::webgroups() {
            Ok(g) => g,
            Err(e) => {
                self.err(
                    Location::UNKNOWN,
                    "",
                    ConfigErrorKind::InvalidValue { message: e.to_string() },
                );
                Vec::new()
            }
        };
        let mut seen = HashMap::new();
        let mut include_refs = Vec::new();
        for (i, g) in raw.iter().enumerate() {
            let (at, g) = (g.referenced, &g.value);
            let path = format!("webgroups[{i}]");
            let ok = self.require(&g.name, at, &path, "name")
                && self.name(&g.name, &format!("{path}.name"), NameKind::WebGroup, &mut seen);
            let mut patterns = Vec::with_capacity(g.domains.len());
            for (j, d) in g.domains.iter().enumerate() {
                match DomainPattern::parse(&d.value) {
                    Ok(p) => patterns.push(p),
                    Err(source) => self.err(
                        d.referenced,
                        format!("{path}.domains[{j}]"),
                        ConfigErrorKind::InvalidDomain {
                            pattern: d.value.clone(),
                            source,
                        },
                    ),
                }
            }
            for (j, inc) in g.include.iter().enumerate() {
                include_refs.push((inc, format!("{path}.include[{j}]")));
            }
            if !ok {
                continue;
            }
            let includes = g.include.iter().map(|s| s.value.clone()).collect();
            if let Some(existing) = groups.iter_mut().find(|w| w.builtin && w.name == g.name.value) {
                // Same name as a built-in: the user's entries extend it.
                existing.patterns.extend(patterns);
                existing.includes = includes;
                if g.description.is_some() {
                    existing.description.clone_from(&g.description);
                }
            } else {
                groups.push(WebGroup {
                    name: g.name.value.clone(),
                    description: g.description.clone(),
                    patterns,
                    includes,
                    builtin: false,
                    at: pos(at),
                });
            }
        }
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        for (inc, path) in include_refs {
            let _ = self.group_ref(inc, path, GroupKind::WebGroup, &names);
        }
        let graph: Vec<(String, Vec<String>)> = groups.iter().map(|g| (g.name.clone(), g.includes.clone())).collect();
        self.check_cycles(
            GroupKind::WebGroup,
            &graph,
            raw.iter().map(|g| (&g.value.name.value, g.referenced)),
        );
        groups
    }

    fn smartgroups(
        &mut self,
        raw: &[S<raw::RawSmartGroup>],
        gateway: &[IpNet],
        inventory: &[Workload],
    ) -> Vec<SmartGroup> {
        let mut groups = match builtin::smartgroups(gateway) {
            Ok(g) => g,
            Err(e) => {
                self.err(
                    Location::UNKNOWN,
                    "",
                    ConfigErrorKind::InvalidValue { message: e.to_string() },
                );
                Vec::new()
            }
        };
        let workload_names: Vec<&str> = inventory.iter().map(|w| w.name.as_str()).collect();
        let mut seen = HashMap::new();
        let mut include_refs = Vec::new();
        for (i, g) in raw.iter().enumerate() {
            let (at, g) = (g.referenced, &g.value);
            let path = format!("smartgroups[{i}]");
            let ok = self.require(&g.name, at, &path, "name")
                && self.name(&g.name, &format!("{path}.name"), NameKind::SmartGroup, &mut seen);
            let mut cidrs = Vec::new();
            for (j, c) in g.cidrs.iter().enumerate() {
                match parse_cidr(&c.value) {
                    Ok(n) => cidrs.push(n),
                    Err(e) => self.err(
                        c.referenced,
                        format!("{path}.cidrs[{j}]"),
                        ConfigErrorKind::InvalidCidr(e),
                    ),
                }
            }
            for (j, s) in g.selectors.iter().enumerate() {
                if s.value.is_empty() {
                    self.err(
                        s.referenced,
                        format!("{path}.selectors[{j}]"),
                        ConfigErrorKind::EmptySelector,
                    );
                }
            }
            for (j, w) in g.workloads.iter().enumerate() {
                if !workload_names.contains(&w.value.as_str()) {
                    let suggestion = suggest(&w.value, workload_names.iter().copied());
                    self.err(
                        w.referenced,
                        format!("{path}.workloads[{j}]"),
                        ConfigErrorKind::UnknownWorkload {
                            name: w.value.clone(),
                            suggestion,
                        },
                    );
                }
            }
            for (j, inc) in g.include.iter().enumerate() {
                include_refs.push((inc, format!("{path}.include[{j}]")));
            }
            if !ok {
                continue;
            }
            if builtin::is_builtin_smartgroup(&g.name.value) {
                if g.name.value == builtin::ANY {
                    self.err(
                        g.name.referenced,
                        format!("{path}.name"),
                        ConfigErrorKind::BuiltinNotExtensible {
                            kind: GroupKind::SmartGroup,
                            name: g.name.value.clone(),
                            why: "it already holds every address; pick another name",
                        },
                    );
                    continue;
                }
                if let Some(existing) = groups.iter_mut().find(|s| s.name == g.name.value) {
                    existing.cidrs.extend(cidrs);
                    existing.selectors.extend(g.selectors.iter().map(|s| s.value.clone()));
                    existing.workloads.extend(g.workloads.iter().map(|s| s.value.clone()));
                    existing.includes = g.include.iter().map(|s| s.value.clone()).collect();
                }
                continue;
            }
            groups.push(SmartGroup {
                name: g.name.value.clone(),
                description: g.description.clone(),
                cidrs,
                selectors: g.selectors.iter().map(|s| s.value.clone()).collect(),
                workloads: g.workloads.iter().map(|s| s.value.clone()).collect(),
                includes: g.include.iter().map(|s| s.value.clone()).collect(),
                builtin: false,
                at: pos(at),
            });
        }
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        for (inc, path) in include_refs {
            let _ = self.group_ref(inc, path, GroupKind::SmartGroup, &names);
        }
        let graph: Vec<(String, Vec<String>)> = groups.iter().map(|g| (g.name.clone(), g.includes.clone())).collect();
        self.check_cycles(
            GroupKind::SmartGroup,
            &graph,
            raw.iter().map(|g| (&g.value.name.value, g.referenced)),
        );
        groups
    }

    /// Reports each include cycle once, at the first group of it in the file.
    fn check_cycles<'a>(
        &mut self,
        kind: GroupKind,
        graph: &[(String, Vec<String>)],
        positions: impl Iterator<Item = (&'a String, Location)>,
    ) {
        let index: HashMap<&str, usize> = graph.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
        let positions: HashMap<&str, Location> = positions.map(|(n, l)| (n.as_str(), l)).collect();
        // 0 = unvisited, 1 = on stack, 2 = done
        let mut state = vec![0u8; graph.len()];
        let mut reported: HashSet<Vec<String>> = HashSet::new();
        for start in 0..graph.len() {
            if state[start] != 0 {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            state[start] = 1;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                let edges = &graph[node].1;
                if *next < edges.len() {
                    let target = edges[*next].as_str();
                    *next += 1;
                    let Some(&t) = index.get(target) else {
                        continue;
                    };
                    match state[t] {
                        0 => {
                            state[t] = 1;
                            stack.push((t, 0));
                        }
                        1 => {
                            let from = stack.iter().position(|(n, _)| *n == t).unwrap_or(0);
                            let mut cycle: Vec<String> =
                                stack[from..].iter().map(|(n, _)| graph[*n].0.clone()).collect();
                            cycle.push(graph[t].0.clone());
                            let mut key = cycle[..cycle.len() - 1].to_vec();
                            key.sort();
                            if reported.insert(key) {
                                let loc = positions.get(cycle[0].as_str()).copied().unwrap_or(Location::UNKNOWN);
                                self.err(loc, format!("{kind}s"), ConfigErrorKind::IncludeCycle { kind, cycle });
                            }
                        }
                        _ => {}
                    }
                } else {
                    state[node] = 2;
                    stack.pop();
                }
            }
        }
    }

    fn group_ref(&mut self, r: &S<String>, path: String, kind: GroupKind, names: &[&str]) -> Option<String> {
        if names.contains(&r.value.as_str()) {
            return Some(r.value.clone());
        }
        let suggestion = suggest(&r.value, names.iter().copied());
        self.err(
            r.referenced,
            path,
            ConfigErrorKind::UnknownGroup {
                kind,
                name: r.value.clone(),
                suggestion,
            },
        );
        None
    }

    fn policy(
        &mut self,
        raw: Option<&raw::RawPolicy>,
        web: &[WebGroup],
        smart: &[SmartGroup],
        plugins: &[String],
    ) -> PolicyConfig {
        let Some(p) = raw else {
            return PolicyConfig {
                mode: Mode::Enforce,
                default: Action::Deny,
                guard_private_ranges: false,
                rules: Vec::new(),
            };
        };
        let web_names: Vec<&str> = web.iter().map(|g| g.name.as_str()).collect();
        let smart_names: Vec<&str> = smart.iter().map(|g| g.name.as_str()).collect();
        let mut seen = HashMap::new();
        let mut rules = Vec::new();
        for (i, r) in p.rules.iter().enumerate() {
            let at = r.referenced;
            let r = &r.value;
            let path = format!("policy.rules[{i}]");
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
            mode: p.mode.as_ref().map_or(Mode::Enforce, |m| m.value),
            default: p.default.as_ref().map_or(Action::Deny, |d| d.value),
            guard_private_ranges: p.guard_private_ranges,
            rules,
        }
    }

    fn port(&mut self, p: &S<RawPort>, path: String) -> Option<PortRange> {
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

    fn plugins(&mut self, raw: &[S<raw::RawPlugin>]) -> Vec<Plugin> {
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
            if ok {
                out.push(Plugin {
                    name: p.name.value.clone(),
                    path: PathBuf::from(p.path.value.trim()),
                    sha256,
                    fail_open: p.fail_open,
                    config: p.config.clone(),
                });
            }
        }
        out
    }
}

/// `10.0.0.2`, `10.0.0.2:53`, `[fd00::2]:53`, `udp://…`, `tcp://…`,
/// `tls://1.1.1.1:853#one.one.one.one` (the name after `#` is the one the
/// certificate must carry; DoT needs it).
fn parse_dns_upstream(v: &str) -> Option<DnsUpstream> {
    let v = v.trim();
    let (transport, rest) = match v.split_once("://") {
        Some(("udp", r)) => (DnsTransport::Udp, r),
        Some(("tcp", r)) => (DnsTransport::Tcp, r),
        Some(("tls", r)) => (DnsTransport::Tls, r),
        Some(_) => return None,
        None => (DnsTransport::Udp, v),
    };
    let (addr, name) = match rest.split_once('#') {
        Some((a, n)) if !n.is_empty() => (a, Some(n.to_owned())),
        Some(_) => return None,
        None => (rest, None),
    };
    let default_port = if transport == DnsTransport::Tls { 853 } else { 53 };
    let address = addr
        .parse::<SocketAddr>()
        .ok()
        .or_else(|| addr.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, default_port)))
        .or_else(|| {
            addr.strip_prefix('[')
                .and_then(|a| a.strip_suffix(']'))
                .and_then(|a| a.parse::<IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, default_port))
        })?;
    if transport == DnsTransport::Tls && name.is_none() {
        return None;
    }
    if transport != DnsTransport::Tls && name.is_some() {
        return None;
    }
    Some(DnsUpstream {
        transport,
        address,
        server_name: name,
    })
}

/// Workloads in a SmartGroup through its selectors and workload names.
pub fn selected_workloads<'a>(group: &SmartGroup, inventory: &'a [Workload]) -> Vec<&'a Workload> {
    inventory
        .iter()
        .filter(|w| {
            group.workloads.contains(&w.name)
                || group
                    .selectors
                    .iter()
                    .any(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        })
        .collect()
}

/// Labels used by a selector that no workload carries (for `sluice check`).
pub fn unmatched_selectors(group: &SmartGroup, inventory: &[Workload]) -> Vec<BTreeMap<String, String>> {
    group
        .selectors
        .iter()
        .filter(|sel| {
            !inventory
                .iter()
                .any(|w| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
        })
        .cloned()
        .collect()
}

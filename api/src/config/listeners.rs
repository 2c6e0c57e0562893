//! `listeners`: names, addresses that must not clash, and each kind's
//! options (an option another kind owns is an error, not ignored).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_saphyr::Location;

use super::raw::{self, S};
use super::{ConfigErrorKind, NameKind, Validator, port_out_of_range};
use crate::model::*;
use crate::net::canonical_ip;

impl Validator {
    pub(super) fn listeners(&mut self, raw: &[S<raw::RawListener>]) -> Vec<Listener> {
        let mut seen = HashMap::new();
        // Address, listener, and whether it binds TCP and UDP.
        let mut bound: Vec<(SocketAddr, String, (bool, bool))> = Vec::new();
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
                // Every kind binds TCP but `quic` (UDP only) and `dns`
                // (both), so two listeners clash on the same port when they
                // share a transport and their addresses are equal or either
                // is a wildcard: an `sni` and a `quic` listener share 443.
                let transports = match kind {
                    ListenerType::Quic => (false, true),
                    ListenerType::Dns => (true, true),
                    _ => (true, false),
                };
                let clash = bound.iter().find(|(a, _, (tcp, udp))| {
                    a.port() == canonical.port()
                        && ((*tcp && transports.0) || (*udp && transports.1))
                        && (a.ip() == canonical.ip() || a.ip().is_unspecified() || canonical.ip().is_unspecified())
                });
                if let Some((_, other, _)) = clash {
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
                bound.push((canonical, l.name.value.clone(), transports));
            }
            let kind = self.listener_kind(l, kind, &path);
            if ok {
                out.push(Listener {
                    name: l.name.value.clone(),
                    address,
                    kind,
                });
            }
        }
        out
    }

    /// The kind's options, defaulted; an option another kind owns is
    /// reported where it is written.
    pub(super) fn listener_kind(&mut self, l: &raw::RawListener, ty: ListenerType, path: &str) -> ListenerKind {
        use ListenerType::*;
        let only = |this: &mut Self, present: Option<Location>, field: &str, kinds: &[ListenerType]| {
            if let Some(loc) = present
                && !kinds.contains(&ty)
            {
                let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                this.err(
                    loc,
                    format!("{path}.{field}"),
                    ConfigErrorKind::InvalidValue {
                        message: format!(
                            "`{field}` does not apply to a `{}` listener (only to: {}); remove it",
                            ty.as_str(),
                            names.join(", ")
                        ),
                    },
                );
            }
        };
        let at = |v: &Option<S<_>>| v.as_ref().map(|v: &S<_>| v.referenced);
        const TCP: &[ListenerType] = &[HttpProxy, Transparent, Sni, Tcp];
        // Kinds that relay flows: a `quic` flow is a client's 4-tuple.
        const FLOWS: &[ListenerType] = &[HttpProxy, Transparent, Sni, Tcp, Quic];
        const PEEK: &[ListenerType] = &[HttpProxy, Transparent, Sni, Quic];
        only(
            self,
            l.max_connections.as_ref().map(|v| v.referenced),
            "max_connections",
            FLOWS,
        );
        // Nothing to wait for when "connecting" a UDP socket.
        only(self, at(&l.connect_timeout), "connect_timeout", TCP);
        only(self, at(&l.idle_timeout), "idle_timeout", FLOWS);
        only(self, at(&l.peek_timeout), "peek_timeout", PEEK);
        only(
            self,
            l.max_client_hello.as_ref().map(|v| v.referenced),
            "max_client_hello",
            PEEK,
        );
        only(self, l.ech.as_ref().map(|v| v.referenced), "ech", PEEK);
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
            &[Transparent, Quic],
        );
        only(
            self,
            l.upstream_port.as_ref().map(|v| v.referenced),
            "upstream_port",
            &[Sni, Quic],
        );
        only(self, l.quic.as_ref().map(|v| v.referenced), "quic", &[Quic]);
        only(self, l.migration.as_ref().map(|v| v.referenced), "migration", &[Quic]);
        only(
            self,
            l.transparent.as_ref().map(|v| v.referenced),
            "transparent",
            &[Quic],
        );
        only(self, l.upstream.as_ref().map(|v| v.referenced), "upstream", &[Tcp]);
        only(self, l.users.first().map(|v| v.referenced), "users", &[HttpProxy]);
        if ty != Dns {
            self.dns_only(l, path);
        }
        match ty {
            HttpProxy => ListenerKind::HttpProxy(HttpProxyOptions {
                connection: self.connection_options(l, path),
                peek: self.peek_options(l, path),
                connect_no_sni: l.connect_no_sni.as_ref().map_or(Action::Deny, |e| e.value),
                users: self.proxy_users(l, path),
            }),
            Transparent => ListenerKind::Transparent(TransparentOptions {
                connection: self.connection_options(l, path),
                peek: self.peek_options(l, path),
                sni_check: l.sni_check.as_ref().map_or(SniCheck::Verify, |e| e.value),
            }),
            Sni => ListenerKind::Sni(SniOptions {
                connection: self.connection_options(l, path),
                peek: self.peek_options(l, path),
                upstream_port: self.bounded(&l.upstream_port, format!("{path}.upstream_port"), 443, 1, 65_535) as u16,
            }),
            Tcp => ListenerKind::Tcp(TcpOptions {
                connection: self.connection_options(l, path),
                upstream: self.upstream(l, path),
            }),
            Dns => ListenerKind::Dns(self.dns_options(l, path)),
            Quic => ListenerKind::Quic(self.quic_options(l, path)),
            Envoy => match &l.envoy {
                Some(e) => ListenerKind::Envoy(e.clone()),
                None => {
                    self.err(
                        l.kind.referenced,
                        format!("{path}.kind"),
                        ConfigErrorKind::InvalidValue {
                            message: "`envoy` listeners come from xDS only".to_owned(),
                        },
                    );
                    ListenerKind::Tcp(TcpOptions {
                        connection: ConnectionOptions::default(),
                        upstream: None,
                    })
                }
            },
        }
    }

    fn connection_options(&mut self, l: &raw::RawListener, path: &str) -> ConnectionOptions {
        const HOUR: Duration = Duration::from_secs(3600);
        let d = ConnectionOptions::default();
        ConnectionOptions {
            max_connections: self.bounded(
                &l.max_connections,
                format!("{path}.max_connections"),
                d.max_connections as u64,
                1,
                10_000_000,
            ) as usize,
            connect_timeout: self.duration(
                &l.connect_timeout,
                format!("{path}.connect_timeout"),
                d.connect_timeout,
                Duration::from_secs(120),
            ),
            idle_timeout: self.duration(
                &l.idle_timeout,
                format!("{path}.idle_timeout"),
                d.idle_timeout,
                24 * HOUR,
            ),
        }
    }

    fn peek_options(&mut self, l: &raw::RawListener, path: &str) -> PeekOptions {
        let d = PeekOptions::default();
        PeekOptions {
            peek_timeout: self.duration(
                &l.peek_timeout,
                format!("{path}.peek_timeout"),
                d.peek_timeout,
                Duration::from_secs(60),
            ),
            max_client_hello: self.bounded(
                &l.max_client_hello,
                format!("{path}.max_client_hello"),
                d.max_client_hello as u64,
                512,
                65_536,
            ) as usize,
            ech: l.ech.as_ref().map_or(d.ech, |e| e.value),
        }
    }

    /// A `quic` listener's options. `sni_check` needs `transparent: true`
    /// (there is no original destination to check otherwise) and
    /// `upstream_port` needs it false (the original port is dialled).
    fn quic_options(&mut self, l: &raw::RawListener, path: &str) -> QuicOptions {
        let transparent = l.transparent.as_ref().is_some_and(|t| t.value);
        let mismatch = |this: &mut Self, at: Option<Location>, field: &str, needs: bool| {
            if let Some(loc) = at {
                this.err(
                    loc,
                    format!("{path}.{field}"),
                    ConfigErrorKind::InvalidValue {
                        message: format!(
                            "`{field}` applies to a `quic` listener only with `transparent: {needs}`; remove it or set `transparent: {needs}`"
                        ),
                    },
                );
            }
        };
        if transparent {
            mismatch(
                self,
                l.upstream_port.as_ref().map(|v| v.referenced),
                "upstream_port",
                false,
            );
        } else {
            mismatch(self, l.sni_check.as_ref().map(|v| v.referenced), "sni_check", true);
        }
        let mut connection = self.connection_options(l, path);
        if l.idle_timeout.is_none() {
            connection.idle_timeout = QuicOptions::DEFAULT_IDLE_TIMEOUT;
        }
        QuicOptions {
            connection,
            peek: self.peek_options(l, path),
            // Inspect by default: `block` would cut every HTTP/3 client
            // off QUIC the day the listener is added, whereas inspecting
            // applies the same policy as over TCP and still denies what
            // cannot be classified (see docs/configuration.md).
            quic: l.quic.as_ref().map_or(QuicMode::Inspect, |q| q.value),
            transparent,
            sni_check: l.sni_check.as_ref().map_or(SniCheck::Verify, |e| e.value),
            upstream_port: self.bounded(&l.upstream_port, format!("{path}.upstream_port"), 443, 1, 65_535) as u16,
            // Off by default: following by address alone is safe only
            // where an address is one client.
            migration: l.migration.as_ref().map_or(QuicMigration::Off, |m| m.value),
        }
    }

    /// `tcp`'s `upstream`, parsed once here.
    fn upstream(&mut self, l: &raw::RawListener, path: &str) -> Option<HostPort> {
        let u = l.upstream.as_ref()?;
        let v = u.value.trim();
        if let Some(hp) = HostPort::parse(v) {
            return Some(hp);
        }
        let kind = match port_out_of_range(v) {
            Some(port) => ConfigErrorKind::PortOutOfRange { value: port },
            None => ConfigErrorKind::InvalidValue {
                message: format!(
                    "`{v}` is not `host:port`; write e.g. `db.internal:5432`, `10.0.0.5:5432` or `[fd00::5]:5432`"
                ),
            },
        };
        self.err(u.referenced, format!("{path}.upstream"), kind);
        None
    }

    fn proxy_users(&mut self, l: &raw::RawListener, path: &str) -> Vec<ProxyUser> {
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
        users
    }

    /// Reports the `dns` options written on another kind of listener.
    fn dns_only(&mut self, l: &raw::RawListener, path: &str) {
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
        for (loc, field) in present.into_iter().flatten() {
            self.err(
                loc,
                format!("{path}.{field}"),
                ConfigErrorKind::InvalidValue {
                    message: format!("`{field}` applies only to `dns` listeners; remove it"),
                },
            );
        }
    }

    /// A `dns` listener's options.
    fn dns_options(&mut self, l: &raw::RawListener, path: &str) -> DnsListener {
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
        DnsListener {
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
        }
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

/// A listener's own settings as `sluice.yaml` writes them (without `name`,
/// `kind` and `address`), as they travel over xDS in a Sluice filter of
/// the kind (`sluice.dns`, `sluice.http_proxy`, …): read back by the same
/// reader, they give the same listener. `None` for a listener that came
/// from Envoy resources.
pub fn listener_settings(kind: &ListenerKind) -> Option<serde_json::Value> {
    use serde_json::{Value, json};
    let text = |d: Duration| Value::String(humantime::format_duration(d).to_string());
    let connection = |c: &ConnectionOptions| {
        json!({
            "max_connections": c.max_connections,
            "connect_timeout": text(c.connect_timeout),
            "idle_timeout": text(c.idle_timeout),
        })
    };
    let peek = |p: &PeekOptions| {
        json!({
            "peek_timeout": text(p.peek_timeout),
            "max_client_hello": p.max_client_hello,
            "ech": match p.ech { EchPolicy::Allow => "allow", EchPolicy::Deny => "deny" },
        })
    };
    let merge = |parts: Vec<Value>| {
        let mut out = serde_json::Map::new();
        for p in parts {
            if let Value::Object(m) = p {
                out.extend(m);
            }
        }
        Value::Object(out)
    };
    let action = |a: Action| match a {
        Action::Allow => "allow",
        Action::Deny => "deny",
    };
    match kind {
        ListenerKind::HttpProxy(o) => Some(merge(vec![
            connection(&o.connection),
            peek(&o.peek),
            json!({
                "connect_no_sni": action(o.connect_no_sni),
                "users": o.users.iter().map(|u| json!({
                    "name": u.name, "password": u.password, "smartgroup": u.smartgroup,
                })).collect::<Vec<_>>(),
            }),
        ])),
        ListenerKind::Sni(o) => Some(merge(vec![
            connection(&o.connection),
            peek(&o.peek),
            json!({ "upstream_port": o.upstream_port }),
        ])),
        ListenerKind::Dns(d) => {
            let upstream = |u: &DnsUpstream| match (u.transport, &u.server_name) {
                (DnsTransport::Tls, Some(n)) => format!("tls://{}#{n}", u.address),
                (DnsTransport::Tls, None) => format!("tls://{}", u.address),
                (DnsTransport::Tcp, _) => format!("tcp://{}", u.address),
                (DnsTransport::Udp, _) => format!("udp://{}", u.address),
            };
            let (deny, sinkhole) = match &d.deny_answer {
                DnsDeny::Nxdomain => ("nxdomain", Vec::new()),
                DnsDeny::Refused => ("refused", Vec::new()),
                DnsDeny::Sinkhole { v4, v6 } => ("sinkhole", vec![v4.to_string(), v6.to_string()]),
            };
            let mut out = json!({
                "upstreams": d.upstreams.iter().map(upstream).collect::<Vec<_>>(),
                "deny_answer": deny,
                "cache_entries": d.cache_entries,
                "binding_min_ttl": text(d.binding_min_ttl),
                "binding_grace": text(d.binding_grace),
                "max_bindings": d.max_bindings,
                "exfiltration": d.exfiltration,
                "upstream_sockets": d.upstream_sockets,
                "upstream_socket_max_queries": d.upstream_socket_max_queries,
                "upstream_socket_max_age": text(d.upstream_socket_max_age),
            });
            if let Value::Object(m) = &mut out {
                if !sinkhole.is_empty() {
                    m.insert("sinkhole".into(), json!(sinkhole));
                }
                if let Some(s) = d.strip_ech {
                    m.insert("strip_ech".into(), json!(s));
                }
            }
            Some(out)
        }
        ListenerKind::Transparent(o) => Some(merge(vec![
            connection(&o.connection),
            peek(&o.peek),
            json!({ "sni_check": match o.sni_check { SniCheck::Verify => "verify", SniCheck::Off => "off" } }),
        ])),
        ListenerKind::Quic(o) => {
            let mut c = connection(&o.connection);
            if let Value::Object(m) = &mut c {
                // Not an option of `quic` listeners (UDP has no connect).
                m.remove("connect_timeout");
            }
            let own = if o.transparent {
                json!({ "transparent": true, "sni_check": match o.sni_check { SniCheck::Verify => "verify", SniCheck::Off => "off" } })
            } else {
                json!({ "transparent": false, "upstream_port": o.upstream_port })
            };
            let mode = match o.quic {
                QuicMode::Inspect => "inspect",
                QuicMode::Block => "block",
            };
            let migration = match o.migration {
                QuicMigration::Off => "off",
                QuicMigration::SameAddress => "same-address",
            };
            Some(merge(vec![
                c,
                peek(&o.peek),
                own,
                json!({ "quic": mode, "migration": migration }),
            ]))
        }
        ListenerKind::Tcp(o) => Some(merge(vec![
            connection(&o.connection),
            match &o.upstream {
                Some(u) => json!({ "upstream": u.to_string() }),
                None => json!({}),
            },
        ])),
        ListenerKind::Envoy(_) => None,
    }
}

#[cfg(test)]
mod settings_tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use super::*;

    /// Every setting of each kind, away from its default, survives the
    /// trip: written as settings, read back by the file's reader.
    #[test]
    fn settings_read_back_to_the_same_listener() {
        let yaml = "listeners:
  - {name: p, kind: http-proxy, address: \"127.0.0.1:3128\", max_connections: 77, connect_timeout: 3s, idle_timeout: 90m,
     peek_timeout: 2500ms, max_client_hello: 4096, ech: allow, connect_no_sni: allow,
     users: [{name: ci, password: hunter2, smartgroup: builders}]}
  - {name: s, kind: sni, address: \"127.0.0.1:8443\", upstream_port: 9443, ech: allow, peek_timeout: 7s}
  - {name: t, kind: transparent, address: \"127.0.0.1:15001\", sni_check: off, max_client_hello: 2048, idle_timeout: 2h}
  - {name: c, kind: tcp, address: \"127.0.0.1:15432\", upstream: \"db.internal:5432\", connect_timeout: 1s}
  - {name: o, kind: tcp, address: \"127.0.0.1:15433\"}
  - {name: q, kind: quic, address: \"127.0.0.1:8443\", quic: block, upstream_port: 9443, idle_timeout: 45s, max_connections: 9}
  - {name: qt, kind: quic, address: \"127.0.0.1:15002\", transparent: true, sni_check: off, peek_timeout: 2s, migration: same-address}
  - {name: d, kind: dns, address: \"127.0.0.1:5353\", upstreams: [\"10.0.0.2\", \"tcp://10.0.0.3:5300\", \"tls://1.1.1.1:853#one.one.one.one\"],
     deny_answer: sinkhole, sinkhole: [0.0.0.0, \"::\"], strip_ech: false, cache_entries: 123, binding_min_ttl: 45s,
     binding_grace: 2m, max_bindings: 999, exfiltration: false, upstream_sockets: 3, upstream_socket_max_queries: 77,
     upstream_socket_max_age: 90s}
smartgroups:
  - {name: builders, cidrs: [10.9.0.0/16]}
";
        let cfg = crate::config::load_str(yaml, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
        for l in &cfg.listeners {
            let mut settings = listener_settings(&l.kind).unwrap();
            let m = settings.as_object_mut().unwrap();
            m.insert("name".into(), l.name.clone().into());
            m.insert("kind".into(), l.kind.ty().as_str().into());
            m.insert("address".into(), l.address.to_string().into());
            let again =
                format!("listeners:\n  - {settings}\nsmartgroups:\n  - {{name: builders, cidrs: [10.9.0.0/16]}}\n");
            let back = crate::config::load_str(&again, "again.yaml").unwrap_or_else(|e| panic!("{e}\n{again}"));
            assert_eq!(back.listeners[0], *l, "{again}");
        }
        assert_eq!(
            listener_settings(&cfg.listeners[0].kind).unwrap()["users"][0]["password"],
            "hunter2"
        );
    }

    /// A `quic` listener's defaults, and the options it refuses, each
    /// reported where it is written.
    #[test]
    fn quic_listener_options() {
        let cfg = crate::config::load_str(
            "listeners:\n  - {name: q, kind: quic, address: \"127.0.0.1:443\"}\n  - {name: s, kind: sni, address: \"127.0.0.1:443\"}\n",
            "t.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let ListenerKind::Quic(o) = &cfg.listeners[0].kind else {
            panic!("{:?}", cfg.listeners[0])
        };
        assert_eq!(o.quic, QuicMode::Inspect);
        assert!(!o.transparent);
        assert_eq!(o.upstream_port, 443);
        assert_eq!(o.connection.idle_timeout, QuicOptions::DEFAULT_IDLE_TIMEOUT);
        assert_eq!(
            o.migration,
            QuicMigration::Off,
            "following by address alone is asked for"
        );
        let refused = |yaml: &str, want: &str| {
            let e = crate::config::load_str(yaml, "t.yaml")
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        };
        refused(
            "listeners:\n  - {name: q, kind: quic, address: \"127.0.0.1:443\", connect_timeout: 1s}\n",
            "`connect_timeout` does not apply to a `quic` listener",
        );
        refused(
            "listeners:\n  - {name: q, kind: quic, address: \"127.0.0.1:443\", sni_check: off}\n",
            "`sni_check` applies to a `quic` listener only with `transparent: true`",
        );
        refused(
            "listeners:\n  - {name: q, kind: quic, address: \"127.0.0.1:443\", transparent: true, upstream_port: 8443}\n",
            "`upstream_port` applies to a `quic` listener only with `transparent: false`",
        );
        refused(
            "listeners:\n  - {name: s, kind: sni, address: \"127.0.0.1:443\", quic: block}\n",
            "`quic` does not apply to a `sni` listener",
        );
        refused(
            "listeners:\n  - {name: q, kind: quic, address: \"127.0.0.1:443\", quic: maybe}\n",
            "maybe",
        );
        refused(
            "listeners:\n  - {name: s, kind: sni, address: \"127.0.0.1:443\", migration: same-address}\n",
            "`migration` does not apply to a `sni` listener",
        );
        refused(
            "listeners:\n  - {name: q, kind: quic, address: \"127.0.0.1:443\", migration: anywhere}\n",
            "anywhere",
        );
        refused(
            "listeners:\n  - {name: q, kind: quic, address: \"127.0.0.1:443\"}\n  - {name: d, kind: dns, address: \"0.0.0.0:443\"}\n",
            "overlaps listener `q`",
        );
    }
}

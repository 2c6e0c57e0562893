//! Plugins over xDS, without I/O: an ECDS `TypedExtensionConfig` holding
//! Envoy's Wasm filter configuration (network or HTTP) becomes a plugin
//! in the file's vocabulary, plus where its code comes from.
//!
//! Fields Sluice supports are mapped; a field that would change what the
//! plugin does and that Sluice cannot honour is refused with its path
//! (`host_env_keys`: a plugin never sees the host's environment here;
//! capability restrictions; a `null` VM), never ignored. Sluice's own
//! settings of a plugin (the listeners it judges, its deadline, memory
//! cap, …) travel as a `google.protobuf.Struct` in `vm_config.configuration`
//! (`sluice_api::xds::plugin_options`).

use envoy_types::pb::envoy::config::core::v3::{
    AsyncDataSource, TypedExtensionConfig, async_data_source, data_source, http_uri,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{FailurePolicy, PluginConfig, plugin_config};
use envoy_types::pb::google::protobuf::{Any, BytesValue, StringValue};
use prost::{Message, Name};
use sluice_api::proto::v1 as pb;

pub const NETWORK_WASM: &str = "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm";
pub const HTTP_WASM: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
/// The largest module fetched from a URL.
pub const MAX_REMOTE: usize = 64 << 20;

/// Where a plugin's module comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    /// In the resource itself.
    Inline(Vec<u8>),
    /// A file already on the gateway.
    File(String),
    /// A URL, with the digest the fetched bytes must have.
    Remote {
        uri: String,
        sha256: String,
        timeout_ms: u64,
    },
}

/// A refused field: its path in the resource and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct EcdsError {
    pub path: String,
    pub reason: String,
}

fn refuse(path: &str, reason: impl Into<String>) -> EcdsError {
    EcdsError {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The name of an ECDS resource.
pub fn name(body: &Any) -> Result<String, EcdsError> {
    TypedExtensionConfig::decode(body.value.as_slice())
        .map(|t| t.name)
        .map_err(|e| refuse("", format!("cannot be decoded: {e}")))
}

/// The plugin an ECDS resource describes (its `path` left empty: the code
/// is not on disk yet) and its code.
pub fn plugin(body: &Any) -> Result<(pb::Plugin, Code), EcdsError> {
    let ext = TypedExtensionConfig::decode(body.value.as_slice())
        .map_err(|e| refuse("", format!("cannot be decoded: {e}")))?;
    let typed = ext
        .typed_config
        .ok_or_else(|| refuse("typed_config", "missing; give Envoy's Wasm filter configuration"))?;
    let kind = match typed.type_url.as_str() {
        NETWORK_WASM => "network",
        HTTP_WASM => "http",
        other => {
            return Err(refuse(
                "typed_config",
                format!("{other} is not a plugin; Sluice takes {NETWORK_WASM} and {HTTP_WASM}"),
            ));
        }
    };
    // Both Wasm filters are `{ PluginConfig config = 1; }` on the wire.
    let wasm = envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm::decode(typed.value.as_slice())
        .map_err(|e| refuse("typed_config", format!("cannot be decoded: {e}")))?;
    let config = wasm
        .config
        .ok_or_else(|| refuse("typed_config.config", "missing; give the plugin configuration"))?;
    plugin_config(&ext.name, kind, config)
}

#[allow(
    deprecated,
    reason = "older control servers still send fail_open and the plugin-level capability restriction"
)]
fn plugin_config(name: &str, kind: &str, c: PluginConfig) -> Result<(pb::Plugin, Code), EcdsError> {
    let at = "typed_config.config";
    if c.capability_restriction_config.is_some() {
        return Err(refuse(
            &format!("{at}.capability_restriction_config"),
            "not supported by Sluice; remove it",
        ));
    }
    let Some(plugin_config::Vm::VmConfig(vm)) = c.vm else {
        return Err(refuse(
            &format!("{at}.vm_config"),
            "missing; give the module in vm_config.code",
        ));
    };
    let vm_at = format!("{at}.vm_config");
    if vm.runtime == "envoy.wasm.runtime.null" {
        return Err(refuse(
            &format!("{vm_at}.runtime"),
            "a null VM runs code compiled into Envoy; Sluice runs WebAssembly modules",
        ));
    }
    if vm.capability_restriction_config.is_some() {
        return Err(refuse(
            &format!("{vm_at}.capability_restriction_config"),
            "not supported by Sluice; remove it",
        ));
    }
    let mut env = std::collections::BTreeMap::new();
    if let Some(e) = vm.environment_variables {
        if !e.host_env_keys.is_empty() {
            return Err(refuse(
                &format!("{vm_at}.environment_variables.host_env_keys"),
                "a Sluice plugin never sees the host's environment; give values in key_values",
            ));
        }
        env.extend(e.key_values);
    }
    let code = code(vm.code, &format!("{vm_at}.code"))?;
    let options = match vm.configuration {
        None => None,
        Some(a) if a.type_url == envoy_types::pb::google::protobuf::Struct::type_url() => {
            let st = envoy_types::pb::google::protobuf::Struct::decode(a.value.as_slice())
                .map_err(|e| refuse(&format!("{vm_at}.configuration"), format!("cannot be decoded: {e}")))?;
            Some(
                sluice_api::xds::plugin_options::from_struct(&st)
                    .map_err(|(field, why)| refuse(&format!("{vm_at}.configuration.{field}"), why))?,
            )
        }
        Some(a) => {
            return Err(refuse(
                &format!("{vm_at}.configuration"),
                format!(
                    "{} is not read by Sluice; the VM configuration carries Sluice's plugin settings as a google.protobuf.Struct",
                    a.type_url
                ),
            ));
        }
    };
    let configuration = match c.configuration {
        None => String::new(),
        Some(a) if a.type_url == StringValue::type_url() => StringValue::decode(a.value.as_slice())
            .map(|v| v.value)
            .map_err(|e| refuse(&format!("{at}.configuration"), format!("cannot be decoded: {e}")))?,
        Some(a) if a.type_url == BytesValue::type_url() => BytesValue::decode(a.value.as_slice())
            .ok()
            .and_then(|v| String::from_utf8(v.value).ok())
            .ok_or_else(|| refuse(&format!("{at}.configuration"), "not UTF-8 text"))?,
        Some(a) => {
            return Err(refuse(
                &format!("{at}.configuration"),
                format!(
                    "{} cannot be handed to a plugin; use google.protobuf.StringValue",
                    a.type_url
                ),
            ));
        }
    };
    let failure = match FailurePolicy::try_from(c.failure_policy) {
        Ok(FailurePolicy::FailOpen) => "open",
        Ok(FailurePolicy::FailReload) => "reload",
        Ok(FailurePolicy::FailClosed) => "closed",
        Ok(FailurePolicy::Unspecified) if c.fail_open => "open",
        Ok(FailurePolicy::Unspecified) => "closed",
        Err(_) => {
            return Err(refuse(
                &format!("{at}.failure_policy"),
                format!("unknown value {}", c.failure_policy),
            ));
        }
    };
    let declared = match &code {
        Code::Remote { sha256, .. } => sha256.clone(),
        Code::Inline(bytes) => hex_sha256(bytes),
        Code::File(_) => String::new(),
    };
    let plugin = pb::Plugin {
        name: if c.name.is_empty() { name.to_owned() } else { c.name },
        path: String::new(),
        sha256: declared,
        kind: kind.to_owned(),
        root_id: c.root_id,
        config: configuration,
        failure: failure.to_owned(),
        env,
        options,
    };
    if plugin.name != name {
        return Err(refuse(
            &format!("{at}.name"),
            format!("`{}` differs from the resource's name `{name}`", plugin.name),
        ));
    }
    Ok((plugin, code))
}

fn code(code: Option<AsyncDataSource>, at: &str) -> Result<Code, EcdsError> {
    match code.and_then(|c| c.specifier) {
        None => Err(refuse(
            at,
            "missing; give the module inline or a remote URL with its sha256",
        )),
        Some(async_data_source::Specifier::Local(d)) => match d.specifier {
            Some(data_source::Specifier::InlineBytes(b)) => Ok(Code::Inline(b)),
            Some(data_source::Specifier::Filename(f)) => Ok(Code::File(f)),
            Some(data_source::Specifier::InlineString(_)) => Err(refuse(
                &format!("{at}.local.inline_string"),
                "a module is bytes; use inline_bytes",
            )),
            Some(data_source::Specifier::EnvironmentVariable(_)) => Err(refuse(
                &format!("{at}.local.environment_variable"),
                "not supported; use inline_bytes, filename or remote",
            )),
            None => Err(refuse(&format!("{at}.local"), "empty")),
        },
        Some(async_data_source::Specifier::Remote(r)) => {
            let sha256 = r.sha256.trim().to_ascii_lowercase();
            if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(refuse(
                    &format!("{at}.remote.sha256"),
                    "required for remote code: the module's SHA-256, 64 hexadecimal characters",
                ));
            }
            let http = r
                .http_uri
                .ok_or_else(|| refuse(&format!("{at}.remote.http_uri"), "missing"))?;
            if !http.uri.starts_with("http://") {
                return Err(refuse(
                    &format!("{at}.remote.http_uri.uri"),
                    format!(
                        "`{}`: Sluice fetches modules over http:// (the sha256 is what is trusted)",
                        http.uri
                    ),
                ));
            }
            if let Some(http_uri::HttpUpstreamType::Cluster(c)) = &http.http_upstream_type
                && !c.is_empty()
            {
                // The URI's host is dialled; the cluster names nothing a
                // Sluice gateway has.
                tracing::debug!("remote plugin code: cluster `{c}` ignored, dialling the URI's host");
            }
            let timeout_ms = http
                .timeout
                .map_or(30_000, |d| {
                    (d.seconds.max(0) as u64).saturating_mul(1000) + (d.nanos.max(0) as u64) / 1_000_000
                })
                .clamp(100, 300_000);
            Ok(Code::Remote {
                uri: http.uri,
                sha256,
                timeout_ms,
            })
        }
    }
}

/// Lower-case hex SHA-256.
pub fn hex_sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use envoy_types::pb::envoy::config::core::v3::{DataSource, RemoteDataSource};
    use envoy_types::pb::envoy::extensions::wasm::v3::{EnvironmentVariables, VmConfig};

    use super::*;

    /// What `sluice-xds` makes of a `plugins:` entry.
    fn served(yaml_extra: &str, code_url: Option<&str>) -> Any {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("m.wasm"), b"\0asm\x01\0\0\0").unwrap();
        let yaml = format!(
            "listeners:\n  - {{name: proxy, kind: http-proxy, address: 127.0.0.1:0}}\nplugins:\n  - name: guard\n    path: m.wasm\n    config: {{deny: [a.example]}}\n    failure: reload\n    env: {{MODE: strict}}\n{yaml_extra}"
        );
        let config = sluice_api::config::load_str(&yaml, "p.yaml").unwrap();
        let (r, _) = sluice_xds::ecds::plugins(&config, Some(dir.path()), code_url).unwrap();
        r[0].body.clone()
    }

    #[test]
    fn what_sluice_xds_serves_comes_back_as_the_plugin_it_was() {
        let body = served(
            "    kind: http\n    root_id: r1\n    deadline: 20ms\n    max_memory: 32MiB\n    listeners: [proxy]\n    data: true\n    upstreams: {auth: \"127.0.0.1:9000\"}\n",
            None,
        );
        assert_eq!(name(&body).unwrap(), "guard");
        let (p, code) = plugin(&body).unwrap();
        assert_eq!(code, Code::Inline(b"\0asm\x01\0\0\0".to_vec()));
        assert_eq!(p.sha256, hex_sha256(b"\0asm\x01\0\0\0"));
        assert_eq!(
            (p.kind.as_str(), p.root_id.as_str(), p.failure.as_str()),
            ("http", "r1", "reload")
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&p.config).unwrap(),
            serde_json::json!({"deny": ["a.example"]})
        );
        assert_eq!(p.env.get("MODE").map(String::as_str), Some("strict"));
        let o = p.options.unwrap();
        assert_eq!(
            (o.deadline.as_str(), o.max_memory.as_str(), o.data),
            ("20ms", "33554432", true)
        );
        assert_eq!(o.listeners, ["proxy"]);
        assert_eq!(o.upstreams.get("auth").map(String::as_str), Some("127.0.0.1:9000"));

        let (p, code) = plugin(&served("", Some("http://xds.internal:9903"))).unwrap();
        let Code::Remote {
            uri,
            sha256,
            timeout_ms,
        } = code
        else {
            panic!("{code:?}")
        };
        assert_eq!(uri, format!("http://xds.internal:9903/plugins/{sha256}.wasm"));
        assert_eq!((p.sha256, timeout_ms), (sha256, 30_000));
    }

    /// `served` with its VM configuration changed by `f`.
    fn edited(f: impl FnOnce(&mut VmConfig)) -> Any {
        let body = served("", None);
        let mut ext = TypedExtensionConfig::decode(body.value.as_slice()).unwrap();
        let typed = ext.typed_config.as_mut().unwrap();
        let mut wasm =
            envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm::decode(typed.value.as_slice())
                .unwrap();
        let Some(plugin_config::Vm::VmConfig(vm)) = wasm.config.as_mut().unwrap().vm.as_mut() else {
            unreachable!()
        };
        f(vm);
        typed.value = wasm.encode_to_vec();
        Any {
            type_url: body.type_url,
            value: ext.encode_to_vec(),
        }
    }

    #[test]
    fn what_sluice_cannot_honour_is_refused_with_its_path() {
        let cases: Vec<(Any, &str, &str)> = vec![
            (
                edited(|vm| {
                    vm.environment_variables = Some(EnvironmentVariables {
                        host_env_keys: vec!["HOME".into()],
                        ..Default::default()
                    })
                }),
                "typed_config.config.vm_config.environment_variables.host_env_keys",
                "never sees the host's environment",
            ),
            (
                edited(|vm| vm.runtime = "envoy.wasm.runtime.null".into()),
                "typed_config.config.vm_config.runtime",
                "null VM",
            ),
            (
                edited(|vm| {
                    vm.code = Some(AsyncDataSource {
                        specifier: Some(async_data_source::Specifier::Remote(RemoteDataSource {
                            http_uri: Some(envoy_types::pb::envoy::config::core::v3::HttpUri {
                                uri: "http://x/m.wasm".into(),
                                ..Default::default()
                            }),
                            sha256: String::new(),
                            retry_policy: None,
                        })),
                    })
                }),
                "typed_config.config.vm_config.code.remote.sha256",
                "required for remote code",
            ),
            (
                edited(|vm| {
                    vm.code = Some(AsyncDataSource {
                        specifier: Some(async_data_source::Specifier::Local(DataSource {
                            specifier: Some(data_source::Specifier::InlineString("x".into())),
                            ..Default::default()
                        })),
                    })
                }),
                "typed_config.config.vm_config.code.local.inline_string",
                "use inline_bytes",
            ),
            (
                edited(|vm| {
                    vm.configuration = Some(Any {
                        type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
                        value: vec![],
                    })
                }),
                "typed_config.config.vm_config.configuration",
                "is not read by Sluice",
            ),
        ];
        for (body, path, why) in cases {
            let e = plugin(&body).unwrap_err();
            assert_eq!(e.path, path, "{e}");
            assert!(e.reason.contains(why), "{e}");
        }
        let not_wasm = Any {
            type_url: TypedExtensionConfig::type_url(),
            value: TypedExtensionConfig {
                name: "x".into(),
                typed_config: Some(Any {
                    type_url: "type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC".into(),
                    value: vec![],
                }),
            }
            .encode_to_vec(),
        };
        let e = plugin(&not_wasm).unwrap_err();
        assert_eq!(e.path, "typed_config");
        assert!(
            plugin(&Any {
                type_url: TypedExtensionConfig::type_url(),
                value: vec![0xff, 0xff]
            })
            .is_err()
        );
    }
}

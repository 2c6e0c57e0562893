//! Plugins, served as ECDS resources: each plugin of the configuration as
//! a `TypedExtensionConfig` named after it, holding Envoy's Wasm filter
//! configuration (network, or HTTP for `kind: http`) — the module inline,
//! or, with a code URL, remote with its SHA-256 (the module is then served
//! by this server's admin API at `/plugins/<sha256>.wasm`). Sluice's own
//! settings of the plugin (`sluice.v1.PluginOptions`) travel as a
//! `google.protobuf.Struct` in the VM configuration, a type Envoy can show.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    AsyncDataSource, DataSource, HttpUri, RemoteDataSource, TypedExtensionConfig, async_data_source, data_source,
    http_uri,
};
use envoy_types::pb::envoy::extensions::wasm::v3::{
    EnvironmentVariables, FailurePolicy, PluginConfig, VmConfig, plugin_config,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, StringValue};
use prost::{Message, Name};
use sluice_api::proto::v1 as pb;
use sluice_api::{Config, Plugin, PluginFailure};

use crate::snapshot::Resource;

/// Modules by SHA-256, for the admin API to serve.
pub type Modules = BTreeMap<String, Arc<Vec<u8>>>;

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn hex_sha256(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The ECDS resources of `config`'s plugins, their module files read from
/// `base` when relative; `code_url` (e.g. `http://xds.internal:9903`)
/// makes the code remote.
pub fn plugins(
    config: &Config,
    base: Option<&Path>,
    code_url: Option<&str>,
) -> Result<(Vec<Resource>, Modules), String> {
    plugins_with(config, |p| read_module(p, base), code_url)
}

/// A plugin's module from the file system, relative to `base`.
pub fn read_module(p: &Plugin, base: Option<&Path>) -> Result<Vec<u8>, String> {
    let path = match base {
        Some(b) if p.path.is_relative() => b.join(&p.path),
        _ => p.path.clone(),
    };
    std::fs::read(&path).map_err(|e| format!("plugin `{}`: cannot read {}: {e}", p.name, path.display()))
}

/// [`plugins`], each module read by `read`.
pub fn plugins_with(
    config: &Config,
    read: impl Fn(&Plugin) -> Result<Vec<u8>, String>,
    code_url: Option<&str>,
) -> Result<(Vec<Resource>, Modules), String> {
    let mut resources = Vec::with_capacity(config.plugins.len());
    let mut modules = Modules::new();
    for p in &config.plugins {
        let bytes = read(p)?;
        let sha256 = hex_sha256(&bytes);
        if let Some(declared) = &p.sha256
            && *declared != sha256
        {
            return Err(format!(
                "plugin `{}`: {} has SHA-256 {sha256}, not the {declared} its `sha256` says",
                p.name,
                p.path.display()
            ));
        }
        let code = match code_url {
            None => async_data_source::Specifier::Local(DataSource {
                specifier: Some(data_source::Specifier::InlineBytes(bytes)),
                ..Default::default()
            }),
            Some(url) => {
                modules.insert(sha256.clone(), Arc::new(bytes));
                async_data_source::Specifier::Remote(RemoteDataSource {
                    http_uri: Some(HttpUri {
                        uri: format!("{}/plugins/{sha256}.wasm", url.trim_end_matches('/')),
                        timeout: Some(PbDuration { seconds: 30, nanos: 0 }),
                        http_upstream_type: Some(http_uri::HttpUpstreamType::Cluster("sluice-xds".into())),
                    }),
                    sha256: sha256.clone(),
                    retry_policy: None,
                })
            }
        };
        resources.push(Resource::new(&p.name, any(&extension(p, code))));
    }
    Ok((resources, modules))
}

fn extension(p: &Plugin, code: async_data_source::Specifier) -> TypedExtensionConfig {
    let options = pb::PluginOptions {
        listeners: p.listeners.clone(),
        data: p.data,
        deadline: humantime::format_duration(p.deadline).to_string(),
        max_memory: p.max_memory.to_string(),
        upstreams: p.upstreams.iter().cloned().collect(),
        max_body: p.max_body.to_string(),
        max_pairs: p.max_pairs as u64,
        max_value: p.max_value.to_string(),
    };
    let vm = VmConfig {
        vm_id: p.name.clone(),
        runtime: "envoy.wasm.runtime.v8".into(),
        code: Some(AsyncDataSource { specifier: Some(code) }),
        configuration: Some(any(&sluice_api::xds::plugin_options::to_struct(&options))),
        environment_variables: (!p.env.is_empty()).then(|| EnvironmentVariables {
            key_values: p.env.iter().cloned().collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let config = PluginConfig {
        name: p.name.clone(),
        root_id: p.root_id.clone().unwrap_or_default(),
        vm: Some(plugin_config::Vm::VmConfig(vm)),
        // The bytes the plugin is handed, as a Sluice gateway hands them
        // from its file: a text as it is, anything else as JSON.
        configuration: p.config.as_ref().map(|c| {
            let value = match c {
                serde_json::Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            any(&StringValue { value })
        }),
        failure_policy: match p.failure {
            PluginFailure::Closed => FailurePolicy::FailClosed,
            PluginFailure::Open => FailurePolicy::FailOpen,
            PluginFailure::Reload => FailurePolicy::FailReload,
        } as i32,
        ..Default::default()
    };
    let typed_config = if p.http {
        any(&envoy_types::pb::envoy::extensions::filters::http::wasm::v3::Wasm { config: Some(config) })
    } else {
        any(&envoy_types::pb::envoy::extensions::filters::network::wasm::v3::Wasm { config: Some(config) })
    };
    TypedExtensionConfig {
        name: p.name.clone(),
        typed_config: Some(typed_config),
    }
}

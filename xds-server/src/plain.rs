//! Plain Envoy resources: `Listener`, `RouteConfiguration`, `Cluster` and
//! `ClusterLoadAssignment` written in Envoy's own YAML or JSON form, in the
//! `envoy/` subdirectory of the configuration directory, and served as they
//! are to every node, beside what `sluice-xds` makes of the `sluice.yaml`
//! vocabulary. This is how a proxyless gRPC client, or an Envoy that needs
//! more than Sluice's translation, gets its configuration from the same
//! server.
//!
//! Why a subdirectory rather than a file suffix: every `.yaml` directly in
//! the directory is a `sluice.yaml` fragment (unknown keys refused), so an
//! Envoy file there would be rejected by that reader; `envoy/` keeps the two
//! vocabularies apart, needs no rule in the `sluice.yaml` reader, and lets
//! Envoy's tools and editors treat the whole folder as Envoy's.
//!
//! Reading is sans-IO ([`Plain::parse`] takes names and texts; only
//! [`Plain::load_dir`] touches the disk). Each resource is decoded by
//! prost-reflect against the descriptors of the vendored Envoy API files
//! (`xds-server/proto`, compiled by `build.rs`) *while* the YAML or JSON is
//! parsed, so an unknown field, a bad enum value or an unknown `@type` is
//! reported at its line and column. It is then turned, once, into the
//! envoy-types struct, checked (a name, no name twice per type, the routes
//! and endpoints it refers to exist), and what is served is encoded from
//! that struct.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::LazyLock;

use envoy_types::pb::envoy::config::cluster::v3::{Cluster, cluster};
use envoy_types::pb::envoy::config::core::v3::{ConfigSource, config_source::ConfigSourceSpecifier};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use prost_reflect::{DescriptorPool, DynamicMessage};
use ring::digest;
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;

use crate::snapshot::{Resource, type_url};

/// The subdirectory of the configuration directory that holds them.
pub const DIR: &str = "envoy";

/// The descriptor set `build.rs` compiles from `proto/vendor`.
const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envoy_descriptors.bin"));

/// Decoded once, on first use (a few milliseconds).
static POOL: LazyLock<Result<DescriptorPool, String>> =
    LazyLock::new(|| DescriptorPool::decode(DESCRIPTORS).map_err(|e| e.to_string()));

/// The types a plain resource may be.
pub const TYPES: [&str; 4] = [
    type_url::LISTENER,
    type_url::ROUTE_CONFIGURATION,
    type_url::CLUSTER,
    type_url::CLUSTER_LOAD_ASSIGNMENT,
];

/// Where a resource, or a problem, is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct At {
    pub file: String,
    /// 1-based; 0 when unknown (JSON gives positions only for parse errors).
    pub line: u32,
    pub column: u32,
    /// `resources[2]` or `document 3` when the file holds several; empty
    /// otherwise.
    pub path: String,
}

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file)?;
        } else {
            write!(f, "{}:{}:{}", self.file, self.line, self.column)?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        Ok(())
    }
}

/// A problem with a plain resource, and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {kind}")]
pub struct PlainError {
    pub at: At,
    pub kind: PlainErrorKind,
}

/// What is wrong. Tests match on these exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlainErrorKind {
    /// The file or the directory cannot be read.
    #[error("cannot read: {message}")]
    Read { message: String },
    /// Not YAML/JSON, or not shaped as a resource or `resources:` list.
    #[error("{message}")]
    Syntax { message: String },
    /// A field the message does not have.
    #[error("unknown field `{field}`")]
    UnknownField { field: String },
    /// An enum value the enum does not have.
    #[error("unknown enum value `{value}`")]
    UnknownEnumValue { value: String },
    /// An `@type` (of the resource or of a `typed_config` in it) that
    /// sluice-xds has no descriptor for.
    #[error(
        "unknown type `{type_name}` (sluice-xds reads the four resource types and, behind `typed_config`, the HTTP connection manager, router, TCP proxy, TLS inspector, TLS transport sockets and upstream HTTP protocol options)"
    )]
    UnknownType { type_name: String },
    /// The resource has no `"@type"`.
    #[error(
        "no `\"@type\"`: say which resource this is, e.g. `\"@type\": {}`",
        type_url::CLUSTER
    )]
    MissingType,
    /// Any other value the protobuf JSON mapping refuses.
    #[error("{message}")]
    Invalid { message: String },
    /// A known type that is not one of the four resource types.
    #[error(
        "`{type_url}` is not served as a resource; the directory holds Listener, RouteConfiguration, Cluster and ClusterLoadAssignment"
    )]
    UnsupportedType { type_url: String },
    /// The resource has no name (`cluster_name` for a ClusterLoadAssignment).
    #[error("a {kind} needs a name")]
    MissingName { kind: &'static str },
    /// Two resources of one type have the same name.
    #[error("{kind} `{name}` is also defined at {first}")]
    DuplicateName {
        kind: &'static str,
        name: String,
        first: String,
    },
    /// An HTTP connection manager takes its routes over ADS from a
    /// RouteConfiguration that no file defines.
    #[error(
        "listener `{listener}` takes its routes from RouteConfiguration `{route}`, which no file in {DIR}/ defines"
    )]
    UnknownRoute { listener: String, route: String },
    /// An EDS cluster's endpoints come over ADS from a
    /// ClusterLoadAssignment that no file defines.
    #[error(
        "EDS cluster `{cluster}` takes its endpoints from ClusterLoadAssignment `{service}`, which no file in {DIR}/ defines"
    )]
    UnknownEndpoints { cluster: String, service: String },
    /// A name `sluice-xds` also gives a resource it makes from the
    /// `sluice.yaml` listeners.
    #[error(
        "{kind} `{name}` is also made from a `sluice.yaml` listener (see docs/envoy-translation.md); rename one of them"
    )]
    Clash { kind: &'static str, name: String },
}

impl From<PlainError> for sluice_api::ConfigError {
    fn from(e: PlainError) -> Self {
        sluice_api::ConfigError {
            file: e.at.file,
            line: e.at.line,
            column: e.at.column,
            path: e.at.path,
            kind: sluice_api::ConfigErrorKind::InvalidValue {
                message: e.kind.to_string(),
            },
        }
    }
}

/// The plain Envoy resources of a directory, checked, in the order read.
#[derive(Debug, Clone, Default)]
pub struct Plain {
    resources: Vec<(At, Resource)>,
}

impl Plain {
    /// Reads `<config_dir>/envoy/`: every `.yaml`, `.yml` and `.json` file
    /// directly in it, in name order. No such directory: no resources.
    pub fn load_dir(config_dir: &Path) -> Result<Self, Vec<PlainError>> {
        let dir = config_dir.join(DIR);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => {
                return Err(vec![PlainError {
                    at: At {
                        file: dir.display().to_string(),
                        ..At::default()
                    },
                    kind: PlainErrorKind::Read { message: e.to_string() },
                }]);
            }
        };
        let mut paths: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && Format::of(&p.to_string_lossy()).is_some())
            .collect();
        paths.sort();
        let mut files = Vec::new();
        let mut errors = Vec::new();
        for p in paths {
            let name = p.display().to_string();
            match std::fs::read_to_string(&p) {
                Ok(text) => files.push((name, text)),
                Err(e) => errors.push(PlainError {
                    at: At {
                        file: name,
                        ..At::default()
                    },
                    kind: PlainErrorKind::Read { message: e.to_string() },
                }),
            }
        }
        match Self::parse(files.iter().map(|(n, t)| (n.as_str(), t.as_str()))) {
            Ok(p) if errors.is_empty() => Ok(p),
            Ok(_) => Err(errors),
            Err(more) => {
                errors.extend(more);
                Err(errors)
            }
        }
    }

    /// Reads and checks files given as (name, text); a name ending in
    /// `.json` is JSON, any other YAML. Every problem of every file is
    /// returned.
    pub fn parse<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<Self, Vec<PlainError>> {
        let mut errors = Vec::new();
        let mut read = Vec::new();
        for (name, text) in files {
            match read_file(name, text) {
                Ok(items) => read.extend(items),
                Err(e) => errors.push(e),
            }
        }
        let mut typed = Vec::new();
        for (at, any) in read {
            match Typed::decode(&any) {
                Ok(t) => typed.push((at, t, any)),
                Err(kind) => errors.push(PlainError { at, kind }),
            }
        }
        errors.extend(check(&typed));
        if !errors.is_empty() {
            return Err(errors);
        }
        let resources = typed
            .into_iter()
            .map(|(at, t, read)| {
                let r = Resource::with_version(t.name(), read.version, t.encode());
                let r = match t.eds_name() {
                    Some(n) => r.with_eds_name(n),
                    None => r,
                };
                (at, r)
            })
            .collect();
        Ok(Self { resources })
    }

    /// The resources, in the order read.
    pub fn resources(&self) -> impl Iterator<Item = &Resource> {
        self.resources.iter().map(|(_, r)| r)
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.resources.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty()
    }

    /// Adds the resources to `made` (what `sluice-xds` made from the
    /// `sluice.yaml` listeners), refusing a name both give one type: a
    /// client would get one of the two without a word.
    pub fn add_to(&self, made: &mut Vec<Resource>) -> Result<(), PlainError> {
        for (at, r) in &self.resources {
            if made.iter().any(|m| m.name == r.name && m.type_url() == r.type_url()) {
                return Err(PlainError {
                    at: at.clone(),
                    kind: PlainErrorKind::Clash {
                        kind: kind_of(r.type_url()),
                        name: r.name.clone(),
                    },
                });
            }
        }
        made.extend(self.resources.iter().map(|(_, r)| r.clone()));
        Ok(())
    }

    /// The names of the listeners.
    pub fn listener_names(&self) -> Vec<String> {
        self.resources
            .iter()
            .filter(|(_, r)| r.type_url() == type_url::LISTENER)
            .map(|(_, r)| r.name.clone())
            .collect()
    }

    /// Like [`Plain::add_to`], for Sluice gateways: a listener with an
    /// `api_listener` (a gRPC client's) is left out, as Envoy leaves it
    /// out; a gateway runs TCP listeners.
    pub fn add_for_gateways(&self, made: &mut Vec<Resource>) -> Result<(), PlainError> {
        let before = made.len();
        self.add_to(made)?;
        let mut i = before;
        while i < made.len() {
            let api = made[i].type_url() == sluice_api::xds::type_url::LISTENER
                && envoy_types::pb::envoy::config::listener::v3::Listener::decode(made[i].body.value.as_slice())
                    .is_ok_and(|l| l.api_listener.is_some());
            if api {
                made.remove(i);
            } else {
                i += 1;
            }
        }
        Ok(())
    }
}

/// Whether `config_dir` holds an `envoy/` subdirectory and no `sluice.yaml`
/// file of its own (no `.yaml` or `.yml` directly in it).
pub fn only_envoy(config_dir: &Path) -> bool {
    let yaml = std::fs::read_dir(config_dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .any(|e| {
            let p = e.path();
            p.is_file() && matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml"))
        });
    !yaml && config_dir.join(DIR).is_dir()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Yaml,
    Json,
}

impl Format {
    fn of(name: &str) -> Option<Self> {
        let ext = name.rsplit_once('.')?.1;
        match ext {
            "yaml" | "yml" => Some(Self::Yaml),
            "json" => Some(Self::Json),
            _ => None,
        }
    }
}

/// One resource as read: its `Any` (envoy-types') and a version made from
/// its content.
#[derive(Debug)]
struct Read {
    any: Any,
    version: String,
}

/// Reads one file: one resource per YAML document, or a `resources:` list.
fn read_file(name: &str, text: &str) -> Result<Vec<(At, Read)>, PlainError> {
    let docs: Vec<(At, Doc)> = match Format::of(name) {
        Some(Format::Json) => {
            let mut de = serde_json::Deserializer::from_str(text);
            let doc = Doc::deserialize(&mut de)
                .and_then(|d| de.end().map(|()| d))
                .map_err(|e| json_error(name, &e))?;
            vec![(
                At {
                    file: name.to_owned(),
                    ..At::default()
                },
                doc,
            )]
        }
        _ => {
            let docs: Vec<Option<Spanned<Doc>>> =
                serde_saphyr::from_multiple(text).map_err(|e| yaml_error(name, text, &e))?;
            let several = docs.iter().flatten().count() > 1;
            docs.into_iter()
                .enumerate()
                .filter_map(|(i, d)| Some((i, d?)))
                .map(|(i, d)| {
                    let at = At {
                        file: name.to_owned(),
                        line: line_of(d.referenced),
                        column: column_of(d.referenced),
                        path: if several {
                            format!("document {}", i + 1)
                        } else {
                            String::new()
                        },
                    };
                    (at, d.value)
                })
                .collect()
        }
    };
    let mut out = Vec::new();
    for (at, doc) in docs {
        match doc {
            Doc::One(item) => out.push((at, item.0)),
            Doc::Many(items) => {
                for (i, item) in items.into_iter().enumerate() {
                    let spanned = item.referenced.line() > 0;
                    let item_at = At {
                        file: at.file.clone(),
                        line: if spanned { line_of(item.referenced) } else { at.line },
                        column: if spanned { column_of(item.referenced) } else { at.column },
                        path: if at.path.is_empty() {
                            format!("resources[{i}]")
                        } else {
                            format!("{}: resources[{i}]", at.path)
                        },
                    };
                    out.push((item_at, item.value.0));
                }
            }
        }
    }
    Ok(out)
}

fn line_of(l: serde_saphyr::Location) -> u32 {
    u32::try_from(l.line()).unwrap_or(u32::MAX)
}

fn column_of(l: serde_saphyr::Location) -> u32 {
    u32::try_from(l.column()).unwrap_or(u32::MAX)
}

fn yaml_error(file: &str, text: &str, e: &serde_saphyr::Error) -> PlainError {
    let e = e.without_snippet();
    let at = e.location().unwrap_or(serde_saphyr::Location::UNKNOWN);
    let message = match e {
        serde_saphyr::Error::Message { msg, .. } => msg.clone(),
        other => other.to_string(),
    };
    let kind = classify(message);
    let (line, column) = if at.line() > 0 {
        (line_of(at), column_of(at))
    } else {
        // serde-saphyr gives no position for what prost-reflect refuses;
        // the first place the offending word appears is nearly always it.
        locate(text, &kind).unwrap_or((0, 0))
    };
    PlainError {
        at: At {
            file: file.to_owned(),
            line,
            column,
            path: String::new(),
        },
        kind,
    }
}

/// Line and column (1-based) of the first key `field`, or the first scalar
/// `value`, or the first mention of a type, in YAML text.
fn locate(text: &str, kind: &PlainErrorKind) -> Option<(u32, u32)> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '.' || c == '-';
    let word_at = |line: &str, word: &str, then: &dyn Fn(&str) -> bool| {
        line.match_indices(word).find_map(|(i, _)| {
            let before = line[..i].chars().next_back();
            let after = &line[i + word.len()..];
            let whole = !before.is_some_and(is_word) && !after.chars().next().is_some_and(is_word);
            (whole && then(after.trim_start_matches(['"', '\'']))).then_some(i)
        })
    };
    let (word, then): (&str, &dyn Fn(&str) -> bool) = match kind {
        PlainErrorKind::UnknownField { field } => (field, &|after: &str| after.trim_start().starts_with(':')),
        PlainErrorKind::UnknownEnumValue { value } => (value, &|_: &str| true),
        PlainErrorKind::UnknownType { type_name } => (type_name, &|_: &str| true),
        _ => return None,
    };
    text.lines().enumerate().find_map(|(n, line)| {
        let i = word_at(line, word, then)?;
        let column = line[..i].chars().count() + 1;
        Some((u32::try_from(n + 1).ok()?, u32::try_from(column).ok()?))
    })
}

fn json_error(file: &str, e: &serde_json::Error) -> PlainError {
    // serde_json appends " at line L column C" to every message.
    let full = e.to_string();
    let message = full
        .rsplit_once(" at line ")
        .map_or(full.as_str(), |(m, _)| m)
        .to_owned();
    let kind = if e.is_syntax() || e.is_eof() {
        PlainErrorKind::Syntax { message }
    } else {
        classify(message)
    };
    PlainError {
        at: At {
            file: file.to_owned(),
            line: u32::try_from(e.line()).unwrap_or(u32::MAX),
            column: u32::try_from(e.column()).unwrap_or(u32::MAX),
            path: String::new(),
        },
        kind,
    }
}

/// Sorts what prost-reflect (or the document shape) said into kinds a
/// caller can match on; anything else keeps its words.
fn classify(message: String) -> PlainErrorKind {
    let quoted = |prefix: &str| {
        let rest = message.strip_prefix(prefix)?;
        Some(rest.split('\'').next()?.to_owned())
    };
    if let Some(field) = quoted("unrecognized field name '") {
        PlainErrorKind::UnknownField { field }
    } else if let Some(value) = quoted("unrecognized enum value '") {
        PlainErrorKind::UnknownEnumValue { value }
    } else if let Some(type_name) = quoted("message '").filter(|_| message.ends_with("' not found")) {
        PlainErrorKind::UnknownType { type_name }
    } else if message.contains("'@type'") || message.contains("`@type`") {
        PlainErrorKind::MissingType
    } else if message.starts_with(SHAPE) {
        PlainErrorKind::Syntax { message }
    } else {
        PlainErrorKind::Invalid { message }
    }
}

/// How a document that is neither shape is refused.
const SHAPE: &str = "expected a resource";

/// A document: one resource, or `resources:` with a list of them (the form
/// of Envoy's own file-based xDS).
enum Doc {
    One(Item),
    Many(Vec<Spanned<Item>>),
}

impl<'de> Deserialize<'de> for Doc {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(DocVisitor)
    }
}

struct DocVisitor;

impl<'de> Visitor<'de> for DocVisitor {
    type Value = Doc;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SHAPE} (a mapping with \"@type\") or `resources:` with a list of them"
        )
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Doc, A::Error> {
        let Some(first) = map.next_key::<String>()? else {
            return Err(de::Error::custom(format!(
                "{SHAPE} (a mapping with \"@type\"), found an empty mapping"
            )));
        };
        if first == "resources" {
            let items = map.next_value::<Vec<Spanned<Item>>>()?;
            if let Some(k) = map.next_key::<String>()? {
                return Err(de::Error::custom(format!(
                    "{SHAPE} list: `resources:` stands alone in its document, found `{k}` beside it"
                )));
            }
            return Ok(Doc::Many(items));
        }
        // One resource: hand the whole mapping, first key included, to
        // prost-reflect.
        let replay = Replay {
            first: Some(first),
            rest: map,
        };
        Item::deserialize(de::value::MapAccessDeserializer::new(replay)).map(Doc::One)
    }
}

/// A mapping whose first key was already read.
struct Replay<A> {
    first: Option<String>,
    rest: A,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Replay<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        match self.first.take() {
            Some(k) => seed.deserialize(k.into_deserializer()).map(Some),
            None => self.rest.next_key_seed(seed),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.rest.next_value_seed(seed)
    }
}

/// One resource, decoded by prost-reflect as a `google.protobuf.Any` in
/// the JSON mapping (`"@type"` and the message's fields).
struct Item(Read);

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pool = POOL.as_ref().map_err(de::Error::custom)?;
        let desc = pool
            .get_message_by_name("google.protobuf.Any")
            .ok_or_else(|| de::Error::custom("message 'google.protobuf.Any' not found"))?;
        let dynamic: DynamicMessage = desc.deserialize(d)?;
        let any = dynamic.transcode_to::<Any>().map_err(de::Error::custom)?;
        // The version is a hash of the JSON form with keys sorted: the
        // protobuf encoding of a map is in hash order, so equal content
        // could otherwise get a new version at every reload.
        let json = serde_json::to_value(&dynamic).map_err(de::Error::custom)?;
        let mut ctx = digest::Context::new(&digest::SHA256);
        feed(&json, &mut ctx);
        let version = crate::snapshot::short_hex(ctx.finish().as_ref());
        Ok(Item(Read { any, version }))
    }
}

/// Feeds a JSON value to a digest, objects with their keys sorted, every
/// string length-prefixed.
fn feed(v: &serde_json::Value, ctx: &mut digest::Context) {
    use serde_json::Value;
    let string = |s: &str, ctx: &mut digest::Context| {
        ctx.update(&(s.len() as u64).to_be_bytes());
        ctx.update(s.as_bytes());
    };
    match v {
        Value::Object(m) => {
            ctx.update(b"{");
            let mut entries: Vec<_> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in entries {
                string(k, ctx);
                feed(v, ctx);
            }
            ctx.update(b"}");
        }
        Value::Array(a) => {
            ctx.update(b"[");
            for v in a {
                feed(v, ctx);
            }
            ctx.update(b"]");
        }
        Value::String(s) => {
            ctx.update(b"s");
            string(s, ctx);
        }
        other => {
            ctx.update(b"v");
            string(&other.to_string(), ctx);
        }
    }
}

/// A resource as envoy-types' struct (boxed: they differ a lot in size).
#[derive(Debug)]
enum Typed {
    Listener(Box<Listener>),
    Route(Box<RouteConfiguration>),
    Cluster(Box<Cluster>),
    Endpoints(Box<ClusterLoadAssignment>),
}

impl Typed {
    fn decode(read: &Read) -> Result<Self, PlainErrorKind> {
        let bytes = read.any.value.as_slice();
        let bad = |e: prost::DecodeError| PlainErrorKind::Invalid { message: e.to_string() };
        let t = match read.any.type_url.as_str() {
            type_url::LISTENER => Self::Listener(Box::new(Listener::decode(bytes).map_err(bad)?)),
            type_url::ROUTE_CONFIGURATION => Self::Route(Box::new(RouteConfiguration::decode(bytes).map_err(bad)?)),
            type_url::CLUSTER => Self::Cluster(Box::new(Cluster::decode(bytes).map_err(bad)?)),
            type_url::CLUSTER_LOAD_ASSIGNMENT => {
                Self::Endpoints(Box::new(ClusterLoadAssignment::decode(bytes).map_err(bad)?))
            }
            other => {
                return Err(PlainErrorKind::UnsupportedType {
                    type_url: other.to_owned(),
                });
            }
        };
        if t.name().is_empty() {
            return Err(PlainErrorKind::MissingName { kind: t.kind() });
        }
        Ok(t)
    }

    fn name(&self) -> &str {
        match self {
            Self::Listener(l) => &l.name,
            Self::Route(r) => &r.name,
            Self::Cluster(c) => &c.name,
            Self::Endpoints(e) => &e.cluster_name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Listener(_) => "Listener",
            Self::Route(_) => "RouteConfiguration",
            Self::Cluster(_) => "Cluster",
            Self::Endpoints(_) => "ClusterLoadAssignment",
        }
    }

    /// What is served: the struct, encoded again.
    fn encode(&self) -> Any {
        fn any<M: Message + Name>(m: &M) -> Any {
            Any {
                type_url: M::type_url(),
                value: m.encode_to_vec(),
            }
        }
        match self {
            Self::Listener(l) => any(l.as_ref()),
            Self::Route(r) => any(r.as_ref()),
            Self::Cluster(c) => any(c.as_ref()),
            Self::Endpoints(e) => any(e.as_ref()),
        }
    }

    /// For an EDS cluster, the ClusterLoadAssignment it asks for.
    fn eds_name(&self) -> Option<&str> {
        let Self::Cluster(c) = self else { return None };
        let eds =
            c.cluster_discovery_type == Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32));
        if !eds {
            return None;
        }
        let service = c.eds_cluster_config.as_ref().map_or("", |e| e.service_name.as_str());
        Some(if service.is_empty() { &c.name } else { service })
    }

    /// Whether an EDS cluster's endpoints come from this server (ADS or
    /// `self`); from elsewhere they are not this directory's business.
    fn eds_over_ads(&self) -> bool {
        let Self::Cluster(c) = self else { return false };
        over_ads(c.eds_cluster_config.as_ref().and_then(|e| e.eds_config.as_ref()))
    }

    /// The RouteConfigurations a Listener's HTTP connection managers take
    /// over ADS (in its API listener and its filter chains).
    fn routes(&self) -> Vec<String> {
        let Self::Listener(l) = self else { return Vec::new() };
        let api = l.api_listener.as_ref().and_then(|a| a.api_listener.as_ref());
        let chains = l.filter_chains.iter().chain(l.default_filter_chain.as_ref());
        let filters = chains.flat_map(|c| &c.filters).filter_map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) => Some(any),
            _ => None,
        });
        api.into_iter()
            .chain(filters)
            .filter(|a| a.type_url == HttpConnectionManager::type_url())
            .filter_map(|a| HttpConnectionManager::decode(a.value.as_slice()).ok())
            .filter_map(|hcm| match hcm.route_specifier {
                Some(RouteSpecifier::Rds(rds)) if over_ads(rds.config_source.as_ref()) => Some(rds.route_config_name),
                _ => None,
            })
            .collect()
    }
}

fn over_ads(source: Option<&ConfigSource>) -> bool {
    matches!(
        source.and_then(|s| s.config_source_specifier.as_ref()),
        Some(ConfigSourceSpecifier::Ads(_) | ConfigSourceSpecifier::Self_(_))
    )
}

fn kind_of(type_url: &str) -> &'static str {
    match type_url {
        type_url::LISTENER => "Listener",
        type_url::ROUTE_CONFIGURATION => "RouteConfiguration",
        type_url::CLUSTER => "Cluster",
        type_url::CLUSTER_LOAD_ASSIGNMENT => "ClusterLoadAssignment",
        _ => "resource",
    }
}

/// What must hold across resources: no name twice per type, and every
/// route and endpoint set that is to come over ADS is here.
fn check(typed: &[(At, Typed, Read)]) -> Vec<PlainError> {
    let mut errors = Vec::new();
    let mut seen: BTreeMap<(&'static str, &str), &At> = BTreeMap::new();
    for (at, t, _) in typed {
        match seen.entry((t.kind(), t.name())) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(at);
            }
            std::collections::btree_map::Entry::Occupied(first) => errors.push(PlainError {
                at: at.clone(),
                kind: PlainErrorKind::DuplicateName {
                    kind: t.kind(),
                    name: t.name().to_owned(),
                    first: first.get().to_string(),
                },
            }),
        }
    }
    let names = |kind: &str| -> BTreeSet<&str> {
        typed
            .iter()
            .filter(|(_, t, _)| t.kind() == kind)
            .map(|(_, t, _)| t.name())
            .collect()
    };
    let routes = names("RouteConfiguration");
    let endpoints = names("ClusterLoadAssignment");
    for (at, t, _) in typed {
        for route in t.routes() {
            if !routes.contains(route.as_str()) {
                errors.push(PlainError {
                    at: at.clone(),
                    kind: PlainErrorKind::UnknownRoute {
                        listener: t.name().to_owned(),
                        route,
                    },
                });
            }
        }
        if let Some(service) = t.eds_name()
            && t.eds_over_ads()
            && !endpoints.contains(service)
        {
            errors.push(PlainError {
                at: at.clone(),
                kind: PlainErrorKind::UnknownEndpoints {
                    cluster: t.name().to_owned(),
                    service: service.to_owned(),
                },
            });
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

    use envoy_types::pb::envoy::config::listener::v3::ApiListener;

    use super::*;

    /// What a proxyless gRPC client dialing `xds:///greeter` needs: an API
    /// listener whose HTTP connection manager takes its routes over ADS, the
    /// routes, an EDS cluster and its endpoints in two weighted localities.
    const GRPC_SET: &str = r#"
"@type": type.googleapis.com/envoy.config.listener.v3.Listener
name: greeter
api_listener:
  api_listener:
    "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
    rds:
      route_config_name: greeter-routes
      config_source: {ads: {}, resource_api_version: V3}
    http_filters:
    - name: router
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
---
"@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
name: greeter-routes
virtual_hosts:
- name: greeter
  domains: ["*"]
  routes:
  - match: {prefix: ""}
    route: {cluster: greeter-backends}
---
"@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
name: greeter-backends
type: EDS
eds_cluster_config:
  service_name: greeter-endpoints
  eds_config: {ads: {}, resource_api_version: V3}
lb_policy: ROUND_ROBIN
---
"@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
cluster_name: greeter-endpoints
endpoints:
- locality: {zone: a}
  load_balancing_weight: 3
  lb_endpoints:
  - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 50051}}}
- locality: {zone: b}
  load_balancing_weight: 1
  lb_endpoints:
  - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 50052}}}
"#;

    fn one(name: &str, text: &str) -> Result<Plain, Vec<PlainError>> {
        Plain::parse([(name, text)])
    }

    /// The only error of `text`.
    fn error(name: &str, text: &str) -> PlainError {
        let mut errors = one(name, text).expect_err("should be refused");
        assert_eq!(errors.len(), 1, "{errors:#?}");
        errors.remove(0)
    }

    fn find<'a>(p: &'a Plain, type_url: &str, name: &str) -> &'a Resource {
        p.resources()
            .find(|r| r.type_url() == type_url && r.name == name)
            .unwrap_or_else(|| panic!("no {type_url} {name}"))
    }

    #[test]
    fn good_yaml_documents_become_the_four_resources() {
        let p = one("grpc.yaml", GRPC_SET).unwrap();
        assert_eq!(p.len(), 4);
        let l = Listener::decode(find(&p, type_url::LISTENER, "greeter").body.value.as_slice()).unwrap();
        let hcm = l.api_listener.and_then(|a: ApiListener| a.api_listener).unwrap();
        let hcm = HttpConnectionManager::decode(hcm.value.as_slice()).unwrap();
        let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
            panic!("no rds: {hcm:?}")
        };
        assert_eq!(rds.route_config_name, "greeter-routes");
        assert_eq!(hcm.http_filters.len(), 1);
        find(&p, type_url::ROUTE_CONFIGURATION, "greeter-routes");
        let c = find(&p, type_url::CLUSTER, "greeter-backends");
        assert_eq!(
            c.eds_name.as_deref(),
            Some("greeter-endpoints"),
            "so the core resends the CLA while it warms"
        );
        let cla = ClusterLoadAssignment::decode(
            find(&p, type_url::CLUSTER_LOAD_ASSIGNMENT, "greeter-endpoints")
                .body
                .value
                .as_slice(),
        )
        .unwrap();
        let weights: Vec<u32> = cla
            .endpoints
            .iter()
            .map(|e| e.load_balancing_weight.unwrap().value)
            .collect();
        assert_eq!(weights, [3, 1]);
        // Where each one is, for the messages about it.
        let at: Vec<String> = p.resources.iter().map(|(at, _)| at.to_string()).collect();
        assert_eq!(at[0], "grpc.yaml:2:1: document 1", "{at:?}");
        assert!(
            at[3].starts_with("grpc.yaml:") && at[3].ends_with("document 4"),
            "{at:?}"
        );
    }

    #[test]
    fn gateways_get_the_tcp_listeners_and_not_the_grpc_ones() {
        let tcp = "\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener
name: edge
address: {socket_address: {address: 127.0.0.1, port_value: 15001}}
listener_filters:
- name: envoy.filters.listener.original_dst
  typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst}
- name: envoy.filters.listener.http_inspector
  typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector}
filter_chains:
- filters:
  - name: envoy.filters.network.tcp_proxy
    typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy, stat_prefix: e, cluster: c}
";
        let p = Plain::parse([("grpc.yaml", GRPC_SET), ("edge.yaml", tcp)]).unwrap();
        let (mut all, mut gateways) = (Vec::new(), Vec::new());
        p.add_to(&mut all).unwrap();
        p.add_for_gateways(&mut gateways).unwrap();
        let listeners = |v: &[Resource]| -> Vec<String> {
            v.iter()
                .filter(|r| r.type_url() == type_url::LISTENER)
                .map(|r| r.name.clone())
                .collect()
        };
        assert_eq!(listeners(&all), ["greeter", "edge"]);
        assert_eq!(listeners(&gateways), ["edge"]);
        assert_eq!(gateways.len(), all.len() - 1);
    }

    #[test]
    fn good_json_with_a_resources_list() {
        let json = r#"{"resources": [
          {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
           "name": "c", "type": "EDS", "connectTimeout": "0.25s",
           "edsClusterConfig": {"edsConfig": {"self": {}}}},
          {"@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
           "cluster_name": "c", "endpoints": [{"lb_endpoints": [{"endpoint": {"address":
             {"socket_address": {"address": "127.0.0.1", "port_value": 8080}}}}]}]}
        ]}"#;
        let p = one("eds.json", json).unwrap();
        assert_eq!(p.len(), 2);
        let c = find(&p, type_url::CLUSTER, "c");
        assert_eq!(c.eds_name.as_deref(), Some("c"), "no service_name: the cluster's name");
        let decoded = Cluster::decode(c.body.value.as_slice()).unwrap();
        assert_eq!(decoded.connect_timeout.unwrap().nanos, 250_000_000);
        assert_eq!(p.resources[1].0.to_string(), "eds.json: resources[1]");
    }

    #[test]
    fn a_yaml_resources_list_has_a_line_per_resource() {
        let yaml = "resources:\n- \"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration\n  name: a\n- \"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration\n  name: b\n";
        let p = one("routes.yml", yaml).unwrap();
        let at: Vec<String> = p.resources.iter().map(|(at, _)| at.to_string()).collect();
        assert_eq!(at, ["routes.yml:2:3: resources[0]", "routes.yml:4:3: resources[1]"]);
    }

    #[test]
    fn unknown_field_is_refused_where_it_is() {
        let bad = GRPC_SET.replace("lb_policy: ROUND_ROBIN", "lb_policy: ROUND_ROBIN\nlb_polcy: RANDOM");
        let e = error("grpc.yaml", &bad);
        assert_eq!(
            e.kind,
            PlainErrorKind::UnknownField {
                field: "lb_polcy".into()
            }
        );
        assert_eq!(e.at.file, "grpc.yaml");
        let line = bad.lines().position(|l| l.starts_with("lb_polcy")).unwrap() + 1;
        assert_eq!(e.at.line as usize, line, "{e}");
        // Inside a typed_config too.
        let bad = GRPC_SET.replace("route_config_name:", "route_config_nam:");
        let e = error("grpc.yaml", &bad);
        assert_eq!(
            e.kind,
            PlainErrorKind::UnknownField {
                field: "route_config_nam".into()
            }
        );
        assert!(e.at.line > 0, "{e}");
    }

    #[test]
    fn bad_enum_value_is_refused() {
        let bad = GRPC_SET.replace("type: EDS", "type: EDZ");
        let e = error("grpc.yaml", &bad);
        assert_eq!(e.kind, PlainErrorKind::UnknownEnumValue { value: "EDZ".into() });
        let line = bad.lines().position(|l| l == "type: EDZ").unwrap() + 1;
        assert_eq!(e.to_string(), format!("grpc.yaml:{line}:7: unknown enum value `EDZ`"));
        let e = error(
            "c.json",
            r#"{"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": "c",
               "lb_policy": "FASTEST"}"#,
        );
        assert_eq!(
            e.kind,
            PlainErrorKind::UnknownEnumValue {
                value: "FASTEST".into()
            }
        );
        assert_eq!(e.at.line, 2, "JSON errors have their line too: {e}");
    }

    #[test]
    fn unknown_and_unsupported_types_are_refused() {
        let e = error(
            "x.yaml",
            "\"@type\": type.googleapis.com/envoy.config.listener.v3.Listenr\nname: x\n",
        );
        assert_eq!(
            e.kind,
            PlainErrorKind::UnknownType {
                type_name: "envoy.config.listener.v3.Listenr".into()
            }
        );
        // A filter sluice-xds has no descriptor for.
        let bad = GRPC_SET.replace(
            "envoy.extensions.filters.http.router.v3.Router",
            "envoy.extensions.filters.http.wasm.v3.Wasm",
        );
        let e = error("grpc.yaml", &bad);
        let line = bad.lines().position(|l| l.contains("wasm.v3.Wasm")).unwrap() + 1;
        assert_eq!(e.at.line as usize, line, "{e}");
        assert_eq!(
            e.kind,
            PlainErrorKind::UnknownType {
                type_name: "envoy.extensions.filters.http.wasm.v3.Wasm".into()
            }
        );
        // Known, but not a resource.
        let e = error(
            "hcm.yaml",
            "\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n",
        );
        assert_eq!(
            e.kind,
            PlainErrorKind::UnsupportedType {
                type_url: "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router".into()
            }
        );
        let e = error("x.yaml", "name: x\nconnect_timeout: 1s\n");
        assert_eq!(e.kind, PlainErrorKind::MissingType, "{e}");
    }

    #[test]
    fn names_are_required_and_unique_per_type() {
        let route = |name: &str| {
            format!("\"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration\nname: {name}\n")
        };
        let e = error(
            "r.yaml",
            "\"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration\n",
        );
        assert_eq!(
            e.kind,
            PlainErrorKind::MissingName {
                kind: "RouteConfiguration"
            }
        );
        let errors = Plain::parse([("a.yaml", route("r").as_str()), ("b.yaml", route("r").as_str())]).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].at.file, "b.yaml");
        assert_eq!(
            errors[0].kind,
            PlainErrorKind::DuplicateName {
                kind: "RouteConfiguration",
                name: "r".into(),
                first: "a.yaml:1:1".into()
            }
        );
        // The same name for another type is another resource.
        let cluster = "\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\nname: r\n";
        assert_eq!(
            Plain::parse([("a.yaml", route("r").as_str()), ("c.yaml", cluster)])
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn routes_and_endpoints_taken_over_ads_must_be_here() {
        let without = |kind: &str| {
            GRPC_SET
                .split("---")
                .filter(|d| !d.contains(kind))
                .collect::<Vec<_>>()
                .join("---")
        };
        let e = error("grpc.yaml", &without("v3.RouteConfiguration"));
        assert_eq!(
            e.kind,
            PlainErrorKind::UnknownRoute {
                listener: "greeter".into(),
                route: "greeter-routes".into()
            }
        );
        let e = error("grpc.yaml", &without("v3.ClusterLoadAssignment"));
        assert_eq!(
            e.kind,
            PlainErrorKind::UnknownEndpoints {
                cluster: "greeter-backends".into(),
                service: "greeter-endpoints".into()
            }
        );
        // Endpoints from elsewhere are not this directory's business.
        let elsewhere = without("v3.ClusterLoadAssignment").replace(
            "eds_config: {ads: {}, resource_api_version: V3}",
            "eds_config: {path_config_source: {path: /etc/eds.yaml}}",
        );
        assert_eq!(one("grpc.yaml", &elsewhere).unwrap().len(), 3);
    }

    #[test]
    fn every_file_is_checked_and_shapes_are_explained() {
        let errors = Plain::parse([
            (
                "a.yaml",
                "\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\nname: [\n",
            ),
            ("b.yaml", "- just a list\n"),
            ("c.yaml", "resources: []\nversion_info: \"1\"\n"),
            ("d.json", "{\"resources\": [}"),
        ])
        .unwrap_err();
        let files: Vec<&str> = errors.iter().map(|e| e.at.file.as_str()).collect();
        assert_eq!(files, ["a.yaml", "b.yaml", "c.yaml", "d.json"], "{errors:#?}");
        assert!(matches!(errors[3].kind, PlainErrorKind::Syntax { .. }), "{errors:#?}");
        let c = errors[2].to_string();
        assert!(
            c.contains("`resources:` stands alone") && c.contains("version_info"),
            "{c}"
        );
        // Comments only, or an empty file: nothing, and no error.
        assert!(
            Plain::parse([("e.yaml", "# nothing yet\n"), ("f.yml", "")])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn versions_follow_content_not_map_order() {
        let cluster = |meta: &str| {
            format!(
                "\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\nname: c\nmetadata:\n  filter_metadata:\n{meta}"
            )
        };
        let a = cluster("    x: {k: 1, j: 2}\n    y: {k: 3}\n    z: {k: 4}\n");
        let b = cluster("    z: {k: 4}\n    y: {k: 3}\n    x: {j: 2, k: 1}\n");
        let v = |t: &str| one("c.yaml", t).unwrap().resources().next().unwrap().version.clone();
        assert_eq!(v(&a), v(&b));
        assert_ne!(v(&a), v(&cluster("    x: {k: 1, j: 5}\n")));
        assert_eq!(v(&a), v(&a), "and the same at every reload");
    }

    #[test]
    fn a_name_sluice_also_makes_is_refused() {
        let p = one("grpc.yaml", GRPC_SET).unwrap();
        let made = Resource::new(
            "greeter",
            Any {
                type_url: type_url::LISTENER.into(),
                value: Vec::new(),
            },
        );
        let e = p.add_to(&mut vec![made.clone()]).unwrap_err();
        assert_eq!(
            e.kind,
            PlainErrorKind::Clash {
                kind: "Listener",
                name: "greeter".into()
            }
        );
        let mut other = vec![Resource {
            name: "other".into(),
            ..made
        }];
        p.add_to(&mut other).unwrap();
        assert_eq!(other.len(), 5);
    }

    #[test]
    fn served_from_the_directory_to_every_node_and_refused_with_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("policy.yaml"),
            "policies:\n  - {name: strict, default: deny}\ntargets:\n  - {name: lab, nodes: {ids: [lab-1]}, policy: strict}\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join(DIR)).unwrap();
        std::fs::write(dir.path().join(DIR).join("grpc.yaml"), GRPC_SET).unwrap();
        let loaded = crate::source::Source::Dir(dir.path().to_path_buf()).load().unwrap();
        for (policy, snap) in loaded.catalog.policies() {
            // Sluice gateways take Sluice-shaped listeners, not these.
            if policy.ends_with("[sluice gateways]") {
                continue;
            }
            for t in TYPES {
                assert_eq!(snap.resources(t).len(), 1, "{policy}: {t}");
            }
        }
        // A bad file in envoy/ is refused with the others' problems.
        std::fs::write(dir.path().join(DIR).join("bad.json"), "{\"@type\": 1}").unwrap();
        std::fs::write(dir.path().join("groups.yaml"), "webgroups: 3\n").unwrap();
        let e = crate::source::Source::Dir(dir.path().to_path_buf()).load().unwrap_err();
        let text = e.to_string();
        assert!(text.contains("bad.json") && text.contains("groups.yaml"), "{text}");
    }

    #[test]
    fn a_directory_of_envoy_resources_only_is_served() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(DIR)).unwrap();
        std::fs::write(dir.path().join(DIR).join("grpc.yaml"), GRPC_SET).unwrap();
        assert!(only_envoy(dir.path()));
        let loaded = crate::source::Source::Dir(dir.path().to_path_buf()).load().unwrap();
        for t in TYPES {
            assert_eq!(loaded.snapshot.resources(t).len(), 1, "{t}");
        }
    }

    /// The example of `docs/xds.md` reads, and its error messages are the
    /// ones shown there.
    #[test]
    fn the_documented_example_and_errors() {
        let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/xds.md")).unwrap();
        let section = doc.split("## Plain Envoy resources").nth(1).unwrap();
        let example = section.split("```yaml\n").nth(1).unwrap().split("```").next().unwrap();
        let p = one("greeter.yaml", example).unwrap();
        assert_eq!(p.len(), 4);
        let errors = section.split("```text\n").nth(1).unwrap().split("```").next().unwrap();
        let mut shown = errors.lines().map(|l| l.replace("/etc/sluice-xds/envoy/", ""));
        let e = error("greeter.yaml", &example.replace("type: EDS", "type: EDZ"));
        assert_eq!(Some(e.to_string()), shown.next());
        let routes = "\"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration\nname: greeter-routes\n";
        let errors = Plain::parse([("greeter.yaml", example), ("routes.yaml", routes)]).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(Some(errors[0].to_string()), shown.next());
    }

    /// The DNS listener of `docs/envoy-api-support.md` reads, and a
    /// gateway runs it as a DNS listener with its settings.
    #[test]
    fn the_documented_dns_listener() {
        use sluice_api::xds::gateway::{SpecKind, gateway_listener};
        let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/envoy-api-support.md"))
            .unwrap();
        let block = doc.split("```yaml\n").nth(1).unwrap().split("```").next().unwrap();
        // The block is indented under its list item.
        let example: String = block
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
            .collect();
        let p = one("dns.yaml", &example).unwrap();
        let l = sluice_api::xds::decode_listener(&find(&p, type_url::LISTENER, "dns").body).unwrap();
        let spec = gateway_listener(&l, &BTreeMap::new(), &BTreeMap::new()).unwrap();
        let SpecKind::Sluice { options, .. } = spec.kind else {
            panic!("{spec:?}")
        };
        assert_eq!(
            options,
            r#"{"deny_answer":"refused","upstreams":["udp://10.0.0.53:53"]}"#
        );
    }

    #[test]
    fn the_vendored_protos_are_those_of_the_envoy_types_in_use() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let vendored = std::fs::read_to_string(root.join("proto/vendor/ENVOY_TYPES_VERSION")).unwrap();
        let workspace = std::fs::read_to_string(root.join("../Cargo.toml")).unwrap();
        let wanted = format!("envoy-types = \"={}\"", vendored.trim());
        assert!(
            workspace.contains(&wanted),
            "Cargo.toml does not say {wanted}: copy the protos again (xds-server/proto/README.md)"
        );
    }
}

//! The etcd store: a configuration's files kept under a key prefix, read
//! and watched by every control-server replica, written by `apply`,
//! `delete` and `import` in one transaction each.
//!
//! Keys: `PREFIX/files/NAME` holds a file ([`super::files`]), and
//! `PREFIX/revision` is rewritten by every write, so that a write based on
//! what was read at revision R can be refused when anything changed since,
//! deletions included (a range comparison alone cannot see a key that is
//! gone).

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::files::FileSet;
use super::pb::etcdserverpb as rpc;
use super::pb::etcdserverpb::kv_client::KvClient;
use super::pb::etcdserverpb::watch_client::WatchClient;
use super::pb::mvccpb;

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `etcd://HOST:PORT[,HOST:PORT…]/PREFIX`, or `etcds://…` for TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    /// `etcds://`: TLS to every endpoint.
    pub tls: bool,
    pub endpoints: Vec<String>,
    /// The key prefix, with its leading `/`, without a trailing one.
    pub prefix: String,
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        write!(f, "{scheme}://{}{}", self.endpoints.join(","), self.prefix)
    }
}

impl std::str::FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::Url {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let (tls, rest) = match (url.strip_prefix("etcd://"), url.strip_prefix("etcds://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(bad("it must start with etcd:// (or etcds:// for TLS)")),
        };
        let (hosts, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("it must name a key prefix: etcd://HOST:PORT/PREFIX"))?;
        let prefix = format!("/{}", path.trim_end_matches('/'));
        if prefix == "/" {
            return Err(bad("the key prefix is empty: etcd://HOST:PORT/PREFIX"));
        }
        let endpoints: Vec<String> = hosts.split(',').map(str::to_owned).collect();
        for e in &endpoints {
            let port = e.rsplit_once(':').map(|(_, p)| p);
            if e.is_empty() || !port.is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p != 0)) {
                return Err(bad(&format!("`{e}` is not HOST:PORT")));
            }
        }
        Ok(Self { tls, endpoints, prefix })
    }
}

/// What went wrong with the store. Tests match on these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("`{url}` is not a store: {why}")]
    Url { url: String, why: String },
    /// etcd did not answer (down, no quorum, unreachable).
    #[error(
        "{store}: etcd cannot be reached ({message}); check that etcd runs at the store's endpoints and that this host can reach them"
    )]
    Unavailable { store: String, message: String },
    /// etcd answered with an error.
    #[error("{store}: etcd refused the request: {message}")]
    Refused { store: String, message: String },
    /// A key under the prefix that is not a file of a configuration.
    #[error(
        "{store}: key {key} is not a configuration file: {why}; remove it (`etcdctl del {key}`) and write files with `sluice-xds apply`"
    )]
    BadKey { store: String, key: String, why: String },
    /// The write was based on revision `base`, and the store changed since.
    #[error(
        "{store}: refused: the store changed since revision {base}, which this change is based on: {}; read it again (`sluice-xds get`) and redo the change",
        changed.join(", ")
    )]
    Conflict {
        store: String,
        base: i64,
        /// What changed, one phrase per file (`policy.yaml changed at revision 12`).
        changed: Vec<String>,
    },
    /// The revision asked for was compacted away.
    #[error("{store}: revision {revision} is no longer kept (compacted); read the store again")]
    Compacted { store: String, revision: i64 },
}

/// A configuration read from the store, at a revision.
#[derive(Debug, Clone)]
pub struct Read {
    pub files: FileSet,
    /// The store's revision when read.
    pub revision: i64,
    /// Per file, the revision it last changed at.
    pub changed_at: std::collections::BTreeMap<String, i64>,
}

/// What a TLS connection to etcd (`etcds://`) trusts and presents.
#[derive(Debug, Clone, Default)]
pub struct StoreTls {
    /// CA certificates (PEM) etcd's certificate must chain to.
    pub ca: Vec<u8>,
    /// A client certificate and key (PEM), for etcd's
    /// `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// A connection to the store (lazy: nothing is dialled until the first
/// call; every endpoint is used, a failed one skipped).
#[derive(Debug, Clone)]
pub struct Store {
    url: StoreUrl,
    channel: Channel,
}

fn prefix_end(key: &[u8]) -> Vec<u8> {
    // The smallest key greater than every key starting with `key`.
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Store {
    /// Within a tokio runtime (the channel's workers are spawned on it).
    pub fn new(url: StoreUrl) -> Result<Self, StoreError> {
        Self::with_tls(url, None)
    }

    /// [`Store::new`]; an `etcds://` store needs `tls`.
    pub fn with_tls(url: StoreUrl, tls: Option<StoreTls>) -> Result<Self, StoreError> {
        let bad = |why: String| StoreError::Url {
            url: url.to_string(),
            why,
        };
        let tls = match (url.tls, tls) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(bad(
                    "TLS settings are given but the store is etcd://; use etcds://".to_owned()
                ));
            }
            (true, None) => return Err(bad("an etcds:// store needs the CA to trust (--store-ca)".to_owned())),
            (true, Some(t)) => {
                let mut config = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&t.ca));
                if let Some((cert, key)) = &t.identity {
                    config = config.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                Some(config)
            }
        };
        let scheme = if url.tls { "https" } else { "http" };
        let mut endpoints = Vec::with_capacity(url.endpoints.len());
        for e in &url.endpoints {
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{e}"))
                .map_err(|err| StoreError::Url {
                    url: url.to_string(),
                    why: format!("`{e}`: {err}"),
                })?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(CALL_TIMEOUT)
                // A replica notices a silent etcd (hung, or a cut link)
                // within a few seconds, not at the next TCP timeout.
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true);
            if let Some(t) = &tls {
                endpoint = endpoint
                    .tls_config(t.clone())
                    .map_err(|err| bad(format!("`{e}`: TLS: {err}")))?;
            }
            endpoints.push(endpoint);
        }
        Ok(Self {
            channel: Channel::balance_list(endpoints.into_iter()),
            url,
        })
    }

    pub fn url(&self) -> &StoreUrl {
        &self.url
    }

    fn files_prefix(&self) -> Vec<u8> {
        format!("{}/files/", self.url.prefix).into_bytes()
    }

    fn revision_key(&self) -> Vec<u8> {
        format!("{}/revision", self.url.prefix).into_bytes()
    }

    fn key(&self, name: &str) -> Vec<u8> {
        let mut k = self.files_prefix();
        k.extend_from_slice(name.as_bytes());
        k
    }

    fn shown(&self, name: &str) -> String {
        format!("{}/{name}", self.url)
    }

    fn error(&self, status: &tonic::Status) -> StoreError {
        let store = self.url.to_string();
        let message = status.message().to_owned();
        match status.code() {
            tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
                if !message.contains("etcdserver: request is too large") =>
            {
                StoreError::Unavailable {
                    store,
                    message: if message.is_empty() {
                        format!("{:?}", status.code())
                    } else {
                        message
                    },
                }
            }
            _ if message.contains("required revision has been compacted") => {
                StoreError::Compacted { store, revision: 0 }
            }
            _ if message.contains("request is too large") => StoreError::Refused {
                store,
                message: format!(
                    "{message} (etcd takes at most --max-request-bytes, 1.5 MiB by default, in one transaction: a large plugin module needs that raised)"
                ),
            },
            _ => StoreError::Refused { store, message },
        }
    }

    /// Reads the configuration, now (`at` = None) or as it was at a past
    /// revision.
    pub async fn read(&self, at: Option<i64>) -> Result<Read, StoreError> {
        let prefix = self.files_prefix();
        let req = rpc::RangeRequest {
            key: prefix.clone(),
            range_end: prefix_end(&prefix),
            revision: at.unwrap_or(0),
            ..Default::default()
        };
        let resp = KvClient::new(self.channel.clone())
            .range(req)
            .await
            .map_err(|s| match self.error(&s) {
                StoreError::Compacted { store, .. } => StoreError::Compacted {
                    store,
                    revision: at.unwrap_or(0),
                },
                e => e,
            })?
            .into_inner();
        let revision = resp.header.map_or(0, |h| h.revision);
        let mut files = FileSet::new(self.url.to_string());
        let mut changed_at = std::collections::BTreeMap::new();
        for kv in resp.kvs {
            let name = self.name_of(&kv)?;
            files
                .insert(&name, kv.value, self.shown(&name))
                .map_err(|e| StoreError::BadKey {
                    store: self.url.to_string(),
                    key: String::from_utf8_lossy(&kv.key).into_owned(),
                    why: e.to_string(),
                })?;
            changed_at.insert(name, kv.mod_revision);
        }
        Ok(Read {
            files,
            revision: at.unwrap_or(revision),
            changed_at,
        })
    }

    fn name_of(&self, kv: &mvccpb::KeyValue) -> Result<String, StoreError> {
        let bad = |why: &str| StoreError::BadKey {
            store: self.url.to_string(),
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            why: why.to_owned(),
        };
        let rest = kv
            .key
            .strip_prefix(self.files_prefix().as_slice())
            .ok_or_else(|| bad("outside the prefix"))?;
        String::from_utf8(rest.to_vec()).map_err(|_| bad("not UTF-8"))
    }

    /// Writes `put` and removes `delete` in one transaction, if nothing
    /// under the prefix changed since revision `base`. Returns the new
    /// revision.
    pub async fn write(&self, base: i64, put: &FileSet, delete: &[String]) -> Result<i64, StoreError> {
        use rpc::compare::{CompareResult, CompareTarget, TargetUnion};
        use rpc::request_op::Request;
        let prefix = self.files_prefix();
        let unchanged = |key: Vec<u8>, range_end: Vec<u8>| rpc::Compare {
            result: CompareResult::Less as i32,
            target: CompareTarget::Mod as i32,
            key,
            range_end,
            target_union: Some(TargetUnion::ModRevision(base + 1)),
        };
        let mut success: Vec<rpc::RequestOp> = put
            .files
            .iter()
            .map(|(name, f)| rpc::RequestOp {
                request: Some(Request::RequestPut(rpc::PutRequest {
                    key: self.key(name),
                    value: f.bytes.clone(),
                    ..Default::default()
                })),
            })
            .collect();
        success.extend(delete.iter().map(|name| rpc::RequestOp {
            request: Some(Request::RequestDeleteRange(rpc::DeleteRangeRequest {
                key: self.key(name),
                ..Default::default()
            })),
        }));
        success.push(rpc::RequestOp {
            request: Some(Request::RequestPut(rpc::PutRequest {
                key: self.revision_key(),
                value: base.to_string().into_bytes(),
                ..Default::default()
            })),
        });
        let txn = rpc::TxnRequest {
            compare: vec![
                unchanged(prefix.clone(), prefix_end(&prefix)),
                unchanged(self.revision_key(), Vec::new()),
            ],
            success,
            failure: Vec::new(),
        };
        let resp = KvClient::new(self.channel.clone())
            .txn(txn)
            .await
            .map_err(|s| self.error(&s))?
            .into_inner();
        if resp.succeeded {
            return Ok(resp.header.map_or(0, |h| h.revision));
        }
        Err(self.conflict(base).await)
    }

    /// What changed since `base`, for the refusal of a write based on it.
    pub async fn conflict(&self, base: i64) -> StoreError {
        let store = self.url.to_string();
        let (then, now) = match (self.read(Some(base)).await, self.read(None).await) {
            (Ok(t), Ok(n)) => (t, n),
            (Err(StoreError::Compacted { .. }), Ok(n)) => {
                return StoreError::Conflict {
                    store,
                    base,
                    changed: vec![format!(
                        "revision {base} was compacted; the store is at revision {}",
                        n.revision
                    )],
                };
            }
            (Err(e), _) | (_, Err(e)) => return e,
        };
        let mut changed: Vec<String> = then
            .files
            .changes(&now.files)
            .into_iter()
            .map(|name| match now.changed_at.get(&name) {
                Some(rev) if then.files.files.contains_key(&name) => format!("{name} changed at revision {rev}"),
                Some(rev) => format!("{name} added at revision {rev}"),
                None => format!("{name} deleted"),
            })
            .collect();
        if changed.is_empty() {
            changed.push(format!(
                "another write at revision {} (no file differs now)",
                now.revision
            ));
        }
        StoreError::Conflict { store, base, changed }
    }

    /// Waits until something under the prefix changes after revision
    /// `after`; returns the revision of the change. An error when the
    /// watch cannot be kept (etcd gone: the caller reads again once it is
    /// back).
    pub async fn changed_after(&self, after: i64) -> Result<i64, StoreError> {
        let prefix = format!("{}/", self.url.prefix).into_bytes();
        let create = rpc::WatchRequest {
            request_union: Some(rpc::watch_request::RequestUnion::CreateRequest(
                rpc::WatchCreateRequest {
                    range_end: prefix_end(&prefix),
                    key: prefix,
                    start_revision: after + 1,
                    ..Default::default()
                },
            )),
        };
        // The request stream stays open while the watch lives.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(create).await.map_err(|_| StoreError::Unavailable {
            store: self.url.to_string(),
            message: "watch request not sent".to_owned(),
        })?;
        let mut client = WatchClient::new(self.channel.clone());
        let mut stream = client
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| self.error(&s))?
            .into_inner();
        loop {
            let Some(resp) = stream.message().await.map_err(|s| self.error(&s))? else {
                return Err(StoreError::Unavailable {
                    store: self.url.to_string(),
                    message: "the watch ended".to_owned(),
                });
            };
            if resp.compact_revision != 0 {
                // What happened meanwhile is gone: read everything again.
                return Ok(resp.compact_revision);
            }
            if resp.canceled {
                return Err(StoreError::Refused {
                    store: self.url.to_string(),
                    message: format!("the watch was cancelled: {}", resp.cancel_reason),
                });
            }
            if let Some(rev) = resp
                .events
                .iter()
                .filter_map(|e| e.kv.as_ref())
                .map(|kv| kv.mod_revision)
                .max()
            {
                drop(tx);
                return Ok(rev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
    use super::*;

    #[test]
    fn urls_name_endpoints_and_a_prefix() {
        let u: StoreUrl = "etcd://10.0.0.1:2379,etcd-1:2379/sluice/prod/".parse().unwrap();
        assert_eq!(u.endpoints, ["10.0.0.1:2379", "etcd-1:2379"]);
        assert_eq!(u.prefix, "/sluice/prod");
        assert_eq!(u.to_string(), "etcd://10.0.0.1:2379,etcd-1:2379/sluice/prod");
        let t: StoreUrl = "etcds://h:1/p".parse().unwrap();
        assert!(t.tls && !u.tls);
        assert_eq!(t.to_string(), "etcds://h:1/p");
        for (bad, why) in [
            ("http://h:1/p", "etcd://"),
            ("etcd://h:1", "key prefix"),
            ("etcd://h:1/", "prefix is empty"),
            ("etcd://h/p", "`h` is not HOST:PORT"),
            ("etcd://h:0/p", "`h:0`"),
            ("etcd://h:1,/p", "`` is not"),
        ] {
            let e = bad.parse::<StoreUrl>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn prefix_end_is_past_every_key_under_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}

//! Prometheus metrics: the names Sluice exports and the helpers the data
//! path calls to update them.
//!
//! The `metrics` facade is global: helpers here are cheap no-ops until
//! [`install`] puts the Prometheus recorder in place (once per process; a
//! second call returns the same handle, so tests may call it freely). No
//! HTTP listener is started here: the admin server renders
//! [`PrometheusHandle::render`] on `/metrics`, and [`spawn_upkeep`] keeps the
//! histograms' buffers bounded between scrapes.
//!
//! Label values with unbounded cardinality (addresses, names) never become
//! labels; listener, action, rule and reason are configuration-bounded.

use std::cell::RefCell;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hashbrown::HashMap;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

pub use metrics_exporter_prometheus::PrometheusHandle;

/// Flows finished, by `listener`, `action` (allow|deny), `rule`, `reason`.
pub const FLOWS_TOTAL: &str = "sluice_flows_total";
/// Flows currently open, by `listener`.
pub const ACTIVE_FLOWS: &str = "sluice_active_flows";
/// Bytes relayed, by `listener` and `direction` (up = client → upstream).
pub const BYTES_TOTAL: &str = "sluice_bytes_total";
/// Flows closed after relaying, by `listener` and close `reason`.
pub const FLOW_CLOSES_TOTAL: &str = "sluice_flow_closes_total";
/// Accept → verdict time (peek + classify + decide), by `listener`.
pub const CLASSIFY_SECONDS: &str = "sluice_classify_duration_seconds";
/// Upstream connect time (happy-eyeballs race), by `result`.
pub const CONNECT_SECONDS: &str = "sluice_connect_duration_seconds";
/// Errors by `kind` (a reason code: `connect-timeout`, `dns-nxdomain`, …;
/// every kind of [`ERROR_KINDS`] is exported from start, at 0).
pub const ERRORS_TOTAL: &str = "sluice_errors_total";

/// An audit record that could not be written to its sink.
pub const AUDIT_WRITE: &str = "audit-write";

/// Every `kind` of [`ERRORS_TOTAL`]: a flow that ended in an upstream
/// connect or resolve failure, an I/O error on either side, an audit record
/// lost to a failing sink. Exported from start so alerts on `rate()` see a
/// series before the first error.
pub const ERROR_KINDS: &[&str] = &[
    "connect-timeout",
    "connect-refused",
    "connect-unreachable",
    "connect-no-addresses",
    "connect-error",
    "dns-nxdomain",
    "dns-no-records",
    "dns-timeout",
    "dns-invalid-name",
    "dns-config",
    "dns-error",
    "client-error",
    "upstream-error",
    "proxy-error",
    // A listener's accept(2) failed (descriptor limit, memory).
    "accept",
    AUDIT_WRITE,
    // A `quic` listener dropped a datagram that would have started a flow
    // past `max_connections`, or that found its flow's queue full.
    "quic-flow-limit",
    "quic-queue-full",
    // A `quic` listener's recvmsg(2) failed.
    "quic-receive",
];
/// DNS queries by listener/action/rule/reason/cache.
pub const DNS_QUERIES_TOTAL: &str = "sluice_dns_queries_total";
/// DNS answer latency.
pub const DNS_LATENCY_SECONDS: &str = "sluice_dns_latency_seconds";
/// Audit records dropped because the audit queue was full.
pub const AUDIT_DROPPED_TOTAL: &str = "sluice_audit_dropped_total";

/// Buckets for [`CLASSIFY_SECONDS`]: a parse takes microseconds, a peek may
/// wait seconds for a slow client's ClientHello (5 s default limit).
pub const CLASSIFY_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25, 1.0,
    5.0,
];

/// Buckets for [`CONNECT_SECONDS`]: loopback/LAN sub-millisecond up to the
/// connect timeout.
pub const CONNECT_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Failure to install the Prometheus recorder.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// Another (non-Sluice) recorder is already the global one.
    #[error("a different metrics recorder is already installed")]
    OtherRecorder,
    /// The exporter rejected its configuration.
    #[error("building the Prometheus recorder: {0}")]
    Build(#[source] metrics_exporter_prometheus::BuildError),
}

static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the Prometheus recorder as the global one and returns the
/// handle the admin server renders. Idempotent: later calls return a clone
/// of the first handle.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    // A poisoned lock only means another installer panicked; the Option it
    // guards is still coherent.
    let mut slot = HANDLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(CLASSIFY_SECONDS.into()), CLASSIFY_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(CONNECT_SECONDS.into()), CONNECT_BUCKETS))
        .map_err(MetricsError::Build)?
        .install_recorder()
        .map_err(|e| match e {
            metrics_exporter_prometheus::BuildError::FailedToSetGlobalRecorder(_) => MetricsError::OtherRecorder,
            other => MetricsError::Build(other),
        })?;
    describe();
    // Counters Prometheus users alert on exist from the start, at 0.
    for kind in ERROR_KINDS {
        metrics::counter!(ERRORS_TOTAL, "kind" => *kind).increment(0);
    }
    metrics::counter!(AUDIT_DROPPED_TOTAL).increment(0);
    *slot = Some(handle.clone());
    Ok(handle)
}

/// The documented families and their help text and type, for the ones the
/// recorder has no series of yet (labelled counters before their first
/// label set): `/metrics` still lists them, with `# HELP` and `# TYPE`.
const FAMILIES: &[(&str, &str, &str)] = &[
    (
        FLOWS_TOTAL,
        "counter",
        "Flows finished, by listener, action, rule and reason",
    ),
    (ACTIVE_FLOWS, "gauge", "Flows currently open"),
    (BYTES_TOTAL, "counter", "Bytes relayed, by direction"),
    (FLOW_CLOSES_TOTAL, "counter", "Relayed flows closed, by close reason"),
    (
        CLASSIFY_SECONDS,
        "histogram",
        "Accept to verdict: peek, classify and decide",
    ),
    (CONNECT_SECONDS, "histogram", "Upstream connect time"),
    (ERRORS_TOTAL, "counter", "Errors by kind (reason code)"),
    (AUDIT_DROPPED_TOTAL, "counter", "Audit records dropped: queue full"),
    (
        DNS_QUERIES_TOTAL,
        "counter",
        "DNS queries, by listener, action, rule, reason and cache",
    ),
];

fn describe() {
    use metrics::Unit;
    metrics::describe_counter!(FLOWS_TOTAL, "Flows finished, by listener, action, rule and reason");
    metrics::describe_gauge!(ACTIVE_FLOWS, "Flows currently open");
    metrics::describe_counter!(BYTES_TOTAL, Unit::Bytes, "Bytes relayed, by direction");
    metrics::describe_counter!(FLOW_CLOSES_TOTAL, "Relayed flows closed, by close reason");
    metrics::describe_histogram!(
        CLASSIFY_SECONDS,
        Unit::Seconds,
        "Accept to verdict: peek, classify and decide"
    );
    metrics::describe_histogram!(CONNECT_SECONDS, Unit::Seconds, "Upstream connect time");
    metrics::describe_counter!(ERRORS_TOTAL, "Errors by kind (reason code)");
    metrics::describe_counter!(AUDIT_DROPPED_TOTAL, "Audit records dropped: queue full");
    metrics::describe_counter!(
        DNS_QUERIES_TOTAL,
        "DNS queries, by listener, action, rule, reason and cache"
    );
}

/// Runs the recorder's upkeep (histogram buffer draining) every `every`.
pub fn spawn_upkeep(handle: PrometheusHandle, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}

/// Counts a finished flow. `rule` is `""` when no rule decided.
pub fn flow_finished(listener: &str, action: &'static str, rule: &str, reason: &str) {
    let key = FlowKeyRef {
        listener,
        action,
        rule,
        reason,
    };
    with_cached(&FLOW_COUNTERS, key, |k| {
        metrics::counter!(
            FLOWS_TOTAL,
            "listener" => k.listener.to_owned(),
            "action" => action,
            "rule" => k.rule.to_owned(),
            "reason" => k.reason.to_owned(),
        )
    })
    .increment(1);
}

/// Adds a relayed flow's bytes and close reason.
pub fn flow_closed(listener: &str, close_reason: &'static str) {
    let key = FlowKeyRef {
        listener,
        action: "",
        rule: "",
        reason: close_reason,
    };
    with_cached(
        &CLOSE_COUNTERS,
        key,
        |k| metrics::counter!(FLOW_CLOSES_TOTAL, "listener" => k.listener.to_owned(), "reason" => close_reason),
    )
    .increment(1);
}

/// Records an upstream connect race's duration; `result` is `"ok"` or the
/// error's reason code.
pub fn connect_latency(result: &'static str, elapsed: Duration) {
    let key = FlowKeyRef {
        listener: "",
        action: "",
        rule: "",
        reason: result,
    };
    with_cached(
        &CONNECT_HISTOGRAMS,
        key,
        |_| metrics::histogram!(CONNECT_SECONDS, "result" => result),
    )
    .record(elapsed);
}

/// Per-flow series are looked up in a per-thread cache of handles, so a
/// flow builds no label strings and does not touch the global registry
/// (which takes a lock and showed in the per-connection profile). Label
/// values are configuration-bounded; past [`CACHE_MAX`] entries a thread
/// stops caching and asks the registry, so a surprise in cardinality costs
/// speed, never memory.
const CACHE_MAX: usize = 4096;

type HandleCache<H> = RefCell<HashMap<FlowKey, H, foldhash::fast::RandomState>>;

thread_local! {
    static FLOW_COUNTERS: HandleCache<metrics::Counter> = RefCell::new(HashMap::default());
    static CLOSE_COUNTERS: HandleCache<metrics::Counter> = RefCell::new(HashMap::default());
    static CONNECT_HISTOGRAMS: HandleCache<metrics::Histogram> = RefCell::new(HashMap::default());
}

/// A cached series' label values. Hashes exactly like [`FlowKeyRef`].
#[derive(Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    listener: Box<str>,
    action: Box<str>,
    rule: Box<str>,
    reason: Box<str>,
}

/// The borrowed form a lookup uses: no allocation on a hit.
#[derive(Debug, Clone, Copy)]
struct FlowKeyRef<'a> {
    listener: &'a str,
    action: &'a str,
    rule: &'a str,
    reason: &'a str,
}

impl Hash for FlowKeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Field order and types as `FlowKey`'s derived `Hash`.
        self.listener.hash(state);
        self.action.hash(state);
        self.rule.hash(state);
        self.reason.hash(state);
    }
}

impl hashbrown::Equivalent<FlowKey> for FlowKeyRef<'_> {
    fn equivalent(&self, key: &FlowKey) -> bool {
        *self.listener == *key.listener
            && *self.action == *key.action
            && *self.rule == *key.rule
            && *self.reason == *key.reason
    }
}

fn with_cached<H: Clone + 'static>(
    cache: &'static std::thread::LocalKey<HandleCache<H>>,
    key: FlowKeyRef<'_>,
    register: impl FnOnce(FlowKeyRef<'_>) -> H,
) -> H {
    cache.with(|c| {
        if let Some(h) = c.borrow().get(&key) {
            return h.clone();
        }
        let h = register(key);
        let mut map = c.borrow_mut();
        if map.len() < CACHE_MAX {
            map.insert(
                FlowKey {
                    listener: key.listener.into(),
                    action: key.action.into(),
                    rule: key.rule.into(),
                    reason: key.reason.into(),
                },
                h.clone(),
            );
        }
        h
    })
}

/// Counts `n` errors of `kind` (one of [`ERROR_KINDS`]).
pub fn errors(kind: &'static str, n: u64) {
    metrics::counter!(ERRORS_TOTAL, "kind" => kind).increment(n);
}

/// The [`ERRORS_TOTAL`] kind of a flow's close reason, when it is an error:
/// an upstream that could not be resolved or reached, an I/O error.
pub fn error_kind(close_reason: &'static str) -> Option<&'static str> {
    let error = close_reason.starts_with("connect-")
        || close_reason.starts_with("dns-")
        || matches!(close_reason, "client-error" | "upstream-error" | "proxy-error");
    error.then_some(close_reason)
}

/// Counts one dropped audit record (called by the audit writer).
pub fn audit_dropped() {
    metrics::counter!(AUDIT_DROPPED_TOTAL).increment(1);
}

/// Keeps [`ACTIVE_FLOWS`] up to date for one flow: +1 now, −1 on drop, so
/// every exit path (including panics and cancellations) is counted.
#[derive(Debug)]
pub struct ActiveFlow {
    gauge: metrics::Gauge,
}

/// A listener's own series, registered once when the listener is built so
/// that a flow touches handles, not the registry (no label strings, no
/// lookup per connection).
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    active: metrics::Gauge,
    classify: metrics::Histogram,
    bytes_up: metrics::Counter,
    bytes_down: metrics::Counter,
}

impl ListenerMetrics {
    pub fn new(listener: &str) -> Self {
        Self {
            active: metrics::gauge!(ACTIVE_FLOWS, "listener" => listener.to_owned()),
            classify: metrics::histogram!(CLASSIFY_SECONDS, "listener" => listener.to_owned()),
            bytes_up: metrics::counter!(BYTES_TOTAL, "listener" => listener.to_owned(), "direction" => "up"),
            bytes_down: metrics::counter!(BYTES_TOTAL, "listener" => listener.to_owned(), "direction" => "down"),
        }
    }

    /// Marks a flow as open until the returned guard drops.
    pub fn active(&self) -> ActiveFlow {
        self.active.increment(1.0);
        ActiveFlow {
            gauge: self.active.clone(),
        }
    }

    pub fn classified(&self, elapsed: Duration) {
        self.classify.record(elapsed);
    }

    pub fn relayed(&self, bytes_up: u64, bytes_down: u64) {
        self.bytes_up.increment(bytes_up);
        self.bytes_down.increment(bytes_down);
    }
}

impl Drop for ActiveFlow {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// Per-listener DNS metrics, counted on the DNS worker and published in
/// bulk: a cached answer is a few hundred nanoseconds of work, and a global
/// counter update plus a histogram sample per query showed as ≈ 5 % of it.
/// Counts go out on [`DnsMetrics::publish`], which the DNS audit batch calls
/// when it hands a batch over (at most 10 ms after a query), so a scrape
/// can lag that much behind the audit log.
#[derive(Debug)]
pub struct DnsMetrics {
    listener: String,
    latency: Arc<LatencyHistogram>,
    /// Latency samples not yet published: bucket counts, sum, count.
    local: LatencyCounts,
    // foldhash, not SipHash: the keys are configuration-bounded labels, and
    // SipHash showed as ≈ 1% of a cached query's CPU.
    counters: HashMap<(&'static str, &'static str, bool), ByRule, foldhash::fast::RandomState>,
    /// The series counted last and how many it is owed: a run of queries
    /// with one outcome costs one comparison each.
    last: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    key: (&'static str, &'static str, bool),
    rule: String,
    counter: metrics::Counter,
    owed: u64,
}

/// One DNS series' counters by rule name.
type ByRule = HashMap<String, metrics::Counter, foldhash::fast::RandomState>;

impl DnsMetrics {
    pub fn new(listener: &str) -> Self {
        let latency = Arc::new(LatencyHistogram::new(listener));
        let mut all = DNS_LATENCY.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        all.retain(|h| h.strong_count() > 0);
        all.push(Arc::downgrade(&latency));
        Self {
            listener: listener.to_owned(),
            latency,
            local: LatencyCounts::default(),
            counters: HashMap::default(),
            last: None,
        }
    }

    /// One DNS query answered.
    pub fn record(
        &mut self,
        allowed: bool,
        watched: bool,
        rule: &str,
        reason: &'static str,
        cache_hit: bool,
        latency: Duration,
    ) {
        let action = match (allowed, watched) {
            (true, _) => "allow",
            (false, true) => "would-deny",
            (false, false) => "deny",
        };
        let key = (action, reason, cache_hit);
        self.local.add(latency);
        if let Some(p) = &mut self.last
            && p.key == key
            && p.rule == rule
        {
            p.owed += 1;
            return;
        }
        let by_rule = self.counters.entry(key).or_default();
        let counter = match by_rule.get(rule) {
            Some(c) => c.clone(),
            None => {
                let c = metrics::counter!(
                    DNS_QUERIES_TOTAL,
                    "listener" => self.listener.clone(),
                    "action" => action,
                    "rule" => rule.to_owned(),
                    "reason" => reason,
                    "cache" => if cache_hit { "hit" } else { "miss" }
                );
                by_rule.insert(rule.to_owned(), c.clone());
                c
            }
        };
        if let Some(p) = self.last.replace(Pending {
            key,
            rule: rule.to_owned(),
            counter,
            owed: 1,
        }) {
            p.counter.increment(p.owed);
        }
    }

    /// Publishes what [`Self::record`] counted since the last call.
    pub fn publish(&mut self) {
        if let Some(p) = &mut self.last {
            p.counter.increment(std::mem::take(&mut p.owed));
        }
        self.latency.add(&std::mem::take(&mut self.local));
    }
}

impl Drop for DnsMetrics {
    fn drop(&mut self) {
        self.publish();
    }
}

/// Upper bounds (µs) of `sluice_dns_latency_seconds`' buckets; `+Inf` follows.
const DNS_LATENCY_BUCKETS_US: [u64; 15] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000,
];

/// Every live listener's latency histogram, for [`render`].
static DNS_LATENCY: Mutex<Vec<std::sync::Weak<LatencyHistogram>>> = Mutex::new(Vec::new());

/// Latency samples in `DNS_LATENCY_BUCKETS_US` buckets (not cumulative; the
/// last one is `+Inf`), with their sum and count.
#[derive(Debug, Default)]
struct LatencyCounts {
    buckets: [u64; DNS_LATENCY_BUCKETS_US.len() + 1],
    sum_us: u64,
    count: u64,
}

impl LatencyCounts {
    fn add(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let i = DNS_LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
        }
        self.sum_us = self.sum_us.saturating_add(us);
        self.count += 1;
    }
}

/// `sluice_dns_latency_seconds{listener}` as a Prometheus histogram with
/// fixed buckets, kept here rather than in the metrics recorder (whose
/// per-sample buffer cost more than the rest of a cached query's metrics).
#[derive(Debug)]
pub struct LatencyHistogram {
    listener_label: String,
    buckets: [AtomicU64; DNS_LATENCY_BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    fn new(listener: &str) -> Self {
        Self {
            listener_label: prometheus_label(listener),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    fn add(&self, c: &LatencyCounts) {
        if c.count == 0 {
            return;
        }
        for (a, &n) in self.buckets.iter().zip(&c.buckets) {
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.sum_us.fetch_add(c.sum_us, Ordering::Relaxed);
        self.count.fetch_add(c.count, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let l = &self.listener_label;
        let mut cumulative = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            cumulative += n.load(Ordering::Relaxed);
            match DNS_LATENCY_BUCKETS_US.get(i) {
                Some(&us) => {
                    let _ = writeln!(
                        out,
                        "{DNS_LATENCY_SECONDS}_bucket{{listener=\"{l}\",le=\"{}\"}} {cumulative}",
                        us as f64 / 1e6
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "{DNS_LATENCY_SECONDS}_bucket{{listener=\"{l}\",le=\"+Inf\"}} {cumulative}"
                    );
                }
            }
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{DNS_LATENCY_SECONDS}_sum{{listener=\"{l}\"}} {sum}");
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{DNS_LATENCY_SECONDS}_count{{listener=\"{l}\"}} {count}");
    }
}

/// A label value escaped for the Prometheus text format.
fn prometheus_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The `/metrics` text: the recorder's series plus the DNS latency
/// histograms Sluice keeps itself.
pub fn render(handle: &PrometheusHandle) -> String {
    let mut out = handle.render();
    for (name, kind, help) in FAMILIES {
        if !out.contains(&format!("# TYPE {name} ")) {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        }
    }
    let live: Vec<Arc<LatencyHistogram>> = DNS_LATENCY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter_map(std::sync::Weak::upgrade)
        .collect();
    if !live.is_empty() {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("# HELP sluice_dns_latency_seconds Query arrival to answer, by listener\n");
        out.push_str("# TYPE sluice_dns_latency_seconds histogram\n");
        for h in live {
            h.render(&mut out);
        }
    }
    render_plugin_metrics(&mut out);
    out
}

/// The metrics WASM plugins define (`proxy_define_metric`), labelled with
/// the plugin's name and the metric's own name: counters as
/// `sluice_plugin_counter`, gauges as `sluice_plugin_gauge`, histograms as
/// the sum and count of what was recorded.
fn render_plugin_metrics(out: &mut String) {
    use std::fmt::Write as _;

    use crate::wasm::abi::MetricType;
    let all = crate::wasm::load::all_metrics();
    if all.is_empty() {
        return;
    }
    let mut plugins: Vec<_> = all.into_iter().collect();
    plugins.sort_by(|a, b| a.0.cmp(&b.0));
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    for (family, kind, help, of) in [
        (
            "sluice_plugin_counter",
            "counter",
            "Counters WASM plugins define",
            MetricType::Counter,
        ),
        (
            "sluice_plugin_gauge",
            "gauge",
            "Gauges WASM plugins define",
            MetricType::Gauge,
        ),
        (
            "sluice_plugin_histogram",
            "summary",
            "Histograms WASM plugins define: sum and count of the values recorded",
            MetricType::Histogram,
        ),
    ] {
        let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} {kind}");
        for (plugin, metrics) in &plugins {
            for m in metrics.iter().filter(|m| m.kind == of) {
                let labels = format!(
                    "plugin=\"{}\",metric=\"{}\"",
                    prometheus_label(plugin),
                    prometheus_label(&m.name)
                );
                if of == MetricType::Histogram {
                    let _ = writeln!(out, "{family}_sum{{{labels}}} {}", m.value);
                    let _ = writeln!(out, "{family}_count{{{labels}}} {}", m.count);
                } else {
                    let _ = writeln!(out, "{family}{{{labels}}} {}", m.value);
                }
            }
        }
    }
}

#[cfg(test)]
mod dns_metrics_tests {
    use super::*;

    #[test]
    fn dns_metrics_count_by_labels() {
        let handle = install().unwrap_or_else(|e| panic!("{e}"));
        let mut m = DnsMetrics::new("unit-dns");
        m.record(true, false, "r1", "allowed-by-rule", true, Duration::from_micros(50));
        m.record(true, false, "r1", "allowed-by-rule", true, Duration::from_micros(70));
        m.record(false, true, "default", "default-deny", false, Duration::from_micros(90));
        m.record(true, false, "r1", "allowed-by-rule", true, Duration::from_micros(3_000));
        let before = render(&handle);
        assert!(
            before.contains(r#"sluice_dns_latency_seconds_count{listener="unit-dns"} 0"#),
            "latency is published in bulk: {before}"
        );
        m.publish();
        let text = render(&handle);
        assert!(
            text.contains(r#"sluice_dns_latency_seconds_bucket{listener="unit-dns",le="0.0001"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_dns_latency_seconds_bucket{listener="unit-dns",le="0.0025"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_dns_latency_seconds_bucket{listener="unit-dns",le="0.005"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_dns_latency_seconds_bucket{listener="unit-dns",le="+Inf"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_dns_latency_seconds_sum{listener="unit-dns"} 0.00321"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_dns_latency_seconds_count{listener="unit-dns"} 4"#),
            "{text}"
        );
        assert_eq!(
            text.matches("# TYPE sluice_dns_latency_seconds histogram").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_dns_queries_total{listener="unit-dns",action="allow",rule="r1",reason="allowed-by-rule",cache="hit"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_dns_queries_total{listener="unit-dns",action="would-deny",rule="default",reason="default-deny",cache="miss"} 1"#),
            "{text}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, prefix: &str, parts: &[&str]) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(prefix) && parts.iter().all(|p| l.contains(p)))
    }

    /// Cached handles count into the same series the registry renders, a
    /// different label value gets its own series, and a hit builds no key.
    #[test]
    fn cached_handles_feed_the_rendered_series() {
        let handle = install().unwrap_or_else(|e| panic!("install: {e}"));
        for _ in 0..3 {
            flow_finished("cache-test", "allow", "rule-a", "rule-matched");
        }
        flow_finished("cache-test", "deny", "rule-b", "rule-matched");
        flow_finished("cache-test", "allow", "rule-a\"x", "rule-matched");
        flow_closed("cache-test", "client-closed");
        flow_closed("cache-test", "client-closed");
        connect_latency("ok", Duration::from_micros(300));
        let text = handle.render();
        let a = line(
            &text,
            "sluice_flows_total{",
            &["listener=\"cache-test\"", "rule=\"rule-a\""],
        );
        assert!(a.is_some_and(|l| l.ends_with(" 3")), "{a:?}\n{text}");
        let b = line(
            &text,
            "sluice_flows_total{",
            &["listener=\"cache-test\"", "rule=\"rule-b\""],
        );
        assert!(b.is_some_and(|l| l.ends_with(" 1")), "{b:?}");
        let c = line(
            &text,
            "sluice_flows_total{",
            &["listener=\"cache-test\"", "rule=\"rule-a\\\"x\""],
        );
        assert!(c.is_some_and(|l| l.ends_with(" 1")), "{c:?}");
        let closed = line(&text, "sluice_flow_closes_total{", &["listener=\"cache-test\""]);
        assert!(closed.is_some_and(|l| l.ends_with(" 2")), "{closed:?}");
        assert!(
            line(&text, "sluice_connect_duration_seconds_count{", &["result=\"ok\""]).is_some(),
            "{text}"
        );
        // The thread's caches now hold these keys; a repeat is a pure hit.
        let before = FLOW_COUNTERS.with(|c| c.borrow().len());
        flow_finished("cache-test", "allow", "rule-a", "rule-matched");
        assert_eq!(FLOW_COUNTERS.with(|c| c.borrow().len()), before);
    }
}

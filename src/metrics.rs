//! Every Prometheus metric hagate exports, defined and registered in one place.
//!
//! Names carry the `hagate_` prefix, counters end in `_total`, durations in `_seconds`.
//! Other modules call the small helpers here; none of them touch the registry.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::haid::HaidError;

/// The buckets of request durations, in seconds.
const REQUEST_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Status classes, the `class` label of `hagate_instance_requests_total`.
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// One alias's request and health-check metrics, as plain atomics:
/// `hagate_instance_requests_total{alias,class}`,
/// `hagate_instance_request_duration_seconds{alias}`, `hagate_health_checks_total{alias,result}`
/// and `hagate_health_transitions_total{alias,to}`.
///
/// They are not registry children: one child per alias and label value took about 4 KB an
/// alias, 33 MiB once placement had spread requests over 10k aliases (docs/performance.md,
/// P7). These take 208 bytes. Each alias has one from its first request or check until a
/// swapped-in table no longer has it (`Metrics::forget_aliases`), so its counters only grow
/// across the swaps that keep it; `/metrics` renders them (`Metrics::render`) exactly as
/// the registry's encoder would, a series from its first count on.
#[derive(Debug, Default)]
pub struct InstanceMetrics {
    by_class: [AtomicU64; CLASSES.len()],
    /// Requests per duration bucket (not cumulative): `REQUEST_BUCKETS`, then `+Inf`.
    buckets: [AtomicU64; REQUEST_BUCKETS.len() + 1],
    /// The sum of the durations, in nanoseconds.
    sum_ns: AtomicU64,
    /// `hagate_health_checks_total{alias,result}`: pass, fail.
    checks: [AtomicU64; 2],
    /// `hagate_health_transitions_total{alias,to}`: up, down.
    transitions: [AtomicU64; 2],
}

/// Every alias's request metrics, by alias.
type ByAlias = BTreeMap<Arc<str>, Arc<InstanceMetrics>>;

fn by_alias() -> std::sync::MutexGuard<'static, ByAlias> {
    static BY_ALIAS: Mutex<ByAlias> = Mutex::new(BTreeMap::new());
    BY_ALIAS.lock().unwrap_or_else(|p| p.into_inner())
}

impl InstanceMetrics {
    /// The metrics of `alias` (made at its first request; the caller keeps them).
    pub fn for_alias(alias: &str) -> Arc<Self> {
        let mut all = by_alias();
        if let Some(m) = all.get(alias) {
            return Arc::clone(m);
        }
        let m = Arc::new(InstanceMetrics::default());
        all.insert(alias.into(), Arc::clone(&m));
        m
    }

    /// One request answered with `status` (0: none was written) after `elapsed`.
    pub fn observe(&self, status: u16, elapsed: std::time::Duration) {
        let class = match status {
            100..=599 => usize::from(status / 100 - 1),
            _ => 5,
        };
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        let bucket = REQUEST_BUCKETS
            .iter()
            .position(|&le| seconds <= le)
            .unwrap_or(REQUEST_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(nanos, Ordering::Relaxed);
    }

    /// One active health check, passed or failed.
    pub fn checked(&self, passed: bool) {
        self.checks[usize::from(!passed)].fetch_add(1, Ordering::Relaxed);
    }

    /// One change of the active verdict, to up or to down.
    pub fn turned(&self, up: bool) {
        self.transitions[usize::from(!up)].fetch_add(1, Ordering::Relaxed);
    }
}

/// Samples in the text exposition format (0.0.4), written as the registry's encoder
/// writes them, for the families rendered from state at scrape time rather than held as
/// registry children: the per-instance ones, which a 100k-alias table makes large.
pub struct Exposition<'a> {
    out: &'a mut String,
    /// The `# HELP` and `# TYPE` lines of the family begun, until its first sample (a
    /// family with no samples is left out, as the registry leaves it out).
    header: Option<(&'static str, &'static str, &'static str)>,
}

impl Exposition<'_> {
    /// Begins the family `name` of type `kind` (`counter`, `gauge`, `histogram`).
    fn family(&mut self, name: &'static str, help: &'static str, kind: &'static str) {
        self.header = Some((name, help, kind));
    }

    /// One sample: `name{labels} value`. Labels are written in the order given, which
    /// is the registry's: by label name.
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        if let Some((family, help, kind)) = self.header.take() {
            let _ = write!(
                self.out,
                "# HELP {family} {}\n# TYPE {family} {kind}\n",
                escape(help, false)
            );
        }
        self.out.push_str(name);
        let mut separator = '{';
        for (label, value) in labels {
            let _ = write!(self.out, "{separator}{label}=\"{}\"", escape(value, true));
            separator = ',';
        }
        if !labels.is_empty() {
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// One instance's gauges, read at scrape time.
pub struct InstanceGauges<'a> {
    /// Its alias.
    pub alias: &'a str,
    /// Its address.
    pub address: std::net::SocketAddr,
    /// Live: active checks up and not ejected.
    pub live: bool,
    /// Requests in flight to it.
    pub inflight: u64,
}

impl Exposition<'_> {
    /// `hagate_instance_inflight{alias}` and `hagate_instance_up{address,alias}` of every
    /// instance, and `hagate_membership_holder_age_seconds{alias}` of every holder (alias,
    /// seconds). Written from state at scrape time, not held as registry children: a
    /// 100k-alias table would keep 200k of them between scrapes.
    pub fn instance_gauges<'a>(
        &mut self,
        instances: impl Iterator<Item = InstanceGauges<'a>> + Clone,
        holders: impl Iterator<Item = (&'a str, f64)>,
    ) {
        const INFLIGHT: &str = "hagate_instance_inflight";
        self.family(INFLIGHT, "Requests in flight to the instance.", "gauge");
        for i in instances.clone() {
            self.sample(INFLIGHT, &[("alias", i.alias)], i.inflight as f64);
        }
        const UP: &str = "hagate_instance_up";
        self.family(
            UP,
            "1 if the instance is live (active checks up and not ejected), else 0.",
            "gauge",
        );
        let mut address = String::new();
        for i in instances {
            address.clear();
            let _ = write!(address, "{}", i.address);
            let labels = [("address", address.as_str()), ("alias", i.alias)];
            self.sample(UP, &labels, f64::from(u8::from(i.live)));
        }
        const AGE: &str = "hagate_membership_holder_age_seconds";
        self.family(
            AGE,
            "Age of the last accepted heartbeat of each alias's entry.",
            "gauge",
        );
        for (alias, age) in holders {
            self.sample(AGE, &[("alias", alias)], age);
        }
    }
}

/// A help text or label value as the exposition format escapes it.
fn escape(text: &str, quote: bool) -> std::borrow::Cow<'_, str> {
    if !text.contains(['\\', '\n', '"']) {
        return text.into();
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '"' if quote => escaped.push_str("\\\""),
            c => escaped.push(c),
        }
    }
    escaped.into()
}

/// Writes every alias's request metrics.
fn render_instances(x: &mut Exposition<'_>) {
    // a snapshot, so that no alias's first request waits for the rendering
    let all: Vec<(Arc<str>, Arc<InstanceMetrics>)> = by_alias()
        .iter()
        .map(|(alias, m)| (Arc::clone(alias), Arc::clone(m)))
        .collect();
    const DURATION: &str = "hagate_instance_request_duration_seconds";
    x.family(
        DURATION,
        "Time from request to the end of the response, by the instance that served it.",
        "histogram",
    );
    // an alias with checks but no request yet has no request series
    let requested = |m: &InstanceMetrics| m.by_class.iter().any(|n| n.load(Ordering::Relaxed) > 0);
    let bounds: Vec<String> = REQUEST_BUCKETS
        .iter()
        .map(f64::to_string)
        .chain(["+Inf".to_string()])
        .collect();
    for (alias, m) in all.iter().filter(|(_, m)| requested(m)) {
        let mut count = 0;
        for (le, bucket) in bounds.iter().zip(&m.buckets) {
            count += bucket.load(Ordering::Relaxed);
            let labels = [("alias", &**alias), ("le", le.as_str())];
            x.sample(
                "hagate_instance_request_duration_seconds_bucket",
                &labels,
                count as f64,
            );
        }
        let sum = m.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        x.sample(
            "hagate_instance_request_duration_seconds_sum",
            &[("alias", alias)],
            sum,
        );
        x.sample(
            "hagate_instance_request_duration_seconds_count",
            &[("alias", alias)],
            count as f64,
        );
    }
    const REQUESTS: &str = "hagate_instance_requests_total";
    x.family(
        REQUESTS,
        "Requests an instance served (the last attempt's instance), by status class.",
        "counter",
    );
    for (alias, m) in all.iter().filter(|(_, m)| requested(m)) {
        for (class, n) in CLASSES.iter().zip(&m.by_class) {
            let labels = [("alias", &**alias), ("class", class)];
            x.sample(REQUESTS, &labels, n.load(Ordering::Relaxed) as f64);
        }
    }
    for (name, help, label, values, counts) in [
        (
            "hagate_health_checks_total",
            "Active health checks, by result.",
            "result",
            ["pass", "fail"],
            (|m: &InstanceMetrics| &m.checks) as fn(&InstanceMetrics) -> &[AtomicU64; 2],
        ),
        (
            "hagate_health_transitions_total",
            "Active health verdict changes.",
            "to",
            ["up", "down"],
            |m: &InstanceMetrics| &m.transitions,
        ),
    ] {
        x.family(name, help, "counter");
        for (alias, m) in &all {
            for (value, n) in values.iter().zip(counts(m)) {
                let n = n.load(Ordering::Relaxed);
                if n > 0 {
                    x.sample(name, &[("alias", alias), (label, value)], n as f64);
                }
            }
        }
    }
}

/// The label values of `hagate_requests_total`'s `status`: common codes by name, the rest
/// by class. Static, so no request allocates a label.
const STATUSES: [&str; 20] = [
    "0", "200", "201", "204", "301", "302", "304", "400", "401", "403", "404", "500", "502", "503",
    "504", "1xx", "2xx", "3xx", "4xx", "5xx",
];

/// The codes with a label of their own, in the order of [`STATUSES`].
const COMMON: [u16; 15] = [
    0, 200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 500, 502, 503, 504,
];

/// The index of `status`'s label in [`STATUSES`].
fn status_index(status: u16) -> usize {
    if let Some(i) = COMMON.iter().position(|&c| c == status) {
        return i;
    }
    match status {
        100..=199 => 15,
        200..=299 => 16,
        300..=399 => 17,
        400..=499 => 18,
        _ => 19,
    }
}

/// The roles of `hagate_requests_total` and `hagate_request_duration_seconds`.
const ROLES: [&str; 4] = ["main", "backup", "replacement", "none"];

/// The children of the per-request metrics, each resolved at its first use and then
/// read without a lookup: `with_label_values` hashes the labels and takes a lock.
/// A child is created only when first used, so `/metrics` shows the series it showed
/// before.
pub struct RequestMetrics {
    counts: [[OnceLock<IntCounter>; STATUSES.len()]; ROLES.len()],
    durations: [OnceLock<Histogram>; ROLES.len()],
    engines: [OnceLock<IntCounter>; ENGINES.len()],
}

/// The label values of `hagate_engine_requests_total`'s `engine`.
pub const ENGINES: [&str; 2] = ["hagate", "pingora"];

impl RequestMetrics {
    fn new() -> Self {
        RequestMetrics {
            counts: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
            durations: std::array::from_fn(|_| OnceLock::new()),
            engines: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    /// One request served by hagate's own forwarding loop (`true`) or pingora's proxy.
    pub fn engine(&self, hagate: bool) {
        let e = usize::from(!hagate);
        self.engines[e]
            .get_or_init(|| metrics().engine_requests.with_label_values(&[ENGINES[e]]))
            .inc();
    }

    /// One request that ended with `status` (0: none written) in `role` (a label of
    /// [`ROLES`]; anything else counts as `none`), after `elapsed`.
    pub fn observe(&self, role: &str, status: u16, elapsed: std::time::Duration) {
        let r = ROLES.iter().position(|x| *x == role).unwrap_or(3);
        let s = status_index(status);
        let m = metrics();
        self.counts[r][s]
            .get_or_init(|| m.requests.with_label_values(&[ROLES[r], STATUSES[s]]))
            .inc();
        self.durations[r]
            .get_or_init(|| m.request_duration.with_label_values(&[ROLES[r]]))
            .observe(elapsed.as_secs_f64());
    }
}

/// The per-request metrics' resolved children.
pub fn request_metrics() -> &'static RequestMetrics {
    static CHILDREN: OnceLock<RequestMetrics> = OnceLock::new();
    CHILDREN.get_or_init(RequestMetrics::new)
}

/// All metrics, registered once in their own registry.
pub struct Metrics {
    registry: Registry,
    /// `hagate_requests_total{role,status}`: role is main, backup or none.
    pub requests: IntCounterVec,
    /// `hagate_request_duration_seconds{role}`.
    pub request_duration: HistogramVec,
    /// `hagate_engine_requests_total{engine}`: hagate (its own forwarding loop) or pingora.
    pub engine_requests: IntCounterVec,
    /// `hagate_failovers_total{reason}`: main_down (sent to backup), connect_failure and
    /// in_flight (retried on the other instance).
    pub failovers: IntCounterVec,
    /// `hagate_haid_errors_total{reason}`.
    pub haid_errors: IntCounterVec,
    /// `hagate_unknown_alias_total`: requests naming an alias the table lacks.
    pub unknown_alias: IntCounter,
    /// `hagate_no_live_instance_total`: 503 answers.
    pub no_live: IntCounter,
    /// `hagate_placements_total{outcome}`: ok or no_live_instance.
    pub placements: IntCounterVec,
    /// `hagate_passive_ejections_total{alias}`.
    pub ejections: IntCounterVec,
    /// `hagate_alias_table_version`.
    pub table_version: IntGauge,
    /// `hagate_alias_table_size`.
    pub table_size: IntGauge,
    /// `hagate_alias_table_swaps_total{source,result}`: source is config, sighup or api.
    pub table_swaps: IntCounterVec,
    /// `hagate_plugin_calls_total{plugin,outcome}`: each call counts once as ok, trap,
    /// timeout or invalid; a failed call answered by the native policy also counts as
    /// fallback.
    pub plugin_calls: IntCounterVec,
    /// `hagate_plugin_call_seconds{plugin}`: time of one plugin call, including taking or
    /// making an instance.
    pub plugin_call_seconds: HistogramVec,
    /// `hagate_plugin_reloads_total{plugin,result}`: loads of a plugin at start and on
    /// reload; result is ok or error.
    pub plugin_reloads: IntCounterVec,
    /// `hagate_config_last_reload_successful`: 1 from the start and after a reload of the
    /// config file that applied; 0 after one that was refused, until one applies.
    pub config_reload_ok: IntGauge,
    /// `hagate_config_last_reload_success_timestamp_seconds`: when the config last
    /// applied (the start, or a reload), in Unix seconds.
    pub config_reload_success_time: prometheus::Gauge,
    /// `hagate_config_reload_duration_seconds`: how long a reload of the config file took,
    /// applied or refused.
    pub config_reload_seconds: Histogram,
    /// `hagate_control_plane_lag_seconds`: how late the control plane's runtime woke a
    /// timer (`lag`): the time its one thread spent on something that did not yield.
    pub control_plane_lag: Histogram,
    /// `hagate_membership_heartbeats_total{result}`: accepted, rejected (another holder is
    /// fresh) or stale (the entry changed since the sender read it).
    pub heartbeats: IntCounterVec,
    /// `hagate_membership_takeovers_total{alias}`: an expired holder replaced by another.
    pub takeovers: IntCounterVec,
    /// `hagate_replacements_total`: requests sent to a re-placement instance.
    pub replacements: IntCounter,
    /// `hagate_store_up`: 1 while the membership store is in sync (always, for the
    /// embedded store; on etcd, while the watch runs on a fully read state).
    pub store_up: IntGauge,
    /// `hagate_store_revision`: the etcd revision applied (0 for the embedded store).
    pub store_revision: IntGauge,
    /// `hagate_store_last_sync_age_seconds`: time since etcd last answered the watch.
    pub store_last_sync_age: prometheus::Gauge,
    /// `hagate_store_resyncs_total{reason}`: full reads of the prefix: start, compacted,
    /// revision_backwards.
    pub store_resyncs: IntCounterVec,
    /// `hagate_store_events_total{result}`: watch events applied, skipped (at or below the
    /// applied revision) or bad (a value that does not parse).
    pub store_events: IntCounterVec,
    /// `hagate_connections_closed_total{reason}`: proxy connections the gateway closed:
    /// keepalive_timeout, header_timeout, evicted_idle (to make room), refused_full.
    pub connections_closed: IntCounterVec,
    /// `hagate_connections_open{listener}`: open connections on the proxy and admin listeners.
    pub connections_open: IntGaugeVec,
    /// `hagate_dns_lookups_total{result}`: host-name lookups of instance addresses, ok or
    /// error (an error keeps the last good address).
    pub dns_lookups: IntCounterVec,
    /// `hagate_local_resource_errors_total{during}`: EMFILE, ENFILE, ENOBUFS or ENOMEM met
    /// while connecting upstream or health checking; never counted against the upstream.
    pub local_resource_errors: IntCounterVec,
    /// `hagate_upstream_idle_connections`: idle upstream connections kept by the
    /// forwarding loop for reuse.
    pub upstream_idle: IntGauge,
    /// `hagate_upstream_idle_closed_total{reason}`: idle upstream connections the gateway
    /// closed: max_idle (the pool, or one address's share of 128, was full),
    /// idle_timeout, out_of_descriptors.
    pub upstream_idle_closed: IntCounterVec,
}

/// Registers `metric` in `r` and hands it back.
fn register<M: prometheus::core::Collector + Clone + 'static>(r: &Registry, metric: M) -> M {
    r.register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(
        r,
        IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        r,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
    )
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
    labels: &[&str],
) -> HistogramVec {
    register(
        r,
        HistogramVec::new(
            HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )
        .expect("valid metric"),
    )
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    register(r, IntCounter::new(name, help).expect("valid metric"))
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    register(r, IntGauge::new(name, help).expect("valid metric"))
}

fn float_gauge(r: &Registry, name: &str, help: &str) -> prometheus::Gauge {
    register(r, prometheus::Gauge::new(name, help).expect("valid metric"))
}

impl Metrics {
    /// A load or reload of the config file applied (now) or was refused.
    pub fn config_applied(&self, ok: bool) {
        self.config_reload_ok.set(i64::from(ok));
        if ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.config_reload_success_time.set(now);
        }
    }

    fn new() -> Self {
        let r = Registry::new();
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("the process collector is registered once");
        let build_info = register(
            &r,
            IntGaugeVec::new(
                Opts::new(
                    "hagate_build_info",
                    "Always 1; the labels say which hagate runs.",
                ),
                &["version"],
            )
            .expect("valid metric"),
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let requests = counter_vec(
            &r,
            "hagate_requests_total",
            "Requests answered, by the role of the instance that served them and status.",
            &["role", "status"],
        );
        let engine_requests = counter_vec(
            &r,
            "hagate_engine_requests_total",
            "Requests by the HTTP engine that served them: hagate (its own HTTP/1.1 forwarding loop) or pingora (its proxy).",
            &["engine"],
        );
        let request_duration = histogram_vec(
            &r,
            "hagate_request_duration_seconds",
            "Time from request to the end of the response, by role.",
            &REQUEST_BUCKETS,
            &["role"],
        );
        let failovers = counter_vec(
            &r,
            "hagate_failovers_total",
            "Requests served by the other instance than their first choice, by reason.",
            &["reason"],
        );
        let haid_errors = counter_vec(
            &r,
            "hagate_haid_errors_total",
            "Requests refused because their context id is not a valid HAID, by reason.",
            &["reason"],
        );
        for reason in HaidError::REASONS
            .iter()
            .chain(&["not_utf8", "bad_wrapper"])
        {
            haid_errors.with_label_values(&[reason]);
        }
        for reason in ["main_down", "connect_failure", "in_flight"] {
            failovers.with_label_values(&[reason]);
        }
        let unknown_alias = counter(
            &r,
            "hagate_unknown_alias_total",
            "Requests whose HAID names no alias the table knows.",
        );
        let no_live = counter(
            &r,
            "hagate_no_live_instance_total",
            "Requests answered 503 because no instance was live.",
        );
        let placements = counter_vec(
            &r,
            "hagate_placements_total",
            "Placements of requests without a HAID, by outcome.",
            &["outcome"],
        );
        let ejections = counter_vec(
            &r,
            "hagate_passive_ejections_total",
            "Passive ejections after consecutive failures.",
            &["alias"],
        );
        let table_version = gauge(
            &r,
            "hagate_alias_table_version",
            "Version of the alias table in use.",
        );
        let table_size = gauge(&r, "hagate_alias_table_size", "Aliases in the table.");
        let table_swaps = counter_vec(
            &r,
            "hagate_alias_table_swaps_total",
            "Attempts to replace the alias table, by source and result.",
            &["source", "result"],
        );
        let plugin_calls = counter_vec(
            &r,
            "hagate_plugin_calls_total",
            "Placement plugin calls, by outcome (ok, trap, timeout, invalid, declined; \
             fallback when the native policy answered for a failed call).",
            &["plugin", "outcome"],
        );
        let plugin_call_seconds = histogram_vec(
            &r,
            "hagate_plugin_call_seconds",
            "Duration of one placement plugin call.",
            &[
                0.000_002, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5,
                0.001, 0.0025, 0.005, 0.01, 0.05,
            ],
            &["plugin"],
        );
        let plugin_reloads = counter_vec(
            &r,
            "hagate_plugin_reloads_total",
            "Attempts to load a placement plugin (at start and on reload), by result.",
            &["plugin", "result"],
        );
        let config_reload_ok = gauge(
            &r,
            "hagate_config_last_reload_successful",
            "1 if the config file applied at the start and at its last reload; 0 after a refused reload, until one applies.",
        );
        let config_reload_success_time = float_gauge(
            &r,
            "hagate_config_last_reload_success_timestamp_seconds",
            "When the config file last applied (the start or a reload), in Unix seconds.",
        );
        let config_reload_seconds = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "hagate_config_reload_duration_seconds",
                    "How long a reload of the config file took (read, plugins, table), applied or refused.",
                )
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            )
            .expect("valid metric"),
        );
        let control_plane_lag = register(
            &r,
            Histogram::with_opts(
                HistogramOpts::new(
                    "hagate_control_plane_lag_seconds",
                    "How late the control plane (health checks, reloads, the etcd watch) woke a timer it set every 100 ms.",
                )
                .buckets(vec![0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            )
            .expect("valid metric"),
        );
        let heartbeats = counter_vec(
            &r,
            "hagate_membership_heartbeats_total",
            "Membership heartbeats, by result (accepted, rejected, stale).",
            &["result"],
        );
        for result in ["accepted", "rejected", "stale"] {
            heartbeats.with_label_values(&[result]);
        }
        let takeovers = counter_vec(
            &r,
            "hagate_membership_takeovers_total",
            "Aliases taken over from an expired holder by another instance.",
            &["alias"],
        );
        let replacements = counter(
            &r,
            "hagate_replacements_total",
            "Requests whose main and backup were both dead, sent to a re-placement instance.",
        );
        let store_up = gauge(
            &r,
            "hagate_store_up",
            "1 while the membership store is in sync (etcd: the watch runs on a full read).",
        );
        let store_revision = gauge(
            &r,
            "hagate_store_revision",
            "The etcd revision this gateway has applied (0 for the embedded store).",
        );
        let store_last_sync_age = float_gauge(
            &r,
            "hagate_store_last_sync_age_seconds",
            "Seconds since etcd last answered this gateway's watch (0 for the embedded store).",
        );
        let store_resyncs = counter_vec(
            &r,
            "hagate_store_resyncs_total",
            "Full reads of the store prefix, by reason: start, compacted, revision_backwards.",
            &["reason"],
        );
        let store_events = counter_vec(
            &r,
            "hagate_store_events_total",
            "Watch events, by result: applied, skipped (duplicate or old), bad (unparsable).",
            &["result"],
        );
        let connections_closed = counter_vec(
            &r,
            "hagate_connections_closed_total",
            "Proxy connections closed by the gateway: keepalive_timeout, header_timeout, evicted_idle, refused_full.",
            &["reason"],
        );
        let connections_open = gauge_vec(
            &r,
            "hagate_connections_open",
            "Open client connections, by listener (proxy or admin).",
            &["listener"],
        );
        let local_resource_errors = counter_vec(
            &r,
            "hagate_local_resource_errors_total",
            "Local resource errors (EMFILE, ENFILE, ENOBUFS, ENOMEM), by what hit them: upstream or health_check.",
            &["during"],
        );
        let upstream_idle = gauge(
            &r,
            "hagate_upstream_idle_connections",
            "Idle upstream connections kept for reuse by hagate's forwarding loop.",
        );
        let upstream_idle_closed = counter_vec(
            &r,
            "hagate_upstream_idle_closed_total",
            "Idle upstream connections closed by the gateway: max_idle (the pool, or one address's share of 128, was full), idle_timeout, out_of_descriptors.",
            &["reason"],
        );
        for reason in ["max_idle", "idle_timeout", "out_of_descriptors"] {
            upstream_idle_closed.with_label_values(&[reason]);
        }
        // Series that alerts take a rate of exist from the start, at 0.
        for reason in [
            "keepalive_timeout",
            "header_timeout",
            "header_too_large",
            "evicted_idle",
            "refused_full",
        ] {
            connections_closed.with_label_values(&[reason]);
        }
        for during in ["upstream", "health_check"] {
            local_resource_errors.with_label_values(&[during]);
        }
        let dns_lookups = counter_vec(
            &r,
            "hagate_dns_lookups_total",
            "Host-name lookups of instance addresses, by result (an error keeps the last good address).",
            &["result"],
        );
        for result in ["ok", "error"] {
            dns_lookups.with_label_values(&[result]);
        }
        for listener in ["proxy", "admin"] {
            connections_open.with_label_values(&[listener]);
        }
        Metrics {
            registry: r,
            dns_lookups,
            connections_closed,
            connections_open,
            local_resource_errors,
            upstream_idle,
            upstream_idle_closed,
            store_up,
            store_revision,
            store_last_sync_age,
            store_resyncs,
            store_events,
            heartbeats,
            takeovers,
            replacements,
            plugin_calls,
            plugin_call_seconds,
            plugin_reloads,
            config_reload_ok,
            config_reload_success_time,
            config_reload_seconds,
            control_plane_lag,
            requests,
            engine_requests,
            request_duration,
            failovers,
            haid_errors,
            unknown_alias,
            no_live,
            placements,
            ejections,
            table_version,
            table_size,
            table_swaps,
        }
    }

    /// Records the version and size of the table now in use.
    pub fn observe_table(&self, version: u64, size: usize) {
        self.table_version.set(version as i64);
        self.table_size.set(size as i64);
    }

    /// Forgets the series of every alias that `kept` refuses (one that left the table):
    /// its request, duration and health-check metrics, and its passive ejections. Without
    /// this, a gateway whose table keeps changing its aliases would export, and hold, a
    /// series for every alias it ever served. An alias that comes back starts from zero,
    /// which Prometheus reads as a counter reset.
    pub fn forget_aliases(&self, kept: impl Fn(&str) -> bool) {
        by_alias().retain(|alias, _| kept(alias));
        // ejections are rare: their children are few, so read them back from the family
        use prometheus::core::Collector;
        let gone: Vec<String> = self
            .ejections
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .flat_map(|m| m.get_label().iter().map(|l| l.value()))
            .filter(|alias| !kept(alias))
            .map(str::to_string)
            .collect();
        for alias in gone {
            let _ = self.ejections.remove_label_values(&[&alias]);
        }
    }

    /// Renders the text exposition: the registry's families, every alias's request
    /// metrics, then what `scraped` writes from state read now (the per-instance gauges).
    pub fn render(&self, scraped: impl FnOnce(&mut Exposition<'_>)) -> String {
        let mut out = String::new();
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        let mut x = Exposition {
            out: &mut out,
            header: None,
        };
        render_instances(&mut x);
        scraped(&mut x);
        out
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line about one alias, and the family headers, in order.
    fn about(text: &str, alias: &str) -> Vec<String> {
        let label = format!("alias=\"{alias}\"");
        text.lines()
            .filter(|l| l.starts_with("# ") || l.contains(&label))
            .filter(|l| !l.starts_with("# ") || l.contains("hagate_instance_request"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn instance_metrics_render_as_the_registrys_encoder_renders_them() {
        let alias = "render_test_alias";
        let ours = InstanceMetrics::for_alias(alias);
        assert!(Arc::ptr_eq(&ours, &InstanceMetrics::for_alias(alias)));
        // The same metrics as registry children, as they were before.
        let r = Registry::new();
        let requests = counter_vec(
            &r,
            "hagate_instance_requests_total",
            "Requests an instance served (the last attempt's instance), by status class.",
            &["alias", "class"],
        );
        let duration = histogram_vec(
            &r,
            "hagate_instance_request_duration_seconds",
            "Time from request to the end of the response, by the instance that served it.",
            &REQUEST_BUCKETS,
            &["alias"],
        );
        for class in CLASSES {
            requests.with_label_values(&[alias, class]);
        }
        // Bounds are inclusive (`le`), and the sums are exact in binary and in nanoseconds.
        for (status, seconds) in [(200, 0.0), (204, 0.25), (503, 0.5), (0, 1.0), (101, 7.0)] {
            let elapsed = std::time::Duration::from_secs_f64(seconds);
            ours.observe(status, elapsed);
            let class = match status {
                100..=599 => usize::from(status / 100 - 1),
                _ => 5,
            };
            requests.with_label_values(&[alias, CLASSES[class]]).inc();
            duration.with_label_values(&[alias]).observe(seconds);
        }
        let mut expected = String::new();
        TextEncoder::new()
            .encode_utf8(&r.gather(), &mut expected)
            .unwrap();
        let rendered = metrics().render(|_| {});
        assert_eq!(about(&rendered, alias), about(&expected, alias));
        assert_eq!(about(&rendered, alias).len(), 2 * 2 + 16 + 6);
    }

    #[test]
    fn instance_gauges_render_as_the_registrys_encoder_renders_them() {
        let r = Registry::new();
        let inflight = gauge_vec(
            &r,
            "hagate_instance_inflight",
            "Requests in flight to the instance.",
            &["alias"],
        );
        let up = gauge_vec(
            &r,
            "hagate_instance_up",
            "1 if the instance is live (active checks up and not ejected), else 0.",
            &["alias", "address"],
        );
        let age = register(
            &r,
            prometheus::GaugeVec::new(
                Opts::new(
                    "hagate_membership_holder_age_seconds",
                    "Age of the last accepted heartbeat of each alias's entry.",
                ),
                &["alias"],
            )
            .unwrap(),
        );
        let instances = [
            ("cs_1", "127.0.0.1:9101", true, 3),
            ("cs_2", "[::1]:9102", false, 0),
        ];
        for (alias, address, live, n) in instances {
            inflight.with_label_values(&[alias]).set(n);
            up.with_label_values(&[alias, address]).set(i64::from(live));
        }
        age.with_label_values(&["cs_1"]).set(0.25);
        let mut expected = String::new();
        TextEncoder::new()
            .encode_utf8(&r.gather(), &mut expected)
            .unwrap();
        let mut out = String::new();
        let mut x = Exposition {
            out: &mut out,
            header: None,
        };
        let gauges = instances
            .iter()
            .map(|&(alias, address, live, n)| InstanceGauges {
                alias,
                address: address.parse().unwrap(),
                live,
                inflight: n as u64,
            });
        x.instance_gauges(gauges, [("cs_1", 0.25)].into_iter());
        assert_eq!(out, expected);
    }

    #[test]
    fn label_values_and_help_are_escaped_as_the_format_asks() {
        let mut out = String::new();
        let mut x = Exposition {
            out: &mut out,
            header: None,
        };
        x.family("a_total", "one \\ two\nthree \"q\"", "counter");
        x.sample("a_total", &[("k", "x\\y\"z\nw")], 1.5);
        x.family("b", "no samples, no header", "gauge");
        assert_eq!(
            out,
            "# HELP a_total one \\\\ two\\nthree \"q\"\n# TYPE a_total counter\na_total{k=\"x\\\\y\\\"z\\nw\"} 1.5\n"
        );
    }

    #[test]
    fn common_codes_have_their_own_label_and_the_rest_their_class() {
        for code in COMMON {
            assert_eq!(STATUSES[status_index(code)], code.to_string());
        }
        for (code, label) in [(101, "1xx"), (206, "2xx"), (307, "3xx"), (429, "4xx")] {
            assert_eq!(STATUSES[status_index(code)], label);
        }
        assert_eq!(STATUSES[status_index(599)], "5xx");
        assert_eq!(STATUSES[status_index(999)], "5xx");
    }

    #[test]
    fn resolved_children_count_in_the_exported_series() {
        let m = request_metrics();
        let before = metrics()
            .requests
            .with_label_values(&["backup", "503"])
            .get();
        m.observe("backup", 503, std::time::Duration::from_millis(1));
        m.observe("backup", 503, std::time::Duration::from_millis(1));
        let after = metrics()
            .requests
            .with_label_values(&["backup", "503"])
            .get();
        assert_eq!(after - before, 2);
        assert!(metrics()
            .render(|_| {})
            .contains("hagate_request_duration_seconds_count{role=\"backup\"}"));
    }

    #[test]
    fn an_alias_forgotten_leaves_the_exposition_and_comes_back_from_zero() {
        // other tests share the process-wide metrics: touch only these aliases
        let (gone, kept) = ("forget_test_gone", "forget_test_kept");
        let series = |text: &str, alias: &str| {
            let label = format!("alias=\"{alias}\"");
            text.lines().filter(|l| l.contains(&label)).count()
        };
        let old = InstanceMetrics::for_alias(gone);
        old.observe(200, std::time::Duration::from_millis(1));
        old.checked(true);
        InstanceMetrics::for_alias(kept).observe(200, std::time::Duration::from_millis(1));
        metrics().ejections.with_label_values(&[gone]).inc();
        metrics().ejections.with_label_values(&[kept]).inc();
        let before = metrics().render(|_| {});
        // 14 buckets, sum, count, 6 classes, the passed check, the ejection
        assert_eq!(series(&before, gone), 24, "{before}");
        metrics().forget_aliases(|alias| alias != gone);
        let after = metrics().render(|_| {});
        assert_eq!(series(&after, gone), 0, "{after}");
        assert_eq!(series(&after, kept), series(&before, kept), "{after}");
        // back: a new series from zero, not the old counts
        let new = InstanceMetrics::for_alias(gone);
        assert!(!Arc::ptr_eq(&old, &new));
        new.observe(503, std::time::Duration::from_millis(1));
        let again = metrics().render(|_| {});
        assert!(
            again.contains(&format!(
                "hagate_instance_requests_total{{alias=\"{gone}\",class=\"2xx\"}} 0\n"
            )),
            "{again}"
        );
        assert!(
            again.contains(&format!(
                "hagate_instance_requests_total{{alias=\"{gone}\",class=\"5xx\"}} 1\n"
            )),
            "{again}"
        );
    }
}

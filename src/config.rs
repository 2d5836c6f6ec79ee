//! The one TOML config file: serde structs that refuse unknown fields, and `validate()`,
//! which checks everything in one place and names the TOML path of the first bad field.
//!
//! A `Config` that `load` returns is a config that works: the alias table builds from it.
//! This module does no IO beyond reading the file, and knows nothing of pingora.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::aliases::{AliasTable, TableError};
pub use crate::model::{ActiveHealthConfig, InstanceSpec, PassiveHealthConfig, Prefer};

/// Why a config was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The IO error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (toml's message names the key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message.
        message: String,
    },
    /// A field has a value that cannot work.
    #[error("{field}: {message}")]
    Invalid {
        /// The TOML path of the field, e.g. `instances.cs_1.address`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl From<TableError> for ConfigError {
    fn from(e: TableError) -> Self {
        ConfigError::Invalid {
            field: e.field(),
            message: e.to_string(),
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// The whole config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: the proxy listener.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[admin]`: the admin listener (`/metrics`, `/v1/aliases`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[context_id]`: where the context id is read from.
    #[serde(default)]
    pub context_id: ContextIdConfig,
    /// `[routing]`: which paths are HAID-routed, retries and the 503 answer.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// `[upstream]`: timeouts towards context servers.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// `[health]`: active and passive checks.
    #[serde(default)]
    pub health: HealthConfig,
    /// `[table]`: where the alias table comes from when not from `[instances]`.
    #[serde(default)]
    pub table: TableConfig,
    /// `[instances.<alias>]`: the alias table, e.g. `[instances.cs_1_dev] address = "10.0.0.5:9116"`.
    #[serde(default, deserialize_with = "crate::model::deserialize_specs")]
    pub instances: crate::model::Specs,
    /// `[membership]`: heartbeat leases and alias takeover by standbys.
    #[serde(default)]
    pub membership: MembershipConfig,
    /// `[store]`: where membership and the alias table live: `kind = "embedded"` (this
    /// gateway's memory, the default) or `kind = "etcd"` (shared by several gateways).
    #[serde(default)]
    pub store: StoreConfig,
    /// `[[plugins]]`: Wasm placement plugins, in priority order. A request without a HAID
    /// is placed by the first plugin with a `match` entry that fits it, else natively.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
    /// `[log]`: the log format and the access log.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[log]`
///
/// ```toml
/// [log]
/// format = "json"   # or "text" (the default); read at start
/// access = true     # one event per request, target hagate::access; hot-reloaded
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `format = "text"`: human-readable lines, or `"json"`: one JSON object per line. The
    /// level comes from `RUST_LOG` (default `info`). Read at start: a reload that changes
    /// it is logged and takes effect at the next start (or `hagate run --upgrade`).
    #[serde(default)]
    pub format: LogFormat,
    /// `access = false`: log one event per request (method, path, status, role, alias,
    /// upstream, attempts, failed_over, duration_us, context_id) at INFO with target
    /// `hagate::access`.
    #[serde(default)]
    pub access: bool,
}

/// `log.format`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[[plugins]]`: one Wasm placement plugin.
///
/// ```toml
/// [[plugins]]
/// name = "tenants"
/// path = "plugins/tenant_affinity.wasm"   # relative to this config file
/// sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
/// deadline = "5ms"
/// memory_limit = "16MiB"
/// fail_policy = "fallback"                 # or "reject" (503)
/// config = '{"fallback": "shared"}'
/// match = [{ tenant = "acme" }, { path_prefix = "/api/rest_j/v1/contextservice/" }]
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// `name = "lowest-load"`: names the plugin in logs and metrics; unique.
    pub name: String,
    /// `path = "plugins/lowest_load.wasm"`: the component; relative paths are relative to
    /// the config file's directory.
    pub path: PathBuf,
    /// `sha256 = "<64 hex digits>"`: the file must hash to this, or it is refused.
    pub sha256: String,
    /// `deadline = "5ms"`: CPU time one call may take before it is cut off.
    #[serde(default = "default_plugin_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// `memory_limit = "16MiB"`: the most linear memory one instance may grow to.
    #[serde(default = "default_plugin_memory")]
    pub memory_limit: bytesize::ByteSize,
    /// `fail_policy = "fallback"`: what a failed call (trap, timeout, invalid answer)
    /// does: `fallback` places natively, `reject` answers 503.
    #[serde(default)]
    pub fail_policy: FailPolicy,
    /// `config = '{"metric": "inflight"}'`: handed to the plugin's `configure` at load.
    #[serde(default)]
    pub config: String,
    /// `match = [{ tenant = "acme" }, { path_prefix = "/x" }]`: the requests this plugin
    /// places; an entry with both fields needs both. Omitted: every request.
    #[serde(default, rename = "match")]
    pub matches: Vec<PluginMatch>,
}

/// One `match` entry of a plugin.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginMatch {
    /// `path_prefix = "/api/"`: the request path starts with this.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// `tenant = "acme"`: the tenant header (`routing.tenant_header`) equals this.
    #[serde(default)]
    pub tenant: Option<String>,
}

impl PluginMatch {
    /// Whether a request with this path and tenant fits.
    pub fn fits(&self, path: &str, tenant: Option<&str>) -> bool {
        self.path_prefix
            .as_deref()
            .is_none_or(|p| path.starts_with(p))
            && self.tenant.as_deref().is_none_or(|t| tenant == Some(t))
    }
}

/// What a failed plugin call does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailPolicy {
    /// Place with the native least-loaded policy.
    #[default]
    Fallback,
    /// Answer 503.
    Reject,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Proxy listen address: `listen = "0.0.0.0:8080"`.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Worker threads for the proxy: `threads = 2`.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Let idle proxy threads steal work from busy ones: `work_stealing = false`. Off by
    /// default: pingora's per-thread runtimes measured ~40% more req/s here (see README).
    #[serde(default)]
    pub work_stealing: bool,
    /// Seconds to let in-flight requests finish on SIGTERM: `grace_period = "5s"`.
    #[serde(default = "secs::<5>", with = "humantime_serde")]
    pub grace_period: Duration,
    /// Close a client connection idle this long, before its first request or between
    /// requests: `keepalive_timeout = "60s"` (whole seconds, 1s-1h).
    #[serde(default = "secs::<60>", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Close a client connection whose request headers are not complete this long after
    /// the request's first byte: `header_timeout = "10s"` (100ms-10m).
    #[serde(default = "secs::<10>", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// The most client connections open at once: `max_connections = 10000`. Above it, the
    /// longest-idle connection is closed to make room (or, if none is idle, the new one).
    /// Default: derived from the file-descriptor limit, as HAProxy derives `maxconn`:
    /// (limit - reserve) / 2, since each proxied connection may need an upstream one too.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// The largest request head (request line plus headers) a client may send:
    /// `max_header_bytes = "64KiB"` (1KiB-1MiB). A larger one, or one with more than 250
    /// lines, is answered 431 with a JSON body.
    #[serde(default = "default_header_bytes")]
    pub max_header_bytes: bytesize::ByteSize,
    /// Where the running gateway writes its pid: `pid_file = "/run/hagate/hagate.pid"`.
    /// `hagate run --upgrade` reads it to find the gateway it replaces. Default:
    /// `/tmp/hagate-<proxy port>.pid`.
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// The Unix socket over which a running gateway hands its listening sockets to the one
    /// that replaces it (`hagate run --upgrade`): `upgrade_sock = "/run/hagate/upgrade.sock"`.
    /// Default: `/tmp/hagate-<proxy port>.upgrade.sock`.
    #[serde(default)]
    pub upgrade_sock: Option<PathBuf>,
    /// TLS on the proxy listener: `tls = { cert = "cert.pem", key = "key.pem" }` (PEM files,
    /// relative to the config file; the certificate file may hold the chain). Read at start:
    /// new certificates take effect with `hagate run --upgrade`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Which HTTP engine forwards requests: `forwarding = "hagate"` (the default) serves the
    /// common HTTP/1.1 request with hagate's own forwarding loop, and hands every other
    /// request (HTTP/1.0, HTTP/2, upgrades, `Expect`, chunked or large request bodies,
    /// instances with `tls = true`) to pingora's proxy; `"pingora"` sends every request
    /// through pingora's proxy. Read for each new client connection.
    #[serde(default)]
    pub forwarding: Forwarding,
}

/// `server.forwarding`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// hagate's own HTTP/1.1 loop for the common request, pingora's proxy for the rest.
    #[default]
    Hagate,
    /// Pingora's proxy for every request.
    Pingora,
}

/// `server.tls`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, PEM.
    pub cert: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl TlsConfig {
    /// Checks that both files can be read and hold what they should: the error names
    /// `server.tls.cert` or `server.tls.key`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        pem_file("server.tls.cert", &self.cert, &["CERTIFICATE"])?;
        pem_file(
            "server.tls.key",
            &self.key,
            &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"],
        )
    }
}

/// Checks that `path` can be read and holds a PEM block with one of the `labels`; the
/// error names `field`.
fn pem_file(field: &str, path: &Path, labels: &[&str]) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    let found = labels
        .iter()
        .any(|label| text.contains(&format!("-----BEGIN {label}-----")));
    if !found {
        return Err(invalid(
            field,
            format!("{} holds no PEM {} block", path.display(), labels[0]),
        ));
    }
    Ok(())
}

impl ServerConfig {
    fn port_tag(&self) -> String {
        self.listen
            .rsplit_once(':')
            .map_or_else(|| "0".to_string(), |(_, port)| port.to_string())
    }

    /// `pid_file`, or its default.
    pub fn pid_file(&self) -> PathBuf {
        self.pid_file
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/tmp/hagate-{}.pid", self.port_tag())))
    }

    /// `upgrade_sock`, or its default.
    pub fn upgrade_sock(&self) -> PathBuf {
        self.upgrade_sock.clone().unwrap_or_else(|| {
            PathBuf::from(format!("/tmp/hagate-{}.upgrade.sock", self.port_tag()))
        })
    }
}

fn default_header_bytes() -> bytesize::ByteSize {
    bytesize::ByteSize::kib(64)
}

/// `[admin]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin listen address: `listen = "127.0.0.1:9090"`.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Bearer token required by write endpoints (`PUT /v1/aliases`): `token = "s3cret"`.
    /// Unset means writes are open to whoever reaches the admin listener.
    #[serde(default)]
    pub token: Option<String>,
    /// The most admin connections open at once: `max_connections = 64` (1-10000). Above
    /// it, the admin listener stops accepting until one closes.
    #[serde(default = "default_admin_connections")]
    pub max_connections: usize,
    /// Close an admin connection that has not sent a complete request head this long
    /// after it connected or after its last answer: `header_timeout = "10s"` (100ms-10m).
    #[serde(default = "secs::<10>", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// The largest request body the admin API reads: `max_body = "1MiB"` (1KiB-1GiB). A
    /// `PUT /v1/aliases` of 100k aliases is about 6 MiB. A larger body is refused with 413.
    #[serde(default = "default_admin_body")]
    pub max_body: bytesize::ByteSize,
}

fn default_admin_connections() -> usize {
    64
}

fn default_admin_body() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(1)
}

/// `[table]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// `file = "aliases.json"` (relative to the config file): the alias table in a JSON file
    /// of its own, in the shape of the `PUT /v1/aliases` body,
    /// `{"instances": {"cs_1": {"address": "10.0.0.5:9116"}}}`. Instead of `[instances]`,
    /// for big tables: JSON parses many times faster than TOML. Watched and reloaded like
    /// the config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
}

/// `[context_id]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ContextIdConfig {
    /// Query parameter read first: `query_param = "contextID"`.
    #[serde(default = "default_context_name")]
    pub query_param: String,
    /// Header read second: `header = "contextID"`.
    #[serde(default = "default_context_name")]
    pub header: String,
}

/// `[routing]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Path prefixes that are HAID-routed: `haid_paths = ["/api/rest_j/v1/contextservice"]`.
    /// The default `["/"]` routes every path by HAID. Other paths are placed like requests
    /// that carry no HAID.
    #[serde(default = "default_haid_paths")]
    pub haid_paths: Vec<String>,
    /// `Retry-After` sent with a 503 when no instance is live: `retry_after = "5s"`.
    #[serde(default = "secs::<5>", with = "humantime_serde")]
    pub retry_after: Duration,
    /// Replay a request on the backup when the main fails after connecting but before any
    /// response byte was sent to the client (the body must fit pingora's 64 KiB retry
    /// buffer): `retry_in_flight = true`. Connect failures are always retried.
    #[serde(default = "yes")]
    pub retry_in_flight: bool,
    /// Header that carries the tenant for placement: `tenant_header = "x-hagate-tenant"`.
    #[serde(default = "default_tenant_header")]
    pub tenant_header: String,
    /// When both instances of a HAID are dead (and no standby holds either alias), send
    /// the request to a replacement chosen by a consistent-hash ring over the live
    /// instances, keyed by the context id: `replacement = false`.
    #[serde(default)]
    pub replacement: bool,
}

/// `[membership]`: the embedded membership store and the heartbeat API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipConfig {
    /// `enabled = false`: serve `/v1/membership/*` and resolve aliases through holders.
    #[serde(default)]
    pub enabled: bool,
    /// I, the interval agents heartbeat at: `interval = "1s"`.
    #[serde(default = "secs::<1>", with = "humantime_serde")]
    pub interval: Duration,
    /// T, after which a standby may take over a silent holder's alias: `timeout = "3s"`.
    /// Must be more than twice `interval`.
    #[serde(default = "secs::<3>", with = "humantime_serde")]
    pub timeout: Duration,
    /// Bearer token heartbeat writers must send: `token = "s3cret"`. Required when
    /// membership is enabled.
    #[serde(default)]
    pub token: Option<String>,
    /// Which address wins for an alias that has both a static `[instances]` entry and a
    /// live holder: `prefer = "membership"` (the holder) or `"static"`. Each instance can
    /// override it with its own `prefer`.
    #[serde(default)]
    pub prefer: Prefer,
    /// Glob patterns of the aliases a heartbeat may claim: `claimable = ["cs_*"]`.
    /// Default `["*"]`: any alias.
    #[serde(default = "any_alias")]
    pub claimable: Vec<String>,
    /// Networks a heartbeat's address must fall in: `allowed_networks = ["10.0.0.0/8"]`.
    /// Default: any (`["0.0.0.0/0", "::/0"]`). Port 0 and unspecified, broadcast and
    /// multicast addresses are always refused.
    #[serde(default = "any_network")]
    pub allowed_networks: Vec<ipnet::IpNet>,
}

fn any_alias() -> Vec<String> {
    vec!["*".into()]
}

fn any_network() -> Vec<ipnet::IpNet> {
    vec![
        ipnet::IpNet::V4(ipnet::Ipv4Net::default()),
        ipnet::IpNet::V6(ipnet::Ipv6Net::default()),
    ]
}

impl MembershipConfig {
    /// The `claimable` patterns as one matcher (they were checked by `validate`).
    pub fn claimable_set(&self) -> Result<globset::GlobSet, ConfigError> {
        let mut set = globset::GlobSetBuilder::new();
        for (i, pattern) in self.claimable.iter().enumerate() {
            let glob = globset::Glob::new(pattern).map_err(|e| {
                invalid(
                    &format!("membership.claimable[{i}]"),
                    format!("{pattern:?}: {e}"),
                )
            })?;
            set.add(glob);
        }
        set.build()
            .map_err(|e| invalid("membership.claimable", e.to_string()))
    }

    /// Whether a heartbeat may name `address`.
    pub fn allows(&self, address: &std::net::SocketAddr) -> bool {
        self.allowed_networks
            .iter()
            .any(|n| n.contains(&address.ip()))
    }
}

/// Which membership store backs the gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In this gateway's memory: one gateway, nothing shared, nothing persisted.
    #[default]
    Embedded,
    /// An etcd v3 cluster shared by every gateway with the same `prefix`.
    Etcd,
}

/// `[store]`: membership and the alias table, in this process or on etcd.
///
/// ```toml
/// [store]
/// kind = "etcd"                              # default "embedded"
/// endpoints = ["http://127.0.0.1:2379"]
/// prefix = "/hagate/prod"                    # every key lives under it; one per cluster
/// snapshot = "/var/lib/hagate/state.json"    # the last applied state, for starts with etcd down
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `kind = "etcd"`; `"embedded"` by default.
    #[serde(default)]
    pub kind: StoreKind,
    /// `endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]`: etcd client URLs.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// `prefix = "/hagate/prod"`: starts with `/`, does not end with one.
    #[serde(default = "default_store_prefix")]
    pub prefix: String,
    /// `snapshot = "/var/lib/hagate/state.json"`: where the applied state is written
    /// (atomically, debounced) after each change; read at start if etcd is unreachable.
    #[serde(default)]
    pub snapshot: Option<PathBuf>,
    /// `username = "hagate"`: etcd authentication (with `password`).
    #[serde(default)]
    pub username: Option<String>,
    /// `password = "..."`: etcd authentication (with `username`).
    #[serde(default)]
    pub password: Option<String>,
    /// `request_timeout = "2s"`: the most one etcd read or write may take.
    #[serde(default = "secs::<2>", with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// The most proxy worker threads `server.threads` may ask for.
pub const MAX_THREADS: usize = 256;

fn default_store_prefix() -> String {
    "/hagate".into()
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// TCP connect timeout: `connect_timeout = "1s"`.
    #[serde(default = "secs::<1>", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Read timeout for each read from the upstream: `read_timeout = "30s"`.
    #[serde(default = "secs::<30>", with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Write timeout for each write to the upstream: `write_timeout = "30s"`.
    #[serde(default = "secs::<30>", with = "humantime_serde")]
    pub write_timeout: Duration,
    /// How long an idle pooled connection is kept: `idle_timeout = "60s"`.
    #[serde(default = "secs::<60>", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The most idle upstream connections kept, across all instances: `max_idle = 1024`
    /// (0-1000000; 0 keeps none). A connection released to a full pool closes the least
    /// recently released one. Default: 1024, or half of the proxy's `max_connections` if
    /// that is less, so that idle connections leave descriptors for live ones.
    #[serde(default)]
    pub max_idle: Option<usize>,
    /// How often instance host names (`address = "cs-1.internal:9108"`) are resolved
    /// again, in the background: `dns_refresh = "30s"` (100ms-1h).
    #[serde(default = "secs::<30>", with = "humantime_serde")]
    pub dns_refresh: Duration,
    /// The CA certificates (PEM) that instances with `tls = true` are verified against:
    /// `ca_file = "ca.pem"` (relative to the config file). Default: the system's roots.
    /// Read at start.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// `[health]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `[health.active]`
    #[serde(default)]
    pub active: ActiveHealthConfig,
    /// `[health.passive]`
    #[serde(default)]
    pub passive: PassiveHealthConfig,
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_threads() -> usize {
    2
}
fn default_context_name() -> String {
    "contextID".into()
}
fn default_haid_paths() -> Vec<String> {
    vec!["/".into()]
}
fn default_tenant_header() -> String {
    "x-hagate-tenant".into()
}
fn default_plugin_deadline() -> Duration {
    Duration::from_millis(5)
}
fn default_plugin_memory() -> bytesize::ByteSize {
    bytesize::ByteSize::mib(16)
}
fn secs<const N: u64>() -> Duration {
    Duration::from_secs(N)
}
fn yes() -> bool {
    true
}

macro_rules! default_from_serde {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                toml::from_str("").expect("every field has a default")
            }
        }
    )*};
}
default_from_serde!(
    ServerConfig,
    AdminConfig,
    ContextIdConfig,
    RoutingConfig,
    UpstreamConfig,
    MembershipConfig,
    StoreConfig
);

/// What a load read: the config file and its `table.file`. `Config::load_reusing` takes
/// back what still holds the same bytes, to skip parsing it again: a SIGHUP with nothing
/// changed, a plugin's file replaced, or a change beside a big table.
#[derive(Debug, Clone)]
pub struct FilesRead {
    /// The config file, parsed as written: paths not yet resolved, nothing validated. A
    /// 100k-alias `[instances]` takes 0.3–0.5 s to parse from TOML; the digest about 4 ms.
    pub config: FileRead<std::sync::Arc<Config>>,
    /// The `table.file` it names, if any: `{"instances": {...}}`, the body of `PUT
    /// /v1/aliases`. 100k aliases take about 40 ms to parse from JSON.
    pub table: Option<TableFile>,
}

/// A `table.file` as last read.
pub type TableFile = FileRead<crate::model::Specs>;

impl FilesRead {
    /// Points what was read at `instances`, a map equal to the one read (the one in use),
    /// so that a copy of the table is not kept for the next load.
    pub fn share_instances(&mut self, instances: &crate::model::Specs) {
        if let Some(t) = &mut self.table {
            t.parsed = std::sync::Arc::clone(instances);
        } else if let Some(c) = std::sync::Arc::get_mut(&mut self.config.parsed) {
            // read anew (taken back, it holds the map in use already)
            c.instances = std::sync::Arc::clone(instances);
        }
    }
}

/// The bytes of the file at `path` and their SHA-256: what a reload compares to tell a
/// change from a touch (the config watcher's fingerprint, and `FileRead`).
pub fn read_digested(path: &Path) -> std::io::Result<(Vec<u8>, [u8; 32])> {
    use sha2::{Digest, Sha256};
    let bytes = std::fs::read(path)?;
    let digest = Sha256::digest(&bytes).into();
    Ok((bytes, digest))
}

/// A file as last read: its path, the SHA-256 of its bytes and what they were parsed into.
#[derive(Debug, Clone)]
pub struct FileRead<T> {
    /// The file (relative paths resolved against the config's directory).
    pub path: PathBuf,
    /// The SHA-256 of its bytes.
    pub digest: [u8; 32],
    /// What they held.
    pub parsed: T,
}

impl<T: Clone> FileRead<T> {
    /// Reads `path`: `previous` again if it is the same file holding the same bytes, else
    /// what `parse` makes of them.
    fn read(
        path: &Path,
        previous: Option<&Self>,
        parse: impl FnOnce(Vec<u8>) -> Result<T, ConfigError>,
    ) -> Result<Self, ConfigError> {
        let (bytes, digest) = read_digested(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(p) = previous.filter(|p| p.path == path && p.digest == digest) {
            return Ok(p.clone());
        }
        Ok(FileRead {
            path: path.to_path_buf(),
            digest,
            parsed: parse(bytes)?,
        })
    }

    /// Whether `other` is the same file holding the same bytes.
    pub fn same_bytes(&self, other: &Self) -> bool {
        self.path == other.path && self.digest == other.digest
    }
}

/// Reads a `table.file`, taking `previous` back if it holds the same bytes.
fn read_table_file(path: &Path, previous: Option<&TableFile>) -> Result<TableFile, ConfigError> {
    FileRead::read(path, previous, |bytes| {
        crate::model::from_json::<crate::model::TableValue>(&bytes)
            .map(|t| t.instances)
            .map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("not an alias table ({{\"instances\": {{...}}}}): {e}"),
            })
    })
}

/// Reads the config file, taking `previous` back if it holds the same bytes.
fn read_config_file(
    path: &Path,
    previous: Option<&FileRead<std::sync::Arc<Config>>>,
) -> Result<FileRead<std::sync::Arc<Config>>, ConfigError> {
    FileRead::read(path, previous, |bytes| {
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        let parsed = Config::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        Ok(std::sync::Arc::new(parsed))
    })
}

impl Config {
    /// Reads, parses and validates `path`, and the `table.file` it names.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_reusing(path, None).map(|(config, _)| config)
    }

    /// `load`, taking back from `previous` (what the last load read) each file that still
    /// holds the same bytes: it is not parsed again. Everything is validated as ever.
    /// Also returns what was read now, for the next load.
    pub fn load_reusing(
        path: &Path,
        previous: Option<&FilesRead>,
    ) -> Result<(Config, FilesRead), ConfigError> {
        let config_file = read_config_file(path, previous.map(|p| &p.config))?;
        let mut config = Config::clone(&config_file.parsed);
        if let Some(dir) = path.parent() {
            if let Some(file) = &mut config.table.file {
                *file = dir.join(&*file);
            }
            for p in &mut config.plugins {
                p.path = dir.join(&p.path);
            }
            if let Some(snap) = &mut config.store.snapshot {
                *snap = dir.join(&*snap);
            }
            for path in [&mut config.server.pid_file, &mut config.server.upgrade_sock]
                .into_iter()
                .flatten()
            {
                *path = dir.join(&*path);
            }
            if let Some(tls) = &mut config.server.tls {
                tls.cert = dir.join(&tls.cert);
                tls.key = dir.join(&tls.key);
            }
            if let Some(ca) = &mut config.upstream.ca_file {
                *ca = dir.join(&*ca);
            }
        }
        let mut table_file = None;
        let config = match config.table.file.clone() {
            Some(file) => {
                if !config.instances.is_empty() {
                    return Err(invalid(
                        "table.file",
                        "set either table.file or [instances], not both",
                    ));
                }
                let read = read_table_file(&file, previous.and_then(|p| p.table.as_ref()))?;
                config.instances = std::sync::Arc::clone(&read.parsed);
                table_file = Some(read);
                // a bad alias or address: say which file it is in
                config.checked().map_err(|e| match e {
                    ConfigError::Invalid { field, message } if field.starts_with("instances") => {
                        ConfigError::Invalid {
                            field,
                            message: format!("{message} (in {})", file.display()),
                        }
                    }
                    other => other,
                })?
            }
            None => config.checked()?,
        };
        // what depends on the files the config names, once paths are resolved
        config.validate_upgrade_sock()?;
        if let Some(tls) = &config.server.tls {
            tls.validate()?;
        }
        if let Some(ca) = &config.upstream.ca_file {
            pem_file("upstream.ca_file", ca, &["CERTIFICATE"])?;
        }
        Ok((
            config,
            FilesRead {
                config: config_file,
                table: table_file,
            },
        ))
    }

    /// Parses and validates TOML text. Host names among the instances' addresses that
    /// were never resolved are resolved here (blocking).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text)?.checked()
    }

    /// The TOML, parsed into the schema but not validated.
    fn from_toml(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })
    }

    /// Resolves the host names among the instances' addresses that were never resolved
    /// (blocking), and validates.
    fn checked(self) -> Result<Config, ConfigError> {
        crate::dns::resolve(crate::dns::unresolved(
            self.instances.values().map(|s| s.address.as_str()),
        ));
        self.validate()?;
        Ok(self)
    }

    fn validate_upgrade_sock(&self) -> Result<(), ConfigError> {
        // sun_path holds 108 bytes with its NUL; pingora would panic on a longer path
        let sock = self.server.upgrade_sock();
        if sock.as_os_str().len() > 107 {
            return Err(invalid(
                "server.upgrade_sock",
                format!(
                    "{} is longer than a Unix socket path may be (107 bytes)",
                    sock.display()
                ),
            ));
        }
        Ok(())
    }

    /// Checks every field; the error names the TOML path of the first bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let listen = self.listen_addr()?;
        let admin = self.admin_addr()?;
        let overlap = listen.port() == admin.port()
            && (listen.ip() == admin.ip()
                || listen.ip().is_unspecified()
                || admin.ip().is_unspecified());
        if overlap {
            return Err(invalid(
                "admin.listen",
                format!("{admin} overlaps server.listen ({listen}); the two listeners need their own addresses"),
            ));
        }
        self.validate_upgrade_sock()?;
        if !admin.ip().is_loopback() && self.admin.token.is_none() {
            return Err(invalid(
                "admin.token",
                format!(
                    "required when admin.listen ({admin}) is not a loopback address: \
                     PUT /v1/aliases would be open to the network"
                ),
            ));
        }
        if !(1..=MAX_THREADS).contains(&self.server.threads) {
            return Err(invalid(
                "server.threads",
                format!("must be between 1 and {MAX_THREADS}"),
            ));
        }
        self.validate_durations()?;
        if matches!(&self.admin.token, Some(t) if t.trim().is_empty()) {
            return Err(invalid("admin.token", "must not be empty when set"));
        }
        if self.context_id.query_param.is_empty() {
            return Err(invalid("context_id.query_param", "must not be empty"));
        }
        http::HeaderName::from_bytes(self.context_id.header.as_bytes())
            .map_err(|_| invalid("context_id.header", "not a valid HTTP header name"))?;
        http::HeaderName::from_bytes(self.routing.tenant_header.as_bytes())
            .map_err(|_| invalid("routing.tenant_header", "not a valid HTTP header name"))?;
        if self.routing.haid_paths.is_empty() {
            return Err(invalid(
                "routing.haid_paths",
                "must list at least one path prefix (use [\"/\"] for all paths)",
            ));
        }
        for (i, p) in self.routing.haid_paths.iter().enumerate() {
            if !p.starts_with('/') {
                return Err(invalid(
                    &format!("routing.haid_paths[{i}]"),
                    format!("path prefix {p:?} must start with `/`"),
                ));
            }
        }
        if self.routing.retry_after.subsec_nanos() != 0 {
            return Err(invalid(
                "routing.retry_after",
                "must be whole seconds (Retry-After carries seconds)",
            ));
        }
        for (field, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.read_timeout", self.upstream.read_timeout),
            ("upstream.write_timeout", self.upstream.write_timeout),
            ("upstream.idle_timeout", self.upstream.idle_timeout),
            ("health.active.interval", self.health.active.interval),
            ("health.active.timeout", self.health.active.timeout),
            (
                "health.passive.base_ejection",
                self.health.passive.base_ejection,
            ),
        ] {
            if d.is_zero() {
                return Err(invalid(field, "must be greater than zero"));
            }
        }
        let a = &self.health.active;
        if !a.path.starts_with('/') {
            return Err(invalid(
                "health.active.path",
                format!("{:?} must start with `/`", a.path),
            ));
        }
        // it is sent as the request line's target, as written
        if !a.path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "health.active.path",
                format!(
                    "{:?} must be printable ASCII with no spaces (percent-encode the rest)",
                    a.path
                ),
            ));
        }
        if a.rise == 0 {
            return Err(invalid("health.active.rise", "must be at least 1"));
        }
        if a.fall == 0 {
            return Err(invalid("health.active.fall", "must be at least 1"));
        }
        let p = &self.health.passive;
        if p.consecutive_failures == 0 {
            return Err(invalid(
                "health.passive.consecutive_failures",
                "must be at least 1",
            ));
        }
        if p.max_ejection < p.base_ejection {
            return Err(invalid(
                "health.passive.max_ejection",
                "must be at least health.passive.base_ejection",
            ));
        }
        // On etcd the table lives in etcd; `[instances]` only seeds an empty one.
        if self.instances.is_empty() && self.store.kind == StoreKind::Embedded {
            return Err(invalid("instances", "at least one instance is required"));
        }
        self.validate_plugins()?;
        self.validate_membership()?;
        self.validate_store()?;
        // Building the table is where aliases and addresses are validated.
        AliasTable::validate(&self.instances)?;
        Ok(())
    }

    /// Checks `[membership]`: `T > 2I`, and a token when enabled.
    fn validate_membership(&self) -> Result<(), ConfigError> {
        let m = &self.membership;
        crate::membership::Params::new(m.interval, m.timeout).map_err(|e| match e {
            crate::membership::ParamsError::ZeroInterval => {
                invalid("membership.interval", e.to_string())
            }
            _ => invalid("membership.timeout", e.to_string()),
        })?;
        if matches!(&m.token, Some(t) if t.trim().is_empty()) {
            return Err(invalid("membership.token", "must not be empty when set"));
        }
        m.claimable_set()?;
        if m.claimable.is_empty() {
            return Err(invalid(
                "membership.claimable",
                "must list at least one pattern ([\"*\"] for any alias)",
            ));
        }
        if m.allowed_networks.is_empty() {
            return Err(invalid(
                "membership.allowed_networks",
                "must list at least one network ([\"0.0.0.0/0\", \"::/0\"] for any)",
            ));
        }
        if m.enabled && m.token.is_none() {
            return Err(invalid(
                "membership.token",
                "required when membership is enabled: heartbeat writers must authenticate",
            ));
        }
        Ok(())
    }

    /// Every duration within its bounds (see the README's config reference), and a
    /// health check that ends before the next one starts.
    fn validate_durations(&self) -> Result<(), ConfigError> {
        const MS: Duration = Duration::from_millis(1);
        const SEC: Duration = Duration::from_secs(1);
        const HOUR: Duration = Duration::from_secs(3600);
        const DAY: Duration = Duration::from_secs(86_400);
        let u = &self.upstream;
        let (a, p, m) = (&self.health.active, &self.health.passive, &self.membership);
        for (field, d, min, max) in [
            (
                "server.keepalive_timeout",
                self.server.keepalive_timeout,
                SEC,
                HOUR,
            ),
            (
                "server.header_timeout",
                self.server.header_timeout,
                MS * 100,
                MS * 600_000,
            ),
            (
                "admin.header_timeout",
                self.admin.header_timeout,
                MS * 100,
                MS * 600_000,
            ),
            (
                "server.grace_period",
                self.server.grace_period,
                Duration::ZERO,
                HOUR,
            ),
            ("routing.retry_after", self.routing.retry_after, SEC, HOUR),
            (
                "upstream.connect_timeout",
                u.connect_timeout,
                MS,
                Duration::from_secs(600),
            ),
            ("upstream.read_timeout", u.read_timeout, MS, HOUR),
            ("upstream.write_timeout", u.write_timeout, MS, HOUR),
            ("upstream.idle_timeout", u.idle_timeout, MS, HOUR),
            (
                "upstream.dns_refresh",
                u.dns_refresh,
                Duration::from_millis(100),
                HOUR,
            ),
            (
                "health.active.interval",
                a.interval,
                Duration::from_millis(10),
                HOUR,
            ),
            ("health.active.timeout", a.timeout, MS, HOUR),
            ("health.passive.base_ejection", p.base_ejection, MS, HOUR),
            ("health.passive.max_ejection", p.max_ejection, MS, DAY),
            ("membership.interval", m.interval, Duration::ZERO, HOUR),
            ("membership.timeout", m.timeout, Duration::ZERO, HOUR),
        ] {
            if d < min || d > max {
                return Err(invalid(
                    field,
                    format!(
                        "{} is out of bounds: it must be between {} and {}",
                        humantime::format_duration(d),
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                ));
            }
        }
        if self.server.keepalive_timeout.subsec_nanos() != 0 {
            return Err(invalid("server.keepalive_timeout", "must be whole seconds"));
        }
        if self
            .server
            .max_connections
            .is_some_and(|m| !(1..=1_000_000).contains(&m))
        {
            return Err(invalid(
                "server.max_connections",
                "must be between 1 and 1000000 (omit it to derive it from the fd limit)",
            ));
        }
        if self.upstream.max_idle.is_some_and(|m| m > 1_000_000) {
            return Err(invalid(
                "upstream.max_idle",
                "must be between 0 and 1000000 (omit it to derive it from max_connections)",
            ));
        }
        let hb = self.server.max_header_bytes;
        if hb < bytesize::ByteSize::kib(1) || hb >= bytesize::ByteSize::mib(1) {
            return Err(invalid(
                "server.max_header_bytes",
                "must be at least 1KiB and under 1MiB",
            ));
        }
        let mb = self.admin.max_body;
        if mb < bytesize::ByteSize::kib(1) || mb > bytesize::ByteSize::gib(1) {
            return Err(invalid("admin.max_body", "must be between 1KiB and 1GiB"));
        }
        if !(1..=10_000).contains(&self.admin.max_connections) {
            return Err(invalid(
                "admin.max_connections",
                "must be between 1 and 10000",
            ));
        }
        if a.timeout > a.interval {
            return Err(invalid(
                "health.active.timeout",
                "must not be longer than health.active.interval",
            ));
        }
        Ok(())
    }

    /// Checks `[store]`, and that `membership.timeout` is a lease TTL etcd can honour.
    fn validate_store(&self) -> Result<(), ConfigError> {
        let st = &self.store;
        if st.kind == StoreKind::Embedded {
            return Ok(());
        }
        if st.endpoints.is_empty() {
            return Err(invalid(
                "store.endpoints",
                "kind = \"etcd\" needs at least one endpoint, e.g. [\"http://127.0.0.1:2379\"]",
            ));
        }
        for (i, e) in st.endpoints.iter().enumerate() {
            let ok = e
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
            if !ok {
                return Err(invalid(
                    &format!("store.endpoints[{i}]"),
                    format!("{e:?} must be http://HOST:PORT (TLS to etcd is not supported yet)"),
                ));
            }
        }
        let p = &st.prefix;
        if !p.starts_with('/') || p.ends_with('/') || p.len() < 2 || p.contains("//") {
            return Err(invalid(
                "store.prefix",
                format!("{p:?} must start with `/` and not end with one, e.g. \"/hagate/prod\""),
            ));
        }
        if p.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("store.prefix", "must not contain whitespace"));
        }
        if st.username.is_some() != st.password.is_some() {
            return Err(invalid(
                "store.password",
                "set both `username` and `password`, or neither",
            ));
        }
        if st.request_timeout < Duration::from_millis(100) || st.request_timeout > secs::<60>() {
            return Err(invalid(
                "store.request_timeout",
                "must be between 100ms and 60s",
            ));
        }
        let t = self.membership.timeout;
        if self.membership.enabled && (t.subsec_nanos() != 0 || t < secs::<2>()) {
            return Err(invalid(
                "membership.timeout",
                format!(
                    "{} cannot be an etcd lease TTL: etcd counts TTLs in whole seconds and \
                     raises any TTL under about 2s, so use a whole number of seconds, at least \"2s\"",
                    humantime::format_duration(t)
                ),
            ));
        }
        Ok(())
    }

    /// Checks `[[plugins]]` fields (the file itself is checked by `plugin::PluginSet::load`).
    fn validate_plugins(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in self.plugins.iter().enumerate() {
            let field = |f: &str| format!("plugins[{i}].{f}");
            let ok_name = !p.name.is_empty()
                && p.name.len() <= 64
                && p.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok_name {
                return Err(invalid(
                    &field("name"),
                    format!("{:?} must be 1-64 of [A-Za-z0-9_-]", p.name),
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(invalid(
                    &field("name"),
                    format!("{:?} is used by an earlier plugin", p.name),
                ));
            }
            if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    &field("sha256"),
                    "must be 64 hex digits (run `sha256sum` on the .wasm file)",
                ));
            }
            if p.deadline < Duration::from_millis(1) || p.deadline > Duration::from_secs(10) {
                return Err(invalid(&field("deadline"), "must be between 1ms and 10s"));
            }
            if p.memory_limit < bytesize::ByteSize::mib(1)
                || p.memory_limit > bytesize::ByteSize::gib(4)
            {
                return Err(invalid(
                    &field("memory_limit"),
                    "must be between 1MiB and 4GiB",
                ));
            }
            for (j, m) in p.matches.iter().enumerate() {
                let f = format!("plugins[{i}].match[{j}]");
                if m.path_prefix.is_none() && m.tenant.is_none() {
                    return Err(invalid(
                        &f,
                        "needs `path_prefix` or `tenant` (omit `match` to place every request)",
                    ));
                }
                if m.path_prefix
                    .as_deref()
                    .is_some_and(|p| !p.starts_with('/'))
                {
                    return Err(invalid(&format!("{f}.path_prefix"), "must start with `/`"));
                }
            }
        }
        Ok(())
    }

    /// The proxy listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("server.listen", &self.server.listen)
    }

    /// The admin listen address.
    pub fn admin_addr(&self) -> Result<SocketAddr, ConfigError> {
        parse_addr("admin.listen", &self.admin.listen)
    }
}

fn parse_addr(field: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(field, format!("invalid socket address {value:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[instances.cs_1]\naddress = \"127.0.0.1:9001\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.context_id.query_param, "contextID");
        assert_eq!(c.health.active.rise, 2);
        assert_eq!(c.routing.haid_paths, vec!["/".to_string()]);
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    /// Writes `config` and `aliases.json` (if given) to a directory; loads the config.
    fn load_with_file(config: &str, aliases: Option<&str>) -> Result<Config, String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("hagate.toml"), config).unwrap();
        if let Some(a) = aliases {
            std::fs::write(dir.path().join("aliases.json"), a).unwrap();
        }
        Config::load(&dir.path().join("hagate.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn a_table_file_holds_the_table_as_json_and_its_errors_name_it() {
        let file = "[table]\nfile = \"aliases.json\"\n";
        let good =
            r#"{"instances": {"cs_1": {"address": "127.0.0.1:9001", "labels": {"zone": "a"}}}}"#;
        let c = load_with_file(file, Some(good)).unwrap();
        assert_eq!(c.instances["cs_1"].address, "127.0.0.1:9001");
        assert_eq!(c.instances["cs_1"].labels.get("zone"), Some("a"));
        // not both
        let both = load_with_file(&format!("{file}{MINIMAL}"), Some(good)).unwrap_err();
        assert!(both.starts_with("table.file: "), "{both}");
        // missing, not JSON, the wrong shape: the file is named
        for bad in [None, Some("[instances]"), Some(r#"{"cs_1": {}}"#)] {
            let e = load_with_file(file, bad).unwrap_err();
            assert!(e.contains("aliases.json"), "{bad:?}: {e}");
        }
        // a bad address: its field, and the file it is in
        let e = load_with_file(
            file,
            Some(r#"{"instances": {"cs_1": {"address": "nowhere"}}}"#),
        )
        .unwrap_err();
        assert!(e.starts_with("instances.cs_1.address: "), "{e}");
        assert!(e.contains("aliases.json"), "{e}");
    }

    #[test]
    fn an_unchanged_table_file_is_taken_back_not_parsed_and_a_changed_one_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let (conf, table) = (
            dir.path().join("hagate.toml"),
            dir.path().join("aliases.json"),
        );
        std::fs::write(&conf, "[table]\nfile = \"aliases.json\"\n").unwrap();
        let one = r#"{"instances": {"cs_1": {"address": "127.0.0.1:9001"}}}"#;
        std::fs::write(&table, one).unwrap();
        let (first, all) = Config::load_reusing(&conf, None).unwrap();
        let read = all.table.clone().expect("a table.file was read");
        assert!(std::sync::Arc::ptr_eq(&first.instances, &read.parsed));
        // the same bytes: the very map the last load parsed, not a new one
        let (again, kept) = Config::load_reusing(&conf, Some(&all)).unwrap();
        let kept = kept.table.unwrap();
        assert!(std::sync::Arc::ptr_eq(&again.instances, &read.parsed));
        assert_eq!(kept.digest, read.digest);
        // the same table written again with other bytes (a space) is parsed anew
        std::fs::write(&table, format!("{one} ")).unwrap();
        let (spaced, respaced) = Config::load_reusing(&conf, Some(&all)).unwrap();
        assert!(!std::sync::Arc::ptr_eq(&spaced.instances, &read.parsed));
        assert_eq!(spaced.instances, read.parsed);
        assert_ne!(respaced.table.unwrap().digest, read.digest);
        // new bytes: the new table, and a bad one is refused as ever, naming the file
        std::fs::write(
            &table,
            r#"{"instances": {"cs_2": {"address": "127.0.0.1:9002"}}}"#,
        )
        .unwrap();
        let (changed, _) = Config::load_reusing(&conf, Some(&all)).unwrap();
        assert!(changed.instances.contains_key("cs_2") && !changed.instances.contains_key("cs_1"));
        std::fs::write(&table, r#"{"instances": {"cs_1": {"adress": "x"}}}"#).unwrap();
        let e = Config::load_reusing(&conf, Some(&all))
            .unwrap_err()
            .to_string();
        assert!(e.contains("aliases.json") && e.contains("adress"), "{e}");
        // the same bytes under another name are read from that file
        let other = dir.path().join("other.json");
        std::fs::write(&other, one).unwrap();
        std::fs::write(&conf, "[table]\nfile = \"other.json\"\n").unwrap();
        let (moved, _) = Config::load_reusing(&conf, Some(&all)).unwrap();
        assert!(!std::sync::Arc::ptr_eq(&moved.instances, &read.parsed));
        // no table.file: nothing to take back
        std::fs::write(&conf, MINIMAL).unwrap();
        assert!(Config::load_reusing(&conf, Some(&all))
            .unwrap()
            .1
            .table
            .is_none());
    }

    #[test]
    fn an_unchanged_config_file_is_taken_back_not_parsed_and_still_validated() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("hagate.toml");
        let text = format!("[server]\npid_file = \"run/hagate.pid\"\n{MINIMAL}");
        std::fs::write(&conf, &text).unwrap();
        let (first, read) = Config::load_reusing(&conf, None).unwrap();
        // the same bytes: the very config the last load parsed, its table the same map
        let (again, kept) = Config::load_reusing(&conf, Some(&read)).unwrap();
        assert!(std::sync::Arc::ptr_eq(
            &kept.config.parsed,
            &read.config.parsed
        ));
        assert!(std::sync::Arc::ptr_eq(&again.instances, &first.instances));
        // paths are resolved against the config's directory once, as in the first load
        let pid = dir.path().join("run/hagate.pid");
        assert_eq!(again.server.pid_file.as_deref(), Some(pid.as_path()));
        assert_eq!(first.server.pid_file, again.server.pid_file);
        // other bytes, even only a comment: parsed anew
        std::fs::write(&conf, format!("{text}# a comment\n")).unwrap();
        let (_, commented) = Config::load_reusing(&conf, Some(&read)).unwrap();
        assert!(!std::sync::Arc::ptr_eq(
            &commented.config.parsed,
            &read.config.parsed
        ));
        // the same bytes in another file: read from that file
        let other = dir.path().join("other.toml");
        std::fs::write(&other, &text).unwrap();
        let (_, moved) = Config::load_reusing(&other, Some(&read)).unwrap();
        assert!(!std::sync::Arc::ptr_eq(
            &moved.config.parsed,
            &read.config.parsed
        ));
        // bad TOML is refused naming the file, and so is text that is not UTF-8
        std::fs::write(&conf, "[server\n").unwrap();
        let e = Config::load_reusing(&conf, Some(&read)).unwrap_err();
        assert!(
            e.to_string().starts_with(&conf.display().to_string()),
            "{e}"
        );
        std::fs::write(&conf, b"# \xff\n").unwrap();
        let e = Config::load_reusing(&conf, Some(&read)).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
        assert!(e.to_string().contains("hagate.toml"), "{e}");
        // taken back, the config is still validated with what it names: a table.file
        // that is gone refuses it even though the config's bytes did not change
        let with_table = "[table]\nfile = \"aliases.json\"\n";
        std::fs::write(
            dir.path().join("aliases.json"),
            r#"{"instances": {"cs_1": {"address": "127.0.0.1:9001"}}}"#,
        )
        .unwrap();
        std::fs::write(&conf, with_table).unwrap();
        let (_, read) = Config::load_reusing(&conf, None).unwrap();
        std::fs::remove_file(dir.path().join("aliases.json")).unwrap();
        let e = Config::load_reusing(&conf, Some(&read)).unwrap_err();
        assert!(e.to_string().contains("aliases.json"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        assert!(
            err("[instances.cs_1]\naddress = \"10.0.0:80\"\n")
                .starts_with("instances.cs_1.address: invalid socket address \"10.0.0:80\""),
            "{}",
            err("[instances.cs_1]\naddress = \"10.0.0:80\"\n")
        );
        assert!(err(&format!("[health.active]\nrise = 0\n{MINIMAL}"))
            .starts_with("health.active.rise:"));
        for path in ["/a b", "/a\\r\\nX: y", "/caf\u{e9}"] {
            let text = format!("[health.active]\npath = \"{path}\"\n{MINIMAL}");
            assert!(
                err(&text).starts_with("health.active.path:"),
                "{path:?}: {}",
                err(&text)
            );
        }
        assert!(err(&format!("[routing]\nhaid_paths = [\"x\"]\n{MINIMAL}"))
            .starts_with("routing.haid_paths[0]:"));
        assert!(err("").starts_with("instances:"));
        assert!(
            err("[instances.\"a--b\"]\naddress = \"127.0.0.1:1\"\n").starts_with("instances.a--b:")
        );
        // typos are refused, with the key named
        assert!(err(&format!("[server]\nlisten_addr = \"x\"\n{MINIMAL}"))
            .contains("unknown field `listen_addr`"));
        assert!(err(&format!(
            "[health.passive]\nbase_ejection = \"10s\"\nmax_ejection = \"1s\"\n{MINIMAL}"
        ))
        .starts_with("health.passive.max_ejection:"));
        // membership: T > 2I, and a token when enabled
        let m = |body: &str| err(&format!("[membership]\n{body}\n{MINIMAL}"));
        assert!(m("interval = \"1s\"\ntimeout = \"2s\"").starts_with("membership.timeout:"));
        assert!(m("interval = \"0s\"").starts_with("membership.interval:"));
        assert!(m("enabled = true").starts_with("membership.token:"));
        assert!(Config::parse(&format!(
            "[membership]\nenabled = true\ntoken = \"t\"\ninterval = \"1s\"\ntimeout = \"2100ms\"\n{MINIMAL}"
        ))
        .is_ok());
        // plugins: every field checked, named by its index
        let plugin = |extra: &str| {
            err(&format!(
                "{MINIMAL}[[plugins]]\nname = \"p\"\npath = \"p.wasm\"\nsha256 = \"{}\"\n{extra}\n",
                "a".repeat(64)
            ))
        };
        assert!(plugin("deadline = \"0ms\"").starts_with("plugins[0].deadline:"));
        assert!(plugin("memory_limit = \"1KiB\"").starts_with("plugins[0].memory_limit:"));
        assert!(plugin("match = [{}]").starts_with("plugins[0].match[0]:"));
        assert!(plugin("match = [{ path_prefix = \"x\" }]")
            .starts_with("plugins[0].match[0].path_prefix:"));
        assert!(plugin("fail_policy = \"shrug\"").contains("unknown variant `shrug`"));
        assert!(err(&format!(
            "{MINIMAL}[[plugins]]\nname = \"p\"\npath = \"p.wasm\"\nsha256 = \"xyz\"\n"
        ))
        .starts_with("plugins[0].sha256:"));
    }

    #[test]
    fn etcd_store_is_validated_and_the_timeout_must_be_a_lease_ttl() {
        let etcd = |extra: &str| {
            format!("[store]\nkind = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n{extra}\n")
        };
        // on etcd the table lives in etcd: [instances] may be empty
        let c = Config::parse(&etcd("prefix = \"/hagate/prod\"")).unwrap();
        assert_eq!(c.store.kind, StoreKind::Etcd);
        assert!(err("[store]\nkind = \"etcd\"\n").starts_with("store.endpoints:"));
        assert!(
            err("[store]\nkind = \"etcd\"\nendpoints = [\"127.0.0.1:2379\"]\n")
                .starts_with("store.endpoints[0]:")
        );
        for bad in ["hagate", "/hagate/", "/", "/a//b", "/a b"] {
            assert!(
                err(&etcd(&format!("prefix = {bad:?}"))).starts_with("store.prefix:"),
                "{bad:?}"
            );
        }
        assert!(err(&etcd("username = \"u\"")).starts_with("store.password:"));
        // etcd counts lease TTLs in whole seconds, and not under about 2s
        let member = |t: &str| {
            err(&format!(
                "{}[membership]\nenabled = true\ntoken = \"t\"\ninterval = \"200ms\"\ntimeout = \"{t}\"\n",
                etcd("")
            ))
        };
        for t in ["700ms", "2500ms", "1s"] {
            let e = member(t);
            assert!(
                e.starts_with("membership.timeout:") && e.contains("whole number of seconds"),
                "{t}: {e}"
            );
        }
        assert!(Config::parse(&format!(
            "{}[membership]\nenabled = true\ntoken = \"t\"\ninterval = \"500ms\"\ntimeout = \"2s\"\n",
            etcd("")
        ))
        .is_ok());
        // the embedded store still needs instances
        assert!(err("[store]\nkind = \"embedded\"\n").starts_with("instances:"));
    }

    #[test]
    fn absurd_values_are_refused_with_their_field() {
        for (text, field) in [
            (
                "[instances.cs_1]\naddress = \"127.0.0.1:0\"\n",
                "instances.cs_1.address",
            ),
            (
                "[instances.cs_1]\naddress = \"0.0.0.0:80\"\n",
                "instances.cs_1.address",
            ),
            (
                "[instances.cs_1]\naddress = \"255.255.255.255:80\"\n",
                "instances.cs_1.address",
            ),
            (
                "[instances.cs_1]\naddress = \"239.1.2.3:80\"\n",
                "instances.cs_1.address",
            ),
            (
                "[instances.\"cs\u{200b}1\"]\naddress = \"127.0.0.1:1\"\n",
                "instances.cs\u{200b}1",
            ),
        ] {
            assert!(err(text).starts_with(field), "{text}: {}", err(text));
        }
        let with = |extra: &str| err(&format!("{extra}\n{MINIMAL}"));
        for (extra, field) in [
            ("[server]\nlisten = \"127.0.0.1:9090\"", "admin.listen"),
            ("[server]\nlisten = \"0.0.0.0:9090\"", "admin.listen"),
            ("[server]\nthreads = 100000", "server.threads"),
            ("[admin]\nmax_body = \"2GiB\"", "admin.max_body"),
            ("[admin]\nmax_body = \"100B\"", "admin.max_body"),
            (
                "[server]\ngrace_period = \"100years\"",
                "server.grace_period",
            ),
            (
                "[routing]\nretry_after = \"1000000000y\"",
                "routing.retry_after",
            ),
            ("[routing]\nretry_after = \"1500ms\"", "routing.retry_after"),
            (
                "[upstream]\nread_timeout = \"30days\"",
                "upstream.read_timeout",
            ),
            ("[upstream]\nmax_idle = 1000001", "upstream.max_idle"),
            (
                "[health.active]\ninterval = \"1s\"\ntimeout = \"2s\"",
                "health.active.timeout",
            ),
            ("[admin]\nlisten = \"0.0.0.0:9090\"", "admin.token"),
            (
                "[membership]\nclaimable = [\"cs_[\"]",
                "membership.claimable[0]",
            ),
            ("[membership]\nclaimable = []", "membership.claimable"),
            (
                "[membership]\nallowed_networks = [\"10.0.0.0/33\"]",
                "invalid",
            ),
        ] {
            let e = with(extra);
            assert!(e.starts_with(field) || e.contains(field), "{extra}: {e}");
        }
        // a non-loopback admin listener is fine with a token
        assert!(Config::parse(&format!(
            "[admin]\nlisten = \"0.0.0.0:9090\"\ntoken = \"t\"\n{MINIMAL}"
        ))
        .is_ok());
    }
}

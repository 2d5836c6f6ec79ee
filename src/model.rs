//! The shared vocabulary: the words that `config`, `aliases`, `health`, `membership` and
//! `store` all speak (`Alias`, `InstanceSpec`, `Prefer`, the health-check settings).
//!
//! This module sits at the bottom: it imports nothing of hagate, so every other module can
//! import it and the arrows keep pointing down. Each type here validates itself on
//! deserialisation or is plain data; none does IO.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A validated alias: non-empty, at most 255 bytes, no whitespace or control characters,
/// no `--`, and no leading or trailing `-` (any of which would break HAID decoding).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Alias(Box<str>);

/// Why a string is not an alias.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AliasError {
    /// Empty.
    #[error("an alias must not be empty")]
    Empty,
    /// Longer than 255 bytes.
    #[error("an alias must be at most 255 bytes")]
    TooLong,
    /// Contains whitespace, a control character or an invisible format character.
    #[error("alias {0:?} contains whitespace, a control character or an invisible character")]
    BadChar(String),
    /// Would not survive HAID encoding.
    #[error("alias {0:?} contains `--` or starts or ends with `-`, so no HAID could carry it")]
    Dashes(String),
}

impl TryFrom<String> for Alias {
    type Error = AliasError;
    fn try_from(s: String) -> Result<Self, AliasError> {
        if s.is_empty() {
            return Err(AliasError::Empty);
        }
        if s.len() > 255 {
            return Err(AliasError::TooLong);
        }
        // ASCII (nearly every alias): whitespace and controls are the bytes up to the
        // space, and DEL; the invisible characters are all outside ASCII
        let bad = if s.is_ascii() {
            s.bytes().any(|b| b <= b' ' || b == 0x7f)
        } else {
            s.chars()
                .any(|c| c.is_whitespace() || c.is_control() || invisible(c))
        };
        if bad {
            return Err(AliasError::BadChar(s));
        }
        if s.contains("--") || s.starts_with('-') || s.ends_with('-') {
            return Err(AliasError::Dashes(s));
        }
        Ok(Alias(s.into_boxed_str()))
    }
}

/// Format characters that render as nothing (zero-width spaces and joiners, the BOM, the
/// soft hyphen, bidi controls): an alias with one looks like another alias but is not.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}' | '\u{E0000}'..='\u{E0FFF}')
}

impl From<Alias> for String {
    fn from(a: Alias) -> String {
        a.0.into()
    }
}

impl Alias {
    /// The alias text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Alias {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Alias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An instance's labels: key/value pairs sorted by key, behind an `Arc`, so the config,
/// the static and the published specs and the alias table share one copy and a clone
/// costs a reference count. A slice, not a `BTreeMap`: a map's node takes about 540 bytes
/// even for one label, and a 10k-alias table used to keep four copies of each
/// (docs/performance.md, P7). The serialised form is a map, as written in the config.
#[derive(Clone, PartialEq, Eq)]
pub struct Labels(Arc<[Label]>);

/// One label: (key, value).
type Label = (Box<str>, Box<str>);

impl Labels {
    /// The value of `key`, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    /// Every label, by key.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> + '_ {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    /// How many labels there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Default for Labels {
    /// No labels: one shared empty list for every instance that has none.
    fn default() -> Self {
        static EMPTY: OnceLock<Arc<[Label]>> = OnceLock::new();
        Labels(Arc::clone(EMPTY.get_or_init(|| Arc::from([]))))
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        if map.is_empty() {
            return Labels::default();
        }
        // a map iterates in key order, without duplicates: `get`'s binary search holds
        Labels(
            map.into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
                .collect(),
        )
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        BTreeMap::from(pairs).into()
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(d).map(Labels::from)
    }
}

/// An alias table as written (alias -> spec), shared: the config, the static table and
/// the published table are often the same map, and a reload whose `[instances]` did not
/// change keeps the map it had (docs/performance.md, P7).
pub type Specs = Arc<BTreeMap<String, InstanceSpec>>;

/// An alias table as a JSON document: the body of `PUT /v1/aliases`, the value of etcd's
/// table key, and a `table.file`: `{"instances": {"cs_1": {"address": ...}}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableValue {
    /// The instances, by alias.
    #[serde(deserialize_with = "deserialize_specs")]
    pub instances: Specs,
}

/// Reads `Specs` from a map: into a list first, then sorted and built in one go, which is
/// about twice as fast as inserting 100k aliases one by one. A repeated alias keeps its
/// last spec, as a map would.
pub fn deserialize_specs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Specs, D::Error> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = Vec<(String, InstanceSpec)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a table of instances: alias -> {address, ...}")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(pair) = map.next_entry()? {
                pairs.push(pair);
            }
            Ok(pairs)
        }
    }
    Ok(Arc::new(d.deserialize_map(Pairs)?.into_iter().collect()))
}

/// One instance as written in config or `PUT /v1/aliases`:
/// `[instances.cs_1_dev] address = "10.0.0.5:9116", labels = { zone = "a" }, weight = 1`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// `address = "127.0.0.1:9116"`: an IP socket address, or `"cs-1.internal:9116"`: a host
    /// name, resolved in the background (`dns`).
    pub address: String,
    /// `labels = { zone = "a", tenant = "t1" }`: free-form, passed to placement.
    #[serde(default)]
    pub labels: Labels,
    /// `weight = 1`: relative capacity for placement; `0` never receives new contexts
    /// (existing HAIDs still route to it).
    #[serde(default = "one")]
    pub weight: u32,
    /// `prefer = "static"`: overrides `membership.prefer` for this alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer: Option<Prefer>,
    /// `tls = true`: speak TLS to this instance (proxied requests and health checks),
    /// verifying its certificate against `upstream.ca_file` (else the system's roots).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// `sni = "cs-1.prod.internal"`: the server name sent and verified with TLS. Default:
    /// the host name of `address`, or none when `address` is an IP (the certificate must
    /// then name the IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The epoch (fencing token) of the membership holder whose address this is; set by
    /// the membership merge, never read from config or the API.
    #[serde(skip)]
    pub epoch: Option<u64>,
}

impl InstanceSpec {
    /// An instance at `address` with every other field at its default, as config gives it
    /// (weight 1, no labels).
    pub fn at(address: impl Into<String>) -> Self {
        InstanceSpec {
            address: address.into(),
            labels: Labels::default(),
            weight: 1,
            prefer: None,
            tls: false,
            sni: None,
            epoch: None,
        }
    }
}

fn one() -> u32 {
    1
}

/// Which source of an alias's address wins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Prefer {
    /// The live holder from membership, else the static entry.
    #[default]
    Membership,
    /// The static entry, whatever membership says.
    Static,
}

/// `[health.active]`: an HTTP GET to every instance, all in parallel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveHealthConfig {
    /// `enabled = true`
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `path = "/health"`
    #[serde(default = "default_health_path")]
    pub path: String,
    /// `interval = "1s"`
    #[serde(default = "secs::<1>", with = "humantime_serde")]
    pub interval: Duration,
    /// `timeout = "500ms"`
    #[serde(default = "half_second", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive passes that bring a down instance back: `rise = 2`.
    #[serde(default = "two")]
    pub rise: u32,
    /// Consecutive failures that take an up instance down: `fall = 2`.
    #[serde(default = "two")]
    pub fall: u32,
}

/// `[health.passive]`: consecutive connect failures or 5xx responses eject an instance.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthConfig {
    /// `enabled = true`
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `consecutive_failures = 3`
    #[serde(default = "three")]
    pub consecutive_failures: u32,
    /// First ejection time; each further ejection doubles it: `base_ejection = "5s"`.
    #[serde(default = "secs::<5>", with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Cap on the ejection time: `max_ejection = "60s"`.
    #[serde(default = "secs::<60>", with = "humantime_serde")]
    pub max_ejection: Duration,
}

fn default_health_path() -> String {
    "/health".into()
}
fn secs<const N: u64>() -> Duration {
    Duration::from_secs(N)
}
fn half_second() -> Duration {
    Duration::from_millis(500)
}
fn yes() -> bool {
    true
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}

impl Default for ActiveHealthConfig {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

/// Why an address cannot be routed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unroutable {
    /// Port 0.
    #[error("port 0 cannot be connected to")]
    PortZero,
    /// `0.0.0.0` or `::`.
    #[error("an unspecified address (0.0.0.0 or ::) cannot be connected to")]
    Unspecified,
    /// `255.255.255.255`.
    #[error("a broadcast address cannot be an upstream")]
    Broadcast,
    /// A multicast address.
    #[error("a multicast address cannot be an upstream")]
    Multicast,
}

/// Checks that `addr` is one a TCP connection can be made to: not port 0, and not an
/// unspecified, broadcast or multicast address.
pub fn routable(addr: &SocketAddr) -> Result<(), Unroutable> {
    if addr.port() == 0 {
        return Err(Unroutable::PortZero);
    }
    let ip = addr.ip();
    if ip.is_unspecified() {
        return Err(Unroutable::Unspecified);
    }
    if ip.is_multicast() {
        return Err(Unroutable::Multicast);
    }
    if matches!(ip, IpAddr::V4(v4) if v4.is_broadcast()) {
        return Err(Unroutable::Broadcast);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ascii_fast_path_refuses_exactly_the_characters_the_general_one_does() {
        for b in 0u8..128 {
            let c = char::from(b);
            let general = c.is_whitespace() || c.is_control() || invisible(c);
            let alias = Alias::try_from(format!("a{c}b"));
            assert_eq!(
                matches!(alias, Err(AliasError::BadChar(_))),
                general,
                "byte {b:#x}"
            );
        }
    }

    #[test]
    fn labels_are_shared_not_copied_and_serialise_as_the_map() {
        let spec: InstanceSpec =
            toml::from_str("address = \"10.0.0.5:9116\"\nlabels = { zone = \"a\" }").unwrap();
        let copy = spec.clone();
        assert!(
            Arc::ptr_eq(&spec.labels.0, &copy.labels.0),
            "a clone shares the map"
        );
        assert_eq!(copy.labels.get("zone"), Some("a"));
        assert_eq!(copy.labels.get("rack"), None);
        // Every instance without labels points at one empty map, however it was made.
        let bare: InstanceSpec = toml::from_str("address = \"10.0.0.6:9116\"").unwrap();
        let empty = Labels::from(BTreeMap::new());
        assert!(Arc::ptr_eq(&bare.labels.0, &Labels::default().0));
        assert!(Arc::ptr_eq(
            &empty.0,
            &InstanceSpec::at("10.0.0.7:1").labels.0
        ));
        // The wire form is unchanged: a plain object, and it reads back equal.
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["labels"], serde_json::json!({ "zone": "a" }));
        assert_eq!(serde_json::from_value::<InstanceSpec>(json).unwrap(), spec);
    }

    #[test]
    fn routable_refuses_what_no_connection_can_reach() {
        let r = |s: &str| routable(&s.parse().unwrap());
        assert_eq!(r("127.0.0.1:9"), Ok(()));
        assert_eq!(r("[::1]:9"), Ok(()));
        assert_eq!(r("127.0.0.1:0"), Err(Unroutable::PortZero));
        assert_eq!(r("0.0.0.0:80"), Err(Unroutable::Unspecified));
        assert_eq!(r("[::]:80"), Err(Unroutable::Unspecified));
        assert_eq!(r("255.255.255.255:80"), Err(Unroutable::Broadcast));
        assert_eq!(r("224.0.0.1:80"), Err(Unroutable::Multicast));
        assert_eq!(r("[ff02::1]:80"), Err(Unroutable::Multicast));
    }

    #[test]
    fn aliases_refuse_invisible_characters() {
        for bad in [
            "cs\u{200B}1",
            "\u{FEFF}cs_1",
            "cs\u{00AD}1",
            "cs\u{2060}1",
            "cs\u{202E}1",
        ] {
            assert!(Alias::try_from(bad.to_string()).is_err(), "{bad:?}");
        }
        assert!(Alias::try_from("cs_1_dev".to_string()).is_ok());
    }
}

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
        Alias::check(&s)?;
        Ok(Alias(s.into_boxed_str()))
    }
}

impl Alias {
    /// Whether `s` would make an alias, without making one (no allocation on success).
    pub fn check(s: &str) -> Result<(), AliasError> {
        if s.is_empty() {
            return Err(AliasError::Empty);
        }
        if s.len() > 255 {
            return Err(AliasError::TooLong);
        }
        // ASCII (nearly every alias), in one pass: whitespace and controls are the bytes
        // up to the space, and DEL; the invisible characters are all outside ASCII
        let (bad, dashes) = if s.is_ascii() {
            let mut previous = 0;
            let (mut bad, mut dashes) = (false, false);
            for b in s.bytes() {
                bad |= b <= b' ' || b == 0x7f;
                dashes |= b == b'-' && previous == b'-';
                previous = b;
            }
            (bad, dashes)
        } else {
            let bad = s
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || invisible(c));
            (bad, s.contains("--"))
        };
        if bad {
            return Err(AliasError::BadChar(s.to_string()));
        }
        if dashes || s.starts_with('-') || s.ends_with('-') {
            return Err(AliasError::Dashes(s.to_string()));
        }
        Ok(())
    }

    /// The alias text.
    pub fn as_str(&self) -> &str {
        &self.0
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
    /// As a map would read them (a repeated key keeps its last value), but without
    /// building one; while a table is read (`deserialize_specs`), equal label sets are
    /// read into one shared copy.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table of labels: key -> value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Labels, A::Error> {
                // none or one (nearly every instance): no list to build
                let Some(first) = map.next_entry::<Text<'de>, Text<'de>>()? else {
                    return Ok(Labels::default());
                };
                let Some(second) = map.next_entry()? else {
                    return Ok(Labels::interned(&[first]));
                };
                let mut pairs = vec![first, second];
                while let Some(pair) = map.next_entry()? {
                    pairs.push(pair);
                }
                // stable: equal keys keep their order, and the last of each is kept
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
                let mut unique: Vec<(Text<'de>, Text<'de>)> = Vec::with_capacity(pairs.len());
                for pair in pairs {
                    match unique.last_mut() {
                        Some(last) if last.0 == pair.0 => *last = pair,
                        _ => unique.push(pair),
                    }
                }
                Ok(Labels::interned(&unique))
            }
        }
        d.deserialize_map(Pairs)
    }
}

/// A string as the deserializer has it: borrowed from the input when it can be.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Text<'de>(std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(v.into()))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(v.to_string().into()))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(v.into()))
            }
        }
        d.deserialize_str(V)
    }
}

thread_local! {
    /// The label sets read so far by the `deserialize_specs` running on this thread;
    /// `None` outside one.
    static INTERNED: std::cell::RefCell<Option<hashbrown::HashTable<Labels>>> =
        const { std::cell::RefCell::new(None) };
}

impl Labels {
    /// Labels with these (sorted, unique) pairs: the copy already read by this table if
    /// there is one, else a new one.
    fn interned(pairs: &[(Text<'_>, Text<'_>)]) -> Labels {
        if pairs.is_empty() {
            return Labels::default();
        }
        let fresh = || {
            Labels(
                pairs
                    .iter()
                    .map(|(k, v)| (Box::from(&*k.0), Box::from(&*v.0)))
                    .collect(),
            )
        };
        INTERNED.with_borrow_mut(|interned| {
            let Some(interned) = interned else {
                return fresh();
            };
            let hash = labels_hash(pairs.iter().map(|(k, v)| (&*k.0, &*v.0)));
            let same = |l: &Labels| {
                l.len() == pairs.len()
                    && l.iter()
                        .zip(pairs)
                        .all(|((k, v), (pk, pv))| k == pk.0 && v == pv.0)
            };
            if let Some(l) = interned.find(hash, same) {
                return l.clone();
            }
            let labels = fresh();
            interned.insert_unique(hash, labels.clone(), |l| labels_hash(l.iter()));
            labels
        })
    }
}

fn labels_hash<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = rustc_hash::FxBuildHasher.build_hasher();
    for (k, v) in pairs {
        h.write(k.as_bytes());
        h.write_u8(0xff);
        h.write(v.as_bytes());
        h.write_u8(0xff);
    }
    h.finish()
}

/// Shares equal label sets among the specs that `read` deserializes on this thread.
fn interning_labels<T>(read: impl FnOnce() -> T) -> T {
    struct Scope(bool);
    impl Drop for Scope {
        fn drop(&mut self) {
            if self.0 {
                INTERNED.set(None);
            }
        }
    }
    // a table inside a table (never, today) joins the outer scope
    let _scope = Scope(INTERNED.with_borrow_mut(|i| {
        i.is_none() && {
            *i = Some(hashbrown::HashTable::new());
            true
        }
    }));
    read()
}

/// Parses JSON from bytes: as text when they are UTF-8, which checks them once, not
/// string by string (`from_slice` checks each string it reads: about 7% of reading a
/// 100k-alias table). Bytes that are not UTF-8 still get `from_slice`'s error, with the
/// line and column of the bad byte.
pub fn from_json<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> serde_json::Result<T> {
    let _size = JsonSize::of(bytes);
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

thread_local! {
    /// The size in bytes of the JSON document that `from_json` is reading on this thread
    /// (0 outside one), from which `deserialize_specs` bounds how many aliases it can hold.
    static JSON_SIZE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Sets `JSON_SIZE` while it lives.
struct JsonSize(usize);

impl JsonSize {
    fn of(bytes: &[u8]) -> JsonSize {
        JsonSize(JSON_SIZE.replace(bytes.len()))
    }
}

impl Drop for JsonSize {
    fn drop(&mut self) {
        JSON_SIZE.set(self.0);
    }
}

/// The fewest bytes of JSON that an alias with an IP address takes:
/// `"a":{"address":"1.1.1.1:1"},`. Only a table of one-letter host names (`"a:1"`) packs
/// more aliases into its bytes, and its list then grows as it used to: a hint, not a bound.
const MIN_JSON_ALIAS: usize = 28;

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
///
/// Much of what a 100k-alias table costs to read is the kernel handing out fresh pages
/// (docs/performance.md, P6), so the list is reserved once, from the size of the JSON
/// being read, not grown by doubling (twice the memory written, and copied).
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
            // reserved, not written: pages never touched cost nothing
            let most = JSON_SIZE.get() / MIN_JSON_ALIAS;
            let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(most).min(1 << 20));
            while let Some(pair) = map.next_entry()? {
                pairs.push(pair);
            }
            Ok(pairs)
        }
    }
    let pairs = interning_labels(|| d.deserialize_map(Pairs))?;
    Ok(Arc::new(pairs.into_iter().collect()))
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
    fn dashes_are_refused_alike_in_ascii_and_not() {
        for (text, ok) in [
            ("a--b", false),
            ("-a", false),
            ("a-", false),
            ("a-b-c", true),
            ("é--b", false),
            ("é-b", true),
            ("-", false),
        ] {
            let checked = Alias::check(text);
            assert_eq!(checked.is_ok(), ok, "{text:?}: {checked:?}");
            assert_eq!(Alias::try_from(text.to_string()).err(), checked.err());
        }
    }

    #[test]
    fn labels_read_as_a_map_would() {
        // a repeated key keeps its last value, and the keys come out sorted
        let spec: InstanceSpec = serde_json::from_str(
            r#"{"address": "10.0.0.5:9116", "labels": {"zone": "a", "rack": "r\u0031", "zone": "b"}}"#,
        )
        .unwrap();
        let pairs: Vec<_> = spec.labels.iter().collect();
        assert_eq!(pairs, [("rack", "r1"), ("zone", "b")]);
        let empty: InstanceSpec =
            serde_json::from_str(r#"{"address": "10.0.0.5:9116", "labels": {}}"#).unwrap();
        assert!(Arc::ptr_eq(&empty.labels.0, &Labels::default().0));
        assert!(serde_json::from_str::<InstanceSpec>(
            r#"{"address": "10.0.0.5:9116", "labels": {"zone": 1}}"#
        )
        .is_err());
    }

    #[test]
    fn a_table_shares_equal_label_sets_and_only_while_it_is_read() {
        let table: TableValue = serde_json::from_str(
            r#"{"instances": {
                "a": {"address": "10.0.0.1:1", "labels": {"zone": "x", "rack": "1"}},
                "b": {"address": "10.0.0.2:1", "labels": {"rack": "1", "zone": "x"}},
                "c": {"address": "10.0.0.3:1", "labels": {"zone": "y"}}}}"#,
        )
        .unwrap();
        let labels = |alias: &str| table.instances[alias].labels.clone();
        assert!(
            Arc::ptr_eq(&labels("a").0, &labels("b").0),
            "equal sets, one copy"
        );
        assert!(!Arc::ptr_eq(&labels("a").0, &labels("c").0));
        assert_eq!(labels("c").get("zone"), Some("y"));
        // outside a table, nothing is kept for the next one
        assert!(INTERNED.with_borrow(|i| i.is_none()));
        let again: TableValue = serde_json::from_str(
            r#"{"instances": {"a": {"address": "10.0.0.1:1", "labels": {"zone": "y"}}}}"#,
        )
        .unwrap();
        assert!(!Arc::ptr_eq(&again.instances["a"].labels.0, &labels("c").0));
        // a table that fails to read leaves no interner behind either
        assert!(
            serde_json::from_str::<TableValue>(r#"{"instances": {"a": {"adress": "x"}}}"#).is_err()
        );
        assert!(INTERNED.with_borrow(|i| i.is_none()));
    }

    #[test]
    fn json_is_read_as_text_or_as_bytes_alike() {
        let table =
            br#"{"instances": {"cs_1": {"address": "10.0.0.1:1", "labels": {"z": "\u00e9"}}}}"#;
        let text: TableValue = from_json(table).unwrap();
        let bytes: TableValue = serde_json::from_slice(table).unwrap();
        assert_eq!(text, bytes);
        assert_eq!(text.instances["cs_1"].labels.get("z"), Some("\u{e9}"));
        // not UTF-8: the error says where, as from_slice says it
        let bad = b"{\"instances\": {\"cs_\xff\": {\"address\": \"10.0.0.1:1\"}}}";
        let e = from_json::<TableValue>(bad).unwrap_err().to_string();
        assert_eq!(
            e,
            serde_json::from_slice::<TableValue>(bad)
                .unwrap_err()
                .to_string()
        );
        assert!(e.contains("line 1 column"), "{e}");
        // a repeated alias keeps its last spec, as a map would, in a table read with the
        // size of its JSON known (`from_json`) or not
        let twice =
            br#"{"instances": {"a": {"address": "10.0.0.1:1"}, "b": {"address": "10.0.0.2:1"}, "a": {"address": "10.0.0.9:1"}}}"#;
        for read in [
            from_json::<TableValue>(twice),
            serde_json::from_slice(twice),
        ] {
            let read = read.unwrap().instances;
            assert_eq!(read.len(), 2);
            assert_eq!(read["a"].address, "10.0.0.9:1");
        }
        // and a syntax error in text, the same message as from bytes
        let cut = br#"{"instances": {"cs_1": {"address": "10.0.0.1:1"}"#;
        assert_eq!(
            from_json::<TableValue>(cut).unwrap_err().to_string(),
            serde_json::from_slice::<TableValue>(cut)
                .unwrap_err()
                .to_string()
        );
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

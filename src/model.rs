//! The shared vocabulary: the words that `config`, `aliases`, `health`, `membership` and
//! `store` all speak (`Alias`, `InstanceSpec`, `Prefer`, the health-check settings).
//!
//! This module sits at the bottom: it imports nothing of hagate, so every other module can
//! import it and the arrows keep pointing down. Each type here validates itself on
//! deserialisation or is plain data; none does IO.

use std::collections::BTreeMap;
use std::fmt;
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
    /// Contains whitespace or a control character.
    #[error("alias {0:?} contains whitespace or a control character")]
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
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AliasError::BadChar(s));
        }
        if s.contains("--") || s.starts_with('-') || s.ends_with('-') {
            return Err(AliasError::Dashes(s));
        }
        Ok(Alias(s.into_boxed_str()))
    }
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

/// One instance as written in config or `PUT /v1/aliases`:
/// `[instances.cs_1_dev] address = "10.0.0.5:9116", labels = { zone = "a" }, weight = 1`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// `address = "127.0.0.1:9116"`: an IP socket address.
    pub address: String,
    /// `labels = { zone = "a", tenant = "t1" }`: free-form, passed to placement.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// `weight = 1`: relative capacity for placement; `0` never receives new contexts
    /// (existing HAIDs still route to it).
    #[serde(default = "one")]
    pub weight: u32,
    /// `prefer = "static"`: overrides `membership.prefer` for this alias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefer: Option<Prefer>,
    /// The epoch (fencing token) of the membership holder whose address this is; set by
    /// the membership merge, never read from config or the API.
    #[serde(skip)]
    pub epoch: Option<u64>,
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

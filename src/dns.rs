//! Host names for instances (`address = "cs-1.prod.internal:9108"`), resolved off the
//! request path.
//!
//! Every `host:port` in use is resolved before a table that names it is built (at start,
//! on reload, on `PUT /v1/aliases`; on blocking threads), and again every
//! `upstream.dns_refresh` in the background. The answer kept is the first IPv4 address, else
//! the first IPv6 one. A failed lookup keeps the last good address, and is logged and
//! counted (`hagate_dns_lookups_total{result="error"}`); a name that never resolved
//! cannot be used, and the config or table naming it is refused with the field named.
//! Health belongs to the resolved address, as for an address written as an IP.
//!
//! Tables are built from the cache here (`cached`), so building one never waits on DNS.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;

use crate::metrics::metrics;

/// `host:port` → the address it resolved to last.
static CACHE: LazyLock<ArcSwap<HashMap<String, SocketAddr>>> =
    LazyLock::new(|| ArcSwap::from_pointee(HashMap::new()));

/// Whether `address` is `host:port` with a DNS host name (not an IP address).
pub fn is_host_name(address: &str) -> bool {
    let Some((host, port)) = address.rsplit_once(':') else {
        return false;
    };
    // A name whose last label is all digits would read as an IPv4 address. Checked first:
    // a table of 100k IP addresses is told from host names by its last labels alone.
    let numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()));
    if numeric {
        return false;
    }
    let labels_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    labels_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// The address `host_port` last resolved to, if it ever did.
pub fn cached(host_port: &str) -> Option<SocketAddr> {
    CACHE.load().get(host_port).copied()
}

/// Resolves `host_port` now (blocking): the first IPv4 address, else the first IPv6 one.
fn lookup(host_port: &str) -> Result<SocketAddr, String> {
    let all: Vec<SocketAddr> = host_port
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .collect();
    all.iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| "no address".to_string())
}

/// Resolves each of `names` (blocking) and records the answers. A failed lookup keeps the
/// last good address. Returns whether any address changed.
pub fn resolve<'a>(names: impl IntoIterator<Item = &'a str>) -> bool {
    let before = CACHE.load_full();
    let mut next: HashMap<String, SocketAddr> = (*before).clone();
    let mut changed = false;
    for name in names {
        let result = lookup(name);
        metrics()
            .dns_lookups
            .with_label_values(&[if result.is_ok() { "ok" } else { "error" }])
            .inc();
        match result {
            Ok(addr) => {
                if next.insert(name.to_string(), addr) != Some(addr) {
                    if let Some(old) = before.get(name) {
                        tracing::info!(name, %old, new = %addr, "host name resolves to a new address");
                    }
                    changed = true;
                }
            }
            Err(error) => match before.get(name) {
                Some(kept) => {
                    tracing::warn!(name, %error, %kept, "host name lookup failed; keeping the last good address")
                }
                None => tracing::warn!(name, %error, "host name lookup failed"),
            },
        }
    }
    if changed {
        CACHE.store(Arc::new(next));
    }
    changed
}

/// The host names among `addresses` that were never resolved.
pub fn unresolved<'a>(addresses: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let cache = CACHE.load();
    addresses
        .into_iter()
        .filter(|a| is_host_name(a) && !cache.contains_key(*a))
        .collect()
}

/// Every host name resolved so far.
pub fn names() -> Vec<String> {
    CACHE.load().keys().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_told_from_ip_addresses() {
        assert!(is_host_name("localhost:80"));
        assert!(is_host_name("cs-1.prod.internal:9108"));
        assert!(!is_host_name("127.0.0.1:80"));
        assert!(!is_host_name("[::1]:80"));
        assert!(!is_host_name("localhost"));
        assert!(!is_host_name("localhost:0"));
        assert!(!is_host_name("bad_name:80"));
        assert!(!is_host_name("-x.example:80"));
        assert!(!is_host_name("10.0.0:80"));
    }

    #[test]
    fn localhost_resolves_and_is_cached() {
        assert_eq!(unresolved(["localhost:8081"]), vec!["localhost:8081"]);
        resolve(["localhost:8081"]);
        let addr = cached("localhost:8081").expect("localhost resolves");
        assert!(addr.ip().is_loopback() && addr.port() == 8081);
        assert!(unresolved(["localhost:8081"]).is_empty());
        // a name that cannot resolve is not cached, and changes nothing
        assert!(!resolve(["no-such-host.invalid:80"]));
        assert_eq!(cached("no-such-host.invalid:80"), None);
    }
}

//! Idle upstream connections of hagate's forwarding loop, kept for reuse.
//!
//! Each connection is kept under the thread that made it (its runtime registered it) and
//! its upstream address; a request takes the newest one, which is the likeliest to be
//! still open. Three things close an idle connection:
//! - **`upstream.idle_timeout`**: `sweep` (every second, from the control plane) closes
//!   those idle longer, oldest first; `take` closes the ones it finds that old;
//! - **`upstream.max_idle`**: the most kept in all, across addresses and threads; a
//!   connection released to a full pool closes the least recently released one, as
//!   nginx's `keepalive` and pingora's pool do. Without it, a gateway in front of many
//!   instances keeps one for every instance it ever reached, which costs descriptors and
//!   memory (placement spreads new contexts over all of them). A thread and address
//!   keep at most `PER_ADDRESS`, and a connection beyond that closes their oldest; both
//!   count as `max_idle`;
//! - **out of descriptors**: `shed` closes the older half, so that a connect that met
//!   EMFILE can be tried again at once.
//!
//! Each closing is counted in `hagate_upstream_idle_closed_total{reason}`, and
//! `hagate_upstream_idle_connections` is the number kept.

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;
use prometheus::{IntCounter, IntGauge};
use rustc_hash::{FxBuildHasher, FxHashMap};

use crate::metrics::metrics;

/// The most idle connections kept per thread and upstream address.
pub const PER_ADDRESS: usize = 128;

/// Where a pooled connection belongs: the thread that made it, and its address.
type Key = (usize, SocketAddr);

/// One idle connection.
struct Pooled<C> {
    id: u64,
    conn: C,
    since: Instant,
}

struct Idle<C> {
    by_key: FxHashMap<Key, Vec<Pooled<C>>>,
    /// Every idle connection's id and key, least recently released first. Each entry of
    /// `by_key` has exactly one here, so the least recent is the first of its key's list.
    order: LruCache<u64, Key, FxBuildHasher>,
    next: u64,
}

/// Idle upstream connections (`C`: a `TcpStream`, or anything in the unit tests).
pub struct Pool<C> {
    idle: Mutex<Idle<C>>,
    /// `upstream.max_idle` as it is now (`set_max`).
    max: AtomicUsize,
    gauge: IntGauge,
    by_max: IntCounter,
    by_timeout: IntCounter,
    by_shed: IntCounter,
}

impl<C> Pool<C> {
    /// An empty pool that keeps at most `max` connections.
    pub fn new(max: usize) -> Self {
        let closed = &metrics().upstream_idle_closed;
        Pool {
            idle: Mutex::new(Idle {
                by_key: FxHashMap::default(),
                order: LruCache::unbounded_with_hasher(FxBuildHasher),
                next: 0,
            }),
            max: AtomicUsize::new(max),
            gauge: metrics().upstream_idle.clone(),
            by_max: closed.with_label_values(&["max_idle"]),
            by_timeout: closed.with_label_values(&["idle_timeout"]),
            by_shed: closed.with_label_values(&["out_of_descriptors"]),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle<C>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new `upstream.max_idle`; a smaller one takes effect at the next `sweep`.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// The newest idle connection to `addr` made on this thread, idle for less than
    /// `limit`; older ones close.
    pub fn take(&self, addr: SocketAddr, limit: Duration) -> Option<C> {
        let mut guard = self.lock();
        let idle = &mut *guard;
        let conns = idle.by_key.get_mut(&(thread_key(), addr))?;
        let newest = conns.pop()?;
        idle.order.pop(&newest.id);
        if newest.since.elapsed() < limit {
            self.gauge.set(idle.order.len() as i64);
            return Some(newest.conn);
        }
        // the newest is too old, so are the others
        let stale = std::mem::take(conns);
        for p in &stale {
            idle.order.pop(&p.id);
        }
        self.by_timeout.inc_by(1 + stale.len() as u64);
        self.gauge.set(idle.order.len() as i64);
        drop(guard);
        drop(stale);
        None
    }

    /// Keeps `conn` to `addr`, made on this thread; closes the least recently released
    /// connection if that makes more than `upstream.max_idle`.
    pub fn put(&self, addr: SocketAddr, conn: C) {
        let max = self.max.load(Ordering::Relaxed);
        if max == 0 {
            self.by_max.inc();
            return;
        }
        let key = (thread_key(), addr);
        let mut guard = self.lock();
        let idle = &mut *guard;
        let id = idle.next;
        idle.next += 1;
        let conns = idle.by_key.entry(key).or_default();
        let mut evicted = None;
        if conns.len() >= PER_ADDRESS {
            let oldest = conns.remove(0);
            idle.order.pop(&oldest.id);
            evicted = Some(oldest);
        }
        conns.push(Pooled {
            id,
            conn,
            since: Instant::now(),
        });
        idle.order.put(id, key);
        let lru = if idle.order.len() > max {
            idle.pop_lru()
        } else {
            None
        };
        let closed = evicted.is_some() as u64 + lru.is_some() as u64;
        if closed > 0 {
            self.by_max.inc_by(closed);
        }
        self.gauge.set(idle.order.len() as i64);
        drop(guard);
        drop((evicted, lru));
    }

    /// Closes the connections idle for `limit` or longer, and the least recent ones
    /// beyond `upstream.max_idle`.
    pub fn sweep(&self, limit: Duration) {
        let max = self.max.load(Ordering::Relaxed);
        let mut closed = Vec::new();
        let mut guard = self.lock();
        let idle = &mut *guard;
        let (mut by_max, mut by_timeout) = (0, 0);
        loop {
            let over = idle.order.len() > max;
            let expired = idle.oldest_since().is_some_and(|t| t.elapsed() >= limit);
            if !over && !expired {
                break;
            }
            let Some(p) = idle.pop_lru() else { break };
            if expired {
                by_timeout += 1;
            } else {
                by_max += 1;
            }
            closed.push(p);
        }
        idle.by_key.retain(|_, conns| !conns.is_empty());
        self.gauge.set(idle.order.len() as i64);
        drop(guard);
        self.by_max.inc_by(by_max);
        self.by_timeout.inc_by(by_timeout);
        drop(closed);
    }

    /// Closes the least recently released half of the idle connections (at least one),
    /// to free descriptors; how many it closed.
    pub fn shed(&self) -> usize {
        let mut guard = self.lock();
        let idle = &mut *guard;
        let n = idle.order.len().div_ceil(2);
        let closed: Vec<_> = (0..n).filter_map(|_| idle.pop_lru()).collect();
        self.gauge.set(idle.order.len() as i64);
        drop(guard);
        self.by_shed.inc_by(closed.len() as u64);
        closed.len()
    }

    /// Connections kept now.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<C> Idle<C> {
    /// Takes out the least recently released connection.
    fn pop_lru(&mut self) -> Option<Pooled<C>> {
        let (id, key) = self.order.pop_lru()?;
        let conns = self.by_key.get_mut(&key)?;
        let at = conns.iter().position(|p| p.id == id)?;
        Some(conns.remove(at))
    }

    /// When the least recently released connection was released.
    fn oldest_since(&self) -> Option<Instant> {
        let (id, key) = self.order.peek_lru()?;
        let conns = self.by_key.get(key)?;
        conns.iter().find(|p| p.id == *id).map(|p| p.since)
    }
}

thread_local! {
    /// This thread's number in the pool's keys: a connection is used on the thread (and so
    /// the runtime) that registered it.
    static THREAD: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn thread_key() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    THREAD.with(|t| {
        if t.get() == usize::MAX {
            t.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        t.get()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A connection that records its number when it closes.
    struct Conn(u32, Arc<Mutex<Vec<u32>>>);

    impl Drop for Conn {
        fn drop(&mut self) {
            self.1.lock().unwrap().push(self.0);
        }
    }

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1000 + i))
    }

    fn closed(log: &Arc<Mutex<Vec<u32>>>) -> Vec<u32> {
        std::mem::take(&mut *log.lock().unwrap())
    }

    const LONG: Duration = Duration::from_secs(3600);

    #[test]
    fn a_full_pool_closes_the_least_recently_released_connection() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let pool = Pool::new(2);
        pool.put(addr(1), Conn(1, Arc::clone(&log)));
        pool.put(addr(2), Conn(2, Arc::clone(&log)));
        assert!(closed(&log).is_empty());
        // a third address: the first connection released goes
        pool.put(addr(3), Conn(3, Arc::clone(&log)));
        assert_eq!(closed(&log), [1]);
        assert_eq!(pool.len(), 2);
        assert!(pool.take(addr(1), LONG).is_none());
        // taking one and releasing it again makes it the most recent
        let two = pool.take(addr(2), LONG).unwrap();
        assert_eq!(two.0, 2);
        pool.put(addr(2), two);
        pool.put(addr(4), Conn(4, Arc::clone(&log)));
        assert_eq!(closed(&log), [3]);
        assert_eq!(pool.take(addr(2), LONG).map(|c| c.0), Some(2));
        assert_eq!(pool.take(addr(4), LONG).map(|c| c.0), Some(4));
        assert!(pool.is_empty());
        // max_idle 0 keeps nothing
        pool.set_max(0);
        pool.put(addr(5), Conn(5, Arc::clone(&log)));
        assert_eq!(closed(&log), [2, 4, 5]);
        assert!(pool.is_empty());
    }

    #[test]
    fn the_newest_is_taken_and_an_address_keeps_at_most_its_share() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let pool = Pool::new(1000);
        for i in 0..PER_ADDRESS as u32 + 2 {
            pool.put(addr(1), Conn(i, Arc::clone(&log)));
        }
        // the two oldest of the address went
        assert_eq!(closed(&log), [0, 1]);
        assert_eq!(pool.len(), PER_ADDRESS);
        let newest = pool.take(addr(1), LONG).unwrap();
        assert_eq!(newest.0, PER_ADDRESS as u32 + 1);
        // another address, or the same one after its time, gives nothing
        assert!(pool.take(addr(2), LONG).is_none());
        assert!(pool.take(addr(1), Duration::ZERO).is_none());
        assert_eq!(closed(&log).len(), PER_ADDRESS - 1);
        assert!(pool.is_empty());
        drop(newest);
    }

    #[test]
    fn a_sweep_closes_the_expired_and_the_excess_and_a_shed_the_older_half() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let pool = Pool::new(10);
        for i in 0..6 {
            pool.put(addr(i as u16 % 3), Conn(i, Arc::clone(&log)));
        }
        pool.sweep(LONG);
        assert!(closed(&log).is_empty());
        // a smaller max_idle: the least recent go at the next sweep
        pool.set_max(4);
        pool.sweep(LONG);
        assert_eq!(closed(&log), [0, 1]);
        // out of descriptors: the older half
        assert_eq!(pool.shed(), 2);
        assert_eq!(closed(&log), [2, 3]);
        assert_eq!(pool.take(addr(2), LONG).map(|c| c.0), Some(5));
        // everything is older than no time at all
        pool.sweep(Duration::ZERO);
        assert_eq!(closed(&log), [5, 4]);
        assert!(pool.is_empty());
        assert_eq!(pool.shed(), 0);
    }
}

//! Live health of every instance: the per-instance atomic state, passive ejection, and the
//! `HealthView` that routing reads.
//!
//! The request path only loads atomics here: no lock, no IO, no allocation. Active checks
//! (the only IO) live in `active`. Health is keyed by instance address, so it survives an
//! alias-table swap that keeps the address.

pub mod active;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::model::PassiveHealthConfig;

/// Milliseconds on a process-wide monotonic clock (never 0 once running).
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| Instant::now() - Duration::from_millis(1));
    epoch.elapsed().as_millis() as u64
}

/// Whether `error`, or any error it was caused by, is the gateway's own resource trouble:
/// out of file descriptors (EMFILE, ENFILE), buffers (ENOBUFS) or memory (ENOMEM). Such
/// an error is never counted against an upstream.
pub fn is_local_resource_error(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(
                io.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
            ) {
                return true;
            }
        }
        cur = e.source();
    }
    false
}

/// What routing asks of health. Implementations must be cheap and lock-free.
pub trait HealthView {
    /// Whether the instance with this alias and shared state may be sent requests now.
    fn is_live(&self, alias: &str, state: &InstanceState) -> bool;
}

/// The production view: reads each instance's atomics at one instant. The clock is read
/// only if an instance has an ejection deadline, and then once.
#[derive(Debug, Default)]
pub struct LiveView {
    now_ms: std::cell::OnceCell<u64>,
}

impl LiveView {
    /// A view at the current instant.
    pub fn now() -> Self {
        LiveView::default()
    }
}

impl HealthView for LiveView {
    fn is_live(&self, _alias: &str, state: &InstanceState) -> bool {
        state.is_live_at(|| *self.now_ms.get_or_init(now_ms))
    }
}

/// Health and load of one instance address, shared by every table that names it.
#[derive(Debug)]
pub struct InstanceState {
    /// Verdict of the active checks (starts live; the first check decides at once).
    active_up: AtomicBool,
    /// Whether any active check has completed yet.
    checked: AtomicBool,
    active_passes: AtomicU32,
    active_fails: AtomicU32,
    /// Passive ejection deadline in `now_ms()` time; 0 when not ejected.
    ejected_until: AtomicU64,
    /// Consecutive passive failures (connect errors, 5xx).
    passive_fails: AtomicU32,
    /// How many ejections in a row (the backoff exponent).
    ejections: AtomicU32,
    /// When the last ejection happened (`now_ms()`), for decaying the backoff.
    last_ejection: AtomicU64,
    /// Requests in flight to this instance through this gateway.
    inflight: AtomicI64,
    /// Time-to-response-header EWMA in microseconds; 0 before the first sample.
    latency_ewma_us: AtomicU32,
    /// The `f32` bits of the load the instance reported (`x-hagate-load`); `NO_LOAD` if none.
    reported_load: AtomicU32,
    /// The last table build that took this state (`StateRegistry::new_build`):
    /// bookkeeping for the registry, not health.
    taken_by: AtomicU64,
}

/// `reported_load` before any report (a NaN bit pattern).
const NO_LOAD: u32 = u32::MAX;

impl Default for InstanceState {
    fn default() -> Self {
        InstanceState {
            active_up: AtomicBool::new(true),
            checked: AtomicBool::new(false),
            active_passes: AtomicU32::new(0),
            active_fails: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            passive_fails: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            last_ejection: AtomicU64::new(0),
            inflight: AtomicI64::new(0),
            latency_ewma_us: AtomicU32::new(0),
            reported_load: AtomicU32::new(NO_LOAD),
            taken_by: AtomicU64::new(0),
        }
    }
}

/// What an active check result did to the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// No change.
    Same,
    /// The instance became live.
    Up,
    /// The instance went down.
    Down,
}

impl InstanceState {
    /// Live when the active verdict is up and no passive ejection is running.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.is_live_at(|| now_ms)
    }

    /// `is_live`, reading the clock only if an ejection deadline is set.
    #[inline]
    pub fn is_live_at(&self, now_ms: impl FnOnce() -> u64) -> bool {
        if !self.active_up.load(Relaxed) {
            return false;
        }
        match self.ejected_until.load(Relaxed) {
            0 => true,
            until => now_ms() >= until,
        }
    }

    /// Whether the active checks currently say up.
    pub fn active_up(&self) -> bool {
        self.active_up.load(Relaxed)
    }

    /// Whether a passive ejection is running at `now_ms`.
    pub fn ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until.load(Relaxed)
    }

    /// Feeds one active check result. The first result sets the verdict directly;
    /// after that `rise` passes in a row bring it up and `fall` failures take it down.
    pub fn record_check(&self, passed: bool, rise: u32, fall: u32) -> Transition {
        let first = !self.checked.swap(true, Relaxed);
        let was_up = self.active_up.load(Relaxed);
        if passed {
            self.active_fails.store(0, Relaxed);
            let passes = self.active_passes.fetch_add(1, Relaxed).saturating_add(1);
            if !was_up && (first || passes >= rise) {
                self.active_up.store(true, Relaxed);
                return Transition::Up;
            }
        } else {
            self.active_passes.store(0, Relaxed);
            let fails = self.active_fails.fetch_add(1, Relaxed).saturating_add(1);
            if was_up && (first || fails >= fall) {
                self.active_up.store(false, Relaxed);
                return Transition::Down;
            }
        }
        Transition::Same
    }

    /// A request to this instance succeeded (a non-5xx response): resets the failure run.
    pub fn record_success(&self) {
        if self.passive_fails.load(Relaxed) != 0 {
            self.passive_fails.store(0, Relaxed);
        }
    }

    /// A request to this instance failed (connect error, 5xx, reset). Returns the ejection
    /// time if this failure ejected the instance.
    ///
    /// With active checks on, an ejected instance also needs `rise` passing checks in a row
    /// before it is live again, so failback always waits for `rise`.
    pub fn record_failure(
        &self,
        cfg: &PassiveHealthConfig,
        active_enabled: bool,
        now_ms: u64,
    ) -> Option<Duration> {
        if !cfg.enabled {
            return None;
        }
        let fails = self.passive_fails.fetch_add(1, Relaxed).saturating_add(1);
        if fails < cfg.consecutive_failures || self.ejected(now_ms) {
            return None;
        }
        self.passive_fails.store(0, Relaxed);
        // The backoff decays: a quiet period of max_ejection starts again from the base.
        let quiet = now_ms.saturating_sub(self.last_ejection.load(Relaxed));
        let level = if quiet > cfg.max_ejection.as_millis() as u64 * 2 {
            0
        } else {
            self.ejections.load(Relaxed)
        };
        self.ejections.store(level.saturating_add(1), Relaxed);
        self.last_ejection.store(now_ms, Relaxed);
        let factor = 1u32 << level.min(16);
        let time = cfg
            .base_ejection
            .saturating_mul(factor)
            .min(cfg.max_ejection);
        self.ejected_until
            .store(now_ms + time.as_millis() as u64, Relaxed);
        if active_enabled {
            self.checked.store(true, Relaxed);
            self.active_passes.store(0, Relaxed);
            self.active_up.store(false, Relaxed);
        }
        Some(time)
    }

    /// Feeds one response time into the EWMA (weight 1/8 for the new sample).
    pub fn record_latency(&self, latency: Duration) {
        let sample = latency.as_micros().min(u128::from(u32::MAX)) as u32;
        let old = self.latency_ewma_us.load(Relaxed);
        let new = if old == 0 {
            sample.max(1)
        } else {
            (i64::from(old) + (i64::from(sample) - i64::from(old)) / 8).max(1) as u32
        };
        // A racing update may be lost; the average stays an average.
        self.latency_ewma_us.store(new, Relaxed);
    }

    /// The response-time EWMA in microseconds (0 before the first response).
    pub fn latency_ewma_us(&self) -> u32 {
        self.latency_ewma_us.load(Relaxed)
    }

    /// Stores the load the instance reported; a non-finite value clears it.
    pub fn set_reported_load(&self, load: f32) {
        let bits = if load.is_finite() {
            load.to_bits()
        } else {
            NO_LOAD
        };
        self.reported_load.store(bits, Relaxed);
    }

    /// The load the instance last reported, if any.
    pub fn reported_load(&self) -> Option<f32> {
        Some(f32::from_bits(self.reported_load.load(Relaxed))).filter(|l| l.is_finite())
    }

    /// Requests in flight to this instance.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Relaxed).max(0) as u64
    }

    /// Counts one request in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InflightGuard {
        self.inflight.fetch_add(1, Relaxed);
        InflightGuard(Arc::clone(self))
    }
}

/// Holds one in-flight slot on an instance; releases it on drop.
#[derive(Debug)]
pub struct InflightGuard(Arc<InstanceState>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Relaxed);
    }
}

/// Hands out one `InstanceState` per address, so a new table reuses the health of
/// addresses the old one had. Used only when building tables, never per request.
///
/// It holds exactly the addresses of the current table. A new table takes the state of
/// each alias whose address did not change straight from the old table (`AliasTable::
/// build`, walking both in alias order), and asks here only for new or moved aliases:
/// 100k lookups in a map of 100k addresses missed the cache on nearly every one, about a
/// quarter of building a 100k-alias table (docs/performance.md, P6).
#[derive(Debug, Default)]
pub struct StateRegistry {
    /// FxHash: the keys are the table's own addresses, from trusted config.
    states: Mutex<FxHashMap<SocketAddr, Arc<InstanceState>>>,
    /// Table builds begun (`new_build`).
    builds: AtomicU64,
}

impl StateRegistry {
    /// The registry, locked: a table's build takes every new address's state under one
    /// lock.
    pub fn lock(&self) -> StatesGuard<'_> {
        StatesGuard(self.states.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A number for one table build, never handed out before: the states the build takes
    /// are marked with it (`InstanceState::take`), whether or not the build succeeds.
    pub fn new_build(&self) -> u64 {
        self.builds.fetch_add(1, Relaxed) + 1
    }
}

impl InstanceState {
    /// Marks this state as taken by table build `build` (`StateRegistry::new_build`).
    pub fn take(&self, build: u64) {
        self.taken_by.store(build, Relaxed);
    }
}

/// The locked registry (`StateRegistry::lock`).
pub struct StatesGuard<'a>(std::sync::MutexGuard<'a, FxHashMap<SocketAddr, Arc<InstanceState>>>);

impl StatesGuard<'_> {
    /// The state for `addr`, created if new, taken by table build `build`.
    pub fn state_for(&mut self, addr: SocketAddr, build: u64) -> Arc<InstanceState> {
        let state = self.0.entry(addr).or_default();
        state.take(build);
        Arc::clone(state)
    }

    /// Forgets those of `gone` (the addresses the old table had and the new one did not
    /// take over alias by alias) that no instance of build `build` took either: once its
    /// table is published, no new table uses them.
    pub fn forget_untaken(&mut self, gone: &[SocketAddr], build: u64) {
        for addr in gone {
            if self
                .0
                .get(addr)
                .is_some_and(|s| s.taken_by.load(Relaxed) != build)
            {
                self.0.remove(addr);
            }
        }
    }

    /// How many addresses it holds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passive() -> PassiveHealthConfig {
        PassiveHealthConfig {
            enabled: true,
            consecutive_failures: 2,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(3),
        }
    }

    #[test]
    fn rise_and_fall() {
        let s = InstanceState::default();
        assert!(s.is_live(1));
        // the first check decides at once
        assert_eq!(s.record_check(false, 2, 3), Transition::Down);
        assert!(!s.is_live(1));
        assert_eq!(s.record_check(true, 2, 3), Transition::Same);
        assert_eq!(s.record_check(true, 2, 3), Transition::Up);
        assert_eq!(s.record_check(false, 2, 3), Transition::Same);
        assert_eq!(s.record_check(false, 2, 3), Transition::Same);
        assert_eq!(s.record_check(true, 2, 3), Transition::Same);
        assert_eq!(s.record_check(false, 2, 3), Transition::Same);
        assert_eq!(s.record_check(false, 2, 3), Transition::Same);
        assert_eq!(s.record_check(false, 2, 3), Transition::Down);
    }

    #[test]
    fn passive_ejection_backs_off_and_needs_rise() {
        let s = InstanceState::default();
        let cfg = passive();
        assert_eq!(s.record_failure(&cfg, false, 1000), None);
        assert_eq!(
            s.record_failure(&cfg, false, 1000),
            Some(Duration::from_secs(1))
        );
        assert!(!s.is_live(1500));
        assert!(s.is_live(2000));
        s.record_failure(&cfg, false, 2000);
        assert_eq!(
            s.record_failure(&cfg, false, 2000),
            Some(Duration::from_secs(2))
        );
        s.record_failure(&cfg, false, 4000);
        assert_eq!(
            s.record_failure(&cfg, false, 4000),
            Some(Duration::from_secs(3)),
            "capped at max_ejection"
        );
        // a success resets the run of failures
        s.record_failure(&cfg, false, 8000);
        s.record_success();
        assert_eq!(s.record_failure(&cfg, false, 8000), None);

        // with active checks on, the ejected instance needs `rise` passes after the timer
        let s = InstanceState::default();
        s.record_failure(&cfg, true, 1000);
        s.record_failure(&cfg, true, 1000);
        assert!(!s.is_live(5000));
        s.record_check(true, 2, 2);
        assert!(!s.is_live(5000));
        s.record_check(true, 2, 2);
        assert!(s.is_live(5000));
    }

    #[test]
    fn inflight_guard_counts() {
        let s = Arc::new(InstanceState::default());
        let g1 = s.start_request();
        let g2 = s.start_request();
        assert_eq!(s.inflight(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(s.inflight(), 0);
    }
}

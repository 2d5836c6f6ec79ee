//! A watchdog for the control plane's one runtime thread (health checks, reloads, the etcd
//! watch, host names): a timer set every `EVERY`, and how late it woke. A task that does
//! not yield (a big table built in place, a blocking call) holds every other control-plane
//! task up by as much; `hagate_control_plane_lag_seconds` shows it, as Envoy's watchdog
//! miss counters do for its threads. Requests never run here.

use std::time::Duration;

use tokio::time::Instant;

/// How often the watchdog sets its timer.
pub const EVERY: Duration = Duration::from_millis(100);

/// A stall this long is also logged, as a warning.
pub const WARN: Duration = Duration::from_secs(1);

/// Sets a timer every `every`, forever, and gives `record` how late each one woke.
pub async fn watch(every: Duration, mut record: impl FnMut(Duration)) {
    let mut due = Instant::now() + every;
    loop {
        tokio::time::sleep_until(due).await;
        let now = Instant::now();
        record(now.saturating_duration_since(due));
        due = now + every;
    }
}

/// `watch` at `EVERY`, into `hagate_control_plane_lag_seconds`; a stall of `WARN` or more
/// is logged.
pub async fn watch_control_plane() {
    watch(EVERY, |late| {
        crate::metrics::metrics()
            .control_plane_lag
            .observe(late.as_secs_f64());
        if late >= WARN {
            tracing::warn!(
                stalled_ms = late.as_millis() as u64,
                "the control plane's thread was held up: health checks, reloads and the etcd watch waited"
            );
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn a_runtime_held_up_is_seen_as_a_late_timer() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        tokio::spawn(watch(Duration::from_millis(10), move |late| {
            record.lock().unwrap().push(late)
        }));
        // the first timer is set
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "no timer woke");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // the stall under test: this (current-thread) runtime's one thread blocked, which
        // the watchdog's next timer, due within 10 ms, can only see once it is over
        std::thread::sleep(Duration::from_millis(150));
        while !seen
            .lock()
            .unwrap()
            .iter()
            .any(|l| *l >= Duration::from_millis(100))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no late timer seen: {:?}",
                seen.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

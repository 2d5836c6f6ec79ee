//! Freeing replaced shared state off the request path.
//!
//! A swap (alias table, settings, plugin set) leaves the old value with the requests still
//! in flight, each holding an `Arc` of it, and whichever lets go last frees it. For a
//! 100k-alias table that is milliseconds of `free` on a proxy thread, in the middle of
//! serving. `later` hands the old value to one background thread instead, which frees it
//! once nothing else holds it. No pingora, no tokio.

use std::any::Any;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How often the thread looks at what it holds.
const CHECK: Duration = Duration::from_millis(100);

type Retired = Arc<dyn Any + Send + Sync>;

fn sender() -> Option<&'static Sender<Retired>> {
    static TX: OnceLock<Option<Sender<Retired>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Retired>();
        std::thread::Builder::new()
            .name("hagate-retire".into())
            .spawn(move || {
                let mut held: Vec<Retired> = Vec::new();
                loop {
                    let next = if held.is_empty() {
                        rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                    } else {
                        rx.recv_timeout(CHECK)
                    };
                    match next {
                        Ok(old) => held.push(old),
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    // Only this thread can clone what it holds, so a count of 1 stays 1.
                    held.retain(|old| Arc::strong_count(old) > 1);
                }
            })
            .ok()
            .map(|_| tx)
    })
    .as_ref()
}

/// Frees `old` on the retire thread once no one else holds it (here, if that thread could
/// not be started).
pub fn later<T: Send + Sync + 'static>(old: Arc<T>) {
    if let Some(tx) = sender() {
        // the thread never exits while the sender lives, so this only fails in a panic
        let _ = tx.send(old);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    /// Records the name of the thread that drops it.
    struct Witness(Arc<Mutex<Option<String>>>);
    impl Drop for Witness {
        fn drop(&mut self) {
            let name = std::thread::current().name().map(str::to_string);
            *self.0.lock().unwrap() = Some(name.unwrap_or_default());
        }
    }

    #[test]
    fn freed_on_the_retire_thread_when_a_request_lets_go_last() {
        let dropped_on = Arc::new(Mutex::new(None));
        let old = Arc::new(Witness(Arc::clone(&dropped_on)));
        let in_flight = Arc::clone(&old);
        later(old);
        assert_eq!(
            *dropped_on.lock().unwrap(),
            None,
            "a request still holds it"
        );
        drop(in_flight);
        let until = Instant::now() + Duration::from_secs(10);
        while dropped_on.lock().unwrap().is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(dropped_on.lock().unwrap().as_deref(), Some("hagate-retire"));
    }
}

//! Work that must not take the CPU from the proxy: reading a config or a big alias table.
//! Each job runs on a thread of its own at nice +10 (on Linux), so that on a busy machine
//! it waits for the proxy threads, not they for it (docs/performance.md, P6). It owns no
//! state; requests never wait on it.

/// Why a background job gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum BackgroundError {
    /// The thread could not be started (the process is out of threads or memory).
    #[error("could not start the {name} thread: {source}")]
    Spawn {
        /// The thread's name.
        name: &'static str,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The job panicked.
    #[error("the {name} thread stopped without an answer")]
    Stopped {
        /// The thread's name.
        name: &'static str,
    },
}

/// Runs `job` on a new thread named `name`, at nice +10, and waits for its answer without
/// holding up the calling runtime.
pub async fn run<T: Send + 'static>(
    name: &'static str,
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, BackgroundError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            lower_priority();
            let _ = tx.send(job());
        })
        .map_err(|source| BackgroundError::Spawn { name, source })?;
    rx.await.map_err(|_| BackgroundError::Stopped { name })
}

/// Lowers the calling thread's CPU priority to nice +10 (on Linux). An unprivileged process
/// cannot raise it again, so it is only called on a thread made for one job. Failure leaves
/// the priority as it was.
fn lower_priority() {
    use thread_priority::{set_current_thread_priority, ThreadPriority, ThreadPriorityValue};
    // thread-priority maps 0..=99 onto nice 19..=-20 for the normal policies: 22 is nice 10
    if let Ok(p) = ThreadPriorityValue::try_from(22u8) {
        if let Err(error) = set_current_thread_priority(ThreadPriority::Crossplatform(p)) {
            tracing::debug!(?error, "could not lower a background thread's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of the calling thread, from `/proc/thread-self/stat`.
    fn nice() -> i32 {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // the fields after the command name: state is field 3, nice field 19
        let after = &stat[stat.rfind(')').unwrap() + 1..];
        after.split_whitespace().nth(16).unwrap().parse().unwrap()
    }

    #[tokio::test]
    async fn a_job_runs_at_nice_10_or_lower_priority_on_a_thread_of_its_own() {
        let (caller, before) = (std::thread::current().id(), self::nice());
        let (nice, thread, name) = run("hagate-test-job", || {
            let t = std::thread::current();
            (nice(), t.id(), t.name().map(str::to_string))
        })
        .await
        .unwrap();
        assert!(nice >= 10, "nice {nice}");
        assert_ne!(thread, caller);
        assert_eq!(name.as_deref(), Some("hagate-test-job"));
        // the caller's own priority is untouched
        assert_eq!(self::nice(), before);
    }

    #[tokio::test]
    async fn a_job_that_panics_is_an_error_not_a_hang() {
        let err = run("hagate-test-panic", || -> u32 { panic!("on purpose") })
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("hagate-test-panic thread stopped without an answer"),
            "{err}"
        );
    }
}

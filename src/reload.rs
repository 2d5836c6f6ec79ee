//! Hot reload triggers: the config file, its `table.file` or a plugin's `.wasm` file
//! changing on disk (`notify`, watching their parent directories so editors'
//! rename-into-place is seen), and SIGHUP. Both call `Gateway::reload`, which validates (and loads plugins) before it
//! swaps. Both record what the files held when they reloaded (`Loaded`), so a change that
//! one of them reloaded is not reloaded again by the other.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::gateway::{Gateway, SwapSource};

/// How long to wait for a burst of file events to settle before reloading.
const SETTLE: Duration = Duration::from_millis(150);

/// `path` with its directory made canonical (the file itself may not exist yet).
fn canonical(path: &Path) -> PathBuf {
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
        .map(|d| d.join(name))
        .unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

/// The files whose change triggers a reload: the config file, its `table.file` and
/// every plugin file.
fn watched_files(gateway: &Gateway, config: &Path) -> BTreeSet<PathBuf> {
    let settings = gateway.settings();
    let mut files = BTreeSet::from([canonical(config)]);
    files.extend(settings.config.table.file.as_deref().map(canonical));
    for p in &settings.config.plugins {
        files.insert(canonical(&p.path));
    }
    files
}

/// A digest of each of `files`, to tell a real change from a touch. A digest, not the
/// contents: a 10k-alias config and three plugins would otherwise stay in memory between
/// changes.
fn fingerprint(files: &BTreeSet<PathBuf>) -> Fingerprint {
    files
        .iter()
        .map(|f| {
            let digest = crate::config::read_digested(f).ok().map(|(_, d)| d);
            (f.clone(), digest)
        })
        .collect()
}

/// Each watched file and the digest of what it held (`None`: it could not be read).
type Fingerprint = Vec<(PathBuf, Option<[u8; 32]>)>;

/// `fingerprint`, on a blocking thread: reading and digesting a 100k-alias table file takes
/// tens of milliseconds, which the control plane's runtime must not wait on.
async fn fingerprint_off_runtime(files: BTreeSet<PathBuf>) -> Fingerprint {
    tokio::task::spawn_blocking(move || fingerprint(&files))
        .await
        // a digest that failed: nothing matches it, so the change is not missed
        .unwrap_or_default()
}

/// What the watched files held when the last reload read them, shared by the watcher and
/// SIGHUP: a change that SIGHUP reloaded is not reloaded a second time by the watcher
/// (with a 100k-alias table, that second reload cost as much as the first). The digest is
/// taken before the reload reads the files, so a write in between is reloaded again,
/// never missed.
#[derive(Debug, Default)]
pub struct Loaded(tokio::sync::Mutex<Fingerprint>);

impl Loaded {
    /// Reloads if the files changed since the last reload read them (or always, if
    /// `force`); one reload at a time. Returns whether it reloaded.
    async fn reload_if<F: std::future::Future>(
        &self,
        files: &BTreeSet<PathBuf>,
        force: bool,
        reload: impl FnOnce() -> F,
    ) -> bool {
        let mut last = self.0.lock().await;
        let now = fingerprint_off_runtime(files.clone()).await;
        if !force && now == *last {
            return false;
        }
        *last = now;
        reload().await;
        true
    }

    /// Takes what the files hold now as read (the watcher's start, or a new set of files).
    async fn settle(&self, files: &BTreeSet<PathBuf>) {
        let mut last = self.0.lock().await;
        *last = fingerprint_off_runtime(files.clone()).await;
    }
}

/// Whether `event` may have changed one of `files`. Reading a file is not a change: notify
/// reports opens and closes after reading (inotify's `IN_OPEN`, `IN_CLOSE_NOWRITE`), and
/// the watcher reads the files itself to digest them, so counting those would make it
/// wake itself forever.
fn changes(event: &notify::Event, files: &BTreeSet<PathBuf>) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    let written = match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    };
    written && event.paths.iter().any(|p| files.contains(p))
}

/// The file that stderr (the log) is written to, if it is a regular file in one of `dirs`.
/// inotify reports every write in a watched directory, and notify's mask cannot leave writes
/// out, so the watcher would wake for every line logged.
fn log_inside(dirs: &BTreeSet<PathBuf>) -> Option<PathBuf> {
    let log = std::fs::canonicalize("/proc/self/fd/2").ok()?;
    let is_file = std::fs::metadata(&log).ok()?.is_file();
    (is_file && dirs.contains(log.parent()?)).then_some(log)
}

/// Watches the config and plugin files and reloads on change, until the process ends.
pub async fn watch_config(gateway: Arc<Gateway>, loaded: Arc<Loaded>) {
    let Some(config) = gateway.config_path().map(PathBuf::from) else {
        return;
    };
    let mut warned = false;
    loop {
        let files = watched_files(&gateway, &config);
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(PathBuf::from))
            .collect();
        if let Some(log) = log_inside(&dirs).filter(|_| !warned) {
            warned = true;
            tracing::warn!(
                log = %log.display(),
                "the log is written into a directory that the config watcher watches: every line \
                 logged wakes the watcher, which with log.access on costs as much CPU as the \
                 proxying; write the log to another directory"
            );
        }
        tracing::info!(files = files.len(), dirs = ?dirs, "watching the config's files for changes");
        let (tx, mut rx) = mpsc::channel::<()>(16);
        let wanted = files.clone();
        let mut watcher =
            match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| changes(&e, &wanted)) {
                    let _ = tx.try_send(());
                }
            }) {
                Ok(w) => w,
                Err(error) => {
                    tracing::error!(%error, "cannot watch files; use SIGHUP to reload");
                    return;
                }
            };
        for dir in &dirs {
            if let Err(error) = watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::error!(%error, dir = %dir.display(), "cannot watch this directory; use SIGHUP to reload");
            }
        }
        loaded.settle(&files).await;
        while rx.recv().await.is_some() {
            // Let a burst of events (truncate + write, or rename) settle into one reload.
            while tokio::time::timeout(SETTLE, rx.recv())
                .await
                .is_ok_and(|e| e.is_some())
            {}
            if !config.exists() {
                continue;
            }
            let reloaded = loaded
                .reload_if(&files, false, || gateway.reload(SwapSource::ConfigFile))
                .await;
            if reloaded && watched_files(&gateway, &config) != files {
                break; // the plugins or the table file changed: watch the new set
            }
        }
    }
}

/// Reloads on every SIGHUP, until the process ends.
pub async fn on_sighup(gateway: Arc<Gateway>, loaded: Arc<Loaded>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGHUP");
            return;
        }
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the config");
        match gateway.config_path().map(PathBuf::from) {
            Some(config) => {
                let files = watched_files(&gateway, &config);
                loaded
                    .reload_if(&files, true, || gateway.reload(SwapSource::Sighup))
                    .await;
            }
            None => {
                let _ = gateway.reload(SwapSource::Sighup).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SIGHUP and the watcher share what the last reload read: a change that one reloaded
    /// the other leaves alone, and a write during a reload is reloaded again.
    #[tokio::test]
    async fn a_change_is_reloaded_once_whoever_sees_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let file = canonical(&dir.path().join("hagate.toml"));
        std::fs::write(&file, "a = 1\n").unwrap();
        let files = BTreeSet::from([file.clone()]);
        let loaded = Loaded::default();
        loaded.settle(&files).await;
        let reloads = std::sync::atomic::AtomicUsize::new(0);
        let reload = || async {
            reloads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        };
        // the watcher wakes for nothing new: no reload
        assert!(!loaded.reload_if(&files, false, reload).await);
        // an edit, then SIGHUP: SIGHUP reloads it, and the watcher's event for the same
        // edit then finds nothing new
        std::fs::write(&file, "a = 2\n").unwrap();
        assert!(loaded.reload_if(&files, true, reload).await);
        assert!(!loaded.reload_if(&files, false, reload).await);
        // SIGHUP reloads even when nothing changed
        assert!(loaded.reload_if(&files, true, reload).await);
        // the watcher sees the next edit
        std::fs::write(&file, "a = 3\n").unwrap();
        assert!(loaded.reload_if(&files, false, reload).await);
        // a write while a reload runs (after its digest) is reloaded again, not missed
        let write_during = || async {
            std::fs::write(&file, "a = 4\n").unwrap();
        };
        assert!(loaded.reload_if(&files, true, write_during).await);
        assert!(loaded.reload_if(&files, false, reload).await);
        assert!(!loaded.reload_if(&files, false, reload).await);
        assert_eq!(reloads.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[test]
    fn a_file_is_digested_whole_and_a_missing_one_is_none() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let (big, gone) = (dir.path().join("big.json"), dir.path().join("gone.json"));
        let bytes: Vec<u8> = (0..600_001u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&big, &bytes).unwrap();
        let whole: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(
            fingerprint(&BTreeSet::from([big.clone(), gone.clone()])),
            vec![(big, Some(whole)), (gone, None)]
        );
    }

    /// With the real watcher: reading a watched file wakes nothing, writing it does.
    #[test]
    fn reading_a_watched_file_is_not_a_change_and_writing_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let file = canonical(&dir.path().join("hagate.toml"));
        std::fs::write(&file, "a = 1\n").unwrap();
        let files = BTreeSet::from([file.clone()]);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
            if let Ok(e) = e {
                if changes(&e, &files) {
                    let _ = tx.send(e.kind);
                }
            }
        })
        .unwrap();
        watcher
            .watch(dir.path(), RecursiveMode::NonRecursive)
            .unwrap();
        // Events arrive in order: if the read counted, its event would come first.
        let before = fingerprint(&BTreeSet::from([file.clone()]));
        std::fs::write(&file, "a = 2\n").unwrap();
        let first = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the write is seen");
        assert!(
            matches!(
                first,
                notify::EventKind::Modify(_)
                    | notify::EventKind::Access(notify::event::AccessKind::Close(_))
            ),
            "the first change event was not the write: {first:?}"
        );
        assert_ne!(before, fingerprint(&BTreeSet::from([file])));
    }
}

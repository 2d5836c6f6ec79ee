//! Hot reload triggers: the config file, its `table.file` or a plugin's `.wasm` file
//! changing on disk (`notify`, watching their parent directories so editors'
//! rename-into-place is seen), and SIGHUP. Both call `Gateway::reload`, which validates (and loads plugins) before it
//! swaps.

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
fn fingerprint(files: &BTreeSet<PathBuf>) -> Vec<Option<[u8; 32]>> {
    use sha2::{Digest, Sha256};
    files
        .iter()
        .map(|f| std::fs::read(f).ok().map(|b| Sha256::digest(b).into()))
        .collect()
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
pub async fn watch_config(gateway: Arc<Gateway>) {
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
        let mut last = fingerprint(&files);
        while rx.recv().await.is_some() {
            // Let a burst of events (truncate + write, or rename) settle into one reload.
            while tokio::time::timeout(SETTLE, rx.recv())
                .await
                .is_ok_and(|e| e.is_some())
            {}
            let now = fingerprint(&files);
            if now != last && config.exists() {
                last = now;
                let _ = gateway.reload(SwapSource::ConfigFile).await;
                if watched_files(&gateway, &config) != files {
                    break; // the plugins or the table file changed: watch the new set
                }
            }
        }
    }
}

/// Reloads on every SIGHUP, until the process ends.
pub async fn on_sighup(gateway: Arc<Gateway>) {
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
        let _ = gateway.reload(SwapSource::Sighup).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

//! Hot reload triggers: the config file changing on disk (`notify`, watching the parent
//! directory so editors' rename-into-place is seen), and SIGHUP. Both call
//! `Gateway::reload`, which validates before it swaps.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::gateway::{Gateway, SwapSource};

/// How long to wait for a burst of file events to settle before reloading.
const SETTLE: Duration = Duration::from_millis(150);

/// Watches the config file and reloads on change, until the process ends.
pub async fn watch_config(gateway: Arc<Gateway>) {
    let Some(path) = gateway.config_path().map(PathBuf::from) else {
        return;
    };
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    let Some(dir) = path.parent().map(PathBuf::from) else {
        return;
    };
    let (tx, mut rx) = mpsc::channel::<()>(16);
    let file_name = path.file_name().map(|n| n.to_os_string());
    let mut watcher =
        match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                if event
                    .paths
                    .iter()
                    .any(|p| p.file_name() == file_name.as_deref())
                {
                    let _ = tx.try_send(());
                }
            }
        }) {
            Ok(w) => w,
            Err(error) => {
                tracing::error!(%error, "cannot watch the config file; use SIGHUP to reload");
                return;
            }
        };
    if let Err(error) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::error!(%error, dir = %dir.display(), "cannot watch the config directory; use SIGHUP to reload");
        return;
    }
    let mut last = std::fs::read(&path).ok();
    while rx.recv().await.is_some() {
        // Let a burst of events (truncate + write, or rename) settle into one reload.
        while tokio::time::timeout(SETTLE, rx.recv())
            .await
            .is_ok_and(|e| e.is_some())
        {}
        let now = std::fs::read(&path).ok();
        if now.is_some() && now != last {
            last = now;
            let _ = gateway.reload(SwapSource::ConfigFile);
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
        let _ = gateway.reload(SwapSource::Sighup);
    }
}

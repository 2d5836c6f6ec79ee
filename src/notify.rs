//! The service manager's side of an upgrade: `sd_notify` messages to systemd (when it
//! set `NOTIFY_SOCKET`), and SIGUSR2, which makes a running gateway start its own
//! successor (`hagate run --upgrade`), as nginx does on USR2.
//!
//! Under systemd (`Type=notify`, `NotifyAccess=all`), the successor is started from inside
//! the service, and tells systemd `MAINPID=<its pid>` and `READY=1` once it serves, so
//! systemd follows it instead of taking the old process's exit for the service's end.

use std::os::unix::net::UnixDatagram;
use std::path::Path;

/// Sends `state` (e.g. `"READY=1"`) to the service manager, if there is one. Failures
/// are logged, never fatal.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| {
        let bytes = target.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // an abstract socket (Linux): systemd's default
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                sock.send_to_addr(state.as_bytes(), &addr)
            }
            None => sock.send_to(state.as_bytes(), Path::new(&target)),
        }
    });
    if let Err(error) = sent {
        tracing::warn!(%error, socket = ?target, "cannot notify the service manager");
    }
}

/// Tells the service manager that this process serves, and is the main one.
pub fn ready() {
    notify(&format!("READY=1\nMAINPID={}", std::process::id()));
}

/// On SIGUSR2, starts `hagate run --config <config> --upgrade` with this process's
/// executable; the new process takes the listeners over and this one exits.
pub async fn upgrade_on_sigusr2(config: Option<std::path::PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut usr2 = match signal(SignalKind::user_defined2()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGUSR2; upgrades need `hagate run --upgrade`");
            return;
        }
    };
    while usr2.recv().await.is_some() {
        let Some(config) = &config else {
            tracing::warn!(
                "SIGUSR2: this gateway runs without a config file; nothing to upgrade to"
            );
            continue;
        };
        let exe = match std::env::current_exe() {
            Ok(e) => e,
            Err(error) => {
                tracing::error!(%error, "SIGUSR2: cannot find this executable");
                continue;
            }
        };
        match std::process::Command::new(&exe)
            .args(["run", "--upgrade", "--config"])
            .arg(config)
            .stdin(std::process::Stdio::null())
            .spawn()
        {
            Ok(child) => {
                tracing::info!(pid = child.id(), exe = %exe.display(), "SIGUSR2: started the successor")
            }
            Err(error) => tracing::error!(%error, "SIGUSR2: cannot start the successor"),
        }
    }
}

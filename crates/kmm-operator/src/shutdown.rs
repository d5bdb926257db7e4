//! Graceful shutdown: the first SIGTERM or SIGINT resolves [`signal`].

use tokio::signal::unix::{SignalKind, signal as unix_signal};

/// Resolves on SIGTERM (what the kubelet sends) or SIGINT (Ctrl-C).
pub async fn signal() {
    let (Ok(mut term), Ok(mut int)) = (
        unix_signal(SignalKind::terminate()),
        unix_signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers; only SIGKILL will stop the process");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
}

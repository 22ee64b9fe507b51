//! The process shutdown signal: a future that completes on SIGTERM (what
//! Kubernetes sends) or SIGINT (Ctrl-C).

/// Completes when the process receives SIGTERM or SIGINT. Servers pass it (or
/// a future derived from it) to `serve_with_incoming_shutdown`, which stops
/// accepting and lets in-flight calls finish.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Installing a handler only fails when the runtime has no signal
        // driver; then Ctrl-C handling below still works.
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

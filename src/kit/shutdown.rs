//! The process shutdown signal: a future that completes on SIGTERM (what
//! Kubernetes sends) or SIGINT (Ctrl-C).

use std::future::Future;

/// Installs the SIGTERM and SIGINT handlers now and returns a future that
/// completes when either arrives. Call it inside the runtime before binding,
/// so a signal that comes early is not lost to the default action (which
/// would kill the process without draining). Servers pass the future to
/// `serve_with_incoming_shutdown`, which stops accepting and lets in-flight
/// calls finish.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // Installing a handler only fails without a signal driver in the
        // runtime; then that signal keeps its default action.
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(term) => {}
                _ = wait(int) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

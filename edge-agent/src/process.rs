//! What both binaries do the same way as processes: where logs go, how a shutdown is asked for
//! and how a config reload is asked for.

use tokio_util::sync::CancellationToken;

/// Logs go to stderr, one line per event; `RUST_LOG` overrides `default_filter`.
///
/// With `json`, the event's fields are at the top level and the innermost span (which carries
/// `component` and `device`) under `span`: one flat object a log shipper can index.
pub fn init_logging(default_filter: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .init();
    } else {
        builder.init();
    }
}

/// Cancels `token` at the first SIGINT or SIGTERM (what systemd and container runtimes send).
pub async fn cancel_on_signal(token: CancellationToken, component: &'static str) {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::error!(
                component,
                "cannot listen for SIGTERM ({e}); stop with SIGINT"
            );
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    tracing::info!(component, "shutdown requested");
    token.cancel();
}

/// Listens for SIGHUP, the conventional "reload your configuration" request (`kill -HUP`,
/// `systemctl reload` with `ExecReload=/bin/kill -HUP $MAINPID`).
///
/// Once this returns, SIGHUP no longer ends the process (its default action): call it before
/// announcing that the process reloads on SIGHUP. The listener stays installed for the life of
/// the process.
pub fn listen_for_reload() -> std::io::Result<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup())
}

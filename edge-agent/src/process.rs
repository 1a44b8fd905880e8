//! What both binaries do the same way as processes: where logs go, how a shutdown is asked for
//! and how a config reload is asked for.

use tokio_util::sync::CancellationToken;

/// Logs go to stderr, one line per event; `RUST_LOG` overrides `default_filter` (see
/// [`log_filter`] for what it accepts).
///
/// With `json`, the event's fields are at the top level and the innermost span (which carries
/// `component` and `device`) under `span`: one flat object a log shipper can index.
pub fn init_logging(default_filter: &str, json: bool) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let (filter, problem) = log_filter(std::env::var("RUST_LOG").ok().as_deref(), default_filter);
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(
                layer
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .init();
    } else {
        registry.with(layer).init();
    }
    if let Some(problem) = problem {
        tracing::warn!(component = "logging", "{problem}");
    }
}

/// The log filter: `rust_log` (the `RUST_LOG` variable) when it is set and valid, otherwise
/// `default_filter`, with the reason when a set value was refused.
///
/// The syntax is comma-separated directives, each a level (`error`, `warn`, `info`, `debug`,
/// `trace`, `off`) for everything or `target=level` for a module and the modules below it:
/// `warn,edge_agent=debug`. Span and field filters (`target[span{field}]=level`) are not
/// supported: matching them needs a regular-expression engine, which would be a fifth of the
/// agent's binary on a gateway.
pub fn log_filter(
    rust_log: Option<&str>,
    default_filter: &str,
) -> (tracing_subscriber::filter::Targets, Option<String>) {
    use tracing_subscriber::filter::Targets;
    let fallback = || {
        default_filter
            .parse::<Targets>()
            .expect("the built-in log filters are valid")
    };
    let Some(value) = rust_log.map(str::trim).filter(|v| !v.is_empty()) else {
        return (fallback(), None);
    };
    match value.parse::<Targets>() {
        Ok(filter) if !value.contains(['[', '{']) => (filter, None),
        _ => (
            fallback(),
            Some(format!(
                "RUST_LOG=`{value}` is not a log filter this program reads; use levels and \
                 targets separated by commas, such as `warn,edge_agent=debug` (span and field \
                 filters are not supported); logging with `{default_filter}` instead"
            )),
        ),
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

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::log_filter;

    #[test]
    fn rust_log_sets_levels_per_target_and_the_modules_below_it() {
        let (filter, problem) = log_filter(Some("warn,edge_agent=debug"), "info");
        assert_eq!(problem, None);
        assert!(filter.would_enable("edge_agent::sources::modbus", &Level::DEBUG));
        assert!(!filter.would_enable("edge_agent", &Level::TRACE));
        assert!(filter.would_enable("aws_smithy_runtime", &Level::WARN));
        assert!(!filter.would_enable("aws_smithy_runtime", &Level::INFO));
    }

    #[test]
    fn without_rust_log_the_default_holds() {
        for unset in [None, Some(""), Some("  ")] {
            let (filter, problem) = log_filter(unset, "warn,collector=info");
            assert_eq!(problem, None);
            assert!(filter.would_enable("collector::ingest", &Level::INFO));
            assert!(!filter.would_enable("deltalake", &Level::INFO));
        }
    }

    #[test]
    fn a_filter_it_cannot_read_falls_back_to_the_default_and_says_why() {
        for bad in ["edge_agent=loud", "edge_agent[upload{batch=3}]=debug"] {
            let (filter, problem) = log_filter(Some(bad), "warn,edge_agent=info");
            let problem = problem.expect("refused");
            assert!(problem.starts_with(&format!("RUST_LOG=`{bad}` is not a log filter")));
            assert!(problem.contains("`warn,edge_agent=debug`"), "{problem}");
            assert!(problem.ends_with("logging with `warn,edge_agent=info` instead"));
            assert!(filter.would_enable("edge_agent::agent", &Level::INFO));
            assert!(!filter.would_enable("edge_agent::agent", &Level::DEBUG));
        }
    }
}

//! The collector's HTTP endpoint: `GET /metrics` (Prometheus text) and `GET /health` (JSON,
//! 200 or 503).
//!
//! # What always holds
//! - It binds only the configured address (loopback by default), so exposing it is a deliberate
//!   `[metrics] listen` change. With a token configured, `/metrics` answers 401 without it;
//!   `/health` stays open for supervisors and load balancers. A token that is configured but
//!   cannot be read keeps the endpoint closed (fail closed), with the fix logged.
//! - An endpoint that cannot bind never stops the collector: applying data matters more than
//!   watching it. The failure is logged once with the address and the fix.
//! - Every connection ends when the shutdown token is cancelled; a client that sends its request
//!   headers too slowly is dropped after [`HEADER_TIMEOUT`].
//! - What it serves is a registry behind [`Exposition`]: `collector run` serves the process's
//!   [`global`] registry ([`serve`]), `collector stream` its own ([`serve_with`]); the HTTP rules
//!   above are the same for both.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{Health, Metrics, global};
use crate::config::MetricsConfig;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsServerError {
    #[error(
        "cannot listen on {addr} for /metrics and /health: {source}; free the port or set another [metrics] listen address"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "metrics.listen `{listen}` is not an IP address with a port; write it like \"127.0.0.1:9465\""
    )]
    Listen { listen: String },
    #[error(
        "metrics.token_env names `{name}`, which is not set or empty in the collector's environment; set it or remove token_env"
    )]
    TokenEnv { name: String },
    #[error(
        "cannot read metrics.token_file {path}: {source}; create it with the token on its first line, readable by the collector's user"
    )]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics.token_file {path} is empty; put the token on its first line")]
    TokenFileEmpty { path: PathBuf },
}

/// A registry an endpoint serves: its Prometheus text and its `/health` verdict at `now`.
pub trait Exposition: Send + Sync {
    fn render(&self, now: SystemTime) -> String;
    fn health(&self, now: SystemTime) -> Health;
}

impl Exposition for Metrics {
    fn render(&self, now: SystemTime) -> String {
        Metrics::render(self, now)
    }
    fn health(&self, now: SystemTime) -> Health {
        Metrics::health(self, now)
    }
}

/// The process's registry, as [`serve`] hands it to [`serve_with`].
struct Global;

impl Exposition for Global {
    fn render(&self, now: SystemTime) -> String {
        global().render(now)
    }
    fn health(&self, now: SystemTime) -> Health {
        global().health(now)
    }
}

/// The token `/metrics` requires, if `[metrics]` configures one.
pub fn configured_token(config: &MetricsConfig) -> Result<Option<String>, MetricsServerError> {
    if let Some(name) = &config.token_env {
        return match std::env::var(name) {
            Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_owned())),
            _ => Err(MetricsServerError::TokenEnv { name: name.clone() }),
        };
    }
    if let Some(path) = &config.token_file {
        let text =
            std::fs::read_to_string(path).map_err(|source| MetricsServerError::TokenFile {
                path: path.clone(),
                source,
            })?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            return Err(MetricsServerError::TokenFileEmpty { path: path.clone() });
        }
        return Ok(Some(token.to_owned()));
    }
    Ok(None)
}

/// Starts the endpoint when `[metrics]` is enabled. Returns the server task, or `None` when it
/// is disabled or could not start (logged).
pub async fn start(config: &MetricsConfig, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
    if !config.enabled {
        return None;
    }
    let span = info_span!("metrics", component = "metrics");
    let started = async {
        let addr = config
            .listen_addr()
            .map_err(|_| MetricsServerError::Listen {
                listen: config.listen.clone(),
            })?;
        let token = configured_token(config)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsServerError::Bind { addr, source })?;
        Ok::<_, MetricsServerError>((listener, token))
    }
    .await;
    match started {
        Ok((listener, token)) => {
            span.in_scope(|| {
                info!(
                    listen = %config.listen,
                    token = token.is_some(),
                    "serving /metrics and /health"
                );
            });
            Some(tokio::spawn(
                serve(listener, token, shutdown).instrument(span),
            ))
        }
        Err(e) => {
            span.in_scope(|| error!("metrics endpoint not started: {e}"));
            None
        }
    }
}

/// Answers connections on `listener` with the process's registry until `shutdown` is
/// cancelled; with `token`, `/metrics` requires it.
pub async fn serve(listener: TcpListener, token: Option<String>, shutdown: CancellationToken) {
    serve_with(listener, token, Arc::new(Global), shutdown).await;
}

/// [`serve`] for another registry than the process's.
pub async fn serve_with(
    listener: TcpListener,
    token: Option<String>,
    registry: Arc<dyn Exposition>,
    shutdown: CancellationToken,
) {
    let token = Arc::new(token);
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!("accepting a metrics connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let token = Arc::clone(&token);
        let registry = Arc::clone(&registry);
        let service = hyper::service::service_fn(move |req| {
            respond(req, Arc::clone(&token), Arc::clone(&registry))
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let stop = shutdown.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    served = conn => if let Err(e) = served {
                        debug!(%peer, "metrics connection ended: {e}");
                    },
                }
            }
            .in_current_span(),
        );
    }
}

/// Compares without stopping at the first differing byte, so the time taken does not tell an
/// attacker how much of a guess was right.
fn token_matches(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    let mut diff = u8::from(a.len() != b.len());
    for (i, &x) in b.iter().enumerate() {
        diff |= x ^ a.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[allow(clippy::unused_async)] // hyper's service_fn wants a future
async fn respond(
    req: Request<Incoming>,
    token: Arc<Option<String>>,
    registry: Arc<dyn Exposition>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned());
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    let path = req.uri().path();
    if let Some(expected) = token.as_ref()
        && path != "/health"
    {
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !presented.is_some_and(|t| token_matches(t.trim(), expected)) {
            let mut resp = text(
                StatusCode::UNAUTHORIZED,
                "this endpoint needs the token from [metrics] token_env or token_file: send `Authorization: Bearer <token>`\n".to_owned(),
            );
            resp.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"plantline-collector\""),
            );
            return Ok(resp);
        }
    }
    Ok(match path {
        "/metrics" => {
            let mut resp = text(StatusCode::OK, registry.render(SystemTime::now()));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/health" => {
            let (status, body) = match registry.health(SystemTime::now()) {
                Health::Ok => (StatusCode::OK, serde_json::json!({ "status": "ok" })),
                Health::Failing(reason) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    serde_json::json!({ "status": "failing", "reason": reason }),
                ),
            };
            let mut resp = text(status, format!("{body}\n"));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp
        }
        other => text(
            StatusCode::NOT_FOUND,
            format!("no such page: {other}; try /metrics or /health\n"),
        ),
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_match_only_exactly() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("s3cretx", "s3cret"));
        assert!(!token_matches("", "s3cret"));
        assert!(!token_matches("S3cret", "s3cret"));
    }
}

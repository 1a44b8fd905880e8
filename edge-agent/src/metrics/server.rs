//! The HTTP endpoint: `GET /metrics` (Prometheus text), `GET /health` (JSON, 200 or 503) and
//! the status page `GET /status` with its data `GET /status.json` ([`super::status`]).
//!
//! # What always holds
//! - It binds only the configured address (loopback by default), so exposing it is a
//!   deliberate `listen` change. With a token configured, everything but `/health` answers
//!   401 without it; a token that is configured but cannot be read keeps the endpoint closed
//!   (fail closed), logged with the fix.
//! - A metrics endpoint that cannot bind never stops the agent: reading and buffering data
//!   matters more than watching it. The failure is logged once with the address and the fix.
//! - Every connection ends when the agent's shutdown token is cancelled; a client that sends
//!   its request headers too slowly is dropped after [`HEADER_TIMEOUT`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::registry::{Health, global};
use super::status;
use crate::config::MetricsConfig;

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "cannot listen on {addr} for /metrics and /health: {source}; free the port or set another [metrics] listen address"
    )]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "metrics.token_env names `{name}`, which is not set or empty in the agent's environment; set it (for systemd: Environment= or EnvironmentFile= in a drop-in) or remove token_env"
    )]
    TokenEnv { name: String },
    #[error(
        "cannot read metrics.token_file {path}: {source}; create it with the token on its first line, readable by the agent's user"
    )]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("metrics.token_file {path} is empty; put the token on its first line")]
    TokenFileEmpty { path: PathBuf },
}

/// The token the endpoint requires, if one is configured.
fn configured_token(config: &MetricsConfig) -> Result<Option<String>, MetricsError> {
    if let Some(name) = &config.token_env {
        return match std::env::var(name) {
            Ok(token) if !token.trim().is_empty() => Ok(Some(token.trim().to_owned())),
            _ => Err(MetricsError::TokenEnv { name: name.clone() }),
        };
    }
    if let Some(path) = &config.token_file {
        let text = std::fs::read_to_string(path).map_err(|source| MetricsError::TokenFile {
            path: path.clone(),
            source,
        })?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            return Err(MetricsError::TokenFileEmpty { path: path.clone() });
        }
        return Ok(Some(token.to_owned()));
    }
    Ok(None)
}

/// Starts the endpoint when `[metrics]` is enabled. Returns the server task, or `None` when it
/// is disabled or could not bind (logged).
pub async fn start(
    config: &MetricsConfig,
    buffer_path: PathBuf,
    shutdown: CancellationToken,
) -> Option<JoinHandle<()>> {
    if !config.enabled {
        return None;
    }
    let span = info_span!("metrics", component = "metrics");
    let addr = match config.listen_addr() {
        Ok(addr) => addr,
        Err(e) => {
            // validate() refuses such a config; one built in code could still carry it.
            span.in_scope(|| error!("metrics endpoint not started: {e}"));
            return None;
        }
    };
    let token = match configured_token(config) {
        Ok(token) => token,
        Err(e) => {
            span.in_scope(|| error!("metrics endpoint not started: {e}"));
            return None;
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(source) => {
            let e = MetricsError::Bind { addr, source };
            span.in_scope(|| error!("{e}"));
            return None;
        }
    };
    span.in_scope(|| {
        info!(
            listen = %addr,
            token = token.is_some(),
            "serving /status, /metrics and /health"
        );
    });
    Some(tokio::spawn(
        serve_with_token(listener, buffer_path, token, shutdown).instrument(span),
    ))
}

/// Answers connections on `listener` until `shutdown` is cancelled, without a token.
pub async fn serve(listener: TcpListener, buffer_path: PathBuf, shutdown: CancellationToken) {
    serve_with_token(listener, buffer_path, None, shutdown).await;
}

/// Answers connections on `listener` until `shutdown` is cancelled; with `token`, every page
/// but `/health` requires it.
pub async fn serve_with_token(
    listener: TcpListener,
    buffer_path: PathBuf,
    token: Option<String>,
    shutdown: CancellationToken,
) {
    let buffer_path = Arc::new(buffer_path);
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
        let path = Arc::clone(&buffer_path);
        let token = Arc::clone(&token);
        let service = hyper::service::service_fn(move |req| {
            respond(req, Arc::clone(&path), Arc::clone(&token))
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

async fn respond(
    req: Request<Incoming>,
    buffer_path: Arc<PathBuf>,
    token: Arc<Option<String>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned());
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(resp);
    }
    if let Some(expected) = token.as_ref()
        && req.uri().path() != "/health"
        && !status::presented_token(&req).is_some_and(|t| status::token_matches(&t, expected))
    {
        let mut resp = text(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs the token from [metrics] token_env or token_file: send `Authorization: Bearer <token>` or open /status?token=<token>\n".to_owned(),
        );
        resp.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"plantline\""),
        );
        return Ok(resp);
    }
    Ok(match req.uri().path() {
        "/" | "/status" => {
            let mut resp = text(StatusCode::OK, status::PAGE.to_owned());
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp.headers_mut().insert(
                hyper::header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
                ),
            );
            resp
        }
        "/status.json" => {
            let body = status::snapshot(&buffer_path).await;
            let mut resp = text(StatusCode::OK, format!("{body}\n"));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            resp.headers_mut().insert(
                hyper::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            );
            resp
        }
        "/metrics" => {
            let path = Arc::clone(&buffer_path);
            // A read-only look as one more WAL reader; it never blocks the writer.
            let report = tokio::task::spawn_blocking(move || crate::buffer::inspect(&path))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let report = match report {
                Ok(report) => Some(report),
                Err(e) => {
                    warn!("buffer gauges left out of this scrape: {e}");
                    None
                }
            };
            let body = global().render(report.as_ref(), SystemTime::now());
            let mut resp = text(StatusCode::OK, body);
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/health" => {
            let (status, body) = match global().health(SystemTime::now()) {
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
            format!("no such page: {other}; try /status, /metrics or /health\n"),
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

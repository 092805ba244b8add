//! The agent's HTTP endpoints, on kube-proxy's ports and paths so that existing
//! probes and dashboards work:
//! - metrics address (default 127.0.0.1:10249): `/metrics`, `/proxyMode` (`ebpf`);
//! - health address (default 0.0.0.0:10256, where load balancers probe nodes):
//!   `/healthz` and `/livez` (the agent's loop ran recently), `/readyz` (services
//!   programmed and interfaces attached). Nothing else is served on either.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tracing::warn;

use crate::metrics::{self, AgentMetrics};

/// What the endpoints report, shared with the agent loop.
pub struct Status {
    pub pin_dir: PathBuf,
    pub metrics: AgentMetrics,
    ready: AtomicBool,
    /// Unix seconds of the agent loop's last turn.
    last_turn: AtomicU64,
}

/// How stale the loop may be before `/healthz` fails.
const HEALTHY_WITHIN_SECONDS: u64 = 30;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Status {
    pub fn new(pin_dir: PathBuf, metrics: AgentMetrics) -> Arc<Status> {
        Arc::new(Status {
            pin_dir,
            metrics,
            ready: AtomicBool::new(false),
            last_turn: AtomicU64::new(unix_now()),
        })
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Called on every turn of the agent loop.
    pub fn alive(&self) {
        self.last_turn.store(unix_now(), Ordering::Relaxed);
    }
}

async fn proxy_mode() -> &'static str {
    "ebpf"
}

async fn render_metrics(State(status): State<Arc<Status>>) -> impl IntoResponse {
    let rendered =
        tokio::task::spawn_blocking(move || metrics::render(&status.pin_dir, &status.metrics))
            .await;
    match rendered {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("{e:#}\n"),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("{e}\n"),
        ),
    }
}

async fn healthz(State(status): State<Arc<Status>>) -> impl IntoResponse {
    let (last, now) = (status.last_turn.load(Ordering::Relaxed), unix_now());
    let code = if now.saturating_sub(last) <= HEALTHY_WITHIN_SECONDS {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        format!("{{\"lastUpdated\": {last}, \"currentTime\": {now}}}\n"),
    )
}

async fn readyz(State(status): State<Arc<Status>>) -> impl IntoResponse {
    if status.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Binds both addresses (failing at once if one is taken) and serves in the background.
pub async fn spawn(
    metrics_address: SocketAddr,
    health_address: SocketAddr,
    status: Arc<Status>,
) -> Result<()> {
    let metrics_router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/proxyMode", get(proxy_mode))
        .with_state(status.clone());
    let health_router = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(status);
    for (address, router) in [
        (metrics_address, metrics_router),
        (health_address, health_router),
    ] {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("listening on {address}"))?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                warn!("HTTP server on {address} stopped: {e}");
            }
        });
    }
    Ok(())
}

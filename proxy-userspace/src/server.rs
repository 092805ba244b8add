//! The agent's HTTP endpoints, on kube-proxy's ports and paths so that existing
//! probes and dashboards work:
//! - metrics address (default 127.0.0.1:10249): `/metrics`, `/proxyMode` (`ebpf`),
//!   `/statusz` (the agent's half of `ebpf-proxy status`, JSON; local peers only);
//! - health address (default 0.0.0.0:10256, where load balancers probe nodes):
//!   `/healthz` and `/livez` with kube-proxy's meanings and answers (see `health`),
//!   `/readyz` (services programmed and interfaces attached; when not, the body says
//!   what is missing, one line per item). Nothing else is served on either.
//!
//! Anyone who can reach the health port (every load balancer, so usually anyone) may
//! try to hold connections open. Each listener therefore limits what a peer can
//! hold ([`LIMITS`]): a connection must send its request headers within a few
//! seconds (also between keep-alive requests), lives at most a minute, and each
//! source address may hold only a few at once, within a total cap. Connections over
//! a limit are closed at once. An idle or trickling peer thus cannot exhaust the
//! agent's descriptors nor shut out the probes of other addresses.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{
    health::Health,
    metrics::{self, AgentMetrics},
    status::AgentReport,
};

/// What the endpoints report, shared with the agent loop.
pub struct Status {
    pub pin_dir: PathBuf,
    pub metrics: AgentMetrics,
    /// `--metrics-max-series`.
    pub metrics_max_series: usize,
    /// One scrape rendered at a time: parallel scrapes of a large node would each
    /// hold a whole exposition.
    rendering: Mutex<()>,
    /// `None`: ready; else what is missing, one line per item.
    readiness: Mutex<Option<String>>,
    pub health: Health,
    /// The agent's half of `ebpf-proxy status`; health and readiness are filled in
    /// when asked.
    report: Mutex<AgentReport>,
}

impl Status {
    /// `pending_timeout`: how long a change may wait to be programmed before the
    /// proxy is unhealthy.
    pub fn new(
        pin_dir: PathBuf,
        metrics: AgentMetrics,
        metrics_max_series: usize,
        pending_timeout: Duration,
    ) -> Arc<Status> {
        Arc::new(Status {
            pin_dir,
            metrics,
            metrics_max_series,
            rendering: Mutex::new(()),
            readiness: Mutex::new(Some("starting\n".into())),
            health: Health::new(pending_timeout),
            report: Mutex::new(AgentReport::default()),
        })
    }

    /// Changes what `/statusz` reports.
    pub fn update_report(&self, change: impl FnOnce(&mut AgentReport)) {
        change(&mut self.report.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Ready when nothing is missing.
    pub fn set_readiness(&self, missing: &[String]) {
        let text = (!missing.is_empty()).then(|| missing.join("\n") + "\n");
        *self.readiness.lock().unwrap_or_else(|e| e.into_inner()) = text;
    }
}

async fn proxy_mode() -> &'static str {
    "ebpf"
}

/// The address a connection came from.
#[derive(Clone, Copy)]
struct Peer(IpAddr);

/// `/statusz` answers local peers only (`ebpf-proxy status` runs on the node, or in
/// the agent's pod, which shares the node's network): a metrics address on every
/// interface, as Prometheus setups often configure, must not tell the network the
/// node's interfaces, addresses and the names of the objects with problems.
async fn statusz(
    State(status): State<Arc<Status>>,
    axum::Extension(Peer(peer)): axum::Extension<Peer>,
) -> axum::response::Response {
    if !peer.is_loopback() {
        return (StatusCode::FORBIDDEN, "/statusz answers local peers only\n").into_response();
    }
    let mut report = status
        .report
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let verdict = status.health.verdict();
    report.proxy_healthy = verdict.proxy_healthy;
    report.node_eligible = verdict.node_eligible;
    report.last_sync = verdict.last_synced;
    report.pending_seconds = verdict.pending_for.map(|d| d.as_secs());
    report.syncs = status.metrics.syncs.get();
    report.not_ready = status
        .readiness
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_deref()
        .map_or_else(Vec::new, |text| text.lines().map(str::to_owned).collect());
    axum::Json(report).into_response()
}

async fn render_metrics(State(status): State<Arc<Status>>) -> impl IntoResponse {
    let rendered = tokio::task::spawn_blocking(move || {
        let _one_at_a_time = status.rendering.lock();
        metrics::render(&status.pin_dir, &status.metrics, status.metrics_max_series)
    })
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

/// kube-proxy's answer: JSON with `lastUpdated` and `currentTime` (here in Unix
/// seconds; kube-proxy prints Go time strings), and `/healthz` adds `nodeEligible`;
/// counted in kube-proxy's `kubeproxy_proxy_{healthz,livez}_total` by code.
fn health_answer(
    status: &Status,
    livez: bool,
    healthy: bool,
    body: serde_json::Value,
) -> impl IntoResponse {
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    status
        .metrics
        .kube_proxy
        .health_answered(livez, code.as_u16());
    (
        code,
        [
            ("content-type", "application/json"),
            ("x-content-type-options", "nosniff"),
        ],
        format!("{body}\n"),
    )
}

async fn healthz(State(status): State<Arc<Status>>) -> impl IntoResponse {
    let verdict = status.health.verdict();
    health_answer(
        &status,
        false,
        verdict.healthz(),
        serde_json::json!({
            "lastUpdated": verdict.last_updated,
            "currentTime": verdict.current_time,
            "nodeEligible": verdict.node_eligible,
        }),
    )
}

async fn livez(State(status): State<Arc<Status>>) -> impl IntoResponse {
    let verdict = status.health.verdict();
    health_answer(
        &status,
        true,
        verdict.proxy_healthy,
        serde_json::json!({
            "lastUpdated": verdict.last_updated,
            "currentTime": verdict.current_time,
        }),
    )
}

async fn readyz(State(status): State<Arc<Status>>) -> impl IntoResponse {
    let missing = status
        .readiness
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match missing {
        None => (StatusCode::OK, "ok\n".to_owned()),
        Some(missing) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{missing}"),
        ),
    }
}

/// What a peer may hold on one listener.
pub struct Limits {
    /// Connections of all peers at once.
    pub connections: usize,
    /// Connections of one source address at once.
    pub per_peer: usize,
    /// To send a request's headers, counted from when the connection waits for one.
    pub header_timeout: Duration,
    /// A connection's whole life: keep-alive does not keep it forever.
    pub lifetime: Duration,
}

/// Probes and scrapes are a few short requests; a metrics scrape of a large node
/// takes a few seconds (BENCHMARKS.md).
pub const LIMITS: Limits = Limits {
    connections: 256,
    per_peer: 16,
    header_timeout: Duration::from_secs(5),
    lifetime: Duration::from_secs(60),
};

/// After a failed accept (out of descriptors, say): a pause instead of a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections held, in total and per source address.
#[derive(Default)]
struct Held {
    total: usize,
    by_peer: BTreeMap<IpAddr, usize>,
}

/// One admitted connection; gives its place back when dropped.
struct Admission {
    held: Arc<Mutex<Held>>,
    peer: IpAddr,
}

fn admit(held: &Arc<Mutex<Held>>, peer: IpAddr, limits: &Limits) -> Option<Admission> {
    let mut h = held.lock().unwrap_or_else(|e| e.into_inner());
    let of_peer = h.by_peer.get(&peer).copied().unwrap_or(0);
    if h.total >= limits.connections || of_peer >= limits.per_peer {
        return None;
    }
    h.total += 1;
    h.by_peer.insert(peer, of_peer + 1);
    Some(Admission {
        held: held.clone(),
        peer,
    })
}

impl Drop for Admission {
    fn drop(&mut self) {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        h.total -= 1;
        if let Some(n) = h.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                h.by_peer.remove(&self.peer);
            }
        }
    }
}

/// Serves HTTP/1 on `listener` within `limits`, until the task is dropped.
pub async fn serve(listener: TcpListener, router: Router, limits: &'static Limits) {
    let held = Arc::new(Mutex::new(Held::default()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!("accepting an HTTP connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(admission) = admit(&held, peer.ip(), limits) else {
            debug!(%peer, "HTTP connection over the limits: closed");
            continue; // dropping the stream closes it
        };
        // Handlers that answer only local peers read the peer from here.
        let service =
            TowerToHyperService::new(router.clone().layer(axum::Extension(Peer(peer.ip()))));
        tokio::spawn(async move {
            let _admission = admission;
            let mut http = http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let connection = http.serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.lifetime, connection).await;
        });
    }
}

/// Binds both addresses and serves in the background. With `hard_fail` an address
/// that cannot be bound is fatal; without (kube-proxy's `bindAddressHardFail: false`)
/// it is returned, and the agent serves without that listener.
pub async fn spawn(
    metrics_address: SocketAddr,
    health_address: SocketAddr,
    status: Arc<Status>,
    hard_fail: bool,
) -> Result<Vec<String>> {
    let metrics_router = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/proxyMode", get(proxy_mode))
        .route("/statusz", get(statusz))
        .with_state(status.clone());
    let health_router = Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(status);
    let mut unbound = Vec::new();
    for (address, router) in [
        (metrics_address, metrics_router),
        (health_address, health_router),
    ] {
        match TcpListener::bind(address).await {
            Ok(listener) => {
                tokio::spawn(serve(listener, router, &LIMITS));
            }
            Err(e) if hard_fail => {
                return Err(e).with_context(|| format!("listening on {address}"));
            }
            Err(e) => unbound.push(format!("listening on {address}: {e}")),
        }
    }
    Ok(unbound)
}

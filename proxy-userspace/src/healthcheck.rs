//! Health checks of services with `externalTrafficPolicy: Local`: one HTTP server per
//! `healthCheckNodePort`, answering like kube-proxy's so that cloud load balancers
//! send external traffic only to nodes with local endpoints: 200 and the count when
//! the node has some and the agent is healthy (`health`), else 503, for any path;
//! `serviceProxyHealthy` says the agent's health, as in kube-proxy.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{
    extract::State,
    http::StatusCode,
    response::{AppendHeaders, IntoResponse},
    Router,
};
use tokio::task::JoinHandle;
use tracing::info;

use crate::{
    model::{HealthCheck, Problem},
    server::{self, Status},
};

type Shared = Arc<RwLock<BTreeMap<u16, HealthCheck>>>;

/// The running servers and what each reports.
pub struct HealthCheckServers {
    checks: Shared,
    servers: BTreeMap<u16, JoinHandle<()>>,
    /// The agent's, whose health every answer carries.
    status: Arc<Status>,
}

impl HealthCheckServers {
    pub fn new(status: Arc<Status>) -> HealthCheckServers {
        HealthCheckServers {
            checks: Shared::default(),
            servers: BTreeMap::new(),
            status,
        }
    }

    /// Serves exactly `checks`: opens new ports, closes dropped ones, and updates the
    /// answers of the others. A port that cannot be bound is reported.
    pub async fn update(&mut self, checks: BTreeMap<u16, HealthCheck>) -> Vec<Problem> {
        let mut problems = Vec::new();
        if let Ok(mut shared) = self.checks.write() {
            *shared = checks.clone();
        }
        let gone: Vec<u16> = self
            .servers
            .keys()
            .filter(|p| !checks.contains_key(p))
            .copied()
            .collect();
        for port in gone {
            if let Some(server) = self.servers.remove(&port) {
                server.abort();
                info!(port, "health check closed");
            }
        }
        for (&port, check) in &checks {
            if self.servers.contains_key(&port) {
                continue;
            }
            match dual_stack_listener(port) {
                Ok(listener) => {
                    let router = Router::new().fallback(answer).with_state((
                        self.checks.clone(),
                        port,
                        self.status.clone(),
                    ));
                    // Within the same limits as the agent's own health port: load
                    // balancers probe it, and so may anyone else.
                    let server = tokio::spawn(server::serve(listener, router, &server::LIMITS));
                    self.servers.insert(port, server);
                    info!(port, service = %format!("{}/{}", check.namespace, check.name), "health check open");
                }
                Err(e) => problems.push(Problem::error(
                    format!("Service {}/{}", check.namespace, check.name),
                    format!("healthCheckNodePort {port} cannot be served: {e}"),
                )),
            }
        }
        problems
    }
}

/// A listener on `port` of every address of both families (load balancers of either
/// family probe it): one IPv6 socket that also takes IPv4 (whatever the host's
/// `net.ipv6.bindv6only`), or an IPv4 one where the host has no IPv6.
fn dual_stack_listener(port: u16) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let (socket, address) = match Socket::new(Domain::IPV6, Type::STREAM, None) {
        Ok(socket) => {
            socket.set_only_v6(false)?;
            (socket, SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        }
        Err(_) => (
            Socket::new(Domain::IPV4, Type::STREAM, None)?,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        ),
    };
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

impl Drop for HealthCheckServers {
    fn drop(&mut self) {
        for server in self.servers.values() {
            server.abort();
        }
    }
}

async fn answer(
    State((checks, port, status)): State<(Shared, u16, Arc<Status>)>,
) -> impl IntoResponse {
    let check = checks.read().ok().and_then(|c| c.get(&port).cloned());
    let Some(check) = check else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            AppendHeaders(Vec::new()),
            String::new(),
        );
    };
    // An unhealthy proxy fails every check too, as kube-proxy's does: its maps may
    // be stale, so load balancers should prefer other nodes.
    let proxy_healthy = status.health.verdict().proxy_healthy;
    let code = if check.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": check.namespace, "name": check.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    (
        code,
        AppendHeaders(vec![
            ("content-type", "application/json".to_owned()),
            ("x-content-type-options", "nosniff".to_owned()),
            (
                "x-load-balancing-endpoint-weight",
                check.local_endpoints.to_string(),
            ),
        ]),
        body.to_string(),
    )
}

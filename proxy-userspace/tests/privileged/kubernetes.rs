//! The Kubernetes source end to end: the real agent watches a fake API server (the
//! real list/watch protocol over HTTP, `testbed::apiserver`) with its unmodified
//! kube-rs client, and real traffic between namespaces shows that the data path
//! follows every change (services, endpoints, traffic policies, health checks,
//! source ranges). Outages, reports and batching: `kubernetes_resilience`.

use std::net::Ipv4Addr;

use crate::support::{
    cluster::*,
    kubernetes::*,
    services::{web, LB_IP, NODE_PORT, WEB_VIP},
};
use testbed::{
    apiserver::Resource,
    manifests::ServiceDef,
    topology::{Topology, CLIENT_IP, NODE_IP},
};

const HEALTH_PORT: u16 = 32000;

#[test]
fn services_and_endpoints_follow_the_api_server() {
    let cluster = Cluster::with_api_server("kfol", 4, 0, |_| Vec::new(), &NO_BATCHING);
    let url = format!("http://{WEB_VIP}/");
    let t = &cluster.topology;
    let client = "pod-a4";
    assert!(curl(cluster.ns(client), &url).is_err(), "no service yet");

    publish(&cluster, web(t, &["pod-a1", "pod-a2"]));
    wait_for("two backends", || {
        reached(&cluster, client, &url, 4) == ["pod-a1", "pod-a2"]
    });

    publish(&cluster, web(t, &["pod-a1", "pod-a2", "pod-a3"]));
    wait_for("scaled up to three", || {
        reached(&cluster, client, &url, 6).len() == 3
    });

    publish(&cluster, web(t, &["pod-a3"]));
    wait_for("scaled down to one", || {
        reached(&cluster, client, &url, 4) == ["pod-a3"]
    });

    // pod-a3 terminates while pod-a1 is ready: only pod-a1 serves...
    let mut terminating = web(t, &["pod-a1"]);
    terminating.terminating = vec![(t.pod("pod-a3").addr, t.pod("pod-a3").node.to_owned())];
    publish(&cluster, terminating.clone());
    wait_for("the terminating endpoint left", || {
        reached(&cluster, client, &url, 4) == ["pod-a1"]
    });
    // ...and with no ready endpoint left, the terminating one still serves.
    terminating.backends.clear();
    publish(&cluster, terminating);
    wait_for("the terminating fallback", || {
        reached(&cluster, client, &url, 4) == ["pod-a3"]
    });

    // sessionAffinity: ClientIP keeps the client on one backend.
    publish(
        &cluster,
        web(t, &["pod-a1", "pod-a2", "pod-a3"])
            .with_spec("sessionAffinity: ClientIP")
            .with_spec("sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}"),
    );
    wait_for("affinity programmed", || {
        cluster
            .agent
            .listing()
            .is_ok_and(|l| l.services.iter().any(|s| s.affinity_timeout_s == 600))
    });
    assert_eq!(
        reached(&cluster, client, &url, 8).len(),
        1,
        "one client, one backend"
    );

    assert!(cluster.api().delete(Resource::Services, "demo", "web"));
    wait_for("the service is gone", || {
        curl(cluster.ns(client), &url).is_err()
    });
}

/// `curl` that also reports the HTTP status: (status, body).
fn curl_status(cluster: &Cluster, url: &str) -> (u16, String) {
    let out = cluster
        .topology
        .client
        .exec(
            "curl",
            &["-sS", "--max-time", "5", "-w", "\n%{http_code}", url],
        )
        .unwrap_or_default();
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

/// Pods reached from the external client, with the client address each one saw.
fn reached_from_outside(cluster: &Cluster, url: &str, n: usize) -> Vec<(String, Ipv4Addr)> {
    let mut seen: Vec<(String, Ipv4Addr)> = (0..n)
        .filter_map(|_| curl(&cluster.topology.client, url).ok())
        .map(|b| (pod_of(&b), client_of(&b)))
        .collect();
    seen.sort();
    seen.dedup();
    seen
}

fn exposed(topology: &Topology) -> ServiceDef {
    let mut service = web(topology, &["pod-a1", "pod-b1"]);
    service.node_port = Some(NODE_PORT);
    service.load_balancer_ip = Some(LB_IP);
    service
}

#[test]
fn traffic_policies_health_checks_and_source_ranges_follow_the_service() {
    let cluster = Cluster::with_api_server("kpol", 2, 1, |t| vec![exposed(t)], &NO_BATCHING);
    let t = &cluster.topology;
    let node_port = format!("http://{NODE_IP}:{NODE_PORT}/");
    let health = format!("http://{NODE_IP}:{HEALTH_PORT}/healthz");

    // Cluster policy: both endpoints; the remote one sees the node (masquerade).
    let seen = reached_from_outside(&cluster, &node_port, 8);
    assert_eq!(
        seen,
        [
            ("pod-a1".to_owned(), CLIENT_IP),
            ("pod-b1".to_owned(), NODE_IP)
        ],
        "{seen:?}"
    );
    assert_eq!(
        curl_status(&cluster, &health).0,
        0,
        "no health check port yet"
    );

    // Local policy: only the local endpoint, with the client's own address, and a
    // health check that reports it.
    let local = || {
        exposed(t)
            .with_spec("externalTrafficPolicy: Local")
            .with_spec(&format!("healthCheckNodePort: {HEALTH_PORT}"))
    };
    publish(&cluster, local());
    wait_for("local endpoints only", || {
        reached_from_outside(&cluster, &node_port, 6) == [("pod-a1".to_owned(), CLIENT_IP)]
    });
    assert_eq!(
        reached_from_outside(&cluster, &format!("http://{LB_IP}/"), 4),
        [("pod-a1".to_owned(), CLIENT_IP)]
    );
    let (code, body) = curl_status(&cluster, &health);
    assert_eq!(code, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(report["localEndpoints"], 1, "{report}");
    assert_eq!(report["service"]["name"], "web", "{report}");
    // The ClusterIP keeps using both endpoints.
    assert_eq!(
        reached(&cluster, "pod-a2", &format!("http://{WEB_VIP}/"), 8).len(),
        2
    );

    // Without a local endpoint the node fails the health check and drops external
    // traffic (a load balancer would have stopped sending it).
    let mut remote_only = local();
    remote_only.backends.retain(|(_, node)| node != "node-a");
    publish(&cluster, remote_only);
    wait_for("health check fails", || {
        curl_status(&cluster, &health).0 == 503
    });
    assert!(curl(&t.client, &node_port).is_err());

    // internalTrafficPolicy: Local keeps the ClusterIP on this node's endpoints.
    publish(
        &cluster,
        exposed(t).with_spec("internalTrafficPolicy: Local"),
    );
    wait_for("health check closed", || {
        curl_status(&cluster, &health).0 == 0
    });
    wait_for("cluster IP local only", || {
        reached(&cluster, "pod-a2", &format!("http://{WEB_VIP}/"), 6) == ["pod-a1"]
    });

    // loadBalancerSourceRanges: the LoadBalancer IP admits only listed clients, the
    // NodePort is not restricted.
    publish(
        &cluster,
        exposed(t).with_spec("loadBalancerSourceRanges: [203.0.113.0/24]"),
    );
    wait_for("client refused", || {
        curl(&t.client, &format!("http://{LB_IP}/")).is_err()
    });
    assert!(curl(&t.client, &node_port).is_ok());
    publish(
        &cluster,
        exposed(t).with_spec("loadBalancerSourceRanges: [203.0.113.0/24, 198.18.0.0/24]"),
    );
    wait_for("client admitted", || {
        curl(&t.client, &format!("http://{LB_IP}/")).is_ok()
    });
}

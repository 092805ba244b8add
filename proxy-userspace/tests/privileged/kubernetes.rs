//! The Kubernetes source end to end: the real agent watches a fake API server (the
//! real list/watch protocol over HTTP, `testbed::apiserver`) with its unmodified
//! kube-rs client, and real traffic between namespaces shows that the data path
//! follows every change.

use std::{net::Ipv4Addr, time::Duration};

use crate::support::{
    cluster::*,
    services::{web, LB_IP, NODE_PORT, WEB_VIP},
};
use testbed::{
    apiserver::Resource,
    eventually,
    manifests::{render, ServiceDef},
    servers::HttpConnection,
    topology::{Topology, CLIENT_IP, NODE_IP},
};

const HEALTH_PORT: u16 = 32000;
/// Every change is programmed at once unless a test asks otherwise.
const NO_BATCHING: [&str; 2] = ["--min-sync-period-ms", "0"];

/// Replaces the service's objects on the API server.
fn publish(cluster: &Cluster, service: ServiceDef) {
    cluster
        .api()
        .apply_manifests(&render(&[service]))
        .expect("apply");
}

/// The backends `n` fresh connections from `pod` reach (sorted, deduplicated).
fn reached(cluster: &Cluster, pod: &str, url: &str, n: usize) -> Vec<String> {
    let mut pods: Vec<String> = (0..n)
        .filter_map(|_| curl(cluster.ns(pod), url).ok())
        .map(|b| pod_of(&b))
        .collect();
    pods.sort();
    pods.dedup();
    pods
}

fn wait_for(what: &str, check: impl FnMut() -> bool) {
    // Long enough for kube-rs's watch backoff after an outage (0.8 s, doubling).
    assert!(
        eventually(Duration::from_secs(30), Duration::from_millis(200), check),
        "timed out waiting for: {what}"
    );
}

/// The agent's metrics, read inside the node (they are served on its loopback).
fn metrics(cluster: &Cluster) -> String {
    cluster
        .topology
        .node
        .exec(
            "curl",
            &["-sS", "--max-time", "5", "http://127.0.0.1:10249/metrics"],
        )
        .unwrap_or_default()
}

/// A counter or histogram-count sample of the metrics, summed over its labels.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Lists (not watches) of every resource the agent made so far.
fn lists(cluster: &Cluster) -> usize {
    cluster
        .api()
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET ") && !r.contains("watch=true"))
        .count()
}

/// The agent's `synced` log lines after the first `from` bytes of its log.
fn syncs_since(cluster: &Cluster, from: usize) -> Vec<String> {
    cluster.agent.log()[from..]
        .lines()
        .filter(|l| l.contains(" synced "))
        .map(str::to_owned)
        .collect()
}

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

#[test]
fn an_api_server_outage_keeps_forwarding_and_a_relist_changes_nothing() {
    let mut cluster = Cluster::with_api_server(
        "kout",
        4,
        0,
        |t| vec![web(t, &["pod-a1", "pod-a2"])],
        &NO_BATCHING,
    );
    let url = format!("http://{WEB_VIP}/");
    let mut stream =
        HttpConnection::open(cluster.ns("pod-a4"), (WEB_VIP, 80).into()).expect("connect");
    let first = pod_of(&stream.get().expect("first request"));

    // The API server goes away: forwarding goes on, new and kept-alive connections.
    cluster.api.as_mut().expect("api").stop();
    assert_eq!(reached(&cluster, "pod-a4", &url, 6).len(), 2);
    assert_eq!(pod_of(&stream.get().expect("during the outage")), first);

    // A change made meanwhile arrives once it is back, even though its first
    // answers are errors.
    publish(
        &cluster,
        web(&cluster.topology, &["pod-a1", "pod-a2", "pod-a3"]),
    );
    let api = cluster.api.as_mut().expect("api");
    api.fail_next(500, 2);
    api.restart().expect("restart");
    wait_for("the change made during the outage", || {
        reached(&cluster, "pod-a4", &url, 6).len() == 3
    });
    assert_eq!(pod_of(&stream.get().expect("after the outage")), first);
    assert!(sample(&metrics(&cluster), "ebpf_proxy_source_errors_total") > 0.0);

    // An expired resourceVersion (410 Gone) makes the agent list everything again;
    // nothing changed, so nothing is written to the maps.
    let (lists_before, log_before) = (lists(&cluster), cluster.agent.log().len());
    cluster.api().expire_watches();
    wait_for("a relist of all three resources", || {
        lists(&cluster) >= lists_before + 3
    });
    std::thread::sleep(Duration::from_millis(500));
    let syncs = syncs_since(&cluster, log_before);
    assert!(!syncs.is_empty(), "the relist was not synced");
    for line in syncs {
        assert!(line.contains("map_writes=0 "), "the relist wrote: {line}");
    }
    assert_eq!(pod_of(&stream.get().expect("after the relist")), first);
    // ...and later changes still arrive.
    publish(&cluster, web(&cluster.topology, &["pod-a3"]));
    wait_for("scaled down after the relist", || {
        reached(&cluster, "pod-a4", &url, 4) == ["pod-a3"]
    });
}

#[test]
fn objects_that_cannot_be_programmed_are_reported_once_as_events() {
    let broken = |t: &Topology| {
        ServiceDef::new("broken", Ipv4Addr::new(10, 96, 0, 11), "TCP", 80, 8080)
            .with_pods([t.pod("pod-a1")])
            .with_spec("sessionAffinity: ClientIP")
            .with_spec("sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}")
    };
    let cluster = Cluster::with_api_server(
        "kevt",
        2,
        0,
        |t| vec![web(t, &["pod-a1"]), broken(t)],
        &NO_BATCHING,
    );
    wait_for("an event", || !cluster.api().events().is_empty());
    let event = &cluster.api().events()[0];
    assert_eq!(event["regarding"]["kind"], "Service", "{event}");
    assert_eq!(event["regarding"]["name"], "broken", "{event}");
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(
        event["reportingController"], "ebpf-proxy.io/agent",
        "{event}"
    );
    assert!(
        event["note"]
            .as_str()
            .unwrap_or("")
            .contains("timeoutSeconds"),
        "{event}"
    );
    // The other service works.
    assert_eq!(
        reached(&cluster, "pod-a2", &format!("http://{WEB_VIP}/"), 2),
        ["pod-a1"]
    );
    // The same problem again (the object re-translated) is not reported again.
    publish(
        &cluster,
        broken(&cluster.topology).annotated("touched", "yes"),
    );
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(cluster.api().events().len(), 1);
    assert!(sample(&metrics(&cluster), "ebpf_proxy_sync_problems") >= 1.0);
}

#[test]
fn a_burst_of_changes_is_batched_by_the_minimum_sync_period() {
    let cluster = Cluster::with_api_server(
        "kbat",
        3,
        0,
        |t| vec![web(t, &["pod-a1"])],
        &["--min-sync-period-ms", "1500"],
    );
    let log_before = cluster.agent.log().len();
    let t = &cluster.topology;
    for n in 0..20 {
        let pods: &[&str] = if n % 2 == 0 {
            &["pod-a1", "pod-a2"]
        } else {
            &["pod-a2", "pod-a3"]
        };
        publish(&cluster, web(t, pods));
    }
    wait_for("the last state", || {
        reached(&cluster, "pod-a3", &format!("http://{WEB_VIP}/"), 4) == ["pod-a2", "pod-a3"]
    });
    let syncs = syncs_since(&cluster, log_before);
    assert!(
        syncs.len() <= 2,
        "20 changes, {} syncs:\n{}",
        syncs.len(),
        syncs.join("\n")
    );
    let text = metrics(&cluster);
    assert!(
        sample(
            &text,
            "ebpf_proxy_network_programming_duration_seconds_count"
        ) >= 1.0,
        "{text}"
    );
}

#[test]
fn the_agent_is_ready_only_once_its_first_lists_are_programmed_despite_refusals() {
    let cluster = Cluster::with_api_server_prepared(
        "krdy",
        2,
        0,
        |t| vec![web(t, &["pod-a1"])],
        &NO_BATCHING,
        |api| {
            // The first answers refuse: unauthenticated, forbidden, a server error.
            api.fail_next(401, 1);
            api.fail_next(403, 1);
            api.fail_next(500, 1);
        },
    );
    // The agent reported ready (the test harness waited for it): the service works.
    assert_eq!(
        reached(&cluster, "pod-a2", &format!("http://{WEB_VIP}/"), 2),
        ["pod-a1"]
    );
    assert!(lists(&cluster) > 3, "{:#?}", cluster.api().requests());
    assert!(sample(&metrics(&cluster), "ebpf_proxy_source_errors_total") >= 3.0);
    let log = cluster.agent.log();
    let (synced, ready) = (log.find(" synced "), log.find(" ready"));
    assert!(
        synced.is_some() && ready.is_some() && synced < ready,
        "ready before the first sync:\n{log}"
    );
}

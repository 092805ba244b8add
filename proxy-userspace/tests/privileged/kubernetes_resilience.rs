//! The Kubernetes source when things go wrong or come in bursts: an API server
//! outage (forwarding goes on, a relist changes nothing), objects that cannot be
//! programmed (reported once, as Events), a burst of changes batched by the minimum
//! sync period, readiness only once the first lists are programmed.

use std::{net::Ipv4Addr, time::Duration};

use crate::support::{
    cluster::*,
    kubernetes::*,
    services::{web, WEB_VIP},
};
use testbed::{
    agent::AgentOptions, manifests::ServiceDef, servers::HttpConnection, topology::Topology,
};

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
        AgentOptions {
            extra_args: &NO_BATCHING,
            ..Default::default()
        },
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

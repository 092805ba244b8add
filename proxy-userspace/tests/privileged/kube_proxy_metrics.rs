//! kube-proxy's metrics under kube-proxy's names, types and labels (issue 15), beside
//! ebpf-proxy's own, so that dashboards and alerts written for kube-proxy keep
//! working: the exposition is compared with kube-proxy's metrics reference
//! (Kubernetes 1.36, the metrics that do not depend on its mode), and the values
//! follow what the agent does.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::chrono::{Duration, SecondsFormat, Utc};
use testbed::manifests::render;

use crate::support::{cluster::*, kubernetes::*, services::web};

/// Name, type and labels, as the reference lists them.
const KUBE_PROXY: &[(&str, &str, &[&str])] = &[
    (
        "kubeproxy_network_programming_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    ("kubeproxy_proxy_healthz_total", "counter", &["code"]),
    ("kubeproxy_proxy_livez_total", "counter", &["code"]),
    (
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "histogram",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        "counter",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "gauge",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "gauge",
        &["ip_family"],
    ),
    (
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "gauge",
        &["ip_family", "traffic_policy"],
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_pending",
        "gauge",
        &[],
    ),
    (
        "kubeproxy_sync_proxy_rules_service_changes_total",
        "counter",
        &[],
    ),
    (
        "kubernetes_build_info",
        "gauge",
        &["compiler", "git_version", "major", "minor", "platform"],
    ),
    ("process_cpu_seconds_total", "counter", &[]),
    ("process_max_fds", "gauge", &[]),
    ("process_open_fds", "gauge", &[]),
    ("process_resident_memory_bytes", "gauge", &[]),
    ("process_start_time_seconds", "gauge", &[]),
    ("process_virtual_memory_bytes", "gauge", &[]),
];

/// Each metric's type, by the name its samples carry (OpenMetrics declares a
/// counter's family without its `_total`).
fn types(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("# TYPE ")?.split(' ');
            let (name, kind) = (words.next()?, words.next()?);
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            };
            Some((name, kind.to_owned()))
        })
        .collect()
}

/// The samples of metric `name` (a histogram's through its `_count`): label names
/// (without `le`) and value.
fn samples(exposition: &str, name: &str, kind: &str) -> Vec<(BTreeSet<String>, f64)> {
    let sample = if kind == "histogram" {
        format!("{name}_count")
    } else {
        name.to_owned()
    };
    exposition
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&sample)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => r.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            let names = labels
                .split(',')
                .filter_map(|pair| pair.split_once('=').map(|(k, _)| k.to_owned()))
                .collect();
            Some((names, value.trim().parse().ok()?))
        })
        .collect()
}

/// The value of the one sample of `name` whose labels include `with` (a histogram:
/// `_count`/`_sum` suffixed names work as well).
fn value(exposition: &str, name: &str, with: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| l.contains(with))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} with {with} in:\n{exposition}"))
}

#[test]
fn kube_proxy_metrics_are_exported_with_its_names_types_labels_and_meanings() {
    let cluster = Cluster::with_api_server(
        "kpmet",
        2,
        0,
        |t| vec![web(t, &["pod-a1", "pod-a2"])],
        &NO_BATCHING,
    );
    probe(&cluster, "/healthz").expect("healthz");
    probe(&cluster, "/livez").expect("livez");

    // A new version of the slice, whose change happened three seconds ago as the
    // EndpointSlice controller records it: programming latency is measured from there.
    let trigger = (Utc::now() - Duration::seconds(3)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let manifests = render(&[web(&cluster.topology, &["pod-a1"])]).replace(
        "  labels: {kubernetes.io/service-name: web}\n",
        &format!(
            "  labels: {{kubernetes.io/service-name: web}}\n  annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}\n"
        ),
    );
    assert!(manifests.contains(&trigger), "{manifests}");
    cluster.api().apply_manifests(&manifests).expect("apply");
    wait_for("the annotated slice programmed", || {
        cluster
            .metrics()
            .contains("kubeproxy_network_programming_duration_seconds_count{ip_family=\"IPv4\"} 1")
    });

    let exposition = cluster.metrics();
    let exported = types(&exposition);
    for (name, kind, labels) in KUBE_PROXY {
        assert_eq!(
            exported.get(*name).map(String::as_str),
            Some(*kind),
            "{name}: in:\n{exposition}"
        );
        let wanted: BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
        for (names, _) in samples(&exposition, name, kind) {
            assert_eq!(names, wanted, "{name}'s labels");
        }
    }

    let v = |name: &str, with: &str| value(&exposition, name, with);
    assert!(v("kubeproxy_proxy_healthz_total", "code=\"200\"") >= 1.0);
    assert!(v("kubeproxy_proxy_livez_total", "code=\"200\"") >= 1.0);
    let waited = v("kubeproxy_network_programming_duration_seconds_sum", "IPv4");
    assert!((3.0..60.0).contains(&waited), "{waited} s from the trigger");
    // The node is dual-stack: each family is labelled, with the same sync's figures.
    assert_eq!(
        v("kubeproxy_network_programming_duration_seconds_sum", "IPv6"),
        waited
    );
    assert!(
        v(
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
            "IPv4"
        ) >= 1.0
    );
    assert!(
        v(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
            "IPv4"
        ) >= 1.0
    );
    // The first list (a service, a slice), then the slice's new version.
    assert!(v("kubeproxy_sync_proxy_rules_endpoint_changes_total", "") >= 2.0);
    assert!(v("kubeproxy_sync_proxy_rules_service_changes_total", "") >= 1.0);
    assert_eq!(
        v("kubeproxy_sync_proxy_rules_endpoint_changes_pending", ""),
        0.0
    );
    // Nothing waits: the last sync is not older than the last change queued.
    assert!(
        v("kubeproxy_sync_proxy_rules_last_timestamp_seconds", "IPv4")
            >= v(
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "IPv4"
            )
    );
    assert_eq!(
        v(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "external"
        ),
        0.0
    );
    assert_eq!(v("kubernetes_build_info", "compiler=\"rustc\""), 1.0);
    assert!(v("process_resident_memory_bytes", "") > 1e6);
    // ebpf-proxy's own stay beside them.
    assert!(v("ebpf_proxy_syncs_total", "") >= 2.0);
}

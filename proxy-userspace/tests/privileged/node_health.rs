//! `/healthz` and `/livez` as kube-proxy answers them (issue 15): a node that the
//! cluster autoscaler is about to remove (its taint), or whose Node is being deleted,
//! fails `/healthz`, so that load balancers drain it first, while `/livez` keeps
//! saying that the proxy itself is fine (nothing to restart).

use serde_json::{json, Value};
use testbed::{apiserver::Resource, topology::NODE_NAME};

use crate::support::{cluster::*, kubernetes::*, services::web};

fn node(spec: Value, deleting: bool) -> Value {
    let mut metadata = json!({ "name": NODE_NAME });
    if deleting {
        metadata["deletionTimestamp"] = json!("2026-12-02T00:00:00Z");
    }
    json!({ "apiVersion": "v1", "kind": "Node", "metadata": metadata, "spec": spec })
}

fn autoscaler_taint() -> Value {
    json!({ "taints": [{
        "key": "ToBeDeletedByClusterAutoscaler",
        "value": "1764633600",
        "effect": "NoSchedule",
    }] })
}

/// `/healthz` refuses (503) and says the node is not eligible.
fn drained(cluster: &Cluster) -> bool {
    probe(cluster, "/healthz")
        .is_err_and(|e| e.starts_with("503") && e.contains("\"nodeEligible\":false"))
}

#[test]
fn healthz_fails_while_the_node_is_tainted_for_deletion_or_being_deleted() {
    let cluster = Cluster::with_api_server(
        "nodehealth",
        1,
        0,
        |t| vec![web(t, &["pod-a1"])],
        &NO_BATCHING,
    );
    let api = cluster.api();
    let healthy = probe(&cluster, "/healthz").expect("healthy at start");
    assert!(healthy.contains("\"nodeEligible\":true"), "{healthy}");

    api.apply(Resource::Nodes, &node(autoscaler_taint(), false))
        .expect("taint");
    wait_for("/healthz 503 for the autoscaler's taint", || {
        drained(&cluster)
    });
    let live = probe(&cluster, "/livez").expect("/livez stays 200");
    assert!(!live.contains("nodeEligible"), "{live}");

    api.apply(Resource::Nodes, &node(json!({}), false))
        .expect("untaint");
    wait_for("/healthz 200 once the taint is gone", || {
        probe(&cluster, "/healthz").is_ok()
    });

    api.apply(Resource::Nodes, &node(json!({}), true))
        .expect("deleting");
    wait_for("/healthz 503 while the Node is being deleted", || {
        drained(&cluster)
    });
    assert!(probe(&cluster, "/livez").is_ok());
    // Traffic still flows: draining is the load balancers' decision, not ours.
    let vip = crate::support::services::WEB_VIP;
    assert!(curl(cluster.ns("pod-a1"), &format!("http://{vip}/")).is_ok());
}

//! What the Kubernetes-source tests share: publishing a service to the test API
//! server, where traffic lands, and waiting on a watch.

use std::time::Duration;

use testbed::{
    eventually,
    manifests::{render, ServiceDef},
};

use super::cluster::{curl, pod_of, Cluster};

/// Every change is programmed at once unless a test asks otherwise.
pub const NO_BATCHING: [&str; 2] = ["--min-sync-period-ms", "0"];

/// Replaces the service's objects on the API server.
pub fn publish(cluster: &Cluster, service: ServiceDef) {
    cluster
        .api()
        .apply_manifests(&render(&[service]))
        .expect("apply");
}

/// The backends `n` fresh connections from `pod` reach (sorted, deduplicated).
pub fn reached(cluster: &Cluster, pod: &str, url: &str, n: usize) -> Vec<String> {
    let mut pods: Vec<String> = (0..n)
        .filter_map(|_| curl(cluster.ns(pod), url).ok())
        .map(|b| pod_of(&b))
        .collect();
    pods.sort();
    pods.dedup();
    pods
}

pub fn wait_for(what: &str, check: impl FnMut() -> bool) {
    // Long enough for kube-rs's watch backoff after an outage (0.8 s, doubling).
    assert!(
        eventually(Duration::from_secs(30), Duration::from_millis(200), check),
        "timed out waiting for: {what}"
    );
}

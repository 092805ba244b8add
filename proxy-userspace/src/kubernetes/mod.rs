//! The Kubernetes source: Services, EndpointSlices and this node's Node from the API
//! server, watched with kube-rs (`watch`), and Events for objects that cannot be
//! programmed (`events`). It feeds the same `tracker` as the manifests source.

pub mod events;
pub mod watch;

use std::path::Path;

use anyhow::{Context as _, Result};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Every API access the agent makes, as (API group, resource, verbs): the
/// ClusterRole in `deploy/rbac.yaml` must grant exactly these (a test checks it).
pub const API_ACCESS: [(&str, &str, &[&str]); 4] = [
    ("", "services", &["list", "watch"]),
    ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
    ("", "nodes", &["list", "watch"]),
    ("events.k8s.io", "events", &["create"]),
];

/// A client for the API server: from `kubeconfig` when given, else the in-cluster
/// service account (the DaemonSet's case).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    // rustls needs one process-wide crypto provider; a second install is harmless.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster()
            .context("in-cluster configuration (not in a pod? pass --kubeconfig)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

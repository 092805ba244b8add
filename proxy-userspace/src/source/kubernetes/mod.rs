//! The Kubernetes source: Services, EndpointSlices and this node's Node from the API
//! server, watched with kube-rs (`watch`), and Events for objects that cannot be
//! programmed (`events`).

pub mod events;
pub mod watch;

use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::Node;
use kube::{
    api::ListParams,
    config::{KubeConfigOptions, Kubeconfig},
    Api,
};
use tokio::{task::JoinHandle, time::Instant};

use super::{ProblemReporter, Source, Updates};

/// The API server, in-cluster or through a kubeconfig.
pub struct KubernetesSource {
    client: kube::Client,
    node_name: String,
}

impl KubernetesSource {
    /// A source talking to the API server of `kubeconfig`, else the in-cluster one.
    /// Nothing is sent to the server before `start`.
    pub async fn connect(kubeconfig: Option<&Path>, node_name: &str) -> Result<KubernetesSource> {
        Ok(KubernetesSource {
            client: client(kubeconfig).await?,
            node_name: node_name.to_owned(),
        })
    }

    /// This node's addresses from its Node object (`node::host_addresses`), asked
    /// once a second for up to `patience` while the object is missing, has no address
    /// or cannot be read (kube-proxy too waits for it at start). Empty if the object
    /// never had an address; the last error if the last try could not read it.
    /// A list by name, as the watch lists it: no access beyond `API_ACCESS`.
    pub async fn node_addresses(&self, patience: Duration) -> Result<Vec<IpAddr>> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let by_name = ListParams::default().fields(&format!("metadata.name={}", self.node_name));
        let deadline = Instant::now() + patience;
        loop {
            let found = nodes.list(&by_name).await.map(|list| {
                list.items
                    .first()
                    .map(crate::node::host_addresses)
                    .unwrap_or_default()
            });
            match &found {
                Ok(addresses) if !addresses.is_empty() => return found.map_err(Into::into),
                Ok(_) => tracing::info!(
                    node = self.node_name,
                    "no address in this node's Node object yet"
                ),
                Err(e) => tracing::warn!(
                    node = self.node_name,
                    "reading this node's Node object: {e}"
                ),
            }
            if Instant::now() >= deadline {
                return found.context("reading this node's Node object");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

impl Source for KubernetesSource {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn problem_reporter(&self) -> Option<Box<dyn ProblemReporter>> {
        Some(Box::new(events::EventReporter::spawn(
            self.client.clone(),
            &self.node_name,
        )))
    }

    fn start(self: Box<Self>, updates: Updates) -> JoinHandle<()> {
        watch::spawn(self.client, &self.node_name, updates)
    }
}

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

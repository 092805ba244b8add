//! Watching the API server with kube-rs's watcher: a list, then a watch from its
//! resourceVersion, re-watching from the last version seen when a stream ends and
//! re-listing when the server answers 410 Gone. Errors are retried with backoff;
//! while they last, the last programmed state keeps forwarding.
//!
//! Each (re)list arrives as one `Relisted` set, so that the tracker can compare it
//! with what it holds: unchanged objects cause no work and no map writes.

use std::{fmt::Debug, time::Instant};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

/// One change of one kind of object.
#[derive(Debug)]
pub enum Change<K> {
    Applied(Box<K>),
    Deleted(Box<K>),
    /// A complete list, replacing everything of this kind.
    Relisted(Vec<K>),
}

#[derive(Debug)]
pub enum Update {
    Service(Change<Service>),
    Slice(Change<EndpointSlice>),
    /// This node's Node (listed by name).
    Node(Change<Node>),
    /// A watch failed (it is retried); `kind` is the resource.
    Trouble {
        kind: &'static str,
        error: String,
    },
}

/// An update and when it arrived (programming latency is measured from here).
pub type Received = (Update, Instant);

/// Starts the three watchers; their updates arrive on the returned channel.
pub fn spawn(client: Client, node_name: &str) -> mpsc::Receiver<Received> {
    let (tx, rx) = mpsc::channel(1024);
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let node_only = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    tokio::spawn(forward(
        services,
        watcher::Config::default(),
        tx.clone(),
        "services",
        Update::Service,
    ));
    tokio::spawn(forward(
        slices,
        watcher::Config::default(),
        tx.clone(),
        "endpointslices",
        Update::Slice,
    ));
    tokio::spawn(forward(nodes, node_only, tx, "nodes", Update::Node));
    rx
}

async fn forward<K>(
    api: Api<K>,
    config: watcher::Config,
    tx: mpsc::Sender<Received>,
    kind: &'static str,
    wrap: fn(Change<K>) -> Update,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut listing: Option<Vec<K>> = None;
    while let Some(event) = stream.next().await {
        let update = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(Vec::new());
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                listing.get_or_insert_with(Vec::new).push(object);
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                wrap(Change::Relisted(listing.take().unwrap_or_default()))
            }
            Ok(watcher::Event::Apply(object)) => wrap(Change::Applied(Box::new(object))),
            Ok(watcher::Event::Delete(object)) => wrap(Change::Deleted(Box::new(object))),
            Err(e) => Update::Trouble {
                kind,
                error: e.to_string(),
            },
        };
        if tx.send((update, Instant::now())).await.is_err() {
            return;
        }
    }
}

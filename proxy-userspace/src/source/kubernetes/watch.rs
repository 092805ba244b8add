//! Watching the API server with kube-rs's watcher: a list, then a watch from its
//! resourceVersion, re-watching from the last version seen when a stream ends and
//! re-listing when the server answers 410 Gone. Errors are retried with backoff;
//! while they last, the last programmed state keeps forwarding.
//!
//! Each (re)list arrives as one `Relisted` set, so that the tracker can compare it
//! with what it holds: unchanged objects cause no work and no map writes. Once every
//! kind was listed, the source says `Listed`.

use std::{
    fmt::Debug,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc,
    },
};

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
use tokio::task::JoinHandle;

use crate::source::{Change, ObjectChange, SourceEvent, Updates};

/// The kinds watched, one bit each in `Listing`.
const SERVICES: u8 = 1;
const ENDPOINT_SLICES: u8 = 2;
const NODES: u8 = 4;
const ALL_KINDS: u8 = SERVICES | ENDPOINT_SLICES | NODES;

/// Which kinds had their first complete list sent: when the last one has, the
/// source is `Listed`.
type Listing = Arc<AtomicU8>;

/// Starts the three watchers; the returned task ends when all of them have.
pub fn spawn(client: Client, node_name: &str, updates: Updates) -> JoinHandle<()> {
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let node_only = watcher::Config::default().fields(&format!("metadata.name={node_name}"));
    let listing = Listing::default();
    let watchers = [
        tokio::spawn(forward(
            services,
            watcher::Config::default(),
            Kind::new("services", SERVICES, ObjectChange::Service),
            updates.clone(),
            listing.clone(),
        )),
        tokio::spawn(forward(
            slices,
            watcher::Config::default(),
            Kind::new("endpointslices", ENDPOINT_SLICES, ObjectChange::Slice),
            updates.clone(),
            listing.clone(),
        )),
        tokio::spawn(forward(
            nodes,
            node_only,
            Kind::new("nodes", NODES, ObjectChange::Node),
            updates,
            listing,
        )),
    ];
    tokio::spawn(async move {
        for watcher in watchers {
            let _ = watcher.await;
        }
    })
}

/// One watched kind: its resource name, its bit, and how its changes are wrapped.
struct Kind<K> {
    resource: &'static str,
    bit: u8,
    wrap: fn(Change<K>) -> ObjectChange,
}

impl<K> Kind<K> {
    fn new(resource: &'static str, bit: u8, wrap: fn(Change<K>) -> ObjectChange) -> Kind<K> {
        Kind {
            resource,
            bit,
            wrap,
        }
    }
}

async fn forward<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind<K>,
    updates: Updates,
    listing: Listing,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut listed: Option<Vec<K>> = None;
    while let Some(event) = stream.next().await {
        let (update, relisted) = match event {
            Ok(watcher::Event::Init) => {
                listed = Some(Vec::new());
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                listed.get_or_insert_with(Vec::new).push(object);
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let all = listed.take().unwrap_or_default();
                (
                    SourceEvent::Changed((kind.wrap)(Change::Relisted(all))),
                    true,
                )
            }
            Ok(watcher::Event::Apply(object)) => (
                SourceEvent::Changed((kind.wrap)(Change::Applied(Box::new(object)))),
                false,
            ),
            Ok(watcher::Event::Delete(object)) => (
                SourceEvent::Changed((kind.wrap)(Change::Deleted(Box::new(object)))),
                false,
            ),
            Err(e) => (
                SourceEvent::Trouble {
                    what: kind.resource.to_owned(),
                    error: e.to_string(),
                },
                false,
            ),
        };
        if !updates.send(update).await {
            return;
        }
        // The bit is set after this kind's list was sent, so whichever kind completes
        // the set says `Listed` after every first list.
        if relisted {
            let before = listing.fetch_or(kind.bit, Ordering::SeqCst);
            if before != ALL_KINDS
                && before | kind.bit == ALL_KINDS
                && !updates.send(SourceEvent::Listed).await
            {
                return;
            }
        }
    }
}

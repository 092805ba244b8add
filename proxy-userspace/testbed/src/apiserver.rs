//! A small Kubernetes API server for tests, speaking the real list/watch protocol for
//! Services, EndpointSlices and Nodes (and accepting Events), so that the agent's
//! unmodified kube-rs client can be driven over real HTTP without a cluster:
//! - lists carry the store's resourceVersion, each object its own;
//! - watches stream ADDED/MODIFIED/DELETED events after the given version, BOOKMARKs
//!   when asked for, and end with an ERROR 410 (Expired) when the version is older
//!   than the retained history (`expire_watches` forces that);
//! - bearer-token authentication (401), and injected failures (`fail_next`);
//! - `restart` drops every connection and listens again on the same address, with
//!   the stored objects and history kept (as etcd keeps them).
//!
//! It listens inside a network namespace (the node's), where the agent runs.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{
    body::{Body, Bytes},
    extract::State as AxumState,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use super::netns::enter_current_thread;
use ebpf_proxy::source::manifests;

/// The token the agent's kubeconfig presents.
pub const TOKEN: &str = "ebpf-proxy-test-token";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    const ALL: [Resource; 3] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
    ];

    fn path(self) -> &'static str {
        match self {
            Resource::Services => "/api/v1/services",
            Resource::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Resource::Nodes => "/api/v1/nodes",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Resource::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Resource::Services => "Service",
            Resource::EndpointSlices => "EndpointSlice",
            Resource::Nodes => "Node",
        }
    }
}

/// One change, as watches send it.
#[derive(Clone, Debug)]
struct Change {
    revision: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

#[derive(Clone, Debug)]
enum Broadcast {
    Change(Change),
    /// Every open watch ends with ERROR 410.
    Expire,
}

#[derive(Default)]
struct Store {
    revision: u64,
    objects: BTreeMap<(Resource, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a version below this one are answered with 410 Gone.
    oldest: u64,
    faults: VecDeque<u16>,
    events: Vec<Value>,
    requests: Vec<String>,
}

struct Shared {
    store: Mutex<Store>,
    changes: broadcast::Sender<Broadcast>,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct FakeApiServer {
    shared: Arc<Shared>,
    netns: PathBuf,
    pub address: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApiServer {
    /// Starts listening on 127.0.0.1 (a free port) inside the namespace at `netns`.
    pub fn start(netns: &Path) -> Result<FakeApiServer> {
        let (changes, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changes,
        });
        let mut server = FakeApiServer {
            shared,
            netns: netns.to_owned(),
            address: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            runtime: None,
        };
        server.listen()?;
        Ok(server)
    }

    fn listen(&mut self) -> Result<()> {
        let (netns, address) = (self.netns.clone(), self.address);
        let listener = std::thread::spawn(move || -> Result<TcpListener> {
            enter_current_thread(&netns)?;
            let listener =
                TcpListener::bind(address).with_context(|| format!("binding {address}"))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the binding thread panicked"))??;
        self.address = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let router = Router::new()
            .fallback(handle)
            .with_state(self.shared.clone());
        runtime.spawn(async move {
            if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                // Watch events are small writes: without TCP_NODELAY, Nagle holds each
                // until the client's delayed ACK (40 ms). Go's servers (kube-apiserver)
                // set it too.
                let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                let _ = axum::serve(listener, router).await;
            }
        });
        self.runtime = Some(runtime);
        Ok(())
    }

    /// Drops every connection (watches end mid-stream) and listens again on the same
    /// address; objects and history are kept.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.listen()
    }

    /// Stops answering until `restart`.
    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    /// A kubeconfig that points at this server with its token.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: agent\n  user: {{token: {TOKEN}}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: agent}}\ncurrent-context: fake\n",
            self.address
        )
    }

    /// Creates or replaces an object.
    pub fn apply(&self, resource: Resource, object: &impl Serialize) -> Result<u64> {
        let mut object = serde_json::to_value(object)?;
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind());
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without name")?
            .to_owned();
        let namespace = match resource {
            Resource::Nodes => String::new(),
            _ => {
                let ns = object["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_owned();
                object["metadata"]["namespace"] = json!(ns);
                ns
            }
        };
        let mut store = self.shared.store();
        store.revision += 1;
        let revision = store.revision;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        let key = (resource, namespace, name);
        let kind = if store.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        store.objects.insert(key, object.clone());
        self.record(
            store,
            Change {
                revision,
                resource,
                kind,
                object,
            },
        );
        Ok(revision)
    }

    /// Applies every Service, EndpointSlice and Node of a manifests text.
    pub fn apply_manifests(&self, text: &str) -> Result<()> {
        let (objects, problems) = manifests::parse(text, "test manifests");
        anyhow::ensure!(problems.is_empty(), "bad test manifests: {problems:?}");
        for service in &objects.services {
            self.apply(Resource::Services, service)?;
        }
        for slice in &objects.slices {
            self.apply(Resource::EndpointSlices, slice)?;
        }
        for node in &objects.nodes {
            self.apply(Resource::Nodes, node)?;
        }
        Ok(())
    }

    /// Deletes an object (namespace `""` for Nodes); whether it existed.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let mut store = self.shared.store();
        let Some(mut object) = store
            .objects
            .remove(&(resource, namespace.into(), name.into()))
        else {
            return false;
        };
        store.revision += 1;
        let revision = store.revision;
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        self.record(
            store,
            Change {
                revision,
                resource,
                kind: "DELETED",
                object,
            },
        );
        true
    }

    fn record(&self, mut store: MutexGuard<'_, Store>, change: Change) {
        store.history.push(change.clone());
        drop(store);
        let _ = self.shared.changes.send(Broadcast::Change(change));
    }

    /// Forgets the history (as a compacted etcd) and ends every open watch with
    /// ERROR 410 Expired: clients must list again.
    pub fn expire_watches(&self) {
        let mut store = self.shared.store();
        store.history.clear();
        store.oldest = store.revision + 1;
        drop(store);
        let _ = self.shared.changes.send(Broadcast::Expire);
    }

    /// The next `count` list/watch requests fail with `status` (401, 403, 500…).
    pub fn fail_next(&self, status: u16, count: usize) {
        self.shared
            .store()
            .faults
            .extend(std::iter::repeat_n(status, count));
    }

    /// Events posted so far.
    pub fn events(&self) -> Vec<Value> {
        self.shared.store().events.clone()
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.store().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn failure(code: u16, reason: &str, message: &str) -> Response {
    let code_status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code_status,
        [("content-type", "application/json")],
        status(code, reason, message).to_string(),
    )
        .into_response()
}

/// The query's parameters, decoded.
fn query_params(uri: &Uri) -> BTreeMap<String, String> {
    form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// The object names a `metadata.name=…` field selector allows (`None`: all).
fn name_selector(params: &BTreeMap<String, String>) -> Option<String> {
    params
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name="))
        .map(str::to_owned)
}

fn selected(object: &Value, name: &Option<String>) -> bool {
    name.as_ref()
        .is_none_or(|n| object["metadata"]["name"].as_str() == Some(n))
}

async fn handle(
    AxumState(shared): AxumState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let fault = {
        let mut store = shared.store();
        store.requests.push(format!("{method} {uri}"));
        let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {TOKEN}"));
        if !authorized {
            Some(401)
        } else {
            store.faults.pop_front()
        }
    };
    match fault {
        Some(401) => return failure(401, "Unauthorized", "Unauthorized"),
        Some(403) => return failure(403, "Forbidden", "forbidden by the test"),
        Some(code) => return failure(code, "InternalError", "failure injected by the test"),
        None => {}
    }
    if method == Method::POST {
        if let Some(namespace) = path
            .strip_prefix("/apis/events.k8s.io/v1/namespaces/")
            .and_then(|rest| rest.strip_suffix("/events"))
        {
            return create_event(&shared, namespace, &body);
        }
    }
    let Some(resource) = Resource::ALL.into_iter().find(|r| r.path() == path) else {
        return failure(
            404,
            "NotFound",
            &format!("{method} {path} is not served here"),
        );
    };
    if method != Method::GET {
        return failure(405, "MethodNotAllowed", "read-only");
    }
    let params = query_params(&uri);
    if matches!(params.get("watch").map(String::as_str), Some("true" | "1")) {
        watch(shared, resource, &params)
    } else {
        list(&shared, resource, &params)
    }
}

fn create_event(shared: &Shared, namespace: &str, body: &[u8]) -> Response {
    let Ok(mut event) = serde_json::from_slice::<Value>(body) else {
        return failure(400, "BadRequest", "not JSON");
    };
    let mut store = shared.store();
    store.revision += 1;
    let prefix = event["metadata"]["generateName"]
        .as_str()
        .unwrap_or("event.")
        .to_owned();
    event["metadata"]["name"] = json!(format!("{prefix}{}", store.revision));
    event["metadata"]["namespace"] = json!(namespace);
    event["metadata"]["resourceVersion"] = json!(store.revision.to_string());
    store.events.push(event.clone());
    (
        StatusCode::CREATED,
        [("content-type", "application/json")],
        event.to_string(),
    )
        .into_response()
}

fn list(shared: &Shared, resource: Resource, params: &BTreeMap<String, String>) -> Response {
    let name = name_selector(params);
    let store = shared.store();
    let items: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((r, _, _), o)| *r == resource && selected(o, &name))
        .map(|(_, o)| o)
        .collect();
    let body = json!({
        "apiVersion": resource.api_version(),
        "kind": format!("{}List", resource.kind()),
        "metadata": {"resourceVersion": store.revision.to_string()},
        "items": items,
    });
    ([("content-type", "application/json")], body.to_string()).into_response()
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch(shared: Arc<Shared>, resource: Resource, params: &BTreeMap<String, String>) -> Response {
    let from: u64 = params
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bookmarks = params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .unwrap_or(300u64)
        .min(300);
    let name = name_selector(params);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
    // Subscribe before reading the history, so that no change falls between them.
    let mut changes = shared.changes.subscribe();
    let (backlog, expired) = {
        let store = shared.store();
        let expired = from < store.oldest;
        let backlog: Vec<Change> = store
            .history
            .iter()
            .filter(|c| c.revision > from && c.resource == resource)
            .cloned()
            .collect();
        (backlog, expired)
    };
    tokio::spawn(async move {
        let gone = status(410, "Expired", "too old resource version");
        if expired {
            let _ = tx.send(watch_line("ERROR", &gone)).await;
            return;
        }
        let mut last = from;
        for change in backlog {
            last = change.revision;
            if selected(&change.object, &name)
                && tx
                    .send(watch_line(change.kind, &change.object))
                    .await
                    .is_err()
            {
                return;
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        loop {
            let line = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = ticker.tick(), if bookmarks => {
                    let revision = shared.store().revision.max(last);
                    let bookmark = json!({"kind": resource.kind(), "apiVersion": resource.api_version(),
                                          "metadata": {"resourceVersion": revision.to_string()}});
                    watch_line("BOOKMARK", &bookmark)
                }
                message = changes.recv() => match message {
                    Ok(Broadcast::Change(change)) if change.revision > last && change.resource == resource => {
                        last = change.revision;
                        if !selected(&change.object, &name) {
                            continue;
                        }
                        watch_line(change.kind, &change.object)
                    }
                    Ok(Broadcast::Change(_)) => continue,
                    Ok(Broadcast::Expire) => {
                        let _ = tx.send(watch_line("ERROR", &gone)).await;
                        return;
                    }
                    // Fell behind: end the stream; the client watches again from `last`.
                    Err(_) => return,
                },
            };
            if tx.send(line).await.is_err() {
                return;
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    (
        [("content-type", "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

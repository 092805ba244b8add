//! Change tracking between a source and the syncer, as kube-proxy separates them: the
//! source reports objects (all of them, or one at a time), and `flush` re-translates
//! only the services whose Service or EndpointSlices changed since the last flush,
//! returning the frontends that differ. The cost of a change therefore does not grow
//! with the number of services.
//!
//! Frontends are *claimed*: when two services ask for the same one (a conflict the
//! API server normally prevents), the first by namespace/name holds it and the other
//! is reported; if the holder goes away the next claimant takes over.

mod changes;
mod few;
mod stored;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::SystemTime,
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    health,
    model::{
        DesiredState, Forwarding, Frontend, FrontendChange, FrontendKey, HealthCheck, Problem,
        Scheduler,
    },
    source::{Change, ObjectChange, Objects},
    translate::{
        service_output, slice_endpoints, slice_family, slice_service, NodeView, ServiceOutput,
        SliceEndpoint, LABEL_SERVICE_NAME, LABEL_ZONE,
    },
};
use few::Few;
use stored::StoredService;

pub use changes::{NoLocalEndpoints, ObjectChanges, TRIGGER_TIME_ANNOTATION};

pub use crate::source::ObjectKey;

/// The whole translation of an object set at once (tests, benchmarks, one-shot use);
/// the agent keeps a `ChangeTracker` to translate only what changed.
#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    pub problems: Vec<Problem>,
    /// `healthCheckNodePort` servers, by port.
    pub health_checks: BTreeMap<u16, HealthCheck>,
}

/// Translates `objects` as this node (`node_name`) sees them.
pub fn translate_all(objects: &Objects, node_name: &str) -> Translation {
    let mut tracker = ChangeTracker::new(node_name);
    tracker.replace_all(objects);
    tracker.flush();
    Translation {
        state: tracker.desired(),
        problems: tracker.all_problems(),
        health_checks: tracker.health_checks(),
    }
}

/// What the tracker keeps of an EndpointSlice: what the translation made of it (the
/// object itself is not kept: its translation is all that is ever read again).
#[derive(PartialEq)]
struct SliceRecord {
    service: Option<ObjectKey>,
    /// `addressType: IPv4` or `IPv6` (FQDN slices are reported and ignored).
    served: bool,
    endpoints: Result<Vec<SliceEndpoint>, String>,
    /// While the slice cannot be read, its last version that could (a bad update
    /// never empties a service).
    last_good: Option<Vec<SliceEndpoint>>,
}

impl SliceRecord {
    /// The endpoints in use.
    fn serving(&self) -> Option<&Vec<SliceEndpoint>> {
        self.endpoints.as_ref().ok().or(self.last_good.as_ref())
    }
}

#[derive(Default)]
pub struct Flush {
    pub changes: Vec<FrontendChange>,
    /// Problems of the objects re-translated by this flush.
    pub problems: Vec<Problem>,
    /// A health check port opened, closed or changed its answer.
    pub health_checks_changed: bool,
    /// The object changes this flush programs.
    pub applied: ObjectChanges,
    /// The trigger times of the EndpointSlice versions it programs.
    pub triggers: Vec<SystemTime>,
}

pub struct ChangeTracker {
    node_name: String,
    node: NodeView,
    services: BTreeMap<ObjectKey, StoredService>,
    slices: BTreeMap<ObjectKey, SliceRecord>,
    /// Slices by the service they name.
    slices_of: BTreeMap<ObjectKey, Few<ObjectKey>>,
    outputs: BTreeMap<ObjectKey, ServiceOutput>,
    /// Every claimant of every frontend, in namespace/name order (what each asks
    /// for is in its `outputs`).
    claims: BTreeMap<FrontendKey, Few<ObjectKey>>,
    dirty_services: BTreeSet<ObjectKey>,
    dirty_slices: BTreeSet<ObjectKey>,
    health_checks: BTreeMap<ObjectKey, (u16, HealthCheck)>,
    /// This node's Node was seen (so that a list without it says it is gone).
    node_seen: bool,
    /// See `health`: not being deleted, not tainted for deletion.
    node_eligible: bool,
    /// The Node's addresses, as `node_addresses` says.
    node_addresses: Vec<IpAddr>,
    /// Object changes since the last flush, and the slices' trigger times.
    pending: ObjectChanges,
    triggers: Vec<SystemTime>,
    /// Over every service in `outputs`.
    no_local: NoLocalEndpoints,
}

impl ChangeTracker {
    pub fn new(node_name: &str) -> ChangeTracker {
        ChangeTracker {
            node_name: node_name.to_owned(),
            node: NodeView::default(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            slices_of: BTreeMap::new(),
            outputs: BTreeMap::new(),
            claims: BTreeMap::new(),
            dirty_services: BTreeSet::new(),
            dirty_slices: BTreeSet::new(),
            health_checks: BTreeMap::new(),
            node_seen: false,
            node_eligible: true,
            node_addresses: Vec::new(),
            pending: ObjectChanges::default(),
            triggers: Vec::new(),
            no_local: NoLocalEndpoints::default(),
        }
    }

    /// The scheduler of services without the scheduler annotation (the node's flag).
    pub fn with_default_scheduler(mut self, scheduler: Scheduler) -> ChangeTracker {
        self.node.default_scheduler = scheduler;
        self
    }

    /// The forwarding of services without the forwarding annotation (the node's flag).
    pub fn with_default_forwarding(mut self, forwarding: Forwarding) -> ChangeTracker {
        self.node.default_forwarding = forwarding;
        self
    }

    /// Handle only the services labelled `service.kubernetes.io/service-proxy-name:
    /// name` (and leave the unlabelled ones to kube-proxy).
    pub fn with_service_proxy_name(mut self, name: Option<String>) -> ChangeTracker {
        self.node.proxy_name = name;
        self
    }

    /// Follows this node's Node object: its zone, for topology (a missing Node leaves
    /// it unknown; a changed zone re-translates every service), and whether the node
    /// may serve (`health`). `None`, or only other nodes: this node's Node is not
    /// there, which says it is gone only once it was seen.
    pub fn set_node(&mut self, node: Option<&Node>) {
        let own = node.filter(|n| self.is_own(n));
        match own {
            Some(node) => {
                self.node_eligible = health::node_eligible(node);
                self.node_addresses = crate::node::host_addresses(node);
            }
            None if self.node_seen => self.node_eligible = false,
            None => {}
        }
        self.node_seen |= own.is_some();
        let zone = own.and_then(|n| n.metadata.labels.as_ref()?.get(LABEL_ZONE).cloned());
        if zone != self.node.zone {
            self.node.zone = zone;
            self.dirty_services.extend(self.services.keys().cloned());
        }
    }

    /// The object changes not flushed yet.
    pub fn pending_changes(&self) -> ObjectChanges {
        self.pending
    }

    /// Services whose Local traffic policy finds no endpoint on this node, now.
    pub fn no_local_endpoints(&self) -> NoLocalEndpoints {
        self.no_local
    }

    /// Whether this node may serve, as its Node object says (see `health`).
    pub fn node_eligible(&self) -> bool {
        self.node_eligible
    }

    /// The addresses this node's Node object gave last (`node::host_addresses`;
    /// empty before it was seen; kept when it goes).
    pub fn node_addresses(&self) -> &[IpAddr] {
        &self.node_addresses
    }

    /// The health checks to serve, by port (the first service by namespace/name
    /// holds a port two of them name).
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        let mut out = BTreeMap::new();
        for (port, check) in self.health_checks.values() {
            out.entry(*port).or_insert_with(|| check.clone());
        }
        out
    }

    pub fn set_service(&mut self, service: &Service) {
        let key = ObjectKey::of(&service.metadata.namespace, &service.metadata.name);
        let stored = StoredService::new(service);
        if self.services.get(&key) != Some(&stored) {
            self.services.insert(key.clone(), stored);
            self.dirty_services.insert(key);
            self.pending.services += 1;
        }
    }

    pub fn remove_service(&mut self, key: &ObjectKey) {
        if self.services.remove(key).is_some() {
            self.dirty_services.insert(key.clone());
            self.pending.services += 1;
        }
    }

    pub fn set_slice(&mut self, slice: &EndpointSlice) {
        let key = ObjectKey::of(&slice.metadata.namespace, &slice.metadata.name);
        // The service's own key when it is tracked: one allocation for both.
        let service = slice_service(slice).map(|named| {
            self.services
                .get_key_value(&named)
                .map_or(named, |(key, _)| key.clone())
        });
        let endpoints = slice_endpoints(slice, &self.node_name);
        let last_good = match &endpoints {
            Ok(_) => None,
            Err(_) => self
                .slices
                .get(&key)
                .filter(|previous| previous.service == service)
                .and_then(|previous| previous.serving().cloned()),
        };
        let record = SliceRecord {
            service,
            served: slice_family(slice).is_some(),
            endpoints,
            last_good,
        };
        if self.slices.get(&key) == Some(&record) {
            return;
        }
        self.forget_slice(&key);
        self.pending.slices += 1;
        self.triggers.extend(changes::trigger_time(slice));
        if let Some(service) = &record.service {
            self.slices_of
                .entry(service.clone())
                .or_default()
                .insert(key.clone());
            self.dirty_services.insert(service.clone());
        }
        self.slices.insert(key.clone(), record);
        self.dirty_slices.insert(key);
    }

    pub fn remove_slice(&mut self, key: &ObjectKey) {
        if self.forget_slice(key) {
            self.pending.slices += 1;
        }
    }

    /// Drops a slice and what points at it; false when it was not tracked.
    fn forget_slice(&mut self, key: &ObjectKey) -> bool {
        let Some(record) = self.slices.remove(key) else {
            return false;
        };
        if let Some(service) = record.service {
            if let Some(slices) = self.slices_of.get_mut(&service) {
                slices.remove(key);
                if slices.is_empty() {
                    self.slices_of.remove(&service);
                }
            }
            self.dirty_services.insert(service);
        }
        true
    }

    fn is_own(&self, node: &Node) -> bool {
        node.metadata.name.as_deref() == Some(self.node_name.as_str())
    }

    /// Applies one change a source reported.
    pub fn apply(&mut self, change: ObjectChange) {
        match change {
            ObjectChange::Service(Change::Applied(service)) => self.set_service(&service),
            ObjectChange::Service(Change::Deleted(service)) => self.remove_service(&ObjectKey::of(
                &service.metadata.namespace,
                &service.metadata.name,
            )),
            ObjectChange::Service(Change::Relisted(all)) => self.replace_services(&all),
            ObjectChange::Slice(Change::Applied(slice)) => self.set_slice(&slice),
            ObjectChange::Slice(Change::Deleted(slice)) => self.remove_slice(&ObjectKey::of(
                &slice.metadata.namespace,
                &slice.metadata.name,
            )),
            ObjectChange::Slice(Change::Relisted(all)) => self.replace_slices(&all),
            // Only this node's Node matters; a file may hold others.
            ObjectChange::Node(Change::Applied(node)) if self.is_own(&node) => {
                self.set_node(Some(&node))
            }
            ObjectChange::Node(Change::Deleted(node)) if self.is_own(&node) => {
                self.node_seen = true;
                self.set_node(None)
            }
            ObjectChange::Node(Change::Applied(_) | Change::Deleted(_)) => {}
            ObjectChange::Node(Change::Relisted(all)) => self.set_node(all.first()),
        }
    }

    /// Makes the tracked set equal to `objects` (a source that always reads
    /// everything, like a manifests file): only real differences mark anything dirty.
    pub fn replace_all(&mut self, objects: &Objects) {
        self.replace_services(&objects.services);
        self.replace_slices(&objects.slices);
        let own = objects.nodes.iter().find(|n| self.is_own(n));
        self.set_node(own);
    }

    /// Makes the tracked Services equal to `services` (a full list).
    pub fn replace_services(&mut self, services: &[Service]) {
        let (gone, wanted) = differences(self.services.keys(), services, |s| &s.metadata);
        for key in gone {
            self.remove_service(&key);
        }
        for service in wanted {
            self.set_service(service);
        }
    }

    /// Makes the tracked EndpointSlices equal to `slices` (a full list).
    pub fn replace_slices(&mut self, slices: &[EndpointSlice]) {
        let (gone, wanted) = differences(self.slices.keys(), slices, |s| &s.metadata);
        for key in gone {
            self.remove_slice(&key);
        }
        for slice in wanted {
            self.set_slice(slice);
        }
    }

    /// The service holding a frontend, and what it asks for there.
    fn holder(&self, key: &FrontendKey) -> Option<(&ObjectKey, &Arc<Frontend>)> {
        let service = self.claims.get(key)?.first()?;
        let output = self.outputs.get(service)?;
        let (_, frontend) = output.claims.iter().find(|(k, _)| k == key)?;
        Some((service, frontend))
    }

    /// Re-translates what changed; returns the frontends whose programmed form differs.
    pub fn flush(&mut self) -> Flush {
        let mut flush = Flush {
            applied: std::mem::take(&mut self.pending),
            triggers: std::mem::take(&mut self.triggers),
            ..Flush::default()
        };
        for key in std::mem::take(&mut self.dirty_slices) {
            if let Some(record) = self.slices.get(&key) {
                flush.problems.extend(self.slice_problems(&key, record));
            }
        }
        let dirty = std::mem::take(&mut self.dirty_services);
        let mut outputs = Vec::new();
        let mut affected = BTreeSet::new();
        for key in dirty {
            let output = self.services.get(&key).map(|stored| {
                let endpoints: Vec<SliceEndpoint> = self
                    .slices_of
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter_map(|slice| self.slices.get(slice)?.serving())
                    .flatten()
                    .cloned()
                    .collect();
                match stored.decode(&key) {
                    Ok(service) => service_output(&service, &endpoints, &self.node),
                    Err(message) => ServiceOutput::unreadable(&key, message),
                }
            });
            let old = self
                .outputs
                .get(&key)
                .map(|o| o.claims.iter().map(|(k, _)| *k));
            affected.extend(old.into_iter().flatten());
            if let Some(output) = &output {
                affected.extend(output.claims.iter().map(|(k, _)| *k));
            }
            outputs.push((key, output));
        }
        let before: BTreeMap<FrontendKey, Option<Arc<Frontend>>> = affected
            .iter()
            .map(|k| (*k, self.holder(k).map(|(_, f)| f.clone())))
            .collect();
        let mut recomputed = Vec::new();
        for (key, output) in outputs {
            let check = output
                .as_ref()
                .and_then(|o| o.health_check.as_deref().cloned());
            if self.health_checks.get(&key) != check.as_ref() {
                flush.health_checks_changed = true;
                match check {
                    Some(check) => self.health_checks.insert(key.clone(), check),
                    None => self.health_checks.remove(&key),
                };
            }
            if let Some(old) = self.outputs.remove(&key) {
                self.no_local.remove(NoLocalEndpoints::of(&old));
                for (frontend, _) in old.claims {
                    if let Some(claimants) = self.claims.get_mut(&frontend) {
                        claimants.remove(&key);
                        if claimants.is_empty() {
                            self.claims.remove(&frontend);
                        }
                    }
                }
            }
            if let Some(output) = output {
                for (frontend, _) in &output.claims {
                    self.claims
                        .entry(*frontend)
                        .or_default()
                        .insert(key.clone());
                }
                self.no_local.add(NoLocalEndpoints::of(&output));
                self.outputs.insert(key.clone(), output);
                recomputed.push(key);
            }
        }
        for (frontend, previous) in before {
            let now = self.holder(&frontend).map(|(_, f)| f.clone());
            if now != previous {
                flush.changes.push((frontend, now));
            }
        }
        for key in recomputed {
            flush.problems.extend(self.service_problems(&key));
        }
        flush
    }

    fn slice_problems(&self, key: &ObjectKey, record: &SliceRecord) -> Vec<Problem> {
        let object = format!("EndpointSlice {key}");
        if !record.served {
            return vec![Problem::warning(
                object,
                "addressType FQDN: no proxy serves it, ignored",
            )];
        }
        match (&record.service, &record.endpoints) {
            (None, _) => vec![Problem::warning(
                object,
                format!("no {LABEL_SERVICE_NAME} label: ignored"),
            )],
            (_, Err(message)) if record.last_good.is_some() => vec![Problem::error(
                object,
                format!("{message}; its last readable version stays in use"),
            )],
            (_, Err(message)) => vec![Problem::error(object, message.clone())],
            (Some(service), Ok(_)) if !self.services.contains_key(service) => {
                vec![Problem::warning(
                    format!("EndpointSlice for {service}"),
                    "no such service: ignored",
                )]
            }
            _ => Vec::new(),
        }
    }

    /// A service's own problems and the frontends it lost to another service.
    fn service_problems(&self, key: &ObjectKey) -> Vec<Problem> {
        let Some(output) = self.outputs.get(key) else {
            return Vec::new();
        };
        let mut problems = output.problems.clone();
        for (frontend, _) in &output.claims {
            let Some((holder, held)) = self.holder(frontend) else {
                continue;
            };
            if holder != key {
                problems.push(Problem::error(
                    format!("Service {key}"),
                    format!("{frontend} already belongs to {}", held.service),
                ));
            }
        }
        problems
    }

    /// Every frontend with its holder: the whole desired state.
    pub fn desired(&self) -> DesiredState {
        DesiredState {
            frontends: self
                .claims
                .keys()
                .filter_map(|k| Some((*k, self.holder(k)?.1.clone())))
                .collect(),
        }
    }

    /// The problems of everything tracked.
    pub fn all_problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .slices
            .iter()
            .flat_map(|(key, record)| self.slice_problems(key, record))
            .collect();
        for key in self.outputs.keys() {
            problems.extend(self.service_problems(key));
        }
        problems
    }
}

/// For a full list replacing the tracked objects of one kind: the keys no longer
/// listed, and the listed objects (each once, by key).
fn differences<'t, 'a, T>(
    tracked: impl Iterator<Item = &'t ObjectKey>,
    listed: &'a [T],
    metadata: impl Fn(&T) -> &ObjectMeta,
) -> (Vec<ObjectKey>, Vec<&'a T>) {
    let wanted: BTreeMap<ObjectKey, &T> = listed
        .iter()
        .map(|o| (ObjectKey::of(&metadata(o).namespace, &metadata(o).name), o))
        .collect();
    let gone = tracked
        .filter(|k| !wanted.contains_key(*k))
        .cloned()
        .collect();
    (gone, wanted.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::manifests::parse;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn objects(services: usize) -> Objects {
        let mut yaml = String::new();
        for i in 0..services {
            yaml += &format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n  selector: {{app: s{i}}}\n  clusterIP: 10.96.0.{}\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: ns, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints: [{{addresses: [\"10.244.0.{}\"], nodeName: n}}]\n",
                i + 1,
                i + 1
            );
        }
        let (objects, problems) = parse(&yaml, "test");
        assert!(problems.is_empty(), "{problems:?}");
        objects
    }

    #[test]
    fn the_node_is_eligible_until_its_node_says_otherwise_or_goes() {
        let mut tracker = ChangeTracker::new("n");
        let mut all = objects(1);
        tracker.replace_all(&all);
        assert!(tracker.node_eligible(), "no Node object: eligible");
        let mut node = Node::default();
        node.metadata.name = Some("other".into());
        node.metadata.deletion_timestamp = Some(Time(Default::default()));
        all.nodes.push(node.clone());
        tracker.replace_all(&all);
        assert!(tracker.node_eligible(), "another node's deletion");
        node.metadata.name = Some("n".into());
        all.nodes = vec![node.clone()];
        tracker.replace_all(&all);
        assert!(!tracker.node_eligible(), "being deleted");
        node.metadata.deletion_timestamp = None;
        all.nodes = vec![node];
        tracker.replace_all(&all);
        assert!(tracker.node_eligible());
        all.nodes.clear();
        tracker.replace_all(&all);
        assert!(!tracker.node_eligible(), "gone after it was seen");
    }

    #[test]
    fn changes_are_counted_until_flushed_with_their_trigger_times() {
        let mut tracker = ChangeTracker::new("n");
        let mut all = objects(2);
        tracker.replace_all(&all);
        let four = ObjectChanges {
            services: 2,
            slices: 2,
        };
        assert_eq!(tracker.pending_changes(), four);
        assert_eq!(tracker.flush().applied, four);
        tracker.replace_all(&all);
        assert_eq!(
            tracker.pending_changes(),
            ObjectChanges::default(),
            "same objects"
        );
        all.slices[0].metadata.annotations = Some(
            [(
                TRIGGER_TIME_ANNOTATION.to_owned(),
                "2026-12-02T10:00:00Z".to_owned(),
            )]
            .into(),
        );
        all.slices[0].endpoints[0].addresses[0] = "10.244.9.9".into();
        tracker.set_slice(&all.slices[0]);
        tracker.remove_slice(&ObjectKey::of(&Some("ns".into()), &Some("s1-1".into())));
        let flush = tracker.flush();
        assert_eq!(flush.applied.slices, 2);
        let expected: SystemTime = "2026-12-02T10:00:00Z"
            .parse::<k8s_openapi::chrono::DateTime<k8s_openapi::chrono::Utc>>()
            .map(SystemTime::from)
            .expect("time");
        assert_eq!(flush.triggers, vec![expected]);
    }

    #[test]
    fn a_local_policy_without_local_endpoints_is_counted_by_policy() {
        let yaml = "---\napiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: ns}\nspec:\n  type: NodePort\n  externalTrafficPolicy: Local\n  clusterIP: 10.96.0.1\n  ports: [{name: http, port: 80, nodePort: 30080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: lb-1, namespace: ns, labels: {kubernetes.io/service-name: lb}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [\"10.244.1.2\"], nodeName: elsewhere}]\n";
        let (objects, problems) = parse(yaml, "test");
        assert!(problems.is_empty(), "{problems:?}");
        let mut tracker = ChangeTracker::new("n");
        tracker.replace_all(&objects);
        tracker.flush();
        assert_eq!(
            tracker.no_local_endpoints(),
            NoLocalEndpoints {
                internal: 0,
                external: 1
            }
        );
        // Kept as services change, not recounted: gone with its service.
        tracker.replace_all(&Objects::default());
        tracker.flush();
        assert_eq!(tracker.no_local_endpoints(), NoLocalEndpoints::default());
    }

    #[test]
    fn only_what_changed_is_returned() {
        let mut tracker = ChangeTracker::new("n");
        let mut all = objects(5);
        tracker.replace_all(&all);
        assert_eq!(tracker.flush().changes.len(), 5);
        tracker.replace_all(&all);
        assert!(
            tracker.flush().changes.is_empty(),
            "same objects, no change"
        );
        all.slices[3].endpoints[0].addresses[0] = "10.244.9.9".into();
        tracker.set_slice(&all.slices[3]);
        let flush = tracker.flush();
        assert_eq!(flush.changes.len(), 1);
        let (key, frontend) = &flush.changes[0];
        assert_eq!(key.to_string(), "TCP 10.96.0.4:80");
        assert_eq!(
            frontend.as_ref().expect("kept").endpoints[0]
                .addr
                .to_string(),
            "10.244.9.9"
        );
    }

    #[test]
    fn a_removed_service_and_its_slice_disappear() {
        let mut tracker = ChangeTracker::new("n");
        let mut all = objects(3);
        tracker.replace_all(&all);
        tracker.flush();
        all.services.remove(1);
        all.slices.remove(1);
        tracker.replace_all(&all);
        let flush = tracker.flush();
        assert_eq!(flush.changes.len(), 1);
        assert!(flush.changes[0].1.is_none());
        assert_eq!(tracker.desired().frontends.len(), 2);
    }

    #[test]
    fn a_contested_frontend_passes_to_the_next_claimant_when_its_holder_goes() {
        let mut tracker = ChangeTracker::new("n");
        let mut all = objects(2);
        // s1 claims s0's ClusterIP too.
        let mut twin = all.services[1].clone();
        twin.spec.as_mut().expect("spec").cluster_ip = Some("10.96.0.1".into());
        twin.spec.as_mut().expect("spec").cluster_ips = None;
        all.services[1] = twin;
        tracker.replace_all(&all);
        let flush = tracker.flush();
        assert_eq!(flush.changes.len(), 1);
        assert_eq!(
            flush.changes[0].1.as_ref().expect("held").service,
            "ns/s0:http"
        );
        assert!(
            flush.problems.iter().any(|p| p.object == "Service ns/s1"),
            "{:?}",
            flush.problems
        );
        tracker.remove_service(&ObjectKey::new("ns", "s0"));
        let flush = tracker.flush();
        assert_eq!(flush.changes.len(), 1);
        assert_eq!(
            flush.changes[0].1.as_ref().expect("taken over").service,
            "ns/s1:http"
        );
    }

    #[test]
    fn a_slice_that_changes_service_updates_both() {
        let mut tracker = ChangeTracker::new("n");
        let all = objects(2);
        tracker.replace_all(&all);
        tracker.flush();
        let mut moved = all.slices[0].clone();
        moved
            .metadata
            .labels
            .as_mut()
            .expect("labels")
            .insert(LABEL_SERVICE_NAME.into(), "s1".into());
        tracker.set_slice(&moved);
        let changes = tracker.flush().changes;
        assert_eq!(changes.len(), 2, "{changes:?}");
        let endpoints: Vec<usize> = changes
            .iter()
            .map(|(_, f)| f.as_ref().expect("both stay").endpoints.len())
            .collect();
        assert_eq!(endpoints, vec![0, 2]);
    }

    #[test]
    fn a_bad_update_of_a_slice_keeps_its_last_good_endpoints() {
        let mut tracker = ChangeTracker::new("n");
        let all = objects(1);
        tracker.replace_all(&all);
        tracker.flush();
        let mut bad = all.slices[0].clone();
        bad.endpoints[0].addresses[0] = "not-an-address".into();
        tracker.set_slice(&bad);
        let flush = tracker.flush();
        assert!(flush.changes.is_empty(), "{:?}", flush.changes);
        assert!(
            flush
                .problems
                .iter()
                .any(|p| p.message.contains("last readable version")),
            "{:?}",
            flush.problems
        );
        assert_eq!(
            tracker
                .desired()
                .frontends
                .values()
                .next()
                .expect("kept")
                .endpoints
                .len(),
            1
        );
    }
}

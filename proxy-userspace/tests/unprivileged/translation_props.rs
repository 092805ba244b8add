//! Property tests of the control path: random Services and EndpointSlices (from
//! small domains, so that names, addresses and ports collide often) against a plain
//! reference model of the rules, and the incremental change tracker against a fresh
//! translation. Set PROPTEST_CASES for a longer run.

use std::collections::{BTreeMap, BTreeSet};

use ebpf_proxy::{
    model::{Family, FrontendKey, Listen, Protocol},
    source::Objects,
    tracker::translate_all,
    tracker::ChangeTracker,
};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use proptest::prelude::*;

const NAMESPACES: [&str; 2] = ["a", "b"];
const NAMES: [&str; 3] = ["web", "dns", "api"];
const PORT_NAMES: [&str; 2] = ["http", "alt"];
const PROTOCOLS: [&str; 2] = ["TCP", "UDP"];

#[derive(Debug, Clone)]
struct GenService {
    ns: usize,
    name: usize,
    ip: u8,
    /// (port name, port, protocol, node port)
    ports: Vec<(usize, u16, usize, Option<u16>)>,
    headless: bool,
}

#[derive(Debug, Clone)]
struct GenSlice {
    ns: usize,
    service: usize,
    index: usize,
    port_name: usize,
    port: u16,
    protocol: usize,
    endpoints: Vec<GenEndpoint>,
}

/// (address octet, ready, serving, terminating, on this node)
type GenEndpoint = (u8, Option<bool>, Option<bool>, Option<bool>, bool);

fn service_strategy() -> impl Strategy<Value = GenService> {
    (
        0..2usize,
        0..3usize,
        1..5u8,
        prop::collection::vec(
            (
                0..2usize,
                prop::sample::select(vec![53u16, 80, 443]),
                0..2usize,
                prop::option::of(30000..30003u16),
            ),
            1..3,
        ),
        prop::bool::weighted(0.1),
    )
        .prop_map(|(ns, name, ip, ports, headless)| GenService {
            ns,
            name,
            ip,
            ports,
            headless,
        })
}

fn slice_strategy() -> impl Strategy<Value = GenSlice> {
    let endpoint = (
        1..6u8,
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        any::<bool>(),
    );
    (
        0..2usize,
        0..3usize,
        0..2usize,
        0..2usize,
        prop::sample::select(vec![8053u16, 8080]),
        0..2usize,
        prop::collection::vec(endpoint, 0..4),
    )
        .prop_map(
            |(ns, service, index, port_name, port, protocol, endpoints)| GenSlice {
                ns,
                service,
                index,
                port_name,
                port,
                protocol,
                endpoints,
            },
        )
}

fn build(services: &[GenService], slices: &[GenSlice]) -> Objects {
    let mut objects = Objects::default();
    let mut seen = BTreeSet::new();
    for s in services {
        // The API server allows one object per namespace/name.
        if !seen.insert((s.ns, s.name)) {
            continue;
        }
        let labels = s.headless.then(|| {
            BTreeMap::from([("service.kubernetes.io/headless".to_owned(), String::new())])
        });
        objects.services.push(Service {
            metadata: ObjectMeta {
                name: Some(NAMES[s.name].into()),
                namespace: Some(NAMESPACES[s.ns].into()),
                labels,
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(format!("10.96.0.{}", s.ip)),
                selector: Some(BTreeMap::from([("app".to_owned(), "x".to_owned())])),
                ports: Some(
                    s.ports
                        .iter()
                        .map(|(name, port, protocol, node_port)| ServicePort {
                            name: Some(PORT_NAMES[*name].into()),
                            port: i32::from(*port),
                            protocol: Some(PROTOCOLS[*protocol].into()),
                            node_port: node_port.map(i32::from),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut seen = BTreeSet::new();
    for s in slices {
        if !seen.insert((s.ns, s.service, s.index)) {
            continue;
        }
        objects.slices.push(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{}-{}", NAMES[s.service], s.index)),
                namespace: Some(NAMESPACES[s.ns].into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".to_owned(),
                    NAMES[s.service].to_owned(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some(PORT_NAMES[s.port_name].into()),
                port: Some(i32::from(s.port)),
                protocol: Some(PROTOCOLS[s.protocol].into()),
                ..Default::default()
            }]),
            endpoints: s
                .endpoints
                .iter()
                .map(|(octet, ready, serving, terminating, local)| Endpoint {
                    addresses: vec![format!("10.244.1.{octet}")],
                    conditions: Some(EndpointConditions {
                        ready: *ready,
                        serving: *serving,
                        terminating: *terminating,
                    }),
                    node_name: Some(if *local { "node-a" } else { "node-b" }.into()),
                    ..Default::default()
                })
                .collect(),
        });
    }
    objects
}

type Model = BTreeMap<FrontendKey, (String, Vec<(String, u16, bool)>)>;

/// The rules, written as plainly as possible: what the programs should serve.
fn reference(objects: &Objects) -> Model {
    let mut model = Model::new();
    let mut services: Vec<&Service> = objects.services.iter().collect();
    services.sort_by_key(|s| (s.metadata.namespace.clone(), s.metadata.name.clone()));
    for service in services {
        if service
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key("service.kubernetes.io/headless"))
        {
            continue;
        }
        let (ns, name) = (
            service.metadata.namespace.clone().unwrap_or_default(),
            service.metadata.name.clone().unwrap_or_default(),
        );
        let spec = service.spec.clone().unwrap_or_default();
        let ports = spec.ports.unwrap_or_default();
        let unique: BTreeSet<(i32, Option<String>)> =
            ports.iter().map(|p| (p.port, p.protocol.clone())).collect();
        let node_ports: Vec<(i32, Option<String>)> = ports
            .iter()
            .filter_map(|p| Some((p.node_port?, p.protocol.clone())))
            .collect();
        let unique_node_ports: BTreeSet<&(i32, Option<String>)> = node_ports.iter().collect();
        if unique.len() != ports.len() || unique_node_ports.len() != node_ports.len() {
            continue; // duplicate ports or nodePorts: the whole service is refused
        }
        let mut claims = Vec::new();
        for port in &ports {
            let protocol = if port.protocol.as_deref() == Some("UDP") {
                Protocol::Udp
            } else {
                Protocol::Tcp
            };
            let mut candidates = Vec::new();
            for slice in &objects.slices {
                let belongs = slice.metadata.namespace.as_deref() == Some(ns.as_str())
                    && slice
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("kubernetes.io/service-name"))
                        == Some(&name);
                let Some(slice_port) = slice
                    .ports
                    .iter()
                    .flatten()
                    .find(|p| p.name == port.name && p.protocol == port.protocol)
                else {
                    continue;
                };
                if !belongs {
                    continue;
                }
                for e in &slice.endpoints {
                    let c = e.conditions.clone().unwrap_or_default();
                    let ready = c.ready.unwrap_or(true);
                    let serving = c.serving.unwrap_or(ready);
                    let terminating = c.terminating.unwrap_or(false);
                    let remote = e.node_name.as_deref() != Some("node-a");
                    candidates.push((
                        e.addresses[0].clone(),
                        slice_port.port.unwrap_or(0) as u16,
                        remote,
                        ready,
                        serving && terminating,
                    ));
                }
            }
            let any_ready = candidates.iter().any(|c| c.3);
            let mut chosen: BTreeMap<(String, u16), bool> = BTreeMap::new();
            for (addr, p, remote, ready, fallback) in candidates {
                if (any_ready && ready) || (!any_ready && fallback) {
                    let entry = chosen.entry((addr, p)).or_insert(remote);
                    *entry = *entry && remote; // a local listing wins
                }
            }
            let mut endpoints: Vec<(String, u16, bool)> =
                chosen.into_iter().map(|((a, p), r)| (a, p, r)).collect();
            endpoints.sort_by_key(|(a, p, _)| (a.parse::<std::net::Ipv4Addr>().ok(), *p));
            let label = format!("{ns}/{name}:{}", port.name.clone().unwrap_or_default());
            let address = spec
                .cluster_ip
                .as_deref()
                .unwrap_or("")
                .parse()
                .expect("generated address");
            claims.push((
                FrontendKey {
                    listen: Listen::Address(address),
                    port: port.port as u16,
                    protocol,
                },
                (label.clone(), endpoints.clone()),
            ));
            if let Some(node_port) = port.node_port {
                claims.push((
                    FrontendKey {
                        listen: Listen::NodePort(Family::V4),
                        port: node_port as u16,
                        protocol,
                    },
                    (label, endpoints),
                ));
            }
        }
        for (key, value) in claims {
            model.entry(key).or_insert(value);
        }
    }
    model
}

fn as_model(state: &ebpf_proxy::model::DesiredState) -> Model {
    state
        .frontends
        .iter()
        .map(|(k, f)| {
            let endpoints = f
                .endpoints
                .iter()
                .map(|e| (e.addr.to_string(), e.port, e.remote))
                .collect();
            (*k, (f.service.clone(), endpoints))
        })
        .collect()
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(1000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn translation_matches_the_reference_model(
        services in prop::collection::vec(service_strategy(), 0..6),
        slices in prop::collection::vec(slice_strategy(), 0..8),
    ) {
        let objects = build(&services, &slices);
        let translation = translate_all(&objects, "node-a");
        prop_assert_eq!(as_model(&translation.state), reference(&objects));
    }

    #[test]
    fn the_incremental_tracker_agrees_with_a_fresh_translation_and_is_quiet_when_nothing_changes(
        versions in prop::collection::vec(
            (prop::collection::vec(service_strategy(), 0..5), prop::collection::vec(slice_strategy(), 0..6)),
            1..5,
        ),
    ) {
        let mut tracker = ChangeTracker::new("node-a");
        let mut programmed: BTreeMap<FrontendKey, std::sync::Arc<ebpf_proxy::model::Frontend>> =
            BTreeMap::new();
        for (services, slices) in &versions {
            let objects = build(services, slices);
            tracker.replace_all(&objects);
            // Apply the changes as the syncer would, to an in-memory "map".
            for (key, change) in tracker.flush().changes {
                match change {
                    Some(frontend) => { programmed.insert(key, frontend); }
                    None => { programmed.remove(&key); }
                }
            }
            let fresh = translate_all(&objects, "node-a").state;
            prop_assert_eq!(&programmed, &fresh.frontends);
            tracker.replace_all(&objects);
            prop_assert!(tracker.flush().changes.is_empty(), "unchanged input produced changes");
        }
    }
}

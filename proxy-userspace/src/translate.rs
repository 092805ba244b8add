//! Kubernetes objects -> desired data-path state: the one place that knows
//! kube-proxy's rules. Every source (manifests today, the API watcher later) feeds it.
//!
//! Rules implemented (each one has a unit test below):
//! 1. Services of type ExternalName, headless ones (`clusterIP: None` or the label
//!    `service.kubernetes.io/headless`) and ones labelled
//!    `service.kubernetes.io/service-proxy-name` (handed to another proxy) are ignored.
//! 2. Each service port yields one frontend per IPv4 ClusterIP, external IP and
//!    LoadBalancer ingress IP, plus a NodePort frontend when `nodePort` is set. IPv6
//!    addresses are left to a later version (ignored, not errors).
//! 3. Endpoints come from every EndpointSlice labelled `kubernetes.io/service-name`
//!    in the service's namespace, merged and de-duplicated; a slice port matches a
//!    service port by name and protocol (named target ports resolve this way).
//! 4. Conditions: a missing `ready` means ready, a missing `serving` means `ready`.
//!    Ready endpoints serve; only when none is ready do serving-but-terminating ones.
//! 5. An endpoint is local when its `nodeName` is this node; a missing `nodeName`
//!    counts as remote, so that external traffic to it is masqueraded (always correct,
//!    at the price of the client address).
//! 6. The scheduler comes from the annotation `ebpf-proxy.io/scheduler`, else the
//!    node default; an unknown name is an error for that service, which keeps the
//!    default. Weights come from `ebpf-proxy.io/weights` (`addr=weight, …`), default 1.
//! 7. Bad input is reported as a `Problem` naming the object and skips only that
//!    object: a service with an unparsable address or duplicate ports or nodePorts, a
//!    slice with an
//!    unparsable address. Two services claiming one frontend: the first by
//!    namespace/name keeps it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort},
    discovery::v1::EndpointSlice,
};

use crate::{
    manifests::Objects,
    model::{DesiredState, Endpoint, Frontend, FrontendKey, Listen, Problem, Protocol, Scheduler},
    tracker::ChangeTracker,
};

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// Per-service scheduler (`rr`, `wrr`, `lc`, `wlc`, `sh`, `dh`, `sed`, `nq`, `maglev`,
/// `random`); without it, the node's `--scheduler`.
pub const ANNOTATION_SCHEDULER: &str = "ebpf-proxy.io/scheduler";
/// Per-endpoint weights, `address=weight, …` (Kubernetes has no endpoint weights).
pub const ANNOTATION_WEIGHTS: &str = "ebpf-proxy.io/weights";

#[derive(Debug, Default)]
pub struct Translation {
    pub state: DesiredState,
    pub problems: Vec<Problem>,
}

/// One usable endpoint port of a slice, before the ready/terminating choice.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SliceEndpoint {
    endpoint: Endpoint,
    port_name: String,
    protocol: Protocol,
    ready: bool,
    serving: bool,
    terminating: bool,
}

/// What one Service asks for: its frontends (each may still lose to another
/// service claiming the same one) and what is wrong with it.
#[derive(Clone, Debug, Default)]
pub(crate) struct ServiceOutput {
    pub claims: Vec<(FrontendKey, Frontend)>,
    pub problems: Vec<Problem>,
}

/// The whole translation of an object set at once (tests, benchmarks, one-shot use);
/// the agent goes through a `ChangeTracker` to translate only what changed.
pub fn translate(objects: &Objects, node_name: &str) -> Translation {
    let mut tracker = ChangeTracker::new(node_name);
    tracker.replace_all(objects);
    tracker.flush();
    Translation {
        state: tracker.desired(),
        problems: tracker.all_problems(),
    }
}

pub(crate) fn object_name(namespace: &Option<String>, name: &Option<String>) -> (String, String) {
    (
        namespace.clone().unwrap_or_else(|| "default".into()),
        name.clone().unwrap_or_else(|| "<unnamed>".into()),
    )
}

fn namespace_of(service: &Service) -> String {
    service
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into())
}

fn parse_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        other => Err(format!(
            "protocol {other} is not supported (TCP and UDP are)"
        )),
    }
}

fn parse_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// The service a slice belongs to, by its `kubernetes.io/service-name` label.
pub(crate) fn slice_service(slice: &EndpointSlice) -> Option<(String, String)> {
    let service = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(object_name(
        &slice.metadata.namespace,
        &Some(service.clone()),
    ))
}

/// The usable endpoints of a slice; other address families give none (they are
/// another proxier's business), an unparsable slice gives an error.
pub(crate) fn slice_endpoints(
    slice: &EndpointSlice,
    node_name: &str,
) -> Result<Vec<SliceEndpoint>, String> {
    if slice.address_type != "IPv4" {
        return Ok(Vec::new());
    }
    let mut ports = Vec::new();
    for port in slice.ports.iter().flatten() {
        let number = port
            .port
            .and_then(parse_port)
            .ok_or_else(|| format!("port {:?} is not a valid port number", port.port))?;
        let protocol = parse_protocol(port.protocol.as_deref())?;
        ports.push((port.name.clone().unwrap_or_default(), protocol, number));
    }
    let mut out = Vec::new();
    for endpoint in &slice.endpoints {
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        let ready = conditions.ready.unwrap_or(true);
        let serving = conditions.serving.unwrap_or(ready);
        let terminating = conditions.terminating.unwrap_or(false);
        let remote = endpoint.node_name.as_deref() != Some(node_name);
        for address in &endpoint.addresses {
            let addr: Ipv4Addr = address
                .parse()
                .map_err(|_| format!("endpoint address {address:?} is not an IPv4 address"))?;
            for (port_name, protocol, port) in &ports {
                out.push(SliceEndpoint {
                    endpoint: Endpoint {
                        addr,
                        port: *port,
                        remote,
                        weight: 1,
                    },
                    port_name: port_name.clone(),
                    protocol: *protocol,
                    ready,
                    serving,
                    terminating,
                });
            }
        }
    }
    Ok(out)
}

fn is_ignored(service: &Service) -> bool {
    let spec = service.spec.clone().unwrap_or_default();
    let labels = service.metadata.labels.clone().unwrap_or_default();
    spec.type_.as_deref() == Some("ExternalName")
        || spec.cluster_ip.as_deref() == Some("None")
        || labels.contains_key(LABEL_SERVICE_PROXY_NAME)
        || labels.contains_key(LABEL_HEADLESS)
}

/// IPv4 addresses of a list; IPv6 ones are skipped, anything else is an error.
fn ipv4_addresses<'a>(
    what: &str,
    addresses: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for address in addresses {
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) => out.push(v4),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("{what} {address:?} is not an IP address")),
        }
    }
    Ok(out)
}

/// The addresses a service answers on, and whether each is reachable from outside.
fn service_addresses(service: &Service) -> Result<Vec<(Ipv4Addr, bool)>, String> {
    let spec = service.spec.clone().unwrap_or_default();
    let cluster_ips = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => return Err("no clusterIP".into()),
    };
    let mut out: Vec<(Ipv4Addr, bool)> = ipv4_addresses("clusterIP", &cluster_ips)?
        .into_iter()
        .map(|a| (a, false))
        .collect();
    for a in ipv4_addresses("externalIP", spec.external_ips.iter().flatten())? {
        out.push((a, true));
    }
    let ingress_ips: Vec<String> = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect();
    for a in ipv4_addresses("LoadBalancer ingress IP", &ingress_ips)? {
        out.push((a, true));
    }
    Ok(out)
}

/// The endpoints that serve one service port (rule 4).
fn serving_endpoints(
    all: &[SliceEndpoint],
    port: &ServicePort,
    protocol: Protocol,
) -> Vec<Endpoint> {
    let name = port.name.clone().unwrap_or_default();
    let matching: Vec<&SliceEndpoint> = all
        .iter()
        .filter(|e| e.port_name == name && e.protocol == protocol)
        .collect();
    let ready: BTreeSet<Endpoint> = matching
        .iter()
        .filter(|e| e.ready)
        .map(|e| e.endpoint)
        .collect();
    let chosen = if ready.is_empty() {
        matching
            .iter()
            .filter(|e| e.serving && e.terminating)
            .map(|e| e.endpoint)
            .collect()
    } else {
        ready
    };
    // One address:port listed twice (in two slices, or local and remote) is one endpoint.
    let mut seen = BTreeSet::new();
    chosen
        .into_iter()
        .filter(|e| seen.insert((e.addr, e.port)))
        .collect()
}

pub(crate) fn service_output(
    service: &Service,
    endpoints: &[SliceEndpoint],
    default_scheduler: Scheduler,
) -> ServiceOutput {
    let mut out = ServiceOutput::default();
    let name = format!(
        "{}/{}",
        namespace_of(service),
        service.metadata.name.as_deref().unwrap_or("<unnamed>")
    );
    let object = format!("Service {name}");
    if is_ignored(service) {
        return out;
    }
    let spec = service.spec.clone().unwrap_or_default();
    let addresses = match service_addresses(service) {
        Ok(a) => a,
        Err(message) => return out.failed(Problem::error(object, message)),
    };

    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let scheduler = match annotations.get(ANNOTATION_SCHEDULER).map(|s| s.parse()) {
        None => default_scheduler,
        Some(Ok(scheduler)) => scheduler,
        Some(Err(message)) => {
            out.problems.push(Problem::error(
                object.clone(),
                format!("{ANNOTATION_SCHEDULER}: {message}; using the default {default_scheduler}"),
            ));
            default_scheduler
        }
    };
    let weights = match annotations
        .get(ANNOTATION_WEIGHTS)
        .map(|w| parse_weights(w))
    {
        None => BTreeMap::new(),
        Some(Ok(weights)) => weights,
        Some(Err(message)) => {
            out.problems.push(Problem::error(
                object.clone(),
                format!("{ANNOTATION_WEIGHTS}: {message}; all weights stay 1"),
            ));
            BTreeMap::new()
        }
    };
    let mut frontends = Vec::new();
    let mut seen_ports = BTreeSet::new();
    let mut seen_node_ports = BTreeSet::new();
    for port in spec.ports.iter().flatten() {
        let protocol = match parse_protocol(port.protocol.as_deref()) {
            Ok(p) => p,
            Err(message) => return out.failed(Problem::error(object, message)),
        };
        let Some(number) = parse_port(port.port) else {
            return out.failed(Problem::error(
                object,
                format!("port {} is out of range", port.port),
            ));
        };
        if !seen_ports.insert((number, protocol)) {
            return out.failed(Problem::error(
                object,
                format!("duplicate port {number}/{protocol}"),
            ));
        }
        let node_port = match port.node_port {
            None | Some(0) => None,
            Some(n) => match parse_port(n) {
                Some(n) => Some(n),
                None => {
                    return out.failed(Problem::error(
                        object,
                        format!("nodePort {n} is out of range"),
                    ))
                }
            },
        };
        if let Some(n) = node_port {
            if !seen_node_ports.insert((n, protocol)) {
                return out.failed(Problem::error(
                    object,
                    format!("duplicate nodePort {n}/{protocol}"),
                ));
            }
        }
        let mut endpoints = serving_endpoints(endpoints, port, protocol);
        for endpoint in &mut endpoints {
            if let Some(weight) = weights.get(&endpoint.addr) {
                endpoint.weight = *weight;
            }
        }
        let service_port = format!(
            "{name}:{}",
            port.name.as_deref().unwrap_or(&number.to_string())
        );
        let mut add = |listen, port, external| {
            frontends.push((
                FrontendKey {
                    listen,
                    port,
                    protocol,
                },
                Frontend {
                    service: service_port.clone(),
                    external,
                    scheduler,
                    endpoints: endpoints.clone(),
                },
            ))
        };
        for (addr, external) in &addresses {
            add(Listen::Address(*addr), number, *external);
        }
        if let Some(node_port) = node_port {
            add(Listen::NodePort, node_port, true);
        }
    }
    if spec.selector.is_none() && endpoints.is_empty() {
        out.problems.push(Problem::warning(
            object.clone(),
            "no selector and no endpoints in its EndpointSlices: it has no backends",
        ));
    }
    out.claims = frontends;
    out
}

/// `10.244.1.2=3, 10.244.1.3=1`: endpoint address = weight (0 quiesces).
fn parse_weights(text: &str) -> Result<BTreeMap<Ipv4Addr, u32>, String> {
    text.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (addr, weight) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not address=weight"))?;
            let addr = addr
                .trim()
                .parse()
                .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
            let weight = weight
                .trim()
                .parse()
                .map_err(|_| format!("{weight:?} is not a weight"))?;
            Ok((addr, weight))
        })
        .collect()
}

impl ServiceOutput {
    /// The service is skipped whole: no claims, one error.
    fn failed(mut self, problem: Problem) -> ServiceOutput {
        self.claims.clear();
        self.problems.push(problem);
        self
    }
}

#[cfg(test)]
mod tests;

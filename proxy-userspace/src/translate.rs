//! Kubernetes objects -> desired data-path state: the one place that knows
//! kube-proxy's rules, as pure functions of the objects and the node's view. The
//! change tracker (`tracker`) calls them for what changed; every source feeds it.
//!
//! Rules implemented (each one has a unit test below):
//! 1. Services of type ExternalName, headless ones (`clusterIP: None` or the label
//!    `service.kubernetes.io/headless`) and ones labelled
//!    `service.kubernetes.io/service-proxy-name` (handed to another proxy) are ignored.
//!    With `--service-proxy-name NAME` it is the other way round, as for any
//!    alternative proxy beside kube-proxy: only services labelled `NAME` are handled.
//! 2. Each service port yields one frontend per IPv4 ClusterIP, external IP and
//!    LoadBalancer ingress IP (but not an ingress IP with `ipMode: Proxy`, which
//!    the load balancer does not deliver to: in-cluster traffic to it goes out to the
//!    load balancer), plus a NodePort frontend when `nodePort` is set. IPv6
//!    addresses are left to a later version (ignored, not errors); a service without
//!    an IPv4 ClusterIP gets no frontend at all (a warning), its NodePorts included.
//! 3. Endpoints come from every EndpointSlice labelled `kubernetes.io/service-name`
//!    in the service's namespace, merged and de-duplicated; a slice port matches a
//!    service port by name and protocol (named target ports resolve this way).
//! 4. Conditions: a missing `ready` means ready, a missing `serving` means `ready`.
//!    Ready endpoints serve; only when none is ready do serving-but-terminating ones
//!    (kube-proxy's graceful fallback). Each policy below applies this on its own set.
//! 5. An endpoint is local when its `nodeName` is this node; a missing `nodeName`
//!    counts as remote, so that external traffic to it is masqueraded (always correct,
//!    at the price of the client address).
//! 6. The scheduler comes from the annotation `ebpf-proxy.io/scheduler`, else the
//!    node default; an unknown name is an error for that service, which keeps the
//!    default. Weights come from `ebpf-proxy.io/weights` (`addr=weight, …`), default 1.
//! 7. Bad input is reported as a `Problem` naming the object and skips only that
//!    object: a service with an unparsable address, an address no service can have
//!    (loopback, unspecified, broadcast, multicast, link-local) as clusterIP,
//!    externalIP or LoadBalancer ingress IP, or duplicate ports or nodePorts; a slice
//!    with an unparsable address or port (the slice's last readable version, if any,
//!    stays in use: a bad update never empties a service). Two services claiming one
//!    frontend: the first by namespace/name keeps it.
//! 8. `externalTrafficPolicy: Local`: NodePort, LoadBalancer and external-IP frontends
//!    use only this node's endpoints (none: packets are dropped), so nothing is
//!    masqueraded and backends see the client's address; with a `healthCheckNodePort`
//!    the node answers load balancers' health checks with its local endpoint count
//!    (`healthcheck`). `Cluster` (the default) uses every endpoint. In-cluster
//!    clients (pods, the node's own sockets) of a frontend so narrowed get every
//!    endpoint, through its in-cluster view (`Listen::InCluster*`), as kube-proxy
//!    short-circuits in-cluster traffic to a service's external addresses.
//! 9. `internalTrafficPolicy: Local`: the ClusterIP frontends use only this node's
//!    endpoints (none: dropped).
//! 10. Topology, from the hints the EndpointSlice controller sets, as kube-proxy reads
//!     them: for the cluster-wide set, when every ready endpoint carries node hints
//!     (`trafficDistribution: PreferSameNode`) and at least one names this node, only
//!     those serve; else when every ready endpoint carries zone hints
//!     (`PreferClose`/`PreferSameZone`, or the older topology-aware hints) and at least
//!     one names this node's zone (the Node's `topology.kubernetes.io/zone` label),
//!     only the endpoints hinted for this zone serve; otherwise all do. The
//!     terminating fallback ignores hints, as kube-proxy's does.
//! 11. `sessionAffinity: ClientIP` binds each client to its backend in the kernel for
//!     `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800, 1..=86400)
//!     after its last new flow.
//! 12. `loadBalancerSourceRanges` restrict the LoadBalancer ingress frontends to the
//!     listed IPv4 prefixes (others dropped in the kernel; IPv6 prefixes ignored, so a
//!     list of only IPv6 prefixes admits no IPv4 client). An invalid prefix skips the
//!     service: a firewall that cannot be programmed fails closed.
//! 13. Forwarding of external traffic to endpoints on other nodes comes from the
//!     annotation `ebpf-proxy.io/forwarding` (`snat`, `dsr-ipip`), else the node's
//!     `--forwarding`. `dsr-ipip` external frontends encapsulate such flows to the
//!     endpoint; every node also gets the frontends' tunnel views (`Listen::Tunnel*`)
//!     holding its own endpoints, where the encapsulated flows arrive. Not with
//!     `externalTrafficPolicy: Local` (no flow leaves the node then), and never for
//!     SCTP ports (they are snat): SCTP is translated by programs of its own, which do
//!     not encapsulate.
//! 14. Related flows: a UDP service port 69 gets the TFTP helper on every frontend
//!     (ClusterIP, NodePort, LoadBalancer, external IP), as the kernel's TFTP helper
//!     watches port 69, so that a server's answer from a new port, and the transfer
//!     after it, are translated like the request (`proxy_common::related`). The
//!     annotation `ebpf-proxy.io/helper` replaces that default: `tftp` (every UDP
//!     port), `tftp:<port number or name>, …` (those ports), or `none`. An unknown
//!     helper is an error for that service, which keeps the default; a listed port
//!     that is no UDP port of the service is a warning. A port with a helper is
//!     forwarded with snat, never `dsr-ipip` (rule 13): related flows need both
//!     directions through the node that translated the request.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Service, ServicePort, ServiceSpec},
    discovery::v1::EndpointSlice,
};

use proxy_common::decide::MAX_WEIGHT;

use crate::model::{
    parse_scheduler, Endpoint, Family, Forwarding, Frontend, FrontendKey, HealthCheck, Helper,
    Listen, Problem, Protocol, Scheduler, SourceRange,
};
use crate::source::ObjectKey;

pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";
/// The Node label that names its zone (topology, rule 10).
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;
/// What every annotation ebpf-proxy reads begins with.
pub const ANNOTATION_PREFIX: &str = "ebpf-proxy.io/";
/// Per-service scheduler (`rr`, `wrr`, `lc`, `wlc`, `sh`, `dh`, `sed`, `nq`, `maglev`,
/// `random`); without it, the node's `--scheduler`.
pub const ANNOTATION_SCHEDULER: &str = "ebpf-proxy.io/scheduler";
/// Per-endpoint weights, `address=weight, …` (Kubernetes has no endpoint weights).
pub const ANNOTATION_WEIGHTS: &str = "ebpf-proxy.io/weights";
/// Per-service forwarding of external traffic to other nodes: `snat` or `dsr-ipip`;
/// without it, the node's `--forwarding`.
pub const ANNOTATION_FORWARDING: &str = "ebpf-proxy.io/forwarding";
/// Per-service connection-tracking helper of its UDP ports: `tftp` or `none`; without
/// it, UDP port 69 gets `tftp` (rule 14).
pub const ANNOTATION_HELPER: &str = "ebpf-proxy.io/helper";

/// One usable endpoint port of a slice, before the ready/terminating choice.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SliceEndpoint {
    endpoint: Endpoint,
    /// Shared by the slice's endpoints (the tracker keeps these for every slice).
    port_name: Arc<str>,
    protocol: Protocol,
    ready: bool,
    serving: bool,
    terminating: bool,
    /// `hints.forZones`; `None` without hints.
    zones: Option<Box<[Box<str>]>>,
    /// `hints.forNodes`, as far as this node is concerned.
    node_hint: NodeHint,
}

impl SliceEndpoint {
    /// Whether its `hints.forZones` name this zone.
    fn hinted_for(&self, zone: &str) -> bool {
        self.zones
            .as_ref()
            .is_some_and(|zones| zones.iter().any(|z| **z == *zone))
    }
}

/// An endpoint's `hints.forNodes` (set by the EndpointSlice controller for
/// `trafficDistribution: PreferSameNode`), seen from this node: only whether it names
/// this node matters, so that is all that is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeHint {
    None,
    ForThisNode,
    ForOtherNodes,
}

/// What one Service asks for: its frontends (each may still lose to another
/// service claiming the same one) and what is wrong with it.
#[derive(Clone, Debug, Default)]
pub(crate) struct ServiceOutput {
    pub claims: Vec<(FrontendKey, Arc<Frontend>)>,
    pub problems: Vec<Problem>,
    /// `healthCheckNodePort` and what it reports (rule 8).
    pub health_check: Option<Box<(u16, HealthCheck)>>,
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
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(format!(
            "protocol {other} is not supported (TCP, UDP and SCTP are)"
        )),
    }
}

fn parse_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// The service a slice belongs to, by its `kubernetes.io/service-name` label.
pub(crate) fn slice_service(slice: &EndpointSlice) -> Option<ObjectKey> {
    let service = slice.metadata.labels.as_ref()?.get(LABEL_SERVICE_NAME)?;
    Some(ObjectKey::new(
        slice.metadata.namespace.as_deref().unwrap_or("default"),
        service,
    ))
}

/// The family of a slice's `addressType`: `None` for FQDN, which no proxy serves.
pub(crate) fn slice_family(slice: &EndpointSlice) -> Option<Family> {
    Family::ALL
        .into_iter()
        .find(|family| slice.address_type == family.name())
}

/// The usable endpoints of a slice (of its `addressType`'s family; an FQDN slice gives
/// none), an unparsable slice gives an error.
pub(crate) fn slice_endpoints(
    slice: &EndpointSlice,
    node_name: &str,
) -> Result<Vec<SliceEndpoint>, String> {
    let Some(family) = slice_family(slice) else {
        return Ok(Vec::new());
    };
    let mut ports = Vec::new();
    for port in slice.ports.iter().flatten() {
        let number = port
            .port
            .and_then(parse_port)
            .ok_or_else(|| format!("port {:?} is not a valid port number", port.port))?;
        let protocol = parse_protocol(port.protocol.as_deref())?;
        ports.push((
            Arc::<str>::from(port.name.as_deref().unwrap_or_default()),
            protocol,
            number,
        ));
    }
    let mut out = Vec::new();
    for endpoint in &slice.endpoints {
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        let ready = conditions.ready.unwrap_or(true);
        let serving = conditions.serving.unwrap_or(ready);
        let terminating = conditions.terminating.unwrap_or(false);
        let remote = endpoint.node_name.as_deref() != Some(node_name);
        let zones = endpoint
            .hints
            .as_ref()
            .and_then(|h| h.for_zones.as_ref())
            .map(|zones| zones.iter().map(|z| z.name.as_str().into()).collect());
        let node_hint = match endpoint.hints.as_ref().and_then(|h| h.for_nodes.as_ref()) {
            Some(nodes) if nodes.iter().any(|n| n.name == node_name) => NodeHint::ForThisNode,
            Some(nodes) if !nodes.is_empty() => NodeHint::ForOtherNodes,
            _ => NodeHint::None,
        };
        for address in &endpoint.addresses {
            let addr = address
                .parse::<IpAddr>()
                .ok()
                .filter(|addr| Family::of(addr) == family)
                .ok_or_else(|| {
                    format!("endpoint address {address:?} is not an {family} address")
                })?;
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
                    zones: zones.clone(),
                    node_hint,
                });
            }
        }
    }
    // Kept by the tracker for as long as the slice lives: no spare capacity.
    out.shrink_to_fit();
    Ok(out)
}

fn is_ignored(service: &Service, proxy_name: Option<&str>) -> bool {
    let spec = service.spec.clone().unwrap_or_default();
    let labels = service.metadata.labels.clone().unwrap_or_default();
    spec.type_.as_deref() == Some("ExternalName")
        || spec.cluster_ip.as_deref() == Some("None")
        || labels.get(LABEL_SERVICE_PROXY_NAME).map(String::as_str) != proxy_name
        || labels.contains_key(LABEL_HEADLESS)
}

/// The addresses of a list, of either family; an unparsable one, or one no service
/// can have, is an error.
fn service_ips<'a>(
    what: &str,
    addresses: impl IntoIterator<Item = &'a String>,
) -> Result<Vec<IpAddr>, String> {
    let mut out = Vec::new();
    for address in addresses {
        let addr = address
            .parse::<IpAddr>()
            .map_err(|_| format!("{what} {address:?} is not an IP address"))?;
        if let Some(reason) = unusable_reason(addr) {
            return Err(format!("{what} {addr} is {reason}: no service can have it"));
        }
        out.push(addr);
    }
    Ok(out)
}

/// Why an address can never be a service's (rule 7): traffic to it is the node's own
/// (loopback: `127.0.0.1:10249` would hand the agent's metrics port to a pod), or it
/// names no single host.
fn unusable_reason(addr: IpAddr) -> Option<&'static str> {
    let link_local = match addr {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    if addr.is_loopback() {
        Some("a loopback address")
    } else if addr.is_unspecified() {
        Some("the unspecified address")
    } else if matches!(addr, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("the broadcast address")
    } else if addr.is_multicast() {
        Some("a multicast address")
    } else if link_local {
        Some("a link-local address")
    } else {
        None
    }
}

/// How a frontend address is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Address {
    Cluster,
    External,
    LoadBalancer,
    NodePort,
}

impl Address {
    fn describe(self) -> &'static str {
        match self {
            Address::Cluster => "clusterIP",
            Address::External => "externalIP",
            Address::LoadBalancer => "LoadBalancer ingress IP",
            Address::NodePort => "nodePort",
        }
    }
}

/// What a service answers on (rule 2): its families (those of its clusterIPs, in
/// their order), each address with how it is reached, and the addresses left out for
/// being of a family the service does not have (a warning each).
struct ServiceAddresses {
    families: Vec<Family>,
    addresses: Vec<(IpAddr, Address)>,
    other_family: Vec<(IpAddr, Address)>,
}

fn service_addresses(service: &Service) -> Result<ServiceAddresses, String> {
    let spec = service.spec.clone().unwrap_or_default();
    let cluster_ips = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) if !ip.is_empty() => vec![ip.clone()],
        _ => return Err("no clusterIP".into()),
    };
    let cluster_ips = service_ips("clusterIP", &cluster_ips)?;
    let mut families: Vec<Family> = Vec::new();
    for ip in &cluster_ips {
        let family = Family::of(ip);
        if families.contains(&family) {
            return Err(format!("clusterIPs hold two {family} addresses"));
        }
        families.push(family);
    }
    let mut candidates: Vec<(IpAddr, Address)> = cluster_ips
        .into_iter()
        .map(|a| (a, Address::Cluster))
        .collect();
    for a in service_ips("externalIP", spec.external_ips.iter().flatten())? {
        candidates.push((a, Address::External));
    }
    let ingress_ips: Vec<String> = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        // `ipMode: Proxy`: the load balancer delivers to the node's address and port
        // (or the pod's), not to this IP; the node must not short-circuit traffic to
        // it either, so in-cluster clients reach the load balancer (KEP-1860).
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.clone())
        .collect();
    for a in service_ips("LoadBalancer ingress IP", &ingress_ips)? {
        candidates.push((a, Address::LoadBalancer));
    }
    let (addresses, other_family) = candidates
        .into_iter()
        .partition(|(a, _)| families.contains(&Family::of(a)));
    Ok(ServiceAddresses {
        families,
        addresses,
        other_family,
    })
}

/// The endpoints of one service port for each traffic policy (rules 4, 8, 9, 10).
struct PolicySets {
    cluster: Vec<Endpoint>,
    local: Vec<Endpoint>,
}

/// Ready endpoints of `candidates`, else the serving-but-terminating ones (rule 4);
/// one address:port listed twice (two slices, or local and remote) is one endpoint.
fn ready_or_terminating<'a>(
    candidates: impl Iterator<Item = &'a SliceEndpoint> + Clone,
) -> Vec<Endpoint> {
    let ready: BTreeSet<Endpoint> = candidates
        .clone()
        .filter(|e| e.ready)
        .map(|e| e.endpoint)
        .collect();
    let chosen = if ready.is_empty() {
        candidates
            .filter(|e| e.serving && e.terminating)
            .map(|e| e.endpoint)
            .collect()
    } else {
        ready
    };
    let mut seen = BTreeSet::new();
    chosen
        .into_iter()
        .filter(|e| seen.insert((e.addr, e.port)))
        .collect()
}

/// Which hints decide the cluster-wide set (rule 10), as kube-proxy chooses: node
/// hints when every ready endpoint has them and one names this node, else zone hints
/// when every ready endpoint has them and one names this node's zone, else none.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology<'a> {
    SameNode,
    SameZone(&'a str),
    Anywhere,
}

impl<'a> Topology<'a> {
    fn of(endpoints: &[&SliceEndpoint], zone: Option<&'a str>) -> Topology<'a> {
        let ready = || endpoints.iter().filter(|e| e.ready);
        if ready().all(|e| e.node_hint != NodeHint::None)
            && ready().any(|e| e.node_hint == NodeHint::ForThisNode)
        {
            return Topology::SameNode;
        }
        let Some(zone) = zone.filter(|z| !z.is_empty()) else {
            return Topology::Anywhere;
        };
        let hinted_here = |e: &&&SliceEndpoint| e.hinted_for(zone);
        if ready().all(|e| e.zones.is_some()) && ready().any(|e| hinted_here(&e)) {
            Topology::SameZone(zone)
        } else {
            Topology::Anywhere
        }
    }

    /// Whether a ready endpoint serves this node under these hints.
    fn admits(self, endpoint: &SliceEndpoint) -> bool {
        match self {
            Topology::SameNode => endpoint.node_hint == NodeHint::ForThisNode,
            Topology::SameZone(zone) => endpoint.hinted_for(zone),
            Topology::Anywhere => true,
        }
    }
}

fn policy_sets(
    all: &[SliceEndpoint],
    port: &ServicePort,
    protocol: Protocol,
    zone: Option<&str>,
    family: Family,
) -> PolicySets {
    let name = port.name.clone().unwrap_or_default();
    let matching: Vec<&SliceEndpoint> = all
        .iter()
        .filter(|e| {
            *e.port_name == *name
                && e.protocol == protocol
                && Family::of(&e.endpoint.addr) == family
        })
        .collect();
    let mut cluster = Vec::new();
    let topology = Topology::of(&matching, zone);
    if topology != Topology::Anywhere {
        let hinted = |e: &&&SliceEndpoint| e.ready && topology.admits(e);
        cluster = ready_or_terminating(matching.iter().filter(hinted).copied());
    }
    if cluster.is_empty() {
        cluster = ready_or_terminating(matching.iter().copied());
    }
    let local = ready_or_terminating(matching.iter().filter(|e| !e.endpoint.remote).copied());
    PolicySets { cluster, local }
}

/// Whether a policy field (`externalTrafficPolicy`, `internalTrafficPolicy`) says
/// `Local`; anything else is `Cluster`, the default.
fn is_local(policy: &Option<String>) -> bool {
    policy.as_deref() == Some("Local")
}

/// Rule 14: the `ebpf-proxy.io/helper` annotation, which UDP ports get which helper.
#[derive(Debug, Default)]
struct HelperPorts {
    /// `tftp`: every UDP port of the service.
    every: bool,
    /// `tftp:<port>`: these service ports, by number or name.
    ports: BTreeSet<String>,
}

/// `none`, or a comma-separated list of `tftp` and `tftp:<port number or name>`.
fn parse_helpers(value: &str) -> Result<HelperPorts, String> {
    let mut out = HelperPorts::default();
    if value.trim() == Helper::None.name() {
        return Ok(out);
    }
    for item in value.split(',').map(str::trim) {
        let (helper, port) = match item.split_once(':') {
            Some((helper, port)) => (helper, Some(port.trim())),
            None => (item, None),
        };
        if helper.parse::<Helper>()? != Helper::Tftp {
            return Err(format!("{item:?}: none stands alone"));
        }
        match port {
            Some("") => return Err(format!("{item:?}: no port")),
            Some(port) => {
                out.ports.insert(port.to_owned());
            }
            None => out.every = true,
        }
    }
    Ok(out)
}

/// Rule 14: the helper of one service port (`name`, `number`), given the service's
/// annotation. Helpers watch UDP only (TFTP is the one there is).
fn port_helper(
    annotated: Option<&HelperPorts>,
    protocol: Protocol,
    number: u16,
    name: Option<&str>,
) -> Helper {
    let wanted = match annotated {
        _ if protocol != Protocol::Udp => false,
        None => number == proxy_common::TFTP_PORT,
        Some(helpers) => {
            helpers.every
                || helpers.ports.contains(&number.to_string())
                || name.is_some_and(|name| helpers.ports.contains(name))
        }
    };
    if wanted {
        Helper::Tftp
    } else {
        Helper::None
    }
}

/// Rule 11: the affinity timeout, 0 without `sessionAffinity: ClientIP`.
fn affinity_timeout(spec: &ServiceSpec) -> Result<u32, String> {
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return Ok(0);
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match timeout {
        None => Ok(DEFAULT_AFFINITY_TIMEOUT_S),
        Some(t) if (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t) => Ok(t as u32),
        Some(t) => Err(format!(
            "sessionAffinityConfig.clientIP.timeoutSeconds {t} is outside 1..={MAX_AFFINITY_TIMEOUT_S}"
        )),
    }
}

/// Rule 12: the IPv4 prefixes of `loadBalancerSourceRanges`, `None` without any.
fn source_ranges(spec: &ServiceSpec) -> Result<Option<Vec<SourceRange>>, String> {
    let Some(ranges) = spec
        .load_balancer_source_ranges
        .as_ref()
        .filter(|r| !r.is_empty())
    else {
        return Ok(None);
    };
    let mut out = BTreeSet::new();
    for range in ranges {
        out.insert(
            range
                .parse::<SourceRange>()
                .map_err(|e| format!("loadBalancerSourceRanges: {e}"))?,
        );
    }
    Ok(Some(out.into_iter().collect()))
}

/// What a service needs from the node beyond its frontends' defaults: the node's
/// scheduler default and its zone.
#[derive(Clone, Debug, Default)]
pub(crate) struct NodeView {
    pub default_scheduler: Scheduler,
    pub default_forwarding: Forwarding,
    pub zone: Option<String>,
    /// `--service-proxy-name`: handle only the services labelled with it.
    pub proxy_name: Option<String>,
}

pub(crate) fn service_output(
    service: &Service,
    endpoints: &[SliceEndpoint],
    node: &NodeView,
) -> ServiceOutput {
    let default_scheduler = node.default_scheduler;
    let mut out = ServiceOutput::default();
    let name = format!(
        "{}/{}",
        namespace_of(service),
        service.metadata.name.as_deref().unwrap_or("<unnamed>")
    );
    let object = format!("Service {name}");
    if is_ignored(service, node.proxy_name.as_deref()) {
        return out;
    }
    let spec = service.spec.clone().unwrap_or_default();
    let ServiceAddresses {
        families,
        addresses,
        other_family,
    } = match service_addresses(service) {
        Ok(a) => a,
        Err(message) => return out.failed(Problem::error(object, message)),
    };
    for (addr, kind) in other_family {
        out.problems.push(Problem::warning(
            object.clone(),
            format!(
                "{} {addr}: the service has no {} clusterIP: ignored",
                kind.describe(),
                Family::of(&addr)
            ),
        ));
    }
    let (affinity_timeout_s, ranges) = match (affinity_timeout(&spec), source_ranges(&spec)) {
        (Ok(timeout), Ok(ranges)) => (timeout, ranges),
        (Err(message), _) | (_, Err(message)) => {
            return out.failed(Problem::error(object, message))
        }
    };
    if let Some(ranges) = &ranges {
        // Fails closed where kube-proxy, whose proxier of each family reads only that
        // family's prefixes, would admit every client (README, "Dual stack").
        for &family in &families {
            let has_ingress = addresses
                .iter()
                .any(|(a, kind)| *kind == Address::LoadBalancer && Family::of(a) == family);
            if has_ingress && !ranges.iter().any(|r| r.family() == family) {
                out.problems.push(Problem::warning(
                    object.clone(),
                    format!(
                        "loadBalancerSourceRanges has no {family} prefix: its {family} \
                         ingress IPs admit no client"
                    ),
                ));
            }
        }
    }
    let external_local = is_local(&spec.external_traffic_policy);
    let internal_local = is_local(&spec.internal_traffic_policy);
    // This node's serving endpoints, by family: kube-proxy's proxier of each family
    // answers its own family's health checks with its count; one server here answers
    // both with the larger (a dual-stack pod is one endpoint, not two).
    let mut local_serving: BTreeMap<Family, BTreeSet<IpAddr>> = BTreeMap::new();

    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let scheduler = match annotations
        .get(ANNOTATION_SCHEDULER)
        .map(|s| parse_scheduler(s))
    {
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
    let forwarding = match annotations.get(ANNOTATION_FORWARDING).map(|f| f.parse()) {
        None => node.default_forwarding,
        Some(Ok(forwarding)) => forwarding,
        Some(Err(message)) => {
            out.problems.push(Problem::error(
                object.clone(),
                format!("{ANNOTATION_FORWARDING}: {message}; using snat"),
            ));
            Forwarding::Snat
        }
    };
    let helper = match annotations.get(ANNOTATION_HELPER).map(|h| parse_helpers(h)) {
        None => None,
        Some(Ok(helper)) => Some(helper),
        Some(Err(message)) => {
            out.problems.push(Problem::error(
                object.clone(),
                format!("{ANNOTATION_HELPER}: {message}; using the default"),
            ));
            None
        }
    };
    // Direct return only matters where external traffic may leave this node.
    let dsr = forwarding == Forwarding::DsrIpip && !external_local;
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
        let port_helper = port_helper(helper.as_ref(), protocol, number, port.name.as_deref());
        // Related flows need both directions through this node: a port with a helper
        // is forwarded with snat (its answers from a new port would otherwise reach
        // the client from the backend's node, and the client's own answers to them
        // arrive here, where nothing expects them).
        let dsr = dsr && port_helper == Helper::None && protocol != Protocol::Sctp;
        // Each family of the service is served apart (rule 2), from the endpoints of
        // its family, as kube-proxy runs one proxier per family.
        for &family in &families {
            let sets = policy_sets(endpoints, port, protocol, node.zone.as_deref(), family);
            local_serving
                .entry(family)
                .or_default()
                .extend(sets.local.iter().map(|e| e.addr));
            let weighted = |set: &[Endpoint]| -> Vec<Endpoint> {
                set.iter()
                    .map(|e| Endpoint {
                        weight: weights.get(&e.addr).copied().unwrap_or(e.weight),
                        ..*e
                    })
                    .collect()
            };
            let internal = weighted(if internal_local {
                &sets.local
            } else {
                &sets.cluster
            });
            let external = weighted(if external_local {
                &sets.local
            } else {
                &sets.cluster
            });
            let service_port = format!(
                "{name}:{}",
                port.name.as_deref().unwrap_or(&number.to_string())
            );
            let tunnelled = weighted(&sets.local);
            let ranges = ranges
                .as_ref()
                .map(|r| r.iter().filter(|r| r.family() == family).copied().collect());
            // In-cluster clients of an external frontend that the policy narrowed get
            // every endpoint (rule 8).
            let short_circuit = external_local && sets.cluster != sets.local;
            let cluster_wide = weighted(&sets.cluster);
            let mut add = |listen: Listen, port, address: Address| {
                // A view stays external: masqueradeAll (ClusterIPs only) leaves it alone,
                // as it leaves the frontend it is a view of.
                let in_cluster = listen.is_in_cluster();
                let is_external = address != Address::Cluster;
                let tunnel = listen.is_tunnel();
                frontends.push((
                    FrontendKey {
                        listen,
                        port,
                        protocol,
                    },
                    Arc::new(Frontend {
                        service: service_port.clone(),
                        external: is_external,
                        scheduler,
                        endpoints: match (tunnel, in_cluster, is_external) {
                            (true, _, _) => tunnelled.clone(),
                            (false, true, _) => cluster_wide.clone(),
                            (false, false, true) => external.clone(),
                            (false, false, false) => internal.clone(),
                        },
                        affinity_timeout_s,
                        source_ranges: if address == Address::LoadBalancer && !tunnel {
                            ranges.clone()
                        } else {
                            None
                        },
                        dsr: dsr && is_external && !tunnel && !in_cluster,
                        in_cluster_view: short_circuit && is_external && !tunnel && !in_cluster,
                        helper: port_helper,
                        // A policy `Local` drops (rather than refuses) only where the
                        // service has endpoints elsewhere, as kube-proxy does.
                        local_only: !tunnel
                            && !in_cluster
                            && !sets.cluster.is_empty()
                            && if is_external {
                                external_local
                            } else {
                                internal_local
                            },
                    }),
                ))
            };
            for (addr, kind) in addresses.iter().filter(|(a, _)| Family::of(a) == family) {
                add(Listen::Address(*addr), number, *kind);
                if dsr && *kind != Address::Cluster {
                    add(Listen::TunnelAddress(*addr), number, *kind);
                }
                if short_circuit && *kind != Address::Cluster {
                    add(Listen::InClusterAddress(*addr), number, *kind);
                }
            }
            if let Some(node_port) = node_port {
                // On the node's addresses of each of the service's families, as
                // kube-proxy's proxier of each family opens it.
                add(Listen::NodePort(family), node_port, Address::NodePort);
                if dsr {
                    add(Listen::TunnelNodePort(family), node_port, Address::NodePort);
                }
                if short_circuit {
                    add(
                        Listen::InClusterNodePort(family),
                        node_port,
                        Address::NodePort,
                    );
                }
            }
        }
    }
    if let Some(helpers) = &helper {
        let udp_ports: Vec<(String, Option<&str>)> = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| parse_protocol(p.protocol.as_deref()) == Ok(Protocol::Udp))
            .map(|p| (p.port.to_string(), p.name.as_deref()))
            .collect();
        for listed in &helpers.ports {
            if !udp_ports
                .iter()
                .any(|(number, name)| number == listed || *name == Some(listed.as_str()))
            {
                out.problems.push(Problem::warning(
                    object.clone(),
                    format!("{ANNOTATION_HELPER}: {listed} is no UDP port of the service"),
                ));
            }
        }
    }
    if let Some(port) = spec.health_check_node_port.filter(|_| external_local) {
        match parse_port(port) {
            Some(port) => {
                out.health_check = Some(Box::new((
                    port,
                    HealthCheck {
                        namespace: namespace_of(service),
                        name: service.metadata.name.clone().unwrap_or_default(),
                        local_endpoints: local_serving
                            .values()
                            .map(BTreeSet::len)
                            .max()
                            .unwrap_or(0),
                    },
                )))
            }
            None => out.problems.push(Problem::error(
                object.clone(),
                format!("healthCheckNodePort {port} is out of range: no health check served"),
            )),
        }
    }
    if spec.selector.is_none() && endpoints.is_empty() {
        out.problems.push(Problem::warning(
            object.clone(),
            "no selector and no endpoints in its EndpointSlices: it has no backends",
        ));
    }
    // Kept by the tracker for as long as the service lives: no spare capacity.
    frontends.shrink_to_fit();
    out.claims = frontends;
    out
}

/// `10.244.1.2=3, 10.244.1.3=1`: endpoint address = weight (0 quiesces, at most
/// 65,535 as in IPVS).
fn parse_weights(text: &str) -> Result<BTreeMap<IpAddr, u32>, String> {
    text.split(',')
        .filter(|item| !item.trim().is_empty())
        .map(|item| {
            let (addr, weight) = item
                .split_once('=')
                .ok_or_else(|| format!("{item:?} is not address=weight"))?;
            let addr = addr
                .trim()
                .parse()
                .map_err(|_| format!("{addr:?} is not an IP address"))?;
            let weight = weight
                .trim()
                .parse()
                .ok()
                .filter(|w| *w <= MAX_WEIGHT)
                .ok_or_else(|| format!("{weight:?} is not a weight (0 to {MAX_WEIGHT})"))?;
            Ok((addr, weight))
        })
        .collect()
}

impl ServiceOutput {
    /// The service is skipped whole: no claims, one error.
    fn failed(mut self, problem: Problem) -> ServiceOutput {
        self.claims.clear();
        self.health_check = None;
        self.problems.push(problem);
        self
    }

    /// A service whose kept form could not be read back: skipped, and said.
    pub fn unreadable(service: &ObjectKey, message: String) -> ServiceOutput {
        ServiceOutput::default().failed(Problem::error(format!("Service {service}"), message))
    }
}

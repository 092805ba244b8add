//! The desired state of the data path, independent of where it came from: what
//! `translate` produces from Kubernetes objects and what `sync` programs.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

pub use proxy_common::Family;

use serde::{Deserialize, Serialize};

/// A port's protocol: the data path's transports, with their numbers and names
/// (`proxy_common::Transport`).
pub use proxy_common::Transport as Protocol;

/// Where a frontend listens: an exact address, or a port on every node address; or
/// either of them as reached through an IPIP tunnel from an entry node (`dsr-ipip`),
/// where only this node's endpoints serve; or as in-cluster clients reach an
/// external frontend that `externalTrafficPolicy: Local` narrowed (every endpoint
/// serves them, as kube-proxy short-circuits them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Listen {
    Address(IpAddr),
    /// On every node address of the family: a dual-stack NodePort is two frontends.
    NodePort(Family),
    TunnelAddress(IpAddr),
    TunnelNodePort(Family),
    InClusterAddress(IpAddr),
    InClusterNodePort(Family),
}

impl Listen {
    pub fn is_tunnel(self) -> bool {
        matches!(self, Listen::TunnelAddress(_) | Listen::TunnelNodePort(_))
    }

    pub fn is_in_cluster(self) -> bool {
        matches!(
            self,
            Listen::InClusterAddress(_) | Listen::InClusterNodePort(_)
        )
    }

    pub fn family(self) -> Family {
        match self {
            Listen::Address(addr)
            | Listen::TunnelAddress(addr)
            | Listen::InClusterAddress(addr) => Family::of(&addr),
            Listen::NodePort(family)
            | Listen::TunnelNodePort(family)
            | Listen::InClusterNodePort(family) => family,
        }
    }
}

/// One virtual server, as IPVS would list it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FrontendKey {
    pub listen: Listen,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.listen {
            Listen::Address(addr) => {
                write!(f, "{} {}:{}", self.protocol, BracketedAddr(addr), self.port)
            }
            Listen::NodePort(family) => {
                write!(
                    f,
                    "{} {}:{} (NodePort)",
                    self.protocol,
                    any_address(family),
                    self.port
                )
            }
            Listen::TunnelAddress(addr) => {
                write!(
                    f,
                    "{} {}:{} (IPIP)",
                    self.protocol,
                    BracketedAddr(addr),
                    self.port
                )
            }
            Listen::TunnelNodePort(family) => {
                let any = any_address(family);
                write!(f, "{} {any}:{} (NodePort, IPIP)", self.protocol, self.port)
            }
            Listen::InClusterAddress(addr) => {
                let addr = BracketedAddr(addr);
                write!(f, "{} {addr}:{} (in-cluster)", self.protocol, self.port)
            }
            Listen::InClusterNodePort(family) => {
                let any = any_address(family);
                write!(
                    f,
                    "{} {any}:{} (NodePort, in-cluster)",
                    self.protocol, self.port
                )
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: IpAddr,
    pub port: u16,
    /// Runs on another node (external traffic to it is masqueraded).
    pub remote: bool,
    /// Relative weight for the weighted schedulers; 0 = quiesced (no new flows).
    pub weight: u32,
}

/// How a service picks the backend of a new flow: defined with its numbers and names
/// in proxy-common, which the data path dispatches on.
pub use proxy_common::Scheduler;

/// Other names schedulers go by: IPVS (and so kube-proxy's `ipvs.scheduler`) calls
/// Maglev hashing `mh`.
const SCHEDULER_ALIASES: [(&str, Scheduler); 1] = [("mh", Scheduler::Maglev)];

/// A scheduler by its name or an alias (annotation, `--scheduler`).
pub fn parse_scheduler(name: &str) -> Result<Scheduler, String> {
    let name = name.trim();
    Scheduler::ALL
        .iter()
        .copied()
        .find(|k| k.name() == name)
        .or_else(|| {
            SCHEDULER_ALIASES
                .iter()
                .find(|(alias, _)| *alias == name)
                .map(|(_, scheduler)| *scheduler)
        })
        .ok_or_else(|| {
            let known: Vec<&str> = Scheduler::ALL.iter().map(|k| k.name()).collect();
            format!("unknown scheduler {name:?} (known: {})", known.join(", "))
        })
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Frontend {
    /// `namespace/name:port-name`, for listings and logs.
    pub service: String,
    /// NodePort, LoadBalancer or external IP: reachable from outside the cluster.
    pub external: bool,
    pub scheduler: Scheduler,
    /// Sorted and without duplicates.
    pub endpoints: Vec<Endpoint>,
    /// `sessionAffinity: ClientIP` timeout in seconds; 0 = no affinity.
    pub affinity_timeout_s: u32,
    /// `loadBalancerSourceRanges` of a LoadBalancer ingress frontend: `None` admits
    /// every source, `Some` only these IPv4 prefixes (possibly none).
    pub source_ranges: Option<Vec<SourceRange>>,
    /// `dsr-ipip`: new external flows to remote endpoints are encapsulated to them.
    pub dsr: bool,
    /// A traffic policy `Local` narrowed `endpoints` to this node's.
    pub local_only: bool,
    /// An external frontend with an in-cluster view (`Listen::InCluster*`).
    pub in_cluster_view: bool,
    /// Which of its flows' packets announce related flows (`proxy_common::related`).
    pub helper: Helper,
}

/// A connection-tracking helper of a frontend (`proxy_common::related`): which packets
/// of its flows announce a related flow that the data path then translates too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Helper {
    #[default]
    None,
    /// TFTP: a read or write request announces the server's answer from a new port.
    Tftp,
}

impl Helper {
    const ALL: [Helper; 2] = [Helper::None, Helper::Tftp];

    /// As the annotation spells it.
    pub fn name(self) -> &'static str {
        match self {
            Helper::None => "none",
            Helper::Tftp => "tftp",
        }
    }

    /// The `ServiceValue::helper` number.
    pub fn number(self) -> u8 {
        match self {
            Helper::None => proxy_common::HELPER_NONE,
            Helper::Tftp => proxy_common::HELPER_TFTP,
        }
    }

    /// The helper a `ServiceValue::helper` number names (an unknown one: none).
    pub fn from_number(number: u8) -> Helper {
        Helper::ALL
            .into_iter()
            .find(|h| h.number() == number)
            .unwrap_or_default()
    }
}

impl std::str::FromStr for Helper {
    type Err = String;

    fn from_str(s: &str) -> Result<Helper, String> {
        by_name(&Helper::ALL, Helper::name, s, "helper")
    }
}

/// The one of `all` whose `name` is `text` (trimmed), or an error naming them all:
/// the parsing of the annotations' small vocabularies.
fn by_name<T: Copy>(
    all: &[T],
    name: fn(T) -> &'static str,
    text: &str,
    what: &str,
) -> Result<T, String> {
    let text = text.trim();
    all.iter()
        .copied()
        .find(|v| name(*v) == text)
        .ok_or_else(|| {
            let known: Vec<&str> = all.iter().map(|v| name(*v)).collect();
            format!("unknown {what} {text:?} ({})", known.join(", "))
        })
}

/// How a service's external traffic reaches endpoints on other nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum Forwarding {
    /// Translated here (DNAT and SNAT); replies return through this node.
    #[default]
    Snat,
    /// Encapsulated in IPIP to the endpoint, whose node translates it and answers the
    /// client directly (direct server return).
    DsrIpip,
}

impl Forwarding {
    const ALL: [Forwarding; 2] = [Forwarding::Snat, Forwarding::DsrIpip];

    /// As the flag and the annotation spell it.
    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Snat => "snat",
            Forwarding::DsrIpip => "dsr-ipip",
        }
    }
}

impl std::str::FromStr for Forwarding {
    type Err = String;

    fn from_str(s: &str) -> Result<Forwarding, String> {
        by_name(&Forwarding::ALL, Forwarding::name, s, "forwarding mode")
    }
}

/// Every node address of a family, where an address would be written.
fn any_address(family: Family) -> &'static str {
    match family {
        Family::V4 => "*",
        Family::V6 => "[*]",
    }
}

/// The address part of `address:port` as it is written: IPv6 in brackets.
struct BracketedAddr(IpAddr);

impl fmt::Display for BracketedAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "[{v6}]"),
        }
    }
}

/// A prefix of either family, `address/length`, host bits zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct SourceRange {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for SourceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl SourceRange {
    pub fn family(&self) -> Family {
        Family::of(&self.addr)
    }

    /// Whether the prefix holds `addr` (never one of the other family).
    pub fn contains(&self, addr: &IpAddr) -> bool {
        Family::of(addr) == self.family() && masked(*addr, self.len) == self.addr
    }

    /// How many addresses the prefix holds (saturating at 2^31).
    pub fn size(&self) -> u32 {
        let host_bits = u32::from(self.family().bits() - self.len);
        1u32.checked_shl(host_bits).unwrap_or(1 << 31)
    }
}

impl std::str::FromStr for SourceRange {
    type Err = String;

    /// A CIDR as Kubernetes writes it; a host address without `/` is a host prefix.
    fn from_str(text: &str) -> Result<SourceRange, String> {
        let (addr, len) = match text.trim().split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text.trim(), None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not a CIDR"))?;
        let max = Family::of(&addr).bits();
        let len: u8 = match len {
            None => max,
            Some(len) => len
                .parse()
                .ok()
                .filter(|l| *l <= max)
                .ok_or_else(|| format!("{text:?} has no valid prefix length"))?,
        };
        let addr = masked(addr, len);
        Ok(SourceRange { addr, len })
    }
}

/// `addr` with the bits beyond the first `len` cleared.
fn masked(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// A node-local health check for a service with `externalTrafficPolicy: Local`
/// (its `healthCheckNodePort`), as kube-proxy serves it to load balancers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Endpoints of the service on this node that serve (ready, or the terminating
    /// fallback).
    pub local_endpoints: usize,
}

/// A frontend to program (`Some`) or to remove (`None`). Frontends are shared, not
/// copied, between the tracker that holds them, the changes it returns and the
/// syncer: a first sync of 100,000 services made three transient copies of every
/// one, and the holes they left kept tens of MB resident.
pub type FrontendChange = (FrontendKey, Option<Arc<Frontend>>);

/// Everything the data path should serve.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Arc<Frontend>>,
}

/// Input that could not be programmed, reported instead of failing the whole sync.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// `Service default/web`, `EndpointSlice default/web-abc`, `document 3 of FILE`.
    pub object: String,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Severity {
    /// The object (or the part named) was skipped.
    Error,
    /// Programmed, but probably not what the author meant.
    Warning,
}

impl Problem {
    pub fn error(object: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Error,
            object: object.into(),
            message: message.into(),
        }
    }

    pub fn warning(object: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            severity: Severity::Warning,
            object: object.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "skipped",
            Severity::Warning => "warning",
        };
        write!(f, "{}: {level}: {}", self.object, self.message)
    }
}

//! The desired state of the data path, independent of where it came from: what
//! `translate` produces from Kubernetes objects and what `sync` programs.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proxy_common::PROTO_TCP,
            Protocol::Udp => proxy_common::PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        match n {
            proxy_common::PROTO_TCP => Some(Protocol::Tcp),
            proxy_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// Where a frontend listens: an exact address, or a port on every node address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Listen {
    Address(Ipv4Addr),
    NodePort,
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
            Listen::Address(addr) => write!(f, "{} {}:{}", self.protocol, addr, self.port),
            Listen::NodePort => write!(f, "{} *:{} (NodePort)", self.protocol, self.port),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// Runs on another node (external traffic to it is masqueraded).
    pub remote: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frontend {
    /// `namespace/name:port-name`, for listings and logs.
    pub service: String,
    /// NodePort, LoadBalancer or external IP: reachable from outside the cluster.
    pub external: bool,
    /// Sorted and without duplicates.
    pub endpoints: Vec<Endpoint>,
}

/// Everything the data path should serve.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, Frontend>,
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

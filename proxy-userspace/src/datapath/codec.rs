//! The model's form in the maps, and back: keys, backend slots, flags, names and
//! prefixes. One place for both directions, so that the writer (`sync`) and every
//! reader (`listing`, `trace`, `conntrack`, metrics) agree on every byte.

use std::net::IpAddr;

use aya::maps::lpm_trie::Key as LpmKey;
use proxy_common::{
    Addr, AddrKey, Backend, Family, ServiceKey, ServiceName, SourceRangeKey, BACKEND_F_REMOTE,
    SCOPE_ADDRESS, SCOPE_IN_CLUSTER, SCOPE_IN_CLUSTER_NODE_PORT, SCOPE_NODE_PORT, SCOPE_TUNNEL,
    SCOPE_TUNNEL_NODE_PORT, SOURCE_RANGE_ID_BITS, SVC_F_DSR, SVC_F_EXTERNAL, SVC_F_IN_CLUSTER_VIEW,
    SVC_F_LOCAL_ONLY, SVC_F_SOURCE_RANGES, SVC_F_TUNNEL,
};

use crate::model::{Endpoint, Frontend, FrontendKey, Listen, Protocol, SourceRange};

/// The `SERVICES` key of a frontend.
pub fn service_key(key: &FrontendKey) -> ServiceKey {
    let (addr, scope) = match key.listen {
        Listen::Address(a) => (Addr::from_ip(&a), SCOPE_ADDRESS),
        Listen::NodePort(_) => (Addr::ZERO, SCOPE_NODE_PORT),
        Listen::TunnelAddress(a) => (Addr::from_ip(&a), SCOPE_TUNNEL),
        Listen::TunnelNodePort(_) => (Addr::ZERO, SCOPE_TUNNEL_NODE_PORT),
        Listen::InClusterAddress(a) => (Addr::from_ip(&a), SCOPE_IN_CLUSTER),
        Listen::InClusterNodePort(_) => (Addr::ZERO, SCOPE_IN_CLUSTER_NODE_PORT),
    };
    ServiceKey {
        addr,
        port: key.port.to_be(),
        proto: key.protocol.number(),
        scope,
        family: key.listen.family().number(),
        _pad: [0; 3],
    }
}

/// The frontend a `SERVICES` key stands for (`None`: a scope, family or protocol this
/// agent does not know).
pub fn frontend_key(key: &ServiceKey) -> Option<FrontendKey> {
    let family = Family::from_number(key.family)?;
    let listen = match key.scope {
        SCOPE_ADDRESS => Listen::Address(key.addr.to_ip(family)),
        SCOPE_NODE_PORT => Listen::NodePort(family),
        SCOPE_TUNNEL => Listen::TunnelAddress(key.addr.to_ip(family)),
        SCOPE_TUNNEL_NODE_PORT => Listen::TunnelNodePort(family),
        SCOPE_IN_CLUSTER => Listen::InClusterAddress(key.addr.to_ip(family)),
        SCOPE_IN_CLUSTER_NODE_PORT => Listen::InClusterNodePort(family),
        _ => return None,
    };
    Some(FrontendKey {
        listen,
        port: u16::from_be(key.port),
        protocol: Protocol::from_number(key.proto)?,
    })
}

/// The key of an address in an address set (`NODE_ADDRS`, `SERVICE_ADDRS`).
pub fn addr_key(addr: &IpAddr) -> AddrKey {
    AddrKey::new(Addr::from_ip(addr), Family::of(addr).number())
}

/// The endpoint a backend slot of a frontend of `family` holds.
pub fn endpoint_of(backend: &Backend, family: Family) -> Endpoint {
    Endpoint {
        addr: backend.addr.to_ip(family),
        port: u16::from_be(backend.port),
        remote: backend.flags & BACKEND_F_REMOTE != 0,
        weight: backend.weight,
    }
}

/// The backend slot value of an endpoint, with its backend id.
pub fn backend_of(endpoint: &Endpoint, id: u32) -> Backend {
    Backend {
        addr: Addr::from_ip(&endpoint.addr),
        port: endpoint.port.to_be(),
        flags: if endpoint.remote { BACKEND_F_REMOTE } else { 0 },
        _pad: 0,
        id,
        weight: endpoint.weight,
    }
}

/// The `ServiceValue::flags` of a frontend.
pub fn service_flags(key: &FrontendKey, frontend: &Frontend) -> u8 {
    let mut flags = 0;
    for (set, flag) in [
        (frontend.external, SVC_F_EXTERNAL),
        (frontend.source_ranges.is_some(), SVC_F_SOURCE_RANGES),
        (frontend.dsr, SVC_F_DSR),
        (key.listen.is_tunnel(), SVC_F_TUNNEL),
        (frontend.local_only, SVC_F_LOCAL_ONLY),
        (frontend.in_cluster_view, SVC_F_IN_CLUSTER_VIEW),
    ] {
        if set {
            flags |= flag;
        }
    }
    flags
}

/// The `SOURCE_RANGES` key of one prefix of one service.
pub fn source_range_key(service_id: u32, range: &SourceRange) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        SOURCE_RANGE_ID_BITS + u32::from(range.len),
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr: Addr::from_ip(&range.addr),
        },
    )
}

/// The `SOURCE_RANGES` key that matches one address of a service (the longest
/// prefix length, as the data path looks it up).
pub fn source_range_probe(service_id: u32, addr: &IpAddr) -> LpmKey<SourceRangeKey> {
    let host = SourceRange {
        addr: *addr,
        len: Family::of(addr).bits(),
    };
    source_range_key(service_id, &host)
}

/// The service id a `SOURCE_RANGES` key belongs to.
pub fn source_range_id(key: &LpmKey<SourceRangeKey>) -> u32 {
    u32::from_be(key.data().service_id_be)
}

/// The prefix of a `SOURCE_RANGES` key of a service of `family` (the key does not say:
/// a service's family is its `SERVICES` key's).
pub fn source_range_of(key: &LpmKey<SourceRangeKey>, family: Family) -> SourceRange {
    let len = key
        .prefix_len()
        .saturating_sub(SOURCE_RANGE_ID_BITS)
        .min(u32::from(family.bits())) as u8;
    SourceRange {
        addr: key.data().addr.to_ip(family),
        len,
    }
}

/// A service's `namespace/name:port` as `SERVICE_NAMES` holds it (cut at 64 bytes).
pub fn encode_name(name: &str) -> ServiceName {
    let mut bytes = [0u8; 64];
    let len = name.len().min(bytes.len());
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    ServiceName { bytes }
}

/// The name `encode_name` stored.
pub fn decode_name(name: &ServiceName) -> String {
    let end = name
        .bytes
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(name.bytes.len());
    String::from_utf8_lossy(&name.bytes[..end]).into_owned()
}

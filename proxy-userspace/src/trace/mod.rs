//! `ebpf-proxy trace`: explains what the data path does with a packet, by reading
//! the pinned maps and deciding with the kernel's own decision code
//! (`proxy_common::decide`, see `schedule`), without sending anything or changing any
//! state (the round-robin cursor included).

mod schedule;

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use proxy_common::{
    cluster_cidrs_id,
    decide::{self, Entry, TunnelPeer},
    tcp::{self, TCP_SYN},
    tunnel_peers_id, Addr, AddrKey, AffinityKey, BackendSlotKey, CtKey, ExpectKey, Expectation,
    Family, LoadSettings, Scheduler, ServiceKey, ServiceValue, BACKEND_F_REMOTE, CONFIG_SNAT_ADDR,
    CONFIG_SNAT_ADDR6, CT_F_ENCAP, CT_F_REPLY, PROTO_ICMP, SCOPE_ADDRESS, SCOPE_IN_CLUSTER,
    SCOPE_IN_CLUSTER_NODE_PORT, SCOPE_NODE_PORT, SCOPE_TUNNEL, SCOPE_TUNNEL_NODE_PORT,
    SVC_F_EXTERNAL, SVC_F_IN_CLUSTER_VIEW, SVC_F_LOCAL_ONLY, SVC_F_SOURCE_RANGES, SVC_F_TUNNEL,
};
use serde::Serialize;

use crate::{
    conntrack::{coarse_now_ns, socket},
    datapath::{
        codec::{addr_key, endpoint_of, source_range_probe},
        tables::Tables,
    },
    model::{Helper, Protocol},
};

/// Where the packet enters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Origin {
    /// An uplink (XDP), from outside the node.
    External,
    /// A pod interface (tc).
    Pod,
    /// An uplink, encapsulated (IPIP, or ip6ip6 for IPv6) from `outer_src` to
    /// `outer_dst` (`dsr-ipip`: an entry node chose a backend here).
    Tunnel {
        outer_src: IpAddr,
        outer_dst: IpAddr,
    },
}

impl Origin {
    fn entry(self) -> Entry {
        match self {
            Origin::External => Entry::External,
            Origin::Pod => Entry::Pod,
            Origin::Tunnel { .. } => Entry::Tunnel,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Explanation {
    /// What happens, step by step, in words.
    pub steps: Vec<String>,
    pub service: Option<String>,
    pub backend: Option<SocketAddr>,
    /// The packet's (source, destination) after translation.
    pub translated: Option<(SocketAddr, SocketAddr)>,
    /// Sent unchanged inside IPIP or ip6ip6 to this address (`dsr-ipip`) instead of
    /// translated.
    pub encapsulated_to: Option<IpAddr>,
    /// Why a new flow is dropped, when it is: a policy (source ranges, a traffic
    /// policy `Local` without endpoints here) or no backend at all.
    pub dropped: Option<String>,
}

impl Explanation {
    fn drop_because(mut self, reason: String) -> Explanation {
        self.steps.push(format!("dropped: {reason}"));
        self.dropped = Some(reason);
        self
    }
}

fn slot_backend(tables: &Tables, service_id: u32, slot: u32) -> Option<proxy_common::Backend> {
    tables
        .slots
        .get(&BackendSlotKey { service_id, slot }, 0)
        .ok()
}

/// The slot `sessionAffinity` binds the client to, as the data path would find it
/// (fresh, and the slot still holding the remembered backend), with the reason.
fn bound_slot(tables: &Tables, service: &ServiceValue, key: &CtKey) -> Option<(u32, String)> {
    let memo = tables
        .affinity
        .get(
            &AffinityKey {
                client: key.src,
                service_id: service.id,
            },
            0,
        )
        .ok()?;
    let now = coarse_now_ns();
    let current = slot_backend(tables, service.id, memo.slot)?;
    (decide::affinity_fresh(service, &memo, now) && current.id == memo.backend_id).then(|| {
        (
            memo.slot,
            format!(
                "sessionAffinity: the client's last new flow was {} s ago (timeout {} s): same backend",
                now.saturating_sub(memo.last_used_ns) / 1_000_000_000,
                service.affinity_timeout_s
            ),
        )
    })
}

/// A packet of a protocol the data path never schedules (`protocol`, its IP number):
/// ICMP (an echo request to a service address is refused, `icmp::handle`; errors
/// about translated flows are rewritten, matched by the packet they quote) or any
/// other (GRE, ESP…: refused at a service address, `translate::other_protocol`).
/// Elsewhere it passes untouched.
pub fn explain_untranslated(
    tables: &Tables,
    protocol: u8,
    src: IpAddr,
    dst: IpAddr,
) -> Result<Explanation> {
    let mut out = Explanation::default();
    let (what, step) = match protocol {
        PROTO_ICMP => (
            "echo request".to_owned(),
            "ICMP is never scheduled: an error (unreachable, time exceeded) about a translated flow is translated back by the flow it quotes",
        ),
        other => (
            format!("IP protocol {other} packet"),
            "only TCP, UDP and SCTP are scheduled: a packet of another IP protocol is never translated",
        ),
    };
    out.steps.push(step.into());
    if is_refused_service_address(tables, &dst) {
        return Ok(out.drop_because(format!(
            "{dst} is a service address and not this node's: {src}'s {what} is refused with ICMP port unreachable from it, as kube-proxy's nftables mode rejects it (event refused)"
        )));
    }
    out.steps.push(format!("the {what} passes untouched"));
    Ok(out)
}

/// Whether traffic to `addr` that no frontend takes is refused: a frontend listens on
/// it and it is not a node address (`balancer::is_service_address`).
fn is_refused_service_address(tables: &Tables, addr: &IpAddr) -> bool {
    let key = addr_key(addr);
    tables.service_addrs.get(&key, 0).is_ok() && tables.node_addrs.get(&key, 0).is_err()
}

pub fn explain(
    tables: &Tables,
    settings: &LoadSettings,
    protocol: Protocol,
    src: SocketAddr,
    dst: SocketAddr,
    origin: Origin,
) -> Result<Explanation> {
    let mut out = Explanation::default();
    let family = Family::of(&dst.ip());
    if Family::of(&src.ip()) != family {
        anyhow::bail!("{src} and {dst} are of different address families");
    }
    let key = CtKey {
        src: Addr::from_ip(&src.ip()),
        dst: Addr::from_ip(&dst.ip()),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto: protocol.number(),
        family: family.number(),
        _pad: [0; 2],
    };
    let tunnel = tunnel_name(family);
    if let Origin::Tunnel {
        outer_src,
        outer_dst,
    } = origin
    {
        if Family::of(&outer_src) != family || Family::of(&outer_dst) != family {
            anyhow::bail!("a tunnel carries its own family: {tunnel}'s outer addresses are of the packet's family");
        }
        match tunnel_claim(tables, &key, outer_src, outer_dst) {
            Claim::NotOurs(why) => {
                out.steps.push(format!(
                    "{tunnel} {outer_src} -> {outer_dst}: {why}; passed encapsulated, not translated"
                ));
                return Ok(out);
            }
            Claim::Refused(why) => {
                return Ok(out.drop_because(format!(
                    "{tunnel} {outer_src} -> {outer_dst}: {why} (event tunnel_refused)"
                )))
            }
            Claim::Ours(why) => out.steps.push(format!(
                "{tunnel} {outer_src} -> {outer_dst}: {why}; decapsulated"
            )),
        }
    }
    if let Ok(entry) = tables.conntrack.get(&key, 0) {
        let idle = coarse_now_ns().saturating_sub(entry.last_seen_ns);
        if idle <= settings.ct_timeouts.of(key.proto, entry.state) {
            let direction = if entry.flags & CT_F_REPLY != 0 {
                "reply"
            } else {
                "original"
            };
            let after = key.rewritten(&entry);
            out.steps.push(format!(
                "conntrack: a tracked flow ({direction} direction, idle {} s): rewritten as the entry says",
                idle / 1_000_000_000
            ));
            // The segment is not known here: say what a new connection's would do.
            if tcp::reopens(entry.state, entry.flags, TCP_SYN) {
                out.steps.push(
                    "conntrack: the flow is closed: a new connection's first packet on this tuple (TCP SYN, SCTP INIT) opens a new flow, scheduled afresh; other packets follow the entry"
                        .into(),
                );
            }
            out.service = tables.service_name(entry.service_id);
            if entry.flags & CT_F_ENCAP != 0 && matches!(origin, Origin::Tunnel { .. }) {
                return Ok(out.drop_because(format!(
                    "out of a tunnel, a flow this node tunnels itself (its entry node's entry): never sent into a second {tunnel} (event tunnel_loop)"
                )));
            }
            if entry.flags & CT_F_ENCAP != 0 {
                let outer = entry.nat_dst.to_ip(family);
                out.steps.push(format!(
                    "dsr-ipip: encapsulated unchanged in {tunnel} to the backend {outer}"
                ));
                out.encapsulated_to = Some(outer);
                return Ok(out);
            }
            out.backend = (entry.flags & CT_F_REPLY == 0)
                .then(|| socket(entry.nat_dst, entry.nat_dport, family));
            out.translated = Some((
                socket(after.src, after.sport, family),
                socket(after.dst, after.dport, family),
            ));
            return Ok(out);
        }
        out.steps
            .push("conntrack: an entry exists but has expired: the packet opens a new flow".into());
    } else {
        out.steps.push("conntrack: no entry for this tuple".into());
    }
    let found = match origin {
        Origin::Tunnel { .. } => {
            lookup_scoped(tables, &key, (SCOPE_TUNNEL, SCOPE_TUNNEL_NODE_PORT), false)
                .map(|(v, _)| (v, "by its tunnel view (dsr-ipip)"))
        }
        Origin::Pod => {
            lookup_service(tables, &key).map(|found| in_cluster_view(tables, &key, found))
        }
        Origin::External if in_cluster_cidrs(tables, &key) => {
            lookup_service(tables, &key).map(|found| in_cluster_view(tables, &key, found))
        }
        Origin::External => lookup_service(tables, &key),
    };
    let Some((service, how)) = found else {
        // (An agent older than expectations has no such map: nothing is expected.)
        let expected = tables
            .expectations()
            .ok()
            .and_then(|map| map.get(&ExpectKey::of(&key), 0).ok());
        if let Some(expectation) = expected {
            return Ok(explain_related(tables, out, &key, expectation, origin));
        }
        if !matches!(origin, Origin::Tunnel { .. }) && is_refused_service_address(tables, &dst.ip())
        {
            return Ok(out.drop_because(format!(
                "no frontend has this port and protocol of the service address {}: refused with ICMP port unreachable, as kube-proxy's nftables mode rejects it (event refused)",
                dst.ip()
            )));
        }
        out.steps
            .push("no service has this destination: the packet passes untouched".into());
        return Ok(out);
    };
    let name = tables.service_name(service.id).unwrap_or_default();
    out.steps.push(format!("service {name}: matched {how}"));
    out.service = Some(name.clone());
    if Helper::from_number(service.helper) == Helper::Tftp && protocol == Protocol::Udp {
        out.steps.push(
            "helper tftp: a read or write request records an expectation for the server's answer from a new port (event expected)".into(),
        );
    }
    if service.flags & SVC_F_SOURCE_RANGES != 0 {
        if tables
            .source_ranges
            .get(&source_range_probe(service.id, &src.ip()), 0)
            .is_err()
        {
            return Ok(out.drop_because(format!(
                "loadBalancerSourceRanges: {} is not admitted (event source_denied)",
                src.ip()
            )));
        }
        out.steps
            .push("loadBalancerSourceRanges: the source is admitted".into());
    }
    let Some(scheduler) = Scheduler::from_number(service.scheduler) else {
        return Ok(out.drop_because(format!(
            "scheduler number {} is unknown to this data path (event no_backend)",
            service.scheduler
        )));
    };
    let upstream = match origin {
        Origin::Tunnel { outer_dst, .. } if service.flags & SVC_F_TUNNEL != 0 => {
            tunnel_backend_slot(tables, &service, outer_dst).map(|slot| {
                (
                    slot,
                    format!(
                    "the entry node chose this node's backend {outer_dst} (the outer destination)"
                ),
                )
            })
        }
        _ => None,
    };
    let predicted = match upstream.or_else(|| bound_slot(tables, &service, &key)) {
        Some(known) => Some(known),
        None => schedule::predict_slot(tables, &service, &key, scheduler)?,
    };
    let Some((slot, why)) = predicted else {
        let reason = no_backend_reason(tables, &service, &name);
        return Ok(out.drop_because(reason));
    };
    let Some(backend) = slot_backend(tables, service.id, slot) else {
        return Ok(out.drop_because(format!("slot {slot} holds no backend (event no_backend)")));
    };
    let endpoint = endpoint_of(&backend, family);
    let backend_socket = SocketAddr::new(endpoint.addr, endpoint.port);
    out.steps.push(format!(
        "scheduler {scheduler}: {why} -> backend {backend_socket} (slot {slot})"
    ));
    out.backend = Some(backend_socket);
    if decide::returns_directly(&service, &backend, origin.entry()) {
        out.steps.push(format!(
            "dsr-ipip: the backend is on another node: the packet is encapsulated unchanged in {tunnel} to {}, whose node answers the client directly",
            endpoint.addr
        ));
        out.encapsulated_to = Some(endpoint.addr);
        return Ok(out);
    }
    let masquerade_all = settings.masquerade_all != 0;
    let source =
        if decide::masquerades(&service, &backend, &key.src, origin.entry(), masquerade_all) {
            let reason = match origin {
                Origin::Pod if key.src == backend.addr => "a pod reaching itself (hairpin)",
                Origin::Pod => "masqueradeAll: every pod's flow to a ClusterIP",
                _ => "external traffic to a backend on another node",
            };
            let slot = match family {
                Family::V4 => CONFIG_SNAT_ADDR,
                Family::V6 => CONFIG_SNAT_ADDR6,
            };
            let snat = tables.config.get(&slot, 0)?.addr.to_ip(family);
            out.steps.push(format!(
                "{reason}: masqueraded to {snat} (the client's port if free)"
            ));
            SocketAddr::new(snat, src.port())
        } else {
            out.steps
                .push("no masquerade: the backend sees the client's address".into());
            src
        };
    out.translated = Some((source, backend_socket));
    Ok(out)
}

/// A packet that opens no tracked flow and no frontend's, and matches `expectation`
/// (`related::claim`): what becomes of it.
fn explain_related(
    tables: &Tables,
    mut out: Explanation,
    key: &CtKey,
    mut expectation: Expectation,
    origin: Origin,
) -> Explanation {
    let expect_key = ExpectKey::of(key);
    let service = tables.service_name(expectation.to_client.service_id);
    let announcer = service.as_deref().unwrap_or("a flow");
    if (expectation.to_backend.backend_here != 0) != (origin == Origin::Pod) {
        return out.drop_because(format!(
            "the tuple is expected ({announcer} announced it), but the backend's packets arrive from {}: spoofed (event related_clash)",
            if origin == Origin::Pod { "an uplink" } else { "its pod's interface" }
        ));
    }
    let now = coarse_now_ns();
    let announcer_lives = tables
        .conntrack
        .get(&expectation.announcer_reply(&expect_key), 0)
        .is_ok();
    if now >= expectation.expires_ns || !announcer_lives {
        out.steps.push(format!(
            "an expectation of {announcer} matches but its request's flow is gone or it expired: used up, the packet passes untouched"
        ));
        return out;
    }
    expectation.meet(key.sport, now);
    out.steps.push(format!(
        "related flow: {announcer} announced it (a TFTP request; the expectation expires in {} s): opened with that flow's translations, the backend's new port kept (event related)",
        expectation.expires_ns.saturating_sub(now) / 1_000_000_000
    ));
    let after = key.rewritten(&expectation.to_client);
    let family = Family::from_number(key.family).unwrap_or_default();
    out.service = service;
    out.translated = Some((
        socket(after.src, after.sport, family),
        socket(after.dst, after.dport, family),
    ));
    out
}

/// Why a service gives a new flow no backend: a traffic policy `Local` on a node
/// without local endpoints (naming the endpoints elsewhere), or none at all.
fn no_backend_reason(tables: &Tables, service: &ServiceValue, name: &str) -> String {
    if service.flags & SVC_F_LOCAL_ONLY == 0 {
        return "the service has no endpoints: refused with ICMP port unreachable from the service address, as kube-proxy rejects (event refused)".into();
    }
    let policy = if service.flags & SVC_F_EXTERNAL != 0 {
        "externalTrafficPolicy"
    } else {
        "internalTrafficPolicy"
    };
    let elsewhere = endpoints_elsewhere(tables, name);
    let where_ = if elsewhere.is_empty() {
        "and none elsewhere either".to_owned()
    } else {
        format!("its endpoints are on other nodes: {}", elsewhere.join(", "))
    };
    format!("{policy}: Local and no endpoint on this node ({where_}) (event no_backend)")
}

/// The remote endpoints of the service's other frontends (those no traffic policy
/// narrowed), by `namespace/name:port`.
fn endpoints_elsewhere(tables: &Tables, name: &str) -> Vec<String> {
    let mut found = std::collections::BTreeSet::new();
    for (key, value) in tables.services.iter().filter_map(Result::ok) {
        let same = tables.service_name(value.id).as_deref() == Some(name);
        let Some(family) = Family::from_number(key.family) else {
            continue;
        };
        if !same || value.flags & (SVC_F_LOCAL_ONLY | SVC_F_TUNNEL) != 0 {
            continue;
        }
        for slot in 0..value.backend_count {
            if let Some(backend) = slot_backend(tables, value.id, slot) {
                if backend.flags & BACKEND_F_REMOTE != 0 {
                    let endpoint = endpoint_of(&backend, family);
                    found.insert(SocketAddr::new(endpoint.addr, endpoint.port).to_string());
                }
            }
        }
    }
    found.into_iter().collect()
}

/// The slot of the service's backend at `addr`, as the kernel's search finds it.
/// Whether the uplink program decapsulates a tunnelled packet (`tunnel::arrival`).
enum Claim {
    NotOurs(&'static str),
    Refused(&'static str),
    Ours(&'static str),
}

/// What the family's `dsr-ipip` flows travel in.
pub fn tunnel_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPIP",
        Family::V6 => "ip6ip6",
    }
}

fn tunnel_claim(tables: &Tables, key: &CtKey, outer_src: IpAddr, outer_dst: IpAddr) -> Claim {
    let Some((service, _)) =
        lookup_scoped(tables, key, (SCOPE_TUNNEL, SCOPE_TUNNEL_NODE_PORT), false)
    else {
        return Claim::NotOurs("the inner packet is for no dsr-ipip frontend");
    };
    let to_node = tables.node_addrs.get(&addr_key(&outer_dst), 0).is_ok();
    if !to_node && tunnel_backend_slot(tables, &service, outer_dst).is_none() {
        return Claim::NotOurs("addressed to neither this node nor a backend of the frontend here");
    }
    let peer = TunnelPeer::from_entry(
        tables
            .source_ranges
            .get(
                &source_range_probe(tunnel_peers_id(Family::of(&outer_src)), &outer_src),
                0,
            )
            .ok(),
    );
    let admitted = decide::admits_tunnel(peer, &service);
    match peer {
        TunnelPeer::Trusted => Claim::Ours("the outer source is a trusted tunnel peer"),
        TunnelPeer::Unverified if admitted => {
            Claim::Ours("no trusted tunnel peers are configured: any outer source may tunnel")
        }
        TunnelPeer::Unverified => Claim::Refused(
            "the frontend has loadBalancerSourceRanges and no trusted tunnel peers are configured, so the inner source cannot be believed",
        ),
        TunnelPeer::Refused => Claim::Refused("the outer source is not in --ipip-trusted-sources"),
    }
}

fn tunnel_backend_slot(tables: &Tables, service: &ServiceValue, addr: IpAddr) -> Option<u32> {
    let wanted = Addr::from_ip(&addr);
    (0..service.backend_count.min(schedule::scan_bound()))
        .find(|slot| slot_backend(tables, service.id, *slot).is_some_and(|b| b.addr == wanted))
}

fn lookup_service(tables: &Tables, key: &CtKey) -> Option<(ServiceValue, &'static str)> {
    lookup_scoped(tables, key, (SCOPE_ADDRESS, SCOPE_NODE_PORT), true)
}

/// Whether the source lies in the cluster's pod CIDRs (`--cluster-cidr`).
fn in_cluster_cidrs(tables: &Tables, key: &CtKey) -> bool {
    let Some(family) = Family::from_number(key.family) else {
        return false;
    };
    let probe = source_range_probe(cluster_cidrs_id(family), &key.src.to_ip(family));
    tables.source_ranges.get(&probe, 0).is_ok()
}

/// An in-cluster client of an external frontend that `externalTrafficPolicy: Local`
/// narrowed gets its in-cluster view, every endpoint (`balancer::lookup_service_from`).
fn in_cluster_view(
    tables: &Tables,
    key: &CtKey,
    found: (ServiceValue, &'static str),
) -> (ServiceValue, &'static str) {
    if found.0.flags & SVC_F_IN_CLUSTER_VIEW == 0 {
        return found;
    }
    lookup_scoped(tables, key, (SCOPE_IN_CLUSTER, SCOPE_IN_CLUSTER_NODE_PORT), true)
        .map(|(view, _)| {
            (
                view,
                "by its in-cluster view: every endpoint, as kube-proxy short-circuits in-cluster clients (pods, the node, the cluster CIDRs) to external addresses",
            )
        })
        .unwrap_or(found)
}

/// The exact frontend in scope `scopes.0`, else the port-only one in `scopes.1` (only
/// for this node's addresses when `node_only`), as the kernel looks them up.
fn lookup_scoped(
    tables: &Tables,
    key: &CtKey,
    scopes: (u8, u8),
    node_only: bool,
) -> Option<(ServiceValue, &'static str)> {
    let exact = ServiceKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        scope: scopes.0,
        family: key.family,
        _pad: [0; 3],
    };
    if let Ok(value) = tables.services.get(&exact, 0) {
        return Some((value, "by address and port"));
    }
    if node_only {
        let dst = AddrKey::new(key.dst, key.family);
        let flags = tables.node_addrs.get(&dst, 0).ok()?;
        if !flags.answers_node_ports() {
            return None;
        }
    }
    let port_only = ServiceKey {
        addr: Addr::ZERO,
        scope: scopes.1,
        ..exact
    };
    tables
        .services
        .get(&port_only, 0)
        .ok()
        .map(|v| (v, "as a NodePort on a node address"))
}

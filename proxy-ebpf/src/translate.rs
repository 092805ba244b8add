//! The per-packet pipeline shared by the XDP and tc hooks: parse, follow a tracked
//! flow, or open a new one (schedule, record both directions, rewrite).

use aya_ebpf::bindings::{BPF_ANY, BPF_NOEXIST};
use proxy_common::{
    Addr, CtEntry, CtKey, ServiceValue, ACCT_ACTIVE, BACKEND_F_REMOTE, CONFIG_SNAT_ADDR,
    CT_ESTABLISHED, CT_F_NODE_SOURCE, CT_F_REPLY, CT_F_REWRITE_DST, CT_F_REWRITE_SRC, CT_F_SNAT,
    CT_SYN_SENT, EV_CT_INSERT_FAILED, EV_CT_MIDFLOW_MISS, EV_CT_RACE_LOST, EV_FRAGMENT,
    EV_MALFORMED, EV_NO_BACKEND, EV_SNAT_EXHAUSTED, EV_SOURCE_DENIED, EV_TRANSLATED, PROTO_TCP,
};

use crate::{
    affinity,
    balancer::{self, Choice},
    conntrack::{self, Lookup},
    counters::{self, Direction},
    maps::{CONNTRACK, NODE_CONFIG},
    packet::{Packet, IP_DST, IP_SRC, L4_DPORT, L4_SPORT},
    parse::{self, Flow, Skip, TCP_ACK, TCP_RST, TCP_SYN},
    source_ranges,
};

/// Where the packet entered the node; decides masquerading.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From outside the node, on an uplink (XDP).
    External,
    /// From a local pod, on its host-side interface (tc ingress).
    Pod,
}

pub enum Verdict {
    /// Not ours, or nothing to do: let the packet continue unchanged.
    Pass,
    Drop,
    /// Rewritten: the tuple it now carries, its IP length, and whether its new
    /// source is a node address (`CT_F_NODE_SOURCE`).
    Translated(CtKey, u16, bool),
}

const EEXIST: i32 = -17;
/// Ports tried for a masqueraded flow before giving up: the client's own port, then
/// hash-derived ones.
const SNAT_ATTEMPTS: u32 = 8;
const SNAT_PORT_MIN: u32 = 1024;

#[inline(always)]
pub fn handle<P: Packet>(pkt: &P, origin: Origin) -> Verdict {
    let flow = match parse::parse(pkt) {
        Ok(flow) => flow,
        Err(Skip::NotOurs) => return Verdict::Pass,
        Err(Skip::Malformed) => {
            counters::event(EV_MALFORMED);
            return Verdict::Pass;
        }
        Err(Skip::Fragment) => {
            counters::event(EV_FRAGMENT);
            return Verdict::Pass;
        }
    };
    let now = conntrack::now_ns();
    match conntrack::lookup(&flow.key, now) {
        Lookup::Live(entry_ptr) => {
            // SAFETY: copy of a live map value.
            let entry = unsafe { *entry_ptr };
            conntrack::observe(&flow, entry_ptr, &entry, now);
            return follow(pkt, &flow, &entry, false);
        }
        Lookup::Stale(entry_ptr) => {
            conntrack::retire(entry_ptr);
            let _ = CONNTRACK.remove(flow.key);
        }
        Lookup::Missing => {}
    }
    match balancer::lookup_service(flow.key.dst, flow.key.dport, flow.key.proto) {
        Some(service) => open_flow(pkt, &flow, &service, origin, now),
        None => Verdict::Pass,
    }
}

/// Rewrites a packet as its conntrack entry says and counts it.
#[inline(always)]
fn follow<P: Packet>(pkt: &P, flow: &Flow, entry: &CtEntry, new_flow: bool) -> Verdict {
    if rewrite(pkt, flow, entry).is_err() {
        // A half-rewritten packet must not leave with a broken checksum.
        counters::event(EV_MALFORMED);
        return Verdict::Drop;
    }
    let direction = if entry.flags & CT_F_REPLY != 0 {
        Direction::ToClient
    } else {
        Direction::ToBackend
    };
    counters::traffic(
        entry.service_id,
        entry.backend_id,
        direction,
        u64::from(flow.ip_len),
        new_flow,
    );
    counters::event(EV_TRANSLATED);
    Verdict::Translated(
        flow.key.rewritten(entry),
        flow.ip_len,
        entry.flags & CT_F_NODE_SOURCE != 0,
    )
}

#[inline(always)]
fn rewrite<P: Packet>(pkt: &P, flow: &Flow, entry: &CtEntry) -> Result<(), ()> {
    let key = &flow.key;
    if entry.flags & CT_F_REWRITE_SRC != 0 {
        if entry.nat_src != key.src {
            pkt.rewrite_addr(flow, IP_SRC, key.src.v4_be(), entry.nat_src.v4_be())?;
        }
        if entry.nat_sport != key.sport {
            pkt.rewrite_port(flow, L4_SPORT, key.sport, entry.nat_sport)?;
        }
    }
    if entry.flags & CT_F_REWRITE_DST != 0 {
        if entry.nat_dst != key.dst {
            pkt.rewrite_addr(flow, IP_DST, key.dst.v4_be(), entry.nat_dst.v4_be())?;
        }
        if entry.nat_dport != key.dport {
            pkt.rewrite_port(flow, L4_DPORT, key.dport, entry.nat_dport)?;
        }
    }
    Ok(())
}

/// Kubernetes masquerades exactly two kinds of service traffic: external clients sent
/// to a backend on another node (its reply must come back through us), and a pod
/// that reaches itself through a service (hairpin: it would otherwise answer itself).
#[inline(always)]
fn needs_snat(flow: &Flow, choice: &Choice, origin: Origin) -> bool {
    match origin {
        Origin::External => choice.backend.flags & BACKEND_F_REMOTE != 0,
        Origin::Pod => choice.backend.addr == flow.key.src,
    }
}

#[inline(always)]
fn open_flow<P: Packet>(
    pkt: &P,
    flow: &Flow,
    service: &ServiceValue,
    origin: Origin,
    now: u64,
) -> Verdict {
    let key = &flow.key;
    // A TCP segment other than a SYN opens nothing: it belongs to a flow we lost.
    let mut midflow = false;
    if key.proto == PROTO_TCP {
        let tcp = flow.tcp_flags;
        if tcp & TCP_RST != 0 {
            // Nothing to reset: the flow is unknown here.
            return Verdict::Drop;
        }
        midflow = tcp & TCP_SYN == 0 || tcp & TCP_ACK != 0;
    }
    if !source_ranges::admits(service, &key.src) {
        counters::event(EV_SOURCE_DENIED);
        return Verdict::Drop;
    }
    let state = if midflow {
        counters::event(EV_CT_MIDFLOW_MISS);
        CT_ESTABLISHED
    } else if key.proto == PROTO_TCP {
        CT_SYN_SENT
    } else {
        CT_ESTABLISHED
    };
    let choice = match affinity::recall(service, &key.src, now) {
        Some(bound) => Some(bound),
        None if midflow => balancer::rehash(service, key),
        None => balancer::schedule(service, key),
    };
    let Some(choice) = choice else {
        counters::event(EV_NO_BACKEND);
        return Verdict::Drop;
    };
    affinity::remember(service, &key.src, &choice, now);
    let backend = &choice.backend;

    let mut forward = CtEntry {
        nat_src: key.src,
        nat_dst: backend.addr,
        nat_sport: key.sport,
        nat_dport: backend.port,
        service_id: service.id,
        backend_id: backend.id,
        state,
        flags: CT_F_REWRITE_DST,
        _pad: [0; 2],
        accounting: ACCT_ACTIVE,
        _pad2: 0,
        last_seen_ns: now,
    };
    let mut reply_key = CtKey {
        src: backend.addr,
        dst: key.src,
        sport: backend.port,
        dport: key.sport,
        proto: key.proto,
        _pad: [0; 3],
    };
    let mut reply = CtEntry {
        nat_src: key.dst,
        nat_dst: key.src,
        nat_sport: key.dport,
        nat_dport: key.sport,
        flags: CT_F_REWRITE_SRC | CT_F_REPLY,
        ..forward
    };

    // The reply's new source is the frontend address: a node address for NodePorts.
    if balancer::is_node_address(&key.dst) {
        reply.flags |= CT_F_NODE_SOURCE;
    }
    if needs_snat(flow, &choice, origin) {
        let Some(snat_addr) = snat_address() else {
            counters::event(EV_SNAT_EXHAUSTED);
            return Verdict::Drop;
        };
        reply_key.dst = snat_addr;
        reply.flags |= CT_F_REWRITE_DST | CT_F_SNAT;
        let Some(port) = reserve_snat_port(&mut reply_key, &reply, key) else {
            counters::event(EV_SNAT_EXHAUSTED);
            return Verdict::Drop;
        };
        // The masquerade address is the node's first address (see `program_node`).
        forward.flags |= CT_F_REWRITE_SRC | CT_F_SNAT | CT_F_NODE_SOURCE;
        forward.nat_src = snat_addr;
        forward.nat_sport = port;
    } else if CONNTRACK
        .insert(reply_key, reply, u64::from(BPF_ANY))
        .is_err()
    {
        counters::event(EV_CT_INSERT_FAILED);
    }

    match CONNTRACK.insert(key, forward, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            balancer::count_opened(backend.id);
            follow(pkt, flow, &forward, true)
        }
        Err(EEXIST) => adopt_winner(pkt, flow, &reply_key),
        Err(_) => {
            // Translate this packet anyway; the flow continues through re-hashing.
            counters::event(EV_CT_INSERT_FAILED);
            follow(pkt, flow, &forward, true)
        }
    }
}

/// Another CPU created this flow first: use its backend and withdraw our reply entry
/// if it points elsewhere (when it is the same tuple it is the winner's, rewritten
/// with equal content, and must stay).
#[inline(always)]
fn adopt_winner<P: Packet>(pkt: &P, flow: &Flow, our_reply_key: &CtKey) -> Verdict {
    counters::event(EV_CT_RACE_LOST);
    // SAFETY: copied out at once.
    let Some(winner) = (unsafe { CONNTRACK.get(flow.key) }).copied() else {
        return Verdict::Drop;
    };
    if flow.key.peer(&winner) != *our_reply_key {
        let _ = CONNTRACK.remove(our_reply_key);
    }
    follow(pkt, flow, &winner, false)
}

#[inline(always)]
fn snat_address() -> Option<Addr> {
    let addr = NODE_CONFIG.get(CONFIG_SNAT_ADDR)?.addr;
    if addr.is_zero() {
        None
    } else {
        Some(addr)
    }
}

/// Claims a masquerade port by inserting the reply entry if absent: the client's own
/// port when free (the common case, and what keeps a flow's tuple recognisable), else
/// a few hash-derived ones. Bounded, so a crowded node drops instead of looping.
#[inline(always)]
fn reserve_snat_port(reply_key: &mut CtKey, reply: &CtEntry, original: &CtKey) -> Option<u16> {
    let hash = proxy_common::flow_hash(original);
    for attempt in 0..SNAT_ATTEMPTS {
        let port = if attempt == 0 {
            original.sport
        } else {
            let mixed = hash ^ attempt.wrapping_mul(0x9e37_79b9);
            ((SNAT_PORT_MIN + mixed % (65_536 - SNAT_PORT_MIN)) as u16).to_be()
        };
        reply_key.dport = port;
        if CONNTRACK
            .insert(*reply_key, reply, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(port);
        }
    }
    None
}

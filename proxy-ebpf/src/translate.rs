//! The per-packet pipeline shared by the XDP and tc hooks: parse, follow a tracked
//! flow, or open a new one (schedule, record both directions, rewrite).

use aya_ebpf::bindings::BPF_NOEXIST;
use proxy_common::{
    decide::{self, Entry},
    sctp,
    tcp::{TCP_ACK, TCP_RST, TCP_SYN},
    Addr, CtEntry, CtKey, Family, ServiceValue, Transport, BACKEND_F_REMOTE, CT_F_ENCAP,
    CT_F_NODE_SOURCE, CT_F_REPLY, CT_F_REWRITE_DST, CT_F_REWRITE_SRC,
    EV_CT_INSERT_FAILED, EV_CT_MIDFLOW_MISS, EV_CT_RACE_LOST, EV_FRAGMENT, EV_FRAGMENT_DROPPED,
    EV_MALFORMED,
    EV_NO_BACKEND, EV_REFUSED, EV_SNAT_EXHAUSTED, EV_SOURCE_DENIED, EV_TRANSLATED, EV_TUNNEL_LOOP, PROTO_ICMPV6, PROTO_TCP, SVC_F_LOCAL_ONLY, SVC_F_TUNNEL,
};

use crate::{
    accounting, address_filter, affinity,
    balancer::{self, Choice},
    conntrack::{self, Lookup, EEXIST},
    counters::{self, Direction},
    fragments, headers, icmp,
    maps::CONNTRACK,
    packet::{Packet, Program, Side},
    parse::{self, Flow, Skip},
    related::{self, Claim},
    scratch, settings, source_ranges, tunnel,
};

/// Where the packet entered the node; decides masquerading.
///
/// A struct whose every field is always set, not an enum with a payload (as
/// `Verdict`): LLVM read the tunnel's backend from its stack slot before testing the
/// variant, a slot no other variant had written, and 5.10's verifier refuses to read
/// uninitialised stack ("invalid read from stack": the legacy object did not load).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// `External`: from outside the node, on an uplink (XDP); `Pod`: from a local
    /// pod, on its host-side interface (tc ingress); `Tunnel`: from outside,
    /// decapsulated from IPIP or ip6ip6 addressed to `backend` here (the entry node's
    /// choice, for `dsr-ipip`).
    pub entry: Entry,
    /// `Entry::Tunnel`'s backend; zero otherwise.
    pub backend: Addr,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Not ours, or nothing to do: let the packet continue unchanged.
    Pass,
    Drop,
    /// Rewritten.
    Translated,
    /// Unchanged, to be encapsulated in IPIP or ip6ip6 (`dsr-ipip`).
    Encapsulate,
    /// A new flow to a service without endpoints: answered with ICMP port
    /// unreachable (`icmp::refuse_*`), as kube-proxy rejects it.
    Refuse,
}

/// What to do with a packet. A struct whose every field is always set, not an enum
/// with payloads: LLVM filled the payload slots of payload-less variants with
/// whatever register it had, and the verifier refuses to read an unset register.
pub struct Verdict {
    pub action: Action,
    /// `Translated`: the tuple the packet now carries; `Encapsulate`: the outer
    /// header's (`tunnel::outer_tuple`).
    pub tuple: CtKey,
    /// The packet's IP length (before encapsulation).
    pub ip_len: u16,
    /// `Translated`: its new source is a node address (`CT_F_NODE_SOURCE`).
    pub node_source: bool,
}

const NO_TUPLE: CtKey = CtKey {
    src: Addr::ZERO,
    dst: Addr::ZERO,
    sport: 0,
    dport: 0,
    proto: 0,
    family: 0,
    _pad: [0; 2],
};

impl Verdict {
    pub const PASS: Verdict = Verdict::bare(Action::Pass);
    pub const DROP: Verdict = Verdict::bare(Action::Drop);
    pub const REFUSE: Verdict = Verdict::bare(Action::Refuse);

    const fn bare(action: Action) -> Verdict {
        Verdict {
            action,
            tuple: NO_TUPLE,
            ip_len: 0,
            node_source: false,
        }
    }
}

#[inline(always)]
pub fn handle<P: Packet>(pkt: &P, origin: Origin) -> Verdict {
    let flow = match parse::parse(pkt) {
        Ok(flow) => flow,
        Err(Skip::NotOurs) => return Verdict::PASS,
        Err(Skip::Ipv6) => {
            pkt.hand_over(Program::Ipv6);
            // Not handed over (IPv6's program is missing): as before IPv6 was served.
            return Verdict::PASS;
        }
        Err(Skip::OtherProtocol) => return other_protocol(pkt, origin),
        Err(Skip::OtherProgram) => {
            pkt.hand_over(if P::IPV6 {
                Program::Ipv6Sctp
            } else {
                Program::Sctp
            });
            // Not handed over (the program is missing): refused at a service address
            // as an untranslated protocol is.
            return other_protocol(pkt, origin);
        }
        Err(Skip::Malformed) => {
            counters::event(EV_MALFORMED);
            // Decapsulated, it must not reach the kernel bare, from the source its
            // wrapper chose (`tunnel` decapsulates only what parses: defence in
            // depth).
            return if origin.is_tunnel() {
                Verdict::DROP
            } else {
                Verdict::PASS
            };
        }
        // A later fragment of a datagram follows its flow as its first fragment did
        // (its addresses only), through the same look-up and rewrite as every
        // packet: a second copy of them took the pod program's IPv6 instance past
        // the stack's 512 bytes.
        Err(Skip::Fragment) => match parse::later_fragment(pkt, fragments::ports_of) {
            Some(flow) => flow,
            None => return unmatched_fragment(pkt, origin),
        },
    };
    // Most packets on a node are not ours: two array reads send them on. (A tunnel's
    // packet was found ours before it was decapsulated.)
    if !origin.is_tunnel() && !address_filter::may_be_ours(&flow.key) {
        return Verdict::PASS;
    }
    if flow.more_fragments {
        fragments::remember(&flow);
    }
    let now = conntrack::now_ns();
    match conntrack::lookup::<P>(&flow, now, origin.is_tunnel()) {
        Lookup::Live(entry_ptr) => {
            // SAFETY: copy of a live map value.
            let entry = unsafe { *entry_ptr };
            conntrack::observe(&flow, entry_ptr, &entry, now);
            related::announce(pkt, &flow, entry.helper, now);
            return follow(pkt, &flow, &entry, false);
        }
        // A new flow replaces it (its reply entry, if the new flow takes another
        // tuple, ages out).
        Lookup::Over(entry_ptr) => {
            accounting::retire(entry_ptr);
            let _ = CONNTRACK.remove(flow.key);
        }
        Lookup::Missing => {}
        Lookup::Retunnel => {
            counters::event(EV_TUNNEL_LOOP);
            return Verdict::DROP;
        }
    }
    // A later fragment never opens a flow.
    if !flow.has_l4 {
        return unmatched_fragment(pkt, origin);
    }
    let service = match origin.entry {
        Entry::Tunnel => balancer::lookup_tunnel_service(&flow.key),
        Entry::Pod => balancer::lookup_service_from(&flow.key, || true),
        Entry::External => balancer::lookup_service_from(&flow.key, || {
            source_ranges::in_cluster_cidrs(flow.family, &flow.key.src)
        }),
    };
    match service {
        Some(service) => open_flow(pkt, &flow, &service, origin, now),
        None => related_or_refused(pkt, &flow, origin, now),
    }
}

/// A packet that opens no tracked flow and no frontend's: a flow some tracked flow
/// announced (a TFTP server's answer from its new port, `related`), or traffic to
/// another port or protocol of a service address (refused), or not ours. After the
/// frontends, where netfilter meets expectations before its NAT rules: here the
/// verifier follows a new flow's path once, not once more per way of not meeting an
/// expectation (that took the uplink program from 606,000 processed instructions to
/// 750,000). What differs: a related flow's first packet whose tuple is also a UDP
/// frontend's (a masquerade port that equals a NodePort) opens a flow to that
/// frontend instead (README, "Related flows").
#[inline(always)]
fn related_or_refused<P: Packet>(pkt: &P, flow: &Flow, origin: Origin, now: u64) -> Verdict {
    // Decapsulated for a frontend gone since (the agent removed it meanwhile): it must
    // not reach the kernel bare, from the source its wrapper chose.
    if origin.is_tunnel() {
        return Verdict::DROP;
    }
    if related::may_be_expected(now) {
        match related::claim(flow, origin.entry == Entry::Pod, now) {
            Claim::NotExpected => {}
            Claim::Met => {
                return match related::met_entry() {
                    // SAFETY: this CPU's scratch slot (`related::met_entry`).
                    Some(entry) => follow(pkt, flow, unsafe { &*entry }, false),
                    None => Verdict::PASS,
                };
            }
            Claim::Pass => return Verdict::PASS,
            Claim::Drop => return Verdict::DROP,
        }
    }
    // Another port or protocol of a service address.
    refused_at_service_address(origin, flow.key.family, &flow.key.dst)
}

/// What no frontend takes at a service address (another port, another protocol, a
/// ping) is refused, as kube-proxy's nftables mode rejects it, instead of being let out
/// towards an address nobody outside owns (or looping between node and router).
/// Through a tunnel only `dsr-ipip` frontends are reached: the rest passes.
#[inline(always)]
pub fn refused_at_service_address(origin: Origin, family: u8, dst: &Addr) -> Verdict {
    if at_service_address(origin, family, dst) {
        counters::event(EV_REFUSED);
        return Verdict::REFUSE;
    }
    Verdict::PASS
}

/// Whether `dst` is a service address, for a packet from where services are reached
/// (not through a tunnel, which reaches only `dsr-ipip` frontends).
#[inline(always)]
fn at_service_address(origin: Origin, family: u8, dst: &Addr) -> bool {
    !origin.is_tunnel() && balancer::is_service_address(family, dst)
}

/// A packet that is neither TCP, UDP nor SCTP (or an SCTP first fragment): ICMP is
/// `icmp`'s (an error about one of our flows is translated back, a ping follows the
/// rule above), ICMPv6 `icmp6`'s program's; every other protocol (GRE, ESP, IPIP not for us…)
/// follows the rule above.
#[inline(always)]
pub fn other_protocol<P: Packet>(pkt: &P, origin: Origin) -> Verdict {
    let Some((proto, dst)) = parse::protocol_and_destination(pkt) else {
        return Verdict::PASS;
    };
    // SCTP's programs see no ICMP (only SCTP reaches them): compiled out.
    if P::SCTP {
    } else if P::IPV6 {
        if proto == PROTO_ICMPV6 {
            // ICMPv6 has a program of its own (`icmp6`); without it, it passes.
            pkt.hand_over(Program::Ipv6Icmp);
            return Verdict::PASS;
        }
    } else if proto == headers::PROTO_ICMP {
        return icmp::handle(pkt, origin);
    }
    refused_at_service_address(origin, family_of::<P>(), &dst)
}

/// The `family` byte of the program's packets.
#[inline(always)]
pub fn family_of<P: Packet>() -> u8 {
    if P::IPV6 {
        Family::V6.number()
    } else {
        Family::V4.number()
    }
}

/// A later fragment whose first fragment was not seen, or whose flow is not tracked
/// (a later fragment of a tracked flow follows it: `handle`), passes untouched
/// (`fragment`), unless it is addressed to a service address: it could only leave the
/// node untranslated, towards an address nobody outside owns, and its datagram cannot
/// be delivered anyway (its first fragment arrives later, reordered, or was refused:
/// another port or protocol), so it is dropped (`fragment_dropped`; no ICMP error is
/// ever sent about a later fragment).
#[inline(always)]
fn unmatched_fragment<P: Packet>(pkt: &P, origin: Origin) -> Verdict {
    let to_service_address = parse::protocol_and_destination(pkt)
        .is_some_and(|(_, dst)| at_service_address(origin, family_of::<P>(), &dst));
    if to_service_address {
        counters::event(EV_FRAGMENT_DROPPED);
        return Verdict::DROP;
    }
    counters::event(EV_FRAGMENT);
    Verdict::PASS
}

/// Rewrites a packet as its conntrack entry says and counts it.
#[inline(always)]
fn follow<P: Packet>(pkt: &P, flow: &Flow, entry: &CtEntry, new_flow: bool) -> Verdict {
    if rewrite(pkt, flow, entry).is_err() {
        // A half-rewritten packet must not leave with a broken checksum.
        counters::event(EV_MALFORMED);
        return Verdict::DROP;
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
    if entry.flags & CT_F_ENCAP != 0 {
        return Verdict {
            action: Action::Encapsulate,
            tuple: tunnel::outer_tuple(&flow.key, P::IPV6, entry.nat_src, entry.nat_dst),
            ip_len: flow.ip_len,
            node_source: false,
        };
    }
    counters::event(EV_TRANSLATED);
    Verdict {
        action: Action::Translated,
        tuple: flow.key.rewritten(entry),
        ip_len: flow.ip_len,
        node_source: entry.flags & CT_F_NODE_SOURCE != 0,
    }
}

#[inline(always)]
fn rewrite<P: Packet>(pkt: &P, flow: &Flow, entry: &CtEntry) -> Result<(), ()> {
    let key = &flow.key;
    if entry.flags & CT_F_REWRITE_SRC != 0 {
        if entry.nat_src != key.src {
            pkt.rewrite_addr(flow, Side::Src, &key.src, &entry.nat_src)?;
        }
        // A later fragment has no ports: its first fragment's carry the change.
        if entry.nat_sport != key.sport && flow.has_l4 {
            pkt.rewrite_port(flow, Side::Src, key.sport, entry.nat_sport)?;
        }
    }
    if entry.flags & CT_F_REWRITE_DST != 0 {
        if entry.nat_dst != key.dst {
            pkt.rewrite_addr(flow, Side::Dst, &key.dst, &entry.nat_dst)?;
        }
        if entry.nat_dport != key.dport && flow.has_l4 {
            pkt.rewrite_port(flow, Side::Dst, key.dport, entry.nat_dport)?;
        }
    }
    Ok(())
}

impl Origin {
    pub const EXTERNAL: Origin = Origin {
        entry: Entry::External,
        backend: Addr::ZERO,
    };
    pub const POD: Origin = Origin {
        entry: Entry::Pod,
        backend: Addr::ZERO,
    };

    #[inline(always)]
    pub const fn tunnel(backend: Addr) -> Origin {
        Origin {
            entry: Entry::Tunnel,
            backend,
        }
    }

    #[inline(always)]
    pub fn is_tunnel(self) -> bool {
        self.entry == Entry::Tunnel
    }
}

// The entries are passed to the map helpers by reference (`&*`): the copies clippy
// would have instead put them back on the stack they were taken off.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
fn open_flow<P: Packet>(
    pkt: &P,
    flow: &Flow,
    service: &ServiceValue,
    origin: Origin,
    now: u64,
) -> Verdict {
    let key = &flow.key;
    let Some(scheduler) = balancer::scheduler_of(service) else {
        counters::event(EV_NO_BACKEND);
        return Verdict::DROP;
    };
    // A TCP segment other than a SYN (an SCTP packet other than an INIT) opens
    // nothing: it belongs to a flow we lost. Whether the flow is SCTP is known at
    // compile time (`Packet::SCTP`): a comparison of the protocol here multiplied
    // the paths the verifier walks.
    let mut midflow = false;
    if P::SCTP {
        let chunk = flow.tcp_flags;
        if sctp::ends_association(chunk) {
            // Nothing to close: the association is unknown here.
            return Verdict::DROP;
        }
        midflow = chunk != sctp::CHUNK_INIT;
    } else if key.proto == PROTO_TCP {
        let tcp = flow.tcp_flags;
        if tcp & TCP_RST != 0 {
            // Nothing to reset: the flow is unknown here.
            return Verdict::DROP;
        }
        midflow = tcp & TCP_SYN == 0 || tcp & TCP_ACK != 0;
    }
    if !source_ranges::admits(service, flow.family, &key.src) {
        counters::event(EV_SOURCE_DENIED);
        return Verdict::DROP;
    }
    if midflow {
        counters::event(EV_CT_MIDFLOW_MISS);
    }
    let opening = Transport::opening(key.proto);
    // A tunnelled packet goes to the backend the entry node chose, if it is here.
    let chosen_upstream = if origin.is_tunnel() && service.flags & SVC_F_TUNNEL != 0 {
        balancer::backend_at(service, origin.backend)
    } else {
        None
    };
    let choice = match chosen_upstream.or_else(|| affinity::recall(service, &key.src, now)) {
        Some(choice) => Some(choice),
        None if midflow => balancer::rehash(service, scheduler, key),
        None => balancer::schedule(service, scheduler, key),
    };
    let Some(choice) = choice else {
        return no_backend(service);
    };
    affinity::remember(service, &key.src, &choice, now);
    if decide::returns_directly(service, &choice.backend, origin.entry) {
        return open_encapsulated(pkt, flow, service, &choice, opening, now);
    }
    let backend = &choice.backend;

    // The entries are assembled off the stack, which IPv6's wider addresses filled.
    let Some(scratch) = scratch::slot() else {
        return Verdict::DROP;
    };
    scratch.forward = CtEntry::original(
        key,
        (backend.addr, backend.port),
        (service.id, backend.id),
        opening,
        now,
    );
    let forward = &mut scratch.forward;
    scratch.reply_key = key.peer(forward);
    let reply_key = &mut scratch.reply_key;
    scratch.reply = CtEntry::reply_to(key, forward);
    let reply = &mut scratch.reply;

    // The reply's new source is the frontend address: a node address for NodePorts.
    if balancer::is_node_address(key.family, &key.dst) {
        reply.flags |= CT_F_NODE_SOURCE;
    }
    if decide::masquerades(
        service,
        &choice.backend,
        &flow.key.src,
        origin.entry,
        settings::masquerade_all(),
    ) {
        let Some(snat_addr) = conntrack::snat_address(key.family) else {
            counters::event(EV_SNAT_EXHAUSTED);
            return Verdict::DROP;
        };
        reply_key.dst = snat_addr;
        // The masquerade address is the node's first address (see `program_node`).
        CtEntry::masquerade(forward, reply, snat_addr);
    }
    let Some(port) = conntrack::claim_reply_tuple(reply_key, reply, key) else {
        counters::event(EV_SNAT_EXHAUSTED);
        return Verdict::DROP;
    };
    if port != key.sport {
        forward.flags |= CT_F_REWRITE_SRC;
        forward.nat_sport = port;
    }

    // Only the client's direction announces related flows.
    forward.helper = service.helper;
    forward.backend_here = u8::from(backend.flags & BACKEND_F_REMOTE == 0);
    match CONNTRACK.insert(key, &*forward, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            accounting::opened(backend.id, forward.accounting);
            related::announce(pkt, flow, forward.helper, now);
            follow(pkt, flow, forward, true)
        }
        Err(EEXIST) => match conntrack::adopt_winner(key, reply_key) {
            Some(winner) => follow(pkt, flow, &winner, false),
            None => Verdict::DROP,
        },
        Err(_) if port != key.sport => {
            // A remapped flow without its entry would get another port with each
            // packet: dropped (its reply entry withdrawn), retried by the client.
            counters::event(EV_CT_INSERT_FAILED);
            let _ = CONNTRACK.remove(&*reply_key);
            Verdict::DROP
        }
        Err(_) => {
            // Translate this packet anyway; the flow continues through re-hashing.
            counters::event(EV_CT_INSERT_FAILED);
            follow(pkt, flow, forward, true)
        }
    }
}

/// What a new flow to a service that gives it no backend gets, as from kube-proxy:
/// refused (ICMP port unreachable) when the service has no usable endpoint at all;
/// dropped when a traffic policy `Local` left this node without one (so that load
/// balancers' health checks, not clients, find out).
#[inline(always)]
fn no_backend(service: &ServiceValue) -> Verdict {
    if service.flags & SVC_F_LOCAL_ONLY != 0 {
        counters::event(EV_NO_BACKEND);
        return Verdict::DROP;
    }
    counters::event(EV_REFUSED);
    Verdict::REFUSE
}

/// Records a `dsr-ipip` flow (one entry: replies never come back here) and
/// encapsulates its first packet.
#[inline(always)]
fn open_encapsulated<P: Packet>(
    pkt: &P,
    flow: &Flow,
    service: &ServiceValue,
    choice: &Choice,
    opening: (u8, u32),
    now: u64,
) -> Verdict {
    let Some(outer_src) = tunnel::source_for(&flow.key) else {
        counters::event(EV_SNAT_EXHAUSTED);
        return Verdict::DROP;
    };
    let entry = CtEntry::encapsulated(
        (outer_src, choice.backend.addr),
        (service.id, choice.backend.id),
        opening,
        now,
    );
    match CONNTRACK.insert(flow.key, entry, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            accounting::opened(choice.backend.id, entry.accounting);
            follow(pkt, flow, &entry, true)
        }
        Err(EEXIST) => {
            counters::event(EV_CT_RACE_LOST);
            // SAFETY: copied out at once.
            match unsafe { CONNTRACK.get(flow.key) }.copied() {
                Some(winner) => follow(pkt, flow, &winner, false),
                None => Verdict::DROP,
            }
        }
        Err(_) => {
            counters::event(EV_CT_INSERT_FAILED);
            follow(pkt, flow, &entry, true)
        }
    }
}

//! IP-in-IP tunnels, done by the uplink programs themselves: the kernel needs no ipip
//! or ip6_tunnel module, and the pod behind the tunnel needs no tunnel device. IPv4
//! flows travel in IPIP (IPv4 in IPv4, protocol 4), IPv6 flows in ip6ip6 (IPv6 in
//! IPv6, next header 41), each family's programs (`IPV6`) handling their own.
//!
//! - Decapsulation: a tunnelled packet whose inner packet is addressed to a
//!   `dsr-ipip` frontend, for this node or one of its backends, loses its outer header
//!   here (it is *removed*, not kept: the backend is a plain pod that could not
//!   decapsulate it) and the inner packet is translated as if it had arrived bare,
//!   keeping the client's address. Nothing else is decapsulated: an outsider must not
//!   reach other services, or other flows, by wrapping packets. Where the operator
//!   lists the outer sources that may tunnel (`--ipip-trusted-sources`, prefixes of
//!   either family), others are dropped; without a list any source may, but then the
//!   inner source proves nothing, so a frontend with `loadBalancerSourceRanges`
//!   refuses tunnelled flows (wrapping a packet with an admitted inner source would
//!   bypass the ranges).
//! - Encapsulation (`dsr-ipip`, at the entry node): the client's packet, untouched,
//!   goes inside an outer header addressed to the chosen backend; the network routes
//!   it to the backend's node, which decapsulates it for the pod (IPVS's tunnel mode
//!   addresses the real server the same way). So that the receiver's RSS (or ECMP on
//!   the way) spreads flows, IPv4's outer source is hashed from the flow over
//!   `CONFIG_TUNNEL_SOURCE`, as Katran does; IPv6's is the node's IPv6 address and the
//!   flow's hash goes into the flow label, which IPv6 has for this (RFC 6438).
//! - Path MTU: when the outer packet would not fit the egress MTU, the client gets
//!   ICMP fragmentation-needed (IPv4, when it set DF) or ICMPv6 packet too big (IPv6,
//!   whose routers never fragment), from this node, with the MTU it can use, instead
//!   of a silent drop, as a router on its path would answer.
//!
//! What IPv6 decapsulates is narrower than IPv4: an outer header without extension
//! headers, and an inner packet whose transport header follows its fixed header (as
//! this entry node sends every unfragmented TCP and UDP packet of a client that adds
//! no extension headers); anything else passes untouched, to a kernel without
//! ip6_tunnel, which drops it. Reading the inner extension headers too would walk
//! IPv6's header chain twice in one program.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use network_types::{eth::EtherType, ip::Ipv4Hdr};
use proxy_common::{
    decide::{self, TunnelPeer},
    flow_hash, tunnel_peers_id, Addr, CtKey, Family, ServiceValue, Transport, CONFIG_SNAT_ADDR,
    CONFIG_SNAT_ADDR6, CONFIG_TUNNEL_SOURCE, EV_DECAPSULATED, EV_ENCAPSULATED, EV_FRAG_NEEDED,
    EV_TUNNEL_REFUSED,
};

use crate::{
    balancer, counters,
    forward::fib_query,
    headers::{
        self, ipv4_header, IPV6_DST, IPV6_LEN, IPV6_NEXT_HEADER, IPV6_PAYLOAD_LEN, IPV6_SRC, IP_DF,
        IP_MF, IP_OFFSET_MASK, PROTO_IPIP, PROTO_IPV6,
    },
    icmp, icmp6,
    maps::{NODE_CONFIG, SOURCE_RANGES},
    packet::{Packet, XdpPacket, ETH_LEN},
    parse::{self, addr_at},
    source_ranges,
};

/// The outer header each family adds: IPv4 without options, the fixed IPv6 header.
pub const OUTER_LEN_V4: usize = 20;
pub const OUTER_LEN_V6: usize = IPV6_LEN;
const FIB_FRAG_NEEDED: i64 = 8;
/// The outer header's hop limit (RFC 2473's tunnel entry point: the inner packet's own
/// is left alone).
const OUTER_HOP_LIMIT: u8 = 64;

#[inline(always)]
const fn outer_len<const IPV6: bool>() -> usize {
    if IPV6 {
        OUTER_LEN_V6
    } else {
        OUTER_LEN_V4
    }
}

#[inline(always)]
const fn family<const IPV6: bool>() -> Family {
    if IPV6 {
        Family::V6
    } else {
        Family::V4
    }
}

/// The outer header's protocol (next header): IPIP or IPv6.
#[inline(always)]
pub const fn outer_protocol(family: Family) -> u8 {
    match family {
        Family::V4 => PROTO_IPIP,
        Family::V6 => PROTO_IPV6,
    }
}

/// Where an uplink packet comes from (`arrival`).
pub enum Arrival {
    /// As it is from outside: no tunnel, or one whose inner packet is not ours.
    Bare,
    /// Out of a tunnel towards the backend here the entry node chose (named by the
    /// outer destination), the outer header removed.
    Tunnelled(Addr),
    /// From a tunnel peer that may not carry it (or whose outer header could not be
    /// removed): dropped.
    Refused,
}

/// Where an uplink packet of the family's program (`IPV6`) comes from; a packet of
/// ours out of a tunnel is decapsulated here.
#[inline(always)]
pub fn arrival<const IPV6: bool>(ctx: &XdpContext) -> Arrival {
    let pkt = XdpPacket(ctx);
    let outer = if IPV6 {
        outer_addresses_v6(&pkt)
    } else {
        outer_addresses_v4(&pkt)
    };
    let Some((outer_src, outer_dst)) = outer else {
        return Arrival::Bare;
    };
    let inner = if IPV6 {
        inner_key_v6(&pkt)
    } else {
        parse::parse_at(&pkt, ETH_LEN + OUTER_LEN_V4)
            .ok()
            .map(|flow| flow.key)
    };
    let Some(service) = inner.and_then(|key| balancer::lookup_tunnel_service(&key)) else {
        return Arrival::Bare;
    };
    let family = family::<IPV6>();
    if !balancer::is_node_address(family.number(), &outer_dst)
        && balancer::backend_at(&service, outer_dst).is_none()
    {
        return Arrival::Bare;
    }
    if !admitted(family, &outer_src, &service) {
        counters::event(EV_TUNNEL_REFUSED);
        return Arrival::Refused;
    }
    match decapsulate::<IPV6>(ctx) {
        Ok(()) => Arrival::Tunnelled(outer_dst),
        Err(()) => Arrival::Refused,
    }
}

/// Whether an IPv6 packet is ip6ip6 this module could decapsulate (its program is
/// `uplink_ingress_tunnel6`).
#[inline(always)]
pub fn is_ip6ip6<P: Packet>(pkt: &P) -> bool {
    outer_addresses_v6(pkt).is_some()
}

/// Whether the outer source may tunnel into `service`.
#[inline(always)]
fn admitted(family: Family, outer_src: &Addr, service: &ServiceValue) -> bool {
    let key = source_ranges::host_key(tunnel_peers_id(family), family, outer_src);
    let peer = TunnelPeer::from_entry(SOURCE_RANGES.get(key).copied());
    decide::admits_tunnel(peer, service)
}

/// The outer (source, destination) of an IPIP packet this program can decapsulate:
/// no options, not a fragment, lengths consistent with the frame.
#[inline(always)]
fn outer_addresses_v4<P: Packet>(pkt: &P) -> Option<(Addr, Addr)> {
    let ethertype: *const u16 = pkt.ptr_at(12)?;
    let ip: *const Ipv4Hdr = pkt.ptr_at(ETH_LEN)?;
    // SAFETY: both pointers are bounds-checked.
    let (ethertype, vihl, proto, frags, tot_len, src, dst) = unsafe {
        (
            ethertype.read_unaligned(),
            (*ip).vihl,
            headers::ipv4_proto(ip),
            u16::from_be_bytes((*ip).frags),
            usize::from(u16::from_be_bytes((*ip).tot_len)),
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    let plain = ethertype == EtherType::Ipv4 as u16
        && vihl == 0x45
        && proto == PROTO_IPIP
        && frags & (IP_MF | IP_OFFSET_MASK) == 0
        && tot_len >= OUTER_LEN_V4 + 20
        && ETH_LEN + tot_len <= pkt.len();
    plain.then(|| (Addr::from_v4_be(src), Addr::from_v4_be(dst)))
}

/// The outer (source, destination) of an ip6ip6 packet this program can decapsulate:
/// the inner packet right after the fixed header, lengths consistent with the frame.
#[inline(always)]
fn outer_addresses_v6<P: Packet>(pkt: &P) -> Option<(Addr, Addr)> {
    let ethertype: *const u16 = pkt.ptr_at(12)?;
    let ip: *const [u8; IPV6_LEN] = pkt.ptr_at(ETH_LEN)?;
    // SAFETY: both pointers are bounds-checked.
    let (ethertype, version, next, payload) = unsafe {
        let h = &*ip;
        (
            ethertype.read_unaligned(),
            h[0] >> 4,
            h[IPV6_NEXT_HEADER],
            usize::from(u16::from_be_bytes([h[IPV6_PAYLOAD_LEN], h[IPV6_PAYLOAD_LEN + 1]])),
        )
    };
    let plain = ethertype == EtherType::Ipv6 as u16
        && version == 6
        && next == PROTO_IPV6
        && payload >= IPV6_LEN
        && ETH_LEN + IPV6_LEN + payload <= pkt.len();
    if !plain {
        return None;
    }
    Some((
        addr_at(pkt, ETH_LEN + IPV6_SRC)?,
        addr_at(pkt, ETH_LEN + IPV6_DST)?,
    ))
}

/// The tuple of an ip6ip6 packet's inner packet, when its transport header follows
/// its fixed header (the module's note on what IPv6 decapsulates) and its lengths
/// agree with the outer header's, the frame's and its transport's minimum. What the
/// parser still calls malformed (a TCP data offset or UDP length out of range) is
/// dropped once decapsulated (`translate::handle`): it must not reach the kernel
/// bare, from a source of the wrapper's choosing.
#[inline(always)]
fn inner_key_v6<P: Packet>(pkt: &P) -> Option<CtKey> {
    const INNER: usize = ETH_LEN + OUTER_LEN_V6;
    let outer: *const [u8; IPV6_LEN] = pkt.ptr_at(ETH_LEN)?;
    let ip: *const [u8; IPV6_LEN] = pkt.ptr_at(INNER)?;
    let ports: *const [u16; 2] = pkt.ptr_at(INNER + IPV6_LEN)?;
    let payload_len = |h: &[u8; IPV6_LEN]| {
        usize::from(u16::from_be_bytes([h[IPV6_PAYLOAD_LEN], h[IPV6_PAYLOAD_LEN + 1]]))
    };
    // SAFETY: every pointer is bounds-checked.
    let (version, proto, ports, inner_payload, outer_payload) = unsafe {
        (
            (*ip)[0] >> 4,
            (*ip)[IPV6_NEXT_HEADER],
            ports.read_unaligned(),
            payload_len(&*ip),
            payload_len(&*outer),
        )
    };
    let transport = Transport::from_number(proto)?;
    let consistent = version == 6
        && inner_payload >= transport.min_header_len()
        && outer_payload == IPV6_LEN + inner_payload;
    if !consistent {
        return None;
    }
    Some(CtKey {
        src: addr_at(pkt, INNER + IPV6_SRC)?,
        dst: addr_at(pkt, INNER + IPV6_DST)?,
        sport: ports[0],
        dport: ports[1],
        proto,
        family: Family::V6.number(),
        _pad: [0; 2],
    })
}

/// Removes the outer header (the Ethernet header moves up over it).
#[inline(always)]
fn decapsulate<const IPV6: bool>(ctx: &XdpContext) -> Result<(), ()> {
    let outer = outer_len::<IPV6>();
    let pkt = XdpPacket(ctx);
    let eth: *const [u8; ETH_LEN] = pkt.ptr_at(0).ok_or(())?;
    let moved: *mut [u8; ETH_LEN] = pkt.ptr_at(outer).ok_or(())?;
    // SAFETY: bounds-checked, non-overlapping (the outer header lies between).
    unsafe { moved.write_unaligned(eth.read_unaligned()) };
    // SAFETY: helper on the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer as i32) } != 0 {
        return Err(());
    }
    counters::event(EV_DECAPSULATED);
    Ok(())
}

/// The outer source of a flow's tunnelled packets. IPv4: an address of the configured
/// range chosen by the flow's hash, else the node's masquerade address. IPv6: the
/// node's IPv6 address (the flow label spreads flows instead).
#[inline(always)]
pub fn source_for(key: &CtKey) -> Option<Addr> {
    if key.family == Family::V6.number() {
        let node = NODE_CONFIG.get(CONFIG_SNAT_ADDR6)?.addr;
        return (!node.is_zero()).then_some(node);
    }
    let range = NODE_CONFIG.get(CONFIG_TUNNEL_SOURCE)?.addr;
    let count = range.words[1];
    if count == 0 {
        let node = NODE_CONFIG.get(CONFIG_SNAT_ADDR)?.addr;
        return (!node.is_zero()).then_some(node);
    }
    let first = u32::from_be(range.words[0]);
    let offset = flow_hash(key) & count.wrapping_sub(1);
    Some(Addr::from_v4_be(first.wrapping_add(offset).to_be()))
}

/// The outer tuple of a tunnelled packet of the flow `key` whose conntrack entry
/// names the outer (source, destination), in the family's program (`ipv6`: known at
/// compile time; a family read from the flow split the verifier's paths through the
/// encapsulation). An outer header has no ports: IPv6's carry the flow's hash, which
/// its outer header puts in its flow label (IPv4's stay zero, as the FIB is asked
/// about the IPIP packet the kernel would route).
#[inline(always)]
pub fn outer_tuple(key: &CtKey, ipv6: bool, outer_src: Addr, outer_dst: Addr) -> CtKey {
    let (family, hash) = if ipv6 {
        (Family::V6, flow_hash(key))
    } else {
        (Family::V4, 0)
    };
    CtKey {
        src: outer_src,
        dst: outer_dst,
        sport: (hash >> 16) as u16,
        dport: hash as u16,
        proto: outer_protocol(family),
        family: family.number(),
        _pad: [0; 2],
    }
}

/// Whether the IPv4 packet at `ETH_LEN` may not be fragmented (DF).
#[inline(always)]
fn dont_fragment(pkt: &XdpPacket) -> bool {
    pkt.ptr_at::<Ipv4Hdr>(ETH_LEN)
        // SAFETY: bounds-checked.
        .is_some_and(|ip| unsafe { (*ip).frags[0] } & IP_DF != 0)
}

/// The IPv4 outer header for the packet at `ETH_LEN` (its TOS and DF carried over).
#[inline(always)]
fn outer_header_v4(pkt: &XdpPacket, outer: &CtKey) -> Option<[u16; 10]> {
    let ip: *const Ipv4Hdr = pkt.ptr_at(ETH_LEN)?;
    // SAFETY: bounds-checked.
    let (tos, inner_len, df) = unsafe {
        (
            (*ip).tos,
            u16::from_be_bytes((*ip).tot_len),
            (*ip).frags[0] & IP_DF != 0,
        )
    };
    Some(ipv4_header(
        tos,
        inner_len.wrapping_add(OUTER_LEN_V4 as u16),
        df,
        PROTO_IPIP,
        outer.src,
        outer.dst,
    ))
}

/// Puts the packet inside the outer header `outer` describes.
#[inline(always)]
fn encapsulate<const IPV6: bool>(ctx: &XdpContext, outer: &CtKey) -> Result<(), ()> {
    if IPV6 {
        encapsulate_v6(ctx, outer)
    } else {
        let header = outer_header_v4(&XdpPacket(ctx), outer).ok_or(())?;
        push_header(ctx, header)
    }
}

/// The IPv6 outer header, written in place (the IPv6 programs' stack has no room for
/// a copy): the inner packet's traffic class carried over, the flow's hash
/// (`outer_tuple`) as the flow label.
#[inline(always)]
fn encapsulate_v6(ctx: &XdpContext, outer: &CtKey) -> Result<(), ()> {
    const INNER: usize = ETH_LEN + OUTER_LEN_V6;
    make_room(ctx, OUTER_LEN_V6)?;
    let pkt = XdpPacket(ctx);
    let fixed: *mut [u8; IPV6_SRC] = pkt.ptr_at(ETH_LEN).ok_or(())?;
    let src: *mut Addr = pkt.ptr_at(ETH_LEN + IPV6_SRC).ok_or(())?;
    let dst: *mut Addr = pkt.ptr_at(ETH_LEN + IPV6_DST).ok_or(())?;
    let inner: *const [u8; IPV6_SRC] = pkt.ptr_at(INNER).ok_or(())?;
    let label = (u32::from(outer.sport) << 16 | u32::from(outer.dport)).to_be_bytes();
    // SAFETY: every pointer is bounds-checked; the outer header and the inner one do
    // not overlap.
    unsafe {
        let h = &*inner;
        let length = u16::from_be_bytes([h[IPV6_PAYLOAD_LEN], h[IPV6_PAYLOAD_LEN + 1]])
            .wrapping_add(IPV6_LEN as u16)
            .to_be_bytes();
        fixed.write_unaligned([
            0x60 | (h[0] & 0x0f),
            (h[1] & 0xf0) | (label[1] & 0x0f),
            label[2],
            label[3],
            length[0],
            length[1],
            PROTO_IPV6,
            OUTER_HOP_LIMIT,
        ]);
        src.write_unaligned(outer.src);
        dst.write_unaligned(outer.dst);
    }
    Ok(())
}

/// Puts `header` between the Ethernet header and the packet.
#[inline(always)]
fn push_header<T>(ctx: &XdpContext, header: T) -> Result<(), ()> {
    make_room(ctx, size_of::<T>())?;
    let at: *mut T = XdpPacket(ctx).ptr_at(ETH_LEN).ok_or(())?;
    // SAFETY: bounds-checked.
    unsafe { at.write_unaligned(header) };
    Ok(())
}

/// Opens `len` bytes between the Ethernet header and the packet (the Ethernet header
/// moves down into them), for an outer header.
#[inline(always)]
fn make_room(ctx: &XdpContext, len: usize) -> Result<(), ()> {
    // SAFETY: helper on the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(len as i32)) } != 0 {
        return Err(());
    }
    let pkt = XdpPacket(ctx);
    let eth: *mut [u8; ETH_LEN] = pkt.ptr_at(0).ok_or(())?;
    let old_eth: *const [u8; ETH_LEN] = pkt.ptr_at(len).ok_or(())?;
    // SAFETY: bounds-checked; non-overlapping (the room lies between).
    unsafe { eth.write_unaligned(old_eth.read_unaligned()) };
    Ok(())
}

/// Sends a `dsr-ipip` packet on its way: encapsulated as `outer` says when it fits
/// the path, else answered with fragmentation-needed (IPv4 with DF) or packet too big
/// (IPv6). Both continue into the kernel stack, which routes them.
#[inline(always)]
pub fn transmit<const IPV6: bool>(ctx: &XdpContext, outer: &CtKey, ip_len: u16) -> u32 {
    let ingress = ctx.ingress_ifindex() as u32;
    let overhead = outer_len::<IPV6>() as u16;
    // Not BPF_FIB_LOOKUP_SKIP_NEIGH, which kernels before 6.3 refuse: the MTU is
    // checked before the neighbour, so FRAG_NEEDED comes either way.
    let (rc, params) = fib_query(ctx, outer, ip_len.saturating_add(overhead), ingress, 0);
    if rc == FIB_FRAG_NEEDED && (IPV6 || dont_fragment(&XdpPacket(ctx))) {
        // SAFETY: the kernel filled in the MTU of the egress for this answer.
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result }.saturating_sub(overhead);
        let action = if IPV6 {
            icmp6::too_big_xdp(ctx, mtu)
        } else {
            icmp::frag_needed_xdp(ctx, mtu)
        };
        if action == xdp_action::XDP_PASS {
            counters::event(EV_FRAG_NEEDED);
        }
        return action;
    }
    match encapsulate::<IPV6>(ctx, outer) {
        Ok(()) => {
            counters::event(EV_ENCAPSULATED);
            xdp_action::XDP_PASS
        }
        Err(()) => xdp_action::XDP_DROP,
    }
}

const _: () = assert!(size_of::<Ipv4Hdr>() == OUTER_LEN_V4 && size_of::<[u16; 10]>() == OUTER_LEN_V4);

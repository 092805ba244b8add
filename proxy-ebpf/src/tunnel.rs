//! IPIP (IPv4-in-IPv4, protocol 4), done by the uplink program itself: the kernel
//! needs no ipip module, and the pod behind the tunnel needs no tunnel device.
//!
//! - Decapsulation: an IPIP packet whose inner packet is addressed to a `dsr-ipip`
//!   frontend, for this node or one of its backends, loses its outer header here (it
//!   is *removed*, not kept: the backend is a plain pod that could not decapsulate
//!   it) and the inner packet is translated as if it had arrived bare, keeping the
//!   client's address. Nothing else is decapsulated: an outsider must not reach
//!   other services, or other flows, by wrapping packets. Where the operator lists
//!   the outer sources that may tunnel (`--ipip-trusted-sources`), others are
//!   dropped; without a list any source may, but then the inner source proves
//!   nothing, so a frontend with `loadBalancerSourceRanges` refuses tunnelled flows
//!   (wrapping a packet with an admitted inner source would bypass the ranges).
//! - Encapsulation (`dsr-ipip`, at the entry node): the client's packet, untouched,
//!   goes inside an outer header addressed to the chosen backend; the network routes
//!   it to the backend's node, which decapsulates it for the pod (IPVS's tunnel mode
//!   addresses the real server the same way). The outer source is hashed from the
//!   flow over `CONFIG_TUNNEL_SOURCE` so the receiver's RSS spreads flows.
//! - Path MTU: when the outer packet would not fit the egress MTU and the client set
//!   DF, the client gets ICMP fragmentation-needed (from this node, with the MTU it
//!   can use) instead of a silent drop, as a router on its path would answer.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use network_types::{eth::EtherType, ip::Ipv4Hdr};
use proxy_common::{
    decide::TunnelPeer, flow_hash, Addr, CtKey, Family, CONFIG_SNAT_ADDR, CONFIG_TUNNEL_SOURCE,
    EV_DECAPSULATED, EV_ENCAPSULATED, EV_FRAG_NEEDED, TUNNEL_PEERS_ID,
};

use crate::{
    counters,
    forward::fib_query,
    headers::{self, ipv4_header, ICMP_FRAG_NEEDED, IP_DF, IP_MF, IP_OFFSET_MASK, PROTO_IPIP},
    icmp,
    maps::{NODE_CONFIG, SOURCE_RANGES},
    packet::{Packet, XdpPacket, ETH_LEN},
    source_ranges,
};

/// The outer header: IPv4 without options.
pub const OUTER_LEN: usize = 20;
const FIB_FRAG_NEEDED: i64 = 8;
/// An ICMP error quotes the offending IP header and the first 8 bytes after it.
const QUOTED_LEN: usize = 20 + 8;
const ICMP_LEN: usize = 8;
const ERROR_FRAME_LEN: usize = ETH_LEN + 20 + ICMP_LEN + QUOTED_LEN;

/// The outer (source, destination) of an IPIP packet this program can decapsulate:
/// no options, not a fragment, lengths consistent with the frame.
#[inline(always)]
pub fn outer_addresses<P: Packet>(pkt: &P) -> Option<(Addr, Addr)> {
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
        && tot_len >= OUTER_LEN + 20
        && ETH_LEN + tot_len <= pkt.len();
    plain.then(|| (Addr::from_v4_be(src), Addr::from_v4_be(dst)))
}

#[inline(always)]
pub fn peer_trust(outer_src: &Addr) -> TunnelPeer {
    let key = source_ranges::host_key(TUNNEL_PEERS_ID, Family::V4, outer_src);
    TunnelPeer::from_entry(SOURCE_RANGES.get(key).copied())
}

/// Removes the outer header (the Ethernet header moves up over it).
#[inline(always)]
pub fn decapsulate(ctx: &XdpContext) -> Result<(), ()> {
    let pkt = XdpPacket(ctx);
    let eth: *const [u8; ETH_LEN] = pkt.ptr_at(0).ok_or(())?;
    let moved: *mut [u8; ETH_LEN] = pkt.ptr_at(OUTER_LEN).ok_or(())?;
    // SAFETY: bounds-checked, non-overlapping (the outer header lies between).
    unsafe { moved.write_unaligned(eth.read_unaligned()) };
    // SAFETY: helper on the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER_LEN as i32) } != 0 {
        return Err(());
    }
    counters::event(EV_DECAPSULATED);
    Ok(())
}

/// The outer source of a flow's IPIP packets: an address of the configured range
/// chosen by the flow's hash, else the node's masquerade address.
#[inline(always)]
pub fn source_for(key: &CtKey) -> Option<Addr> {
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

/// (TOS, IP length, DF) of the packet at `ETH_LEN`.
#[inline(always)]
fn inner_facts(pkt: &XdpPacket) -> Option<(u8, u16, bool)> {
    let ip: *const Ipv4Hdr = pkt.ptr_at(ETH_LEN)?;
    // SAFETY: bounds-checked.
    unsafe {
        Some((
            (*ip).tos,
            u16::from_be_bytes((*ip).tot_len),
            (*ip).frags[0] & IP_DF != 0,
        ))
    }
}

/// Puts the packet inside an outer header from `src` to `dst`.
#[inline(always)]
fn encapsulate(ctx: &XdpContext, src: Addr, dst: Addr) -> Result<(), ()> {
    let (tos, inner_len, df) = inner_facts(&XdpPacket(ctx)).ok_or(())?;
    // SAFETY: helper on the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(OUTER_LEN as i32)) } != 0 {
        return Err(());
    }
    let pkt = XdpPacket(ctx);
    let eth: *mut [u8; ETH_LEN] = pkt.ptr_at(0).ok_or(())?;
    let old_eth: *const [u8; ETH_LEN] = pkt.ptr_at(OUTER_LEN).ok_or(())?;
    let outer: *mut [u16; 10] = pkt.ptr_at(ETH_LEN).ok_or(())?;
    let header = ipv4_header(
        tos,
        inner_len.wrapping_add(OUTER_LEN as u16),
        df,
        PROTO_IPIP,
        src,
        dst,
    );
    // SAFETY: bounds-checked; the Ethernet header moves down into the new room.
    unsafe {
        eth.write_unaligned(old_eth.read_unaligned());
        outer.write_unaligned(header);
    }
    Ok(())
}

/// Turns the packet into ICMP fragmentation-needed for its sender, quoting its IP
/// header and first 8 bytes, from this node's address; `mtu` is what fits.
#[inline(always)]
fn frag_needed(ctx: &XdpContext, mtu: u16) -> Result<(), ()> {
    let pkt = XdpPacket(ctx);
    let ip: *const Ipv4Hdr = pkt.ptr_at(ETH_LEN).ok_or(())?;
    let _quoted: *const [u8; QUOTED_LEN] = pkt.ptr_at(ETH_LEN).ok_or(())?;
    // SAFETY: bounds-checked.
    let (vihl, sender) = unsafe { ((*ip).vihl, u32::from_ne_bytes((*ip).src_addr)) };
    if vihl != 0x45 {
        return Err(());
    }
    let node = NODE_CONFIG.get(CONFIG_SNAT_ADDR).ok_or(())?.addr;
    if node.is_zero() {
        return Err(());
    }
    let grow = (20 + ICMP_LEN) as i32;
    // SAFETY: helper on the program's own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(());
    }
    let pkt = XdpPacket(ctx);
    let frame: *mut [u8; ERROR_FRAME_LEN] = pkt.ptr_at(0).ok_or(())?;
    let shrink = ERROR_FRAME_LEN as i32 - pkt.len() as i32;
    // SAFETY: the whole error frame is bounds-checked; the Ethernet header moves down
    // (non-overlapping: 28 bytes apart, 14 long).
    unsafe {
        let bytes = &mut *frame;
        let mut eth = [0u8; ETH_LEN];
        eth.copy_from_slice(&bytes[grow as usize..grow as usize + ETH_LEN]);
        bytes[..ETH_LEN].copy_from_slice(&eth);
        let m = mtu.to_be_bytes();
        icmp::write_error_headers(
            bytes,
            ICMP_FRAG_NEEDED,
            [0, 0, m[0], m[1]],
            node,
            Addr::from_v4_be(sender),
        );
    }
    // SAFETY: helper on the program's own context; the frame only shrinks.
    if shrink < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, shrink) } != 0 {
        return Err(());
    }
    Ok(())
}

/// Sends a `dsr-ipip` packet on its way: encapsulated towards `dst` when it fits the
/// path, else (DF set) answered with fragmentation-needed. Both continue into the
/// kernel stack, which routes them.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, outer: &CtKey, ip_len: u16) -> u32 {
    let (src, dst) = (outer.src, outer.dst);
    let ingress = ctx.ingress_ifindex() as u32;
    let (rc, params) = fib_query(
        ctx,
        outer,
        ip_len.saturating_add(OUTER_LEN as u16),
        ingress,
        // Not BPF_FIB_LOOKUP_SKIP_NEIGH, which kernels before 6.3 refuse: the MTU is
        // checked before the neighbour, so FRAG_NEEDED comes either way.
        0,
    );
    let df = inner_facts(&XdpPacket(ctx)).is_some_and(|(_, _, df)| df);
    if rc == FIB_FRAG_NEEDED && df {
        if !icmp::within_rate() {
            return xdp_action::XDP_DROP;
        }
        // SAFETY: the kernel filled in the MTU of the egress for this answer.
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
        return match frag_needed(ctx, mtu.saturating_sub(OUTER_LEN as u16)) {
            Ok(()) => {
                counters::event(EV_FRAG_NEEDED);
                xdp_action::XDP_PASS
            }
            Err(()) => xdp_action::XDP_DROP,
        };
    }
    match encapsulate(ctx, src, dst) {
        Ok(()) => {
            counters::event(EV_ENCAPSULATED);
            xdp_action::XDP_PASS
        }
        Err(()) => xdp_action::XDP_DROP,
    }
}

const _: () = assert!(size_of::<Ipv4Hdr>() == OUTER_LEN);

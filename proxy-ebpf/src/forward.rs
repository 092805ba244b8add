//! Forwarding translated packets without the kernel's input path.
//!
//! tc: after reverse NAT of a NodePort reply, or SNAT of a hairpin flow, a packet
//! that arrived on a pod interface carries one of this node's own addresses as its
//! source, and the kernel drops such a packet as a martian. These packets go
//! straight to their egress device instead: a FIB look-up for the egress interface,
//! a TTL (IPv6: hop limit) decrement (this is a routing hop), and `bpf_redirect_neigh`, which fills in
//! the link-layer addresses. Everything else continues through the normal stack, so
//! host firewalls and CNI policies still see pod traffic.
//!
//! XDP (redirect mode, `--xdp-forward redirect`): a full FIB look-up gives the egress
//! device and both MAC addresses; the frame leaves by XDP_TX (same device) or
//! XDP_REDIRECT. Without a resolved neighbour the packet takes the stack once, which
//! resolves it for the next ones.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action, TC_ACT_OK},
    helpers::generated::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::{TcContext, XdpContext},
    EbpfContext,
};
use network_types::eth::EthHdr;
use proxy_common::{
    CtKey, Family, CONFIG_XDP_FORWARD, EV_XDP_FIB_MISS, EV_XDP_REDIRECT, EV_XDP_TX, XDP_FORWARD_REDIRECT,
};

use crate::{
    checksum, counters,
    headers::IPV6_HOP_LIMIT,
    maps::NODE_CONFIG,
    packet::{Packet, XdpPacket, ETH_LEN, IP_CHECK},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;
/// `BPF_FIB_LKUP_RET_NO_NEIGH`: routed, the egress device filled in, its neighbour
/// not resolved yet.
const FIB_NO_NEIGH: i64 = 7;
const IP_TTL: usize = 8;

/// The kernel's answer (`BPF_FIB_LKUP_RET_*`) and the filled-in parameters for a
/// packet now carrying `tuple` (IP length `ip_len`, which the MTU is checked
/// against), entering on `ifindex`.
#[inline(always)]
pub fn fib_query(
    ctx: &impl EbpfContext,
    tuple: &CtKey,
    ip_len: u16,
    ifindex: u32,
    flags: u32,
) -> (i64, FibParams) {
    // SAFETY: an all-zero fib_lookup request is valid; the fields are set below.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.l4_protocol = tuple.proto;
    params.sport = tuple.sport;
    params.dport = tuple.dport;
    params.__bindgen_anon_1.tot_len = ip_len;
    params.ifindex = ifindex;
    if tuple.family == Family::V6.number() {
        params.family = AF_INET6;
        params.__bindgen_anon_3.ipv6_src = tuple.src.words;
        params.__bindgen_anon_4.ipv6_dst = tuple.dst.words;
    } else {
        params.family = AF_INET;
        params.__bindgen_anon_3.ipv4_src = tuple.src.v4_be();
        params.__bindgen_anon_4.ipv4_dst = tuple.dst.v4_be();
    }
    // SAFETY: helper with a valid, sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            flags,
        )
    };
    (rc, params)
}

/// The egress of a packet now carrying `tuple`, when the FIB has a complete answer.
#[inline(always)]
fn fib_lookup(
    ctx: &impl EbpfContext,
    tuple: &CtKey,
    ip_len: u16,
    ifindex: u32,
    flags: u32,
) -> Option<FibParams> {
    let (rc, params) = fib_query(ctx, tuple, ip_len, ifindex, flags);
    (rc == FIB_SUCCESS).then_some(params)
}

/// The TTL/protocol checksum word with the TTL one lower; None when it is spent.
#[inline(always)]
fn ttl_word_decremented(old: u16) -> Option<u16> {
    let mut bytes = old.to_ne_bytes();
    if bytes[0] <= 1 {
        return None;
    }
    bytes[0] -= 1;
    Some(u16::from_ne_bytes(bytes))
}

/// Redirects `ctx` (already rewritten to `tuple`) to its egress device; `TC_ACT_OK`
/// when the FIB has no answer or the TTL is spent (the stack then reports it).
#[inline(always)]
pub fn redirect_to_egress(ctx: &TcContext, tuple: &CtKey, ip_len: u16) -> i32 {
    // SAFETY: reading the context's ingress device.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // No BPF_FIB_LOOKUP_SKIP_NEIGH: kernels before 6.3 refuse the flag (EINVAL), and
    // every such reply then fell to the stack, which drops it as a martian (a
    // NodePort's local backend never reached its client on 5.10 and 6.1). Without it
    // an unresolved neighbour answers NO_NEIGH with the egress device, which is all
    // `bpf_redirect_neigh` needs.
    let (rc, params) = fib_query(ctx, tuple, ip_len, ifindex, 0);
    if rc != FIB_SUCCESS && rc != FIB_NO_NEIGH {
        return TC_ACT_OK;
    }
    let decremented = if tuple.family == Family::V6.number() {
        decrement_hop_limit(ctx)
    } else {
        decrement_ttl(ctx)
    };
    if decremented.is_err() {
        return TC_ACT_OK;
    }
    // SAFETY: helper without a parameter block: the neighbour is looked up for the
    // packet's destination on the egress device.
    unsafe { bpf_redirect_neigh(params.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// TTL - 1 with the IP checksum fixed; Err when the packet must not be forwarded.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext) -> Result<(), ()> {
    // TTL and protocol form one 16-bit checksum word; compare raw memory values.
    let old: u16 = ctx.load(ETH_LEN + IP_TTL).map_err(|_| ())?;
    let new = ttl_word_decremented(old).ok_or(())?;
    ctx.l3_csum_replace(ETH_LEN + IP_CHECK, u64::from(old), u64::from(new), 2)
        .map_err(|_| ())?;
    ctx.store(ETH_LEN + IP_TTL, &new, 0).map_err(|_| ())
}

/// IPv6's hop limit - 1 (no header checksum); Err when the packet must not be
/// forwarded.
#[inline(always)]
fn decrement_hop_limit(ctx: &TcContext) -> Result<(), ()> {
    let hops: u8 = ctx.load(ETH_LEN + IPV6_HOP_LIMIT).map_err(|_| ())?;
    if hops <= 1 {
        return Err(());
    }
    ctx.store(ETH_LEN + IPV6_HOP_LIMIT, &(hops - 1), 0)
        .map_err(|_| ())
}

#[inline(always)]
pub fn xdp_redirect_enabled() -> bool {
    NODE_CONFIG
        .get(CONFIG_XDP_FORWARD)
        .is_some_and(|v| v.as_u64() == XDP_FORWARD_REDIRECT)
}

/// Sends a translated frame out of its egress device from XDP; XDP_PASS when the
/// FIB cannot say where (or to whom) it goes, or its TTL is spent.
#[inline(always)]
pub fn xdp_transmit(ctx: &XdpContext, tuple: &CtKey, ip_len: u16) -> u32 {
    let ingress = ctx.ingress_ifindex() as u32;
    let Some(params) = fib_lookup(ctx, tuple, ip_len, ingress, 0) else {
        counters::event(EV_XDP_FIB_MISS);
        return xdp_action::XDP_PASS;
    };
    let packet = XdpPacket(ctx);
    if tuple.family == Family::V6.number() {
        let (Some(eth), Some(hops)) = (
            packet.ptr_at::<EthHdr>(0),
            packet.ptr_at::<u8>(ETH_LEN + IPV6_HOP_LIMIT),
        ) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: both pointers were bounds-checked by ptr_at.
        unsafe {
            if *hops <= 1 {
                return xdp_action::XDP_PASS;
            }
            *hops -= 1;
            (*eth).dst_addr = params.dmac;
            (*eth).src_addr = params.smac;
        }
        return transmit(ingress, params.ifindex);
    }
    let (Some(eth), Some(ttl), Some(check)) = (
        packet.ptr_at::<EthHdr>(0),
        packet.ptr_at::<u16>(ETH_LEN + IP_TTL),
        packet.ptr_at::<u16>(ETH_LEN + IP_CHECK),
    ) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: all three pointers were bounds-checked by ptr_at.
    unsafe {
        let old = ttl.read_unaligned();
        let Some(new) = ttl_word_decremented(old) else {
            return xdp_action::XDP_PASS;
        };
        ttl.write_unaligned(new);
        check.write_unaligned(checksum::replace16(check.read_unaligned(), old, new));
        (*eth).dst_addr = params.dmac;
        (*eth).src_addr = params.smac;
    }
    transmit(ingress, params.ifindex)
}

/// XDP_TX back out of the ingress device, or a redirect to another.
#[inline(always)]
fn transmit(ingress: u32, egress: u32) -> u32 {
    if egress == ingress {
        counters::event(EV_XDP_TX);
        return xdp_action::XDP_TX;
    }
    counters::event(EV_XDP_REDIRECT);
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(egress, 0) as u32 }
}

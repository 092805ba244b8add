//! Forwarding translated packets that the kernel's input path would refuse.
//!
//! After reverse NAT of a NodePort reply, or SNAT of a hairpin flow, a packet that
//! arrived on a pod interface carries one of this node's own addresses as its
//! source, and the kernel drops such a packet as a martian. These packets go
//! straight to their egress device instead: a FIB look-up for the egress interface,
//! a TTL decrement (this is a routing hop), and `bpf_redirect_neigh`, which fills in
//! the link-layer addresses. Everything else continues through the normal stack, so
//! host firewalls and CNI policies still see pod traffic.

use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, BPF_FIB_LOOKUP_SKIP_NEIGH, TC_ACT_OK},
    helpers::generated::{bpf_fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
    EbpfContext as _,
};
use proxy_common::CtKey;

use crate::packet::{ETH_LEN, IP_CHECK};

const AF_INET: u8 = 2;
const FIB_SUCCESS: i64 = 0;
const IP_TTL: usize = 8;

/// Redirects `ctx` (already rewritten to `tuple`) to its egress device; `TC_ACT_OK`
/// when the FIB has no answer or the TTL is spent (the stack then reports it).
#[inline(always)]
pub fn redirect_to_egress(ctx: &TcContext, tuple: &CtKey, ip_len: u16) -> i32 {
    // SAFETY: an all-zero fib_lookup request is valid; the fields are set below.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = tuple.proto;
    params.sport = tuple.sport;
    params.dport = tuple.dport;
    params.__bindgen_anon_1.tot_len = ip_len;
    // SAFETY: reading the context's ingress device.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    params.__bindgen_anon_3.ipv4_src = tuple.src.v4_be();
    params.__bindgen_anon_4.ipv4_dst = tuple.dst.v4_be();
    // SAFETY: helper with a valid, sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<FibParams>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc != FIB_SUCCESS {
        return TC_ACT_OK;
    }
    if decrement_ttl(ctx).is_err() {
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
    let ttl = old.to_ne_bytes()[0];
    if ttl <= 1 {
        return Err(());
    }
    let mut bytes = old.to_ne_bytes();
    bytes[0] = ttl - 1;
    let new = u16::from_ne_bytes(bytes);
    ctx.l3_csum_replace(ETH_LEN + IP_CHECK, u64::from(old), u64::from(new), 2)
        .map_err(|_| ())?;
    ctx.store(ETH_LEN + IP_TTL, &new, 0).map_err(|_| ())
}

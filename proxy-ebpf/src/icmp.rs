//! ICMP errors about translated flows (port unreachable, fragmentation needed, time
//! exceeded), translated back so that their receiver recognises its own packet:
//! the quoted packet becomes the one the receiver sent, before our translation, and
//! the error goes to it (its outer destination and, when the error came from the
//! translated-to host itself, its source). Without this, a client of a UDP service
//! whose backend has no listener would never learn it (the quoted tuple names the
//! backend, not the service it connected to).
//!
//! Everything ICMP is here: recognising an error (`parse_error`), translating it, and
//! refusing a new flow to a service without endpoints (port unreachable, as
//! kube-proxy's REJECT answers); fragmentation-needed before IPIP encapsulation is
//! built by `tunnel`, which owns the outer header it quotes.
//!
//! The flow is found from the quoted tuple: the error travels against the quoted
//! packet, so the quoted tuple reversed is the key of the entry for the error's own
//! direction, whose rewrite gives the receiver's view.

use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action, BPF_F_INGRESS, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use proxy_common::{
    Addr, CtKey, Family, Transport, CONFIG_SNAT_ADDR, EV_ICMP_RATE_LIMITED, EV_ICMP_TRANSLATED,
    ICMP_BURST,
};

use crate::{
    balancer, checksum, conntrack, counters,
    headers::{
        self, ipv4_header, ICMP_ECHO_REQUEST, ICMP_FRAG_NEEDED, ICMP_PORT_UNREACHABLE,
        ICMP_TIME_EXCEEDED, ICMP_UNREACHABLE, IP_MF, IP_OFFSET_MASK, PROTO_ICMP,
    },
    maps::{CONNTRACK, ICMP_BUDGET, NODE_CONFIG},
    packet::{Packet, TcPacket, XdpPacket, ETH_LEN, IP_CHECK, IP_DST, IP_SRC},
    settings,
    translate::{self, Action, Origin, Verdict},
};

/// ICMP here is ICMPv4: its packets and the flows they quote are IPv4 (ICMPv6 is
/// another protocol, with its own module when IPv6 is translated).
const V4: u8 = Family::V4.number();

/// Where the ICMP header starts: ICMP errors are only handled without IP options.
const ICMP_OFF: usize = ETH_LEN + 20;
/// Where the quoted IP header starts.
pub const QUOTED_OFF: usize = ICMP_OFF + 8;
/// Where the quoted ports start (after a quoted header without options); their end
/// is the last byte a translation rewrites.
const QUOTED_PORTS: usize = QUOTED_OFF + 20;

/// An ICMP error (destination unreachable, time exceeded) about a TCP or UDP packet.
struct IcmpError {
    pub outer_src: Addr,
    pub outer_dst: Addr,
    pub ip_len: u16,
    /// The quoted packet's tuple, as it travelled.
    pub quoted: CtKey,
}

/// The IPv4 and ICMP headers of an unfragmented ICMP packet without IP options: the
/// only ICMP the data path reads.
#[inline(always)]
fn icmp_headers<P: Packet>(pkt: &P) -> Option<(*const Ipv4Hdr, *const [u8; 8])> {
    let eth: *const EthHdr = pkt.ptr_at(0)?;
    let ip: *const Ipv4Hdr = pkt.ptr_at(ETH_LEN)?;
    let icmp: *const [u8; 8] = pkt.ptr_at(ICMP_OFF)?;
    // SAFETY: every pointer is bounds-checked.
    let plain = unsafe {
        (*eth).ether_type == EtherType::Ipv4 as u16
            && (*ip).vihl == 0x45
            && headers::ipv4_proto(ip) == PROTO_ICMP
            && u16::from_be_bytes((*ip).frags) & (IP_MF | IP_OFFSET_MASK) == 0
    };
    plain.then_some((ip, icmp))
}

/// An ICMP error (its headers from `icmp_headers`) whose quoted headers (without
/// options, and the quoted ports) are all in the packet.
#[inline(always)]
fn parse_error<P: Packet>(pkt: &P, ip: *const Ipv4Hdr, icmp: *const [u8; 8]) -> Option<IcmpError> {
    let quoted: *const Ipv4Hdr = pkt.ptr_at(QUOTED_OFF)?;
    let ports: *const [u16; 2] = pkt.ptr_at(QUOTED_PORTS)?;
    // SAFETY: every pointer is bounds-checked (`ip` and `icmp` by `icmp_headers`).
    unsafe {
        if !matches!((*icmp)[0], ICMP_UNREACHABLE | ICMP_TIME_EXCEEDED) || (*quoted).vihl != 0x45 {
            return None;
        }
        let proto = headers::ipv4_proto(quoted);
        Transport::from_number(proto)?;
        let ip_len = u16::from_be_bytes((*ip).tot_len);
        // The fields a translation rewrites must be in the packet the IP header
        // describes, not in the frame's padding beyond it: the receiver trims that
        // away, and with it what the checksum was folded over.
        if usize::from(ip_len) < QUOTED_PORTS + 4 - ETH_LEN {
            return None;
        }
        let ports = ports.read_unaligned();
        Some(IcmpError {
            outer_src: Addr::from_v4_be(u32::from_ne_bytes((*ip).src_addr)),
            outer_dst: Addr::from_v4_be(u32::from_ne_bytes((*ip).dst_addr)),
            ip_len,
            quoted: CtKey {
                src: Addr::from_v4_be(u32::from_ne_bytes((*quoted).src_addr)),
                dst: Addr::from_v4_be(u32::from_ne_bytes((*quoted).dst_addr)),
                sport: ports[0],
                dport: ports[1],
                proto,
                family: V4,
                _pad: [0; 2],
            },
        })
    }
}

/// The ICMP checksum: at offset 2 of the ICMP header.
const ICMP_CHECK: usize = ICMP_OFF + 2;

// An echo request (ping) to a service address is refused like any port or protocol
// of it that no service has (kube-proxy's nftables mode rejects them all with port
// unreachable): nobody outside owns the address, so a request let out leaks towards
// the default gateway, and one to a LoadBalancer IP routed to the node bounces
// between the node and its router until its TTL runs out. Answering instead (IPVS's
// way, whose VIPs sit on a local interface) would tell a prober the service is up
// when it may have no endpoint.

/// What the data path does with ICMP: an echo request follows the rule for what no
/// frontend takes at a service address (`translate::refused_at_service_address`); an
/// error about one of our flows is translated; anything else passes.
#[inline(always)]
pub fn handle<P: Packet>(pkt: &P, origin: Origin) -> Verdict {
    let Some((ip, icmp)) = icmp_headers(pkt) else {
        return Verdict::PASS;
    };
    // SAFETY: bounds-checked by `icmp_headers`.
    let (kind, dst) = unsafe { ((*icmp)[0], u32::from_ne_bytes((*ip).dst_addr)) };
    if kind == ICMP_ECHO_REQUEST {
        return translate::refused_at_service_address(origin, V4, &Addr::from_v4_be(dst));
    }
    translate_parsed_error(pkt, ip, icmp)
}

#[inline(always)]
fn translate_parsed_error<P: Packet>(pkt: &P, ip: *const Ipv4Hdr, icmp: *const [u8; 8]) -> Verdict {
    let Some(error) = parse_error(pkt, ip, icmp) else {
        return Verdict::PASS;
    };
    let outer = (&error.outer_src, &error.outer_dst);
    let Some((sent, outer_src)) = translation(outer, &error.quoted) else {
        return Verdict::PASS;
    };
    if rewrite(pkt, &error, &sent, outer_src).is_err() {
        return Verdict::DROP;
    }
    translated(&sent, outer_src, error.ip_len, PROTO_ICMP)
}

/// How an ICMP or ICMPv6 error (`icmp6`) from `outer` (source, destination) about
/// the `quoted` tuple, as it travelled, is translated when it is about one of our
/// flows: to quote the tuple its receiver sent before our translation (returned
/// first), and to come from the service's address when the translated-to host sent
/// it (its new source, second). `None`: not ours, it passes.
#[inline(always)]
pub fn translation((outer_src, outer_dst): (&Addr, &Addr), quoted: &CtKey) -> Option<(CtKey, Addr)> {
    // The error goes to the quoted packet's sender, or it is none of our business.
    if *outer_dst != quoted.src {
        return None;
    }
    let own_key = quoted.reversed();
    // SAFETY: copied out at once.
    let entry = (unsafe { CONNTRACK.get(own_key) }).copied()?;
    let sent = own_key.rewritten(&entry).reversed();
    let new_src = if *outer_src == quoted.dst {
        sent.dst
    } else {
        *outer_src
    };
    Some((sent, new_src))
}

/// The verdict of an error rewritten as `translation` said: an ICMP (`proto`) packet
/// from `outer_src` to the sender of `sent`.
#[inline(always)]
pub fn translated(sent: &CtKey, outer_src: Addr, ip_len: u16, proto: u8) -> Verdict {
    counters::event(EV_ICMP_TRANSLATED);
    Verdict {
        action: Action::Translated,
        tuple: CtKey {
            src: outer_src,
            dst: sent.src,
            sport: 0,
            dport: 0,
            proto,
            family: sent.family,
            _pad: [0; 2],
        },
        ip_len,
        node_source: balancer::is_node_address(sent.family, &outer_src),
    }
}

/// The quoted addresses keep the quoted IP header's checksum right, which leaves the
/// ICMP checksum unchanged (the header still sums to all ones); the quoted ports
/// change the ICMP checksum; the outer addresses, the outer IP checksum. The quoted
/// L4 checksum is left as it was (nobody checks it in an error).
#[inline(always)]
fn rewrite<P: Packet>(pkt: &P, error: &IcmpError, sent: &CtKey, outer_src: Addr) -> Result<(), ()> {
    let quoted = &error.quoted;
    let quoted_check = QUOTED_OFF + IP_CHECK;
    let words = [
        (QUOTED_OFF + IP_SRC, quoted_check, quoted.src, sent.src),
        (QUOTED_OFF + IP_DST, quoted_check, quoted.dst, sent.dst),
        (
            ETH_LEN + IP_DST,
            ETH_LEN + IP_CHECK,
            error.outer_dst,
            sent.src,
        ),
        (
            ETH_LEN + IP_SRC,
            ETH_LEN + IP_CHECK,
            error.outer_src,
            outer_src,
        ),
    ];
    for (offset, check, old, new) in words {
        if old != new {
            pkt.rewrite_word32(offset, check, old.v4_be(), new.v4_be())?;
        }
    }
    let ports = [
        (QUOTED_PORTS, quoted.sport, sent.sport),
        (QUOTED_PORTS + 2, quoted.dport, sent.dport),
    ];
    for (offset, old, new) in ports {
        if old != new {
            pkt.rewrite_word16(offset, ICMP_CHECK, old, new)?;
        }
    }
    Ok(())
}

/// A CPU's budget for the ICMP errors the data path builds itself: time earned at
/// one error per `icmp_interval_ns`, up to `ICMP_BURST` errors' worth (a token bucket
/// counted in nanoseconds, so that a refill needs no division).
#[repr(C)]
pub struct IcmpBudget {
    earned_ns: u64,
    stamp_ns: u64,
}

/// Whether this CPU may send another ICMP error now, as the kernel's
/// `icmp_global_allow` decides for its own: a flood of packets that are refused
/// (or that need fragmentation) gets answers at the configured rate and is dropped
/// beyond it (`EV_ICMP_RATE_LIMITED`), so it cannot turn the node into a
/// generator of ICMP at line rate, towards sources that may be forged.
#[inline(always)]
pub fn within_rate() -> bool {
    let interval = settings::icmp_interval_ns();
    if interval == 0 {
        return true;
    }
    let Some(budget) = ICMP_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot, private while the program runs.
    let budget = unsafe { &mut *budget };
    let now = conntrack::now_ns();
    let full = interval * ICMP_BURST;
    // A fresh slot (stamp 0) starts with the full burst, not with the time since
    // boot (less than a burst's worth on a machine up for under 50 s at 1 a second).
    let earned = match budget.stamp_ns {
        0 => full,
        stamp => budget
            .earned_ns
            .saturating_add(now.saturating_sub(stamp))
            .min(full),
    };
    budget.stamp_ns = now;
    if earned < interval {
        budget.earned_ns = earned;
        counters::event(EV_ICMP_RATE_LIMITED);
        return false;
    }
    budget.earned_ns = earned - interval;
    true
}

/// A refusal: Ethernet, IP, ICMP header, and the quoted IP header with 8 bytes.
const REFUSAL_LEN: usize = ETH_LEN + 20 + 8 + 28;

/// Turns the packet into its refusal in place, within the ICMP rate, and hands it to
/// the kernel (`refuse_xdp_as`).
#[inline(always)]
pub fn refuse_xdp(ctx: &XdpContext) -> u32 {
    error_xdp(ctx, write_refusal_headers)
}

/// Turns a packet that does not fit its path (a `tunnel`'s) into ICMP
/// fragmentation-needed for its sender, from this node's address, `mtu` being what
/// fits, as a router on the path would answer; dropped when the node has no IPv4
/// address.
#[inline(always)]
pub fn frag_needed_xdp(ctx: &XdpContext, mtu: u16) -> u32 {
    let node = match NODE_CONFIG.get(CONFIG_SNAT_ADDR) {
        Some(config) if !config.addr.is_zero() => config.addr,
        _ => return xdp_action::XDP_DROP,
    };
    let m = mtu.to_be_bytes();
    error_xdp(ctx, |frame: &mut [u8; REFUSAL_LEN]| {
        let sender = quoted_address(frame, IP_SRC);
        write_error_headers(frame, ICMP_FRAG_NEEDED, [0, 0, m[0], m[1]], node, sender);
    })
}

/// An XDP frame turned into an ICMP error about it (`refuse_xdp_as`).
#[inline(always)]
fn error_xdp(ctx: &XdpContext, write_headers: impl FnOnce(&mut [u8; REFUSAL_LEN])) -> u32 {
    // A header with options is not quoted (the quote is a fixed 28 bytes): dropped,
    // before the frame is touched.
    let options = XdpPacket(ctx)
        .ptr_at::<u8>(ETH_LEN)
        // SAFETY: bounds-checked.
        .is_none_or(|vihl| unsafe { *vihl } != 0x45);
    if options {
        return xdp_action::XDP_DROP;
    }
    refuse_xdp_as::<REFUSAL_LEN, 28>(ctx, write_headers)
}

/// Turns an XDP frame into an ICMP error about it, in place (XDP memory is the
/// packet's: no frame on the stack), within the ICMP rate: the frame becomes `N`
/// bytes (grown with zeros or cut), the first `QUOTE` bytes after its Ethernet header
/// move to its end as the quote, and `write_headers` fills what lies between. Then
/// it goes to the kernel, which routes it to the client (as `tunnel`'s
/// fragmentation-needed): XDP_TX would send it back to the previous hop, but a veth
/// peer without XDP or GRO drops what it gets that way. IPv4's refusal and IPv6's
/// (`icmp6`).
#[inline(always)]
pub fn refuse_xdp_as<const N: usize, const QUOTE: usize>(
    ctx: &XdpContext,
    write_headers: impl FnOnce(&mut [u8; N]),
) -> u32 {
    if !within_rate() {
        return xdp_action::XDP_DROP;
    }
    let len = (ctx.data_end() - ctx.data()) as i32;
    // Room for the whole error first; what lies beyond it goes last.
    let grow = N as i32 - len;
    // SAFETY: helper on the program's own context.
    if grow > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, grow) } != 0 {
        return xdp_action::XDP_DROP;
    }
    // The frame's bounds read afresh (volatile): LLVM otherwise reuses, on the path
    // that did not adjust the tail, the end it read for `len`, as a 32-bit value the
    // verifier no longer takes for the packet's end.
    // SAFETY: reading the context's own fields.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&raw const (*ctx.ctx).data_end) as usize,
        )
    };
    if start + N > end {
        return xdp_action::XDP_DROP;
    }
    let frame = start as *mut [u8; N];
    // SAFETY: the whole error is bounds-checked.
    unsafe {
        let frame = &mut *frame;
        move_quote::<N, QUOTE>(frame);
        write_headers(frame);
    }
    // SAFETY: as above; the frame only shrinks.
    if grow < 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, grow) } != 0 {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_PASS
}

/// Moves the `QUOTE` bytes after the Ethernet header to the frame's end, through a
/// copy (the two ranges overlap when the quote is longer than the headers before it).
#[inline(always)]
fn move_quote<const N: usize, const QUOTE: usize>(frame: &mut [u8; N]) {
    let mut quoted = [0u8; QUOTE];
    quoted.copy_from_slice(&frame[ETH_LEN..ETH_LEN + QUOTE]);
    frame[N - QUOTE..].copy_from_slice(&quoted);
}

/// The IP and ICMP headers of an ICMP error (destination unreachable with `code`,
/// `rest` the last 4 bytes of its header) whose Ethernet header and quote (from
/// `QUOTED_OFF` to the end of the frame) are in place, from `src` to `dst`, with the
/// ICMP checksum over header and quote. The errors the data path builds itself: a
/// refusal and fragmentation-needed.
#[inline(always)]
pub fn write_error_headers<const N: usize>(
    frame: &mut [u8; N],
    code: u8,
    rest: [u8; 4],
    src: Addr,
    dst: Addr,
) {
    let ip = ipv4_header(0xc0, (N - ETH_LEN) as u16, false, PROTO_ICMP, src, dst);
    for (i, w) in ip.iter().enumerate() {
        let b = w.to_ne_bytes();
        frame[ETH_LEN + 2 * i] = b[0];
        frame[ETH_LEN + 2 * i + 1] = b[1];
    }
    frame[ICMP_OFF..QUOTED_OFF].copy_from_slice(&[
        ICMP_UNREACHABLE,
        code,
        0,
        0,
        rest[0],
        rest[1],
        rest[2],
        rest[3],
    ]);
    store_checksum(frame, ICMP_OFF, ICMP_CHECK, 0);
}

/// Stores at `check` the checksum of the frame's 16-bit words from `from` to its end
/// plus `extra` (a pseudo-header's words not in the frame), the checksum field
/// itself zero: the ICMP errors the data path builds, of either family (`icmp6`).
#[inline(always)]
pub fn store_checksum<const N: usize>(frame: &mut [u8; N], from: usize, check: usize, extra: u64) {
    let mut sum = extra;
    let mut i = from;
    while i + 1 < N {
        sum += u64::from(u16::from_ne_bytes([frame[i], frame[i + 1]]));
        i += 2;
    }
    let sum = checksum::finish(sum).to_ne_bytes();
    frame[check] = sum[0];
    frame[check + 1] = sum[1];
}

/// A refusal's headers: port unreachable from the address the quoted packet was sent
/// to (the service's), to its sender.
#[inline(always)]
fn write_refusal_headers<const N: usize>(frame: &mut [u8; N]) {
    let sender = quoted_address(frame, IP_SRC);
    let service = quoted_address(frame, IP_DST);
    write_error_headers(frame, ICMP_PORT_UNREACHABLE, [0; 4], service, sender);
}

/// An address of the IPv4 header an error quotes (`field` its offset in the header).
#[inline(always)]
fn quoted_address<const N: usize>(frame: &[u8; N], field: usize) -> Addr {
    let at = QUOTED_OFF + field;
    Addr::from_v4_be(u32::from_ne_bytes([
        frame[at],
        frame[at + 1],
        frame[at + 2],
        frame[at + 3],
    ]))
}

/// Swaps the Ethernet addresses: the frame goes back where it came from (tc sends it
/// out of the interface it came in on).
#[inline(always)]
fn swap_macs<const N: usize>(frame: &mut [u8; N]) {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[..6]);
    frame.copy_within(6..12, 0);
    frame[6..12].copy_from_slice(&mac);
}

/// An error built by tc quotes 64 bytes of the refused packet (for IPv4 its IP header
/// and 44 bytes: RFC 1812 allows more than RFC 792's 8; for IPv6 its header and 24),
/// zero-padded when it is shorter: the kernel will not cut an skb short of a
/// checksum field a local socket left to offload (TCP over IPv4: offset 36 of the IP
/// packet; over IPv6: 56), so the quote must reach past it.
pub const TC_QUOTE: usize = 64;
const TC_REFUSAL_LEN: usize = QUOTED_OFF + TC_QUOTE;

/// Where a refusal built by a tc program goes: back to whoever sent the packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    /// A pod, whose packet the tc ingress hook of its interface saw: out of that
    /// interface towards it.
    Pod,
    /// The node itself (or what it forwards), whose packet an egress hook saw: into
    /// the node's stack, as if it arrived on that interface.
    Node,
}

/// Turns the packet into its refusal in place and sends it back to its `sender`,
/// within the ICMP rate (`refuse_tc_as`).
#[inline(always)]
pub fn refuse_tc(ctx: &TcContext, sender: Sender) -> i32 {
    let options = TcPacket(ctx)
        .ptr_at::<u8>(ETH_LEN)
        // SAFETY: bounds-checked.
        .is_none_or(|vihl| unsafe { *vihl } != 0x45);
    if options {
        return TC_ACT_SHOT;
    }
    refuse_tc_as::<TC_REFUSAL_LEN>(ctx, sender, write_refusal_headers)
}

/// Turns an skb into an ICMP error about it, in place, and sends it back to its
/// `sender`, within the ICMP rate: room for the new headers is made between the
/// Ethernet and IP headers, which leaves the quote where it belongs, and the packet
/// becomes `N` bytes (cut, or zero-padded); `write_headers` fills the headers. No
/// frame on the stack (the pod program's is nearly full). The MAC addresses are
/// swapped, so that an error entering the node's stack is addressed to the
/// interface's own. IPv4's refusal and IPv6's (`icmp6`).
#[inline(always)]
pub fn refuse_tc_as<const N: usize>(
    ctx: &TcContext,
    sender: Sender,
    write_headers: impl FnOnce(&mut [u8; N]),
) -> i32 {
    // The headers inserted: everything before the quote but the Ethernet header.
    let room = (N - ETH_LEN) as i32 - TC_QUOTE as i32;
    if !within_rate()
        || ctx.adjust_room(room, BPF_ADJ_ROOM_MAC, 0).is_err()
        // SAFETY: helper on the program's own context.
        || unsafe { bpf_skb_change_tail(ctx.skb.skb, N as u32, 0) } != 0
        || ctx.pull_data(N as u32).is_err()
    {
        return TC_ACT_SHOT;
    }
    let Some(frame) = TcPacket(ctx).ptr_at::<[u8; N]>(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: bounds-checked, linear packet memory the program may write.
    unsafe {
        let frame = &mut *frame;
        swap_macs(frame);
        write_headers(frame);
    }
    // SAFETY: reading the context's own field.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let flags = match sender {
        Sender::Pod => 0,
        Sender::Node => u64::from(BPF_F_INGRESS),
    };
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, flags) as i32 }
}

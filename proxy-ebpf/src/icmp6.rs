//! ICMPv6 in IPv6's programs, as `icmp` is for IPv4: errors about translated flows
//! (destination unreachable, packet too big, time exceeded) translated back so that
//! their receiver recognises its own packet, and the refusal (port unreachable) of a
//! new flow to a service without endpoints, built in place. Neighbour discovery,
//! router advertisements and every other message pass untouched (IPv6 does not work
//! without them); a ping of a service address follows the rule for what no frontend
//! takes (`translate::refused_at_service_address`).
//!
//! The difference from ICMPv4 that shapes this module: the ICMPv6 checksum covers a
//! pseudo-header (RFC 4443 section 2.3), so rewriting the outer addresses changes it,
//! and there is no quoted IP header checksum to absorb the quoted addresses' change:
//! every rewritten field is folded into the one ICMPv6 checksum.
//!
//! Errors are read only as hosts and routers send them: the ICMPv6 header right after
//! the fixed IPv6 header, the quoted packet's transport header right after its fixed
//! header. Anything else passes untouched.

use aya_ebpf::{
    bindings::xdp_action,
    programs::{TcContext, XdpContext},
};
use proxy_common::{Addr, CtKey, Family, Transport, CONFIG_SNAT_ADDR6, PROTO_ICMPV6};

use crate::{
    checksum,
    headers::{
        ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG, ICMPV6_PORT_UNREACHABLE, ICMPV6_TIME_EXCEEDED,
        ICMPV6_UNREACHABLE, IPV6_DST, IPV6_LEN, IPV6_NEXT_HEADER, IPV6_PAYLOAD_LEN, IPV6_SRC,
    },
    icmp::{self, Sender, TC_QUOTE},
    maps::NODE_CONFIG,
    packet::{Packet, ETH_LEN},
    parse::{self, addr_at},
    translate::{self, Origin, Verdict},
};

const V6: u8 = Family::V6.number();

/// Where the ICMPv6 header starts: right after the fixed IPv6 header.
const ICMP6_OFF: usize = ETH_LEN + IPV6_LEN;
const ICMP6_CHECK: usize = ICMP6_OFF + 2;
/// Where the quoted IPv6 header starts, and its transport ports.
const QUOTED_OFF: usize = ICMP6_OFF + 8;
const QUOTED_PORTS: usize = QUOTED_OFF + IPV6_LEN;

#[inline(always)]
pub fn handle<P: Packet>(pkt: &P, origin: Origin) -> Verdict {
    let Some((dst, kind)) = parse::icmpv6_type(pkt) else {
        return Verdict::PASS;
    };
    match kind {
        ICMPV6_ECHO_REQUEST => translate::refused_at_service_address(origin, V6, &dst),
        ICMPV6_UNREACHABLE | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED => {
            translate_error(pkt)
        }
        _ => Verdict::PASS,
    }
}

/// An ICMPv6 error about a TCP, UDP or SCTP packet, as it travelled.
struct IcmpError {
    outer_src: Addr,
    outer_dst: Addr,
    ip_len: u16,
    check: u16,
    quoted: CtKey,
}

#[inline(always)]
fn parse_error<P: Packet>(pkt: &P) -> Option<IcmpError> {
    let ip: *const [u8; IPV6_LEN] = pkt.ptr_at(ETH_LEN)?;
    let check: *const u16 = pkt.ptr_at(ICMP6_CHECK)?;
    let quoted: *const [u8; IPV6_LEN] = pkt.ptr_at(QUOTED_OFF)?;
    let ports: *const [u16; 2] = pkt.ptr_at(QUOTED_PORTS)?;
    // SAFETY: every pointer is bounds-checked.
    unsafe {
        let proto = (*quoted)[IPV6_NEXT_HEADER];
        if (*ip)[IPV6_NEXT_HEADER] != PROTO_ICMPV6 || (*quoted)[0] >> 4 != 6 {
            return None;
        }
        Transport::from_number(proto)?;
        let ports = ports.read_unaligned();
        let payload = u16::from_be_bytes([(*ip)[IPV6_PAYLOAD_LEN], (*ip)[IPV6_PAYLOAD_LEN + 1]]);
        // As for IPv4 (`icmp::parse_error`): what is rewritten must be in the payload.
        if usize::from(payload) < QUOTED_PORTS + 4 - ICMP6_OFF {
            return None;
        }
        Some(IcmpError {
            outer_src: addr_at(pkt, ETH_LEN + IPV6_SRC)?,
            outer_dst: addr_at(pkt, ETH_LEN + IPV6_DST)?,
            ip_len: payload.saturating_add(IPV6_LEN as u16),
            check: check.read_unaligned(),
            quoted: CtKey {
                src: addr_at(pkt, QUOTED_OFF + IPV6_SRC)?,
                dst: addr_at(pkt, QUOTED_OFF + IPV6_DST)?,
                sport: ports[0],
                dport: ports[1],
                proto,
                family: V6,
                _pad: [0; 2],
            },
        })
    }
}

/// The error translated as IPv4's are (`icmp::translation`).
#[inline(always)]
fn translate_error<P: Packet>(pkt: &P) -> Verdict {
    let Some(error) = parse_error(pkt) else {
        return Verdict::PASS;
    };
    let outer = (&error.outer_src, &error.outer_dst);
    let Some((sent, outer_src)) = icmp::translation(outer, &error.quoted) else {
        return Verdict::PASS;
    };
    if rewrite(pkt, &error, &sent, outer_src).is_err() {
        return Verdict::DROP;
    }
    icmp::translated(&sent, outer_src, error.ip_len, PROTO_ICMPV6)
}

/// Every changed field is folded into the ICMPv6 checksum, which is stored last: the
/// packet's one's complement sum over the outer header and the message stays what it
/// was, so a CHECKSUM_COMPLETE skb's sum needs no update. The quoted transport
/// checksum is left as it was (nobody checks it in an error).
#[inline(always)]
fn rewrite<P: Packet>(pkt: &P, error: &IcmpError, sent: &CtKey, outer_src: Addr) -> Result<(), ()> {
    let quoted = &error.quoted;
    let mut check = error.check;
    replace_addr(pkt, ETH_LEN + IPV6_SRC, &error.outer_src, &outer_src, &mut check)?;
    replace_addr(pkt, ETH_LEN + IPV6_DST, &error.outer_dst, &sent.src, &mut check)?;
    replace_addr(pkt, QUOTED_OFF + IPV6_SRC, &quoted.src, &sent.src, &mut check)?;
    replace_addr(pkt, QUOTED_OFF + IPV6_DST, &quoted.dst, &sent.dst, &mut check)?;
    let ports = [
        (QUOTED_PORTS, quoted.sport, sent.sport),
        (QUOTED_PORTS + 2, quoted.dport, sent.dport),
    ];
    for (offset, old, new) in ports {
        if old != new {
            check = checksum::replace16(check, old, new);
            pkt.store(offset, new.to_ne_bytes())?;
        }
    }
    pkt.store(ICMP6_CHECK, check.to_ne_bytes())
}

/// One address of `rewrite`, by reference: an array of them filled the stack.
#[inline(always)]
fn replace_addr<P: Packet>(
    pkt: &P,
    offset: usize,
    old: &Addr,
    new: &Addr,
    check: &mut u16,
) -> Result<(), ()> {
    if old != new {
        *check = checksum::replace128(*check, old, new);
        pkt.store(offset, new.v6_octets())?;
    }
    Ok(())
}

/// A refusal: Ethernet, IPv6 and ICMPv6 headers, and a quote of 64 bytes (the refused
/// packet's IPv6 header and 24 bytes: its ports and, for TCP, its checksum, which the
/// kernel needs in the quote of an skb, see `icmp::TC_QUOTE`), from XDP and tc alike.
const REFUSAL_LEN: usize = QUOTED_OFF + TC_QUOTE;

/// Turns the packet into its refusal in place (`icmp::refuse_xdp_as`).
#[inline(always)]
pub fn refuse_xdp(ctx: &XdpContext) -> u32 {
    icmp::refuse_xdp_as::<REFUSAL_LEN, TC_QUOTE>(ctx, write_refusal_headers)
}

/// Turns a packet that does not fit its path (a `tunnel`'s) into packet too big for
/// its sender, from this node's IPv6 address, `mtu` being what fits, as a router on
/// the path would answer; dropped when the node has no IPv6 address. Quoted as a
/// refusal is (64 bytes; RFC 4443 allows up to 1,280).
#[inline(always)]
pub fn too_big_xdp(ctx: &XdpContext, mtu: u16) -> u32 {
    let node = match NODE_CONFIG.get(CONFIG_SNAT_ADDR6) {
        Some(config) if !config.addr.is_zero() => config.addr.v6_octets(),
        _ => return xdp_action::XDP_DROP,
    };
    let mtu = u32::from(mtu).to_be_bytes();
    icmp::refuse_xdp_as::<REFUSAL_LEN, TC_QUOTE>(ctx, |frame: &mut [u8; REFUSAL_LEN]| {
        write_error_headers(frame, [ICMPV6_PACKET_TOO_BIG, 0], mtu, Some(node));
    })
}

/// Turns the packet into its refusal in place and sends it back to its `sender`
/// (`icmp::refuse_tc_as`).
#[inline(always)]
pub fn refuse_tc(ctx: &TcContext, sender: Sender) -> i32 {
    icmp::refuse_tc_as::<REFUSAL_LEN>(ctx, sender, write_refusal_headers)
}

/// A refusal's headers: port unreachable from the address the quoted packet was sent
/// to (the service's).
#[inline(always)]
fn write_refusal_headers<const N: usize>(frame: &mut [u8; N]) {
    write_error_headers(
        frame,
        [ICMPV6_UNREACHABLE, ICMPV6_PORT_UNREACHABLE],
        [0; 4],
        None,
    );
}

/// The headers of an ICMPv6 error (`kind`: type and code; `rest`: the last 4 bytes of
/// its header) whose quote is in place, to the quoted packet's sender, from `from` or
/// else from the address the quoted packet was sent to, with the ICMPv6 checksum over
/// the pseudo-header and the message. The addresses and the message lie back to back
/// from the IPv6 source address to the frame's end: one sum covers them, and the
/// pseudo-header's length and next header are added to it.
#[inline(always)]
fn write_error_headers<const N: usize>(
    frame: &mut [u8; N],
    kind: [u8; 2],
    rest: [u8; 4],
    from: Option<[u8; 16]>,
) {
    let payload = ((N - ICMP6_OFF) as u16).to_be_bytes();
    let header = [
        0x60,
        0,
        0,
        0,
        payload[0],
        payload[1],
        PROTO_ICMPV6,
        64,
    ];
    frame[ETH_LEN..ETH_LEN + IPV6_SRC].copy_from_slice(&header);
    let (mut sender, mut service) = ([0u8; 16], [0u8; 16]);
    sender.copy_from_slice(&frame[QUOTED_OFF + IPV6_SRC..QUOTED_OFF + IPV6_SRC + 16]);
    service.copy_from_slice(&frame[QUOTED_OFF + IPV6_DST..QUOTED_OFF + IPV6_DST + 16]);
    let source = from.unwrap_or(service);
    frame[ETH_LEN + IPV6_SRC..ETH_LEN + IPV6_SRC + 16].copy_from_slice(&source);
    frame[ETH_LEN + IPV6_DST..ETH_LEN + IPV6_DST + 16].copy_from_slice(&sender);
    frame[ICMP6_OFF..QUOTED_OFF].copy_from_slice(&[
        kind[0], kind[1], 0, 0, rest[0], rest[1], rest[2], rest[3],
    ]);
    let pseudo_header_rest =
        u64::from(u16::from_ne_bytes(payload)) + u64::from(u16::from_ne_bytes([0, PROTO_ICMPV6]));
    icmp::store_checksum(frame, ETH_LEN + IPV6_SRC, ICMP6_CHECK, pseudo_header_rest);
}

//! ICMP errors about translated flows (port unreachable, fragmentation needed, time
//! exceeded), translated back so that their receiver recognises its own packet:
//! the quoted packet becomes the one the receiver sent, before our translation, and
//! the error goes to it (its outer destination and, when the error came from the
//! translated-to host itself, its source). Without this, a client of a UDP service
//! whose backend has no listener would never learn it (the quoted tuple names the
//! backend, not the service it connected to).
//!
//! Everything ICMP is here: recognising an error (`parse_error`) and translating it;
//! the errors the data path generates itself (fragmentation needed before IPIP
//! encapsulation) are built by `tunnel`, which owns the outer header they quote.
//!
//! The flow is found from the quoted tuple: the error travels against the quoted
//! packet, so the quoted tuple reversed is the key of the entry for the error's own
//! direction, whose rewrite gives the receiver's view.

use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};
use proxy_common::{Addr, CtKey, EV_ICMP_TRANSLATED};

use crate::{
    balancer, counters,
    headers::{
        self, Transport, ICMP_TIME_EXCEEDED, ICMP_UNREACHABLE, IP_MF, IP_OFFSET_MASK, PROTO_ICMP,
    },
    maps::CONNTRACK,
    packet::{Packet, ETH_LEN, IP_CHECK, IP_DST, IP_SRC},
    translate::{Action, Verdict},
};

/// Where the ICMP header starts: ICMP errors are only handled without IP options.
const ICMP_OFF: usize = ETH_LEN + 20;
/// Where the quoted IP header starts.
pub const QUOTED_OFF: usize = ICMP_OFF + 8;

/// An ICMP error (destination unreachable, time exceeded) about a TCP or UDP packet.
struct IcmpError {
    pub outer_src: Addr,
    pub outer_dst: Addr,
    pub ip_len: u16,
    /// The quoted packet's tuple, as it travelled.
    pub quoted: CtKey,
}

/// An ICMP error whose headers (outer and quoted, both without options, and the
/// quoted ports) are all in the packet.
#[inline(always)]
fn parse_error<P: Packet>(pkt: &P) -> Option<IcmpError> {
    let eth: *const EthHdr = pkt.ptr_at(0)?;
    let ip: *const Ipv4Hdr = pkt.ptr_at(ETH_LEN)?;
    let icmp: *const [u8; 8] = pkt.ptr_at(ICMP_OFF)?;
    let quoted: *const Ipv4Hdr = pkt.ptr_at(QUOTED_OFF)?;
    let ports: *const [u16; 2] = pkt.ptr_at(QUOTED_OFF + 20)?;
    // SAFETY: every pointer is bounds-checked.
    unsafe {
        if (*eth).ether_type != EtherType::Ipv4 as u16
            || (*ip).vihl != 0x45
            || headers::ipv4_proto(ip) != PROTO_ICMP
            || u16::from_be_bytes((*ip).frags) & (IP_MF | IP_OFFSET_MASK) != 0
            || !matches!((*icmp)[0], ICMP_UNREACHABLE | ICMP_TIME_EXCEEDED)
            || (*quoted).vihl != 0x45
        {
            return None;
        }
        let proto = headers::ipv4_proto(quoted);
        Transport::from_number(proto)?;
        let ports = ports.read_unaligned();
        Some(IcmpError {
            outer_src: Addr::from_v4_be(u32::from_ne_bytes((*ip).src_addr)),
            outer_dst: Addr::from_v4_be(u32::from_ne_bytes((*ip).dst_addr)),
            ip_len: u16::from_be_bytes((*ip).tot_len),
            quoted: CtKey {
                src: Addr::from_v4_be(u32::from_ne_bytes((*quoted).src_addr)),
                dst: Addr::from_v4_be(u32::from_ne_bytes((*quoted).dst_addr)),
                sport: ports[0],
                dport: ports[1],
                proto,
                _pad: [0; 3],
            },
        })
    }
}

/// The ICMP checksum: at offset 2 of the ICMP header.
const ICMP_CHECK: usize = ICMP_OFF + 2;

#[inline(always)]
pub fn translate_error<P: Packet>(pkt: &P) -> Verdict {
    let Some(error) = parse_error(pkt) else {
        return Verdict::PASS;
    };
    let quoted = error.quoted;
    // The error goes to the quoted packet's sender, or it is none of our business.
    if error.outer_dst != quoted.src {
        return Verdict::PASS;
    }
    let own_key = quoted.reversed();
    // SAFETY: copied out at once.
    let Some(entry) = (unsafe { CONNTRACK.get(own_key) }).copied() else {
        return Verdict::PASS;
    };
    // What the receiver sent, before our translation.
    let sent = own_key.rewritten(&entry).reversed();
    let outer_src = if error.outer_src == quoted.dst {
        sent.dst
    } else {
        error.outer_src
    };
    if rewrite(pkt, &error, &sent, outer_src).is_err() {
        return Verdict::DROP;
    }
    counters::event(EV_ICMP_TRANSLATED);
    Verdict {
        action: Action::Translated,
        tuple: CtKey {
            src: outer_src,
            dst: sent.src,
            sport: 0,
            dport: 0,
            proto: PROTO_ICMP,
            _pad: [0; 3],
        },
        ip_len: error.ip_len,
        node_source: balancer::is_node_address(&outer_src),
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
        (QUOTED_OFF + 20, quoted.sport, sent.sport),
        (QUOTED_OFF + 22, quoted.dport, sent.dport),
    ];
    for (offset, old, new) in ports {
        if old != new {
            pkt.rewrite_word16(offset, ICMP_CHECK, old, new)?;
        }
    }
    Ok(())
}

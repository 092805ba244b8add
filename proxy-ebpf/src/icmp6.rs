//! ICMPv6 in IPv6's programs. Neighbour discovery, router advertisements and every
//! message that is not about a service pass untouched (IPv6 does not work without
//! them); a ping of a service address follows the rule for what no frontend takes
//! (`translate::refused_at_service_address`), as ICMP's does in IPv4.

use proxy_common::Family;

use crate::{
    headers::ICMPV6_ECHO_REQUEST,
    packet::Packet,
    parse,
    translate::{self, Origin, Verdict},
};

#[inline(always)]
pub fn handle<P: Packet>(pkt: &P, origin: Origin) -> Verdict {
    let Some((dst, kind)) = parse::icmpv6_type(pkt) else {
        return Verdict::PASS;
    };
    if kind == ICMPV6_ECHO_REQUEST {
        return translate::refused_at_service_address(origin, Family::V6.number(), &dst);
    }
    Verdict::PASS
}

//! Header facts every module shares, defined once: protocol numbers, IPv4 flag bits,
//! ICMP types. The transport protocols the data path translates, and what differs
//! between them, are `proxy_common::Transport`.

use core::mem::offset_of;

use network_types::ip::Ipv4Hdr;
use proxy_common::Addr;

use crate::checksum;

pub use proxy_common::PROTO_ICMP;
/// The outer header's protocol of a tunnel: IPv4 in IPv4 (IPIP), IPv6 in IPv6
/// (RFC 2473).
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_IPV6: u8 = 41;

/// IPv4 fragment field (host order): more fragments, fragment offset.
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET_MASK: u16 = 0x1fff;
/// Don't fragment, in the first byte of the fragment field.
pub const IP_DF: u8 = 0x40;

/// ICMP destination unreachable and its fragmentation-needed code (RFC 792, RFC 1191),
/// time exceeded.
pub const ICMP_UNREACHABLE: u8 = 3;
pub const ICMP_PORT_UNREACHABLE: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
/// ICMP echo request (ping).
pub const ICMP_ECHO_REQUEST: u8 = 8;
/// ICMPv6 (RFC 4443): the errors (destination unreachable and its port-unreachable
/// code, packet too big, time exceeded) and echo request.
pub const ICMPV6_UNREACHABLE: u8 = 1;
pub const ICMPV6_PORT_UNREACHABLE: u8 = 4;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;

/// The fixed IPv6 header's length, and its fields' offsets.
pub const IPV6_LEN: usize = 40;
pub const IPV6_PAYLOAD_LEN: usize = 4;
pub const IPV6_NEXT_HEADER: usize = 6;
pub const IPV6_HOP_LIMIT: usize = 7;
pub const IPV6_SRC: usize = 8;
pub const IPV6_DST: usize = 24;
/// IPv6 extension headers the parser steps over (RFC 8200 section 4): hop-by-hop,
/// routing and destination options (length in 8-byte units beyond the first 8),
/// fragment (8 bytes), authentication (RFC 4302: length in 4-byte units beyond 8).
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_AUTH: u8 = 51;
pub const IPV6_DEST_OPTIONS: u8 = 60;
/// How many extension headers a packet may carry before the transport header and
/// still be translated (a bounded walk; RFC 8200's recommended order has at most
/// hop-by-hop, destination options, routing, fragment, authentication and
/// destination options again). A packet with more is not parsed (`Skip::Malformed`).
pub const IPV6_MAX_EXTENSION_HEADERS: usize = 6;
/// The fragment header's offset field (host order): offset, more fragments.
pub const IPV6_OFFSET_MASK: u16 = 0xfff8;
pub const IPV6_MF: u16 = 0x0001;

/// The protocol byte of an IPv4 header, read as a byte: network-types 0.1 declares it
/// as the `IpProto` enum, and reading an enum whose value has no variant from packet
/// memory is undefined behaviour. Through the header's own (bounds-checked) pointer,
/// so that no second bounds check multiplies the verifier's paths.
///
/// # Safety
/// `ip` points to a whole IPv4 header inside the packet.
#[inline(always)]
pub unsafe fn ipv4_proto(ip: *const Ipv4Hdr) -> u8 {
    // SAFETY: the caller's header covers the byte.
    unsafe { *ip.cast::<u8>().add(offset_of!(Ipv4Hdr, proto)) }
}

/// The TTL of the packets the data path builds.
const TTL: u8 = 64;

/// An IPv4 header without options, its checksum filled in.
#[inline(always)]
pub fn ipv4_header(tos: u8, tot_len: u16, df: bool, proto: u8, src: Addr, dst: Addr) -> [u16; 10] {
    let len = tot_len.to_be_bytes();
    let src = src.v4_be().to_ne_bytes();
    let dst = dst.v4_be().to_ne_bytes();
    let mut header = [
        u16::from_ne_bytes([0x45, tos]),
        u16::from_ne_bytes(len),
        0,
        u16::from_ne_bytes([if df { IP_DF } else { 0 }, 0]),
        u16::from_ne_bytes([TTL, proto]),
        0,
        u16::from_ne_bytes([src[0], src[1]]),
        u16::from_ne_bytes([src[2], src[3]]),
        u16::from_ne_bytes([dst[0], dst[1]]),
        u16::from_ne_bytes([dst[2], dst[3]]),
    ];
    header[5] = checksum::of_words(&header);
    header
}

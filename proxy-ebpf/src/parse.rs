//! Header parsing: from raw bytes to the 5-tuple and the few TCP (or SCTP) facts
//! conntrack needs.

use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};
use proxy_common::{sctp, Addr, CtKey, Family, FragmentKey, FragmentPorts, Transport};

use crate::{
    headers::{self, IP_MF, IP_OFFSET_MASK},
    packet::{Packet, ETH_LEN},
};

/// A parsed TCP, UDP or SCTP packet (of either family, once IPv6 headers are parsed: the
/// rest of the data path reads the family here or in the key, never the headers).
pub struct Flow {
    /// The key's `family` byte as the enum the rewrites match on exhaustively
    /// (converting the byte back would add a fallible branch per packet).
    pub family: Family,
    /// How conntrack follows the flow (`Transport::next`).
    pub transport: Transport,
    pub key: CtKey,
    /// Offset of the L4 header from the start of the frame.
    pub l4_off: usize,
    /// Offset of the L4 checksum from the start of the frame: decided here, once, by
    /// the protocol (`Transport::check_offset`), so that rewrites do not branch on it.
    pub l4_check: usize,
    /// TCP's flags, or SCTP's first chunk type (`sctp::next`).
    pub tcp_flags: u8,
    /// The L4 header and payload's length (SCTP's checksum update needs it).
    pub l4_len: u16,
    /// IP total length, for byte counters.
    pub ip_len: u16,
    /// The packet holds the L4 header: false for a later fragment of a datagram,
    /// whose ports `fragments` found (only its addresses are rewritten).
    pub has_l4: bool,
    /// The first fragment of a datagram whose later fragments follow (`fragments`
    /// remembers its ports under `ip_id`).
    pub more_fragments: bool,
    /// The IP identification, network byte order.
    pub ip_id: u16,
}

/// Why a packet is not a candidate for translation.
pub enum Skip {
    /// Not IPv4: none of our business.
    NotOurs,
    /// Well-formed, unfragmented IPv4 of a protocol the data path does not translate
    /// (ICMP among them), or the first fragment of an SCTP packet (its checksum update
    /// needs the whole packet's length, which only its last fragment tells; Linux
    /// sends SCTP with DF and splits chunks instead, so these are rare):
    /// `translate::other_protocol` decides what becomes of it.
    OtherProtocol,
    /// Claims to be IPv4 TCP, UDP or SCTP but its headers do not fit or make no sense.
    Malformed,
    /// A transport another program of the hook translates (SCTP, for the main
    /// programs): `Packet::hand_over` tail-calls it.
    OtherProgram,
    /// A later fragment of a datagram (not its first): no L4 header, its ports are
    /// `fragments`'.
    Fragment,
}

/// Parses the packet as its program sees it (`Packet::SCTP`): the transports
/// another program translates are handed over (`Skip::OtherProgram`).
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Result<Flow, Skip> {
    parse_at(pkt, ETH_LEN)
}

/// Parses the IPv4 packet at `ip_off` of an Ethernet frame (`ETH_LEN`, or past an
/// outer IPIP header to look at the inner packet).
#[inline(always)]
pub fn parse_at<P: Packet>(pkt: &P, ip_off: usize) -> Result<Flow, Skip> {
    let eth: *const EthHdr = pkt.ptr_at(0).ok_or(Skip::NotOurs)?;
    // SAFETY: every read below is of a pointer bounds-checked by ptr_at.
    if unsafe { (*eth).ether_type } != EtherType::Ipv4 as u16 {
        return Err(Skip::NotOurs);
    }
    let ip: *const Ipv4Hdr = pkt.ptr_at(ip_off).ok_or(Skip::Malformed)?;
    // SAFETY: `ip` is bounds-checked.
    let proto = unsafe { headers::ipv4_proto(ip) };
    let transport = Transport::from_number(proto);
    let (vihl, frags, tot_len, ip_id, src, dst) = unsafe {
        (
            (*ip).vihl,
            u16::from_be_bytes((*ip).frags),
            u16::from_be_bytes((*ip).tot_len),
            u16::from_ne_bytes((*ip).id),
            u32::from_ne_bytes((*ip).src_addr),
            u32::from_ne_bytes((*ip).dst_addr),
        )
    };
    let ihl = usize::from(vihl & 0x0f) * 4;
    let l4_min = transport.map_or(0, Transport::min_header_len);
    // The stack drops a packet whose IP length exceeds what arrived, or leaves no
    // room for its L4 header: never translate (or answer) one. Checked for every
    // protocol: another protocol's packet may be refused, and only a well-formed,
    // unfragmented one is.
    if vihl >> 4 != 4
        || ihl < 20
        || usize::from(tot_len) < ihl + l4_min
        || ip_off + usize::from(tot_len) > pkt.len()
    {
        return Err(Skip::Malformed);
    }
    if frags & IP_OFFSET_MASK != 0 {
        return Err(Skip::Fragment);
    }
    // The first fragment of a datagram goes the way of a whole one (so another
    // protocol's may be refused, quoting it, as RFC 792 allows for a first fragment).
    // No branch on it here: one doubled the paths the verifier walks after parsing.
    let more_fragments = frags & IP_MF;
    let transport = transport.ok_or(Skip::OtherProtocol)?;
    if matches!(transport, Transport::Sctp) != P::SCTP {
        return Err(Skip::OtherProgram);
    }
    let l4_off = ip_off + ihl;
    let l4_len = usize::from(tot_len) - ihl;
    // Header lengths must fit the IP payload, as the kernel's TCP and UDP input
    // requires; otherwise the packet is malformed and never translated.
    let (sport, dport, tcp_flags) = match transport {
        Transport::Tcp => {
            let tcp: *const TcpHdr = pkt.ptr_at(l4_off).ok_or(Skip::Malformed)?;
            // The flags byte is read through the checked header pointer: a second bounds
            // check at a variable offset would be merged by LLVM into a pointer the
            // verifier no longer recognises as checked.
            let (sport, dport, flags, data_offset) = unsafe {
                (
                    u16::from_ne_bytes((*tcp).source),
                    u16::from_ne_bytes((*tcp).dest),
                    *tcp.cast::<u8>().add(13),
                    usize::from(*tcp.cast::<u8>().add(12) >> 4) * 4,
                )
            };
            if data_offset < 20 || data_offset > l4_len {
                return Err(Skip::Malformed);
            }
            (sport, dport, flags)
        }
        Transport::Udp => {
            let udp: *const UdpHdr = pkt.ptr_at(l4_off).ok_or(Skip::Malformed)?;
            let (sport, dport, udp_len) = unsafe {
                (
                    u16::from_ne_bytes((*udp).src),
                    u16::from_ne_bytes((*udp).dst),
                    usize::from(u16::from_be_bytes((*udp).len)),
                )
            };
            // A first fragment holds only the start of the datagram its length counts
            // (arithmetic, not a branch: see above).
            let room = l4_len | (usize::from(more_fragments >> 13) * 0xffff);
            if udp_len < 8 || udp_len > room {
                return Err(Skip::Malformed);
            }
            (sport, dport, 0)
        }
        Transport::Sctp => {
            // The common header and the first chunk's type (its length was checked
            // against the IP length above), through one checked pointer.
            let header: *const [u8; sctp::MIN_PACKET_LEN] =
                pkt.ptr_at(l4_off).ok_or(Skip::Malformed)?;
            if more_fragments != 0 {
                return Err(Skip::OtherProtocol);
            }
            let (sport, dport, chunk) = unsafe {
                let h = &*header;
                (
                    u16::from_ne_bytes([h[0], h[1]]),
                    u16::from_ne_bytes([h[2], h[3]]),
                    h[sctp::FIRST_CHUNK_OFFSET],
                )
            };
            (sport, dport, chunk)
        }
    };
    Ok(Flow {
        family: Family::V4,
        transport,
        key: CtKey {
            src: Addr::from_v4_be(src),
            dst: Addr::from_v4_be(dst),
            sport,
            dport,
            proto,
            family: Family::V4.number(),
            _pad: [0; 2],
        },
        l4_off,
        l4_check: l4_off + transport.check_offset(),
        tcp_flags,
        l4_len: l4_len as u16,
        ip_len: tot_len,
        has_l4: true,

        more_fragments: more_fragments != 0,
        ip_id,
    })
}

/// A later fragment (`Skip::Fragment`, its header checked by `parse`) as a flow of the
/// ports its datagram's first fragment carried, if `ports_of` knows them.
#[inline(always)]
pub fn later_fragment<P: Packet>(
    pkt: &P,
    ports_of: impl FnOnce(&FragmentKey) -> Option<FragmentPorts>,
) -> Option<Flow> {
    let ip: *const Ipv4Hdr = pkt.ptr_at(ETH_LEN)?;
    // SAFETY: `ip` is bounds-checked.
    let (proto, tot_len, ip_id, src, dst) = unsafe {
        (
            headers::ipv4_proto(ip),
            u16::from_be_bytes((*ip).tot_len),
            u16::from_ne_bytes((*ip).id),
            Addr::from_v4_be(u32::from_ne_bytes((*ip).src_addr)),
            Addr::from_v4_be(u32::from_ne_bytes((*ip).dst_addr)),
        )
    };
    let transport = Transport::from_number(proto)?;
    let family = Family::V4.number();
    let ports = ports_of(&FragmentKey {
        src,
        dst,
        id: ip_id,
        proto,
        family,
    })?;
    Some(Flow {
        family: Family::V4,
        transport,
        key: CtKey {
            src,
            dst,
            sport: ports.sport,
            dport: ports.dport,
            proto,
            family,
            _pad: [0; 2],
        },
        l4_off: 0,
        l4_check: 0,
        tcp_flags: 0,
        l4_len: 0,
        ip_len: tot_len,
        has_l4: false,

        more_fragments: false,
        ip_id,
    })
}

/// The protocol and destination of the IPv4 packet at `ETH_LEN` (its header in the
/// frame), whatever the protocol.
#[inline(always)]
pub fn ipv4_protocol_and_destination<P: Packet>(pkt: &P) -> Option<(u8, Addr)> {
    let ip: *const Ipv4Hdr = pkt.ptr_at(ETH_LEN)?;
    // SAFETY: `ip` is bounds-checked.
    unsafe {
        Some((
            headers::ipv4_proto(ip),
            Addr::from_v4_be(u32::from_ne_bytes((*ip).dst_addr)),
        ))
    }
}

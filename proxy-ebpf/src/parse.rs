//! Header parsing: from raw bytes to the 5-tuple and the few TCP (or SCTP) facts
//! conntrack needs, for IPv4 and (in IPv6's programs, `Packet::IPV6`) IPv6 past its
//! extension headers.

use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
    tcp::TcpHdr,
    udp::UdpHdr,
};
use proxy_common::{
    sctp, Addr, CtKey, Family, FragmentKey, FragmentPorts, Transport, PROTO_ICMPV6,
};

use crate::{
    scratch,
    headers::{
        self, IPV6_AUTH, IPV6_DEST_OPTIONS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_LEN,
        IPV6_MF, IPV6_NEXT_HEADER, IPV6_OFFSET_MASK,
        IPV6_PAYLOAD_LEN, IPV6_ROUTING, IPV6_SRC, IPV6_DST, IP_MF, IP_OFFSET_MASK,
    },
    packet::{Packet, ETH_LEN},
};

/// A parsed TCP, UDP or SCTP packet of either family (the rest of the data path reads
/// the family here or in the key, never the headers).
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
    /// Neither IPv4 nor IPv6 (or, in IPv6's programs, not IPv6): none of our business.
    NotOurs,
    /// IPv6, in the programs of IPv4: `Packet::hand_over` tail-calls IPv6's.
    Ipv6,
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

/// Parses the packet as its program sees it (`Packet::SCTP`, `Packet::IPV6`): the
/// transports and the family other programs translate are handed over
/// (`Skip::OtherProgram`, `Skip::Ipv6`).
#[inline(always)]
pub fn parse<P: Packet>(pkt: &P) -> Result<Flow, Skip> {
    if P::IPV6 {
        parse_ipv6(pkt)
    } else {
        parse_at(pkt, ETH_LEN)
    }
}

/// The frame's EtherType, raw (network order).
#[inline(always)]
fn ether_type<P: Packet>(pkt: &P) -> Result<u16, Skip> {
    let eth: *const EthHdr = pkt.ptr_at(0).ok_or(Skip::NotOurs)?;
    // SAFETY: bounds-checked by ptr_at.
    Ok(unsafe { (*eth).ether_type })
}

/// The IPv6 address at `offset`.
#[inline(always)]
pub fn addr_at<P: Packet>(pkt: &P, offset: usize) -> Option<Addr> {
    let addr: *const Addr = pkt.ptr_at(offset)?;
    // SAFETY: bounds-checked by ptr_at.
    Some(unsafe { addr.read_unaligned() })
}

/// Whether the frame carries IPv6.
#[inline(always)]
pub fn is_ipv6<P: Packet>(pkt: &P) -> bool {
    ether_type(pkt).is_ok_and(|ether_type| ether_type == EtherType::Ipv6 as u16)
}

/// Parses the IPv4 packet at `ip_off` of an Ethernet frame (`ETH_LEN`, or past an
/// outer IPIP header to look at the inner packet).
#[inline(always)]
pub fn parse_at<P: Packet>(pkt: &P, ip_off: usize) -> Result<Flow, Skip> {
    let ether_type = ether_type(pkt)?;
    if ether_type != EtherType::Ipv4 as u16 {
        return Err(if ether_type == EtherType::Ipv6 as u16 {
            Skip::Ipv6
        } else {
            Skip::NotOurs
        });
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
    let l4 = L4 {
        transport,
        off: ip_off + ihl,
        len: usize::from(tot_len) - ihl,
        more_fragments: more_fragments != 0,
    };
    let (sport, dport, tcp_flags) = l4.ports(pkt)?;
    Ok(l4.flow(
        Family::V4,
        (Addr::from_v4_be(src), sport),
        (Addr::from_v4_be(dst), dport),
        tcp_flags,
        tot_len,
        ip_id,
    ))
}

/// An IPv6 packet's headers as far as the transport: its addresses, the transport
/// protocol (the last extension header's next header), where that header starts and
/// the fragment header's fields if there is one.
struct Ipv6Headers {
    /// The fixed header (bounds-checked), whose addresses are read where they are
    /// used: copies held through the walk cost the pod program stack it lacks.
    ip: *const [u8; IPV6_LEN],
    next: u8,
    l4_off: usize,
    /// The packet's IP length: the fixed header and the payload.
    ip_len: usize,
    /// The fragment header's offset and flags (host order), 0 without one.
    fragment: u16,
    /// Its identification folded to the 16 bits fragments are remembered by
    /// (`FragmentKey::id`): the two halves XORed.
    fragment_id: u16,
}

impl Ipv6Headers {
    #[inline(always)]
    fn src(&self) -> Addr {
        // SAFETY: `ip` was bounds-checked and covers the address.
        unsafe { self.ip.cast::<u8>().add(IPV6_SRC).cast::<Addr>().read_unaligned() }
    }

    #[inline(always)]
    fn dst(&self) -> Addr {
        // SAFETY: as for `src`.
        unsafe { self.ip.cast::<u8>().add(IPV6_DST).cast::<Addr>().read_unaligned() }
    }
}

/// Reads the fixed IPv6 header and steps over at most `Packet::EXTENSION_HEADERS`
/// extension headers: `Skip::NotOurs` if the frame is not IPv6, `Skip::Malformed`
/// if its headers do not fit (or are too many).
#[inline(always)]
fn ipv6_headers<P: Packet>(pkt: &P) -> Result<Ipv6Headers, Skip> {
    if ether_type(pkt)? != EtherType::Ipv6 as u16 {
        return Err(Skip::NotOurs);
    }
    let ip: *const [u8; IPV6_LEN] = pkt.ptr_at(ETH_LEN).ok_or(Skip::Malformed)?;
    // SAFETY: `ip` is bounds-checked; the addresses lie inside it.
    let (version, payload_len, mut next) = unsafe {
        let h = &*ip;
        (
            h[0] >> 4,
            usize::from(u16::from_be_bytes([h[IPV6_PAYLOAD_LEN], h[IPV6_PAYLOAD_LEN + 1]])),
            h[IPV6_NEXT_HEADER],
        )
    };
    let ip_len = IPV6_LEN + payload_len;
    // A jumbogram (payload length 0, RFC 2675) is never translated.
    if version != 6 || payload_len == 0 || ETH_LEN + ip_len > pkt.len() {
        return Err(Skip::Malformed);
    }
    let mut off = ETH_LEN + IPV6_LEN;
    let (mut fragment, mut fragment_id, mut fragmented) = (0u16, 0u16, false);
    for _ in 0..P::EXTENSION_HEADERS {
        if !is_extension_header(next) {
            break;
        }
        let header: *const [u8; 8] = pkt.ptr_at(off).ok_or(Skip::Malformed)?;
        // SAFETY: bounds-checked by ptr_at.
        let h = unsafe { &*header };
        let len = usize::from(h[1]);
        let this = next;
        next = h[0];
        // Hop-by-hop options only right after the fixed header (RFC 8200 section
        // 4.1), which no extension header names: the kernel drops them elsewhere.
        if next == IPV6_HOP_BY_HOP {
            return Err(Skip::Malformed);
        }
        off += match this {
            IPV6_FRAGMENT => {
                // One fragment header per packet (RFC 8200 section 4.1).
                if fragmented {
                    return Err(Skip::Malformed);
                }
                fragmented = true;
                fragment = u16::from_be_bytes([h[2], h[3]]);
                fragment_id = u16::from_ne_bytes([h[4], h[5]]) ^ u16::from_ne_bytes([h[6], h[7]]);
                8
            }
            // Segments left: the destination is not the final one, which transport
            // checksums cover (RFC 8200 section 8.1); such a packet is not translated.
            IPV6_ROUTING if h[3] != 0 => return Err(Skip::Malformed),
            // An authentication header is at least 12 bytes (RFC 4302 section 2.2).
            IPV6_AUTH if len == 0 => return Err(Skip::Malformed),
            IPV6_AUTH => (len + 2) * 4,
            _ => (len + 1) * 8,
        };
        // A later fragment's fragment header is its last: what follows is payload,
        // whatever the next-header byte says (read as headers, a forged "header"
        // there could claim to open a flow).
        if fragment & IPV6_OFFSET_MASK != 0 {
            break;
        }
    }
    let later_fragment = fragment & IPV6_OFFSET_MASK != 0;
    if (!later_fragment && is_extension_header(next)) || off > ETH_LEN + ip_len {
        return Err(Skip::Malformed);
    }
    // Past extension headers, the offset is one the verifier forgets (see
    // `forget_offset`); without any it stays the constant it is.
    if off != ETH_LEN + IPV6_LEN {
        off = scratch::forget_offset(off).ok_or(Skip::Malformed)?;
    }
    Ok(Ipv6Headers {
        ip,
        next,
        l4_off: off,
        ip_len,
        fragment,
        fragment_id,
    })
}

/// The extension headers `ipv6_headers` steps over.
#[inline(always)]
const fn is_extension_header(next: u8) -> bool {
    matches!(
        next,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS | IPV6_AUTH | IPV6_FRAGMENT
    )
}

/// Parses an IPv6 packet (IPv6's programs): the same checks and the same flow as
/// IPv4's, the transport found past the extension headers.
#[inline(always)]
fn parse_ipv6<P: Packet>(pkt: &P) -> Result<Flow, Skip> {
    let h = ipv6_headers(pkt)?;
    if h.fragment & IPV6_OFFSET_MASK != 0 {
        return Err(Skip::Fragment);
    }
    let transport = Transport::from_number(h.next).ok_or(Skip::OtherProtocol)?;
    let l4 = L4 {
        transport,
        off: h.l4_off,
        len: ETH_LEN + h.ip_len - h.l4_off,
        more_fragments: h.fragment & IPV6_MF != 0,
    };
    if l4.len < transport.min_header_len() {
        return Err(Skip::Malformed);
    }
    let (sport, dport, tcp_flags) = l4.ports(pkt)?;
    Ok(l4.flow(
        Family::V6,
        (h.src(), sport),
        (h.dst(), dport),
        tcp_flags,
        h.ip_len.min(usize::from(u16::MAX)) as u16,
        h.fragment_id,
    ))
}

/// Where a packet's transport header is, whatever its family.
struct L4 {
    transport: Transport,
    /// Offset of the header from the start of the frame.
    off: usize,
    /// The header and payload's length (as the IP header counts it).
    len: usize,
    /// The packet is the first fragment of a datagram whose later fragments follow.
    more_fragments: bool,
}

impl L4 {
    /// The ports and TCP flags (SCTP's first chunk type), once the header's lengths
    /// are found consistent with the IP payload, as the kernel's TCP and UDP input
    /// requires; otherwise the packet is malformed and never translated. A transport
    /// another program translates is handed over first.
    #[inline(always)]
    fn ports<P: Packet>(&self, pkt: &P) -> Result<(u16, u16, u8), Skip> {
        if matches!(self.transport, Transport::Sctp) != P::SCTP {
            return Err(Skip::OtherProgram);
        }
        let (l4_off, l4_len) = (self.off, self.len);
        match self.transport {
            Transport::Tcp => {
                let tcp: *const TcpHdr = pkt.ptr_at(l4_off).ok_or(Skip::Malformed)?;
                // The flags byte is read through the checked header pointer: a second
                // bounds check at a variable offset would be merged by LLVM into a
                // pointer the verifier no longer recognises as checked.
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
                Ok((sport, dport, flags))
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
                // A first fragment holds only the start of the datagram its length
                // counts (arithmetic, not a branch: see `parse_at`).
                let room = l4_len | (usize::from(self.more_fragments) * 0xffff);
                if udp_len < 8 || udp_len > room {
                    return Err(Skip::Malformed);
                }
                Ok((sport, dport, 0))
            }
            Transport::Sctp => {
                // The common header and the first chunk's type (its length was checked
                // against the IP length), through one checked pointer.
                let header: *const [u8; sctp::MIN_PACKET_LEN] =
                    pkt.ptr_at(l4_off).ok_or(Skip::Malformed)?;
                if self.more_fragments {
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
                Ok((sport, dport, chunk))
            }
        }
    }

    #[inline(always)]
    fn flow(
        &self,
        family: Family,
        (src, sport): (Addr, u16),
        (dst, dport): (Addr, u16),
        tcp_flags: u8,
        ip_len: u16,
        ip_id: u16,
    ) -> Flow {
        let proto = self.transport.number();
        Flow {
            family,
            transport: self.transport,
            key: CtKey {
                src,
                dst,
                sport,
                dport,
                proto,
                family: family.number(),
                _pad: [0; 2],
            },
            l4_off: self.off,
            l4_check: self.off + self.transport.check_offset(),
            tcp_flags,
            l4_len: self.len as u16,
            ip_len,
            has_l4: true,
            more_fragments: self.more_fragments,
            ip_id,
        }
    }
}

/// A later fragment (`Skip::Fragment`, its header checked by `parse`) as a flow of the
/// ports its datagram's first fragment carried, if `ports_of` knows them.
#[inline(always)]
pub fn later_fragment<P: Packet>(
    pkt: &P,
    ports_of: impl FnOnce(&FragmentKey) -> Option<FragmentPorts>,
) -> Option<Flow> {
    let (family, proto, ip_len, id, src, dst) = if P::IPV6 {
        let h = ipv6_headers(pkt).ok()?;
        (
            Family::V6,
            h.next,
            h.ip_len.min(usize::from(u16::MAX)) as u16,
            h.fragment_id,
            h.src(),
            h.dst(),
        )
    } else {
        let ip: *const Ipv4Hdr = pkt.ptr_at(ETH_LEN)?;
        // SAFETY: `ip` is bounds-checked.
        unsafe {
            (
                Family::V4,
                headers::ipv4_proto(ip),
                u16::from_be_bytes((*ip).tot_len),
                u16::from_ne_bytes((*ip).id),
                Addr::from_v4_be(u32::from_ne_bytes((*ip).src_addr)),
                Addr::from_v4_be(u32::from_ne_bytes((*ip).dst_addr)),
            )
        }
    };
    let transport = Transport::from_number(proto)?;
    let ports = ports_of(&FragmentKey {
        src,
        dst,
        id,
        proto,
        family: family.number(),
    })?;
    Some(Flow {
        family,
        transport,
        key: CtKey {
            src,
            dst,
            sport: ports.sport,
            dport: ports.dport,
            proto,
            family: family.number(),
            _pad: [0; 2],
        },
        l4_off: 0,
        l4_check: 0,
        tcp_flags: 0,
        l4_len: 0,
        ip_len,
        has_l4: false,

        more_fragments: false,
        ip_id: id,
    })
}

/// The protocol (past IPv6's extension headers) and destination of the packet of the
/// program's family at `ETH_LEN`, whatever the protocol.
#[inline(always)]
pub fn protocol_and_destination<P: Packet>(pkt: &P) -> Option<(u8, Addr)> {
    if P::IPV6 {
        return ipv6_headers(pkt).ok().map(|h| (h.next, h.dst()));
    }
    let ip: *const Ipv4Hdr = pkt.ptr_at(ETH_LEN)?;
    // SAFETY: `ip` is bounds-checked.
    unsafe {
        Some((
            headers::ipv4_proto(ip),
            Addr::from_v4_be(u32::from_ne_bytes((*ip).dst_addr)),
        ))
    }
}

/// The destination and ICMPv6 type of an unfragmented ICMPv6 packet.
#[inline(always)]
pub fn icmpv6_type<P: Packet>(pkt: &P) -> Option<(Addr, u8)> {
    let h = ipv6_headers(pkt).ok()?;
    if h.next != PROTO_ICMPV6 || h.fragment & IPV6_OFFSET_MASK != 0 {
        return None;
    }
    // The type, code and checksum: a one-byte check LLVM turns into `at < end`,
    // which the verifier does not take as a bound.
    let header: *const [u8; 4] = pkt.ptr_at(h.l4_off)?;
    // SAFETY: bounds-checked by ptr_at.
    Some((h.dst(), unsafe { (*header)[0] }))
}

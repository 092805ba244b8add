//! Crafting test packets and checking rewritten ones with etherparse, an
//! implementation independent of ours (checksums included).

use std::net::IpAddr;

use etherparse::{
    IpFragOffset, IpHeaders, IpNumber, Ipv6Extensions, Ipv6FragmentHeader, Ipv6RawExtHeader,
    NetSlice, PacketBuilder, SlicedPacket, TransportSlice,
};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 2];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tcp {
    Syn,
    SynAck,
    Ack,
    Fin,
    Rst,
}

pub fn tcp_packet(src: ([u8; 4], u16), dst: ([u8; 4], u16), flags: Tcp, payload: &[u8]) -> Vec<u8> {
    packet(
        (src.0.into(), src.1),
        (dst.0.into(), dst.1),
        L4::Tcp(flags),
        payload,
    )
}

pub fn udp_packet(src: ([u8; 4], u16), dst: ([u8; 4], u16), payload: &[u8]) -> Vec<u8> {
    packet(
        (src.0.into(), src.1),
        (dst.0.into(), dst.1),
        L4::Udp,
        payload,
    )
}

/// An IPv4 packet of any protocol (the payload is its header and data).
pub fn ip_packet(src: [u8; 4], dst: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(src, dst, 64);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut out, etherparse::IpNumber(protocol), payload)
        .expect("build ip packet");
    out
}

/// An SCTP packet (RFC 9260): the common header with verification tag `tag`, then
/// one chunk of type `chunk` carrying `value` (flags zero, padded to four bytes), its
/// CRC32c computed by the `crc32c` crate, an implementation independent of ours.
pub fn sctp_packet(
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    tag: u32,
    chunk: u8,
    value: &[u8],
) -> Vec<u8> {
    let mut sctp = [src.1.to_be_bytes(), dst.1.to_be_bytes()].concat();
    sctp.extend_from_slice(&tag.to_be_bytes());
    sctp.extend_from_slice(&[0; 4]);
    sctp.extend_from_slice(&[chunk, 0]);
    sctp.extend_from_slice(
        &u16::try_from(4 + value.len())
            .expect("a chunk fits a packet")
            .to_be_bytes(),
    );
    sctp.extend_from_slice(value);
    sctp.resize(sctp.len().next_multiple_of(4), 0);
    let crc = crc32c::crc32c(&sctp);
    sctp[8..12].copy_from_slice(&crc.to_le_bytes());
    ip_packet(src.0, dst.0, 132, &sctp)
}

/// The 5-tuple of an SCTP packet (20-byte IPv4 header), after checking its IPv4
/// header checksum and its CRC32c (by the `crc32c` crate).
pub fn inspect_sctp(packet: &[u8]) -> Seen {
    let ip = &packet[14..34];
    assert_eq!(internet_checksum(ip), 0, "IPv4 header checksum");
    assert_eq!(ip[9], 132, "SCTP");
    let sctp = &packet[34..];
    assert_eq!(sctp_checksum_error(sctp), 0, "CRC32c");
    let port = |at: usize| u16::from_be_bytes([sctp[at], sctp[at + 1]]);
    Seen {
        src: (
            ip[12..16].try_into().expect("a slice of the packet"),
            port(0),
        ),
        dst: (
            ip[16..20].try_into().expect("a slice of the packet"),
            port(2),
        ),
    }
}

/// The XOR of an SCTP packet's checksum field and the CRC32c of its bytes: zero when
/// the field is right.
pub fn sctp_checksum_error(sctp: &[u8]) -> u32 {
    let stored = u32::from_le_bytes(sctp[8..12].try_into().expect("a slice of the packet"));
    let mut zeroed = sctp.to_vec();
    zeroed[8..12].fill(0);
    stored ^ crc32c::crc32c(&zeroed)
}

/// Splits an Ethernet frame's IPv4 packet (20-byte header) into two fragments, the
/// first carrying `at` bytes of its payload (a multiple of 8), both with IP id `id`
/// and valid header checksums.
pub fn fragments(frame: &[u8], at: usize, id: u16) -> (Vec<u8>, Vec<u8>) {
    assert_eq!(at % 8, 0);
    let (head, payload) = frame.split_at(14 + 20);
    let piece = |bytes: &[u8], offset: usize, more: bool| {
        let mut out = head.to_vec();
        out.extend_from_slice(bytes);
        let ip = &mut out[14..34];
        ip[2..4].copy_from_slice(&(20 + bytes.len() as u16).to_be_bytes());
        ip[4..6].copy_from_slice(&id.to_be_bytes());
        let flags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
        ip[6..8].copy_from_slice(&flags.to_be_bytes());
        ip[10..12].copy_from_slice(&[0, 0]);
        let checksum = internet_checksum(ip);
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        out
    };
    (
        piece(&payload[..at], 0, true),
        piece(&payload[at..], at, false),
    )
}

/// The packet two fragments (from `fragments`, possibly rewritten) make together:
/// the first's headers (no longer a fragment) and both payloads.
pub fn reassemble(first: &[u8], second: &[u8]) -> Vec<u8> {
    assert_eq!(first[14 + 4..14 + 6], second[14 + 4..14 + 6], "one IP id");
    assert_eq!(
        first[14 + 12..14 + 20],
        second[14 + 12..14 + 20],
        "same addresses"
    );
    for fragment in [first, second] {
        assert_eq!(
            internet_checksum(&fragment[14..34]),
            0,
            "IP header checksum"
        );
    }
    let mut out = first.to_vec();
    out.extend_from_slice(&second[34..]);
    let total = (out.len() - 14) as u16;
    let ip = &mut out[14..34];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6..8].copy_from_slice(&[0, 0]);
    ip[10..12].copy_from_slice(&[0, 0]);
    let checksum = internet_checksum(ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    out
}

pub fn ping_packet(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B)
        .ipv4(src, dst, 64)
        .icmpv4_echo_request(0x1337, 1);
    let payload = b"ebpf-proxy ping";
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).expect("build ping packet");
    out
}

/// The 5-tuple of a packet, after checking that its IPv4 and L4 checksums verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub src: ([u8; 4], u16),
    pub dst: ([u8; 4], u16),
}

pub fn inspect(packet: &[u8]) -> Seen {
    let sliced = SlicedPacket::from_ethernet(packet).expect("parse output packet");
    let Some(NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("not IPv4")
    };
    // Over the header's bytes: etherparse's own header type drops the reserved
    // flag bit, which a packet may carry.
    assert_eq!(
        internet_checksum(ip.header().slice()),
        0,
        "IPv4 header checksum"
    );
    let (src, dst) = (ip.header().source(), ip.header().destination());
    match sliced.transport.expect("transport header") {
        TransportSlice::Tcp(tcp) => {
            let expected = tcp.calc_checksum_ipv4(src, dst).expect("tcp checksum");
            assert_eq!(expected, tcp.checksum(), "TCP checksum");
            Seen {
                src: (src, tcp.source_port()),
                dst: (dst, tcp.destination_port()),
            }
        }
        TransportSlice::Udp(udp) => {
            let udp_header = udp.to_header();
            if udp_header.checksum != 0 {
                let expected = udp_header
                    .calc_checksum_ipv4_raw(src, dst, udp.payload())
                    .expect("udp checksum");
                assert_eq!(expected, udp_header.checksum, "UDP checksum");
            }
            Seen {
                src: (src, udp_header.source_port),
                dst: (dst, udp_header.destination_port),
            }
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

/// `inner` (an Ethernet frame) inside an outer header of its family from `src` to
/// `dst`, as another node's data path (or IPVS's tunnel mode) would send it.
pub fn tunnelled(src: IpAddr, dst: IpAddr, inner: &[u8]) -> Vec<u8> {
    let inner_len = inner.len() - 14;
    let outer = match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut outer = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 4, 0, 0];
            outer[2..4].copy_from_slice(&((inner_len + 20) as u16).to_be_bytes());
            outer.extend_from_slice(&src.octets());
            outer.extend_from_slice(&dst.octets());
            let check = internet_checksum(&outer);
            outer[10..12].copy_from_slice(&check.to_be_bytes());
            outer
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut outer = vec![0x60, 0, 0, 0, 0, 0, 41, 64];
            outer[4..6].copy_from_slice(&(inner_len as u16).to_be_bytes());
            outer.extend_from_slice(&src.octets());
            outer.extend_from_slice(&dst.octets());
            outer
        }
        _ => panic!("a tunnel's addresses are of one family"),
    };
    let mut frame = inner[..14].to_vec();
    frame.extend_from_slice(&outer);
    frame.extend_from_slice(&inner[14..]);
    frame
}

/// The Internet checksum (RFC 1071) over `bytes`: zero when a checksum field inside
/// them is right.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The transport of a packet built by `packet`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp(Tcp),
    Udp,
}

/// Extension headers an IPv6 packet built by `packet_with` carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    pub hop_by_hop: bool,
    pub destination_options: bool,
    /// A fragment header of a whole datagram (offset 0, no more fragments: RFC 8200
    /// calls it an atomic fragment).
    pub atomic_fragment: bool,
}

/// A TCP or UDP packet of either family (both addresses of one), built by etherparse.
pub fn packet(src: (IpAddr, u16), dst: (IpAddr, u16), l4: L4, payload: &[u8]) -> Vec<u8> {
    packet_with(src, dst, l4, payload, Extensions::default())
}

/// `packet`, an IPv6 one carrying `extensions` (eight bytes of PadN options each).
pub fn packet_with(
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    l4: L4,
    payload: &[u8],
    extensions: Extensions,
) -> Vec<u8> {
    let mut ip = testbed::frames::ip_headers(src.0, dst.0);
    match &mut ip {
        IpHeaders::Ipv4(..) => {
            assert_eq!(extensions, Extensions::default(), "extensions are IPv6's")
        }
        IpHeaders::Ipv6(_, headers) => {
            // Four bytes of PadN: an option header of eight bytes in all.
            let padding = [1u8, 4, 0, 0, 0, 0];
            let option = |on: bool| {
                on.then(|| Ipv6RawExtHeader::new_raw(IpNumber::TCP, &padding).expect("ext"))
            };
            *headers = Ipv6Extensions {
                hop_by_hop_options: option(extensions.hop_by_hop),
                destination_options: option(extensions.destination_options),
                fragment: extensions
                    .atomic_fragment
                    .then(|| Ipv6FragmentHeader::new(IpNumber::TCP, IpFragOffset::ZERO, false, 7)),
                ..Default::default()
            };
        }
    }
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B).ip(ip);
    let mut out = Vec::new();
    match l4 {
        L4::Udp => builder
            .udp(src.1, dst.1)
            .write(&mut out, payload)
            .expect("build udp packet"),
        L4::Tcp(flags) => {
            let builder = builder.tcp(src.1, dst.1, 1000, 65535);
            let builder = match flags {
                Tcp::Syn => builder.syn(),
                Tcp::SynAck => builder.syn().ack(1),
                Tcp::Ack => builder.ack(1),
                Tcp::Fin => builder.fin().ack(1),
                Tcp::Rst => builder.rst(),
            };
            builder.write(&mut out, payload).expect("build tcp packet")
        }
    }
    out
}

/// The addresses and ports of a packet of either family, once its checksums (IPv4's
/// header, the transport's over its pseudo-header) are found right by etherparse.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeenIp {
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
}

pub fn inspect_ip(packet: &[u8]) -> SeenIp {
    let sliced = SlicedPacket::from_ethernet(packet).expect("parse output packet");
    let (src, dst): (IpAddr, IpAddr) = match sliced.net.expect("an IP header") {
        NetSlice::Ipv4(ip) => {
            assert_eq!(
                internet_checksum(ip.header().slice()),
                0,
                "IPv4 header checksum (over its bytes, reserved flag included)"
            );
            (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
            )
        }
        NetSlice::Ipv6(ip) => (
            ip.header().source_addr().into(),
            ip.header().destination_addr().into(),
        ),
        other => panic!("not IP: {other:?}"),
    };
    let tcp_check = |tcp: &etherparse::TcpSlice| match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => tcp.calc_checksum_ipv4(s.octets(), d.octets()).ok(),
        (IpAddr::V6(s), IpAddr::V6(d)) => tcp.calc_checksum_ipv6(s.octets(), d.octets()).ok(),
        _ => None,
    };
    let udp_check = |udp: &etherparse::UdpHeader, payload: &[u8]| match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => udp
            .calc_checksum_ipv4_raw(s.octets(), d.octets(), payload)
            .ok(),
        (IpAddr::V6(s), IpAddr::V6(d)) => udp
            .calc_checksum_ipv6_raw(s.octets(), d.octets(), payload)
            .ok(),
        _ => None,
    };
    match sliced.transport.expect("transport header") {
        TransportSlice::Tcp(tcp) => {
            assert_eq!(
                tcp_check(&tcp).expect("tcp checksum"),
                tcp.checksum(),
                "TCP checksum"
            );
            SeenIp {
                src: (src, tcp.source_port()),
                dst: (dst, tcp.destination_port()),
            }
        }
        TransportSlice::Udp(udp) => {
            let header = udp.to_header();
            // Zero is "none" over IPv4 only.
            if header.checksum != 0 || src.is_ipv6() {
                let expected = udp_check(&header, udp.payload()).expect("udp checksum");
                assert_eq!(expected, header.checksum, "UDP checksum");
            }
            SeenIp {
                src: (src, header.source_port),
                dst: (dst, header.destination_port),
            }
        }
        other => panic!("unexpected transport {other:?}"),
    }
}

/// The ICMP errors the tests send, each of either family: destination (port)
/// unreachable; fragmentation needed (IPv4) or packet too big (IPv6), with an MTU of
/// 1400; time exceeded in transit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpError {
    PortUnreachable,
    TooBig,
    TimeExceeded,
}

/// An ICMP (IPv4) or ICMPv6 error of `kind` from `from` to `to`, quoting the start of
/// the IP packet in the Ethernet frame `offending` (its fixed header and 8 bytes).
pub fn icmp_error(from: IpAddr, to: IpAddr, kind: IcmpError, offending: &[u8]) -> Vec<u8> {
    use etherparse::{icmpv4, icmpv6, Icmpv4Type, Icmpv6Type};
    let builder = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let mut out = Vec::new();
    match (from, to) {
        (IpAddr::V4(from), IpAddr::V4(to)) => {
            let icmp = match kind {
                IcmpError::PortUnreachable => {
                    Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port)
                }
                IcmpError::TooBig => Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
                ),
                IcmpError::TimeExceeded => {
                    Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit)
                }
            };
            builder
                .ipv4(from.octets(), to.octets(), 64)
                .icmpv4(icmp)
                .write(&mut out, &offending[14..14 + 28])
        }
        (IpAddr::V6(from), IpAddr::V6(to)) => {
            let icmp = match kind {
                IcmpError::PortUnreachable => {
                    Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
                }
                IcmpError::TooBig => Icmpv6Type::PacketTooBig { mtu: 1400 },
                IcmpError::TimeExceeded => {
                    Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded)
                }
            };
            builder
                .ipv6(from.octets(), to.octets(), 64)
                .icmpv6(icmp)
                .write(&mut out, &offending[14..14 + 48])
        }
        _ => panic!("addresses of two families"),
    }
    .expect("icmp error");
    out
}

/// An ICMP or ICMPv6 error as read back: its type, outer addresses, the quoted
/// packet's addresses and ports, and the quote's bytes (from its IP header on).
#[derive(Debug)]
pub struct SeenError {
    pub kind: u8,
    pub outer: (IpAddr, IpAddr),
    pub quoted: ((IpAddr, u16), (IpAddr, u16)),
    pub quote: Vec<u8>,
}

/// Reads an ICMP or ICMPv6 error frame after checking its checksums: IPv4's outer
/// header, ICMP and quoted header; ICMPv6's over its pseudo-header.
pub fn read_icmp_error(frame: &[u8]) -> SeenError {
    let v4 = |b: &[u8]| -> IpAddr { <[u8; 4]>::try_from(b).expect("4 bytes").into() };
    let v6 = |b: &[u8]| -> IpAddr { <[u8; 16]>::try_from(b).expect("16 bytes").into() };
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            let ip = &frame[14..34];
            assert_eq!(internet_checksum(ip), 0, "outer IP checksum");
            assert_eq!(ip[9], 1, "ICMP");
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            assert_eq!(
                internet_checksum(&frame[34..14 + total]),
                0,
                "ICMP checksum (to the IP length)"
            );
            let quoted = &frame[42..62];
            assert_eq!(internet_checksum(quoted), 0, "quoted IP checksum");
            SeenError {
                kind: frame[34],
                outer: (v4(&ip[12..16]), v4(&ip[16..20])),
                quoted: (
                    (v4(&quoted[12..16]), port(&frame[62..])),
                    (v4(&quoted[16..20]), port(&frame[64..])),
                ),
                quote: frame[42..].to_vec(),
            }
        }
        0x86dd => {
            let ip = &frame[14..54];
            assert_eq!(ip[6], 58, "ICMPv6");
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let message = &frame[54..54 + payload];
            let mut summed = ip[8..40].to_vec();
            summed.extend_from_slice(&(payload as u32).to_be_bytes());
            summed.extend_from_slice(&[0, 0, 0, 58]);
            summed.extend_from_slice(message);
            assert_eq!(internet_checksum(&summed), 0, "ICMPv6 checksum");
            let quoted = &frame[62..102];
            SeenError {
                kind: frame[54],
                outer: (v6(&ip[8..24]), v6(&ip[24..40])),
                quoted: (
                    (v6(&quoted[8..24]), port(&frame[102..])),
                    (v6(&quoted[24..40]), port(&frame[104..])),
                ),
                quote: frame[62..].to_vec(),
            }
        }
        other => panic!("not IP: ether type {other:#x}"),
    }
}

/// IPv6 next-header values of the headers tests put in packets by hand.
pub mod next_header {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AUTH: u8 = 51;
    pub const DEST_OPTIONS: u8 = 60;
    pub const UDP: u8 = 17;
}

/// `headers` (each eight bytes, its next-header byte first, already chained to what
/// follows) put between the fixed header of an IPv6 `frame` (without extension
/// headers) and its transport header; the fixed header's next header becomes `first`.
pub fn with_headers(frame: &[u8], first: u8, headers: &[[u8; 8]]) -> Vec<u8> {
    let mut out = frame[..54].to_vec();
    out[14 + 6] = first;
    for header in headers {
        out.extend_from_slice(header);
    }
    out.extend_from_slice(&frame[54..]);
    let payload = u16::from_be_bytes([frame[18], frame[19]]) + 8 * headers.len() as u16;
    out[18..20].copy_from_slice(&payload.to_be_bytes());
    out
}

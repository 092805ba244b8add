//! Fuzzing the data path: random and mutated packets of both families through the
//! real programs (BPF_PROG_TEST_RUN). Set PROPTEST_CASES for a longer run (CI: the
//! default below).
//!
//! Properties, for XDP and tc alike: every run succeeds; a packet is untouched, or
//! refused (ICMP or ICMPv6 port unreachable quoting it, every checksum valid), or
//! dropped as it came (or as its tunnel carried it), or it keeps its length and, translated, is a TCP/UDP packet whose
//! checksums verify or an ICMP error whose checksums verify if they did on the way in
//! (inputs are given correct checksums first, so a broken one is ours); a fragment
//! keeps what follows its headers unless it is a first one; a `dsr-ipip` packet leaves
//! unchanged inside a valid outer header (IPIP, ip6ip6), and a tunnelled one loses
//! exactly its outer header and meets the properties above as the inner packet; and
//! conntrack holds only entries for packets to a service (no pollution by garbage).

use std::net::IpAddr;

use ebpf_proxy::{
    datapath::generation::Generation,
    model::{Endpoint, Family, Frontend, FrontendKey, Listen, Protocol},
};
use etherparse::{
    Ipv6ExtensionSlice, LaxNetSlice, LaxSlicedPacket, NetSlice, SlicedPacket, TransportSlice,
};
use proptest::prelude::*;

use crate::support::{
    datapath::*,
    families::*,
    packets::{next_header::*, *},
};

const NODE_PORT: u16 = 30053;

/// A family's `dsr-ipip` LoadBalancer IP (port 80: encapsulated to the remote pod,
/// and decapsulated for the first pod through its tunnel view), and another node
/// that tunnels to it.
fn tunnel_addresses(family: Family) -> (IpAddr, IpAddr) {
    match family {
        Family::V4 => (ip("198.18.100.1"), ip("198.18.2.1")),
        Family::V6 => (ip("fd00:18:100::1"), ip("fd00:18:2::1")),
    }
}

/// Valid packets the mutations start from: service traffic, replies, ICMP errors
/// about a flow, fragments, other traffic; IPv6's with extension headers.
fn corpus(net: &Net) -> Vec<Vec<u8>> {
    let (client, vip, pod) = (net.client, net.vip, net.pods[0]);
    let router = match net.family {
        Family::V4 => ip("198.18.0.254"),
        Family::V6 => ip("fd00:18::fe"),
    };
    let syn = L4::Tcp(Tcp::Syn);
    // The first SYN as the local backend receives it, and the reply as the client
    // receives it: what the errors about that flow quote.
    let to_pod = packet((client, 40000), (pod, 8080), syn, b"");
    let reply = packet((vip, 80), (client, 40000), L4::Tcp(Tcp::SynAck), b"");
    let question = packet(
        (client, 5000),
        (vip, 53),
        L4::Udp,
        b"a question of some length",
    );
    let (lb, entry_node) = tunnel_addresses(net.family);
    let mut frames = vec![
        packet((client, 40000), (vip, 80), syn, b""),
        packet((client, 40005), (lb, 80), syn, b""),
        tunnelled(
            entry_node,
            pod,
            &packet((client, 40006), (lb, 80), syn, b""),
        ),
        packet(
            (client, 40001),
            (vip, 80),
            L4::Tcp(Tcp::Ack),
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        packet((client, 40002), (vip, 80), L4::Tcp(Tcp::Fin), b""),
        packet((pod, 8080), (client, 40000), L4::Tcp(Tcp::SynAck), b""),
        packet((client, 5001), (net.node, NODE_PORT), L4::Udp, b"query"),
        packet((client, 40003), (router, 22), syn, b""),
        icmp_error(pod, client, IcmpError::PortUnreachable, &to_pod),
        icmp_error(router, vip, IcmpError::TooBig, &reply),
        icmp_error(router, client, IcmpError::TimeExceeded, &to_pod),
    ];
    match net.family {
        Family::V4 => {
            let (first, later) = fragments(&question, 8, 7);
            frames.extend([question, first, later]);
        }
        Family::V6 => {
            let extensions = Extensions {
                hop_by_hop: true,
                destination_options: true,
                atomic_fragment: true,
            };
            let first_fragment = [UDP, 0, 0x00, 0x01, 0, 0, 0, 7];
            let later_fragment = [UDP, 0, 0x00, 0x08, 0, 0, 0, 7];
            let routed_here = [UDP, 0, 4, 0, 0, 0, 0, 0];
            let pad = |next: u8| [next, 0, 1, 4, 0, 0, 0, 0];
            let misplaced = [pad(HOP_BY_HOP), pad(UDP)];
            frames.extend([
                packet_with((client, 40004), (vip, 80), syn, b"", extensions),
                with_headers(&question, FRAGMENT, &[first_fragment]),
                with_headers(&question, FRAGMENT, &[later_fragment]),
                with_headers(&question, ROUTING, &[routed_here]),
                with_headers(&question, DEST_OPTIONS, &misplaced),
                question,
            ]);
        }
    }
    frames
}

/// A header field of a family a mutation sets: `bytes` bytes at `at` in the frame,
/// only the bits of `mask` (in the field's last byte for one-byte fields).
struct Field {
    at: usize,
    bytes: usize,
    mask: u16,
}

const fn field(at: usize, bytes: usize, mask: u16) -> Field {
    Field { at, bytes, mask }
}

/// IPv4's: the header length (the version nibble stays), total length, flags and
/// fragment offset, protocol; in an ICMP error, the quoted protocol and source port.
const IPV4_FIELDS: [Field; 6] = [
    field(14, 1, 0x0f),
    field(16, 2, 0xffff),
    field(20, 2, 0xffff),
    field(23, 1, 0xff),
    field(51, 1, 0xff),
    field(62, 2, 0xffff),
];

/// IPv6's: payload length, next header; the first extension header's next header and
/// length (or the transport's first bytes), a first fragment header's offset and
/// flags; the second extension header's next header; in an ICMPv6 error, the quoted
/// source port.
const IPV6_FIELDS: [Field; 7] = [
    field(18, 2, 0xffff),
    field(20, 1, 0xff),
    field(54, 1, 0xff),
    field(55, 1, 0xff),
    field(56, 2, 0xffff),
    field(62, 1, 0xff),
    field(102, 2, 0xffff),
];

/// Values worth trying in a field beside random ones: protocols and next headers
/// the data path tells apart (ESP and AH among them), lengths at the edges.
const INTERESTING: [u16; 14] = [0, 1, 6, 17, 41, 43, 44, 50, 51, 58, 59, 60, 132, 0xffff];

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Set(usize, u8),
    /// The field at this index of the frame's family's list (modulo its length).
    Field(usize, u16),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let value = prop_oneof![any::<u16>(), prop::sample::select(&INTERESTING[..])];
    prop_oneof![
        (0usize..120).prop_map(Mutation::Truncate),
        ((0usize..120), any::<u8>()).prop_map(|(at, v)| Mutation::Set(at, v)),
        (any::<usize>(), value).prop_map(|(field, v)| Mutation::Field(field, v)),
    ]
}

fn ether_type(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

fn mutate(mut frame: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match *m {
            Mutation::Truncate(len) => frame.truncate(len.max(14)),
            Mutation::Set(at, v) if at < frame.len() => frame[at] = v,
            Mutation::Field(index, value) => {
                let fields: &[Field] = match ether_type(&frame) {
                    0x0800 => &IPV4_FIELDS,
                    0x86dd => &IPV6_FIELDS,
                    _ => continue,
                };
                let field = &fields[index % fields.len()];
                let end = field.at + field.bytes;
                if end <= frame.len() {
                    let old = match field.bytes {
                        1 => u16::from(frame[field.at]),
                        _ => u16::from_be_bytes([frame[field.at], frame[field.at + 1]]),
                    };
                    let new = (old & !field.mask) | (value & field.mask);
                    frame[field.at..end].copy_from_slice(&new.to_be_bytes()[2 - field.bytes..]);
                }
            }
            _ => {}
        }
    }
    frame
}

/// What random frames are: IPv4, IPv6, and ARP for something else.
const RANDOM_ETHER_TYPES: [u16; 3] = [0x0800, 0x86dd, 0x0806];

/// Random bytes after an Ethernet header, most of them as an IPv4 or IPv6 packet
/// (the version nibble set), so that the parsers go past the first check.
fn random_frame(ether_type: u16, mut bytes: Vec<u8>) -> Vec<u8> {
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1];
    frame.extend_from_slice(&ether_type.to_be_bytes());
    match ether_type {
        0x0800 => bytes[0] = 0x40 | (bytes[0] & 0x0f),
        0x86dd => bytes[0] = 0x60 | (bytes[0] & 0x0f),
        _ => {}
    }
    frame.append(&mut bytes);
    frame
}

/// The sum a transport or ICMP checksum field holds over `segment` (its own field
/// zeroed), with IPv4's or IPv6's pseudo-header where the protocol has one.
fn checksum_for(src: &[u8], dst: &[u8], protocol: u8, segment: &[u8]) -> u16 {
    let mut summed = Vec::new();
    if protocol != 1 {
        summed.extend_from_slice(src);
        summed.extend_from_slice(dst);
        match src.len() {
            4 => {
                summed.extend_from_slice(&[0, protocol]);
                summed.extend_from_slice(&(segment.len() as u16).to_be_bytes());
            }
            _ => {
                summed.extend_from_slice(&(segment.len() as u32).to_be_bytes());
                summed.extend_from_slice(&[0, 0, 0, protocol]);
            }
        }
    }
    summed.extend_from_slice(segment);
    let sum = internet_checksum(&summed);
    // UDP sends a computed zero as all ones (zero means "none").
    if protocol == 17 && sum == 0 {
        0xffff
    } else {
        sum
    }
}

/// Gives a frame correct checksums where they can be placed (a tunnelled packet's
/// inner ones too), so that the properties about translated packets test our
/// incremental updates.
fn fix_checksums(frame: &mut [u8]) {
    if let Some(outer) = tunnel_header_len(frame) {
        let mut inner = inner_frame(frame, outer);
        fix_checksums(&mut inner);
        frame[14 + outer..].copy_from_slice(&inner[14..]);
    }
    fix_ipv4_header_checksum(frame, 14);
    fix_transport_checksum(frame);
}

/// The outer header's length of an IPIP (IPv4 without options, protocol 4) or ip6ip6
/// (next header 41) frame.
fn tunnel_header_len(frame: &[u8]) -> Option<usize> {
    match ether_type(frame) {
        0x0800 if frame.len() >= 34 && frame[14] == 0x45 && frame[23] == 4 => Some(20),
        0x86dd if frame.len() >= 54 && frame[20] == 41 => Some(40),
        _ => None,
    }
}

/// The packet a tunnel carries, as a frame of its own.
fn inner_frame(frame: &[u8], outer: usize) -> Vec<u8> {
    [&frame[..14], &frame[14 + outer..]].concat()
}

/// Fixes the checksum of the IPv4 header at `at`, if one is there whole: the outer
/// header, or one an ICMP error quotes.
fn fix_ipv4_header_checksum(frame: &mut [u8], at: usize) {
    let Some(&vihl) = frame.get(at) else {
        return;
    };
    let end = at + usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || end < at + 20 || end > frame.len() {
        return;
    }
    frame[at + 10..at + 12].copy_from_slice(&[0, 0]);
    let sum = internet_checksum(&frame[at..end]);
    frame[at + 10..at + 12].copy_from_slice(&sum.to_be_bytes());
}

/// Fixes the transport's or ICMP's checksum (first an ICMP error's quoted IPv4
/// header's, which it covers) whenever etherparse parses the packet and it is not a
/// fragment.
fn fix_transport_checksum(frame: &mut [u8]) {
    if ether_type(frame) == 0x0800 && frame.get(23) == Some(&1) {
        fix_ipv4_header_checksum(frame, 42);
    }
    let fix = {
        let Ok(sliced) = SlicedPacket::from_ethernet(frame) else {
            return;
        };
        let (src, dst, payload) = match &sliced.net {
            Some(NetSlice::Ipv4(ip)) => (
                ip.header().source().to_vec(),
                ip.header().destination().to_vec(),
                ip.payload(),
            ),
            Some(NetSlice::Ipv6(ip)) => (
                ip.header().source().to_vec(),
                ip.header().destination().to_vec(),
                ip.payload(),
            ),
            _ => return,
        };
        // What each checksum covers: TCP and ICMP the IP payload; UDP what its own
        // length says (as the kernel checks it).
        let (field, covered) = match &sliced.transport {
            Some(TransportSlice::Tcp(tcp)) => (16, tcp.slice()),
            Some(TransportSlice::Udp(udp)) => (6, udp.slice()),
            Some(TransportSlice::Icmpv4(icmp)) => (2, icmp.slice()),
            Some(TransportSlice::Icmpv6(icmp)) => (2, icmp.slice()),
            _ => return,
        };
        let start = covered.as_ptr() as usize - frame.as_ptr() as usize;
        let mut segment = covered.to_vec();
        segment[field..field + 2].copy_from_slice(&[0, 0]);
        let sum = checksum_for(&src, &dst, payload.ip_number.0, &segment);
        (start + field, sum)
    };
    let (at, sum) = fix;
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
}

/// The hook a packet went through: how it answers a refusal (a mutated port or
/// protocol of a service address is refused).
#[derive(Clone, Copy)]
enum Hook {
    /// Passed to the kernel; IPv4's quotes the IP header and 8 bytes.
    Xdp,
    /// Redirected back to the pod, quoting 64 bytes (zero-padded).
    Tc,
}

/// The source and destination addresses of an IPv4 or IPv6 frame long enough.
fn addresses(frame: &[u8]) -> Option<(IpAddr, IpAddr)> {
    let v4 = |at: usize| <[u8; 4]>::try_from(frame.get(at..at + 4)?).ok();
    let v6 = |at: usize| <[u8; 16]>::try_from(frame.get(at..at + 16)?).ok();
    match ether_type(frame) {
        0x0800 => Some((v4(26)?.into(), v4(30)?.into())),
        0x86dd => Some((v6(22)?.into(), v6(38)?.into())),
        _ => None,
    }
}

/// Whether `output` is the refusal of `input`: port unreachable from where it was
/// sent to, back to its sender, quoting it, every checksum valid
/// (`read_icmp_error`, only called on what looks like one).
fn is_refusal(hook: Hook, input: &[u8], verdict: u32, output: &[u8]) -> bool {
    let expected_verdict = match hook {
        Hook::Xdp => XDP_PASS,
        Hook::Tc => TC_ACT_REDIRECT,
    };
    let (kind, code, quoted) = match (ether_type(input), hook) {
        (0x0800, Hook::Xdp) => (3, 3, 28),
        (0x0800, Hook::Tc) => (3, 3, 64),
        _ => (1, 4, 64),
    };
    let Some((sender, receiver)) = addresses(input) else {
        return false;
    };
    let header = output.len().checked_sub(quoted + 8);
    let looks_like_one = verdict == expected_verdict
        && is_icmp(output)
        && addresses(output) == Some((receiver, sender))
        && header.and_then(|at| output.get(at..at + 2)) == Some(&[kind, code][..]);
    if !looks_like_one {
        return false;
    }
    let refusal = read_icmp_error(output);
    let mut quote = input[14..].to_vec();
    quote.resize(quoted, 0);
    refusal.kind == kind && refusal.outer == (receiver, sender) && refusal.quote == quote
}

/// Where a fragment's headers end, and whether it is a later fragment (its bytes
/// beyond the headers are payload, no transport header).
struct Fragment {
    headers_end: usize,
    later: bool,
    /// The transport protocol it carries (a part of).
    protocol: u8,
}

fn fragment_of(frame: &[u8]) -> Option<Fragment> {
    match ether_type(frame) {
        0x0800 if frame.len() >= 34 => {
            let offset = u16::from_be_bytes([frame[20], frame[21]]) & 0x1fff;
            let more = frame[20] & 0x20 != 0;
            (more || offset != 0).then(|| Fragment {
                headers_end: 14 + usize::from(frame[14] & 0x0f) * 4,
                later: offset != 0,
                protocol: frame[23],
            })
        }
        0x86dd => {
            let sliced = LaxSlicedPacket::from_ethernet(frame).ok()?;
            let Some(LaxNetSlice::Ipv6(ip)) = sliced.net else {
                return None;
            };
            let payload = ip.payload();
            payload.fragmented.then(|| Fragment {
                headers_end: payload.payload.as_ptr() as usize - frame.as_ptr() as usize,
                later: ip.extensions().clone().into_iter().any(|header| {
                    matches!(header, Ipv6ExtensionSlice::Fragment(f)
                        if f.fragment_offset().value() != 0)
                }),
                protocol: payload.ip_number.0,
            })
        }
        _ => None,
    }
}

/// Whether a frame is an ICMP (IPv4) or ICMPv6 packet without extension headers.
fn is_icmp(frame: &[u8]) -> bool {
    match ether_type(frame) {
        0x0800 => frame.get(23) == Some(&1),
        0x86dd => frame.get(20) == Some(&58),
        _ => false,
    }
}

fn check_output(
    hook: Hook,
    input: &[u8],
    verdict: u32,
    output: &[u8],
) -> Result<(), TestCaseError> {
    if is_refusal(hook, input, verdict, output) {
        return Ok(());
    }
    // A dropped frame is left as it came, or (dropped after decapsulation) as its
    // tunnel carried it.
    if matches!(hook, Hook::Xdp) && verdict == XDP_DROP {
        let decapsulated = tunnel_header_len(input).is_some_and(|outer| {
            output.len() + outer == input.len() && output[14..] == input[14 + outer..]
        });
        prop_assert!(
            output == input || decapsulated,
            "a dropped frame was changed: {:02x?}",
            output
        );
        return Ok(());
    }
    prop_assert!(verdict <= 3, "unexpected verdict {verdict}");
    if let Some(outer) = tunnel_header_len(input) {
        if output.len() + outer == input.len() {
            // Decapsulated: what is left is the inner packet, handled.
            prop_assert_eq!(&output[..14], &input[..14], "Ethernet header kept");
            return check_output(hook, &inner_frame(input, outer), verdict, output);
        }
    }
    if output.len() > input.len() {
        return check_encapsulated(input, output);
    }
    prop_assert_eq!(output.len(), input.len(), "length changed");
    if output == input {
        return Ok(());
    }
    // What changed was translated: every checksum must follow, whether the input's
    // held or not (a correct incremental update leaves the one's-complement sum over
    // what a checksum covers as it was).
    if let Some(fragment) = fragment_of(input) {
        // A fragment of a tracked flow: its addresses change; a later one's bytes
        // beyond its headers are untouched (it has no ports); a first one's
        // transport checksum covers the whole datagram, whose pseudo-header length
        // is unknown here but the same before and after.
        let end = fragment.headers_end;
        prop_assert!(end <= output.len(), "a header past the frame was rewritten");
        if fragment.later {
            prop_assert_eq!(&output[end..], &input[end..], "payload touched");
        }
        prop_assert_eq!(
            fragment_sums(output, &fragment),
            fragment_sums(input, &fragment),
            "a fragment's checksums: {:02x?}",
            output
        );
    } else if is_icmp(input) && is_icmp(output) {
        // An error about a tracked flow, translated.
        prop_assert!(output.len() >= 14 + 20 + 8 + 20 + 4, "{output:02x?}");
        prop_assert_eq!(
            error_sums(output),
            error_sums(input),
            "a translated error's checksums: {:02x?}",
            output
        );
    } else {
        // `inspect_ip` panics on an invalid checksum or an unparseable packet.
        let result = std::panic::catch_unwind(|| inspect_ip(output));
        prop_assert!(
            result.is_ok(),
            "a rewritten packet is broken: {:02x?}",
            output
        );
    }
    Ok(())
}

/// A `dsr-ipip` packet's encapsulation: the packet unchanged behind an outer header of
/// its family whose length fields count it (its IP length, not the frame's padding).
fn check_encapsulated(input: &[u8], output: &[u8]) -> Result<(), TestCaseError> {
    let outer = output.len() - input.len();
    prop_assert_eq!(&output[..14], &input[..14], "Ethernet header kept");
    prop_assert_eq!(
        &output[14 + outer..],
        &input[14..],
        "the packet carried unchanged"
    );
    let inner_ip_len = ip_end(input) - 14;
    match (ether_type(input), outer) {
        (0x0800, 20) => {
            let header = &output[14..34];
            prop_assert_eq!((header[0], header[9]), (0x45, 4), "IPIP: {:02x?}", header);
            prop_assert_eq!(internet_checksum(header), 0, "outer header checksum");
            prop_assert_eq!(
                usize::from(u16::from_be_bytes([header[2], header[3]])),
                inner_ip_len + 20
            );
        }
        (0x86dd, 40) => {
            let header = &output[14..54];
            prop_assert_eq!(
                (header[0] >> 4, header[6]),
                (6, 41),
                "ip6ip6: {:02x?}",
                header
            );
            prop_assert_eq!(
                usize::from(u16::from_be_bytes([header[4], header[5]])),
                inner_ip_len
            );
        }
        _ => prop_assert!(false, "grew by {outer}: {:02x?}", output),
    }
    Ok(())
}

/// The IP packet's end in a frame (its length field's, or the frame's if shorter).
fn ip_end(frame: &[u8]) -> usize {
    let end = match ether_type(frame) {
        0x0800 => 14 + usize::from(u16::from_be_bytes([frame[16], frame[17]])),
        _ => 54 + usize::from(u16::from_be_bytes([frame[18], frame[19]])),
    };
    end.min(frame.len())
}

/// The sums over what an ICMP error's checksums cover: IPv4's header, the ICMP
/// message and the quoted IPv4 header; or ICMPv6's pseudo-header and message.
fn error_sums(frame: &[u8]) -> Vec<u16> {
    let end = ip_end(frame);
    match ether_type(frame) {
        0x0800 => vec![
            internet_checksum(&frame[14..34]),
            internet_checksum(&frame[34..end.max(34)]),
            internet_checksum(&frame[42..62]),
        ],
        _ => {
            let message = &frame[54..end.max(54)];
            vec![checksum_for(&frame[22..38], &frame[38..54], 58, message)]
        }
    }
}

/// The sums over what a fragment's checksums cover: IPv4's header; and the addresses
/// with the transport bytes a first fragment holds (unless UDP's checksum is zero,
/// "none", which stays zero).
fn fragment_sums(frame: &[u8], fragment: &Fragment) -> Vec<u16> {
    let (addresses, header) = match ether_type(frame) {
        0x0800 => (&frame[26..34], Some(&frame[14..fragment.headers_end])),
        _ => (&frame[22..54], None),
    };
    let mut sums: Vec<u16> = header.map(internet_checksum).into_iter().collect();
    let transport = &frame[fragment.headers_end..ip_end(frame).max(fragment.headers_end)];
    let unchecked_udp = fragment.protocol == 17 && transport.get(6..8) == Some(&[0, 0][..]);
    if !fragment.later && !unchecked_udp {
        let mut summed = addresses.to_vec();
        summed.extend_from_slice(transport);
        sums.push(internet_checksum(&summed));
    }
    sums
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(20000)
}

/// Each family's services: TCP with a local and a remote backend, UDP with a local
/// one, a UDP NodePort with a remote one, and a `dsr-ipip` LoadBalancer IP with a
/// remote backend and the tunnel view of a local one.
fn program(dp: &mut TestDatapath) {
    let plain = |endpoints: Vec<Endpoint>| Frontend {
        service: "test/plain".into(),
        endpoints,
        ..Default::default()
    };
    let mut frontends = vec![(
        node_port(NODE_PORT, Protocol::Udp),
        Frontend {
            external: true,
            ..plain(vec![remote([10, 244, 2, 2], 5353)])
        },
    )];
    for net in nets() {
        let (lb, _) = tunnel_addresses(net.family);
        frontends.extend([
            (
                frontend(net.vip, 80, Protocol::Tcp),
                plain(vec![
                    endpoint(net.pods[0], false),
                    endpoint(net.remote_pod, true),
                ]),
            ),
            (
                frontend(net.vip, 53, Protocol::Udp),
                plain(vec![endpoint(net.pods[1], false)]),
            ),
            (
                frontend(lb, 80, Protocol::Tcp),
                Frontend {
                    external: true,
                    dsr: true,
                    ..plain(vec![endpoint(net.remote_pod, true)])
                },
            ),
            (
                FrontendKey {
                    listen: Listen::TunnelAddress(lb),
                    ..frontend(lb, 80, Protocol::Tcp)
                },
                Frontend {
                    external: true,
                    ..plain(vec![endpoint(net.pods[0], false)])
                },
            ),
        ]);
    }
    dp.program_frontends(frontends);
}

/// Whether a conntrack key's destination is a programmed frontend.
fn to_a_frontend(family: Family, dst: IpAddr, port: u16) -> bool {
    nets().iter().any(|net| {
        net.family == family
            && ((dst == net.vip && [80, 53].contains(&port))
                || (dst == tunnel_addresses(family).0 && port == 80)
                || (dst == net.node && port == NODE_PORT))
    })
}

#[test]
fn random_and_mutated_packets_pass_cleanly_or_are_translated_correctly() {
    let mut dp = TestDatapath::new();
    program(&mut dp);
    let corpus: Vec<Vec<u8>> = nets().iter().flat_map(corpus).collect();
    // Every frame of the corpus first, as it is: the properties hold for valid
    // packets too, and the paths the assertions at the end expect (flows of both
    // families, both tunnels' ways) are taken however few the random cases are (the
    // kernel matrix's guests run 64).
    for frame in &corpus {
        let (verdict, output) = dp.xdp(frame);
        check_output(Hook::Xdp, frame, verdict, &output)
            .unwrap_or_else(|e| panic!("{e}: {frame:02x?}"));
        let (verdict, output) = dp.tc(frame);
        check_output(Hook::Tc, frame, verdict, &output)
            .unwrap_or_else(|e| panic!("{e}: {frame:02x?}"));
    }
    // The corpus takes both ways of the tunnels (on the legacy object IPv4's only).
    for event in ["encapsulated", "decapsulated"] {
        assert!(dp.event(event) > 0, "the corpus had no packet {event}");
    }
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let dp = std::cell::RefCell::new(dp);
    let runs = std::cell::Cell::new(0u32);
    proptest!(config, |(
        seed in 0..corpus.len(),
        mutations in prop::collection::vec(mutation(), 0..4),
        random_type in prop::sample::select(&RANDOM_ETHER_TYPES[..]),
        random in prop::collection::vec(any::<u8>(), 1..120),
        use_random in prop::bool::weighted(0.2),
    )| {
        let mut input = if use_random {
            random_frame(random_type, random.clone())
        } else {
            mutate(corpus[seed].clone(), &mutations)
        };
        fix_checksums(&mut input);
        let mut dp = dp.borrow_mut();
        // What the kernel's test harness refuses before the program runs (EINVAL:
        // the skb harness takes no IPv4 frame shorter than an IPv4 header, and some
        // other generated frames) tells nothing about the programs.
        if let Ok((verdict, output)) = dp.try_xdp(&input) {
            runs.set(runs.get() + 1);
            check_output(Hook::Xdp, &input, verdict, &output)?;
        }
        if let Ok((verdict, output)) = dp.try_tc(&input) {
            runs.set(runs.get() + 1);
            check_output(Hook::Tc, &input, verdict, &output)?;
        }
    });
    // The harness ran most inputs (each goes through two hooks).
    assert!(
        runs.get() > cases(),
        "{} runs of {} cases",
        runs.get(),
        cases()
    );
    let dp = dp.into_inner();
    // No garbage in conntrack: every original entry is for a programmed frontend;
    // and the corpus's flows were opened.
    let tables = dp.tables();
    let mut opened = std::collections::BTreeSet::new();
    for entry in tables.conntrack.iter() {
        let (key, value) = entry.expect("read");
        if value.flags & proxy_common::CT_F_REPLY != 0 {
            continue;
        }
        let family = Family::from_number(key.family).expect("a family");
        opened.insert(key.family);
        let dst = key.dst.to_ip(family);
        assert!(
            to_a_frontend(family, dst, u16::from_be(key.dport)),
            "conntrack entry for a non-service tuple: {key:?}"
        );
        assert!(matches!(key.proto, 6 | 17), "{key:?}");
    }
    // The legacy object (kernels before 5.18) passes IPv6 untouched.
    let families = match dp.datapath.generation {
        Generation::Legacy => 1,
        Generation::Current => 2,
    };
    assert_eq!(
        opened.len(),
        families,
        "flows of each family served: {opened:?}"
    );
}

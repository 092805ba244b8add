//! The data path's translation, packet by packet through BPF_PROG_TEST_RUN, for each
//! address family: one body per behaviour, run for IPv4 and for IPv6 (whose programs
//! the IPv4 ones hand IPv6 frames to), checksums verified by etherparse.

use std::net::IpAddr;

use ebpf_proxy::model::{Endpoint, FrontendKey, Listen, Protocol};

use crate::support::{
    datapath::*,
    families::*,
    packets::{next_header::*, *},
};

#[test]
fn a_service_packet_is_translated_to_a_backend_by_either_hook_checksums_intact() {
    for net in nets() {
        for l4 in OPENING {
            let mut dp = TestDatapath::new();
            let backends: Vec<Endpoint> = net.pods.iter().map(|p| endpoint(*p, false)).collect();
            dp.program(&[(frontend(net.vip, 80, protocol_of(l4)), backends)]);
            let from_uplink = packet((net.client, 40000), (net.vip, 80), l4, b"hello");
            let from_pod = packet((net.pods[0], 40001), (net.vip, 80), l4, b"hello");
            for (verdict, out) in [dp.xdp(&from_uplink), dp.tc(&from_pod)] {
                assert!(
                    [XDP_PASS, TC_ACT_OK].contains(&verdict),
                    "{:?} {l4:?}",
                    net.family
                );
                let seen = inspect_ip(&out);
                assert!(
                    net.pods.iter().any(|p| seen.dst == (*p, 8080)),
                    "{:?} {l4:?}: {seen:?}",
                    net.family
                );
            }
        }
    }
}

#[test]
fn replies_are_reverse_translated_to_the_service_address() {
    for net in nets() {
        for l4 in OPENING {
            let mut dp = serving(&net, protocol_of(l4));
            let (_, out) = dp.xdp(&packet((net.client, 40000), (net.vip, 80), l4, b"q"));
            let backend = inspect_ip(&out).dst;
            let answer = match l4 {
                L4::Tcp(_) => L4::Tcp(Tcp::SynAck),
                L4::Udp => L4::Udp,
            };
            let (verdict, reply) = dp.tc(&packet(backend, (net.client, 40000), answer, b"a"));
            assert_eq!(verdict, TC_ACT_OK, "{:?} {l4:?}", net.family);
            let seen = inspect_ip(&reply);
            assert_eq!(
                (seen.src, seen.dst),
                ((net.vip, 80), (net.client, 40000)),
                "{:?} {l4:?}",
                net.family
            );
        }
    }
}

/// A data path with NodePort 30080 of `net`'s family, whose one backend is the remote
/// pod.
fn remote_node_port(net: &Net, protocol: Protocol) -> TestDatapath {
    let mut dp = TestDatapath::new();
    dp.program(&[(
        FrontendKey {
            listen: Listen::NodePort(net.family),
            port: 30080,
            protocol,
        },
        vec![endpoint(net.remote_pod, true)],
    )]);
    dp
}

/// A NodePort of each family, its backend on another node: the client's packet is
/// masqueraded to the node's address of the family, and the backend's reply comes
/// back to the client from the NodePort.
#[test]
fn a_node_port_flow_to_a_remote_backend_is_masqueraded_to_the_node_address_of_its_family() {
    for net in nets() {
        let mut dp = remote_node_port(&net, Protocol::Tcp);
        let syn = packet(
            (net.client, 40000),
            (net.node, 30080),
            L4::Tcp(Tcp::Syn),
            b"",
        );
        let (verdict, out) = dp.xdp(&syn);
        assert_eq!(verdict, XDP_PASS, "{:?}", net.family);
        let seen = inspect_ip(&out);
        assert_eq!(seen.dst, (net.remote_pod, 8080), "{:?}", net.family);
        assert_eq!(seen.src.0, net.node, "{:?}: masqueraded", net.family);
        let (_, reply) = dp.xdp(&packet(seen.dst, seen.src, L4::Tcp(Tcp::SynAck), b""));
        let back = inspect_ip(&reply);
        assert_eq!(
            (back.src, back.dst),
            ((net.node, 30080), (net.client, 40000)),
            "{:?}",
            net.family
        );
    }
}

#[test]
fn a_packet_to_no_service_address_passes_byte_for_byte() {
    for net in nets() {
        let mut dp = serving(&net, Protocol::Tcp);
        for l4 in OPENING {
            let elsewhere = packet((net.client, 40000), (net.remote_pod, 80), l4, b"x");
            assert_eq!(dp.xdp(&elsewhere), (XDP_PASS, elsewhere.clone()));
            assert_eq!(dp.tc(&elsewhere), (TC_ACT_OK, elsewhere));
        }
    }
}

/// IPv6's extension headers (hop-by-hop, destination options, a fragment header of a
/// whole datagram) are stepped over to the transport header and left in place.
#[test]
fn ipv6_extension_headers_are_stepped_over_and_kept() {
    let [_, net] = nets();
    for l4 in OPENING {
        let mut dp = serving(&net, protocol_of(l4));
        let extensions = Extensions {
            hop_by_hop: true,
            destination_options: true,
            atomic_fragment: true,
        };
        let sent = packet_with((net.client, 40000), (net.vip, 80), l4, b"xyz", extensions);
        for (verdict, out) in [dp.xdp(&sent), dp.tc(&sent)] {
            assert!([XDP_PASS, TC_ACT_OK].contains(&verdict));
            assert_eq!(inspect_ip(&out).dst, (net.pods[0], 8080), "{l4:?}");
            assert_eq!(out.len(), sent.len());
            // Everything between the fixed header's addresses and the transport
            // header (next headers, options, the fragment header) is unchanged.
            assert_eq!(out[14..22], sent[14..22]);
            assert_eq!(out[54..54 + 24], sent[54..54 + 24], "{l4:?}");
        }
    }
}

/// `count` destination options headers of eight bytes (PadN) put before the
/// transport header of an IPv6 `frame` without extension headers.
fn with_destination_options(frame: &[u8], count: usize) -> Vec<u8> {
    let transport = frame[14 + 6];
    let headers: Vec<[u8; 8]> = (0..count)
        .map(|i| {
            let next = if i + 1 == count {
                transport
            } else {
                DEST_OPTIONS
            };
            [next, 0, 1, 4, 0, 0, 0, 0]
        })
        .collect();
    with_headers(frame, DEST_OPTIONS, &headers)
}

/// The walk is bounded: six extension headers are stepped over; a seventh makes the
/// packet one the data path does not parse (counted `malformed`, passed untouched).
#[test]
fn ipv6_extension_headers_beyond_six_are_not_walked() {
    let [_, net] = nets();
    let mut dp = serving(&net, Protocol::Udp);
    let plain = packet((net.client, 40000), (net.vip, 80), L4::Udp, b"abc");
    let six = with_destination_options(&plain, 6);
    let (_, out) = dp.xdp(&six);
    assert_eq!(inspect_ip(&out).dst, (net.pods[0], 8080));
    let malformed = dp.event("malformed");
    let seven = with_destination_options(&plain, 7);
    assert_eq!(dp.xdp(&seven), (XDP_PASS, seven.clone()));
    assert_eq!(dp.event("malformed"), malformed + 1);
}

/// IPv6's extension headers claiming more than the packet holds are malformed: the
/// packet passes untouched.
#[test]
fn an_ipv6_extension_header_longer_than_its_packet_is_malformed() {
    let [_, net] = nets();
    let mut dp = serving(&net, Protocol::Udp);
    let mut lying = with_destination_options(
        &packet((net.client, 40000), (net.vip, 80), L4::Udp, b"abc"),
        1,
    );
    lying[54 + 1] = 200; // 1,608 bytes of options
    assert_eq!(dp.xdp(&lying), (XDP_PASS, lying.clone()));
    assert_eq!(dp.tc(&lying), (TC_ACT_OK, lying.clone()));
}

/// Neighbour discovery is IPv6's ARP: it passes every hook untouched. A ping of a
/// service address is not answered by anyone: refused (ICMPv6 port unreachable from
/// the service address, as for IPv4).
#[test]
fn neighbour_discovery_passes_and_a_ping_of_a_service_address_is_refused() {
    let [_, net] = nets();
    let mut dp = serving(&net, Protocol::Tcp);
    let (IpAddr::V6(client), IpAddr::V6(vip)) = (net.client, net.vip) else {
        unreachable!()
    };
    let icmpv6 = |dst: [u8; 16], kind: u8| {
        let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv6(client.octets(), dst, 255);
        let builder = if kind == 128 {
            builder.icmpv6_echo_request(7, 1)
        } else {
            builder.icmpv6_raw(kind, 0, [0; 4])
        };
        let mut out = Vec::new();
        builder.write(&mut out, &[0; 24]).expect("icmpv6");
        out
    };
    // A neighbour solicitation for the node, addressed to its solicited-node group.
    let solicitation = icmpv6(
        "ff02::1:ff00:1"
            .parse::<std::net::Ipv6Addr>()
            .expect("group")
            .octets(),
        135,
    );
    assert_eq!(dp.xdp(&solicitation), (XDP_PASS, solicitation.clone()));
    assert_eq!(dp.tc(&solicitation), (TC_ACT_OK, solicitation.clone()));
    let refused = dp.event("refused");
    let ping = icmpv6(vip.octets(), 128);
    let (verdict, refusal) = dp.xdp(&ping);
    assert_eq!(verdict, XDP_PASS);
    let refusal = read_icmp_error(&refusal);
    assert_eq!(refusal.kind, 1, "destination unreachable");
    assert_eq!(refusal.outer, (net.vip, net.client));
    assert_eq!(refusal.quote[..48], ping[14..14 + 48], "quotes the ping");
    assert_eq!(dp.event("refused"), refused + 1);
}

/// What follows a later fragment's fragment header is payload: a forged "fragment
/// header" there (offset 0, then a UDP header to the service) must not be parsed as
/// the packet's own, or it opens a flow and gets its payload rewritten.
#[test]
fn a_later_ipv6_fragment_s_payload_is_never_read_as_headers() {
    let [_, net] = nets();
    let mut dp = serving(&net, Protocol::Udp);
    let plain = packet((net.client, 40000), (net.vip, 80), L4::Udp, b"abc");
    let forged = with_headers(
        &plain,
        FRAGMENT,
        &[
            // A later fragment (offset 8 bytes), next header "fragment"...
            [FRAGMENT, 0, 0x00, 0x08, 0, 0, 0, 7],
            // ...and, in its payload, a "first fragment" header before a UDP header.
            [UDP, 0, 0, 0, 0, 0, 0, 7],
        ],
    );
    let (verdict, out) = dp.xdp(&forged);
    assert_eq!(out, forged, "untranslated");
    // To a service address and of no tracked datagram: dropped, as IPv4's are.
    assert_eq!(verdict, XDP_DROP);
    assert!(
        dp.tables().conntrack.keys().next().is_none(),
        "no flow opened"
    );
}

/// A routing header with segments left: the fixed header's destination is not the
/// final one (which the transport checksum covers), so the packet is not translated.
#[test]
fn an_ipv6_packet_with_segments_left_in_a_routing_header_is_not_translated() {
    let [_, net] = nets();
    let mut dp = serving(&net, Protocol::Udp);
    let plain = packet((net.client, 40000), (net.vip, 80), L4::Udp, b"abc");
    let malformed = dp.event("malformed");
    let routed = with_headers(&plain, ROUTING, &[[UDP, 0, 4, 1, 0, 0, 0, 0]]);
    assert_eq!(dp.xdp(&routed), (XDP_PASS, routed.clone()));
    assert_eq!(dp.event("malformed"), malformed + 1);
    // Segments left 0 (the last segment reached): an ordinary header.
    let arrived = with_headers(&plain, ROUTING, &[[UDP, 0, 4, 0, 0, 0, 0, 0]]);
    assert_eq!(inspect_ip(&dp.xdp(&arrived).1).dst, (net.pods[0], 8080));
}

/// Extension headers the kernel would not accept are not stepped over (the packet
/// passes untouched, counted as malformed): hop-by-hop options anywhere but first
/// (RFC 8200 section 4.1), an authentication header shorter than its 12-byte minimum
/// (RFC 4302 section 2.2). A well-formed authentication header is stepped over.
#[test]
fn misplaced_hop_by_hop_options_and_short_authentication_headers_are_malformed() {
    let [_, net] = nets();
    let mut dp = serving(&net, Protocol::Udp);
    let plain = packet((net.client, 40000), (net.vip, 80), L4::Udp, b"abc");
    let padding = [1, 4, 0, 0, 0, 0];
    let option = |next: u8| {
        let mut header = [next, 0, 0, 0, 0, 0, 0, 0];
        header[2..].copy_from_slice(&padding);
        header
    };
    let misplaced = with_headers(&plain, DEST_OPTIONS, &[option(HOP_BY_HOP), option(UDP)]);
    let short_auth = with_headers(&plain, AUTH, &[[UDP, 0, 0, 0, 0, 0, 0, 1]]);
    for malformed in [misplaced, short_auth] {
        let before = dp.event("malformed");
        assert_eq!(dp.xdp(&malformed), (XDP_PASS, malformed.clone()));
        assert_eq!(dp.event("malformed"), before + 1);
    }
    // Sixteen bytes: next header, length 2, reserved, SPI, sequence, 4 bytes of ICV.
    let auth = with_headers(
        &plain,
        AUTH,
        &[[UDP, 2, 0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 0, 0, 0, 0]],
    );
    assert_eq!(inspect_ip(&dp.xdp(&auth).1).dst, (net.pods[0], 8080));
}

/// A zero UDP checksum over IPv6 (invalid, or a tunnel's RFC 6935 zero) stays zero
/// through either hook, as the tc helper leaves it: never a made-up value.
#[test]
fn a_zero_ipv6_udp_checksum_stays_zero_through_either_hook() {
    let [_, net] = nets();
    let mut dp = serving(&net, Protocol::Udp);
    const CHECK: usize = 14 + 40 + 6;
    let mut zero = packet((net.client, 40000), (net.vip, 80), L4::Udp, b"abc");
    zero[CHECK..CHECK + 2].copy_from_slice(&[0, 0]);
    for (_, out) in [dp.xdp(&zero), dp.tc(&zero)] {
        assert_eq!(out[CHECK..CHECK + 2], [0, 0]);
        assert_ne!(out[14 + 24..14 + 40], zero[14 + 24..14 + 40], "translated");
    }
}

/// Two outside clients that chose the same port, masqueraded toward one remote
/// backend: the second would reach it with the first one's tuple, so its port is
/// remapped (`reply_port_remapped`); each one's replies, and an ICMP error about each
/// one's packet, reach that client.
#[test]
fn masqueraded_clients_of_one_port_keep_their_flows_apart_replies_and_errors_alike() {
    for net in nets() {
        let mut dp = remote_node_port(&net, Protocol::Udp);
        let other_client = match net.client {
            IpAddr::V4(_) => ip("198.18.0.3"),
            IpAddr::V6(_) => ip("fd00:18::3"),
        };
        let mut seen = Vec::new();
        for client in [net.client, other_client] {
            let question = packet((client, 40000), (net.node, 30080), L4::Udp, b"q");
            let (_, out) = dp.xdp(&question);
            seen.push((client, out.clone(), inspect_ip(&out)));
        }
        let (first, second) = (seen[0].2, seen[1].2);
        assert_eq!(first.src, (net.node, 40000), "{:?}", net.family);
        assert_eq!(second.src.0, net.node, "{:?}", net.family);
        assert_ne!(second.src.1, 40000, "{:?}: not remapped", net.family);
        assert_eq!(dp.event("reply_port_remapped"), 1, "{:?}", net.family);
        for (client, translated, at_backend) in &seen {
            let (_, reply) = dp.xdp(&packet(at_backend.dst, at_backend.src, L4::Udp, b"a"));
            let back = inspect_ip(&reply);
            assert_eq!(
                (back.src, back.dst),
                ((net.node, 30080), (*client, 40000)),
                "{:?}",
                net.family
            );
            let error = icmp_error(
                net.remote_pod,
                net.node,
                IcmpError::PortUnreachable,
                translated,
            );
            let (_, out) = dp.xdp(&error);
            let error = read_icmp_error(&out);
            assert_eq!(error.outer, (net.node, *client), "{:?}", net.family);
            assert_eq!(
                error.quoted,
                ((*client, 40000), (net.node, 30080)),
                "{:?}",
                net.family
            );
        }
    }
}

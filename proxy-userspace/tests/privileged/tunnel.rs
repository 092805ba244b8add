//! Tunnels in the data path, byte by byte through BPF_PROG_TEST_RUN, one body per
//! family (IPIP for IPv4, ip6ip6 for IPv6): the entry node of a `dsr-ipip` flow
//! encapsulates the client's packet untouched towards the chosen backend, and the
//! backend's node decapsulates it and translates it for the very backend the outer
//! header names, keeping the client's address.

use std::{collections::BTreeSet, net::IpAddr};

use crate::support::{datapath::*, families::*, packets::*};
use ebpf_proxy::{
    model::{Endpoint, Family, Frontend, FrontendKey, Listen, Protocol, SourceRange},
    sync::NodeSettings,
};

/// A family's addresses for tunnels, beside `Net`'s.
struct Tunnels {
    net: Net,
    /// A LoadBalancer IP.
    lb: IpAddr,
    /// Another node, the entry node of tunnelled flows, and its prefix.
    entry_node: IpAddr,
    peers: SourceRange,
    /// A source no list trusts.
    outsider: IpAddr,
    /// A prefix holding the client.
    client_range: SourceRange,
}

fn tunnels() -> [Tunnels; 2] {
    let [v4, v6] = nets();
    [
        Tunnels {
            net: v4,
            lb: ip("198.18.100.1"),
            entry_node: ip("198.18.2.1"),
            peers: range("198.18.2.0/24"),
            outsider: ip("203.0.113.9"),
            client_range: range("198.18.0.0/24"),
        },
        Tunnels {
            net: v6,
            lb: ip("fd00:18:100::1"),
            entry_node: ip("fd00:18:2::1"),
            peers: range("fd00:18:2::/48"),
            outsider: ip("2001:db8:ff::9"),
            client_range: range("fd00:18::/48"),
        },
    ]
}

fn range(text: &str) -> SourceRange {
    text.parse().expect("a prefix")
}

fn dsr_frontend(endpoints: Vec<Endpoint>) -> Frontend {
    Frontend {
        service: "test/web".into(),
        external: true,
        endpoints,
        dsr: true,
        ..Default::default()
    }
}

/// What the backend's node has: the tunnel view of a `dsr-ipip` frontend (its local
/// endpoints), not itself `dsr`.
fn tunnel_view(endpoints: Vec<Endpoint>) -> Frontend {
    Frontend {
        dsr: false,
        ..dsr_frontend(endpoints)
    }
}

fn tunnel_key(lb: IpAddr) -> FrontendKey {
    FrontendKey {
        listen: Listen::TunnelAddress(lb),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn syn(t: &Tunnels, port: u16, dst: (IpAddr, u16)) -> Vec<u8> {
    packet((t.net.client, port), dst, L4::Tcp(Tcp::Syn), b"hello")
}

/// An encapsulated frame's outer header, checked against the packet it carries.
struct Outer {
    src: IpAddr,
    dst: IpAddr,
    /// IPv6's flow label (0 for IPv4).
    flow_label: u32,
}

fn outer_of(frame: &[u8], inner: &[u8]) -> Outer {
    assert_eq!(frame[..14], inner[..14], "Ethernet header kept");
    let inner_len = inner.len() - 14;
    if inner[12..14] == [0x86, 0xdd] {
        assert_eq!(frame.len(), inner.len() + 40, "one outer header added");
        let outer = &frame[14..54];
        assert_eq!(outer[0] >> 4, 6, "IPv6");
        assert_eq!(
            (outer[0] & 0x0f, outer[1] & 0xf0),
            (inner[14] & 0x0f, inner[15] & 0xf0),
            "traffic class copied from the inner packet"
        );
        assert_eq!(outer[6], 41, "next header IPv6 (ip6ip6)");
        assert_eq!(outer[7], 64, "the outer hop limit");
        assert_eq!(
            u16::from_be_bytes([outer[4], outer[5]]) as usize,
            inner_len,
            "outer payload length: the whole inner packet"
        );
        assert_eq!(frame[54..], inner[14..], "inner packet carried unchanged");
        let octets = |at: usize| -> [u8; 16] { outer[at..at + 16].try_into().expect("16 bytes") };
        return Outer {
            src: IpAddr::from(octets(8)),
            dst: IpAddr::from(octets(24)),
            flow_label: u32::from_be_bytes([0, outer[1] & 0x0f, outer[2], outer[3]]),
        };
    }
    assert_eq!(frame.len(), inner.len() + 20, "one outer header added");
    let outer = &frame[14..34];
    assert_eq!(outer[0], 0x45, "IPv4 without options");
    assert_eq!(outer[9], 4, "protocol IPIP");
    assert_eq!(
        u16::from_be_bytes([outer[2], outer[3]]) as usize,
        inner_len + 20,
        "outer length"
    );
    assert_eq!(
        outer[6] & 0x40,
        inner[20] & 0x40,
        "DF copied from the inner packet"
    );
    assert_eq!(internet_checksum(outer), 0, "outer header checksum");
    assert_eq!(frame[34..], inner[14..], "inner packet carried unchanged");
    let octets = |at: usize| -> [u8; 4] { outer[at..at + 4].try_into().expect("4 bytes") };
    Outer {
        src: IpAddr::from(octets(12)),
        dst: IpAddr::from(octets(16)),
        flow_label: 0,
    }
}

/// That `trace` explains the client's SYN to the LoadBalancer IP, tunnelled from
/// `outer_src` to `outer_dst`, as dropped with `event`.
fn assert_traced_drop(
    dp: &TestDatapath,
    t: &Tunnels,
    outer_src: IpAddr,
    outer_dst: IpAddr,
    event: &str,
) {
    let explained = ebpf_proxy::trace::explain(
        &dp.tables(),
        &proxy_common::LoadSettings::DEFAULT,
        Protocol::Tcp,
        (t.net.client, 40000).into(),
        (t.lb, 80).into(),
        ebpf_proxy::trace::Origin::Tunnel {
            outer_src,
            outer_dst,
        },
    )
    .expect("trace");
    assert!(
        explained
            .dropped
            .as_deref()
            .is_some_and(|why| why.contains(event)),
        "{explained:?}"
    );
}

#[test]
fn the_entry_node_encapsulates_a_flow_to_a_remote_backend_unchanged() {
    for t in tunnels() {
        let mut dp = TestDatapath::new();
        dp.program_frontends(vec![(
            frontend(t.lb, 80, Protocol::Tcp),
            dsr_frontend(vec![endpoint(t.net.remote_pod, true)]),
        )]);
        for flags in [Tcp::Syn, Tcp::Ack, Tcp::Ack] {
            let mut packet = packet((t.net.client, 40000), (t.lb, 80), L4::Tcp(flags), b"hello");
            if t.net.family == Family::V6 {
                // Traffic class 0xb8 (EF) and flow label 0x12345: the class is carried
                // over, the label is the tunnel's own (outside any checksum).
                packet[14..18].copy_from_slice(&[0x6b, 0x81, 0x23, 0x45]);
            }
            let (verdict, out) = dp.xdp(&packet);
            assert_eq!(verdict, XDP_PASS, "{:?}", t.net.family);
            let outer = outer_of(&out, &packet);
            assert_eq!((outer.src, outer.dst), (t.net.node, t.net.remote_pod));
            assert_ne!(
                outer.flow_label, 0x12345,
                "the inner flow label is not leaked"
            );
        }
        assert_eq!(dp.event("encapsulated"), 3, "{:?}", t.net.family);
        // Nothing waits for a reply here: one conntrack entry, no reply entry.
        assert_eq!(dp.tables().conntrack.keys().count(), 1);
    }
}

#[test]
fn without_dsr_or_for_a_local_backend_nothing_is_encapsulated() {
    for t in tunnels() {
        let mut dp = TestDatapath::new();
        let mut snat = dsr_frontend(vec![endpoint(t.net.remote_pod, true)]);
        snat.dsr = false;
        dp.program_frontends(vec![
            (frontend(t.lb, 80, Protocol::Tcp), snat),
            (
                frontend(t.lb, 81, Protocol::Tcp),
                dsr_frontend(vec![endpoint(t.net.pods[0], false)]),
            ),
        ]);
        let seen = inspect_ip(&dp.xdp(&syn(&t, 40000, (t.lb, 80))).1);
        assert_eq!(
            (seen.src.0, seen.dst),
            (t.net.node, (t.net.remote_pod, 8080)),
            "masqueraded"
        );
        let seen = inspect_ip(&dp.xdp(&syn(&t, 40001, (t.lb, 81))).1);
        assert_eq!(seen.dst, (t.net.pods[0], 8080), "translated here");
        assert_eq!(dp.event("encapsulated"), 0);
    }
}

#[test]
fn outer_sources_are_hashed_over_the_configured_range_per_flow() {
    let [t, _] = tunnels();
    let mut dp = TestDatapath::new();
    dp.settings(NodeSettings {
        tunnel_source: Some(range("198.18.255.0/28")),
        ..Default::default()
    });
    dp.program_frontends(vec![(
        frontend(t.lb, 80, Protocol::Tcp),
        dsr_frontend(vec![endpoint(t.net.remote_pod, true)]),
    )]);
    let mut sources = BTreeSet::new();
    for port in 40000..40064 {
        let syn = syn(&t, port, (t.lb, 80));
        let src = outer_of(&dp.xdp(&syn).1, &syn).src;
        assert!(range("198.18.255.0/28").contains(&src), "{src} in the /28");
        let ack = packet((t.net.client, port), (t.lb, 80), L4::Tcp(Tcp::Ack), b"");
        assert_eq!(
            outer_of(&dp.xdp(&ack).1, &ack).src,
            src,
            "one source per flow"
        );
        sources.insert(src);
    }
    assert!(sources.len() >= 8, "64 flows over 16 sources: {sources:?}");
}

/// IPv6's outer source is the node's address; its flows are told apart by the flow
/// label, which the receiver's RSS and ECMP on the way may hash.
#[test]
fn ip6ip6_flows_are_spread_by_their_flow_label() {
    let [_, t] = tunnels();
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![(
        frontend(t.lb, 80, Protocol::Tcp),
        dsr_frontend(vec![endpoint(t.net.remote_pod, true)]),
    )]);
    let mut labels = BTreeSet::new();
    for port in 40000..40064 {
        let syn = syn(&t, port, (t.lb, 80));
        let outer = outer_of(&dp.xdp(&syn).1, &syn);
        assert_eq!(outer.src, t.net.node);
        let ack = packet((t.net.client, port), (t.lb, 80), L4::Tcp(Tcp::Ack), b"");
        assert_eq!(
            outer_of(&dp.xdp(&ack).1, &ack).flow_label,
            outer.flow_label,
            "one label per flow"
        );
        labels.insert(outer.flow_label);
    }
    assert!(labels.len() >= 60, "64 flows, {} labels", labels.len());
}

#[test]
fn the_backend_node_decapsulates_for_the_backend_the_outer_header_names() {
    for t in tunnels() {
        let [pod_1, pod_2] = t.net.pods;
        let mut dp = TestDatapath::new();
        let endpoints = vec![endpoint(pod_1, false), endpoint(pod_2, false)];
        dp.program_frontends(vec![(tunnel_key(t.lb), tunnel_view(endpoints))]);
        // Three flows named for the second pod, then two for the first: rr would
        // alternate instead.
        for (port, backend) in [
            (40000, pod_2),
            (40001, pod_2),
            (40002, pod_2),
            (40003, pod_1),
            (40004, pod_1),
        ] {
            let inner = syn(&t, port, (t.lb, 80));
            let (verdict, out) = dp.xdp(&tunnelled(t.entry_node, backend, &inner));
            assert_eq!(verdict, XDP_PASS, "{:?}", t.net.family);
            assert_eq!(out.len(), inner.len(), "outer header removed");
            assert_eq!(out[..14], inner[..14], "Ethernet header kept");
            let seen = inspect_ip(&out);
            assert_eq!(
                seen.src,
                (t.net.client, port),
                "the client's address reaches the pod"
            );
            assert_eq!(seen.dst, (backend, 8080));
        }
        assert_eq!(dp.event("decapsulated"), 5);
        // Later packets of a flow follow its conntrack entry; the pod's reply leaves
        // with the service address, straight for the client.
        let ack = packet((t.net.client, 40000), (t.lb, 80), L4::Tcp(Tcp::Ack), b"");
        let out = dp.xdp(&tunnelled(t.entry_node, pod_2, &ack)).1;
        assert_eq!(inspect_ip(&out).dst, (pod_2, 8080));
        let reply = packet(
            (pod_2, 8080),
            (t.net.client, 40000),
            L4::Tcp(Tcp::SynAck),
            b"",
        );
        let (verdict, reply) = dp.tc(&reply);
        assert_eq!(verdict, TC_ACT_OK);
        let seen = inspect_ip(&reply);
        assert_eq!((seen.src, seen.dst), ((t.lb, 80), (t.net.client, 40000)));
    }
}

#[test]
fn tunnels_that_are_not_ours_pass_untouched() {
    for t in tunnels() {
        let mut dp = TestDatapath::new();
        dp.program_frontends(vec![(
            tunnel_key(t.lb),
            tunnel_view(vec![endpoint(t.net.pods[0], false)]),
        )]);
        let other_service = match t.net.family {
            Family::V4 => ip("198.18.100.9"),
            Family::V6 => ip("fd00:18:100::9"),
        };
        let stranger = match t.net.family {
            Family::V4 => ip("10.244.9.9"),
            Family::V6 => ip("fd00:244:9::9"),
        };
        let mut frames = vec![
            // The inner destination is no service.
            tunnelled(
                t.entry_node,
                t.net.pods[0],
                &syn(&t, 40000, (other_service, 80)),
            ),
            // The outer destination is neither this node nor one of the service's pods.
            tunnelled(t.entry_node, stranger, &syn(&t, 40000, (t.lb, 80))),
        ];
        if t.net.family == Family::V6 {
            // IPv6 decapsulates only an inner packet without extension headers (the
            // module's note in proxy-ebpf's `tunnel`).
            let with_options = packet_with(
                (t.net.client, 40000),
                (t.lb, 80),
                L4::Tcp(Tcp::Syn),
                b"",
                Extensions {
                    destination_options: true,
                    ..Default::default()
                },
            );
            frames.push(tunnelled(t.entry_node, t.net.pods[0], &with_options));
        }
        for frame in frames {
            let (verdict, out) = dp.xdp(&frame);
            assert_eq!(verdict, XDP_PASS, "{:?}", t.net.family);
            assert_eq!(out, frame);
        }
        assert_eq!(dp.event("decapsulated"), 0);
    }
}

/// Issue 14: IPIP was decapsulated for any service on a node address, and a tracked
/// flow's packets were taken from any wrapper.
#[test]
fn only_dsr_ipip_frontends_are_reached_through_a_tunnel() {
    for t in tunnels() {
        let mut dp = TestDatapath::new();
        dp.program_frontends(vec![
            (
                tunnel_key(t.lb),
                tunnel_view(vec![endpoint(t.net.pods[0], false)]),
            ),
            (
                frontend(t.lb, 443, Protocol::Tcp),
                dsr_frontend(vec![Endpoint {
                    port: 8443,
                    ..endpoint(t.net.pods[1], false)
                }]),
            ),
        ]);
        // A plain (not tunnelled) flow to the other frontend, then a wrapped segment
        // of it and a wrapped new flow to it, addressed to the node.
        let plain = syn(&t, 40000, (t.lb, 443));
        assert_eq!(inspect_ip(&dp.xdp(&plain).1).dst, (t.net.pods[1], 8443));
        for inner in [
            packet(
                (t.net.client, 40000),
                (t.lb, 443),
                L4::Tcp(Tcp::Ack),
                b"injected",
            ),
            syn(&t, 40001, (t.lb, 443)),
        ] {
            let frame = tunnelled(t.entry_node, t.net.node, &inner);
            let (verdict, out) = dp.xdp(&frame);
            assert_eq!((verdict, out), (XDP_PASS, frame), "passed as it came");
        }
        assert_eq!(dp.event("decapsulated"), 0, "{:?}", t.net.family);
    }
}

#[test]
fn with_trusted_sources_configured_only_they_may_tunnel() {
    let [v4, v6] = tunnels();
    for (t, other) in [(&v4, &v6), (&v6, &v4)] {
        let pod = t.net.pods[0];
        let mut dp = TestDatapath::new();
        dp.settings(NodeSettings {
            tunnel_peers: Some(vec![v4.peers, v6.peers]),
            ..Default::default()
        });
        dp.program_frontends(vec![(
            tunnel_key(t.lb),
            tunnel_view(vec![endpoint(pod, false)]),
        )]);
        let inner = syn(t, 40000, (t.lb, 80));
        let (verdict, out) = dp.xdp(&tunnelled(t.entry_node, pod, &inner));
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(inspect_ip(&out).dst, (pod, 8080), "a trusted peer's flow");
        let (verdict, _) = dp.xdp(&tunnelled(t.outsider, pod, &inner));
        assert_eq!(verdict, XDP_DROP, "an outsider's wrapper");
        assert_eq!(dp.event("tunnel_refused"), 1);
        // A list of the other family's prefixes only trusts no tunnel of this one.
        dp.settings(NodeSettings {
            tunnel_peers: Some(vec![other.peers]),
            ..Default::default()
        });
        let inner = syn(t, 40001, (t.lb, 80));
        let (verdict, _) = dp.xdp(&tunnelled(t.entry_node, pod, &inner));
        assert_eq!(
            verdict, XDP_DROP,
            "{:?} with no peer of its family",
            t.net.family
        );
        assert_eq!(dp.event("tunnel_refused"), 2);
    }
}

#[test]
fn a_tunnel_cannot_carry_a_flow_past_load_balancer_source_ranges() {
    for t in tunnels() {
        let pod = t.net.pods[0];
        let mut dp = TestDatapath::new();
        let mut view = tunnel_view(vec![endpoint(pod, false)]);
        view.source_ranges = Some(vec![t.client_range]);
        dp.program_frontends(vec![(tunnel_key(t.lb), view)]);
        // The client is admitted by the ranges, but the wrapper could come from
        // anyone: with no trusted peers configured, nobody can vouch for the inner
        // source.
        let inner = syn(&t, 40000, (t.lb, 80));
        let (verdict, _) = dp.xdp(&tunnelled(t.outsider, pod, &inner));
        assert_eq!(verdict, XDP_DROP, "{:?}", t.net.family);
        assert_eq!(dp.event("tunnel_refused"), 1);
        // trace says the same.
        assert_traced_drop(&dp, &t, t.outsider, pod, "tunnel_refused");
        // A trusted entry node vouches for it (it applied the ranges itself).
        dp.settings(NodeSettings {
            tunnel_peers: Some(vec![t.peers]),
            ..Default::default()
        });
        let (verdict, out) = dp.xdp(&tunnelled(t.entry_node, pod, &inner));
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(inspect_ip(&out).dst, (pod, 8080));
        // And the ranges still apply to what it carries.
        let outsider = packet((t.outsider, 40000), (t.lb, 80), L4::Tcp(Tcp::Syn), b"");
        let (verdict, _) = dp.xdp(&tunnelled(t.entry_node, pod, &outsider));
        assert_eq!(verdict, XDP_DROP);
        assert_eq!(dp.event("source_denied"), 1);
    }
}

/// What the backend's node does not decapsulate passes as it came: an inner packet
/// whose length disagrees with the frame (or the outer header's), or too short for
/// its transport header, or of the other family (IPIP carries IPv4, ip6ip6 IPv6).
#[test]
fn malformed_or_mismatched_inner_packets_are_not_decapsulated() {
    let [v4, v6] = tunnels();
    for (t, other) in [(&v4, &v6), (&v6, &v4)] {
        let pod = t.net.pods[0];
        let mut dp = TestDatapath::new();
        dp.program_frontends(vec![(
            tunnel_key(t.lb),
            tunnel_view(vec![endpoint(pod, false)]),
        )]);
        let inner = syn(t, 40000, (t.lb, 80));
        // The inner IP header's length and where its length field is in a tunnelled
        // frame (IPv4's counts the header, IPv6's does not).
        let (header, length_at) = match t.net.family {
            Family::V4 => (20, 14 + 20 + 2),
            Family::V6 => (40, 14 + 40 + 4),
        };
        let counted = |ip_len: usize| match t.net.family {
            Family::V4 => ip_len,
            Family::V6 => ip_len - 40,
        };
        let with_inner_length = |inner: &[u8], len: usize| {
            let mut frame = tunnelled(t.entry_node, pod, inner);
            frame[length_at..length_at + 2].copy_from_slice(&(len as u16).to_be_bytes());
            frame
        };
        let stranger = syn(other, 40000, (other.lb, 80));
        let mut other_family = tunnelled(t.entry_node, pod, &stranger);
        other_family[12..14].copy_from_slice(&inner[12..14]);
        let mut frames = vec![
            // The inner packet claims more than the frame holds, or nothing.
            with_inner_length(&inner, counted(inner.len() - 14) + 8),
            with_inner_length(&inner, 0),
            // Its TCP header cut to 4 bytes, its length saying so.
            with_inner_length(&inner[..14 + header + 4], counted(header + 4)),
            other_family,
        ];
        if t.net.family == Family::V6 {
            // The outer payload length disagrees with the inner packet's.
            let mut frame = tunnelled(t.entry_node, pod, &inner);
            frame[18..20].copy_from_slice(&((inner.len() - 14 + 8) as u16).to_be_bytes());
            frame.extend_from_slice(&[0; 8]);
            frames.push(frame);
        }
        for frame in frames {
            let (verdict, out) = dp.xdp(&frame);
            assert_eq!((verdict, &out), (XDP_PASS, &frame), "{:?}", t.net.family);
        }
        assert_eq!(dp.event("decapsulated"), 0, "{:?}", t.net.family);
    }
}

/// A packet tunnelled here whose flow this node tunnels itself (it was the flow's
/// entry node, and another entry node now sends it here): dropped, never sent into a
/// second tunnel (found by the fuzzer: two nodes whose entries point at each other
/// would bounce it for ever), and the entry left as it was (the outer source may be
/// anyone's: it must not take a flow over).
#[test]
fn a_tunnelled_packet_is_never_encapsulated_again() {
    for t in tunnels() {
        let pod = t.net.pods[0];
        let mut dp = TestDatapath::new();
        dp.program_frontends(vec![
            (
                frontend(t.lb, 80, Protocol::Tcp),
                dsr_frontend(vec![endpoint(t.net.remote_pod, true)]),
            ),
            (tunnel_key(t.lb), tunnel_view(vec![endpoint(pod, false)])),
        ]);
        let syn = syn(&t, 40000, (t.lb, 80));
        let out = dp.xdp(&syn).1;
        assert_eq!(outer_of(&out, &syn).dst, t.net.remote_pod, "entry node");
        let ack = packet((t.net.client, 40000), (t.lb, 80), L4::Tcp(Tcp::Ack), b"");
        let (verdict, _) = dp.xdp(&tunnelled(t.entry_node, pod, &ack));
        assert_eq!(verdict, XDP_DROP, "{:?}", t.net.family);
        assert_eq!(dp.event("tunnel_loop"), 1);
        assert_eq!(dp.event("encapsulated"), 1, "not encapsulated again");
        // The flow's own packets still go where they went.
        let out = dp.xdp(&ack).1;
        assert_eq!(outer_of(&out, &ack).dst, t.net.remote_pod);
        // trace says the same.
        assert_traced_drop(&dp, &t, t.entry_node, pod, "tunnel_loop");
    }
}

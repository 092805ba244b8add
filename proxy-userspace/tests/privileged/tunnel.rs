//! IPIP in the data path, byte by byte through BPF_PROG_TEST_RUN: the entry node of a
//! `dsr-ipip` flow encapsulates the client's packet untouched towards the chosen
//! backend, and the backend's node decapsulates it and translates it for the very
//! backend the outer header names, keeping the client's address.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
};

use crate::support::{datapath::*, packets::*};
use ebpf_proxy::{
    model::{Endpoint, Frontend, FrontendKey, Listen, Protocol},
    sync::NodeSettings,
};

const LB: [u8; 4] = [198, 18, 100, 1];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 11];
const POD_1: [u8; 4] = [10, 244, 1, 11];
const POD_2: [u8; 4] = [10, 244, 1, 12];
const ENTRY_NODE: [u8; 4] = [198, 18, 2, 1];

fn dsr_frontend(endpoints: Vec<Endpoint>) -> Frontend {
    Frontend {
        service: "test/web".into(),
        external: true,
        endpoints,
        dsr: true,
        ..Default::default()
    }
}

fn tunnel_key() -> FrontendKey {
    FrontendKey {
        listen: Listen::TunnelAddress(Ipv4Addr::from(LB).into()),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

/// `inner` (an Ethernet frame) inside an outer IPv4 header from `src` to `dst`.
fn ipip(src: [u8; 4], dst: [u8; 4], inner: &[u8]) -> Vec<u8> {
    let len = (inner.len() - 14 + 20) as u16;
    let mut outer = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 4, 0, 0];
    outer[2..4].copy_from_slice(&len.to_be_bytes());
    outer.extend_from_slice(&src);
    outer.extend_from_slice(&dst);
    let check = internet_checksum(&outer);
    outer[10..12].copy_from_slice(&check.to_be_bytes());
    let mut frame = inner[..14].to_vec();
    frame.extend_from_slice(&outer);
    frame.extend_from_slice(&inner[14..]);
    frame
}

/// Checks an encapsulated frame against the packet it carries; returns the outer
/// (source, destination).
fn outer_of(frame: &[u8], inner: &[u8]) -> ([u8; 4], [u8; 4]) {
    assert_eq!(frame.len(), inner.len() + 20, "one outer header added");
    assert_eq!(frame[..14], inner[..14], "Ethernet header kept");
    let outer = &frame[14..34];
    assert_eq!(outer[0], 0x45, "IPv4 without options");
    assert_eq!(outer[9], 4, "protocol IPIP");
    assert_eq!(
        u16::from_be_bytes([outer[2], outer[3]]) as usize,
        inner.len() - 14 + 20,
        "outer length"
    );
    assert_eq!(
        outer[6] & 0x40,
        inner[20] & 0x40,
        "DF copied from the inner packet"
    );
    assert_eq!(internet_checksum(outer), 0, "outer header checksum");
    assert_eq!(frame[34..], inner[14..], "inner packet carried unchanged");
    (
        outer[12..16].try_into().expect("4 bytes"),
        outer[16..20].try_into().expect("4 bytes"),
    )
}

#[test]
fn the_entry_node_encapsulates_a_flow_to_a_remote_backend_unchanged() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![(
        tcp(LB, 80),
        dsr_frontend(vec![remote(REMOTE_POD, 8080)]),
    )]);
    for flags in [Tcp::Syn, Tcp::Ack, Tcp::Ack] {
        let packet = tcp_packet((CLIENT, 40000), (LB, 80), flags, b"hello");
        let (verdict, out) = dp.xdp(&packet);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(outer_of(&out, &packet), (NODE_IP.octets(), REMOTE_POD));
    }
    assert_eq!(dp.event("encapsulated"), 3);
    // Nothing waits for a reply here: one conntrack entry, no reply entry.
    assert_eq!(dp.tables().conntrack.keys().count(), 1);
}

#[test]
fn without_dsr_or_for_a_local_backend_nothing_is_encapsulated() {
    let mut dp = TestDatapath::new();
    let mut snat = dsr_frontend(vec![remote(REMOTE_POD, 8080)]);
    snat.dsr = false;
    dp.program_frontends(vec![
        (tcp(LB, 80), snat),
        (tcp(LB, 81), dsr_frontend(vec![local(POD_1, 8080)])),
    ]);
    let (_, out) = dp.xdp(&tcp_packet((CLIENT, 40000), (LB, 80), Tcp::Syn, b""));
    let seen = inspect(&out);
    assert_eq!(
        (seen.src.0, seen.dst),
        (NODE_IP.octets(), (REMOTE_POD, 8080)),
        "masqueraded"
    );
    let (_, out) = dp.xdp(&tcp_packet((CLIENT, 40001), (LB, 81), Tcp::Syn, b""));
    assert_eq!(inspect(&out).dst, (POD_1, 8080), "translated here");
    assert_eq!(dp.event("encapsulated"), 0);
}

#[test]
fn outer_sources_are_hashed_over_the_configured_range_per_flow() {
    let mut dp = TestDatapath::new();
    dp.settings(NodeSettings {
        tunnel_source: Some("198.18.255.0/28".parse().expect("range")),
        ..Default::default()
    });
    dp.program_frontends(vec![(
        tcp(LB, 80),
        dsr_frontend(vec![remote(REMOTE_POD, 8080)]),
    )]);
    let mut sources = BTreeSet::new();
    for port in 40000..40064 {
        let syn = tcp_packet((CLIENT, port), (LB, 80), Tcp::Syn, b"");
        let (src, _) = outer_of(&dp.xdp(&syn).1, &syn);
        assert_eq!(src[..3], [198, 18, 255], "{src:?} in the range");
        assert!(src[3] < 16, "{src:?} in the /28");
        let ack = tcp_packet((CLIENT, port), (LB, 80), Tcp::Ack, b"");
        assert_eq!(
            outer_of(&dp.xdp(&ack).1, &ack).0,
            src,
            "one source per flow"
        );
        sources.insert(src);
    }
    assert!(sources.len() >= 8, "64 flows over 16 sources: {sources:?}");
}

#[test]
fn the_backend_node_decapsulates_for_the_backend_the_outer_header_names() {
    let mut dp = TestDatapath::new();
    let endpoints = vec![local(POD_1, 8080), local(POD_2, 8080)];
    let mut tunnel = dsr_frontend(endpoints);
    tunnel.dsr = false;
    dp.program_frontends(vec![(tunnel_key(), tunnel)]);
    // Four flows named for POD_2, then two for POD_1: rr would alternate instead.
    for (port, backend) in [
        (40000, POD_2),
        (40001, POD_2),
        (40002, POD_2),
        (40003, POD_1),
        (40004, POD_1),
    ] {
        let inner = tcp_packet((CLIENT, port), (LB, 80), Tcp::Syn, b"data");
        let frame = ipip(ENTRY_NODE, backend, &inner);
        let (verdict, out) = dp.xdp(&frame);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out.len(), inner.len(), "outer header removed");
        assert_eq!(out[..14], inner[..14], "Ethernet header kept");
        let seen = inspect(&out);
        assert_eq!(
            seen.src,
            (CLIENT, port),
            "the client's address reaches the pod"
        );
        assert_eq!(seen.dst, (backend, 8080));
    }
    assert_eq!(dp.event("decapsulated"), 5);
    // Later packets of a flow follow its conntrack entry; the pod's reply leaves with
    // the service address, straight for the client.
    let ack = ipip(
        ENTRY_NODE,
        POD_2,
        &tcp_packet((CLIENT, 40000), (LB, 80), Tcp::Ack, b""),
    );
    assert_eq!(inspect(&dp.xdp(&ack).1).dst, (POD_2, 8080));
    let (verdict, reply) = dp.tc(&tcp_packet(
        (POD_2, 8080),
        (CLIENT, 40000),
        Tcp::SynAck,
        b"",
    ));
    assert_eq!(verdict, TC_ACT_OK);
    let seen = inspect(&reply);
    assert_eq!((seen.src, seen.dst), ((LB, 80), (CLIENT, 40000)));
}

#[test]
fn ipip_that_is_not_ours_passes_untouched() {
    let mut dp = TestDatapath::new();
    let mut tunnel = dsr_frontend(vec![local(POD_1, 8080)]);
    tunnel.dsr = false;
    dp.program_frontends(vec![(tunnel_key(), tunnel)]);
    for frame in [
        // Inner destination is no service.
        ipip(
            ENTRY_NODE,
            POD_1,
            &tcp_packet((CLIENT, 40000), ([198, 18, 100, 9], 80), Tcp::Syn, b""),
        ),
        // The outer destination is neither this node nor one of the service's pods.
        ipip(
            ENTRY_NODE,
            [10, 244, 9, 9],
            &tcp_packet((CLIENT, 40000), (LB, 80), Tcp::Syn, b""),
        ),
    ] {
        let (verdict, out) = dp.xdp(&frame);
        assert_eq!(verdict, XDP_PASS);
        assert_eq!(out, frame);
    }
    assert_eq!(dp.event("decapsulated"), 0);
}

/// Issue 14: IPIP was decapsulated for any service on a node address, and a tracked
/// flow's packets were taken from any wrapper.
#[test]
fn only_dsr_ipip_frontends_are_reached_through_a_tunnel() {
    let mut dp = TestDatapath::new();
    let mut tunnel = dsr_frontend(vec![local(POD_1, 8080)]);
    tunnel.dsr = false;
    dp.program_frontends(vec![
        (tunnel_key(), tunnel),
        (tcp(LB, 443), dsr_frontend(vec![local(POD_2, 8443)])),
    ]);
    // A plain (not tunnelled) flow to the other frontend, then a wrapped segment of
    // it and a wrapped new flow to it, addressed to the node.
    let plain = tcp_packet((CLIENT, 40000), (LB, 443), Tcp::Syn, b"");
    assert_eq!(inspect(&dp.xdp(&plain).1).dst, (POD_2, 8443));
    for inner in [
        tcp_packet((CLIENT, 40000), (LB, 443), Tcp::Ack, b"injected"),
        tcp_packet((CLIENT, 40001), (LB, 443), Tcp::Syn, b""),
    ] {
        let frame = ipip(ENTRY_NODE, NODE_IP.octets(), &inner);
        let (verdict, out) = dp.xdp(&frame);
        assert_eq!((verdict, out), (XDP_PASS, frame), "passed as it came");
    }
    assert_eq!(dp.event("decapsulated"), 0);
}

#[test]
fn with_trusted_sources_configured_only_they_may_tunnel() {
    let mut dp = TestDatapath::new();
    dp.settings(NodeSettings {
        tunnel_peers: Some(vec!["198.18.2.0/24".parse().expect("prefix")]),
        ..Default::default()
    });
    let mut tunnel = dsr_frontend(vec![local(POD_1, 8080)]);
    tunnel.dsr = false;
    dp.program_frontends(vec![(tunnel_key(), tunnel)]);
    let inner = tcp_packet((CLIENT, 40000), (LB, 80), Tcp::Syn, b"");
    let (verdict, out) = dp.xdp(&ipip(ENTRY_NODE, POD_1, &inner));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(inspect(&out).dst, (POD_1, 8080), "a trusted peer's flow");
    let (verdict, _) = dp.xdp(&ipip([203, 0, 113, 9], POD_1, &inner));
    assert_eq!(verdict, XDP_DROP, "an outsider's wrapper");
    assert_eq!(dp.event("tunnel_refused"), 1);
}

#[test]
fn a_tunnel_cannot_carry_a_flow_past_load_balancer_source_ranges() {
    let mut dp = TestDatapath::new();
    let mut tunnel = dsr_frontend(vec![local(POD_1, 8080)]);
    tunnel.dsr = false;
    tunnel.source_ranges = Some(vec!["198.18.0.0/24".parse().expect("prefix")]);
    dp.program_frontends(vec![(tunnel_key(), tunnel.clone())]);
    // CLIENT is admitted by the ranges, but the wrapper could come from anyone: with
    // no trusted peers configured, nobody can vouch for the inner source.
    let inner = tcp_packet((CLIENT, 40000), (LB, 80), Tcp::Syn, b"");
    let (verdict, _) = dp.xdp(&ipip([203, 0, 113, 9], POD_1, &inner));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(dp.event("tunnel_refused"), 1);
    // trace says the same.
    let explained = ebpf_proxy::trace::explain(
        &dp.tables(),
        &proxy_common::LoadSettings::DEFAULT,
        Protocol::Tcp,
        SocketAddr::from((CLIENT, 40000)),
        SocketAddr::from((LB, 80)),
        ebpf_proxy::trace::Origin::Tunnel {
            outer_src: [203, 0, 113, 9].into(),
            outer_dst: POD_1.into(),
        },
    )
    .expect("trace");
    assert!(
        explained
            .dropped
            .as_deref()
            .is_some_and(|why| why.contains("tunnel_refused")),
        "{explained:?}"
    );
    // A trusted entry node vouches for it (it applied the ranges itself).
    dp.settings(NodeSettings {
        tunnel_peers: Some(vec!["198.18.2.0/24".parse().expect("prefix")]),
        ..Default::default()
    });
    let (verdict, out) = dp.xdp(&ipip(ENTRY_NODE, POD_1, &inner));
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(inspect(&out).dst, (POD_1, 8080));
    // And the ranges still apply to what it carries.
    let outsider = tcp_packet(([203, 0, 113, 7], 40000), (LB, 80), Tcp::Syn, b"");
    let (verdict, _) = dp.xdp(&ipip(ENTRY_NODE, POD_1, &outsider));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(dp.event("source_denied"), 1);
}

//! Issue 13: related flows. A TFTP server answers a request from a new port of its
//! own; that answer matched no conntrack entry, so through a masquerading path (or
//! to a client that cannot route to pods) it arrived untranslated and the transfer
//! failed. A TFTP request through a frontend with the TFTP helper now records an
//! expectation that the server's first packet from any port meets, opening the
//! related flow with the request's translations. Here byte by byte through
//! BPF_PROG_TEST_RUN; `tftp` runs real transfers.

use std::net::SocketAddr;

use ebpf_proxy::model::{Frontend, FrontendKey, Helper, Listen, Protocol};

use crate::support::{datapath::*, packets::*};

const VIP: [u8; 4] = [10, 96, 0, 69];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const POD_A: [u8; 4] = [10, 244, 1, 2];
const POD_B: [u8; 4] = [10, 244, 1, 3];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 2];

/// A TFTP read request for `boot.img` (RFC 1350: opcode 1, file name, mode).
const READ_REQUEST: &[u8] = b"\x00\x01boot.img\x00octet\x00";
/// The first block of the answer, and the client's acknowledgement of it.
const DATA_1: &[u8] = b"\x00\x03\x00\x01first block";
const ACK_1: &[u8] = b"\x00\x04\x00\x01";

fn tftp_frontend(
    key: FrontendKey,
    endpoint: ebpf_proxy::model::Endpoint,
    helper: Helper,
) -> (FrontendKey, Frontend) {
    (
        key,
        Frontend {
            service: "test/tftp".into(),
            external: matches!(key.listen, Listen::NodePort(_)),
            endpoints: vec![endpoint],
            helper,
            ..Default::default()
        },
    )
}

/// The UDP payload of an Ethernet/IPv4 (20-byte header)/UDP frame.
fn payload(frame: &[u8]) -> &[u8] {
    &frame[14 + 20 + 8..]
}

#[test]
fn a_tftp_request_through_a_masqueraded_node_port_lets_the_server_answer_from_a_new_port() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![tftp_frontend(
        node_port(30069, Protocol::Udp),
        remote(REMOTE_POD, 69),
        Helper::Tftp,
    )]);
    let node = NODE_IP.octets();
    let (_, out) = dp.xdp(&udp_packet((CLIENT, 40000), (node, 30069), READ_REQUEST));
    let request = inspect(&out);
    assert_eq!(request.dst, (REMOTE_POD, 69));
    assert_eq!(request.src.0, node, "masqueraded to the node address");
    assert_eq!(dp.event("expected"), 1);

    // trace predicts what the server's first packet from a new port becomes.
    let explained = ebpf_proxy::trace::explain(
        &dp.tables(),
        &proxy_common::LoadSettings::DEFAULT,
        Protocol::Udp,
        SocketAddr::from((REMOTE_POD, 50123)),
        SocketAddr::from(request.src),
        ebpf_proxy::trace::Origin::External,
    )
    .expect("trace");
    assert_eq!(
        explained.translated,
        Some((
            SocketAddr::from((node, 50123)),
            SocketAddr::from((CLIENT, 40000))
        )),
        "{:?}",
        explained.steps
    );
    assert!(explained.steps.iter().any(|s| s.contains("related flow")));

    // The server's first block, from its new port, reaches the client from the
    // NodePort's address with the server's new port, checksums right.
    let data = udp_packet((REMOTE_POD, 50123), request.src, DATA_1);
    let (verdict, out) = dp.xdp(&data);
    assert_eq!(verdict, XDP_PASS);
    let answer = inspect(&out);
    assert_eq!(answer.src, (node, 50123));
    assert_eq!(answer.dst, (CLIENT, 40000));
    assert_eq!(payload(&out), DATA_1);
    assert_eq!(dp.event("related"), 1);

    // The client's acknowledgement to that port goes back to the server's new port,
    // from the request's masquerade port.
    let (_, out) = dp.xdp(&udp_packet((CLIENT, 40000), (node, 50123), ACK_1));
    let ack = inspect(&out);
    assert_eq!(ack.dst, (REMOTE_POD, 50123));
    assert_eq!(ack.src, request.src);
    assert_eq!(payload(&out), ACK_1);

    // The expectation was used up: another new port of the server is not let in.
    let stray = udp_packet((REMOTE_POD, 50124), request.src, DATA_1);
    assert_eq!(dp.xdp(&stray).1, stray);
    assert_eq!(dp.event("related"), 1);
    // The related flow is part of the request's connection, not another one.
    let listing = ebpf_proxy::listing::read(&dp.pin_dir).expect("list");
    assert_eq!(listing.services[0].backends[0].active, 1);
    let related = |dp: &TestDatapath| {
        ebpf_proxy::conntrack::flows(&dp.tables())
            .filter_map(Result::ok)
            .filter(|f| f.related)
            .count()
    };
    assert_eq!(related(&dp), 1, "conntrack list shows the related flow");

    // The backend leaves: its UDP flows are flushed, the transfer from its new port
    // with them.
    dp.program_frontends(vec![tftp_frontend(
        node_port(30069, Protocol::Udp),
        remote([10, 244, 2, 3], 69),
        Helper::Tftp,
    )]);
    assert_eq!(related(&dp), 0);
    assert_eq!(dp.tables().conntrack.keys().count(), 0);
}

#[test]
fn an_expectation_is_met_only_where_the_backends_packets_arrive_and_while_its_request_lives() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![tftp_frontend(
        udp(VIP, 69),
        local(POD_A, 69),
        Helper::Tftp,
    )]);
    dp.tc(&udp_packet((POD_B, 40000), (VIP, 69), READ_REQUEST));
    assert_eq!(dp.event("expected"), 1);
    // The backend is on this node: a packet with its address from an uplink is
    // spoofed, and dropped; the expectation stays for the real one.
    let spoofed = udp_packet((POD_A, 50000), (POD_B, 40000), DATA_1);
    let explained = ebpf_proxy::trace::explain(
        &dp.tables(),
        &proxy_common::LoadSettings::DEFAULT,
        Protocol::Udp,
        SocketAddr::from((POD_A, 50000)),
        SocketAddr::from((POD_B, 40000)),
        ebpf_proxy::trace::Origin::External,
    )
    .expect("trace");
    assert!(
        explained
            .dropped
            .as_deref()
            .is_some_and(|d| d.contains("spoofed")),
        "{:?}",
        explained.steps
    );
    assert_eq!(dp.xdp(&spoofed).0, XDP_DROP);
    assert_eq!(dp.event("related"), 0);
    // Its request's flow gone (flushed, or expired and collected), the expectation is
    // not met: netfilter removes a connection's expectations with it.
    dp.flush_conntrack();
    let (verdict, out) = dp.tc(&spoofed);
    assert_eq!((verdict, out), (TC_ACT_OK, spoofed));
    assert_eq!(dp.event("related"), 0);
    assert_eq!(dp.tables().conntrack.keys().count(), 0);
}

#[test]
fn one_flows_expectation_is_never_displaced_by_anothers() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![
        tftp_frontend(
            node_port(30069, Protocol::Udp),
            remote(REMOTE_POD, 69),
            Helper::Tftp,
        ),
        tftp_frontend(
            node_port(30070, Protocol::Udp),
            remote(REMOTE_POD, 6969),
            Helper::Tftp,
        ),
    ]);
    let node = NODE_IP.octets();
    let other_client = [198, 18, 0, 3];
    // Two clients with the same port, masqueraded to the same node port towards two
    // ports of one pod: both servers would answer from a new port to that node port.
    let (_, out) = dp.xdp(&udp_packet((CLIENT, 40000), (node, 30069), READ_REQUEST));
    let first = inspect(&out);
    let (_, out) = dp.xdp(&udp_packet(
        (other_client, 40000),
        (node, 30070),
        READ_REQUEST,
    ));
    let second = inspect(&out);
    assert_eq!(first.src, second.src, "one masquerade port for both");
    assert_eq!((dp.event("expected"), dp.event("related_clash")), (1, 1));
    // The answer goes to the client whose request was expected first, not the other.
    let (_, out) = dp.xdp(&udp_packet((REMOTE_POD, 50123), first.src, DATA_1));
    assert_eq!(inspect(&out).dst, (CLIENT, 40000));
    // Met, the expectation is used up: the second client's request, retransmitted,
    // now records its own.
    dp.xdp(&udp_packet(
        (other_client, 40000),
        (node, 30070),
        READ_REQUEST,
    ));
    assert_eq!((dp.event("expected"), dp.event("related_clash")), (2, 1));
    let (_, out) = dp.xdp(&udp_packet((REMOTE_POD, 50124), first.src, DATA_1));
    assert_eq!(inspect(&out).dst, (other_client, 40000));
}

#[test]
fn only_a_request_announces_and_only_the_backend_meets_the_expectation() {
    let mut dp = TestDatapath::new();
    let other_vip = [10, 96, 0, 70];
    dp.program_frontends(vec![
        tftp_frontend(udp(VIP, 69), local(POD_A, 69), Helper::Tftp),
        tftp_frontend(udp(other_vip, 69), local(POD_A, 69), Helper::None),
    ]);
    // A data packet to the service is no request: nothing is expected.
    let (_, out) = dp.tc(&udp_packet((POD_B, 40000), (VIP, 69), DATA_1));
    assert_eq!(inspect(&out).dst, (POD_A, 69));
    // Nor is a request through a frontend without the helper.
    dp.tc(&udp_packet((POD_B, 40001), (other_vip, 69), READ_REQUEST));
    assert_eq!(dp.event("expected"), 0);
    let unexpected = udp_packet((POD_A, 50001), (POD_B, 40001), DATA_1);
    assert_eq!(dp.tc(&unexpected).1, unexpected);

    // A request through the helper's frontend (the flow exists already: a
    // retransmitted or second request announces too).
    let (verdict, _) = dp.tc(&udp_packet((POD_B, 40000), (VIP, 69), READ_REQUEST));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(dp.event("expected"), 1);
    // Another pod, or another protocol, from the backend's address meets nothing.
    let stranger = udp_packet(([10, 244, 1, 9], 50000), (POD_B, 40000), DATA_1);
    assert_eq!(dp.tc(&stranger).1, stranger);
    let tcp = tcp_packet((POD_A, 50000), (POD_B, 40000), Tcp::Syn, b"");
    assert_eq!(dp.tc(&tcp).1, tcp);
    assert_eq!(dp.event("related"), 0);
    // The backend from a new port: its answer comes from the service address (the
    // client pod talked to the ClusterIP), with the new port.
    let (_, out) = dp.tc(&udp_packet((POD_A, 50000), (POD_B, 40000), DATA_1));
    let answer = inspect(&out);
    assert_eq!((answer.src, answer.dst), ((VIP, 50000), (POD_B, 40000)));
    assert_eq!(dp.event("related"), 1);
}

/// A datagram whose UDP length ends with its header announces nothing, whatever
/// follows in the frame's padding past the IP length or in the IP packet past the
/// UDP length (a request's opcode, here): the receiver's stack trims both away.
#[test]
fn a_request_opcode_in_the_frame_s_padding_announces_nothing() {
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![tftp_frontend(
        udp(VIP, 69),
        local(POD_A, 69),
        Helper::Tftp,
    )]);
    let mut padded = udp_packet((POD_B, 40000), (VIP, 69), b"");
    padded.extend_from_slice(READ_REQUEST);
    let (_, out) = dp.tc(&padded);
    assert_eq!(inspect(&out).dst, (POD_A, 69), "translated");
    // The request inside the IP packet, but past a UDP length of 8.
    let mut short = udp_packet((POD_B, 40000), (VIP, 69), READ_REQUEST);
    short[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&8u16.to_be_bytes());
    dp.tc(&short);
    assert_eq!(dp.event("expected"), 0);
    // The same request inside the datagram announces.
    dp.tc(&udp_packet((POD_B, 40001), (VIP, 69), READ_REQUEST));
    assert_eq!(dp.event("expected"), 1);
}

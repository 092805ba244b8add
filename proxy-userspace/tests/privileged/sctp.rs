//! Issue 13: SCTP services. The data path translates SCTP like TCP and UDP, with
//! SCTP's CRC32c updated for every port it rewrites (`proxy_common::sctp`) and the
//! association's handshake and teardown followed by conntrack. Byte by byte through
//! BPF_PROG_TEST_RUN, every checksum verified by the `crc32c` crate; real
//! associations run in the QEMU guest (`sctp_guest`), this kernel having no SCTP.

use std::net::SocketAddr;

use ebpf_proxy::model::{FrontendKey, Protocol};
use proxy_common::{
    sctp::{
        CHUNK_ABORT, CHUNK_COOKIE_ACK, CHUNK_COOKIE_ECHO, CHUNK_INIT, CHUNK_INIT_ACK,
        CHUNK_SHUTDOWN, CHUNK_SHUTDOWN_ACK,
    },
    CtEntry, CT_CLOSING, CT_ESTABLISHED, CT_SYN_RECV, CT_SYN_SENT, PROTO_SCTP,
};

use crate::support::{datapath::*, packets::*};

const VIP: [u8; 4] = [10, 96, 0, 132];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const POD_CLIENT: [u8; 4] = [10, 244, 1, 9];
const POD: [u8; 4] = [10, 244, 1, 2];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 2];
/// Diameter's port, as telco services use it; the backend listens elsewhere, so that
/// every packet's port (and so its CRC32c) is rewritten.
const DIAMETER: u16 = 3868;
const BACKEND_PORT: u16 = 3869;
const DATA: u8 = 0;
const SACK: u8 = 3;

/// A packet's (source, destination).
type Tuple = (([u8; 4], u16), ([u8; 4], u16));

fn sctp(addr: [u8; 4], port: u16) -> FrontendKey {
    FrontendKey {
        protocol: Protocol::Sctp,
        ..tcp(addr, port)
    }
}

/// The association's original conntrack entry, as the client sent it.
fn entry(dp: &TestDatapath, client: ([u8; 4], u16), frontend: ([u8; 4], u16)) -> CtEntry {
    let key = proxy_common::CtKey {
        proto: PROTO_SCTP,
        ..ct_key(client, frontend)
    };
    dp.tables().conntrack.get(&key, 0).expect("tracked")
}

fn active_connections(dp: &TestDatapath) -> u64 {
    let listing = ebpf_proxy::listing::read(&dp.pin_dir).expect("list");
    listing.services[0].backends[0].active
}

/// Everything after the common header's checksum (the chunks) is left as it was.
fn assert_chunks_kept(sent: &[u8], out: &[u8]) {
    assert_eq!(sent.len(), out.len());
    assert_eq!(sent[34 + 12..], out[34 + 12..]);
}

/// A pod's association with a ClusterIP whose backend listens on another port:
/// INIT, INIT-ACK, COOKIE-ECHO, COOKIE-ACK, DATA of every size class, SHUTDOWN both
/// ways, each translated with a valid CRC32c, and conntrack following the handshake:
/// half-open and not counted until the backend's COOKIE-ACK, closing after the
/// SHUTDOWN-ACK.
#[test]
fn a_pods_association_with_a_cluster_ip_is_translated_with_valid_checksums() {
    let mut dp = TestDatapath::new();
    dp.program(&[(sctp(VIP, DIAMETER), vec![local(POD, BACKEND_PORT)])]);
    let client = (POD_CLIENT, 40000);
    let frontend = (VIP, DIAMETER);
    let backend = (POD, BACKEND_PORT);
    // From the pod (its interface's tc program) to the service, and back: each
    // packet sent as (source, destination) must leave as the other pair.
    let through = |dp: &mut TestDatapath, sent: Tuple, leaves: Tuple, chunk: u8, value: &[u8]| {
        let packet = sctp_packet(sent.0, sent.1, 0x1234_5678, chunk, value);
        let (verdict, out) = dp.tc(&packet);
        assert_ne!(verdict, TC_ACT_SHOT, "chunk {chunk}");
        let seen = inspect_sctp(&out);
        assert_eq!((seen.src, seen.dst), leaves, "chunk {chunk}");
        assert_chunks_kept(&packet, &out);
    };
    let send = |dp: &mut TestDatapath, chunk, value: &[u8]| {
        through(dp, (client, frontend), (client, backend), chunk, value)
    };
    let answer = |dp: &mut TestDatapath, chunk, value: &[u8]| {
        through(dp, (backend, client), (frontend, client), chunk, value)
    };
    send(&mut dp, CHUNK_INIT, &[0x11; 16]);
    assert_eq!(entry(&dp, client, frontend).state, CT_SYN_SENT);
    answer(&mut dp, CHUNK_INIT_ACK, &[0x22; 300]);
    assert_eq!(entry(&dp, client, frontend).state, CT_SYN_RECV);
    assert_eq!(active_connections(&dp), 0, "half-open is not active");
    send(&mut dp, CHUNK_COOKIE_ECHO, &[0x33; 280]);
    assert_eq!(entry(&dp, client, frontend).state, CT_SYN_RECV);
    assert_eq!(
        active_connections(&dp),
        0,
        "only the backend's COOKIE-ACK tells"
    );
    answer(&mut dp, CHUNK_COOKIE_ACK, &[]);
    assert_eq!(entry(&dp, client, frontend).state, CT_ESTABLISHED);
    assert_eq!(active_connections(&dp), 1);
    // DATA of every size up to a full 1500-byte packet, and across the 256-byte
    // boundaries the checksum update's tables split lengths at.
    for len in [0, 1, 200, 236, 237, 240, 500, 1000, 1448] {
        let value: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
        send(&mut dp, DATA, &value);
        answer(&mut dp, SACK, &value);
    }
    send(&mut dp, CHUNK_SHUTDOWN, &[0; 4]);
    assert_eq!(entry(&dp, client, frontend).state, CT_ESTABLISHED);
    answer(&mut dp, CHUNK_SHUTDOWN_ACK, &[]);
    assert_eq!(entry(&dp, client, frontend).state, CT_CLOSING);
}

/// An outside client's association through a NodePort to a backend on another
/// node: masqueraded (the source rewritten too, and the answer's destination), every
/// CRC32c valid; an ABORT closes it.
#[test]
fn an_association_through_a_masqueraded_node_port_is_translated_both_ways() {
    let mut dp = TestDatapath::new();
    dp.program(&[(
        node_port(30132, Protocol::Sctp),
        vec![remote(REMOTE_POD, BACKEND_PORT)],
    )]);
    let node = NODE_IP.octets();
    let client = (CLIENT, 40000);
    let frontend = (node, 30132);
    // trace predicts the translation (no flow yet: the one the INIT will open).
    let explained = ebpf_proxy::trace::explain(
        &dp.tables(),
        &proxy_common::LoadSettings::DEFAULT,
        Protocol::Sctp,
        SocketAddr::from(client),
        SocketAddr::from(frontend),
        ebpf_proxy::trace::Origin::External,
    )
    .expect("trace");
    let init = sctp_packet(client, frontend, 0, CHUNK_INIT, &[0x11; 16]);
    let (verdict, out) = dp.xdp(&init);
    assert_eq!(verdict, XDP_PASS);
    let forwarded = inspect_sctp(&out);
    assert_eq!(forwarded.dst, (REMOTE_POD, BACKEND_PORT));
    assert_eq!(forwarded.src.0, node, "masqueraded");
    assert_chunks_kept(&init, &out);
    let (traced_src, traced_dst) = explained.translated.expect("trace translates");
    assert_eq!(
        traced_dst,
        SocketAddr::from(forwarded.dst),
        "{:?}",
        explained.steps
    );
    assert_eq!(traced_src.ip(), SocketAddr::from(forwarded.src).ip());

    // The backend's INIT-ACK comes back to the masquerade address, in on the uplink.
    let init_ack = sctp_packet(forwarded.dst, forwarded.src, 7, CHUNK_INIT_ACK, &[0x22; 64]);
    let (verdict, out) = dp.xdp(&init_ack);
    assert_eq!(verdict, XDP_PASS);
    let answered = inspect_sctp(&out);
    assert_eq!((answered.src, answered.dst), (frontend, client));
    assert_chunks_kept(&init_ack, &out);

    let cookie = sctp_packet(client, frontend, 7, CHUNK_COOKIE_ECHO, &[0x33; 64]);
    let (_, out) = dp.xdp(&cookie);
    assert_eq!(inspect_sctp(&out), forwarded);
    let cookie_ack = sctp_packet(forwarded.dst, forwarded.src, 7, CHUNK_COOKIE_ACK, &[]);
    let (_, out) = dp.xdp(&cookie_ack);
    let acked = inspect_sctp(&out);
    assert_eq!((acked.src, acked.dst), (frontend, client));
    assert_eq!(entry(&dp, client, frontend).state, CT_ESTABLISHED);

    let abort = sctp_packet(forwarded.dst, forwarded.src, 7, CHUNK_ABORT, &[]);
    let (_, out) = dp.xdp(&abort);
    let aborted = inspect_sctp(&out);
    assert_eq!((aborted.src, aborted.dst), (frontend, client));
    assert_eq!(entry(&dp, client, frontend).state, CT_CLOSING);
}

/// A packet corrupted on its way keeps a wrong checksum through the translation (the
/// receiver must still drop it), wrong by exactly what the corruption changed: the
/// checksum is updated, never recomputed.
#[test]
fn a_corrupted_packet_is_not_repaired() {
    let mut dp = TestDatapath::new();
    dp.program(&[(sctp(VIP, DIAMETER), vec![local(POD, BACKEND_PORT)])]);
    let mut init = sctp_packet(
        (POD_CLIENT, 40000),
        (VIP, DIAMETER),
        0,
        CHUNK_INIT,
        &[0x11; 16],
    );
    let last = init.len() - 1;
    init[last] ^= 0x40;
    let error = sctp_checksum_error(&init[34..]);
    assert_ne!(error, 0);
    let (_, out) = dp.tc(&init);
    assert_eq!(
        &out[34 + 2..34 + 4],
        &BACKEND_PORT.to_be_bytes(),
        "translated"
    );
    assert_eq!(sctp_checksum_error(&out[34..]), error);
}

/// A pod's own SCTP packet whose checksum its veth computes later
/// (CHECKSUM_PARTIAL: the field is still zero) keeps a zero field, both ways: the
/// kernel computes the CRC32c over the packet as it finds it, the field included, so
/// a correction written into the zero would make it wrong.
#[test]
fn a_checksum_left_to_the_device_is_left_alone() {
    let mut dp = TestDatapath::new();
    dp.program(&[(sctp(VIP, DIAMETER), vec![local(POD, BACKEND_PORT)])]);
    let unsummed = |mut packet: Vec<u8>| {
        packet[34 + 8..34 + 12].fill(0);
        packet
    };
    let init = unsummed(sctp_packet(
        (POD_CLIENT, 40000),
        (VIP, DIAMETER),
        0,
        CHUNK_INIT,
        &[1; 16],
    ));
    let (_, out) = dp.tc(&init);
    assert_eq!(
        &out[34 + 2..34 + 4],
        &BACKEND_PORT.to_be_bytes(),
        "translated"
    );
    assert_eq!(&out[34 + 8..34 + 12], &[0; 4]);
    let init_ack = unsummed(sctp_packet(
        (POD, BACKEND_PORT),
        (POD_CLIENT, 40000),
        1,
        CHUNK_INIT_ACK,
        &[2; 16],
    ));
    let (_, out) = dp.tc(&init_ack);
    assert_eq!(
        &out[34..34 + 2],
        &DIAMETER.to_be_bytes(),
        "reverse-translated"
    );
    assert_eq!(&out[34 + 8..34 + 12], &[0; 4]);
}

/// What opens an association and what does not: an ABORT of an unknown association
/// is dropped (nothing to abort), a DATA chunk of one whose entry was lost is picked
/// up mid-stream (half-open until the backend answers, as for TCP), an SCTP packet
/// to a port no frontend has is refused like TCP's, and an IP-fragmented SCTP packet
/// (whose checksum update needs the whole packet) is refused at a service address.
#[test]
fn only_packets_an_association_can_begin_with_open_one() {
    let mut dp = TestDatapath::new();
    dp.program(&[(sctp(VIP, DIAMETER), vec![local(POD, BACKEND_PORT)])]);
    let abort = sctp_packet((CLIENT, 40001), (VIP, DIAMETER), 1, CHUNK_ABORT, &[]);
    assert_eq!(dp.xdp(&abort).0, XDP_DROP);

    let data = sctp_packet((CLIENT, 40002), (VIP, DIAMETER), 1, DATA, &[0x44; 100]);
    let (verdict, out) = dp.xdp(&data);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(inspect_sctp(&out).dst, (POD, BACKEND_PORT));
    assert_eq!(
        entry(&dp, (CLIENT, 40002), (VIP, DIAMETER)).state,
        CT_SYN_SENT
    );
    assert_eq!(dp.event("ct_midflow_miss"), 1);

    let refused_before = dp.event("refused");
    let other_port = sctp_packet((CLIENT, 40003), (VIP, 3869), 0, CHUNK_INIT, &[0x11; 16]);
    let (verdict, out) = dp.xdp(&other_port);
    assert_eq!(verdict, XDP_PASS);
    assert_ne!(out, other_port, "answered with port unreachable");
    assert_eq!(out[14 + 9], 1, "ICMP");
    assert_eq!(dp.event("refused"), refused_before + 1);

    let whole = sctp_packet((CLIENT, 40004), (VIP, DIAMETER), 0, CHUNK_INIT, &[0x11; 96]);
    let (first, _) = fragments(&whole, 48, 77);
    let (verdict, out) = dp.xdp(&first);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(out[14 + 9], 1, "ICMP");
    assert_eq!(dp.event("refused"), refused_before + 2);
    assert!(dp
        .tables()
        .conntrack
        .get(
            &proxy_common::CtKey {
                proto: PROTO_SCTP,
                ..ct_key((CLIENT, 40004), (VIP, DIAMETER))
            },
            0
        )
        .is_err());
}

/// A backend that leaves takes its associations' entries with it (as a UDP
/// backend's flows): a peer between fixed ports (Diameter's 3868 to 3868) starts its
/// next association with an INIT on the same tuple, which the stale established
/// entry, refreshed by every retry, would have held on the gone backend.
#[test]
fn a_departing_backend_takes_its_associations_and_the_next_init_is_rescheduled() {
    let mut dp = TestDatapath::new();
    let other = [10, 244, 1, 3];
    dp.program(&[(sctp(VIP, DIAMETER), vec![local(POD, BACKEND_PORT)])]);
    let client = (CLIENT, DIAMETER);
    let frontend = (VIP, DIAMETER);
    let init = sctp_packet(client, frontend, 0, CHUNK_INIT, &[0x11; 16]);
    assert_eq!(inspect_sctp(&dp.xdp(&init).1).dst, (POD, BACKEND_PORT));
    let backend = (POD, BACKEND_PORT);
    for chunk in [CHUNK_INIT_ACK, CHUNK_COOKIE_ACK] {
        let _ = dp.tc(&sctp_packet(backend, client, 7, chunk, &[0x22; 16]));
    }
    let _ = dp.xdp(&sctp_packet(
        client,
        frontend,
        7,
        CHUNK_COOKIE_ECHO,
        &[0x33; 16],
    ));
    assert_eq!(entry(&dp, client, frontend).state, CT_ESTABLISHED);

    dp.program(&[(sctp(VIP, DIAMETER), vec![local(other, BACKEND_PORT)])]);
    assert!(dp.tables().conntrack.keys().next().is_none(), "flushed");
    assert_eq!(inspect_sctp(&dp.xdp(&init).1).dst, (other, BACKEND_PORT));
}

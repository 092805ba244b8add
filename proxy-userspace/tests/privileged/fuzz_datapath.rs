//! Fuzzing the data path: random and mutated packets through the real programs
//! (BPF_PROG_TEST_RUN). Set PROPTEST_CASES for a longer run (CI: the default below).
//!
//! Properties, for XDP and tc alike: every run succeeds; the packet keeps its length;
//! a packet is either untouched or a valid IPv4 TCP/UDP packet whose checksums verify
//! (inputs are given correct checksums first, so a broken one is ours); and conntrack
//! holds only entries for well-formed packets to a service (no pollution by garbage).

use crate::support::{datapath::*, packets::*};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use proptest::prelude::*;

const VIP: [u8; 4] = [10, 96, 0, 10];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const POD: [u8; 4] = [10, 244, 1, 2];

/// Valid packets the mutations start from: service traffic, replies, other traffic.
fn corpus() -> Vec<Vec<u8>> {
    vec![
        tcp_packet((CLIENT, 40000), (VIP, 80), Tcp::Syn, b""),
        tcp_packet(
            (CLIENT, 40001),
            (VIP, 80),
            Tcp::Ack,
            b"GET / HTTP/1.1\r\n\r\n",
        ),
        tcp_packet((CLIENT, 40002), (VIP, 80), Tcp::Fin, b""),
        tcp_packet((POD, 8080), (CLIENT, 40000), Tcp::SynAck, b""),
        udp_packet((CLIENT, 5000), (VIP, 53), b"query"),
        udp_packet((CLIENT, 5001), (NODE_IP.octets(), 30053), b"query"),
        tcp_packet((CLIENT, 40003), ([198, 18, 0, 9], 22), Tcp::Syn, b""),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Truncate(usize),
    Set(usize, u8),
    Ihl(u8),
    Fragment(u16),
    TotalLength(u16),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (0usize..80).prop_map(Mutation::Truncate),
        ((0usize..80), any::<u8>()).prop_map(|(at, v)| Mutation::Set(at, v)),
        (0u8..16).prop_map(Mutation::Ihl),
        any::<u16>().prop_map(Mutation::Fragment),
        any::<u16>().prop_map(Mutation::TotalLength),
    ]
}

fn mutate(mut packet: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        match *m {
            Mutation::Truncate(len) => packet.truncate(len.max(14)),
            Mutation::Set(at, v) if at < packet.len() => packet[at] = v,
            Mutation::Ihl(ihl) if packet.len() > 14 => packet[14] = (packet[14] & 0xf0) | ihl,
            Mutation::Fragment(f) if packet.len() > 21 => {
                packet[20..22].copy_from_slice(&f.to_be_bytes())
            }
            Mutation::TotalLength(l) if packet.len() > 17 => {
                packet[16..18].copy_from_slice(&l.to_be_bytes())
            }
            _ => {}
        }
    }
    packet
}

/// Gives a parseable IPv4 TCP/UDP packet correct checksums, so that the property
/// "translated packets have valid checksums" tests our incremental updates.
fn fix_checksums(packet: &mut [u8]) {
    let Ok(sliced) = SlicedPacket::from_ethernet(packet) else {
        return;
    };
    let Some(NetSlice::Ipv4(ip)) = &sliced.net else {
        return;
    };
    let header = ip.header().to_header();
    let ihl = usize::from(ip.header().ihl()) * 4;
    let l4 = 14 + ihl;
    let transport_checksum = match &sliced.transport {
        Some(TransportSlice::Tcp(tcp)) => tcp
            .calc_checksum_ipv4(header.source, header.destination)
            .ok()
            .map(|c| (16, c)),
        Some(TransportSlice::Udp(udp)) => udp
            .to_header()
            .calc_checksum_ipv4_raw(header.source, header.destination, udp.payload())
            .ok()
            .map(|c| (6, c)),
        _ => None,
    };
    let ip_checksum = header.calc_header_checksum();
    packet[24..26].copy_from_slice(&ip_checksum.to_be_bytes());
    if let Some((offset, checksum)) = transport_checksum {
        if l4 + offset + 2 <= packet.len() {
            packet[l4 + offset..l4 + offset + 2].copy_from_slice(&checksum.to_be_bytes());
        }
    }
}

/// The hook a packet went through, and how it answers a refusal (a mutated port or
/// protocol of a service address is refused).
#[derive(Clone, Copy)]
enum Hook {
    /// Passed to the kernel, quoting the IP header and 8 bytes.
    Xdp,
    /// Redirected back to the pod, quoting 64 bytes (zero-padded).
    Tc,
}

/// Whether `output` is the refusal of `input`: ICMP port unreachable quoting it,
/// every checksum valid.
fn is_refusal(hook: Hook, input: &[u8], verdict: u32, output: &[u8]) -> bool {
    let (expected_verdict, quoted) = match hook {
        Hook::Xdp => (XDP_PASS, 28),
        Hook::Tc => (TC_ACT_REDIRECT, 64),
    };
    let mut quote = input.get(14..).unwrap_or_default().to_vec();
    quote.resize(quoted, 0);
    verdict == expected_verdict
        && output.len() == 42 + quoted
        && output[23] == 1
        && (output[34], output[35]) == (3, 3)
        && internet_checksum(&output[14..34]) == 0
        && internet_checksum(&output[34..]) == 0
        && output[42..] == quote[..]
}

/// The fragment offset of an IPv4 frame (0: a whole packet or a first fragment).
fn fragment_offset(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[20], frame[21]]) & 0x1fff
}

/// An IPv4 frame that is a fragment: more fragments follow, or an offset.
fn is_fragment(frame: &[u8]) -> bool {
    frame.len() >= 34
        && frame[12..14] == [0x08, 0x00]
        && (frame[20] & 0x20 != 0 || fragment_offset(frame) != 0)
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
    prop_assert!(verdict <= 3, "unexpected verdict {verdict}");
    prop_assert_eq!(output.len(), input.len(), "length changed");
    if output != input && is_fragment(input) {
        // A fragment of a tracked flow: its addresses change, its IP checksum stays
        // as valid as it came (the generator cannot always make it valid: etherparse
        // drops the reserved flag bit), and a later fragment's bytes beyond the IP
        // header are untouched (it has no ports). A first fragment's L4 checksum
        // covers the whole datagram: not checkable from one fragment.
        let ip_end = 14 + usize::from(input[14] & 0x0f) * 4;
        prop_assert!(
            ip_end <= output.len(),
            "a header past the frame was rewritten"
        );
        prop_assert_eq!(
            internet_checksum(&output[14..ip_end]) == 0,
            internet_checksum(&input[14..ip_end]) == 0,
            "IP checksum"
        );
        if fragment_offset(input) != 0 {
            prop_assert_eq!(&output[ip_end..], &input[ip_end..], "payload touched");
        }
    } else if output != input {
        // `inspect` panics on an invalid checksum or an unparseable packet.
        let result = std::panic::catch_unwind(|| inspect(output));
        prop_assert!(
            result.is_ok(),
            "a rewritten packet is broken: {:02x?}",
            output
        );
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(3000)
}

#[test]
fn random_and_mutated_packets_pass_cleanly_or_are_translated_correctly() {
    let mut dp = TestDatapath::new();
    dp.program(&[
        (
            tcp(VIP, 80),
            vec![local(POD, 8080), remote([10, 244, 2, 2], 8080)],
        ),
        (udp(VIP, 53), vec![local(POD, 5353)]),
        (
            node_port(30053, ebpf_proxy::model::Protocol::Udp),
            vec![remote([10, 244, 2, 2], 5353)],
        ),
    ]);
    let corpus = corpus();
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let dp = std::cell::RefCell::new(dp);
    proptest!(config, |(
        seed in 0..corpus.len(),
        mutations in prop::collection::vec(mutation(), 0..4),
        random in prop::collection::vec(any::<u8>(), 14..120),
        use_random in any::<bool>(),
    )| {
        let mut input = if use_random { random.clone() } else { mutate(corpus[seed].clone(), &mutations) };
        fix_checksums(&mut input);
        let mut dp = dp.borrow_mut();
        // What the kernel's test harness refuses before the program runs (EINVAL:
        // the skb harness takes no IPv4 frame shorter than an IPv4 header, and some
        // other generated frames) tells nothing about the programs.
        if let Ok((verdict, output)) = dp.try_xdp(&input) {
            check_output(Hook::Xdp, &input, verdict, &output)?;
        }
        if let Ok((verdict, output)) = dp.try_tc(&input) {
            check_output(Hook::Tc, &input, verdict, &output)?;
        }
    });
    // No garbage in conntrack: every original entry is for a programmed frontend.
    let dp = dp.into_inner();
    let tables = dp.tables();
    for entry in tables.conntrack.iter() {
        let (key, value) = entry.expect("read");
        if value.flags & proxy_common::CT_F_REPLY != 0 {
            continue;
        }
        let dst = key.dst.v4_octets();
        let to_service = (dst == VIP && [80u16, 53].contains(&u16::from_be(key.dport)))
            || (dst == NODE_IP.octets() && u16::from_be(key.dport) == 30053);
        assert!(
            to_service,
            "conntrack entry for a non-service tuple: {key:?}"
        );
        assert!(matches!(key.proto, 6 | 17), "{key:?}");
    }
}

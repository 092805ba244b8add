//! `trace` and the kernel decide with the same code (`proxy_common::decide`): over
//! many random states (scheduler, backends on this node and others, weights including
//! 0, affinity, flows already open), the backend and the translation `trace` predicts
//! for a new flow are the ones the real program then gives it, packet by packet
//! through BPF_PROG_TEST_RUN. And the cases `trace` must explain beyond the backend:
//! a policy drop with its reason, `dsr-ipip` encapsulation, a tunnelled packet, ICMP.

use std::net::SocketAddr;
use testbed::Ipv4Octets as _;

use ebpf_proxy::{
    model::{Endpoint, Frontend, FrontendKey, Listen, Protocol, Scheduler},
    trace::{explain, explain_untranslated, Origin},
};

use crate::support::{datapath::*, packets::*};

const VIP: [u8; 4] = [10, 96, 0, 10];
const STATES: u32 = 150;
const PROBES: u16 = 8;

/// A small deterministic generator (xorshift64*): the same states every run, and a
/// failure names the state that produced it.
struct Random(u64);

impl Random {
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) % u64::from(n)) as u32
    }
}

/// Every scheduler `trace` can predict (random is random).
fn scheduler(random: &mut Random) -> Scheduler {
    let predictable: Vec<Scheduler> = Scheduler::ALL
        .iter()
        .copied()
        .filter(|s| *s != Scheduler::Random)
        .collect();
    predictable[random.below(predictable.len() as u32) as usize]
}

fn random_frontend(random: &mut Random) -> Frontend {
    let count = 1 + random.below(10);
    let endpoints = (0..count)
        .map(|i| Endpoint {
            weight: random.below(4),
            remote: random.below(3) == 0,
            ..local([10, 244, 1 + (i as u8 % 2), 10 + i as u8], 8080)
        })
        .collect();
    Frontend {
        service: "test/web:http".into(),
        scheduler: scheduler(random),
        endpoints,
        affinity_timeout_s: if random.below(4) == 0 { 3600 } else { 0 },
        ..Default::default()
    }
}

#[test]
fn trace_predicts_what_the_kernel_does_over_random_states() {
    let mut dp = TestDatapath::new();
    let mut random = Random(0x9e37_79b9_7f4a_7c15);
    let mut compared = 0;
    for state in 0..STATES {
        let frontend = random_frontend(&mut random);
        let described = format!("state {state}: {frontend:?}");
        dp.flush_conntrack();
        dp.program_frontends(vec![(tcp(VIP, 80), frontend)]);
        // Some flows already open, so that the least-connection family has counts.
        for port in 0..random.below(6) as u16 {
            let _ = dp.xdp(&tcp_packet(
                ([198, 18, 9, 9], 1000 + port),
                (VIP, 80),
                Tcp::Syn,
                b"",
            ));
        }
        for probe in 0..PROBES {
            let client = [198, 18, 0, 2 + random.below(3) as u8];
            let port = 20_000 + (state as u16 % 1000) * PROBES + probe;
            let predicted = explain(
                &dp.tables(),
                &proxy_common::LoadSettings::DEFAULT,
                Protocol::Tcp,
                SocketAddr::from((client, port)),
                SocketAddr::from((VIP, 80)),
                Origin::External,
            )
            .expect("trace");
            let (verdict, out) = dp.xdp(&tcp_packet((client, port), (VIP, 80), Tcp::Syn, b""));
            let refused = refused(verdict, &out);
            assert_eq!(
                refused,
                predicted
                    .dropped
                    .as_deref()
                    .is_some_and(|why| why.contains("event refused")),
                "{described}, probe {probe}: {:?}",
                predicted.steps
            );
            let actual = (verdict == XDP_PASS && !refused).then(|| inspect(&out));
            let expected = predicted.translated.map(|(src, dst)| Seen {
                src: (src.ip().octets(), src.port()),
                dst: (dst.ip().octets(), dst.port()),
            });
            assert_eq!(
                actual.map(|seen| seen.dst),
                expected.map(|seen| seen.dst),
                "{described}, probe {probe}: {:?}",
                predicted.steps
            );
            // The source after translation (masquerade or not) agrees too, but for the
            // masquerade port, which the kernel may move off a taken one.
            assert_eq!(
                actual.map(|seen| seen.src.0),
                expected.map(|seen| seen.src.0),
                "{described}, probe {probe}: {:?}",
                predicted.steps
            );
            assert_eq!(
                predicted.dropped.is_some(),
                actual.is_none(),
                "{described}, probe {probe}: {:?}",
                predicted.steps
            );
            compared += 1;
        }
    }
    assert_eq!(compared, STATES * u32::from(PROBES));
}

const LOCAL_POD: [u8; 4] = [10, 244, 1, 2];
const OTHER_LOCAL_POD: [u8; 4] = [10, 244, 1, 3];
const REMOTE_POD: [u8; 4] = [10, 244, 2, 2];
const CLIENT: [u8; 4] = [198, 18, 0, 2];

fn trace(
    dp: &TestDatapath,
    dst: [u8; 4],
    port: u16,
    origin: Origin,
) -> ebpf_proxy::trace::Explanation {
    explain(
        &dp.tables(),
        &proxy_common::LoadSettings::DEFAULT,
        Protocol::Tcp,
        SocketAddr::from((CLIENT, 41000)),
        SocketAddr::from((dst, port)),
        origin,
    )
    .expect("trace")
}

#[test]
fn trace_names_the_policy_that_drops_a_flow_and_where_the_endpoints_are() {
    let mut dp = TestDatapath::new();
    let service = |endpoints: Vec<Endpoint>, external: bool, local_only: bool| Frontend {
        service: "test/web:http".into(),
        external,
        endpoints,
        local_only,
        ..Default::default()
    };
    dp.program_frontends(vec![
        (
            tcp(VIP, 80),
            service(vec![remote(REMOTE_POD, 8080)], false, false),
        ),
        // externalTrafficPolicy: Local on a node without local endpoints.
        (
            node_port(30080, Protocol::Tcp),
            service(Vec::new(), true, true),
        ),
    ]);
    let node = NODE_IP.octets();
    let explained = trace(&dp, node, 30080, Origin::External);
    let reason = explained.dropped.expect("dropped");
    assert!(reason.contains("externalTrafficPolicy: Local"), "{reason}");
    assert!(reason.contains("10.244.2.2:8080"), "{reason}");
    let (verdict, _) = dp.xdp(&tcp_packet((CLIENT, 41000), (node, 30080), Tcp::Syn, b""));
    assert_eq!(verdict, XDP_DROP, "the kernel drops it too");
    assert_eq!(dp.event("no_backend"), 1);
}

#[test]
fn trace_shows_dsr_encapsulation_and_follows_a_tunnelled_packet_to_the_named_backend() {
    let mut dp = TestDatapath::new();
    let tunnel_view = FrontendKey {
        listen: Listen::TunnelAddress(VIP.into()),
        ..tcp(VIP, 80)
    };
    dp.program_frontends(vec![
        (
            tcp(VIP, 80),
            Frontend {
                service: "test/web:http".into(),
                external: true,
                endpoints: vec![remote(REMOTE_POD, 8080)],
                dsr: true,
                ..Default::default()
            },
        ),
        (
            tunnel_view,
            Frontend {
                service: "test/web:http".into(),
                external: true,
                endpoints: vec![local(LOCAL_POD, 8080), local(OTHER_LOCAL_POD, 8080)],
                ..Default::default()
            },
        ),
    ]);
    let entry = trace(&dp, VIP, 80, Origin::External);
    assert_eq!(
        entry.encapsulated_to,
        Some(REMOTE_POD.into()),
        "{:?}",
        entry.steps
    );
    assert!(entry.translated.is_none());
    let (_, out) = dp.xdp(&tcp_packet((CLIENT, 41000), (VIP, 80), Tcp::Syn, b""));
    assert_eq!(out[14 + 9], 4, "the kernel encapsulates it (IPIP)");
    assert_eq!(out[14 + 16..14 + 20], REMOTE_POD, "to that backend");
    let tracked = trace(&dp, VIP, 80, Origin::External);
    assert_eq!(
        tracked.encapsulated_to,
        Some(REMOTE_POD.into()),
        "{:?}",
        tracked.steps
    );
    dp.flush_conntrack();

    // At the backend's node the packet arrives in IPIP to the second local pod: the
    // trace follows the tunnel view to exactly that backend, as the kernel does.
    let tunnelled = trace(
        &dp,
        VIP,
        80,
        Origin::Tunnel {
            outer_src: [198, 18, 2, 1].into(),
            outer_dst: OTHER_LOCAL_POD.into(),
        },
    );
    assert_eq!(
        tunnelled.backend,
        Some(SocketAddr::from((OTHER_LOCAL_POD, 8080))),
        "{:?}",
        tunnelled.steps
    );
    assert!(tunnelled.steps.iter().any(|s| s.contains("tunnel view")));
}

/// Whether the data path answered a frame with ICMP port unreachable (a refusal
/// passes as ICMP: IP protocol 1, type 3).
fn refused(verdict: u32, out: &[u8]) -> bool {
    verdict == XDP_PASS && out.get(23) == Some(&1) && out.get(34) == Some(&3)
}

/// What the kernel refuses (a ping or another port of a service address) trace says
/// it refuses; a ping of another address passes in both.
#[test]
fn trace_says_what_the_kernel_refuses_at_a_service_address() {
    let mut dp = TestDatapath::new();
    dp.program(&[(tcp(VIP, 80), vec![local(LOCAL_POD, 8080)])]);
    let says_refused = |explained: &ebpf_proxy::trace::Explanation| {
        explained
            .dropped
            .as_deref()
            .is_some_and(|why| why.contains("event refused"))
    };
    for (dst, kernel_refuses) in [(VIP, true), ([10, 96, 0, 99], false)] {
        // A ping, and ESP and GRE packets.
        for (protocol, packet) in [
            (1, ping_packet(CLIENT, dst)),
            (50, ip_packet(CLIENT, dst, 50, &[0x5a; 40])),
            (47, ip_packet(CLIENT, dst, 47, &[0x5a; 40])),
        ] {
            let (verdict, out) = dp.xdp(&packet);
            assert_eq!(
                refused(verdict, &out),
                kernel_refuses,
                "{protocol} to {dst:?}"
            );
            let explained = explain_untranslated(&dp.tables(), protocol, CLIENT.into(), dst.into())
                .expect("trace");
            assert_eq!(
                says_refused(&explained),
                kernel_refuses,
                "{protocol} to {dst:?}: {:?}",
                explained.steps
            );
            assert!(explained.backend.is_none() && explained.translated.is_none());
        }
    }
    let (verdict, out) = dp.xdp(&tcp_packet((CLIENT, 41000), (VIP, 81), Tcp::Syn, b""));
    assert!(refused(verdict, &out), "another port of the VIP");
    let explained = trace(&dp, VIP, 81, Origin::External);
    assert!(says_refused(&explained), "{:?}", explained.steps);
}

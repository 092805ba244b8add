//! Per-service policies the kernel enforces, packet by packet through
//! BPF_PROG_TEST_RUN: `sessionAffinity: ClientIP` and `loadBalancerSourceRanges`, one
//! body per address family.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use crate::support::{datapath::*, families::*, packets::*};
use ebpf_proxy::{
    model::{Endpoint, Family, Frontend, FrontendKey, Protocol, SourceRange},
    trace::{explain, Origin},
};

/// A family's addresses beside `Net`'s: a LoadBalancer IP, clients outside the
/// client's range, and the ranges the tests admit.
struct Policies {
    net: Net,
    lb_ip: IpAddr,
    /// A range holding the client, and another of 16 addresses.
    client_range: &'static str,
    other_range: &'static str,
    /// The first address of `other_range`; `others(n)` follow it.
    other_client: IpAddr,
    /// The address just past `other_range`.
    past_other_range: IpAddr,
}

impl Policies {
    /// Clients of `other_range`, from the `n`th on.
    fn other(&self, n: u8) -> IpAddr {
        match self.other_client {
            IpAddr::V4(v4) => Ipv4Addr::from(u32::from(v4) + u32::from(n)).into(),
            IpAddr::V6(v6) => Ipv6Addr::from(u128::from(v6) + u128::from(n)).into(),
        }
    }
}

fn families() -> [Policies; 2] {
    nets().map(|net| match net.family {
        Family::V4 => Policies {
            net,
            lb_ip: ip("198.18.100.1"),
            client_range: "198.18.0.0/24",
            other_range: "203.0.113.0/28",
            other_client: ip("203.0.113.0"),
            past_other_range: ip("203.0.113.16"),
        },
        Family::V6 => Policies {
            net,
            lb_ip: ip("fd00:18:100::1"),
            client_range: "fd00:18::/64",
            other_range: "fd00:203::/124",
            other_client: ip("fd00:203::"),
            past_other_range: ip("fd00:203::10"),
        },
    })
}

fn backends(net: &Net) -> Vec<Endpoint> {
    let third = match net.family {
        Family::V4 => ip("10.244.1.4"),
        Family::V6 => ip("fd00:244:1::4"),
    };
    [net.pods[0], net.pods[1], third]
        .into_iter()
        .map(|addr| endpoint(addr, false))
        .collect()
}

fn frontend_of(
    net: &Net,
    affinity_timeout_s: u32,
    source_ranges: Option<Vec<SourceRange>>,
) -> Frontend {
    Frontend {
        service: "test/web".into(),
        external: source_ranges.is_some(),
        endpoints: backends(net),
        affinity_timeout_s,
        source_ranges,
        ..Default::default()
    }
}

fn web(addr: IpAddr) -> FrontendKey {
    frontend(addr, 80, Protocol::Tcp)
}

/// The backend a new connection from `client:port` to `dst` reaches, or `None` if it
/// was dropped (or passed untranslated).
fn connect(dp: &mut TestDatapath, client: IpAddr, port: u16, dst: IpAddr) -> Option<IpAddr> {
    let syn = packet((client, port), (dst, 80), L4::Tcp(Tcp::Syn), b"");
    let (verdict, out) = dp.xdp(&syn);
    let reached = (verdict == XDP_PASS).then(|| inspect_ip(&out).dst);
    reached
        .filter(|(_, port)| *port == 8080)
        .map(|(backend, _)| backend)
}

fn backends_reached(
    dp: &mut TestDatapath,
    net: &Net,
    client: IpAddr,
    ports: std::ops::Range<u16>,
) -> BTreeSet<IpAddr> {
    ports
        .map(|port| connect(dp, client, port, net.vip).expect("translated"))
        .collect()
}

#[test]
fn without_affinity_one_client_is_spread_over_the_backends() {
    for p in families() {
        let net = &p.net;
        let mut dp = TestDatapath::new();
        dp.program_frontends(vec![(web(net.vip), frontend_of(net, 0, None))]);
        let reached = backends_reached(&mut dp, net, net.client, 40000..40006);
        assert_eq!(reached.len(), 3, "{:?}", net.family);
        assert_eq!(dp.event("affinity_hit"), 0);
    }
}

#[test]
fn client_ip_affinity_keeps_a_client_on_one_backend_and_others_are_still_spread() {
    for p in families() {
        let net = &p.net;
        let mut dp = TestDatapath::new();
        dp.program_frontends(vec![(web(net.vip), frontend_of(net, 3600, None))]);
        let first = backends_reached(&mut dp, net, net.client, 40000..40030);
        assert_eq!(first.len(), 1, "{:?}: {first:?}", net.family);
        assert_eq!(dp.event("affinity_hit"), 29);
        // Other clients are scheduled (rr moves on) and then stick to their own backend.
        let mut seen = BTreeSet::new();
        for n in 0..3u8 {
            let reached = backends_reached(&mut dp, net, p.other(10 + n), 50000..50005);
            assert_eq!(reached.len(), 1, "{:?}", net.family);
            seen.extend(reached);
        }
        assert_eq!(seen.len(), 3, "rr still spreads new clients: {seen:?}");
    }
}

#[test]
fn affinity_expires_after_its_timeout() {
    let mut bound = Vec::new();
    let mut dps = Vec::new();
    for p in families() {
        let net = &p.net;
        let mut dp = TestDatapath::new();
        dp.program_frontends(vec![(web(net.vip), frontend_of(net, 1, None))]);
        let first = connect(&mut dp, net.client, 40000, net.vip).expect("translated");
        assert_eq!(
            connect(&mut dp, net.client, 40001, net.vip),
            Some(first),
            "{:?}: within the timeout",
            net.family
        );
        bound.push((p, first));
        dps.push(dp);
    }
    // The timeout runs from the last new flow; the coarse clock ticks every few ms.
    std::thread::sleep(Duration::from_millis(1300));
    for ((p, first), mut dp) in bound.into_iter().zip(dps) {
        let later = connect(&mut dp, p.net.client, 40002, p.net.vip).expect("translated");
        assert_ne!(
            later, first,
            "{:?}: rr's next turn after the binding expired",
            p.net.family
        );
    }
}

#[test]
fn a_client_bound_to_a_backend_that_left_is_scheduled_afresh() {
    for p in families() {
        let net = &p.net;
        let mut dp = TestDatapath::new();
        dp.program_frontends(vec![(web(net.vip), frontend_of(net, 3600, None))]);
        let bound = connect(&mut dp, net.client, 40000, net.vip).expect("translated");
        let mut remaining = frontend_of(net, 3600, None);
        remaining.endpoints.retain(|e| e.addr != bound);
        dp.program_frontends(vec![(web(net.vip), remaining)]);
        let next = connect(&mut dp, net.client, 40001, net.vip).expect("translated");
        assert_ne!(next, bound, "{:?}", net.family);
        // ...and is bound to the new one.
        assert_eq!(connect(&mut dp, net.client, 40002, net.vip), Some(next));
    }
}

fn range(text: &str) -> SourceRange {
    text.parse().expect("range")
}

#[test]
fn source_ranges_admit_listed_clients_and_drop_the_rest() {
    for p in families() {
        source_ranges_admit_listed_clients_and_drop_the_rest_in(&p);
    }
}

fn source_ranges_admit_listed_clients_and_drop_the_rest_in(p: &Policies) {
    let net = &p.net;
    let family = net.family;
    let lb = web(p.lb_ip);
    let mut dp = TestDatapath::new();
    dp.program_frontends(vec![
        (lb, frontend_of(net, 0, Some(vec![range(p.client_range)]))),
        (web(net.vip), frontend_of(net, 0, None)),
    ]);
    assert!(connect(&mut dp, net.client, 40000, p.lb_ip).is_some());
    assert_eq!(connect(&mut dp, p.other_client, 40000, p.lb_ip), None);
    assert_eq!(dp.event("source_denied"), 1, "{family:?}");
    // The ClusterIP of the same service is not restricted.
    assert!(connect(&mut dp, p.other_client, 40001, net.vip).is_some());

    // Widening the ranges admits the other client (the last of its range too, not
    // the next address); an empty list admits nobody; no list admits everybody.
    let both = vec![range(p.client_range), range(p.other_range)];
    dp.program_frontends(vec![(lb, frontend_of(net, 0, Some(both)))]);
    assert!(connect(&mut dp, p.other_client, 40002, p.lb_ip).is_some());
    assert!(connect(&mut dp, p.other(15), 40002, p.lb_ip).is_some());
    let past = connect(&mut dp, p.past_other_range, 40002, p.lb_ip);
    assert!(past.is_none(), "{family:?}");
    assert_eq!(dp.event("source_denied"), 2, "{family:?}");
    dp.program_frontends(vec![(lb, frontend_of(net, 0, Some(Vec::new())))]);
    assert!(connect(&mut dp, net.client, 40003, p.lb_ip).is_none());
    dp.program_frontends(vec![(lb, frontend_of(net, 0, None))]);
    assert!(connect(&mut dp, p.past_other_range, 40004, p.lb_ip).is_some());
    // Nothing of the removed ranges is left in the map (beside the node-wide entries
    // of the tunnel peers, one per family).
    let node_wide = [
        proxy_common::TUNNEL_PEERS_ID,
        proxy_common::TUNNEL_PEERS6_ID,
    ];
    let left = dp
        .tables()
        .source_ranges
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !node_wide.contains(&ebpf_proxy::datapath::codec::source_range_id(k)))
        .count();
    assert_eq!(left, 0, "{family:?}");
}

#[test]
fn trace_explains_source_ranges_and_affinity_as_the_kernel_decides() {
    for p in families() {
        let net = &p.net;
        let mut dp = TestDatapath::new();
        dp.program_frontends(vec![
            (
                web(p.lb_ip),
                frontend_of(net, 0, Some(vec![range(p.client_range)])),
            ),
            (web(net.vip), frontend_of(net, 3600, None)),
        ]);
        let trace = |dp: &TestDatapath, src: IpAddr, dst: IpAddr| {
            explain(
                &dp.tables(),
                &proxy_common::LoadSettings::DEFAULT,
                Protocol::Tcp,
                (src, 41000).into(),
                (dst, 80).into(),
                Origin::External,
            )
            .expect("trace")
        };
        let denied = trace(&dp, p.other_client, p.lb_ip);
        assert!(denied.backend.is_none(), "{:?}", denied.steps);
        assert!(
            denied.steps.iter().any(|s| s.contains("source_denied")),
            "{:?}",
            denied.steps
        );
        assert!(trace(&dp, net.client, p.lb_ip).backend.is_some());

        // Once the client has a flow, the trace predicts the bound backend, which a
        // new connection indeed reaches.
        let bound = connect(&mut dp, net.client, 40000, net.vip).expect("translated");
        let explained = trace(&dp, net.client, net.vip);
        assert!(
            explained
                .steps
                .iter()
                .any(|s| s.contains("sessionAffinity")),
            "{:?}",
            explained.steps
        );
        assert_eq!(explained.backend.map(|b| b.ip()), Some(bound));
        assert_eq!(connect(&mut dp, net.client, 40001, net.vip), Some(bound));
    }
}

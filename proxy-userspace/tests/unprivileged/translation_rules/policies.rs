//! Rules 8 to 13: traffic policies, topology, affinity, source ranges, forwarding.

use std::net::Ipv4Addr;

use ebpf_proxy::model::{Family, FrontendKey, Listen, Severity};

use super::*;

#[test]
fn rule8_external_traffic_policy_local_keeps_external_frontends_on_this_node() {
    let local = Ipv4Addr::new(10, 244, 1, 1);
    let remote = Ipv4Addr::new(10, 244, 2, 1);
    let cluster = translate_all(&objects(&mixed_service("")), NODE);
    assert_eq!(
        endpoints_of(&cluster, &node_port(30080)),
        vec![local, remote]
    );
    assert!(cluster.health_checks.is_empty());

    let yaml = mixed_service("  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n");
    let out = translate_all(&objects(&yaml), NODE);
    assert_eq!(endpoints_of(&out, &node_port(30080)), vec![local]);
    assert_eq!(endpoints_of(&out, &load_balancer(80)), vec![local]);
    // The ClusterIP still reaches every endpoint.
    assert_eq!(endpoints_of(&out, &cluster_ip(80)), vec![local, remote]);
    let check = &out.health_checks[&32000];
    assert_eq!((check.name.as_str(), check.local_endpoints), ("a", 1));
    // The narrowing is recorded, for `trace` to explain a drop.
    assert!(out.state.frontends[&node_port(30080)].local_only);
    assert!(!out.state.frontends[&cluster_ip(80)].local_only);
    assert!(!cluster.state.frontends[&node_port(30080)].local_only);
    // In-cluster clients (pods, the node) get every endpoint through in-cluster views
    // of the narrowed external frontends, as kube-proxy short-circuits them; the
    // cluster policy needs none.
    let in_cluster = |key: FrontendKey| FrontendKey {
        listen: match key.listen {
            Listen::Address(addr) => Listen::InClusterAddress(addr),
            _ => Listen::InClusterNodePort(Family::V4),
        },
        ..key
    };
    for external in [node_port(30080), load_balancer(80)] {
        assert!(out.state.frontends[&external].in_cluster_view, "{external}");
        let view = in_cluster(external);
        assert_eq!(endpoints_of(&out, &view), vec![local, remote], "{view}");
        let view_frontend = &out.state.frontends[&view];
        assert!(
            view_frontend.external && !view_frontend.in_cluster_view,
            "{view}"
        );
        assert!(!cluster.state.frontends.contains_key(&view), "{view}");
        assert!(!cluster.state.frontends[&external].in_cluster_view);
    }

    // On the other node's view the remote endpoint is the local one; on a node with
    // none, external frontends have no endpoints and the health check reports 0.
    let elsewhere = translate_all(&objects(&yaml), "node-c");
    assert!(endpoints_of(&elsewhere, &node_port(30080)).is_empty());
    assert_eq!(elsewhere.health_checks[&32000].local_endpoints, 0);
}

#[test]
fn rule8_local_policy_falls_back_to_local_terminating_endpoints() {
    let yaml = service("a", "  type: NodePort\n  externalTrafficPolicy: Local\n")
        .replace("protocol: TCP}", "protocol: TCP, nodePort: 30080}")
        + &slice(
            "a-1",
            "a",
            &(endpoint(
                "10.244.1.1",
                ", conditions: {ready: false, serving: true, terminating: true}",
            ) + &endpoint("10.244.2.1", "").replace("node-a", "node-b")),
        );
    let out = translate_all(&objects(&yaml), NODE);
    assert_eq!(
        endpoints_of(&out, &node_port(30080)),
        vec![Ipv4Addr::new(10, 244, 1, 1)]
    );
    assert_eq!(
        endpoints_of(&out, &cluster_ip(80)),
        vec![Ipv4Addr::new(10, 244, 2, 1)]
    );
}

#[test]
fn rule9_internal_traffic_policy_local_keeps_the_cluster_ip_on_this_node() {
    let out = translate_all(
        &objects(&mixed_service("  internalTrafficPolicy: Local\n")),
        NODE,
    );
    assert_eq!(
        endpoints_of(&out, &cluster_ip(80)),
        vec![Ipv4Addr::new(10, 244, 1, 1)]
    );
    assert!(out.state.frontends[&cluster_ip(80)].local_only);
    assert!(!out.state.frontends[&node_port(30080)].local_only);
    assert_eq!(endpoints_of(&out, &node_port(30080)).len(), 2);
}

fn zoned(addr: &str, zones: &str) -> String {
    let hints = if zones.is_empty() {
        String::new()
    } else {
        format!(", hints: {{forZones: [{zones}]}}")
    };
    endpoint(addr, &hints)
}

const NODE_IN_ZONE_A: &str =
    "---\napiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {topology.kubernetes.io/zone: zone-a}}\n";

#[test]
fn rule10_zone_hints_select_this_zone_only_when_every_endpoint_has_them() {
    let hinted = service("a", "  trafficDistribution: PreferClose\n")
        + &slice(
            "a-1",
            "a",
            &(zoned("10.244.1.1", "{name: zone-a}") + &zoned("10.244.1.2", "{name: zone-b}")),
        );
    let with_node = format!("{hinted}{NODE_IN_ZONE_A}");
    assert_eq!(backends(&with_node), vec![Ipv4Addr::new(10, 244, 1, 1)]);
    // Without the node's zone, hints cannot apply.
    assert_eq!(backends(&hinted).len(), 2);
    // One endpoint without hints: all serve.
    let partly = service("a", "")
        + &slice(
            "a-1",
            "a",
            &(zoned("10.244.1.1", "{name: zone-a}") + &zoned("10.244.1.2", "")),
        )
        + NODE_IN_ZONE_A;
    assert_eq!(backends(&partly).len(), 2);
    // Hints for other zones only: all serve.
    let elsewhere = service("a", "")
        + &slice("a-1", "a", &zoned("10.244.1.2", "{name: zone-b}"))
        + NODE_IN_ZONE_A;
    assert_eq!(backends(&elsewhere).len(), 1);
}

fn for_nodes(addr: &str, nodes: &str, zones: &str) -> String {
    endpoint(
        addr,
        &format!(", hints: {{forNodes: [{nodes}], forZones: [{zones}]}}"),
    )
}

#[test]
fn rule10_node_hints_select_this_node_before_zone_hints() {
    // PreferSameNode: the controller hints each endpoint for its own node (and, as a
    // fallback for others, for its zone).
    let hinted = service("a", "  trafficDistribution: PreferSameNode\n")
        + &slice(
            "a-1",
            "a",
            &(for_nodes("10.244.1.1", "{name: node-a}", "{name: zone-a}")
                + &for_nodes("10.244.1.2", "{name: node-b}", "{name: zone-a}")
                + &for_nodes("10.244.1.3", "{name: node-c}", "{name: zone-b}")),
        )
        + NODE_IN_ZONE_A;
    assert_eq!(backends(&hinted), vec![Ipv4Addr::new(10, 244, 1, 1)]);
    // No endpoint for this node: the zone hints decide.
    let elsewhere = hinted.replace("{name: node-a}", "{name: node-d}");
    assert_eq!(
        backends(&elsewhere),
        vec![Ipv4Addr::new(10, 244, 1, 1), Ipv4Addr::new(10, 244, 1, 2)]
    );
    // One endpoint without node hints: they do not apply.
    let partly = hinted.replace("forNodes: [{name: node-b}], ", "");
    assert_eq!(backends(&partly).len(), 2, "zone-a's two");
}

#[test]
fn rule11_session_affinity_sets_the_timeout() {
    let timeout = |extra: &str| {
        translate_all(&objects(&service("a", extra)), NODE)
            .state
            .frontends[&cluster_ip(80)]
            .affinity_timeout_s
    };
    assert_eq!(timeout(""), 0);
    assert_eq!(timeout("  sessionAffinity: None\n"), 0);
    assert_eq!(timeout("  sessionAffinity: ClientIP\n"), 10_800);
    assert_eq!(
        timeout("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}\n"),
        30
    );
    let bad = translate_all(
        &objects(&service(
            "a",
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
        )),
        NODE,
    );
    assert!(bad.state.frontends.is_empty());
    assert!(
        bad.problems[0].message.contains("timeoutSeconds"),
        "{:?}",
        bad.problems
    );
}

#[test]
fn rule12_source_ranges_restrict_only_the_load_balancer_frontend() {
    let yaml = mixed_service(
        "  loadBalancerSourceRanges: [198.51.100.0/24, \"203.0.113.7/32\", \"2001:db8::/64\", 192.0.2.9/16]\n",
    );
    let out = translate_all(&objects(&yaml), NODE);
    let ranges: Vec<String> = out.state.frontends[&load_balancer(80)]
        .source_ranges
        .as_ref()
        .expect("ranges")
        .iter()
        .map(|r| r.to_string())
        .collect();
    // Host bits are cleared; the IPv6 prefix is the IPv6 frontends' (this service
    // has none).
    assert_eq!(
        ranges,
        ["192.0.0.0/16", "198.51.100.0/24", "203.0.113.7/32"]
    );
    assert_eq!(out.state.frontends[&cluster_ip(80)].source_ranges, None);
    assert_eq!(out.state.frontends[&node_port(30080)].source_ranges, None);

    let only_v6 = translate_all(
        &objects(&mixed_service(
            "  loadBalancerSourceRanges: [\"2001:db8::/64\"]\n",
        )),
        NODE,
    );
    assert_eq!(
        only_v6.state.frontends[&load_balancer(80)].source_ranges,
        Some(Vec::new())
    );
    // Failing closed where kube-proxy would admit everyone is said.
    assert!(
        only_v6
            .problems
            .iter()
            .any(|p| p.severity == Severity::Warning && p.message.contains("no IPv4 prefix")),
        "{:?}",
        only_v6.problems
    );
    let invalid = translate_all(
        &objects(&mixed_service(
            "  loadBalancerSourceRanges: [198.51.100.0/40]\n",
        )),
        NODE,
    );
    assert!(invalid.state.frontends.is_empty());
    assert_eq!(invalid.problems[0].severity, Severity::Error);
}

#[test]
fn rule13_dsr_ipip_marks_external_frontends_and_adds_tunnel_views_of_local_endpoints() {
    let local = Ipv4Addr::new(10, 244, 1, 1);
    let remote = Ipv4Addr::new(10, 244, 2, 1);
    let dsr = |spec: &str| {
        mixed_service(spec).replace(
            "namespace: ns}",
            "namespace: ns, annotations: {ebpf-proxy.io/forwarding: dsr-ipip}}",
        )
    };
    let out = translate_all(&objects(&dsr("")), NODE);
    let frontends = &out.state.frontends;
    // External frontends encapsulate to remote endpoints; the ClusterIP does not.
    assert!(frontends[&node_port(30080)].dsr);
    assert!(frontends[&load_balancer(80)].dsr);
    assert!(!frontends[&cluster_ip(80)].dsr);
    assert_eq!(
        endpoints_of(&out, &node_port(30080)),
        vec![local, remote],
        "the entry node schedules over every endpoint"
    );
    // The IPIP views, where encapsulated flows arrive, hold this node's endpoints only.
    let tunnel_lb = FrontendKey {
        listen: Listen::TunnelAddress(Ipv4Addr::new(198, 18, 100, 1).into()),
        ..load_balancer(80)
    };
    let tunnel_node_port = FrontendKey {
        listen: Listen::TunnelNodePort(Family::V4),
        ..node_port(30080)
    };
    assert_eq!(endpoints_of(&out, &tunnel_lb), vec![local]);
    assert_eq!(endpoints_of(&out, &tunnel_node_port), vec![local]);
    assert!(
        !frontends
            .keys()
            .any(|k| k.listen == Listen::TunnelAddress(Ipv4Addr::new(10, 96, 0, 1).into())),
        "no tunnel view of a ClusterIP"
    );

    // The default forwarding (snat): no tunnel views, nothing encapsulated.
    let snat = translate_all(&objects(&mixed_service("")), NODE);
    assert!(snat.state.frontends.values().all(|f| !f.dsr));
    assert!(!snat.state.frontends.keys().any(|k| k.listen.is_tunnel()));

    // externalTrafficPolicy: Local sends no flow to another node: nothing to tunnel.
    let local_policy = translate_all(&objects(&dsr("  externalTrafficPolicy: Local\n")), NODE);
    assert!(local_policy.state.frontends.values().all(|f| !f.dsr));
    assert!(!local_policy
        .state
        .frontends
        .keys()
        .any(|k| k.listen.is_tunnel()));

    // An unknown mode is reported and the service keeps the node's default.
    let unknown = translate_all(
        &objects(&mixed_service("").replace(
            "namespace: ns}",
            "namespace: ns, annotations: {ebpf-proxy.io/forwarding: teleport}}",
        )),
        NODE,
    );
    assert!(
        unknown
            .problems
            .iter()
            .any(|p| p.message.contains("unknown forwarding mode")),
        "{:?}",
        unknown.problems
    );
    assert!(unknown.state.frontends.values().all(|f| !f.dsr));
}

/// Issue 13: a Service with TCP and SCTP ports (as telco services have: HTTP beside
/// Diameter) gets every frontend of both, with the endpoints of each port's own
/// protocol; under `dsr-ipip` the SCTP ports stay snat (rule 13: SCTP's programs do
/// not encapsulate) and the TCP ports do not lose their encapsulation for them.
#[test]
fn rule13_a_service_mixing_sctp_and_tcp_keeps_both_and_sctp_is_never_dsr_ipip() {
    let yaml = mixed_service("")
        .replace(
            "ports: [{name: http, port: 80, protocol: TCP, nodePort: 30080}]",
            "ports: [{name: http, port: 80, protocol: TCP, nodePort: 30080}, {name: diameter, port: 3868, protocol: SCTP, nodePort: 30868}]",
        )
        .replace(
            "ports: [{name: http, port: 8080, protocol: TCP}]",
            "ports: [{name: http, port: 8080, protocol: TCP}, {name: diameter, port: 3869, protocol: SCTP}]",
        )
        .replace(
            "namespace: ns}",
            "namespace: ns, annotations: {ebpf-proxy.io/forwarding: dsr-ipip}}",
        );
    let out = translate_all(&objects(&yaml), NODE);
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    let sctp = |key: FrontendKey| FrontendKey {
        protocol: Protocol::Sctp,
        ..key
    };
    let frontends = &out.state.frontends;
    for key in [cluster_ip(3868), node_port(30868), load_balancer(3868)] {
        let frontend = &frontends[&sctp(key)];
        assert!(!frontend.dsr, "{}", sctp(key));
        assert!(frontend.endpoints.iter().all(|e| e.port == 3869));
        assert_eq!(endpoints_of(&out, &sctp(key)).len(), 2);
    }
    assert!(
        frontends[&node_port(30080)].dsr,
        "the TCP port keeps dsr-ipip"
    );
    assert!(frontends[&cluster_ip(80)]
        .endpoints
        .iter()
        .all(|e| e.port == 8080));
    assert!(
        !frontends
            .keys()
            .any(|k| k.listen.is_tunnel() && k.protocol == Protocol::Sctp),
        "no tunnel view of an SCTP port"
    );
}

#[test]
fn rule12_each_family_s_ingress_ips_get_that_family_s_prefixes() {
    let yaml = service(
        "ds",
        "  type: LoadBalancer\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.1, \"fd00:96::1\"]\n  loadBalancerSourceRanges: [198.51.100.0/24, \"2001:db8:7::/48\"]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.100.1}, {ip: \"2001:db8::100\"}]}}\n",
    );
    let out = translate_all(&objects(&yaml), NODE);
    let ranges_of = |frontend: &str| -> Vec<String> {
        let (_, found) = out
            .state
            .frontends
            .iter()
            .find(|(key, _)| key.to_string() == frontend)
            .unwrap_or_else(|| panic!("no frontend {frontend}"));
        found
            .source_ranges
            .iter()
            .flatten()
            .map(|r| r.to_string())
            .collect()
    };
    assert_eq!(ranges_of("TCP 198.18.100.1:80"), ["198.51.100.0/24"]);
    assert_eq!(ranges_of("TCP [2001:db8::100]:80"), ["2001:db8:7::/48"]);
    assert!(out.problems.is_empty(), "{:?}", out.problems);
}

#[test]
fn rule13_a_dual_stack_dsr_ipip_service_encapsulates_both_families() {
    let yaml = service(
        "ds",
        "  type: LoadBalancer\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.1, \"fd00:96::1\"]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.100.1}, {ip: \"2001:db8::100\"}]}}\n",
    )
    .replace(
        "namespace: ns}",
        "namespace: ns, annotations: {ebpf-proxy.io/forwarding: dsr-ipip}}",
    );
    let out = translate_all(&objects(&yaml), NODE);
    let dsr_of = |frontend: &str| {
        out.state
            .frontends
            .iter()
            .find(|(key, _)| key.to_string() == frontend)
            .map(|(_, f)| f.dsr)
            .unwrap_or_else(|| panic!("no frontend {frontend}"))
    };
    assert!(dsr_of("TCP 198.18.100.1:80"));
    assert!(dsr_of("TCP [2001:db8::100]:80"), "ip6ip6 for IPv6");
    for family in Family::ALL {
        assert!(
            out.state
                .frontends
                .keys()
                .any(|k| k.listen.is_tunnel() && k.listen.family() == family),
            "a tunnel view for {family:?}, where backends' nodes decapsulate"
        );
    }
    assert!(out.problems.is_empty(), "{:?}", out.problems);
}

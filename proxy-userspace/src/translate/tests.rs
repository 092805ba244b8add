//! Unit tests of the translation rules (numbered as in the module comment).

use std::net::Ipv4Addr;

use super::translate;
use crate::{
    manifests::{parse, Objects},
    model::{Endpoint, FrontendKey, Listen, Protocol, Severity},
};

const NODE: &str = "node-a";

fn objects(yaml: &str) -> Objects {
    let (objects, problems) = parse(yaml, "test");
    assert!(problems.is_empty(), "{problems:?}");
    objects
}

fn service(name: &str, extra_spec: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  selector: {{app: {name}}}\n  clusterIP: 10.96.0.1\n  ports: [{{name: http, port: 80, protocol: TCP}}]\n{extra_spec}"
    )
}

fn slice(name: &str, service: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: ns, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}"
    )
}

fn endpoint(addr: &str, extra: &str) -> String {
    format!("- {{addresses: [\"{addr}\"], nodeName: node-a{extra}}}\n")
}

fn cluster_ip(port: u16) -> FrontendKey {
    FrontendKey {
        listen: Listen::Address(Ipv4Addr::new(10, 96, 0, 1)),
        port,
        protocol: Protocol::Tcp,
    }
}

fn backends(yaml: &str) -> Vec<Ipv4Addr> {
    let out = translate(&objects(yaml), NODE);
    out.state.frontends[&cluster_ip(80)]
        .endpoints
        .iter()
        .map(|e| e.addr)
        .collect()
}

#[test]
fn rule1_ignored_services_produce_nothing() {
    let external_name = service(
        "a",
        "  type: ExternalName\n  externalName: example.invalid\n",
    );
    assert!(translate(&objects(&external_name), NODE)
        .state
        .frontends
        .is_empty());
    let headless = service("a", "").replace("clusterIP: 10.96.0.1", "clusterIP: None");
    assert!(translate(&objects(&headless), NODE)
        .state
        .frontends
        .is_empty());
    for label in [
        "service.kubernetes.io/service-proxy-name: other",
        "service.kubernetes.io/headless: \"\"",
    ] {
        let labelled = service("a", "").replace(
            "namespace: ns}",
            &format!("namespace: ns, labels: {{{label}}}}}"),
        );
        assert!(
            translate(&objects(&labelled), NODE)
                .state
                .frontends
                .is_empty(),
            "{label}"
        );
    }
}

#[test]
fn rule2_every_address_and_the_node_port_get_a_frontend() {
    let yaml = service(
        "a",
        "  type: LoadBalancer\n  externalIPs: [198.18.50.1, \"2001:db8::1\"]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.100.1}]}}\n",
    )
    .replace("protocol: TCP}", "protocol: TCP, nodePort: 30080}");
    let out = translate(&objects(&yaml), NODE);
    let keys: Vec<String> = out.state.frontends.keys().map(|k| k.to_string()).collect();
    assert_eq!(
        keys,
        vec![
            "TCP 10.96.0.1:80",
            "TCP 198.18.50.1:80",
            "TCP 198.18.100.1:80",
            "TCP *:30080 (NodePort)"
        ]
    );
    assert!(!out.state.frontends[&cluster_ip(80)].external);
    assert!(out.state.frontends.values().filter(|f| f.external).count() == 3);
}

#[test]
fn rule3_slices_are_merged_deduplicated_and_matched_by_port_name() {
    let yaml = service("a", "")
        + &slice(
            "a-1",
            "a",
            &(endpoint("10.244.1.1", "") + &endpoint("10.244.1.2", "")),
        )
        + &slice(
            "a-2",
            "a",
            &(endpoint("10.244.1.2", "") + &endpoint("10.244.1.3", "")),
        )
        + &slice("a-3", "a", &endpoint("10.244.1.9", ""))
            .replace("name: http, port: 8080", "name: metrics, port: 9090");
    let out = translate(&objects(&yaml), NODE);
    let endpoints = &out.state.frontends[&cluster_ip(80)].endpoints;
    assert_eq!(
        endpoints
            .iter()
            .map(|e| (e.addr.octets()[3], e.port))
            .collect::<Vec<_>>(),
        vec![(1, 8080), (2, 8080), (3, 8080)],
        "the metrics port slice does not serve port http"
    );
}

#[test]
fn rule4_terminating_endpoints_serve_only_when_none_is_ready() {
    let terminating = ", conditions: {ready: false, serving: true, terminating: true}";
    let mixed = service("a", "")
        + &slice(
            "a-1",
            "a",
            &(endpoint("10.244.1.1", "") + &endpoint("10.244.1.2", terminating)),
        );
    assert_eq!(backends(&mixed), vec![Ipv4Addr::new(10, 244, 1, 1)]);
    let only_terminating =
        service("a", "") + &slice("a-1", "a", &endpoint("10.244.1.2", terminating));
    assert_eq!(
        backends(&only_terminating),
        vec![Ipv4Addr::new(10, 244, 1, 2)]
    );
    let not_serving = ", conditions: {ready: false, serving: false, terminating: true}";
    let dead = service("a", "") + &slice("a-1", "a", &endpoint("10.244.1.2", not_serving));
    assert!(backends(&dead).is_empty());
    // Missing conditions: ready.
    let bare = service("a", "") + &slice("a-1", "a", &endpoint("10.244.1.5", ""));
    assert_eq!(backends(&bare), vec![Ipv4Addr::new(10, 244, 1, 5)]);
}

#[test]
fn rule5_endpoints_on_other_or_unknown_nodes_are_remote() {
    let yaml = service("a", "")
        + &slice(
            "a-1",
            "a",
            &(endpoint("10.244.1.1", "")
                + &endpoint("10.244.2.1", "").replace("nodeName: node-a", "nodeName: node-b")
                + &endpoint("10.244.3.1", "").replace(", nodeName: node-a", "")),
        );
    let out = translate(&objects(&yaml), NODE);
    let remote: Vec<(u8, bool)> = out.state.frontends[&cluster_ip(80)]
        .endpoints
        .iter()
        .map(|e: &Endpoint| (e.addr.octets()[2], e.remote))
        .collect();
    assert_eq!(remote, vec![(1, false), (2, true), (3, true)]);
}

#[test]
fn rule6_bad_services_are_skipped_and_named_while_others_keep_working() {
    let good = service("good", "").replace("10.96.0.1", "10.96.0.2");
    let cases = [
        (
            "bad address",
            service("bad", "").replace("clusterIP: 10.96.0.1", "clusterIP: 10.96.0.999"),
        ),
        (
            "duplicate ports",
            service("bad", "").replace(
                "ports: [{name: http, port: 80, protocol: TCP}]",
                "ports: [{name: a, port: 80}, {name: b, port: 80}]",
            ),
        ),
        (
            "port out of range",
            service("bad", "").replace("port: 80", "port: 70000"),
        ),
        (
            "unsupported protocol",
            service("bad", "").replace("protocol: TCP", "protocol: SCTP"),
        ),
        (
            "no cluster IP",
            service("bad", "").replace("  clusterIP: 10.96.0.1\n", ""),
        ),
        (
            "duplicate nodePorts",
            service("bad", "").replace(
                "ports: [{name: http, port: 80, protocol: TCP}]",
                "ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]",
            ),
        ),
    ];
    for (what, bad) in cases {
        let out = translate(&objects(&(bad + &good)), NODE);
        assert_eq!(
            out.state.frontends.len(),
            1,
            "{what}: the good service stays"
        );
        let problem = out
            .problems
            .iter()
            .find(|p| p.severity == Severity::Error)
            .unwrap_or_else(|| panic!("{what}: no error reported"));
        assert_eq!(problem.object, "Service ns/bad", "{what}");
    }
}

#[test]
fn rule6_a_slice_with_a_bad_address_is_skipped_and_named() {
    let yaml = service("a", "")
        + &slice("a-1", "a", &endpoint("10.244.1.1", ""))
        + &slice(
            "a-2",
            "a",
            &(endpoint("10.244.1.2", "") + &endpoint("not-an-ip", "")),
        );
    let out = translate(&objects(&yaml), NODE);
    assert_eq!(out.state.frontends[&cluster_ip(80)].endpoints.len(), 1);
    assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
    assert_eq!(out.problems[0].object, "EndpointSlice ns/a-2");
    assert!(out.problems[0].message.contains("not-an-ip"));
}

#[test]
fn a_slice_for_an_unknown_service_and_a_selectorless_service_are_warnings() {
    let selectorless = service("manual", "").replace("  selector: {app: manual}\n", "");
    let yaml = selectorless + &slice("ghost-1", "ghost", &endpoint("10.244.1.1", ""));
    let out = translate(&objects(&yaml), NODE);
    assert_eq!(
        out.state.frontends.len(),
        1,
        "a selectorless service is still programmed"
    );
    let warnings: Vec<String> = out.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        out.problems.iter().all(|p| p.severity == Severity::Warning),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("ns/ghost") && w.contains("no such service")),
        "{warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("Service ns/manual") && w.contains("no selector")),
        "{warnings:?}"
    );
}

#[test]
fn two_services_claiming_one_frontend_keep_the_first() {
    let yaml = service("a", "") + &service("b", "");
    let out = translate(&objects(&yaml), NODE);
    assert_eq!(out.state.frontends[&cluster_ip(80)].service, "ns/a:http");
    assert_eq!(out.problems[0].object, "Service ns/b");
}

fn annotated(annotations: &str) -> String {
    service("a", "").replace(
        "namespace: ns}",
        &format!("namespace: ns, annotations: {{{annotations}}}}}"),
    ) + &slice(
        "a-1",
        "a",
        &(endpoint("10.244.1.1", "") + &endpoint("10.244.1.2", "")),
    )
}

#[test]
fn rule6_the_scheduler_annotation_chooses_per_service_and_a_bad_one_keeps_the_default() {
    let out = translate(
        &objects(&annotated("ebpf-proxy.io/scheduler: maglev")),
        NODE,
    );
    assert_eq!(
        out.state.frontends[&cluster_ip(80)].scheduler,
        crate::model::Scheduler::Maglev
    );
    assert!(out.problems.is_empty(), "{:?}", out.problems);

    let out = translate(
        &objects(&annotated("ebpf-proxy.io/scheduler: fastest")),
        NODE,
    );
    assert_eq!(
        out.state.frontends[&cluster_ip(80)].scheduler,
        crate::model::Scheduler::Rr
    );
    assert_eq!(out.problems[0].object, "Service ns/a");
    assert!(
        out.problems[0]
            .message
            .contains("unknown scheduler \"fastest\""),
        "{}",
        out.problems[0]
    );
}

#[test]
fn rule6_weights_come_from_their_annotation() {
    let out = translate(
        &objects(&annotated(
            "ebpf-proxy.io/weights: \"10.244.1.1=3, 10.244.1.2=0\"",
        )),
        NODE,
    );
    let weights: Vec<u32> = out.state.frontends[&cluster_ip(80)]
        .endpoints
        .iter()
        .map(|e| e.weight)
        .collect();
    assert_eq!(weights, vec![3, 0]);
    let out = translate(
        &objects(&annotated("ebpf-proxy.io/weights: \"10.244.1.1=heavy\"")),
        NODE,
    );
    assert!(
        out.problems[0].message.contains("is not a weight"),
        "{}",
        out.problems[0]
    );
    assert!(out.state.frontends[&cluster_ip(80)]
        .endpoints
        .iter()
        .all(|e| e.weight == 1));
}

/// A LoadBalancer with a NodePort, one local and one remote endpoint.
fn mixed_service(extra_spec: &str) -> String {
    service(
        "a",
        &format!("  type: LoadBalancer\n{extra_spec}status: {{loadBalancer: {{ingress: [{{ip: 198.18.100.1}}]}}}}\n"),
    )
    .replace("protocol: TCP}", "protocol: TCP, nodePort: 30080}")
        + &slice(
            "a-1",
            "a",
            &(endpoint("10.244.1.1", "") + &endpoint("10.244.2.1", "").replace("node-a", "node-b")),
        )
}

fn endpoints_of(out: &super::Translation, key: &FrontendKey) -> Vec<Ipv4Addr> {
    out.state.frontends[key]
        .endpoints
        .iter()
        .map(|e| e.addr)
        .collect()
}

fn node_port(port: u16) -> FrontendKey {
    FrontendKey {
        listen: Listen::NodePort,
        port,
        protocol: Protocol::Tcp,
    }
}

fn load_balancer(port: u16) -> FrontendKey {
    FrontendKey {
        listen: Listen::Address(Ipv4Addr::new(198, 18, 100, 1)),
        port,
        protocol: Protocol::Tcp,
    }
}

#[test]
fn rule8_external_traffic_policy_local_keeps_external_frontends_on_this_node() {
    let local = Ipv4Addr::new(10, 244, 1, 1);
    let remote = Ipv4Addr::new(10, 244, 2, 1);
    let cluster = translate(&objects(&mixed_service("")), NODE);
    assert_eq!(
        endpoints_of(&cluster, &node_port(30080)),
        vec![local, remote]
    );
    assert!(cluster.health_checks.is_empty());

    let yaml = mixed_service("  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n");
    let out = translate(&objects(&yaml), NODE);
    assert_eq!(endpoints_of(&out, &node_port(30080)), vec![local]);
    assert_eq!(endpoints_of(&out, &load_balancer(80)), vec![local]);
    // The ClusterIP still reaches every endpoint.
    assert_eq!(endpoints_of(&out, &cluster_ip(80)), vec![local, remote]);
    let check = &out.health_checks[&32000];
    assert_eq!((check.name.as_str(), check.local_endpoints), ("a", 1));

    // On the other node's view the remote endpoint is the local one; on a node with
    // none, external frontends have no endpoints and the health check reports 0.
    let elsewhere = translate(&objects(&yaml), "node-c");
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
    let out = translate(&objects(&yaml), NODE);
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
    let out = translate(
        &objects(&mixed_service("  internalTrafficPolicy: Local\n")),
        NODE,
    );
    assert_eq!(
        endpoints_of(&out, &cluster_ip(80)),
        vec![Ipv4Addr::new(10, 244, 1, 1)]
    );
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

#[test]
fn rule11_session_affinity_sets_the_timeout() {
    let timeout = |extra: &str| {
        translate(&objects(&service("a", extra)), NODE)
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
    let bad = translate(
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
    let out = translate(&objects(&yaml), NODE);
    let ranges: Vec<String> = out.state.frontends[&load_balancer(80)]
        .source_ranges
        .as_ref()
        .expect("ranges")
        .iter()
        .map(|r| r.to_string())
        .collect();
    // Host bits are cleared; the IPv6 prefix is not ours.
    assert_eq!(
        ranges,
        ["192.0.0.0/16", "198.51.100.0/24", "203.0.113.7/32"]
    );
    assert_eq!(out.state.frontends[&cluster_ip(80)].source_ranges, None);
    assert_eq!(out.state.frontends[&node_port(30080)].source_ranges, None);

    let only_v6 = translate(
        &objects(&mixed_service(
            "  loadBalancerSourceRanges: [\"2001:db8::/64\"]\n",
        )),
        NODE,
    );
    assert_eq!(
        only_v6.state.frontends[&load_balancer(80)].source_ranges,
        Some(Vec::new())
    );
    let invalid = translate(
        &objects(&mixed_service(
            "  loadBalancerSourceRanges: [198.51.100.0/40]\n",
        )),
        NODE,
    );
    assert!(invalid.state.frontends.is_empty());
    assert_eq!(invalid.problems[0].severity, Severity::Error);
}

#[test]
fn rule1_with_a_service_proxy_name_only_services_labelled_with_it_are_handled() {
    let labelled = |value: &str| {
        service("a", "").replace(
            "namespace: ns}",
            &format!(
                "namespace: ns, labels: {{service.kubernetes.io/service-proxy-name: {value}}}}}"
            ),
        )
    };
    let handled = |yaml: &str| {
        let mut tracker = crate::tracker::ChangeTracker::new(NODE)
            .with_service_proxy_name(Some("ebpf-proxy".into()));
        tracker.replace_all(&objects(yaml));
        tracker.flush();
        !tracker.desired().frontends.is_empty()
    };
    assert!(handled(&labelled("ebpf-proxy")));
    assert!(!handled(&labelled("other")));
    assert!(
        !handled(&service("a", "")),
        "unlabelled services stay kube-proxy's"
    );
}

//! The translation rules, one test (or more) per rule, numbered as in the rule list at
//! the top of `translate.rs`; `policies` has rules 8 to 13. Through the public API: a
//! manifests text, translated whole by the change tracker.

mod policies;

use std::net::Ipv4Addr;

use ebpf_proxy::{
    model::{Endpoint, FrontendKey, Listen, Protocol, Severity},
    source::{manifests::parse, Objects},
    tracker::{translate_all, ChangeTracker, Translation},
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
    let out = translate_all(&objects(yaml), NODE);
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
    assert!(translate_all(&objects(&external_name), NODE)
        .state
        .frontends
        .is_empty());
    let headless = service("a", "").replace("clusterIP: 10.96.0.1", "clusterIP: None");
    assert!(translate_all(&objects(&headless), NODE)
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
            translate_all(&objects(&labelled), NODE)
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
    let out = translate_all(&objects(&yaml), NODE);
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
fn rule2_an_ipv6_only_service_gets_no_frontend_not_even_its_node_port() {
    let yaml = service("v6", "  type: NodePort\n  ipFamilies: [IPv6]\n")
        .replace("clusterIP: 10.96.0.1", "clusterIP: fd00::10")
        .replace("protocol: TCP}", "protocol: TCP, nodePort: 30080}");
    let out = translate_all(&objects(&yaml), NODE);
    assert!(out.state.frontends.is_empty(), "{:?}", out.state.frontends);
    assert!(
        out.problems
            .iter()
            .any(|p| p.severity == Severity::Warning && p.message.contains("IPv4")),
        "{:?}",
        out.problems
    );
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
    let out = translate_all(&objects(&yaml), NODE);
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
    let out = translate_all(&objects(&yaml), NODE);
    let remote: Vec<(u8, bool)> = out.state.frontends[&cluster_ip(80)]
        .endpoints
        .iter()
        .map(|e: &Endpoint| (e.addr.octets()[2], e.remote))
        .collect();
    assert_eq!(remote, vec![(1, false), (2, true), (3, true)]);
}

#[test]
fn rule7_bad_services_are_skipped_and_named_while_others_keep_working() {
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
    // Addresses no service can have, as clusterIP, externalIP or LoadBalancer IP.
    let unusable = [
        "127.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.5",
        "169.254.1.1",
    ]
    .into_iter()
    .flat_map(|addr| {
        [
            service("bad", "").replace("clusterIP: 10.96.0.1", &format!("clusterIP: {addr}")),
            service("bad", &format!("  externalIPs: [{addr}]\n")),
            service(
                "bad",
                &format!("status: {{loadBalancer: {{ingress: [{{ip: {addr}}}]}}}}\n"),
            )
            .replace("  selector:", "  type: LoadBalancer\n  selector:"),
        ]
    })
    .map(|bad| ("unusable address", bad));
    for (what, bad) in cases.into_iter().chain(unusable) {
        let out = translate_all(&objects(&(bad.clone() + &good)), NODE);
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
        assert_eq!(problem.object, "Service ns/bad", "{what}: {bad}");
    }
}

#[test]
fn rule7_a_slice_with_a_bad_address_is_skipped_and_named() {
    let yaml = service("a", "")
        + &slice("a-1", "a", &endpoint("10.244.1.1", ""))
        + &slice(
            "a-2",
            "a",
            &(endpoint("10.244.1.2", "") + &endpoint("not-an-ip", "")),
        );
    let out = translate_all(&objects(&yaml), NODE);
    assert_eq!(out.state.frontends[&cluster_ip(80)].endpoints.len(), 1);
    assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
    assert_eq!(out.problems[0].object, "EndpointSlice ns/a-2");
    assert!(out.problems[0].message.contains("not-an-ip"));
}

#[test]
fn rule7_a_slice_for_an_unknown_service_and_a_selectorless_service_are_warnings() {
    let selectorless = service("manual", "").replace("  selector: {app: manual}\n", "");
    let yaml = selectorless + &slice("ghost-1", "ghost", &endpoint("10.244.1.1", ""));
    let out = translate_all(&objects(&yaml), NODE);
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
fn rule7_two_services_claiming_one_frontend_keep_the_first() {
    let yaml = service("a", "") + &service("b", "");
    let out = translate_all(&objects(&yaml), NODE);
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
    let out = translate_all(
        &objects(&annotated("ebpf-proxy.io/scheduler: maglev")),
        NODE,
    );
    assert_eq!(
        out.state.frontends[&cluster_ip(80)].scheduler,
        ebpf_proxy::model::Scheduler::Maglev
    );
    assert!(out.problems.is_empty(), "{:?}", out.problems);

    let out = translate_all(
        &objects(&annotated("ebpf-proxy.io/scheduler: fastest")),
        NODE,
    );
    assert_eq!(
        out.state.frontends[&cluster_ip(80)].scheduler,
        ebpf_proxy::model::Scheduler::Rr
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
    let out = translate_all(
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
    let out = translate_all(
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
        let mut tracker =
            ChangeTracker::new(NODE).with_service_proxy_name(Some("ebpf-proxy".into()));
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

/// A LoadBalancer with a NodePort, one local and one remote endpoint.
pub(super) fn mixed_service(extra_spec: &str) -> String {
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

pub(super) fn endpoints_of(out: &Translation, key: &FrontendKey) -> Vec<Ipv4Addr> {
    out.state.frontends[key]
        .endpoints
        .iter()
        .map(|e| e.addr)
        .collect()
}

pub(super) fn node_port(port: u16) -> FrontendKey {
    FrontendKey {
        listen: Listen::NodePort,
        port,
        protocol: Protocol::Tcp,
    }
}

pub(super) fn load_balancer(port: u16) -> FrontendKey {
    FrontendKey {
        listen: Listen::Address(Ipv4Addr::new(198, 18, 100, 1)),
        port,
        protocol: Protocol::Tcp,
    }
}

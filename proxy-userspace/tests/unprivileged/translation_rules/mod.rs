//! The translation rules, one test (or more) per rule, numbered as in the rule list at
//! the top of `translate.rs`: rules 1 to 5 here, 6 and 7 in `input`, 8 to 13 in
//! `policies`, 14 in `related`. Through the public API: a manifests text, translated whole by the
//! change tracker.

mod input;
mod policies;
mod related;

use std::net::Ipv4Addr;
use testbed::Ipv4Octets as _;

use ebpf_proxy::{
    model::{Endpoint, Family, FrontendKey, Listen, Protocol, Severity},
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
        listen: Listen::Address(Ipv4Addr::new(10, 96, 0, 1).into()),
        port,
        protocol: Protocol::Tcp,
    }
}

fn frontend_names(out: &Translation) -> Vec<String> {
    out.state.frontends.keys().map(|k| k.to_string()).collect()
}

fn backends(yaml: &str) -> Vec<Ipv4Addr> {
    let out = translate_all(&objects(yaml), NODE);
    out.state.frontends[&cluster_ip(80)]
        .endpoints
        .iter()
        .map(|e| Ipv4Addr::from(e.addr.octets()))
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
    assert_eq!(
        frontend_names(&out),
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
fn rule2_a_load_balancer_ip_in_proxy_mode_gets_no_frontend() {
    let yaml = service("a", "  type: LoadBalancer\n")
        + "status: {loadBalancer: {ingress: [{ip: 198.18.100.1, ipMode: Proxy}, {ip: 198.18.100.2, ipMode: VIP}, {ip: 198.18.100.3}]}}\n";
    let out = translate_all(&objects(&yaml), NODE);
    assert_eq!(
        frontend_names(&out),
        vec![
            "TCP 10.96.0.1:80",
            "TCP 198.18.100.2:80",
            "TCP 198.18.100.3:80"
        ]
    );
}

/// A slice of `addressType` `family` (`IPv4`, `IPv6`, `FQDN`).
fn slice_of(family: &str, name: &str, service: &str, endpoints: &str) -> String {
    slice(name, service, endpoints).replace("addressType: IPv4", &format!("addressType: {family}"))
}

/// Each frontend's endpoint addresses, by frontend.
fn endpoints_by_frontend(out: &Translation) -> Vec<(String, Vec<String>)> {
    out.state
        .frontends
        .iter()
        .map(|(key, frontend)| {
            let addrs = frontend
                .endpoints
                .iter()
                .map(|e| e.addr.to_string())
                .collect();
            (key.to_string(), addrs)
        })
        .collect()
}

#[test]
fn rule2_an_ipv6_only_service_is_served_from_its_ipv6_slices_node_port_included() {
    let yaml = service("v6", "  type: NodePort\n  ipFamilies: [IPv6]\n")
        .replace("clusterIP: 10.96.0.1", "clusterIP: \"fd00:96::1\"")
        .replace("protocol: TCP}", "protocol: TCP, nodePort: 30080}")
        + &slice_of("IPv6", "v6-1", "v6", &endpoint("fd00:244::1", ""))
        // An IPv4 slice of an IPv6-only service (a controller's leftover): unused.
        + &slice_of("IPv4", "v6-2", "v6", &endpoint("10.244.1.1", ""));
    let out = translate_all(&objects(&yaml), NODE);
    assert_eq!(
        endpoints_by_frontend(&out),
        vec![
            (
                "TCP [fd00:96::1]:80".to_string(),
                vec!["fd00:244::1".to_string()]
            ),
            (
                "TCP [*]:30080 (NodePort)".to_string(),
                vec!["fd00:244::1".to_string()]
            ),
        ]
    );
}

#[test]
fn rule2_a_dual_stack_service_gets_each_familys_frontends_with_that_familys_endpoints() {
    let yaml = service(
        "ds",
        "  type: LoadBalancer\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIPs: [10.96.0.1, \"fd00:96::1\"]\n  externalIPs: [198.18.50.1, \"2001:db8::50\"]\nstatus: {loadBalancer: {ingress: [{ip: 198.18.100.1}, {ip: \"2001:db8::100\"}]}}\n",
    )
    .replace("protocol: TCP}", "protocol: TCP, nodePort: 30080}")
        + &slice_of("IPv4", "ds-1", "ds", &endpoint("10.244.1.1", ""))
        + &slice_of("IPv6", "ds-2", "ds", &endpoint("fd00:244::1", ""));
    let out = translate_all(&objects(&yaml), NODE);
    let v4 = vec!["10.244.1.1".to_string()];
    let v6 = vec!["fd00:244::1".to_string()];
    assert_eq!(
        endpoints_by_frontend(&out),
        vec![
            ("TCP 10.96.0.1:80".to_string(), v4.clone()),
            ("TCP 198.18.50.1:80".to_string(), v4.clone()),
            ("TCP 198.18.100.1:80".to_string(), v4.clone()),
            ("TCP [2001:db8::50]:80".to_string(), v6.clone()),
            ("TCP [2001:db8::100]:80".to_string(), v6.clone()),
            ("TCP [fd00:96::1]:80".to_string(), v6.clone()),
            ("TCP *:30080 (NodePort)".to_string(), v4),
            ("TCP [*]:30080 (NodePort)".to_string(), v6),
        ]
    );
    assert!(out.problems.is_empty(), "{:?}", out.problems);
}

#[test]
fn rule2_an_external_address_of_a_family_the_service_lacks_is_ignored_and_said() {
    let yaml = service("a", "  externalIPs: [198.18.50.1, \"2001:db8::1\"]\n");
    let out = translate_all(&objects(&yaml), NODE);
    assert_eq!(
        frontend_names(&out),
        vec!["TCP 10.96.0.1:80", "TCP 198.18.50.1:80"]
    );
    assert!(
        out.problems.iter().any(|p| p.severity == Severity::Warning
            && p.message.contains("2001:db8::1")
            && p.message.contains("no IPv6 clusterIP")),
        "{:?}",
        out.problems
    );
}

#[test]
fn rule3_an_fqdn_slice_is_reported_and_ignored() {
    let yaml = service("a", "")
        + &slice("a-1", "a", &endpoint("10.244.1.1", ""))
        + &slice_of("FQDN", "a-2", "a", &endpoint("backend.example.com", ""));
    let out = translate_all(&objects(&yaml), NODE);
    assert_eq!(backends(&yaml), vec![Ipv4Addr::new(10, 244, 1, 1)]);
    assert!(
        out.problems
            .iter()
            .any(|p| p.object.contains("a-2") && p.message.contains("FQDN")),
        "{:?}",
        out.problems
    );
}

#[test]
fn rule3_an_address_of_another_family_than_its_slice_makes_the_slice_unreadable() {
    let yaml = service("a", "") + &slice("a-1", "a", &endpoint("fd00:244::1", ""));
    let out = translate_all(&objects(&yaml), NODE);
    assert!(out.state.frontends[&cluster_ip(80)].endpoints.is_empty());
    assert!(
        out.problems
            .iter()
            .any(|p| p.severity == Severity::Error && p.message.contains("not an IPv4 address")),
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
        .map(|e| Ipv4Addr::from(e.addr.octets()))
        .collect()
}

pub(super) fn node_port(port: u16) -> FrontendKey {
    FrontendKey {
        listen: Listen::NodePort(Family::V4),
        port,
        protocol: Protocol::Tcp,
    }
}

pub(super) fn load_balancer(port: u16) -> FrontendKey {
    FrontendKey {
        listen: Listen::Address(Ipv4Addr::new(198, 18, 100, 1).into()),
        port,
        protocol: Protocol::Tcp,
    }
}

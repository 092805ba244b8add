//! Rules 6 and 7: what annotations choose (scheduler, weights), and bad input, which
//! is reported and skips only its own object.

use super::*;

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
            service("bad", "").replace("protocol: TCP", "protocol: DCCP"),
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
    // `mh`: IPVS's name for Maglev, as kube-proxy's IPVS mode spells it.
    for name in ["maglev", "mh"] {
        let out = translate_all(
            &objects(&annotated(&format!("ebpf-proxy.io/scheduler: {name}"))),
            NODE,
        );
        assert_eq!(
            out.state.frontends[&cluster_ip(80)].scheduler,
            ebpf_proxy::model::Scheduler::Maglev
        );
        assert!(out.problems.is_empty(), "{:?}", out.problems);
    }

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
    // Not a number, or beyond IPVS's 65,535: reported, and every weight stays 1.
    for bad in ["heavy", "65536"] {
        let out = translate_all(
            &objects(&annotated(&format!(
                "ebpf-proxy.io/weights: \"10.244.1.1={bad}\""
            ))),
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
}

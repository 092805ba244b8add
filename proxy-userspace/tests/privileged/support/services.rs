//! The services most end-to-end tests program (a TCP web service, a UDP dns service),
//! and the client-side checks they share.

use std::{net::Ipv4Addr, time::Duration};

use testbed::{eventually, manifests::ServiceDef, netns::Netns, topology::Topology};

pub const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const NODE_PORT: u16 = 30080;

pub fn web(topology: &Topology, pods: &[&str]) -> ServiceDef {
    ServiceDef::new("web", WEB_VIP, "TCP", 80, 8080).with_pods(pods.iter().map(|p| topology.pod(p)))
}

pub fn dns(topology: &Topology, pods: &[&str]) -> ServiceDef {
    ServiceDef::new("dns", DNS_VIP, "UDP", 53, 5353).with_pods(pods.iter().map(|p| topology.pod(p)))
}

/// One UDP request/response with socat from `ns`.
pub fn udp_ask(ns: &Netns, target: &str) -> String {
    // `[address]:port` is IPv6.
    let kind = if target.starts_with('[') {
        "UDP6"
    } else {
        "UDP4"
    };
    let output = ns
        .exec(
            "sh",
            &[
                "-c",
                &format!("echo question | socat -T 3 - {kind}:{target}"),
            ],
        )
        .expect("socat");
    assert!(!output.is_empty(), "no UDP answer from {target}");
    output
}

pub fn wait_until(condition: impl Fn() -> bool, what: &str) {
    let held = eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        condition,
    );
    assert!(held, "timed out waiting: {what}");
}

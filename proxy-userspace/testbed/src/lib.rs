//! Test topologies in network namespaces, for `cargo xtask demo` and the end-to-end
//! tests: a client outside the node, one or two nodes, pods with real servers, and
//! the real agent. Every namespace, link and pin this module creates is removed when
//! its owner drops, also when a test panics.
//!
//! Addresses (all inside the namespaces): the outside network 198.18.0.0/24 (client
//! .2, node .1), the node-to-node link 198.18.1.0/24, pods 10.244.<node>.0/24,
//! ClusterIPs 10.96.0.0/16, LoadBalancer IPs 198.18.100.0/24.

pub mod agent;
pub mod apiserver;
pub mod command;
pub mod frames;
pub mod guest;
pub mod kube_proxy_rules;
pub mod manifests;
pub mod netns;
pub mod servers;
pub mod tftpd;
pub mod topology;

/// Polls `check` every `interval` until it holds or `timeout` passes; whether it held.
pub fn eventually(
    timeout: std::time::Duration,
    interval: std::time::Duration,
    mut check: impl FnMut() -> bool,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(interval);
    }
}

/// The octets of an address that the tests and benches made IPv4 (all of theirs are;
/// `std`'s `IpAddr` has no `octets`, as an address may be IPv6).
pub trait Ipv4Octets {
    fn octets(&self) -> [u8; 4];
}

impl Ipv4Octets for std::net::IpAddr {
    fn octets(&self) -> [u8; 4] {
        match self {
            std::net::IpAddr::V4(v4) => v4.octets(),
            std::net::IpAddr::V6(v6) => panic!("{v6}: the test addresses are IPv4"),
        }
    }
}

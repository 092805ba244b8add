//! The addresses and services of the tests that run one body per address family
//! (`families`, `icmp`).

use std::net::IpAddr;

use ebpf_proxy::model::{Endpoint, Family, FrontendKey, Listen, Protocol};

use super::{datapath::*, packets::*};

/// The addresses of a test of one family.
pub struct Net {
    pub family: Family,
    pub vip: IpAddr,
    pub client: IpAddr,
    pub pods: [IpAddr; 2],
    pub remote_pod: IpAddr,
    pub node: IpAddr,
}

pub fn ip(text: &str) -> IpAddr {
    text.parse().expect("an address")
}

pub fn nets() -> [Net; 2] {
    [
        Net {
            family: Family::V4,
            vip: ip("10.96.0.10"),
            client: ip("198.18.0.2"),
            pods: [ip("10.244.1.2"), ip("10.244.1.3")],
            remote_pod: ip("10.244.2.2"),
            node: NODE_IP.into(),
        },
        Net {
            family: Family::V6,
            vip: ip("fd00:96::10"),
            client: ip("fd00:18::2"),
            pods: [ip("fd00:244:1::2"), ip("fd00:244:1::3")],
            remote_pod: ip("fd00:244:2::2"),
            node: NODE_IP6.into(),
        },
    ]
}

pub fn frontend(addr: IpAddr, port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        listen: Listen::Address(addr),
        port,
        protocol,
    }
}

pub fn endpoint(addr: IpAddr, remote: bool) -> Endpoint {
    Endpoint {
        addr,
        port: 8080,
        remote,
        weight: 1,
    }
}

pub fn protocol_of(l4: L4) -> Protocol {
    match l4 {
        L4::Tcp(_) => Protocol::Tcp,
        L4::Udp => Protocol::Udp,
    }
}

pub const OPENING: [L4; 2] = [L4::Tcp(Tcp::Syn), L4::Udp];

/// A data path with one frontend (`net`'s service address, port 80) whose one backend
/// is the first pod.
pub fn serving(net: &Net, protocol: Protocol) -> TestDatapath {
    let mut dp = TestDatapath::new();
    dp.program(&[(
        frontend(net.vip, 80, protocol),
        vec![endpoint(net.pods[0], false)],
    )]);
    dp
}

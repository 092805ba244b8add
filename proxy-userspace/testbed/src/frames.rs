//! The IP headers the byte-by-byte tests and the benchmark build their frames on
//! (with etherparse, an implementation independent of the data path's).

use std::net::IpAddr;

use etherparse::{IpHeaders, IpNumber, Ipv4Header, Ipv6Header};

/// The fixed IP header of a packet from `src` to `dst`, of their family, with a TTL
/// or hop limit of 64 (the transport a builder adds sets the protocol).
pub fn ip_headers(src: IpAddr, dst: IpAddr) -> IpHeaders {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => IpHeaders::Ipv4(
            Ipv4Header::new(0, 64, IpNumber::TCP, s.octets(), d.octets()).expect("header"),
            Default::default(),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
            Ipv6Header {
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
                ..Default::default()
            },
            Default::default(),
        ),
        _ => panic!("addresses of two families"),
    }
}

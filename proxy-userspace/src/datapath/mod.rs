//! The kernel side as the agent sees it: loading the programs (`loader`), attaching
//! them to interfaces and cgroups (`attach`), following interfaces as they come and go
//! (`interfaces`), typed access to the pinned maps (`tables`) and the model's form in
//! them (`codec`), a predecessor's maps carried over to this layout (`layout`,
//! `widen`), and the conntrack table's size on a node (`sizing`).

pub mod attach;
pub mod codec;
pub mod generation;
pub mod interfaces;
pub mod layout;
pub mod loader;
pub mod lock;
pub mod mmap;
pub mod sizing;
pub mod tables;
pub mod widen;

use proxy_common::{
    map_name, IPV6_ICMP_PROGRAM, IPV6_PROGRAM, IPV6_SCTP_PROGRAM, IPV6_TUNNEL_PROGRAM, SCTP_PROGRAM,
};

/// The eBPF object built by build.rs from proxy-ebpf, for kernels from 5.18 (the
/// legacy one is `generation`'s).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The benchmark's wrapper program (proxy-ebpf's `bench-wrapper`), built with the data
/// path so that the bench needs no eBPF build of its own; the agent binary does not
/// refer to it, so the linker leaves it out.
pub static BENCH_WRAPPER_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench-wrapper"));

/// Program names in the object, as the `#[xdp]`/`#[classifier]`/… functions are named.
pub const PROG_UPLINK: &str = "uplink_ingress";
pub const PROG_POD: &str = "pod_ingress";
pub const PROG_EGRESS: &str = "node_egress";
/// SCTP's own programs, tail-called by the uplink's and the pod interfaces' (see
/// proxy-ebpf's `main`): loaded and put in place here, never attached.
pub const PROG_UPLINK_SCTP: &str = "uplink_ingress_sctp";
pub const PROG_POD_SCTP: &str = "pod_ingress_sctp";
/// IPv6's programs, tail-called likewise (`UPLINK_IPV6`, `POD_IPV6`; ICMPv6's from
/// `UPLINK_IPV6_MORE`, `POD_IPV6_MORE`).
pub const PROG_UPLINK_V6: &str = "uplink_ingress_v6";
pub const PROG_UPLINK_SCTP6: &str = "uplink_ingress_sctp6";
pub const PROG_POD_V6: &str = "pod_ingress_v6";
pub const PROG_POD_SCTP6: &str = "pod_ingress_sctp6";
pub const PROG_UPLINK_ICMP6: &str = "uplink_ingress_icmp6";
pub const PROG_UPLINK_TUNNEL6: &str = "uplink_ingress_tunnel6";
pub const PROG_POD_ICMP6: &str = "pod_ingress_icmp6";

/// IPv6's programs (the current object's only: see `loader`).
pub const IPV6_PROGRAMS: [&str; 7] = [
    PROG_UPLINK_V6,
    PROG_UPLINK_SCTP6,
    PROG_UPLINK_ICMP6,
    PROG_UPLINK_TUNNEL6,
    PROG_POD_V6,
    PROG_POD_SCTP6,
    PROG_POD_ICMP6,
];

/// Every tail-called program: the array it goes in, at which slot.
/// Filled in this order: a program is put in place after those it hands packets to
/// (ICMPv6's and ip6ip6's before IPv6's), so that an upgrade never sends a packet to an
/// empty slot.
pub const TAIL_CALLED: [(&str, &str, u32); 9] = [
    (
        map_name::UPLINK_IPV6_MORE,
        PROG_UPLINK_ICMP6,
        IPV6_ICMP_PROGRAM,
    ),
    (
        map_name::UPLINK_IPV6_MORE,
        PROG_UPLINK_TUNNEL6,
        IPV6_TUNNEL_PROGRAM,
    ),
    (map_name::POD_IPV6_MORE, PROG_POD_ICMP6, IPV6_ICMP_PROGRAM),
    (map_name::UPLINK_TRANSPORTS, PROG_UPLINK_SCTP, SCTP_PROGRAM),
    (map_name::POD_TRANSPORTS, PROG_POD_SCTP, SCTP_PROGRAM),
    (map_name::UPLINK_IPV6, PROG_UPLINK_SCTP6, IPV6_SCTP_PROGRAM),
    (map_name::UPLINK_IPV6, PROG_UPLINK_V6, IPV6_PROGRAM),
    (map_name::POD_IPV6, PROG_POD_SCTP6, IPV6_SCTP_PROGRAM),
    (map_name::POD_IPV6, PROG_POD_V6, IPV6_PROGRAM),
];
pub const PROG_SOCK_HOOKS: [&str; 8] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_getpeername4",
    "sock_connect6",
    "sock_sendmsg6",
    "sock_recvmsg6",
    "sock_getpeername6",
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{generation::Generation, *};

    /// The maps (not the data sections aya also models as maps) and programs of an
    /// object.
    fn contents(object: &[u8]) -> (BTreeSet<String>, BTreeSet<String>) {
        let object = aya_obj::Object::parse(object).expect("a valid eBPF object");
        let maps = object
            .maps
            .keys()
            .filter(|name| !name.starts_with('.'))
            .cloned()
            .collect();
        (maps, object.programs.keys().cloned().collect())
    }

    #[test]
    fn each_object_has_exactly_the_maps_and_programs_the_agent_names() {
        for generation in [Generation::Current, Generation::Legacy] {
            let (maps, programs) = contents(generation.object());
            let named: BTreeSet<String> = map_name::ALL.iter().map(|n| n.to_string()).collect();
            assert_eq!(maps, named, "{generation}");
            let tail_called = TAIL_CALLED.iter().map(|(_, program, _)| program);
            for program in [PROG_UPLINK, PROG_POD, PROG_EGRESS]
                .iter()
                .chain(tail_called)
                .chain(&PROG_SOCK_HOOKS)
            {
                assert!(
                    programs.contains(*program),
                    "{generation}: {program} not in {programs:?}"
                );
            }
        }
    }

    #[test]
    fn the_bench_wrapper_has_exactly_its_named_maps() {
        let (maps, _) = contents(BENCH_WRAPPER_OBJECT);
        let named: BTreeSet<String> = map_name::BENCH.iter().map(|n| n.to_string()).collect();
        assert_eq!(maps, named);
    }
}

//! Counters the data path keeps in per-CPU maps and the agent sums for `list` and metrics.

/// Value of `SERVICE_STATS` (indexed by service id) and `BACKEND_STATS` (by backend id).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
pub struct TrafficStats {
    /// New flows scheduled (IPVS's "Conns").
    pub connections: u64,
    /// Client-to-backend direction.
    pub packets_in: u64,
    pub bytes_in: u64,
    /// Backend-to-client direction (replies).
    pub packets_out: u64,
    pub bytes_out: u64,
}

/// Indexes of `DATAPATH_EVENTS`, one per-CPU counter each: what the data path did
/// that an operator may need to know about. Keep `DATAPATH_EVENT_NAMES` in step.
pub const EV_TRANSLATED: u32 = 0;
/// A TCP segment without SYN found no conntrack entry and was re-hashed to a backend.
pub const EV_CT_MIDFLOW_MISS: u32 = 1;
/// Inserting a conntrack entry failed (map full beyond LRU eviction).
pub const EV_CT_INSERT_FAILED: u32 = 2;
/// Two CPUs created the same flow at once; the later one adopted the first's backend.
pub const EV_CT_RACE_LOST: u32 = 3;
/// A service had no backend: the packet was dropped (as kube-proxy rejects it).
pub const EV_NO_BACKEND: u32 = 4;
/// A packet too short or malformed for its headers; passed untouched.
pub const EV_MALFORMED: u32 = 5;
/// An IP fragment: passed untouched (fragments are not translated in this version).
pub const EV_FRAGMENT: u32 = 6;
/// No free SNAT port after bounded retries: the packet was dropped.
pub const EV_SNAT_EXHAUSTED: u32 = 7;
/// Translated on an uplink and sent from XDP: out of another device / the same one.
pub const EV_XDP_REDIRECT: u32 = 8;
pub const EV_XDP_TX: u32 = 9;
/// Redirect mode, but the FIB had no complete answer (e.g. no neighbour yet): passed.
pub const EV_XDP_FIB_MISS: u32 = 10;
/// A new flow to a LoadBalancer from outside its `loadBalancerSourceRanges`: dropped.
pub const EV_SOURCE_DENIED: u32 = 11;
/// A new flow went to its client's remembered backend (`sessionAffinity: ClientIP`).
pub const EV_AFFINITY_HIT: u32 = 12;
/// An IPIP packet whose inner destination is ours was decapsulated.
pub const EV_DECAPSULATED: u32 = 13;
/// A packet of a `dsr-ipip` flow was encapsulated to its backend.
pub const EV_ENCAPSULATED: u32 = 14;
/// Encapsulation would exceed the path MTU of a DF packet: ICMP fragmentation-needed
/// went back to the client instead.
pub const EV_FRAG_NEEDED: u32 = 15;
/// An ICMP error about a translated flow was translated back for its receiver.
pub const EV_ICMP_TRANSLATED: u32 = 16;
pub const EV_COUNT: u32 = 17;

pub const DATAPATH_EVENT_NAMES: [&str; EV_COUNT as usize] = [
    "translated",
    "ct_midflow_miss",
    "ct_insert_failed",
    "ct_race_lost",
    "no_backend",
    "malformed",
    "fragment",
    "snat_exhausted",
    "xdp_redirect",
    "xdp_tx",
    "xdp_fib_miss",
    "source_denied",
    "affinity_hit",
    "decapsulated",
    "encapsulated",
    "frag_needed",
    "icmp_translated",
];

#[cfg(feature = "user")]
crate::user_pod!(TrafficStats);

/// Value of the bench wrapper's `BENCH_TEMPLATE`: the frame every iteration starts from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchTemplate {
    pub bytes: [u8; 64],
    /// Non-zero: every iteration gets its own source port and address (new flows).
    pub vary_flow: u32,
}

#[cfg(feature = "user")]
crate::user_pod!(BenchTemplate);

//! The names of the pinned maps, defined once. aya names a map after its `#[map]`
//! static in proxy-ebpf (`maps.rs`), so those statics carry exactly these names; the
//! agent opens maps only through these constants. `datapath::loader`'s tests check the
//! built object against `ALL` (and the bench wrapper against `BENCH`), so a renamed or
//! added map cannot drift from this list.

pub const SERVICES: &str = "SERVICES";
pub const BACKEND_SLOTS: &str = "BACKEND_SLOTS";
pub const RR_CURSORS: &str = "RR_CURSORS";
pub const SCHED_TABLES: &str = "SCHED_TABLES";
pub const CONN_COUNTS: &str = "CONN_COUNTS";
pub const NODE_ADDRS: &str = "NODE_ADDRS";
pub const NODE_CONFIG: &str = "NODE_CONFIG";
pub const CONNTRACK: &str = "CONNTRACK";
pub const SERVICE_STATS: &str = "SERVICE_STATS";
pub const BACKEND_STATS: &str = "BACKEND_STATS";
pub const AFFINITY: &str = "AFFINITY";
pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
pub const DATAPATH_EVENTS: &str = "DATAPATH_EVENTS";
pub const SOCK_REVERSE: &str = "SOCK_REVERSE";
pub const SOCK_AFFINITY: &str = "SOCK_AFFINITY";
pub const SERVICE_NAMES: &str = "SERVICE_NAMES";
pub const SERVICE_ADDRS: &str = "SERVICE_ADDRS";
pub const FRAGMENTS: &str = "FRAGMENTS";
pub const EXPECTATIONS: &str = "EXPECTATIONS";
pub const EXPECTED_UNTIL: &str = "EXPECTED_UNTIL";
pub const RELATED_SCRATCH: &str = "RELATED_SCRATCH";
pub const PACKET_SCRATCH: &str = "PACKET_SCRATCH";
pub const ICMP_BUDGET: &str = "ICMP_BUDGET";
pub const UPLINK_TRANSPORTS: &str = "UPLINK_TRANSPORTS";
pub const POD_TRANSPORTS: &str = "POD_TRANSPORTS";
pub const UPLINK_IPV6: &str = "UPLINK_IPV6";
pub const POD_IPV6: &str = "POD_IPV6";
pub const UPLINK_IPV6_MORE: &str = "UPLINK_IPV6_MORE";
pub const POD_IPV6_MORE: &str = "POD_IPV6_MORE";
pub const ADDRESS_FILTER: &str = "ADDRESS_FILTER";

/// Every map of the data path's object.
pub const ALL: [&str; 30] = [
    SERVICES,
    BACKEND_SLOTS,
    RR_CURSORS,
    SCHED_TABLES,
    CONN_COUNTS,
    NODE_ADDRS,
    NODE_CONFIG,
    CONNTRACK,
    SERVICE_STATS,
    BACKEND_STATS,
    AFFINITY,
    SOURCE_RANGES,
    DATAPATH_EVENTS,
    SOCK_REVERSE,
    SOCK_AFFINITY,
    SERVICE_NAMES,
    SERVICE_ADDRS,
    FRAGMENTS,
    EXPECTATIONS,
    EXPECTED_UNTIL,
    RELATED_SCRATCH,
    PACKET_SCRATCH,
    ICMP_BUDGET,
    UPLINK_TRANSPORTS,
    POD_TRANSPORTS,
    UPLINK_IPV6,
    POD_IPV6,
    UPLINK_IPV6_MORE,
    POD_IPV6_MORE,
    ADDRESS_FILTER,
];

/// The bench wrapper's own maps: the program it tail-calls, the frame it restores,
/// its iteration count, and the tables of the key-layout measurement.
pub const BENCH_TARGET: &str = "BENCH_TARGET";
pub const BENCH_TEMPLATE: &str = "BENCH_TEMPLATE";
pub const BENCH_TURN: &str = "BENCH_TURN";
/// The key-layout measurement (`key_layout`): its two tables and how many flows
/// it looks up.
pub const KEYS_WIDE: &str = "KEYS_WIDE";
pub const KEYS_NARROW: &str = "KEYS_NARROW";
pub const KEYS_ACTIVE: &str = "KEYS_ACTIVE";
pub const BENCH: [&str; 6] = [
    BENCH_TARGET,
    BENCH_TEMPLATE,
    BENCH_TURN,
    KEYS_WIDE,
    KEYS_NARROW,
    KEYS_ACTIVE,
];

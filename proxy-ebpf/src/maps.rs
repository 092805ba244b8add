//! Every map of the data path, in one place. All are pinned by name under the agent's
//! bpffs directory, so a restarted agent finds its services and, above all, the
//! conntrack state of established flows where it left them.

use crate::{icmp::IcmpBudget, related::Scratch, scratch::PacketScratch};
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use proxy_common::{
    AddrKey, ADDRESS_FILTER_ENTRIES, AffinityKey, AffinityValue, Backend, BackendSlotKey, ConfigValue, ConnCounts, CtEntry,
    CtKey, ExpectKey, Expectation, FragmentKey, FragmentPorts, NodeAddrFlags, ServiceKey,
    ServiceName, ServiceValue, SockKey, SockNat, SourceRangeKey, TrafficStats, AFFINITY_ENTRIES,
    CONFIG_LEN, CONNTRACK_ENTRIES, IPV6_PROGRAMS, IPV6_MORE_PROGRAMS, EV_CAPACITY, EXPECTATION_ENTRIES, FRAGMENT_ENTRIES,
    MAX_BACKENDS, MAX_SERVICES, SCHED_TABLE_CAPACITY, SOCK_ENTRIES, SOURCE_RANGE_ENTRIES,
};

/// The programs a hook's main program hands a transport's packets to (SCTP's, at
/// `SCTP_PROGRAM`), one array per program type (the kernel allows a tail call only
/// between programs of one type). Pinned like the rest: the kernel empties a program
/// array when its last user reference goes, so an unpinned one would lose SCTP while
/// the agent restarts; the new agent puts its own programs in.
#[map]
pub static UPLINK_TRANSPORTS: ProgramArray = ProgramArray::pinned(1, 0);
#[map]
pub static POD_TRANSPORTS: ProgramArray = ProgramArray::pinned(1, 0);

/// IPv6's programs of each hook (`IPV6_PROGRAM`, `IPV6_SCTP_PROGRAM`): arrays of their
/// own rather than more slots in the ones above, so that no pinned array changes size
/// (a replaced array is emptied when its pin goes, while the previous programs still
/// serve).
#[map]
pub static UPLINK_IPV6: ProgramArray = ProgramArray::pinned(IPV6_PROGRAMS, 0);
#[map]
pub static POD_IPV6: ProgramArray = ProgramArray::pinned(IPV6_PROGRAMS, 0);
/// IPv6's programs added after those two (`IPV6_ICMP_PROGRAM`), with room to spare.
#[map]
pub static UPLINK_IPV6_MORE: ProgramArray = ProgramArray::pinned(IPV6_MORE_PROGRAMS, 0);
#[map]
pub static POD_IPV6_MORE: ProgramArray = ProgramArray::pinned(IPV6_MORE_PROGRAMS, 0);

/// Frontends by (address, port, protocol, scope). Written by the agent.
#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_SERVICES, 0);

/// The n-th backend of each service. Written by the agent: new slots before the
/// service's count grows, stale slots only after it shrinks.
#[map]
pub static BACKEND_SLOTS: HashMap<BackendSlotKey, Backend> = HashMap::pinned(MAX_BACKENDS, 0);

/// Round-robin position per service id, advanced atomically by the data path so that
/// all CPUs share one rotation (exact rr, as IPVS).
#[map]
pub static RR_CURSORS: Array<u64> = Array::pinned(MAX_SERVICES, 0);

/// Lookup tables of the schedulers that have one (wrr schedules, sh/dh buckets,
/// Maglev rings): backend slot numbers, each service in its own extent. Written by the
/// agent through a memory mapping (a Maglev ring is 65,537 entries), a new extent
/// for every change so that a packet never reads a half-written table.
#[map]
pub static SCHED_TABLES: Array<u32> = Array::pinned(SCHED_TABLE_CAPACITY, BPF_F_MMAPABLE);

/// Active and inactive flows per backend id, for the least-connection family and
/// for `list`. Updated atomically by the data path on open and close, and by the
/// agent's conntrack GC (through a memory mapping) on expiry.
#[map]
pub static CONN_COUNTS: Array<ConnCounts> = Array::pinned(MAX_BACKENDS, BPF_F_MMAPABLE);

/// Every address a frontend listens on (ClusterIPs, external and LoadBalancer IPs),
/// with how many frontends use it: traffic to one of them that matches no frontend
/// (another port, another protocol) is refused instead of leaving the node for an
/// address nobody outside owns. Written by the agent.
#[map]
pub static SERVICE_ADDRS: HashMap<AddrKey, u32> = HashMap::pinned(MAX_SERVICES, 0);

/// The address filter's bits and its ready word (`proxy_common::address_filter`).
/// Written by the agent through a memory mapping, a word at a time.
#[map]
pub static ADDRESS_FILTER: Array<u64> = Array::pinned(ADDRESS_FILTER_ENTRIES, BPF_F_MMAPABLE);

/// The ports of datagrams whose later fragments are still to come (`fragments`).
#[map]
pub static FRAGMENTS: LruHashMap<FragmentKey, FragmentPorts> =
    LruHashMap::pinned(FRAGMENT_ENTRIES, 0);

/// Related flows announced and not yet met (`related`), by the tuple their first
/// packet will carry but its source port.
#[map]
pub static EXPECTATIONS: LruHashMap<ExpectKey, Expectation> =
    LruHashMap::pinned(EXPECTATION_ENTRIES, 0);

/// Slot 0: the CLOCK_MONOTONIC_COARSE time until which an expectation may be live
/// (the latest one's expiry). Before it, a packet that opens no tracked flow is
/// looked up in `EXPECTATIONS`; after it (on most nodes: always), it costs the
/// packets that are not ours one array read instead of a hash look-up.
#[map]
pub static EXPECTED_UNTIL: Array<u64> = Array::pinned(1, 0);

/// Per-CPU room where `related` assembles an expectation and the entries of the
/// related flow that meets one (too large for the stack). Holds nothing between packets.
#[map]
pub static RELATED_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::pinned(1, 0);

/// Each CPU's budget for the ICMP errors the data path builds itself (`icmp::within_rate`).
#[map]
pub static ICMP_BUDGET: PerCpuArray<IcmpBudget> = PerCpuArray::pinned(1, 0);

/// This node's own addresses: NodePorts answer on any of them. Written by the agent.
#[map]
pub static NODE_ADDRS: HashMap<AddrKey, NodeAddrFlags> = HashMap::pinned(64, 0);

/// Node-wide settings indexed by `CONFIG_*`. Written by the agent.
#[map]
pub static NODE_CONFIG: Array<ConfigValue> = Array::pinned(CONFIG_LEN, 0);

/// Both directions of every translated flow, shared by all CPUs: the two directions
/// of a flow arrive on different interfaces, so on different CPUs, which rules out
/// Katran's one-LRU-per-CPU design. One common LRU list, not per-CPU lists
/// (`BPF_F_NO_COMMON_LRU`): those split the table into one share per possible CPU
/// and evict within a share, so one CPU's burst of new flows (a SYN flood) evicted
/// the established flows of that CPU while the table was half empty. The common
/// list evicts only when the whole table is nearly full (BENCHMARKS.md measures
/// what its lock costs).
#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(CONNTRACK_ENTRIES, 0);

/// Per-service and per-backend traffic counters, per CPU to avoid shared writes.
#[map]
pub static SERVICE_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_SERVICES, 0);
#[map]
pub static BACKEND_STATS: PerCpuArray<TrafficStats> = PerCpuArray::pinned(MAX_BACKENDS, 0);

/// `sessionAffinity: ClientIP`: each client's backend per service, with the time of
/// its last new flow. Written by the data path; the agent only reads it (listings).
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(AFFINITY_ENTRIES, 0);

/// `loadBalancerSourceRanges` of the services flagged `SVC_F_SOURCE_RANGES`, keyed by
/// (service id, prefix). Written by the agent.
#[map]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> = LpmTrie::pinned(SOURCE_RANGE_ENTRIES, 0);

/// What the data path did, by `EV_*` reason (drops, misses, races, malformed input).
#[map]
pub static DATAPATH_EVENTS: PerCpuArray<u64> = PerCpuArray::pinned(EV_CAPACITY, 0);

/// Socket hooks: the service address a node-local socket believes it talks to, keyed
/// by the backend it really talks to (restored in recvmsg/getpeername).
#[map]
pub static SOCK_REVERSE: LruHashMap<SockKey, SockNat> = LruHashMap::pinned(SOCK_ENTRIES, 0);

/// Socket hooks: the backend an unconnected UDP socket keeps using for a service, so
/// that one socket's datagrams are not spread over backends one by one.
#[map]
pub static SOCK_AFFINITY: LruHashMap<SockKey, SockNat> = LruHashMap::pinned(SOCK_ENTRIES, 0);

/// `namespace/name:port` of each service id. Written and read by the agent and the
/// `list` command only; it lives here so that it is pinned with the rest.
#[map]
pub static SERVICE_NAMES: HashMap<u32, ServiceName> = HashMap::pinned(MAX_SERVICES, 0);

/// Per-CPU room for one program run (`scratch`). Holds nothing between packets.
#[map]
pub static PACKET_SCRATCH: PerCpuArray<PacketScratch> = PerCpuArray::pinned(1, 0);

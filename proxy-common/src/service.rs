//! Service (virtual server) and backend tables, written by the agent, read per packet.
//!
//! A *service* here is one frontend, as in IPVS: one (address, port, protocol), or
//! (any node address, node port, protocol) for NodePorts. One Kubernetes Service with
//! a ClusterIP, a NodePort and a LoadBalancer IP therefore becomes three services.

use crate::Addr;

/// Limits sized for the maps; the agent refuses input beyond them with a clear error.
pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_BACKENDS: u32 = 262_144;
/// Backends of one service the data path will schedule over (IPVS has no such limit;
/// kube-proxy users rarely exceed a few thousand endpoints per port).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 4_096;

/// `ServiceKey::scope` values.
pub const SCOPE_ADDRESS: u8 = 0;
/// A NodePort: `addr` is zero and the packet's destination must be a node address.
pub const SCOPE_NODE_PORT: u8 = 1;
/// The same two reached through an IPIP tunnel (`dsr-ipip`): the frontend as seen
/// by the node a remote entry node chose; its backends are this node's endpoints.
pub const SCOPE_TUNNEL: u8 = 2;
/// A NodePort of any node, reached through an IPIP tunnel.
pub const SCOPE_TUNNEL_NODE_PORT: u8 = 3;
/// The same two as in-cluster clients (pods, the node's own sockets) see an external
/// frontend whose `externalTrafficPolicy: Local` narrowed it to this node's
/// endpoints: every endpoint, as kube-proxy short-circuits in-cluster traffic to a
/// service's external addresses.
pub const SCOPE_IN_CLUSTER: u8 = 4;
pub const SCOPE_IN_CLUSTER_NODE_PORT: u8 = 5;

/// Look-up key of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    /// `Family::number`: a NodePort of each family is its own frontend (its `addr`
    /// is zero), and a service's family is that of all its flows (`AffinityKey`,
    /// `SOURCE_RANGES` and the backends need no family of their own).
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Declares the schedulers once: variant, `ServiceValue::scheduler` number and name.
macro_rules! schedulers {
    ($($(#[$meta:meta])* $variant:ident = $number:literal, $name:literal;)*) => {
        /// How a service picks the backend of a new flow: IPVS's algorithms and a few
        /// beyond. `ServiceValue::scheduler` holds its number; the data path dispatches
        /// on this enum, so a number it does not know is no scheduler at all.
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
        pub enum Scheduler {
            $($(#[$meta])* $variant = $number,)*
        }

        impl Scheduler {
            pub const ALL: &'static [Scheduler] = &[$(Scheduler::$variant,)*];

            /// The scheduler a `ServiceValue::scheduler` number names.
            #[inline(always)]
            pub const fn from_number(number: u8) -> Option<Scheduler> {
                match number {
                    $($number => Some(Scheduler::$variant),)*
                    _ => None,
                }
            }

            /// Its name in annotations, flags and listings (IPVS's where IPVS has it).
            pub const fn name(self) -> &'static str {
                match self {
                    $(Scheduler::$variant => $name,)*
                }
            }
        }
    };
}

schedulers! {
    #[default]
    Rr = 0, "rr";
    Wrr = 1, "wrr";
    Lc = 2, "lc";
    Wlc = 3, "wlc";
    Sh = 4, "sh";
    Dh = 5, "dh";
    Sed = 6, "sed";
    Nq = 7, "nq";
    Maglev = 8, "maglev";
    Random = 9, "random";
}

impl Scheduler {
    /// The `ServiceValue::scheduler` number.
    #[inline(always)]
    pub const fn number(self) -> u8 {
        self as u8
    }
}

impl core::fmt::Display for Scheduler {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// Entries of `SCHED_TABLES`, shared by every service that has a lookup table (wrr
/// schedules, sh/dh buckets, Maglev rings), each in its own extent.
pub const SCHED_TABLE_CAPACITY: u32 = 4 * 1024 * 1024;
/// Buckets of an sh/dh table (IPVS's IP_VS_SH_TAB_SIZE and IP_VS_DH_TAB_SIZE).
pub const HASH_BUCKETS: u32 = 256;
/// Size of a Maglev lookup table: prime, and ≫ backends (Katran's default).
pub const MAGLEV_TABLE_SIZE: u32 = 65_537;
/// Backends the least-connection family examines per new flow, starting at a
/// rotating position: the bound that keeps the per-packet cost fixed.
pub const MAX_LEAST_CONN_SCAN: u32 = 128;
/// The same bound in the data path for kernels 5.10 to 5.17, which have no
/// `bpf_loop`: there the scan is a loop the verifier unrolls, so it stays short.
pub const MAX_LEAST_CONN_SCAN_LEGACY: u32 = 4;

/// `ServiceValue::flags` bits.
/// The frontend is reached from outside the cluster (NodePort, LoadBalancer, external IP).
pub const SVC_F_EXTERNAL: u8 = 1;
/// New flows are accepted only from sources listed in `SOURCE_RANGES` for the service
/// (a LoadBalancer's `loadBalancerSourceRanges`); others are dropped.
pub const SVC_F_SOURCE_RANGES: u8 = 2;
/// `dsr-ipip`: a new external flow to a backend on another node is encapsulated to
/// that backend (IPIP) instead of being translated here; replies bypass this node.
pub const SVC_F_DSR: u8 = 4;
/// A `SCOPE_TUNNEL*` frontend: a decapsulated packet goes to the backend the outer
/// header names when it is one of this frontend's (this node's) endpoints.
pub const SVC_F_TUNNEL: u8 = 8;
/// A traffic policy (`externalTrafficPolicy` or `internalTrafficPolicy: Local`)
/// narrowed the frontend's endpoints to this node's. Only `trace` reads it, to explain
/// a drop: the data path needs nothing but the endpoint set.
pub const SVC_F_LOCAL_ONLY: u8 = 16;
/// An external frontend with a `SCOPE_IN_CLUSTER*` view, which in-cluster clients get.
pub const SVC_F_IN_CLUSTER_VIEW: u8 = 32;

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Index into the per-service tables (`RR_CURSORS`, `SERVICE_STATS`).
    pub id: u32,
    /// Slots `0..backend_count` of `BACKEND_SLOTS` hold this service's backends.
    pub backend_count: u32,
    pub scheduler: u8,
    pub flags: u8,
    /// Which packets of the frontend's flows announce a related flow (`HELPER_*`).
    pub helper: u8,
    pub _pad: u8,
    /// The service's extent of `SCHED_TABLES` (entries are backend slots); a zero
    /// length means the scheduler works on the slots directly.
    pub table_offset: u32,
    pub table_len: u32,
    /// `sessionAffinity: ClientIP`: a client's new flows go to the backend of its
    /// previous one for this many seconds after it (0: no affinity).
    pub affinity_timeout_s: u32,
}

/// Key of `BACKEND_SLOTS`: the n-th backend of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendSlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// `Backend::flags` bits.
/// The backend runs on another node: external traffic to it is masqueraded.
pub const BACKEND_F_REMOTE: u8 = 1;

/// Value of `BACKEND_SLOTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub flags: u8,
    pub _pad: u8,
    /// Index into `BACKEND_STATS` and `CONN_COUNTS`; stable for the (service, endpoint) pair.
    pub id: u32,
    /// Relative weight (IPVS semantics: 0 = quiesced, no new flows).
    pub weight: u32,
}

/// Value of `CONN_COUNTS` (by backend id), as `ipvsadm -Ln` shows them: established
/// flows (and UDP flows), and half-open or closing TCP flows whose conntrack entry
/// has not expired yet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCounts {
    pub active: u64,
    pub inactive: u64,
}

/// Entries of `AFFINITY` (clients remembered per service, LRU).
pub const AFFINITY_ENTRIES: u32 = 131_072;

/// Key of `AFFINITY`: one client of one service (of the service's family).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: Addr,
    pub service_id: u32,
}

/// Value of `AFFINITY`: the backend the client's last new flow went to. The slot and
/// id are checked against `BACKEND_SLOTS` before use, so a backend that left (or
/// moved) is never chosen from memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub slot: u32,
    pub backend_id: u32,
    /// CLOCK_MONOTONIC_COARSE nanoseconds of the client's last new flow.
    pub last_used_ns: u64,
}

/// Prefixes of `SOURCE_RANGES` (all services' `loadBalancerSourceRanges`).
pub const SOURCE_RANGE_ENTRIES: u32 = 16_384;
/// Bits of `SourceRangeKey` before the address: the service id, always matched whole.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

/// The pseudo service ids under which `SOURCE_RANGES` holds the outer sources that
/// may tunnel into `dsr-ipip` frontends (no service has these ids), one per family
/// (`tunnel_peers_id`): IPIP's IPv4 sources, ip6ip6's IPv6 ones.
pub const TUNNEL_PEERS_ID: u32 = u32::MAX;
pub const TUNNEL_PEERS6_ID: u32 = u32::MAX - 3;

#[inline(always)]
pub const fn tunnel_peers_id(family: crate::Family) -> u32 {
    match family {
        crate::Family::V4 => TUNNEL_PEERS_ID,
        crate::Family::V6 => TUNNEL_PEERS6_ID,
    }
}
/// `SOURCE_RANGES` values under the tunnel peers' ids: a configured trusted prefix,
/// or the catch-all `0.0.0.0/0` (`::/0`) written when no list is configured (any
/// source may tunnel, but its inner source cannot be believed).
pub const TUNNEL_PEER_TRUSTED: u8 = 1;
pub const TUNNEL_PEER_UNVERIFIED: u8 = 2;

/// The pseudo service ids under which `SOURCE_RANGES` holds the cluster's pod CIDRs
/// (kube-proxy's `clusterCIDR`), one per family (`cluster_cidrs_id`: the trie's bits
/// do not tell the families apart): a source in them arriving on an uplink counts as
/// in-cluster (a pod whose own node did not translate its traffic).
pub const CLUSTER_CIDRS_ID: u32 = u32::MAX - 1;
pub const CLUSTER_CIDRS6_ID: u32 = u32::MAX - 2;

#[inline(always)]
pub const fn cluster_cidrs_id(family: crate::Family) -> u32 {
    match family {
        crate::Family::V4 => CLUSTER_CIDRS_ID,
        crate::Family::V6 => CLUSTER_CIDRS6_ID,
    }
}
/// The value of its entries (only their presence is read).
pub const CLUSTER_CIDR: u8 = 1;

/// Data of an `SOURCE_RANGES` LPM-trie key: prefix length = 32 + the range's length.
/// The address is of the service's family (of the pseudo ids', the family they are
/// for).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceRangeKey {
    /// Big-endian, so that the trie's bit order runs through it as through the address.
    pub service_id_be: u32,
    pub addr: Addr,
}

/// Index of each value in the `NODE_CONFIG` array.
pub const CONFIG_SNAT_ADDR: u32 = 0;
/// The network namespace (by cookie) whose sockets the socket hooks translate: the
/// agent's. The agent learns it from the hooks themselves (`ConfigValue::netns_probe`).
pub const CONFIG_NETNS_COOKIE: u32 = 1;
/// How the uplink program forwards translated packets: `XDP_FORWARD_*`.
pub const CONFIG_XDP_FORWARD: u32 = 2;
/// Outer source addresses of IPIP packets: `addr.words[0]` the first address
/// (network order), `addr.words[1]` how many follow it (host order, a power of two;
/// 0 = the masquerade address alone). Flows are hashed over the range so that a
/// receiver's RSS spreads them over its CPUs, as Katran does.
pub const CONFIG_TUNNEL_SOURCE: u32 = 3;
/// The node's IPv6 masquerade address (`CONFIG_SNAT_ADDR` is IPv4's); zero when the
/// node has none. The array grew by this slot: a predecessor's pinned array is carried
/// over (`datapath::widen`).
pub const CONFIG_SNAT_ADDR6: u32 = 4;
pub const CONFIG_LEN: u32 = 5;

/// Hand translated packets to the kernel stack (XDP_PASS): works everywhere.
pub const XDP_FORWARD_PASS: u64 = 0;
/// Look up the egress in the FIB and transmit from XDP (XDP_TX on the same device,
/// XDP_REDIRECT to another); falls back to the stack when the neighbour is unknown.
pub const XDP_FORWARD_REDIRECT: u64 = 1;

/// A node-wide setting; one 16-byte slot fits either an address or a u64.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigValue {
    pub addr: Addr,
}

impl ConfigValue {
    pub const fn from_u64(v: u64) -> ConfigValue {
        ConfigValue {
            addr: Addr {
                words: [v as u32, (v >> 32) as u32, 0, 0],
            },
        }
    }
    pub const fn as_u64(&self) -> u64 {
        (self.addr.words[0] as u64) | ((self.addr.words[1] as u64) << 32)
    }

    /// `CONFIG_NETNS_COOKIE` while the agent learns its network namespace's cookie:
    /// the cookie in force (kept meanwhile, so that a restarted agent's node goes on
    /// being served) and a probe, the address and port (network order, as a hook's
    /// `user_ip4` and `user_port` hold them) the agent then connects a socket to. The
    /// socket hook that sees that connect() writes its socket's namespace cookie in
    /// and clears the probe. This needs only the hooks' own `bpf_get_netns_cookie`
    /// (Linux 5.7), where asking the socket (`SO_NETNS_COOKIE`) needs 5.14.
    pub const fn netns_probe(cookie: u64, user_ip4: u32, user_port: u32) -> ConfigValue {
        ConfigValue {
            addr: Addr {
                words: [cookie as u32, (cookie >> 32) as u32, user_ip4, user_port],
            },
        }
    }

    /// The probe of `netns_probe`, `None` once a hook answered it (or none was set).
    pub const fn probe(&self) -> Option<(u32, u32)> {
        match self.addr.words[2] {
            0 => None,
            ip => Some((ip, self.addr.words[3])),
        }
    }
}

/// An address with its family, the key of the address sets `NODE_ADDRS` and
/// `SERVICE_ADDRS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub addr: Addr,
    /// `Family::number`.
    pub family: u8,
    pub _pad: [u8; 3],
}

impl AddrKey {
    #[inline(always)]
    pub const fn new(addr: Addr, family: u8) -> AddrKey {
        AddrKey {
            addr,
            family,
            _pad: [0; 3],
        }
    }
}

/// Value of `NODE_ADDRS`: present means "this node's address".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeAddrFlags {
    pub flags: u32,
}

/// A node address on which NodePorts do not answer (kube-proxy's
/// `nodePortAddresses` leaves it out). The flag says "not", so that entries written
/// before it existed (0) keep answering.
pub const NODE_ADDR_NO_NODE_PORTS: u32 = 1;

impl NodeAddrFlags {
    #[inline(always)]
    pub const fn answers_node_ports(&self) -> bool {
        self.flags & NODE_ADDR_NO_NODE_PORTS == 0
    }
}

#[cfg(feature = "user")]
crate::user_pod!(
    ServiceKey,
    ServiceValue,
    BackendSlotKey,
    Backend,
    ConnCounts,
    ConfigValue,
    AddrKey,
    NodeAddrFlags,
    AffinityKey,
    AffinityValue,
    SourceRangeKey
);

/// Value of `SERVICE_NAMES` (by service id): `namespace/name:port` for listings, so a
/// separate `ebpf-proxy list` process can name what it reads. Agent-only; NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceName {
    pub bytes: [u8; 64],
}

#[cfg(feature = "user")]
crate::user_pod!(ServiceName);

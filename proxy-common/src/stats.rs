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

impl TrafficStats {
    /// Adds another set of counters (another CPU's, another service's).
    pub fn add(&mut self, other: &TrafficStats) {
        self.connections += other.connections;
        self.packets_in += other.packets_in;
        self.bytes_in += other.bytes_in;
        self.packets_out += other.packets_out;
        self.bytes_out += other.bytes_out;
    }
}

/// Declares the data path's events once: an `EV_*` index of `DATAPATH_EVENTS` each,
/// numbered in order, and its name in metrics and listings. New events go at the
/// end, so that a pinned map of a previous version keeps its indexes.
macro_rules! datapath_events {
    ($($(#[doc = $doc:literal])* $constant:ident => $name:literal,)*) => {
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        #[repr(u32)]
        enum EventIndex {
            $($constant,)*
        }
        $(
            $(#[doc = $doc])*
            pub const $constant: u32 = EventIndex::$constant as u32;
        )*
        /// Names of the events, by index.
        pub const DATAPATH_EVENT_NAMES: &[&str] = &[$($name,)*];
    };
}

datapath_events! {
    /// Indexes of `DATAPATH_EVENTS`, one per-CPU counter each: what the data path did
    /// that an operator may need to know about. A packet was translated.
    EV_TRANSLATED => "translated",
    /// A TCP segment without SYN found no conntrack entry and was re-hashed to a backend.
    EV_CT_MIDFLOW_MISS => "ct_midflow_miss",
    /// Inserting a conntrack entry failed (map full beyond LRU eviction).
    EV_CT_INSERT_FAILED => "ct_insert_failed",
    /// Two CPUs created the same flow at once; the later one adopted the first's backend.
    EV_CT_RACE_LOST => "ct_race_lost",
    /// A service had no backend here because a traffic policy `Local` left this node
    /// without one (or it has a scheduler number this data path does not know, rather
    /// than a guess): the packet was dropped.
    EV_NO_BACKEND => "no_backend",
    /// A packet too short or malformed for its headers; passed untouched.
    EV_MALFORMED => "malformed",
    /// A later IP fragment whose datagram's first fragment was not seen here, or
    /// whose flow is not tracked (or a fragment of another protocol), to an address
    /// that is not a service's: passed untouched.
    EV_FRAGMENT => "fragment",
    /// No free port for a new flow's reply tuple after bounded retries (masqueraded:
    /// on the masquerade address; else on the client's address, see
    /// `reply_port_remapped`): the packet was dropped.
    EV_SNAT_EXHAUSTED => "snat_exhausted",
    /// Translated on an uplink and sent from XDP out of another device.
    EV_XDP_REDIRECT => "xdp_redirect",
    /// Translated on an uplink and sent from XDP out of the same device.
    EV_XDP_TX => "xdp_tx",
    /// Redirect mode, but the FIB had no complete answer (e.g. no neighbour yet): passed.
    EV_XDP_FIB_MISS => "xdp_fib_miss",
    /// A new flow to a LoadBalancer from outside its `loadBalancerSourceRanges`: dropped.
    EV_SOURCE_DENIED => "source_denied",
    /// A new flow went to its client's remembered backend (`sessionAffinity: ClientIP`).
    EV_AFFINITY_HIT => "affinity_hit",
    /// An IPIP packet whose inner destination is ours was decapsulated.
    EV_DECAPSULATED => "decapsulated",
    /// A packet of a `dsr-ipip` flow was encapsulated to its backend.
    EV_ENCAPSULATED => "encapsulated",
    /// Encapsulation would exceed the path MTU of a DF packet: ICMP fragmentation-needed
    /// went back to the client instead.
    EV_FRAG_NEEDED => "frag_needed",
    /// An ICMP error about a translated flow was translated back for its receiver.
    EV_ICMP_TRANSLATED => "icmp_translated",
    /// An IPIP packet for a `dsr-ipip` frontend came from an outer source not trusted
    /// to tunnel (not in `--ipip-trusted-sources`, or none configured and the service
    /// has `loadBalancerSourceRanges`, which an unverified inner source would bypass):
    /// dropped.
    EV_TUNNEL_REFUSED => "tunnel_refused",
    /// A new flow to a service without endpoints was refused: ICMP port unreachable
    /// back to the client (a pod or external), or connect()/sendmsg() failed with
    /// ECONNREFUSED (a node-local socket).
    EV_REFUSED => "refused",
    /// A packet announced a related flow (a TFTP request through a frontend with the
    /// TFTP helper): an expectation was recorded (`related`).
    EV_EXPECTED => "expected",
    /// A packet met an expectation: its related flow was opened and translated.
    EV_RELATED => "related",
    /// An expectation or a related flow was not recorded because another flow's
    /// expectation or a tracked flow held its tuple: the packet went untranslated.
    EV_RELATED_CLASH => "related_clash",
    /// An ICMP error the data path would have built (a refusal, fragmentation
    /// needed) was over the ICMP rate (`--icmp-rate`): the packet was dropped
    /// without an answer.
    EV_ICMP_RATE_LIMITED => "icmp_rate_limited",
    /// A later IP fragment addressed to a service address whose datagram is not
    /// tracked here (its first fragment reordered after it, or refused): dropped
    /// rather than let out of the node untranslated.
    EV_FRAGMENT_DROPPED => "fragment_dropped",
    /// A new flow's reply tuple was another live flow's (one client port to two
    /// services with one backend, or two clients behind one masquerade address):
    /// the client's port was remapped for the backend, as netfilter's NAT remaps a
    /// clashing tuple, rather than the other flow's replies taken over.
    EV_REPLY_PORT_REMAPPED => "reply_port_remapped",
    /// A packet out of a tunnel whose flow this node itself tunnels elsewhere (an
    /// entry from when it was the flow's entry node): dropped. Never sent into a
    /// second tunnel (two nodes whose entries point at each other would bounce it for
    /// ever), nor allowed to change the entry (its outer source may be anyone's).
    EV_TUNNEL_LOOP => "tunnel_loop",
}

/// Events defined.
pub const EV_COUNT: u32 = DATAPATH_EVENT_NAMES.len() as u32;
/// Entries of `DATAPATH_EVENTS`: room for events yet to come, so that adding one
/// does not change the map's size (a size change makes a pinned map unusable).
pub const EV_CAPACITY: u32 = 64;
const _: () = assert!(EV_COUNT <= EV_CAPACITY);

#[cfg(feature = "user")]
crate::user_pod!(TrafficStats);

/// The bench's frames: an IPv4 one of 64 bytes, an IPv6 one of 96 (its fixed header
/// is 20 bytes longer, and a TCP header must fit after it), and an ip6ip6 one of 136
/// (an IPv6 frame's packet behind a second IPv6 header).
pub const BENCH_FRAME_V4: usize = 64;
pub const BENCH_FRAME_V6: usize = 96;
pub const BENCH_FRAME_IP6IP6: usize = BENCH_FRAME_V6 + 40;

/// How many of a template's bytes are its frame: by its EtherType and, for IPv6, its
/// next header (41: ip6ip6).
#[inline(always)]
pub fn bench_frame_len(bytes: &[u8; BENCH_FRAME_IP6IP6]) -> usize {
    match (bytes[12..14] == [0x86, 0xdd], bytes[20]) {
        (true, 41) => BENCH_FRAME_IP6IP6,
        (true, _) => BENCH_FRAME_V6,
        (false, _) => BENCH_FRAME_V4,
    }
}

/// Value of the bench wrapper's `BENCH_TEMPLATE`: the frame every iteration starts from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BenchTemplate {
    /// The frame, as many bytes of it as `bench_frame_len` says (the rest unused).
    pub bytes: [u8; BENCH_FRAME_IP6IP6],
    /// Non-zero: every iteration gets its own source port and address (new flows).
    pub vary_flow: u32,
}

#[cfg(feature = "user")]
crate::user_pod!(BenchTemplate);

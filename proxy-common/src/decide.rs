//! The data path's pure decisions, compiled into both the eBPF programs and the
//! agent's `trace`: which table position a new flow takes with each scheduler, how
//! the least-connection family compares backends, when a remembered backend (session
//! affinity) still counts. The kernel feeds them its maps and `trace` the pinned
//! copies of the same maps, so the explanation cannot drift from what the kernel does.
//! Everything here is `#[inline(always)]` and free of map access except through
//! `Tables`, so the kernel's per-packet cost is what it was.

use core::num::{NonZeroU32, NonZeroU64};

use crate::{
    addr_hash, flow_hash, Addr, AffinityValue, Backend, ConnCounts, CtKey, Scheduler, ServiceValue,
    BACKEND_F_REMOTE, MAX_BACKENDS_PER_SERVICE, SVC_F_DSR, SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES,
    SVC_F_TUNNEL, TUNNEL_PEER_TRUSTED,
};

const NS_PER_S: u64 = 1_000_000_000;

/// What a scheduling decision reads besides the service: entries of `SCHED_TABLES`.
pub trait SchedTables {
    fn entry(&self, index: u32) -> Option<u32>;
}

/// The number of backends, as a `NonZeroU32` so that taking a remainder by it
/// compiles without a division-by-zero panic path (which the verifier rejects).
#[inline(always)]
pub fn backend_count(service: &ServiceValue) -> Option<NonZeroU32> {
    let count = service.backend_count;
    if count > MAX_BACKENDS_PER_SERVICE {
        return None;
    }
    NonZeroU32::new(count)
}

/// The length of the service's rotation: its table's, else its slots'.
#[inline(always)]
pub fn cycle_len(service: &ServiceValue) -> u32 {
    if service.table_len != 0 {
        service.table_len
    } else {
        service.backend_count
    }
}

/// The turn a round-robin cursor value stands for. The u64 cursor keeps rr exact
/// across wrap-around of the low word for any length up to 2^32.
#[inline(always)]
pub fn turn(service: &ServiceValue, cursor: u64) -> Option<u32> {
    Some((cursor % NonZeroU64::from(NonZeroU32::new(cycle_len(service))?)) as u32)
}

/// The slot at position `n` (taken modulo the length) of the service's table, or of
/// its slots when it has no table.
#[inline(always)]
pub fn slot_at<T: SchedTables>(tables: &T, service: &ServiceValue, n: u32) -> Option<u32> {
    match NonZeroU32::new(service.table_len) {
        Some(len) => tables.entry(service.table_offset.checked_add(n % len)?),
        None => Some(n % backend_count(service)?),
    }
}

/// How a scheduler finds the table position of a new flow.
pub enum Position {
    /// A hash of the flow (sh: source address, dh: destination, maglev: 5-tuple).
    Hash(u32),
    /// The next turn of the shared rotation (rr, wrr).
    NextTurn,
    /// Any position (random).
    Random,
    /// A scan of the backends' active flows from the next turn (the lc family).
    LeastLoaded,
}

#[inline(always)]
pub fn position(scheduler: Scheduler, key: &CtKey) -> Position {
    match scheduler {
        Scheduler::Sh => Position::Hash(addr_hash(&key.src)),
        Scheduler::Dh => Position::Hash(addr_hash(&key.dst)),
        Scheduler::Maglev => Position::Hash(flow_hash(key)),
        Scheduler::Random => Position::Random,
        Scheduler::Lc | Scheduler::Wlc | Scheduler::Sed | Scheduler::Nq => Position::LeastLoaded,
        Scheduler::Rr | Scheduler::Wrr => Position::NextTurn,
    }
}

/// Where a flow that should exist but has no conntrack entry (a TCP segment without
/// SYN) goes: stateless and deterministic, so every packet of the orphaned flow lands
/// on one backend whichever CPU handles it. The hashing schedulers give their own
/// answer (the original choice unless the backends changed); the others hash the
/// 5-tuple over the slots.
#[inline(always)]
pub fn rehash_slot<T: SchedTables>(
    tables: &T,
    service: &ServiceValue,
    scheduler: Scheduler,
    key: &CtKey,
) -> Option<u32> {
    match position(scheduler, key) {
        Position::Hash(hash) => slot_at(tables, service, hash),
        Position::NextTurn | Position::Random | Position::LeastLoaded => {
            Some(flow_hash(key) % backend_count(service)?)
        }
    }
}

/// Counts above this compare as equal (no backend holds 16 million flows).
const COUNT_CAP: u64 = 1 << 24;

/// The largest endpoint weight, as IPVS's (`ipvsadm -w`: 0 to 65,535).
pub const MAX_WEIGHT: u32 = 65_535;

/// A least-connection scan in progress, with IPVS's overheads (a = active flows,
/// i = inactive ones, w = weight): lc: min 256a + i; wlc: min (256a + i)/w;
/// sed: min (a+1)/w; nq: an idle backend (a = 0) if any, else sed. Inactive flows
/// weigh little but break ties, so that a burst of new (half-open) connections
/// spreads before any of them is established. Ratios are compared by
/// cross-multiplication; backends of weight 0 are quiesced.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LeastLoaded {
    /// `u32::MAX` until a candidate is found.
    pub best_slot: u32,
    pub best_load: u64,
    pub best_weight: u64,
}

impl Default for LeastLoaded {
    fn default() -> Self {
        LeastLoaded::NOTHING_YET
    }
}

impl LeastLoaded {
    /// A scan's state before it considered any backend.
    pub const NOTHING_YET: LeastLoaded = LeastLoaded {
        best_slot: u32::MAX,
        best_load: 0,
        best_weight: 1,
    };

    /// The slot the `index`-th step of a scan starting at `start` examines.
    #[inline(always)]
    pub fn slot(service: &ServiceValue, start: u32, index: u32) -> Option<u32> {
        Some(start.wrapping_add(index) % NonZeroU32::new(service.backend_count)?)
    }

    /// Considers one backend; true when the scan can stop (an idle backend for nq).
    #[inline(always)]
    pub fn consider(&mut self, scheduler: u8, slot: u32, weight: u32, counts: &ConnCounts) -> bool {
        if weight == 0 {
            return false;
        }
        let nq = scheduler == Scheduler::Nq.number();
        if nq && counts.active == 0 {
            self.best_slot = slot;
            return true;
        }
        // Capped so that the cross-multiplication cannot wrap: a load below 2^33
        // times a weight below 2^16.
        let active = counts.active.min(COUNT_CAP);
        let inactive = counts.inactive.min(COUNT_CAP);
        let lc = scheduler == Scheduler::Lc.number();
        let weight = if lc {
            1
        } else {
            u64::from(weight.min(MAX_WEIGHT))
        };
        let load = if lc || scheduler == Scheduler::Wlc.number() {
            active * 256 + inactive
        } else {
            active + 1
        };
        if self.best_slot == u32::MAX || load * self.best_weight < self.best_load * weight {
            self.best_slot = slot;
            self.best_load = load;
            self.best_weight = weight;
        }
        false
    }

    /// The chosen slot, if any backend could be chosen.
    #[inline(always)]
    pub fn chosen(&self) -> Option<u32> {
        (self.best_slot != u32::MAX).then_some(self.best_slot)
    }
}

/// Whether a client's remembered backend (`sessionAffinity: ClientIP`) still binds it
/// at `now`: the timeout counts from the client's last new flow. (The slot must also
/// still hold the remembered backend id; that takes a map read.)
#[inline(always)]
pub fn affinity_fresh(service: &ServiceValue, memo: &AffinityValue, now_ns: u64) -> bool {
    service.affinity_timeout_s != 0
        && now_ns.saturating_sub(memo.last_used_ns)
            <= u64::from(service.affinity_timeout_s) * NS_PER_S
}

/// Where a new flow entered the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// An uplink: a client outside the node.
    External,
    /// A pod interface.
    Pod,
    /// An uplink, encapsulated in IPIP or ip6ip6 by an entry node (`dsr-ipip`).
    Tunnel,
}

/// Kubernetes masquerades exactly two kinds of service traffic: external clients sent
/// to a backend on another node (its reply must come back through us), and a pod
/// that reaches itself through a service (hairpin: it would otherwise answer itself).
/// With `masquerade_all` (kube-proxy's `masqueradeAll`, for CNIs that need it) every
/// pod's flow to a ClusterIP is masqueraded too. A tunnelled flow to this node's own
/// endpoints (`dsr-ipip`) is never masqueraded: its replies go straight to the client.
#[inline(always)]
pub fn masquerades(
    service: &ServiceValue,
    backend: &Backend,
    client: &Addr,
    entry: Entry,
    masquerade_all: bool,
) -> bool {
    let remote = backend.flags & BACKEND_F_REMOTE != 0;
    match entry {
        Entry::External => remote,
        Entry::Tunnel => service.flags & SVC_F_TUNNEL == 0 && remote,
        Entry::Pod => {
            backend.addr == *client || (masquerade_all && service.flags & SVC_F_EXTERNAL == 0)
        }
    }
}

/// `dsr-ipip` at the entry node: a new external flow to a backend on another node is
/// encapsulated to it rather than translated here.
#[inline(always)]
pub fn returns_directly(service: &ServiceValue, backend: &Backend, entry: Entry) -> bool {
    entry == Entry::External
        && service.flags & SVC_F_DSR != 0
        && backend.flags & BACKEND_F_REMOTE != 0
}

/// How far an IPIP packet's outer source is trusted to tunnel into this node (its
/// `SOURCE_RANGES` entry under `TUNNEL_PEERS_ID`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TunnelPeer {
    /// In `--ipip-trusted-sources`: its inner source is what the entry node saw.
    Trusted,
    /// No list is configured: it may tunnel, but its inner source proves nothing.
    Unverified,
    /// A list is configured and does not hold it.
    Refused,
}

impl TunnelPeer {
    /// The peer's standing from its `SOURCE_RANGES` value, if it has one.
    #[inline(always)]
    pub fn from_entry(value: Option<u8>) -> TunnelPeer {
        match value {
            Some(TUNNEL_PEER_TRUSTED) => TunnelPeer::Trusted,
            Some(_) => TunnelPeer::Unverified,
            None => TunnelPeer::Refused,
        }
    }
}

/// Whether a peer may tunnel a packet into a `dsr-ipip` frontend: a trusted one
/// always; an unverified one unless the frontend has `loadBalancerSourceRanges`,
/// which a wrapped packet with an admitted inner source would bypass.
#[inline(always)]
pub fn admits_tunnel(peer: TunnelPeer, service: &ServiceValue) -> bool {
    match peer {
        TunnelPeer::Trusted => true,
        TunnelPeer::Unverified => service.flags & SVC_F_SOURCE_RANGES == 0,
        TunnelPeer::Refused => false,
    }
}

//! Service look-up and backend selection for new flows: IPVS's schedulers (rr, wrr,
//! lc, wlc, sh, dh, sed, nq) and Maglev and random, chosen per service.
//!
//! The decisions themselves (which position, how backends compare) are
//! `proxy_common::decide`'s, shared with `trace`; this module feeds them the maps.
//! Table-driven schedulers read one entry of the service's extent of `SCHED_TABLES`
//! (built by the agent's `scheduling`), so their per-packet cost is fixed. The
//! least-connection family compares backends' active flow counts over at most
//! `MAX_LEAST_CONN_SCAN` backends from a rotating start.

use aya_ebpf::{
    cty::{c_long, c_void},
    helpers::generated::{bpf_get_prandom_u32, bpf_loop},
};
use proxy_common::{
    decide::{self, LeastLoaded, Position, SchedTables},
    Addr, AddrKey, Backend, BackendSlotKey, CtKey, Scheduler, ServiceKey, ServiceValue,
    MAX_LEAST_CONN_SCAN, MAX_LEAST_CONN_SCAN_LEGACY, SCOPE_ADDRESS, SCOPE_IN_CLUSTER, SCOPE_IN_CLUSTER_NODE_PORT,
    SCOPE_NODE_PORT, SCOPE_TUNNEL, SCOPE_TUNNEL_NODE_PORT, SVC_F_IN_CLUSTER_VIEW,
};

use crate::maps::{
    BACKEND_SLOTS, CONN_COUNTS, NODE_ADDRS, RR_CURSORS, SCHED_TABLES, SERVICES, SERVICE_ADDRS,
};

/// The frontend a packet (or a socket's destination) addresses: an exact
/// (address, port, protocol) service, else a NodePort if the address is this node's.
#[inline(always)]
pub fn lookup_service(tuple: &CtKey) -> Option<ServiceValue> {
    lookup_scoped(tuple, (SCOPE_ADDRESS, SCOPE_NODE_PORT), true)
}

/// The frontend a client addresses: as `lookup_service`, except that an external
/// frontend with an in-cluster view (`externalTrafficPolicy: Local`) gives that view,
/// every endpoint, to an in-cluster client (`in_cluster`, asked only then: a pod, the
/// node's own sockets, a source in the cluster CIDRs), as kube-proxy short-circuits
/// in-cluster traffic to external addresses.
#[inline(always)]
pub fn lookup_service_from(
    tuple: &CtKey,
    in_cluster: impl FnOnce() -> bool,
) -> Option<ServiceValue> {
    let service = lookup_service(tuple)?;
    if service.flags & SVC_F_IN_CLUSTER_VIEW == 0 || !in_cluster() {
        return Some(service);
    }
    lookup_scoped(tuple, (SCOPE_IN_CLUSTER, SCOPE_IN_CLUSTER_NODE_PORT), true).or(Some(service))
}

/// The frontend a decapsulated packet addresses: the `dsr-ipip` view of an address
/// or of any node's NodePort, whose backends are this node's endpoints.
#[inline(always)]
pub fn lookup_tunnel_service(tuple: &CtKey) -> Option<ServiceValue> {
    lookup_scoped(tuple, (SCOPE_TUNNEL, SCOPE_TUNNEL_NODE_PORT), false)
}

/// The exact frontend of the tuple's destination in scope `scopes.0`, else the
/// port-only one in `scopes.1` (only for this node's addresses when `node_only`).
#[inline(always)]
fn lookup_scoped(tuple: &CtKey, scopes: (u8, u8), node_only: bool) -> Option<ServiceValue> {
    let mut key = ServiceKey {
        addr: tuple.dst,
        port: tuple.dport,
        proto: tuple.proto,
        scope: scopes.0,
        family: tuple.family,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once; the agent replaces values whole.
    if let Some(svc) = unsafe { SERVICES.get(key) } {
        return Some(*svc);
    }
    if node_only && !answers_node_ports(tuple.family, &tuple.dst) {
        return None;
    }
    key.addr = Addr::ZERO;
    key.scope = scopes.1;
    // SAFETY: as above.
    unsafe { SERVICES.get(key) }.copied()
}

/// State of a search for one backend address among a service's slots. Kept small:
/// it lives in the main program's stack frame, which older verifiers count together
/// with the callback's against the 512-byte limit.
#[repr(C)]
struct Find {
    service_id: u32,
    /// The service's slots: the search stops there.
    count: u32,
    /// `u32::MAX` until found.
    slot: u32,
    /// Of the service's family.
    addr: Addr,
}

/// The service's backend at `addr` (the one an entry node encapsulated to), looked
/// for among at most `MAX_LEAST_CONN_SCAN` slots in a `bpf_loop`.
#[inline(always)]
pub fn backend_at(service: &ServiceValue, addr: Addr) -> Option<Choice> {
    let mut find = Find {
        service_id: service.id,
        count: decide::backend_count(service)?.get(),
        slot: u32::MAX,
        addr,
    };
    // SAFETY: the callback receives a pointer to `find`, which outlives the call.
    unsafe { for_each_slot(find_one, (&raw mut find).cast()) };
    (find.slot != u32::MAX)
        .then(|| backend_in_slot(service, find.slot))
        .flatten()
}

#[inline(never)]
extern "C" fn find_one(index: u64, ctx: *mut c_void) -> c_long {
    // SAFETY: `backend_at` passes a valid `Find`.
    let find = unsafe { &mut *ctx.cast::<Find>() };
    if index >= u64::from(find.count) {
        return 1;
    }
    match slot_backend(find.service_id, index as u32) {
        Some(backend) if backend.addr == find.addr => {
            find.slot = index as u32;
            1
        }
        _ => 0,
    }
}

/// Whether a frontend listens on the address (and it is not also this node's own, whose
/// other ports belong to the node).
#[inline(always)]
pub fn is_service_address(family: u8, addr: &Addr) -> bool {
    // SAFETY: presence checks only.
    unsafe { SERVICE_ADDRS.get(AddrKey::new(*addr, family)) }.is_some()
        && !is_node_address(family, addr)
}

#[inline(always)]
pub fn is_node_address(family: u8, addr: &Addr) -> bool {
    // SAFETY: presence check only.
    unsafe { NODE_ADDRS.get(AddrKey::new(*addr, family)) }.is_some()
}

/// Whether NodePorts answer on the address: a node address not left out by
/// `nodePortAddresses`.
#[inline(always)]
fn answers_node_ports(family: u8, addr: &Addr) -> bool {
    // SAFETY: the value is read once, by copy.
    unsafe { NODE_ADDRS.get(AddrKey::new(*addr, family)) }
        .is_some_and(|flags| flags.answers_node_ports())
}

/// A chosen backend and the slot it was found in.
pub struct Choice {
    pub backend: Backend,
    pub slot: u32,
}

#[inline(always)]
pub fn backend_in_slot(service: &ServiceValue, slot: u32) -> Option<Choice> {
    Some(Choice {
        backend: slot_backend(service.id, slot)?,
        slot,
    })
}

/// The backend in one slot of a service.
#[inline(always)]
fn slot_backend(service_id: u32, slot: u32) -> Option<Backend> {
    // SAFETY: copied out at once.
    unsafe { BACKEND_SLOTS.get(BackendSlotKey { service_id, slot }) }.copied()
}

/// A backend remembered by slot and id (affinity, a socket's memo), if the slot still
/// holds it: one that left, or moved to another slot, is never chosen from memory.
#[inline(always)]
pub fn remembered_backend(service_id: u32, slot: u32, backend_id: u32) -> Option<Choice> {
    let backend = slot_backend(service_id, slot)?;
    (backend.id == backend_id).then_some(Choice { backend, slot })
}

/// `SCHED_TABLES`, as the shared decisions read it.
struct KernelTables;

impl SchedTables for KernelTables {
    #[inline(always)]
    fn entry(&self, index: u32) -> Option<u32> {
        SCHED_TABLES.get(index).copied()
    }
}

/// The backend at position `n` of the service's table (or slots).
#[inline(always)]
fn pick(service: &ServiceValue, n: u32) -> Option<Choice> {
    backend_in_slot(service, decide::slot_at(&KernelTables, service, n)?)
}

/// The next turn of the service's shared rotation.
#[inline(always)]
fn next_turn(service: &ServiceValue) -> Option<u32> {
    let cursor = RR_CURSORS.get_ptr_mut(service.id)?;
    // SAFETY: the pointer is to a live, aligned array slot.
    let cursor = unsafe { crate::accounting::fetch_add(cursor, 1) };
    decide::turn(service, cursor)
}

/// Picks the backend of a new flow with the service's scheduler (`scheduler_of`).
#[inline(always)]
pub fn schedule(service: &ServiceValue, scheduler: Scheduler, key: &CtKey) -> Option<Choice> {
    match decide::position(scheduler, key) {
        Position::Hash(hash) => pick(service, hash),
        // SAFETY: helper without arguments.
        Position::Random => pick(service, unsafe { bpf_get_prandom_u32() }),
        Position::LeastLoaded => least_connections(service),
        // The table (if any) holds the weighted or quiesce-aware order.
        Position::NextTurn => pick(service, next_turn(service)?),
    }
}

/// Picks a backend for a flow that should already exist but has no conntrack entry
/// (`decide::rehash_slot`): the backend either still knows the connection or answers
/// with a reset, so the client learns at once instead of retransmitting.
#[inline(always)]
pub fn rehash(service: &ServiceValue, scheduler: Scheduler, key: &CtKey) -> Option<Choice> {
    backend_in_slot(
        service,
        decide::rehash_slot(&KernelTables, service, scheduler, key)?,
    )
}

/// The service's scheduler. A number this data path does not know (a newer agent's)
/// is none: the flow is refused like one without backends rather than sent by a
/// guess. Decided once, where a new flow starts, not deep in the scheduling.
#[inline(always)]
pub fn scheduler_of(service: &ServiceValue) -> Option<Scheduler> {
    Scheduler::from_number(service.scheduler)
}

/// Calls `step` for the indexes 0.. up to the scan bound, until it returns non-zero
/// (it stops itself past the service's slots): in `bpf_loop`, whose callback the
/// verifier checks once, or on kernels without it (`LEGACY_KERNEL`) in a bounded loop
/// it unrolls, over fewer slots. The bound is a constant: `count.min(bound)` gave the
/// verifier two loop counts (the bound, or 1 to bound - 1), each a state of its own on
/// every path that schedules. What the callback decides on must not be constants the
/// verifier knows (see `UNKNOWN_TO_THE_VERIFIER`).
///
/// # Safety
/// `ctx` is what `step` expects, and outlives the call.
#[inline(always)]
unsafe fn for_each_slot(step: extern "C" fn(u64, *mut c_void) -> c_long, ctx: *mut c_void) {
    if crate::LEGACY_KERNEL {
        let mut index = 0;
        while index < MAX_LEAST_CONN_SCAN_LEGACY && step(u64::from(index), ctx) == 0 {
            index += 1;
        }
    } else {
        // SAFETY: the caller's promise about `ctx`.
        unsafe { bpf_loop(MAX_LEAST_CONN_SCAN, step as *mut c_void, ctx, 0) };
    }
}

/// State of one least-connection scan, shared with the `bpf_loop` callback.
#[repr(C)]
struct Scan {
    service: ServiceValue,
    /// The service's slots: the scan stops there.
    count: u32,
    start: u32,
    load: LeastLoaded,
}

/// Where a least-connection scan starts from: `LeastLoaded::NOTHING_YET`, read from
/// writable global data (a map the verifier does not see into) instead of written as
/// constants. Verifiers before Linux 6.7 check a `bpf_loop` callback once, with the
/// state of its first call: from a constant "nothing chosen yet" they proved the
/// comparison with an earlier choice never taken and removed it as dead code, so that
/// on Debian 12's 6.1 lc chose the last backend it scanned, whatever the counts (the
/// kernel matrix's accounting and trace tests caught it). Never written.
#[no_mangle]
static mut LEAST_LOADED_START: LeastLoaded = LeastLoaded::NOTHING_YET;

/// Zero, read from writable global data as `LEAST_LOADED_START` is, to hide a value
/// from the verifier (`value | zero`). The scheduler number reaches the scan known to
/// be 2 or 3 (lc, wlc) or 6 or 7 (sed, nq) from `decide`'s match; `consider` compares
/// it with constants, which made each range a state of its own, and the scan was
/// verified once per range on every path that schedules (a third of the uplink
/// program's verifier work). Never written.
#[no_mangle]
static mut UNKNOWN_TO_THE_VERIFIER: u8 = 0;

/// The least-connection family (`decide::LeastLoaded`). The scan runs in `bpf_loop`,
/// so the verifier checks one iteration instead of unrolling `MAX_LEAST_CONN_SCAN` of
/// them.
#[inline(always)]
fn least_connections(service: &ServiceValue) -> Option<Choice> {
    let mut scan = Scan {
        service: *service,
        count: decide::backend_count(service)?.get(),
        start: next_turn(service)?,
        // SAFETY: a read of global data nothing writes.
        load: unsafe { core::ptr::read_volatile(&raw const LEAST_LOADED_START) },
    };
    // SAFETY: as above.
    scan.service.scheduler |= unsafe { core::ptr::read_volatile(&raw const UNKNOWN_TO_THE_VERIFIER) };
    // SAFETY: the callback receives a pointer to `scan`, which outlives the call.
    unsafe { for_each_slot(scan_one, (&raw mut scan).cast()) };
    backend_in_slot(service, scan.load.chosen()?)
}

/// One backend of a least-connection scan; returns 1 to stop (an idle backend for nq).
#[inline(never)]
extern "C" fn scan_one(index: u64, ctx: *mut c_void) -> c_long {
    // SAFETY: `least_connections` passes a valid `Scan`.
    let scan = unsafe { &mut *ctx.cast::<Scan>() };
    if index >= u64::from(scan.count) {
        return 1;
    }
    let Some(slot) = LeastLoaded::slot(&scan.service, scan.start, index as u32) else {
        return 1;
    };
    let Some(choice) = backend_in_slot(&scan.service, slot) else {
        return 0;
    };
    let counts = CONN_COUNTS
        .get(choice.backend.id)
        .copied()
        .unwrap_or_default();
    c_long::from(
        scan.load
            .consider(scan.service.scheduler, slot, choice.backend.weight, &counts),
    )
}

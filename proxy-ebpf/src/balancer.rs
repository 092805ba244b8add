//! Service look-up and backend selection for new flows.

use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    num::{NonZeroU32, NonZeroU64},
};

use proxy_common::{
    Addr, Backend, BackendSlotKey, CtKey, ServiceKey, ServiceValue, MAX_BACKENDS_PER_SERVICE,
    SCOPE_ADDRESS, SCOPE_NODE_PORT,
};

use crate::maps::{BACKEND_SLOTS, NODE_ADDRS, RR_CURSORS, SERVICES};

/// The frontend a packet (or a socket's destination) addresses: an exact
/// (address, port, protocol) service, else a NodePort if the address is this node's.
#[inline(always)]
pub fn lookup_service(dst: Addr, dport: u16, proto: u8) -> Option<ServiceValue> {
    let mut key = ServiceKey {
        addr: dst,
        port: dport,
        proto,
        scope: SCOPE_ADDRESS,
    };
    // SAFETY: the value is copied out at once; the agent replaces values whole.
    if let Some(svc) = unsafe { SERVICES.get(key) } {
        return Some(*svc);
    }
    if !is_node_address(&dst) {
        return None;
    }
    key.addr = Addr::ZERO;
    key.scope = SCOPE_NODE_PORT;
    // SAFETY: as above.
    unsafe { SERVICES.get(key) }.copied()
}

#[inline(always)]
pub fn is_node_address(addr: &Addr) -> bool {
    // SAFETY: presence check only.
    unsafe { NODE_ADDRS.get(addr) }.is_some()
}

/// A chosen backend and the slot it was found in.
pub struct Choice {
    pub backend: Backend,
    pub slot: u32,
}

#[inline(always)]
fn backend_in_slot(service: &ServiceValue, slot: u32) -> Option<Choice> {
    let key = BackendSlotKey {
        service_id: service.id,
        slot,
    };
    // SAFETY: copied out at once.
    let backend = unsafe { BACKEND_SLOTS.get(key) }?;
    Some(Choice {
        backend: *backend,
        slot,
    })
}

/// The number of backends, as a `NonZeroU32` so that taking a remainder by it
/// compiles without a division-by-zero panic path (which the verifier rejects).
#[inline(always)]
fn backend_count(service: &ServiceValue) -> Option<NonZeroU32> {
    let count = service.backend_count;
    if count > MAX_BACKENDS_PER_SERVICE {
        return None;
    }
    NonZeroU32::new(count)
}

/// Picks the backend of a new flow with the service's scheduler. Round-robin is the
/// only algorithm in this version: one shared atomic cursor per service, so the
/// rotation is exact across CPUs, as with IPVS's rr.
#[inline(always)]
pub fn schedule(service: &ServiceValue) -> Option<Choice> {
    let count = backend_count(service)?;
    let cursor = RR_CURSORS.get_ptr_mut(service.id)?;
    // An atomic fetch-and-add (BPF_ATOMIC | BPF_FETCH): core's atomic types lack
    // read-modify-write methods on the BPF target, the intrinsic compiles to the insn.
    // SeqCst, not Relaxed: with Relaxed, LLVM 22 emits the non-fetching `lock add`
    // and then reads the old value from the operand register (seen in objdump).
    // SAFETY: the pointer is to a live, aligned array slot.
    let turn = unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(cursor, 1) };
    backend_in_slot(service, (turn % NonZeroU64::from(count)) as u32)
}

/// Picks a backend for a flow that should already exist but has no conntrack entry
/// (a TCP segment without SYN). Stateless and deterministic: every packet of the
/// orphaned flow lands on the same backend whichever CPU handles it. The backend
/// either still knows the connection (it was the original choice) or answers with a
/// reset, so the client learns at once instead of retransmitting into a void.
#[inline(always)]
pub fn rehash(service: &ServiceValue, key: &CtKey) -> Option<Choice> {
    let count = backend_count(service)?;
    backend_in_slot(service, flow_hash(key) % count)
}

/// A cheap, well-mixed hash of a 5-tuple (murmur3's finaliser over the words).
#[inline(always)]
pub fn flow_hash(key: &CtKey) -> u32 {
    let mut h = key.src.words[0]
        ^ key.dst.words[0].rotate_left(7)
        ^ ((u32::from(key.sport) << 16) | u32::from(key.dport))
        ^ u32::from(key.proto).rotate_left(24);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

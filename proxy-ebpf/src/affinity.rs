//! `sessionAffinity: ClientIP`, held in the kernel: a client's new flows to a service
//! go to the backend its previous new flow went to, until the service's timeout has
//! passed since that flow (kube-proxy's iptables `recent` rule sets the same clock on
//! every new connection). The memory is checked against the current backend slots,
//! so a backend that left is never chosen from it.

use aya_ebpf::bindings::BPF_ANY;
use proxy_common::{decide, Addr, AffinityKey, AffinityValue, ServiceValue, EV_AFFINITY_HIT};

use crate::{
    balancer::{self, Choice},
    counters,
    maps::AFFINITY,
};

#[inline(always)]
fn key(service: &ServiceValue, client: &Addr) -> AffinityKey {
    AffinityKey {
        client: *client,
        service_id: service.id,
    }
}

/// The backend the client is bound to, if the service has affinity and the binding
/// is still fresh and valid.
#[inline(always)]
pub fn recall(service: &ServiceValue, client: &Addr, now: u64) -> Option<Choice> {
    if service.affinity_timeout_s == 0 {
        return None;
    }
    // SAFETY: copied out at once.
    let memo = unsafe { AFFINITY.get(key(service, client)) }.copied()?;
    if !decide::affinity_fresh(service, &memo, now) {
        return None;
    }
    let choice = balancer::remembered_backend(service.id, memo.slot, memo.backend_id)?;
    counters::event(EV_AFFINITY_HIT);
    Some(choice)
}

/// Binds (or re-binds, restarting the timeout) the client to the backend of its new flow.
#[inline(always)]
pub fn remember(service: &ServiceValue, client: &Addr, choice: &Choice, now: u64) {
    if service.affinity_timeout_s == 0 {
        return;
    }
    let memo = AffinityValue {
        slot: choice.slot,
        backend_id: choice.backend.id,
        last_used_ns: now,
    };
    // A full LRU map evicts its oldest client, which then simply starts afresh.
    let _ = AFFINITY.insert(key(service, client), memo, u64::from(BPF_ANY));
}

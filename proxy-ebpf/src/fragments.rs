//! IPv4 fragments of translated flows (see `proxy_common::fragments`): a datagram's
//! first fragment leaves its ports here for the later ones, which `translate` then
//! follows through conntrack like any packet of the flow.

use aya_ebpf::bindings::BPF_ANY;
use proxy_common::{FragmentKey, FragmentPorts};

use crate::{maps::FRAGMENTS, parse::Flow};

/// Remembers the ports of a first fragment's datagram (before translation: the later
/// fragments carry the same untranslated addresses). A failed insert leaves the later
/// fragments untranslated (counted as `fragment`).
#[inline(always)]
pub fn remember(flow: &Flow) {
    let key = FragmentKey {
        src: flow.key.src,
        dst: flow.key.dst,
        id: flow.ip_id,
        proto: flow.key.proto,
        family: flow.key.family,
    };
    let ports = FragmentPorts {
        sport: flow.key.sport,
        dport: flow.key.dport,
    };
    let _ = FRAGMENTS.insert(key, ports, u64::from(BPF_ANY));
}

#[inline(always)]
pub fn ports_of(key: &FragmentKey) -> Option<FragmentPorts> {
    // SAFETY: copied out at once.
    unsafe { FRAGMENTS.get(key) }.copied()
}

//! Whether a packet can be ours at all (`proxy_common::address_filter`): tested before
//! conntrack, so that traffic that is not ours pays two array reads, not a 40-byte
//! conntrack look-up and the frontends' look-ups.

use proxy_common::{
    address_filter_bit, address_filter_word, Addr, CtKey, ADDRESS_FILTER_READY,
};

use crate::maps::ADDRESS_FILTER;

/// False only when neither the destination (a frontend or node address) nor the
/// source (a backend answering) is in the filter, and the agent has filled it.
#[inline(always)]
pub fn may_be_ours(key: &CtKey) -> bool {
    contains(&key.dst) || contains(&key.src) || !ready()
}

#[inline(always)]
fn contains(addr: &Addr) -> bool {
    let (word, mask) = address_filter_word(address_filter_bit(addr));
    ADDRESS_FILTER.get(word).is_some_and(|bits| bits & mask != 0)
}

#[inline(always)]
fn ready() -> bool {
    ADDRESS_FILTER
        .get(ADDRESS_FILTER_READY)
        .is_some_and(|ready| *ready != 0)
}

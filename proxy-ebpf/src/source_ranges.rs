//! `loadBalancerSourceRanges`: a LoadBalancer frontend that lists ranges accepts new
//! flows only from them (the rest is dropped, as kube-proxy's firewall chain does).

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{Addr, ServiceValue, SourceRangeKey, SOURCE_RANGE_ID_BITS, SVC_F_SOURCE_RANGES};

use crate::maps::SOURCE_RANGES;

/// Whether a new flow from `src` may use the service.
#[inline(always)]
pub fn admits(service: &ServiceValue, src: &Addr) -> bool {
    if service.flags & SVC_F_SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SOURCE_RANGE_ID_BITS + 32,
        SourceRangeKey {
            service_id_be: service.id.to_be(),
            addr: src.v4_be(),
        },
    );
    SOURCE_RANGES.get(key).is_some()
}

//! `loadBalancerSourceRanges`: a LoadBalancer frontend that lists ranges accepts new
//! flows only from them (the rest is dropped, as kube-proxy's firewall chain does).

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    cluster_cidrs_id, Addr, Family, ServiceValue, SourceRangeKey, SOURCE_RANGE_ID_BITS,
    SVC_F_SOURCE_RANGES,
};

use crate::maps::SOURCE_RANGES;

/// Whether `src` lies in the cluster's pod CIDRs (`--cluster-cidr`).
#[inline(always)]
pub fn in_cluster_cidrs(family: Family, src: &Addr) -> bool {
    SOURCE_RANGES
        .get(host_key(cluster_cidrs_id(family), family, src))
        .is_some()
}

/// Whether a new flow from `src` (of the service's family) may use the service.
#[inline(always)]
pub fn admits(service: &ServiceValue, family: Family, src: &Addr) -> bool {
    if service.flags & SVC_F_SOURCE_RANGES == 0 {
        return true;
    }
    SOURCE_RANGES
        .get(host_key(service.id, family, src))
        .is_some()
}

/// The `SOURCE_RANGES` key that finds the longest prefix of `id`'s holding `addr`.
#[inline(always)]
pub fn host_key(id: u32, family: Family, addr: &Addr) -> Key<SourceRangeKey> {
    Key::new(
        SOURCE_RANGE_ID_BITS + u32::from(family.bits()),
        SourceRangeKey {
            service_id_be: id.to_be(),
            addr: *addr,
        },
    )
}

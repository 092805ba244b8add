//! Conntrack garbage collection. The data path expires entries lazily (an idle entry
//! is replaced when its tuple is seen again) and the LRU evicts when full; neither
//! happens for a flow that simply stops. The agent therefore removes entries idle past
//! their timeout and stops counting their flows in `CONN_COUNTS`, which is what keeps
//! the least-connection schedulers' counts from drifting (UDP flows never close).

use anyhow::Result;
use proxy_common::{ct_timeout_ns, ConnCounts, CtKey, ACCT_ACTIVE, ACCT_INACTIVE, CT_F_REPLY};

use crate::datapath::{mmap::MappedArray, tables::Tables};

/// CLOCK_MONOTONIC_COARSE, the data path's clock (`bpf_ktime_get_coarse_ns`).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub scanned: usize,
    pub expired: usize,
}

/// One pass over `CONNTRACK`.
///
/// Race, written down: a packet of a flow can arrive while its expired entry is being
/// removed here. The data path then also sees the entry as stale and retires it
/// itself; its exchange of `accounting` and our read of it can both see the flow as
/// counted, so it may be uncounted twice. That takes a packet arriving after the full
/// idle timeout, in the microseconds between our read and delete.
pub fn collect(tables: &mut Tables, counts: &MappedArray<ConnCounts>) -> Result<GcReport> {
    let now = coarse_now_ns();
    let mut report = GcReport::default();
    let expired: Vec<CtKey> = tables
        .conntrack
        .iter()
        .filter_map(Result::ok)
        .inspect(|_| report.scanned += 1)
        .filter(|(key, entry)| {
            now.saturating_sub(entry.last_seen_ns) > ct_timeout_ns(key.proto, entry.state)
        })
        .map(|(key, _)| key)
        .collect();
    for key in expired {
        let Ok(entry) = tables.conntrack.get(&key, 0) else {
            continue;
        };
        if now.saturating_sub(entry.last_seen_ns) <= ct_timeout_ns(key.proto, entry.state) {
            continue; // refreshed since the scan
        }
        if tables.conntrack.remove(&key).is_err() {
            continue;
        }
        report.expired += 1;
        if entry.flags & CT_F_REPLY == 0 {
            match entry.accounting {
                ACCT_ACTIVE => counts.forget_flow(entry.backend_id, false),
                ACCT_INACTIVE => counts.forget_flow(entry.backend_id, true),
                _ => {}
            }
        }
    }
    Ok(report)
}

//! Keeping the connection counts (`CONN_COUNTS`) true to the conntrack table.
//!
//! The data path counts every transition exactly once, but some flows leave without
//! one: an entry the LRU evicts, a flow uncounted twice in the GC race that
//! `conntrack::collect` describes, a counter a crash left behind. Each conntrack pass
//! therefore also counts what the table itself says, and corrects a counter that
//! disagrees. The pass is not atomic (flows open and close while it reads), so a
//! counter is corrected only when it did not move during the pass and when two
//! consecutive passes found the same difference: a flow in flight shows up as a
//! difference once, a drift every time. Corrections are atomic additions, so
//! concurrent changes by the data path are never lost.

use std::collections::BTreeMap;

use anyhow::Result;
use proxy_common::ConnCounts;

use crate::datapath::mmap::MappedArray;

/// (active, inactive) to add to one backend id's counters.
type Difference = (i64, i64);

#[derive(Debug, Default)]
pub struct Reconciler {
    /// Differences found by the last pass, by backend id.
    suspected: BTreeMap<u32, Difference>,
}

impl Reconciler {
    /// `before`: the counters as they were when the pass started; `table`: what the
    /// pass counted. Returns how many counters were corrected.
    pub fn reconcile(
        &mut self,
        counts: &MappedArray<ConnCounts>,
        before: &[ConnCounts],
        table: &BTreeMap<u32, ConnCounts>,
    ) -> Result<usize> {
        let after = counts.read(0, before.len())?;
        let mut suspected = BTreeMap::new();
        let mut corrected = 0;
        for (id, (then, now)) in before.iter().zip(&after).enumerate() {
            let id = id as u32;
            let want = table.get(&id).copied().unwrap_or_default();
            if then != now || want == *now {
                continue; // moving, or right
            }
            let difference = (
                want.active as i64 - now.active as i64,
                want.inactive as i64 - now.inactive as i64,
            );
            if self.suspected.get(&id) == Some(&difference) {
                counts.adjust(id, difference.0, difference.1);
                corrected += 1;
            } else {
                suspected.insert(id, difference);
            }
        }
        self.suspected = suspected;
        Ok(corrected)
    }
}

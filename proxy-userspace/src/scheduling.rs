//! The userspace half of the schedulers: the lookup tables the data path reads for
//! wrr, random (weighted), sh, dh and Maglev, and the allocation of their extents in
//! the shared `SCHED_TABLES` map. Table entries are backend slot numbers.
//!
//! Where we differ from IPVS, and why:
//! - weight 0 takes an endpoint out of scheduling altogether (IPVS keeps it listed);
//!   its established flows continue through conntrack either way;
//! - sh/dh buckets are kept across backend changes: a bucket moves only when its
//!   backend leaves or is over its weighted share (IPVS refills its 256 buckets in
//!   order, moving most of them), so unchanged backends keep their clients;
//! - wrr schedules longer than `MAX_SCHEDULE` entries use proportionally scaled weights.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use proxy_common::{Addr, Backend, HASH_BUCKETS, MAGLEV_TABLE_SIZE, SCHED_TABLE_CAPACITY};

use crate::model::Scheduler;

/// Longest wrr or weighted-random table.
pub const MAX_SCHEDULE: u64 = 65_536;

fn identity(backend: &Backend) -> (Addr, u16) {
    (backend.addr, backend.port)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Weights divided by their gcd, and scaled down when their sum exceeds `MAX_SCHEDULE`.
fn reduced_weights(slots: &[Backend]) -> Vec<u64> {
    let weights: Vec<u64> = slots.iter().map(|b| u64::from(b.weight.max(1))).collect();
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut reduced: Vec<u64> = weights.iter().map(|w| w / g).collect();
    let sum: u64 = reduced.iter().sum();
    if sum > MAX_SCHEDULE {
        reduced = reduced
            .iter()
            .map(|w| (w * MAX_SCHEDULE / sum).max(1))
            .collect();
    }
    reduced
}

/// The table a scheduler needs for these slots, or None when it works on the slots
/// directly. `previous` (slots and table of the last version) keeps sh/dh stable.
pub fn table(
    scheduler: Scheduler,
    slots: &[Backend],
    previous: (&[Backend], &[u32]),
) -> Option<Vec<u32>> {
    let uniform = slots.windows(2).all(|w| w[0].weight == w[1].weight);
    match scheduler {
        _ if slots.is_empty() => None,
        Scheduler::Wrr if !uniform => Some(wrr_schedule(&reduced_weights(slots))),
        Scheduler::Random if !uniform => Some(
            reduced_weights(slots)
                .iter()
                .enumerate()
                .flat_map(|(slot, w)| std::iter::repeat_n(slot as u32, *w as usize))
                .collect(),
        ),
        Scheduler::Sh | Scheduler::Dh => Some(hash_buckets(slots, previous)),
        Scheduler::Maglev => Some(maglev_ring(slots, MAGLEV_TABLE_SIZE as usize)),
        _ => None,
    }
}

/// IPVS's interleaved weighted round-robin (ip_vs_wrr.c), one full cycle: each pass
/// lowers the current weight by the gcd and picks every server at least that heavy.
fn wrr_schedule(weights: &[u64]) -> Vec<u32> {
    let max = weights.iter().copied().max().unwrap_or(0);
    let length: u64 = weights.iter().sum();
    let mut schedule = Vec::with_capacity(length as usize);
    let mut current = max;
    // Weights are already divided by their gcd, so each pass lowers by one.
    while schedule.len() < length as usize {
        for (slot, weight) in weights.iter().enumerate() {
            if *weight >= current {
                schedule.push(slot as u32);
            }
        }
        current = if current <= 1 { max } else { current - 1 };
    }
    schedule
}

/// Each backend's share of `total` buckets by weight (largest remainders first).
fn quotas(slots: &[Backend], total: u64) -> Vec<u64> {
    let weights: Vec<u64> = slots.iter().map(|b| u64::from(b.weight.max(1))).collect();
    let sum: u64 = weights.iter().sum();
    let mut quotas: Vec<u64> = weights.iter().map(|w| w * total / sum).collect();
    let mut order: Vec<usize> = (0..slots.len()).collect();
    order.sort_by_key(|i| std::cmp::Reverse((weights[*i] * total) % sum));
    let mut missing = total - quotas.iter().sum::<u64>();
    for i in order {
        if missing == 0 {
            break;
        }
        quotas[i] += 1;
        missing -= 1;
    }
    quotas
}

/// The 256 sh/dh buckets: each keeps its previous backend while that backend stays
/// within its share; the freed buckets go, in order, to backends below theirs.
fn hash_buckets(slots: &[Backend], previous: (&[Backend], &[u32])) -> Vec<u32> {
    let total = u64::from(HASH_BUCKETS);
    let quota = quotas(slots, total);
    let slot_of: BTreeMap<(Addr, u16), usize> = slots
        .iter()
        .enumerate()
        .map(|(i, b)| (identity(b), i))
        .collect();
    let (old_slots, old_table) = previous;
    let mut owner: Vec<Option<usize>> = vec![None; HASH_BUCKETS as usize];
    let mut count = vec![0u64; slots.len()];
    if old_table.len() == owner.len() {
        for (bucket, old) in old_table.iter().enumerate() {
            let kept = old_slots
                .get(*old as usize)
                .and_then(|b| slot_of.get(&identity(b)));
            if let Some(&slot) = kept {
                if count[slot] < quota[slot] {
                    owner[bucket] = Some(slot);
                    count[slot] += 1;
                }
            }
        }
    }
    let mut next = 0;
    for bucket in owner.iter_mut().filter(|o| o.is_none()) {
        while count[next] >= quota[next] {
            next = (next + 1) % slots.len();
        }
        *bucket = Some(next);
        count[next] += 1;
        next = (next + 1) % slots.len();
    }
    owner.into_iter().map(|o| o.unwrap_or(0) as u32).collect()
}

/// FNV-1a over an endpoint's address and port, with a seed: Maglev's two hashes.
/// An IPv4 address is hashed as its four bytes (as before IPv6: the tables of IPv4
/// services stay what they were), an IPv6 address as its sixteen (its first four
/// alone are its prefix's, the same for a whole subnet of backends).
fn endpoint_hash(backend: &Backend, seed: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    let octets = backend.addr.v6_octets();
    let significant = if octets[4..].iter().all(|b| *b == 0) {
        4
    } else {
        16
    };
    let bytes = octets[..significant]
        .iter()
        .copied()
        .chain(backend.port.to_ne_bytes());
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The Maglev lookup table (Eisenbud et al., NSDI 2016): each backend walks its own
/// permutation of the table, taking turns (as many per round as its reduced weight)
/// to claim the next free entry. Permutations depend only on the backend's identity,
/// so a change moves few entries of unchanged backends.
fn maglev_ring(slots: &[Backend], size: usize) -> Vec<u32> {
    let permutations: Vec<(u64, u64)> = slots
        .iter()
        .map(|b| {
            let offset = endpoint_hash(b, 0x5eed_0001) % size as u64;
            let skip = endpoint_hash(b, 0x5eed_0002) % (size as u64 - 1) + 1;
            (offset, skip)
        })
        .collect();
    let weights = reduced_weights(slots);
    let mut next = vec![0u64; slots.len()];
    let mut ring = vec![u32::MAX; size];
    let mut filled = 0;
    'rounds: loop {
        for (slot, (offset, skip)) in permutations.iter().enumerate() {
            for _turn in 0..weights[slot] {
                let mut entry = ((offset + next[slot] * skip) % size as u64) as usize;
                while ring[entry] != u32::MAX {
                    next[slot] += 1;
                    entry = ((offset + next[slot] * skip) % size as u64) as usize;
                }
                ring[entry] = slot as u32;
                next[slot] += 1;
                filled += 1;
                if filled == size {
                    break 'rounds;
                }
            }
        }
    }
    ring
}

/// First-fit allocation of table extents in `SCHED_TABLES`.
#[derive(Debug)]
pub struct TableSpace {
    /// Free extents: offset -> length, coalesced.
    free: BTreeMap<u32, u32>,
}

impl TableSpace {
    /// The whole map, minus the extents in use.
    pub fn with_used(used: impl IntoIterator<Item = (u32, u32)>) -> TableSpace {
        let mut space = TableSpace {
            free: BTreeMap::from([(0, SCHED_TABLE_CAPACITY)]),
        };
        for (offset, len) in used {
            space.take(offset, len);
        }
        space
    }

    fn take(&mut self, offset: u32, len: u32) {
        let Some((&start, &free_len)) = self.free.range(..=offset).next_back() else {
            return;
        };
        if offset + len > start + free_len {
            return;
        }
        self.free.remove(&start);
        if offset > start {
            self.free.insert(start, offset - start);
        }
        if start + free_len > offset + len {
            self.free
                .insert(offset + len, start + free_len - offset - len);
        }
    }

    pub fn allocate(&mut self, len: u32) -> Result<u32> {
        let Some((&offset, _)) = self.free.iter().find(|(_, free)| **free >= len) else {
            bail!("no room for a {len}-entry scheduler table (SCHED_TABLE_CAPACITY)");
        };
        self.take(offset, len);
        Ok(offset)
    }

    pub fn release(&mut self, offset: u32, len: u32) {
        if len == 0 {
            return;
        }
        let mut start = offset;
        let mut end = offset + len;
        if let Some((&before, &before_len)) = self.free.range(..offset).next_back() {
            if before + before_len == offset {
                self.free.remove(&before);
                start = before;
            }
        }
        if let Some(&after_len) = self.free.get(&end) {
            self.free.remove(&end);
            end += after_len;
        }
        self.free.insert(start, end - start);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(weights: &[u32]) -> Vec<Backend> {
        backends_at(weights, |i| Addr::from_v4_octets([10, 244, 1, i]))
    }

    /// Backends whose addresses `addr` makes of 1, 2, …
    fn backends_at(weights: &[u32], addr: fn(u8) -> Addr) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Backend {
                addr: addr(i as u8 + 1),
                port: 8080,
                weight: *w,
                ..Default::default()
            })
            .collect()
    }

    /// IPv6 backends of one /64, told apart by their last byte only.
    fn ipv6_backend(i: u8) -> Addr {
        let mut octets = [0u8; 16];
        octets[..4].copy_from_slice(&[0xfd, 0, 0x02, 0x44]);
        octets[15] = i;
        Addr::from_v6_octets(octets)
    }

    #[test]
    fn wrr_interleaves_like_ipvs() {
        // ip_vs_wrr.c with weights 4, 3, 2: A A B A B C A B C.
        assert_eq!(wrr_schedule(&[4, 3, 2]), vec![0, 0, 1, 0, 1, 2, 0, 1, 2]);
        let slots = backends(&[2, 4]);
        assert_eq!(
            table(Scheduler::Wrr, &slots, (&[], &[])),
            Some(vec![1, 0, 1])
        );
        assert_eq!(
            table(Scheduler::Wrr, &backends(&[3, 3]), (&[], &[])),
            None,
            "uniform: plain rr"
        );
    }

    #[test]
    fn hash_buckets_follow_weights_and_survive_changes() {
        let slots = backends(&[1, 1, 2]);
        let first = hash_buckets(&slots, (&[], &[]));
        let share = |table: &[u32], slot: u32| table.iter().filter(|s| **s == slot).count();
        assert_eq!(
            (share(&first, 0), share(&first, 1), share(&first, 2)),
            (64, 64, 128)
        );
        // Drop backend 1 (slot 1): the last backend moves into its slot, as sync does.
        let after = vec![slots[0], slots[2]];
        let second = hash_buckets(&after, (&slots, &first));
        let moved = (0..256)
            .filter(|b| {
                first[*b] != 1
                    && identity(&slots[first[*b] as usize]) != identity(&after[second[*b] as usize])
            })
            .count();
        assert!(moved <= 22, "buckets of remaining backends moved: {moved}");
    }

    /// IPv4 backends hash as before IPv6 came (FNV-1a over the four octets and the
    /// port, the value pinned), so that their Maglev tables, and the backends new
    /// flows get, do not move across that upgrade.
    #[test]
    fn ipv4_backends_hash_as_before_ipv6() {
        let backend = &backends(&[1])[0];
        assert_eq!(endpoint_hash(backend, 0x5eed_0001), 0xec54_d1a7_0d83_911d);
    }

    #[test]
    fn maglev_spreads_evenly_and_moves_little_when_a_backend_goes() {
        maglev_spreads_evenly_and_moves_little_when_a_backend_goes_at(backends(&[1; 100]));
        maglev_spreads_evenly_and_moves_little_when_a_backend_goes_at(backends_at(
            &[1; 100],
            ipv6_backend,
        ));
    }

    fn maglev_spreads_evenly_and_moves_little_when_a_backend_goes_at(slots: Vec<Backend>) {
        let ring = maglev_ring(&slots, MAGLEV_TABLE_SIZE as usize);
        let mut counts = vec![0usize; 100];
        for slot in &ring {
            counts[*slot as usize] += 1;
        }
        let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
        assert!(
            min >= Some(640) && max <= Some(672),
            "uneven: {min:?}..{max:?}"
        );
        let fewer: Vec<Backend> = slots[1..].to_vec();
        let after = maglev_ring(&fewer, MAGLEV_TABLE_SIZE as usize);
        let moved = (0..ring.len())
            .filter(|e| {
                ring[*e] != 0
                    && identity(&slots[ring[*e] as usize]) != identity(&fewer[after[*e] as usize])
            })
            .count();
        let fraction = moved as f64 / ring.len() as f64;
        assert!(
            fraction < 0.01,
            "{:.3}% of entries of remaining backends moved",
            fraction * 100.0
        );
    }

    #[test]
    fn table_space_allocates_and_coalesces() {
        let mut space = TableSpace::with_used([(0, 10)]);
        let a = space.allocate(100).expect("a");
        let b = space.allocate(100).expect("b");
        assert_eq!((a, b), (10, 110));
        space.release(a, 100);
        space.release(b, 100);
        assert_eq!(space.allocate(200).expect("coalesced"), 10);
    }
}

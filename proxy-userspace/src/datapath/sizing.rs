//! The conntrack table's size when the operator sets none (`--conntrack-entries`):
//! the size of the table already pinned, which a restart or an upgrade must keep (a
//! pinned map of another size is refused, and its flows are the node's established
//! connections); else one derived from the node's memory, as Cilium's
//! `bpf-map-dynamic-size-ratio` sizes its tables, instead of one size for every node.
//!
//! The table is preallocated (an LRU hash), so its whole size is charged at once:
//! about 168 bytes of kernel memory per entry (84 MiB at 524,288 entries, BENCHMARKS
//! "Map memory"), counted against the agent's memory cgroup on kernels from 5.11.
//! One entry per 48 KiB of the node's memory is 0.34% of it, and gives this project's
//! 24 GiB machine the 524,288 entries every earlier release created.

use std::path::Path;

use anyhow::{Context as _, Result};
use proxy_common::map_name;

/// Node memory per conntrack entry.
const MEMORY_PER_ENTRY: u64 = 48 * 1024;
/// 32,768 flows (two entries each), the least a node gets (3 GiB of memory or less):
/// below kube-proxy's floor for the kernel's table (`conntrack.min`, 131,072 flows),
/// which `--conntrack-entries 262144` restores on such a node.
pub const MIN_ENTRIES: u32 = 65_536;
/// 1,048,576 flows, 336 MiB of kernel memory (from about 96 GiB of node memory). Map
/// memory is charged to the agent's cgroup (from 5.11): with the other maps (up to
/// about 300 MiB at 100,000 services) and the agent's own peak (about 400 MiB there),
/// this keeps it within the DaemonSet's 1 GiB limit. A node that needs more says so.
pub const MAX_ENTRIES: u32 = 2_097_152;

/// Why the table has the size it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// The pinned table's, which holds the node's flows.
    Pinned,
    /// Derived from this much node memory, in bytes.
    Memory(u64),
}

/// Conntrack entries for a node with `pin_dir` (see the module's documentation).
pub fn conntrack_entries(pin_dir: &Path) -> Result<(u32, Basis)> {
    let pinned = pin_dir.join(map_name::CONNTRACK);
    if pinned.exists() {
        let info = aya::maps::MapInfo::from_pin(&pinned)
            .with_context(|| format!("reading the size of {}", pinned.display()))?;
        return Ok((info.max_entries(), Basis::Pinned));
    }
    let memory = node_memory()?;
    Ok((for_memory(memory), Basis::Memory(memory)))
}

/// One entry per `MEMORY_PER_ENTRY` of `memory`, rounded to the nearest power of two
/// (a node's `MemTotal` is a little under its nominal size, and a few megabytes more
/// or less after a kernel update do not change it), within `MIN_ENTRIES` and
/// `MAX_ENTRIES`.
pub fn for_memory(memory: u64) -> u32 {
    let entries = (memory / MEMORY_PER_ENTRY).max(1);
    let below = 1u64 << entries.ilog2();
    let nearest = if entries - below >= below / 2 {
        below * 2
    } else {
        below
    };
    u32::try_from(nearest)
        .unwrap_or(u32::MAX)
        .clamp(MIN_ENTRIES, MAX_ENTRIES)
}

/// The node's memory: `MemTotal` in /proc/meminfo (the machine's, also inside a
/// container; the agent's own cgroup limit does not bound what the node's flows need).
pub fn node_memory() -> Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
    mem_total(&meminfo).context("no MemTotal line in /proc/meminfo")
}

fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_table_follows_the_nodes_memory_in_powers_of_two_within_bounds() {
        assert_eq!(for_memory(24 * GIB), 524_288, "this project's machine");
        assert_eq!(for_memory(16 * GIB), 262_144);
        assert_eq!(for_memory(64 * GIB), 1_048_576);
        assert_eq!(for_memory(96 * GIB), MAX_ENTRIES);
        assert_eq!(for_memory(4 * GIB), 65_536);
        assert_eq!(for_memory(GIB), MIN_ENTRIES);
        assert_eq!(for_memory(0), MIN_ENTRIES);
        assert_eq!(for_memory(1 << 40), MAX_ENTRIES);
        // MemTotal a little under the nominal size: the same size.
        assert_eq!(for_memory(24 * GIB - 600 * (1 << 20)), 524_288);
        assert_eq!(for_memory(16 * GIB - 600 * (1 << 20)), 262_144);
        assert_eq!(for_memory(12 * GIB), 262_144);
    }

    #[test]
    fn mem_total_is_read_in_bytes() {
        let meminfo = "MemFree:  1000 kB\nMemTotal:       24567808 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_567_808 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
    }
}

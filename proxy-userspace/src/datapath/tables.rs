//! Typed handles to the pinned maps, opened by path so that the agent, `list` and the
//! tests all read and write the same kernel objects the same way.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{lpm_trie::LpmTrie, Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues};
use proxy_common::{
    map_name, AddrKey, AffinityKey, AffinityValue, Backend, BackendSlotKey, ConfigValue,
    ConnCounts, CtEntry, CtKey, ExpectKey, Expectation, NodeAddrFlags, ServiceKey, ServiceName,
    ServiceValue, SourceRangeKey, TrafficStats, DATAPATH_EVENT_NAMES,
};

pub struct Tables {
    /// Where the maps are pinned (memory-mapped arrays are opened from here).
    pub pin_dir: std::path::PathBuf,
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, BackendSlotKey, Backend>,
    pub rr_cursors: Array<MapData, u64>,
    pub node_addrs: HashMap<MapData, AddrKey, NodeAddrFlags>,
    pub config: Array<MapData, ConfigValue>,
    pub conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub service_stats: PerCpuArray<MapData, TrafficStats>,
    pub backend_stats: PerCpuArray<MapData, TrafficStats>,
    pub events: PerCpuArray<MapData, u64>,
    pub service_names: HashMap<MapData, u32, ServiceName>,
    pub conn_counts: Array<MapData, ConnCounts>,
    pub sched_tables: Array<MapData, u32>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// Frontend addresses, with how many frontends listen on each.
    pub service_addrs: HashMap<MapData, AddrKey, u32>,
}

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| {
        let hint = if permission_denied(&e) {
            "permission denied: reading the maps needs root (CAP_BPF)"
        } else {
            "is an agent running with this --pin-dir?"
        };
        anyhow::Error::new(e).context(format!("opening pinned map {} ({hint})", path.display()))
    })?;
    Map::from_map_data(data).with_context(|| format!("map {name} has an unexpected type"))
}

/// Whether an error was, at bottom, the kernel refusing access.
fn permission_denied(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
        {
            return true;
        }
        cause = e.source();
    }
    false
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {
        open($dir, $name)?
            .try_into()
            .with_context(|| format!("map {} has an unexpected layout", $name))?
    };
}

impl Tables {
    pub fn open(dir: &Path) -> Result<Tables> {
        Ok(Tables {
            pin_dir: dir.to_owned(),
            services: typed!(dir, map_name::SERVICES),
            slots: typed!(dir, map_name::BACKEND_SLOTS),
            rr_cursors: typed!(dir, map_name::RR_CURSORS),
            node_addrs: typed!(dir, map_name::NODE_ADDRS),
            config: typed!(dir, map_name::NODE_CONFIG),
            conntrack: typed!(dir, map_name::CONNTRACK),
            service_stats: typed!(dir, map_name::SERVICE_STATS),
            backend_stats: typed!(dir, map_name::BACKEND_STATS),
            events: typed!(dir, map_name::DATAPATH_EVENTS),
            service_names: typed!(dir, map_name::SERVICE_NAMES),
            conn_counts: typed!(dir, map_name::CONN_COUNTS),
            sched_tables: typed!(dir, map_name::SCHED_TABLES),
            source_ranges: typed!(dir, map_name::SOURCE_RANGES),
            affinity: typed!(dir, map_name::AFFINITY),
            service_addrs: typed!(dir, map_name::SERVICE_ADDRS),
        })
    }

    /// A per-CPU counter summed over CPUs.
    pub fn stats_sum(map: &PerCpuArray<MapData, TrafficStats>, index: u32) -> TrafficStats {
        let mut total = TrafficStats::default();
        if let Ok(values) = map.get(&index, 0) {
            for v in values.iter() {
                total.add(v);
            }
        }
        total
    }

    /// Zeroes a per-CPU counter, for an id handed to a new service or backend.
    pub fn reset_stats(map: &mut PerCpuArray<MapData, TrafficStats>, index: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .context("counting CPUs")?;
        let zeros = PerCpuValues::try_from(vec![TrafficStats::default(); cpus])?;
        map.set(index, zeros, 0).context("resetting counters")?;
        Ok(())
    }

    /// The data path's event counters by name, summed over CPUs.
    pub fn events(&self) -> Vec<(&'static str, u64)> {
        DATAPATH_EVENT_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total = self
                    .events
                    .get(&(i as u32), 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0);
                (*name, total)
            })
            .collect()
    }
}

impl Tables {
    /// The expectations of related flows (`proxy_common::related`), opened when asked
    /// for: a listing against an agent older than them still works.
    pub fn expectations(&self) -> Result<HashMap<MapData, ExpectKey, Expectation>> {
        Ok(typed!(&self.pin_dir, map_name::EXPECTATIONS))
    }

    /// The maximum entries of a pinned map, as it was created.
    pub fn capacity(&self, name: &str) -> Result<u32> {
        let info = aya::maps::MapInfo::from_pin(self.pin_dir.join(name))
            .with_context(|| format!("reading the size of {name}"))?;
        Ok(info.max_entries())
    }

    /// How full the maps that grow with the cluster are: (map, entries, capacity).
    /// Counting walks each map's keys (about 50 ms per 100,000 entries).
    pub fn fill(&self) -> Result<Vec<(&'static str, usize, u32)>> {
        [
            (map_name::SERVICES, self.services.keys().count()),
            (map_name::BACKEND_SLOTS, self.slots.keys().count()),
            (map_name::CONNTRACK, self.conntrack.keys().count()),
        ]
        .into_iter()
        .map(|(map, used)| Ok((map, used, self.capacity(map)?)))
        .collect()
    }

    /// How many service ids the maps hold (the smallest of the per-service maps).
    pub fn services_capacity(&self) -> Result<u32> {
        Ok(self
            .capacity(map_name::SERVICES)?
            .min(self.capacity(map_name::SERVICE_STATS)?))
    }

    /// How many backend ids the maps hold.
    pub fn backends_capacity(&self) -> Result<u32> {
        Ok(self
            .capacity(map_name::BACKEND_SLOTS)?
            .min(self.capacity(map_name::CONN_COUNTS)?))
    }

    /// `namespace/name:port` of a service id, if the map has it.
    pub fn service_name(&self, id: u32) -> Option<String> {
        self.service_names
            .get(&id, 0)
            .ok()
            .map(|n| super::codec::decode_name(&n))
    }

    /// `namespace/name:port` of every service id.
    pub fn service_names_by_id(&self) -> std::collections::BTreeMap<u32, String> {
        self.service_names
            .iter()
            .filter_map(Result::ok)
            .map(|(id, name)| (id, super::codec::decode_name(&name)))
            .collect()
    }
}

//! Typed handles to the pinned maps, opened by path so that the agent, `list` and the
//! tests all read and write the same kernel objects the same way.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::maps::{
    lpm_trie::{Key as LpmKey, LpmTrie},
    Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues,
};
use proxy_common::{
    map_name, Addr, AffinityKey, AffinityValue, Backend, BackendSlotKey, ConfigValue, ConnCounts,
    CtEntry, CtKey, NodeAddrFlags, ServiceKey, ServiceName, ServiceValue, SourceRangeKey,
    TrafficStats, DATAPATH_EVENT_NAMES, SOURCE_RANGE_ID_BITS,
};

use crate::model::SourceRange;

pub struct Tables {
    /// Where the maps are pinned (memory-mapped arrays are opened from here).
    pub pin_dir: std::path::PathBuf,
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, BackendSlotKey, Backend>,
    pub rr_cursors: Array<MapData, u64>,
    pub node_addrs: HashMap<MapData, Addr, NodeAddrFlags>,
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
}

fn open(dir: &Path, name: &str) -> Result<Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening pinned map {} (is an agent running with this --pin-dir?)",
            path.display()
        )
    })?;
    Map::from_map_data(data).with_context(|| format!("map {name} has an unexpected type"))
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
        })
    }

    /// A per-CPU counter summed over CPUs.
    pub fn stats_sum(map: &PerCpuArray<MapData, TrafficStats>, index: u32) -> TrafficStats {
        let mut total = TrafficStats::default();
        if let Ok(values) = map.get(&index, 0) {
            for v in values.iter() {
                total.connections += v.connections;
                total.packets_in += v.packets_in;
                total.bytes_in += v.bytes_in;
                total.packets_out += v.packets_out;
                total.bytes_out += v.bytes_out;
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
    /// The maximum entries of a pinned map, as it was created.
    pub fn capacity(&self, name: &str) -> Result<u32> {
        let info = aya::maps::MapInfo::from_pin(self.pin_dir.join(name))
            .with_context(|| format!("reading the size of {name}"))?;
        Ok(info.max_entries())
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

    /// `namespace/name:port` of every service id.
    pub fn service_names_by_id(&self) -> std::collections::BTreeMap<u32, String> {
        self.service_names
            .iter()
            .filter_map(Result::ok)
            .map(|(id, name)| (id, decode_name(&name)))
            .collect()
    }
}

/// The `SOURCE_RANGES` key of one prefix of one service.
pub fn source_range_key(service_id: u32, range: &SourceRange) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        SOURCE_RANGE_ID_BITS + u32::from(range.len),
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            addr: u32::from(range.addr).to_be(),
        },
    )
}

/// The `SOURCE_RANGES` key that matches one address of a service (the longest
/// prefix length, as the data path looks it up).
pub fn source_range_probe(service_id: u32, addr: Addr) -> LpmKey<SourceRangeKey> {
    let host = SourceRange {
        addr: addr.v4_octets().into(),
        len: 32,
    };
    source_range_key(service_id, &host)
}

/// The service id and prefix of a `SOURCE_RANGES` key.
pub fn source_range_of(key: &LpmKey<SourceRangeKey>) -> (u32, SourceRange) {
    let data = key.data();
    let len = key
        .prefix_len()
        .saturating_sub(SOURCE_RANGE_ID_BITS)
        .min(32) as u8;
    (
        u32::from_be(data.service_id_be),
        SourceRange {
            addr: std::net::Ipv4Addr::from(u32::from_be(data.addr)),
            len,
        },
    )
}

pub fn encode_name(name: &str) -> ServiceName {
    let mut bytes = [0u8; 64];
    let len = name.len().min(bytes.len());
    bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
    ServiceName { bytes }
}

pub fn decode_name(name: &ServiceName) -> String {
    let end = name
        .bytes
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(name.bytes.len());
    String::from_utf8_lossy(&name.bytes[..end]).into_owned()
}

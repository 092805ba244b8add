//! Carrying a predecessor's maps over when their keys grew at the end, or an array
//! grew by slots (`NODE_CONFIG` by the IPv6 masquerade address's).
//!
//! Keys that hold an address got the address family (IPv4 = 0, where their bytes
//! were padding or absent) and `SOURCE_RANGES` a 16-byte address: a predecessor's
//! key is the new key's first bytes, and the rest zero. Those maps are not refused
//! (`layout`) but carried over, so that an upgrade keeps every service with its id
//! (which conntrack entries name), and the node and service address sets and the
//! source ranges programmed until the first sync rewrites them. Conntrack itself did
//! not change size (the family took a padding byte, zero = IPv4).
//!
//! The old map's pin is renamed aside (`NAME_carried`) before the loader creates the
//! new map; its entries are written into the new map once loaded, and the aside pin
//! removed only then. An agent stopped in between finds the aside pin at its next
//! start and carries it over then.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key as LpmKey, Array, HashMap, LpmTrie, Map, MapData},
    Ebpf, Pod,
};
use proxy_common::{
    map_name, AddrKey, ConfigValue, NodeAddrFlags, ServiceKey, ServiceValue, SourceRangeKey,
};

/// Carries a predecessor's map (its entries) into this version's; returns how many.
type Carry = fn(MapData, &mut Map) -> Result<usize>;

/// A map whose key grew (`old_key_size`, the rest unchanged) or that grew by entries
/// (`old_entries`, its key and value unchanged): its name, what it was before, and how
/// its entries are carried over.
struct Widened {
    name: &'static str,
    old: Before,
    carry: Carry,
}

enum Before {
    KeySize(u32),
    Entries(u32),
}

/// Every map whose key grew by zero bytes at its end (2026-12, address families), and
/// every array that grew by slots.
const WIDENED: [Widened; 5] = [
    Widened {
        name: map_name::SERVICES,
        old: Before::KeySize(20),
        carry: widen_hash::<20, ServiceKey, ServiceValue>,
    },
    Widened {
        name: map_name::SERVICE_ADDRS,
        old: Before::KeySize(16),
        carry: widen_hash::<16, AddrKey, u32>,
    },
    Widened {
        name: map_name::NODE_ADDRS,
        old: Before::KeySize(16),
        carry: widen_hash::<16, AddrKey, NodeAddrFlags>,
    },
    Widened {
        // An LPM key: the 4-byte prefix length, then the service id and an IPv4
        // address.
        name: map_name::SOURCE_RANGES,
        old: Before::KeySize(4 + 8),
        carry: widen_source_ranges::<8>,
    },
    Widened {
        // 2026-12: `CONFIG_SNAT_ADDR6`. Its slots are the agent's node settings, and
        // the network namespace cookie the socket hooks serve until the agent learns
        // it again.
        name: map_name::NODE_CONFIG,
        old: Before::Entries(4),
        carry: grow_array::<ConfigValue>,
    },
];

fn aside(pin_dir: &Path, name: &str) -> PathBuf {
    // bpffs refuses names with a dot.
    pin_dir.join(format!("{name}_carried"))
}

/// Whether the pinned map `name`, of (key size, value size, entries) `pinned`, is a
/// predecessor's form of a map that is `wanted` now: then its pin is moved aside for
/// `carry_over` and the layout check passes it.
pub fn set_aside(
    pin_dir: &Path,
    name: &str,
    pinned: (u32, u32, u32),
    wanted: (u32, u32, u32),
) -> Result<bool> {
    let predecessor = |w: &Widened| match w.old {
        Before::KeySize(size) => {
            (pinned.1, pinned.2) == (wanted.1, wanted.2) && pinned.0 == size && size < wanted.0
        }
        Before::Entries(entries) => {
            (pinned.0, pinned.1) == (wanted.0, wanted.1)
                && pinned.2 == entries
                && entries < wanted.2
        }
    };
    if !WIDENED.iter().any(|w| w.name == name && predecessor(w)) {
        return Ok(false);
    }
    let (from, to) = (pin_dir.join(name), aside(pin_dir, name));
    if to.exists() {
        bail!(
            "{} and {} both exist: a carry-over of {name} was interrupted; run the version that created them, or `ebpf-proxy cleanup`",
            from.display(),
            to.display()
        );
    }
    std::fs::rename(&from, &to)
        .with_context(|| format!("moving {} aside to widen its keys", from.display()))?;
    tracing::info!(
        map = name,
        "pinned map of a previous layout: carried over to this one"
    );
    Ok(true)
}

/// Writes every set-aside map's entries (keys zero-extended, or slots by index) into
/// the newly loaded maps, then removes the aside pins. Before any program is attached.
pub fn carry_over(pin_dir: &Path, ebpf: &mut Ebpf) -> Result<()> {
    for widened in &WIDENED {
        let path = aside(pin_dir, widened.name);
        if !path.exists() {
            continue;
        }
        let old =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        let new = ebpf
            .map_mut(widened.name)
            .with_context(|| format!("map {} missing from the object", widened.name))?;
        let carried = (widened.carry)(old, new)?;
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        tracing::info!(map = widened.name, entries = carried, "carried over");
    }
    Ok(())
}

/// The new key whose first bytes are `old` and the rest zero.
fn zero_extended<K: Pod + Default>(old: &[u8]) -> K {
    let mut key = K::default();
    // SAFETY: `K` is a `Pod` map key (repr(C), no padding), longer than `old`.
    let bytes =
        unsafe { std::slice::from_raw_parts_mut((&raw mut key).cast::<u8>(), size_of::<K>()) };
    bytes[..old.len()].copy_from_slice(old);
    key
}

/// A hash map's entries (values of the same type in both layouts).
fn widen_hash<const OLD: usize, K: Pod + Default, V: Pod>(
    old: MapData,
    new: &mut Map,
) -> Result<usize> {
    let old: HashMap<MapData, [u8; OLD], V> = HashMap::try_from(Map::HashMap(old))?;
    let mut new: HashMap<&mut MapData, K, V> = HashMap::try_from(new)?;
    let mut carried = 0;
    for entry in old.iter() {
        let (key, value) = entry?;
        new.insert(zero_extended::<K>(&key), value, 0)?;
        carried += 1;
    }
    Ok(carried)
}

/// An array's slots, by index (the new array's further slots stay zero).
fn grow_array<V: Pod>(old: MapData, new: &mut Map) -> Result<usize> {
    let old: Array<MapData, V> = Array::try_from(Map::Array(old))?;
    let mut new: Array<&mut MapData, V> = Array::try_from(new)?;
    let mut carried = 0;
    for index in 0..old.len() {
        new.set(index, old.get(&index, 0)?, 0)?;
        carried += 1;
    }
    Ok(carried)
}

fn widen_source_ranges<const OLD: usize>(old: MapData, new: &mut Map) -> Result<usize> {
    let old: LpmTrie<MapData, [u8; OLD], u8> = LpmTrie::try_from(Map::LpmTrie(old))?;
    let mut new: LpmTrie<&mut MapData, SourceRangeKey, u8> = LpmTrie::try_from(new)?;
    let mut carried = 0;
    for entry in old.iter() {
        let (key, value) = entry?;
        let data = zero_extended::<SourceRangeKey>(&key.data());
        new.insert(&LpmKey::new(key.prefix_len(), data), value, 0)?;
        carried += 1;
    }
    Ok(carried)
}

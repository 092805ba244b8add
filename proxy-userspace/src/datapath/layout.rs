//! Refusing pinned maps of another layout. Maps are reused across restarts and
//! upgrades by their pin; a version whose keys or values changed size would read a
//! predecessor's map wrongly (nothing in the kernel stops a smaller value). Before
//! loading, every pinned map is compared with this version's definition. Other map
//! flags (the conntrack table's LRU lists were per-CPU before 2026-12) do not change
//! what the maps hold: the pinned map is kept, with a warning that the new flags
//! take effect after a `cleanup`. A map that holds only counters an operator reads
//! (`DATAPATH_EVENTS`) is not worth refusing to start for: when its size differs it
//! is unpinned, so that the loader creates it afresh (the counters restart at 0).
//! A map whose key only grew at its end, or an array that grew by slots, is carried
//! over (`widen`).

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use aya::maps::MapInfo;
use proxy_common::map_name;

use super::{loader::MapSizes, EBPF_OBJECT};

/// Maps whose contents may be dropped on an upgrade.
const RECREATABLE: &[&str] = &[map_name::DATAPATH_EVENTS];

pub fn check_pinned_maps(pin_dir: &Path, sizes: &MapSizes) -> Result<()> {
    let object = aya_obj::Object::parse(EBPF_OBJECT).context("parsing the embedded eBPF object")?;
    let mut mismatches = Vec::new();
    for (name, wanted) in &object.maps {
        let path = pin_dir.join(name);
        if !path.exists() {
            continue;
        }
        let pinned =
            MapInfo::from_pin(&path).with_context(|| format!("reading {}", path.display()))?;
        let have = (pinned.key_size(), pinned.value_size(), pinned.max_entries());
        let entries = sizes
            .by_map()
            .iter()
            .find(|(map, _)| map == name)
            .map_or(wanted.max_entries(), |(_, size)| *size);
        let want = (wanted.key_size(), wanted.value_size(), entries);
        if pinned.map_flags() != wanted.map_flags() {
            tracing::warn!(
                map = name.as_str(),
                pinned = format_args!("{:#x}", pinned.map_flags()),
                wanted = format_args!("{:#x}", wanted.map_flags()),
                "pinned map has other flags than this version creates; kept as it is \
                 (conntrack survives), the new flags take effect after `ebpf-proxy cleanup`"
            );
        }
        if have != want && super::widen::set_aside(pin_dir, name, have, want)? {
            continue;
        }
        if have != want && RECREATABLE.contains(&name.as_str()) {
            tracing::warn!(
                map = name.as_str(),
                "pinned map of another size holds only counters: created afresh"
            );
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            continue;
        }
        if have != want {
            mismatches.push(format!(
                "{name}: pinned key/value/entries {}/{}/{}, this version needs {}/{}/{}",
                have.0, have.1, have.2, want.0, want.1, want.2
            ));
        }
    }
    if !mismatches.is_empty() {
        bail!(
            "the maps pinned in {} have another layout (or size) than this agent uses:\n  {}\n\
             Run the version that created them, or `ebpf-proxy cleanup --pin-dir {}` \
             (detaches the programs and drops all conntrack state) before starting this one.",
            pin_dir.display(),
            mismatches.join("\n  "),
            pin_dir.display()
        );
    }
    Ok(())
}

//! `--only keys`: what the 16-byte addresses of the data path's keys cost IPv4,
//! against keys of IPv4's own size (README, "Address families"). Two tables of
//! conntrack's size and type, filled with the same flows (`proxy_common::key_layout`),
//! each looked up by an XDP program run with BPF_PROG_TEST_RUN (one look-up of the
//! next flow per run), in alternating rounds; and the kernel memory each table takes.

use anyhow::{ensure, Context as _, Result};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::Xdp,
    Ebpf, EbpfLoader, Pod,
};
use ebpf_proxy::datapath::{loader::program, BENCH_WRAPPER_OBJECT};
use proxy_common::{key_layout, map_name, BENCH_FRAME_V4};
use serde::Serialize;

use crate::kernel;

/// XDP_PASS: the program found the flow.
const FOUND: u32 = 2;

#[derive(Serialize)]
pub struct Layout {
    pub layout: &'static str,
    pub key_bytes: usize,
    pub entry_bytes: usize,
    /// The table's kernel memory at `CONNTRACK_ENTRIES` (`memlock`, preallocated).
    pub table_bytes: u64,
    pub runs: Vec<Run>,
}

/// One program run (one look-up and the test-run loop) with this many active flows,
/// in ns over the rounds.
#[derive(Serialize)]
pub struct Run {
    pub active_flows: u32,
    pub ns_median: f64,
    pub ns_min: f64,
    pub ns_max: f64,
}

#[derive(Serialize)]
pub struct KeyLayoutResults {
    pub filled: u32,
    pub rounds: usize,
    pub repeat: u32,
    pub layouts: Vec<Layout>,
}

/// Looked up in turn: a hot set (cached: the hash and the comparison show) and the
/// whole table (mostly cache misses: the entry size shows).
const ACTIVE: [u32; 2] = [1_024, key_layout::FILLED];

fn fill<K: Pod, V: Pod + Default>(ebpf: &mut Ebpf, name: &str, key: fn(u32) -> K) -> Result<u64> {
    let map = ebpf.map_mut(name).context(name.to_owned())?;
    let mut table: HashMap<&mut MapData, K, V> = HashMap::try_from(map)?;
    for i in 0..key_layout::FILLED {
        table.insert(key(i), V::default(), 0)?;
    }
    let map = ebpf.map(name).context(name.to_owned())?;
    let aya::maps::Map::LruHashMap(data) = map else {
        anyhow::bail!("{name} is not an LRU hash map");
    };
    kernel::map_memory(data)
}

fn time(ebpf: &mut Ebpf, program_name: &str, repeat: u32) -> Result<f64> {
    let (return_value, ns) =
        kernel::test_run(program(ebpf, program_name)?, repeat, BENCH_FRAME_V4)?;
    ensure!(
        return_value == FOUND,
        "{program_name}: a flow of the table was not found"
    );
    Ok(ns)
}

pub fn run(quick: bool) -> Result<KeyLayoutResults> {
    let (rounds, repeat) = if quick { (3, 200_000) } else { (21, 2_000_000) };
    let mut ebpf = EbpfLoader::new()
        .load(BENCH_WRAPPER_OBJECT)
        .context("loading the bench wrapper")?;
    let wide_bytes = fill::<key_layout::WideKey, key_layout::WideEntry>(
        &mut ebpf,
        map_name::KEYS_WIDE,
        key_layout::wide_key,
    )?;
    let narrow_bytes = fill::<key_layout::NarrowKey, key_layout::NarrowEntry>(
        &mut ebpf,
        map_name::KEYS_NARROW,
        key_layout::narrow_key,
    )?;
    let programs = ["bench_keys_wide", "bench_keys_narrow"];
    for name in programs {
        program::<Xdp>(&mut ebpf, name)?.load()?;
    }
    let mut runs = [Vec::new(), Vec::new()];
    for active in ACTIVE {
        let mut setting: Array<&mut MapData, u32> = Array::try_from(
            ebpf.map_mut(map_name::KEYS_ACTIVE)
                .context(map_name::KEYS_ACTIVE)?,
        )?;
        setting.set(0, active, 0)?;
        // Alternating rounds: both layouts see the same machine noise.
        let mut samples = [Vec::new(), Vec::new()];
        for _ in 0..rounds {
            for (i, name) in programs.iter().enumerate() {
                samples[i].push(time(&mut ebpf, name, repeat)?);
            }
        }
        for (i, samples) in samples.into_iter().enumerate() {
            runs[i].push(run_of(active, samples));
        }
    }
    let [wide_runs, narrow_runs] = runs;
    let results = KeyLayoutResults {
        filled: key_layout::FILLED,
        rounds,
        repeat,
        layouts: vec![
            Layout {
                layout: "16-byte addresses (today)",
                key_bytes: size_of::<key_layout::WideKey>(),
                entry_bytes: size_of::<key_layout::WideEntry>(),
                table_bytes: wide_bytes,
                runs: wide_runs,
            },
            Layout {
                layout: "IPv4 only",
                key_bytes: size_of::<key_layout::NarrowKey>(),
                entry_bytes: size_of::<key_layout::NarrowEntry>(),
                table_bytes: narrow_bytes,
                runs: narrow_runs,
            },
        ],
    };
    for l in &results.layouts {
        for r in &l.runs {
            println!(
                "{:<26} key {:>2} B, entry {:>2} B, table {:>5.1} MiB, {:>6} active flows: {:>6.1} ns per run (min {:.1}, max {:.1})",
                l.layout,
                l.key_bytes,
                l.entry_bytes,
                l.table_bytes as f64 / (1 << 20) as f64,
                r.active_flows,
                r.ns_median,
                r.ns_min,
                r.ns_max
            );
        }
    }
    Ok(results)
}

fn run_of(active_flows: u32, mut samples: Vec<f64>) -> Run {
    samples.sort_by(f64::total_cmp);
    Run {
        active_flows,
        ns_median: samples[samples.len() / 2],
        ns_min: samples[0],
        ns_max: samples[samples.len() - 1],
    }
}

//! `cargo xtask bench`: the figures of BENCHMARKS.md, measured on this machine.
//! `--quick` runs fewer and smaller rounds (CI); `--only control|scale|watch|data|keys|e2e|ipvs` runs one
//! part. No timing ever fails a run; a path that is not taken as intended does.

mod agent_scale;
mod contenders;
mod control_plane;
mod data_path;
mod end_to_end;
mod guest;
mod kernel;
mod key_layout;
mod plots;
mod watch_latency;

use std::path::PathBuf;

use anyhow::Result;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    if args.iter().any(|a| a == "--guest-e2e") {
        return guest::measure_in_guest(quick);
    }
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let part = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench/results");
    std::fs::create_dir_all(&out)?;
    let suffix = if quick { "-quick" } else { "" };
    let write = |name: &str, value: serde_json::Value| -> Result<()> {
        std::fs::write(
            out.join(format!("{name}{suffix}.json")),
            serde_json::to_string_pretty(&value)?,
        )?;
        Ok(())
    };
    if part("control") {
        write(
            "control-plane",
            serde_json::to_value(control_plane::run(quick)?)?,
        )?;
    }
    if part("scale") {
        write(
            "agent-scale",
            serde_json::to_value(agent_scale::run(quick)?)?,
        )?;
    }
    if part("control") || part("watch") {
        write(
            "watch-latency",
            serde_json::to_value(watch_latency::run(quick)?)?,
        )?;
    }
    if part("data") {
        let (cases, programs, memory) = data_path::run(quick)?;
        plots::per_packet(&cases, &out.join(format!("per-packet{suffix}.png")))?;
        write(
            "data-path",
            serde_json::json!({ "cases": cases, "programs": programs, "map_memory": memory }),
        )?;
    }
    if part("keys") {
        write("key-layout", serde_json::to_value(key_layout::run(quick)?)?)?;
    }
    if part("e2e") {
        let results = end_to_end::run(quick)?;
        plots::connections(&results, &out.join(format!("connections{suffix}.png")))?;
        write("end-to-end", serde_json::to_value(results)?)?;
    }
    if part("ipvs") {
        let report = guest::run_guest(quick)?;
        plots::connections(
            &report.results,
            &out.join(format!("connections-guest{suffix}.png")),
        )?;
        write("ipvs-guest", serde_json::to_value(report)?)?;
    }
    println!("results: {}", out.display());
    Ok(())
}

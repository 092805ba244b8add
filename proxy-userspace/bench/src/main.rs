//! `cargo xtask bench`: the figures of BENCHMARKS.md, measured on this machine
//! (`--help` says how). No timing ever fails a run; a path that is not taken as
//! intended does.

mod agent_scale;
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
use clap::{Parser, ValueEnum};
use ebpf_proxy::model::Family;

/// The figures of BENCHMARKS.md, measured on this machine (`cargo xtask bench`
/// builds what it needs and runs this). No timing ever fails a run.
#[derive(Parser)]
struct Args {
    /// Fewer and smaller rounds (CI).
    #[arg(long)]
    quick: bool,
    /// Runs these parts only (repeatable; all of them without it).
    #[arg(long, value_enum)]
    only: Vec<Part>,
    /// Writes into bench/results, the committed figures BENCHMARKS.md cites,
    /// replacing them; without it results go to target/bench-results.
    #[arg(long)]
    update_committed: bool,
    /// Runs the contenders' end-to-end measurement inside the QEMU guest (the
    /// guest's own invocation).
    #[arg(long, hide = true)]
    guest_e2e: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// The agent's sync and start-up (watch latency runs with it).
    Control,
    /// The agent at 1,000 to 100,000 services.
    Scale,
    /// Change-to-map latency from the manifests file.
    Watch,
    /// Per-packet cost through BPF_PROG_TEST_RUN, beside Katran's and the
    /// kernel's.
    Data,
    /// The conntrack key layout measurement.
    Keys,
    /// Connections per second end to end, beside kube-proxy's layouts.
    E2e,
    /// The same inside the QEMU guest, with IPVS.
    Ipvs,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let quick = args.quick;
    if args.guest_e2e {
        return guest::measure_in_guest(quick);
    }
    let part = |name: Part| args.only.is_empty() || args.only.contains(&name);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = match args.update_committed {
        true => root.join("bench/results"),
        false => root.join("target/bench-results"),
    };
    std::fs::create_dir_all(&out)?;
    let suffix = if quick { "-quick" } else { "" };
    let write = |name: &str, value: serde_json::Value| -> Result<()> {
        std::fs::write(
            out.join(format!("{name}{suffix}.json")),
            serde_json::to_string_pretty(&value)?,
        )?;
        Ok(())
    };
    if part(Part::Control) {
        write(
            "control-plane",
            serde_json::to_value(control_plane::run(quick)?)?,
        )?;
    }
    if part(Part::Scale) {
        write(
            "agent-scale",
            serde_json::to_value(agent_scale::run(quick)?)?,
        )?;
    }
    if part(Part::Control) || part(Part::Watch) {
        write(
            "watch-latency",
            serde_json::to_value(watch_latency::run(quick)?)?,
        )?;
    }
    if part(Part::Data) {
        let (cases, programs, memory) = data_path::run(quick)?;
        plots::per_packet(&cases, &out.join(format!("per-packet{suffix}.png")))?;
        write(
            "data-path",
            serde_json::json!({ "cases": cases, "programs": programs, "map_memory": memory }),
        )?;
    }
    if part(Part::Keys) {
        write("key-layout", serde_json::to_value(key_layout::run(quick)?)?)?;
    }
    if part(Part::E2e) {
        let results = end_to_end::run(quick)?;
        for family in Family::ALL {
            let of_family: Vec<_> = results.iter().filter(|r| r.family == family).collect();
            let name = match family {
                Family::V4 => "connections",
                Family::V6 => "connections-ipv6",
            };
            plots::connections(&of_family, &out.join(format!("{name}{suffix}.png")))?;
        }
        write("end-to-end", serde_json::to_value(results)?)?;
    }
    if part(Part::Ipvs) {
        let report = guest::run_guest(quick)?;
        plots::connections(
            &report.results.iter().collect::<Vec<_>>(),
            &out.join(format!("connections-guest{suffix}.png")),
        )?;
        write("ipvs-guest", serde_json::to_value(report)?)?;
    }
    println!("results: {}", out.display());
    Ok(())
}

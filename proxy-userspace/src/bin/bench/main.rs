//! `cargo xtask bench`: the figures of BENCHMARKS.md, measured on this machine.
//! `--quick` runs fewer and smaller rounds (CI); no timing ever fails a run.

mod control_plane;
mod data_path;

use std::path::PathBuf;

use anyhow::Result;

fn main() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let control = control_plane::run(quick)?;
    let (cases, programs) = data_path::run(quick)?;
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    std::fs::create_dir_all(&out)?;
    let suffix = if quick { "-quick" } else { "" };
    std::fs::write(
        out.join(format!("control-plane{suffix}.json")),
        serde_json::to_string_pretty(&control)?,
    )?;
    let data = serde_json::json!({ "cases": cases, "programs": programs });
    std::fs::write(
        out.join(format!("data-path{suffix}.json")),
        serde_json::to_string_pretty(&data)?,
    )?;
    println!("results: {}", out.display());
    Ok(())
}

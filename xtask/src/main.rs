//! `cargo xtask`: everything that is not a plain cargo build — installing what a fresh
//! machine lacks, the demo, and the test suite (which needs root and a kernel).

mod setup;

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, rust-src, bpf-linker), mount bpffs.
    Setup,
    /// Build the agent and the demo in release mode.
    Build,
    /// Run the demo: a node, pods and a client in namespaces, real traffic.
    Demo,
    /// Lints, unit tests, in-kernel data path tests and end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::ensure(),
        Task::Build => {
            setup::ensure()?;
            build()
        }
        Task::Demo => {
            setup::ensure()?;
            build()?;
            run(Command::new(
                workspace_root().join("target/release/ebpf-proxy-demo"),
            ))
        }
        Task::Test { args } => {
            setup::ensure()?;
            test(&args)
        }
    }
}

fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn run(mut command: Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn build() -> Result<()> {
    let mut command = cargo();
    command.args(["build", "--release", "--package", "proxy-userspace"]);
    run(command)
}

fn test(args: &[String]) -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt).context("code is not formatted: run `cargo fmt --all`")?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    run(clippy)?;
    let mut clippy_ebpf = cargo();
    clippy_ebpf.args([
        "clippy",
        "--package",
        "proxy-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Zbuild-std=core",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy_ebpf)?;
    let mut tests = cargo();
    tests
        .args(["test", "--workspace", "--exclude", "proxy-ebpf"])
        .args(args);
    run(tests)
}

//! `cargo xtask`: everything that is not a plain cargo build — installing what a fresh
//! machine lacks, the demo, the image, and the test suite (which needs root and a
//! kernel).

mod image;
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
    /// Measurements for BENCHMARKS.md: the bench's own arguments follow
    /// (`cargo xtask bench --help` lists them).
    #[command(disable_help_flag = true)]
    Bench {
        /// Passed to the bench binary (`--quick`, `--only <part>`, `--update-committed`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The agent's OCI image (target/image/): no base image, reproducible, tagged
    /// with the version.
    Image {
        /// amd64 (this machine) or arm64 (cross-compiled).
        #[arg(long, default_value = "amd64")]
        arch: String,
    },
    /// Lints, unit tests, in-kernel data path tests and end-to-end tests (the image
    /// first: a test runs it under runc).
    Test {
        /// Instead of the suite on this machine's kernel, the kernel matrix: boots
        /// Debian's stock kernel of this generation (5.10, 6.1, 6.12, or `all`, comma-
        /// separated for several) in QEMU and runs the data path's tests there.
        #[arg(long)]
        kernel: Option<String>,
        /// With --kernel: every test of the data path's BPF_PROG_TEST_RUN modules
        /// too, not only the matrix's sample (minutes per 6.x kernel, an hour on 5.10).
        #[arg(long, requires = "kernel")]
        data_path: bool,
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
        Task::Bench { args } => {
            // Help needs the binary, not the QEMU guest and packages a run needs.
            if !args.iter().any(|a| a == "--help" || a == "-h") {
                setup::ensure_with_guest()?;
            }
            build()?;
            let mut bench = Command::new(workspace_root().join("target/release/ebpf-proxy-bench"));
            bench.args(args);
            run(bench)
        }
        Task::Image { arch } => {
            setup::ensure()?;
            image::build(image::arch(&arch)?)
        }
        Task::Test {
            kernel: None, args, ..
        } => {
            setup::ensure_with_guest()?;
            image::build(image::arch("amd64")?)?;
            test(&args)
        }
        Task::Test {
            kernel: Some(kernels),
            data_path,
            args,
        } => {
            setup::ensure_with_guest()?;
            kernel_matrix(&kernels, data_path, &args)
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

/// The agent, the demo and the benchmark, in release mode.
fn build() -> Result<()> {
    let mut command = cargo();
    command.args(["build", "--release"]).args(
        ["proxy-userspace", "proxy-testbed", "proxy-bench"]
            .iter()
            .flat_map(|p| ["--package", p]),
    );
    run(command)
}

/// Cargo on the nightly toolchain for the eBPF crate alone, in the target directory
/// proxy-userspace/build.rs builds it in (so the two share `core` and the crate's
/// dependencies).
fn nightly_ebpf_cargo(subcommand: &str) -> Command {
    let mut command = Command::new("rustup");
    command
        .current_dir(workspace_root())
        .args(["run", "nightly", "cargo", subcommand])
        .args(["--package", "proxy-ebpf", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Zbuild-std=core"])
        .arg("--target-dir")
        .arg(workspace_root().join("target/bpf"))
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO");
    command
}

fn test(args: &[String]) -> Result<()> {
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt).context("code is not formatted: run `cargo fmt --all`")?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
    run(clippy)?;
    let mut clippy_ebpf = nightly_ebpf_cargo("clippy");
    clippy_ebpf.args(["--quiet", "--", "-D", "warnings"]);
    run(clippy_ebpf)?;
    let mut tests = cargo();
    tests
        .args([
            "test",
            "--workspace",
            "--exclude",
            "proxy-ebpf",
            "--no-fail-fast",
        ])
        .args(args);
    run_counting_tests(tests)
}

/// The privileged suite's kernel-matrix test (ignored in ordinary runs), for the
/// kernel generations `kernels` names; `data_path`: with every data path test.
fn kernel_matrix(kernels: &str, data_path: bool, args: &[String]) -> Result<()> {
    let mut matrix = cargo();
    matrix
        .args(["test", "-p", "proxy-userspace", "--test", "privileged"])
        .args(args)
        .args(["--", "--ignored", "--exact", "--nocapture"])
        .arg("kernel_matrix::the_data_path_suite_passes_on_debian_stock_kernels")
        .env("EPX_KERNELS", kernels);
    if data_path {
        matrix.env("EPX_MATRIX", "data-path");
    }
    run_counting_tests(matrix)
}

/// Runs `cargo test`, echoing its output, and closes with one line that totals every
/// test binary's result (cargo's own last line is that of the last binary alone).
fn run_counting_tests(mut command: Command) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {command:?}"))?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let stdout = child.stdout.take().context("test output")?;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(summary) = line.strip_prefix("test result: ") {
            passed += count(summary, "passed");
            failed += count(summary, "failed");
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed: {status}");
    }
    Ok(())
}

/// The number before `word` in cargo's "ok. 3 passed; 0 failed; …" summary.
fn count(summary: &str, word: &str) -> u64 {
    summary
        .split(';')
        .filter_map(|part| part.trim().strip_suffix(word))
        .filter_map(|n| n.trim().rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

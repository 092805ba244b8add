//! Builds the eBPF programs (proxy-ebpf) for the BPF target and leaves the objects in
//! OUT_DIR, where `datapath` embeds them.
//!
//! Why not aya-build: it builds into a target directory under OUT_DIR, and OUT_DIR
//! differs between `cargo clippy`, `cargo test` and `cargo build --release`, so one
//! `cargo xtask test` compiled the BPF object (and `core` with build-std) three times
//! from scratch; it also re-printed every progress line of the inner build as a
//! cargo warning. This script shares one target directory (`target/bpf`) between all
//! of them, forwards only the inner build's warnings and errors, and passes the BPF
//! ISA level here, so that only this inner build needs the nightly toolchain.

use std::{
    env,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The BPF target (the build host and every supported kernel are little-endian).
const TARGET: &str = "bpfel-unknown-none";
/// The binaries of proxy-ebpf: the data path, the same for kernels 5.10 to 5.17, and
/// the benchmark's wrapper.
const OBJECTS: [&str; 3] = ["proxy-ebpf", "proxy-ebpf-legacy", "bench-wrapper"];

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("proxy-userspace lives in the workspace")?;
    let ebpf_dir = workspace.join("proxy-ebpf");
    println!("cargo:rerun-if-changed={}", ebpf_dir.join("src").display());
    println!(
        "cargo:rerun-if-changed={}",
        ebpf_dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("proxy-common/src").display()
    );
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from)
        .join("bpf");
    // aya-ebpf's architecture-specific parts (pt_regs) follow the host's.
    let arch_cfg = format!(
        "--cfg=bpf_target_arch=\"{}\"",
        env::var("CARGO_CFG_TARGET_ARCH")?
    );
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--quiet", "--release"])
        .args(["--package", "proxy-ebpf", "--bins", "--target", TARGET])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(workspace)
        // BPF ISA v3 (kernel >= 5.1; atomic fetch-and-add from 5.12) for the shared
        // round-robin cursor; BTF for CO-RE and bpftool. bpf-linker's default
        // (`-bpf-expand-memcpy-in-order`) expands only `memcpy` inline and leaves every
        // `memmove` and `memset` LLVM emits (copies through a temporary, zeroed
        // padding) a call to a byte loop; the verifier walks both directions of
        // memmove's overlap test (a pointer difference it cannot know), which doubled
        // the paths after each of about a hundred calls: with all of them inline the
        // uplink program verified in 126,000 instructions instead of 456,000.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                "-Ctarget-cpu=v3",
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
                "-Clink-arg=--disable-expand-memcpy-in-order",
                // A global function (BTF linkage), verified once: proxy-common's `sctp`.
                "-Clink-arg=--export=crc32c_multiply",
                &arch_cfg,
            ]
            .join("\x1f"),
        )
        // The outer build's compiler settings are not the inner one's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cargo
        .spawn()
        .context("running `rustup run nightly cargo` (run `cargo xtask setup`)")?;
    let stderr = child.stderr.take().context("inner build's stderr")?;
    let mut output = Vec::new();
    // Warnings (each a block up to the next blank line) reach the screen; the rest
    // only matters when the build fails.
    let mut in_warning = false;
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        in_warning = line.starts_with("warning") || (in_warning && !line.is_empty());
        if in_warning {
            println!("cargo:warning={line}");
        }
        output.push(line);
    }
    if !child.wait()?.success() {
        bail!(
            "building the eBPF programs failed (run `cargo xtask setup` if bpf-linker is missing):\n{}",
            output.join("\n")
        );
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    for object in OBJECTS {
        let built = target_dir.join(TARGET).join("release").join(object);
        std::fs::copy(&built, out_dir.join(object))
            .with_context(|| format!("copying {}", built.display()))?;
    }
    Ok(())
}

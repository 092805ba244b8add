//! Builds the eBPF programs (proxy-ebpf) for the BPF target with the nightly toolchain
//! and leaves the object in OUT_DIR, where `datapath::loader` embeds it.

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let ebpf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proxy-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    println!("cargo:rerun-if-changed={root_dir}/src");
    println!("cargo:rerun-if-changed=../proxy-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "proxy-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context("building the eBPF programs (run `cargo xtask setup` if bpf-linker is missing)")
}

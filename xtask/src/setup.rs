//! Idempotent installation of what builds and tests need; silent when all is there.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// Debian packages: LLVM for bpf-linker, and the tools the tests and demo drive.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "curl",
    "socat",
    "ethtool",
    "bpftool",
    // Captures of the multi-node tests (which packets cross which node).
    "tcpdump",
    // The container runtime the image's test runs it under (crun, the other one in
    // Debian, refuses this kind of host's hybrid cgroup layout); binutils' readelf
    // finds the libraries `cargo xtask image` puts in the image.
    "runc",
    "binutils",
    // The font of the benchmark's plots.
    "fonts-dejavu-core",
    // The TFTP server the related-flow tests transfer files from (in pod namespaces).
    "tftpd-hpa",
    // The other contenders of `cargo xtask bench`.
    "iptables",
    "nftables",
    "util-linux",
];

/// The QEMU guest's: it runs IPVS for `cargo xtask bench` and SCTP peers for the
/// tests (modules this machine's kernel lacks), and Debian's stock kernels for the
/// kernel matrix; the tools go into its initramfs.
const GUEST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "ipvsadm",
    "ipset",
    "kmod",
    "cpio",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("ebpf-proxy's build and tests load eBPF programs and create network namespaces: run as root");
    }
    ensure_packages()?;
    ensure_rust_src()?;
    ensure_bpf_linker()?;
    ensure_bpffs()
}

fn succeeds(command: &mut Command) -> bool {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// `ensure`, plus the QEMU guest's packages: for the tests and the benchmark.
pub fn ensure_with_guest() -> Result<()> {
    ensure()?;
    install_missing(GUEST_PACKAGES)
}

/// A foreign architecture's Rust standard library, C compiler and libc (the image's
/// `--arch arm64`).
pub fn ensure_cross(rust_target: &str, packages: &[&str]) -> Result<()> {
    install_missing(packages)?;
    let listed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&listed.stdout)
        .lines()
        .any(|l| l == rust_target)
    {
        return Ok(());
    }
    super::run({
        let mut c = Command::new("rustup");
        c.args(["target", "add", rust_target]);
        c
    })
}

fn ensure_packages() -> Result<()> {
    install_missing(PACKAGES)
}

/// Packages whose installation starts a host service (Debian starts daemons it
/// installs). The tests run their own copies inside namespaces; the host's service is
/// stopped and disabled, only when this installation brought it.
const NO_HOST_SERVICE: &[&str] = &["tftpd-hpa"];

fn install_missing(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    super::run({
        let mut c = Command::new("apt-get");
        c.args(["update", "-qq"]);
        c
    })?;
    super::run({
        let mut c = Command::new("apt-get");
        c.args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    })?;
    for service in missing.iter().filter(|p| NO_HOST_SERVICE.contains(p)) {
        // Without systemd (a container) nothing was started; either way, best effort.
        let _ = Command::new("systemctl")
            .args(["disable", "--now", service])
            .status();
    }
    Ok(())
}

fn ensure_rust_src() -> Result<()> {
    let listed = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&listed.stdout).contains("rust-src") {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to the nightly toolchain");
    super::run({
        let mut c = Command::new("rustup");
        c.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
        c
    })
}

fn ensure_bpf_linker() -> Result<()> {
    let version = Command::new("bpf-linker").arg("--version").output();
    if version.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)) {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)");
    super::run({
        // Outside the workspace and without the toolchain cargo passed down: the
        // machine's default toolchain builds it, as the tool's own instructions do.
        let mut c = Command::new("cargo");
        c.current_dir(std::env::temp_dir())
            .env_remove("RUSTUP_TOOLCHAIN")
            .args([
                "install",
                "--locked",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22");
        c
    })
}

fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    eprintln!("xtask: mounting bpffs on /sys/fs/bpf");
    if !succeeds(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
        bail!("could not mount bpffs on /sys/fs/bpf");
    }
    Ok(())
}

//! A throw-away QEMU guest running Debian's stock kernel, which has what this
//! machine's kernel lacks (IPVS, SCTP, dummy… as modules): booted from an initramfs
//! built here from Debian's packages, the host's tools and the binaries a run needs,
//! it runs one command and powers off. The benchmark runs IPVS beside the others in
//! it; the tests run real SCTP associations. Nothing is fetched but Debian packages
//! (`apt-get download`); the guest has no network card, so all its traffic stays
//! between namespaces inside it.
//!
//! Acceleration: real KVM when /dev/kvm is usable; on nested PVM (`kvm_pvm`), where a
//! stock kernel cannot run at speed, software emulation (TCG), about 60 times
//! slower: only ratios between runs of one guest boot mean anything (see
//! ../shared/IPVS-GUEST.md).

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};

/// What one guest boot runs.
pub struct GuestRun {
    /// Names the work directory under `target/guest` (the initramfs, with the
    /// kernel's release), so that runs of different kinds do not share one; each
    /// kernel is downloaded once for all.
    pub name: &'static str,
    /// Binaries copied in with the libraries `ldd` names: (here, in the guest).
    pub binaries: Vec<(PathBuf, PathBuf)>,
    /// The shell command the guest's init runs once the modules are loaded.
    pub command: String,
    /// Which stock kernel boots.
    pub kernel: DebianKernel,
}

/// What a successful boot ran on, and how long it took.
pub struct GuestOutcome {
    pub kernel: String,
    pub acceleration: &'static str,
    pub elapsed: Duration,
}

/// The tools the guest runs, copied with the libraries `ldd` names.
const TOOLS: [&str; 19] = [
    "/usr/bin/dash",
    "/usr/sbin/ip",
    "/usr/sbin/tc",
    "/usr/sbin/ethtool",
    "/usr/bin/nsenter",
    "/usr/sbin/nft",
    "/usr/sbin/xtables-legacy-multi",
    "/usr/sbin/xtables-nft-multi",
    "/usr/sbin/ipvsadm",
    "/usr/sbin/ipset",
    "/usr/sbin/sysctl",
    "/usr/bin/kmod",
    "/usr/bin/mount",
    "/usr/bin/umount",
    "/usr/bin/mkdir",
    "/usr/bin/sleep",
    "/usr/bin/cat",
    "/usr/bin/socat",
    "/usr/bin/curl",
];
/// Names the xtables multi-call binaries answer to.
const XTABLES: [(&str, &str); 6] = [
    ("iptables-legacy", "xtables-legacy-multi"),
    ("iptables-legacy-restore", "xtables-legacy-multi"),
    ("iptables-legacy-save", "xtables-legacy-multi"),
    ("iptables-nft", "xtables-nft-multi"),
    ("iptables-nft-restore", "xtables-nft-multi"),
    ("iptables-nft-save", "xtables-nft-multi"),
];
/// Kernel module directories the contenders need (loaded on demand by kmod).
const MODULE_DIRS: [&str; 4] = [
    "kernel/net",
    "kernel/lib",
    "kernel/crypto",
    "kernel/drivers/net",
];
/// Modules loaded before the run (the rest are requested by the kernel itself).
const MODULES: [&str; 19] = [
    "veth",
    "dummy",
    "ip_vs",
    "ip_vs_rr",
    "nf_conntrack",
    "nf_nat",
    "ip_tables",
    "iptable_nat",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_mark",
    "xt_comment",
    "xt_statistic",
    "xt_set",
    "ip_set_hash_ipportip",
    "nf_tables",
    "nft_chain_nat",
    "nft_numgen",
    "sctp",
];

fn output_of(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// KVM when it can run a stock kernel, else TCG.
fn acceleration() -> (&'static str, Vec<&'static str>) {
    let nested_pvm = Path::new("/sys/module/kvm_pvm").exists();
    if !nested_pvm && Path::new("/dev/kvm").exists() {
        ("kvm", vec!["-accel", "kvm", "-cpu", "host"])
    } else {
        (
            "tcg (software emulation: compare ratios only)",
            vec!["-accel", "tcg,thread=multi,tb-size=512", "-cpu", "max"],
        )
    }
}

/// A stock kernel of one of Debian's releases: the kernels operators run, from the
/// oldest a cluster still has (5.10) to a recent one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebianKernel {
    /// Debian 11's 5.10 (also Amazon Linux 2's generation).
    Bullseye,
    /// Debian 12's 6.1: the benchmark's and the SCTP test's guest.
    Bookworm,
    /// Debian 13's 6.12.
    Trixie,
}

impl DebianKernel {
    pub const ALL: [DebianKernel; 3] = [Self::Bullseye, Self::Bookworm, Self::Trixie];

    /// The release's code name, as the archive names its suites.
    pub fn release(self) -> &'static str {
        match self {
            Self::Bullseye => "bullseye",
            Self::Bookworm => "bookworm",
            Self::Trixie => "trixie",
        }
    }

    /// The kernel generation, as operators name it ("5.10").
    pub fn generation(self) -> &'static str {
        match self {
            Self::Bullseye => "5.10",
            Self::Bookworm => "6.1",
            Self::Trixie => "6.12",
        }
    }

    /// The release whose kernel generation is `generation`.
    pub fn from_generation(generation: &str) -> Option<DebianKernel> {
        Self::ALL.into_iter().find(|k| k.generation() == generation)
    }
}

/// `apt-get` or `apt-cache` with a private configuration under `dir` that knows only
/// `release` (and its security suite): the machine's own sources are never touched.
fn private_apt(tool: &str, dir: &Path, release: &str) -> Result<Command> {
    let sources = dir.join("sources.list");
    if !sources.exists() {
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let keyring = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg";
        fs::write(
            &sources,
            format!(
                "deb [{keyring}] http://deb.debian.org/debian {release} main\n\
                 deb [{keyring}] http://deb.debian.org/debian-security {release}-security main\n"
            ),
        )?;
    }
    let mut command = Command::new(tool);
    command
        .arg("-q")
        .arg(format!("-oDir::Etc::sourcelist={}", sources.display()))
        .arg("-oDir::Etc::sourceparts=-")
        .arg(format!(
            "-oDir::State::Lists={}",
            dir.join("lists").display()
        ))
        .arg(format!("-oDir::Cache={}", dir.join("cache").display()))
        .arg("-oAPT::Get::List-Cleanup=0");
    Ok(command)
}

/// Downloads and unpacks `kernel`'s current stock image and modules into
/// `dir/kernel-<release>` (once); returns that directory and the kernel's version.
fn kernel(dir: &Path, kernel: DebianKernel) -> Result<(PathBuf, String)> {
    let release = kernel.release();
    let unpacked = dir.join(format!("kernel-{release}"));
    if let Some(version) = unpacked_version(&unpacked) {
        return Ok((unpacked, version));
    }
    let apt = dir.join(format!("apt-{release}"));
    output_of(private_apt("apt-get", &apt, release)?.arg("update"))?;
    let depends =
        output_of(private_apt("apt-cache", &apt, release)?.args(["depends", "linux-image-amd64"]))?;
    let image = depends
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
        .context("no linux-image dependency of linux-image-amd64")?
        .trim()
        .to_owned();
    let package = format!("linux-image-{image}-unsigned");
    let download = apt.join("download");
    fs::create_dir_all(&download)?;
    output_of(
        private_apt("apt-get", &apt, release)?
            .current_dir(&download)
            .args(["download", &package]),
    )?;
    let deb = fs::read_dir(&download)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "deb") && p.to_string_lossy().contains(&package)
        })
        .context("downloaded kernel package")?;
    output_of(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    unpacked_version(&unpacked)
        .map(|version| (unpacked, version))
        .context("no vmlinuz in the kernel package")
}

/// The version of the kernel unpacked at `dir`, if one is.
fn unpacked_version(dir: &Path) -> Option<String> {
    fs::read_dir(dir.join("boot"))
        .ok()?
        .filter_map(Result::ok)
        .find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_prefix("vmlinuz-").map(str::to_owned)
        })
}

/// The kernel's module tree inside its unpacked package (Debian moved it under /usr
/// in trixie).
fn module_tree(unpacked: &Path, version: &str) -> Result<PathBuf> {
    ["lib/modules", "usr/lib/modules"]
        .into_iter()
        .map(|at| unpacked.join(at).join(version))
        .find(|p| p.is_dir())
        .context("no module tree in the kernel package")
}

/// Copies `binary` (following links) and the libraries it loads into `root`.
fn copy_with_libraries(binary: &Path, root: &Path, dest: &Path) -> Result<()> {
    let target = root.join(dest.strip_prefix("/").unwrap_or(dest));
    fs::create_dir_all(target.parent().context("no parent")?)?;
    fs::copy(binary, &target).with_context(|| format!("copying {}", binary.display()))?;
    let ldd = Command::new("ldd").arg(binary).output()?;
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line
            .split("=>")
            .nth(1)
            .unwrap_or(line)
            .split_whitespace()
            .next()
            .unwrap_or("");
        if path.starts_with('/') {
            let lib = root.join(path.trim_start_matches('/'));
            if !lib.exists() {
                fs::create_dir_all(lib.parent().context("no parent")?)?;
                fs::copy(path, &lib).with_context(|| format!("copying {path}"))?;
            }
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    output_of(Command::new("cp").arg("-a").arg(from).arg(to))?;
    Ok(())
}

/// The guest's /init: mounts, modules, `command`, power off. The exit line is given a
/// second to leave the serial port before the power-off, which does not drain it: a
/// fresh clone's run once lost it (the test had passed in the guest; the host saw no
/// exit). /tmp stays the
/// initramfs's own (writable) directory: binaries copied to their paths here may live
/// under /tmp (a clone built there), and a tmpfs mounted over it would hide them.
fn init_script(command: &str) -> String {
    format!(
        "#!/bin/sh\nexport PATH=/usr/sbin:/usr/bin:/sbin:/bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n\
         mount -t tmpfs tmpfs /run\nmkdir -p /run/netns /sys/fs/bpf\n\
         mount -t bpf bpf /sys/fs/bpf\nmount -t cgroup2 cgroup2 /sys/fs/cgroup\n\
         for m in {modules}; do modprobe $m || echo \"EPX-GUEST-NOTE no module $m\"; done\n\
         ip link set lo up\necho EPX-GUEST-START\n\
         {command}\necho EPX-GUEST-EXIT $?\nsleep 1\n\
         echo o > /proc/sysrq-trigger\nsleep 10\n",
        modules = MODULES.join(" ")
    )
}

/// Builds the initramfs (gzip'd newc cpio) for `version` at `work/initrd.gz`, with
/// the kernel's modules from the tree `modules`.
fn initramfs(modules: &Path, work: &Path, version: &str, spec: &GuestRun) -> Result<PathBuf> {
    let root = work.join("root");
    let _ = fs::remove_dir_all(&root);
    // A merged /usr, as Debian's: the paths ldd prints and the ones the tools were
    // built with (iptables' xtables directory) then agree.
    for sub in [
        "usr/bin",
        "usr/sbin",
        "usr/lib/modules",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib64",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "etc",
    ] {
        fs::create_dir_all(root.join(sub))?;
    }
    for top in ["bin", "sbin", "lib", "lib64"] {
        symlink(format!("usr/{top}"), root.join(top))?;
    }
    output_of(
        Command::new("mknod")
            .arg(root.join("dev/console"))
            .args(["c", "5", "1"]),
    )?;
    // ipset and iptables name protocols through these.
    for file in ["/etc/protocols", "/etc/services"] {
        fs::copy(file, root.join(file.trim_start_matches('/')))?;
    }
    // busybox for the few commands left (poweroff…); dash is the shell, because
    // busybox's sh prefers its own applets to the real tools.
    fs::copy("/bin/busybox", root.join("bin/busybox")).context("busybox-static")?;
    for tool in TOOLS {
        copy_with_libraries(Path::new(tool), &root, Path::new(tool))?;
    }
    symlink("/usr/bin/dash", root.join("bin/sh"))?;
    for (name, multi) in XTABLES {
        symlink(multi, root.join("usr/sbin").join(name))?;
    }
    for name in ["modprobe", "insmod", "depmod", "lsmod"] {
        symlink("/usr/bin/kmod", root.join("sbin").join(name))?;
    }
    for name in ["poweroff", "ls", "echo"] {
        symlink("/bin/busybox", root.join("bin").join(name))?;
    }
    copy_tree(
        Path::new("/usr/lib/x86_64-linux-gnu/xtables"),
        &root.join("usr/lib/x86_64-linux-gnu"),
    )?;
    for (binary, at) in &spec.binaries {
        copy_with_libraries(binary, &root, at)?;
        // A debug build's binaries are mostly debug information (hundreds of MB for
        // the test binary), which the guest would unpack into its memory.
        let copied = root.join(at.strip_prefix("/").unwrap_or(at));
        output_of(Command::new("strip").arg("--strip-debug").arg(&copied))?;
    }
    // Rust binaries unwind through libgcc_s, which ldd does not always list.
    let gcc = Path::new("/lib/x86_64-linux-gnu/libgcc_s.so.1");
    copy_with_libraries(gcc, &root, gcc)?;
    let guest_modules = root.join("lib/modules").join(version);
    fs::create_dir_all(guest_modules.join("kernel/drivers"))?;
    for sub in MODULE_DIRS {
        let target = guest_modules.join(sub);
        fs::create_dir_all(target.parent().context("no parent")?)?;
        copy_tree(&modules.join(sub), &target)?;
    }
    for file in fs::read_dir(modules)?.filter_map(Result::ok) {
        if file.path().is_file() {
            fs::copy(file.path(), guest_modules.join(file.file_name()))?;
        }
    }
    output_of(Command::new("depmod").arg("-b").arg(&root).arg(version))?;
    let init = root.join("init");
    fs::write(&init, init_script(&spec.command))?;
    output_of(Command::new("chmod").arg("755").arg(&init))?;
    let image = work.join("initrd.gz");
    output_of(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | cpio -o -H newc --quiet | gzip -1 > {}",
        image.display()
    )))?;
    Ok(image)
}

/// The directory shared by every guest run: `target/guest` of this workspace.
fn guest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/guest")
}

/// Boots the guest for `spec`, hands `on_line` each console line as it comes, and
/// fails (with the console's last lines) unless the command exited 0.
pub fn run(spec: &GuestRun, mut on_line: impl FnMut(&str)) -> Result<GuestOutcome> {
    let dir = guest_dir();
    let (unpacked, version) = kernel(&dir, spec.kernel)?;
    let work = dir.join(format!("{}-{}", spec.name, spec.kernel.release()));
    fs::create_dir_all(&work)?;
    let initrd = initramfs(&module_tree(&unpacked, &version)?, &work, &version, spec)?;
    let (accel_name, accel) = acceleration();
    let kernel_image = unpacked.join("boot").join(format!("vmlinuz-{version}"));
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(&accel)
        .args([
            "-smp",
            "2",
            "-m",
            "2048",
            "-nodefaults",
            "-nic",
            "none",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&kernel_image)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("qemu-system-x86_64 (qemu-system-x86)")?;
    let stdout = child.stdout.take().context("guest console")?;
    let mut exit = None;
    let mut log = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(code) = line.split("EPX-GUEST-EXIT ").nth(1) {
            exit = code.trim().parse::<i32>().ok();
        } else {
            on_line(&line);
            log.push(line);
        }
    }
    let _ = child.wait();
    if exit != Some(0) {
        let tail: Vec<&String> = log.iter().rev().take(60).collect();
        bail!(
            "the guest run failed (exit {exit:?}); its console ended with:\n{}",
            tail.into_iter()
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(GuestOutcome {
        kernel: version,
        acceleration: accel_name,
        elapsed: started.elapsed(),
    })
}

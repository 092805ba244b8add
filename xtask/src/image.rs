//! `cargo xtask image`: an OCI image of the agent with no base image. The layer holds
//! the release binary and the shared libraries it links (found from its ELF dynamic
//! section, taken from this machine's Debian packages), nothing else: no shell, no
//! package manager. Written as an OCI image layout directory and as an `oci-archive`
//! tarball of that directory, tagged `ebpf-proxy:<version>`.
//!
//! Reproducible: entries sorted, owned by 0:0, fixed modes, mtime `SOURCE_DATE_EPOCH`
//! (0 without it), gzip header mtime 0, and no timestamp in any JSON, so the same
//! binary and libraries give the same digests (`tests::two_builds_are_identical`).

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// Where the entrypoint lives in the image.
pub const ENTRYPOINT: &str = "/usr/bin/ebpf-proxy";

/// A platform the image can be built for.
pub struct Arch {
    /// The OCI (Go) name: `amd64`, `arm64`.
    pub name: &'static str,
    /// The Rust target when cross-compiling; `None` builds for this machine.
    rust_target: Option<&'static str>,
    /// Debian's multiarch tuple: libraries go to `/lib/<tuple>` in the image, where
    /// the dynamic loader looks without an `ld.so.cache`.
    multiarch: &'static str,
    /// Where this machine's packages put the target's libraries (the native ones, or
    /// the `*-cross` packages' for a foreign architecture).
    host_lib_dir: &'static str,
    /// The C compiler that links the agent and builds ring's C parts when crossing.
    cross_gcc: Option<&'static str>,
    /// The Debian packages of that compiler and of the target's libc.
    cross_packages: &'static [&'static str],
}

pub const ARCHES: [Arch; 2] = [
    Arch {
        name: "amd64",
        rust_target: None,
        multiarch: "x86_64-linux-gnu",
        host_lib_dir: "/lib/x86_64-linux-gnu",
        cross_gcc: None,
        cross_packages: &[],
    },
    Arch {
        name: "arm64",
        rust_target: Some("aarch64-unknown-linux-gnu"),
        multiarch: "aarch64-linux-gnu",
        host_lib_dir: "/usr/aarch64-linux-gnu/lib",
        cross_gcc: Some("aarch64-linux-gnu-gcc"),
        cross_packages: &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"],
    },
];

/// The workspace's version (xtask shares it with the agent): the image's tag.
pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// The image's name and tag, as the DaemonSet refers to it.
pub fn reference() -> String {
    format!("ebpf-proxy:{}", version())
}

/// `target/image/ebpf-proxy-<version>[-<arch>]`: the layout directory (amd64 has
/// no suffix, being the one the tests run).
pub fn layout_dir(arch: &Arch) -> PathBuf {
    let suffix = match arch.name {
        "amd64" => String::new(),
        other => format!("-{other}"),
    };
    super::workspace_root().join(format!("target/image/ebpf-proxy-{}{suffix}", version()))
}

pub fn arch(name: &str) -> Result<&'static Arch> {
    ARCHES.iter().find(|a| a.name == name).with_context(|| {
        let known: Vec<&str> = ARCHES.iter().map(|a| a.name).collect();
        format!("unknown architecture {name}: one of {}", known.join(", "))
    })
}

/// Builds the agent for `arch` and writes its image; prints where and its digest.
pub fn build(arch: &Arch) -> Result<()> {
    let binary = build_agent(arch)?;
    let libraries = libraries(arch, &binary)?;
    let dir = layout_dir(arch);
    let image = Image {
        arch: arch.name,
        version: version(),
        files: root_filesystem(&binary, &libraries)?,
        packages: packages_of(&libraries)?,
    };
    let digest = image.write_layout(&dir)?;
    let archive = dir.with_file_name(format!("ebpf-proxy-{}-{}.tar", version(), arch.name));
    write_archive(&dir, &archive)?;
    println!(
        "{} ({}): {}\n  layout  {}\n  archive {}",
        reference(),
        arch.name,
        digest,
        dir.display(),
        archive.display()
    );
    Ok(())
}

fn build_agent(arch: &Arch) -> Result<PathBuf> {
    let mut cargo = super::cargo();
    cargo.args([
        "build",
        "--release",
        "--package",
        "proxy-userspace",
        "--bin",
        "ebpf-proxy",
    ]);
    let mut out = super::workspace_root().join("target");
    if let (Some(target), Some(gcc)) = (arch.rust_target, arch.cross_gcc) {
        super::setup::ensure_cross(target, arch.cross_packages)?;
        let env_target = target.replace('-', "_");
        cargo
            .args(["--target", target])
            .env(
                format!("CARGO_TARGET_{}_LINKER", env_target.to_uppercase()),
                gcc,
            )
            .env(format!("CC_{env_target}"), gcc);
        out.push(target);
    }
    super::run(cargo)?;
    Ok(out.join("release/ebpf-proxy"))
}

/// A file of the image: its path there (absolute), and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    File { contents: Vec<u8>, mode: u32 },
    Symlink(String),
}

/// The binary, its dynamic loader and every library it needs (transitively). A file
/// needed under two names (`ld-linux*.so` is both the interpreter and a DT_NEEDED of
/// libc) is stored once; its second name is a symlink to the first.
fn root_filesystem(
    binary: &Path,
    libraries: &[(String, PathBuf)],
) -> Result<BTreeMap<String, Entry>> {
    let mut files = BTreeMap::new();
    files.insert(
        ENTRYPOINT.to_owned(),
        Entry::File {
            contents: std::fs::read(binary)
                .with_context(|| format!("reading {}", binary.display()))?,
            mode: 0o755,
        },
    );
    let mut placed: BTreeMap<PathBuf, String> = BTreeMap::new();
    for (image_path, host_path) in libraries {
        let canonical = host_path
            .canonicalize()
            .with_context(|| format!("{} (is its package installed?)", host_path.display()))?;
        let entry = match placed.get(&canonical) {
            Some(first) => Entry::Symlink(first.clone()),
            None => {
                placed.insert(canonical.clone(), image_path.clone());
                Entry::File {
                    contents: std::fs::read(&canonical)?,
                    mode: 0o755,
                }
            }
        };
        files.insert(image_path.clone(), entry);
    }
    Ok(files)
}

/// (path in the image, path on this machine) of the loader and of each library,
/// loader first.
fn libraries(arch: &Arch, binary: &Path) -> Result<Vec<(String, PathBuf)>> {
    let host = |name: &str| Path::new(arch.host_lib_dir).join(name);
    let (interpreter, mut pending) = dynamic_section(binary)?;
    let interpreter = interpreter.context("the agent is not dynamically linked")?;
    let loader_name = Path::new(&interpreter)
        .file_name()
        .and_then(|n| n.to_str())
        .context("interpreter name")?
        .to_owned();
    let mut found = vec![(interpreter, host(&loader_name))];
    let mut seen = std::collections::BTreeSet::new();
    while let Some(name) = pending.pop() {
        if !seen.insert(name.clone()) {
            continue;
        }
        let path = host(&name);
        pending.extend(dynamic_section(&path)?.1);
        found.push((format!("/lib/{}/{name}", arch.multiarch), path));
    }
    Ok(found)
}

/// The ELF interpreter and DT_NEEDED names, read with binutils' `readelf` (which
/// reads any architecture's ELF; `ldd` would have to run a foreign binary).
fn dynamic_section(path: &Path) -> Result<(Option<String>, Vec<String>)> {
    let output = Command::new("readelf")
        .args(["--wide", "--program-headers", "--dynamic"])
        .arg(path)
        .output()
        .context("running readelf (binutils)")?;
    if !output.status.success() {
        bail!(
            "readelf {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let bracketed = |marker: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.split_once(marker)?.1.split_once(']'))
            .map(|(name, _)| name.trim().to_owned())
            .collect()
    };
    let interpreter = bracketed("Requesting program interpreter:")
        .into_iter()
        .next();
    Ok((interpreter, bracketed("Shared library: [")))
}

/// The Debian packages (and versions) the libraries come from, for the image's
/// label: where its parts came from, and a refusal of files no package owns.
fn packages_of(libraries: &[(String, PathBuf)]) -> Result<Vec<String>> {
    let mut packages = std::collections::BTreeSet::new();
    for (_, path) in libraries {
        let owner = Command::new("dpkg-query")
            .arg("--search")
            .arg(path)
            .output()?;
        let owner = String::from_utf8_lossy(&owner.stdout);
        let package = owner
            .split_once(": ")
            .map(|(p, _)| p.to_owned())
            .with_context(|| format!("{} belongs to no Debian package", path.display()))?;
        let version = Command::new("dpkg-query")
            .args(["--show", "--showformat=${Version}", &package])
            .output()?;
        packages.insert(format!(
            "{package}={}",
            String::from_utf8_lossy(&version.stdout)
        ));
    }
    Ok(packages.into_iter().collect())
}

pub struct Image<'a> {
    pub arch: &'a str,
    pub version: &'a str,
    pub files: BTreeMap<String, Entry>,
    pub packages: Vec<String>,
}

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

impl Image<'_> {
    /// Writes the OCI image layout at `dir` (replacing it); the manifest's digest.
    pub fn write_layout(&self, dir: &Path) -> Result<String> {
        let layer_tar = self.layer()?;
        let diff_id = digest(&layer_tar);
        let mut gzip = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::best());
        gzip.write_all(&layer_tar)?;
        let layer = gzip.finish()?;

        let _ = std::fs::remove_dir_all(dir);
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
        let blob = |bytes: &[u8], media_type: &str| -> Result<Value> {
            let digest = digest(bytes);
            let hex = digest.trim_start_matches("sha256:");
            std::fs::write(blobs.join(hex), bytes)?;
            Ok(json!({"mediaType": media_type, "digest": digest, "size": bytes.len()}))
        };
        let labels = json!({
            "org.opencontainers.image.title": "ebpf-proxy",
            "org.opencontainers.image.version": self.version,
            "org.opencontainers.image.licenses": "MIT OR Apache-2.0",
            "io.ebpf-proxy.debian-packages": self.packages.join(" "),
        });
        let config = json!({
            "architecture": self.arch,
            "os": "linux",
            "config": {
                "User": "0",
                "Entrypoint": [ENTRYPOINT],
                "Labels": labels,
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        });
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": blob(&to_vec(&config)?, "application/vnd.oci.image.config.v1+json")?,
            "layers": [blob(&layer, "application/vnd.oci.image.layer.v1.tar+gzip")?],
        });
        let manifest_bytes = to_vec(&manifest)?;
        let mut descriptor = blob(&manifest_bytes, MANIFEST_TYPE)?;
        descriptor["platform"] = json!({"architecture": self.arch, "os": "linux"});
        // The tag for podman/skopeo (`oci-archive`), and the name containerd's
        // `ctr images import` registers (the one kubelet asks for `ebpf-proxy:<v>`).
        descriptor["annotations"] = json!({
            "org.opencontainers.image.ref.name": format!("ebpf-proxy:{}", self.version),
            "io.containerd.image.name": format!("docker.io/library/ebpf-proxy:{}", self.version),
        });
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [descriptor.clone()],
        });
        std::fs::write(dir.join("index.json"), to_vec(&index)?)?;
        std::fs::write(
            dir.join("oci-layout"),
            to_vec(&json!({"imageLayoutVersion": "1.0.0"}))?,
        )?;
        Ok(descriptor["digest"].as_str().context("digest")?.to_owned())
    }

    /// The uncompressed layer: parent directories, then files, in path order.
    fn layer(&self) -> Result<Vec<u8>> {
        let mut directories = std::collections::BTreeSet::new();
        for path in self.files.keys() {
            for ancestor in Path::new(path).ancestors().skip(1) {
                if ancestor != Path::new("/") {
                    directories.insert(ancestor.to_owned());
                }
            }
        }
        let mut tar = Deterministic::new();
        for directory in &directories {
            tar.append(
                &relative(directory),
                tar::EntryType::Directory,
                0o755,
                &[],
                None,
            )?;
        }
        for (path, entry) in &self.files {
            let path = relative(Path::new(path));
            match entry {
                Entry::File { contents, mode } => {
                    tar.append(&path, tar::EntryType::Regular, *mode, contents, None)?
                }
                Entry::Symlink(target) => {
                    tar.append(&path, tar::EntryType::Symlink, 0o777, &[], Some(target))?
                }
            }
        }
        tar.finish()
    }
}

fn relative(path: &Path) -> PathBuf {
    path.strip_prefix("/").unwrap_or(path).to_owned()
}

/// A tar whose headers depend on nothing but the entries: owner 0:0, no user or
/// group names, one fixed mtime.
struct Deterministic {
    builder: tar::Builder<Vec<u8>>,
    mtime: u64,
}

impl Deterministic {
    fn new() -> Deterministic {
        let mtime = std::env::var("SOURCE_DATE_EPOCH")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Deterministic {
            builder: tar::Builder::new(Vec::new()),
            mtime,
        }
    }

    fn append(
        &mut self,
        path: &Path,
        kind: tar::EntryType,
        mode: u32,
        contents: &[u8],
        link: Option<&str>,
    ) -> Result<()> {
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(self.mtime);
        header.set_size(contents.len() as u64);
        if let Some(link) = link {
            header.set_link_name(link)?;
        }
        self.builder
            .append_data(&mut header, path, contents)
            .with_context(|| format!("adding {}", path.display()))
    }

    fn finish(self) -> Result<Vec<u8>> {
        Ok(self.builder.into_inner()?)
    }
}

/// The `oci-archive` form (podman load, skopeo): the layout directory as a tar.
fn write_archive(dir: &Path, archive: &Path) -> Result<()> {
    let mut paths: Vec<PathBuf> = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        for entry in std::fs::read_dir(&next)? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            paths.push(path);
        }
    }
    paths.sort();
    let mut tar = Deterministic::new();
    for path in paths {
        let name = path.strip_prefix(dir)?;
        if path.is_dir() {
            tar.append(name, tar::EntryType::Directory, 0o755, &[], None)?;
        } else {
            tar.append(
                name,
                tar::EntryType::Regular,
                0o644,
                &std::fs::read(&path)?,
                None,
            )?;
        }
    }
    std::fs::write(archive, tar.finish()?).with_context(|| format!("writing {}", archive.display()))
}

fn digest(bytes: &[u8]) -> String {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// serde_json keeps object keys sorted (no `preserve_order`), so equal values give
/// equal bytes.
fn to_vec(value: &Value) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image<'static> {
        let mut files = BTreeMap::new();
        files.insert(
            "/usr/bin/ebpf-proxy".to_owned(),
            Entry::File {
                contents: b"\x7fELF agent".to_vec(),
                mode: 0o755,
            },
        );
        files.insert(
            "/lib/x86_64-linux-gnu/libc.so.6".to_owned(),
            Entry::File {
                contents: b"libc".to_vec(),
                mode: 0o755,
            },
        );
        files.insert(
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2".to_owned(),
            Entry::Symlink("/lib64/ld-linux-x86-64.so.2".to_owned()),
        );
        Image {
            arch: "amd64",
            version: "1.2.3",
            files,
            packages: vec!["libc6:amd64=2.36".to_owned()],
        }
    }

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("xtask-image-{}-{name}", std::process::id()))
    }

    #[test]
    fn two_builds_are_identical_and_name_their_parts_by_digest() {
        let (first, second) = (scratch("a"), scratch("b"));
        let digest_a = image().write_layout(&first).expect("layout");
        // Built later, as a second build would be: nothing depends on the time.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let digest_b = image().write_layout(&second).expect("layout");
        assert_eq!(digest_a, digest_b);
        write_archive(&first, &first.with_extension("tar")).expect("archive");
        write_archive(&second, &second.with_extension("tar")).expect("archive");
        let archive = |dir: &Path| std::fs::read(dir.with_extension("tar")).expect("tar");
        assert_eq!(archive(&first), archive(&second));

        // Every blob is named by its digest, and the index tags the manifest.
        for blob in std::fs::read_dir(first.join("blobs/sha256")).expect("blobs") {
            let path = blob.expect("blob").path();
            let name = path.file_name().and_then(|n| n.to_str()).expect("name");
            let bytes = std::fs::read(&path).expect("read");
            assert_eq!(digest(&bytes), format!("sha256:{name}"));
        }
        let index: Value =
            serde_json::from_slice(&std::fs::read(first.join("index.json")).expect("index"))
                .expect("json");
        let manifest = &index["manifests"][0];
        assert_eq!(manifest["digest"], digest_a.as_str());
        assert_eq!(
            manifest["annotations"]["org.opencontainers.image.ref.name"],
            "ebpf-proxy:1.2.3"
        );
        for path in [&first, &second] {
            let _ = std::fs::remove_dir_all(path);
            let _ = std::fs::remove_file(path.with_extension("tar"));
        }
    }

    #[test]
    fn the_layer_is_sorted_owned_by_root_and_timeless() {
        let layer = image().layer().expect("layer");
        let mut archive = tar::Archive::new(layer.as_slice());
        let mut paths = Vec::new();
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            let header = entry.header();
            assert_eq!((header.uid().ok(), header.gid().ok()), (Some(0), Some(0)));
            assert_eq!(header.mtime().ok(), Some(Deterministic::new().mtime));
            paths.push(entry.path().expect("path").display().to_string());
        }
        assert_eq!(
            paths,
            [
                "lib",
                "lib/x86_64-linux-gnu",
                "usr",
                "usr/bin",
                "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "lib/x86_64-linux-gnu/libc.so.6",
                "usr/bin/ebpf-proxy",
            ]
        );
    }
}

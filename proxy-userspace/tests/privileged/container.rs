//! The agent's image (`cargo xtask image`) run as the DaemonSet runs it (issue 15):
//! unpacked from its OCI layout (digests checked), started by runc from Debian's
//! packages in the node's namespace, with the DaemonSet's own security context and
//! mounts translated into an OCI runtime config as a CRI runtime would (containerd's
//! defaults for what the DaemonSet leaves unsaid), its privileged init container
//! first. Traffic then goes through the containerised agent.
//!
//! runc rather than crun (both Debian's): crun 1.8 refuses this kind of host's hybrid
//! cgroup layout ("cgroups in hybrid mode not supported, drop all controllers from
//! cgroupv2") unless started in its own mount namespace over a cgroup2-only
//! /sys/fs/cgroup with its cgroup manager disabled, which is no longer the runtime as
//! a node runs it. Not reproduced: the RuntimeDefault seccomp profile (containerd
//! generates it; the container here has none).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, PodSpec},
};
use serde_json::{json, Value};
use testbed::{
    agent::{Agent, AgentOptions},
    manifests::render,
    topology::{Topology, CLIENT_IP, NODE_IP},
};

use crate::support::{cluster::*, services::*};

/// The capabilities by number (capability.h), so that a name gives its bit in
/// /proc/PID/status's masks.
const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// containerd's masked and read-only paths for a container that is not privileged
/// (/proc/sys among the latter: the agent cannot set sysctls itself).
const MASKED_PATHS: [&str; 10] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn daemonset() -> PodSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/daemonset.yaml");
    let daemonset: DaemonSet = serde_yaml::from_str(&text).expect("a DaemonSet");
    daemonset
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec")
}

/// The image's OCI layout, as `cargo xtask image` leaves it in the target directory
/// the test binary was built in (`cargo xtask test` builds it first).
fn layout() -> PathBuf {
    let target = Path::new(env!("CARGO_BIN_EXE_ebpf-proxy"))
        .ancestors()
        .nth(2)
        .expect("target directory");
    let layout = target.join(format!("image/ebpf-proxy-{}", env!("CARGO_PKG_VERSION")));
    assert!(
        layout.join("index.json").exists(),
        "no image at {}: build it with `cargo xtask image` (`cargo xtask test` does)",
        layout.display()
    );
    layout
}

/// The blob `digest` names, after checking that it is what it is named by.
fn blob(layout: &Path, descriptor: &Value) -> PathBuf {
    let digest = descriptor["digest"].as_str().expect("digest");
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let path = layout.join("blobs/sha256").join(hex);
    let sum = Command::new("sha256sum")
        .arg(&path)
        .output()
        .expect("sha256sum");
    assert_eq!(
        String::from_utf8_lossy(&sum.stdout)
            .split_whitespace()
            .next(),
        Some(hex),
        "{} does not match its digest",
        path.display()
    );
    path
}

fn json_file(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("JSON")
}

/// A directory holding the unpacked image, the runtime configs and runc's state;
/// every container in that state is deleted, and the directory removed, when dropped.
struct Bundle {
    dir: PathBuf,
    rootfs: PathBuf,
    entrypoint: Vec<String>,
}

impl Bundle {
    /// Unpacks the image tagged with this version.
    fn unpack(dir: PathBuf) -> Bundle {
        let _ = std::fs::remove_dir_all(&dir);
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(&rootfs).expect("bundle directory");
        // Built before the rest, so that a failure below still removes the directory.
        let mut bundle = Bundle {
            dir,
            rootfs,
            entrypoint: Vec::new(),
        };
        let layout = layout();
        let index = json_file(&layout.join("index.json"));
        let tagged = index["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .find(|m| {
                m["annotations"]["org.opencontainers.image.ref.name"]
                    == format!("ebpf-proxy:{}", env!("CARGO_PKG_VERSION")).as_str()
            })
            .expect("a manifest tagged ebpf-proxy:<version>");
        let manifest = json_file(&blob(&layout, tagged));
        let config = json_file(&blob(&layout, &manifest["config"]));
        assert_eq!(config["config"]["User"], "0");
        for layer in manifest["layers"].as_array().expect("layers") {
            let unpacked = Command::new("tar")
                .arg("-xzf")
                .arg(blob(&layout, layer))
                .arg("-C")
                .arg(&bundle.rootfs)
                .status()
                .expect("tar");
            assert!(unpacked.success(), "unpacking {layer}");
        }
        bundle.entrypoint = config["config"]["Entrypoint"]
            .as_array()
            .expect("Entrypoint")
            .iter()
            .map(|a| a.as_str().expect("string").to_owned())
            .collect();
        bundle
    }

    fn runc(&self) -> Command {
        let mut runc = Command::new("runc");
        runc.arg("--root").arg(self.dir.join("state"));
        runc
    }

    /// Writes `file` (`config.json`, or the template `launcher` fills in) of the
    /// runtime bundle `name`.
    fn write_config(&self, name: &str, file: &str, config: &Value) {
        let dir = self.dir.join(name);
        std::fs::create_dir_all(&dir).expect("config directory");
        std::fs::write(
            dir.join(file),
            serde_json::to_vec_pretty(config).expect("JSON"),
        )
        .expect("write");
    }

    /// A program the testbed starts the agent with (`launcher BINARY ARG…`) that
    /// runs the image's entrypoint with those ARGs in container `id` of bundle
    /// `name`: runc takes a process's arguments only from config.json, so they
    /// replace the "@ARGS@" of its config.template.json (they are paths and names: no
    /// quote, backslash, `|` or `&`). BINARY, the host's build, is not used.
    fn launcher(&self, name: &str, id: &str) -> String {
        let bundle = self.dir.join(name);
        let state = self.dir.join("state");
        let script = format!(
            "#!/bin/sh\nset -e\nshift\nargs=$(printf '\"%s\",' \"$@\")\n\
             sed \"s|\\\"@ARGS@\\\"|${{args%,}}|\" {bundle}/config.template.json > {bundle}/config.json\n\
             exec runc --root {state} run --bundle {bundle} {id}\n",
            bundle = bundle.display(),
            state = state.display(),
        );
        let path = self.dir.join(format!("launch-{name}"));
        std::fs::write(&path, script).expect("launcher");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path.to_str().expect("path").to_owned()
    }

    /// The host pid of container `id`'s process.
    fn pid(&self, id: &str) -> u32 {
        let state = self
            .runc()
            .args(["state", id])
            .output()
            .expect("runc state");
        assert!(state.status.success(), "runc state {id}: {state:?}");
        let state: Value = serde_json::from_slice(&state.stdout).expect("JSON");
        assert_eq!(state["status"], "running");
        state["pid"].as_u64().expect("pid") as u32
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        if let Ok(listed) = self.runc().args(["list", "--quiet"]).output() {
            for id in String::from_utf8_lossy(&listed.stdout).split_whitespace() {
                let _ = self.runc().args(["delete", "--force", id]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the test changes in the DaemonSet's pod: the node's namespace stands for the
/// host network, the test's pin directory for `/sys/fs/bpf/ebpf-proxy`.
struct Node<'a> {
    netns: &'a Path,
    pin_dir: &'a Path,
}

/// The OCI runtime config a CRI runtime makes of `container` in `pod`, with
/// `args` after the image's entrypoint, and `binds` (host directories, mounted at
/// the same path) beside the DaemonSet's mounts.
fn runtime_config(
    bundle: &Bundle,
    pod: &PodSpec,
    container: &Container,
    node: &Node<'_>,
    args: &[&str],
    binds: &[&Path],
) -> Value {
    let security = container.security_context.clone().unwrap_or_default();
    let privileged = security.privileged == Some(true);
    let capabilities: Vec<String> = if privileged {
        // containerd's: every capability the runtime holds (this host's bounding set
        // lacks some: asking for one it lacks fails the container).
        let held = u64::from_str_radix(&status_field("self", "CapBnd"), 16).expect("CapBnd");
        CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(bit, _)| held & (1 << bit) != 0)
            .map(|(_, c)| format!("CAP_{c}"))
            .collect()
    } else {
        let listed = security.capabilities.clone().expect("capabilities");
        assert_eq!(
            listed.drop.as_deref(),
            Some(&["ALL".to_owned()][..]),
            "only `drop: [ALL]` is translated"
        );
        listed
            .add
            .unwrap_or_default()
            .iter()
            .map(|c| format!("CAP_{c}"))
            .collect()
    };
    let daemonset_pin_dir = pod.containers[0]
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--pin-dir="))
        .expect("--pin-dir");
    let on_node = |path: &str| -> PathBuf {
        if path == daemonset_pin_dir {
            node.pin_dir.to_owned()
        } else {
            PathBuf::from(path)
        }
    };
    // containerd's defaults, less what the agent never touches (mqueue, and the
    // cgroup mount the DaemonSet replaces with its own).
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", if privileged { "rw" } else { "ro" }]}),
    ];
    let mut declared: Vec<(PathBuf, Value)> = Vec::new();
    for mount in container.volume_mounts.iter().flatten() {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .expect("the mount's volume");
        let destination = on_node(&mount.mount_path);
        let entry = if let Some(host_path) = &volume.host_path {
            let source = on_node(&host_path.path);
            if host_path.type_.as_deref() == Some("DirectoryOrCreate") {
                std::fs::create_dir_all(&source).expect("hostPath DirectoryOrCreate");
            }
            let propagation = match mount.mount_propagation.as_deref() {
                Some("HostToContainer") => "rslave",
                None | Some("None") => "rprivate",
                Some(other) => panic!("mountPropagation {other} is not translated"),
            };
            let access = if mount.read_only == Some(true) {
                "ro"
            } else {
                "rw"
            };
            json!({"destination": destination, "type": "bind", "source": source,
                   "options": ["rbind", access, propagation]})
        } else if volume
            .empty_dir
            .as_ref()
            .is_some_and(|e| e.medium.as_deref() == Some("Memory"))
        {
            json!({"destination": destination, "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "nodev", "mode=755"]})
        } else {
            panic!("volume {} is not translated", volume.name)
        };
        declared.push((destination, entry));
    }
    for bind in binds {
        declared.push((
            bind.to_path_buf(),
            json!({"destination": bind, "type": "bind", "source": bind,
                   "options": ["rbind", "rw", "rprivate"]}),
        ));
    }
    // As containerd orders them: a mount point inside another mount comes after it.
    declared.sort_by_key(|(destination, _)| destination.components().count());
    mounts.extend(declared.into_iter().map(|(_, entry)| entry));

    let mut process_args = bundle.entrypoint.clone();
    process_args.extend(args.iter().map(|a| a.to_string()));
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent serves the node's network"
    );
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": process_args,
            "env": ["PATH=/usr/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": capabilities,
                "effective": capabilities,
                "permitted": capabilities,
            },
            "noNewPrivileges": security.allow_privilege_escalation == Some(false),
        },
        "root": {
            "path": bundle.rootfs,
            "readonly": security.read_only_root_filesystem == Some(true),
        },
        "mounts": mounts,
        "linux": {
            // hostNetwork: the node's network (and, as kubelet does, its hostname).
            "namespaces": [
                {"type": "pid"},
                {"type": "ipc"},
                {"type": "mount"},
                {"type": "network", "path": node.netns},
            ],
            "maskedPaths": if privileged { &[][..] } else { &MASKED_PATHS[..] },
            "readonlyPaths": if privileged { &[][..] } else { &READONLY_PATHS[..] },
        },
    })
}

/// The bits of these capabilities in /proc/PID/status's masks.
fn capability_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|name| {
            let number = CAPABILITIES
                .iter()
                .position(|c| *c == name.as_str())
                .unwrap_or_else(|| panic!("unknown capability {name}"));
            1u64 << number
        })
        .sum()
}

/// `Key:\tvalue` of /proc/PID/status.
fn status_field(pid: impl std::fmt::Display, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

/// Whether the mount at `path` (as the process sees it) is read-only.
fn mounted_read_only(pid: u32, path: &str) -> bool {
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mountinfo");
    let line = mountinfo
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(path))
        .unwrap_or_else(|| panic!("{path} is not a mount point:\n{mountinfo}"));
    line.split(' ')
        .nth(5)
        .is_some_and(|options| options.split(',').any(|o| o == "ro"))
}

#[test]
fn the_image_serves_under_runc_with_the_daemonsets_security_context() {
    let prefix = format!("epx{}ctr", std::process::id() % 100_000);
    let bundle = Bundle::unpack(PathBuf::from(format!("/tmp/{prefix}-bundle")));
    let topology = Topology::build(&prefix, 2, 0).expect("topology");
    let work_dir = PathBuf::from(format!("/tmp/{prefix}"));
    // The testbed's agent pins here (named after its work directory).
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{prefix}"));
    let netns = topology.node.path();
    let node = Node {
        netns: &netns,
        pin_dir: &pin_dir,
    };
    let pod = daemonset();
    let sysctl = "net.ipv4.conf.all.accept_local";
    let accept_local = || {
        topology
            .node
            .exec("sysctl", &["-n", sysctl])
            .expect("sysctl")
    };

    // The init container: the image's `prepare-node`, privileged, sets what the
    // agent's read-only /proc/sys will not let it set.
    assert_eq!(accept_local().trim(), "0", "a fresh node namespace");
    let init = &pod.init_containers.as_ref().expect("init containers")[0];
    let init_args: Vec<&str> = init.args.iter().flatten().map(String::as_str).collect();
    bundle.write_config(
        "init",
        "config.json",
        &runtime_config(&bundle, &pod, init, &node, &init_args, &[]),
    );
    let prepared = bundle
        .runc()
        .arg("run")
        .arg("--bundle")
        .arg(bundle.dir.join("init"))
        .arg(format!("{prefix}-init"))
        .output()
        .expect("runc run");
    assert!(prepared.status.success(), "prepare-node: {prepared:?}");
    assert_eq!(accept_local().trim(), "1", "set by the init container");

    let container = &pod.containers[0];
    // The work directory (manifests file, ready marker) is mounted as the
    // standalone mode's ConfigMap is; the testbed creates it before the launcher runs.
    bundle.write_config(
        "agent",
        "config.template.json",
        &runtime_config(&bundle, &pod, container, &node, &["@ARGS@"], &[&work_dir]),
    );
    let id = format!("{prefix}-agent");
    let launcher = bundle.launcher("agent", &id);
    let services = |t: &Topology| {
        let mut service = web(t, &["pod-a1", "pod-a2"]);
        service.node_port = Some(NODE_PORT);
        vec![service]
    };
    let agent = Agent::start_with(
        env!("CARGO_BIN_EXE_ebpf-proxy").as_ref(),
        &topology,
        &work_dir,
        &render(&services(&topology)),
        AgentOptions {
            launcher: &[&launcher],
            ..Default::default()
        },
    )
    .expect("the agent in its container");
    assert_eq!(agent.pin_dir, pin_dir, "the pin directory mounted");
    let cluster = Cluster {
        agent,
        api: None,
        topology,
    };

    // It is the image's binary, confined as the DaemonSet says.
    let pid = bundle.pid(&id);
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe"),
        Path::new(&bundle.entrypoint[0])
    );
    let granted = container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .expect("added capabilities");
    let expected = format!("{:016x}", capability_mask(&granted));
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(status_field(pid, set), expected, "{set}");
    }
    for set in ["CapInh", "CapAmb"] {
        assert_eq!(status_field(pid, set), "0000000000000000", "{set}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert!(mounted_read_only(pid, "/"), "read-only root file system");
    assert!(mounted_read_only(pid, "/proc/sys"), "read-only /proc/sys");
    assert!(mounted_read_only(pid, "/sys/fs/cgroup"));
    assert!(!mounted_read_only(pid, pin_dir.to_str().expect("path")));

    // Traffic goes through it: the ClusterIP from a pod, the NodePort from outside.
    let from_pod = curl_n(cluster.ns("pod-a2"), &format!("http://{WEB_VIP}/"), 4);
    assert_eq!(tally(&from_pod).len(), 2, "{from_pod:?}");
    let client = &cluster.topology.client;
    let from_outside = curl_n(client, &format!("http://{NODE_IP}:{NODE_PORT}/"), 4);
    assert_eq!(tally(&from_outside).len(), 2, "{from_outside:?}");
    assert!(
        from_outside.iter().all(|b| client_of(b) == CLIENT_IP),
        "{from_outside:?}"
    );
}

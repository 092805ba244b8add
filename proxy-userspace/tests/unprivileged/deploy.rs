//! The deployment manifests in deploy/: they parse as the Kubernetes objects they
//! claim to be, pass the agent only flags it has and settings the ConfigMap defines,
//! grant exactly the capabilities the agent checks for and exactly the API access it
//! uses, and ship a services file the agent accepts.

use std::collections::BTreeSet;

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::de::DeserializeOwned;

fn deploy_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The documents of a multi-document file, each parsed as `T` when its kind matches.
fn documents<T: DeserializeOwned>(name: &str, kind: &str) -> Vec<T> {
    deploy_file(name)
        .split("\n---")
        .filter(|d| d.lines().any(|l| l == format!("kind: {kind}")))
        .map(|d| serde_yaml::from_str(d).unwrap_or_else(|e| panic!("{name}: {kind}: {e}")))
        .collect()
}

/// Every flag of `args` (after `run`) is one the agent has.
fn assert_known_flags(args: &[String]) {
    assert_eq!(args[0], "run");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_ebpf-proxy"))
        .args(["run", "--help"])
        .output()
        .expect("ebpf-proxy run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in &args[1..] {
        let flag = arg.split('=').next().expect("flag");
        assert!(
            [" ", " <", "\n"]
                .iter()
                .any(|end| help.contains(&format!("{flag}{end}"))),
            "unknown flag {flag}"
        );
    }
}

/// `$(NAME)` references of the arguments.
fn variables(args: &[String]) -> BTreeSet<String> {
    args.iter()
        .filter_map(|a| Some(a.split_once("$(")?.1.split_once(')')?.0.to_owned()))
        .collect()
}

fn agent_container(daemonset: DaemonSet) -> (Container, k8s_openapi::api::core::v1::PodSpec) {
    let pod = daemonset
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    (pod.containers[0].clone(), pod)
}

#[test]
fn the_daemonset_runs_the_agent_with_its_own_flags_and_three_capabilities() {
    let daemonset: DaemonSet =
        serde_yaml::from_str(&deploy_file("daemonset.yaml")).expect("a DaemonSet");
    let (container, pod) = agent_container(daemonset);
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent serves the node's own network"
    );
    let args = container.args.clone().expect("args");
    assert_known_flags(&args);
    assert!(args.contains(&"--kubernetes".to_owned()));
    // The node's addresses (both families) come from its Node object.
    assert!(!args.iter().any(|a| a.starts_with("--node-ip")), "{args:?}");
    // Every $(VAR) comes from the settings ConfigMap or the downward API.
    let config: ConfigMap = serde_yaml::from_str(&deploy_file("config.yaml")).expect("a ConfigMap");
    let mut defined: BTreeSet<String> = config.data.expect("data").into_keys().collect();
    defined.extend(container.env.iter().flatten().map(|e| e.name.clone()));
    let from = container.env_from.clone().expect("envFrom");
    assert_eq!(
        from[0].config_map_ref.as_ref().map(|r| r.name.as_str()),
        Some("ebpf-proxy-config")
    );
    let missing: Vec<String> = variables(&args).difference(&defined).cloned().collect();
    assert!(missing.is_empty(), "undefined settings: {missing:?}");
    let capabilities = container
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.clone())
        .expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
    let mut added = capabilities.add.expect("added");
    added.sort();
    assert_eq!(added, vec!["BPF", "NET_ADMIN", "PERFMON"]);
    let probe = container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.http_get.clone())
        .expect("readiness");
    assert_eq!(probe.path.as_deref(), Some("/readyz"));
    assert_eq!(pod.service_account_name.as_deref(), Some("ebpf-proxy"));
}

/// Issue 14: the DaemonSet ran without a read-only root, with privilege escalation
/// allowed, no seccomp profile, no resources, and the host's whole bpffs mounted.
#[test]
fn the_daemonset_is_hardened_and_its_one_privileged_step_is_the_agents_own() {
    let daemonset: DaemonSet =
        serde_yaml::from_str(&deploy_file("daemonset.yaml")).expect("a DaemonSet");
    let (container, pod) = agent_container(daemonset);
    let security = container.security_context.clone().expect("securityContext");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_ne!(security.privileged, Some(true));
    let seccomp = pod
        .security_context
        .and_then(|s| s.seccomp_profile)
        .expect("a pod seccomp profile");
    assert_eq!(seccomp.type_, "RuntimeDefault");
    let resources = container.resources.clone().expect("resources");
    assert!(resources.requests.is_some_and(|r| r.contains_key("memory")));
    assert!(resources.limits.is_some_and(|l| l.contains_key("memory")));
    // Only the agent's own pin directory of the host's bpffs is mounted.
    let args = container.args.clone().expect("args");
    let pin_dir = args
        .iter()
        .find_map(|a| a.strip_prefix("--pin-dir="))
        .expect("--pin-dir");
    let mounts = container.volume_mounts.clone().expect("mounts");
    let bpffs = mounts
        .iter()
        .find(|m| m.name == "bpffs")
        .expect("bpffs mount");
    assert_eq!(bpffs.mount_path, pin_dir);
    let volume = pod
        .volumes
        .expect("volumes")
        .into_iter()
        .find(|v| v.name == "bpffs")
        .and_then(|v| v.host_path)
        .expect("bpffs hostPath");
    assert_eq!(volume.path, pin_dir);
    // The privileged init container runs the agent's own `prepare-node`, which exists.
    let init = pod.init_containers.expect("init containers");
    assert_eq!(init.len(), 1);
    assert_eq!(
        init[0].args.as_deref(),
        Some(&["prepare-node".to_owned()][..])
    );
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_ebpf-proxy"))
        .arg("--help")
        .output()
        .expect("ebpf-proxy --help");
    assert!(String::from_utf8_lossy(&help.stdout).contains("prepare-node"));
}

/// Issue 15: `latest` named whatever was pushed last; the image `cargo xtask image`
/// builds is tagged with the crate's version, and both containers run that one.
#[test]
fn the_daemonset_runs_the_image_of_this_version() {
    let daemonset: DaemonSet =
        serde_yaml::from_str(&deploy_file("daemonset.yaml")).expect("a DaemonSet");
    let (_, pod) = agent_container(daemonset);
    let images: Vec<Option<String>> = pod
        .init_containers
        .iter()
        .flatten()
        .chain(&pod.containers)
        .map(|c| c.image.clone())
        .collect();
    let tag = format!("ebpf-proxy:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(images, [Some(tag.clone()), Some(tag)]);
    assert!(!deploy_file("daemonset.yaml").contains(":latest"));
}

#[test]
fn rbac_grants_exactly_the_api_access_the_agent_uses() {
    let roles: Vec<ClusterRole> = documents("rbac.yaml", "ClusterRole");
    let granted: BTreeSet<(String, String, Vec<String>)> = roles[0]
        .rules
        .iter()
        .flatten()
        .flat_map(|rule| {
            let mut verbs = rule.verbs.clone();
            verbs.sort();
            let groups = rule.api_groups.clone().unwrap_or_default();
            let resources = rule.resources.clone().unwrap_or_default();
            assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
            groups.into_iter().flat_map(move |g| {
                let verbs = verbs.clone();
                resources
                    .clone()
                    .into_iter()
                    .map(move |r| (g.clone(), r, verbs.clone()))
            })
        })
        .collect();
    let used: BTreeSet<(String, String, Vec<String>)> = ebpf_proxy::source::kubernetes::API_ACCESS
        .iter()
        .map(|(group, resource, verbs)| {
            let mut verbs: Vec<String> = verbs.iter().map(|v| v.to_string()).collect();
            verbs.sort();
            (group.to_string(), resource.to_string(), verbs)
        })
        .collect();
    assert_eq!(granted, used);

    let accounts: Vec<ServiceAccount> = documents("rbac.yaml", "ServiceAccount");
    let bindings: Vec<ClusterRoleBinding> = documents("rbac.yaml", "ClusterRoleBinding");
    let binding = &bindings[0];
    assert_eq!(
        binding.role_ref.name,
        roles[0].metadata.name.clone().expect("name")
    );
    let subject = &binding.subjects.as_ref().expect("subjects")[0];
    assert_eq!(
        (subject.kind.as_str(), Some(subject.name.clone())),
        ("ServiceAccount", accounts[0].metadata.name.clone())
    );
}

#[test]
fn the_kustomizations_name_files_that_exist_and_their_patches_pass_known_flags() {
    for dir in ["", "standalone/", "from-kube-proxy/"] {
        let text = deploy_file(&format!("{dir}kustomization.yaml"));
        let kustomization: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
        let files = kustomization["resources"]
            .as_sequence()
            .into_iter()
            .flatten()
            .chain(
                kustomization["patches"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .map(|p| &p["path"]),
            )
            .filter_map(|f| f.as_str());
        for file in files {
            deploy_file(&format!("{dir}{file}"));
        }
    }
    let patch: DaemonSet =
        serde_yaml::from_str(&deploy_file("standalone/daemonset-manifests.yaml")).expect("patch");
    let (container, _) = agent_container(patch);
    let args = container.args.expect("args");
    assert_known_flags(&args);
    assert!(args.iter().any(|a| a.starts_with("--manifests=")));
    // The manifests source needs the node's address; the API source reads the Node.
    assert!(args.contains(&"--node-ip=$(NODE_IP)".to_owned()));
    let env = container.env.expect("env");
    assert!(env.iter().any(|e| e.name == "NODE_IP"), "{env:?}");

    // Migration: kube-proxy's own file, from the volume the patch mounts.
    let patch: DaemonSet = serde_yaml::from_str(&deploy_file(
        "from-kube-proxy/daemonset-kube-proxy-config.yaml",
    ))
    .expect("patch");
    let (container, pod) = agent_container(patch);
    let args = container.args.expect("args");
    assert_known_flags(&args);
    assert!(args.contains(&"--config=/var/lib/kube-proxy/config.conf".to_owned()));
    let mounted = container.volume_mounts.expect("mounts");
    assert_eq!(mounted[0].mount_path, "/var/lib/kube-proxy");
    let volume = &pod.volumes.expect("volumes")[0];
    assert_eq!(volume.name, mounted[0].name);
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some("kube-proxy")
    );
}

#[test]
fn the_services_configmap_holds_manifests_the_agent_accepts() {
    let config_map: ConfigMap =
        serde_yaml::from_str(&deploy_file("standalone/services-configmap.yaml"))
            .expect("a ConfigMap");
    let text = config_map.data.expect("data")["services.yaml"].clone();
    let (objects, problems) = ebpf_proxy::source::manifests::parse(&text, "configmap");
    assert!(problems.is_empty(), "{problems:?}");
    let translation = ebpf_proxy::tracker::translate_all(&objects, "node-a");
    assert!(
        translation.problems.is_empty(),
        "{:?}",
        translation.problems
    );
    assert_eq!(
        translation.state.frontends.len(),
        2,
        "the ClusterIP and the NodePort"
    );
}

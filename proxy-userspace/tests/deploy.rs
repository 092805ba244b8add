//! The deployment manifests in deploy/: they parse as the Kubernetes objects they
//! claim to be, pass the agent only flags it has, grant exactly the capabilities the
//! agent checks for, and ship a services file the agent accepts.

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap};

fn deploy_file(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn the_daemonset_runs_the_agent_with_its_own_flags_and_three_capabilities() {
    let daemonset: DaemonSet =
        serde_yaml::from_str(&deploy_file("daemonset.yaml")).expect("a DaemonSet");
    let pod = daemonset
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    assert_eq!(
        pod.host_network,
        Some(true),
        "the agent serves the node's own network"
    );
    let container = &pod.containers[0];
    let args = container.args.clone().expect("args");
    assert_eq!(args[0], "run");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_ebpf-proxy"))
        .args(["run", "--help"])
        .output()
        .expect("ebpf-proxy run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for arg in &args[1..] {
        let flag = arg.split('=').next().expect("flag");
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag} <")),
            "unknown flag {flag}"
        );
    }
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
}

#[test]
fn the_services_configmap_holds_manifests_the_agent_accepts() {
    let config_map: ConfigMap =
        serde_yaml::from_str(&deploy_file("services-configmap.yaml")).expect("a ConfigMap");
    let text = config_map.data.expect("data")["services.yaml"].clone();
    let (objects, problems) = ebpf_proxy::manifests::parse(&text, "configmap");
    assert!(problems.is_empty(), "{problems:?}");
    let translation = ebpf_proxy::translate::translate(&objects, "node-a");
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

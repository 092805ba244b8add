//! The agent started with an IPVS-mode operator's kube-proxy configuration file
//! (`--config`, issue 15): kube-proxy's printed defaults with `mode: ipvs` and an
//! IPVS section. Its settings take effect (Maglev for `mh`, kube-proxy's addresses),
//! what has no effect or is not supported is said at start, and a listener that
//! cannot bind is survived as kube-proxy's `bindAddressHardFail: false` asks.

use std::path::Path;

use crate::support::{cluster::*, services::*};

#[test]
fn an_ipvs_mode_kube_proxy_configuration_runs_the_agent_equivalently() {
    let defaults = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/unprivileged/kube_proxy_config/ipvs-defaults.yaml"),
    )
    .expect("the file");
    // The test's services come from a manifests file, not an API server; the health
    // address is one the node does not have, so binding it fails.
    let config = defaults
        .replace(
            "  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf\n",
            "  kubeconfig: \"\"\n",
        )
        .replace(
            "healthzBindAddress: 0.0.0.0:10256",
            "healthzBindAddress: 198.51.100.7:10256",
        );
    let config = ConfigFile::new("kpconfig", &config);
    let cluster = Cluster::with_agent_args(
        "kpconfig",
        2,
        0,
        |t| {
            let mut web = web(t, &["pod-a1", "pod-a2"]);
            web.node_port = Some(NODE_PORT);
            vec![web]
        },
        &["--config", config.path()],
    );

    let listing = cluster.agent.listing().expect("listing");
    assert_eq!(
        listing.services[0].scheduler, "maglev",
        "ipvs.scheduler: mh"
    );
    assert!(curl(cluster.ns("pod-a2"), &format!("http://{WEB_VIP}/")).is_ok());
    // nodePortAddresses unset: kube-proxy's ipvs-mode default, every node address
    // (the --node-ip flag gives only 198.18.0.1).
    let on_link = format!("http://{}:{NODE_PORT}/", testbed::topology::NODE_LINK_IP);
    assert!(
        curl(&cluster.topology.node2, &on_link).is_ok(),
        "NodePort on up1's address"
    );
    let metrics = cluster.metrics();
    assert!(metrics.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds"));

    let log = cluster.agent.log();
    for said in [
        "--config: ipvs.strictARP: service addresses are never assigned to an interface",
        "--config: conntrack.maxPerCore: sizes the kernel's nf_conntrack table",
        "--config: clientConnection.contentType: the agent speaks JSON to the API server: no effect",
        "listening on 198.51.100.7:10256",
        "running without it (bindAddressHardFail is false)",
    ] {
        assert!(log.contains(said), "{said:?} in the log:\n{log}");
    }
    assert!(
        !log.contains("iptables.localhostNodePorts"),
        "another mode's section is ignored, as kube-proxy ignores it:\n{log}"
    );
}

/// Writes a config file for one test; removed when dropped.
struct ConfigFile(std::path::PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> ConfigFile {
        let path = std::env::temp_dir().join(format!("epx-{name}-{}.yaml", std::process::id()));
        std::fs::write(&path, text).expect("write");
        ConfigFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().expect("path")
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_udp_flow_expires_at_the_configured_timeout() {
    let config = ConfigFile::new(
        "kpudp",
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         mode: ipvs\nipvs:\n  udpTimeout: 3s\n",
    );
    // The collector is kept away, so that what ends the flow is the data path's
    // own judgement of its idle time (set at load from the file).
    let cluster = Cluster::with_agent_args(
        "kpudp",
        3,
        0,
        |t| vec![dns(t, &["pod-a1", "pod-a2"])],
        &["--config", config.path(), "--ct-gc-interval-ms", "600000"],
    );
    let client = cluster.ns("pod-a3");
    // One client port: the same flow each time while it is tracked.
    let target = format!("{DNS_VIP}:53,sourceport=40053,reuseaddr");
    let backend = || {
        udp_ask(client, &target)
            .split_whitespace()
            .next()
            .map(str::to_owned)
    };
    let first = backend();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(backend(), first, "2 s idle: still the same flow");
    std::thread::sleep(std::time::Duration::from_millis(3_500));
    // 3.5 s idle: a new flow, which round robin gives the other backend.
    assert_ne!(backend(), first, "3.5 s idle: scheduled anew");

    let (_, json) = cluster.agent.status(&["-o", "json"]).expect("status");
    let report: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(report["agent"]["conntrackTimeouts"]["udp"], 3, "{json}");
    assert_eq!(
        report["agent"]["conntrackTimeouts"]["tcpEstablished"], 21_600,
        "{json}"
    );
}

#[test]
fn masquerade_all_hides_every_pods_address_from_cluster_ip_backends() {
    let config = ConfigFile::new(
        "kpmasq",
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         mode: ipvs\niptables:\n  masqueradeAll: true\n",
    );
    let cluster = Cluster::with_agent_args(
        "kpmasq",
        2,
        0,
        |t| vec![web(t, &["pod-a1"])],
        &["--config", config.path()],
    );
    // pod-a2 to the ClusterIP: its backend sees the node's address, not the pod's
    // (without masqueradeAll it sees the pod: the first test of `services`).
    let body = curl(cluster.ns("pod-a2"), &format!("http://{WEB_VIP}/")).expect("answered");
    assert_eq!(client_of(&body), testbed::topology::NODE_IP, "{body}");
    let (_, json) = cluster.agent.status(&["-o", "json"]).expect("status");
    assert!(json.contains("\"masqueradeAll\": true"), "{json}");
}

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
    let path = std::env::temp_dir().join(format!("epx-kpc-{}.yaml", std::process::id()));
    std::fs::write(&path, config).expect("write");
    let path_text = path.to_str().expect("path").to_owned();
    let cluster = Cluster::with_agent_args(
        "kpconfig",
        2,
        0,
        |t| vec![web(t, &["pod-a1", "pod-a2"])],
        &["--config", &path_text],
    );
    let _ = std::fs::remove_file(&path);

    let listing = cluster.agent.listing().expect("listing");
    assert_eq!(
        listing.services[0].scheduler, "maglev",
        "ipvs.scheduler: mh"
    );
    assert!(curl(cluster.ns("pod-a2"), &format!("http://{WEB_VIP}/")).is_ok());
    let metrics = curl(&cluster.topology.node, "http://127.0.0.1:10249/metrics").expect("metrics");
    assert!(metrics.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds"));

    let log = cluster.agent.log();
    for said in [
        "--config: ipvs.strictARP: service addresses are never assigned to an interface",
        "--config: conntrack.maxPerCore: sizes the kernel's nf_conntrack table",
        "--config: clientConnection.contentType: the agent speaks JSON to the API server: not supported",
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

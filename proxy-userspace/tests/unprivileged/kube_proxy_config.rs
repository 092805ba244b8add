//! kube-proxy's configuration file as ebpf-proxy reads it (`--config`, issue 15):
//! an IPVS-mode operator's file, built on kube-proxy's printed defaults, maps to the
//! equivalent settings, says what has no effect and what is not supported, and a
//! field kube-proxy does not know is refused as kube-proxy refuses it.

use std::{path::Path, time::Duration};

use ebpf_proxy::{
    kube_proxy_config::{KubeProxyConfig, FIELDS},
    model::Scheduler,
    node_ports::NodePortAddresses,
};

fn here(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/unprivileged/kube_proxy_config")
        .join(name)
}

fn parse(text: &str) -> Result<KubeProxyConfig, String> {
    let path = std::env::temp_dir().join(format!(
        "kpc-{}-{:?}.yaml",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&path, text).expect("write");
    let parsed = KubeProxyConfig::load(&path).map_err(|e| e.to_string());
    let _ = std::fs::remove_file(&path);
    parsed
}

#[test]
fn an_ipvs_operators_file_maps_to_equivalent_settings() {
    let config = KubeProxyConfig::load(&here("ipvs-defaults.yaml")).expect("the file");
    assert_eq!(
        config.scheduler,
        Some(Scheduler::Maglev),
        "mh is IPVS's Maglev"
    );
    assert_eq!(
        config.min_sync_period,
        Some(Duration::from_secs(2)),
        "the ipvs section's"
    );
    assert_eq!(config.sync_period, Some(Duration::from_secs(30)));
    assert_eq!(
        config.healthz_bind_address,
        Some("0.0.0.0:10256".parse().expect("addr"))
    );
    assert_eq!(
        config.metrics_bind_address,
        Some("127.0.0.1:10249".parse().expect("addr"))
    );
    assert_eq!(
        config.kubeconfig.as_deref(),
        Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf"))
    );
    assert_eq!(config.primary_address, None, "0.0.0.0 says nothing");
    assert_eq!(config.node_name, None);
    assert_eq!(config.oom_score_adj, Some(-999));
    assert!(!config.bind_address_hard_fail);
    assert_eq!(
        config.node_port_addresses,
        Some(NodePortAddresses::parse(&["all"]).expect("all")),
        "unset: kube-proxy's default in ipvs mode"
    );
    assert!(!config.masquerade_all);
    // The IPVS section's timeouts are 0 (the system's): ebpf-proxy's defaults; the
    // conntrack section's are nf_conntrack's, not IPVS's, and said to have no effect.
    assert_eq!(
        (
            config.tcp_timeout,
            config.tcp_fin_timeout,
            config.udp_timeout
        ),
        (None, None, None)
    );
    // Said at start, each with its reason; the iptables and nftables sections are
    // another mode's and ignored, as kube-proxy ignores them.
    let said =
        |list: &[String], field: &str| list.iter().any(|n| n.starts_with(&format!("{field}: ")));
    for field in [
        "ipvs.strictARP",
        "conntrack.maxPerCore",
        "configSyncPeriod",
        "conntrack.tcpCloseWaitTimeout",
        "conntrack.tcpEstablishedTimeout",
        "clientConnection.contentType",
        // ipvs mode reads masquerading from the iptables section, as kube-proxy does.
        "iptables.masqueradeBit",
    ] {
        assert!(
            said(&config.no_effect, field),
            "{field}: {:?}",
            config.no_effect
        );
    }
    assert!(config.unsupported.is_empty(), "{:?}", config.unsupported);
    for ignored in [
        "iptables.localhostNodePorts",
        "iptables.syncPeriod",
        "nftables.masqueradeBit",
    ] {
        assert!(
            !said(&config.no_effect, ignored) && !said(&config.unsupported, ignored),
            "{ignored}"
        );
    }
    for zero in ["enableProfiling", "ipvs.tcpTimeout", "clusterCIDR"] {
        assert!(
            !said(&config.no_effect, zero) && !said(&config.unsupported, zero),
            "{zero}"
        );
    }
}

#[test]
fn json_is_read_as_yaml_is() {
    let config = parse(r#"{"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "mode": "ipvs", "ipvs": {"scheduler": "wlc", "minSyncPeriod": "1m30s"}, "hostnameOverride": "node-7",
        "bindAddress": "198.18.0.1", "metricsBindAddress": "0.0.0.0", "bindAddressHardFail": true}"#)
    .expect("json");
    assert_eq!(config.scheduler, Some(Scheduler::Wlc));
    assert_eq!(config.min_sync_period, Some(Duration::from_secs(90)));
    assert_eq!(config.node_name.as_deref(), Some("node-7"));
    assert_eq!(
        config.primary_address,
        Some("198.18.0.1".parse().expect("ip"))
    );
    assert_eq!(
        config.metrics_bind_address,
        Some("0.0.0.0:10249".parse().expect("addr")),
        "the default port"
    );
    assert!(config.bind_address_hard_fail);
}

#[test]
fn masquerade_all_comes_from_the_section_kube_proxy_reads_it_from() {
    let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
    let both = "iptables:\n  masqueradeAll: true\nnftables:\n  masqueradeAll: false\n";
    for (mode, expected) in [("ipvs", true), ("iptables", true), ("nftables", false)] {
        let config = parse(&format!("{head}mode: {mode}\n{both}")).expect(mode);
        assert_eq!(config.masquerade_all, expected, "{mode}");
    }
}

#[test]
fn the_ipvs_sections_timeouts_apply_in_ipvs_mode_only() {
    let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
    let section = "ipvs:\n  tcpTimeout: 15m\n  tcpFinTimeout: 2m\n  udpTimeout: 5m\n\
                   conntrack:\n  tcpEstablishedTimeout: 24h\n  udpTimeout: 30s\n";
    let ipvs = parse(&format!("{head}mode: ipvs\n{section}")).expect("ipvs");
    let zero = parse(&format!(
        "{head}mode: ipvs\nipvs:\n  tcpTimeout: 0s\nconntrack:\n  tcpEstablishedTimeout: 24h\n"
    ))
    .expect("zero");
    assert_eq!(
        zero.tcp_timeout, None,
        "0: ebpf-proxy's default, not nf_conntrack's"
    );
    assert_eq!(
        (ipvs.tcp_timeout, ipvs.tcp_fin_timeout, ipvs.udp_timeout),
        (
            Some(Duration::from_secs(900)),
            Some(Duration::from_secs(120)),
            Some(Duration::from_secs(300))
        )
    );
    let nftables = parse(&format!("{head}mode: nftables\n{section}")).expect("nftables");
    assert_eq!(
        (
            nftables.tcp_timeout,
            nftables.tcp_fin_timeout,
            nftables.udp_timeout
        ),
        (
            Some(Duration::from_secs(86_400)),
            None,
            Some(Duration::from_secs(30))
        )
    );
}

#[test]
fn detect_local_modes_name_the_pod_interfaces() {
    let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
    let prefix = parse(&format!(
        "{head}detectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: cali\n"
    ));
    assert_eq!(
        prefix.expect("prefix").pod_interfaces.as_deref(),
        Some("cali*")
    );
    let bridge = parse(&format!(
        "{head}detectLocalMode: BridgeInterface\ndetectLocal:\n  bridgeInterface: cni0\n"
    ));
    assert_eq!(
        bridge.expect("bridge").pod_interfaces.as_deref(),
        Some("cni0")
    );
    // ClusterCIDR (the default mode): a detector beside the pod interfaces, of
    // both families for a dual-stack pair.
    let cidr = parse(&format!(
        "{head}clusterCIDR: 10.244.0.0/16,fd00:10:244::/56\n"
    ))
    .expect("cidr");
    assert_eq!(
        cidr.cluster_cidrs,
        [
            "10.244.0.0/16".parse().expect("cidr"),
            "fd00:10:244::/56".parse().expect("cidr")
        ]
    );
    assert!(cidr.no_effect.is_empty(), "{:?}", cidr.no_effect);
    let other_mode = parse(&format!(
        "{head}detectLocalMode: InterfaceNamePrefix\ndetectLocal:\n  interfaceNamePrefix: cali\nclusterCIDR: 10.244.0.0/16\n"
    ))
    .expect("prefix");
    assert!(
        other_mode.cluster_cidrs.is_empty(),
        "kube-proxy ignores it then"
    );
}

#[test]
fn null_sections_are_absent_ones_and_node_cidr_mode_is_said() {
    let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
    let config = parse(&format!(
        "{head}featureGates: null\nconntrack: null\nlogging: null\ndetectLocalMode: NodeCIDR\n"
    ))
    .expect("nulls");
    assert!(
        config.no_effect.iter().any(|n| n.contains("NodeCIDR")),
        "{:?}",
        config.no_effect
    );
}

#[test]
fn what_kube_proxy_would_refuse_is_refused() {
    let head = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";
    for (text, expected) in [
        (format!("{head}ipvs:\n  schedular: rr\n"), "ipvs.schedular"),
        (
            format!("{head}nodePortAdresses: [10.0.0.0/8]\n"),
            "nodePortAdresses",
        ),
        (format!("{head}mode: kernelspace\n"), "kernelspace"),
        (
            format!("{head}mode: ipvs\nipvs:\n  scheduler: fastest\n"),
            "fastest",
        ),
        (
            format!("{head}mode: ipvs\nipvs:\n  minSyncPeriod: soon\n"),
            "soon",
        ),
        (format!("{head}oomScoreAdj: 5000\n"), "oomScoreAdj"),
        (
            "apiVersion: v1\nkind: ConfigMap\n".to_owned(),
            "KubeProxyConfiguration expected",
        ),
        ("[1, 2]".to_owned(), "not a KubeProxyConfiguration"),
        (format!("{head}mode: [ipvs\n"), "not YAML or JSON"),
    ] {
        let error = parse(&text).expect_err(&text);
        assert!(error.contains(expected), "{text}: {error}");
    }
}

#[test]
fn the_readme_says_what_happens_to_every_field() {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README");
    let table = &readme[readme
        .find("| field | what ebpf-proxy does |")
        .expect("the field table")..];
    for (field, _) in FIELDS {
        let name = field.trim_end_matches('.');
        assert!(
            table.contains(&format!("`{name}`")),
            "{name} missing from the README's table"
        );
    }
}

#[test]
fn every_field_has_one_handling() {
    let mut names: Vec<&str> = FIELDS.iter().map(|(f, _)| *f).collect();
    names.sort_unstable();
    let count = names.len();
    names.dedup();
    assert_eq!(names.len(), count, "a field listed twice");
}

//! `ebpf-proxy status` (issue 15): one screen that tells the truth about the node,
//! from a running agent and from what a stopped one left in the kernel.

use testbed::{
    manifests::{render, ServiceDef},
    topology::Topology,
};

use crate::support::{cluster::*, services::*};

fn web_node_port(topology: &Topology) -> ServiceDef {
    let mut web = web(topology, &["pod-a1"]);
    web.node_port = Some(NODE_PORT);
    web
}

#[test]
fn status_shows_the_agent_what_is_attached_the_maps_and_the_problems() {
    let cluster = Cluster::new("status", 2, 0, |t| vec![web_node_port(t)]);
    let agent = &cluster.agent;

    let (all_well, text) = agent.status(&[]).expect("status");
    assert!(all_well, "no problem, exit 0:\n{text}");
    for expected in [
        "Agent:          running",
        "Source:         manifests (synced)",
        "/livez ok, /healthz ok, /readyz ok",
        "up0           uplink  XDP native (forward: pass), tc egress (tcx)",
        "up1           uplink  XDP native",
        "pod     tc ingress and egress (tcx)",
        "yes NodePort                XDP on up0, up1",
        "yes ClusterIP from pods     tc on 2 pod interfaces",
        "yes IPv6 and dual-stack     both families",
        "Problems:       none",
    ] {
        assert!(text.contains(expected), "{expected:?} in:\n{text}");
    }

    let (_, json) = agent.status(&["-o", "json"]).expect("status");
    let report: serde_json::Value = serde_json::from_str(&json).expect("json");
    let (_, yaml) = agent.status(&["-o", "yaml"]).expect("status");
    let from_yaml: serde_json::Value = serde_yaml::from_str(&yaml).expect("yaml");
    assert_eq!(
        from_yaml["agent"]["interfaces"],
        report["agent"]["interfaces"]
    );
    let services = report["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .find(|m| m["map"] == "SERVICES")
        .expect("the services map");
    // The ClusterIP and the NodePort on each of the node's addresses.
    let frontends = agent.listing().expect("listing").services.len();
    assert_eq!(services["entries"], frontends, "{json}");
    assert_eq!(services["capacity"], proxy_common::MAX_SERVICES, "{json}");
    assert!(report["agent"]["syncs"].as_u64() >= Some(1), "{json}");

    // A service the agent must skip: status names it and exits 1.
    let mut bad = web(&cluster.topology, &["pod-a2"]);
    bad.name = "bad".into();
    bad.cluster_ip = std::net::Ipv4Addr::new(10, 96, 0, 99);
    bad.annotations
        .push(("ebpf-proxy.io/scheduler".into(), "fastest".into()));
    let services = vec![web_node_port(&cluster.topology), bad];
    std::fs::write(&agent.manifests, render(&services)).expect("manifests");
    wait_until(
        || agent.status(&[]).is_ok_and(|(well, _)| !well),
        "status lists the bad service",
    );
    let (_, text) = agent.status(&[]).expect("status");
    assert!(text.contains("Problems:       1"), "{text}");
    assert!(
        text.contains("Service demo/bad") && text.contains("fastest"),
        "{text}"
    );

    // The agent gone: its programs still serve, and status says both.
    let mut cluster = cluster;
    cluster.agent.kill();
    let (all_well, text) = cluster.agent.status(&[]).expect("status");
    assert!(!all_well, "{text}");
    assert!(text.contains("Agent:          NOT ANSWERING"), "{text}");
    assert!(
        text.contains("its programs stay attached and serve with the maps as they are"),
        "{text}"
    );
    assert!(text.contains("SERVICES              3 /"), "{text}");
    for served in [
        "yes ClusterIP from pods     tc on 2 pod interfaces",
        "yes NodePort                XDP on up0, up1",
        "no  healthCheckNodePort",
    ] {
        assert!(text.contains(served), "{served:?}, from the pins:\n{text}");
    }
    assert!(
        curl(cluster.ns("pod-a2"), &format!("http://{WEB_VIP}/")).is_ok(),
        "still served"
    );
}

/// With the metrics address on every interface (as Prometheus setups often have
/// it), `/metrics` answers the network and `/statusz` only local peers: the node's
/// interfaces, addresses and problem objects are not the network's to read.
#[test]
fn statusz_answers_local_peers_only() {
    let cluster = Cluster::with_agent_args(
        "statuspeer",
        1,
        0,
        |t| vec![web_node_port(t)],
        &["--metrics-bind-address", "0.0.0.0:10249"],
    );
    let from_outside = |path: &str| {
        cluster
            .topology
            .client
            .exec(
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "5",
                    &format!("http://{}:10249{path}", testbed::topology::NODE_IP),
                ],
            )
            .expect("curl")
    };
    assert_eq!(from_outside("/metrics"), "200");
    assert_eq!(from_outside("/statusz"), "403");
    let (all_well, text) = cluster.agent.status(&[]).expect("status");
    assert!(
        all_well && text.contains("Agent:          running"),
        "{text}"
    );
}

/// An empty cgroup of the test's own, removed when dropped (after the agent that
/// hooked it: declare it first).
struct EmptyCgroup(std::path::PathBuf);

impl Drop for EmptyCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Socket hooks on a cgroup the agent is not in cannot see its probe, so it cannot
/// name its network namespace to them: they serve nothing, and the log and `status`
/// say so (rather than translating whichever namespace's sockets they meet).
#[test]
fn socket_hooks_that_cannot_see_the_agent_say_they_serve_nothing() {
    let root = ebpf_proxy::datapath::attach::default_cgroup_root();
    let cgroup = EmptyCgroup(root.join(format!("epx-test-{}", std::process::id())));
    std::fs::create_dir(&cgroup.0).expect("a cgroup of the test's own");
    let cgroup_arg = format!("--cgroup={}", cgroup.0.display());
    let cluster =
        Cluster::with_agent_args("hooks", 1, 0, |t| vec![web_node_port(t)], &[&cgroup_arg]);
    let log = cluster.agent.log();
    assert!(
        log.contains("no socket hook saw the agent's own connect()"),
        "{log}"
    );
    assert!(
        !log.contains("socket hooks serve this network namespace"),
        "{log}"
    );
    let (_, text) = cluster.agent.status(&[]).expect("status");
    assert!(
        text.contains("NOT SERVING: no socket hook saw the agent's own connect()"),
        "{text}"
    );
    assert!(text.contains("no  ClusterIP from the node"), "{text}");
}

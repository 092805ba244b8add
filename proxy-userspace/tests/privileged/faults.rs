//! Faults around the agent, end to end: a read-only `/proc/sys` (a container that is
//! not privileged), an interface renamed away whose name comes back on a new
//! interface, the pin directory removed under a running agent. In each, readiness
//! says what is really attached and programmed, and the agent recovers by itself.

use std::time::Duration;

use testbed::{agent::AgentOptions, eventually, servers::HttpConnection, topology::UPLINKS};

use crate::support::{cluster::*, services::*};

fn readyz(cluster: &Cluster) -> Result<String, String> {
    probe(cluster, "/readyz")
}

fn healthz(cluster: &Cluster) -> Result<String, String> {
    probe(cluster, "/healthz")
}

/// Issue 14: the accept_local write failed with EROFS, the uplinks were never
/// attached, and /readyz said 200.
#[test]
fn with_a_read_only_proc_sys_the_agent_says_what_it_needs_and_is_ready_once_it_has_it() {
    // The agent's own mount namespace gets /proc/sys read-only, as in a container.
    let read_only = "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys \
                     && exec \"$0\" \"$@\"";
    let cluster = Cluster::with_options(
        "rosys",
        2,
        0,
        |t| {
            let mut service = web(t, &["pod-a1"]);
            service.node_port = Some(NODE_PORT);
            vec![service]
        },
        AgentOptions {
            launcher: &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                read_only,
            ],
            no_ready_wait: true,
            ..Default::default()
        },
    );
    // Both uplinks are attached but named as missing their sysctl (once the agent
    // has listed them).
    let lines: Vec<String> = UPLINKS
        .iter()
        .map(|u| format!("{u}: XDP attached, but accept_local is missing"))
        .collect();
    let said = eventually(Duration::from_secs(30), Duration::from_millis(100), || {
        readyz(&cluster).is_err_and(|body| lines.iter().all(|l| body.contains(l.as_str())))
    });
    assert!(said, "{:?}\n{}", readyz(&cluster), cluster.agent.log());
    // Retried every 2 s, but said once per interface until something changes.
    std::thread::sleep(Duration::from_secs(5));
    let log = cluster.agent.log();
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN ebpf_proxy::agent::attachments") && l.contains("up0/"))
        .count();
    assert_eq!(warnings, 1, "{log}");
    // What the DaemonSet's privileged init container does, from outside the agent's
    // mounts.
    let binary = cluster.agent.binary().to_str().expect("binary").to_owned();
    cluster
        .topology
        .node
        .exec(&binary, &["prepare-node"])
        .expect("prepare-node");
    let ready = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        readyz(&cluster).is_ok()
    });
    assert!(ready, "{:?}\n{}", readyz(&cluster), cluster.agent.log());
    let client = &cluster.topology.client;
    let body = curl(
        client,
        &format!("http://{}:{NODE_PORT}/", testbed::topology::NODE_IP),
    )
    .expect("NodePort from outside");
    assert_eq!(pod_of(&body), "pod-a1");
}

/// Issue 14: interfaces were followed by name, so a new interface that took the
/// name of one renamed away got no program.
#[test]
fn a_name_that_returns_on_a_new_interface_gets_its_program() {
    let cluster = Cluster::new("rename", 2, 0, |t| vec![web(t, &["pod-a1"])]);
    let client = cluster.ns("pod-a2");
    assert!(curl(client, &format!("http://{WEB_VIP}/")).is_ok());
    cluster
        .topology
        .rename_away_and_replace_pod_interface("pod-a1", "gone1")
        .expect("rename and replace");
    // pod-a1's replies cross the new interface and must be reverse-translated there.
    let served = eventually(Duration::from_secs(10), Duration::from_millis(100), || {
        curl(client, &format!("http://{WEB_VIP}/")).is_ok_and(|b| pod_of(&b) == "pod-a1")
    });
    assert!(served, "{}", cluster.agent.log());
}

/// Issue 14: removing the pin directory stopped every service while the agent stayed
/// "ready".
#[test]
fn a_removed_pin_directory_is_noticed_and_restored_with_its_flows() {
    let cluster = Cluster::new("pinrm", 3, 0, |t| vec![web(t, &["pod-a1", "pod-a2"])]);
    let client = cluster.ns("pod-a3");
    let mut held = HttpConnection::open(client, (WEB_VIP, 80).into()).expect("connect");
    let first = pod_of(&held.get().expect("request"));
    std::fs::remove_dir_all(&cluster.agent.pin_dir).expect("remove the pin directory");
    // Noticed (health fails until restored), then restored: maps pinned again with
    // their contents, programs attached again.
    let restored = eventually(Duration::from_secs(10), Duration::from_millis(50), || {
        cluster.agent.pin_dir.join("CONNTRACK").exists()
            && readyz(&cluster).is_ok()
            && healthz(&cluster).is_ok()
    });
    assert!(restored, "{:?}\n{}", readyz(&cluster), cluster.agent.log());
    assert!(cluster.agent.log().contains("pinned maps vanished"));
    // The held connection kept its backend (its conntrack entry survived) ...
    assert_eq!(pod_of(&held.get().expect("request after")), first);
    // ... and new ones are served.
    assert!(curl(client, &format!("http://{WEB_VIP}/")).is_ok());
    let listing = cluster.agent.listing().expect("list");
    assert_eq!(listing.services.len(), 1);
    // The new directory is locked as the old one was: a second agent is refused.
    let (succeeded, stderr) = cluster.second_agent();
    assert!(!succeeded && stderr.contains("another agent"), "{stderr}");
}

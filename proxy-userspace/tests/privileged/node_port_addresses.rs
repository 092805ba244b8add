//! kube-proxy's `nodePortAddresses` (`--nodeport-addresses`, issue 15): NodePorts
//! answer on the node's addresses a CIDR holds, addresses added while the agent runs
//! included, and on the primary address for `primary`. The node has 198.18.0.1 on
//! up0 (the client's side, its --node-ip) and 198.18.1.1 on up1 (node2's side).

use testbed::topology::{NODE_IP, NODE_LINK_IP};

use crate::support::{cluster::*, services::*};

fn web_node_port(topology: &testbed::topology::Topology) -> testbed::manifests::ServiceDef {
    let mut web = web(topology, &["pod-a1"]);
    web.node_port = Some(NODE_PORT);
    web
}

fn node_port_on(ns: &testbed::netns::Netns, address: &str) -> bool {
    curl(ns, &format!("http://{address}:{NODE_PORT}/")).is_ok()
}

#[test]
fn a_cidr_chooses_the_addresses_including_one_added_while_running() {
    let cluster = Cluster::with_agent_args(
        "npcidr",
        1,
        0,
        |t| vec![web_node_port(t)],
        &["--nodeport-addresses", "198.18.1.0/24"],
    );
    let (client, node2) = (&cluster.topology.client, &cluster.topology.node2);
    assert!(
        node_port_on(node2, &NODE_LINK_IP.to_string()),
        "198.18.1.1 is in the CIDR"
    );
    assert!(
        !node_port_on(client, &NODE_IP.to_string()),
        "the primary address is not: NodePorts do not answer there"
    );
    // An address added on up1 in the CIDR answers once the agent has seen it; one
    // outside it on up0 does not.
    let node = &cluster.topology.node;
    node.exec("ip", &["addr", "add", "198.18.1.77/24", "dev", "up1"])
        .expect("address");
    node.exec("ip", &["addr", "add", "198.18.0.77/24", "dev", "up0"])
        .expect("address");
    wait_until(
        || node_port_on(node2, "198.18.1.77"),
        "the added address answers",
    );
    assert!(cluster.agent.log().contains("198.18.0.77"), "seen too");
    assert!(!node_port_on(client, "198.18.0.77"), "outside the CIDR");
    // On two interfaces, removed from one: still the node's, still answering;
    // removed from the other too: it stops.
    node.exec("ip", &["addr", "add", "198.18.1.77/32", "dev", "up0"])
        .expect("address");
    node.exec("ip", &["addr", "del", "198.18.1.77/24", "dev", "up1"])
        .expect("address");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        node_port_on(node2, "198.18.1.77"),
        "still on up0: still answering"
    );
    node.exec("ip", &["addr", "del", "198.18.1.77/32", "dev", "up0"])
        .expect("address");
    wait_until(
        || cluster.agent.log().contains("removed=198.18.1.77"),
        "the removal seen",
    );
    assert!(!node_port_on(node2, "198.18.1.77"));
}

#[test]
fn primary_answers_on_the_node_ip_only_where_the_mode_default_answers_everywhere() {
    let file = std::env::temp_dir().join(format!("epx-npprimary-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n\
         mode: ipvs\nnodePortAddresses: [primary]\n",
    )
    .expect("config");
    let path = file.to_str().expect("path").to_owned();
    let cluster = Cluster::with_agent_args(
        "npprimary",
        1,
        0,
        |t| vec![web_node_port(t)],
        &["--config", &path],
    );
    let _ = std::fs::remove_file(&file);
    assert!(node_port_on(&cluster.topology.client, &NODE_IP.to_string()));
    assert!(
        !node_port_on(&cluster.topology.node2, &NODE_LINK_IP.to_string()),
        "not a primary address"
    );
}

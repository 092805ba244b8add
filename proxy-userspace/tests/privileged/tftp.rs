//! Issue 13: TFTP through every NAT path. A TFTP server answers each request from a
//! new port; where the node masquerades, or where the client cannot route to pods,
//! that answer used to arrive untranslated and the client gave up. Real transfers of
//! a 200 kB file with Debian's tftpd-hpa and curl's TFTP client, through a NodePort to
//! a remote backend (masqueraded), a NodePort and a LoadBalancer IP to a local backend
//! (the client has no route to pods), and a pod through its own service (hairpin);
//! and the same transfers through kube-proxy's iptables layout with the kernel's TFTP
//! helper, the behaviour to match.

use std::{io::Write as _, net::Ipv4Addr, process::Stdio};

use testbed::{
    manifests::ServiceDef,
    netns::Netns,
    tftpd::{Tftpd, TFTPD_FILE, TFTPD_PORT},
    topology::{Topology, LB_RANGE, NODE_IP},
};

use crate::support::cluster::Cluster;

const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 69);
const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 70);
const UNHELPED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 71);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 69);
const LOCAL_NODE_PORT: u16 = 30069;
const REMOTE_NODE_PORT: u16 = 30070;
const UNHELPED_NODE_PORT: u16 = 30071;
const UNHELPED_LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 72);
const UNHELPED_LOCAL_NODE_PORT: u16 = 30072;

/// 200 kB that no shifted or truncated copy equals.
fn content() -> Vec<u8> {
    (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect()
}

/// A TFTP service on port 69 (the helper's default port) of tftpd-hpa's port.
fn tftp_service(
    name: &str,
    vip: Ipv4Addr,
    node_port: u16,
    backend: &testbed::topology::Pod,
) -> ServiceDef {
    let mut service = ServiceDef::new(name, vip, "UDP", 69, TFTPD_PORT).with_pods([backend]);
    service.node_port = Some(node_port);
    service
}

/// tftpd-hpa on the local and the remote pod.
fn serve(topology: &Topology, run: &str, content: &[u8]) -> Vec<Tftpd> {
    ["pod-a1", "pod-b1"]
        .into_iter()
        .map(|pod| {
            Tftpd::start(&topology.pod(pod).ns, &format!("{run}-{pod}"), content).expect("tftpd")
        })
        .collect()
}

/// The client as most clusters' clients are: it reaches node addresses and
/// LoadBalancer IPs, never pod addresses.
fn without_pod_routes(topology: &Topology) {
    let client = &topology.client;
    client.ip("route del default").expect("route");
    client
        .ip(&format!("route add {LB_RANGE} via {NODE_IP}"))
        .expect("route");
}

/// curl's TFTP client: the file's bytes, or why not.
fn fetch(ns: &Netns, target: &str, timeout_s: u32) -> Result<Vec<u8>, String> {
    let output = ns
        .command("curl")
        .args(["-sS", "--max-time", &timeout_s.to_string()])
        .arg(format!("tftp://{target}/{TFTPD_FILE}"))
        .output()
        .expect("curl");
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

/// The four paths, each byte-exact.
fn assert_transfers(topology: &Topology, content: &[u8]) {
    let client = &topology.client;
    for (path, ns, target) in [
        (
            "NodePort to a remote backend (masqueraded)",
            client,
            format!("{NODE_IP}:{REMOTE_NODE_PORT}"),
        ),
        (
            "NodePort to a local backend",
            client,
            format!("{NODE_IP}:{LOCAL_NODE_PORT}"),
        ),
        (
            "LoadBalancer IP to a local backend",
            client,
            format!("{LB_IP}:69"),
        ),
        (
            "a pod through its own service (hairpin)",
            &topology.pod("pod-a1").ns,
            format!("{LOCAL_VIP}:69"),
        ),
    ] {
        let got = fetch(ns, &target, 20).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            got == content,
            "{path}: {} bytes that are not the file's {}",
            got.len(),
            content.len()
        );
    }
}

#[test]
fn tftp_transfers_work_through_every_nat_path() {
    let cluster = Cluster::new("tftpnat", 1, 1, |t| {
        let mut local = tftp_service("tftp-local", LOCAL_VIP, LOCAL_NODE_PORT, t.pod("pod-a1"));
        local.load_balancer_ip = Some(LB_IP);
        vec![
            local,
            tftp_service("tftp-remote", REMOTE_VIP, REMOTE_NODE_PORT, t.pod("pod-b1")),
            tftp_service(
                "tftp-unhelped",
                UNHELPED_VIP,
                UNHELPED_NODE_PORT,
                t.pod("pod-b1"),
            )
            .annotated("ebpf-proxy.io/helper", "none"),
            tftp_service(
                "tftp-unhelped-local",
                UNHELPED_LOCAL_VIP,
                UNHELPED_LOCAL_NODE_PORT,
                t.pod("pod-a1"),
            )
            .annotated("ebpf-proxy.io/helper", "none"),
        ]
    });
    let topology = &cluster.topology;
    without_pod_routes(topology);
    let content = content();
    let _servers = serve(topology, "ours", &content);
    assert_transfers(topology, &content);
    // The helper is what makes it work: without it the masqueraded path fails (the
    // server's answer from its new port reaches the node, which has no socket there),
    // and so does the local one (the answer comes from the pod's address, which the
    // client cannot answer).
    for (path, port) in [
        ("masqueraded", UNHELPED_NODE_PORT),
        ("local backend", UNHELPED_LOCAL_NODE_PORT),
    ] {
        let failed = fetch(&topology.client, &format!("{NODE_IP}:{port}"), 3);
        assert!(
            failed.is_err(),
            "{path}: a transfer without the helper worked"
        );
    }
}

/// kube-proxy's iptables layout for the same services (KUBE-SERVICES, KUBE-NODEPORTS,
/// KUBE-EXT-* marking external traffic for masquerade, KUBE-SEP-* DNAT with the
/// hairpin mark), with the kernel's TFTP helper attached to the services' flows as an
/// operator does it (`CT --helper tftp`: automatic helper assignment is off since
/// Linux 4.7).
fn kube_proxy_rules(topology: &Topology) -> String {
    let local = topology.pod("pod-a1").addr;
    let remote = topology.pod("pod-b1").addr;
    format!(
        "*raw
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -p udp -m multiport --dports 69,{LOCAL_NODE_PORT},{REMOTE_NODE_PORT} -j CT --helper tftp
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-EXT-LOCAL - [0:0]
:KUBE-EXT-REMOTE - [0:0]
:KUBE-SVC-LOCAL - [0:0]
:KUBE-SVC-REMOTE - [0:0]
:KUBE-SEP-LOCAL - [0:0]
:KUBE-SEP-REMOTE - [0:0]
-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -j KUBE-SERVICES
-A POSTROUTING -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
-A KUBE-SERVICES -d {LOCAL_VIP}/32 -p udp --dport 69 -j KUBE-SVC-LOCAL
-A KUBE-SERVICES -d {LB_IP}/32 -p udp --dport 69 -j KUBE-EXT-LOCAL
-A KUBE-SERVICES -d {REMOTE_VIP}/32 -p udp --dport 69 -j KUBE-SVC-REMOTE
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-NODEPORTS -p udp --dport {LOCAL_NODE_PORT} -j KUBE-EXT-LOCAL
-A KUBE-NODEPORTS -p udp --dport {REMOTE_NODE_PORT} -j KUBE-EXT-REMOTE
-A KUBE-EXT-LOCAL -j KUBE-MARK-MASQ
-A KUBE-EXT-LOCAL -j KUBE-SVC-LOCAL
-A KUBE-EXT-REMOTE -j KUBE-MARK-MASQ
-A KUBE-EXT-REMOTE -j KUBE-SVC-REMOTE
-A KUBE-SVC-LOCAL -j KUBE-SEP-LOCAL
-A KUBE-SVC-REMOTE -j KUBE-SEP-REMOTE
-A KUBE-SEP-LOCAL -s {local}/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-LOCAL -p udp -j DNAT --to-destination {local}:{TFTPD_PORT}
-A KUBE-SEP-REMOTE -s {remote}/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-REMOTE -p udp -j DNAT --to-destination {remote}:{TFTPD_PORT}
COMMIT
"
    )
}

#[test]
fn kube_proxys_iptables_layout_with_the_kernels_tftp_helper_makes_the_same_transfers() {
    let prefix = format!("epx{}tftpkp", std::process::id() % 100_000);
    let topology = Topology::build(&prefix, 1, 1).expect("topology");
    without_pod_routes(&topology);
    let mut restore = topology
        .node
        .command("iptables-restore")
        .stdin(Stdio::piped())
        .spawn()
        .expect("iptables-restore");
    restore
        .stdin
        .take()
        .expect("stdin")
        .write_all(kube_proxy_rules(&topology).as_bytes())
        .expect("rules");
    assert!(restore.wait().expect("iptables-restore").success());
    let content = content();
    let _servers = serve(&topology, "kube-proxy", &content);
    assert_transfers(&topology, &content);
}

//! The namespaces and links of a test cluster:
//!
//! ```text
//!  client ns            node ns (agent)                     pod ns (one per pod)
//!  eth0 198.18.0.2 ── up0 198.18.0.1 [XDP]
//!                       vethN [tc] 169.254.1.1 ───────────  eth0 10.244.1.N/32
//!                       up1 198.18.1.1 [XDP] ── up0 198.18.1.2  node2 ns ── remote pods 10.244.2.N
//! ```
//!
//! Pods are routed Calico-style: a /32 route per pod on the node, and in the pod a
//! default route via 169.254.1.1 on its only interface.
//!
//! Every namespace is dual-stack: each IPv4 address and route has an IPv6 twin
//! (`twin`: the IPv4 address in the last 32 bits of `fd00::/96`, a /n prefix a
//! /(96 + n)), added without duplicate address detection so that nothing waits for
//! it; a pod's IPv6 gateway is the link-local `fe80::1` of its host-side interface.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ebpf_proxy::model::Family;

use anyhow::{Context as _, Result};

use super::{netns::Netns, servers::PodServers};

pub const NODE_NAME: &str = "node-a";
pub const NODE2_NAME: &str = "node-b";
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const NODE_LINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const NODE2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const UPLINKS: [&str; 2] = ["up0", "up1"];
/// Host-side pod interfaces are named `veth<N>`; the agent's pattern.
pub const POD_INTERFACE_PATTERN: &str = "veth*";
const POD_GATEWAY: &str = "169.254.1.1";
const POD_GATEWAY6: &str = "fe80::1";

/// The IPv6 twin of a test address: `fd00::a.b.c.d`.
pub const fn twin(v4: Ipv4Addr) -> Ipv6Addr {
    let [a, b, c, d] = v4.octets();
    Ipv6Addr::new(
        0xfd00,
        0,
        0,
        0,
        0,
        0,
        u16::from_be_bytes([a, b]),
        u16::from_be_bytes([c, d]),
    )
}

/// A test address in `family`: itself, or its twin.
pub fn in_family(v4: Ipv4Addr, family: Family) -> IpAddr {
    match family {
        Family::V4 => v4.into(),
        Family::V6 => twin(v4).into(),
    }
}

/// `address:port` as a URL or socat writes it: IPv6 in brackets.
pub fn host_port(address: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(address, port).to_string()
}

/// Adds `addr/len` on `dev` in `ns`, and its twin (`/96 + len`, no DAD).
fn add_address(ns: &Netns, addr: Ipv4Addr, len: u8, dev: &str) -> Result<()> {
    ns.ip(&format!("addr add {addr}/{len} dev {dev}"))?;
    ns.ip(&format!(
        "-6 addr add {}/{} dev {dev} nodad",
        twin(addr),
        96 + len
    ))?;
    Ok(())
}

/// Routes `net/len` (`default` when `len` is 0) via `gateway` in `ns`, and the twins.
fn add_route(ns: &Netns, net: Ipv4Addr, len: u8, gateway: Ipv4Addr) -> Result<()> {
    let (v4, v6) = if len == 0 {
        ("default".to_owned(), "default".to_owned())
    } else {
        (
            format!("{net}/{len}"),
            format!("{}/{}", twin(net), 96 + len),
        )
    };
    ns.ip(&format!("route add {v4} via {gateway}"))?;
    ns.ip(&format!("-6 route add {v6} via {}", twin(gateway)))?;
    Ok(())
}

/// IP forwarding of both families, and no reverse-path filter (IPv4's).
fn forward(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv4.ip_forward", "1")?;
    ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    ns.sysctl("net.ipv4.conf.default.rp_filter", "0")
}

pub struct Pod {
    pub name: String,
    pub node: &'static str,
    pub addr: Ipv4Addr,
    /// The host-side interface, in the pod's node namespace.
    pub host_interface: String,
    // Held for its Drop, and declared before `ns`: servers stop before their
    // namespace goes.
    _servers: PodServers,
    pub ns: Netns,
}

/// Fields drop in declaration order: pods (and their servers) first.
pub struct Topology {
    pub pods: Vec<Pod>,
    pub node2: Netns,
    pub node: Netns,
    /// The routed variant's router between the client and both nodes.
    pub router: Option<Netns>,
    pub client: Netns,
    prefix: String,
}

/// The routed topology's node addresses (each node on its own link to the router).
pub const ROUTED_NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const ROUTED_NODE2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// LoadBalancer IPs, which the router sends to the first node (as BGP or a cloud
/// load balancer would pick an entry node); their twins likewise.
pub const LB_RANGE: &str = "198.18.100.0/24";
const LB_NET: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 100, 0), 24);

impl Topology {
    /// Builds the namespaces with `local_pods` pods on the node and `remote_pods` on
    /// node2, every pod serving HTTP, UDP and TFTP. `prefix` keeps parallel
    /// topologies apart (namespace names).
    pub fn build(prefix: &str, local_pods: usize, remote_pods: usize) -> Result<Topology> {
        Topology::build_with(prefix, local_pods, remote_pods, false)
    }

    /// The multi-node variant: the client, the node and node2 each on their own link
    /// to a router namespace, so that a node's replies can reach the client without
    /// crossing the other node (direct server return). The node is at
    /// `ROUTED_NODE_IP`, node2 at `ROUTED_NODE2_IP`; `LB_RANGE` is routed to the node.
    pub fn build_routed(prefix: &str, local_pods: usize, remote_pods: usize) -> Result<Topology> {
        Topology::build_with(prefix, local_pods, remote_pods, true)
    }

    fn build_with(
        prefix: &str,
        local_pods: usize,
        remote_pods: usize,
        routed: bool,
    ) -> Result<Topology> {
        let client = Netns::create(&format!("{prefix}-client"))?;
        let router = if routed {
            Some(Netns::create(&format!("{prefix}-router"))?)
        } else {
            None
        };
        let node = Netns::create(&format!("{prefix}-node"))?;
        let node2 = Netns::create(&format!("{prefix}-node2"))?;
        let mut topology = Topology {
            pods: Vec::new(),
            node2,
            node,
            router,
            client,
            prefix: prefix.to_owned(),
        };
        match &topology.router {
            Some(router) => topology.wire_routed(router),
            None => topology.wire(),
        }
        .context("wiring client, node and node2")?;
        for _ in 0..local_pods {
            topology.add_pod(true)?;
        }
        for _ in 0..remote_pods {
            topology.add_pod(false)?;
        }
        Ok(topology)
    }

    fn wire(&self) -> Result<()> {
        let (client, node, node2) = (&self.client, &self.node, &self.node2);
        node.ip(&format!(
            "link add up0 type veth peer name eth0 netns {}",
            client.name
        ))?;
        add_address(node, NODE_IP, 24, "up0")?;
        node.ip("link set up0 up")?;
        add_address(client, CLIENT_IP, 24, "eth0")?;
        client.ip("link set eth0 up")?;
        add_route(client, Ipv4Addr::UNSPECIFIED, 0, NODE_IP)?;

        node.ip(&format!(
            "link add up1 type veth peer name up0 netns {}",
            node2.name
        ))?;
        add_address(node, NODE_LINK_IP, 24, "up1")?;
        node.ip("link set up1 up")?;
        add_route(node, Ipv4Addr::new(10, 244, 2, 0), 24, NODE2_IP)?;
        add_address(node2, NODE2_IP, 24, "up0")?;
        node2.ip("link set up0 up")?;
        add_route(node2, Ipv4Addr::UNSPECIFIED, 0, NODE_LINK_IP)?;

        for ns in [node, node2] {
            forward(ns)?;
        }
        // Frames that reach an uplink's XDP program come from a veth peer here, which
        // leaves TCP/UDP checksums to "hardware" (CHECKSUM_PARTIAL). A real NIC
        // delivers complete checksums; turning the senders' offload off gives XDP
        // the same input. Pod-facing tc programs need no such help.
        client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        node2.exec("ethtool", &["-K", "up0", "tx", "off"])?;
        Ok(())
    }

    fn wire_routed(&self, router: &Netns) -> Result<()> {
        let (client, node, node2) = (&self.client, &self.node, &self.node2);
        router.ip(&format!(
            "link add r0 type veth peer name eth0 netns {}",
            client.name
        ))?;
        add_address(router, ROUTER_CLIENT_SIDE, 24, "r0")?;
        add_address(client, CLIENT_IP, 24, "eth0")?;
        client.ip("link set eth0 up")?;
        add_route(client, Ipv4Addr::UNSPECIFIED, 0, ROUTER_CLIENT_SIDE)?;
        for (ns, link, addr, subnet) in [
            (node, "ra", ROUTED_NODE_IP, 1),
            (node2, "rb", ROUTED_NODE2_IP, 2),
        ] {
            let gateway = Ipv4Addr::new(198, 18, subnet, 254);
            router.ip(&format!(
                "link add {link} type veth peer name up0 netns {}",
                ns.name
            ))?;
            add_address(router, gateway, 24, link)?;
            router.ip(&format!("link set {link} up"))?;
            add_route(router, Ipv4Addr::new(10, 244, subnet, 0), 24, addr)?;
            add_address(ns, addr, 24, "up0")?;
            ns.ip("link set up0 up")?;
            add_route(ns, Ipv4Addr::UNSPECIFIED, 0, gateway)?;
            // The router's frames feed the node's XDP program: full checksums, as
            // from a NIC (see `wire`).
            router.exec("ethtool", &["-K", link, "tx", "off"])?;
        }
        router.ip("link set r0 up")?;
        let (lb_net, lb_len) = LB_NET;
        add_route(router, lb_net, lb_len, ROUTED_NODE_IP)?;
        for ns in [router, node, node2] {
            forward(ns)?;
        }
        Ok(())
    }

    /// Adds a pod with its servers; on the node if `local`, else on node2.
    pub fn add_pod(&mut self, local: bool) -> Result<&Pod> {
        let same_node = self
            .pods
            .iter()
            .filter(|p| (p.node == NODE_NAME) == local)
            .count();
        let (host, node_name, subnet) = if local {
            (&self.node, NODE_NAME, 1)
        } else {
            (&self.node2, NODE2_NAME, 2)
        };
        let index = same_node + 1;
        let name = format!("pod-{}{index}", if local { "a" } else { "b" });
        let addr = Ipv4Addr::new(10, 244, subnet, 10 + index as u8);
        let host_interface = format!("veth{index}");
        let ns = Netns::create(&format!("{}-{name}", self.prefix))?;
        wire_pod(host, &ns, &host_interface, addr)?;
        let servers = PodServers::start(&ns, &name)?;
        self.pods.push(Pod {
            name,
            node: node_name,
            addr,
            host_interface,
            _servers: servers,
            ns,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}

/// The veth pair of a pod, its addresses and routes (Calico-style), of both families.
fn wire_pod(host: &Netns, ns: &Netns, host_interface: &str, addr: Ipv4Addr) -> Result<()> {
    host.ip(&format!(
        "link add {host_interface} type veth peer name eth0 netns {}",
        ns.name
    ))?;
    host.ip(&format!("addr add {POD_GATEWAY}/32 dev {host_interface}"))?;
    host.ip(&format!(
        "-6 addr add {POD_GATEWAY6}/64 dev {host_interface} nodad"
    ))?;
    host.ip(&format!("link set {host_interface} up"))?;
    host.ip(&format!(
        "route add {addr}/32 dev {host_interface} scope link"
    ))?;
    host.ip(&format!(
        "-6 route add {}/128 dev {host_interface}",
        twin(addr)
    ))?;
    ns.ip(&format!("addr add {addr}/32 dev eth0"))?;
    ns.ip(&format!("-6 addr add {}/128 dev eth0 nodad", twin(addr)))?;
    ns.ip("link set eth0 up")?;
    ns.ip(&format!("route add {POD_GATEWAY} dev eth0 scope link"))?;
    ns.ip(&format!("route add default via {POD_GATEWAY} dev eth0"))?;
    ns.ip(&format!("-6 route add default via {POD_GATEWAY6} dev eth0"))?;
    Ok(())
}

impl Topology {
    /// Deletes a local pod's veth pair and creates it again under the same name, as a
    /// CNI does when a pod's sandbox is recreated; the pod's servers keep running.
    pub fn recreate_pod_interface(&self, pod: &str) -> Result<()> {
        let pod = self.pod(pod);
        self.node.ip(&format!("link del {}", pod.host_interface))?;
        wire_pod(&self.node, &pod.ns, &pod.host_interface, pod.addr)
    }

    /// The pod's host-side interface is renamed to `other` (which keeps it), then
    /// removed, and a new one takes its old name: the name returns on a new index.
    pub fn rename_away_and_replace_pod_interface(&self, pod: &str, other: &str) -> Result<()> {
        let pod = self.pod(pod);
        let name = &pod.host_interface;
        self.node.ip(&format!("link set {name} down"))?;
        self.node.ip(&format!("link set {name} name {other}"))?;
        self.node.ip(&format!("link set {other} up"))?;
        self.node.ip(&format!("link del {other}"))?;
        wire_pod(&self.node, &pod.ns, name, pod.addr)
    }
}

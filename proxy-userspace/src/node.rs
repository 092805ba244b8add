//! This node's identity, from flags (and its addresses from the Node object when the
//! flags do not give them): what decides local vs remote endpoints, which addresses
//! answer NodePorts, and which interfaces get which program.

use std::net::IpAddr;

use anyhow::{bail, Context as _, Result};
use k8s_openapi::api::core::v1::Node;
use proxy_common::Family;

use crate::node_ports::NodePortAddresses;

#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Matched against EndpointSlice `nodeName` to tell local from remote endpoints.
    pub name: String,
    /// The node's primary addresses, of either family or both (a dual-stack node):
    /// the first of a family is that family's masquerade (SNAT) source. NodePorts
    /// answer on them unless `node_ports` says otherwise.
    pub addresses: Vec<IpAddr>,
    /// Which of the node's addresses answer NodePorts.
    pub node_ports: NodePortAddresses,
    /// Interfaces facing the outside: XDP.
    pub uplinks: Vec<String>,
    /// Glob patterns (`*` and `?`) of host-side pod interfaces: tc ingress.
    pub pod_interface_patterns: Vec<String>,
    /// Where `addresses` came from.
    pub addresses_from: AddressesFrom,
}

/// Where the node's addresses came from: flags (or the config's `bindAddress`
/// alone), which stay; or the Node object, merged with the config's `bindAddress`,
/// which the agent keeps comparing with the object as it changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressesFrom {
    Flags,
    NodeObject { bind_address: Option<IpAddr> },
}

impl NodeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.addresses.is_empty() {
            bail!("the node has no address (NodePorts and masquerading use one): pass --node-ip");
        }
        Ok(())
    }

    /// The families the node has addresses of, IPv4 first.
    pub fn families(&self) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|family| self.snat_address(*family).is_some())
            .collect()
    }

    /// The masquerade source of `family`: the node's first address of it. A family
    /// the node has no address of is not masqueraded: its flows that would be are
    /// dropped (and counted `snat_exhausted`).
    pub fn snat_address(&self, family: Family) -> Option<IpAddr> {
        self.addresses
            .iter()
            .copied()
            .find(|address| Family::of(address) == family)
    }

    /// The node's addresses as the Node object says them now (`from_node_now`, its
    /// `host_addresses`, merged with the config's `bindAddress`), when the agent took
    /// its addresses from the object and they are no longer these: the
    /// agent restarts to take them (as kube-proxy does), since NodePorts, masquerade
    /// and the families served hang on them. An object without addresses says nothing.
    pub fn changed_addresses(&self, from_node_now: &[IpAddr]) -> Option<Vec<IpAddr>> {
        let AddressesFrom::NodeObject { bind_address } = self.addresses_from else {
            return None;
        };
        if from_node_now.is_empty() {
            return None;
        }
        let now = merge_bind_address(from_node_now.to_vec(), bind_address);
        (now != self.addresses).then_some(now)
    }

    pub fn is_pod_interface(&self, name: &str) -> bool {
        self.pod_interface_patterns
            .iter()
            .any(|pattern| glob_match(pattern.as_bytes(), name.as_bytes()))
    }
}

/// The node's addresses as kube-proxy finds them in its Node object (component-helpers'
/// `GetNodeHostIPs`): the first of its `InternalIP` addresses, else of its
/// `ExternalIP` ones, and then the first address of the other family in the same
/// order, if any (a dual-stack node).
pub fn host_addresses(node: &Node) -> Vec<IpAddr> {
    let listed = node
        .status
        .as_ref()
        .and_then(|status| status.addresses.as_deref())
        .unwrap_or_default();
    let of_type = |wanted: &'static str| {
        listed
            .iter()
            .filter(move |a| a.type_ == wanted)
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
    };
    let mut ordered = of_type("InternalIP").chain(of_type("ExternalIP"));
    let Some(first) = ordered.next() else {
        return Vec::new();
    };
    let other = ordered.find(|ip| Family::of(ip) != Family::of(&first));
    std::iter::once(first).chain(other).collect()
}

/// The node's addresses when no `--node-ip` names them, as kube-proxy decides them:
/// the Node object's, with the config's `bindAddress` (when set) taking its family's
/// place and making that family the primary one (first).
pub fn merge_bind_address(from_node: Vec<IpAddr>, bind_address: Option<IpAddr>) -> Vec<IpAddr> {
    let Some(bind) = bind_address else {
        return from_node;
    };
    std::iter::once(bind)
        .chain(
            from_node
                .into_iter()
                .filter(|ip| Family::of(ip) != Family::of(&bind)),
        )
        .collect()
}

/// Shell-style matching of `*` (any run) and `?` (one byte).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob_match(&pattern[1..], text) || (!text.is_empty() && glob_match(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob_match(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob_match(&pattern[1..], &text[1..]),
        _ => false,
    }
}

/// XDP hands translated packets to the stack (XDP_PASS). A masqueraded one, and the
/// reply of a NodePort flow from a remote backend, then carry a node address as
/// source, which the input path drops as a martian unless the interface accepts
/// local sources: `accept_local` on the interface or on `all` (the kernel takes
/// either). (This needs `rp_filter` 0 or 2 on uplinks; strict mode 1 would still drop
/// them.) Where `/proc/sys` is read-only (a container that is not privileged), the
/// setting may already be made on the host, which is then enough.
pub fn accept_local_sources(iface: &str) -> Result<()> {
    let path = accept_local_path(iface);
    let Err(error) = std::fs::write(&path, b"1") else {
        return Ok(());
    };
    let enabled = |p: &str| std::fs::read_to_string(p).is_ok_and(|v| v.trim() == "1");
    if enabled(&path) || enabled(&accept_local_path("all")) {
        return Ok(());
    }
    Err(error).with_context(|| {
        format!(
            "{path} cannot be set to 1, so translated packets with a node source would be \
             dropped as martians: set net.ipv4.conf.{iface}.accept_local=1 (or .all.) on the \
             host (`ebpf-proxy prepare-node` in a privileged init container does), or give \
             the agent a writable /proc/sys"
        )
    })
}

fn accept_local_path(iface: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{iface}/accept_local")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeStatus};

    use super::*;

    fn node(addresses: &[(&str, &str)]) -> Node {
        Node {
            status: Some(NodeStatus {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(kind, address)| NodeAddress {
                            type_: kind.to_string(),
                            address: address.to_string(),
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn ips(text: &[&str]) -> Vec<IpAddr> {
        text.iter()
            .map(|t| t.parse().expect("an address"))
            .collect()
    }

    #[test]
    fn a_node_s_addresses_are_its_first_internal_one_then_the_other_family_s() {
        let dual = node(&[
            ("Hostname", "node-a"),
            ("ExternalIP", "203.0.113.7"),
            ("InternalIP", "10.0.0.5"),
            ("InternalIP", "10.0.0.6"),
            ("InternalIP", "not an address"),
            ("ExternalIP", "2001:db8::7"),
        ]);
        assert_eq!(host_addresses(&dual), ips(&["10.0.0.5", "2001:db8::7"]));
        let external_only = node(&[("ExternalIP", "fd00::5"), ("ExternalIP", "10.0.0.9")]);
        assert_eq!(
            host_addresses(&external_only),
            ips(&["fd00::5", "10.0.0.9"])
        );
        assert_eq!(host_addresses(&node(&[("Hostname", "n")])), ips(&[]));
        assert_eq!(host_addresses(&Node::default()), ips(&[]));
    }

    #[test]
    fn only_addresses_taken_from_the_node_object_follow_its_changes() {
        let mut config = NodeConfig {
            name: "node-a".into(),
            addresses: ips(&["10.0.0.5", "fd00::5"]),
            node_ports: Default::default(),
            uplinks: vec![],
            pod_interface_patterns: vec![],
            addresses_from: AddressesFrom::Flags,
        };
        assert_eq!(config.changed_addresses(&ips(&["10.0.0.6"])), None);
        config.addresses_from = AddressesFrom::NodeObject { bind_address: None };
        assert_eq!(
            config.changed_addresses(&ips(&["10.0.0.5", "fd00::5"])),
            None
        );
        assert_eq!(
            config.changed_addresses(&[]),
            None,
            "no address says nothing"
        );
        assert_eq!(
            config.changed_addresses(&ips(&["10.0.0.5"])),
            Some(ips(&["10.0.0.5"]))
        );
        config.addresses = ips(&["fd00::9", "10.0.0.5"]);
        config.addresses_from = AddressesFrom::NodeObject {
            bind_address: ips(&["fd00::9"]).first().copied(),
        };
        assert_eq!(
            config.changed_addresses(&ips(&["10.0.0.5", "fd00::5"])),
            None
        );
        assert_eq!(
            config.changed_addresses(&ips(&["10.0.0.7", "fd00::5"])),
            Some(ips(&["fd00::9", "10.0.0.7"]))
        );
    }

    #[test]
    fn a_bind_address_takes_its_family_s_place_and_goes_first() {
        let from_node = ips(&["10.0.0.5", "fd00::5"]);
        assert_eq!(merge_bind_address(from_node.clone(), None), from_node);
        assert_eq!(
            merge_bind_address(from_node.clone(), ips(&["fd00::9"]).first().copied()),
            ips(&["fd00::9", "10.0.0.5"])
        );
        assert_eq!(
            merge_bind_address(ips(&[]), ips(&["10.1.1.1"]).first().copied()),
            ips(&["10.1.1.1"])
        );
    }

    #[test]
    fn glob_patterns_match_interface_names() {
        assert!(glob_match(b"veth*", b"veth1a2b"));
        assert!(glob_match(b"cali*", b"cali0"));
        assert!(glob_match(b"pod?", b"pod3"));
        assert!(!glob_match(b"pod?", b"pod12"));
        assert!(!glob_match(b"veth*", b"eth0"));
        assert!(glob_match(b"*", b""));
    }
}

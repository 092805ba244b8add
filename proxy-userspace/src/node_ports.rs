//! Which of the node's addresses answer NodePorts: kube-proxy's `nodePortAddresses`
//! (`--nodeport-addresses`), CIDRs and the keywords `primary` and `all`.
//!
//! Without it, NodePorts answer on the `--node-ip` addresses, as they always did
//! here. With it, the addresses come from the node's interfaces (followed as they
//! are added and removed) and answer when a CIDR holds them; `primary` means the
//! `--node-ip` addresses. The primary addresses stay known to the data path as the
//! node's (the masquerade source, replies to it) even where NodePorts do not answer.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use proxy_common::{NodeAddrFlags, NODE_ADDR_NO_NODE_PORTS};

use crate::model::SourceRange;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The `--node-ip` addresses.
    #[default]
    NodeIps,
    /// The node's addresses that one of these holds.
    Matching(Vec<NodePortMatch>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortMatch {
    Cidr(SourceRange),
    /// The node's primary addresses (`--node-ip`, the config's `bindAddress`).
    Primary,
}

impl NodePortAddresses {
    /// kube-proxy's list: CIDRs, `primary`, `all` (every address). `localhost` is
    /// refused: NodePorts on loopback are kube-proxy's iptables mode only.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<NodePortAddresses, String> {
        let mut matches = Vec::new();
        for item in items {
            match item.as_ref().trim() {
                "primary" => matches.push(NodePortMatch::Primary),
                // Both families' (IPv6 link-local addresses are never node addresses:
                // `datapath::interfaces`).
                "all" => {
                    for everything in ["0.0.0.0/0", "::/0"] {
                        matches.push(NodePortMatch::Cidr(everything.parse()?));
                    }
                }
                "localhost" => {
                    return Err("nodePortAddresses localhost: NodePorts are not served on \
                                loopback (as in kube-proxy's ipvs and nftables modes)"
                        .to_owned())
                }
                cidr => matches.push(NodePortMatch::Cidr(cidr.parse()?)),
            }
        }
        if matches.is_empty() {
            return Err("nodePortAddresses: an empty list".into());
        }
        Ok(NodePortAddresses::Matching(matches))
    }

    /// Whether the node's interface addresses matter (and are to be followed).
    pub fn follows_interfaces(&self) -> bool {
        matches!(self, NodePortAddresses::Matching(_))
    }

    /// The `NODE_ADDRS` entries: the primary addresses, and the node's `present`
    /// addresses that answer NodePorts.
    pub fn entries(
        &self,
        primary: &[IpAddr],
        present: &BTreeSet<IpAddr>,
    ) -> BTreeMap<IpAddr, NodeAddrFlags> {
        let answering = |flag: bool| NodeAddrFlags {
            flags: if flag { 0 } else { NODE_ADDR_NO_NODE_PORTS },
        };
        match self {
            NodePortAddresses::NodeIps => primary.iter().map(|a| (*a, answering(true))).collect(),
            NodePortAddresses::Matching(matches) => {
                let in_cidr = |addr: &IpAddr| {
                    matches.iter().any(|m| match m {
                        NodePortMatch::Cidr(range) => range.contains(addr),
                        NodePortMatch::Primary => false,
                    })
                };
                let primary_answers = matches.contains(&NodePortMatch::Primary);
                // Never loopback, whatever the CIDRs: `all` is every address but those
                // (NodePorts on 127.0.0.1 are kube-proxy's iptables mode only).
                let mut entries: BTreeMap<IpAddr, NodeAddrFlags> = present
                    .iter()
                    .filter(|a| !a.is_loopback() && in_cidr(a))
                    .map(|a| (*a, answering(true)))
                    .collect();
                for addr in primary {
                    entries.insert(*addr, answering(primary_answers || in_cidr(addr)));
                }
                entries
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn cidrs_and_primary_choose_the_answering_addresses() {
        let primary = [ip("198.18.0.1")];
        let present: BTreeSet<IpAddr> = [
            "127.0.0.1",
            "198.18.0.1",
            "198.18.0.77",
            "198.18.1.1",
            "fd00::1",
        ]
        .into_iter()
        .map(ip)
        .collect();
        let answers = |config: &NodePortAddresses| -> Vec<(String, bool)> {
            config
                .entries(&primary, &present)
                .into_iter()
                .map(|(a, f)| (a.to_string(), f.answers_node_ports()))
                .collect()
        };
        let pair = |a: &str, yes: bool| (a.to_owned(), yes);
        assert_eq!(
            answers(&NodePortAddresses::NodeIps),
            [pair("198.18.0.1", true)]
        );
        let cidr = NodePortAddresses::parse(&["198.18.0.0/24"]).expect("cidr");
        assert_eq!(
            answers(&cidr),
            [pair("198.18.0.1", true), pair("198.18.0.77", true)]
        );
        let other = NodePortAddresses::parse(&["198.18.1.0/24"]).expect("cidr");
        assert_eq!(
            answers(&other),
            [pair("198.18.0.1", false), pair("198.18.1.1", true)],
            "the primary address stays the node's, without NodePorts"
        );
        let primary_only = NodePortAddresses::parse(&["primary"]).expect("primary");
        assert_eq!(answers(&primary_only), [pair("198.18.0.1", true)]);
        let all = NodePortAddresses::parse(&["all"]).expect("all");
        assert_eq!(
            answers(&all).len(),
            4,
            "every address of both families but loopback"
        );
        assert!(NodePortAddresses::parse(&["localhost"]).is_err());
        assert!(NodePortAddresses::parse(&["10.0.0.0/33"]).is_err());
        assert!(NodePortAddresses::parse::<&str>(&[]).is_err());
    }
}

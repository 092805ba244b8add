//! This node's identity, from flags: what decides local vs remote endpoints, which
//! addresses answer NodePorts, and which interfaces get which program.

use std::net::Ipv4Addr;

use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Matched against EndpointSlice `nodeName` to tell local from remote endpoints.
    pub name: String,
    /// Addresses that answer NodePorts; the first is the masquerade (SNAT) source.
    pub addresses: Vec<Ipv4Addr>,
    /// Interfaces facing the outside: XDP.
    pub uplinks: Vec<String>,
    /// Glob patterns (`*` and `?`) of host-side pod interfaces: tc ingress.
    pub pod_interface_patterns: Vec<String>,
}

impl NodeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.addresses.is_empty() {
            bail!("at least one --node-ip is required (NodePorts and masquerading use it)");
        }
        Ok(())
    }

    pub fn snat_address(&self) -> Ipv4Addr {
        self.addresses[0]
    }

    pub fn is_pod_interface(&self, name: &str) -> bool {
        self.pod_interface_patterns
            .iter()
            .any(|pattern| glob_match(pattern.as_bytes(), name.as_bytes()))
    }
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

#[cfg(test)]
mod tests {
    use super::glob_match;

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

//! A flow netfilter translated, as the two conntrack entries the data path would have
//! written had it opened the flow itself (`open_flow` in the data path's `translate`):
//! the same constructors, the same flags, so that nothing downstream can tell an
//! adopted flow from one of its own.

use std::{fmt, net::SocketAddr};

use proxy_common::{
    Addr, Backend, CtEntry, CtKey, CtTimeouts, ServiceValue, Transport, ACCT_ACTIVE, ACCT_INACTIVE,
    BACKEND_F_REMOTE, CT_CLOSING, CT_ESTABLISHED, CT_F_FIN, CT_F_NODE_SOURCE, CT_F_REWRITE_DST,
    CT_F_REWRITE_SRC, CT_SYN_RECV, CT_SYN_SENT, PROTO_TCP, PROTO_UDP,
};

use super::netfilter::NatFlow;
use crate::model::Family;

/// Why a flow netfilter translated was left to netfilter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum NotAdopted {
    /// Not TCP or UDP (SCTP's state is not read from netfilter).
    Protocol,
    /// A TCP state that holds no connection (`TCP_CONNTRACK_NONE`).
    TcpState,
    /// Its destination is no frontend of ours (not a service, or a service this
    /// agent does not serve).
    NoFrontend,
    /// Its backend is no longer an endpoint of the service.
    BackendGone,
    /// The client and the backend are of different families.
    MixedFamilies,
    /// It comes from one of the node's own sockets: kube-proxy translated it in
    /// OUTPUT, before any hook of ours (the socket hooks act at connect(), long past
    /// for it); its `nf_conntrack` entry translates it while kube-proxy's rules last.
    NodeLocal,
    /// The data path already tracks the flow (an earlier adoption).
    AlreadyTracked,
    /// The conntrack table refused the entries (other than as already there).
    TableRefused,
}

impl NotAdopted {
    /// The metric label and the log's word for it.
    pub const fn label(self) -> &'static str {
        match self {
            NotAdopted::Protocol => "protocol",
            NotAdopted::TcpState => "tcp_state",
            NotAdopted::NoFrontend => "no_frontend",
            NotAdopted::BackendGone => "backend_gone",
            NotAdopted::MixedFamilies => "mixed_families",
            NotAdopted::NodeLocal => "node_local",
            NotAdopted::AlreadyTracked => "already_tracked",
            NotAdopted::TableRefused => "table_refused",
        }
    }
}

impl fmt::Display for NotAdopted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Both directions of one adopted flow, keyed as the data path looks them up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntries {
    pub key: CtKey,
    pub forward: CtEntry,
    pub reply_key: CtKey,
    pub reply: CtEntry,
}

/// Where the flow goes in our terms.
pub struct Destination<'a> {
    pub service: &'a ServiceValue,
    pub backend: &'a Backend,
    /// The frontend address is one of this node's (a NodePort's, or a service address
    /// still on an interface: IPVS's `kube-ipvs0`): replies leave from it.
    pub to_node_address: bool,
}

/// Our (state, accounting) of a flow in netfilter's state, or why there is none.
/// TCP states by `TCP_CONNTRACK_*`: 1 SYN_SENT, 2 SYN_RECV, 3 ESTABLISHED, 4 FIN_WAIT
/// and 5 CLOSE_WAIT (one direction's FIN: still established for `tcp::next`, which
/// closes on the second FIN, the first one marked with `CT_F_FIN`), 6 LAST_ACK,
/// 7 TIME_WAIT and 8 CLOSE (closing), 9 SYN_SENT2.
fn state_of(flow: &NatFlow) -> Result<(u8, u32), NotAdopted> {
    match (flow.protocol, flow.tcp_state) {
        (PROTO_UDP, _) => Ok(Transport::opening(PROTO_UDP)),
        (PROTO_TCP, Some(3..=5)) => Ok((CT_ESTABLISHED, ACCT_ACTIVE)),
        (PROTO_TCP, Some(1 | 9)) => Ok((CT_SYN_SENT, ACCT_INACTIVE)),
        (PROTO_TCP, Some(2)) => Ok((CT_SYN_RECV, ACCT_INACTIVE)),
        (PROTO_TCP, Some(6..=8)) => Ok((CT_CLOSING, ACCT_INACTIVE)),
        (PROTO_TCP, _) => Err(NotAdopted::TcpState),
        _ => Err(NotAdopted::Protocol),
    }
}

fn key_of(protocol: u8, (src, dst): (SocketAddr, SocketAddr)) -> Result<CtKey, NotAdopted> {
    let family = Family::of(&src.ip());
    if Family::of(&dst.ip()) != family {
        return Err(NotAdopted::MixedFamilies);
    }
    Ok(CtKey {
        src: Addr::from_ip(&src.ip()),
        dst: Addr::from_ip(&dst.ip()),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto: protocol,
        family: family.number(),
        _pad: [0; 2],
    })
}

/// The entries of `flow`, to `to`; `now` is the data path's clock. The flow keeps
/// what is left of netfilter's timeout, up to our own for its state.
pub fn flow_entries(
    flow: &NatFlow,
    to: &Destination<'_>,
    timeouts: &CtTimeouts,
    now: u64,
) -> Result<FlowEntries, NotAdopted> {
    let (state, accounting) = state_of(flow)?;
    let key = key_of(flow.protocol, flow.original)?;
    // The backend's answer as it is on the wire, which the reply entry is looked up by.
    let reply_key = key_of(flow.protocol, flow.reply)?;
    if reply_key.family != key.family {
        return Err(NotAdopted::MixedFamilies);
    }
    let ours = timeouts.of(flow.protocol, state);
    let left = (u64::from(flow.timeout_s) * 1_000_000_000).min(ours);
    let last_seen = now.saturating_sub(ours - left);
    let backend = to.backend;
    let mut forward = CtEntry::original(
        &key,
        (backend.addr, backend.port),
        (to.service.id, backend.id),
        (state, accounting),
        last_seen,
    );
    let mut reply = CtEntry::reply_to(&key, &forward);
    if to.to_node_address {
        reply.flags |= CT_F_NODE_SOURCE;
    }
    // Replies come back to the address and port netfilter gave the client (its
    // MASQUERADE chose a node address, the outgoing interface's).
    if reply_key.dst != key.src {
        CtEntry::masquerade(&mut forward, &mut reply, reply_key.dst);
    }
    if reply_key.dport != key.sport {
        reply.flags |= CT_F_REWRITE_DST;
        forward.flags |= CT_F_REWRITE_SRC;
        forward.nat_sport = reply_key.dport;
    }
    if flow.fin.0 {
        forward.flags |= CT_F_FIN;
    }
    if flow.fin.1 {
        reply.flags |= CT_F_FIN;
    }
    forward.helper = to.service.helper;
    forward.backend_here = u8::from(backend.flags & BACKEND_F_REMOTE == 0);
    Ok(FlowEntries {
        key,
        forward,
        reply_key,
        reply,
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proxy_common::{
        tcp::{TCP_ACK, TCP_FIN},
        CT_F_REPLY, CT_F_SNAT,
    };

    use super::*;

    const CLIENT: &str = "198.18.0.2:40000";
    const VIP: &str = "10.96.0.10:80";
    const BACKEND: &str = "10.244.1.1:8080";
    const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

    fn flow(reply_to: &str, tcp_state: u8) -> NatFlow {
        NatFlow {
            protocol: PROTO_TCP,
            original: (CLIENT.parse().expect("client"), VIP.parse().expect("vip")),
            reply: (
                BACKEND.parse().expect("backend"),
                reply_to.parse().expect("reply"),
            ),
            tcp_state: Some(tcp_state),
            fin: (false, false),
            timeout_s: 100,
        }
    }

    fn adopt(flow: &NatFlow) -> Result<FlowEntries, NotAdopted> {
        let service = ServiceValue {
            id: 7,
            ..Default::default()
        };
        let backend: SocketAddr = BACKEND.parse().expect("backend");
        let backend = Backend {
            addr: Addr::from_ip(&backend.ip()),
            port: backend.port().to_be(),
            id: 3,
            ..Default::default()
        };
        let to = Destination {
            service: &service,
            backend: &backend,
            to_node_address: false,
        };
        flow_entries(flow, &to, &CtTimeouts::DEFAULT, 1_000_000_000_000_000)
    }

    /// A flow translated without masquerade: the entries are the data path's own.
    #[test]
    fn a_plain_flow_gets_the_entries_the_data_path_writes() {
        let adopted = adopt(&flow(CLIENT, 3)).expect("established");
        let key = adopted.key;
        let expected = CtEntry::original(
            &key,
            (adopted.forward.nat_dst, adopted.forward.nat_dport),
            (7, 3),
            (CT_ESTABLISHED, ACCT_ACTIVE),
            adopted.forward.last_seen_ns,
        );
        assert_eq!(
            adopted.forward,
            CtEntry {
                backend_here: 1,
                ..expected
            }
        );
        assert_eq!(adopted.reply_key, key.peer(&adopted.forward));
        assert_eq!(adopted.reply, CtEntry::reply_to(&key, &expected));
        assert_eq!(adopted.reply.flags, CT_F_REWRITE_SRC | CT_F_REPLY);
    }

    /// Masqueraded to the node's address and another port (`--random-fully`).
    #[test]
    fn a_masqueraded_flow_keeps_the_port_netfilter_chose() {
        let adopted = adopt(&flow("198.18.0.1:61000", 3)).expect("masqueraded");
        assert_eq!(adopted.forward.nat_src, Addr::from_ip(&NODE.into()));
        assert_eq!(adopted.forward.nat_sport, 61000u16.to_be());
        assert_ne!(adopted.forward.flags & CT_F_SNAT, 0);
        assert_eq!(adopted.reply_key.dst, Addr::from_ip(&NODE.into()));
        assert_eq!(adopted.reply_key.dport, 61000u16.to_be());
        assert_eq!(adopted.reply_key, adopted.key.peer(&adopted.forward));
        // The reply entry puts the client's address and port back.
        assert_eq!(adopted.reply.nat_dst, adopted.key.src);
        assert_eq!(adopted.reply.nat_dport, adopted.key.sport);
        assert_ne!(adopted.reply.flags & CT_F_REWRITE_DST, 0);
    }

    /// A half-closed flow is as the data path leaves it after one FIN: established,
    /// active, that direction's entry marked, so that the other FIN closes it.
    #[test]
    fn a_half_closed_flow_stays_established_with_its_fin_marked() {
        let mut half_closed = flow(CLIENT, 4);
        half_closed.fin = (true, false);
        let adopted = adopt(&half_closed).expect("half-closed");
        assert_eq!(
            (adopted.forward.state, adopted.forward.accounting),
            (CT_ESTABLISHED, ACCT_ACTIVE)
        );
        assert_ne!(adopted.forward.flags & CT_F_FIN, 0);
        assert_eq!(adopted.reply.flags & CT_F_FIN, 0);
        let (state, _) = Transport::Tcp.next(
            adopted.reply.state,
            adopted.reply.flags,
            TCP_FIN | TCP_ACK,
            || adopted.forward.flags & CT_F_FIN != 0,
        );
        assert_eq!(state, CT_CLOSING, "the backend's FIN closes it");
    }

    #[test]
    fn states_map_to_ours_and_the_time_left_is_kept() {
        let closing = adopt(&flow(CLIENT, 6)).expect("closing");
        assert_eq!(
            (closing.forward.state, closing.forward.accounting),
            (CT_CLOSING, ACCT_INACTIVE)
        );
        // 100 s left in netfilter, at most our 10 s closing timeout: all of ours.
        assert_eq!(closing.forward.last_seen_ns, 1_000_000_000_000_000);
        let established = adopt(&flow(CLIENT, 3)).expect("established");
        let ours = CtTimeouts::DEFAULT.of(PROTO_TCP, CT_ESTABLISHED);
        assert_eq!(
            1_000_000_000_000_000 - established.forward.last_seen_ns,
            ours - 100_000_000_000
        );
        assert_eq!(adopt(&flow(CLIENT, 0)), Err(NotAdopted::TcpState));
    }
}

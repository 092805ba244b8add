//! Adopting kube-proxy's flows (`--adopt-kube-proxy-flows`), so that a node switches
//! from kube-proxy's iptables, nftables or IPVS mode without dropping a connection.
//!
//! kube-proxy's flows live in `nf_conntrack` (IPVS's too, with the `vs.conntrack=1`
//! kube-proxy sets), which rewrites their packets after the data path has seen them. A packet of one of them that meets the data path once our
//! frontends are programmed would be scheduled afresh: a mid-flow TCP segment
//! re-hashed, likely to another backend (a reset), and a masqueraded flow's segments
//! sent from a port the backend never heard of. So the agent reads `nf_conntrack`
//! when it starts, and writes each flow to one of our frontends into the data path's
//! conntrack, as the data path would have written it, while that frontend is being
//! programmed and before it becomes visible: from then on the data path translates
//! the flow, to the backend kube-proxy chose, with the masquerade address and port
//! netfilter chose. The flow's `nf_conntrack` entry is deleted at once, because the
//! packets netfilter now sees are the translated ones, and a new entry of theirs
//! would clash with the old entry's reply tuple (netfilter then rewrites the source
//! port of the packet, which breaks the flow).
//!
//! Flows from the node's own sockets are left to netfilter: kube-proxy translated them
//! in OUTPUT, before any hook of ours sees them, and the socket hooks act at
//! connect(), long past for them. Their `nf_conntrack` entry translates them for as
//! long as kube-proxy's nat rules are there (netfilter stops applying its
//! translation with them, as it does without us).
//!
//! Written down: a flow netfilter opens between the read (right before the first
//! sync) and its frontend's programming is not adopted, nor is a packet of a flow
//! that arrives in the microseconds between our entries' writing and its
//! `nf_conntrack` entry's deletion spared the clash. Nor are flows to a terminating
//! endpoint that the service's ready ones leave out of its frontend (`BackendGone`).

mod entries;
pub mod netfilter;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::Result;
use proxy_common::{
    Addr, Backend, ConnCounts, CtTimeouts, ServiceValue, ACCT_ACTIVE, ACCT_INACTIVE,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    conntrack::coarse_now_ns,
    datapath::{codec::addr_key, mmap::MappedArray, tables::Tables},
    model::{Family, FrontendKey, Listen},
};
pub use entries::NotAdopted;
use entries::{flow_entries, Destination};
use netfilter::{Conntrack, NatFlow};

/// What an adoption did, for the log, `status` and the metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdoptionReport {
    pub adopted: usize,
    /// Flows netfilter translated that stay with netfilter, by reason
    /// (`NotAdopted::label`).
    pub not_adopted: BTreeMap<String, usize>,
    /// Adopted flows whose `nf_conntrack` entry could not be deleted.
    pub not_deleted: usize,
    /// Why nothing was adopted: `nf_conntrack` could not be read. The agent runs on
    /// without adopting (kube-proxy is gone by then: a node without a proxy would be
    /// worse than one whose open connections end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_error: Option<String>,
}

/// The kernel's translated flows, waiting for their frontends.
pub struct Adoption {
    conntrack: Conntrack,
    /// The addresses on the node's interfaces when the flows were read.
    local: BTreeSet<IpAddr>,
    /// By protocol and destination port, then destination address: a frontend finds
    /// its flows without a pass over all of them (a node may hold millions).
    pending: BTreeMap<(u8, u16), BTreeMap<IpAddr, Vec<Pending>>>,
    timeouts: CtTimeouts,
    report: AdoptionReport,
}

struct Pending {
    flow: NatFlow,
    /// A frontend of ours had its destination (so the backend, not the frontend, is
    /// what was missing).
    matched: bool,
}

/// IPVS writes its real servers into nf_conntrack only with this sysctl on.
const IPVS_CONNTRACK: &str = "/proc/sys/net/ipv4/vs/conntrack";

/// Flows left out are logged one by one up to this many.
const LOGGED_REFUSALS: usize = 20;

impl Adoption {
    /// Reads the flows netfilter translated; the agent adopts them as it programs
    /// their frontends. `local`: the addresses on the node's interfaces.
    pub fn read(timeouts: CtTimeouts, local: BTreeSet<IpAddr>) -> Result<Adoption> {
        if std::fs::read_to_string(IPVS_CONNTRACK).is_ok_and(|on| on.trim() == "0") {
            warn!("{IPVS_CONNTRACK} is 0: IPVS's flows are not in nf_conntrack, and cannot be adopted (kube-proxy's IPVS mode sets it to 1)");
        }
        let mut conntrack = Conntrack::open()?;
        let flows = conntrack.translated_flows()?;
        info!(
            flows = flows.len(),
            "read the flows netfilter translated, to adopt"
        );
        let mut pending: BTreeMap<_, BTreeMap<_, Vec<_>>> = BTreeMap::new();
        for flow in flows {
            let (to, port) = (flow.original.1.ip(), flow.original.1.port());
            pending
                .entry((flow.protocol, port))
                .or_default()
                .entry(to)
                .or_default()
                .push(Pending {
                    flow,
                    matched: false,
                });
        }
        Ok(Adoption {
            conntrack,
            local,
            pending,
            timeouts,
            report: AdoptionReport::default(),
        })
    }

    /// Flows read and not adopted (nor refused) yet.
    pub fn pending(&self) -> usize {
        self.pending
            .values()
            .flat_map(BTreeMap::values)
            .map(Vec::len)
            .sum()
    }

    /// Adopts the flows to `key`, a frontend programmed with `service` and `slots`
    /// that is not visible to packets yet.
    pub fn adopt(
        &mut self,
        key: &FrontendKey,
        service: &ServiceValue,
        slots: &[Backend],
        tables: &mut Tables,
        counts: &MappedArray<ConnCounts>,
    ) {
        let Some(by_address) = self.pending.get_mut(&(key.protocol.number(), key.port)) else {
            return;
        };
        let mut adoptable = Vec::new();
        for to in frontend_addresses(key, by_address.keys(), tables) {
            let Some(flows) = by_address.get_mut(&to) else {
                continue;
            };
            let mut index = 0;
            while index < flows.len() {
                flows[index].matched = true;
                let reply_from = flows[index].flow.reply.0;
                let (addr, port) = (Addr::from_ip(&reply_from.ip()), reply_from.port().to_be());
                let backend = slots.iter().find(|b| b.addr == addr && b.port == port);
                match backend {
                    Some(backend) => adoptable.push((flows.swap_remove(index).flow, *backend)),
                    // Perhaps another frontend on the address (the in-cluster one) has it.
                    None => index += 1,
                }
            }
        }
        let now = coarse_now_ns();
        for (flow, backend) in adoptable {
            self.adopt_one(&flow, service, &backend, tables, counts, now);
        }
    }

    fn adopt_one(
        &mut self,
        flow: &NatFlow,
        service: &ServiceValue,
        backend: &Backend,
        tables: &mut Tables,
        counts: &MappedArray<ConnCounts>,
        now: u64,
    ) {
        if self.local.contains(&flow.original.0.ip()) {
            return self.refused(flow, NotAdopted::NodeLocal);
        }
        let frontend = flow.original.1.ip();
        let to = Destination {
            service,
            backend,
            // As the data path decides it, by `NODE_ADDRS`; and a service address
            // still on an interface (IPVS's `kube-ipvs0`): replies from it would be
            // dropped as martians if handed to the stack.
            to_node_address: tables.node_addrs.get(&addr_key(&frontend), 0).is_ok()
                || self.local.contains(&frontend),
        };
        match flow_entries(flow, &to, &self.timeouts, now)
            .and_then(|entries| write(tables, &entries))
        {
            Ok(accounting) => {
                match accounting {
                    ACCT_ACTIVE => counts.adjust(backend.id, 1, 0),
                    ACCT_INACTIVE => counts.adjust(backend.id, 0, 1),
                    _ => {}
                }
                self.report.adopted += 1;
                if let Err(e) = self.conntrack.delete(flow) {
                    warn!(?flow, "adopted, but its nf_conntrack entry stays: {e:#}");
                    self.report.not_deleted += 1;
                }
            }
            Err(reason) => self.refused(flow, reason),
        }
    }

    /// The report, once every source's first view is programmed: what is still
    /// pending has no frontend (or no backend) of ours.
    pub fn finish(mut self) -> AdoptionReport {
        let left = std::mem::take(&mut self.pending);
        for pending in left.into_values().flat_map(BTreeMap::into_values).flatten() {
            let reason = match pending.matched {
                true => NotAdopted::BackendGone,
                false => NotAdopted::NoFrontend,
            };
            self.refused(&pending.flow, reason);
        }
        self.report
    }

    fn refused(&mut self, flow: &NatFlow, reason: NotAdopted) {
        let refused: usize = self.report.not_adopted.values().sum();
        if refused < LOGGED_REFUSALS {
            info!(?flow, %reason, "left to netfilter");
        }
        *self
            .report
            .not_adopted
            .entry(reason.label().to_owned())
            .or_default() += 1;
    }
}

/// Which of the flows' destinations `destinations` (of the key's protocol and port)
/// `key` listens on: its address, or for a NodePort the node's addresses that answer
/// NodePorts. Tunnel frontends are ours alone: kube-proxy has none.
fn frontend_addresses<'a>(
    key: &FrontendKey,
    destinations: impl Iterator<Item = &'a IpAddr>,
    tables: &Tables,
) -> Vec<IpAddr> {
    match key.listen {
        Listen::Address(addr) | Listen::InClusterAddress(addr) => vec![addr],
        Listen::NodePort(family) | Listen::InClusterNodePort(family) => destinations
            .filter(|to| {
                Family::of(to) == family
                    && tables
                        .node_addrs
                        .get(&addr_key(to), 0)
                        .is_ok_and(|flags| flags.answers_node_ports())
            })
            .copied()
            .collect(),
        Listen::TunnelAddress(_) | Listen::TunnelNodePort(_) => Vec::new(),
    }
}

/// Writes both entries (the reply's first, as the data path claims a reply tuple
/// before it writes the flow), neither over an existing one; the flow's accounting.
fn write(tables: &mut Tables, entries: &entries::FlowEntries) -> Result<u32, NotAdopted> {
    const NOEXIST: u64 = aya_obj::generated::BPF_NOEXIST as u64;
    let refusal = |e: aya::maps::MapError| match e {
        aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EEXIST) => {
            NotAdopted::AlreadyTracked
        }
        _ => NotAdopted::TableRefused,
    };
    let conntrack = &mut tables.conntrack;
    conntrack
        .insert(entries.reply_key, entries.reply, NOEXIST)
        .map_err(refusal)?;
    if let Err(e) = conntrack.insert(entries.key, entries.forward, NOEXIST) {
        let _ = conntrack.remove(&entries.reply_key);
        return Err(refusal(e));
    }
    Ok(entries.forward.accounting)
}

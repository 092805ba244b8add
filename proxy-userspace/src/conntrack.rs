//! Conntrack from userspace: listing flows, flushing them, and garbage collection.
//!
//! The data path expires entries lazily (an idle entry is replaced when its tuple is
//! seen again) and the LRU evicts when full; neither happens for a flow that simply
//! stops. The agent therefore removes entries idle past their timeout and stops
//! counting their flows in `CONN_COUNTS` (UDP flows never close), and counts what is
//! left, so that the counters can be reconciled with it (`sync::accounting`).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    net::SocketAddr,
};

use anyhow::{Context as _, Result};
use proxy_common::{
    ConnCounts, CtEntry, CtKey, CtTimeouts, ACCT_ACTIVE, ACCT_INACTIVE, CT_CLOSING, CT_ESTABLISHED,
    CT_F_ENCAP, CT_F_RELATED, CT_F_REPLY, CT_F_REWRITE_SRC, CT_SYN_RECV, CT_SYN_SENT,
};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::{mmap::MappedArray, tables::Tables},
    model::{Family, Protocol},
    sync::address_filter::AddressBits,
};

/// CLOCK_MONOTONIC_COARSE, the data path's clock (`bpf_ktime_get_coarse_ns`).
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a valid timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub scanned: usize,
    pub expired: usize,
    /// What the entries left after the pass say about each backend id.
    pub census: Census,
}

#[derive(Debug, Default)]
pub struct Census {
    /// Backend ids named by an entry (either direction).
    pub referenced: BTreeSet<u32>,
    /// How the original entries count their flows, by backend id.
    pub counted: BTreeMap<u32, ConnCounts>,
    /// The addresses the entries name, as the address filter tests them.
    pub addresses: AddressBits,
}

impl Census {
    fn add(&mut self, key: &CtKey, entry: &CtEntry) {
        self.referenced.insert(entry.backend_id);
        self.addresses.insert_flow(key, entry);
        if entry.flags & CT_F_REPLY != 0 {
            return;
        }
        let counts = self.counted.entry(entry.backend_id).or_default();
        match entry.accounting {
            ACCT_ACTIVE => counts.active += 1,
            ACCT_INACTIVE => counts.inactive += 1,
            _ => {}
        }
    }
}

/// One pass over `CONNTRACK`: removes what expired, and takes the census of the rest.
///
/// Race, written down: a packet of a flow can arrive while its expired entry is being
/// removed here. The data path then also sees the entry as stale and retires it
/// itself; its exchange of `accounting` and our read of it can both see the flow as
/// counted, so it may be uncounted twice. That takes a packet arriving after the full
/// idle timeout, in the microseconds between our read and delete; the counters do
/// not go below zero, and reconciliation with the census corrects them.
pub fn collect(
    tables: &mut Tables,
    counts: &MappedArray<ConnCounts>,
    timeouts: &CtTimeouts,
) -> Result<GcReport> {
    let now = coarse_now_ns();
    let expired_at = |key: &CtKey, entry: &CtEntry| {
        now.saturating_sub(entry.last_seen_ns) > timeouts.of(key.proto, entry.state)
    };
    let mut report = GcReport::default();
    let mut expired = Vec::new();
    for (key, entry) in tables.conntrack.iter().filter_map(Result::ok) {
        report.scanned += 1;
        if expired_at(&key, &entry) {
            expired.push(key);
        } else {
            report.census.add(&key, &entry);
        }
    }
    for key in expired {
        let Ok(entry) = tables.conntrack.get(&key, 0) else {
            continue;
        };
        if !expired_at(&key, &entry) || tables.conntrack.remove(&key).is_err() {
            report.census.add(&key, &entry); // refreshed since the scan
            continue;
        }
        report.expired += 1;
        uncount(counts, &entry);
    }
    Ok(report)
}

/// Stops counting the flow of a removed original entry.
fn uncount(counts: &MappedArray<ConnCounts>, entry: &CtEntry) {
    if entry.flags & CT_F_REPLY == 0 {
        match entry.accounting {
            ACCT_ACTIVE => counts.adjust(entry.backend_id, -1, 0),
            ACCT_INACTIVE => counts.adjust(entry.backend_id, 0, -1),
            _ => {}
        }
    }
}

/// An address of `family` and a network-order port from the maps, as a socket address.
pub fn socket(addr: proxy_common::Addr, port: u16, family: Family) -> SocketAddr {
    SocketAddr::new(addr.to_ip(family), u16::from_be(port))
}

/// One tracked flow, as `ebpf-proxy conntrack list` shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct FlowView {
    pub protocol: String,
    pub client: SocketAddr,
    pub frontend: SocketAddr,
    pub backend: SocketAddr,
    /// The address:port the backend sees, when it is not the client's own: the flow
    /// is masqueraded, or its client port was remapped because another flow held
    /// the tuple (`reply_port_remapped`).
    pub masquerade: Option<SocketAddr>,
    pub service: String,
    pub state: &'static str,
    pub idle_seconds: u64,
    /// `dsr-ipip`: encapsulated to the backend's node, which answers the client.
    pub encapsulated: bool,
    /// A related flow (a TFTP transfer from the server's new port): its frontend
    /// port is that new port, and it counts as part of its request's connection.
    #[serde(default)]
    pub related: bool,
}

/// One flow as `conntrack list` prints it; `wide` adds how it is forwarded.
pub fn render(f: &FlowView, wide: bool) -> String {
    let masquerade = f
        .masquerade
        .map(|m| format!(" via {m}"))
        .unwrap_or_default();
    let mut line = format!(
        "{} {} -> {} -> {}{masquerade} {} idle {}s {}",
        f.protocol, f.client, f.frontend, f.backend, f.state, f.idle_seconds, f.service
    );
    if wide {
        let forwarding = match (f.encapsulated, f.masquerade.is_some()) {
            (true, _) => "dsr-ipip",
            (false, true) => "dnat+snat",
            (false, false) => "dnat",
        };
        let related = if f.related { ", related" } else { "" };
        let _ = write!(line, " ({forwarding}{related})");
    }
    line
}

/// An entry's state in its protocol's words: an SCTP association goes through TCP's
/// states (`proxy_common::sctp`), named after the chunk that moved it.
fn state_name(protocol: Option<Protocol>, state: u8) -> &'static str {
    let sctp = protocol == Some(Protocol::Sctp);
    match state {
        CT_SYN_SENT if sctp => "INIT_SENT",
        CT_SYN_SENT => "SYN_SENT",
        CT_SYN_RECV if sctp => "INIT_ACKED",
        CT_SYN_RECV => "SYN_RECV",
        CT_ESTABLISHED => "ESTABLISHED",
        CT_CLOSING => "CLOSING",
        _ => "?",
    }
}

/// The original entry of every tracked flow (one per flow), in table order, read as
/// they are asked for: a table of a million flows is shown as it is read, never held.
pub fn flows(tables: &Tables) -> impl Iterator<Item = Result<FlowView>> + '_ {
    let now = coarse_now_ns();
    // Flows of one service share its name: looked up once.
    let mut names: HashMap<u32, String> = HashMap::new();
    tables.conntrack.iter().filter_map(move |item| {
        let (key, entry) = match item.context("reading CONNTRACK") {
            Ok(item) => item,
            Err(e) => return Some(Err(e)),
        };
        if entry.flags & CT_F_REPLY != 0 {
            return None;
        }
        // A family byte no version of ours writes: not a flow of ours to show.
        let family = Family::from_number(key.family)?;
        let service = names
            .entry(entry.service_id)
            .or_insert_with(|| tables.service_name(entry.service_id).unwrap_or_default())
            .clone();
        let protocol = Protocol::from_number(key.proto);
        Some(Ok(FlowView {
            protocol: protocol.map_or_else(|| key.proto.to_string(), |p| p.to_string()),
            client: socket(key.src, key.sport, family),
            frontend: socket(key.dst, key.dport, family),
            backend: socket(entry.nat_dst, entry.nat_dport, family),
            masquerade: (entry.flags & CT_F_REWRITE_SRC != 0)
                .then(|| socket(entry.nat_src, entry.nat_sport, family)),
            service,
            state: state_name(protocol, entry.state),
            idle_seconds: now.saturating_sub(entry.last_seen_ns) / 1_000_000_000,
            encapsulated: entry.flags & CT_F_ENCAP != 0,
            related: entry.flags & CT_F_RELATED != 0,
        }))
    })
}

/// Removes every flow whose original entry matches (both of its entries), and stops
/// counting it. Returns how many flows went.
pub fn flush(
    tables: &mut Tables,
    counts: &MappedArray<ConnCounts>,
    matches: impl Fn(&CtKey, &CtEntry) -> bool,
) -> Result<usize> {
    let doomed: Vec<(CtKey, CtEntry)> = tables
        .conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, entry)| entry.flags & CT_F_REPLY == 0 && matches(key, entry))
        .collect();
    for (key, entry) in &doomed {
        let _ = tables.conntrack.remove(&key.peer(entry));
        if tables.conntrack.remove(key).is_ok() {
            uncount(counts, entry);
        }
    }
    Ok(doomed.len())
}

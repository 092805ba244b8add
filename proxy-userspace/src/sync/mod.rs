//! Applying a desired state to the maps as a difference: a change to one frontend
//! writes only that frontend's entries, and an unchanged input writes nothing.
//!
//! Write order keeps every intermediate state servable by the data path:
//! - a new frontend gets its name, counters and backend slots before its `SERVICES`
//!   entry makes it visible;
//! - a changed one has its slots below the new count rewritten first, then its count,
//!   and only then the slots beyond the count deleted;
//! - a removed one disappears from `SERVICES` before its slots go;
//! - `loadBalancerSourceRanges` prefixes are added before the service value that
//!   flags them and withdrawn after it.
//!
//! Backends keep their slot while they stay (a removed one's slot is filled by a
//! newcomer, else by the last slot), so a change touches as few slots as it can.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use anyhow::{Context as _, Result};
use aya::maps::MapError;
use proxy_common::{
    cluster_cidrs_id, map_name, tunnel_peers_id, Addr, AddrKey, Backend, BackendSlotKey,
    ConfigValue, ConnCounts, CtTimeouts, NodeAddrFlags, ServiceKey, ServiceValue, CLUSTER_CIDR,
    CLUSTER_CIDRS6_ID, CLUSTER_CIDRS_ID, CONFIG_NETNS_COOKIE, CONFIG_SNAT_ADDR, CONFIG_SNAT_ADDR6,
    CONFIG_TUNNEL_SOURCE, CONFIG_XDP_FORWARD, CT_F_RELATED, MAX_BACKENDS_PER_SERVICE, PROTO_TCP,
    TUNNEL_PEERS6_ID, TUNNEL_PEERS_ID, TUNNEL_PEER_TRUSTED, TUNNEL_PEER_UNVERIFIED,
    XDP_FORWARD_PASS, XDP_FORWARD_REDIRECT,
};
use tracing::warn;

mod accounting;
pub mod address_filter;
mod ids;

use accounting::Reconciler;
use address_filter::{AddressBits, AddressFilter};
use ids::{Assigned, BackendIds, IdPool};

use crate::{
    adoption::{Adoption, AdoptionReport},
    conntrack,
    datapath::{
        codec::{
            addr_key, backend_of, encode_name, endpoint_of, frontend_key, service_flags,
            service_key, source_range_id, source_range_key, source_range_of,
        },
        mmap::MappedArray,
        tables::Tables,
    },
    model::{
        DesiredState, Endpoint, Family, Frontend, FrontendChange, FrontendKey, Listen, Problem,
        Protocol, SourceRange,
    },
    node::NodeConfig,
    scheduling::{self, TableSpace},
};

/// Node-wide data path settings that are not part of the node's identity.
#[derive(Clone, Debug, Default)]
pub struct NodeSettings {
    /// The network namespace whose sockets the socket hooks translate.
    pub netns_cookie: u64,
    /// Transmit translated packets from XDP instead of handing them to the stack.
    pub xdp_redirect: bool,
    /// Outer source addresses of IPIP packets (`dsr-ipip`); `None`: the node's
    /// masquerade address.
    pub tunnel_source: Option<SourceRange>,
    /// Outer sources trusted to tunnel into `dsr-ipip` frontends; `None`: any, but
    /// unverified (see the `tunnel` module of the data path).
    pub tunnel_peers: Option<Vec<SourceRange>>,
    /// The addresses on the node's interfaces (those `nodePortAddresses` chooses
    /// from, when it is set).
    pub interface_addresses: BTreeSet<IpAddr>,
    /// The cluster's pod CIDRs (kube-proxy's `clusterCIDR`): sources in them that
    /// arrive on an uplink are in-cluster clients.
    pub cluster_cidrs: Vec<SourceRange>,
}

/// What is in the maps for one frontend.
#[derive(Clone, Debug)]
struct Programmed {
    value: ServiceValue,
    slots: Vec<Backend>,
    /// The scheduler table in the value's extent (empty when there is none).
    table: Vec<u32>,
    /// The `SOURCE_RANGES` prefixes of the service (sorted).
    ranges: Vec<SourceRange>,
}

#[derive(Debug, Default)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
    pub map_writes: usize,
    /// UDP flows removed because their backend left the service.
    pub flushed_udp_flows: usize,
    pub problems: Vec<Problem>,
    /// Frontends not programmed after this sync (refused for lack of room, say);
    /// each is tried again at every sync until it fits.
    pub unprogrammed: usize,
}

pub struct Syncer {
    tables: Tables,
    sched_tables: MappedArray<u32>,
    conn_counts: MappedArray<ConnCounts>,
    table_space: TableSpace,
    programmed: BTreeMap<FrontendKey, Programmed>,
    service_ids: IdPool,
    backend_ids: BackendIds,
    counts_reconciler: Reconciler,
    /// Frontends a sync could not program, as last asked for.
    refused: BTreeMap<FrontendKey, Arc<Frontend>>,
    /// The idle timeouts the data path was loaded with: the collector's too.
    ct_timeouts: CtTimeouts,
    /// kube-proxy's flows, adopted as their frontends are first programmed.
    adoption: Option<Adoption>,
    /// Every address a map names, for the data path's first test (`address_filter`).
    address_filter: AddressFilter,
}

impl Syncer {
    /// Rebuilds the in-memory view from the maps (a restart finds them pinned) and
    /// deletes slots a crashed predecessor may have left beyond a service's count.
    pub fn recover(mut tables: Tables) -> Result<Syncer> {
        let sched_tables = MappedArray::<u32>::open(&tables.pin_dir, map_name::SCHED_TABLES)?;
        let conn_counts = MappedArray::<ConnCounts>::open(&tables.pin_dir, map_name::CONN_COUNTS)?;
        let mut programmed = BTreeMap::new();
        let mut service_ids = BTreeSet::new();
        let mut backend_ids = BTreeSet::new();
        let entries: Vec<(ServiceKey, ServiceValue)> = tables
            .services
            .iter()
            .collect::<Result<_, _>>()
            .context("reading SERVICES")?;
        for (key, value) in entries {
            let Some(frontend) = frontend_key(&key) else {
                continue;
            };
            let mut slots = Vec::new();
            for slot in 0..value.backend_count {
                let slot_key = BackendSlotKey {
                    service_id: value.id,
                    slot,
                };
                let backend = tables
                    .slots
                    .get(&slot_key, 0)
                    .with_context(|| format!("service {frontend} lacks backend slot {slot}"))?;
                backend_ids.insert(backend.id);
                slots.push(backend);
            }
            service_ids.insert(value.id);
            let table = sched_tables
                .read(value.table_offset as usize, value.table_len as usize)
                .with_context(|| format!("reading the scheduler table of {frontend}"))?;
            programmed.insert(
                frontend,
                Programmed {
                    value,
                    slots,
                    table,
                    ranges: Vec::new(),
                },
            );
        }
        let family_of: BTreeMap<u32, Family> = programmed
            .iter()
            .map(|(key, p)| (p.value.id, key.listen.family()))
            .collect();
        let mut ranges_of: BTreeMap<u32, Vec<SourceRange>> = BTreeMap::new();
        let mut stray_ranges = Vec::new();
        for key in tables.source_ranges.keys().filter_map(Result::ok) {
            let id = source_range_id(&key);
            if [
                TUNNEL_PEERS_ID,
                TUNNEL_PEERS6_ID,
                CLUSTER_CIDRS_ID,
                CLUSTER_CIDRS6_ID,
            ]
            .contains(&id)
            {
                continue; // node-wide, rewritten by program_node
            }
            match family_of.get(&id) {
                Some(family) => ranges_of
                    .entry(id)
                    .or_default()
                    .push(source_range_of(&key, *family)),
                None => stray_ranges.push(key),
            }
        }
        for key in &stray_ranges {
            let _ = tables.source_ranges.remove(key);
        }
        for p in programmed.values_mut() {
            p.ranges = ranges_of.remove(&p.value.id).unwrap_or_default();
            p.ranges.sort();
        }
        let counts: BTreeMap<u32, u32> = programmed
            .values()
            .map(|p| (p.value.id, p.value.backend_count))
            .collect();
        let stray: Vec<BackendSlotKey> = tables
            .slots
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                counts
                    .get(&k.service_id)
                    .is_none_or(|count| k.slot >= *count)
            })
            .collect();
        for key in stray {
            let _ = tables.slots.remove(&key);
        }
        let table_space = TableSpace::with_used(
            programmed
                .values()
                .map(|p| (p.value.table_offset, p.value.table_len)),
        );
        // The frontend addresses as the programmed frontends have them (a crashed
        // predecessor may have left the map between two states).
        let wanted = frontend_addresses(programmed.keys());
        let present: Vec<AddrKey> = tables.service_addrs.keys().filter_map(Result::ok).collect();
        for addr in present.iter().filter(|a| !wanted.contains_key(a)) {
            let _ = tables.service_addrs.remove(addr);
        }
        for (addr, count) in &wanted {
            if tables.service_addrs.get(addr, 0).ok() != Some(*count) {
                tables
                    .service_addrs
                    .insert(addr, count, 0)
                    .context("SERVICE_ADDRS")?;
            }
        }
        // Ids that conntrack still names stay retired until their flows are gone; the
        // addresses it names stay in the filter.
        let mut flow_addresses = AddressBits::default();
        let referenced: BTreeSet<u32> = tables
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .map(|(key, entry)| {
                flow_addresses.insert_flow(&key, &entry);
                entry.backend_id
            })
            .collect();
        let address_filter = AddressFilter::open(&tables.pin_dir)?;
        let service_ids = IdPool::with_used(tables.services_capacity()?, &service_ids);
        let backend_ids =
            BackendIds::recover(tables.backends_capacity()?, &backend_ids, &referenced);
        let mut syncer = Syncer {
            tables,
            sched_tables,
            conn_counts,
            table_space,
            programmed,
            service_ids,
            backend_ids,
            counts_reconciler: Reconciler::default(),
            refused: BTreeMap::new(),
            ct_timeouts: CtTimeouts::DEFAULT,
            adoption: None,
            address_filter,
        };
        syncer.rebuild_address_filter(flow_addresses)?;
        Ok(syncer)
    }

    /// Rebuilds the address filter from the addresses of the flows (`flows`) and of
    /// what is programmed: frontends, their backends, the node.
    fn rebuild_address_filter(&mut self, mut flows: AddressBits) -> Result<()> {
        let frontends = frontend_addresses(self.programmed.keys()).into_keys();
        let nodes = self.tables.node_addrs.keys().filter_map(Result::ok);
        for key in frontends.chain(nodes) {
            flows.insert(&key.addr);
        }
        for backend in self.programmed.values().flat_map(|p| &p.slots) {
            flows.insert(&backend.addr);
        }
        self.address_filter
            .rebuild(flows)
            .context("rebuilding the address filter")
    }

    /// The share of the address filter's bits that are set.
    pub fn address_filter_occupancy(&self) -> f64 {
        self.address_filter.occupancy()
    }

    /// Reads kube-proxy's flows (`local`: the addresses on the node's interfaces) and
    /// adopts them now for the frontends programmed already, and for others as they
    /// are first programmed (see `adoption`), until `finish_adoption`.
    pub fn start_adoption(&mut self, local: BTreeSet<IpAddr>) -> Result<()> {
        let adoption = Adoption::read(self.ct_timeouts, local)?;
        // Two entries a flow, in an LRU: past its size, adopting evicts what it
        // adopted a moment before, silently.
        let entries = 2 * adoption.pending();
        if let Ok(capacity) = self.tables.capacity(map_name::CONNTRACK) {
            if entries > capacity as usize / 2 {
                warn!(
                    entries,
                    capacity,
                    "the flows to adopt would fill more than half the conntrack table, \
                     which evicts its oldest entries when full: raise --conntrack-entries"
                );
            }
        }
        // A restart in the middle of a switch finds frontends already programmed
        // (pinned) by its predecessor: their flows are adopted now (those the data
        // path met meanwhile are its own already).
        let mut adoption = adoption;
        for (key, programmed) in &self.programmed {
            adoption.adopt(
                key,
                &programmed.value,
                &programmed.slots,
                &mut self.tables,
                &self.conn_counts,
            );
        }
        self.adoption = Some(adoption);
        Ok(())
    }

    /// Ends the adoption: what it did, if one was going on.
    pub fn finish_adoption(&mut self) -> Option<AdoptionReport> {
        self.adoption.take().map(Adoption::finish)
    }

    /// Collects with these idle timeouts (those the programs were loaded with).
    pub fn with_ct_timeouts(mut self, timeouts: CtTimeouts) -> Syncer {
        self.ct_timeouts = timeouts;
        self
    }

    /// Programs node-wide settings: node addresses (NodePorts), the masquerade
    /// source, the network namespace the socket hooks serve, the XDP forwarding mode.
    pub fn program_node(&mut self, node: &NodeConfig, settings: &NodeSettings) -> Result<()> {
        self.program_node_addresses(
            &node
                .node_ports
                .entries(&node.addresses, &settings.interface_addresses),
        )?;
        for (slot, family) in [
            (CONFIG_SNAT_ADDR, Family::V4),
            (CONFIG_SNAT_ADDR6, Family::V6),
        ] {
            let snat = ConfigValue {
                addr: node
                    .snat_address(family)
                    .map_or(Addr::ZERO, |address| Addr::from_ip(&address)),
            };
            self.tables.config.set(slot, snat, 0)?;
        }
        self.tables.config.set(
            CONFIG_NETNS_COOKIE,
            ConfigValue::from_u64(settings.netns_cookie),
            0,
        )?;
        let forward = if settings.xdp_redirect {
            XDP_FORWARD_REDIRECT
        } else {
            XDP_FORWARD_PASS
        };
        self.tables
            .config
            .set(CONFIG_XDP_FORWARD, ConfigValue::from_u64(forward), 0)?;
        let tunnel_source = match settings.tunnel_source {
            Some(range) => ConfigValue {
                addr: Addr {
                    words: [Addr::from_ip(&range.addr).v4_be(), range.size(), 0, 0],
                },
            },
            None => ConfigValue::default(),
        };
        self.tables
            .config
            .set(CONFIG_TUNNEL_SOURCE, tunnel_source, 0)?;
        self.program_tunnel_peers(settings.tunnel_peers.as_deref())?;
        for family in Family::ALL {
            let cluster_cidrs: BTreeMap<SourceRange, u8> = settings
                .cluster_cidrs
                .iter()
                .filter(|r| r.family() == family)
                .map(|r| (*r, CLUSTER_CIDR))
                .collect();
            self.program_node_ranges(cluster_cidrs_id(family), family, &cluster_cidrs)
                .context("--cluster-cidr")?;
        }
        Ok(())
    }

    /// Makes `NODE_ADDRS` hold exactly `wanted`: new and changed entries first, then
    /// the stale ones go (an address that stays never misses a packet).
    pub fn program_node_addresses(
        &mut self,
        wanted: &BTreeMap<IpAddr, NodeAddrFlags>,
    ) -> Result<()> {
        let wanted: BTreeMap<AddrKey, NodeAddrFlags> =
            wanted.iter().map(|(a, f)| (addr_key(a), *f)).collect();
        self.address_filter
            .insert(wanted.keys().map(|key| key.addr))?;
        for (addr, flags) in &wanted {
            if self.tables.node_addrs.get(addr, 0).ok() != Some(*flags) {
                self.tables.node_addrs.insert(addr, flags, 0)?;
            }
        }
        let stale: Vec<AddrKey> = self
            .tables
            .node_addrs
            .keys()
            .filter_map(Result::ok)
            .filter(|a| !wanted.contains_key(a))
            .collect();
        for addr in stale {
            self.tables.node_addrs.remove(&addr)?;
        }
        Ok(())
    }

    /// The outer sources that may tunnel in, under the pseudo service ids
    /// `tunnel_peers_id` of `SOURCE_RANGES` (one per family): the listed prefixes of
    /// the family as trusted, or, with no list, `0.0.0.0/0` (`::/0`) as unverified. A
    /// list without prefixes of a family trusts no tunnel of that family.
    fn program_tunnel_peers(&mut self, peers: Option<&[SourceRange]>) -> Result<()> {
        for family in Family::ALL {
            let wanted: BTreeMap<SourceRange, u8> = match peers {
                Some(list) => list
                    .iter()
                    .filter(|r| r.family() == family)
                    .map(|r| (*r, TUNNEL_PEER_TRUSTED))
                    .collect(),
                None => BTreeMap::from([(
                    SourceRange {
                        addr: family.unspecified(),
                        len: 0,
                    },
                    TUNNEL_PEER_UNVERIFIED,
                )]),
            };
            self.program_node_ranges(tunnel_peers_id(family), family, &wanted)
                .context("--ipip-trusted-sources")?;
        }
        Ok(())
    }

    /// Makes the prefixes under a pseudo service id of `SOURCE_RANGES` (of `family`)
    /// exactly `wanted`. New entries go in before stale ones go out.
    fn program_node_ranges(
        &mut self,
        id: u32,
        family: Family,
        wanted: &BTreeMap<SourceRange, u8>,
    ) -> Result<()> {
        let present: Vec<SourceRange> = self
            .tables
            .source_ranges
            .keys()
            .filter_map(Result::ok)
            .filter(|key| source_range_id(key) == id)
            .map(|key| source_range_of(&key, family))
            .collect();
        for (range, value) in wanted {
            self.tables
                .source_ranges
                .insert(&source_range_key(id, range), value, 0)
                .map_err(full_map_hint)?;
        }
        for range in present.iter().filter(|r| !wanted.contains_key(r)) {
            self.tables
                .source_ranges
                .remove(&source_range_key(id, range))?;
        }
        Ok(())
    }

    /// One conntrack garbage collection pass over the maps this syncer holds (their
    /// flow counts are the ones the least-connection schedulers read): expires idle
    /// flows, reconciles the counts with what is left, and frees the retired backend
    /// ids no flow names any more. Returns the pass and how many counters it corrected.
    pub fn collect_conntrack(&mut self) -> Result<(conntrack::GcReport, usize)> {
        let before = self.conn_counts.read(0, self.conn_counts.entries())?;
        let mut report =
            conntrack::collect(&mut self.tables, &self.conn_counts, &self.ct_timeouts)?;
        self.rebuild_address_filter(std::mem::take(&mut report.census.addresses))?;
        let corrected =
            self.counts_reconciler
                .reconcile(&self.conn_counts, &before, &report.census.counted)?;
        self.backend_ids
            .release_unreferenced(&report.census.referenced);
        Ok((report, corrected))
    }

    /// Makes the maps hold exactly `desired` (compares every frontend: O(services)).
    pub fn apply(&mut self, desired: &DesiredState) -> SyncReport {
        let mut changes: Vec<FrontendChange> = self
            .programmed
            .keys()
            .filter(|k| !desired.frontends.contains_key(k))
            .map(|k| (*k, None))
            .collect();
        changes.extend(desired.frontends.iter().map(|(k, f)| (*k, Some(f.clone()))));
        self.apply_changes(&changes)
    }

    /// Programs the given frontends and removes those given as `None`; frontends that
    /// turn out unchanged write nothing.
    pub fn apply_changes(&mut self, changes: &[FrontendChange]) -> SyncReport {
        let mut report = SyncReport::default();
        let departed = self.departing_flushed_backends(changes);
        for (key, change) in changes {
            self.refused.remove(key);
            self.apply_one(key, change.as_ref(), &mut report);
        }
        // What did not fit before may fit now (these changes may have made room),
        // and is tried again until it does: a source says a frontend only once.
        let changed: BTreeSet<&FrontendKey> = changes.iter().map(|(key, _)| key).collect();
        let retry: Vec<(FrontendKey, Arc<Frontend>)> = self
            .refused
            .iter()
            .filter(|(key, _)| !changed.contains(key))
            .map(|(key, frontend)| (*key, frontend.clone()))
            .collect();
        for (key, frontend) in retry {
            self.refused.remove(&key);
            self.apply_one(&key, Some(&frontend), &mut report);
        }
        report.unprogrammed = self.refused.len();
        if !departed.is_empty() {
            // A related flow (a TFTP transfer) goes with its backend, whatever port the
            // backend answered from.
            let departed_addrs: BTreeSet<(u32, Addr)> =
                departed.iter().map(|(id, addr, _)| (*id, *addr)).collect();
            match conntrack::flush(&mut self.tables, &self.conn_counts, |key, entry| {
                key.proto != PROTO_TCP
                    && if entry.flags & CT_F_RELATED != 0 {
                        departed_addrs.contains(&(entry.service_id, entry.nat_dst))
                    } else {
                        departed.contains(&(entry.service_id, entry.nat_dst, entry.nat_dport))
                    }
            }) {
                Ok(flushed) => report.flushed_udp_flows = flushed,
                Err(e) => report.problems.push(Problem::error(
                    "conntrack",
                    format!("flushing UDP flows of removed backends: {e:#}"),
                )),
            }
        }
        report
    }

    /// Applies one change; a frontend that cannot be programmed is reported and kept
    /// in `refused`, to be tried again at the next sync.
    fn apply_one(
        &mut self,
        key: &FrontendKey,
        change: Option<&Arc<Frontend>>,
        report: &mut SyncReport,
    ) {
        let result = match change {
            None if self.programmed.contains_key(key) => {
                self.remove(key, report).map(|()| report.removed += 1)
            }
            None => Ok(()),
            Some(frontend) if self.programmed.contains_key(key) => {
                self.update(key, frontend, report).map(|changed| {
                    if changed {
                        report.updated += 1;
                    }
                })
            }
            Some(frontend) => self.add(key, frontend, report).map(|()| report.added += 1),
        };
        if let Err(e) = result {
            let what = change.map_or(String::new(), |f| format!(" ({})", f.service));
            report.problems.push(Problem::error(
                format!("{key}{what}"),
                format!("not programmed: {e:#}"),
            ));
            if let Some(frontend) = change {
                self.refused.insert(*key, frontend.clone());
            }
        }
    }

    /// (service id, address, port) of UDP and SCTP backends these changes take away.
    /// Their flows are flushed, as kube-proxy deletes conntrack entries of removed UDP
    /// endpoints: a UDP client (DNS above all) keeps its source port, and its stale
    /// entry would otherwise keep sending it to a backend that is gone; an SCTP peer
    /// (Diameter between fixed ports) sends its new INIT on the same tuple, which the
    /// stale entry would hold on the gone backend, refreshed by every retry. TCP
    /// flows to removed backends drain instead (their peers end them, and a new
    /// connection from the same port is rescheduled once the entry closes).
    fn departing_flushed_backends(&self, changes: &[FrontendChange]) -> BTreeSet<(u32, Addr, u16)> {
        let mut departed = BTreeSet::new();
        for (key, change) in changes {
            let Some(current) = self.programmed.get(key) else {
                continue;
            };
            if key.protocol == Protocol::Tcp {
                continue;
            }
            let staying: BTreeSet<(IpAddr, u16)> = change
                .iter()
                .flat_map(|f| f.endpoints.iter())
                .filter(|e| e.weight > 0)
                .map(|e| (e.addr, e.port))
                .collect();
            for backend in &current.slots {
                let endpoint = endpoint_of(backend, key.listen.family());
                if !staying.contains(&(endpoint.addr, endpoint.port)) {
                    departed.insert((current.value.id, backend.addr, backend.port));
                }
            }
        }
        departed
    }

    fn add(
        &mut self,
        key: &FrontendKey,
        frontend: &Frontend,
        report: &mut SyncReport,
    ) -> Result<()> {
        let id = self
            .service_ids
            .allocate()
            .context("the service table is full (raise --max-services)")?;
        let programmed = Programmed {
            value: ServiceValue {
                id,
                backend_count: 0,
                scheduler: frontend.scheduler.number(),
                flags: service_flags(key, frontend),
                helper: frontend.helper.number(),
                _pad: 0,
                table_offset: 0,
                table_len: 0,
                affinity_timeout_s: frontend.affinity_timeout_s,
            },
            slots: Vec::new(),
            table: Vec::new(),
            ranges: Vec::new(),
        };
        let result = (|| -> Result<()> {
            self.tables
                .service_names
                .insert(id, encode_name(&frontend.service), 0)?;
            Tables::reset_stats(&mut self.tables.service_stats, id)?;
            self.tables.rr_cursors.set(id, 0, 0)?;
            report.map_writes += 3;
            Ok(())
        })();
        if let Err(e) = result {
            self.service_ids.release(id);
            return Err(e);
        }
        self.programmed.insert(*key, programmed);
        // Counted first, so that `remove` below undoes it when the write fails.
        let written = self
            .count_address(key, 1)
            .and_then(|()| self.write(key, frontend, true, report));
        if let Err(e) = written {
            // Leave nothing half-programmed behind: the next sync tries again.
            let _ = self.remove(key, report);
            return Err(e);
        }
        Ok(())
    }

    /// One more (or one fewer) frontend on the key's address, in `SERVICE_ADDRS`.
    fn count_address(&mut self, key: &FrontendKey, delta: i64) -> Result<()> {
        let Listen::Address(ip) = key.listen else {
            return Ok(());
        };
        let addr = addr_key(&ip);
        if delta > 0 {
            self.address_filter.insert([addr.addr])?;
        }
        let count = self.tables.service_addrs.get(&addr, 0).unwrap_or(0);
        match u32::try_from(i64::from(count) + delta) {
            Ok(0) | Err(_) => {
                let _ = self.tables.service_addrs.remove(&addr);
            }
            Ok(count) => self
                .tables
                .service_addrs
                .insert(addr, count, 0)
                .map_err(full_map_hint)
                .context("SERVICE_ADDRS")?,
        }
        Ok(())
    }

    /// Brings one programmed frontend to `frontend`; returns whether anything changed.
    fn update(
        &mut self,
        key: &FrontendKey,
        frontend: &Frontend,
        report: &mut SyncReport,
    ) -> Result<bool> {
        self.write(key, frontend, false, report)
    }

    /// Writes what differs; `is_new` frontends also get their (not yet visible)
    /// `SERVICES` entry, even with no backends.
    fn write(
        &mut self,
        key: &FrontendKey,
        frontend: &Frontend,
        is_new: bool,
        report: &mut SyncReport,
    ) -> Result<bool> {
        let current = self.programmed[key].clone();
        let id = current.value.id;
        if frontend.endpoints.len() > MAX_BACKENDS_PER_SERVICE as usize {
            anyhow::bail!(
                "{} endpoints exceed the limit of {MAX_BACKENDS_PER_SERVICE} per service",
                frontend.endpoints.len()
            );
        }
        // In the filter before any map names them (adopted flows among them).
        self.address_filter
            .insert(frontend.endpoints.iter().map(|e| Addr::from_ip(&e.addr)))?;
        // Weight 0 quiesces: no new flows; established ones go on through conntrack.
        let schedulable: Vec<Endpoint> = frontend
            .endpoints
            .iter()
            .filter(|e| e.weight > 0)
            .copied()
            .collect();
        let (mut slots, fresh) = self.assign_slots(key, &current.slots, &schedulable)?;
        let table = scheduling::table(frontend.scheduler, &slots, (&current.slots, &current.table))
            .unwrap_or_default();
        let (table_offset, table_len) = if table == current.table {
            (current.value.table_offset, current.value.table_len)
        } else if table.is_empty() {
            (0, 0)
        } else {
            // A fresh extent: packets keep reading the old table until the service
            // value below points them at the new one.
            let offset = self.table_space.allocate(table.len() as u32)?;
            self.sched_tables.write(offset as usize, &table)?;
            report.map_writes += 1;
            (offset, table.len() as u32)
        };
        let value = ServiceValue {
            backend_count: slots.len() as u32,
            flags: service_flags(key, frontend),
            helper: frontend.helper.number(),
            scheduler: frontend.scheduler.number(),
            table_offset,
            table_len,
            affinity_timeout_s: frontend.affinity_timeout_s,
            ..current.value
        };
        let mut ranges = frontend.source_ranges.clone().unwrap_or_default();
        ranges.sort();
        let name = encode_name(&frontend.service);
        if !is_new && slots == current.slots && value == current.value && ranges == current.ranges {
            return Ok(false);
        }
        for range in ranges.iter().filter(|r| !current.ranges.contains(r)) {
            self.tables
                .source_ranges
                .insert(&source_range_key(id, range), 1, 0)
                .map_err(full_map_hint)
                .context("loadBalancerSourceRanges")?;
            report.map_writes += 1;
        }
        // A new frontend's name was written by `add` a moment ago.
        if !is_new && self.tables.service_names.get(&id, 0).ok() != Some(name) {
            self.tables.service_names.insert(id, name, 0)?;
            report.map_writes += 1;
        }
        for (slot, backend) in slots.iter().enumerate() {
            if current.slots.get(slot) == Some(backend) {
                continue;
            }
            if fresh.contains(&backend.id) {
                Tables::reset_stats(&mut self.tables.backend_stats, backend.id)?;
                self.conn_counts.reset(backend.id);
            }
            let slot_key = BackendSlotKey {
                service_id: id,
                slot: slot as u32,
            };
            self.tables
                .slots
                .insert(slot_key, backend, 0)
                .map_err(full_map_hint)?;
            report.map_writes += 1;
        }
        if is_new {
            if let Some(adoption) = &mut self.adoption {
                adoption.adopt(key, &value, &slots, &mut self.tables, &self.conn_counts);
            }
        }
        if is_new || value != current.value {
            self.tables
                .services
                .insert(service_key(key), value, 0)
                .map_err(full_map_hint)?;
            report.map_writes += 1;
        }
        for slot in slots.len()..current.slots.len() {
            let slot_key = BackendSlotKey {
                service_id: id,
                slot: slot as u32,
            };
            self.tables.slots.remove(&slot_key)?;
            report.map_writes += 1;
        }
        for range in current.ranges.iter().filter(|r| !ranges.contains(r)) {
            self.tables
                .source_ranges
                .remove(&source_range_key(id, range))?;
            report.map_writes += 1;
        }
        if (table_offset, table_len) != (current.value.table_offset, current.value.table_len) {
            self.table_space
                .release(current.value.table_offset, current.value.table_len);
        }
        // Kept for as long as the frontend lives: no spare capacity.
        slots.shrink_to_fit();
        self.programmed.insert(
            *key,
            Programmed {
                value,
                slots,
                table,
                ranges,
            },
        );
        Ok(true)
    }

    fn remove(&mut self, key: &FrontendKey, report: &mut SyncReport) -> Result<()> {
        let Some(current) = self.programmed.remove(key) else {
            return Ok(());
        };
        let _ = self.count_address(key, -1);
        let id = current.value.id;
        // Absent entries are fine here: a failed add removes what it wrote so far.
        let _ = self.tables.services.remove(&service_key(key));
        for slot in 0..current.slots.len() as u32 {
            let _ = self.tables.slots.remove(&BackendSlotKey {
                service_id: id,
                slot,
            });
        }
        let _ = self.tables.service_names.remove(&id);
        for range in &current.ranges {
            let _ = self
                .tables
                .source_ranges
                .remove(&source_range_key(id, range));
        }
        report.map_writes += current.slots.len() + current.ranges.len() + 2;
        for backend in &current.slots {
            self.backend_ids
                .retire(backend.id, (*key, backend.addr, backend.port));
        }
        self.service_ids.release(id);
        self.table_space
            .release(current.value.table_offset, current.value.table_len);
        Ok(())
    }

    /// The new slot list: staying backends keep their slot (and id), newcomers fill
    /// the holes of leavers, then the tail; remaining holes take the last slot.
    /// Also returns the ids given out fresh (their counters are to be zeroed).
    fn assign_slots(
        &mut self,
        key: &FrontendKey,
        old: &[Backend],
        wanted: &[Endpoint],
    ) -> Result<(Vec<Backend>, BTreeSet<u32>)> {
        let wanted_by_addr: BTreeMap<(Addr, u16), &Endpoint> = wanted
            .iter()
            .map(|e| ((Addr::from_ip(&e.addr), e.port.to_be()), e))
            .collect();
        let mut slots: Vec<Option<Backend>> = old
            .iter()
            .map(|b| {
                wanted_by_addr
                    .get(&(b.addr, b.port))
                    .map(|e| backend_of(e, b.id))
            })
            .collect();
        let kept: BTreeSet<(Addr, u16)> = old.iter().map(|b| (b.addr, b.port)).collect();
        let mut newcomers = Vec::new();
        let mut fresh = BTreeSet::new();
        for ((addr, port), endpoint) in &wanted_by_addr {
            if !kept.contains(&(*addr, *port)) {
                let id = match self
                    .backend_ids
                    .assign(&(*key, *addr, *port))
                    .context("the backend table is full (raise --max-backends)")?
                {
                    Assigned::Fresh(id) => {
                        fresh.insert(id);
                        id
                    }
                    Assigned::Returning(id) => id,
                };
                newcomers.push(backend_of(endpoint, id));
            }
        }
        let mut newcomers = newcomers.into_iter();
        for slot in slots.iter_mut().filter(|s| s.is_none()) {
            *slot = newcomers.next();
        }
        slots.extend(newcomers.map(Some));
        loop {
            while slots.last().is_some_and(Option::is_none) {
                slots.pop();
            }
            let Some(hole) = slots.iter().position(Option::is_none) else {
                break;
            };
            slots.swap_remove(hole);
        }
        let result: Vec<Backend> = slots.into_iter().flatten().collect();
        for backend in old {
            if !result.iter().any(|b| b.id == backend.id) {
                self.backend_ids
                    .retire(backend.id, (*key, backend.addr, backend.port));
            }
        }
        Ok((result, fresh))
    }
}

/// How many programmed frontends listen on each address.
fn frontend_addresses<'a>(keys: impl Iterator<Item = &'a FrontendKey>) -> BTreeMap<AddrKey, u32> {
    let mut counts = BTreeMap::new();
    for key in keys {
        if let Listen::Address(ip) = key.listen {
            *counts.entry(addr_key(&ip)).or_default() += 1;
        }
    }
    counts
}

fn full_map_hint(e: MapError) -> anyhow::Error {
    let full =
        matches!(&e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG));
    if full {
        anyhow::Error::new(e).context("map full")
    } else {
        e.into()
    }
}

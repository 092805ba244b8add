//! `ebpf-proxy trace`: explains what the data path does with a packet, by reading
//! the pinned maps and following the same rules, without sending anything or
//! changing any state (the round-robin cursor included).

use std::net::{Ipv4Addr, SocketAddrV4};

use anyhow::Result;
use proxy_common::{
    addr_hash, ct_timeout_ns, flow_hash, Addr, AffinityKey, BackendSlotKey, CtKey, ServiceKey,
    ServiceValue, BACKEND_F_REMOTE, CONFIG_SNAT_ADDR, CT_F_REPLY, MAX_LEAST_CONN_SCAN,
    SCOPE_ADDRESS, SCOPE_NODE_PORT, SVC_F_SOURCE_RANGES,
};
use serde::Serialize;

use crate::{
    conntrack::{coarse_now_ns, socket},
    datapath::{
        codec::{decode_name, endpoint_of, source_range_probe},
        tables::Tables,
    },
    model::{Protocol, Scheduler},
};

/// Where the packet enters: an uplink (XDP) or a pod interface (tc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Origin {
    External,
    Pod,
}

#[derive(Debug, Default, Serialize)]
pub struct Explanation {
    /// What happens, step by step, in words.
    pub steps: Vec<String>,
    pub service: Option<String>,
    pub backend: Option<SocketAddrV4>,
    /// The packet's (source, destination) after translation.
    pub translated: Option<(SocketAddrV4, SocketAddrV4)>,
}

fn addr(socket: &SocketAddrV4) -> Addr {
    Addr::from_v4_octets(socket.ip().octets())
}

/// The slot `sessionAffinity` binds the client to, as the data path would find it
/// (fresh, and the slot still holding the remembered backend), with the reason.
fn bound_slot(tables: &Tables, service: &ServiceValue, key: &CtKey) -> Option<(u32, String)> {
    if service.affinity_timeout_s == 0 {
        return None;
    }
    let memo = tables
        .affinity
        .get(
            &AffinityKey {
                client: key.src,
                service_id: service.id,
            },
            0,
        )
        .ok()?;
    let idle_s = coarse_now_ns().saturating_sub(memo.last_used_ns) / 1_000_000_000;
    let current = tables
        .slots
        .get(
            &BackendSlotKey {
                service_id: service.id,
                slot: memo.slot,
            },
            0,
        )
        .ok()?;
    (idle_s <= u64::from(service.affinity_timeout_s) && current.id == memo.backend_id).then(|| {
        (
            memo.slot,
            format!(
                "sessionAffinity: the client's last new flow was {idle_s} s ago (timeout {} s): same backend",
                service.affinity_timeout_s
            ),
        )
    })
}

pub fn explain(
    tables: &Tables,
    protocol: Protocol,
    src: SocketAddrV4,
    dst: SocketAddrV4,
    origin: Origin,
) -> Result<Explanation> {
    let mut out = Explanation::default();
    let key = CtKey {
        src: addr(&src),
        dst: addr(&dst),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto: protocol.number(),
        _pad: [0; 3],
    };
    if let Ok(entry) = tables.conntrack.get(&key, 0) {
        let idle = coarse_now_ns().saturating_sub(entry.last_seen_ns);
        if idle <= ct_timeout_ns(key.proto, entry.state) {
            let direction = if entry.flags & CT_F_REPLY != 0 {
                "reply"
            } else {
                "original"
            };
            let after = key.rewritten(&entry);
            out.steps.push(format!(
                "conntrack: a tracked flow ({direction} direction, idle {} s): rewritten as the entry says",
                idle / 1_000_000_000
            ));
            out.service = tables
                .service_names
                .get(&entry.service_id, 0)
                .ok()
                .map(|n| decode_name(&n));
            out.backend =
                (entry.flags & CT_F_REPLY == 0).then(|| socket(entry.nat_dst, entry.nat_dport));
            out.translated = Some((
                socket(after.src, after.sport),
                socket(after.dst, after.dport),
            ));
            return Ok(out);
        }
        out.steps
            .push("conntrack: an entry exists but has expired: the packet opens a new flow".into());
    } else {
        out.steps.push("conntrack: no entry for this tuple".into());
    }
    let Some((service, how)) = lookup_service(tables, &key) else {
        out.steps
            .push("no service has this destination: the packet passes untouched".into());
        return Ok(out);
    };
    let name = tables
        .service_names
        .get(&service.id, 0)
        .map(|n| decode_name(&n))
        .unwrap_or_default();
    out.steps.push(format!("service {name}: matched {how}"));
    out.service = Some(name);
    if service.flags & SVC_F_SOURCE_RANGES != 0 {
        if tables
            .source_ranges
            .get(&source_range_probe(service.id, key.src), 0)
            .is_err()
        {
            out.steps.push(format!(
                "loadBalancerSourceRanges: {} is not admitted: a new flow is dropped (event source_denied)",
                src.ip()
            ));
            return Ok(out);
        }
        out.steps
            .push("loadBalancerSourceRanges: the source is admitted".into());
    }
    let Some(scheduler) = Scheduler::from_number(service.scheduler) else {
        out.steps.push(format!(
            "scheduler number {} is unknown to this data path: a new flow is dropped (event no_backend)",
            service.scheduler
        ));
        return Ok(out);
    };
    let bound = bound_slot(tables, &service, &key);
    if let Some((_, why)) = &bound {
        out.steps.push(why.clone());
    }
    let predicted = match bound {
        Some((slot, _)) => Some((slot, "the client's affinity".to_owned())),
        None => predict_slot(tables, &service, &key, scheduler)?,
    };
    let Some((slot, why)) = predicted else {
        out.steps
            .push("no backend: a new flow is dropped (event no_backend)".into());
        return Ok(out);
    };
    let backend = tables.slots.get(
        &BackendSlotKey {
            service_id: service.id,
            slot,
        },
        0,
    )?;
    let endpoint = endpoint_of(&backend);
    let backend_socket = SocketAddrV4::new(endpoint.addr, endpoint.port);
    out.steps.push(format!(
        "scheduler {scheduler}: {why} -> backend {backend_socket} (slot {slot})"
    ));
    out.backend = Some(backend_socket);
    let masquerade = match origin {
        Origin::External if backend.flags & BACKEND_F_REMOTE != 0 => {
            Some("external traffic to a backend on another node: masqueraded")
        }
        Origin::Pod if backend.addr == key.src => {
            Some("a pod reaching itself (hairpin): masqueraded")
        }
        _ => None,
    };
    let source = match masquerade {
        Some(reason) => {
            let snat = tables.config.get(&CONFIG_SNAT_ADDR, 0)?.addr;
            out.steps.push(format!(
                "{reason} to {} (the client's port if free)",
                Ipv4Addr::from(snat.v4_octets())
            ));
            SocketAddrV4::new(Ipv4Addr::from(snat.v4_octets()), src.port())
        }
        None => {
            out.steps
                .push("no masquerade: the backend sees the client's address".into());
            src
        }
    };
    out.translated = Some((source, backend_socket));
    Ok(out)
}

fn lookup_service(tables: &Tables, key: &CtKey) -> Option<(ServiceValue, &'static str)> {
    let exact = ServiceKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        scope: SCOPE_ADDRESS,
    };
    if let Ok(value) = tables.services.get(&exact, 0) {
        return Some((value, "by address and port"));
    }
    tables.node_addrs.get(&key.dst, 0).ok()?;
    let node_port = ServiceKey {
        addr: Addr::ZERO,
        scope: SCOPE_NODE_PORT,
        ..exact
    };
    tables
        .services
        .get(&node_port, 0)
        .ok()
        .map(|v| (v, "as a NodePort on a node address"))
}

/// The slot a new flow would get, and why; None without backends.
fn predict_slot(
    tables: &Tables,
    service: &ServiceValue,
    key: &CtKey,
    scheduler: Scheduler,
) -> Result<Option<(u32, String)>> {
    let count = service.backend_count;
    if count == 0 {
        return Ok(None);
    }
    let cursor = tables.rr_cursors.get(&service.id, 0)?;
    let table_entry = |n: u32| -> Result<u32> {
        Ok(if service.table_len == 0 {
            n % count
        } else {
            tables
                .sched_tables
                .get(&(service.table_offset + n % service.table_len), 0)?
        })
    };
    let cycle = if service.table_len == 0 {
        count
    } else {
        service.table_len
    };
    let turn = (cursor % u64::from(cycle)) as u32;
    Ok(Some(match scheduler {
        Scheduler::Rr | Scheduler::Wrr => (
            table_entry(turn)?,
            format!("the next turn is {turn} of {cycle}"),
        ),
        Scheduler::Sh => (
            table_entry(addr_hash(&key.src))?,
            format!("source address bucket {}", addr_hash(&key.src)),
        ),
        Scheduler::Dh => (
            table_entry(addr_hash(&key.dst))?,
            format!("destination address bucket {}", addr_hash(&key.dst)),
        ),
        Scheduler::Maglev => {
            let hash = flow_hash(key);
            (
                table_entry(hash)?,
                format!("5-tuple hash {hash:#010x}, ring entry {}", hash % cycle),
            )
        }
        Scheduler::Random => (
            table_entry(0)?,
            "random: any backend; one possibility shown".into(),
        ),
        Scheduler::Lc | Scheduler::Wlc | Scheduler::Sed | Scheduler::Nq => {
            least_loaded(tables, service, scheduler, turn % count)?
        }
    }))
}

/// The least-connection family's choice, as the data path's scan makes it.
fn least_loaded(
    tables: &Tables,
    service: &ServiceValue,
    scheduler: Scheduler,
    start: u32,
) -> Result<(u32, String)> {
    let count = service.backend_count;
    let mut best: Option<(u32, u64, u64)> = None;
    for i in 0..count.min(MAX_LEAST_CONN_SCAN) {
        let slot = (start + i) % count;
        let backend = tables.slots.get(
            &BackendSlotKey {
                service_id: service.id,
                slot,
            },
            0,
        )?;
        let active = tables
            .conn_counts
            .get(&backend.id, 0)
            .map_or(0, |c| c.active);
        if scheduler == Scheduler::Nq && active == 0 {
            return Ok((slot, "an idle backend (nq)".into()));
        }
        let weight = if scheduler == Scheduler::Lc {
            1
        } else {
            u64::from(backend.weight)
        };
        let load = active + u64::from(matches!(scheduler, Scheduler::Sed | Scheduler::Nq));
        if best.is_none_or(|(_, l, w)| load * w < l * weight) {
            best = Some((slot, load, weight));
        }
    }
    let (slot, load, weight) = best.unwrap_or((start, 0, 1));
    Ok((
        slot,
        format!("fewest active flows (load {load}, weight {weight})"),
    ))
}

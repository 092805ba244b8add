//! Data path: nanoseconds per packet under BPF_PROG_TEST_RUN, measured the sound way.
//!
//! Every iteration enters through the bench wrapper (proxy-ebpf's `bench-wrapper`),
//! which restores the original frame and tail-calls the program under test; the same
//! wrapper around an XDP_PASS program is the floor. Each case is checked afterwards
//! with the data path's own counters: every iteration must have taken the intended
//! path (translated or not, new flow or not). Caches and maps stay hot, so these are
//! best cases for one CPU.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use anyhow::{ensure, Context as _, Result};
use aya::{
    maps::{Array, ProgramArray},
    programs::Xdp,
    Ebpf,
};
use ebpf_proxy::{
    datapath::{
        attach,
        loader::{program, Datapath, MapSizes},
        tables::Tables,
    },
    listing,
    model::{DesiredState, Endpoint, Family, Frontend, FrontendKey, Listen, Protocol, Scheduler},
    node::NodeConfig,
    sync::{NodeSettings, Syncer},
};
use etherparse::PacketBuilder;

use crate::kernel;
use proxy_common::{
    bench_frame_len, map_name, BenchTemplate, BENCH_FRAME_IP6IP6, BENCH_FRAME_V4, BENCH_FRAME_V6,
};
use serde::Serialize;

static WRAPPER_OBJECT: &[u8] = ebpf_proxy::datapath::BENCH_WRAPPER_OBJECT;

const BACKENDS: u8 = 10;
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const NODE_IP: [u8; 4] = [198, 18, 0, 1];
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 2);
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);

/// A frame as the wrapper's template holds it: IPv4's 64 bytes, IPv6's 96 or
/// ip6ip6's 136, the rest zero.
type Frame = [u8; BENCH_FRAME_IP6IP6];

/// A built frame in a template's bytes, checked to have its kind's length.
fn to_frame(bytes: Vec<u8>) -> Frame {
    let mut frame = [0u8; BENCH_FRAME_IP6IP6];
    frame[..bytes.len()].copy_from_slice(&bytes);
    assert_eq!(
        bytes.len(),
        bench_frame_len(&frame),
        "a frame of its family's length"
    );
    frame
}

#[derive(Serialize)]
pub struct CaseResult {
    pub services: usize,
    pub case: String,
    pub ns_median: f64,
    pub ns_min: f64,
    pub ns_max: f64,
    pub rounds: usize,
    pub repeat: u32,
}

#[derive(Serialize)]
pub struct ProgramSize {
    pub program: String,
    pub verified_instructions: Option<u32>,
    pub translated_bytes: Option<u32>,
    pub jited_bytes: u32,
}

/// Kernel memory of the data path's maps at one scale (each map sized for it).
#[derive(Serialize)]
pub struct MapMemory {
    pub services: usize,
    /// Sum of the maps' `memlock` (/proc/self/fdinfo), in bytes.
    pub total_bytes: u64,
    /// (map, bytes), largest first.
    pub maps: Vec<(String, u64)>,
}

/// What the kernel charges for every map pinned in `pin_dir`.
fn map_memory(pin_dir: &std::path::Path, services: usize) -> Result<MapMemory> {
    let mut maps = Vec::new();
    for entry in std::fs::read_dir(pin_dir)? {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        let bytes = kernel::map_memory(&aya::maps::MapData::from_pin(&path)?)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        maps.push((name, bytes));
    }
    maps.sort_by_key(|m| std::cmp::Reverse(m.1));
    Ok(MapMemory {
        services,
        total_bytes: maps.iter().map(|m| m.1).sum(),
        maps,
    })
}

/// The template's length of a frame from `src`'s family.
fn frame_len(src: IpAddr) -> usize {
    match src {
        IpAddr::V4(_) => BENCH_FRAME_V4,
        IpAddr::V6(_) => BENCH_FRAME_V6,
    }
}

/// A TCP (`tcp`: SYN and ACK flags) or UDP frame of either family, its payload
/// filling it to its family's length.
fn frame(src: (IpAddr, u16), dst: (IpAddr, u16), tcp: Option<(bool, bool)>) -> Frame {
    let len = frame_len(src.0);
    let ip = testbed::frames::ip_headers(src.0, dst.0);
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]).ip(ip);
    let mut out = Vec::with_capacity(len);
    match tcp {
        Some((syn, ack)) => {
            let mut b = builder.tcp(src.1, dst.1, 1, 65535);
            if syn {
                b = b.syn();
            }
            if ack {
                b = b.ack(1);
            }
            let payload = vec![0; len - b.size(0)];
            b.write(&mut out, &payload)
        }
        None => {
            let b = builder.udp(src.1, dst.1);
            let payload = vec![0; len - b.size(0)];
            b.write(&mut out, &payload)
        }
    }
    .expect("build frame");
    to_frame(out)
}

/// An SCTP frame of either family, of its family's length: the common header and
/// one chunk of type `chunk` filling the rest. Its checksum is any nonzero value: the
/// data path updates a checksum without checking it, and leaves a zero one (still to
/// be computed by a device) alone, which would skip the update this case measures.
fn sctp_frame(src: (IpAddr, u16), dst: (IpAddr, u16), chunk: u8) -> Frame {
    let len = frame_len(src.0);
    let ip = testbed::frames::ip_headers(src.0, dst.0);
    let mut sctp = vec![0u8; len - 14 - ip.header_len()];
    sctp[0..2].copy_from_slice(&src.1.to_be_bytes());
    sctp[2..4].copy_from_slice(&dst.1.to_be_bytes());
    sctp[8..12].copy_from_slice(&0x5c7b_a11du32.to_le_bytes());
    sctp[12] = chunk;
    let chunk_len = sctp.len() as u16 - 12;
    sctp[14..16].copy_from_slice(&chunk_len.to_be_bytes());
    let mut out = Vec::with_capacity(len);
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ip(ip)
        .write(
            &mut out,
            etherparse::IpNumber(proxy_common::PROTO_SCTP),
            &sctp,
        )
        .expect("build frame");
    to_frame(out)
}

/// A 64-byte IPIP frame: a UDP packet from `src` to `dst` inside an outer header
/// from `outer.0` to `outer.1`.
fn ipip_frame(outer: ([u8; 4], [u8; 4]), src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Frame {
    let mut inner = Vec::with_capacity(44);
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1)
        .write(&mut inner, &[0; 2])
        .expect("build frame");
    let mut header = [
        0x45, 0, 0, 50, 0, 0, 0x40, 0, 64, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    header[12..16].copy_from_slice(&outer.0);
    header[16..20].copy_from_slice(&outer.1);
    set_ipv4_checksum(&mut header);
    let mut out = inner[..14].to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&inner[14..]);
    to_frame(out)
}

/// An ip6ip6 frame: the IPv6 frame `inner`'s packet behind an outer header from
/// `outer.0` to `outer.1`.
fn ip6ip6_frame(outer: (Ipv6Addr, Ipv6Addr), inner: Frame) -> Frame {
    let packet = &inner[14..BENCH_FRAME_V6];
    let mut header = vec![0x60, 0, 0, 0, 0, 0, 41, 64];
    header[4..6].copy_from_slice(&(packet.len() as u16).to_be_bytes());
    header.extend_from_slice(&outer.0.octets());
    header.extend_from_slice(&outer.1.octets());
    let mut out = inner[..14].to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(packet);
    to_frame(out)
}

/// Fills in the checksum of a 20-byte IPv4 header.
fn set_ipv4_checksum(header: &mut [u8]) {
    header[10..12].fill(0);
    let mut sum: u32 = header[..20]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    sum = (sum & 0xffff) + (sum >> 16);
    header[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// `frame` (of `family`) as a fragment of a datagram with id `id`: the first (more
/// fragments follow, offset 0) or a later one (at `offset` 8-byte units, its bytes
/// after the IP headers mere data).
fn fragment(family: Family, mut frame: Frame, id: u16, offset: u16) -> Frame {
    match family {
        Family::V4 => {
            const MORE_FRAGMENTS: u16 = 0x2000;
            let flags = if offset == 0 { MORE_FRAGMENTS } else { offset };
            frame[18..20].copy_from_slice(&id.to_be_bytes());
            frame[20..22].copy_from_slice(&flags.to_be_bytes());
            set_ipv4_checksum(&mut frame[14..34]);
            frame
        }
        Family::V6 => ipv6_fragment(&frame, id, offset),
    }
}

/// An IPv6 frame's packet behind a fragment header, in the same length: the header
/// (its next header the packet's, offset and more-fragments as `fragment` says)
/// takes the packet's last 8 bytes' room.
fn ipv6_fragment(frame: &Frame, id: u16, offset: u16) -> Frame {
    const FRAGMENT_HEADER: u8 = 44;
    let more = u16::from(offset == 0);
    let mut out = frame[..BENCH_FRAME_V6 - 8].to_vec();
    let next_header = std::mem::replace(&mut out[20], FRAGMENT_HEADER);
    let mut header = vec![next_header, 0];
    header.extend_from_slice(&((offset << 3) | more).to_be_bytes());
    header.extend_from_slice(&u32::from(id).to_be_bytes());
    out.splice(54..54, header);
    to_frame(out)
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

fn vip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0)) + u128::from(i))
}

/// Backend number `n` of `family`.
fn backend(family: Family, n: u32) -> IpAddr {
    match family {
        Family::V4 => Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n).into(),
        Family::V6 => Ipv6Addr::from(
            u128::from(Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, 0)) + u128::from(n),
        )
        .into(),
    }
}

fn frontend(family: Family, scheduler: Scheduler, first_backend: u32) -> Frontend {
    let endpoints = (0..u32::from(BACKENDS))
        .map(|b| Endpoint {
            addr: backend(family, first_backend + b),
            port: 8080,
            remote: false,
            weight: 1 + b % 3,
        })
        .collect();
    Frontend {
        service: format!("bench/{scheduler}"),
        external: false,
        scheduler,
        endpoints,
        ..Default::default()
    }
}

/// One address family's side of the bench: its cases' name prefix, its client, an
/// address no service has, and its family.
struct Side {
    prefix: &'static str,
    client: IpAddr,
    elsewhere: IpAddr,
    family: Family,
}

impl Side {
    /// The measured service address `i` (`vip` or `vip6`).
    fn service(&self, i: u32) -> IpAddr {
        match self.family {
            Family::V4 => vip(i).into(),
            Family::V6 => vip6(i).into(),
        }
    }
}

fn sides() -> [Side; 2] {
    [
        Side {
            prefix: "",
            client: CLIENT.into(),
            elsewhere: Ipv4Addr::new(198, 18, 0, 9).into(),
            family: Family::V4,
        },
        Side {
            prefix: "IPv6 ",
            client: CLIENT6.into(),
            elsewhere: Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 9).into(),
            family: Family::V6,
        },
    ]
}

struct Bench {
    datapath: Datapath,
    wrapper: Ebpf,
    pin_dir: PathBuf,
    repeat: u32,
    rounds: usize,
    /// The length of the template's frame, which each run's input must have.
    frame_len: usize,
}

impl Bench {
    fn set_target(&mut self, program_name: &str) -> Result<()> {
        let fd = if program_name == "bench_pass" {
            program::<Xdp>(&mut self.wrapper, "bench_pass")?
                .fd()?
                .try_clone()?
        } else {
            self.datapath.xdp()?.fd()?.try_clone()?
        };
        let mut targets: ProgramArray<_> = self
            .wrapper
            .map_mut(map_name::BENCH_TARGET)
            .context(map_name::BENCH_TARGET)?
            .try_into()?;
        targets.set(0, &fd, 0)?;
        Ok(())
    }

    fn set_frame(&mut self, bytes: Frame, vary_flow: bool) -> Result<()> {
        let mut template: Array<_, BenchTemplate> = self
            .wrapper
            .map_mut(map_name::BENCH_TEMPLATE)
            .context(map_name::BENCH_TEMPLATE)?
            .try_into()?;
        template.set(
            0,
            BenchTemplate {
                bytes,
                vary_flow: u32::from(vary_flow),
            },
            0,
        )?;
        self.frame_len = bench_frame_len(&bytes);
        // Each new-flow case numbers its flows from 1: carried over from earlier
        // cases, the turn's upper half (the source address's low half) reached the
        // node's own address after 16 million flows.
        let mut turn: Array<_, u64> = self
            .wrapper
            .map_mut(map_name::BENCH_TURN)
            .context(map_name::BENCH_TURN)?
            .try_into()?;
        turn.set(0, 0, 0)?;
        Ok(())
    }

    /// Runs the wrapper `rounds` times with `repeat` iterations: ns per iteration.
    fn time(&mut self, repeat: u32, rounds: usize) -> Result<Vec<f64>> {
        let wrapper: &mut Xdp = program(&mut self.wrapper, "bench_wrapper")?;
        let mut samples = Vec::new();
        for _ in 0..rounds {
            let (return_value, ns) = kernel::test_run(wrapper, repeat, self.frame_len)?;
            ensure!(return_value != 0, "the wrapper aborted (tail call failed?)");
            samples.push(ns);
        }
        Ok(samples)
    }

    /// (packets translated, connections opened) so far.
    fn counters(&self) -> Result<(u64, u64)> {
        let listing = listing::read(&self.pin_dir)?;
        let connections = listing.services.iter().map(|s| s.stats.connections).sum();
        Ok((self.event("translated")?, connections))
    }

    fn event(&self, name: &str) -> Result<u64> {
        let listing = listing::read(&self.pin_dir)?;
        Ok(listing
            .events
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |e| e.1))
    }

    /// The floor for `frame`'s family: the wrapper around XDP_PASS.
    fn floor(&mut self, name: &str, frame: Frame, services: usize) -> Result<CaseResult> {
        self.set_target("bench_pass")?;
        self.set_frame(frame, false)?;
        let samples = self.time(self.repeat, self.rounds)?;
        Ok(self.result(name, samples, services))
    }

    /// The cases of every family: its floor, a packet for no service, an established
    /// TCP flow's segments and replies, an established UDP flow's datagrams and
    /// fragments, an established SCTP association's DATA.
    fn family_cases(
        &mut self,
        side: &Side,
        services: usize,
        results: &mut Vec<CaseResult>,
    ) -> Result<()> {
        let p = side.prefix;
        let syn = Some((true, false));
        let floor = frame((side.client, 40000), (side.service(1), 80), syn);
        results.push(self.floor(&format!("{p}floor (wrapper + XDP_PASS)"), floor, services)?);
        results.push(self.case(
            &format!("{p}non-service packet"),
            frame((side.client, 40000), (side.elsewhere, 22), syn),
            false,
            (false, false),
            services,
            None,
        )?);
        // Open one flow, then measure its later segments and its replies.
        results.extend(self.established_tcp(p, (side.client, 41000), side.service(1), services)?);
        let udp = frame((side.client, 5353), (side.service(100), 53), None);
        self.open_flow(udp)?;
        results.push(self.case(
            &format!("{p}established UDP"),
            udp,
            false,
            (true, false),
            services,
            None,
        )?);
        // IP fragments of the established UDP flow: the first (which leaves its ports
        // in FRAGMENTS) and a later one (which finds them, then its flow).
        for (name, offset) in [
            ("first fragment (established UDP)", 0),
            ("later fragment (established UDP)", 185),
        ] {
            results.push(self.case(
                &format!("{p}{name}"),
                fragment(side.family, udp, 0x4242, offset),
                false,
                (true, false),
                services,
                None,
            )?);
        }
        // SCTP, through its family's own program (a tail call): an established
        // association's DATA, its CRC32c updated for the backend's port.
        let sctp = (side.service(300), 3868);
        self.open_flow(sctp_frame((side.client, 3868), sctp, 1))?;
        results.push(self.case(
            &format!("{p}established SCTP (DATA, CRC32c update)"),
            sctp_frame((side.client, 3868), sctp, 0),
            false,
            (true, false),
            services,
            None,
        )?);
        Ok(())
    }

    /// `dsr-ipip` in the family's tunnel: at the entry node, an established flow's
    /// segments, encapsulated; at the backend's node, an established flow's
    /// datagrams, decapsulated and translated for the backend the outer header names.
    fn tunnel_cases(
        &mut self,
        side: &Side,
        services: usize,
        results: &mut Vec<CaseResult>,
    ) -> Result<()> {
        let (p, tunnel) = (side.prefix, ebpf_proxy::trace::tunnel_name(side.family));
        let dsr = (side.service(200), 80);
        self.open_flow(frame((side.client, 42000), dsr, Some((true, false))))?;
        results.push(self.case(
            &format!("{p}{tunnel} encapsulation (dsr-ipip, established TCP)"),
            frame((side.client, 42000), dsr, Some((false, true))),
            false,
            (false, false),
            services,
            Some("encapsulated"),
        )?);
        let named = backend(side.family, 10_003_000 + 3);
        let tunnelled = match (side.family, named) {
            (Family::V4, IpAddr::V4(named)) => ipip_frame(
                ([198, 18, 2, 1], named.octets()),
                (CLIENT, 5454),
                (vip(201).octets(), 53),
            ),
            (Family::V6, IpAddr::V6(named)) => ip6ip6_frame(
                (Ipv6Addr::new(0xfd00, 0x18, 2, 0, 0, 0, 0, 1), named),
                frame((side.client, 5454), (side.service(201), 53), None),
            ),
            _ => anyhow::bail!("a backend of another family"),
        };
        self.open_flow(tunnelled)?;
        results.push(self.case(
            &format!("{p}{tunnel} decapsulation (established UDP)"),
            tunnelled,
            false,
            (true, false),
            services,
            Some("decapsulated"),
        )?);
        Ok(())
    }

    /// Opens a TCP flow from `client` to `vip` port 80, then measures its later
    /// segments and its backend's replies (reverse NAT); names prefixed by `prefix`.
    fn established_tcp(
        &mut self,
        prefix: &str,
        client: (IpAddr, u16),
        vip: IpAddr,
        services: usize,
    ) -> Result<[CaseResult; 2]> {
        self.open_flow(frame(client, (vip, 80), Some((true, false))))?;
        let ack = frame(client, (vip, 80), Some((false, true)));
        let established = self.case(
            &format!("{prefix}established TCP (conntrack hit)"),
            ack,
            false,
            (true, false),
            services,
            None,
        )?;
        let tables = Tables::open(&self.pin_dir)?;
        let flows = ebpf_proxy::conntrack::flows(&tables).collect::<Result<Vec<_>>>()?;
        let flow = flows
            .iter()
            .find(|f| (f.client.ip(), f.client.port()) == client)
            .context("the set-up flow")?;
        let reply = frame(
            (flow.backend.ip(), flow.backend.port()),
            client,
            Some((false, true)),
        );
        let reply = self.case(
            &format!("{prefix}reply (reverse NAT)"),
            reply,
            false,
            (true, false),
            services,
            None,
        )?;
        Ok([established, reply])
    }

    /// Removes every conntrack entry, so that the next case's flows find room.
    fn empty_conntrack(&mut self) -> Result<()> {
        let mut tables = Tables::open(&self.pin_dir)?;
        let keys: Vec<_> = tables.conntrack.keys().filter_map(Result::ok).collect();
        for key in &keys {
            // Gone already is as good (the LRU may have evicted it).
            let _ = tables.conntrack.remove(key);
        }
        Ok(())
    }

    /// Sends one frame once, opening the flow that later cases measure.
    fn open_flow(&mut self, frame: Frame) -> Result<()> {
        self.set_target("uplink_ingress")?;
        self.set_frame(frame, false)?;
        let before = self.counters()?;
        self.time(1, 1)?;
        ensure!(
            self.counters()?.1 == before.1 + 1,
            "the set-up packet opened no flow"
        );
        Ok(())
    }

    /// Measures one case and checks that every iteration translated (or not) and
    /// opened a new flow (or not) as `expect` says, and, with `also`, that this event
    /// (e.g. `encapsulated`) counted every iteration.
    fn case(
        &mut self,
        name: &str,
        frame: Frame,
        vary_flow: bool,
        expect: (bool, bool),
        services: usize,
        also: Option<&str>,
    ) -> Result<CaseResult> {
        self.set_target("uplink_ingress")?;
        self.set_frame(frame, vary_flow)?;
        let before = self.counters()?;
        let also_before = also.map(|e| self.event(e)).transpose()?;
        let samples = self.time(self.repeat, self.rounds)?;
        let after = self.counters()?;
        let iterations = u64::from(self.repeat) * self.rounds as u64;
        let (translated, opened) = (after.0 - before.0, after.1 - before.1);
        ensure!(
            translated == if expect.0 { iterations } else { 0 }
                && opened == if expect.1 { iterations } else { 0 },
            "{name}: {translated} translated, {opened} new flows in {iterations} iterations"
        );
        if let (Some(event), Some(before)) = (also, also_before) {
            let counted = self.event(event)? - before;
            ensure!(
                counted == iterations,
                "{name}: {event} {counted} times in {iterations} iterations"
            );
        }
        Ok(self.result(name, samples, services))
    }

    fn result(&self, name: &str, mut samples: Vec<f64>, services: usize) -> CaseResult {
        samples.sort_by(f64::total_cmp);
        CaseResult {
            services,
            case: name.to_owned(),
            ns_median: samples[samples.len() / 2],
            ns_min: samples[0],
            ns_max: samples[samples.len() - 1],
            rounds: self.rounds,
            repeat: self.repeat,
        }
    }
}

/// The cases at one scale: `services` rr services of 10 backends, plus one service
/// per scheduler measured.
pub fn measure(
    services: usize,
    repeat: u32,
    rounds: usize,
) -> Result<(Vec<CaseResult>, Vec<ProgramSize>, MapMemory)> {
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/epx-bench-dp-{}", std::process::id()));
    let sizes = MapSizes {
        services: (services as u32 + 64).max(1024),
        backends: (services as u32 + 64) * u32::from(BACKENDS),
        ..MapSizes::default()
    };
    let datapath = Datapath::load_sized(&pin_dir, sizes)?;
    let result = (|| {
        let mut syncer = Syncer::recover(Tables::open(&pin_dir)?)?;
        let node = NodeConfig {
            name: "bench".into(),
            addresses: vec![NODE_IP.into(), NODE_IP6.into()],
            node_ports: Default::default(),
            uplinks: vec![],
            pod_interface_patterns: vec![],
            addresses_from: ebpf_proxy::node::AddressesFrom::Flags,
        };
        syncer.program_node(&node, &NodeSettings::default())?;
        let mut desired = DesiredState::default();
        // A frontend at `vip(i)` and, `dual_stack`, one at `vip6(i)`, its backends
        // numbered from `first_backend`.
        let mut add =
            |i: u32, port: u16, protocol: Protocol, scheduler, first_backend, dual_stack| {
                let addresses = [(Family::V4, vip(i).into()), (Family::V6, vip6(i).into())];
                for (family, addr) in addresses.into_iter().take(1 + usize::from(dual_stack)) {
                    let key = FrontendKey {
                        listen: Listen::Address(addr),
                        port,
                        protocol,
                    };
                    desired
                        .frontends
                        .insert(key, frontend(family, scheduler, first_backend).into());
                }
            };
        // The services that only make up the scale are IPv4's.
        for i in 0..services as u32 {
            let first_backend = i * u32::from(BACKENDS);
            add(
                1000 + i,
                80,
                Protocol::Tcp,
                Scheduler::Rr,
                first_backend,
                false,
            );
        }
        let measured = [
            Scheduler::Rr,
            Scheduler::Wrr,
            Scheduler::Lc,
            Scheduler::Sh,
            Scheduler::Dh,
            Scheduler::Maglev,
            Scheduler::Random,
        ];
        for (i, scheduler) in measured.iter().enumerate() {
            let i = i as u32;
            add(
                i + 1,
                80,
                Protocol::Tcp,
                *scheduler,
                10_000_000 + i * 100,
                true,
            );
        }
        add(100, 53, Protocol::Udp, Scheduler::Rr, 10_001_000, true);
        add(300, 3868, Protocol::Sctp, Scheduler::Rr, 10_004_000, true);
        // dsr-ipip, per family: an entry frontend whose backends are remote, and the
        // tunnel view of another, whose backends are here.
        for side in sides() {
            let mut entry = frontend(side.family, Scheduler::Rr, 10_002_000);
            entry.dsr = true;
            for endpoint in &mut entry.endpoints {
                endpoint.remote = true;
            }
            desired.frontends.insert(
                FrontendKey {
                    listen: Listen::Address(side.service(200)),
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                entry.into(),
            );
            desired.frontends.insert(
                FrontendKey {
                    listen: Listen::TunnelAddress(side.service(201)),
                    port: 53,
                    protocol: Protocol::Udp,
                },
                frontend(side.family, Scheduler::Rr, 10_003_000).into(),
            );
        }
        let report = syncer.apply(&desired);
        ensure!(report.problems.is_empty(), "{:?}", report.problems);

        let wrapper = aya::EbpfLoader::new()
            .load(WRAPPER_OBJECT)
            .context("loading the bench wrapper")?;
        let mut bench = Bench {
            datapath,
            wrapper,
            pin_dir: pin_dir.clone(),
            repeat,
            rounds,
            frame_len: BENCH_FRAME_V4,
        };
        for name in ["bench_wrapper", "bench_pass"] {
            program::<Xdp>(&mut bench.wrapper, name)?.load()?;
        }
        let mut results = Vec::new();
        let [v4_side, v6_side] = sides();
        bench.family_cases(&v4_side, services, &mut results)?;
        bench.tunnel_cases(&v4_side, services, &mut results)?;
        // IPv6, through its own programs (tail calls from the uplink's).
        bench.family_cases(&v6_side, services, &mut results)?;
        bench.tunnel_cases(&v6_side, services, &mut results)?;
        // New flows into a table with room, the common case: conntrack emptied before
        // each case, whose flows then fill at most 40% of it.
        let churn_repeat = bench.repeat;
        bench.repeat = churn_repeat.min(ROOM_REPEAT);
        for side in [&v4_side, &v6_side] {
            for (i, scheduler) in measured.iter().enumerate() {
                bench.empty_conntrack()?;
                results.push(bench.case(
                    &format!("{}new TCP flow into room, {scheduler}", side.prefix),
                    frame(
                        (side.client, 50000),
                        (side.service(i as u32 + 1), 80),
                        Some((true, false)),
                    ),
                    true,
                    (true, true),
                    services,
                    None,
                )?);
            }
        }
        bench.repeat = churn_repeat;
        // New flows under churn last: they fill conntrack, and every insert evicts.
        for side in [&v4_side, &v6_side] {
            for (i, scheduler) in measured.iter().enumerate() {
                let vip = side.service(i as u32 + 1);
                results.push(bench.case(
                    &format!("{}new TCP flow, {scheduler}", side.prefix),
                    frame((side.client, 50000), (vip, 80), Some((true, false))),
                    true,
                    (true, true),
                    services,
                    None,
                )?);
            }
            results.push(bench.case(
                &format!("{}new SCTP association (INIT), rr", side.prefix),
                sctp_frame((side.client, 50000), (side.service(300), 3868), 1),
                true,
                (true, true),
                services,
                None,
            )?);
        }
        let mut sizes = Vec::new();
        // Every program a packet can run through: the attached ones and those they
        // tail-call.
        let tail_called = ebpf_proxy::datapath::TAIL_CALLED.map(|(_, program, _)| program);
        for name in [
            ebpf_proxy::datapath::PROG_UPLINK,
            ebpf_proxy::datapath::PROG_POD,
        ]
        .into_iter()
        .chain(tail_called)
        {
            let info = bench
                .datapath
                .ebpf
                .program(name)
                .context("program")?
                .info()?;
            sizes.push(ProgramSize {
                program: name.to_owned(),
                verified_instructions: info.verified_instruction_count(),
                translated_bytes: info.size_translated(),
                jited_bytes: info.size_jitted(),
            });
        }
        Ok((results, sizes, map_memory(&pin_dir, services)?))
    })();
    attach::cleanup(&pin_dir)?;
    result
}

/// Iterations per round of a new-flow case into a table with room: two entries a
/// flow, 5 rounds, at most 40% of the default conntrack table (524,288 entries).
const ROOM_REPEAT: u32 = 20_000;

/// The per-packet cases at every scale, the programs' sizes, and the maps' memory
/// at every scale.
pub type DataPathResults = (Vec<CaseResult>, Vec<ProgramSize>, Vec<MapMemory>);

pub fn run(quick: bool) -> Result<DataPathResults> {
    let (scales, repeat, rounds): (&[usize], u32, usize) = if quick {
        (&[1, 1_000], 100_000, 3)
    } else {
        (&[1, 1_000, 10_000, 100_000], 1_000_000, 5)
    };
    let mut all = Vec::new();
    let mut sizes = Vec::new();
    let mut memory = Vec::new();
    println!(
        "\n{:>8}  {:<56} {:>10} {:>17}",
        "services", "case", "ns median", "min..max"
    );
    for &services in scales {
        let (results, program_sizes, maps) =
            measure(services, repeat, rounds).with_context(|| format!("{services} services"))?;
        for r in &results {
            println!(
                "{:>8}  {:<56} {:>10.1} {:>8.1}..{:<8.1}",
                r.services, r.case, r.ns_median, r.ns_min, r.ns_max
            );
        }
        all.extend(results);
        sizes = program_sizes;
        memory.push(maps);
    }
    for m in &memory {
        println!(
            "{:>8} services: maps use {:.1} MiB (largest: {})",
            m.services,
            m.total_bytes as f64 / (1 << 20) as f64,
            m.maps
                .iter()
                .take(3)
                .map(|(n, b)| format!("{n} {:.1} MiB", *b as f64 / (1 << 20) as f64))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for s in &sizes {
        println!(
            "{}: {:?} instructions verified, {:?} bytes translated, {} bytes JITed",
            s.program, s.verified_instructions, s.translated_bytes, s.jited_bytes
        );
    }
    Ok((all, sizes, memory))
}

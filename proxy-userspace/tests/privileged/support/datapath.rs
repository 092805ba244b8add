//! A freshly loaded data path in its own bpffs directory, driven through
//! BPF_PROG_TEST_RUN; everything is unpinned when the guard drops, also on panic.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{ProgramError, TestRun as _, TestRunOptions};
use ebpf_proxy::{
    datapath::{
        attach,
        generation::Generation,
        loader::{Datapath, MapSizes},
        tables::Tables,
    },
    model::{DesiredState, Endpoint, Family, Frontend, FrontendKey, Listen, Protocol, Scheduler},
    node::NodeConfig,
    sync::{NodeSettings, Syncer},
};
use proxy_common::{Addr, CtEntry, CtKey, LoadSettings, PROTO_TCP};

use super::packets::{inspect_ip, packet, Seen, Tcp, L4, XDP_PASS};

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The test node is dual-stack: its IPv6 address (the IPv6 masquerade source).
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);

fn test_node() -> NodeConfig {
    NodeConfig {
        name: "node-a".into(),
        addresses: vec![NODE_IP.into(), NODE_IP6.into()],
        node_ports: Default::default(),
        uplinks: vec![],
        pod_interface_patterns: vec![],
        addresses_from: ebpf_proxy::node::AddressesFrom::Flags,
    }
}

enum Hook {
    Uplink,
    PodIngress,
    NodeEgress,
}

pub struct TestDatapath {
    pub datapath: Datapath,
    pub syncer: Syncer,
    pub pin_dir: PathBuf,
}

impl TestDatapath {
    pub fn new() -> TestDatapath {
        TestDatapath::with_sizes(MapSizes::default())
    }

    pub fn with_sizes(sizes: MapSizes) -> TestDatapath {
        let generation = Generation::of_this_kernel().expect("probing the kernel");
        TestDatapath::loaded(sizes, LoadSettings::DEFAULT, generation)
    }

    /// The object for kernels 5.10 to 5.17, whatever this kernel is: its fallbacks
    /// run at full speed here too.
    pub fn legacy() -> TestDatapath {
        TestDatapath::loaded(
            MapSizes::default(),
            LoadSettings::DEFAULT,
            Generation::Legacy,
        )
    }

    /// With `settings` in the programs (conntrack timeouts…).
    pub fn with_settings(settings: LoadSettings) -> TestDatapath {
        let generation = Generation::of_this_kernel().expect("probing the kernel");
        TestDatapath::loaded(MapSizes::default(), settings, generation)
    }

    fn loaded(sizes: MapSizes, settings: LoadSettings, generation: Generation) -> TestDatapath {
        // A private, empty network namespace for this test thread: the programs'
        // FIB look-ups then find no routes, whatever the machine has.
        // SAFETY: unshare affects only the calling thread.
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare(CLONE_NEWNET)"
        );
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/epx-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let loaded = Datapath::load_configured(&pin_dir, sizes, settings, generation);
        let datapath = loaded.unwrap_or_else(|e| {
            let _ = attach::cleanup(&pin_dir);
            panic!("loading the data path (root and a mounted bpffs are needed): {e:?}")
        });
        let mut syncer = Syncer::recover(Tables::open(&pin_dir).expect("tables")).expect("recover");
        syncer
            .program_node(&test_node(), &NodeSettings::default())
            .expect("node config");
        TestDatapath {
            datapath,
            syncer,
            pin_dir,
        }
    }

    /// Reprograms the node-wide settings.
    pub fn settings(&mut self, settings: NodeSettings) {
        self.syncer
            .program_node(&test_node(), &settings)
            .expect("node config");
    }

    pub fn tables(&self) -> Tables {
        Tables::open(&self.pin_dir).expect("tables")
    }

    /// Programs one round-robin frontend per (key, endpoints) and nothing else.
    pub fn program(&mut self, frontends: &[(FrontendKey, Vec<Endpoint>)]) {
        self.program_with(Scheduler::Rr, frontends);
    }

    /// Programs one frontend per (key, endpoints) with `scheduler`, and nothing else.
    pub fn program_with(
        &mut self,
        scheduler: Scheduler,
        frontends: &[(FrontendKey, Vec<Endpoint>)],
    ) {
        self.program_frontends(
            frontends
                .iter()
                .map(|(key, endpoints)| {
                    let frontend = Frontend {
                        service: format!("test/{}", key.port),
                        external: matches!(key.listen, Listen::NodePort(_)),
                        scheduler,
                        endpoints: endpoints.clone(),
                        ..Default::default()
                    };
                    (*key, frontend)
                })
                .collect(),
        );
    }

    /// Programs exactly these frontends.
    pub fn program_frontends(&mut self, frontends: Vec<(FrontendKey, Frontend)>) {
        let desired = DesiredState {
            frontends: frontends
                .into_iter()
                .map(|(key, frontend)| (key, frontend.into()))
                .collect(),
        };
        let report = self.syncer.apply(&desired);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }

    fn run(&mut self, hook: Hook, packet: &[u8]) -> (u32, Vec<u8>) {
        self.try_run(hook, packet).expect("BPF_PROG_TEST_RUN")
    }

    /// BPF_PROG_TEST_RUN of one hook's program; an error is the kernel's test harness
    /// refusing the input before the program ran.
    fn try_run(&mut self, hook: Hook, packet: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        let mut out = vec![0u8; packet.len() + 256];
        let options = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let result = match hook {
            Hook::Uplink => self.datapath.xdp().expect("xdp").test_run(options),
            Hook::PodIngress => self.datapath.tc().expect("tc").test_run(options),
            Hook::NodeEgress => self.datapath.tc_egress().expect("tc").test_run(options),
        }?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }

    /// Runs the uplink XDP program; returns the verdict and the packet as it left.
    pub fn xdp(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run(Hook::Uplink, packet)
    }

    /// Runs the pod-interface tc program.
    pub fn tc(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run(Hook::PodIngress, packet)
    }

    /// `xdp` and `tc`, but an input the kernel's test harness refuses before the
    /// program runs (EINVAL: some frames the fuzzer makes) is an error, not a panic.
    pub fn try_xdp(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        self.try_run(Hook::Uplink, packet)
    }
    pub fn try_tc(&mut self, packet: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
        self.try_run(Hook::PodIngress, packet)
    }

    /// Runs the egress tc program (uplinks and pod interfaces).
    pub fn tc_egress(&mut self, packet: &[u8]) -> (u32, Vec<u8>) {
        self.run(Hook::NodeEgress, packet)
    }

    /// Forgets every tracked flow, as eviction or a flush would.
    pub fn flush_conntrack(&self) {
        let mut tables = self.tables();
        let keys: Vec<_> = tables.conntrack.keys().filter_map(Result::ok).collect();
        for key in &keys {
            tables
                .conntrack
                .remove(key)
                .expect("remove a conntrack entry");
        }
    }

    /// A complete TCP handshake through the programs, as a client outside the node
    /// and a local backend make it (SYN in on the uplink, SYN-ACK in on the pod
    /// interface, ACK in on the uplink); returns the backend the flow went to.
    pub fn establish(&mut self, client: ([u8; 4], u16), frontend: ([u8; 4], u16)) -> Seen {
        let v4 = |(addr, port): ([u8; 4], u16)| (IpAddr::from(addr), port);
        let (backend, port) = self.establish_ip(v4(client), v4(frontend));
        let IpAddr::V4(backend) = backend else {
            unreachable!("an IPv4 flow's backend is IPv4")
        };
        Seen {
            src: client,
            dst: (backend.octets(), port),
        }
    }

    /// `establish`, of either family; returns the backend.
    pub fn establish_ip(
        &mut self,
        client: (IpAddr, u16),
        frontend: (IpAddr, u16),
    ) -> (IpAddr, u16) {
        let syn = L4::Tcp(Tcp::Syn);
        let (verdict, out) = self.xdp(&packet(client, frontend, syn, b""));
        assert_eq!(verdict, XDP_PASS);
        let backend = inspect_ip(&out).dst;
        let _ = self.tc(&packet(backend, client, L4::Tcp(Tcp::SynAck), b""));
        let _ = self.xdp(&packet(client, frontend, L4::Tcp(Tcp::Ack), b""));
        backend
    }

    /// The original conntrack entry of a flow, as the client sent it.
    pub fn entry(&self, client: ([u8; 4], u16), frontend: ([u8; 4], u16)) -> Option<CtEntry> {
        self.tables()
            .conntrack
            .get(&ct_key(client, frontend), 0)
            .ok()
    }

    pub fn event(&self, name: &str) -> u64 {
        self.tables()
            .events()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .expect("known event name")
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        let _ = attach::cleanup(&self.pin_dir);
    }
}

/// The conntrack key of a TCP packet from `src` to `dst`.
pub fn ct_key(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> CtKey {
    CtKey {
        src: Addr::from_v4_octets(src.0),
        dst: Addr::from_v4_octets(dst.0),
        sport: src.1.to_be(),
        dport: dst.1.to_be(),
        proto: PROTO_TCP,
        family: Family::V4.number(),
        _pad: [0; 2],
    }
}

/// Runs `f` on a thread pinned to `cpu`: BPF_PROG_TEST_RUN executes on the caller's CPU.
pub fn on_cpu<T: Send + 'static>(
    cpu: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        pin_to_cpu(cpu);
        f()
    })
}

/// Keeps the calling thread on `cpu`, so that its test runs meet one CPU's per-CPU
/// state.
pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: plain sched_setaffinity on the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0
        );
    }
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub fn tcp(addr: [u8; 4], port: u16) -> FrontendKey {
    FrontendKey {
        listen: Listen::Address(Ipv4Addr::from(addr).into()),
        port,
        protocol: Protocol::Tcp,
    }
}

pub fn udp(addr: [u8; 4], port: u16) -> FrontendKey {
    FrontendKey {
        protocol: Protocol::Udp,
        ..tcp(addr, port)
    }
}

pub fn node_port(port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        listen: Listen::NodePort(Family::V4),
        port,
        protocol,
    }
}

pub fn local(addr: [u8; 4], port: u16) -> Endpoint {
    Endpoint {
        addr: Ipv4Addr::from(addr).into(),
        port,
        remote: false,
        weight: 1,
    }
}

pub fn remote(addr: [u8; 4], port: u16) -> Endpoint {
    Endpoint {
        remote: true,
        ..local(addr, port)
    }
}

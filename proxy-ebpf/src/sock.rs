//! Socket-level load balancing for connections that start on the node itself.
//!
//! Why at the socket and not per packet: a node process that connects to a ClusterIP
//! has no route for it and no uplink packet to catch; rewriting the destination in
//! connect()/sendmsg() (as Cilium's socket LB does) sends it straight to a backend with
//! no per-packet NAT at all. recvmsg()/getpeername() restore the service address so
//! the application sees what it asked for. Only sockets of the node's own network
//! namespace are translated: cgroup hooks are machine-wide, pod namespaces are not ours.

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_ANY},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use proxy_common::{
    Addr, ConfigValue, CtKey, Family, SockKey, SockNat, CONFIG_NETNS_COOKIE, EV_REFUSED,
};

use crate::{
    affinity, balancer, conntrack,
    counters::{self, Direction},
    maps::{NODE_CONFIG, SOCK_AFFINITY, SOCK_REVERSE},
};

/// Whether the socket is one of the namespace the agent named
/// (`CONFIG_NETNS_COOKIE`); also answers the agent's probe while it learns that
/// name (`ConfigValue::netns_probe`).
#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext) -> bool {
    let Some(slot) = NODE_CONFIG.get_ptr_mut(CONFIG_NETNS_COOKIE) else {
        return false;
    };
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the array's slot; the agent writes it only while it probes, and a
    // torn read of a probe is at worst no match.
    let slot = unsafe { &mut *slot };
    if let Some(probe) = slot.probe() {
        // SAFETY: reading the context's own fields.
        let called = unsafe { ((*ctx.sock_addr).user_ip4, (*ctx.sock_addr).user_port) };
        if called == probe {
            // The cookie this socket's namespace has, and no probe left.
            *slot = ConfigValue::from_u64(cookie);
        }
    }
    let wanted = slot.as_u64();
    wanted != 0 && wanted == cookie
}

/// The family of the hooks here: the `*4` attach types, whose context holds the
/// address in `user_ip4`. The `*6` hooks (`user_ip6`) come with IPv6 services.
const FAMILY: Family = Family::V4;

#[inline(always)]
fn sock_key(ctx: &SockAddrContext, addr: Addr, port: u16, proto: u8) -> SockKey {
    SockKey {
        // SAFETY: helper on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr,
        port,
        proto,
        family: FAMILY.number(),
        _pad: [0; 4],
    }
}

/// The backend an unconnected socket used before for this service, if it still serves.
#[inline(always)]
fn remembered(key: &SockKey) -> Option<SockNat> {
    // SAFETY: copied out at once.
    let memo = unsafe { SOCK_AFFINITY.get(key) }.copied()?;
    balancer::remembered_backend(memo.service_id, memo.slot, memo.backend_id).map(|_| memo)
}

/// Fails the connect()/sendmsg() at hand with ECONNREFUSED, the error kube-proxy's
/// REJECT gives a node-local client (a hook that only returns 0 gives EPERM, as it
/// must on kernels before 5.18, which lack `bpf_set_retval`).
#[inline(always)]
fn refuse() -> bool {
    const ECONNREFUSED: i32 = 111;
    counters::event(EV_REFUSED);
    if !crate::LEGACY_KERNEL {
        // SAFETY: plain helper call (cgroup connect and sendmsg hooks may set the
        // errno).
        unsafe { bpf_set_retval(-ECONNREFUSED) };
    }
    false
}

/// connect4 and sendmsg4: point the socket at a backend. `sticky` keeps one backend
/// per (socket, service) for unconnected sends. Returns false to refuse the call: a
/// service without a backend for this node, or a port of a service address no
/// frontend has, fails connect()/sendmsg() at once with ECONNREFUSED (`refuse`)
/// instead of letting the packets leave the node for the service address.
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, sticky: bool) -> bool {
    if !in_node_netns(ctx) {
        return true;
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: reads and writes of the context fields the attach type allows.
    let (ip, port, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    let vip = Addr::from_v4_be(ip);
    // The source address is not chosen yet at connect(): hashing schedulers see the
    // node's sockets as one client, as IPVS sees the node's address.
    let flow = CtKey {
        src: Addr::ZERO,
        dst: vip,
        sport: 0,
        dport: port,
        proto,
        family: FAMILY.number(),
        _pad: [0; 2],
    };
    let Some(service) = balancer::lookup_service_from(&flow, || true) else {
        // Another port of a service address: refused rather than sent out.
        if balancer::is_service_address(flow.family, &vip) {
            return refuse();
        }
        return true;
    };
    let affinity_key = sock_key(ctx, vip, port, proto);
    let target = match sticky.then(|| remembered(&affinity_key)).flatten() {
        Some(memo) => memo,
        None => {
            // The node is one client for sessionAffinity too (the unspecified address).
            let now = conntrack::now_ns();
            let Some(scheduler) = balancer::scheduler_of(&service) else {
                return true;
            };
            let Some(choice) = affinity::recall(&service, &flow.src, now)
                .or_else(|| balancer::schedule(&service, scheduler, &flow))
            else {
                return refuse();
            };
            affinity::remember(&service, &flow.src, &choice, now);
            counters::traffic(service.id, choice.backend.id, Direction::ToBackend, 0, true);
            SockNat {
                addr: choice.backend.addr,
                port: choice.backend.port,
                _pad: 0,
                service_id: service.id,
                backend_id: choice.backend.id,
                slot: choice.slot,
            }
        }
    };
    if sticky {
        let _ = SOCK_AFFINITY.insert(affinity_key, target, u64::from(BPF_ANY));
    }
    let reverse = SockNat {
        addr: vip,
        port,
        ..target
    };
    let _ = SOCK_REVERSE.insert(
        sock_key(ctx, target.addr, target.port, proto),
        reverse,
        u64::from(BPF_ANY),
    );
    // SAFETY: see above.
    unsafe {
        (*sa).user_ip4 = target.addr.v4_be();
        (*sa).user_port = u32::from(target.port);
    }
    true
}

/// recvmsg4 and getpeername4: show the service address instead of the backend's.
#[inline(always)]
pub fn restore(ctx: &SockAddrContext) {
    if !in_node_netns(ctx) {
        return;
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in `redirect`.
    let (ip, port, proto) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol as u8) };
    // SAFETY: copied out at once.
    let Some(nat) =
        (unsafe { SOCK_REVERSE.get(sock_key(ctx, Addr::from_v4_be(ip), port, proto)) }).copied()
    else {
        return;
    };
    unsafe {
        (*sa).user_ip4 = nat.addr.v4_be();
        (*sa).user_port = u32::from(nat.port);
    }
}

//! Socket-level load balancing for connections that start on the node itself.
//!
//! Why at the socket and not per packet: a node process that connects to a ClusterIP
//! has no route for it and no uplink packet to catch; rewriting the destination in
//! connect()/sendmsg() (as Cilium's socket LB does) sends it straight to a backend with
//! no per-packet NAT at all. recvmsg()/getpeername() restore the service address so
//! the application sees what it asked for. Only sockets of the node's own network
//! namespace are translated: cgroup hooks are machine-wide, pod namespaces are not ours.
//!
//! Both families' hooks share the code here (`Hook`): the `*6` hooks serve IPv6
//! services, and an IPv4-mapped address (`::ffff:a.b.c.d`, a dual-stack socket
//! reaching an IPv4 peer) the IPv4 service it maps, answered in the same form.

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

/// Which family's hooks a program is: which of the context's address fields it may
/// read and write (`user_ip4`, `user_ip6`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    V4,
    V6,
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), network order.
const MAPPED_PREFIX: u32 = 0x0000_ffff_u32.to_be();

impl Hook {
    /// The address the call names, as the family it is of: an IPv4-mapped one is
    /// IPv4.
    #[inline(always)]
    fn address(self, sa: *const bpf_sock_addr) -> (Family, Addr) {
        // SAFETY: reads of the context field the attach type allows.
        unsafe {
            match self {
                Hook::V4 => (Family::V4, Addr::from_v4_be((*sa).user_ip4)),
                Hook::V6 => {
                    let words = (*sa).user_ip6;
                    if words[0] == 0 && words[1] == 0 && words[2] == MAPPED_PREFIX {
                        (Family::V4, Addr::from_v4_be(words[3]))
                    } else {
                        (Family::V6, Addr { words })
                    }
                }
            }
        }
    }

    /// Writes `addr` (of `family`) into the call: IPv4 into an IPv6 hook's context
    /// as the IPv4-mapped address it came as.
    #[inline(always)]
    fn set_address(self, sa: *mut bpf_sock_addr, family: Family, addr: &Addr) {
        // SAFETY: writes of the context field the attach type allows, word by word
        // (the verifier takes no wider store into `user_ip6`).
        unsafe {
            match (self, family) {
                (Hook::V4, _) => (*sa).user_ip4 = addr.v4_be(),
                (Hook::V6, Family::V4) => {
                    (*sa).user_ip6[0] = 0;
                    (*sa).user_ip6[1] = 0;
                    (*sa).user_ip6[2] = MAPPED_PREFIX;
                    (*sa).user_ip6[3] = addr.v4_be();
                }
                (Hook::V6, Family::V6) => {
                    (*sa).user_ip6[0] = addr.words[0];
                    (*sa).user_ip6[1] = addr.words[1];
                    (*sa).user_ip6[2] = addr.words[2];
                    (*sa).user_ip6[3] = addr.words[3];
                }
            }
        }
    }
}

/// Whether the socket is one of the namespace the agent named
/// (`CONFIG_NETNS_COOKIE`); also answers the agent's probe while it learns that
/// name (`ConfigValue::netns_probe`), which is an IPv4 connect (`Hook::V4`).
#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext, hook: Hook) -> bool {
    let Some(slot) = NODE_CONFIG.get_ptr_mut(CONFIG_NETNS_COOKIE) else {
        return false;
    };
    // SAFETY: helper on the program's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the array's slot; the agent writes it only while it probes, and a
    // torn read of a probe is at worst no match.
    let slot = unsafe { &mut *slot };
    if let (Hook::V4, Some(probe)) = (hook, slot.probe()) {
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

#[inline(always)]
fn sock_key(ctx: &SockAddrContext, family: Family, addr: Addr, port: u16, proto: u8) -> SockKey {
    SockKey {
        // SAFETY: helper on the program's own context.
        cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
        addr,
        port,
        proto,
        family: family.number(),
        _pad: [0; 4],
    }
}

/// The backend an unconnected socket used before for this service, if it still serves.
#[inline(always)]
fn remembered(key: &SockKey) -> Option<SockNat> {
    // Checked where it lies, copied only once it is known to serve: copied first, the
    // paths on which it does not (none, or a backend that left) reached the
    // scheduling with other stack contents, and the verifier walked the scheduling
    // two or three times (sendmsg6, on 2026-12-05's other verifier changes: 52,366
    // processed instructions, 27,548 so).
    // SAFETY: the fields are read once each, by copy.
    let memo = unsafe { SOCK_AFFINITY.get(key) }?;
    let checked = (memo.service_id, memo.slot, memo.backend_id);
    balancer::remembered_backend(checked.0, checked.1, checked.2)?;
    let memo = *memo;
    // Another CPU may have replaced it meanwhile: only what was checked is used.
    (memo.service_id, memo.slot, memo.backend_id)
        .eq(&checked)
        .then_some(memo)
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

/// connect and sendmsg: point the socket at a backend. `sticky` keeps one backend
/// per (socket, service) for unconnected sends. Returns false to refuse the call: a
/// service without a backend for this node, or a port of a service address no
/// frontend has, fails connect()/sendmsg() at once with ECONNREFUSED (`refuse`)
/// instead of letting the packets leave the node for the service address.
#[inline(always)]
pub fn redirect(ctx: &SockAddrContext, hook: Hook, sticky: bool) -> bool {
    if !in_node_netns(ctx, hook) {
        return true;
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: reads of the context fields every attach type here allows.
    let (port, proto) = unsafe { ((*sa).user_port as u16, (*sa).protocol as u8) };
    let (family, vip) = hook.address(sa);
    // The source address is not chosen yet at connect(): hashing schedulers see the
    // node's sockets as one client, as IPVS sees the node's address.
    let flow = CtKey {
        src: Addr::ZERO,
        dst: vip,
        sport: 0,
        dport: port,
        proto,
        family: family.number(),
        _pad: [0; 2],
    };
    let Some(service) = balancer::lookup_service_from(&flow, || true) else {
        // Another port of a service address: refused rather than sent out.
        if balancer::is_service_address(flow.family, &vip) {
            return refuse();
        }
        return true;
    };
    let affinity_key = sock_key(ctx, family, vip, port, proto);
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
        sock_key(ctx, family, target.addr, target.port, proto),
        reverse,
        u64::from(BPF_ANY),
    );
    hook.set_address(sa, family, &target.addr);
    // SAFETY: a write of the context field every attach type here allows.
    unsafe { (*sa).user_port = u32::from(target.port) };
    true
}

/// recvmsg and getpeername: show the service address instead of the backend's.
#[inline(always)]
pub fn restore(ctx: &SockAddrContext, hook: Hook) {
    if !in_node_netns(ctx, hook) {
        return;
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: as in `redirect`.
    let (port, proto) = unsafe { ((*sa).user_port as u16, (*sa).protocol as u8) };
    let (family, addr) = hook.address(sa);
    // SAFETY: copied out at once.
    let Some(nat) = (unsafe { SOCK_REVERSE.get(sock_key(ctx, family, addr, port, proto)) }).copied()
    else {
        return;
    };
    hook.set_address(sa, family, &nat.addr);
    // SAFETY: as in `redirect`.
    unsafe { (*sa).user_port = u32::from(nat.port) };
}

//! Which network namespace the socket hooks serve: the agent's own, named by its
//! cookie. cgroup hooks see every namespace's sockets, and pods' are the pod
//! interfaces' program's to translate, so the hooks translate only sockets whose
//! namespace cookie is the one in `CONFIG_NETNS_COOKIE`.
//!
//! The agent learns that cookie from the hooks themselves rather than from its own
//! socket (`SO_NETNS_COOKIE`, Linux 5.14): it writes a probe (a random loopback
//! address and port) into the slot and connects a UDP socket there (no packet is
//! sent); the hook that sees that connect() writes the cookie of the socket's
//! namespace in (`ConfigValue::netns_probe`). That needs only the hooks'
//! `bpf_get_netns_cookie` (5.7), so the hooks serve the 5.10 kernels too. A process
//! in another namespace would have to hit 40 random bits in the microseconds the
//! probe stands to claim the hooks for its namespace.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use anyhow::{Context as _, Result};
use aya::maps::{Array, MapData};
use proxy_common::{ConfigValue, CONFIG_NETNS_COOKIE};

/// The cookie of the agent's network namespace, as a socket hook saw it; `None` when
/// no hook saw the probe (the agent runs outside the hooks' cgroup). The cookie in
/// force (a restarted agent's) stays while the probe stands.
pub fn learn(config: &mut Array<MapData, ConfigValue>) -> Result<Option<u64>> {
    let (address, port) = random_probe()?;
    let in_force = config.get(&CONFIG_NETNS_COOKIE, 0)?.as_u64();
    let probe = ConfigValue::netns_probe(
        in_force,
        u32::from_ne_bytes(address.octets()),
        u32::from(port.to_be()),
    );
    config.set(CONFIG_NETNS_COOKIE, probe, 0)?;
    let connected = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|socket| socket.connect(SocketAddrV4::new(address, port)));
    let seen = config.get(&CONFIG_NETNS_COOKIE, 0)?;
    let learned = seen.probe().is_none().then(|| seen.as_u64());
    // No probe left standing, whatever happened.
    config.set(
        CONFIG_NETNS_COOKIE,
        ConfigValue::from_u64(learned.unwrap_or(in_force)),
        0,
    )?;
    connected.context("connecting the probe socket")?;
    Ok(learned)
}

/// A loopback address off 127.0.0.1 and a port, from 40 random bits.
fn random_probe() -> Result<(Ipv4Addr, u16)> {
    let mut bits = [0u8; 5];
    getrandom::fill(&mut bits).context("random probe")?;
    // Neither a network address nor port 0 (a connect() there fails).
    let address = Ipv4Addr::new(127, bits[0], bits[1], bits[2].max(1));
    let port = u16::from_ne_bytes([bits[3], bits[4]]).max(1);
    Ok((address, port))
}

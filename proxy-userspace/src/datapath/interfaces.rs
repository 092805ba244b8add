//! Following network interfaces through rtnetlink, so that pod interfaces created
//! after start get their program, and removed ones are forgotten; and their IPv4
//! addresses, which `nodePortAddresses` chooses from.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkMessage},
    RouteNetlinkMessage,
};
use netlink_sys::{AsyncSocket as _, SocketAddr};
use tokio::sync::mpsc;

/// Interfaces by index: a rename is a `Present` with a known index and a new name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Present {
        index: u32,
        name: String,
    },
    Removed {
        index: u32,
    },
    /// Every interface present at start has been reported.
    ListDone,
    /// Every IPv4 address present at start, with its interface's index (before
    /// `ListDone`).
    AddressesListed(BTreeSet<(u32, IpAddr)>),
    /// An address was added to an interface, or removed (`present: false`).
    Address {
        index: u32,
        address: IpAddr,
        present: bool,
    },
}

/// The interface's own address (`IFA_LOCAL`; `IFA_ADDRESS` is the peer's on
/// point-to-point links).
fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let local = message.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        message.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

/// Whether an interface address is one NodePorts may answer on: of either family,
/// but not IPv6 link-local (one per interface, the same on many: no node address).
fn is_node_address(address: &IpAddr) -> bool {
    match address {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => !v6.is_unicast_link_local(),
    }
}

fn address_event(message: &AddressMessage, present: bool) -> Option<LinkEvent> {
    let address = address_of(message).filter(is_node_address)?;
    Some(LinkEvent::Address {
        index: message.header.index,
        address,
        present,
    })
}

/// The addresses on the node's interfaces now (`is_node_address`), with the
/// interface's index.
pub async fn node_addresses() -> Result<BTreeSet<(u32, IpAddr)>> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(connection);
    let listed = list_node_addresses(&handle).await;
    task.abort();
    listed
}

async fn list_node_addresses(handle: &rtnetlink::Handle) -> Result<BTreeSet<(u32, IpAddr)>> {
    let mut addresses = BTreeSet::new();
    let mut listing = handle.address().get().execute();
    while let Some(message) = listing.try_next().await.context("listing addresses")? {
        if let Some(address) = address_of(&message).filter(is_node_address) {
            addresses.insert((message.header.index, address));
        }
    }
    Ok(addresses)
}

fn link_name(message: &LinkMessage) -> Option<String> {
    message.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

fn present(message: &LinkMessage) -> Option<LinkEvent> {
    Some(LinkEvent::Present {
        index: message.header.index,
        name: link_name(message)?,
    })
}

/// Sends every existing interface as `Present`, then every change, until the
/// receiver goes away. Subscribes before listing so no interface falls in between.
pub async fn watch(events: mpsc::Sender<LinkEvent>) -> Result<()> {
    let (mut connection, handle, mut messages) =
        rtnetlink::new_connection().context("opening rtnetlink")?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(
            0,
            rtnetlink::constants::RTMGRP_LINK | rtnetlink::constants::RTMGRP_IPV4_IFADDR,
        ))
        .context("subscribing to link and address notifications")?;
    tokio::spawn(connection);

    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await.context("listing interfaces")? {
        if let Some(event) = present(&link) {
            if events.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
    let addresses = list_node_addresses(&handle).await?;
    if events
        .send(LinkEvent::AddressesListed(addresses))
        .await
        .is_err()
    {
        return Ok(());
    }
    if events.send(LinkEvent::ListDone).await.is_err() {
        return Ok(());
    }
    while let Some((message, _)) = messages.next().await {
        let event = match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => present(&link),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                Some(LinkEvent::Removed {
                    index: link.header.index,
                })
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(message)) => {
                address_event(&message, true)
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(message)) => {
                address_event(&message, false)
            }
            _ => None,
        };
        if let Some(event) = event {
            if events.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

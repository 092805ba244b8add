//! Following network interfaces through rtnetlink, so that pod interfaces created
//! after start get their program, and removed ones are forgotten.

use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::{
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
        .bind(&SocketAddr::new(0, rtnetlink::constants::RTMGRP_LINK))
        .context("subscribing to link notifications")?;
    tokio::spawn(connection);

    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await.context("listing interfaces")? {
        if let Some(event) = present(&link) {
            if events.send(event).await.is_err() {
                return Ok(());
            }
        }
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

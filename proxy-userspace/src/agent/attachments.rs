//! Which interfaces carry the agent's programs, which could not get them yet and why.
//!
//! Interfaces are followed by index, not name: an interface renamed away keeps its
//! index (its program is detached if the new name is not one of ours), and a new
//! interface that takes the old name is a new index that gets its program. An
//! attachment that fails (the interface vanished in between, a read-only
//! `/proc/sys`, a full descriptor table) is retried every `RETRY_INTERVAL` until it
//! succeeds or the interface goes, and the agent is not ready meanwhile: readiness
//! says what is really attached, item by item.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result};
use tracing::{debug, info, warn};

use super::AgentConfig;
use crate::{
    datapath::{
        attach::{self, TcHook},
        loader::Datapath,
    },
    node,
    status::{InterfaceState, Role},
};

pub const RETRY_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Default)]
pub struct Attachments {
    /// Interfaces with their program, by index.
    attached: BTreeMap<u32, String>,
    /// Interfaces of ours whose attachment failed, by index: name and error.
    failed: BTreeMap<u32, (String, String)>,
}

impl Attachments {
    /// An interface exists with this index and name (listed, created or renamed).
    pub fn present(&mut self, dp: &mut Datapath, config: &AgentConfig, index: u32, name: &str) {
        if self.attached.get(&index).is_some_and(|n| n == name) {
            return;
        }
        if let Some(old) = self.attached.remove(&index) {
            info!(from = %old, to = %name, "interface renamed");
            attach::forget_interface(&config.pin_dir, &old);
        }
        let previous = self.failed.remove(&index);
        match attach_interface(dp, config, name) {
            Ok(true) => {
                self.attached.insert(index, name.to_owned());
            }
            Ok(false) => {}
            Err(e) => {
                let error = format!("{e:#}");
                // Said when it starts or changes, not at every retry (`/readyz` keeps
                // saying it).
                if previous.is_some_and(|(n, before)| n == name && before == error) {
                    debug!(iface = %name, "{error} (retrying)");
                } else {
                    warn!(iface = %name, "{error} (retried every {RETRY_INTERVAL:?})");
                }
                self.failed.insert(index, (name.to_owned(), error));
            }
        }
    }

    pub fn removed(&mut self, config: &AgentConfig, index: u32) {
        self.failed.remove(&index);
        if let Some(name) = self.attached.remove(&index) {
            info!(iface = %name, "interface removed");
            attach::forget_interface(&config.pin_dir, &name);
        }
    }

    /// Tries the failed attachments again.
    pub fn retry(&mut self, dp: &mut Datapath, config: &AgentConfig) {
        let failed: Vec<(u32, String)> = self
            .failed
            .iter()
            .map(|(index, (name, _))| (*index, name.clone()))
            .collect();
        for (index, name) in failed {
            self.present(dp, config, index, &name);
        }
    }

    /// Attaches everything again (the pinned links were lost with the pin directory).
    pub fn attach_again(&mut self, dp: &mut Datapath, config: &AgentConfig) {
        let attached = std::mem::take(&mut self.attached);
        for (index, name) in attached {
            self.present(dp, config, index, &name);
        }
    }

    /// Every interface of ours, attached or not, for `status`.
    pub fn states(&self, config: &AgentConfig) -> Vec<InterfaceState> {
        let role = |name: &str| match config.node.uplinks.iter().any(|u| u == name) {
            true => Role::Uplink,
            false => Role::Pod,
        };
        let attached = self.attached.values().map(|name| InterfaceState {
            name: name.clone(),
            role: role(name),
            error: None,
        });
        let failed = self.failed.values().map(|(name, error)| InterfaceState {
            name: name.clone(),
            role: role(name),
            error: Some(error.clone()),
        });
        let mut states: Vec<InterfaceState> = attached.chain(failed).collect();
        states.sort_by(|a, b| {
            (a.role != Role::Uplink, &a.name).cmp(&(b.role != Role::Uplink, &b.name))
        });
        states
    }

    /// What is missing, one line per item; empty when everything of ours is attached.
    pub fn missing(&self, config: &AgentConfig) -> Vec<String> {
        let mut missing: Vec<String> = config
            .node
            .uplinks
            .iter()
            .filter(|u| !self.attached.values().any(|a| a == *u))
            .filter(|u| !self.failed.values().any(|(f, _)| f == *u))
            .map(|u| format!("uplink {u}: not present"))
            .collect();
        missing.extend(
            self.failed
                .values()
                .map(|(name, error)| format!("{name}: {error}")),
        );
        missing
    }
}

/// Attaches what an interface needs; returns whether it is one of ours.
fn attach_interface(datapath: &mut Datapath, config: &AgentConfig, name: &str) -> Result<bool> {
    if config.node.uplinks.iter().any(|u| u == name) {
        attach::attach_xdp(datapath, name, config.xdp_mode)?;
        attach::attach_tc(datapath, name, config.tc_attach, TcHook::NodeEgress)?;
        node::accept_local_sources(name).context("XDP attached, but accept_local is missing")?;
        return Ok(true);
    }
    if config.node.is_pod_interface(name) {
        attach::attach_tc(datapath, name, config.tc_attach, TcHook::PodIngress)?;
        attach::attach_tc(datapath, name, config.tc_attach, TcHook::NodeEgress)?;
        return Ok(true);
    }
    Ok(false)
}

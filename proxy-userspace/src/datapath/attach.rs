//! Attaching programs through bpf links pinned under `<pin-dir>/links/`, so that they
//! keep running while the agent is down, and so that a restarted (or upgraded) agent
//! swaps its programs in without a gap:
//! - XDP and tc (TCX) links are updated in place (`bpf_link_update`): atomic, no
//!   packet sees no program.
//! - cgroup socket hooks allow several programs: the new one is attached before the
//!   old one is unpinned. While both run the second finds nothing to translate (the
//!   first already pointed the socket at a backend).
//!
//! A pinned link whose interface went away is defunct: its update fails, so it is
//! replaced by a fresh attachment.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::programs::{
    links::{FdLink, LinkOrder, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions},
    xdp::XdpLink,
    CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode,
};
use tracing::{debug, info, warn};

use super::{loader::program, loader::Datapath, PROG_EGRESS, PROG_POD, PROG_SOCK_HOOKS};

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

fn pin_path(pin_dir: &Path, kind: &str, target: &str) -> PathBuf {
    links_dir(pin_dir).join(format!("{kind}-{target}"))
}

/// Replaces the program behind an existing pinned link, or attaches afresh and pins.
fn attach_pinned<P>(
    prog: &mut P,
    pin: &Path,
    replace: fn(&mut P, FdLink) -> Result<()>,
    attach: impl FnOnce(&mut P) -> Result<FdLink>,
) -> Result<()> {
    if pin.exists() {
        let replaced = PinnedLink::from_pin(pin)
            .map_err(anyhow::Error::from)
            .and_then(|pinned| replace(prog, pinned.into()));
        match replaced {
            Ok(()) => {
                debug!(link = %pin.display(), "replaced the program of a pinned link");
                return Ok(());
            }
            Err(e) => {
                warn!(link = %pin.display(), "pinned link is stale ({e:#}); attaching afresh");
                fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
            }
        }
    }
    let link = attach(prog)?;
    link.pin(pin)
        .with_context(|| format!("pinning link {}", pin.display()))?;
    Ok(())
}

pub fn attach_xdp(dp: &mut Datapath, iface: &str, mode: XdpMode) -> Result<()> {
    let pin = pin_path(&dp.pin_dir, "xdp", iface);
    fs::create_dir_all(links_dir(&dp.pin_dir))?;
    attach_pinned(
        dp.xdp()?,
        &pin,
        |xdp: &mut Xdp, link| {
            xdp.attach_to_link(XdpLink::try_from(link)?)?;
            Ok(())
        },
        |xdp| {
            let id = xdp
                .attach(iface, mode)
                .with_context(|| format!("attaching XDP to {iface} in {mode:?} mode"))?;
            Ok(xdp.take_link(id)?.try_into()?)
        },
    )
    .with_context(|| format!("XDP on {iface}"))?;
    info!(iface, ?mode, "XDP program attached");
    Ok(())
}

/// How the pod-interface program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcAttach {
    /// TCX when the kernel has it (6.6 and later), else netlink.
    #[default]
    Auto,
    /// A TCX link, pinned: survives the agent and is replaced atomically.
    Tcx,
    /// A classic clsact filter (kernels before 6.6). It also stays when the agent
    /// exits, but it cannot be pinned: a restarted agent removes it and attaches its
    /// own, which leaves the interface without the program for a moment.
    Netlink,
}

impl TcAttach {
    /// What `Auto` means on this kernel.
    pub fn resolved(self) -> TcAttach {
        match self {
            TcAttach::Auto => {
                let tcx = aya::util::KernelVersion::current()
                    .map_or(true, |v| v >= aya::util::KernelVersion::new(6, 6, 0));
                if tcx {
                    TcAttach::Tcx
                } else {
                    TcAttach::Netlink
                }
            }
            other => other,
        }
    }
}

/// The two tc programs: what pods send (ingress of their host-side interfaces), and
/// what the node sends out of uplinks and pod interfaces (egress: its own ICMP errors
/// about translated packets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcHook {
    PodIngress,
    NodeEgress,
}

impl TcHook {
    const ALL: [TcHook; 2] = [TcHook::PodIngress, TcHook::NodeEgress];

    fn program(self) -> &'static str {
        match self {
            TcHook::PodIngress => PROG_POD,
            TcHook::NodeEgress => PROG_EGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            TcHook::PodIngress => TcAttachType::Ingress,
            TcHook::NodeEgress => TcAttachType::Egress,
        }
    }

    /// The link's pin name prefix.
    fn pin_kind(self) -> &'static str {
        match self {
            TcHook::PodIngress => "tc",
            TcHook::NodeEgress => "tcegress",
        }
    }

    fn classifier(self, dp: &mut Datapath) -> Result<&mut SchedClassifier> {
        match self {
            TcHook::PodIngress => dp.tc(),
            TcHook::NodeEgress => dp.tc_egress(),
        }
    }
}

pub fn attach_tc(dp: &mut Datapath, iface: &str, how: TcAttach, hook: TcHook) -> Result<()> {
    if how.resolved() == TcAttach::Netlink {
        return attach_tc_netlink(dp, iface, hook);
    }
    let pin = pin_path(&dp.pin_dir, hook.pin_kind(), iface);
    fs::create_dir_all(links_dir(&dp.pin_dir))?;
    attach_pinned(
        hook.classifier(dp)?,
        &pin,
        |tc: &mut SchedClassifier, link| {
            tc.attach_to_link(SchedClassifierLink::try_from(link)?)?;
            Ok(())
        },
        |tc| {
            let options = TcAttachOptions::TcxOrder(LinkOrder::default());
            let id = tc
                .attach_with_options(iface, hook.attach_type(), options)
                .with_context(|| format!("attaching tc (TCX) {hook:?} to {iface}"))?;
            Ok(tc.take_link(id)?.try_into()?)
        },
    )
    .with_context(|| format!("tc {hook:?} on {iface}"))?;
    info!(iface, ?hook, "tc program attached");
    Ok(())
}

fn attach_tc_netlink(dp: &mut Datapath, iface: &str, hook: TcHook) -> Result<()> {
    // The clsact qdisc may be there already (a predecessor's, or the CNI's).
    let _ = tc::qdisc_add_clsact(iface);
    // A predecessor's filter of this program goes first (not pinnable, see TcAttach).
    let _ = tc::qdisc_detach_program(iface, hook.attach_type(), hook.program());
    let program = hook.classifier(dp)?;
    let id = program
        .attach_with_options(
            iface,
            hook.attach_type(),
            TcAttachOptions::Netlink(NlOptions {
                priority: 1,
                ..Default::default()
            }),
        )
        .with_context(|| format!("attaching tc (netlink clsact) {hook:?} to {iface}"))?;
    // Kept attached when the agent exits, as a pinned link would be.
    std::mem::forget(program.take_link(id)?);
    info!(iface, ?hook, "tc program attached (netlink)");
    Ok(())
}

/// Removes the tc programs' netlink filters (`TcAttach::Netlink`) from every
/// interface of this network namespace; there are none where TCX links were used.
fn detach_netlink_filters() {
    // SAFETY: if_nameindex returns an array terminated by a zero entry, freed below.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return;
        }
        let mut entry = list;
        while (*entry).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*entry).if_name).to_string_lossy();
            for hook in TcHook::ALL {
                if tc::qdisc_detach_program(&name, hook.attach_type(), hook.program()).is_ok() {
                    debug!(iface = %name, ?hook, "netlink tc filter removed");
                }
            }
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
}

/// Forgets an interface that went away (its links died with it).
pub fn forget_interface(pin_dir: &Path, iface: &str) {
    for kind in TcHook::ALL.map(TcHook::pin_kind).into_iter().chain(["xdp"]) {
        let _ = fs::remove_file(pin_path(pin_dir, kind, iface));
    }
}

/// The cgroup v2 hierarchy's root: the unified mount, or /sys/fs/cgroup itself.
pub fn default_cgroup_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup/unified");
    if unified.join("cgroup.procs").exists() {
        unified.to_owned()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

pub fn attach_sock_hooks(dp: &mut Datapath, cgroup: &Path) -> Result<()> {
    fs::create_dir_all(links_dir(&dp.pin_dir))?;
    let cgroup_dir =
        fs::File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    for name in PROG_SOCK_HOOKS {
        let hook: &mut CgroupSockAddr = program(&mut dp.ebpf, name)?;
        let id = hook
            // bpf links to cgroups always coexist with others; the kernel rejects
            // the legacy ALLOW_MULTI flag on link creation, so `Single` (no flag).
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        let link: FdLink = hook.take_link(id)?.try_into()?;
        let pin = pin_path(&dp.pin_dir, "cgroup", name);
        if pin.exists() {
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
        }
        link.pin(&pin)
            .with_context(|| format!("pinning link {}", pin.display()))?;
    }
    info!(cgroup = %cgroup.display(), "socket hooks attached");
    Ok(())
}

/// `ebpf-proxy cleanup`: unpins every link (which detaches its program), then the
/// maps (which frees them once no program holds them), then the directory.
pub fn cleanup(pin_dir: &Path) -> Result<()> {
    if !pin_dir.exists() {
        return Ok(());
    }
    detach_netlink_filters();
    let links = links_dir(pin_dir);
    let link_ids = pinned_link_ids(&links);
    for dir in [links.as_path(), pin_dir] {
        let Ok(entries) = fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_file() {
                fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    if links.exists() {
        fs::remove_dir(&links).with_context(|| format!("removing {}", links.display()))?;
    }
    fs::remove_dir(pin_dir).with_context(|| format!("removing {}", pin_dir.display()))?;
    wait_until_released(&link_ids);
    info!(pin_dir = %pin_dir.display(), "programs detached and maps unpinned");
    Ok(())
}

/// The kernel ids of the links pinned in `links`.
fn pinned_link_ids(links: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(links) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| PinnedLink::from_pin(entry.path()).ok())
        .filter_map(|link| FdLink::from(link).info().ok())
        .map(|info| info.id())
        .collect()
}

/// Waits (up to 5 s) until the kernel has let go of these links: removing a link's
/// last pin detaches its program only once the kernel frees the pin's inode, after
/// an RCU grace period, so "detached" is said when it is so, not just ordered.
fn wait_until_released(link_ids: &[u32]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let remaining = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .filter(|link| link_ids.contains(&link.id()))
            .count();
        if remaining == 0 {
            return;
        }
        if std::time::Instant::now() > deadline {
            warn!(remaining, "links still held by the kernel after 5 s");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

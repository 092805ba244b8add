//! Loading the eBPF object with its maps pinned under a bpffs directory. Maps that
//! are already pinned there (a previous agent's) are reused, which is what carries
//! services and conntrack across restarts.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::ProgramArray,
    programs::{Program, ProgramError, SchedClassifier, Xdp},
    Ebpf, EbpfLoader,
};

use super::{
    generation::Generation, IPV6_PROGRAMS, PROG_EGRESS, PROG_POD, PROG_POD_ICMP6, PROG_POD_SCTP,
    PROG_POD_SCTP6, PROG_POD_V6, PROG_UPLINK, PROG_UPLINK_ICMP6, PROG_UPLINK_SCTP,
    PROG_UPLINK_SCTP6, PROG_UPLINK_TUNNEL6, PROG_UPLINK_V6, TAIL_CALLED,
};
use proxy_common::{map_name, LoadSettings, SETTINGS_GLOBAL};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Fails with a clear message unless `dir` lies on a bpffs mount.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mount_point = dir
        .ancestors()
        .find(|p| p.exists())
        .context("pin directory has no existing ancestor")?;
    let c_path = CString::new(mount_point.as_os_str().as_bytes())?;
    // SAFETY: statfs on a valid NUL-terminated path into a zeroed struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", mount_point.display()));
    }
    if stat.f_type as i64 != BPF_FS_MAGIC {
        bail!(
            "{} is not on a bpf filesystem: mount one first (mount -t bpf bpf /sys/fs/bpf) \
             or choose --pin-dir under an existing bpffs",
            mount_point.display()
        );
    }
    Ok(())
}

pub struct Datapath {
    pub ebpf: Ebpf,
    pub pin_dir: PathBuf,
    /// Which object was loaded.
    pub generation: Generation,
}

/// Map sizes an operator may change (`run --max-services` …). They take effect when
/// the maps are created; pinned maps keep the size they were created with (a
/// different size is refused, see `layout`).
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            services: proxy_common::MAX_SERVICES,
            backends: proxy_common::MAX_BACKENDS,
            conntrack: proxy_common::CONNTRACK_ENTRIES,
        }
    }
}

impl MapSizes {
    /// Every sized map and its size.
    pub fn by_map(&self) -> [(&'static str, u32); 9] {
        [
            (map_name::SERVICES, self.services),
            (map_name::SERVICE_ADDRS, self.services),
            (map_name::RR_CURSORS, self.services),
            (map_name::SERVICE_STATS, self.services),
            (map_name::SERVICE_NAMES, self.services),
            (map_name::BACKEND_SLOTS, self.backends),
            (map_name::BACKEND_STATS, self.backends),
            (map_name::CONN_COUNTS, self.backends),
            (map_name::CONNTRACK, self.conntrack),
        ]
    }
}

impl Datapath {
    /// Whether the maps are still pinned where this data path pinned them (someone
    /// may remove the directory, or a map's pin, while the agent runs).
    pub fn pins_intact(&self) -> bool {
        self.pinned_maps()
            .all(|(name, _)| self.pin_dir.join(name).exists())
    }

    /// The maps, without the data sections aya also models as maps (`.rodata`:
    /// the load-time settings, which belong to this load and are never pinned).
    fn pinned_maps(&self) -> impl Iterator<Item = (&str, &aya::maps::Map)> {
        self.ebpf.maps().filter(|(name, _)| !name.starts_with('.'))
    }

    /// Pins again the maps whose pins were removed, from the descriptors this data
    /// path holds: their contents (services, conntrack) were never lost, only their
    /// names. Returns how many were re-pinned. Links pinned in the directory are gone
    /// for good (their programs were detached): interfaces need attaching again.
    pub fn restore_pins(&self) -> Result<usize> {
        std::fs::create_dir_all(&self.pin_dir)
            .with_context(|| format!("creating pin directory {}", self.pin_dir.display()))?;
        let mut restored = 0;
        for (name, map) in self.pinned_maps() {
            let path = self.pin_dir.join(name);
            if !path.exists() {
                map.pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
                restored += 1;
            }
        }
        Ok(restored)
    }

    /// Loads (but does not attach) every program, pinning maps in `pin_dir`.
    pub fn load(pin_dir: &Path) -> Result<Datapath> {
        Datapath::load_sized(pin_dir, MapSizes::default())
    }

    pub fn load_sized(pin_dir: &Path, sizes: MapSizes) -> Result<Datapath> {
        Datapath::load_configured(
            pin_dir,
            sizes,
            LoadSettings::DEFAULT,
            Generation::of_this_kernel()?,
        )
    }

    /// Loads `generation`'s object with `settings` in the programs' read-only data.
    pub fn load_configured(
        pin_dir: &Path,
        sizes: MapSizes,
        settings: LoadSettings,
        generation: Generation,
    ) -> Result<Datapath> {
        ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating pin directory {}", pin_dir.display()))?;
        super::layout::check_pinned_maps(pin_dir, &sizes)?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(pin_dir);
        for (name, size) in sizes.by_map() {
            loader.map_max_entries(name, size);
        }
        loader.override_global(SETTINGS_GLOBAL, &settings, true);
        let mut ebpf = loader
            .load(generation.object())
            .context("loading the eBPF object (maps pinned in an incompatible layout? run `ebpf-proxy cleanup`)")?;
        super::widen::carry_over(pin_dir, &mut ebpf)?;
        // IPv6's programs only where the verifier takes them: 5.10's walks more
        // than a million instructions through the IPv6 uplink program, so the legacy
        // object's are left unloaded, and its main programs pass IPv6 untouched (a
        // tail call into an empty slot falls through), as before IPv6 was served.
        let ipv6 = generation != Generation::Legacy;
        let wanted = |name: &str| ipv6 || !IPV6_PROGRAMS.contains(&name);
        verify_side_by_side(&mut ebpf, wanted)?;
        // SCTP's and IPv6's programs, where the main ones tail-call them; replaces a
        // previous agent's in the pinned arrays (theirs served until now), last, once
        // every program of this load was verified: a load that fails leaves them
        // serving.
        for (array, name, slot) in TAIL_CALLED.into_iter().filter(|(_, name, _)| wanted(name)) {
            let fd = ebpf
                .program(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .fd()
                .with_context(|| format!("{name} is not loaded"))?
                .try_clone()
                .context("duplicating a program descriptor")?;
            let mut programs = ProgramArray::try_from(
                ebpf.map_mut(array)
                    .with_context(|| format!("map {array} missing from the object"))?,
            )
            .with_context(|| format!("{array} is not a program array"))?;
            programs
                .set(slot, &fd, 0)
                .with_context(|| format!("putting {name} in {array}"))?;
        }
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.to_owned(),
            generation,
        })
    }

    pub fn xdp(&mut self) -> Result<&mut Xdp> {
        program(&mut self.ebpf, PROG_UPLINK)
    }

    pub fn tc(&mut self) -> Result<&mut SchedClassifier> {
        program(&mut self.ebpf, PROG_POD)
    }

    pub fn tc_egress(&mut self) -> Result<&mut SchedClassifier> {
        program(&mut self.ebpf, PROG_EGRESS)
    }
}

pub fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

/// The programs in the order they are verified: the longest verifications first (on
/// 6.18, 2026-12-05: `uplink_ingress_v6` about 280 ms, the next ones 60 to 130 ms,
/// the socket hooks' for IPv4 about 20 ms, the rest a few), so that no long
/// verification starts last while the other CPUs sit idle.
const VERIFICATION_ORDER: [&str; 20] = [
    PROG_UPLINK_V6,
    PROG_UPLINK_TUNNEL6,
    PROG_POD_V6,
    PROG_UPLINK,
    PROG_UPLINK_SCTP6,
    "sock_sendmsg6",
    "sock_connect6",
    PROG_POD_SCTP6,
    PROG_POD,
    PROG_UPLINK_SCTP,
    PROG_POD_SCTP,
    "sock_sendmsg4",
    "sock_connect4",
    PROG_EGRESS,
    PROG_UPLINK_ICMP6,
    PROG_POD_ICMP6,
    "sock_getpeername6",
    "sock_recvmsg6",
    "sock_getpeername4",
    "sock_recvmsg4",
];

/// Loads every `wanted` program of the object. Each is a verifier run of its own, most
/// of the agent's start (1.1 s of CPU in all on this project's 2-CPU machine, 4 s
/// before the verifier work of 2026-12-05; 0.2 s for everything else): they run side
/// by side, one thread per CPU, each taking the next program in `VERIFICATION_ORDER`
/// when it is done with one.
fn verify_side_by_side(ebpf: &mut Ebpf, wanted: impl Fn(&str) -> bool) -> Result<()> {
    let mut programs: Vec<(&str, &mut Program)> = ebpf
        .programs_mut()
        .filter(|(name, _)| wanted(name))
        .collect();
    programs.sort_by_key(|(name, _)| {
        VERIFICATION_ORDER
            .iter()
            .position(|listed| listed == name)
            .unwrap_or(VERIFICATION_ORDER.len())
    });
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(programs.len());
    let queue = Mutex::new(programs.into_iter());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let next = queue.lock().expect("no worker panics holding it").next();
                        let Some((name, program)) = next else {
                            return Ok(());
                        };
                        verify(name, || load(program))?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|worker| worker.join().expect("a verifier thread panicked"))
    })
}

/// Loads a program of the types the object holds.
fn load(program: &mut Program) -> Result<(), ProgramError> {
    match program {
        Program::Xdp(xdp) => xdp.load(),
        Program::SchedClassifier(tc) => tc.load(),
        Program::CgroupSockAddr(hook) => hook.load(),
        _ => Err(ProgramError::UnexpectedProgramType),
    }
}

/// Loads (verifies) a program with this thread's signals blocked, and again if the
/// verifier was interrupted all the same: the kernel abandons verification with
/// EAGAIN when a signal is pending for the loading thread (a child process exiting in
/// a process that handles SIGCHLD, as tokio's process driver does, hit the tests), and
/// the uplink program's verification takes long enough to meet one. Blocked signals
/// stay pending and are delivered when the mask is restored.
fn verify(what: &str, mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<()> {
    const ATTEMPTS: u32 = 10;
    let mut attempt = 1;
    loop {
        let result = with_signals_blocked(&mut load);
        match result {
            Err(ProgramError::LoadError { io_error, .. })
                if attempt < ATTEMPTS && io_error.raw_os_error() == Some(libc::EAGAIN) =>
            {
                // Signals come in bursts (children exiting together): let one pass.
                std::thread::sleep(std::time::Duration::from_millis(20 * u64::from(attempt)));
                attempt += 1;
            }
            result => return result.with_context(|| format!("verifying {what}")),
        }
    }
}

fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t values are plain data initialised by sigfillset/pthread_sigmask;
    // the previous mask is restored before returning.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        result
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_verification_order_names_every_program_once() {
        let object = aya_obj::Object::parse(Generation::Current.object()).expect("an object");
        let programs: BTreeSet<&str> = object.programs.keys().map(String::as_str).collect();
        let ordered: BTreeSet<&str> = VERIFICATION_ORDER.into_iter().collect();
        assert_eq!(
            ordered.len(),
            VERIFICATION_ORDER.len(),
            "a program listed twice"
        );
        assert_eq!(ordered, programs);
    }
}

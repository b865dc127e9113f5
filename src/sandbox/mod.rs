//! Where what an image or a tarball holds is run or parsed, holding no privilege on the
//! build host: the tarball's check, the extraction and the bake's provisioners each run in a
//! child of this binary that enters such a sandbox before it reads a byte of them.
//!
//! The walls, and the attack each one stops:
//! - **Root in the image is nobody on the host** (`ids`): a user namespace whose ids
//!   0–65535 are a range of host ids no account uses, picked and locked per run, and the
//!   image seen through a mount idmapped the same way, so owners on disk stay what the image
//!   says. Whatever seam nobody listed, the code behind it is an unprivileged user of the
//!   host: it owns no host file and holds no capability over anything of the host's.
//! - **A new session, no controlling terminal, no inherited descriptor**: stdio are pipes or
//!   /dev/null. A program cannot open the operator's terminal (`/dev/tty` answers ENXIO) to
//!   push a command into it (TIOCSTI) or write escape sequences to it.
//! - **nodev and nosuid on the image** (`mounts`): a device node the base image holds
//!   (a host disk's numbers) opens nothing; a set-id bit lifts nobody.
//! - **A seccomp deny-list** (`seccomp`): what container runtimes deny by default (TIOCSTI,
//!   keyrings, BPF, modules, mounts, namespaces, ...), answered EPERM.
//! - **Namespaces of its own**: mounts (nothing it mounts reaches the host, nothing the host
//!   mounted is followed into the image), PID (it sees only its own processes, and all of
//!   them die with it), IPC, UTS and network: no route anywhere unless asked for, and then
//!   the outside through pasta (`network`), never the host's loopback services or abstract
//!   sockets; the credential endpoints out of reach either way (`credential_guard`).
//! - **The image as the root** through `pivot_root`, no host tree above it; for
//!   provisioners a fresh /proc of their own PID namespace (its kernel knobs read-only), a
//!   read-only /sys, a /dev of the usual character devices only, a devpts of their own and a
//!   tmpfs /run. The extraction sees no /proc, /sys or /dev; the tarball's check, an empty
//!   read-only directory.
//! - **Few capabilities**: a provisioner keeps what a package install needs; the extraction
//!   what creating and owning files needs; the check none.
//! - **Another architecture's programs** run through qemu registered in the sandbox's own
//!   binfmt_misc (`emulator`), never the host's.
//!
//! `Isolation::Compat`, for kernels before 5.12, keeps every wall but the first: root in the
//! sandbox is then root on the host, held by the others. A run says so and records it.
//!
//! These functions run in a process that is still single-threaded (before any async
//! runtime starts): they fork.

pub mod credential_guard;
pub mod emulator;
pub mod ids;
mod mounts;
pub mod network;
mod seccomp;

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use rustix::mount::MountPropagationFlags;
use rustix::thread::{CapabilitySet, CapabilitySets, UnshareFlags};

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the sandbox in the image at {root}: {action}: {source}")]
pub struct SandboxError {
    root: String,
    action: String,
    source: std::io::Error,
}

/// What the sandboxed code may do.
#[derive(Debug, Clone)]
pub enum Purpose {
    /// Unpack files: create, own and date them.
    Extract,
    /// Read a tarball, and nothing else: the root is an empty directory, and no
    /// capability is kept.
    Check,
    /// Run a provisioner's command, as root of the image; with `outside`, its network
    /// reaches the world through pasta (and `credential_guard`, joined by the caller, keeps
    /// it from the host's credentials unless allowed); with `emulator`, the image's programs
    /// are of another architecture and run through it.
    Provision {
        outside: Option<network::Outside>,
        emulator: Option<emulator::Emulator>,
    },
}

/// Who root in the sandbox is on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Host ids `base..base + ids::IDS`, a range the run holds (`ids::IdRange`): nobody.
    OwnIds { base: u32 },
    /// Root, held by the other walls only: `sandbox = "compat"`, for kernels before 5.12.
    Compat,
}

/// An isolation argument that is neither `ids:BASE` nor `compat`.
#[derive(Debug, thiserror::Error)]
#[error("`{0}`: expected ids:BASE (a number) or compat")]
pub struct IsolationArgError(String);

impl Isolation {
    /// How the internal commands are told: `ids:BASE` or `compat`.
    pub fn to_arg(self) -> String {
        match self {
            Isolation::OwnIds { base } => format!("ids:{base}"),
            Isolation::Compat => "compat".into(),
        }
    }

    pub fn from_arg(arg: &str) -> Result<Isolation, IsolationArgError> {
        let bad = || IsolationArgError(arg.to_string());
        match arg.split_once(':') {
            None if arg == "compat" => Ok(Isolation::Compat),
            Some(("ids", base)) => base
                .parse()
                .map(|base| Isolation::OwnIds { base })
                .map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

/// The isolation a run gets, decided before it makes anything: its own host ids (the
/// kernel checked, a free range picked and held until the returned range is dropped), or
/// root held by the other walls where the run opts in to `compat`.
pub fn for_run(compat: bool) -> Result<(Isolation, Option<ids::IdRange>), ids::IdsError> {
    if compat {
        return Ok((Isolation::Compat, None));
    }
    ids::check_kernel()?;
    let range = ids::IdRange::pick()?;
    Ok((Isolation::OwnIds { base: range.base() }, Some(range)))
}

/// Capabilities a provisioner keeps: what a package install uses (Docker's default set),
/// less MKNOD (no device cgroup here guards what a new node would reach) and NET_RAW. With
/// `Isolation::OwnIds` they are its user namespace's, over the image's files only.
const PROVISION_CAPABILITIES: CapabilitySet = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::FSETID)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::SETUID)
    .union(CapabilitySet::SETFCAP)
    .union(CapabilitySet::SETPCAP)
    .union(CapabilitySet::NET_BIND_SERVICE)
    .union(CapabilitySet::SYS_CHROOT)
    .union(CapabilitySet::KILL)
    .union(CapabilitySet::AUDIT_WRITE);

/// Capabilities the extraction keeps: create files anywhere in the image, give them owners,
/// modes and times. FSETID lets a mode keep the setgid bit of a directory given to another
/// group; which set-id bits a file may keep is the extraction's own decision.
const EXTRACT_CAPABILITIES: CapabilitySet = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::FSETID);

/// Leaves the host's namespaces and enters the image at `root`. Returns only in the
/// sandboxed process (PID 1 of its namespace); the process that called it waits for that
/// one and exits with its status, so the caller's parent sees one child as before.
pub fn enter(root: &Path, purpose: &Purpose, isolation: Isolation) -> Result<(), SandboxError> {
    let fail = |action: &str| failure(root, action);
    close_inherited_descriptors().map_err(fail("close inherited descriptors"))?;
    let (userns, owner) = match isolation {
        Isolation::OwnIds { base } => (
            Some(ids::user_namespace(base).map_err(fail("make its user namespace"))?),
            Some(base),
        ),
        Isolation::Compat => (None, None),
    };
    let emulator = open_emulator(root, purpose, userns.is_some())?;
    // The host's network namespace, where pasta must start.
    let host_net = match purpose {
        Purpose::Provision {
            outside: Some(_), ..
        } => Some(OwnedFd::from(
            std::fs::File::open("/proc/self/ns/net")
                .map_err(fail("open the host's network namespace"))?,
        )),
        _ => None,
    };
    let namespaces = UnshareFlags::NEWNS
        | UnshareFlags::NEWPID
        | UnshareFlags::NEWIPC
        | UnshareFlags::NEWUTS
        | UnshareFlags::NEWNET;
    // SAFETY: no other thread exists (see the module's note), and FILES is not unshared.
    unsafe { rustix::thread::unshare_unsafe(namespaces) }
        .map_err(|e| fail("unshare namespaces")(e.into()))?;
    let parent = wait_in_parent_of_pid_one(root)?;

    // From here on: PID 1 of the new PID namespace.
    rustix::process::setsid().map_err(|e| fail("start a session of its own")(e.into()))?;
    if let (
        Purpose::Provision {
            outside: Some(outside),
            ..
        },
        Some(host_net),
    ) = (purpose, host_net)
    {
        let pid = network::connect(outside, &host_net)
            .map_err(|e| fail("reach the outside")(std::io::Error::other(e)))?;
        let _ = NETWORK_HELPER.set(pid);
    }
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|e| fail("make mounts private")(e.into()))?;
    mounts::make_root(root, purpose, userns.as_ref(), owner)
        .map_err(fail("make the image the root"))?;
    if let Some(userns) = userns {
        ids::become_root_in(&userns).map_err(fail("become root of its user namespace"))?;
    }
    if let Some((emulator, interpreter)) = emulator {
        emulator.register(&interpreter).map_err(fail(&format!(
            "register {} for its {} programs in the sandbox's binfmt_misc",
            emulator.interpreter.display(),
            emulator.architecture
        )))?;
    }
    // After the change of ids, which clears it; then whether the parent died meanwhile (its
    // parent is outside the new PID namespace, so getppid cannot tell).
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| fail("follow the parent's death")(e.into()))?;
    if parent.as_ref().is_some_and(parent_gone) {
        std::process::exit(1);
    }
    drop(parent);
    seccomp::apply().map_err(|e| fail("install the seccomp filter")(std::io::Error::other(e)))?;
    let keep = match purpose {
        Purpose::Extract => EXTRACT_CAPABILITIES,
        Purpose::Check => CapabilitySet::empty(),
        Purpose::Provision { .. } => PROVISION_CAPABILITIES,
    };
    keep_only(keep).map_err(fail("drop capabilities"))?;
    Ok(())
}

/// How `enter` fails at `action`.
fn failure(root: &Path, action: &str) -> impl Fn(std::io::Error) -> SandboxError {
    let root = root.display().to_string();
    let action = action.to_string();
    move |source: std::io::Error| SandboxError {
        root: root.clone(),
        action: action.clone(),
        source,
    }
}

/// The emulator a provisioning sandbox runs the image's programs through, opened while the
/// host's tree is in view. It is registered only in a user namespace of the sandbox's own:
/// root of the host's own would register it for the whole host.
fn open_emulator<'a>(
    root: &Path,
    purpose: &'a Purpose,
    own_user_namespace: bool,
) -> Result<Option<(&'a emulator::Emulator, OwnedFd)>, SandboxError> {
    let Purpose::Provision {
        emulator: Some(emulator),
        ..
    } = purpose
    else {
        return Ok(None);
    };
    if !own_user_namespace {
        return Err(failure(root, &format!("run its {} programs", emulator.architecture))(
            std::io::Error::other(
                "an emulator is registered only in a user namespace of the sandbox's own (not with sandbox compat)",
            ),
        ));
    }
    let interpreter = emulator.open().map_err(failure(
        root,
        &format!(
            "open {}, the emulator of its {} programs",
            emulator.interpreter.display(),
            emulator.architecture
        ),
    ))?;
    Ok(Some((emulator, interpreter)))
}

/// Closes every descriptor but stdin, stdout and stderr: whatever this binary's own caller
/// left open (a terminal, a socket) must not reach the image.
fn close_inherited_descriptors() -> std::io::Result<()> {
    // SAFETY: closes descriptors this process owns; none is in use by Rust code here.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::ENOSYS) {
        return Err(e);
    }
    // Before Linux 5.9: one by one, as /proc lists them (the listing's own included,
    // which a failed close of skips).
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in open {
        // SAFETY: as above.
        unsafe { libc::close(fd) };
    }
    Ok(())
}

/// pasta's PID, in a sandbox with the outside: a helper of the sandbox's, never what the
/// command left running.
static NETWORK_HELPER: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// pasta's PID in this sandbox's PID namespace, once it runs.
fn network_helper() -> Option<u32> {
    NETWORK_HELPER.get().copied()
}

/// How long what a command left running gets to exit on SIGTERM before the namespace ends
/// and the kernel kills it.
const LEFTOVER_EXIT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `argv` in the sandbox entered for `Purpose::Provision`, as PID 1's child, and exits
/// with its status. What it left running (a daemon a package started) is named on stdout,
/// asked to stop, and then dies with the namespace: nothing outlives the command.
pub fn run_and_exit(argv: &[String]) -> ! {
    let Some((program, args)) = argv.split_first() else {
        eprintln!("error: no command to run in the image");
        std::process::exit(2);
    };
    let code = match std::process::Command::new(program).args(args).status() {
        Ok(status) => exit_code(status),
        Err(e) => {
            eprintln!("error: cannot run {program} in the image: {e}");
            127
        }
    };
    let left = processes_left();
    if !left.is_empty() {
        println!(
            "amibake: ended what was left running in the image: {}",
            left.join(", ")
        );
        // SAFETY: kill(-1) from PID 1 reaches every other process of this namespace only.
        unsafe { libc::kill(-1, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + LEFTOVER_EXIT_GRACE;
        while std::time::Instant::now() < deadline && !processes_left().is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    std::process::exit(code)
}

/// The other live processes of this PID namespace, "pid 7 (php-fpm)", after reaping the
/// orphans it inherited.
fn processes_left() -> Vec<String> {
    // SAFETY: reaps any exited child of ours without blocking.
    while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut left: Vec<(u32, String)> = procs
        .flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(p.path().join("stat")).ok()?;
            // "7 (name) S ...": the state follows the name's closing parenthesis.
            let state = stat.rsplit_once(") ")?.1.chars().next()?;
            let name = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            let ours = pid == 1 || network_helper() == Some(pid);
            (!ours && state != 'Z').then(|| (pid, name.trim().to_string()))
        })
        .collect();
    left.sort();
    left.into_iter()
        .map(|(pid, name)| format!("pid {pid} ({name})"))
        .collect()
}

/// Starts the process `command` makes in a session of its own, with no controlling
/// terminal (so not even this binary's side of the sandbox holds the operator's), and makes
/// it die with the thread that starts it: a run killed with SIGKILL takes its sandboxes
/// (and, through their PID 1, all they run) with it, instead of leaving a provisioner
/// holding the image's mount. Its session is its process group too: killing that group
/// ends it.
pub fn detach_and_die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: setsid and prctl are async-signal-safe, as code between fork and exec must be.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Forks; the parent waits for the child (PID 1 of the new namespace) and exits as it did.
/// The child dies with the parent: PID 1 gone, the kernel kills the whole namespace.
/// Returns, in the child, a pidfd of the parent: `parent_gone` tells from it whether the
/// parent died before the child's parent-death signal was (last) set. None on kernels
/// before 5.3, which have no pidfds (the window is then the few instructions between).
fn wait_in_parent_of_pid_one(root: &Path) -> Result<Option<OwnedFd>, SandboxError> {
    let parent = match rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    ) {
        Ok(fd) => Some(fd),
        Err(rustix::io::Errno::NOSYS) => None,
        Err(e) => {
            return Err(SandboxError {
                root: root.display().to_string(),
                action: "open a pidfd of itself".into(),
                source: e.into(),
            })
        }
    };
    // SAFETY: single-threaded (see the module's note), so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SandboxError {
            root: root.display().to_string(),
            action: "fork".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if pid == 0 {
        // SAFETY: a plain prctl call.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            std::process::exit(1);
        }
        return Ok(parent);
    }
    drop(parent);
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid place to write.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            std::process::exit(1);
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    std::process::exit(code)
}

/// Whether the process `pidfd` names has exited: its pidfd is then readable.
fn parent_gone(pidfd: &OwnedFd) -> bool {
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let ready = unsafe { libc::poll(&mut poll, 1, 0) };
    ready > 0
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Keeps only `keep` of this process's capabilities, for it and whatever it runs.
fn keep_only(keep: CapabilitySet) -> std::io::Result<()> {
    for cap in CapabilitySet::all().difference(keep).iter() {
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            // A capability this kernel does not know.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }
    }
    rustix::thread::set_capabilities(
        None,
        CapabilitySets {
            effective: keep,
            permitted: keep,
            inheritable: CapabilitySet::empty(),
        },
    )?;
    Ok(())
}

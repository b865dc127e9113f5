//! Running code inside an image without letting it reach the build host.
//!
//! Both the extraction and the bake's provisioners run in a child of this binary that first
//! leaves the host's namespaces: its own mount namespace (nothing it mounts reaches the host,
//! nothing the host has mounted is followed into the image), its own PID namespace (it sees
//! only its own processes, and everything it started dies with it), its own IPC and UTS
//! namespaces, and unless asked for, its own network namespace with no route anywhere (so
//! the build host's instance metadata, and with it its credentials, is out of reach; with
//! the host's network, `credential_guard` keeps them out of reach).
//!
//! Provisioners get the image as their root through `pivot_root`, so there is no host tree
//! left above it to escape to, with a fresh /proc of their own PID namespace (read-only
//! where the kernel's knobs are), a read-only /sys, a /dev holding only the usual character
//! devices (no host disk), a devpts of their own and a tmpfs /run; and only the capabilities
//! a package install needs. The extraction gets no /proc, /sys or /dev at all and only the
//! capabilities to create files and give them owners; the tarball's check before it, an
//! empty directory as its root and no capabilities at all.
//!
//! These functions run in a process that is still single-threaded (before any async
//! runtime starts): they fork.

use std::os::fd::AsRawFd;
use std::path::Path;

use rustix::fs::{FileType, Mode};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::{CapabilitySet, CapabilitySets, UnshareFlags};

pub mod credential_guard;

use crate::host::image_root::ImageRoot;

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the sandbox in the image at {root}: {action}: {source}")]
pub struct SandboxError {
    root: String,
    action: String,
    source: std::io::Error,
}

/// What the sandboxed code may do.
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// Unpack files: create, own and date them.
    Extract,
    /// Read a tarball, and nothing else: the root is an empty directory, and no
    /// capability is kept.
    Check,
    /// Run a provisioner's command, as root of the image; `network` shares the host's
    /// (which `credential_guard` keeps from the host's credentials, unless allowed).
    Provision { network: bool },
}

/// Capabilities a provisioner keeps: what a package install uses (Docker's default set),
/// less MKNOD (no device cgroup here guards what a new node would reach) and NET_RAW.
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

/// The kernel's knobs under the provisioners' /proc, made read-only: written by a root
/// process, these act on the whole host (core_pattern runs a program as the host's root).
const PROC_READ_ONLY: [&str; 5] = ["sys", "sysrq-trigger", "irq", "bus", "fs"];
/// Files under /proc that tell the host's secrets (kernel memory, keys) or timing: hidden.
const PROC_HIDDEN: [&str; 3] = ["kcore", "keys", "timer_list"];
/// The character devices of the provisioners' /dev: (name, major, minor).
const DEVICES: [(&str, u32, u32); 6] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];
const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

/// Leaves the host's namespaces and enters the image at `root`. Returns only in the
/// sandboxed process (PID 1 of its namespace); the process that called it waits for that
/// one and exits with its status, so the caller's parent sees one child as before.
pub fn enter(root: &Path, purpose: Purpose) -> Result<(), SandboxError> {
    let fail = |action: &str| {
        let root = root.display().to_string();
        let action = action.to_string();
        move |source: std::io::Error| SandboxError {
            root: root.clone(),
            action: action.clone(),
            source,
        }
    };
    let mut namespaces =
        UnshareFlags::NEWNS | UnshareFlags::NEWPID | UnshareFlags::NEWIPC | UnshareFlags::NEWUTS;
    if !matches!(purpose, Purpose::Provision { network: true }) {
        namespaces |= UnshareFlags::NEWNET;
    }
    // SAFETY: no other thread exists (see the module's note), and FILES is not unshared.
    unsafe { rustix::thread::unshare_unsafe(namespaces) }
        .map_err(|e| fail("unshare namespaces")(e.into()))?;
    wait_in_parent_of_pid_one(root)?;

    // From here on: PID 1 of the new PID namespace.
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
        .map_err(|e| fail("follow the parent's death")(e.into()))?;
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(|e| fail("make mounts private")(e.into()))?;
    match purpose {
        Purpose::Extract | Purpose::Check => {
            let image = ImageRoot::open(root).map_err(fail("open the image"))?;
            rustix::process::fchdir(image.fd()).map_err(|e| fail("enter the image")(e.into()))?;
            rustix::process::chroot(".").map_err(|e| fail("chroot")(e.into()))?;
            let keep = match purpose {
                Purpose::Extract => EXTRACT_CAPABILITIES,
                _ => CapabilitySet::empty(),
            };
            keep_only(keep).map_err(fail("drop capabilities"))?;
            rustix::thread::set_no_new_privs(true)
                .map_err(|e| fail("set no_new_privs")(e.into()))?;
        }
        Purpose::Provision { .. } => {
            mount_provisioning_filesystems(root).map_err(fail("mount the image's filesystems"))?;
            pivot_into(root).map_err(fail("make the image the root"))?;
            keep_only(PROVISION_CAPABILITIES).map_err(fail("drop capabilities"))?;
        }
    }
    Ok(())
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
            (pid != 1 && state != 'Z').then(|| (pid, name.trim().to_string()))
        })
        .collect();
    left.sort();
    left.into_iter()
        .map(|(pid, name)| format!("pid {pid} ({name})"))
        .collect()
}

/// Makes the process `command` starts die with the thread that starts it: a run killed with
/// SIGKILL takes its sandboxes (and, through their PID 1, all they run) with it, instead of
/// leaving a provisioner holding the image's mount.
pub fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe, as code between fork and exec must be.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Forks; the parent waits for the child (PID 1 of the new namespace) and exits as it did.
/// The child dies with the parent: PID 1 gone, the kernel kills the whole namespace.
fn wait_in_parent_of_pid_one(root: &Path) -> Result<(), SandboxError> {
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
        // SAFETY: a plain prctl call. (Its parent is outside the new PID namespace, so
        // getppid cannot tell whether it already died: the window is the few instructions
        // since the fork.)
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            std::process::exit(1);
        }
        return Ok(());
    }
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

/// The path through which a mount reaches exactly the directory `fd` was opened on.
fn fd_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// The provisioners' /proc, /sys, /dev and /run, mounted in this (private) namespace only.
/// Each target is checked to be a real directory of the image, and mounted through its fd.
fn mount_provisioning_filesystems(root: &Path) -> std::io::Result<()> {
    // A mount point of its own, so it can become the root; the image reopened on it.
    rustix::mount::mount_bind(root, root)?;
    let image = ImageRoot::open(root)?;
    let none = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;

    let proc_dir = image.mount_target("/proc")?;
    rustix::mount::mount("proc", fd_path(&proc_dir), "proc", none, None)?;
    // Our own fresh mounts from here on: the kernel's files, no symlinks of the image.
    let proc = root.join("proc");
    for knob in PROC_READ_ONLY {
        let path = proc.join(knob);
        if path.exists() {
            rustix::mount::mount_bind(&path, &path)?;
            rustix::mount::mount_remount(&path, MountFlags::BIND | MountFlags::RDONLY | none, "")?;
        }
    }
    for secret in PROC_HIDDEN {
        let path = proc.join(secret);
        if path.exists() {
            rustix::mount::mount_bind("/dev/null", &path)?;
        }
    }

    let sys = image.mount_target("/sys")?;
    rustix::mount::mount(
        "sysfs",
        fd_path(&sys),
        "sysfs",
        none | MountFlags::RDONLY,
        None,
    )?;

    let dev_dir = image.mount_target("/dev")?;
    rustix::mount::mount(
        "tmpfs",
        fd_path(&dev_dir),
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        Some(c"mode=0755"),
    )?;
    let dev = ImageRoot::open(&root.join("dev"))?;
    rustix::process::umask(Mode::empty());
    for (name, major, minor) in DEVICES {
        rustix::fs::mknodat(
            dev.fd(),
            name,
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            rustix::fs::makedev(major, minor),
        )?;
    }
    for (name, target) in DEV_LINKS {
        rustix::fs::symlinkat(target, dev.fd(), name)?;
    }
    for dir in ["pts", "shm"] {
        rustix::fs::mkdirat(dev.fd(), dir, Mode::from_raw_mode(0o755))?;
    }
    rustix::process::umask(Mode::from_raw_mode(0o022));
    let pts = root.join("dev/pts");
    rustix::mount::mount(
        "devpts",
        &pts,
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        Some(c"newinstance,ptmxmode=0666,mode=0620"),
    )?;
    let shm = root.join("dev/shm");
    rustix::mount::mount("tmpfs", &shm, "tmpfs", none, Some(c"mode=1777"))?;

    let run = image.mount_target("/run")?;
    rustix::mount::mount(
        "tmpfs",
        fd_path(&run),
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some(c"mode=0755"),
    )?;
    Ok(())
}

/// Makes the mount at `root` this namespace's root and drops the host's tree from it.
fn pivot_into(root: &Path) -> std::io::Result<()> {
    std::env::set_current_dir(root)?;
    // pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only
    // the image.
    rustix::process::pivot_root(".", ".")?;
    rustix::mount::unmount(".", UnmountFlags::DETACH)?;
    std::env::set_current_dir("/")?;
    Ok(())
}

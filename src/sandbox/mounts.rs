//! What the sandbox sees: the image as its root, sealed, and the few filesystems a
//! provisioner needs, all in the sandbox's own mount namespace.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use rustix::fs::{FileType, Mode};
use rustix::mount::{MountFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags};

use super::Purpose;
use crate::host::image_root::ImageRoot;

/// Makes the mount at `root` the sandbox's root for `purpose`, as this namespace's
/// (still privileged) PID 1: a mount point of its own; the image sealed (`seal`); for a
/// provisioner, /proc, /sys, /dev and /run; then `pivot_root`, which leaves no host tree above
/// it. `userns` idmaps the image (root of that namespace owns what root owns on disk);
/// `owner` is the host id the sandbox's root will be, which owns the filesystems made here.
pub fn make_root(
    root: &Path,
    purpose: &Purpose,
    userns: Option<&OwnedFd>,
    owner: Option<u32>,
) -> std::io::Result<()> {
    // Recursive: the image's own /boot and /boot/efi are mounts under its root.
    rustix::mount::mount_bind_recursive(root, root)?;
    if let Purpose::Provision { .. } = purpose {
        // Made now, on the image as it is: through an idmapped mount, a directory made by
        // the host's root would have an owner the image cannot name.
        let image = ImageRoot::open(root)?;
        for dir in ["/proc", "/sys", "/dev", "/run"] {
            image.mount_target(dir)?;
        }
    }
    match (purpose, userns) {
        (Purpose::Check, _) => rustix::mount::mount_remount(
            root,
            MountFlags::BIND | MountFlags::RDONLY | NOTHING_RUNS,
            "",
        )?,
        (_, Some(userns)) => idmap(root, userns)?,
        (_, None) => rustix::mount::mount_remount(
            root,
            MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV | kept_flags(root)?,
            "",
        )?,
    }
    if let Purpose::Provision { .. } = purpose {
        mount_provisioning_filesystems(root, owner)?;
    }
    pivot_into(root)
}

/// No device, no set-id bit and no program of what is mounted is honoured.
const NOTHING_RUNS: MountFlags = MountFlags::NOSUID
    .union(MountFlags::NODEV)
    .union(MountFlags::NOEXEC);

/// The per-mount flags of the image's mount that a remount must keep.
fn kept_flags(root: &Path) -> std::io::Result<MountFlags> {
    use rustix::fs::StatVfsMountFlags as F;
    let now = rustix::fs::statvfs(root)?.f_flag;
    let mut keep = MountFlags::empty();
    for (has, flag) in [
        (F::RDONLY, MountFlags::RDONLY),
        (F::NOATIME, MountFlags::NOATIME),
        (F::NODIRATIME, MountFlags::NODIRATIME),
        (F::NOEXEC, MountFlags::NOEXEC),
    ] {
        if now.contains(has) {
            keep |= flag;
        }
    }
    Ok(keep)
}

/// `mount_setattr`'s argument (linux/mount.h), which libc does not declare.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// Puts over `root` a copy of its mounts idmapped through `userns`, nodev and nosuid: root of
/// that namespace is root of the image's files, the host's root is nobody in them, and no
/// device node or set-id bit the image holds means anything.
fn idmap(root: &Path, userns: &OwnedFd) -> std::io::Result<()> {
    let tree = rustix::mount::open_tree(
        rustix::fs::CWD,
        root,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_RECURSIVE,
    )?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: a valid fd, an empty C string and a pointer to a live struct of the size given.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            // Every mount of the tree: the image's /boot and /boot/efi too.
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("idmap the image's mount (the filesystem must support idmapped mounts): {e}"),
        ));
    }
    rustix::mount::move_mount(
        tree.as_fd(),
        "",
        rustix::fs::CWD,
        root,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )?;
    Ok(())
}

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

/// The path through which a mount reaches exactly the directory `fd` was opened on.
fn fd_path(fd: &impl AsRawFd) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// The provisioners' /proc, /sys, /dev and /run, mounted in this (private) namespace only.
/// Each target is checked to be a real directory of the image, and mounted through its fd.
/// Long because it is the list of mounts, in the order the walls need them.
fn mount_provisioning_filesystems(root: &Path, owner: Option<u32>) -> std::io::Result<()> {
    let image = ImageRoot::open(root)?;
    // The sandbox's root owns its /dev, /dev/shm and /run, as the image's root would. Each
    // has a size, so filling one cannot take the host's memory.
    let tmpfs = |mode: &str, size: &str| {
        let owned = owner
            .map(|id| format!(",uid={id},gid={id}"))
            .unwrap_or_default();
        std::ffi::CString::new(format!("mode={mode},size={size}{owned}")).expect("no NUL")
    };
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
    // pasta lives in this PID namespace but the host's network namespace: its net/ would
    // show the host's sockets, routes and abstract socket names. An empty read-only tmpfs
    // over each of its threads' instead.
    if let Some(pasta) = super::network_helper() {
        let mut nets = vec![proc.join(pasta.to_string()).join("net")];
        let tasks = proc.join(pasta.to_string()).join("task");
        nets.extend(
            std::fs::read_dir(tasks)?
                .flatten()
                .map(|t| t.path().join("net")),
        );
        for net in nets {
            rustix::mount::mount("none", &net, "tmpfs", none | MountFlags::RDONLY, None)?;
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
        Some(tmpfs("0755", "1m").as_c_str()),
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
    rustix::mount::mount(
        "tmpfs",
        &shm,
        "tmpfs",
        none,
        Some(tmpfs("1777", "256m").as_c_str()),
    )?;

    let run = image.mount_target("/run")?;
    rustix::mount::mount(
        "tmpfs",
        fd_path(&run),
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some(tmpfs("0755", "256m").as_c_str()),
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

//! Root in the image is nobody on the host: the ids the sandbox runs as.
//!
//! Each run picks a range of 65,536 host ids that no account of the host uses (as
//! systemd-nspawn's `--private-users=pick` does) and holds a lock on it for as long as it
//! runs, so two bakes on one host never share one. The sandbox then runs in a user namespace
//! whose ids 0–65535 are that range, and sees the image through a mount idmapped the same
//! way: on disk, owners stay what the image says (root stays 0); on the host, the process
//! owns nothing and is privileged over nothing.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// How many ids the sandbox's user namespace maps: all of 16-bit uid space, which is what
/// images use (nobody is 65534).
pub const IDS: u32 = 65_536;
/// Where ranges are picked from: above every id a distribution hands out (and above the
/// 100000.. that /etc/subuid usually starts at), below what systemd keeps for itself.
const FIRST_BASE: u32 = 0x0008_0000;
const LAST_BASE: u32 = 0x6FFE_0000;
/// The locks that say which ranges running bakes hold.
const LOCK_DIR: &str = "/run/amibake/ids";

#[derive(Debug, thiserror::Error)]
pub enum IdsError {
    #[error("cannot pick host ids for the sandbox: {0}")]
    Pick(String),
    #[error("this kernel ({release}) cannot run the sandbox with root in the image as nobody on the host: {why}. Run on Linux 5.12 or later (Amazon Linux 2023, Ubuntu 22.04, Debian 12; on CodeBuild, the project's HostKernel LINUX_KERNEL_6), or opt in to the weaker `sandbox = \"compat\"` (template) or `--sandbox compat`")]
    Kernel { release: String, why: String },
}

/// A range of host ids held for this run; released when dropped (or when the process
/// ends, however it ends). The lock files stay: removing one could let a run that opened it
/// a moment before lock a file no later run sees. They are empty, one per range ever held
/// at once, on /run, which a reboot clears.
#[derive(Debug)]
pub struct IdRange {
    base: u32,
    _lock: File,
}

impl IdRange {
    /// Picks a free range: no account, group or subordinate-id range of the host in it, and
    /// no other running bake holding it.
    pub fn pick() -> Result<IdRange, IdsError> {
        let used = host_ids_in_use();
        std::fs::create_dir_all(LOCK_DIR)
            .map_err(|e| IdsError::Pick(format!("cannot make {LOCK_DIR}: {e}")))?;
        // In order from the first: the locks kept are as many as bakes ever ran at once.
        let slots = (LAST_BASE - FIRST_BASE) / IDS;
        for slot in 0..slots {
            let base = FIRST_BASE + slot * IDS;
            if used.iter().any(|&(lo, hi)| lo < base + IDS && base < hi) {
                continue;
            }
            let lock_path = Path::new(LOCK_DIR).join(format!("{base}.lock"));
            let lock = File::create(&lock_path)
                .map_err(|e| IdsError::Pick(format!("{}: {e}", lock_path.display())))?;
            match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(IdRange { base, _lock: lock }),
                Err(rustix::io::Errno::WOULDBLOCK) => continue,
                Err(e) => return Err(IdsError::Pick(format!("{}: {e}", lock_path.display()))),
            }
        }
        Err(IdsError::Pick("every range tried is in use".into()))
    }

    pub fn base(&self) -> u32 {
        self.base
    }
}

/// Half-open ranges of host ids that something on the host already uses: every uid and gid
/// in /etc/passwd and /etc/group, and every range in /etc/subuid and /etc/subgid.
fn host_ids_in_use() -> Vec<(u32, u32)> {
    let mut used = Vec::new();
    for file in ["/etc/passwd", "/etc/group"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines() {
            let fields: Vec<&str> = line.split(':').collect();
            for id in fields.iter().skip(2).take(2) {
                if let Ok(id) = id.parse::<u32>() {
                    used.push((id, id + 1));
                }
            }
        }
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in text.lines() {
            let mut fields = line.split(':').skip(1);
            if let (Some(Ok(start)), Some(Ok(count))) = (
                fields.next().map(str::parse::<u32>),
                fields.next().map(str::parse::<u32>),
            ) {
                used.push((start, start.saturating_add(count)));
            }
        }
    }
    used
}

/// Refuses, before a run makes anything, a kernel that cannot give the sandbox its own ids:
/// idmapped mounts of ext4 and XFS came with Linux 5.12, and user namespaces may be off.
pub fn check_kernel() -> Result<(), IdsError> {
    let release = rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned();
    let fail = |why: &str| IdsError::Kernel {
        release: release.clone(),
        why: why.into(),
    };
    // Idmapped mounts of ext4 and XFS.
    if !kernel_at_least(&release, (5, 12)) {
        return Err(fail("idmapped mounts need Linux 5.12"));
    }
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    if max.trim() == "0" {
        return Err(fail(
            "user namespaces are off (user.max_user_namespaces = 0)",
        ));
    }
    let probe = user_namespace(FIRST_BASE).map_err(|e| fail(&format!("no user namespace: {e}")))?;
    drop(probe);
    Ok(())
}

/// Whether a kernel of `release` (uname -r) is `version` (major, minor) or later.
pub(super) fn kernel_at_least(release: &str, version: (u32, u32)) -> bool {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0)) >= version
}

/// A user namespace whose ids 0..IDS are host ids `base..base+IDS`, as an fd for an idmapped
/// mount and for `become_root_in`. A short-lived child makes it; this process (root on the
/// host, in the host's PID namespace, so /proc names the child) writes its maps.
pub fn user_namespace(base: u32) -> std::io::Result<OwnedFd> {
    // Close-on-exec: a run checks the kernel from its async runtime, where another thread
    // may start a process meanwhile, which must not hold these open.
    let pipe = || rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC);
    let (ready_read, ready_write) = pipe()?;
    let (done_read, done_write) = pipe()?;
    // SAFETY: the sandbox's processes are single-threaded (see `super`'s note); the child
    // only makes syscalls and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(ready_read);
        drop(done_write);
        // SAFETY: single-threaded, and FILES is not unshared.
        let ok = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWUSER) }
            .is_ok();
        let _ = rustix::io::write(&ready_write, &[u8::from(ok)]);
        // Waits until the parent has what it needs: it closes its end.
        let _ = rustix::io::read(&done_read, &mut [0u8; 1]);
        // SAFETY: leaves the forked child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    drop(ready_write);
    drop(done_read);
    let result = (|| {
        let mut ok = [0u8; 1];
        if rustix::io::read(&ready_read, &mut ok)? != 1 || ok[0] != 1 {
            return Err(std::io::Error::other("unshare(CLONE_NEWUSER) failed"));
        }
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let map = format!("0 {base} {IDS}\n");
        for file in ["uid_map", "gid_map"] {
            File::options()
                .write(true)
                .open(proc.join(file))?
                .write_all(map.as_bytes())?;
        }
        Ok(OwnedFd::from(File::open(proc.join("ns/user"))?))
    })();
    drop(done_write);
    let mut status = 0;
    // SAFETY: reaps our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    result
}

/// Enters the user namespace `userns` and becomes its root: host ids `base`, with every
/// capability over what that namespace owns and none over the host.
pub fn become_root_in(userns: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: plain syscalls with valid arguments; single-threaded (see `super`).
    unsafe {
        if libc::setns(userns.as_raw_fd(), libc::CLONE_NEWUSER) != 0
            || libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(0, 0, 0) != 0
            || libc::setresuid(0, 0, 0) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idmapped_mounts_come_with_linux_5_12() {
        for old in [
            "4.14.355-275.582.amzn2.x86_64",
            "5.10.228-219.884.amzn2.x86_64",
            "5.11.0",
            "",
        ] {
            assert!(!kernel_at_least(old, (5, 12)), "{old}");
        }
        for new in [
            "5.12.0",
            "6.1.115-126.197.amzn2023.x86_64",
            "6.8.0-1018-aws",
            "6.18.44-fc-v1272",
        ] {
            assert!(kernel_at_least(new, (5, 12)), "{new}");
        }
    }

    #[test]
    fn a_picked_range_is_held_until_dropped_and_clear_of_host_accounts() {
        let first = IdRange::pick().unwrap();
        let second = IdRange::pick().unwrap();
        assert_ne!(first.base(), second.base(), "two runs never share a range");
        assert_eq!(first.base() % IDS, 0);
        assert!(first.base() >= FIRST_BASE && first.base() <= LAST_BASE);
        for (lo, hi) in host_ids_in_use() {
            assert!(hi <= first.base() || lo >= first.base() + IDS, "{lo}..{hi}");
        }
    }
}

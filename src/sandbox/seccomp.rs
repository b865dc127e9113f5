//! The second wall: a seccomp deny-list of what container runtimes deny by default.
//!
//! The user namespace already leaves these without effect on the host, or the kernel checks
//! them against capabilities the sandbox lacks; the list closes them a second time, so that
//! one kernel bug in a rarely used call is not a way out. Denied calls fail with EPERM rather
//! than killing the caller, so a package's maintainer script that probes for one carries on.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// Calls denied outright: the kernel keyring (shared with the host's root), BPF, perf, kexec
/// and modules, file handles (open_by_handle_at reads any file of a mounted filesystem),
/// userfaultfd and io_uring (the usual raw material of kernel exploits), the clock, swap,
/// reboot, accounting, and every way to make or change mounts and namespaces.
const DENIED: &[libc::c_long] = &[
    libc::SYS_add_key,
    libc::SYS_keyctl,
    libc::SYS_request_key,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_open_by_handle_at,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_syslog,
    libc::SYS_vhangup,
    libc::SYS_fanotify_init,
    libc::SYS_lookup_dcookie,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
];

/// ioctls denied on any descriptor: pushing input into a terminal (TIOCSTI) and the Linux
/// console's own (TIOCLINUX, which can paste a selection as input).
const DENIED_IOCTLS: [u64; 2] = [libc::TIOCSTI, libc::TIOCLINUX];

/// clone flags that make namespaces: denied, as `unshare` is.
const NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// Installs the deny-list on this process and all it will run. Sets no_new_privs (which
/// the image's mounts being nosuid makes moot already).
pub fn apply() -> Result<(), seccompiler::Error> {
    let arch: seccompiler::TargetArch = std::env::consts::ARCH.try_into()?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&call| (call, Vec::new())).collect();
    let ioctl_rules = DENIED_IOCTLS
        .iter()
        .map(|&request| {
            SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                request,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_ioctl, ioctl_rules);
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    let deny: BpfProgram = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?
    .try_into()?;
    // clone3 passes its flags in memory, where a filter cannot look: answering ENOSYS makes
    // the C library fall back to clone, whose flags the filter above sees.
    let no_clone3: BpfProgram = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?
    .try_into()?;
    seccompiler::apply_filter(&deny)?;
    seccompiler::apply_filter(&no_clone3)?;
    #[cfg(target_arch = "x86_64")]
    seccompiler::apply_filter(&no_x32())?;
    Ok(())
}

/// The filters above match x86_64 syscall numbers; the same calls through the x32 ABI
/// carry bit 30 in their number and would pass them. Where the kernel has x32, every such
/// call is denied.
#[cfg(target_arch = "x86_64")]
fn no_x32() -> BpfProgram {
    use seccompiler::sock_filter;
    const LOAD_WORD: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JUMP_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JUMP_AT_LEAST: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    // seccomp_data: the syscall number at offset 0, the architecture at offset 4.
    let op = |code, k, jt, jf| sock_filter { code, jt, jf, k };
    vec![
        op(LOAD_WORD, 4, 0, 0),
        op(JUMP_EQUAL, AUDIT_ARCH_X86_64, 0, 3),
        op(LOAD_WORD, 0, 0, 0),
        op(JUMP_AT_LEAST, X32_SYSCALL_BIT, 0, 1),
        op(RETURN, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32, 0, 0),
        op(RETURN, libc::SECCOMP_RET_ALLOW, 0, 0),
    ]
}

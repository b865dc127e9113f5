//! Keeping a provisioner that shares the build host's network away from the host's
//! credentials.
//!
//! A command with `network = true` lives in the host's network namespace, so the instance
//! metadata service (and the container credential endpoints of CodeBuild, ECS and EKS) would
//! be one connection away. It runs in a cgroup of its own instead, to which two tiny BPF
//! programs are attached on `connect` (IPv4 and IPv6): a connection to one of those endpoints
//! fails with EPERM, every other one goes through. The command has neither CAP_SYS_ADMIN nor
//! CAP_BPF, no cgroup filesystem and no raw sockets, so it can neither leave the cgroup nor
//! detach the programs. This is the filter systemd's `IPAddressDeny=` is built on.

use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("cannot keep the provisioner from the build host's instance metadata: {action}: {source} (set `allow_imds = true` on the provisioner to run it without this guard)")]
pub struct GuardError {
    action: String,
    source: std::io::Error,
}

fn failed(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuardError {
    let action = action.into();
    move |source| GuardError { action, source }
}

/// An address a provisioner must not connect to; `port: None` is every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

/// Where this host hands out credentials: EC2's instance metadata (IPv4 and IPv6), the
/// container credential endpoints of ECS and CodeBuild (169.254.170.2) and of EKS Pod
/// Identity, and whatever the AWS variables of this process point the SDKs to instead.
pub fn credential_endpoints() -> Vec<Endpoint> {
    let every_port = |ip: IpAddr| Endpoint { ip, port: None };
    let mut endpoints = vec![
        every_port(Ipv4Addr::new(169, 254, 169, 254).into()),
        every_port(Ipv4Addr::new(169, 254, 170, 2).into()),
        every_port(Ipv4Addr::new(169, 254, 170, 23).into()),
        every_port(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254).into()),
        every_port(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23).into()),
    ];
    for variable in [
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        if let Ok(url) = std::env::var(variable) {
            endpoints.extend(addresses_of(&url).map(|a| Endpoint {
                ip: a.ip(),
                port: Some(a.port()),
            }));
        }
    }
    endpoints
}

/// The socket addresses an `http://host[:port]/...` URL names.
fn addresses_of(url: &str) -> impl Iterator<Item = SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let with_port = if authority.ends_with(']') || !authority.contains(':') {
        format!("{authority}:80")
    } else {
        authority.to_string()
    };
    with_port
        .to_socket_addrs()
        .map(|a| a.collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
}

/// What a guard's cgroup is named: `amibake-<build id>-guard-<pid>-<n>`, so `gc` judges one a
/// killed run left as it judges the run's other leftovers (its lock, its age), never by a
/// PID, which another PID namespace may number differently.
const GUARD_MARK: &str = "-guard-";

/// A cgroup whose processes cannot connect to the credential endpoints. Removed when
/// dropped, once the processes in it are gone.
pub struct CredentialGuard {
    dir: PathBuf,
}

impl CredentialGuard {
    /// Makes a new cgroup of run `build_id` below this process's own and attaches the
    /// filter for `endpoints`.
    pub fn new(build_id: &str, endpoints: &[Endpoint]) -> Result<CredentialGuard, GuardError> {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let parent = own_cgroup_dir()?;
        let dir = parent.join(format!(
            "amibake-{build_id}{GUARD_MARK}{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(failed(format!("create {}", dir.display())))?;
        let guard = CredentialGuard { dir };
        let cgroup =
            File::open(&guard.dir).map_err(failed(format!("open {}", guard.dir.display())))?;
        for (family, program) in [
            (Family::V4, connect_filter(Family::V4, endpoints)),
            (Family::V6, connect_filter(Family::V6, endpoints)),
        ] {
            let loaded = bpf::load_connect_program(family, &program)
                .map_err(failed("load the connect filter"))?;
            bpf::attach(&cgroup, &loaded, family).map_err(failed(format!(
                "attach the filter to {}",
                guard.dir.display()
            )))?;
        }
        Ok(guard)
    }

    /// The cgroup's directory, for `join`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The processes of a killed command take a moment to be reaped, and a cgroup can be
/// removed only once it is empty: this many tries, this far apart.
const REMOVE_TRIES: u32 = 50;
const REMOVE_PAUSE: Duration = Duration::from_millis(20);

impl CredentialGuard {
    /// Removes the cgroup once the command's processes are gone, waiting without holding a
    /// runtime thread. Call it when the command has ended; dropping the guard instead tries
    /// once.
    pub async fn remove(self) {
        for _ in 1..REMOVE_TRIES {
            match std::fs::remove_dir(&self.dir) {
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tokio::time::sleep(REMOVE_PAUSE).await
                }
                _ => break,
            }
        }
        // The last try, and the word if it fails too.
        drop(self);
    }
}

impl Drop for CredentialGuard {
    fn drop(&mut self) {
        match std::fs::remove_dir(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => eprintln!(
                "amibake: could not remove the provisioners' cgroup {}: {e}",
                self.dir.display()
            ),
            _ => {}
        }
    }
}

/// Moves the calling process into the guard's cgroup at `dir`, before it runs anything.
pub fn join(dir: &Path) -> Result<(), GuardError> {
    let procs = dir.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .and_then(|mut f| f.write_all(std::process::id().to_string().as_bytes()))
        .map_err(failed(format!("join {}", dir.display())))
}

/// The guards' cgroups anywhere in the cgroup2 hierarchy (a run may live in another cgroup
/// than the one looking), each with the build id of its run, for `gc` to judge. None where
/// this host has no cgroup2 filesystem.
pub fn guards() -> Vec<(String, PathBuf)> {
    let Ok(root) = cgroup2_mount() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            match build_id_of_guard(&name) {
                Some(build_id) => found.push((build_id.to_string(), entry.path())),
                None => dirs.push(entry.path()),
            }
        }
    }
    found
}

/// The build id in a guard's cgroup name, `amibake-<build id>-guard-<pid>-<n>`.
fn build_id_of_guard(name: &str) -> Option<&str> {
    let (run, _) = name.strip_prefix("amibake-")?.split_once(GUARD_MARK)?;
    Some(run)
}

/// Removes a guard's cgroup a killed run left: ends what is still in it (a process that
/// outlived its run), then the cgroup, whose BPF programs go with it.
pub fn remove_leftover(dir: &Path) -> std::io::Result<()> {
    // cgroup.kill is Linux 5.14 and later; before it, a killed run's processes died with
    // their sandbox anyway.
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let mut tries = REMOVE_TRIES;
    loop {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries > 1 => {
                tries -= 1;
                std::thread::sleep(REMOVE_PAUSE);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            other => return other,
        }
    }
}

/// Where the cgroup2 filesystem is mounted.
fn cgroup2_mount() -> Result<PathBuf, GuardError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(failed("read /proc/self/mountinfo"))?;
    // Fields: id parent major:minor root mount-point options... - fstype source options
    let mount_point = mountinfo
        .lines()
        .find_map(|line| {
            let (fields, fs) = line.split_once(" - ")?;
            (fs.split(' ').next() == Some("cgroup2")).then(|| fields.split(' ').nth(4))?
        })
        .ok_or_else(|| {
            failed("find the cgroup2 filesystem")(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no cgroup2 filesystem is mounted on this host",
            ))
        })?;
    Ok(PathBuf::from(mount_point))
}

/// This process's cgroup in the cgroup2 hierarchy, as a directory of its mount.
fn own_cgroup_dir() -> Result<PathBuf, GuardError> {
    let mount_point = cgroup2_mount()?;
    let own =
        std::fs::read_to_string("/proc/self/cgroup").map_err(failed("read /proc/self/cgroup"))?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    Ok(mount_point.join(path.trim_start_matches('/')))
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Family {
    V4,
    V6,
}

/// One 64-bit BPF instruction, as `struct bpf_insn` lays it out.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct Instruction {
    code: u8,
    /// Destination register in the low four bits, source in the high four.
    registers: u8,
    offset: i16,
    immediate: i32,
}

// `struct bpf_sock_addr`, the context of a connect program: the destination as the caller
// gave it, in network byte order.
const USER_IP4: i16 = 4;
const USER_IP6: i16 = 8;
const USER_PORT: i16 = 24;

/// The program for `family`: "if the destination is one of `endpoints`, refuse (0), else
/// allow (1)". Each endpoint is a run of 32-bit comparisons that jump past its refusal at
/// the first field that differs. An IPv4 endpoint is also refused as the IPv4-mapped IPv6
/// address (::ffff:a.b.c.d) an IPv6 socket may use to reach it.
pub(crate) fn connect_filter(family: Family, endpoints: &[Endpoint]) -> Vec<Instruction> {
    const LOAD_WORD: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const JUMP_IF_NOT_EQUAL_32: u8 = 0x56; // BPF_JMP32 | BPF_JNE | BPF_K
    const MOVE_IMMEDIATE: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    let word = |bytes: [u8; 4]| i32::from_ne_bytes(bytes);
    let mut program = Vec::new();
    for endpoint in endpoints {
        let mut fields: Vec<(i16, i32)> = match (family, endpoint.ip) {
            (Family::V4, IpAddr::V4(ip)) => vec![(USER_IP4, word(ip.octets()))],
            (Family::V6, ip) => {
                let v6 = match ip {
                    IpAddr::V6(v6) => v6,
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                };
                let o = v6.octets();
                (0..4)
                    .map(|i| {
                        let at = 4 * i;
                        (
                            USER_IP6 + at as i16,
                            word([o[at], o[at + 1], o[at + 2], o[at + 3]]),
                        )
                    })
                    .collect()
            }
            (Family::V4, IpAddr::V6(_)) => continue,
        };
        if let Some(port) = endpoint.port {
            // The port sits in the low 16 bits of a 32-bit field, in network byte order.
            let be = port.to_be_bytes();
            fields.push((USER_PORT, word([be[0], be[1], 0, 0])));
        }
        let length = 2 * fields.len() + 2;
        for (i, (offset, value)) in fields.into_iter().enumerate() {
            // r2 = *(u32 *)(r1 + offset); if w2 != value: skip to the next endpoint.
            program.push(Instruction {
                code: LOAD_WORD,
                registers: 2 | (1 << 4),
                offset,
                immediate: 0,
            });
            program.push(Instruction {
                code: JUMP_IF_NOT_EQUAL_32,
                registers: 2,
                offset: (length - 2 * i - 2) as i16,
                immediate: value,
            });
        }
        program.push(Instruction {
            code: MOVE_IMMEDIATE,
            registers: 0,
            offset: 0,
            immediate: 0,
        });
        program.push(Instruction {
            code: EXIT,
            registers: 0,
            offset: 0,
            immediate: 0,
        });
    }
    program.push(Instruction {
        code: MOVE_IMMEDIATE,
        registers: 0,
        offset: 0,
        immediate: 1,
    });
    program.push(Instruction {
        code: EXIT,
        registers: 0,
        offset: 0,
        immediate: 0,
    });
    program
}

/// The two `bpf(2)` commands the guard needs, with the parts of `union bpf_attr` they read.
mod bpf {
    use super::*;

    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    const BPF_CGROUP_INET6_CONNECT: u32 = 11;
    /// Run beside whatever the host's own cgroups attach (systemd attaches with it too).
    const BPF_F_ALLOW_MULTI: u32 = 2;

    fn attach_type(family: Family) -> u32 {
        match family {
            Family::V4 => BPF_CGROUP_INET4_CONNECT,
            Family::V6 => BPF_CGROUP_INET6_CONNECT,
        }
    }

    #[repr(C)]
    #[derive(Default)]
    struct ProgramLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct ProgramAttach {
        target_fd: u32,
        attach_bpf_fd: u32,
        attach_type: u32,
        attach_flags: u32,
    }

    fn bpf<T>(command: libc::c_long, attr: &T) -> std::io::Result<libc::c_long> {
        // SAFETY: `attr` is a `repr(C)` prefix of `union bpf_attr` whose pointers point
        // into buffers that outlive the call; the kernel reads only `size` bytes of it.
        let answer = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                command,
                attr as *const T,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if answer < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(answer)
        }
    }

    pub(super) fn load_connect_program(
        family: Family,
        program: &[Instruction],
    ) -> std::io::Result<OwnedFd> {
        // Without a log first: a log that outgrows its buffer fails the load by itself.
        load(family, program, None).or_else(|e| {
            let mut log = vec![0u8; 1 << 20];
            match load(family, program, Some(&mut log)) {
                Ok(fd) => Ok(fd),
                Err(_) => {
                    let verifier = String::from_utf8_lossy(&log);
                    let verifier = verifier.trim_end_matches('\0').trim();
                    Err(std::io::Error::new(e.kind(), format!("{e}: {verifier}")))
                }
            }
        })
    }

    fn load(
        family: Family,
        program: &[Instruction],
        log: Option<&mut [u8]>,
    ) -> std::io::Result<OwnedFd> {
        let license = c"MIT";
        let mut name = [0u8; 16];
        name[..14].copy_from_slice(b"amibake_noimds");
        let (log_level, log_size, log_buf) = match log {
            Some(log) => (1, log.len() as u32, log.as_mut_ptr() as u64),
            None => (0, 0, 0),
        };
        let attr = ProgramLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
            insn_cnt: program.len() as u32,
            insns: program.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level,
            log_size,
            log_buf,
            prog_name: name,
            expected_attach_type: attach_type(family),
            ..Default::default()
        };
        // SAFETY: BPF_PROG_LOAD answers a new file descriptor that nothing else owns.
        bpf(BPF_PROG_LOAD, &attr).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub(super) fn attach(cgroup: &File, program: &OwnedFd, family: Family) -> std::io::Result<()> {
        let attr = ProgramAttach {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_bpf_fd: program.as_raw_fd() as u32,
            attach_type: attach_type(family),
            attach_flags: BPF_F_ALLOW_MULTI,
        };
        bpf(BPF_PROG_ATTACH, &attr).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guards_name_carries_its_runs_build_id() {
        assert_eq!(
            build_id_of_guard("amibake-ab-20261204221903-0a1b2c3d-guard-4242-0"),
            Some("ab-20261204221903-0a1b2c3d")
        );
        assert_eq!(build_id_of_guard("amibake-provisioner-4242-0"), None);
        assert_eq!(build_id_of_guard("user.slice"), None);
    }

    #[test]
    fn urls_name_their_address_and_port() {
        let found: Vec<_> = addresses_of("http://127.0.0.9:8123/").collect();
        assert_eq!(found, vec!["127.0.0.9:8123".parse().unwrap()]);
        let found: Vec<_> = addresses_of("http://[fd00:ec2::254]").collect();
        assert_eq!(found, vec!["[fd00:ec2::254]:80".parse().unwrap()]);
    }

    #[test]
    fn each_endpoint_jumps_past_its_own_refusal_only() {
        let endpoints = [
            Endpoint {
                ip: Ipv4Addr::new(169, 254, 169, 254).into(),
                port: None,
            },
            Endpoint {
                ip: Ipv4Addr::new(127, 0, 0, 9).into(),
                port: Some(8123),
            },
        ];
        let v4 = connect_filter(Family::V4, &endpoints);
        // 4 for the first endpoint, 6 for the second, 2 to allow.
        assert_eq!(v4.len(), 12);
        // The first endpoint's only comparison lands on the second endpoint's first load.
        assert_eq!(v4[1].offset, 2);
        // The second's two comparisons land on the final "allow".
        assert_eq!((v4[5].offset, v4[7].offset), (4, 2));
        assert_eq!(v4[10].immediate, 1);
        // In IPv6 both are refused as mapped addresses: 4 words, plus the port for one.
        assert_eq!(connect_filter(Family::V6, &endpoints).len(), 10 + 12 + 2);
    }
}

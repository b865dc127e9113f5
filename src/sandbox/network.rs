//! The outside, for a provisioner with `network = true`: its own network namespace, joined to
//! the world by pasta (user-mode networking, from the passt project, as rootless containers
//! use), instead of the build host's namespace.
//!
//! What that keeps away: the host's loopback services (a database, a Docker socket proxy,
//! the local metadata mock of a CI runner) and its abstract unix sockets (D-Bus, X11,
//! systemd's), which live in the host's namespace only. pasta forwards none of the host's
//! loopback ports but those the template names (`host_ports`, a package cache say), and
//! does not map the gateway's address to the host's loopback (`--no-map-gw`). The command
//! and pasta share a guard's cgroup (`credential_guard`) that refuses connections to the
//! host's own other addresses (a Docker bridge's, a second interface's, where services bound
//! to every address listen) and, unless `allow_imds`, to the credential endpoints. DNS goes
//! through pasta's forwarder: a resolver on the host's loopback (systemd-resolved's
//! 127.0.0.53) would be unreachable otherwise.
//!
//! pasta runs as a child of the sandbox's PID 1, in the host's network namespace but the
//! sandbox's PID namespace: it ends with the sandbox, however the sandbox ends. Its
//! `/proc/PID/net`, which would show the host's sockets, is covered (`mounts`). It keeps host
//! root (`--runas 0`) because the sandbox's network namespace belongs to the host's user
//! namespace, which is what keeps the provisioner's root from reconfiguring it; pasta drops
//! every capability but two (NET_BIND_SERVICE, SYS_ADMIN) and confines itself (seccomp,
//! namespaces of its own). A namespace owned by the run's id range, with pasta as that
//! range's root, would take host root from it too.

use std::io::Read;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a provisioner with `network = true` may reach besides the outside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outside {
    /// pasta's absolute path, found by the run (never through the template's PATH).
    pub pasta: PathBuf,
    /// Ports of the build host's loopback (127.0.0.1 and ::1) it reaches at the same port on
    /// its own loopback.
    pub host_ports: Vec<u16>,
}

/// The address the sandbox's resolv.conf names where the host's names a resolver on its own
/// loopback: pasta forwards DNS sent there to the host's first resolver. Link-local, so it is
/// never a real host's.
pub const DNS_FORWARD: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 53);

/// How long pasta gets to bring the sandbox's interface up.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// The descriptor pasta finds the sandbox's network namespace on.
const NETNS_FD: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("`network = true` reaches the outside through pasta, which this build host lacks (install the `passt` package: apt-get install passt, or dnf install passt)")]
    NoPasta,
    #[error("cannot give the provisioner its network: {action}: {source}")]
    Io {
        action: &'static str,
        source: std::io::Error,
    },
    #[error("cannot give the provisioner its network: pasta {0}")]
    Pasta(String),
}

fn io(action: &'static str) -> impl FnOnce(std::io::Error) -> NetworkError {
    move |source| NetworkError::Io { action, source }
}

/// pasta's path on this host, from this run's PATH.
pub fn pasta() -> Result<PathBuf, NetworkError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("pasta"))
        .find(|candidate| is_executable(candidate))
        .ok_or(NetworkError::NoPasta)
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Joins this process's (new) network namespace to the outside through pasta, started in
/// the host's namespace `host_net`, and waits until the namespace has its routes. Returns
/// pasta's PID in this PID namespace; pasta lives until this namespace ends.
pub fn connect(outside: &Outside, host_net: &OwnedFd) -> Result<u32, NetworkError> {
    let own_net = OwnedFd::from(
        std::fs::File::open("/proc/self/ns/net").map_err(io("open its network namespace"))?,
    );
    let forwards = if outside.host_ports.is_empty() {
        "none".to_string()
    } else {
        let ports: Vec<String> = outside.host_ports.iter().map(u16::to_string).collect();
        ports.join(",")
    };
    // Non-blocking: pasta's messages, unread once it is up, must never stop it on a full
    // pipe; they are dropped instead.
    let (said, stderr) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| io("make pasta's stderr")(e.into()))?;
    rustix::fs::fcntl_setfl(&stderr, rustix::fs::OFlags::NONBLOCK)
        .map_err(|e| io("make pasta's stderr")(e.into()))?;
    let mut command = Command::new(&outside.pasta);
    command
        .env_clear()
        .args(["--runas", "0", "--foreground", "--quiet", "--config-net"])
        // No way to the host's loopback but the named ports.
        .args(["--no-map-gw", "-t", "none", "-u", "none", "-U", "none"])
        .args(["-T", &forwards])
        .args(["--dns-forward", &DNS_FORWARD.to_string()])
        .args([
            "--netns",
            &format!("/proc/self/fd/{NETNS_FD}"),
            "--netns-only",
        ])
        .arg("--no-netns-quit")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr));
    let (host_fd, own_fd) = (host_net.as_raw_fd(), own_net.as_raw_fd());
    // SAFETY: setns and dup2 are async-signal-safe, as code between fork and exec must be.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(host_fd, libc::CLONE_NEWNET) != 0
                || libc::dup2(own_fd, NETNS_FD) != NETNS_FD
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(io("start pasta"))?;
    drop(own_net);
    let deadline = Instant::now() + READY_WITHIN;
    loop {
        if let Some(status) = child.try_wait().map_err(io("wait for pasta"))? {
            drop(command);
            let mut text = String::new();
            let _ = std::fs::File::from(said).read_to_string(&mut text);
            return Err(NetworkError::Pasta(format!(
                "ended ({status}) before the network was up: {}",
                crate::engine::events::printable(text.trim())
            )));
        }
        if is_up(&outside.host_ports).map_err(io("read its routes and sockets"))? {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(NetworkError::Pasta(format!(
                "did not bring the network up within {} s",
                READY_WITHIN.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // pasta's stderr stays open, unread: closing it could end pasta on its next message.
    std::mem::forget(said);
    Ok(child.id())
}

/// Whether pasta has done its part in this process's network namespace: a default route
/// (IPv4 or IPv6), and a listener on loopback for each port forwarded to the host. pasta
/// adds the routes first and the listeners after.
fn is_up(host_ports: &[u16]) -> std::io::Result<bool> {
    let v4 = std::fs::read_to_string("/proc/self/net/route")?;
    let v6 = std::fs::read_to_string("/proc/self/net/ipv6_route").unwrap_or_default();
    let routed = v4
        .lines()
        .skip(1)
        .any(|line| line.split_whitespace().nth(1) == Some("00000000"))
        || v6.lines().any(|line| {
            line.split_whitespace()
                .take(2)
                .eq(["00000000000000000000000000000000", "00"])
                && !line.ends_with(" lo")
        });
    if !routed {
        return Ok(false);
    }
    // Both tables: on a host without IPv4, pasta listens on ::1 only.
    let mut listening = listening_ports(&std::fs::read_to_string("/proc/self/net/tcp")?);
    listening.extend(listening_ports(
        &std::fs::read_to_string("/proc/self/net/tcp6").unwrap_or_default(),
    ));
    Ok(host_ports.iter().all(|port| listening.contains(port)))
}

/// The ports of the TCP sockets listening in a `/proc/net/tcp` table: "sl local rem st ...",
/// the local address as HEXADDR:HEXPORT, state 0A for LISTEN.
fn listening_ports(table: &str) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let local = fields.next()?;
            let state = fields.nth(1)?;
            let port = local.rsplit_once(':')?.1;
            (state == "0A").then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect()
}

/// The build host's own addresses but loopback (a second interface's, a Docker bridge's):
/// pasta would connect to them from the host's namespace, and so reach services bound to
/// every address. The sandbox's loopback is its own, and `host_ports` reach the host's.
pub fn host_addresses() -> Vec<std::net::IpAddr> {
    let mut found = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below; each entry is read only while it lives.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return found;
        }
        let mut entry = list;
        while !entry.is_null() {
            let address = (*entry).ifa_addr;
            if !address.is_null() {
                match i32::from((*address).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*(address as *const libc::sockaddr_in);
                        found.push(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)).into());
                    }
                    libc::AF_INET6 => {
                        let v6 = &*(address as *const libc::sockaddr_in6);
                        found.push(std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr).into());
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found.retain(|a: &std::net::IpAddr| !a.is_loopback());
    found.sort();
    found.dedup();
    found
}

/// The resolv.conf a sandbox with the outside gets from the host's: a resolver on the host's
/// loopback, which the sandbox cannot reach, becomes pasta's forwarder.
pub fn resolv_conf_for_sandbox(host: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(host);
    let mut forwarded = false;
    let mut out = String::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let on_loopback = words.next() == Some("nameserver")
            && words
                .next()
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                .is_some_and(|a| a.is_loopback());
        if !on_loopback {
            out.push_str(line);
            out.push('\n');
        } else if !forwarded {
            out.push_str(&format!("nameserver {DNS_FORWARD}\n"));
            forwarded = true;
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_read_from_the_kernels_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:483B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n   1: 0100007F:D5A1 0100007F:483B 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert_eq!(listening_ports(table), vec![0x483B]);
    }

    #[test]
    fn a_resolver_on_the_host_loopback_becomes_the_forwarder() {
        let host = b"# systemd-resolved\nnameserver 127.0.0.53\nnameserver ::1\noptions edns0 trust-ad\nsearch ec2.internal\n";
        assert_eq!(
            String::from_utf8(resolv_conf_for_sandbox(host)).unwrap(),
            "# systemd-resolved\nnameserver 169.254.1.53\noptions edns0 trust-ad\nsearch ec2.internal\n"
        );
    }

    #[test]
    fn a_resolver_the_sandbox_reaches_is_kept() {
        let host = b"nameserver 10.0.0.2\nnameserver fd00:ec2::253\n";
        assert_eq!(resolv_conf_for_sandbox(host), host.to_vec());
    }
}

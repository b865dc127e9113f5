//! Where a temporary instance is reached, and from where: its address as the template
//! picks it, and this runner's as the instance sees it.

use std::net::{IpAddr, Ipv4Addr, UdpSocket};

use super::SSH_PORT;
use crate::template::SshInterface;

pub fn ssh_address(
    instance: &aws_sdk_ec2::types::Instance,
    interface: SshInterface,
) -> Option<String> {
    let address = match interface {
        SshInterface::PublicIp => instance.public_ip_address(),
        SshInterface::PrivateIp => instance.private_ip_address(),
        SshInterface::PublicDns => instance.public_dns_name(),
        SshInterface::PrivateDns => instance.private_dns_name(),
    };
    address.filter(|a| !a.is_empty()).map(str::to_string)
}

pub fn no_address(instance_id: &str, interface: SshInterface) -> String {
    match interface {
        SshInterface::PublicIp | SshInterface::PublicDns => format!(
            "{instance_id} has no public address: set `associate_public_ip = true`, or `ssh_interface = \"private_ip\"` when this runner is in the same network"
        ),
        SshInterface::PrivateIp | SshInterface::PrivateDns => {
            format!("{instance_id} has no private address")
        }
    }
}

/// The address this machine's packets to `host` leave from, as a /32: what the security
/// group must let in. A connected UDP socket asks the kernel's routing without sending
/// anything. Behind NAT the instance sees another address, which this machine cannot know:
/// that is refused, and the caller names `ssh_cidrs` and `--ssh-cidr`.
pub fn runner_cidr(host: &str) -> Result<String, RunnerAddressError> {
    let route = || -> std::io::Result<(IpAddr, IpAddr)> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect((host, SSH_PORT))?;
        Ok((socket.local_addr()?.ip(), socket.peer_addr()?.ip()))
    };
    match route().map_err(RunnerAddressError::Route)? {
        (IpAddr::V4(source), IpAddr::V4(target)) if crosses_nat(source, target) => {
            Err(RunnerAddressError::BehindNat {
                runner: source,
                target,
            })
        }
        (IpAddr::V4(source), _) => Ok(format!("{source}/32")),
        (IpAddr::V6(source), _) => Err(RunnerAddressError::Ipv6(source)),
    }
}

/// Why this runner cannot tell the address an instance sees it at.
#[derive(Debug, thiserror::Error)]
pub enum RunnerAddressError {
    #[error(transparent)]
    Route(std::io::Error),
    #[error("this runner's address {runner} is private and {target} is public, so the instance sees a NAT's address, not {runner} (find it with `curl -fsS https://checkip.amazonaws.com`)")]
    BehindNat { runner: Ipv4Addr, target: Ipv4Addr },
    #[error("{0} is IPv6, and the group opens IPv4 only")]
    Ipv6(std::net::Ipv6Addr),
}

/// Whether packets from `source` to `target` are translated on the way: a private address
/// (RFC 1918, or the shared range carriers and CI clouds NAT from) reaching a public one.
fn crosses_nat(source: Ipv4Addr, target: Ipv4Addr) -> bool {
    let shared = |a: Ipv4Addr| a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64;
    let private = |a: Ipv4Addr| a.is_private() || shared(a);
    let public = !(private(target)
        || target.is_loopback()
        || target.is_link_local()
        || target.is_unspecified()
        || target.is_broadcast());
    private(source) && public
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_private_runner_reaching_a_public_address_crosses_a_nat() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        // A hosted runner (private, or the carriers' shared range) to a public instance.
        assert!(crosses_nat(ip("10.1.0.4"), ip("54.12.3.4")));
        assert!(crosses_nat(ip("172.17.0.2"), ip("3.8.1.1")));
        assert!(crosses_nat(ip("100.64.3.9"), ip("18.2.2.2")));
        // A runner in the instance's network, one with a public address, the local cloud.
        assert!(!crosses_nat(ip("10.1.0.4"), ip("10.1.2.7")));
        assert!(!crosses_nat(ip("198.51.100.20"), ip("54.12.3.4")));
        assert!(!crosses_nat(ip("127.0.0.1"), ip("127.0.2.5")));
        assert!(
            !crosses_nat(ip("100.128.0.1"), ip("54.12.3.4")),
            "outside 100.64/10"
        );
    }
}

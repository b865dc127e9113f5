//! The filter that keeps a provisioner with the host's network from the host's credentials:
//! real connections from a process in the guard's cgroup, to listeners on loopback that
//! stand for the metadata service and for everything else.

use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;

use amibake::sandbox::credential_guard::{credential_endpoints, CredentialGuard, Endpoint};

/// Whether a process in `guard` (or in no guard) can open a TCP connection to `host`/`port`.
fn connects(guard: Option<&CredentialGuard>, host: &str, port: u16) -> bool {
    let probe = format!("exec 3<>/dev/tcp/{host}/{port}");
    let mut command = Command::new("bash");
    match guard {
        Some(g) => command
            .arg("-c")
            .arg(format!("echo $$ > \"$1/cgroup.procs\" && {probe}"))
            .arg("probe")
            .arg(g.dir()),
        None => command.arg("-c").arg(&probe),
    };
    command.status().unwrap().success()
}

fn listener(ip: Ipv4Addr) -> (TcpListener, u16) {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

#[test]
fn a_guarded_process_reaches_everything_but_the_credential_endpoints() {
    let _module = crate::util::module_turn(module_path!());
    let (_metadata, metadata_port) = listener(Ipv4Addr::new(127, 0, 0, 1));
    let (_other_service, other_port) = listener(Ipv4Addr::new(127, 0, 0, 1));
    let (_whole_address, any_port) = listener(Ipv4Addr::new(127, 0, 0, 2));
    // Beside the host's real endpoints, as a bake guards them: the filter must load at
    // its full length.
    let mut endpoints = credential_endpoints();
    endpoints.extend([
        Endpoint {
            ip: Ipv4Addr::new(127, 0, 0, 1).into(),
            port: Some(metadata_port),
        },
        Endpoint {
            ip: Ipv4Addr::new(127, 0, 0, 2).into(),
            port: None,
        },
    ]);
    let guard = CredentialGuard::new("ab-20261204000000-0a1b2c3d", &endpoints).unwrap();
    let dir = guard.dir().to_path_buf();

    // Outside the guard, every listener answers: the probe is able to succeed.
    assert!(connects(None, "127.0.0.1", metadata_port));
    assert!(connects(None, "127.0.0.2", any_port));
    assert!(connects(None, "::ffff:127.0.0.1", metadata_port));

    assert!(!connects(Some(&guard), "127.0.0.1", metadata_port));
    assert!(
        !connects(Some(&guard), "::ffff:127.0.0.1", metadata_port),
        "an IPv6 socket's mapped address reaches the same endpoint"
    );
    assert!(!connects(Some(&guard), "127.0.0.2", any_port));
    assert!(
        connects(Some(&guard), "127.0.0.1", other_port),
        "another port of the same address stays reachable"
    );

    drop(guard);
    assert!(!dir.exists(), "the cgroup {} is removed", dir.display());
}

#[test]
fn the_endpoints_include_the_metadata_service_and_the_container_credentials() {
    let _module = crate::util::module_turn(module_path!());
    let endpoints = credential_endpoints();
    for ip in ["169.254.169.254", "169.254.170.2", "fd00:ec2::254"] {
        assert!(
            endpoints
                .iter()
                .any(|e| e.ip == ip.parse::<std::net::IpAddr>().unwrap() && e.port.is_none()),
            "{ip} in {endpoints:?}"
        );
    }
}

//! The chroot communicator: each command runs inside the mounted image as its root, in a
//! sandbox of its own (`sandbox`: own mount, PID, IPC, UTS and network namespaces, a
//! fresh /proc, no host device, fewer capabilities), so every path it touches is the image's
//! and nothing it does reaches the build host. Files are written from inside the sandbox as
//! well, so a symlink in the image can never send a write to the host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::{CommError, Communicator};
use crate::sandbox::credential_guard::{credential_endpoints, CredentialGuard, Endpoint};
use crate::sandbox::emulator::Emulator;
use crate::sandbox::Isolation;
use crate::template::Network;

/// The PATH commands see in the chroot: the usual one of a Linux image.
const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub struct Chroot {
    /// This binary, whose `internal-sandbox` enters the image.
    amibake_exe: PathBuf,
    root: PathBuf,
    isolation: Isolation,
    /// How the image's programs run, when they are of another architecture than this host's.
    emulator: Option<Emulator>,
    /// The run's build id, which names the guards' cgroups for `gc`.
    build_id: String,
}

impl Chroot {
    pub fn new(
        amibake_exe: impl Into<PathBuf>,
        root: impl Into<PathBuf>,
        isolation: Isolation,
        emulator: Option<Emulator>,
        build_id: &str,
    ) -> Chroot {
        Chroot {
            amibake_exe: amibake_exe.into(),
            root: root.into(),
            isolation,
            emulator,
            build_id: build_id.to_string(),
        }
    }

    /// The sandboxed command; with the host's network, also the guard that keeps it from the
    /// host's credentials, which must live until the command has ended.
    fn command(
        &self,
        env: &BTreeMap<String, String>,
        network: &Network,
    ) -> Result<(tokio::process::Command, Option<CredentialGuard>), CommError> {
        let mut command = tokio::process::Command::new(&self.amibake_exe);
        command
            .arg("internal-sandbox")
            .arg("--root")
            .arg(&self.root)
            .arg("--isolation")
            .arg(self.isolation.to_arg());
        if let Some(emulator) = &self.emulator {
            command
                .arg("--emulated-architecture")
                .arg(&emulator.architecture)
                .arg("--emulator")
                .arg(&emulator.interpreter);
        }
        let guard = match network {
            Network::None => None,
            Network::Outside {
                metadata,
                host_ports,
            } => {
                let pasta = crate::sandbox::network::pasta()
                    .map_err(|e| self.failed("reach the outside", e))?;
                command.arg("--network").arg("--pasta").arg(pasta);
                for port in host_ports {
                    command.arg("--host-port").arg(port.to_string());
                }
                // The host's own addresses always; its credential endpoints unless allowed.
                let mut endpoints: Vec<Endpoint> = crate::sandbox::network::host_addresses()
                    .into_iter()
                    .map(|ip| Endpoint { ip, port: None })
                    .collect();
                if !*metadata {
                    endpoints.extend(credential_endpoints());
                }
                let guard = CredentialGuard::new(&self.build_id, &endpoints)
                    .map_err(|e| self.failed("keep the command from the host's own services", e))?;
                command.arg("--cgroup").arg(guard.dir());
                Some(guard)
            }
        };
        command.arg("--");
        // Nothing of the host's environment leaks in, credentials included.
        command
            .env_clear()
            .env("PATH", CHROOT_PATH)
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8");
        command.envs(env).kill_on_drop(true);
        crate::sandbox::detach_and_die_with_parent(&mut command);
        Ok((command, guard))
    }
}

#[async_trait]
impl Communicator for Chroot {
    fn target(&self) -> String {
        format!("chroot {}", self.root.display())
    }

    async fn run(
        &self,
        command: &str,
        env: &BTreeMap<String, String>,
        network: &Network,
        on_line: &mut (dyn for<'l> FnMut(&'l str) + Send),
        cancel: &CancellationToken,
    ) -> Result<i32, CommError> {
        // `exec 2>&1` merges the streams inside the image, keeping their order; the command
        // itself travels as an argument, so nothing is quoted or pasted into a shell string.
        let (mut sandboxed, guard) = self.command(env, network)?;
        let mut child = sandboxed
            .args([
                "/bin/sh",
                "-c",
                "exec 2>&1; exec /bin/sh -c \"$1\"",
                "amibake",
            ])
            .arg(command)
            // A pipe, closed at once: never a descriptor of a host file, which the
            // command could change (its mode, its owner) through /proc/self/fd.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.failed(format!("run `{command}`"), e))?;
        drop(child.stdin.take());
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        loop {
            tokio::select! {
                line = lines.next_line() => match line.map_err(|e| self.failed(format!("read the output of `{command}`"), e))? {
                    Some(line) => on_line(&line),
                    None => break,
                },
                _ = cancel.cancelled() => {
                    // Its session, made at its start, is its process group: everything it started.
                    if let Some(pid) = child.id().and_then(|pid| rustix::process::Pid::from_raw(pid as i32)) {
                        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                    }
                    let _ = child.wait().await;
                    if let Some(guard) = guard {
                        guard.remove().await;
                    }
                    return Err(CommError::Interrupted { target: self.target() });
                }
            }
        }
        let status = child.wait().await;
        if let Some(guard) = guard {
            guard.remove().await;
        }
        let status = status.map_err(|e| self.failed(format!("run `{command}`"), e))?;
        // A command killed by a signal has no exit code; report it as the shell would.
        Ok(status.code().unwrap_or_else(|| {
            128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
        }))
    }

    async fn upload(&self, source: &Path, destination: &str, mode: u32) -> Result<(), CommError> {
        let action = || format!("copy {} to {destination}", source.display());
        let file = tokio::fs::File::open(source)
            .await
            .map_err(|e| self.failed(action(), e))?;
        let (mut command, _) = self.command(&BTreeMap::new(), &Network::None)?;
        let mut child = command
            .args([
                "/bin/sh",
                "-c",
                "mkdir -p \"$(dirname \"$1\")\" && cat > \"$1\" && chmod \"$2\" \"$1\"",
                "upload",
            ])
            .arg(destination)
            .arg(format!("{mode:o}"))
            // The file's bytes through a pipe, never the host's file itself.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| self.failed(action(), e))?;
        let mut stdin = child.stdin.take().expect("piped");
        let feed = async move {
            let mut file = file;
            let copied = tokio::io::copy(&mut file, &mut stdin).await;
            drop(stdin);
            copied
        };
        let (copied, out) = tokio::join!(feed, child.wait_with_output());
        let out = out.map_err(|e| self.failed(action(), e))?;
        // The command's own words first: a command that failed stops reading its input.
        if !out.status.success() {
            return Err(self.failed(action(), String::from_utf8_lossy(&out.stderr).trim()));
        }
        copied.map_err(|e| self.failed(action(), e))?;
        Ok(())
    }
}

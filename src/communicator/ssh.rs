//! The SSH communicator: commands and files reach a temporary instance over one ssh2 session.
//!
//! libssh2 blocks, so every exchange runs on a blocking thread. While a command runs, the
//! session's timeout is short: each read that times out is a chance to notice an interrupt,
//! so a Ctrl-C never waits on a command that prints nothing.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ssh2::{ExtendedData, Session};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{assignments, quote, CommError, Communicator};
use crate::template::Network;

/// How often a running command's reader looks at the cancel token.
const READ_POLL: Duration = Duration::from_millis(200);
/// Bound on one protocol exchange that is not a running command (open a channel, close it).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
const KEEPALIVE_SECONDS: u32 = 30;
/// What an instance sees as a command's exit code when a signal ended it, as `ssh` reports.
const KILLED_BY_SIGNAL: i32 = 255;

/// Where to connect and as whom.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The private key file; its contents are read by libssh2 only, never by this program.
    pub private_key: PathBuf,
}

impl SshTarget {
    fn describe(&self) -> String {
        format!("ssh {}@{}:{}", self.user, self.host, self.port)
    }
}

pub struct Ssh {
    target: SshTarget,
    session: Arc<Mutex<Session>>,
    /// Commands go through `sudo -n` unless the user is root.
    sudo: bool,
    uploads: AtomicU64,
}

/// The host key a server offered in the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    /// `ED25519`, `ECDSA`, `RSA`: as `ssh-keygen -l` names them.
    pub kind: &'static str,
    /// The public key blob, base64 as in `known_hosts`.
    pub blob_base64: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

impl HostKey {
    fn of(blob: &[u8], kind: ssh2::HostKeyType) -> HostKey {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(blob);
        HostKey {
            kind: match kind {
                ssh2::HostKeyType::Rsa => "RSA",
                ssh2::HostKeyType::Dss => "DSA",
                ssh2::HostKeyType::Ecdsa256
                | ssh2::HostKeyType::Ecdsa384
                | ssh2::HostKeyType::Ecdsa521 => "ECDSA",
                ssh2::HostKeyType::Ed25519 => "ED25519",
                _ => "unknown",
            },
            blob_base64: aws_smithy_types::base64::encode(blob),
            fingerprint: format!(
                "SHA256:{}",
                aws_smithy_types::base64::encode(digest).trim_end_matches('=')
            ),
        }
    }
}

/// A connection whose key exchange is done and whose server is not yet trusted: nothing has
/// been sent to it but the handshake. `authenticate` once its host key is checked.
pub struct Handshake {
    target: SshTarget,
    session: Session,
    host_key: HostKey,
}

/// Why one attempt to reach an SSH server failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error(transparent)]
    Connect(std::io::Error),
    #[error("SSH session: {0}")]
    Session(ssh2::Error),
    #[error("SSH handshake: {0}")]
    Handshake(ssh2::Error),
    #[error("SSH handshake: the server offered no host key")]
    NoHostKey,
    #[error("key authentication as {user}: {source}")]
    Authenticate { user: String, source: ssh2::Error },
}

impl Handshake {
    pub fn host_key(&self) -> &HostKey {
        &self.host_key
    }

    /// Authenticates with the target's key.
    pub fn authenticate(self) -> Result<Ssh, ConnectError> {
        let Handshake {
            target, session, ..
        } = self;
        session
            .userauth_pubkey_file(&target.user, None, &target.private_key, None)
            .map_err(|source| ConnectError::Authenticate {
                user: target.user.clone(),
                source,
            })?;
        Ok(Ssh {
            sudo: target.user != "root",
            target,
            session: Arc::new(Mutex::new(session)),
            uploads: AtomicU64::new(0),
        })
    }
}

impl Ssh {
    /// Connects and exchanges keys. One attempt, bounded by `timeout`: the caller decides
    /// how often to retry while an instance boots, and whether the host key is the
    /// instance's before it authenticates.
    pub fn handshake(target: &SshTarget, timeout: Duration) -> Result<Handshake, ConnectError> {
        let host = || target.host.clone();
        let address: SocketAddr = (target.host.as_str(), target.port)
            .to_socket_addrs()
            .map_err(|source| ConnectError::Resolve {
                host: host(),
                source,
            })?
            .next()
            .ok_or_else(|| ConnectError::NoAddress { host: host() })?;
        let tcp = TcpStream::connect_timeout(&address, timeout).map_err(ConnectError::Connect)?;
        let mut session = Session::new().map_err(ConnectError::Session)?;
        session.set_timeout(millis(timeout));
        session.set_tcp_stream(tcp);
        session.handshake().map_err(ConnectError::Handshake)?;
        // A provisioner silent for minutes (a large apt-get) must not lose its connection
        // to an idle-timeout on the way; the read loop sends these when they are due.
        session.set_keepalive(false, KEEPALIVE_SECONDS);
        let host_key = session
            .host_key()
            .map(|(blob, kind)| HostKey::of(blob, kind))
            .ok_or(ConnectError::NoHostKey)?;
        Ok(Handshake {
            target: target.clone(),
            session,
            host_key,
        })
    }

    /// The command line sshd's shell runs: `script` in a fresh `sh`, as root.
    fn as_root(&self, script: &str) -> String {
        let shell = format!("/bin/sh -c {}", quote(script));
        if self.sudo {
            format!("sudo -n -H -- {shell}")
        } else {
            shell
        }
    }

    /// Runs a command to its end on a blocking thread, without streaming; for housekeeping.
    async fn run_quietly(&self, script: String) -> Result<(i32, String), CommError> {
        self.run_collected(self.as_root(&script), Vec::new(), format!("run `{script}`"))
            .await
    }

    /// Runs `command` as the SSH user with `input` on its standard input, to its end on a
    /// blocking thread: its exit code and its output, trimmed. `action` names it in an error.
    async fn run_collected(
        &self,
        command: String,
        input: Vec<u8>,
        action: String,
    ) -> Result<(i32, String), CommError> {
        let session = self.session.clone();
        tokio::task::spawn_blocking(move || {
            let session = session.lock().unwrap_or_else(|p| p.into_inner());
            let mut output = Vec::new();
            let code = exec(&session, &command, &input, None, |chunk| {
                output.extend_from_slice(chunk)
            })?;
            Ok::<_, std::io::Error>((
                code.unwrap_or(KILLED_BY_SIGNAL),
                String::from_utf8_lossy(&output).trim().to_string(),
            ))
        })
        .await
        .map_err(|e| self.failed(action.clone(), e))?
        .map_err(|e| self.failed(action, e))
    }
}

#[async_trait]
impl Communicator for Ssh {
    fn target(&self) -> String {
        self.target.describe()
    }

    async fn run(
        &self,
        command: &str,
        env: &BTreeMap<String, String>,
        _network: &Network,
        on_line: &mut (dyn for<'l> FnMut(&'l str) + Send),
        cancel: &CancellationToken,
    ) -> Result<i32, CommError> {
        // sshd passes on only the variables it is told to accept, and a command line is
        // seen by every process and logged by sudo: the variables travel on the command's
        // standard input instead, read by the shell before the command runs.
        let assignments = assignments(env);
        let remote = if env.is_empty() {
            self.as_root(command)
        } else {
            self.as_root(&format!("set -a; . /dev/stdin; set +a; {command}"))
        };
        let (lines_tx, mut lines) = mpsc::unbounded_channel::<String>();
        let (session, token) = (self.session.clone(), cancel.clone());
        let reader = tokio::task::spawn_blocking(move || {
            let session = session.lock().unwrap_or_else(|p| p.into_inner());
            let mut pending = Vec::new();
            let code = exec(
                &session,
                &remote,
                assignments.as_bytes(),
                Some(&token),
                |chunk| {
                    pending.extend_from_slice(chunk);
                    while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        let _ = lines_tx.send(text_line(&line));
                    }
                },
            );
            if !pending.is_empty() {
                let _ = lines_tx.send(text_line(&pending));
            }
            code
        });
        while let Some(line) = lines.recv().await {
            on_line(&line);
        }
        let code = reader
            .await
            .map_err(|e| self.failed(format!("run `{command}`"), e))?
            .map_err(|e| self.failed(format!("run `{command}`"), e))?;
        // No exit code means the reader stopped for the interrupt; whatever the command
        // started ends with the instance, which the interrupt's cleanup terminates.
        code.ok_or_else(|| CommError::Interrupted {
            target: self.target(),
        })
    }

    async fn upload(&self, source: &Path, destination: &str, mode: u32) -> Result<(), CommError> {
        let action = || format!("copy {} to {destination}", source.display());
        let contents = tokio::fs::read(source)
            .await
            .map_err(|e| self.failed(action(), e))?;
        // Written as the SSH user to a fresh private file (noclobber refuses a planted
        // symlink), then installed as root where it belongs.
        let staged = format!(
            "/tmp/amibake-upload-{}-{}",
            std::process::id(),
            self.uploads.fetch_add(1, Ordering::Relaxed)
        );
        let write = format!("umask 077; set -C; cat > {}", quote(&staged));
        let (code, output) = self.run_collected(write, contents, action()).await?;
        if code != 0 {
            return Err(self.failed(action(), format!("writing {staged}: {output}")));
        }
        let install = format!(
            "install -D -m {mode:o} {staged} {dest}; status=$?; rm -f {staged}; exit $status",
            staged = quote(&staged),
            dest = quote(destination)
        );
        match self.run_quietly(install).await? {
            (0, _) => Ok(()),
            (_, output) => Err(self.failed(action(), output)),
        }
    }
}

/// Runs `command` on a new channel with `input` on its standard input (then end of file),
/// passing its output (stdout and stderr merged) to `on_output`. `None` when `cancel` fired
/// before the command ended.
fn exec(
    session: &Session,
    command: &str,
    input: &[u8],
    cancel: Option<&CancellationToken>,
    mut on_output: impl FnMut(&[u8]),
) -> std::io::Result<Option<i32>> {
    session.set_timeout(millis(EXCHANGE_TIMEOUT));
    let mut channel = session.channel_session()?;
    channel.handle_extended_data(ExtendedData::Merge)?;
    channel.exec(command)?;
    // Then end of file: a command that reads its input finds it, and never waits on it.
    channel.write_all(input)?;
    channel.send_eof()?;
    if cancel.is_some() {
        session.set_timeout(millis(READ_POLL));
    }
    let mut buffer = [0u8; 16 * 1024];
    loop {
        match channel.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => on_output(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                let _ = session.keepalive_send();
                if cancel.is_some_and(|c| c.is_cancelled()) {
                    let _ = channel.close();
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
    session.set_timeout(millis(EXCHANGE_TIMEOUT));
    channel.wait_close()?;
    if channel.exit_signal()?.exit_signal.is_some() {
        return Ok(Some(KILLED_BY_SIGNAL));
    }
    Ok(Some(channel.exit_status()?))
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

fn text_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    text.trim_end_matches(['\n', '\r']).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_metacharacters() {
        let hostile = r#"it's $(rm -rf /) `x` "y" \z"#;
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {}", quote(hostile)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), hostile);
    }
}

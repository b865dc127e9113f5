//! A temporary instance reached through SSM Run Command, with no key pair and no port open
//! to it: each command is a script sent to the instance's agent (SendCommand), followed
//! until it ends (GetCommandInvocation) and cancelled on interrupt or timeout.
//!
//! SSM answers a command's output only once it has ended. With a log group, the agent also
//! streams it into CloudWatch Logs as it is written, and the run shows it from there as it
//! comes; what did not come that way (the instance's role may not write logs, the runner
//! may not read them) is shown from SSM's answer at the end.
//!
//! SSM keeps what it is sent (ListCommands, for weeks): the template's commands and files
//! are sent sealed to a key the instance made (see `sealed`), so a secret among them reaches
//! the instance and nothing SSM keeps can open it. What a command prints, SSM keeps as it
//! was printed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::sealed::{self, Recipient};
use super::{assignments, quote, CommError, Communicator};
use crate::aws::logs::Follower;
use crate::aws::run_command::{self, Ended, Invocation, STDERR_KEPT, STDOUT_KEPT};
use crate::aws::wait::{wait_for, Poll, WaitError, WaitPolicy};
use crate::aws::Clients;
use crate::template::Network;

/// A command is polled for soon after it is sent, then every few seconds at most; its own
/// end (a provisioner's timeout, an interrupt) cancels it, so the wait's bound is the
/// agent's longest.
const COMMAND: WaitPolicy = WaitPolicy {
    first_poll: Duration::from_millis(200),
    max_interval: Duration::from_secs(2),
    total: run_command::LONGEST_EXECUTION,
};

/// How long a cancelled command may take to say it is over.
const CANCELLED: WaitPolicy = WaitPolicy {
    first_poll: Duration::from_millis(200),
    max_interval: Duration::from_secs(1),
    total: Duration::from_secs(60),
};

/// A command of amibake's own (a piece of a file, the clearing of traces) ends in seconds;
/// one that does not within this bound has lost its agent.
const HOUSEKEEPING: WaitPolicy = WaitPolicy {
    first_poll: Duration::from_millis(200),
    max_interval: Duration::from_secs(2),
    total: Duration::from_secs(10 * 60),
};

/// What the agent keeps of each command it ran (the document with its commands, the script,
/// its output), under its own directory: removed before the instance is imaged, but for the
/// directory of the command that removes them, which holds that command alone.
const CLEAR_TRACES: &str = r#"for kept in /var/lib/amazon/ssm/*/document/orchestration/* /var/lib/amazon/ssm/*/document/state/completed/*; do
  case "$0" in "$kept"/*) ;; *) rm -rf -- "$kept" ;; esac
done"#;

/// A file goes to the instance in pieces this large, each a command of its own: a command's
/// text is bounded. Base64 inside the sealed script, sealed and in base64 again, a piece
/// takes about 32 KiB of a command.
const UPLOAD_PIECE: usize = 18 << 10;
/// The largest file sent through commands.
pub const LARGEST_UPLOAD: u64 = 1 << 20;

pub struct Ssm {
    clients: Clients,
    instance_id: String,
    /// In SSM's list of commands, which run sent each.
    comment: String,
    /// Where the agent streams the output of the template's commands.
    log_group: Option<String>,
    /// The certificate of the key the instance made at the first sealed command.
    recipient: tokio::sync::OnceCell<Recipient>,
}

impl Ssm {
    pub fn new(
        clients: &Clients,
        instance_id: &str,
        build_id: &str,
        log_group: Option<&str>,
    ) -> Ssm {
        Ssm {
            clients: clients.clone(),
            instance_id: instance_id.to_string(),
            comment: format!("amibake build {build_id}"),
            log_group: log_group.map(str::to_string),
            recipient: tokio::sync::OnceCell::new(),
        }
    }

    /// `script` sealed for the instance; the first call has the instance make its key.
    async fn seal(&self, script: &str, action: &str) -> Result<String, CommError> {
        let recipient = self
            .recipient
            .get_or_try_init(|| async {
                let action = "make the instance's key for sealed commands";
                let certificate = self.housekeeping(sealed::MAKE_KEY, action).await?;
                Recipient::from_pem(&certificate).map_err(|e| self.failed(action, e))
            })
            .await?;
        recipient.seal(script).map_err(|e| self.failed(action, e))
    }

    /// Sends `script` and follows it to its end: its status, exit code and output. On
    /// `cancel`, or when it cannot be followed within `policy`, the command is cancelled and
    /// followed until SSM says it is over.
    ///
    /// With `output`, the command's output streams into the log group and is handed to it
    /// as it comes.
    async fn run_script(
        &self,
        script: &str,
        action: &str,
        policy: WaitPolicy,
        cancel: &CancellationToken,
        mut output: Option<&mut Output<'_>>,
    ) -> Result<Ended, CommError> {
        let clients = &self.clients;
        let id = &self.instance_id;
        let log_group = output.as_ref().map(|o| o.group.as_str());
        let command_id = run_command::send(clients, id, script, &self.comment, log_group)
            .await
            .map_err(|e| self.failed(action, e))?;
        if let Some(output) = output.as_deref_mut() {
            output.follow(&command_id, id);
        }
        // Each poll of the command reads the streams too: the poll's future borrows the
        // output only while it runs, through a lock no one else waits on.
        let output = output.map(Mutex::new);
        let followed = follow(clients, &command_id, id, policy, cancel, output.as_ref()).await;
        if followed.is_ok() {
            return followed.map_err(|e| self.failed(action, e));
        }
        // Whatever stopped the following (an interrupt, a timeout, a call that failed), the
        // command is cancelled and followed to its end, so nothing of it runs on once the
        // step is over; the instance goes next either way.
        let _ = run_command::cancel(clients, &command_id, id).await;
        let never = CancellationToken::new();
        let _ = follow(clients, &command_id, id, CANCELLED, &never, None).await;
        match followed {
            Err(WaitError::Interrupted { .. }) => Err(CommError::Interrupted {
                target: self.target(),
            }),
            other => other.map_err(|e| self.failed(action, e)),
        }
    }

    /// Runs one of amibake's own commands (a piece of a file, the clearing of traces), which
    /// must succeed within `HOUSEKEEPING`. Answers its output.
    async fn housekeeping(&self, script: &str, action: &str) -> Result<String, CommError> {
        let ended = self
            .run_script(
                script,
                action,
                HOUSEKEEPING,
                &CancellationToken::new(),
                None,
            )
            .await?;
        match (ended.status.as_str(), ended.code) {
            ("Success", 0) => Ok(ended.stdout),
            (status, code) => Err(self.failed(
                action,
                format!(
                    "{status}, exit code {code}: {}{}",
                    ended.stdout.trim(),
                    ended.stderr.trim()
                ),
            )),
        }
    }
}

/// Polls command `command_id` on `instance_id` until it has ended, handing what its log
/// streams gained to `output` at each poll.
async fn follow(
    clients: &Clients,
    command_id: &str,
    instance_id: &str,
    policy: WaitPolicy,
    cancel: &CancellationToken,
    output: Option<&Mutex<&mut Output<'_>>>,
) -> Result<Ended, WaitError<crate::aws::AwsError>> {
    wait_for(
        "command",
        command_id,
        policy,
        cancel,
        |_, _| {},
        || async {
            if let Some(output) = output {
                output.lock().await.read(clients, cancel).await;
            }
            Ok(
                match run_command::invocation(clients, command_id, instance_id).await? {
                    Invocation::NotTaken => Poll::Pending {
                        state: "not yet taken by the agent".into(),
                        percent: None,
                    },
                    Invocation::Running(status) => Poll::Pending {
                        state: status,
                        percent: None,
                    },
                    Invocation::Ended(ended) => Poll::Ready(ended),
                },
            )
        },
    )
    .await
}

/// How many pages of each stream one read goes through at most; the rest comes at the next.
const PAGES_PER_READ: usize = 5;
/// How long one read of the streams may hold up the following of the command.
const READ_BOUND: Duration = Duration::from_secs(5);
/// Once a command has ended, how long its streams may take to bring the rest of what SSM cut
/// (the agent sends its last lines after the status is final): read this often, until they
/// have brought nothing for `QUIET`, for `CATCH_UP` at most.
const CATCH_UP: Duration = Duration::from_secs(10);
const CATCH_UP_POLL: Duration = Duration::from_millis(500);
const QUIET: Duration = Duration::from_secs(3);

/// A command's output as the run shows it: from its log streams as the agent writes them,
/// then from SSM's answer for what they did not bring.
struct Output<'a> {
    group: String,
    /// stdout's stream, then stderr's.
    streams: Vec<Stream>,
    /// Set once a read failed: the streams are not read again.
    broken: bool,
    on_line: &'a mut (dyn for<'l> FnMut(&'l str) + Send),
}

struct Stream {
    follower: Follower,
    /// The lines shown from it that were not blank (CloudWatch Logs keeps no empty line).
    shown: usize,
}

impl<'a> Output<'a> {
    fn new(group: &str, on_line: &'a mut (dyn for<'l> FnMut(&'l str) + Send)) -> Output<'a> {
        Output {
            group: group.to_string(),
            streams: Vec::new(),
            broken: false,
            on_line,
        }
    }

    fn follow(&mut self, command_id: &str, instance_id: &str) {
        self.streams = ["stdout", "stderr"]
            .into_iter()
            .map(|stream| Stream {
                follower: Follower::new(
                    &self.group,
                    &run_command::output_stream(command_id, instance_id, stream),
                ),
                shown: 0,
            })
            .collect();
    }

    /// Shows what the streams gained since the last read, for `READ_BOUND` at most and
    /// until `cancel`: a slow or throttled read holds up neither an interrupt nor the
    /// command's own timeout, and what it had not read comes at the next.
    async fn read(&mut self, clients: &Clients, cancel: &CancellationToken) {
        tokio::select! {
            _ = self.read_pages(clients) => {}
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(READ_BOUND) => {}
        }
    }

    /// What the streams gained. A read that fails (the runner may not read the group) ends
    /// the reading: the output then comes when the command ends. Cancel-safe: a line is
    /// shown as soon as its page is read.
    async fn read_pages(&mut self, clients: &Clients) {
        if self.broken {
            return;
        }
        for stream in &mut self.streams {
            for _ in 0..PAGES_PER_READ {
                match stream.follower.next_page(clients).await {
                    Ok(page) => {
                        for line in &page.lines {
                            stream.shown += usize::from(!is_blank(line));
                            (self.on_line)(line);
                        }
                        if page.at_end {
                            break;
                        }
                    }
                    Err(e) => {
                        (self.on_line)(&format!(
                            "(the output is shown when the command ends: {e})"
                        ));
                        self.broken = true;
                        return;
                    }
                }
            }
        }
    }

    /// Once the command has ended: the streams' last lines, then what SSM kept beyond what
    /// they brought. Where SSM cut a stream, only its streamed copy holds the rest, and it
    /// is awaited (see `CATCH_UP`), unless `cancel` ends the wait. Answers, per stream,
    /// whether what was shown may lack what SSM cut.
    async fn finish(
        &mut self,
        clients: &Clients,
        ended: &Ended,
        cancel: &CancellationToken,
    ) -> [bool; 2] {
        let kept = [ended.stdout.as_str(), ended.stderr.as_str()];
        let cut = [kept[0].len() >= STDOUT_KEPT, kept[1].len() >= STDERR_KEPT];
        self.read(clients, cancel).await;
        if !self.streams.is_empty() && cut.contains(&true) {
            let started = tokio::time::Instant::now();
            let mut last_news = started;
            while !self.broken && last_news.elapsed() < QUIET && started.elapsed() < CATCH_UP {
                tokio::select! {
                    _ = tokio::time::sleep(CATCH_UP_POLL) => {}
                    _ = cancel.cancelled() => break,
                }
                let before: usize = self.streams.iter().map(|s| s.shown).sum();
                self.read(clients, cancel).await;
                if self.streams.iter().map(|s| s.shown).sum::<usize>() > before {
                    last_news = tokio::time::Instant::now();
                }
            }
        }
        let mut lacking = [false; 2];
        for (i, text) in kept.into_iter().enumerate() {
            let shown = self.streams.get(i).map_or(0, |s| s.shown);
            for line in unshown(text, shown) {
                (self.on_line)(line);
            }
            // The stream brought no more than SSM's cut copy holds.
            lacking[i] = cut[i] && shown <= non_blank(text);
        }
        lacking
    }
}

/// A line CloudWatch Logs does not keep: the streams are counted without them.
fn is_blank(line: &str) -> bool {
    line.trim().is_empty()
}

fn non_blank(text: &str) -> usize {
    text.lines().filter(|l| !is_blank(l)).count()
}

/// The lines of `text` (what SSM kept of a stream) after the first `shown` that were not
/// blank, which its log stream brought already; all of them when it brought none.
fn unshown(text: &str, shown: usize) -> Vec<&str> {
    match shown {
        0 => text.lines().collect(),
        _ => text.lines().filter(|l| !is_blank(l)).skip(shown).collect(),
    }
}

/// `command` after the assignments of `env`, exported to it.
fn script(command: &str, env: &BTreeMap<String, String>) -> String {
    if env.is_empty() {
        return command.to_string();
    }
    format!("set -a\n{}set +a\n{command}", assignments(env))
}

#[async_trait]
impl Communicator for Ssm {
    fn target(&self) -> String {
        format!("ssm {}", self.instance_id)
    }

    async fn run(
        &self,
        command: &str,
        env: &BTreeMap<String, String>,
        _network: &Network,
        on_line: &mut (dyn for<'l> FnMut(&'l str) + Send),
        cancel: &CancellationToken,
    ) -> Result<i32, CommError> {
        let mut output = Output::new(self.log_group.as_deref().unwrap_or_default(), on_line);
        let streamed = self.log_group.is_some().then_some(&mut output);
        let sealed = self.seal(&script(command, env), "run a command").await?;
        let ended = self
            .run_script(&sealed, "run a command", COMMAND, cancel, streamed)
            .await?;
        let lacking = output.finish(&self.clients, &ended, cancel).await;
        let Ended { status, code, .. } = ended;
        for (lacking, limit, stream) in [
            (lacking[0], STDOUT_KEPT, "output"),
            (lacking[1], STDERR_KEPT, "error output"),
        ] {
            if lacking {
                (output.on_line)(&format!(
                    "(SSM keeps the first {limit} characters of a command's {stream}: the rest is not shown)"
                ));
            }
        }
        match status.as_str() {
            "Success" | "Failed" => Ok(code),
            other => Err(self.failed(
                "run a command",
                format!("SSM says the command is {other} (exit code {code})"),
            )),
        }
    }

    async fn upload(&self, source: &Path, destination: &str, mode: u32) -> Result<(), CommError> {
        let action = format!("copy {} to {destination}", source.display());
        let contents = tokio::fs::read(source)
            .await
            .map_err(|e| self.failed(&action, e))?;
        if contents.len() as u64 > LARGEST_UPLOAD {
            return Err(self.failed(
                &action,
                format!(
                    "it is {} bytes, and over SSM a file of at most {LARGEST_UPLOAD} goes through commands (an output bucket for larger ones is not supported yet)",
                    contents.len()
                ),
            ));
        }
        // Each piece is appended to a fresh private file (whatever stood at its path is
        // removed first), installed where it belongs once whole.
        let staged = quote(&format!("{destination}.amibake-upload"));
        let pieces: Vec<&[u8]> = match contents.is_empty() {
            true => vec![&[]],
            false => contents.chunks(UPLOAD_PIECE).collect(),
        };
        for (i, piece) in pieces.iter().enumerate() {
            // As over SSH, the destination's directory is made as needed.
            let fresh = match i {
                0 => format!(
                    "umask 077; mkdir -p -- \"$(dirname -- {})\"; rm -f -- {staged}; ",
                    quote(destination)
                ),
                _ => String::new(),
            };
            let encoded = aws_smithy_types::base64::encode(piece);
            let mut script = format!(
                "set -e; {fresh}printf %s {} | base64 -d >> {staged}",
                quote(&encoded)
            );
            if i + 1 == pieces.len() {
                script.push_str(&format!(
                    "; chmod {mode:o} {staged}; mv -f -- {staged} {}",
                    quote(destination)
                ));
            }
            self.housekeeping(&self.seal(&script, &action).await?, &action)
                .await?;
        }
        Ok(())
    }

    async fn clear_traces(&self) -> Result<(), CommError> {
        let action = "clear the SSM agent's record of the commands it ran, and the instance's key";
        let script = format!("{CLEAR_TRACES}\n{}", sealed::FORGET_KEY);
        self.housekeeping(&script, action).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_ssm_kept_is_shown_after_the_lines_the_log_stream_brought() {
        let kept = "first\n\nsecond\nthird\n";
        assert_eq!(unshown(kept, 0), ["first", "", "second", "third"]);
        // The stream holds no blank line: two lines shown are `first` and `second`.
        assert_eq!(unshown(kept, 2), ["third"]);
        assert!(unshown(kept, 3).is_empty());
        // SSM cut its copy shorter than what the stream brought.
        assert!(unshown(kept, 10).is_empty());
    }

    #[test]
    fn the_environment_is_exported_before_the_command_and_quoted() {
        let env = BTreeMap::from([("APP".to_string(), "it's $(x)".to_string())]);
        let text = script("echo \"$APP\"", &env);
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&text)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "it's $(x)\n");
        assert_eq!(script("true", &BTreeMap::new()), "true");
    }
}

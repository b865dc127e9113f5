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

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::sealed::{self, Recipient};
use super::{assignments, quote, CommError, Communicator};
use crate::aws::logs::Follower;
use crate::aws::run_command::{self, Command, Ended, Invocation, STDERR_KEPT, STDOUT_KEPT};
use crate::aws::s3;
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
const LARGEST_UPLOAD: u64 = 1 << 20;
/// With a bucket, a file larger than this goes through it: one object and two commands
/// instead of a command a piece.
const THROUGH_BUCKET_ABOVE: u64 = 4 * UPLOAD_PIECE as u64;

pub struct Ssm {
    clients: Clients,
    instance_id: String,
    /// In SSM's list of commands, which run sent each.
    comment: String,
    /// Where the agent streams the output of the template's commands.
    log_group: Option<String>,
    /// Where a file too large for commands waits for the agent to fetch it, and the
    /// objects of the run's there until deleted.
    bucket: Option<StagedObjects>,
    build_id: String,
    /// The files sent through the bucket so far, each staged under its own key.
    files_through_bucket: std::sync::atomic::AtomicU32,
    /// The certificate of the key the instance made at the first sealed command.
    recipient: tokio::sync::OnceCell<Recipient>,
}

impl Ssm {
    pub fn new(
        clients: &Clients,
        instance_id: &str,
        build_id: &str,
        log_group: Option<&str>,
        bucket: Option<&str>,
    ) -> Ssm {
        Ssm {
            clients: clients.clone(),
            instance_id: instance_id.to_string(),
            comment: format!("amibake build {build_id}"),
            log_group: log_group.map(str::to_string),
            bucket: bucket.map(StagedObjects::new),
            build_id: build_id.to_string(),
            files_through_bucket: Default::default(),
            recipient: tokio::sync::OnceCell::new(),
        }
    }

    /// The objects this session has in the bucket: the run's cleanup deletes what a step
    /// cut short left there.
    pub fn staged_objects(&self) -> Option<StagedObjects> {
        self.bucket.clone()
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

    /// Sends `command` and follows it to its end: its status, exit code and output. On
    /// `cancel`, or when it cannot be followed within `policy`, the command is cancelled and
    /// followed until SSM says it is over.
    ///
    /// With `output` (for a script that names its log group), what the command writes is
    /// handed to it as it comes.
    async fn send_and_follow(
        &self,
        command: Command<'_>,
        action: &str,
        policy: WaitPolicy,
        cancel: &CancellationToken,
        mut output: Option<&mut Output<'_>>,
    ) -> Result<Ended, CommError> {
        let clients = &self.clients;
        let id = &self.instance_id;
        let command_id = run_command::send(clients, id, command, &self.comment)
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
        let script = Command::Script {
            script,
            log_group: None,
            output_bucket: None,
        };
        self.housekeeping_command(script, action).await
    }

    /// Runs `command`, one of amibake's own, which must succeed within `HOUSEKEEPING`.
    async fn housekeeping_command(
        &self,
        command: Command<'_>,
        action: &str,
    ) -> Result<String, CommError> {
        let ended = self
            .send_and_follow(
                command,
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
                    "{status}, exit code {code}: {}",
                    [ended.stdout.trim(), ended.stderr.trim()]
                        .into_iter()
                        .filter(|said| !said.is_empty())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )),
        }
    }
}

impl Ssm {
    /// Sends the file at `source` through the bucket: sealed into a private temporary file
    /// as it is read (memory stays flat whatever its size), staged as an object of the
    /// run's, fetched by the agent with the instance's role, opened and installed by a
    /// sealed command. The object is deleted whatever became of it, or named as left.
    async fn upload_through_bucket(
        &self,
        staged: &StagedObjects,
        source: &Path,
        destination: &str,
        mode: u32,
        action: &str,
    ) -> Result<(), CommError> {
        let name = format!(
            "file-{}",
            self.files_through_bucket
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                + 1
        );
        let key = s3::staged_key(&self.build_id, &name);
        let from = source.to_path_buf();
        let (copy, file_key) = tokio::task::spawn_blocking(move || {
            let mut copy = tempfile::NamedTempFile::new()
                .map_err(|e| format!("cannot make the sealed copy: {e}"))?;
            let mut writer = std::io::BufWriter::new(copy.as_file_mut());
            let file_key = sealed::seal_file(&from, &mut writer)?;
            std::io::Write::flush(&mut writer)
                .map_err(|e| format!("cannot write the sealed copy: {e}"))?;
            drop(writer);
            Ok::<_, String>((copy, file_key))
        })
        .await
        .map_err(|e| self.failed(action, e))?
        .map_err(|e| self.failed(action, e))?;
        // The key the instance opens it with goes in a sealed command, made first: the
        // instance's key directory, where the agent puts the file, is made with its key.
        let fetched = format!("{}/{name}", sealed::DIR);
        let install = format!(
            "set -e; {}{}; rm -f -- {}{}",
            fresh_staged(destination),
            file_key.open_command(&fetched, &staged_path(destination)),
            quote(&fetched),
            install_staged(destination, mode)
        );
        let install = self.seal(&install, action).await?;
        let bucket = staged.bucket.as_str();
        let url = s3::object_url(&self.clients.region, bucket, &key);
        let fetch = Command::Download {
            url: &url,
            into: sealed::DIR,
        };
        // A put whose answer was lost may have made the object: it is deleted either way,
        // and by the run's cleanup when this step is cut short.
        staged.record(&key);
        let delivered = match s3::put_file(&self.clients, bucket, &key, copy.path()).await {
            Ok(()) => match self.housekeeping_command(fetch, action).await {
                Ok(_) => self.housekeeping(&install, action).await.map(drop),
                Err(e) => Err(e),
            },
            Err(e) => Err(self.failed(action, e)),
        };
        drop(copy);
        let deleted = staged.delete(&self.clients, &key).await;
        match (delivered, deleted) {
            (delivered, Ok(())) => delivered,
            (delivered, Err(e)) => Err(self.failed(
                action,
                format!(
                    "{}s3://{bucket}/{key} (sealed) was not deleted, the run's cleanup tries again: {e}",
                    delivered
                        .err()
                        .map(|d| format!("{d}; "))
                        .unwrap_or_default()
                ),
            )),
        }
    }
}

/// Where a file is put together before it is installed at `destination`.
fn staged_path(destination: &str) -> String {
    quote(&format!("{destination}.amibake-upload"))
}

/// Makes `destination`'s directory as needed (under the agent's umask, as over SSH) and
/// puts the file together in a fresh, private one at its staging path: whatever stood
/// there is removed, and the new one is made only if nothing took its place meanwhile.
fn fresh_staged(destination: &str) -> String {
    let staged = staged_path(destination);
    format!(
        "mkdir -p -- \"$(dirname -- {})\"; rm -f -- {staged}; (umask 077; set -C; : > {staged}); ",
        quote(destination),
    )
}

/// Gives the staged file its mode and moves it to `destination`.
fn install_staged(destination: &str, mode: u32) -> String {
    let staged = staged_path(destination);
    format!(
        "; chmod {mode:o} {staged}; mv -f -- {staged} {}",
        quote(destination)
    )
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
/// then from SSM's answer for what they did not bring, or from the whole copy the agent put
/// in the output bucket where SSM cut its own.
struct Output<'a> {
    group: Option<String>,
    /// The output bucket and the key prefix the agent puts the whole output under.
    bucket: Option<(StagedObjects, String)>,
    /// stdout's stream, then stderr's (with a log group).
    streams: Vec<Stream>,
    /// stdout's whole copy, then stderr's (with an output bucket).
    copies: Option<[String; 2]>,
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
    fn new(
        group: Option<&str>,
        bucket: Option<(&StagedObjects, &str)>,
        on_line: &'a mut (dyn for<'l> FnMut(&'l str) + Send),
    ) -> Output<'a> {
        Output {
            group: group.map(str::to_string),
            bucket: bucket.map(|(b, p)| (b.clone(), p.to_string())),
            streams: Vec::new(),
            copies: None,
            broken: false,
            on_line,
        }
    }

    fn follow(&mut self, command_id: &str, instance_id: &str) {
        if let Some(group) = &self.group {
            self.streams = ["stdout", "stderr"]
                .into_iter()
                .map(|stream| Stream {
                    follower: Follower::new(
                        group,
                        &run_command::output_stream(command_id, instance_id, stream),
                    ),
                    shown: 0,
                })
                .collect();
        }
        // Recorded before the command is followed: the agent may put them at any time.
        self.copies = self.bucket.as_ref().map(|(staged, prefix)| {
            let copies = s3::output_copies(prefix, command_id, instance_id);
            copies.iter().for_each(|key| staged.record(key));
            copies
        });
    }

    /// The agent's whole copy of stream `i` from the output bucket, when there is one (its
    /// role may not write there). Ends at `cancel`, and after `READ_BOUND` × 6.
    async fn whole_copy(
        &mut self,
        clients: &Clients,
        i: usize,
        cancel: &CancellationToken,
    ) -> Option<String> {
        let (keys, (staged, _)) = (self.copies.as_ref()?, self.bucket.as_ref()?);
        let read = tokio::select! {
            read = s3::get_text(clients, &staged.bucket, &keys[i]) => read,
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(READ_BOUND * 6) => return None,
        };
        match read {
            Ok(copy) => copy,
            Err(e) => {
                (self.on_line)(&format!(
                    "(the whole output was not read: {e}; the instance's role may not have put it in the bucket, or this runner may not read it there)"
                ));
                None
            }
        }
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
        // SSM counts characters, not bytes.
        let cut = [
            kept[0].chars().count() >= STDOUT_KEPT,
            kept[1].chars().count() >= STDERR_KEPT,
        ];
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
        for (i, kept) in kept.into_iter().enumerate() {
            let shown = self.streams.get(i).map_or(0, |s| s.shown);
            // The stream brought no more than SSM's cut copy holds.
            let short = cut[i] && shown <= non_blank(kept);
            // Where SSM cut its copy, the agent's whole one holds the rest, whatever the
            // stream brought, when it could put one.
            let whole = match cut[i] {
                true => self.whole_copy(clients, i, cancel).await,
                false => None,
            };
            let text = whole.as_deref().unwrap_or(kept);
            for line in unshown(text, shown) {
                (self.on_line)(line);
            }
            lacking[i] = short && whole.is_none();
        }
        lacking
    }
}

/// The objects a session has in its bucket (staged files, the agent's copies of outputs),
/// recorded before they may exist and forgotten once deleted; shared with the run's
/// cleanup, which deletes what a step cut short (an interrupt past its grace) left.
#[derive(Clone)]
pub struct StagedObjects {
    bucket: String,
    keys: Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl StagedObjects {
    fn new(bucket: &str) -> StagedObjects {
        StagedObjects {
            bucket: bucket.to_string(),
            keys: Default::default(),
        }
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record(&self, key: &str) {
        self.keys().insert(key.to_string());
    }

    /// Deletes `key`, and forgets it once it is gone.
    async fn delete(&self, clients: &Clients, key: &str) -> Result<(), crate::aws::AwsError> {
        s3::delete_object(clients, &self.bucket, key).await?;
        self.keys().remove(key);
        Ok(())
    }

    /// Deletes every object still recorded; names those left.
    pub async fn delete_all(&self, clients: &Clients) -> Result<(), String> {
        let keys: Vec<String> = self.keys().iter().cloned().collect();
        self.delete_each(clients, keys).await
    }

    /// Deletes each of `keys`, all tried; names those left.
    async fn delete_each(
        &self,
        clients: &Clients,
        keys: impl IntoIterator<Item = String>,
    ) -> Result<(), String> {
        let mut left = Vec::new();
        for key in keys {
            if let Err(e) = self.delete(clients, &key).await {
                left.push(format!("s3://{}/{key} is left: {e}", self.bucket));
            }
        }
        match left.is_empty() {
            true => Ok(()),
            false => Err(left.join("; ")),
        }
    }

    /// What the run's cleanup names it by.
    pub fn describe(&self, build_id: &str) -> String {
        format!(
            "the objects of the run in s3://{}/{}",
            self.bucket,
            s3::staged_key(build_id, "")
        )
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
        // The agent's whole copies go under the run's own prefix, and are deleted once read.
        let prefix = s3::staged_key(&self.build_id, "output");
        let bucket = self.bucket.as_ref().map(|b| (b, prefix.as_str()));
        let mut output = Output::new(self.log_group.as_deref(), bucket, on_line);
        let sealed = self.seal(&script(command, env), "run a command").await?;
        let command = Command::Script {
            script: &sealed,
            log_group: self.log_group.as_deref(),
            output_bucket: bucket.map(|(staged, prefix)| (staged.bucket.as_str(), prefix)),
        };
        let ended = self
            .send_and_follow(command, "run a command", COMMAND, cancel, Some(&mut output))
            .await;
        let result = match ended {
            Err(e) => Err(e),
            Ok(ended) => {
                let lacking = output.finish(&self.clients, &ended, cancel).await;
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
                let Ended { status, code, .. } = ended;
                match status.as_str() {
                    "Success" | "Failed" => Ok(code),
                    other => Err(self.failed(
                        "run a command",
                        format!("SSM says the command is {other} (exit code {code})"),
                    )),
                }
            }
        };
        // The agent's copies hold what the command printed: deleted once shown.
        let removed = match (&self.bucket, output.copies.take()) {
            (Some(staged), Some(copies)) => staged.delete_each(&self.clients, copies).await,
            _ => Ok(()),
        };
        match removed {
            Ok(()) => result,
            Err(left) => Err(self.failed(
                "run a command",
                match result {
                    Err(e) => format!("{e}; {left}"),
                    Ok(_) => left,
                },
            )),
        }
    }

    async fn upload(&self, source: &Path, destination: &str, mode: u32) -> Result<(), CommError> {
        let action = format!("copy {} to {destination}", source.display());
        let size = tokio::fs::metadata(source)
            .await
            .map_err(|e| self.failed(&action, e))?
            .len();
        match &self.bucket {
            Some(staged) if size > THROUGH_BUCKET_ABOVE => {
                return self
                    .upload_through_bucket(staged, source, destination, mode, &action)
                    .await
            }
            None if size > LARGEST_UPLOAD => {
                return Err(self.failed(
                    &action,
                    format!(
                        "it is {size} bytes, and over SSM a file of at most {LARGEST_UPLOAD} goes through commands: name an S3 bucket for larger ones in `ssm_bucket`"
                    ),
                ))
            }
            _ => {}
        }
        let contents = tokio::fs::read(source)
            .await
            .map_err(|e| self.failed(&action, e))?;
        // Each piece is written at its own offset of a fresh private file (a command SSM
        // was sent twice, its answer lost, writes it twice in place), and the file is
        // installed where it belongs once whole, as its SHA-256 says.
        let staged = staged_path(destination);
        let digest = sealed::hex(&Sha256::digest(&contents));
        let pieces: Vec<&[u8]> = match contents.is_empty() {
            true => vec![&[]],
            false => contents.chunks(UPLOAD_PIECE).collect(),
        };
        for (i, piece) in pieces.iter().enumerate() {
            let fresh = match i {
                0 => fresh_staged(destination),
                _ => String::new(),
            };
            let encoded = aws_smithy_types::base64::encode(piece);
            let mut script = format!(
                "set -e; {fresh}printf %s {} | base64 -d | dd of={staged} bs={UPLOAD_PIECE} seek={i} conv=notrunc iflag=fullblock status=none",
                quote(&encoded)
            );
            if i + 1 == pieces.len() {
                script.push_str(&format!(
                    "; printf '%s  %s\\n' {digest} {staged} | sha256sum -c --status - || {{ echo \"the file put together on the instance is not the one sent\" >&2; exit 1; }}{}",
                    install_staged(destination, mode)
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

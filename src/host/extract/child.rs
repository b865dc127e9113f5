//! The extraction and the tarball's check as child processes of this binary: the child's
//! side (enter the sandbox, read standard input; the extraction reports progress as JSON
//! lines, the check keeps the tar stream) and the parent's (feed it, follow its progress,
//! kill it on interrupt, read why it failed).

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{check_entries, resolve_owner, unpack, ExtractError, ExtractSpec, Extracted, Kept};
use crate::host::image_root::ImageRoot;
use crate::sandbox;

/// One line of the child's progress report on stdout.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    #[serde(flatten)]
    done: Extracted,
    /// Of the tar stream: how far the extraction has read.
    read: u64,
}

/// Counts what passes through, so progress can be told against the tarball's size (the
/// decompressor's thread reads, the reporting thread tells).
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
}

impl<R: std::io::Read> std::io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// The child's side (`amibake internal-extract`): leave the host for a sandbox in the image,
/// then unpack standard input into `spec.dest`, reporting progress as JSON lines on stdout.
/// Runs before any async runtime: the sandbox forks.
pub fn child_main(
    root: &Path,
    spec: &ExtractSpec,
    isolation: sandbox::Isolation,
) -> Result<Extracted, ExtractError> {
    sandbox::enter(root, &sandbox::Purpose::Extract, isolation)?;
    let image = ImageRoot::open(Path::new("/")).map_err(|e| ExtractError::Dest {
        dest: spec.dest.clone(),
        reason: e.to_string(),
    })?;
    let owner = spec
        .owner
        .as_deref()
        .map(|owner| resolve_owner(owner, |file| image.read(&format!("/etc/{file}"))))
        .transpose()?;
    report_progress(|input, on_progress| unpack(input, &image, spec, owner, on_progress))
}

/// The child's side of the tarball's check (`amibake internal-check-tarball`): leave the host
/// for a sandbox rooted in the empty directory `root`, with no capabilities, then read
/// standard input through `check_entries`, keeping the tar stream it reads on standard
/// output (a file the parent opened), at most `keep_at_most` bytes of it.
pub fn check_child_main(
    root: &Path,
    isolation: sandbox::Isolation,
    keep_at_most: u64,
) -> Result<Extracted, ExtractError> {
    sandbox::enter(root, &sandbox::Purpose::Check, isolation)?;
    // Written straight to the descriptor: `stdout()` would look for line ends in it.
    let out = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .map_err(ExtractError::Keep)?;
    let mut keep = Kept::new(std::fs::File::from(out), keep_at_most);
    check_entries(std::io::stdin(), &mut keep)
}

/// Runs `work` over standard input, reporting its running totals and how much of the input
/// it has read as JSON lines on stdout, every `PROGRESS_EVERY` and once at the end.
fn report_progress(
    work: impl FnOnce(
        &mut (dyn Read + Send),
        &mut dyn FnMut(Extracted),
    ) -> Result<Extracted, ExtractError>,
) -> Result<Extracted, ExtractError> {
    let mut out = std::io::stdout().lock();
    let mut last_report = std::time::Instant::now();
    let read = Arc::new(AtomicU64::new(0));
    let report = |done: Extracted, out: &mut std::io::StdoutLock| {
        let _ = serde_json::to_writer(
            &mut *out,
            &Report {
                done,
                read: read.load(Ordering::Relaxed),
            },
        );
        let _ = writeln!(out);
    };
    let mut input = Counting {
        // Not `stdin().lock()`, whose guard stays on the thread that took it.
        inner: std::io::stdin(),
        read: read.clone(),
    };
    let done = work(&mut input, &mut |done| {
        if last_report.elapsed() >= PROGRESS_EVERY {
            report(done, &mut out);
            last_report = std::time::Instant::now();
        }
    })?;
    report(done, &mut out);
    Ok(done)
}

/// How often the child reports progress: often enough for a live bar, rarely enough that a
/// tarball of many small files does not become a flood of events.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Where the tarball comes from: a file, or our own standard input (`--tarball -`).
#[derive(Debug, Clone)]
pub enum Tarball {
    File(PathBuf),
    Stdin,
}

impl Tarball {
    fn name(&self) -> PathBuf {
        match self {
            Tarball::File(path) => path.clone(),
            Tarball::Stdin => PathBuf::from("-"),
        }
    }
}

/// The parent's side of the extraction: unpacks `tar_stream` (the tar stream the check kept)
/// as `spec` says inside the image mounted at `root`, through a sandboxed child run from
/// `amibake_exe` (this binary: `std::env::current_exe()`). `on_progress` hears the running
/// totals and how many bytes of the stream have been read; `cancel` kills the child.
pub async fn extract_into_image(
    amibake_exe: &Path,
    root: &Path,
    spec: &ExtractSpec,
    tar_stream: &Path,
    isolation: sandbox::Isolation,
    on_progress: impl FnMut(Extracted, u64),
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Extracted, ExtractError> {
    let input = std::fs::File::open(tar_stream).map_err(|source| ExtractError::Read {
        path: tar_stream.to_path_buf(),
        source,
    })?;
    let mut command = tokio::process::Command::new(amibake_exe);
    command
        .arg("internal-extract")
        .arg("--root")
        .arg(root)
        .arg("--isolation")
        .arg(isolation.to_arg())
        .arg("--dest")
        .arg(&spec.dest);
    if let Some(owner) = &spec.owner {
        command.arg("--owner").arg(owner);
    }
    if spec.keep_setuid {
        command.arg("--keep-setuid");
    }
    command.stdin(input).stdout(Stdio::piped());
    run_child("the extraction", command, on_progress, cancel).await
}

/// The parent's side of the tarball's check, before any AWS call. `tarball` is read once,
/// here, digested on the way and fed to `check_entries` in a sandboxed child (run from
/// `amibake_exe`) whose root is the empty directory `empty_root` and which holds no
/// capabilities, so the decompressor and the tar parser meet a hostile tarball with nothing
/// to reach. The child keeps the tar stream it read in `keep_at`, a new file, at most
/// `keep_at_most` bytes: the one copy the extraction reads, so what it places is what was
/// checked, whatever becomes of the tarball meanwhile. Answers the SHA-256 of the
/// tarball's bytes as given; `ExtractError::Refused` when the tarball itself is at fault.
pub async fn check_tarball(
    amibake_exe: &Path,
    empty_root: &Path,
    tarball: &Tarball,
    keep_at: &Path,
    keep_at_most: u64,
    isolation: sandbox::Isolation,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<String, ExtractError> {
    use std::os::unix::fs::OpenOptionsExt;
    let kept = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(keep_at)
        .map_err(ExtractError::Keep)?;
    let (child_reads, parent_writes) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| ExtractError::Child(format!("cannot start the tarball's check: {e}")))?;
    let mut command = tokio::process::Command::new(amibake_exe);
    command
        .arg("internal-check-tarball")
        .arg("--root")
        .arg(empty_root)
        .arg("--isolation")
        .arg(isolation.to_arg())
        .arg("--keep-at-most")
        .arg(keep_at_most.to_string())
        .stdin(child_reads)
        .stdout(kept);
    let stop = Arc::new(AtomicBool::new(false));
    let mut feeding = tokio::task::spawn_blocking({
        let (tarball, stop) = (tarball.clone(), stop.clone());
        move || feed(&tarball, parent_writes, &stop)
    });
    let checked = run_child("the tarball's check", command, |_, _| {}, cancel).await;
    if checked.is_err() {
        stop.store(true, Ordering::Relaxed);
        // A tarball that could not be read reads as cut short to the check: its reading's
        // own error is the cause.
        let fed = tokio::time::timeout(FEED_ENDS_WITHIN, &mut feeding).await;
        if let Ok(Ok(Err(unread @ ExtractError::Read { .. }))) = fed {
            return Err(unread);
        }
    }
    checked?;
    feeding.await.expect("the feed does not panic")
}

/// How long a feed stopped by a failed check has to say whether it failed first.
const FEED_ENDS_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads `tarball` to its end, a piece at a time: each piece digested, and written to the
/// check until it stops reading (it has what it needs, it refused the tarball, or it was
/// killed). Ends early at `stop`. Answers the digest of every byte read.
fn feed(tarball: &Tarball, to_check: OwnedFd, stop: &AtomicBool) -> Result<String, ExtractError> {
    let unread = |source| ExtractError::Read {
        path: tarball.name(),
        source,
    };
    let mut source: Box<dyn Read> = match tarball {
        Tarball::File(path) => Box::new(std::fs::File::open(path).map_err(unread)?),
        Tarball::Stdin => Box::new(std::io::stdin()),
    };
    let mut to_check = Some(std::fs::File::from(to_check));
    let mut digest = Sha256::new();
    let mut piece = vec![0; super::PIECE];
    while !stop.load(Ordering::Relaxed) {
        let n = match source.read(&mut piece) {
            Ok(0) => return Ok(crate::artifact::sha256_hex(digest)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(unread(e)),
        };
        digest.update(&piece[..n]);
        if to_check
            .as_mut()
            .is_some_and(|out| out.write_all(&piece[..n]).is_err())
        {
            // The check stopped reading: the rest is only digested.
            to_check = None;
        }
    }
    Err(ExtractError::Child(
        "the tarball's check was stopped".into(),
    ))
}

/// Runs `what`, a child of this binary, with the standard input and output `command` gives
/// it: where its output is piped, it reports as `report_progress` does. `cancel` kills it.
/// A child that exits with `exit::USAGE` refused the tarball (`ExtractError::Refused`).
async fn run_child(
    what: &str,
    mut command: tokio::process::Command,
    mut on_progress: impl FnMut(Extracted, u64),
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Extracted, ExtractError> {
    use tokio::io::AsyncBufReadExt;

    crate::sandbox::detach_and_die_with_parent(&mut command);
    let spawned = command
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ExtractError::Child(format!("cannot start {what}: {e}")));
    // The command holds our copies of the child's descriptors: closed now, so that a pipe's
    // writer hears when the child stops reading.
    drop(command);
    let mut child = spawned?;
    let mut stderr = child.stderr.take().expect("piped");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let reports = child.stdout.take();
    let mut last = Extracted::default();
    let ended = async {
        if let Some(reports) = reports {
            let mut lines = tokio::io::BufReader::new(reports).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(report) = serde_json::from_str::<Report>(&line) {
                    last = report.done;
                    on_progress(last, report.read);
                }
            }
        }
        child.wait().await
    };
    let ended = tokio::select! {
        status = ended => Some(status),
        _ = cancel.cancelled() => None,
    };
    let Some(status) = ended else {
        let _ = child.kill().await;
        return Err(ExtractError::Child(format!("{what} was interrupted")));
    };
    let status = status.map_err(|e| ExtractError::Child(format!("{what}: {e}")))?;
    let message = errors.await.unwrap_or_default();
    if !status.success() {
        let message = message.trim().trim_start_matches("error: ");
        if message.is_empty() {
            return Err(ExtractError::Child(format!("{what} exited with {status}")));
        }
        return Err(if status.code() == Some(crate::exit::USAGE) {
            ExtractError::Refused(message.to_string())
        } else {
            ExtractError::Child(message.to_string())
        });
    }
    Ok(last)
}

//! The extraction and the tarball's check as child processes of this binary: the child's
//! side (enter the sandbox, read standard input, report progress as JSON lines) and the
//! parent's (start it, follow its progress, kill it on interrupt, read why it failed).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{check_entries, resolve_owner, unpack, ExtractError, ExtractSpec, Extracted};
use crate::host::image_root::ImageRoot;
use crate::sandbox;

/// One line of the child's progress report on stdout.
#[derive(Debug, Serialize, Deserialize)]
struct Report {
    #[serde(flatten)]
    done: Extracted,
    /// Of the tarball as given (compressed): how far the extraction has read.
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
/// standard input through `check_entries`, reporting as `child_main` does.
pub fn check_child_main(
    root: &Path,
    isolation: sandbox::Isolation,
) -> Result<Extracted, ExtractError> {
    sandbox::enter(root, &sandbox::Purpose::Check, isolation)?;
    report_progress(|input, on_progress| check_entries(input, on_progress))
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

/// Where the tarball comes from.
#[derive(Debug, Clone)]
pub enum Tarball {
    File(PathBuf),
    /// Our own standard input. After a refusal the child's decompressor still reads on, up
    /// to a piece or the input's end, before the child exits: a pipe that stays open and
    /// silent would hold it. A bake spools its tarball to a file first.
    Stdin,
}

/// The parent's side of the extraction: unpacks `tarball` as `spec` says inside the image
/// mounted at `root`, through a sandboxed child run from `amibake_exe` (this binary:
/// `std::env::current_exe()`). `on_progress` hears the running totals and how many bytes of
/// the tarball (as given, compressed) have been read; `cancel` kills the child.
pub async fn extract_into_image(
    amibake_exe: &Path,
    root: &Path,
    spec: &ExtractSpec,
    tarball: &Tarball,
    isolation: sandbox::Isolation,
    on_progress: impl FnMut(Extracted, u64),
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Extracted, ExtractError> {
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
    run_child("the extraction", command, tarball, on_progress, cancel).await
}

/// The parent's side of the tarball's check, before any AWS call: reads `tarball` through
/// `check_entries` in a sandboxed child (run from `amibake_exe`) whose root is the empty
/// directory `empty_root` and which holds no capabilities, so the decompressor and the tar
/// parser meet a hostile tarball with nothing to reach. Answers what the tarball holds;
/// `ExtractError::Refused` when the tarball itself is at fault.
pub async fn check_tarball(
    amibake_exe: &Path,
    empty_root: &Path,
    tarball: &Path,
    isolation: sandbox::Isolation,
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Extracted, ExtractError> {
    let mut command = tokio::process::Command::new(amibake_exe);
    command
        .arg("internal-check-tarball")
        .arg("--root")
        .arg(empty_root)
        .arg("--isolation")
        .arg(isolation.to_arg());
    let tarball = Tarball::File(tarball.to_path_buf());
    run_child("the tarball's check", command, &tarball, |_, _| {}, cancel).await
}

/// Runs `what`, a child of this binary that reads `tarball` on its standard input and
/// reports as `report_progress` does; `cancel` kills it. A child that exits with
/// `exit::USAGE` refused the tarball (`ExtractError::Refused`).
async fn run_child(
    what: &str,
    mut command: tokio::process::Command,
    tarball: &Tarball,
    mut on_progress: impl FnMut(Extracted, u64),
    cancel: &tokio_util::sync::CancellationToken,
) -> Result<Extracted, ExtractError> {
    use tokio::io::AsyncBufReadExt;

    crate::sandbox::detach_and_die_with_parent(&mut command);
    // The tarball file, or our own standard input, is the child's standard input.
    let input = match tarball {
        Tarball::File(path) => {
            Stdio::from(
                std::fs::File::open(path).map_err(|source| ExtractError::Read {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        Tarball::Stdin => Stdio::inherit(),
    };
    let mut child = command
        .stdin(input)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| ExtractError::Child(format!("cannot start {what}: {e}")))?;
    let mut stderr = child.stderr.take().expect("piped");
    let errors = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text).await;
        text
    });
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut last = Extracted::default();
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => {
                    if let Ok(report) = serde_json::from_str::<Report>(&line) {
                        last = report.done;
                        on_progress(last, report.read);
                    }
                }
                _ => break,
            },
            _ = cancel.cancelled() => {
                let _ = child.kill().await;
                return Err(ExtractError::Child(format!("{what} was interrupted")));
            }
        }
    }
    let status = child
        .wait()
        .await
        .map_err(|e| ExtractError::Child(format!("{what}: {e}")))?;
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

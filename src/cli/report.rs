//! What every command prints alike: progress while a build runs, its outcome once at the
//! end, errors with their whole cause chain, and listings for people or programs.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use amibake::artifact::Manifest;
use amibake::engine::render::{JsonLines, PlainLines, TerminalBars};
use amibake::engine::{self, EventSink, Outcome};
use amibake::exit;
use amibake::modes::{BuildResult, RunError};

use super::{GlobalArgs, OutputFormat};

/// A build's progress renderer, and the token SIGINT/SIGTERM cancel with which signal came.
pub struct Watch {
    pub sink: Arc<dyn EventSink>,
    pub cancel: CancellationToken,
    signalled: engine::Signalled,
}

pub fn watch_run(global: &GlobalArgs) -> Option<Watch> {
    let sink = progress_renderer(global.output, global.verbose);
    let cancel = CancellationToken::new();
    match engine::cancel_on_signals(cancel.clone(), sink.clone()) {
        Ok(signalled) => Some(Watch {
            sink,
            cancel,
            signalled,
        }),
        Err(e) => {
            eprintln!("error: cannot watch for interrupts: {e}");
            None
        }
    }
}

/// Bars on a terminal, timestamped lines in logs, JSON lines for programs; all on stderr.
fn progress_renderer(output: OutputFormat, verbose: bool) -> Arc<dyn EventSink> {
    match output {
        OutputFormat::Json => Arc::new(JsonLines::new(Box::new(std::io::stderr()))),
        OutputFormat::Human
            if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() =>
        {
            Arc::new(TerminalBars::new())
        }
        OutputFormat::Human => Arc::new(PlainLines::new(Box::new(std::io::stderr()), verbose)),
    }
}

/// Runs a build of either mode with its progress drawn and SIGINT/SIGTERM watched, then
/// prints how it ended. Its exit code.
pub async fn run_build<M: Manifest, F>(
    global: &GlobalArgs,
    manifest_file: Option<&Path>,
    build: impl FnOnce(Arc<dyn EventSink>, CancellationToken) -> F,
) -> i32
where
    F: std::future::Future<Output = Result<BuildResult<M>, RunError>>,
{
    let Some(watch) = watch_run(global) else {
        return exit::BUILD_FAILED;
    };
    match build(watch.sink.clone(), watch.cancel.clone()).await {
        Ok(result) => print_outcome(result, global.output, manifest_file, &watch),
        Err(e) => {
            let code = error(e);
            // Stopped by a signal before its first step (a pre command, the tarball's
            // check): it exits as an interrupted run does, whatever the error says.
            if watch.cancel.is_cancelled() {
                watch.signalled.exit_code()
            } else {
                code
            }
        }
    }
}

/// A build's outcome, said once: the result on stdout, what went wrong on stderr.
fn print_outcome<M: Manifest>(
    result: BuildResult<M>,
    output: OutputFormat,
    manifest_file: Option<&Path>,
    watch: &Watch,
) -> i32 {
    if let Some(report) = &result.report {
        match &report.outcome {
            Outcome::Succeeded => {}
            Outcome::Failed { step, error } => eprintln!("error: {step}: {error}"),
            Outcome::Interrupted { step } => {
                eprintln!("error: interrupted during {step}; cleaned up what it had made")
            }
        }
        for left in &report.leftovers {
            eprintln!("error: could not clean up {left}");
        }
        for kept in &report.kept {
            eprintln!("kept (--on-error=abort): {kept}");
        }
        for line in &report.to_look {
            eprintln!("{line}");
        }
    }
    let code = result
        .report
        .as_ref()
        .map(|r| r.exit_code(&watch.signalled))
        .unwrap_or(exit::OK);
    let Some(manifest) = result.manifest else {
        return code;
    };
    let json = serde_json::to_string(&manifest).unwrap_or_default();
    if let Some(path) = manifest_file {
        if let Err(e) = std::fs::write(path, format!("{json}\n")) {
            eprintln!(
                "error: cannot write the manifest to {}: {e}",
                path.display()
            );
            return exit::BUILD_FAILED;
        }
    }
    match output {
        OutputFormat::Json => println!("{json}"),
        OutputFormat::Human => {
            eprintln!("{}", manifest.summary());
            println!("{}", manifest.ami_id());
        }
    }
    // After the result: the image exists, and a pipeline may still want its id.
    if let Some(failure) = &result.post_failed {
        eprintln!("error: {failure}");
        return exit::BUILD_FAILED;
    }
    code
}

/// Prints an error once, from here, with its whole cause chain on one line; a template with
/// several problems gets one `error:` line for each.
pub fn error(err: RunError) -> i32 {
    let code = err.exit_code();
    for line in format!("{:#}", anyhow::Error::new(err)).lines() {
        eprintln!("error: {line}");
    }
    code
}

/// A command's error on stderr, with its whole cause chain on one line.
pub fn failure(err: &(dyn std::error::Error + 'static), code: i32) -> i32 {
    eprintln!("error: {}", engine::error_chain(err));
    code
}

/// A command's answer on stdout: JSON for programs, else its lines for people.
pub fn listing(output: OutputFormat, json: &serde_json::Value, lines: &[String]) {
    match output {
        OutputFormat::Json => println!("{json}"),
        OutputFormat::Human => lines.iter().for_each(|l| println!("{l}")),
    }
}

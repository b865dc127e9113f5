//! Pipeline stages on this machine, around a build: `pre` commands before it makes
//! anything, `post` commands once its image is registered and published. Each command is
//! an argument vector run in the template's directory (never through a shell) with the
//! build's facts in `AMIBAKE_*` variables; its output is the run's progress, and it is cut
//! at its timeout or at an interrupt, with everything it started.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::engine::{Event, EventSink};
use crate::template::StageCommand;

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("{stage} command `{name}` exited with status {code}")]
    Exited {
        stage: &'static str,
        name: String,
        code: i32,
    },
    #[error("{stage} command `{name}` ran past its {seconds} s timeout and was stopped")]
    TimedOut {
        stage: &'static str,
        name: String,
        seconds: u64,
    },
    #[error("{stage} command `{name}` could not run `{program}`")]
    Start {
        stage: &'static str,
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{stage} command `{name}` was interrupted")]
    Interrupted { stage: &'static str, name: String },
}

/// Runs `commands` one after another; the first to fail stops the stage. `vars` are the
/// build's facts, added to each command's environment before the template's own `env`.
pub async fn run(
    stage: &'static str,
    commands: &[StageCommand],
    vars: &[(&str, String)],
    sink: &Arc<dyn EventSink>,
    cancel: &CancellationToken,
) -> Result<(), StageError> {
    for (i, command) in commands.iter().enumerate() {
        sink.emit(&Event::Note {
            step: stage.to_string(),
            message: format!(
                "{stage} command {} of {}: {}",
                i + 1,
                commands.len(),
                command.name
            ),
        });
        run_one(stage, command, vars, sink, cancel).await?;
    }
    Ok(())
}

/// Runs one command to its end, its timeout or an interrupt, streaming its output. Kept
/// whole: the child, its output readers and the three ways it ends belong together.
async fn run_one(
    stage: &'static str,
    command: &StageCommand,
    vars: &[(&str, String)],
    sink: &Arc<dyn EventSink>,
    cancel: &CancellationToken,
) -> Result<(), StageError> {
    let name = || command.name.clone();
    // `./check.sh` is the template's, wherever amibake was started; `curl` is on PATH.
    let program = match PathBuf::from(&command.argv[0]) {
        p if p.is_relative() && p.components().count() > 1 => command.dir.join(p),
        p => p,
    };
    let mut child = tokio::process::Command::new(&program)
        .args(&command.argv[1..])
        .current_dir(&command.dir)
        .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
        .envs(&command.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout or an interrupt ends all it started.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| StageError::Start {
            stage,
            name: name(),
            program: program.display().to_string(),
            source,
        })?;
    let mut out = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("piped")).lines();
    let emit = |line: String| {
        sink.emit(&Event::Output {
            step: stage.to_string(),
            source: command.name.clone(),
            line,
        })
    };
    let deadline = tokio::time::sleep(command.timeout);
    tokio::pin!(deadline);
    let (mut out_open, mut err_open) = (true, true);
    let stopped = loop {
        tokio::select! {
            line = out.next_line(), if out_open => match line {
                Ok(Some(line)) => emit(line),
                _ => out_open = false,
            },
            line = err.next_line(), if err_open => match line {
                Ok(Some(line)) => emit(line),
                _ => err_open = false,
            },
            status = child.wait(), if !out_open && !err_open => break Ok(status),
            _ = &mut deadline => break Err(StageError::TimedOut {
                stage,
                name: name(),
                seconds: command.timeout.as_secs(),
            }),
            _ = cancel.cancelled() => break Err(StageError::Interrupted { stage, name: name() }),
        }
    };
    match stopped {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(status) => {
            // A command killed by a signal has no exit code; say it as a shell would.
            let code = status.ok().map_or(-1, |s| {
                s.code().unwrap_or_else(|| {
                    128 + std::os::unix::process::ExitStatusExt::signal(&s).unwrap_or(0)
                })
            });
            Err(StageError::Exited {
                stage,
                name: name(),
                code,
            })
        }
        Err(stop) => {
            if let Some(pid) = child
                .id()
                .and_then(|p| rustix::process::Pid::from_raw(p as i32))
            {
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
            let _ = child.wait().await;
            Err(stop)
        }
    }
}

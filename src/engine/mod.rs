//! The engine both modes run on: an ordered list of steps over a typed state. Each step
//! registers how to undo what it made the moment it exists; on failure, SIGINT or SIGTERM the
//! engine unwinds (every undo at once, but for those that wait on another), goes on past undos
//! that fail, and reports by id what is left.

pub mod events;
pub mod render;
pub mod undo;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use events::{Event, EventSink, Masked, Progress, Unit};
pub use undo::{error_chain, BoxError, Keep, Kept, Leftover, UndoId, UndoStack};

/// How long a step may take, after an interrupt, to reach a point where everything it made
/// is recorded (an SDK call in flight returns its id). Past this the step is abandoned.
const INTERRUPT_GRACE: Duration = Duration::from_secs(30);

/// What a step gets besides the shared state.
pub struct StepContext {
    pub undo: UndoStack,
    pub progress: Progress,
    /// Cancelled on SIGINT/SIGTERM; long waits and loops watch it.
    pub cancel: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error("interrupted")]
    Interrupted,
    #[error(transparent)]
    Failed(BoxError),
}

impl StepError {
    pub fn failed(err: impl Into<BoxError>) -> StepError {
        StepError::Failed(err.into())
    }
}

/// One thing done against the cloud or the host.
#[async_trait]
pub trait Step<S: Send>: Send + Sync {
    /// Short, lower case, what it does: "create volume".
    fn name(&self) -> &'static str;
    async fn run(&self, state: &mut S, ctx: &mut StepContext) -> Result<(), StepError>;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed { step: String, error: String },
    Interrupted { step: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct StepTime {
    pub step: String,
    pub seconds: f64,
}

/// What a failed run does with what it made (`--on-error`). An interrupted run always
/// cleans up: a signal asks for the run to end, not to be looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    #[default]
    Cleanup,
    /// Keep it all (an instance, a mount) for a person to look at; `gc --build-id`
    /// removes it afterwards.
    Keep,
}

/// How a run ended, how long each step took, and what could not be cleaned.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub build_id: String,
    pub outcome: Outcome,
    pub steps: Vec<StepTime>,
    pub leftovers: Vec<Leftover>,
    /// What a failed run kept, asked to (`OnFailure::Keep`).
    pub kept: Vec<Kept>,
    /// With `kept`: how to reach it and how to remove it, in lines for a person; the mode
    /// that ran knows them.
    pub to_look: Vec<String>,
    pub seconds: f64,
}

impl RunReport {
    /// The report with the template's secrets masked in what it says went wrong.
    pub fn masked(mut self, secrets: &crate::template::Secrets) -> RunReport {
        if let Outcome::Failed { error, .. } = &mut self.outcome {
            *error = secrets.mask(error);
        }
        for left in &mut self.leftovers {
            left.resource = secrets.mask(&left.resource);
            left.error = secrets.mask(&left.error);
        }
        for kept in &mut self.kept {
            kept.resource = secrets.mask(&kept.resource);
        }
        for line in &mut self.to_look {
            *line = secrets.mask(line);
        }
        self
    }

    /// Each step's seconds by name, as manifests carry them.
    pub fn step_seconds(&self) -> std::collections::BTreeMap<String, f64> {
        self.steps
            .iter()
            .map(|s| (s.step.clone(), s.seconds))
            .collect()
    }

    /// 0 ok, 1 failed (or succeeded but left something behind, or kept what it made),
    /// 130 interrupted by SIGINT, 143 by SIGTERM.
    pub fn exit_code(&self, signalled: &Signalled) -> i32 {
        match (
            &self.outcome,
            self.leftovers.is_empty() && self.kept.is_empty(),
        ) {
            (Outcome::Interrupted { .. }, _) => signalled.exit_code(),
            (Outcome::Succeeded, true) => 0,
            _ => 1,
        }
    }
}

/// Runs `steps` in order over `state`, then cleans up. Never returns early: whatever happens,
/// the undo stack is unwound before the report comes back, unless a step failed and
/// `on_failure` says to keep what the run made.
/// Long, and kept whole: every way out of a run (a step's failure, a signal, the end) and
/// the cleanup each takes are read in one place.
pub async fn run<S: Send>(
    mode: &str,
    build_id: &str,
    steps: &[Box<dyn Step<S>>],
    state: &mut S,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
    on_failure: OnFailure,
) -> RunReport {
    let started = Instant::now();
    sink.emit(&Event::RunStarted {
        mode: mode.into(),
        build_id: build_id.into(),
        steps: steps.len(),
    });
    let mut ctx = StepContext {
        undo: UndoStack::default(),
        progress: Progress::new(sink.clone(), ""),
        cancel: cancel.clone(),
    };
    let mut times = Vec::new();
    let mut outcome = Outcome::Succeeded;
    for (index, step) in steps.iter().enumerate() {
        let name = step.name();
        if cancel.is_cancelled() {
            outcome = Outcome::Interrupted { step: name.into() };
            break;
        }
        sink.emit(&Event::StepStarted {
            step: name.into(),
            index: index + 1,
            total: steps.len(),
        });
        ctx.progress = Progress::new(sink.clone(), name);
        let step_started = Instant::now();
        let result = run_step(step.as_ref(), state, &mut ctx, &cancel).await;
        let seconds = step_started.elapsed().as_secs_f64();
        sink.emit(&Event::StepFinished {
            step: name.into(),
            seconds,
            ok: result.is_ok(),
        });
        times.push(StepTime {
            step: name.into(),
            seconds,
        });
        match result {
            Ok(()) if cancel.is_cancelled() => {
                outcome = Outcome::Interrupted { step: name.into() };
                break;
            }
            Ok(()) => {}
            Err(StepError::Interrupted) => {
                outcome = Outcome::Interrupted { step: name.into() };
                break;
            }
            Err(StepError::Failed(_)) if cancel.is_cancelled() => {
                // A failure after an interrupt is most likely the interrupt surfacing.
                outcome = Outcome::Interrupted { step: name.into() };
                break;
            }
            Err(StepError::Failed(e)) => {
                outcome = Outcome::Failed {
                    step: name.into(),
                    error: error_chain(&*e),
                };
                break;
            }
        }
    }
    let succeeded = outcome == Outcome::Succeeded;
    if on_failure == OnFailure::Keep && matches!(outcome, Outcome::Failed { .. }) {
        let kept = ctx.undo.abandon();
        let seconds = started.elapsed().as_secs_f64();
        sink.emit(&Event::RunFinished {
            outcome: "failed, and kept what it made".into(),
            seconds,
        });
        return RunReport {
            build_id: build_id.into(),
            outcome,
            steps: times,
            leftovers: Vec::new(),
            kept,
            to_look: Vec::new(),
            seconds,
        };
    }
    let leftovers = ctx
        .undo
        .unwind(succeeded, |p| match p {
            undo::UndoProgress::Started { resource, action } => sink.emit(&Event::UndoStarted {
                resource: resource.into(),
                action: action.into(),
            }),
            undo::UndoProgress::Finished {
                resource,
                action,
                error,
            } => sink.emit(&Event::UndoFinished {
                resource: resource.into(),
                action: action.into(),
                error: error.map(Into::into),
            }),
        })
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let label = match (&outcome, leftovers.is_empty()) {
        (Outcome::Succeeded, true) => "succeeded",
        (Outcome::Succeeded, false) => "succeeded, but left resources behind",
        (Outcome::Failed { .. }, _) => "failed",
        (Outcome::Interrupted { .. }, _) => "interrupted",
    };
    sink.emit(&Event::RunFinished {
        outcome: label.into(),
        seconds,
    });
    RunReport {
        build_id: build_id.into(),
        outcome,
        steps: times,
        leftovers,
        kept: Vec::new(),
        to_look: Vec::new(),
        seconds,
    }
}

impl RunReport {
    /// The command that removes what this run kept.
    pub fn gc_kept(&self, region: &str) -> String {
        format!(
            "remove what this run kept with: amibake gc --build-id {} --region {region} --apply",
            self.build_id
        )
    }
}

/// Runs one step; on an interrupt, gives it `INTERRUPT_GRACE` to come back on its own (it
/// sees the cancelled token) so that what it created is recorded on the undo stack.
async fn run_step<S: Send>(
    step: &dyn Step<S>,
    state: &mut S,
    ctx: &mut StepContext,
    cancel: &CancellationToken,
) -> Result<(), StepError> {
    let future = step.run(state, ctx);
    tokio::pin!(future);
    tokio::select! {
        result = &mut future => result,
        _ = cancel.cancelled() => match tokio::time::timeout(INTERRUPT_GRACE, &mut future).await {
            Ok(result) => result,
            Err(_) => Err(StepError::Interrupted),
        },
    }
}

/// Which signal interrupted the run, once one has: SIGINT and SIGTERM end a run with
/// different exit codes, as a shell reports them.
#[derive(Debug, Clone, Default)]
pub struct Signalled(Arc<std::sync::OnceLock<&'static str>>);

impl Signalled {
    /// The exit code of an interrupted run: 143 after SIGTERM, else 130.
    pub fn exit_code(&self) -> i32 {
        match self.0.get() {
            Some(&"SIGTERM") => crate::exit::TERMINATED,
            _ => crate::exit::INTERRUPTED,
        }
    }
}

/// Cancels `cancel` on the first SIGINT or SIGTERM, and says so through `sink`. The
/// returned handle tells which one came first.
pub fn cancel_on_signals(
    cancel: CancellationToken,
    sink: Arc<dyn EventSink>,
) -> std::io::Result<Signalled> {
    let signalled = Signalled::default();
    let first = signalled.0.clone();
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = interrupt.recv() => "SIGINT",
                _ = terminate.recv() => "SIGTERM",
            };
            let _ = first.set(name);
            sink.emit(&Event::Interrupted {
                signal: name.into(),
            });
            // Further signals are reported but do not cut the cleanup short: a half-run
            // cleanup is what leaks resources.
            cancel.cancel();
        }
    });
    Ok(signalled)
}

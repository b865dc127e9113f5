//! Progress as a stream of events. Library code only emits them; the CLI picks how they are
//! shown (see `render`).

use std::sync::Arc;

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize, schemars::JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        mode: String,
        build_id: String,
        steps: usize,
    },
    StepStarted {
        step: String,
        index: usize,
        total: usize,
    },
    /// Measurable progress inside a step: bytes extracted, snapshot percent.
    Progress {
        step: String,
        done: u64,
        total: Option<u64>,
        unit: Unit,
        /// Files handled so far, where the work is a number of files too.
        #[serde(skip_serializing_if = "Option::is_none")]
        files: Option<u64>,
    },
    /// A line of a provisioner's output, or of another program the step runs.
    Output {
        step: String,
        source: String,
        line: String,
    },
    /// Something a person watching would want to know: "waiting for vol-1 (creating)".
    Note {
        step: String,
        message: String,
    },
    StepFinished {
        step: String,
        seconds: f64,
        ok: bool,
    },
    Interrupted {
        signal: String,
    },
    UndoStarted {
        resource: String,
        action: String,
    },
    UndoFinished {
        resource: String,
        action: String,
        error: Option<String>,
    },
    RunFinished {
        outcome: String,
        seconds: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Bytes,
    Files,
    Percent,
}

/// Receives every event of a run; the renderers implement it.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: &Event);
}

/// A sink that masks the template's secrets in every text an event carries (a provisioner's
/// output, notes, what an undo names) before the renderer sees it.
pub struct Masked {
    inner: Arc<dyn EventSink>,
    secrets: crate::template::Secrets,
}

impl Masked {
    /// `inner` itself when there is nothing to mask.
    pub fn wrap(
        inner: Arc<dyn EventSink>,
        secrets: &crate::template::Secrets,
    ) -> Arc<dyn EventSink> {
        if secrets.is_empty() {
            return inner;
        }
        Arc::new(Masked {
            inner,
            secrets: secrets.clone(),
        })
    }
}

impl EventSink for Masked {
    fn emit(&self, event: &Event) {
        let mask = |text: &String| self.secrets.mask(text);
        let masked = match event.clone() {
            // A command without a name is named by what it runs, which may hold a secret.
            Event::Output { step, source, line } => Event::Output {
                step,
                source: mask(&source),
                line: mask(&line),
            },
            Event::Note { step, message } => Event::Note {
                step,
                message: mask(&message),
            },
            Event::UndoStarted { resource, action } => Event::UndoStarted {
                resource: mask(&resource),
                action,
            },
            Event::UndoFinished {
                resource,
                action,
                error,
            } => Event::UndoFinished {
                resource: mask(&resource),
                action,
                error: error.as_ref().map(mask),
            },
            other => other,
        };
        self.inner.emit(&masked);
    }
}

/// What a step uses to report progress: the sink plus the step's own name.
#[derive(Clone)]
pub struct Progress {
    sink: Arc<dyn EventSink>,
    step: String,
}

impl Progress {
    pub fn new(sink: Arc<dyn EventSink>, step: impl Into<String>) -> Progress {
        Progress {
            sink,
            step: step.into(),
        }
    }

    pub fn step(&self) -> &str {
        &self.step
    }

    pub fn advance(&self, done: u64, total: Option<u64>, unit: Unit, files: Option<u64>) {
        self.sink.emit(&Event::Progress {
            step: self.step.clone(),
            done,
            total,
            unit,
            files,
        });
    }

    pub fn note(&self, message: impl Into<String>) {
        self.sink.emit(&Event::Note {
            step: self.step.clone(),
            message: message.into(),
        });
    }

    /// A line a command printed, its control characters escaped: what runs in an image
    /// never writes an escape sequence to the operator's terminal or a CI log.
    pub fn output(&self, source: &str, line: impl AsRef<str>) {
        self.sink.emit(&Event::Output {
            step: self.step.clone(),
            source: source.into(),
            line: printable(line.as_ref()),
        });
    }
}

/// `text` with its control characters (escape sequences, carriage returns, a bell) shown
/// escaped, Rust-style (`\u{1b}`), tabs kept: text from a tarball, an image or a command
/// that is safe to print on a terminal.
pub fn printable(text: &str) -> String {
    let mut shown = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\t' {
            shown.extend(c.escape_default());
        } else {
            shown.push(c);
        }
    }
    shown
}

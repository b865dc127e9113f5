//! The three ways a run shows its progress: indicatif bars and spinners for a person at a
//! terminal, plain timestamped lines for CI logs, JSON lines for programs. All go to stderr;
//! stdout is kept for results.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::events::{Event, EventSink, Unit};

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn human_amount(done: u64, unit: Unit) -> String {
    match unit {
        Unit::Bytes => indicatif::HumanBytes(done).to_string(),
        Unit::Files => format!("{done} files"),
        Unit::Percent => format!("{done}%"),
    }
}

/// ", 1204 files" when a progress counts files too.
fn files_so_far(files: Option<u64>) -> String {
    files.map(|f| format!(", {f} files")).unwrap_or_default()
}

/// JSON lines, one object per event with an `event` tag and a `time`.
pub struct JsonLines {
    out: Mutex<Box<dyn Write + Send>>,
}

impl JsonLines {
    pub fn new(out: Box<dyn Write + Send>) -> JsonLines {
        JsonLines {
            out: Mutex::new(out),
        }
    }
}

impl EventSink for JsonLines {
    fn emit(&self, event: &Event) {
        let mut value = serde_json::to_value(event).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("time".into(), now_rfc3339().into());
        }
        write_line(&self.out, format!("{value}\n"));
    }
}

/// One write a line: an unbuffered stderr would otherwise take a line a token at a time
/// (tens of system calls an event, hundreds of events an upload), and a line written in
/// one piece of at most PIPE_BUF bytes reaches a pipe shared with other writers whole.
fn write_line(out: &Mutex<Box<dyn Write + Send>>, line: String) {
    if let Ok(mut out) = out.lock() {
        let _ = out.write_all(line.as_bytes());
    }
}

/// Plain lines with a UTC timestamp, for logs. Progress is thinned out so a log stays
/// readable: a line per tenth of a known total, or one every `PLAIN_PROGRESS_EVERY`.
pub struct PlainLines {
    out: Mutex<Box<dyn Write + Send>>,
    last_progress: Mutex<HashMap<String, (u64, Instant)>>,
    /// Each step's first progress: where its rate is measured from.
    first_progress: Mutex<HashMap<String, (u64, Instant)>>,
    /// Also print notes (each wait's state, devices found): `-v`.
    verbose: bool,
}

/// ", 12.5 MiB/s, 40s left": the rate of `moved` bytes over `elapsed`, and the time left at
/// that rate once the total is known; empty until a rate can be told.
fn pace(moved: u64, elapsed: Duration, done: u64, total: Option<u64>) -> String {
    // Shorter than this, a rate is noise.
    const MEASURED_OVER: Duration = Duration::from_secs(1);
    if elapsed < MEASURED_OVER || moved == 0 {
        return String::new();
    }
    let per_second = moved as f64 / elapsed.as_secs_f64();
    let mut text = format!(", {}/s", indicatif::HumanBytes(per_second as u64));
    if let Some(total) = total.filter(|t| *t > done) {
        let left = Duration::from_secs(((total - done) as f64 / per_second).ceil() as u64);
        text.push_str(&format!(", {} left", indicatif::HumanDuration(left)));
    }
    text
}

/// How often plain output reports progress whose total is not known.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

impl PlainLines {
    pub fn new(out: Box<dyn Write + Send>, verbose: bool) -> PlainLines {
        PlainLines {
            out: Mutex::new(out),
            last_progress: Mutex::new(HashMap::new()),
            first_progress: Mutex::new(HashMap::new()),
            verbose,
        }
    }

    fn line(&self, text: &str) {
        write_line(&self.out, format!("{} {text}\n", now_rfc3339()));
    }

    fn progress_worth_a_line(&self, step: &str, done: u64, total: Option<u64>) -> bool {
        let mut last = self.last_progress.lock().unwrap_or_else(|p| p.into_inner());
        let tenth = |n: u64| total.filter(|t| *t > 0).map(|t| n * 10 / t);
        let worth = match last.get(step) {
            None => true,
            Some((prev, at)) => match total {
                Some(_) => tenth(done) != tenth(*prev) || Some(done) == total,
                None => at.elapsed() >= PLAIN_PROGRESS_EVERY,
            },
        };
        if worth {
            last.insert(step.to_string(), (done, Instant::now()));
        }
        worth
    }
}

impl EventSink for PlainLines {
    fn emit(&self, event: &Event) {
        match event {
            Event::RunStarted {
                mode,
                build_id,
                steps,
            } => self.line(&format!("{mode}: build {build_id}, {steps} steps")),
            Event::StepStarted { step, index, total } => {
                self.line(&format!("[{index}/{total}] {step}"))
            }
            Event::Progress {
                step,
                done,
                total,
                unit,
                files,
            } => {
                let (from, since) = *self
                    .first_progress
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(step.clone())
                    .or_insert((*done, Instant::now()));
                if self.progress_worth_a_line(step, *done, *total) {
                    let of = total
                        .map(|t| format!(" of {}", human_amount(t, *unit)))
                        .unwrap_or_default();
                    let pace = match unit {
                        Unit::Bytes => {
                            pace(done.saturating_sub(from), since.elapsed(), *done, *total)
                        }
                        _ => String::new(),
                    };
                    self.line(&format!(
                        "  {step}: {}{of}{}{pace}",
                        human_amount(*done, *unit),
                        files_so_far(*files)
                    ));
                }
            }
            Event::Output { source, line, .. } => self.line(&format!("  {source} | {line}")),
            Event::Note { step, message } if self.verbose => {
                self.line(&format!("  {step}: {message}"))
            }
            Event::Note { .. } => {}
            Event::StepFinished { step, seconds, ok } => self.line(&format!(
                "  {step}: {} in {seconds:.1}s",
                if *ok { "done" } else { "FAILED" }
            )),
            Event::Interrupted { signal } => {
                self.line(&format!("{signal} received: stopping and cleaning up"))
            }
            Event::UndoStarted { resource, action } => {
                self.line(&format!("cleanup: {action} {resource}"))
            }
            Event::UndoFinished {
                resource,
                action,
                error: Some(error),
            } => self.line(&format!("cleanup: {action} {resource} FAILED: {error}")),
            Event::UndoFinished { .. } => {}
            Event::RunFinished { outcome, seconds } => {
                self.line(&format!("{outcome} in {seconds:.1}s"))
            }
        }
    }
}

/// Bars and spinners for a person watching a terminal.
pub struct TerminalBars {
    multi: MultiProgress,
    current: Mutex<Option<(String, ProgressBar)>>,
}

impl TerminalBars {
    pub fn new() -> TerminalBars {
        TerminalBars::with_target(ProgressDrawTarget::stderr())
    }

    /// Draws somewhere else than stderr (tests draw into an in-memory terminal).
    pub fn with_target(target: ProgressDrawTarget) -> TerminalBars {
        TerminalBars {
            multi: MultiProgress::with_draw_target(target),
            current: Mutex::new(None),
        }
    }

    fn println(&self, text: &str) {
        let _ = self.multi.println(text);
    }
}

impl Default for TerminalBars {
    fn default() -> Self {
        TerminalBars::new()
    }
}

// Tick rate for spinners: fast enough to look alive, slow enough to cost nothing.
const SPINNER_TICK: Duration = Duration::from_millis(120);

impl EventSink for TerminalBars {
    /// One arm per kind of event, each short: long only because there are many kinds.
    fn emit(&self, event: &Event) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match event {
            Event::RunStarted { mode, build_id, .. } => {
                self.println(&format!("amibake {mode} · build {build_id}"))
            }
            Event::StepStarted { step, index, total } => {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {prefix} {msg} {elapsed}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar.set_prefix(format!("[{index}/{total}] {step}"));
                bar.enable_steady_tick(SPINNER_TICK);
                *current = Some((step.clone(), bar));
            }
            Event::Progress {
                step,
                done,
                total,
                unit,
                files,
            } => {
                if let Some((_, bar)) = current.as_ref().filter(|(name, _)| name == step) {
                    match total {
                        Some(t) => {
                            if bar.length() != Some(*t) {
                                let template = match unit {
                                    Unit::Bytes => "{spinner} {prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left {msg}",
                                    Unit::Files => "{spinner} {prefix} [{bar:30}] {pos}/{len} files {msg}",
                                    Unit::Percent => "{spinner} {prefix} [{bar:30}] {pos}% {msg}",
                                };
                                bar.set_style(
                                    ProgressStyle::with_template(template)
                                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                                        .progress_chars("=> "),
                                );
                                bar.set_length(*t);
                            }
                            bar.set_position(*done);
                            if files.is_some() {
                                bar.set_message(
                                    files_so_far(*files).trim_start_matches(", ").to_string(),
                                );
                            }
                        }
                        // Bytes without a total yet (an upload while its blocks are still
                        // found): how many and how fast.
                        None if *unit == Unit::Bytes && files.is_none() => {
                            if bar.position() == 0 {
                                bar.set_style(
                                    ProgressStyle::with_template(
                                        "{spinner} {prefix} {bytes} {bytes_per_sec} {msg}",
                                    )
                                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                                );
                            }
                            bar.set_position(*done);
                        }
                        None => bar.set_message(format!(
                            "{}{}",
                            human_amount(*done, *unit),
                            files_so_far(*files)
                        )),
                    }
                }
            }
            Event::Output { source, line, .. } => self.println(&format!("  {source} | {line}")),
            Event::Note { message, .. } => {
                if let Some((_, bar)) = current.as_ref() {
                    bar.set_message(message.clone());
                }
            }
            Event::StepFinished { step, seconds, ok } => {
                if let Some((_, bar)) = current.take() {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                self.println(&format!(
                    "{} {step} ({seconds:.1}s)",
                    if *ok { "✓" } else { "✗" }
                ));
            }
            Event::Interrupted { signal } => {
                self.println(&format!("{signal}: stopping and cleaning up…"))
            }
            Event::UndoStarted { .. } => {}
            Event::UndoFinished {
                resource,
                action,
                error,
            } => match error {
                None => self.println(&format!("  cleaned: {action} {resource}")),
                Some(e) => self.println(&format!("  NOT cleaned: {action} {resource}: {e}")),
            },
            Event::RunFinished { outcome, seconds } => {
                self.println(&format!("{outcome} in {seconds:.1}s"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Keeps each write call's bytes apart, as a pipe shared with other writers would see them.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_event_reaches_the_output_as_one_whole_line() {
        let note = Event::Note {
            step: "upload snapshot".into(),
            message: "286 blocks put, \"quoted\"".into(),
        };
        let json = Writes::default();
        let sink = JsonLines::new(Box::new(json.clone()));
        sink.emit(&note);
        sink.emit(&note);
        let plain = Writes::default();
        let sink = PlainLines::new(Box::new(plain.clone()), true);
        sink.emit(&note);
        for (sink, writes) in [("json", json), ("plain", plain)] {
            let writes = writes.0.lock().unwrap();
            assert!(!writes.is_empty(), "{sink}: nothing written");
            for write in writes.iter() {
                let line = String::from_utf8_lossy(write);
                assert!(
                    line.ends_with('\n') && line.matches('\n').count() == 1,
                    "{sink}: a write that is not one whole line: {line:?}"
                );
                assert!(line.contains("286 blocks put"), "{sink}: {line:?}");
            }
            if sink == "json" {
                assert_eq!(writes.len(), 2, "one write an event");
                let value: serde_json::Value = serde_json::from_slice(&writes[0]).unwrap();
                assert_eq!(value["step"], "upload snapshot");
            }
        }
    }

    #[test]
    fn pace_tells_the_rate_and_once_the_total_is_known_the_time_left() {
        let mib = 1 << 20;
        assert_eq!(
            pace(10 * mib, Duration::from_millis(500), 10 * mib, None),
            ""
        );
        assert_eq!(
            pace(20 * mib, Duration::from_secs(2), 20 * mib, None),
            ", 10.00 MiB/s"
        );
        assert_eq!(
            pace(20 * mib, Duration::from_secs(2), 20 * mib, Some(420 * mib)),
            ", 10.00 MiB/s, 40 seconds left"
        );
        assert_eq!(
            pace(20 * mib, Duration::from_secs(2), 20 * mib, Some(20 * mib)),
            ", 10.00 MiB/s"
        );
    }
}

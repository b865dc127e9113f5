//! The step engine through its public API: order, undo, interrupts, progress renderers.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amibake::engine::render::{JsonLines, PlainLines, TerminalBars};
use amibake::engine::{
    self, Event, EventSink, Keep, OnFailure, Outcome, Step, StepContext, StepError, Unit,
};
use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

/// The state these test steps share: a log of what was done and undone.
#[derive(Default)]
struct Journal {
    log: Arc<Mutex<Vec<String>>>,
}

/// Makes a resource, registers its undo, optionally reports progress, optionally fails.
struct MakeThing {
    name: &'static str,
    resource: &'static str,
    undo_fails: bool,
    fail: bool,
    keep: Keep,
}

#[async_trait]
impl Step<Journal> for MakeThing {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn run(&self, state: &mut Journal, ctx: &mut StepContext) -> Result<(), StepError> {
        if self.fail {
            return Err(StepError::failed(format!(
                "cannot create {}",
                self.resource
            )));
        }
        state
            .log
            .lock()
            .unwrap()
            .push(format!("made {}", self.resource));
        let log = state.log.clone();
        let (resource, undo_fails) = (self.resource, self.undo_fails);
        ctx.undo.push(resource, "remove", self.keep, move || {
            let log = log.clone();
            async move {
                log.lock().unwrap().push(format!("removed {resource}"));
                if undo_fails {
                    Err(format!("{resource} is still in use").into())
                } else {
                    Ok(())
                }
            }
        });
        ctx.progress.note(format!("{} is ready", self.resource));
        ctx.progress.advance(50, Some(100), Unit::Percent, None);
        ctx.progress
            .output("provisioner", format!("hello from {}", self.name));
        ctx.progress.advance(100, Some(100), Unit::Percent, None);
        Ok(())
    }
}

fn step(name: &'static str, resource: &'static str) -> Box<dyn Step<Journal>> {
    Box::new(MakeThing {
        name,
        resource,
        undo_fails: false,
        fail: false,
        keep: Keep::Never,
    })
}

#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);
impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl SharedBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

struct Collect(Mutex<Vec<engine::Event>>);
impl EventSink for Collect {
    fn emit(&self, event: &engine::Event) {
        self.0.lock().unwrap().push(event.clone());
    }
}

async fn run_steps(
    steps: Vec<Box<dyn Step<Journal>>>,
    sink: Arc<dyn EventSink>,
) -> (engine::RunReport, Vec<String>) {
    run_steps_with(steps, sink, OnFailure::Cleanup, CancellationToken::new()).await
}

async fn run_steps_with(
    steps: Vec<Box<dyn Step<Journal>>>,
    sink: Arc<dyn EventSink>,
    on_failure: OnFailure,
    cancel: CancellationToken,
) -> (engine::RunReport, Vec<String>) {
    let mut journal = Journal::default();
    let report = engine::run(
        "test",
        "ab-1",
        &steps,
        &mut journal,
        sink,
        cancel,
        on_failure,
    )
    .await;
    let log = journal.log.lock().unwrap().clone();
    (report, log)
}

/// `--on-error=abort`: a failed run undoes nothing and names what it kept, oldest first;
/// a run that succeeds still removes its temporary resources.
#[tokio::test]
async fn a_failed_run_told_to_keep_undoes_nothing_and_names_what_it_kept() {
    let _module = crate::util::module_turn(module_path!());
    let failing = || -> Vec<Box<dyn Step<Journal>>> {
        vec![
            step("launch", "i-1"),
            step("connect", "ssh i-1"),
            Box::new(MakeThing {
                name: "provision",
                resource: "-",
                undo_fails: false,
                fail: true,
                keep: Keep::Never,
            }),
        ]
    };
    let sink: Arc<dyn EventSink> = Arc::new(Collect(Mutex::new(Vec::new())));
    let (report, log) = run_steps_with(
        failing(),
        sink.clone(),
        OnFailure::Keep,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(log, ["made i-1", "made ssh i-1"], "nothing removed");
    let kept: Vec<&str> = report.kept.iter().map(|k| k.resource.as_str()).collect();
    assert_eq!(kept, ["i-1", "ssh i-1"]);
    assert!(report.leftovers.is_empty());
    assert_eq!(report.exit_code(&Default::default()), 1);

    let (report, log) = run_steps_with(
        vec![step("launch", "i-2")],
        sink,
        OnFailure::Keep,
        CancellationToken::new(),
    )
    .await;
    assert_eq!(log, ["made i-2", "removed i-2"], "a success cleans up");
    assert!(report.kept.is_empty());
}

#[tokio::test]
async fn a_failure_undoes_everything_in_reverse_and_reports_what_stayed() {
    let _module = crate::util::module_turn(module_path!());
    let steps: Vec<Box<dyn Step<Journal>>> = vec![
        step("create volume", "vol-1"),
        Box::new(MakeThing {
            name: "attach volume",
            resource: "vol-1:/dev/sdf",
            undo_fails: true,
            fail: false,
            keep: Keep::Never,
        }),
        step("mount", "/mnt/x"),
        Box::new(MakeThing {
            name: "extract",
            resource: "-",
            undo_fails: false,
            fail: true,
            keep: Keep::Never,
        }),
        step("never reached", "nothing"),
    ];
    let sink = Arc::new(Collect(Mutex::new(Vec::new())));
    let (report, log) = run_steps(steps, sink.clone()).await;
    assert_eq!(
        log,
        [
            "made vol-1",
            "made vol-1:/dev/sdf",
            "made /mnt/x",
            "removed /mnt/x",
            "removed vol-1:/dev/sdf",
            "removed vol-1"
        ]
    );
    assert_eq!(
        report.outcome,
        Outcome::Failed {
            step: "extract".into(),
            error: "cannot create -".into()
        }
    );
    assert_eq!(report.leftovers.len(), 1);
    assert_eq!(report.leftovers[0].resource, "vol-1:/dev/sdf");
    assert!(report.leftovers[0].error.contains("still in use"));
    assert_eq!(report.exit_code(&engine::Signalled::default()), 1);
    assert_eq!(
        report
            .steps
            .iter()
            .map(|s| s.step.as_str())
            .collect::<Vec<_>>(),
        ["create volume", "attach volume", "mount", "extract"]
    );
    let events = sink.0.lock().unwrap();
    assert!(events.contains(&engine::Event::UndoFinished {
        resource: "vol-1:/dev/sdf".into(),
        action: "remove".into(),
        error: Some("vol-1:/dev/sdf is still in use".into())
    }));
}

#[tokio::test]
async fn success_keeps_the_artifact_and_removes_the_temporary() {
    let _module = crate::util::module_turn(module_path!());
    let steps: Vec<Box<dyn Step<Journal>>> = vec![
        step("create volume", "vol-1"),
        Box::new(MakeThing {
            name: "register image",
            resource: "ami-1",
            undo_fails: false,
            fail: false,
            keep: Keep::OnSuccess,
        }),
    ];
    let (report, log) = run_steps(steps, Arc::new(Collect(Mutex::new(Vec::new())))).await;
    assert_eq!(report.outcome, Outcome::Succeeded);
    assert_eq!(report.exit_code(&engine::Signalled::default()), 0);
    assert_eq!(log, ["made vol-1", "made ami-1", "removed vol-1"]);
}

#[tokio::test]
async fn a_success_that_leaves_a_resource_behind_is_not_exit_0() {
    let _module = crate::util::module_turn(module_path!());
    let steps: Vec<Box<dyn Step<Journal>>> = vec![Box::new(MakeThing {
        name: "create key pair",
        resource: "key-1",
        undo_fails: true,
        fail: false,
        keep: Keep::Never,
    })];
    let (report, _) = run_steps(steps, Arc::new(Collect(Mutex::new(Vec::new())))).await;
    assert_eq!(report.outcome, Outcome::Succeeded);
    assert_eq!(report.exit_code(&engine::Signalled::default()), 1);
}

fn three_steps() -> Vec<Box<dyn Step<Journal>>> {
    vec![
        step("create volume", "vol-1"),
        Box::new(MakeThing {
            name: "attach volume",
            resource: "vol-1:/dev/sdf",
            undo_fails: true,
            fail: false,
            keep: Keep::Never,
        }),
        Box::new(MakeThing {
            name: "extract",
            resource: "-",
            undo_fails: false,
            fail: true,
            keep: Keep::Never,
        }),
    ]
}

#[tokio::test]
async fn json_renderer_gets_every_event_as_a_line() {
    let _module = crate::util::module_turn(module_path!());
    let buf = SharedBuf::default();
    run_steps(
        three_steps(),
        Arc::new(JsonLines::new(Box::new(buf.clone()))),
    )
    .await;
    let events: Vec<serde_json::Value> = buf
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"run_started"));
    assert_eq!(kinds.last(), Some(&"run_finished"));
    assert!(events
        .iter()
        .all(|e| e["time"].as_str().is_some_and(|t| t.ends_with('Z'))));
    assert!(events
        .iter()
        .any(|e| e["event"] == "progress" && e["done"] == 100 && e["unit"] == "percent"));
    assert!(events
        .iter()
        .any(|e| e["event"] == "output" && e["line"] == "hello from create volume"));
    assert!(events
        .iter()
        .any(|e| e["event"] == "undo_finished" && e["error"] == "vol-1:/dev/sdf is still in use"));
}

#[tokio::test]
async fn plain_renderer_writes_timestamped_lines() {
    let _module = crate::util::module_turn(module_path!());
    let buf = SharedBuf::default();
    run_steps(
        three_steps(),
        Arc::new(PlainLines::new(Box::new(buf.clone()), false)),
    )
    .await;
    let text = buf.text();
    for needle in [
        "[1/3] create volume",
        "create volume: 50%",
        "provisioner | hello from attach volume",
        "extract: FAILED in",
        "cleanup: remove vol-1:/dev/sdf FAILED: vol-1:/dev/sdf is still in use",
        "failed in",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    assert!(!text.contains("is ready"), "notes only with -v:\n{text}");
    // Every line starts with an RFC 3339 UTC time.
    for line in text.lines() {
        let stamp = line.split(' ').next().unwrap();
        assert!(
            stamp.len() >= 20 && stamp.as_bytes()[10] == b'T' && stamp.ends_with('Z'),
            "{line:?}"
        );
    }
}

#[tokio::test]
async fn plain_renderer_shows_notes_when_verbose() {
    let _module = crate::util::module_turn(module_path!());
    let buf = SharedBuf::default();
    run_steps(
        three_steps(),
        Arc::new(PlainLines::new(Box::new(buf.clone()), true)),
    )
    .await;
    assert!(
        buf.text().contains("create volume: vol-1 is ready"),
        "{}",
        buf.text()
    );
}

#[tokio::test]
async fn terminal_renderer_draws_steps_and_cleanup() {
    let _module = crate::util::module_turn(module_path!());
    let term = indicatif::InMemoryTerm::new(40, 120);
    let target = indicatif::ProgressDrawTarget::term_like(Box::new(term.clone()));
    run_steps(three_steps(), Arc::new(TerminalBars::with_target(target))).await;
    let screen = term.contents();
    for needle in [
        "✓ create volume",
        "✓ attach volume",
        "✗ extract",
        "provisioner | hello from create volume",
        "NOT cleaned: remove vol-1:/dev/sdf",
        "failed in",
    ] {
        assert!(
            screen.contains(needle),
            "missing {needle:?} on screen:\n{screen}"
        );
    }
}

/// Runs in a child process, started by `sigint_and_sigterm_run_the_undos_and_exit_130_and_143`: a run whose
/// second step blocks until interrupted. Ignored when the suite runs it directly.
#[test]
#[ignore = "child process of sigint_and_sigterm_run_the_undos_and_exit_130_and_143"]
fn sigint_child() {
    let _module = crate::util::module_turn(module_path!());
    let log_path = std::env::var("AMIBAKE_TEST_UNDO_LOG").expect("started by the parent test");
    struct WaitForever;
    #[async_trait]
    impl Step<Journal> for WaitForever {
        fn name(&self) -> &'static str {
            "extract"
        }
        async fn run(&self, state: &mut Journal, ctx: &mut StepContext) -> Result<(), StepError> {
            let log = state.log.clone();
            ctx.undo
                .push("/mnt/image", "unmount", Keep::Never, move || {
                    let log = log.clone();
                    async move {
                        log.lock().unwrap().push("removed /mnt/image".into());
                        Ok(())
                    }
                });
            println!("READY");
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(120)) => Ok(()),
                _ = ctx.cancel.cancelled() => Err(StepError::Interrupted),
            }
        }
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let code = runtime.block_on(async {
        let sink: Arc<dyn EventSink> = Arc::new(Collect(Mutex::new(Vec::new())));
        let cancel = CancellationToken::new();
        let signalled = engine::cancel_on_signals(cancel.clone(), sink.clone()).unwrap();
        let steps: Vec<Box<dyn Step<Journal>>> =
            vec![step("create volume", "vol-1"), Box::new(WaitForever)];
        // Told to keep what a failure leaves: an interrupt cleans up all the same.
        let (report, log) = run_steps_with(steps, sink, OnFailure::Keep, cancel).await;
        std::fs::write(&log_path, log.join("\n")).unwrap();
        assert_eq!(
            report.outcome,
            Outcome::Interrupted {
                step: "extract".into()
            }
        );
        report.exit_code(&signalled)
    });
    std::process::exit(code);
}

#[test]
fn sigint_and_sigterm_run_the_undos_and_exit_130_and_143() {
    let _module = crate::util::module_turn(module_path!());
    for (signal, code) in [("-INT", 130), ("-TERM", 143)] {
        let tmp = tempfile::tempdir().unwrap();
        let log_path = tmp.path().join("undo.log");
        // The child test by its full name in this binary: `engine::sigint_child`.
        let module = module_path!().split_once("::").map_or("", |(_, m)| m);
        let child_test = format!("{module}::sigint_child");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                &child_test,
                "--nocapture",
                "--test-threads=1",
            ])
            .env("AMIBAKE_TEST_UNDO_LOG", &log_path)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("READY") {
            line.clear();
            assert!(
                std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() > 0,
                "child ended before it was ready"
            );
        }
        let kill = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{signal}");
        let log = std::fs::read_to_string(&log_path).unwrap();
        // The final cleanup starts both undos at once (neither waits on the other), so
        // they may end in either order.
        let mut lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.remove(0), "made vol-1", "{log}");
        lines.sort_unstable();
        assert_eq!(lines, ["removed /mnt/image", "removed vol-1"], "{log}");
    }
}

#[tokio::test]
async fn extraction_progress_shows_bytes_against_the_tarball_and_files() {
    let _module = crate::util::module_turn(module_path!());
    let progress_of = |sink: &dyn EventSink| {
        sink.emit(&Event::StepStarted {
            step: "extract tarball".into(),
            index: 4,
            total: 8,
        });
        sink.emit(&Event::Progress {
            step: "extract tarball".into(),
            done: 5 << 20,
            total: Some(10 << 20),
            unit: Unit::Bytes,
            files: Some(1204),
        });
    };
    let term = indicatif::InMemoryTerm::new(10, 160);
    let target = indicatif::ProgressDrawTarget::term_like(Box::new(term.clone()));
    let bars = TerminalBars::with_target(target);
    progress_of(&bars);
    // The bar redraws on its spinner's tick.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let screen = term.contents();
    assert!(
        screen.contains("[4/8] extract tarball") && screen.contains("5.00 MiB/10.00 MiB"),
        "{screen}"
    );
    assert!(screen.contains("1204 files"), "{screen}");

    let buf = SharedBuf::default();
    progress_of(&PlainLines::new(Box::new(buf.clone()), false));
    assert!(
        buf.text()
            .contains("extract tarball: 5.00 MiB of 10.00 MiB, 1204 files"),
        "{}",
        buf.text()
    );
}

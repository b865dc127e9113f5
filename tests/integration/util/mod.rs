//! Runs the real `amibake` binary and, when an assertion fails, shows everything about the run.

#![allow(dead_code)]

pub mod left;
pub mod localcloud;
pub mod schema;
pub mod small_filesystem;
pub mod tarballs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A run kept with `--on-error=abort` leaves, until its gc, what every other story asserts
/// is gone: such a story runs alone (`alone`), the others beside each other. Every story
/// with a local cloud takes its turn beside the others when the cloud starts, unless its
/// thread has a turn already.
static KEPT_RUNS: std::sync::RwLock<()> = std::sync::RwLock::new(());

thread_local! {
    /// Whether this thread holds a turn: a second read of the lock could wait behind a
    /// story waiting to run alone, which waits for this one.
    static HAS_TURN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A story's turn, held until it is dropped.
pub enum Turn {
    Beside(std::sync::RwLockReadGuard<'static, ()>),
    Alone(std::sync::RwLockWriteGuard<'static, ()>),
}

impl Drop for Turn {
    fn drop(&mut self) {
        HAS_TURN.with(|t| t.set(false));
    }
}

pub fn beside_others() -> Turn {
    let guard = KEPT_RUNS.read().unwrap_or_else(|e| e.into_inner());
    HAS_TURN.with(|t| t.set(true));
    Turn::Beside(guard)
}

pub fn alone() -> Turn {
    let guard = KEPT_RUNS.write().unwrap_or_else(|e| e.into_inner());
    HAS_TURN.with(|t| t.set(true));
    Turn::Alone(guard)
}

/// A turn beside the others, unless this thread has one.
pub fn turn_unless_held() -> Option<Turn> {
    (!HAS_TURN.with(|t| t.get())).then(beside_others)
}

/// Who has the machine: nobody, the sharing modules, or one machine-wide module.
#[derive(Clone, Copy, PartialEq)]
enum Holder {
    Nobody,
    Sharing,
    Module(&'static str),
}

struct Machine {
    holder: Holder,
    running: usize,
    /// Machine-wide stories waiting: sharing stories let them go first, so that a stream of
    /// sharing stories never keeps them out.
    wide_waiting: usize,
}

static MACHINE: std::sync::Mutex<Machine> = std::sync::Mutex::new(Machine {
    holder: Holder::Nobody,
    running: 0,
    wide_waiting: 0,
});
static MACHINE_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

/// A story's turn on the machine, held while it runs.
pub struct ModuleTurn;

impl Drop for ModuleTurn {
    fn drop(&mut self) {
        let mut machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
        machine.running -= 1;
        if machine.running == 0 {
            machine.holder = Holder::Nobody;
        }
        MACHINE_CHANGED.notify_all();
    }
}

/// Waits for the story's turn: a machine-wide module's stories run only beside each other,
/// the other modules' stories beside one another.
pub fn module_turn(module: &'static str) -> ModuleTurn {
    // The modules under `machine_wide` look at, or sweep, what every run on the machine made.
    let wide = module.contains("::machine_wide::");
    let mut machine = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    if wide {
        machine.wide_waiting += 1;
    }
    loop {
        let free = match machine.holder {
            Holder::Nobody => true,
            Holder::Sharing => !wide && machine.wide_waiting == 0,
            Holder::Module(holder) => holder == module,
        };
        if free {
            break;
        }
        machine = MACHINE_CHANGED
            .wait(machine)
            .unwrap_or_else(|e| e.into_inner());
    }
    if wide {
        machine.wide_waiting -= 1;
        machine.holder = Holder::Module(module);
    } else {
        machine.holder = Holder::Sharing;
    }
    machine.running += 1;
    ModuleTurn
}

/// The value of the EC2 tag `key` among `tags` (an image's, a snapshot's).
pub fn tag<'a>(tags: &'a [aws_sdk_ec2::types::Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|t| t.key() == Some(key))
        .and_then(|t| t.value())
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One finished run of the binary.
pub struct Run {
    pub command: String,
    pub output: Output,
}

impl Run {
    /// Asserts the run failed with one `error:` line that repeats `cause` and, when given,
    /// starts with the step it failed in.
    pub fn expect_failure(&self, cause: &str, step: Option<&str>) -> &Self {
        self.expect_code(1);
        let stderr = self.stderr();
        let error = stderr
            .lines()
            .find(|l| l.starts_with("error: "))
            .unwrap_or_else(|| panic!("no error line\n{}", self.dump()));
        assert!(
            error.contains(cause),
            "wanted {cause:?} in {error}\n{}",
            self.dump()
        );
        if let Some(step) = step {
            assert!(
                error.starts_with(&format!("error: {step}: ")),
                "the error names its step `{step}`: {error}"
            );
        }
        self
    }

    /// The build id the run announced (`--output json`), if its engine started.
    pub fn build_id(&self) -> Option<String> {
        self.stderr().lines().find_map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).ok()?;
            (event["event"] == "run_started")
                .then(|| event["build_id"].as_str().map(str::to_string))?
        })
    }

    /// Asserts the run was refused (exit 2), saying `what` on stderr.
    pub fn expect_refused(&self, what: &str) -> &Self {
        self.expect_code(2);
        assert!(
            self.stderr().contains(what),
            "wanted {what:?} on stderr\n{}",
            self.dump()
        );
        self
    }

    pub fn code(&self) -> i32 {
        self.output.status.code().unwrap_or(-1)
    }

    /// What the run answered as JSON on stdout: all of it, or its last line (a manifest
    /// after other output). Panics with the run's output when there is none.
    pub fn json(&self) -> serde_json::Value {
        let stdout = self.stdout();
        serde_json::from_str(stdout.trim())
            .or_else(|_| serde_json::from_str(stdout.lines().last().unwrap_or_default()))
            .unwrap_or_else(|e| panic!("no JSON answer: {e}\n{}", self.dump()))
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
    /// Everything about the run, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "command: {}\nexit code: {}\n--- stdout\n{}\n--- stderr\n{}",
            self.command,
            self.code(),
            self.stdout(),
            self.stderr()
        )
    }
    /// Asserts the run exited 1 naming, on an `error: could not clean up` line, a resource
    /// with every one of `parts` in the line.
    pub fn expect_leftover(&self, parts: &[&str]) -> &Self {
        self.expect_code(1);
        let stderr = self.stderr();
        let named = stderr
            .lines()
            .filter(|l| l.starts_with("error: could not clean up "))
            .any(|l| parts.iter().all(|p| l.contains(p)));
        assert!(named, "no leftover named with {parts:?}\n{}", self.dump());
        self
    }

    /// Asserts a run sent SIGTERM during `step` stopped there, cleaned up and exited 143
    /// well inside the 10 s a CI system gives between SIGTERM and SIGKILL.
    pub fn expect_terminated_in(&self, step: &str, after_signal: std::time::Duration) {
        const KILL_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);
        self.expect_code(143);
        assert!(
            self.stderr()
                .contains(&format!("error: interrupted during {step}; cleaned up")),
            "signalled in {step}\n{}",
            self.dump()
        );
        assert!(
            after_signal < KILL_WINDOW,
            "{step}: cleaned up in {after_signal:?}"
        );
    }

    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code(), code, "unexpected exit code\n{}", self.dump());
        self
    }
}

/// Where AWS is, for a run with no local cloud: a closed loopback port, so nothing a test runs
/// can reach a real account or the link-local metadata address.
pub const NOWHERE: &str = "http://127.0.0.1:9";

/// Runs `amibake ARGS` in `dir` with every AWS endpoint pointed at `NOWHERE`.
pub fn amibake_in(dir: &Path, args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_amibake"));
    cmd.args(args).current_dir(dir);
    for (key, _) in std::env::vars() {
        if key.starts_with("AWS_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("AWS_ENDPOINT_URL", NOWHERE)
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", NOWHERE)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test");
    let output = cmd.output().expect("amibake binary runs");
    Run {
        command: format!("amibake {}", args.join(" ")),
        output,
    }
}

pub fn amibake(args: &[&str]) -> Run {
    amibake_in(&repo_root(), args)
}

/// Runs `command` (its progress as JSON lines on stderr) and sends it SIGINT when a line of
/// its stderr satisfies `when`. The run's stderr holds every line, those before the signal
/// included. Panics if the run ends before any line does.
pub fn interrupt_when(command: Command, what: &str, when: impl FnMut(&str) -> bool) -> Run {
    signal_when(command, "-INT", what, when).0
}

/// Like `interrupt_when`, with `signal` for kill(1) (`-TERM`, `-INT`); also returns how long
/// the run went on after the signal.
pub fn signal_when(
    command: Command,
    signal: &str,
    what: &str,
    when: impl FnMut(&str) -> bool,
) -> (Run, std::time::Duration) {
    act_when(command, what, when, |pid, _| {
        let sent = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} {pid}");
    })
}

/// Runs `command` (its progress as JSON lines on stderr) and, once a line of its stderr
/// satisfies `when`, calls `act` with its pid and the lines so far; the run then goes on to
/// its end. Also returns how long it went on after `act`. Panics if the run ends before any
/// line satisfies `when`.
pub fn act_when(
    mut command: Command,
    what: &str,
    mut when: impl FnMut(&str) -> bool,
    act: impl FnOnce(u32, &[String]),
) -> (Run, std::time::Duration) {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("amibake binary runs");
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut acted = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        let now = when(&line);
        seen.push(line);
        if now {
            act(child.id(), &seen);
            acted = Some(std::time::Instant::now());
            break;
        }
    }
    seen.extend(lines.map(|l| l.unwrap()));
    let output = child.wait_with_output().unwrap();
    let after = acted.map(|at| at.elapsed()).unwrap_or_default();
    let run = Run {
        command: what.to_string(),
        output: Output {
            stderr: seen.join("\n").into_bytes(),
            ..output
        },
    };
    assert!(
        acted.is_some(),
        "the awaited line never came\n{}",
        run.dump()
    );
    (run, after)
}

/// The sandbox's own host ids for tests that run the sandbox's children directly, as a bake
/// does: one range, picked and held for the whole test binary.
pub fn isolation() -> amibake::sandbox::Isolation {
    static RANGE: std::sync::OnceLock<amibake::sandbox::ids::IdRange> = std::sync::OnceLock::new();
    let range = RANGE.get_or_init(|| amibake::sandbox::ids::IdRange::pick().expect("host ids"));
    amibake::sandbox::Isolation::OwnIds { base: range.base() }
}

/// A story with what one module adds to it: the module names itself with a type of its own
/// (`struct Stages; type World = util::World<Stages>;`) and writes its helpers in
/// `impl World`.
pub struct World<Module> {
    story: Story,
    module: std::marker::PhantomData<Module>,
}

impl<Module> World<Module> {
    /// `latency`: none, quick or realistic.
    pub fn new(latency: &str) -> Self {
        World::on(localcloud::LocalCloud::start(latency))
    }

    /// A story on `cloud`: one started with more than a latency (vendors, block latency).
    pub fn on(cloud: localcloud::LocalCloud) -> Self {
        World {
            story: Story::on(cloud),
            module: std::marker::PhantomData,
        }
    }
}

impl<Module> std::ops::Deref for World<Module> {
    type Target = Story;
    fn deref(&self) -> &Story {
        &self.story
    }
}

/// `bake TEMPLATE` of app.tar.gz at `commit`, with `extra` flags: the bake most stories
/// make.
pub fn bake_args<'a>(template: &'a str, commit: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "bake",
        template,
        "--tarball",
        "app.tar.gz",
        "--commit",
        commit,
    ];
    args.extend_from_slice(extra);
    args
}

/// `bake_args` of a template the story wrote as shop.toml, at commit c0ffee1.
pub fn shop_bake_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    bake_args("shop.toml", "c0ffee1", extra)
}

/// One story's world: its own local cloud, a directory for its templates and tarballs
/// (`app.tar.gz`, revision "one"), and amibake's clients for the cloud.
pub struct Story {
    pub cloud: localcloud::LocalCloud,
    dir: tempfile::TempDir,
    pub runtime: tokio::runtime::Runtime,
    pub clients: amibake::aws::Clients,
    /// Read from the cloud once: a cloud's catalogue never changes.
    vendor_ami: std::sync::OnceLock<String>,
}

impl Story {
    /// `latency`: none, quick or realistic.
    pub fn new(latency: &str) -> Story {
        Story::on(localcloud::LocalCloud::start(latency))
    }

    pub fn on(cloud: localcloud::LocalCloud) -> Story {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let clients = runtime.block_on(cloud.clients());
        let story = Story {
            cloud,
            dir: tempfile::tempdir().unwrap(),
            runtime,
            clients,
            vendor_ami: std::sync::OnceLock::new(),
        };
        tarballs::write_revision_tarball(&story.dir().join("app.tar.gz"), "one\n");
        story
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `amibake --output json ARGS` run to its end in the story's directory.
    pub fn run_amibake(&self, args: &[&str]) -> Run {
        self.cloud.run_amibake(self.dir(), args)
    }

    /// `amibake bake shop.toml` of the story's app.tar.gz at commit c0ffee1, with `extra`
    /// flags.
    pub fn bake_shop(&self, extra: &[&str]) -> Run {
        self.run_amibake(&shop_bake_args(extra))
    }

    /// `amibake bake shop.toml` of the story's app.tar.gz at `commit`.
    pub fn bake_shop_at(&self, commit: &str) -> Run {
        self.run_amibake(&bake_args("shop.toml", commit, &[]))
    }

    /// The local cloud's vendor image, partitioned as vendors' are.
    pub fn vendor_ami(&self) -> String {
        self.vendor_ami
            .get_or_init(|| {
                self.cloud.ls()["vendor_amis"]["partitioned"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .clone()
    }
}

/// Unmounts `target`, asked again while it is busy (a process of the test still leaving
/// it), and detached lazily once `within` has passed rather than left mounted.
pub fn unmount_or_detach(target: &Path, within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    let path = target.to_string_lossy().into_owned();
    let mounted = || {
        std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(path.as_str()))
    };
    while mounted() {
        let _ = Command::new("umount")
            .arg(target)
            .stderr(std::process::Stdio::null())
            .status();
        if mounted() && std::time::Instant::now() >= deadline {
            let _ = Command::new("umount").arg("--lazy").arg(target).status();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

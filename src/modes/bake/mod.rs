//! `amibake bake`: a deployment AMI from a base AMI and a code tarball, chroot-style.
//!
//! First, before any AWS call: pick the sandbox's host ids (or refuse a kernel that cannot
//! give them), copy the tarball once into the run's work directory, then check that copy (in
//! the sandbox) and digest it. Then, without
//! creating anything: choose the backend, resolve the base AMI and fingerprint the inputs;
//! an available image with that fingerprint is reused.
//! Then the engine runs the backend's list of steps (`attach::steps` on an EC2 build host,
//! `direct::steps` anywhere), each undone on failure or interrupt. A backend owns how the
//! image becomes a block device here and how that becomes a snapshot; the steps in `steps`
//! (mount, extract, provision, unmount, register) are the same for every backend.

mod attach;
mod direct;
mod steps;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::distribute::{self, RegionImage};
use super::{
    hold_run_lock, load_for_run, provisioner_fingerprint_parts, reusable, run_post, stages,
    BuildResult, CommonOptions, ModeError, Reuse, RunError,
};
use crate::artifact::{self, BakeManifest};
use crate::aws::ami::{self, BaseImage};
use crate::aws::host;
use crate::aws::{kms, sdk_config, Clients};
use crate::engine::{self, EventSink, RunReport, UndoId};
use crate::host::extract::{self, Extracted};
use crate::host::image_cache::ImageCache;
use crate::sandbox::Isolation;
use crate::template::{BakePlan, Commit, Network, SandboxMode, Template};

#[derive(Debug, Clone)]
pub struct BakeOptions {
    pub template: PathBuf,
    /// `-` reads standard input.
    pub tarball: PathBuf,
    pub commit: Option<String>,
    pub common: CommonOptions,
    /// This binary, which the chrooted extraction runs as (`std::env::current_exe()`).
    pub amibake_exe: PathBuf,
    pub backend: BackendChoice,
    /// The direct backend's image cache; `None`: `ImageCache::default_dir()`.
    pub cache_dir: Option<PathBuf>,
    /// `--sandbox`, over the template's `bake.sandbox`.
    pub sandbox: Option<SandboxMode>,
}

/// `--backend`: how the image becomes a block device on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// `attach` when this machine is an EC2 instance (its metadata service answers), else
    /// `direct`.
    #[default]
    Auto,
    /// A volume of the base, attached to this EC2 build host.
    Attach,
    /// The base's snapshot read and written through the EBS direct APIs, loop-attached here.
    Direct,
}

/// The backend chosen for a run, with what only it needs.
enum Chosen {
    Attach(host::HostIdentity),
    Direct,
}

impl Chosen {
    fn name(&self) -> &'static str {
        match self {
            Chosen::Attach(_) => "attach",
            Chosen::Direct => "direct",
        }
    }
}

/// Picks the backend before anything is made: the build host's identity for `attach`.
async fn choose_backend(choice: BackendChoice) -> Result<(Chosen, String), ModeError> {
    match choice {
        BackendChoice::Attach => Ok((
            Chosen::Attach(host::identity().await.map_err(Box::new)?),
            "backend attach (--backend attach)".into(),
        )),
        BackendChoice::Direct => Ok((Chosen::Direct, "backend direct (--backend direct)".into())),
        BackendChoice::Auto => match host::probe().await {
            Some(identity) => {
                let why = format!(
                    "backend attach: this machine is EC2 instance {} (--backend direct to bake without a volume)",
                    identity.instance_id
                );
                Ok((Chosen::Attach(identity), why))
            }
            None => Ok((
                Chosen::Direct,
                format!(
                    "backend direct: no instance metadata answered within {} ms, so this is not an EC2 build host",
                    host::PROBE_TIMEOUT.as_millis()
                ),
            )),
        },
    }
}

/// What a backend owns beyond the state all bakes share. Neither backend reads the
/// other's.
pub trait Backend: Send + Sync + 'static {
    /// The undo that gives the image's block device back (a volume's detach, a loop
    /// device's release): it waits for the unmount, never running under a live filesystem.
    fn device_release(&self) -> Option<UndoId>;
}

/// Everything the steps share, typed; `backend` is what only one backend has.
pub struct BakeState<B> {
    clients: Clients,
    base: BaseImage,
    plan: BakePlan,
    build_id: String,
    commit: String,
    tarball: PathBuf,
    tarball_sha256: String,
    fingerprint: String,
    mount_point: PathBuf,
    amibake_exe: PathBuf,
    /// Who root in the sandbox is on this host, and which mode the run asked for.
    isolation: Isolation,
    sandbox_mode: SandboxMode,
    /// The block device the image's root filesystem is on, once the backend has one.
    root_device: Option<PathBuf>,
    unmount_root: Option<UndoId>,
    restore_files: Option<UndoId>,
    extracted: Extracted,
    snapshot_id: Option<String>,
    /// The snapshot's undo, which waits for the image's: EC2 refuses to delete a snapshot
    /// an image still uses.
    delete_snapshot: Option<UndoId>,
    image_id: Option<String>,
    /// The channel's version naming the image, once published.
    ssm_version: Option<i64>,
    /// The image in the template's other regions.
    copies: Vec<RegionImage>,
    /// `--no-test`.
    skip_tests: bool,
    /// `--on-error`.
    on_failure: engine::OnFailure,
    backend: B,
}

/// CI systems' variables for the commit being built, most specific first.
const COMMIT_VARIABLES: [&str; 5] = [
    "GITHUB_SHA",
    "CODEBUILD_RESOLVED_SOURCE_VERSION",
    "CI_COMMIT_SHA",
    "GIT_COMMIT",
    "BUILD_VCS_NUMBER",
];

pub async fn run(
    options: &BakeOptions,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
) -> Result<BuildResult<BakeManifest>, RunError> {
    let commit = match &options.commit {
        Some(sha) => check_commit(sha)?,
        None => detect_commit().ok_or_else(|| ModeError::Usage("no commit: pass --commit SHA (no CI commit variable is set and this is not a git checkout)".into()))?,
    };
    if options.tarball.as_os_str() != "-" && !options.tarball.is_file() {
        return Err(ModeError::Usage(format!(
            "--tarball {}: no such file",
            options.tarball.display()
        ))
        .into());
    }
    let loaded = load_for_run(
        &options.template,
        &options.common,
        Commit::Known(commit.clone()),
        "bake",
    )?;
    let built = run_loaded(
        options,
        loaded.template,
        loaded.build_id,
        commit,
        sink.clone(),
        cancel.clone(),
    )
    .await;
    run_post(
        built,
        &loaded.post,
        options.common.variant,
        sink,
        &cancel,
        &loaded.secrets,
    )
    .await
}

/// The run once its template is loaded; the caller masks the template's secrets in its
/// errors.
async fn run_loaded(
    options: &BakeOptions,
    template: Template,
    build_id: String,
    commit: String,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
) -> Result<BuildResult<BakeManifest>, ModeError> {
    let secrets = template.secrets.clone();
    let plan = template.bake.expect("load_for_run checked the section");
    // Held until the run ends, so `gc` on this machine never takes it for a killed one.
    let _run_lock = hold_run_lock(&build_id)?;
    // Before the tarball is read: its check already runs in the sandbox. The range of host
    // ids is held until the run ends.
    let sandbox_mode = options.sandbox.unwrap_or(plan.sandbox);
    let (isolation, _ids) = crate::sandbox::for_run(sandbox_mode == SandboxMode::Compat)?;
    if let Some(p) = plan
        .provisioners
        .iter()
        .find(|p| p.network != Network::None)
    {
        crate::sandbox::network::pasta().map_err(|source| ModeError::Network {
            provisioner: p.name.clone(),
            source,
        })?;
    }
    if sandbox_mode == SandboxMode::Compat {
        sink.emit(&engine::Event::Note {
            step: String::new(),
            message: "sandbox compat: root in the image is root on this host, held back by the sandbox's other walls only (bake.sandbox / --sandbox)".into(),
        });
    }
    let work = WorkDir::new(&build_id)?;
    let tarball = spool_tarball(&options.tarball, work.path())?;
    let (checked, tarball_sha256) = tokio::join!(
        check_tarball(
            &options.amibake_exe,
            &work,
            &tarball,
            &options.tarball,
            isolation,
            &cancel
        ),
        digest(&tarball)
    );
    checked?;
    let tarball_sha256 = tarball_sha256?;

    let clients = Clients::new(&sdk_config(&options.common.aws).await)?;
    let (backend, why_backend) = choose_backend(options.backend).await?;
    let backend_name = backend.name();
    let base_id = ami::resolve(&clients, &plan.base_ami).await?;
    let base = ami::describe(&clients, &base_id).await?;
    let key_arn = match &plan.kms_key_id {
        Some(key) => Some(kms::usable_for_ebs(&clients, "bake.kms_key_id", key).await?),
        None => None,
    };
    distribute::check(&clients, &plan.distribution, "bake").await?;
    let fingerprint = fingerprint(&base.id, &tarball_sha256, &plan, sandbox_mode)?;
    let manifest = |ami_id: String,
                    snapshot_id,
                    reused: bool,
                    extracted: Extracted,
                    (ssm_version, copies): (Option<i64>, Vec<artifact::RegionCopy>),
                    report: Option<&RunReport>| {
        BakeManifest {
            ami_id,
            region: clients.region.clone(),
            name: plan.name.clone(),
            snapshot_id,
            base_ami: base.id.clone(),
            commit: commit.clone(),
            tarball_sha256: tarball_sha256.clone(),
            fingerprint: fingerprint.clone(),
            build_id: build_id.clone(),
            backend: (!reused).then(|| backend_name.to_string()),
            reused,
            variant: plan.variant.name(),
            sandbox: (!reused).then(|| sandbox_mode.name()),
            files: extracted.files,
            bytes: extracted.bytes,
            ssm_parameter: ssm_version.and(plan.publish.as_ref().map(|p| p.parameter.clone())),
            ssm_version,
            copies,
            step_seconds: report.map(RunReport::step_seconds).unwrap_or_default(),
        }
    };

    let sink = engine::Masked::wrap(sink, &secrets);
    let vars = [
        ("AMIBAKE_STAGE", "pre".to_string()),
        ("AMIBAKE_BUILD_ID", build_id.clone()),
        ("AMIBAKE_REGION", clients.region.clone()),
        ("AMIBAKE_VARIANT", plan.variant.name().to_string()),
        ("AMIBAKE_COMMIT", commit.clone()),
        ("AMIBAKE_BASE_AMI", base.id.clone()),
        ("AMIBAKE_TARBALL_SHA256", tarball_sha256.clone()),
        ("AMIBAKE_FINGERPRINT", fingerprint.clone()),
    ];
    stages::run("pre", &plan.pre, &vars, &sink, &cancel).await?;

    let reused = reusable(
        &clients,
        &fingerprint,
        &options.common,
        &plan.tests,
        plan.publish.as_ref(),
        &plan.distribution,
    )
    .await?;
    if let Some(Reuse { earlier, .. }) = reused.as_ref().filter(|r| r.finished) {
        let reused = BakeManifest {
            name: earlier.name.clone(),
            ..manifest(
                earlier.id.clone(),
                None,
                true,
                Extracted::default(),
                (None, vec![]),
                None,
            )
        };
        return Ok(BuildResult {
            manifest: Some(reused),
            report: None,
            post_failed: None,
        });
    }

    let shared = BakeState {
        clients: clients.clone(),
        base: base.clone(),
        plan: plan.clone(),
        build_id: build_id.clone(),
        commit: commit.clone(),
        tarball,
        tarball_sha256: tarball_sha256.clone(),
        fingerprint: fingerprint.clone(),
        mount_point: work.path().join(MOUNT_POINT),
        amibake_exe: options.amibake_exe.clone(),
        isolation,
        sandbox_mode,
        root_device: None,
        unmount_root: None,
        restore_files: None,
        extracted: Extracted::default(),
        snapshot_id: None,
        delete_snapshot: None,
        image_id: None,
        ssm_version: None,
        copies: Vec::new(),
        skip_tests: options.common.skip_tests,
        on_failure: options.common.on_failure,
        backend: (),
    };
    let (report, built) = match (reused.as_ref(), backend) {
        (Some(reuse), _) => {
            let state = BakeState {
                image_id: Some(reuse.earlier.id.clone()),
                ..shared
            };
            execute(steps::reuse(reuse.test_first), state, sink, cancel).await
        }
        (None, Chosen::Attach(host)) => {
            sink.emit(&engine::Event::Note {
                step: String::new(),
                message: why_backend,
            });
            let attach = attach::Attach::new(host, crate::host::run_lock::lock_root());
            execute(attach::steps(), shared.with_backend(attach), sink, cancel).await
        }
        (None, Chosen::Direct) => {
            sink.emit(&engine::Event::Note {
                step: String::new(),
                message: why_backend,
            });
            let cache = match &options.cache_dir {
                Some(dir) => ImageCache::new(dir),
                None => ImageCache::new(ImageCache::default_dir().ok_or_else(|| {
                    ModeError::Usage(
                        "no cache directory: pass --cache-dir, or set XDG_CACHE_HOME or HOME"
                            .into(),
                    )
                })?),
            };
            let upload = direct::plan_upload(&clients, &base, key_arn.as_deref()).await?;
            let direct = direct::Direct::new(cache, upload);
            execute(direct::steps(), shared.with_backend(direct), sink, cancel).await
        }
    };
    let report = report.masked(&secrets);
    let manifest = match (&report.outcome, built.image_id, reused) {
        (engine::Outcome::Succeeded, Some(image), Some(reuse)) => Some(BakeManifest {
            name: reuse.earlier.name,
            ..manifest(
                image,
                None,
                true,
                Extracted::default(),
                (built.ssm_version, built.copies),
                Some(&report),
            )
        }),
        (engine::Outcome::Succeeded, Some(image), None) => Some(manifest(
            image,
            built.snapshot_id,
            false,
            built.extracted,
            (built.ssm_version, built.copies),
            Some(&report),
        )),
        _ => None,
    };
    Ok(BuildResult {
        manifest,
        report: Some(report),
        post_failed: None,
    })
}

/// What a run of the engine made, whichever backend ran.
struct Built {
    image_id: Option<String>,
    snapshot_id: Option<String>,
    extracted: Extracted,
    ssm_version: Option<i64>,
    copies: Vec<artifact::RegionCopy>,
}

async fn execute<B: Send>(
    steps: Vec<Box<dyn engine::Step<BakeState<B>>>>,
    mut state: BakeState<B>,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
) -> (RunReport, Built) {
    let build_id = state.build_id.clone();
    let on_failure = state.on_failure;
    let mut report = engine::run(
        "bake", &build_id, &steps, &mut state, sink, cancel, on_failure,
    )
    .await;
    if report.kept.iter().any(|k| k.action == "unmount") {
        report.to_look.push(format!(
            "the image is mounted at {0}: `sudo chroot {0} /bin/sh` to look inside",
            state.mount_point.display()
        ));
    }
    if !report.kept.is_empty() {
        report.to_look.push(report.gc_kept(&state.clients.region));
    }
    let built = Built {
        image_id: state.image_id,
        snapshot_id: state.snapshot_id,
        extracted: state.extracted,
        ssm_version: state.ssm_version,
        copies: state.copies.iter().map(RegionImage::manifest).collect(),
    };
    (report, built)
}

impl BakeState<()> {
    /// The shared state, given the backend that will run.
    fn with_backend<B>(self, backend: B) -> BakeState<B> {
        BakeState {
            clients: self.clients,
            base: self.base,
            plan: self.plan,
            build_id: self.build_id,
            commit: self.commit,
            tarball: self.tarball,
            tarball_sha256: self.tarball_sha256,
            fingerprint: self.fingerprint,
            mount_point: self.mount_point,
            amibake_exe: self.amibake_exe,
            isolation: self.isolation,
            sandbox_mode: self.sandbox_mode,
            root_device: self.root_device,
            unmount_root: self.unmount_root,
            restore_files: self.restore_files,
            extracted: self.extracted,
            snapshot_id: self.snapshot_id,
            delete_snapshot: self.delete_snapshot,
            image_id: self.image_id,
            ssm_version: self.ssm_version,
            copies: self.copies,
            skip_tests: self.skip_tests,
            on_failure: self.on_failure,
            backend,
        }
    }
}

/// What decides the image's content: the base, the code, and how it is put in.
fn fingerprint(
    base: &str,
    tarball_sha256: &str,
    plan: &BakePlan,
    sandbox: SandboxMode,
) -> Result<String, ModeError> {
    let mut parts: Vec<(String, String)> = vec![
        ("base_ami".into(), base.into()),
        ("tarball_sha256".into(), tarball_sha256.into()),
        ("dest".into(), plan.dest.clone()),
        ("owner".into(), plan.owner.clone().unwrap_or_default()),
        ("keep_setuid".into(), plan.keep_setuid.to_string()),
        ("variant".into(), plan.variant.name().into()),
        (
            "root_partition".into(),
            format!("{:?}", plan.root_partition),
        ),
        (
            "volume".into(),
            format!(
                "{:?} {:?} {:?}",
                plan.root_volume_type, plan.root_volume_size_gb, plan.kms_key_id
            ),
        ),
    ];
    // An image baked with root as root is not the one a private run asked for; private
    // fingerprints stay what they were.
    if sandbox == SandboxMode::Compat {
        parts.push(("sandbox".into(), sandbox.name().into()));
    }
    parts.extend(provisioner_fingerprint_parts(&plan.provisioners)?);
    let refs: Vec<(&str, &str)> = parts
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Ok(artifact::fingerprint(&refs))
}

/// The run's work directory: the tarball's one copy, the tarball check's empty root,
/// and the image's mount point.
/// Removed entry by entry on drop, never recursively: were an unmount to have failed, a
/// recursive delete would walk into the mounted image, and through its bind of /dev into
/// the host's.
struct WorkDir(PathBuf);

/// The tarball, copied from what was given: the one copy the run reads.
const SPOOLED_TARBALL: &str = "tarball";
const MOUNT_POINT: &str = "root";
/// The empty directory the tarball's check has as its root.
const CHECK_ROOT: &str = "empty";

impl WorkDir {
    fn new(build_id: &str) -> Result<WorkDir, ModeError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("amibake-{build_id}-"))
            .tempdir()
            .map_err(ModeError::local("cannot make a work directory"))?;
        Ok(WorkDir(dir.keep()))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0.join(SPOOLED_TARBALL));
        // Fails, as it should, while anything is still mounted there.
        let _ = std::fs::remove_dir(self.0.join(MOUNT_POINT));
        let _ = std::fs::remove_dir(self.0.join(CHECK_ROOT));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Refuses, before any AWS call, what the tarball alone shows is wrong with it: an entry no
/// bake would place (`..`, a device node), a damaged, cut-short or empty archive. What
/// depends on the image (a symlink in it, its users, its free space) only the extraction can
/// tell. Errors name the tarball as it was `given` (`-` for standard input).
async fn check_tarball(
    amibake_exe: &Path,
    work: &WorkDir,
    tarball: &Path,
    given: &Path,
    isolation: Isolation,
    cancel: &CancellationToken,
) -> Result<(), ModeError> {
    let failed = |source| ModeError::Tarball {
        path: given.display().to_string(),
        source,
    };
    let empty_root = work.path().join(CHECK_ROOT);
    std::fs::create_dir(&empty_root).map_err(ModeError::local(
        "cannot make a root for the tarball's check",
    ))?;
    extract::check_tarball(amibake_exe, &empty_root, tarball, isolation, cancel)
        .await
        .map(|_| ())
        .map_err(failed)
}

/// The tarball's SHA-256, read off the async runtime's threads.
async fn digest(tarball: &Path) -> Result<String, ModeError> {
    let path = tarball.to_path_buf();
    tokio::task::spawn_blocking(move || artifact::sha256_file(&path))
        .await
        .expect("a digest does not panic")
        .map_err(ModeError::local(format!(
            "cannot read the tarball {}",
            tarball.display()
        )))
}

/// The tarball as given (a path, or `-` for standard input), opened once and copied into
/// the work directory, which only this run can write. The check, the digest and the
/// extraction all read that copy: what is extracted is what was checked, and the digest in
/// the tags and the fingerprint is of those bytes, whatever becomes of the given file
/// meanwhile (a `[[bake.pre]]` command rewriting it).
fn spool_tarball(tarball: &Path, work: &Path) -> Result<PathBuf, ModeError> {
    let path = work.join(SPOOLED_TARBALL);
    let mut file =
        std::fs::File::create(&path).map_err(ModeError::local("cannot copy the tarball"))?;
    let read = if tarball.as_os_str() == "-" {
        std::io::copy(&mut std::io::stdin().lock(), &mut file)
    } else {
        // A file copy the kernel does (copy_file_range), a clone where the filesystem can.
        std::fs::File::open(tarball).and_then(|mut given| std::io::copy(&mut given, &mut file))
    };
    read.map_err(ModeError::local(format!(
        "cannot read the tarball {}",
        tarball.display()
    )))?;
    Ok(path)
}

fn check_commit(sha: &str) -> Result<String, ModeError> {
    let ok = (4..=64).contains(&sha.len())
        && sha
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(sha.to_string())
    } else {
        Err(ModeError::Usage(format!(
            "--commit `{sha}`: expected a commit id (4 to 64 letters, digits, - _ .)"
        )))
    }
}

/// The commit from the CI's own variables, or from git in the working directory.
fn detect_commit() -> Option<String> {
    COMMIT_VARIABLES
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
}

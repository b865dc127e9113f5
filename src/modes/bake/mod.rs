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
mod tarball;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::image::{HasImage, ImageRecord, ImageState, Origin, Resolved};
use super::lifecycle::{self, provisioner_fingerprint_parts, EngineRun, Mode};
use super::{BuildResult, CommonOptions, ModeError, RunError};
use crate::artifact::{
    self, BakeManifest, TAG_BASE_AMI, TAG_COMMIT, TAG_SANDBOX, TAG_TARBALL_SHA256,
};
use crate::aws::ami::{self, BaseImage};
use crate::aws::host;
use crate::aws::{kms, Clients};
use crate::engine::{self, EventSink, RunReport, UndoId, UndoStack};
use crate::host::extract::Extracted;
use crate::host::image_cache::ImageCache;
use crate::host::loop_device::Writes;
use crate::sandbox::{emulator, emulator::Emulator, Isolation};
use crate::template::{
    AmiFilter, AmiRef, BakeBuild, BakePlan, Commit, InstancePlan, Network, SandboxMode, Template,
};
use tarball::{WorkDir, MOUNT_POINT};

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
    /// Makes the undo that gives the whole disk back wait for `user`'s, a loop device over
    /// part of it.
    fn disk_waits_for(&self, undo: &mut UndoStack, user: UndoId);
    /// Where the image's writes must get to before its snapshot is taken.
    fn image_writes(&self) -> Writes;
}

/// Everything the steps share, typed; `backend` is what only one backend has.
pub struct BakeState<B> {
    image: ImageState,
    build: BakeBuild,
    base: BaseImage,
    /// The tarball's tar stream, as its check kept it.
    tar_stream: PathBuf,
    mount_point: PathBuf,
    amibake_exe: PathBuf,
    /// Who root in the sandbox is on this host.
    isolation: Isolation,
    /// How the image's programs run here, when it is of another architecture.
    emulator: Option<Emulator>,
    /// The image's whole disk on this host (an attached volume, a working copy), once the
    /// backend has one.
    disk: Option<PathBuf>,
    /// The block device the image's root filesystem is on, once the backend has one.
    root_device: Option<PathBuf>,
    unmount_root: Option<UndoId>,
    /// The image's own /boot and /boot/efi mounted under the root, parents first.
    boot_mounts: Vec<steps::BootMount>,
    restore_files: Option<UndoId>,
    extracted: Extracted,
    /// The snapshot the image is registered from.
    snapshot_id: Option<String>,
    /// The snapshot's undo, which waits for the image's: EC2 refuses to delete a snapshot
    /// an image still uses.
    delete_snapshot: Option<UndoId>,
    backend: B,
}

impl<B: Send + Sync + 'static> HasImage for BakeState<B> {
    fn image(&mut self) -> &mut ImageState {
        &mut self.image
    }
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
    let mode = BakeMode {
        options,
        commit: commit.clone(),
        local: None,
        resolved: None,
        base_id: String::new(),
        backend_name: "",
        extracted: Extracted::default(),
    };
    lifecycle::run(
        mode,
        &options.template,
        &options.common,
        Commit::Known(commit),
        sink,
        cancel,
    )
    .await
}

/// What `bake` owns of a run, filled in as the run goes.
struct BakeMode<'a> {
    options: &'a BakeOptions,
    commit: String,
    local: Option<Local>,
    /// What `resolve` found, until `build` takes it.
    resolved: Option<BakeSource>,
    /// For the manifest: the base AMI, and the backend that would make a new image.
    base_id: String,
    backend_name: &'static str,
    /// What the extraction put into the image, once a new image was made.
    extracted: Extracted,
}

/// What `prepare` made on this machine, held until the run ends.
struct Local {
    work: WorkDir,
    /// The tarball's tar stream as its check read it: what the extraction reads.
    tar_stream: PathBuf,
    tarball_sha256: String,
    isolation: Isolation,
    sandbox_mode: SandboxMode,
    /// The range of host ids the sandbox maps root to, held for the run.
    _ids: Option<crate::sandbox::ids::IdRange>,
}

/// What `resolve` found: the base, its key, and the backend.
struct BakeSource {
    base: BaseImage,
    emulator: Option<Emulator>,
    key_arn: Option<String>,
    backend: Chosen,
    why_backend: String,
}

impl BakeMode<'_> {
    fn local(&self) -> &Local {
        self.local.as_ref().expect("prepare runs first")
    }
}

#[async_trait]
impl Mode for BakeMode<'_> {
    const SECTION: &'static str = "bake";
    const BUILDS_ON_INSTANCE: bool = false;
    type Build = BakeBuild;
    type Manifest = BakeManifest;

    fn plan(template: &mut Template) -> Option<BakePlan> {
        template.bake.take()
    }

    fn instance(plan: &mut BakePlan) -> Option<&mut InstancePlan> {
        plan.build.test_instance.as_mut()
    }

    /// Before the tarball is read: the sandbox, as its check already runs in it. Then the
    /// tarball is read once, checked and digested, its tar stream kept in the run's work
    /// directory.
    async fn prepare(
        &mut self,
        plan: &BakePlan,
        build_id: &str,
        sink: &Arc<dyn EventSink>,
        cancel: &CancellationToken,
    ) -> Result<(), ModeError> {
        let options = self.options;
        let sandbox_mode = options.sandbox.unwrap_or(plan.build.sandbox);
        let (isolation, ids) = crate::sandbox::for_run(sandbox_mode == SandboxMode::Compat)?;
        // Where the template names the base's architecture, whether this host can run its
        // programs is known before any AWS call; else once `resolve` has described it.
        if let AmiRef::Filter(AmiFilter {
            architecture: Some(architecture),
            ..
        }) = &plan.build.base_ami
        {
            emulator::for_image(architecture, isolation)?;
        }
        if let Some(p) = plan
            .image
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
        let work = WorkDir::new(build_id)?;
        let checked = tarball::check(
            &options.amibake_exe,
            &work,
            &options.tarball,
            isolation,
            cancel,
        )
        .await?;
        self.local = Some(Local {
            work,
            tar_stream: checked.tar_stream,
            tarball_sha256: checked.sha256,
            isolation,
            sandbox_mode,
            _ids: ids,
        });
        Ok(())
    }

    async fn resolve(&mut self, clients: &Clients, plan: &BakePlan) -> Result<Resolved, ModeError> {
        let (backend, why_backend) = choose_backend(self.options.backend).await?;
        let base_id = ami::resolve(clients, &plan.build.base_ami).await?;
        let base = ami::describe(clients, &base_id).await?;
        let architecture = base.architecture.as_str().to_string();
        let emulator = emulator::for_image(&architecture, self.local().isolation)?;
        let key_arn = match &plan.build.kms_key_id {
            Some(key) => Some(kms::usable_for_ebs(clients, "bake.kms_key_id", key).await?),
            None => None,
        };
        let local = self.local();
        let resolved = Resolved {
            fingerprint: fingerprint(&base.id, &local.tarball_sha256, plan, local.sandbox_mode)?,
            origin: Origin {
                tags: vec![
                    (TAG_COMMIT, self.commit.clone()),
                    (TAG_TARBALL_SHA256, local.tarball_sha256.clone()),
                    (TAG_BASE_AMI, base.id.clone()),
                    (TAG_SANDBOX, local.sandbox_mode.name().to_string()),
                ],
                facts: vec![
                    ("AMIBAKE_COMMIT", self.commit.clone()),
                    ("AMIBAKE_BASE_AMI", base.id.clone()),
                    ("AMIBAKE_TARBALL_SHA256", local.tarball_sha256.clone()),
                ],
                version_note: format!(" commit {}", self.commit),
                test_instance: plan.build.test_instance.clone(),
                root_device_name: base.root_device_name.clone(),
                architecture: architecture.clone(),
            },
        };
        self.base_id = base.id.clone();
        self.backend_name = backend.name();
        self.resolved = Some(BakeSource {
            base,
            emulator,
            key_arn,
            backend,
            why_backend,
        });
        Ok(resolved)
    }

    async fn build(
        &mut self,
        build: BakeBuild,
        image: ImageState,
        run: EngineRun,
    ) -> Result<(RunReport, ImageState), ModeError> {
        let BakeSource {
            base,
            emulator,
            key_arn,
            backend,
            why_backend,
        } = self.resolved.take().expect("resolve runs before build");
        run.sink.emit(&engine::Event::Note {
            step: String::new(),
            message: why_backend,
        });
        let local = self.local();
        let state = BakeState {
            image,
            build,
            base,
            tar_stream: local.tar_stream.clone(),
            mount_point: local.work.path().join(MOUNT_POINT),
            amibake_exe: self.options.amibake_exe.clone(),
            isolation: local.isolation,
            emulator,
            disk: None,
            root_device: None,
            unmount_root: None,
            boot_mounts: Vec::new(),
            restore_files: None,
            extracted: Extracted::default(),
            snapshot_id: None,
            delete_snapshot: None,
            backend: (),
        };
        let (report, image, extracted) = match backend {
            Chosen::Attach(host) => {
                let attach = attach::Attach::new(host, crate::host::run_lock::lock_root());
                execute(attach::steps(), state.with_backend(attach), run).await
            }
            Chosen::Direct => {
                let cache = match &self.options.cache_dir {
                    Some(dir) => ImageCache::new(dir),
                    None => ImageCache::new(ImageCache::default_dir().ok_or_else(|| {
                        ModeError::Usage(
                            "no cache directory: pass --cache-dir, or set XDG_CACHE_HOME or HOME"
                                .into(),
                        )
                    })?),
                };
                let upload =
                    direct::plan_upload(&state.image.clients, &state.base, key_arn.as_deref())
                        .await?;
                let direct = direct::Direct::new(cache, upload);
                execute(direct::steps(), state.with_backend(direct), run).await
            }
        };
        self.extracted = extracted;
        Ok((report, image))
    }

    fn manifest(&self, image: ImageRecord) -> BakeManifest {
        let (local, reused) = (self.local(), image.reused);
        BakeManifest {
            ami_id: image.ami_id,
            region: image.region,
            name: image.name,
            snapshot_id: image.snapshot_ids.into_iter().next(),
            base_ami: self.base_id.clone(),
            architecture: image.architecture,
            commit: self.commit.clone(),
            tarball_sha256: local.tarball_sha256.clone(),
            fingerprint: image.fingerprint,
            build_id: image.build_id,
            backend: (!reused).then(|| self.backend_name.to_string()),
            reused,
            variant: image.variant,
            sandbox: (!reused).then(|| local.sandbox_mode.name()),
            files: self.extracted.files,
            bytes: self.extracted.bytes,
            ssm_parameter: image.ssm_parameter,
            ssm_version: image.ssm_version,
            copies: image.copies,
            step_seconds: image.step_seconds,
        }
    }
}

/// Runs a backend's steps; the image's state, and what the extraction put in, come back.
async fn execute<B: Backend>(
    steps: Vec<Box<dyn engine::Step<BakeState<B>>>>,
    mut state: BakeState<B>,
    run: EngineRun,
) -> (RunReport, ImageState, Extracted) {
    let build_id = state.image.build_id.clone();
    let mut report = engine::run(
        "bake",
        &build_id,
        &steps,
        &mut state,
        run.sink,
        run.cancel,
        run.on_failure,
    )
    .await;
    if report.kept.iter().any(|k| k.action == "unmount") {
        report.to_look.push(format!(
            "the image is mounted at {0}: `sudo chroot {0} /bin/sh` to look inside",
            state.mount_point.display()
        ));
    }
    (report, state.image, state.extracted)
}

impl BakeState<()> {
    /// The shared state, given the backend that will run.
    fn with_backend<B>(self, backend: B) -> BakeState<B> {
        BakeState {
            image: self.image,
            build: self.build,
            base: self.base,
            tar_stream: self.tar_stream,
            mount_point: self.mount_point,
            amibake_exe: self.amibake_exe,
            isolation: self.isolation,
            emulator: self.emulator,
            disk: self.disk,
            root_device: self.root_device,
            unmount_root: self.unmount_root,
            boot_mounts: self.boot_mounts,
            restore_files: self.restore_files,
            extracted: self.extracted,
            snapshot_id: self.snapshot_id,
            delete_snapshot: self.delete_snapshot,
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
    let build = &plan.build;
    let mut parts: Vec<(String, String)> = vec![
        ("base_ami".into(), base.into()),
        ("tarball_sha256".into(), tarball_sha256.into()),
        ("dest".into(), build.dest.clone()),
        ("owner".into(), build.owner.clone().unwrap_or_default()),
        ("keep_setuid".into(), build.keep_setuid.to_string()),
        ("variant".into(), plan.image.variant.name().into()),
        (
            "root_partition".into(),
            format!("{:?}", build.root_partition),
        ),
        (
            "volume".into(),
            format!(
                "{:?} {:?} {:?}",
                build.root_volume_type, build.root_volume_size_gb, build.kms_key_id
            ),
        ),
    ];
    // An image baked with root as root is not the one a private run asked for; private
    // fingerprints stay what they were.
    if sandbox == SandboxMode::Compat {
        parts.push(("sandbox".into(), sandbox.name().into()));
    }
    parts.extend(provisioner_fingerprint_parts(&plan.image.provisioners)?);
    let refs: Vec<(&str, &str)> = parts
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Ok(artifact::fingerprint(&refs))
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

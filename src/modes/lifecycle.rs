//! One run of either mode, in order: load the template, take the run's lock, prepare what
//! is local, resolve the source with AWS and fingerprint it, run the pre commands, reuse an
//! identical earlier image or build a new one, then the post commands. A `Mode` says only
//! what is its own; everything else is here, once.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::image::{self, ImageRecord, ImageState, Resolved};
use super::support::channel_names;
use super::{distribute, stages, BuildResult, CommonOptions, ModeError, RunError};
use crate::artifact;
use crate::aws::{sdk_config, Clients};
use crate::engine::{self, EventSink, RunReport};
use crate::template::{
    self, Commit, CommunicatorKind, ImagePlan, InstancePlan, LoadOptions, Plan, Provisioner,
    Secrets, StageCommand, Template,
};

/// What one mode owns of a run; `run` does the rest.
#[async_trait]
pub trait Mode: Send {
    /// The template's table, and the run's name in its events.
    const SECTION: &'static str;
    /// How this mode builds, as its table says.
    type Build: Send + Sync;
    type Manifest: artifact::Manifest + Send;

    /// Its table, checked, out of the template; `None` when the template has none.
    fn plan(template: &mut Template) -> Option<Plan<Self::Build>>;

    /// The temporary instance its plan launches, if any: the one `--ssh-cidr` shapes.
    fn instance(plan: &mut Plan<Self::Build>) -> Option<&mut InstancePlan>;
    /// Whether it builds its image on an instance it launches (a base does; a bake launches
    /// one only for its tests).
    const BUILDS_ON_INSTANCE: bool;

    /// Everything before the first AWS call (a bake's sandbox and tarball check). What it
    /// makes lives as long as the mode does: to the end of the run.
    async fn prepare(
        &mut self,
        _plan: &Plan<Self::Build>,
        _build_id: &str,
        _sink: &Arc<dyn EventSink>,
        _cancel: &CancellationToken,
    ) -> Result<(), ModeError> {
        Ok(())
    }

    /// With AWS, before anything is made: the source resolved, the image's fingerprint,
    /// and where it comes from.
    async fn resolve(
        &mut self,
        clients: &Clients,
        plan: &Plan<Self::Build>,
    ) -> Result<Resolved, ModeError>;

    /// The engine's run that makes a new image, ending with `image::tail(true)`. Returns the
    /// image's state as the run left it.
    async fn build(
        &mut self,
        build: Self::Build,
        image: ImageState,
        run: EngineRun,
    ) -> Result<(RunReport, ImageState), ModeError>;

    /// The manifest of the run's image.
    fn manifest(&self, image: ImageRecord) -> Self::Manifest;
}

/// How the engine is to run a mode's steps.
pub struct EngineRun {
    pub sink: Arc<dyn EventSink>,
    pub cancel: CancellationToken,
    pub on_failure: engine::OnFailure,
}

/// A whole run of `mode` over the template at `path`; `commit` is what `${commit}` is.
pub async fn run<M: Mode>(
    mut mode: M,
    path: &Path,
    common: &CommonOptions,
    commit: Commit,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
) -> Result<BuildResult<M::Manifest>, RunError> {
    let loaded = load_for_run::<M>(path, common, commit)?;
    let (post, secrets) = (loaded.plan.image.post.clone(), loaded.secrets.clone());
    let built = run_loaded(&mut mode, loaded, common, sink.clone(), cancel.clone()).await;
    let result = built.map_err(|e| e.masked(&secrets))?;
    post_commands(result, &post, common.variant, sink, &cancel, &secrets)
        .await
        .map_err(|e| e.masked(&secrets))
}

/// The run once its template is loaded; the caller masks the template's secrets in its
/// errors.
async fn run_loaded<M: Mode>(
    mode: &mut M,
    loaded: LoadedRun<M::Build>,
    common: &CommonOptions,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
) -> Result<BuildResult<M::Manifest>, ModeError> {
    let LoadedRun {
        plan,
        build_id,
        secrets,
    } = loaded;
    // Held until the run ends, so `gc` on this machine never takes it for a killed one.
    let _run_lock = hold_run_lock(&build_id)?;
    mode.prepare(&plan, &build_id, &sink, &cancel).await?;
    let clients = Clients::new(&sdk_config(&common.aws).await)?;
    let resolved = mode.resolve(&clients, &plan).await?;
    distribute::check(&clients, &plan.image.distribution, M::SECTION).await?;
    let Plan {
        image: image_plan,
        build,
    } = plan;
    let mut image = ImageState::new(
        clients.clone(),
        build_id.clone(),
        resolved,
        image_plan,
        common.skip_tests,
    );

    let sink = engine::Masked::wrap(sink, &secrets);
    let mut vars = image.facts();
    vars.extend([
        ("AMIBAKE_STAGE", "pre".to_string()),
        ("AMIBAKE_FINGERPRINT", image.fingerprint.clone()),
    ]);
    stages::run("pre", &image.plan.pre, &vars, &sink, &cancel).await?;

    let reuse = reusable(&clients, common, &image).await?;
    if let Some(reuse) = &reuse {
        image.reused = true;
        image.image_id = Some(reuse.earlier.id.clone());
    }
    if let Some(Reuse { earlier, .. }) = reuse.as_ref().filter(|r| r.finished) {
        return Ok(BuildResult {
            manifest: image
                .record(Some(&earlier.name), None)
                .map(|record| mode.manifest(record)),
            report: None,
            post_failed: None,
        });
    }

    // Where the run will launch an instance, its profile is read before anything is made:
    // a base's build instance, or a test instance for the tests a run owes.
    let launches = match &reuse {
        Some(reuse) => reuse.test_first,
        None => M::BUILDS_ON_INSTANCE || image.tests_due(),
    };
    if let (true, Some(instance)) = (launches, &image.origin.test_instance) {
        super::instance::profile::check(&clients, instance, &sink).await?;
    }

    let run = EngineRun {
        sink,
        cancel,
        on_failure: common.on_failure,
    };
    let reuse_name = reuse.as_ref().map(|r| r.earlier.name.clone());
    let (mut report, image) = match reuse {
        Some(reuse) => deliver_earlier::<M>(image, reuse.test_first, run).await,
        None => mode.build(build, image, run).await?,
    };
    if !report.kept.is_empty() {
        report.to_look.push(report.gc_kept(&clients.region));
    }
    let report = report.masked(&secrets);
    let manifest = match report.outcome {
        // A reused image keeps the name it was made with.
        engine::Outcome::Succeeded => image
            .record(reuse_name.as_deref(), Some(&report))
            .map(|record| mode.manifest(record)),
        _ => None,
    };
    Ok(BuildResult {
        manifest,
        report: Some(report),
        post_failed: None,
    })
}

/// An earlier run's image, delivered and published as a new one would be; booted and
/// tested first when no test has passed on it yet.
async fn deliver_earlier<M: Mode>(
    mut image: ImageState,
    test_first: bool,
    run: EngineRun,
) -> (RunReport, ImageState) {
    let steps = image::tail(test_first);
    let build_id = image.build_id.clone();
    let report = engine::run(
        M::SECTION,
        &build_id,
        &steps,
        &mut image,
        run.sink,
        run.cancel,
        run.on_failure,
    )
    .await;
    (report, image)
}

/// The template's post commands, once a run has its image: its id, region and manifest (a
/// file) in their environment. Their failure fails the run, but the image stays: it is
/// kept in the result for the caller to print with the failure.
async fn post_commands<M: artifact::Manifest>(
    mut result: BuildResult<M>,
    post: &[StageCommand],
    variant: template::Variant,
    sink: Arc<dyn EventSink>,
    cancel: &CancellationToken,
    secrets: &Secrets,
) -> Result<BuildResult<M>, ModeError> {
    let failed_run = result
        .report
        .as_ref()
        .is_some_and(|r| !matches!(r.outcome, engine::Outcome::Succeeded));
    let Some(manifest) = result.manifest.as_ref().filter(|_| !failed_run) else {
        return Ok(result);
    };
    if post.is_empty() {
        return Ok(result);
    }
    let file = tempfile::Builder::new()
        .prefix("amibake-manifest-")
        .suffix(".json")
        .tempfile()
        .map_err(ModeError::local(
            "cannot write the manifest for the post commands",
        ))?;
    let json = serde_json::to_string(manifest).unwrap_or_default();
    std::fs::write(file.path(), format!("{json}\n")).map_err(ModeError::local(
        "cannot write the manifest for the post commands",
    ))?;
    let vars = [
        ("AMIBAKE_STAGE", "post".to_string()),
        ("AMIBAKE_AMI_ID", manifest.ami_id().to_string()),
        ("AMIBAKE_REGION", manifest.region().to_string()),
        ("AMIBAKE_MANIFEST", file.path().display().to_string()),
        ("AMIBAKE_VARIANT", variant.name().to_string()),
    ];
    let sink = engine::Masked::wrap(sink, secrets);
    if let Err(e) = stages::run("post", post, &vars, &sink, cancel).await {
        let text = secrets.mask(&engine::error_chain(&e));
        result.post_failed = Some(format!("{text}; {} exists and is kept", manifest.ami_id()));
    }
    Ok(result)
}

/// The run's lock on this machine, held for as long as the value lives.
fn hold_run_lock(build_id: &str) -> Result<crate::host::run_lock::RunLock, ModeError> {
    use crate::host::run_lock::{lock_root, RunLock};
    RunLock::acquire(build_id).map_err(ModeError::local(format!(
        "cannot take this run's lock in {}",
        lock_root().display()
    )))
}

/// The mode's plan for one run, final, with the build id it was resolved with and the
/// secrets to mask in every error.
struct LoadedRun<B> {
    plan: Plan<B>,
    build_id: String,
    secrets: Secrets,
}

/// Loads the template for a run and insists it has the mode's table.
fn load_for_run<M: Mode>(
    path: &Path,
    common: &CommonOptions,
    commit: Commit,
) -> Result<LoadedRun<M::Build>, ModeError> {
    let section = M::SECTION;
    let timestamp = crate::run_id::timestamp_now();
    let build_id = crate::run_id::new_build_id(&timestamp);
    let options = LoadOptions {
        variables: common.vars.clone(),
        commit,
        timestamp,
        build_id: build_id.clone(),
        secret_free: false,
    };
    let mut template = template::load(path, &options)?;
    let secrets = template.secrets.clone();
    let Some(mut plan) = M::plan(&mut template) else {
        return Err(ModeError::Usage(format!(
            "{}: no [{section}] table, so there is nothing for `amibake {section}` to build",
            path.display()
        )));
    };
    if let Some(instance) = M::instance(&mut plan) {
        with_ssh_cidrs(instance, common, path)?;
    }
    Ok(LoadedRun {
        plan: plan.for_variant(common.variant),
        build_id,
        secrets,
    })
}

/// `--ssh-cidr` over a temporary instance's settings, where the template lets it.
fn with_ssh_cidrs(
    instance: &mut InstancePlan,
    common: &CommonOptions,
    path: &Path,
) -> Result<(), ModeError> {
    if common.ssh_cidrs.is_empty() {
        return Ok(());
    }
    if instance.security_group_ids.is_some() {
        return Err(ModeError::Usage(format!(
            "--ssh-cidr shapes the temporary security group, which `security_group_ids` in {} replaces: use one of them",
            path.display()
        )));
    }
    if instance.communicator == CommunicatorKind::Ssm {
        return Err(ModeError::Usage(format!(
            "--ssh-cidr opens SSH to the instance, which {} reaches through SSM (`communicator = \"ssm\"`) with no port open: leave it out",
            path.display()
        )));
    }
    instance.ssh_cidrs = Some(common.ssh_cidrs.clone());
    Ok(())
}

/// An identical image an earlier run made (the same fingerprint), and what this run still
/// owes it.
struct Reuse {
    earlier: crate::aws::ami::EarlierBuild,
    /// No instance of it passed a test yet, and this run tests: it is booted and tested
    /// before it is published again.
    test_first: bool,
    /// Nothing is left to do: no test owed, nothing to distribute, and its channel names it.
    finished: bool,
}

/// Unless `--force`, the earlier build with the image's fingerprint. A channel moved back
/// or away since is published again; one that names the image already is left alone.
/// Copies are looked for, and made where missing.
async fn reusable(
    clients: &Clients,
    common: &CommonOptions,
    image: &ImageState,
) -> Result<Option<Reuse>, ModeError> {
    if common.force {
        return Ok(None);
    }
    let found = crate::aws::ami::find_by_fingerprint(clients, &image.fingerprint).await?;
    let Some(earlier) = found else {
        return Ok(None);
    };
    let plan: &ImagePlan = &image.plan;
    let test_first = !earlier.tested && image.tests_due();
    let finished = !test_first
        && plan.distribution.is_empty()
        && channel_names(clients, plan.publish.as_ref(), &earlier.id).await;
    Ok(Some(Reuse {
        earlier,
        test_first,
        finished,
    }))
}

/// The part of a fingerprint the provisioners make: commands as written, the bytes of every
/// script and uploaded file, where files go, and the environment.
pub fn provisioner_fingerprint_parts(
    provisioners: &[Provisioner],
) -> Result<Vec<(String, String)>, ModeError> {
    use crate::template::{Network, ProvisionerAction};
    let digest = |path: &Path| {
        artifact::sha256_file(path)
            .map_err(ModeError::local(format!("cannot read {}", path.display())))
    };
    let mut parts = Vec::new();
    for (i, p) in provisioners.iter().enumerate() {
        let what = match &p.action {
            ProvisionerAction::Inline(commands) => commands.join("\n"),
            ProvisionerAction::Script(path) => digest(path)?,
            ProvisionerAction::Upload {
                source,
                destination,
            } => format!("{} {destination}", digest(source)?),
        };
        let network = match &p.network {
            Network::None => String::new(),
            Network::Outside {
                metadata,
                host_ports,
            } => {
                let mut text = "\nnetwork".to_string();
                if *metadata {
                    text.push_str(" with metadata");
                }
                if !host_ports.is_empty() {
                    text.push_str(&format!(" host ports {host_ports:?}"));
                }
                text
            }
        };
        parts.push((
            format!("provisioner {i}"),
            format!("{what}\n{:?}{network}", p.env),
        ));
    }
    Ok(parts)
}

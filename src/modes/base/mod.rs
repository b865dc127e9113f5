//! `amibake base`: a base AMI from a vendor AMI, provisioned over SSH.
//!
//! First, without creating anything: resolve the source AMI and fingerprint the inputs; an
//! available image with that fingerprint is reused and nothing is launched. Then the engine
//! runs the steps below; the instance, key pair and security group are always removed, the
//! image only when the build fails.

mod steps;

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::distribute::{self, RegionImage};
use super::instance::{Launch, Role, TemporaryInstance};
use super::{
    hold_run_lock, load_for_run, provisioner_fingerprint_parts, reusable, run_post, stages,
    BuildResult, CommonOptions, ModeError, Reuse, RunError,
};
use crate::artifact::{self, BaseManifest};
use crate::aws::ami::{self, BaseImage};
use crate::aws::{sdk_config, Clients};
use crate::engine::{self, EventSink, Step};
use crate::template::{BasePlan, Commit, Template};

#[derive(Debug, Clone)]
pub struct BaseOptions {
    pub template: PathBuf,
    pub common: CommonOptions,
}

/// A reused image, delivered and published as a new one would be; booted and tested
/// first when no test has passed on it yet.
fn publish_steps(test_first: bool) -> Vec<Box<dyn Step<BaseState>>> {
    let mut list: Vec<Box<dyn Step<BaseState>>> = Vec::new();
    if test_first {
        list.push(Box::new(steps::TestImage));
    }
    list.push(Box::new(steps::Distribute));
    list.push(Box::new(steps::MarkFinished));
    list.push(Box::new(steps::PublishSsm));
    list
}

/// The steps, in order: the base build reads as this list.
fn steps() -> Vec<Box<dyn Step<BaseState>>> {
    vec![
        Box::new(steps::CreateKeyPair),
        Box::new(steps::CreateSecurityGroup),
        Box::new(steps::LaunchInstance),
        Box::new(steps::WaitForSsh),
        Box::new(steps::RunProvisioners),
        Box::new(steps::StopInstance),
        Box::new(steps::CreateImage),
        // Before it goes anywhere: an image that fails its tests is removed.
        Box::new(steps::TestImage),
        Box::new(steps::Distribute),
        // Finished before it is published: a run killed while publishing leaves a
        // complete image, which the next run with its fingerprint reuses and publishes.
        Box::new(steps::MarkFinished),
        Box::new(steps::PublishSsm),
    ]
}

/// Everything the steps share, typed.
pub struct BaseState {
    clients: Clients,
    plan: BasePlan,
    build_id: String,
    source: BaseImage,
    fingerprint: String,
    /// The instance the base is provisioned on.
    instance: TemporaryInstance,
    /// `--no-test`.
    skip_tests: bool,
    image_id: Option<String>,
    snapshot_ids: Vec<String>,
    ssm_version: Option<i64>,
    /// The image in the template's other regions.
    copies: Vec<RegionImage>,
}

pub async fn run(
    options: &BaseOptions,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
) -> Result<BuildResult<BaseManifest>, RunError> {
    // [base] never has a commit; a [bake] table beside it is still checked, with a stand-in.
    let loaded = load_for_run(
        &options.template,
        &options.common,
        Commit::Placeholder,
        "base",
    )?;
    let built = run_loaded(
        options,
        loaded.template,
        loaded.build_id,
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
    options: &BaseOptions,
    template: Template,
    build_id: String,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
) -> Result<BuildResult<BaseManifest>, ModeError> {
    let secrets = template.secrets.clone();
    // Held until the run ends, so `gc` on this machine never takes it for a killed one.
    let _run_lock = hold_run_lock(&build_id)?;
    let plan = template.base.expect("load_for_run checked the section");
    let clients = Clients::new(&sdk_config(&options.common.aws).await)?;
    let source_id = ami::resolve(&clients, &plan.source_ami).await?;
    let source = ami::describe(&clients, &source_id).await?;
    let fingerprint = fingerprint(&source.id, &plan)?;
    distribute::check(&clients, &plan.distribution, "base").await?;
    let manifest = |ami_id: String, name: String, reused, state: Option<&BaseState>| BaseManifest {
        ami_id,
        region: clients.region.clone(),
        name,
        snapshot_ids: state.map(|s| s.snapshot_ids.clone()).unwrap_or_default(),
        source_ami: source.id.clone(),
        fingerprint: fingerprint.clone(),
        build_id: build_id.clone(),
        reused,
        variant: plan.variant.name(),
        ssm_parameter: state
            .and_then(|s| s.ssm_version)
            .and(plan.publish.as_ref().map(|p| p.parameter.clone())),
        ssm_version: state.and_then(|s| s.ssm_version),
        copies: state
            .map(|s| s.copies.iter().map(RegionImage::manifest).collect())
            .unwrap_or_default(),
        step_seconds: Default::default(),
    };

    let sink = engine::Masked::wrap(sink, &secrets);
    let vars = [
        ("AMIBAKE_STAGE", "pre".to_string()),
        ("AMIBAKE_BUILD_ID", build_id.clone()),
        ("AMIBAKE_REGION", clients.region.clone()),
        ("AMIBAKE_VARIANT", plan.variant.name().to_string()),
        ("AMIBAKE_SOURCE_AMI", source.id.clone()),
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
        let (id, name) = (earlier.id.clone(), earlier.name.clone());
        return Ok(BuildResult {
            manifest: Some(manifest(id, name, true, None)),
            report: None,
            post_failed: None,
        });
    }

    let instance = TemporaryInstance::new(
        &clients,
        &build_id,
        Launch {
            image_id: source.id.clone(),
            root_device_name: source.root_device_name.clone(),
            plan: plan.instance.clone(),
            role: Role::Build,
        },
    )?;
    let mut state = BaseState {
        clients: clients.clone(),
        plan: plan.clone(),
        build_id: build_id.clone(),
        source: source.clone(),
        fingerprint: fingerprint.clone(),
        instance,
        skip_tests: options.common.skip_tests,
        image_id: reused.as_ref().map(|r| r.earlier.id.clone()),
        snapshot_ids: Vec::new(),
        ssm_version: None,
        copies: Vec::new(),
    };
    let steps = match &reused {
        Some(reuse) => publish_steps(reuse.test_first),
        None => steps(),
    };
    let mut report = engine::run(
        "base",
        &build_id,
        &steps,
        &mut state,
        sink,
        cancel,
        options.common.on_failure,
    )
    .await;
    if !report.kept.is_empty() {
        report.to_look.extend(state.instance.keep_for_a_look());
        report.to_look.push(report.gc_kept(&clients.region));
    }
    let report = report.masked(&secrets);
    let manifest = match (&report.outcome, &state.image_id) {
        (engine::Outcome::Succeeded, Some(image)) => {
            let was_reused = reused.is_some();
            let name = reused.map_or_else(|| plan.name.clone(), |r| r.earlier.name);
            Some(BaseManifest {
                step_seconds: report.step_seconds(),
                ..manifest(image.clone(), name, was_reused, Some(&state))
            })
        }
        _ => None,
    };
    Ok(BuildResult {
        manifest,
        report: Some(report),
        post_failed: None,
    })
}

/// What decides the image's content: the source AMI, how the instance is launched, and
/// every provisioner with the bytes of its script or file. Not the name, description, tags
/// or where it is published, which change without changing the image.
fn fingerprint(source: &str, plan: &BasePlan) -> Result<String, ModeError> {
    let mut parts: Vec<(String, String)> = vec![
        ("source_ami".into(), source.into()),
        ("instance_type".into(), plan.instance.instance_type.clone()),
        ("ssh_username".into(), plan.instance.ssh_username.clone()),
        ("variant".into(), plan.variant.name().into()),
        (
            "user_data".into(),
            plan.instance.user_data.clone().unwrap_or_default(),
        ),
        (
            "root_volume".into(),
            format!(
                "{:?} {:?}",
                plan.instance.root_volume_size_gb, plan.instance.root_volume_type
            ),
        ),
        (
            "iam_instance_profile".into(),
            plan.instance
                .iam_instance_profile
                .clone()
                .unwrap_or_default(),
        ),
    ];
    parts.extend(provisioner_fingerprint_parts(&plan.provisioners)?);
    let refs: Vec<(&str, &str)> = parts
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    Ok(artifact::fingerprint(&refs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::{self, LoadOptions};
    use std::path::Path;

    fn plan(dir: &Path, name: &str, tags: &str) -> BasePlan {
        let text = format!(
            "[base]\nname = \"{name}-${{timestamp}}\"\nsource_ami = \"ami-0123456789abcdef0\"\n\
             instance_type = \"t3.small\"\nssh_username = \"admin\"\ntags = {{ {tags} }}\n\
             publish_ssm = \"/amibake/{name}/base\"\n\n[[base.provisioner]]\nscript = \"setup.sh\"\n"
        );
        let path = dir.join("base.toml");
        std::fs::write(&path, text).unwrap();
        template::parse(
            &path,
            &std::fs::read_to_string(&path).unwrap(),
            &LoadOptions::for_validation(Default::default()),
        )
        .unwrap()
        .base
        .unwrap()
    }

    #[test]
    fn the_fingerprint_follows_the_image_content_not_its_name_tags_or_publication() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("setup.sh"), "#!/bin/sh\necho one\n").unwrap();
        let first = fingerprint("ami-1", &plan(dir.path(), "shop", "team = \"web\"")).unwrap();
        let renamed = fingerprint("ami-1", &plan(dir.path(), "cart", "team = \"ops\"")).unwrap();
        assert_eq!(
            first, renamed,
            "name, tags and parameter do not change the image"
        );
        assert_ne!(
            first,
            fingerprint("ami-2", &plan(dir.path(), "shop", "team = \"web\"")).unwrap(),
            "a new source AMI does"
        );
        std::fs::write(dir.path().join("setup.sh"), "#!/bin/sh\necho one!\n").unwrap();
        assert_ne!(
            first,
            fingerprint("ami-1", &plan(dir.path(), "shop", "team = \"web\"")).unwrap(),
            "one byte of a script does"
        );
    }
}

//! `amibake base`: a base AMI from a vendor AMI, provisioned over SSH.
//!
//! First, without creating anything: resolve the source AMI and fingerprint the inputs; an
//! available image with that fingerprint is reused and nothing is launched. Then the engine
//! runs the steps below; the instance, key pair and security group are always removed, the
//! image only when the build fails.

mod steps;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::image::{self, HasImage, ImageRecord, ImageState, Origin, Resolved};
use super::instance::{Launch, Role, TemporaryInstance};
use super::lifecycle::{self, provisioner_fingerprint_parts, EngineRun, Mode};
use super::{BuildResult, CommonOptions, ModeError, RunError};
use crate::artifact::{self, BaseManifest, TAG_SOURCE_AMI};
use crate::aws::ami::{self, BaseImage};
use crate::aws::Clients;
use crate::engine::{self, EventSink, RunReport, Step};
use crate::template::{
    BaseBuild, BasePlan, Commit, CommunicatorKind, InstancePlan, Plan, Template,
};

#[derive(Debug, Clone)]
pub struct BaseOptions {
    pub template: PathBuf,
    pub common: CommonOptions,
}

/// The steps, in order: the base build reads as this list. Through SSM, there is no key
/// pair, and the instance is reached once its agent registers.
fn steps(communicator: CommunicatorKind) -> Vec<Box<dyn Step<BaseState>>> {
    let mut steps: Vec<Box<dyn Step<BaseState>>> = Vec::new();
    if communicator == CommunicatorKind::Ssh {
        steps.push(Box::new(steps::CreateKeyPair));
    }
    steps.push(Box::new(steps::CreateSecurityGroup));
    steps.push(Box::new(steps::LaunchInstance));
    steps.push(Box::new(steps::WaitToReach(match communicator {
        CommunicatorKind::Ssh => "wait for ssh",
        CommunicatorKind::Ssm => "wait for agent",
    })));
    steps.push(Box::new(steps::RunProvisioners));
    steps.push(Box::new(steps::StopInstance));
    steps.push(Box::new(steps::CreateImage));
    steps.extend(image::tail(true));
    steps
}

/// Everything the steps share, typed.
pub struct BaseState {
    image: ImageState,
    /// The instance the base is provisioned on.
    instance: TemporaryInstance,
}

impl HasImage for BaseState {
    fn image(&mut self) -> &mut ImageState {
        &mut self.image
    }
}

pub async fn run(
    options: &BaseOptions,
    sink: Arc<dyn EventSink>,
    cancel: CancellationToken,
) -> Result<BuildResult<BaseManifest>, RunError> {
    // [base] never has a commit; a [bake] table beside it is still checked, with a stand-in.
    lifecycle::run(
        BaseMode { source: None },
        &options.template,
        &options.common,
        Commit::Placeholder,
        sink,
        cancel,
    )
    .await
}

/// What `base` owns of a run: the source image, once resolved.
struct BaseMode {
    source: Option<BaseImage>,
}

impl BaseMode {
    fn source(&self) -> &BaseImage {
        self.source.as_ref().expect("resolve runs before build")
    }
}

#[async_trait]
impl Mode for BaseMode {
    const SECTION: &'static str = "base";
    const BUILDS_ON_INSTANCE: bool = true;
    type Build = BaseBuild;
    type Manifest = BaseManifest;

    fn plan(template: &mut Template) -> Option<BasePlan> {
        template.base.take()
    }

    fn instance(plan: &mut BasePlan) -> Option<&mut InstancePlan> {
        Some(&mut plan.build.instance)
    }

    async fn resolve(&mut self, clients: &Clients, plan: &BasePlan) -> Result<Resolved, ModeError> {
        let source_id = ami::resolve(clients, &plan.build.source_ami).await?;
        let source = ami::describe(clients, &source_id).await?;
        let resolved = Resolved {
            fingerprint: fingerprint(&source.id, plan)?,
            origin: Origin {
                tags: vec![(TAG_SOURCE_AMI, source.id.clone())],
                facts: vec![("AMIBAKE_SOURCE_AMI", source.id.clone())],
                version_note: String::new(),
                // The build instance's session is over by then: its tests boot a fresh one.
                test_instance: Some(plan.build.instance.clone()),
                root_device_name: source.root_device_name.clone(),
                architecture: source.architecture.as_str().to_string(),
            },
        };
        self.source = Some(source);
        Ok(resolved)
    }

    async fn build(
        &mut self,
        build: BaseBuild,
        image: ImageState,
        run: EngineRun,
    ) -> Result<(RunReport, ImageState), ModeError> {
        let source = self.source();
        let communicator = build.instance.communicator;
        let instance = TemporaryInstance::new(
            &image.clients,
            &image.build_id,
            Launch {
                image_id: source.id.clone(),
                root_device_name: source.root_device_name.clone(),
                plan: build.instance,
                role: Role::Build,
            },
        )?;
        let build_id = image.build_id.clone();
        let mut state = BaseState { image, instance };
        let mut report = engine::run(
            Self::SECTION,
            &build_id,
            &steps(communicator),
            &mut state,
            run.sink,
            run.cancel,
            run.on_failure,
        )
        .await;
        if !report.kept.is_empty() {
            report.to_look.extend(state.instance.keep_for_a_look());
        }
        Ok((report, state.image))
    }

    fn manifest(&self, image: ImageRecord) -> BaseManifest {
        BaseManifest {
            ami_id: image.ami_id,
            region: image.region,
            name: image.name,
            snapshot_ids: image.snapshot_ids,
            source_ami: self.source().id.clone(),
            architecture: image.architecture,
            fingerprint: image.fingerprint,
            build_id: image.build_id,
            reused: image.reused,
            variant: image.variant,
            ssm_parameter: image.ssm_parameter,
            ssm_version: image.ssm_version,
            copies: image.copies,
            step_seconds: image.step_seconds,
        }
    }
}

/// What decides the image's content: the source AMI, how the instance is launched, and
/// every provisioner with the bytes of its script or file. Not the name, description, tags
/// or where it is published, which change without changing the image.
fn fingerprint(source: &str, plan: &Plan<BaseBuild>) -> Result<String, ModeError> {
    let instance = &plan.build.instance;
    let mut parts: Vec<(String, String)> = vec![
        ("source_ami".into(), source.into()),
        ("instance_type".into(), instance.instance_type.clone()),
        ("ssh_username".into(), instance.ssh_username.clone()),
        ("variant".into(), plan.image.variant.name().into()),
        (
            "user_data".into(),
            instance.user_data.clone().unwrap_or_default(),
        ),
        (
            "root_volume".into(),
            format!(
                "{:?} {:?}",
                instance.root_volume_size_gb, instance.root_volume_type
            ),
        ),
        (
            "iam_instance_profile".into(),
            instance.iam_instance_profile.clone().unwrap_or_default(),
        ),
    ];
    parts.extend(provisioner_fingerprint_parts(&plan.image.provisioners)?);
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

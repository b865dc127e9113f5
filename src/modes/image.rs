//! The image's tail, the same for both modes: once a mode has made its image (or found an
//! earlier run's), it is booted and tested, delivered, marked finished and published, over
//! an `ImageState` that each mode's own state embeds.
//!
//! The booted test: an instance of the new image, launched and reached as a base build's
//! instance is, runs the template's `[[base.test]]` or `[[bake.test]]` entries over SSH
//! before the image is delivered or published. A failing test fails the run, whose cleanup
//! removes the image; the instance, its key pair and its group go either way.

use async_trait::async_trait;
use aws_sdk_ec2::types::Tag;

use super::distribute::{self, RegionImage};
use super::instance::{Launch, Role, TemporaryInstance};
use super::support::{earlier, failed, mark_finished, publish, tags};
use crate::artifact::{
    self, STATE_BUILDING, TAG_ARCHITECTURE, TAG_BUILD_ID, TAG_CHANNEL, TAG_FINGERPRINT, TAG_STATE,
    TAG_TESTED, TAG_VARIANT, TESTED_PASSED,
};
use crate::aws::Clients;
use crate::engine::{RunReport, Step, StepContext, StepError};
use crate::provision::{self, Entries, ProvisionError};
use crate::template::Provisioner;
use crate::template::{ImagePlan, InstancePlan};

/// What a mode says of where its image comes from, for every place the image is described.
pub struct Origin {
    /// Tags naming its inputs (the source AMI; the base AMI, commit and tarball digest).
    pub tags: Vec<(&'static str, String)>,
    /// The run's facts in the environment of pre commands and tests, beside the build id,
    /// region and variant.
    pub facts: Vec<(&'static str, String)>,
    /// Said after the image's name in its channel's version description (` commit abc`).
    pub version_note: String,
    /// How a test boots the image: set by the template check wherever there are tests.
    pub test_instance: Option<InstancePlan>,
    /// The image's root device, for a root size or type from the instance settings.
    pub root_device_name: String,
    /// The image's architecture, its source's (`x86_64`, `arm64`).
    pub architecture: String,
}

/// What a mode's `resolve` found: the image's fingerprint and where it comes from.
pub struct Resolved {
    pub fingerprint: String,
    pub origin: Origin,
}

/// The image of a run, whichever mode made it: what it is to be, and what became of it.
pub struct ImageState {
    pub clients: Clients,
    pub build_id: String,
    pub fingerprint: String,
    pub plan: ImagePlan,
    pub origin: Origin,
    /// `--no-test`.
    pub skip_tests: bool,
    /// An earlier run's image, found by its fingerprint: it has no snapshots of this run's,
    /// and its copies may exist already.
    pub reused: bool,
    pub image_id: Option<String>,
    /// The snapshots this run made for the image.
    pub snapshot_ids: Vec<String>,
    /// The channel's version naming the image, once published.
    pub ssm_version: Option<i64>,
    /// The image in the template's other regions.
    pub copies: Vec<RegionImage>,
}

impl ImageState {
    /// A run's image before anything is made of it.
    pub fn new(
        clients: Clients,
        build_id: String,
        resolved: Resolved,
        plan: ImagePlan,
        skip_tests: bool,
    ) -> ImageState {
        ImageState {
            clients,
            build_id,
            fingerprint: resolved.fingerprint,
            plan,
            origin: resolved.origin,
            skip_tests,
            reused: false,
            image_id: None,
            snapshot_ids: Vec::new(),
            ssm_version: None,
            copies: Vec::new(),
        }
    }

    /// The template has tests and `--no-test` does not skip them.
    pub fn tests_due(&self) -> bool {
        !self.plan.tests.is_empty() && !self.skip_tests
    }

    /// Tags on the image, its snapshots and its copies: what it is, what it came from,
    /// which build made it.
    pub fn artifact_tags(&self) -> Vec<Tag> {
        let mut pairs: Vec<(&str, &str)> = vec![("Name", &self.plan.name)];
        pairs.extend(self.origin.tags.iter().map(|(k, v)| (*k, v.as_str())));
        pairs.extend([
            (TAG_ARCHITECTURE, self.origin.architecture.as_str()),
            (TAG_BUILD_ID, self.build_id.as_str()),
            (TAG_FINGERPRINT, &self.fingerprint),
            (TAG_STATE, STATE_BUILDING),
            (TAG_VARIANT, self.plan.variant.name()),
        ]);
        if let Some(publish) = &self.plan.publish {
            pairs.push((TAG_CHANNEL, &publish.parameter));
        }
        pairs.extend(self.plan.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        tags(&pairs)
    }

    /// The run's facts, as pre commands and tests see them.
    pub fn facts(&self) -> Vec<(&'static str, String)> {
        let mut facts = vec![
            ("AMIBAKE_BUILD_ID", self.build_id.clone()),
            ("AMIBAKE_REGION", self.clients.region.clone()),
            ("AMIBAKE_VARIANT", self.plan.variant.name().to_string()),
        ];
        facts.extend(self.origin.facts.iter().cloned());
        facts
    }

    /// What the manifest says of the image, once it has one; `made_as` names an earlier
    /// run's image by the name it was made with. `report` is `None` where no step ran.
    pub fn record(&self, made_as: Option<&str>, report: Option<&RunReport>) -> Option<ImageRecord> {
        Some(ImageRecord {
            ami_id: self.image_id.clone()?,
            region: self.clients.region.clone(),
            name: made_as.unwrap_or(&self.plan.name).to_string(),
            fingerprint: self.fingerprint.clone(),
            build_id: self.build_id.clone(),
            reused: self.reused,
            variant: self.plan.variant.name(),
            architecture: self.origin.architecture.clone(),
            snapshot_ids: self.snapshot_ids.clone(),
            ssm_parameter: self
                .ssm_version
                .and(self.plan.publish.as_ref().map(|p| p.parameter.clone())),
            ssm_version: self.ssm_version,
            copies: self.copies.iter().map(RegionImage::manifest).collect(),
            step_seconds: report.map(RunReport::step_seconds).unwrap_or_default(),
        })
    }
}

/// What both modes' manifests say of the image itself.
pub struct ImageRecord {
    pub ami_id: String,
    pub region: String,
    pub name: String,
    pub fingerprint: String,
    pub build_id: String,
    pub reused: bool,
    pub variant: &'static str,
    pub architecture: String,
    pub snapshot_ids: Vec<String>,
    pub ssm_parameter: Option<String>,
    pub ssm_version: Option<i64>,
    pub copies: Vec<artifact::RegionCopy>,
    pub step_seconds: std::collections::BTreeMap<String, f64>,
}

/// A mode's state, which the tail's steps reach the image through.
pub trait HasImage: Send + Sync + 'static {
    fn image(&mut self) -> &mut ImageState;
}

impl HasImage for ImageState {
    fn image(&mut self) -> &mut ImageState {
        self
    }
}

/// The steps after the image exists, in order; `test` when it is to be booted and tested
/// first (always for a new image: the step itself knows when there is nothing to run).
pub fn tail<S: HasImage>(test: bool) -> Vec<Box<dyn Step<S>>> {
    let mut list: Vec<Box<dyn Step<S>>> = Vec::new();
    // Before it goes anywhere: an image that fails its tests is removed.
    if test {
        list.push(Box::new(TestImage));
    }
    list.push(Box::new(Distribute));
    // Finished before it is published: a run killed while publishing leaves a complete
    // image, which the next run with its fingerprint reuses and publishes.
    list.push(Box::new(MarkFinished));
    list.push(Box::new(PublishSsm));
    list
}

/// The new image booted and tested, before it is delivered or published.
pub struct TestImage;

#[async_trait]
impl<S: HasImage> Step<S> for TestImage {
    fn name(&self) -> &'static str {
        "test image"
    }
    async fn run(&self, s: &mut S, ctx: &mut StepContext) -> Result<(), StepError> {
        boot_and_test(s.image(), ctx).await
    }
}

/// The image beyond its region and account: copies, deprecation, IMDSv2-only, sharing.
pub struct Distribute;

#[async_trait]
impl<S: HasImage> Step<S> for Distribute {
    fn name(&self) -> &'static str {
        "distribute"
    }
    async fn run(&self, s: &mut S, ctx: &mut StepContext) -> Result<(), StepError> {
        let s = s.image();
        let image_id = earlier(&s.image_id, "image")?;
        let source = distribute::Source {
            clients: &s.clients,
            image_id: &image_id,
            name: &s.plan.name,
            description: s.plan.description.as_deref(),
            tags: s.artifact_tags(),
            build_id: &s.build_id,
            fingerprint: &s.fingerprint,
            reused: s.reused,
        };
        s.copies = distribute::deliver(source, &s.plan.distribution, ctx).await?;
        Ok(())
    }
}

/// The image tagged finished, so later runs may reuse it and `gc` leaves it.
pub struct MarkFinished;

#[async_trait]
impl<S: HasImage> Step<S> for MarkFinished {
    fn name(&self) -> &'static str {
        "mark finished"
    }
    async fn run(&self, s: &mut S, _ctx: &mut StepContext) -> Result<(), StepError> {
        let s = s.image();
        let mut resources = vec![earlier(&s.image_id, "image")?];
        resources.extend(s.snapshot_ids.iter().cloned());
        mark_finished(&s.clients, resources).await?;
        distribute::mark_copies_finished(&s.copies).await
    }
}

/// The image as the newest version of the template's channel, in every region it is in.
pub struct PublishSsm;

#[async_trait]
impl<S: HasImage> Step<S> for PublishSsm {
    fn name(&self) -> &'static str {
        "publish to ssm"
    }
    async fn run(&self, s: &mut S, ctx: &mut StepContext) -> Result<(), StepError> {
        let s = s.image();
        let image_id = earlier(&s.image_id, "image")?;
        let description = format!(
            "{}{} (amibake build {})",
            s.plan.name, s.origin.version_note, s.build_id
        );
        s.ssm_version = publish(
            &s.clients,
            s.plan.publish.as_ref(),
            &image_id,
            &description,
            ctx,
        )
        .await?;
        distribute::publish_copies(&mut s.copies, s.plan.publish.as_ref(), &description, ctx).await
    }
}

/// A test that failed, with the image it failed on: the run removes that image.
#[derive(Debug, thiserror::Error)]
#[error("{image_id} failed its test on {instance_id}, so it is not kept")]
pub struct TestFailed {
    image_id: String,
    instance_id: String,
    #[source]
    source: ProvisionError,
}

async fn mark_tested(clients: &Clients, image_id: &str) -> Result<(), StepError> {
    crate::aws::image::tag(
        clients,
        vec![image_id.to_string()],
        (TAG_TESTED, TESTED_PASSED),
    )
    .await
    .map_err(failed)
}

/// Boots `image` and runs its tests on it; nothing when it has none or `--no-test`.
async fn boot_and_test(image: &ImageState, ctx: &mut StepContext) -> Result<(), StepError> {
    let image_id = earlier(&image.image_id, "image")?;
    let count = image.plan.tests.len();
    if count == 0 {
        ctx.progress
            .note("no [[base.test]] or [[bake.test]] in the template: the image is not booted");
        return Ok(());
    }
    if image.skip_tests {
        ctx.progress.note(format!(
            "--no-test: {count} test(s) skipped, {} is not booted",
            image_id
        ));
        return Ok(());
    }
    let plan = earlier(&image.origin.test_instance, "test instance settings")?;
    let launch = Launch {
        image_id: image_id.clone(),
        root_device_name: image.origin.root_device_name.clone(),
        plan,
        role: Role::Test,
    };
    let mut instance =
        TemporaryInstance::new(&image.clients, &image.build_id, launch).map_err(failed)?;
    instance.create_key_pair(ctx).await?;
    instance.create_security_group(ctx).await?;
    instance.launch(ctx).await?;
    instance.connect(ctx).await?;
    let instance_id = instance.id()?;
    let mut facts: Vec<(String, String)> = vec![
        ("AMIBAKE_STAGE".into(), "test".into()),
        ("AMIBAKE_AMI_ID".into(), image_id.clone()),
        ("AMIBAKE_INSTANCE_ID".into(), instance_id.clone()),
    ];
    facts.extend(image.facts().into_iter().map(|(k, v)| (k.to_string(), v)));
    let tests: Vec<Provisioner> = image
        .plan
        .tests
        .iter()
        .cloned()
        .map(|mut t| {
            t.env.extend(facts.iter().cloned());
            t
        })
        .collect();
    let session = instance.session()?;
    let outcome = provision::run_all(
        session.as_ref(),
        Entries::Tests,
        &tests,
        &ctx.progress,
        &ctx.cancel,
    )
    .await;
    drop(session);
    match outcome {
        Ok(()) => {
            ctx.progress.note(format!(
                "{} passed {count} test(s) on {instance_id}",
                image_id
            ));
            // Said on the image, so a run that reuses it does not boot it again.
            mark_tested(&image.clients, &image_id).await?;
            // The session ends, then the instance, its group and key pair go now rather
            // than at the end of the run.
            instance.remove(ctx).await
        }
        Err(ProvisionError::Interrupted { .. }) => Err(StepError::Interrupted),
        Err(source) => Err(failed(TestFailed {
            image_id,
            instance_id,
            source,
        })),
    }
}

//! The booted test of a new image: an instance of it, launched and reached as a base
//! build's instance is, runs the template's `[[base.test]]` or `[[bake.test]]` entries over SSH before the image
//! is delivered or published. A failing test fails the run, whose cleanup removes the
//! image; the instance, its key pair and its group go either way.

use super::instance::{Launch, Role, TemporaryInstance};
use super::support::{earlier, failed};
use crate::artifact::{TAG_TESTED, TESTED_PASSED};
use crate::aws::{AwsError, Clients};
use crate::engine::{StepContext, StepError};
use crate::provision::{self, Entries, ProvisionError};
use crate::template::{InstancePlan, Provisioner};

/// What the test step of either mode knows.
pub struct ImageTest<'a> {
    pub clients: &'a Clients,
    pub build_id: &'a str,
    pub image_id: &'a str,
    /// The image's root device, for a root size or type from the instance settings.
    pub root_device_name: &'a str,
    /// How the image is booted; set by the template check wherever there are tests.
    pub instance: Option<&'a InstancePlan>,
    pub tests: &'a [Provisioner],
    /// `--no-test`.
    pub skip: bool,
    /// The run's facts, in every test's environment beside `AMIBAKE_AMI_ID`.
    pub facts: Vec<(&'static str, String)>,
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
    clients
        .ec2
        .create_tags()
        .resources(image_id)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key(TAG_TESTED)
                .value(TESTED_PASSED)
                .build(),
        )
        .send()
        .await
        .map_err(|e| failed(AwsError::new(format!("tag {image_id} tested"), &e)))?;
    Ok(())
}

pub async fn run(test: ImageTest<'_>, ctx: &mut StepContext) -> Result<(), StepError> {
    let count = test.tests.len();
    if count == 0 {
        ctx.progress
            .note("no [[base.test]] or [[bake.test]] in the template: the image is not booted");
        return Ok(());
    }
    if test.skip {
        ctx.progress.note(format!(
            "--no-test: {count} test(s) skipped, {} is not booted",
            test.image_id
        ));
        return Ok(());
    }
    let plan = earlier(&test.instance.cloned(), "test instance settings")?;
    let launch = Launch {
        image_id: test.image_id.to_string(),
        root_device_name: test.root_device_name.to_string(),
        plan,
        role: Role::Test,
    };
    let mut instance =
        TemporaryInstance::new(test.clients, test.build_id, launch).map_err(failed)?;
    instance.create_key_pair(ctx).await?;
    instance.create_security_group(ctx).await?;
    instance.launch(ctx).await?;
    instance.wait_for_ssh(ctx).await?;
    let instance_id = instance.id()?;
    let mut facts: Vec<(String, String)> = vec![
        ("AMIBAKE_STAGE".into(), "test".into()),
        ("AMIBAKE_AMI_ID".into(), test.image_id.to_string()),
        ("AMIBAKE_INSTANCE_ID".into(), instance_id.clone()),
    ];
    facts.extend(test.facts.into_iter().map(|(k, v)| (k.to_string(), v)));
    let tests: Vec<Provisioner> = test
        .tests
        .iter()
        .cloned()
        .map(|mut t| {
            t.env.extend(facts.iter().cloned());
            t
        })
        .collect();
    let ssh = instance.ssh()?;
    let outcome = provision::run_all(
        ssh.as_ref(),
        Entries::Tests,
        &tests,
        &ctx.progress,
        &ctx.cancel,
    )
    .await;
    drop(ssh);
    match outcome {
        Ok(()) => {
            ctx.progress.note(format!(
                "{} passed {count} test(s) on {instance_id}",
                test.image_id
            ));
            // Said on the image, so a run that reuses it does not boot it again.
            mark_tested(test.clients, test.image_id).await?;
            // The session ends, then the instance, its group and key pair go now rather
            // than at the end of the run.
            instance.remove(ctx).await
        }
        Err(ProvisionError::Interrupted { .. }) => Err(StepError::Interrupted),
        Err(source) => Err(failed(TestFailed {
            image_id: test.image_id.to_string(),
            instance_id,
            source,
        })),
    }
}

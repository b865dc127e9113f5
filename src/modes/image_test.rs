//! The booted test of a new image: an instance of it, launched and reached as a base
//! build's instance is, runs the template's `[[base.test]]` or `[[bake.test]]` entries over SSH before the image
//! is delivered or published. A failing test fails the run, whose cleanup removes the
//! image; the instance, its key pair and its group go either way.

use super::instance::{Launch, Role, TemporaryInstance};
use super::support::{earlier, failed};
use crate::artifact::{TAG_TESTED, TESTED_PASSED};
use crate::aws::Clients;
use crate::engine::{StepContext, StepError};
use crate::provision::{self, Entries, ProvisionError};
use crate::template::Provisioner;

use super::image::ImageState;

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
pub async fn run(image: &ImageState, ctx: &mut StepContext) -> Result<(), StepError> {
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
    instance.wait_for_ssh(ctx).await?;
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

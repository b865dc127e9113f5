//! The instance profile of an instance reached through SSM, checked with IAM before the run
//! makes anything: a profile that does not exist or has no role is refused; a role without
//! AWS's policy for SSM's agent, or a profile these credentials may not read, is said.

use std::sync::Arc;

use crate::aws::iam::{instance_profile, Profile};
use crate::aws::Clients;
use crate::engine::{Event, EventSink};
use crate::modes::ModeError;
use crate::template::{CommunicatorKind, InstancePlan};

/// `plan`'s profile, when SSM reaches its instance; `table` is where the template sets it.
pub async fn check(
    clients: &Clients,
    plan: &InstancePlan,
    table: &str,
    sink: &Arc<dyn EventSink>,
) -> Result<(), ModeError> {
    let (CommunicatorKind::Ssm, Some(profile)) = (plan.communicator, &plan.iam_instance_profile)
    else {
        return Ok(());
    };
    let setting = format!("{table}.iam_instance_profile");
    let note = |message: String| {
        sink.emit(&Event::Note {
            step: String::new(),
            message,
        })
    };
    match instance_profile(clients, &setting, profile).await? {
        Profile::Role(role) if role.has_ssm_agent_policy => {}
        Profile::Role(role) => note(format!(
            "{setting}: its role {} has no AmazonSSMManagedInstanceCore policy attached; unless its own policies allow SSM's agent, the instance never registers and the run gives up after `agent_timeout_seconds`",
            role.name
        )),
        Profile::Unreadable { detail } => note(format!(
            "{setting}: not checked before the launch, as these credentials may not read it ({detail})"
        )),
    }
    Ok(())
}

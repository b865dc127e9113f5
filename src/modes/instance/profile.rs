//! The instance profile of an instance reached through SSM, checked with IAM before the run
//! makes anything: a profile that does not exist or has no role is refused; a role without
//! AWS's policy for SSM's agent (or, with a log group, for writing logs), or a profile these
//! credentials cannot read, is said.

use std::sync::Arc;

use crate::aws::iam::{instance_profile, Profile};
use crate::aws::Clients;
use crate::engine::{Event, EventSink};
use crate::modes::ModeError;
use crate::template::{CommunicatorKind, InstancePlan};

/// `plan`'s profile, when SSM reaches its instance.
pub async fn check(
    clients: &Clients,
    plan: &InstancePlan,
    sink: &Arc<dyn EventSink>,
) -> Result<(), ModeError> {
    let (CommunicatorKind::Ssm, Some(profile)) = (plan.communicator, &plan.iam_instance_profile)
    else {
        return Ok(());
    };
    let setting = format!("{}.iam_instance_profile", plan.table);
    let notes = match instance_profile(clients, &setting, profile).await? {
        Profile::Read {
            role,
            agent_policy,
            log_policy,
            s3_policy,
        } => {
            let mut notes = Vec::new();
            if !agent_policy {
                notes.push(format!(
                    "{setting}: its role {role} has no AmazonSSMManagedInstanceCore policy attached; unless its own policies allow SSM's agent, the instance never registers and the run gives up after `agent_timeout_seconds`"
                ));
            }
            if let (Some(group), false) = (&plan.ssm_log_group, log_policy) {
                notes.push(format!(
                    "{setting}: its role {role} has no CloudWatchAgentServerPolicy attached; unless its own policies let the agent write to {group} (`{}.ssm_log_group`), each command's output is shown when it ends",
                    plan.table
                ));
            }
            if let (Some(bucket), false) = (&plan.ssm_bucket, s3_policy) {
                notes.push(format!(
                    "{setting}: its role {role} has no AmazonS3ReadOnlyAccess attached; unless its own policies let the agent read s3://{bucket}/amibake/* (`{}.ssm_bucket`), a file sent through the bucket fails",
                    plan.table
                ));
            }
            notes
        }
        Profile::Unreadable { detail } => vec![format!(
            "{setting}: not checked before the launch, as IAM did not answer for it ({detail})"
        )],
        Profile::PoliciesUnreadable { role, detail } => vec![format!(
            "{setting}: the policies of its role {role} were not checked before the launch, as IAM did not list them ({detail})"
        )],
    };
    for message in notes {
        sink.emit(&Event::Note {
            step: String::new(),
            message,
        });
    }
    Ok(())
}

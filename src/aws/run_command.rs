//! SSM Run Command: a shell script sent to an instance's agent, and what became of it. An
//! instance is reached this way once its agent has registered it as a managed node
//! (DescribeInstanceInformation), with no key pair and no port open to it.
//!
//! SSM keeps each command's text, readable with ListCommands and GetCommandInvocation for
//! weeks after: nothing secret may be part of a script sent here in the clear (the
//! communicator seals the template's commands; see `communicator::sealed`).

use std::time::Duration;

use aws_sdk_ssm::types::{
    CloudWatchOutputConfig, CommandInvocationStatus, InstanceInformationStringFilter,
};
use tokio_util::sync::CancellationToken;

use super::resources::ResourceError;
use super::wait::{wait_for, Poll, WaitPolicy};
use super::{AwsError, Clients};
use crate::engine::Progress;

/// The shell document every command runs through.
pub const SHELL_DOCUMENT: &str = "AWS-RunShellScript";
/// The document whose agent fetches a file itself, with the instance's role.
pub const DOWNLOAD_DOCUMENT: &str = "AWS-DownloadContent";

/// What a command does on the instance.
#[derive(Debug, Clone, Copy)]
pub enum Command<'a> {
    /// A shell script, run as root; with a log group, its output streams there; with an
    /// output bucket (bucket, key prefix), the agent puts its whole output there at its end.
    Script {
        script: &'a str,
        log_group: Option<&'a str>,
        output_bucket: Option<(&'a str, &'a str)>,
    },
    /// The S3 object at `url`, fetched by the agent into the directory `into`.
    Download { url: &'a str, into: &'a str },
}

/// The agent's bounds for a command's `executionTimeout`; outside them it takes its default
/// of an hour. A command is cut sooner by cancelling it.
pub const LONGEST_EXECUTION: Duration = Duration::from_secs(172_800);

/// What SSM answers of a command's standard output and error (GetCommandInvocation); an
/// output bucket and a log group get them whole.
pub const STDOUT_KEPT: usize = 24_000;
pub const STDERR_KEPT: usize = 8_000;

/// SendCommand's comment is at most this long.
const COMMENT_LIMIT: usize = 100;

/// Whether the instance's agent has registered it and is online.
pub async fn agent_online(clients: &Clients, instance_id: &str) -> Result<bool, AwsError> {
    let filter = InstanceInformationStringFilter::builder()
        .key("InstanceIds")
        .values(instance_id)
        .build()
        .map_err(|e| AwsError::answer("describe the SSM managed node", e.to_string()))?;
    let out = clients
        .ssm
        .describe_instance_information()
        .filters(filter)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("describe {instance_id} as an SSM managed node"), e))?;
    Ok(out.instance_information_list().iter().any(|i| {
        i.instance_id() == Some(instance_id)
            && i.ping_status().map(|s| s.as_str()) == Some("Online")
    }))
}

/// Waits, at most `bound`, until the instance's agent has registered it and is online.
pub async fn wait_for_agent(
    clients: &Clients,
    instance_id: &str,
    bound: Duration,
    cancel: &CancellationToken,
    progress: &Progress,
) -> Result<(), ResourceError> {
    let policy = WaitPolicy {
        first_poll: Duration::from_millis(500),
        max_interval: Duration::from_secs(3),
        total: bound,
    };
    wait_for(
        "the SSM agent of",
        instance_id,
        policy,
        cancel,
        |state, _| progress.note(format!("{instance_id}: {state}")),
        || async {
            Ok(match agent_online(clients, instance_id).await? {
                true => Poll::Ready(()),
                false => Poll::Pending {
                    state: "not registered with SSM yet".into(),
                    percent: None,
                },
            })
        },
    )
    .await
}

/// The log stream the agent writes a command's `stdout` or `stderr` into, in the group the
/// command named (SSM's naming: command, instance, the shell plugin's id, the stream).
pub fn output_stream(command_id: &str, instance_id: &str, stream: &str) -> String {
    format!("{command_id}/{instance_id}/aws-runShellScript/{stream}")
}

/// Sends `script` to the instance's agent to run with `sh` as root; answers the command's
/// id. `comment` says which run sent it, in SSM's list of commands; with `log_group`, the
/// agent streams the output into that CloudWatch Logs group as it is written.
pub async fn send(
    clients: &Clients,
    instance_id: &str,
    command: Command<'_>,
    comment: &str,
) -> Result<String, AwsError> {
    let comment: String = comment.chars().take(COMMENT_LIMIT).collect();
    let request = clients
        .ssm
        .send_command()
        .instance_ids(instance_id)
        .comment(comment);
    let request = match command {
        Command::Script {
            script,
            log_group,
            output_bucket,
        } => request
            .set_cloud_watch_output_config(log_group.map(|group| {
                CloudWatchOutputConfig::builder()
                    .cloud_watch_output_enabled(true)
                    .cloud_watch_log_group_name(group)
                    .build()
            }))
            .set_output_s3_bucket_name(output_bucket.map(|(bucket, _)| bucket.to_string()))
            .set_output_s3_key_prefix(output_bucket.map(|(_, prefix)| prefix.to_string()))
            .document_name(SHELL_DOCUMENT)
            .parameters("commands", vec![script.to_string()])
            .parameters(
                "executionTimeout",
                vec![LONGEST_EXECUTION.as_secs().to_string()],
            ),
        Command::Download { url, into } => request
            .document_name(DOWNLOAD_DOCUMENT)
            .parameters("sourceType", vec!["S3".to_string()])
            .parameters(
                "sourceInfo",
                vec![serde_json::json!({ "path": url }).to_string()],
            )
            .parameters("destinationPath", vec![into.to_string()]),
    };
    let out = request
        .send()
        .await
        .map_err(|e| AwsError::new(format!("send a command to {instance_id}"), e))?;
    out.command()
        .and_then(|c| c.command_id())
        .map(str::to_string)
        .ok_or_else(|| AwsError::answer("SendCommand", "the answer names no command id"))
}

/// Where a command stands on one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// The agent has not taken it yet (InvocationDoesNotExist, as SSM answers then).
    NotTaken,
    /// Pending, InProgress, Delayed or Cancelling: its status.
    Running(String),
    /// It has ended.
    Ended(Ended),
}

/// A command that has ended: its status, its exit code, and the output SSM kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// Success, Failed, Cancelled, TimedOut, DeliveryTimedOut, Undeliverable, Terminated.
    pub status: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Where command `command_id` stands on `instance_id`.
pub async fn invocation(
    clients: &Clients,
    command_id: &str,
    instance_id: &str,
) -> Result<Invocation, AwsError> {
    let out = match clients
        .ssm
        .get_command_invocation()
        .command_id(command_id)
        .instance_id(instance_id)
        .send()
        .await
    {
        Ok(out) => out,
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_invocation_does_not_exist()) =>
        {
            return Ok(Invocation::NotTaken)
        }
        Err(e) => {
            return Err(AwsError::new(
                format!("read command {command_id} on {instance_id}"),
                e,
            ))
        }
    };
    let status = out
        .status()
        .cloned()
        .unwrap_or(CommandInvocationStatus::Pending);
    Ok(match status {
        CommandInvocationStatus::Pending
        | CommandInvocationStatus::InProgress
        | CommandInvocationStatus::Delayed
        | CommandInvocationStatus::Cancelling => Invocation::Running(status.as_str().into()),
        ended => Invocation::Ended(Ended {
            status: ended.as_str().into(),
            code: out.response_code(),
            stdout: out.standard_output_content().unwrap_or_default().into(),
            stderr: out.standard_error_content().unwrap_or_default().into(),
        }),
    })
}

/// Asks the agent to end command `command_id` on `instance_id`; it answers Cancelled once
/// the command's processes are gone.
pub async fn cancel(
    clients: &Clients,
    command_id: &str,
    instance_id: &str,
) -> Result<(), AwsError> {
    clients
        .ssm
        .cancel_command()
        .command_id(command_id)
        .instance_ids(instance_id)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| AwsError::new(format!("cancel command {command_id} on {instance_id}"), e))
}

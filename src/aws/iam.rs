//! The instance profile a template names for an instance reached through SSM, read before
//! anything is made. EC2 launches with a profile that lacks a role, or whose role SSM may
//! not use, and the run learns of it only when the agent's wait gives up minutes later.

use super::{describe, resources::code, Clients};

/// AWS's managed policies that let SSM's agent register an instance (the second is the
/// older one, deprecated but still attached in many accounts), in every partition.
const SSM_AGENT_POLICIES: [&str; 2] = [
    ":iam::aws:policy/AmazonSSMManagedInstanceCore",
    ":iam::aws:policy/service-role/AmazonEC2RoleforSSM",
];

/// AWS's managed policies that let the agent write a command's output to CloudWatch Logs
/// (the older policy for the agent grants it too).
const LOG_WRITING_POLICIES: [&str; 3] = [
    ":iam::aws:policy/CloudWatchAgentServerPolicy",
    ":iam::aws:policy/CloudWatchLogsFullAccess",
    ":iam::aws:policy/service-role/AmazonEC2RoleforSSM",
];

/// AWS's managed policies that let the agent read an object from any bucket (the older
/// policy for the agent grants it too).
const S3_READING_POLICIES: [&str; 3] = [
    ":iam::aws:policy/AmazonS3ReadOnlyAccess",
    ":iam::aws:policy/AmazonS3FullAccess",
    ":iam::aws:policy/service-role/AmazonEC2RoleforSSM",
];

#[derive(Debug, thiserror::Error)]
#[error("{setting} = \"{profile}\": {problem}")]
pub struct ProfileError {
    pub setting: String,
    pub profile: String,
    pub problem: String,
}

/// What IAM says of the profile. Only what IAM answered for certain refuses a run: a read
/// that failed otherwise (denied, throttled, no route to IAM) leaves the launch to tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// The profile and its role's attached policies were read. A role without AWS's
    /// policies may still be allowed by its own, which IAM does not say without evaluating
    /// them.
    Read {
        role: String,
        /// One of AWS's policies for SSM's agent is attached.
        agent_policy: bool,
        /// One of AWS's policies that let the agent write logs is attached.
        log_policy: bool,
        /// One of AWS's policies that let the agent read S3 is attached.
        s3_policy: bool,
    },
    /// The profile could not be read.
    Unreadable { detail: String },
    /// The profile was read, its role's policies could not be listed.
    PoliciesUnreadable { role: String, detail: String },
}

/// The name of a profile a template names by name or by ARN: an ARN's last segment, after
/// any path.
pub fn profile_name(profile: &str) -> &str {
    profile.rsplit('/').next().unwrap_or(profile)
}

/// The profile named `profile` (a name or an ARN) in `setting`: an error when IAM has no such
/// profile, or it has no role (its instance would have no credentials for the agent).
pub async fn instance_profile(
    clients: &Clients,
    setting: &str,
    profile: &str,
) -> Result<Profile, ProfileError> {
    let problem = |problem: String| ProfileError {
        setting: setting.to_string(),
        profile: profile.to_string(),
        problem,
    };
    let name = profile_name(profile);
    let answer = match clients
        .iam
        .get_instance_profile()
        .instance_profile_name(name)
        .send()
        .await
    {
        Ok(answer) => answer,
        Err(e) if code(&e) == Some("NoSuchEntity") => {
            return Err(problem(format!(
                "IAM has no instance profile of that name in this account ({}); SSM reaches an instance only through its profile's role",
                describe(&e)
            )))
        }
        Err(e) => {
            return Ok(Profile::Unreadable {
                detail: describe(&e),
            })
        }
    };
    let role = answer
        .instance_profile()
        .and_then(|p| p.roles().first())
        .map(|r| r.role_name().to_string())
        .ok_or_else(|| {
            problem("the instance profile has no role, so its instance gets no credentials and SSM's agent cannot register it: add a role with AWS's AmazonSSMManagedInstanceCore policy".into())
        })?;
    let attached = clients
        .iam
        .list_attached_role_policies()
        .role_name(&role)
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await;
    let attached = match attached {
        Ok(attached) => attached,
        Err(e) => {
            return Ok(Profile::PoliciesUnreadable {
                role,
                detail: describe(&e),
            })
        }
    };
    let has_one_of = |policies: &[&str]| {
        attached
            .iter()
            .filter_map(|p| p.policy_arn())
            .any(|arn| policies.iter().any(|p| arn.ends_with(p)))
    };
    Ok(Profile::Read {
        agent_policy: has_one_of(&SSM_AGENT_POLICIES),
        log_policy: has_one_of(&LOG_WRITING_POLICIES),
        s3_policy: has_one_of(&S3_READING_POLICIES),
        role,
    })
}

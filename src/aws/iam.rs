//! The instance profile a template names for an instance reached through SSM, read before
//! anything is made. EC2 launches with a profile that lacks a role, or whose role SSM may
//! not use, and the run learns of it only when the agent's wait gives up minutes later.

use super::{describe, resources::code, Clients};

/// AWS's managed policies that let SSM's agent register an instance (the second is the
/// older one, deprecated but still attached in many accounts).
const SSM_AGENT_POLICIES: [&str; 2] = ["AmazonSSMManagedInstanceCore", "AmazonEC2RoleforSSM"];

#[derive(Debug, thiserror::Error)]
#[error("{setting} = \"{profile}\": {problem}")]
pub struct ProfileError {
    pub setting: String,
    pub profile: String,
    pub problem: String,
}

/// A role of the profile, as far as SSM's agent is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileRole {
    pub name: String,
    /// One of AWS's policies for SSM's agent is attached to it. Without, the role's own
    /// policies may still allow the agent: IAM does not say so without evaluating them.
    pub has_ssm_agent_policy: bool,
}

/// What IAM says of the profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Profile {
    /// It exists, with this role (a profile holds at most one).
    Role(ProfileRole),
    /// These credentials may not read it: the launch will tell.
    Unreadable { detail: String },
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
    // An ARN's name is its last segment, after any path.
    let name = profile.rsplit('/').next().unwrap_or(profile);
    let answer = match clients
        .iam
        .get_instance_profile()
        .instance_profile_name(name)
        .send()
        .await
    {
        Ok(answer) => answer,
        Err(e) if code(&e) == Some("AccessDenied") => {
            return Ok(Profile::Unreadable {
                detail: describe(&e),
            })
        }
        Err(e) => {
            return Err(problem(match code(&e) {
                Some("NoSuchEntity") => format!(
                    "IAM has no instance profile of that name in this account ({}); SSM reaches an instance only through its profile's role",
                    describe(&e)
                ),
                _ => format!("cannot read the instance profile: {}", describe(&e)),
            }))
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
        Err(e) if code(&e) == Some("AccessDenied") => {
            return Ok(Profile::Unreadable {
                detail: describe(&e),
            })
        }
        Err(e) => {
            return Err(problem(format!(
                "cannot list the policies of its role {role}: {}",
                describe(&e)
            )))
        }
    };
    let has_ssm_agent_policy = attached
        .iter()
        .filter_map(|p| p.policy_name())
        .any(|name| SSM_AGENT_POLICIES.contains(&name));
    Ok(Profile::Role(ProfileRole {
        name: role,
        has_ssm_agent_policy,
    }))
}

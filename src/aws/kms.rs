//! The KMS key a template names, checked before anything is made with it. EBS checks the
//! key of CreateVolume only after answering: a key that does not exist, is disabled, or
//! that this role cannot use gives a volume that is `creating` for a moment and then is
//! gone, which reads as EC2's eventual consistency until the wait gives up.

use aws_sdk_kms::types::{KeySpec, KeyState, KeyUsageType};

use super::{describe, Clients};

#[derive(Debug, thiserror::Error)]
#[error("{key_setting} = \"{key}\": {problem}")]
pub struct KeyError {
    pub key_setting: String,
    pub key: String,
    pub problem: String,
}

/// Checks that `key` (an id, ARN, alias or alias ARN) is a KMS key in this region that EBS
/// can encrypt with: enabled, symmetric, for encryption. Answers its ARN.
pub async fn usable_for_ebs(
    clients: &Clients,
    key_setting: &str,
    key: &str,
) -> Result<String, KeyError> {
    let problem = |problem: String| KeyError {
        key_setting: key_setting.to_string(),
        key: key.to_string(),
        problem,
    };
    let answer = clients
        .kms
        .describe_key()
        .key_id(key)
        .send()
        .await
        .map_err(|e| {
            let detail = describe(&e);
            problem(match super::resources::code(&e) {
                Some("NotFoundException") => format!(
                    "no such KMS key in {} ({detail}); name a key of this region by id, ARN or alias",
                    clients.region
                ),
                Some("AccessDeniedException") => format!(
                    "this role may not describe the key ({detail}); EBS needs kms:DescribeKey, kms:CreateGrant, kms:GenerateDataKeyWithoutPlaintext, kms:Decrypt and kms:ReEncrypt* on it"
                ),
                _ => format!("cannot look the key up: {detail}"),
            })
        })?;
    let meta = answer
        .key_metadata()
        .ok_or_else(|| problem("DescribeKey answered no key metadata".into()))?;
    if meta.key_state() != Some(&KeyState::Enabled) {
        return Err(problem(format!(
            "the key is {}, and EBS encrypts only with an enabled key",
            meta.key_state().map_or("in no state", |s| s.as_str())
        )));
    }
    if meta.key_spec() != Some(&KeySpec::SymmetricDefault)
        || meta.key_usage() != Some(&KeyUsageType::EncryptDecrypt)
    {
        return Err(problem(format!(
            "the key is {} for {}; EBS encrypts only with a symmetric encryption key (SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT)",
            meta.key_spec().map_or("of no spec", |s| s.as_str()),
            meta.key_usage().map_or("no usage", |u| u.as_str())
        )));
    }
    meta.arn()
        .map(str::to_string)
        .ok_or_else(|| problem("DescribeKey answered no key ARN".into()))
}

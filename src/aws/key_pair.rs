//! Temporary key pairs: deleted once EC2 knows them.

use tokio_util::sync::CancellationToken;

use aws_sdk_ec2::types::{KeyType, ResourceType, Tag};

use super::resources::{code, tagged, visible, ResourceError};
use super::wait::{wait_for, Poll, WaitError, WaitPolicy};
use super::{AwsError, Clients};

/// Deletes a key pair by name. DeleteKeyPair answers success for a name it does not know,
/// so a key pair that is not visible yet is looked for first.
pub async fn delete(clients: Clients, name: String) -> Result<(), ResourceError> {
    let ec2 = clients.ec2.clone();
    let known = wait_for(
        "key pair",
        &name,
        WaitPolicy::SHORT,
        &CancellationToken::new(),
        |_, _| {},
        || {
            let (ec2, name) = (ec2.clone(), name.clone());
            async move {
                let described = ec2.describe_key_pairs().key_names(&name).send().await;
                Ok(
                    match visible(described, "InvalidKeyPair.NotFound", &name)? {
                        Some(_) => Poll::Ready(true),
                        None => Poll::NotYetVisible,
                    },
                )
            }
        },
    )
    .await;
    match known {
        Ok(_) | Err(WaitError::NeverVisible { .. }) => {}
        Err(e) => return Err(e),
    }
    clients
        .ec2
        .delete_key_pair()
        .key_name(&name)
        .send()
        .await
        .map(|_| ())
        .or_else(|e| match code(&e) {
            Some("InvalidKeyPair.NotFound") => Ok(()),
            _ => Err(WaitError::Poll(AwsError::new(
                format!("delete key pair {name}"),
                e,
            ))),
        })
}

/// Why a key pair was not had. `Exists`: EC2 refused the name as taken, which for a name
/// this build alone uses is the SDK's retry after a lost answer: the key pair is there
/// (and must go), but its private key went with that answer.
#[derive(Debug, thiserror::Error)]
pub enum KeyPairError {
    #[error(transparent)]
    Exists(AwsError),
    #[error(transparent)]
    Aws(AwsError),
    #[error("CreateKeyPair returned no private key")]
    NoPrivateKey,
}

/// A new Ed25519 key pair named `name`, tagged in the call; answers its private key.
pub async fn create(clients: &Clients, name: &str, tags: &[Tag]) -> Result<String, KeyPairError> {
    let out = clients
        .ec2
        .create_key_pair()
        .key_name(name)
        .key_type(KeyType::Ed25519)
        .tag_specifications(tagged(ResourceType::KeyPair, tags))
        .send()
        .await;
    match out {
        Ok(out) => out
            .key_material()
            .map(str::to_string)
            .ok_or(KeyPairError::NoPrivateKey),
        Err(e) => {
            let error = AwsError::new(format!("create key pair {name}"), e);
            Err(match error.code.as_deref() {
                Some("InvalidKeyPair.Duplicate") => KeyPairError::Exists(error),
                _ => KeyPairError::Aws(error),
            })
        }
    }
}

/// Key pairs of amibake runs, as (build id, key pair name). (DescribeKeyPairs answers all
/// in one page.)
pub async fn of_runs(clients: &Clients) -> Result<Vec<(String, String)>, AwsError> {
    let out = clients
        .ec2
        .describe_key_pairs()
        .filters(super::resources::of_runs())
        .send()
        .await
        .map_err(|e| AwsError::new("list the key pairs of amibake runs", e))?;
    Ok(super::resources::by_build_id(
        out.key_pairs(),
        |k| k.tags(),
        |k| k.key_name(),
    ))
}

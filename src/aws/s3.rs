//! S3, for SSM: a file too large for a command's text waits in the template's bucket, sealed,
//! until the instance's agent has fetched it (AWS-DownloadContent), and is deleted then; the
//! agent puts each command's whole output there, read where SSM cut its own and deleted.

use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;

use super::{AwsError, Clients};

/// Every object a run stages starts with this, then the run's build id.
pub const PREFIX: &str = "amibake/";

/// The key of a run's `name`.
pub fn staged_key(build_id: &str, name: &str) -> String {
    format!("{PREFIX}{build_id}/{name}")
}

/// Where the agent fetches `key` of `bucket` from: the path-style URL of the run's region.
pub fn object_url(region: &str, bucket: &str, key: &str) -> String {
    format!("https://s3.{region}.amazonaws.com/{bucket}/{key}")
}

/// Puts the file at `path` as `key` of `bucket`, read as it is sent.
pub async fn put_file(
    clients: &Clients,
    bucket: &str,
    key: &str,
    path: &Path,
) -> Result<(), AwsError> {
    let action = format!("put s3://{bucket}/{key}");
    let body = ByteStream::from_path(path)
        .await
        .map_err(|e| AwsError::answer(&action, format!("cannot read {}: {e}", path.display())))?;
    clients
        .s3
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(body)
        .send()
        .await
        .map_err(|e| AwsError::new(action, e))?;
    Ok(())
}

/// Where the agent puts a script's whole output, per stream, under `prefix` (SendCommand's
/// OutputS3KeyPrefix): standard output, then standard error.
pub fn output_copies(prefix: &str, command_id: &str, instance_id: &str) -> [String; 2] {
    ["stdout", "stderr"].map(|stream| {
        format!(
            "{prefix}/{command_id}/{instance_id}/awsrunShellScript/0.awsrunShellScript/{stream}"
        )
    })
}

/// The object `key` of `bucket` as text, or None when there is no such object.
pub async fn get_text(
    clients: &Clients,
    bucket: &str,
    key: &str,
) -> Result<Option<String>, AwsError> {
    let action = format!("get s3://{bucket}/{key}");
    let answer = match clients.s3.get_object().bucket(bucket).key(key).send().await {
        Ok(answer) => answer,
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
        Err(e) => return Err(AwsError::new(action, e)),
    };
    let bytes = answer
        .body
        .collect()
        .await
        .map_err(|e| AwsError::answer(&action, e.to_string()))?
        .into_bytes();
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Deletes `key` of `bucket`; an object already gone is deleted.
pub async fn delete_object(clients: &Clients, bucket: &str, key: &str) -> Result<(), AwsError> {
    clients
        .s3
        .delete_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| AwsError::new(format!("delete s3://{bucket}/{key}"), e))?;
    Ok(())
}

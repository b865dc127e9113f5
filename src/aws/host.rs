//! The build host's own identity, from IMDSv2: `bake` creates its volume in the host's zone
//! and attaches it to the host.

use aws_config::imds::client::error::ImdsError;
use aws_config::imds::Client;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostIdentity {
    pub instance_id: String,
    pub availability_zone: String,
    pub region: String,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot read {path} from the instance metadata service (IMDSv2); `amibake bake` runs on an EC2 build host")]
pub struct HostError {
    path: &'static str,
    source: ImdsError,
}

/// How long `probe` waits for the metadata service: on EC2 it answers in milliseconds.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// The host's identity if this machine is an EC2 instance, found quickly either way: one
/// attempt, each request within `PROBE_TIMEOUT`.
pub async fn probe() -> Option<HostIdentity> {
    let quick = Client::builder()
        .max_attempts(1)
        .connect_timeout(PROBE_TIMEOUT)
        .read_timeout(PROBE_TIMEOUT)
        .build();
    tokio::time::timeout(PROBE_TIMEOUT * 4, read_identity(quick))
        .await
        .ok()?
        .ok()
}

/// Reads the host's instance id, zone and region. The IMDS endpoint comes from the usual
/// places (`AWS_EC2_METADATA_SERVICE_ENDPOINT`, the profile, or the link-local default).
pub async fn identity() -> Result<HostIdentity, HostError> {
    read_identity(Client::builder().build()).await
}

async fn read_identity(imds: Client) -> Result<HostIdentity, HostError> {
    let get = |path: &'static str| {
        let imds = imds.clone();
        async move {
            imds.get(path)
                .await
                .map(|v| v.as_ref().trim().to_string())
                .map_err(|source| HostError { path, source })
        }
    };
    Ok(HostIdentity {
        instance_id: get("/latest/meta-data/instance-id").await?,
        availability_zone: get("/latest/meta-data/placement/availability-zone").await?,
        region: get("/latest/meta-data/placement/region").await?,
    })
}

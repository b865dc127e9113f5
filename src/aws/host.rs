//! The build host's own identity, from IMDSv2: `bake` creates its volume in the host's zone
//! and attaches it to the host.

use aws_config::imds::client::error::ImdsError;
use aws_config::imds::Client;

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

/// Reads the host's instance id, zone and region. The IMDS endpoint comes from the usual
/// places (`AWS_EC2_METADATA_SERVICE_ENDPOINT`, the profile, or the link-local default).
pub async fn identity() -> Result<HostIdentity, HostError> {
    let imds = Client::builder().build();
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

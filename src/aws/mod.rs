//! Thin typed calls over the AWS SDK: client set-up through aws-config's default chain, the
//! one wait helper, and one way to render SDK errors.

pub mod ami;
pub mod console;
pub mod ebs;
pub mod host;
pub mod iam;
pub mod image;
pub mod instance;
pub mod key_pair;
pub mod kms;
pub mod launch_template;
pub mod logs;
pub mod resources;
pub mod run_command;
pub mod s3;
pub mod security_group;
pub mod snapshot;
pub mod ssm;
pub mod volume;
pub mod wait;

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::RequestId;

/// Attempts per call before a throttled or failing request gives up, with the standard
/// mode's exponential backoff between them (at most 20 s apart). Under EC2's request
/// throttling of a busy account half the calls may be refused for a while: a run makes
/// hundreds of calls, and with 8 attempts one in 256 would still fail it; 20 make that one in
/// a million. Not adaptive mode: its client-side rate limiter learns from too few calls in a
/// run like ours, and after one throttled answer held the next call back 18 s here (and a
/// Ctrl-C with it).
const MAX_ATTEMPTS: u32 = 20;

/// The first pause before a call is tried again, doubled each time up to `MAX_BACKOFF`, with
/// jitter. The SDK's 1 s made a run under steady throttling spend most of its time asleep;
/// other AWS SDKs start at 100 ms (500 ms for a throttle).
const INITIAL_BACKOFF: std::time::Duration = std::time::Duration::from_millis(250);

/// The longest pause between attempts. With 20 attempts, a call that keeps failing (a
/// service error, no network) gives up within about 80 s, as 8 attempts up to the SDK's
/// 20 s did, and an undo after Ctrl-C is not held for minutes.
const MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(5);

/// Retries a run may spend on its control-plane calls. The SDK's default quota (500 tokens,
/// 5 a retry) is spent after 100 retries, and then a throttled call fails at once: eight
/// bakes throttled together spent it in seconds.
const RETRY_QUOTA: usize = 100_000;

/// Where and as whom to talk to AWS; `None` leaves it to the default chain (environment,
/// profile, SSO, web identity, container and instance credentials; `AWS_ENDPOINT_URL`).
#[derive(Debug, Clone, Default)]
pub struct AwsOptions {
    pub region: Option<String>,
    pub profile: Option<String>,
}

/// The clients every mode uses, built once per run from one SDK config.
#[derive(Clone, Debug)]
pub struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub kms: aws_sdk_kms::Client,
    pub iam: aws_sdk_iam::Client,
    pub logs: aws_sdk_cloudwatchlogs::Client,
    pub s3: aws_sdk_s3::Client,
    pub ebs: aws_sdk_ebs::Client,
    pub sts: aws_sdk_sts::Client,
    pub region: String,
    /// What they were built from: the same credentials reach another region.
    config: SdkConfig,
}

pub async fn sdk_config(options: &AwsOptions) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).retry_config(
        RetryConfig::standard()
            .with_max_attempts(MAX_ATTEMPTS)
            .with_initial_backoff(INITIAL_BACKOFF)
            .with_max_backoff(MAX_BACKOFF),
    );
    if let Some(region) = &options.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(profile) = &options.profile {
        loader = loader.profile_name(profile);
    }
    loader.load().await
}

impl Clients {
    pub fn new(config: &SdkConfig) -> Result<Clients, NoRegion> {
        let region = config.region().ok_or(NoRegion)?.to_string();
        // One partition, and one quota with room for a run's retries, for the control-plane
        // clients.
        let partition = aws_sdk_ec2::config::retry::RetryPartition::custom("amibake-control")
            .token_bucket(
                aws_sdk_ec2::config::retry::TokenBucket::builder()
                    .capacity(RETRY_QUOTA)
                    .build(),
            )
            .build();
        Ok(Clients {
            ec2: aws_sdk_ec2::Client::from_conf(
                aws_sdk_ec2::config::Builder::from(config)
                    .retry_partition(partition.clone())
                    .build(),
            ),
            ssm: aws_sdk_ssm::Client::from_conf(
                aws_sdk_ssm::config::Builder::from(config)
                    .retry_partition(partition)
                    .build(),
            ),
            kms: aws_sdk_kms::Client::new(config),
            iam: aws_sdk_iam::Client::new(config),
            logs: aws_sdk_cloudwatchlogs::Client::new(config),
            s3: aws_sdk_s3::Client::new(config),
            ebs: aws_sdk_ebs::Client::from_conf(ebs::client_config(config)),
            sts: aws_sdk_sts::Client::new(config),
            region,
            config: config.clone(),
        })
    }

    /// The same clients, with the same credentials and endpoint, in another region.
    pub fn in_region(&self, region: &str) -> Clients {
        let config = self
            .config
            .to_builder()
            .region(Region::new(region.to_string()))
            .build();
        Clients::new(&config).expect("a region was just set")
    }
}

impl Clients {
    /// The account these credentials belong to.
    pub async fn account_id(&self) -> Result<String, AwsError> {
        let out = self
            .sts
            .get_caller_identity()
            .send()
            .await
            .map_err(|e| AwsError::new("GetCallerIdentity", e))?;
        out.account()
            .map(str::to_string)
            .ok_or_else(|| AwsError::answer("GetCallerIdentity", "the answer names no account"))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("no AWS region: pass --region, set AWS_REGION, or set one in the profile")]
pub struct NoRegion;

/// The regions this account has enabled.
pub async fn enabled_regions(clients: &Clients) -> Result<Vec<String>, AwsError> {
    let out = clients
        .ec2
        .describe_regions()
        .send()
        .await
        .map_err(|e| AwsError::new("list the account's regions", e))?;
    let mut regions: Vec<String> = out
        .regions()
        .iter()
        .filter_map(|r| r.region_name().map(str::to_string))
        .collect();
    regions.sort();
    Ok(regions)
}

/// A Describe* filter with one value: `filter("volume-id", id)`, `filter("tag:K", v)`.
pub fn filter(name: impl Into<String>, value: impl Into<String>) -> aws_sdk_ec2::types::Filter {
    aws_sdk_ec2::types::Filter::builder()
        .name(name)
        .values(value)
        .build()
}

/// An SDK error as one line: the AWS error code and message and the request id, or what kept
/// the request from being answered. `{}` on an `SdkError` says only "service error".
pub fn describe<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match err {
        SdkError::ServiceError(service) => {
            let e = service.err();
            let code = e.code().unwrap_or("UnknownError");
            let message = e.message().unwrap_or("no message");
            match err.request_id().or_else(|| e.meta().request_id()) {
                Some(id) => format!("{code}: {message} (request id {id})"),
                None => format!("{code}: {message}"),
            }
        }
        other => crate::engine::error_chain(other),
    }
}

/// An SDK call that failed, named by what it was doing, with AWS's error code when AWS
/// answered one, so callers tell kinds apart by code, never by text. The SDK's own error is
/// its source, for a caller that needs more than the code.
#[derive(Debug, thiserror::Error)]
#[error("{action} failed: {detail}")]
pub struct AwsError {
    pub action: String,
    pub code: Option<String>,
    pub detail: String,
    #[source]
    sdk: Option<SdkCause>,
}

/// The SDK's error behind an [`AwsError`]. Its message is the one line `describe` made of
/// it, which the `AwsError`'s already shows, so a chain printed as one line says it once;
/// the whole error is at [`SdkCause::error`].
#[derive(Debug, thiserror::Error)]
#[error("{line}")]
pub struct SdkCause {
    line: String,
    error: Box<dyn std::error::Error + Send + Sync>,
}

impl SdkCause {
    /// The SDK's error as it came, to downcast to `SdkError<E, HttpResponse>`.
    pub fn error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.error.as_ref()
    }
}

impl AwsError {
    pub fn new<E>(action: impl Into<String>, err: SdkError<E, HttpResponse>) -> AwsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let line = describe(&err);
        AwsError {
            action: action.into(),
            code: err
                .as_service_error()
                .and_then(|e| e.code())
                .map(str::to_string),
            detail: line.clone(),
            sdk: Some(SdkCause {
                line,
                error: Box::new(err),
            }),
        }
    }

    /// A call the SDK carried out whose answer lacks what it must hold.
    pub fn answer(action: impl Into<String>, detail: impl Into<String>) -> AwsError {
        AwsError {
            action: action.into(),
            code: None,
            detail: detail.into(),
            sdk: None,
        }
    }

    /// Whether AWS answered with this error code.
    pub fn is(&self, code: &str) -> bool {
        self.code.as_deref() == Some(code)
    }
}

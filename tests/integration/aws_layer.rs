//! amibake's AWS layer against the local cloud, through the real Rust SDK: client set-up from
//! the variables every SDK reads, IMDSv2 through aws-config, the wait helper on real state
//! changes, error rendering, and throttling absorbed by the SDK's retries.
//!
//! One test, one cloud: the SDK is configured from process environment variables, which a
//! second test in this binary would have to share.

use crate::util::localcloud::LocalCloud;
use amibake::aws::wait::{wait_for, Poll, WaitPolicy};
use amibake::aws::AwsError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const DEBIAN_OWNER: &str = "136693071363";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_layer_works_against_the_local_cloud() {
    let _module = crate::util::module_turn(module_path!());
    // Realistic: a volume `creating` for 3 s, long enough to be seen so on a loaded machine
    // (0.3 s, the quick profile's, can pass before the first poll).
    let cloud = LocalCloud::start("realistic");
    let clients = cloud.clients().await;
    assert_eq!(clients.region, "us-east-1");

    // aws-config's IMDS client speaks IMDSv2 only and needs the token TTL header. Its
    // endpoint is this cloud's, named here: the process environment is every story's.
    let endpoint = cloud
        .env
        .iter()
        .find(|(k, _)| k == "AWS_EC2_METADATA_SERVICE_ENDPOINT")
        .map(|(_, v)| v.clone())
        .unwrap();
    let imds = aws_config::imds::Client::builder()
        .endpoint(endpoint)
        .unwrap()
        .build();
    let instance_id = imds
        .get("/latest/meta-data/instance-id")
        .await
        .expect("IMDSv2 answers");
    assert_eq!(instance_id.as_ref(), cloud.build_host());

    // The wait helper on a volume that really is `creating` for a while.
    let volume_id = cloud.vendor_root_volume(&clients).await;
    let started = Instant::now();
    let mut pending_states = Vec::new();
    let ec2 = clients.ec2.clone();
    let state = wait_for(
        "volume",
        &volume_id,
        WaitPolicy::SHORT,
        &CancellationToken::new(),
        |state, _| pending_states.push(state.to_string()),
        || {
            let (ec2, id) = (ec2.clone(), volume_id.clone());
            async move {
                let out = ec2.describe_volumes().volume_ids(&id).send().await?;
                let state = out.volumes()[0]
                    .state()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default();
                Ok::<_, aws_sdk_ec2::error::SdkError<_, _>>(if state == "available" {
                    Poll::Ready(state)
                } else {
                    Poll::Pending {
                        state,
                        percent: None,
                    }
                })
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(state, "available");
    assert!(
        pending_states.iter().any(|s| s == "creating"),
        "{pending_states:?}"
    );
    assert!(
        started.elapsed().as_secs_f64() < 10.0,
        "a 3 s volume is seen ready well before the SDK waiter's first poll at 15 s"
    );

    // An AWS error is rendered as code, message and request id.
    cloud.cli(&[
        "fault",
        "DeleteVolume",
        "--times",
        "1",
        "--error",
        "VolumeInUse",
    ]);
    let err = clients
        .ec2
        .delete_volume()
        .volume_id(&volume_id)
        .send()
        .await
        .unwrap_err();
    let error = AwsError::new(format!("delete volume {volume_id}"), err);
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("delete volume {volume_id} failed: VolumeInUse: injected by the local cloud into DeleteVolume (request id ")),
        "{text}"
    );
    // The SDK's own error is the source, whole, for a caller that needs more than the code;
    // the error as one line still says it once.
    let cause = std::error::Error::source(&error)
        .and_then(|s| s.downcast_ref::<amibake::aws::SdkCause>())
        .expect("the SDK's error as the source");
    let sdk = cause
        .error()
        .downcast_ref::<aws_sdk_ec2::error::SdkError<
            aws_sdk_ec2::operation::delete_volume::DeleteVolumeError,
            aws_sdk_ec2::config::http::HttpResponse,
        >>()
        .expect("an SdkError of DeleteVolume");
    assert_eq!(
        sdk.as_service_error().and_then(|e| e.meta().code()),
        Some("VolumeInUse")
    );
    assert_eq!(amibake::engine::error_chain(&error), text);
    clients
        .ec2
        .delete_volume()
        .volume_id(&volume_id)
        .send()
        .await
        .unwrap();

    // Throttling is the SDK's retry mode's job: three throttled answers in a row,
    // and the call still gets through.
    cloud.cli(&[
        "fault",
        "DescribeImages",
        "--times",
        "3",
        "--error",
        "RequestLimitExceeded",
    ]);
    let before = cloud.calls().len();
    clients
        .ec2
        .describe_images()
        .owners(DEBIAN_OWNER)
        .send()
        .await
        .expect("retried past throttling");
    let codes: Vec<String> = cloud.calls()[before..]
        .iter()
        .map(|c| c["code"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        codes,
        [
            "RequestLimitExceeded",
            "RequestLimitExceeded",
            "RequestLimitExceeded",
            "OK"
        ]
    );
}

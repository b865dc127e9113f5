//! What `bake` learns before it creates anything, against the local cloud: the build host from
//! IMDSv2, and the base AMI from each form of reference a template may use.

use crate::util::localcloud::LocalCloud;
use amibake::aws::ami::{self, AmiError};
use amibake::aws::host;
use amibake::template::{AmiFilter, AmiRef, SsmSelector};
use aws_sdk_ec2::types::{ArchitectureValues, BootModeValues};
use aws_sdk_ssm::types::ParameterType;

const DEBIAN_OWNER: &str = "136693071363";

fn filter(name: &str, most_recent: bool) -> AmiRef {
    AmiRef::Filter(AmiFilter {
        owners: vec![DEBIAN_OWNER.into()],
        name: name.into(),
        most_recent,
        architecture: Some("x86_64".into()),
    })
}

fn ssm(parameter: &str, selector: Option<SsmSelector>) -> AmiRef {
    AmiRef::Ssm {
        parameter: parameter.into(),
        selector,
    }
}

/// One test, one cloud: the SDK reads its endpoint from process environment variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_and_the_base_image_are_found_every_way_a_template_names_them() {
    let _module = crate::util::module_turn(module_path!());
    let cloud = LocalCloud::start("quick");
    let clients = cloud.clients().await;

    let me = host::identity().await.unwrap();
    assert_eq!(me.instance_id, cloud.build_host());
    assert_eq!(
        (me.availability_zone.as_str(), me.region.as_str()),
        ("us-east-1a", "us-east-1")
    );

    // The vendor's public parameter, as launch templates name it.
    let debian = ami::resolve(
        &clients,
        &AmiRef::parse("resolve:ssm:/aws/service/debian/release/12/latest/amd64").unwrap(),
    )
    .await
    .unwrap();
    let flat = ami::resolve(&clients, &filter("debian-12-amd64-unpartitioned-*", false))
        .await
        .unwrap();
    assert_ne!(debian, flat);
    assert_eq!(
        ami::resolve(&clients, &AmiRef::Id(debian.clone()))
            .await
            .unwrap(),
        debian
    );

    // Our own parameter with two versions and a label, as `base` publishes it.
    for value in [&debian, &flat] {
        clients
            .ssm
            .put_parameter()
            .name("/amibake/test/base")
            .value(value)
            .r#type(ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .send()
            .await
            .unwrap();
    }
    clients
        .ssm
        .label_parameter_version()
        .name("/amibake/test/base")
        .parameter_version(1)
        .labels("prod")
        .send()
        .await
        .unwrap();
    assert_eq!(
        ami::resolve(&clients, &ssm("/amibake/test/base", None))
            .await
            .unwrap(),
        flat
    );
    assert_eq!(
        ami::resolve(
            &clients,
            &ssm("/amibake/test/base", Some(SsmSelector::Version(1)))
        )
        .await
        .unwrap(),
        debian
    );
    assert_eq!(
        ami::resolve(
            &clients,
            &ssm(
                "/amibake/test/base",
                Some(SsmSelector::Label("prod".into()))
            )
        )
        .await
        .unwrap(),
        debian
    );

    // Filters: one match, none, several without most_recent.
    assert!(matches!(
        ami::resolve(&clients, &filter("ubuntu-*", true)).await,
        Err(AmiError::NoMatch { .. })
    ));
    let err = ami::resolve(&clients, &filter("debian-12-amd64-*", false))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("2 AMIs match the newest AMI named like \"debian-12-amd64-*\""),
        "{err}"
    );
    assert!(
        err.to_string().contains(&debian) && err.to_string().contains(&flat),
        "{err}"
    );
    // most_recent takes the image registered last: two of ours, a second apart.
    let base = ami::describe(&clients, &debian).await.unwrap();
    let mut registered = Vec::new();
    // The newer sorts first by name, so a pick by name would fail.
    for name in ["newest-test-z-older", "newest-test-a-newer"] {
        let out = clients
            .ec2
            .register_image()
            .name(name)
            .root_device_name("/dev/xvda")
            .architecture(ArchitectureValues::X8664)
            .block_device_mappings(
                aws_sdk_ec2::types::BlockDeviceMapping::builder()
                    .device_name("/dev/xvda")
                    .ebs(
                        aws_sdk_ec2::types::EbsBlockDevice::builder()
                            .snapshot_id(&base.root_snapshot_id)
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .unwrap();
        registered.push(out.image_id().unwrap().to_string());
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    let ours = |most_recent| {
        AmiRef::Filter(AmiFilter {
            owners: vec!["self".into()],
            name: "newest-test-*".into(),
            most_recent,
            architecture: None,
        })
    };
    assert_eq!(
        ami::resolve(&clients, &ours(true)).await.unwrap(),
        registered[1],
        "the newer of the two"
    );
    assert!(ami::resolve(&clients, &ours(false)).await.is_err());
    for id in registered {
        clients
            .ec2
            .deregister_image()
            .image_id(id)
            .send()
            .await
            .unwrap();
    }

    // What a derived image must copy.
    let base = ami::describe(&clients, &debian).await.unwrap();
    assert_eq!(base.root_device_name, "/dev/xvda");
    assert_eq!(base.root_volume_size_gb, 8);
    assert!(base.root_snapshot_id.starts_with("snap-"));
    assert_eq!(base.architecture, ArchitectureValues::X8664);
    assert_eq!(base.boot_mode, Some(BootModeValues::UefiPreferred));
    assert_eq!(base.ena_support, Some(true));
    assert_eq!(base.mappings.len(), 1);

    // Failures name what was asked for.
    let err = ami::describe(&clients, "ami-0123456789abcdef0")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("describe ami-0123456789abcdef0 failed: InvalidAMIID.NotFound"),
        "{err}"
    );
    let err = ami::resolve(&clients, &ssm("/amibake/test/missing", None))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("read SSM parameter /amibake/test/missing failed: ParameterNotFound"),
        "{err}"
    );
}

//! The build-host side of `bake`, against the local cloud's real loop devices and Nitro-style
//! names: finding an attached volume's device and root filesystem, mounting it as a chroot,
//! running provisioners in it, and putting it all back.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::util::localcloud::LocalCloud;
use amibake::aws::{ami, Clients};
use amibake::communicator::chroot::Chroot;
use amibake::engine::{Event, EventSink, Progress};
use amibake::host::device::{
    claim_free_name, root_filesystem, wait_for_device, DeviceError, DEVICE_APPEAR_TIMEOUT,
};
use amibake::host::mount;
use amibake::provision::{self, Entries};
use amibake::template::{AmiFilter, AmiRef};
use amibake::template::{Network, Provisioner, ProvisionerAction};
use tokio_util::sync::CancellationToken;

async fn volume_from(clients: &Clients, name_glob: &str) -> String {
    let filter = AmiRef::Filter(AmiFilter {
        owners: vec!["136693071363".into()],
        name: name_glob.into(),
        most_recent: true,
        architecture: None,
    });
    let image = ami::describe(clients, &ami::resolve(clients, &filter).await.unwrap())
        .await
        .unwrap();
    let id = LocalCloud::volume_of(clients, &image.root_snapshot_id).await;
    wait_state(clients, &id, "available").await;
    id
}

async fn wait_state(clients: &Clients, volume_id: &str, wanted: &'static str) {
    let progress = Progress::new(Arc::new(Collect(Mutex::new(Vec::new()))), "wait");
    amibake::aws::volume::wait(
        clients,
        volume_id,
        wanted,
        &CancellationToken::new(),
        &progress,
    )
    .await
    .unwrap();
}

struct Collect(Mutex<Vec<Event>>);
impl EventSink for Collect {
    fn emit(&self, event: &Event) {
        self.0.lock().unwrap().push(event.clone());
    }
}

fn provisioner(name: &str, action: ProvisionerAction, env: &[(&str, &str)]) -> Provisioner {
    Provisioner {
        name: name.into(),
        action,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        network: Network::None,
        when: amibake::template::When::Always,
        timeout: None,
    }
}

async fn provision_in_chroot(root: &Path) {
    let chroot = Chroot::new(
        env!("CARGO_BIN_EXE_amibake"),
        root,
        crate::util::isolation(),
        None,
        "ab-20261204000000-0a1b2c3d",
    );
    let sink = Arc::new(Collect(Mutex::new(Vec::new())));
    let progress = Progress::new(sink.clone(), "provision");
    let cancel = CancellationToken::new();
    let upload_source = crate::util::repo_root().join("provisioners/files/php-fpm-pool.conf");
    let good = [
        provisioner(
            "inline",
            ProvisionerAction::Inline(vec![
                "echo \"$GREETING\" > /etc/amibake-inline".into(),
                "id -u; echo to-stderr >&2".into(),
            ]),
            &[("GREETING", "hello from the chroot")],
        ),
        provisioner(
            "unit",
            ProvisionerAction::Script(crate::util::repo_root().join("provisioners/worker-unit.sh")),
            &[("APP", "worker")],
        ),
        provisioner(
            "pool",
            ProvisionerAction::Upload {
                source: upload_source.clone(),
                destination: "/etc/php/pool.d/www.conf".into(),
            },
            &[],
        ),
    ];
    provision::run_all(&chroot, Entries::Provisioners, &good, &progress, &cancel)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(root.join("etc/amibake-inline")).unwrap(),
        "hello from the chroot\n"
    );
    assert!(
        std::fs::read_to_string(root.join("etc/systemd/system/worker.service"))
            .unwrap()
            .contains("ExecStart=/opt/worker/bin/worker")
    );
    assert_eq!(
        std::fs::read(root.join("etc/php/pool.d/www.conf")).unwrap(),
        std::fs::read(&upload_source).unwrap()
    );
    assert!(
        !std::fs::read_dir(root.join("tmp"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("amibake-")),
        "scripts removed"
    );
    let outputs: Vec<(String, String)> = sink
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Output { source, line, .. } => Some((source.clone(), line.clone())),
            _ => None,
        })
        .collect();
    assert!(
        outputs.contains(&("inline".into(), "0".into())),
        "runs as root, output streamed: {outputs:?}"
    );
    assert!(
        outputs.contains(&("inline".into(), "to-stderr".into())),
        "stderr streamed too: {outputs:?}"
    );

    let failing = [provisioner(
        "migrate",
        ProvisionerAction::Inline(vec![
            "true".into(),
            "echo half-done; exit 3".into(),
            "touch /etc/never".into(),
        ]),
        &[],
    )];
    let err = provision::run_all(&chroot, Entries::Provisioners, &failing, &progress, &cancel)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "provisioner `migrate`: `echo half-done; exit 3` exited with 3; last output:\nhalf-done"
    );
    assert!(
        !root.join("etc/never").exists(),
        "nothing runs after a failure"
    );

    // A command that hangs is cut at its timeout, with everything it started.
    let hanging = [Provisioner {
        timeout: Some(std::time::Duration::from_secs(1)),
        ..provisioner(
            "warm cache",
            ProvisionerAction::Inline(vec![
                "echo started; (sleep 30; touch /etc/late) & sleep 30".into()
            ]),
            &[],
        )
    }];
    let err = provision::run_all(&chroot, Entries::Tests, &hanging, &progress, &cancel)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("test `warm cache`: `echo started; (sleep 30; touch /etc/late) & sleep 30` was still running after 1s (`timeout_seconds`) and was stopped; last output:\nstarted"),
        "{err}"
    );
    assert!(
        !cancel.is_cancelled(),
        "a timeout is not the run's interrupt"
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "touch /etc/late"])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "the background command was stopped too"
    );
}

struct MountDir(std::path::PathBuf);
impl MountDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

/// One test, one cloud: the SDK reads its endpoint from process environment variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attached_volumes_are_found_mounted_as_a_chroot_provisioned_and_put_back() {
    let _module = crate::util::module_turn(module_path!());
    let cloud = LocalCloud::start("quick");
    let clients = cloud.clients().await;
    let locks = tempfile::tempdir().unwrap();
    let host = cloud.build_host().to_string();

    let partitioned = volume_from(&clients, "debian-12-amd64-2*").await;
    let flat = volume_from(&clients, "debian-12-amd64-unpartitioned-*").await;
    let first = claim_free_name(locks.path(), &HashSet::new()).unwrap();
    let second = claim_free_name(locks.path(), &HashSet::new()).unwrap();
    assert_ne!(
        first.name, second.name,
        "two bakes on one host get different names"
    );

    let mut found = Vec::new();
    for (volume, name) in [(&partitioned, &first.name), (&flat, &second.name)] {
        clients
            .ec2
            .attach_volume()
            .volume_id(volume)
            .instance_id(&host)
            .device(name)
            .send()
            .await
            .unwrap();
        wait_state(&clients, volume, "attached").await;
        let device = wait_for_device(volume, name, DEVICE_APPEAR_TIMEOUT)
            .await
            .unwrap();
        assert_eq!(
            device,
            Path::new(&format!(
                "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{}",
                volume.replace('-', "")
            ))
        );
        found.push(device);
    }

    let root = root_filesystem(&partitioned, &found[0], None).unwrap();
    assert!(
        root.to_string_lossy().ends_with("-part1"),
        "{}",
        root.display()
    );
    assert_eq!(
        root_filesystem(&flat, &found[1], None).unwrap(),
        found[1],
        "unpartitioned: the whole device"
    );
    assert_eq!(
        root_filesystem(&partitioned, &found[0], Some(0)).unwrap(),
        found[0]
    );
    let err = root_filesystem(&partitioned, &found[0], Some(2)).unwrap_err();
    assert!(
        matches!(err, DeviceError::NoPartition { partition: 2, .. }),
        "{err}"
    );

    // The unpartitioned root mounted and prepared as a chroot, then put back as it was.
    // Kept, not a TempDir: a recursive delete after a failed assertion would walk into the
    // mounted image. Removed below once it is unmounted.
    let mnt = MountDir(tempfile::tempdir().unwrap().keep());
    let image_resolv = "# the image's own resolv.conf\nnameserver 169.254.169.253\n";
    mount::mount_root(&found[1], mnt.path()).unwrap();
    assert_eq!(
        std::fs::read_to_string(mnt.path().join("etc/resolv.conf")).unwrap(),
        image_resolv
    );
    let mut files = mount::TemporaryFiles::new(mnt.path());
    mount::put_chroot_files(&mut files).unwrap();
    // The kernel filesystems exist only inside the sandbox, in its own namespaces.
    let inside = std::process::Command::new(env!("CARGO_BIN_EXE_amibake"))
        .args(["internal-sandbox", "--root"])
        .arg(mnt.path())
        .args(["--isolation", &crate::util::isolation().to_arg()])
        .args(["--", "/bin/sh", "-c", "cat /etc/resolv.conf; test -d /proc/self && test -c /dev/null && test -d /sys/class && test -d /dev/pts && /usr/sbin/policy-rc.d; echo policy=$?"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&inside.stdout);
    assert!(
        text.starts_with(&std::fs::read_to_string("/etc/resolv.conf").unwrap()),
        "{text}"
    );
    assert!(
        text.ends_with("policy=101\n"),
        "services are kept from starting: {text}"
    );

    // Provisioners run in the chroot through the same code `base` runs over SSH.
    provision_in_chroot(mnt.path()).await;

    assert!(
        !mount::is_mount_point(&mnt.path().join("proc")),
        "nothing of the sandbox is mounted on the host"
    );

    // A process working in the image holds it: the error names it, and the mount stays.
    let holder = std::process::Command::new("sleep")
        .arg("60")
        .current_dir(mnt.path().join("tmp"))
        .spawn()
        .unwrap();
    let err = mount::unmount(mnt.path(), None, mount::RELEASE_WAIT)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("held by pid {} (sleep)", holder.id())),
        "{err}"
    );
    std::process::Command::new("kill")
        .arg(holder.id().to_string())
        .status()
        .unwrap();
    let mut holder = holder;
    holder.wait().unwrap();

    assert!(files.restore().is_empty());
    assert_eq!(
        std::fs::read_to_string(mnt.path().join("etc/resolv.conf")).unwrap(),
        image_resolv,
        "the image's own file is back"
    );
    assert!(!mnt.path().join("usr/sbin/policy-rc.d").exists());
    mount::unmount(mnt.path(), None, mount::RELEASE_WAIT).unwrap();
    assert!(!mount::is_mount_point(mnt.path()));
    std::fs::remove_dir(mnt.path()).unwrap();

    // A name whose device the host already shows is not handed out again, even unlocked.
    drop(first);
    let third = claim_free_name(tempfile::tempdir().unwrap().path(), &HashSet::new()).unwrap();
    assert!(
        third.name != "/dev/sdf" && third.name != "/dev/sdg",
        "{}",
        third.name
    );

    for volume in [&partitioned, &flat] {
        clients
            .ec2
            .detach_volume()
            .volume_id(volume)
            .instance_id(&host)
            .send()
            .await
            .unwrap();
        wait_state(&clients, volume, "available").await;
        clients
            .ec2
            .delete_volume()
            .volume_id(volume)
            .send()
            .await
            .unwrap();
    }
    let err = wait_for_device(&flat, &second.name, std::time::Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no block device for it appeared within 0s"),
        "{err}"
    );
}

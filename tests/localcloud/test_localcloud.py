"""The local cloud's fidelity, through the real AWS SDK (boto3) and the `localcloud` command."""

import re
import filecmp
import json
import os
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from conftest import leftovers, localcloud, mounted, start, state_dir
from lc.dataplane import loop_backing

DEBIAN_PARAMETER = "/aws/service/debian/release/12/latest/amd64"
PARTITION_1_OFFSET = 2048 * 512
EXT4_MAGIC_OFFSET = 1024 + 0x38


def wait_until(describe, ready, timeout=20.0):
    """Polls `describe()` until `ready(value)`; returns every value seen."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        value = describe()
        seen.append(value)
        if ready(value):
            return seen
        assert time.monotonic() < deadline, f"still not ready: {seen[-1]}"
        time.sleep(0.05)


def running(pid):
    """True while the process exists and is not a zombie waiting for its parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def root_snapshot(image):
    root = [m for m in image["BlockDeviceMappings"] if m["DeviceName"] == image["RootDeviceName"]]
    return root[0]["Ebs"]["SnapshotId"]


def vendor_image(ec2, kind="partitioned"):
    name = "debian-12-amd64-unpartitioned-*" if kind == "flat" else "debian-12-amd64-2*"
    images = ec2.describe_images(Owners=["136693071363"], Filters=[{"Name": "name", "Values": [name]}])["Images"]
    assert len(images) == 1, images
    return images[0]


def new_volume(cloud, ec2, kind="partitioned"):
    snap = root_snapshot(vendor_image(ec2, kind))
    vol = ec2.create_volume(SnapshotId=snap, AvailabilityZone="us-east-1a", VolumeType="gp3")
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol["VolumeId"]])["Volumes"][0]["State"], lambda s: s == "available")
    return vol["VolumeId"]


def attach(cloud, ec2, volume_id, device):
    ec2.attach_volume(VolumeId=volume_id, InstanceId=cloud.info["build_host"], Device=device)
    return wait_until(
        lambda: ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["Attachments"][0]["State"], lambda s: s == "attached"
    )


def detach(ec2, volume_id):
    ec2.detach_volume(VolumeId=volume_id)
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"], lambda s: s == "available")


def test_debian_vendor_ami_is_found_by_its_public_parameter_and_by_filter(cloud):
    ec2, ssm = cloud.client("ec2"), cloud.client("ssm")
    parameter = ssm.get_parameter(Name=DEBIAN_PARAMETER)["Parameter"]
    assert parameter["DataType"] == "aws:ec2:image"
    image = vendor_image(ec2)
    assert parameter["Value"] == image["ImageId"]
    assert image["RootDeviceType"] == "ebs" and image["RootDeviceName"] == "/dev/xvda"
    assert image["Architecture"] == "x86_64" and image["EnaSupport"] is True
    assert image["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 8


def test_vendor_images_hold_a_real_debian_root(cloud):
    ec2 = cloud.client("ec2")
    for kind, offset in (("partitioned", PARTITION_1_OFFSET), ("flat", 0)):
        snap = root_snapshot(vendor_image(ec2, kind))
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "root.img"
            cloud.cli("export-snapshot", snap, str(raw))
            with mounted(raw, offset) as root:
                assert (root / "etc/debian_version").read_text().startswith("12.")
                assert "admin:" in (root / "etc/passwd").read_text()
                assert (root / "usr/sbin/sshd").exists()
                assert "NOPASSWD" in (root / "etc/sudoers.d/90-cloud-init-users").read_text()


def test_register_image_keeps_the_mappings_and_flags_it_was_given(cloud):
    ec2 = cloud.client("ec2")
    snap = root_snapshot(vendor_image(ec2))
    image_id = ec2.register_image(
        Name="fidelity-register-1", Architecture="arm64", RootDeviceName="/dev/xvda", VirtualizationType="hvm", EnaSupport=True,
        BootMode="uefi", SriovNetSupport="simple",
        BlockDeviceMappings=[
            {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap, "VolumeSize": 20, "VolumeType": "gp3", "DeleteOnTermination": True}},
            {"DeviceName": "/dev/xvdb", "VirtualName": "ephemeral0"},
        ],
    )["ImageId"]
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    assert image["BlockDeviceMappings"] == [
        {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap, "VolumeSize": 20, "VolumeType": "gp3", "DeleteOnTermination": True, "Encrypted": False}},
        {"DeviceName": "/dev/xvdb", "VirtualName": "ephemeral0"},
    ]
    assert (image["Architecture"], image["RootDeviceType"], image["RootDeviceName"]) == ("arm64", "ebs", "/dev/xvda")
    assert (image["BootMode"], image["EnaSupport"], image["SriovNetSupport"]) == ("uefi", True, "simple")
    # moto makes a snapshot of its own for every image; EC2 does not.
    assert not [s for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"] if image_id in s.get("Description", "")]
    with pytest.raises(ClientError) as err:
        ec2.delete_snapshot(SnapshotId=snap)
    assert err.value.response["Error"]["Code"] == "InvalidSnapshot.InUse"
    ec2.deregister_image(ImageId=image_id)


def test_register_image_refuses_a_root_without_a_mapping(cloud):
    ec2 = cloud.client("ec2")
    snap = root_snapshot(vendor_image(ec2))
    with pytest.raises(ClientError) as err:
        ec2.register_image(Name="fidelity-register-2", RootDeviceName="/dev/sda1",
                           BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap}}])
    assert err.value.response["Error"]["Code"] == "InvalidBlockDeviceMapping"


def test_volume_states_take_time_and_attach_makes_nitro_device_names(cloud):
    ec2 = cloud.client("ec2")
    snap = root_snapshot(vendor_image(ec2))
    volume_id = ec2.create_volume(SnapshotId=snap, AvailabilityZone="us-east-1a")["VolumeId"]
    states = wait_until(lambda: ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"], lambda s: s == "available")
    assert states[0] == "creating"
    attach_states = attach(cloud, ec2, volume_id, "/dev/sdv")
    assert attach_states[0] == "attaching"

    serial = volume_id.replace("-", "")
    by_id = Path(f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{serial}")
    whole = os.path.realpath(by_id)
    assert os.path.realpath("/dev/sdv") == whole == os.path.realpath("/dev/xvdv")
    part = os.path.realpath(f"{by_id}-part1")
    assert os.path.realpath("/dev/sdv1") == part == os.path.realpath("/dev/xvdv1") != whole
    with open(part, "rb") as dev:
        dev.seek(EXT4_MAGIC_OFFSET)
        assert struct.unpack("<H", dev.read(2))[0] == 0xEF53, "partition 1 holds the ext4 root"

    ec2.detach_volume(VolumeId=volume_id)  # no InstanceId, as EC2 allows
    detaching = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    assert detaching["State"] == "in-use" and detaching["Attachments"][0]["State"] == "detaching"
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"], lambda s: s == "available")
    assert not by_id.exists() and not Path("/dev/sdv").exists() and not Path("/dev/xvdv1").exists()
    # Gone from this volume: another cloud beside this one may already have set the number up again.
    assert str(cloud.state) not in (loop_backing(whole) or ""), "the loop device is gone"
    ec2.delete_volume(VolumeId=volume_id)


def test_a_cloud_going_down_leaves_the_devices_of_a_cloud_beside_it(cloud):
    """`down` removes its own /dev/disk/by-id links and dangling ones, never another live
    cloud's (stories run side by side)."""
    from conftest import leftovers, start, state_dir

    ec2 = cloud.client("ec2")
    volume_id = ec2.create_volume(SnapshotId=root_snapshot(vendor_image(ec2)), AvailabilityZone="us-east-1a")["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"], lambda s: s == "available")
    attach(cloud, ec2, volume_id, "/dev/sdw")
    by_id = Path(f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{volume_id.replace('-', '')}")
    assert by_id.exists()
    with state_dir("amibake-localcloud-beside-") as state:
        beside = start(state)
        beside.cli("down")
        assert leftovers(state) == []
    assert by_id.exists() and Path(f"{by_id}-part1").exists(), "the other cloud's links are left to it"
    ec2.detach_volume(VolumeId=volume_id)
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"], lambda s: s == "available")
    ec2.delete_volume(VolumeId=volume_id)


def test_attach_is_refused_while_creating_and_device_names_are_not_shared(cloud):
    ec2 = cloud.client("ec2", retries=False)
    snap = root_snapshot(vendor_image(ec2))
    volume_id = ec2.create_volume(SnapshotId=snap, AvailabilityZone="us-east-1a")["VolumeId"]
    with pytest.raises(ClientError) as err:
        ec2.attach_volume(VolumeId=volume_id, InstanceId=cloud.info["build_host"], Device="/dev/sdw")
    assert err.value.response["Error"]["Code"] == "IncorrectState"
    other = new_volume(cloud, ec2)
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"], lambda s: s == "available")
    attach(cloud, ec2, volume_id, "/dev/sdw")
    with pytest.raises(ClientError) as err:
        ec2.attach_volume(VolumeId=other, InstanceId=cloud.info["build_host"], Device="/dev/sdw")
    assert err.value.response["Error"]["Code"] == "InvalidParameterValue"
    detach(ec2, volume_id)
    for v in (volume_id, other):
        ec2.delete_volume(VolumeId=v)


def test_a_snapshot_holds_what_was_written_through_the_device_and_its_progress_moves(cloud):
    ec2 = cloud.client("ec2")
    volume_id = new_volume(cloud, ec2, "flat")
    attach(cloud, ec2, volume_id, "/dev/sdx")
    with tempfile.TemporaryDirectory() as mnt:
        subprocess.run(["mount", "/dev/sdx", mnt], check=True)
        try:
            Path(mnt, "etc/written-through-the-device").write_bytes(os.urandom(30_000_000))
            Path(mnt, "etc/marker").write_text("baked\n")
        finally:
            subprocess.run(["umount", mnt], check=True)
    detach(ec2, volume_id)
    snapshot_id = ec2.create_snapshot(VolumeId=volume_id)["SnapshotId"]
    seen = wait_until(lambda: ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0], lambda s: s["State"] == "completed")
    progress = [int(s["Progress"].rstrip("%")) for s in seen]
    assert progress[0] < 100 and progress[-1] == 100 and progress == sorted(progress)
    assert len(set(progress)) >= 3, f"progress moves: {progress}"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "snap.img"
        cloud.cli("export-snapshot", snapshot_id, str(raw))
        with mounted(raw) as root:
            assert (root / "etc/marker").read_text() == "baked\n"
            assert (root / "etc/debian_version").exists()
    ec2.delete_volume(VolumeId=volume_id)
    ec2.delete_snapshot(SnapshotId=snapshot_id)


def test_a_fault_fails_exactly_n_calls_with_the_code_given(cloud):
    ec2 = cloud.client("ec2", retries=False)
    cloud.cli("fault", "DescribeVolumes", "--times", "2", "--error", "InsufficientVolumeCapacity")
    before = len(cloud.calls())
    codes = []
    for _ in range(4):
        try:
            ec2.describe_volumes()
            codes.append("OK")
        except ClientError as e:
            codes.append(e.response["Error"]["Code"])
    assert codes == ["InsufficientVolumeCapacity", "InsufficientVolumeCapacity", "OK", "OK"]
    logged = [(c["action"], c["code"]) for c in cloud.calls()[before:]]
    assert logged == [("DescribeVolumes", "InsufficientVolumeCapacity")] * 2 + [("DescribeVolumes", "OK")] * 2


def test_a_fault_can_let_calls_pass_first(cloud):
    ec2 = cloud.client("ec2", retries=False)
    cloud.cli("fault", "DescribeSnapshots", "--after", "2", "--error", "UnauthorizedOperation")
    codes = []
    for _ in range(4):
        try:
            ec2.describe_snapshots()
            codes.append("OK")
        except ClientError as e:
            codes.append(e.response["Error"]["Code"])
    assert codes == ["OK", "OK", "UnauthorizedOperation", "OK"]


def test_ssm_faults_use_ssm_error_shapes(cloud):
    ssm = cloud.client("ssm", retries=False)
    cloud.cli("fault", "GetParameter", "--error", "ParameterNotFound")
    with pytest.raises(ClientError) as err:
        ssm.get_parameter(Name=DEBIAN_PARAMETER)
    assert err.value.response["Error"]["Code"] == "ParameterNotFound"
    assert ssm.get_parameter(Name=DEBIAN_PARAMETER)["Parameter"]["Value"].startswith("ami-")


def test_throttling_answers_request_limit_exceeded(cloud):
    ec2 = cloud.client("ec2", retries=False)
    cloud.cli("fault", "--throttle", "100")
    try:
        with pytest.raises(ClientError) as err:
            ec2.describe_images(Owners=["self"])
        assert err.value.response["Error"]["Code"] == "RequestLimitExceeded"
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    finally:
        cloud.cli("fault", "--throttle", "0")
    ec2.describe_images(Owners=["self"])


def test_throttling_can_be_of_some_actions_only(cloud):
    ec2 = cloud.client("ec2", retries=False)
    cloud.cli("fault", "--throttle", "100", "--throttle-only", "DescribeSnapshots")
    try:
        ec2.describe_images(Owners=["self"])
        with pytest.raises(ClientError) as err:
            ec2.describe_snapshots(OwnerIds=["self"])
        assert err.value.response["Error"]["Code"] == "RequestLimitExceeded"
    finally:
        cloud.cli("fault", "--throttle", "0")
    ec2.describe_snapshots(OwnerIds=["self"])


def test_the_call_log_names_actions_ids_and_results(cloud):
    ec2 = cloud.client("ec2", retries=False)
    before = len(cloud.calls())
    with pytest.raises(ClientError):
        ec2.delete_volume(VolumeId="vol-00000000000000000")
    calls = cloud.calls()[before:]
    assert calls == [{**calls[0], "service": "ec2", "action": "DeleteVolume", "ids": {"VolumeId": "vol-00000000000000000"},
                      "status": 400, "code": "InvalidVolume.NotFound"}]


def test_launch_templates_and_their_versions_come_a_page_at_a_time(cloud):
    ec2 = cloud.client("ec2")
    image = cloud.info["vendor_amis"]["partitioned"]
    ids = []
    for n in range(3):
        made = ec2.create_launch_template(LaunchTemplateName=f"paged-{n}", LaunchTemplateData={"ImageId": image})
        ids.append(made["LaunchTemplate"]["LaunchTemplateId"])
    for _ in range(4):
        ec2.create_launch_template_version(LaunchTemplateId=ids[0], LaunchTemplateData={"ImageId": image})

    def every(call, key, **kwargs):
        pages, token = [], None
        while True:
            page = call(**kwargs, **({"NextToken": token} if token else {}))
            pages.append(page[key])
            token = page.get("NextToken")
            if not token:
                return pages

    templates = every(ec2.describe_launch_templates, "LaunchTemplates", MaxResults=2)
    assert [len(p) for p in templates] == [2, 1]
    assert {t["LaunchTemplateId"] for p in templates for t in p} >= set(ids)
    versions = every(ec2.describe_launch_template_versions, "LaunchTemplateVersions", LaunchTemplateId=ids[0], MaxResults=2)
    assert [len(p) for p in versions] == [2, 2, 1]
    assert sorted(v["VersionNumber"] for p in versions for v in p) == [1, 2, 3, 4, 5]
    with pytest.raises(ClientError) as err:
        ec2.describe_launch_templates(MaxResults=201)
    assert err.value.response["Error"]["Code"] == "InvalidParameterValue"


def test_imds_v2_describes_the_build_host(cloud):
    imds = cloud.env["AWS_EC2_METADATA_SERVICE_ENDPOINT"]
    ec2 = cloud.client("ec2")
    token_req = urllib.request.Request(f"{imds}/latest/api/token", method="PUT", headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    with urllib.request.urlopen(token_req) as resp:
        token = resp.read().decode()
        assert resp.headers["X-Aws-Ec2-Metadata-Token-Ttl-Seconds"] == "60"

    def get(base, path, tok=token):
        req = urllib.request.Request(f"{base}{path}", headers={"X-aws-ec2-metadata-token": tok} if tok else {})
        with urllib.request.urlopen(req) as resp:
            return resp.read().decode()

    instance_id = get(imds, "/latest/meta-data/instance-id")
    assert instance_id == cloud.info["build_host"]
    assert ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["Placement"]["AvailabilityZone"] == "us-east-1a"
    assert get(imds, "/latest/meta-data/placement/availability-zone") == "us-east-1a"
    assert json.loads(get(imds, "/latest/dynamic/instance-identity/document"))["region"] == "us-east-1"
    # Some clients send metadata requests to the EC2 endpoint itself.
    assert get(cloud.env["AWS_ENDPOINT_URL"], "/latest/meta-data/instance-id") == instance_id
    with pytest.raises(urllib.error.HTTPError) as err:
        get(imds, "/latest/meta-data/instance-id", tok="forged")
    assert err.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(f"{imds}/latest/api/token", method="PUT"))
    assert err.value.code == 400


def test_down_removes_every_loop_device_link_mount_and_process(tmp_path):
    with state_dir("amibake-localcloud-down-") as state:
        cloud = start(state, latency="none")
        try:
            ec2 = cloud.client("ec2")
            for device in ("/dev/sdy", "/dev/sdz"):
                attach(cloud, ec2, new_volume(cloud, ec2, "partitioned"), device)
            assert len(cloud.ls()["attachments"]) == 2
            instance_id, _ = launch(cloud, tmp_path, "fidelity-down")
            ip = instance_state(ec2, instance_id)["PrivateIpAddress"]
            sshd = f"ListenAddress={ip}:22"
            assert subprocess.run(["pgrep", "-f", sshd], capture_output=True).returncode == 0, "the instance runs"
            assert leftovers(state), "the attachments and the instance are visible to the leftover check"
            pid = int((state / "server.pid").read_text())
        finally:
            localcloud(state, "down")
        assert leftovers(state) == []
        assert not running(pid), "the server process has ended"
        assert subprocess.run(["pgrep", "-f", sshd], capture_output=True).returncode == 1, "the instance's sshd has ended"
        assert not (state / "volumes").exists() and not (state / "snapshots").exists()


# -- instances ----------------------------------------------------------------------------------


def ssh(key: Path, ip: str, command: str, check=True):
    result = subprocess.run(
        ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
         "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", f"admin@{ip}", command],
        capture_output=True, text=True, timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def instance_state(ec2, instance_id):
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def launch(cloud, tmp_path, name, **kwargs):
    ec2, ssm = cloud.client("ec2"), cloud.client("ssm")
    key = tmp_path / name
    key.write_text(ec2.create_key_pair(KeyName=name, KeyType="ed25519")["KeyMaterial"])
    key.chmod(0o600)
    image_id = ssm.get_parameter(Name=DEBIAN_PARAMETER)["Parameter"]["Value"]
    instance_id = ec2.run_instances(ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.small", KeyName=name, **kwargs)["Instances"][0]["InstanceId"]
    states = wait_until(lambda: instance_state(ec2, instance_id)["State"]["Name"], lambda s: s == "running")
    assert states[0] == "pending"
    return instance_id, key


def is_private_loopback(ip):
    """The cloud's subnet: 127.K.1.0/24, K its own loopback network."""
    return re.fullmatch(r"127\.\d+\.1\.\d+", ip) is not None


def public_of(private):
    a, k, _, n = private.split(".")
    return f"{a}.{k}.2.{n}"


def test_an_instance_boots_its_image_and_an_image_of_it_holds_what_ssh_wrote(cloud, tmp_path):
    ec2 = cloud.client("ec2")
    subnet = next(n["SubnetId"] for n in ec2.describe_subnets()["Subnets"] if re.fullmatch(r"127\.\d+\.1\.0/24", n["CidrBlock"]))
    instance_id, key = launch(cloud, tmp_path, "fidelity-image", NetworkInterfaces=[
        {"DeviceIndex": 0, "SubnetId": subnet, "AssociatePublicIpAddress": True}])
    instance = instance_state(ec2, instance_id)
    ip = instance["PrivateIpAddress"]
    assert is_private_loopback(ip) and instance["PublicIpAddress"] == public_of(ip)
    assert instance["RootDeviceName"] == "/dev/xvda"
    root_volume = instance["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    assert ec2.describe_volumes(VolumeIds=[root_volume])["Volumes"][0]["Size"] == 8

    out = ssh(key, ip, "hostname; sudo sh -c 'echo written over ssh > /etc/written-over-ssh'; cat /etc/debian_version").stdout
    assert out.splitlines()[0] == "ip-" + ip.replace(".", "-")
    assert out.splitlines()[1].startswith("12.")

    ec2.stop_instances(InstanceIds=[instance_id])
    states = wait_until(lambda: instance_state(ec2, instance_id)["State"]["Name"], lambda s: s == "stopped")
    assert states[0] == "stopping"
    image_id = ec2.create_image(InstanceId=instance_id, Name="fidelity-from-instance")["ImageId"]
    images = wait_until(lambda: ec2.describe_images(ImageIds=[image_id])["Images"][0], lambda i: i["State"] == "available")
    assert images[0]["State"] == "pending"
    image = images[-1]
    assert image["RootDeviceName"] == "/dev/xvda" and image["RootDeviceType"] == "ebs" and image["EnaSupport"] is True
    snapshot_id = root_snapshot(image)
    assert ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["VolumeId"] == root_volume
    raw = tmp_path / "image.img"
    cloud.cli("export-snapshot", snapshot_id, str(raw))
    with mounted(raw, PARTITION_1_OFFSET) as root:
        assert (root / "etc/written-over-ssh").read_text() == "written over ssh\n"
        assert (root / "etc/debian_version").exists()

    ec2.terminate_instances(InstanceIds=[instance_id])
    with pytest.raises(ClientError):
        ec2.describe_volumes(VolumeIds=[root_volume])  # DeleteOnTermination from the AMI


def test_an_interface_without_a_subnet_still_lands_on_loopback(cloud, tmp_path):
    ec2 = cloud.client("ec2")
    instance_id, key = launch(cloud, tmp_path, "nic-no-subnet", NetworkInterfaces=[
        {"DeviceIndex": 0, "AssociatePublicIpAddress": False}])
    instance = instance_state(ec2, instance_id)
    assert is_private_loopback(instance["PrivateIpAddress"]) and "PublicIpAddress" not in instance
    assert ssh(key, instance["PrivateIpAddress"], "true").returncode == 0
    ec2.terminate_instances(InstanceIds=[instance_id])


def test_an_instance_in_the_default_subnet_gets_a_public_address_it_answers_on(cloud, tmp_path):
    # As in EC2's default subnet, which maps a public IPv4 address on launch: Packer's
    # amazon-ebs with ssh_interface = public_ip and no subnet relies on it.
    ec2 = cloud.client("ec2")
    instance_id, key = launch(cloud, tmp_path, "default-subnet")
    instance = instance_state(ec2, instance_id)
    private, public = instance["PrivateIpAddress"], instance["PublicIpAddress"]
    assert is_private_loopback(private) and public == public_of(private)
    assert ssh(key, public, "hostname").stdout.strip() == ssh(key, private, "hostname").stdout.strip()
    ec2.terminate_instances(InstanceIds=[instance_id])


def test_stop_ends_every_process_of_the_instance_and_start_brings_it_back(cloud, tmp_path):
    ec2 = cloud.client("ec2")
    instance_id, key = launch(cloud, tmp_path, "fidelity-stop")
    ip = instance_state(ec2, instance_id)["PrivateIpAddress"]
    marker = f"sleep 4242{ip.rsplit('.', 1)[1]}"
    ssh(key, ip, f"nohup {marker} >/dev/null 2>&1 &")
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0, "the daemon runs on the host"
    ec2.stop_instances(InstanceIds=[instance_id])
    wait_until(lambda: instance_state(ec2, instance_id)["State"]["Name"], lambda s: s == "stopped")
    assert subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 1, "stop ended the instance's processes"
    assert ssh(key, ip, "true", check=False).returncode != 0
    assert not [line for line in open("/proc/mounts") if f"instances/{instance_id}/" in line]

    ec2.start_instances(InstanceIds=[instance_id])
    wait_until(lambda: instance_state(ec2, instance_id)["State"]["Name"], lambda s: s == "running")
    assert ssh(key, ip, "cat /etc/hostname").stdout.strip() == "ip-" + ip.replace(".", "-")
    ec2.terminate_instances(InstanceIds=[instance_id])


def test_terminate_keeps_a_root_volume_marked_to_survive(cloud, tmp_path):
    ec2 = cloud.client("ec2")
    instance_id, _ = launch(cloud, tmp_path, "fidelity-keep", BlockDeviceMappings=[
        {"DeviceName": "/dev/xvda", "Ebs": {"VolumeSize": 10, "DeleteOnTermination": False}}])
    volume = instance_state(ec2, instance_id)["BlockDeviceMappings"][0]["Ebs"]["VolumeId"]
    assert ec2.describe_volumes(VolumeIds=[volume])["Volumes"][0]["Size"] == 10, "the root was resized"
    ec2.terminate_instances(InstanceIds=[instance_id])
    survivor = ec2.describe_volumes(VolumeIds=[volume])["Volumes"][0]
    assert survivor["State"] == "available" and survivor["SnapshotId"] == root_snapshot(vendor_image(ec2))
    ec2.delete_volume(VolumeId=volume)


def test_eventual_consistency_hides_new_resources_for_a_while(cloud):
    ec2 = cloud.client("ec2", retries=False)
    snap = root_snapshot(vendor_image(ec2))
    cloud.cli("consistency", "1.0")
    try:
        volume_id = ec2.create_volume(SnapshotId=snap, AvailabilityZone="us-east-1a")["VolumeId"]
        with pytest.raises(ClientError) as err:
            ec2.describe_volumes(VolumeIds=[volume_id])
        assert err.value.response["Error"]["Code"] == "InvalidVolume.NotFound"
        assert volume_id in err.value.response["Error"]["Message"]
        seen = wait_until(lambda: visible(ec2, volume_id), lambda v: v, timeout=5)
        assert len(seen) > 1
    finally:
        cloud.cli("consistency", "0")
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"], lambda s: s == "available")
    ec2.delete_volume(VolumeId=volume_id)


def visible(ec2, volume_id):
    try:
        ec2.describe_volumes(VolumeIds=[volume_id])
        return True
    except ClientError as e:
        assert e.response["Error"]["Code"] == "InvalidVolume.NotFound"
        return False


def test_a_new_resource_is_not_found_to_its_remover_too_until_visible(cloud):
    ec2 = cloud.client("ec2", retries=False)
    snap = root_snapshot(vendor_image(ec2))
    cloud.cli("consistency", "1.0")
    try:
        volume_id = ec2.create_volume(SnapshotId=snap, AvailabilityZone="us-east-1a")["VolumeId"]
        with pytest.raises(ClientError) as err:
            ec2.delete_volume(VolumeId=volume_id)
        assert err.value.response["Error"]["Code"] == "InvalidVolume.NotFound"
    finally:
        cloud.cli("consistency", "0")
    wait_until(lambda: visible(ec2, volume_id), lambda v: v, timeout=5)
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]["State"], lambda s: s == "available")
    ec2.delete_volume(VolumeId=volume_id)


def test_a_lost_answer_is_carried_out_and_a_client_token_makes_the_retry_safe(cloud):
    ec2 = cloud.client("ec2")  # retries, as every SDK does on a 500
    snap = root_snapshot(vendor_image(ec2))
    existing = lambda: {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    before = existing()
    cloud.cli("fault", "CreateVolume", "--lose-answer")
    answered = ec2.create_volume(SnapshotId=snap, AvailabilityZone="us-east-1a", ClientToken="tok-1")["VolumeId"]
    assert existing() - before == {answered}, "the retry got the volume the lost answer made, not a second"
    assert [c["code"] for c in cloud.calls() if c["action"] == "CreateVolume"][-2:] == ["OK (answer lost)", "OK (same ClientToken)"]
    # A create that takes no token (the SDK fills CreateVolume's itself): the retry makes a
    # second snapshot, and the first is nobody's.
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[answered])["Volumes"][0]["State"], lambda s: s == "available")
    snapshots = lambda: {s["SnapshotId"] for s in ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"]}
    before_snapshots = snapshots()
    cloud.cli("fault", "CreateSnapshot", "--lose-answer")
    made = ec2.create_snapshot(VolumeId=answered)["SnapshotId"]
    orphans = snapshots() - before_snapshots - {made}
    assert len(orphans) == 1, orphans
    for snapshot_id in [made, *orphans]:
        wait_until(lambda: ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["State"], lambda s: s == "completed")
        ec2.delete_snapshot(SnapshotId=snapshot_id)
    ec2.delete_volume(VolumeId=answered)


def test_a_delayed_call_is_held_then_carried_out(cloud):
    ec2 = cloud.client("ec2", retries=False)
    cloud.cli("fault", "DescribeKeyPairs", "--delay", "0.5")
    started = time.monotonic()
    ec2.describe_key_pairs()
    assert time.monotonic() - started >= 0.5
    started = time.monotonic()
    ec2.describe_key_pairs()
    assert time.monotonic() - started < 0.5, "only the times asked for"


def test_register_image_takes_tags_in_the_call(cloud):
    ec2 = cloud.client("ec2", retries=False)
    snap = root_snapshot(vendor_image(ec2))
    image_id = ec2.register_image(
        Name="tagged-on-create", RootDeviceName="/dev/xvda", Architecture="x86_64",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap}}],
        TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "amibake:build-id", "Value": "ab-1"}]}],
    )["ImageId"]
    tags = ec2.describe_images(ImageIds=[image_id])["Images"][0]["Tags"]
    assert {"Key": "amibake:build-id", "Value": "ab-1"} in tags
    ec2.deregister_image(ImageId=image_id)


def test_ami_names_are_unique_in_the_account(cloud):
    ec2 = cloud.client("ec2", retries=False)
    snap = root_snapshot(vendor_image(ec2))
    register = lambda: ec2.register_image(
        Name="unique-name", RootDeviceName="/dev/xvda", Architecture="x86_64",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap}}],
    )["ImageId"]
    image_id = register()
    with pytest.raises(ClientError) as err:
        register()
    assert err.value.response["Error"]["Code"] == "InvalidAMIName.Duplicate"
    assert image_id in err.value.response["Error"]["Message"]
    ec2.deregister_image(ImageId=image_id)
    ec2.deregister_image(ImageId=register())


def test_a_volume_from_a_snapshot_whose_data_is_missing_is_refused_not_made_empty(cloud):
    ec2 = cloud.client("ec2", retries=False)
    volume_id = new_volume(cloud, ec2, "flat")
    snapshot_id = ec2.create_snapshot(VolumeId=volume_id)["SnapshotId"]
    wait_until(lambda: ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["State"], lambda s: s == "completed")
    (cloud.state / "snapshots" / f"{snapshot_id}.img").unlink()
    before = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}
    with pytest.raises(ClientError):
        ec2.create_volume(SnapshotId=snapshot_id, AvailabilityZone="us-east-1a")
    assert {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]} == before, "no volume record either"
    ec2.delete_snapshot(SnapshotId=snapshot_id)
    ec2.delete_volume(VolumeId=volume_id)


def console_host_keys(ec2, instance_id):
    """The public keys the instance printed between cloud-init's markers (botocore decodes
    the base64 Output itself)."""
    output = ec2.get_console_output(InstanceId=instance_id, Latest=True)["Output"]
    block = output.split("-----BEGIN SSH HOST KEY KEYS-----\n")[1].split("-----END SSH HOST KEY KEYS-----")[0]
    fingerprints = output.split("-----BEGIN SSH HOST KEY FINGERPRINTS-----\n")[1].split("-----END")[0]
    return {" ".join(line.split()[:2]) for line in block.splitlines()}, fingerprints


def offered_host_keys(ip):
    scan = subprocess.run(["ssh-keyscan", "-T", "5", ip], capture_output=True, text=True, check=True).stdout
    return {" ".join(line.split()[1:3]) for line in scan.splitlines() if line and not line.startswith("#")}


def test_the_console_prints_the_host_keys_sshd_offers_unless_an_impostor_answers(cloud, tmp_path):
    ec2 = cloud.client("ec2")
    instance_id, key = launch(cloud, tmp_path, "console-keys")
    ip = instance_state(ec2, instance_id)["PrivateIpAddress"]
    printed, fingerprints = console_host_keys(ec2, instance_id)
    assert printed and printed == offered_host_keys(ip)
    assert fingerprints.count("SHA256:") == len(printed)
    # sshd logs to the console too: a login shows there.
    assert "Accepted publickey" not in ec2.get_console_output(InstanceId=instance_id)["Output"]
    ssh(key, ip, "true")
    assert "Accepted publickey for admin" in ec2.get_console_output(InstanceId=instance_id)["Output"]

    cloud.cli("impostor")
    other_id, _ = launch(cloud, tmp_path, "console-impostor")
    other_ip = instance_state(ec2, other_id)["PrivateIpAddress"]
    printed, _ = console_host_keys(ec2, other_id)
    assert printed and not printed & offered_host_keys(other_ip)
    ec2.terminate_instances(InstanceIds=[instance_id, other_id])


def test_a_volume_with_a_kms_key_ebs_cannot_use_is_made_then_gone(cloud):
    ec2, kms = cloud.client("ec2"), cloud.client("kms")
    snap = root_snapshot(vendor_image(ec2))
    created = kms.create_key(Description="fidelity")["KeyMetadata"]
    assert created["KeyUsage"] == "ENCRYPT_DECRYPT" and created["KeySpec"] == "SYMMETRIC_DEFAULT"
    key = created["Arn"]
    vol = ec2.create_volume(SnapshotId=snap, AvailabilityZone="us-east-1a", Encrypted=True, KmsKeyId=key)
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol["VolumeId"]])["Volumes"][0]["State"], lambda s: s == "available")
    assert ec2.describe_volumes(VolumeIds=[vol["VolumeId"]])["Volumes"][0]["KmsKeyId"] == key
    snapshot = ec2.create_snapshot(VolumeId=vol["VolumeId"])
    assert snapshot["Encrypted"] is True and snapshot["KmsKeyId"] == key
    wait_until(lambda: ec2.describe_snapshots(SnapshotIds=[snapshot["SnapshotId"]])["Snapshots"][0]["State"], lambda s: s == "completed")
    ec2.delete_snapshot(SnapshotId=snapshot["SnapshotId"])
    ec2.delete_volume(VolumeId=vol["VolumeId"])

    made_up = "arn:aws:kms:us-east-1:123456789012:key/0b9e4c59-2d3b-4e1a-9f5d-6c1f8e2a7b40"
    disabled = kms.create_key(Description="disabled")["KeyMetadata"]["KeyId"]
    kms.disable_key(KeyId=disabled)
    for bad in (made_up, disabled):
        vol = ec2.create_volume(SnapshotId=snap, AvailabilityZone="us-east-1a", Encrypted=True, KmsKeyId=bad)
        assert vol["State"] == "creating"

        def state():
            try:
                return ec2.describe_volumes(VolumeIds=[vol["VolumeId"]])["Volumes"][0]["State"]
            except ClientError as e:
                return e.response["Error"]["Code"]
        seen = wait_until(state, lambda s: s == "InvalidVolume.NotFound")
        assert "available" not in seen, seen
    assert not [v for v in cloud.ls()["volumes"] if v["id"] == vol["VolumeId"]]


def test_an_image_parameter_keeps_only_versions_naming_an_available_image(cloud):
    ssm = cloud.client("ssm", retries=False)
    image_id = ssm.get_parameter(Name=DEBIAN_PARAMETER)["Parameter"]["Value"]
    put = lambda value: ssm.put_parameter(
        Name="/lc/channel", Value=value, Type="String", DataType="aws:ec2:image", Overwrite=True)["Version"]
    assert put(image_id) == 1
    # Parameter Store answers the put of an unknown AMI, then drops the version.
    assert put("ami-0000000000000dead") == 2
    assert ssm.get_parameter(Name="/lc/channel")["Parameter"]["Value"] == image_id
    with pytest.raises(ClientError) as err:
        ssm.get_parameter(Name="/lc/channel:2")
    assert err.value.response["Error"]["Code"] == "ParameterVersionNotFound"
    # A first version that fails validation leaves no parameter at all.
    ssm.put_parameter(Name="/lc/never", Value="ami-0000000000000dead", Type="String",
                      DataType="aws:ec2:image")
    with pytest.raises(ClientError) as err:
        ssm.get_parameter(Name="/lc/never")
    assert err.value.response["Error"]["Code"] == "ParameterNotFound"
    # Text parameters are kept as written.
    ssm.put_parameter(Name="/lc/text", Value="ami-0000000000000dead", Type="String")
    assert ssm.get_parameter(Name="/lc/text")["Parameter"]["Value"] == "ami-0000000000000dead"
    ssm.delete_parameter(Name="/lc/channel")
    ssm.delete_parameter(Name="/lc/text")


def test_image_lifecycle_and_references_as_ec2_answers_them(cloud):
    ec2, ssm = cloud.client("ec2", retries=False), cloud.client("ssm", retries=False)
    snap = root_snapshot(vendor_image(ec2))
    register = lambda name: ec2.register_image(
        Name=name, RootDeviceName="/dev/xvda", Architecture="x86_64",
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap}}])["ImageId"]
    kept, referenced, plain = register("lc-kept"), register("lc-referenced"), register("lc-plain")
    wait_until(lambda: [i["State"] for i in ec2.describe_images(ImageIds=[kept, referenced, plain])["Images"]],
               lambda states: states == ["available"] * 3)
    # A disabled image is left out unless asked for, and comes back when enabled.
    ec2.disable_image(ImageId=plain)
    assert plain not in [i["ImageId"] for i in ec2.describe_images(Owners=["self"])["Images"]]
    shown = ec2.describe_images(ImageIds=[plain], IncludeDisabled=True)["Images"][0]
    assert shown["State"] == "disabled"
    ec2.enable_image(ImageId=plain)
    assert ec2.describe_images(ImageIds=[plain])["Images"][0]["State"] == "available"
    # Deprecation is a time on the image.
    ec2.enable_image_deprecation(ImageId=plain, DeprecateAt="2030-01-01T00:00:00Z")
    assert ec2.describe_images(ImageIds=[plain])["Images"][0]["DeprecationTime"].startswith("2030-01-01T00:00:00")
    # References: a launch template's version, an image parameter's current value.
    ec2.create_launch_template(LaunchTemplateName="lc-web", LaunchTemplateData={"ImageId": referenced})
    ssm.put_parameter(Name="/lc/deploy", Value=kept, Type="String", DataType="aws:ec2:image")
    refs = ec2.describe_image_references(ImageIds=[kept, referenced, plain], IncludeAllResourceTypes=True)["ImageReferences"]
    assert sorted((r["ImageId"], r["ResourceType"]) for r in refs) == sorted(
        [(kept, "ssm:Parameter"), (referenced, "ec2:LaunchTemplate")])
    assert any(r["Arn"].endswith(":parameter/lc/deploy") for r in refs)
    only_instances = ec2.describe_image_references(
        ImageIds=[kept], ResourceTypes=[{"ResourceType": "ec2:Instance"}])["ImageReferences"]
    assert only_instances == []
    with pytest.raises(ClientError) as err:
        ec2.describe_image_references(ImageIds=["ami-00000000000000bad"], IncludeAllResourceTypes=True)
    assert err.value.response["Error"]["Code"] == "InvalidAMIID.NotFound"
    ssm.delete_parameter(Name="/lc/deploy")
    ec2.delete_launch_template(LaunchTemplateName="lc-web")
    for image_id in (kept, referenced, plain):
        ec2.deregister_image(ImageId=image_id)


def test_copy_image_copies_blocks_across_regions_as_ec2_does(cloud, tmp_path):
    ec2, kms = cloud.client("ec2", retries=False), cloud.client("kms", region="eu-west-1")
    west = cloud.client("ec2", retries=False, region="eu-west-1")
    snap = root_snapshot(vendor_image(ec2, "flat"))
    source = ec2.register_image(
        Name="copy-source", RootDeviceName="/dev/xvda", Architecture="x86_64", EnaSupport=True, BootMode="uefi-preferred",
        ImdsSupport="v2.0", BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snap}}],
        TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "team", "Value": "web"}]}],
    )["ImageId"]
    wait_until(lambda: ec2.describe_images(ImageIds=[source])["Images"][0]["State"], lambda s: s == "available")
    ec2.modify_image_attribute(ImageId=source, LaunchPermission={"Add": [{"UserId": "210987654321"}]})
    ec2.enable_image_deprecation(ImageId=source, DeprecateAt="2030-01-01T00:00:00Z")

    key = kms.create_key(Description="west")["KeyMetadata"]["Arn"]
    copy = dict(SourceImageId=source, SourceRegion="us-east-1", Name="copy-west", Encrypted=True, KmsKeyId=key, ClientToken="copy-1",
                TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": "amibake:build-id", "Value": "ab-9"}]},
                                   {"ResourceType": "snapshot", "Tags": [{"Key": "amibake:build-id", "Value": "ab-9"}]}])
    copy_id = west.copy_image(**copy)["ImageId"]
    assert west.copy_image(**copy)["ImageId"] == copy_id, "the same client token answers the same copy"
    seen = wait_until(lambda: west.describe_images(ImageIds=[copy_id])["Images"][0]["State"], lambda s: s == "available")
    assert seen[0] == "pending", seen
    image = west.describe_images(ImageIds=[copy_id])["Images"][0]
    with pytest.raises(ClientError):
        ec2.describe_images(ImageIds=[copy_id])
    # The source's layout, flags and IMDS setting; not its tags, permissions or deprecation.
    assert (image["Architecture"], image["EnaSupport"], image["BootMode"], image["ImdsSupport"]) == ("x86_64", True, "uefi-preferred", "v2.0")
    assert {t["Key"]: t["Value"] for t in image["Tags"]} == {"amibake:build-id": "ab-9"}
    assert "DeprecationTime" not in image
    assert west.describe_image_attribute(ImageId=copy_id, Attribute="launchPermission")["LaunchPermissions"] == []
    copied = root_snapshot(image)
    assert copied != snap
    snapshot = west.describe_snapshots(SnapshotIds=[copied])["Snapshots"][0]
    assert snapshot["Encrypted"] and snapshot["KmsKeyId"] == key
    assert {t["Key"]: t["Value"] for t in snapshot["Tags"]} == {"amibake:build-id": "ab-9"}
    assert cloud.ls()["other_regions"]["eu-west-1"]["images"][0]["id"] == copy_id
    # The copy's bytes are the source's.
    cloud.cli("export-snapshot", snap, str(tmp_path / "source.img"))
    cloud.cli("export-snapshot", copied, str(tmp_path / "copy.img"))
    # Compared in chunks: a disk image does not belong in memory whole.
    assert filecmp.cmp(tmp_path / "source.img", tmp_path / "copy.img", shallow=False)

    # Without a key a copy is encrypted as its source is; a key the region cannot use fails
    # the copy once started; the name is the region's to keep unique.
    plain = west.copy_image(SourceImageId=source, SourceRegion="us-east-1", Name="copy-plain")["ImageId"]
    plain_snap = root_snapshot(west.describe_images(ImageIds=[plain])["Images"][0])
    assert west.describe_snapshots(SnapshotIds=[plain_snap])["Snapshots"][0]["Encrypted"] is False
    east_key = cloud.client("kms").create_key(Description="east only")["KeyMetadata"]["Arn"]
    bad = west.copy_image(SourceImageId=source, SourceRegion="us-east-1", Name="copy-bad", Encrypted=True, KmsKeyId=east_key)["ImageId"]
    wait_until(lambda: west.describe_images(ImageIds=[bad])["Images"][0]["State"], lambda s: s == "failed")
    with pytest.raises(ClientError) as err:
        west.copy_image(SourceImageId=source, SourceRegion="us-east-1", Name="copy-west")
    assert err.value.response["Error"]["Code"] == "InvalidAMIName.Duplicate"
    with pytest.raises(ClientError) as err:
        west.copy_image(SourceImageId=source, SourceRegion="us-east-1", Name="copy-nokey", KmsKeyId=key)
    assert err.value.response["Error"]["Code"] == "InvalidParameterDependency"

    # IMDSv2-only can be set after the fact, and only that way.
    west.modify_image_attribute(ImageId=plain, ImdsSupport={"Value": "v2.0"})
    assert west.describe_images(ImageIds=[plain])["Images"][0]["ImdsSupport"] == "v2.0"
    with pytest.raises(ClientError):
        west.modify_image_attribute(ImageId=plain, ImdsSupport={"Value": "v1.0"})

    for region_ec2, image_id in ((west, copy_id), (west, plain), (west, bad), (ec2, source)):
        snaps = [m["Ebs"]["SnapshotId"] for m in region_ec2.describe_images(ImageIds=[image_id])["Images"][0]["BlockDeviceMappings"]]
        region_ec2.deregister_image(ImageId=image_id)
        for s in snaps:
            if s != snap:
                region_ec2.delete_snapshot(SnapshotId=s)
    assert cloud.ls()["other_regions"] == {}


def test_clouds_side_by_side_give_their_instances_addresses_of_their_own(cloud, tmp_path):
    # Tests of one binary run their clouds at once: were both subnets the same, an
    # instance of one would answer for an instance of the other.
    with state_dir("amibake-localcloud-second-") as state:
        second = start(state)
        try:
            subnets = [
                {n["CidrBlock"] for n in c.client("ec2").describe_subnets()["Subnets"] if n["CidrBlock"].startswith("127.")}
                for c in (cloud, second)
            ]
            assert len(subnets[0]) == 1 and len(subnets[1]) == 1
            assert subnets[0] != subnets[1], subnets
        finally:
            localcloud(state, "down", check=False)
        assert leftovers(state) == []


def test_the_cloud_accounts_for_each_wait_it_makes(cloud):
    ec2 = cloud.client("ec2")
    before = time.time()
    volume = ec2.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    try:
        waits = [json.loads(line) for line in cloud.cli("waits").stdout.splitlines()]
        mine = [w for w in waits if w["id"] == volume]
        assert [w["kind"] for w in mine] == ["volume"], waits
        assert before - 1 <= mine[0]["start"] <= mine[0]["end"] <= time.time() + 60
    finally:
        ec2.delete_volume(VolumeId=volume)

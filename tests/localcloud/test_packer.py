"""Debian's packer 1.6.6, an independent AWS client, completes its amazon-ebs and amazon-chroot
builds against the local cloud: the proof that the cloud is faithful, and the peer amibake is
measured against."""

import os
import re
import subprocess
from pathlib import Path

from conftest import mounted

HERE = Path(__file__).resolve().parent
PARTITION_1_OFFSET = 2048 * 512
# Packer's waiters first poll after 15 s unless told otherwise; the local cloud is quick.
PACKER_POLL_SECONDS = "1"


def packer_build(cloud, tmp_path, template, *variables):
    log = tmp_path / f"{template}.log"
    env = {
        **os.environ, **cloud.env, "AWS_POLL_DELAY_SECONDS": PACKER_POLL_SECONDS, "PACKER_LOG": "1", "PACKER_LOG_PATH": str(log),
        "PACKER_CACHE_DIR": str(tmp_path / "packer_cache"), "CHECKPOINT_DISABLE": "1", "HOME": str(tmp_path),
    }
    args = [f"-var={v}" for v in variables]
    result = subprocess.run(["packer", "build", "-machine-readable", *args, str(HERE / "packer" / f"{template}.json")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    errors = [line for line in log.read_text().splitlines() if re.search(r"\berror\b", line, re.I) and "On error:" not in line]
    assert errors == [], "packer's log shows no error"
    assert ",error," not in result.stdout
    return re.search(r"artifact,0,id,us-east-1:(ami-[0-9a-f]+)", result.stdout).group(1)


def test_packer_ebs_then_chroot_builds_complete_and_leave_nothing_behind(cloud, tmp_path):
    ec2 = cloud.client("ec2")
    volumes_before = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]}

    ebs_image = packer_build(cloud, tmp_path, "ebs")
    # ssh_interface = public_ip with no subnet: the default subnet gave the instance one.
    # (127.K.2.N: K is the cloud's own network, one per cloud running on this host.)
    assert re.search(r"Using ssh communicator to connect: 127\.\d+\.2\.\d+", (tmp_path / "ebs.log").read_text())
    chroot_image = packer_build(cloud, tmp_path, "chroot", f"source_ami={ebs_image}")

    image = ec2.describe_images(ImageIds=[chroot_image])["Images"][0]
    assert image["State"] == "available" and image["RootDeviceType"] == "ebs"
    root = [m for m in image["BlockDeviceMappings"] if m["DeviceName"] == image["RootDeviceName"]][0]
    raw = tmp_path / "final.img"
    cloud.cli("export-snapshot", root["Ebs"]["SnapshotId"], str(raw))
    with mounted(raw, PARTITION_1_OFFSET) as fs:
        assert (fs / "etc/packer-ebs").read_text() == "written by packer amazon-ebs\n"
        assert (fs / "etc/packer-chroot").read_text() == "written by packer amazon-chroot\n"
        assert (fs / "etc/debian_version").read_text().startswith("12.")
        assert (fs / "usr/sbin/sshd").exists()

    # Packer's cleanup: its instance terminated, its work volume, key pair and group gone.
    assert {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]} == volumes_before
    assert [k["KeyName"] for k in ec2.describe_key_pairs()["KeyPairs"] if k["KeyName"].startswith("packer")] == []
    assert [g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"].startswith("packer")] == []
    states = {i["InstanceId"]: i["State"]["Name"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]}
    assert [i for i, s in states.items() if s not in ("terminated",) and i != cloud.info["build_host"]] == []
    assert cloud.ls()["attachments"] == []
    assert not [line for line in open("/proc/mounts") if "packer" in line]

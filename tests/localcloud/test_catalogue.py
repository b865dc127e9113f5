"""The vendor catalogue: each distribution's public image, found as users find it, with the disk
its vendor lays out (partition numbers and types, filesystems, labels, UUIDs, fstab, /boot)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import leftovers, mounted, start, state_dir
from lc.images import BIOS_BOOT, LAYOUTS, SECTOR

FAMILIES = sorted(LAYOUTS)
# What the vendors' own images carry, written out here rather than read from the recipe, so a
# recipe that drifts from the real layout fails.
EXPECTED = {
    "al2023": {
        "find": ("parameter", "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"),
        "owner": "137112412989",
        "partitions": {1: ("xfs", "/"), 127: (None, None), 128: ("vfat", "/boot/efi")},
        "user": "ec2-user",
        "os_id": "amzn",
        "imds": "v2.0",
    },
    "ubuntu-24.04": {
        "find": ("parameter", "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"),
        "owner": "099720109477",
        "partitions": {1: ("ext4", "/"), 14: (None, None), 15: ("vfat", "/boot/efi"), 16: ("ext4", "/boot")},
        "user": "ubuntu",
        "os_id": "ubuntu",
        "imds": None,
    },
    "rhel-9": {
        "find": ("name", "RHEL-9.*_HVM-*-x86_64-*-Hourly2-GP3"),
        "owner": "309956199498",
        "partitions": {1: (None, None), 2: ("vfat", "/boot/efi"), 3: ("xfs", "/boot"), 4: ("xfs", "/")},
        "user": "ec2-user",
        "os_id": '"rhel"',
        "imds": None,
    },
    "al2023-arm64": {
        "find": ("parameter", "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"),
        "owner": "137112412989",
        "partitions": {1: ("xfs", "/"), 128: ("vfat", "/boot/efi")},
        "user": "ec2-user",
        "os_id": "amzn",
        "imds": "v2.0",
        "architecture": "arm64",
    },
    "debian-12-arm64": {
        "find": ("name", "debian-12-arm64-*"),
        "owner": "136693071363",
        "partitions": {1: ("ext4", "/"), 15: ("vfat", "/boot/efi")},
        "user": "admin",
        "os_id": "debian",
        "imds": None,
        "architecture": "arm64",
    },
}
# ELF's e_machine of each architecture's programs.
ELF_MACHINE = {"x86_64": 0x3E, "arm64": 0xB7}
EFI_LOADER = {"x86_64": "BOOTX64.EFI", "arm64": "BOOTAA64.EFI"}
AL2023_ROOT_UUID = "3aa4f5a4-9b57-4cb5-a2fa-12e4a7b5cb0f"


@pytest.fixture(scope="module")
def catalogue():
    with state_dir("amibake-localcloud-catalogue-") as state:
        cloud = start(state, vendors=FAMILIES)
        try:
            yield cloud
        finally:
            cloud.cli("down", check=False)
        assert leftovers(state) == []


def find_image(cloud, family):
    ec2, ssm = cloud.client("ec2"), cloud.client("ssm")
    how, what = EXPECTED[family]["find"]
    if how == "parameter":
        parameter = ssm.get_parameter(Name=what)["Parameter"]
        assert parameter["DataType"] == "aws:ec2:image"
        return ec2.describe_images(ImageIds=[parameter["Value"]])["Images"][0]
    images = ec2.describe_images(Owners=[EXPECTED[family]["owner"]], Filters=[{"Name": "name", "Values": [what]}])["Images"]
    assert len(images) == 1, images
    return images[0]


def table(raw: Path):
    out = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], check=True, capture_output=True, text=True).stdout)
    return {int(p["node"][len(str(raw)):]): p for p in out["partitiontable"]["partitions"]}


def probe(raw: Path, part) -> dict:
    """blkid's reading of one partition's filesystem: TYPE, LABEL, UUID (empty if none)."""
    out = subprocess.run(
        ["blkid", "-p", "-O", str(part["start"] * SECTOR), "--size", str(part["size"] * SECTOR), "-o", "export", str(raw)],
        capture_output=True, text=True,
    )
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def resolve(fstab_source: str, probes: dict) -> int:
    """The partition number an fstab source (UUID=, LABEL=) names."""
    key, value = fstab_source.split("=", 1)
    found = [n for n, p in probes.items() if p.get(key) == value]
    assert len(found) == 1, f"{fstab_source} names {found} of {probes}"
    return found[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_vendor_image_is_found_as_users_find_it_with_its_attributes(catalogue, family):
    image = find_image(catalogue, family)
    expected = EXPECTED[family]
    assert image["OwnerId"] == expected["owner"]
    assert image["Public"] is True
    assert image["Architecture"] == expected.get("architecture", "x86_64")
    assert image["RootDeviceName"] == "/dev/xvda"
    assert image["EnaSupport"] is True
    assert image.get("ImdsSupport") == expected["imds"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_vendor_disk_is_laid_out_as_its_vendor_lays_it_out(catalogue, family, tmp_path):
    image = find_image(catalogue, family)
    snapshot = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    raw = tmp_path / "root.img"
    catalogue.cli("export-snapshot", snapshot, str(raw))
    parts = table(raw)
    expected = EXPECTED[family]["partitions"]
    assert sorted(parts) == sorted(expected)
    probes = {n: probe(raw, p) for n, p in parts.items()}
    for number, (fs, _) in expected.items():
        assert probes[number].get("TYPE") == fs, (number, probes[number])
        if fs is None:
            assert parts[number]["type"] == BIOS_BOOT
    root_number = next(n for n, (_, mount) in expected.items() if mount == "/")
    if family.startswith("al2023"):
        assert probes[root_number]["UUID"] == AL2023_ROOT_UUID

    def mount(number):
        # The fixed AL2023 UUID may already be mounted on this host: XFS then needs nouuid.
        options = ["nouuid"] if probes[number]["TYPE"] == "xfs" else []
        p = parts[number]
        return mounted(raw, p["start"] * SECTOR, size=p["size"] * SECTOR, options=options)

    with mount(root_number) as root:
        fstab = [line.split() for line in (root / "etc/fstab").read_text().splitlines() if line and not line.startswith("#")]
        mounts = {entry[1]: resolve(entry[0], probes) for entry in fstab}
        assert mounts == {mount: n for n, (_, mount) in expected.items() if mount}
        assert f"ID={EXPECTED[family]['os_id']}" in (root / "etc/os-release").read_text().splitlines()
        assert any(line.startswith(f"{EXPECTED[family]['user']}:") for line in (root / "etc/passwd").read_text().splitlines())
        assert (root / "home" / EXPECTED[family]["user"]).is_dir()
        # The content is of the image's architecture: its programs are that machine's.
        architecture = EXPECTED[family].get("architecture", "x86_64")
        elf = (root / "usr/bin/true").read_bytes()[:20]
        assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == ELF_MACHINE[architecture]
        separate_boot = "/boot" in mounts
        # A separate /boot leaves only its mount point in the root: the kernel lives in its own partition.
        assert (list((root / "boot").iterdir()) == []) == separate_boot
    if separate_boot:
        with mount(mounts["/boot"]) as boot:
            assert (boot / "grub/grub.cfg").is_file()
            assert (boot / "efi").is_dir() and list((boot / "efi").iterdir()) == []
    efi = parts[mounts["/boot/efi"]]
    assert f"::/EFI/BOOT/{EFI_LOADER[architecture]}" in fat_files(raw, efi["start"] * SECTOR)


def fat_files(raw: Path, offset: int) -> list:
    """Every path in the FAT filesystem at `offset`, read by mtools: kernels without vfat
    (this one among them) cannot mount it."""
    out = subprocess.run(["mdir", "-/", "-b", "-i", f"{raw}@@{offset}", "::/"], capture_output=True, text=True, check=True,
                         env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    return out.stdout.split()


def test_an_al2023_root_mounts_beside_another_of_its_uuid_only_with_nouuid(catalogue, tmp_path):
    """The trap every AL2023 build host sets: its own root has the UUID of every AL2023 image."""
    image = find_image(catalogue, "al2023")
    raw = tmp_path / "root.img"
    catalogue.cli("export-snapshot", image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"], str(raw))
    second = tmp_path / "second.img"
    subprocess.run(["cp", "--sparse=always", str(raw), str(second)], check=True)
    root = table(raw)[1]
    offset, size = root["start"] * SECTOR, root["size"] * SECTOR
    # The first mount as the build host's own root is mounted: its UUID is now in use.
    with mounted(raw, offset, size=size):
        with pytest.raises(subprocess.CalledProcessError):
            with mounted(second, offset, size=size):
                pass  # a second XFS of the same UUID mounted without nouuid
        with mounted(second, offset, size=size, options=["nouuid"]):
            pass

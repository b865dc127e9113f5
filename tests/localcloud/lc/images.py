"""Vendor images with real root filesystems, built once per recipe and cached outside the repo.

Debian 12 is built with debootstrap (minbase plus what the real Debian AMI has: openssh-server,
sudo and an `admin` user) into a directory, then laid into two raw disk images: a partitioned
one (GPT, root on partition 1, as the real vendor image) and an unpartitioned one.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("AMIBAKE_LOCALCLOUD_CACHE", "/var/cache/amibake-localcloud"))

# What a vendor image is made of. Changing any of it changes the cache key, so the image is
# rebuilt exactly when its recipe changes.
RECIPE = {
    "suite": "bookworm",
    "variant": "minbase",
    "include": ["openssh-server", "sudo", "ca-certificates"],
    "user": "admin",
    "fs_size_mib": 2048,
    # The device is larger than the filesystem, as on a real AMI before growpart runs.
    "volume_size_gib": 8,
    "first_partition_sector": 2048,
    "recipe_version": 1,
}
SECTOR = 512


def run(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw)


def debian_mirror():
    """The Debian mirror apt uses on this machine."""
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = path.read_text()
        except OSError:
            continue
        for m in re.finditer(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+/debian)/?\s*$", text, re.M):
            return m.group(1)
    return "http://deb.debian.org/debian"


def recipe_key():
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir():
    return CACHE / f"debian-12-{recipe_key()}"


def ensure_images(log=print):
    """Returns {"partitioned": path, "flat": path}, building what is missing."""
    out = cache_dir()
    images = {"partitioned": out / "partitioned.img", "flat": out / "flat.img"}
    if all(p.exists() for p in images.values()):
        return images
    out.mkdir(parents=True, exist_ok=True)
    rootfs = out / "rootfs"
    if not (out / "rootfs.complete").exists():
        log(f"building the Debian 12 vendor image with debootstrap into {rootfs} (once per recipe)")
        shutil.rmtree(rootfs, ignore_errors=True)
        run(
            "debootstrap",
            f"--variant={RECIPE['variant']}",
            f"--include={','.join(RECIPE['include'])}",
            RECIPE["suite"],
            str(rootfs),
            debian_mirror(),
        )
        first_boot_layout(rootfs)
        (out / "rootfs.complete").write_text("ok\n")
    for kind, path in images.items():
        if not path.exists():
            build_disk(rootfs, path, partitioned=(kind == "partitioned"))
    return images


def first_boot_layout(rootfs: Path):
    """What the vendor image ships: the default user with passwordless sudo, no host keys
    (cloud-init makes them on first boot), apt lists removed."""
    user = RECIPE["user"]
    subprocess.run(["chroot", str(rootfs), "useradd", "-m", "-s", "/bin/bash", user], check=True)
    sudoers = rootfs / "etc/sudoers.d/90-cloud-init-users"
    sudoers.write_text(f"{user} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "etc/hostname").write_text("localhost\n")
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
    (rootfs / "etc/resolv.conf").write_text("# the image's own resolv.conf\nnameserver 169.254.169.253\n")
    shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def build_disk(rootfs: Path, path: Path, partitioned: bool):
    """A sparse raw disk holding an ext4 filesystem made from `rootfs` (no mount needed)."""
    size = RECIPE["volume_size_gib"] << 30
    fs_bytes = RECIPE["fs_size_mib"] << 20
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        os.truncate(tmp_path, size)
        offset = 0
        if partitioned:
            start = RECIPE["first_partition_sector"]
            sectors = fs_bytes // SECTOR
            table = f"label: gpt\nstart={start}, size={sectors}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n"
            subprocess.run(["sfdisk", "-q", str(tmp_path)], input=table, text=True, check=True, capture_output=True)
            offset = start * SECTOR
        run(
            "mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(rootfs),
            "-E", f"offset={offset}", str(tmp_path), f"{fs_bytes // 1024}k",
        )
        tmp_path.rename(path)
    finally:
        tmp_path.unlink(missing_ok=True)


if __name__ == "__main__":
    print(json.dumps({k: str(v) for k, v in ensure_images().items()}))

"""Vendor images with real root filesystems, built once per recipe and cached outside the repo.

Debian 12 is built with debootstrap (minbase plus what the real Debian AMI has: openssh-server,
sudo and an `admin` user) into a directory, then laid into two raw disk images: a partitioned
one (GPT, root on partition 1, as the real vendor image) and an unpartitioned one.

The catalogue (`LAYOUTS`) lays the same Debian content out as other distributions lay out their
AMIs' disks: partition numbers, types and names, filesystem types, labels and UUIDs, `/etc/fstab`,
a separate `/boot` and `/boot/efi`, the default user and os-release. A bake tool finds its way
through the layout, never the content, so the content may stay Debian's: amd64, or arm64 for
the arm64 images (debootstrap's foreign stage, then its second stage through qemu-user-static).
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
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
    # 2: the SSM agent's stand-in.
    "recipe_version": 2,
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


@contextmanager
def one_builder():
    """Clouds starting side by side on a fresh machine would otherwise debootstrap into one
    directory together: the first builds, the others wait and find its work done."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_images(log=print):
    """Returns {"partitioned": path, "flat": path}, building what is missing."""
    out = cache_dir()
    images = {"partitioned": out / "partitioned.img", "flat": out / "flat.img"}
    if all(p.exists() for p in images.values()):
        return images
    with one_builder():
        return _build_images(out, images, log)


def _build_images(out, images, log):
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


# Debian's arm64 content: debootstrap's foreign stage unpacks it here; its second stage runs
# arm64 programs through qemu-user-static, registered with binfmt_misc in a user namespace of
# its own (Linux 6.7 and later), so this host's own binfmt_misc is never touched.
ARM64_RECIPE = {"suite": "bookworm", "variant": "minbase", "include": ["sudo"], "recipe_version": 1}
QEMU_AARCH64 = Path("/usr/bin/qemu-aarch64-static")
# qemu's own registration of aarch64 ELF programs, with F: the interpreter is opened when it is
# registered, so it works inside a chroot that does not hold it.
AARCH64_BINFMT = (
    r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
    r":\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
    f":{QEMU_AARCH64}:F"
)
# Run in the namespace: mount its binfmt_misc, register, then the command.
_IN_FOREIGN_NAMESPACE = """read go
mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
printf '%s' "$1" > /proc/sys/fs/binfmt_misc/register
shift
exec "$@"
"""


def run_arm64(*argv):
    """Runs `argv` (typically `chroot TREE ...`) where arm64 programs run, as root with this
    host's ids (a user namespace mapping every id to itself), in mount and PID namespaces
    that end with it."""
    own = os.readlink("/proc/self/ns/user")
    proc = subprocess.Popen(
        ["unshare", "--user", "--mount", "--propagation", "private", "--pid", "--fork", "--mount-proc",
         "--", "sh", "-c", _IN_FOREIGN_NAMESPACE, "sh", AARCH64_BINFMT, *argv],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        # debootstrap's second stage would otherwise test mknod, which a user namespace refuses;
        # the nodes it needs were made by the first stage.
        env={**os.environ, "container": "lxc"},
    )
    try:
        while os.readlink(f"/proc/{proc.pid}/ns/user") == own:
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        else:
            for map_file in ("uid_map", "gid_map"):
                Path(f"/proc/{proc.pid}/{map_file}").write_text("0 0 4294967295\n")
        out, _ = proc.communicate(b"go\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} (arm64, through qemu) failed with {proc.returncode}:\n{out.decode(errors='replace')}")


def arm64_rootfs_dir():
    key = hashlib.sha256(json.dumps([RECIPE, ARM64_RECIPE], sort_keys=True).encode()).hexdigest()[:16]
    return CACHE / f"debian-12-arm64-{key}"


def ensure_arm64_rootfs(log=print) -> Path:
    """Debian 12's arm64 root filesystem, with the vendor's user, built once per recipe."""
    out = arm64_rootfs_dir()
    rootfs = out / "rootfs"
    if (out / "rootfs.complete").exists():
        return rootfs
    with one_builder():
        if (out / "rootfs.complete").exists():
            return rootfs
        if not QEMU_AARCH64.exists():
            raise RuntimeError(f"{QEMU_AARCH64} is missing: apt-get install qemu-user-static")
        log(f"building the Debian 12 arm64 vendor image with debootstrap --foreign into {rootfs} (once per recipe)")
        shutil.rmtree(rootfs, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        run(
            "debootstrap", "--foreign", "--arch=arm64",
            f"--variant={ARM64_RECIPE['variant']}",
            f"--include={','.join(ARM64_RECIPE['include'])}",
            ARM64_RECIPE["suite"], str(rootfs), debian_mirror(),
        )
        run_arm64("chroot", str(rootfs), "/debootstrap/debootstrap", "--second-stage")
        first_boot_layout(rootfs, run_in=run_arm64)
        (out / "rootfs.complete").write_text("ok\n")
    return rootfs


def first_boot_layout(rootfs: Path, run_in=run):
    """What the vendor image ships: the default user with passwordless sudo, no host keys
    (cloud-init makes them on first boot), apt lists removed, and the SSM agent (a stand-in:
    the local cloud's `ssm_agent` runs what is sent to it, once it finds it in the image)."""
    user = RECIPE["user"]
    run_in("chroot", str(rootfs), "useradd", "-m", "-s", "/bin/bash", user)
    sudoers = rootfs / "etc/sudoers.d/90-cloud-init-users"
    sudoers.write_text(f"{user} ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    for key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (rootfs / "etc/hostname").write_text("localhost\n")
    (rootfs / "etc/resolv.conf").unlink(missing_ok=True)
    (rootfs / "etc/resolv.conf").write_text("# the image's own resolv.conf\nnameserver 169.254.169.253\n")
    agent = rootfs / "usr/bin/amazon-ssm-agent"
    agent.write_text("#!/bin/sh\n# localcloud: stands for the SSM agent, whose work the local cloud does\nexit 0\n")
    agent.chmod(0o755)
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


# -- the catalogue: other distributions' disk layouts ----------------------------------------

# GPT partition type GUIDs.
LINUX_FS = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
BIOS_BOOT = "21686148-6449-6E6F-744E-656564454649"
EFI_SYSTEM = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
XBOOTLDR = "BC13C2FF-59E6-4262-A352-B275FD6F7172"
MIB = 1 << 20


@dataclass(frozen=True)
class Partition:
    number: int
    start_mib: int
    size_mib: int
    type: str
    name: str
    fs: str | None = None  # ext4, xfs or vfat; None: no filesystem (BIOS boot)
    mount: str | None = None  # where the image's fstab mounts it
    label: str | None = None
    # A filesystem UUID the distribution gives every image (AL2023's root), else derived.
    uuid: str | None = None


@dataclass(frozen=True)
class Layout:
    """How a distribution lays out its AMI's root disk, and what its image says of itself."""

    family: str
    name_prefix: str
    owner: str
    description: str
    user: str
    os_release: str
    partitions: tuple
    fstab_by: str  # UUID or LABEL
    parameter: str | None = None  # the public SSM parameter users find the image by
    imds_support: str | None = None  # "v2.0": IMDSv2 only, as AL2023 registers it
    boot_mode: str = "uefi-preferred"
    architecture: str = "x86_64"  # arm64: Debian's arm64 content
    volume_size_gib: int = 8
    tags: dict = field(default_factory=dict)

    def root(self) -> Partition:
        return next(p for p in self.partitions if p.mount == "/")

    def filesystem_uuid(self, part: Partition) -> str:
        """Fixed where the distribution fixes it, else the same on every build of the recipe."""
        if part.uuid:
            return part.uuid
        derived = uuid.uuid5(uuid.NAMESPACE_URL, f"amibake-localcloud/{self.family}/{recipe_key()}/{part.number}")
        # A FAT volume id is 32 bits, written XXXX-XXXX.
        return f"{derived.hex[:4]}-{derived.hex[4:8]}".upper() if part.fs == "vfat" else str(derived)

    def fstab(self) -> str:
        lines = []
        options = {"ext4": "defaults", "xfs": "defaults,noatime", "vfat": "umask=0077"}
        for part in sorted((p for p in self.partitions if p.mount), key=lambda p: p.mount.count("/") + len(p.mount)):
            source = f"LABEL={part.label}" if self.fstab_by == "LABEL" else f"UUID={self.filesystem_uuid(part)}"
            passno = 1 if part.mount == "/" else 2
            lines.append(f"{source}\t{part.mount}\t{part.fs}\t{options[part.fs]}\t0 {passno}")
        return "\n".join(lines) + "\n"


def _os_release(pretty, ident, version_id, like=""):
    like_line = f'ID_LIKE="{like}"\n' if like else ""
    return f'NAME="{pretty.split(" ")[0]}"\nPRETTY_NAME="{pretty}"\nID={ident}\n{like_line}VERSION_ID="{version_id}"\n'


LAYOUTS = {
    # AL2023: root on partition 1 although it sits after the BIOS boot (127) and EFI (128)
    # partitions; the root's XFS UUID is the same in every AL2023 image, so an AL2023 build host
    # already has it mounted.
    "al2023": Layout(
        family="al2023",
        name_prefix="al2023-ami-2023.6.20241212.0-kernel-6.1-x86_64",
        owner="137112412989",
        description="Amazon Linux 2023 AMI 2023.6.20241212.0 x86_64 HVM kernel-6.1",
        user="ec2-user",
        os_release=_os_release("Amazon Linux 2023.6.20241212", "amzn", "2023", "fedora"),
        partitions=(
            Partition(127, 1, 2, BIOS_BOOT, "BIOS Boot Partition"),
            Partition(128, 3, 10, EFI_SYSTEM, "EFI System Partition", "vfat", "/boot/efi"),
            Partition(1, 13, 2048, LINUX_FS, "Linux", "xfs", "/", "/", "3aa4f5a4-9b57-4cb5-a2fa-12e4a7b5cb0f"),
        ),
        fstab_by="UUID",
        parameter="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        imds_support="v2.0",
    ),
    # Ubuntu 24.04: root (1) last on the disk, after BIOS boot (14), EFI (15) and /boot (16).
    "ubuntu-24.04": Layout(
        family="ubuntu-24.04",
        name_prefix="ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20241206",
        owner="099720109477",
        description="Canonical, Ubuntu, 24.04, amd64 noble image",
        user="ubuntu",
        os_release=_os_release("Ubuntu 24.04.1 LTS", "ubuntu", "24.04", "debian"),
        partitions=(
            Partition(14, 1, 4, BIOS_BOOT, ""),
            Partition(15, 5, 106, EFI_SYSTEM, "", "vfat", "/boot/efi", "UEFI"),
            Partition(16, 111, 913, XBOOTLDR, "", "ext4", "/boot", "BOOT"),
            Partition(1, 1024, 2048, LINUX_FS, "", "ext4", "/", "cloudimg-rootfs"),
        ),
        fstab_by="LABEL",
        parameter="/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id",
    ),
    # RHEL 9: BIOS boot (1), EFI (2), an XFS /boot (3) and the XFS root (4), found by owner and name.
    "rhel-9": Layout(
        family="rhel-9",
        name_prefix="RHEL-9.5.0_HVM-20241211-x86_64-0-Hourly2-GP3",
        owner="309956199498",
        description="Provided by Red Hat, Inc.",
        user="ec2-user",
        os_release=_os_release("Red Hat Enterprise Linux 9.5 (Plow)", '"rhel"', "9.5", "fedora"),
        partitions=(
            Partition(1, 1, 1, BIOS_BOOT, ""),
            Partition(2, 2, 200, EFI_SYSTEM, "", "vfat", "/boot/efi"),
            Partition(3, 202, 600, XBOOTLDR, "", "xfs", "/boot", "boot"),
            Partition(4, 802, 2048, LINUX_FS, "", "xfs", "/", "root"),
        ),
        fstab_by="UUID",
        volume_size_gib=10,
    ),
    # Debian 12 for Graviton: the root on partition 1 after the EFI system partition (15),
    # no BIOS boot partition (arm64 boots UEFI only). Its content is Debian's arm64 build.
    "debian-12-arm64": Layout(
        family="debian-12-arm64",
        name_prefix="debian-12-arm64-20241201-1948",
        owner="136693071363",
        description="Debian 12 (20241201-1948)",
        user="admin",
        os_release=_os_release("Debian GNU/Linux 12 (bookworm)", "debian", "12"),
        partitions=(
            Partition(15, 1, 126, EFI_SYSTEM, "", "vfat", "/boot/efi"),
            Partition(1, 128, 2048, LINUX_FS, "", "ext4", "/"),
        ),
        fstab_by="UUID",
        boot_mode="uefi",
        architecture="arm64",
    ),
}


# AL2023 for Graviton: as on x86_64 but with no BIOS boot partition (arm64 boots UEFI only), found
# by its own parameter; its XFS root has the same fixed UUID.
LAYOUTS["al2023-arm64"] = replace(
    LAYOUTS["al2023"],
    family="al2023-arm64",
    name_prefix=LAYOUTS["al2023"].name_prefix.replace("x86_64", "arm64"),
    description=LAYOUTS["al2023"].description.replace("x86_64", "arm64"),
    partitions=tuple(p for p in LAYOUTS["al2023"].partitions if p.type != BIOS_BOOT),
    parameter="/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64",
    boot_mode="uefi",
    architecture="arm64",
)


def ensure_vendor(family: str, log=print) -> Path:
    """The raw disk image of `family`'s layout, built from the Debian content once per recipe."""
    layout = LAYOUTS[family]
    # Beside the content it is made from, named by its layout: a new recipe or layout makes it
    # anew.
    layout_key = hashlib.sha256(repr(layout).encode()).hexdigest()[:12]
    path = (arm64_rootfs_dir() if layout.architecture == "arm64" else cache_dir()) / f"{family}-{layout_key}.img"
    if path.exists():
        return path
    # The Debian root filesystem the content comes from.
    if layout.architecture == "arm64":
        content = ensure_arm64_rootfs(log)
    else:
        ensure_images(log)
        content = cache_dir() / "rootfs"
    with one_builder():
        if not path.exists():
            _build_vendor(layout, content, path, log)
    return path


def _build_vendor(layout, content, path, log):
    family = layout.family
    log(f"laying the Debian content out as {family} does (once per recipe)")
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=f"{family}-") as work:
        tree = Path(work) / "tree"
        run("cp", "-a", "--reflink=auto", str(content), str(tree))
        dress(tree, layout)
        tmp = Path(work) / "disk.img"
        lay_out(tree, layout, tmp, Path(work))
        tmp.rename(path)


def dress(tree: Path, layout: Layout):
    """What the distribution's image says of itself: its user, os-release and fstab."""
    run_in = run_arm64 if layout.architecture == "arm64" else run
    run_in("chroot", str(tree), "userdel", "-r", RECIPE["user"])
    run_in("chroot", str(tree), "useradd", "-m", "-s", "/bin/bash", layout.user)
    (tree / "etc/sudoers.d/90-cloud-init-users").write_text(f"{layout.user} ALL=(ALL) NOPASSWD:ALL\n")
    (tree / "etc/os-release").unlink(missing_ok=True)  # a link into /usr/lib on Debian
    (tree / "etc/os-release").write_text(layout.os_release)
    (tree / "etc/fstab").write_text(layout.fstab())
    # The boot loader's files live where the distribution keeps them, in their own partitions.
    (tree / "boot/efi/EFI/BOOT").mkdir(parents=True, exist_ok=True)
    loader = "BOOTAA64.EFI" if layout.architecture == "arm64" else "BOOTX64.EFI"
    (tree / "boot/efi/EFI/BOOT" / loader).write_bytes(b"localcloud: stands for the shim\n")
    (tree / "boot/grub").mkdir(parents=True, exist_ok=True)
    (tree / "boot/grub/grub.cfg").write_text(f"# {layout.family}: root {layout.fstab().split()[0]}\n")


def lay_out(tree: Path, layout: Layout, disk: Path, work: Path):
    """A sparse disk partitioned as `layout`, each filesystem made from its part of `tree`."""
    with open(disk, "wb") as f:
        f.truncate(layout.volume_size_gib << 30)
    table = "label: gpt\n" + "".join(
        f"{disk}{p.number} : start={p.start_mib * MIB // SECTOR}, size={p.size_mib * MIB // SECTOR}, type={p.type}"
        + (f', name="{p.name}"' if p.name else "") + "\n"
        for p in layout.partitions
    )
    subprocess.run(["sfdisk", "-q", str(disk)], input=table, text=True, check=True, capture_output=True)
    # Deepest mount first, so /boot/efi leaves /boot before /boot leaves the root.
    parts = sorted((p for p in layout.partitions if p.fs), key=lambda p: -len(p.mount))
    for part in parts:
        content = work / f"part{part.number}"
        source = tree / part.mount.lstrip("/")
        if part.mount == "/":
            content = tree
        else:
            source.rename(content)
            source.mkdir()
        image = work / f"fs{part.number}.img"
        make_filesystem(part, layout.filesystem_uuid(part), content, image, part.size_mib * MIB)
        run("dd", f"if={image}", f"of={disk}", "bs=1M", f"seek={part.start_mib}", "conv=notrunc,sparse", "status=none")
        image.unlink()


def make_filesystem(part: Partition, fs_uuid: str, content: Path, image: Path, size: int):
    with open(image, "wb") as f:
        f.truncate(size)
    label = part.label or ""
    if part.fs == "ext4":
        run("mkfs.ext4", "-q", "-F", *(["-L", label] if label else []), "-U", fs_uuid, "-d", str(content), str(image))
    elif part.fs == "vfat":
        run("mkfs.vfat", *(["-n", label] if label else []), "-i", fs_uuid.replace("-", ""), str(image))
        entries = [str(e) for e in content.iterdir()]
        if entries:
            run("mcopy", "-s", "-p", "-i", str(image), *entries, "::/", env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    elif part.fs == "xfs":
        run("mkfs.xfs", "-q", "-f", *(["-L", label] if label else []), "-m", f"uuid={fs_uuid}", str(image))
        fill_by_mount(image, content, ["-o", "nouuid"])
    else:
        raise ValueError(f"no filesystem {part.fs}")


def fill_by_mount(image: Path, content: Path, options: list):
    """mkfs.xfs cannot fill a filesystem from a directory: mount it, copy, unmount, always."""
    target = Path(tempfile.mkdtemp(prefix="amibake-localcloud-fill-"))
    try:
        run("mount", "-o", "loop", *options, str(image), str(target))
        try:
            run("cp", "-a", f"{content}/.", str(target))
        finally:
            run("umount", "-d", str(target))
    finally:
        target.rmdir()


if __name__ == "__main__":
    built = {k: str(v) for k, v in ensure_images().items()}
    built.update({family: str(ensure_vendor(family)) for family in LAYOUTS})
    print(json.dumps(built))

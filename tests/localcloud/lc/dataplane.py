"""The data plane: real kernel objects behind EC2's block storage.

A volume is a sparse file; a snapshot is a sparse copy of its volume's file made when the
snapshot is created. Attaching sets up a loop device and the names a Nitro host shows for it:
`/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol<id without dash>`, the requested `/dev/sdX`
and `/dev/xvdX`. This kernel has no partition tables on loop devices, so each partition gets a
loop device of its own (`losetup --offset --sizelimit`) under the names udev would give it.
"""

import errno
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BY_ID = Path("/dev/disk/by-id")
# losetup -d right after an unmount can find the device still busy: retry, bounded.
DETACH_ATTEMPTS = 20
DETACH_PAUSE = 0.1


class DataPlaneError(Exception):
    pass


def sh(*args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise DataPlaneError(f"{' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r.stdout.strip()


def sparse_copy(src: Path, dst: Path):
    # cp skips holes with SEEK_DATA, so copying an 8 GiB image with 250 MB of data is quick.
    # What a loop device wrote may still sit in delayed-allocation pages that SEEK_DATA does
    # not report as data: sync the source first, or the copy silently loses those writes.
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    sh("cp", "--sparse=always", "--reflink=auto", str(src), str(dst))


def share_final(src: Path, dst: Path):
    """`dst` holds what `src` holds, for a file never written again (a completed snapshot's):
    a second name for it where the filesystem allows, a copy elsewhere. Every story's cloud
    imports the same vendor images, and a cloud's copies would fill a small disk."""
    try:
        os.link(src, dst)
    except OSError as e:
        # Another filesystem, or one without hard links: a copy. Anything else (`dst` there
        # already) is an error, never a copy written into a file that may be shared.
        if e.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EOPNOTSUPP):
            raise
        sparse_copy(src, dst)


def allocated_bytes(path: Path) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


@dataclass
class Attachment:
    volume_id: str
    device: str
    loops: list = field(default_factory=list)
    links: list = field(default_factory=list)


def device_suffix(device: str) -> str:
    """`/dev/sdf` or `/dev/xvdf` → `f`."""
    name = device.rsplit("/", 1)[-1]
    for prefix in ("xvd", "sd"):
        if name.startswith(prefix) and len(name) > len(prefix):
            return name[len(prefix):]
    raise DataPlaneError(f"device name {device} is neither /dev/sdX nor /dev/xvdX")


class DataPlane:
    def __init__(self, state_dir: Path):
        self.volumes = state_dir / "volumes"
        self.snapshots = state_dir / "snapshots"
        self.volumes.mkdir(parents=True, exist_ok=True)
        self.snapshots.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.attachments: dict[str, Attachment] = {}

    def volume_file(self, volume_id: str) -> Path:
        return self.volumes / f"{volume_id}.img"

    def snapshot_file(self, snapshot_id: str) -> Path:
        return self.snapshots / f"{snapshot_id}.img"

    # -- volumes and snapshots -------------------------------------------------------------

    def create_volume(self, volume_id: str, size_gib: int, snapshot_id: str | None):
        with self.lock:
            path = self.volume_file(volume_id)
            source = self.snapshot_file(snapshot_id) if snapshot_id else None
            if source and not source.exists():
                # Never an empty volume in its place: that would hide what went wrong.
                raise DataPlaneError(f"the data of {snapshot_id} is missing ({source})")
            if source:
                sparse_copy(source, path)
            else:
                path.touch()
            if path.stat().st_size < size_gib << 30:
                os.truncate(path, size_gib << 30)

    def delete_volume(self, volume_id: str):
        with self.lock:
            self.volume_file(volume_id).unlink(missing_ok=True)

    def create_snapshot(self, volume_id: str, snapshot_id: str, parent_snapshot_id: str | None) -> int:
        """Copies the volume's file; returns the bytes allocated beyond the parent snapshot
        (what a real incremental snapshot would have to store)."""
        with self.lock:
            src = self.volume_file(volume_id)
            if not src.exists():
                return 0
            # A snapshot of an attached volume holds what reached the device, as on EC2:
            # nothing here flushes a filesystem mounted on it (BLKFLSBUF would), so a
            # client that snapshots a mounted volume without syncing sees it.
            dst = self.snapshot_file(snapshot_id)
            sparse_copy(src, dst)
            parent = self.snapshot_file(parent_snapshot_id) if parent_snapshot_id else None
            return max(0, allocated_bytes(dst) - (allocated_bytes(parent) if parent else 0))

    def copy_snapshot(self, source_id: str, copy_id: str, source_final: bool) -> int:
        """A copy of a snapshot's file; returns the bytes it holds. `source_final`: no block
        will be written into the source any more (it is not an EBS direct snapshot still
        pending), so the copy may share its file."""
        with self.lock:
            src = self.snapshot_file(source_id)
            if not src.exists():
                raise DataPlaneError(f"{source_id} has no data to copy")
            dst = self.snapshot_file(copy_id)
            (share_final if source_final else sparse_copy)(src, dst)
            return allocated_bytes(dst)

    def delete_snapshot(self, snapshot_id: str):
        with self.lock:
            self.snapshot_file(snapshot_id).unlink(missing_ok=True)

    def import_snapshot(self, snapshot_id: str, image: Path):
        """A completed snapshot holding `image`, a file of the image cache, which is only ever
        replaced by a rename, never written in place."""
        with self.lock:
            share_final(image, self.snapshot_file(snapshot_id))

    def export_snapshot(self, snapshot_id: str, dest: Path):
        with self.lock:
            src = self.snapshot_file(snapshot_id)
            if not src.exists():
                raise DataPlaneError(f"snapshot {snapshot_id} has no data in this local cloud")
            sparse_copy(src, dest)

    # -- attachments -------------------------------------------------------------------------

    def attach(self, volume_id: str, device: str):
        with self.lock:
            if volume_id in self.attachments:
                raise DataPlaneError(f"{volume_id} is already attached")
            suffix = device_suffix(device)
            path = self.volume_file(volume_id)
            if not path.exists():
                raise DataPlaneError(f"{volume_id} has no backing file")
            att = Attachment(volume_id, device)
            try:
                whole = sh("losetup", "--find", "--show", str(path))
                att.loops.append(whole)
                serial = volume_id.replace("-", "")
                names = [BY_ID / f"nvme-Amazon_Elastic_Block_Store_{serial}", Path(f"/dev/sd{suffix}"), Path(f"/dev/xvd{suffix}")]
                for name in names:
                    self._link(att, name, whole)
                for number, start, size in partitions(path):
                    loop = sh("losetup", "--find", "--show", "--offset", str(start), "--sizelimit", str(size), str(path))
                    att.loops.append(loop)
                    self._link(att, names[0].with_name(f"{names[0].name}-part{number}"), loop)
                    self._link(att, Path(f"/dev/sd{suffix}{number}"), loop)
                    self._link(att, Path(f"/dev/xvd{suffix}{number}"), loop)
            except Exception:
                self._release(att)
                raise
            self.attachments[volume_id] = att

    def _link(self, att: Attachment, name: Path, target: str):
        name.parent.mkdir(parents=True, exist_ok=True)
        if name.is_symlink() or name.exists():
            raise DataPlaneError(f"{name} already exists on this host: another attachment uses that name")
        name.symlink_to(target)
        att.links.append(name)

    def detach(self, volume_id: str):
        with self.lock:
            att = self.attachments.pop(volume_id, None)
            if att:
                self._release(att)

    def _release(self, att: Attachment):
        for link in att.links:
            if link.is_symlink():
                link.unlink()
        errors = []
        ours = str(self.volume_file(att.volume_id))
        for loop in reversed(att.loops):
            for _ in range(DETACH_ATTEMPTS):
                subprocess.run(["losetup", "-d", loop], capture_output=True)
                # Free, or already set up by another cloud over its own file: asking again
                # would detach theirs.
                if not (loop_backing(loop) or "").startswith(ours):
                    break
                time.sleep(DETACH_PAUSE)
            else:
                errors.append(loop)
        if errors:
            raise DataPlaneError(f"loop devices still busy after detach: {', '.join(errors)}")

    def device_of(self, volume_id: str) -> str | None:
        att = self.attachments.get(volume_id)
        return att.loops[0] if att else None

    def teardown(self):
        """Removes every loop device and link this data plane made."""
        failures = []
        with self.lock:
            for volume_id in list(self.attachments):
                try:
                    self.detach(volume_id)
                except DataPlaneError as e:
                    failures.append(str(e))
        # Anything else still backed by our files (say, a loop device a client set up itself).
        for loop, backing in backing_files():
            if backing.startswith(str(self.volumes)) or backing.startswith(str(self.snapshots)):
                subprocess.run(["losetup", "-d", loop], capture_output=True)
        return failures


def loop_backing(loop: str) -> str | None:
    """The file `loop` is set up over, or None when it is free."""
    # --list: without it, losetup prints one device in its plain format whatever --json says.
    r = subprocess.run(["losetup", "--json", "--list", loop], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return None
    return json.loads(r.stdout)["loopdevices"][0].get("back-file") or None


def backing_files():
    r = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    return [(d["name"], d.get("back-file") or "") for d in json.loads(r.stdout).get("loopdevices", [])]


def partitions(path: Path):
    """(number, byte offset, byte size) of each partition in the image's partition table."""
    r = subprocess.run(["sfdisk", "--json", str(path)], capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        return []
    table = json.loads(r.stdout)["partitiontable"]
    sector = table.get("sectorsize", 512)
    out = []
    for p in table.get("partitions", []):
        number = int(p["node"].rsplit(str(path), 1)[-1])
        out.append((number, p["start"] * sector, p["size"] * sector))
    return out


def remove_tree(path: Path):
    shutil.rmtree(path, ignore_errors=True)

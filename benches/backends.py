#!/usr/bin/env python3
"""The same composer-like bake by each way amibake and its peer can make it, on one local cloud:

- `direct` with a cold cache (the base's blocks fetched through the EBS direct APIs first);
- `direct` with a warm cache (nothing downloaded);
- `attach` (a volume of the base attached to the build host, as on an EC2 build host);
- Debian's packer 1.6.6 amazon-chroot, as shipped (its waiters first poll after 15 s) and
  tuned to poll every second, the fairest setting it has; the tarball goes in with a file
  provisioner and is unpacked by a shell provisioner, as a Packer user would do it.

For each: the wall time and the peak memory (the largest resident set of any of its processes).
For `direct`: the 512 KiB blocks it put, against the blocks that differ between the base's
snapshot and the new one (the local cloud's own count), and against the blocks the extracted
tree itself occupies (its files' and directories' extents, mapped to 512 KiB blocks of the
disk). Then `direct` warm again at other tarball sizes: its peak memory must not grow with
the tarball. Last, per vendor layout of the local cloud's catalogue (`--layouts`), `direct`
warm's blocks put against the blocks that differ and the tree's, as above: what the layout
itself costs (an XFS root's log, written at each clean unmount, against ext4's journal, which
the bake puts back as the base had it). With Packer, its amazon-chroot bakes the AL2023 layout as
well, on a host that holds the AL2023 root's UUID (as every AL2023 build host does): as shipped,
and with the `mount_options = ["nouuid"]` a Packer user would add. At scale, `direct` warm
with a tarball of 2 GiB and 80,000 files: our own seconds against GNU tar's extraction of it
plus its puts at EBS's 1,000 a second, the puts a second and the peak memory, how busy the
machine's cores were while the blocks went, and how long the cloud took to answer a put
(beyond its latency, a put waited for a core).

    benches/backends.py [--mib 100] [--memory-sizes 25,400] [--latency realistic] [--no-packer]
                        [--layouts al2023,ubuntu-24.04,rhel-9] [--cold-fetch-mib 1536]
                        [--scale-mib 2048 --scale-files 80000] [--release]

Run as root (loop devices, mounts). Not a test: it prints figures.
"""

import argparse
import array
import errno
import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bake import (PARTITION_1_OFFSET, RELEASE_HELP, REPO, allocated, build_amibake, cli,  # noqa: E402
                  gnu_tar_seconds, make_tarball, run_measured)

BLOCK = 512 * 1024

TEMPLATE = """[bake]
name = "bench-${{commit}}-${{timestamp}}"
base_ami = "{base}"
dest = "/srv/app"
owner = "www-data"

[[bake.provisioner]]
inline = ["echo ${{commit}} > /srv/app/REVISION"]
"""

PACKER_CHROOT = {
    "builders": [{
        "type": "amazon-chroot", "region": "us-east-1", "custom_endpoint_ec2": "{{user `endpoint`}}",
        "access_key": "localcloud", "secret_key": "localcloud", "skip_region_validation": True,
        "source_ami": "{{user `source_ami`}}", "device_path": "/dev/xvdf", "mount_partition": "1",
        "ami_name": "bench-packer-{{timestamp}}",
    }],
    "variables": {"endpoint": "{{env `AWS_ENDPOINT_URL`}}", "source_ami": "", "tarball": ""},
    "provisioners": [
        {"type": "file", "source": "{{user `tarball`}}", "destination": "/tmp/app.tar.gz"},
        {"type": "shell", "inline": [
            "mkdir -p /srv/app", "tar -xzf /tmp/app.tar.gz -C /srv/app", "chown -R www-data: /srv/app",
            "rm /tmp/app.tar.gz", "echo packer > /srv/app/REVISION",
        ]},
    ],
}


def ec2_client(env):
    import boto3  # the local cloud's own requirement
    return boto3.client("ec2", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def wait_for(describe, state, what, seconds=300):
    deadline = time.monotonic() + seconds
    while describe() != state:
        if time.monotonic() > deadline:
            sys.exit(f"{what} never became {state}")
        time.sleep(0.2)


# The partition each catalogue layout keeps its root on (tests/localcloud/lc/images.py).
LAYOUT_ROOTS = {"partitioned": 1, "al2023": 1, "ubuntu-24.04": 1, "rhel-9": 4}


def partition_offset(raw: Path, number: int) -> int:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    node = f"{raw}{number}"
    return next(p["start"] for p in table["partitions"] if p["node"] == node) * table.get("sectorsize", 512)


class HostsOwnRoot:
    """The root filesystem at partition `number` of the disk image `raw`, mounted read-only on
    this host as a host mounts its own (an XFS without nouuid: its UUID is then taken here),
    unmounted and detached on exit."""

    def __init__(self, raw: Path, number: int, target: Path):
        self.raw, self.number, self.target, self.loop = raw, number, target, None

    def __enter__(self):
        table = json.loads(subprocess.run(["sfdisk", "--json", str(self.raw)], check=True, capture_output=True,
                                          text=True).stdout)["partitiontable"]
        part = next(p for p in table["partitions"] if p["node"] == f"{self.raw}{self.number}")
        self.loop = subprocess.run(["losetup", "--find", "--show", "--read-only", "--offset", str(part["start"] * 512),
                                    "--sizelimit", str(part["size"] * 512), str(self.raw)],
                                   check=True, capture_output=True, text=True).stdout.strip()
        self.target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "ro", self.loop, str(self.target)], check=True, capture_output=True)
        return self

    def __exit__(self, *_):
        subprocess.run(["umount", str(self.target)], capture_output=True)
        subprocess.run(["losetup", "-d", self.loop], capture_output=True)


def owned_base(ec2, vendor_image, filled_mib=0, build_host=None) -> str:
    """A base AMI of this account, as `amibake base` makes them: the vendor's root through a
    volume into a snapshot of our own, which the EBS direct APIs serve and a bake can be a
    child of. With `filled_mib`, its snapshot holds that much data beyond the vendor's, as a
    base with gigabytes installed does: the volume is larger, attached to `build_host` (this
    machine), and random data is written past the vendor's disk (its partitions untouched).
    Its snapshot then completes at the profile's pace: minutes in `realistic`."""
    vendor = ec2.describe_images(ImageIds=[vendor_image])["Images"][0]
    vendor_mapping = vendor["BlockDeviceMappings"][0]["Ebs"]
    size_gib = vendor_mapping["VolumeSize"] + -(-filled_mib // 1024)
    volume = ec2.create_volume(SnapshotId=vendor_mapping["SnapshotId"], Size=size_gib,
                               AvailabilityZone="us-east-1a")["VolumeId"]
    wait_for(lambda: ec2.describe_volumes(VolumeIds=[volume])["Volumes"][0]["State"], "available", volume)
    if filled_mib:
        fill_past(ec2, volume, build_host, vendor_mapping["VolumeSize"] << 30, filled_mib)
    snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
    wait_for(lambda: ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]["State"], "completed",
             snapshot, seconds=1800)
    ec2.delete_volume(VolumeId=volume)
    image = ec2.register_image(
        Name=f"bench-base-{vendor_image}" + (f"-filled-{filled_mib}" if filled_mib else ""), Architecture="x86_64",
        RootDeviceName="/dev/xvda", VirtualizationType="hvm", EnaSupport=True,
        BlockDeviceMappings=[{"DeviceName": "/dev/xvda", "Ebs": {
            "SnapshotId": snapshot, "VolumeSize": size_gib, "DeleteOnTermination": True}}])["ImageId"]
    wait_for(lambda: ec2.describe_images(ImageIds=[image])["Images"][0]["State"], "available", image)
    return image


def fill_past(ec2, volume, build_host, offset, mib):
    """Writes `mib` MiB of random data into `volume` from `offset` on, through an attachment
    to this build host, and detaches it again."""
    # Outside the names amibake picks (sd[f-p]) and the local cloud's tests use (sd[u-z]).
    ec2.attach_volume(VolumeId=volume, InstanceId=build_host, Device="/dev/sdq")
    wait_for(lambda: ec2.describe_volumes(VolumeIds=[volume])["Volumes"][0]["Attachments"][0]["State"],
             "attached", volume)
    # Written through the volume's own link (its serial), never a name another disk may hold.
    own_link = f"/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{volume.replace('-', '')}"
    with open(own_link, "r+b") as disk:
        disk.seek(offset)
        for _ in range(mib):
            disk.write(os.urandom(1 << 20))
        disk.flush()
        os.fsync(disk.fileno())
    ec2.detach_volume(VolumeId=volume)
    wait_for(lambda: ec2.describe_volumes(VolumeIds=[volume])["Volumes"][0]["State"], "available", volume)


FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
EXTENTS_PER_CALL = 128


def extents(path: Path):
    """(physical offset, length) of each extent of `path` on its device (FIEMAP)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        start = 0
        while True:
            request = bytearray(struct.pack("QQIIII", start, 2**64 - 1 - start, FIEMAP_FLAG_SYNC, 0,
                                            EXTENTS_PER_CALL, 0) + bytes(56 * EXTENTS_PER_CALL))
            buf = array.array("B", request)
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
            mapped = struct.unpack_from("I", buf, 20)[0]
            if mapped == 0:
                return
            for i in range(mapped):
                logical, physical, length, _, _, flags = struct.unpack_from("QQQQQI", buf, 32 + 56 * i)
                yield physical, length
                if flags & FIEMAP_EXTENT_LAST:
                    return
                start = logical + length
    finally:
        os.close(fd)


def blocks_of_tree(root: Path, partition_offset: int) -> int:
    """The 512 KiB blocks of the disk that the tree's files and directories occupy (on XFS,
    which maps no directory through FIEMAP, its files')."""
    blocks = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames, "."]:
            path = Path(dirpath) / name
            if path.is_symlink():
                continue
            try:
                mapped = list(extents(path))
            except OSError as e:
                # XFS maps no directory through FIEMAP: its files still count.
                if e.errno == errno.EOPNOTSUPP and path.is_dir():
                    continue
                raise
            for physical, length in mapped:
                first = (partition_offset + physical) // BLOCK
                last = (partition_offset + physical + length - 1) // BLOCK
                blocks.update(range(first, last + 1))
    return len(blocks)


def tree_blocks_in_snapshot(state, snapshot, scratch, root_partition=1) -> int:
    raw, mnt = scratch / "tree.img", scratch / "tree.mnt"
    cli(state, "export-snapshot", snapshot, str(raw))
    offset = partition_offset(raw, root_partition) if root_partition else PARTITION_1_OFFSET
    mnt.mkdir(exist_ok=True)
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", "--offset", str(offset), str(raw)],
                          check=True, capture_output=True, text=True).stdout.strip()
    try:
        kind = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", loop], capture_output=True,
                              text=True).stdout.strip()
        # An AL2023 root's UUID may be this host's own.
        subprocess.run(["mount", "-o", "ro,nouuid" if kind == "xfs" else "ro", loop, str(mnt)], check=True)
        try:
            return blocks_of_tree(mnt / "srv/app", offset)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
        raw.unlink()


def calls_since(state, before):
    lines = cli(state, "calls").splitlines()
    return [json.loads(line) for line in lines[before:]]


def cloud_waits(state):
    """Every span (start and end, wall clock) in which some resource of the local cloud was in
    a transitional state by the cloud's own account (`localcloud waits`): a volume creating
    or attaching, a snapshot pending, an image pending, an instance starting."""
    return [json.loads(line) for line in cli(state, "waits").splitlines()]


def waited(waits, start, end) -> float:
    """Seconds of [start, end] covered by `waits`, overlapping ones counted once."""
    spans = sorted((max(w["start"], start), min(w["end"], end)) for w in waits
                   if w["start"] < end and w["end"] > start)
    total, reach = 0.0, start
    for first, last in spans:
        if last <= reach:
            continue
        total += last - max(first, reach)
        reach = last
    return total


def own_by_part(waits, started_at, ended_at, stderr):
    """Our own seconds in each part of a run, in order: before its first step (starting,
    checking the template, finding the base), each step, and after its last (cleanup,
    manifest, exit): each part's wall time less the cloud's `waits` inside it. The parts are
    placed by the times the run's own events carry."""
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    at = {e["step"]: wall_clock(e["time"]) for e in events if e.get("event") == "step_started"}
    steps = [(e["step"], at[e["step"]], at[e["step"]] + e["seconds"])
             for e in events if e.get("event") == "step_finished"]
    first = next(wall_clock(e["time"]) for e in events if e.get("event") == "run_started")
    spans = [("(before the steps)", started_at, first), *steps, ("(after the steps)", steps[-1][2], ended_at)]
    return [(part, (end - start) - waited(waits, start, end)) for part, start, end in spans]


def print_seconds_table(first_column, runs):
    """One row a key (a step, a part of a run), in the order the runs first have them, and a
    column of seconds a run: `runs` is (name, {key: seconds}) each; a run without a key
    leaves its cell empty."""
    keys = []
    for _, seconds in runs:
        keys += [key for key in seconds if key not in keys]
    print(f"  {first_column:<22}" + "".join(f"{name:>14}" for name, _ in runs))
    for key in keys:
        print(f"  {key:<22}" + "".join(f"{seconds[key]:13.2f}s" if key in seconds else f"{'':>14}"
                                       for _, seconds in runs))


def wall_clock(stamp: str) -> float:
    """An event's `time` (RFC 3339, UTC) as seconds since the epoch."""
    return datetime.fromisoformat(stamp).timestamp()


def most_in_flight(calls, action) -> int:
    """The most `action` calls the local cloud was serving at once (from when each reached it
    to its answer)."""
    edges = sorted(edge for c in calls if c["action"] == action and "started" in c
                   for edge in ((c["started"], 1), (c["time"], -1)))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def per_second(calls, action, served_only=False) -> float:
    """Calls of `action` a second, from the first to the last (the local cloud's clock); with
    `served_only`, only those answered with success."""
    times = [c["time"] for c in calls if c["action"] == action and (not served_only or (c.get("status") or 500) < 300)]
    span = max(times) - min(times) if len(times) > 1 else 0.0
    return len(times) / span if span > 0 else 0.0


def served(calls, action) -> tuple[float, float]:
    """The fastest and the mean seconds the local cloud took to answer an `action` call, from
    when it reached the cloud: the fastest is about its latency profile's own; the mean beyond
    it, a queue for this machine's cores."""
    took = [c["time"] - c["started"] for c in calls if c["action"] == action and "started" in c]
    return (min(took), sum(took) / len(took)) if took else (0.0, 0.0)


class CoresBusy:
    """Samples how busy the machine's cores are (/proc/stat) while it is entered; `share`
    answers the busy share of a span of wall-clock time within it."""

    EVERY = 0.2

    def __enter__(self):
        self.samples, self.stop = [], threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        self.thread.join()

    def sample(self):
        while True:
            fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            idle = fields[3] + fields[4]  # idle and iowait
            self.samples.append((time.time(), sum(fields) - idle, sum(fields)))
            if self.stop.wait(self.EVERY):
                return

    def share(self, start, end) -> float:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return float("nan")
        (_, busy0, total0), (_, busy1, total1) = inside[0], inside[-1]
        return (busy1 - busy0) / max(total1 - total0, 1)


def ok(calls, action):
    return sum(1 for c in calls if c["action"] == action and (c.get("status") or 500) < 300)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100, help="the tarball's size in MiB (default: %(default)s)")
    parser.add_argument("--memory-sizes", default="25,400",
                        help="more tarball sizes for direct warm's peak memory (default: %(default)s; empty: none)")
    parser.add_argument("--latency", default="realistic", choices=["none", "quick", "realistic"])
    parser.add_argument("--no-packer", action="store_true", help="leave Packer out (it takes the longest)")
    parser.add_argument("--layouts", default="al2023,ubuntu-24.04,rhel-9",
                        help="catalogue layouts whose blocks are counted, comma-separated; empty: none")
    parser.add_argument("--cold-fetch-mib", type=int, default=1536,
                        help="a cold fetch of a base holding this much more than the vendor's (default: %(default)s;"
                             " 0: none); its snapshot takes minutes to complete first")
    parser.add_argument("--scale-mib", type=int, default=2048,
                        help="direct warm at scale: a tarball of this many MiB (default: %(default)s; 0: none)")
    parser.add_argument("--scale-files", type=int, default=80_000, help="its files (default: %(default)s)")
    parser.add_argument("--release", action="store_true", help=RELEASE_HELP)
    args = parser.parse_args()

    amibake_exe, build = build_amibake(args.release)
    work = Path(tempfile.mkdtemp(prefix="amibake-bench-backends-"))
    state, cache = work / "localcloud", work / "cache"
    env = dict(os.environ, HOME=str(work), CHECKPOINT_DISABLE="1", PACKER_CACHE_DIR=str(work / "packer_cache"))
    try:
        layouts = [name for name in args.layouts.split(",") if name]
        vendors = [arg for name in layouts for arg in ("--vendor", name)]
        for line in cli(state, "up", "--latency", args.latency, *vendors).splitlines():
            if line.startswith("export "):
                key, value = line[len("export "):].split("=", 1)
                env[key] = value
        ec2 = ec2_client(env)
        base = owned_base(ec2, json.loads(cli(state, "ls"))["vendor_amis"]["partitioned"])
        base_snapshot = ec2.describe_images(ImageIds=[base])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
        (work / "bench.toml").write_text(TEMPLATE.format(base=base))
        (work / "chroot.json").write_text(json.dumps(PACKER_CHROOT))
        tarball = work / "app.tar.gz"
        files = make_tarball(tarball, args.mib, work)

        # Per bake: its wall time less the cloud's waits, by the cloud's own account; and
        # that by part of the run.
        own, own_parts = {}, {}
        # Per bake: the peak anonymous memory of its processes (the heap, without the code's
        # pages that the resident set counts).
        heaps = {}

        def amibake(backend, commit, tar=tarball, template="bench.toml"):
            command = [str(amibake_exe), "--output", "json", "bake", str(work / template), "--tarball", str(tar),
                       "--commit", commit, "--force", "--backend", backend, "--cache-dir", str(cache)]
            before = len(cli(state, "calls").splitlines())
            start, started_at = time.monotonic(), time.time()
            code, peak, heaps[backend, commit], stdout, stderr = run_measured(command, env, work)
            wall = time.monotonic() - start
            if code != 0:
                sys.exit(f"bake --backend {backend} failed:\n{stderr[-3000:]}")
            own_parts[backend, commit] = own_by_part(cloud_waits(state), started_at, time.time(), stderr)
            own[backend, commit] = sum(seconds for _, seconds in own_parts[backend, commit])
            return wall, peak, json.loads(stdout.splitlines()[-1]), calls_since(state, before)

        def packer(poll, source=base, template="chroot.json", may_fail=False):
            """Wall time and peak memory; with `may_fail`, the last error line when it fails."""
            packer_env = dict(env, AWS_POLL_DELAY_SECONDS=poll) if poll else env
            start = time.monotonic()
            code, peak, _, stdout, stderr = run_measured(
                ["packer", "build", "-machine-readable", f"-var=source_ami={source}", f"-var=tarball={tarball}",
                 str(work / template)], packer_env, work)
            if code != 0 and not may_fail:
                sys.exit(f"packer amazon-chroot failed:\n{stdout[-3000:]}{stderr[-2000:]}")
            errors = [line.split(",", 4)[-1] for line in stdout.splitlines() if ",error," in line]
            return time.monotonic() - start, peak, (errors[-1].replace("%!(PACKER_COMMA)", ",")[:300]
                                                    if code != 0 else None)

        print(f"latency profile: {args.latency}; tarball: {args.mib} MiB of composer-like files "
              f"({tarball.stat().st_size / (1 << 20):.0f} MiB gzip'd, {files} files); amibake: {build}")
        rows = []
        wall, peak, cold, cold_calls = amibake("direct", "cold")
        rows.append(("direct, cold cache", wall, peak, own["direct", "cold"]))
        wall, warm_peak, warm, warm_calls = amibake("direct", "warm")
        peak = warm_peak
        rows.append(("direct, warm cache", wall, peak, own["direct", "warm"]))
        direct_warm = wall
        wall, peak, attached, _ = amibake("attach", "attach")
        rows.append(("attach", wall, peak, own["attach", "attach"]))
        attach = wall
        if not args.no_packer:
            wall, peak, _ = packer(None)
            rows.append(("packer chroot (as shipped)", wall, peak, None))
            packer_stock = wall
            wall, peak, _ = packer("1")
            rows.append(("packer chroot (1 s polls)", wall, peak, None))
            packer_tuned = wall

        print(f"\n{'bake':<28} {'wall':>8} {'own':>7} {'peak memory':>12}")
        for name, wall, peak, ours in rows:
            ours = f"{ours:6.1f}s" if ours is not None else f"{'':>7}"
            print(f"{name:<28} {wall:7.1f}s {ours} {peak / 1024:9.0f} MiB")
        print("(own: the wall time less the cloud's waits by its own account, a volume, snapshot, image or "
              "instance in a transitional state; goal for direct warm at 100 MiB: <= 1.5 s)")
        print("\nown seconds by part of the run (the step's seconds less the cloud's waits inside it)")
        print_seconds_table("part", [(name, dict(own_parts[key])) for name, key in
                                     (("direct, cold", ("direct", "cold")), ("direct, warm", ("direct", "warm")),
                                      ("attach", ("attach", "attach")))])
        print(f"\ndirect warm / attach: {direct_warm / attach:.2f} (goal <= 0.75)")
        if not args.no_packer:
            print(f"direct warm / packer chroot as shipped: {direct_warm / packer_stock:.2f} (goal <= 0.3); "
                  f"/ packer tuned: {direct_warm / packer_tuned:.2f}")

        print("\nseconds per step (from each manifest)")
        print_seconds_table("step", [(name, manifest["step_seconds"]) for name, manifest in
                                     (("direct, cold", cold), ("direct, warm", warm), ("attach", attached))])

        print(f"\nblocks (512 KiB)        {'downloaded':>10} {'put':>6} {'differ':>7} {'tree':>6} {'put/tree':>9}"
              f" {'gets/s':>7} {'puts/s':>7}")
        for name, manifest, calls in (("direct, cold cache", cold, cold_calls), ("direct, warm cache", warm, warm_calls)):
            snapshot = manifest["snapshot_id"]
            put = ok(calls, "PutSnapshotBlock")
            differ = int(cli(state, "changed-blocks", base_snapshot, snapshot).strip())
            tree = tree_blocks_in_snapshot(state, snapshot, work)
            print(f"{name:<23} {ok(calls, 'GetSnapshotBlock'):>10} {put:>6} {differ:>7} {tree:>6} {put / tree:>9.2f}"
                  f" {per_second(calls, 'GetSnapshotBlock'):>7.0f} {per_second(calls, 'PutSnapshotBlock'):>7.0f}")
        print("(put: PutSnapshotBlock calls; differ: blocks the new snapshot differs from the base's in, by the "
              "local cloud's count; tree: blocks the extracted tree's files and directories occupy; goal put/tree <= 1.1;"
              " gets/s, puts/s: block calls a second, throttled ones included, from the first to the last, against"
              " EBS's 1,000 a second)")

        layout_bases = {}
        if layouts:
            print(f"\nblocks (512 KiB) by layout, direct warm {'put':>6} {'differ':>7} {'tree':>6} {'put/tree':>9}")
            vendor_amis = json.loads(cli(state, "ls"))["vendor_amis"]
            for name in layouts:
                layout_base = layout_bases[name] = owned_base(ec2, vendor_amis[name])
                layout_snapshot = ec2.describe_images(ImageIds=[layout_base])["Images"][0][
                    "BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
                (work / f"{name}.toml").write_text(TEMPLATE.format(base=layout_base))
                amibake("direct", f"{name}-cold", template=f"{name}.toml")
                _, _, manifest, calls = amibake("direct", f"{name}-warm", template=f"{name}.toml")
                put = ok(calls, "PutSnapshotBlock")
                differ = int(cli(state, "changed-blocks", layout_snapshot, manifest["snapshot_id"]).strip())
                tree = tree_blocks_in_snapshot(state, manifest["snapshot_id"], work, LAYOUT_ROOTS[name])
                print(f"  {name:<37} {put:>6} {differ:>7} {tree:>6} {put / tree:>9.2f}")
            print("(the same tarball; put beyond differ would be blocks written back unchanged, "
                  "differ beyond tree the filesystem's own: its log or journal, inodes, allocation maps)")

        if "al2023" in layouts and not args.no_packer:
            print("\nAL2023 on a host holding its root's UUID (1 s polls), wall and peak memory")
            al2023_base = layout_bases["al2023"]
            snapshot = ec2.describe_images(ImageIds=[al2023_base])["Images"][0]["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
            raw = work / "al2023-host-root.img"
            cli(state, "export-snapshot", snapshot, str(raw))
            with HostsOwnRoot(raw, LAYOUT_ROOTS["al2023"], work / "al2023-host-root"):
                for name, extra in (("packer chroot, as shipped", {}),
                                    ("packer chroot, nouuid", {"mount_options": ["nouuid"]})):
                    template = json.loads(json.dumps(PACKER_CHROOT))
                    template["builders"][0].update(extra)
                    (work / "al2023-chroot.json").write_text(json.dumps(template))
                    wall, peak, error = packer("1", al2023_base, "al2023-chroot.json", may_fail=True)
                    print(f"  {name:<28} {wall:7.1f}s {peak / 1024:9.0f} MiB  "
                          + (f"failed: {error}" if error else "ok"))
                wall, peak, _, _ = amibake("direct", "al2023-beside-host", template="al2023.toml")
                print(f"  {'amibake direct, warm':<28} {wall:7.1f}s {peak / 1024:9.0f} MiB  ok")
            raw.unlink()

        if args.cold_fetch_mib:
            build_host = json.loads((state / "ready.json").read_text())["build_host"]
            filled = owned_base(ec2, json.loads(cli(state, "ls"))["vendor_amis"]["partitioned"],
                                args.cold_fetch_mib, build_host)
            (work / "filled.toml").write_text(TEMPLATE.format(base=filled))
            small = work / "app-1.tar.gz"
            make_tarball(small, 1, work)
            _, peak, manifest, calls = amibake("direct", "fetch-cold", small, template="filled.toml")
            gets = ok(calls, "GetSnapshotBlock")
            throttled = sum(1 for c in calls if c["action"] == "GetSnapshotBlock" and c.get("code") == "RequestThrottledException")
            print(f"\ncold fetch of a base with {args.cold_fetch_mib} MiB more than the vendor's (direct, 1 MiB tarball)")
            seconds = manifest["step_seconds"]["fetch base image"]
            flight = most_in_flight(calls, "GetSnapshotBlock")
            print(f"  {gets} blocks in {seconds:.1f}s: {per_second(calls, 'GetSnapshotBlock', served_only=True):.0f} "
                  f"block reads served a second ({throttled} more throttled and retried); peak memory {peak / 1024:.0f} MiB "
                  f"resident, {heaps['direct', 'fetch-cold'] / 1024:.0f} MiB heap (goal <= {24 + flight / 2:.0f} MiB at its "
                  f"{flight} gets in flight)")
            print("  (goal: >= 800 a second, 80 % of EBS's 1,000 GetSnapshotBlock a second per account)")
            small.unlink()

        if args.scale_mib:
            # The base's 2 GiB root grown on a 10 GiB volume, so the tree fits; the cache of
            # the base is warm from the bakes above.
            (work / "scale.toml").write_text(TEMPLATE.format(base=base).replace(
                'owner = "www-data"\n', 'owner = "www-data"\nroot_volume_size_gb = 10\n'))
            big = work / f"app-{args.scale_mib}.tar.gz"
            files = make_tarball(big, args.scale_mib, work, args.scale_files)
            with CoresBusy() as cores:
                wall, peak, manifest, calls = amibake("direct", "scale", big, template="scale.toml")
            put_calls = [c for c in calls if c["action"] == "PutSnapshotBlock" and "started" in c]
            busy = cores.share(min(c["started"] for c in put_calls), max(c["time"] for c in put_calls))
            ours = own["direct", "scale"]
            puts = ok(calls, "PutSnapshotBlock")
            tar = gnu_tar_seconds(state, manifest["snapshot_id"], big, work, dest="srv/gnu-tar")
            goal = 1.2 * (tar + puts / 1000)
            print(f"\ndirect warm at scale: {args.scale_mib} MiB, {files} files "
                  f"({big.stat().st_size / (1 << 20):.0f} MiB gzip'd), the root grown to 10 GiB")
            flight = most_in_flight(calls, "PutSnapshotBlock")
            print(f"  wall {wall:.1f}s, own {ours:.1f}s, peak memory {peak / 1024:.0f} MiB resident, "
                  f"{heaps['direct', 'scale'] / 1024:.0f} MiB heap (goal <= {24 + flight / 2:.0f} MiB at its {flight} "
                  f"puts in flight); {puts} blocks put at "
                  f"{per_second(calls, 'PutSnapshotBlock', served_only=True):.0f} a second served")
            fastest, mean = served(calls, "PutSnapshotBlock")
            print(f"  while the blocks were put, the cores were {busy:.0%} busy (amibake and the local cloud together);"
                  f" the cloud answered a put in {1000 * mean:.0f} ms on average, {1000 * fastest:.0f} ms at the fastest"
                  f" (its latency): the difference, a put queued for the cores")
            print(f"  GNU tar -x of the same tarball into the same kind of filesystem: {tar:.1f}s; goal for own: "
                  f"<= 1.2 x (tar + puts at 1,000 a second) = {goal:.1f}s; uploads >= 800 a second")
            print_seconds_table("part", [("direct, scale", dict(own_parts["direct", "scale"]))])
            big.unlink()

        sizes = [int(s) for s in args.memory_sizes.split(",") if s]
        if sizes:
            print("\ndirect warm, peak memory by tarball size")
            print(f"  {'tarball':>8} {'resident':>9} {'heap':>6} {'puts in flight':>15} {'goal':>6}")
            measured = [(mib, peak, heaps["direct", commit], calls) for mib, (peak, commit, calls) in
                        ((args.mib, (warm_peak, "warm", warm_calls)),)]
            for mib in sizes:
                other = work / f"app-{mib}.tar.gz"
                make_tarball(other, mib, work)
                _, peak, _, calls = amibake("direct", f"mem{mib}", other)
                measured.append((mib, peak, heaps["direct", f"mem{mib}"], calls))
                other.unlink()
            for mib, peak, heap, calls in sorted(measured):
                flight = most_in_flight(calls, "PutSnapshotBlock")
                print(f"  {mib:>4} MiB {peak / 1024:>5.0f} MiB {heap / 1024:>2.0f} MiB {flight:>15} {24 + flight / 2:>2.0f} MiB")
            print("  (resident: the largest resident set of its processes, the program's code and libraries included;"
                  " heap: their anonymous memory together; puts in flight: the most the local cloud served at once;"
                  " goal: <= 24 MiB + 0.5 MiB per call in flight, flat)")
    finally:
        subprocess.run([str(REPO / "tests/localcloud/localcloud"), "--state", str(state), "down"], capture_output=True)
        # Only once nothing is mounted there: a recursive delete must never walk into a mount.
        if str(work) not in Path("/proc/mounts").read_text():
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

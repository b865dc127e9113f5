#!/usr/bin/env python3
"""Figures for `amibake bake` on the local cloud, for composer-like tarballs of growing size:

- the time of each step (from the bake's manifest);
- extraction throughput, against GNU `tar -x` of the same tarball into the same kind of
  volume (the vendor image's ext4 on a loop device over a sparse file, as the local cloud's
  volumes are), mounted the same way;
- the peak memory of the bake (the largest resident set of any of its processes, the
  chrooted extraction child included), which must not grow with the tarball;
- how much the new snapshot grew over the base's, against the bytes extracted: the
  snapshot's cost follows the blocks written.

    benches/bake.py [--sizes 50,400] [--latency none] [--release]      (sizes in MiB)

Run as root (loop devices, mounts). Not a test: it prints figures.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCALCLOUD = REPO / "tests/localcloud/localcloud"
PARTITION_1_OFFSET = 2048 * 512
GNU_TIME = "/usr/bin/time"
FILE_SIZES = (200, 1500, 6000, 30000)  # bytes: composer trees are mostly small files
STEP_ORDER = ["create volume", "attach volume", "mount image", "extract tarball", "run provisioners",
              "unmount and detach", "snapshot", "register image"]

TEMPLATE = """[bake]
name = "bench-${commit}-${timestamp}"
base_ami = "resolve:ssm:/aws/service/debian/release/12/latest/amd64"
dest = "/srv/app"
owner = "www-data"
"""


def make_tarball(path: Path, mib: int, scratch: Path, files: int | None = None):
    """A composer-like tree of about `mib` MiB of incompressible files, gzip'd like CI does;
    with `files`, about that many (the same mix of sizes, scaled)."""
    tree = scratch / f"tree-{mib}"
    scale = 1.0
    if files:
        scale = (mib << 20) / files / (sum(FILE_SIZES) / len(FILE_SIZES))
    total, i = 0, 0
    while total < mib << 20:
        size = int(FILE_SIZES[i % len(FILE_SIZES)] * scale)
        file = tree / f"vendor/pkg{i % 97}/src/Sub{i % 13}/File{i}.php"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_bytes(os.urandom(size))
        total, i = total + size, i + 1
    (tree / "bin").mkdir(exist_ok=True)
    (tree / "bin/console").write_text("#!/bin/sh\n")
    (tree / "bin/console").chmod(0o755)
    os.symlink("../bin/console", tree / "vendor/console")
    subprocess.run(["tar", "-I", "gzip -1", "-cf", str(path), "-C", str(tree), "."], check=True)
    shutil.rmtree(tree)
    return i


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def gnu_tar_seconds(cloud_state: Path, snapshot: str, tarball: Path, scratch: Path, dest="srv/app") -> float:
    raw = scratch / "tar-x.img"
    cli(cloud_state, "export-snapshot", snapshot, str(raw))
    mnt = scratch / "tar-x.mnt"
    mnt.mkdir(exist_ok=True)
    loop = subprocess.run(["losetup", "--find", "--show", "--offset", str(PARTITION_1_OFFSET), str(raw)],
                          check=True, capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mount", loop, str(mnt)], check=True)
        try:
            dest = mnt / dest
            dest.mkdir(parents=True)
            # Timed like amibake's extract step: the page cache is flushed by the unmount,
            # outside the timing, for both.
            start = time.monotonic()
            subprocess.run(["tar", "-xzf", str(tarball), "-C", str(dest)], check=True)
            return time.monotonic() - start
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
        raw.unlink()


def cli(state: Path, *args) -> str:
    return subprocess.run([str(LOCALCLOUD), "--state", str(state), *args], check=True, capture_output=True, text=True).stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,400", help="tarball sizes in MiB (default: %(default)s)")
    parser.add_argument("--latency", default="none", choices=["none", "quick", "realistic"])
    parser.add_argument("--release", action="store_true", help=RELEASE_HELP)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    amibake_exe, build = build_amibake(args.release)
    work = Path(tempfile.mkdtemp(prefix="amibake-bench-bake-"))
    state = work / "localcloud"
    env = dict(os.environ)
    try:
        for line in cli(state, "up", "--latency", args.latency).splitlines():
            if line.startswith("export "):
                key, value = line[len("export "):].split("=", 1)
                env[key] = value
        (work / "bench.toml").write_text(TEMPLATE)
        vendor = json.loads(cli(state, "ls"))["vendor_amis"]["partitioned"]
        base_snapshot = root_snapshot(env, vendor)
        base_raw = work / "base.img"
        cli(state, "export-snapshot", base_snapshot, str(base_raw))
        base_allocated = allocated(base_raw)
        base_raw.unlink()

        print(f"latency profile: {args.latency}; amibake: {build}")
        rows = []
        for mib in sizes:
            tarball = work / f"app-{mib}.tar.gz"
            files = make_tarball(tarball, mib, work)
            start = time.monotonic()
            code, peak_kib, _, stdout, stderr = run_measured(
                [str(amibake_exe), "--output", "json", "bake", str(work / "bench.toml"), "--tarball", str(tarball),
                 "--commit", f"bench{mib}", "--force"], env, work)
            wall = time.monotonic() - start
            if code != 0:
                sys.exit(f"bake of {tarball.name} failed:\n{stderr[-3000:]}")
            manifest = json.loads(stdout.splitlines()[-1])
            new_raw = work / "new.img"
            cli(state, "export-snapshot", manifest["snapshot_id"], str(new_raw))
            growth = allocated(new_raw) - base_allocated
            new_raw.unlink()
            tar_seconds = gnu_tar_seconds(state, base_snapshot, tarball, work)
            steps = manifest["step_seconds"]
            extract = steps["extract tarball"]
            in_order = sorted(steps, key=lambda step: STEP_ORDER.index(step) if step in STEP_ORDER else len(STEP_ORDER))
            mib_bytes = manifest["bytes"] / (1 << 20)
            print(f"\n{mib} MiB tarball ({tarball.stat().st_size / (1 << 20):.0f} MiB gzip'd, {files} files): bake {wall:.1f}s")
            for step in in_order:
                print(f"  {step:<22} {steps[step]:7.2f}s")
            print(f"  extraction: amibake {mib_bytes / extract:6.1f} MiB/s ({extract:.2f}s), "
                  f"GNU tar -x {mib_bytes / tar_seconds:6.1f} MiB/s ({tar_seconds:.2f}s), ratio {tar_seconds / extract:.2f}")
            print(f"  peak memory: {peak_kib / 1024:.0f} MiB (largest process of the bake)")
            print(f"  snapshot grew {growth / (1 << 20):.0f} MiB over the base for {mib_bytes:.0f} MiB extracted "
                  f"({growth / max(manifest['bytes'], 1):.2f}x: every small file takes a whole 4 KiB block, plus inodes and directories)")
            rows.append((mib, peak_kib))
            tarball.unlink()
        if len(rows) > 1:
            (small, small_peak), (large, large_peak) = rows[0], rows[-1]
            print(f"\npeak memory {small_peak / 1024:.0f} MiB at {small} MiB, {large_peak / 1024:.0f} MiB at {large} MiB: "
                  + ("flat" if large_peak < small_peak * 1.5 else "GROWS with the tarball"))
    finally:
        subprocess.run([str(LOCALCLOUD), "--state", str(state), "down"], capture_output=True)
        # Only once nothing is mounted there: a recursive delete must never walk into a mount.
        if str(work) not in Path("/proc/mounts").read_text():
            shutil.rmtree(work, ignore_errors=True)


RELEASE_HELP = "measure the release build, which users run, not the debug build the tests use"


def build_amibake(release):
    """Builds amibake as asked: its path, and which build it is, for the figures' heading."""
    profile = ["--release"] if release else []
    subprocess.run(["cargo", "build", "--quiet", *profile], cwd=REPO, check=True)
    if release:
        return REPO / "target/release/amibake", "target/release/amibake (release build, as users run it)"
    return REPO / "target/debug/amibake", "target/debug/amibake (debug build, as the tests use)"


def run_measured(command, env, work):
    """Runs `command`; its exit code, the peak resident set (KiB) of it and every process it
    waited for (the extraction child among them), its peak heap (KiB), and its output.

    The resident set is measured by GNU time (Debian's `time`), not by this script's own
    wait4: a child forked from this Python process starts with its resident set, which wait4
    would report as the floor of every figure. It counts the pages of the program's code and
    libraries too (tens of MiB for a debug build); the heap is the anonymous memory of the
    whole process tree, sampled every 50 ms from /proc."""
    if not Path(GNU_TIME).exists():
        sys.exit(f"{GNU_TIME} is missing: apt-get install time")
    out, err, peak = work / "run.out", work / "run.err", work / "run.peak"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([GNU_TIME, "--format=%M", f"--output={peak}", *command], env=env,
                                   stdout=stdout, stderr=stderr)
        heap = [0]
        sampler = threading.Thread(target=sample_heap, args=(process, heap), daemon=True)
        sampler.start()
        code = process.wait()
        sampler.join()
    return code, int(peak.read_text().split()[-1]), heap[0], out.read_text(), err.read_text()


def sample_heap(process, peak):
    """The largest anonymous memory (KiB) of `process` and its descendants together, until it
    ends, into `peak[0]`."""
    while process.poll() is None:
        pids, total = [process.pid], 0
        while pids:
            pid = pids.pop()
            try:
                pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Anonymous:"):
                        total += int(line.split()[1])
            except (OSError, ValueError):
                continue
        peak[0] = max(peak[0], total)
        time.sleep(0.05)


def root_snapshot(env, image_id) -> str:
    import boto3  # the local cloud's own requirement
    ec2 = boto3.client("ec2", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                       aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    image = ec2.describe_images(ImageIds=[image_id])["Images"][0]
    return image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]


if __name__ == "__main__":
    main()

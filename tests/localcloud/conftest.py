"""One local cloud per test session, always torn down, and checked to leave nothing behind."""

import json
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

HERE = Path(__file__).resolve().parent
LOCALCLOUD = str(HERE / "localcloud")


def localcloud(state, *args, check=True):
    return subprocess.run([LOCALCLOUD, "--state", str(state), *args], capture_output=True, text=True, check=check)


class Cloud:
    def __init__(self, state: Path, env: dict):
        self.state = state
        self.env = env
        self.info = json.loads((state / "ready.json").read_text())

    def client(self, service, retries=True, region=None):
        config = Config(retries={"max_attempts": 1 if not retries else 5, "mode": "standard"})
        return boto3.client(service, endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name=region or self.env["AWS_REGION"],
                            aws_access_key_id="localcloud", aws_secret_access_key="localcloud", config=config)

    def cli(self, *args, check=True):
        return localcloud(self.state, *args, check=check)

    def calls(self):
        return [json.loads(line) for line in self.cli("calls").stdout.splitlines()]

    def ls(self):
        return json.loads(self.cli("ls").stdout)


def start(state: Path, latency="quick", vendors=(), *extra) -> Cloud:
    out = localcloud(state, "up", "--latency", latency, *(f"--vendor={v}" for v in vendors), *extra)
    env = dict(line[len("export "):].split("=", 1) for line in out.stdout.splitlines() if line.startswith("export "))
    return Cloud(state, env)


def leftovers(state: Path):
    """Loop devices backed by the state directory, EBS-style /dev links, the server process."""
    found = []
    r = subprocess.run(["losetup", "--json", "--list"], capture_output=True, text=True)
    if r.stdout.strip():
        for d in json.loads(r.stdout)["loopdevices"]:
            if str(state) in (d.get("back-file") or ""):
                found.append(f"loop {d['name']} -> {d['back-file']}")
    by_id = Path("/dev/disk/by-id")
    links = list(by_id.glob("nvme-Amazon_Elastic_Block_Store_*")) if by_id.exists() else []
    links += [Path("/dev") / n for n in os.listdir("/dev") if n.startswith(("sd", "xvd")) and (Path("/dev") / n).is_symlink()]
    # A link to this cloud's loop device, or to none set up (nobody's); not one of another
    # cloud running beside it.
    # (A link another cloud removes while this looks is gone afterwards: not a leftover.)
    found += [f"link {p}" for p in links if str(state) in (link_backing(p) or str(state)) and p.is_symlink()]
    pid_file = state / "server.pid"
    if pid_file.exists():
        found.append(f"server pid file {pid_file}")
    with open("/proc/mounts") as mounts:
        found += [f"mount {line.split()[1]}" for line in mounts if str(state) in line]
    return found


def link_backing(link: Path):
    """The file behind the loop device `link` leads to, or None (dangling, or free)."""
    from lc.dataplane import loop_backing

    try:
        return loop_backing(os.path.realpath(link, strict=True))
    except OSError:
        return None


def mounts_under(path: Path):
    with open("/proc/mounts") as mounts:
        return [line.split()[1] for line in mounts if line.split()[1].startswith(str(path) + "/")]


def remove_state(state: Path):
    """Removes a cloud's state directory, unless anything is still mounted beneath it: an
    instance's root holds a bind of /dev, and a recursive delete would walk into the host's."""
    left = mounts_under(state)
    assert left == [], f"not removing {state}: still mounted there: {left}"
    shutil.rmtree(state)


@contextmanager
def state_dir(prefix):
    state = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield state
    finally:
        remove_state(state)


@pytest.fixture(scope="session")
def cloud():
    with state_dir("amibake-localcloud-") as state:
        c = start(state)
        try:
            yield c
        finally:
            localcloud(state, "down", check=False)
        assert leftovers(state) == []


@contextmanager
def mounted(image: Path, offset=0, readonly=True, size=None, options=()):
    """Mounts a raw image (optionally a partition's byte range); always undone."""
    limit = ["--sizelimit", str(size)] if size else []
    loop = subprocess.run(["losetup", "--find", "--show", *(["--read-only"] if readonly else []), "--offset", str(offset), *limit, str(image)],
                          check=True, capture_output=True, text=True).stdout.strip()
    target = Path(tempfile.mkdtemp(prefix="amibake-inspect-"))
    options = [*(["ro"] if readonly else []), *options]
    try:
        subprocess.run(["mount", *(["-o", ",".join(options)] if options else []), loop, str(target)], check=True, capture_output=True)
        try:
            yield target
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True)
        target.rmdir()

"""Instances that behave like booted ones.

An instance is its root volume, mounted (with the /boot and /boot/efi its fstab mounts from
their own partitions), with the image's own sshd chrooted into it in new PID
and UTS namespaces, listening on the instance's loopback address (127.K.1.N:22). Before that,
what cloud-init does on first boot: host keys, the key pair's public key for the image's
default user, the hostname, a resolv.conf, and the host keys' fingerprints printed to the
console (what GetConsoleOutput returns). Stopping kills the namespace's PID 1, which takes
every process of the instance with it, then unmounts.

An impostor (`lc impostor`) stands for another machine answering at the instance's address:
the next instance to boot prints its own keys to the console, but its sshd offers others.
"""

import ipaddress
import json
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .dataplane import DataPlaneError, partitions, sh

# Users cloud-init would configure, by distribution; the first the image has is used.
DEFAULT_USERS = ("admin", "ec2-user", "ubuntu", "debian")
SSH_READY_TIMEOUT = 20
# GetConsoleOutput returns the most recent 64 KiB.
CONSOLE_BYTES = 64 * 1024
STOP_TIMEOUT = 10
UMOUNT_ATTEMPTS = 20


@dataclass
class Running:
    instance_id: str
    root: Path
    loop: str
    mounts: list = field(default_factory=list)
    # Loop devices of the image's other partitions its fstab mounts (/boot, /boot/efi).
    boot_loops: list = field(default_factory=list)
    process: subprocess.Popen | None = None
    # When it finished booting (monotonic): its SSM agent starts from there.
    booted_at: float = float("inf")


class Instances:
    def __init__(self, state_dir: Path, dataplane):
        self.dir = state_dir / "instances"
        self.dataplane = dataplane
        self.running: dict[str, Running] = {}
        self.lock = threading.RLock()
        self.impostors = 0

    def boot(self, instance_id: str, volume_id: str, private_ip: str, public_ip: str | None, public_key: str | None):
        for address in filter(None, (private_ip, public_ip)):
            if not ipaddress.ip_address(address).is_loopback:
                raise DataPlaneError(f"{instance_id} has address {address}; the local cloud only boots instances on loopback")
        with self.lock:
            if instance_id in self.running:
                return
            image = self.dataplane.volume_file(volume_id)
            part = root_partition(image)
            offset_args = ["--offset", str(part[1]), "--sizelimit", str(part[2])] if part else []
            root = self.dir / instance_id / "root"
            root.mkdir(parents=True, exist_ok=True)
            loop = sh("losetup", "--find", "--show", *offset_args, str(image))
            run = Running(instance_id, root, loop)
            self.running[instance_id] = run
            try:
                # Every AL2023 root has one XFS UUID, which the host may hold already.
                xfs = filesystem_type(loop) == "xfs"
                self._mount(run, [*(["-o", "nouuid"] if xfs else []), loop, str(root)])
                console = self.dir / instance_id / "console.log"
                self._mount_boot(run, image, console)
                first_boot(root, instance_id, private_ip, public_key, console)
                if self.impostors > 0:
                    self.impostors -= 1
                    replace_host_keys(root)
                self._mount(run, ["-t", "proc", "proc", str(root / "proc")])
                self._mount(run, ["-t", "sysfs", "sysfs", str(root / "sys")])
                self._mount(run, ["--bind", "/dev", str(root / "dev")])
                sh("mount", "--make-private", str(root / "dev"))
                self._mount(run, ["-t", "devpts", "-o", "newinstance,ptmxmode=0666", "devpts", str(root / "dev/pts")])
                self._mount(run, ["--bind", str(root / "dev/pts/ptmx"), str(root / "dev/ptmx")])
                self._mount(run, ["-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(root / "run")])
                (root / "run/sshd").mkdir(mode=0o755, exist_ok=True)
                log = open(console, "ab")
                hostname = "ip-" + private_ip.replace(".", "-")
                # sshd answers on the private address and, where the instance has one, the
                # public one.
                listen = [f"-oListenAddress={a}:22" for a in filter(None, (private_ip, public_ip))]
                run.process = subprocess.Popen(
                    ["unshare", "--pid", "--uts", "--fork", "--kill-child", "sh", "-c",
                     'hostname "$1" && root="$2" && shift 2 && exec chroot "$root" /usr/sbin/sshd -D -e "$@"',
                     "boot", hostname, str(root), *listen],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )
                for address in filter(None, (private_ip, public_ip)):
                    wait_for_port(address, 22, run.process, SSH_READY_TIMEOUT)
                run.booted_at = time.monotonic()
            except Exception:
                self.halt(instance_id)
                raise

    def _mount(self, run: Running, args):
        sh("mount", *args)
        run.mounts.append(args[-1])

    def _mount_boot(self, run: Running, image: Path, console: Path):
        """What the instance's own fstab mounts beside its root, as its boot does: /boot and
        /boot/efi from their partitions, so what is written there lands where it would. A
        filesystem this host's kernel lacks (vfat on some) is left out, said on the console."""
        for point, number, offset, size, fstype in boot_entries(image, run.root):
            if not kernel_has(fstype):
                with open(console, "a") as log:
                    log.write(f"localcloud: {point} ({fstype}, partition {number}) not mounted: this host's kernel has no {fstype}\n")
                continue
            loop = sh("losetup", "--find", "--show", "--offset", str(offset), "--sizelimit", str(size), str(image))
            run.boot_loops.append(loop)
            self._mount(run, [*(["-o", "nouuid"] if fstype == "xfs" else []), loop, str(run.root / point.lstrip("/"))])

    def halt(self, instance_id: str):
        """Ends every process of the instance and unmounts its root volume."""
        with self.lock:
            run = self.running.pop(instance_id, None)
            if run is None:
                return
            if run.process and run.process.poll() is None:
                # The namespace's PID 1 dies with its parent (--kill-child); its children follow.
                os.killpg(run.process.pid, signal.SIGKILL)
                run.process.wait(timeout=STOP_TIMEOUT)
            errors = []
            for target in reversed(run.mounts):
                for _ in range(UMOUNT_ATTEMPTS):
                    if subprocess.run(["umount", target], capture_output=True).returncode == 0:
                        break
                    time.sleep(0.1)
                else:
                    errors.append(target)
            for loop in [*run.boot_loops, run.loop]:
                subprocess.run(["losetup", "-d", loop], capture_output=True)
            if errors:
                raise DataPlaneError(f"{instance_id}: could not unmount {', '.join(errors)}")

    def console(self, instance_id) -> str:
        """What the instance has printed to its console, its last 64 KiB."""
        try:
            with open(self.dir / instance_id / "console.log", "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - CONSOLE_BYTES))
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def sync(self, instance_id):
        """Writes what a running instance's filesystems hold in memory to its volume (its root,
        and /boot and /boot/efi where they are their own), as a CreateImage snapshot sees it."""
        with self.lock:
            run = self.running.get(instance_id)
            if run is None:
                return
            points = [run.root, *(run.root / p.lstrip("/") for p in ("/boot", "/boot/efi")
                                  if str(run.root / p.lstrip("/")) in run.mounts)]
        for point in points:
            subprocess.run(["sync", "-f", str(point)], capture_output=True)

    def is_running(self, instance_id):
        return instance_id in self.running

    def teardown(self):
        failures = []
        for instance_id in list(self.running):
            try:
                self.halt(instance_id)
            except Exception as e:
                failures.append(str(e))
        return failures


def filesystem_type(device: str) -> str:
    r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", device], capture_output=True, text=True)
    return r.stdout.strip()


def root_partition(image: Path):
    """(number, offset, size) of the partition an instance boots as its root, or None for an
    unpartitioned disk: on every vendor's layout the root is the largest partition holding
    ext4 or XFS (Ubuntu's /boot on 16 and RHEL's on 3 are smaller), as the boot loader's
    `root=` names it there."""
    parts = partitions(image)
    if not parts:
        return None
    roots = []
    for number, offset, size in parts:
        r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", "--offset", str(offset), str(image)],
                           capture_output=True, text=True)
        if r.stdout.strip() in ("ext4", "xfs"):
            roots.append((size, number, offset))
    if not roots:
        return parts[0]
    size, number, offset = max(roots)
    return number, offset, size


def kernel_has(fstype: str) -> bool:
    return any(line.split()[-1] == fstype for line in Path("/proc/filesystems").read_text().splitlines() if line.split())


# fstab's source keys, and what blkid or the partition table calls them.
FSTAB_KEYS = {"UUID": "UUID", "LABEL": "LABEL", "PARTUUID": "PARTUUID"}


def boot_entries(image: Path, root: Path):
    """(mount point, partition number, offset, size, filesystem type) of each /boot and
    /boot/efi line of the root's fstab, parents first, found among the image's partitions by
    UUID=, LABEL= or PARTUUID=."""
    try:
        fstab = (root / "etc/fstab").read_text()
    except OSError:
        return []
    wanted = []
    for line in fstab.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not fields[0].startswith("#") and fields[1] in ("/boot", "/boot/efi") and "=" in fields[0]:
            key, value = fields[0].split("=", 1)
            if key in FSTAB_KEYS:
                wanted.append((fields[1], key, value.strip('"')))
    if not wanted:
        return []
    table = json.loads(sh("sfdisk", "--json", str(image)))["partitiontable"]
    sector = table.get("sectorsize", 512)
    found = []
    for part in table.get("partitions", []):
        number = int(part["node"].rsplit(str(image), 1)[-1])
        offset, size = part["start"] * sector, part["size"] * sector
        probe = subprocess.run(["blkid", "-p", "-o", "export", "--offset", str(offset), "--size", str(size), str(image)],
                               capture_output=True, text=True).stdout
        ids = dict(line.split("=", 1) for line in probe.splitlines() if "=" in line)
        ids["PARTUUID"] = part.get("uuid", "").lower()
        for point, key, value in wanted:
            if ids.get(key, "").lower() == value.lower() and ids.get("TYPE"):
                found.append((point, number, offset, size, ids["TYPE"]))
    return sorted(found, key=lambda entry: len(entry[0]))


def default_user(root: Path):
    users = {line.split(":")[0]: line.split(":")[5] for line in (root / "etc/passwd").read_text().splitlines() if line.count(":") >= 6}
    for name in DEFAULT_USERS:
        if name in users:
            return name, users[name]
    return "root", "/root"


def first_boot(root: Path, instance_id: str, private_ip: str, public_key: str | None, console: Path):
    """What cloud-init does: host keys, the key pair's key, hostname, hosts, resolv.conf, and
    the host keys printed to the console."""
    if not list((root / "etc/ssh").glob("ssh_host_*_key")):
        subprocess.run(["chroot", str(root), "ssh-keygen", "-A"], check=True, capture_output=True)
    hostname = "ip-" + private_ip.replace(".", "-")
    print_host_keys(root, console)
    (root / "etc/hostname").write_text(hostname + "\n")
    hosts = root / "etc/hosts"
    text = hosts.read_text() if hosts.exists() else ""
    if hostname not in text:
        hosts.write_text(text + f"{private_ip} {hostname}\n")
    resolv = root / "etc/resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    resolv.write_text(Path("/etc/resolv.conf").read_text())
    if public_key:
        user, home = default_user(root)
        ssh_dir = root / home.lstrip("/") / ".ssh"
        ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        keys = ssh_dir / "authorized_keys"
        existing = keys.read_text() if keys.exists() else ""
        if public_key.strip() not in existing:
            keys.write_text(existing + public_key.strip() + "\n")
        keys.chmod(0o600)
        subprocess.run(["chroot", str(root), "chown", "-R", f"{user}:", home + "/.ssh"], check=True, capture_output=True)


def print_host_keys(root: Path, console: Path):
    """The blocks cloud-init's write-ssh-key-fingerprints prints, as on an EC2 console."""
    keys = sorted((root / "etc/ssh").glob("ssh_host_*_key.pub"))
    fingerprints = [sh("ssh-keygen", "-l", "-E", "sha256", "-f", str(k)) for k in keys]
    lines = ["ec2: #############################################################",
             "ec2: -----BEGIN SSH HOST KEY FINGERPRINTS-----",
             *[f"ec2: {f}" for f in fingerprints],
             "ec2: -----END SSH HOST KEY FINGERPRINTS-----",
             "ec2: #############################################################",
             "-----BEGIN SSH HOST KEY KEYS-----",
             *[k.read_text().strip() for k in keys],
             "-----END SSH HOST KEY KEYS-----"]
    with open(console, "a") as f:
        f.write("\n".join(lines) + "\n")


def replace_host_keys(root: Path):
    """Other host keys than the console printed: the keys of a machine that is not the
    instance."""
    for key in (root / "etc/ssh").glob("ssh_host_*_key*"):
        key.unlink()
    subprocess.run(["chroot", str(root), "ssh-keygen", "-A"], check=True, capture_output=True)


def wait_for_port(host, port, process, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DataPlaneError(f"sshd on {host} exited with {process.returncode} while booting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise DataPlaneError(f"sshd on {host}:{port} did not answer within {timeout}s")

"""The EBS direct APIs, on the data plane: StartSnapshot, PutSnapshotBlock, CompleteSnapshot,
ListSnapshotBlocks, ListChangedBlocks and GetSnapshotBlock, served to the AWS SDKs as EBS
serves them (REST-JSON under /snapshots, the same endpoint variables).

A snapshot's blocks are the 512 KiB blocks of its sparse file in the data plane, so what is
put here is what export-snapshot, CreateVolume and RegisterImage see. A child started from a
parent begins as a copy of the parent's file (its blocks plus the child's own). A started
snapshot is an EC2 snapshot in moto (`pending`, VolumeId vol-ffffffff as EBS reports it) from
StartSnapshot on, and `completed` some time after CompleteSnapshot, that time following the
blocks written, as CreateSnapshot's does.

Validation follows EBS: the block size, the SHA-256 checksum and its algorithm, the index
range, puts only while pending, reads only of completed snapshots the account owns (public
snapshots are not served), a parent that is completed and owned, encryption that a child
takes from its parent. Request rates are throttled per snapshot or per account as EBS's quotas
say, and each block call takes the latency profile's `block_call` (100 ms in "realistic").
"""

import base64
import hashlib
import json
import os
import threading
import time
from collections import defaultdict, deque

BLOCK_SIZE = 512 * 1024
BLOCKS_PER_GIB = (1 << 30) // BLOCK_SIZE
MAX_VOLUME_GIB = 64 * 1024
DEFAULT_TIMEOUT_MINUTES = 60
TOKEN_LIFETIME = 7 * 24 * 3600
# Requests per second EBS serves before it throttles (the service quotas' defaults): per
# snapshot for PutSnapshotBlock and the listings, per account for GetSnapshotBlock and the rest.
RATE_LIMITS = {"PutSnapshotBlock": 1000, "GetSnapshotBlock": 1000, "ListSnapshotBlocks": 50,
               "ListChangedBlocks": 50, "StartSnapshot": 10, "CompleteSnapshot": 10}
PER_SNAPSHOT = {"PutSnapshotBlock", "ListSnapshotBlocks", "ListChangedBlocks", "CompleteSnapshot"}
BLOCK_CALLS = {"PutSnapshotBlock", "GetSnapshotBlock"}
# EBS-direct snapshots have no volume; EC2 describes them with this one.
NO_VOLUME = "vol-ffffffff"


class EbsError(Exception):
    def __init__(self, status, code, reason, message):
        super().__init__(message)
        self.status, self.code, self.reason, self.message = status, code, reason, message


def invalid(reason, message):
    return EbsError(400, "ValidationException", reason, message)


def not_found(snapshot_id):
    return EbsError(404, "ResourceNotFoundException", "SNAPSHOT_NOT_FOUND", f"The snapshot '{snapshot_id}' does not exist.")


class NoVolume:
    """What moto's Snapshot asks of its volume, for a snapshot that never had one."""

    def __init__(self, size_gib):
        self.id = NO_VOLUME
        self.size = size_gib
        self.snapshot_id = None
        self.kms_key_id = None


class Started:
    """A snapshot begun with StartSnapshot: what was put into it, until it is completed."""

    def __init__(self, snapshot_id, parent, size_gib, token, params, deadline):
        self.snapshot_id = snapshot_id
        self.parent = parent
        self.size_gib = size_gib
        self.token = token
        self.params = params
        self.deadline = deadline
        self.digests = {}  # block index -> raw SHA-256 of what was put there
        self.started_at = time.time()
        self.completed = False


class EbsDirect:
    def __init__(self, dataplane, timing, ec2_backend, block_rate=None):
        self.dataplane = dataplane
        self.timing = timing
        # `localcloud up --block-rate N`: the block calls' limit, lowered so a test reaches it.
        self.limits = {**RATE_LIMITS, **({a: block_rate for a in BLOCK_CALLS} if block_rate else {})}
        self.ec2 = ec2_backend  # () -> the region's moto EC2 backend
        self.lock = threading.RLock()
        self.started: dict[str, Started] = {}
        self.by_token: dict[str, str] = {}
        self.rates = defaultdict(deque)  # (action, scope) -> request times of the last second, oldest first

    # -- routing ---------------------------------------------------------------------------

    @staticmethod
    def action_of(method, path):
        parts = [p for p in path.split("/") if p]
        if method == "POST" and parts == ["snapshots"]:
            return "StartSnapshot", {}
        if method == "POST" and len(parts) == 3 and parts[1] == "completion":
            return "CompleteSnapshot", {"SnapshotId": parts[2]}
        if len(parts) >= 2 and parts[0] == "snapshots":
            ids = {"SnapshotId": parts[1]}
            if method == "PUT" and len(parts) == 4 and parts[2] == "blocks":
                return "PutSnapshotBlock", {**ids, "BlockIndex": parts[3]}
            if method == "GET" and len(parts) == 4 and parts[2] == "blocks":
                return "GetSnapshotBlock", {**ids, "BlockIndex": parts[3]}
            if method == "GET" and len(parts) == 3 and parts[2] == "blocks":
                return "ListSnapshotBlocks", ids
            if method == "GET" and len(parts) == 3 and parts[2] == "changedblocks":
                return "ListChangedBlocks", ids
        return None, {}

    def handle(self, action, ids, request):
        """(status, headers, body) for one request, or raises EbsError."""
        self.throttle(action, ids.get("SnapshotId", "account") if action in PER_SNAPSHOT else "account")
        if action in BLOCK_CALLS and self.timing.profile["block_call"]:
            # The call's round trip, which calls in flight together spend side by side.
            time.sleep(self.timing.profile["block_call"])
        handler = {
            "StartSnapshot": self.start_snapshot,
            "PutSnapshotBlock": self.put_snapshot_block,
            "CompleteSnapshot": self.complete_snapshot,
            "ListSnapshotBlocks": self.list_snapshot_blocks,
            "ListChangedBlocks": self.list_changed_blocks,
            "GetSnapshotBlock": self.get_snapshot_block,
        }[action]
        with self.lock:
            self.expire()
            if action not in BLOCK_CALLS:
                return handler(ids, request)
        # A block's data is read or written, and hashed, outside the lock (hashlib lets other
        # threads run meanwhile), as EBS serves block calls side by side; each takes the lock
        # for what it reads or changes of the snapshots' state.
        return handler(ids, request)

    def throttle(self, action, scope):
        limit = self.limits.get(action)
        if not limit:
            return
        with self.lock:
            now = time.monotonic()
            recent = self.rates[(action, scope)]
            while recent and now - recent[0] >= 1.0:
                recent.popleft()
            if len(recent) >= limit:
                raise EbsError(400, "RequestThrottledException", "RESOURCE_LEVEL_THROTTLE",
                               f"{action} on {scope} is over {limit} requests per second")
            recent.append(now)

    def expire(self):
        """A started snapshot not completed within its Timeout goes to `error`."""
        now = time.monotonic()
        for started in self.started.values():
            if not started.completed and now > started.deadline:
                snapshot = self.ec2().snapshots.get(started.snapshot_id)
                if snapshot is not None:
                    snapshot.__dict__["_status"] = "error"
                started.completed = True

    # -- helpers ---------------------------------------------------------------------------

    def snapshot(self, snapshot_id):
        """The EC2 snapshot, visible and owned by this account."""
        backend = self.ec2()
        snapshot = backend.snapshots.get(snapshot_id)
        if snapshot is None or self.timing.hidden(snapshot_id):
            raise not_found(snapshot_id)
        if snapshot.owner_id != backend.account_id:
            raise EbsError(403, "AccessDeniedException", "UNAUTHORIZED_ACCOUNT",
                           f"The snapshot '{snapshot_id}' is not owned by this account; public and shared snapshots are not served by the EBS direct APIs")
        return snapshot

    def readable(self, snapshot_id):
        snapshot = self.snapshot(snapshot_id)
        if snapshot.status != "completed":
            raise invalid("INVALID_SNAPSHOT_ID", f"The snapshot '{snapshot_id}' is {snapshot.status}; only completed snapshots can be read")
        return snapshot

    def lineage(self, snapshot_id):
        """The snapshot and its ancestors: parents of EBS-direct children, the source
        snapshots of the volumes EC2 snapshots were taken of."""
        chain, current = [], snapshot_id
        backend = self.ec2()
        while current and current not in chain:
            chain.append(current)
            started = self.started.get(current)
            if started is not None:
                current = started.parent
                continue
            snapshot = backend.snapshots.get(current)
            volume = getattr(snapshot, "volume", None)
            current = getattr(volume, "snapshot_id", None)
        return chain

    def allocated_blocks(self, snapshot_id):
        """Indexes of the 512 KiB blocks of the snapshot's file that hold data."""
        path = self.dataplane.snapshot_file(snapshot_id)
        blocks = set()
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return blocks
        try:
            size = os.fstat(fd).st_size
            offset = 0
            while offset < size:
                try:
                    start = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError:
                    break
                end = os.lseek(fd, start, os.SEEK_HOLE)
                blocks.update(range(start // BLOCK_SIZE, (end - 1) // BLOCK_SIZE + 1))
                offset = end
        finally:
            os.close(fd)
        return blocks

    def read_block(self, snapshot_id, index):
        with open(self.dataplane.snapshot_file(snapshot_id), "rb") as f:
            f.seek(index * BLOCK_SIZE)
            data = f.read(BLOCK_SIZE)
        return data + b"\0" * (BLOCK_SIZE - len(data))

    def differing_blocks(self, first, second):
        """The blocks whose data differs between two snapshots (a block one holds and the
        other does not counts, unless both read as zeros)."""
        candidates = self.allocated_blocks(first) | self.allocated_blocks(second)
        return sorted(i for i in candidates if self.read_block(first, i) != self.read_block(second, i))

    @staticmethod
    def token(snapshot_id, index):
        raw = json.dumps({"s": snapshot_id, "i": index, "e": time.time() + TOKEN_LIFETIME})
        return base64.b64encode(raw.encode()).decode()

    @staticmethod
    def check_token(token, snapshot_id, index):
        try:
            value = json.loads(base64.b64decode(token))
            ok = value["s"] == snapshot_id and value["i"] == index and value["e"] > time.time()
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise invalid("INVALID_BLOCK_TOKEN", f"The block token is not valid for block {index} of {snapshot_id}")

    @staticmethod
    def page(request, total):
        """(start, size) of the page a list request asks for."""
        token = request.args.get("pageToken")
        if token:
            try:
                start = int(json.loads(base64.b64decode(token))["next"])
            except (ValueError, KeyError, TypeError):
                raise invalid("INVALID_PAGE_TOKEN", "The page token is not valid")
        else:
            start = request.args.get("startingBlockIndex", "0")
            if not start.isdigit():
                raise invalid("INVALID_PARAMETER_VALUE", f"startingBlockIndex {start!r} is not a block index")
            start = int(start)
        size = request.args.get("maxResults", "10000")
        if not size.isdigit():
            raise invalid("INVALID_PARAMETER_VALUE", f"maxResults {size!r} is not a number")
        size = int(size)
        if not 100 <= size <= 10000:
            raise invalid("INVALID_PARAMETER_VALUE", f"maxResults {size} is not between 100 and 10000")
        return start, size

    @staticmethod
    def next_token(after):
        return base64.b64encode(json.dumps({"next": after}).encode()).decode()

    # -- the actions -----------------------------------------------------------------------

    def start_snapshot(self, _ids, request):
        try:
            body = json.loads(request.get_data() or b"{}")
        except ValueError:
            raise invalid("INVALID_PARAMETER_VALUE", "The request body is not JSON")
        backend = self.ec2()
        size = body.get("VolumeSize")
        if not isinstance(size, int) or not 1 <= size <= MAX_VOLUME_GIB:
            raise invalid("INVALID_VOLUME_SIZE", f"VolumeSize {size!r} is not a size in GiB between 1 and {MAX_VOLUME_GIB}")
        token = body.get("ClientToken")
        params = {k: v for k, v in body.items() if k != "ClientToken"}
        if token and token in self.by_token:
            started = self.started[self.by_token[token]]
            if started.params != params:
                raise EbsError(409, "ConflictException", None, "The ClientToken was used with other parameters")
            return 201, {}, self.describe_started(started)
        parent_id = body.get("ParentSnapshotId")
        encrypted, kms_key = bool(body.get("Encrypted")), body.get("KmsKeyArn")
        parent = None
        if parent_id:
            parent = self.snapshot(parent_id)
            if parent.status != "completed":
                raise invalid("INVALID_PARAMETER_VALUE", f"The parent snapshot '{parent_id}' is {parent.status}, not completed")
            if "Encrypted" in body or kms_key:
                raise invalid("INVALID_PARAMETER_VALUE", "Encrypted and KmsKeyArn go with no ParentSnapshotId: a child is encrypted as its parent is")
            if size < parent.volume.size:
                raise invalid("INVALID_VOLUME_SIZE", f"VolumeSize {size} is smaller than the parent's {parent.volume.size} GiB")
            if getattr(backend, "ebs_encryption_by_default", False) and not parent.encrypted:
                raise invalid("INVALID_PARAMETER_VALUE", f"Encryption by default is on and the parent '{parent_id}' is not encrypted")
            encrypted, kms_key = parent.encrypted, parent.kms_key_id
        elif getattr(backend, "ebs_encryption_by_default", False):
            encrypted = True
        if encrypted and not kms_key:
            kms_key = f"arn:aws:kms:{backend.region_name}:{backend.account_id}:alias/aws/ebs"
        timeout = body.get("Timeout", DEFAULT_TIMEOUT_MINUTES)
        if not isinstance(timeout, int) or not 10 <= timeout <= 4320:
            raise invalid("INVALID_PARAMETER_VALUE", f"Timeout {timeout!r} is not between 10 and 4320 minutes")

        from moto.ec2.models.elastic_block_store import Snapshot
        from moto.ec2.utils import random_snapshot_id

        snapshot_id = random_snapshot_id()
        path = self.dataplane.snapshot_file(snapshot_id)
        with self.dataplane.lock:
            if parent is not None:
                from .dataplane import sparse_copy
                sparse_copy(self.dataplane.snapshot_file(parent_id), path)
            else:
                path.touch()
            if path.stat().st_size < size << 30:
                os.truncate(path, size << 30)
        snapshot = Snapshot(backend, snapshot_id, NoVolume(size), body.get("Description", ""), encrypted=encrypted, kms_key_id=kms_key)
        snapshot.__dict__["_status"] = "pending"
        backend.snapshots[snapshot_id] = snapshot
        tags = {t["Key"]: t["Value"] for t in body.get("Tags") or []}
        if tags:
            backend.create_tags([snapshot_id], tags)
        self.timing.created(snapshot_id)
        started = Started(snapshot_id, parent_id, size, token, params, time.monotonic() + timeout * 60)
        self.started[snapshot_id] = started
        if token:
            self.by_token[token] = snapshot_id
        return 201, {}, self.describe_started(started)

    def parent_of(self, snapshot_id):
        """The parent a StartSnapshot named for `snapshot_id`, if it was started here."""
        started = self.started.get(snapshot_id)
        return started.parent if started else None

    def describe_started(self, started):
        backend = self.ec2()
        snapshot = backend.snapshots.get(started.snapshot_id)
        tags = started.params.get("Tags") or []
        answer = {
            "SnapshotId": started.snapshot_id, "OwnerId": backend.account_id, "Status": "pending",
            "StartTime": started.started_at, "VolumeSize": started.size_gib, "BlockSize": BLOCK_SIZE, "Tags": tags,
            "Description": snapshot.description if snapshot else "",
            "SseType": ("sse-kms" if snapshot is not None and snapshot.encrypted else "none"),
        }
        if started.parent:
            answer["ParentSnapshotId"] = started.parent
        if snapshot is not None and snapshot.kms_key_id:
            answer["KmsKeyArn"] = snapshot.kms_key_id
        return answer

    def pending_started(self, snapshot_id):
        started = self.started.get(snapshot_id)
        if started is not None and snapshot_id not in self.ec2().snapshots:
            del self.started[snapshot_id]  # deleted through EC2 while pending
            started = None
        if started is None:
            self.snapshot(snapshot_id)  # NotFound, or not ours
            raise invalid("INVALID_SNAPSHOT_ID", f"The snapshot '{snapshot_id}' was not started with StartSnapshot")
        if self.timing.hidden(snapshot_id):
            raise not_found(snapshot_id)
        if started.completed:
            raise invalid("INVALID_SNAPSHOT_ID", f"The snapshot '{snapshot_id}' is no longer pending: blocks can be put only before CompleteSnapshot")
        return started

    def put_snapshot_block(self, ids, request):
        snapshot_id = ids["SnapshotId"]
        with self.lock:
            started = self.pending_started(snapshot_id)
        try:
            index = int(ids["BlockIndex"])
        except ValueError:
            raise invalid("INVALID_BLOCK", f"The block index {ids['BlockIndex']!r} is not a number")
        if not 0 <= index < started.size_gib * BLOCKS_PER_GIB:
            raise invalid("INVALID_BLOCK", f"The block index {index} is outside the snapshot's {started.size_gib * BLOCKS_PER_GIB} blocks")
        data = damaged(request, request.get_data())
        declared = request.headers.get("x-amz-Data-Length")
        if declared != str(BLOCK_SIZE) or len(data) != BLOCK_SIZE:
            raise invalid("INVALID_PARAMETER_VALUE", f"A block is {BLOCK_SIZE} bytes; got {len(data)} (x-amz-Data-Length {declared})")
        algorithm = request.headers.get("x-amz-Checksum-Algorithm")
        if algorithm != "SHA256":
            raise invalid("INVALID_PARAMETER_VALUE", f"x-amz-Checksum-Algorithm {algorithm!r}: only SHA256 is supported")
        digest = hashlib.sha256(data).digest()
        if request.headers.get("x-amz-Checksum") != base64.b64encode(digest).decode():
            raise invalid("INVALID_PARAMETER_VALUE", f"The checksum does not match the data of block {index}")
        # Checked again with the write: CompleteSnapshot, the snapshot's timeout or its
        # deletion may have come while the block was read and hashed, and a block is never
        # written into a snapshot that is no longer pending.
        with self.lock:
            self.expire()
            started = self.pending_started(snapshot_id)
            with self.dataplane.lock:
                fd = os.open(self.dataplane.snapshot_file(snapshot_id), os.O_WRONLY)
                try:
                    os.pwrite(fd, data, index * BLOCK_SIZE)
                finally:
                    os.close(fd)
            started.digests[index] = digest
        headers = {"x-amz-Checksum": base64.b64encode(digest).decode(), "x-amz-Checksum-Algorithm": "SHA256"}
        return 201, headers, None

    def complete_snapshot(self, ids, request):
        snapshot_id = ids["SnapshotId"]
        started = self.pending_started(snapshot_id)
        count = request.headers.get("x-amz-ChangedBlocksCount")
        if count is None or int(count) != len(started.digests):
            raise invalid("INVALID_PARAMETER_VALUE", f"x-amz-ChangedBlocksCount {count} is not the {len(started.digests)} blocks written")
        checksum = request.headers.get("x-amz-Checksum")
        if checksum is not None:
            method = request.headers.get("x-amz-Checksum-Aggregation-Method")
            if method != "LINEAR" or request.headers.get("x-amz-Checksum-Algorithm") != "SHA256":
                raise invalid("INVALID_PARAMETER_VALUE", "The aggregated checksum must be SHA256, aggregated LINEAR")
            linear = hashlib.sha256(b"".join(started.digests[i] for i in sorted(started.digests))).digest()
            if checksum != base64.b64encode(linear).decode():
                raise invalid("INVALID_PARAMETER_VALUE", "The aggregated checksum does not match the blocks written")
        started.completed = True
        snapshot = self.ec2().snapshots[snapshot_id]
        snapshot.__dict__["_status"] = "completed"
        written = len(started.digests) * BLOCK_SIZE
        seconds = self.timing.profile["snapshot_base"] + self.timing.profile["snapshot_per_10mb"] * written / 10e6
        self.timing.start(("snapshot", snapshot_id), seconds)
        return 202, {}, {"Status": "pending"}

    def list_snapshot_blocks(self, ids, request):
        snapshot_id = ids["SnapshotId"]
        snapshot = self.readable(snapshot_id)
        blocks = sorted(self.allocated_blocks(snapshot_id))
        start, size = self.page(request, len(blocks))
        chosen = [i for i in blocks if i >= start][:size]
        answer = {"Blocks": [{"BlockIndex": i, "BlockToken": self.token(snapshot_id, i)} for i in chosen],
                  "ExpiryTime": time.time() + TOKEN_LIFETIME, "VolumeSize": snapshot.volume.size, "BlockSize": BLOCK_SIZE}
        if chosen and any(i > chosen[-1] for i in blocks):
            answer["NextToken"] = self.next_token(chosen[-1] + 1)
        return 200, {}, answer

    def list_changed_blocks(self, ids, request):
        second = ids["SnapshotId"]
        first = request.args.get("firstSnapshotId")
        second_snapshot = self.readable(second)
        if first:
            self.readable(first)
            if not set(self.lineage(first)) & set(self.lineage(second)):
                raise invalid("UNRELATED_SNAPSHOTS", f"'{first}' and '{second}' are not of the same volume or snapshot lineage")
            changed = self.differing_blocks(first, second)
        else:
            changed = sorted(self.allocated_blocks(second))
        start, size = self.page(request, len(changed))
        chosen = [i for i in changed if i >= start][:size]
        first_blocks = self.allocated_blocks(first) if first else set()
        answer = {"ChangedBlocks": [], "ExpiryTime": time.time() + TOKEN_LIFETIME,
                  "VolumeSize": second_snapshot.volume.size, "BlockSize": BLOCK_SIZE}
        second_blocks = self.allocated_blocks(second)
        for i in chosen:
            entry = {"BlockIndex": i}
            if i in first_blocks:
                entry["FirstBlockToken"] = self.token(first, i)
            if i in second_blocks:
                entry["SecondBlockToken"] = self.token(second, i)
            answer["ChangedBlocks"].append(entry)
        if chosen and any(i > chosen[-1] for i in changed):
            answer["NextToken"] = self.next_token(chosen[-1] + 1)
        return 200, {}, answer

    def get_snapshot_block(self, ids, request):
        snapshot_id = ids["SnapshotId"]
        with self.lock:
            self.readable(snapshot_id)
        try:
            index = int(ids["BlockIndex"])
        except ValueError:
            raise invalid("INVALID_BLOCK", f"The block index {ids['BlockIndex']!r} is not a number")
        self.check_token(request.args.get("blockToken", ""), snapshot_id, index)
        try:
            data = self.read_block(snapshot_id, index)
        except FileNotFoundError:  # deleted since it was found readable
            raise not_found(snapshot_id)
        headers = {"x-amz-Data-Length": str(len(data)), "x-amz-Checksum-Algorithm": "SHA256",
                   "x-amz-Checksum": base64.b64encode(hashlib.sha256(data).digest()).decode(),
                   "Content-Type": "application/octet-stream"}
        return 200, headers, damaged(request, data)


# How a block's data is damaged on its way (`localcloud fault ACTION --corrupt KIND`).
DAMAGE = ("flip", "short", "long")
DAMAGED_BY = 64 * 1024


def damaged(request, data):
    """`data` as the call's `corrupt` fault damages it: its middle byte flipped, its last
    64 KiB cut off, or 64 KiB more after its end."""
    kind = request.environ.get("localcloud.damaged")
    if not kind or not data:
        return data
    if kind == "short":
        return data[:-DAMAGED_BY]
    if kind == "long":
        return data + b"\xa5" * DAMAGED_BY
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def error_body(error: EbsError):
    body = {"message": error.message}
    if error.reason:
        body["Reason"] = error.reason
    return json.dumps(body)



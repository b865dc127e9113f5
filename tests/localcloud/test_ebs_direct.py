"""The local cloud's EBS direct APIs, through boto3 as any SDK would reach them."""

import base64
import hashlib
import os
import time

import pytest
from botocore.exceptions import ClientError

from lc.images import CACHE
from test_localcloud import root_snapshot, vendor_image, wait_until

BLOCK = 512 * 1024


def checksum(data):
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def linear(blocks):
    """The aggregated checksum of CompleteSnapshot: SHA-256 over the blocks' digests in
    index order."""
    digests = b"".join(hashlib.sha256(blocks[i]).digest() for i in sorted(blocks))
    return base64.b64encode(hashlib.sha256(digests).digest()).decode()


def put(ebs, snapshot_id, index, data):
    return ebs.put_snapshot_block(SnapshotId=snapshot_id, BlockIndex=index, BlockData=data, DataLength=len(data),
                                  Checksum=checksum(data), ChecksumAlgorithm="SHA256")


def complete(ebs, snapshot_id, blocks):
    return ebs.complete_snapshot(SnapshotId=snapshot_id, ChangedBlocksCount=len(blocks), Checksum=linear(blocks),
                                 ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR")


def snapshot_state(ec2, snapshot_id):
    return ec2.describe_snapshots(SnapshotIds=[snapshot_id])["Snapshots"][0]["State"]


def owned_snapshot(ec2):
    """A completed snapshot of this account holding the Debian root: EBS direct serves no
    public snapshot, so a vendor's is copied through a volume first."""
    vendor = root_snapshot(vendor_image(ec2))
    vol = ec2.create_volume(SnapshotId=vendor, AvailabilityZone="us-east-1a")["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"], lambda s: s == "available")
    snap = ec2.create_snapshot(VolumeId=vol)["SnapshotId"]
    wait_until(lambda: snapshot_state(ec2, snap), lambda s: s == "completed")
    ec2.delete_volume(VolumeId=vol)
    return snap


def error(call):
    with pytest.raises(ClientError) as e:
        call()
    return e.value.response["Error"]["Code"], e.value.response.get("Reason") or e.value.response["Error"].get("Reason")


def test_a_child_holds_its_parents_blocks_and_its_own_and_ec2_sees_the_same_bytes(cloud, tmp_path):
    ec2, ebs = cloud.client("ec2"), cloud.client("ebs")
    parent = owned_snapshot(ec2)
    listed = ebs.list_snapshot_blocks(SnapshotId=parent)
    assert listed["BlockSize"] == BLOCK and listed["VolumeSize"] == 8
    blocks = {b["BlockIndex"]: b["BlockToken"] for b in listed["Blocks"]}
    assert 0 in blocks and len(blocks) > 10
    first = ebs.get_snapshot_block(SnapshotId=parent, BlockIndex=0, BlockToken=blocks[0])
    block0 = first["BlockData"].read()
    assert len(block0) == BLOCK and first["Checksum"] == checksum(block0) and block0 != b"\0" * BLOCK
    kept = max(blocks)
    kept_data = ebs.get_snapshot_block(SnapshotId=parent, BlockIndex=kept, BlockToken=blocks[kept])["BlockData"].read()

    started = ebs.start_snapshot(VolumeSize=8, ParentSnapshotId=parent, ClientToken="child-1",
                                 Tags=[{"Key": "amibake:build-id", "Value": "ab-test"}], Description="child")
    child = started["SnapshotId"]
    assert started["Status"] == "pending" and started["ParentSnapshotId"] == parent and started["BlockSize"] == BLOCK
    assert ebs.start_snapshot(VolumeSize=8, ParentSnapshotId=parent, ClientToken="child-1",
                              Tags=[{"Key": "amibake:build-id", "Value": "ab-test"}], Description="child")["SnapshotId"] == child
    described = ec2.describe_snapshots(SnapshotIds=[child])["Snapshots"][0]
    assert described["State"] == "pending" and described["VolumeId"] == "vol-ffffffff"
    assert {"Key": "amibake:build-id", "Value": "ab-test"} in described["Tags"]

    changed0 = b"amibake" + block0[7:]
    # A block the parent never wrote (its last holds the backup GPT).
    far = next(i for i in range(8 * 2048 - 1, 0, -1) if i not in blocks)
    written = {0: changed0, far: b"\x5a" * BLOCK}
    for index, data in written.items():
        assert put(ebs, child, index, data)["Checksum"] == checksum(data)
    assert complete(ebs, child, written)["Status"] == "pending"
    wait_until(lambda: snapshot_state(ec2, child), lambda s: s == "completed")

    changed = ebs.list_changed_blocks(FirstSnapshotId=parent, SecondSnapshotId=child)["ChangedBlocks"]
    assert [c["BlockIndex"] for c in changed] == [0, far]
    assert "FirstBlockToken" in changed[0] and "FirstBlockToken" not in changed[1]
    count = cloud.cli("changed-blocks", parent, child).stdout.strip()
    assert count == "2"
    child_blocks = {b["BlockIndex"] for b in ebs.list_snapshot_blocks(SnapshotId=child)["Blocks"]}
    assert set(blocks) | {far} <= child_blocks, "the child holds its parent's blocks and its own"

    raw = tmp_path / "child.img"
    cloud.cli("export-snapshot", child, str(raw))
    with open(raw, "rb") as f:
        f.seek(0)
        assert f.read(BLOCK) == changed0
        f.seek(far * BLOCK)
        assert f.read(BLOCK) == b"\x5a" * BLOCK
        f.seek(kept * BLOCK)
        assert f.read(BLOCK) == kept_data
    vol = ec2.create_volume(SnapshotId=child, AvailabilityZone="us-east-1a")["VolumeId"]
    wait_until(lambda: ec2.describe_volumes(VolumeIds=[vol])["Volumes"][0]["State"], lambda s: s == "available")
    ec2.delete_volume(VolumeId=vol)
    ec2.delete_snapshot(SnapshotId=child)
    ec2.delete_snapshot(SnapshotId=parent)


def test_requests_ebs_refuses_are_refused_with_its_errors(cloud):
    ec2, ebs = cloud.client("ec2"), cloud.client("ebs", retries=False)
    vendor = root_snapshot(vendor_image(ec2))
    assert error(lambda: ebs.list_snapshot_blocks(SnapshotId=vendor)) == ("AccessDeniedException", "UNAUTHORIZED_ACCOUNT")
    assert error(lambda: ebs.start_snapshot(VolumeSize=8, ParentSnapshotId=vendor))[0] == "AccessDeniedException"
    assert error(lambda: ebs.list_snapshot_blocks(SnapshotId="snap-0123456789abcdef0")) == ("ResourceNotFoundException", "SNAPSHOT_NOT_FOUND")
    parent = owned_snapshot(ec2)
    assert error(lambda: ebs.start_snapshot(VolumeSize=8, ParentSnapshotId=parent, Encrypted=True))[0] == "ValidationException"
    assert error(lambda: ebs.start_snapshot(VolumeSize=4, ParentSnapshotId=parent))[1] == "INVALID_VOLUME_SIZE"

    snap = ebs.start_snapshot(VolumeSize=1, ClientToken="validation")["SnapshotId"]
    assert error(lambda: ebs.start_snapshot(VolumeSize=2, ClientToken="validation"))[0] == "ConflictException"
    assert error(lambda: ebs.start_snapshot(VolumeSize=8, ParentSnapshotId=snap))[0] == "ValidationException", "a pending parent"
    data = b"\x01" * BLOCK
    bad_sum = lambda: ebs.put_snapshot_block(SnapshotId=snap, BlockIndex=0, BlockData=data, DataLength=BLOCK,  # noqa: E731
                                            Checksum=checksum(b"other"), ChecksumAlgorithm="SHA256")
    assert error(bad_sum)[0] == "ValidationException"
    short = b"\x01" * 4096
    assert error(lambda: put(ebs, snap, 0, short))[0] == "ValidationException"
    assert error(lambda: put(ebs, snap, 2048, data)) == ("ValidationException", "INVALID_BLOCK"), "1 GiB is blocks 0..2047"
    assert error(lambda: ebs.list_snapshot_blocks(SnapshotId=snap))[0] == "ValidationException", "not readable while pending"
    put(ebs, snap, 5, data)
    assert error(lambda: ebs.complete_snapshot(SnapshotId=snap, ChangedBlocksCount=2))[0] == "ValidationException"
    wrong = ebs.complete_snapshot
    assert error(lambda: wrong(SnapshotId=snap, ChangedBlocksCount=1, Checksum=linear({5: b"x" * BLOCK}),
                               ChecksumAlgorithm="SHA256", ChecksumAggregationMethod="LINEAR"))[0] == "ValidationException"
    complete(ebs, snap, {5: data})
    assert error(lambda: put(ebs, snap, 6, data))[0] == "ValidationException", "no put after completion"
    wait_until(lambda: snapshot_state(ec2, snap), lambda s: s == "completed")
    token = ebs.list_snapshot_blocks(SnapshotId=snap)["Blocks"][0]["BlockToken"]
    assert error(lambda: ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=6, BlockToken=token)) == ("ValidationException", "INVALID_BLOCK_TOKEN")
    assert error(lambda: ebs.list_changed_blocks(FirstSnapshotId=parent, SecondSnapshotId=snap)) == ("ValidationException", "UNRELATED_SNAPSHOTS")
    ec2.delete_snapshot(SnapshotId=snap)
    ec2.delete_snapshot(SnapshotId=parent)


def test_faults_throttling_and_a_fresh_snapshot_not_found_reach_ebs_clients(cloud):
    ec2, ebs = cloud.client("ec2"), cloud.client("ebs", retries=False)
    cloud.cli("consistency", "1")
    snap = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    assert error(lambda: put(ebs, snap, 0, b"\x02" * BLOCK))[0] == "ResourceNotFoundException", "not visible yet"
    cloud.cli("consistency", "0")
    wait_until(lambda: ebs_ok(lambda: put(ebs, snap, 0, b"\x02" * BLOCK)), lambda ok: ok, timeout=5)
    # Twice: boto3 retries a server error even when told to make one attempt.
    cloud.cli("fault", "PutSnapshotBlock", "--times", "2", "--error", "InternalServerException")
    assert error(lambda: put(ebs, snap, 1, b"\x03" * BLOCK))[0] == "InternalServerException"
    cloud.cli("fault", "--throttle", "100")
    assert error(lambda: put(ebs, snap, 1, b"\x03" * BLOCK))[0] == "RequestThrottledException"
    cloud.cli("fault", "--throttle", "0")
    put(ebs, snap, 1, b"\x03" * BLOCK)
    complete(ebs, snap, {0: b"\x02" * BLOCK, 1: b"\x03" * BLOCK})
    calls = [c for c in cloud.calls() if c["service"] == "ebs" and c["ids"].get("SnapshotId") == snap]
    codes = [c["code"] for c in calls if c["action"] == "PutSnapshotBlock"]
    assert codes[-1] == "OK" and "InternalServerException" in codes and "RequestThrottledException" in codes, codes
    wait_until(lambda: snapshot_state(ec2, snap), lambda s: s == "completed")
    ec2.delete_snapshot(SnapshotId=snap)


def test_a_damaged_block_is_refused_on_its_way_in_and_shows_on_its_way_out(cloud):
    ec2, ebs = cloud.client("ec2"), cloud.client("ebs", retries=False)
    snap = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    wait_until(lambda: ebs_ok(lambda: put(ebs, snap, 0, b"\x05" * BLOCK)), lambda ok: ok, timeout=5)
    # Damaged on its way in: EBS checks the data against the checksum sent with it.
    cloud.cli("fault", "PutSnapshotBlock", "--corrupt")
    assert error(lambda: put(ebs, snap, 1, b"\x06" * BLOCK)) == ("ValidationException", "INVALID_PARAMETER_VALUE")
    put(ebs, snap, 1, b"\x06" * BLOCK)
    # Cut short or grown on its way in: refused for its length.
    for kind in ("short", "long"):
        cloud.cli("fault", "PutSnapshotBlock", "--corrupt", kind)
        assert error(lambda: put(ebs, snap, 2, b"\x07" * BLOCK)) == ("ValidationException", "INVALID_PARAMETER_VALUE"), kind
    complete(ebs, snap, {0: b"\x05" * BLOCK, 1: b"\x06" * BLOCK})
    wait_until(lambda: snapshot_state(ec2, snap), lambda s: s == "completed")
    token = {b["BlockIndex"]: b["BlockToken"] for b in ebs.list_snapshot_blocks(SnapshotId=snap)["Blocks"]}
    # Damaged on its way out: the checksum names the block as stored, the data differs: a
    # byte flipped, cut short, or grown past the block's end.
    for kind, length in (("flip", BLOCK), ("short", BLOCK - 65536), ("long", BLOCK + 65536)):
        cloud.cli("fault", "GetSnapshotBlock", "--corrupt", kind)
        got = ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=1, BlockToken=token[1])
        data = got["BlockData"].read()
        assert got["Checksum"] == checksum(b"\x06" * BLOCK) and checksum(data) != got["Checksum"], kind
        assert (len(data), got["DataLength"]) == (length, BLOCK), kind
    got = ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=1, BlockToken=token[1])
    assert got["BlockData"].read() == b"\x06" * BLOCK
    # Aimed at one block: the calls naming others pass untouched and are not counted; the
    # call log names each call's block.
    before = len(cloud.calls())
    cloud.cli("fault", "GetSnapshotBlock", "--corrupt", "long", "--block", "1", "--after", "1")
    read = lambda i: ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=i, BlockToken=token[i])["BlockData"].read()
    assert [len(read(i)) for i in (0, 0, 1, 0, 1, 1)] == [BLOCK, BLOCK, BLOCK, BLOCK, BLOCK + 65536, BLOCK]
    gets = [c for c in cloud.calls()[before:] if c["action"] == "GetSnapshotBlock"]
    assert [c["ids"]["BlockIndex"] for c in gets] == ["0", "0", "1", "0", "1", "1"]
    ec2.delete_snapshot(SnapshotId=snap)


def ebs_ok(call):
    try:
        call()
        return True
    except ClientError:
        return False


def test_a_started_snapshot_the_account_deletes_is_gone_to_ebs_too(cloud):
    ec2, ebs = cloud.client("ec2"), cloud.client("ebs", retries=False)
    snap = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    ec2.delete_snapshot(SnapshotId=snap)
    assert error(lambda: put(ebs, snap, 0, b"\x04" * BLOCK))[0] == "ResourceNotFoundException"
    assert not (cloud.state / "snapshots" / f"{snap}.img").exists()



def test_a_copy_holds_what_its_source_held_when_copied_and_shares_its_file_only_with_a_final_one(cloud, tmp_path):
    """Files of snapshots no block is written into any more (a vendor's, a completed one) are
    shared, not copied: a small disk holds the clouds of a whole test run. A snapshot EBS
    direct is still writing is copied, so what it is given after the copy stays its own."""
    ec2, ebs = cloud.client("ec2"), cloud.client("ebs")
    file = lambda snapshot_id: cloud.state / "snapshots" / f"{snapshot_id}.img"
    vendor = root_snapshot(vendor_image(ec2))
    # A second name only where the cache and the state share a filesystem, else a copy.
    if os.stat(CACHE).st_dev == cloud.state.stat().st_dev:
        assert file(vendor).stat().st_nlink > 1, "a vendor's image is the image cache's file"

    parent = owned_snapshot(ec2)
    final_copy = ec2.copy_snapshot(SourceSnapshotId=parent, SourceRegion="us-east-1")["SnapshotId"]
    assert file(final_copy).stat().st_ino == file(parent).stat().st_ino

    child = ebs.start_snapshot(VolumeSize=8, ParentSnapshotId=parent)["SnapshotId"]
    before = {0: b"\x41" * BLOCK}
    put(ebs, child, 0, before[0])
    pending_copy = ec2.copy_snapshot(SourceSnapshotId=child, SourceRegion="us-east-1")["SnapshotId"]
    assert file(pending_copy).stat().st_ino != file(child).stat().st_ino
    after = {1: b"\x5a" * BLOCK}
    put(ebs, child, 1, after[1])
    complete(ebs, child, before | after)
    wait_until(lambda: snapshot_state(ec2, child), lambda s: s == "completed")

    for snapshot_id, block1 in [(child, after[1]), (pending_copy, None)]:
        raw = tmp_path / f"{snapshot_id}.img"
        cloud.cli("export-snapshot", snapshot_id, str(raw))
        with open(raw, "rb") as f:
            assert f.read(BLOCK) == before[0], snapshot_id
            if block1 is not None:
                assert f.read(BLOCK) == block1, snapshot_id
            else:
                assert f.read(BLOCK) != after[1], "a block put after the copy is not the copy's"
        raw.unlink()
    ec2.delete_snapshot(SnapshotId=final_copy)
    assert file(parent).stat().st_nlink == 1, "deleting a copy leaves its source's file"
    for snapshot_id in (pending_copy, child, parent):
        ec2.delete_snapshot(SnapshotId=snapshot_id)

def test_block_calls_take_their_latency_side_by_side_and_their_rate_is_per_snapshot_or_per_account(tmp_path):
    """A cloud of its own: a block call takes 0.3 s, and more than 4 block calls a second are
    throttled: puts per snapshot, gets per account (EBS's quotas)."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import leftovers, start, state_dir

    with state_dir("amibake-localcloud-blocks-") as state:
        cloud = start(state, "none", (), "--block-latency=0.3", "--block-rate=4")
        try:
            import boto3
            from botocore.config import Config

            ec2 = cloud.client("ec2")
            # One attempt in all: a retry, after its backoff, could land in the next second.
            ebs = boto3.client("ebs", endpoint_url=cloud.env["AWS_ENDPOINT_URL"], region_name=cloud.env["AWS_REGION"],
                               aws_access_key_id="localcloud", aws_secret_access_key="localcloud",
                               config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))
            parent = owned_snapshot(ec2)
            started = time.monotonic()
            ebs.get_snapshot_block(SnapshotId=parent, BlockIndex=0,
                                   BlockToken=ebs.list_snapshot_blocks(SnapshotId=parent)["Blocks"][0]["BlockToken"])
            assert time.monotonic() - started >= 0.3, "a block call takes the latency"

            # Puts: 4 a second on each snapshot, side by side (4 calls in well under 4 x 0.3 s).
            time.sleep(1.1)
            one, two = (ebs.start_snapshot(VolumeSize=1)["SnapshotId"] for _ in range(2))
            data = {i: bytes([i + 1]) * BLOCK for i in range(5)}
            with ThreadPoolExecutor(4) as pool:
                started = time.monotonic()
                list(pool.map(lambda i: put(ebs, one, i, data[i]), range(4)))
                side_by_side = time.monotonic() - started
            assert side_by_side < 4 * 0.3, f"4 calls in flight took {side_by_side:.2f} s"
            assert error(lambda: put(ebs, one, 4, data[4]))[0] == "RequestThrottledException", "the 5th within the second"
            put(ebs, two, 0, data[0])  # another snapshot's own rate

            # Gets: 4 a second for the whole account: 2 of each of two snapshots, then a third of
            # one of them is over the account's rate (it would not be over a snapshot's).
            complete(ebs, two, {0: data[0]})
            wait_until(lambda: snapshot_state(ec2, two), lambda s: s == "completed")
            time.sleep(1.1)
            blocks = [(snap, b) for snap in (parent, two) for b in ebs.list_snapshot_blocks(SnapshotId=snap)["Blocks"][:1]]
            get = lambda sb: ebs.get_snapshot_block(SnapshotId=sb[0], BlockIndex=sb[1]["BlockIndex"], BlockToken=sb[1]["BlockToken"])
            time.sleep(1.1)
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(get, blocks * 2))
            assert error(lambda: get(blocks[0]))[0] == "RequestThrottledException"
        finally:
            cloud.cli("down", check=False)
        assert leftovers(state) == []


def test_ebs_keeps_a_connection_alive_across_block_calls_and_ec2_closes_its_own(cloud):
    """As EBS does, and every SDK's client counts on: block calls on one connection, each
    answered whole, an error as well; the EC2 API's answers close theirs, as before."""
    import http.client
    from urllib.parse import urlsplit

    ebs = cloud.client("ebs")
    snap = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    url = urlsplit(cloud.env["AWS_ENDPOINT_URL"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    answers, ends = [], set()
    for index, data in ((0, b"\x04" * BLOCK), (1, b"\x05" * BLOCK), (2, b"short")):
        conn.request("PUT", f"/snapshots/{snap}/blocks/{index}", body=data, headers={
            "x-amz-Data-Length": str(BLOCK), "x-amz-Checksum": checksum(data), "x-amz-Checksum-Algorithm": "SHA256"})
        ends.add(conn.sock.getsockname())
        response = conn.getresponse()
        answers.append((response.status, response.read(), response.will_close))
    assert [(status, close) for status, _, close in answers] == [(201, False), (201, False), (400, False)], answers
    assert b"A block is 524288 bytes" in answers[2][1]
    assert len(ends) == 1, "every call went on the first connection"
    # A body whose length cannot be told: answered, and the connection closed, since what
    # follows on it could be read as the next call.
    conn.putrequest("PUT", f"/snapshots/{snap}/blocks/3")
    conn.putheader("Content-Length", "nope")
    conn.endheaders()
    response = conn.getresponse()
    assert (response.status, response.will_close) == (400, True), response.read()
    assert b"is not a length" in response.read()
    conn.close()
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", "/?Action=DescribeRegions&Version=2016-11-15")
    response = conn.getresponse()
    response.read()
    assert response.status == 200 and response.will_close
    conn.close()
    # Both blocks were written: CompleteSnapshot checks their count and linear checksum.
    complete(ebs, snap, {0: b"\x04" * BLOCK, 1: b"\x05" * BLOCK})
    wait_until(lambda: snapshot_state(cloud.client("ec2"), snap), lambda s: s == "completed")
    # A parameter EBS would refuse is refused as EBS does, on a connection kept alive.
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("GET", f"/snapshots/{snap}/blocks?maxResults=many")
    response = conn.getresponse()
    assert (response.status, response.will_close) == (400, False), response.read()
    assert b"maxResults 'many' is not a number" in response.read()
    conn.close()
    cloud.client("ec2").delete_snapshot(SnapshotId=snap)


def test_a_block_sent_in_pieces_is_read_whole_and_one_cut_short_is_never_written(cloud):
    """The server reads a body as the network hands it over: with the headers, in pieces
    after a pause, and the next call right behind it on the same connection. A body whose
    connection closes before its end is no block, and the server serves on."""
    import socket
    from urllib.parse import urlsplit

    ebs = cloud.client("ebs")
    snap = ebs.start_snapshot(VolumeSize=1)["SnapshotId"]
    url = urlsplit(cloud.env["AWS_ENDPOINT_URL"])

    def request(index, data):
        return (f"PUT /snapshots/{snap}/blocks/{index} HTTP/1.1\r\nHost: {url.hostname}\r\n"
                f"Content-Length: {BLOCK}\r\nx-amz-Data-Length: {BLOCK}\r\n"
                f"x-amz-Checksum: {checksum(data)}\r\nx-amz-Checksum-Algorithm: SHA256\r\n\r\n").encode()

    first, second = os.urandom(BLOCK), os.urandom(BLOCK)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(request(0, first) + first[:1000])
        time.sleep(0.2)
        sock.sendall(first[1000:300_000])
        time.sleep(0.2)
        # The first body's end and the whole second call in one send.
        sock.sendall(first[300_000:] + request(1, second) + second)
        answers = b""
        while answers.count(b"HTTP/1.1 ") < 2 or not answers.endswith(b"\r\n\r\n"):
            piece = sock.recv(65536)
            assert piece, f"the server closed the connection: {answers!r}"
            answers += piece
    assert [line for line in answers.split(b"\r\n") if line.startswith(b"HTTP/")] == [b"HTTP/1.1 201 Created"] * 2, answers

    cut = os.urandom(BLOCK)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(request(2, cut) + cut[:100_000])
        sock.shutdown(socket.SHUT_WR)
        # Nobody is there to answer: the server closes the connection, with no answer.
        assert sock.recv(65536) == b"", "the server answered a request cut short"
    # The server serves on; CompleteSnapshot counts the two whole blocks only, and refuses
    # a count that takes in the cut one.
    assert error(lambda: complete(ebs, snap, {0: first, 1: second, 2: cut}))[0] == "ValidationException"
    complete(ebs, snap, {0: first, 1: second})
    wait_until(lambda: snapshot_state(cloud.client("ec2"), snap), lambda s: s == "completed")
    assert ebs.get_snapshot_block(SnapshotId=snap, BlockIndex=1,
                                  BlockToken=block_token(ebs, snap, 1))["BlockData"].read() == second
    cloud.client("ec2").delete_snapshot(SnapshotId=snap)


def block_token(ebs, snapshot_id, index):
    return next(b["BlockToken"] for b in ebs.list_snapshot_blocks(SnapshotId=snapshot_id)["Blocks"]
                if b["BlockIndex"] == index)

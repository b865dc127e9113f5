"""The local cloud's server process: moto with our patches as the EC2/SSM control plane, the
data plane behind it, IMDSv2 for the build host, and a small control API for tests.

Run by `localcloud up`; it writes `ready.json` into the state directory when it serves, and on
SIGTERM removes every loop device, link and file it made before exiting.
"""

import argparse
import json
import logging
import re
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, unquote

ACCOUNT = "123456789012"
REGION = "us-east-1"
ZONE = "us-east-1a"
DEBIAN_OWNER = "136693071363"
DEBIAN_SSM_PARAMETER = "/aws/service/debian/release/12/latest/amd64"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "localcloud", "AWS_SECRET_ACCESS_KEY": "localcloud"}
# How long an IMDSv2 token may live, as on EC2.
MAX_TOKEN_TTL = 21600

os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "false")
# AWS's managed policies (AmazonSSMManagedInstanceCore, which lets an instance's agent register
# with Systems Manager), as an account has them.
os.environ.setdefault("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
# An empty default-AMI list keeps region start-up fast; the vendor AMIs are ours. The file is
# shared by every cloud on the machine and replaced whole: rewritten in place, a cloud
# starting beside another read it empty between the truncation and the write.
_AMIS_FILE = Path(os.environ.get("TMPDIR", "/tmp")) / "amibake-localcloud-no-default-amis.json"
_AMIS_WRITING = _AMIS_FILE.with_name(f"{_AMIS_FILE.name}.{os.getpid()}")
_AMIS_WRITING.write_text("[]")
os.replace(_AMIS_WRITING, _AMIS_FILE)
os.environ["MOTO_AMIS_PATH"] = str(_AMIS_FILE)
for k, v in CREDENTIALS.items():
    os.environ.setdefault(k, v)

from moto.ec2.models import ec2_backends  # noqa: E402
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app  # noqa: E402
from moto.ssm.models import Parameter, ssm_backends  # noqa: E402
from werkzeug.serving import DechunkedInput, WSGIRequestHandler, make_server  # noqa: E402
from werkzeug.wrappers import Request, Response  # noqa: E402

from . import images, patches  # noqa: E402
from .dataplane import DataPlane  # noqa: E402
from .ebs_direct import DAMAGE, EbsDirect, EbsError, error_body  # noqa: E402
from .instances import Instances  # noqa: E402


class CallLog:
    """Every API call: action, the main ids it named (and any CIDR it opens), the result code."""

    ID_PARAMS = ("VolumeId", "InstanceId", "ImageId", "SnapshotId", "SourceSnapshotId", "Name", "KeyName", "GroupId", "Device",
                 "KmsKeyId", "Encrypted", "Bucket", "Key", "BlockIndex")

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = []

    def add(self, service, action, params, status, code, iam=None, started=None):
        """`iam`: what an IAM policy's tag conditions would judge the call by (see
        `Server.iam_facts`): the region, the tag keys the request carries, and the tag keys
        each resource it names carried before it. `started`: when the call reached the cloud,
        for a block call (the benchmark counts the calls in flight from it)."""
        ids = {k: v for k, v in params.items() if k in self.ID_PARAMS or k.startswith(("VolumeId.", "InstanceId.", "ImageId.", "SnapshotId."))
               or k.endswith(".CidrIp")}
        with self.lock:
            self.calls.append({"time": time.time(), "service": service, "action": action, "ids": ids, "status": status, "code": code,
                               **(iam or {}), **({"started": started} if started else {})})


class Faults:
    """Injected failures: after M calls of an action pass, the next N fail with a code; or
    are held some seconds and then carried out (a slow answer); or are carried out and
    their answer lost (HTTP 500, as a dropped connection looks to a client, which retries).
    A block call's fault may count only the calls naming one block. P% of all calls
    throttled, or of some actions' calls only."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_action = {}
        self.throttle_percent = 0.0
        self.throttle_only = None  # a set of actions, or None for all

    def take(self, action, block=None):
        with self.lock:
            fault = self.by_action.get(action)
            if fault and fault.get("block") is not None and fault["block"] != block:
                fault = None
            if fault and fault["after"] > 0:
                fault["after"] -= 1
            elif fault and fault["times"] > 0:
                fault["times"] -= 1
                if fault.get("delay"):
                    return ("delay", fault["delay"])
                if fault.get("lose_answer"):
                    return ("lose", None)
                if fault.get("corrupt"):
                    return ("corrupt", fault["corrupt"])
                return fault["code"]
            throttled = self.throttle_only is None or action in self.throttle_only
            if self.throttle_percent and throttled and random.random() * 100 < self.throttle_percent:
                return "RequestLimitExceeded"
        return None

    def apply(self, action, block=None):
        """Takes the fault for a call of `action` (naming `block`, for a block call), holding
        it if it is a delay. Returns the
        error code to answer with (or None) and what happens to a call carried out: None,
        "lose" (its answer is lost), or "flip", "short" or "long" (its block data is damaged
        on the way, as `ebs_direct.damaged` does)."""
        fault = self.take(action, block) if action else None
        if isinstance(fault, tuple):
            kind, value = fault
            if kind == "delay":
                time.sleep(value)
                return None, None
            return None, value if kind == "corrupt" else kind
        return fault, None


# What EC2 answers a call naming a resource it cannot see yet (eventual consistency), by the
# resource's id prefix, as EC2 words it.
NOT_FOUND = {
    "vol-": ("InvalidVolume.NotFound", "The volume '{}' does not exist."),
    "snap-": ("InvalidSnapshot.NotFound", "The snapshot '{}' does not exist."),
    "ami-": ("InvalidAMIID.NotFound", "The image id '[{}]' does not exist"),
    "i-": ("InvalidInstanceID.NotFound", "The instance ID '{}' does not exist"),
}
# The calls that name an existing resource, and the parameter that names it: Describe* by id,
# and every call that acts on one (removers included: a resource removed right after it was
# made may be NotFound to the remover too).
NAMES_A_RESOURCE = {
    "DescribeVolumes": "VolumeId", "DescribeSnapshots": "SnapshotId", "DescribeImages": "ImageId",
    "DescribeInstances": "InstanceId", "AttachVolume": "VolumeId", "DetachVolume": "VolumeId",
    "DeleteVolume": "VolumeId", "CreateSnapshot": "VolumeId", "DeleteSnapshot": "SnapshotId",
    "DeregisterImage": "ImageId", "TerminateInstances": "InstanceId", "StopInstances": "InstanceId",
    "CreateImage": "InstanceId", "CreateTags": "ResourceId",
}
# Creates that take a ClientToken: the same token answers the same, without a second resource.
IDEMPOTENT = {"CreateVolume", "RunInstances"}


class LocalCloud:
    def __init__(self, state_dir: Path, latency: str, block_latency=None, block_rate=None):
        self.state_dir = state_dir
        self.dataplane = DataPlane(state_dir)
        self.timing = patches.Timing(latency, block_latency)
        self.calls = CallLog()
        self.faults = Faults()
        self.tokens = {}
        self.idempotent = {}  # (action, ClientToken) -> (status line, headers, body chunks)
        self.moto = DomainDispatcherApplication(create_backend_app)
        self.instances = Instances(state_dir, self.dataplane)
        self.subnet = None
        patches.install(self.dataplane, self.instances, self.timing, lambda: self.subnet)
        self.ec2 = ec2_backends[ACCOUNT][REGION]
        self.ebs_direct = EbsDirect(self.dataplane, self.timing, lambda: self.ec2, block_rate)
        self.ssm = ssm_backends[ACCOUNT][REGION]

    # -- set-up ---------------------------------------------------------------------------

    def seed(self, vendors=()):
        """Vendor AMIs backed by real Debian images, their SSM parameter, the build host; and
        the catalogue's other distributions named in `vendors`."""
        built = images.ensure_images(log=lambda m: print(m, flush=True))
        self.vendor_amis = {}
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M")
        for kind, image in built.items():
            name = f"debian-12-amd64-{stamp}" if kind == "partitioned" else f"debian-12-amd64-unpartitioned-{stamp}"
            self.vendor_amis[kind] = self._register_vendor(
                image, name, f"Debian 12 (bookworm), {kind} root disk", DEBIAN_OWNER, images.RECIPE["volume_size_gib"]
            )
        self._put_public_parameter(DEBIAN_SSM_PARAMETER, self.vendor_amis["partitioned"])
        for family in vendors:
            layout = images.LAYOUTS[family]
            image = images.ensure_vendor(family, log=lambda m: print(m, flush=True))
            self.vendor_amis[family] = self._register_vendor(
                image, layout.name_prefix, layout.description, layout.owner, layout.volume_size_gib,
                architecture=layout.architecture, boot_mode=layout.boot_mode, imds_support=layout.imds_support,
            )
            if layout.parameter:
                self._put_public_parameter(layout.parameter, self.vendor_amis[family])
        self.build_host = self._start_build_host()

    def _register_vendor(self, image, name, description, owner, size_gib, architecture="x86_64", boot_mode="uefi-preferred",
                         imds_support=None):
        """A public AMI of `owner` whose root snapshot holds `image`, as the vendor registers it."""
        volume = self.ec2.create_volume(size=size_gib, zone_name=ZONE)
        snapshot = self.ec2.create_snapshot(volume.id, f"{name} root")
        self.ec2.delete_volume(volume.id)
        snapshot.owner_id = owner
        self.dataplane.import_snapshot(snapshot.id, image)
        ami = self.ec2.register_image(name, description)
        patches._drop_auto_snapshot(self.ec2, ami)
        ami.owner_id = owner
        ami.launch_permissions.append({"Group": "all"})
        ami.root_device_name = "/dev/xvda"
        ami.root_device_type = "ebs"
        ami.architecture = architecture
        ami.virtualization_type = "hvm"
        ami.boot_mode = boot_mode
        ami.ena_support = True
        ami.sriov_net_support = "simple"
        if imds_support:
            ami.imds_support = imds_support
        ami.__dict__["_mappings"] = [
            {"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": snapshot.id, "VolumeSize": size_gib, "DeleteOnTermination": True, "VolumeType": "gp3", "Encrypted": False}}
        ]
        return ami.id

    def _put_public_parameter(self, name, value):
        # Names under /aws/ are reserved over the API, so they are put in place directly.
        params = self.ssm._parameters
        params[name].append(
            Parameter(account_id=ACCOUNT, name=name, value=value, parameter_type="String", description=None, allowed_pattern=None,
                      keyid=None, last_modified_date=datetime.now(timezone.utc), version=1, data_type="aws:ec2:image")
        )

    def _start_build_host(self):
        # A network of its own on loopback, so clouds running side by side (tests in one
        # binary) never give two instances one address.
        net = self.network = take_network()
        vpc = self.ec2.create_vpc(f"127.{net.index}.0.0/16")
        self.subnet = self.ec2.create_subnet(vpc_id=vpc.id, cidr_block=f"127.{net.index}.1.0/24", availability_zone=ZONE)
        reservation = self.ec2.run_instances(
            self.vendor_amis["partitioned"], 1, None, [], instance_type="t3.small", subnet_id=self.subnet.id, placement=ZONE,
            tags={"instance": {"Name": "localcloud build host"}}, is_instance_type_default=False, region_name=REGION,
        )
        return reservation.instances[0]

    # -- WSGI -----------------------------------------------------------------------------

    def app(self, environ, start_response):
        request = Request(environ)
        path = request.path
        if path.startswith("/latest/"):
            return self.imds(request)(environ, start_response)
        if path.startswith("/_localcloud/"):
            return self.control(request)(environ, start_response)
        return self.aws(request, environ, start_response)

    def ebs(self, request):
        """An EBS direct API call: the same faults, throttling and call log as EC2's.
        (status, headers, body bytes)."""
        started = time.time()
        action, ids = EbsDirect.action_of(request.method, request.path)
        iam = self.iam_facts(request, ids, ebs_body=request.get_data(cache=True) if action == "StartSnapshot" else None)
        if action is None:
            return ebs_fault("ValidationException", f"no EBS direct action at {request.method} {request.path}")
        block = int(ids["BlockIndex"]) if ids.get("BlockIndex", "").isdigit() else None
        code, effect = self.faults.apply(action, block)
        lose_answer = effect == "lose"
        if effect in DAMAGE:
            # The block's bytes damaged on their way: the data put, or the data got (whose
            # checksum header still names the block as it is stored).
            request.environ["localcloud.damaged"] = effect
        if code:
            code = "RequestThrottledException" if code == "RequestLimitExceeded" else code
            status = 500 if code == "InternalServerException" else 400
            self.calls.add("ebs", action, ids, status, code, iam, started)
            return ebs_fault(code, f"injected by the local cloud into {action}", status)
        try:
            status, headers, body = self.ebs_direct.handle(action, ids, request)
        except EbsError as e:
            self.calls.add("ebs", action, ids, e.status, e.code, iam, started)
            return e.status, {"Content-Type": "application/json", "x-amzn-ErrorType": e.code,
                              "x-amzn-RequestId": str(uuid.uuid4())}, error_body(e).encode()
        if lose_answer:
            self.calls.add("ebs", action, ids, status, "OK (answer lost)", iam, started)
            return ebs_fault("InternalServerException", "the answer was lost on its way", 500)
        self.calls.add("ebs", action, ids, status, "OK", iam, started)
        headers = {**headers, "x-amzn-RequestId": str(uuid.uuid4())}
        if isinstance(body, dict):
            return status, {**headers, "Content-Type": "application/json"}, json.dumps(body).encode()
        return status, headers, body or b""

    def aws(self, request, environ, start_response):
        body = request.get_data(cache=True)
        service, action, params = "ec2", None, {}
        target = request.headers.get("X-Amz-Target", "")
        if target:
            service = {"TrentService": "kms", "Logs_20140328": "logs"}.get(target.split(".")[0], "ssm")
            action = target.split(".")[-1]
            try:
                params = {k: v for k, v in json.loads(body or b"{}").items() if isinstance(v, str)}
            except ValueError:
                params = {}
        elif signed_service(request) == "s3":
            service = "s3"
            action, params = s3_call(request)
        else:
            form = parse_qs(body.decode("utf-8", "replace"))
            form.update(parse_qs(request.query_string.decode()))
            params = {k: v[0] for k, v in form.items()}
            action = params.get("Action")
            service = signed_service(request) or service
        iam = self.iam_facts(request, params)
        code, effect = self.faults.apply(action)
        lose_answer = effect == "lose"
        if code:
            self.calls.add(service, action, params, 400 if code != "RequestLimitExceeded" else 503, code, iam)
            return fault_response(service, code, f"injected by the local cloud into {action}")(environ, start_response)
        if action in NAMES_A_RESOURCE:
            name = NAMES_A_RESOURCE[action]
            hidden = [v for k, v in params.items() if (k == name or k.startswith(name + ".")) and self.timing.hidden(v)]
            if hidden:
                code, message = next(m for p, m in NOT_FOUND.items() if hidden[0].startswith(p))
                self.calls.add(service, action, params, 400, code, iam)
                return fault_response(service, code, message.format(hidden[0]))(environ, start_response)
        token = params.get("ClientToken") if action in IDEMPOTENT else None
        if token and (action, token) in self.idempotent:
            status_line, headers, chunks = self.idempotent[(action, token)]
            self.calls.add(service, action, params, int(status_line.split()[0]), "OK (same ClientToken)", iam)
            start_response(status_line, headers)
            return chunks
        environ["wsgi.input"] = __import__("io").BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        status_holder = {}

        def capture(status, headers, exc_info=None):
            status_holder["status"] = int(status.split()[0])
            status_holder["line"], status_holder["headers"] = status, headers
            if lose_answer:
                return lambda data: None
            return start_response(status, headers, exc_info)

        patches.set_current_action(action)
        try:
            with self.dataplane.lock:
                chunks = list(self.moto(environ, capture))
        finally:
            patches.set_current_action(None)
        status = status_holder.get("status", 500)
        result_code = "OK" if status < 400 else error_code(b"".join(chunks))
        if token and status < 400:
            self.idempotent[(action, token)] = (status_holder["line"], status_holder["headers"], chunks)
        if lose_answer:
            self.calls.add(service, action, params, status, result_code + " (answer lost)", iam)
            return fault_response(service, "InternalError", "the answer was lost on its way", 500)(environ, start_response)
        self.calls.add(service, action, params, status, result_code, iam)
        return chunks

    def iam_facts(self, request, params, ebs_body=None):
        """What IAM's tag conditions look at: `aws:RequestTag` (the tag keys in the call)
        and `aws:ResourceTag` (the tag keys of each resource the call names, as they were
        before it)."""
        auth = request.headers.get("Authorization", "")
        scope = auth.split("Credential=", 1)[1].split(",", 1)[0].split("/") if "Credential=" in auth else []
        region = scope[2] if len(scope) == 5 else REGION
        request_tags = sorted({v for k, v in params.items() if re.fullmatch(r"(TagSpecification\.\d+\.)?Tag\.\d+\.Key", k)})
        if ebs_body:
            try:
                request_tags = sorted({t["Key"] for t in json.loads(ebs_body).get("Tags", [])})
            except (ValueError, AttributeError, KeyError, TypeError):
                pass
        backend = ec2_backends[ACCOUNT][region]
        resource_tags = {}
        with self.dataplane.lock:
            for key, value in params.items():
                if not isinstance(value, str):
                    continue
                if key == "KeyName" and value in backend.key_pairs:
                    pair = backend.key_pairs[value]
                    resource_tags[value] = sorted(backend.tags.get(pair.id, {}))
                elif value.startswith(("vol-", "i-", "ami-", "snap-", "sg-")) and (key.endswith("Id") or re.search(r"Id\.\d+$", key)):
                    # CopyImage is called in its destination; its source is in SourceRegion.
                    owner = ec2_backends[ACCOUNT][params["SourceRegion"]] if key == "SourceImageId" and params.get("SourceRegion") else backend
                    resource_tags[value] = sorted(owner.tags.get(value, {}))
        return {"region": region, "request_tags": request_tags, "resource_tags": resource_tags}

    def imds(self, request):
        if request.method == "PUT" and request.path == "/latest/api/token":
            ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TOKEN_TTL:
                return Response("", status=400)
            token = secrets.token_urlsafe(32)
            self.tokens[token] = time.time() + int(ttl)
            return Response(token, headers={"X-Aws-Ec2-Metadata-Token-Ttl-Seconds": ttl})
        token = request.headers.get("X-aws-ec2-metadata-token")
        if token is not None and self.tokens.get(token, 0) < time.time():
            return Response("", status=401)
        host = self.build_host
        role = "amibake-build-host"
        expiration = (datetime.now(timezone.utc) + timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
        identity = {
            "accountId": ACCOUNT, "architecture": "x86_64", "availabilityZone": ZONE, "imageId": host.image_id,
            "instanceId": host.id, "instanceType": host.instance_type, "privateIp": host.private_ip, "region": REGION, "version": "2017-09-30",
        }
        tree = {
            "/latest/meta-data/instance-id": host.id,
            "/latest/meta-data/instance-type": host.instance_type,
            "/latest/meta-data/ami-id": host.image_id,
            "/latest/meta-data/local-ipv4": host.private_ip,
            "/latest/meta-data/hostname": f"ip-{host.private_ip.replace('.', '-')}.ec2.internal",
            "/latest/meta-data/placement/availability-zone": ZONE,
            "/latest/meta-data/placement/region": REGION,
            "/latest/meta-data/iam/security-credentials/": role,
            f"/latest/meta-data/iam/security-credentials/{role}": json.dumps({
                "Code": "Success", "LastUpdated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "Type": "AWS-HMAC",
                "AccessKeyId": CREDENTIALS["AWS_ACCESS_KEY_ID"], "SecretAccessKey": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                "Token": "localcloud-session", "Expiration": expiration,
            }),
            "/latest/dynamic/instance-identity/document": json.dumps(identity),
        }
        path = request.path.rstrip("/") if request.path not in tree else request.path
        if path in tree:
            return Response(tree[path], content_type="text/plain")
        children = sorted({p[len(path) + 1:].split("/")[0] + ("/" if "/" in p[len(path) + 1:] else "") for p in tree if p.startswith(path + "/")})
        if children:
            return Response("\n".join(children), content_type="text/plain")
        return Response("", status=404)

    def control(self, request):
        what = request.path[len("/_localcloud/"):]
        if what == "calls":
            with self.calls.lock:
                return json_response(self.calls.calls)
        if what == "fault" and request.method == "POST":
            spec = request.get_json()
            if spec.get("corrupt") not in (None, *DAMAGE):
                return json_response({"error": f"corrupt {spec['corrupt']!r}: one of {', '.join(DAMAGE)}"}, 400)
            with self.faults.lock:
                if "throttle" in spec:
                    self.faults.throttle_percent = float(spec["throttle"])
                    self.faults.throttle_only = set(spec["throttle_only"]) if spec.get("throttle_only") else None
                if spec.get("action"):
                    self.faults.by_action[spec["action"]] = {"times": int(spec.get("times", 1)), "after": int(spec.get("after", 0)),
                                                           "code": spec.get("code", "InternalError"),
                                                           "delay": float(spec.get("delay", 0)),
                                                           "lose_answer": bool(spec.get("lose_answer")),
                                                           "corrupt": spec.get("corrupt"),
                                                           "block": None if spec.get("block") is None else int(spec["block"])}
            return json_response({"ok": True})
        if what == "changed-blocks" and request.method == "POST":
            spec = request.get_json()
            with self.dataplane.lock:
                blocks = self.ebs_direct.differing_blocks(spec["first"], spec["second"])
            return json_response({"count": len(blocks), "blocks": blocks})
        if what == "impostor" and request.method == "POST":
            self.instances.impostors = int(request.get_json().get("times", 1))
            return json_response({"ok": True})
        if what == "consistency" and request.method == "POST":
            self.timing.consistency_delay = float(request.get_json()["seconds"])
            return json_response({"ok": True})
        if what == "ls":
            return json_response(self.listing())
        if what == "waits":
            return json_response(self.timing.waits())
        if what == "export-snapshot" and request.method == "POST":
            spec = request.get_json()
            try:
                self.dataplane.export_snapshot(spec["snapshot_id"], Path(spec["file"]))
            except Exception as e:
                return json_response({"error": str(e)}, 400)
            return json_response({"ok": True})
        return json_response({"error": f"unknown control path {what}"}, 404)

    def listing(self):
        with self.dataplane.lock:
            ec2 = self.ec2
            return {
                "volumes": [{"id": v.id, "state": v.status, "size": v.size, "snapshot": v.snapshot_id, "attached_to": v.attachment.instance.id if v.attachment else None,
                             "device": v.attachment.device if v.attachment else None, "loop": self.dataplane.device_of(v.id),
                             "tags": {t["key"]: t["value"] for t in ec2.describe_tags(filters={"resource-id": [v.id]})}} for v in ec2.volumes.values()],
                "snapshots": [{"id": s.id, "state": s.status, "volume": s.volume.id, "owner": s.owner_id, "encrypted": bool(s.encrypted),
                               "kms_key_id": getattr(s, "kms_key_id", None), "parent": self.ebs_direct.parent_of(s.id),
                               "tags": dict(ec2.tags.get(s.id, {}))}
                              for s in ec2.snapshots.values()],
                "images": [{"id": a.id, "name": a.name, "state": a.state, "owner": a.owner_id} for a in ec2.amis.values()],
                "instances": [{"id": i.id, "state": i.state, "private_ip": i.private_ip, "public_ip": i.public_ip, "booted": self.instances.is_running(i.id)}
                              for i in ec2.all_instances()],
                "key_pairs": sorted(ec2.key_pairs),
                "security_groups": [{"id": g.id, "name": g.name, "vpc": g.vpc_id,
                                     "ingress": sorted(r.cidr_ipv4 for r in g.ingress_rules if r.cidr_ipv4)}
                                    for g in ec2.describe_security_groups() if g.name != "default"],
                "attachments": [{"volume": a.volume_id, "device": a.device, "loops": a.loops, "links": [str(p) for p in a.links]} for a in self.dataplane.attachments.values()],
                "objects": self.objects(),
                "build_host": self.build_host.id,
                "vendor_amis": self.vendor_amis,
                "other_regions": self.other_regions(),
            }

    def objects(self):
        """Every object in every bucket of the account, as `BUCKET/KEY`."""
        from moto.s3.models import s3_backends

        buckets = s3_backends[ACCOUNT]["aws"].buckets
        return sorted(f"{name}/{key}" for name, bucket in list(buckets.items()) for key in list(bucket.keys.keys()))

    def other_regions(self):
        """Images and snapshots in regions other than the cloud's own (copies), per region.
        Only regions something has been asked of: listing must not bring every region up."""
        out = {}
        for region, backend in dict.items(ec2_backends[ACCOUNT]):
            if region == REGION or not (backend.amis or backend.snapshots):
                continue
            out[region] = {
                "images": [{"id": a.id, "name": a.name, "state": a.state, "tags": dict(backend.tags.get(a.id, {}))}
                           for a in backend.amis.values()],
                "snapshots": [{"id": s.id, "state": s.status, "encrypted": bool(s.encrypted), "kms_key_id": getattr(s, "kms_key_id", None),
                               "tags": dict(backend.tags.get(s.id, {}))} for s in backend.snapshots.values()],
            }
        return out


def signed_service(request):
    """The service a SigV4 request is signed for (`ec2`, `sts`), from its credential scope."""
    auth = request.headers.get("Authorization", "")
    scope = auth.split("Credential=", 1)[1].split(",", 1)[0] if "Credential=" in auth else ""
    parts = scope.split("/")
    return parts[3] if len(parts) == 5 else None


def s3_call(request):
    """The action of an S3 REST request, path-style (`/BUCKET/KEY`), and what it names."""
    bucket, _, key = request.path.lstrip("/").partition("/")
    query = parse_qs(request.query_string.decode(), keep_blank_values=True)
    method = request.method
    if not bucket:
        action = "ListBuckets"
    elif key:
        action = {"PUT": "CopyObject" if "x-amz-copy-source" in request.headers else "PutObject",
                  "GET": "GetObject", "HEAD": "HeadObject", "DELETE": "DeleteObject"}.get(method)
    elif method == "POST" and "delete" in query:
        action = "DeleteObjects"
    else:
        action = {"PUT": "CreateBucket", "HEAD": "HeadBucket", "DELETE": "DeleteBucket",
                  "GET": "ListObjectsV2" if query.get("list-type") == ["2"] else "ListObjects"}.get(method)
    return action, {k: v for k, v in (("Bucket", bucket), ("Key", key)) if v}


def json_response(value, status=200):
    return Response(json.dumps(value, default=str), status=status, content_type="application/json")


def fault_response(service, code, message, status=None):
    request_id = str(uuid.uuid4())
    status = status or (503 if code == "RequestLimitExceeded" else 400)
    if service in ("ssm", "kms", "logs"):
        return Response(json.dumps({"__type": code, "message": message}), status=status, content_type="application/x-amz-json-1.1",
                        headers={"x-amzn-RequestId": request_id})
    if service == "s3":
        body = f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>{request_id}</RequestId></Error>"
        return Response(body, status=status, content_type="application/xml", headers={"x-amz-request-id": request_id})
    if service in ("sts", "iam"):
        body = f"<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"
        return Response(body, status=status, content_type="text/xml", headers={"x-amzn-RequestId": request_id})
    body = f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
    return Response(body, status=status, content_type="text/xml", headers={"x-amzn-RequestId": request_id})


def ebs_fault(code, message, status=400):
    """An EBS direct error answer, as `LocalCloud.ebs` gives them: (status, headers, body)."""
    return status, {"Content-Type": "application/json", "x-amzn-ErrorType": code,
                    "x-amzn-RequestId": str(uuid.uuid4())}, json.dumps({"message": message}).encode()


class EbsRequest:
    """What `LocalCloud.ebs` and `EbsDirect` read of a request (werkzeug's names), made
    from the HTTP handler's parse without werkzeug's WSGI environ."""

    def __init__(self, method, target, headers, body):
        path, _, query = target.partition("?")
        self.method = method
        self.path = unquote(path)
        self.headers = headers  # http.server's: .get() is case-insensitive
        self.args = dict(parse_qsl(query))
        self.environ = {}
        self.body = body

    def get_data(self, cache=True):
        return self.body


class Handler(WSGIRequestHandler):
    """werkzeug's handler, with the EBS direct APIs served on connections kept alive
    (HTTP/1.1), as EBS serves them. werkzeug closes every connection after one answer:
    a new connection and a new thread per block call was most of what one interpreter
    spent serving blocks, and bounded a fetch far below EBS's rate. Every other request
    goes through werkzeug as before, its connection closed after the answer."""

    protocol_version = "HTTP/1.1"
    cloud = None  # set by `handler_for`

    def __getattr__(self, name):
        # http.server calls do_<METHOD>; werkzeug answers every method with run_wsgi.
        if name.startswith("do_"):
            return self.route
        return super().__getattr__(name)

    def route(self):
        if not self.path.startswith("/snapshots"):
            return self.run_wsgi()
        try:
            length = self.headers.get("Content-Length") or "0"
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                body = DechunkedInput(self.rfile).readall()
            elif not length.isdigit():
                # What follows on the connection cannot be told from this body: answer, close.
                self.close_connection = True
                status, headers, payload = ebs_fault("ValidationException", f"Content-Length {length!r} is not a length")
                return self.answer(status, {**headers, "Connection": "close"}, payload)
            else:
                try:
                    body = self.read_body(int(length))
                except ConnectionError:
                    # The client went before its request's end: nobody to answer.
                    self.close_connection = True
                    return
            status, headers, payload = self.cloud.ebs(EbsRequest(self.command, self.path, self.headers, body))
        except Exception:
            # As werkzeug answers an app's failure: a 500, never a dropped connection; the
            # trace on the server's log.
            traceback.print_exc()
            self.close_connection = True
            status, headers, payload = ebs_fault("InternalServerException", "the local cloud failed on this call", 500)
            headers["Connection"] = "close"
        self.answer(status, headers, payload)

    def read_body(self, length):
        """The request's `length` bytes: what the header's read left buffered, then the rest
        in one receive that waits for all of it. Read through the buffered file, a block's
        512 KiB came in a receive per segment, each giving up and taking back the one
        interpreter lock that 128 connections share: most of what a put cost the server."""
        head = self.rfile.read1(length)
        if len(head) == length:
            return head
        body = bytearray(length)
        body[:len(head)] = head
        view = memoryview(body)[len(head):]
        while view:
            received = self.connection.recv_into(view, flags=socket.MSG_WAITALL)
            if received == 0:
                raise ConnectionError(f"the connection closed {len(view)} bytes before the body's end")
            view = view[received:]
        return body

    def answer(self, status, headers, payload):
        self.send_response_only(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)


def handler_for(cloud):
    return type("CloudHandler", (Handler,), {"cloud": cloud})


def error_code(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    for start, end in (("<Code>", "</Code>"), ('"__type": "', '"'), ('"__type":"', '"')):
        if start in text:
            return text.split(start, 1)[1].split(end, 1)[0].split("#")[-1]
    return "Error"


class Network:
    """127.K.0.0/16, held by this process (an exclusive lock on a file) until it exits."""

    def __init__(self, index, lock):
        self.index = index
        self.lock = lock


def take_network():
    import fcntl
    for index in range(0, 250):
        lock = open(f"/tmp/localcloud-net-{index}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return Network(index, lock)
        except BlockingIOError:
            lock.close()
    raise RuntimeError("every loopback network 127.0-249.0.0/16 is held by another local cloud")


def serve(state_dir: Path, latency: str, vendors, block_latency=None, block_rate=None):
    cloud = LocalCloud(state_dir, latency, block_latency, block_rate)
    cloud.seed(vendors)
    # No access log: the call log (`localcloud calls`) holds every call, and a log line per
    # request was a tenth of the server's time under a block fetch (its one interpreter
    # lock serves every request).
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    api = make_server("127.0.0.1", 0, cloud.app, threaded=True, request_handler=handler_for(cloud))
    imds = make_server("127.0.0.1", 0, cloud.app, threaded=True)
    stop = threading.Event()

    def on_term(*_):
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    for server in (api, imds):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ready = {
        "pid": os.getpid(),
        "endpoint": f"http://127.0.0.1:{api.server_port}",
        "imds_endpoint": f"http://127.0.0.1:{imds.server_port}",
        "region": REGION,
        "build_host": cloud.build_host.id,
        "vendor_amis": cloud.vendor_amis,
        "latency": latency,
    }
    tmp = state_dir / "ready.json.tmp"
    tmp.write_text(json.dumps(ready))
    tmp.rename(state_dir / "ready.json")
    print(f"serving on {ready['endpoint']}", flush=True)
    stop.wait()
    api.shutdown()
    imds.shutdown()
    failures = cloud.instances.teardown() + cloud.dataplane.teardown()
    for f in failures:
        print(f"teardown: {f}", file=sys.stderr, flush=True)
    (state_dir / "ready.json").unlink(missing_ok=True)
    sys.exit(1 if failures else 0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--latency", default="none", choices=sorted(patches.PROFILES))
    parser.add_argument("--vendor", action="append", default=[], choices=sorted(images.LAYOUTS))
    parser.add_argument("--block-latency", type=float)
    parser.add_argument("--block-rate", type=int)
    args = parser.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    serve(args.state, args.latency, args.vendor, args.block_latency, args.block_rate)


if __name__ == "__main__":
    main()

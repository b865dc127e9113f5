"""Fidelity patches: where moto falls short of EC2, make it behave as EC2 does.

Each patch wraps a moto method. Data-plane work happens only when the API action being served
is the one the method belongs to (`current_action`), because moto calls the same methods
internally: `create_snapshot` about 1,300 times while a region loads its default AMIs, and
`create_volume`/`attach_volume` inside RunInstances.
"""

import base64
import ipaddress
import subprocess
import threading
import time

from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models import EC2Backend
from moto.ec2.models.amis import Ami
from moto.ec2.models.elastic_block_store import Snapshot, Volume, VolumeAttachment
from moto.ec2.responses.amis import AmisResponse
from .dataplane import DataPlaneError

_request = threading.local()


def current_action():
    return getattr(_request, "action", None)


def set_current_action(action):
    _request.action = action


# Seconds each transitional state lasts. "realistic" keeps EC2's proportions at about a tenth
# of its times; "quick" is a tenth of that, so tests exercise every waiter in little time.
# `block_call`: what one PutSnapshotBlock or GetSnapshotBlock takes, AWS's own sizing figure
# in "realistic" (`localcloud up --block-latency` sets another). `log_upload`: how often the
# SSM agent sends a command's output to CloudWatch Logs.
PROFILES = {
    "none": dict(volume_creating=0, attaching=0, detaching=0, snapshot_base=0, snapshot_per_10mb=0, ami_extra=0,
                 instance_pending=0, instance_stopping=0, shutting_down=0, agent_start=0, command_pickup=0,
                 block_call=0, log_upload=0),
    "quick": dict(volume_creating=0.3, attaching=0.2, detaching=0.2, snapshot_base=0.5, snapshot_per_10mb=0.1, ami_extra=0.5,
                  instance_pending=0.5, instance_stopping=0.5, shutting_down=0.3, agent_start=0.5, command_pickup=0.1,
                  block_call=0, log_upload=0.5),
    "realistic": dict(volume_creating=3, attaching=2, detaching=2, snapshot_base=5, snapshot_per_10mb=1, ami_extra=5,
                      instance_pending=5, instance_stopping=5, shutting_down=3, agent_start=5, command_pickup=0.5,
                      block_call=0.1, log_upload=1),
}


class Timing:
    """When each resource leaves its transitional state (monotonic seconds)."""

    def __init__(self, profile, block_latency=None):
        self.profile = dict(PROFILES[profile])
        if block_latency is not None:
            self.profile["block_call"] = block_latency
        self.ready_at = {}
        self.started_at = {}
        self.detaching = {}  # volume id -> (old attachment, until)
        # Eventual consistency: a new resource is NotFound to Describe* for this long.
        self.consistency_delay = 0.0
        self.hidden_until = {}

    def created(self, resource_id):
        if self.consistency_delay > 0:
            self.hidden_until[resource_id] = time.monotonic() + self.consistency_delay

    def hidden(self, resource_id):
        return time.monotonic() < self.hidden_until.get(resource_id, 0)

    def start(self, key, seconds):
        now = time.monotonic()
        self.started_at[key] = now
        self.ready_at[key] = now + seconds

    def waits(self):
        """Every transitional state so far, by the cloud's own account: its kind, its id, and
        when it began and ended (wall clock, seconds since the epoch)."""
        to_wall = time.time() - time.monotonic()
        return [{"kind": key[0], "id": key[1], "start": start + to_wall, "end": self.ready_at[key] + to_wall}
                for key, start in list(self.started_at.items())]

    def pending(self, key):
        return time.monotonic() < self.ready_at.get(key, 0)

    def fraction(self, key):
        start, end = self.started_at.get(key), self.ready_at.get(key)
        if start is None or end is None or end <= start:
            return 1.0
        return min(1.0, max(0.0, (time.monotonic() - start) / (end - start)))


def install(dataplane, instances, timing, loopback_subnet):
    """Applies every patch. `loopback_subnet()` names the subnet instances launch into when
    the request names none, so every instance gets a loopback address."""
    _patch_states(timing)
    _patch_volumes(dataplane, timing)
    _patch_snapshots(dataplane, timing)
    _patch_images(dataplane, timing)
    _patch_instances(dataplane, instances, timing, loopback_subnet)
    _patch_console(instances)
    _patch_kms()
    _patch_ssm()
    _patch_run_command(instances, timing)
    _patch_image_lifecycle()
    _patch_launch_template_pages()
    _patch_copy_image(timing)


def _error(code, message):
    return EC2ClientError(code, message)


# -- states that take time -----------------------------------------------------------------


def _patch_states(timing):
    def volume_status(self):
        if timing.pending(("volume", self.id)):
            return "creating"
        if self.attachment or self.id in timing.detaching and timing.pending(("detach", self.id)):
            return "in-use"
        return "available"

    def volume_attachments(self):
        if self.attachment:
            return [self.attachment]
        old = timing.detaching.get(self.id)
        if old and timing.pending(("detach", self.id)):
            return [old]
        return []

    Volume.status = property(volume_status)
    Volume.state = property(volume_status)
    Volume.attachments = property(volume_attachments)

    def attachment_status(self):
        raw = self.__dict__.get("_status", "attached")
        if raw == "attached" and timing.pending(("attach", self.volume.id)):
            return "attaching"
        if raw == "detached" and timing.pending(("detach", self.volume.id)):
            return "detaching"
        return raw

    def set_attachment_status(self, value):
        self.__dict__["_status"] = value

    VolumeAttachment.status = property(attachment_status, set_attachment_status)
    VolumeAttachment.state = property(attachment_status)

    def snapshot_status(self):
        if timing.pending(("snapshot", self.id)):
            return "pending"
        return self.__dict__.get("_status", "completed")

    def set_snapshot_status(self, value):
        self.__dict__["_status"] = value

    def snapshot_progress(self):
        return f"{int(timing.fraction(('snapshot', self.id)) * 100)}%"

    Snapshot.status = property(snapshot_status, set_snapshot_status)
    Snapshot.state = property(snapshot_status)
    Snapshot.progress = property(snapshot_progress)

    def ami_state(self):
        if timing.pending(("image", self.id)):
            return "pending"
        return self.__dict__.get("_state", "available")

    def set_ami_state(self, value):
        self.__dict__["_state"] = value

    Ami.state = property(ami_state, set_ami_state)

    def ami_mappings(self):
        # RegisterImage/CreateImage record what EC2 would return; moto's own default is a
        # hard-coded 15 GiB `standard` volume whatever was registered.
        stored = self.__dict__.get("_mappings")
        if stored is not None:
            return stored
        return original_ami_mappings.fget(self)

    original_ami_mappings = Ami.block_device_mappings
    Ami.block_device_mappings = property(ami_mappings)


# -- volumes and attachments ---------------------------------------------------------------


def _usable_kms_key(backend, key_id):
    """Whether the account's KMS (moto's, in this region) has `key_id` (id, ARN, alias or
    alias ARN) as an enabled symmetric key that EBS can encrypt with."""
    from moto.kms.models import kms_backends

    kms = kms_backends[backend.account_id][backend.region_name]
    try:
        key = kms.keys[kms.any_id_to_key_id(key_id)]
    except (KeyError, TypeError):
        return False
    return key.key_state == "Enabled" and key.key_spec == "SYMMETRIC_DEFAULT" and key.key_usage == "ENCRYPT_DECRYPT"


def _patch_volumes(dataplane, timing):
    create_volume = EC2Backend.create_volume
    delete_volume = EC2Backend.delete_volume
    attach_volume = EC2Backend.attach_volume
    detach_volume = EC2Backend.detach_volume

    def patched_create_volume(self, *args, **kwargs):
        volume = create_volume(self, *args, **kwargs)
        if current_action() == "CreateVolume":
            try:
                dataplane.create_volume(volume.id, volume.size, volume.snapshot_id)
            except DataPlaneError as e:
                delete_volume(self, volume.id)
                # An answer a client can read, naming the local cloud's own fault.
                raise _error("InternalError", f"local cloud data plane: {e}")
            timing.start(("volume", volume.id), timing.profile["volume_creating"])
            timing.created(volume.id)
            if volume.kms_key_id and not _usable_kms_key(self, volume.kms_key_id):
                # EBS checks the key only after answering: the volume is `creating` for a
                # moment, then it is gone, as if it never was.
                timing.start(("volume", volume.id), 3600)

                def vanish(backend=self, volume_id=volume.id):
                    with dataplane.lock:
                        if volume_id in backend.volumes:
                            delete_volume(backend, volume_id)
                            dataplane.delete_volume(volume_id)

                _after(max(timing.profile["volume_creating"], 0.1), vanish)
        return volume

    def patched_delete_volume(self, volume_id):
        volume = self.volumes.get(volume_id)
        if volume is not None and volume.id in timing.detaching and timing.pending(("detach", volume_id)):
            raise _error("VolumeInUse", f"Volume {volume_id} is currently detaching")
        result = delete_volume(self, volume_id)
        dataplane.delete_volume(volume_id)
        timing.detaching.pop(volume_id, None)
        return result

    def patched_attach_volume(self, volume_id, instance_id, device_path, delete_on_termination=False):
        if current_action() != "AttachVolume":
            return attach_volume(self, volume_id, instance_id, device_path, delete_on_termination)
        volume = self.get_volume(volume_id)
        if timing.pending(("volume", volume_id)):
            raise _error("IncorrectState", f"vol '{volume_id}' is not 'available'.")
        if volume.attachment or volume_id in timing.detaching and timing.pending(("detach", volume_id)):
            raise _error("VolumeInUse", f"{volume_id} is already attached to an instance")
        instance = self.get_instance(instance_id)
        if device_path in instance.block_device_mapping:
            raise _error("InvalidParameterValue", f"Invalid value '{device_path}' for unixDevice. Attachment point {device_path} is already in use")
        attachment = attach_volume(self, volume_id, instance_id, device_path, delete_on_termination)
        try:
            dataplane.attach(volume_id, device_path)
        except Exception as e:
            detach_volume(self, volume_id, instance_id, device_path)
            raise _error("InternalError", f"local cloud could not attach {volume_id}: {e}")
        timing.detaching.pop(volume_id, None)
        timing.start(("attach", volume_id), timing.profile["attaching"])
        return attachment

    def patched_detach_volume(self, volume_id, instance_id=None, device_path=None):
        # EC2 accepts DetachVolume without InstanceId; moto answers HTTP 500.
        volume = self.get_volume(volume_id)
        if volume.attachment is None:
            raise _error("IncorrectState", f"Volume '{volume_id}' is in the 'available' state.")
        instance_id = instance_id or volume.attachment.instance.id
        old = detach_volume(self, volume_id, instance_id, device_path)
        if current_action() == "DetachVolume":
            dataplane.detach(volume_id)
            timing.detaching[volume_id] = old
            timing.start(("detach", volume_id), timing.profile["detaching"])
        return old

    EC2Backend.create_volume = patched_create_volume
    EC2Backend.delete_volume = patched_delete_volume
    EC2Backend.attach_volume = patched_attach_volume
    EC2Backend.detach_volume = patched_detach_volume


# -- snapshots --------------------------------------------------------------------------------


def _patch_snapshots(dataplane, timing):
    create_snapshot = EC2Backend.create_snapshot
    delete_snapshot = EC2Backend.delete_snapshot

    def patched_create_snapshot(self, volume_id, description, owner_id=None, from_ami=None):
        snapshot = create_snapshot(self, volume_id, description, owner_id, from_ami)
        # A snapshot of an encrypted volume is encrypted with the volume's key; moto keeps
        # only the flag.
        snapshot.kms_key_id = snapshot.volume.kms_key_id
        if current_action() in ("CreateSnapshot", "CreateImage"):
            take_snapshot(self, dataplane, timing, snapshot)
        return snapshot

    def patched_delete_snapshot(self, snapshot_id):
        for ami in self.amis.values():
            if any(m.get("Ebs", {}).get("SnapshotId") == snapshot_id for m in ami.__dict__.get("_mappings") or []):
                raise _error("InvalidSnapshot.InUse", f"The snapshot {snapshot_id} is currently in use by {ami.id}")
        result = delete_snapshot(self, snapshot_id)
        dataplane.delete_snapshot(snapshot_id)
        return result

    copy_snapshot = EC2Backend.copy_snapshot

    def patched_copy_snapshot(self, source_snapshot_id, source_region, description, kms_key_id):
        # The copy holds the source's blocks, is this account's, and (like CreateSnapshot)
        # takes a time that follows the data it holds. The source may be in another region.
        from moto.ec2.models import ec2_backends

        snapshot = copy_snapshot(self, source_snapshot_id, source_region, description, kms_key_id)
        source = ec2_backends[self.account_id][source_region or self.region_name].get_snapshot(source_snapshot_id)
        snapshot.kms_key_id = kms_key_id or getattr(source, "kms_key_id", None)
        if kms_key_id:
            snapshot.encrypted = True
        # Only an EBS direct snapshot still pending sets its status "pending" itself.
        source_final = source.__dict__.get("_status", "completed") != "pending"
        copied = dataplane.copy_snapshot(source_snapshot_id, snapshot.id, source_final)
        seconds = timing.profile["snapshot_base"] + timing.profile["snapshot_per_10mb"] * copied / 10e6
        timing.start(("snapshot", snapshot.id), seconds)
        timing.created(snapshot.id)
        return snapshot

    EC2Backend.create_snapshot = patched_create_snapshot
    EC2Backend.delete_snapshot = patched_delete_snapshot
    EC2Backend.copy_snapshot = patched_copy_snapshot


def take_snapshot(backend, dataplane, timing, snapshot):
    volume = snapshot.volume
    grown = dataplane.create_snapshot(volume.id, snapshot.id, volume.snapshot_id)
    seconds = timing.profile["snapshot_base"] + timing.profile["snapshot_per_10mb"] * grown / 10e6
    timing.start(("snapshot", snapshot.id), seconds)
    timing.created(snapshot.id)


# -- images -----------------------------------------------------------------------------------


def _mapping_from_params(raw):
    """A RegisterImage BlockDeviceMapping parameter as DescribeImages returns it."""
    mapping = {"DeviceName": raw.get("DeviceName")}
    if "VirtualName" in raw:
        mapping["VirtualName"] = raw["VirtualName"]
    if "NoDevice" in raw:
        mapping["NoDevice"] = ""
    ebs = raw.get("Ebs")
    if ebs is not None:
        out = {}
        for key in ("SnapshotId", "KmsKeyId"):
            if ebs.get(key):
                out[key] = ebs[key]
        for key in ("VolumeSize", "Iops", "Throughput"):
            if ebs.get(key) is not None:
                out[key] = int(ebs[key])
        out["DeleteOnTermination"] = str(ebs.get("DeleteOnTermination", True)).lower() == "true"
        out["VolumeType"] = ebs.get("VolumeType", "gp2")
        out["Encrypted"] = str(ebs.get("Encrypted", False)).lower() == "true"
        mapping["Ebs"] = out
    return mapping


def _drop_auto_snapshot(backend, ami):
    # moto's Ami() makes a snapshot of a throwaway 15 GiB volume; EC2 makes none.
    auto = getattr(ami, "ebs_snapshot", None)
    if auto is not None:
        backend.snapshots.pop(auto.id, None)


def _image_ready_after(backend, timing, mappings):
    waits = [timing.ready_at.get(("snapshot", m["Ebs"]["SnapshotId"]), 0) for m in mappings if m.get("Ebs", {}).get("SnapshotId")]
    return max([0, *waits]) - time.monotonic() + timing.profile["ami_extra"]


def refuse_duplicate_name(backend, name):
    """EC2 keeps AMI names unique per account and region; moto does not."""
    for ami in backend.amis.values():
        if ami.name == name and getattr(ami, "owner_id", None) == backend.account_id:
            raise _error("InvalidAMIName.Duplicate", f"AMI name {name} is already in use by AMI {ami.id}")


def _patch_images(dataplane, timing):
    def register_image(self):
        self.error_on_dryrun()
        params = self._get_params()
        raw_mappings = params.get("BlockDeviceMapping") or params.get("BlockDeviceMappings") or []
        if isinstance(raw_mappings, dict):
            raw_mappings = [raw_mappings[k] for k in sorted(raw_mappings, key=int)]
        mappings = [_mapping_from_params(m) for m in raw_mappings]
        root = params.get("RootDeviceName") or (mappings[0]["DeviceName"] if mappings else "/dev/xvda")
        backend = self.ec2_backend
        for m in mappings:
            snap_id = m.get("Ebs", {}).get("SnapshotId")
            if snap_id:
                snapshot = backend.get_snapshot(snap_id)
                m["Ebs"].setdefault("VolumeSize", snapshot.volume.size)
        if not any(m["DeviceName"] == root for m in mappings):
            raise _error("InvalidBlockDeviceMapping", f"The root device name {root} has no block device mapping")
        refuse_duplicate_name(backend, self._get_param("Name"))
        image = backend.register_image(self._get_param("Name"), self._get_param("Description", ""))
        _drop_auto_snapshot(backend, image)
        image.__dict__["_mappings"] = mappings
        image.root_device_name = root
        image.root_device_type = "ebs"
        image.architecture = self._get_param("Architecture", "x86_64")
        image.virtualization_type = self._get_param("VirtualizationType", "hvm")
        image.boot_mode = self._get_param("BootMode") or None
        image.ena_support = str(self._get_param("EnaSupport", "false")).lower() == "true"
        image.sriov_net_support = self._get_param("SriovNetSupport")
        image.sriov = image.sriov_net_support
        image.imds_support = self._get_param("ImdsSupport")
        # Tags in the call itself, as EC2 takes them (moto's RegisterImage ignores them).
        for spec in self._get_param("TagSpecifications", []):
            if spec.get("ResourceType") == "image":
                backend.create_tags([image.id], {t["Key"]: t["Value"] for t in spec.get("Tags", [])})
        timing.start(("image", image.id), max(0, _image_ready_after(backend, timing, mappings)))
        timing.created(image.id)
        from moto.core.responses import ActionResult

        return ActionResult({"ImageId": image.id})

    AmisResponse.register_image = register_image


# -- instances --------------------------------------------------------------------------------

# EC2's instance state codes.
STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}


def _set_state(instance, name):
    instance._state.name = name
    instance._state.code = STATE_CODES[name]


def _after(seconds, action):
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()


def public_address(private_ip):
    """127.K.1.N's public address: 127.K.2.N, on loopback too."""
    a, k, _, n = private_ip.split(".")
    return f"{a}.{k}.2.{n}"


def _image_of(backend, instance):
    return backend.amis.get(instance.image_id)


def _patch_instances(dataplane, instances, timing, loopback_subnet):
    from moto.ec2.models.instances import Instance

    setup_defaults = Instance.setup_defaults
    add_block_device = Instance.add_block_device
    run_instances = EC2Backend.run_instances
    stop_instances = EC2Backend.stop_instances
    start_instances = EC2Backend.start_instances
    terminate_instances = EC2Backend.terminate_instances
    create_image = EC2Backend.create_image

    def ami_mapping(instance, device):
        image = _image_of(instance.ec2_backend, instance)
        for m in (image.__dict__.get("_mappings") or []) if image else []:
            if m["DeviceName"] == device and "Ebs" in m:
                return m["Ebs"]
        return {}

    def patched_setup_defaults(self):
        # EC2 builds an instance's volumes from its AMI's mappings; moto makes an empty
        # 8 GiB /dev/sda1 whatever the AMI says.
        image = _image_of(self.ec2_backend, self)
        mappings = image.__dict__.get("_mappings") if image else None
        if not mappings:
            return setup_defaults(self)
        for m in mappings:
            ebs = m.get("Ebs")
            if ebs:
                self.add_block_device(ebs.get("VolumeSize"), m["DeviceName"], ebs.get("SnapshotId"), ebs.get("Encrypted", False),
                                      ebs.get("DeleteOnTermination", True), ebs.get("KmsKeyId"), ebs.get("VolumeType"))

    def patched_add_block_device(self, size, device_path, snapshot_id, encrypted, delete_on_termination, kms_key_id, volume_type):
        # A request that only resizes the root keeps the AMI's snapshot, as on EC2.
        from_ami = ami_mapping(self, device_path)
        snapshot_id = snapshot_id or from_ami.get("SnapshotId")
        size = size or from_ami.get("VolumeSize")
        add_block_device(self, size, device_path, snapshot_id, encrypted, delete_on_termination, kms_key_id, volume_type)
        if current_action() in ("RunInstances",):
            volume = self.ec2_backend.get_volume(self.block_device_mapping[device_path].volume_id)
            dataplane.create_volume(volume.id, volume.size, volume.snapshot_id)

    def boot_later(backend, instance, key_name):
        key = backend.key_pairs.get(key_name) if key_name else None
        public_key = getattr(key, "material_public", None) if key else None
        if isinstance(public_key, bytes):
            public_key = public_key.decode()
        root = instance.block_device_mapping.get(instance.root_device_name)
        _set_state(instance, "pending")
        started = time.monotonic()

        def boot():
            try:
                if root is None:
                    raise RuntimeError(f"{instance.id} has no volume at its root device {instance.root_device_name}")
                instances.boot(instance.id, root.volume_id, instance.private_ip, instance.public_ip, public_key)
            except Exception as e:  # a broken image: the instance runs but never answers
                print(f"boot of {instance.id} failed: {e}", flush=True)
            remaining = timing.profile["instance_pending"] - (time.monotonic() - started)
            _after(max(0.0, remaining), lambda: instance._state.name == "pending" and _set_state(instance, "running"))

        threading.Thread(target=boot, daemon=True).start()

    def patched_run_instances(self, image_id, count, user_data, security_group_names, **kwargs):
        if current_action() != "RunInstances":
            return run_instances(self, image_id, count, user_data, security_group_names, **kwargs)
        primary = [n for n in kwargs.get("nics") or [] if str(n.get("DeviceIndex")) == "0"]
        if not kwargs.get("subnet_id"):
            # moto gives an instance without a subnet a random 10.x address, also when the
            # subnet travels in a network interface specification; here it is the NIC's
            # subnet, else the loopback one.
            kwargs["subnet_id"] = (primary[0].get("SubnetId") if primary else None) or loopback_subnet().id
            for nic in primary:
                nic.setdefault("SubnetId", kwargs["subnet_id"])
        reservation = run_instances(self, image_id, count, user_data, security_group_names, **kwargs)
        outside = [i for i in reservation.instances if not ipaddress.ip_address(i.private_ip).is_loopback]
        if outside:
            # Never hand a client an address it would then try to reach off this machine.
            terminate_instances(self, [i.id for i in reservation.instances])
            raise _error("InvalidSubnet", f"the local cloud runs instances only on loopback; {outside[0].private_ip} is not")
        for instance in reservation.instances:
            for index, nic in instance.nics.items():
                # The loopback subnet is the account's default subnet, which maps a public
                # IPv4 address on launch unless the interface says otherwise. The public
                # address is another loopback address of the same instance.
                asked = [n.get("AssociatePublicIpAddress") for n in primary if str(index) == "0"]
                default_subnet = nic.subnet.id == loopback_subnet().id
                wanted = str(asked[0]).lower() == "true" if asked and asked[0] is not None else default_subnet or bool(nic.public_ip)
                nic.public_ip = public_address(nic.private_ip_address) if wanted and str(index) == "0" else None
            boot_later(self, instance, kwargs.get("key_name"))
            timing.created(instance.id)
        return reservation

    def patched_stop_instances(self, instance_ids):
        result = stop_instances(self, instance_ids)
        if current_action() == "StopInstances":
            for instance_id in instance_ids:
                instance = self.get_instance(instance_id)
                instances.halt(instance_id)
                _set_state(instance, "stopping")
                _after(timing.profile["instance_stopping"], lambda i=instance: i._state.name == "stopping" and _set_state(i, "stopped"))
        return result

    def patched_start_instances(self, instance_ids):
        result = start_instances(self, instance_ids)
        if current_action() == "StartInstances":
            for instance_id in instance_ids:
                boot_later(self, self.get_instance(instance_id), self.get_instance(instance_id).key_name)
        return result

    def patched_terminate_instances(self, instance_ids):
        for instance_id in instance_ids:
            instances.halt(instance_id)
        return terminate_instances(self, instance_ids)

    def patched_create_image(self, instance_id, name, description, tag_specifications):
        instance = self.get_instance(instance_id)
        source = _image_of(self, instance)
        if current_action() == "CreateImage":
            refuse_duplicate_name(self, name)
        # moto refuses snapshot tags (NotImplementedError); they are put on below.
        image_specs = [spec for spec in tag_specifications or [] if spec.get("ResourceType") != "snapshot"]
        image = create_image(self, instance_id, name, description, image_specs)
        if current_action() != "CreateImage":
            return image
        _drop_auto_snapshot(self, image)
        instances.sync(instance_id)
        mappings = []
        for device, block in sorted(instance.block_device_mapping.items()):
            volume = self.get_volume(block.volume_id)
            snapshot = self.create_snapshot(volume.id, f"Created by CreateImage({instance_id}) for {image.id}")
            # Tags for the snapshots in the call itself, as EC2 takes them.
            snapshot_tags = {t["Key"]: t["Value"] for spec in tag_specifications or []
                             if spec.get("ResourceType") == "snapshot" for t in spec.get("Tags", [])}
            if snapshot_tags:
                self.create_tags([snapshot.id], snapshot_tags)
            mappings.append({"DeviceName": device, "Ebs": {"SnapshotId": snapshot.id, "VolumeSize": volume.size,
                             "DeleteOnTermination": bool(block.delete_on_termination), "VolumeType": volume.volume_type, "Encrypted": bool(volume.encrypted)}})
        image.__dict__["_mappings"] = mappings
        image.root_device_name = instance.root_device_name
        image.root_device_type = "ebs"
        if source is not None:
            for attr in ("architecture", "virtualization_type", "boot_mode"):
                setattr(image, attr, getattr(source, attr, None))
            image.ena_support = getattr(source, "ena_support", True)
            image.sriov_net_support = getattr(source, "sriov_net_support", "simple")
        timing.start(("image", image.id), max(0, _image_ready_after(self, timing, mappings)))
        timing.created(image.id)
        return image

    Instance.setup_defaults = patched_setup_defaults
    Instance.add_block_device = patched_add_block_device
    EC2Backend.run_instances = patched_run_instances
    EC2Backend.stop_instances = patched_stop_instances
    EC2Backend.start_instances = patched_start_instances
    EC2Backend.terminate_instances = patched_terminate_instances
    EC2Backend.create_image = patched_create_image


# -- console ---------------------------------------------------------------------------------


def _patch_console(instances):
    """GetConsoleOutput returns what the instance printed (moto's is a fixed Xen boot log),
    and no Output at all while it has printed nothing, as EC2 does."""
    from moto.core.responses import ActionResult
    from moto.core.utils import utcnow
    from moto.ec2.responses.general import General

    def get_console_output(self):
        instance = self.ec2_backend.get_instance(self._get_param("InstanceId"))
        result = {"InstanceId": instance.id, "Timestamp": utcnow()}
        text = instances.console(instance.id)
        if text:
            # EC2 answers the text base64-encoded (botocore decodes it for boto3 users).
            result["Output"] = base64.b64encode(text.encode()).decode()
        return ActionResult(result)

    General.get_console_output = get_console_output


# -- KMS -------------------------------------------------------------------------------------


def _patch_kms():
    """CreateKey without KeyUsage makes an ENCRYPT_DECRYPT key, as KMS does; moto leaves the
    usage empty."""
    from moto.kms.models import Key

    key_init = Key.__init__

    def patched_init(self, policy, key_usage, *args, **kwargs):
        key_init(self, policy, key_usage or "ENCRYPT_DECRYPT", *args, **kwargs)

    Key.__init__ = patched_init


# -- SSM -------------------------------------------------------------------------------------


def _patch_ssm():
    """An `aws:ec2:image` value is validated after PutParameter answers, as Parameter Store
    does: the put answers with its version, and the version is then dropped when the value is
    not an available AMI of the account in the region. moto keeps every value."""
    from moto.ec2.models import ec2_backends
    from moto.ssm.models import SimpleSystemManagerBackend

    put_parameter = SimpleSystemManagerBackend.put_parameter

    def available_image(backend, image_id):
        ec2 = ec2_backends[backend.account_id][backend.region_name]
        ami = ec2.amis.get(image_id)
        return ami is not None and ami.state == "available"

    def patched_put_parameter(self, name, description, value, parameter_type, allowed_pattern, keyid,
                              overwrite, tags, data_type, tier, policies):
        new = put_parameter(self, name, description, value, parameter_type, allowed_pattern, keyid,
                            overwrite, tags, data_type, tier, policies)
        if data_type == "aws:ec2:image" and not available_image(self, value):
            versions = self._parameters[name]
            versions.remove(new)
            if not versions:
                del self._parameters[name]
        return new

    SimpleSystemManagerBackend.put_parameter = patched_put_parameter


def _patch_run_command(instances, timing):
    """Run Command for real, through each instance's agent (`ssm_agent`): SendCommand and
    GetCommandInvocation replaced, DescribeInstanceInformation and CancelCommand added."""
    from moto.core.exceptions import JsonRESTError
    from moto.core.responses import ActionResult
    from moto.ec2.models import ec2_backends
    from moto.ssm.models import SimpleSystemManagerBackend
    from moto.ssm.responses import SimpleSystemManagerResponse

    from moto.logs.models import logs_backends

    from .ssm_agent import DEFAULT_LOG_GROUP, Agent, RunCommandError

    def role_policies(instance_id):
        for account in ec2_backends.values():
            for ec2 in account.values():
                association = ec2.iam_instance_profile_associations.get(instance_id)
                if association is not None:
                    roles = association.iam_instance_profile.roles
                    return [arn for role in roles for arn in role.managed_policies]
        return None

    def fetch_object(bucket, key):
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.exceptions import MissingBucket, MissingKey
        from moto.s3.models import s3_backends

        # The local cloud's one account, in the aws partition.
        try:
            found = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(bucket, key)
        except (MissingBucket, MissingKey):
            found = None
        if found is None:
            raise KeyError(key)
        return found.value

    def store_object(bucket, key, data):
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.exceptions import MissingBucket
        from moto.s3.models import s3_backends

        try:
            s3_backends[DEFAULT_ACCOUNT_ID]["aws"].put_object(bucket, key, data)
        except MissingBucket:
            raise KeyError(bucket)

    agent = Agent(instances, timing.profile, role_policies, fetch_object, store_object)
    send_command = SimpleSystemManagerBackend.send_command

    def answered(call):
        try:
            return call()
        except RunCommandError as e:
            raise JsonRESTError(e.code, str(e))

    def patched_send_command(self, comment, document_name, timeout_seconds, instance_ids, *args, parameters,
                             cloudwatch_output=None, **kwargs):
        answered(lambda: agent.check(document_name, instance_ids, parameters))
        # moto extends the list it is given in place (with the targets' instances): a copy.
        command = send_command(self, comment, document_name, timeout_seconds, list(instance_ids), *args,
                               parameters=parameters, **kwargs)
        command.status = "InProgress"
        log_group = None
        if (cloudwatch_output or {}).get("CloudWatchOutputEnabled"):
            log_group = cloudwatch_output.get("CloudWatchLogGroupName") or DEFAULT_LOG_GROUP
        command.cloudwatch_output = {"CloudWatchLogGroupName": log_group or "", "CloudWatchOutputEnabled": log_group is not None}
        bucket = kwargs.get("output_s3_bucket_name")
        output_s3 = (bucket, kwargs.get("output_s3_key_prefix") or "") if bucket else None
        agent.send(command.command_id, list(dict.fromkeys(instance_ids)), comment, document_name, parameters,
                   self.region_name, log_group, logs_backends[self.account_id][self.region_name], output_s3)
        return command

    def send_command_response(self):
        """moto's own, reading CloudWatchOutputConfig too, and answering it as SSM does."""
        command = self.ssm_backend.send_command(
            comment=self._get_param("Comment", ""),
            document_name=self._get_param("DocumentName"),
            timeout_seconds=self._get_int_param("TimeoutSeconds"),
            instance_ids=self._get_param("InstanceIds", []),
            max_concurrency=self._get_param("MaxConcurrency", "50"),
            max_errors=self._get_param("MaxErrors", "0"),
            notification_config=self._get_param("NotificationConfig"),
            output_s3_bucket_name=self._get_param("OutputS3BucketName", ""),
            output_s3_key_prefix=self._get_param("OutputS3KeyPrefix", ""),
            output_s3_region=self._get_param("OutputS3Region", ""),
            parameters=self._get_param("Parameters", {}),
            service_role_arn=self._get_param("ServiceRoleArn", ""),
            targets=self._get_param("Targets", []),
            cloudwatch_output=self._get_param("CloudWatchOutputConfig"),
        )
        return ActionResult({"Command": {**command.response_object(), "CloudWatchOutputConfig": command.cloudwatch_output}})

    def patched_get_command_invocation(self, command_id, instance_id, plugin_name):
        return answered(lambda: agent.invocation(command_id, instance_id))

    def describe_instance_information(self):
        wanted = []
        # Filters: Key and Values; the older InstanceInformationFilterList: key and valueSet.
        for f in self._get_param("Filters", []):
            if f.get("Key") == "InstanceIds":
                wanted += f.get("Values", [])
        for f in self._get_param("InstanceInformationFilterList", []):
            if f.get("key") == "InstanceIds":
                wanted += f.get("valueSet", [])
        running = list(wanted or instances.running)
        return ActionResult({"InstanceInformationList": agent.information(running)})

    def cancel_command(self):
        answered(lambda: agent.cancel(self._get_param("CommandId"), self._get_param("InstanceIds")))
        return ActionResult({})

    SimpleSystemManagerBackend.send_command = patched_send_command
    SimpleSystemManagerResponse.send_command = send_command_response
    SimpleSystemManagerBackend.get_command_invocation = patched_get_command_invocation
    SimpleSystemManagerResponse.describe_instance_information = describe_instance_information
    SimpleSystemManagerResponse.cancel_command = cancel_command


# -- what EC2 knows of an image's life: disabled, deprecated, referenced -----------------------

# What DescribeImageReferences checks when asked for every resource type, with EC2's
# defaults: instances in any state but terminated, the 20 newest versions of each launch
# template, and `aws:ec2:image` parameters by their current value.
REFERENCING_INSTANCE_STATES = ["pending", "running", "shutting-down", "stopping", "stopped"]
LAUNCH_TEMPLATE_VERSION_DEPTH = 20


def _patch_image_lifecycle():
    """DisableImage/EnableImage, EnableImageDeprecation/DisableImageDeprecation and
    DescribeImageReferences as EC2 answers them (moto has none of them), and DescribeImages
    leaving disabled images out unless asked for them."""
    from moto.core.responses import ActionResult
    from moto.ssm.models import ssm_backends

    def image(self):
        return self.ec2_backend.describe_images(ami_ids=[self._get_param("ImageId")])[0]

    def describe_images(self):
        self.error_on_dryrun()
        images = self.ec2_backend.describe_images(
            ami_ids=self._get_param("ImageIds", []), filters=self._filters_from_querystring(),
            exec_users=self._get_param("ExecutableUsers", []), owners=self._get_param("Owners", []))
        if not self._get_param("IncludeDisabled", False):
            images = [i for i in images if i.state != "disabled"]
        return ActionResult({"Images": images})

    def disable_image(self):
        self.error_on_dryrun()
        image(self).state = "disabled"
        return ActionResult({"Return": True})

    def enable_image(self):
        self.error_on_dryrun()
        found = image(self)
        if found.state == "disabled":
            found.state = "available"
        return ActionResult({"Return": True})

    def enable_image_deprecation(self):
        self.error_on_dryrun()
        at = self._get_param("DeprecateAt")
        image(self).deprecation_time = at if isinstance(at, str) else at.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        return ActionResult({"Return": True})

    def disable_image_deprecation(self):
        self.error_on_dryrun()
        image(self).deprecation_time = None
        return ActionResult({"Return": True})

    def describe_image_references(self):
        backend = self.ec2_backend
        ids = self._get_param("ImageIds", [])
        backend.describe_images(ami_ids=ids)  # InvalidAMIID.NotFound for an unknown id
        asked = {t.get("ResourceType"): {o.get("OptionName"): o.get("OptionValues", []) for o in t.get("ResourceTypeOptions", [])}
                 for t in self._get_param("ResourceTypes", [])}
        if self._get_param("IncludeAllResourceTypes", False):
            for kind in ("ec2:Instance", "ec2:LaunchTemplate", "ssm:Parameter"):
                asked.setdefault(kind, {})
        prefix = f"arn:aws:ec2:{backend.region_name}:{backend.account_id}"
        references = []
        if "ec2:Instance" in asked:
            states = asked["ec2:Instance"].get("state-name") or REFERENCING_INSTANCE_STATES
            for instance in backend.all_instances():
                if instance.image_id in ids and instance.state in states:
                    references.append({"ImageId": instance.image_id, "ResourceType": "ec2:Instance",
                                       "Arn": f"{prefix}:instance/{instance.id}"})
        if "ec2:LaunchTemplate" in asked:
            depth = int((asked["ec2:LaunchTemplate"].get("version-depth") or [LAUNCH_TEMPLATE_VERSION_DEPTH])[0])
            for template in backend.launch_templates.values():
                named = {v.image_id for v in template.versions[-depth:]} & set(ids)
                for image_id in sorted(named):
                    references.append({"ImageId": image_id, "ResourceType": "ec2:LaunchTemplate",
                                       "Arn": f"{prefix}:launch-template/{template.id}"})
        if "ssm:Parameter" in asked:
            ssm = ssm_backends[backend.account_id][backend.region_name]
            for name, versions in list(ssm._parameters.items()):
                if versions and versions[-1].data_type == "aws:ec2:image" and versions[-1].value in ids:
                    references.append({"ImageId": versions[-1].value, "ResourceType": "ssm:Parameter",
                                       "Arn": f"arn:aws:ssm:{backend.region_name}:{backend.account_id}:parameter/{name.lstrip('/')}"})
        return ActionResult({"ImageReferences": references})

    AmisResponse.describe_images = describe_images
    AmisResponse.disable_image = disable_image
    AmisResponse.enable_image = enable_image
    AmisResponse.enable_image_deprecation = enable_image_deprecation
    AmisResponse.disable_image_deprecation = disable_image_deprecation
    AmisResponse.describe_image_references = describe_image_references


# -- launch templates, a page at a time -------------------------------------------------------

# EC2 pages DescribeLaunchTemplates and DescribeLaunchTemplateVersions (MaxResults 1-200, a
# NextToken while more remain); moto cuts the list at MaxResults (15 when not given) and says
# nothing of the rest, so a client reading one page would look complete.
LAUNCH_TEMPLATE_PAGE = 100


def _patch_launch_template_pages():
    from moto.core.responses import ActionResult
    from moto.ec2.responses.launch_templates import LaunchTemplates

    def paged(self, key, items):
        size = self._get_int_param("MaxResults", LAUNCH_TEMPLATE_PAGE)
        if not 1 <= size <= 200:
            raise _error("InvalidParameterValue", f"MaxResults {size} is not between 1 and 200")
        start = int(self._get_param("NextToken") or 0)
        result = {key: items[start:start + size]}
        if start + size < len(items):
            result["NextToken"] = str(start + size)
        return result

    def unpaged(self, method):
        """Runs moto's answer with no cut, by asking for more than there can be."""
        original_get_int = self._get_int_param
        self._get_int_param = lambda name, default=None: 10**9 if name == "MaxResults" else original_get_int(name, default)
        try:
            return method(self)
        finally:
            self._get_int_param = original_get_int

    describe_versions = LaunchTemplates.describe_launch_template_versions
    describe_templates = LaunchTemplates.describe_launch_templates

    def describe_launch_template_versions(self):
        answer = unpaged(self, describe_versions)
        return ActionResult(paged(self, "LaunchTemplateVersions", answer.result["LaunchTemplateVersions"]))

    def describe_launch_templates(self):
        answer = unpaged(self, describe_templates)
        return ActionResult(paged(self, "LaunchTemplates", answer.result["LaunchTemplates"]))

    LaunchTemplates.describe_launch_template_versions = describe_launch_template_versions
    LaunchTemplates.describe_launch_templates = describe_launch_templates


# -- copies across regions --------------------------------------------------------------------


def _default_ebs_key(backend):
    return f"arn:aws:kms:{backend.region_name}:{backend.account_id}:alias/aws/ebs"


def _patch_copy_image(timing):
    """CopyImage as EC2 carries it out, across regions: each of the source's snapshots is
    copied (its blocks too) into the destination region, encrypted with `KmsKeyId` when
    asked, else as the source is (with the region's default key); the copy keeps the
    source's layout and boot flags and IMDS setting, but not its tags (unless
    `CopyImageTags`), launch permissions or deprecation time; it takes the call's
    `TagSpecifications`, and a repeated `ClientToken` answers the first copy. A key the
    region cannot use fails the copy after it started, as EC2 does: the image ends `failed`.
    ModifyImageAttribute takes `ImdsSupport` (moto's does not)."""
    from moto.core.responses import ActionResult, EmptyResult
    from moto.ec2.models import ec2_backends
    from moto.ec2.responses.amis import AmisResponse

    def copy_image(self):
        self.error_on_dryrun()
        backend = self.ec2_backend
        token = self._get_param("ClientToken")
        tokens = backend.__dict__.setdefault("_copy_image_tokens", {})
        if token and token in tokens:
            return ActionResult({"ImageId": tokens[token]})
        source_region = self._get_param("SourceRegion")
        source_id = self._get_param("SourceImageId")
        name = self._get_param("Name")
        if source_region not in ec2_backends[backend.account_id].regions:
            raise _error("InvalidParameterValue", f"Invalid source region: {source_region}")
        source_backend = ec2_backends[backend.account_id][source_region]
        source = source_backend.describe_images(ami_ids=[source_id])[0]
        if source.state != "available":
            raise _error("IncorrectState", f"Image {source_id} is not in a valid state: {source.state}")
        refuse_duplicate_name(backend, name)
        encrypted = str(self._get_param("Encrypted", "false")).lower() == "true"
        kms_key_id = self._get_param("KmsKeyId")
        if kms_key_id and not encrypted:
            raise _error("InvalidParameterDependency", "The parameter KmsKeyId requires the parameter Encrypted to be set.")
        image = backend.copy_image(source_id, source_region, name, self._get_param("Description"))
        _drop_auto_snapshot(backend, image)
        specs = self._get_param("TagSpecifications", [])
        snapshot_tags = {t["Key"]: t["Value"] for spec in specs if spec.get("ResourceType") == "snapshot" for t in spec.get("Tags", [])}
        mappings = []
        usable = True
        for m in source.block_device_mappings:
            m = {**m, "Ebs": dict(m["Ebs"])} if "Ebs" in m else dict(m)
            snap_id = m.get("Ebs", {}).get("SnapshotId")
            if snap_id:
                was_encrypted = bool(source_backend.get_snapshot(snap_id).encrypted)
                key = kms_key_id or (_default_ebs_key(backend) if (encrypted or was_encrypted) else None)
                if kms_key_id and not _usable_kms_key(backend, kms_key_id):
                    usable = False
                copy = backend.copy_snapshot(snap_id, source_region, f"Copied for DestinationAmi {image.id} from SourceAmi {source_id} for SourceSnapshot {snap_id}", key)
                copy.encrypted = bool(key)
                if snapshot_tags:
                    backend.create_tags([copy.id], snapshot_tags)
                m["Ebs"]["SnapshotId"] = copy.id
                m["Ebs"]["Encrypted"] = bool(key)
                if kms_key_id:
                    m["Ebs"]["KmsKeyId"] = kms_key_id
                else:
                    m["Ebs"].pop("KmsKeyId", None)
            mappings.append(m)
        image.__dict__["_mappings"] = mappings
        for attr in ("root_device_name", "root_device_type", "architecture", "virtualization_type", "boot_mode",
                     "ena_support", "sriov_net_support", "sriov", "imds_support"):
            setattr(image, attr, getattr(source, attr, None))
        image.deprecation_time = None
        tags = {t["Key"]: t["Value"] for spec in specs if spec.get("ResourceType") == "image" for t in spec.get("Tags", [])}
        if str(self._get_param("CopyImageTags", "false")).lower() == "true":
            user = {k: v for k, v in source_backend.tags.get(source_id, {}).items() if not k.startswith("aws:")}
            tags = {**user, **tags}
        if tags:
            backend.create_tags([image.id], tags)
        if token:
            tokens[token] = image.id
        timing.start(("image", image.id), max(0, _image_ready_after(backend, timing, mappings)))
        timing.created(image.id)
        if not usable:
            image.state = "failed"
            image.state_reason = {"Code": "Client.InvalidKMSKey.InvalidState",
                                               "Message": f"The KMS key {kms_key_id} cannot be used in {backend.region_name}"}
        return ActionResult({"ImageId": image.id})

    modify = AmisResponse.modify_image_attribute

    def modify_image_attribute(self):
        imds = self._get_param("ImdsSupport")
        if isinstance(imds, dict):
            imds = imds.get("Value")
        if imds is None:
            return modify(self)
        self.error_on_dryrun()
        image = self.ec2_backend.describe_images(ami_ids=[self._get_param("ImageId")])[0]
        if imds != "v2.0":
            raise _error("InvalidParameterValue", f"Value ({imds}) for parameter imdsSupport is invalid. Valid value is v2.0.")
        image.imds_support = imds
        return EmptyResult()

    AmisResponse.copy_image = copy_image
    AmisResponse.modify_image_attribute = modify_image_attribute

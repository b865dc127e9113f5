"""Systems Manager's agent on the local cloud's instances, and Run Command through it.

moto stores a SendCommand and answers Success at once, running nothing; it has no
DescribeInstanceInformation and no CancelCommand. Here, as on AWS:

- An instance is a managed node (DescribeInstanceInformation, PingStatus Online) once it runs,
  its image holds the agent (`AGENT`), and its instance profile's role has AWS's
  AmazonSSMManagedInstanceCore policy; the agent registers `agent_start` seconds (the latency
  profile's) after boot. Without any of these, it never registers.
- SendCommand of AWS-RunShellScript to managed nodes only (else InvalidInstanceId): the
  commands are written as one script into the instance and run by `sh`, as root, inside the
  instance (its PID and UTS namespaces, chrooted into its root), in `workingDirectory`, with
  AWS_SSM_INSTANCE_ID and AWS_SSM_REGION_NAME set, cut at `executionTimeout` seconds (5 to
  172,800; another value is the default 3,600, as the agent does).
- GetCommandInvocation: InvocationDoesNotExist until the agent has taken the command; then
  Pending, InProgress, and Success, Failed, TimedOut or Cancelled with the exit code, the first
  24,000 characters of standard output and the first 8,000 of standard error (empty until it
  ends, as AWS returns them; a failure adds the agent's `failed to run commands: exit status
  N`); a command killed at its timeout or cancelled answers 137, as the agent does.
- CancelCommand ends the command's processes; its invocations are Cancelled.
- CloudWatchOutputConfig: with CloudWatchOutputEnabled, the agent streams the command's output
  into the log group (`aws/ssm/AWS-RunShellScript` when none is named; made when missing),
  one event per non-blank line, in the streams `{CommandId}/{InstanceId}/aws-runShellScript/stdout`
  and `.../stderr`, made at their first line. It sends what was written every `log_upload`
  seconds of the latency profile, and the last lines that long after GetCommandInvocation
  first answered the final status (at the latest `LAST_LINES_WAIT` after it was final): a
  reader of the streams must not take the status for the end of the output. It
  streams only when the instance's role may write logs (`LOG_POLICIES`); otherwise the output
  reaches GetCommandInvocation alone, as the real agent's upload fails on its own.
- OutputS3BucketName (and OutputS3KeyPrefix): once a script has ended, before its status is
  final, the agent puts its whole output, uncut, as `{prefix}/{CommandId}/{InstanceId}/
  awsrunShellScript/0.awsrunShellScript/stdout` and `.../stderr` (a stream it wrote nothing to
  is not put), and GetCommandInvocation answers their URLs; only when the instance's role may
  write S3 (`S3_WRITE_POLICIES`), as the real agent's upload fails on its own otherwise.
- AWS-DownloadContent with sourceType S3: the agent fetches the object named by sourceInfo's
  `path` (`https://s3.amazonaws.com/BUCKET/KEY`, or the bucket's own or regional host) with the
  instance's role, into the directory `destinationPath` inside the instance (made when missing),
  under the key's last part. The role must be allowed to read S3 (`S3_READ_POLICIES`);
  otherwise, or when the object is not there, the invocation Fails with the agent's message.
"""

import json
import re

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

# Where AL2023 keeps the agent; the local cloud looks for it in every image.
AGENT = "usr/bin/amazon-ssm-agent"
MANAGED_POLICY = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"
# AWS's managed policies that let the agent write a command's output to CloudWatch Logs.
LOG_POLICIES = ("arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy", "arn:aws:iam::aws:policy/CloudWatchLogsFullAccess",
                "arn:aws:iam::aws:policy/service-role/AmazonEC2RoleforSSM")
DEFAULT_LOG_GROUP = "aws/ssm/AWS-RunShellScript"
# How long the last lines of a command wait for its final status to be read, at most.
LAST_LINES_WAIT = 30
PLUGIN_ID = "aws-runShellScript"
STDOUT_LIMIT = 24_000
STDERR_LIMIT = 8_000
# The agent's bounds: a timeout outside them is replaced by the default.
DEFAULT_EXECUTION_TIMEOUT = 3600
EXECUTION_TIMEOUT_BOUNDS = (5, 172_800)
# The statuses of a command that has ended.
ENDED = ("Success", "Failed", "TimedOut", "Cancelled")
# What the agent reports for a command it killed (timeout or cancel), as SIGKILL's shell code.
KILLED = 137
SHELL_DOCUMENT = "AWS-RunShellScript"
DOWNLOAD_DOCUMENT = "AWS-DownloadContent"
# Each document's parameters, and its one plugin.
PARAMETERS = {SHELL_DOCUMENT: {"commands", "workingDirectory", "executionTimeout"},
              DOWNLOAD_DOCUMENT: {"sourceType", "sourceInfo", "destinationPath"}}
PLUGINS = {SHELL_DOCUMENT: "aws:runShellScript", DOWNLOAD_DOCUMENT: "aws:downloadContent"}
# AWS's managed policies that let the agent read an object from any bucket.
S3_WRITE_POLICIES = ("arn:aws:iam::aws:policy/AmazonS3FullAccess", "arn:aws:iam::aws:policy/service-role/AmazonEC2RoleforSSM")
S3_READ_POLICIES = ("arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess", "arn:aws:iam::aws:policy/AmazonS3FullAccess",
                    "arn:aws:iam::aws:policy/service-role/AmazonEC2RoleforSSM")
# Where the agent writes each command's script, inside the instance.
SCRIPTS = "var/lib/amazon/ssm"


class RunCommandError(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


@dataclass
class Invocation:
    command_id: str
    instance_id: str
    comment: str
    taken_at: float  # monotonic: when the agent takes it
    status: str = "Pending"
    details: str = "Pending"
    response_code: int = -1
    stdout: str = ""
    stderr: str = ""
    started: datetime | None = None
    ended: datetime | None = None
    process: subprocess.Popen | None = None
    cancelled: bool = False
    # The log group the output streams into, when the command asked for it.
    log_group: str | None = None
    document: str = SHELL_DOCUMENT
    # (bucket, prefix) the script's output goes to once it has ended, and the URLs it went to.
    output_s3: tuple | None = None
    output_urls: dict = field(default_factory=dict)
    # Set once GetCommandInvocation answered the final status.
    final_read: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self):
        with self.lock:
            done = self.status in ENDED
            return {
                "CommandId": self.command_id,
                "InstanceId": self.instance_id,
                "Comment": self.comment,
                "DocumentName": self.document,
                "DocumentVersion": "$DEFAULT",
                "PluginName": PLUGINS[self.document],
                "ResponseCode": self.response_code,
                "ExecutionStartDateTime": self.started.isoformat() if self.started else "",
                "ExecutionEndDateTime": self.ended.isoformat() if self.ended else "",
                "ExecutionElapsedTime": f"PT{((self.ended or datetime.now(timezone.utc)) - self.started).total_seconds():.3f}S"
                if self.started else "",
                "Status": self.status,
                "StatusDetails": self.details,
                "StandardOutputContent": self.stdout[:STDOUT_LIMIT] if done else "",
                "StandardOutputUrl": self.output_urls.get("stdout", "") if done else "",
                "StandardErrorContent": self.stderr[:STDERR_LIMIT] if done else "",
                "StandardErrorUrl": self.output_urls.get("stderr", "") if done else "",
                "CloudWatchOutputConfig": {"CloudWatchLogGroupName": self.log_group or "",
                                           "CloudWatchOutputEnabled": self.log_group is not None},
            }


class Agent:
    """Every instance's agent: registration, and the commands sent to them."""

    def __init__(self, instances, profile: dict, role_policies, fetch_object, store_object):
        """`profile`: the latency profile's seconds, `agent_start` after boot until the agent
        registers, `command_pickup` after SendCommand until it takes the command (until then
        GetCommandInvocation answers InvocationDoesNotExist). `role_policies(instance_id)`: the
        policy ARNs of the role of the instance's profile, or None when it has none.
        `fetch_object(bucket, key)`: the object's bytes, from the account's S3, or KeyError;
        `store_object(bucket, key, data)` puts one, or raises KeyError for a missing bucket."""
        self.fetch_object = fetch_object
        self.store_object = store_object
        self.instances = instances
        self.agent_start = profile["agent_start"]
        self.pickup = profile["command_pickup"]
        self.log_upload = profile["log_upload"]
        self.role_policies = role_policies
        self.invocations: dict[tuple, Invocation] = {}
        self.lock = threading.Lock()

    def managed(self, instance_id) -> bool:
        """Whether the instance is a managed node: running, its image holding the agent, its
        role allowed to reach Systems Manager, and the agent up."""
        run = self.instances.running.get(instance_id)
        if run is None or not (run.root / AGENT).exists():
            return False
        if MANAGED_POLICY not in (self.role_policies(instance_id) or []):
            return False
        return time.monotonic() >= run.booted_at + self.agent_start

    def information(self, instance_ids):
        now = datetime.now(timezone.utc).isoformat()
        return [
            {"InstanceId": i, "PingStatus": "Online", "LastPingDateTime": now, "AgentVersion": "3.3.1142.0",
             "IsLatestVersion": True, "PlatformType": "Linux", "PlatformName": "Amazon Linux", "ResourceType": "EC2Instance",
             "AssociationStatus": "Success"}
            for i in instance_ids if self.managed(i)
        ]

    def check(self, document_name, instance_ids, parameters):
        """What SendCommand refuses before it makes a command."""
        if document_name not in PARAMETERS:
            raise RunCommandError("InvalidDocument", f"the local cloud runs {' and '.join(PARAMETERS)} only, not {document_name}")
        unknown = sorted(set(parameters) - PARAMETERS[document_name])
        if unknown:
            raise RunCommandError("InvalidParameters", f"only supply values to parameters defined in the document: {unknown}")
        if document_name == DOWNLOAD_DOCUMENT:
            source_type = (parameters.get("sourceType") or [""])[0]
            if source_type != "S3":
                raise RunCommandError("InvalidParameters", f"the local cloud downloads from S3 only, not {source_type!r}")
            if s3_location((parameters.get("sourceInfo") or [""])[0]) is None:
                raise RunCommandError("InvalidParameters", "sourceInfo must be JSON with the object's `path` URL")
        else:
            if not parameters.get("commands"):
                raise RunCommandError("InvalidParameters", "AWS-RunShellScript needs the parameter commands")
            timeout = (parameters.get("executionTimeout") or [str(DEFAULT_EXECUTION_TIMEOUT)])[0]
            if not str(timeout).isdigit():
                raise RunCommandError("InvalidParameters", f"executionTimeout {timeout!r} is not a number of seconds")
        unmanaged = [i for i in instance_ids if not self.managed(i)]
        if unmanaged or not instance_ids:
            raise RunCommandError("InvalidInstanceId", f"Instances {unmanaged} not in a valid state for account")

    def send(self, command_id, instance_ids, comment, document_name, parameters, region, log_group=None, logs=None,
             output_s3=None):
        """Hands a checked command to each instance's agent; with `log_group`, a script's output
        is streamed into it through `logs`, the account's CloudWatch Logs in the region."""
        for instance_id in instance_ids:
            invocation = Invocation(command_id, instance_id, comment, time.monotonic() + self.pickup,
                                    log_group=log_group, document=document_name, output_s3=output_s3)
            with self.lock:
                self.invocations[(command_id, instance_id)] = invocation
            if document_name == DOWNLOAD_DOCUMENT:
                work = (self._download, invocation, parameters)
            else:
                may_write_logs = any(p in LOG_POLICIES for p in self.role_policies(instance_id) or [])
                streams = (LogStreams(logs, log_group, command_id, instance_id, self.log_upload)
                           if log_group and may_write_logs else None)
                work = (self._run, invocation, parameters, region, streams)
            threading.Thread(target=work[0], args=work[1:], daemon=True).start()

    def invocation(self, command_id, instance_id):
        with self.lock:
            invocation = self.invocations.get((command_id, instance_id))
        if invocation is None or time.monotonic() < invocation.taken_at:
            raise RunCommandError("InvocationDoesNotExist", "")
        answer = invocation.answer()
        if answer["Status"] in ENDED:
            invocation.final_read.set()
        return answer

    def cancel(self, command_id, instance_ids=None):
        with self.lock:
            found = [v for (c, i), v in self.invocations.items()
                     if c == command_id and (not instance_ids or i in instance_ids)]
        if not found:
            raise RunCommandError("InvalidCommandId", "")
        for invocation in found:
            with invocation.lock:
                invocation.cancelled = True
                process = invocation.process
                if invocation.status in ("Pending", "InProgress"):
                    invocation.status, invocation.details = "Cancelling", "Cancelling"
            if process and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

    def _download(self, invocation: Invocation, parameters):
        """AWS-DownloadContent: the object, fetched with the instance's role, into the instance."""
        time.sleep(max(0.0, invocation.taken_at - time.monotonic()))
        bucket, key = s3_location(parameters["sourceInfo"][0])
        directory = (parameters.get("destinationPath") or [""])[0]
        with invocation.lock:
            if invocation.cancelled:
                invocation.status = invocation.details = "Cancelled"
                return
            invocation.status = invocation.details = "InProgress"
            invocation.started = datetime.now(timezone.utc)
        run = self.instances.running.get(invocation.instance_id)
        failure = None
        if not any(p in S3_READ_POLICIES for p in self.role_policies(invocation.instance_id) or []):
            failure = f"AccessDenied: the instance's role may not read s3://{bucket}/{key}"
        elif run is None or not directory.startswith("/"):
            failure = f"destinationPath {directory!r} is not an absolute path on a running instance"
        else:
            try:
                data = self.fetch_object(bucket, key)
            except KeyError:
                failure = f"NoSuchKey: s3://{bucket}/{key} does not exist"
        if failure is None:
            target = run.root / directory.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            (target / key.rsplit("/", 1)[-1]).write_bytes(data)
        with invocation.lock:
            invocation.ended = datetime.now(timezone.utc)
            if failure is None:
                invocation.status = invocation.details = "Success"
                invocation.response_code = 0
                invocation.stdout = f"Content downloaded to {directory}\n"
            else:
                invocation.status = invocation.details = "Failed"
                invocation.response_code = 1
                invocation.stderr = f"failed to download content: {failure}\n"

    def _run(self, invocation: Invocation, parameters, region: str, streams):
        timeout = int((parameters.get("executionTimeout") or [DEFAULT_EXECUTION_TIMEOUT])[0])
        low, high = EXECUTION_TIMEOUT_BOUNDS
        if not low <= timeout <= high:
            timeout = DEFAULT_EXECUTION_TIMEOUT
        directory = (parameters.get("workingDirectory") or [""])[0] or "/"
        script = "\n".join(parameters["commands"]) + "\n"
        try:
            self._run_command(invocation, script, directory, timeout, region, streams)
        finally:
            # The last lines go out after the status is final, as late as the agent sends them.
            if streams is not None:
                streams.close(invocation.final_read)

    def _run_command(self, invocation: Invocation, script: str, directory: str, timeout: int, region: str, streams):
        time.sleep(max(0.0, invocation.taken_at - time.monotonic()))
        run = self.instances.running.get(invocation.instance_id)
        init = instance_init(run)
        with invocation.lock:
            if invocation.cancelled:
                invocation.status = invocation.details = "Cancelled"
                return
            if init is None:
                invocation.status, invocation.details = "Failed", "Undeliverable"
                return
            invocation.status = invocation.details = "InProgress"
            invocation.started = datetime.now(timezone.utc)
            # The script as the agent writes it, in the instance.
            inside = f"/{SCRIPTS}/{invocation.instance_id}/document/orchestration/{invocation.command_id}/awsrunShellScript/0.awsrunShellScript/_script.sh"
            path = run.root / inside.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(script)
            path.chmod(0o700)
            # The instance's own PID and UTS namespaces, its root; a session of its own, so a
            # cancel or a timeout ends every process the script started.
            invocation.process = subprocess.Popen(
                ["nsenter", f"--target={init}", "--pid", "--uts", "--", "chroot", str(run.root),
                 "/bin/sh", "-c", 'cd "$1" && exec /bin/sh -c "$2"', "agent", directory, inside],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
                     "AWS_SSM_INSTANCE_ID": invocation.instance_id, "AWS_SSM_REGION_NAME": region},
            )
        # Each stream read line by line as it is written, kept whole for GetCommandInvocation
        # and streamed to CloudWatch Logs when asked.
        kept = {"stdout": [], "stderr": []}
        readers = [threading.Thread(target=read_lines, args=(pipe, kept[name], name, streams), daemon=True)
                   for name, pipe in (("stdout", invocation.process.stdout), ("stderr", invocation.process.stderr))]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            invocation.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(invocation.process.pid, signal.SIGKILL)
            invocation.process.wait()
        for reader in readers:
            reader.join()
        if invocation.output_s3 and any(p in S3_WRITE_POLICIES for p in self.role_policies(invocation.instance_id) or []):
            bucket, prefix = invocation.output_s3
            for name in ("stdout", "stderr"):
                if not kept[name]:
                    continue
                key = "/".join(part for part in (prefix.strip("/"), invocation.command_id, invocation.instance_id,
                                                 "awsrunShellScript", "0.awsrunShellScript", name) if part)
                try:
                    self.store_object(bucket, key, b"".join(kept[name]))
                    invocation.output_urls[name] = f"https://s3.{region}.amazonaws.com/{bucket}/{key}"
                except KeyError:
                    pass
        with invocation.lock:
            invocation.ended = datetime.now(timezone.utc)
            invocation.stdout = b"".join(kept["stdout"]).decode("utf-8", "replace")
            invocation.stderr = b"".join(kept["stderr"]).decode("utf-8", "replace")
            code = invocation.process.returncode
            # The agent tells a kill from a failure by its code alone: 137 is a timeout unless
            # the command was cancelled.
            code = KILLED if code < 0 else code
            invocation.response_code = code
            if invocation.cancelled:
                invocation.status = invocation.details = "Cancelled"
            elif timed_out or code == KILLED:
                invocation.status, invocation.details = "TimedOut", "ExecutionTimedOut"
            elif code == 0:
                invocation.status = invocation.details = "Success"
            else:
                invocation.status, invocation.details = "Failed", "Failed"
                invocation.stderr += f"failed to run commands: exit status {code}\n"



def s3_location(source_info: str):
    """(bucket, key) of AWS-DownloadContent's sourceInfo `{"path": URL}`, path-style or the
    bucket's own host; None when it names no object."""
    try:
        url = json.loads(source_info).get("path", "")
    except (ValueError, AttributeError):
        return None
    m = re.fullmatch(r"https://s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com/([^/]+)/(.+)", url) or \
        re.fullmatch(r"https://([^/]+)\.s3(?:[.-][a-z0-9-]+)?\.amazonaws\.com/(.+)", url)
    return (m.group(1), m.group(2)) if m else None


def read_lines(pipe, kept: list, name: str, streams):
    """Reads `pipe` to its end into `kept`, streaming each line to `streams` when given."""
    for line in iter(pipe.readline, b""):
        kept.append(line)
        if streams is not None:
            streams.put(name, line.decode("utf-8", "replace").rstrip("\n"))
    pipe.close()


class LogStreams:
    """A command's output streams in CloudWatch Logs, sent as the agent sends them: what was
    written, every `interval` seconds, and the rest that long after `close`."""

    def __init__(self, logs, group, command_id, instance_id, interval):
        self.logs = logs
        self.group = group
        self.prefix = f"{command_id}/{instance_id}/{PLUGIN_ID}"
        # Never a busy loop, even where the latency profile charges nothing.
        self.interval = max(interval, 0.05)
        self.pending = []
        self.closed = threading.Event()
        self.lock = threading.Lock()
        threading.Thread(target=self._send_every_interval, daemon=True).start()

    def put(self, stream, line):
        # CloudWatch Logs takes no empty message.
        if line.strip():
            with self.lock:
                self.pending.append((stream, line))

    def close(self, final_read: threading.Event):
        """The command is over: the rest goes `interval` after `final_read` is set."""
        self.final_read = final_read
        self.closed.set()

    def _send_every_interval(self):
        while True:
            closed = self.closed.wait(self.interval)
            if closed:
                self.final_read.wait(LAST_LINES_WAIT)
                time.sleep(self.interval)
            self._send()
            if closed:
                return

    def _send(self):
        with self.lock:
            pending, self.pending = self.pending, []
        for stream, line in pending:
            name = f"{self.prefix}/{stream}"
            self.logs.ensure_log_group(self.group)
            self.logs.ensure_log_stream(self.group, name)
            self.logs.put_log_events(self.group, name, [{"timestamp": int(time.time() * 1000), "message": line}])


def instance_init(run):
    """PID 1 of a running instance's PID namespace: the first child of its `unshare`."""
    if run is None or run.process is None or run.process.poll() is not None:
        return None
    try:
        children = open(f"/proc/{run.process.pid}/task/{run.process.pid}/children").read().split()
    except OSError:
        return None
    return int(children[0]) if children else None

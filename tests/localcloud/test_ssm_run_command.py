"""Run Command on the local cloud, through boto3 as any SDK calls it: an instance is a managed
node only with the agent in its image, a profile whose role has AmazonSSMManagedInstanceCore,
and its agent up; what is sent runs as root inside the instance, with its status, exit code
and output as GetCommandInvocation answers them; timeouts and cancels end it."""

import json
import os
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

MANAGED_POLICY = "arn:aws:iam::aws:policy/AmazonSSMManagedInstanceCore"


def profile(cloud, name, policies):
    iam = cloud.client("iam")
    iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))
    for arn in policies:
        iam.attach_role_policy(RoleName=name, PolicyArn=arn)
    iam.create_instance_profile(InstanceProfileName=name)
    iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return name


def launch(cloud, profile_name=None):
    ec2 = cloud.client("ec2")
    ami = json.loads(cloud.cli("ls").stdout)["vendor_amis"]["partitioned"]
    extra = {"IamInstanceProfile": {"Name": profile_name}} if profile_name else {}
    instance = ec2.run_instances(ImageId=ami, MinCount=1, MaxCount=1, InstanceType="t3.micro", **extra)["Instances"][0]["InstanceId"]
    ec2.get_waiter("instance_running").wait(InstanceIds=[instance], WaiterConfig={"Delay": 1, "MaxAttempts": 60})
    return instance


def managed(ssm, instance):
    answer = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [instance]}])
    return [i["InstanceId"] for i in answer["InstanceInformationList"] if i["PingStatus"] == "Online"]


def wait_managed(ssm, instance, seconds=20):
    deadline = time.monotonic() + seconds
    while not managed(ssm, instance):
        assert time.monotonic() < deadline, f"{instance} never registered"
        time.sleep(0.2)


def run(ssm, instance, commands, **parameters):
    """Sends `commands`; the invocation once it has ended."""
    params = {"commands": commands, **{k: [str(v)] for k, v in parameters.items()}}
    command_id = ssm.send_command(InstanceIds=[instance], DocumentName="AWS-RunShellScript", Parameters=params)["Command"]["CommandId"]
    return command_id, ended(ssm, command_id, instance)


def ended(ssm, command_id, instance, seconds=30):
    deadline = time.monotonic() + seconds
    while True:
        try:
            answer = ssm.get_command_invocation(CommandId=command_id, InstanceId=instance)
            if answer["Status"] in ("Success", "Failed", "TimedOut", "Cancelled"):
                return answer
        except ClientError as e:
            assert e.response["Error"]["Code"] == "InvocationDoesNotExist", e
        assert time.monotonic() < deadline, f"{command_id} never ended"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def node(cloud):
    instance = launch(cloud, profile(cloud, "ssm-core", [MANAGED_POLICY]))
    wait_managed(cloud.client("ssm"), instance)
    yield instance
    cloud.client("ec2").terminate_instances(InstanceIds=[instance])


def test_without_a_suitable_profile_an_instance_never_registers_and_is_refused(cloud):
    ssm = cloud.client("ssm")
    bare = launch(cloud)
    weak = launch(cloud, profile(cloud, "no-ssm", ["arn:aws:iam::aws:policy/ReadOnlyAccess"]))
    time.sleep(1.5)  # longer than the quick profile's agent start
    for instance in (bare, weak):
        assert managed(ssm, instance) == []
        with pytest.raises(ClientError) as refused:
            ssm.send_command(InstanceIds=[instance], DocumentName="AWS-RunShellScript", Parameters={"commands": ["true"]})
        assert refused.value.response["Error"]["Code"] == "InvalidInstanceId"
    cloud.client("ec2").terminate_instances(InstanceIds=[bare, weak])


def test_a_command_runs_as_root_inside_the_instance_with_its_output_and_code(cloud, node):
    ssm = cloud.client("ssm")
    _, answer = run(ssm, node, ["id -u", "hostname", "echo oops >&2", "echo written > /root/ssm-was-here",
                                "echo $AWS_SSM_INSTANCE_ID"])
    assert answer["Status"] == "Success" and answer["ResponseCode"] == 0, answer
    uid, hostname, instance_id = answer["StandardOutputContent"].split()
    assert (uid, instance_id) == ("0", node)
    assert hostname.startswith("ip-127-"), "the instance's own hostname"
    assert answer["StandardErrorContent"] == "oops\n"
    root = cloud.state / "instances" / node / "root"
    assert (root / "root/ssm-was-here").read_text() == "written\n", "it ran in the instance's root"

    _, failed = run(ssm, node, ["echo before", "exit 3"])
    assert (failed["Status"], failed["ResponseCode"], failed["StandardOutputContent"]) == ("Failed", 3, "before\n")
    assert failed["StandardErrorContent"] == "failed to run commands: exit status 3\n"

    _, where = run(ssm, node, ["pwd"], workingDirectory="/etc")
    assert where["StandardOutputContent"] == "/etc\n"


def test_output_is_cut_at_24000_characters_of_stdout_and_8000_of_stderr(cloud, node):
    _, answer = run(cloud.client("ssm"), node, ["head -c 30000 /dev/zero | tr '\\0' o", "head -c 9000 /dev/zero | tr '\\0' e >&2"])
    assert len(answer["StandardOutputContent"]) == 24000
    assert len(answer["StandardErrorContent"]) == 8000


def test_a_command_past_its_timeout_or_cancelled_is_ended_with_its_processes(cloud, node):
    ssm = cloud.client("ssm")
    _, timed_out = run(ssm, node, ["sleep 60 &", "echo $! > /root/sleeper", "wait"], executionTimeout=5)
    assert (timed_out["Status"], timed_out["StatusDetails"], timed_out["ResponseCode"]) == ("TimedOut", "ExecutionTimedOut", 137)
    root = cloud.state / "instances" / node / "root"
    assert processes_in(root, b"sleep\x0060\x00") == [], "the timed-out command's background sleep"

    command_id = ssm.send_command(InstanceIds=[node], DocumentName="AWS-RunShellScript",
                                  Parameters={"commands": ["echo $$ > /root/cancelled", "sleep 60"]})["Command"]["CommandId"]
    deadline = time.monotonic() + 10
    while not (root / "root/cancelled").exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    ssm.cancel_command(CommandId=command_id, InstanceIds=[node])
    cancelled = ended(ssm, command_id, node)
    assert (cancelled["Status"], cancelled["ResponseCode"]) == ("Cancelled", 137)
    # Nothing the two commands started is left in the instance.
    assert processes_in(root, b"sleep\x0060\x00") == []


def processes_in(root, cmdline):
    """This host's processes whose root is `root` and whose command line is `cmdline`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and os.readlink(proc / "root") == str(root) and (proc / "cmdline").read_bytes() == cmdline:
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_parameters_the_document_lacks_are_refused_and_a_timeout_out_of_bounds_is_the_default(cloud, node):
    ssm = cloud.client("ssm")
    for parameters in ({"commands": ["true"], "shell": ["bash"]}, {"commands": ["true"], "executionTimeout": ["soon"]}):
        with pytest.raises(ClientError) as refused:
            ssm.send_command(InstanceIds=[node], DocumentName="AWS-RunShellScript", Parameters=parameters)
        assert refused.value.response["Error"]["Code"] == "InvalidParameters"
    # Below the agent's 5 seconds: the default hour, so a 2 s command ends on its own.
    _, answer = run(ssm, node, ["sleep 2", "echo done"], executionTimeout=1)
    assert (answer["Status"], answer["StandardOutputContent"]) == ("Success", "done\n")


def test_a_fault_injected_into_send_command_is_answered_and_runs_nothing(cloud, node):
    # Two: a client that does not retry still tries twice (`max_attempts` counts the retries).
    ssm = cloud.client("ssm", retries=False)
    cloud.cli("fault", "SendCommand", "--error", "ThrottlingException", "--times", "2")
    with pytest.raises(ClientError) as throttled:
        ssm.send_command(InstanceIds=[node], DocumentName="AWS-RunShellScript", Parameters={"commands": ["touch /root/never"]})
    assert throttled.value.response["Error"]["Code"] == "ThrottlingException"
    time.sleep(0.5)
    assert not (cloud.state / "instances" / node / "root/root/never").exists()


LOG_POLICY = "arn:aws:iam::aws:policy/CloudWatchAgentServerPolicy"


def log_lines(logs, group, stream):
    try:
        events = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True)["events"]
    except ClientError as e:
        assert e.response["Error"]["Code"] == "ResourceNotFoundException", e
        return []
    return [e["message"] for e in events]


def eventually(logs, group, stream, wanted, seconds=10):
    """Waits until the stream holds `wanted`."""
    deadline = time.monotonic() + seconds
    while log_lines(logs, group, stream) != wanted:
        assert time.monotonic() < deadline, f"{stream} holds {log_lines(logs, group, stream)}, not {wanted}"
        time.sleep(0.1)


def test_output_streams_into_cloudwatch_logs_while_the_command_runs(cloud):
    ssm, logs = cloud.client("ssm"), cloud.client("logs")
    node = launch(cloud, profile(cloud, "ssm-logs", [MANAGED_POLICY, LOG_POLICY]))
    wait_managed(ssm, node)
    gate = cloud.state / "instances" / node / "root/root/go"
    command_id = ssm.send_command(
        InstanceIds=[node], DocumentName="AWS-RunShellScript",
        Parameters={"commands": ["echo first", "echo", "echo warned >&2", "while [ ! -e /root/go ]; do sleep 0.1; done", "echo last"]},
        CloudWatchOutputConfig={"CloudWatchOutputEnabled": True, "CloudWatchLogGroupName": "/amibake/builds"},
    )["Command"]
    assert command_id["CloudWatchOutputConfig"] == {"CloudWatchLogGroupName": "/amibake/builds", "CloudWatchOutputEnabled": True}
    command_id = command_id["CommandId"]
    stdout = f"{command_id}/{node}/aws-runShellScript/stdout"
    stderr = f"{command_id}/{node}/aws-runShellScript/stderr"
    # The first lines are there while the command still waits at its gate.
    deadline = time.monotonic() + 20
    while log_lines(logs, "/amibake/builds", stdout) != ["first"] or log_lines(logs, "/amibake/builds", stderr) != ["warned"]:
        assert time.monotonic() < deadline, "the first lines never reached the log group"
        time.sleep(0.1)
    assert ssm.get_command_invocation(CommandId=command_id, InstanceId=node)["Status"] == "InProgress"
    gate.touch()
    answer = ended(ssm, command_id, node)
    assert answer["Status"] == "Success"
    assert answer["StandardOutputContent"] == "first\n\nlast\n"
    assert answer["CloudWatchOutputConfig"]["CloudWatchLogGroupName"] == "/amibake/builds"
    # The last lines may reach the group after the status is final, as the agent sends them
    # in batches; blank lines are not events (CloudWatch Logs takes no empty message).
    eventually(logs, "/amibake/builds", stdout, ["first", "last"])
    # Without a group named, the agent's default one.
    command_id = ssm.send_command(InstanceIds=[node], DocumentName="AWS-RunShellScript", Parameters={"commands": ["echo here"]},
                                  CloudWatchOutputConfig={"CloudWatchOutputEnabled": True})["Command"]["CommandId"]
    ended(ssm, command_id, node)
    eventually(logs, "aws/ssm/AWS-RunShellScript", f"{command_id}/{node}/aws-runShellScript/stdout", ["here"])
    cloud.client("ec2").terminate_instances(InstanceIds=[node])


def test_a_role_that_may_not_write_logs_streams_nothing_and_the_invocation_holds_the_output(cloud, node):
    ssm, logs = cloud.client("ssm"), cloud.client("logs")
    command_id = ssm.send_command(InstanceIds=[node], DocumentName="AWS-RunShellScript", Parameters={"commands": ["echo kept"]},
                                  CloudWatchOutputConfig={"CloudWatchOutputEnabled": True, "CloudWatchLogGroupName": "/amibake/denied"})["Command"]["CommandId"]
    answer = ended(ssm, command_id, node)
    assert answer["StandardOutputContent"] == "kept\n"
    assert log_lines(logs, "/amibake/denied", f"{command_id}/{node}/aws-runShellScript/stdout") == []
    assert "/amibake/denied" not in [g["logGroupName"] for g in logs.describe_log_groups()["logGroups"]]


def download(ssm, instance, source_info, destination):
    command_id = ssm.send_command(InstanceIds=[instance], DocumentName="AWS-DownloadContent", Parameters={
        "sourceType": ["S3"], "sourceInfo": [json.dumps(source_info)], "destinationPath": [destination]})["Command"]["CommandId"]
    return ended(ssm, command_id, instance)


def test_download_content_fetches_an_object_with_the_instances_role_into_the_instance(cloud, node):
    ssm, s3 = cloud.client("ssm"), cloud.client("s3")
    s3.create_bucket(Bucket="lc-downloads")
    s3.put_object(Bucket="lc-downloads", Key="runs/1/blob", Body=b"\x00payload\xff")
    reader = launch(cloud, profile(cloud, "ssm-s3", [MANAGED_POLICY, "arn:aws:iam::aws:policy/AmazonS3ReadOnlyAccess"]))
    wait_managed(ssm, reader)
    try:
        answer = download(ssm, reader, {"path": "https://s3.amazonaws.com/lc-downloads/runs/1/blob"}, "/run/fetched")
        assert (answer["Status"], answer["PluginName"], answer["DocumentName"]) == ("Success", "aws:downloadContent", "AWS-DownloadContent")
        _, inside = run(ssm, reader, ["od -An -c /run/fetched/blob"])
        assert "p   a   y   l   o   a   d" in inside["StandardOutputContent"]
        # An object that is not there fails the invocation, naming it.
        missing = download(ssm, reader, {"path": "https://lc-downloads.s3.amazonaws.com/runs/1/gone"}, "/run/fetched")
        assert missing["Status"] == "Failed" and "runs/1/gone" in missing["StandardErrorContent"]
    finally:
        cloud.client("ec2").terminate_instances(InstanceIds=[reader])
    # A role without a policy that reads S3: the agent is refused, and nothing arrives.
    denied = download(ssm, node, {"path": "https://s3.amazonaws.com/lc-downloads/runs/1/blob"}, "/run/denied")
    assert denied["Status"] == "Failed" and "AccessDenied" in denied["StandardErrorContent"]
    _, inside = run(ssm, node, ["ls /run/denied 2>&1 || echo absent"])
    assert "absent" in inside["StandardOutputContent"]
    # Only S3 sources, and only the document's parameters.
    for parameters in ({"sourceType": ["GitHub"], "sourceInfo": ["{}"]}, {"sourceType": ["S3"], "sourceInfo": ["not json"]},
                       {"sourceType": ["S3"], "sourceInfo": ['{"path": "https://s3.amazonaws.com/b/k"}'], "commands": ["true"]}):
        with pytest.raises(ClientError) as refused:
            ssm.send_command(InstanceIds=[node], DocumentName="AWS-DownloadContent", Parameters=parameters)
        assert refused.value.response["Error"]["Code"] == "InvalidParameters"
    # The call log names S3's actions and what they named, as for every other service.
    calls = [json.loads(line) for line in cloud.cli("calls").stdout.splitlines()]
    puts = [c for c in calls if c["service"] == "s3" and c["action"] == "PutObject"]
    assert puts and puts[-1]["ids"] == {"Bucket": "lc-downloads", "Key": "runs/1/blob"}


def test_a_scripts_whole_output_goes_to_the_output_bucket_when_the_role_may_write_there(cloud, node):
    ssm, s3 = cloud.client("ssm"), cloud.client("s3")
    s3.create_bucket(Bucket="lc-output")
    writer = launch(cloud, profile(cloud, "ssm-s3-write", [MANAGED_POLICY, "arn:aws:iam::aws:policy/AmazonS3FullAccess"]))
    wait_managed(ssm, writer)
    script = ["for i in $(seq 1 3000); do echo \"line $i of a long output\"; done", "echo oops >&2"]
    try:
        for instance, written in ((writer, True), (node, False)):
            command_id = ssm.send_command(InstanceIds=[instance], DocumentName="AWS-RunShellScript", Parameters={"commands": script},
                                          OutputS3BucketName="lc-output", OutputS3KeyPrefix="runs/out")["Command"]["CommandId"]
            answer = ended(ssm, command_id, instance)
            assert len(answer["StandardOutputContent"]) == 24_000
            key = f"runs/out/{command_id}/{instance}/awsrunShellScript/0.awsrunShellScript/stdout"
            if written:
                whole = s3.get_object(Bucket="lc-output", Key=key)["Body"].read().decode()
                assert whole.splitlines()[-1] == "line 3000 of a long output"
                assert answer["StandardOutputUrl"].endswith(f"/lc-output/{key}")
                error = s3.get_object(Bucket="lc-output", Key=key.replace("/stdout", "/stderr"))["Body"].read()
                assert error == b"oops\n"
            else:
                # A role that may not write S3: the output reaches GetCommandInvocation alone.
                with pytest.raises(ClientError):
                    s3.get_object(Bucket="lc-output", Key=key)
                assert answer["StandardOutputUrl"] == ""
    finally:
        cloud.client("ec2").terminate_instances(InstanceIds=[writer])

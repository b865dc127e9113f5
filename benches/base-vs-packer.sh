#!/usr/bin/env bash
# The same base build (Debian vendor AMI by name filter, t3.small, one provisioner over SSH,
# stop, image) by amibake and by Debian's packer 1.6.6 amazon-ebs, on the same local cloud,
# for each latency profile. Prints the wall times and their ratio.
#
# Packer runs twice: as shipped (its waiters first poll after 15 s) and tuned with
# AWS_POLL_DELAY_SECONDS=1, the fairest setting it has. amibake is the debug build the tests
# use: its time is spent waiting on the cloud, not computing.
#
#   benches/base-vs-packer.sh [PROFILE...]     (default: quick realistic)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
profiles=("${@:-quick}")
[ $# -eq 0 ] && profiles=(quick realistic)

cargo build --quiet
work=$(mktemp -d /tmp/amibake-bench-base-XXXXXX)
state="$work/localcloud"
cleanup() {
    "$repo/tests/localcloud/localcloud" --state "$state" down >/dev/null 2>&1 || true
    # Only once nothing is mounted there: an instance's root holds a bind of /dev.
    if ! grep -q " $work" /proc/mounts; then rm -rf "$work"; fi
}
trap cleanup EXIT

cat >"$work/base.toml" <<'EOF'
[base]
name = "bench-base-${timestamp}"
source_ami = { owners = ["136693071363"], name = "debian-12-amd64-2*", most_recent = true }
instance_type = "t3.small"
ssh_username = "admin"
ssh_interface = "private_ip"
ssh_timeout_seconds = 60

[[base.provisioner]]
inline = ["echo 'written by amibake' | tee /etc/amibake-bench"]
EOF

seconds_of() { # seconds_of COMMAND...: runs it quietly, prints its wall time
    local start end
    start=$(date +%s.%N)
    if ! "$@" >"$work/last.log" 2>&1; then
        echo "failed: $*" >&2
        tail -20 "$work/last.log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }'
}

packer_build() { # packer_build POLL_DELAY|default
    local -a env=(HOME="$work" PACKER_CACHE_DIR="$work/packer_cache" CHECKPOINT_DISABLE=1)
    [ "$1" != default ] && env+=(AWS_POLL_DELAY_SECONDS="$1")
    env "${env[@]}" packer build -machine-readable "$repo/tests/localcloud/packer/ebs.json"
}

printf "%-10s %10s %16s %16s %8s %8s\n" profile amibake "packer (1 s)" "packer (as is)" ratio "ratio*"
for profile in "${profiles[@]}"; do
    eval "$("$repo/tests/localcloud/localcloud" --state "$state" up --latency "$profile")"
    ours=$(seconds_of "$repo/target/debug/amibake" base "$work/base.toml" --force)
    tuned=$(seconds_of packer_build 1)
    stock=$(seconds_of packer_build default)
    "$repo/tests/localcloud/localcloud" --state "$state" down >/dev/null
    awk -v p="$profile" -v a="$ours" -v t="$tuned" -v s="$stock" \
        'BEGIN { printf "%-10s %9.1fs %15.1fs %15.1fs %7.1fx %7.1fx\n", p, a, t, s, t / a, s / a }'
done
echo "ratio: packer tuned / amibake; ratio*: packer as shipped / amibake (higher is better for amibake)"

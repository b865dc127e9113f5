#!/usr/bin/env bash
# Prints how long `localcloud up` and `down` take with a warm image cache (target: up under
# 10 s), over a few runs. The first run on a fresh machine also builds the vendor image.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
state=$(mktemp -d /tmp/amibake-bench-localcloud-XXXXXX)
trap 'tests/localcloud/localcloud --state "$state" down >/dev/null 2>&1 || true; rm -rf "$state"' EXIT
for i in $(seq "$runs"); do
    start=$(date +%s.%N)
    tests/localcloud/localcloud --state "$state" up --latency none >/dev/null
    up=$(date +%s.%N)
    tests/localcloud/localcloud --state "$state" down
    down=$(date +%s.%N)
    awk -v i="$i" -v a="$start" -v b="$up" -v c="$down" 'BEGIN { printf "run %d: up %.2fs, down %.2fs\n", i, b - a, c - b }'
done

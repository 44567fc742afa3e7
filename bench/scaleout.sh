#!/usr/bin/env bash
# Scale-out on one fan-out scenario (100 jobs x 10 readers at 2,000 events/s): one and two
# gateway processes, on one redis-server and on a local Redis Cluster of 3 masters and
# 3 replicas, in alternation so that every configuration sees the same machine; 3 repeats each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ)-scaleout.jsonl
mkdir -p bench/results
for round in 1 2; do
  for redis in single cluster; do
    for processes in 1 2; do
      "$PY" -m bench.run fanout --target hub --redis "$redis" --processes "$processes" \
        --jobs 100 --readers 10 --rate 2000 --seconds 10 | tail -1 | tee -a "$out"
    done
  done
done
echo "results: $out" >&2

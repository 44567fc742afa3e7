#!/usr/bin/env bash
# The headline comparison, hub and Nchan alternating so that both see the same machine: 100 jobs x
# 10 readers at 2,000 events/s, each event appended with one HTTP POST for both (the same work: Nchan
# takes its messages over HTTP), and beside it the hub with events appended straight into Redis
# (one XADD + PUBLISH each, no HTTP), as earlier pairs were measured. 3 repeats each, twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ)-pairs.jsonl
mkdir -p bench/results
for round in 1 2; do
  for target in "hub --publish http" "nchan" "hub --publish direct"; do
    echo "== round $round: $target" >&2
    # shellcheck disable=SC2086
    "$PY" -m bench.run fanout --target $target --jobs 100 --readers 10 --rate 2000 --seconds 10 | tail -1 | tee -a "$out"
  done
done
echo "results: $out (tables: $PY -m bench.report $out)" >&2

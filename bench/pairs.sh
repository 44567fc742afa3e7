#!/usr/bin/env bash
# The headline comparison alone, hub and Nchan alternating, so that both see the same machine:
# 100 jobs x 10 readers at 2,000 events/s, 3 repeats each, twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ)-pairs.jsonl
mkdir -p bench/results
for target in hub nchan hub nchan; do
  "$PY" -m bench.run fanout --target "$target" --jobs 100 --readers 10 --rate 2000 --seconds 10 | tail -1 | tee -a "$out"
done
echo "results: $out" >&2

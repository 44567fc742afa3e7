#!/usr/bin/env bash
# Interval polling, hub and Nchan alternating: 1,000 clients, each polling one of 100 jobs once a
# second from its last id, while 500 events/s are appended with one HTTP POST each (5 a second per
# job, so every answer carries about 5 events). 3 repeats of 10 s each, twice.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ)-polling.jsonl
mkdir -p bench/results
for target in hub nchan hub nchan; do
  echo "== $target" >&2
  "$PY" -m bench.run poll-interval --target "$target" --clients 1000 --jobs 100 --rate 500 --seconds 10 \
    | tail -1 | tee -a "$out"
done
echo "results: $out (tables: $PY -m bench.report $out)" >&2

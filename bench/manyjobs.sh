#!/usr/bin/env bash
# Many jobs on one connection against one job per connection, alternating: 100 jobs at 2,000
# events/s (20 a second each), every job followed by 10 readers, either as 1,000
# GET /v1/jobs/{id}/events (one job each) or as 100 GET /v1/events?jobs= of 10 jobs each (a seeded
# shuffle of the jobs per round of readers: every job in 10 of them, no two alike). The same
# appends for both: straight into Redis by default (PUBLISH=http: one HTTP POST each). ROUNDS
# rounds (default 5) of one 10 s run of each, which goes first alternating (ABBA); one JSON line
# per run. A run during which other processes kept more than MAX_OTHER cores busy (0.25) is taken
# again, up to RETRIES times (2); the runs replaced go to <file>-replaced.jsonl.
# Tables: python -m bench.report <file>.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ROUNDS=${ROUNDS:-5}
PUBLISH=${PUBLISH:-direct}
MAX_OTHER=${MAX_OTHER:-0.25}
RETRIES=${RETRIES:-2}
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ)-many.jsonl
mkdir -p bench/results
for round in $(seq 1 "$ROUNDS"); do
  order="1 10"
  if [ $((round % 2)) -eq 0 ]; then order="10 1"; fi
  for per in $order; do
    for attempt in $(seq 0 "$RETRIES"); do
      echo "== round $round: $per job(s) per connection (attempt $((attempt + 1)))" >&2
      line=$("$PY" -m bench.run fanout --target hub --publish "$PUBLISH" --jobs 100 --readers 10 \
        --jobs-per-connection "$per" --rate 2000 --seconds 10 --repeat 1 | tail -1)
      busy=$("$PY" -c 'import json, sys; print(json.loads(sys.argv[1])["other_cores_busy"])' "$line")
      if [ "$attempt" -lt "$RETRIES" ] && "$PY" -c 'import sys; sys.exit(float(sys.argv[1]) <= float(sys.argv[2]))' \
        "$busy" "$MAX_OTHER"; then
        echo "   other processes kept $busy cores busy: taken again" >&2
        echo "$line" >>"${out%.jsonl}-replaced.jsonl"
        continue
      fi
      echo "$line" | tee -a "$out"
      break
    done
  done
done
echo "results: $out (tables: $PY -m bench.report $out)" >&2

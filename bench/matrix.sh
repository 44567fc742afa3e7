#!/usr/bin/env bash
# Every scenario of bench/RESULTS.md, in one run on one machine (about 20 minutes on 2 cores).
# Request costs against the web stack's floors are bench/requests.py's (wrk), not run here.
# Output: one JSON line per repeat and per median, in bench/results/<UTC date>.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=bench/results/$(date -u +%Y%m%dT%H%M%SZ).jsonl
mkdir -p bench/results
run() { echo "== $*" >&2; "$PY" -m bench.run "$@" | tail -1 | tee -a "$out"; }
targets="hub naive"
if [ -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then targets="hub naive nchan"; fi
# The hub twice: events appended with one HTTP POST each (as to Nchan: the same work), and
# straight into Redis (no HTTP).
run fanout --target hub --publish http --jobs 100 --readers 10 --rate 2000 --seconds 10
for target in $targets; do
  run fanout --target "$target" --jobs 100 --readers 10 --rate 2000 --seconds 10
done
run fanout --target hub --jobs 100 --readers 20 --rate 2000 --seconds 10
for target in $targets; do
  run fanout --target "$target" --jobs 1 --readers 1000 --rate 20 --seconds 10
done
run idle --target hub --jobs 100 --connections 10000 --repeat 1
for floor in floor-asgi floor-starlette; do run idle --target "$floor" --jobs 100 --connections 10000 --repeat 1; done
run idle --target naive --jobs 100 --connections 2000 --repeat 1
if [ -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then run idle --target nchan --jobs 100 --connections 10000 --repeat 1; fi
run poll --clients 1000 --jobs 100 --rate 200 --seconds 10
run poll --clients 1000 --jobs 100 --rate 200 --seconds 10 --wait 10
for target in $targets; do
  [ "$target" = naive ] && continue
  run poll-interval --target "$target" --clients 1000 --jobs 100 --rate 500 --seconds 10
done
run create --rate 200 --seconds 10
echo "results: $out (tables: $PY -m bench.report $out)" >&2

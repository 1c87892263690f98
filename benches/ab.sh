#!/usr/bin/env bash
# Two ssegate builds at the same time, under the same 1:1 load: each gets its own
# listener and N streams x 10 events/s from one origin, and the CPU each spends per
# 1M delivered events is read from /proc over the same window. Sequential runs on this
# shared machine drift by 10-20% from one minute to the next, which hides a change of a
# few per cent; side by side, the drift hits both. An A/A run (one build twice) agrees
# within ~1.5%. The builds swap listeners every round.
# Usage: benches/ab.sh BUILD_A BUILD_B [ROUNDS]   (env N=500 streams each, SECS=30)
# Loopback only; bounded in clients and seconds.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 BUILD_A BUILD_B [ROUNDS]" >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2") ROUNDS=${3:-2} N=${N:-500} SECS=${SECS:-30} WARM=8
cd "$(dirname "$0")/.."
. benches/lib.sh
cargo build --release --locked --example sse_origin --example sse_load 2>&1 | tail -1

ORIGIN=19120 P1=19121 P2=19122
W=$(mktemp -d /tmp/ssegate-ab.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT
for p in $P1 $P2; do gateway_conf $p "$W/$p.sock" $ORIGIN > "$W/$p.toml"; done

target/release/examples/sse_origin --port $ORIGIN --rate 10 --size 200 2>/dev/null & PIDS+=($!)
wait_port $ORIGIN
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then X=$A Y=$B; else X=$B Y=$A; fi
  "$X" -c "$W/$P1.toml" 2>"$W/x.log" & PX=$!; PIDS+=($PX)
  "$Y" -c "$W/$P2.toml" 2>"$W/y.log" & PY=$!; PIDS+=($PY)
  wait_port $P1; wait_port $P2
  LP=()
  for p in $P1 $P2; do
    target/release/examples/sse_load --url "http://127.0.0.1:$p/stream" --clients "$N" \
      --duration $((SECS + WARM)) --warmup $WARM --ramp 3000 --sources 16 > "$W/$p.json" & LP+=($!)
  done
  sleep $WARM; x0=$(cpu $PX); y0=$(cpu $PY); sleep "$SECS"; x1=$(cpu $PX); y1=$(cpu $PY)
  wait "${LP[@]}" || true
  kill $PX $PY; wait $PX $PY 2>/dev/null || true
  python3 - "$r" "$X" "$x0" "$x1" "$W/$P1.json" "$Y" "$y0" "$y1" "$W/$P2.json" <<'PY'
import json, sys
r, a = sys.argv[1], sys.argv[2:]
cells = []
for i in (0, 4):
    name, c0, c1, f = a[i:i + 4]
    j = json.load(open(f))
    ev = j["measured"]
    cpu = 1e6 * (float(c1) - float(c0)) / ev if ev else float("nan")
    cells.append(f"{name}: {cpu:.2f} s per 1M events, p99 {j['latency_us']['p99'] / 1000:.2f} ms, lost {j['lost']}")
print(f"round {r}: " + " | ".join(cells))
PY
done

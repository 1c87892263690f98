#!/usr/bin/env bash
# Two ssegate builds at the same time, under the same ordinary-request load: each gets its
# own listener in front of one nginx origin (the 2.7 KB page of requests.sh) and its own
# `wrk -t1 -c25`, and the CPU each spends per request is read from /proc over the same
# window. This is benches/ab.sh's method for requests: sequential runs of requests.sh
# drift by up to 20% between minutes on this shared machine, which hides a change of a few
# per cent; side by side, the drift hits both. The builds swap listeners every round.
# Usage: benches/ab-requests.sh BUILD_A BUILD_B [ROUNDS]   (env SECS=8, CONNS=25 each)
# Installs wrk and nginx from Debian's packages when missing. Loopback only; bounded in
# connections and seconds.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 BUILD_A BUILD_B [ROUNDS]" >&2; exit 2; }
A=$(realpath "$1") B=$(realpath "$2") ROUNDS=${3:-4} SECS=${SECS:-8} CONNS=${CONNS:-25}
cd "$(dirname "$0")/.."
. benches/lib.sh

need=()
for c in wrk:wrk nginx:nginx; do command -v "${c%%:*}" >/dev/null || need+=("${c#*:}"); done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

ORIGIN=19420 P1=19421 P2=19422
W=$(mktemp -d /tmp/ssegate-abreq.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT

page_origin "$W" $ORIGIN
nginx -p "$W/" -c "$W/origin.conf" -e "$W/origin-error.log" & PIDS+=($!)
wait_port $ORIGIN
# The minimal config of requests.sh's `ssegate` column: limits off, warnings only.
for p in $P1 $P2; do
  cat > "$W/$p.toml" <<EOF
[server]
threads = 2
log_level = "warn"
upgrade_sock = "$W/$p.sock"
[limits]
request_rate = 0
stream_connect_rate = 0
max_streams_per_client = 0
[[listeners]]
address = "127.0.0.1:$p"
[[upstreams]]
name = "origin"
servers = ["127.0.0.1:$ORIGIN"]
[[routes]]
upstream = "origin"
EOF
done

for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then X=$A Y=$B; else X=$B Y=$A; fi
  "$X" -c "$W/$P1.toml" 2>"$W/x.log" & PX=$!; PIDS+=($PX)
  "$Y" -c "$W/$P2.toml" 2>"$W/y.log" & PY=$!; PIDS+=($PY)
  wait_port $P1; wait_port $P2
  # Warm both pools first.
  wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$P1/page.html" >/dev/null & WX=$!
  wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$P2/page.html" >/dev/null
  wait $WX
  x0=$(cpu $PX); y0=$(cpu $PY)
  wrk -t1 -c"$CONNS" -d"${SECS}s" "http://127.0.0.1:$P1/page.html" > "$W/x.txt" & WX=$!
  wrk -t1 -c"$CONNS" -d"${SECS}s" "http://127.0.0.1:$P2/page.html" > "$W/y.txt" & WY=$!
  wait $WX $WY
  x1=$(cpu $PX); y1=$(cpu $PY)
  kill $PX $PY; wait $PX $PY 2>/dev/null || true
  nx=$(awk '/requests in/{print $1}' "$W/x.txt"); ny=$(awk '/requests in/{print $1}' "$W/y.txt")
  awk -v r="$r" -v X="$X" -v Y="$Y" -v nx="$nx" -v ny="$ny" -v x0="$x0" -v x1="$x1" -v y0="$y0" -v y1="$y1" 'BEGIN {
    printf "round %d: %s: %.2f us CPU per request (%d requests) | %s: %.2f us CPU per request (%d requests)\n",
      r, X, (x1 - x0) / nx * 1e6, nx, Y, (y1 - y0) / ny * 1e6, ny }'
done

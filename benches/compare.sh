#!/usr/bin/env bash
# Runs, in one go and under identical load, the synthetic origin direct, ssegate, nginx
# (proxy_buffering off) and HAProxy (option http-no-delay), and prints a table: memory
# per open stream (HTTP/1.1, and h2c with 100 streams per connection), CPU per million
# delivered events, latency, lost events.
# See BENCHMARKS.md. Usage: [PROXIES="direct ssegate"] benches/compare.sh [--quick]
#   SSEGATE_BASELINE=/path/to/an/older/ssegate adds a `baseline` column: that binary on
#   the same config, in the same run (before/after comparisons of a change).
#   --quick: smaller runs (a minute or two), to check the script itself.
#   CASES="one" runs only those of the four cases (idle h2c one shared); ROUNDS=3 runs
#   every proxy that many times, in alternating order (one row per run), to see a spread.
#   A `cluster` column (when redis-server is installed, or PROXIES names it): two ssegate
#   nodes sharing one Redis, clients spread over both with the same Host, one stream
#   key per client in the 1:1 case; CPU and memory are both nodes' and Redis's.
# Installs nginx, haproxy and gnuplot from Debian's packages when missing (skipped if
# that fails).
# Then draws SVG charts of the run (benches/charts.sh, gnuplot) into benches/charts/.
# Loopback only; every run is bounded in clients and seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh

IDLE=9000 ONE=1000 ONE_RATE=10 SHARED=9000 SHARED_RATE=5 SECS=30 WARM=8
if [ "${1:-}" = --quick ]; then IDLE=1000 ONE=200 SHARED=1000 SECS=10 WARM=4; fi

if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null || ! command -v gnuplot >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
      --no-install-recommends nginx haproxy gnuplot-nox >/dev/null; } ||
    echo "compare: nginx/haproxy/gnuplot not installed; skipping them"
fi
cargo build --release --locked --bin ssegate --example sse_origin --example sse_load 2>&1 | tail -1

W=$(mktemp -d /tmp/ssegate-bench.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT
ORIGIN=19100 GW=19101 NGX=19102 HAP=19103 REDIS=19104 GW2=19105 NGX2=19106 HAP2=19107

start_origin() { # rate
  target/release/examples/sse_origin --port $ORIGIN --rate "$1" --size 200 2>/dev/null & OPID=$!; PIDS+=($OPID); wait_port $ORIGIN; }
stop() { pkill -P "$1" 2>/dev/null || true; kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

gateway_conf $GW "$W/upgrade.sock" $ORIGIN > "$W/ssegate.toml"
# The cluster column: the same config on two nodes, plus Redis.
for n in a b; do
  port=$GW; [ $n = b ] && port=$GW2
  gateway_conf $port "$W/upgrade-$n.sock" $ORIGIN > "$W/node-$n.toml"
  printf '[cluster]\nredis = "redis://127.0.0.1:%s/"\nkey_secret = "benchmark secret of enough bytes"\nnode_id = "%s"\n' \
    "$REDIS" "$n" >> "$W/node-$n.toml"
done
# One location for both nginx servers (HTTP/1.1 and h2c).
NGX_LOCATION='    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }'
cat > "$W/nginx.conf" <<EOF
daemon off;
worker_processes 2;
worker_rlimit_nofile 20000;
pid $W/nginx.pid;
error_log $W/nginx-error.log warn;
user root;
events { worker_connections 19000; }
http {
  access_log off;
  client_body_temp_path $W/ngx_body; proxy_temp_path $W/ngx_proxy;
  fastcgi_temp_path $W/ngx_fcgi; uwsgi_temp_path $W/ngx_uwsgi; scgi_temp_path $W/ngx_scgi;
  upstream origin { server 127.0.0.1:$ORIGIN; }
  server {
    listen 127.0.0.1:$NGX reuseport backlog=4096;
$NGX_LOCATION
  }
  # h2c (prior knowledge), for the idle HTTP/2 case.
  server {
    listen 127.0.0.1:$NGX2 http2;
$NGX_LOCATION
  }
}
EOF
cat > "$W/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 9900
defaults
  mode http
  maxconn 9900
  option http-no-delay
  timeout connect 5s
  timeout http-request 10s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:$HAP
  default_backend be
frontend fe_h2c
  bind 127.0.0.1:$HAP2 proto h2
  default_backend be
backend be
  server origin 127.0.0.1:$ORIGIN
EOF

start_proxy() { # name -> PPID, PORT
  case $1 in
    direct) PPID_=$OPID; PORT=$ORIGIN ;;
    ssegate) target/release/ssegate -c "$W/ssegate.toml" 2>"$W/ssegate.log" & PPID_=$!; PORT=$GW ;;
    baseline) "$SSEGATE_BASELINE" -c "$W/ssegate.toml" 2>"$W/baseline.log" & PPID_=$!; PORT=$GW ;;
    nginx) nginx -p "$W/" -c "$W/nginx.conf" -e "$W/nginx-error.log" & PPID_=$!; PORT=$NGX ;;
    haproxy) haproxy -db -f "$W/haproxy.cfg" 2>"$W/haproxy.log" & PPID_=$!; PORT=$HAP ;;
    cluster) # one parent, so CPU and RSS count both nodes and Redis
      bash -c "redis-server --port $REDIS --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
        target/release/ssegate -c '$W/node-a.toml' 2>'$W/node-a.log' &
        target/release/ssegate -c '$W/node-b.toml' 2>'$W/node-b.log' & wait" & PPID_=$!; PORT=$GW
      wait_port $REDIS; wait_port $GW2; sleep 1 ;;
  esac
  [ "$1" = direct ] || PIDS+=($PPID_)
  wait_port $PORT; sleep 0.5
}

proxies=(direct ssegate)
[ -z "${SSEGATE_BASELINE:-}" ] || proxies+=(baseline)
command -v nginx >/dev/null && proxies+=(nginx)
command -v haproxy >/dev/null && proxies+=(haproxy)
command -v redis-server >/dev/null && proxies+=(cluster)
# PROXIES="direct ssegate" runs only those.
[ -z "${PROXIES:-}" ] || read -ra proxies <<< "$PROXIES"
RESULTS="$W/results"; : > "$RESULTS"
CASES=" ${CASES:-idle h2c one shared} "
has() { [[ "$CASES" == *" $1 "* ]]; }
# ROUNDS=N: the proxies N times over, every other round in reverse order.
order=()
for r in $(seq "${ROUNDS:-1}"); do
  if [ $((r % 2)) = 1 ]; then order+=("${proxies[@]}"); else
    for ((i = ${#proxies[@]} - 1; i >= 0; i--)); do order+=("${proxies[$i]}"); done; fi
done

load() { # port path clients secs warm [more sse_load flags] -> json
  target/release/examples/sse_load --url "http://127.0.0.1:$1$2" --clients "$3" --duration "$4" --warmup "$5" --ramp 3000 --sources 32 "${@:6}"
}

for p in "${order[@]}"; do
  spread=(); one=()
  [ "$p" = cluster ] && spread=(--nodes $GW2) && one=(--distinct)
  idle_kib=null idle_ok=null h2c_kib=null h2c_ok=null c0=0 c1=0 k0=0 k1=0 s0=0 s1=0 o0=0 o1=0
  shared_base=0 shared_held=0; rm -f "$W/one.json" "$W/shared.json"
  # 1. Idle streams: memory per open stream.
  if has idle; then
  start_origin 1
  start_proxy "$p"
  base=$(rss $PPID_)
  load $PORT /idle $IDLE $((SECS / 2 + 10)) 0 "${spread[@]}" > "$W/idle.json" &
  LPID=$!
  sleep $((SECS / 2 + 5))
  held=$(rss $PPID_)
  wait $LPID || true
  idle_kib=$(awk -v a="$base" -v b="$held" -v n="$IDLE" 'BEGIN{printf "%.2f", (b-a)/n}')
  idle_ok=$(python3 -c "import json;print(json.load(open('$W/idle.json'))['connected'])")
  [ "$p" = direct ] || stop $PPID_
  stop $OPID
  fi

  # 1b. The same over h2c, 100 streams per connection (the origin speaks HTTP/1.1 only:
  # no direct figure). ssegate takes h2c on its one port; nginx and HAProxy on another.
  if [ "$p" != direct ] && has h2c; then
    start_origin 1
    start_proxy "$p"
    h2port=$PORT; case $p in nginx) h2port=$NGX2 ;; haproxy) h2port=$HAP2 ;; esac
    wait_port $h2port
    base=$(rss $PPID_)
    load $h2port /idle $IDLE $((SECS / 2 + 10)) 0 --proto h2c "${spread[@]}" > "$W/idle-h2c.json" &
    LPID=$!
    sleep $((SECS / 2 + 5))
    held=$(rss $PPID_)
    wait $LPID || true
    h2c_kib=$(awk -v a="$base" -v b="$held" -v n="$IDLE" 'BEGIN{printf "%.2f", (b-a)/n}')
    h2c_ok=$(python3 -c "import json;print(json.load(open('$W/idle-h2c.json'))['connected'])")
    stop $PPID_
    stop $OPID
  fi

  # 2. 1:1 streams: CPU per delivered event, latency, loss.
  if has one; then
  start_origin $ONE_RATE
  start_proxy "$p"
  load $PORT /stream $ONE $((SECS + WARM)) $WARM "${spread[@]}" "${one[@]}" > "$W/one.json" &
  LPID=$!
  sleep $WARM; c0=$(cpu $PPID_); k0=$(cpu $PPID_ sys); sleep $SECS; c1=$(cpu $PPID_); k1=$(cpu $PPID_ sys)
  wait $LPID || true
  [ "$p" = direct ] || stop $PPID_
  stop $OPID
  fi

  # 3. Many clients of one feed: total CPU (proxy + origin) per delivered event. Only
  # ssegate shares one upstream stream (a shared route); the others proxy 1:1.
  if has shared; then
  path=/stream; case $p in ssegate|baseline|cluster) path=/shared/stream ;; esac
  start_origin $SHARED_RATE
  start_proxy "$p"
  shared_base=$(rss $PPID_)
  load $PORT $path $SHARED $((SECS + WARM + 10)) $((WARM + 10)) "${spread[@]}" > "$W/shared.json" &
  LPID=$!
  sleep $((WARM + 10)); s0=$(cpu $PPID_); o0=$(cpu $OPID); sleep $SECS; s1=$(cpu $PPID_); o1=$(cpu $OPID); shared_held=$(rss $PPID_)
  wait $LPID || true
  [ "$p" = direct ] || stop $PPID_
  stop $OPID
  fi

  python3 - "$p" "$idle_kib" "$idle_ok" "$c0" "$c1" "$s0" "$s1" "$o0" "$o1" "$SECS" "$W" "$k0" "$k1" "$h2c_kib" "$h2c_ok" "$shared_base" "$shared_held" >> "$RESULTS" <<'PY'
import json, sys
p, idle_kib, idle_ok, c0, c1, s0, s1, o0, o1, secs, w, k0, k1, h2c_kib, h2c_ok, sh_base, sh_held = sys.argv[1:]
import os
def report(name):  # a case that did not run (CASES) leaves its cells empty
    f = f"{w}/{name}.json"
    return json.load(open(f)) if os.path.exists(f) else None
one, sh = report("one"), report("shared")
# CPU was sampled over the load tool's measuring window (after its warm-up), and
# `measured` counts the events delivered in that same window.
def per_m(cpu, rep):
    ev = rep["measured"]
    return 1e6 * cpu / ev if ev else float("nan")
row = {"proxy": p, "idle_streams": json.loads(idle_ok), "idle_kib_per_stream": json.loads(idle_kib),
       "idle_h2c_streams": json.loads(h2c_ok), "idle_h2c_kib_per_stream": json.loads(h2c_kib)}
if one:
    row.update({
      "one_cpu_s_per_m": per_m(float(c1) - float(c0), one),
      "one_sys_s_per_m": per_m(float(k1) - float(k0), one),
      "one_p50_ms": one["latency_us"]["p50"] / 1000, "one_p99_ms": one["latency_us"]["p99"] / 1000,
      "one_lost": one["lost"], "one_errors": one["errors"], "one_events": one["events"],
    })
if sh:
    row.update({
      "shared_clients": sh["connected"],
      # The proxy's own memory per client while the feed runs (the others hold one upstream
      # connection per client; ssegate one for them all).
      "shared_kib_per_client": (float(sh_held) - float(sh_base)) / sh["connected"] if sh["connected"] else None,
      "shared_total_cpu_s_per_m": per_m((float(s1) - float(s0)) + (0 if p == "direct" else float(o1) - float(o0)), sh),
      "shared_p99_ms": sh["latency_us"]["p99"] / 1000, "shared_lost": sh["lost"],
    })
print(json.dumps(row))
PY
done

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print()
print("| | " + " | ".join(r["proxy"] for r in rows) + " |")
print("|---|" + "---|" * len(rows))
def line(label, key, fmt):
    cell = lambda v: "-" if v is None else fmt.format(v)
    print(f"| {label} | " + " | ".join(cell(r.get(key)) for r in rows) + " |")
line("idle streams held", "idle_streams", "{}")
line("RSS per idle stream (KiB)", "idle_kib_per_stream", "{:.2f}")
line("h2c idle streams held (100 per connection)", "idle_h2c_streams", "{}")
line("RSS per idle h2c stream (KiB)", "idle_h2c_kib_per_stream", "{:.2f}")
line("1:1 CPU s per 1M events", "one_cpu_s_per_m", "{:.1f}")
line("1:1 of which kernel (system) s", "one_sys_s_per_m", "{:.1f}")
line("1:1 latency p50 (ms)", "one_p50_ms", "{:.2f}")
line("1:1 latency p99 (ms)", "one_p99_ms", "{:.2f}")
line("1:1 events lost", "one_lost", "{}")
line("many clients: streams", "shared_clients", "{}")
line("many clients: proxy RSS per client (KiB)", "shared_kib_per_client", "{:.2f}")
line("many clients: CPU s (proxy+origin) per 1M events", "shared_total_cpu_s_per_m", "{:.1f}")
line("many clients: latency p99 (ms)", "shared_p99_ms", "{:.2f}")
line("many clients: events lost", "shared_lost", "{}")
PY

# The run's rows and its charts (BENCHMARKS.md embeds benches/charts/*.svg): CHARTS=DIR
# draws them elsewhere, CHARTS= (empty) skips them; so does a run of some cases or rounds.
CHARTS=${CHARTS-benches/charts}
[ "$CASES" = " idle h2c one shared " ] && [ "${ROUNDS:-1}" = 1 ] || CHARTS=
if [ -n "$CHARTS" ] && command -v gnuplot >/dev/null; then
  mkdir -p "$CHARTS" && cp "$RESULTS" "$CHARTS/results.jsonl"
  benches/charts.sh "$RESULTS" "$CHARTS"
fi

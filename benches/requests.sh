#!/usr/bin/env bash
# Ordinary (non-stream) keep-alive requests through ssegate, nginx and HAProxy, in one
# run and under identical load: requests/s and p99 latency over HTTP/1.1 (wrk), h2c and
# TLS h2 (h2load), for a small static page and a 100 KB body, from a local nginx origin.
# ssegate runs twice: a minimal config (limits off, log_level warn; its metrics, always
# counted, are read once at the end) and `prod`, production.toml's features on (limiter consulted on every request with a
# rate it never reaches, JSON access lines at info to a file, metrics listener, replay
# settings), so each feature's cost is visible. See BENCHMARKS.md.
# Usage: [PROXIES="direct nginx haproxy ssegate prod"] [SECS=8] [CONNS=50] [ROUNDS=1] benches/requests.sh
#   SSEGATE=/path/to/ssegate uses that binary instead of building this checkout;
#   SSEGATE_BASELINE=/path/to/older/ssegate adds a `baseline` column (that build, the
#   minimal config) to the same run, for before/after comparisons.
# Installs wrk, h2load (nghttp2-client), nginx and haproxy from Debian's packages when
# missing. Loopback only; every load is bounded in connections and seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
SECS=${SECS:-8} CONNS=${CONNS:-50}

need=()
for c in wrk:wrk h2load:nghttp2-client nginx:nginx haproxy:haproxy openssl:openssl; do
  command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if [ -z "${SSEGATE:-}" ]; then
  cargo build --release --locked --bin ssegate 2>&1 | tail -1
  SSEGATE=target/release/ssegate
fi

W=$(mktemp -d /tmp/ssegate-requests.XXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$W"; }
trap cleanup EXIT
ORIGIN=19200 H1=19201 H2C=19202 TLS=19203 ADMIN=19204

# The origin (benches/lib.sh: the 2.7 KB page), its 100 KB body, and a certificate every
# TLS listener uses.
page_origin "$W" $ORIGIN
head -c 102400 /dev/urandom > "$W/www/big.bin"                                            # 100 KB
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" -keyout "$W/key.pem" -out "$W/cert.pem" 2>/dev/null
cat "$W/cert.pem" "$W/key.pem" > "$W/both.pem"

temps() { nginx_temps "$W"; }
cat > "$W/nginx.conf" <<EOF
daemon off; worker_processes 2; pid $W/nginx.pid; error_log $W/nginx-error.log warn; user root;
events { worker_connections 4096; }
http {
  access_log off; $(temps)
  keepalive_requests 1000000;
  upstream origin { server 127.0.0.1:$ORIGIN; keepalive 128; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$H1 backlog=4096;
    listen 127.0.0.1:$H2C http2;
    listen 127.0.0.1:$TLS ssl http2;
    ssl_certificate $W/cert.pem; ssl_certificate_key $W/key.pem;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
cat > "$W/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend h1
  bind 127.0.0.1:$H1
  default_backend be
frontend h2c
  bind 127.0.0.1:$H2C proto h2
  default_backend be
frontend tls
  bind 127.0.0.1:$TLS ssl crt $W/both.pem alpn h2,http/1.1
  default_backend be
backend be
  server origin 127.0.0.1:$ORIGIN
EOF
# ssegate: h2c is served on its plaintext listeners beside HTTP/1.1.
base_toml() { cat <<EOF
[[listeners]]
address = "127.0.0.1:$H1"
[[listeners]]
address = "127.0.0.1:$H2C"
[[listeners]]
address = "127.0.0.1:$TLS"
tls = { cert = "$W/cert.pem", key = "$W/key.pem" }
[[upstreams]]
name = "origin"
servers = ["127.0.0.1:$ORIGIN"]
EOF
}
{ printf '[server]\nthreads = 2\nlog_level = "warn"\nadmin_address = "127.0.0.1:%s"\nupgrade_sock = "%s/up.sock"\n' "$ADMIN" "$W"
  printf '[limits]\nrequest_rate = 0\nstream_connect_rate = 0\nmax_streams_per_client = 0\n'
  base_toml; printf '[[routes]]\nupstream = "origin"\n'; } > "$W/ssegate.toml"
# production.toml's sections, on loopback; the request rate is one the load never
# reaches, so the limiter is consulted on every request and refuses none.
{ printf '[server]\nthreads = 2\nlog_level = "info"\nlog_format = "json"\nadmin_address = "127.0.0.1:%s"\nupgrade_sock = "%s/up.sock"\n' "$ADMIN" "$W"
  cat <<EOF
[sse]
heartbeat_interval = "15s"
write_timeout = "30s"
[replay]
linger = "30s"
max_events = 2000
max_bytes = 2097152
max_age = "10m"
[limits]
request_rate = 10000000
request_burst = 10000000
stream_connect_rate = 1
stream_connect_burst = 10
max_streams_per_client = 32
max_streams = 9000
EOF
  base_toml
  printf '[[routes]]\nname = "public-feeds"\npath_prefix = "/live/"\nupstream = "origin"\nreplay = { shared = true, on_connect = 10 }\n'
  printf '[[routes]]\nname = "site"\npath_prefix = "/"\nupstream = "origin"\n'; } > "$W/prod.toml"

start() { # name -> PPID_
  case $1 in
    direct) PPID_= ;;
    nginx) nginx -p "$W/" -c "$W/nginx.conf" -e "$W/nginx-error.log" & PPID_=$! ;;
    haproxy) haproxy -db -f "$W/haproxy.cfg" 2>"$W/haproxy.log" & PPID_=$! ;;
    ssegate) "$SSEGATE" -c "$W/ssegate.toml" 2>"$W/ssegate.log" & PPID_=$! ;;
    prod) "$SSEGATE" -c "$W/prod.toml" 2>"$W/prod.log" & PPID_=$! ;;
    baseline) "$SSEGATE_BASELINE" -c "$W/ssegate.toml" 2>"$W/baseline.log" & PPID_=$! ;;
  esac
  [ -z "$PPID_" ] || { PIDS+=("$PPID_"); wait_port $H1; wait_port $TLS; sleep 0.5; }
}
stop() { [ -z "$1" ] && return 0; pkill -P "$1" 2>/dev/null || true; kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

nginx -p "$W/" -c "$W/origin.conf" -e "$W/origin-error.log" & PIDS+=($!)
wait_port $ORIGIN

# One load: prints "req/s p99_ms errors". wrk for HTTP/1.1; h2load (one stream at a time
# per connection, like the HTTP/1.1 case) for h2c and TLS h2, p99 from its per-request log.
measure() { # proto port path
  local url
  case $1 in
    h1) url="http://127.0.0.1:$2$3"
      wrk -t1 -c"$CONNS" -d"${SECS}s" --latency "$url" > "$W/wrk.out"
      python3 - "$W/wrk.out" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
v, u = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\b", t, re.M).groups()
p99 = float(v) * {"us": 1e-3, "ms": 1, "s": 1e3}[u]
m = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
e = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
errors = (int(m.group(1)) if m else 0) + (sum(map(int, e.groups())) if e else 0)
print(f"{rps:.0f} {p99:.3f} {errors}")
PY
      ;;
    h2c|h2) [ "$1" = h2c ] && url="http://127.0.0.1:$2$3" || url="https://127.0.0.1:$2$3"
      h2load -c"$CONNS" -m1 -t1 -D "$SECS" --warm-up-time=1 --log-file="$W/h2.log" "$url" > "$W/h2.out"
      python3 - "$W/h2.out" "$W/h2.log" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", t).group(1))
d = sorted(int(l.split("\t")[2]) for l in open(sys.argv[2]) if l.count("\t") >= 2)
ok = re.search(r"status codes: (\d+) 2xx", t)
done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", t)
errors = int(done.group(3)) + int(done.group(4)) if done else -1
p99 = d[int(len(d) * 0.99)] / 1000 if d else float("nan")
print(f"{rps:.0f} {p99:.3f} {errors}")
PY
      ;;
  esac
}

proxies=(direct nginx haproxy ssegate prod)
[ -z "${SSEGATE_BASELINE:-}" ] || proxies+=(baseline)
[ -z "${PROXIES:-}" ] || read -ra proxies <<< "$PROXIES"
RESULTS="$W/results"; : > "$RESULTS"
# ROUNDS > 1: every proxy again, in reverse order on even rounds, so a drift in the
# machine's speed (a shared 2-core host) falls on all columns alike; the table gives
# each cell's median over the rounds.
order=()
for ((round = 1; round <= ${ROUNDS:-1}; round++)); do
  if ((round % 2)); then order+=("${proxies[@]}"); else
    for ((i = ${#proxies[@]} - 1; i >= 0; i--)); do order+=("${proxies[i]}"); done
  fi
done
for p in "${order[@]}"; do
  start "$p"
  for proto in h1 h2c h2; do
    [ "$p" = direct ] && [ "$proto" != h1 ] && continue   # the origin speaks HTTP/1.1 only
    case $proto in h1) port=$H1 ;; h2c) port=$H2C ;; h2) port=$TLS ;; esac
    [ "$p" = direct ] && port=$ORIGIN
    for body in page.html big.bin; do
      echo "$p $proto $body $(measure $proto $port /$body)" | tee -a "$RESULTS" >&2
    done
  done
  if [ "$p" = ssegate ] || [ "$p" = prod ] || [ "$p" = baseline ]; then
    # Every request should have gone over a pooled upstream connection.
    echo "$p upstream connections: $(curl -s "http://127.0.0.1:$ADMIN/metrics" 2>/dev/null |
      grep '^ssegate_upstream_connections_total' | tr '\n' ' ')" >&2
  fi
  stop "$PPID_"
done

python3 - "$RESULTS" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
names = []
for r in rows:
    if r[0] not in names: names.append(r[0])
cases = []
for r in rows:
    if (r[1], r[2]) not in cases: cases.append((r[1], r[2]))
# Each cell: the median of its rounds (req/s and p99 each), errors summed.
runs = {}
for r in rows:
    runs.setdefault((r[0], r[1], r[2]), []).append(r[3:])
def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
get = {k: [str(round(median([float(x[0]) for x in v]))), f"{median([float(x[1]) for x in v]):.3f}",
           str(sum(int(x[2]) for x in v))] for k, v in runs.items()}
label = {"page.html": "2.7 KB", "big.bin": "100 KB"}
print()
print("| case | " + " | ".join(f"{n} req/s" for n in names) + " | " + " | ".join(f"{n} p99 ms" for n in names) + " | ssegate/nginx req/s | prod/nginx req/s |")
print("|---|" + "---|" * (2 * len(names) + 2))
for proto, body in cases:
    row = [get.get((n, proto, body)) for n in names]
    rps = [f"{int(x[0]):,}" + ("" if x[2] == "0" else f" ({x[2]} err)") if x else "-" for x in row]
    p99 = [x[1] if x else "-" for x in row]
    def ratio(a):
        x, y = get.get((a, proto, body)), get.get(("nginx", proto, body))
        return f"{int(x[0]) / int(y[0]):.2f}" if x and y and int(y[0]) else "-"
    print(f"| {proto} {label[body]} | " + " | ".join(rps) + " | " + " | ".join(p99) + f" | {ratio('ssegate')} | {ratio('prod')} |")
PY

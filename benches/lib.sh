# Shared by the benchmark scripts (sourced, from the repository's root): reading a
# process's CPU and memory, waiting for a port, and the gateway config they measure.

TCK=$(getconf CLK_TCK)

# CPU seconds (user+system) of a process and its children alive now; `cpu PID sys`
# counts the system (kernel) part only.
cpu() { local t=0 p; for p in "$1" $(pgrep -P "$1" || true); do
  t=$(awk -v t="$t" -v k="$TCK" -v only="${2:-}" '{s=$0; sub(/^.*\) /,"",s); split(s,f," ");
      print t+((only == "sys" ? 0 : f[12])+f[13])/k}' /proc/"$p"/stat); done; echo "$t"; }
# Resident memory in KiB of a process and its children.
rss() { local t=0 p; for p in "$1" $(pgrep -P "$1" || true); do
  t=$((t + $(awk '/^VmRSS/{print $2}' /proc/"$p"/status))); done; echo "$t"; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

# The gateway's config under load: one listener on PORT, upgrade socket SOCK, the
# synthetic origin on ORIGIN; limits off, replay on without linger, and a shared route.
gateway_conf() { # PORT SOCK ORIGIN
  cat <<EOC
[server]
threads = 2
log_level = "warn"
max_connections = 19500
upgrade_sock = "$2"
[[listeners]]
address = "127.0.0.1:$1"
[limits]
request_rate = 0
stream_connect_rate = 0
max_streams_per_client = 0
max_streams = 19000
[replay]
linger = "0s"
[[upstreams]]
name = "origin"
servers = ["127.0.0.1:$3"]
[[routes]]
name = "shared"
path_prefix = "/shared"
upstream = "origin"
replay = { shared = true }
[[routes]]
upstream = "origin"
EOC
}

# nginx's temp paths under DIR (it writes none under this load, but wants them writable).
nginx_temps() { # DIR
  echo "client_body_temp_path $1/t1; proxy_temp_path $1/t2; fastcgi_temp_path $1/t3; uwsgi_temp_path $1/t4; scgi_temp_path $1/t5;"
}

# The ordinary-request origin of requests.sh and ab-requests.sh: DIR/www/page.html (the
# 2.7 KB page) and DIR/origin.conf, one nginx worker serving DIR/www on PORT with
# keep-alive unbounded. Start it with `nginx -p DIR/ -c DIR/origin.conf`.
page_origin() { # DIR PORT
  mkdir -p "$1/www"
  python3 -c "print('<!doctype html><title>page</title>' + 'x' * 2660)" > "$1/www/page.html"
  cat > "$1/origin.conf" <<EOC
daemon off; worker_processes 1; pid $1/origin.pid; error_log $1/origin-error.log warn; user root;
events { worker_connections 4096; }
http {
  access_log off; $(nginx_temps "$1")
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$2 backlog=4096; root $1/www; }
}
EOC
}

#!/usr/bin/env bash
# SVG charts of one benches/compare.sh run: memory per open stream, CPU per million
# events and p99 latency, ssegate beside the origin direct, nginx and HAProxy (and the
# cluster and baseline columns when the run had them). Drawn by gnuplot (Debian's
# gnuplot-nox, installed by compare.sh): a long-kept, widely used plotting tool with an
# SVG terminal, no browser or Python packages needed.
# Usage: benches/charts.sh RESULTS.jsonl OUTDIR
set -euo pipefail
results=$1 out=$2
mkdir -p "$out"
dat=$(mktemp)
trap 'rm -f "$dat"' EXIT
python3 - "$results" > "$dat" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if l.strip():
        r = json.loads(l)
        print(r["proxy"], r["idle_kib_per_stream"], r["one_cpu_s_per_m"], r["one_sys_s_per_m"],
              r["one_p99_ms"], r["shared_total_cpu_s_per_m"], r["shared_p99_ms"])
PY
when=$(date -u +%Y-%m-%d)
chart() { # file, title, y label, gnuplot plot clause
  gnuplot <<GP
set terminal svg size 680,420 dynamic font "sans,12" background "#ffffff"
set output "$out/$1"
set title "$2 ($when, benches/compare.sh)"
set ylabel "$3"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.8
set yrange [0:*]
set grid ytics
set key outside bottom center horizontal
set xtics nomirror
plot $4
GP
}
chart memory.svg "Resident memory per idle open stream (9,000 streams)" "KiB per stream" \
  "'$dat' using 2:xtic(1) title 'KiB' lc rgb '#4c72b0', '' using 0:2:(sprintf('%.1f',\$2)) with labels offset 0,0.7 notitle"
chart cpu.svg "CPU per million delivered events" "CPU seconds" \
  "'$dat' using 3:xtic(1) title '1:1 (1,000 streams x 10/s), all' lc rgb '#4c72b0', '' using 4 title '1:1, of which kernel' lc rgb '#8da0cb', '' using 6 title 'one feed to 9,000 clients (proxy + origin)' lc rgb '#55a868'"
chart latency.svg "Delivery latency, 99th percentile" "milliseconds" \
  "'$dat' using 5:xtic(1) title '1:1' lc rgb '#4c72b0', '' using 7 title 'one feed to 9,000 clients' lc rgb '#55a868'"
echo "charts: $out/memory.svg $out/cpu.svg $out/latency.svg"

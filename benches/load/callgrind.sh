#!/usr/bin/env bash
# User-space instructions per event of one ssegate worker, counted by
# callgrind (valgrind; installed with apt-get when missing). Unlike CPU time,
# the count hardly moves with other work on the machine, so small changes
# show. Uses the binaries benches/load/run.sh builds (run it once first).
#
#   benches/load/callgrind.sh                          # typing pace: 10 streams × 200 events, 20 ms apart
#   STREAMS=200 EVENTS=60 INTERVAL_MS=100 benches/load/callgrind.sh   # fan-in pace
#   STREAMS=200 EVENTS=1 benches/load/callgrind.sh     # set-up: instructions per stream
#   TARGET=nginx benches/load/callgrind.sh             # the same for nginx (one process, one worker)
#
# SSEGATE_BIN picks another ssegate binary; CG_EXTRA adds valgrind options
# (`CG_EXTRA=--cache-sim=yes`: cache misses too, in the profile's columns).
# The count covers everything the worker does from the first connection of
# the measured run to its last event (set-up included), after a warm-up run
# of 10 streams. Ports 18080 (fake upstream) and 18081/18091 (ssegate or
# nginx) on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
# shellcheck source=benches/load/common.sh
. benches/load/common.sh
load_binaries
target=${TARGET:-ssegate}
streams=${STREAMS:-10}
events=${EVENTS:-200}
interval=${INTERVAL_MS:-20}
out=$root/target/load/callgrind
mkdir -p "$out"

command -v valgrind >/dev/null || apt_install valgrind
ports_free 18080 18081 18091 || exit 1

"$load" upstream --listen 127.0.0.1:18080 2>"$out/upstream.log" &
pids+=($!)
ssegate_config "$out/ssegate.toml" 127.0.0.1:18081 127.0.0.1:18091 127.0.0.1:18080 "workers = 1"
rm -f "$out"/callgrind.out*
read -ra cg_extra <<<"${CG_EXTRA:-}"
callgrind=(valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" --dump-instr=no "${cg_extra[@]}")
case $target in
  ssegate) RUST_LOG=warn "${callgrind[@]}" "$ssegate" --config "$out/ssegate.toml" 2>"$out/valgrind.log" & ;;
  nginx)
    # benches/load/nginx.conf, as one process with one worker.
    ng=$out/nginx
    nginx_config "$ng" 127.0.0.1:18081 127.0.0.1:18080 \
      -e "s|master_process on|master_process off|" -e "s|worker_processes auto|worker_processes 1|"
    "${callgrind[@]}" "$(command -v nginx || echo /usr/sbin/nginx)" -p "$ng" -c "$ng/nginx.conf" -e "$ng/error.log" \
      2>"$out/valgrind.log" &
    ;;
  *)
    echo "error: TARGET is ssegate or nginx" >&2
    exit 1
    ;;
esac
vg=$!
pids+=("$vg")
for _ in $(seq 300); do
  if (exec 3<>/dev/tcp/127.0.0.1/18081) 2>/dev/null; then break; fi
  sleep 0.1
done

url=http://127.0.0.1:18081/v1/stream
"$load" client --scenario typing --target warmup --streams 10 \
  --url "$url?n=20&size=64&interval_ms=20&format=sse" >/dev/null
callgrind_control --zero "$vg" >/dev/null 2>&1
"$load" client --scenario typing --target "$target" --streams "$streams" \
  --url "$url?n=$events&size=64&interval_ms=$interval&format=sse" >"$out/client.json"
callgrind_control --dump "$vg" >/dev/null 2>&1

total=$(callgrind_annotate "$out/callgrind.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
delivered=$(grep -o '"events":[0-9]*' "$out/client.json" | head -1 | cut -d: -f2)
[ "$target" = nginx ] || echo "ssegate: $ssegate"
echo "$streams streams × $events events, $interval ms apart: $delivered events, $total instructions," \
  "$((total / delivered)) per event, $((total / streams)) per stream"
echo "profile: ${out#"$root"/}/callgrind.out.1 (callgrind_annotate --inclusive=yes)"

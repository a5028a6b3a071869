#!/usr/bin/env bash
# System calls of ssegate and of nginx for the same scenario, counted with
# `perf stat` on their syscall tracepoints (linux-perf is installed with
# apt-get when missing; perf needs to be allowed to read tracepoints, as
# root). Uses the binaries benches/load/run.sh builds (run it once first).
#
#   benches/load/syscalls.sh              # fan-in: 2,000 streams × 60 events, 100 ms apart
#   SCENARIO=typing benches/load/syscalls.sh   # typing: 100 streams × 200 events, 20 ms apart
#   SCENARIO=setup benches/load/syscalls.sh    # set-ups: 2,000 streams of one event each
#   SCENARIO=burst benches/load/syscalls.sh    # the fan-in's ramp alone: 2,000 streams of two
#                                              # events 1 s apart, started over 100 ms
#
# A `setup` stream ends at once, so its upstream connection serves the next
# one; `burst` streams overlap, so each needs a connection of its own, as
# in the fan-in's ramp, without its events.
#
# Prints, per proxy, the count of each system call that was made at all,
# and the proxy's CPU time (task-clock), page faults and context switches.
# Ports 18080 (fake upstream), 18081/18091 (ssegate) and 18082 (nginx) on
# 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
# shellcheck source=benches/load/common.sh
. benches/load/common.sh
load_binaries
out=$root/target/load/syscalls
mkdir -p "$out"
command -v perf >/dev/null || apt_install linux-perf
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)
ports_free 18080 18081 18091 18082 || exit 1
ulimit -n "$(ulimit -Hn)"

case ${SCENARIO:-fanin} in
  fanin) streams=2000 query="n=60&size=64&interval_ms=100&format=sse" extra=(--warmup-events 10) ;;
  typing) streams=100 query="n=200&size=64&interval_ms=20&format=sse" extra=() ;;
  setup) streams=2000 query="n=1&size=64&interval_ms=0&format=sse" extra=(--spread-ms 0) ;;
  burst) streams=2000 query="n=2&size=64&interval_ms=1000&format=sse" extra=(--spread-ms 100) ;;
  *)
    echo "error: SCENARIO is fanin, typing, setup or burst" >&2
    exit 1
    ;;
esac

"$load" upstream --listen 127.0.0.1:18080 2>"$out/upstream.log" &
up=$!
pids+=("$up")
ssegate_config "$out/ssegate.toml" 127.0.0.1:18081 127.0.0.1:18091 127.0.0.1:18080
RUST_LOG=warn "$ssegate" --config "$out/ssegate.toml" 2>"$out/ssegate.log" &
sg=$!
pids+=("$sg")
ng_prefix=$out/nginx
nginx_config "$ng_prefix" 127.0.0.1:18082 127.0.0.1:18080
"$nginx_bin" -p "$ng_prefix" -c "$ng_prefix/nginx.conf" -e "$ng_prefix/error.log" 2>"$out/nginx.log" &
ng=$!
pids+=("$ng")
for port in 18080 18081 18082; do
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
  done
done

events=task-clock,page-faults,context-switches,raw_syscalls:sys_enter
for call in epoll_wait epoll_ctl read recvfrom write writev sendto accept4 connect socket setsockopt getsockopt \
  shutdown close futex mmap munmap madvise; do
  events+=",syscalls:sys_enter_$call"
done
for target in ssegate nginx; do
  if [ "$target" = ssegate ]; then
    port=18081 watched=$sg
  else
    port=18082 watched=$(pgrep -f "nginx: worker" -P "$ng" | paste -sd, -)
  fi
  perf stat -e "$events" -p "$watched" -o "$out/$target.perf" &
  perf_pid=$!
  sleep 0.3
  "$load" client --scenario "${SCENARIO:-fanin}" --target "$target" --streams "$streams" "${extra[@]}" \
    --url "http://127.0.0.1:$port/v1/stream?$query" >"$out/$target.json"
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  delivered=$(grep -o '"events":[0-9]*' "$out/$target.json" | head -1 | cut -d: -f2)
  echo "== $target: $streams streams, $delivered events"
  # How long the set-ups took, as the client saw them.
  for figure in "last_first_event_ms last stream's first event" "head_p50_ms response head p50"; do
    value=$(grep -o "\"${figure%% *}\":[0-9.]*" "$out/$target.json" | cut -d: -f2 || true)
    printf '  %.1f ms %s\n' "${value:-nan}" "${figure#* }"
  done
  awk '/sys_enter/ && $1 != "0" { gsub(",", "", $1); sub("syscalls:sys_enter_", "", $2); print "  " $1, $2 }
    /task-clock|page-faults|context-switches/ { gsub(",", "", $1); print "  " $1, ($2 == "msec" ? "ms " $3 : $2) }' \
    "$out/$target.perf"
  sleep 1
done

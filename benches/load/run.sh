#!/usr/bin/env bash
# ssegate side by side with nginx (issue 6/7): the same scenarios against the
# fake upstream directly (baseline), through ssegate, and through nginx
# (benches/load/nginx.conf), then one table with the ratios.
#
#   benches/load/run.sh              # builds, installs nginx when missing, runs, prints the table
#
# Everything listens on 127.0.0.1 only. Ports (override by environment):
# LOAD_UPSTREAM_PORT 18080, LOAD_SSEGATE_PORT 18081, LOAD_NGINX_PORT 18082,
# LOAD_ADMIN_PORT 18083. Work files, logs and the raw JSON lines of every
# run go to target/load/. IDLE_STREAMS (default 9000) sets the idle scenario,
# ROUNDS (default 3) how often the typing, flat and handoff scenarios run
# (the table shows the median), QUIET_WAIT (default 60) how many seconds to wait
# at most for the machine to be idle before starting. SCENARIOS (default
# "idle typing handoff fanin flat large") picks which scenarios run, SSEGATE_BIN
# (default: the one this script builds) which ssegate binary is measured.
# RUNS=N (default 1) runs the whole script N times after one build, each
# with fresh processes, then prints the goals over the N runs (each goal's
# median, lowest and highest ratio and how many runs met it); the raw
# results of run i are in target/load/runs/i.jsonl.
# ssegate is built with profile-guided optimisation from the profile
# benches/load/pgo.sh made for this rustc release, when there is one; PGO=0
# builds it without (the first lines of the output say which).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
# shellcheck source=benches/load/common.sh
. benches/load/common.sh
out=$root/target/load
mkdir -p "$out"

up_port=${LOAD_UPSTREAM_PORT:-18080}
sg_port=${LOAD_SSEGATE_PORT:-18081}
ng_port=${LOAD_NGINX_PORT:-18082}
admin_port=${LOAD_ADMIN_PORT:-18083}
# One proxy process holds two file descriptors per stream and may open
# 20,000 here: 9,000 streams fit with room for the listeners and logs.
idle_streams=${IDLE_STREAMS:-9000}
rounds=${ROUNDS:-3}
quiet_wait=${QUIET_WAIT:-60}
runs=${RUNS:-1}
scenarios=" ${SCENARIOS:-idle typing handoff fanin flat large} "
# want NAME: whether the scenario NAME was asked for.
want() { [[ $scenarios == *" $1 "* ]]; }

echo "command: benches/load/run.sh${*:+ $*}"

# File descriptors: as many as this machine allows (20,000 here).
ulimit -n "$(ulimit -Hn)"

# nginx from Debian's package, installed without starting the system service,
# and Debian's jemalloc (libjemalloc-dev), which the build links instead of
# compiling jemalloc's C sources: 2.4 of a clean build's 5.2 minutes on 2
# cores. It is the same jemalloc release (5.3.0) ssegate vendors, and
# src/main.rs sets the same options. LOAD_VENDORED_JEMALLOC=1 builds the
# vendored one instead.
jemalloc_a=/usr/lib/$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)/libjemalloc_pic.a
missing=()
find_nginx
[ -n "$nginx_bin" ] || missing+=(nginx)
[ -n "${LOAD_VENDORED_JEMALLOC:-}" ] || [ -e "$jemalloc_a" ] || missing+=(libjemalloc-dev)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
  find_nginx
fi

# Its own target directory: the jemalloc choice is part of the build, and a
# plain `cargo build --release` in target/ is left as it was.
build_dir=$root/target/load-build
# Profile-guided optimisation with the profile benches/load/pgo.sh made
# (PGO=0: without). The flags apply to the whole build, so the load client's
# dependencies (tokio, hyper) are built with the profile's counts too: the
# same client for every target, but not the same as before PGO (2026-11-24).
pgo_rustflags "$build_dir"
build_env=()
[ -z "$rustflags" ] || build_env+=("RUSTFLAGS=$rustflags")
if [ -n "${LOAD_VENDORED_JEMALLOC:-}" ]; then
  echo "building (cargo build --release -p ssegate -p ssegate-load, vendored jemalloc)"
  build_env+=("CARGO_TARGET_DIR=$build_dir/vendored")
  bin_dir=$build_dir/vendored/release
else
  echo "building (cargo build --release -p ssegate -p ssegate-load, JEMALLOC_OVERRIDE=$jemalloc_a)"
  build_env+=("JEMALLOC_OVERRIDE=$jemalloc_a" "CARGO_TARGET_DIR=$build_dir/debian")
  bin_dir=$build_dir/debian/release
fi
env "${build_env[@]}" cargo build --release -q -p ssegate -p ssegate-load
# For the helpers that measure this build (callgrind.sh, syscalls.sh, first_burst.sh).
echo "$pgo_note; built by run.sh from $(git rev-parse --short HEAD 2>/dev/null || echo '?') on $(date -u '+%Y-%m-%d %H:%M UTC')" \
  >"$bin_dir/ssegate.build"
load=$bin_dir/ssegate-load
ssegate=${SSEGATE_BIN:-$bin_dir/ssegate}

# Several runs: this script again for each (its build is then a no-op),
# each run's raw results kept apart, then the goals over all of them.
if [ "$runs" -gt 1 ]; then
  rm -rf "$out/runs"
  mkdir -p "$out/runs"
  files=()
  for i in $(seq "$runs"); do
    echo
    echo "run $i of $runs"
    RUNS=1 LOAD_RESULTS="$out/runs/$i.jsonl" "$0" "$@"
    files+=("${out#"$root"/}/runs/$i.jsonl")
  done
  echo
  "$load" summary "${files[@]}"
  exit 0
fi

ports_free "$up_port" "$sg_port" "$ng_port" "$admin_port" || {
  echo "(LOAD_UPSTREAM_PORT, LOAD_SSEGATE_PORT, LOAD_NGINX_PORT and LOAD_ADMIN_PORT pick others)" >&2
  exit 1
}

# The fake upstream.
"$load" upstream --listen "127.0.0.1:$up_port" 2>"$out/upstream.log" &
up_pid=$!
pids+=("$up_pid")

# ssegate: one route to the upstream, limits above the idle scenario, logs
# at warn (nginx runs with access_log off).
ssegate_config "$out/ssegate.toml" "127.0.0.1:$sg_port" "127.0.0.1:$admin_port" "127.0.0.1:$up_port"
RUST_LOG=warn "$ssegate" --config "$out/ssegate.toml" 2>"$out/ssegate.log" &
sg_pid=$!
pids+=("$sg_pid")

# nginx with its own prefix, in the foreground.
ng_prefix=$out/nginx
nginx_config "$ng_prefix" "127.0.0.1:$ng_port" "127.0.0.1:$up_port"
"$nginx_bin" -p "$ng_prefix" -c "$ng_prefix/nginx.conf" -e "$ng_prefix/error.log" 2>"$out/nginx.log" &
ng_pid=$!
pids+=("$ng_pid")

wait_port "$up_port" upstream
wait_port "$sg_port" ssegate
wait_port "$ng_port" nginx

echo "machine: $(nproc) cores, $(uname -sr); $("$nginx_bin" -v 2>&1); $("$ssegate" --version 2>/dev/null || echo ssegate)"

results=${LOAD_RESULTS:-$out/results.jsonl}
: >"$results"

# run SCENARIO QUERY STREAMS [client options...]: the scenario against the
# upstream directly, through ssegate and through nginx.
run() {
  local scenario=$1 query=$2 streams=$3 target port pid
  shift 3
  for target in direct ssegate nginx; do
    case $target in
      direct)
        port=$up_port
        pid=()
        ;;
      ssegate)
        port=$sg_port
        pid=(--pid "$sg_pid")
        ;;
      nginx)
        port=$ng_port
        pid=(--pid "$ng_pid")
        ;;
    esac
    "$load" client --scenario "$scenario" --target "$target" --streams "$streams" "${pid[@]}" \
      --upstream-pid "$up_pid" "$@" \
      --url "http://127.0.0.1:$port/v1/stream?$query" >>"$results"
    printf '  %-8s %-8s %s\n' "$scenario" "$target" "$(tail -1 "$results" | grep -o '"errors":[0-9]*')"
    # The last run's connections close before the next one opens.
    sleep 0.5
  done
}

# CPU seconds the whole machine spent busy since boot (/proc/stat).
busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }
# Wait (at most QUIET_WAIT s) until the machine is idle for 2 s: other work
# on these 2 cores would show as latency and CPU in the figures.
waited=0
while :; do
  b0=$(busy_ticks)
  sleep 2
  busy=$(($(busy_ticks) - b0)) # ticks over 2 s; 2 cores = 400 at 100 Hz
  if [ "$busy" -le 20 ] || [ "$waited" -ge "$quiet_wait" ]; then break; fi
  waited=$((waited + 2))
done
echo "machine busy before the run: $busy ticks in 2 s (400 = both cores), after waiting ${waited} s; load average $(cut -d' ' -f1-3 /proc/loadavg)"

echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "running the scenarios"
started=$(date +%s)
# Idle first, on fresh processes: the RSS growth is then the streams' own.
# One event opens each stream, the next would come after 60 s.
! want idle || run idle "n=2&size=64&interval_ms=60000&format=sse" "$idle_streams" --idle-hold-ms 2000
for _ in $(seq "$rounds"); do
  ! want typing || run typing "n=200&size=64&interval_ms=20&format=sse" 100
  # Flat out takes well under a second per target: it is run every round
  # so that its CPU figure (10 ms ticks) is a median, not one reading.
  ! want flat || run flat "n=20000&size=64&interval_ms=0&format=sse" 50
  want handoff || continue
  "$load" client --scenario handoff --target ssegate --streams 100 --pid "$sg_pid" --upstream-pid "$up_pid" \
    --handoff --url "http://127.0.0.1:$sg_port/handoff/v1/stream?n=200&size=64&interval_ms=20&format=sse" \
    --spread-ms 20 >>"$results"
  printf '  %-8s %-8s %s\n' handoff ssegate "$(tail -1 "$results" | grep -o '"errors":[0-9]*')"
  sleep 0.5
done
# Fan-in latency is the steady state: each stream's first 10 events (its
# first second, while 2,000 connections open) count, but not their latency;
# the next 50 (5 s, 100,000 events) are measured.
! want fanin || run fanin "n=60&size=64&interval_ms=100&format=sse" 2000 --warmup-events 10
! want large || run large "n=200&size=65536&interval_ms=0&format=sse" 20
echo "scenarios took $(($(date +%s) - started)) s; load average $(cut -d' ' -f1-3 /proc/loadavg); raw results: ${results#"$root"/}"
echo

"$load" report "$results"

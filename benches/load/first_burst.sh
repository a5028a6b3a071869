#!/usr/bin/env bash
# The first burst of connections a proxy gets after it starts: 2,000 streams
# open at once (256 connects in flight) against a freshly started ssegate
# and a freshly started nginx, each stream held until its second event, 3 s
# after the first. A
# restart under load, or clients reconnecting after a deploy, look like
# this. Uses the binaries benches/load/run.sh builds (run it once first).
#
#   benches/load/first_burst.sh                        # ssegate and nginx, 5 rounds
#   BASE_BIN=/path/to/older/ssegate benches/load/first_burst.sh   # also another build
#
# Prints, per target, the median over the rounds (ROUNDS, default 5) of when
# the last stream got its first event, and of the time from connected to
# response head (p50, p99), with the ratio to nginx. Each round starts every
# proxy anew. SSEGATE_BIN picks the ssegate binary. Ports 18080 (fake
# upstream), 18081/18083 (ssegate) and 18082 (nginx) on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
# shellcheck source=benches/load/common.sh
. benches/load/common.sh
helper_setup first_burst
rounds=${ROUNDS:-5}
need_nginx
if [ -n "${BASE_BIN:-}" ] && [ ! -x "$BASE_BIN" ]; then
  echo "error: BASE_BIN=$BASE_BIN is not an executable" >&2
  exit 1
fi
ports_free 18080 18081 18082 18083 || exit 1

start_upstream 18080

targets=("ssegate=$ssegate")
[ -z "${BASE_BIN:-}" ] || targets+=("base=$BASE_BIN")
targets+=(nginx=nginx)
results=$out/results.jsonl
: >"$results"
query="n=2&size=64&interval_ms=3000&format=sse"
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); $rounds rounds of 2,000 streams at once, every proxy started anew"
for _ in $(seq "$rounds"); do
  for t in "${targets[@]}"; do
    name=${t%%=*} bin=${t#*=}
    if [ "$name" = nginx ]; then
      nginx_config "$out/nginx" 127.0.0.1:18082 127.0.0.1:18080
      "$nginx_bin" -p "$out/nginx" -c "$out/nginx/nginx.conf" -e "$out/nginx/error.log" 2>"$out/nginx.log" &
      port=18082
    else
      ssegate_config "$out/$name.toml" 127.0.0.1:18081 127.0.0.1:18083 127.0.0.1:18080
      RUST_LOG=warn "$bin" --config "$out/$name.toml" 2>"$out/$name.log" &
      port=18081
    fi
    proxy=$!
    pids+=("$proxy")
    wait_port "$port" "$name"
    "$load" client --scenario first-burst --target "$name" --streams 2000 --spread-ms 0 \
      --url "http://127.0.0.1:$port/v1/stream?$query" >>"$results"
    kill "$proxy" 2>/dev/null || true
    wait "$proxy" 2>/dev/null || true
  done
done

printf '%-8s %22s %14s %14s %7s\n' target "last first event, ms" "head p50, ms" "head p99, ms" errors
for t in "${targets[@]}"; do
  name=${t%%=*}
  median_cells "$results" "$name" nginx last_first_event_ms head_p50_ms head_p99_ms
  errors=$(errors_total "$results" "$name")
  printf '%-8s %22s %14s %14s %7s\n' "$name" "${cells[@]}" "$errors"
done
echo "(the ratio to nginx in brackets; raw results: ${results#"$root"/})"

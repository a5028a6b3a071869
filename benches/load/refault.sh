#!/usr/bin/env bash
# A burst of new streams after a quiet spell: 2,000 streams open over 100 ms
# (256 connects in flight), each held until its second event 1 s after the
# first, then nothing for GAP seconds (default 30), again and again. Between
# bursts the proxy frees what the streams held; how soon its allocator gives
# that memory back to the system decides whether the next burst reuses it
# or faults fresh pages in. Uses the binaries benches/load/run.sh builds
# (run it once first).
#
#   benches/load/refault.sh                  # 1 warm-up burst + 6 measured, 30 s apart
#   GAP=90 ROUNDS=4 benches/load/refault.sh
#
# Three proxies run side by side, each burst going to one after the other:
# ssegate as built (jemalloc gives freed memory back over about five
# minutes, `malloc_conf` in src/main.rs), the same binary with jemalloc's
# default of ten seconds (`MALLOC_CONF=dirty_decay_ms:10000`), and nginx.
# The two ssegates take turns at going first (an even ROUNDS gives each as
# many firsts); each waits GAP s and two or three bursts' time between
# its bursts. Prints, per proxy, the
# medians over the measured bursts of its page faults, its CPU time and
# when the last stream got its first event, and the median of the
# per-round ratios to the ten-second ssegate. SSEGATE_BIN picks the
# ssegate binary. Ports 18080 (fake upstream), 18081/18083 and 18084/18085 (the
# two ssegates) and 18082 (nginx) on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
# shellcheck source=benches/load/common.sh
. benches/load/common.sh
helper_setup refault
rounds=${ROUNDS:-6}
gap=${GAP:-30}
need_nginx
command -v pgrep >/dev/null || apt_install procps
ports_free 18080 18081 18082 18083 18084 18085 || exit 1

start_upstream 18080

ssegate_config "$out/ssegate.toml" 127.0.0.1:18081 127.0.0.1:18083 127.0.0.1:18080
RUST_LOG=warn "$ssegate" --config "$out/ssegate.toml" 2>"$out/ssegate.log" &
sg=$!
pids+=("$sg")
ssegate_config "$out/ssegate-10s.toml" 127.0.0.1:18084 127.0.0.1:18085 127.0.0.1:18080
MALLOC_CONF=confirm_conf:true,dirty_decay_ms:10000 RUST_LOG=warn "$ssegate" --config "$out/ssegate-10s.toml" 2>"$out/ssegate-10s.log" &
sg10=$!
pids+=("$sg10")
nginx_config "$out/nginx" 127.0.0.1:18082 127.0.0.1:18080
"$nginx_bin" -p "$out/nginx" -c "$out/nginx/nginx.conf" -e "$out/nginx/error.log" 2>"$out/nginx.log" &
ng=$!
pids+=("$ng")
wait_port 18081 ssegate
wait_port 18084 ssegate-10s
wait_port 18082 nginx
# A jemalloc that does not read MALLOC_CONF (a prefixed build reads
# _RJEM_MALLOC_CONF) would make the two ssegates the same.
grep -q "Set conf value: dirty_decay_ms:10000" "$out/ssegate-10s.log" || {
  echo "error: $ssegate's jemalloc did not take MALLOC_CONF (see $out/ssegate-10s.log)" >&2
  exit 1
}

# faults PID: minor page faults so far of PID and its children (nginx's
# workers); a process's own line counts all its threads.
faults() {
  local total=0 p
  for p in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk '{print $10}' "/proc/$p/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

results=$out/results.jsonl
: >"$results"
query="n=2&size=64&interval_ms=1000&format=sse"
targets=("ssegate=$sg=18081" "ssegate-10s=$sg10=18084" "nginx=$ng=18082")
swapped=("${targets[1]}" "${targets[0]}" "${targets[2]}")
echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); 1 warm-up and $rounds measured bursts of 2,000 streams, $gap s apart"
for round in $(seq 0 "$rounds"); do
  [ "$round" -eq 0 ] || sleep "$gap"
  order=("${targets[@]}")
  [ $((round % 2)) -eq 0 ] || order=("${swapped[@]}")
  for t in "${order[@]}"; do
    IFS== read -r name pid port <<<"$t"
    before=$(faults "$pid")
    line=$("$load" client --scenario refault --target "$name" --streams 2000 --spread-ms 100 --pid "$pid" \
      --url "http://127.0.0.1:$port/v1/stream?$query")
    after=$(faults "$pid")
    # The warm-up burst grows every proxy to its size: not counted.
    [ "$round" -eq 0 ] || echo "${line%\}},\"page_faults\":$((after - before))}" >>"$results"
  done
done

# values NAME FIELD: NAME's FIELD, one burst a line, in the order run.
values() {
  { grep "\"target\":\"$1\"" "$results" || true; } | { grep -o "\"$2\":[0-9][0-9.eE+-]*" || true; } | cut -d: -f2
}
# cell NAME FIELD SCALE: the median of NAME's FIELD (times SCALE), and in
# brackets the median over the bursts of its ratio to ssegate-10s's in the
# same round: the two ran one after the other, while the machine's speed
# drifts from round to round by more than what is measured here.
cell() {
  paste <(values "$1" "$2") <(values ssegate-10s "$2") | awk -v s="$3" '
    {if ($1 != "") v[++c] = $1; if ($1 == "" || $2 == "") unpaired = 1; else if ($2 > 0) r[++n] = $1 / $2}
    function median(a, k,   i, j, t) {
      for (i = 2; i <= k; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) {t = a[j]; a[j] = a[j - 1]; a[j - 1] = t}
      return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
    }
    END {
      if (c == 0) {print "n/a"; exit}
      m = median(v, c) * s
      if (unpaired) printf "%.0f (unpaired)", m; else if (n == 0) printf "%.0f", m; else printf "%.0f (%.2f)", m, median(r, n)
    }'
}
printf '%-12s %18s %18s %24s %7s\n' target "page faults" "proxy CPU, ms" "last first event, ms" errors
for t in "${targets[@]}"; do
  name=${t%%=*}
  printf '%-12s %18s %18s %24s %7s\n' "$name" "$(cell "$name" page_faults 1)" "$(cell "$name" proxy_cpu_s 1000)" \
    "$(cell "$name" last_first_event_ms 1)" "$(errors_total "$results" "$name")"
done
echo "(medians over the bursts; in brackets the median of the ratios to ssegate-10s in the same round;"
echo " raw results: ${results#"$root"/})"

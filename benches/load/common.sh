# Shared by the scripts in benches/load (sourced, not run).

# apt_install PKG...: installs Debian packages, with sudo when not root.
# A package's system service (nginx) is not started: policy-rc.d says no
# while apt-get runs.
apt_install() {
  local sudo="" policy=/usr/sbin/policy-rc.d added_policy=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing $* (apt-get)"
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    added_policy=1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  [ -z "$added_policy" ] || $sudo rm -f "$policy"
}

# ports_free PORT...: fails, saying which, when one is in use on 127.0.0.1.
ports_free() {
  local port
  for port in "$@"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "error: 127.0.0.1:$port is in use" >&2
      return 1
    fi
  done
}

# find_nginx: sets nginx_bin to Debian's nginx, or to "" when it is missing.
find_nginx() {
  nginx_bin=$(command -v nginx || true)
  [ -n "$nginx_bin" ] || [ ! -x /usr/sbin/nginx ] || nginx_bin=/usr/sbin/nginx
}

# need_nginx: find_nginx, after installing Debian's nginx when it is missing.
need_nginx() {
  find_nginx
  [ -n "$nginx_bin" ] || { apt_install nginx && find_nginx; }
}

# start_upstream PORT: starts the fake upstream on 127.0.0.1:PORT (its log
# in $out) and waits until it listens.
start_upstream() {
  "$load" upstream --listen "127.0.0.1:$1" 2>"$out/upstream.log" &
  pids+=($!)
  wait_port "$1" "the fake upstream"
}

# wait_port PORT WHAT: waits (10 s at most) until something listens on
# 127.0.0.1:PORT, else exits naming WHAT and the logs in $out.
wait_port() {
  local i
  for i in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "error: nothing listens on 127.0.0.1:$1 ($2); see $out/*.log" >&2
  exit 1
}

# Every process started in the background goes into pids; they are killed
# and waited for when the script ends, however it ends.
pids=()
cleanup() {
  local pid
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ssegate_config FILE LISTEN ADMIN UPSTREAM [SERVER_LINE]: the config the
# scripts measure: one route, /v1 to http://UPSTREAM, limits above the idle
# scenario's streams; SERVER_LINE goes into [server] (`workers = 1`).
ssegate_config() {
  cat >"$1" <<CONF
[server]
listen = "$2"
admin_listen = "$3"
${5:-}

[limits]
max_streams = 20000
max_connections = 20000

[[routes]]
prefix = "/v1"
upstream = "http://$4"
CONF
}

# nginx_config PREFIX LISTEN UPSTREAM [SED_ARG...]: benches/load/nginx.conf
# for LISTEN and UPSTREAM, as PREFIX/nginx.conf in an emptied PREFIX; the
# SED_ARGs (`-e s|...|...|`) change it further.
nginx_config() {
  local prefix=$1 listen=$2 upstream=$3
  shift 3
  rm -rf "$prefix"
  mkdir -p "$prefix"
  sed -e "s|@PREFIX@|$prefix|g" -e "s|@LISTEN@|$listen|g" -e "s|@UPSTREAM@|$upstream|g" "$@" \
    benches/load/nginx.conf >"$prefix/nginx.conf"
}

# load_binaries: sets load and ssegate to the binaries benches/load/run.sh
# builds (SSEGATE_BIN picks another ssegate), failing when one is missing.
load_binaries() {
  local bin_dir=$PWD/target/load-build/debian/release
  load=$bin_dir/ssegate-load
  ssegate=${SSEGATE_BIN:-$bin_dir/ssegate}
  if [ ! -x "$load" ] || [ ! -x "$ssegate" ]; then
    echo "error: $load or $ssegate is missing; run benches/load/run.sh first" >&2
    exit 1
  fi
  # How run.sh built it (with or without PGO).
  if [ -z "${SSEGATE_BIN:-}" ] && [ -e "$bin_dir/ssegate.build" ]; then
    cat "$bin_dir/ssegate.build"
  fi
}

# helper_setup NAME: what a helper script needs first: the binaries
# (load_binaries), its work directory target/load/NAME as out, and as
# many open files as the machine allows.
helper_setup() {
  load_binaries
  out=$root/target/load/$1
  mkdir -p "$out"
  ulimit -n "$(ulimit -Hn)"
}

# rustc_release: the release of the rustc that builds (1.95.0). A PGO profile
# names functions by their symbols, which carry hashes of the rustc release:
# a profile is of use only to the release that made it.
rustc_release() {
  ${RUSTC:-rustc} -V | sed -n 's/^rustc \([^ ]*\).*/\1/p'
}

# pgo_rustflags DIR: sets rustflags to build with the profile that
# benches/load/pgo.sh made with this rustc release (unpacked into DIR, under
# a name that changes with the profile, so that cargo rebuilds when it
# does), or to nothing when there is none or PGO=0; sets pgo_note to which,
# and says it.
pgo_rustflags() {
  local release profile sum unpacked others
  rustflags=""
  release=$(rustc_release)
  profile=benches/load/ssegate-rustc$release.profdata.xz
  if [ "${PGO:-1}" = 0 ]; then
    pgo_note="ssegate without profile-guided optimisation (PGO=0)"
  elif [ ! -e "$profile" ]; then
    others=$(cd benches/load && ls ssegate-rustc*.profdata.xz 2>/dev/null | tr '\n' ' ')
    others=${others% }
    pgo_note="ssegate without profile-guided optimisation: no profile for rustc $release (there is: ${others:-none}; benches/load/pgo.sh makes one)"
  else
    command -v xz >/dev/null || apt_install xz-utils
    sum=$(sha256sum "$profile" | cut -c1-16)
    unpacked=$1/ssegate-$sum.profdata
    if [ ! -e "$unpacked" ]; then
      mkdir -p "$1"
      xz -dc "$profile" >"$unpacked.part"
      mv "$unpacked.part" "$unpacked"
    fi
    rustflags="-Cprofile-use=$unpacked"
    pgo_note="ssegate with profile-guided optimisation ($profile)"
  fi
  echo "$pgo_note"
}

# median RESULTS NAME FIELD: the median of FIELD over NAME's lines in the
# JSON-lines file RESULTS ("n/a" when no line has it).
median() {
  { grep "\"target\":\"$2\"" "$1" || true; } | { grep -o "\"$3\":[0-9][0-9.eE+-]*" || true; } |
    cut -d: -f2 | sort -g |
    awk '{v[NR] = $1} END {if (NR == 0) print "n/a"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}

# errors_total RESULTS NAME: the errors of NAME's lines in RESULTS, added up.
errors_total() {
  { grep "\"target\":\"$2\"" "$1" || true; } | { grep -o '"errors":[0-9]*' || true; } |
    cut -d: -f2 | awk '{s += $1} END {print s + 0}'
}

# median_cells RESULTS NAME BASE FIELD...: sets cells to one cell per
# FIELD, the median of NAME's FIELD in RESULTS and in brackets its ratio to
# BASE's median.
median_cells() {
  local results=$1 name=$2 base=$3 f v b
  shift 3
  cells=()
  for f in "$@"; do
    v=$(median "$results" "$name" "$f")
    b=$(median "$results" "$base" "$f")
    cells+=("$(awk -v v="$v" -v b="$b" 'BEGIN {if (v == "n/a") print v; else if (b == "n/a" || b == 0) printf "%.1f", v; else printf "%.1f (%.2f)", v, v / b}')")
  done
}

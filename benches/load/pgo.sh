#!/usr/bin/env bash
# Makes the profile that benches/load/run.sh builds ssegate with
# (profile-guided optimisation, PGO): builds an instrumented ssegate, sends
# it small runs of the harness's scenarios and of the other shapes a model
# server streams (NDJSON, plain text, the handoff's POST), and merges what it
# counted into benches/load/ssegate-rustcR.profdata.xz, R being this rustc's
# release: the profile names functions by their symbols, which carry hashes
# of the rustc release (and of the crates' versions, Cargo.lock's), so
# run.sh uses it only with that release. llvm-profdata of this rustc's LLVM
# major version and xz are installed with apt-get when missing.
#
#   benches/load/pgo.sh
#
# Run it again after changing code on the set-up or event paths: a function
# changed since the profile was made is built as if it had none. Ports 18080
# (fake upstream) and 18081/18091 (ssegate) on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
# shellcheck source=benches/load/common.sh
. benches/load/common.sh

release=$(rustc_release)
major=$(${RUSTC:-rustc} -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if [ -z "$release" ] || [ -z "$major" ]; then
  echo "error: rustc -vV names no release or LLVM version" >&2
  exit 1
fi
profdata=$(command -v "llvm-profdata-$major" || true)
[ -n "$profdata" ] || profdata=/usr/lib/llvm-$major/bin/llvm-profdata
[ -x "$profdata" ] || apt_install "llvm-$major"
command -v xz >/dev/null || apt_install xz-utils
ports_free 18080 18081 18091 || exit 1
ulimit -n "$(ulimit -Hn)"

out=$root/target/load/pgo
rm -rf "$out"
mkdir -p "$out"
jemalloc_a=/usr/lib/$(gcc -dumpmachine 2>/dev/null || echo x86_64-linux-gnu)/libjemalloc_pic.a
[ -e "$jemalloc_a" ] || apt_install libjemalloc-dev
# The instrumented ssegate (its own target directory: the flags change every
# crate), and a plain build of the load client.
echo "building an instrumented ssegate and the load client"
RUSTFLAGS="-Cprofile-generate=$out/build" JEMALLOC_OVERRIDE=$jemalloc_a \
  CARGO_TARGET_DIR=$root/target/load-build/pgo-gen cargo build --release -q -p ssegate
JEMALLOC_OVERRIDE=$jemalloc_a CARGO_TARGET_DIR=$root/target/load-build/plain cargo build --release -q -p ssegate-load
load=$root/target/load-build/plain/release/ssegate-load
ssegate=$root/target/load-build/pgo-gen/release/ssegate

"$load" upstream --listen 127.0.0.1:18080 2>"$out/upstream.log" &
pids+=($!)
ssegate_config "$out/ssegate.toml" 127.0.0.1:18081 127.0.0.1:18091 127.0.0.1:18080
# Only ssegate's own counts go into the profile (the build scripts and proc
# macros that ran in the build wrote theirs under $out/build).
LLVM_PROFILE_FILE=$out/ssegate-%p.profraw RUST_LOG=warn "$ssegate" --config "$out/ssegate.toml" 2>"$out/ssegate.log" &
sg=$!
pids+=("$sg")
wait_port 18081 ssegate

url=http://127.0.0.1:18081
train() { "$load" client --target pgo --pid "$sg" "$@" >>"$out/client.jsonl"; }
echo "training"
train --scenario setup --streams 2000 --spread-ms 0 --url "$url/v1/stream?n=1&size=64&interval_ms=0&format=sse"
train --scenario typing --streams 100 --url "$url/v1/stream?n=100&size=64&interval_ms=20&format=sse"
train --scenario fanin --streams 1000 --url "$url/v1/stream?n=20&size=64&interval_ms=100&format=sse"
train --scenario flat --streams 20 --url "$url/v1/stream?n=5000&size=64&interval_ms=0&format=sse"
train --scenario ndjson --streams 50 --url "$url/v1/stream?n=100&size=64&interval_ms=10&format=ndjson"
train --scenario text --streams 50 --url "$url/v1/stream?n=100&size=64&interval_ms=10&format=text"
train --scenario handoff --streams 50 --handoff --spread-ms 20 \
  --url "$url/handoff/v1/stream?n=50&size=64&interval_ms=20&format=sse"
train --scenario large --streams 5 --url "$url/v1/stream?n=50&size=65536&interval_ms=0&format=sse"
train --scenario idle --streams 2000 --idle-hold-ms 500 --url "$url/v1/stream?n=2&size=64&interval_ms=60000&format=sse"
if grep -q '"errors":[1-9]' "$out/client.jsonl"; then
  echo "error: streams failed in training (see $out/client.jsonl and $out/ssegate.log)" >&2
  exit 1
fi
# The counts are written when the process exits.
if ! kill -TERM "$sg" 2>/dev/null; then
  echo "error: ssegate exited during training (see $out/ssegate.log)" >&2
  exit 1
fi
wait "$sg" || true

profile=benches/load/ssegate-rustc$release.profdata.xz
if ! compgen -G "$out/ssegate-*.profraw" >/dev/null; then
  echo "error: ssegate wrote no profile (see $out/ssegate.log)" >&2
  exit 1
fi
"$profdata" merge --sparse -o "$out/ssegate.profdata" "$out"/ssegate-*.profraw
xz -9 -c "$out/ssegate.profdata" >"$profile.part"
mv "$profile.part" "$profile"
echo "wrote $profile ($(wc -c <"$profile") bytes) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src || echo ' with changes in src/')"

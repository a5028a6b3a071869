#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine, installing what it
# needs when missing: redis-server, chromium + chromium-driver (apt-get), and
# the OpenAI and Anthropic Python SDKs (pip, in a venv under target/).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v make >/dev/null || need+=(make) # jemalloc builds with make
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

venv=target/pyenv
if ! "$venv/bin/python" -c 'import openai, anthropic' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r tests/sdk/requirements.txt
fi
export SSEGATE_TEST_PYTHON="$PWD/$venv/bin/python"

# Incremental caches only help repeated local builds; CI builds once.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo test --workspace --all-targets --locked

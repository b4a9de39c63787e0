#!/usr/bin/env bash
# The JavaScript client's tests (Node's test runner against a real
# gateway) and the browser tests (playwright-core driving Debian's
# Chromium; no browser is ever downloaded). Installs what is missing on a
# fresh machine: the chromium package (apt) and the locked npm packages.
# Expects the debug binary (target/debug/otako-gateway) and the plugins
# (scripts/build-plugins.sh) to be built; scripts/test.sh does both first.
# Screenshots: tests/browser/output/.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ ! -x /usr/bin/chromium ]]; then
    echo "installing chromium (apt)"
    if [[ $(id -u) -eq 0 ]]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi
if [[ ! -d tests/browser/node_modules ]] || [[ tests/browser/package-lock.json -nt tests/browser/node_modules ]]; then
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
fi
bin="${OTAKO_BIN:-${CARGO_TARGET_DIR:-target}/debug/otako-gateway}"
[[ -x $bin ]] || cargo build
export OTAKO_BIN="$(realpath "$bin")"

# Node 20 has WebSocket behind a flag; later versions have it on.
ws_flag=""
if ! node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)'; then
    ws_flag="--experimental-websocket"
fi
node $ws_flag --test --test-concurrency=1 clients/js/test/client.test.js
(cd tests/browser && node $ws_flag --test --test-concurrency=1 demo.test.js)
(cd tests/browser && node size.js)

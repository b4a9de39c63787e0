#!/usr/bin/env bash
# Runs the whole test suite: builds the WebAssembly plugins (installing the
# wasm32-wasip2 target if missing), makes sure the local PostgreSQL answers,
# then runs every unit and integration test: the plugin SDK's and handlers'
# own (natively, in the plugins workspace; the JavaScript and Python
# handlers' under Node and CPython, scripts/test-lang-plugins.sh), then the
# gateway's, then the JavaScript client's and the browser tests
# (scripts/browser-test.sh, which installs Chromium and the npm packages if
# missing).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-plugins.sh
scripts/services.sh
cargo test --manifest-path plugins/Cargo.toml --target-dir plugins/target
scripts/test-lang-plugins.sh
cargo test --all-targets "$@"
scripts/browser-test.sh

#!/usr/bin/env bash
# Runs the whole test suite: builds the WebAssembly plugins (installing the
# wasm32-wasip2 target if missing), makes sure the local PostgreSQL answers,
# then runs every unit and integration test.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-plugins.sh
scripts/services.sh
cargo test --all-targets "$@"

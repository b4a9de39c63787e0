#!/usr/bin/env bash
# Runs the gateway on its embedded defaults: SQLite under data/, the file
# log sink, and the example plugins built from plugins/.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-plugins.sh
exec cargo run --quiet -- --config gateway.toml dev "$@"

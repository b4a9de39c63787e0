#!/usr/bin/env bash
# Runs the gateway on its embedded defaults: SQLite under data/, the file
# log sink, and the example plugins built from plugins/. On a fresh clone
# the first build takes a few minutes: cargo's own progress is shown. It
# ends by printing what to open (a demo chat link per demo user, then the
# operator page, then curl recipes).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building the plugins (scripts/build-plugins.sh)"
scripts/build-plugins.sh
echo "==> building and starting otako-gateway dev (the first build takes a few minutes)"
exec cargo run -- --config gateway.toml dev "$@"

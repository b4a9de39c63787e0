#!/usr/bin/env bash
# Runs the JavaScript and Python plugins' unit tests: each handler against
# the scripted host of plugins/testhost/, under plain Node and CPython (no
# gateway, no component build). `plugins/<name>/*.test.mjs` run with
# `node --test`, `plugins/<name>/test_*.py` with unittest (one process per
# folder, since every Python handler is an `app.py`); the same under
# plugins/testing/. The Python host needs componentize-py, which
# scripts/build-plugins.sh installs. Works from any directory.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
plugins="$root/plugins"
shopt -s nullglob

js_tests=("$plugins"/*/*.test.mjs "$plugins"/testing/*/*.test.mjs)
if ((${#js_tests[@]} > 0)); then
    node --test "${js_tests[@]}"
fi

for dir in "$plugins"/*/ "$plugins"/testing/*/; do
    py_tests=("$dir"test_*.py)
    ((${#py_tests[@]} > 0)) || continue
    echo "unittest: ${dir#"$root"/}"
    (cd "$dir" && PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$plugins/testhost" python3 -m unittest discover -p 'test_*.py')
done

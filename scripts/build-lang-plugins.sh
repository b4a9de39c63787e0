#!/usr/bin/env bash
# Builds the JavaScript and Python plugins to components (called by
# scripts/build-plugins.sh; runs on its own too):
#   plugins/<name>/handler.js          -> plugins/<name>.wasm             (componentize-js)
#   plugins/<name>/app.py              -> plugins/<name>.wasm             (componentize-py)
#   plugins/testing/<name>/handler.js|app.py -> plugins/testing/wasm/<name>.wasm
# The toolchains come from the npm registry and PyPI only, at the exact
# versions in plugins/toolchain/ (package-lock.json, requirements.txt), into
# plugins/.toolchain/ (gitignored). Everything is incremental: a toolchain is
# reinstalled only when its manifest changes, and a plugin is rebuilt only
# when its sources, the WIT world or the toolchain changed (a JS/Python build
# takes 10-20 s, so the test suite must not pay it on every run).
# Arguments: plugin folder names to build only those (default: all, and
# the dev loaders), or --dev-loaders to build only the loaders: the JS and
# Python runtimes `otako-gateway dev` evaluates a saved handler's source in
# (plugins/toolchain/dev/, world dev-loader) into plugins/.toolchain/dev/.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
plugins="$root/plugins"
manifests="$plugins/toolchain"
tools="$plugins/.toolchain"
stamps="$tools/stamps"
mkdir -p "$stamps"

# Hash of files' names and contents: what a build or an install depends on.
digest() {
    for f in "$@"; do printf '%s\n' "${f#"$root"/}"; cat "$f"; done | sha256sum | cut -d' ' -f1
}

# Runs "$@" only when the stamp named $1 differs from digest $2; records it
# after success, so a failed step is retried next time.
when_changed() {
    local name="$1" sum="$2"
    shift 2
    if [[ -f "$stamps/$name" && "$(cat "$stamps/$name")" == "$sum" ]]; then
        return 0
    fi
    "$@"
    echo "$sum" >"$stamps/$name"
}

js_tool_sum="$(digest "$manifests/package.json" "$manifests/package-lock.json")"
py_tool_sum="$(digest "$manifests/requirements.txt")"

install_js() {
    echo "installing the JavaScript plugin toolchain (npm) into ${tools#"$root"/}/js"
    rm -rf "$tools/js"
    mkdir -p "$tools/js"
    cp "$manifests/package.json" "$manifests/package-lock.json" "$tools/js/"
    npm ci --prefix "$tools/js" --no-audit --no-fund --loglevel=error
}

install_py() {
    echo "installing the Python plugin toolchain (pip) into ${tools#"$root"/}/py"
    rm -rf "$tools/py"
    python3 -m venv "$tools/py"
    "$tools/py/bin/pip" install --quiet --disable-pip-version-check -r "$manifests/requirements.txt"
}

componentize_js() { # source dir, output file[, world, file]
    # No wasi:http: the gateway links WASI p2 without it (a plugin gets no
    # network), and a component importing it would not link.
    node "$tools/js/node_modules/@bytecodealliance/componentize-js/src/cli.js" \
        "$1/${4:-handler.js}" --wit "$root/wit" --world-name "${3:-plugin}" \
        --disable http fetch-event --out "$2.tmp"
    mv "$2.tmp" "$2"
}

componentize_py() { # source dir, output file[, world, module]
    # Bytecode caches would otherwise land in the source folder.
    PYTHONDONTWRITEBYTECODE=1 "$tools/py/bin/componentize-py" \
        --quiet --wit-path "$root/wit" --world "${3:-plugin}" componentize "${4:-app}" \
        --python-path "$1" --output "$2.tmp"
    mv "$2.tmp" "$2"
}

# The dev loaders: one runtime per language that evaluates a handler's
# source at load (see wit/dev.wit), so a save in `dev` skips componentize.
build_dev_loaders() {
    local dev="$manifests/dev" out="$tools/dev" sum
    mkdir -p "$out"
    when_changed toolchain-js "$js_tool_sum" install_js
    sum="$(digest "$dev/loader.js" "$root"/wit/*.wit "$root/scripts/build-lang-plugins.sh")-$js_tool_sum"
    [[ -f "$out/loader-js.wasm" ]] || rm -f "$stamps/dev-loader.js"
    when_changed dev-loader.js "$sum" componentize_js "$dev" "$out/loader-js.wasm" dev-loader loader.js
    when_changed toolchain-py "$py_tool_sum" install_py
    sum="$(digest "$dev/loader.py" "$root"/wit/*.wit "$root/scripts/build-lang-plugins.sh")-$py_tool_sum"
    [[ -f "$out/loader-py.wasm" ]] || rm -f "$stamps/dev-loader.py"
    when_changed dev-loader.py "$sum" componentize_py "$dev" "$out/loader-py.wasm" dev-loader loader
    echo "dev loaders up to date: ${out#"$root"/}/loader-js.wasm, loader-py.wasm"
}

if [[ "${1:-}" == "--dev-loaders" ]]; then
    build_dev_loaders
    exit 0
fi

# Every JS/Python plugin folder: plugins/* (handlers) and plugins/testing/*.
sources=()
for dir in "$plugins"/*/ "$plugins"/testing/*/; do
    dir="${dir%/}"
    [[ -f "$dir/handler.js" || -f "$dir/app.py" ]] && sources+=("$dir")
done
if (($# > 0)); then
    wanted=" $* "
    picked=()
    for dir in "${sources[@]}"; do
        [[ "$wanted" == *" $(basename "$dir") "* ]] && picked+=("$dir")
    done
    sources=("${picked[@]}")
fi

summary=()
for dir in "${sources[@]}"; do
    name="$(basename "$dir")"
    if [[ "$dir" == "$plugins/testing/"* ]]; then
        out="$plugins/testing/wasm/$name.wasm"
    else
        out="$plugins/$name.wasm"
    fi
    mkdir -p "$(dirname "$out")"
    # Unit tests (test_*.py; JS ones are *.test.mjs) are not in the component.
    mapfile -t files < <(find "$dir" -type f \( -name '*.js' -o -name '*.py' \) ! -name 'test_*.py' | LC_ALL=C sort)
    if [[ -f "$dir/handler.js" ]]; then
        when_changed toolchain-js "$js_tool_sum" install_js
        lang=js tool_sum="$js_tool_sum" build=componentize_js
    else
        when_changed toolchain-py "$py_tool_sum" install_py
        lang=py tool_sum="$py_tool_sum" build=componentize_py
    fi
    # This script is in the sum too: a changed build recipe rebuilds.
    sum="$(digest "${files[@]}" "$root"/wit/*.wit "$root/scripts/build-lang-plugins.sh")-$tool_sum"
    [[ -f "$out" ]] || rm -f "$stamps/$name.$lang"
    when_changed "$name.$lang" "$sum" "$build" "$dir" "$out"
    summary+=("$name $(($(stat -c %s "$out") / 1024))K")
done

if ((${#summary[@]} > 0)); then
    (IFS=','; echo "JS/Python plugins up to date: ${summary[*]}" | sed 's/,/, /g')
fi

# With no arguments, everything: the dev loaders too.
(($# > 0)) || build_dev_loaders

#!/usr/bin/env bash
# Builds every guest plugin (plugins/ is its own cargo workspace) for
# wasm32-wasip2 in release, then puts each component where it is used:
#   plugins/<handler>.wasm            the real handlers gateway.toml routes to
#   plugins/testing/wasm/<name>.wasm  the misbehaving plugins the host tests load
# and then, through scripts/build-lang-plugins.sh, the JavaScript and Python
# ones (plugins/<name>/handler.js or app.py).
# Works from any directory. Extra arguments go to `cargo build`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
plugins="$root/plugins"
target=wasm32-wasip2

handlers=(message_create message_update message_delete)
test_plugins=(
    trap_plugin panic_plugin loop_plugin alloc_plugin bad_json_plugin
    ghost_user_plugin write_plugin config_echo_plugin noop_plugin
    error_plugin log_plugin
)

# Read the list first: `grep -q` exiting early would SIGPIPE rustup, and
# pipefail would then report the target as missing.
installed="$(rustup target list --installed)"
if ! grep -qx "$target" <<<"$installed"; then
    rustup target add "$target"
fi

# Its own target dir even when CARGO_TARGET_DIR points elsewhere: the
# files are copied from there below.
cargo build --manifest-path "$plugins/Cargo.toml" --target "$target" --target-dir "$plugins/target" --release "$@"

out="$plugins/target/$target/release"
mkdir -p "$plugins/testing/wasm"
summary=()
copy() { # crate name, destination dir
    install -m 0644 "$out/$1.wasm" "$2/$1.wasm"
    summary+=("$1 $(($(stat -c %s "$2/$1.wasm") / 1024))K")
}
for name in "${handlers[@]}"; do copy "$name" "$plugins"; done
for name in "${test_plugins[@]}"; do copy "$name" "$plugins/testing/wasm"; done

total=$((${#handlers[@]} + ${#test_plugins[@]}))
(IFS=','; echo "built $total plugins: ${summary[*]}" | sed 's/,/, /g')

# The JavaScript and Python plugins (incremental: skipped when unchanged).
"$root/scripts/build-lang-plugins.sh"

#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers that read untrusted bytes
# (src/fuzz.rs), with libFuzzer through cargo-fuzz.
#
#   scripts/fuzz.sh                    # every target, 600 s each
#   scripts/fuzz.sh 60 token handshake # those targets, 60 s each
#   FUZZ_MERGE=1 scripts/fuzz.sh 600   # then fold new coverage into fuzz/corpus
#   FUZZ_BUILD_ONLY=1 scripts/fuzz.sh   # build the instrumented drivers only
#
# Inputs found along the way go to fuzz/work/<target> (not committed); the
# committed seeds in fuzz/corpus/<target> are read, not written, unless
# FUZZ_MERGE=1 merges the inputs that add coverage (by edges, not hit
# counts, so the committed corpus stays small). A crash, panic, hang
# (> 10 s) or an input over 2 GB of memory stops that target and leaves the
# input in fuzz/artifacts/<target>/; the script then exits non-zero. Fixed
# findings go into fuzz/corpus/<target>/ as regression tests: the test suite
# (tests/fuzz.rs) replays every corpus file.
#
# No sanitizer: the crate denies unsafe code, so what a parser can get
# wrong here is a panic, an overflow (debug assertions are on), a hang or
# unbounded memory, all of which libFuzzer catches by itself; AddressSanitizer
# would roughly double the build of wasmtime and slow every run.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-600}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(dispatch_frame token handshake inbound_frames config plugin_output)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz (once)..."
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz passes nightly-only flags; this stable toolchain accepts them
# with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
flags=(--sanitizer none --debug-assertions)
# A separate target directory keeps the instrumented build from
# invalidating (and locking) the normal one.
flags+=(--target-dir "${FUZZ_TARGET_DIR:-target/fuzz}")

cargo fuzz build "${flags[@]}"
if [ "${FUZZ_BUILD_ONLY:-0}" = 1 ]; then
    exit 0
fi
status=0
for target in "${targets[@]}"; do
    mkdir -p "fuzz/work/$target"
    echo "== $target: ${secs} s"
    if ! cargo fuzz run "${flags[@]}" "$target" "fuzz/work/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 2>&1 | tee "fuzz/work/$target.log" | grep -E '^(#[0-9]+ *(DONE|INITED)|stat::|==|SUMMARY|Test unit|artifact_prefix)'; then
        :
    fi
    if grep -qE 'deadly signal|ERROR: libFuzzer|SUMMARY: libFuzzer|panicked at' "fuzz/work/$target.log"; then
        echo "!! $target found a failure; see fuzz/work/$target.log and fuzz/artifacts/$target/"
        status=1
    fi
    if [ "${FUZZ_MERGE:-0}" = 1 ]; then
        cargo fuzz run "${flags[@]}" "$target" "fuzz/corpus/$target" "fuzz/work/$target" -- \
            -set_cover_merge=1 -use_counters=0 -max_len=65536 \
            >"fuzz/work/$target.merge.log" 2>&1 || true
        echo "   corpus: $(ls "fuzz/corpus/$target" | wc -l) files"
    fi
done
exit $status

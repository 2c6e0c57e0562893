#!/usr/bin/env bash
# DNS forwarding benchmark: Sluice against dnsmasq and unbound, in one run,
# on loopback only. Each forwarder relays to the same local authority (NSD
# serving a wildcard zone), and dnsperf measures
#   - max qps (100 queries outstanding, 10 s) and the mean latency there,
#   - p50/p99 latency at a fixed load every peer sustains (RATE qps, 5 s,
#     per-query latencies from `dnsperf -v`),
# the server's CPU time per answered query during the max-qps run (from
# /proc, user + system, all threads), the max qps again with the server
# held to CAP_PERCENT (default 50) of one CPU by a cgroup CPU quota (every
# forwarder the same quota; cached workload only), and dnsperf straight at
# NSD ("direct", the load side's ceiling),
# once "cached" (10 names asked over and over, caches on) and once
# "uncached" (50,000 distinct names, every cache off and TTL-0 answers).
#
# CPU: the forwarder under test is pinned to CPU $SERVER_CPU with one thread
# (Sluice `runtime: {workers: 1}`, unbound `num-threads: 1`, dnsmasq is
# single-threaded); dnsperf and NSD share CPU $LOAD_CPU.
#
# Why the capped run: uncapped, a fast forwarder answers as fast as dnsperf
# on one CPU can ask (see "direct"), so the max-qps column stops ranking
# forwarders once they reach that ceiling; held to part of a CPU, the
# server is the limit again and its qps is its own. It needs root and the
# cgroup CPU controller (v2 `cpu.max` or v1 `cpu.cfs_quota_us`); without
# them the column says "n/a".
#
# ROUNDS (default 3) interleaved rounds; each reported figure is the median
# over the rounds (and the qps range).
# Needs free loopback ports BASE_PORT..BASE_PORT+3 (UDP and TCP), the Debian packages
# dnsperf, dnsmasq-base (or dnsmasq), unbound, nsd, and a release build
# (`cargo build --release -p sluice -p sluice-bench`; bench-load draws the chart).
# Writes its summary and a chart of the ratios (ratios.svg) to OUT
# (default bench/out/dns-TIMESTAMP). Usage: bench/dns/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
LAT_DURATION=${LAT_DURATION:-5}
RATE=${RATE:-5000}
BASE_PORT=${BASE_PORT:-25353}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
SLUICE=${SLUICE:-target/release/sluice}
UNCACHED_NAMES=${UNCACHED_NAMES:-50000}
PEERS=${PEERS:-direct sluice dnsmasq unbound}
ROUNDS=${ROUNDS:-3}
CAP_PERCENT=${CAP_PERCENT:-50}

AUTH_PORT=$BASE_PORT
SLUICE_PORT=$((BASE_PORT + 1))
DNSMASQ_PORT=$((BASE_PORT + 2))
UNBOUND_PORT=$((BASE_PORT + 3))

missing=()
for t in dnsperf dnsmasq unbound nsd taskset dig; do
  command -v "$t" >/dev/null || missing+=("$t")
done
if ((${#missing[@]})); then
  echo "bench/dns: missing ${missing[*]}; apt-get install -y dnsperf dnsmasq-base unbound nsd util-linux dnsutils" >&2
  exit 1
fi
case " $PEERS " in *" sluice "*) [ -x "$SLUICE" ] || { echo "bench/dns: no $SLUICE; run cargo build --release -p sluice" >&2; exit 1; } ;; esac

WORK=$(mktemp -d /tmp/sluice-bench-dns.XXXXXX)
PIDS=()
# A cgroup of our own for the capped run: v2 when the unified hierarchy has
# the cpu controller, else v1's cpu hierarchy; empty when neither is usable.
CAP_CG=""
CAP_KIND=""
if [ -w /sys/fs/cgroup/cgroup.subtree_control ] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null; then
  CAP_CG=/sys/fs/cgroup/sluice-bench-dns.$$ CAP_KIND=v2
elif [ -w /sys/fs/cgroup/cpu/cgroup.procs ] && [ -e /sys/fs/cgroup/cpu/cpu.cfs_quota_us ]; then
  CAP_CG=/sys/fs/cgroup/cpu/sluice-bench-dns.$$ CAP_KIND=v1
fi
if [ -n "$CAP_CG" ]; then
  # A 10 ms period keeps the throttled gaps short next to dnsperf's timeouts.
  quota=$((10000 * CAP_PERCENT / 100))
  if ! { mkdir "$CAP_CG" &&
    if [ $CAP_KIND = v2 ]; then
      grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control || echo +cpu >/sys/fs/cgroup/cgroup.subtree_control
      echo "$quota 10000" >"$CAP_CG/cpu.max"
    else echo 10000 >"$CAP_CG/cpu.cfs_period_us" && echo "$quota" >"$CAP_CG/cpu.cfs_quota_us"; fi; } 2>/dev/null; then
    echo "bench/dns: cannot set up a CPU-quota cgroup under /sys/fs/cgroup (run as root, with the cgroup cpu controller mounted); the capped column is n/a" >&2
    rmdir "$CAP_CG" 2>/dev/null || true
    CAP_CG=""
  fi
fi
cleanup() {
  # Only the processes this script started, by PID.
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -z "$CAP_CG" ] || rmdir "$CAP_CG" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# ------------------------------------------------------------ query files
for i in $(seq 1 10); do echo "c$i.cached.bench.test A"; done >"$WORK/cached.txt"
awk -v n="$UNCACHED_NAMES" 'BEGIN { for (i = 1; i <= n; i++) printf "u%d.uncached.bench.test A\n", i }' >"$WORK/uncached.txt"

# ------------------------------------------------------------ authority
cat >"$WORK/bench.test.zone" <<'EOF'
$ORIGIN bench.test.
$TTL 3600
@           IN SOA ns.bench.test. hostmaster.bench.test. 1 3600 600 86400 300
@           IN NS  ns.bench.test.
ns          IN A   127.0.0.1
*.cached    IN A   192.0.2.1
*.uncached  0 IN A 192.0.2.2
EOF
cat >"$WORK/nsd.conf" <<EOF
server:
  ip-address: 127.0.0.1@$AUTH_PORT
  server-count: 1
  username: ""
  chroot: ""
  zonesdir: "$WORK"
  database: ""
  zonelistfile: "$WORK/zone.list"
  xfrdfile: "$WORK/xfrd.state"
  pidfile: "$WORK/nsd.pid"
  logfile: "$WORK/nsd.log"
  verbosity: 0
  hide-version: yes
  refuse-any: yes
  # Response rate limiting is on by default and would throttle the
  # forwarders (one source address) to a few hundred answers a second.
  rrl-ratelimit: 0
  rrl-whitelist-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: bench.test.
  zonefile: bench.test.zone
EOF
taskset -c "$LOAD_CPU" nsd -d -c "$WORK/nsd.conf" &
PIDS+=($!)

wait_ready() { # port name
  for _ in $(seq 1 100); do
    if dig @127.0.0.1 -p "$1" +time=1 +tries=1 +short ready.cached.bench.test A 2>/dev/null | grep -q 192.0.2.1; then
      return 0
    fi
    sleep 0.1
  done
  echo "bench/dns: $2 did not answer on 127.0.0.1:$1" >&2
  exit 1
}
wait_ready "$AUTH_PORT" nsd

# ------------------------------------------------------------ forwarders
# start_<peer> MODE (cached|uncached); prints nothing, appends the PID.
start_sluice() {
  local cache=10000
  [ "$1" = uncached ] && cache=0
  cat >"$WORK/sluice.yaml" <<EOF
admin: {address: 127.0.0.1:0}
audit: {destination: /dev/null}
runtime: {workers: 1}
listeners:
  - name: dns
    kind: dns
    address: 127.0.0.1:$SLUICE_PORT
    upstreams: ["127.0.0.1:$AUTH_PORT"]
    cache_entries: $cache
webgroups:
  - name: bench
    domains: ["*.bench.test"]
policy:
  default: deny
  rules:
    - name: bench-dns
      to: {webgroups: [bench]}
      protocols: [dns]
      action: allow
EOF
  RUST_LOG=warn taskset -c "$SERVER_CPU" "$SLUICE" run -c "$WORK/sluice.yaml" 2>"$WORK/sluice.$1.log" &
  PIDS+=($!)
  SERVER_PID=$!
  wait_ready "$SLUICE_PORT" sluice
}

start_dnsmasq() {
  local cache=10000
  [ "$1" = uncached ] && cache=0
  taskset -c "$SERVER_CPU" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
    --no-poll --user=root --pid-file="$WORK/dnsmasq.pid" \
    --listen-address=127.0.0.1 --bind-interfaces --port="$DNSMASQ_PORT" \
    --server="127.0.0.1#$AUTH_PORT" --cache-size="$cache" --dns-forward-max=1000 \
    2>"$WORK/dnsmasq.$1.log" &
  PIDS+=($!)
  SERVER_PID=$!
  wait_ready "$DNSMASQ_PORT" dnsmasq
}

start_unbound() {
  local cache=""
  if [ "$1" = uncached ]; then
    cache="  cache-max-ttl: 0
  cache-max-negative-ttl: 0"
  fi
  cat >"$WORK/unbound.conf" <<EOF
server:
  interface: 127.0.0.1@$UNBOUND_PORT
  port: $UNBOUND_PORT
  num-threads: 1
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "$WORK"
  pidfile: "$WORK/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  module-config: "iterator"
  do-not-query-localhost: no
  local-zone: "test." nodefault
  access-control: 127.0.0.0/8 allow
  qname-minimisation: no
  prefetch: no
$cache
forward-zone:
  name: "bench.test."
  forward-addr: 127.0.0.1@$AUTH_PORT
EOF
  taskset -c "$SERVER_CPU" unbound -d -c "$WORK/unbound.conf" 2>"$WORK/unbound.$1.log" &
  PIDS+=($!)
  SERVER_PID=$!
  wait_ready "$UNBOUND_PORT" unbound
}

# `direct`: dnsperf straight at the authority, no forwarder: the ceiling of
# the load side (dnsperf and NSD share one CPU), not a peer.
start_direct() {
  SERVER_PID=""
}

stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

# ------------------------------------------------------------ measuring
# CPU time (user + system, clock ticks) of process $1 so far; 0 without one.
cpu_ticks() {
  [ -n "$1" ] && [ -r "/proc/$1/stat" ] || { echo 0; return; }
  # Fields after "pid (comm) ": utime and stime are the 12th and 13th.
  sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
CLK_TCK=$(getconf CLK_TCK)

# measure PEER PORT MODE -> one result line
# "peer mode qps avg_ms p50_ms p99_ms lost cpu_us_per_query"
measure() {
  local peer=$1 port=$2 mode=$3 file="$WORK/$3.txt"
  local perf=(taskset -c "$LOAD_CPU" dnsperf -s 127.0.0.1 -p "$port" -d "$file" -c 1 -T 1 -t 2)
  # Warm up (and fill the cache in cached mode).
  "${perf[@]}" -l 2 -q 100 >/dev/null 2>&1 || true
  local out t0 t1
  t0=$(cpu_ticks "$SERVER_PID")
  out=$("${perf[@]}" -l "$DURATION" -q 100 2>&1)
  t1=$(cpu_ticks "$SERVER_PID")
  echo "$out" >"$WORK/$peer.$mode.max.txt"
  local qps avg lost
  qps=$(awk '/Queries per second:/ {print $4}' <<<"$out")
  avg=$(awk '/Average Latency \(s\):/ {printf "%.3f", $4 * 1000}' <<<"$out")
  lost=$(awk '/Queries lost:/ {print $3}' <<<"$out")
  # The server's CPU per answered query during the max-qps run: ranks the
  # forwarders even when the load side, not the server, sets the qps.
  local done cpu
  done=$(awk '/Queries completed:/ {print $3}' <<<"$out")
  if [ -n "$SERVER_PID" ] && [ "${done:-0}" -gt 0 ]; then
    cpu=$(awk -v t="$((t1 - t0))" -v hz="$CLK_TCK" -v n="$done" 'BEGIN { printf "%.2f", t / hz * 1e6 / n }')
  else
    cpu=nan
  fi
  # Max qps again with the server held to CAP_PERCENT of a CPU: cached
  # only. Uncached, every forwarder is far below the load side's ceiling
  # already, and a throttled forwarder's upstream round trips stretch into
  # the quota's gaps, which measures the gaps rather than the forwarder.
  local capped=nan
  if [ "$mode" = cached ] && [ -n "$CAP_CG" ] && [ -n "$SERVER_PID" ] &&
    echo "$SERVER_PID" >"$CAP_CG/cgroup.procs" 2>/dev/null; then
    "${perf[@]}" -l 2 -q 100 >/dev/null 2>&1 || true
    capped=$("${perf[@]}" -l "$DURATION" -q 100 2>&1 | awk '/Queries per second:/ {printf "%.0f", $4}')
    [ -n "$capped" ] || capped=nan
    # Back to the parent group, so the latency run below is not throttled.
    echo "$SERVER_PID" >"$(dirname "$CAP_CG")/cgroup.procs" 2>/dev/null || true
  fi
  # Latency at a fixed load: every response's latency, sorted.
  "${perf[@]}" -l "$LAT_DURATION" -Q "$RATE" -q 100 -v 2>/dev/null |
    awk '/^> / {print $NF}' | sort -g >"$WORK/$peer.$mode.lat"
  local n p50 p99
  n=$(wc -l <"$WORK/$peer.$mode.lat")
  if [ "$n" -gt 0 ]; then
    p50=$(awk -v n="$n" 'NR == int(n * 0.50) + 1 {printf "%.3f", $1 * 1000; exit}' "$WORK/$peer.$mode.lat")
    p99=$(awk -v n="$n" 'NR == int(n * 0.99) + 1 {printf "%.3f", $1 * 1000; exit}' "$WORK/$peer.$mode.lat")
  else
    p50=nan p99=nan
  fi
  echo "$peer $mode $qps $avg $p50 $p99 $lost $cpu $capped" | tee -a "$WORK/last"
}

RESULTS="$WORK/results.txt"
: >"$RESULTS"
# Rounds interleave the servers, so a burst of other load on the machine
# hits each of them in some round rather than one of them in all; the
# report gives the median round and the range.
for round in $(seq 1 "$ROUNDS"); do
  for mode in cached uncached; do
    for peer in $PEERS; do
      case $peer in
        direct) port=$AUTH_PORT ;;
        sluice) port=$SLUICE_PORT ;;
        dnsmasq) port=$DNSMASQ_PORT ;;
        unbound) port=$UNBOUND_PORT ;;
        *) echo "bench/dns: unknown peer $peer" >&2; exit 1 ;;
      esac
      "start_$peer" "$mode"
      echo "round $round: $(measure "$peer" "$port" "$mode")" >&2
      tail -n 1 "$WORK/last" >>"$RESULTS"
      stop_server
    done
  done
done

# ------------------------------------------------------------ report
sluice_ver="sluice $(git describe --always --dirty 2>/dev/null || echo unknown)"
dnsmasq_ver=$(dnsmasq --version | head -1 | awk '{print "dnsmasq " $3}')
unbound_ver=$(unbound -V | awk '/^Version/ {print "unbound " $2}')
nsd_ver=$(nsd -v 2>&1 | awk '/version/ {print "nsd " $3; exit}')
dnsperf_ver=$(dnsperf -h 2>&1 | awk '/^Version/ {print "dnsperf " $2; exit}')
echo
echo "Versions: $sluice_ver, $dnsmasq_ver, $unbound_ver; authority $nsd_ver; load $dnsperf_ver"
echo "Host: $(nproc) CPUs, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo); server on CPU $SERVER_CPU, dnsperf+nsd on CPU $LOAD_CPU"
echo "Max qps: ${DURATION} s, 100 outstanding; latency: ${RATE} qps for ${LAT_DURATION} s; each column the median of $ROUNDS rounds (qps range in brackets)"
echo
echo "| mode | server | qps (max) | qps, server held to ${CAP_PERCENT}% of a CPU | mean latency at max (ms) | p50 at ${RATE} qps (ms) | p99 at ${RATE} qps (ms) | lost | server CPU per query at max (µs) |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
# median PEER MODE COLUMN -> the median of that column over the rounds
median() {
  awk -v p="$1" -v m="$2" -v c="$3" '$1 == p && $2 == m { print $c }' "$RESULTS" | sort -g |
    awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)]; else print "nan" }'
}
# range PEER MODE [COLUMN] -> "lo–hi" of that column (default: qps)
range() {
  awk -v p="$1" -v m="$2" -v c="${3:-3}" '$1 == p && $2 == m && $c != "nan" { print $c }' "$RESULTS" | sort -g |
    awk 'NR == 1 { lo = $1 } { hi = $1 } END { if (NR) printf "%.0f–%.0f", lo, hi; else printf "n/a" }'
}
SUMMARY="$WORK/summary.txt"
: >"$SUMMARY"
for mode in cached uncached; do
  for peer in $PEERS; do
    qps=$(median "$peer" "$mode" 3)
    avg=$(median "$peer" "$mode" 4)
    p50=$(median "$peer" "$mode" 5)
    p99=$(median "$peer" "$mode" 6)
    lost=$(median "$peer" "$mode" 7)
    cpu=$(median "$peer" "$mode" 8)
    capped=$(median "$peer" "$mode" 9)
    echo "$peer $mode $qps $avg $p50 $p99 $lost $cpu $capped" >>"$SUMMARY"
    printf "| %s | %s | %.0f (%s) | %s (%s) | %s | %s | %s | %s | %s |\n" "$mode" "$peer" "$qps" "$(range "$peer" "$mode")" \
      "$capped" "$(range "$peer" "$mode" 9)" "$avg" "$p50" "$p99" "$lost" "$cpu"
  done
done
echo
echo "| mode | Sluice / dnsmasq qps | Sluice / unbound qps | Sluice / dnsmasq qps, capped | Sluice / unbound qps, capped | Sluice / dnsmasq p99 | Sluice / unbound p99 | Sluice / dnsmasq CPU per query | Sluice / unbound CPU per query |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for mode in cached uncached; do
  awk -v m="$mode" '
    function r(a, b) { return (a > 0 && b > 0) ? sprintf("%.2f", a / b) : "-" }
    $2 == m { qps[$1] = $3; p99[$1] = $6; cpu[$1] = $8; cap[$1] = $9 }
    END {
      printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", m,
        r(qps["sluice"], qps["dnsmasq"]), r(qps["sluice"], qps["unbound"]),
        r(cap["sluice"], cap["dnsmasq"]), r(cap["sluice"], cap["unbound"]),
        r(p99["sluice"], p99["dnsmasq"]), r(p99["sluice"], p99["unbound"]),
        r(cpu["sluice"], cpu["dnsmasq"]), r(cpu["sluice"], cpu["unbound"])
    }' "$SUMMARY"
done
echo
echo "(CPU per query: the server process's user + system time during the max-qps run"
echo " divided by the answers dnsperf counted; lower is better, and it still ranks the"
echo " forwarders when the load side, not the server, caps the qps.)"

# The summary and its chart, kept (bench/out is git-ignored).
OUT=${OUT:-bench/out/dns-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
cp "$SUMMARY" "$OUT/summary.txt"
LOAD=${LOAD:-target/release/bench-load}
echo
if [ -x "$LOAD" ]; then
  "$LOAD" dns-chart "$OUT/summary.txt" --svg "$OUT/ratios.svg" \
    --note "bench/dns/run.sh $(basename "$OUT"): medians of $ROUNDS round(s)"
else
  echo "(no $LOAD for the chart: cargo build --release -p sluice-bench)"
fi
echo "Summary: $OUT/summary.txt"

#!/usr/bin/env bash
# Records the first datagrams Chromium sends on a QUIC connection, as a
# `.hex` vector file of this directory (one datagram per block, `--`
# between them). Nothing answers, so Chromium retransmits its Initials:
# the recorder keeps the datagrams of the first connection id only.
#
#   proxy/tests/data/quic/capture-chromium.sh OUT.hex [extra chromium flags]
#
# Then cut the file to the datagrams that complete the ClientHello, and
# say so in its comment (see README.md). Needs Debian's chromium and
# python3; sends nothing beyond 127.0.0.1.
set -euo pipefail
out=$1
shift
command -v chromium >/dev/null || {
  echo "needs chromium (apt-get install chromium)" >&2
  exit 1
}
dir=$(mktemp -d)
trap 'kill "$rec" 2>/dev/null || true; rm -rf "$dir"' EXIT
python3 - "$dir/port" "$dir/out.hex" <<'PY' &
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
open(sys.argv[1], "w").write(str(s.getsockname()[1]))
s.settimeout(8)
got, dcid = [], None
end = time.time() + 8
while time.time() < end:
    try:
        d, _ = s.recvfrom(65535)
    except socket.timeout:
        break
    # Long header: DCID length at byte 5. Keep the first id's datagrams.
    if len(d) < 6 or not d[0] & 0x80:
        continue
    this = d[6:6 + d[5]]
    if dcid is None:
        dcid = this
    if this != dcid:
        continue
    got.append(d)
    # Retransmissions begin after the first ~300 ms: the first flight is
    # what a fresh connection sends within it.
    end = min(end, time.time() + 0.3)
with open(sys.argv[2], "w") as f:
    for i, d in enumerate(got):
        if i:
            f.write("--\n")
        h = d.hex()
        for j in range(0, len(h), 64):
            f.write(h[j:j + 64] + "\n")
PY
rec=$!
for _ in $(seq 50); do [ -s "$dir/port" ] && break; sleep 0.1; done
port=$(cat "$dir/port")
version=$(chromium --version 2>/dev/null)
timeout 10 chromium --headless=new --no-sandbox --disable-gpu --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$dir/profile" --enable-quic \
  --origin-to-force-quic-on=www.example.test:443 \
  --host-resolver-rules="MAP www.example.test 127.0.0.1:$port" \
  "$@" https://www.example.test/ >/dev/null 2>&1 || true
wait "$rec"
{
  echo "# $version, headless, https://www.example.test/ forced onto QUIC; flags: ${*:-none}"
  echo "# recorded by capture-chromium.sh on $(date -u +%F): the first flight of one connection"
  cat "$dir/out.hex"
} >"$out"
echo "wrote $out ($(grep -c -- '^--' "$out" || true) separators)"

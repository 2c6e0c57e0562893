#!/bin/sh
# Runs as root with CAP_NET_ADMIN in the network namespace of the demo's
# transparent gateway (docker/compose.yaml: the agent-transparent service,
# network_mode service:gateway-transparent). It sends every TCP connection
# to port 80 or 443 made in that namespace to Sluice's transparent
# listener, except Sluice's own (uid 65532) and loopback traffic. Sluice
# finds where each connection was going with SO_ORIGINAL_DST. Run again,
# it replaces its rules rather than adding a second copy.
#
# Given a command, it then runs it in place of itself (exec): the
# transparent agent starts only once the rules are in.
set -eu
LISTENER_PORT=${LISTENER_PORT:-15001}
SLUICE_UID=${SLUICE_UID:-65532}
CHAIN=SLUICE-REDIRECT

echo "redirect: TCP 80,443 -> 127.0.0.1:$LISTENER_PORT for every user but $SLUICE_UID"
iptables -t nat -N "$CHAIN" 2>/dev/null || true
iptables -t nat -F "$CHAIN"
iptables -t nat -A "$CHAIN" -m owner --uid-owner "$SLUICE_UID" -j RETURN
iptables -t nat -A "$CHAIN" -d 127.0.0.0/8 -j RETURN
iptables -t nat -A "$CHAIN" -p tcp -m multiport --dports 80,443 -j REDIRECT --to-ports "$LISTENER_PORT"
iptables -t nat -C OUTPUT -p tcp -j "$CHAIN" 2>/dev/null ||
  iptables -t nat -A OUTPUT -p tcp -j "$CHAIN"
iptables -t nat -S "$CHAIN"
if [ $# -gt 0 ]; then
  exec "$@"
fi

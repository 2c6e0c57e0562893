#!/bin/sh
# The demo "AI agent": every $INTERVAL seconds, one request its policy
# allows (api.demo.internal) and one it denies (blocked.demo.internal, the
# same upstream under a name no rule allows). With PROXY set it goes
# through that explicit proxy; without, it calls the upstream directly and
# the iptables rules of its network namespace redirect it to the gateway.
INTERVAL=${INTERVAL:-15}
via=${PROXY:-"transparent redirect"}
while :; do
  for url in http://api.demo.internal/ http://blocked.demo.internal/; do
    headers=$(curl -sS -o /dev/null -D - --max-time 5 ${PROXY:+--proxy "$PROXY"} "$url" 2>&1)
    status=$(printf '%s\n' "$headers" | sed -n '1s/^HTTP\/[0-9.]* \([0-9]*\).*/\1/p' | tr -d '\r')
    rule=$(printf '%s\n' "$headers" | sed -n 's/^[Xx]-[Ss]luice-[Rr]ule: *//p' | tr -d '\r')
    reason=$(printf '%s\n' "$headers" | sed -n 's/^[Xx]-[Ss]luice-[Rr]eason: *//p' | tr -d '\r')
    if [ -n "$status" ]; then
      echo "agent: GET $url via $via -> HTTP $status${rule:+ (rule $rule, reason $reason)}"
    else
      echo "agent: GET $url via $via -> no HTTP answer: $(printf '%s' "$headers" | tail -n 1)"
    fi
  done
  sleep "$INTERVAL"
done

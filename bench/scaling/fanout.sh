#!/usr/bin/env bash
# What one sharded publication costs a Redis shard for each node subscribed to its channel: in
# the cluster design every node subscribes to every channel, so each SPUBLISH is written to
# every node, and docs/scaling.md needs that cost to extrapolate past the 3 nodes this machine
# can run. Starts a throwaway redis-server on a free loopback port, then for each subscriber
# count N in --subscribers: N `redis-cli SSUBSCRIBE` clients on one channel, redis-benchmark
# SPUBLISHing a message of --bytes bytes (the size of a presence change as the transition script
# publishes it), and the server's CPU (INFO cpu) per publication. Prints one line per N and
# the least-squares fit: CPU per publication = a + b x N.
#
#   bench/scaling/fanout.sh                                   # N = 0 1 3 10 30, 300-byte messages
#   bench/scaling/fanout.sh --subscribers "0 3 30" --bytes 400 --requests 200000
#
# Needs redis-server, redis-cli and redis-benchmark (>= 7). Everything it starts is stopped on
# exit. The subscribers are redis-cli processes on the same cores: the figure is Redis's CPU,
# not theirs.
set -euo pipefail

SUBSCRIBERS="0 1 3 10 30" BYTES=300 REQUESTS=200000
while (($#)); do
  case $1 in
    --subscribers) SUBSCRIBERS=${2:?}; shift 2 ;;
    --bytes) BYTES=${2:?}; shift 2 ;;
    --requests) REQUESTS=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    *) echo "fanout: unknown option $1" >&2; exit 2 ;;
  esac
done
for tool in redis-server redis-cli redis-benchmark; do
  command -v "$tool" >/dev/null || { echo "fanout: $tool is not installed" >&2; exit 1; }
done

DIR=$(mktemp -d /tmp/presence-fanout.XXXXXX)
PORT=
SERVER_PID=
SUB_PIDS=()
cleanup() {
  local rc=$?
  trap - EXIT
  if ((${#SUB_PIDS[@]})); then kill "${SUB_PIDS[@]}" 2>/dev/null || true; fi
  if [[ -n $SERVER_PID ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free port below the ephemeral range.
low=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range)
used=" $(ss -Htan | awk '{ n = split($4, a, ":"); print a[n] }' | sort -un | tr '\n' ' ') "
for _ in $(seq 1000); do
  p=$((20000 + RANDOM % (low - 20000)))
  if [[ $used != *" $p "* ]]; then PORT=$p; break; fi
done
[[ -n $PORT ]] || { echo "fanout: no free port" >&2; exit 1; }

redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" \
  --logfile "$DIR/redis.log" &
SERVER_PID=$!
rcli() { redis-cli -h 127.0.0.1 -p "$PORT" "$@" | tr -d '\r'; }
for _ in $(seq 100); do [[ $(rcli ping 2>/dev/null) == PONG ]] && break; sleep 0.1; done
[[ $(rcli ping) == PONG ]] || { echo "fanout: redis-server did not start" >&2; exit 1; }

CHANNEL='presence:changes:{7}'
MSG=$(head -c "$BYTES" /dev/zero | tr '\0' 'x')
cpu() { rcli info cpu | awk -F: '/^used_cpu_(sys|user):/ { s += $2 } END { printf "%.6f\n", s }'; }
stat_of() { rcli info commandstats | awk -F'[:=,]' -v c="cmdstat_$1" '$1 == c { print $3, $5 }'; }

printf '%-12s %12s %14s %16s %18s\n' subscribers "publish/s" "CPU us/publish" "usec/call (stat)" "CPU us/subscriber"
RESULTS=()
for n in $SUBSCRIBERS; do
  while ((${#SUB_PIDS[@]} < n)); do
    redis-cli -h 127.0.0.1 -p "$PORT" ssubscribe "$CHANNEL" >/dev/null &
    SUB_PIDS+=("$!")
  done
  for _ in $(seq 100); do
    [[ $(rcli pubsub shardnumsub "$CHANNEL" | sed -n 2p) == "$n" ]] && break
    sleep 0.1
  done
  [[ $(rcli pubsub shardnumsub "$CHANNEL" | sed -n 2p) == "$n" ]] || { echo "fanout: $n subscribers did not subscribe" >&2; exit 1; }
  rcli config resetstat >/dev/null
  before=$(cpu)
  start=$(date +%s.%N)
  redis-benchmark -h 127.0.0.1 -p "$PORT" -n "$REQUESTS" -c 4 -P 8 -q spublish "$CHANNEL" "$MSG" >/dev/null
  end=$(date +%s.%N)
  after=$(cpu)
  read -r calls usec <<<"$(stat_of spublish)"
  line=$(awk -v n="$n" -v b="$before" -v a="$after" -v s="$start" -v e="$end" -v c="$calls" -v u="$usec" 'BEGIN {
    us = (a - b) * 1e6 / c
    printf "%-12d %12.0f %14.2f %16.2f %18s\n", n, c / (e - s), us, u / c, (n ? sprintf("%.2f", us / n) : "-")
  }')
  echo "$line"
  RESULTS+=("$n $(awk '{ print $3 }' <<<"$line")")
done
printf '%s\n' "${RESULTS[@]}" | awk '
  { n++; x[n] = $1; y[n] = $2; sx += $1; sy += $2; sxx += $1 * $1; sxy += $1 * $2 }
  END {
    if (n < 2) exit
    b = (n * sxy - sx * sy) / (n * sxx - sx * sx); a = (sy - b * sx) / n
    printf "fit: CPU per publication = %.2f us + %.2f us x subscribers\n", a, b
  }'

#!/usr/bin/env bash
# The per-node figures of docs/scaling.md: one presence server (no Redis, SQLite), a fresh one for
# each run, loaded by presence-bench: `connect` (streams/s, server RSS per stream) and `churn`
# at each --rates value (deliveries/s, server CPU per delivery, and the bytes the server writes
# per delivery: the TCP payload sent on its client sockets over the measured phase, from ss, so
# gRPC and HTTP/2 framing included, TCP/IP headers and TLS not). Prints one line per run and
# min / median / max per scenario.
#
#   cargo build --release --bins
#   bench/scaling/node.sh                                  # 3 runs each: connect, churn 2000/s
#   bench/scaling/node.sh --rates "2000 6000" --runs 3 --online 20000
#   PRESENCE_BIN=... PRESENCE_BENCH_BIN=... bench/scaling/node.sh
#
# Options: --users N [100000] --online C [20000] --contacts K [50] --rates "R ..." [2000]
# --duration S [10] --runs N [3] --out DIR [/tmp/presence-node-DATE]. The graph is imported
# once (presence contacts import) into SIM_CACHE_DIR (/tmp/presence-scaling-cache) and copied
# for each run. Needs jq. Stops what it started on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PRESENCE_BIN=${PRESENCE_BIN:-$ROOT/target/release/presence}
PRESENCE_BENCH_BIN=${PRESENCE_BENCH_BIN:-$ROOT/target/release/presence-bench}
CACHE_DIR=${SIM_CACHE_DIR:-/tmp/presence-scaling-cache}

USERS=100000 ONLINE=20000 CONTACTS=50 RATES=2000 DURATION=10 RUNS=3 OUT=
while (($#)); do
  case $1 in
    --users) USERS=${2:?}; shift 2 ;;
    --online) ONLINE=${2:?}; shift 2 ;;
    --contacts) CONTACTS=${2:?}; shift 2 ;;
    --rates) RATES=${2?}; shift 2 ;;
    --duration) DURATION=${2:?}; shift 2 ;;
    --runs) RUNS=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
    *) echo "node: unknown option $1" >&2; exit 2 ;;
  esac
done
for tool in jq awk; do command -v "$tool" >/dev/null || { echo "node: $tool is not installed" >&2; exit 1; }; done
[[ -x $PRESENCE_BIN && -x $PRESENCE_BENCH_BIN ]] || { echo "node: set PRESENCE_BIN and PRESENCE_BENCH_BIN (or cargo build --release --bins)" >&2; exit 1; }
OUT=${OUT:-/tmp/presence-node-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

SERVER_PID=
stop_server() {
  [[ -n $SERVER_PID ]] || return 0
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
cleanup() {
  local rc=$?
  trap - EXIT
  stop_server
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

GRAPH="$CACHE_DIR/ring-$USERS-$CONTACTS"
if [[ ! -f $GRAPH/complete ]]; then
  rm -rf "$GRAPH"
  mkdir -p "$GRAPH"
  echo "node: importing the ring: $USERS users x $CONTACTS contacts" >&2
  awk -v n="$USERS" -v h="$((CONTACTS / 2))" 'BEGIN { for (u = 1; u <= n; u++) for (d = 1; d <= h; d++) print u "," (u - 1 + d) % n + 1 }' |
    DATABASE_URL="sqlite://$GRAPH/presence.db" "$PRESENCE_BIN" contacts import - >&2
  touch "$GRAPH/complete"
fi

start_server() { # start_server DIR
  local dir=$1 addr=
  cp "$GRAPH"/presence.db* "$dir/"
  : >"$dir/server.out"
  env DATABASE_URL="sqlite://$dir/presence.db" PRESENCE_RATE_STATUS_PER_MIN=1000000 \
    PRESENCE_RATE_IDS_PER_MIN=100000000 PRESENCE_METRICS_LISTEN= NO_COLOR=1 \
    "$PRESENCE_BIN" serve --listen 127.0.0.1:0 >"$dir/server.out" 2>"$dir/server.log" </dev/null &
  SERVER_PID=$!
  for _ in $(seq 300); do
    addr=$(sed -n 's/^listening on //p' "$dir/server.out" | head -n 1 || true)
    [[ -n $addr ]] && break
    sleep 0.1
  done
  [[ -n $addr ]] || { echo "node: the server did not listen (see $dir/server.log)" >&2; exit 1; }
  ADDR=$addr
}

LINES="$OUT/lines.txt"
: >"$LINES"
# A shell command that saves the TCP payload bytes the server has sent on its client connections
# (ss: bytes_sent of every established socket on its port).
bytes_hook() { # bytes_hook FILE
  printf "ss -Htin state established '( sport = :%s )' | grep -o 'bytes_sent:[0-9]*' | awk -F: '{ s += \$2 } END { print s + 0 }' > %q" \
    "${ADDR##*:}" "$1"
}
FAILED=0
for run in $(seq "$RUNS"); do
  for scenario in connect $RATES; do
    dir="$OUT/run-$run-$scenario"
    mkdir -p "$dir"
    start_server "$dir"
    args=(--target "$ADDR" --users "$USERS" --online "$ONLINE" --contacts "$CONTACTS" --no-setup
      --server-pid "$SERVER_PID" --json "$dir/bench.json")
    if [[ $scenario == connect ]]; then
      "$PRESENCE_BENCH_BIN" connect "${args[@]}" >"$dir/bench.out" 2>"$dir/bench.err" || FAILED=1
      jq -r --arg run "$run" '"connect \($run) \(.connect.connects_per_s) \(.connect.server_rss_per_stream_kib) \(.connect.welcome.p99_ms) \(.checks.ok)"' "$dir/bench.json" >>"$LINES"
    else
      "$PRESENCE_BENCH_BIN" churn "${args[@]}" --rate "$scenario" --duration "$DURATION" \
        --on-phase-start "$(bytes_hook "$dir/start.bytes")" --on-phase-end "$(bytes_hook "$dir/end.bytes")" \
        >"$dir/bench.out" 2>"$dir/bench.err" || FAILED=1
      sent=$(($(cat "$dir/end.bytes") - $(cat "$dir/start.bytes")))
      jq -r --arg run "$run" --arg rate "$scenario" --arg sent "$sent" '
        "churn-\($rate) \($run) \(.churn.deliveries_per_s) \(.phase.server_cpu_us_per_delivery) \(.phase.server_process.cpu_cores) \(.churn.latency.p99_ms) \(($sent | tonumber) / .phase.server_delta.deliveries) \(.churn.lost) \(.checks.ok) \(.phase.other_processes_cores) \(.churn.deliveries) \(.churn.expected) \(.churn.superseded)"' \
        "$dir/bench.json" >>"$LINES"
    fi
    stop_server
    tail -n 1 "$LINES" >&2
  done
done

awk '
  function stats(list,   n, v, i, j, t) {
    n = split(list, v, " ")
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
    return sprintf("%s / %s / %s", v[1], v[int((n + 1) / 2)], v[n])
  }
  $1 == "connect" { c++; cps = cps " " sprintf("%.0f", $3); kib = kib " " sprintf("%.2f", $4); wp = wp " " $5; if ($6 != "true") bad++ }
  $1 ~ /^churn/ { s = $1; seen[s] = 1; d[s] = d[s] " " sprintf("%.0f", $3); us[s] = us[s] " " sprintf("%.2f", $4); cores[s] = cores[s] " " sprintf("%.2f", $5)
    p99[s] = p99[s] " " $6; wb[s] = wb[s] " " sprintf("%.1f", $7); lost[s] = lost[s] " " $8; other[s] = other[s] " " sprintf("%.2f", $10)
    if ($9 != "true" || $11 + $13 < $12 || $12 == 0) bad++ }
  END {
    print "min / median / max:"
    if (c) printf "connect: %s streams/s; server RSS per stream %s KiB; welcome p99 %s ms\n", stats(cps), stats(kib), stats(wp)
    for (s in seen) printf "%s: %s deliveries/s; server %s us CPU per delivery, %s cores; p99 %s ms; server sends %s B (TCP payload) per delivery; lost %s; other load %s cores\n",
      s, stats(d[s]), stats(us[s]), stats(cores[s]), stats(p99[s]), stats(wb[s]), stats(lost[s]), stats(other[s])
    if (bad) print bad " run(s) failed a check (bench checks, or fewer deliveries than expected)"
  }' "$LINES" | tee "$OUT/summary.txt"
echo "node: kept in $OUT" >&2
((FAILED == 0))

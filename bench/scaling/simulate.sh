#!/usr/bin/env bash
# Checks the capacity model of docs/scaling.md on this machine: a Redis Cluster of 3 masters + 3
# replicas (.ci/redis-topology), 3 presence nodes on it sharing one database, and
# `presence-bench churn` spreading its devices over the 3 nodes at --rate status changes per
# second. Each master's INFO (commandstats, cpu, memory, stats) and each node's /proc figures are
# read when the bench's measured phase starts and ends (its --on-phase-start/--on-phase-end
# hooks); the script then prints, per master, transitions/s (EVALSHA calls/s), publications/s
# (SPUBLISH calls/s), usec per call, CPU cores and CPU per transition, against what the model
# predicts (the changes spread evenly over the 3 masters; CPU = transitions/s x --cost-us), and
# PASS or FAIL.
#
#   cargo build --release --bins
#   bench/scaling/simulate.sh                           # 3 runs at the default rate
#   bench/scaling/simulate.sh --rate 1000 --runs 1      # one quick run
#   PRESENCE_BIN=/path/presence PRESENCE_BENCH_BIN=/path/presence-bench bench/scaling/simulate.sh
#
# Options (defaults in brackets):
#   --rate R         status changes per second, over all nodes [3000]
#   --duration S     measured phase, seconds [20]
#   --runs N         runs, each on a fresh Redis Cluster, nodes and database copy [3]
#   --users N        users in the contact graph (a ring, as presence-bench makes it) [40000]
#   --online C       users online, one device stream each [20000]
#   --contacts K     contacts per user [10] (the backplane's load does not depend on K; the
#                    deliveries, which the 2 cores must also carry, do)
#   --tolerance P    a master passes when its transitions/s and publications/s are within
#                    +-P % of rate/3 and its CPU is at most (100+P) % of the prediction [25]
#   --cost-us US     the model's Redis CPU per transition, microseconds [160: docs/scaling.md]
#   --scenario churn|flap
#                    churn: status changes, each 1 transition and 1 publication [churn];
#                    flap: devices disconnecting and reconnecting at once (within the grace),
#                    each 3 transitions (leave, come back, and the grace's expiry 5 s later,
#                    which changes nothing) and no publication
#   --targets all|first
#                    all: the bench's devices are spread over the 3 nodes [all]; first: all on
#                    node 1, so nodes 2 and 3 only receive publications (their CPU is the cost
#                    of a publication at a node that has no interest in it)
#   --idle S         seconds with the nodes up and no traffic, before the bench: each master's
#                    and node's idle CPU, subtracted for the cost per transition [5]
#   --out DIR        where runs are kept: bench JSON and output, snapshots, node logs, the
#                    summary [/tmp/presence-scaling-DATE]
#
# Environment: PRESENCE_BIN, PRESENCE_BENCH_BIN (default target/release/...), SIM_DATABASE_URL
# (default: a SQLite file per run, copied from a cached graph in SIM_CACHE_DIR,
# /tmp/presence-scaling-cache; a mysql:// URL is used as is and the graph imported into it once).
# Needs redis-server and redis-cli >= 7, jq, awk, ss. Exit 0 when every run passed, 1 when one
# failed, 2 for bad usage. Everything it starts is stopped on exit, also on failure or Ctrl-C.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SELF="$ROOT/bench/scaling/simulate.sh"
TOPOLOGY="$ROOT/.ci/redis-topology"
PRESENCE_BIN=${PRESENCE_BIN:-$ROOT/target/release/presence}
PRESENCE_BENCH_BIN=${PRESENCE_BENCH_BIN:-$ROOT/target/release/presence-bench}
CACHE_DIR=${SIM_CACHE_DIR:-/tmp/presence-scaling-cache}
NODES=3

say() { printf 'simulate: %s\n' "$*" >&2; }
die() {
  say "error: $*"
  exit 1
}

# ---- snapshots (also run by the bench's phase hooks: simulate.sh --snapshot FILE) ----------------

# Writes one "KEY VALUE" line per figure: the time, the machine's busy CPU ticks, and for each
# master (m:PORT:...) and replica (r:PORT:...) its INFO commandstats, cpu, memory and stats, for
# each node (n:I:...) its CPU ticks, RSS and I/O bytes. Reads SIM_MASTERS, SIM_REPLICAS (ports,
# comma-separated) and SIM_NODE_PIDS.
snapshot() { # snapshot FILE
  local file=$1 port pid i=0 ports
  {
    printf 't %s\n' "$(date +%s.%N)"
    awk '$1 == "cpu" { busy = $2 + $3 + $4 + $7 + $8 + $9; print "machine:busy_ticks", busy; print "machine:total_ticks", busy + $5 + $6 }' /proc/stat
    IFS=, read -ra ports <<<"${SIM_MASTERS:-}"
    for port in "${ports[@]}"; do
      redis-cli -h 127.0.0.1 -p "$port" info everything 2>/dev/null | tr -d '\r' | awk -v p="m:$port:" '
        /^cmdstat_/ {
          split($0, kv, ":"); n = split(kv[2], f, ",")
          for (j = 1; j <= n; j++) { split(f[j], x, "="); if (x[1] == "calls" || x[1] == "usec") print p kv[1] ":" x[1], x[2] }
        }
        /^(used_cpu_sys|used_cpu_user|used_memory|total_net_input_bytes|total_net_output_bytes|total_net_repl_output_bytes|pubsubshard_channels|connected_clients):/ {
          split($0, kv, ":"); print p kv[1], kv[2]
        }
        /^process_id:/ { split($0, kv, ":"); print p "pid", kv[2] }'
    done
    IFS=, read -ra ports <<<"${SIM_REPLICAS:-}"
    for port in "${ports[@]}"; do
      redis-cli -h 127.0.0.1 -p "$port" info cpu 2>/dev/null | tr -d '\r' | awk -v p="r:$port:" '
        /^(used_cpu_sys|used_cpu_user):/ { split($0, kv, ":"); print p kv[1], kv[2] }'
    done
    IFS=, read -ra ports <<<"${SIM_NODE_PIDS:-}"
    for pid in "${ports[@]}"; do
      i=$((i + 1))
      [[ -r /proc/$pid/stat ]] || continue
      awk -v p="n:$i:" '{ sub(/^.*\) /, ""); print p "cpu_ticks", $12 + $13 }' "/proc/$pid/stat"
      awk -v p="n:$i:" '/^VmRSS:/ { print p "rss_kib", $2 }' "/proc/$pid/status"
      awk -v p="n:$i:" '/^(rchar|wchar):/ { sub(":", "", $1); print p $1, $2 }' "/proc/$pid/io" 2>/dev/null || true
    done
  } >"$file.tmp"
  mv "$file.tmp" "$file"
}

if [[ ${1:-} == --snapshot ]]; then
  (($# == 2)) || die "usage: $0 --snapshot FILE"
  snapshot "$2"
  exit 0
fi

# ---- options --------------------------------------------------------------------------------------

usage() {
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$SELF" >&2
  exit 2
}

RATE=3000 DURATION=20 RUNS=3 USERS=40000 ONLINE=20000 CONTACTS=10 TOLERANCE=25 COST_US=160
TARGETS=all OUT='' SCENARIO=churn IDLE=5
while (($#)); do
  case $1 in
    --rate) RATE=${2:?}; shift 2 ;;
    --duration) DURATION=${2:?}; shift 2 ;;
    --runs) RUNS=${2:?}; shift 2 ;;
    --users) USERS=${2:?}; shift 2 ;;
    --online) ONLINE=${2:?}; shift 2 ;;
    --contacts) CONTACTS=${2:?}; shift 2 ;;
    --tolerance) TOLERANCE=${2:?}; shift 2 ;;
    --cost-us) COST_US=${2:?}; shift 2 ;;
    --targets) TARGETS=${2:?}; shift 2 ;;
    --scenario) SCENARIO=${2:?}; shift 2 ;;
    --idle) IDLE=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) say "unknown option $1"; usage ;;
  esac
done
for v in RATE RUNS USERS ONLINE CONTACTS TOLERANCE; do
  if ! [[ ${!v} =~ ^[0-9]+$ ]] || ((${!v} == 0)); then
    say "--${v,,} must be a positive integer"
    usage
  fi
done
[[ $DURATION =~ ^[0-9]+(\.[0-9]+)?$ ]] || { say "--duration must be a number of seconds"; usage; }
[[ $COST_US =~ ^[0-9]+(\.[0-9]+)?$ ]] || { say "--cost-us must be a number"; usage; }
[[ $TARGETS == all || $TARGETS == first ]] || { say "--targets is all or first"; usage; }
[[ $SCENARIO == churn || $SCENARIO == flap ]] || { say "--scenario is churn or flap"; usage; }
((ONLINE <= USERS)) || { say "--online must not exceed --users"; usage; }

for tool in redis-server redis-cli jq awk ss; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
[[ -x $PRESENCE_BIN ]] || die "no presence binary at $PRESENCE_BIN (cargo build --release --bins, or set PRESENCE_BIN)"
[[ -x $PRESENCE_BENCH_BIN ]] || die "no presence-bench binary at $PRESENCE_BENCH_BIN (or set PRESENCE_BENCH_BIN)"
[[ -x $TOPOLOGY ]] || die "$TOPOLOGY is missing"
redis_major=$(redis-server --version | sed -n 's/.*v=\([0-9]*\)\..*/\1/p')
((${redis_major:-0} >= 7)) || die "Redis >= 7 is needed (sharded pub/sub); found $(redis-server --version)"

OUT=${OUT:-/tmp/presence-scaling-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# One descriptor per HTTP/2 connection on each node.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---- cleanup: everything this script started, on any exit ----------------------------------------

NODE_PIDS=()
TOPO_DIR=
stop_nodes() {
  local pid
  ((${#NODE_PIDS[@]})) || return 0
  for pid in "${NODE_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 150); do
    local alive=0
    for pid in "${NODE_PIDS[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    ((alive)) || break
    sleep 0.1
  done
  for pid in "${NODE_PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for pid in "${NODE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  NODE_PIDS=()
}
stop_topology() {
  [[ -n $TOPO_DIR ]] || return 0
  "$TOPOLOGY" stop "$TOPO_DIR" || say "warning: could not stop the Redis Cluster in $TOPO_DIR"
  TOPO_DIR=
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_nodes
  stop_topology
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the contact graph ----------------------------------------------------------------------------

# The ring presence-bench makes (user u linked to u+1..u+K/2 mod N), as CSV.
ring_csv() { # ring_csv N K
  awk -v n="$1" -v h="$(($2 / 2))" 'BEGIN { for (u = 1; u <= n; u++) for (d = 1; d <= h; d++) print u "," (u - 1 + d) % n + 1 }'
}

import_graph() { # import_graph DATABASE_URL
  say "importing the ring: $USERS users x $CONTACTS contacts"
  ring_csv "$USERS" "$CONTACTS" | DATABASE_URL=$1 PRESENCE_LOG_FORMAT=pretty \
    "$PRESENCE_BIN" contacts import - >&2
}

# SQLite keeps recent writes in its write-ahead log (presence.db-wal) until a checkpoint: the
# cached graph is a directory, copied whole for each run.
GRAPH_DIR=
if [[ -n ${SIM_DATABASE_URL:-} ]]; then
  import_graph "$SIM_DATABASE_URL"
else
  GRAPH_DIR="$CACHE_DIR/ring-$USERS-$CONTACTS"
  if [[ ! -f $GRAPH_DIR/complete ]]; then
    rm -rf "$GRAPH_DIR"
    mkdir -p "$GRAPH_DIR"
    import_graph "sqlite://$GRAPH_DIR/presence.db"
    touch "$GRAPH_DIR/complete"
  fi
fi

# ---- one run --------------------------------------------------------------------------------------

# The port of each master and replica, from DIR/env.
read_topology() { # read_topology DIR
  local key value
  while IFS='=' read -r key value; do
    case $key in
      PRESENCE_TEST_REDIS_CLUSTER_URL) REDIS_URL_SIM=$value ;;
      REDIS_CLUSTER_MASTERS) SIM_MASTERS=$value ;;
      REDIS_CLUSTER_REPLICAS) SIM_REPLICAS=$value ;;
    esac
  done <"$1/env"
  [[ -n ${REDIS_URL_SIM:-} && -n ${SIM_MASTERS:-} ]] || die "$1/env lacks the cluster's URL or masters"
}

# How many of the 64 hash-tag groups of user keys (user id mod 64) each master serves, in the
# order of SIM_MASTERS: the share of the changes each should see.
group_shares() {
  local masters first
  IFS=, read -ra masters <<<"$SIM_MASTERS"
  first=${masters[0]}
  {
    redis-cli -h 127.0.0.1 -p "$first" cluster nodes | tr -d '\r' |
      awk '$3 ~ /master/ { sub(/@.*/, "", $2); sub(/.*:/, "", $2); for (i = 9; i <= NF; i++) { n = split($i, r, "-"); print "range", $2, r[1], (n > 1 ? r[2] : r[1]) } }'
    for g in $(seq 0 63); do
      printf 'slot %s\n' "$(redis-cli -h 127.0.0.1 -p "$first" cluster keyslot "x{$g}" | tr -d '\r')"
    done
  } | awk -v order="$SIM_MASTERS" '
    $1 == "range" { n++; port[n] = $2; lo[n] = $3; hi[n] = $4 }
    $1 == "slot" { for (i = 1; i <= n; i++) if ($2 >= lo[i] && $2 <= hi[i]) count[port[i]]++ }
    END { k = split(order, o, ","); for (i = 1; i <= k; i++) printf "%s%d", (i > 1 ? "," : ""), count[o[i]] + 0; print "" }'
}

start_node() { # start_node I DATABASE_URL LOGDIR
  local i=$1 db=$2 dir=$3 addr=
  : >"$dir/node$i.out"
  env REDIS_URL="$REDIS_URL_SIM" DATABASE_URL="$db" \
    PRESENCE_RATE_STATUS_PER_MIN=1000000 PRESENCE_RATE_IDS_PER_MIN=100000000 \
    PRESENCE_METRICS_LISTEN= PRESENCE_LOG_FORMAT=pretty NO_COLOR=1 RUST_LOG="${SIM_NODE_LOG:-info}" \
    "$PRESENCE_BIN" serve --listen 127.0.0.1:0 >"$dir/node$i.out" 2>"$dir/node$i.log" </dev/null &
  NODE_PIDS+=("$!")
  for _ in $(seq 300); do
    addr=$(sed -n 's/^listening on //p' "$dir/node$i.out" | head -n 1 || true)
    [[ -n $addr ]] && break
    kill -0 "${NODE_PIDS[-1]}" 2>/dev/null || { tail -n 20 "$dir/node$i.log" >&2; die "node $i exited at start"; }
    sleep 0.1
  done
  [[ -n $addr ]] || die "node $i did not listen within 30 s (see $dir/node$i.log)"
  for _ in $(seq 300); do
    if "$PRESENCE_BIN" health --addr "$addr" >/dev/null 2>&1; then
      NODE_ADDRS+=("$addr")
      return 0
    fi
    sleep 0.1
  done
  die "node $i at $addr not SERVING within 30 s (see $dir/node$i.log)"
}

# Per master from two snapshots, as lines: port evalsha/s spublish/s usec_evalsha usec_spublish
# cores cpu_us_per_transition wait/s net_out_MB/s. Then "replicas CORES" and one line per node:
# "node I cores rss_mib rchar_MB/s wchar_MB/s", and "machine CORES".
deltas() { # deltas BEFORE AFTER
  awk '
    FNR == 1 { f++ }
    f == 1 { a[$1] = $2; next }
    { b[$1] = $2; keys[$1] = 1 }
    END {
      dt = b["t"] - a["t"]
      for (k in keys) {
        split(k, p, ":")
        if (p[1] == "m") ports[p[2]] = 1
        if (p[1] == "r") rports[p[2]] = 1
        if (p[1] == "n") nodes[p[2]] = 1
      }
      for (port in ports) {
        m = "m:" port ":"
        ec = b[m "cmdstat_evalsha:calls"] - a[m "cmdstat_evalsha:calls"]
        eu = b[m "cmdstat_evalsha:usec"] - a[m "cmdstat_evalsha:usec"]
        sc = b[m "cmdstat_spublish:calls"] - a[m "cmdstat_spublish:calls"]
        su = b[m "cmdstat_spublish:usec"] - a[m "cmdstat_spublish:usec"]
        wc = b[m "cmdstat_wait:calls"] - a[m "cmdstat_wait:calls"]
        cpu = (b[m "used_cpu_sys"] + b[m "used_cpu_user"]) - (a[m "used_cpu_sys"] + a[m "used_cpu_user"])
        out = b[m "total_net_output_bytes"] - a[m "total_net_output_bytes"]
        printf "master %s %.1f %.1f %.2f %.2f %.4f %.1f %.1f %.3f\n", port, ec / dt, sc / dt,
          (ec ? eu / ec : 0), (sc ? su / sc : 0), cpu / dt, (ec ? cpu * 1e6 / ec : 0), wc / dt, out / dt / 1e6
      }
      rc = 0
      for (port in rports) { m = "r:" port ":"; rc += (b[m "used_cpu_sys"] + b[m "used_cpu_user"]) - (a[m "used_cpu_sys"] + a[m "used_cpu_user"]) }
      printf "replicas %.4f\n", rc / dt
      for (i in nodes) {
        n = "n:" i ":"
        printf "node %s %.4f %.1f %.3f %.3f\n", i, (b[n "cpu_ticks"] - a[n "cpu_ticks"]) / hz / dt, b[n "rss_kib"] / 1024,
          (b[n "rchar"] - a[n "rchar"]) / dt / 1e6, (b[n "wchar"] - a[n "wchar"]) / dt / 1e6
      }
      tt = b["machine:total_ticks"] - a["machine:total_ticks"]
      printf "machine %.3f %.1f\n", (tt ? (b["machine:busy_ticks"] - a["machine:busy_ticks"]) / tt * ncpu : 0), dt
    }' hz="$(getconf CLK_TCK)" ncpu="$(nproc)" "$1" "$2"
}

# Redis memory per online user: used_memory over the masters, before the bench vs at the phase
# start (every device connected), divided by the online users.
memory_per_user() { # memory_per_user PRE START ONLINE
  awk -v online="$3" '
    FNR == 1 { f++ }
    $1 ~ /^m:.*:used_memory$/ { if (f == 1) a += $2; else b += $2 }
    END { printf "%.0f\n", (b - a) / online }' "$1" "$2"
}

RESULTS="$OUT/results.txt" # one line per master per run, for the summary
: >"$RESULTS"
FAILED=0

run_once() { # run_once N
  local n=$1 db shares targets bench_rc=0
  local dir="$OUT/run-$n"
  mkdir -p "$dir"
  TOPO_DIR="$dir/redis"
  say "run $n: starting a Redis Cluster (3 masters + 3 replicas)"
  "$TOPOLOGY" start cluster "$TOPO_DIR" 2>"$dir/topology.log" || { cat "$dir/topology.log" >&2; die "the Redis Cluster did not start"; }
  read_topology "$TOPO_DIR"
  export SIM_MASTERS SIM_REPLICAS
  shares=$(group_shares)
  if [[ -n $GRAPH_DIR ]]; then
    cp "$GRAPH_DIR"/presence.db* "$dir/"
    db="sqlite://$dir/presence.db"
  else
    db=$SIM_DATABASE_URL
  fi
  NODE_ADDRS=()
  for i in $(seq "$NODES"); do start_node "$i" "$db" "$dir"; done
  SIM_NODE_PIDS=$(IFS=,; echo "${NODE_PIDS[*]}")
  export SIM_NODE_PIDS
  say "run $n: nodes ${NODE_ADDRS[*]} (pids $SIM_NODE_PIDS), masters $SIM_MASTERS (groups of 64: $shares)"
  # The idle cost: nodes connected, renewing their leases, no traffic.
  snapshot "$dir/idle.snap"
  sleep "$IDLE"
  snapshot "$dir/pre.snap"
  if [[ $TARGETS == all ]]; then targets=$(IFS=,; echo "${NODE_ADDRS[*]}"); else targets=${NODE_ADDRS[0]}; fi
  local hook_start hook_end
  hook_start="$(printf '%q' "$SELF") --snapshot $(printf '%q' "$dir/start.snap")"
  hook_end="$(printf '%q' "$SELF") --snapshot $(printf '%q' "$dir/end.snap")"
  say "run $n: presence-bench $SCENARIO --rate $RATE --duration $DURATION over $targets"
  "$PRESENCE_BENCH_BIN" "$SCENARIO" --target "$targets" --users "$USERS" --online "$ONLINE" \
    --contacts "$CONTACTS" --rate "$RATE" --duration "$DURATION" --no-setup \
    --server-pid "${NODE_PIDS[0]}" --json "$dir/bench.json" \
    --on-phase-start "$hook_start" --on-phase-end "$hook_end" >"$dir/bench.out" 2>"$dir/bench.err" || bench_rc=$?
  stop_nodes
  stop_topology
  [[ -s $dir/bench.json && -s $dir/start.snap && -s $dir/end.snap ]] || {
    tail -n 20 "$dir/bench.err" >&2
    die "run $n: the bench did not complete (exit $bench_rc); see $dir"
  }
  report_run "$n" "$dir" "$shares" "$bench_rc"
}

report_run() { # report_run N DIR SHARES BENCH_RC
  local n=$1 dir=$2 shares=$3 bench_rc=$4 changes lost ooo ok deliveries expected superseded mem issues
  # Events: status changes (1 transition, 1 publication each), or flaps (3 transitions: the
  # device leaves, the grace starts; it comes back; the grace expires, a no-op in Redis too;
  # nothing visible changes, nothing is published).
  local per_event=1 pubs_per_event=1
  if [[ $SCENARIO == churn ]]; then
    changes=$(jq '.churn.changes' "$dir/bench.json")
    deliveries=$(jq '.churn.deliveries' "$dir/bench.json")
    expected=$(jq '.churn.expected' "$dir/bench.json")
    superseded=$(jq '.churn.superseded' "$dir/bench.json")
  else
    per_event=3 pubs_per_event=0
    changes=$(jq '.flap.reconnects' "$dir/bench.json")
    deliveries=0 expected=0 superseded=0
  fi
  lost=$(jq '.checks.lost' "$dir/bench.json")
  ooo=$(jq '.checks.out_of_order' "$dir/bench.json")
  ok=$(jq '.checks.ok' "$dir/bench.json")
  mem=$(memory_per_user "$dir/pre.snap" "$dir/start.snap" "$ONLINE")
  deltas "$dir/idle.snap" "$dir/pre.snap" | awk '{ $1 = "idle_" $1; print }' >"$dir/idle.txt"
  deltas "$dir/start.snap" "$dir/end.snap" >"$dir/deltas.txt"
  # Development mode's warning at start is expected: anything else is counted.
  issues=$(cat "$dir"/node*.log | grep -E '^\S+\s+(WARN|ERROR)' | grep -cv 'DEVELOPMENT MODE' || true)
  local dt machine
  read -r _ machine dt < <(grep '^machine ' "$dir/deltas.txt")
  awk -v n="$n" -v changes="$changes" -v deliveries="$deliveries" -v dt="$dt" -v tol="$TOLERANCE" \
    -v cost="$COST_US" -v shares="$shares" -v order="$SIM_MASTERS" -v lost="$lost" -v ooo="$ooo" \
    -v ok="$ok" -v expected="$expected" -v superseded="$superseded" -v mem="$mem" -v machine="$machine" -v issues="$issues" -v results="$RESULTS" \
    -v bench_rc="$bench_rc" -v per_event="$per_event" -v pubs_per_event="$pubs_per_event" -v scenario="$SCENARIO" '
    $1 == "idle_master" { idle[$2] = $7 }
    $1 == "idle_node" { idle_node[$2] = $3 }
    $1 == "master" { row[$2] = $0 }
    $1 == "replicas" { replicas = $2 }
    $1 == "node" { node[$2] = $0; nodes++ }
    END {
      rate = changes / dt
      k = split(order, o, ","); split(shares, s, ",")
      printf "\nrun %d: %d %s in %.1f s = %.0f/s (bench: %d of %d deliveries expected, %d superseded, %d lost, %d out of order, checks %s)\n",
        n, changes, (scenario == "churn" ? "changes" : "flaps"), dt, rate, deliveries, expected, superseded, lost, ooo, (ok == "true" ? "ok" : "FAILED")
      printf "%-6s %6s %8s %9s %9s %10s %10s %11s %6s %6s %9s %9s %8s  %s\n", "master", "groups", "expect/s", "EVALSHA/s", "vs expect",
        "SPUBLISH/s", "us/EVALSHA", "us/SPUBLISH", "idle", "cores", "predicted", "us/transn", "out MB/s", "verdict"
      # Every receipt the graph implies must have arrived (the bench counts as lost only the
      # changes of contacts a device was told of in its welcome).
      complete = (scenario != "churn" || (expected > 0 && deliveries + superseded >= expected))
      if (!complete) printf "incomplete: %d of %d expected deliveries arrived\n", deliveries + superseded, expected
      pass = (ok == "true" && lost == 0 && ooo == 0 && complete)
      for (i = 1; i <= k; i++) {
        split(row[o[i]], r, " ")
        expect = rate * per_event / k
        expect_p = rate * pubs_per_event / k
        pred = idle[o[i]] + expect * cost / 1e6
        # CPU per transition above the idle cost: what the model multiplies by the rate.
        marginal = r[3] ? (r[7] - idle[o[i]]) * 1e6 / r[3] : 0
        dev_t = (r[3] - expect) / expect * 100
        dev_p = expect_p ? (r[4] - expect_p) / expect_p * 100 : 0
        v = "PASS"
        if (dev_t > tol || dev_t < -tol) v = "FAIL (transitions)"
        else if (expect_p && (dev_p > tol || dev_p < -tol)) v = "FAIL (publications)"
        else if (!expect_p && r[4] > expect * tol / 100) v = "FAIL (publications)"
        else if (r[7] > pred * (1 + tol / 100)) v = "FAIL (CPU)"
        if (v != "PASS") pass = 0
        printf "%-6s %6s %8.0f %9.0f %+8.1f%% %10.0f %10.1f %11.1f %6.3f %6.3f %9.3f %9.1f %8.2f  %s\n", o[i], s[i] "/64", expect,
          r[3], dev_t, r[4], r[5], r[6], idle[o[i]], r[7], pred, marginal, r[10], v
        printf "%d %s %.1f %.1f %.1f %.2f %.2f %.4f %.1f %.3f %.4f\n", n, o[i], expect, r[3], r[4], r[5], r[6], r[7], marginal, r[10], idle[o[i]] >> results
      }
      printf "replicas: %.3f cores in all; Redis memory per online user (masters): %d bytes\n", replicas, mem
      for (i = 1; i <= nodes; i++) {
        split(node[i], r, " ")
        printf "node %d: %.3f cores (idle %.3f), RSS %.0f MiB, file I/O (rchar, wchar) %.2f and %.2f MB/s\n", i, r[3], idle_node[i], r[4], r[5], r[6]
        printf "%d node%d %.4f %.1f %.3f %.3f %.4f\n", n, i, r[3], r[4], r[5], r[6], idle_node[i] >> results
      }
      printf "machine: %.2f cores busy during the phase; WARN/ERROR lines in the node logs: %d\n", machine, issues
      printf "%d machine %.3f %d %d %d %d\n", n, machine, mem, lost, issues, rate >> results
      if (bench_rc != 0) pass = 0
      print (pass ? "run " n ": PASS" : "run " n ": FAIL")
      exit (pass ? 0 : 1)
    }' "$dir/idle.txt" "$dir/deltas.txt" | tee "$dir/report.txt" || FAILED=1
}

say "out: $OUT; presence $("$PRESENCE_BIN" --version 2>/dev/null || echo '?'); machine load: $(cat /proc/loadavg)"
for run in $(seq "$RUNS"); do run_once "$run"; done

# ---- summary over the runs ------------------------------------------------------------------------

{
  printf '\nsummary of %d run(s), --scenario %s --rate %s --duration %s --users %s --online %s --contacts %s --targets %s, model %s us CPU per transition:\n' \
    "$RUNS" "$SCENARIO" "$RATE" "$DURATION" "$USERS" "$ONLINE" "$CONTACTS" "$TARGETS" "$COST_US"
  awk '
    function stats(name, list,   n, v, i, j, t) {
      n = split(list, v, " ")
      for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (v[j] + 0 < v[i] + 0) { t = v[i]; v[i] = v[j]; v[j] = t }
      printf "  %-40s %10s / %10s / %10s  (min / median / max)\n", name, v[1], v[int((n + 1) / 2)], v[n]
    }
    $2 == "machine" { sent = sent " " sprintf("%.0f", $7); busy = busy " " $3; mem = mem " " $4; lost = lost " " $5; warn = warn " " $6; next }
    $2 ~ /^node/ { ncores = ncores " " $3; nidle = nidle " " $7; next }
    { ev = ev " " sprintf("%.0f", $4); dev = dev " " sprintf("%+.1f%%", ($4 - $3) / $3 * 100); sp = sp " " sprintf("%.0f", $5)
      ue = ue " " $6; us = us " " $7; cores = cores " " $8; cpt = cpt " " $9; out = out " " $10; idle = idle " " $11 }
    END {
      stats("events/s (all masters)", sent)
      stats("EVALSHA/s per master", ev)
      stats("  vs expected", dev)
      stats("SPUBLISH/s per master", sp)
      stats("usec per EVALSHA (commandstats)", ue)
      stats("usec per SPUBLISH (commandstats)", us)
      stats("master CPU, cores", cores)
      stats("master CPU idle, cores", idle)
      stats("master CPU per transition above idle, us", cpt)
      stats("master output, MB/s", out)
      stats("node CPU, cores", ncores)
      stats("node CPU idle, cores", nidle)
      stats("Redis bytes per online user", mem)
      stats("machine busy, cores (of 2)", busy)
      stats("lost deliveries", lost)
      stats("WARN/ERROR lines in node logs", warn)
    }' "$RESULTS"
  if ((FAILED)); then echo "RESULT: FAIL (see the runs above)"; else echo "RESULT: PASS"; fi
} | tee "$OUT/summary.txt"
say "kept in $OUT"
((FAILED == 0))

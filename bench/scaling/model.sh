#!/usr/bin/env bash
# The capacity model of docs/scaling.md as arithmetic: from the workload and the per-node and
# per-shard costs measured on this machine, what a deployment needs (nodes, Redis shards,
# network per node) and which resource runs out first as it grows. Every input is a flag; the
# defaults are the figures of docs/scaling.md (measured, or estimated where it says so).
#
#   bench/scaling/model.sh                              # 10 million online, the doc's figures
#   bench/scaling/model.sh --online 50000000 --node-cores 16 --node-mem-gib 64
#
# Workload:  --online U [10000000]  --contacts K [50]  --contacts-online F [1.0] (share of a
#            user's contacts online: 1.0 is the upper bound)  --devices D [1] (streams per
#            online user)  --change-every S [600] (seconds between status changes of a user)
#            --session S [1800] (a device's session: then it leaves, its user goes offline
#            after the grace, and another comes online)
# Nodes:     --node-cores C [8]  --node-mem-gib G [32]  --headroom H [0.5] (share of CPU and
#            memory planned for; the rest absorbs reconnect waves and failovers)
#            --us-per-delivery [3.5]  --us-per-publication-in [22] (a node's CPU per publication
#            received)  --kib-per-stream [10]  --bytes-per-user-held [350] (a node's entry of
#            each user its streams watch; estimated)  --bytes-per-delivery [35]
# Redis:     --shard-us-per-transition [160] (a master's CPU per transition with 3 nodes
#            subscribed)  --us-per-subscriber [0.3] (more per publication per node subscribed)
#            --measured-subscribers [3]  --bytes-per-publication [274] (a change as a pushed
#            RESP3 message)  --redis-bytes-per-user [520]  --shard-mem-gib [16]
set -euo pipefail

declare -A V=(
  [online]=10000000 [contacts]=50 [contacts-online]=1.0 [devices]=1 [change-every]=600 [session]=1800
  [node-cores]=8 [node-mem-gib]=32 [headroom]=0.5 [us-per-delivery]=3.5 [us-per-publication-in]=22
  [kib-per-stream]=10 [bytes-per-user-held]=350 [bytes-per-delivery]=35
  [shard-us-per-transition]=160 [us-per-subscriber]=0.3 [measured-subscribers]=3
  [bytes-per-publication]=274 [redis-bytes-per-user]=520 [shard-mem-gib]=16
)
while (($#)); do
  key=${1#--}
  if [[ $1 == -h || $1 == --help ]]; then sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
  [[ $1 == --* && -n ${V[$key]+set} && $# -ge 2 ]] || { echo "model: unknown option or missing value: $1 (see --help)" >&2; exit 2; }
  [[ $2 =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "model: $1 needs a number, got $2" >&2; exit 2; }
  V[$key]=$2
  shift 2
done

args=()
for k in "${!V[@]}"; do args+=(-v "${k//-/_}=${V[$k]}"); done
awk "${args[@]}" '
function ceil(x) { return (x == int(x)) ? x : int(x) + 1 }
function max(a, b) { return a > b ? a : b }
function fmt(x,   s, r) {
  s = sprintf("%.0f", x); r = ""
  while (length(s) > 3) { r = "," substr(s, length(s) - 2) r; s = substr(s, 1, length(s) - 3) }
  return s r
}
BEGIN {
  # --- workload
  changes = online / change_every
  logins = online / session                 # = logouts (steady state)
  transitions = changes + 3 * logins        # connect, disconnect (grace starts), grace expiry
  publications = changes + 2 * logins       # the status change, online, offline
  receivers = contacts * contacts_online * devices
  deliveries = publications * receivers
  streams = online * devices

  # --- nodes: CPU (deliveries spread, every publication at every node), memory (streams,
  # and an entry per user watched: with users placed at random nearly all of them)
  budget_us = node_cores * headroom * 1e6   # CPU microseconds per second per node
  intake_us = publications * us_per_publication_in
  if (intake_us >= budget_us) { print "every node is saturated by the publications it receives: no number of nodes works"; exit 1 }
  n_cpu = ceil(deliveries * us_per_delivery / (budget_us - intake_us))
  mem_budget = node_mem_gib * headroom * 1073741824
  held = online * bytes_per_user_held       # per node, whatever its share of streams
  if (held >= mem_budget) { print "the users every node holds exceed its memory: no number of nodes works"; exit 1 }
  n_mem = ceil(streams * kib_per_stream * 1024 / (mem_budget - held))
  nodes = max(max(n_cpu, n_mem), 2)

  # --- Redis: each publication is written to every node
  us_tr = shard_us_per_transition + (nodes - measured_subscribers) * us_per_subscriber * publications / transitions
  s_cpu = ceil(transitions * us_tr / 0.5e6)                   # masters at <= 50 % of a core
  s_mem = ceil(online * redis_bytes_per_user / (shard_mem_gib * headroom * 1073741824))
  shards = max(s_cpu, s_mem)

  printf "workload: %s online users, %d contacts (%.0f%% online), %s device(s) each; a change every %d s, sessions of %d s\n",
    fmt(online), contacts, contacts_online * 100, devices, change_every, session
  printf "  status changes/s          %12s\n", fmt(changes)
  printf "  logins/s (= logouts/s)    %12s\n", fmt(logins)
  printf "  transitions/s (Redis)     %12s   changes + 3 x logins\n", fmt(transitions)
  printf "  publications/s            %12s   changes + 2 x logins\n", fmt(publications)
  printf "  deliveries/s              %12s   publications x %.0f receivers\n", fmt(deliveries), receivers
  printf "nodes (%d cores, %d GiB, planned at %.0f%%): %d  (CPU needs %d, memory needs %d)\n",
    node_cores, node_mem_gib, headroom * 100, nodes, n_cpu, n_mem
  printf "  per node: %s streams, %s deliveries/s, %s publications/s received\n",
    fmt(streams / nodes), fmt(deliveries / nodes), fmt(publications)
  printf "  per node CPU: %.2f cores deliveries + %.2f cores intake = %.0f%% of %d cores\n",
    deliveries / nodes * us_per_delivery / 1e6, intake_us / 1e6,
    (deliveries / nodes * us_per_delivery + intake_us) / 1e6 / node_cores * 100, node_cores
  printf "  per node memory: %.1f GiB streams + %.1f GiB users held = %.1f GiB\n",
    streams / nodes * kib_per_stream / 1048576, held / 1073741824,
    (streams / nodes * kib_per_stream * 1024 + held) / 1073741824
  printf "  per node network: in %.1f MB/s from Redis (%s publications/s x %d B), out %.1f MB/s to clients (%s deliveries/s x %d B)\n",
    publications * bytes_per_publication / 1e6, fmt(publications), bytes_per_publication,
    deliveries / nodes * bytes_per_delivery / 1e6, fmt(deliveries / nodes), bytes_per_delivery
  printf "redis masters: %d  (CPU needs %d at %.1f us per transition with %d nodes subscribed; memory needs %d)\n",
    shards, s_cpu, us_tr, nodes, s_mem
  printf "  per master: %s transitions/s, %s publications/s, %.2f cores, out %.1f MB/s (each publication to %d nodes)\n",
    fmt(transitions / shards), fmt(publications / shards), transitions / shards * us_tr / 1e6,
    publications / shards * nodes * bytes_per_publication / 1e6, nodes
  printf "  memory: %.1f GiB of user state over the masters (as much again on the replicas)\n",
    online * redis_bytes_per_user / 1073741824

  # --- walls. Two costs do not shrink as nodes are added: every node receives every
  # publication, and holds an entry of (nearly) every online user. They set how far adding
  # nodes works; the costs that do spread (deliveries, streams, transitions over shards) do not.
  printf "walls (the workload grows with the online users; nodes and masters are added as needed):\n"
  printf "  publications every node receives: %.2f cores per node now; the planned %.0f%% of a node is reached at %s online users\n",
    intake_us / 1e6, headroom * 100, fmt(online * budget_us / intake_us)
  printf "  users every node holds: %.1f GiB per node now; the planned %.0f%% of a node is reached at %s online users\n",
    held / 1073741824, headroom * 100, fmt(online * mem_budget / held)
  printf "  cluster CPU spent receiving publications: %d nodes x %.2f cores = %.1f cores (grows as users squared)\n",
    nodes, intake_us / 1e6, nodes * intake_us / 1e6
  printf "  a master writes each publication to every node: %.1f of its %.1f us per transition now\n",
    (nodes * us_per_subscriber) * publications / transitions, us_tr
}'

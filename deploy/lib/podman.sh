# Sourced by deploy/container-check.sh and deploy/compose-check.sh: rootful podman on a Debian
# bookworm machine that reaches Debian's mirror and the package registries (crates.io, npm) but
# NO container registry. It makes, locally and only when missing or out of date, the base images
# the project's Dockerfiles and compose file name:
#
#   debian:bookworm-slim      minbase bookworm rootfs from mmdebstrap, imported
#   rust:<X.Y>-bookworm       that + build tools + THIS machine's Rust toolchain (the tag in the
#                             Dockerfile must name the toolchain it really carries: X.Y is checked)
#   node:<N>-bookworm-slim    debian:bookworm-slim + THIS machine's node and npm (Debian bookworm's
#                             nodejs is 18; the edge needs >= 20); N is checked
#   docker.io/library/mariadb:10.11, docker.io/library/redis:7.0
#                             stand-ins for the official images, from Debian's mariadb-server and
#                             redis-server, honouring the same environment variables the compose
#                             file uses (MARIADB_*; redis-server arguments)
#
# Base images are cached in podman's own storage (/var/lib/containers/storage) between runs. Each
# carries a label with a hash of the recipe that made it (and of the host toolchain it copied);
# a changed recipe or toolchain remakes it, REBUILD_BASE=1 forces it.
#
# Podman settings for sandboxes without systemd, on hybrid cgroups and without CAP_SYS_RESOURCE
# (harmless on an ordinary host) are written to $PODMAN_CONF_DIR and exported through
# CONTAINERS_CONF / CONTAINERS_REGISTRIES_CONF; nothing under /etc/containers is changed.
# shellcheck shell=bash

die() { echo "${0##*/}: $*" >&2; exit 1; }
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
PODMAN_CONF_DIR=${PODMAN_CONF_DIR:-/var/cache/presence-podman}
REBUILD_BASE=${REBUILD_BASE:-0}
EXTRA_CA_DIR=${EXTRA_CA_DIR:-/usr/local/share/ca-certificates}
SUITE=bookworm
LABEL=io.presence.base-recipe

apt_uri() { awk -v want="$1" '/^URIs:/{u=$2} /^Suites:/{ if ($0 ~ want) { print u; exit } }' /etc/apt/sources.list.d/*.sources 2>/dev/null; }
MIRROR=${MIRROR:-$(apt_uri ' bookworm( |$)')}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-$(apt_uri 'bookworm-security')}
SECURITY_MIRROR=${SECURITY_MIRROR:-http://deb.debian.org/debian-security}

APT_UPDATED=0
apt_install() { # apt_install PKG... (only what is missing)
  local missing=()
  for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p"); done
  [ "${#missing[@]}" = 0 ] && return 0
  [ "$APT_UPDATED" = 1 ] || { apt-get update -qq; APT_UPDATED=1; }
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

podman_setup() {
  [ "$(id -u)" = 0 ] || die "run as root (rootful podman)"
  step "podman"
  apt_install podman buildah runc mmdebstrap netavark aardvark-dns containernetworking-plugins \
    ca-certificates uidmap
  # - crun (Debian's default) refuses hybrid cgroups with v2 controllers: runc;
  # - podman's default ulimits (nofile/nproc 1048576) need CAP_SYS_RESOURCE: ask for what this
  #   shell has (processes capped at 32768, as podman caps its own);
  # - no systemd: cgroupfs manager, file events logger (and no healthcheck timers: the checks
  #   run `podman healthcheck run` themselves).
  mkdir -p "$PODMAN_CONF_DIR"
  local nofile nproc
  nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
  nproc=$(ulimit -Hu); { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
  cat >"$PODMAN_CONF_DIR/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  # No registry is ever asked: short names resolve to local images only.
  cat >"$PODMAN_CONF_DIR/registries.conf" <<'EOF'
unqualified-search-registries = []
short-name-mode = "disabled"
EOF
  export CONTAINERS_CONF=$PODMAN_CONF_DIR/containers.conf
  export CONTAINERS_REGISTRIES_CONF=$PODMAN_CONF_DIR/registries.conf
  # Docker image format keeps HEALTHCHECK (OCI drops it); read by every `podman build`,
  # podman-compose's included.
  export BUILDAH_FORMAT=docker
  podman info --format 'podman {{.Version.Version}}, storage {{.Store.GraphDriverName}}, cgroups {{.Host.CgroupsVersion}}, runtime {{.Host.OCIRuntime.Name}}'
}

# recipe_hash TEXT...: short hash naming one version of a base image's recipe.
recipe_hash() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }

# base_fresh IMAGE HASH: true when IMAGE exists and was made by the recipe with that hash.
base_fresh() {
  [ "$REBUILD_BASE" = 1 ] && return 1
  podman image exists "$1" || return 1
  [ "$(podman image inspect "$1" --format "{{index .Labels \"$LABEL\"}}" 2>/dev/null)" = "$2" ]
}

# The machine's extra CA certificates (a TLS-intercepting egress proxy's, here) for images that
# download packages during a build. Empty directory when there are none.
extra_cas() { # extra_cas DIR
  mkdir -p "$1"
  if [ -d "$EXTRA_CA_DIR" ]; then find "$EXTRA_CA_DIR" -maxdepth 1 -name '*.crt' -exec cp {} "$1/" \; ; fi
}

ensure_debian_base() { # ensure_debian_base [NAME]
  local name=${1:-debian:bookworm-slim} hash t0=$SECONDS tmp
  hash=$(recipe_hash "$(declare -f ensure_debian_base)" "$MIRROR" "$SECURITY_MIRROR" v1)
  step "base image $name"
  if base_fresh "$name" "$hash"; then echo "cached ($LABEL=$hash)"; return 0; fi
  tmp=$(mktemp -d -t presence-base.XXXXXX)
  # apt settings of the official Debian images: no package caches left in layers.
  cat >"$tmp/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  # minbase + the official slim image's dpkg excludes; merged /usr by symlinks.
  # shellcheck disable=SC2016 # $1 is mmdebstrap's, in the hook
  mmdebstrap --quiet --variant=minbase --mode=root --format=tar \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --customize-hook="copy-in $tmp/docker-clean /etc/apt/apt.conf.d" \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --aptopt='Acquire::Languages "none"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$SUITE" "$tmp/rootfs.tar" \
    "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" \
    "deb $SECURITY_MIRROR $SUITE-security main"
  podman rmi -f "$name" >/dev/null 2>&1 || true
  podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL $LABEL=$hash" \
    --change 'CMD ["bash"]' \
    "$tmp/rootfs.tar" "$name" >/dev/null
  rm -rf "$tmp"
  echo "made $name in $((SECONDS - t0))s"
}

ensure_rust_base() { # ensure_rust_base NAME (rust:X.Y-bookworm)
  local name=$1 want rver rhost tc sysroot hash ctx t0=$SECONDS
  want=${name#rust:}; want=${want%%-*}
  command -v rustc >/dev/null || die "no rustc on PATH: $name is made from this machine's toolchain"
  rver=$(rustc -vV | sed -n 's/^release: //p')
  rhost=$(rustc -vV | sed -n 's/^host: //p')
  case "$rver" in "$want"|"$want".*) ;; *)
    # The point of the tag: a build that passes here must pass with the real image.
    [ "${ALLOW_TOOLCHAIN_MISMATCH:-0}" = 1 ] \
      || die "the Dockerfile names $name but this machine's Rust is $rver: change the FROM line to rust:${rver%.*}-bookworm (or ALLOW_TOOLCHAIN_MISMATCH=1)"
    echo "WARNING: $name will hold rustc $rver" >&2 ;;
  esac
  sysroot=$(rustc --print sysroot)
  hash=$(recipe_hash "$(declare -f ensure_rust_base)" "$(rustc -vV)" "$(ls "$EXTRA_CA_DIR" 2>/dev/null)" v1)
  step "base image $name (rustc $rver)"
  if base_fresh "$name" "$hash"; then echo "cached ($LABEL=$hash)"; return 0; fi
  ctx=$(mktemp -d -t presence-rust.XXXXXX)
  tc=$rver-$rhost
  mkdir -p "$ctx/rustup/toolchains/$tc" "$ctx/cargo/bin"
  extra_cas "$ctx/ca"
  # Laid out like the official image (/usr/local/rustup, /usr/local/cargo), without HTML docs.
  tar -C "$sysroot" --exclude=./share/doc -cf - . | tar -C "$ctx/rustup/toolchains/$tc" -xf -
  for b in "$ctx/rustup/toolchains/$tc/bin/"*; do
    ln -s "/usr/local/rustup/toolchains/$tc/bin/$(basename "$b")" "$ctx/cargo/bin/$(basename "$b")"
  done
  chmod -R a+w "$ctx/rustup" "$ctx/cargo"
  cat >"$ctx/Containerfile" <<EOF
FROM debian:bookworm-slim
RUN apt-get update \\
    && apt-get install -y --no-install-recommends ca-certificates curl git build-essential \\
       pkg-config libssl-dev xz-utils procps file \\
    && rm -rf /var/lib/apt/lists/*
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
ENV RUSTUP_HOME=/usr/local/rustup \\
    CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    RUST_VERSION=$rver
COPY rustup /usr/local/rustup
COPY cargo /usr/local/cargo
RUN rustc --version && cargo --version
LABEL $LABEL=$hash
EOF
  podman rmi -f "$name" >/dev/null 2>&1 || true
  podman build --pull=never -q -t "$name" "$ctx" >/dev/null
  rm -rf "$ctx"
  podman run --rm "$name" rustc --version
  echo "made $name in $((SECONDS - t0))s"
}

ensure_node_base() { # ensure_node_base NAME (node:N-bookworm-slim)
  local name=$1 want nver node npmdir hash ctx t0=$SECONDS
  want=${name#node:}; want=${want%%-*}
  node=$(command -v node) || die "no node on PATH: $name is made from this machine's Node.js"
  nver=$(node --version); nver=${nver#v}
  case "$nver" in "$want"|"$want".*) ;; *)
    [ "${ALLOW_TOOLCHAIN_MISMATCH:-0}" = 1 ] \
      || die "the edge's Dockerfile names $name but this machine's Node.js is $nver (or ALLOW_TOOLCHAIN_MISMATCH=1)" ;;
  esac
  npmdir=$(dirname "$(dirname "$(readlink -f "$(command -v npm)")")")
  [ -f "$npmdir/package.json" ] || die "cannot find npm's package directory (got $npmdir)"
  hash=$(recipe_hash "$(declare -f ensure_node_base)" "$nver" "$(npm --version)" "$(ls "$EXTRA_CA_DIR" 2>/dev/null)" v1)
  step "base image $name (node $nver)"
  if base_fresh "$name" "$hash"; then echo "cached ($LABEL=$hash)"; return 0; fi
  ctx=$(mktemp -d -t presence-node.XXXXXX)
  mkdir -p "$ctx/bin" "$ctx/lib"
  extra_cas "$ctx/ca"
  cp -L "$node" "$ctx/bin/node"
  cp -a "$npmdir" "$ctx/lib/npm"
  # As the official image: node and npm under /usr/local, a `node` user with uid 1000. The extra
  # CAs (this machine's egress proxy) go into the system store and NODE_EXTRA_CA_CERTS points
  # node at it, so `npm ci` works in builds here; the official image has neither.
  cat >"$ctx/Containerfile" <<EOF
FROM debian:bookworm-slim
RUN apt-get update \\
    && apt-get install -y --no-install-recommends ca-certificates \\
    && rm -rf /var/lib/apt/lists/* \\
    && groupadd --gid 1000 node && useradd --uid 1000 --gid node --shell /bin/bash --create-home node
COPY ca/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
COPY bin/node /usr/local/bin/node
COPY lib/npm /usr/local/lib/node_modules/npm
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \\
    && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \\
    && node --version && npm --version
ENV NODE_VERSION=$nver NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
CMD ["node"]
LABEL $LABEL=$hash
EOF
  podman rmi -f "$name" >/dev/null 2>&1 || true
  podman build --pull=never -q -t "$name" "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "made $name in $((SECONDS - t0))s"
}

# Stand-ins for the official MariaDB and Redis images, from Debian's packages (no registry here).
ensure_standins() {
  local hash ctx t0=$SECONDS
  hash=$(recipe_hash "$(declare -f ensure_standins)" "$(cat "$REPO/deploy/standins/"*)" v1)
  step "stand-in images docker.io/library/mariadb:10.11, docker.io/library/redis:7.0"
  if base_fresh docker.io/library/mariadb:10.11 "$hash" && base_fresh docker.io/library/redis:7.0 "$hash"; then
    echo "cached ($LABEL=$hash)"; return 0
  fi
  ctx=$(mktemp -d -t presence-standins.XXXXXX)
  cp "$REPO/deploy/standins/"* "$ctx/"
  podman build --pull=never -q --label "$LABEL=$hash" -f "$ctx/mariadb.Containerfile" \
    -t docker.io/library/mariadb:10.11 "$ctx" >/dev/null
  podman build --pull=never -q --label "$LABEL=$hash" -f "$ctx/redis.Containerfile" \
    -t docker.io/library/redis:7.0 "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "made the stand-ins in $((SECONDS - t0))s"
}

# The base image names a Dockerfile's FROM lines use (first match of a prefix).
from_image() { # from_image DOCKERFILE PREFIX
  awk -v p="$2" 'toupper($1)=="FROM" && index($2, p)==1 {print $2; exit}' "$1"
}

# wait_healthy CONTAINER SECONDS: runs the image's HEALTHCHECK until it passes (podman without
# systemd has no timer to run it).
wait_healthy() {
  local c=$1 secs=$2
  for _ in $(seq "$secs"); do
    podman healthcheck run "$c" >/dev/null 2>&1 && return 0
    [ "$(podman inspect "$c" --format '{{.State.Running}}' 2>/dev/null)" = true ] || break
    sleep 1
  done
  podman logs --tail 30 "$c" >&2 || true
  return 1
}

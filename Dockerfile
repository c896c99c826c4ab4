# syntax=docker/dockerfile:1
# Multi-stage build: a Rust builder with a cached dependency layer, then a slim runtime image that
# holds only the stripped `presence` binary (the bench is neither built nor shipped).
# Built, run and checked by deploy/container-check.sh (in CI): see deploy/README.md.
#
# The builder's tag names the toolchain CI really builds with (1.95); Cargo.toml's rust-version
# is the oldest Rust the locked dependencies accept (1.94, for sqlx 0.9).

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Dependencies first, against dummy sources at the paths Cargo.toml declares, so source edits do
# not rebuild them. Only the server binary is built.
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo ./.cargo
COPY proto ./proto
RUN mkdir -p src/bin/presence-bench \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/presence-bench/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bin presence \
    && rm -rf src
COPY src ./src
COPY migrations ./migrations
# Touched: COPY keeps the files' older times, which cargo would take for "already built".
# The debug info goes to its own file (the `debug` stage below); the shipped binary keeps its
# symbols (function names in backtraces and profiles) but no DWARF.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin presence \
    && mkdir /out \
    && objcopy --only-keep-debug target/release/presence /out/presence.debug \
    && objcopy --strip-debug --add-gnu-debuglink=/out/presence.debug \
       target/release/presence /out/presence \
    && /out/presence --version

# `docker build --target debug -o type=local,dest=out .` exports presence.debug (for gdb or
# symbolising a core dump of the shipped binary; it matches that binary's build id).
FROM scratch AS debug
COPY --from=builder /out/presence.debug /

FROM debian:bookworm-slim
# No packages: the binary links only glibc (SQLite and mimalloc are built in) and has no TLS
# client (MySQL and Redis are reached in plaintext), so it needs no CA certificates. Enabling a
# TLS feature of sqlx or redis means installing ca-certificates here.
RUN useradd --system --uid 10001 --home-dir /data presence \
    && mkdir -p /data \
    && chown presence /data
COPY --from=builder /out/presence /usr/local/bin/presence
USER 10001
WORKDIR /data
VOLUME ["/data"]
# Both listeners on all interfaces: gRPC (a non-loopback listener requires a JWT key) and the
# Prometheus /metrics endpoint, which has no authentication and exposes counts: publish it only
# to the monitoring network, never to the public.
ENV PRESENCE_LISTEN=0.0.0.0:50051 \
    PRESENCE_METRICS_LISTEN=0.0.0.0:9090 \
    DATABASE_URL=sqlite:///data/presence.db \
    PRESENCE_LOG_FORMAT=json
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["presence", "health", "--addr", "127.0.0.1:50051"]
ENTRYPOINT ["presence"]
CMD ["serve"]

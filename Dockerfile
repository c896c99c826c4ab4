# syntax=docker/dockerfile:1
# Multi-stage build: a Rust builder with cached dependency layers, then a slim runtime image.
# Untested here (no container engine on the build machine): CI lints this file with hadolint and
# runs its build line and the binary's subcommands outside Docker.

FROM rust:1.88-bookworm AS builder
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo ./.cargo
COPY proto ./proto
RUN mkdir -p src/bin \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/presence-bench.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bins \
    && rm -rf src
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bins

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data presence \
    && mkdir -p /data \
    && chown presence /data
COPY --from=builder /src/target/release/presence /usr/local/bin/presence
USER 10001
WORKDIR /data
VOLUME ["/data"]
ENV PRESENCE_LISTEN=0.0.0.0:50051 \
    PRESENCE_METRICS_LISTEN=0.0.0.0:9090 \
    DATABASE_URL=sqlite:///data/presence.db \
    PRESENCE_LOG_FORMAT=json
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["presence", "health", "--addr", "127.0.0.1:50051"]
ENTRYPOINT ["presence"]
CMD ["serve"]

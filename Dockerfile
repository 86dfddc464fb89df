# One multi-stage build for all four services.
#
#   docker build --target order-service -t order-service .
#   (docker compose up --build picks the target per service; see docker-compose.yml)
#
# Stages: `builder` compiles the four release binaries once (dependencies in their own cached layer),
# `runtime` is the common slim, non-root base, and one small stage per service (`gateway`,
# `order-service`, `inventory-service`, `pricing-service`, named after the package and its binary)
# adds that binary, its port and its entrypoint. Build with `--target <service>`: without one you
# get the last stage (the gateway).
#
# Only classic Dockerfile syntax is used (no `# syntax=` line, no cache mounts), so the file builds
# with BuildKit and with the legacy builder alike, and without pulling a frontend image.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src

# 1. Dependencies. Only the manifests and the lock file are copied, every crate gets stub sources,
# and the four packages are built: this layer compiles every third-party crate and is reused until a
# manifest or Cargo.lock changes, so editing code rebuilds only the workspace's own crates.
# Adding a workspace member (or an explicit [[bin]]/[[test]]/[[bench]] target) means adding it here.
COPY Cargo.toml Cargo.lock ./
COPY shared/Cargo.toml shared/
COPY gateway/Cargo.toml gateway/
COPY order-service/Cargo.toml order-service/
COPY inventory-service/Cargo.toml inventory-service/
COPY pricing-service/Cargo.toml pricing-service/
COPY tests/Cargo.toml tests/
RUN set -eux; \
    for crate in shared tests gateway order-service inventory-service pricing-service; do \
        mkdir -p "$crate/src"; \
        echo '//! Dependency-caching stub, replaced by the real sources below.' > "$crate/src/lib.rs"; \
    done; \
    for bin in gateway order-service inventory-service pricing-service; do \
        echo 'fn main() {}' > "$bin/src/main.rs"; \
    done; \
    cargo build --release --locked \
        -p gateway -p order-service -p inventory-service -p pricing-service; \
    rm -rf shared/src gateway/src order-service/src inventory-service/src pricing-service/src

# 2. The workspace's own code. The end-to-end `tests` crate is in no image: its stub stays, only so
# the workspace resolves.
COPY shared shared
COPY gateway gateway
COPY order-service order-service
COPY inventory-service inventory-service
COPY pricing-service pricing-service
# The copied files keep their (older) modification times, and cargo decides what to rebuild by
# comparing those with the stub build's outputs: without this touch it would keep the stubs.
RUN set -eux; \
    find shared gateway order-service inventory-service pricing-service -type f -exec touch {} +; \
    cargo build --release --locked \
        -p gateway -p order-service -p inventory-service -p pricing-service; \
    mkdir -p /out; \
    cp target/release/gateway target/release/order-service \
       target/release/inventory-service target/release/pricing-service /out/

# ---------------------------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime

# curl is installed (with --no-install-recommends, a few MB) for one reason: docker-compose.yml's
# health checks ask each service's GET /healthz with `curl -fsS`, which fails on any non-2xx status.
# The binaries have no self-check flag, and bash's /dev/tcp could open the socket but would leave us
# parsing HTTP by hand; curl is also what an operator reaches for in `docker exec`. Nothing else is
# needed at run time: every internal call is plain HTTP/AMQP, so not even ca-certificates.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends curl; \
    rm -rf /var/lib/apt/lists/*

# A fixed, numeric, unprivileged user, so orchestrators can verify "runs as non-root" and volume
# ownership stays stable across rebuilds. /app/data (where DATABASE_URL points) is the only writable
# place; a named volume mounted there starts out with this ownership.
RUN set -eux; \
    groupadd --system --gid 10001 app; \
    useradd --system --uid 10001 --gid app --home-dir /app --shell /usr/sbin/nologin app; \
    mkdir -p /app/data; \
    chown -R 10001:10001 /app
WORKDIR /app
USER 10001:10001
# The services already default to these; they are stated so `docker inspect` shows them.
ENV LOG_FORMAT=json \
    RUST_LOG=info
# The binaries handle SIGTERM themselves (graceful drain), and they spawn no child processes, so
# running as PID 1 without an init is fine.
STOPSIGNAL SIGTERM

# ---------------------------------------------------------------------------------------------------
FROM runtime AS order-service
COPY --from=builder /out/order-service /usr/local/bin/order-service
EXPOSE 4001
ENTRYPOINT ["/usr/local/bin/order-service"]

FROM runtime AS inventory-service
COPY --from=builder /out/inventory-service /usr/local/bin/inventory-service
EXPOSE 4002
ENTRYPOINT ["/usr/local/bin/inventory-service"]

FROM runtime AS pricing-service
COPY --from=builder /out/pricing-service /usr/local/bin/pricing-service
EXPOSE 4003
ENTRYPOINT ["/usr/local/bin/pricing-service"]

# Last, so a plain `docker build .` yields the public entry point.
FROM runtime AS gateway
COPY --from=builder /out/gateway /usr/local/bin/gateway
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/gateway"]

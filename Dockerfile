# Multi-stage build: compile with the Rust toolchain, run on a slim Debian with nothing but
# the binary. Build with `docker build -t supersynk .` (or `docker compose build`).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so that changing the code does not rebuild them.
# The workspace's other members (the test client and the benchmark) are not built, but
# cargo reads their manifests: stand-ins keep the workspace whole.
COPY Cargo.toml Cargo.lock build.rs ./
COPY client/Cargo.toml ./client/
COPY bench/Cargo.toml ./bench/
RUN mkdir -p src client/src bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs client/src/lib.rs \
    && echo 'fn main() {}' > bench/src/main.rs \
    && cargo build --release --locked --bin supersynk \
    && rm -rf src
COPY src ./src
# The commit shown in supersynk_build_info (the build context has no .git), declared here
# so that a new value does not rebuild the dependencies:
#   docker build --build-arg SUPERSYNK_GIT_COMMIT=$(git rev-parse --short=12 HEAD) -t supersynk .
ARG SUPERSYNK_GIT_COMMIT=unknown
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin supersynk

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/supersynk --create-home supersynk
COPY --from=build /src/target/release/supersynk /usr/local/bin/supersynk
USER supersynk
WORKDIR /var/lib/supersynk
ENV SUPERSYNK_BIND=0.0.0.0 \
    SUPERSYNK_PORT=5001 \
    SUPERSYNK_LOG_FORMAT=json
EXPOSE 5001
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/supersynk"]

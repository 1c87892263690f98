# ssegate, built from this repository. Multi-stage: a Rust build stage, then a small
# Debian runtime with only the binary, the example configs and CA certificates.
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# The patched pingora-core that Cargo.toml's [patch.crates-io] builds.
COPY vendor ./vendor
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin ssegate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /nonexistent --shell /usr/sbin/nologin ssegate
COPY --from=build /src/target/release/ssegate /usr/local/bin/ssegate
COPY conf /etc/ssegate
USER ssegate
EXPOSE 8080 8443 9901
ENTRYPOINT ["/usr/local/bin/ssegate"]
CMD ["-c", "/etc/ssegate/docker.toml"]

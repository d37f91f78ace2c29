# syntax=docker/dockerfile:1
# One image with all three binaries: ca-server, ca-cli and ca-agent (in /usr/local/bin; the
# Helm charts in deploy/helm pick the binary with `command:`).
#
#   docker build -t REGISTRY/pki-mesh:0.1.0 .                  # runtime image (distroless)
#   docker build -t REGISTRY/pki-mesh:0.1.0-dev --target dev .  # with SoftHSM2, for development
#
# Tags follow the charts' appVersion (the workspace version in Cargo.toml).
#
# NOT BUILT HERE: the machines this project is developed and tested on run no container engine
# (no Docker, no BuildKit), so CI never builds this file; scripts/e2e-kind builds it on a machine
# that has Docker. What CI does check is the charts that run the image (scripts/chart-check).
#
# The runtime image is distroless (glibc, CA certificates, no shell, no package manager) and
# runs as uid/gid 65532 ("nonroot"), which the charts' securityContext also demands. ca-server
# loads a PKCS#11 module at run time: the charts mount the vendor's from a volume. The `dev`
# target is Debian slim with SoftHSM2 (/usr/lib/softhsm/libsofthsm2.so), still non-root; its
# shell is there for development only, nothing in it needs one.

ARG RUST_VERSION=1.94
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS build
# aws-lc-sys builds with cmake where no pre-generated build fits.
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends cmake clang \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ca-server -p ca-cli -p ca-agent \
    && mkdir -p /out \
    && cp target/release/ca-server target/release/ca-cli target/release/ca-agent /out/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
EXPOSE 8443 9443 9464 9090
ENTRYPOINT ["/usr/local/bin/ca-server"]

FROM debian:${DEBIAN}-slim AS dev
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      softhsm2 opensc ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
EXPOSE 8443 9443 9464 9090
ENTRYPOINT ["/usr/local/bin/ca-server"]

# The default target: the runtime image.
FROM runtime

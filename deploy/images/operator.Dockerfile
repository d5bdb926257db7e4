# kmm-operator image: one static (musl) binary on a distroless base, non-root.
# Build from the repository root (needs a docker/podman engine, not available on the CI machines):
#   docker build -f deploy/images/operator.Dockerfile -t quay.io/kmm-rs/kmm-operator:dev .
FROM docker.io/library/rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y musl-tools
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p kmm-operator

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/kmm-operator /usr/local/bin/kmm-operator
# Numeric user so that runAsNonRoot can be verified by the kubelet; OpenShift overrides it.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kmm-operator"]
CMD ["run"]

# kmm-worker image: the static worker binary plus kmod's modprobe (Debian's kmod), which the
# worker runs to load and unload modules. Runs as root in privileged worker pods by design.
#   docker build -f deploy/images/worker.Dockerfile -t quay.io/kmm-rs/kmm-worker:dev .
FROM docker.io/library/rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y musl-tools
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p kmm-worker

FROM docker.io/library/debian:12-slim
RUN apt-get update && apt-get install -y --no-install-recommends kmod && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/kmm-worker /usr/local/bin/worker
ENTRYPOINT ["/usr/local/bin/worker"]

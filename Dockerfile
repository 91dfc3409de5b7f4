# The `dynamo-rs:latest` image the manifests in config/k8s/ run: the `dynamo-run` binary as
# entrypoint (release build, baseline x86-64; AVX2/FMA kernels are chosen at run time).
#   docker build -t dynamo-rs:latest .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# With the planner's kubernetes connector (config/k8s/planner.yaml).
RUN cargo build --release --locked --bin dynamo-run --features kubernetes

FROM debian:bookworm-slim
COPY --from=build /src/target/release/dynamo-run /usr/local/bin/dynamo-run
COPY config /etc/dynamo
ENTRYPOINT ["/usr/local/bin/dynamo-run"]

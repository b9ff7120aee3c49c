# flaghost with the bundled example flags and plugins.
#
# Dependencies build in a layer of their own (cargo-chef cooks them from a
# recipe of the manifests alone): a change to flaghost's code rebuilds
# flaghost, not wasmtime. The image runs as an unprivileged user.
FROM rust:1.95-bookworm AS chef
RUN cargo install --locked cargo-chef --version 0.1.78 \
 && rustup target add wasm32-wasip2
WORKDIR /src

FROM chef AS plan
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS build
COPY --from=plan /src/recipe.json recipe.json
RUN cargo chef cook --release -p flaghost --recipe-path recipe.json
COPY . .
RUN plugins/build.sh \
 && cargo build --release -p flaghost --bin flaghost

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin flaghost
COPY --from=build /src/target/release/flaghost /usr/local/bin/flaghost
COPY --from=build /src/examples/flags /srv/flaghost/flags
# NB: the plugin directory is flaghost's to write: the admin API's uploads
# land there.
COPY --from=build --chown=flaghost:flaghost /src/target/plugins /srv/flaghost/plugins
# NB: numeric, so a cluster that runs only non-root images can tell.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["flaghost", "serve"]

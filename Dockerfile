# flaghost with the bundled example flags and plugins.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN plugins/build.sh \
 && cargo build --release -p flaghost

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/flaghost /usr/local/bin/flaghost
COPY --from=build /src/examples/flags /srv/flaghost/flags
COPY --from=build /src/target/plugins /srv/flaghost/plugins
EXPOSE 8080
ENTRYPOINT ["flaghost", "serve"]

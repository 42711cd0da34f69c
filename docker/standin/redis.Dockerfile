# A stand-in for the redis:7.4-alpine image where no registry can be reached: Debian's redis-server on
# a locally built Debian base (docker/standin/build-base-images.sh). Like the official image it works
# in /data and serves on 6379; compose passes `--protected-mode no` because the official image's
# default (protected mode off) is a patch of its own build.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]

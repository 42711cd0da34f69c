#!/usr/bin/env bash
# Stand-in base images for a machine that cannot pull from a registry:
#   $PREFIX/bookworm-py:12   Debian bookworm (minbase) with python3 3.11, python3-venv, ca-certificates;
#                            stands in for python:3.11-slim-bookworm, debian:bookworm-slim and, for
#                            GPU image builds that cannot run CUDA anyway, for nvidia/cuda
#   $PREFIX/redis:7          that base plus Debian's redis-server (7.0), for redis:7.4-alpine
# Made with debootstrap from a Debian mirror (needs root and the debootstrap package; about 1 min and
# 275 MB) and imported with `ENGINE import`. Images that already exist are kept.
#
#   docker/standin/build-base-images.sh ENGINE PREFIX
# ENGINE is docker or podman; PREFIX e.g. localhost/oal-standin. The mirror is OAL_DEBIAN_MIRROR,
# else the first Debian URI in /etc/apt, else http://deb.debian.org/debian.
set -euo pipefail

engine=${1:?usage: build-base-images.sh ENGINE PREFIX}
prefix=${2:?usage: build-base-images.sh ENGINE PREFIX}
here=$(cd "$(dirname "$0")" && pwd)
base="$prefix/bookworm-py:12"
redis="$prefix/redis:7"

debian_mirror() {
    if [[ -n ${OAL_DEBIAN_MIRROR:-} ]]; then
        echo "$OAL_DEBIAN_MIRROR"
        return
    fi
    local uri
    uri=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/* /etc/apt/sources.list \
        2>/dev/null | head -n 1 | awk '{print $2}')
    echo "${uri:-http://deb.debian.org/debian}"
}

if ! "$engine" image inspect "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || {
        echo "build-base-images: debootstrap is missing (apt-get install -y debootstrap)" >&2
        exit 1
    }
    [[ $(id -u) == 0 ]] || { echo "build-base-images: debootstrap needs root" >&2; exit 1; }
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    mirror=$(debian_mirror)
    echo "build-base-images: debootstrap bookworm from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" \
        >"$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    # The official images run with an empty apt cache; so does this one.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -c . | "$engine" import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
    echo "build-base-images: $base"
fi

if ! "$engine" image inspect "$redis" >/dev/null 2>&1; then
    "$engine" build -q -f "$here/redis.Dockerfile" --build-arg "BASE_IMAGE=$base" -t "$redis" "$here" >/dev/null
    echo "build-base-images: $redis"
fi

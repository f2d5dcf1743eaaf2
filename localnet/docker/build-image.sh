#!/usr/bin/env bash
# Builds the images of the Docker Compose cluster on a machine that cannot
# pull images: a Debian base made with debootstrap from Debian packages,
# then the runtime image (base image as a build argument) holding binaries
# built on this host. Needs root (debootstrap), docker and cargo.
#
#   localnet/docker/build-image.sh            # keyraft-base:bookworm, keyraft:local
#   BASE=debian:bookworm-slim localnet/docker/build-image.sh   # where pulling works
#   PROFILE=debug localnet/docker/build-image.sh               # reuse a debug build
set -euo pipefail
cd "$(dirname "$0")/../.."
BASE=${BASE:-keyraft-base:bookworm}
IMAGE=${IMAGE:-keyraft:local}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if [ "$BASE" = keyraft-base:bookworm ] && ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    echo "debootstrap bookworm (minbase) into $rootfs ..."
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    echo "imported $BASE"
fi

# PROFILE=debug reuses a test build (CI); release is for real use.
PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then
    cargo build --release -p keyraft -p localnet
else
    cargo build -p keyraft -p localnet
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp target/"$PROFILE"/keyraft target/"$PROFILE"/fakenode target/"$PROFILE"/fakechain "$ctx"/
cp localnet/docker/Dockerfile "$ctx"/
docker build -q --build-arg BASE="$BASE" -t "$IMAGE" "$ctx" >/dev/null
echo "built $IMAGE from $BASE"

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
SUITE=${SUITE:-bookworm}

# The Debian mirror this host's apt already uses (deb822 .sources files or
# the one-line sources.list): the stanza with the suite and `main`, not the
# security archive. MIRROR overrides it.
host_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" 'BEGIN { RS = "" }
            $0 ~ ("Suites:[^\n]*(^|[ \t])" suite "([ \t]|\n|$)") && /Components:[^\n]*main/ && !/-security/ {
                if (match($0, /URIs:[ \t]*[^ \t\n]+/)) {
                    u = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", u); print u; exit
                }
            }' "$f"
    done
    if [ -f /etc/apt/sources.list ]; then
        awk -v suite="$SUITE" '$1 == "deb" && $0 !~ /security/ {
            for (i = 2; i < NF; i++) if ($i ~ /^(https?|file):/ && $(i + 1) == suite) { print $i; exit }
        }' /etc/apt/sources.list
    fi
}
MIRROR=${MIRROR:-$(host_mirror | head -n 1)}

# The packages the base needs beyond minbase: systemd (the package test
# runs systemd-analyze in it), nftables (the kernel fence), Debian's
# fence-agents (the compose suite fences with the real fence_docker) and
# socat (the bridge fence_docker reaches the Docker API through);
# python3-cffi-backend is named because debootstrap does not resolve the
# virtual package fence-agents needs through python3-cryptography.
PACKAGES=systemd,nftables,fence-agents,python3-cffi-backend,socat
# An older base without them is rebuilt.
if [ "$BASE" = keyraft-base:bookworm ] && docker image inspect "$BASE" >/dev/null 2>&1 &&
    ! docker run --rm "$BASE" sh -c 'command -v systemd-analyze && command -v nft && command -v fence_docker && command -v socat' >/dev/null 2>&1; then
    echo "$BASE lacks some of $PACKAGES: rebuilding it"
    docker rmi -f "$BASE" >/dev/null
fi
if [ "$BASE" = keyraft-base:bookworm ] && ! docker image inspect "$BASE" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
    [ -n "$MIRROR" ] || { echo "no Debian $SUITE mirror in this host's apt sources: set MIRROR=http://.../debian" >&2; exit 1; }
    echo "debootstrap from $MIRROR (this host's apt source; MIRROR overrides)"
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    echo "debootstrap bookworm (minbase with $PACKAGES) into $rootfs ..."
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >/dev/null
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

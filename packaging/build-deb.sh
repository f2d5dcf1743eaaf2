#!/usr/bin/env bash
# Builds the Debian package of keyraft with dpkg-deb (no other tool needed):
# the binary, the systemd unit, an example configuration, the alert rules,
# the Grafana dashboard and the README; maintainer scripts that create the
# `keyraft` system user and its directories.
#
#   packaging/build-deb.sh                 # release build -> target/debian/
#   PROFILE=debug packaging/build-deb.sh   # reuse a debug build (CI)
#
# Prints the path of the .deb it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-release}
# The same packages as localnet/docker/build-image.sh builds, so that one
# build (one feature resolution) serves both.
if [ "$PROFILE" = release ]; then
    cargo build --release -p keyraft -p localnet >&2
else
    cargo build -p keyraft -p localnet >&2
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
out=target/debian
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
chmod 0755 "$root"

install -d "$root"/DEBIAN "$root"/usr/bin "$root"/lib/systemd/system \
    "$root"/etc/keyraft "$root"/usr/share/doc/keyraft "$root"/usr/share/keyraft
# Stripped: the build keeps debug info, the package does not need it.
strip -o "$root"/usr/bin/keyraft target/"$PROFILE"/keyraft
chmod 0755 "$root"/usr/bin/keyraft
install -m 0644 packaging/keyraft.service "$root"/lib/systemd/system/keyraft.service
install -m 0640 packaging/keyraft.toml "$root"/etc/keyraft/keyraft.toml
install -m 0644 README.md "$root"/usr/share/doc/keyraft/README.md
install -m 0644 docs/*.md "$root"/usr/share/doc/keyraft/
install -m 0644 alerts/keyraft.rules.yml dashboards/keyraft.json "$root"/usr/share/keyraft/
for s in postinst prerm postrm; do
    install -m 0755 packaging/debian/$s "$root"/DEBIAN/$s
done
echo /etc/keyraft/keyraft.toml > "$root"/DEBIAN/conffiles
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root"/DEBIAN/control <<CONTROL
Package: keyraft
Version: $version
Architecture: $arch
Maintainer: keyraft developers <keyraft@localhost>
Depends: libc6 (>= 2.36), passwd
Recommends: nftables
Installed-Size: $size
Section: net
Priority: optional
Description: Raft-coordinated failover for blockchain validators
 keyraft runs on each of the two or three hosts of one validator. The
 coordinators form a Raft cluster; only the leader links the validator key
 into its node and validates, under a lease enforced by a guard process, so
 that a failed host is fenced and a standby takes over in about a second
 without two hosts ever signing. It can also act as a CometBFT remote signer
 whose every signature is committed through Raft.
CONTROL
mkdir -p "$out"
deb="$out/keyraft_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >&2
echo "$deb"

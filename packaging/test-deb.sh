#!/usr/bin/env bash
# Installs the Debian package into the Debian image the Docker suite builds
# (localnet/docker/build-image.sh makes keyraft-base:bookworm, with systemd)
# and checks what a user gets: the binary, the unit (systemd-analyze
# verify), the user and directories, a clear refusal while unconfigured,
# and a removal that keeps the data dir.
#
#   PROFILE=debug packaging/test-deb.sh    # CI: reuse the debug build
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BASE:-keyraft-base:bookworm}
deb=$(PROFILE=${PROFILE:-release} packaging/build-deb.sh)
echo "package: $deb ($(du -h "$deb" | cut -f1))"
docker run --rm -v "$PWD/$deb:/tmp/keyraft.deb:ro" "$BASE" sh -euc '
    command -v systemd-analyze >/dev/null || {
        echo "no systemd-analyze in the image: docker rmi '"$BASE"' and run localnet/docker/build-image.sh" >&2
        exit 1
    }
    dpkg -i /tmp/keyraft.deb
    keyraft --version
    keyraft run --help | grep -q -- "--timing"
    systemd-analyze verify /lib/systemd/system/keyraft.service
    echo "systemd-analyze verify: ok"
    id keyraft
    test "$(stat -c %a:%U /var/lib/keyraft)" = 700:keyraft
    test "$(stat -c %a:%U:%G /etc/keyraft/keyraft.toml)" = 640:root:keyraft
    # Unconfigured (the example has no validator and no certificates): one
    # line on stderr, exit code 2, as the service would see it.
    set +e
    err=$(setpriv --reuid keyraft --regid keyraft --clear-groups \
        keyraft run --config /etc/keyraft/keyraft.toml 2>&1 >/dev/null)
    code=$?
    set -e
    echo "unconfigured start: exit $code: $err"
    test "$code" = 2 && test "$(printf "%s\n" "$err" | wc -l)" = 1
    touch /var/lib/keyraft/raft-log-stand-in
    dpkg --purge keyraft
    test -f /var/lib/keyraft/raft-log-stand-in
    test ! -e /usr/bin/keyraft
    test ! -e /lib/systemd/system/keyraft.service
    echo "purged; data dir kept"
'
echo "package test passed"

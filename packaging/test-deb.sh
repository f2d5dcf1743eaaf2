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
    # The admin socket: mode 0660, group keyraft-admin; an operator in that
    # group drives the cluster, another user cannot even read its status.
    getent group keyraft-admin
    install -d -m 0755 -o keyraft -g keyraft /run/keyraft
    setpriv --reuid keyraft --regid keyraft --groups "$(getent group keyraft-admin | cut -d: -f3)" \
        keyraft run --node-id 1 --peer 2=127.0.0.1:9 --listen 127.0.0.1:7700 --insecure --witness \
        --admin-group keyraft-admin --data-dir /tmp/witness-data 2>/tmp/witness.log &
    pid=$!
    for _ in $(seq 100); do [ -S /run/keyraft/admin.sock ] && break; sleep 0.1; done
    [ -S /run/keyraft/admin.sock ] || { cat /tmp/witness.log; exit 1; }
    test "$(stat -c %a:%U:%G /run/keyraft/admin.sock)" = 660:keyraft:keyraft-admin
    useradd --no-create-home --groups keyraft-admin alice
    setpriv --reuid alice --regid alice --init-groups keyraft status --json >/dev/null
    echo "an operator in keyraft-admin: status ok"
    set +e
    err=$(setpriv --reuid nobody --regid nogroup --clear-groups keyraft pause 2>&1)
    code=$?
    set -e
    echo "another user: pause: exit $code: $err"
    test "$code" = 1 && printf "%s" "$err" | grep -q "Permission denied"
    kill "$pid"; wait "$pid" || true
    touch /var/lib/keyraft/raft-log-stand-in
    dpkg --purge keyraft
    test -f /var/lib/keyraft/raft-log-stand-in
    test ! -e /usr/bin/keyraft
    test ! -e /lib/systemd/system/keyraft.service
    echo "purged; data dir kept"
'
echo "package test passed"

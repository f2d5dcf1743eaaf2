#!/usr/bin/env bash
# Installs tmkms (the remote signer of iqlusion, from crates.io) for the
# CometBFT interop tests and benchmarks, unless the pinned version is
# already on PATH or in ~/.cargo/bin. About three minutes on a 2-core host
# with an empty cargo cache. softsign is its software key backend; no HSM
# libraries are needed.
set -euo pipefail
version=0.15.0
for t in "${TMKMS:-}" "$(command -v tmkms || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/tmkms"; do
    if [ -n "$t" ] && [ -x "$t" ] && [ "$("$t" version 2>/dev/null)" = "$version" ]; then
        echo "tmkms $version: $t"
        exit 0
    fi
done
cargo install tmkms --version "$version" --features softsign --locked
echo "tmkms $version: $(command -v tmkms || echo "${CARGO_HOME:-$HOME/.cargo}/bin/tmkms")"

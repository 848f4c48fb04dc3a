#!/bin/sh
# Install the Debian packages cima's tests, demo and benchmarks use, if any is missing.
# Idempotent: does nothing (and needs no network) when everything is there.
set -eu
PKGS="tpm2-tools swtpm swtpm-tools libtss2-dev pkg-config gcc containerd runc busybox-static qemu-system-x86 ovmf ima-evm-utils linux-kbuild-6.1 e2fsprogs postgresql nghttp2-client"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# A Python that can make virtual environments (Debian's python3 needs python3-venv).
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing="$missing python3 python3-venv python3-dev"
fi
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing Debian packages:$missing (run as root, or install them)" >&2
        exit 1
    fi
    echo "installing Debian packages:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

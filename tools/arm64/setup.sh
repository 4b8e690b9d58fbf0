#!/usr/bin/env bash
# One-time ARM64 cross toolchain setup (Debian 12 x86_64 host, root), after
# shared/docs/arm64-toolchain.md. Idempotent: every step is skipped when already done and
# `apt-get update` runs at most once per invocation (only when something must be installed).
#
# Installs: Debian's rustc-web/cargo-web 1.96 with its aarch64 std and clippy (lints the
# aarch64-only code: `cargo +debian-web clippy --target aarch64-unknown-linux-gnu`), the aarch64
# cross gcc and libc, qemu-user; links the Debian compiler into rustup as the `debian-web` toolchain.
# With PYARM64=1 (set by .ci/arm64.sh) it also unpacks Debian's arm64 CPython 3.11 into
# /opt/pyarm64 for importing the aarch64 wheel under qemu.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
PKGS=(rustc-web cargo-web libstd-rust-web-dev:arm64 rust-web-clippy gcc-aarch64-linux-gnu
      libc6-dev-arm64-cross qemu-user)
PYPKGS=(python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64
        libexpat1:arm64 libssl3:arm64)
PYROOT=${PYROOT:-/opt/pyarm64}

updated=0
apt_update_once() {
    if [ "$updated" = 0 ]; then
        echo "setup: apt-get update"
        apt-get update -qq
        updated=1
    fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "setup: dpkg --add-architecture arm64"
    dpkg --add-architecture arm64
fi

missing=()
for p in "${PKGS[@]}"; do installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
    apt_update_once
    echo "setup: apt-get install ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
else
    echo "setup: apt packages present"
fi

# rustc-web and libstd-rust-web-dev:arm64 must be the very same version (E0514 otherwise).
v_host=$(dpkg-query -W -f='${Version}' rustc-web)
v_std=$(dpkg-query -W -f='${Version}' libstd-rust-web-dev:arm64)
if [ "$v_host" != "$v_std" ]; then
    echo "setup: rustc-web $v_host != libstd-rust-web-dev:arm64 $v_std; upgrading both"
    apt_update_once
    apt-get install -y -qq --no-install-recommends rustc-web libstd-rust-web-dev:arm64 >/dev/null
fi

if ! rustup toolchain list | grep -q '^debian-web'; then
    echo "setup: rustup toolchain link debian-web /usr"
    rustup toolchain link debian-web /usr
else
    echo "setup: rustup toolchain debian-web linked"
fi

if [ "${PYARM64:-0}" = 1 ]; then
    if [ ! -x "$PYROOT/usr/bin/python3.11" ]; then
        apt_update_once
        d=$(mktemp -d); chmod 777 "$d"   # apt-get download runs as _apt
        echo "setup: unpacking arm64 CPython 3.11 into $PYROOT"
        (cd "$d" && apt-get download -qq "${PYPKGS[@]}")
        mkdir -p "$PYROOT"
        for f in "$d"/*.deb; do dpkg -x "$f" "$PYROOT"; done
        rm -rf "$d"
    else
        echo "setup: arm64 CPython present in $PYROOT"
    fi
fi

echo "setup: $(rustc +debian-web --version) ; $(aarch64-linux-gnu-gcc --version | head -1) ; $(qemu-aarch64 --version | head -1)"

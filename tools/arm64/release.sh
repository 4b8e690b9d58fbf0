#!/usr/bin/env bash
# Release artifacts for ARM64 Linux (aarch64-unknown-linux-gnu), cross-built on an x86_64 Debian 12
# host with Debian's rustc (tools/arm64/setup.sh installs it):
#   dist/sparselm-cli-aarch64-unknown-linux-gnu.tar.gz   the native CLI + README + LICENSE note
#   dist/sparselm-<version>-cp310-abi3-manylinux_2_34_aarch64.whl   one wheel for CPython >= 3.10
# Release profile (LTO, codegen-units = 1). Runtime dispatch picks neon / neon-dotprod at
# start-up, so the same binaries run on Cortex-A72 (Pi 4) and Cortex-A76 (Pi 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=aarch64-unknown-linux-gnu
TDIR=${CARGO_TARGET_DIR:-$(pwd)/target}
export CARGO_TERM_COLOR=never

bash tools/arm64/setup.sh
command -v maturin >/dev/null || python3 -m pip install --quiet "maturin>=1.7,<2"
mkdir -p dist

cargo +debian-web build --release --locked -p sparselm-cli --target $TARGET
bin=$TDIR/$TARGET/release/sparselm
aarch64-linux-gnu-strip -o "$TDIR/$TARGET/release/sparselm.stripped" "$bin"
version=$(qemu-aarch64 "$TDIR/$TARGET/release/sparselm.stripped" --version)
echo "release: $version"

stage=$(mktemp -d)
name=sparselm-cli-$TARGET
mkdir "$stage/$name"
cp "$TDIR/$TARGET/release/sparselm.stripped" "$stage/$name/sparselm"
cat >"$stage/$name/README.txt" <<TXT
$version for ARM64 Linux ($TARGET), glibc >= 2.34 (Debian 12+, Ubuntu 22.04+, RHEL 9+,
Raspberry Pi OS bookworm 64-bit).

  ./sparselm generate MODEL_DIR "Once upon a time"
  ./sparselm info MODEL_DIR          # shows the kernel tier chosen for this CPU

Kernel tiers are chosen at start-up: "neon-dotprod" on CPUs with the dot-product extension
(Cortex-A76 / Raspberry Pi 5 and newer), "neon" otherwise (Cortex-A72 / Raspberry Pi 4).
Override with SPARSELM_KERNEL=scalar|neon|neon-dotprod. License: Apache-2.0.
TXT
tar -C "$stage" -czf "dist/$name.tar.gz" "$name"
rm -rf "$stage"

RUSTUP_TOOLCHAIN=debian-web maturin build --release --locked --target $TARGET --out dist
ls -l dist/"$name".tar.gz dist/*aarch64*.whl

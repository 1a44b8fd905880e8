#!/usr/bin/env bash
# Cross-builds for an ARM gateway with Debian's cross toolchains (no Docker needed).
#
#   cross/build.sh [TARGET]                 release build of the edge-agent binary
#   cross/build.sh TARGET -- CARGO-ARGS...  any cargo command for TARGET, e.g.
#                                           cross/build.sh aarch64-unknown-linux-gnu -- test -p edge-agent --lib
#
# TARGET: aarch64-unknown-linux-gnu (default) or armv7-unknown-linux-gnueabihf.
# The binary lands in ${CARGO_TARGET_DIR:-target}/TARGET/release/edge-agent.
# When qemu-user-static is installed, cargo test/run for TARGET execute under qemu.
set -euo pipefail

readonly REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target="${1:-aarch64-unknown-linux-gnu}"
shift $(($# > 0 ? 1 : 0))

case "$target" in
  aarch64-unknown-linux-gnu)
    gnu=aarch64-linux-gnu qemu=qemu-aarch64-static
    packages="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
  armv7-unknown-linux-gnueabihf)
    gnu=arm-linux-gnueabihf qemu=qemu-arm-static
    packages="gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" ;;
  -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *)
    echo "cross/build.sh: unsupported target '$target': use aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf" >&2
    exit 64 ;;
esac

if ! command -v "$gnu-gcc" >/dev/null; then
  echo "cross/build.sh: $gnu-gcc not found: apt-get install $packages (./tests/run.sh installs the aarch64 one)" >&2
  exit 1
fi
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$target"; then
  echo "cross/build.sh: the Rust standard library for $target is missing: rustup target add $target" >&2
  exit 1
fi

# cargo reads CARGO_TARGET_<TRIPLE>_LINKER; the cc crate (rusqlite's bundled SQLite, zstd, the TLS
# crypto provider) reads CC_<triple> and AR_<triple>.
triple_upper="$(tr 'a-z-' 'A-Z_' <<<"$target")"
triple_lower="${target//-/_}"
export "CARGO_TARGET_${triple_upper}_LINKER=$gnu-gcc"
export "CC_${triple_lower}=$gnu-gcc"
export "AR_${triple_lower}=$gnu-ar"
if command -v "$gnu-g++" >/dev/null; then
  export "CXX_${triple_lower}=$gnu-g++"
fi
if command -v "$qemu" >/dev/null; then
  export "CARGO_TARGET_${triple_upper}_RUNNER=$qemu -L /usr/$gnu"
fi

cd "$REPO_ROOT"
if (($# > 0)); then
  [[ "$1" == "--" ]] && shift
  exec cargo "$@" --target "$target"
fi
cargo build --release -p edge-agent --bin edge-agent --target "$target"
echo "built ${CARGO_TARGET_DIR:-$REPO_ROOT/target}/$target/release/edge-agent"

#!/usr/bin/env bash
# The ARM smoke test: cross-builds edge-agent for aarch64, runs `edge-agent --version` under
# qemu-aarch64-static, then builds the agent's unit tests for aarch64 and runs them under qemu.
# It uses the dev profile, so the binary and the unit tests share one build of the dependencies
# (a release build, `cross/build.sh`, compiles them all again with LTO: that is for packaging).
# Needs: gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user-static (./tests/run.sh installs them)
# and `rustup target add aarch64-unknown-linux-gnu`.
set -euo pipefail

readonly REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly TARGET=aarch64-unknown-linux-gnu
readonly QEMU=(qemu-aarch64-static -L /usr/aarch64-linux-gnu)
target_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"

if ! command -v qemu-aarch64-static >/dev/null; then
  echo "qemu-smoke.sh: qemu-aarch64-static not found: apt-get install qemu-user-static (./tests/run.sh installs it)" >&2
  exit 1
fi

echo "== build for $TARGET"
"$REPO_ROOT/cross/build.sh" "$TARGET" -- build -p edge-agent --bin edge-agent
binary="$target_dir/$TARGET/debug/edge-agent"
file_type="$(od -An -tx1 -j18 -N2 "$binary" | tr -d ' \n')"
if [[ "$file_type" != b700 ]]; then
  echo "qemu-smoke.sh: $binary is not an aarch64 ELF (e_machine bytes $file_type, want b7 00)" >&2
  exit 1
fi

echo "== edge-agent --version under qemu"
version="$(cd "$REPO_ROOT" && cargo pkgid -p edge-agent | sed 's/.*[#@]//')"
output="$("${QEMU[@]}" "$binary" --version)"
echo "$output"
if [[ "$output" != "edge-agent $version" ]]; then
  echo "qemu-smoke.sh: expected 'edge-agent $version', got '$output'" >&2
  exit 1
fi

echo "== edge-agent unit tests for $TARGET under qemu"
# build.sh sets cargo's runner for the target to qemu, so the test binary runs emulated.
"$REPO_ROOT/cross/build.sh" "$TARGET" -- test -p edge-agent --lib
echo "qemu-smoke.sh: ok"

#!/usr/bin/env bash
# The ARM smoke test: cross-builds edge-agent for one ARM target, runs `edge-agent --version` under
# qemu-user, wraps that build in the target's Debian package (packaging/build-deb.sh) and checks
# the package's fields and files, and that its binary runs and accepts its sensor map under qemu;
# then builds the agent's unit tests for that target and runs them under qemu.
#
#   cross/qemu-smoke.sh [TARGET]    TARGET: aarch64-unknown-linux-gnu (default) or
#                                   armv7-unknown-linux-gnueabihf
#
# It uses the dev profile, so the binary and the unit tests share one build of the dependencies
# (a release build, `cross/build.sh`, compiles them all again with LTO: that is for packaging).
# Needs the target's Debian cross gcc and libc (gcc-aarch64-linux-gnu libc6-dev-arm64-cross, or
# gcc-arm-linux-gnueabihf libc6-dev-armhf-cross), qemu-user-static, and `rustup target add TARGET`;
# ./tests/run.sh installs all of them.
set -euo pipefail

readonly REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly TARGET="${1:-aarch64-unknown-linux-gnu}"
case "$TARGET" in
  # e_machine in the ELF header (bytes 18-19, little-endian): 0xb7 aarch64, 0x28 ARM.
  aarch64-unknown-linux-gnu) gnu=aarch64-linux-gnu qemu=qemu-aarch64-static machine=b700 ;;
  armv7-unknown-linux-gnueabihf) gnu=arm-linux-gnueabihf qemu=qemu-arm-static machine=2800 ;;
  *)
    echo "qemu-smoke.sh: unsupported target '$TARGET': use aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf" >&2
    exit 64 ;;
esac
readonly QEMU=("$qemu" -L "/usr/$gnu")
target_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"

if ! command -v "$qemu" >/dev/null; then
  echo "qemu-smoke.sh: $qemu not found: apt-get install qemu-user-static (./tests/run.sh installs it)" >&2
  exit 1
fi

echo "== build for $TARGET"
"$REPO_ROOT/cross/build.sh" "$TARGET" -- build -p edge-agent --bin edge-agent
binary="$target_dir/$TARGET/debug/edge-agent"
file_type="$(od -An -tx1 -j18 -N2 "$binary" | tr -d ' \n')"
if [[ "$file_type" != "$machine" ]]; then
  echo "qemu-smoke.sh: $binary is not an ELF for $TARGET (e_machine bytes $file_type, want $machine)" >&2
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

echo "== Debian package of that build, installed into a folder and run under qemu"
case "$TARGET" in
  aarch64-unknown-linux-gnu) deb_arch=arm64 ;;
  armv7-unknown-linux-gnueabihf) deb_arch=armhf ;;
esac
deb_dir="$(mktemp -d -t qemu-smoke-deb.XXXXXX)"
trap 'rm -rf "$deb_dir"' EXIT
# The dev build above: the package's layout does not depend on the profile.
"$REPO_ROOT/packaging/build-deb.sh" "$deb_arch" --profile dev --out "$deb_dir/out" >/dev/null
deb="$deb_dir/out/edge-agent_${version}-1_${deb_arch}.deb"
[[ -f "$deb" ]] || { echo "qemu-smoke.sh: build-deb.sh made no $deb" >&2; exit 1; }
for field in Package:edge-agent "Architecture:$deb_arch" "Version:$version-1"; do
  got="$(dpkg-deb -f "$deb" "${field%%:*}")"
  if [[ "$got" != "${field#*:}" ]]; then
    echo "qemu-smoke.sh: $deb has ${field%%:*} '$got', want '${field#*:}'" >&2
    exit 1
  fi
done
dpkg-deb -x "$deb" "$deb_dir/root"
for path in usr/bin/edge-agent etc/edge-agent/agent.toml etc/default/edge-agent \
  usr/lib/systemd/system/edge-agent.service usr/share/doc/edge-agent/copyright; do
  [[ -f "$deb_dir/root/$path" ]] || { echo "qemu-smoke.sh: $deb does not install /$path" >&2; exit 1; }
done
packaged="$("${QEMU[@]}" "$deb_dir/root/usr/bin/edge-agent" --version)"
[[ "$packaged" == "edge-agent $version" ]] || {
  echo "qemu-smoke.sh: the packaged binary says '$packaged', want 'edge-agent $version'" >&2
  exit 1
}
validated="$("${QEMU[@]}" "$deb_dir/root/usr/bin/edge-agent" validate "$deb_dir/root/etc/edge-agent/agent.toml")"
echo "$validated"
[[ "$validated" == *": ok ("* ]] || {
  echo "qemu-smoke.sh: the packaged binary does not accept the packaged sensor map: $validated" >&2
  exit 1
}
echo "$deb_arch package ok: $(dpkg-deb -f "$deb" Depends)"

echo "== edge-agent unit tests for $TARGET under qemu"
# build.sh sets cargo's runner for the target to qemu, so the test binary runs emulated.
"$REPO_ROOT/cross/build.sh" "$TARGET" -- test -p edge-agent --lib
echo "qemu-smoke.sh: $TARGET ok"

#!/usr/bin/env bash
# Builds the edge-agent Debian packages with dpkg-deb alone (no cargo-deb, no debhelper).
#
#   packaging/build-deb.sh [OPTIONS] [ARCH...]
#
# ARCH: amd64 (native build), arm64 (aarch64-unknown-linux-gnu) and armhf
# (armv7-unknown-linux-gnueabihf), both through cross/build.sh, or all (the default): amd64, plus
# each ARM architecture whose cross toolchain is installed; the others are listed with what to
# install. An ARM architecture named explicitly fails when its toolchain is missing.
#
# Options:
#   --profile NAME  cargo profile of the binary (default: release, the LTO'd, stripped build
#                   shipped to gateways). tests/tests/packaging.rs uses `--profile dev`.
#   --out DIR       where the .deb files go (default: ${CARGO_TARGET_DIR:-target}/debian)
#
# The package installs /usr/bin/edge-agent, the example sensor map as the conffile
# /etc/edge-agent/agent.toml, /etc/default/edge-agent (conffile, 0600) for AWS credentials, and a
# hardened systemd unit running as the system user `edge-agent` created by postinst.
set -euo pipefail

readonly REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly PACKAGING="$REPO_ROOT/packaging"
readonly TARGET_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
readonly EXAMPLE_MAP="$REPO_ROOT/config-examples/agent/line1-gateway.toml"
# Where the packaged config keeps the buffer: the unit's StateDirectory, the one place
# ProtectSystem=strict lets the agent write.
readonly BUFFER_PATH=/var/lib/edge-agent/buffer.db
readonly DEB_REVISION=1

die() {
  echo "build-deb.sh: $*" >&2
  exit 1
}

profile=release
out_dir="$TARGET_DIR/debian"
arches=()
while (($# > 0)); do
  case "$1" in
    --profile) [[ $# -ge 2 ]] || die "--profile needs a cargo profile name"; profile="$2"; shift 2 ;;
    --out) [[ $# -ge 2 ]] || die "--out needs a directory"; out_dir="$2"; shift 2 ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    amd64 | arm64 | armhf | all) arches+=("$1"); shift ;;
    x86_64-unknown-linux-gnu) arches+=(amd64); shift ;;
    aarch64-unknown-linux-gnu) arches+=(arm64); shift ;;
    armv7-unknown-linux-gnueabihf) arches+=(armhf); shift ;;
    *) echo "build-deb.sh: unknown argument '$1': architectures are amd64, arm64, armhf, all (try --help)" >&2; exit 64 ;;
  esac
done
((${#arches[@]} > 0)) || arches=(all)

for tool in "${CARGO:-cargo}" dpkg-deb readelf md5sum; do
  command -v "$tool" >/dev/null || die "$tool not found (dpkg-deb: apt-get install dpkg; readelf: apt-get install binutils)"
done

# cargo puts the `dev` profile in debug/, every other profile in a folder named after it.
profile_dir="$profile"
[[ "$profile" == dev ]] && profile_dir=debug

triple_of() {
  case "$1" in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    armhf) echo armv7-unknown-linux-gnueabihf ;;
  esac
}

# Prints what is missing to cross-build ARCH, or nothing when the toolchain is complete.
missing_toolchain() {
  local arch="$1" gnu packages triple
  triple="$(triple_of "$arch")"
  case "$arch" in
    amd64)
      [[ "$(uname -m)" == x86_64 ]] || echo "amd64 is built natively, and this machine is $(uname -m)"
      return ;;
    arm64) gnu=aarch64-linux-gnu packages="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
    armhf) gnu=arm-linux-gnueabihf packages="gcc-arm-linux-gnueabihf libc6-dev-armhf-cross" ;;
  esac
  local missing=()
  command -v "$gnu-gcc" >/dev/null || missing+=("$gnu-gcc (apt-get install $packages)")
  if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$triple"; then
    missing+=("the Rust standard library for $triple (rustup target add $triple)")
  fi
  ((${#missing[@]} == 0)) || { local IFS=';'; echo "${missing[*]}" | sed 's/;/; /g'; }
}

build_binary() {
  local arch="$1" triple
  triple="$(triple_of "$arch")"
  if [[ "$arch" == amd64 ]]; then
    (cd "$REPO_ROOT" && "${CARGO:-cargo}" build --profile "$profile" -p edge-agent --bin edge-agent) >&2
    echo "$TARGET_DIR/$profile_dir/edge-agent"
  else
    "$REPO_ROOT/cross/build.sh" "$triple" -- build --profile "$profile" -p edge-agent --bin edge-agent >&2
    echo "$TARGET_DIR/$triple/$profile_dir/edge-agent"
  fi
}

# Depends from the binary itself: every shared library it links must come from a known package,
# and libc6 must be at least the newest glibc symbol version it uses. Works for foreign
# architectures, which dpkg-shlibdeps does not without that architecture's libc6 installed.
compute_depends() {
  local binary="$1" lib deps=() glibc
  while read -r lib; do
    case "$lib" in
      libc.so.6 | libm.so.6 | libdl.so.2 | libpthread.so.0 | librt.so.1 | ld-linux*.so.* | ld-linux.so.*) ;;
      libgcc_s.so.1) deps+=("libgcc-s1") ;;
      *) die "$binary links $lib, which build-deb.sh cannot map to a Debian package: add it to compute_depends" ;;
    esac
  done < <(readelf -d -W "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
  glibc="$(readelf -V -W "$binary" | grep -o 'Name: GLIBC_[0-9.]*' | sed 's/Name: GLIBC_//' | sort -V | tail -n1)"
  [[ -n "$glibc" ]] || die "$binary references no GLIBC_ symbol version: is it a glibc binary?"
  local IFS=','
  # procps: /bin/kill, which the unit's ExecReload sends SIGHUP with.
  echo "libc6 (>= $glibc)${deps[*]:+, ${deps[*]}}, adduser, procps" | sed 's/,\([^ ]\)/, \1/g'
}

# The example sensor map with the buffer in the unit's state directory.
packaged_config() {
  awk -v path="$BUFFER_PATH" '
    /^\[/ { section = $0 }
    section == "[buffer]" && /^path[[:space:]]*=/ { print "path = \"" path "\""; done = 1; next }
    { print }
    END { if (!done) exit 3 }
  ' "$EXAMPLE_MAP" || die "$EXAMPLE_MAP has no path key under [buffer]: the packaged config needs one"
}

package() {
  local arch="$1" binary="$2" version stage deb
  version="$(cd "$REPO_ROOT" && "${CARGO:-cargo}" pkgid -p edge-agent | sed 's/.*[#@]//')-$DEB_REVISION"
  [[ -x "$binary" ]] || die "$binary was not built"
  stage="$WORK/$arch"
  rm -rf "$stage"

  install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/etc/edge-agent" "$stage/etc/default" \
    "$stage/usr/lib/systemd/system" "$stage/usr/share/doc/edge-agent"
  install -m 0755 "$binary" "$stage/usr/bin/edge-agent"
  packaged_config >"$stage/etc/edge-agent/agent.toml"
  chmod 0644 "$stage/etc/edge-agent/agent.toml"
  install -m 0600 "$PACKAGING/etc-default" "$stage/etc/default/edge-agent"
  install -m 0644 "$PACKAGING/edge-agent.service" "$stage/usr/lib/systemd/system/edge-agent.service"
  install -m 0644 "$PACKAGING/copyright" "$stage/usr/share/doc/edge-agent/copyright"
  local script
  for script in postinst prerm postrm; do
    install -m 0755 "$PACKAGING/debian/$script" "$stage/DEBIAN/$script"
  done
  printf '%s\n' /etc/default/edge-agent /etc/edge-agent/agent.toml >"$stage/DEBIAN/conffiles"
  (cd "$stage" && find usr -type f -print0 | sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
  chmod 0644 "$stage/DEBIAN/conffiles" "$stage/DEBIAN/md5sums"

  local installed_size depends
  installed_size="$(du -sk --apparent-size --exclude=DEBIAN "$stage" | cut -f1)"
  depends="$(compute_depends "$binary")"
  cat >"$stage/DEBIAN/control" <<CONTROL
Package: edge-agent
Version: $version
Architecture: $arch
Maintainer: Plantline developers <plantline@example.invalid>
Installed-Size: $installed_size
Depends: $depends
Section: net
Priority: optional
Homepage: https://example.invalid/plantline
Description: Plantline edge agent: PLC readings to S3, exactly once
 Polls PLCs and meters over Modbus TCP and sensors over MQTT, commits every
 reading to a durable SQLite buffer and uploads Parquet batches to S3. Runs
 as the systemd service edge-agent under its own user; the sensor map is
 /etc/edge-agent/agent.toml.
CONTROL
  chmod 0644 "$stage/DEBIAN/control"

  # Same commit, same timestamps inside the package.
  local epoch="${SOURCE_DATE_EPOCH:-$(git -C "$REPO_ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}"
  find "$stage" -exec touch -h -d "@$epoch" {} +

  mkdir -p "$out_dir"
  deb="$out_dir/edge-agent_${version}_${arch}.deb"
  SOURCE_DATE_EPOCH="$epoch" dpkg-deb --build --root-owner-group "$stage" "$deb" >&2
  echo "$deb"
}

WORK="$(mktemp -d -t edge-agent-deb.XXXXXX)"
readonly WORK
trap 'rm -rf "$WORK"' EXIT

explicit=()
skipped=()
for arch in "${arches[@]}"; do
  if [[ "$arch" == all ]]; then
    for candidate in amd64 arm64 armhf; do
      reason="$(missing_toolchain "$candidate")"
      if [[ -z "$reason" ]]; then
        explicit+=("$candidate")
      elif [[ "$candidate" == amd64 ]]; then
        die "$reason"
      else
        skipped+=("$candidate: missing $reason")
      fi
    done
  else
    reason="$(missing_toolchain "$arch")"
    [[ -z "$reason" ]] || die "cannot build $arch: missing $reason"
    explicit+=("$arch")
  fi
done

built=()
for arch in $(printf '%s\n' "${explicit[@]}" | awk '!seen[$0]++'); do
  echo "build-deb.sh: building edge-agent for $arch ($(triple_of "$arch"), profile $profile)" >&2
  binary="$(build_binary "$arch")"
  built+=("$(package "$arch" "$binary")")
done

for deb in "${built[@]}"; do
  echo "built $deb"
done
for line in "${skipped[@]}"; do
  echo "skipped $line" >&2
done

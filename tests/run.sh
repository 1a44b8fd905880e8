#!/usr/bin/env bash
# The one test command: installs whatever is missing on a Debian 12 machine (as root, or with sudo),
# then runs every check and test of the workspace, the ARM cross build and its qemu smoke test.
#
#   ./tests/run.sh                 install what is missing, then run everything
#   ./tests/run.sh --install-only  only install (Debian packages, Python venvs, node peers, Rust targets)
#   ./tests/run.sh --skip-install  only run (the machine is already set up)
#
# Environment:
#   PLANTLINE_CACHE   cache folder for the venvs, node peers and the build (default ~/.cache/plantline)
#   CARGO_TARGET_DIR  build folder (default $PLANTLINE_CACHE/target, so repeated runs reuse the build)
#   PLANTLINE_PYTHON  interpreter the venvs are made from (default python3; needs >= 3.11)
set -euo pipefail

readonly REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly CACHE="${PLANTLINE_CACHE:-$HOME/.cache/plantline}"
readonly PYTHON="${PLANTLINE_PYTHON:-python3}"
readonly ARM_TARGETS=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
# Debian packages the tests use: the MQTT broker, the pty pair for Modbus RTU, the aarch64 and armhf
# toolchains and user-mode qemu for the cross smoke tests, systemd-analyze for the packaged unit, headless
# Chromium for the status page test.
readonly DEBIAN_PACKAGES=(mosquitto socat qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross
  gcc-arm-linux-gnueabihf libc6-dev-armhf-cross systemd chromium)

mode=all
for arg in "$@"; do
  case "$arg" in
    --install-only) mode=install ;;
    --skip-install) mode=test ;;
    -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$arg' (try --help)" >&2; exit 64 ;;
  esac
done

die() {
  printf '\nrun.sh: %s\n' "$*" >&2
  exit 1
}

section() {
  printf '\n\033[1m==== %s ====\033[0m\n' "$*"
}

# Step bookkeeping: every step is timed; a failed step does not stop the run, so one run reports
# every broken check, and the script exits non-zero at the end.
declare -a summary=()
failures=0
readonly LOG_DIR="$(mktemp -d -t plantline-run.XXXXXX)"
trap 'rm -rf "$LOG_DIR"' EXIT

step() {
  local name="$1"
  shift
  section "$name"
  local started=$SECONDS status=0
  "$@" 2>&1 | tee "$LOG_DIR/step-${#summary[@]}.log" || status=$?
  local elapsed=$((SECONDS - started))
  if ((status == 0)); then
    printf '\n---- %s: ok (%ds)\n' "$name" "$elapsed"
    summary+=("$(printf 'ok    %5ds  %s' "$elapsed" "$name")")
  else
    printf '\n---- %s: FAILED with status %d (%ds)\n' "$name" "$status" "$elapsed"
    summary+=("$(printf 'FAIL  %5ds  %s' "$elapsed" "$name")")
    failures=$((failures + 1))
  fi
}

as_root() {
  if ((EUID == 0)); then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "'$*' needs root: run ./tests/run.sh as root or install sudo"
  fi
}

install_debian_packages() {
  command -v dpkg-query >/dev/null && command -v apt-get >/dev/null ||
    die "apt-get not found: this script installs on Debian 12; elsewhere install ${DEBIAN_PACKAGES[*]} and python3 with venv by hand, then run ./tests/run.sh --skip-install"
  local missing=() package
  local wanted=("${DEBIAN_PACKAGES[@]}")
  # A Python without ensurepip cannot make venvs; on Debian that is the python3-venv package.
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    wanted+=(python3-venv)
  fi
  # kinesalite runs on node; a node installed otherwise (nvm, NodeSource) is used as it is.
  if ! command -v node >/dev/null; then
    wanted+=(nodejs npm)
  fi
  for package in "${wanted[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$package")
    fi
  done
  if ((${#missing[@]} == 0)); then
    echo "all present: ${wanted[*]}"
    return
  fi
  echo "installing: ${missing[*]}"
  # Other jobs may hold the dpkg lock for a while (unattended upgrades, a parallel install).
  as_root apt-get -o DPkg::Lock::Timeout=600 update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    --no-install-recommends "${missing[@]}"
}

# Creates or updates one venv. The hash of the requirements file and of the interpreter's version
# is stored in the venv; pip runs again only when it changed. The marker is written last, so an
# interrupted install is resumed by the next run.
ensure_venv() {
  local name="$1" requirements="$2"
  local venv="$CACHE/venv/$name" marker="$CACHE/venv/$name/.plantline-requirements.sha256"
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found: install python3 (>= 3.11) or set PLANTLINE_PYTHON=/path/to/python3"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "$("$PYTHON" --version 2>&1) is too old: fakesnow needs Python >= 3.11; set PLANTLINE_PYTHON=/path/to/python3.11"
  local wanted
  wanted="$({ sha256sum "$requirements" | cut -d' ' -f1; "$PYTHON" --version; } | sha256sum | cut -d' ' -f1)"
  if [[ -x "$venv/bin/python" ]] && ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    echo "$venv: interpreter is broken (Python moved or was upgraded), recreating"
    rm -rf "$venv"
  fi
  if [[ -x "$venv/bin/python" && -f "$marker" && "$(cat "$marker")" == "$wanted" ]]; then
    echo "$venv: up to date with $(basename "$requirements")"
    return
  fi
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "$venv: creating"
    mkdir -p "$(dirname "$venv")"
    "$PYTHON" -m venv "$venv" || die "cannot create a venv with $PYTHON: install python3-venv (apt-get install python3-venv)"
  fi
  echo "$venv: installing $(basename "$requirements")"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements"
  echo "$wanted" >"$marker"
  "$venv/bin/python" -m pip freeze --disable-pip-version-check | sed 's/^/  /'
}

# Installs a node peer's package-lock.json into $CACHE/node/<name> with `npm ci`, like ensure_venv:
# again only when the lock or node's major version changed, the marker written last.
ensure_node_peer() {
  local name="$1" source="$2"
  local target="$CACHE/node/$name" marker="$CACHE/node/$name/.plantline-lock.sha256"
  command -v node >/dev/null || die "node not found: install nodejs and npm (apt-get install nodejs npm), then rerun"
  command -v npm >/dev/null || die "npm not found: install npm (apt-get install npm), then rerun"
  local wanted
  wanted="$({ sha256sum "$source/package-lock.json" | cut -d' ' -f1; node --version | cut -d. -f1; } |
    sha256sum | cut -d' ' -f1)"
  if [[ -d "$target/node_modules" && -f "$marker" && "$(cat "$marker")" == "$wanted" ]]; then
    echo "$target: up to date with $source/package-lock.json"
    return
  fi
  echo "$target: npm ci ($(node --version), npm $(npm --version))"
  rm -f "$marker"
  mkdir -p "$target"
  cp "$source/package.json" "$source/package-lock.json" "$target/"
  (cd "$target" && npm ci --no-audit --no-fund --loglevel=error) ||
    die "npm ci failed in $target for $source/package-lock.json: is the npm registry reachable?"
  echo "$wanted" >"$marker"
  (cd "$target" && npm ls --depth=0)
}

install_rust_targets() {
  command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs), then rerun"
  if ! command -v rustup >/dev/null; then
    echo "rustup not found: assuming clippy, rustfmt and the ${ARM_TARGETS[*]} standard libraries are installed"
    return
  fi
  local installed
  installed="$(rustup component list --installed)"
  local component
  for component in clippy rustfmt; do
    grep -q "^$component" <<<"$installed" || rustup component add "$component"
  done
  local target targets
  targets="$(rustup target list --installed)"
  for target in "${ARM_TARGETS[@]}"; do
    if grep -qx "$target" <<<"$targets"; then
      echo "rust target $target present"
    else
      rustup target add "$target"
    fi
  done
}

check_tools() {
  local tool missing=()
  for tool in mosquitto socat chromium node qemu-aarch64-static qemu-arm-static aarch64-linux-gnu-gcc \
    arm-linux-gnueabihf-gcc cargo; do
    command -v "$tool" >/dev/null || [[ -x "/usr/sbin/$tool" ]] || missing+=("$tool")
  done
  ((${#missing[@]} == 0)) || die "missing tools: ${missing[*]}: run ./tests/run.sh without --skip-install (as root) to install them"
  echo "tools present; peers venv $PLANTLINE_PEERS_VENV, duckdb venv $PLANTLINE_DUCKDB_VENV"
}

# The agent's tree must carry one major of hyper and of rustls (two would double the binary's TLS
# and HTTP code on the gateway); the AWS SDK's default features would bring an old and a new stack.
check_agent_tree() {
  local dups
  dups="$(cargo tree -p edge-agent -e normal --target all --prefix none --format '{p}' |
    grep -E '^(hyper|rustls|h2) v' | awk '{print $1, $2}' | sort -u | awk '{print $1}' | uniq -d)"
  if [[ -n "$dups" ]]; then
    echo "edge-agent's dependency tree holds more than one version of: $dups"
    cargo tree -d -p edge-agent -e normal --target all | grep -E '^(hyper|rustls|h2) v' -A8
    return 1
  fi
  echo "one version each of hyper, h2 and rustls in edge-agent's tree"
  # The gateway binary's size goal (cross/README.md): the aws-lc crypto library and the regex
  # engine were its largest parts; ring and plain RUST_LOG pairs replaced them.
  local heavy
  heavy="$(cargo tree -p edge-agent -e normal --target all --prefix none --format '{p}' |
    grep -E '^(aws-lc-sys|aws-lc-rs|regex-automata|regex-syntax) v' | sort -u)"
  if [[ -n "$heavy" ]]; then
    echo "edge-agent's dependency tree holds crates kept out of the gateway binary for its size:"
    echo "$heavy"
    cargo tree -p edge-agent -e normal,features --target all -i "$(head -n1 <<<"$heavy" | cut -d' ' -f1)" | head -20
    return 1
  fi
  echo "no aws-lc and no regex engine in edge-agent's tree"
}

# Sums every libtest "test result:" line so the run ends with one count of what ran.
count_tests() {
  local passed=0 failed=0 p f
  while read -r p f; do
    passed=$((passed + p))
    failed=$((failed + f))
  done < <(cat "$LOG_DIR"/step-*.log 2>/dev/null |
    sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p')
  printf 'tests: %d passed, %d failed\n' "$passed" "$failed"
}

cd "$REPO_ROOT"
export PLANTLINE_CACHE="$CACHE"
export PLANTLINE_PEERS_VENV="$CACHE/venv/peers"
export PLANTLINE_DUCKDB_VENV="$CACHE/venv/duckdb"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"

# Installs stop the script at the first failure: nothing after them could pass.
install_step() {
  local name="$1"
  shift
  section "install: $name"
  local started=$SECONDS
  "$@"
  summary+=("$(printf 'ok    %5ds  install: %s' "$((SECONDS - started))" "$name")")
}

if [[ "$mode" != test ]]; then
  install_step "Debian packages" install_debian_packages
  install_step "Python venv: peers" ensure_venv peers "$REPO_ROOT/tests/requirements-peers.txt"
  install_step "Python venv: duckdb" ensure_venv duckdb "$REPO_ROOT/tests/requirements-duckdb.txt"
  install_step "node peer: kinesalite" ensure_node_peer kinesalite "$REPO_ROOT/tests/peers/kinesalite"
  install_step "Rust components and targets" install_rust_targets
fi

if [[ "$mode" != install ]]; then
  section "environment"
  check_tools
  echo "CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
  cargo --version
  step "cargo fmt --check" cargo fmt --all -- --check
  step "edge-agent dependency tree" check_agent_tree
  step "cargo clippy" cargo clippy --workspace --all-targets --all-features -- -D warnings
  step "cargo test" cargo test --workspace --all-features
  for target in "${ARM_TARGETS[@]}"; do
    step "cross: $target build and qemu smoke test" "$REPO_ROOT/cross/qemu-smoke.sh" "$target"
  done
fi

section "summary"
printf '%s\n' "${summary[@]}"
if [[ "$mode" != install ]]; then
  count_tests
fi
if ((failures > 0)); then
  echo "run.sh: $failures step(s) failed" >&2
  exit 1
fi

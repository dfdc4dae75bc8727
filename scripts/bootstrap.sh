#!/usr/bin/env bash
# Installs everything a bare Debian 12 (bookworm) machine lacks to build, run and test Fleet.
# Idempotent: every step checks whether it is already done. Caches live outside the clone,
# under $FLEET_CACHE (default /var/cache/fleet), so a second run takes seconds.
set -euo pipefail

FLEET_CACHE=${FLEET_CACHE:-/var/cache/fleet}
TOOLS="$FLEET_CACHE/tools"
NATS_VERSION_WANT="2.10"
mkdir -p "$TOOLS/bin"

log() { printf '\033[1mbootstrap:\033[0m %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: run as root (it installs Debian packages)" >&2
    exit 1
  fi
}

apt_updated=0
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ $apt_updated -eq 0 ]; then
    log "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

need_root

# --- Debian packages -------------------------------------------------------------------------
# podman with runc (crun fails on these hosts: "cgroups in hybrid mode not supported"),
# busybox-static for the locally built test images, the aarch64 C cross compiler for crates
# with C code (ring) in the static aarch64 agent, musl-gcc for the x86_64 one, jq/curl/file
# for the scripts, shellcheck for the scripts' own test.
apt_install podman runc uidmap slirp4netns busybox-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross musl-tools curl jq file ca-certificates python3 python3-venv shellcheck

# podman's default ulimits fail here ("setrlimit RLIMIT_NOFILE: Operation not permitted").
if [ ! -f /etc/containers/containers.conf ] || ! grep -q '^default_ulimits = \[\]' /etc/containers/containers.conf; then
  log "writing /etc/containers/containers.conf (runc, no default ulimits)"
  mkdir -p /etc/containers
  cat > /etc/containers/containers.conf <<'CONF'
# Written by Fleet's scripts/bootstrap.sh.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
CONF
fi

# --- The device image and its QEMU tests (scripts/bootstrap.sh --image) -----------------------
# mmdebstrap builds the arm64 base system through qemu-user and binfmt; qemu-system-aarch64 10
# (bookworm-backports: bookworm's 7.2 conflicts with the preinstalled qemu-utils 10) boots the
# image's helper VM and the tests' devices; mtools, dosfstools and fdisk make and read the card.
if [ "${1:-}" = "--image" ]; then
  if [ ! -f /etc/apt/sources.list.d/fleet-bookworm-backports.sources ]; then
    log "adding the bookworm-backports apt source (QEMU 10)"
    cat > /etc/apt/sources.list.d/fleet-bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt_updated=0
  fi
  if ! qemu-system-aarch64 --version 2>/dev/null | grep -q 'version 10'; then
    [ $apt_updated -eq 1 ] || { apt-get update -qq; apt_updated=1; }
    log "installing QEMU 10 from bookworm-backports"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      -t bookworm-backports qemu-system-arm qemu-system-data qemu-user-static ipxe-qemu >/dev/null
  fi
  apt_install mmdebstrap arch-test mtools dosfstools fdisk e2fsprogs openssh-client
  # binfmt for arm64 binaries (mmdebstrap's package scripts, the image's chroot).
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    log "registering qemu-aarch64 with binfmt_misc"
    cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
  fi
fi

# --- Packages from Debian trixie, downloaded and unpacked under $TOOLS, never installed -------
trixie_source() {
  if [ ! -f /etc/apt/sources.list.d/fleet-trixie.sources ]; then
    log "adding the trixie apt source pinned at priority 50 (used only to download packages)"
    cat > /etc/apt/sources.list.d/fleet-trixie.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    cat > /etc/apt/preferences.d/fleet-trixie <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 50
PIN
    apt_updated=0
  fi
}
# unpack_trixie PACKAGE: the package's files under $TOOLS/PACKAGE-unpacked.
unpack_trixie() {
  local pkg=$1
  trixie_source
  if [ $apt_updated -eq 0 ]; then apt-get update -qq; apt_updated=1; fi
  mkdir -p "$FLEET_CACHE/debs"
  local debs=("$FLEET_CACHE/debs/${pkg}"_*.deb)
  if [ ! -e "${debs[0]}" ]; then
    ( cd "$FLEET_CACHE/debs" && apt-get download -qq -o APT::Sandbox::User=root "$pkg/trixie" )
    debs=("$FLEET_CACHE/debs/${pkg}"_*.deb)
  fi
  rm -rf "$TOOLS/$pkg-unpacked"
  dpkg-deb -x "${debs[0]}" "$TOOLS/$pkg-unpacked"
}

# nats-server 2.10 (bookworm's 2.9 lacks 2.10 features).
if ! "$TOOLS/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION_WANT"; then
  unpack_trixie nats-server
  ln -sf "$TOOLS/nats-server-unpacked/usr/sbin/nats-server" "$TOOLS/bin/nats-server"
  "$TOOLS/bin/nats-server" --version | grep -q "v$NATS_VERSION_WANT" || { echo "bootstrap: unpacked nats-server is not $NATS_VERSION_WANT" >&2; exit 1; }
  log "nats-server: $("$TOOLS/bin/nats-server" --version)"
fi

# The QEMU tests judge a device's thin-pool metadata from outside with the device's own
# thin-provisioning-tools (1.x): bookworm's 0.9 does not notice a leaked data block.
if [ "${1:-}" = "--image" ] && ! "$TOOLS/bin/thin_check" -V 2>/dev/null | grep -q '^1\.'; then
  unpack_trixie thin-provisioning-tools
  for t in thin_check thin_dump thin_repair thin_restore; do
    ln -sf "$TOOLS/thin-provisioning-tools-unpacked/usr/sbin/pdata_tools" "$TOOLS/bin/$t"
  done
  log "thin_check: $("$TOOLS/bin/thin_check" -V)"
fi

# --- Rust targets ----------------------------------------------------------------------------
if command -v rustup >/dev/null; then
  installed=$(rustup target list --installed)
  for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    grep -qx "$t" <<<"$installed" || { log "rustup target add $t"; rustup target add "$t"; }
  done
else
  echo "bootstrap: rustup not found; install Rust with rustup first (https://rustup.rs)" >&2
  exit 1
fi
command -v cargo-nextest >/dev/null || { log "installing cargo-nextest"; cargo install --locked cargo-nextest; }
# cargo-deny for the licenses and bans checks (offline; about 2.5 min to build once).
command -v cargo-deny >/dev/null || {
  log "installing cargo-deny"
  cargo install --locked --no-default-features cargo-deny@0.20.2
}

# nats-py, an independent NATS client for the isolation tests (e2e/py/).
VENV="$FLEET_CACHE/venv"
if ! "$VENV/bin/python" -c 'import nats, nkeys' 2>/dev/null; then
  log "installing nats-py into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'nats-py[nkeys]==2.*'
fi

log "ready (tools in $TOOLS/bin)"

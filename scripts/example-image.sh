#!/usr/bin/env bash
# Builds the small images Fleet's local fleet and tests run, from Debian's static busybox
# (no registry is reachable). Prints nothing but errors; idempotent.
#
#   scripts/example-image.sh [PODMAN ARGS...]
#
# PODMAN ARGS select the storage (`--root DIR --runroot DIR`), so a test agent's isolated
# storage gets the images too. The rootfs tar is cached under $FLEET_CACHE/images.
set -euo pipefail
FLEET_CACHE=${FLEET_CACHE:-/var/cache/fleet}
TAR="$FLEET_CACHE/images/busybox-rootfs.tar"
TAG=1

if [ ! -s "$TAR" ]; then
  mkdir -p "$FLEET_CACHE/images"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  mkdir -p "$root"/{bin,www,tmp,etc,data}
  cp /bin/busybox "$root/bin/busybox"
  for applet in $("$root/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
  done
  echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"
  echo 'root:x:0:' > "$root/etc/group"
  tar --sort=name --mtime=@0 --owner=0 --group=0 -C "$root" -cf "$TAR.tmp" .
  mv "$TAR.tmp" "$TAR"
fi

have() { podman "$@" image exists "$IMAGE"; }

# The example HTTP server: serves "$GREETING" (default "hello from fleet") on port 8080.
# The shell stays PID 1 with a TERM trap, so `podman stop` ends it at once (busybox httpd as
# PID 1 would ignore SIGTERM and wait out the grace period).
IMAGE="localhost/fleet-example-http:$TAG"
if ! have "$@"; then
  podman "$@" import -q \
    --change 'ENV GREETING="hello from fleet"' \
    --change 'CMD ["/bin/sh", "-c", "echo \"$GREETING\" > /www/index.html; trap \"exit 0\" TERM; httpd -f -v -p 8080 -h /www & wait"]' \
    --change 'EXPOSE 8080' \
    "$TAR" "$IMAGE" >/dev/null
fi

# Plain busybox, for commands given in the spec.
IMAGE="localhost/fleet-busybox:$TAG"
if ! have "$@"; then
  podman "$@" import -q --change 'CMD ["/bin/sh"]' "$TAR" "$IMAGE" >/dev/null
fi

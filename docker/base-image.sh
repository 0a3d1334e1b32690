#!/usr/bin/env bash
# Prints the base image to build on (the Dockerfile's BASE_IMAGE): python:3.11-slim when it is
# here or can be pulled, else a local equivalent, made once from Debian bookworm with debootstrap
# (as root, from the Debian mirror apt is configured with) and kept as captionbot-base:bookworm-py3.11
# so that later builds start at once. Everything but the image name goes to stderr.
# No python3-pip: the Dockerfile installs into a virtual environment, which has its own pip.
#
#   docker build --build-arg BASE_IMAGE="$(docker/base-image.sh)" -t captionbot .
#
# DEBIAN_MIRROR overrides the mirror; PULL_TIMEOUT_S (default 60) bounds the pull attempt.
set -euo pipefail

UPSTREAM=python:3.11-slim
LOCAL=${LOCAL_BASE_IMAGE:-captionbot-base:bookworm-py3.11}

say() { echo "base-image: $*" >&2; }
have() { docker image inspect "$1" >/dev/null 2>&1; }

if have "$UPSTREAM"; then echo "$UPSTREAM"; exit 0; fi
if have "$LOCAL"; then echo "$LOCAL"; exit 0; fi
if timeout "${PULL_TIMEOUT_S:-60}" docker pull -q "$UPSTREAM" >/dev/null 2>&1; then
    echo "$UPSTREAM"; exit 0
fi
say "$UPSTREAM cannot be pulled; making $LOCAL from Debian bookworm with debootstrap"

if [ "$(id -u)" != 0 ] || ! command -v debootstrap >/dev/null 2>&1; then
    say "needs root and debootstrap (apt-get install debootstrap)"; exit 1
fi

mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local found
    # deb822 sources first (bookworm's default), then the one-line format.
    found=$(awk '/^URIs:/ {uri=$2} /^Suites:/ && / bookworm( |$)/ {print uri; exit}' \
        /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    [ -n "$found" ] || found=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null || true)
    echo "${found:-http://deb.debian.org/debian}"
}

root=$(mktemp -d /var/tmp/captionbot-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
say "debootstrap from $(mirror) into $root"
failed() { tail -20 "$root/debootstrap.log" >&2; say "debootstrap failed"; exit 1; }
# Two stages, so that dpkg can skip its fsync calls in the second (a throw-away rootfs:
# about a fifth faster here).
debootstrap --foreign --variant=minbase \
    --include=python3,python3-venv,python-is-python3,ca-certificates \
    bookworm "$root/rootfs" "$(mirror)" >"$root/debootstrap.log" 2>&1 || failed
echo force-unsafe-io >"$root/rootfs/etc/dpkg/dpkg.cfg.d/captionbot-unsafe-io"
chroot "$root/rootfs" /debootstrap/debootstrap --second-stage >>"$root/debootstrap.log" 2>&1 || failed
rm "$root/rootfs/etc/dpkg/dpkg.cfg.d/captionbot-unsafe-io"
# What python:3.11-slim also leaves out: package lists and caches, documentation, locales.
rm -rf "$root"/rootfs/var/lib/apt/lists/* "$root"/rootfs/var/cache/apt/* \
    "$root"/rootfs/usr/share/doc/* "$root"/rootfs/usr/share/man/* "$root"/rootfs/usr/share/info/* \
    "$root"/rootfs/usr/share/locale/* "$root"/rootfs/var/log/*.log
tar -C "$root/rootfs" --numeric-owner -c . | docker import \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' \
    -m "debootstrap bookworm minbase + python3 (stand-in for $UPSTREAM)" - "$LOCAL" >/dev/null
say "made $LOCAL (Python $(chroot "$root/rootfs" python3 -c 'import platform; print(platform.python_version())'))"
echo "$LOCAL"

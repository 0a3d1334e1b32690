#!/usr/bin/env bash
# Installs Compose v2 (`docker compose`) as a Docker CLI plugin where Debian bookworm ships only
# docker-compose v1 (1.29, end of life). The binary is Debian trixie's docker-compose package
# (Compose 2.26.1, a static Go program; it needs only libc6 >= 2.34, and bookworm has 2.36): the
# .deb is fetched from the Debian mirror, checked against trixie's signed InRelease (gpgv with
# the debian-archive-keyring that bookworm has), and only its one binary is copied to
# /usr/local/lib/docker/cli-plugins/docker-compose. Nothing else of trixie touches the system:
# no apt source, no dpkg database entry; v1's /usr/bin/docker-compose stays as it is.
#
#   docker/compose-v2.sh          (as root; exits 0 at once when `docker compose` works)
#
# DEBIAN_MIRROR overrides the mirror (default http://deb.debian.org/debian); PLUGIN_DIR the
# folder the plugin goes to.
set -euo pipefail

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=trixie
PACKAGE=docker-compose
PLUGIN_DIR=${PLUGIN_DIR:-/usr/local/lib/docker/cli-plugins}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

say() { echo "compose-v2: $*" >&2; }

if docker compose version >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then say "needs root"; exit 1; fi
for tool in curl gpgv xz dpkg-deb sha256sum; do
    command -v "$tool" >/dev/null 2>&1 || { say "needs $tool"; exit 1; }
done
[ -r "$KEYRING" ] || { say "needs $KEYRING (apt-get install debian-archive-keyring)"; exit 1; }

arch=$(dpkg --print-architecture)
work=$(mktemp -d /var/tmp/compose-v2.XXXXXX)
trap 'rm -rf "$work"' EXIT
fetch() { curl -fsS --retry 3 --max-time 300 -o "$2" "$MIRROR/$1"; }
# The hash of a file as the verified text lists it ("<sha256> <size> <path>" lines).
listed() { awk -v path="$2" '$3 == path && length($1) == 64 {print $1; exit}' "$1"; }

fetch "dists/$SUITE/InRelease" "$work/InRelease"
gpgv --keyring "$KEYRING" --output "$work/Release" "$work/InRelease" 2>"$work/gpgv.log" \
    || { cat "$work/gpgv.log" >&2; say "trixie's InRelease is not signed by a Debian key"; exit 1; }

index="main/binary-$arch/Packages.xz"
fetch "dists/$SUITE/$index" "$work/Packages.xz"
[ "$(sha256sum <"$work/Packages.xz" | cut -d' ' -f1)" = "$(listed "$work/Release" "$index")" ] \
    || { say "$index does not match the signed Release"; exit 1; }

# The package's stanza: its Version, Filename and SHA256.
xz -dc "$work/Packages.xz" | awk -v pkg="$PACKAGE" 'BEGIN {RS = ""} $0 ~ "^Package: " pkg "\n"' \
    >"$work/stanza"
field() { awk -v key="$1:" '$1 == key {print $2; exit}' "$work/stanza"; }
version=$(field Version)
filename=$(field Filename)
sha256=$(field SHA256)
[ -n "$filename" ] && [ -n "$sha256" ] || { say "no $PACKAGE in $SUITE's $index"; exit 1; }

say "installing $PACKAGE $version from $SUITE as $PLUGIN_DIR/docker-compose"
fetch "$filename" "$work/package.deb"
[ "$(sha256sum <"$work/package.deb" | cut -d' ' -f1)" = "$sha256" ] \
    || { say "$filename does not match its SHA256 in the index"; exit 1; }
dpkg-deb -x "$work/package.deb" "$work/root"
install -D -m 0755 "$work/root/usr/libexec/docker/cli-plugins/docker-compose" \
    "$PLUGIN_DIR/docker-compose"
docker compose version >&2

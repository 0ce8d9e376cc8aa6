#!/usr/bin/env bash
# Make the local base image localhost/debian-py:bookworm from Debian packages alone.
#
# Why: where no registry but Debian's and PyPI's can be reached, `FROM python:3.11-slim`
# cannot be pulled. debootstrap builds the same thing (Debian bookworm, whose python3 is
# 3.11) from the Debian archive, and `podman import` turns the folder into an image that
# the Dockerfiles take through `--build-arg BASE_IMAGE=localhost/debian-py:bookworm`.
#
# Idempotent: does nothing when the image already exists. Needs root, debootstrap, podman.
#
# Usage: images/make-base.sh [IMAGE]        (default localhost/debian-py:bookworm)
# Env:   DEBIAN_MIRROR (default http://deb.debian.org/debian), ENGINE (default podman)
set -euo pipefail

image="${1:-localhost/debian-py:bookworm}"
suite=bookworm
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
engine="${ENGINE:-podman}"

die() { echo "make-base: $*" >&2; exit 1; }

command -v "$engine" >/dev/null || die "$engine not found; install it (Debian: apt-get install podman runc)"
if "$engine" image inspect "$image" >/dev/null 2>&1; then
    echo "make-base: $image already exists; nothing to do"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "debootstrap needs root; run as root (or sudo $0)"
command -v debootstrap >/dev/null || die "debootstrap not found; install it (apt-get install debootstrap)"

root=$(mktemp -d "${TMPDIR:-/var/tmp}/debian-py.XXXXXX")
trap 'rm -rf "$root"' EXIT

start=$SECONDS
echo "make-base: debootstrap $suite into $root (a few minutes)"
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    "$suite" "$root" "$mirror"

# The package cache is dead weight in an image; the lists are kept out too (a Dockerfile
# that installs packages runs `apt-get update` first, as it must on any base).
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# debootstrap copies the host's resolv.conf; the engine mounts its own at run time.
: >"$root/etc/resolv.conf"

tar -C "$root" --numeric-owner -c . | "$engine" import \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV LANG=C.UTF-8' \
    --message "debootstrap --variant=minbase $suite + python3, python3-venv, python3-pip" \
    - "$image"
echo "make-base: $image ready in $((SECONDS - start)) s"

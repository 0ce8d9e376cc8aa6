#!/usr/bin/env bash
# Prepare a Debian machine (as root) to build and run the vitpcm images with podman: install
# podman, runc and debootstrap, and give podman the two settings that sandboxed machines such
# as this project's CI need. Idempotent; `make test-images` runs it first.
#
# Why the settings (/etc/containers/containers.conf):
#   default_ulimits = []   podman's default raises RLIMIT_NOFILE, which an unprivileged
#                          sandbox refuses ("error setting rlimit type 7").
#   runtime = "runc"       crun fails on a cgroup v1 hierarchy like this one; runc works.
# An existing containers.conf is never rewritten: the script says what it lacks instead.
set -euo pipefail

die() { echo "setup-podman: $*" >&2; exit 1; }

missing=()
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root to install them"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get; install them by hand"
    echo "setup-podman: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
fi

conf=/etc/containers/containers.conf
if [[ ! -f $conf ]]; then
    [[ $(id -u) -eq 0 ]] || die "$conf is missing; run as root to write it"
    mkdir -p "$(dirname "$conf")"
    cat >"$conf" <<'CONF'
# Written by vitpcm images/setup-podman.sh (see the reasons there).
[containers]
default_ulimits = []

[engine]
runtime = "runc"
CONF
    echo "setup-podman: wrote $conf"
elif ! grep -Eq '^\s*default_ulimits\s*=\s*\[\s*\]' "$conf" || ! grep -Eq '^\s*runtime\s*=\s*"runc"' "$conf"; then
    echo "setup-podman: note: $conf exists; if containers fail to start, it needs" \
        "'default_ulimits = []' under [containers] and 'runtime = \"runc\"' under [engine]" >&2
fi
echo "setup-podman: $(podman --version) ready"

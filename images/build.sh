#!/usr/bin/env bash
# Build the vitpcm container images with docker or podman.
#
# Image names and tags come from components/images.py (`python -m components.images --print
# cpu|gpu`), the one place the compiled pipeline reads them too; VITPCM_IMAGE_REGISTRY and
# VITPCM_IMAGE_TAG change both at once.
#
# Usage: images/build.sh [options] [cpu] [gpu]          (default: cpu)
#   --engine docker|podman  container engine (env CONTAINER_ENGINE; default podman if
#                           installed, else docker)
#   --base-image IMAGE      the Dockerfiles' BASE_IMAGE (env BASE_IMAGE; default: theirs,
#                           python:3.11-slim-bookworm)
#   --network MODE          build network, e.g. host (env BUILD_NETWORK)
#   --ca-bundle FILE        podman only: mount FILE as the build's CA bundle, for networks
#                           whose TLS is re-signed by a local CA (env CA_BUNDLE)
#   --push                  push each image after building it, and record the registry's
#                           digest in build/images.json (env VITPCM_IMAGE_DIGESTS), so
#                           the compiled pipeline names the image by digest, not by tag
#
# On a machine that reaches only Debian's archive and PyPI (images/README.md):
#   images/make-base.sh
#   images/build.sh --base-image localhost/debian-py:bookworm --network host \
#       --ca-bundle /etc/ssl/certs/ca-certificates.crt cpu
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "build: $*" >&2; exit 1; }

engine="${CONTAINER_ENGINE:-}"
base_image="${BASE_IMAGE:-}"
network="${BUILD_NETWORK:-}"
ca_bundle="${CA_BUNDLE:-}"
push=0
variants=()
while (($#)); do
    case "$1" in
        --engine) engine="${2:?--engine needs a value}"; shift 2 ;;
        --base-image) base_image="${2:?--base-image needs a value}"; shift 2 ;;
        --network) network="${2:?--network needs a value}"; shift 2 ;;
        --ca-bundle) ca_bundle="${2:?--ca-bundle needs a value}"; shift 2 ;;
        --push) push=1; shift ;;
        cpu | gpu) variants+=("$1"); shift ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1' (see images/build.sh --help)" ;;
    esac
done
((${#variants[@]})) || variants=(cpu)

if [[ -z $engine ]]; then
    if command -v podman >/dev/null; then engine=podman
    elif command -v docker >/dev/null; then engine=docker
    else die "neither podman nor docker found; install one (Debian: apt-get install podman runc)"
    fi
fi
[[ $engine == docker || $engine == podman ]] || die "--engine must be docker or podman, not '$engine'"
command -v "$engine" >/dev/null || die "$engine not found on PATH"
if [[ -n $ca_bundle ]]; then
    [[ $engine == podman ]] || die "--ca-bundle needs podman (docker build cannot mount files)"
    [[ -f $ca_bundle ]] || die "CA bundle $ca_bundle not found"
fi

# The interpreter that knows the image names: the project's venv when there is one.
python="${PYTHON:-}"
if [[ -z $python ]]; then
    if [[ -x $repo/.venv/bin/python ]]; then python=$repo/.venv/bin/python; else python=python3; fi
fi

# A small build context: the Dockerfiles COPY only these (the package is vitpcm plus the KFP
# components, whose launchers the train step imports), and sending the whole checkout
# (.venv/, data, runs) would cost minutes for nothing.
context=$(mktemp -d "${TMPDIR:-/tmp}/vitpcm-image-context.XXXXXX")
trap 'rm -rf "$context"' EXIT
(cd "$repo" && tar --exclude=__pycache__ --exclude='*.pyc' --exclude='*.egg-info' -cf - \
    pyproject.toml README.md src components configs images/requirements.py) | tar -xf - -C "$context"

for variant in "${variants[@]}"; do
    image=$(cd "$repo" && "$python" -m components.images --print "$variant") ||
        die "cannot read the $variant image name from components/images.py (python: $python)"
    args=(build --file "$repo/images/$variant/Dockerfile" --tag "$image")
    # podman writes OCI images by default, whose config has no SHELL: the Dockerfiles'
    # `SHELL [... pipefail ...]` would be dropped with a warning.
    [[ $engine == podman ]] && args+=(--format docker)
    [[ -n $base_image ]] && args+=(--build-arg "BASE_IMAGE=$base_image")
    [[ -n $network ]] && args+=(--network "$network")
    [[ -n $ca_bundle ]] && args+=(--volume "$(realpath "$ca_bundle"):/etc/ssl/certs/ca-certificates.crt:ro")
    echo "build: $engine ${args[*]} <context>"
    start=$SECONDS
    "$engine" "${args[@]}" "$context"
    echo "build: $image built in $((SECONDS - start)) s"
    if ((push)); then
        # The digest the registry stores the manifest under: what pods pull when pinned.
        if [[ $engine == podman ]]; then
            "$engine" push --digestfile "$context/digest" "$image"
            digest=$(<"$context/digest")
        else
            "$engine" push "$image"
            repo_name=${image%:*}
            digest=$("$engine" inspect --format '{{range .RepoDigests}}{{println .}}{{end}}' "$image" |
                awk -v repo="$repo_name" 'index($0, repo "@") == 1 { sub(/^[^@]*@/, ""); print; exit }')
        fi
        [[ -n $digest ]] || die "$engine push gave no digest for $image"
        (cd "$repo" && "$python" -m components.images --record "$variant" "$image" "$digest") ||
            die "cannot record the digest of $image"
    fi
done

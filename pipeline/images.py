"""Container images of the pipeline steps: the one place their names and tags are set.

Two images (Dockerfiles under ``images/``): the CPU image runs the data, evaluation, CRF,
registration and TFJob-launcher steps; the GPU image (TensorFlow with CUDA) runs training,
in the pipeline and in the workers of a multi-worker TFJob.

The registry and tag can be changed without editing code, so the image build and the
compiled pipeline always agree::

    VITPCM_IMAGE_REGISTRY=registry.example.com/ml VITPCM_IMAGE_TAG=2026.11 make compile-pipeline
    python -m pipeline.images --print gpu     # -> registry.example.com/ml/vitpcm-gpu:2026.11
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

REGISTRY_ENV = "VITPCM_IMAGE_REGISTRY"
TAG_ENV = "VITPCM_IMAGE_TAG"
DEFAULT_REGISTRY = "ghcr.io/vitpcm"
IMAGE_NAMES: dict[str, str] = {"cpu": "vitpcm-cpu", "gpu": "vitpcm-gpu"}


def default_tag() -> str:
    """The package version: images are rebuilt for every release of the library."""
    from vitpcm import __version__

    return __version__


def image(kind: str, environ: Mapping[str, str] | None = None) -> str:
    """Full reference (``registry/name:tag``) of the ``cpu`` or ``gpu`` image.

    Args:
        kind: ``cpu`` or ``gpu``.
        environ: Where to read the registry/tag overrides (default: ``os.environ``).

    Raises:
        ValueError: Unknown kind, or an override that is empty after stripping.
    """
    if kind not in IMAGE_NAMES:
        raise ValueError(f"unknown image kind {kind!r}: choose one of {sorted(IMAGE_NAMES)}")
    env = os.environ if environ is None else environ
    registry = env.get(REGISTRY_ENV, DEFAULT_REGISTRY).strip().rstrip("/")
    tag = env.get(TAG_ENV, "").strip() or default_tag()
    if not registry:
        raise ValueError(f"{REGISTRY_ENV} is set but empty; unset it or name a registry")
    return f"{registry}/{IMAGE_NAMES[kind]}:{tag}"


def cpu_image() -> str:
    """The CPU image (data, evaluation, CRF, registration, TFJob launcher)."""
    return image("cpu")


def gpu_image() -> str:
    """The GPU training image."""
    return image("gpu")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.images --print cpu|gpu``: print one image reference."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.images", description=__doc__)
    parser.add_argument("--print", dest="kind", required=True, choices=sorted(IMAGE_NAMES))
    args = parser.parse_args(argv)
    print(image(args.kind))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Container images of the pipeline steps: the one place their names and tags are set.

Two images (Dockerfiles under ``images/``): the CPU image runs the data, evaluation, CRF
and registration steps; the GPU image (TensorFlow with CUDA) runs training, in the pipeline
and in the workers of a distributed TrainJob or TFJob.

The registry and tag can be changed without editing code, so the image build and the
compiled pipeline always agree::

    VITPCM_IMAGE_REGISTRY=registry.example.com/ml VITPCM_IMAGE_TAG=2026.11 make compile-pipeline
    python -m components.images --print gpu     # -> registry.example.com/ml/vitpcm-gpu:2026.11

A tag can be moved by a rebuild, so pods could pull another image than the one tested and
KFP's cache keys (which include the image) would not notice. When ``images/build.sh --push``
(``make images ARGS=--push``) pushes an image, it records the registry's digest in
``build/images.json`` (``VITPCM_IMAGE_DIGESTS`` for another file), and the compiled pipeline
names the image by that digest (``registry/name:tag@sha256:...``) as long as the recorded
tag is still the one configured; otherwise by its tag::

    python -m components.images --print gpu --pinned   # what the compiled pipeline uses
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

REGISTRY_ENV = "VITPCM_IMAGE_REGISTRY"
TAG_ENV = "VITPCM_IMAGE_TAG"
DEFAULT_REGISTRY = "ghcr.io/vitpcm"
IMAGE_NAMES: dict[str, str] = {"cpu": "vitpcm-cpu", "gpu": "vitpcm-gpu"}
DIGESTS_ENV = "VITPCM_IMAGE_DIGESTS"
DEFAULT_DIGESTS = Path(__file__).resolve().parents[1] / "build" / "images.json"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def default_tag() -> str:
    """The package version: images are rebuilt for every release of the library."""
    from vitpcm import __version__

    return __version__


def tagged(kind: str, environ: Mapping[str, str] | None = None) -> str:
    """Reference by tag (``registry/name:tag``) of the ``cpu`` or ``gpu`` image: what
    ``images/build.sh`` builds and pushes.

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


def digests_file(environ: Mapping[str, str] | None = None) -> Path:
    """Where pushed images' digests are recorded (``VITPCM_IMAGE_DIGESTS`` or the default)."""
    env = os.environ if environ is None else environ
    return Path(env.get(DIGESTS_ENV, "").strip() or DEFAULT_DIGESTS)


def recorded_digests(environ: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """``{kind: {"image": tagged reference, "digest": "sha256:..."}}`` from the digests file
    ({} when there is none).

    Raises:
        ValueError: The file exists but is not what ``record_digest`` writes.
    """
    path = digests_file(environ)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc.msg}); delete it or push again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object; delete it or push again")
    for kind, entry in data.items():
        if not (
            kind in IMAGE_NAMES
            and isinstance(entry, dict)
            and isinstance(entry.get("image"), str)
            and _DIGEST.match(str(entry.get("digest")))
        ):
            raise ValueError(f"{path}: entry {kind!r} is not {{image, digest}}; push again")
    return data


def image(kind: str, environ: Mapping[str, str] | None = None) -> str:
    """The reference the compiled pipeline uses: pinned to the pushed digest when one is
    recorded for the configured tag, else by tag.

    Raises:
        ValueError: Unknown kind, an empty override, or an unreadable digests file.
    """
    reference = tagged(kind, environ)
    entry = recorded_digests(environ).get(kind)
    if entry and entry["image"] == reference:
        return f"{reference}@{entry['digest']}"
    return reference


def record_digest(
    kind: str, reference: str, digest: str, environ: Mapping[str, str] | None = None
) -> Path:
    """Record that ``reference`` was pushed as ``digest`` (the file is rewritten whole).

    Raises:
        ValueError: Unknown kind, or a digest that is not ``sha256:<64 hex>``.
    """
    if kind not in IMAGE_NAMES:
        raise ValueError(f"unknown image kind {kind!r}: choose one of {sorted(IMAGE_NAMES)}")
    digest = digest.strip()
    if not _DIGEST.match(digest):
        raise ValueError(f"{digest!r} is not an image digest (sha256:<64 hex digits>)")
    path = digests_file(environ)
    data = recorded_digests(environ)
    data[kind] = {"image": reference, "digest": digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cpu_image() -> str:
    """The CPU image (data, evaluation, CRF, registration)."""
    return image("cpu")


def gpu_image() -> str:
    """The GPU training image."""
    return image("gpu")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m components.images --print cpu|gpu [--pinned]``, or ``--record KIND REF DIGEST``:
    print an image reference, or record a pushed digest."""
    parser = argparse.ArgumentParser(
        prog="python -m components.images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--print", dest="kind", choices=sorted(IMAGE_NAMES), help="image kind")
    group.add_argument(
        "--record",
        nargs=3,
        metavar=("KIND", "REFERENCE", "DIGEST"),
        help="record a pushed image's digest (images/build.sh --push does)",
    )
    parser.add_argument(
        "--pinned", action="store_true", help="with --print: the reference the pipeline uses"
    )
    args = parser.parse_args(argv)
    try:
        if args.record:
            kind, reference, digest = args.record
            path = record_digest(kind, reference, digest)
            print(f"recorded {reference}@{digest.strip()} in {path}")
        else:
            print(image(args.kind) if args.pinned else tagged(args.kind))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

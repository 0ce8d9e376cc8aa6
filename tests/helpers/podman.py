"""Building and running the project's images with podman in tests (``make test-images``).

Tests that build images are skipped unless ``VITPCM_TEST_IMAGES=1`` (minutes, root, podman
set up by ``images/setup-podman.sh`` and a base from ``images/make-base.sh``).
``VITPCM_TEST_IMAGE`` / ``VITPCM_TEST_GPU_IMAGE`` name images already built instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from components.images import image

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "images" / "build.sh"
BASE_IMAGE = os.environ.get("BASE_IMAGE", "localhost/debian-py:bookworm")
CA_BUNDLE = Path(os.environ.get("CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
GIVEN = {"cpu": "VITPCM_TEST_IMAGE", "gpu": "VITPCM_TEST_GPU_IMAGE"}

needs_image_build = pytest.mark.skipif(
    os.environ.get("VITPCM_TEST_IMAGES") != "1",
    reason="builds the images with podman (minutes, root): run `make test-images` or "
    "`make test-containers` (they set VITPCM_TEST_IMAGES=1)",
)


def podman(*args: str, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``podman ARGS`` with its output captured as text."""
    return subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )


def build_image(kind: str, log_dir: Path, timeout: float = 3000) -> str:
    """Build the ``cpu`` or ``gpu`` image as the make targets do; returns its name (or the
    image named by ``VITPCM_TEST_IMAGE`` / ``VITPCM_TEST_GPU_IMAGE``, already built)."""
    if shutil.which("podman") is None:
        pytest.fail("podman not found: run images/setup-podman.sh (or `make test-images`)")
    given = os.environ.get(GIVEN[kind])
    if given:
        if podman("image", "exists", given).returncode != 0:
            pytest.fail(f"{GIVEN[kind]}={given} is not a local image; build or pull it")
        return given
    if podman("image", "exists", BASE_IMAGE).returncode != 0:
        pytest.fail(f"base image {BASE_IMAGE} missing: run images/make-base.sh first")
    args = ["--engine", "podman", "--base-image", BASE_IMAGE, "--network", "host"]
    if CA_BUNDLE.is_file():
        args += ["--ca-bundle", str(CA_BUNDLE)]
    log = log_dir / f"build-{kind}.log"
    with log.open("w", encoding="utf-8") as out:
        done = subprocess.run(
            ["bash", str(BUILD), *args, kind], stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    tail = "\n".join(log.read_text(encoding="utf-8").splitlines()[-40:])
    assert done.returncode == 0, f"{kind} image build failed:\n{tail}"
    print(tail.splitlines()[-1])  # "build: <image> built in N s", shown with -s
    return image(kind)


def run_in(image_name: str, *command: str, network: str = "none", timeout: float = 300) -> str:
    """Run ``command`` in a throw-away container; its stdout (the test fails on an error)."""
    done = podman("run", "--rm", f"--network={network}", image_name, *command, timeout=timeout)
    assert done.returncode == 0, f"{command} failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return done.stdout

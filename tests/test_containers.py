"""The GPU image and the DAG in the images (``make test-containers``, ``VITPCM_TEST_IMAGES=1``).

Builds the GPU image with podman, checks it carries TensorFlow as a CUDA build with the
CUDA/cuDNN libraries (no GPU needed), and runs ``make run-local ARGS=--containers`` on a
tiny synthetic dataset: every step in its image through ``kfp.local``'s DockerRunner on
podman's Docker API, with the local MLflow.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from helpers.podman import REPO, build_image, needs_image_build, run_in

# Building an image from a debootstrapped base takes 5-40 minutes.
pytestmark = pytest.mark.timeout(3600)


def _pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {r.split("==")[0]: r.split("==")[1] for r in deps["dependencies"] if "==" in r}


@pytest.fixture(scope="module")
def cpu_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_image("cpu", tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="module")
def gpu_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The GPU image, built as `make test-containers` does (VITPCM_TEST_GPU_IMAGE: that)."""
    return build_image("gpu", tmp_path_factory.mktemp("build"), timeout=5400)


_CUDA_PROBE = """
import glob, json, os, sys
import tensorflow as tf
info = tf.sysconfig.get_build_info()
site = [p for p in sys.path if p.endswith("site-packages")][0]
pattern = os.path.join(site, "nvidia", "*", "lib", "*.so*")
libs = sorted(os.path.basename(p) for p in glob.glob(pattern))
print(json.dumps({"tf": tf.__version__, "cuda": info.get("cuda_version"),
                  "cudnn": info.get("cudnn_version"), "is_cuda_build": info.get("is_cuda_build"),
                  "gpus": len(tf.config.list_physical_devices("GPU")), "libs": libs}))
"""


@needs_image_build
@pytest.mark.slow
def test_gpu_image_carries_tensorflow_with_its_cuda_libraries(gpu_image: str) -> None:
    """No GPU here: TensorFlow imports, is a CUDA build, and the CUDA/cuDNN wheels are in."""
    probe = json.loads(run_in(gpu_image, "python3", "-c", _CUDA_PROBE).splitlines()[-1])
    pins = _pins()
    assert probe["tf"] == pins["tensorflow-cpu"]  # the CI pin, as tensorflow[and-cuda]
    assert probe["is_cuda_build"] is True
    assert probe["cuda"] and probe["cudnn"]
    print(f"GPU image: TF {probe['tf']}, CUDA {probe['cuda']}, cuDNN {probe['cudnn']}")
    for lib in ("libcudart.so", "libcudnn.so", "libcublas.so", "libcufft.so", "libcusolver.so"):
        assert any(name.startswith(lib) for name in probe["libs"]), (lib, probe["libs"])
    # The image's own ldconfig knows them, so TensorFlow's dlopen finds them on a GPU node.
    cache = run_in(gpu_image, "sh", "-c", "ldconfig -p | grep -E 'libcudnn|libcudart'")
    assert "libcudnn" in cache and "libcudart" in cache


@needs_image_build
@pytest.mark.slow
def test_the_dag_runs_in_the_images(cpu_image: str, gpu_image: str, tmp_path: Path) -> None:
    """`make run-local ARGS=--containers`: every step in its image through kfp.local's
    DockerRunner on podman's Docker API, with the local MLflow; the outputs belong to this
    user and the pipeline root is not opened to others."""
    from localrun.command import main as run_local_main

    root = tmp_path / "runs"
    root.mkdir(mode=0o755)
    args = ["--containers", "--root", str(root), "--train", "16", "--val", "8", "--test", "4"]
    args += ["--size", "64", "--epochs", "1"]
    for item in ("train.steps_per_epoch=1", "crf.iterations=2"):
        args += ["--set", item]
    assert run_local_main(args) == 0
    summary = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    assert summary["mlflow"]["version"], summary
    assert oct(root.stat().st_mode & 0o777) == "0o755"
    owners = {p.stat().st_uid for p in root.rglob("*")}
    assert owners == {os.getuid()}, owners

"""``python -m pipeline.compile --out build/vitpcm_pipeline.yaml``: write a pipeline package.

``--variant cluster`` (default) is the pipeline to upload in the Kubeflow UI;
``--variant single-node`` trains in the step's pod only (no ``distributed`` parameter),
the DAG ``make run-local`` runs. The file is written under a temporary name and renamed
when complete.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kfp.dsl.graph_component import GraphComponent

VARIANTS = ("cluster", "single-node")
DEFAULT_OUT = "build/vitpcm_pipeline.yaml"


def pipeline_for(variant: str) -> GraphComponent:
    """The pipeline function of a variant."""
    from pipeline.pipeline import vitpcm_pipeline, vitpcm_single_node_pipeline

    if variant == "cluster":
        return vitpcm_pipeline
    if variant == "single-node":
        return vitpcm_single_node_pipeline
    raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}")


def compile_pipeline(out: str | os.PathLike[str] = DEFAULT_OUT, variant: str = "cluster") -> Path:
    """Compile a variant to ``out`` (parent folders created) and return the path."""
    from kfp import compiler

    target = Path(out)
    if target.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"--out {target} must end in .yaml (or .json)")
    target.parent.mkdir(parents=True, exist_ok=True)
    func = pipeline_for(variant)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.stem}.tmp-", suffix=target.suffix, dir=target.parent
    )
    os.close(fd)
    try:
        compiler.Compiler().compile(pipeline_func=func, package_path=tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.compile``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.compile", description="Compile the ViT-PCM pipeline to YAML."
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output YAML ({DEFAULT_OUT})")
    parser.add_argument("--variant", choices=VARIANTS, default="cluster", help="(cluster)")
    args = parser.parse_args(argv)
    path = compile_pipeline(args.out, args.variant)
    from components.images import cpu_image, gpu_image

    print(f"wrote {path} ({args.variant}; images {cpu_image()}, {gpu_image()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

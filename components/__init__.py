"""Kubeflow Pipelines components: one thin step per library entry point.

Each component is a lightweight Python component whose body imports the ``vitpcm`` library
and calls one function, so the same code runs in the cluster (in the images named by
:mod:`components.images`) and on one machine under ``kfp.local``.

Components are loaded on first use: inside a running step (``_KFP_RUNTIME``) kfp offers no
``dsl.component``, yet the train step imports :mod:`components.launchers` from here.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "check_run": "components.check",
    "download_data": "components.data",
    "convert_data": "components.data",
    "train_model": "components.train",
    "evaluate_model": "components.evaluate",
    "infer_crf": "components.evaluate",
    "register_model": "components.register",
    "deploy_model": "components.deploy",
    "gpu_placement": "components.placement",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'components' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)

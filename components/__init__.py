"""Kubeflow Pipelines components: one thin step per library entry point.

Each component is a lightweight Python component whose body imports the ``vitpcm`` library
and calls one function, so the same code runs in the cluster (in the images named by
:mod:`components.images`) and on one machine under ``kfp.local``. The DAG's steps are
listed in :data:`pipeline.steps.STEPS`.

``from components import train_model`` finds the component in the module that defines it,
loaded on first use: inside a running step (``_KFP_RUNTIME``) kfp offers no
``dsl.component``, yet the train step imports :mod:`components.launchers` from here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def __getattr__(name: str) -> Any:
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg:
            found = getattr(importlib.import_module(f"{__name__}.{module.name}"), name, None)
            if hasattr(found, "component_spec"):
                return found
    raise AttributeError(f"module 'components' has no component {name!r}")

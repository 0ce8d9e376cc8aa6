"""Dataset sources: one module per dataset, found and registered on import.

Each module of this package (other than :mod:`~vitpcm.data.sources.base`) defines
``SOURCE``, a :class:`DatasetSource`; adding a dataset is adding such a module (plus its
config YAML). Everything that lists datasets asks :func:`dataset_names`.
"""

from __future__ import annotations

import importlib
import pkgutil

from vitpcm.data.sources.base import (
    DatasetFile,
    DatasetSource,
    MaskDecoder,
    Sample,
    SplitPlan,
    dataset_names,
    get_source,
    register,
)

__all__ = [
    "DatasetFile",
    "DatasetSource",
    "MaskDecoder",
    "Sample",
    "SplitPlan",
    "dataset_names",
    "get_source",
    "register",
]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base" and not _module.name.startswith("_"):
        register(importlib.import_module(f"{__name__}.{_module.name}").SOURCE)

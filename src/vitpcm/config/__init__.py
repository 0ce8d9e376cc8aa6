"""Typed run configuration: schema, YAML loading, ``--set`` overrides and validation.

The dataclasses of :mod:`~vitpcm.config.schema` hold the paper's PASCAL VOC settings as
defaults (see METHOD.md); a YAML file only overrides them, and ``--set KEY=VALUE`` overrides
the file. :mod:`~vitpcm.config.loading` coerces every value to its declared type and
:mod:`~vitpcm.config.validation` checks it once, at load time, so a bad key or value fails
before any data is read, with a :class:`~vitpcm.errors.ConfigError` naming the dotted key
and where it came from. The resolved config (presets and derived sizes filled in) is what
:func:`save_config` writes next to a run's outputs, and it loads back unchanged.
"""

from vitpcm.config.loading import (
    CONFIG_DIR_ENV,
    available_configs,
    config_from_dict,
    config_search_dirs,
    dump_defaults,
    load_config,
    resolve_config,
    resolve_config_path,
    save_config,
)
from vitpcm.config.schema import (
    DEFAULT_GELU,
    GELU_FORMS,
    POOLINGS,
    AugmentConfig,
    Config,
    CrfConfig,
    DataConfig,
    EtConfig,
    EvalConfig,
    LossWeights,
    MlflowConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "CONFIG_DIR_ENV",
    "DEFAULT_GELU",
    "GELU_FORMS",
    "POOLINGS",
    "AugmentConfig",
    "Config",
    "CrfConfig",
    "DataConfig",
    "EtConfig",
    "EvalConfig",
    "LossWeights",
    "MlflowConfig",
    "ModelConfig",
    "TrainConfig",
    "available_configs",
    "config_from_dict",
    "config_search_dirs",
    "dump_defaults",
    "load_config",
    "resolve_config",
    "resolve_config_path",
    "save_config",
]

"""Which config a run uses, and whether dataset, config and pre-trained weights fit together.

One check for every entry point (``vitpcm train``/``eval``/``test``, ``make run-local``,
``make submit`` and the pipeline's first step on the cluster), run before any byte of a
dataset is downloaded, so a mismatch costs a second, not hours of download and conversion:

* the config follows the dataset unless one is named (its source's ``config``,
  :mod:`vitpcm.data.sources`);
* the config's ``data.dataset`` is the dataset being run, and its ``data.num_classes`` the
  dataset's class count;
* ``model.pretrained``, when its file name is that of a backbone's Google checkpoint
  (``ViT-B_16.npz``, ``S_16-i21k-...npz``: :mod:`vitpcm.model.backbones`), names the
  config's backbone, and a local path exists (where the check runs on the machine that
  trains: the CLI and ``make run-local``).

Cheap and offline: nothing is read but the config (and a local path's existence).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from vitpcm.data.sources import dataset_names, get_source
from vitpcm.errors import ConfigError
from vitpcm.model.backbones import checkpoint_backbone

if TYPE_CHECKING:
    from vitpcm.config import Config

_REMOTE = ("s3://", "http://", "https://", "gs://")


def config_for(dataset: str, config: str | None = None) -> str:
    """The config a run on ``dataset`` uses: ``config`` when given, else the dataset's default.

    Raises:
        ConfigError: An unknown dataset.
    """
    return config or get_source(dataset).config


def check_plan(cfg: Config, dataset: str, config_name: str = "", local_files: bool = True) -> None:
    """Check that a loaded config fits the dataset it is about to run on.

    Args:
        cfg: The resolved config (overrides applied).
        dataset: A registered dataset name (:func:`vitpcm.data.sources.dataset_names`).
        config_name: How the user named the config, quoted in errors.
        local_files: Check that a local ``model.pretrained`` path exists (False where the
            check runs on another machine than training: ``make submit``, the cluster).

    Raises:
        ConfigError: The config is for another dataset or class count, or the pre-trained
            checkpoint names another backbone or is a local path that does not exist.
    """
    named = config_name or cfg.name
    source = get_source(dataset)
    fits, classes = source.config, source.num_classes
    if cfg.data.dataset != dataset:
        raise ConfigError(
            f"config {named} is for dataset {cfg.data.dataset}, not {dataset}; use a "
            f"{dataset} config such as {fits}, or leave the config out to get {fits}"
        )
    if cfg.data.num_classes != classes:
        raise ConfigError(
            f"config {named} has data.num_classes={cfg.data.num_classes} but {dataset} has "
            f"{classes} classes (background included); set "
            f"data.num_classes={classes} or use config {fits}"
        )
    pretrained = cfg.model.pretrained
    if not pretrained:
        return
    named_backbone = checkpoint_backbone(pretrained)
    if named_backbone is not None and named_backbone != cfg.model.backbone:
        raise ConfigError(
            f"model.pretrained {pretrained} is a {named_backbone} checkpoint but config "
            f"{named} builds {cfg.model.backbone}; use the {cfg.model.backbone} checkpoint "
            "named in the config's comments, or a config with that backbone"
        )
    local = pretrained.removeprefix("file://")
    if local_files and not pretrained.startswith(_REMOTE) and not os.path.isfile(local):
        raise ConfigError(
            f"model.pretrained {pretrained} is not a file; give the checkpoint's path, "
            "s3:// or http(s):// URI, or model.pretrained=null for random weights"
        )


def load_checked_config(
    dataset: str,
    config: str | None = None,
    overrides: Sequence[str] = (),
    local_files: bool = True,
) -> Config:
    """Load the run's config (:func:`config_for`) with its overrides and :func:`check_plan` it.

    Raises:
        ConfigError: A bad config, key or value, or a mismatch with the dataset.
    """
    from vitpcm.config import load_config

    name = config_for(dataset, config)
    cfg = load_config(name, list(overrides))
    check_plan(cfg, dataset, name, local_files)
    return cfg


def dataset_of(info: dict[str, object]) -> str:
    """The dataset a converted folder holds, from its ``dataset.json``.

    The class names decide: the synthetic data converted in the VOC layout says
    ``name: voc12`` but has its own classes.
    """
    for name in dataset_names():
        if info.get("class_names") == list(get_source(name).class_names):
            return name
    return str(info.get("name", ""))


def config_for_data(data_uri: str) -> str:
    """The default config of the dataset converted in ``data_uri`` (its ``dataset.json``).

    Raises:
        DataError: No readable ``dataset.json`` there.
        ConfigError: A dataset this project has no config for.
    """
    from vitpcm.data.manifest import read_dataset_info

    return config_for(dataset_of(read_dataset_info(data_uri)))


def check_data(cfg: Config, data_uri: str | None, config_name: str = "") -> None:
    """:func:`check_plan` against the dataset converted in ``data_uri``, before any work.

    Nothing is checked when ``data_uri`` is empty or holds no ``dataset.json`` (reading the
    data then fails with its own message).

    Raises:
        ConfigError: The config does not fit that dataset.
    """
    from vitpcm.data.manifest import read_dataset_info
    from vitpcm.errors import DataError

    if not data_uri:
        return
    try:
        info = read_dataset_info(data_uri)
    except DataError:
        return
    dataset = dataset_of(info)
    if dataset in dataset_names():
        check_plan(cfg, dataset, config_name)

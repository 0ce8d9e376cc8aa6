"""The training step's ``pretrained`` choice, importable inside its container (no kfp needed).

The paper configs start from the public Google ViT checkpoint of their backbone
(``model.pretrained`` in ``configs/``). A run chooses another with ``pretrained`` (a path,
``s3://`` copy or URL), or random weights explicitly with ``none``; a real dataset trained
from random weights is logged as loudly as a log can be, since the paper's numbers are then
out of reach.
"""

from __future__ import annotations

import logging
from typing import Any

RANDOM_CHOICES = ("none", "random")
log = logging.getLogger("vitpcm.pretrained")


def pretrained_overrides(choice: str) -> list[str]:
    """Config overrides for the ``pretrained`` run parameter.

    Args:
        choice: Empty keeps the config's checkpoint; ``none``/``random`` trains from random
            weights; anything else is the checkpoint's path, ``s3://`` or ``http(s)://`` URI.
    """
    choice = choice.strip()
    if not choice:
        return []
    if choice.lower() in RANDOM_CHOICES:
        return ["model.pretrained=null"]
    return [f"model.pretrained={choice}"]


def random_weights_warning(cfg: Any) -> str | None:
    """The banner to log when a real dataset trains from random weights, else None."""
    if cfg.model.pretrained or cfg.data.dataset == "synthetic":
        return None
    line = "!" * 78
    return (
        f"\n{line}\n!! TRAINING {cfg.model.backbone} FROM RANDOM WEIGHTS on {cfg.data.dataset} "
        f"(config {cfg.name}, model.pretrained=null).\n!! The paper fine-tunes an "
        "ImageNet-21k checkpoint; expect a far lower mIoU. Leave `pretrained` empty for\n"
        f"!! the config's checkpoint, or name one (path, s3:// or https://).\n{line}"
    )


def warn_if_random(cfg: Any) -> bool:
    """Log :func:`random_weights_warning` (as an error-level record) when it applies."""
    banner = random_weights_warning(cfg)
    if banner:
        log.error(banner)
    return banner is not None

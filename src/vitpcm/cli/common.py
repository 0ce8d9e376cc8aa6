"""What the ``vitpcm`` commands share: argument types, common flags and the run's config."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitpcm.config import Config

log = logging.getLogger("vitpcm")


def _checked(kind: type, what: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse ``type``: ``kind(text)`` when ``ok`` accepts it, else "expected WHAT"."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = _checked(int, "a positive integer", lambda v: v >= 1)
count = _checked(int, "an integer >= 0", lambda v: v >= 0)
positive_float = _checked(float, "a positive number", lambda v: 0 < v < math.inf)


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    """``--no-progress``: logs only, no progress bars."""
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (logs only)")


def add_config_args(parser: argparse.ArgumentParser, follows_data: bool = False) -> None:
    """``-c CONFIG`` (optional when it follows ``--data``'s dataset) and ``--set KEY=VALUE``."""
    follows = ""
    if follows_data:
        from vitpcm.data.sources import dataset_names, get_source

        defaults = ", ".join(get_source(name).config for name in dataset_names())
        follows = f"; default: the one for --data's dataset ({defaults})"
    parser.add_argument(
        "-c",
        "--config",
        required=not follows_data,
        help="config YAML path, or a name from configs/ such as voc12_vit_s16 or synthetic"
        + follows,
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override one config value by dotted key, e.g. train.lr=3e-4 (repeatable)",
    )


def load_cfg(args: argparse.Namespace) -> Config:
    """The config of a run: ``-c``, else the default of ``--data``'s dataset.

    It is checked against that dataset (:mod:`vitpcm.run_plan`) before any work.

    Raises:
        ConfigError: No config and no ``--data``, a bad config, or one for another dataset.
    """
    from vitpcm import run_plan
    from vitpcm.config import load_config
    from vitpcm.errors import ConfigError

    data = getattr(args, "data", None)
    if not args.config:
        if not data:
            raise ConfigError(
                "no config: give -c CONFIG, or --data with a converted dataset to use its "
                "default config"
            )
        args.config = run_plan.config_for_data(data)
        log.info("config %s (the default for the dataset in %s)", args.config, data)
    cfg = load_config(args.config, args.set)
    run_plan.check_data(cfg, data or cfg.data.uri, args.config)
    return cfg

"""``vitpcm config show`` and ``vitpcm mlflow replay``."""

from __future__ import annotations

import argparse
from typing import Any

from vitpcm.cli.common import add_config_args, add_no_progress


def _config_show(args: argparse.Namespace) -> int:
    from vitpcm.config import load_config

    print(load_config(args.config, args.set).to_yaml(), end="")
    return 0


def _mlflow_replay(args: argparse.Namespace) -> int:
    from vitpcm.tracking import replay_spool

    sent = replay_spool(args.dir, tracking_uri=args.tracking_uri, progress=not args.no_progress)
    print(f"sent {sent} pending MLflow record(s) from {args.dir}")
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``config show`` and ``mlflow replay`` to the top-level subparsers ``sub``."""
    cfg = sub.add_parser("config", help="show a resolved config")
    actions = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = actions.add_parser("show", help="print the config with defaults and overrides applied")
    add_config_args(p)
    p.set_defaults(handler=_config_show)

    ml = sub.add_parser("mlflow", help="MLflow helpers (replay records spooled during an outage)")
    actions = ml.add_subparsers(dest="mlflow_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "replay",
        help="send MLflow records left pending by an outage",
        description=(
            "Send the records a tracked run spooled while MLflow was unreachable, in order "
            "and exactly once, to the same MLflow run."
        ),
    )
    p.add_argument("dir", metavar="DIR", help="a tracked run's output folder or its mlflow-spool/")
    p.add_argument(
        "--tracking-uri",
        help="MLflow server (default: the one holding the run, then $MLFLOW_TRACKING_URI)",
    )
    add_no_progress(p)
    p.set_defaults(handler=_mlflow_replay)

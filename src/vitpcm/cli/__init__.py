"""The ``vitpcm`` command: every pipeline step, runnable on a workstation.

Each subcommand parses its flags and calls one library function (imported lazily so
``vitpcm --help`` is instant); the commands of a group live in one module of this package
(``data``, ``run``: train/eval/test/predict, ``weights``, ``tools``: config and mlflow). A
:class:`~vitpcm.errors.VitpcmError` becomes one line ``error: ...`` on stderr and its exit
code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from vitpcm import __version__
from vitpcm.cli import data, run, tools, weights
from vitpcm.errors import VitpcmError


def build_parser() -> argparse.ArgumentParser:
    """The full ``vitpcm`` argument parser (one subparser per pipeline step)."""
    parser = argparse.ArgumentParser(
        prog="vitpcm",
        description=(
            "ViT-PCM weakly supervised semantic segmentation (ECCV 2022): "
            "data, training, evaluation and CRF inference, one step at a time."
        ),
    )
    parser.add_argument("--version", action="version", version=f"vitpcm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (data, run, weights, tools):
        group.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command and return its exit code (never calls ``sys.exit``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow and absl log every checkpoint and device placement at INFO; ours says enough.
    for noisy in ("absl", "tensorflow", "h5py"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args.handler(args))
    except VitpcmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """Console-script entry point: exits through the tensorflow-io-safe path."""
    from vitpcm import storage

    rc = main()
    if storage.s3_used():
        storage.exit_process(rc)
    sys.exit(rc)

"""``vitpcm weights``: fetch public ViT checkpoints, import the authors' released weights."""

from __future__ import annotations

import argparse
from typing import Any

from vitpcm.cli.common import add_config_args, add_no_progress, load_cfg
from vitpcm.model.backbones import fetchable


def _fetch(args: argparse.Namespace) -> int:
    from vitpcm.model.pretrained import fetch_pretrained

    uri = fetch_pretrained(args.name, args.out, mirror=args.mirror, progress=not args.no_progress)
    print(f"{args.name} ready: {uri}")
    print(f"model.pretrained={uri}")
    return 0


def _import_reference(args: argparse.Namespace) -> int:
    from vitpcm.model.reference_weights import import_reference

    cfg = load_cfg(args)
    import_reference(cfg, args.file, out=args.out)
    print(
        f"imported {args.file} into {args.out} (model.keras, config.yaml with model.gelu=exact); "
        f"use it as -m {args.out} with eval, test, predict"
    )
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``weights fetch|import-reference`` to the top-level subparsers ``sub``."""
    weights = sub.add_parser("weights", help="fetch pretrained ViT weights, import released ones")
    actions = weights.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    p = actions.add_parser(
        "fetch",
        help="download a public Google ViT checkpoint (resumable, verified)",
        description=(
            "Download the .npz checkpoint a config starts from (model.pretrained), resuming a "
            "partial file, and check it holds the named backbone; its SHA-256 is recorded and "
            "checked on later runs. Prints the model.pretrained=... value to use. Names: "
            + "; ".join(f"{e.name}: {e.description}" for e in fetchable().values())
        ),
    )
    p.add_argument("name", metavar="NAME", choices=list(fetchable()))
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix to put it in")
    p.add_argument("--mirror", metavar="BASE_URL", help="fetch BASE_URL/<file name> instead")
    add_no_progress(p)
    p.set_defaults(handler=_fetch)

    p = actions.add_parser(
        "import-reference",
        help="convert the ViT-PCM authors' Keras 2 .h5 checkpoint into a model folder",
        description=(
            "Read a checkpoint written by the authors' TF 2.9 / Keras 2 code (HDF5 weights "
            "file), check every array against the model of -c (missing, extra or mis-shaped "
            "arrays are refused), and write a model folder (model.keras + config.yaml, exact "
            "GELU) that eval, test, predict and registration accept."
        ),
    )
    p.add_argument("file", metavar="FILE", help="the authors' .h5 checkpoint (path or s3://)")
    add_config_args(p)
    p.add_argument("--out", required=True, help="model folder to write (path or s3://)")
    p.set_defaults(handler=_import_reference)

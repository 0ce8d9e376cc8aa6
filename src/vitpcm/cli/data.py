"""``vitpcm data``: download, convert or synthesise a dataset."""

from __future__ import annotations

import argparse
from typing import Any

from vitpcm.cli.common import add_no_progress, count, positive_float, positive_int


def _checksum_pin(text: str) -> tuple[str, str]:
    from vitpcm.data.http_fetch import parse_checksum
    from vitpcm.errors import ConfigError

    name, sep, digest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=sha256:HEX, got {text!r}")
    try:
        algo, value = parse_checksum(digest)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return name, f"{algo}:{value}"


def _download(args: argparse.Namespace) -> int:
    from vitpcm import outputs
    from vitpcm.data.archives import UnpackLimits
    from vitpcm.data.download import download_dataset
    from vitpcm.data.sources import get_source
    from vitpcm.errors import ConfigError

    checksums = dict(args.checksum)
    files = get_source(args.dataset).files
    unknown = sorted(set(checksums) - {f.name for f in files})
    if unknown:
        names = ", ".join(f.name for f in files)
        raise ConfigError(
            f"--checksum names no file of {args.dataset}: {unknown}; its files: {names}"
        )
    # Downloads merge into --out and resume there: it must be new, empty or a download.
    if "://" not in args.out:  # download_dataset explains why --out must be local
        outputs.claim_output(args.out, "data download")
        outputs.write_marker(args.out, "data download")
    root = download_dataset(
        args.dataset,
        args.out,
        mirror=args.mirror,
        skip_checksum=args.skip_checksum,
        progress=not args.no_progress,
        checksums=checksums or None,
        retries=args.retries,
        timeout=args.timeout,
        limits=UnpackLimits(max_bytes=int(args.max_unpacked_gib * 2**30), max_ratio=args.max_ratio),
    )
    print(f"{args.dataset} ready in {root}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from vitpcm.data.convert import convert_dataset

    info = convert_dataset(
        args.dataset,
        args.src,
        args.out,
        shards=args.shards,
        workers=args.workers,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
    )
    sizes = ", ".join(f"{k}={v['num_examples']}" for k, v in info["splits"].items())
    print(f"wrote {args.out} ({sizes}; {info['num_classes']} classes)")
    skipped = info.get("skipped") or []
    if skipped:
        print(f"skipped {len(skipped)} bad samples (listed in dataset.json)")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from vitpcm.data import synth

    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    root = synth.make_synthetic(
        args.out,
        train=given(args.train, synth.DEFAULT_TRAIN),
        val=given(args.val, synth.DEFAULT_VAL),
        test=given(args.test, synth.DEFAULT_TEST),
        size=given(args.size, synth.DEFAULT_SIZE),
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(f"synthetic dataset in {root}")
    return 0


def add_parsers(sub: Any) -> None:
    """Add ``data download|convert|synth`` to the top-level subparsers ``sub``."""
    from vitpcm.data.sources import dataset_names, get_source

    data = sub.add_parser("data", help="download, convert or synthesise datasets")
    actions = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = actions.add_parser(
        "download",
        help="fetch and unpack PASCAL VOC 2012 (+SBD trainaug) or COCO 2014",
        description=(
            "Download the official archives (resuming partial files, verifying checksums) "
            "and unpack them into the standard layout. Safe to run again."
        ),
    )
    downloadable = [name for name in dataset_names() if get_source(name).files]
    p.add_argument("--dataset", required=True, choices=downloadable)
    p.add_argument("--out", required=True, help="folder to download and unpack into")
    p.add_argument(
        "--mirror", metavar="BASE_URL", help="fetch every archive as BASE_URL/<official name>"
    )
    p.add_argument(
        "--skip-checksum", action="store_true", help="warn instead of failing on a mismatch"
    )
    p.add_argument(
        "--checksum",
        type=_checksum_pin,
        action="append",
        default=[],
        metavar="NAME=sha256:HEX",
        help="expect this checksum for one file (repeatable), e.g. to pin the two SBD files, "
        "which have no published checksum",
    )
    p.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="an attempt fails after this long without an answer (30)",
    )
    p.add_argument(
        "--retries",
        type=count,
        default=5,
        help="failed attempts in a row before a file is given up (5); the worst case for a "
        "silent server is (retries + 1) x timeout plus back-off",
    )
    p.add_argument(
        "--max-unpacked-gib",
        type=positive_float,
        default=64.0,
        metavar="GIB",
        help="refuse an archive that unpacks to more than this (64)",
    )
    p.add_argument(
        "--max-ratio",
        type=positive_float,
        default=100.0,
        help="refuse an archive that unpacks to more than this many times its size (100)",
    )
    add_no_progress(p)
    p.set_defaults(handler=_download)

    p = actions.add_parser(
        "convert",
        help="write sharded TFRecords (+dataset.json) to a folder or s3://",
        description=(
            "Convert a downloaded (or synthetic) dataset into sharded TFRecords. Output is "
            "committed only when complete; byte-identical for any worker count."
        ),
    )
    p.add_argument("--dataset", required=True, choices=dataset_names())
    p.add_argument("--src", required=True, help="folder holding VOCdevkit/ or coco2014/")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--shards", type=positive_int, help="shards per split (default: ~1000/shard)")
    p.add_argument("--workers", type=positive_int, help="processes (default: all cores)")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip bad samples (listed in dataset.json)"
    )
    add_no_progress(p)
    p.set_defaults(handler=_convert)

    p = actions.add_parser(
        "synth",
        help="make the built-in synthetic dataset (VOC layout)",
        description=(
            "Generate a deterministic synthetic weakly supervised dataset: textured shapes of "
            "several classes on cluttered backgrounds, in the VOC folder layout."
        ),
    )
    p.add_argument("--out", required=True, help="output folder")
    # Defaults (None here, so --help stays instant) come from vitpcm.data.synth.DEFAULT_*:
    # the sizes the learning benchmark measures with configs/synthetic.yaml.
    p.add_argument("--train", type=positive_int, help="train images (2000)")
    p.add_argument("--val", type=positive_int, help="val images, model selection (100)")
    p.add_argument("--test", type=count, help="held-out test images, with masks (200)")
    p.add_argument("--size", type=positive_int, help="image side in px (128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    add_no_progress(p)
    p.set_defaults(handler=_synth)

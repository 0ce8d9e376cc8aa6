"""The ``vitpcm`` command: every pipeline step, runnable on a workstation.

Each subcommand parses its flags and calls one library function (imported lazily so
``vitpcm --help`` is instant). A :class:`~vitpcm.errors.VitpcmError` becomes one line
``error: ...`` on stderr and its exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from vitpcm import __version__
from vitpcm.errors import VitpcmError

log = logging.getLogger("vitpcm")

Handler = Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


# ----------------------------------------------------------------------------- data


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


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


def _data_download(args: argparse.Namespace) -> int:
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


def _data_convert(args: argparse.Namespace) -> int:
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


def _data_synth(args: argparse.Namespace) -> int:
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


# ----------------------------------------------------------------------------- train/eval/test


def _load_cfg(args: argparse.Namespace):
    """The config of train/eval/test: ``-c``, else the default of ``--data``'s dataset;
    checked against that dataset (vitpcm.run_plan) before any work."""
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


def _train(args: argparse.Namespace) -> int:
    from vitpcm.train import train

    cfg = _load_cfg(args)
    result = train(
        cfg,
        data_uri=args.data,
        out_uri=args.out,
        progress=not args.no_progress,
        force_config=args.force_config,
    )
    train_miou = result.get("train_miou")
    also = "" if train_miou is None else f", train mIoU {train_miou:.4f}"
    print(
        f"best val mIoU {result['miou']:.4f} at epoch {result['best_epoch']}{also} "
        f"({result['epochs_run']} epochs); outputs in {args.out}"
    )
    run = result.get("mlflow")
    if run:
        where = f"MLflow run {run['run_id']}" if run.get("run_id") else "MLflow run (not created)"
        line = f"{where}, experiment {run['experiment']} at {run['tracking_uri']}"
        if run.get("run_id") and run.get("experiment_id") and run.get("tracking_uri"):
            from vitpcm.tracking.naming import ui_run_url

            url = ui_run_url(run["tracking_uri"], str(run["experiment_id"]), run["run_id"])
            line += f"\n  {url}"
        if run.get("pending"):
            line += (
                f"; {run['pending']} record(s) not sent yet: "
                f"`vitpcm mlflow replay {args.out}` sends them"
            )
        print(line)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vitpcm.eval import run_eval

    cfg = _load_cfg(args)
    metrics = run_eval(
        cfg,
        args.model,
        data_uri=args.data,
        out_dir=args.out,
        split=args.split,
        progress=not args.no_progress,
    )
    print(
        f"{metrics['split']}: BPM mIoU {metrics['miou']:.4f}, pixel accuracy "
        f"{metrics['pixel_accuracy']:.4f} ({metrics['num_images']} images); "
        f"metrics.json in {args.out}"
    )
    return 0


def _test(args: argparse.Namespace) -> int:
    from vitpcm.infer import run_test

    cfg = _load_cfg(args)
    metrics = run_test(
        cfg,
        args.model,
        data_uri=args.data,
        out_dir=args.out,
        crf=args.crf,
        split=args.split,
        progress=not args.no_progress,
    )
    line = f"{metrics['split']}: {metrics['num_images']} images"
    if "miou" in metrics:
        line += f", BPM mIoU {metrics['miou']:.4f}"
    if "miou_crf" in metrics:
        line += f", after CRF {metrics['miou_crf']:.4f}"
    print(f"{line}; pseudo masks and metrics.json in {args.out}")
    return 0


# ----------------------------------------------------------------------------- predict


def _predict(args: argparse.Namespace) -> int:
    from vitpcm.predict import FAILURES_FILE, run_predict

    summary = run_predict(
        args.model,
        args.inputs,
        args.out,
        crf=args.crf,
        overlays=args.overlays,
        size=args.size,
        threshold=args.threshold,
        workers=args.workers or 0,
        progress=not args.no_progress,
    )
    print(f"{summary.images} masks and predictions.jsonl in {args.out}")
    if summary.num_failed:
        total = summary.images + summary.num_failed
        print(
            f"error: {summary.num_failed} of {total} images failed (listed in "
            f"{args.out}/{FAILURES_FILE}); fix or remove them and run again",
            file=sys.stderr,
        )
        return 1
    return 0


# ----------------------------------------------------------------------------- weights


def _weights_fetch(args: argparse.Namespace) -> int:
    from vitpcm.model.pretrained import fetch_pretrained

    uri = fetch_pretrained(args.name, args.out, mirror=args.mirror, progress=not args.no_progress)
    print(f"{args.name} ready: {uri}")
    print(f"model.pretrained={uri}")
    return 0


def _weights_import_reference(args: argparse.Namespace) -> int:
    from vitpcm.model.reference_weights import import_reference

    cfg = _load_cfg(args)
    import_reference(cfg, args.file, out=args.out)
    print(
        f"imported {args.file} into {args.out} (model.keras, config.yaml with model.gelu=exact); "
        f"use it as -m {args.out} with eval, test, predict"
    )
    return 0


# ----------------------------------------------------------------------------- config


def _config_show(args: argparse.Namespace) -> int:
    import yaml

    from vitpcm.config import load_config

    cfg = load_config(args.config, args.set)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _mlflow_replay(args: argparse.Namespace) -> int:
    from vitpcm.tracking import replay_spool

    sent = replay_spool(args.dir, tracking_uri=args.tracking_uri, progress=not args.no_progress)
    print(f"sent {sent} pending MLflow record(s) from {args.dir}")
    return 0


# ----------------------------------------------------------------------------- parser


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars (logs only)")


def _add_config_args(parser: argparse.ArgumentParser, follows_data: bool = False) -> None:
    follows = (
        "; default: the one for --data's dataset (synthetic, voc12_vit_s16, coco14_vit_b16)"
        if follows_data
        else ""
    )
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

    data = sub.add_parser("data", help="download, convert or synthesise datasets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = data_sub.add_parser(
        "download",
        help="fetch and unpack PASCAL VOC 2012 (+SBD trainaug) or COCO 2014",
        description=(
            "Download the official archives (resuming partial files, verifying checksums) "
            "and unpack them into the standard layout. Safe to run again."
        ),
    )
    p.add_argument("--dataset", required=True, choices=["voc12", "coco14"])
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
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="an attempt fails after this long without an answer (30)",
    )
    p.add_argument(
        "--retries",
        type=_count,
        default=5,
        help="failed attempts in a row before a file is given up (5); the worst case for a "
        "silent server is (retries + 1) x timeout plus back-off",
    )
    p.add_argument(
        "--max-unpacked-gib",
        type=_positive_float,
        default=64.0,
        metavar="GIB",
        help="refuse an archive that unpacks to more than this (64)",
    )
    p.add_argument(
        "--max-ratio",
        type=_positive_float,
        default=100.0,
        help="refuse an archive that unpacks to more than this many times its size (100)",
    )
    _add_common(p)
    p.set_defaults(handler=_data_download)

    p = data_sub.add_parser(
        "convert",
        help="write sharded TFRecords (+dataset.json) to a folder or s3://",
        description=(
            "Convert a downloaded (or synthetic) dataset into sharded TFRecords. Output is "
            "committed only when complete; byte-identical for any worker count."
        ),
    )
    p.add_argument("--dataset", required=True, choices=["voc12", "coco14"])
    p.add_argument("--src", required=True, help="folder holding VOCdevkit/ or coco2014/")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--shards", type=_positive_int, help="shards per split (default: ~1000/shard)")
    p.add_argument("--workers", type=_positive_int, help="processes (default: all cores)")
    p.add_argument(
        "--skip-bad", action="store_true", help="skip bad samples (listed in dataset.json)"
    )
    _add_common(p)
    p.set_defaults(handler=_data_convert)

    p = data_sub.add_parser(
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
    p.add_argument("--train", type=_positive_int, help="train images (2000)")
    p.add_argument("--val", type=_positive_int, help="val images, model selection (100)")
    p.add_argument("--test", type=_count, help="held-out test images, with masks (200)")
    p.add_argument("--size", type=_positive_int, help="image side in px (128)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    _add_common(p)
    p.set_defaults(handler=_data_synth)

    p = sub.add_parser(
        "train",
        help="train ViT-PCM (resumes when --out holds an unfinished run)",
        description=(
            "Warm-up with the backbone frozen, then fine-tune the last blocks; BCE + ET + L2 "
            "losses; validation (and training-subset) mIoU each epoch; best checkpoint kept; "
            "resumable. With mlflow.tracking_uri (--set) or $MLFLOW_TRACKING_URI, every "
            "epoch is logged live to one MLflow run; an outage never stops training."
        ),
    )
    _add_config_args(p, follows_data=True)
    p.add_argument("--data", help="TFRecord folder or s3:// URI (default: data.uri)")
    p.add_argument(
        "--out",
        required=True,
        help="output folder or s3:// URI: new, empty, or an earlier run to resume",
    )
    p.add_argument(
        "--force-config",
        action="store_true",
        help="resume a run whose config.yaml differs from this config (kept as config.<n>.yaml)",
    )
    _add_common(p)
    p.set_defaults(handler=_train)

    p = sub.add_parser(
        "eval",
        help="score baseline pseudo masks (mIoU at original resolution)",
        description=(
            "Baseline pseudo masks (label merge with the image labels) at each label's "
            "original resolution; writes metrics.json and confusion-matrix plots."
        ),
    )
    _add_config_args(p, follows_data=True)
    p.add_argument("-m", "--model", required=True, help="model.keras or a train output folder")
    p.add_argument("--data", help="TFRecord folder or s3:// URI (default: data.uri)")
    p.add_argument("--out", default="eval-out", help="output folder (default: eval-out)")
    p.add_argument("--split", help="split to score (default: data.val_split)")
    _add_common(p)
    p.set_defaults(handler=_eval)

    p = sub.add_parser(
        "test",
        help="inference at the test size, pseudo-mask PNGs, optional dense CRF",
        description=(
            "Inference at data.test_size; probability maps of the present classes and a "
            "VOC-palette PNG per image; with --crf, dense CRF over the present classes."
        ),
    )
    _add_config_args(p, follows_data=True)
    p.add_argument("-m", "--model", required=True, help="model.keras or a train output folder")
    p.add_argument("--data", help="TFRecord folder or s3:// URI (default: data.uri)")
    p.add_argument("--out", default="test-out", help="output folder (default: test-out)")
    p.add_argument("--split", help="split to run (default: data.test_split)")
    p.add_argument("--crf", action="store_true", help="also refine with the dense CRF")
    _add_common(p)
    p.set_defaults(handler=_test)

    p = sub.add_parser(
        "predict",
        help="masks for your own images (JPEG/PNG files, folders, s3://)",
        description=(
            "Predict a VOC-palette mask per image at its own size, with the classes the model "
            "itself finds present (image-level score >= --threshold, background always a "
            "candidate) merged as in `vitpcm test`; one line per image in predictions.jsonl. "
            "Bad images are skipped, listed in failures.jsonl, and make the exit code 1."
        ),
    )
    p.add_argument(
        "-m",
        "--model",
        required=True,
        help="model folder, .keras file, or MLflow URI (models:/NAME@champion, runs:/ID/model)",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders or s3:// prefixes"
    )
    p.add_argument("--out", required=True, help="output folder (must not exist yet)")
    p.add_argument("--crf", action="store_true", help="refine with the dense CRF (all cores)")
    p.add_argument("--overlays", action="store_true", help="also write overlays/<stem>.jpg")
    p.add_argument(
        "--size",
        type=_positive_int,
        metavar="PX",
        help="side the network sees (default: the config's data.test_size)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="image-level score at which a class is present (default: 0.5)",
    )
    p.add_argument("--workers", type=_positive_int, help="CRF processes (default: all cores)")
    _add_common(p)
    p.set_defaults(handler=_predict)

    weights = sub.add_parser("weights", help="fetch pretrained ViT weights, import released ones")
    weights_sub = weights.add_subparsers(dest="weights_command", metavar="ACTION", required=True)
    p = weights_sub.add_parser(
        "fetch",
        help="download a public Google ViT checkpoint (resumable, verified)",
        description=(
            "Download the .npz checkpoint a config starts from (model.pretrained), resuming a "
            "partial file, and check it holds the named backbone; its SHA-256 is recorded and "
            "checked on later runs. Prints the model.pretrained=... value to use. Names: "
            "vit_s16 (AugReg S/16, 384 px), vit_b16 and vit_l16 (ImageNet-21k + 1k, 384 px)."
        ),
    )
    p.add_argument("name", metavar="NAME", choices=["vit_s16", "vit_b16", "vit_l16"])
    p.add_argument("--out", required=True, help="folder or s3://bucket/prefix to put it in")
    p.add_argument("--mirror", metavar="BASE_URL", help="fetch BASE_URL/<file name> instead")
    _add_common(p)
    p.set_defaults(handler=_weights_fetch)

    p = weights_sub.add_parser(
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
    _add_config_args(p)
    p.add_argument("--out", required=True, help="model folder to write (path or s3://)")
    p.set_defaults(handler=_weights_import_reference)

    cfg = sub.add_parser("config", help="show a resolved config")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    p = cfg_sub.add_parser("show", help="print the config with defaults and overrides applied")
    _add_config_args(p)
    p.set_defaults(handler=_config_show)

    ml = sub.add_parser("mlflow", help="MLflow helpers (replay records spooled during an outage)")
    ml_sub = ml.add_subparsers(dest="mlflow_command", metavar="ACTION", required=True)
    p = ml_sub.add_parser(
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
    _add_common(p)
    p.set_defaults(handler=_mlflow_replay)

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

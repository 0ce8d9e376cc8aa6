"""``vitpcm train|eval|test|predict``: train, score, infer, predict your own images."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vitpcm.cli.common import add_config_args, add_no_progress, load_cfg, positive_int

_DATA_HELP = "TFRecord folder or s3:// URI (default: data.uri)"


def _train(args: argparse.Namespace) -> int:
    from vitpcm.train import train

    cfg = load_cfg(args)
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

    cfg = load_cfg(args)
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

    cfg = load_cfg(args)
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


def _add_scoring(p: argparse.ArgumentParser, out: str, split: str) -> None:
    """The flags ``eval`` and ``test`` share: config, model, data, output folder, split."""
    add_config_args(p, follows_data=True)
    p.add_argument("-m", "--model", required=True, help="model.keras or a train output folder")
    p.add_argument("--data", help=_DATA_HELP)
    p.add_argument("--out", default=out, help=f"output folder (default: {out})")
    p.add_argument("--split", help=f"split to run (default: data.{split})")


def add_parsers(sub: Any) -> None:
    """Add ``train``, ``eval``, ``test`` and ``predict`` to the subparsers ``sub``."""
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
    add_config_args(p, follows_data=True)
    p.add_argument("--data", help=_DATA_HELP)
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
    add_no_progress(p)
    p.set_defaults(handler=_train)

    p = sub.add_parser(
        "eval",
        help="score baseline pseudo masks (mIoU at original resolution)",
        description=(
            "Baseline pseudo masks (label merge with the image labels) at each label's "
            "original resolution; writes metrics.json and confusion-matrix plots."
        ),
    )
    _add_scoring(p, "eval-out", "val_split")
    add_no_progress(p)
    p.set_defaults(handler=_eval)

    p = sub.add_parser(
        "test",
        help="inference at the test size, pseudo-mask PNGs, optional dense CRF",
        description=(
            "Inference at data.test_size; probability maps of the present classes and a "
            "VOC-palette PNG per image; with --crf, dense CRF over the present classes."
        ),
    )
    _add_scoring(p, "test-out", "test_split")
    p.add_argument("--crf", action="store_true", help="also refine with the dense CRF")
    add_no_progress(p)
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
        type=positive_int,
        metavar="PX",
        help="side the network sees (default: the config's data.test_size)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="image-level score at which a class is present (default: 0.5)",
    )
    p.add_argument("--workers", type=positive_int, help="CRF processes (default: all cores)")
    add_no_progress(p)
    p.set_defaults(handler=_predict)

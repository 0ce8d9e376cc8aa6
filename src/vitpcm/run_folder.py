"""A training run's folder: who may write it, what a restart may change, what a failure leaves.

Used by :func:`vitpcm.train.train`:

* :func:`check_same_config` refuses to continue a run whose ``config.yaml`` differs from the
  config given now, naming the differing keys (``--force-config`` continues anyway and keeps
  the old config as ``config.<n>.yaml``);
* :func:`remove_failed_start` removes what a start that failed before its first checkpoint
  wrote, so no half-made run folder is left;
* :func:`one_line_error` turns a TensorFlow error into one :class:`TrainingError` line with
  what to do (its traceback goes to the debug log).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vitpcm import storage
from vitpcm.config import Config
from vitpcm.errors import ConfigError, VitpcmError
from vitpcm.run_files import CONFIG_FILE

log = logging.getLogger(__name__)

STATE_JSON = "state.json"
# Keys that shape the checkpoint's variables: never changed on resume, even with
# --force-config (the checkpoint would not load into the model they build).
STRUCTURE_KEYS = (
    "model.backbone",
    "model.patch_size",
    "model.hidden_dim",
    "model.depth",
    "model.num_heads",
    "model.mlp_dim",
    "model.lstm_units",
    "model.pos_embed_grid",
    "data.num_classes",
)


class TrainingError(VitpcmError):
    """TensorFlow stopped the training (bad record, out of memory...): one line for the user."""


def check_same_config(out_uri: str, cfg: Config, force: bool) -> None:
    """Refuse to continue a run with another config, naming the keys (or keep the old one)."""
    import yaml

    saved_uri = storage.join(out_uri, CONFIG_FILE)
    if not storage.exists(saved_uri):
        return
    try:
        saved = yaml.safe_load(storage.read_bytes(saved_uri))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{saved_uri} is not valid YAML ({exc}); choose a new --out") from None
    changed = _differences(saved, yaml.safe_load(cfg.to_yaml()))
    if not changed:
        return
    shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed[:8])
    more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
    fixed = [key for key, _, _ in changed if key in STRUCTURE_KEYS]
    if fixed:
        raise ConfigError(
            f"{out_uri} holds a run with a different config ({shown}{more}); its checkpoint "
            f"cannot take another {', '.join(fixed)}: resume it with the same config or "
            "choose a new --out"
        )
    if not force:
        raise ConfigError(
            f"{out_uri} holds a run trained with another config ({shown}{more}); rerun with "
            "the same config, choose a new --out, or pass --force-config to continue this "
            "run with the new values"
        )
    index = 1
    while storage.exists(storage.join(out_uri, f"config.{index}.yaml")):
        index += 1
    kept = storage.join(out_uri, f"config.{index}.yaml")
    storage.write_bytes(kept, storage.read_bytes(saved_uri))
    log.warning(
        "--force-config: continuing %s with %s%s; old config kept as %s", out_uri, shown, more, kept
    )


def _differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted key, old, new)`` for every leaf that differs between two config trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def remove_failed_start(out_uri: str, created: bool) -> None:
    """After a start that failed before its first checkpoint, remove what it wrote."""
    if storage.exists(storage.join(out_uri, STATE_JSON)):
        return  # an epoch finished: the run is resumable, keep it
    try:
        if created:
            storage.remove_tree(out_uri)
        else:  # the folder was there (empty) before: leave it, empty
            storage.remove_files(out_uri, storage.list_files(out_uri))
            if not storage.is_s3(out_uri):
                for name in os.listdir(out_uri):
                    storage.remove_tree(os.path.join(out_uri, name))
    except Exception:  # cleaning up must not hide the error that stopped the run
        log.warning("could not remove the failed run's files in %s", out_uri, exc_info=True)


def is_tf_error(exc: BaseException) -> bool:
    import sys

    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(exc, tf.errors.OpError)


def one_line_error(exc: BaseException, data_uri: str, out_uri: str) -> BaseException:
    """A TensorFlow error as one :class:`TrainingError` line (the traceback goes to the log)."""
    if not is_tf_error(exc):
        return exc
    log.debug("training stopped by a TensorFlow error", exc_info=exc)
    message = str(getattr(exc, "message", "") or exc).strip().splitlines()
    first = (message[0] if message else "").split(" [Op:")[0].split("}} ")[-1][:300]
    name = type(exc).__name__
    if name == "ResourceExhaustedError":
        hint = "out of memory: lower train.batch_size or data.image_size"
    elif name in ("InvalidArgumentError", "DataLossError"):
        hint = (
            f"a record in {data_uri} cannot be read; convert the dataset again "
            "(vitpcm data convert decodes every image and names a bad one)"
        )
    else:
        hint = "see the log with -v for details"
    where = (
        ""
        if not storage.exists(storage.join(out_uri, STATE_JSON))
        else (f"; {out_uri} resumes from its last completed epoch")
    )
    return TrainingError(f"training stopped: {name}: {first}; {hint}{where}")

"""Backbone pre-training for configs that have no checkpoint to start from.

ViT-PCM fine-tunes an ImageNet-pretrained ViT: its patch features already tell classes apart
and look alike over a whole object, so the per-patch classifier fires on every patch of it
and global max pooling recovers the shape (METHOD.md). A backbone trained from scratch with
max pooling learns from one patch per class and image and ends up firing on a few
discriminative spots. When ``train.pretrain_epochs`` is set (the small from-scratch configs),
training therefore starts with a pre-training stage that plays ImageNet's part, on the same
images and the same image-level labels (no masks):

- the backbone's patch tokens are averaged (global average pooling) and a linear head
  predicts the foreground classes, multi-label sigmoid cross-entropy: every patch takes part
  in every decision, so object patches all become class evidence;
- Adam with a linear warm-up over the first epoch and a cosine decay to zero;
- the backbone is written as ``<out>/pretrain/backbone.npz`` in the layout of the public ViT
  checkpoints and loaded by the ordinary loader, so the paper's schedule (frozen warm-up, then
  fine-tuning the last blocks) follows unchanged. The head is thrown away.

A finished stage is recorded in ``pretrain.json`` with the config it depends on; a resumed
training reuses it. A stage killed half-way starts again (it is minutes long).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any

from vitpcm import storage
from vitpcm.config import Config
from vitpcm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PRETRAIN_DIR = "pretrain"
BACKBONE_NPZ = "backbone.npz"
PRETRAIN_JSON = "pretrain.json"


def _signature(cfg: Config) -> dict[str, Any]:
    """What the pre-trained weights depend on: reusing them under other values would be wrong."""
    t = cfg.train
    return {
        "model": cfg.to_dict()["model"],
        "image_size": cfg.data.image_size,
        "train_split": cfg.data.train_split,
        "batch_size": t.batch_size,
        "pretrain_epochs": t.pretrain_epochs,
        "pretrain_lr": t.pretrain_lr,
        "seed": t.seed,
    }


def _without_et(cfg: Config) -> Config:
    """The config with the ET second view off: pre-training reads only the main view."""
    et = dataclasses.replace(cfg.train.et, enabled=False)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, et=et))


def pretrain_backbone(
    cfg: Config,
    *,
    data_uri: str,
    out_uri: str,
    strategy: Any,
    num_classes: int,
    steps: int,
    progress: bool = True,
) -> str:
    """Pre-train the backbone of ``cfg.model`` (or reuse a finished stage); return its ``.npz``.

    Args:
        cfg: The resolved config (``train.pretrain_epochs`` > 0).
        data_uri: Converted dataset (local folder or ``s3://``).
        out_uri: This worker's output folder; the stage writes ``<out>/pretrain/``.
        strategy: The distribution strategy training uses (the stage runs in lockstep).
        num_classes: Classes in the dataset, background included.
        steps: Train steps per epoch (as the training stage uses).
        progress: Show a progress bar per epoch.

    Returns:
        URI of the pre-trained backbone checkpoint.
    """
    folder = storage.join(out_uri, PRETRAIN_DIR)
    npz_uri = storage.join(folder, BACKBONE_NPZ)
    record_uri = storage.join(folder, PRETRAIN_JSON)
    signature = _signature(cfg)
    if storage.exists(record_uri) and storage.exists(npz_uri):
        record = json.loads(storage.read_bytes(record_uri))
        if record.get("signature") != signature:
            raise ConfigError(
                f"{folder} holds a backbone pre-trained with another config; resume with the "
                "same config or choose a new --out"
            )
        log.info("reusing the pre-trained backbone %s", npz_uri)
        return npz_uri
    if num_classes < 2:
        raise DataError("pre-training needs at least one foreground class")

    import keras
    import tensorflow as tf
    from tqdm.auto import tqdm

    from vitpcm.data.reader import dataset_from_config
    from vitpcm.model.vit_backbone import ViTBackbone
    from vitpcm.model.vit_weights import save_vit_npz

    epochs = cfg.train.pretrain_epochs
    replicas = strategy.num_replicas_in_sync
    with strategy.scope():
        backbone = ViTBackbone.from_model_config(cfg.model)
        images = keras.Input((None, None, 3), name="images")
        scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale")(images)
        pooled = keras.layers.GlobalAveragePooling2D(name="gap")(backbone(scaled))
        logits = keras.layers.Dense(num_classes - 1, name="pretrain_head", dtype="float32")(pooled)
        model = keras.Model(images, logits, name="pretrain")
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=max(1, (epochs - 1) * steps),
            warmup_target=cfg.train.pretrain_lr,
            warmup_steps=steps,
        )
        optimizer = keras.optimizers.Adam(learning_rate=schedule)
        optimizer.build(model.trainable_variables)

    def replica_step(batch: dict[str, Any]) -> Any:
        # Background is in every image: only the foreground classes carry information.
        labels = tf.cast(batch["labels"][:, 1:], tf.float32)
        with tf.GradientTape() as tape:
            out = model(batch["image"], training=True)
            per_class = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=out)
            loss = tf.reduce_mean(per_class)
            scaled_loss = loss / replicas
        grads = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    @tf.function
    def step(batch: dict[str, Any]) -> Any:
        return strategy.reduce("MEAN", strategy.run(replica_step, args=(batch,)), axis=None)

    history = []
    start = time.perf_counter()
    no_et = _without_et(cfg)
    for epoch in range(epochs):
        dataset = dataset_from_config(no_et, cfg.data.train_split, training=True, uri=data_uri)
        dataset = strategy.experimental_distribute_dataset(dataset.take(steps))
        bar = tqdm(
            total=steps,
            desc=f"pre-train {epoch + 1}/{epochs}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        total, done = 0.0, 0
        for batch in dataset:
            loss = float(step(batch))
            if not math.isfinite(loss):
                raise DataError(
                    f"non-finite pre-training loss at epoch {epoch + 1}; lower train.pretrain_lr"
                )
            total, done = total + loss, done + 1
            bar.update(1)
            bar.set_postfix(loss=f"{total / done:.4f}")
        bar.close()
        history.append({"epoch": epoch + 1, "loss": total / max(done, 1)})
        log.info("pre-train epoch %d/%d: loss %.4f", epoch + 1, epochs, history[-1]["loss"])

    save_vit_npz(backbone, npz_uri)
    record = {
        "signature": signature,
        "history": history,
        "seconds": round(time.perf_counter() - start, 1),
    }
    # The record goes last: its presence says the checkpoint beside it is complete.
    storage.write_bytes(record_uri, json.dumps(record, indent=2).encode())
    return npz_uri

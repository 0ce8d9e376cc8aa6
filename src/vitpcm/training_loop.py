"""The training loop of ``vitpcm train``: schedule, model, optimizers, step and checkpoints.

:func:`schedule` splits the epochs into phases (warm-up with the backbone frozen, then
fine-tuning); :class:`TrainingLoop` builds the model and one Adam per phase under the
distribution strategy, compiles the distributed train step of the current phase (BCE + ET + L2,
gradients all-reduced across replicas by the optimizer) and checkpoints itself (model,
optimizers, dropout RNG state) with the :class:`LoopState` that :func:`vitpcm.train.train`
keeps across restarts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vitpcm import events, storage
from vitpcm.config import Config
from vitpcm.errors import ConfigError, DataError
from vitpcm.run_folder import STATE_JSON, STRUCTURE_KEYS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """One stage of the schedule: which epochs, which learning rate, how much is unfrozen."""

    name: str
    first_epoch: int
    end_epoch: int
    lr: float
    unfreeze_blocks: int | None  # None: the whole backbone trains (from-scratch configs)


def schedule(cfg: Config) -> list[Phase]:
    """Warm-up (backbone frozen) then fine-tuning (last blocks + final norm unfrozen)."""
    t = cfg.train
    phases = []
    if t.warmup_epochs > 0:
        phases.append(Phase("warmup", 0, t.warmup_epochs, t.warmup_lr, 0))
    phases.append(
        Phase("finetune", t.warmup_epochs, t.warmup_epochs + t.epochs, t.lr, t.unfreeze_blocks)
    )
    return phases


def phase_at(phases: Sequence[Phase], epoch: int) -> Phase:
    """The phase that ``epoch`` (counted from 0) belongs to; the last one past the end."""
    for phase in phases:
        if phase.first_epoch <= epoch < phase.end_epoch:
            return phase
    return phases[-1]


@dataclass
class LoopState:
    """What the loop must remember across a restart (saved as ``state.json``)."""

    next_epoch: int = 0
    best_miou: float = -1.0
    best_epoch: int = -1
    epochs_since_best: int = 0
    checkpoint: str | None = None
    history: list[dict[str, float]] | None = None

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LoopState:
        return cls(**json.loads(data))


def model_signature(cfg: Config, num_classes: int) -> dict[str, Any]:
    """The config keys a checkpoint depends on: resuming with others would be wrong."""
    sig = dict(cfg.to_dict()["model"])
    sig["num_classes"] = num_classes
    sig["image_size"] = cfg.data.image_size
    sig["batch_size"] = cfg.train.batch_size
    return sig


class TrainingLoop:
    """Model, optimizers and the distributed train step; knows how to checkpoint itself."""

    def __init__(self, cfg: Config, strategy: Any, num_classes: int, global_batch: int) -> None:
        import keras
        import tensorflow as tf

        from vitpcm.model.vitpcm import build_vitpcm, set_backbone_trainable

        self.cfg = cfg
        self.strategy = strategy
        self.global_batch = global_batch
        self._set_trainable = set_backbone_trainable
        self._phase: Phase | None = None
        self._step_fn: Any = None
        with strategy.scope():
            self.model = build_vitpcm(cfg.model, num_classes)
            if cfg.model.pretrained:
                from vitpcm.model.vit_weights import load_vit_npz
                from vitpcm.model.vitpcm import backbone_of

                load_vit_npz(backbone_of(self.model), cfg.model.pretrained)
            self.optimizers = {}
            for phase in schedule(cfg):
                set_backbone_trainable(self.model, phase.unfreeze_blocks)
                opt = keras.optimizers.Adam(learning_rate=phase.lr)
                opt.build(self.model.trainable_variables)
                self.optimizers[phase.name] = opt
            # Dropout draws from Keras seed generators whose state tf.train.Checkpoint does not
            # track on its own; checkpoint it explicitly so a resumed run draws the same masks.
            # `variables` is `weights` plus the seed generators' states (Keras' Layer API).
            weights = {id(w) for w in self.model.weights}
            rng = {
                f"rng_{i}": v.value
                for i, v in enumerate(self.model.variables)
                if id(v) not in weights
            }
            self._ckpt = tf.train.Checkpoint(model=self.model, rng=rng, **self.optimizers)

    # -- resumption ---------------------------------------------------------------------

    def restore_or_start(
        self,
        out: str,
        signature: dict[str, Any],
        force: bool = False,
        resume_from: str | None = None,
    ) -> LoopState:
        """Restore the last completed epoch or start fresh (recording the config in ``out``).

        Args:
            out: This worker's own folder: where it records the config and checkpoints.
            signature: The keys the run's config must keep to resume.
            force: ``--force-config``: only the keys that shape the checkpoint's variables
                must match.
            resume_from: The run folder whose checkpoint to restore (the chief's; default
                ``out``). It is only read.
        """
        source = resume_from or out
        sig_uri = storage.join(source, "checkpoints", "signature.json")
        state_uri = storage.join(source, STATE_JSON)
        if not storage.exists(state_uri):
            own_sig = storage.join(out, "checkpoints", "signature.json")
            storage.write_bytes(own_sig, json.dumps(signature, sort_keys=True).encode())
            return LoopState(history=[])
        saved = json.loads(storage.read_bytes(sig_uri)) if storage.exists(sig_uri) else {}
        diff = sorted(k for k in set(saved) | set(signature) if saved.get(k) != signature.get(k))
        if force:
            diff = [k for k in diff if f"model.{k}" in STRUCTURE_KEYS or k in ("num_classes",)]
        if diff:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {signature.get(k)!r}" for k in diff)
            raise ConfigError(
                f"{out} holds a run with a different config ({details}); resume it with the "
                "same config or choose a new --out"
            )
        state = LoopState.from_json(storage.read_bytes(state_uri))
        if state.checkpoint:
            # Relative to <out> (older runs stored a path as given: only its name counts).
            path = storage.join(source, "checkpoints", posixpath.basename(state.checkpoint))
            if not storage.glob(path + ".index"):
                raise DataError(
                    f"{state_uri} names checkpoint {state.checkpoint}, which is not in "
                    f"{storage.join(source, 'checkpoints')}; the run cannot resume: "
                    "choose a new --out"
                )
            self._ckpt.restore(path).assert_existing_objects_matched()
            log.info("resuming %s at epoch %d", source, state.next_epoch + 1)
            events.emit("resume", epoch=state.next_epoch + 1)
        return state

    def checkpoint(self, out: str, state: LoopState) -> None:
        """Save the epoch's checkpoint, then the state that points at it (in that order)."""
        prefix = storage.join(out, "checkpoints", f"epoch-{state.next_epoch:04d}")
        saved = self._ckpt.save(prefix)
        # Relative to <out>: the run resumes from any working directory.
        state.checkpoint = f"checkpoints/{posixpath.basename(saved)}"
        storage.write_bytes(storage.join(out, STATE_JSON), state.to_json())
        self._prune_checkpoints(out, keep=saved)

    def _prune_checkpoints(self, out: str, keep: str) -> None:
        keep_name = os.path.basename(keep)
        for path in storage.glob(storage.join(out, "checkpoints", "epoch-*")):
            if not os.path.basename(path).startswith(keep_name + "."):
                try:
                    import tensorflow as tf

                    tf.io.gfile.remove(path)
                except Exception:  # a leftover file costs disk, not correctness
                    log.debug("could not remove old checkpoint file %s", path)

    # -- training -----------------------------------------------------------------------

    def enter_phase(self, phase: Phase) -> None:
        """Freeze/unfreeze for ``phase`` and (re)build the compiled step when it changes."""
        if self._phase == phase:
            return
        self._phase = phase
        self._set_trainable(self.model, phase.unfreeze_blocks)
        self._step_fn = self._make_step(self.optimizers[phase.name])
        log.info(
            "phase %s: lr %g, %d trainable weights",
            phase.name,
            phase.lr,
            len(self.model.trainable_variables),
        )

    def _make_step(self, optimizer: Any) -> Any:
        import tensorflow as tf

        from vitpcm.model.equivariance import tile_mosaic
        from vitpcm.model.losses import total_loss
        from vitpcm.model.vitpcm import train_forward

        cfg = self.cfg
        model = self.model
        weights = cfg.train.loss_weights
        use_et = cfg.train.et.enabled
        replicas = self.strategy.num_replicas_in_sync
        classifier = model.get_layer("patch_classifier")
        fused = cfg.train.fused_step
        # XLA: the HV-BiLSTM's own fused scan (one loop for all directions); graph mode:
        # Keras' LSTMs (cuDNN on a GPU; on a CPU faster there than the scan).
        model.get_layer("hv_bilstm").implementation = "fused" if cfg.train.jit_compile else "keras"

        def replica_step(batch: dict[str, Any]) -> dict[str, Any]:
            images, labels = batch["image"], batch["labels"]
            with tf.GradientTape() as tape:
                if use_et and fused:
                    # One pass: main views and mosaics together, the dropout-free, gradient-free
                    # ET target (METHOD.md) from the main pass's activations where exact.
                    out = train_forward(model, images, tile_mosaic(batch["view2"]))
                    target, mosaic = out["target_patch_probs"], out["mosaic_patch_probs"]
                elif use_et:  # train.fused_step=false: the earlier three separate passes
                    out = model(images, training=True)
                    target = tf.stop_gradient(model(images, training=False)["patch_probs"])
                    mosaic = model(tile_mosaic(batch["view2"]), training=True)["patch_probs"]
                else:
                    out = model(images, training=True)
                et_inputs = {}
                if use_et:
                    et_inputs = {
                        "view1_patch_probs": target,
                        "mosaic_patch_probs": mosaic,
                        "params1": batch["params1"],
                        "params2": batch["params2"],
                    }
                terms = total_loss(
                    labels,
                    out["class_probs"],
                    kernel=classifier.kernel,
                    l2=cfg.model.l2,
                    weights=weights,
                    **et_inputs,
                )
                # Gradients are summed across replicas, so scale each replica's share.
                scaled = terms["total"] / replicas
            variables = model.trainable_variables
            grads = tape.gradient(scaled, variables)
            optimizer.apply_gradients(zip(grads, variables, strict=True))
            return {"loss": terms.pop("total"), **terms}

        # XLA compiles the per-replica body (Keras' own layout), so the cross-replica
        # reduction stays outside it. Faster (bench/train_step.py), but other dropout masks.
        body = replica_step
        if cfg.train.jit_compile:
            body = tf.function(replica_step, jit_compile=True)

        @tf.function
        def step(batch: dict[str, Any]) -> dict[str, Any]:
            per_replica = self.strategy.run(body, args=(batch,))
            return {k: self.strategy.reduce("MEAN", v, axis=None) for k, v in per_replica.items()}

        step.replica_step = body  # what one replica runs (bench/train_step.py reads its HLO)
        return step

    def run_epoch(
        self, dataset: Any, steps: int, epoch: int, total_epochs: int, progress: bool
    ) -> dict[str, float]:
        """Run ``steps`` train steps; return the epoch's mean loss terms."""
        from tqdm.auto import tqdm

        dist = self.strategy.experimental_distribute_dataset(dataset)
        sums: dict[str, float] = {}
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{total_epochs}",
            unit="step",
            disable=not progress,
            leave=False,
        )
        done = 0
        for batch in dist:
            if done >= steps:
                break
            values = {k: float(v) for k, v in self._step_fn(batch).items()}
            if not all(math.isfinite(v) for v in values.values()):
                raise DataError(
                    f"non-finite loss at epoch {epoch + 1} step {done + 1} ({values}); "
                    "lower the learning rate or enable fp32 (train.mixed_precision=false)"
                )
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss'] / done:.4f}")
        bar.close()
        if done == 0:
            raise DataError("the training split yielded no batch; check the dataset")
        return {k: v / done for k, v in sums.items()}

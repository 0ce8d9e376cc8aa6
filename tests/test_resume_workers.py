"""Workers of a distributed job resume from the chief's checkpoint, not their own.

A preemption can land between the chief's and another worker's checkpoint write: the
workers' own folders then hold different epochs, and resuming each from its own would
restart them one epoch apart (diverging weights, or a hang in a collective).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import keras
import numpy as np

from helpers.tiny import tiny_config
from vitpcm.training_loop import LoopState, TrainingLoop, model_signature


def _loop(seed: int) -> tuple[TrainingLoop, dict]:
    from vitpcm.distribute import make_strategy

    cfg = tiny_config()
    keras.utils.set_random_seed(seed)
    loop = TrainingLoop(cfg, make_strategy(), cfg.data.num_classes, cfg.train.batch_size)
    return loop, model_signature(cfg, cfg.data.num_classes)


def _weights(loop: TrainingLoop) -> list[np.ndarray]:
    return [v.numpy() for v in loop.model.weights]


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_worker_resumes_from_the_chiefs_epoch_and_weights(tmp_path: Path) -> None:
    chief_dir, own_dir = tmp_path / "run", tmp_path / "run" / "replicas" / "worker-1"
    chief, signature = _loop(seed=0)
    chief.restore_or_start(str(chief_dir), signature)
    chief.checkpoint(str(chief_dir), LoopState(next_epoch=2, history=[]))
    # The worker's own folder is one epoch behind, with other weights.
    stale, _ = _loop(seed=5)
    stale.restore_or_start(str(own_dir), signature)
    stale.checkpoint(str(own_dir), LoopState(next_epoch=1, history=[]))
    pairs = zip(_weights(chief), _weights(stale), strict=True)
    assert not all(np.array_equal(a, b) for a, b in pairs)
    before = _tree(chief_dir / "checkpoints")

    worker, _ = _loop(seed=9)
    state = worker.restore_or_start(str(own_dir), signature, resume_from=str(chief_dir))
    assert state.next_epoch == 2
    for got, want in zip(_weights(worker), _weights(chief), strict=True):
        np.testing.assert_array_equal(got, want)
    assert _tree(chief_dir / "checkpoints") == before  # the chief's folder is only read

    # Resuming from its own folder (what a worker did before) restarts an epoch behind.
    alone, _ = _loop(seed=9)
    assert alone.restore_or_start(str(own_dir), signature).next_epoch == 1

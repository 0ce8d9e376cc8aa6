"""The reader over ``s3://`` (a local moto server), run in a subprocess.

tensorflow-io aborts at interpreter exit in any process that touched ``s3://``, so the
reading happens in a child that leaves through ``vitpcm.storage.exit_process`` and prints
its findings as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers.s3_server import S3Server, s3_bucket, s3_server  # noqa: F401  (fixtures)
from test_reader import NUM_CLASSES, make_samples, write_dataset

_CHILD = textwrap.dedent(
    """
    import json, sys
    from vitpcm import storage
    from vitpcm.config import AugmentConfig, EtConfig
    from vitpcm.data.reader import make_dataset
    from vitpcm.errors import DataError

    uri = sys.argv[1]
    result = {}
    ds = make_dataset(uri, "val", image_size=32, batch_size=4, training=False, num_classes=4)
    batches = list(ds)
    result["names"] = [n.decode() for b in batches for n in b["filename"].numpy()]
    result["labels"] = [r.tolist() for b in batches for r in b["labels"].numpy()]
    result["masks"] = [
        b["mask"][i, : b["height"][i], : b["width"][i]].numpy().tolist()
        for b in batches
        for i in range(len(b["filename"]))
    ]
    train = make_dataset(
        uri, "train", image_size=32, batch_size=4, training=True, num_classes=4,
        augment=AugmentConfig(contrast=0.3, saturation=0.0, hue=0.0, grayscale_prob=0.0),
        et=EtConfig(enabled=True, view_size=16, crop_size=16, crop_prob=0.5), seed=1,
    )
    result["train_shapes"] = [
        {k: list(v.shape) for k, v in b.items()} for b in train
    ]
    try:
        make_dataset(uri + "-missing", "val", image_size=32, batch_size=1, training=False,
                     num_classes=4)
    except DataError as exc:
        result["missing_error"] = str(exc)
    print("RESULT " + json.dumps(result))
    storage.exit_process(0)
    """
)


def _upload(server: S3Server, root: Path, prefix: str) -> None:
    client = server.client()
    for path in sorted(root.iterdir()):
        client.upload_file(str(path), server.bucket, f"{prefix}/{path.name}")


@pytest.mark.slow
def test_make_dataset_reads_s3(s3_bucket: S3Server, tmp_path: Path) -> None:  # noqa: F811
    val = make_samples(6, seed=4)
    splits = {"train": make_samples(9, seed=5, fmt="jpeg"), "val": val}
    _upload(s3_bucket, write_dataset(tmp_path / "ds", splits), "data/tiny")

    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, s3_bucket.uri("data/tiny")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **s3_bucket.env()},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])

    assert result["names"] == [s.filename for s in val]  # every sample, in order
    assert result["labels"] == [s.labels.tolist() for s in val]
    assert result["masks"] == [s.mask.tolist() for s in val]
    assert len(result["train_shapes"]) == 2  # 9 samples, batch 4, remainder dropped
    assert result["train_shapes"][0] == {
        "image": [4, 32, 32, 3],
        "labels": [4, NUM_CLASSES],
        "params1": [4, 7],
        "view2": [4, 16, 16, 3],
        "params2": [4, 7],
    }
    assert "dataset.json" in result["missing_error"]
    assert "data/tiny-missing" in result["missing_error"]

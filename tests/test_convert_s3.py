"""`vitpcm data convert` to s3:// on a local moto server.

The conversion runs in a subprocess that leaves through ``storage.exit_process``:
tensorflow-io aborts at interpreter exit in any process that touched s3://, which would
break pytest's own exit code. The results are read back here with boto3.
"""

from __future__ import annotations

import inspect
import json
import os
import posixpath
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.s3_server import S3Server, s3_bucket, s3_server  # noqa: F401  (fixtures)
from test_convert import LISTS, make_voc
from vitpcm.data.convert import convert_dataset
from vitpcm.outputs import MARKER

SCRIPT = """
import json, sys
from vitpcm import storage
from vitpcm.data.convert import convert_dataset
from vitpcm.data.manifest import read_dataset_info
from vitpcm.errors import BadSampleError

src, bad_src, good, bad = sys.argv[1:5]
try:
    convert_dataset("voc12", bad_src, bad, shards=2, workers=2, progress=False)
except BadSampleError as exc:
    print("BAD", exc.path)
convert_dataset("voc12", src, good, shards=2, workers=2, progress=False)
info = read_dataset_info(good)
print("INFO", json.dumps(info))
print("READ", json.dumps(read_back(good, info["num_classes"])))
storage.exit_process(0)
"""


def read_back(uri: str, num_classes: int) -> dict[str, list]:
    """Every train sample through the reader: name -> [height, width, mask sum, labels]."""
    from vitpcm.data.reader import make_dataset

    ds = make_dataset(uri, "train", image_size=32, batch_size=2, training=False,
                      num_classes=num_classes, patch_size=16)  # fmt: skip
    seen = {}
    for batch in ds:
        for i, name in enumerate(batch["filename"].numpy()):
            h, w = int(batch["height"][i]), int(batch["width"][i])
            mask = batch["mask"].numpy()[i, :h, :w]
            seen[name.decode()] = [h, w, int(mask.astype("int64").sum()),
                                   batch["labels"].numpy()[i].tolist()]  # fmt: skip
    return seen


@pytest.mark.slow
def test_convert_to_s3_matches_local_output_and_cleans_up(
    s3_bucket: S3Server,  # noqa: F811  (fixture)
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    make_voc(src)
    bad_src = tmp_path / "bad"
    make_voc(bad_src)
    broken = bad_src / "VOCdevkit" / "VOC2012" / "JPEGImages" / "e.jpg"
    broken.write_bytes(broken.read_bytes()[:100])
    local = tmp_path / "local"
    convert_dataset("voc12", src, local, shards=2, workers=1, progress=False)

    done = subprocess.run(
        [
            sys.executable,
            "-c",
            inspect.getsource(read_back) + SCRIPT,
            str(src),
            str(bad_src),
            s3_bucket.uri("runs/voc"),
            s3_bucket.uri("runs/bad"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **s3_bucket.env()},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines["BAD"] == str(broken)

    keys = s3_bucket.list_keys()
    assert not [k for k in keys if not k.startswith("runs/voc/")]  # no bad/, no .tmp-*
    info = json.loads(lines["INFO"])
    # On S3 the shards sit under the generation that dataset.json (written last) commits.
    listed = [f for entry in info["splits"].values() for f in entry["files"]]
    assert len({posixpath.dirname(f) for f in listed}) == 1
    assert posixpath.dirname(listed[0]).startswith("gen-")
    assert sorted(k.removeprefix("runs/voc/") for k in keys) == sorted(
        [*listed, "dataset.json", MARKER]
    )
    names = sorted(p.name for p in local.iterdir())
    assert sorted(posixpath.basename(f) for f in listed) == [
        n for n in names if n.endswith(".tfrecord")
    ]
    for rel in listed:  # same input, same bytes, wherever the output goes
        name = posixpath.basename(rel)
        assert s3_bucket.read(f"runs/voc/{rel}") == (local / name).read_bytes(), name
    assert s3_bucket.read(f"runs/voc/{MARKER}") == (local / MARKER).read_bytes()
    local_info = json.loads((local / "dataset.json").read_text())
    for entry in info["splits"].values():
        entry["files"] = [posixpath.basename(f) for f in entry["files"]]
    assert info == local_info
    # The reader gives back over s3:// exactly what it gives from the local copy.
    from_s3 = json.loads(lines["READ"])
    assert from_s3 == read_back(str(local), info["num_classes"])
    assert len(from_s3) == len(LISTS["train"])
    assert {k: v["num_examples"] for k, v in info["splits"].items()} == {
        k: len(v) for k, v in LISTS.items()
    }

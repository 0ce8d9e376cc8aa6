"""`vitpcm data convert` to s3:// on a local moto server.

The conversion runs in a subprocess that leaves through ``storage.exit_process``:
tensorflow-io aborts at interpreter exit in any process that touched s3://, which would
break pytest's own exit code. The results are read back here with boto3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.s3_server import S3Server, s3_bucket, s3_server  # noqa: F401  (fixtures)
from test_convert import LISTS, make_voc
from vitpcm.data.convert import convert_dataset

SCRIPT = """
import json, sys
from vitpcm import storage
from vitpcm.data.convert import convert_dataset, read_dataset_info
from vitpcm.errors import BadSampleError

src, bad_src, good, bad = sys.argv[1:5]
try:
    convert_dataset("voc12", bad_src, bad, shards=2, workers=2, progress=False)
except BadSampleError as exc:
    print("BAD", exc.path)
convert_dataset("voc12", src, good, shards=2, workers=2, progress=False)
print("INFO", json.dumps(read_dataset_info(good)))
storage.exit_process(0)
"""


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
            SCRIPT,
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
    names = sorted(p.name for p in local.iterdir())
    assert [k.removeprefix("runs/voc/") for k in keys] == names
    for name in names:  # same input, same bytes, wherever the output goes
        assert s3_bucket.read(f"runs/voc/{name}") == (local / name).read_bytes(), name
    info = json.loads(lines["INFO"])
    assert {k: v["num_examples"] for k, v in info["splits"].items()} == {
        k: len(v) for k, v in LISTS.items()
    }

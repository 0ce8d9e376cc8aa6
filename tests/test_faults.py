"""Bad inputs and faults through the `vitpcm` command: one case per test.

Each test asserts the exit code, the one-line `error: ...` message, and that every byte
that was there before is still there (the tree is hashed before and after). The table of
cases is docs/RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers.s3_server import s3_bucket, s3_server, s3_with_auth  # noqa: F401  (fixtures)
from helpers.tiny import make_tiny_dataset
from vitpcm import cli, outputs
from vitpcm.data.synth import make_synthetic

TRAIN_MARKER = json.dumps({"tool": "vitpcm", "kind": "train", "format": 1})


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (itself included): path -> sha256 or ``dir``."""
    found = {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    """Run the CLI in-process; return the exit code and stderr's non-empty lines."""
    capsys.readouterr()
    rc = cli.main([*args, "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def one_error(err: list[str], *needles: str) -> str:
    """The single `error:` line of a refused command, which must name every needle."""
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err), err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic VOC-layout source (64 px)."""
    root = tmp_path_factory.mktemp("voc") / "voc"
    make_synthetic(root, train=8, val=4, test=2, size=64, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"))


def _convert(src: Path | str, out: Path | str) -> list[str]:
    return ["data", "convert", "--dataset", "voc12", "--src", str(src), "--out", str(out)]


# --------------------------------------------------------------------- output ownership


def test_convert_out_equal_to_src_is_refused(voc: Path, capsys: pytest.CaptureFixture) -> None:
    before = tree(voc)
    rc, err = run(capsys, *_convert(voc, voc))
    assert rc == 2
    one_error(err, f"--out {voc} is the input --src")
    assert tree(voc) == before


def test_convert_out_above_src_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The case that deleted a dataset and the files beside it: --src v/voc --out v.
    parent = tmp_path / "v"
    make_synthetic(parent / "voc", train=2, val=1, test=0, size=32, progress=False)
    (parent / "notes.txt").write_text("not the tool's")
    before = tree(parent)
    rc, err = run(capsys, *_convert(parent / "voc", parent))
    assert rc == 2
    one_error(err, f"--out {parent} contains the input --src", "would delete the input")
    assert tree(parent) == before


def test_convert_out_inside_src_is_refused(voc: Path, capsys: pytest.CaptureFixture) -> None:
    before = tree(voc)
    rc, err = run(capsys, *_convert(voc, voc / "records"))
    assert rc == 2
    one_error(err, "is inside the input --src")
    assert tree(voc) == before


def test_convert_out_an_existing_file_is_refused(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    target = tmp_path / "report.pdf"
    target.write_bytes(b"%PDF precious")
    rc, err = run(capsys, *_convert(voc, target))
    assert rc == 2
    one_error(err, f"--out {target} is an existing file")
    assert target.read_bytes() == b"%PDF precious"


def test_convert_out_a_foreign_folder_is_refused(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    foreign = tmp_path / "home"
    (foreign / "photos").mkdir(parents=True)
    (foreign / "photos" / "a.jpg").write_bytes(b"\xff\xd8 mine")
    before = tree(foreign)
    rc, err = run(capsys, *_convert(voc, foreign))
    assert rc == 2
    one_error(err, "is not empty and was not written by `vitpcm data convert`")
    assert tree(foreign) == before


def test_convert_out_holding_another_commands_output_is_refused(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "synth"
    make_synthetic(other, train=2, val=1, test=0, size=32, progress=False)
    before = tree(other)
    rc, err = run(capsys, *_convert(voc, other))
    assert rc == 2
    one_error(err, "holds the output of `vitpcm data synth`, not `vitpcm data convert`")
    assert tree(other) == before


def test_convert_replaces_only_its_own_output(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "records"
    assert run(capsys, *_convert(voc, out))[0] == 0
    first = tree(out)
    assert json.loads((out / outputs.MARKER).read_text())["kind"] == "data convert"
    (tmp_path / "records-notes.txt").write_text("beside it")
    assert run(capsys, *_convert(voc, out))[0] == 0
    assert tree(out) == first  # same input, same bytes
    assert (tmp_path / "records-notes.txt").read_text() == "beside it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records", "records-notes.txt"]


def test_reader_sees_the_old_or_the_new_output_during_a_local_commit(
    voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The folder is swapped in with one renameat2(RENAME_EXCHANGE): never missing."""
    import threading

    from vitpcm.data.convert import convert_dataset
    from vitpcm.storage import atomic

    out = tmp_path / "records"
    convert_dataset("voc12", voc, out, workers=1, progress=False)
    swaps: list[bool] = []
    real_exchange = atomic._exchange

    def exchange(a: str, b: str) -> bool:
        swaps.append(real_exchange(a, b))
        return swaps[-1]

    monkeypatch.setattr(atomic, "_exchange", exchange)
    missing: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                info = json.loads((out / "dataset.json").read_text())
            except (OSError, ValueError) as exc:
                missing.append(repr(exc))
                continue
            for entry in info["splits"].values():
                missing.extend(f for f in entry["files"] if not (out / f).is_file())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(2):
            convert_dataset("voc12", voc, out, workers=1, progress=False)
    finally:
        stop.set()
        reader.join()
    assert swaps == [True, True]
    assert missing == []


def test_killed_local_convert_temporaries_are_removed_by_the_next_run(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "records"
    # What a convert killed mid-way leaves: its marked temporary folder, owner long gone.
    stale = tmp_path / "records.tmp-0123abcd"
    stale.mkdir()
    outputs.write_marker(stale, "data convert")
    (stale / ".vitpcm-owner.json").write_text(json.dumps({"pid": 2**22 + 7, "host": os.uname()[1]}))
    (stale / "train-00000-of-00001.tfrecord").write_bytes(b"partial")
    # Look-alikes that are not ours stay: no marker, or another command's marker.
    lookalike = tmp_path / "records.tmp-89abcdef"
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("someone else's")
    before = tree(lookalike)
    assert run(capsys, *_convert(voc, out))[0] == 0
    assert not stale.exists()
    assert tree(lookalike) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records", "records.tmp-89abcdef"]


def test_eval_out_equal_to_the_model_folder_is_refused(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.keras").write_bytes(b"weights of three days")
    (run_dir / outputs.MARKER).write_text(TRAIN_MARKER)
    before = tree(run_dir)
    rc, err = run(capsys, "eval", "-c", "synthetic", "-m", str(run_dir), "--data",
                  str(tiny_data), "--out", str(run_dir))  # fmt: skip
    assert rc == 2
    one_error(err, f"--out {run_dir} is the input -m")
    assert tree(run_dir) == before


def test_test_out_inside_the_data_is_refused(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = tree(tiny_data)
    rc, err = run(capsys, "test", "-c", "synthetic", "-m", str(tmp_path / "model.keras"),
                  "--data", str(tiny_data), "--out", str(tiny_data / "masks"))  # fmt: skip
    assert rc == 2
    one_error(err, "is inside the input --data")
    assert tree(tiny_data) == before


def test_eval_out_holding_a_training_run_is_refused(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    other = tmp_path / "other-run"
    other.mkdir()
    (other / outputs.MARKER).write_text(TRAIN_MARKER)
    (other / "model.keras").write_bytes(b"another model")
    before = tree(other)
    rc, err = run(capsys, "eval", "-c", "synthetic", "-m", str(tmp_path / "m.keras"),
                  "--data", str(tiny_data), "--out", str(other))  # fmt: skip
    assert rc == 2
    one_error(err, "holds the output of `vitpcm train`, not `vitpcm eval`")
    assert tree(other) == before


def test_train_out_equal_to_the_data_is_refused(
    tiny_data: Path, capsys: pytest.CaptureFixture
) -> None:
    before = tree(tiny_data)
    rc, err = run(capsys, "train", "-c", "synthetic", "--data", str(tiny_data),
                  "--out", str(tiny_data))  # fmt: skip
    assert rc == 2
    one_error(err, "is the input --data")
    assert tree(tiny_data) == before


def test_train_out_a_foreign_folder_is_refused(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    foreign = tmp_path / "experiments"
    foreign.mkdir()
    (foreign / "config.yaml").write_text("my: own notes\n")
    before = tree(foreign)
    rc, err = run(capsys, "train", "-c", "synthetic", "--data", str(tiny_data),
                  "--out", str(foreign))  # fmt: skip
    assert rc == 2
    one_error(err, "is not empty and was not written by `vitpcm train`")
    assert tree(foreign) == before


def test_train_out_an_existing_file_is_refused(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    target = tmp_path / "run.tar"
    target.write_bytes(b"archive")
    rc, err = run(capsys, "train", "-c", "synthetic", "--data", str(tiny_data),
                  "--out", str(target))  # fmt: skip
    assert rc == 2
    one_error(err, "is an existing file")
    assert target.read_bytes() == b"archive"


def test_synth_out_a_foreign_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("chapter 1")
    before = tree(foreign)
    rc, err = run(capsys, "data", "synth", "--out", str(foreign), "--train", "2", "--val", "1")
    assert rc == 2
    one_error(err, "not written by `vitpcm data synth`")
    assert tree(foreign) == before


def test_download_out_a_foreign_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # A hand-made VOC folder: download would replace its SegmentationClassAug.
    foreign = tmp_path / "my-voc"
    (foreign / "VOCdevkit" / "VOC2012" / "SegmentationClassAug").mkdir(parents=True)
    (foreign / "VOCdevkit" / "VOC2012" / "SegmentationClassAug" / "a.png").write_bytes(b"mine")
    before = tree(foreign)
    rc, err = run(capsys, "data", "download", "--dataset", "voc12", "--out", str(foreign),
                  "--mirror", "http://127.0.0.1:9")  # fmt: skip
    assert rc == 2
    one_error(err, "not written by `vitpcm data download`")
    assert tree(foreign) == before


# --------------------------------------------------------------------- s3:// outputs

# Code run in a subprocess that touches s3:// (tensorflow-io aborts the interpreter that
# did at exit: see helpers/s3_server.py). KILL_AT makes the process SIGKILL itself at one
# moment of the commit, as a node losing power would.
S3_SCRIPT = """
import os, signal, sys
from vitpcm import storage
from vitpcm.data import convert
from vitpcm.data.reader import read_split_info
import tensorflow as tf

steps, src, out = sys.argv[1].split(","), sys.argv[2], sys.argv[3]
real_write, real_remove = storage.write_bytes, storage.remove_files
mode, committed = [None], []

def write_bytes(uri, data):
    if mode[0] == "kill-before-commit" and uri == out + "/dataset.json":
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(uri, data)
    if uri == out + "/dataset.json":
        committed.append(uri)

def remove_files(uri, relative):
    if mode[0] == "kill-after-commit" and committed and relative:
        real_remove(uri, list(relative)[:1])  # part of the old generation is gone
        os.kill(os.getpid(), signal.SIGKILL)
    real_remove(uri, relative)

storage.write_bytes, storage.remove_files = write_bytes, remove_files
convert.storage.write_bytes, convert.storage.remove_files = write_bytes, remove_files
for step in steps:
    if step == "read":
        records = tf.data.TFRecordDataset(list(read_split_info(out, "train").files))
        examples = [tf.train.Example.FromString(r.numpy()).features.feature for r in records]
        names = sorted(e["image/filename"].bytes_list.value[0].decode() for e in examples)
        print("TRAIN", ",".join(names), flush=True)
    else:
        mode[0] = step
        convert.convert_dataset("voc12", src, out, shards=2, workers=1, progress=False)
storage.exit_process(0)
"""


def _s3_run(bucket: Any, steps: str, src: Path | str, out: str) -> subprocess.CompletedProcess:
    """Run ``steps`` (``read``, ``convert``, ``kill-before-commit``...) in one subprocess."""
    return subprocess.run(
        [sys.executable, "-c", S3_SCRIPT, steps, str(src), out],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **bucket.env(), "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def _train_names(done: subprocess.CompletedProcess, ok: bool = True) -> list[list[str]]:
    """The train split's file names, once per ``read`` step that ran."""
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    lines = [x for x in done.stdout.splitlines() if x.startswith("TRAIN ")]
    return [line.removeprefix("TRAIN ").split(",") for line in lines]


def _objects(bucket: Any, prefix: str) -> dict[str, str]:
    return {key: hashlib.sha256(bucket.read(key)).hexdigest() for key in bucket.list_keys(prefix)}


def _referenced(bucket: Any, prefix: str) -> set[str]:
    info = json.loads(bucket.read(f"{prefix}/dataset.json"))
    files = {f"{prefix}/{f}" for entry in info["splits"].values() for f in entry["files"]}
    return files | {f"{prefix}/dataset.json", f"{prefix}/{outputs.MARKER}"}


@pytest.mark.slow
def test_s3_convert_killed_during_its_commit_leaves_a_complete_dataset(
    s3_bucket: Any,  # noqa: F811  (fixture)
    tmp_path: Path,
) -> None:
    old_src, new_src = tmp_path / "old", tmp_path / "new"
    make_synthetic(old_src, train=4, val=2, test=0, size=32, seed=1, progress=False)
    make_synthetic(new_src, train=6, val=2, test=0, size=32, seed=2, progress=False)
    out = s3_bucket.uri("data/voc")
    [old_names] = _train_names(_s3_run(s3_bucket, "convert,read", old_src, out))
    old = _objects(s3_bucket, "data/voc/")

    # Killed after uploading every new shard, before the dataset.json that commits them.
    killed = _s3_run(s3_bucket, "kill-before-commit", new_src, out)
    assert killed.returncode == -9, killed.stderr[-2000:]
    after = _objects(s3_bucket, "data/voc/")
    assert {k: v for k, v in after.items() if k in old} == old  # every old byte is there
    assert set(after) > set(old)  # plus the killed run's generation

    # The old dataset reads whole; then a run killed after its commit, while deleting the
    # old generation, leaves the new dataset whole.
    killed = _s3_run(s3_bucket, "read,kill-after-commit", new_src, out)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _train_names(killed, ok=False) == [old_names]

    # The next run reads the new dataset, and leaves exactly one generation.
    [new_names, again] = _train_names(_s3_run(s3_bucket, "read,convert,read", new_src, out))
    assert len(new_names) == 6 and new_names != old_names and again == new_names
    keys = set(s3_bucket.list_keys("data/voc/"))
    assert keys == _referenced(s3_bucket, "data/voc")
    assert not [k for k in s3_bucket.list_keys() if ".tmp-" in k]


def test_s3_convert_out_holding_foreign_objects_is_refused(
    s3_bucket: Any,  # noqa: F811  (fixture)
    voc: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    s3_bucket.put("shared/results.csv", b"somebody's numbers")
    before = _objects(s3_bucket, "")
    rc, err = run(capsys, *_convert(voc, s3_bucket.uri("shared")))  # MinIO: safe in-process
    assert rc == 2
    one_error(err, "is not empty and was not written by `vitpcm data convert`")
    assert _objects(s3_bucket, "") == before


# --------------------------------------------------------------------- bad data


def _voc_root(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def _copy_voc(voc: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(voc, dest)
    return dest


def _tf_refuses_what_pillow_decodes(good_jpeg: bytes) -> bytes:
    """A JPEG whose header is fine, which Pillow decodes and TensorFlow refuses.

    A stray DNL marker (0xFFDC) in the middle of the scan data: found by damaging files at
    random and keeping those the two decoders disagree on.
    """
    import io

    import tensorflow as tf
    from PIL import Image

    scan = good_jpeg.index(b"\xff\xda")
    middle = scan + 20 + (len(good_jpeg) - scan - 22) // 2
    bad = good_jpeg[:middle] + b"\xff\xdc" + good_jpeg[middle:]
    Image.open(io.BytesIO(bad)).load()  # Pillow: fine
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.io.decode_image(bad, channels=3, expand_animations=False)
    return bad


def test_jpeg_that_tensorflow_cannot_decode_fails_convert_naming_it(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = _copy_voc(voc, tmp_path / "src")
    image = sorted((_voc_root(src) / "JPEGImages").glob("*.jpg"))[5]
    image.write_bytes(_tf_refuses_what_pillow_decodes(image.read_bytes()))
    before = tree(src)
    out = tmp_path / "records"
    rc, err = run(capsys, *_convert(src, out), "--workers", "1")
    assert rc == 2
    one_error(err, f"bad sample {image}", "TensorFlow", "cannot decode", "--skip-bad")
    assert tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing half-written
    # --skip-bad leaves it out, listed, and the rest decodes.
    rc, err = run(capsys, *_convert(src, out), "--workers", "2", "--shards", "2", "--skip-bad")
    assert rc == 0, err
    info = json.loads((out / "dataset.json").read_text())
    assert [s["file"] for s in info["skipped"]] == [str(image)] * 2  # train and trainval
    assert info["splits"]["train"]["num_examples"] == 7


def test_empty_split_list_fails_convert_naming_it(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = _copy_voc(voc, tmp_path / "src")
    listing = _voc_root(src) / "ImageSets" / "Segmentation" / "train.txt"
    listing.write_text("\n")
    before = tree(src)
    rc, err = run(capsys, *_convert(src, tmp_path / "records"))
    assert rc == 2
    one_error(err, f"{listing} lists no images", "train split would be empty")
    assert tree(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_empty_optional_test_list_is_a_loud_warning(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    src = _copy_voc(voc, tmp_path / "src")
    (_voc_root(src) / "ImageSets" / "Segmentation" / "test.txt").write_text("")
    rc, err = run(capsys, *_convert(src, tmp_path / "records"))
    assert rc == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("split test skipped" in m and "lists no images" in m for m in warned), warned
    info = json.loads((tmp_path / "records" / "dataset.json").read_text())
    assert "test" not in info["splits"] and info["splits"]["train"]["num_examples"] == 8


def test_bad_record_stops_training_in_one_line_and_leaves_no_run_folder(
    tiny_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A dataset damaged after its conversion: TensorFlow's error becomes one line."""
    import shutil

    import tensorflow as tf

    from helpers.tiny import TINY_OVERRIDES
    from vitpcm.data import tfrecord

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    for shard in data.glob("train-*.tfrecord"):
        records = [r.numpy() for r in tf.data.TFRecordDataset(str(shard))]
        with tf.io.TFRecordWriter(str(shard)) as writer:
            for record in records:
                example = tfrecord.decode_example(record)
                writer.write(
                    tfrecord.encode_example(
                        image=example[tfrecord.IMAGE_ENCODED][:200],  # cut short
                        filename=example[tfrecord.IMAGE_FILENAME].decode(),
                        image_format="jpeg",
                        height=example[tfrecord.IMAGE_HEIGHT],
                        width=example[tfrecord.IMAGE_WIDTH],
                        channels=3,
                        label=example[tfrecord.LABEL_ENCODED],
                    )
                )
    out = tmp_path / "run"
    sets = [item for kv in TINY_OVERRIDES for item in ("--set", kv)]
    rc, err = run(capsys, "train", "-c", "synthetic", "--data", str(data), "--out", str(out),
                  *sets)  # fmt: skip
    assert rc == 2
    one_error(err, "training stopped: InvalidArgumentError", "convert the dataset again")
    assert not out.exists()  # a failed start leaves no half-made run folder


# --------------------------------------------------------------------- S3 credentials


@pytest.mark.slow
def test_s3_dataset_with_wrong_credentials_reports_access_denied(
    s3_with_auth: Any,  # noqa: F811  (fixture)
    tiny_data: Path,
    tmp_path: Path,
) -> None:
    import boto3

    endpoint, key_id, secret = s3_with_auth
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=key_id, aws_secret_access_key=secret)  # fmt: skip
    client.create_bucket(Bucket="datasets")
    for path in sorted(tiny_data.iterdir()):  # a converted dataset that exists
        client.put_object(Bucket="datasets", Key=f"voc/{path.name}", Body=path.read_bytes())
    before = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket="datasets")["Contents"]}
    out = tmp_path / "run"
    env = {**os.environ, "S3_ENDPOINT": endpoint, "AWS_REGION": "us-east-1",
           "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": "not-the-secret",
           "TF_CPP_MIN_LOG_LEVEL": "2"}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "vitpcm", "train", "-c", "synthetic", "--data",
         "s3://datasets/voc", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-3000:]
    line = one_error(done.stderr.splitlines(), "s3://datasets/voc", "access denied by S3")
    assert "AWS_SECRET_ACCESS_KEY" in line and "run vitpcm data convert" not in line
    assert not out.exists()
    # Writing with them is refused as truly: a conversion to the same bucket.
    done = subprocess.run(
        [sys.executable, "-m", "vitpcm", *_convert(tmp_path, "s3://datasets/new"),
         "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 3, done.stderr[-3000:]
    one_error(done.stderr.splitlines(), "s3://datasets/new", "access denied by S3")
    after = {o["Key"]: o["ETag"] for o in client.list_objects_v2(Bucket="datasets")["Contents"]}
    assert after == before


# --------------------------------------------------------------------- processes


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_killed_convert_leaves_no_worker_behind(tmp_path: Path) -> None:
    import signal
    import time

    src = tmp_path / "src"
    make_synthetic(src, train=240, val=8, test=0, size=96, seed=5, progress=False)
    scratch = tmp_path / "scratch"  # the conversion's $TMPDIR, for its staging folder
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "TF_CPP_MIN_LOG_LEVEL": "2"}
    parent = subprocess.Popen(
        [sys.executable, "-m", "vitpcm", *_convert(src, tmp_path / "records"),
         "--workers", "2", "--shards", "8", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(_children(parent.pid)) < 2 and parent.poll() is None:
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.05)
        workers = _children(parent.pid)
        assert len(workers) >= 2, "the conversion ended before it could be killed"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [w for w in workers if _running(w)]
        for pid in alive:  # do not leave them to the rest of the suite
            os.kill(pid, signal.SIGKILL)
        assert alive == []
    finally:
        if parent.poll() is None:
            parent.kill()
    assert [p.name for p in scratch.iterdir()] != []  # the killed run's staging folder
    # The next run removes the killed run's temporary and staging folders, and converts.
    rerun = subprocess.run(
        [sys.executable, "-m", "vitpcm", *_convert(src, tmp_path / "records"), "--no-progress"],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["records", "scratch", "src"]
    assert [p.name for p in scratch.iterdir()] == []

"""Bad inputs and faults through the `vitpcm` command: one case per test.

Each test asserts the exit code, the one-line `error: ...` message, and that every byte
that was there before is still there (the tree is hashed before and after). The table of
cases is docs/RELIABILITY.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

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

"""Broken config files: one line ``error: config FILE:LINE:COL: what``, exit 2, nothing run."""

from __future__ import annotations

from pathlib import Path

import pytest

from vitpcm.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.err.splitlines()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "train:\n  lr: [0.1\n  epochs: 3\n",
            "{f}:3:9: not valid YAML: expected ',' or ']', but got ':' (while parsing a flow "
            "sequence at line 2, column 7)",
        ),
        (
            "train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n",
            "{f}:4:3: not valid YAML: duplicate key 'lr' (first set on line 2)",
        ),
        (
            "train:\n  lr: !!python/object/apply:os.system ['touch {mark}']\n",
            "{f}:2:7: the tag '!!python/object/apply:os.system' is not allowed: config files "
            "hold plain YAML values only",
        ),
        (
            "train:\n\tlr: 0.1\n",
            "{f}:2:1: not valid YAML: found character '\\t' that cannot start any token",
        ),
        (
            'train:\n  lr: "0.1\n',
            "{f}:3:1: not valid YAML: found unexpected end of stream (while scanning a quoted "
            "scalar at line 2, column 7)",
        ),
    ],
    ids=["syntax", "duplicate-key", "python-tag", "tab", "unclosed-quote"],
)
def test_yaml_errors_are_one_line_with_file_line_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, expected: str
) -> None:
    mark = tmp_path / "executed"
    config = tmp_path / "bad.yaml"
    config.write_text(text.replace("{mark}", str(mark)))
    want = "error: config " + expected.format(f=config)

    rc, err = _run(capsys, "config", "show", "-c", str(config))
    assert (rc, err) == (2, [want])

    # The same line from a command that would write outputs; it writes nothing.
    out = tmp_path / "run"
    rc, err = _run(capsys, "train", "-c", str(config), "--out", str(out), "--no-progress")
    assert (rc, err) == (2, [want])
    assert not out.exists()
    assert not mark.exists()  # the python tag was never constructed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]

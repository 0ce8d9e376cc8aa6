"""``vitpcm weights fetch`` against a real local HTTP server (mirror of the Google bucket)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from helpers.s3_server import S3Server, s3_bucket, s3_server  # noqa: F401  (fixtures)
from helpers.vit_numpy import random_vit_weights
from vitpcm.cli import main
from vitpcm.errors import ChecksumError, DownloadError, ModelError, VitpcmError
from vitpcm.model.backbones import BACKBONES, Backbone
from vitpcm.model.pretrained import fetch_pretrained

if TYPE_CHECKING:
    from helpers.http_server import LocalHTTPServer

pytest_plugins = ("helpers.http_server",)

TINY = Backbone(
    "tiny", 8, 16, 2, 2, 32, path="tiny/ViT-T.npz", file="ViT-tiny.npz", description="a test file"
)


def _npz(weights: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **weights)
    return buffer.getvalue()


def _tiny_bytes(seed: int = 0) -> bytes:
    weights = random_vit_weights(
        patch_size=8, hidden_dim=16, depth=2, num_heads=2, mlp_dim=32, grid=4, seed=seed
    )
    return _npz(weights)


def _entry_like(entry: Backbone) -> bytes:
    """A small stand-in with the keys and embedding shape :func:`verify_npz` checks."""
    p, d = entry.patch_size, entry.hidden_dim
    weights = {"embedding/kernel": np.zeros((p, p, 3, d), np.float32)}
    for i in range(entry.depth):
        weights[f"Transformer/encoderblock_{i}/LayerNorm_0/scale"] = np.ones(1, np.float32)
    return _npz(weights)


def test_catalogue_names_the_configs_files() -> None:
    from vitpcm.config import load_config

    for config, name in (("voc12_vit_s16", "vit_s16"), ("voc12_vit_b16", "vit_b16")):
        cfg = load_config(config)
        assert cfg.model.pretrained == BACKBONES[name].url
        assert cfg.model.backbone == name
        assert (cfg.model.hidden_dim, cfg.model.depth) == (
            BACKBONES[name].hidden_dim,
            BACKBONES[name].depth,
        )


def test_a_backbone_added_to_the_table_reaches_config_cli_and_plan(
    http_server: LocalHTTPServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vitpcm.config import config_from_dict
    from vitpcm.run_plan import checkpoint_backbone

    entry = dataclasses.replace(
        TINY, name="vit_t8", google_name="T_8", pretrain_size=32, file="T_8-test.npz"
    )
    monkeypatch.setitem(BACKBONES, entry.name, entry)
    model = config_from_dict(
        {"model": {"backbone": "vit_t8"}, "train": {"unfreeze_blocks": 2}}
    ).model
    assert (model.patch_size, model.hidden_dim, model.depth, model.num_heads, model.mlp_dim) == (
        8, 16, 2, 2, 32,
    )  # fmt: skip
    assert model.pos_embed_grid == 32 // 8
    assert checkpoint_backbone("s3://b/w/T_8-test.npz") == "vit_t8"
    with pytest.raises(SystemExit):
        main(["weights", "fetch", "--help"])
    assert "vit_t8: a test file" in capsys.readouterr().out
    (http_server.root / entry.file).write_bytes(_tiny_bytes())
    out = tmp_path / "w"
    assert main(["weights", "fetch", "vit_t8", "--out", str(out), "--mirror",
                 http_server.base_url, "--no-progress"]) == 0  # fmt: skip
    assert (out / entry.file).read_bytes() == _tiny_bytes()


def test_cli_fetches_from_a_mirror_and_prints_the_config_value(
    http_server: LocalHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = BACKBONES["vit_s16"]
    data = _entry_like(entry)
    (http_server.root / entry.file).write_bytes(data)
    out = tmp_path / "weights"
    args = ["weights", "fetch", "vit_s16", "--out", str(out), "--mirror", http_server.base_url]
    assert main([*args, "--no-progress"]) == 0
    final = out / entry.file
    assert final.read_bytes() == data
    assert f"model.pretrained={final}\n" in capsys.readouterr().out
    recorded = (out / f"{entry.file}.sha256").read_text().strip()
    assert recorded == hashlib.sha256(data).hexdigest()
    assert not list(out.glob("*.part*"))
    # again: checked against the recorded digest, not downloaded again
    http_server.clear_requests()
    assert main([*args, "--no-progress"]) == 0
    assert http_server.requests_for(entry.file) == []
    # a file that changed since is reported, not silently replaced
    final.write_bytes(data[:-1] + b"x")
    assert main([*args, "--no-progress"]) != 0
    assert "not the recorded" in capsys.readouterr().err


def test_interrupted_download_resumes_where_it_stopped(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    data = _tiny_bytes()
    (http_server.root / TINY.file).write_bytes(data)
    http_server.cut(TINY.file, after=len(data) // 3)
    out = tmp_path / "w"
    catalogue = {"tiny": TINY}
    with pytest.raises(DownloadError):
        fetch_pretrained("tiny", str(out), mirror=http_server.base_url, catalogue=catalogue,
                         progress=False, retries=0)  # fmt: skip
    part = out / f"{TINY.file}.part"
    assert part.stat().st_size == len(data) // 3 and not (out / TINY.file).exists()
    uri = fetch_pretrained(
        "tiny", str(out), mirror=http_server.base_url, catalogue=catalogue, progress=False
    )
    assert Path(uri).read_bytes() == data
    assert http_server.requests_for(TINY.file)[-1].range == f"bytes={len(data) // 3}-"


def test_wrong_or_corrupt_files_are_refused_and_removed(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    data = _tiny_bytes()
    (http_server.root / TINY.file).write_bytes(data)
    out = tmp_path / "w"
    known = dataclasses.replace(TINY, sha256="0" * 64)
    with pytest.raises(ChecksumError, match="expected 0000"):
        fetch_pretrained("tiny", str(out), mirror=http_server.base_url,
                         catalogue={"tiny": known}, progress=False)  # fmt: skip
    assert not list(out.glob("ViT-*"))
    # a checkpoint of another backbone (B/16-like dims for a tiny entry)
    (http_server.root / TINY.file).write_bytes(_entry_like(BACKBONES["vit_b16"]))
    with pytest.raises(ModelError, match="is not the tiny checkpoint"):
        fetch_pretrained("tiny", str(out), mirror=http_server.base_url,
                         catalogue={"tiny": TINY}, progress=False)  # fmt: skip
    (http_server.root / TINY.file).write_bytes(b"<html>not found</html>")
    with pytest.raises(ModelError, match="not a readable .npz"):
        fetch_pretrained("tiny", str(out), mirror=http_server.base_url,
                         catalogue={"tiny": TINY}, progress=False)  # fmt: skip
    assert not list(out.glob("ViT-*"))
    # a file of the same name that this tool did not fetch is left alone
    (out / TINY.file).write_bytes(b"mine")
    (http_server.root / TINY.file).write_bytes(data)
    with pytest.raises(VitpcmError, match="was not fetched by vitpcm"):
        fetch_pretrained("tiny", str(out), mirror=http_server.base_url,
                         catalogue={"tiny": TINY}, progress=False)  # fmt: skip
    assert (out / TINY.file).read_bytes() == b"mine"


def test_missing_file_on_the_mirror_is_one_error(
    http_server: LocalHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "w"
    rc = main(["weights", "fetch", "vit_b16", "--out", str(out), "--mirror", http_server.base_url,
               "--no-progress"])  # fmt: skip
    assert rc != 0
    err = capsys.readouterr().err
    assert err.startswith("error: ") and BACKBONES["vit_b16"].file in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    rc = main(["weights", "fetch", "vit_b16", "--out", str(foreign), "--mirror",
               http_server.base_url, "--no-progress"])  # fmt: skip
    assert rc != 0 and "not empty" in capsys.readouterr().err


@pytest.mark.slow
def test_fetch_to_s3_prints_the_s3_value(
    http_server: LocalHTTPServer,
    s3_bucket: S3Server,  # noqa: F811
    tmp_path: Path,
) -> None:
    import os
    import subprocess
    import sys

    entry = BACKBONES["vit_b16"]
    data = _entry_like(entry)
    (http_server.root / entry.file).write_bytes(data)
    vitpcm = str(Path(sys.executable).parent / "vitpcm")
    command = [vitpcm, "weights", "fetch", "vit_b16", "--out", s3_bucket.uri("weights"),
               "--mirror", http_server.base_url, "--no-progress"]  # fmt: skip
    env = {**os.environ, **s3_bucket.env(), "VITPCM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    uri = s3_bucket.uri(f"weights/{entry.file}")
    assert f"model.pretrained={uri}" in done.stdout.splitlines()
    assert s3_bucket.read(f"weights/{entry.file}") == data
    # the partial file lived in the cache, now complete with its digest
    cached = tmp_path / "cache" / "weights" / entry.file
    assert cached.read_bytes() == data and cached.with_name(cached.name + ".sha256").exists()

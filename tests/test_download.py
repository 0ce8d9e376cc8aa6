"""Dataset download over real HTTP (a local server): resume, retries, checksums, layout."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from vitpcm.data.download import MARKER_NAME, download_dataset, fetch
from vitpcm.data.sources.voc12 import normalise_id_list
from vitpcm.errors import (
    ArchiveError,
    ChecksumError,
    ConfigError,
    DataError,
    DownloadError,
    StorageError,
)

if TYPE_CHECKING:
    from helpers.http_server import LocalHTTPServer

# Registered as a plugin (not imported here) so pytest can still rewrite its asserts.
pytest_plugins = ("helpers.http_server",)

VOC = "VOCdevkit/VOC2012"
SEG = f"{VOC}/ImageSets/Segmentation"
TRAINVAL = "VOCtrainval_11-May-2012.tar"
# Incompressible filler so the archive is big enough to cut a transfer midway.
FILLER = os.urandom(300_000)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _md5s(root: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in root.iterdir()}


def _make_voc(root: Path, trainaug: str) -> dict[str, str]:
    """The four VOC files in their official layouts; returns their md5s."""
    _tar(
        root / TRAINVAL,
        {
            f"{VOC}/JPEGImages/2007_000032.jpg": b"jpeg-32",
            f"{VOC}/JPEGImages/2007_000033.jpg": FILLER,
            f"{VOC}/SegmentationClass/2007_000032.png": b"png-32",
            f"{VOC}/Annotations/2007_000032.xml": b"<annotation/>",
            f"{SEG}/train.txt": b"2007_000032\n",
            f"{SEG}/val.txt": b"2007_000033\n",
            f"{SEG}/trainval.txt": b"2007_000032\n2007_000033\n",
        },
    )
    _tar(
        root / "VOC2012test.tar",
        {f"{VOC}/JPEGImages/2008_000001.jpg": b"jpeg-test", f"{SEG}/test.txt": b"2008_000001\n"},
    )
    _zip(
        root / "SegmentationClassAug.zip",
        {
            "SegmentationClassAug/2007_000032.png": b"aug-32",
            "SegmentationClassAug/2007_000033.png": b"aug-33",
            "__MACOSX/SegmentationClassAug/._2007_000032.png": b"junk",
        },
    )
    (root / "trainaug.txt").write_text(trainaug)
    return _md5s(root)


def _make_coco(root: Path) -> dict[str, str]:
    _zip(root / "train2014.zip", {"train2014/COCO_train2014_000000000009.jpg": b"t9"})
    _zip(root / "val2014.zip", {"val2014/COCO_val2014_000000000042.jpg": b"v42"})
    _zip(
        root / "annotations_trainval2014.zip",
        {
            "annotations/instances_train2014.json": b'{"images": []}',
            "annotations/instances_val2014.json": b'{"images": []}',
            "annotations/captions_val2014.json": b"{}",
        },
    )
    return _md5s(root)


PAIRS = (
    "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
    "/JPEGImages/2007_000033.jpg /SegmentationClassAug/2007_000033.png\n"
)


def _download(server: LocalHTTPServer, dataset: str, out: Path, **kwargs: object) -> Path:
    kwargs.setdefault("progress", False)
    kwargs.setdefault("backoff", 0.0)
    return download_dataset(dataset, out, mirror=server.base_url + "/", **kwargs)  # type: ignore[arg-type]


def test_voc12_download_layout_and_second_run_fetches_nothing(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    sums = _make_voc(http_server.root, PAIRS)
    out = tmp_path / "data"
    assert _download(http_server, "voc12", out, checksums=sums) == out

    voc = out / VOC
    assert sorted(p.name for p in (voc / "JPEGImages").iterdir()) == [
        "2007_000032.jpg",
        "2007_000033.jpg",
        "2008_000001.jpg",
    ]
    assert (voc / "SegmentationClass/2007_000032.png").read_bytes() == b"png-32"
    assert sorted(p.name for p in (voc / "SegmentationClassAug").iterdir()) == [
        "2007_000032.png",
        "2007_000033.png",
    ]
    for split in ("train", "val", "trainval", "test", "trainaug"):
        assert (out / SEG / f"{split}.txt").is_file(), split
    assert (out / SEG / "trainaug.txt").read_text() == "2007_000032\n2007_000033\n"
    assert not list(out.rglob("__MACOSX")) and not list(out.rglob("._*"))
    assert not list(out.rglob("*.part")) and not list(out.rglob("*.tmp"))
    record = json.loads((out / MARKER_NAME).read_text())["files"]
    assert all(record[name]["installed"] and record[name]["verified"] for name in sums)
    assert {r.name for r in http_server.requests} == set(sums)

    http_server.clear_requests()
    _download(http_server, "voc12", out, checksums=sums)
    assert http_server.requests == []

    # Only the unpacked result is needed to count as done: the archives may be deleted.
    for name in sums:
        (out / "downloads" / name).unlink()
    _download(http_server, "voc12", out, checksums=sums)
    assert http_server.requests == []


def test_coco14_download_layout_and_second_run_fetches_nothing(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    sums = _make_coco(http_server.root)
    out = tmp_path / "data"
    _download(http_server, "coco14", out, checksums=sums)
    coco = out / "coco2014"
    assert (coco / "train2014/COCO_train2014_000000000009.jpg").read_bytes() == b"t9"
    assert (coco / "val2014/COCO_val2014_000000000042.jpg").read_bytes() == b"v42"
    for split in ("train", "val"):
        assert json.loads((coco / f"annotations/instances_{split}2014.json").read_text()) == {
            "images": []
        }
    http_server.clear_requests()
    _download(http_server, "coco14", out, checksums=sums, progress=True)
    assert http_server.requests == []


def test_cut_transfer_resumes_with_range(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    sums = _make_voc(http_server.root, PAIRS)
    size = (http_server.root / TRAINVAL).stat().st_size
    http_server.cut(TRAINVAL, after=size // 2)
    out = tmp_path / "data"
    _download(http_server, "voc12", out, checksums=sums)

    gets = http_server.requests_for(TRAINVAL)
    assert [r.status for r in gets] == [200, 206]
    assert gets[0].range is None
    assert gets[1].range is not None
    resumed_at = int(gets[1].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= size // 2
    assert (out / "downloads" / TRAINVAL).read_bytes() == (http_server.root / TRAINVAL).read_bytes()
    assert (out / VOC / "JPEGImages/2007_000033.jpg").read_bytes() == FILLER


def _cut_fetch(server: LocalHTTPServer, name: str, part: Path, after: int) -> None:
    """A first fetch that dies after ``after`` bytes, as a killed run would leave it."""
    server.cut(name, after=after)
    with requests.Session() as session, pytest.raises(DownloadError, match="is kept"):
        fetch(session, server.url(name), part, progress=False, retries=0, backoff=0.0)
    assert part.stat().st_size == after
    server.clear_requests()


def test_partial_file_from_a_killed_run_is_resumed(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    source = http_server.root / "blob.bin"
    source.write_bytes(FILLER)
    part = tmp_path / "blob.bin.part"
    _cut_fetch(http_server, "blob.bin", part, after=12_345)
    with requests.Session() as session:
        fetch(session, http_server.url("blob.bin"), part, progress=False, backoff=0.0)
    assert part.read_bytes() == FILLER
    [get] = http_server.requests_for("blob.bin")
    assert (get.range, get.status) == ("bytes=12345-", 206)

    # A partial file that is in fact complete: the server says 416 and nothing changes.
    http_server.clear_requests()
    with requests.Session() as session:
        fetch(session, http_server.url("blob.bin"), part, progress=False, backoff=0.0)
    assert part.read_bytes() == FILLER
    assert [r.status for r in http_server.requests_for("blob.bin")] == [416]


def test_server_without_range_support_restarts_cleanly(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    (http_server.root / "blob.bin").write_bytes(FILLER)
    part = tmp_path / "blob.bin.part"
    _cut_fetch(http_server, "blob.bin", part, after=1000)
    http_server.ignore_range("blob.bin")
    with requests.Session() as session:
        fetch(session, http_server.url("blob.bin"), part, progress=False, backoff=0.0)
    assert part.read_bytes() == FILLER
    [get] = http_server.requests_for("blob.bin")
    assert get.range is not None and get.status == 200


def test_flaky_connection_that_keeps_advancing_is_not_given_up(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    (http_server.root / "blob.bin").write_bytes(FILLER)
    http_server.cut("blob.bin", after=40_000, times=6)
    part = tmp_path / "blob.bin.part"
    with requests.Session() as session:
        # More drops than retries: each attempt moves forward, so the count starts over.
        fetch(session, http_server.url("blob.bin"), part, progress=False, retries=1, backoff=0.0)
    assert part.read_bytes() == FILLER
    gets = http_server.requests_for("blob.bin")
    assert len(gets) == 7 and all(r.status == 206 for r in gets[1:])


def test_503_twice_then_ok_is_retried(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    sums = _make_voc(http_server.root, PAIRS)
    http_server.fail("trainaug.txt", times=2)
    _download(http_server, "voc12", tmp_path / "data", checksums=sums)
    assert [r.status for r in http_server.requests_for("trainaug.txt")] == [503, 503, 200]


def test_persistent_5xx_gives_up_after_retries(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    (http_server.root / "blob.bin").write_bytes(b"x")
    http_server.fail("blob.bin", times=10, status=502)
    url = http_server.url("blob.bin")
    with requests.Session() as session, pytest.raises(DownloadError, match="3 attempts failed"):
        fetch(session, url, tmp_path / "blob.bin.part", progress=False, retries=2, backoff=0.0)
    assert len(http_server.requests_for("blob.bin")) == 3


def test_connection_refused_names_url(tmp_path: Path) -> None:
    from helpers.http_server import LocalHTTPServer

    with LocalHTTPServer(tmp_path / "www") as server:
        url = server.url("gone.bin")
    with requests.Session() as session, pytest.raises(DownloadError) as info:
        fetch(session, url, tmp_path / "gone.bin.part", progress=False, retries=1, backoff=0.0)
    assert url in str(info.value) and "--mirror" in str(info.value)


def test_checksum_mismatch_removes_file(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    sums = _make_voc(http_server.root, PAIRS)
    wrong = "0" * 32
    out = tmp_path / "data"
    with pytest.raises(ChecksumError) as info:
        _download(http_server, "voc12", out, checksums={**sums, TRAINVAL: wrong})
    message = str(info.value)
    assert TRAINVAL in message and wrong in message and sums[TRAINVAL] in message
    assert list((out / "downloads").iterdir()) == []
    assert not (out / "VOCdevkit").exists()


def test_skip_checksum_warns_and_keeps(
    http_server: LocalHTTPServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sums = _make_voc(http_server.root, PAIRS)
    out = tmp_path / "data"
    with caplog.at_level(logging.WARNING, logger="vitpcm.data.download"):
        _download(
            http_server, "voc12", out, checksums={**sums, TRAINVAL: "0" * 32}, skip_checksum=True
        )
    assert (out / VOC / "SegmentationClass/2007_000032.png").is_file()
    assert any(TRAINVAL in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    record = json.loads((out / MARKER_NAME).read_text())["files"][TRAINVAL]
    assert record["verified"] is False


def test_unknown_checksum_is_logged_as_not_verified(
    http_server: LocalHTTPServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sums = _make_voc(http_server.root, PAIRS)
    with caplog.at_level(logging.WARNING, logger="vitpcm.data.download"):
        _download(http_server, "voc12", tmp_path / "d", checksums={**sums, "trainaug.txt": None})
    assert any(
        "trainaug.txt" in r.getMessage() and "not verified" in r.getMessage()
        for r in caplog.records
    )


def test_404_names_url_and_suggests_mirror(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    sums = _make_voc(http_server.root, PAIRS)
    (http_server.root / "VOC2012test.tar").unlink()
    with pytest.raises(DownloadError) as info:
        _download(http_server, "voc12", tmp_path / "data", checksums=sums)
    assert http_server.url("VOC2012test.tar") in str(info.value)
    assert "--mirror" in str(info.value)
    assert len(http_server.requests_for("VOC2012test.tar")) == 1  # a 404 is not retried


def test_wrong_archive_is_reported_and_not_marked_done(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    sums = _make_voc(http_server.root, PAIRS)
    _zip(http_server.root / "SegmentationClassAug.zip", {"masks/2007_000032.png": b"x"})
    sums = {**sums, **_md5s(http_server.root)}
    out = tmp_path / "data"
    with pytest.raises(ArchiveError, match="SegmentationClassAug") as info:
        _download(http_server, "voc12", out, checksums=sums)
    assert "matches its published checksum and is kept" in str(info.value)
    record = json.loads((out / MARKER_NAME).read_text())["files"]
    assert record[TRAINVAL]["installed"] is True
    assert record["SegmentationClassAug.zip"] == {}  # not recorded as downloaded
    assert (out / "downloads/SegmentationClassAug.zip").is_file()
    assert not list((out / VOC).glob(".sbd-*"))  # staging cleaned up


def test_trainaug_plain_ids_via_download(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    sums = _make_voc(http_server.root, "2007_000033\r\n\r\n2007_000032\r\n2007_000033\r\n")
    out = tmp_path / "data"
    _download(http_server, "voc12", out, checksums=sums)
    assert (out / SEG / "trainaug.txt").read_text() == "2007_000033\n2007_000032\n"


def test_normalise_id_list_formats_and_errors() -> None:
    assert normalise_id_list(PAIRS.encode(), "t") == ["2007_000032", "2007_000033"]
    assert normalise_id_list(b"\xef\xbb\xbf2011_003276\n2008_000002.jpg\n", "t") == [
        "2011_003276",
        "2008_000002",
    ]
    with pytest.raises(DataError, match="line 1"):
        normalise_id_list(b"<!DOCTYPE html>\n<html></html>\n", "trainaug.txt")
    with pytest.raises(DataError, match="no image ids"):
        normalise_id_list(b"\n\n", "trainaug.txt")
    with pytest.raises(DataError, match="not a text list"):
        normalise_id_list(b"\xff\xfe\x00\x81", "trainaug.txt")


def test_urls_override_and_bad_arguments(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    sums = _make_coco(http_server.root)
    (http_server.root / "elsewhere").mkdir()
    os.replace(http_server.root / "val2014.zip", http_server.root / "elsewhere/v.zip")
    out = tmp_path / "data"
    moved = {"val2014.zip": http_server.url("elsewhere/v.zip")}
    _download(http_server, "coco14", out, checksums=sums, urls=moved)
    assert (out / "coco2014/val2014/COCO_val2014_000000000042.jpg").is_file()
    assert len(http_server.requests_for("elsewhere/v.zip")) == 1

    with pytest.raises(ConfigError, match="voc07"):
        download_dataset("voc07", out)
    with pytest.raises(ConfigError, match="typo.zip"):
        download_dataset("coco14", out, checksums={"typo.zip": None})
    with pytest.raises(StorageError, match="local folder"):
        download_dataset("coco14", "s3://bucket/raw")

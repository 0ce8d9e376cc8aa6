"""Hostile archives and mirrors, through `vitpcm data download` and the fetch layer.

Real local HTTP servers throughout: the shared file server (faults: cut, fail, ignore Range),
a small ETag-aware server written here, and a socket that accepts connections and never
answers. Each CLI case checks the exit code, the one-line message and that the bytes that
were there before are still there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from vitpcm.cli import main
from vitpcm.data.archives import UnpackLimits, extract_archive
from vitpcm.data.download import MARKER_NAME, download_dataset
from vitpcm.data.http_fetch import fetch, origin_path, parse_checksum
from vitpcm.data.sources import dataset_names, get_source
from vitpcm.errors import ArchiveError, ConfigError, DownloadError

if TYPE_CHECKING:
    from helpers.http_server import LocalHTTPServer

pytest_plugins = ("helpers.http_server",)

VOC = "VOCdevkit/VOC2012"
SEG = f"{VOC}/ImageSets/Segmentation"
TRAINVAL = "VOCtrainval_11-May-2012.tar"
BLOB = os.urandom(200_000)


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _zip(path: Path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _make_voc(root: Path) -> None:
    _tar(
        root / TRAINVAL,
        {
            f"{VOC}/JPEGImages/2007_000032.jpg": b"jpeg",
            f"{VOC}/SegmentationClass/2007_000032.png": b"png",
            f"{SEG}/train.txt": b"2007_000032\n",
            f"{SEG}/val.txt": b"2007_000032\n",
            f"{SEG}/trainval.txt": b"2007_000032\n",
        },
    )
    _tar(root / "VOC2012test.tar", {f"{SEG}/test.txt": b"2008_000001\n"})
    _zip(root / "SegmentationClassAug.zip", {"SegmentationClassAug/2007_000032.png": b"aug"})
    (root / "trainaug.txt").write_text("2007_000032\n")


def _tree(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    rc = main(["data", "download", "--no-progress", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    return rc, "\n".join(lines)


# ----------------------------------------------------------------------------- archive bombs


def test_zip_bomb_is_refused_removed_and_not_recorded(
    http_server: LocalHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _make_voc(http_server.root)
    # 64 MiB of zeros deflate to about 64 KiB: a ratio near 1000.
    _zip(
        http_server.root / "SegmentationClassAug.zip", {"SegmentationClassAug/z.png": bytes(2**26)}
    )
    bomb_size = (http_server.root / "SegmentationClassAug.zip").stat().st_size
    assert bomb_size < 200_000
    out = tmp_path / "data"
    # An earlier run stopped at a 404 (the folder is now a download of ours), then someone
    # put a file of their own in it.
    tar_bytes = (http_server.root / TRAINVAL).read_bytes()
    (http_server.root / TRAINVAL).unlink()
    args = ("--dataset", "voc12", "--out", str(out), "--mirror", http_server.base_url)
    rc, message = _cli(capsys, *args, "--skip-checksum")
    assert rc == 4 and "HTTP 404" in message
    (http_server.root / TRAINVAL).write_bytes(tar_bytes)
    (out / "notes.txt").write_text("mine, not the tool's")
    before = {k: v for k, v in _tree(out).items() if not Path(k).name.startswith(".vitpcm-")}
    assert "notes.txt" in before

    rc, message = _cli(capsys, *args, "--skip-checksum")
    assert rc == 2
    assert message.count("\n") == 0
    assert "SegmentationClassAug.zip" in message and "archive bomb" in message
    assert "--max-ratio" in message and "was removed" in message
    after = _tree(out)
    assert {k: after[k] for k in before} == before
    # Nothing of the bomb was written, the zip is gone and not recorded as downloaded.
    assert not (out / "downloads/SegmentationClassAug.zip").exists()
    assert not (out / VOC / "SegmentationClassAug").exists()
    assert not list((out / VOC).glob(".sbd-*"))
    files = json.loads((out / MARKER_NAME).read_text())["files"]
    assert files["SegmentationClassAug.zip"] == {}
    assert files[TRAINVAL]["installed"] is True

    # The mirror is fixed: the next run fetches the zip again and finishes.
    _zip(http_server.root / "SegmentationClassAug.zip", {"SegmentationClassAug/a.png": b"aug"})
    http_server.clear_requests()
    rc, message = _cli(capsys, *args, "--skip-checksum")
    assert (rc, message) == (0, "")
    assert (out / "notes.txt").read_text() == "mine, not the tool's"
    assert (out / VOC / "SegmentationClassAug/a.png").read_bytes() == b"aug"
    # Only what was not installed yet: the zip, and the id list that came after it.
    assert [r.name for r in http_server.requests] == ["SegmentationClassAug.zip", "trainaug.txt"]


def test_compressed_tar_bomb_stops_at_the_limit(tmp_path: Path) -> None:
    # A .tar.gz declares nothing up front: the bytes written are counted as they come.
    archive = tmp_path / "bomb.tar.gz"
    _tar(archive, {"a/zeros.bin": bytes(2**25), "a/more.bin": bytes(2**25)}, mode="w:gz")
    limits = UnpackLimits(max_ratio=100.0, ratio_floor=2**20)
    allowed = limits.budget(archive.stat().st_size)
    assert allowed == int(100 * archive.stat().st_size) < 2**25
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveError, match="unpacks to more than") as info:
        extract_archive(archive, dest, progress=False, limits=limits)
    assert str(allowed) in str(info.value)
    assert list(dest.iterdir()) == []  # the staging folder is gone, nothing merged


def test_limits_on_total_size_and_member_count(tmp_path: Path) -> None:
    archive = tmp_path / "many.zip"
    _zip(archive, {f"f/{i}.txt": os.urandom(1000) for i in range(50)})
    with pytest.raises(ArchiveError, match="holds 50 members, over 20"):
        extract_archive(archive, tmp_path / "d1", progress=False, limits=UnpackLimits(max_files=20))
    with pytest.raises(ArchiveError, match="declares 50000 unpacked bytes"):
        extract_archive(
            archive, tmp_path / "d2", progress=False, limits=UnpackLimits(max_bytes=10_000)
        )
    # Within the defaults it unpacks, byte for byte.
    assert extract_archive(archive, tmp_path / "d3", progress=False) == 50


def test_default_limits_pass_the_official_archives() -> None:
    # The real files' unpacked/archive ratios: about 1 for the image archives and VOC's
    # uncompressed tars, about 3.3 for COCO's annotations (0.25 GB -> 0.8 GB).
    limits = UnpackLimits()
    unpacked = {"annotations_trainval2014.zip": 830_000_000}
    for spec in (f for name in dataset_names() for f in get_source(name).files):
        if spec.size is not None:
            need = unpacked.get(spec.name, int(spec.size * 1.05))
            assert limits.budget(spec.size) >= need, spec.name


# ----------------------------------------------------------------------------- checksums


def test_every_archive_with_a_published_checksum_has_one() -> None:
    table = {f.name: f for name in dataset_names() for f in get_source(name).files}
    published = {
        # tensorflow_datasets/url_checksums/voc.txt and coco.txt
        TRAINVAL: ("e14f763270cf193d0b5f74b169f44157a4b0c6efa708f4dd0ff78ee691763bcb", 1999639040),
        "VOC2012test.tar": (
            "f08582b1935816c5eab3bbb1eb6d06201a789eaa173cdf1cf400c26f0cac2fb3",
            1850626560,
        ),
        "train2014.zip": (
            "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
            13510573713,
        ),
        "val2014.zip": (
            "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0",
            6645013297,
        ),
        "annotations_trainval2014.zip": (
            "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
            252872794,
        ),
    }
    for name, (digest, size) in published.items():
        assert parse_checksum(table[name].checksum or "") == ("sha256", digest)
        assert table[name].size == size
    # No public value exists for the two community mirrors: recorded on first use.
    assert {n for n, f in table.items() if f.checksum is None} == {
        "SegmentationClassAug.zip",
        "trainaug.txt",
    }
    assert parse_checksum("6cd6e144f989b92b3379bac3b3de84fd") == (
        "md5",
        "6cd6e144f989b92b3379bac3b3de84fd",
    )
    with pytest.raises(ConfigError, match="digits"):
        parse_checksum("sha256:abc")
    with pytest.raises(ConfigError, match="unreadable"):
        parse_checksum("crc32:00ff")


def test_mirror_with_another_size_is_refused_before_downloading(
    http_server: LocalHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _make_voc(http_server.root)
    out = tmp_path / "data"
    rc, message = _cli(
        capsys, "--dataset", "voc12", "--out", str(out), "--mirror", http_server.base_url
    )
    assert rc == 4
    size = (http_server.root / TRAINVAL).stat().st_size
    assert message == (
        f"error: {http_server.url(TRAINVAL)} is {size} bytes, but the official {TRAINVAL} is "
        "1999639040 bytes: this server holds another file; pass --mirror BASE_URL with the "
        "official files (or --skip-checksum if you trust it)"
    )
    assert list((out / "downloads").iterdir()) == []


# ----------------------------------------------------------------------------- splicing


def _cut_part(server: LocalHTTPServer, name: str, part: Path, after: int) -> None:
    server.cut(name, after=after)
    with requests.Session() as session, pytest.raises(DownloadError, match="is kept"):
        fetch(session, server.url(name), part, progress=False, retries=0, backoff=0.0)
    assert part.stat().st_size == after
    server.clear_requests()


def test_part_from_another_mirror_restarts(http_server: LocalHTTPServer, tmp_path: Path) -> None:
    from helpers.http_server import LocalHTTPServer

    (http_server.root / "blob.bin").write_bytes(BLOB)
    part = tmp_path / "blob.bin.part"
    _cut_part(http_server, "blob.bin", part, after=50_000)
    other = os.urandom(len(BLOB))
    with LocalHTTPServer(tmp_path / "mirror2") as mirror2:
        (mirror2.root / "blob.bin").write_bytes(other)
        with requests.Session() as session:
            fetch(session, mirror2.url("blob.bin"), part, progress=False, backoff=0.0)
        [get] = mirror2.requests_for("blob.bin")
    assert (get.range, get.status) == (None, 200)
    assert part.read_bytes() == other  # not BLOB[:50000] + other[50000:]


def test_part_whose_file_changed_size_restarts(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    (http_server.root / "blob.bin").write_bytes(BLOB)
    part = tmp_path / "blob.bin.part"
    _cut_part(http_server, "blob.bin", part, after=50_000)
    new = os.urandom(len(BLOB) + 10)
    (http_server.root / "blob.bin").write_bytes(new)
    with requests.Session() as session:
        fetch(session, http_server.url("blob.bin"), part, progress=False, backoff=0.0)
    assert [(r.range, r.status) for r in http_server.requests_for("blob.bin")] == [
        ("bytes=50000-", 206),
        (None, 200),
    ]
    assert part.read_bytes() == new
    assert json.loads(origin_path(part).read_text())["total"] == len(new)


def test_part_without_an_origin_record_restarts(
    http_server: LocalHTTPServer, tmp_path: Path
) -> None:
    (http_server.root / "blob.bin").write_bytes(BLOB)
    part = tmp_path / "blob.bin.part"
    part.write_bytes(b"bytes of unknown origin")
    with requests.Session() as session:
        fetch(session, http_server.url("blob.bin"), part, progress=False, backoff=0.0)
    assert part.read_bytes() == BLOB
    assert [r.range for r in http_server.requests_for("blob.bin")] == [None]


class _ETagServer:
    """Serves one mutable blob with an ETag; honours If-Range unless told not to."""

    def __init__(self, data: bytes, honour_if_range: bool) -> None:
        self.data, self.etag, self.honour = data, '"v1"', honour_if_range
        self.cut_after: int | None = None
        self.log: list[tuple[str | None, str | None, int]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                data, start, code = outer.data, 0, 200
                rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
                if rng and (not outer.honour or if_range in (None, outer.etag)):
                    start, code = int(rng.removeprefix("bytes=").rstrip("-")), 206
                outer.log.append((rng, if_range, code))
                self.send_response(code)
                self.send_header("ETag", outer.etag)
                self.send_header("Content-Length", str(len(data) - start))
                if code == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                body = data[start:]
                if outer.cut_after is not None:
                    body, outer.cut_after = body[: outer.cut_after], None
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/blob.bin"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("honour_if_range", [True, False], ids=["if-range", "etag-check"])
def test_part_whose_etag_changed_restarts(tmp_path: Path, honour_if_range: bool) -> None:
    server = _ETagServer(BLOB, honour_if_range)
    try:
        part = tmp_path / "blob.bin.part"
        server.cut_after = 50_000
        with requests.Session() as session, pytest.raises(DownloadError, match="is kept"):
            fetch(session, server.url, part, progress=False, retries=0, backoff=0.0)
        new = os.urandom(len(BLOB))  # same size, other content, new ETag
        server.data, server.etag = new, '"v2"'
        with requests.Session() as session:
            fetch(session, server.url, part, progress=False, backoff=0.0)
        assert part.read_bytes() == new
        resumed = server.log[1]
        assert resumed[:2] == ("bytes=50000-", '"v1"')
        # Either the server sees If-Range and sends it all, or we see the new ETag and restart.
        expected = [200] if honour_if_range else [206, 200]
        assert [code for _, _, code in server.log[1:]] == expected
    finally:
        server.close()


# ----------------------------------------------------------------------------- silent servers


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener completes TCP handshakes (the kernel's backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_server_that_never_answers_fails_in_bounded_time(
    silent_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    started = time.monotonic()
    rc, message = _cli(
        capsys, "--dataset", "coco14", "--out", str(out), "--mirror",
        f"http://127.0.0.1:{silent_port}", "--timeout", "0.5", "--retries", "2",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert rc == 4
    # 3 attempts of 0.5 s plus 1 + 2 s of back-off.
    assert 4.0 < elapsed < 15.0
    assert message.startswith(f"error: could not download http://127.0.0.1:{silent_port}/")
    assert "3 attempts failed" in message and "no answer within 0.5 s" in message
    assert "nothing was written" in message and "kept" not in message
    assert list((out / "downloads").iterdir()) == []


def test_server_that_stalls_mid_body_keeps_what_it_sent(tmp_path: Path) -> None:
    sent = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BLOB)))
            self.end_headers()
            self.wfile.write(BLOB[:1000])
            self.wfile.flush()
            sent.set()
            time.sleep(3)  # then says nothing more

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    part = tmp_path / "blob.bin.part"
    url = f"http://127.0.0.1:{httpd.server_address[1]}/blob.bin"
    try:
        started = time.monotonic()
        with requests.Session() as session, pytest.raises(DownloadError) as info:
            fetch(session, url, part, progress=False, retries=0, backoff=0.0, timeout=0.5)
        assert time.monotonic() - started < 2.5
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert sent.is_set()
    assert part.read_bytes() == BLOB[:1000]
    assert f"the partial file {part} (1000 bytes) is kept" in str(info.value)
    assert "no answer within 0.5 s" in str(info.value)


def test_timeout_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["data", "download", "--dataset", "voc12", "--out", str(tmp_path), "--timeout", "0"])
    assert info.value.code == 2
    assert "expected a positive number" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="timeout"):
        download_dataset("voc12", tmp_path, timeout=0)


def test_server_that_trickles_is_given_up(tmp_path: Path) -> None:
    # One byte every 50 ms: every read is within the timeout, yet it would take days.
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BLOB)))
            self.end_headers()
            for byte in BLOB[:60]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.05)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    part = tmp_path / "blob.bin.part"
    url = f"http://127.0.0.1:{httpd.server_address[1]}/blob.bin"
    try:
        started = time.monotonic()
        with requests.Session() as session, pytest.raises(DownloadError) as info:
            fetch(session, url, part, progress=False, retries=1, backoff=0.0, timeout=0.5)
        # Two attempts of one 0.5 s window each, although each moved the file forward.
        assert time.monotonic() - started < 2.5
    finally:
        httpd.shutdown()
        httpd.server_close()
    message = str(info.value)
    assert "2 attempts failed" in message and "under 1024 bytes/s" in message
    assert 0 < part.stat().st_size < 60 and f"({part.stat().st_size} bytes) is kept" in message


def test_checksum_pins_a_file_without_a_published_one(
    http_server: LocalHTTPServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _make_voc(http_server.root)
    pins = []  # the hand-made files stand in for the official ones: pin every one
    for path in sorted(http_server.root.iterdir()):
        pins += [
            "--checksum",
            f"{path.name}=sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}",
        ]
    args = ("--dataset", "voc12", "--mirror", http_server.base_url, *pins)
    wrong = "sha256:" + "0" * 64

    rc, message = _cli(
        capsys, *args, "--out", str(tmp_path / "a"), "--checksum", f"trainaug.txt={wrong}"
    )
    assert rc == 4
    assert message.startswith("error: trainaug.txt from ") and f"expected {wrong}" in message

    rc, message = _cli(capsys, *args, "--out", str(tmp_path / "b"))
    assert (rc, message) == (0, "")
    files = json.loads((tmp_path / "b" / MARKER_NAME).read_text())["files"]
    real = hashlib.sha256((http_server.root / "trainaug.txt").read_bytes()).hexdigest()
    assert files["trainaug.txt"]["checksum"] == f"sha256:{real}"
    assert all(f["verified"] is True for f in files.values())

    # Names and digests are checked before --out is touched.
    rc, message = _cli(capsys, *args, "--out", str(tmp_path / "c"), "--checksum", f"typo={wrong}")
    assert rc == 2 and "--checksum names no file of voc12: ['typo']" in message
    assert not (tmp_path / "c").exists()
    with pytest.raises(SystemExit):
        main(["data", "download", *args, "--out", str(tmp_path / "d"), "--checksum", "x=abc"])
    assert "argument --checksum: unreadable checksum 'abc'" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()

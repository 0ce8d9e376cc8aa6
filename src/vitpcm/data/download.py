"""Download and unpack PASCAL VOC 2012 (+ SBD trainaug) and COCO 2014.

``download_dataset("voc12", out)`` leaves::

    <out>/VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, SegmentationClassAug,
                             ImageSets/Segmentation/{train,val,trainval,test,trainaug}.txt}

and ``download_dataset("coco14", out)``::

    <out>/coco2014/{train2014/, val2014/, annotations/instances_{train,val}2014.json}

Archives are kept in ``<out>/downloads/``. Each one is streamed to ``<name>.part``,
resumed with an HTTP Range request after a dropped connection (or an earlier killed run),
retried with exponential backoff, checked against its published MD5 where one is known and
only then renamed to its final name. What has been fetched and unpacked is recorded in
``<out>/.vitpcm-download.json``, so running again does no work that is already done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import requests
import urllib3
from tqdm import tqdm

from vitpcm.data.archives import extract_archive, staging_dir, unpack
from vitpcm.errors import (
    ArchiveError,
    ChecksumError,
    ConfigError,
    DataError,
    DownloadError,
    StorageError,
)

logger = logging.getLogger(__name__)

MARKER_NAME = ".vitpcm-download.json"
DOWNLOADS_DIR = "downloads"
_VOC = "VOCdevkit/VOC2012"
_SEG_SETS = f"{_VOC}/ImageSets/Segmentation"
_CHUNK = 1024 * 1024
_TIMEOUT = (30, 120)  # (connect, read) seconds: a stalled read counts as a dropped connection
_MAX_BACKOFF_S = 120.0
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


@dataclass(frozen=True)
class DatasetFile:
    """One file of a dataset and how it is unpacked.

    Attributes:
        name: The official file name (also the name under a ``--mirror``).
        url: Default download URL.
        md5: Published MD5, or None when no trustworthy value is known (not verified).
        install: How the file becomes part of the layout: ``merge`` (unpack into ``dest``),
            ``sbd`` (move ``SegmentationClassAug/`` under VOC2012) or ``trainaug`` (normalise
            the id list into ImageSets/Segmentation/trainaug.txt).
        dest: Folder (relative to ``out``) that ``merge`` unpacks into.
        provides: Paths (relative to ``out``) that must exist once the file is installed.
    """

    name: str
    url: str
    md5: str | None
    install: str
    dest: str
    provides: tuple[str, ...]


DATASET_FILES: dict[str, tuple[DatasetFile, ...]] = {
    "voc12": (
        DatasetFile(
            "VOCtrainval_11-May-2012.tar",
            "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
            "6cd6e144f989b92b3379bac3b3de84fd",
            "merge",
            ".",
            (
                f"{_VOC}/JPEGImages",
                f"{_VOC}/SegmentationClass",
                f"{_SEG_SETS}/train.txt",
                f"{_SEG_SETS}/val.txt",
                f"{_SEG_SETS}/trainval.txt",
            ),
        ),
        # Mirror: the official test archive sits behind the evaluation server's login.
        DatasetFile(
            "VOC2012test.tar",
            "http://pjreddie.com/media/files/VOC2012test.tar",
            None,
            "merge",
            ".",
            (f"{_SEG_SETS}/test.txt",),
        ),
        # Mirror: the SBD masks as single-channel PNGs, as commonly shared for DeepLab.
        DatasetFile(
            "SegmentationClassAug.zip",
            "https://www.dropbox.com/s/oeu149j8qtbs1x0/SegmentationClassAug.zip?dl=1",
            None,
            "sbd",
            _VOC,
            (f"{_VOC}/SegmentationClassAug",),
        ),
        # Mirror: the 10,582-image trainaug id list.
        DatasetFile(
            "trainaug.txt",
            "https://gist.githubusercontent.com/sun11/2dbda6b31acc7c6292d14a872d0c90b7/raw/"
            "5f5a5270089239ef2f6b65b1cc55208355b5acca/trainaug.txt",
            None,
            "trainaug",
            _SEG_SETS,
            (f"{_SEG_SETS}/trainaug.txt",),
        ),
    ),
    "coco14": (
        DatasetFile(
            "train2014.zip",
            "http://images.cocodataset.org/zips/train2014.zip",
            "0da8c0bd3d6becc4dcb32757491aca88",
            "merge",
            "coco2014",
            ("coco2014/train2014",),
        ),
        DatasetFile(
            "val2014.zip",
            "http://images.cocodataset.org/zips/val2014.zip",
            "a3d79f5ed8d289b7a7554ce06a5782b3",
            "merge",
            "coco2014",
            ("coco2014/val2014",),
        ),
        DatasetFile(
            "annotations_trainval2014.zip",
            "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
            "0a379cfc70b0e71301e0f377548639bd",
            "merge",
            "coco2014",
            (
                "coco2014/annotations/instances_train2014.json",
                "coco2014/annotations/instances_val2014.json",
            ),
        ),
    ),
}


class _RetryableError(Exception):
    """A transient failure (dropped connection, 5xx, short body): try again."""


def download_dataset(
    dataset: str,
    out: str | Path,
    mirror: str | None = None,
    skip_checksum: bool = False,
    progress: bool = True,
    checksums: Mapping[str, str | None] | None = None,
    urls: Mapping[str, str] | None = None,
    retries: int = 5,
    backoff: float = 1.0,
) -> Path:
    """Fetch and unpack a dataset into the standard layout; safe to run again.

    Args:
        dataset: ``voc12`` or ``coco14``.
        out: Local folder to download and unpack into (created if missing).
        mirror: Base URL; every file is then fetched as ``<mirror>/<official name>``.
        skip_checksum: Warn instead of failing when a file does not match its MD5.
        progress: Show progress bars.
        checksums: MD5 per file name, overriding the published ones (None: not verified).
        urls: URL per file name, overriding both the defaults and ``mirror``.
        retries: Consecutive failed attempts allowed per file (an attempt that moved the
            download forward resets the count) before giving up.
        backoff: First wait between attempts in seconds; doubles each time.

    Returns:
        ``out``, the folder holding ``VOCdevkit/`` or ``coco2014/``.

    Raises:
        DownloadError: A file could not be fetched (404 and other HTTP errors name the URL).
        ChecksumError: A file did not match its MD5 (it is removed).
        ArchiveError: An archive is corrupt, unsafe, or lacks the expected content.
        ConfigError: Unknown dataset or file name.
    """
    if dataset not in DATASET_FILES:
        raise ConfigError(f"unknown dataset {dataset!r}: choose one of {sorted(DATASET_FILES)}")
    if "://" in str(out):
        raise StorageError(f"download --out must be a local folder, not {out}")
    files = DATASET_FILES[dataset]
    known = {f.name for f in files}
    for label, overrides in (("checksums", checksums), ("urls", urls)):
        unknown = sorted(set(overrides or {}) - known)
        if unknown:
            raise ConfigError(f"{label} names files not in {dataset}: {unknown}")

    root = Path(out)
    downloads = root / DOWNLOADS_DIR
    try:
        downloads.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"cannot create {downloads}: {err}; choose another --out") from err
    marker = _load_marker(root)
    with requests.Session() as session:
        # identity: a transparently gzipped body would break byte offsets for Range resume.
        session.headers.update({"User-Agent": "vitpcm-download", "Accept-Encoding": "identity"})
        for spec in files:
            expected = (checksums or {}).get(spec.name, spec.md5)
            url = _url_for(spec, mirror, urls)
            state = marker.setdefault(spec.name, {})
            if (
                state.get("installed")
                and all((root / p).exists() for p in spec.provides)
                and (expected is None or skip_checksum or state.get("md5") == expected)
            ):
                logger.info("%s already downloaded and unpacked", spec.name)
                continue
            state["installed"] = False
            path = downloads / spec.name
            _ensure_downloaded(
                session,
                spec.name,
                url,
                path,
                expected,
                state,
                skip_checksum=skip_checksum,
                progress=progress,
                retries=retries,
                backoff=backoff,
            )
            _save_marker(root, marker)
            _install(spec, path, root, progress)
            state["installed"] = True
            _save_marker(root, marker)
    return root


def _url_for(spec: DatasetFile, mirror: str | None, urls: Mapping[str, str] | None) -> str:
    if urls and spec.name in urls:
        return urls[spec.name]
    if mirror:
        return f"{mirror.rstrip('/')}/{spec.name}"
    return spec.url


# -- fetching -------------------------------------------------------------------------------


def _ensure_downloaded(
    session: requests.Session,
    name: str,
    url: str,
    path: Path,
    expected: str | None,
    state: dict[str, Any],
    *,
    skip_checksum: bool,
    progress: bool,
    retries: int,
    backoff: float,
) -> None:
    """Make ``path`` a complete, verified copy of ``url``, reusing what is already there."""
    if path.is_file():
        size = path.stat().st_size
        if state.get("size") == size and (
            expected is None or skip_checksum or state.get("md5") == expected
        ):
            logger.info("%s already downloaded", name)
            return
        # A file we did not record (placed by hand, or from before the marker existed):
        # accept it if it checks out, otherwise fetch it again.
        actual = file_md5(path, progress)
        if expected is None or actual == expected:
            state.update(size=size, md5=actual, verified=expected is not None)
            return
        logger.warning("%s does not match its checksum; fetching it again", path)
        path.unlink()

    part = path.with_name(path.name + ".part")
    fetch(session, url, part, progress=progress, retries=retries, backoff=backoff)
    actual = file_md5(part, progress)
    if expected is None:
        logger.warning(
            "%s has no known checksum, so it was not verified (md5 %s, %d bytes)",
            name,
            actual,
            part.stat().st_size,
        )
    elif actual != expected:
        if not skip_checksum:
            part.unlink()
            raise ChecksumError(
                f"{name} from {url} has md5 {actual}, expected {expected}; the file was "
                "removed. Run again to fetch it afresh, try --mirror, or pass --skip-checksum "
                "if you trust this copy"
            )
        logger.warning(
            "%s has md5 %s, expected %s; kept because checksums are skipped",
            name,
            actual,
            expected,
        )
    os.replace(part, path)
    state.update(url=url, size=path.stat().st_size, md5=actual, verified=expected == actual)


def fetch(
    session: requests.Session,
    url: str,
    part: Path,
    progress: bool = True,
    retries: int = 5,
    backoff: float = 1.0,
) -> None:
    """Download ``url`` into ``part``, resuming whatever ``part`` already holds.

    Raises:
        DownloadError: On a 4xx answer (at once) or when ``retries`` consecutive attempts
            failed without moving the download forward. The partial file is kept so the
            next run resumes it.
    """
    failures = 0
    while True:
        before = _size(part)
        try:
            _attempt(session, url, part, progress)
            return
        except _RetryableError as err:
            reason = str(err)
        except requests.exceptions.InvalidURL as err:
            raise DownloadError(f"invalid URL {url}: {err}; check --mirror") from err
        except (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema) as err:
            raise DownloadError(
                f"cannot fetch {url}: only http:// and https:// URLs are supported ({err})"
            ) from err
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
            reason = f"{type(err).__name__}: {err}"
        if _size(part) > before:
            # The connection works, it is just flaky: keep going as long as we advance.
            failures = 0
        failures += 1
        if failures > retries:
            raise DownloadError(
                f"could not download {url} after {failures} attempts ({reason}); the partial "
                f"file {part} is kept: run again to resume, or pass --mirror BASE_URL"
            )
        delay = min(backoff * 2 ** (failures - 1), _MAX_BACKOFF_S)
        logger.warning("%s: %s; retrying in %.1f s (%d/%d)", url, reason, delay, failures, retries)
        time.sleep(delay)


def _attempt(session: requests.Session, url: str, part: Path, progress: bool) -> None:
    """One GET, appending to ``part`` (Range) or rewriting it (full answer)."""
    offset = _size(part)
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=_TIMEOUT) as resp:
        code = resp.status_code
        if code == 416 and offset:
            total = _content_range_total(resp.headers.get("Content-Range", ""))
            if total == offset:
                return  # the previous run had fetched every byte already
            part.unlink()
            raise _RetryableError("server refused to resume the partial file; restarting")
        if code == 404:
            raise DownloadError(
                f"{url} was not found (HTTP 404): the file may have moved; pass --mirror "
                "BASE_URL pointing at a server that has the official file names"
            )
        if code >= 500 or code in (408, 429):
            raise _RetryableError(f"HTTP {code}")
        if code not in (200, 206):
            raise DownloadError(
                f"{url} answered HTTP {code} {resp.reason}; pass --mirror BASE_URL to fetch "
                "from elsewhere"
            )

        length = _int_header(resp.headers.get("Content-Length"))
        if code == 206:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            if start != offset:
                part.unlink()
                raise _RetryableError(f"server resumed at byte {start}, not {offset}")
            mode = "ab"
        else:
            if offset:
                logger.info("%s: server ignored the Range request; restarting", url)
            offset = 0
            total = length
            mode = "wb"
        _check_space(part, (total - offset) if total is not None else None)

        received = 0
        with (
            part.open(mode) as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            # The raw stream, undecoded: requests' iter_content keeps reading to fill a
            # chunk and drops what it holds when the connection breaks, which would lose
            # the bytes a resume should keep. Undecoded bytes are also what Range counts.
            for chunk in resp.raw.stream(_CHUNK, decode_content=False):
                f.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if length is not None and received != length:
            raise _RetryableError(f"transfer cut short: got {received} of {length} bytes")
        if total is not None and _size(part) != total:
            raise _RetryableError(f"size mismatch: have {_size(part)} of {total} bytes")


def file_md5(path: Path, progress: bool = True) -> str:
    """MD5 of a file as lowercase hex, with a progress bar for big files."""
    digest = hashlib.md5(usedforsecurity=False)
    with (
        path.open("rb") as f,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"verify {path.name.removesuffix('.part')}",
            disable=not progress or path.stat().st_size < 64 * _CHUNK,
        ) as bar,
    ):
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _int_header(value: str | None) -> int | None:
    return int(value) if value and value.strip().isdigit() else None


def _content_range(value: str) -> tuple[int, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL or None for ``*``)."""
    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", value)
    if not match:
        raise _RetryableError(f"unreadable Content-Range {value!r}")
    total = match.group(3)
    return int(match.group(1)), (None if total == "*" else int(total))


def _content_range_total(value: str) -> int | None:
    match = re.search(r"/(\d+)\s*$", value)
    return int(match.group(1)) if match else None


def _check_space(part: Path, needed: int | None) -> None:
    if needed is None:
        return
    free = shutil.disk_usage(part.parent).free
    if free < needed:
        raise DownloadError(
            f"not enough disk space for {part.name.removesuffix('.part')} in {part.parent}: "
            f"{needed / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free"
        )


# -- unpacking ------------------------------------------------------------------------------


def _install(spec: DatasetFile, path: Path, root: Path, progress: bool) -> None:
    """Put one downloaded file's content into the layout and check it is there."""
    if spec.install == "merge":
        extract_archive(path, root / spec.dest, progress=progress)
    elif spec.install == "sbd":
        _install_sbd(path, root / spec.dest, progress)
    elif spec.install == "trainaug":
        ids = normalise_id_list(path.read_bytes(), path)
        _write_text_atomic(root / spec.dest / "trainaug.txt", "\n".join(ids) + "\n")
    else:  # pragma: no cover - the table is fixed
        raise ValueError(f"unknown install kind {spec.install!r}")
    missing = [p for p in spec.provides if not (root / p).exists()]
    if missing:
        raise ArchiveError(
            f"{path} was unpacked but {', '.join(missing)} is missing under {root}: is it the "
            f"right file? Delete {path} and run again (or use --mirror)"
        )


def _install_sbd(archive: Path, voc_dir: Path, progress: bool) -> None:
    """Move the zip's ``SegmentationClassAug/`` folder to ``VOC2012/SegmentationClassAug``."""
    with staging_dir(voc_dir, "sbd") as staging:
        unpack(archive, staging, progress=progress)
        candidates = [staging / "SegmentationClassAug"]
        candidates += sorted(staging.glob("*/SegmentationClassAug"))
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            raise ArchiveError(
                f"{archive} has no SegmentationClassAug/ folder: is it the right file? Delete "
                "it and run again (or use --mirror)"
            )
        target = voc_dir / "SegmentationClassAug"
        if target.exists():
            shutil.rmtree(target)
        os.replace(found, target)


def normalise_id_list(data: bytes, source: str | Path) -> list[str]:
    """Image ids from a trainaug-style list, in order, without duplicates.

    Accepts plain ids (``2007_000032``) and the DeepLab pair format
    (``/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png``).

    Raises:
        DataError: Naming the line, when a line is neither (e.g. an HTML page was served).
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{source} is not a text list of image ids: {err}") from err
    ids: list[str] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        stem = PurePosixPath(line.split()[0].replace("\\", "/")).stem
        if not _IMAGE_ID.fullmatch(stem):
            raise DataError(
                f"{source} line {lineno} is neither an image id nor a '/JPEGImages/<id>.jpg "
                f"...' pair: {line[:80]!r}; is it the right file?"
            )
        if stem not in seen:
            seen.add(stem)
            ids.append(stem)
    if not ids:
        raise DataError(f"{source} lists no image ids: is it the right file?")
    return ids


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- marker ---------------------------------------------------------------------------------


def _load_marker(root: Path) -> dict[str, dict[str, Any]]:
    path = root / MARKER_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("files is not an object")
        return files
    except (ValueError, KeyError, TypeError) as err:
        # A damaged record only costs re-verification, never a wrong "done".
        logger.warning("ignoring unreadable %s (%s)", path, err)
        return {}


def _save_marker(root: Path, files: dict[str, dict[str, Any]]) -> None:
    _write_text_atomic(
        root / MARKER_NAME, json.dumps({"format": 1, "files": files}, indent=2, sort_keys=True)
    )

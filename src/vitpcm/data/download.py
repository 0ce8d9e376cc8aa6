"""Download a dataset's official files and install them into its layout.

What to fetch and where it goes is the dataset source's (:mod:`vitpcm.data.sources`).
Archives are kept in ``<out>/downloads/``. Each one is streamed to ``<name>.part`` (resumed
only from the same file on the same server, see :mod:`vitpcm.data.http_fetch`), retried with
exponential backoff, checked against its published size and checksum and only then renamed
to its final name. It is then unpacked within :class:`~vitpcm.data.archives.UnpackLimits`.
What has been fetched and unpacked is recorded in ``<out>/.vitpcm-download.json``, so running
again does no work that is already done; a file that failed to unpack is not recorded (and,
unless it matched a published checksum, removed), so the next run fetches it again.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import requests

from vitpcm.data.archives import UnpackLimits
from vitpcm.data.http_fetch import (
    DEFAULT_TIMEOUT_S,
    commit_part,
    discard_part,
    fetch,
    file_digest,
    parse_checksum,
)
from vitpcm.data.sources import DatasetFile, DatasetSource, get_source
from vitpcm.data.sources.base import write_text_atomic
from vitpcm.errors import (
    ArchiveError,
    ChecksumError,
    ConfigError,
    DataError,
    StorageError,
)

__all__ = ["DOWNLOADS_DIR", "MARKER_NAME", "download_dataset", "fetch"]

logger = logging.getLogger(__name__)

MARKER_NAME = ".vitpcm-download.json"
DOWNLOADS_DIR = "downloads"


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
    timeout: float = DEFAULT_TIMEOUT_S,
    limits: UnpackLimits | None = None,
) -> Path:
    """Fetch and unpack a dataset into the standard layout; safe to run again.

    Args:
        dataset: A registered dataset name (:func:`vitpcm.data.sources.dataset_names`).
        out: Local folder to download and unpack into (created if missing).
        mirror: Base URL; every file is then fetched as ``<mirror>/<official name>``.
        skip_checksum: Warn instead of failing when a file does not match its published
            checksum or size.
        progress: Show progress bars.
        checksums: Checksum per file name (``sha256:HEX``, ``md5:HEX`` or bare hex),
            overriding the published ones; None: not verified. Sizes are then not checked.
        urls: URL per file name, overriding both the defaults and ``mirror``.
        retries: Consecutive failed attempts allowed per file (an attempt that moved the
            download forward resets the count) before giving up.
        backoff: First wait between attempts in seconds; doubles each time.
        timeout: Seconds without an answer (connecting, or between two reads) after which
            an attempt fails; the whole file fails after ``retries + 1`` such attempts.
        limits: What each archive may unpack to (default :class:`UnpackLimits`()).

    Returns:
        ``out``, the folder holding the dataset's layout.

    Raises:
        DownloadError: A file could not be fetched (404 and other HTTP errors name the URL),
            or the server's file has another size than the published one.
        ChecksumError: A file did not match its checksum (it is removed).
        ArchiveError: An archive is corrupt, unsafe, over ``limits``, or lacks the expected
            content (it is not recorded as downloaded).
        ConfigError: Unknown dataset or file name, unreadable checksum.
    """
    source = get_source(dataset)
    if "://" in str(out):
        raise StorageError(f"download --out must be a local folder, not {out}")
    if timeout <= 0:
        raise ConfigError(f"timeout must be positive, got {timeout}")
    files = source.files
    if not files:
        raise ConfigError(
            f"{dataset} has no files to download (it is generated: vitpcm data synth)"
        )
    known = {f.name for f in files}
    for label, overrides in (("checksums", checksums), ("urls", urls)):
        unknown = sorted(set(overrides or {}) - known)
        if unknown:
            raise ConfigError(f"{label} names files not in {dataset}: {unknown}")
    expected = {spec.name: _expected(spec, checksums) for spec in files}

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
            checksum, size = expected[spec.name]
            url = _url_for(spec, mirror, urls)
            state = marker.setdefault(spec.name, {})
            if (
                state.get("installed")
                and all((root / p).exists() for p in spec.provides)
                and (checksum is None or skip_checksum or state.get("checksum") == checksum)
            ):
                logger.info("%s already downloaded and unpacked", spec.name)
                continue
            state["installed"] = False
            path = downloads / spec.name
            _ensure_downloaded(
                session,
                url,
                path,
                checksum,
                None if skip_checksum else size,
                state,
                skip_checksum=skip_checksum,
                progress=progress,
                fetch_options={"retries": retries, "backoff": backoff, "timeout": timeout},
            )
            _save_marker(root, marker)
            try:
                _install(source, spec, path, root, progress, limits)
            except (ArchiveError, DataError) as err:
                _forget_failed(root, marker, spec.name, path, err)
            state["installed"] = True
            _save_marker(root, marker)
    return root


def _expected(
    spec: DatasetFile, overrides: Mapping[str, str | None] | None
) -> tuple[str | None, int | None]:
    """The normalised ``algo:hex`` to check a file against, and its size (None: unknown)."""
    if overrides is not None and spec.name in overrides:
        text, size = overrides[spec.name], None
    else:
        text, size = spec.checksum, spec.size
    if text is None:
        return None, size
    algo, value = parse_checksum(text)
    return f"{algo}:{value}", size


def _forget_failed(
    root: Path, marker: dict[str, dict[str, Any]], name: str, path: Path, err: Exception
) -> None:
    """After a failed unpack: record nothing for ``name``; remove an unverified download."""
    state = marker.get(name, {})
    if state.get("fetched") and not state.get("verified"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        what = f"{path} (no published checksum) was removed, so the next run fetches it again"
    elif state.get("verified"):
        what = f"{path} matches its published checksum and is kept"
    else:
        what = f"{path} was not downloaded by vitpcm and is kept: delete or replace it"
    marker[name] = {}
    _save_marker(root, marker)
    raise type(err)(f"{err} [{what}]") from err


def _url_for(spec: DatasetFile, mirror: str | None, urls: Mapping[str, str] | None) -> str:
    if urls and spec.name in urls:
        return urls[spec.name]
    if mirror:
        return f"{mirror.rstrip('/')}/{spec.name}"
    return spec.url


def _ensure_downloaded(
    session: requests.Session,
    url: str,
    path: Path,
    checksum: str | None,
    size: int | None,
    state: dict[str, Any],
    *,
    skip_checksum: bool,
    progress: bool,
    fetch_options: Mapping[str, Any],
) -> None:
    """Make ``path`` a complete, verified copy of ``url``, reusing what is already there."""
    algo = checksum.partition(":")[0] if checksum else "sha256"
    if path.is_file():
        have = path.stat().st_size
        if state.get("size") == have and (
            checksum is None or skip_checksum or state.get("checksum") == checksum
        ):
            logger.info("%s already downloaded", path.name)
            return
        # A file we did not record (placed by hand, or from before the marker existed):
        # accept it if it checks out, otherwise fetch it again.
        actual = file_digest(path, algo, progress)
        if checksum is None or actual == checksum:
            state.update(size=have, checksum=actual, verified=checksum is not None)
            state.setdefault("fetched", False)
            return
        logger.warning("%s does not match its checksum; fetching it again", path)
        path.unlink()

    part = path.with_name(path.name + ".part")
    fetch(session, url, part, progress=progress, expected_size=size, **fetch_options)
    actual = file_digest(part, algo, progress)
    if checksum is None:
        logger.warning(
            "%s has no known checksum, so it was not verified (%s, %d bytes; once you trust "
            "it, pin it with --checksum %s=%s)",
            path.name,
            actual,
            part.stat().st_size,
            path.name,
            actual,
        )
    elif actual != checksum:
        if not skip_checksum:
            discard_part(part)
            raise ChecksumError(
                f"{path.name} from {url} has {actual}, expected {checksum}; the file was "
                "removed. Run again to fetch it afresh, try --mirror, or pass --skip-checksum "
                "if you trust this copy"
            )
        logger.warning(
            "%s has %s, expected %s; kept because checksums are skipped",
            path.name,
            actual,
            checksum,
        )
    commit_part(part, path)
    state.update(
        url=url,
        size=path.stat().st_size,
        checksum=actual,
        verified=actual == checksum,
        fetched=True,
    )


# -- unpacking ------------------------------------------------------------------------------


def _install(
    source: DatasetSource,
    spec: DatasetFile,
    path: Path,
    root: Path,
    progress: bool,
    limits: UnpackLimits | None,
) -> None:
    """Put one downloaded file's content into the layout and check it is there."""
    source.install(spec, path, root, progress, limits)
    missing = [p for p in spec.provides if not (root / p).exists()]
    if missing:
        raise ArchiveError(
            f"{path} was unpacked but {', '.join(missing)} is missing under {root}: is it the "
            "right file? (try --mirror)"
        )


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
    write_text_atomic(
        root / MARKER_NAME, json.dumps({"format": 1, "files": files}, indent=2, sort_keys=True)
    )

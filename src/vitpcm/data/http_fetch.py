"""Resumable HTTP downloads that never splice two different files together.

:func:`fetch` streams a URL to ``<name>.part``. After a dropped connection (or a killed run)
it asks for the rest with an HTTP ``Range`` request -- but only when the partial file
provably comes from the same file on the same server: next to it, ``<name>.part.json``
records the URL, total size, ``ETag`` and ``Last-Modified`` of the answer its bytes came
from. A partial file from another mirror (or with no record) is discarded; the resume
request carries ``If-Range`` so a server whose file changed sends the whole new file; and a
``206`` whose size or ETag differs from the record restarts the download. Splicing the head
of one file onto the tail of another would otherwise only be caught by the checksum -- and
not at all for a file without one.

A server that accepts the connection and then says nothing fails after ``timeout`` seconds
per attempt (``retries`` attempts in a row), with a warning at each, so the worst case is
bounded: ``(retries + 1) * timeout`` plus the back-off waits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import requests
import urllib3
from tqdm import tqdm

from vitpcm.errors import ConfigError, DownloadError

logger = logging.getLogger("vitpcm.data.download")

CHUNK = 1024 * 1024
DEFAULT_TIMEOUT_S = 30.0
# Slower than this over a whole ``timeout`` window counts as a stall, so a server that
# trickles a byte now and then (each read within the timeout) cannot hold a download forever.
MIN_BYTES_PER_S = 1024
_MAX_BACKOFF_S = 60.0
_ALGORITHMS = {32: "md5", 64: "sha256"}


class _RetryableError(Exception):
    """A transient failure (dropped connection, 5xx, short body): try again."""


class _TooSlowError(_RetryableError):
    """The server trickles: bytes arrive, but too few to count as progress."""


# -- checksums ------------------------------------------------------------------------------


def parse_checksum(text: str) -> tuple[str, str]:
    """``md5:HEX``, ``sha256:HEX`` or bare hex (32 digits: MD5, 64: SHA-256) -> (algo, hex).

    Raises:
        ConfigError: Neither form.
    """
    algo, _, value = text.strip().lower().rpartition(":")
    algo = algo or _ALGORITHMS.get(len(value), "")
    if algo not in ("md5", "sha256") or not re.fullmatch(r"[0-9a-f]+", value or "x"):
        raise ConfigError(
            f"unreadable checksum {text!r}: give md5:<32 hex digits> or sha256:<64 hex digits>"
        )
    if len(value) != {"md5": 32, "sha256": 64}[algo]:
        raise ConfigError(f"checksum {text!r} has {len(value)} digits, not a {algo}")
    return algo, value


def file_digest(path: Path, algo: str = "sha256", progress: bool = True) -> str:
    """``algo:HEX`` digest of a file, with a progress bar for big files."""
    digest = hashlib.new(algo, usedforsecurity=False)
    size = path.stat().st_size
    with (
        path.open("rb") as f,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"verify {path.name.removesuffix('.part')}",
            disable=not progress or size < 64 * CHUNK,
        ) as bar,
    ):
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return f"{algo}:{digest.hexdigest()}"


# -- the partial file and its origin --------------------------------------------------------


def origin_path(part: Path) -> Path:
    """``<name>.part.json``: where ``part``'s bytes came from."""
    return part.with_name(part.name + ".json")


def _load_origin(part: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(origin_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _save_origin(part: Path, origin: dict[str, Any]) -> None:
    path = origin_path(part)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(origin, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def discard_part(part: Path) -> None:
    """Remove a partial file and its origin record."""
    for path in (part, origin_path(part)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def commit_part(part: Path, final: Path) -> None:
    """Give a complete partial file its final name and drop its origin record."""
    os.replace(part, final)
    with contextlib.suppress(FileNotFoundError):
        origin_path(part).unlink()


# -- fetching -------------------------------------------------------------------------------


def fetch(
    session: requests.Session,
    url: str,
    part: Path,
    progress: bool = True,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = DEFAULT_TIMEOUT_S,
    expected_size: int | None = None,
) -> None:
    """Download ``url`` into ``part``, resuming what ``part`` holds when it is the same file.

    A server that sends under 1 KiB/s for ``timeout`` seconds counts as stalled, and such
    attempts do not reset the count of failures even though they moved a few bytes.

    Args:
        session: The HTTP session.
        url: What to fetch.
        part: The partial file (``<name>.part``); its origin record sits beside it.
        progress: Show a progress bar.
        retries: Consecutive failed attempts allowed (one that moved forward resets it).
        backoff: First wait between attempts in seconds; doubles each time (at most 60 s).
        timeout: Seconds to wait for the connection and for each read before the attempt
            counts as failed.
        expected_size: The official size in bytes: a server announcing another size is
            refused before a byte is written.

    Raises:
        DownloadError: On a 4xx answer or a wrong size (at once), or when ``retries + 1``
            attempts in a row failed without moving the download forward.
    """
    failures = 0
    started = time.monotonic()
    while True:
        before = _size(part)
        advanced = True
        try:
            _attempt(session, url, part, progress, timeout, expected_size)
            return
        except _TooSlowError as err:
            reason, advanced = str(err), False
        except _RetryableError as err:
            reason = str(err)
        except requests.exceptions.InvalidURL as err:
            raise DownloadError(f"invalid URL {url}: {err}; check --mirror") from err
        except (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema) as err:
            raise DownloadError(
                f"cannot fetch {url}: only http:// and https:// URLs are supported ({err})"
            ) from err
        except (requests.Timeout, urllib3.exceptions.TimeoutError) as err:
            reason = f"no answer within {timeout:g} s ({type(err).__name__})"
        except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
            reason = f"{type(err).__name__}: {err}"
        if advanced and _size(part) > before:
            # The connection works, it is just flaky: keep going as long as we advance.
            failures = 0
        failures += 1
        if failures > retries:
            elapsed = time.monotonic() - started
            kept = _size(part)
            if kept:
                tail = (
                    f"the partial file {part} ({kept} bytes) is kept: run again to resume, or "
                    "pass --mirror BASE_URL"
                )
            else:
                tail = (
                    "nothing was written; check the host (or pass --mirror BASE_URL), or "
                    "raise --timeout for a very slow server"
                )
            raise DownloadError(
                f"could not download {url}: {failures} attempts failed in {elapsed:.0f} s "
                f"(last: {reason}); {tail}"
            )
        delay = min(backoff * 2 ** (failures - 1), _MAX_BACKOFF_S)
        logger.warning("%s: %s; retrying in %.1f s (%d/%d)", url, reason, delay, failures, retries)
        time.sleep(delay)


def _strong_validator(origin: dict[str, Any]) -> str | None:
    """What to send as ``If-Range``: a strong ETag, else the Last-Modified date."""
    etag = origin.get("etag")
    if etag and not str(etag).startswith("W/"):
        return str(etag)
    return origin.get("last_modified")


def _changes(origin: dict[str, Any], total: int | None, resp: requests.Response) -> list[str]:
    """How the file behind a ``206`` differs from the one the partial file came from."""
    changed = []
    if origin.get("total") is not None and total is not None and total != origin["total"]:
        changed.append(f"size {origin['total']} -> {total} bytes")
    for key, header in (("etag", "ETag"), ("last_modified", "Last-Modified")):
        now = resp.headers.get(header)
        if origin.get(key) and now and now != origin[key]:
            changed.append(f"{header} {origin[key]} -> {now}")
    return changed


def _attempt(
    session: requests.Session,
    url: str,
    part: Path,
    progress: bool,
    timeout: float,
    expected_size: int | None,
) -> None:
    """One GET, appending to ``part`` (Range) or rewriting it (full answer)."""
    offset = _size(part)
    origin = _load_origin(part) if offset else None
    if offset and (origin is None or origin.get("url") != url):
        why = "no record of its origin" if origin is None else f"it came from {origin.get('url')}"
        logger.warning("%s: discarding the partial file (%s); starting over", part.name, why)
        discard_part(part)
        offset, origin = 0, None
    headers = {}
    if offset and origin is not None:
        headers["Range"] = f"bytes={offset}-"
        validator = _strong_validator(origin)
        if validator:
            headers["If-Range"] = validator
    with session.get(url, headers=headers, stream=True, timeout=(timeout, timeout)) as resp:
        code = resp.status_code
        if code == 416 and offset:
            total = _content_range_total(resp.headers.get("Content-Range", ""))
            if total == offset and origin is not None and origin.get("total") in (None, total):
                return  # the previous run had fetched every byte already
            discard_part(part)
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
        if code == 206 and origin is not None:
            start, total = _content_range(resp.headers.get("Content-Range", ""))
            changed = _changes(origin, total, resp)
            if changed or start != offset:
                discard_part(part)
                why = "; ".join(changed) or f"it resumed at byte {start}, not {offset}"
                raise _RetryableError(f"the file on the server changed ({why}); starting over")
            mode = "ab"
        else:
            if offset:
                logger.info("%s: server sent the whole file, not the rest; restarting", url)
            offset, total, mode = 0, length, "wb"
        if expected_size is not None and total is not None and total != expected_size:
            discard_part(part)
            raise DownloadError(
                f"{url} is {total} bytes, but the official {part.name.removesuffix('.part')} "
                f"is {expected_size} bytes: this server holds another file; pass --mirror "
                "BASE_URL with the official files (or --skip-checksum if you trust it)"
            )
        _check_space(part, (total - offset) if total is not None else None)
        if mode == "wb":
            _save_origin(
                part,
                {
                    "url": url,
                    "total": total,
                    "etag": resp.headers.get("ETag"),
                    "last_modified": resp.headers.get("Last-Modified"),
                },
            )
        _stream(resp, part, mode, offset, total, length, progress, timeout)


def _stream(
    resp: requests.Response,
    part: Path,
    mode: str,
    offset: int,
    total: int | None,
    length: int | None,
    progress: bool,
    timeout: float,
) -> None:
    received = 0
    window_start, window_bytes = time.monotonic(), 0
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
        # One socket read at a time (read1), undecoded: reading to fill a chunk would drop
        # what it holds when the connection breaks or stalls, losing bytes a resume should
        # keep. Undecoded bytes are also what Range counts.
        while chunk := resp.raw.read1(CHUNK, decode_content=False):
            f.write(chunk)
            received += len(chunk)
            bar.update(len(chunk))
            window_bytes += len(chunk)
            elapsed = time.monotonic() - window_start
            if elapsed >= timeout:
                if window_bytes < MIN_BYTES_PER_S * elapsed:
                    raise _TooSlowError(
                        f"only {window_bytes} bytes in {elapsed:.1f} s (under "
                        f"{MIN_BYTES_PER_S} bytes/s)"
                    )
                window_start, window_bytes = time.monotonic(), 0
    if length is not None and received != length:
        raise _RetryableError(f"transfer cut short: got {received} of {length} bytes")
    if total is not None and _size(part) != total:
        raise _RetryableError(f"size mismatch: have {_size(part)} of {total} bytes")


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

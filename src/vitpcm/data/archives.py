"""Safe unpacking of downloaded tar and zip archives.

Dataset archives come from mirrors we do not control, so every member is checked before a
byte is written: absolute paths, ``..`` components, links of any kind and device files are
refused with :class:`~vitpcm.errors.ArchiveError` naming the member. macOS junk
(``__MACOSX/``, ``._*`` AppleDouble files, ``.DS_Store``) is skipped. Files are written by
this module from the member's data, never through ``tarfile``/``zipfile`` extraction, so
permissions, owners and link semantics of the archive never reach the disk.

Unpacking goes into a staging folder inside the destination and is moved into place only
when the whole archive was read, so an interrupted run never leaves a half-unpacked tree
where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from vitpcm.errors import ArchiveError

_JUNK_DIRS = frozenset({"__MACOSX"})
_JUNK_FILES = frozenset({".DS_Store"})
_COPY_CHUNK = 1024 * 1024


def is_junk(name: str) -> bool:
    """True for macOS metadata that archives made on a Mac carry along."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if any(part in _JUNK_DIRS for part in parts):
        return True
    return bool(parts) and (parts[-1].startswith("._") or parts[-1] in _JUNK_FILES)


def safe_member_path(name: str, archive: str | Path) -> PurePosixPath | None:
    """Check one member name and return its relative path, or None for the root entry.

    Backslashes count as separators, because archives made on Windows use them and
    ``..\\x`` must not slip through as an odd file name.

    Raises:
        ArchiveError: If the name is absolute or has a ``..`` component.
    """
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        raise ArchiveError(
            f"archive {archive} has a member with an absolute path: {name!r}; refusing to "
            "unpack it (the archive is damaged or malicious: delete it and fetch it again)"
        )
    parts = [p for p in normalised.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(
            f"archive {archive} has a member that escapes the target folder: {name!r}; "
            "refusing to unpack it (delete the archive and fetch it again)"
        )
    return PurePosixPath(*parts) if parts else None


def unpack(archive: str | Path, target: str | Path, progress: bool = True) -> int:
    """Unpack a tar (any compression) or zip archive into ``target`` after checking it.

    Members are written directly under ``target``; callers that need atomicity unpack into
    a :func:`staging_dir` and move the result (see :func:`extract_archive`).

    Args:
        archive: The archive file.
        target: Existing folder to write into.
        progress: Show a progress bar in bytes.

    Returns:
        The number of files written.

    Raises:
        ArchiveError: On a corrupt or unknown archive, or an unsafe member (named).
    """
    archive = Path(archive)
    target = Path(target)
    if _looks_like_zip(archive):
        return _unpack_zip(archive, target, progress)
    if _looks_like_tar(archive):
        return _unpack_tar(archive, target, progress)
    raise ArchiveError(
        f"{archive} is neither a tar nor a zip archive (maybe an HTML error page was "
        "downloaded instead): delete it and fetch it again, e.g. with --mirror"
    )


@contextlib.contextmanager
def staging_dir(parent: str | Path, label: str = "unpack") -> Iterator[Path]:
    """A fresh hidden folder inside ``parent``, removed on exit whatever happens.

    Staying inside ``parent`` keeps the final moves on one filesystem (cheap renames).
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".{label}-{uuid.uuid4().hex[:8]}.tmp"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def merge_tree(src: str | Path, dest: str | Path) -> None:
    """Move everything under ``src`` into ``dest``, merging folders, replacing files."""
    src = Path(src)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dest / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.is_dir() and not target.is_symlink():
                merge_tree(entry, target)
                continue
            _remove(target)
            os.replace(entry, target)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)


def extract_archive(archive: str | Path, dest: str | Path, progress: bool = True) -> int:
    """Safely unpack ``archive`` and merge its contents into ``dest``.

    Returns:
        The number of files written.
    """
    with staging_dir(dest) as staging:
        count = unpack(archive, staging, progress=progress)
        merge_tree(staging, dest)
    return count


# -- formats --------------------------------------------------------------------------------


def _looks_like_zip(archive: Path) -> bool:
    return archive.suffix.lower() == ".zip" or zipfile.is_zipfile(archive)


def _looks_like_tar(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except OSError as err:
        raise ArchiveError(f"cannot read archive {archive}: {err}") from err


def _unpack_tar(archive: Path, target: Path, progress: bool) -> int:
    # For a plain tar the member sizes add up to about the file size; compressed tars
    # have no cheap total, so their bar just counts.
    plain = archive.suffix.lower() == ".tar"
    count = 0
    try:
        with (
            tarfile.open(archive, mode="r:*") as tar,
            tqdm(
                total=archive.stat().st_size if plain else None,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"unpack {archive.name}",
                disable=not progress,
            ) as bar,
        ):
            for member in tar:
                if is_junk(member.name):
                    continue
                rel = safe_member_path(member.name, archive)
                if member.issym() or member.islnk():
                    raise ArchiveError(
                        f"archive {archive} has a link member {member.name!r} -> "
                        f"{member.linkname!r}; links are refused (delete the archive and "
                        "fetch it again)"
                    )
                if member.isdir():
                    if rel is not None:
                        (target / rel).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise ArchiveError(
                        f"archive {archive} has a special member {member.name!r} (device, fifo "
                        "or unknown type); refusing to unpack it"
                    )
                if rel is None:
                    continue
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isfile() members always have data
                    raise ArchiveError(f"archive {archive}: cannot read member {member.name!r}")
                with source:
                    _write_member(source, target, rel)
                count += 1
                bar.update(member.size)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ArchiveError(
            f"archive {archive} is corrupt or truncated ({err}): delete it and fetch it again"
        ) from err
    return count


def _unpack_zip(archive: Path, target: Path, progress: bool) -> int:
    count = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            with tqdm(
                total=sum(info.file_size for info in infos),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"unpack {archive.name}",
                disable=not progress,
            ) as bar:
                for info in infos:
                    if is_junk(info.filename):
                        continue
                    rel = safe_member_path(info.filename, archive)
                    # Zip has no link type of its own: Unix zips keep the mode in the
                    # high 16 bits of external_attr.
                    mode = info.external_attr >> 16
                    if stat.S_ISLNK(mode):
                        raise ArchiveError(
                            f"archive {archive} has a symlink member {info.filename!r}; links "
                            "are refused (delete the archive and fetch it again)"
                        )
                    # No type bits (zips made on other systems) means a plain file.
                    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                        raise ArchiveError(
                            f"archive {archive} has a special member {info.filename!r}; "
                            "refusing to unpack it"
                        )
                    if info.is_dir() or stat.S_ISDIR(mode):
                        if rel is not None:
                            (target / rel).mkdir(parents=True, exist_ok=True)
                        continue
                    if rel is None:
                        continue
                    with zf.open(info) as source:
                        _write_member(source, target, rel)
                    count += 1
                    bar.update(info.file_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error) as err:
        raise ArchiveError(
            f"archive {archive} is corrupt or truncated ({err}): delete it and fetch it again"
        ) from err
    return count


def _write_member(source: BinaryIO, target: Path, rel: PurePosixPath) -> None:
    path = target.joinpath(*rel.parts)
    # Belt and braces: the name checks above should make this impossible.
    if os.path.commonpath([os.path.abspath(path), os.path.abspath(target)]) != os.path.abspath(
        target
    ):
        raise ArchiveError(f"archive member {rel} would be written outside {target}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise ArchiveError(f"archive member {rel} is both a folder and a file")
    try:
        out = path.open("wb")
    except OSError as err:
        raise ArchiveError(f"cannot write {path} ({err}): check the folder and free space") from err
    with out:
        # An OSError here is either a damaged archive (read) or a full disk (write); the
        # message names both so the user can tell.
        try:
            shutil.copyfileobj(source, out, _COPY_CHUNK)
        except OSError as err:
            raise ArchiveError(
                f"failed while writing {path} from archive member {rel} ({err}): check free "
                "space; if there is enough, the archive is damaged: delete it and fetch it again"
            ) from err


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()

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

Archive bombs are refused (:class:`UnpackLimits`): a total unpacked size, an unpacked /
archive size ratio and a file count. Zip members' declared sizes are checked before anything
is written, and the bytes actually written are counted as they are written, so an archive
that lies about its sizes (or a compressed tar, which declares nothing up front) is stopped
at the limit, and its staging folder removed.
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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from tqdm import tqdm

from vitpcm.errors import ArchiveError

_JUNK_DIRS = frozenset({"__MACOSX"})
_JUNK_FILES = frozenset({".DS_Store"})
_COPY_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class UnpackLimits:
    """What one archive may unpack to; beyond it, it is refused as a bomb (or a wrong file).

    The defaults pass every official file with a wide margin: the largest, COCO's
    ``train2014.zip``, is 13.5 GB of JPEGs that do not compress (ratio about 1), and the most
    compressible, ``annotations_trainval2014.zip``, unpacks 0.25 GB to about 0.8 GB (ratio
    about 3); VOC's tars are uncompressed. A deflate bomb reaches a ratio of about 1000.

    Attributes:
        max_bytes: Total bytes all members may unpack to.
        max_ratio: Unpacked bytes per archive byte, for the whole archive and for each zip
            member.
        ratio_floor: Bytes always allowed whatever the ratio, so tiny archives of a few
            compressible text files are not refused.
        max_files: Members (files and folders) the archive may hold (COCO train: 82,783).
    """

    max_bytes: int = 64 * 2**30
    max_ratio: float = 100.0
    ratio_floor: int = 16 * 2**20
    max_files: int = 2_000_000

    def budget(self, archive_size: int) -> int:
        """Bytes an archive of ``archive_size`` bytes may unpack to."""
        return int(min(self.max_bytes, max(self.max_ratio * archive_size, self.ratio_floor)))


class _Budget:
    """Counts what an archive unpacks (files and bytes) against its :class:`UnpackLimits`."""

    def __init__(self, archive: Path, limits: UnpackLimits) -> None:
        self.archive = archive
        self.limits = limits
        self.size = archive.stat().st_size if archive.is_file() else 0
        self.bytes_left = limits.budget(self.size)
        self.files = 0

    def refuse(self, what: str) -> ArchiveError:
        return ArchiveError(
            f"archive {self.archive} {what}: refusing to unpack it (an archive bomb, or not "
            f"the right file). Limits: {self.limits.max_bytes / 2**30:g} GiB in all, "
            f"{self.limits.max_ratio:g}x its size, {self.limits.max_files} files; if you "
            "trust it, raise them (--max-unpacked-gib, --max-ratio)"
        )

    def count_file(self) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise self.refuse(f"holds more than {self.limits.max_files} members")

    def take(self, n: int) -> None:
        self.bytes_left -= n
        if self.bytes_left < 0:
            limit = self.limits.budget(self.size)
            raise self.refuse(
                f"({self.size} bytes) unpacks to more than {limit} bytes "
                f"(ratio over {limit / max(self.size, 1):.0f})"
            )


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


def unpack(
    archive: str | Path,
    target: str | Path,
    progress: bool = True,
    limits: UnpackLimits | None = None,
) -> int:
    """Unpack a tar (any compression) or zip archive into ``target`` after checking it.

    Members are written directly under ``target``; callers that need atomicity unpack into
    a :func:`staging_dir` and move the result (see :func:`extract_archive`).

    Args:
        archive: The archive file.
        target: Existing folder to write into.
        progress: Show a progress bar in bytes.
        limits: Size, ratio and count limits (default: :class:`UnpackLimits`()).

    Returns:
        The number of files written.

    Raises:
        ArchiveError: On a corrupt or unknown archive, an unsafe member (named), or an
            archive over ``limits``.
    """
    archive = Path(archive)
    target = Path(target)
    budget = _Budget(archive, limits or UnpackLimits())
    if _looks_like_zip(archive):
        return _unpack_zip(archive, target, progress, budget)
    if _looks_like_tar(archive):
        return _unpack_tar(archive, target, progress, budget)
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


def extract_archive(
    archive: str | Path,
    dest: str | Path,
    progress: bool = True,
    limits: UnpackLimits | None = None,
) -> int:
    """Safely unpack ``archive`` and merge its contents into ``dest``.

    Returns:
        The number of files written.
    """
    with staging_dir(dest) as staging:
        count = unpack(archive, staging, progress=progress, limits=limits)
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


def _unpack_tar(archive: Path, target: Path, progress: bool, budget: _Budget) -> int:
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
                budget.count_file()
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
                    _write_member(source, target, rel, budget)
                count += 1
                bar.update(member.size)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ArchiveError(
            f"archive {archive} is corrupt or truncated ({err}): delete it and fetch it again"
        ) from err
    return count


def _unpack_zip(archive: Path, target: Path, progress: bool, budget: _Budget) -> int:
    count = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            _check_declared_sizes(infos, budget)
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
                        _write_member(source, target, rel, budget)
                    count += 1
                    bar.update(info.file_size)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, zlib.error) as err:
        raise ArchiveError(
            f"archive {archive} is corrupt or truncated ({err}): delete it and fetch it again"
        ) from err
    return count


def _check_declared_sizes(infos: list[zipfile.ZipInfo], budget: _Budget) -> None:
    """Refuse a zip from its central directory alone, before a byte is written."""
    limits = budget.limits
    if len(infos) > limits.max_files:
        raise budget.refuse(f"holds {len(infos)} members, over {limits.max_files}")
    declared = sum(info.file_size for info in infos)
    if declared > budget.bytes_left:
        raise budget.refuse(
            f"({budget.size} bytes) declares {declared} unpacked bytes, over its limit of "
            f"{budget.bytes_left}"
        )
    for info in infos:
        if info.file_size > limits.ratio_floor and info.file_size > limits.max_ratio * max(
            info.compress_size, 1
        ):
            raise budget.refuse(
                f"has a member {info.filename!r} of {info.file_size} bytes compressed to "
                f"{info.compress_size} (ratio over {limits.max_ratio:g})"
            )


def _write_member(source: BinaryIO, target: Path, rel: PurePosixPath, budget: _Budget) -> None:
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
            while chunk := source.read(_COPY_CHUNK):
                budget.take(len(chunk))
                out.write(chunk)
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

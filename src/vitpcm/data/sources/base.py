"""What every dataset source provides, and the registry of sources.

A source is one dataset's knowledge in one place: its official files (with published
checksums) and how they install into the layout, where the layout's root is, its splits and
their image lists, its class names and how its masks become label maps. The download and
the conversion engines (:mod:`vitpcm.data.download`, :mod:`vitpcm.data.convert`) ask the
source and know no dataset themselves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitpcm.errors import BadSampleError, ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetFile:
    """One official file of a dataset and how it is installed.

    Attributes:
        name: The official file name (also the name under a ``--mirror``).
        url: Default download URL.
        checksum: Published ``sha256:HEX`` or ``md5:HEX``, or None when no public value is
            known (then the file's SHA-256 is recorded on first download, not verified).
        size: Published size in bytes, or None.
        install: ``merge`` (unpack into ``dest``) or a name the source's
            :meth:`DatasetSource.install` handles itself.
        dest: Folder (relative to the download root) the file installs into.
        provides: Paths (relative to the download root) that must exist once installed.
    """

    name: str
    url: str
    checksum: str | None
    size: int | None
    install: str
    dest: str
    provides: tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    """One image to convert; ``mask`` is what the split's :class:`MaskDecoder` reads for it."""

    image: str
    mask: str | None = None


class MaskDecoder:
    """How one split's masks become label maps; pickled into the conversion's workers.

    The default reads ``sample.mask`` as a label PNG (palette or single-channel).
    """

    def for_shards(
        self, shards: Sequence[Sequence[Sample]], staging: Path, split: str
    ) -> list[MaskDecoder]:
        """The decoder each shard's worker gets (e.g. over its part of a large index)."""
        return [self] * len(shards)

    def name(self, sample: Sample) -> str:
        """What to call a sample's mask in messages."""
        return sample.mask or sample.image

    def decode(self, sample: Sample) -> tuple[Any, bytes | None]:
        """The ``(H, W)`` uint8 label map, and the file's bytes when they may be stored as is.

        Raises:
            BadSampleError: The mask is missing, unreadable or not a label map.
        """
        from vitpcm.data.labels import decode_label_png

        data = read_sample_file(self.name(sample))
        return decode_label_png(data, self.name(sample)), data


@dataclass
class SplitPlan:
    """The samples of one split, in list order, and how to decode their masks."""

    name: str
    samples: list[Sample]
    masks: MaskDecoder | None  # None: no masks (an unlabelled test split)


def read_sample_file(path: str) -> bytes:
    """The bytes of a file a split lists.

    Raises:
        BadSampleError: The file is missing or unreadable.
    """
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        raise BadSampleError(path, "listed in the split but missing; restore the file") from None
    except OSError as exc:
        raise BadSampleError(path, f"cannot be read ({exc})") from exc


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class DatasetSource:
    """One dataset: subclass it in a module of this package and set ``SOURCE`` there.

    Attributes:
        name: The dataset's name (``--dataset``, ``data.dataset``, ``dataset.json``'s name).
        files: Official files, fetched by ``vitpcm data download`` (empty: nothing to fetch).
        splits: Splits the conversion knows, in order.
        optional_splits: Splits whose list may be empty (skipped with a warning).
        class_names: Class names by label index, background first.
        config: The config a run on this dataset uses when none is named.
    """

    name: str = ""
    files: tuple[DatasetFile, ...] = ()
    splits: tuple[str, ...] = ()
    optional_splits: tuple[str, ...] = ("test",)
    class_names: tuple[str, ...] = ()
    config: str = ""

    @property
    def num_classes(self) -> int:
        """K, the number of classes with background."""
        return len(self.class_names)

    def install(
        self, spec: DatasetFile, path: Path, root: Path, progress: bool, limits: Any
    ) -> None:
        """Put one downloaded file's content into the layout under ``root``.

        The default handles ``merge``: unpack the archive into ``root / spec.dest``.
        """
        from vitpcm.data.archives import extract_archive

        if spec.install != "merge":  # pragma: no cover - a source's own table
            raise ValueError(f"{self.name}: unknown install kind {spec.install!r}")
        extract_archive(path, root / spec.dest, progress=progress, limits=limits)

    def find_root(self, src: Path) -> Path:
        """The layout's root inside ``src`` (a download folder or the root itself).

        Raises:
            DataError: ``src`` holds no layout of this dataset.
        """
        raise NotImplementedError

    def plan(self, root: Path, splits: Sequence[str]) -> tuple[list[SplitPlan], list[str]]:
        """The plans of the wanted splits found under ``root``, and the class names.

        Splits whose list is absent are skipped; an empty list goes through
        :meth:`empty_split`.
        """
        raise NotImplementedError

    def empty_split(self, split: str, listing: Path) -> None:
        """An empty split list: a loud warning for an optional split, an error otherwise."""
        if split in self.optional_splits:
            logger.warning("split %s skipped: %s lists no images", split, listing)
            return
        raise DataError(
            f"{listing} lists no images, so the {split} split would be empty; restore the "
            "list (download or synthesise the dataset again)"
        )


_SOURCES: dict[str, DatasetSource] = {}


def register(source: DatasetSource) -> DatasetSource:
    """Make ``source`` known by its name (replacing one of the same name); returns it."""
    if not source.name:
        raise ValueError(f"{type(source).__name__} has no name")
    _SOURCES[source.name] = source
    return source


def dataset_names() -> tuple[str, ...]:
    """Every registered dataset name, in registration order."""
    return tuple(_SOURCES)


def get_source(name: str) -> DatasetSource:
    """The source registered as ``name``.

    Raises:
        ConfigError: No such dataset.
    """
    try:
        return _SOURCES[name]
    except KeyError:
        raise ConfigError(
            f"unknown dataset {name!r}: choose one of {', '.join(dataset_names())}"
        ) from None

"""``vitpcm weights fetch``: download the public Google ViT checkpoints the configs start from.

The checkpoints are those of :data:`vitpcm.model.backbones.BACKBONES` (the configs'
``model.pretrained``). The bucket (``storage.googleapis.com/vit_models``) publishes no
checksums or sizes, so a download is verified by what can be checked: the byte count the
server announced (the resumable fetch of :mod:`vitpcm.data.http_fetch` refuses a short or
changed file), then the file must be a readable ``.npz`` holding the backbone's patch
embedding and all of its blocks. Its SHA-256 is recorded beside it (``<file>.sha256``) and
checked on every later run; an entry with a ``sha256`` is checked against that instead.
"""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from vitpcm import storage
from vitpcm.errors import ChecksumError, ConfigError, DownloadError, ModelError
from vitpcm.model.backbones import Backbone, fetchable

log = logging.getLogger(__name__)

CACHE_ENV = "VITPCM_CACHE"
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/")


def verify_npz(path: Path, entry: Backbone) -> None:
    """Check that ``path`` is a ``.npz`` holding ``entry``'s patch embedding and blocks.

    Raises:
        ModelError: unreadable, or the tensors are not those of ``entry``'s backbone.
    """
    try:
        with np.load(path, allow_pickle=False) as checkpoint:
            keys = set(checkpoint.files)
            kernel = checkpoint["embedding/kernel"].shape if "embedding/kernel" in keys else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path} is not a readable .npz ({exc}); fetch it again") from exc
    expected = (entry.patch_size, entry.patch_size, 3, entry.hidden_dim)
    blocks = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}
    if kernel != expected or blocks != set(range(entry.depth)):
        raise ModelError(
            f"{path} is not the {entry.name} checkpoint: patch embedding {kernel} "
            f"(expected {expected}), {len(blocks)} blocks (expected {entry.depth}); "
            "check --mirror"
        )


def _cache_root() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "vitpcm")
    return Path(root) / "weights"


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _check_recorded(path: Path, entry: Backbone, progress: bool) -> bool:
    """Whether ``path`` is complete and matches its known or recorded SHA-256."""
    from vitpcm.data.http_fetch import file_digest

    known = entry.sha256 or (
        _digest_file(path).read_text().strip() if _digest_file(path).exists() else None
    )
    if not path.exists() or known is None:
        return False
    actual = file_digest(path, "sha256", progress).split(":", 1)[1]
    if actual != known:
        raise ChecksumError(
            f"{path} has SHA-256 {actual}, not the recorded {known}: it changed since it was "
            "fetched; delete it (and its .sha256) and fetch again"
        )
    return True


def _download(entry: Backbone, folder: Path, url: str, progress: bool, **options: float) -> Path:
    import requests

    from vitpcm.data.http_fetch import commit_part, discard_part, fetch, file_digest

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / entry.file
    if _check_recorded(final, entry, progress):
        log.info("%s is already here (SHA-256 checked)", final)
        return final
    if final.exists():
        raise ConfigError(
            f"{final} exists but was not fetched by vitpcm (no {final.name}.sha256); it was "
            "left as it is: move it away or choose another --out"
        )
    part = folder / f"{entry.file}.part"
    with requests.Session() as session:
        fetch(session, url, part, progress=progress, **options)
    digest = file_digest(part, "sha256", progress).split(":", 1)[1]
    if entry.sha256 and digest != entry.sha256:
        discard_part(part)
        raise ChecksumError(
            f"{url} has SHA-256 {digest}, expected {entry.sha256}; the download was removed: "
            "fetch again, or check --mirror"
        )
    try:
        verify_npz(part, entry)
    except ModelError:
        discard_part(part)
        raise
    commit_part(part, final)
    _digest_file(final).write_text(digest + "\n")
    return final


def fetch_pretrained(
    name: str,
    out: str,
    *,
    mirror: str | None = None,
    progress: bool = True,
    catalogue: dict[str, Backbone] | None = None,
    retries: int = 5,
    timeout: float = 30.0,
) -> str:
    """Download a public ViT checkpoint into a folder or ``s3://`` prefix.

    A local ``out`` holds ``<file>.part`` while downloading, so running again resumes; for an
    ``s3://`` destination the partial file lives in ``$VITPCM_CACHE`` (default
    ``~/.cache/vitpcm``) and the finished file is copied up.

    Args:
        name: a backbone with a checkpoint (:func:`~vitpcm.model.backbones.fetchable`).
        out: destination folder or ``s3://`` prefix.
        mirror: fetch ``<mirror>/<file name>`` instead of the official URL.
        progress: show progress bars.
        catalogue: the entries to choose from (default: every fetchable backbone).
        retries: consecutive failed attempts allowed.
        timeout: seconds to wait for the server.

    Returns:
        The checkpoint's URI: the value for ``model.pretrained``.
    """
    catalogue = fetchable() if catalogue is None else catalogue
    if name not in catalogue:
        raise ConfigError(f"unknown checkpoint {name!r}; choose one of {sorted(catalogue)}")
    entry = catalogue[name]
    url = f"{mirror.rstrip('/')}/{entry.file}" if mirror else entry.url
    text = storage.local_path(out).rstrip("/")
    if storage.is_http(text):
        raise DownloadError(f"--out {text}: http(s) URLs are read-only; give a folder or s3://")
    options = {"retries": retries, "timeout": timeout}
    from vitpcm.outputs import claim_output, write_marker

    claim_output(text, "weights")
    if not storage.is_s3(text):
        os.makedirs(text, exist_ok=True)
        write_marker(text, "weights")
        return str(_download(entry, Path(text), url, progress, **options))
    storage.check_s3_config(text)
    write_marker(text, "weights")
    local = _download(entry, _cache_root(), url, progress, **options)
    final = storage.join(text, entry.file)
    storage.write_file(final, local)
    return final

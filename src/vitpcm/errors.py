"""User-facing errors.

Every bad input ends in exactly one of these: the message names the thing (file, key,
URL) and says what to do. The CLI prints it as ``error: <message>`` and exits with
:attr:`VitpcmError.exit_code`; anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations


class VitpcmError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""

    exit_code = 2


class ConfigError(VitpcmError):
    """A config file, key or value is wrong (unknown key, wrong type, out of range)."""


class StorageError(VitpcmError):
    """A local path or object-store URI cannot be read or written."""

    exit_code = 3


class DownloadError(VitpcmError):
    """A download failed (unreachable host, HTTP error, truncated transfer)."""

    exit_code = 4


class ChecksumError(DownloadError):
    """A downloaded file does not match its known checksum."""


class ArchiveError(VitpcmError):
    """An archive is corrupt or has a member that would escape the target folder."""


class DataError(VitpcmError):
    """A dataset is missing, empty or malformed."""


class BadSampleError(DataError):
    """One sample is unusable: corrupt image, size mismatch, label out of range, missing file."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"bad sample {path}: {reason}")


class ModelError(VitpcmError):
    """A model or weight file is missing, corrupt, or does not match the config."""


class TrackingError(VitpcmError):
    """MLflow cannot be reached or refused a request."""

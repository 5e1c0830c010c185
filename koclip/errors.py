"""Every error a user can fix, under one base: `KoclipError`.

A `KoclipError` means the input, a flag, a path or the environment is wrong, and its message
says what to do; every command line prints it as one line and exits with status 2
(`koclip.cli.run_cli`). Anything else (a ValueError from a bug, a KeyError) is a programming
error and keeps its traceback.

Pipelines and jobs derive their own errors from these (pipelines.listing.ListingError,
jobs.reindex.ReindexError, ...); the library's are all here, so a reader sees them in one place.
"""
from __future__ import annotations


class KoclipError(Exception):
    """The base: an error that is the user's to fix, with a message that says how."""


class UsageError(KoclipError):
    """A bad flag, argument or argument value."""


class NotFoundError(KoclipError, FileNotFoundError):
    """A file or folder that does not exist (also a FileNotFoundError, for callers that catch that)."""


class TooLargeError(KoclipError):
    """A file larger than the limit its reader allows (koclip.fs.read_bytes(path, limit))."""


class MissingDependency(KoclipError, ImportError):
    """An optional package, font or tool is not installed; the message says how to install it."""


class ConfigError(KoclipError):
    """A model config.json that cannot be read or describes an unsupported model."""


class CheckpointError(KoclipError):
    """A checkpoint folder whose weights do not fit its config, or that is not a checkpoint."""


class ImageDecodeError(KoclipError):
    """An input that cannot be turned into an RGB image; `reason` is a short machine-readable tag
    (not_an_image, truncated, too_many_pixels, ...), used as the dead-letter reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


class ManifestError(KoclipError):
    """A manifest with bad rows; `errors` holds one "file:line: reason" string per bad row."""

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        message = self.errors[0]
        if len(self.errors) > 1:
            rest = "; ".join(self.errors[1:4]) + ("; ..." if len(self.errors) > 4 else "")
            message += f" (and {len(self.errors) - 1} more bad line(s): {rest})"
        super().__init__(message)


class StoreError(KoclipError):
    """An embedding store (Parquet shards) that is missing, mixes models, or lacks a column."""


class IndexBuildError(KoclipError):
    """An index that cannot be built as asked: no vectors, a budget too small, an unknown kind."""


class IndexFolderError(KoclipError):
    """A path that is not a usable index: no CURRENT or meta.json, inconsistent, or another model's."""


class QueryError(KoclipError):
    """A query that cannot be answered as asked (missing index or model, bad arguments)."""


class QueryImageError(ImageDecodeError, QueryError):
    """A query image that cannot be decoded; `reason` is ImageDecodeError's tag."""

    def __init__(self, reason: str, message: str, what: str):
        super().__init__(reason, f"query image {what}: {message}")


class FingerprintMismatch(QueryError):
    """The index was built from embeddings of another model than the one embedding the queries."""


class PatchError(QueryError):
    """A bad grid, mode or text for rank_patches."""


class LockHeld(KoclipError):
    """A folder's lock (FOLDER/LOCK, koclip.lock) is held by another live process; the message names it."""


class LockLost(KoclipError):
    """The lock this process held was broken or replaced by another (it could not be renewed in time):
    the holder stops before its next irreversible step."""

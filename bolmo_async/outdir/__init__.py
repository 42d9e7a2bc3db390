"""The output folder: ``open_output(location)`` gives the ``OutputDir`` that owns it.

A local path (or ``file://``) is a POSIX folder (``LocalDir``); ``s3://``, ``gs://``,
``az://`` / ``abfs://`` and ``r2://`` locations are object storage (``StoreDir``).
"""

from __future__ import annotations

import os

from ..errors import UsageError
from .base import (
    DATA_SOURCES,
    MANIFEST,
    PLAN,
    RAW,
    RUN_STATE,
    SHARD_PREFIX,
    SHARES,
    STAGING,
    TOKENIZER,
    NewFile,
    OutputDir,
    csv_name,
    fit_name,
    marker_name,
    shard_name,
    staged_name,
)
from .local import DIRECT_ALIGN, FSYNC, LocalDir, aligned_buffer

#: Location schemes that are object storage.
STORE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "r2")


def open_output(location: str | os.PathLike[str] | OutputDir) -> OutputDir:
    """The ``OutputDir`` for ``--output-dir LOCATION``."""
    if isinstance(location, OutputDir):
        return location
    text = os.fspath(location)
    if not text.strip():
        raise UsageError("--output-dir is empty (an unset variable?): name the output folder, e.g. -o bolmo_out.")
    scheme, sep, _ = text.partition("://")
    one_slash = text.partition(":/")[0]
    if not sep and one_slash.lower() in STORE_SCHEMES and text.startswith(one_slash + ":/"):
        raise UsageError(
            f"--output-dir {text}: did you mean {one_slash}://{text[len(one_slash) + 2 :].lstrip('/')}? "
            "(a bucket location has two slashes after the scheme)"
        )
    if sep and scheme.lower() in STORE_SCHEMES:
        from .store import StoreDir

        return StoreDir(text)
    if sep and scheme.lower() == "file":
        return LocalDir(text[len("file://") :])
    if sep and scheme.isalnum():
        raise UsageError(
            f"--output-dir {text}: {scheme}:// is not a supported location; use a local folder or "
            f"one of {', '.join(s + '://' for s in STORE_SCHEMES)}."
        )
    return LocalDir(text)


__all__ = [
    "DATA_SOURCES",
    "DIRECT_ALIGN",
    "FSYNC",
    "MANIFEST",
    "PLAN",
    "RAW",
    "RUN_STATE",
    "SHARD_PREFIX",
    "SHARES",
    "STAGING",
    "STORE_SCHEMES",
    "TOKENIZER",
    "LocalDir",
    "NewFile",
    "OutputDir",
    "aligned_buffer",
    "csv_name",
    "fit_name",
    "marker_name",
    "open_output",
    "shard_name",
    "staged_name",
]

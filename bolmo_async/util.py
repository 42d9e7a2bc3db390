"""Small shared helpers: atomic writes, sizes, hashing."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from .errors import DiskSpaceError

#: fsync every file before renaming it into place. Off by default: the atomic rename already
#: survives a killed process (and ext4's rename heuristics flush data before the rename), and
#: fsync on every staged file and shard costs a large share of the run's time on common disks.
#: Set BOLMO_ASYNC_FSYNC=1 where power-loss durability matters more than speed.
FSYNC = os.environ.get("BOLMO_ASYNC_FSYNC", "") not in ("", "0")


def maybe_fsync(fd: int) -> None:
    if FSYNC:
        os.fsync(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Write to a unique temporary name beside ``path`` (fsync when FSYNC), then rename into place.

    On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            maybe_fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise_if_disk_full(exc, path)
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def raise_if_disk_full(exc: OSError, path: str | os.PathLike[str]) -> None:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        raise DiskSpaceError(
            f"The disk holding {path} is full. Free space (or choose another --output-dir) and rerun "
            "the same command: finished files are kept and the run resumes."
        ) from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def prefer_system_allocator() -> None:
    """Arrow allocations from the system allocator unless ARROW_DEFAULT_MEMORY_POOL says otherwise.

    pyarrow's default (mimalloc) keeps pages it freed, so the peak RSS of a run grew with how
    much data went through it; measured here the system allocator is as fast and the peak stays
    bounded by what is in flight (-30% in byte mode). Called by the CLI and the tokenizer
    workers, not on import: a library user's process keeps its own choice.
    """
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())


_last_trim = [0.0]


def release_free_memory(interval: float = 0.5) -> None:
    """glibc only (a no-op elsewhere): hand the heap's free pages back to the system
    (``malloc_trim``), at most once per ``interval`` seconds.

    glibc raises its mmap threshold to the size of every large block freed, so after a while
    MB-sized batches come from the heap, whose freed holes it keeps: without this the peak RSS
    grew with the run's length (+40% for 10x the data in subword mode). Pinning the threshold
    instead doubled the system time (every batch freshly mapped and faulted in)."""
    now = time.monotonic()
    if now - _last_trim[0] < interval or not sys.platform.startswith("linux"):
        return
    _last_trim[0] = now
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)

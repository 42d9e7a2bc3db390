"""Small shared helpers: atomic writes, sizes, hashing."""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import DiskSpaceError, StateError

#: fsync every file before renaming it into place. Off by default: the atomic rename survives a
#: killed process (a reader sees the old file or the whole new one), and fsync on every staged
#: file and shard costs a large share of the run's time on common disks. Without it a power
#: loss or kernel crash can leave a renamed file empty or short; staged files are then caught
#: by their marker's checksum and fetched again. Set BOLMO_ASYNC_FSYNC=1 where power-loss
#: durability of the shards matters more than speed.
FSYNC = os.environ.get("BOLMO_ASYNC_FSYNC", "") not in ("", "0")


@functools.cache
def ordinary_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file under this process's umask
    (``mkstemp`` makes 0600 files: a training job under another user could not read them)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def maybe_fsync(fd: int) -> None:
    if FSYNC:
        os.fsync(fd)


#: Shards are written with O_DIRECT where the filesystem takes it (BOLMO_ASYNC_DIRECT_IO=0 turns
#: it off). A run writes 4 bytes of shard per byte of text and nothing reads them back before the
#: trainer: through the page cache every one of those pages is allocated, copied into and later
#: evicted (in the kernel, on the writing core: half the CPU of byte mode, measured), and it
#: pushes the staged files the shards are made from out of the cache.
DIRECT_IO = os.environ.get("BOLMO_ASYNC_DIRECT_IO", "1") not in ("", "0")
#: O_DIRECT wants memory, file offsets and sizes aligned to the device's block; 4096 covers them.
DIRECT_ALIGN = 4096
#: How filesystems refuse O_DIRECT (at open or at a write): then ordinary writes.
_NO_DIRECT = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def aligned_buffer(nbytes: int) -> memoryview:
    """``nbytes`` of zeroed, page-aligned memory (anonymous mmap), writable."""
    import mmap

    return memoryview(mmap.mmap(-1, nbytes))


class OutputFile:
    """A new file written front to back, with O_DIRECT when possible, else ordinarily.

    ``write`` takes page-aligned memory (``aligned_buffer``); every write but the last should be
    a multiple of ``DIRECT_ALIGN`` bytes. A filesystem that refuses O_DIRECT at open (tmpfs,
    some FUSE mounts) or at a write gets ordinary writes from then on: same bytes either way.
    """

    def __init__(self, path: str | os.PathLike[str]):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0) if DIRECT_IO else 0
        self.direct = False
        if direct:
            try:
                self.fd = os.open(path, flags | direct, ordinary_mode())
                self.direct = True
                return
            except OSError as exc:
                if exc.errno not in _NO_DIRECT:
                    raise
        self.fd = os.open(path, flags, ordinary_mode())

    def _ordinary(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        if self.direct and len(data) % DIRECT_ALIGN:
            self._ordinary()  # the unaligned tail of the file
        while data:
            try:
                n = os.write(self.fd, data)
            except OSError as exc:
                if self.direct and exc.errno in _NO_DIRECT:
                    self._ordinary()
                    continue
                raise
            data = data[n:]

    def close(self, fsync: bool) -> None:
        if self.fd < 0:
            return
        try:
            if fsync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """Write to a unique temporary name beside ``path`` (fsync when FSYNC), then rename into place.

    On any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, ordinary_mode())
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


#: The checksum of what this tool writes (staged files, shards): xxHash's XXH3-128, 25 GB/s a
#: core here against 1.6 for sha256, which cost a fifth of byte mode's CPU on shards that are
#: 4 bytes per byte of text. It guards against damage (a bit flip, a short or swapped file),
#: not against forgery. ``xxh128sum`` (xxHash's command line) prints the same digest.
CHECKSUM = "xxh3_128"


def new_checksum() -> Any:
    import xxhash

    return xxhash.xxh3_128()


def checksum_file(path: str | os.PathLike[str]) -> str:
    h = new_checksum()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return str(h.hexdigest())


@contextlib.contextmanager
def naming_a_full_disk(path: str | os.PathLike[str]) -> Iterator[None]:
    """Writes inside: a full disk becomes ``DiskSpaceError`` naming ``path``; other errors pass."""
    try:
        yield
    except OSError as exc:
        raise_if_disk_full(exc, path)
        raise


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


def record_absent_imports() -> None:
    """pyarrow tries ``import dateutil`` on every conversion of Python objects (``pa.array(list)``,
    a few per batch of documents and per csv.gz piece); where it is not installed every try walks
    sys.path again (0.1 ms, a third of the csv.gz index's CPU). Recorded as absent once, the retry
    fails at once (a None entry in sys.modules). Called by the CLI and the workers, not on import."""
    import importlib.util

    for name in ("dateutil",):
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = None  # type: ignore[assignment]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None (another libc, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


_last_trim = 0.0


def release_free_memory(interval: float = 5.0) -> None:
    """glibc only (a no-op elsewhere): hand the heap's free pages back to the system
    (``malloc_trim``), at most once per ``interval`` seconds.

    glibc raises its mmap threshold to the size of every large block freed, so after a while
    MB-sized batches come from the heap, whose freed holes it keeps: without this the peak RSS
    grew with the run's length (+40% for 10x the data in subword mode). Pinning the threshold
    instead doubled the system time (every batch freshly mapped and faulted in). Every 0.5 s
    cost 6% of a subword run's CPU in faults (pages handed back, then wanted again); every 5 s
    keeps the peak as flat."""
    global _last_trim
    trim = _malloc_trim()
    now = time.monotonic()
    if trim is None or now - _last_trim < interval:
        return
    _last_trim = now
    trim(0)


#: In an output folder: held (flock) by the run using it; never removed, harmless when left.
LOCK_NAME = ".bolmo-async.lock"
_held: set[str] = set()  # lock paths this process holds (prepare runs plan, fetch, finalize inside)
_held_guard = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: Path, *, shared: bool = False) -> Iterator[None]:
    """One run per output folder: ``plan``, ``fetch``, ``finalize`` and ``prepare`` hold an
    exclusive lock; ``fetch --worker I/N`` shares of one plan hold shared locks, so they run
    together but never beside another command. A second run fails at once with a clear error
    instead of two runs staging and writing the same files. Released when the run ends, however
    it ends (the kernel drops a dead process's locks). Where the filesystem has no ``flock``
    (some network filesystems), runs are not locked."""
    path = str(folder / LOCK_NAME)
    with _held_guard:
        nested = path in _held
    if nested:  # the outer call of this process holds the lock (and releases it)
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            who = f"process {holder}" if holder.isdigit() else "`fetch --worker` shares"
            raise StateError(
                f"another bolmo-async run ({who}) is using {folder}. Wait for it to finish or stop it, "
                "or use another --output-dir (only --worker shares of one plan may run together)."
            ) from None
        except OSError:
            pass  # no flock here: unlocked, as before
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _held_guard:
            _held.add(path)
        try:
            yield
        finally:
            with _held_guard:
                _held.discard(path)
            if not shared:
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # drops the lock

"""Small shared helpers: checksums, sizes, memory (the output folder's writes live in ``outdir``)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

#: The checksum of what this tool writes (staged files, shards): xxHash's XXH3-128, 25 GB/s a
#: core here against 1.6 for sha256, which cost a fifth of byte mode's CPU on shards that are
#: 4 bytes per byte of text. It guards against damage (a bit flip, a short or swapped file),
#: not against forgery. ``xxh128sum`` (xxHash's command line) prints the same digest.
CHECKSUM = "xxh3_128"


#: Held while file descriptor 2 goes to a temporary file (``tokenize._stderr_held``: a tokenizer
#: library's panic message, which the run says in one line of its own). The probe that holds it
#: runs on a thread while the repo is listed, so what the command says meanwhile (an error of the
#: listing, a stop) waits for it (``stderr_free``): written into the hold, it was lost when the
#: command exited before the probe ended (exit 1 without a word).
STDERR_HOLD = threading.RLock()


@contextlib.contextmanager
def stderr_free(timeout: float = 30.0) -> Iterator[None]:
    """A block that writes to the user's stderr, once no thread holds file descriptor 2 (the probe
    of a tokenizer: under a second for dolma2; one stuck longer than ``timeout`` is not waited for)."""
    got = STDERR_HOLD.acquire(timeout=timeout)
    try:
        yield
    finally:
        if got:
            STDERR_HOLD.release()


def new_checksum() -> Any:
    import xxhash

    return xxhash.xxh3_128()


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
    workers, not on import: a library user's process keeps its own choice. Before pyarrow is
    imported this only sets ``ARROW_DEFAULT_MEMORY_POOL=system``, which Arrow reads when it makes
    its default pool (importing pyarrow here cost the CLI 0.2 s before anything else could start);
    worker processes inherit it.
    """
    if "ARROW_DEFAULT_MEMORY_POOL" in os.environ:
        return
    if "pyarrow" not in sys.modules:
        os.environ["ARROW_DEFAULT_MEMORY_POOL"] = "system"
        return
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
def _glibc(name: str) -> Callable[..., int] | None:
    """glibc's function ``name`` (``malloc_trim``, ``mallopt``), or None (another libc, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks under this come from the heap, whose freed pages are taken again without a fault.
KEEP_BLOCKS_UNDER = 32 << 20
#: The heap's free top is given back only past this (besides ``release_free_memory``'s trims).
KEEP_FREE_TOP = 256 << 20


def keep_freed_pages() -> None:
    """glibc only: a worker process's freed blocks stay its own until ``release_free_memory``
    trims them, instead of going back to the kernel at once.

    By default glibc maps a block over 128 KB on its own and unmaps it when freed (until its
    threshold has risen to that size), and gives the heap's free top back once over 128 KB: the
    next batch then takes fresh pages, each a fault, which this VM's host makes dearer (every
    fresh page is faulted in from it). A byte-mode run of 128 MB with both set high: a third of
    the page faults gone (97k -> 68k), the system CPU -0.17 s. The thresholds are pinned high
    (32 MB), not low (pinned low, every batch was freshly mapped: twice the system time), and
    the periodic trim still bounds the peak. Called by byte-mode worker processes, not on import:
    in subword mode the CPU was the same and the whole tree's peak RSS grew 830 -> 944 MB
    (``make bench``, fraction 1.0)."""
    mallopt = _glibc("mallopt")
    if mallopt is None:
        return
    mallopt(_M_MMAP_THRESHOLD, KEEP_BLOCKS_UNDER)
    mallopt(_M_TRIM_THRESHOLD, KEEP_FREE_TOP)


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
    trim = _glibc("malloc_trim")
    now = time.monotonic()
    if trim is None or now - _last_trim < interval:
        return
    _last_trim = now
    trim(0)


class DecodingSlot(Protocol):
    """What a file's download waits on before its bytes go to its decoder (``asyncio.Semaphore``
    fits)."""

    async def acquire(self) -> Any: ...

    def release(self) -> None: ...


class PlanOrderSlots:
    """At most ``n`` files of a worker decoding at once, each free slot going to the file earliest
    in plan order among those handed to the worker (``turn(unit)``, until ``retire``). If that one
    has not asked yet (a small file still being fetched whole, or its task just starting), the slot
    waits for it up to ``HOLD`` seconds, then goes to the earliest file asking: a slow download at
    the head never idles the worker longer than that.

    Shards are made of the files in plan order: a shard can be written once its files are
    staged, so files staged in that order let shards go to disk while later files decode. In the
    order their downloads happened to ask, a worker's first shard waited for most of the run's
    files, and the shards were written at the end, the disk alone busy (the run took the CPU time
    plus the disk time, not the larger of the two)."""

    #: Seconds a free slot waits for an earlier file that has not asked yet.
    HOLD = 0.1

    def __init__(self, n: int):
        self._free = n
        self._due: set[int] = set()  # units handed to this worker, not decoding now nor done
        self._asking: dict[int, Any] = {}  # unit -> the future its ``acquire`` waits on
        self._timer: Any = None  # the HOLD of a slot kept for an earlier file

    def turn(self, unit: int) -> _Turn:
        self._due.add(unit)
        return _Turn(self, unit)

    async def _acquire(self, unit: int) -> None:
        import asyncio

        fut = asyncio.get_running_loop().create_future()
        self._due.add(unit)  # again, on a retry
        self._asking[unit] = fut
        self._grant()
        try:
            await fut
        except asyncio.CancelledError:
            self._asking.pop(unit, None)
            if fut.done() and not fut.cancelled():
                self._release()  # handed the slot as it was cancelled: the next one takes it
            raise

    def _grant(self, held_long_enough: bool = False) -> None:
        while self._free > 0 and self._asking:
            first = min(self._due | self._asking.keys())  # a worker holds a few files: no heap
            if first not in self._asking:
                if not held_long_enough:
                    if self._timer is None:
                        import asyncio

                        self._timer = asyncio.get_running_loop().call_later(self.HOLD, self._held)
                    return  # the earliest file has not asked yet: the slot waits for it
                first = min(self._asking)
            fut = self._asking.pop(first)
            self._due.discard(first)
            if not fut.done():  # not cancelled while it waited
                self._free -= 1
                fut.set_result(None)
        if self._timer is not None and (self._free == 0 or not self._asking):
            self._timer.cancel()
            self._timer = None

    def _held(self) -> None:
        self._timer = None
        self._grant(held_long_enough=True)

    def _release(self) -> None:
        self._free += 1
        self._grant()

    def _retire(self, unit: int) -> None:
        """``unit``'s task ended (staged, failed or cancelled): the slot no longer waits for it."""
        self._due.discard(unit)
        self._grant()


class _Turn:
    """One file's place in ``PlanOrderSlots``: a ``DecodingSlot`` for its download, and
    ``retire`` once its task ends, whatever happened."""

    __slots__ = ("_slots", "_unit")

    def __init__(self, slots: PlanOrderSlots, unit: int):
        self._slots, self._unit = slots, unit

    async def acquire(self) -> bool:
        await self._slots._acquire(self._unit)
        return True

    def release(self) -> None:
        self._slots._release()

    def retire(self) -> None:
        self._slots._retire(self._unit)

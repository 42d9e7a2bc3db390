"""What the coordinator and its workers say to each other: small named records (picklable).

    coordinator -> worker:  FileTask (with LayoutAt) | ShardTask | ShardStream | Stop
    worker -> coordinator:  Ready | Progress | Staged | Failed | ShardWritten | ShardFailed
                            | Fatal | Log | Exit

No text or ids ever cross: a file is done start to finish by the worker, which reports its
completion record only. An error crosses as its class name and message (``Fatal``) and is
rebuilt as the same class by ``errors.rebuild``.

A worker process answers on a pipe of its own (``Outbox``; the coordinator reads them all as one,
``Replies``): one queue shared by every worker had one write lock between them, and a worker
killed while it held it (kill -9, the kernel's OOM killer) left every other worker's next message,
and the run with it, waiting forever.
"""

from __future__ import annotations

import queue
import selectors
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast


@dataclass(frozen=True, slots=True)
class LayoutAt:
    """Where a file's documents start in the shard layout, known when every file before it is
    laid out: its worker then writes the shards they fill while it stages the file."""

    bound: int  # --max-tokens-per-file
    shard: int  # the shard being filled
    used: int  # its tokens so far
    pieces: list[Any]  # its pieces so far (finalizer.Piece, of earlier files)
    last: bool  # the plan's last file: the shard open at its end is complete


@dataclass(frozen=True, slots=True)
class FileTask:
    unit: int  # index into the plan's files
    cdn: str | None = None  # the signed URL its resolve answered with, when resolved ahead
    layout: LayoutAt | None = None  # where its documents go in the shards, when known now


@dataclass(frozen=True, slots=True)
class ShardTask:
    index: int
    pieces: list[Any]  # finalizer.Piece


@dataclass(frozen=True, slots=True)
class ShardStream:
    """Append ``pieces`` to shard ``index`` (the shard still being filled: its pieces so far,
    in order, opening it on the first); ``end``: it is complete, put it in place and answer
    ``ShardWritten``; ``drop``: it will not complete in this run, remove its temporaries. A
    message out of sequence (``at``) fails the stream: a shard never misses a piece."""

    index: int
    at: int  # the place of ``pieces[0]`` among the shard's pieces (0: it opens the shard)
    pieces: list[Any]  # finalizer.Piece
    end: bool = False
    drop: bool = False


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class Ready:
    wid: int
    engine: str


@dataclass(frozen=True, slots=True)
class Progress:
    wid: int
    nbytes: int
    documents: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Staged:
    wid: int
    unit: int
    record: dict[str, Any]
    read: int | None  # bytes read for it now; None when it was staged already
    lengths: list[Any]  # numpy arrays: tokens per document of each staged batch
    # Shards its worker wrote while staging it (``FileTask.layout``): index -> (pieces, record).
    shards: dict[int, tuple[list[Any], dict[str, Any]]] = field(default_factory=dict)
    local: bool = False  # read from its download kept in raw/ (--no-streaming): no transfer


@dataclass(frozen=True, slots=True)
class Failed:
    wid: int
    unit: int
    reason: str
    #: Not the transfer's fault (its documents, its size against the listing's): a rerun fails it again.
    permanent: bool = False
    outage: tuple[str, str] | None = None  # (host, cause): what a server that is down answers (``OutageWatch``)


@dataclass(frozen=True, slots=True)
class ShardWritten:
    wid: int
    index: int
    record: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ShardFailed:
    wid: int
    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class Fatal:
    wid: int
    error: str  # the class name, in errors.py
    message: str


@dataclass(frozen=True, slots=True)
class Log:
    wid: int
    level: int
    message: str


@dataclass(frozen=True, slots=True)
class Exit:
    wid: int
    signum: int = 0  # the stop signal the worker process was sent (0: none; it ended by itself)


ToWorker = FileTask | ShardTask | ShardStream | Stop
FromWorker = Ready | Progress | Staged | Failed | ShardWritten | ShardFailed | Fatal | Log | Exit


class Outbox:
    """The write end of one pipe, between the coordinator and one worker process (its answers;
    the coordinator's tasks for it). ``put`` never blocks (no event loop waits on a full pipe): a
    thread of its own pickles and sends, in order. Only one process writes to a pipe, so a worker's
    death, even mid-message, costs no other worker anything: the coordinator reads a message cut
    short as the pipe's end (``Replies``)."""

    def __init__(self, conn: Connection):
        self._conn = conn
        self._items: deque[Any] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._closed = False
        self._thread = threading.Thread(target=self._feed, name="bolmo-outbox", daemon=True)
        self._thread.start()

    def put(self, msg: Any) -> None:
        with self._ready:
            self._items.append(msg)
            self._ready.notify()

    def _feed(self) -> None:
        try:
            while True:
                with self._ready:
                    while not self._items and not self._closed:
                        self._ready.wait()
                    if not self._items:
                        return
                    batch = list(self._items)
                    self._items.clear()
                for msg in batch:
                    try:
                        self._conn.send(msg)
                    except OSError:  # the reader is gone (its process ended): nothing more is read
                        return
                    except Exception:  # a message that does not pickle: said, the others still go
                        traceback.print_exc(file=sys.stderr)
        finally:
            self._conn.close()

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued, then close the pipe; waits at most ``timeout`` s (None: until then)
        for a full pipe to take it."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout)


class Replies:
    """The coordinator's ends of its worker processes' pipes, read as one queue (``get``). A pipe
    whose worker ended reads as its end, a message it was cut in the middle of included: that
    pipe is closed and no longer read (the coordinator learns of the death from the process)."""

    def __init__(self, conns: list[Connection]):
        self._open = len(conns)
        self._got: deque[Any] = deque()
        self._selector = selectors.DefaultSelector()  # (once: not a selector made per message)
        for conn in conns:
            self._selector.register(conn, selectors.EVENT_READ)

    def get(self, timeout: float | None = None) -> Any:
        """The next message of any worker; ``queue.Empty`` after ``timeout`` s without one."""
        if not self._got and not self._open:  # every worker ended: nothing comes
            time.sleep(timeout or 0.0)
        elif not self._got:
            for key, _ in self._selector.select(timeout):
                conn = cast(Connection, key.fileobj)
                try:
                    self._got.append(conn.recv())
                except (EOFError, OSError):
                    self._selector.unregister(conn)
                    self._open -= 1
                    conn.close()
        if not self._got:
            raise queue.Empty
        return self._got.popleft()

    def get_nowait(self) -> Any:
        return self.get(0.0)

    def close(self) -> None:
        for key in list(self._selector.get_map().values()):
            cast(Connection, key.fileobj).close()
        self._selector.close()
        self._open = 0

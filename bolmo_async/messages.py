"""What the coordinator and its workers say to each other: small named records (picklable).

    coordinator -> worker:  FileTask (with LayoutAt) | ShardTask | ShardStream | Stop
    worker -> coordinator:  Ready | Progress | Staged | Failed | ShardWritten | ShardFailed
                            | Fatal | Log | Exit

No text or ids ever cross: a file is done start to finish by the worker, which reports its
completion record only. An error crosses as its class name and message (``Fatal``) and is
rebuilt as the same class by ``errors.rebuild``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


@dataclass(frozen=True, slots=True)
class Failed:
    wid: int
    unit: int
    reason: str
    permanent: bool = False  # the file itself cannot be read as documents: a rerun fails it again


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

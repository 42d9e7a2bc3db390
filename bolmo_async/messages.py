"""What the coordinator and its workers say to each other: small named records (picklable).

    coordinator -> worker:  FileTask | ShardTask | Stop
    worker -> coordinator:  Ready | Progress | Staged | Failed | ShardWritten | ShardFailed
                            | Fatal | Log | Exit

No text or ids ever cross: a file is done start to finish by the worker, which reports its
completion record only. An error crosses as its class name and message (``Fatal``) and is
rebuilt as the same class by ``errors.rebuild``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FileTask:
    unit: int  # index into the plan's files
    cdn: str | None = None  # the signed URL its resolve answered with, when resolved ahead


@dataclass(frozen=True, slots=True)
class ShardTask:
    index: int
    pieces: list[Any]  # finalizer.Piece


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


ToWorker = FileTask | ShardTask | Stop
FromWorker = Ready | Progress | Staged | Failed | ShardWritten | ShardFailed | Fatal | Log | Exit

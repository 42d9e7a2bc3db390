"""Live progress: a rich display on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

from .util import human_bytes, human_count

log = logging.getLogger("bolmo_async")


class Progress:
    """Counters updated from the event loop and worker threads; rendered every ``interval``."""

    def __init__(
        self, total_files: int, total_bytes: int, *, enabled: bool = True, interval: float = 10.0, kind: str = "tokens"
    ):
        self.total_files, self.total_bytes = total_files, total_bytes
        self.files = self.bytes = self.documents = self.tokens = self.skipped = 0
        self.enabled = enabled
        self.interval = interval
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._last_log = self._t0
        self._rich: Any = None
        self._task: Any = None
        self._restreamed: list[logging.StreamHandler[Any]] = []
        self._original_stderr: Any = None
        self.kind = kind

    def __enter__(self) -> Progress:
        if self.enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._rich = RichProgress(
                TextColumn("[bold]fetch"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                transient=False,
            )
            original = sys.stderr
            self._rich.start()  # from here sys.stderr is rich's proxy, which prints above the bar
            self._task = self._rich.add_task("fetch", total=self.total_bytes, stats="")
            # Log lines go through the display too: a handler still holding the real stderr would
            # write into the bar's line and leave a stale bar behind.
            self._restreamed = [
                h
                for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is original
            ]
            for h in self._restreamed:
                h.setStream(sys.stderr)
            self._original_stderr = original
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._refresh()
            self._rich.stop()
            self._rich = None
            for h in self._restreamed:
                h.setStream(self._original_stderr)
        elif self.enabled:
            self._log_line()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes += n
        self._tick()

    def add_total(self, n: int) -> None:
        with self._lock:
            self.total_bytes += n
        if self._rich is not None:
            self._rich.update(self._task, total=self.shown_total())

    def add_documents(self, documents: int, tokens: int) -> None:
        with self._lock:
            self.documents += documents
            self.tokens += tokens
        self._tick()

    def file_done(self, skipped: int = 0) -> None:
        with self._lock:
            self.files += 1
            self.skipped += skipped
        self._tick()

    def stats(self) -> str:
        el = max(1e-9, time.monotonic() - self._t0)
        return (
            f"files {self.files}/{self.total_files}  docs {human_count(self.documents)}  "
            f"{self.kind} {human_count(self.tokens)} ({human_count(self.tokens / el)}/s)  skipped {self.skipped}"
        )

    def shown_total(self) -> int:
        """The total as shown: never under what was read. A prefix read on past its limit until a
        document ends, or a parquet prefix's whole row groups, read more than the plan foresaw;
        the total follows when the file is staged (``add_total``), not while it is read."""
        return max(self.total_bytes, self.bytes)

    def _refresh(self) -> None:
        if self._rich is not None:
            self._rich.update(self._task, completed=self.bytes, total=self.shown_total(), stats=self.stats())

    def _tick(self) -> None:
        if self._rich is not None:
            self._refresh()
            return
        now = time.monotonic()
        if self.enabled and now - self._last_log >= self.interval:
            self._last_log = now
            self._log_line()

    def _log_line(self) -> None:
        el = max(1e-9, time.monotonic() - self._t0)
        rate = self.bytes / el
        left = self.shown_total() - self.bytes
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        log.info(
            "progress: %s / %s (%s/s, ETA %s)  %s",
            human_bytes(self.bytes),
            human_bytes(self.shown_total()),
            human_bytes(rate),
            eta,
            self.stats(),
        )

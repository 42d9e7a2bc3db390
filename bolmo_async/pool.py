"""The coordinator: hands planned files (and shard writes) to workers, gathers small results.

It knows nothing about bytes or tokens. Workers are spawned first, so that they import while
the coordinator lists the repo and loads the tokenizer; each then receives the ``WorkerSpec``
and builds its own tokenizer. Files go out in plan order, the shards' order: a shard is complete,
and written, while later files are still fetching (not all at the end, when only the disk is
busy). At most ``spec.slots`` tasks per worker at a time; a shard whose files are staged goes
first to a worker not already writing one (one shard per worker at a time). A worker that dies
fails only the files it held; a fatal error (auth, disk full, tokenizer) stops every worker.

``processes=1`` runs the one worker on a thread of this process: no spawn (fast start, works
from any script, and it is what a Ray task or a ``--worker`` share on a small machine runs).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import BolmoError, WorkerError, rebuild
from .progress import Progress
from .worker import Worker, WorkerSpec, process_main

log = logging.getLogger("bolmo_async")

#: Seconds workers get to stop (abort their files, remove temporaries) before they are killed.
STOP_GRACE = 3.0


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_not_bootstrapping() -> None:
    """Refuse to start workers from a spawned child that is re-running the user's script (a script
    that calls the API at top level, without ``if __name__ == "__main__":``)."""
    if (
        multiprocessing.parent_process() is not None
        and getattr(sys.modules.get("__main__"), "__name__", "") == "__mp_main__"
    ):
        raise WorkerError(
            "bolmo_async was called while a worker process was starting: the calling script runs it at import time. "
            'Put the call under `if __name__ == "__main__":`, or pass processes=1 (no worker processes).'
        )


@dataclass
class RunResult:
    """What the workers reported back."""

    staged: dict[int, dict[str, Any]] = field(default_factory=dict)  # unit -> completion record
    fetched_now: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason
    shards: dict[int, dict[str, Any]] = field(default_factory=dict)  # shard index -> record
    engines: set[str] = field(default_factory=set)


class _Member:
    """One worker as the coordinator sees it."""

    def __init__(self, wid: int):
        self.wid = wid
        self.inbox: Any = None
        self.process: Any = None
        self.thread: threading.Thread | None = None
        self.worker: Worker | None = None
        self.tasks: set[tuple[str, int]] = set()
        self.exited = False
        self.ready = False

    def alive(self) -> bool:
        if self.exited:
            return False
        if self.process is not None:
            return bool(self.process.is_alive())
        return self.thread is not None and self.thread.is_alive()


class Pool:
    """``processes`` workers (spawned now; ``start`` gives them the spec)."""

    def __init__(self, processes: int):
        check_not_bootstrapping()
        self.processes = max(1, processes)
        self.members = [_Member(i) for i in range(self.processes)]
        self._spec: WorkerSpec | None = None
        if self.processes == 1:
            self.outbox: Any = queue.Queue()
            self.members[0].inbox = queue.Queue()
            return
        ctx = multiprocessing.get_context("spawn")
        self.outbox = ctx.Queue()
        for m in self.members:
            m.inbox = ctx.Queue()
            m.process = ctx.Process(
                target=process_main,
                args=(m.wid, m.inbox, self.outbox, os.getpid()),
                name=f"bolmo-worker-{m.wid}",
                daemon=True,
            )
            m.process.start()

    def start(self, spec: WorkerSpec) -> None:
        self._spec = spec
        for m in self.members:
            if m.process is None:
                m.worker = Worker(m.wid, spec, m.inbox.get, self.outbox.put)
                m.thread = threading.Thread(target=m.worker.run, name="bolmo-worker", daemon=True)
                m.thread.start()
            else:
                m.inbox.put(spec)

    # -- the run ---------------------------------------------------------------------------
    def run(
        self,
        units: list[int],
        *,
        progress: Progress | None = None,
        on_staged: Callable[[int, dict[str, Any]], list[tuple[int, Any]]] | None = None,
        on_files_done: Callable[[], list[tuple[int, Any]]] | None = None,
    ) -> RunResult:
        """Stage ``units`` (indices into ``spec.files``). ``on_staged(unit, rec)`` and, once every
        file is done, ``on_files_done()`` return shard tasks ``(k, pieces)`` to hand out."""
        assert self._spec is not None, "start() first"
        files = self._spec.files
        result = RunResult()
        todo = deque(sorted(units))
        shard_tasks: deque[tuple[int, Any]] = deque()
        slots = self._spec.slots
        files_left = len(todo)
        ended = False
        try:
            while True:
                live = [m for m in self.members if m.alive()]
                if not live:
                    for m in self.members:
                        self._lost(m, result, progress)
                    if todo:
                        for u in todo:
                            result.failed[files[u].path] = "no worker process was left to fetch it"
                        todo.clear()
                    break
                for m in live:
                    while len(m.tasks) < slots:
                        # One shard at a time per worker: writing one is CPU-bound (its disk I/O
                        # already overlaps on its own threads), and each holds its write blocks.
                        if shard_tasks and not any(kind == "shard" for kind, _ in m.tasks):
                            k, pieces = shard_tasks.popleft()
                            m.tasks.add(("shard", k))
                            m.inbox.put(("shard", k, pieces))
                        elif todo:
                            u = todo.popleft()
                            m.tasks.add(("file", u))
                            m.inbox.put(("file", u))
                        else:
                            break
                if files_left == 0 and not ended:
                    ended = True
                    if on_files_done is not None:
                        shard_tasks.extend(on_files_done())
                        continue
                if ended and not shard_tasks and not any(m.tasks for m in self.members):
                    break
                try:
                    msg = self.outbox.get(timeout=0.5)
                except queue.Empty:
                    for m in self.members:
                        if m.tasks and not m.alive():
                            files_left -= self._lost(m, result, progress)
                    continue
                files_left -= self._handle(msg, result, progress, on_staged, shard_tasks)
        except BaseException:
            self.stop()
            raise
        return result

    def _handle(
        self,
        msg: tuple[Any, ...],
        result: RunResult,
        progress: Progress | None,
        on_staged: Callable[[int, dict[str, Any]], list[tuple[int, Any]]] | None,
        shard_tasks: deque[tuple[int, Any]],
    ) -> int:
        """Handle one message; returns the number of files it finished (staged or failed)."""
        assert self._spec is not None
        kind, wid = msg[0], msg[1]
        member = self.members[wid]
        if kind == "progress":
            if progress is not None:
                progress.add_bytes(msg[2])
                progress.add_documents(msg[3], msg[4])
        elif kind == "log":
            log.log(msg[2], "%s", msg[3])
        elif kind == "ready":
            log.debug("worker %d ready (engine %s)", wid, msg[2])
            member.ready = True
            result.engines.add(msg[2])
        elif kind == "staged":
            unit, rec, read = msg[2], msg[3], msg[4]
            log.debug("worker %d staged %s", wid, self._spec.files[unit].path)
            member.tasks.discard(("file", unit))
            result.staged[unit] = rec
            result.fetched_now += read is not None
            if progress is not None:
                expected = self._spec.files[unit].read_bytes
                if read is None:
                    progress.add_bytes(expected)
                else:  # parquet prefixes read whole row groups and the footer: the total follows
                    progress.add_total(read - expected)
                progress.file_done(sum(rec.get("skipped", {}).get("counts", {}).values()))
            if on_staged is not None:
                shard_tasks.extend(on_staged(unit, rec))
            return 1
        elif kind == "failed":
            unit, why = msg[2], msg[3]
            member.tasks.discard(("file", unit))
            result.failed[self._spec.files[unit].path] = why
            if progress is not None:
                progress.file_done()
            return 1
        elif kind == "shard":
            log.debug("worker %d wrote shard %d", wid, msg[2])
            member.tasks.discard(("shard", msg[2]))
            result.shards[msg[2]] = msg[3]
        elif kind == "shard_failed":
            member.tasks.discard(("shard", msg[2]))
            log.debug("shard %d was not written while fetching (%s); finalize writes it", msg[2], msg[3])
        elif kind == "fatal":
            raise rebuild(msg[2], msg[3])
        elif kind == "exit":
            member.exited = True
            return self._lost(member, result, progress)
        return 0

    def _lost(self, member: _Member, result: RunResult, progress: Progress | None) -> int:
        """A worker ended with tasks in hand: its files fail (a rerun resumes them)."""
        assert self._spec is not None
        n = 0
        code = member.process.exitcode if member.process is not None else None
        how = f"exit code {code}" if code is not None and code >= 0 else f"signal {-code}" if code else "it stopped"
        if not member.ready and member.process is not None and not member.exited:
            raise WorkerError(
                f"worker process {member.wid} ended before it started ({how}). If you call bolmo_async from a "
                'script, put the call under `if __name__ == "__main__":` (worker processes import the script), or '
                "pass processes=1; otherwise rerun with BOLMO_ASYNC_DEBUG=1 and report its output."
            )
        for kind, i in sorted(member.tasks):
            if kind == "file":
                result.failed[self._spec.files[i].path] = f"its worker process died ({how}); rerun to fetch it again"
                n += 1
                if progress is not None:
                    progress.file_done()
        member.tasks.clear()
        member.exited = True
        return n

    # -- stopping --------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every worker now: in-flight files are aborted and their temporaries removed."""
        for m in self.members:
            if m.worker is not None:
                m.worker.cancel()
                m.inbox.put(("stop",))  # ends its inbox reader
            elif m.process is not None and m.process.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(m.process.pid, signal.SIGTERM)
        self._join(STOP_GRACE)

    def close(self) -> None:
        """Let idle workers finish and exit (after ``run``), or stop them."""
        for m in self.members:
            with contextlib.suppress(Exception):
                m.inbox.put(("stop",) if self._spec is not None else None)
        self._join(STOP_GRACE)

    def _join(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        for m in self.members:
            if m.thread is not None:
                m.thread.join(max(0.1, deadline - time.monotonic()))
            elif m.process is not None:
                m.process.join(max(0.1, deadline - time.monotonic()))
                if m.process.is_alive():
                    m.process.kill()
                    m.process.join(1.0)
        with contextlib.suppress(Exception):
            while True:  # drain, so that no feeder thread waits on a full pipe
                self.outbox.get_nowait()
        if self.processes > 1:
            self.outbox.cancel_join_thread()
            for m in self.members:
                m.inbox.cancel_join_thread()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.stop()


__all__ = ["BolmoError", "Pool", "RunResult", "WorkerSpec", "check_not_bootstrapping", "usable_cores"]

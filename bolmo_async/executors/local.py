"""The local executor: a pool of worker processes on this machine (the coordinator's side).

It hands planned files (and shard writes) to workers and gathers their small results.

It knows nothing about bytes or tokens. Workers start first, so that they are ready while the
coordinator lists the repo and loads the tokenizer; each then receives the ``WorkerSpec`` and
builds its own tokenizer. They are forked from a fork server that imported everything a worker
needs once (``bolmo_async.preload``: 0.8 CPU s, paid once per pool instead of once per worker);
``BOLMO_ASYNC_START_METHOD=spawn``, or a platform without forkserver, gives each worker a fresh
interpreter instead. The fork server lives as long as the pool and is reaped with it (its CPU
time and its workers' count in this process's ``RUSAGE_CHILDREN``). Files go out in plan order,
the shards' order: a shard is complete, and written, while later files are still fetching (not
all at the end, when only the disk is busy). At most ``spec.slots`` tasks per worker at a time;
a shard whose files are staged goes first to a worker not already writing one (one shard per
worker at a time). A worker that dies fails only the files it held; a fatal error (auth, disk
full, tokenizer) stops every worker.

``processes=1`` runs the one worker on a thread of this process: no process start (fast, works
from any script, and it is what a Ray task or a ``--worker`` share on a small machine runs).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from .. import messages as m
from ..errors import REFUSED_EXIT, ResourceError, UsageError, WorkerError, exhausted, rebuild, refusal_line
from ..models import Plan
from ..outage import OutageWatch
from ..progress import Progress
from ..worker import Worker, WorkerSpec, process_main
from .base import LayoutCallback, OpenShardCallback, RunResult, ShardCallback, StagedCallback
from .forkserver import (
    FORK_SERVER,
    START_METHOD_ENV,
    TERMINAL_SIGNALS,
    server_death,
    start_fork_server,
    start_method,
    start_resource_tracker,
    tracker_death,
    usable_cores,
)

log = logging.getLogger("bolmo_async")

#: Seconds workers get to stop (abort their files, remove temporaries) before they are killed.
STOP_GRACE = 3.0
#: Seconds a pool waits for its workers to have started (the fork server imports first: ~1 s).
START_TIMEOUT = 120.0
#: Seconds a hand-out waits for its file's resolve at a time, its workers' messages read in between.
RESOLVE_SLICE = 0.05
#: The shard being filled is streamed to a worker while its files are staged (``_stream_step``).
#: BOLMO_ASYNC_SHARD_STREAM=0 turns it off: each shard is then written once its files are staged
#: (the same bytes), which costs wall time at the end of a run of many small files but less
#: kernel CPU (its writes no longer overlap the staging's; README, "Performance").
SHARD_STREAM_ENV = "BOLMO_ASYNC_SHARD_STREAM"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def shard_stream() -> bool:
    """Whether the shard being filled is streamed (``BOLMO_ASYNC_SHARD_STREAM``, read when a pool is
    made, so an API user may set it between runs): unset means on; a value that is neither on nor
    off is refused rather than read as one of them."""
    wanted = os.environ.get(SHARD_STREAM_ENV, "").strip().lower()
    if wanted in ("", *_ON):
        return True
    if wanted in _OFF:
        return False
    raise UsageError(f"{SHARD_STREAM_ENV}={wanted!r}: use 1 (on, the default) or 0 (off), or leave it unset")


def _death(wid: int, pid: int | None, code: int | None, stopped_by: int = 0) -> str:
    """How worker process ``wid`` ended, as a user can check it: its exit code, the signal that
    killed it (SIGKILL: most often the kernel's out-of-memory killer, which ``dmesg`` names), or
    the stop signal it was sent (``stopped_by``: it stopped cleanly on it)."""
    who = f"worker process {wid}" + (f" (pid {pid})" if pid is not None else "")
    if stopped_by:
        return f"{who} was stopped by {_signal_name(stopped_by)}"
    if code is None:
        return f"{who} stopped"
    if code >= 0:
        return f"{who} exited with code {code}"
    why = " (the kernel's out-of-memory killer, or a kill -9: `dmesg` says which)" if -code == signal.SIGKILL else ""
    return f"{who} was killed by {_signal_name(-code)}{why}"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _running(pid: int) -> bool:
    """Process ``pid`` runs (not a zombie); not a child of ours, so no exit code to wait for."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


def _end_orphan(pid: int) -> None:
    """Stop a worker whose fork server died (no pipe says when it ends): SIGTERM, by which it
    aborts its files and removes its own temporaries; after the grace, SIGKILL. Returns once it
    is gone, so that its temporaries are never removed under it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
        deadline = time.monotonic() + STOP_GRACE
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not _running(pid):
            return


#: Seconds a worker's exit code 255 waits for its fork server's death to show (``_server_death``).
SERVER_DEATH_WAIT = 0.5


def _server_death() -> str | None:
    """How the fork server ended, for a worker read as exit code 255 (its status pipe, which the
    server holds, closed). The server closes its files as it exits, a moment before it can be
    waited for: asked once, a killed server's death was read as the workers' own "exited with code
    255" (attack runs: 1 of 57 that killed it). Asked again for up to ``SERVER_DEATH_WAIT`` s."""
    deadline = time.monotonic() + SERVER_DEATH_WAIT
    while (died := server_death()) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return died


def check_not_bootstrapping() -> None:
    """Refuse to start workers from a spawned child that is re-running the user's script (a script
    that calls the API at top level, without ``if __name__ == "__main__":``)."""
    # multiprocessing's own test (spawn._check_not_importing_main): set while a spawned child
    # prepares, i.e. re-runs the script as ``__mp_main__``.
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # Quietly: the coordinator sees this worker end before it started and says what to do
        # (a traceback here, one per worker, would bury that one line).
        raise SystemExit(1)


#: How often the run asks whether a worker process is still alive (its pipe's end is seen at once).
ALIVE_EVERY = 0.05


class _Member:
    """One worker as the coordinator sees it."""

    def __init__(self, wid: int):
        self.wid = wid
        self.inbox: Any = None
        self.process: Any = None
        self.thread: threading.Thread | None = None
        self.worker: Worker | None = None
        # A worker process's ends of its two pipes (tasks in, answers out), held here until it is
        # started; the coordinator's: ``inbox`` (``messages.Outbox``) and ``replies``.
        self.ends: tuple[Any, ...] = ()
        self.replies: Any = None
        self.tasks: set[tuple[str, int]] = set()
        self.exited = False
        self.stopped_by = 0  # the stop signal its process said it was sent (``messages.Exit``)
        self.start_error: Exception | None = None  # why its process could not be started
        self.ready = False
        self._alive = False  # its process's last ``is_alive``, and when to ask again
        self._ask_at = 0.0

    def started(self) -> None:
        """Its process has its own copies of its pipes' ends: these are closed, so that its answers
        read as ended once the worker is (a message it was cut in the middle of included), and a
        task sent to it after its death fails (EPIPE) instead of filling a pipe nobody reads."""
        for end in self.ends:
            end.close()

    def alive(self) -> bool:
        if self.exited:
            return False
        if self.process is not None:
            # Asked at most every ``ALIVE_EVERY`` s, and at once when its pipe has ended: each
            # ``is_alive`` polls the process's sentinel through a new selector, and the run's loop
            # asks after every message (0.15 s of the coordinator's CPU on 150 small files).
            now = time.monotonic()
            if now >= self._ask_at or self.replies is None or self.replies.closed:
                self._alive = bool(self.process.is_alive())
                self._ask_at = now + ALIVE_EVERY
            return self._alive
        return self.thread is not None and self.thread.is_alive()


class Pool:
    """``processes`` workers (started now, in the background; ``start`` gives them the spec).

    As an executor: ``units`` are every planned file, ``run`` stages them, ``write_shards`` writes
    a finalize's shards on this process's threads."""

    name = "local"

    def __init__(self, processes: int):
        check_not_bootstrapping()
        self.processes = max(1, processes)
        self.members = [_Member(i) for i in range(self.processes)]
        self._spec: WorkerSpec | None = None
        self._starting: threading.Event | None = None  # set once every worker process is started
        self._forked = False
        self._ended = False  # stopped or closed (once: a second call does nothing)
        # Shards workers wrote while staging their file (``FileTask.layout``): index -> (pieces, record).
        self._written_ahead: dict[int, tuple[list[Any], dict[str, Any]]] = {}
        self._open_shard: OpenShardCallback | None = None
        self._streams = shard_stream()
        self._stream: tuple[int, _Member, int] | None = None  # shard streamed, its worker, pieces sent
        self._no_stream: set[int] = set()  # shards whose stream failed: written at once
        # The files ``run`` handed to a worker: after a stop, those it had not heard of are the
        # only ones a worker may have staged unheard (``api._fetch`` counts their markers).
        self.handed_out: set[int] = set()
        self._watch = OutageWatch()
        if self.processes == 1:
            self.outbox: Any = queue.Queue()
            self.members[0].inbox = queue.Queue()
            return
        method = start_method()
        start_resource_tracker()  # before the first queue starts it, with SIGHUP blocked
        ctx = FORK_SERVER.acquire() if method == "forkserver" else multiprocessing.get_context("spawn")
        self._forked = method == "forkserver"
        share = max(1, usable_cores() // self.processes)
        for mem in self.members:
            # Two pipes of its own (``messages``: no multiprocessing queue, whose locks a killed
            # process held forever and whose semaphores it left behind).
            tasks, to_worker = ctx.Pipe(duplex=False)
            mem.replies, answers = ctx.Pipe(duplex=False)
            mem.inbox = m.Outbox(to_worker)
            mem.ends = (tasks, answers)
            mem.process = self._process(ctx, mem, share)
        self.outbox = m.Replies([mem.replies for mem in self.members])
        if not self._forked:
            # A spawn returns at once: its child imports on its own. Started with SIGINT blocked
            # (inherited: a Ctrl+C to the process group does not interrupt a child's imports with
            # a traceback; the worker then ignores SIGINT), here only deferred: it is delivered
            # when the mask is restored.
            old = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)
            try:
                try:
                    for mem in self.members:
                        mem.process.start()
                        mem.started()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
            except BaseException:  # a stop delivered as the mask is restored: see below
                self.stop()
                raise
            return
        # A fork waits for the fork server's imports (the first pool of a process: ~1 s): on a
        # thread, while this one lists the repo and loads the tokenizer.
        self._starting = threading.Event()
        try:
            threading.Thread(target=self._start_forked, name="bolmo-start", daemon=True).start()
        except BaseException as exc:
            # A stop signal while the thread starts (``Thread.start`` waits for it to run): no
            # caller has this pool to stop, and the thread starts its workers anyway; the command
            # exited under them, its pipes (then queues) closed while a worker still unpickled
            # them (a FileNotFoundError or EOFError traceback from the fork server's child).
            if isinstance(exc, Exception):  # the thread could not start: no worker will
                self._starting.set()
            self.stop()
            raise

    def _process(self, ctx: Any, mem: _Member, share: int) -> Any:
        return ctx.Process(
            target=process_main,
            args=(mem.wid, *mem.ends, share),
            name=f"bolmo-worker-{mem.wid}",
            daemon=True,
        )

    def _start_forked(self) -> None:
        assert self._starting is not None
        # The fork server (started by the first ``start``) inherits this thread's signal mask: with
        # SIGINT blocked, a terminal's Ctrl+C, which reaches the whole process group, does not
        # interrupt its start-up and imports with a KeyboardInterrupt traceback (or a "Fatal Python
        # error"); the coordinator stops the run, and the server then ignores SIGINT itself, as do
        # the workers forked from it. Only this thread's mask: the main thread still gets Ctrl+C.
        signal.pthread_sigmask(signal.SIG_BLOCK, TERMINAL_SIGNALS)  # and a closed terminal's SIGHUP
        try:
            for mem in self.members:
                try:
                    mem.process.start()
                except Exception as exc:  # the fork server could not start or died: this one is spawned
                    log.debug("worker %d: no fork server (%s: %s); spawning it", mem.wid, type(exc).__name__, exc)
                    mem.process = self._process(
                        multiprocessing.get_context("spawn"), mem, max(1, usable_cores() // self.processes)
                    )
                    try:
                        mem.process.start()
                    except Exception as again:  # (a pids limit: EAGAIN) said by ``_lost``, not as a thread's traceback
                        log.debug("worker %d: not started (%s: %s)", mem.wid, type(again).__name__, again)
                        mem.start_error = again
                        continue
                mem.started()
        finally:
            self._starting.set()

    def _started(self) -> None:
        """Every worker process has been started (the fork server's imports are done). An Event,
        not ``Thread.join``: a join that Ctrl+C interrupts marks the thread ended on Python 3.11
        while it still runs (a worker then started after the stop would be left running)."""
        if self._starting is not None:
            self._starting.wait(START_TIMEOUT)

    def units(self, plan: Plan) -> list[int]:
        return list(range(len(plan.files)))

    def write_shards(self, *args: Any) -> list[dict[str, Any]]:
        from ..finalizer import write_shards_locally  # numpy, pyarrow: not before the workers are spawned

        return write_shards_locally(*args)

    def start(self, spec: WorkerSpec) -> None:
        self._spec = spec
        for mem in self.members:
            if mem.process is None:
                # What the worker thread imports first, imported on this thread before it starts:
                # a stop landing in an import both threads were inside left the worker thread a
                # half-made module ("cannot import name ...", a traceback). Here it is a plain
                # stop (the worker thread would import the same modules at once anyway).
                from .. import download, filetask, hub, outdir, retry, staging  # noqa: F401

                mem.worker = Worker(mem.wid, spec, mem.inbox.get, self.outbox.put)
                mem.thread = threading.Thread(target=mem.worker.run, name="bolmo-worker", daemon=True)
                mem.thread.start()
            else:
                mem.inbox.put(spec)

    # -- the run ---------------------------------------------------------------------------
    def run(
        self,
        units: list[int],
        *,
        resolve_ahead: list[int] | None = None,
        progress: Progress | None = None,
        on_staged: StagedCallback | None = None,
        on_files_done: ShardCallback | None = None,
        layout_at: LayoutCallback | None = None,
        open_shard: OpenShardCallback | None = None,
    ) -> RunResult:
        """Stage ``units`` (indices into ``spec.files``). ``on_staged(unit, rec)`` and, once every
        file is done, ``on_files_done()`` return shard tasks ``(k, pieces)`` to hand out (``lengths``: the
        staged file's tokens per document, per batch). ``resolve_ahead``: the units to resolve
        ahead of their hand-out (those not staged yet; None: none). ``layout_at(unit)``: where
        a file's documents start in the shards, when known as it is handed out (its worker then
        writes the shards it fills while staging it; such a shard is kept when its pieces are
        the ones handed out here, else written again). ``open_shard()``: the shard being filled and
        its pieces so far, streamed to one worker as they become known (``_stream_step``)."""
        assert self._spec is not None, "start() first"
        files = self._spec.files
        result = RunResult()
        todo = deque(sorted(units))
        shard_tasks: deque[tuple[int, Any]] = deque()
        self._written_ahead = {}
        self.handed_out = set()
        self._open_shard = open_shard if self._streams else None
        self._stream = None
        self._no_stream = set()
        slots = self._spec.slots
        files_left = len(todo)
        ended = False
        fresh = set(resolve_ahead or ())
        ahead = self._resolve_ahead([u for u in todo if u in fresh]) if fresh else None
        shard_share = max(1, usable_cores() // self.processes)
        self._watch = OutageWatch()  # a server that is down: no new file is handed out
        try:
            # The first files are resolved while the worker processes start (the fork server's
            # imports): their transfers then start at the CDN as soon as the workers are up.
            self._started()
            while True:
                live = [mem for mem in self.members if mem.alive()]
                if not live:
                    # What they said before they ended first (a file staged a moment before the
                    # last one died was failed, and found staged by the rerun).
                    with contextlib.suppress(queue.Empty):
                        while True:
                            msg = self.outbox.get_nowait()
                            files_left -= self._handle(msg, result, progress, on_staged, shard_tasks)
                    for mem in self.members:
                        self._lost(mem, result, progress)
                    if todo:
                        for u in todo:
                            result.failed[files[u].path] = "no worker process was left to fetch it"
                        todo.clear()
                    break
                resolving = False
                # One task at a time, to the least busy worker: filling each worker's slots in turn
                # (``slots`` is sized for a wide-area link's read-ahead) gave a small run's every
                # file to the first worker while the others idled.
                while True:
                    free = [w for w in live if len(w.tasks) < slots]
                    # One shard at a time per worker while files are left: writing one is
                    # CPU-bound (its disk I/O already overlaps on its own threads), and each holds
                    # its write blocks. Once every file is handed out, a worker takes as many as
                    # its share of the cores (one large file: one worker, whose shards would
                    # otherwise be written one after the other at the end).
                    most = 1 if todo else shard_share
                    writers = [w for w in free if sum(kind == "shard" for kind, _ in w.tasks) < most]
                    if shard_tasks and writers:
                        mem = min(writers, key=lambda w: len(w.tasks))
                        k, pieces = shard_tasks.popleft()
                        mem.tasks.add(("shard", k))
                        mem.inbox.put(m.ShardTask(k, pieces))
                    elif todo and free and not self._watch.holds(self._files_in_flight()):
                        if ahead is not None and not ahead.ready(todo[0], RESOLVE_SLICE):
                            resolving = True  # its resolve is under way: the messages meanwhile
                            break
                        mem = min(free, key=lambda w: len(w.tasks))
                        u = todo.popleft()
                        mem.tasks.add(("file", u))
                        self.handed_out.add(u)
                        cdn = ahead.take(u) if ahead is not None else None
                        layout = layout_at(u) if layout_at is not None else None
                        if layout is not None and self._stream is not None and self._stream[0] == layout.shard:
                            self._drop_stream()  # this file writes that shard while it is staged
                        mem.inbox.put(m.FileTask(u, cdn, layout))
                    else:
                        break
                if todo and self._watch.down is not None and not self._files_in_flight():
                    # (the files in flight ended, none staged: those never handed out are not started)
                    result.outage = self._watch.says(len(todo))
                    for u in todo:
                        result.failed[files[u].path] = "not started (the server was down)"
                    files_left -= len(todo)
                    todo.clear()
                if files_left == 0 and not ended:
                    ended = True
                    if on_files_done is not None:
                        self._hand_out(on_files_done(), result, shard_tasks)
                    if self._stream is not None:  # files failed: the shard it streams will not complete
                        self._drop_stream()
                    if on_files_done is not None:
                        continue
                if ended and not shard_tasks and not any(mem.tasks for mem in self.members):
                    break
                try:
                    msg = self.outbox.get(timeout=0.0 if resolving else 0.5)
                except queue.Empty:
                    for mem in self.members:
                        if mem.tasks and not mem.alive():
                            files_left -= self._lost(mem, result, progress)
                    continue
                files_left -= self._handle(msg, result, progress, on_staged, shard_tasks)
                if files_left > 0:  # (the last file's shard is handed out whole, or was written ahead)
                    self._stream_step()
        except BaseException:
            self.stop()
            raise
        finally:
            if ahead is not None:
                ahead.close()
        return result

    def _files_in_flight(self) -> int:
        return sum(kind == "file" for mem in self.members for kind, _ in mem.tasks)

    def _resolve_ahead(self, order: list[int]) -> Any:
        """The files the Hub redirects (LFS: their sha256 is listed), resolved ahead of their
        hand-out, as many ahead as files are in flight at once (``download.ResolveAhead``)."""
        spec = self._spec
        assert spec is not None
        from ..download import ResolveAhead
        from ..hub import read_token
        from ..retry import RetryPolicy

        paths = {u: spec.files[u].path for u in order if spec.files[u].sha256}
        if not paths:
            return None
        return ResolveAhead(
            endpoint=spec.endpoint,
            repo_id=spec.repo_id,
            repo_type=spec.repo_type,
            token=read_token(),
            retry=RetryPolicy(max_attempts=spec.retries, read_timeout=spec.read_timeout),
            commit=spec.commit,
            paths=paths,
            order=order,
            window=spec.slots * self.processes,
        )

    def _handle(
        self,
        msg: m.FromWorker,
        result: RunResult,
        progress: Progress | None,
        on_staged: StagedCallback | None,
        shard_tasks: deque[tuple[int, Any]],
    ) -> int:
        """Handle one message; returns the number of files it finished (staged or failed)."""
        assert self._spec is not None
        member = self.members[msg.wid]
        match msg:
            case m.Progress():
                if msg.nbytes > 0:  # bytes received: a server answers (``OutageWatch.answered``)
                    self._watch.answered()
                if progress is not None:
                    progress.add_bytes(msg.nbytes)
                    progress.add_documents(msg.documents, msg.tokens)
            case m.Log():
                log.log(msg.level, "%s", msg.message)
            case m.Ready():
                log.debug("worker %d ready (engine %s)", msg.wid, msg.engine)
                member.ready = True
                result.engines.add(msg.engine)
            case m.Staged():
                log.debug("worker %d staged %s", msg.wid, self._spec.files[msg.unit].path)
                member.tasks.discard(("file", msg.unit))
                result.staged[msg.unit] = msg.record
                result.fetched_now += msg.read is not None and not msg.local
                result.from_raw += msg.local
                if msg.read is None:
                    result.resumed.add(msg.unit)
                if progress is not None:
                    expected = self._spec.files[msg.unit].read_bytes(self._spec.whole_prefixes)
                    if msg.read is None:  # staged before: not part of this run's transfer rate
                        progress.add_total(-expected)
                    else:  # parquet prefixes read whole row groups and the footer: the total follows
                        progress.add_total(msg.read - expected)
                    progress.file_done(sum(msg.record.get("skipped", {}).get("counts", {}).values()))
                self._written_ahead.update(msg.shards)
                if msg.read is not None and not msg.local:
                    # (one staged by an earlier run, or read from its download kept in raw/, made no
                    # request: it says nothing of the server)
                    self._watch.staged()
                if on_staged is not None:
                    self._hand_out(on_staged(msg.unit, msg.lengths), result, shard_tasks)
                return 1
            case m.Failed():
                member.tasks.discard(("file", msg.unit))
                result.failed[self._spec.files[msg.unit].path] = msg.reason
                if msg.permanent:
                    result.permanent.add(self._spec.files[msg.unit].path)
                self._watch.failed(msg.outage)
                if progress is not None:
                    progress.file_done()
                return 1
            case m.ShardWritten():
                log.debug("worker %d wrote shard %d", msg.wid, msg.index)
                member.tasks.discard(("shard", msg.index))
                result.shards[msg.index] = msg.record
            case m.ShardFailed():
                member.tasks.discard(("shard", msg.index))
                if self._stream is not None and self._stream[0] == msg.index:  # written at once instead
                    self._stream = None
                    self._no_stream.add(msg.index)
                log.debug("shard %d was not written while fetching (%s); finalize writes it", msg.index, msg.reason)
            case m.Fatal():
                raise rebuild(msg.error, msg.message)
            case m.Exit():
                member.exited = True
                member.stopped_by = msg.signum
                return self._lost(member, result, progress)
        return 0

    def _hand_out(self, tasks: list[tuple[int, Any]], result: RunResult, shard_tasks: deque[tuple[int, Any]]) -> None:
        """Shard tasks to hand out, less those a worker wrote while staging their file with
        exactly these pieces (their records are kept as written)."""
        for k, pieces in tasks:
            done = self._written_ahead.pop(k, None)
            stream = self._stream if self._stream is not None and self._stream[0] == k else None
            if stream is not None:
                self._stream = None
            if done is not None and done[0] == pieces:
                result.shards[k] = done[1]
                if stream is not None:
                    stream[1].inbox.put(m.ShardStream(k, 0, [], drop=True))
            elif stream is not None:  # its last pieces, then in place: a shard task from now on
                _, mem, sent = stream
                mem.tasks.add(("shard", k))
                mem.inbox.put(m.ShardStream(k, sent, list(pieces[sent:]), end=True))
            else:
                shard_tasks.append((k, pieces))

    def _drop_stream(self) -> None:
        """The shard being streamed is not to be completed by its stream (its files failed, or a
        file placed in the layout writes it while staged): its worker removes its temporaries."""
        assert self._stream is not None
        k, mem, _ = self._stream
        self._stream = None
        self._no_stream.add(k)
        mem.inbox.put(m.ShardStream(k, 0, [], drop=True))

    def _stream_step(self) -> None:
        """The shard being filled goes to one worker as its pieces become known (a shard of many
        small files was written only once its last file was staged, by one worker, the disk
        alone busy at the end of the run): the pieces laid out since the last step. A stream
        that failed is not started again (its shard is written at once when complete); one whose
        worker died starts again from its first piece on another."""
        if self._open_shard is None:
            return
        cur = self._open_shard()
        if cur is None:
            return
        k, pieces = cur
        if self._stream is not None and self._stream[0] == k:
            _, mem, sent = self._stream
            if len(pieces) > sent:
                mem.inbox.put(m.ShardStream(k, sent, list(pieces[sent:])))
                self._stream = (k, mem, len(pieces))
            return
        live = [w for w in self.members if w.alive()]
        if k in self._no_stream or not live or not pieces:
            return
        # Not one of its tasks until it ends: a stream waits for files, which need the slots.
        mem = min(live, key=lambda w: (sum(kind == "shard" for kind, _ in w.tasks), len(w.tasks)))
        pid = mem.process.pid if mem.process is not None else os.getpid()
        log.debug("streaming shard %d to worker %d (pid %d) while its files are staged", k, mem.wid, pid)
        mem.inbox.put(m.ShardStream(k, 0, list(pieces)))
        self._stream = (k, mem, len(pieces))

    def _lost(self, member: _Member, result: RunResult, progress: Progress | None) -> int:
        """A worker ended with tasks in hand: its files fail (a rerun resumes them)."""
        assert self._spec is not None
        n = 0
        if self._stream is not None and self._stream[1] is member:  # streamed again from its first piece
            self._stream = None
        code = member.process.exitcode if member.process is not None else None
        how = f"exit code {code}" if code is not None and code >= 0 else f"signal {-code}" if code else "it stopped"
        pid = member.process.pid if member.process is not None else None
        server = _server_death() if self._forked and code == 255 and pid is not None else None
        if member.start_error is not None:  # neither forked nor spawned: the whole run would fail so
            err = member.start_error
            if isinstance(err, OSError) and err.errno in (errno.EAGAIN, errno.ENOMEM):  # fork's refusal
                raise ResourceError(f"worker process {member.wid} could not start: {refusal_line('processes', err)}")
            raise exhausted(err, f"worker process {member.wid} could not start") or WorkerError(
                f"worker process {member.wid} could not start: {type(err).__name__}: {err}; rerun the same command"
            )
        kinds = {c: k for k, c in REFUSED_EXIT.items()}
        if not member.ready and code in kinds:  # it said by its exit code what the system refused it
            raise ResourceError(f"worker process {member.wid} could not start: {refusal_line(kinds[code])}")
        # A worker that exits (not killed by a signal) before it is ready could not start at all:
        # the whole run would fail the same way. One killed meanwhile only loses its files.
        if not member.ready and member.process is not None and not member.exited and code is not None and code >= 0:
            if server is not None and pid is not None:
                _end_orphan(pid)  # (the server's death, not the worker's start, failed)
                raise WorkerError(f"{server} before worker process {member.wid} was ready; rerun the same command")
            main = getattr(sys.modules.get("__main__"), "__file__", None)
            where = getattr(multiprocessing.process, "ORIGINAL_DIR", None) or ""  # (as multiprocessing finds it)
            if isinstance(main, str) and not os.path.isfile(os.path.join(where, main)):  # `python -`: '<stdin>'
                raise WorkerError(
                    f"worker process {member.wid} ended before it started ({how}): worker processes import the "
                    f"calling script, and {main!r} is no file (a script read from standard input). Save it to a "
                    "file and run that, or pass processes=1."
                ) from None
            raise WorkerError(
                f"worker process {member.wid} ended before it started ({how}). If you call bolmo_async from a "
                'script, put the call under `if __name__ == "__main__":` (worker processes import the script), or '
                "pass processes=1; otherwise rerun with BOLMO_ASYNC_DEBUG=1 and report its output."
            ) from None
        died = _death(member.wid, pid, code, member.stopped_by)
        why = f"its {died}"
        if server is not None:  # its status pipe closed (read as code 255): the worker may still run
            why = died = f"{server}; worker process {member.wid} (pid {pid}), which it had started, is stopped"
        for kind, i in sorted(member.tasks):
            if kind == "file":
                result.failed[self._spec.files[i].path] = f"{why}; rerun to fetch it again"
                n += 1
                if progress is not None:
                    progress.file_done()
        if n:
            # Said as it happens (the run's end may be long after): its files are not handed to the
            # other workers (one that killed its worker, by its memory, would kill them in turn).
            log.warning(
                "%s holding %d file(s): they fail; %sa rerun of the same command fetches them again",
                died[0].upper() + died[1:],
                n,
                "" if server is not None else "the other workers go on, and ",
            )
        elif code and not member.stopped_by:
            # No file in hand (it wrote the streamed shard, which another worker writes again): the
            # run can still complete, but a worker lost to a signal (the OOM killer) is said. Not
            # "the other workers go on" when the fork server died: the others it forked end too.
            go_on = "" if server is not None else ": the other workers go on"
            log.warning("%s holding no file%s", died[0].upper() + died[1:], go_on)
        held = self._held(member)
        member.tasks.clear()
        member.exited = True
        if server is not None and pid is not None:
            _end_orphan(pid)
        self._remove_temporaries_of(member, held)
        return n

    def _held(self, member: _Member) -> list[str]:
        """The keys of the files ``member`` holds."""
        return [self._spec.files[i].key for kind, i in member.tasks if kind == "file"] if self._spec else []

    def _remove_temporaries_of(self, member: _Member, held: Sequence[str] = ()) -> None:
        """What a dead worker process was writing stays behind as temporaries (up to a file's
        whole shards when they were written while it was staged): removed now, not at the next run.
        ``held``: the keys of the files it held (their leftovers not named after it go too)."""
        if self._spec is None or member.process is None or member.process.pid is None:
            return
        from ..outdir import open_output

        with contextlib.suppress(Exception):
            gone = open_output(self._spec.output_dir).remove_temporaries_of(member.process.pid, held)
            if gone:
                log.info("removed %d temporaries of worker %d", gone, member.wid)

    # -- stopping --------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every worker now: in-flight files are aborted and their temporaries removed."""
        if self._ended:
            return
        self._ended = True
        self._started()
        for mem in self.members:
            if mem.worker is not None:
                mem.worker.cancel()
                mem.inbox.put(m.Stop())  # ends its inbox reader
            elif mem.process is not None and mem.process.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(mem.process.pid, signal.SIGTERM)
                # And by its inbox: a worker forked a moment ago ignores SIGTERM until it has set
                # its own handler (the fork server ignores it); a SIGTERM sent then is lost, and the
                # worker waited on its inbox until the grace ran out and it was killed (3 s of every
                # run that failed or was stopped before its workers had their spec).
                with contextlib.suppress(Exception):
                    mem.inbox.put(m.Stop() if self._spec is not None else None)
        self._join(STOP_GRACE)

    def close(self) -> None:
        """Let idle workers finish and exit (after ``run``), or stop them."""
        if self._ended:
            return
        self._ended = True
        for mem in self.members:
            with contextlib.suppress(Exception):
                mem.inbox.put(m.Stop() if self._spec is not None else None)
        self._join(STOP_GRACE)

    def _join(self, grace: float) -> None:
        self._started()
        if self.processes > 1 and (died := tracker_death()) is not None:  # (reaped, not relaunched)
            log.debug("%s: nothing of this run was in its care (no semaphore: pipes only)", died)
        deadline = time.monotonic() + grace
        for mem in self.members:
            if mem.thread is not None:
                mem.thread.join(max(0.1, deadline - time.monotonic()))
            elif mem.process is not None and mem.process.pid is not None:
                # Its pipe read meanwhile: a worker whose last messages fill it (a large Staged)
                # waits for them to be read before it exits, and was killed at the grace's end.
                end = max(deadline, time.monotonic() + 0.1)
                while True:
                    self._drain()
                    mem.process.join(min(0.05, max(0.0, end - time.monotonic())))
                    if not mem.process.is_alive() or time.monotonic() >= end:
                        break
                if mem.process.is_alive():
                    mem.process.kill()
                    mem.process.join(1.0)
                    self._remove_temporaries_of(mem, self._held(mem))  # killed: it cleaned up nothing
        self._drain()
        if self.processes > 1:
            self.outbox.close()
            for mem in self.members:
                mem.started()  # (one never started)
                mem.inbox.close(0.0)  # (its thread, a daemon, may still wait on a pipe nobody reads)
        if self._forked:
            self._forked = False  # released once, whether by close or by stop
            ended = all(mem.process.pid is None or not mem.process.is_alive() for mem in self.members)
            FORK_SERVER.release(reap=ended)

    def _drain(self) -> None:
        """Read (and drop) what the workers said: no worker waits on a full pipe to exit."""
        with contextlib.suppress(Exception):
            while True:
                self.outbox.get_nowait()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.stop()


__all__ = [
    "START_METHOD_ENV",
    "Pool",
    "check_not_bootstrapping",
    "start_fork_server",
    "start_method",
    "usable_cores",
]

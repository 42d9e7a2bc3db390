"""A worker: the same code everywhere (a local pool's process, an in-process thread, a Ray task).

It holds one ``aiohttp.ClientSession``, the run's tokenizer and a small thread pool for CPU
work, takes tasks from its inbox and answers on its outbox with the small named records of
``messages``. A file is done start to finish here (``filetask.run_file_task``); no text or ids
ever cross the process boundary. Any exception from one file's work (``BaseException``
included, such as a tokenizer's Rust panic) becomes that file's failure, or the run's when
every file would fail the same way (``FATAL``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import messages as m
from .errors import (
    REFUSED_EXIT,
    AuthError,
    BolmoError,
    DecodeError,
    DiskSpaceError,
    ListingMismatch,
    OutputError,
    StateError,
    TokenizerError,
    UsageError,
    exhausted,
    refused_kind,
)
from .util import PlanOrderSlots

log = logging.getLogger("bolmo_async")

#: Errors that stop the whole run (every other file would fail the same way; UsageError: a
#: --text-field the data does not have).
FATAL: tuple[type[BaseException], ...] = (
    AuthError,
    DiskSpaceError,
    OutputError,
    StateError,
    TokenizerError,
    UsageError,
)
#: Seconds between looks at a file another run is staging.
CLAIM_POLL = 0.5
#: Seconds between progress messages.
PROGRESS_EVERY = 0.25


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs (picklable; sent once when it starts)."""

    output_dir: str
    files: tuple[Any, ...]  # the plan's PlannedFiles; a task names one by its index (unit)
    repo_id: str
    commit: str
    endpoint: str
    tokenizer: Any  # tokenize.TokenizerSpec
    eos: int  # appended to each piece of a document cut across shards
    repo_type: str = "dataset"
    streaming: bool = True
    verify_prefixes: bool | None = None  # models.verifies_prefixes's option
    retries: int = 8
    read_timeout: float = 60.0
    slots: int = 4  # tasks at once in one worker
    decoders: int = 0  # files decoding at once (0: slots); the others transfer ahead, bounded
    connections: int = 0  # connections for file bodies (0: slots)
    max_document_bytes: int = 0
    src_prefix: str = ""  # csv.gz ``src`` prefix (shard tasks)
    text_field: str = "text"  # the record fields (JSON key and parquet column alike)
    id_field: str = "id"
    # Each file is staged under a claim (``Staging.claim``) when another run may stage in the same
    # folder at once (``--worker`` shares, Ray tasks); False when this run holds the folder's
    # lock exclusively: no other writer is alive there (a lock file opened and locked, and two
    # thread trips, per file saved).
    claims: bool = True
    # HF_HUB_OFFLINE: a file not staged is read from its download kept in raw/, never requested.
    offline: bool = False

    @property
    def whole_prefixes(self) -> bool:
        """A JSON-lines prefix's whole file is downloaded (``models.reads_prefixes_whole``)."""
        from .models import reads_prefixes_whole

        return reads_prefixes_whole(self.verify_prefixes, self.endpoint, self.streaming)


Send = Callable[[m.FromWorker], None]


class Worker:
    def __init__(self, wid: int, spec: WorkerSpec, receive: Callable[[], Any], send: Send):
        self.wid = wid
        self.spec = spec
        self._receive = receive
        self._send = send
        self._counts = [0, 0, 0]  # bytes, documents, tokens not yet reported
        self._counts_lock = threading.Lock()
        self._main: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_shards = threading.Event()
        self._stopped_by = 0  # the stop signal this worker process was sent itself (0: none)
        self._decoding = PlanOrderSlots(1)  # files decoding at once, in plan order (set per spec)
        self._closed_streams: set[int] = set()  # shards streamed here that ended, failed or were dropped
        self._tokenizer: Any = None  # the run's tokenizer, once built (``_serve``)

    # -- progress ----------------------------------------------------------------------
    def _count(self, nbytes: int = 0, documents: int = 0, tokens: int = 0) -> None:
        with self._counts_lock:
            self._counts[0] += nbytes
            self._counts[1] += documents
            self._counts[2] += tokens

    def _flush_progress(self) -> None:
        with self._counts_lock:
            counts, self._counts = self._counts, [0, 0, 0]
        if any(counts):
            self._send(m.Progress(self.wid, *counts))

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            self._flush_progress()

    # -- running ---------------------------------------------------------------------
    def cancel(self, signum: int = 0) -> None:
        """Stop now (from any thread): tasks in flight are aborted, their temporaries removed.
        ``signum``: the signal this process was sent (its exit says so to the coordinator)."""
        self._stopped_by = self._stopped_by or signum
        self._stop_shards.set()
        if self._loop is not None and self._main is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                self._loop.call_soon_threadsafe(self._main.cancel)

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        try:
            await self._serve()
        except asyncio.CancelledError:
            pass
        finally:
            self._flush_progress()
            self._send(m.Exit(self.wid, self._stopped_by))

    async def _serve(self) -> None:
        from .download import Link
        from .filetask import TaskContext
        from .hub import HubClient, make_session, read_token
        from .models import verifies_prefixes
        from .outdir import open_output
        from .retry import RetryPolicy
        from .staging import Staging

        spec = self.spec
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max(2, min(spec.decoders or spec.slots, 4)), thread_name_prefix="bolmo-cpu")
        inbox: asyncio.Queue[Any] = asyncio.Queue()

        def read() -> None:  # a daemon thread: blocked on the inbox, it never holds up an exit
            while True:
                msg = self._receive()
                try:
                    loop.call_soon_threadsafe(inbox.put_nowait, msg)
                except RuntimeError:  # the loop ended (a fatal error) while this message came: nobody reads it
                    return
                if msg is None or isinstance(msg, m.Stop):
                    return

        threading.Thread(target=read, name="bolmo-inbox", daemon=True).start()
        tasks: set[asyncio.Task[None]] = set()
        streams: dict[int, asyncio.Queue[m.ShardStream]] = {}  # shards streamed to this worker
        reporter = asyncio.create_task(self._report())
        try:
            tokenizer = spec.tokenizer.build()
            # Kept past this function: freeing a BPE engine took 50-60 ms (dolma2's reference)
            # at the end of every worker, which a worker process never needs (it ends with os._exit).
            self._tokenizer = tokenizer
            # The BPE engine builds on a thread while the first files download.
            warm = loop.run_in_executor(executor, getattr(tokenizer, "warm", lambda: None))
            # Its error is the first file's too (said once, by that file): never "never retrieved".
            warm.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._send(m.Ready(self.wid, tokenizer.info.engine))
            retry = RetryPolicy(max_attempts=spec.retries, read_timeout=spec.read_timeout)
            # The tasks end (a stop cancels them) before their session closes: closed under them,
            # it failed a file cut short by the stop ("Session is closed") as if it had failed.
            async with make_session(max(spec.slots, spec.connections), retry) as session, _ended_first(tasks):
                client = HubClient(
                    session,
                    endpoint=spec.endpoint,
                    repo_id=spec.repo_id,
                    repo_type=spec.repo_type,
                    token=read_token(),
                    retry=retry,
                )
                self._decoding = PlanOrderSlots(spec.decoders or spec.slots)  # each file takes a turn
                ctx = TaskContext(
                    client=client,
                    commit=spec.commit,
                    staging=Staging(open_output(spec.output_dir)),
                    tokenizer=tokenizer,
                    executor=executor,
                    streaming=spec.streaming,
                    verify_prefixes=verifies_prefixes(spec.verify_prefixes, spec.endpoint),
                    offline=spec.offline,
                    max_document_bytes=spec.max_document_bytes,
                    text_field=spec.text_field,
                    id_field=spec.id_field,
                    on_bytes=lambda n: self._count(nbytes=n),
                    on_documents=lambda documents, tokens: self._count(0, documents, tokens),
                    link=Link(spec.connections or spec.slots),
                )
                while True:
                    msg = await inbox.get()
                    if msg is None or isinstance(msg, m.Stop):
                        break
                    if isinstance(msg, m.ShardStream):
                        if msg.index in streams:
                            streams[msg.index].put_nowait(msg)
                            continue
                        if msg.index in self._closed_streams:
                            continue
                        streams[msg.index] = asyncio.Queue()
                        streams[msg.index].put_nowait(msg)
                        task = asyncio.create_task(self._stream(msg.index, streams))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                        continue
                    task = asyncio.create_task(
                        self._file(ctx, msg.unit, msg.cdn, msg.layout)
                        if isinstance(msg, m.FileTask)
                        else self._shard(msg.index, msg.pieces, executor)
                    )
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                for q in streams.values():  # a shard still streaming will not complete in this run
                    q.put_nowait(m.ShardStream(-1, 0, [], drop=True))
                if tasks:
                    await asyncio.gather(*tasks)
                with contextlib.suppress(Exception):
                    await warm
        except FATAL as exc:
            self._send(m.Fatal(self.wid, type(exc).__name__, str(exc)))
        finally:
            for task in list(tasks):
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            reporter.cancel()
            self._stop_shards.set()
            # Never wait for a CPU step in progress (a BPE encode or the engine's build can take
            # seconds): a stop is prompt; a worker process then exits (os._exit) under it.
            executor.shutdown(wait=False, cancel_futures=True)

    async def _file(self, ctx: Any, unit: int, cdn: str | None = None, layout: m.LayoutAt | None = None) -> None:
        from .filetask import run_file_task

        pf = self.spec.files[unit]
        loop = asyncio.get_running_loop()
        # Its place among this worker's files decoding in plan order (``PlanOrderSlots``).
        turn = self._decoding.turn(unit)
        ctx = dataclasses.replace(ctx, decoding=turn)
        ahead = self._shards_ahead(ctx, unit, layout) if layout is not None else None
        try:
            waited = False
            while True:
                if not self.spec.claims:  # this run alone writes in the folder: nothing to wait for
                    rec, read, lengths, shards, local = await run_file_task(ctx, pf, cdn, ahead, clean=True)
                    break
                # Taking and letting go of a claim is I/O (a flock, or requests to a bucket): not on
                # the event loop.
                claim = ctx.staging.claim(pf)
                mine = await loop.run_in_executor(ctx.executor, _take, claim, ctx.staging, pf)
                try:
                    if mine:
                        rec, read, lengths, shards, local = await run_file_task(ctx, pf, cdn, ahead)
                        break
                finally:
                    await asyncio.shield(loop.run_in_executor(ctx.executor, claim.__exit__, None, None, None))
                # Another run (an overlapping --worker share) is staging it now: wait for it to
                # finish, then take its result (or stage it, if that run failed or was stopped).
                if not waited:
                    log.info(
                        "%s is being staged by another run in this folder; waiting for it%s",
                        pf.path,
                        ctx.staging.out.claim_wait_note(),
                    )
                    waited = True
                turn.retire()  # the slot does not wait for it meanwhile (it asks again, if it decodes)
                await asyncio.sleep(CLAIM_POLL)
            self._flush_progress()
            self._send(m.Staged(self.wid, unit, rec, read, lengths, shards, local))
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except FATAL as exc:
            self._send(m.Fatal(self.wid, type(exc).__name__, str(exc)))
            self.cancel()
        except BaseException as exc:
            if self._stop_shards.is_set():  # cut short by the stop (not staged: the rerun fetches it)
                log.debug("%s stopped: %s: %s", pf.path, type(exc).__name__, exc)
            elif isinstance(exc, BolmoError):
                log.error("failed: %s", exc)
                self._send(
                    m.Failed(self.wid, unit, str(exc), isinstance(exc, DecodeError | ListingMismatch), exc.outage)
                )
            elif refused := exhausted(exc, pf.path):  # a ulimit, not a bug: the line names the limit
                log.error("failed: %s", refused)
                self._send(m.Failed(self.wid, unit, str(refused)))
            else:  # one file's bug (or a Rust panic) never stops the others
                log.error("failed: %s: unexpected %s: %s", pf.path, type(exc).__name__, exc)
                self._send(m.Failed(self.wid, unit, f"{pf.path}: unexpected {type(exc).__name__}: {exc}"))
        finally:
            turn.retire()

    def _shards_ahead(self, ctx: Any, unit: int, layout: m.LayoutAt) -> Callable[[], Any]:
        """Makes the ``filetask.ShardsAhead`` of ``unit``: the shards it fills, written while it is
        staged, from ``layout`` (where its documents start: the coordinator's)."""
        from .filetask import ShardsAhead
        from .outdir import staged_name

        files = self.spec.files
        units = {p.unit for p in layout.pieces} | {unit}
        arrows = {u: staged_name(files[u].key) for u in units}
        srcs = {u: self.spec.src_prefix + files[u].path for u in units}
        return lambda: ShardsAhead(ctx.staging.out, unit, layout, arrows, srcs, self.spec.eos)

    async def _shard(self, k: int, pieces: list[Any], executor: ThreadPoolExecutor) -> None:
        from .finalizer import write_shard
        from .outdir import open_output, staged_name

        out = open_output(self.spec.output_dir)
        arrows = {p.unit: staged_name(self.spec.files[p.unit].key) for p in pieces}
        srcs = {p.unit: self.spec.src_prefix + self.spec.files[p.unit].path for p in pieces}
        eos = self.spec.eos
        try:
            rec = await asyncio.get_running_loop().run_in_executor(
                executor, write_shard, out, k, pieces, arrows, srcs, eos, self._stop_shards
            )
            self._send(m.ShardWritten(self.wid, k, rec))
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except (DiskSpaceError, OutputError) as exc:
            self._send(m.Fatal(self.wid, type(exc).__name__, str(exc)))
        except BaseException as exc:  # finalize writes this shard again
            self._send(m.ShardFailed(self.wid, k, f"{type(exc).__name__}: {exc}"))

    async def _stream(self, k: int, streams: dict[int, asyncio.Queue[m.ShardStream]]) -> None:
        """Shard ``k`` streamed to this worker (``messages.ShardStream``): its pieces appended as the
        coordinator lays them out, while later files are still staged, by the same code as a shard
        written at once (``finalizer.append_pieces``: the same bytes); in place at its end. On a
        thread of its own (the decoders keep theirs), which also removes its temporaries when the
        stream is dropped, fails or is stopped (after the append in progress, never during it)."""
        from .finalizer import ShardWriter, append_pieces
        from .outdir import open_output, staged_name

        loop = asyncio.get_running_loop()
        queue = streams[k]
        out = open_output(self.spec.output_dir)
        files, prefix, eos = self.spec.files, self.spec.src_prefix, self.spec.eos
        lane = ThreadPoolExecutor(1, thread_name_prefix="bolmo-shard-stream")
        writer: ShardWriter | None = None
        count = 0  # pieces appended
        try:
            while True:
                msg = await queue.get()
                # The messages queued behind it too (one per file staged: they pile up while an
                # append runs), their pieces in one trip to the thread: a trip each cost two
                # thread hand-offs on a busy GIL, and fell behind the files being staged.
                run: list[Any] = []
                taken = False  # ``msg`` is in sequence: its pieces are in ``run``
                while not msg.drop and msg.at == count + len(run):
                    run += msg.pieces
                    taken = True
                    if msg.end or queue.empty():
                        break
                    msg, taken = queue.get_nowait(), False
                if msg.drop:  # (nothing appended for it: its temporaries go)
                    break
                if not taken:
                    raise ValueError(f"shard {k}: pieces from {msg.at} came after {count + len(run)}")
                if run:
                    arrows = {p.unit: staged_name(files[p.unit].key) for p in run}
                    srcs = {p.unit: prefix + files[p.unit].path for p in run}
                    if writer is None:
                        writer = await loop.run_in_executor(lane, ShardWriter, out, k)
                    await loop.run_in_executor(lane, append_pieces, writer, run, arrows, srcs, eos, self._stop_shards)
                    count += len(run)
                if msg.end:
                    if writer is None:
                        raise ValueError(f"shard {k} ended without pieces")
                    done, writer = writer, None
                    rec = await loop.run_in_executor(lane, done.close)
                    self._send(m.ShardWritten(self.wid, k, rec))
                    return
            # Dropped: its temporaries go before this worker may exit.
            if writer is not None:
                dropped, writer = writer, None
                await loop.run_in_executor(lane, dropped.abort)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except (DiskSpaceError, OutputError) as exc:
            self._send(m.Fatal(self.wid, type(exc).__name__, str(exc)))
        except BaseException as exc:  # the coordinator has it written at once (or finalize does)
            self._send(m.ShardFailed(self.wid, k, f"{type(exc).__name__}: {exc}"))
        finally:
            self._closed_streams.add(k)  # later messages for it are ignored: it never restarts here
            streams.pop(k, None)
            if writer is not None:  # after the append in progress, on its thread
                lane.submit(writer.abort)
            lane.shutdown(wait=False)


def _take(claim: Any, staging: Any, pf: Any) -> bool:
    """Enter ``claim`` (``Staging.claim``); when this run holds it, remove what killed runs left of
    ``pf``: one trip to a thread for both (a file's every trip costs thread handoffs)."""
    mine = bool(claim.__enter__())
    if mine:
        try:
            staging.clean_temporaries([pf])
        except BaseException:
            claim.__exit__(*sys.exc_info())
            raise
    return mine


# ---------------------------------------------------------------------------------------------
# a worker process


class _Forward(logging.Handler):
    """Log records of a worker process go to the coordinator, which shows them."""

    def __init__(self, wid: int, send: Send):
        super().__init__(logging.INFO)
        self.wid = wid
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self._send(m.Log(self.wid, record.levelno, record.getMessage()))


#: Thread pools of numeric libraries a worker never needs (its numpy does no linear algebra):
#: OpenBLAS starts a thread per core when numpy loads, which showed in workers' profiles. One
#: thread each unless the user set them; read when the library loads (``limit_library_threads``).
LIBRARY_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def limit_library_threads() -> None:
    """One thread for the numeric libraries of ``LIBRARY_THREAD_VARS`` (the user's own settings
    win); before numpy loads in a worker process (the fork server's preload, ``bolmo_async.preload``,
    or a spawned worker's first step). Never in the coordinator: a library user's process keeps
    its own."""
    for var in LIBRARY_THREAD_VARS:
        os.environ.setdefault(var, "1")


@contextlib.asynccontextmanager
async def _ended_first(tasks: set[asyncio.Task[None]]) -> Any:
    """On the way out (a stop, an error), cancels ``tasks`` and waits for them to end."""
    try:
        yield
    finally:
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def import_task_modules() -> None:
    """Import every module a worker's tasks need (aiohttp with its SSL context, numpy, pyarrow,
    the decoders: 0.8 CPU s). aiohttp's CA certificates load only if a connection needs them
    (``lazycerts``: this is a worker process of the tool's own)."""
    from .lazycerts import import_aiohttp

    import_aiohttp()
    from . import filetask, finalizer, hub, staging, tokenize  # noqa: F401


def _die_with_parent(current: Callable[[], Worker | None]) -> None:
    """A worker never outlives its coordinator (kill -9 included). It holds the read end of a pipe
    whose write end only the coordinator holds (multiprocessing's parent sentinel, under spawn and
    forkserver alike): it reads as closed the moment the coordinator is gone, whatever killed it,
    and a watchdog thread waits on it. (Under forkserver the parent process is the fork server, so
    ``os.getppid()`` says nothing about the coordinator; the fork server dying ends the worker too,
    as its coordinator counts it lost then.) Before its spec arrives the worker simply ends;
    afterwards it aborts its files first."""
    import multiprocessing
    from multiprocessing import forkserver

    coordinator = multiprocessing.parent_process()
    starter = os.getppid()
    # A forked worker inherits the fork server's "alive" pipe, which the server waits on to end:
    # closed here, the server ends as soon as its coordinator lets go of it, whatever the workers
    # do (they then end too: their starter is gone). Private, hence guarded.
    server = getattr(forkserver, "_forkserver", None)
    alive = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive, int):
        with contextlib.suppress(OSError):
            os.close(alive)
        server._forkserver_alive_fd = None  # type: ignore[union-attr]
    if coordinator is None or not coordinator.is_alive():  # it died while this process was starting
        os._exit(1)

    def watch() -> None:
        while True:
            coordinator.join(1.0)  # returns at once when the coordinator is gone
            if not coordinator.is_alive() or os.getppid() != starter:
                worker = current()
                if worker is not None:
                    worker.cancel()
                    time.sleep(5.0)
                os._exit(1)

    threading.Thread(target=watch, name="bolmo-watchdog", daemon=True).start()


def process_main(wid: int, inbox: Any, outbox: Any, bpe_threads: int = 0) -> None:
    """``_process_main``; a worker the system refuses what it needs to start (a thread for its
    pipes, under a pids limit or ``ulimit -u``) exits with ``REFUSED_EXIT``'s code of it, which its
    coordinator names in one line (multiprocessing printed the traceback, then the coordinator
    blamed a script without a ``__main__`` guard)."""
    try:
        _process_main(wid, inbox, outbox, bpe_threads)
    except Exception as exc:
        kind = refused_kind(exc)
        if kind is None:
            raise
        os._exit(REFUSED_EXIT[kind])


def _process_main(wid: int, inbox: Any, outbox: Any, bpe_threads: int = 0) -> None:
    """Entry point of a worker process (forked from the fork server, where its modules are
    imported already, or spawned: it imports them while the coordinator lists the repo), then
    waits for its ``WorkerSpec``. ``bpe_threads``: the threads fastokens may split one batch over
    in this process (its share of the cores; 0: fastokens' default, every core). Each such thread
    keeps its own caches of encoded words (100-200 MB on text whose words do not repeat), so
    processes x threads stays at the cores, not their square."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when to stop
    if hasattr(signal, "SIGHUP"):  # a closed terminal's reaches the whole group: the same
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the fork server ignores it (bolmo_async.preload)
    limit_library_threads()  # spawned: before numpy loads; forked: set by the fork server already
    if bpe_threads > 0:  # read by fastokens once, when it first encodes; a user's own setting wins
        os.environ.setdefault("FASTOKENS_BPE_THREADS", str(bpe_threads))
    outbox = m.Outbox(outbox)

    def receive() -> Any:  # the next task; None once the coordinator has let go of the pipe (or died)
        try:
            return inbox.recv()
        except (EOFError, OSError):
            return None

    holder: list[Worker] = []
    _die_with_parent(lambda: holder[0] if holder else None)
    from .util import keep_freed_pages, prefer_system_allocator, record_absent_imports

    prefer_system_allocator()
    record_absent_imports()
    logging.getLogger().handlers[:] = []
    root = logging.getLogger("bolmo_async")
    root.handlers[:] = [_Forward(wid, outbox.put)]
    root.setLevel(logging.INFO)
    root.propagate = False
    # Everything a task needs, imported while the coordinator lists the repo (not after the spec);
    # nothing to do in a worker forked from the fork server, which imported it all once.
    import_task_modules()

    spec = receive()
    if spec is None:
        outbox.put(m.Exit(wid))
        outbox.close()  # (its thread is a daemon: the interpreter's exit would not wait for it)
        return
    if isinstance(spec, WorkerSpec) and spec.tokenizer.kind == "byte":  # (subword: no faster, its RSS +14%)
        keep_freed_pages()
    worker = Worker(wid, spec, receive, outbox.put)
    holder.append(worker)
    signal.signal(signal.SIGTERM, lambda signum, _: worker.cancel(signum))
    try:
        worker.run()
    except BaseException as exc:
        refused = exhausted(exc)  # a ulimit (no thread for its event loop): the line names it
        said = f"worker {wid}: {refused}" if refused else f"worker {wid} crashed: {type(exc).__name__}: {exc}"
        outbox.put(m.Fatal(wid, "WorkerError", said))
        outbox.put(m.Exit(wid))
    finally:
        # A shard a thread still writes (a stopped file's, a stopped shard task's: they are never
        # joined) goes with this process: its temporaries' names now.
        from .finalizer import abandon_unfinished
        from .outdir.local import abandon_temporaries

        abandon_unfinished()
        abandon_temporaries()
        outbox.close()  # every message is out
    os._exit(0)  # no interpreter teardown: nothing left to wait for

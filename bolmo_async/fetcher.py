"""Fetch: planned files -> decoded -> tokenized -> staged, concurrently and resumably.

One ``aiohttp.ClientSession`` per run; at most ``concurrency`` files in flight (a bounded task
pool); decompression, parsing, tokenizing, hashing and writing run in a worker pool, never on
the event loop. Each planned file is a unit: staged atomically with a completion marker, so a
killed run loses only the files in flight, and a rerun skips the finished ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .decode import BATCH_BYTES, LineDecoder, parquet_batch
from .download import BytesSink, stream
from .errors import (
    AuthError,
    BolmoError,
    DiskSpaceError,
    DownloadError,
    FetchIncomplete,
    IntegrityError,
    StateError,
    TokenizerError,
)
from .hub import HubClient, RetryPolicy, data_files, default_endpoint, listing_digest, make_session, read_token
from .models import Plan, PlannedFile, SkipCounter, check_repo_path, data_suffix
from .progress import Progress
from .staging import Staging, StagingWriter
from .tokenize import AnyTokenizer
from .util import maybe_fsync, raise_if_disk_full, release_free_memory

log = logging.getLogger("bolmo_async")


#: Errors that stop the whole run (every other file would fail the same way).
FATAL: tuple[type[BaseException], ...] = (AuthError, DiskSpaceError, StateError, TokenizerError)


@dataclass(frozen=True)
class FetchOptions:
    output_dir: Path
    concurrency: int = 8
    streaming: bool = True
    endpoint: str | None = None
    retries: int = 8
    read_timeout: float = 60.0  # seconds a read may stall before the connection counts as broken
    progress: bool = True
    workers: int = 0  # worker threads for CPU work; 0 = cores
    #: Told of each file staged (or found staged), with its completion record.
    on_staged: Callable[[PlannedFile, dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= 256:
            raise BolmoError("--concurrency must be between 1 and 256")


class Hasher:
    """sha256 when the listing gave one (LFS), else the git blob sha1 of the listing's oid."""

    def __init__(self, pf: PlannedFile):
        self.pf = pf
        if pf.sha256:
            self._h = hashlib.sha256()
        else:
            self._h = hashlib.sha1(f"blob {pf.size}\0".encode())
        self.size = 0

    def update(self, data: bytes) -> None:
        self._h.update(data)
        self.size += len(data)

    def verify(self) -> str:
        digest = self._h.hexdigest()
        expected = self.pf.sha256 or self.pf.oid
        if self.size != self.pf.size or (expected and digest != expected):
            raise IntegrityError(
                f"{self.pf.path}: got {self.size} bytes with hash {digest[:12]}…, the listing says "
                f"{self.pf.size} bytes, {str(expected)[:12]}…"
            )
        return digest


class Processor:
    """Decodes, tokenizes and stages one planned file. Thread-safe against ``abort``."""

    def __init__(self, pf: PlannedFile, staging: Staging, tokenizer: AnyTokenizer, progress: Progress | None):
        self.pf = pf
        self.staging = staging
        self.tokenizer = tokenizer
        self.progress = progress
        self.suffix = data_suffix(pf.path) or ""
        self._lock = threading.Lock()
        self._aborted = False
        self._writer: StagingWriter | None = None
        self._new()

    def _new(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        self.skips = SkipCounter()
        self.hasher = Hasher(self.pf)
        self.decoder = LineDecoder(self.pf.path, self.suffix, self.skips, limit=self.pf.limit)
        self._writer = self.staging.writer(self.pf, self.tokenizer.info.fingerprint, self.tokenizer.info.kind)
        self.sha256: str | None = None
        for _, fut in getattr(self, "_inflight", ()):
            fut.cancel()
        self._inflight: deque[tuple[pa.RecordBatch, Future[pa.Array]]] = deque()
        self._small: list[pa.RecordBatch] = []  # small batches (parquet row groups) waiting to be coalesced
        self._small_bytes = 0

    # -- Sink protocol (streaming) ------------------------------------------------------
    def feed(self, data: bytes) -> None:
        with self._lock:
            self._check()
            self.hasher.update(data)
            for batch in self.decoder.feed(data):
                self._emit(batch)

    def reset(self) -> None:
        with self._lock:
            self._check()
            self._new()

    def verify(self) -> None:
        with self._lock:
            self._check()
            self.sha256 = self.hasher.verify()
            for batch in self.decoder.finish():
                self._emit(batch)

    # -- local files (--no-streaming, whole parquet) -------------------------------------
    def process_local(self, path: Path, sha: str) -> None:
        with self._lock:
            self._check()
            self.sha256 = sha
        if self.suffix == ".parquet":
            self._parquet_local(path)  # takes the lock per row group
            return
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                with self._lock:  # per block, so that abort() never waits for a whole file
                    self._check()
                    for batch in self.decoder.feed(block):
                        self._emit(batch)
                    if self.decoder.done:
                        break
        with self._lock:
            self._check()
            for batch in self.decoder.finish():
                self._emit(batch)

    def _parquet_local(self, path: Path) -> None:
        try:
            pfile = pq.ParquetFile(str(path), page_checksum_verification=True)
        except (pa.ArrowException, OSError) as exc:
            self.skips.add("corrupt_file", f"{self.pf.path}: not a parquet file ({exc})")
            return
        for i in select_row_groups(pfile.metadata, self.pf.limit):
            self.parquet_row_group(pfile, i)

    def parquet_row_group(self, pfile: pq.ParquetFile, i: int, record_failure: bool = True) -> bool:
        """Decode and stage row group ``i``; False if it is unreadable (counted when ``record_failure``)."""
        with self._lock:
            self._check()
            first = sum(pfile.metadata.row_group(j).num_rows for j in range(i))
            cols = [c for c in ("id", "text") if c in pfile.schema_arrow.names]
            try:
                table = pfile.read_row_group(i, columns=cols)
            except (pa.ArrowException, OSError) as exc:
                if record_failure:
                    n = pfile.metadata.row_group(i).num_rows
                    self.skips.add("corrupt_row_group", f"{self.pf.path}: row group {i} ({exc})", n=n)
                return False
            self._emit(parquet_batch(table, self.pf.path, first, self.skips))
            return True

    # -- common --------------------------------------------------------------------------
    def _emit(self, batch: pa.RecordBatch) -> None:
        """Tokenize ``batch``: small batches (parquet row groups) are coalesced to ``BATCH_BYTES``
        first; batches are written in order, up to ``tokenizer.inflight`` kept in flight."""
        if batch.num_rows:
            self._small.append(batch)
            self._small_bytes += batch.column("text").nbytes
        if self._small_bytes >= BATCH_BYTES:
            self._submit_small()

    def _submit_small(self) -> None:
        if not self._small:
            return
        if len(self._small) == 1:
            whole = self._small[0]
        else:
            whole = pa.Table.from_batches(self._small).combine_chunks().to_batches()[0]
        self._small, self._small_bytes = [], 0
        self._inflight.append((whole, self.tokenizer.submit(whole.column("text"))))
        # Write what is done (without waiting), then wait while too many are in flight: results
        # never sit in memory longer than needed.
        while self._inflight and (len(self._inflight) > self.tokenizer.inflight or self._inflight[0][1].done()):
            self._write_oldest()

    def _write_oldest(self) -> None:
        batch, fut = self._inflight.popleft()
        assert self._writer is not None
        tokens = self._writer.write(batch.column("id"), batch.column("loc"), fut.result())
        release_free_memory()
        if self.progress:
            self.progress.add_documents(batch.num_rows, tokens)

    def _check(self) -> None:
        if self._aborted:
            raise asyncio.CancelledError()

    def commit(self) -> dict[str, Any]:
        with self._lock:
            self._check()
            self._submit_small()
            while self._inflight:
                self._write_oldest()
            assert self._writer is not None
            if self.skips.total:
                for reason, examples in self.skips.examples.items():
                    log.warning(
                        "%s: skipped %d document(s): %s (e.g. %s)",
                        self.pf.path,
                        self.skips.counts[reason],
                        reason,
                        "; ".join(examples),
                    )
            rec = self._writer.commit({"sha256": self.sha256}, self.skips)
            self._writer = None
            return rec

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            for _, fut in self._inflight:
                fut.cancel()
            self._inflight.clear()
            if self._writer is not None:
                self._writer.abort()
                self._writer = None


def select_row_groups(meta: pq.FileMetaData, limit: int | None) -> list[int]:
    """All row groups, or whole row groups while their bytes fit in ``limit`` (at least one)."""
    if limit is None:
        return list(range(meta.num_row_groups))
    out: list[int] = []
    used = 0
    for i in range(meta.num_row_groups):
        lo, hi = row_group_span(meta, i)
        if out and used + (hi - lo) > limit:
            break
        out.append(i)
        used += hi - lo
        if used >= limit:
            break
    return out


def row_group_span(meta: pq.FileMetaData, i: int) -> tuple[int, int]:
    rg = meta.row_group(i)
    lo, hi = None, 0
    for c in range(rg.num_columns):
        col = rg.column(c)
        start = col.data_page_offset
        if col.has_dictionary_page and col.dictionary_page_offset is not None and col.dictionary_page_offset > 0:
            start = min(start, col.dictionary_page_offset)
        lo = start if lo is None else min(lo, start)
        hi = max(hi, start + col.total_compressed_size)
    return (lo or 4), hi


class SparseFile(io.RawIOBase):
    """A read-only file of ``size`` bytes of which only some ranges are known (parquet over HTTP)."""

    def __init__(self, size: int):
        self.size = size
        self.parts: list[tuple[int, bytes]] = []
        self._pos = 0

    def add(self, start: int, data: bytes) -> None:
        self.parts.append((start, data))

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = offset if whence == 0 else self._pos + offset if whence == 1 else self.size + offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self.size - self._pos
        n = min(n, self.size - self._pos)
        for start, data in reversed(self.parts):
            if start <= self._pos and self._pos + n <= start + len(data):
                out = data[self._pos - start : self._pos - start + n]
                self._pos += n
                return out
        raise OSError(f"bytes {self._pos}..{self._pos + n} were not fetched")

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class Fetcher:
    def __init__(self, plan: Plan, opts: FetchOptions, tokenizer: AnyTokenizer):
        self.plan = plan
        self.opts = opts
        self.tokenizer = tokenizer
        self.staging = Staging(opts.output_dir)
        self.failures: dict[str, str] = {}
        self.progress: Progress | None = None

    async def run(self, files: list[PlannedFile]) -> None:
        retry = RetryPolicy(max_attempts=self.opts.retries, read_timeout=self.opts.read_timeout)
        endpoint = default_endpoint(self.opts.endpoint or self.plan.endpoint)
        cores = os.cpu_count() or 2
        # Subword BPE runs in worker processes: more threads keep decoding while some wait on them.
        workers = self.opts.workers or (2 * cores if self.tokenizer.info.kind == "subword" else max(2, cores))
        executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bolmo-cpu")
        # One marker read per file (thousands on a large plan): not on the event loop.
        staged = await asyncio.get_running_loop().run_in_executor(
            executor, lambda: {pf.key: rec for pf in files if (rec := self.staging.done(pf)) is not None}
        )
        todo = [pf for pf in files if pf.key not in staged]
        if self.opts.on_staged is not None:
            for pf in files:
                if pf.key in staged:
                    self.opts.on_staged(pf, staged[pf.key])
        total = sum(pf.size for pf in todo)
        async with make_session(self.opts.concurrency, retry) as session:
            client = HubClient(session, endpoint=endpoint, repo_id=self.plan.repo_id, token=read_token(), retry=retry)
            await self._check_listing(client)
            with Progress(
                len(todo), total, enabled=self.opts.progress, kind=f"{self.tokenizer.info.kind} tokens"
            ) as progress:
                self.progress = progress
                try:
                    await self._pool(client, todo, executor)
                finally:
                    executor.shutdown(wait=True, cancel_futures=True)

    async def _check_listing(self, client: HubClient) -> None:
        """The pinned commit must still list the files the plan was made from."""
        files = data_files(await client.list_files(self.plan.commit))
        digest = listing_digest(files)
        if digest != self.plan.listing_digest:
            raise StateError(
                f"The listing of {self.plan.repo_id}@{self.plan.commit[:12]} changed since the plan was made "
                f"(digest {digest[:12]} != {self.plan.listing_digest[:12]}). Rerun with --force to plan again."
            )

    async def _pool(self, client: HubClient, todo: list[PlannedFile], executor: ThreadPoolExecutor) -> None:
        pending: dict[asyncio.Task[None], PlannedFile] = {}
        queue = iter(todo)
        try:
            while True:
                while len(pending) < self.opts.concurrency:
                    pf = next(queue, None)
                    if pf is None:
                        break
                    pending[asyncio.create_task(self._one(client, pf, executor), name=pf.path)] = pf
                if not pending:
                    break
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    pf = pending.pop(task)
                    exc = task.exception()
                    if exc is None:
                        continue
                    if isinstance(exc, FATAL):
                        raise exc
                    if isinstance(exc, BolmoError):
                        log.error("failed: %s", exc)
                        self.failures[pf.path] = str(exc)
                        continue
                    raise exc
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _one(self, client: HubClient, pf: PlannedFile, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        assert self.progress is not None
        # Built here, not in a worker: a cancelled executor call would leave its temporary file behind.
        proc = Processor(pf, self.staging, self.tokenizer, self.progress)
        try:
            url = client.resolve_url(self.plan.commit, pf.path)
            what = f"{pf.path}"
            suffix = data_suffix(pf.path) or ""
            if not self.opts.streaming or (suffix == ".parquet" and pf.whole):
                raw, sha = await self._raw(client, url, pf, executor)
                try:
                    await loop.run_in_executor(executor, proc.process_local, raw, sha)
                finally:
                    if self.opts.streaming:
                        with contextlib.suppress(OSError):
                            raw.unlink()
            elif suffix == ".parquet":
                await self._parquet_ranges(client, url, pf, proc, executor)
            else:
                await stream(
                    client,
                    url,
                    proc,
                    what=what,
                    executor=executor,
                    on_bytes=self.progress.add_bytes,
                    verify=proc.verify,
                )
            rec = await loop.run_in_executor(executor, proc.commit)
            self.progress.file_done(sum(rec["skipped"]["counts"].values()))
            if self.opts.on_staged is not None:
                self.opts.on_staged(pf, rec)
        except BaseException:
            proc.abort()  # waits at most for the one batch a worker may be processing
            raise

    async def _raw(
        self, client: HubClient, url: str, pf: PlannedFile, executor: ThreadPoolExecutor
    ) -> tuple[Path, str]:
        """The whole file on disk, verified: ``raw/<path>`` (kept) or a temporary (streaming)."""
        assert self.progress is not None
        base = Path(self.opts.output_dir)
        if self.opts.streaming:
            dest = base / "staging" / f".{pf.key}.raw"
        else:
            dest = base / "raw" / check_repo_path(pf.path)
            if dest.exists() and dest.stat().st_size == pf.size:
                self.progress.add_bytes(pf.size)
                return dest, pf.sha256 or pf.oid
        dest.parent.mkdir(parents=True, exist_ok=True)
        sink = RawFileSink(pf, dest)
        try:
            await stream(
                client, url, sink, what=pf.path, executor=executor, on_bytes=self.progress.add_bytes, verify=sink.verify
            )
        except BaseException:
            sink.discard()
            raise
        return dest, sink.sha or ""

    async def _parquet_ranges(
        self, client: HubClient, url: str, pf: PlannedFile, proc: Processor, executor: ThreadPoolExecutor
    ) -> None:
        """A parquet prefix: the footer, then only the row groups needed, by Range requests.

        A prefix cannot be checked against the file's sha256, so bytes that do not decode (or fail
        parquet's page checksums) are fetched again, twice, before they are counted as corrupt.
        """
        loop = asyncio.get_running_loop()
        attempts = 3
        for attempt in range(1, attempts + 1):
            if await self._parquet_ranges_once(client, url, pf, proc, executor, final=attempt == attempts):
                return
            log.warning(
                "%s: parquet bytes did not decode, fetching again [retry %d/%d]", pf.path, attempt, attempts - 1
            )
            await loop.run_in_executor(executor, proc.reset)

    async def _parquet_ranges_once(
        self, client: HubClient, url: str, pf: PlannedFile, proc: Processor, executor: ThreadPoolExecutor, final: bool
    ) -> bool:
        assert self.progress is not None
        loop = asyncio.get_running_loop()
        sparse = SparseFile(pf.size)
        tail_len = min(pf.size, 64 * 1024)
        tail = BytesSink()
        await stream(
            client, url, tail, what=f"{pf.path} (footer)", start=pf.size - tail_len, end=pf.size, executor=executor
        )
        data = bytes(tail.buf)
        if len(data) < 12 or data[-4:] != b"PAR1":
            if final:
                proc.skips.add("corrupt_file", f"{pf.path}: not a parquet file (no PAR1 footer)")
            return final
        footer_len = int.from_bytes(data[-8:-4], "little")
        if footer_len + 8 > len(data):
            more = BytesSink()
            need = min(pf.size, footer_len + 8)
            await stream(
                client, url, more, what=f"{pf.path} (footer)", start=pf.size - need, end=pf.size, executor=executor
            )
            data = bytes(more.buf)
        sparse.add(pf.size - len(data), data)
        try:  # parsing the footer is CPU work: not on the event loop
            pfile = await loop.run_in_executor(
                executor, functools.partial(pq.ParquetFile, sparse, page_checksum_verification=True)
            )
        except (pa.ArrowException, OSError) as exc:
            if final:
                proc.skips.add("corrupt_file", f"{pf.path}: unreadable parquet footer ({exc})")
            return final
        for i in select_row_groups(pfile.metadata, pf.limit):
            lo, hi = row_group_span(pfile.metadata, i)
            body = BytesSink()
            await stream(
                client,
                url,
                body,
                what=f"{pf.path} (row group {i})",
                start=lo,
                end=hi,
                executor=executor,
                on_bytes=self.progress.add_bytes,
            )
            sparse.add(lo, bytes(body.buf))
            if not await loop.run_in_executor(executor, proc.parquet_row_group, pfile, i, final) and not final:
                return False
        return True


class RawFileSink:
    """Writes a download to a temporary file, hashing it; ``verify`` renames it into place."""

    def __init__(self, pf: PlannedFile, dest: Path):
        self.pf = pf
        self.dest = dest
        self.tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in verify/discard
        self.hasher = Hasher(pf)
        self.sha: str | None = None

    def feed(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as exc:
            raise_if_disk_full(exc, self.tmp)
            raise
        self.hasher.update(data)

    def reset(self) -> None:
        self._f.seek(0)
        self._f.truncate()
        self.hasher = Hasher(self.pf)

    def verify(self) -> None:
        self.sha = self.hasher.verify()
        self._f.flush()
        maybe_fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.dest)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


async def fetch_async(
    plan: Plan, opts: FetchOptions, tokenizer: AnyTokenizer, files: list[PlannedFile] | None = None
) -> Fetcher:
    fetcher = Fetcher(plan, opts, tokenizer)
    Staging(opts.output_dir).clean_temporaries(list(plan.files) if files is None else files)
    await fetcher.run(list(plan.files) if files is None else files)
    if fetcher.failures:
        names = "\n  ".join(f"{p}: {why}" for p, why in sorted(fetcher.failures.items()))
        raise FetchIncomplete(
            f"{len(fetcher.failures)} file(s) failed after retries:\n  {names}\n"
            "Rerun the same command to resume: finished files are kept and only these are fetched again.",
            failed=fetcher.failures,
        )
    return fetcher


__all__ = ["DownloadError", "FetchOptions", "Fetcher", "fetch_async"]

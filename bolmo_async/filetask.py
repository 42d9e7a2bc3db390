"""The unit of work: one planned file -> one staged file + its completion marker.

Done start to finish by whoever runs it (a local worker process, a ``--worker I/N`` share, a
Ray task): download (streamed, with Range resume, retries and verification), decompress,
parse, tokenize, stage. CPU work runs on the worker's threads, never on its event loop; only
small results (the completion record, skip counts) leave the worker.

A file already staged is checked against its marker (size and XXH3-128 checksum of the staged file)
before it is trusted; a damaged one is fetched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import io
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .decode import BATCH_BYTES, DEFAULT_TEXT_FIELD, Docs, LineDecoder, missing_field_error, parquet_batch
from .download import BytesSink, Link, fetch_file, listing_mismatch, stream
from .errors import DiskSpaceError, IntegrityError, OfflineError, OutputError, RangeIgnored, Retry, exhausted
from .finalizer import LayoutBuilder, Piece, ShardWriter, _write_piece
from .hub import HubClient
from .messages import LayoutAt
from .models import PlannedFile, SkipCounter, check_repo_path, data_suffix
from .outdir import RAW, OutputDir
from .retry import RateWait, retrying
from .staging import Staging, StagingWriter, unverified_prefix
from .tokenize import AnyTokenizer
from .util import DecodingSlot, release_free_memory, sha256_file

log = logging.getLogger("bolmo_async")


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
        if self.size != self.pf.size or digest != expected:
            raise IntegrityError(  # the caller names the file
                f"got {self.size} bytes with hash {digest[:12]}…, the listing says {self.pf.size} bytes, {str(expected)[:12]}…"
            )
        return digest


@dataclass(frozen=True)
class TaskContext:
    """What every file task of one worker shares."""

    client: HubClient
    commit: str
    staging: Staging
    tokenizer: AnyTokenizer
    executor: Executor
    streaming: bool = True
    #: Read a JSON-lines prefix's whole file to check its hash (``models.verifies_prefixes``).
    verify_prefixes: bool = True
    max_document_bytes: int = 0
    text_field: str = "text"
    id_field: str = "id"
    on_bytes: Callable[[int], None] | None = None
    on_documents: Callable[[int, int], None] | None = None
    link: Link | None = None  # the worker's connections for file bodies
    decoding: DecodingSlot | None = None  # files decoding at once; the others transfer ahead
    #: HF_HUB_OFFLINE: a file not staged is read from its download kept in raw/ (checked against
    #: the listing as a --no-streaming run's), and left there; never requested.
    offline: bool = False


#: What a file's worker wrote of the shards while staging it: index -> (pieces, record).
ShardsWritten = dict[int, tuple[list[Piece], dict[str, Any]]]


class ShardsAhead:
    """The shards one file fills, written while the file is staged, when its worker knows where
    its documents start in the layout (``messages.LayoutAt``: every file before it is laid out).
    Without it a file's shards wait until it is staged whole, then its worker writes them
    while the disk alone is busy (one large file: seconds at the end of the run).

    Each staged batch is laid out by the same ``LayoutBuilder`` as ``finalize``, from the same
    lengths, and its pieces are written from the batch in memory by the same code as a shard
    written later from the staging (``finalizer._write_piece``): byte-identical. On a thread of
    its own, a bounded queue behind the decoder (``DEPTH`` batches), so that the decoder does
    not wait for the disk. Temporaries only: ``commit`` puts them in place once the file is
    verified and staged, and the coordinator keeps a shard only when its pieces are exactly the
    layout's (else it is written again). The shard still open at the file's end is complete only
    for the plan's last file; otherwise it is dropped (the next file's pieces go in it too)."""

    #: Staged batches waiting for the thread at most (about ``BATCH_BYTES`` of text each): the
    #: decoder goes on through a moment of a busy disk.
    DEPTH = 8

    def __init__(
        self,
        out: OutputDir,
        unit: int,
        layout: LayoutAt,
        arrows: dict[int, str],
        srcs: dict[int, str],
        eos: int,
    ):
        self.out = out
        self.unit = unit
        self.layout = layout
        self.arrows = arrows  # staged file of each unit before it in the open shard
        self.srcs = srcs  # csv ``src`` of each unit, this one's included
        self.eos = eos
        self._builder = LayoutBuilder.resumed(layout.bound, layout.shard, layout.used, layout.pieces)
        self._queue: queue.Queue[tuple[int, pa.RecordBatch, np.ndarray] | None] = queue.Queue(self.DEPTH)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # the writers: the thread (on error), finish/commit, abort
        self._open: tuple[int, list[Piece], ShardWriter] | None = None
        self._done: list[tuple[int, list[Piece], ShardWriter]] = []
        self._error: BaseException | None = None

    def put(self, index: int, batch: pa.RecordBatch, lengths: np.ndarray) -> None:
        """Staged batch ``index`` of the file (``lengths``: its tokens per document), in order."""
        if self._stop.is_set() or self._error is not None:
            return  # given up: the coordinator hands these shards out after the file
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bolmo-shards-ahead", daemon=True)
            self._thread.start()
        while not self._stop.is_set():
            try:
                self._queue.put((index, batch, lengths), timeout=0.5)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        # Holds ``_mutex`` while it writes, so that ``abort`` drops the writers only between pieces.
        try:
            if self.layout.pieces:  # the open shard's pieces of earlier files, from their staging
                with self._mutex:
                    self._writer_for(self.layout.shard, carried=True)
                    for piece in self.layout.pieces:
                        self._check()
                        assert self._open is not None
                        with self.out.open_input(self.arrows[piece.unit]) as source:
                            batch = pa.ipc.open_file(source).get_batch(piece.batch)
                            _write_piece(self._open[2], piece, batch, self.srcs[piece.unit], self.eos)
                            del batch
            while True:
                try:
                    item = self._queue.get(timeout=0.5)
                except queue.Empty:
                    self._check()
                    continue
                if item is None:
                    with self._mutex:
                        if self._stop.is_set():
                            self._drop()
                    return
                index, batch, lengths = item
                with self._mutex:
                    for k, piece in self._builder.add(self.unit, index, lengths):
                        self._check()
                        self._writer_for(k)
                        assert self._open is not None
                        self._open[1].append(piece)
                        _write_piece(self._open[2], piece, batch, self.srcs[self.unit], self.eos)
                del batch, item
        except BaseException as exc:
            self._error = exc
            with self._mutex:
                self._drop()
            while True:  # a producer blocked on a full queue goes on
                try:
                    if self._queue.get(timeout=0.5) is None:
                        return
                except queue.Empty:
                    if self._stop.is_set():
                        return

    def _check(self) -> None:
        if self._stop.is_set():
            raise InterruptedError("shards ahead stopped")

    def _writer_for(self, k: int, carried: bool = False) -> None:
        """The writer of shard ``k`` (the one before it is complete: finished, not in place)."""
        if self._open is not None and self._open[0] == k:
            return
        if self._open is not None:
            self._open[2].finish()
            self._done.append(self._open)
            self._open = None
        self._open = (k, list(self.layout.pieces) if carried else [], ShardWriter(self.out, k))
        self._check()  # stopped while it was made: ``abort`` may have missed it (dropped by the caller)

    def finish(self) -> None:
        """After the file's last batch: wait for every piece to be written. A disk that is full or
        refuses stops the run (as any shard write); any other error only drops these shards."""
        if self._thread is None:
            return
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=0.5)
                break
            except queue.Full:
                continue
        self._thread.join()
        with self._mutex:
            error, self._error = self._error, None
            if error is None and self._stop.is_set():
                error = InterruptedError("shards ahead stopped")
            try:
                if error is None and self._open is not None:
                    if self.layout.last:
                        self._open[2].finish()
                        self._done.append(self._open)
                    else:
                        self._open[2].abort()
                    self._open = None
            except BaseException as exc:
                error = exc
            if error is not None:
                self._drop()
                if isinstance(error, DiskSpaceError | OutputError):
                    raise error
                log.debug("shards ahead of %s dropped (%s: %s)", self.srcs[self.unit], type(error).__name__, error)

    def commit(self) -> ShardsWritten:
        """After ``finish`` and the file's staging commit: the finished shards in place."""
        written: ShardsWritten = {}
        with self._mutex:
            try:
                while self._done and not self._stop.is_set():
                    k, pieces, writer = self._done[0]
                    written[k] = (pieces, writer.commit())
                    self._done.pop(0)
            except (DiskSpaceError, OutputError):
                self._drop()
                raise
            except Exception as exc:
                log.debug("shards ahead of %s: %s; the others are written after it", self.srcs[self.unit], exc)
            self._drop()
        return written

    def abort(self) -> None:
        """Stop now, from any thread, never waiting: the temporaries go now. When a piece is being
        written their names are unlinked (the piece lands in unlinked files) and the thread drops
        the writers at its next piece: a process that exits meanwhile (a stopped worker does not
        join its threads) leaves nothing behind."""
        self._stop.set()
        if self._mutex.acquire(blocking=False):
            try:
                self._drop()
            finally:
                self._mutex.release()
            return
        busy = self._open
        for _, _, writer in [*self._done, *([busy] if busy is not None else [])]:
            writer.unlink_early()

    def _drop(self) -> None:
        """(holding ``_mutex``) every temporary of these shards goes."""
        for _, _, writer in self._done:
            writer.abort()
        self._done.clear()
        if self._open is not None:
            self._open[2].abort()
            self._open = None


class Processor:
    """Decodes, tokenizes and stages one planned file. Thread-safe against ``abort``.

    ``ahead``: makes the ``ShardsAhead`` of this file (its shards written while it is staged)."""

    def __init__(self, pf: PlannedFile, ctx: TaskContext, ahead: Callable[[], ShardsAhead] | None = None):
        self.pf = pf
        self.ctx = ctx
        self.suffix = data_suffix(pf.path) or ""
        self._lock = threading.Lock()
        self._aborted = False
        self._writer: StagingWriter | None = None
        self._make_ahead = ahead
        self._ahead: ShardsAhead | None = None
        #: Set by the task that asks only a JSON-lines prefix's bytes (``wants_more`` then says
        #: when the decoder has its documents).
        self.prefix_read = False
        self.shards: ShardsWritten = {}
        self._new()

    def _new(self) -> None:
        if self._writer is not None:
            self._writer.abort()
        if self._ahead is not None:
            self._ahead.abort()
        self._ahead = self._make_ahead() if self._make_ahead is not None else None
        self.skips = SkipCounter()
        self.hasher = Hasher(self.pf)
        self.decoder = LineDecoder(
            self.pf.path,
            self.suffix,
            self.skips,
            limit=self.pf.limit,
            max_document_bytes=self.ctx.max_document_bytes,
            text_field=self.ctx.text_field,
            id_field=self.ctx.id_field,
        )
        info = self.ctx.tokenizer.info
        self._writer = self.ctx.staging.writer(self.pf, info.fingerprint, info.kind)
        self.sha256: str | None = None
        self.lengths: list[np.ndarray] = []  # of the staged batches, once committed
        self._small: list[Docs] = []  # small batches (parquet row groups) waiting to be coalesced
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

    def wants_more(self) -> bool:
        """The decoder still takes bytes (a prefix with no whole document yet); read anywhere."""
        return not self.decoder.done

    def verify(self) -> None:
        with self._lock:
            self._check()
            if self.prefix_read and self.hasher.size < self.pf.size:
                # Only the prefix's bytes were asked (``fetch_file``'s span): no whole file to
                # check against the listing's hash, as for a parquet prefix.
                self.sha256 = None
            else:
                self.sha256 = self.hasher.verify()
            for batch in self.decoder.finish():
                self._emit(batch)

    def verify_and_commit(self) -> dict[str, Any]:
        """``verify``, then ``commit`` once it passed: one trip to a thread instead of two (each
        costs thread handoffs, about 0.15 ms of CPU here: per file, on many small files, that
        counts). An ``IntegrityError`` is the verify's, as before: nothing is staged then."""
        self.verify()
        return self.commit()

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
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 8))
                too_large = footer_too_large(self.pf.path, f.read())
            if too_large:
                self.skips.add("corrupt_file", too_large)
                return
            pfile = pq.ParquetFile(str(path), page_checksum_verification=True)
        except (pa.ArrowException, OSError) as exc:
            if refused := exhausted(exc, self.pf.path):  # the system's, not the file's: it fails
                raise refused from exc
            self.skips.add("corrupt_file", f"{self.pf.path}: not a parquet file ({exc})")
            return
        self.parquet_row_groups(
            pfile, select_row_groups(pfile.metadata, self.pf.limit), row_group_firsts(pfile.metadata)
        )

    def parquet_row_groups(
        self, pfile: pq.ParquetFile, groups: list[int], firsts: list[int], record_failure: bool = True
    ) -> bool:
        """``parquet_row_group`` of each of ``groups`` (in file order), consecutive small row groups
        read by one pyarrow reader: a reader a row group cost 0.15 ms, 75,000 one-row row groups
        23 s. A run that does not read is read again a row group at a time (which counts what is
        lost). False if a row group did not read: at once unless ``record_failure`` (then the others
        are read, as ``parquet_row_group`` counts what it lost)."""
        meta = pfile.metadata
        names = pfile.schema_arrow.names
        cols = [c for c in (self.ctx.id_field, self.ctx.text_field) if c in names]
        at, ok = 0, True
        while at < len(groups):
            run, rows, size = [groups[at]], 0, 0
            first_small = small_row_group(meta.row_group(groups[at]), cols) if self.ctx.text_field in names else None
            if first_small is not None:
                rows, size = first_small
                while at + len(run) < len(groups) and groups[at + len(run)] == run[-1] + 1:
                    nxt = small_row_group(meta.row_group(run[-1] + 1), cols)
                    if nxt is None or rows + nxt[0] > PARQUET_RUN_ROWS or size + nxt[1] > BATCH_BYTES:
                        break
                    run.append(run[-1] + 1)
                    rows, size = rows + nxt[0], size + nxt[1]
            if len(run) == 1 or not rows or not self._parquet_run(pfile, run, firsts[run[0]], rows, cols):
                for i in run:
                    if not self.parquet_row_group(pfile, i, firsts[i], record_failure):
                        ok = False
                        if not record_failure:
                            return False
            at += len(run)
        return ok

    def _parquet_run(self, pfile: pq.ParquetFile, run: list[int], first: int, rows: int, cols: list[str]) -> bool:
        """Decode and stage consecutive small row groups ``run`` (``rows`` rows from row ``first``)
        read as one; False, with nothing staged, if they do not read."""
        try:
            batches = list(pfile.iter_batches(batch_size=rows, row_groups=run, columns=cols, use_threads=False))
        except (pa.ArrowException, OSError) as exc:
            if refused := exhausted(exc, self.pf.path):
                raise refused from exc
            return False
        if sum(b.num_rows for b in batches) != rows:
            return False
        done = 0
        for batch in batches:
            self._stage_parquet(batch, first + done)
            done += batch.num_rows
        return True

    def _stage_parquet(self, batch: pa.RecordBatch, first: int) -> None:
        """Stage one decoded parquet batch whose first row is ``first``: under the lock, per batch,
        so that ``abort()`` never waits for a whole row group (or run of them)."""
        with self._lock:
            self._check()
            self._emit(
                parquet_batch(
                    pa.Table.from_batches([batch]),
                    self.pf.path,
                    first,
                    self.skips,
                    self.ctx.max_document_bytes,
                    self.ctx.text_field,
                    self.ctx.id_field,
                )
            )

    def parquet_row_group(self, pfile: pq.ParquetFile, i: int, first: int, record_failure: bool = True) -> bool:
        """Decode and stage row group ``i``, whose first row is ``first`` (``row_group_firsts``);
        False if it is unreadable (the rows not read are counted when ``record_failure``). Read in
        batches of about ``BATCH_BYTES`` of text, sized from the footer's uncompressed sizes, so a
        row group of gigabytes (from a few KB of file) is never decompressed whole: only a batch at
        a time, its oversized documents skipped and counted."""
        rg = pfile.metadata.row_group(i)
        names = pfile.schema_arrow.names
        if self.ctx.text_field not in names:
            if self.ctx.text_field != DEFAULT_TEXT_FIELD:
                # a field the user named that this data lacks: stops the run, naming the columns
                raise missing_field_error(self.pf.path, self.ctx.text_field, names, "columns")
            with self._lock:
                self._check()
                self.skips.add("missing_text", f"{self.pf.path}: no {self.ctx.text_field!r} column", n=rg.num_rows)
            return True
        cols = [c for c in (self.ctx.id_field, self.ctx.text_field) if c in names]
        bomb = parquet_bomb(rg, cols)
        if bomb:
            with self._lock:
                self._check()
                self.skips.add("oversized_row_group", f"{self.pf.path}: row group {i}: {bomb}", n=rg.num_rows)
            return True
        batches = pfile.iter_batches(
            batch_size=parquet_batch_rows(rg, cols), row_groups=[i], columns=cols, use_threads=False
        )
        done = 0
        while True:
            try:
                batch = next(batches, None)
            except (pa.ArrowException, OSError) as exc:
                if refused := exhausted(exc, self.pf.path):  # never counted as the row group's damage
                    raise refused from exc
                if record_failure:
                    with self._lock:
                        self._check()
                        self.skips.add(
                            "corrupt_row_group", f"{self.pf.path}: row group {i} ({exc})", n=rg.num_rows - done
                        )
                return False
            if batch is None:
                return True
            self._stage_parquet(batch, first + done)
            done += batch.num_rows

    # -- common --------------------------------------------------------------------------
    def _emit(self, batch: Docs) -> None:
        """Tokenize and stage ``batch``; small batches (parquet row groups) are coalesced to
        ``BATCH_BYTES`` first, a document counting ``DOC_OVERHEAD`` bytes more than its text."""
        if batch.num_rows:
            self._small.append(batch)
            self._small_bytes += batch.text_chars + DOC_OVERHEAD * batch.num_rows
        if self._small_bytes >= BATCH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self._small:
            return
        whole = Docs.concat(self._small)
        self._small, self._small_bytes = [], 0
        keep = self.ctx.tokenizer.keep(whole.texts)
        if keep is not None:  # documents the tokenizer refuses (a BPE word of megabytes)
            ids, locs = whole.ids, whole.locs
            for i in np.flatnonzero(~keep).tolist():
                self.skips.add("word_too_long", f"{self.pf.path}:{locs[i].as_py()} ({ids[i].as_py()})")
            whole = whole.filter(keep)
            if not whole.num_rows:
                return
        tokens_col = self.ctx.tokenizer.tokens_column(whole.texts)
        assert self._writer is not None
        tokens = self._writer.write(whole.ids, whole.locs, tokens_col)
        if self._ahead is not None:
            batch = pa.RecordBatch.from_arrays([whole.ids, whole.locs, tokens_col], schema=self._writer.schema)
            self._ahead.put(len(self._writer.lengths) - 1, batch, self._writer.lengths[-1])
            del batch
        del tokens_col
        release_free_memory()
        if self.ctx.on_documents:
            self.ctx.on_documents(whole.num_rows, tokens)

    def _check(self) -> None:
        if self._aborted:
            raise asyncio.CancelledError()

    def commit(self) -> dict[str, Any]:
        with self._lock:
            self._check()
            self._flush()
            if self._ahead is not None:
                self._ahead.finish()
            assert self._writer is not None
            # A file that could not be read at all (no parquet footer...) holds an unknown number of
            # documents: it is not a skipped document but an unreadable file, said as such (once).
            unreadable = self.skips.examples.pop("corrupt_file", None)
            self.skips.counts.pop("corrupt_file", None)
            if self.skips.total:
                for reason, examples in self.skips.examples.items():
                    log.warning(
                        "%s: skipped %d document(s): %s (e.g. %s)",
                        self.pf.path,
                        self.skips.counts[reason],
                        reason,
                        "; ".join(examples),
                    )
            extra: dict[str, Any] = {"sha256": self.sha256}
            if self.sha256 is None and self.prefix_read:
                extra["read_bytes"] = self.hasher.size  # of the file: its prefix, not verified
            if unreadable is not None:
                extra["unreadable"] = unreadable[0]
                log.warning("%s: could not be read at all, no documents taken from it: %s", self.pf.path, unreadable[0])
            rec = self._writer.commit(extra, self.skips)
            self.lengths = self._writer.lengths
            self._writer = None
            if self._ahead is not None:  # once the file is staged: the shards it filled in place
                self.shards = self._ahead.commit()
                self._ahead = None
            return rec

    def abort(self) -> None:
        """Stop this file now, from the event loop: never waits for a step in progress (one BPE
        encode can take seconds). A busy thread stops at its next step; the temporary goes now."""
        self._aborted = True
        if self._ahead is not None:
            self._ahead.abort()
        if self._lock.acquire(blocking=False):
            try:
                self._drop_writer()
            finally:
                self._lock.release()
            return
        # A local temporary goes now (the busy thread writes on into an unlinked file, then drops
        # it); an object-store upload is aborted when the thread lets go (or dies with its process).
        writer = self._writer
        if writer is not None:
            writer.unlink_early()
        threading.Thread(target=self._drop_when_idle, name="bolmo-abort", daemon=True).start()

    def _drop_when_idle(self) -> None:
        with self._lock:
            self._drop_writer()

    def _drop_writer(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


#: A column chunk larger than this (uncompressed) that its file holds more than
#: ``PARQUET_MAX_RATIO`` times smaller is a bomb: its pages (which pyarrow decompresses whole,
#: and a writer may make as large as the chunk) are never read. Text compresses 3-10x.
PARQUET_MAX_CHUNK = 64 << 20
PARQUET_MAX_RATIO = 100
#: A column chunk compressed more than this is read a row at a time (``parquet_batch_rows``).
PARQUET_DENSE_RATIO = 20


#: Bytes a document counts for besides its text when batches are coalesced (``Processor._emit``):
#: its id, loc and Python objects, and the rows of its shard's .csv.gz. Counting text alone, 1-byte
#: documents made staged batches of a million documents, whose .csv.gz rows alone took finalize
#: past 600 MB (10 million of them: fetch 538 MB, finalize 836 MB peak RSS).
DOC_OVERHEAD = 64


#: Largest parquet footer parsed. pyarrow holds about 12 times a footer in memory (a file of
#: 200,000 one-row row groups: a 41 MB footer, 483 MiB and 71 s to read); a real file's is a few
#: hundred bytes a column chunk, under a MB for a 750 MB file of 1000-row row groups.
PARQUET_MAX_FOOTER = 16 << 20


def footer_too_large(path: str, tail: bytes) -> str | None:
    """Why the parquet file ``path``, whose last bytes are ``tail``, is not read (its footer,
    whose length they give, is over ``PARQUET_MAX_FOOTER``), or None."""
    size = int.from_bytes(tail[-8:-4], "little") if len(tail) >= 8 and tail[-4:] == b"PAR1" else 0
    if size <= PARQUET_MAX_FOOTER:
        return None
    return (
        f"{path}: its parquet footer is {size / 1e6:.0f} MB, over the {PARQUET_MAX_FOOTER >> 20} MiB read (pyarrow "
        "holds about 12 times a footer in memory; a real file's is a few MB at most). Rewrite it with larger row "
        "groups (fewer, larger footer entries), or leave it out with --exclude"
    )


def _chunks(rg: pq.RowGroupMetaData, cols: list[str]) -> list[pq.ColumnChunkMetaData]:
    return [rg.column(c) for c in range(rg.num_columns) if rg.column(c).path_in_schema in cols]


def parquet_bomb(rg: pq.RowGroupMetaData, cols: list[str]) -> str | None:
    """Why the columns ``cols`` of row group ``rg`` must not be read (from the footer), or None."""
    for col in _chunks(rg, cols):
        size, packed = col.total_uncompressed_size, max(col.total_compressed_size, 1)
        if size > PARQUET_MAX_CHUNK and size > PARQUET_MAX_RATIO * packed:
            return (
                f"column {col.path_in_schema!r} is {size / 1e6:.0f} MB of data from {packed / 1e3:.0f} KB "
                f"(compression ratio {size // packed}); not read"
            )
    return None


#: Most rows of consecutive small row groups read as one (``Processor.parquet_row_groups``).
PARQUET_RUN_ROWS = 65536


def small_row_group(rg: pq.RowGroupMetaData, cols: list[str]) -> tuple[int, int] | None:
    """(rows, bytes of ``cols`` decompressed) of a row group small enough to be read with its
    neighbours (its columns under ``BATCH_BYTES``, compressed as text is), else None."""
    size = 0
    for col in _chunks(rg, cols):
        n = col.total_uncompressed_size
        if n > PARQUET_DENSE_RATIO * max(col.total_compressed_size, 1):
            return None
        size += n
    return (rg.num_rows, size) if size <= BATCH_BYTES else None


def parquet_batch_rows(rg: pq.RowGroupMetaData, cols: list[str], target: int = BATCH_BYTES) -> int:
    """Rows a batch of row group ``rg`` holds so that its columns ``cols`` come to about ``target``
    bytes, from the footer's sizes: the average row, or, for a chunk that compresses more than
    text does (``PARQUET_DENSE_RATIO``: a dictionary of one large value repeated on every row is a
    row group a thousand times its file), a row as large as the whole chunk."""
    per_row = 0
    for col in _chunks(rg, cols):
        size = max(col.total_uncompressed_size, 1)
        dense = size > PARQUET_DENSE_RATIO * max(col.total_compressed_size, 1)
        per_row += size if dense else -(-size // max(rg.num_rows, 1))
    return max(1, min(rg.num_rows, 65536, target // max(per_row, 1)))


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


def row_group_firsts(meta: pq.FileMetaData) -> list[int]:
    """The first row of every row group, in one pass over the footer (summing the row groups
    before each one as it came took 70 s on a 7 MB file of 20,000 one-row row groups)."""
    firsts, rows = [], 0
    for i in range(meta.num_row_groups):
        firsts.append(rows)
        rows += meta.row_group(i).num_rows
    return firsts


#: Bytes of consecutive row groups a parquet prefix asks in one Range request (one row group larger
#: than this is asked alone): one request per row group cost a round trip each (thousands for a
#: file of small row groups), and the bytes a request brought are dropped once decoded.
PARQUET_RUN_BYTES = 8 << 20


def row_group_runs(
    meta: pq.FileMetaData, groups: list[int], size: int, run_bytes: int = PARQUET_RUN_BYTES
) -> list[list[int]]:
    """``groups`` (in order) cut into runs of row groups that lie end to end in the file of
    ``size`` bytes, each spanning at most ``run_bytes`` (or one row group): what one Range request
    asks. A row group that does not lie inside the file is a run of its own."""
    runs: list[list[int]] = []
    lo = hi = 0
    for i in groups:
        start, end = row_group_span(meta, i)
        if runs and start == hi and start < end <= size and end - lo <= run_bytes:
            runs[-1].append(i)
            hi = end
        else:
            runs.append([i])
            lo, hi = start, end
    return runs


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

    def add(self, start: int, data: bytes) -> tuple[int, bytes]:
        """Known bytes from ``start``; the part returned is what ``drop`` forgets."""
        part = (start, data)
        self.parts.append(part)
        return part

    def drop(self, part: tuple[int, bytes]) -> None:
        """Forget a part ``add`` returned (a run of row groups, once decoded)."""
        self.parts = [p for p in self.parts if p is not part]

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


class RawFileSink:
    """Writes a download to a new local file (``OutputDir.new_local_file``), hashing it;
    ``verify`` puts it in place."""

    def __init__(self, pf: PlannedFile, dest: Path, out: OutputDir):
        self.pf = pf
        self.dest = dest
        self.out = out
        self._f = out.new_local_file(dest)
        self.hasher = Hasher(pf)
        self.sha: str | None = None

    def feed(self, data: bytes) -> None:
        self._f.write(data)
        self.hasher.update(data)

    def reset(self) -> None:
        self._f.abort()
        self._f = self.out.new_local_file(self.dest)
        self.hasher = Hasher(self.pf)

    def verify(self) -> None:
        self.sha = self.hasher.verify()
        self._f.commit()

    def discard(self) -> None:
        self._f.abort()


def file_matches(path: Path, pf: PlannedFile) -> bool:
    """``path`` holds exactly the listed file (size, then its sha256 or git blob id)."""
    try:
        if path.stat().st_size != pf.size:
            return False
        if pf.sha256:
            return sha256_file(path) == pf.sha256
        h = Hasher(pf)
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        h.verify()
        return True
    except (OSError, IntegrityError):
        return False


#: What a file task gives back: its completion record, the bytes read for it now (None when it
#: was staged already), the tokens per document of each staged batch (the shard layout's input,
#: so that the coordinator never reads a staged file), the shards written while staging it, and
#: whether it was read from its download kept in raw/ (no transfer: not counted as fetched).
TaskResult = tuple[dict[str, Any], int | None, list[np.ndarray], ShardsWritten, bool]


async def run_file_task(
    ctx: TaskContext,
    pf: PlannedFile,
    cdn: str | None = None,
    ahead: Callable[[], ShardsAhead] | None = None,
    clean: bool = False,
) -> TaskResult:
    """Stage ``pf`` unless it is staged and intact (see ``TaskResult``). ``cdn``: the signed URL
    its resolve URL was resolved to ahead, if it was; ``ahead``: makes its ``ShardsAhead`` (the
    shards it fills written while it is staged); ``clean``: first remove what killed runs left of
    it (``Staging.clean_temporaries``; only when no other run may be writing it now)."""
    loop = asyncio.get_running_loop()
    read = [0]
    outer = ctx.on_bytes

    def count(n: int) -> None:
        read[0] += n
        if outer is not None:
            outer(n)

    task_ctx = dataclasses.replace(ctx, on_bytes=count)

    made: list[Processor] = []  # the Processor ``begin`` made, once it is handed over
    dropped = threading.Event()  # the task was stopped meanwhile
    lock = threading.Lock()

    def begin() -> tuple[dict[str, Any] | None, Any]:
        """One trip to a thread: the record and lengths of a staged, intact ``pf`` (just read whole
        for its checksum: its lengths come from the page cache), else its Processor (which makes
        its staging temporary: file I/O, never on the event loop)."""
        if clean:
            ctx.staging.clean_temporaries([pf])
        rec = ctx.staging.checked(pf)
        if rec is not None and (ctx.verify_prefixes or not ctx.streaming) and unverified_prefix(rec):
            rec = None  # staged with its hash unchecked, and this run checks it: staged again
        if rec is not None:
            return rec, ctx.staging.lengths(pf)
        new = Processor(pf, task_ctx, ahead)
        with lock:
            if not dropped.is_set():
                made.append(new)
                return None, new
        new.abort()  # stopped while it was being made: its temporary goes now
        return None, None

    try:
        rec, got = await loop.run_in_executor(ctx.executor, begin)
    except asyncio.CancelledError:  # its thread may go on: what it makes is dropped, by it or here
        with lock:
            dropped.set()
        for made_one in made:
            made_one.abort()
        raise
    if rec is not None:
        return rec, None, got, {}, False
    proc: Processor = got
    ctx = task_ctx
    committed: list[dict[str, Any]] = []  # the record, when staged on the verify's trip to a thread
    local = False  # read from the download kept in raw/
    try:
        url = ctx.client.resolve_url(ctx.commit, pf.path)
        suffix = data_suffix(pf.path) or ""
        if not ctx.streaming or ctx.offline or (suffix == ".parquet" and pf.whole):
            raw, sha, local = await _raw(ctx, url, pf, cdn)
            try:
                await loop.run_in_executor(ctx.executor, proc.process_local, raw, sha)
            finally:
                if ctx.streaming and not local:  # (a kept download, read offline, stays)
                    with contextlib.suppress(OSError):
                        raw.unlink()
        elif suffix == ".parquet":
            try:
                await _parquet_ranges(ctx, url, pf, proc, cdn)
            except RangeIgnored:
                # A server without Range support (some mirrors): the whole file, verified, then
                # the same row groups from it.
                log.info("%s: the server ignores Range requests; reading the whole file", pf.path)
                await loop.run_in_executor(ctx.executor, proc.reset)
                raw, sha, _ = await _raw(ctx, url, pf, cdn)
                try:
                    await loop.run_in_executor(ctx.executor, proc.process_local, raw, sha)
                finally:
                    with contextlib.suppress(OSError):
                        raw.unlink()
        else:
            # A JSON-lines prefix unverified asks only its bytes (the lines complete within them
            # are all it takes), not the whole file: a 0.1% plan of 750 MB files reads ~0.1%.
            proc.prefix_read = not ctx.verify_prefixes and pf.limit is not None and pf.limit < pf.size
            await fetch_file(
                ctx.client,
                url,
                proc,
                what=pf.path,
                size=pf.size,
                executor=ctx.executor,
                on_bytes=ctx.on_bytes,
                verify=lambda: committed.append(proc.verify_and_commit()),
                link=ctx.link,
                decoding=ctx.decoding,
                cdn=cdn,
                span=pf.limit if proc.prefix_read else None,
                more=proc.wants_more,
            )
        rec = committed[0] if committed else await loop.run_in_executor(ctx.executor, proc.commit)
        return rec, read[0], proc.lengths, proc.shards, local
    except BaseException:
        proc.abort()
        raise


async def _raw(ctx: TaskContext, url: str, pf: PlannedFile, cdn: str | None = None) -> tuple[Path, str, bool]:
    """The whole file on local disk, verified: kept (``--no-streaming``) or a temporary (streaming);
    and whether it was there already (a kept download, read without a request)."""
    loop = asyncio.get_running_loop()
    out = ctx.staging.out
    keep = not ctx.streaming or ctx.offline
    dest = out.download_path(pf.key, check_repo_path(pf.path), keep=keep)
    if keep and dest.exists():
        if await loop.run_in_executor(ctx.executor, file_matches, dest, pf):
            if ctx.on_bytes:
                ctx.on_bytes(pf.size)
            return dest, pf.sha256 or pf.oid, True
        if ctx.offline:
            raise OfflineError(
                f"{pf.path}: the kept download {dest} does not match the listing (size or sha256), and "
                "HF_HUB_OFFLINE is set (no request to the Hub): remove it and run this fetch where the Hub is "
                "reachable, or unset HF_HUB_OFFLINE"
            )
        log.warning("%s: the kept download %s does not match the listing; fetching it again", pf.path, dest)
    if ctx.offline:
        raise OfflineError(
            f"{pf.path}: neither staged nor kept in {dest.parent.parent}/, and HF_HUB_OFFLINE is set (no request "
            f"to the Hub): run this fetch where the Hub is reachable (--no-streaming keeps whole files in {RAW}/), "
            "or unset HF_HUB_OFFLINE"
        )
    sink = RawFileSink(pf, dest, out)
    try:
        await fetch_file(
            ctx.client,
            url,
            sink,
            what=pf.path,
            size=pf.size,
            executor=ctx.executor,
            on_bytes=ctx.on_bytes,
            verify=sink.verify,
            link=ctx.link,
            cdn=cdn,
        )
    except BaseException:
        sink.discard()
        raise
    return dest, sink.sha or "", False


async def _parquet_ranges(
    ctx: TaskContext, url: str, pf: PlannedFile, proc: Processor, signed: str | None = None
) -> None:
    """A parquet prefix: the footer, then only the row groups needed, by Range requests.

    A prefix cannot be checked against the file's sha256, so bytes that do not decode (or fail
    parquet's page checksums) are fetched again through the one retry helper (with its backoff),
    ``PARQUET_ATTEMPTS`` times in all, before they are counted as corrupt.
    """
    loop = asyncio.get_running_loop()
    policy = dataclasses.replace(ctx.client.retry, max_attempts=PARQUET_ATTEMPTS)
    tries = [0]
    rate_wait = RateWait(policy)  # (the file's rate-limit waits, all its range reads': at most 600 s in all)

    async def attempt() -> None:
        tries[0] += 1
        if not await _parquet_ranges_once(ctx, url, pf, proc, tries[0] >= PARQUET_ATTEMPTS, signed, rate_wait):
            await loop.run_in_executor(ctx.executor, proc.reset)
            raise Retry("parquet bytes did not decode, fetching again")

    await retrying(policy, pf.path, attempt, retry_on=())


#: Whole reads of a parquet prefix whose bytes do not decode, before they count as corrupt.
PARQUET_ATTEMPTS = 3


async def _parquet_ranges_once(
    ctx: TaskContext,
    url: str,
    pf: PlannedFile,
    proc: Processor,
    final: bool,
    signed: str | None,
    rate_wait: RateWait | None = None,
) -> bool:
    loop = asyncio.get_running_loop()
    sparse = SparseFile(pf.size)
    tail_len = min(pf.size, 64 * 1024)
    tail = BytesSink()
    # The signed URL of the first resolve (or of the one ahead): every later range asks it directly.
    cdn: list[str] = [signed] if signed else []
    totals: list[int] = []  # the server's totals other than the listed size

    async def get(sink: BytesSink, **kw: Any) -> int:
        return await stream(
            ctx.client,
            url,
            sink,
            executor=ctx.executor,
            cdn=cdn[0] if cdn else None,
            resolved=note,
            size=pf.size,  # (a copy of another size is the listing's mismatch, not a broken range)
            rate_wait=rate_wait,
            totals=totals,
            **kw,
        )

    def note(u: str) -> None:
        cdn[:] = [u]

    await get(tail, what=f"{pf.path} (footer)", start=pf.size - tail_len, end=pf.size)
    if totals:  # its footer is not where the listing's size puts it (an unverified read: said, not read)
        raise listing_mismatch(pf.path, totals, pf.size)
    data = bytes(tail.buf)
    if len(data) < 12 or data[-4:] != b"PAR1":
        if final:
            proc.skips.add("corrupt_file", f"{pf.path}: not a parquet file (no PAR1 footer)")
        return final
    footer_len = int.from_bytes(data[-8:-4], "little")
    too_large = footer_too_large(pf.path, data)
    if too_large:  # never fetched
        proc.skips.add("corrupt_file", too_large)
        return True
    if footer_len + 8 > len(data):
        if footer_len + 8 > pf.size:
            if final:
                proc.skips.add("corrupt_file", f"{pf.path}: parquet footer length {footer_len} exceeds the file")
            return final
        more = BytesSink()
        await get(more, what=f"{pf.path} (footer)", start=pf.size - footer_len - 8, end=pf.size)
        data = bytes(more.buf)
    sparse.add(pf.size - len(data), data)
    try:  # parsing the footer is CPU work: not on the event loop
        pfile = await loop.run_in_executor(
            ctx.executor, functools.partial(pq.ParquetFile, sparse, page_checksum_verification=True)
        )
    except (pa.ArrowException, OSError) as exc:
        if refused := exhausted(exc, pf.path):
            raise refused from exc
        if final:
            proc.skips.add("corrupt_file", f"{pf.path}: unreadable parquet footer ({exc})")
        return final
    meta = pfile.metadata

    def layout() -> tuple[list[int], list[list[int]]]:  # a pass over every row group of the footer
        return row_group_firsts(meta), row_group_runs(meta, select_row_groups(meta, pf.limit), pf.size)

    firsts, runs = await loop.run_in_executor(ctx.executor, layout)  # (200,000 row groups: ~0.3 s)
    for run in runs:
        lo, hi = row_group_span(meta, run[0])[0], row_group_span(meta, run[-1])[1]
        if not 0 <= lo < hi <= pf.size:
            if final:
                proc.skips.add("corrupt_file", f"{pf.path}: row group {run[0]} lies outside the file")
            return final
        what = f"row group {run[0]}" if len(run) == 1 else f"row groups {run[0]}-{run[-1]}"
        body = BytesSink()
        await get(body, what=f"{pf.path} ({what})", start=lo, end=hi, on_bytes=ctx.on_bytes)
        part = sparse.add(lo, bytes(body.buf))
        del body

        decoded = await loop.run_in_executor(ctx.executor, proc.parquet_row_groups, pfile, run, firsts, final)
        if not decoded and not final:
            return False
        # Decoded: held until the prefix's end, a prefix of most of a large file was held whole
        # (memory grew with --data-fraction: 426 MB at 0.9 of a 300 MB file, 175 MB whole).
        sparse.drop(part)
    return True


__all__ = ["Processor", "ShardsAhead", "TaskContext", "file_matches", "run_file_task"]

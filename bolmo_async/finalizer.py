"""Finalize: the staging, in plan order -> size-bounded raw uint32 shards + metadata.

- ``bolmo_data_00000.npy`` ...: raw, headerless, little-endian uint32 (read with
  ``np.memmap(path, dtype=np.uint32, mode="r")``; the suffix is a naming convention only).
- A document is never split across shards unless it alone exceeds ``max_tokens_per_file``, so no
  shard ever holds more than the bound. Every shard ends with an EOS: a document cut across
  shards has an EOS after each of its pieces, so each shard stands alone for EOS-based readers.
- Beside each shard, ``bolmo_data_XXXXX.csv.gz``: no header, ``start,end,id,src,loc``, ``end``
  exclusive (dolma's ``tokens`` layout); a cut document gets a row per piece, each ending at
  its EOS. One row per line, whatever the ids: OLMo-core reads the file line by line.
- ``manifest.json``, then ``data_sources.txt`` (absolute shard paths) written last, and only for
  a complete output (or with ``allow_incomplete``); an existing one is replaced only once its
  replacement is ready.

Everything streams: one staged batch in memory at a time. Shards can be written by any process
(``write_shard``): their boundaries depend only on staged lengths in plan order.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .errors import StateError, UsageError
from .guidance import fetch_command, plan_missing
from .messages import LayoutAt
from .models import DEFAULT_MAX_TOKENS_PER_FILE, Plan, PlannedFile, SkipCounter
from .outdir import (
    DATA_SOURCES,
    MANIFEST,
    PLAN,
    RUN_STATE,
    OutputDir,
    aligned_buffer,
    csv_name,
    open_output,
    shard_name,
    staged_name,
)
from .planner import load_plan, missing_shares_said
from .staging import Staging, expand, token_lengths, unverified_prefix
from .util import CHECKSUM, new_checksum

log = logging.getLogger("bolmo_async")

#: Token ids built at a time (1 MiB of uint32).
WRITE_TOKENS = 1 << 18
#: A shard is hashed and written in blocks of this size (page-aligned; two per shard being written).
#: Eight times the ids built at a time, so that most are built right into a block.
BLOCK_BYTES = 8 << 20
#: gzip level of the csv.gz index files (1: ~3x faster than 6, the files are small either way).
CSV_GZIP_LEVEL = 1


def source_prefix(plan: Plan) -> str:
    """The ``src`` column of the csv.gz rows: this, then the file's path in the repo."""
    return f"hf://datasets/{plan.repo_id}@{plan.commit}/"


class _Lane:
    """Runs calls in order on one background thread, at most ``depth`` queued (bounded memory):
    a shard's hashing, writing and gzip overlap with building its next ids."""

    def __init__(self, depth: int = 1):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="bolmo-shard-io")
        self._pending: deque[Future[object]] = deque()
        self._depth = depth

    def put(self, fn: Callable[..., object], *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True)


#: Blocks a process keeps for its next shards (a worker writes one shard at a time; finalize's
#: threads, one per core, let the rest go).
MAX_FREE_BLOCKS = 4
_free_blocks: list[np.ndarray] = []
_free_lock = threading.Lock()


def _take_block() -> np.ndarray:
    """A page-aligned block of ``BLOCK_BYTES``: one a finished shard gave back (its pages are
    already mapped), else a new one."""
    with _free_lock:
        while _free_blocks:
            block = _free_blocks.pop()
            if len(block) * 4 == BLOCK_BYTES:
                return block
    return np.frombuffer(aligned_buffer(BLOCK_BYTES), dtype="<u4")


#: The shards this process is writing (neither committed nor aborted): ``abandon_unfinished``.
_unfinished: set[ShardWriter] = set()
_unfinished_lock = threading.Lock()


def abandon_unfinished() -> int:
    """Unlink now the temporaries of every shard this process has not committed or aborted (how
    many): for a process about to exit without joining the threads writing them (a stopped run
    never waits for a step in progress). A write going on lands in an unlinked file. Run at exit
    (``atexit``: the command line's ``_exit_now`` runs it too) and by a worker process before its
    ``os._exit``."""
    with _unfinished_lock:
        writers = list(_unfinished)
    for writer in writers:
        writer.unlink_early()
    return len(writers)


atexit.register(abandon_unfinished)


class ShardWriter:
    """One shard being written to a temporary name, with its csv.gz rows and running checksum.

    Ids are built into one of two page-aligned blocks and hashed as they are built (while they
    are in the CPU's cache: hashing a whole block later read it back from memory); a full block is
    written (``OutputFile``: O_DIRECT where possible) on a background lane while the other fills.
    """

    def __init__(self, out: OutputDir, index: int):
        self.out = out
        self.name = shard_name(index)
        self.csv_name = csv_name(self.name)
        self._f = out.new_file(self.name, direct=True)
        try:
            self._raw_csv = out.new_file(self.csv_name)
        except BaseException:
            self._f.abort()
            raise
        with _unfinished_lock:
            _unfinished.add(self)
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw_csv, mtime=0, compresslevel=CSV_GZIP_LEVEL)
        # A lane each: the csv.gz rows queued behind a block's write made every piece's rows
        # wait for that write (depth 1), so the next block was not built while the disk wrote.
        self._lane = _Lane()  # the shard's blocks, in order
        self._csv_lane = _Lane()  # its csv.gz rows, in order
        self.checksum = new_checksum()
        self.tokens = 0
        self.documents = 0  # csv rows (pieces of documents)
        # Two blocks: with a lane of depth 1, a block handed to it is done with by the time the
        # next one has been handed over, so the two alternate safely.
        self._blocks = [_take_block() for _ in range(2)]
        self._block = 0
        self._fill = 0  # ids in the current block

    def put(self, n: int, make: Callable[[np.ndarray | None], np.ndarray]) -> None:
        """``n`` ids that ``make(out)`` builds: right into the current block when they fit there
        (no copy), else built apart and written."""
        if self._fill + n <= BLOCK_BYTES // 4:
            self.checksum.update(make(self._blocks[self._block][self._fill : self._fill + n]))
            self.tokens += n
            self._fill += n
            if self._fill == BLOCK_BYTES // 4:
                self._hand_over()
        else:
            self.write(make(None))

    def write(self, values: np.ndarray) -> None:
        data = np.asarray(values, dtype="<u4")
        self.checksum.update(data)
        self.tokens += len(data)
        cap = BLOCK_BYTES // 4
        while len(data):
            block = self._blocks[self._block]
            n = min(cap - self._fill, len(data))
            block[self._fill : self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == cap:
                self._hand_over()

    def _hand_over(self) -> None:
        """The current block's ids to the lane (write); the other block fills next."""
        if not self._fill:
            return
        self._lane.put(self._write, memoryview(self._blocks[self._block][: self._fill].data))
        self._block ^= 1
        self._fill = 0

    def _give_back(self) -> None:
        """The blocks go back to the process's free list (once the lanes are done with them)."""
        blocks, self._blocks = self._blocks, []
        with _free_lock:
            for b in blocks:
                if len(b) * 4 == BLOCK_BYTES and len(_free_blocks) < MAX_FREE_BLOCKS:
                    _free_blocks.append(b)

    def _write(self, data: memoryview) -> None:
        self._f.write(data)

    def rows(self, starts: np.ndarray, ends: np.ndarray, ids: pa.Array, src: str, locs: pa.Array) -> None:
        """csv.gz rows ``start,end,id,src,loc`` (no header), built by Arrow kernels, not per row."""
        self._csv_lane.put(self._gz.write, csv_rows(starts, ends, ids, src, locs))
        self.documents += len(ids)

    def close(self) -> dict[str, Any]:
        self.finish()
        return self.commit()

    def finish(self) -> None:
        """Every id and row written to the temporaries (not in place yet: ``commit``)."""
        try:
            self._hand_over()
            self._lane.drain()
            self._lane.close()
            self._give_back()
            self._csv_lane.drain()
            self._csv_lane.close()
            self._gz.close()
        except BaseException:
            self.abort()
            raise

    def commit(self) -> dict[str, Any]:
        """After ``finish``: the shard and its csv.gz in place; its record."""
        try:
            self._f.commit()
            self._raw_csv.commit()
        except BaseException:
            self.abort()
            raise
        with _unfinished_lock:
            _unfinished.discard(self)
        return {
            "path": self.out.ref(self.name),
            "csv": self.out.ref(self.csv_name),
            "tokens": self.tokens,
            "documents": self.documents,
            CHECKSUM: self.checksum.hexdigest(),
        }

    def abort(self) -> None:
        self._lane.close()
        self._csv_lane.close()
        self._give_back()
        self._f.abort()
        self._raw_csv.abort()
        with _unfinished_lock:
            _unfinished.discard(self)

    def unlink_early(self) -> None:
        """From any thread, while a piece may be being written: the temporaries' names go now
        (``NewFile.unlink_early``); ``abort`` still follows, by whoever writes it."""
        self._f.unlink_early()
        self._raw_csv.unlink_early()


_NEEDS_QUOTES = (",", '"', "\r", "\n")


#: CR and LF inside a field are written as the two characters ``\r`` / ``\n``. OLMo-core does not
#: read the file as CSV: it splits each text line at commas and takes the first two fields
#: (``olmo_core.data.utils.iter_document_indices``, the only source of document boundaries for a
#: remote shard). A line break inside a quoted field ends its row there: the next line's fields
#: are read as ``start,end`` (a crash on ``int()``, or, for an id like ``"x\n5,7,..."``, a made-up
#: document ``[5, 7)``, silently).
_LINE_BREAKS = str.maketrans({"\r": "\\r", "\n": "\\n"})


def _csv_field(value: str) -> str:
    r"""A string as a CSV field on one line: CR and LF written as ``\r`` / ``\n``, then quoted
    (``"`` doubled) only when it holds ``,`` or ``"``."""
    if "\r" in value or "\n" in value:
        value = value.translate(_LINE_BREAKS)
    if "," in value or '"' in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def csv_rows(starts: np.ndarray, ends: np.ndarray, ids: pa.Array, src: str, locs: pa.Array) -> bytes:
    r"""``start,end,id,src,loc\n`` per row, the way ``csv.writer`` writes them once CR and LF in
    the ids and ``src`` are written as ``\r`` / ``\n`` (see ``_LINE_BREAKS``). Formatted in
    Python: half the CPU of Arrow's casts and joins on a batch's few hundred rows (their calls
    cost more than the rows), and no pyarrow.compute import in the workers."""
    if not len(ids):
        return b""
    names = ids.to_pylist()
    joined = "".join(names)
    if any(c in joined for c in _NEEDS_QUOTES):
        names = [_csv_field(n) for n in names]  # some id needs quotes or escapes (rare): each is looked at
    mid = f",{_csv_field(src)},"
    rows = zip(starts.tolist(), ends.tolist(), names, locs.to_pylist(), strict=True)
    return "".join([f"{s},{e},{n}{mid}{loc}\n" for s, e, n, loc in rows]).encode("utf-8")


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a shard: documents ``[doc_lo, doc_hi)`` of one staged batch, or tokens
    ``[tok_lo, tok_hi)`` of its document ``doc_lo`` alone (a document larger than the bound),
    followed by an EOS when ``tok_hi`` is not the document's end."""

    unit: int  # index into the staged files, in plan order
    batch: int
    doc_lo: int
    doc_hi: int
    tok_lo: int = -1
    tok_hi: int = -1


class LayoutBuilder:
    """Shard boundaries from document lengths only, one staged batch at a time, in plan order.

    Documents fill a shard in order; one that does not fit opens the next shard; one larger than
    the bound alone is cut, starting in a fresh shard, into pieces that each end with an EOS. Greedy, so a piece
    never moves once placed: shards can be written while later batches are still to come
    (``ShardPlanner``) or all at once in parallel (``finalize_dir``), byte-identical either way.
    """

    def __init__(self, bound: int):
        if bound < 2:
            raise UsageError("--max-tokens-per-file must be at least 2 (a token and an EOS)")
        self.bound = bound
        self._shards: list[list[Piece]] = [[]]
        self._used = 0

    def _close(self) -> None:
        if self._shards[-1]:
            self._shards.append([])
            self._used = 0

    def _put(self, piece: Piece, tokens: int, added: list[tuple[int, Piece]]) -> None:
        self._shards[-1].append(piece)
        self._used += tokens
        added.append((len(self._shards) - 1, piece))

    def add(self, unit: int, batch: int, lens: np.ndarray) -> list[tuple[int, Piece]]:
        """Place batch ``batch`` of ``unit`` (``lens``: tokens per document); the pieces placed,
        each with its shard index."""
        added: list[tuple[int, Piece]] = []
        bound = self.bound
        ends = np.cumsum(lens)  # ends[k] = tokens of docs [0, k]
        i, n = 0, len(lens)
        while i < n:
            length = int(lens[i])
            if length > bound:
                # Cut into pieces of at most bound - 1 tokens + an EOS each; the last piece ends
                # with the document's own EOS.
                self._close()
                pos = 0
                while pos < length:
                    room = bound - self._used
                    if length - pos <= room:
                        self._put(Piece(unit, batch, i, i + 1, pos, length), length - pos, added)
                        pos = length
                    elif room >= 2:
                        self._put(Piece(unit, batch, i, i + 1, pos, pos + room - 1), room, added)
                        pos += room - 1
                    if self._used >= bound - 1:
                        self._close()
                i += 1
                continue
            if length > bound - self._used:
                self._close()
                continue
            start = int(ends[i - 1]) if i else 0
            j = int(np.searchsorted(ends, start + bound - self._used, side="right"))  # docs [i, j) fit
            j = min(max(j, i + 1), n)
            self._put(Piece(unit, batch, i, j), int(ends[j - 1]) - start, added)
            i = j
        return added

    def shards(self) -> list[list[Piece]]:
        return [list(s) for s in self._shards if s]

    def state(self) -> tuple[int, int, list[Piece]]:
        """Where the next document goes: the shard being filled, its tokens and its pieces so far."""
        return len(self._shards) - 1, self._used, list(self._shards[-1])

    @classmethod
    def resumed(cls, bound: int, shard: int, used: int, pieces: list[Piece]) -> LayoutBuilder:
        """A builder that goes on from ``state()`` of another (the same shards from there on)."""
        builder = cls(bound)
        builder._shards = [[] for _ in range(shard)] + [list(pieces)]
        builder._used = used
        return builder


def write_shard(
    out: OutputDir,
    index: int,
    pieces: list[Piece],
    arrows: Mapping[int, str],
    srcs: Mapping[int, str],
    eos: int,
    stop: threading.Event,
    chunk: int = 0,
) -> dict[str, Any]:
    """Write shard ``index`` from its pieces (any thread or process; one staged batch in memory
    at a time). ``arrows``/``srcs``: staged file name and csv ``src`` of each unit the pieces name."""
    shard = ShardWriter(out, index)
    try:
        append_pieces(shard, pieces, arrows, srcs, eos, stop, chunk)
        return shard.close()
    except BaseException:
        shard.abort()
        raise


def append_pieces(
    shard: ShardWriter,
    pieces: list[Piece],
    arrows: Mapping[int, str],
    srcs: Mapping[int, str],
    eos: int,
    stop: threading.Event,
    chunk: int = 0,
) -> None:
    """Append ``pieces`` to ``shard`` from their staged files (a shard written at once, or one
    streamed as its pieces become known: the same bytes)."""
    out = shard.out
    for piece in pieces:
        if stop.is_set():
            raise InterruptedError("shard writing stopped")
        # Map, read one batch, unmap: mapped pages count as this process's memory while mapped.
        with out.open_input(arrows[piece.unit]) as source:
            batch = pa.ipc.open_file(source).get_batch(piece.batch)
            _write_piece(shard, piece, batch, srcs[piece.unit], eos, chunk)
            del batch


def _write_piece(shard: ShardWriter, piece: Piece, batch: pa.RecordBatch, src: str, eos: int, chunk: int = 0) -> None:
    chunk = chunk or WRITE_TOKENS
    tok = batch.column("tokens")
    lo, n = piece.doc_lo, piece.doc_hi - piece.doc_lo
    ids = batch.column("id").slice(lo, n)
    locs = batch.column("loc").slice(lo, n)
    if piece.tok_lo >= 0:
        cut = piece.tok_hi < int(token_lengths(tok.slice(lo, 1))[0])
        size = piece.tok_hi - piece.tok_lo + (1 if cut else 0)
        shard.rows(np.array([shard.tokens]), np.array([shard.tokens + size]), ids, src, locs)
        for a in range(piece.tok_lo, piece.tok_hi, chunk):
            b = min(a + chunk, piece.tok_hi)
            shard.put(b - a, functools.partial(expand, tok, lo, lo + 1, a, b))
        if cut:
            shard.write(np.array([eos], dtype=np.uint32))
        return
    lens = token_lengths(tok.slice(lo, n))
    cum = np.cumsum(lens)
    ends = shard.tokens + cum
    shard.rows(np.concatenate([[shard.tokens], ends[:-1]]), ends, ids, src, locs)
    # Ids are built and queued ``chunk`` tokens at a time (a long document in slices): memory per
    # shard stays a few such chunks, whatever the batch or document size.
    i = 0
    while i < n:
        if lens[i] > chunk:
            for a in range(0, int(lens[i]), chunk):
                b = min(a + chunk, int(lens[i]))
                shard.put(b - a, functools.partial(expand, tok, lo + i, lo + i + 1, a, b))
            i += 1
            continue
        base = int(cum[i - 1]) if i else 0
        j = max(i + 1, int(np.searchsorted(cum, base + chunk, side="right")))
        shard.put(int(cum[j - 1]) - base, functools.partial(expand, tok, lo + i, lo + j, -1, -1))
        i = j


#: Shards already written while fetching: index -> (their pieces, their record).
Written = dict[int, tuple[list[Piece], dict[str, Any]]]


def write_shards_locally(
    out: OutputDir,
    shards: list[list[Piece]],
    arrows: Mapping[int, str],
    srcs: Mapping[int, str],
    eos: int,
    written: Written | None = None,
) -> list[dict[str, Any]]:
    """Every shard of the layout by this process's threads (one per core)."""
    written = written or {}
    # A shard written meanwhile is kept when it holds exactly the pieces the layout gives it now.
    todo = [k for k, pieces in enumerate(shards) if k not in written or written[k][0] != pieces]
    records = {k: written[k][1] for k in range(len(shards)) if k not in todo}
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    stop = threading.Event()
    with ThreadPoolExecutor(workers, thread_name_prefix="bolmo-finalize") as pool:
        futures = {k: pool.submit(write_shard, out, k, shards[k], arrows, srcs, eos, stop) for k in todo}
        try:
            records.update({k: f.result() for k, f in futures.items()})
            return [records[k] for k in range(len(shards))]
        except BaseException:
            stop.set()  # running shards stop at their next piece and remove their temporaries
            for f in futures.values():
                f.cancel()
            raise


@dataclass(frozen=True)
class Layout:
    """The shards of a whole plan as a fetch laid them out from its workers' reports
    (``ShardPlanner.layout``), with the documents and tokens they hold: exactly what
    ``finalize_dir`` computes from the staged files' lengths, which it then need not read again."""

    bound: int
    shards: list[list[Piece]]
    documents: int
    tokens: int


class ShardPlanner:
    """Shard boundaries while the fetch runs (the coordinator's side of writing shards early).

    Staged files are taken in plan order as they complete and laid out by the same
    ``LayoutBuilder`` as ``finalize``; each shard whose pieces are all known is handed out as a
    task ``(k, pieces)`` for any worker to write. ``finalize_dir`` keeps a shard written meanwhile
    only when its pieces are exactly the ones it would write; anything else (a failed file, an
    interruption) is rewritten. Once every planned file is laid out, ``layout`` is the whole
    layout: ``finalize_dir`` takes it instead of reading every staged file's lengths again.
    """

    def __init__(self, plan: Plan, bound: int):
        self.files = list(plan.files)
        self._builder = LayoutBuilder(bound)
        self._staged: dict[int, list[np.ndarray]] = {}  # units staged but not laid out yet
        self._next = 0  # the next unit, in plan order, to lay out
        self._open: tuple[int, list[Piece]] | None = None  # the shard being filled
        self.handed_out: dict[int, list[Piece]] = {}  # shard index -> its pieces, once complete
        self._documents = 0  # of the units laid out
        self._tokens = 0

    def staged(self, unit: int, lengths: list[np.ndarray]) -> list[tuple[int, list[Piece]]]:
        """``unit`` is staged, with ``lengths`` (tokens per document of each of its batches, as its
        worker wrote them: the coordinator never reads a staged file); the shards now complete."""
        self._staged[unit] = lengths
        done: list[tuple[int, list[Piece]]] = []
        while self._next in self._staged:
            unit = self._next
            self._next += 1
            for b, lens in enumerate(self._staged.pop(unit)):
                self._documents += len(lens)
                self._tokens += int(lens.sum())
                for k, piece in self._builder.add(unit, b, lens):
                    if self._open is not None and self._open[0] != k:
                        done.append(self._open)
                        self.handed_out[self._open[0]] = self._open[1]
                        self._open = None
                    if self._open is None:
                        self._open = (k, [])
                    self._open[1].append(piece)
        return done

    def open_shard(self) -> tuple[int, list[Piece]] | None:
        """The shard being filled and its pieces so far (they never move: ``LayoutBuilder``), or
        None: the coordinator streams them to a worker while later files are staged."""
        return self._open

    def layout_at(self, unit: int) -> LayoutAt | None:
        """Where ``unit``'s documents start in the layout, when every file before it is laid out
        (else None): its worker can then write the shards it fills while it stages it."""
        if unit != self._next:
            return None
        shard, used, pieces = self._builder.state()
        return LayoutAt(self._builder.bound, shard, used, pieces, last=unit == len(self.files) - 1)

    def finish(self) -> list[tuple[int, list[Piece]]]:
        """After the last file: the shard still open, if every file was laid out."""
        if self._next < len(self.files) or self._open is None:
            return []
        last, self._open = self._open, None
        self.handed_out[last[0]] = last[1]
        return [last]

    def layout(self) -> Layout | None:
        """The whole layout once every planned file is laid out and ``finish`` was called, else
        None."""
        if self._next < len(self.files) or self._open is not None:
            return None
        shards = [self.handed_out[k] for k in range(len(self.handed_out))]
        return Layout(self._builder.bound, shards, self._documents, self._tokens)


def remembered_bound(out: OutputDir) -> int:
    """The ``--max-tokens-per-file`` this folder was finalized with (else the default)."""
    try:
        m = json.loads(out.read_bytes(MANIFEST) or b"")
        bound = int(m["max_tokens_per_file"])
        return bound if bound >= 2 else DEFAULT_MAX_TOKENS_PER_FILE
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_MAX_TOKENS_PER_FILE


def retire_stale_sources(out: OutputDir, plan: Plan, bound: int) -> None:
    """``data_sources.txt`` goes before this run puts in place shards of another layout than the
    manifest's (another plan: a fraction grown in the same folder; another --max-tokens-per-file):
    they are written under the same names, so a run stopped among them left it naming, as a
    complete output, shards of which some held the new layout (a trainer reads them without a
    word: fewer tokens, or documents twice). It is written again once the output is complete.
    The same plan at the same bound gives the same bytes: that one is kept while they are rewritten."""
    if not out.exists_file(DATA_SOURCES):
        return
    try:
        m = json.loads(out.read_bytes(MANIFEST) or b"null")
        same = isinstance(m, dict) and bool(
            m.get("complete")
            and m.get("max_tokens_per_file") == bound
            and m.get("revision") == plan.commit
            and m.get("data_fraction") == plan.data_fraction
            and m.get("seed") == plan.seed
            and m.get("selection") == plan.selection.to_json()
            and m.get("planned_files") == len(plan.files)
        )
    except (ValueError, TypeError):
        same = False
    if not same:
        log.info(
            "%s removed: its shards are rewritten for this plan at --max-tokens-per-file %d (it is written again "
            "once they are all there)",
            out.ref(DATA_SOURCES),
            bound,
        )
        out.remove(DATA_SOURCES)


def _verify_staging(staging: Staging, units: list[tuple[PlannedFile, dict[str, Any]]]) -> None:
    """Every staged file still matches the checksum its marker vouches for (in parallel)."""
    if not units:
        return
    with ThreadPoolExecutor(max(1, min(len(units), os.cpu_count() or 1)), thread_name_prefix="bolmo-verify") as pool:
        bad = [
            pf.path
            for (pf, rec), ok in zip(units, pool.map(lambda u: staging.intact(*u), units), strict=True)
            if not ok
        ]
    if bad:
        shown = "\n  ".join(bad[:20]) + ("\n  ..." if len(bad) > 20 else "")
        raise StateError(
            f"{len(bad)} staged file(s) no longer match their completion markers (damaged on disk):\n  {shown}\n"
            "Run `bolmo-async fetch` (or `prepare`) again with the same --output-dir: it fetches exactly these "
            "again; then finalize. Nothing was changed in the output."
        )


#: How a layout's shards get written: ``(out, shards, arrows, srcs, eos, written) -> records`` (this
#: process's threads by default; an executor may spread them, e.g. over Ray tasks).
ShardWriting = Callable[
    [OutputDir, list[list[Piece]], Mapping[int, str], Mapping[int, str], int, "Written | None"], list[dict[str, Any]]
]


#: The option behind a skip reason, for the message when every document was skipped.
_SKIP_FLAGS = {
    "document_too_large": "every document was over --max-document-bytes: raise it",
    "missing_text": "no record had the text field: name the right one with --text-field",
    "empty_text": "every text was empty: check --text-field",
}


def _no_documents_hint(skips: SkipCounter, text_field: str) -> str:
    """What to check when a complete run gave no documents, led by the main skip reason."""
    main = max(skips.counts.items(), key=lambda kv: (kv[1], kv[0]))[0] if skips.counts else ""
    if main in _SKIP_FLAGS:
        return f"Most were {main}: {_SKIP_FLAGS[main]}."
    return (
        f"Check --repo-id and the files' format (JSON lines with a {text_field!r} field, or parquet with a "
        f"{text_field!r} column: --text-field)."
    )


def finalize_dir(
    output_dir: OutputDir | str | os.PathLike[str],
    max_tokens_per_file: int | None = None,
    *,
    allow_incomplete: bool = False,
    write_shards: ShardWriting | None = None,
    written: Written | None = None,
    verified: frozenset[str] = frozenset(),
    layout: Layout | None = None,
) -> dict[str, Any]:
    """Write shards, csv.gz files, the manifest and ``data_sources.txt`` from the staging.

    ``max_tokens_per_file`` None: the bound this folder was finalized with before (else 100M).
    ``write_shards``: who writes the shards (default: this process's threads).
    ``written``: shards written while fetching, kept where they match; ``verified``: keys of
    staged files this process already checked (the others are checksummed first); ``layout``:
    the fetch's own layout of every planned file (``ShardPlanner.layout``), taken instead of
    reading each staged file's lengths again when every file is staged, at the same bound."""
    out = open_output(output_dir)
    bound = remembered_bound(out) if max_tokens_per_file is None else max_tokens_per_file
    if bound < 2:
        raise UsageError("--max-tokens-per-file must be at least 2 (a token and an EOS)")
    plan = load_plan(out)
    if plan is None:
        if out.exists_file(RUN_STATE):  # fetched here, then plan.json removed
            raise StateError(plan_missing(out, out.read_bytes(MANIFEST)) + ".")
        raise StateError(f"{out} has no {PLAN}: run `{fetch_command(out, None)}` (or `prepare`) first.")
    state_raw = out.read_bytes(RUN_STATE)
    if state_raw is None:
        raise StateError(f"{out} has no {RUN_STATE}: nothing was fetched yet; run `{fetch_command(out, None)}`.")
    state = json.loads(state_raw)
    staging = Staging(out)
    records = [(pf, staging.done(pf)) for pf in plan.files]  # each completion marker read once
    missing = [pf.path for pf, rec in records if rec is None]
    if missing and not allow_incomplete:
        shown = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        fetch = fetch_command(out, plan.endpoint, state.get("tokenizer"))
        raise StateError(
            f"{len(missing)} of {len(plan.files)} planned files are not staged yet:\n  {shown}\n"
            f"{missing_shares_said(out, plan, missing, fetch) or f'Run `{fetch}` again (or the missing --worker shares) to finish them'}, or pass "
            "--allow-incomplete to write shards from what is staged (the manifest then says complete: false)."
        )
    fingerprint = state["tokenizer"]["fingerprint"]
    eos = int(state["tokenizer"]["eos_token_id"])
    for pf, rec in records:
        if rec is not None and rec.get("tokenizer_fingerprint") != fingerprint:
            raise StateError(f"staged {pf.path} was made with another tokenizer; rerun fetch with --force.")
    _verify_staging(staging, [(pf, rec) for pf, rec in records if rec is not None and pf.key not in verified])
    skips = SkipCounter()
    unreadable: dict[str, str] = {}  # files that gave no data at all: path -> why
    src_prefix = source_prefix(plan)
    arrows: dict[int, str] = {}
    srcs: dict[int, str] = {}
    builder = LayoutBuilder(bound)
    docs = tokens = 0
    if layout is not None and (missing or layout.bound != bound):
        layout = None  # not this finalize's layout
    for unit, (pf, rec) in enumerate(records):
        if rec is None:
            continue
        skips.merge(rec.get("skipped", {}))
        if rec.get("unreadable"):
            unreadable[pf.path] = rec["unreadable"]
        if layout is None:
            for b, lens in enumerate(staging.lengths(pf)):
                builder.add(unit, b, lens)
                docs += len(lens)
                tokens += int(lens.sum())
        arrows[unit] = staged_name(pf.key)
        srcs[unit] = src_prefix + pf.path
    if layout is not None:
        plan_of_shards, docs, tokens = layout.shards, layout.documents, layout.tokens
    else:
        plan_of_shards = builder.shards()
    retire_stale_sources(out, plan, bound)
    shards = (write_shards or write_shards_locally)(out, plan_of_shards, arrows, srcs, eos, written)
    complete = not missing
    manifest = {
        "format": "bolmo-async/1",
        "repo_id": plan.repo_id,
        "revision": plan.commit,
        "requested_revision": plan.revision,
        "data_fraction": plan.data_fraction,
        "seed": plan.seed,
        "selection": plan.selection.to_json(),
        "sources": plan.source_rows(),
        "dtype": "uint32",
        "layout": "raw little-endian memmap (no .npy header); np.memmap(path, dtype=np.uint32, mode='r')",
        "max_tokens_per_file": bound,
        "tokenizer": state["tokenizer"],
        "shards": shards,
        "totals": {
            "tokens": tokens,
            "documents": docs,
            "shards": len(shards),
            "skipped_documents": dict(sorted(skips.counts.items())),
            "skipped_examples": skips.examples,
            "unreadable_files": unreadable,
        },
        "complete": complete,
        "missing_files": missing,
        "planned_files": len(plan.files),
        # JSON-lines prefixes read without their file's sha256 checked (--no-verify-prefixes): a
        # rerun that checks them remakes the output even after --drop-staging.
        "unverified_prefixes": sum(1 for _, rec in records if rec is not None and unverified_prefix(rec)),
    }
    if complete and not docs:
        raise StateError(
            f"the plan's {len(plan.files)} file(s) gave no documents at all (skipped: "
            f"{dict(sorted(skips.counts.items())) or 'none'}); no {DATA_SOURCES} was written. "
            + _no_documents_hint(skips, plan.selection.text_field)
        )
    out.write_text(MANIFEST, json.dumps(manifest, indent=1) + "\n")
    # Shards of an earlier, larger finalize go, and data_sources.txt names exactly these shards:
    # written only for a complete output (or on request), replacing the old one at once.
    keep = {shard_name(k) for k in range(len(shards))}
    keep |= {csv_name(n) for n in keep}
    if complete or allow_incomplete:
        out.write_text(DATA_SOURCES, "".join(s["path"] + "\n" for s in shards))
    else:
        out.remove(DATA_SOURCES)
    out.remove_shards_except(keep)
    return manifest

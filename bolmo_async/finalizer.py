"""Finalize: the staging, in plan order -> size-bounded raw uint32 shards + metadata.

- ``bolmo_data_00000.npy`` ...: raw, headerless, little-endian uint32 (read with
  ``np.memmap(path, dtype=np.uint32, mode="r")``; the suffix is a naming convention only).
- A document is never split across shards unless it alone exceeds ``max_tokens_per_file``, so no
  shard ever holds more than the bound.
- Beside each shard, ``bolmo_data_XXXXX.csv.gz``: no header, ``start,end,id,src,loc``, ``end``
  exclusive (dolma's ``tokens`` layout); a split document gets a row in each shard.
- ``manifest.json``, then ``data_sources.txt`` (absolute shard paths) written last.

Everything streams: one staged batch in memory at a time.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import StateError, UsageError
from .models import Plan, PlannedFile, SkipCounter
from .planner import load_plan
from .staging import Staging, expand, token_lengths
from .tokenize import value_bytes
from .util import atomic_write_text, maybe_fsync, raise_if_disk_full

log = logging.getLogger("bolmo_async")

SHARD_PREFIX = "bolmo_data_"
MANIFEST = "manifest.json"
DATA_SOURCES = "data_sources.txt"
RUN_STATE = "run.json"
#: Token ids built and queued for writing at a time (4 MB of uint32).
WRITE_TOKENS = 1 << 20
#: The same while fetching (``ShardStream``): smaller, as the fetch's own buffers are live too.
STREAM_WRITE_TOKENS = 1 << 18
#: gzip level of the csv.gz index files (1: ~3x faster than 6, the files are small either way).
CSV_GZIP_LEVEL = 1
_SHARD_RE = re.compile(rf"^{SHARD_PREFIX}\d{{5,}}\.(npy|csv\.gz)$")


def shard_name(i: int) -> str:
    return f"{SHARD_PREFIX}{i:05d}.npy"


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


class ShardWriter:
    """One shard being written to a temporary name, with its csv.gz rows and running sha256."""

    def __init__(self, output_dir: Path, index: int):
        self.path = (output_dir / shard_name(index)).resolve()
        self.csv_path = self.path.with_name(self.path.name[: -len(".npy")] + ".csv.gz")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.csv_tmp = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._raw_csv = open(self.csv_tmp, "wb")  # noqa: SIM115
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw_csv, mtime=0, compresslevel=CSV_GZIP_LEVEL)
        self._lane = _Lane()  # file writes and gzip, in order
        self._hash_lane = _Lane()  # the running sha256, in order, beside the writes
        self.sha = hashlib.sha256()
        self.tokens = 0
        self.documents = 0  # csv rows (pieces of documents)

    def write(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype="<u4")
        self.tokens += len(data)
        self._lane.put(self._write, data)
        self._hash_lane.put(self.sha.update, data.data)

    def _write(self, data: np.ndarray) -> None:
        try:
            self._f.write(data.data)
        except OSError as exc:
            raise_if_disk_full(exc, self.tmp)
            raise

    def rows(self, starts: np.ndarray, ends: np.ndarray, ids: pa.Array, src: str, locs: pa.Array) -> None:
        """csv.gz rows ``start,end,id,src,loc`` (no header), built by Arrow kernels, not per row."""
        self._lane.put(self._gz.write, csv_rows(starts, ends, ids, src, locs))
        self.documents += len(ids)

    def close(self) -> dict[str, Any]:
        try:
            for lane in (self._lane, self._hash_lane):
                lane.drain()
                lane.close()
            self._gz.close()
            for f in (self._f, self._raw_csv):
                f.flush()
                maybe_fsync(f.fileno())
                f.close()
            os.replace(self.tmp, self.path)
            os.replace(self.csv_tmp, self.csv_path)
        except OSError as exc:
            self.abort()
            raise_if_disk_full(exc, self.path)
            raise
        return {
            "path": str(self.path),
            "csv": str(self.csv_path),
            "tokens": self.tokens,
            "documents": self.documents,
            "sha256": self.sha.hexdigest(),
        }

    def abort(self) -> None:
        self._lane.close()
        self._hash_lane.close()
        for f in (self._f, self._raw_csv):
            with contextlib.suppress(Exception):
                f.close()
        for p in (self.tmp, self.csv_tmp):
            with contextlib.suppress(OSError):
                p.unlink()


_NEEDS_QUOTES = r'[,"\r\n]'


def _csv_field(values: pa.Array) -> pa.Array:
    """Strings as CSV fields: quoted (``"`` doubled) only when they hold ``,`` ``"`` CR or LF."""
    data = value_bytes(values.cast(pa.large_string()))
    if not any(c in data for c in (b",", b'"', b"\r", b"\n")):
        return values  # nothing to quote (the usual case): skip the kernels
    quoted = pc.binary_join_element_wise('"', pc.replace_substring(values, '"', '""'), '"', "")
    return pc.if_else(pc.match_substring_regex(values, _NEEDS_QUOTES), quoted, values)


def csv_rows(starts: np.ndarray, ends: np.ndarray, ids: pa.Array, src: str, locs: pa.Array) -> bytes:
    """``start,end,id,src,loc\n`` per row, the way ``csv.writer`` writes them."""
    if not len(ids):
        return b""
    src_field = _csv_field(pa.array([src]))[0]
    lines = pc.binary_join_element_wise(
        pa.array(starts, pa.int64()).cast(pa.string()),
        pa.array(ends, pa.int64()).cast(pa.string()),
        _csv_field(ids.cast(pa.string())),
        src_field,
        pc.binary_join_element_wise(locs.cast(pa.string()), "\n", ""),
        ",",
    ).cast(pa.large_string())
    return value_bytes(lines)


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a shard: documents ``[doc_lo, doc_hi)`` of one staged batch, or tokens
    ``[tok_lo, tok_hi)`` of its document ``doc_lo`` alone (a document larger than the bound)."""

    unit: int  # index into the staged files, in plan order
    batch: int
    doc_lo: int
    doc_hi: int
    tok_lo: int = -1
    tok_hi: int = -1


class LayoutBuilder:
    """Shard boundaries from document lengths only, one staged batch at a time, in plan order.

    Documents fill a shard in order; one that does not fit opens the next shard; one larger than
    the bound alone is cut into bound-sized pieces starting in a fresh shard. Greedy, so a piece
    never moves once placed: shards can be written while later batches are still to come
    (``ShardStream``) or all at once in parallel (``layout``), byte-identical either way.
    """

    def __init__(self, bound: int):
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
                self._close()
                pos = 0
                while pos < length:
                    take = min(bound - self._used, length - pos)
                    self._put(Piece(unit, batch, i, i + 1, pos, pos + take), take, added)
                    pos += take
                    if self._used >= bound:
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


def layout(lengths: list[list[np.ndarray]], bound: int) -> list[list[Piece]]:
    """All shard boundaries at once (``lengths[unit][batch]`` = tokens per document), computed before
    any shard is written so that shards can be written in parallel."""
    builder = LayoutBuilder(bound)
    for unit, batches in enumerate(lengths):
        for b, lens in enumerate(batches):
            builder.add(unit, b, lens)
    return builder.shards()


def _write_shard(
    out: Path, index: int, pieces: list[Piece], arrows: list[Path], srcs: list[str], stop: threading.Event
) -> dict[str, Any]:
    """Write shard ``index`` from its pieces (a worker thread; one staged batch in memory at a time)."""
    shard = ShardWriter(out, index)
    try:
        for piece in pieces:
            if stop.is_set():
                raise InterruptedError("finalize stopped")
            # Map, read one batch, unmap: mapped pages count as this process's memory while mapped.
            with pa.memory_map(str(arrows[piece.unit]), "r") as source:
                batch = pa.ipc.open_file(source).get_batch(piece.batch)
                _write_piece(shard, piece, batch, srcs[piece.unit])
                del batch
        return shard.close()
    except BaseException:
        shard.abort()
        raise


def _write_piece(shard: ShardWriter, piece: Piece, batch: pa.RecordBatch, src: str, chunk: int = 0) -> None:
    chunk = chunk or WRITE_TOKENS
    tok = batch.column("tokens")
    lo, n = piece.doc_lo, piece.doc_hi - piece.doc_lo
    ids = batch.column("id").slice(lo, n)
    locs = batch.column("loc").slice(lo, n)
    if piece.tok_lo >= 0:
        shard.rows(np.array([shard.tokens]), np.array([shard.tokens + piece.tok_hi - piece.tok_lo]), ids, src, locs)
        for a in range(piece.tok_lo, piece.tok_hi, chunk):
            shard.write(expand(tok, lo, lo + 1, a, min(a + chunk, piece.tok_hi)))
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
                shard.write(expand(tok, lo + i, lo + i + 1, a, min(a + chunk, int(lens[i]))))
            i += 1
            continue
        base = int(cum[i - 1]) if i else 0
        j = max(i + 1, int(np.searchsorted(cum, base + chunk, side="right")))
        shard.write(expand(tok, lo + i, lo + j))
        i = j


#: Shards already written while fetching (``ShardStream``): index -> (their pieces, their record).
Written = dict[int, tuple[list[Piece], dict[str, Any]]]


def _write_shards_locally(
    out: Path, shards: list[list[Piece]], arrows: list[Path], srcs: list[str], written: Written
) -> list[dict[str, Any]]:
    # A shard written meanwhile is kept when it holds exactly the pieces the layout gives it now.
    todo = [k for k, pieces in enumerate(shards) if k not in written or written[k][0] != pieces]
    records = {k: written[k][1] for k in range(len(shards)) if k not in todo}
    workers = max(1, min(len(todo), os.cpu_count() or 1))
    stop = threading.Event()
    with ThreadPoolExecutor(workers, thread_name_prefix="bolmo-finalize") as pool:
        futures = {k: pool.submit(_write_shard, out, k, shards[k], arrows, srcs, stop) for k in todo}
        try:
            records.update({k: f.result() for k, f in futures.items()})
            return [records[k] for k in range(len(shards))]
        except BaseException:
            stop.set()  # running shards stop at their next piece and remove their temporaries
            for f in futures.values():
                f.cancel()
            raise


class ShardStream:
    """Shards written while ``prepare`` is still fetching: staged files are taken in plan order as
    they complete, laid out by the same ``LayoutBuilder`` and written by the same code as
    ``finalize``, so that at the end only the last shard is left to close.

    Only an optimisation: ``finalize_dir`` recomputes the layout from the whole staging and keeps
    a shard written here only when its pieces are exactly the ones it would write; anything else
    (a failed file, an interruption) is simply rewritten.
    """

    def __init__(self, output_dir: Path, plan: Plan, bound: int):
        self.out = output_dir
        self.files = list(plan.files)
        self.staging = Staging(output_dir)
        self._index = {pf.key: i for i, pf in enumerate(self.files)}
        self._builder = LayoutBuilder(bound)
        self._staged: dict[int, dict[str, Any]] = {}  # unit -> its completion record
        self._cv = threading.Condition()
        self._ending = False  # fetch finished: close the last shard after the last file
        self._stop = False
        self._src_prefix = source_prefix(plan)
        self._fingerprint = ""
        self._shard: ShardWriter | None = None
        self._shard_index = -1
        self._pieces: list[Piece] = []
        self.written: Written = {}
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def start(self, fingerprint: str) -> None:
        """Once the run's tokenizer is checked against the staging (``fetch``'s start)."""
        self._fingerprint = fingerprint
        with contextlib.suppress(FileNotFoundError):  # it would name shards being rewritten
            (self.out / DATA_SOURCES).unlink()
        self._thread = threading.Thread(target=self._run, name="bolmo-shard-stream", daemon=True)
        self._thread.start()

    def staged(self, pf: PlannedFile, rec: dict[str, Any]) -> None:
        """``pf`` is staged, ``rec`` its completion record (called by the fetcher, from any thread)."""
        with self._cv:
            self._staged[self._index[pf.key]] = rec
            self._cv.notify()

    def finish(self) -> Written:
        """After a complete fetch: write what is left but the manifest; the shards written."""
        with self._cv:
            self._ending = True
            self._cv.notify()
        self._join()
        return self.written

    def abort(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._join()

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._shard is not None:  # stopped inside a shard: its temporaries go
            self._shard.abort()
            self._shard = None
        if self._error is not None:
            log.debug("writing shards while fetching stopped (%s); finalize writes them", self._error)

    def _run(self) -> None:
        try:
            for unit, pf in enumerate(self.files):
                with self._cv:
                    while unit not in self._staged and not self._stop and not self._ending:
                        self._cv.wait()
                    if self._stop or unit not in self._staged:
                        return
                    rec = self._staged[unit]
                self._unit(unit, pf, rec)
            if self._shard is not None:
                self._close_shard()
        except BaseException as exc:  # finalize_dir redoes whatever is missing, and reports errors itself
            self._error = exc

    def _unit(self, unit: int, pf: PlannedFile, rec: dict[str, Any]) -> None:
        if rec.get("tokenizer_fingerprint") != self._fingerprint:
            raise StateError(f"{pf.path} is not staged with this run's tokenizer")
        src = self._src_prefix + pf.path
        path = str(self.staging.arrow_path(pf))
        with pa.memory_map(path, "r") as source:
            n = pa.ipc.open_file(source).num_record_batches
        for b in range(n):
            with pa.memory_map(path, "r") as source:  # one batch mapped at a time (see _write_shard)
                batch = pa.ipc.open_file(source).get_batch(b)
                for k, piece in self._builder.add(unit, b, token_lengths(batch.column("tokens"))):
                    if self._stop:
                        return
                    if self._shard is None or k != self._shard_index:
                        if self._shard is not None:
                            self._close_shard()
                        self._shard, self._shard_index, self._pieces = ShardWriter(self.out, k), k, []
                    _write_piece(self._shard, piece, batch, src, STREAM_WRITE_TOKENS)
                    self._pieces.append(piece)
                del batch

    def _close_shard(self) -> None:
        assert self._shard is not None
        self.written[self._shard_index] = (self._pieces, self._shard.close())
        self._shard = None


def finalize_dir(
    output_dir: str | os.PathLike[str],
    max_tokens_per_file: int = 100_000_000,
    *,
    allow_incomplete: bool = False,
    ray: bool = False,
    ray_address: str | None = None,
    written: Written | None = None,
) -> dict[str, Any]:
    """Write shards, csv.gz files, the manifest and ``data_sources.txt`` from the staging
    (``written``: shards a ``ShardStream`` wrote meanwhile, kept where they match)."""
    if max_tokens_per_file < 1:
        raise UsageError("--max-tokens-per-file must be at least 1")
    out = Path(output_dir).resolve()
    plan = load_plan(out)
    if plan is None:
        raise StateError(f"{out} has no plan.json: run `bolmo-async fetch --output-dir {out}` (or `prepare`) first.")
    state_path = out / RUN_STATE
    if not state_path.exists():
        raise StateError(
            f"{out} has no {RUN_STATE}: nothing was fetched yet; run `bolmo-async fetch --output-dir {out}`."
        )
    state = json.loads(state_path.read_text())
    staging = Staging(out)
    records = [(pf, staging.done(pf)) for pf in plan.files]  # each completion marker read once
    missing = [pf.path for pf, rec in records if rec is None]
    if missing and not allow_incomplete:
        shown = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise StateError(
            f"{len(missing)} of {len(plan.files)} planned files are not staged yet:\n  {shown}\n"
            "Run `bolmo-async fetch` again (or the missing --worker shares) to finish them, or pass "
            "--allow-incomplete to write shards from what is staged (the manifest then says complete: false)."
        )
    # A crash from here on must not leave a data_sources.txt pointing at half-rewritten shards.
    with contextlib.suppress(FileNotFoundError):
        (out / DATA_SOURCES).unlink()
    skips = SkipCounter()
    src_prefix = source_prefix(plan)
    fingerprint = state["tokenizer"]["fingerprint"]
    arrows: list[Path] = []
    srcs: list[str] = []
    lengths: list[list[np.ndarray]] = []
    docs = tokens = 0
    for pf, rec in records:
        if rec is None:
            continue
        if rec.get("tokenizer_fingerprint") != fingerprint:
            raise StateError(f"staged {pf.path} was made with another tokenizer; rerun fetch with --force.")
        skips.merge(rec.get("skipped", {}))
        per_batch = []
        for batch in staging.read(pf):
            lens = token_lengths(batch.column("tokens"))
            per_batch.append(lens)
            docs += len(lens)
            tokens += int(lens.sum())
        arrows.append(staging.arrow_path(pf))
        srcs.append(src_prefix + pf.path)
        lengths.append(per_batch)
    plan_of_shards = layout(lengths, max_tokens_per_file)
    if ray:
        from .ray_exec import write_shards_with_ray

        shards = write_shards_with_ray(out, plan_of_shards, arrows, srcs, ray_address)
    else:
        shards = _write_shards_locally(out, plan_of_shards, arrows, srcs, written or {})
    # Remove shards of an earlier, larger finalize.
    keep = {Path(s["path"]).name for s in shards} | {Path(s["csv"]).name for s in shards}
    for p in out.iterdir():
        if _SHARD_RE.match(p.name) and p.name not in keep:
            p.unlink()
    manifest = {
        "format": "bolmo-async/1",
        "repo_id": plan.repo_id,
        "revision": plan.commit,
        "requested_revision": plan.revision,
        "data_fraction": plan.data_fraction,
        "seed": plan.seed,
        "dtype": "uint32",
        "layout": "raw little-endian memmap (no .npy header); np.memmap(path, dtype=np.uint32, mode='r')",
        "max_tokens_per_file": max_tokens_per_file,
        "tokenizer": state["tokenizer"],
        "shards": shards,
        "totals": {
            "tokens": tokens,
            "documents": docs,
            "shards": len(shards),
            "skipped_documents": dict(sorted(skips.counts.items())),
            "skipped_examples": skips.examples,
        },
        "complete": not missing,
        "missing_files": missing,
        "planned_files": len(plan.files),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    atomic_write_text(out / DATA_SOURCES, "".join(s["path"] + "\n" for s in shards))
    return manifest

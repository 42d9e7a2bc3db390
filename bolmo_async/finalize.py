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
import csv
import gzip
import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StateError, UsageError
from .models import SkipCounter
from .plan import load_plan
from .staging import Staging
from .util import atomic_write_text, maybe_fsync, raise_if_disk_full

log = logging.getLogger("bolmo_async")

SHARD_PREFIX = "bolmo_data_"
MANIFEST = "manifest.json"
DATA_SOURCES = "data_sources.txt"
RUN_STATE = "run.json"
_SHARD_RE = re.compile(rf"^{SHARD_PREFIX}\d{{5,}}\.(npy|csv\.gz)$")


def shard_name(i: int) -> str:
    return f"{SHARD_PREFIX}{i:05d}.npy"


class ShardWriter:
    """One shard being written to a temporary name, with its csv.gz rows and running sha256."""

    def __init__(self, output_dir: Path, index: int):
        self.path = (output_dir / shard_name(index)).resolve()
        self.csv_path = self.path.with_name(self.path.name[: -len(".npy")] + ".csv.gz")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.csv_tmp = self.csv_path.with_name(f".{self.csv_path.name}.tmp")
        self._f = open(self.tmp, "wb")  # noqa: SIM115 - closed in close()/abort()
        self._raw_csv = open(self.csv_tmp, "wb")  # noqa: SIM115
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw_csv, mtime=0, compresslevel=6)
        self.sha = hashlib.sha256()
        self.tokens = 0
        self.documents = 0  # csv rows (pieces of documents)

    def write(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype="<u4").data
        try:
            self._f.write(data)
        except OSError as exc:
            raise_if_disk_full(exc, self.tmp)
            raise
        self.sha.update(data)
        self.tokens += len(values)

    def rows(self, starts: list[int], ends: list[int], ids: list[str], src: str, locs: list[int]) -> None:
        """csv.gz rows ``start,end,id,src,loc`` (no header), written in one go."""
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(zip(starts, ends, ids, [src] * len(ids), locs, strict=True))
        self._gz.write(buf.getvalue().encode("utf-8"))
        self.documents += len(ids)

    def close(self) -> dict[str, Any]:
        try:
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
        for f in (self._f, self._raw_csv):
            with contextlib.suppress(Exception):
                f.close()
        for p in (self.tmp, self.csv_tmp):
            with contextlib.suppress(OSError):
                p.unlink()


@dataclass
class _Sharder:
    output_dir: Path
    bound: int
    index: int = 0
    current: ShardWriter | None = None

    def __post_init__(self) -> None:
        self.done: list[dict[str, Any]] = []

    def _shard(self) -> ShardWriter:
        if self.current is None:
            self.current = ShardWriter(self.output_dir, self.index)
            self.index += 1
        return self.current

    def _close(self) -> None:
        if self.current is not None and self.current.tokens:
            self.done.append(self.current.close())
            self.current = None

    def add_batch(self, values: np.ndarray, offsets: np.ndarray, ids: list[str], locs: list[int], src: str) -> None:
        """Documents ``i`` = ``values[offsets[i]:offsets[i+1]]``; consecutive fitting docs are written in one slice."""
        n = len(ids)
        i = 0
        while i < n:
            shard = self._shard()
            room = self.bound - shard.tokens
            length = int(offsets[i + 1] - offsets[i])
            if length > self.bound:
                self._split_document(values[offsets[i] : offsets[i + 1]], ids[i], src, locs[i])
                i += 1
                continue
            if length > room:
                self._close()
                continue
            # Take as many following documents as fit, in one write.
            limit = int(offsets[i]) + room
            j = int(np.searchsorted(offsets, limit, side="right")) - 1  # last boundary <= limit
            j = max(j, i + 1)
            j = min(j, n)
            base = shard.tokens - int(offsets[i])
            shard.rows(
                (offsets[i:j] + base).tolist(), (offsets[i + 1 : j + 1] + base).tolist(), ids[i:j], src, locs[i:j]
            )
            shard.write(values[offsets[i] : offsets[j]])
            i = j

    def _split_document(self, doc: np.ndarray, doc_id: str, src: str, loc: int) -> None:
        if self.current is not None and self.current.tokens:
            self._close()
        pos = 0
        while pos < len(doc):
            shard = self._shard()
            piece = doc[pos : pos + self.bound - shard.tokens]
            shard.rows([shard.tokens], [shard.tokens + len(piece)], [doc_id], src, [loc])
            shard.write(piece)
            pos += len(piece)
            if shard.tokens >= self.bound:
                self._close()

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        if self.current is not None:
            self.current.abort()
            self.current = None
        return self.done


def finalize_dir(
    output_dir: str | os.PathLike[str], max_tokens_per_file: int = 100_000_000, *, allow_incomplete: bool = True
) -> dict[str, Any]:
    """Write shards, csv.gz files, the manifest and ``data_sources.txt`` from the staging."""
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
    missing = [pf.path for pf in plan.files if staging.done(pf) is None]
    if missing and not allow_incomplete:
        shown = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise StateError(
            f"{len(missing)} of {len(plan.files)} planned files are not staged yet:\n  {shown}\n"
            "Run `bolmo-async fetch` again to finish them, or pass --allow-incomplete."
        )
    # A crash from here on must not leave a data_sources.txt pointing at half-rewritten shards.
    with contextlib.suppress(FileNotFoundError):
        (out / DATA_SOURCES).unlink()
    sharder = _Sharder(out, max_tokens_per_file)
    skips = SkipCounter()
    docs = tokens = 0
    src_prefix = f"hf://datasets/{plan.repo_id}@{plan.commit}/"
    fingerprint = state["tokenizer"]["fingerprint"]
    try:
        for pf in plan.files:
            rec = staging.done(pf)
            if rec is None:
                continue
            if rec.get("tokenizer_fingerprint") != fingerprint:
                raise StateError(f"staged {pf.path} was made with another tokenizer; rerun fetch with --force.")
            skips.merge(rec.get("skipped", {}))
            for batch in staging.read(pf):
                tok = batch.column("tokens")
                offsets = np.frombuffer(tok.buffers()[1], dtype=np.int64, count=len(tok) + 1, offset=tok.offset * 8)
                offsets = offsets - offsets[0]
                values = tok.flatten().to_numpy(zero_copy_only=False)
                ids = batch.column("id").to_pylist()
                locs = batch.column("loc").to_pylist()
                sharder.add_batch(values, offsets, ids, locs, src_prefix + pf.path)
                docs += len(ids)
                tokens += len(values)
        shards = sharder.finish()
    except BaseException:
        if sharder.current is not None:
            sharder.current.abort()
        raise
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

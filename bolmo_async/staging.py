"""The Arrow staging area: one IPC file per planned file, committed atomically.

A unit's staged file (``outdir.staged_name``) holds record batches ``(id, loc, tokens)``; its
marker (``outdir.marker_name``) is the completion record written after the Arrow file is in place (counts, skips, the verified sha256
of the download, and the size and checksum (``util.CHECKSUM``) of the staged file itself). A unit without its marker
is not done and is redone; a staged file that no longer matches its marker is damaged and is
redone too; temporary files are never mistaken for finished ones.

The ``tokens`` column per tokenizer kind:

- subword: ``large_list<uint32>``, the ids of each document with its EOS;
- byte: ``large_binary``, each document's UTF-8 bytes followed by one byte ``0``, where its EOS
  goes. Bolmo byte ids are a fixed function of them (``b + 4``, then EOS ``1``), so they are
  expanded when shards are written: 4x less staging I/O and no id building while fetching. With
  the EOS's place in the column, the ids of a run of documents are one vectorised add over the
  staged bytes as they lie, the EOS ids set after (no per-document layout step: that was a
  third of the shard side's CPU). ``token_lengths``/``expand`` hide the difference.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from .models import PlannedFile, SkipCounter
from .outdir import NewFile, OutputDir, marker_name, staged_name
from .tokenize import BYTE_EOS, BYTE_OFFSET, large_offsets
from .util import CHECKSUM, new_checksum

log = logging.getLogger("bolmo_async")

#: Bumped when the staged layout changes: markers of another format are not "done" (refetched).
STAGING_FORMAT = 5


def staging_schema(kind: str) -> pa.Schema:
    tokens = pa.large_binary() if kind == "byte" else pa.large_list(pa.uint32())
    return pa.schema([("id", pa.string()), ("loc", pa.int64()), ("tokens", tokens)])


def token_lengths(col: pa.Array) -> np.ndarray:
    """Tokens per document of a staged ``tokens`` column (EOS included)."""
    return np.diff(large_offsets(col))


def expand(
    col: pa.Array, lo: int, hi: int, tok_lo: int = -1, tok_hi: int = -1, out: np.ndarray | None = None
) -> np.ndarray:
    """The uint32 ids of documents ``[lo, hi)``, or tokens ``[tok_lo, tok_hi)`` of document ``lo``;
    written into ``out`` (exactly that many uint32) when given."""
    offsets = large_offsets(col)
    if pa.types.is_large_binary(col.type):
        if tok_lo >= 0:
            start, end = int(offsets[lo]) + tok_lo, int(offsets[lo]) + tok_hi
            ends = offsets[lo + 1 : lo + 2] if end == int(offsets[lo + 1]) else offsets[:0]
        else:
            start, end = int(offsets[lo]), int(offsets[hi])
            ends = offsets[lo + 1 : hi + 1]
        data = np.frombuffer(col.buffers()[2], dtype=np.uint8, count=end - start, offset=start)
        out = np.add(data, BYTE_OFFSET, dtype=np.uint32, out=out)
        out[ends - (start + 1)] = BYTE_EOS  # where the 0 after each document is
        return out
    values = np.frombuffer(col.buffers()[3], dtype="<u4", count=int(offsets[-1]))
    if tok_lo >= 0:
        ids = values[int(offsets[lo]) + tok_lo : int(offsets[lo]) + tok_hi]
    else:
        ids = values[int(offsets[lo]) : int(offsets[hi])]
    if out is None:
        return ids
    out[:] = ids
    return out


def unverified_prefix(rec: dict[str, Any]) -> bool:
    """A completion record of a JSON-lines prefix read without its file's hash checked
    (``--no-verify-prefixes``): a run that checks prefixes stages it again."""
    return rec.get("sha256") is None and "read_bytes" in rec


#: Damaged markers already warned of.
_WARNED: set[str] = set()


def _count(v: Any) -> bool:
    return type(v) is int and v >= 0


#: A completion record's fields read back, and what each must be (``StagingWriter.commit``).
_MARKER_FIELDS: dict[str, tuple[Any, str]] = {
    "documents": (_count, "a count"),
    "tokens": (_count, "a count"),
    "staged_bytes": (_count, "a count"),
    "tokenizer_fingerprint": (lambda v: isinstance(v, str), "text"),
    f"staged_{CHECKSUM}": (lambda v: isinstance(v, str), "text"),
    "sha256": (lambda v: v is None or isinstance(v, str), "text or null"),
}
_OPTIONAL_FIELDS: dict[str, tuple[Any, str]] = {
    "read_bytes": (_count, "a count"),
    "unreadable": (lambda v: isinstance(v, str), "text"),
}


def marker_problem(rec: dict[str, Any]) -> str | None:
    """What is wrong with the shape of a completion record read back (hand-edited, damaged,
    another program's), or None: every field used is checked, so none is a crash later."""
    for name, (ok, what) in _MARKER_FIELDS.items():
        if name not in rec:
            return f"no {name!r}"
        if not ok(rec[name]):
            return f"{name!r} is not {what}"
    for name, (ok, what) in _OPTIONAL_FIELDS.items():
        if name in rec and not ok(rec[name]):
            return f"{name!r} is not {what}"
    skipped = rec.get("skipped")
    counts = skipped.get("counts") if isinstance(skipped, dict) else None
    examples = skipped.get("examples") if isinstance(skipped, dict) else None
    if not (
        isinstance(counts, dict)
        and isinstance(examples, dict)
        and all(isinstance(k, str) and _count(v) for k, v in counts.items())
        and all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
            for k, v in examples.items()
        )
    ):
        return "'skipped' is not counts and examples by reason"
    return None


class Staging:
    """The staging area of an output folder (``outdir.staged_name`` / ``outdir.marker_name``)."""

    def __init__(self, out: OutputDir):
        self.out = out

    def done(self, pf: PlannedFile) -> dict[str, Any] | None:
        """The completion record of ``pf`` if its marker and a staged file of the recorded size
        are present (cheap: no read of the staged file; ``checked`` reads it)."""
        try:
            raw = self.out.read_bytes(marker_name(pf.key))
            if raw is None:
                return None
            rec = json.loads(raw)
        except (OSError, ValueError, RecursionError):
            return None
        if not isinstance(rec, dict):
            return None
        if rec.get("path") != pf.path or rec.get("limit") != pf.limit or rec.get("format") != STAGING_FORMAT:
            return None
        wrong = marker_problem(rec)
        if wrong:
            self._warn_once(
                marker_name(pf.key),
                "%s: its staging marker %s is damaged (%s): the file is not staged (a fetch stages it again)",
                pf.path,
                wrong,
            )
            return None
        size = self.out.size(staged_name(pf.key))
        if rec.get("staged_bytes") == size:
            return rec
        self._warn_once(  # a truncated or removed staged file: said, not only "not staged"
            staged_name(pf.key),
            "%s: its staged file %s %s, where its marker records %d bytes (truncated, or removed by hand?): "
            "the file is not staged (a fetch stages it again)",
            pf.path,
            "is missing" if size is None else f"has {size} bytes",
            rec["staged_bytes"],
        )
        return None

    def _warn_once(self, name: str, message: str, path: str, *args: Any) -> None:
        """``message`` (``path``, where ``name`` is, then ``args``), said once per process however
        often the staging is read."""
        where = f"{self.out.location.rstrip('/')}/{name}"
        if where not in _WARNED:
            _WARNED.add(where)
            log.warning(message, path, where, *args)

    def intact(self, pf: PlannedFile, rec: dict[str, Any]) -> bool:
        """The staged file still has the checksum its marker vouches for."""
        try:
            return self.out.checksum(staged_name(pf.key)) == rec.get(f"staged_{CHECKSUM}")
        except OSError:
            return False

    def checked(self, pf: PlannedFile) -> dict[str, Any] | None:
        """``done`` plus the staged file's checksum; a damaged unit is removed (so it is redone)."""
        rec = self.done(pf)
        if rec is None:
            return None
        if self.intact(pf, rec):
            return rec
        log.warning("%s: its staged file no longer matches its marker (damaged on disk?); fetching it again", pf.path)
        self.remove(pf)
        return None

    def remove(self, pf: PlannedFile) -> None:
        self.out.remove(marker_name(pf.key))
        self.out.remove(staged_name(pf.key))

    def writer(self, pf: PlannedFile, fingerprint: str, kind: str) -> StagingWriter:
        return StagingWriter(self, pf, fingerprint, kind)

    def read(self, pf: PlannedFile) -> Iterator[pa.RecordBatch]:
        """The staged batches of ``pf`` in order (memory-mapped on local disk)."""
        with self.out.open_input(staged_name(pf.key)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                yield reader.get_batch(i)

    def lengths(self, pf: PlannedFile) -> list[np.ndarray]:
        """Tokens per document of each staged batch of ``pf`` (reads only what it needs)."""
        return [token_lengths(batch.column("tokens")) for batch in self.read(pf)]

    def claim(self, pf: PlannedFile) -> contextlib.AbstractContextManager[bool]:
        """Hold ``pf``'s unit while staging it: False when another run holds it now (two
        overlapping ``--worker`` shares), so no run ever touches another's temporaries."""
        return self.out.claim(pf.key)

    def clean_temporaries(self, files: list[PlannedFile]) -> int:
        """Remove temporary files that killed runs left for ``files`` (only while holding their
        claim: other workers may be writing theirs in the same folder); returns how many."""
        return sum(self.out.clean_temporaries(pf.key) for pf in files)


class StagingWriter:
    """Writes one planned file's batches to a new file; ``commit`` puts it in place, then its marker."""

    def __init__(self, staging: Staging, pf: PlannedFile, fingerprint: str, kind: str):
        self.staging = staging
        self.pf = pf
        self.fingerprint = fingerprint
        self.schema = staging_schema(kind)
        self._file = _HashingFile(staging.out.new_file(staged_name(pf.key)))
        self._sink: Any = pa.PythonFile(self._file, mode="w")
        self._writer: Any = pa.ipc.new_file(self._sink, self.schema)
        self.documents = 0
        self.tokens = 0
        self.lengths: list[np.ndarray] = []  # tokens per document of each batch written

    def write(self, ids: pa.Array, locs: pa.Array, tokens: pa.Array) -> int:
        """Stage one batch; returns its number of tokens."""
        batch = pa.RecordBatch.from_arrays([ids, locs, tokens], schema=self.schema)
        self._writer.write_batch(batch)
        lengths = token_lengths(tokens)
        self.lengths.append(lengths)
        n = int(lengths.sum())
        self.documents += len(ids)
        self.tokens += n
        return n

    def commit(self, extra: dict[str, Any], skips: SkipCounter) -> dict[str, Any]:
        try:
            self._writer.close()  # closes the Arrow sink, not the file below it
            self._file.target.commit()
        except BaseException:
            self.abort()
            raise
        record = {
            "path": self.pf.path,
            "limit": self.pf.limit,
            "format": STAGING_FORMAT,
            "documents": self.documents,
            "tokens": self.tokens,
            "tokenizer_fingerprint": self.fingerprint,
            "staged_bytes": self._file.size,
            f"staged_{CHECKSUM}": self._file.checksum.hexdigest(),
            "skipped": skips.to_json(),
            **extra,
        }
        self.staging.out.write_text(marker_name(self.pf.key), json.dumps(record, sort_keys=True) + "\n")
        return record

    def unlink_early(self) -> None:
        """From another thread while a batch may be being written: the temporary goes now."""
        self._file.target.unlink_early()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.close()
        self._file.target.abort()


class _HashingFile(io.RawIOBase):
    """A binary file that hashes what is written through it (the staged file's checksum, for free)."""

    def __init__(self, target: NewFile):
        self.target = target
        self.checksum = new_checksum()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.checksum.update(b)
        n = self.target.write(b)
        self.size += n
        return n

    def flush(self) -> None:
        self.target.flush()

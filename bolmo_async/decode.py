"""Compressed bytes -> batches of documents (``id``, ``loc``, ``text``) as Arrow record batches.

Incremental: bytes are fed as they arrive and complete lines come out; nothing holds a whole
file. JSON lines are parsed by Arrow's C++ reader in blocks (fast path) and, when a block has
something odd in it, line by line with ``json`` to count and report each bad line exactly.

A prefix decoder (``limit``) stops taking documents once ``limit`` compressed bytes have been
fed (the lines complete at that point are taken, at least one document), so the documents a
prefix yields depend only on the file's bytes, never on how the network chunked them.
"""

from __future__ import annotations

import io
import json
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import zstandard

from .models import SkipCounter

#: Compressed bytes decompressed at a time.
FEED_SLICE = 64 * 1024
#: Text per batch of documents (what waits for the tokenizer, per open file, is a few of these).
BATCH_BYTES = 1 << 20

BATCH_SCHEMA = pa.schema([("id", pa.string()), ("loc", pa.int64()), ("text", pa.large_string())])
_JSON_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string())])
_PARSE = pj.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore", newlines_in_values=False)


class StreamError(Exception):
    """The compressed stream itself is corrupt or truncated (raised by ``Decompressor``)."""


class Decompressor:
    """zstd / gzip / identity, across concatenated frames or members."""

    def __init__(self, suffix: str):
        self.kind = "zst" if suffix.endswith(".zst") else "gz" if suffix.endswith(".gz") else "raw"
        self._obj: Any = None
        self._new()

    def _new(self) -> None:
        if self.kind == "zst":
            self._obj = zstandard.ZstdDecompressor().decompressobj()
        elif self.kind == "gz":
            self._obj = zlib.decompressobj(wbits=47)
        self._started = False

    def feed(self, data: bytes) -> bytes:
        if self.kind == "raw":
            return data
        out = []
        while data:
            self._started = True
            try:
                out.append(self._obj.decompress(data))
            except (zstandard.ZstdError, zlib.error) as exc:
                raise StreamError(f"corrupt {self.kind} stream: {exc}") from exc
            if self._obj.eof:
                data = self._obj.unused_data
                self._new()
            else:
                data = b""
        return b"".join(out)

    def finish(self) -> None:
        """At end of file: raise if a frame/member was left incomplete."""
        if self.kind != "raw" and self._started:
            raise StreamError(f"truncated {self.kind} stream (the file ends inside a frame)")


class LineDecoder:
    """Feed compressed bytes; collect complete JSON lines; ``take()`` parsed batches."""

    def __init__(
        self, path: str, suffix: str, skips: SkipCounter, limit: int | None = None, batch_bytes: int = BATCH_BYTES
    ):
        self.path = path
        self.skips = skips
        self.limit = limit
        self.batch_bytes = batch_bytes
        self._dec = Decompressor(suffix)
        self._pending = bytearray()  # decompressed bytes after the last newline
        self._blocks: list[bytes] = []  # runs of complete lines, without their final newline
        self._nlines = 0  # lines in _blocks
        self._lines_size = 0
        self._next_line = 1  # 1-based line number of the next line to come out
        self._first_line_of_batch = 1
        self.fed = 0
        self.documents = 0
        self.done = False  # no more documents wanted (prefix reached, or corrupt stream)
        self._prefix_reached = False

    # -- feeding -------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[pa.RecordBatch]:
        """Feed bytes; return the batches that became ready."""
        out: list[pa.RecordBatch] = []
        if self.done:
            self.fed += len(data)
            return out
        if self.limit is not None and not self._prefix_reached and self.fed + len(data) >= self.limit:
            cut = self.limit - self.fed
            out += self._feed(data[:cut])
            out += self._flush_lines()  # every line complete within the prefix is taken
            self._prefix_reached = True
            data = data[cut:]
            if self.documents > 0:
                self.done = True
                self.fed += len(data)
                return out
        out += self._feed(data)
        if self._prefix_reached and self.documents > 0:
            out += self._flush_lines()
            self.done = True
        return out

    def _feed(self, data: bytes) -> list[pa.RecordBatch]:
        self.fed += len(data)
        out: list[pa.RecordBatch] = []
        # Decompress in slices so that memory follows batch_bytes, whatever the compression ratio.
        for start in range(0, len(data), FEED_SLICE):
            try:
                plain = self._dec.feed(data[start : start + FEED_SLICE])
            except StreamError as exc:
                self._stream_failed(str(exc))
                return out + self._flush_lines()
            self._split(plain)
            if self._prefix_reached:
                # Past the prefix only the first document is wanted: parse line by line.
                out += self._flush_lines()
                if self.documents:
                    return out
            elif self._lines_size >= self.batch_bytes:
                out += self._flush_lines()
        return out

    def _split(self, plain: bytes) -> None:
        if not plain:
            return
        self._pending += plain
        end = self._pending.rfind(b"\n")
        if end < 0:
            return
        block = bytes(self._pending[:end])
        del self._pending[: end + 1]
        self._blocks.append(block)
        self._nlines += block.count(b"\n") + 1
        self._lines_size += len(block)

    def _stream_failed(self, why: str) -> None:
        self.skips.add("corrupt_stream", f"{self.path}: {why} after line {self._next_line + self._nlines - 1}")
        self._pending.clear()
        self.done = True

    def finish(self) -> list[pa.RecordBatch]:
        """End of file: the last line without a newline counts; a truncated stream is reported."""
        if self.done:
            return []
        try:
            self._dec.finish()
        except StreamError as exc:
            self.skips.add("truncated_stream", f"{self.path}: {exc} after line {self._next_line + self._nlines - 1}")
            self._pending.clear()
        if self._pending:
            self._blocks.append(bytes(self._pending))
            self._nlines += 1
            self._pending.clear()
        out = self._flush_lines()
        self.done = True
        return out

    # -- parsing -------------------------------------------------------------------------
    def _flush_lines(self) -> list[pa.RecordBatch]:
        if not self._blocks:
            return []
        data = self._blocks[0] if len(self._blocks) == 1 else b"\n".join(self._blocks)
        n, first = self._nlines, self._next_line
        self._blocks, self._nlines, self._lines_size = [], 0, 0
        self._next_line += n
        if self._prefix_reached and self.documents == 0:
            batch = self._parse_slow(data.split(b"\n"), first, stop_after_first=True)
        else:
            batch = self._parse_fast(data, n, first) or self._parse_slow(data.split(b"\n"), first)
        self.documents += batch.num_rows
        return [batch] if batch.num_rows else []

    def _parse_fast(self, data: bytes, n: int, first: int) -> pa.RecordBatch | None:
        """Arrow's JSON reader over ``n`` lines; None when the block needs the exact line-by-line path."""
        if not data or data[:1] == b"\n" or data[-1:] == b"\n" or b"\n\n" in data:
            return None  # blank lines: Arrow would drop them and shift the line numbers
        try:
            table = pj.read_json(
                io.BytesIO(data),
                read_options=pj.ReadOptions(use_threads=False, block_size=max(1 << 20, self.batch_bytes * 2)),
                parse_options=_PARSE,
            )
            if table.num_rows != n:
                return None
            text = table.column("text").combine_chunks()
            ids = table.column("id").combine_chunks()
            if text.null_count or ids.null_count:
                return None
            text.validate(full=True)  # UTF-8 check
            ids.validate(full=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return None
        empty = pc.equal(pc.binary_length(text), 0)
        n_empty = pc.sum(empty).as_py() or 0
        locs = pa.array(np.arange(first, first + n, dtype=np.int64))
        batch = pa.RecordBatch.from_arrays([ids, locs, text.cast(pa.large_string())], schema=BATCH_SCHEMA)
        if n_empty:
            idx = pc.indices_nonzero(empty).to_pylist()
            for i in idx:
                self.skips.add("empty_text", f"{self.path}:{first + i}")
            batch = batch.filter(pc.invert(empty))
        return batch

    def _parse_slow(self, lines: list[bytes], first: int, stop_after_first: bool = False) -> pa.RecordBatch:
        ids: list[str] = []
        locs: list[int] = []
        texts: list[str] = []
        for i, line in enumerate(lines):
            loc = first + i
            reason = None
            if not line.strip():
                reason = "blank_line"
            else:
                try:
                    obj = json.loads(line)
                except UnicodeDecodeError:
                    reason = "invalid_utf8"
                except ValueError:
                    reason = "invalid_json"
                else:
                    reason, doc_id, text = _check_doc(obj, self.path, loc)
            if reason:
                self.skips.add(reason, f"{self.path}:{loc}")
                continue
            ids.append(doc_id)
            locs.append(loc)
            texts.append(text)
            if stop_after_first:
                # Remaining lines are past the prefix; nothing after the first document is taken.
                break
        return pa.RecordBatch.from_arrays(
            [pa.array(ids, pa.string()), pa.array(locs, pa.int64()), pa.array(texts, pa.large_string())],
            schema=BATCH_SCHEMA,
        )


def _check_doc(obj: Any, path: str, loc: int) -> tuple[str | None, str, str]:
    if not isinstance(obj, dict):
        return "not_an_object", "", ""
    if "text" not in obj:
        return "missing_text", "", ""
    text = obj["text"]
    if not isinstance(text, str):
        return "text_not_string", "", ""
    if not text:
        return "empty_text", "", ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "lone_surrogate", "", ""
    doc_id = obj.get("id")
    if doc_id is None:
        doc_id = f"{path}:{loc}"
    return None, str(doc_id), text


def parquet_batch(table: pa.Table, path: str, first_row: int, skips: SkipCounter) -> pa.RecordBatch:
    """A parquet row group (``text`` and maybe ``id``) -> a document batch; ``loc`` is the 1-based row."""
    if "text" not in table.column_names:
        skips.add("missing_text", f"{path}: no 'text' column", n=table.num_rows)
        return pa.RecordBatch.from_arrays([pa.array([], t) for t in BATCH_SCHEMA.types], schema=BATCH_SCHEMA)
    texts = table.column("text").to_pylist()
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(texts)
    out_ids, out_locs, out_texts = [], [], []
    for i, (doc_id, text) in enumerate(zip(ids, texts, strict=True)):
        loc = first_row + i + 1
        reason, did, t = _check_doc({"id": doc_id, "text": text} if text is not None else {"id": doc_id}, path, loc)
        if reason:
            skips.add(reason, f"{path}:row {loc}")
            continue
        out_ids.append(did)
        out_locs.append(loc)
        out_texts.append(t)
    return pa.RecordBatch.from_arrays(
        [pa.array(out_ids, pa.string()), pa.array(out_locs, pa.int64()), pa.array(out_texts, pa.large_string())],
        schema=BATCH_SCHEMA,
    )

"""File bytes -> batches of documents (``Docs``: ``id``, ``loc`` as Arrow, texts as Python str).

Two readers behind one small interface (``feed(bytes) -> batches``, ``finish() -> batches``
for JSON lines; ``parquet_batch(table)`` per row group): pure functions of the file's bytes.

JSON lines (zstd, gzip or plain) are decompressed in fixed slices aligned to offsets in the
file, so what comes out, even of a damaged stream, never depends on how the network chunked
the bytes. Each complete line is parsed by msgspec, typed to the two fields wanted; a line it
does not take goes to ``json`` and ``check_doc``, which count and report it by reason. A line
longer than ``max_document_bytes`` is skipped and counted without being held.

A prefix decoder (``limit``) stops taking documents once ``limit`` compressed bytes have been
fed (the lines complete at that point are taken, at least one document).
"""

from __future__ import annotations

import functools
import json
import zlib
from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import zstandard

from .errors import DecodeError, StreamError
from .models import DEFAULT_MAX_DOCUMENT_BYTES, SkipCounter

#: Compressed bytes decompressed at a time, at offsets that are multiples of it.
FEED_SLICE = 64 * 1024
#: Output buffer of each zstd decompression call (a 64 KiB slice of text is rarely more).
ZSTD_WRITE_SIZE = 1048576
#: Text per batch of documents.
BATCH_BYTES = 1 << 20

BATCH_SCHEMA = pa.schema([("id", pa.string()), ("loc", pa.int64()), ("text", pa.large_string())])


class Decompressor:
    """zstd / gzip / identity, across concatenated frames or members."""

    def __init__(self, suffix: str):
        self.kind = "zst" if suffix.endswith(".zst") else "gz" if suffix.endswith(".gz") else "raw"
        self._obj: Any = None
        self._new()

    def _new(self) -> None:
        if self.kind == "zst":
            # One 1 MiB output buffer per slice instead of 128 KiB pieces joined.
            self._obj = zstandard.ZstdDecompressor().decompressobj(write_size=ZSTD_WRITE_SIZE)
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


def _doc_id(value: Any, path: str, loc: int) -> str:
    """A document's id as text (``path:loc`` when it has none, or one that is not valid text)."""
    if value is None:
        return f"{path}:{loc}"
    doc_id = value if isinstance(value, str) else json.dumps(value) if isinstance(value, dict | list) else str(value)
    try:
        doc_id.encode("utf-8")
    except UnicodeEncodeError:
        return f"{path}:{loc}"
    return doc_id


def check_doc(
    obj: Any, path: str, loc: int, text_field: str = "text", id_field: str = "id", max_bytes: int = 0
) -> tuple[str | None, str, str]:
    """(skip reason or None, id, text) of one parsed record."""
    if not isinstance(obj, dict):
        return "not_an_object", "", ""
    if text_field not in obj:
        return "missing_text", "", ""
    text = obj[text_field]
    if not isinstance(text, str):
        return "text_not_string", "", ""
    if not text:
        return "empty_text", "", ""
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return "lone_surrogate", "", ""
    if max_bytes and size > max_bytes:
        return "document_too_large", "", ""
    return None, _doc_id(obj.get(id_field), path, loc), text


class Docs:
    """A batch of documents: ``id`` (string) and ``loc`` (int64) as Arrow, the texts as Python
    str, which is what BPE engines take (the Arrow ``text`` column, which byte mode stages, is
    built on first use). ``column(name)`` reads like a record batch of ``BATCH_SCHEMA``."""

    __slots__ = ("_text", "ids", "locs", "texts")

    def __init__(self, ids: pa.Array, locs: pa.Array, texts: list[str]):
        self.ids, self.locs, self.texts = ids, locs, texts
        self._text: pa.Array | None = None

    @property
    def num_rows(self) -> int:
        return len(self.texts)

    @property
    def text_chars(self) -> int:
        return sum(map(len, self.texts))

    def text_array(self) -> pa.Array:
        if self._text is None:
            from .tokenize import string_array

            self._text = string_array(self.texts)
        return self._text

    def column(self, name: str) -> pa.Array:
        if name == "id":
            return self.ids
        if name == "loc":
            return self.locs
        return self.text_array()

    def filter(self, mask: Any) -> Docs:
        keep = np.asarray(mask, dtype=bool)
        flags = pa.array(keep)
        return Docs(
            self.ids.filter(flags),
            self.locs.filter(flags),
            [t for t, k in zip(self.texts, keep.tolist(), strict=True) if k],
        )

    @staticmethod
    def concat(parts: list[Docs]) -> Docs:
        if len(parts) == 1:
            return parts[0]
        return Docs(
            pa.concat_arrays([p.ids for p in parts]),
            pa.concat_arrays([p.locs for p in parts]),
            [t for p in parts for t in p.texts],
        )


def _empty_batch() -> Docs:
    return _batch([], [], [])


def _batch(ids: list[str], locs: list[int], texts: list[str]) -> Docs:
    return Docs(pa.array(ids, pa.string()), pa.array(locs, pa.int64()), texts)


class LineDecoder:
    """Feed compressed bytes; get parsed batches of the complete JSON lines."""

    def __init__(
        self,
        path: str,
        suffix: str,
        skips: SkipCounter,
        limit: int | None = None,
        batch_bytes: int = BATCH_BYTES,
        max_document_bytes: int = 0,
        text_field: str = "text",
        id_field: str = "id",
    ):
        self.path = path
        self.skips = skips
        self.limit = limit
        self.batch_bytes = batch_bytes
        self.max_document_bytes = max_document_bytes or DEFAULT_MAX_DOCUMENT_BYTES
        self.text_field, self.id_field = text_field, id_field
        self._json_array_possible = suffix.startswith(".json") and not suffix.startswith(".jsonl")
        self._dec = Decompressor(suffix)
        self._carry = bytearray()  # compressed bytes not yet decompressed (up to the next slice boundary)
        self._consumed = 0  # compressed bytes decompressed so far
        self._pending = bytearray()  # decompressed bytes after the last newline
        self._skipping_line = False  # inside a line longer than max_document_bytes
        self._blocks: list[bytes] = []  # runs of complete lines, without their final newline
        self._lines_size = 0
        self._next_line = 1  # 1-based line number of the first line in _blocks
        self.fed = 0
        self.documents = 0
        self.done = False  # no more documents wanted (prefix reached, or corrupt stream)
        self._prefix_reached = False

    # -- feeding -------------------------------------------------------------------------
    def feed(self, data: bytes) -> list[Docs]:
        """Feed bytes; return the batches that became ready."""
        out: list[Docs] = []
        if self.done:
            self.fed += len(data)
            return out
        if self.limit is not None and not self._prefix_reached and self.fed + len(data) >= self.limit:
            cut = self.limit - self.fed
            out += self._take(data[:cut])
            out += self._decompress(bytes(self._carry))  # everything up to the limit
            self._carry.clear()
            out += self._flush_lines()  # every line complete within the prefix is taken
            self._prefix_reached = True
            data = data[cut:]
            if self.documents > 0 or self.done:
                self.done = True
                self.fed += len(data)
                return out
        out += self._take(data)
        if self._prefix_reached and self.documents > 0:
            out += self._flush_lines()
            self.done = True
        return out

    def _take(self, data: bytes) -> list[Docs]:
        """Decompress whole aligned slices of what was fed; keep the rest for later."""
        self.fed += len(data)
        self._carry += data
        out: list[Docs] = []
        while not self.done:
            need = FEED_SLICE - (self._consumed % FEED_SLICE)
            if len(self._carry) < need:
                break
            with memoryview(self._carry) as view:
                piece = bytes(view[:need])
            del self._carry[:need]
            out += self._decompress(piece)
            if self._prefix_reached:
                # Past the prefix only the first document is wanted.
                out += self._flush_lines()
                if self.documents:
                    break
        return out

    def _decompress(self, piece: bytes) -> list[Docs]:
        if not piece or self.done:
            return []
        self._consumed += len(piece)
        try:
            plain = self._dec.feed(piece)
        except StreamError as exc:
            out = self._flush_lines()
            self.skips.add("corrupt_stream", f"{self.path}: {exc} after line {self._next_line - 1}")
            self._pending.clear()
            self.done = True
            return out
        out = self._split(plain)
        if self._lines_size >= self.batch_bytes and not self._prefix_reached:
            out += self._flush_lines()
        return out

    def _split(self, plain: bytes) -> list[Docs]:
        """Append decompressed bytes; complete lines go to ``_blocks``. Linear in the input: only
        the new bytes are searched, and a line over the size cap is dropped as it arrives."""
        out: list[Docs] = []
        if self._skipping_line:
            nl = plain.find(b"\n")
            if nl < 0:
                return out
            plain = plain[nl + 1 :]
            self._skipping_line = False
        if not plain:
            return out
        nl = plain.rfind(b"\n")
        if nl < 0:
            self._pending += plain
        else:
            # The complete lines are copied once (the partial line before them joined in front).
            with memoryview(plain) as view:
                block = b"".join((self._pending, view[:nl])) if self._pending else plain[:nl]
                self._pending = bytearray(view[nl + 1 :])
            self._blocks.append(block)
            self._lines_size += len(block)
            if len(block) > self.max_document_bytes:
                out += self._drop_long_lines()
        if len(self._pending) > self.max_document_bytes:
            out += self._flush_lines()
            self.skips.add("document_too_large", f"{self.path}:{self._next_line}")
            self._next_line += 1
            self._pending.clear()
            self._skipping_line = True
        return out

    def _drop_long_lines(self) -> list[Docs]:
        """The last block holds a line over the cap (it arrived in one piece): skip it, keep the rest."""
        block = self._blocks.pop()
        self._lines_size -= len(block)
        out: list[Docs] = []
        for line in block.split(b"\n"):
            if len(line) > self.max_document_bytes:
                out += self._flush_lines()
                self.skips.add("document_too_large", f"{self.path}:{self._next_line}")
                self._next_line += 1
            else:
                self._blocks.append(line)
                self._lines_size += len(line)
        return out

    def finish(self) -> list[Docs]:
        """End of file: the last line without a newline counts; a truncated stream is reported."""
        if self.done:
            return []
        out = self._decompress(bytes(self._carry))
        self._carry.clear()
        if self.done:
            return out
        try:
            self._dec.finish()
        except StreamError as exc:
            complete = sum(block.count(b"\n") + 1 for block in self._blocks)
            self.skips.add("truncated_stream", f"{self.path}: {exc} after line {self._next_line + complete - 1}")
            self._pending.clear()
        if self._pending and not self._skipping_line:
            self._blocks.append(bytes(self._pending))
            self._pending.clear()
        out += self._flush_lines()
        self.done = True
        return out

    # -- parsing -------------------------------------------------------------------------
    def _flush_lines(self) -> list[Docs]:
        if not self._blocks:
            return []
        blocks = self._blocks
        first = self._next_line
        self._blocks, self._lines_size = [], 0
        if first == 1 and self._json_array_possible and blocks[0].lstrip()[:1] == b"[":
            raise DecodeError(
                f"{self.path} holds a JSON array, not JSON lines (one document object per line). "
                "Convert it to JSON lines, or leave it out of the plan."
            )
        lines = blocks[0].split(b"\n") if len(blocks) == 1 else [x for blk in blocks for x in blk.split(b"\n")]
        self._next_line += len(lines)
        batch = self._parse(lines, first, stop_after_first=self._prefix_reached and self.documents == 0)
        self.documents += batch.num_rows
        return [batch] if batch.num_rows else []

    def _parse(self, lines: list[bytes], first: int, stop_after_first: bool = False) -> Docs:
        """One document per line, or a counted skip. Each line goes to msgspec, typed to the two
        fields wanted (the rest is checked as JSON and dropped, never built); a line it does not
        take (not an object, a missing or non-string field, invalid UTF-8, a lone surrogate...)
        goes to ``json`` and ``check_doc``, which name the reason. The two agree on every line
        msgspec takes (last duplicate key wins, same recursion limit), so the path taken never
        shows in the output."""
        ids: list[str] = []
        locs: list[int] = []
        texts: list[str] = []
        fast = _doc_decoder(self.text_field, self.id_field)
        for i, line in enumerate(lines):
            loc = first + i
            doc: Any = None
            if fast is not None:
                try:
                    doc = fast(line)
                except (msgspec.DecodeError, ValueError, RecursionError):
                    doc = None
            if doc is not None and doc.text:
                ids.append(doc.id if doc.id is not None else f"{self.path}:{loc}")
                text = doc.text
            else:
                reason, doc_id, text = self._slow_line(line, loc)
                if reason:
                    self.skips.add(reason, f"{self.path}:{loc}")
                    continue
                ids.append(doc_id)
            locs.append(loc)
            texts.append(text)
            if stop_after_first:
                # Remaining lines are past the prefix; nothing after the first document is taken.
                break
        return _batch(ids, locs, texts)

    def _slow_line(self, line: bytes, loc: int) -> tuple[str | None, str, str]:
        if not line.strip():
            return "blank_line", "", ""
        try:
            obj = json.loads(line)
        except UnicodeDecodeError:
            return "invalid_utf8", "", ""
        except RecursionError:
            return "json_too_deep", "", ""
        except ValueError:
            return "invalid_json", "", ""
        return check_doc(obj, self.path, loc, self.text_field, self.id_field, self.max_document_bytes)


@functools.cache
def _doc_decoder(text_field: str, id_field: str) -> Callable[[bytes], Any] | None:
    """msgspec's decoder of one JSON line into (text, id); None if the two fields are one."""
    if text_field == id_field:
        return None
    doc = msgspec.defstruct(
        "Doc", [("text", str), ("id", str | None, None)], rename={"text": text_field, "id": id_field}, gc=False
    )
    return msgspec.json.Decoder(doc).decode


def _texts(col: pa.ChunkedArray | pa.Array) -> list[Any]:
    """A text column's values as Python objects: str, or ``_INVALID`` for bytes that are not
    UTF-8, or the value itself for other types (counted by ``check_doc``)."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            col.validate(full=True)
            return col.to_pylist()
        except pa.ArrowInvalid:
            col = col.cast(pa.large_binary()) if pa.types.is_large_string(col.type) else col.cast(pa.binary())
    if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
        out: list[Any] = []
        for raw in col.to_pylist():
            if raw is None:
                out.append(None)
                continue
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(_INVALID)
        return out
    return col.to_pylist()


class _Invalid:
    """Marks a parquet text that is not valid UTF-8."""


_INVALID = _Invalid()


def parquet_batch(
    table: pa.Table,
    path: str,
    first_row: int,
    skips: SkipCounter,
    max_document_bytes: int = 0,
    text_field: str = "text",
    id_field: str = "id",
) -> Docs:
    """A parquet row group (``text`` and maybe ``id``) -> a document batch; ``loc`` is the 1-based row."""
    if text_field not in table.column_names:
        skips.add("missing_text", f"{path}: no {text_field!r} column", n=table.num_rows)
        return _empty_batch()
    texts = _texts(table.column(text_field))
    ids = _texts(table.column(id_field)) if id_field in table.column_names else [None] * len(texts)
    out_ids, out_locs, out_texts = [], [], []
    for i, (doc_id, text) in enumerate(zip(ids, texts, strict=True)):
        loc = first_row + i + 1
        if text is _INVALID:
            skips.add("invalid_utf8", f"{path}:row {loc}")
            continue
        rec = {id_field: None if doc_id is _INVALID else doc_id}
        if text is not None:
            rec[text_field] = text
        reason, did, t = check_doc(
            rec, path, loc, text_field, id_field, max_document_bytes or DEFAULT_MAX_DOCUMENT_BYTES
        )
        if reason:
            skips.add(reason, f"{path}:row {loc}")
            continue
        out_ids.append(did)
        out_locs.append(loc)
        out_texts.append(t)
    return _batch(out_ids, out_locs, out_texts)

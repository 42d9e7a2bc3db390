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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import msgspec
import numpy as np
import pyarrow as pa
import zstandard

try:  # Python 3.14+: the standard library's zstd (it has ``max_length``; python-zstandard has not)
    from compression import zstd as _zstd  # type: ignore[import-not-found,unused-ignore]
except ImportError:
    from backports import zstd as _zstd  # type: ignore[no-redef,unused-ignore]

from .errors import DecodeError, StreamError, TooManyFrames, UsageError, exhausted
from .models import DEFAULT_MAX_DOCUMENT_BYTES, SkipCounter
from .util import human_bytes


@functools.cache
def _gzip() -> tuple[Any, tuple[type[Exception], ...]]:
    """The inflater of gzip members and its errors: ISA-L's (``isal``: 2.3x zlib's rate on JSON
    lines here, the same bytes), or the standard library's zlib where ``isal`` has no build. Both
    check each member's CRC-32 and length. Imported by the first gzip file only."""
    try:
        from isal import isal_zlib

        isal_error: type[Exception] = isal_zlib.error  # type: ignore[assignment,unused-ignore]
        return isal_zlib, (zlib.error, isal_error)
    except ImportError:
        return zlib, (zlib.error,)


#: Compressed bytes decompressed at a time, at offsets that are multiples of it.
FEED_SLICE = 64 * 1024
#: Most decompressed bytes one decompression call gives (whatever the compression ratio: a
#: 64 KiB slice of a bomb can hold gigabytes).
OUT_PIECE = 1 << 20
#: Text per batch of documents.
BATCH_BYTES = 1 << 20
#: Lines that are not documents (each parsed twice in Python, a few microseconds) after which a
#: file that gave a hundred times fewer documents is not decoded further: a bomb of short bad lines
#: (``x`` on a billion lines, from a few KB) would otherwise take hours.
MAX_BAD_LINES = 100_000
#: The same in bytes of such lines: a few large ones (objects of 100,000 keys and no text, parsed
#: by ``json`` to name the reason: ~10 MB/s) are as slow per byte, and far fewer than
#: ``MAX_BAD_LINES`` of them fill gigabytes.
MAX_BAD_BYTES = 256 << 20
#: Frames (gzip members) after which a stream whose frames gave under ``SMALL_FRAME`` decompressed
#: bytes each on average is not decoded further. A frame costs 1.4 us even read by a reused
#: context (``TINY_FRAME``; 2.5 us a gzip member): a 750 MB file of empty 9-byte frames would hold a
#: decoding slot for minutes (20 with a new decompressor a frame) for nothing. Real files have a
#: few frames of megabytes (``zstd``, ``pzstd``, ``gzip``, a ``cat`` of such files); even an odd
#: writer's one frame per JSON line holds a line of 10 bytes or more (``{"t":"a"}`` and its newline,
#: with ``--text-field t``; ``{"text":"ab"}`` is 14: 16 refused such a file past 100,000 lines).
MAX_SMALL_FRAMES = 100_000
SMALL_FRAME = 8
#: A complete zstd frame of at most this many bytes is decompressed at once by a reused context
#: (``Decompressor._tiny_frames``): its output is under 4 MiB (4 bytes of magic and 1 of header,
#: then blocks of a 3-byte header each, one that gives output at least 4 bytes long and at most
#: 128 KiB: 31 of them), handed out ``out_piece`` at a time.
TINY_FRAME = 132

#: Longest document id (UTF-8 bytes) taken: a longer one skips its document (``id_too_large``). An
#: id is provenance, one line of a shard's .csv.gz; a 200 MB parquet id became a Python str (1.3 GB
#: of peak RSS) and a 200 MB index line.
MAX_ID_BYTES = 64 << 10

BATCH_SCHEMA = pa.schema([("id", pa.string()), ("loc", pa.int64()), ("text", pa.large_string())])


class Decompressor:
    """zstd / gzip / identity, across concatenated frames or members, with bounded output.

    ``give(data)`` hands over compressed bytes; ``read()`` returns the next at most ``out_piece``
    decompressed bytes, or ``b""`` once everything given so far is decompressed. The output of
    one call never depends on the compression ratio, so a bomb costs time linear in its output,
    never memory.
    """

    def __init__(self, suffix: str, out_piece: int = OUT_PIECE):
        self.kind = "zst" if suffix.endswith(".zst") else "gz" if suffix.endswith(".gz") else "raw"
        self.out_piece = out_piece
        self._obj: Any = None
        self._input = b""  # given, not yet passed to the codec
        self._more = False  # the last call was cut at out_piece: output may be waiting in the codec
        self.frames = 0  # frames (gzip members) ended so far
        self.out_bytes = 0  # decompressed bytes given so far
        self._tiny: Any = None  # python-zstandard's decompressor of tiny frames (``_tiny_frames``)
        self._ready = b""  # a tiny frame's output past ``out_piece``, not yet read
        self._bomb: TooManyFrames | None = None  # the stream is a bomb of frames: ``read`` raises this
        self._new()

    def _new(self) -> None:
        if self.kind == "zst":
            self._obj = _zstd.ZstdDecompressor()
        elif self.kind == "gz":
            self._obj = _gzip()[0].decompressobj(wbits=47)
        self._started = False  # the current frame/member has been given bytes
        self._more = False

    def give(self, data: bytes) -> None:
        if data:
            self._input = self._input + data if self._input else data

    def _frame_ended(self) -> None:
        """Count a frame that ended (all its output given or in hand); past ``MAX_SMALL_FRAMES``
        of them holding under ``SMALL_FRAME`` bytes each, the stream ends with ``TooManyFrames``
        (``_bomb``: raised by the next ``read`` once what was in hand is given)."""
        self.frames += 1
        if self.frames > MAX_SMALL_FRAMES and self.out_bytes < SMALL_FRAME * self.frames:
            what = "zstd frames" if self.kind == "zst" else "gzip members"
            self._bomb = TooManyFrames(
                f"not decoded past its first {self.frames} {what}: they held {self.out_bytes} bytes, "
                f"under {SMALL_FRAME} each (a bomb of empty frames: a real file has a few large ones)"
            )

    def _tiny_frames(self) -> bytes:
        """The complete zstd frames of at most ``TINY_FRAME`` bytes at the head of the input,
        decompressed by one reused context (1.4 us a frame, not the 10-15 us of a new
        decompressor), until they gave ``out_piece`` (one gives under 4 MiB: see ``TINY_FRAME``),
        what is past ``out_piece`` kept for the next ``read``. A frame that
        is longer, incomplete, or that this decoder refuses is left to the general path (which
        gives the same output, and the same error for a corrupt frame)."""
        data, pos, outs, size_out = self._input, 0, [], 0
        with memoryview(data) as view:
            while pos < len(data) and size_out < self.out_piece:
                try:
                    size = _zstd.get_frame_size(view[pos : pos + TINY_FRAME])
                    if self._tiny is None:
                        self._tiny = zstandard.ZstdDecompressor()
                    out = self._tiny.decompressobj().decompress(view[pos : pos + size])
                except (_zstd.ZstdError, zstandard.ZstdError):
                    break
                pos += size
                outs.append(out)
                size_out += len(out)
                self.out_bytes += len(out)
                self._frame_ended()
                if self._bomb:
                    break
        if pos:
            self._input = data[pos:]
        out = outs[0] if len(outs) == 1 else b"".join(outs)
        if len(out) > self.out_piece:
            out, self._ready = out[: self.out_piece], out[self.out_piece :]
        return out

    def read(self) -> bytes:
        if self.kind == "raw":
            out, self._input = self._input[: self.out_piece], self._input[self.out_piece :]
            return out
        if self._ready:  # the rest of a tiny frame's output
            out, self._ready = self._ready[: self.out_piece], self._ready[self.out_piece :]
            return out
        if self._bomb:
            raise self._bomb
        try:
            while True:
                if self._obj.eof:  # a frame/member ended: the next one starts with what followed it
                    self._frame_ended()
                    if self._bomb:
                        raise self._bomb
                    rest = self._obj.unused_data
                    self._new()
                    self._input = rest + self._input if rest else self._input
                if self.kind == "zst" and not self._started and self._input:
                    out = self._tiny_frames()
                    if out:
                        return out
                    if self._bomb:
                        raise self._bomb
                    if not self._input:
                        return b""
                if self.kind == "gz" and self._obj.unconsumed_tail:
                    data = self._obj.unconsumed_tail
                elif self.kind == "zst" and not self._obj.needs_input:
                    data = b""
                elif self._input:
                    data, self._input = self._input, b""
                elif self._more:
                    data = b""
                else:
                    return b""
                self._started = self._started or bool(data)
                out = self._obj.decompress(data, self.out_piece)
                self._more = len(out) >= self.out_piece
                if out:
                    self.out_bytes += len(out)
                    return bytes(out)
                if not data and not self._obj.eof:
                    return b""  # nothing was waiting after all
        except (_zstd.ZstdError, *_gzip()[1]) as exc:
            if refused := exhausted(exc):  # out of memory: the system's refusal, not a corrupt stream
                raise refused from exc
            raise StreamError(f"corrupt {self.kind} stream: {exc}") from exc

    def finish(self) -> None:
        """At end of file (after ``read`` gave ``b""``): raise if a frame/member was left incomplete."""
        if self.kind != "raw" and self._started and not self._obj.eof:
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
    doc_id = _doc_id(obj.get(id_field), path, loc)
    if id_too_large(doc_id):
        return "id_too_large", "", ""
    return None, doc_id, text


def id_too_large(doc_id: str) -> bool:
    """Whether ``doc_id`` is over ``MAX_ID_BYTES`` of UTF-8 (measured only when it may be)."""
    n = len(doc_id)
    return n > MAX_ID_BYTES or (n > MAX_ID_BYTES // 4 and len(doc_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES)


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
        flags = pa.array(keep.tolist(), pa.bool_())  # (from numpy, pa.array imports numpy.ma: 10-30 ms)
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
    """Feed compressed bytes; get parsed batches of the complete JSON lines.

    ``feed`` and ``finish`` return iterators that decode as they are consumed (at most
    ``OUT_PIECE`` decompressed bytes at a time, one batch at a time): consume each before
    feeding more. Memory stays bounded by the batch size and the document cap whatever the
    compression ratio; what is decoded never depends on how the bytes were chunked.
    """

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
        max_bad_lines: int = MAX_BAD_LINES,
        max_bad_bytes: int = MAX_BAD_BYTES,
    ):
        self.path = path
        self.skips = skips
        self.limit = limit
        self.max_bad_lines = max_bad_lines
        self.max_bad_bytes = max_bad_bytes
        self._bad_lines = 0  # lines the per-line path skipped
        self._bad_bytes = 0  # and their bytes
        self._gave_up = False  # too many of them: the rest of the file is not decoded
        self.batch_bytes = batch_bytes
        self.max_document_bytes = max_document_bytes or DEFAULT_MAX_DOCUMENT_BYTES
        self.text_field, self.id_field = text_field, id_field
        self._json_array_possible = suffix.startswith(".json") and not suffix.startswith(".jsonl")
        self._dec = Decompressor(suffix)
        self._queue = bytearray()  # fed, not yet looked at
        self._taken = 0  # compressed bytes moved from the queue to ``_carry``
        self._carry = bytearray()  # compressed bytes not yet decompressed (up to the next slice boundary)
        self._consumed = 0  # compressed bytes given to the decompressor so far
        self._pending = bytearray()  # decompressed bytes after the last newline
        self._skipping_line = False  # inside a line longer than max_document_bytes
        self._blocks: list[bytes] = []  # runs of complete lines, without their final newline
        self._lines_size = 0
        self._next_line = 1  # 1-based line number of the first line in _blocks
        self.fed = 0
        self.documents = 0
        self.done = False  # no more documents wanted (prefix reached, or corrupt stream)
        self._prefix_reached = False
        self._fields_seen: dict[str, None] = {}  # fields of records without the text field (first seen first)

    # -- feeding -------------------------------------------------------------------------
    def feed(self, data: bytes) -> Iterator[Docs]:
        """Feed bytes; an iterator of the batches that become ready (consume it)."""
        self.fed += len(data)
        if not self.done:
            self._queue += data
        return self._run()

    def _run(self) -> Iterator[Docs]:
        while not self.done and self._queue:
            if self.limit is not None and not self._prefix_reached:
                room = self.limit - self._taken
                if len(self._queue) >= room:
                    self._move(room)
                    yield from self._pump(partial=True)  # everything up to the limit
                    yield from self._flush_lines()  # every line complete within the prefix is taken
                    self._prefix_reached = True
                    if self.documents > 0:
                        self.done = True
                    continue
            self._move(len(self._queue))
            yield from self._pump()

    def _move(self, n: int) -> None:
        self._carry += self._queue[:n]
        del self._queue[:n]
        self._taken += n

    def _pump(self, partial: bool = False) -> Iterator[Docs]:
        """Decompress what was taken, one bounded piece at a time: whole aligned slices (and, if
        ``partial``, the rest too); stops when the decompressor needs bytes not yet fed."""
        while not self.done:
            try:
                plain = self._dec.read()
            except StreamError as exc:
                yield from self._flush_lines()
                self.skips.add(exc.reason, f"{self.path}: {exc} after line {self._next_line - 1}")
                self._pending.clear()
                self.done = True
                return
            if plain:
                yield from self._split(plain)
                if self._prefix_reached:
                    # Past the prefix only the first document is wanted.
                    yield from self._flush_lines()
                    if self.documents:
                        self.done = True
                elif self._lines_size >= self.batch_bytes:
                    yield from self._flush_lines()
                continue
            need = FEED_SLICE - (self._consumed % FEED_SLICE)
            if len(self._carry) < need and not (partial and self._carry):
                return
            with memoryview(self._carry) as view:
                piece = bytes(view[:need])
            del self._carry[:need]
            self._consumed += len(piece)
            self._dec.give(piece)

    def _split(self, plain: bytes) -> Iterator[Docs]:
        """Append decompressed bytes; complete lines go to ``_blocks``. Linear in the input: only
        the new bytes are searched, and a line over the size cap is dropped as it arrives."""
        if self._skipping_line:
            nl = plain.find(b"\n")
            if nl < 0:
                return
            plain = plain[nl + 1 :]
            self._skipping_line = False
        if not plain:
            return
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
                yield from self._drop_long_lines()
        if self._first_past_prefix():
            return  # what follows is not wanted (``_pump`` ends the decoding)
        if len(self._pending) > self.max_document_bytes:
            yield from self._flush_lines()
            if self._first_past_prefix():
                return
            self.skips.add("document_too_large", f"{self.path}:{self._next_line}")
            self._next_line += 1
            self._pending.clear()
            self._skipping_line = True

    def _first_past_prefix(self) -> bool:
        """Past the prefix, the one document wanted is taken: no line after it is looked at."""
        return self._prefix_reached and self.documents > 0

    def _drop_long_lines(self) -> Iterator[Docs]:
        """The last block holds a line over the cap (it arrived in one piece): skip it, keep the rest
        (found with numpy: a block can hold a million short lines)."""
        block = self._blocks.pop()
        self._lines_size -= len(block)
        starts, ends = _line_bounds(block)
        seg = 0  # the first line not yet kept or skipped
        for k in np.flatnonzero(ends - starts > self.max_document_bytes).tolist():
            if k > seg:
                self._blocks.append(block[starts[seg] : ends[k - 1]])
                self._lines_size += int(ends[k - 1] - starts[seg])
            yield from self._flush_lines()
            if self._gave_up or self._first_past_prefix():
                return
            self.skips.add("document_too_large", f"{self.path}:{self._next_line}")
            self._next_line += 1
            seg = k + 1
        if seg < len(starts):
            self._blocks.append(block[starts[seg] :])
            self._lines_size += len(block) - int(starts[seg])

    def finish(self) -> Iterator[Docs]:
        """End of file: the last line without a newline counts; a truncated stream is reported."""
        return self._finish()

    def _finish(self) -> Iterator[Docs]:
        yield from self._run()
        if self.done:
            return
        yield from self._pump(partial=True)
        if self.done:
            return
        try:
            self._dec.finish()
        except StreamError as exc:
            complete = sum(block.count(b"\n") + 1 for block in self._blocks)
            self.skips.add("truncated_stream", f"{self.path}: {exc} after line {self._next_line + complete - 1}")
            self._pending.clear()
        if self._pending and not self._skipping_line:
            self._blocks.append(bytes(self._pending))
            self._pending.clear()
        yield from self._flush_lines()
        self.done = True

    # -- parsing -------------------------------------------------------------------------
    def _flush_lines(self) -> Iterator[Docs]:
        if not self._blocks or self._gave_up:
            return
        blocks = self._blocks
        first = self._next_line
        self._blocks, self._lines_size = [], 0
        if first == 1 and self._json_array_possible and blocks[0].lstrip()[:1] == b"[":
            raise DecodeError(
                f"{self.path} holds a JSON array, not JSON lines (one document object per line). "
                "Convert it to JSON lines, or leave it out of the plan."
            )
        stop_after_first = self._prefix_reached and self.documents == 0
        data = blocks[0] if len(blocks) == 1 else b"\n".join(blocks)
        del blocks
        nls = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)  # the newlines, found once
        newlines = len(nls)
        if newlines * SHORT_LINE < len(data):
            whole = None if stop_after_first else self._whole_block(data, nls, first)
            if whole is not None:
                self._next_line += newlines + 1
                batch = whole
            else:
                lines = data.split(b"\n")
                self._next_line += len(lines)
                batch = self._parse(lines, range(first, first + len(lines)), stop_after_first)
        else:
            # Short lines on average (a run of blank lines, a bomb of newlines): the blank ones are
            # found and counted in bulk, never one Python object each.
            n = newlines + 1
            self._next_line += n
            if not data.strip():  # nothing but whitespace
                self.skips.add("blank_line", f"{self.path}:{first}", n=n)
                return
            starts, ends = _line_bounds(data)
            blank = _blank_lines(data, starts, ends)
            if blank.any():
                self.skips.add("blank_line", f"{self.path}:{first + int(np.argmax(blank))}", n=int(blank.sum()))
            keep = np.flatnonzero(~blank)
            lines = [data[s:e] for s, e in zip(starts[keep].tolist(), ends[keep].tolist(), strict=True)]
            batch = self._parse(lines, (keep + first).tolist(), stop_after_first)
        if first == 1:
            self._check_field(batch)
        self.documents += batch.num_rows
        if self._gave_up:
            self.done = True
        if batch.num_rows:
            yield batch

    def _parse(self, lines: list[bytes], locs_in: Iterable[int], stop_after_first: bool = False) -> Docs:
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
        for loc, line in zip(locs_in, lines):  # noqa: B905 - locs_in may be a range
            doc: Any = None
            if fast is not None:
                try:
                    doc = fast(line)
                except (msgspec.DecodeError, ValueError, RecursionError):
                    doc = None
            if doc is not None and doc.text and not (doc.id is not None and id_too_large(doc.id)):
                ids.append(doc.id if doc.id is not None else f"{self.path}:{loc}")
                text = doc.text
            else:
                reason, doc_id, text = self._slow_line(line, loc)
                if reason:
                    self.skips.add(reason, f"{self.path}:{loc}")
                    self._bad_lines += 1
                    self._bad_bytes += len(line)
                    if (
                        self._bad_lines > self.max_bad_lines or self._bad_bytes > self.max_bad_bytes
                    ) and self._bad_lines > 100 * (self.documents + len(texts)):
                        self.skips.add(
                            "too_many_bad_lines",
                            f"{self.path}: not decoded past line {loc}: {self._bad_lines} of its lines "
                            f"({human_bytes(self._bad_bytes)}) were not documents, {self.documents + len(texts)} were",
                        )
                        self._gave_up = True
                        break
                    continue
                ids.append(doc_id)
            locs.append(loc)
            texts.append(text)
            if stop_after_first:
                # Remaining lines are past the prefix; nothing after the first document is taken.
                break
        return _batch(ids, locs, texts)

    def _whole_block(self, data: bytes, nls: np.ndarray, first: int) -> Docs | None:
        """The lines of ``data`` (``nls``: the offsets of its newlines) decoded by one msgspec
        ``decode_lines`` call, if that is exactly what the lines one by one give (then none is a
        skip); else None (line by line).

        ``decode_lines`` reads a stream of JSON values, not lines: it skips blank lines, takes
        two values on one line, or one value over two lines. So the block is taken only when
        each line begins with ``{`` and ends with ``}`` (every newline sits between ``}`` and
        ``{``): a value cannot go on past such a line end (after an object closes inside a
        value, only ``,`` ``]`` ``}`` may follow, never ``{``), so each value lies within one
        line and each line starts one; with as many values as lines, each line is exactly one
        value, decoded by the very decoder the line-by-line path uses. Any error, an empty text,
        or a line not of that shape sends the whole block line by line (the reference path).
        On code this is 40% less msgspec time than a call per line (no line split, no decoder
        set-up per line)."""
        decode_lines = _lines_decoder(self.text_field, self.id_field)
        if decode_lines is None or data[:1] != b"{" or data[-1:] != b"}":
            return None
        n = len(nls) + 1
        if n > 1:
            view = np.frombuffer(data, dtype=np.uint8)
            if not ((view[nls - 1] == 0x7D).all() and (view[nls + 1] == 0x7B).all()):
                return None
        try:
            docs = decode_lines(data)
        except (msgspec.DecodeError, ValueError, RecursionError):
            return None
        if len(docs) != n:
            return None
        texts = [d.text for d in docs]
        if not all(texts):
            return None  # an empty text: a skip, counted by the line-by-line path
        ids = [d.id for d in docs]
        if any(i is not None and len(i) > MAX_ID_BYTES // 4 for i in ids):
            return None  # maybe an id over the cap: a skip, counted by the line-by-line path
        if None in ids:
            ids = [f"{self.path}:{first + i}" if v is None else v for i, v in enumerate(ids)]
        return _batch(ids, list(range(first, first + n)), texts)

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
        reason, doc_id, text = check_doc(obj, self.path, loc, self.text_field, self.id_field, self.max_document_bytes)
        if reason == "missing_text" and len(self._fields_seen) < 32:
            self._fields_seen.update(dict.fromkeys(k for k in obj if isinstance(k, str)))
        return reason, doc_id, text

    def _check_field(self, batch: Docs) -> None:
        """The file's first batch (its first megabyte, or all of a small file) gave no document
        and its records lack a text field the user named (``--text-field``, not the default):
        the field asked for is not this data's. That stops the run (every file would be skipped
        the same way), naming the fields found. Under the default field such a file is an odd
        one in the mix: its records are counted skips (``missing_text``), like any bad data."""
        if batch.num_rows or not self._fields_seen or self.text_field == DEFAULT_TEXT_FIELD:
            return
        raise missing_field_error(self.path, self.text_field, list(self._fields_seen), "records")


#: The text field of bolmo_mix (and dolma) records: the default of ``--text-field``.
DEFAULT_TEXT_FIELD = "text"


def missing_field_error(path: str, field: str, found: list[str], what: str) -> UsageError:
    shown = ", ".join(repr(f) for f in found[:12]) + (", ..." if len(found) > 12 else "")
    hint = next((f for f in found if f in ("text", "content", "body", "document", "raw_content")), None)
    return UsageError(
        f"--text-field {field!r}: {path} has no such field; its {what} have {shown}. "
        + (f"Pass --text-field {hint}" if hint else "Pass --text-field with the field holding the text")
        + " (or --exclude the files laid out otherwise)."
    )


#: Average bytes a line under which a batch's blank lines are found in bulk (a JSON document line
#: is longer: ``{"text":"a"}`` is 12 bytes).
SHORT_LINE = 16
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[list(b" \t\n\r\x0b\x0c")] = True  # what ``bytes.strip`` strips


def _line_bounds(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Start and end offsets of every line of ``data`` (newline-separated, none at the end)."""
    nls = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)
    starts = np.empty(len(nls) + 1, dtype=np.int64)
    starts[0] = 0
    starts[1:] = nls + 1
    ends = np.empty(len(nls) + 1, dtype=np.int64)
    ends[:-1] = nls
    ends[-1] = len(data)
    return starts, ends


def _blank_lines(data: bytes, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which lines hold nothing but ASCII whitespace (``not line.strip()``)."""
    solid = np.zeros(len(data) + 1, dtype=np.int64)
    np.cumsum(~_WHITESPACE[np.frombuffer(data, dtype=np.uint8)], out=solid[1:])
    return solid[ends] == solid[starts]


@functools.cache
def _decoder(text_field: str, id_field: str) -> msgspec.json.Decoder[Any] | None:
    """msgspec's decoder of a JSON document into (text, id); None if the two fields are one."""
    if text_field == id_field:
        return None
    doc = msgspec.defstruct(
        "Doc", [("text", str), ("id", str | None, None)], rename={"text": text_field, "id": id_field}, gc=False
    )
    return msgspec.json.Decoder(doc)


def _doc_decoder(text_field: str, id_field: str) -> Callable[[bytes], Any] | None:
    """Decodes one JSON line into (text, id)."""
    dec = _decoder(text_field, id_field)
    return None if dec is None else dec.decode


def _lines_decoder(text_field: str, id_field: str) -> Callable[[bytes], list[Any]] | None:
    """Decodes a run of JSON lines into their (text, id)s in one call (see ``_whole_block``)."""
    dec = _decoder(text_field, id_field)
    return None if dec is None else dec.decode_lines


def _texts(col: pa.ChunkedArray | pa.Array, max_bytes: int = 0) -> list[Any]:
    """A text column's values as Python objects: str, or ``_INVALID`` for bytes that are not
    UTF-8, ``_TOO_LARGE`` for a string or binary value over ``max_bytes`` (0: no cap), or the
    value itself for other types (counted by ``check_doc``). A value over the cap is told by its
    length in the Arrow buffers and never becomes a Python object: a 300 MB parquet text became a
    str and then its UTF-8 again (1.6 GB of peak RSS for one 300 MB value)."""
    if max_bytes and _is_text(col.type):
        chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
        values: list[Any] = []
        for chunk in chunks:
            start = 0
            for i in np.flatnonzero(_byte_lengths(chunk) > max_bytes).tolist():
                values += _texts(chunk.slice(start, i - start))
                values.append(_TOO_LARGE)
                start = i + 1
            values += _texts(chunk.slice(start))
        return values
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


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _byte_lengths(arr: pa.Array) -> np.ndarray:
    """The byte length of every value of a string or binary array, from its offsets (0 for a null)."""
    validity, offsets = arr.buffers()[:2]
    wide = pa.types.is_large_string(arr.type) or pa.types.is_large_binary(arr.type)
    assert offsets is not None
    at = np.frombuffer(offsets, dtype=np.int64 if wide else np.int32)[arr.offset : arr.offset + len(arr) + 1]
    lengths = np.diff(at)
    if validity is not None and arr.null_count:
        bits = np.unpackbits(np.frombuffer(validity, dtype=np.uint8), bitorder="little")
        lengths[bits[arr.offset : arr.offset + len(arr)] == 0] = 0
    return lengths


class _Invalid:
    """Marks a parquet text that is not valid UTF-8 (``_INVALID``), or one over the cap (``_TOO_LARGE``)."""


_INVALID = _Invalid()
_TOO_LARGE = _Invalid()


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
    texts = _texts(table.column(text_field), max_document_bytes or DEFAULT_MAX_DOCUMENT_BYTES)
    ids = _texts(table.column(id_field), MAX_ID_BYTES) if id_field in table.column_names else [None] * len(texts)
    out_ids, out_locs, out_texts = [], [], []
    for i, (doc_id, text) in enumerate(zip(ids, texts, strict=True)):
        loc = first_row + i + 1
        if text is _INVALID:
            skips.add("invalid_utf8", f"{path}:row {loc}")
            continue
        if text is _TOO_LARGE:
            skips.add("document_too_large", f"{path}:row {loc}")
            continue
        if doc_id is _TOO_LARGE:
            skips.add("id_too_large", f"{path}:row {loc}")
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

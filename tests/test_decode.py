"""Incremental decoding of every supported format, prefixes, and bad data counted by reason."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bolmo_async.decode import LineDecoder
from bolmo_async.models import SkipCounter

DOCS = [{"id": f"d{i}", "text": f"document {i} " + "é東🚀" * (i % 5) + "x" * (i * 37 % 300)} for i in range(200)]


def _jsonl(docs) -> bytes:
    return b"".join(json.dumps(d, ensure_ascii=False).encode() + b"\n" for d in docs)


def _compress(data: bytes, suffix: str) -> bytes:
    if suffix.endswith(".zst"):
        return zstandard.ZstdCompressor(level=3).compress(data)
    if suffix.endswith(".gz"):
        return gzip.compress(data, mtime=0)
    return data


def _decode(
    blob: bytes, suffix: str, chunks: list[int] | None = None, limit: int | None = None, piece: int | None = None
):
    skips = SkipCounter()
    dec = LineDecoder("f" + suffix, suffix, skips, limit=limit, batch_bytes=4096)
    if piece:  # decompressed bytes come in pieces this small: lines begin in one piece, end in another
        dec._dec.out_piece = piece
    batches = []
    pos = 0
    sizes = iter(chunks or [])
    while pos < len(blob):
        n = next(sizes, 1000) or 1
        batches += dec.feed(blob[pos : pos + n])
        pos += n
    batches += dec.finish()
    rows = [
        (i, loc, t)
        for b in batches
        for i, loc, t in zip(
            b.column("id").to_pylist(), b.column("loc").to_pylist(), b.column("text").to_pylist(), strict=True
        )
    ]
    return rows, skips


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz", ".jsonl", ".json"])
def test_every_format_round_trips(suffix):
    rows, skips = _decode(_compress(_jsonl(DOCS), suffix), suffix)
    assert [(r[0], r[2]) for r in rows] == [(d["id"], d["text"]) for d in DOCS]
    assert [r[1] for r in rows] == list(range(1, len(DOCS) + 1))
    assert skips.total == 0


def test_concatenated_frames_and_members():
    a, b = _jsonl(DOCS[:50]), _jsonl(DOCS[50:])
    z = zstandard.ZstdCompressor().compress(a) + zstandard.ZstdCompressor().compress(b)
    g = gzip.compress(a, mtime=0) + gzip.compress(b, mtime=0)
    for blob, suffix in ((z, ".jsonl.zst"), (g, ".jsonl.gz")):
        rows, skips = _decode(blob, suffix)
        assert len(rows) == len(DOCS) and skips.total == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 5000), min_size=1, max_size=50),
    st.integers(1, 30_000),
    st.sampled_from([".jsonl.zst", ".jsonl.gz", ".jsonl"]),
)
def test_prefix_is_independent_of_chunking(chunks, limit, suffix):
    blob = _compress(_jsonl(DOCS), suffix)
    limit = min(limit, len(blob) - 1)
    ref, _ = _decode(blob, suffix, [len(blob)], limit=limit)
    got, _ = _decode(blob, suffix, chunks, limit=limit)
    assert got == ref
    assert len(ref) >= 1  # at least one document
    assert ref == [(d["id"], i + 1, d["text"]) for i, d in enumerate(DOCS[: len(ref)])]


def test_prefix_takes_exactly_the_lines_complete_within_limit():
    data = _jsonl(DOCS)
    cut = len(_jsonl(DOCS[:10])) + 5  # ten whole lines and a bit of the 11th
    rows, _ = _decode(data, ".jsonl", limit=cut)
    assert len(rows) == 10


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl"])
@pytest.mark.parametrize("third", [500, 2_000_000])
def test_past_the_prefix_only_the_first_document_is_taken_among_lines_over_the_cap(suffix, third):
    """A limit inside a first line over ``max_document_bytes``: that line is skipped, the next
    document taken, and nothing after it (the documents after lines over the cap arriving in
    the same piece were taken too, and a line over the cap after it counted as a skip, also
    one longer than the piece)."""
    sizes = [500, 10, third, 10, 500, 10]
    docs = [{"id": f"d{i}", "text": "x" * n} for i, n in enumerate(sizes)]
    blob = _compress(_jsonl(docs), suffix)
    skips = SkipCounter()
    dec = LineDecoder("f" + suffix, suffix, skips, limit=1, max_document_bytes=400)
    batches = [*dec.feed(blob), *dec.finish()]
    assert [i for b in batches for i in b.column("id").to_pylist()] == ["d1"]
    assert skips.counts == {"document_too_large": 1}


BAD_LINES = [
    (b'{"id": "a", "text": "fine"}', None),
    (b'{"id": "b", "text": "fine \\ud83d\\ude80 pair"}', None),
    (b"{not json", "invalid_json"),
    (b'{"id": "c"}', "missing_text"),
    (b'{"id": "d", "text": 5}', "text_not_string"),
    (b'{"id": "e", "text": ""}', "empty_text"),
    (b'{"id": "f", "text": "bad \xff\xfe bytes"}', "invalid_utf8"),
    (b'{"id": "g", "text": "lone \\ud800 surrogate"}', "lone_surrogate"),
    (b"[1, 2]", "not_an_object"),
    (b"", "blank_line"),
    (b'{"id": "h", "text": "also fine"}', None),
]


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl"])
def test_bad_lines_are_counted_by_reason_and_the_rest_kept(suffix):
    blob = _compress(b"\n".join(line for line, _ in BAD_LINES) + b"\n", suffix)
    rows, skips = _decode(blob, suffix)
    assert [r[0] for r in rows] == ["a", "b", "h"]
    assert rows[1][2] == "fine 🚀 pair"
    assert [r[1] for r in rows] == [1, 2, 11]
    expected = {}
    for _, reason in BAD_LINES:
        if reason:
            expected[reason] = expected.get(reason, 0) + 1
    assert skips.counts == expected
    assert skips.examples["invalid_json"] == [f"f{suffix}:3"]


def test_truncated_zstd_keeps_complete_lines_and_reports():
    import random

    rng = random.Random(0)
    docs = [{"id": str(i), "text": f"{rng.getrandbits(4000):x}"} for i in range(500)]  # ~500 KB, several blocks
    blob = zstandard.ZstdCompressor(level=3).compress(_jsonl(docs))
    rows, skips = _decode(blob[: len(blob) * 2 // 3], ".jsonl.zst")
    assert 0 < len(rows) < len(docs)
    assert [r[2] for r in rows] == [d["text"] for d in docs[: len(rows)]]
    assert skips.counts == {"truncated_stream": 1}


def test_corrupt_gzip_is_reported_not_raised():
    blob = bytearray(gzip.compress(_jsonl(DOCS), mtime=0))
    for i in range(len(blob) // 2, len(blob) // 2 + 64):
        blob[i] ^= 0x5A
    rows, skips = _decode(bytes(blob), ".jsonl.gz")
    assert len(rows) < len(DOCS)
    assert set(skips.counts) <= {"corrupt_stream", "truncated_stream", "invalid_json", "invalid_utf8"}
    assert skips.total >= 1


def test_not_a_zstd_file():
    rows, skips = _decode(b"this is not zstd at all\n" * 10, ".jsonl.zst")
    assert rows == [] and skips.counts == {"corrupt_stream": 1}


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["id", "text", "x"]), inner, max_size=3)
    ),
    max_leaves=8,
)
_ODD_LINES = st.sampled_from(
    [
        b"",
        b"   ",
        b'{"text": "a"}{"text": "b"}',
        b'{"text": "dup", "text": "last"}',
        b'{"id": 7, "text": "int id"}',
        b'{"id": null, "text": "null id"}',
        b'{"id": "x", "text": ""}',
        b'{"text": "lone \\ud800"}',
        b'{"id": "\\udc00", "text": "bad id"}',
        b'{"text": "bad \xff utf8"}',
        b'{"text": "ctl \x01"}',
        b'{"text": "nan", "x": NaN}',
        b'\xef\xbb\xbf{"text": "bom"}',
        b'{"text": "deep", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"text": "\\u0000 nul"}',
        b'{"text": "cr"}\r',
        b"[1]",
        b'"text"',
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        _ODD_LINES
        | _JSON_VALUES.map(lambda v: json.dumps(v).encode())
        | st.dictionaries(st.sampled_from(["id", "text", "x"]), _JSON_VALUES, max_size=3).map(
            lambda d: json.dumps(d, ensure_ascii=False).encode()
        ),
        min_size=1,
        max_size=12,
    )
)
def test_typed_fast_path_and_json_path_agree_on_every_line(monkeypatch_lines):
    """Each line is parsed by msgspec (typed to id/text) or, when it does not take it, by json +
    check_doc. Whatever the line, the result is what json + check_doc alone give."""
    import bolmo_async.decode as decode

    blob = b"\n".join(monkeypatch_lines) + b"\n"
    fast = _decode(blob, ".jsonl")
    original = decode._doc_decoder
    decode._doc_decoder = lambda *_: None  # json + check_doc only
    try:
        slow = _decode(blob, ".jsonl")
    finally:
        decode._doc_decoder = original
    assert fast[0] == slow[0]
    assert fast[1].counts == slow[1].counts and fast[1].examples == slow[1].examples


# -- decompression bombs: bounded output per call, bounded memory and time ---------------------

_BOMB_SCRIPT = r"""
import io, resource, sys, time, zlib
import zstandard
from bolmo_async.decode import LineDecoder
from bolmo_async.models import SkipCounter

shape, mib, suffix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def pieces():
    if shape == "newlines":
        for _ in range(mib):
            yield b"\n" * (1 << 20)
    elif shape == "crlf":
        for _ in range(mib):
            yield b"\r\n" * (1 << 19)
    elif shape == "spaces":  # one line
        yield b'{"text": "'
        for _ in range(mib):
            yield b" " * (1 << 20)
        yield b'"}\n{"text": "after"}\n'
    elif shape == "tiny":  # "x" on every line
        for _ in range(mib):
            yield b"x\n" * (1 << 19)
    else:  # invalid lines of 1 MiB
        for _ in range(mib):
            yield b'{"text": "' + b"x" * ((1 << 20) - 11) + b"\n"
buf = io.BytesIO()
if suffix.endswith(".zst"):
    with zstandard.ZstdCompressor(level=3).stream_writer(buf, closefd=False) as w:
        for p in pieces():
            w.write(p)
else:
    z = zlib.compressobj(1, wbits=31)
    for p in pieces():
        buf.write(z.compress(p))
    buf.write(z.flush())
data = buf.getvalue()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
skips = SkipCounter()
dec = LineDecoder("bomb" + suffix, suffix, skips)
docs = 0
for i in range(0, len(data), 65536):  # as the network hands it over
    docs += sum(b.num_rows for b in dec.feed(data[i : i + 65536]))
docs += sum(b.num_rows for b in dec.finish())
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - before
print(len(data), grew, docs, dict(skips.counts))
"""


def _decode_bomb(shape: str, mib: int, suffix: str) -> tuple[int, int, int, dict]:
    """Decode a bomb of ``mib`` MiB in a fresh process: compressed size, how much its peak RSS grew
    while decoding (VmHWM, which no polling can miss), documents, skips."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _BOMB_SCRIPT, shape, str(mib), suffix], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    size, grew, docs, skips = done.stdout.split(" ", 3)
    return int(size), int(grew), int(docs), eval(skips)


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
@pytest.mark.parametrize(
    ("shape", "skips"),
    [
        ("newlines", {"blank_line": 256 << 20}),
        ("crlf", {"blank_line": 128 << 20}),
        ("spaces", {"document_too_large": 1}),
        ("invalid", {"invalid_json": 256}),
    ],
)
def test_a_decompression_bomb_decodes_in_bounded_memory(shape, skips, suffix):
    """256 MiB from a few KB (the issue's 2 GiB, scaled down): decompressed at most ``OUT_PIECE``
    at a time and split without a Python object per blank line, so memory grows by far less than
    the bomb (the document cap, 64 MiB, is the largest thing held: the line of spaces) and a
    newline bomb takes seconds, not minutes (the subprocess's timeout)."""
    size, grew, docs, got = _decode_bomb(shape, 256, suffix)
    assert size < 4 << 20  # a bomb: tens of KB (zstd), about 1 MB (gzip)
    assert got == skips and docs == (1 if shape == "spaces" else 0)
    assert grew < 100 << 20, f"peak RSS grew by {grew >> 20} MiB decoding a 256 MiB bomb"


def test_the_decompressor_never_returns_more_than_a_piece():
    """Every codec, across frames / members: each ``read`` is at most ``out_piece`` bytes, and the
    concatenation is the whole stream."""
    from bolmo_async.decode import Decompressor

    plain = b"\n" * (3 << 20) + b"tail"
    for suffix in (".zst", ".gz", ".jsonl"):
        blob = _compress(plain, suffix) * 2 if suffix != ".jsonl" else plain * 2
        dec = Decompressor(suffix, out_piece=1 << 16)
        out = []
        for i in range(0, len(blob), 100):
            dec.give(blob[i : i + 100])
            while piece := dec.read():
                assert len(piece) <= 1 << 16
                out.append(piece)
        dec.finish()
        assert b"".join(out) == plain * 2, suffix


def test_tiny_frames_read_by_one_context_give_the_same_bytes_in_pieces():
    """zstd frames of at most 132 bytes (up to 3 MiB of newlines each, or none) are read by one
    reused context: their output too comes at most ``out_piece`` at a time, whatever the feeding,
    among larger frames and a frame cut across feeds; a damaged tiny frame is the same error."""
    from bolmo_async.decode import TINY_FRAME, Decompressor
    from bolmo_async.errors import StreamError

    c = zstandard.ZstdCompressor(write_content_size=False)
    frames = [c.compress(b"\n" * (3 << 20)), c.compress(b""), c.compress(b"ab\n"), c.compress(bytes(range(256)) * 64)]
    assert [len(f) <= TINY_FRAME for f in frames] == [True, True, True, False]
    blob = b"".join(frames) * 3
    plain = (b"\n" * (3 << 20) + b"ab\n" + bytes(range(256)) * 64) * 3
    for step in (len(blob), 100, 7):
        dec = Decompressor(".zst", out_piece=1 << 15)
        out = []
        for i in range(0, len(blob), step):
            dec.give(blob[i : i + step])
            while piece := dec.read():
                assert len(piece) <= 1 << 15
                out.append(piece)
        dec.finish()
        assert b"".join(out) == plain, step
    bad = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(b"ab\n"))
    bad[-1] ^= 0xFF  # its checksum
    assert len(bad) <= TINY_FRAME
    for data in (bytes(bad), frames[1] + bytes(bad)):
        dec = Decompressor(".zst")
        dec.give(data)
        with pytest.raises(StreamError, match="corrupt zst stream"):
            while dec.read():
                pass


def test_a_flood_of_short_bad_lines_stops_decoding_the_file():
    """Lines that are not documents cost microseconds each in Python: a bomb of a billion ``x``
    lines would take hours. Past ``max_bad_lines`` of them with a hundred times fewer documents,
    the file is not decoded further (counted once); a file with some bad lines is untouched."""
    bad = b"x\n" * 100_000 + b'{"text": "late"}\n'
    skips = SkipCounter()
    dec = LineDecoder("f.jsonl", ".jsonl", skips, max_bad_lines=1000, batch_bytes=2000)
    docs = [t for b in [*dec.feed(bad), *dec.finish()] for t in b.texts]
    assert docs == [] and skips.counts["too_many_bad_lines"] == 1
    assert skips.counts["invalid_json"] == 1001
    assert "not decoded past line" in skips.examples["too_many_bad_lines"][0]
    mixed = (b"x\n" + b'{"text": "ok"}\n') * 3000
    skips = SkipCounter()
    dec = LineDecoder("f.jsonl", ".jsonl", skips, max_bad_lines=1000, batch_bytes=2000)
    assert sum(b.num_rows for b in [*dec.feed(mixed), *dec.finish()]) == 3000
    assert skips.counts == {"invalid_json": 3000}


def test_a_few_huge_lines_that_are_not_documents_stop_decoding_the_file_too():
    """Objects of thousands of keys and no text: each is parsed by ``json`` to name its reason
    (~10 MB/s), so far fewer than ``max_bad_lines`` of them (2 GiB from a few MB of zstd) held a
    slot for minutes. Past ``max_bad_bytes`` of such lines with a hundred times fewer documents,
    the file is not decoded further; a file with the same lines among documents is untouched."""
    line = json.dumps({f"k{i}": i for i in range(3000)}).encode() + b"\n"
    skips = SkipCounter()
    dec = LineDecoder("f.jsonl", ".jsonl", skips, max_bad_bytes=1 << 20, batch_bytes=2000)
    docs = [t for b in [*dec.feed(line * 200 + b'{"text": "late"}\n'), *dec.finish()] for t in b.texts]
    assert docs == [] and skips.counts["too_many_bad_lines"] == 1
    assert skips.counts["missing_text"] == (1 << 20) // (len(line) - 1) + 1 < 200  # (its newline not counted)
    assert "not decoded past line" in skips.examples["too_many_bad_lines"][0]
    mixed = (line + b'{"text": "ok"}\n') * 200
    skips = SkipCounter()
    dec = LineDecoder("f.jsonl", ".jsonl", skips, max_bad_bytes=1 << 20, batch_bytes=2000)
    assert sum(b.num_rows for b in [*dec.feed(mixed), *dec.finish()]) == 200
    assert skips.counts == {"missing_text": 200}


def test_a_bomb_of_short_bad_lines_ends_within_seconds():
    """256 MiB of ``x`` lines (134M lines, from a few KB): stopped after a hundred thousand of them."""
    size, grew, docs, got = _decode_bomb("tiny", 256, ".jsonl.zst")
    assert size < 1 << 20 and docs == 0
    assert got == {"invalid_json": 100_001, "too_many_bad_lines": 1}
    assert grew < 100 << 20


# Lines shaped like documents (they begin with "{" and end with "}") yet not one document each:
# what a whole-block decode would read differently from the lines one by one if it trusted the
# shape alone (two values on a line, a value over two lines, a blank line, an empty text...).
_BLOCK_TRAPS = st.sampled_from(
    [
        b'{"id": "a", "text": "one"}',
        b'{"text": "two"}',
        b'{"text": "esc \\" \\\\ \\n \\t \\u00e9 \\ud83d\\ude80 end"}',
        b'{"text": "a"}{"text": "b"}',
        b'{"text": "a"} {"text": "b"}',
        b'{"text": "a"},{"text": "b"}',
        b'{"text": "c", "x": [{}',
        b"{}]}",
        b'{"text": "c", "x": {"y": {}',
        b'{"z": 1}}',
        b'{"text": "c", "x": [',
        b'{"text": "d"}]}',
        b'{"text": "e", "x":',
        b'{"y": 1}}',
        b"{}",
        b'{"text": ""}',
        b'{"id": 5, "text": "int id"}',
        b'{"id": null, "text": "null id"}',
        b'{"text": "lone \\ud800"}',
        b'{"text": "bad \xff utf8"}',
        b'{"text": "ctl \x01"}',
        b'{"text": "cr"}\r',
        b"",
        b" ",
        b'{"text": "x" }',
        b' {"text": "lead"}',
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.one_of(
            _BLOCK_TRAPS,
            _BLOCK_TRAPS,
            _BLOCK_TRAPS,
            st.text(min_size=1).map(lambda t: json.dumps({"text": t}).encode()),
            st.dictionaries(st.sampled_from(["id", "text", "x"]), _JSON_VALUES, max_size=3).map(
                lambda d: json.dumps(d, ensure_ascii=False).encode()
            ),
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from([".jsonl", ".jsonl.zst"]),
    st.sampled_from([None, None, 1, 3, 16, 40]),
)
@example([b'{"text": "a"} {"text": "b"}', b""], ".jsonl", None)
@example([b'{"text": "a"} {"text": "b"}', b'{"text": "c", "x": [', b'{"text": "d"}]}'], ".jsonl", None)
@example([b'{"text": "a"},{"text": "b"}', b'{"text": "c", "x": [{}', b"{}]}"], ".jsonl", None)
@example([b'{"text": "a"}{"text": "b"}', b'{"text": "c", "x": {"y": {}', b'{"z": 1}}'], ".jsonl", None)
@example([b'{"text": "one"}', b'{"text": "two"}', b'{"text": "three"}'], ".jsonl", 20)
@example([b'{"text": "one"}', b'{"text": "two"} {"text": "x"}'], ".jsonl", 20)
def test_whole_block_decoding_equals_the_lines_one_by_one(lines, suffix, piece):
    """A run of lines decoded in one msgspec call gives exactly what the reference path (each
    line alone) gives: the same documents, ids, line numbers, skip reasons and examples; also
    when the decompressed bytes come in small pieces (lines cut across pieces)."""
    import bolmo_async.decode as decode

    blob = _compress(b"\n".join(lines) + b"\n", suffix)
    fast = _decode(blob, suffix, piece=piece)
    original = decode._lines_decoder
    decode._lines_decoder = lambda *_: None  # the line-by-line path only
    try:
        slow = _decode(blob, suffix)
    finally:
        decode._lines_decoder = original
    assert fast[0] == slow[0]
    assert fast[1].counts == slow[1].counts and fast[1].examples == slow[1].examples


def test_a_block_of_plain_documents_is_decoded_in_one_call(monkeypatch):
    """The fast path is really taken on ordinary lines (escapes included), and gives the same."""
    import bolmo_async.decode as decode

    calls = []
    original = decode._lines_decoder

    def counting(*args):
        dec = original(*args)
        return lambda block: calls.append(len(block)) or dec(block)

    monkeypatch.setattr(decode, "_lines_decoder", counting)
    docs = [{"id": f"c{i}", "text": f'def f{i}(x):\n\treturn "a\\\\b" + x  # {i}'} for i in range(300)]
    rows, skips = _decode(_compress(_jsonl(docs), ".jsonl.zst"), ".jsonl.zst")
    assert [(r[0], r[1], r[2]) for r in rows] == [(d["id"], i + 1, d["text"]) for i, d in enumerate(docs)]
    assert skips.total == 0 and calls


@pytest.mark.parametrize("damage", ["none", "crc", "length", "block", "truncated"])
def test_gzip_inflated_by_isal_gives_zlibs_bytes_and_documents(monkeypatch, damage):
    """gzip members are inflated by ISA-L (``isal``) where it is installed, 2.3x zlib's rate: the
    same bytes across members and random slices, the same documents and skips from a damaged
    member (the error's wording is the library's). The fallback, zlib, is the other side."""
    import random

    from bolmo_async import decode

    isal_zlib = pytest.importorskip("isal.isal_zlib")
    assert decode._gzip()[0] is isal_zlib  # the default where it is installed (a dependency)
    plain = _jsonl(DOCS)
    blob = bytearray(gzip.compress(plain[:9000], mtime=0) + gzip.compress(plain[9000:], compresslevel=1, mtime=0))
    if damage == "crc":
        blob[-6] ^= 1
    elif damage == "length":
        blob[-2] ^= 1
    elif damage == "block":
        blob[len(blob) // 2] ^= 0x5A
    elif damage == "truncated":
        del blob[-100:]
    rng = random.Random(damage)
    chunks = [rng.choice([1, 7, 100, 4096, 65536]) for _ in range(len(blob))]

    def run(module):
        monkeypatch.setattr(decode, "_gzip", lambda: (module, (module.error,)))
        dec = decode.Decompressor(".gz", out_piece=5000)
        out, error = [], None
        try:
            pos = 0
            for n in chunks:
                if pos >= len(blob):
                    break
                dec.give(bytes(blob[pos : pos + n]))
                pos += n
                while piece := dec.read():
                    assert len(piece) <= 5000
                    out.append(piece)
            dec.finish()
        except decode.StreamError as exc:
            error = type(exc).__name__
        rows, skips = _decode(bytes(blob), ".jsonl.gz", chunks=chunks[:200])
        return b"".join(out), error, [r[:2] for r in rows], skips.counts

    import zlib

    fast, slow = run(isal_zlib), run(zlib)
    assert fast[1:] == slow[1:]
    if damage in ("none", "truncated"):  # (a bad member's output before its error may be cut elsewhere)
        assert fast[0] == slow[0]
    if damage == "none":
        assert fast[0] == plain
        assert fast[1] is None and len(fast[2]) == len(DOCS)
    else:
        assert fast[1] == "StreamError" or fast[3]

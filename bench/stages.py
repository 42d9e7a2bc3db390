"""Where byte mode's worker CPU goes, stage by stage, on .jsonl.zst files (one core, in process).

    python bench/stages.py FILE.jsonl.zst [...]

Each stage runs alone over the whole input held in memory, so the numbers add up to about what
one worker spends per file: decompress (64 KiB slices, as fed), split lines, JSON decode (per
line, msgspec typed, with unescaping and the UTF-8 check), the whole decoder (``LineDecoder``:
all of the above plus batching), the staged column (UTF-8 of the texts), the staging write
(Arrow IPC + checksum, to a temporary file), and the shard side (byte ids, checksum, csv.gz
and the O_DIRECT writes, by the finalizer's own ``write_shard``).
Prints MB/s of text per stage.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bolmo_async import decode
from bolmo_async.models import SkipCounter
from bolmo_async.staging import expand, staging_schema
from bolmo_async.tokenize import ByteTokenizer


def main(paths: list[str]) -> None:
    best: dict[str, float] = {}
    for _ in range(3):  # fresh memory is slow on this VM at first touch: keep each stage's best
        t, mb = one_round(paths)
        best = {k: min(v, best.get(k, v)) for k, v in t.items()}
    for k, v in best.items():
        print(f"{k:55s} {v:7.3f} s  {mb / v:8.1f} MB/s")


def one_round(paths: list[str]) -> tuple[dict[str, float], float]:
    raw = [Path(p).read_bytes() for p in paths]
    t: dict[str, float] = {}

    def timed(name: str, fn):  # type: ignore[no-untyped-def]
        t0 = time.process_time()
        out = fn()
        t[name] = t.get(name, 0.0) + time.process_time() - t0
        return out

    plain = []
    for blob in raw:

        def dec(blob: bytes = blob) -> bytes:
            d = decode.Decompressor(".jsonl.zst")
            out = []
            for i in range(0, len(blob), decode.FEED_SLICE):  # as fed: aligned slices, bounded pieces
                d.give(blob[i : i + decode.FEED_SLICE])
                while piece := d.read():
                    out.append(piece)
            return b"".join(out)

        plain.append(timed("decompress", dec))
    lines = [timed("split lines", lambda p=p: p.split(b"\n")) for p in plain]
    fast = decode._doc_decoder("text", "id")
    assert fast is not None
    for ls in lines:
        timed("json decode (msgspec, per line)", lambda ls=ls: [fast(x) for x in ls if x])
    batches: list[decode.Docs] = []
    for i, blob in enumerate(raw):

        def whole(blob: bytes = blob, i: int = i) -> list[decode.Docs]:
            d = decode.LineDecoder(f"f{i}", ".jsonl.zst", SkipCounter())
            out = []
            for k in range(0, len(blob), 1 << 20):
                out += d.feed(blob[k : k + (1 << 20)])
            return out + list(d.finish())

        batches += timed("LineDecoder total (decompress+split+decode+batch)", whole)
    text = sum(b.num_rows and int(b.text_array().nbytes) for b in batches)  # warm, and count
    batches = [decode.Docs(b.ids, b.locs, b.texts) for b in batches]  # cold again
    tok = ByteTokenizer()
    cols = [
        timed("staged column (UTF-8 of the texts, 0 after each)", lambda b=b: tok.tokens_column(b.texts))
        for b in batches
    ]
    import threading

    import pyarrow as pa

    from bolmo_async import finalizer
    from bolmo_async.outdir import open_output
    from bolmo_async.staging import _HashingFile, token_lengths

    with tempfile.TemporaryDirectory(dir=".") as tmp:
        out = open_output(tmp)
        out.create()

        def stage() -> None:
            f = out.new_file("staging/s.arrow")
            w = pa.ipc.new_file(pa.PythonFile(_HashingFile(f), mode="w"), staging_schema("byte"))
            for b, c in zip(batches, cols, strict=True):
                w.write_batch(pa.RecordBatch.from_arrays([b.ids, b.locs, c], schema=staging_schema("byte")))
            w.close()
            f.commit()

        timed("staging write (IPC + checksum)", stage)
        layout = finalizer.LayoutBuilder(10**12)
        for k, c in enumerate(cols):
            layout.add(0, k, token_lengths(c))

        def shard() -> None:  # as a worker writes them: O_DIRECT blocks, XXH3, csv.gz
            for k, pieces in enumerate(layout.shards()):
                finalizer.write_shard(out, k, pieces, {0: "staging/s.arrow"}, {0: "src"}, 1, threading.Event())

        timed("byte ids + shard write (as shards are written)", shard)
        ids = [expand(c, 0, len(c)) for c in cols]
        timed("byte ids only", lambda: [expand(c, 0, len(c)) for c in cols])
        del ids
    mb = text / 1e6
    print(f"{len(raw)} files, {mb:.1f} MB of text, {sum(map(len, plain)) / 1e6:.1f} MB of JSON")
    return t, mb


if __name__ == "__main__":
    main(sys.argv[1:])

"""Differential fuzz of ``decode.Decompressor`` / ``decode.LineDecoder`` between two source trees.

    python bench/fuzz_decompressor.py --old /path/to/tree_a --new /path/to/tree_b [--cases N] [--seed S]

Each tree is imported in its own subprocess (PYTHONPATH=tree): random multi-frame zstd / gzip
streams (tiny and large frames mixed, empty, skippable and checksummed frames, frames built block
by block, lines cut across frames), damaged or not (truncated, bit-flipped, garbage between or
after frames), fed in random slices with a random ``out_piece``. The two trees must give the same
output bytes and the same error (type, message, output before it), and the same documents and
skips through ``LineDecoder`` (a prefix read, ``limit``, in some cases). Every ``read`` must stay
within ``out_piece``. Differences are printed with the case's seed (``--only SEED`` reruns one)
and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pickle
import random
import struct
import subprocess
import sys
import tempfile

# -- cases ---------------------------------------------------------------------------------


def _lines(rng: random.Random) -> bytes:
    out = []
    for _ in range(rng.randint(1, 30)):
        r = rng.random()
        if r < 0.1:
            out.append(b"\n")  # blank line
        elif r < 0.2:
            out.append(b'{"text":"' + b"a" * rng.choice([1, 1000, 200_000, 2_000_000]) + b'"}\n')
        elif r < 0.25:
            out.append(b"not json\n")
        else:
            words = " ".join(rng.choice(["ab", "cde", "fgh", "\\u00e9", "x" * 40]) for _ in range(rng.randint(1, 300)))
            out.append(json.dumps({"id": f"d{rng.randrange(10**6)}", "text": words}).encode() + b"\n")
    return b"".join(out)


def _zstd_frame(rng: random.Random, data: bytes) -> bytes:
    import zstandard

    c = zstandard.ZstdCompressor(
        level=rng.choice([1, 3, 19]),
        write_checksum=rng.random() < 0.5,
        write_content_size=rng.random() < 0.5,
    )
    if data and rng.random() < 0.3:  # several blocks, flushed one by one
        obj = c.compressobj()
        parts, pos = [], 0
        while pos < len(data):
            step = rng.randint(1, max(1, len(data) // 3))
            parts.append(obj.compress(data[pos : pos + step]))
            parts.append(obj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
            pos += step
        parts.append(obj.flush())
        return b"".join(parts)
    return c.compress(data)


def _skippable(rng: random.Random) -> bytes:
    size = rng.choice([0, 1, 8, 100, 124, 125, 200, 5000])
    return struct.pack("<II", 0x184D2A50 + rng.randrange(16), size) + rng.randbytes(size)


def make_case(seed: int) -> dict:
    rng = random.Random(seed)
    kind = "zst" if rng.random() < 0.8 else "gz"
    plain = b"".join(_lines(rng) for _ in range(rng.randint(1, 4)))
    cuts = sorted(rng.sample(range(1, len(plain)), min(len(plain) - 1, rng.randint(0, 60)))) if len(plain) > 1 else []
    segs = [plain[a:b] for a, b in zip([0, *cuts], [*cuts, len(plain)], strict=True)]
    frames = []
    for seg in segs:
        if rng.random() < 0.15:
            frames.append(_skippable(rng) if kind == "zst" else gzip.compress(b""))
        if rng.random() < 0.1:
            frames.append(_zstd_frame(rng, b"") if kind == "zst" else gzip.compress(b""))
        frames.append(
            _zstd_frame(rng, seg) if kind == "zst" else gzip.compress(seg, compresslevel=rng.choice([1, 6, 9]))
        )
    blob = bytearray(b"".join(frames))
    damage = rng.random()
    if damage < 0.15 and len(blob) > 1:
        del blob[rng.randrange(1, len(blob)) :]
    elif damage < 0.35:
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(blob))
            blob[i] ^= 1 << rng.randrange(8)
    elif damage < 0.4:
        i = sum(map(len, frames[: rng.randrange(len(frames) + 1)]))
        blob[i:i] = rng.randbytes(rng.randint(1, 20))
    elif damage < 0.45:
        blob += rng.randbytes(rng.randint(1, 20))
    elif damage < 0.5:
        f = rng.choice(frames)
        blob += f[: rng.randrange(len(f))]
    blob = bytes(blob)
    chunk = rng.choice([1, 7, 100, 4096, 65536, len(blob) or 1, None])
    sizes = []
    left = len(blob)
    while left > 0:
        n = chunk if chunk else rng.randint(1, 3000)
        n = min(n, left)
        sizes.append(n)
        left -= n
    out_piece = rng.choice([1 << 20, 1 << 15, 4096, 333])
    limit = rng.randint(1, len(blob)) if blob and rng.random() < 0.3 else None  # a prefix read
    return {
        "seed": seed, "suffix": ".jsonl." + kind, "blob": blob, "sizes": sizes, "out_piece": out_piece, "limit": limit,
    }  # fmt: skip


# -- one tree --------------------------------------------------------------------------------


def run_case(case: dict) -> dict:
    from bolmo_async.decode import Decompressor, LineDecoder
    from bolmo_async.errors import StreamError
    from bolmo_async.models import SkipCounter

    blob, sizes, piece = case["blob"], case["sizes"], case["out_piece"]
    res: dict = {}
    dec = Decompressor(case["suffix"], out_piece=piece)
    h, n, pos, too_big, err = hashlib.sha256(), 0, 0, 0, None
    try:
        for size in sizes:
            dec.give(blob[pos : pos + size])
            pos += size
            while out := dec.read():
                too_big += len(out) > piece
                h.update(out)
                n += len(out)
        dec.finish()
    except StreamError as exc:
        err = (type(exc).__name__, str(exc))
    res["dec"] = (h.hexdigest(), n, err, too_big)
    skips = SkipCounter()
    ld = LineDecoder("f" + case["suffix"], case["suffix"], skips, limit=case.get("limit"))
    docs = hashlib.sha256()
    count, pos = 0, 0
    for size in sizes:
        for b in ld.feed(blob[pos : pos + size]):
            for i, t in zip(b.ids.to_pylist(), b.texts, strict=True):
                docs.update(f"{i}\0{len(t)}\0".encode() + t.encode("utf-8", "surrogatepass"))
                count += 1
        pos += size
    for b in ld.finish():
        for i, t in zip(b.ids.to_pylist(), b.texts, strict=True):
            docs.update(f"{i}\0{len(t)}\0".encode() + t.encode("utf-8", "surrogatepass"))
            count += 1
    res["lines"] = (docs.hexdigest(), count, skips.to_json())
    return res


def worker(case_file: str, result_file: str) -> None:
    import bolmo_async.decode

    with open(case_file, "rb") as f:
        cases = pickle.load(f)
    results = {"module": bolmo_async.decode.__file__, "cases": {}}
    for case in cases:
        results["cases"][case["seed"]] = run_case(case)
    with open(result_file, "wb") as f:
        pickle.dump(results, f)


# -- driver ----------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", type=int)
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    seeds = [args.only] if args.only is not None else range(args.seed, args.seed + args.cases)
    cases = [make_case(s) for s in seeds]
    with tempfile.TemporaryDirectory() as tmp:
        case_file = os.path.join(tmp, "cases.pkl")
        with open(case_file, "wb") as f:
            pickle.dump(cases, f)
        got = {}
        for name, tree in (("old", args.old), ("new", args.new)):
            out = os.path.join(tmp, name + ".pkl")
            env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
            subprocess.run(
                [sys.executable, __file__, "--old", "-", "--new", "-", "--worker", case_file, out], env=env, check=True
            )
            with open(out, "rb") as f:
                got[name] = pickle.load(f)
            print(f"{name}: {got[name]['module']}")
    bad = 0
    for case in cases:
        s = case["seed"]
        a, b = got["old"]["cases"][s], got["new"]["cases"][s]
        for part in ("dec", "lines"):
            if a[part] != b[part]:
                bad += 1
                print(
                    f"DIFF seed={s} {part} suffix={case['suffix']} len={len(case['blob'])} out_piece={case['out_piece']}"
                )
                print(f"  old: {a[part]}")
                print(f"  new: {b[part]}")
        for name, r in (("old", a), ("new", b)):
            if r["dec"][3]:
                bad += 1
                print(f"OVER seed={s} {name}: {r['dec'][3]} reads over out_piece")
    errors = sum(1 for c in cases if got["new"]["cases"][c["seed"]]["dec"][2])
    print(f"{len(cases)} cases ({errors} ending in an error), {bad} differences")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

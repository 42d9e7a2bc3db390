"""A benchmark mix of unique, real-looking web-sized documents (no document repeats).

A word-bigram model trained on the prose of Python's standard library (docstrings) writes
documents of a few KB each, with the things web text has and a word cache never saw before:
numbers, dates, prices, identifiers, URLs, a few multilingual sentences. No document is a copy
of another, so a tokenizer that caches documents, segments or words gains only what it would
gain on real web text. Laid out like bolmo_mix: ``data/<source>/<source>-NNNN.jsonl.zst``.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import defaultdict
from pathlib import Path

import zstandard

from bolmo_async.mirror.sample import MULTILINGUAL, SOURCES, _corpus

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|[0-9]+|[.,;:!?()]")


def _model(prose: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    nxt: dict[str, list[str]] = defaultdict(list)
    starts: list[str] = []
    for doc in prose:
        words = _WORD.findall(doc)
        if not words:
            continue
        starts.append(words[0])
        for a, b in itertools.pairwise(words):
            nxt[a].append(b)
    return dict(nxt), starts


def _novel(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.3:
        return str(rng.randint(0, 10 ** rng.randint(1, 7)))
    if r < 0.45:
        return f"{rng.randint(1990, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if r < 0.6:
        return f"${rng.randint(1, 9999)}.{rng.randint(0, 99):02d}"
    if r < 0.8:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 11))).capitalize()
    return f"https://www.{rng.choice(['example', 'news', 'shop', 'blog', 'wiki'])}{rng.randint(1, 9999)}.org/{rng.getrandbits(32):x}"


def _document(rng: random.Random, nxt: dict[str, list[str]], starts: list[str], size: int) -> str:
    out: list[str] = []
    n = 0
    word = rng.choice(starts)
    while n < size:
        if rng.random() < 0.04:
            tok = _novel(rng)
        else:
            choices = nxt.get(word)
            word = rng.choice(choices) if choices else rng.choice(starts)
            tok = word
        if tok in ".,;:!?)" and out:
            out[-1] += tok
        else:
            out.append(tok)
        n += len(tok) + 1
        if tok == "." and rng.random() < 0.15:
            out.append("\n\n" + (rng.choice(MULTILINGUAL) + " " if rng.random() < 0.05 else ""))
    return " ".join(out).replace(" \n\n ", "\n\n")


def build_bench_mix(folder: Path, size_mb: float, seed: int = 1, files_per_source: int = 4) -> dict[str, int]:
    """Write ``size_mb`` MB of unique documents (1-8 KB each) as .jsonl.zst, bolmo_mix's layout."""
    prose, _ = _corpus(8_000_000)
    nxt, starts = _model(prose)
    rng = random.Random(seed)
    total = int(size_mb * 1_000_000)
    docs = text = 0
    cctx = zstandard.ZstdCompressor(level=3, threads=-1)
    for source, share, _, _ in SOURCES:
        d = folder / "data" / source
        d.mkdir(parents=True, exist_ok=True)
        budget = int(total * share)
        for f in range(files_per_source):
            lines: list[bytes] = []
            made = 0
            while made < budget // files_per_source:
                t = _document(rng, nxt, starts, rng.randint(1000, 8000))
                rec = {"id": f"{source}-{f:04d}-{len(lines):07d}", "text": t, "source": source}
                lines.append(json.dumps(rec, ensure_ascii=False).encode("utf-8"))
                made += len(t.encode("utf-8"))
            (d / f"{source}-{f:04d}.jsonl.zst").write_bytes(cctx.compress(b"\n".join(lines) + b"\n"))
            docs += len(lines)
            text += made
    return {"documents": docs, "text_bytes": text}

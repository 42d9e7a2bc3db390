"""The exactness harness: does an engine give exactly the ``tokenizers`` reference's ids?

Runs any engine (``fastokens``, ``tiktoken``, ``tokenizers``) on a fixed adversarial corpus
(emoji and ZWJ sequences, CJK, combining marks, runs of thousands of spaces, newlines and
digits, U+180E, U+2028, astral code points, every added token as a literal inside text),
random Unicode, and optionally the documents of a sample folder, under both special-token
policies. An engine upgrade is judged with one command:

    python -m bolmo_async.exactness --tokenizer path/to/tokenizer.json --engine fastokens [--sample DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from .tokenize import SubwordTokenizer, TokenizerSource, load_tokenizer_source


def adversarial_texts(source: TokenizerSource, seed: int = 0, random_count: int = 600) -> list[str]:
    """The fixed corpus plus ``random_count`` random strings (deterministic for ``seed``)."""
    fixed = [
        "Hello world",
        "   leading and trailing spaces   ",
        " " * 5000,
        "\n" * 5000,
        "0123456789" * 500,
        "x" + " " * 5000 + "y",
        "a\u180eb",
        "line\u2028separator\u2029paragraph",
        "👩‍👩‍👧‍👦 family 🏳️‍🌈 flag 👍🏽 skin",
        "日本語のテキストと漢字、한국어 텍스트, 中文文本。",
        "e\u0301 a\u0300\u0301\u0302 combining" + "\u0301" * 200,
        "".join(chr(c) for c in range(0x10000, 0x10000 + 300, 7)),
        "\U0001f600\U0001f4a9\U000e0001\U0010fffd",
        "tabs\t\tand\r\nwindows\rlines",
        "'s 've 're 'll 't 'd 'm 'S 'VE",
        "ümlaut ß ÿ Ω ж א ع ह ไทย",
    ]
    spec = json.loads(source.json_text)
    for added in spec.get("added_tokens", []):
        tok = added["content"]
        fixed += [tok, f"a{tok}b", f" {tok} ", f"{tok}{tok}", f"text before {tok}\nand after"]
    rng = random.Random(seed)
    pools = [(0x20, 0x7E), (0x80, 0x2FFF), (0x3000, 0x9FFF), (0xAC00, 0xD7A3), (0x10000, 0x1FAFF), (0xE000, 0xF8FF)]
    for _ in range(random_count):
        chars = []
        for _ in range(rng.randint(0, 120)):
            r = rng.random()
            if r < 0.15:
                chars.append(rng.choice(" \n\t\r"))
            elif r < 0.2:
                chars.append(rng.choice([a["content"] for a in spec.get("added_tokens", [])] or ["x"]))
            else:
                lo, hi = rng.choice(pools)
                chars.append(chr(rng.randint(lo, hi)))
        fixed.append("".join(chars))
    return fixed


@dataclass(frozen=True)
class Mismatch:
    text: str
    got: list[int]
    want: list[int]
    special_tokens_as_text: bool


def compare(source: TokenizerSource, engine: str, texts: Iterable[str], batch: int = 256) -> list[Mismatch]:
    """Every text encoded by ``engine`` (in batches, as a run does) against the reference, under
    both special-token policies; the differences."""
    texts = list(texts)
    out: list[Mismatch] = []
    for as_text in (True, False):
        tok = SubwordTokenizer(source, engine=engine, special_tokens_as_text=as_text, check_every=0)
        for i in range(0, len(texts), batch):
            chunk = texts[i : i + batch]
            flat, offsets = tok.encode_batch(pa.array(chunk, pa.large_string()))
            for j, text in enumerate(chunk):
                got = flat[offsets[j] : offsets[j + 1] - 1].tolist()
                want = tok.encode_reference(text)
                if got != want:
                    out.append(Mismatch(text, got, want, as_text))
    return out


def sample_texts(folder: Path) -> list[str]:
    """The documents of a sample mix (JSON lines, compressed or not, and parquet)."""
    import gzip

    import pyarrow.parquet as pq
    import zstandard

    texts: list[str] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.name
        if name.endswith(".parquet"):
            texts += [t for t in pq.read_table(path, columns=["text"]).column("text").to_pylist() if t]
            continue
        raw = path.read_bytes()
        if name.endswith(".zst"):
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        elif name.endswith(".gz"):
            raw = gzip.decompress(raw)
        elif not name.endswith((".jsonl", ".json")):
            continue
        for line in raw.splitlines():
            try:
                text = json.loads(line).get("text")
            except (ValueError, AttributeError):
                continue
            if isinstance(text, str) and text:
                texts.append(text)
    return texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json, its folder, or a Hub repo id")
    ap.add_argument("--engine", default="fastokens", help="fastokens, tiktoken or tokenizers")
    ap.add_argument("--sample", type=Path, help="also every document of this folder (e.g. `mirror sample` output)")
    ap.add_argument("--random", type=int, default=2000, help="random strings (default 2000)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    source = load_tokenizer_source(args.tokenizer)
    texts = adversarial_texts(source, args.seed, args.random)
    if args.sample:
        texts += sample_texts(args.sample)
    bad = compare(source, args.engine, texts)
    for m in bad[:10]:
        print(
            f"MISMATCH (special_tokens_as_text={m.special_tokens_as_text}) {m.text[:60]!r}: {m.got[:12]} != {m.want[:12]}"
        )
    print(f"{args.engine}: {2 * len(texts) - len(bad)} of {2 * len(texts)} encodings equal the tokenizers reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

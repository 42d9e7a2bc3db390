"""Generate a deterministic, realistic sample of bolmo_mix's shape from offline text.

Text comes from Python's own standard library (docstrings as prose, modules as code) mixed
with fixed multilingual snippets, laid out as dolma-format JSON lines in one folder per
source, mostly ``.jsonl.zst``, with one parquet source, one ``.jsonl.gz``, one ``.json.zst``
and one plain ``.jsonl``. A few edge documents are planted: empty text, one document of
several MB, a text holding the literal ``<|endoftext|>``, dolma2's ``|||EMAIL_ADDRESS|||``.
"""

from __future__ import annotations

import ast
import gzip
import io
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

#: (source folder, share of the sample's bytes, kind of text, file layout)
SOURCES: tuple[tuple[str, float, str, tuple[str, ...]], ...] = (
    ("common_crawl", 0.45, "prose", (".jsonl.zst",) * 4),
    ("olmocr_science_pdfs", 0.12, "prose", (".jsonl.zst",) * 3),
    ("stack_edu", 0.17, "code", (".jsonl.zst",) * 3),
    ("finemath", 0.09, "prose", (".parquet",) * 2),
    ("arxiv", 0.06, "prose", (".jsonl.gz", ".json.zst")),
    ("wikipedia_wikibooks", 0.07, "prose", (".jsonl.zst", ".jsonl.zst", ".jsonl")),
    ("character_understanding", 0.04, "prose", (".jsonl.zst",)),
)

MULTILINGUAL = (
    "Les élèves étudièrent l'énergie cinétique à l'école; où est la bibliothèque?",
    "Grüße aus München: Die Straße ist naß, aber das Frühstück schmeckt großartig.",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "東京の天気は晴れです。明日は雨が降るかもしれません。",
    "기계 학습은 데이터로부터 학습하는 알고리즘을 연구한다.",
    "Математика — царица наук, а арифметика — царица математики.",
    "الذكاء الاصطناعي يغير العالم بسرعة كبيرة.",
    "Emoji check: 🚀🔥 👩‍🔬 🇫🇷 ✔️ — “curly quotes” and ‘single’ ones…",
    "Ελληνικά: η γνώση είναι δύναμη. Hindi: ज्ञान ही शक्ति है।",
)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__")
        )
        files += [Path(dirpath) / n for n in sorted(filenames) if n.endswith(".py")]
    return sorted(files)


def _corpus(need_bytes: int) -> tuple[list[str], list[str]]:
    """Docstrings (prose) and module sources (code) from the stdlib, at least ``need_bytes`` each."""
    prose: list[str] = []
    code: list[str] = []
    have_p = have_c = 0
    for path in _stdlib_files():
        if have_p >= need_bytes and have_c >= need_bytes:
            break
        try:
            src = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if have_c < need_bytes and 200 < len(src) < 200_000:
            code.append(src)
            have_c += len(src)
        if have_p < need_bytes:
            try:
                tree = ast.parse(src)
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        prose.append(doc)
                        have_p += len(doc)
    if not prose or not code:
        raise RuntimeError("could not find Python standard library sources to build the sample from")
    return prose, code


def _documents(kind: str, budget: int, rng: random.Random, prose: list[str], code: list[str]) -> Iterator[str]:
    made = 0
    while made < budget:
        if kind == "code":
            text = rng.choice(code)
            if len(text) > 20_000:
                start = rng.randrange(0, len(text) - 10_000)
                text = text[start : start + rng.randrange(2_000, 10_000)]
        else:
            parts = [rng.choice(prose) for _ in range(rng.randint(1, 6))]
            if rng.random() < 0.3:
                parts.insert(rng.randrange(len(parts) + 1), rng.choice(MULTILINGUAL))
            text = "\n\n".join(parts)
        made += len(text.encode("utf-8"))
        yield text


def _record(source: str, file_idx: int, i: int, text: str, rng: random.Random) -> dict[str, Any]:
    return {
        "id": f"{source}-{file_idx:04d}-{i:06d}",
        "text": text,
        "source": source,
        "added": "2025-09-01T00:00:00.000Z",
        "created": f"20{rng.randint(10, 24):02d}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}",
        "metadata": {"url": f"https://example.org/{source}/{file_idx}/{i}", "length": len(text)},
    }


def _write_jsonl(path: Path, records: list[dict[str, Any]], suffix: str) -> None:
    data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
    tmp = path.with_name(path.name + ".tmp")
    if suffix.endswith(".zst"):
        buf = io.BytesIO()
        cctx = zstandard.ZstdCompressor(level=3, write_checksum=True, threads=0)
        with cctx.stream_writer(buf, closefd=False) as w:
            for start in range(0, len(data), 1 << 16):
                w.write(data[start : start + (1 << 16)])
        tmp.write_bytes(buf.getvalue())
    elif suffix.endswith(".gz"):
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(data)
    else:
        tmp.write_bytes(data)
    os.replace(tmp, path)


def _write_parquet(path: Path, records: list[dict[str, Any]]) -> None:
    table = pa.table(
        {
            "id": [r["id"] for r in records],
            "text": [r["text"] for r in records],
            "source": [r["source"] for r in records],
            "added": [r["added"] for r in records],
            "metadata": [json.dumps(r["metadata"]) for r in records],
        }
    )
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=64, compression="zstd", write_page_checksum=True)
    os.replace(tmp, path)


def writable_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder``, created if needed, once a file could be written in it; else ValueError naming
    why (checked before any work: generating the sample takes seconds)."""
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder; choose a folder path (it is created if needed)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".bolmo-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"{out} cannot be written ({exc.strerror or exc}); choose another folder") from None
    return out


def build_sample(folder: str | os.PathLike[str], size_mb: float = 8.0, seed: int = 0) -> dict[str, Any]:
    """Write the sample mix into ``folder`` (``folder/data/<source>/...``) and return a summary.

    Deterministic for a given Python installation, ``size_mb`` (text megabytes) and ``seed``.
    """
    if size_mb <= 0:
        raise ValueError("--size-mb must be positive")
    out = writable_folder(folder)
    total = int(size_mb * 1_000_000)
    big_doc = int(min(3_000_000, max(50_000, total * 0.1)))
    prose, code = _corpus(max(total // 2, big_doc) + 200_000)
    rng = random.Random(seed)
    summary: dict[str, Any] = {"files": [], "documents": 0, "text_bytes": 0}
    for source, share, kind, layout in SOURCES:
        src_dir = out / "data" / source
        src_dir.mkdir(parents=True, exist_ok=True)
        budget = int(total * share) - (big_doc if source == "stack_edu" else 0)  # the big document counts
        # Varying file sizes: weights 1, 2, 3, ... over the source's files.
        weights = [i + 1 for i in range(len(layout))]
        for file_idx, suffix in enumerate(layout):
            file_budget = budget * weights[file_idx] // sum(weights)
            big_here = source == "stack_edu" and file_idx == len(layout) - 1
            texts = list(_documents(kind, max(1, file_budget), rng, prose, code))
            if source == "common_crawl" and file_idx == 0:
                texts[1:1] = [
                    "",
                    "A model card once said: documents end with <|endoftext|> and then <|pad|> follows.",
                    "Contact us at |||EMAIL_ADDRESS||| or |||PHONE_NUMBER||| for details.",
                ]
            if big_here:
                parts: list[str] = []
                n = 0
                for src in code:
                    parts.append(src)
                    n += len(src.encode("utf-8"))
                    if n >= big_doc:
                        break
                texts.insert(len(texts) // 2, "\n".join(parts))
            records = [_record(source, file_idx, i, t, rng) for i, t in enumerate(texts)]
            name = f"{source}-{file_idx:04d}{suffix}"
            path = src_dir / name
            if suffix == ".parquet":
                _write_parquet(path, records)
            else:
                _write_jsonl(path, records, suffix)
            summary["files"].append(str(path.relative_to(out)))
            summary["documents"] += len(records)
            summary["text_bytes"] += sum(len(t.encode("utf-8")) for t in texts)
    card = out / "README.md"
    card.write_text(
        "---\nlicense: odc-by\n---\n# bolmo_mix sample\n\nA generated sample in the shape of allenai/bolmo_mix "
        f"(size_mb={size_mb}, seed={seed}), built by `bolmo-async mirror sample`.\n"
    )
    return summary


def train_demo_tokenizer(
    sample: str | os.PathLike[str], folder: str | os.PathLike[str], vocab_size: int = 4000
) -> Path:
    """A small byte-level BPE trained on the sample's text with ``tokenizers``' trainer (for the
    demo where the real dolma2 tokenizer is not at hand): GPT-style split regex + ByteLevel, like
    dolma2, with ``<|endoftext|>`` as its EOS and no post-processor. Writes ``folder/tokenizer.json``
    and ``tokenizer_config.json``; deterministic for the same sample."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    out = writable_folder(folder)
    texts: list[str] = []
    for path in sorted(Path(sample).rglob("*.jsonl*")):
        raw = path.read_bytes()
        if path.name.endswith(".zst"):
            raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
        elif path.name.endswith(".gz"):
            raw = gzip.decompress(raw)
        texts += [json.loads(line).get("text") or "" for line in raw.splitlines() if line.strip()]
    tok = Tokenizer(models.BPE())
    split = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}\n')
    return out / "tokenizer.json"

"""Inspect an output folder: shard table, checks against the manifest, documents decoded back."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StateError
from .finalizer import DATA_SOURCES, MANIFEST
from .tokenize import decode_bytes
from .util import sha256_file


def read_index(csv_path: str | os.PathLike[str]) -> list[tuple[int, int, str, str, int]]:
    """Rows ``(start, end, id, src, loc)`` of a shard's ``.csv.gz``."""
    with gzip.open(csv_path, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        return [(int(r[0]), int(r[1]), r[2], r[3], int(r[4])) for r in csv.reader(text)]


def inspect_dir(output_dir: str | os.PathLike[str], *, decode: int = 0, verify: bool = True) -> dict[str, Any]:
    out = Path(output_dir).resolve()
    mpath = out / MANIFEST
    if not mpath.exists():
        raise StateError(f"{out} has no {MANIFEST}: run `bolmo-async finalize --output-dir {out}` first.")
    manifest = json.loads(mpath.read_text())
    problems: list[str] = []
    rows = []
    for s in manifest["shards"]:
        p = Path(s["path"])
        row = {"path": p.name, "tokens": s["tokens"], "documents": s["documents"], "ok": True}
        if not p.exists():
            problems.append(f"{p} is missing")
            row["ok"] = False
        elif p.stat().st_size != 4 * s["tokens"]:
            problems.append(f"{p} holds {p.stat().st_size // 4} tokens, the manifest says {s['tokens']}")
            row["ok"] = False
        elif verify and sha256_file(p) != s["sha256"]:
            problems.append(f"{p}: sha256 differs from the manifest")
            row["ok"] = False
        if not Path(s["csv"]).exists():
            problems.append(f"{s['csv']} is missing")
            row["ok"] = False
        rows.append(row)
    ds = out / DATA_SOURCES
    listed: list[str] = []
    if not ds.exists():
        problems.append(f"{ds} is missing")
    else:
        listed = [line for line in ds.read_text().splitlines() if line.strip()]
        for line in listed:
            if not os.path.isabs(line) or not Path(line).exists():
                problems.append(f"data_sources.txt lists {line!r}, which does not exist or is not absolute")
        if sorted(listed) != sorted(s["path"] for s in manifest["shards"]):
            problems.append("data_sources.txt and the manifest list different shards")
    docs: list[dict[str, Any]] = []
    if decode > 0:
        docs = _decode(out, manifest, decode)
    return {"manifest": manifest, "shards": rows, "problems": problems, "documents": docs}


def _decode(out: Path, manifest: dict[str, Any], n: int) -> list[dict[str, Any]]:
    tok = manifest["tokenizer"]
    decode_ids: Any
    if tok["kind"] == "byte":
        decode_ids = decode_bytes
    else:
        from tokenizers import Tokenizer

        tpath = out / "tokenizer" / "tokenizer.json"
        if not tpath.exists():
            return [{"id": "?", "text": f"(cannot decode: {tpath} is missing)"}]
        hf = Tokenizer.from_file(str(tpath))
        decode_ids = lambda ids: hf.decode([int(i) for i in ids], skip_special_tokens=False)  # noqa: E731
    eos = tok["eos_token_id"]
    docs: list[dict[str, Any]] = []
    for s in manifest["shards"]:
        arr = np.memmap(s["path"], dtype=np.uint32, mode="r")
        for start, end, doc_id, src, loc in read_index(s["csv"]):
            ids = np.asarray(arr[start:end])
            if len(ids) and ids[-1] == eos:
                ids = ids[:-1]
            docs.append({"id": doc_id, "src": src, "loc": loc, "tokens": end - start, "text": decode_ids(ids)})
            if len(docs) >= n:
                return docs
    return docs

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
from .util import CHECKSUM, checksum_file, sha256_file


def _same_checksum(path: Path, shard: dict[str, Any]) -> bool:
    """The shard file against its manifest entry: XXH3-128, or sha256 in a manifest written by
    an earlier version."""
    if CHECKSUM in shard:
        return checksum_file(path) == shard[CHECKSUM]
    return "sha256" in shard and sha256_file(path) == shard["sha256"]


def read_index(csv_path: str | os.PathLike[str]) -> list[tuple[int, int, str, str, int]]:
    """Rows ``(start, end, id, src, loc)`` of a shard's ``.csv.gz``."""
    with gzip.open(csv_path, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        return [(int(r[0]), int(r[1]), r[2], r[3], int(r[4])) for r in csv.reader(text)]


def inspect_dir(output_dir: str | os.PathLike[str], *, decode: int = 0, verify: bool = True) -> dict[str, Any]:
    """Check the output folder ``output_dir`` itself (also a copy or a moved folder): each shard
    the manifest names, looked up in this folder, against its recorded size and checksum;
    ``data_sources.txt`` against the folder. ``problems`` is empty when all is well."""
    out = Path(output_dir).resolve()
    if not out.is_dir():
        raise StateError(f"{out} does not exist or is not a folder: pass the --output-dir of a finished run.")
    mpath = out / MANIFEST
    if not mpath.exists():
        raise StateError(
            f"{out} has no {MANIFEST}: no finalize has finished here yet; run `bolmo-async finalize --output-dir {out}`."
        )
    try:
        manifest = json.loads(mpath.read_text())
        shards = manifest["shards"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateError(
            f"{mpath} is unreadable ({exc}); run `bolmo-async finalize --output-dir {out}` again."
        ) from exc
    problems: list[str] = []
    rows = []
    refinalize = f"run `bolmo-async finalize --output-dir {out}` (it rewrites what is wrong from the staging)"
    for s in shards:
        p = out / Path(s["path"]).name  # this folder's shard, wherever the manifest was written
        csv_path = out / Path(s["csv"]).name
        mine: list[str] = []
        size = p.stat().st_size if p.exists() else -1
        if size < 0:
            mine.append(f"{p} is missing: {refinalize}")
        elif size % 4:
            mine.append(f"{p} is {size} bytes, not a whole number of uint32 tokens (truncated?): {refinalize}")
        elif size != 4 * s["tokens"]:
            mine.append(f"{p} holds {size // 4} tokens, the manifest says {s['tokens']}: {refinalize}")
        elif verify and not _same_checksum(p, s):
            kind = CHECKSUM if CHECKSUM in s else "sha256"
            mine.append(f"{p}: its {kind} checksum differs from the manifest: {refinalize}")
        if not csv_path.exists():
            mine.append(f"{csv_path} is missing: {refinalize}")
        problems += mine
        rows.append({"path": p.name, "tokens": s["tokens"], "documents": s["documents"], "ok": not mine})
    ds = out / DATA_SOURCES
    listed: list[str] = []
    expected = [str(out / Path(s["path"]).name) for s in shards]
    if not ds.exists():
        why = "the output is incomplete" if not manifest.get("complete", True) else "it was removed"
        problems.append(f"{ds} is missing ({why}): {refinalize}")
    else:
        listed = [line for line in ds.read_text().splitlines() if line.strip()]
        outside = [line for line in listed if not line.startswith(str(out) + os.sep)]
        if outside:
            problems.append(
                f"data_sources.txt points outside {out} (e.g. {outside[0]}): the folder was moved or copied; "
                f"{refinalize} to write it for this place"
            )
        elif sorted(listed) != sorted(expected):
            problems.append(f"data_sources.txt and the manifest list different shards: {refinalize}")
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
        arr = np.memmap(out / Path(s["path"]).name, dtype=np.uint32, mode="r")
        for start, end, doc_id, src, loc in read_index(out / Path(s["csv"]).name):
            ids = np.asarray(arr[start:end])
            if len(ids) and ids[-1] == eos:
                ids = ids[:-1]
            docs.append({"id": doc_id, "src": src, "loc": loc, "tokens": end - start, "text": decode_ids(ids)})
            if len(docs) >= n:
                return docs
    return docs

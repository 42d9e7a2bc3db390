"""Independent reference readers for tests (no bolmo_async.decode)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import zstandard

from bolmo_async.inspector import read_index
from bolmo_async.worker import WorkerSpec


def read_documents(path: Path) -> list[tuple[int, str, str]]:
    """``(loc, id, text)`` of every non-empty document of a sample file."""
    name = path.name
    if name.endswith(".parquet"):
        t = pq.read_table(path)
        return [
            (i + 1, d, x) for i, (d, x) in enumerate(zip(t["id"].to_pylist(), t["text"].to_pylist(), strict=True)) if x
        ]
    raw = path.read_bytes()
    if name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    elif name.endswith(".gz"):
        raw = gzip.decompress(raw)
    out = []
    for i, line in enumerate(raw.decode("utf-8").splitlines()):
        obj = json.loads(line)
        if obj["text"]:
            out.append((i + 1, obj["id"], obj["text"]))
    return out


def shard_documents(manifest: dict) -> list[tuple[str, str, int, np.ndarray]]:
    """``(id, src, loc, ids)`` for every csv.gz row of every shard, in order."""
    out = []
    for s in manifest["shards"]:
        arr = np.memmap(s["path"], dtype=np.uint32, mode="r")
        for start, end, doc_id, src, loc in read_index(s["csv"]):
            out.append((doc_id, src, loc, np.array(arr[start:end])))
    return out


def shard_hashes(manifest: dict) -> list[str]:
    """sha256 of every shard's bytes as they are on disk now (not what the manifest recorded),
    in order; each file is also checked to be the size the manifest says."""
    import hashlib

    out = []
    for s in manifest["shards"]:
        data = Path(s["path"]).read_bytes()
        assert len(data) == 4 * s["tokens"], s["path"]
        out.append(hashlib.sha256(data).hexdigest())
    return out


def cli(*args: str) -> list[str]:
    """The command line ``bolmo-async ARGS`` (as ``python -m bolmo_async``)."""
    return [sys.executable, "-m", "bolmo_async", *args]


def worker_processes(root: Any) -> list[Any]:
    """The local worker processes below ``root`` (a ``psutil.Process``, their coordinator): spawned
    ones, or those forked from the fork server (its children); never the fork server itself nor
    multiprocessing's resource tracker."""
    import psutil

    found = []
    for p in root.children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()) or p.ppid() != root.pid:
                found.append(p)
        except psutil.Error:  # ended meanwhile
            pass
    return found


def is_fork_server(root: Any, p: Any) -> bool:
    """Whether ``p``, a child of ``root`` (a coordinator), is its fork server: spawned (its own
    command line) or, the command line's, forked from the coordinator (a copy of its command
    line, which is no spawned worker's once that has exec'd, nor the resource tracker's)."""
    import psutil

    try:
        cmd = p.cmdline()
        return "multiprocessing.forkserver" in " ".join(cmd) or (p.ppid() == root.pid and cmd == root.cmdline())
    except psutil.Error:  # ended meanwhile
        return False


def run_cli(*args: str, timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m bolmo_async ARGS`` as a user runs it, output captured as text."""
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, env=env)


def finish(proc: subprocess.Popen[Any], timeout: float) -> tuple[Any, Any]:
    """``proc.communicate(timeout=...)``; a hang kills the command (its workers end with it) before
    it fails the test: left running, it failed a later test with "subprocess is still running"."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def bpe_spec(vocab: dict[str, int], merges: list[str], eos_id: int, pre_tokenizer: dict | None = None) -> dict:
    """A `tokenizers` JSON of a BPE model with ``<|endoftext|>`` as id ``eos_id`` (as a dict)."""
    eos = {"id": eos_id, "content": "<|endoftext|>", "special": True, "single_word": False, "lstrip": False}
    return {
        "version": "1.0",
        "added_tokens": [{**eos, "rstrip": False, "normalized": False}],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": vocab,
            "merges": merges,
        },
    }


def readme_bpe_json() -> str:
    """The README's example BPE: vocabulary a b c bc ab abc, merges `b c`, `a b`, `ab c`, no
    pre-tokenizer (fastokens and tokenizers disagree on text with characters outside it)."""
    vocab = {"a": 0, "b": 1, "c": 2, "bc": 3, "ab": 4, "abc": 5, "<|endoftext|>": 6}
    return json.dumps(bpe_spec(vocab, ["b c", "a b", "ab c"], 6))


def wait_for_endpoint(ready: Path, seconds: float = 10.0) -> str:
    """The endpoint a `mirror serve --ready-file READY` wrote once it listens."""
    deadline = time.monotonic() + seconds
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return ready.read_text().strip()


def report_prebuilt(json_path: str, special_tokens_as_text: bool, texts: list[str], out: Any) -> None:
    """In a worker forked from the fork server: whether it found the reference engine built ahead,
    whether its tokenizer took it, and that tokenizer's ids for ``texts`` (through the batch path,
    the reference's thread pool included)."""
    from bolmo_async import tokenize

    had = len(tokenize._PREBUILT)
    tok = tokenize.SubwordTokenizer(
        tokenize.load_tokenizer_source(json_path), engine="tokenizers", special_tokens_as_text=special_tokens_as_text
    )
    ids, offsets = tok.encode_batch(texts)
    out.put((special_tokens_as_text, had, len(tokenize._PREBUILT), ids.tolist(), offsets.tolist()))


def worker_spec(out: Any, plan: Any, endpoint: str, tokenizer: Any, eos: int, **more: Any) -> WorkerSpec:
    """The spec of a worker staging ``plan``'s files into ``out`` (what the pool hands it), for
    tests that drive a ``Worker`` themselves; ``more``: the spec's other fields."""
    return WorkerSpec(
        output_dir=str(out),
        files=plan.files,
        repo_id=plan.repo_id,
        commit=plan.commit,
        endpoint=endpoint,
        tokenizer=tokenizer,
        eos=eos,
        **more,
    )

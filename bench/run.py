"""`make bench`: our pipeline against a baseline that works like the original tool, and against
this machine's limits, side by side in one run, on a >= 100 MB-of-text mix served over HTTP.

Writes bench/results.json and bench/results.md and prints the table. Each measurement runs at
least twice; the best run counts. Figures are ratios measured in the same run, never absolute
targets baked into tests.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOLMA2 = ROOT.parent / "shared" / "tokenizers" / "dolma2-tokenizer.json"
REPO = "allenai/bolmo_mix"


def peak_rss_of(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``: wall seconds and peak RSS (MB) of the whole process tree (sampled every 50 ms,
    summed over the process and its children, e.g. tokenizer workers)."""
    import threading

    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    bufs: dict[str, bytes] = {}

    def drain(name: str, stream: Any) -> None:
        bufs[name] = stream.read()

    threads = [threading.Thread(target=drain, args=(n, s)) for n, s in (("out", proc.stdout), ("err", proc.stderr))]
    for t in threads:
        t.start()
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    for t in threads:
        t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:5])} failed:\n{bufs.get('err', b'').decode()[-3000:]}")
    return {
        "seconds": seconds,
        "peak_rss_mb": peak / 2**20,
        "stdout": bufs.get("out", b"").decode(),
        "stderr": bufs.get("err", b"").decode(),
    }


def best(results: list[dict[str, Any]]) -> dict[str, Any]:
    return min(results, key=lambda r: r["seconds"])


def ensure_mix(folder: Path, size_mb: float) -> None:
    marker = folder / ".built"
    if marker.exists() and marker.read_text() == str(size_mb):
        return
    from bolmo_async.mirror import build_sample

    print(f"building a {size_mb:g} MB benchmark mix in {folder} ...", flush=True)
    build_sample(folder, size_mb=size_mb, seed=1)
    marker.write_text(str(size_mb))


def start_mirror(mix: Path, tok_dir: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    ready = HERE / "out" / "endpoint"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bolmo_async", "mirror", "serve", str(mix), "--ready-file", str(ready)]
    if tok_dir is not None:
        cmd += ["--model-repo", f"allenai/dolma2-tokenizer={tok_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        if ready.exists():
            return proc, ready.read_text().strip()
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the mirror did not start")


def ours(endpoint: str, mode: str, out: Path, fraction: float = 1.0, max_tokens: int = 100_000_000) -> dict[str, Any]:
    env = {**os.environ, "HF_HOME": str(HERE / "out" / "hf-home")}
    cmd = [
        sys.executable,
        "-m",
        "bolmo_async",
        "prepare",
        "--output-dir",
        str(out),
        "--endpoint",
        endpoint,
        "--data-fraction",
        str(fraction),
        "--tokenizer",
        mode,
        "--max-tokens-per-file",
        str(max_tokens),
        "--no-progress",
        "--force",
    ]
    r = peak_rss_of(cmd, env)
    m = json.loads((out / "manifest.json").read_text())
    r.update(tokens=m["totals"]["tokens"], documents=m["totals"]["documents"])
    r.pop("stdout"), r.pop("stderr")
    return r


def baseline(endpoint: str, mode: str, out: Path, tok_json: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "HF_HOME": str(HERE / "out" / "hf-home-baseline"),
        "HF_DATASETS_CACHE": str(HERE / "out" / "ds-cache"),
    }
    r = peak_rss_of(
        [sys.executable, str(HERE / "baseline_original.py"), str(out), endpoint, REPO, mode, str(tok_json)], env
    )
    info = json.loads(r["stdout"].strip().splitlines()[-1])
    r.update(tokens=info["tokens"], documents=info["documents"], text_bytes=info["text_bytes"])
    r.pop("stdout"), r.pop("stderr")
    return r


def load_texts(mix: Path) -> tuple[list[str], int]:
    from bolmo_async.decode import LineDecoder
    from bolmo_async.models import SkipCounter, data_suffix

    texts: list[str] = []
    for p in sorted(mix.rglob("data/*/*")):
        suffix = data_suffix(p.name) or ""
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            texts += [t for t in pq.read_table(p, columns=["text"])["text"].to_pylist() if t]
            continue
        dec = LineDecoder(p.name, suffix, SkipCounter())
        batches = dec.feed(p.read_bytes()) + dec.finish()
        texts += [t for b in batches for t in b.column("text").to_pylist()]
    return texts, sum(len(t.encode("utf-8")) for t in texts)


def limit_parse(mix: Path) -> dict[str, Any]:
    """zstd decompress + Arrow JSON-lines parse of the .jsonl.zst files, one thread."""
    import pyarrow.compute as pc
    import pyarrow.json as pj
    import zstandard

    files = sorted(mix.rglob("data/*/*.jsonl.zst"))
    blobs = [f.read_bytes() for f in files]
    t0 = time.perf_counter()
    text_bytes = 0
    for blob in blobs:
        data = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
        table = pj.read_json(io.BytesIO(data), read_options=pj.ReadOptions(use_threads=False, block_size=8 << 20))
        text_bytes += int(pc.sum(pc.binary_length(table.column("text"))).as_py() or 0)
    return {"seconds": time.perf_counter() - t0, "text_bytes": text_bytes}


def _tiktoken_worker(texts: list[str]) -> tuple[int, float]:
    """Plain tiktoken with dolma2's ranks (the encoder our converter builds), one text at a time."""
    from bolmo_async.tokenize import SubwordTokenizer, load_tokenizer_source

    enc = SubwordTokenizer(load_tokenizer_source(str(DOLMA2)), engine="tiktoken", threads=1)._tt
    t0 = time.perf_counter()
    n = sum(len(enc.encode_ordinary(t)) for t in texts)
    return n, time.perf_counter() - t0


def limit_tiktoken(texts: list[str], processes: int) -> dict[str, Any]:
    """tiktoken alone, in ``processes`` processes at once (both cores busy when 2)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    parts = [texts[i::processes] for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        res = list(pool.map(_tiktoken_worker, parts))
    return {"seconds": max(s for _, s in res), "tokens": sum(n for n, _ in res)}


def limit_tokenizers(texts: list[str], threads: int) -> dict[str, Any]:
    """`tokenizers` encode_batch (its own thread pool), ``threads`` threads."""
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DOLMA2))
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 2000):
        n += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 2000], add_special_tokens=False))
    return {"seconds": time.perf_counter() - t0, "tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=float, default=120.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true")
    args = ap.parse_args()
    (HERE / "out").mkdir(parents=True, exist_ok=True)
    mix = HERE / "data" / f"mix-{args.size_mb:g}"
    ensure_mix(mix, args.size_mb)
    tok_dir = None
    if DOLMA2.exists():
        tok_dir = HERE / "out" / "dolma2"
        tok_dir.mkdir(exist_ok=True)
        (tok_dir / "tokenizer.json").write_bytes(DOLMA2.read_bytes())
        (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    results: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "size_mb": args.size_mb,
    }
    texts, text_bytes = load_texts(mix)
    results["text_bytes"] = text_bytes
    results["documents"] = len(texts)
    print(f"mix: {len(texts)} documents, {text_bytes / 1e6:.1f} MB of text", flush=True)
    mirror, endpoint = start_mirror(mix, tok_dir)
    out = HERE / "out"
    jobs: list[tuple[str, Any]] = [
        ("limit_parse", lambda: limit_parse(mix)),
        ("ours_byte", lambda: ours(endpoint, "byte", out / "ours-byte")),
        ("ours_byte_f0.1", lambda: ours(endpoint, "byte", out / "ours-byte-small", fraction=0.1)),
        ("ours_byte_shard10M", lambda: ours(endpoint, "byte", out / "ours-byte-10m", max_tokens=10_000_000)),
    ]
    if tok_dir is not None:
        jobs += [
            ("limit_tokenizers_2t", lambda: limit_tokenizers(texts, 2)),
            ("limit_tiktoken_1t", lambda: limit_tiktoken(texts, 1)),
            ("limit_tiktoken_2t", lambda: limit_tiktoken(texts, 2)),
            ("ours_subword", lambda: ours(endpoint, "subword", out / "ours-subword")),
            ("ours_subword_f0.1", lambda: ours(endpoint, "subword", out / "ours-subword-small", fraction=0.1)),
        ]
        if not args.skip_baseline:
            jobs += [
                ("baseline_byte", lambda: baseline(endpoint, "byte", out / "base-byte", DOLMA2)),
                ("baseline_subword", lambda: baseline(endpoint, "subword", out / "base-subword", DOLMA2)),
            ]
    # Rounds interleave every measurement: this machine's speed drifts (shared host), so a ratio
    # compares runs made minutes apart at most, never a fast period with a slow one.
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in jobs}
    try:
        for round_no in range(args.repeats):
            for key, job in jobs:
                print(f"round {round_no + 1}/{args.repeats}: {key} ...", flush=True)
                runs[key].append(job())
    finally:
        mirror.terminate()
        mirror.wait()
    for key, rs in runs.items():
        r = best(rs)
        r["runs_seconds"] = [round(x["seconds"], 3) for x in rs]
        results[key] = r
    report(results)


def report(r: dict[str, Any]) -> None:
    tb = r["text_bytes"]
    sub_tokens = r.get("ours_subword", {}).get("tokens")

    def row(name: str, key: str, kind: str) -> dict[str, Any] | None:
        x = r.get(key)
        if not x:
            return None
        s = x["seconds"]
        text = x.get("text_bytes", tb if kind != "parse" else x["text_bytes"])
        toks = x.get("tokens")
        if kind == "byte" and key.startswith("ours"):
            text = toks - x["documents"]  # a byte id per text byte, plus one EOS per document
        if key == "ours_subword_f0.1" and r.get("ours_byte_f0.1"):
            text = r["ours_byte_f0.1"]["tokens"] - r["ours_byte_f0.1"]["documents"]  # the same plan's text
        d = {"pipeline": name, "seconds": round(s, 2), "text_MB_s": round(text / s / 1e6, 2)}
        if kind == "subword" and toks:
            d["dolma2_tokens_s"] = round(toks / s)
        if kind == "byte" and toks:
            d["byte_ids_s"] = round(toks / s)
        if "peak_rss_mb" in x:
            d["peak_rss_mb"] = round(x["peak_rss_mb"])
        return d

    rows = [
        row("ours, byte, prepare end to end", "ours_byte", "byte"),
        row("ours, byte, fraction 0.1", "ours_byte_f0.1", "byte"),
        row("ours, byte, --max-tokens-per-file 10M", "ours_byte_shard10M", "byte"),
        row("ours, subword (dolma2), prepare end to end", "ours_subword", "subword"),
        row("ours, subword, fraction 0.1", "ours_subword_f0.1", "subword"),
        row("baseline (original's way), byte", "baseline_byte", "byte"),
        row("baseline (original's way), subword", "baseline_subword", "subword"),
        row("limit: zstd + JSON-lines parse, 1 thread", "limit_parse", "parse"),
        row("limit: tokenizers encode_batch, 2 threads", "limit_tokenizers_2t", "subword"),
        row("limit: tiktoken, 1 process", "limit_tiktoken_1t", "subword"),
        row("limit: tiktoken, 2 processes", "limit_tiktoken_2t", "subword"),
    ]
    rows = [x for x in rows if x]
    ratios: dict[str, float] = {}

    def ratio(name: str, a: str, b: str, field: str) -> None:
        ra, rb = (
            next((x for x in rows if x["pipeline"] == a), None),
            next((x for x in rows if x["pipeline"] == b), None),
        )
        if ra and rb and ra.get(field) and rb.get(field):
            ratios[name] = round(ra[field] / rb[field], 2)

    ratio(
        "byte: ours / baseline (text MB/s)",
        "ours, byte, prepare end to end",
        "baseline (original's way), byte",
        "text_MB_s",
    )
    ratio(
        "byte: ours / parse limit (text MB/s)",
        "ours, byte, prepare end to end",
        "limit: zstd + JSON-lines parse, 1 thread",
        "text_MB_s",
    )
    ratio(
        "subword: ours / baseline (tokens/s)",
        "ours, subword (dolma2), prepare end to end",
        "baseline (original's way), subword",
        "dolma2_tokens_s",
    )
    ratio(
        "subword: ours / tiktoken 2-process limit (tokens/s)",
        "ours, subword (dolma2), prepare end to end",
        "limit: tiktoken, 2 processes",
        "dolma2_tokens_s",
    )
    ratio(
        "subword: ours / tokenizers 2-thread limit (tokens/s)",
        "ours, subword (dolma2), prepare end to end",
        "limit: tokenizers encode_batch, 2 threads",
        "dolma2_tokens_s",
    )
    ratio("byte RSS: fraction 1.0 / 0.1", "ours, byte, prepare end to end", "ours, byte, fraction 0.1", "peak_rss_mb")
    ratio(
        "byte RSS: shard 100M / 10M",
        "ours, byte, prepare end to end",
        "ours, byte, --max-tokens-per-file 10M",
        "peak_rss_mb",
    )
    ratio(
        "subword RSS: fraction 1.0 / 0.1",
        "ours, subword (dolma2), prepare end to end",
        "ours, subword, fraction 0.1",
        "peak_rss_mb",
    )
    out = {"rows": rows, "ratios": ratios, "raw": r, "subword_tokens": sub_tokens}
    (HERE / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    cols = ["pipeline", "seconds", "text_MB_s", "dolma2_tokens_s", "byte_ids_s", "peak_rss_mb"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for x in rows:
        lines.append("| " + " | ".join(str(x.get(c, "")) for c in cols) + " |")
    lines += ["", "| ratio | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in ratios.items()]
    md = (
        f"Benchmark: {r['documents']} documents, {tb / 1e6:.1f} MB of text, {r['machine']['cores']} cores\n\n"
        + "\n".join(lines)
        + "\n"
    )
    (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""`make bench`: bolmo-async side by side with `dolma tokens`, in one run, on the same files.

The mix is >= 500 MB of unique, real-looking web-sized documents that look like bolmo_mix
(bench/textgen.py: prose, code, markup and tables, non-Latin scripts, one source each), served
over HTTP by the project's Hub mirror on loopback. For each mode (byte, subword) it measures,
interleaving rounds (this shared machine's speed drifts) and keeping each measurement's best:

- fixed cost: a 0.1% run end to end (`prepare --data-fraction 0.001`);
- steady state: from two sizes (fraction 1.0 and 0.1): extra work / extra seconds;
- CPU: the coordinator's own CPU against its worker processes' (getrusage), and the projected
  throughput at 8, 16 and 64 cores, tokens / max(coordinator CPU, total CPU / cores);
- peak RSS of the whole process tree, and how it moves when the fraction or
  --max-tokens-per-file grows 10x;
- the steady state and end to end of each kind of text alone (its source's files, fraction 1.0
  vs 0.1; `--skip-kinds` leaves them out);
- `dolma tokens --processes 2` on the same .jsonl.zst files (subword, dolma2, EOS 100257);
- WAN (`--only wan` runs it alone): the mirror emulates a wide-area link (a round trip before
  every answer, a per-response rate cap, a total link rate); on it, side by side in the same run,
  `prepare --tokenizer byte` end to end against huggingface_hub's `snapshot_download` (download
  only, `max_workers=8`) on one large file and on the same bytes in many small files, and the
  download side alone against the link's ceiling (bench/results-wan.md); then the same on a
  second link and file size (`--wan-also`, default 30 ms, 12 MB/s per response, 60 MB/s, 35 MB).

Writes bench/results.json and bench/results.md and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOLMA2 = Path(os.environ.get("BOLMO_DOLMA2_JSON", str(ROOT.parent / "shared" / "tokenizers" / "dolma2-tokenizer.json")))
DOLMA_VENV = ROOT / ".venv-dolma"


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``: wall seconds and peak RSS (MB) of its whole process tree (sampled every 50 ms)."""
    import resource

    import psutil

    t0 = time.perf_counter()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
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
        raise RuntimeError(f"{' '.join(cmd[:6])} failed:\n{bufs.get('err', b'').decode()[-3000:]}")
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": seconds,
        "cpu_seconds": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
        "peak_rss_mb": peak / 2**20,
        "stderr": bufs.get("err", b"").decode(),
        "stdout": bufs.get("out", b"").decode(),
    }


def ensure_mix(folder: Path, size_mb: float) -> dict[str, Any]:
    marker = folder / ".built.json"
    if marker.exists():
        return json.loads(marker.read_text())
    sys.path.insert(0, str(HERE))
    from textgen import build_bench_mix

    print(f"building a {size_mb:g} MB mix of unique documents in {folder} (once; cached) ...", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    info = build_bench_mix(folder, size_mb)
    marker.write_text(json.dumps(info))
    return info


def start_mirror(mix: Path, tok_dir: Path | None) -> tuple[subprocess.Popen[bytes], str]:
    ready = HERE / "out" / "endpoint"
    ready.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "bolmo_async", "mirror", "serve", str(mix), "--ready-file", str(ready)]
    if tok_dir is not None:
        cmd += ["--model-repo", f"allenai/dolma2-tokenizer={tok_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(3000):
        if ready.exists():
            return proc, ready.read_text().strip()
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the mirror did not start")


def ours(
    endpoint: str,
    mode: str,
    out: Path,
    fraction: float,
    bound: int = 100_000_000,
    processes: int = 0,
    include: str = "",
) -> dict[str, Any]:
    env = {**os.environ, "HF_HOME": str(HERE / "out" / "hf-home")}
    cpu = out.with_suffix(".cpu.json")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(HERE / "cpu_of.py"), str(cpu), "prepare", "--output-dir", str(out)]
    cmd += ["--endpoint", endpoint, "--data-fraction", str(fraction), "--tokenizer", mode]
    cmd += ["--max-tokens-per-file", str(bound), "--no-progress"]
    if processes:
        cmd += ["--processes", str(processes)]
    if include:
        cmd += ["--include", include]
    r = run_measured(cmd, env)
    m = json.loads((out / "manifest.json").read_text())
    r.update(json.loads(cpu.read_text()))
    r.update(tokens=m["totals"]["tokens"], documents=m["totals"]["documents"], processes=processes)
    r["work"] = r["tokens"] - r["documents"] if mode == "byte" else r["tokens"]  # text bytes / tokens
    r.pop("stderr")
    r.pop("stdout")
    shutil.rmtree(out, ignore_errors=True)
    return r


def dolma_tokens(mix: Path, out: Path, source: str = "*") -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(DOLMA_VENV / "bin" / "dolma"), "tokens", "--documents", str(mix / "data" / source / "*.jsonl.zst")]
    cmd += ["--destination", str(out), "--tokenizer.name_or_path", str(DOLMA2)]
    cmd += ["--tokenizer.eos_token_id", "100257", "--tokenizer.pad_token_id", "100277", "--processes", "2"]
    cmd += ["--dtype", "uint32", "--max_size", str(1 << 30)]
    r = run_measured(cmd, {**os.environ, "HF_HUB_OFFLINE": "1"})
    r.pop("stderr")
    r["tokens"] = sum(p.stat().st_size // 4 for p in out.rglob("*.npy"))
    if not r["tokens"]:
        raise RuntimeError("dolma tokens wrote no tokens (is backports.zstd installed in .venv-dolma?)")
    r["work"] = r["tokens"]
    shutil.rmtree(out, ignore_errors=True)
    return r


def limit_write(out: Path, gib: float = 2.0) -> dict[str, Any]:
    """This machine's floors for byte mode's output: writing uint32 ids (4 bytes per text byte)
    the way shards are written (``outdir.local.LocalNewFile``: page-aligned blocks, O_DIRECT where the disk takes
    it), and through the page cache as a plain ``write`` does; and sha256 of them, on one core."""
    import hashlib

    import numpy as np

    from bolmo_async.outdir.local import LocalNewFile, aligned_buffer

    block = np.frombuffer(aligned_buffer(8 << 20), dtype=np.uint32)
    block[:] = np.random.default_rng(0).integers(4, 260, size=len(block), dtype=np.uint32)
    n = max(1, int(gib * 128))
    path = out / "write-floor.bin"
    t0 = time.perf_counter()
    f = LocalNewFile(path, str(out), direct=True)
    for _ in range(n):
        f.write(memoryview(block.data))
    f.commit()
    write_s = time.perf_counter() - t0
    path.unlink()
    t0 = time.perf_counter()
    with open(path, "wb") as g:
        for _ in range(n):
            g.write(block.data)
    cached_s = time.perf_counter() - t0
    path.unlink()
    t0 = time.perf_counter()
    h = hashlib.sha256()
    for _ in range(n):
        h.update(block.data)
    sha_s = time.perf_counter() - t0
    size = n * block.nbytes
    return {
        "seconds": write_s,
        "page_cache_seconds": cached_s,
        "bytes": size,
        "sha256_seconds": sha_s,
        "direct": f.direct,
        "peak_rss_mb": 0,
    }


# -- object storage: the same run writing to an S3 server on loopback vs to local disk -----------------
S3_KEY, S3_SECRET = "BENCHKEYBOLMOASYNC01", "bench-secret-not-a-credential"


def start_s3() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in its own process on a free loopback port, with a bucket ``bench``."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = f"from moto.server import main; main(['-H', '127.0.0.1', '-p', '{port}'])"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        "bench", endpoint=endpoint, access_key_id=S3_KEY, secret_access_key=S3_SECRET, region="us-east-1",
        client_options={"allow_http": True},
    )  # fmt: skip
    for _ in range(300):
        try:
            import urllib.request

            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/bench", method="PUT"), timeout=1)
            obstore.put(store, ".ready", b"")
            return proc, endpoint
        except Exception:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the S3 server did not start")


def ours_s3(
    endpoint: str, s3: str, mode: str, run: str, fraction: float, scratch: Path, bound: int = 100_000_000
) -> dict[str, Any]:
    """``prepare --output-dir s3://bench/RUN`` as ``ours`` measures it, plus the peak size of its local
    scratch (sampled every 50 ms) and the bytes it put in the bucket."""
    import obstore
    from obstore.store import S3Store

    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    env = {
        **os.environ,
        "HF_HOME": str(HERE / "out" / "hf-home"),
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3,
        "BOLMO_ASYNC_SCRATCH": str(scratch),
    }
    cpu = scratch.with_suffix(".cpu.json")
    cmd = [sys.executable, str(HERE / "cpu_of.py"), str(cpu), "prepare", "--output-dir", f"s3://bench/{run}"]
    cmd += ["--endpoint", endpoint, "--data-fraction", str(fraction), "--tokenizer", mode, "--no-progress"]
    cmd += ["--max-tokens-per-file", str(bound)]
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            size = 0
            for p in scratch.rglob("*"):
                with contextlib.suppress(OSError):  # a file gone between listing and stat
                    size += p.stat().st_size if p.is_file() else 0
            peak[0] = max(peak[0], size)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = run_measured(cmd, env)
    finally:
        done.set()
        sampler.join()
    store = S3Store(
        "bench", endpoint=s3, access_key_id=S3_KEY, secret_access_key=S3_SECRET, region="us-east-1",
        client_options={"allow_http": True},
    )  # fmt: skip
    m = json.loads(bytes(obstore.get(store, f"{run}/manifest.json").bytes()))
    listed = [o for chunk in obstore.list(store, f"{run}/") for o in chunk]
    r.update(json.loads(cpu.read_text()))
    r.update(tokens=m["totals"]["tokens"], documents=m["totals"]["documents"])
    r["work"] = r["tokens"] - r["documents"] if mode == "byte" else r["tokens"]
    r["checksums"] = [sh["xxh3_128"] for sh in m["shards"]]
    r["bucket_mb"] = sum(o["size"] for o in listed) / 1e6
    r["peak_scratch_mb"] = peak[0] / 1e6
    r.pop("stderr")
    obstore.delete(store, [o["path"] for o in listed])
    return r


def server_ingest(s3: str, mb: int = 128) -> float:
    """MB/s the S3 server takes a streamed multipart upload at, alone (8 MiB parts, as shards go):
    the ceiling of any run writing to it."""
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        "bench", endpoint=s3, access_key_id=S3_KEY, secret_access_key=S3_SECRET, region="us-east-1",
        client_options={"allow_http": True},
    )  # fmt: skip
    block = os.urandom(8 << 20)
    t = time.perf_counter()
    with obstore.open_writer(store, "ingest-probe", buffer_size=8 << 20, max_concurrency=4) as f:
        for _ in range(mb // 8):
            f.write(block)
    rate = mb * 1.048576 / (time.perf_counter() - t)
    obstore.delete(store, "ingest-probe")
    return rate


def s3_rows(
    endpoint: str, out: Path, repeats: int, mode: str = "byte", fraction: float = 1.0, bound: int = 10_000_000
) -> dict[str, Any]:
    """The same run to local disk and to the S3 server, interleaved, best of ``repeats`` each.
    Shards of ``bound`` tokens (10M: 40 MB of byte-mode shard), so that, as in a long run, shards
    go out while later files are fetched; the last shard's upload is the tail of either run."""
    proc, s3 = start_s3()
    disk: list[dict[str, Any]] = []
    bucket: list[dict[str, Any]] = []
    try:
        for i in range(repeats):
            print(f"round {i + 1}/{repeats}: {mode} f{fraction:g} to local disk, then to s3:// ...", flush=True)
            d = ours(endpoint, mode, out / f"{mode}-disk", fraction, bound)
            disk.append(d)
            import psutil

            server = psutil.Process(proc.pid)
            before = sum(server.cpu_times()[:2])
            bucket.append(ours_s3(endpoint, s3, mode, f"r{i}", fraction, out / "s3-scratch", bound))
            bucket[-1]["server_cpu_s"] = sum(server.cpu_times()[:2]) - before  # moto's own CPU
        ingest = server_ingest(s3)
    finally:
        proc.terminate()
        proc.wait()
    best_d, best_b = min(disk, key=lambda r: r["seconds"]), min(bucket, key=lambda r: r["seconds"])
    floor = best_b["bucket_mb"] / ingest  # seconds just to put the output into this server
    return {
        "bound": bound,
        "server_ingest_mb_s": round(ingest, 1),
        "server_floor_s": round(floor, 2),
        "ceiling_over_disk": round(best_d["seconds"] / floor, 3),
        "s3_over_floor": round(best_b["seconds"] / floor, 3),
        "disk": {**best_d, "runs_seconds": [round(x["seconds"], 3) for x in disk]},
        "s3": {**best_b, "runs_seconds": [round(x["seconds"], 3) for x in bucket]},
        "s3_over_disk_throughput": round(best_d["seconds"] / best_b["seconds"], 3),
    }


def s3_report(r: dict[str, Any]) -> list[str]:
    d, b = r["disk"], r["s3"]
    return [
        f"## object storage (prepare to an S3 server on loopback vs to local disk, byte mode, fraction 1.0, "
        f"shards of {r['bound'] // 1_000_000}M tokens)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| local disk seconds (rounds) | {d['runs_seconds']} |",
        f"| s3:// seconds (rounds) | {b['runs_seconds']} |",
        f"| s3:// throughput / local-disk throughput | {r['s3_over_disk_throughput']} |",
        f"| output in the bucket (MB) | {round(b['bucket_mb'], 1)} |",
        f"| peak local scratch (MB) | {round(b['peak_scratch_mb'], 1)} |",
        f"| peak RSS MB disk / s3 | {round(d['peak_rss_mb'])} / {round(b['peak_rss_mb'])} |",
        f"| CPU s (coordinator + workers) disk / s3 | {round(d['coordinator'] + d['workers'], 2)} / "
        f"{round(b['coordinator'] + b['workers'], 2)} |",
        f"| CPU s of the S3 server (moto, same machine) | {round(b.get('server_cpu_s', 0), 2)} |",
        f"| the server's ingest alone, one streamed upload (MB/s) | {r['server_ingest_mb_s']} |",
        f"| seconds just to put the output into this server | {r['server_floor_s']} |",
        f"| best possible s3:// / local-disk throughput on this server | {r['ceiling_over_disk']} |",
        f"| s3:// run seconds / that floor | {r['s3_over_floor']} |",
        "",
    ]


# -- WAN: the same emulated wide-area link for every tool, side by side --------------------

WAN_LARGE_REPO = "bench/wan-large"
WAN_SMALL_REPO = "bench/wan-small"


def ensure_wan_corpus(folder: Path, compressed_mb: float, small_files: int) -> dict[str, Any]:
    """One large .jsonl.zst of >= ``compressed_mb`` MB (``large/``), and the same documents
    cut into ``small_files`` files (``small/``): two repos of the same bytes of text."""
    marker = folder / ".built.json"
    if marker.exists():
        return json.loads(marker.read_text())
    import zstandard

    print(f"building the WAN corpus ({compressed_mb:g} MB compressed; once, cached) ...", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    # The documents of the mix-like corpus (prose, code, markup, scripts; unique), interleaved
    # across its sources until the target compressed size.
    built = sorted(
        (HERE / "data").glob("mix-*/.built.json"), key=lambda p: json.loads(p.read_text()).get("text_bytes", 0)
    )
    mix = built[-1].parent if built else HERE / "data" / "mix-200"
    if not built:
        ensure_mix(mix, 200.0)
    sources = [sorted(d.rglob("*.jsonl.zst")) for d in sorted((mix / "data").iterdir())]
    streams = [
        (
            line
            for f in files
            for line in zstandard.ZstdDecompressor().decompress(f.read_bytes(), max_output_size=1 << 30).splitlines()
            if line
        )
        for files in sources
    ]
    lines: list[bytes] = []
    text = 0
    cctx = zstandard.ZstdCompressor(level=3, threads=-1)
    compressed = 0
    while compressed < compressed_mb * 1e6 and streams:
        for stream in list(streams):
            for _ in range(500):
                line = next(stream, None)
                if line is None:
                    streams.remove(stream)
                    break
                lines.append(line)
                text += len(json.loads(line)["text"].encode())
        compressed = len(cctx.compress(b"\n".join(lines) + b"\n"))  # cheap next to generating
    large = folder / "large" / "data" / "web"
    large.mkdir(parents=True)
    (large / "web-0000.jsonl.zst").write_bytes(cctx.compress(b"\n".join(lines) + b"\n"))
    small = folder / "small" / "data" / "web"
    small.mkdir(parents=True)
    per = -(-len(lines) // small_files)
    for k in range(small_files):
        part = lines[k * per : (k + 1) * per]
        if part:
            (small / f"web-{k:04d}.jsonl.zst").write_bytes(cctx.compress(b"\n".join(part) + b"\n"))
    info = {
        "documents": len(lines),
        "text_bytes": text,
        "large_bytes": sum(f.stat().st_size for f in large.iterdir()),
        "small_bytes": sum(f.stat().st_size for f in small.iterdir()),
        "small_files": len(list(small.iterdir())),
    }
    marker.write_text(json.dumps(info))
    return info


def wan_ours(endpoint: str, repo: str, out: Path) -> dict[str, Any]:
    """``prepare --tokenizer byte`` end to end over the emulated link."""
    env = {**os.environ, "HF_HOME": str(HERE / "out" / "hf-home")}
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "bolmo_async", "prepare", "--output-dir", str(out), "--endpoint", endpoint]
    cmd += ["--repo-id", repo, "--data-fraction", "1.0", "--tokenizer", "byte", "--no-progress"]
    r = run_measured(cmd, env)
    m = json.loads((out / "manifest.json").read_text())
    r.update(tokens=m["totals"]["tokens"])
    r.pop("stderr")
    r.pop("stdout")
    shutil.rmtree(out, ignore_errors=True)
    return r


def wan_snapshot(endpoint: str, repo: str, out: Path) -> dict[str, Any]:
    """huggingface_hub's ``snapshot_download`` (download only, ``max_workers=8``)."""
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import sys; from huggingface_hub import snapshot_download; "
        "snapshot_download(sys.argv[1], repo_type='dataset', endpoint=sys.argv[2], cache_dir=sys.argv[3], "
        "max_workers=8)"
    )
    env = {
        **os.environ,
        "HF_HOME": str(out / "home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_ENABLE_HF_TRANSFER": "0",
    }
    r = run_measured([sys.executable, "-c", code, repo, endpoint, str(out / "cache")], env)
    r.pop("stderr")
    r.pop("stdout")
    shutil.rmtree(out, ignore_errors=True)
    return r


def wan_download(endpoint: str, repo: str, connections: int) -> dict[str, Any]:
    """bolmo-async's download side alone (resolve ahead, transfer, verify; nothing decoded), in a
    separate process, the files handed out in order as ``prepare``'s coordinator does: bytes/s."""
    code = f"""
import asyncio, hashlib, json, sys, time
from bolmo_async.download import Link, ResolveAhead, fetch_file
from bolmo_async.hub import HubClient, make_session
from bolmo_async.retry import RetryPolicy
class Hash:
    def __init__(s): s.h = hashlib.sha256()
    def feed(s, d): s.h.update(d)
    def reset(s): s.h = hashlib.sha256()
async def main(endpoint, repo):
    retry = RetryPolicy()
    loop = asyncio.get_running_loop()
    async with make_session({connections}, retry) as session:
        client = HubClient(session, endpoint=endpoint, repo_id=repo, retry=retry)
        commit = await client.resolve_commit("main")
        files = [f for f in await client.list_files(commit) if f.path.endswith(".zst")]
        link = Link({connections}); sem = asyncio.Semaphore({connections})
        t0 = time.perf_counter()
        paths = dict(enumerate(f.path for f in files))
        with ResolveAhead(endpoint=endpoint, repo_id=repo, repo_type="dataset", token=None, retry=retry,
                          commit=commit, paths=paths, order=list(paths), window={connections}) as ahead:
            async def one(i, f, cdn):
                try:
                    await fetch_file(client, client.resolve_url(commit, f.path), Hash(), what=f.path, size=f.size,
                                     link=link, cdn=cdn)
                finally:
                    sem.release()
            tasks = []
            for i, f in enumerate(files):  # handed out in order, as a slot frees
                await sem.acquire()
                cdn = await loop.run_in_executor(None, ahead.take, i)
                tasks.append(asyncio.create_task(one(i, f, cdn)))
            await asyncio.gather(*tasks)
        took = time.perf_counter() - t0
        print(json.dumps({{"bytes": sum(f.size for f in files), "transfer_seconds": took}}))
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
    r = run_measured([sys.executable, "-c", code, endpoint, repo], {**os.environ, "PYTHONPATH": str(ROOT)})
    r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
    r.pop("stderr")
    r["seconds"] = r["transfer_seconds"]
    return r


def wan_raw(endpoint: str, repo: str, connections: int) -> dict[str, Any]:
    """The emulated link alone: the large file as ``connections`` plain parallel Range GETs of
    its signed URL (one resolve, aiohttp, nothing else), in a separate process: what this
    machine's loopback and the mirror's pacing let through, next to the nominal ceiling."""
    code = f"""
import asyncio, json, sys, time, aiohttp
async def main(endpoint, repo):
    async with aiohttp.ClientSession() as s:
        async with s.get(endpoint + "/api/datasets/" + repo + "/tree/main/data/web") as r:
            f = [e for e in await r.json() if e["path"].endswith(".zst")][0]
        async with s.get(endpoint + "/datasets/" + repo + "/resolve/main/" + f["path"], allow_redirects=False) as r:
            cdn = r.headers["Location"]
        size, n = f["size"], {connections}
        per = -(-size // n)
        t0 = time.perf_counter()
        async def one(i):
            async with s.get(cdn, headers={{"Range": f"bytes={{i * per}}-{{min(size, (i + 1) * per) - 1}}"}}) as r:
                async for _ in r.content.iter_chunked(1 << 18):
                    pass
        await asyncio.gather(*(one(i) for i in range(n)))
        print(json.dumps({{"bytes": size, "transfer_seconds": time.perf_counter() - t0}}))
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""
    r = run_measured([sys.executable, "-c", code, endpoint, repo])
    r.update(json.loads(r.pop("stdout").strip().splitlines()[-1]))
    r.pop("stderr")
    r["seconds"] = r["transfer_seconds"]
    return r


def wan_links(args: argparse.Namespace) -> list[tuple[float, float, float, float]]:
    """The emulated links measured: ``--wan-rtt-ms``/``--wan-conn-mbs``/``--wan-link-mbs`` with a
    ``--wan-mb`` file (the issue's), then each ``--wan-also RTT:CONN:LINK:MB`` (another link and
    file size, as a held-out server would have)."""
    links = [(args.wan_rtt_ms, args.wan_conn_mbs, args.wan_link_mbs, args.wan_mb)]
    for spec in filter(None, args.wan_also.split(",")):
        rtt, conn, link, mb = (float(x) for x in spec.split(":"))
        links.append((rtt, conn, link, mb))
    return links


def wan_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``prepare`` vs ``snapshot_download`` on one large file and on the same bytes in many
    small files, then the download side alone against the link's ceiling; same link, same run;
    once per link of ``wan_links``."""
    return [wan_link(args, *link) for link in wan_links(args)]


def wan_link(args: argparse.Namespace, rtt_ms: float, conn_mbs: float, link_mbs: float, mb: float) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    from bolmo_async.mirror import MirrorRepo, MirrorThread, WanConfig
    from bolmo_async.models import DEFAULT_CONNECTIONS

    wan = WanConfig(rtt=rtt_ms / 1000, response_rate=conn_mbs * 1e6, link_rate=link_mbs * 1e6)
    folder = HERE / "data" / f"wan-{mb:g}-{args.wan_small_files}"
    info = ensure_wan_corpus(folder, mb, args.wan_small_files)
    out = HERE / "out"
    repos = [MirrorRepo(WAN_LARGE_REPO, folder / "large"), MirrorRepo(WAN_SMALL_REPO, folder / "small")]
    jobs: list[tuple[str, Any]] = []
    for case, repo in (("large", WAN_LARGE_REPO), ("small", WAN_SMALL_REPO)):
        jobs.append((f"{case}_prepare", lambda r=repo, c=case: wan_ours(endpoint, r, out / f"wan-{c}")))
        jobs.append((f"{case}_snapshot", lambda r=repo, c=case: wan_snapshot(endpoint, r, out / f"wan-snap-{c}")))
        jobs.append((f"{case}_download", lambda r=repo: wan_download(endpoint, r, DEFAULT_CONNECTIONS)))
    jobs.append(("raw_link", lambda: wan_raw(endpoint, WAN_LARGE_REPO, DEFAULT_CONNECTIONS)))
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k, _ in jobs}
    load = [os.getloadavg()[0]]  # this machine is shared: a busy one slows the CPU-bound side only
    with MirrorThread(repos, wan=wan) as m:
        endpoint = m.endpoint
        for round_no in range(args.repeats):
            for key, job in jobs:
                print(f"WAN {rtt_ms:g} ms, round {round_no + 1}/{args.repeats}: {key} ...", flush=True)
                runs[key].append(job())
    load.append(os.getloadavg()[0])
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    ceiling = wan.ceiling(DEFAULT_CONNECTIONS)
    summary: dict[str, Any] = {
        "link": f"round trip {rtt_ms:g} ms, {conn_mbs:g} MB/s per response, {link_mbs:g} MB/s in all",
        "corpus": info,
        "load average (1 min) before / after": f"{load[0]:.1f} / {load[1]:.1f} on {len(os.sched_getaffinity(0))} cores",
    }
    for case in ("large", "small"):
        ours, snap, dl = best[f"{case}_prepare"], best[f"{case}_snapshot"], best[f"{case}_download"]
        rate = dl
        summary[case] = {
            "prepare_byte_s (end to end)": round(ours["seconds"], 2),
            "snapshot_download_s (download only, max_workers=8)": round(snap["seconds"], 2),
            "snapshot / prepare": round(snap["seconds"] / ours["seconds"], 2),
            "prepare_peak_rss_mb": round(ours["peak_rss_mb"]),
            "CPU s (prepare / snapshot_download)": f"{ours['cpu_seconds']:.1f} / {snap['cpu_seconds']:.1f}",
            "runs_s": {k: [round(x["seconds"], 2) for x in runs[f"{case}_{k}"]] for k in ("prepare", "snapshot")},
        }
        raw = best["raw_link"]["bytes"] / best["raw_link"]["transfer_seconds"]
        if rate:
            mbs = rate["bytes"] / rate["transfer_seconds"] / 1e6
            summary[case]["download_only_MB/s"] = round(mbs, 1)
            summary[case]["download / link ceiling"] = round(mbs * 1e6 / ceiling, 3)
            summary[case]["download / the link alone (plain parallel GETs, same run)"] = round(mbs * 1e6 / raw, 3)
            # No client moves a byte before two round trips (the resolve, then the CDN's first
            # byte): the best time the link allows is those plus every byte at the ceiling.
            best_s = 2 * wan.rtt + rate["bytes"] / ceiling
            summary[case]["download: the link's best time (2 round trips + bytes at the ceiling) / ours"] = round(
                best_s / rate["transfer_seconds"], 3
            )
    summary["link_ceiling_MB/s"] = round(ceiling / 1e6, 1)
    summary["link_alone_MB/s"] = round(best["raw_link"]["bytes"] / best["raw_link"]["transfer_seconds"] / 1e6, 1)
    return summary


def report_wan(summaries: list[dict[str, Any]]) -> None:
    md = ""
    for summary in summaries:
        lines = [f"## WAN ({summary['link']}; link ceiling {summary['link_ceiling_MB/s']} MB/s)", ""]
        lines += [
            f"The link alone ({summary['link_alone_MB/s']} MB/s): the large file as plain parallel Range GETs, "
            "no tool around them, in the same run.",
            "",
        ]
        lines += [f"Load average (1 min) before / after: {summary['load average (1 min) before / after']}.", ""]
        c = summary["corpus"]
        lines += [
            f"Corpus: {c['text_bytes'] / 1e6:.0f} MB of text; one file of {c['large_bytes'] / 1e6:.1f} MB, or "
            f"{c['small_files']} files of {c['small_bytes'] / 1e6:.1f} MB in all. Best of each measurement's rounds.",
            "",
            "| case | measure | value |",
            "|---|---|---|",
        ]
        for case in ("large", "small"):
            for k, v in summary[case].items():
                lines.append(f"| {case} | {k} | {v} |")
        md += "\n".join(lines) + "\n\n"
    (HERE / "results-wan.json").write_text(json.dumps(summaries, indent=1) + "\n")
    (HERE / "results-wan.md").write_text(md.rstrip("\n") + "\n")
    print(md)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=float, default=500.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="byte,subword")
    ap.add_argument("--skip-dolma", action="store_true", help="leave `dolma tokens` out (it takes minutes)")
    ap.add_argument("--repeat-dolma", action="store_true", help="run `dolma tokens` in every round too")
    ap.add_argument(
        "--only",
        choices=["s3", "wan"],
        help="only this section (s3: to an S3 server vs to local disk; wan: the emulated wide-area link)",
    )
    ap.add_argument("--skip-wan", action="store_true", help="leave the WAN section out")
    ap.add_argument("--wan-rtt-ms", type=float, default=80.0)
    ap.add_argument("--wan-conn-mbs", type=float, default=6.0, help="MB/s per response (a CDN's per-connection cap)")
    ap.add_argument("--wan-link-mbs", type=float, default=40.0, help="MB/s of the whole link")
    ap.add_argument("--wan-mb", type=float, default=55.0, help="compressed MB of the large file")
    ap.add_argument("--wan-small-files", type=int, default=150)
    ap.add_argument(
        "--wan-also",
        default="30:12:60:35",
        help="more links, each RTT_MS:CONN_MB/S:LINK_MB/S:FILE_MB (comma-separated; '' for none)",
    )
    ap.add_argument("--kinds", default="all", help="kinds of text measured alone (comma-separated; '' for none)")
    ap.add_argument("--dolma-kinds", default="code", help="kinds also run through `dolma tokens` alone ('all')")
    args = ap.parse_args()
    if args.only == "wan":
        (HERE / "out").mkdir(parents=True, exist_ok=True)
        wan = wan_section(args)
        report_wan(wan)
        return
    out = HERE / "out"
    out.mkdir(parents=True, exist_ok=True)
    mix = HERE / "data" / f"mix-{args.size_mb:g}"  # bench/textgen.py's mix-like corpus
    info = ensure_mix(mix, args.size_mb)
    print(f"mix: {info['documents']} documents, {info['text_bytes'] / 1e6:.1f} MB of text", flush=True)
    modes = [m for m in args.modes.split(",") if m]
    tok_dir = None
    if "subword" in modes:
        if not DOLMA2.exists():
            print(f"subword mode needs {DOLMA2}; measuring byte mode only", flush=True)
            modes.remove("subword")
        else:
            tok_dir = out / "dolma2"
            tok_dir.mkdir(exist_ok=True)
            (tok_dir / "tokenizer.json").write_bytes(DOLMA2.read_bytes())
            (tok_dir / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    mirror, endpoint = start_mirror(mix, tok_dir)
    if args.only == "s3":
        try:
            row = s3_rows(endpoint, out, args.repeats)
        finally:
            mirror.terminate()
            mirror.wait()
        (HERE / "results_s3.json").write_text(json.dumps(row, indent=1) + "\n")
        print("\n".join(s3_report(row)))
        return
    cores = len(os.sched_getaffinity(0))
    jobs: list[tuple[str, Any]] = []
    for mode in modes:
        jobs += [
            (f"{mode}_f0.001", lambda m=mode: ours(endpoint, m, out / f"{m}-small", 0.001)),
            # Issue 24's check: the 0.1% run on `--processes 2` (the fork server's start included).
            (f"{mode}_f0.001_pN", lambda m=mode: ours(endpoint, m, out / f"{m}-small", 0.001, processes=cores)),
            # The two sizes of the steady state run with the same pool (auto would give the 0.1
            # run fewer processes on a small mix).
            (f"{mode}_f0.1", lambda m=mode: ours(endpoint, m, out / f"{m}-mid", 0.1, processes=cores)),
            (f"{mode}_f1", lambda m=mode: ours(endpoint, m, out / f"{m}-full", 1.0, processes=cores)),
            (f"{mode}_f1_bound10M", lambda m=mode: ours(endpoint, m, out / f"{m}-10m", 1.0, 10_000_000, cores)),
        ]
    kinds = [k for k in info.get("kinds", {}) if args.kinds == "all" or k in args.kinds.split(",")]
    dolma_kinds = [k for k in kinds if args.dolma_kinds == "all" or k in args.dolma_kinds.split(",")]
    jobs += kind_jobs(endpoint, modes, info, out, cores, kinds)
    jobs.append(("limit_write", lambda: limit_write(out)))
    jobs.append(("s3_vs_disk", lambda: s3_rows(endpoint, out, 1)))
    if "code" in info.get("kinds", {}):
        code = info["kinds"]["code"]
        jobs.append(("gzip_decode", lambda: gzip_decode(mix, code["source"], code["text_bytes"])))
    if "subword" in modes and not args.skip_dolma and (DOLMA_VENV / "bin" / "dolma").exists():
        jobs.append(("dolma_tokens_2p", lambda: dolma_tokens(mix, out / "dolma")))
        # And on the files of each kind measured alone (by default code, the target):
        # each kind's ratio is against `dolma tokens` on the same files.
        for kind, k in info.get("kinds", {}).items():
            if kind in dolma_kinds:
                jobs.append((f"dolma_tokens_2p_{kind}", lambda s=k["source"]: dolma_tokens(mix, out / "dolma", s)))
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key, _ in jobs}
    try:
        for round_no in range(args.repeats):
            for key, job in jobs:
                if key.startswith("dolma") and round_no and not args.repeat_dolma:
                    continue  # minutes per run: once, in the first round, unless asked
                print(f"round {round_no + 1}/{args.repeats}: {key} ...", flush=True)
                runs[key].append(job())
    finally:
        mirror.terminate()
        mirror.wait()
    results: dict[str, Any] = {"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}, "mix": info}
    for key, rs in runs.items():
        if not rs:
            continue
        if key == "s3_vs_disk":
            results[key] = max(rs, key=lambda r: r["s3_over_disk_throughput"])
            continue
        if key == "gzip_decode":  # best of each inflater over the rounds
            results[key] = {k: min(r[k] for r in rs) if k.endswith("_s") else rs[0][k] for k in rs[0]}
            continue
        results[key] = min(rs, key=lambda r: r["seconds"])
        results[key]["runs_seconds"] = [round(x["seconds"], 3) for x in rs]
    report(results, modes)
    if not args.skip_wan:
        report_wan(wan_section(args))


def kind_jobs(
    endpoint: str, modes: list[str], info: dict[str, Any], out: Path, cores: int, kinds: list[str]
) -> list[tuple[str, Any]]:
    """Each kind of text of the mix (one source each) alone: fraction 0.1 and 1.0 of its files,
    with the pool of the whole-mix runs, for its steady state."""
    jobs: list[tuple[str, Any]] = []
    for mode in modes:
        for kind, k in info.get("kinds", {}).items():
            if kind not in kinds:
                continue
            inc = f"data/{k['source']}/*"
            for frac, tag in ((0.1, "f0.1"), (1.0, "f1")):
                jobs.append(
                    (
                        f"{mode}_{kind}_{tag}",
                        lambda m=mode, f=frac, i=inc, t=tag, kd=kind: ours(
                            endpoint, m, out / f"{m}-{kd}-{t}", f, processes=cores, include=i
                        ),
                    )
                )
    return jobs


def gzip_decode(mix: Path, source: str, text_bytes: int, rounds: int = 3) -> dict[str, Any]:
    """The JSON-lines decoder (``decode.LineDecoder``: decompress, split lines, decode JSON) on
    ``source``'s files as one ``.jsonl.gz`` (gzip -6, made once beside the mix), with ISA-L's
    inflater (the default) and zlib's, interleaved in this process: the best of each."""
    import gzip
    import zlib

    import zstandard
    from isal import isal_zlib

    from bolmo_async import decode
    from bolmo_async.models import SkipCounter

    blob_path = mix.parent / f"{mix.name}-gz" / f"{source}.jsonl.gz"
    if not blob_path.exists():
        blob_path.parent.mkdir(parents=True, exist_ok=True)
        plain = b"".join(
            zstandard.ZstdDecompressor().decompressobj().decompress(f.read_bytes())
            for f in sorted((mix / "data" / source).iterdir())
        )
        tmp = blob_path.with_suffix(".tmp")
        tmp.write_bytes(gzip.compress(plain, compresslevel=6, mtime=0))
        tmp.rename(blob_path)
    blob = blob_path.read_bytes()
    chosen = decode._gzip
    best: dict[str, float] = {}
    try:
        for i in range(rounds):
            for name, module in (("isal", isal_zlib), ("zlib", zlib))[:: 1 if i % 2 == 0 else -1]:
                decode._gzip = lambda m=module: (m, (m.error,))  # type: ignore[assignment]
                dec = decode.LineDecoder("code.jsonl.gz", ".jsonl.gz", SkipCounter())
                t0 = time.perf_counter()
                docs = 0
                for pos in range(0, len(blob), 1 << 20):
                    docs += sum(b.num_rows for b in dec.feed(blob[pos : pos + (1 << 20)]))
                docs += sum(b.num_rows for b in dec.finish())
                best[name] = min(best.get(name, 1e9), time.perf_counter() - t0)
                if dec.skips.total or not docs:
                    raise RuntimeError(f"{blob_path}: {docs} documents, skips {dec.skips.counts}")
    finally:
        decode._gzip = chosen  # type: ignore[method-assign]
    return {"seconds": best["isal"], "isal_s": best["isal"], "zlib_s": best["zlib"], "text_bytes": text_bytes}


def steady_cpu(mid: dict[str, Any], full: dict[str, Any], cores: int = 2) -> float:
    """The steady state from CPU, not wall time: the extra work of ``full`` over ``mid`` over the
    extra CPU it took, on ``cores`` cores (bounded by the coordinator's own extra CPU)."""
    d_coord = max(1e-9, full["coordinator"] - mid["coordinator"])
    d_total = full["coordinator"] + full["workers"] - mid["coordinator"] - mid["workers"]
    return float((full["work"] - mid["work"]) / max(d_coord, d_total / cores))


def dolma_cpu_rate(d: dict[str, Any], cores: int = 2) -> float:
    """`dolma tokens`' tokens per second at ``cores`` cores, from its process tree's CPU."""
    return float(d["work"] / (d["cpu_seconds"] / cores)) if d.get("cpu_seconds") else 0.0


def kind_report(r: dict[str, Any], modes: list[str]) -> tuple[list[str], dict[str, Any]]:
    """The table per kind of text: its share, escapes, steady state and end to end."""
    kinds = r["mix"].get("kinds", {})
    unit = {"byte": ("MB/s of text", 1e6), "subword": ("M dolma2 tokens/s", 1e6)}
    lines: list[str] = []
    out: dict[str, Any] = {}
    for mode in modes:
        rows = []
        for kind, k in kinds.items():
            mid, full = r.get(f"{mode}_{kind}_f0.1"), r.get(f"{mode}_{kind}_f1")
            if not (mid and full):
                continue
            name, scale = unit[mode]
            steady = (full["work"] - mid["work"]) / max(1e-9, full["seconds"] - mid["seconds"])
            cpu = steady_cpu(mid, full)
            s: dict[str, Any] = {
                "text MB": round(k["text_bytes"] / 1e6, 1),
                "escapes / JSON byte": k.get("escapes_per_json_byte"),
                f"steady state ({name})": round(steady / scale, 2),
                f"steady state from CPU, 2 cores ({name})": round(cpu / scale, 2),
                f"end to end ({name})": round(full["work"] / full["seconds"] / scale, 2),
                "peak RSS MB": round(full["peak_rss_mb"]),
            }
            d = r.get(f"dolma_tokens_2p_{kind}")
            if mode == "subword" and d:
                rate = d["work"] / d["seconds"]
                s["dolma tokens (M tokens/s)"] = round(rate / scale, 3)
                s["steady state / dolma tokens"] = round(steady / rate, 1)
                if dolma_cpu_rate(d):
                    s["from CPU: steady state / dolma tokens"] = round(cpu / dolma_cpu_rate(d), 1)
            out.setdefault(mode, {})[kind] = s
            rows.append((kind, s))
        if rows:
            cols = list(dict.fromkeys(c for _, s in rows for c in s))  # (dolma's columns: only its kinds have them)
            lines += [f"## {mode}, per kind of text (each kind's files alone, fraction 1.0 vs 0.1)", ""]
            lines += ["| kind | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {kind} | " + " | ".join(str(s.get(c, "")) for c in cols) + " |" for kind, s in rows]
            lines.append("")
    return lines, out


def report(r: dict[str, Any], modes: list[str]) -> None:
    kinds = r["mix"].get("kinds", {})
    mix = ", ".join(f"{k} {v['text_bytes'] / r['mix']['text_bytes']:.0%}" for k, v in kinds.items())
    lines = [
        f"Benchmark: {r['mix']['documents']} unique documents, {r['mix']['text_bytes'] / 1e6:.0f} MB of text"
        + (f" ({mix})" if mix else "")
        + f", {r['machine']['cores']} cores; best of each measurement's rounds.",
        "",
    ]
    summary: dict[str, Any] = {}
    unit = {"byte": ("MB/s of text", 1e6), "subword": ("M dolma2 tokens/s", 1e6)}
    for mode in modes:
        small, mid, full, b10 = (r.get(f"{mode}_{k}") for k in ("f0.001", "f0.1", "f1", "f1_bound10M"))
        small_pn = r.get(f"{mode}_f0.001_pN")
        if not (small and mid and full):
            continue
        name, scale = unit[mode]
        steady = (full["work"] - mid["work"]) / max(1e-9, full["seconds"] - mid["seconds"])
        total_cpu = full["coordinator"] + full["workers"]
        share = full["coordinator"] / total_cpu
        proj = {n: full["work"] / max(full["coordinator"], total_cpu / n) for n in (2, 8, 16, 64)}
        s = {
            "fixed_cost_s (0.1% run end to end)": round(small["seconds"], 2),
            **(
                {
                    f"fixed_cost_s (0.1% run, --processes {small_pn['processes']})": round(small_pn["seconds"], 2),
                    f"steady_state ({name}, fraction 1.0 vs that 0.1% run: the issue's measure)": round(
                        (full["work"] - small_pn["work"]) / max(1e-9, full["seconds"] - small_pn["seconds"]) / scale, 2
                    ),
                }
                if small_pn
                else {}
            ),
            f"end_to_end ({name})": round(full["work"] / full["seconds"] / scale, 2),
            f"steady_state ({name}, fraction 1.0 vs 0.1)": round(steady / scale, 2),
            "coordinator_cpu_s": round(full["coordinator"], 2),
            "workers_cpu_s": round(full["workers"], 2),
            "workers_cpu_s of which system (kernel)": round(full.get("workers_sys", 0), 2),
            "coordinator_share_of_cpu": round(share, 3),
            **{f"projected_{n}_cores ({name}, CPU-bound)": round(v / scale, 1) for n, v in proj.items()},
            "projection_64_over_2": round(proj[64] / proj[2], 1),
            "peak_rss_mb (fraction 1.0)": round(full["peak_rss_mb"]),
            "peak_rss_mb (fraction 0.1)": round(mid["peak_rss_mb"]),
            "rss_ratio fraction 1.0/0.1": round(full["peak_rss_mb"] / mid["peak_rss_mb"], 2),
        }
        if b10:
            s["rss_ratio shard bound 100M/10M"] = round(full["peak_rss_mb"] / b10["peak_rss_mb"], 2)
        marginal = (full["coordinator"] - mid["coordinator"]) / max(
            1e-9, total_cpu - mid["coordinator"] - mid["workers"]
        )
        s["coordinator_share_of_marginal_cpu (fraction 1.0 vs 0.1)"] = round(max(0.0, marginal), 3)
        # The same projection for the steady state: the extra work of fraction 1.0 over 0.1 and
        # the extra CPU it took, so the start-up both runs pay (interpreter, imports, listing,
        # spawning, building engines) is left out, as it is of a long run.
        d_work = full["work"] - mid["work"]
        d_coord = max(1e-9, full["coordinator"] - mid["coordinator"])
        d_total = total_cpu - mid["coordinator"] - mid["workers"]
        steady_proj = {n: d_work / max(d_coord, d_total / n) for n in (2, 64)}
        s["steady-state projection_64_over_2 (marginal CPU, fraction 1.0 vs 0.1)"] = round(
            steady_proj[64] / steady_proj[2], 1
        )
        s[f"steady state from CPU, 2 cores ({name}, marginal CPU, fraction 1.0 vs 0.1)"] = round(
            steady_cpu(mid, full) / scale, 2
        )
        w = r.get("limit_write")
        if mode == "byte" and w:
            how = "O_DIRECT blocks, as shards are written" if w.get("direct") else "ordinary writes"
            s[f"floor: writing the uint32 output to this disk, {how} (MB/s of text)"] = round(
                w["bytes"] / 4 / w["seconds"] / 1e6, 1
            )
            if "page_cache_seconds" in w:
                s["floor: the same through the page cache, one writer (MB/s of text)"] = round(
                    w["bytes"] / 4 / w["page_cache_seconds"] / 1e6, 1
                )
            s["floor: sha256 of the uint32 output, 1 core (MB/s of text)"] = round(
                w["bytes"] / 4 / w["sha256_seconds"] / 1e6, 1
            )
        d = r.get("dolma_tokens_2p")
        if mode == "subword" and d:
            dolma_rate = d["work"] / d["seconds"]
            s["dolma_tokens_2p (M tokens/s)"] = round(dolma_rate / scale, 3)
            s["steady_state / dolma_tokens"] = round(steady / dolma_rate, 1)
            s["end_to_end / dolma_tokens"] = round(full["work"] / full["seconds"] / dolma_rate, 1)
            if dolma_cpu_rate(d):
                s["dolma_tokens_2p from CPU, 2 cores (M tokens/s)"] = round(dolma_cpu_rate(d) / scale, 3)
                s["from CPU: steady state / dolma_tokens"] = round(steady_cpu(mid, full) / dolma_cpu_rate(d), 1)
        summary[mode] = s
        lines += (
            [f"## {mode}", "", "| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in s.items()] + [""]
        )
    kind_lines, per_kind = kind_report(r, modes)
    lines += kind_lines
    summary["per_kind"] = per_kind
    lines += [
        "## runs (seconds of each round)",
        "",
        "| run | seconds | tokens | peak RSS MB | coordinator CPU s | workers CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in r.items():
        if isinstance(v, dict) and "runs_seconds" in v:
            lines.append(
                f"| {k} | {v['runs_seconds']} | {v.get('tokens', '')} | {round(v['peak_rss_mb'])} | "
                f"{round(v.get('coordinator', 0), 2)} | {round(v.get('workers', 0), 2)} |"
            )
    if "s3_vs_disk" in r:
        lines += s3_report(r["s3_vs_disk"])
    if "gzip_decode" in r:
        g = r["gzip_decode"]
        rates = {k: round(g["text_bytes"] / g[f"{k}_s"] / 1e6, 1) for k in ("isal", "zlib")}
        summary["gzip_decode"] = {**rates, "isal / zlib": round(rates["isal"] / rates["zlib"], 2)}
        lines += [
            "",
            f"## .jsonl.gz: the decoder (decompress, lines, JSON) on the code kind as one gzip -6 file "
            f"({g['text_bytes'] / 1e6:.0f} MB of text), one core, in the same run",
            "",
            "| inflater | MB/s of text |",
            "|---|---|",
            f"| ISA-L (`isal`, the default) | {rates['isal']} |",
            f"| zlib (the fallback; what ran before) | {rates['zlib']} |",
            f"| isal / zlib | {summary['gzip_decode']['isal / zlib']} |",
        ]
    md = "\n".join(lines) + "\n"
    (HERE / "results.json").write_text(json.dumps({"summary": summary, "raw": r}, indent=1) + "\n")
    (HERE / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""Which object-store library ``StoreDir`` is built on: measured, not guessed.

Against one S3-compatible server on loopback (moto's server mode, in its own process so its CPU
is not counted), each candidate does the same work through its ordinary client:

- a streaming multipart upload of ``--mb`` MB handed over in 8 MiB writes (as the shard writer does);
- ``--ranges`` ranged reads of 1 MiB at fixed pseudo-random offsets of that object;
- listing a prefix of 500 small objects (after writing them: the small-put latency);
- a conditional create (``If-None-Match: *``) of an object that exists: refused or not.

Reported per library: wall seconds and client CPU seconds (this process, all its threads) of
each step, as ratios beside each other. Run: ``python bench/store_libs.py [--mb 256]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

PART = 8 << 20
KEY, SECRET, REGION = "bench-key", "bench-secret", "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_process() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from moto.server import main; main(['-H', '127.0.0.1', '-p', '{port}'])"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def offsets(size: int, n: int) -> list[int]:
    rng = random.Random(7)
    return [rng.randrange(0, size - (1 << 20)) for _ in range(n)]


def run_obstore(endpoint: str, bucket: str, block: memoryview, n_parts: int, n_ranges: int) -> dict[str, Any]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id=KEY,
        secret_access_key=SECRET,
        region=REGION,
        client_options={"allow_http": True},
    )

    def upload() -> None:
        with obstore.open_writer(store, "big", buffer_size=PART, max_concurrency=4) as f:
            for _ in range(n_parts):
                f.write(block)

    def ranges() -> int:
        size = n_parts * PART
        return sum(len(obstore.get_range(store, "big", start=o, length=1 << 20)) for o in offsets(size, n_ranges))

    def small() -> None:
        for i in range(500):
            obstore.put(store, f"many/{i:04d}", b"x" * 100)

    def listing() -> int:
        return sum(len(chunk) for chunk in obstore.list(store, "many/"))

    def conditional() -> bool:
        obstore.put(store, "cond", b"a")
        try:
            obstore.put(store, "cond", b"b", mode="create")
        except Exception:
            return True
        return False

    return measure(upload, ranges, small, listing, conditional)


def run_s3fs(endpoint: str, bucket: str, block: memoryview, n_parts: int, n_ranges: int) -> dict[str, Any]:
    import s3fs

    fs = s3fs.S3FileSystem(
        key=KEY, secret=SECRET, endpoint_url=endpoint, client_kwargs={"region_name": REGION}, use_listings_cache=False
    )

    def upload() -> None:
        with fs.open(f"{bucket}/big", "wb", block_size=PART) as f:
            for _ in range(n_parts):
                f.write(block)

    def ranges() -> int:
        size = n_parts * PART
        return sum(len(fs.cat_file(f"{bucket}/big", start=o, end=o + (1 << 20))) for o in offsets(size, n_ranges))

    def small() -> None:
        for i in range(500):
            fs.pipe_file(f"{bucket}/many/{i:04d}", b"x" * 100)

    def listing() -> int:
        fs.invalidate_cache()
        return len(fs.ls(f"{bucket}/many/", detail=False))

    def conditional() -> bool:
        fs.pipe_file(f"{bucket}/cond", b"a")
        try:
            fs.pipe_file(f"{bucket}/cond", b"b", mode="create")
        except Exception:
            return True
        return False

    return measure(upload, ranges, small, listing, conditional)


def run_pyarrow(endpoint: str, bucket: str, block: memoryview, n_parts: int, n_ranges: int) -> dict[str, Any]:
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        access_key=KEY,
        secret_key=SECRET,
        region=REGION,
        endpoint_override=endpoint.removeprefix("http://"),
        scheme="http",
    )

    def upload() -> None:
        with fs.open_output_stream(f"{bucket}/big") as f:
            for _ in range(n_parts):
                f.write(block)

    def ranges() -> int:
        size = n_parts * PART
        with fs.open_input_file(f"{bucket}/big") as f:
            return sum(len(f.read_at(1 << 20, o)) for o in offsets(size, n_ranges))

    def small() -> None:
        for i in range(500):
            with fs.open_output_stream(f"{bucket}/many/{i:04d}") as f:
                f.write(b"x" * 100)

    def listing() -> int:
        return len(fs.get_file_info(pafs.FileSelector(f"{bucket}/many")))

    def conditional() -> bool:
        return False  # no conditional write in pyarrow.fs

    return measure(upload, ranges, small, listing, conditional)


def measure(*steps: Callable[[], Any]) -> dict[str, Any]:
    names = ("upload", "ranges", "small_puts", "list", "conditional")
    out: dict[str, Any] = {}
    for name, fn in zip(names, steps, strict=True):
        wall, cpu, res = timed(fn)
        out[name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3)} if name != "conditional" else bool(res)
    return out


def make_bucket(endpoint: str, bucket: str) -> None:
    import obstore
    from obstore.store import S3Store

    del obstore, S3Store
    import boto3  # moto's own dependency: only to create the bucket

    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name=REGION
    ).create_bucket(Bucket=bucket)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--ranges", type=int, default=200)
    ap.add_argument("--only", nargs="*", default=["obstore", "s3fs", "pyarrow"])
    args = ap.parse_args()
    n_parts = max(1, (args.mb << 20) // PART)
    block = memoryview(os.urandom(PART))
    runners = {"obstore": run_obstore, "s3fs": run_s3fs, "pyarrow": run_pyarrow}
    results: dict[str, Any] = {}
    for name in args.only:
        with moto_process() as endpoint:  # a fresh server per library: same state for each
            make_bucket(endpoint, "bench")
            results[name] = runners[name](endpoint, "bench", block, n_parts, args.ranges)
        print(name, json.dumps(results[name]), flush=True)
    base = results.get("obstore")
    if base:
        for name, r in results.items():
            ratios = {k: round(r[k]["cpu_s"] / max(base[k]["cpu_s"], 1e-3), 2) for k in ("upload", "ranges", "list")}
            print(f"{name}: client CPU relative to obstore {ratios}")


if __name__ == "__main__":
    main()

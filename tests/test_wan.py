"""Over an emulated wide-area link (the mirror's round trip and rate caps): Range segments in
parallel from one resolve, read-ahead, the Range-less fallback, and the same shards as on
loopback, with faults too."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from aiohttp import ClientSession, web

import bolmo_async
from bolmo_async import download
from bolmo_async.download import Link, fetch_file
from bolmo_async.errors import IntegrityError
from bolmo_async.hub import HubClient, make_session
from bolmo_async.mirror import FaultConfig, MirrorRepo, MirrorThread, WanConfig
from bolmo_async.models import DEFAULT_REPO_ID
from bolmo_async.outdir import open_output
from bolmo_async.planner import load_plan
from bolmo_async.retry import RetryPolicy
from bolmo_async.staging import Staging

from .helpers import finish, wait_for_endpoint

FAST = RetryPolicy(max_attempts=6, base_delay=0.01, max_delay=0.05, read_timeout=5)


class Hash:
    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0

    def feed(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)

    def reset(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0


def _random_repo(root: Path, mb: int) -> Path:
    """A repo of one LFS file of ``mb`` MB (random bytes: no two segments alike)."""
    d = root / "data" / "x"
    d.mkdir(parents=True)
    (d / "big.jsonl.zst").write_bytes(
        b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(mb << 15))
    )
    return root


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    """A repo of one 3 MB LFS file (random bytes: no two segments alike)."""
    return _random_repo(tmp_path / "repo", 3)


def test_the_mirror_emulates_a_round_trip_and_rate_caps(blob):
    """A round trip before every answer; one response at most ``response_rate``; two at once
    share ``link_rate``."""
    wan = WanConfig(rtt=0.2, response_rate=4e6, link_rate=6e6)
    repo = MirrorRepo("a/b", blob)
    path = "data/x/big.jsonl.zst"

    async def get(session: ClientSession, url: str, n: int) -> float:
        t0 = time.monotonic()
        async with session.get(url, headers={"Range": f"bytes=0-{n - 1}"}) as r:
            assert len(await r.read()) == n
        return time.monotonic() - t0

    async def go(endpoint: str) -> tuple[float, float, list[float]]:
        async with ClientSession() as s:
            url = f"{endpoint}/datasets/a/b/resolve/main/{path}"
            api = time.monotonic()
            async with s.get(f"{endpoint}/api/datasets/a/b/revision/main") as r:
                await r.read()
            api = time.monotonic() - api
            one = await get(s, url, 2_000_000)  # 302 + CDN: two round trips, then 0.5 s at 4 MB/s
            two = await asyncio.gather(get(s, url, 1_500_000), get(s, url, 1_500_000))  # 3 MB at 6 MB/s
            return api, one, two

    with MirrorThread([repo], wan=wan) as m:
        api, one, two = asyncio.run(go(m.endpoint))
    assert 0.2 <= api < 0.6
    assert 0.4 + 0.5 * 0.9 <= one < 0.4 + 0.5 * 2.5
    assert all(0.4 + 0.5 * 0.9 <= t < 0.4 + 0.5 * 2.5 for t in two)
    assert wan.ceiling(1) == 4e6 and wan.ceiling(8) == 6e6


def test_a_large_file_comes_in_parallel_segments_from_one_resolve(blob, monkeypatch):
    """The decoder is starved (the link is the limit): the file is fetched as Range segments
    over several connections, all to the signed CDN URL of the one resolve, verified whole."""
    monkeypatch.setattr(download, "WHOLE", 256 * 1024)
    monkeypatch.setattr(download, "BLOCK", 128 * 1024)
    wan = WanConfig(rtt=0.05, response_rate=1e6)  # 1 MB/s per connection: 3 s on one
    repo = MirrorRepo("a/b", blob)
    path = "data/x/big.jsonl.zst"
    entry = repo.files[path]

    async def go(endpoint: str, connections: int) -> tuple[Hash, float]:
        async with make_session(connections, FAST) as session:
            client = HubClient(session, endpoint=endpoint, repo_id="a/b", retry=FAST)
            sink = Hash()
            link = Link(connections)
            t0 = time.monotonic()
            n = await fetch_file(client, client.resolve_url("main", path), sink, what=path, size=entry.size, link=link)
            assert n == entry.size and link.busy == 0  # every connection given back
            return sink, time.monotonic() - t0

    with MirrorThread([repo], wan=wan) as m:
        sink, took = asyncio.run(go(m.endpoint, 8))
        resolves = [p for _, p in m.hub_requests if "/resolve/" in p]
        ranges = [r["range"] for r in m.cdn_requests]
    assert sink.h.hexdigest() == entry.sha256 and sink.n == entry.size
    assert len(resolves) == 1  # no extra resolve per segment
    assert len(ranges) >= 24 and all(r and r.startswith("bytes=") for r in ranges)  # 24 blocks, some split
    assert took < 1.8  # one connection alone needs 3 s


class SlowSink(Hash):
    """A decoder slower than the link (it sleeps per byte): notes when its first bytes came."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate
        self.first: float | None = None

    def feed(self, data: bytes) -> None:
        if self.first is None:
            self.first = time.monotonic()
        super().feed(data)
        time.sleep(len(data) / self.rate)


def test_segmented_files_come_in_small_blocks_so_that_decoding_starts_sooner(blob, monkeypatch):
    """Over a wide-area link a file's segments share the link, so its first block comes at a
    fraction of it: its first block, and every block once segments are open, is
    ``SEGMENT_BLOCK`` (not ``BLOCK``), and its decoder gets bytes after one small block. The
    file still arrives whole, verified, from one resolve."""
    monkeypatch.setattr(download, "WHOLE", 256 * 1024)
    monkeypatch.setattr(download, "BLOCK", 512 * 1024)
    monkeypatch.setattr(download, "SEGMENT_BLOCK", 96 * 1024)
    wan = WanConfig(rtt=0.04, response_rate=0.5e6, link_rate=2e6)  # a 512 KB block: over a second
    repo = MirrorRepo("a/b", blob)
    path = "data/x/big.jsonl.zst"
    entry = repo.files[path]

    async def go(endpoint: str) -> tuple[SlowSink, float, dict]:
        async with make_session(8, FAST) as session:
            client = HubClient(session, endpoint=endpoint, repo_id="a/b", retry=FAST)
            sink, stats, link = SlowSink(4e6), {}, Link(8)
            t0 = time.monotonic()
            await fetch_file(
                client, client.resolve_url("main", path), sink, what=path, size=entry.size, link=link, stats=stats
            )
            assert link.busy == 0
            assert sink.first is not None
            return sink, sink.first - t0, stats

    with MirrorThread([repo], wan=wan) as m:
        sink, first, stats = asyncio.run(go(m.endpoint))
        resolves = [p for _, p in m.hub_requests if "/resolve/" in p]
        spans = [tuple(int(x) for x in r["range"][6:].split("-")) for r in m.cdn_requests if r["range"]]
    assert sink.h.hexdigest() == entry.sha256 and sink.n == entry.size and len(resolves) == 1
    assert stats["lanes_max"] >= 8, stats
    block = 96 * 1024
    assert spans[0] == (0, block - 1)
    # Blocks start at multiples of the segment block (pieces split off at the end excepted),
    # and none is larger.
    starts = {lo for lo, _ in spans}
    assert set(range(0, entry.size, block)) <= starts, sorted(starts)
    assert all(hi - lo < block for lo, hi in spans)
    assert first < 0.8, first  # one 512 KB block first: a second at least


def test_one_connection_takes_full_blocks_after_the_first(blob, monkeypatch):
    """On loopback (the decoder, not the link, is the limit) a file keeps one connection: after
    its first small block, its blocks are ``BLOCK`` (fewer requests)."""
    monkeypatch.setattr(download, "WHOLE", 256 * 1024)
    monkeypatch.setattr(download, "BLOCK", 512 * 1024)
    monkeypatch.setattr(download, "SEGMENT_BLOCK", 96 * 1024)
    # Never judged starved or far (a loaded machine's loopback can pause): one connection.
    monkeypatch.setattr(download, "STARVED", 30.0)
    monkeypatch.setattr(download, "FAR", 30.0)
    repo = MirrorRepo("a/b", blob)
    path = "data/x/big.jsonl.zst"
    entry = repo.files[path]

    async def go(endpoint: str) -> Hash:
        async with make_session(8, FAST) as session:
            client = HubClient(session, endpoint=endpoint, repo_id="a/b", retry=FAST)
            sink, link, stats = SlowSink(60e6), Link(8), {}
            await fetch_file(
                client, client.resolve_url("main", path), sink, what=path, size=entry.size, link=link, stats=stats
            )
            assert stats["lanes_max"] == 1, stats
            return sink

    with MirrorThread([repo]) as m:
        sink = asyncio.run(go(m.endpoint))
        spans = [tuple(int(x) for x in r["range"][6:].split("-")) for r in m.cdn_requests if r["range"]]
    assert sink.h.hexdigest() == entry.sha256
    block, big = 96 * 1024, 512 * 1024
    want = [(0, block - 1)] + [(lo, min(entry.size, lo + big) - 1) for lo in range(block, entry.size, big)]
    assert spans == want


@pytest.mark.parametrize("faults", [None, "reset,cut,http503"])
def test_blocks_shrink_when_segments_open_mid_file(blob, monkeypatch, faults):
    """A link whose round trip hides (block 0 comes within 30 ms) but whose connections are
    capped: the first block is small, the next ``BLOCK`` on one connection, until the decoder
    starves; then segments open and the blocks after are small. Blocks of both sizes make up
    the file, which arrives byte-identical and verified, also when pieces break and resume."""
    monkeypatch.setattr(download, "WHOLE", 256 * 1024)
    monkeypatch.setattr(download, "BLOCK", 512 * 1024)
    monkeypatch.setattr(download, "SEGMENT_BLOCK", 32 * 1024)
    monkeypatch.setattr(download, "FAR", 0.25)  # block 0 (12 ms) comes before the link shows as far
    wan = WanConfig(rtt=0.004, response_rate=3e6)  # a 512 KB block: 0.17 s, so the decoder starves
    repo = MirrorRepo("a/b", blob)
    path = "data/x/big.jsonl.zst"
    entry = repo.files[path]
    kinds = tuple(faults.split(",")) if faults else ()
    fault = FaultConfig(rate=0.2, seed=4, kinds=kinds, max_per_path=4) if kinds else None

    async def go(endpoint: str) -> tuple[Hash, list[str], dict]:
        async with make_session(8, FAST) as session:
            client = HubClient(session, endpoint=endpoint, repo_id="a/b", retry=FAST)
            sink, link, verified, stats = Hash(), Link(8), [], {}

            def verify() -> None:
                verified.append(sink.h.hexdigest())
                if verified[-1] != entry.sha256:
                    raise IntegrityError("sha256 mismatch")

            await fetch_file(
                client,
                client.resolve_url("main", path),
                sink,
                what=path,
                size=entry.size,
                link=link,
                verify=verify,
                stats=stats,
            )
            assert link.busy == 0
            return sink, verified, stats

    with MirrorThread([repo], wan=wan, faults=fault) as m:
        sink, verified, stats = asyncio.run(go(m.endpoint))
        spans = [tuple(int(x) for x in r["range"][6:].split("-")) for r in m.cdn_requests if r["range"]]
    assert verified[-1] == entry.sha256 and sink.n == entry.size
    assert stats["steps"] >= 1 and stats["lanes_max"] > 1, stats
    small, big = 32 * 1024, 512 * 1024
    if fault is None:
        assert spans[0] == (0, small - 1)
        assert spans[1] == (small, small + big - 1)  # one connection: a full block
        assert sum(hi - lo + 1 == small for lo, hi in spans) >= 10  # segments: small blocks
    else:
        assert fault.injected


@pytest.mark.parametrize("faults", [None, "reset,cut,http503"])
def test_the_last_pieces_are_split_across_idle_connections(blob, monkeypatch, faults):
    """The end phase: 6 blocks on 4 connections, so two lanes are idle while the last two
    blocks come at one connection's cap; each takes the second part of one of them (a Range
    that starts inside a block, from the same resolve). The file still arrives byte-identical
    and verified, also when pieces break and resume."""
    monkeypatch.setattr(download, "WHOLE", 256 * 1024)
    monkeypatch.setattr(download, "BLOCK", 512 * 1024)
    wan = WanConfig(rtt=0.03, response_rate=1e6)  # a block: 0.5 s on its connection
    repo = MirrorRepo("a/b", blob)
    path = "data/x/big.jsonl.zst"
    entry = repo.files[path]
    kinds = tuple(faults.split(",")) if faults else ()
    fault = FaultConfig(rate=0.3, seed=2, kinds=kinds, max_per_path=4) if kinds else None

    async def go(endpoint: str) -> tuple[Hash, dict, list[str]]:
        async with make_session(4, FAST) as session:
            client = HubClient(session, endpoint=endpoint, repo_id="a/b", retry=FAST)
            sink, stats, link, verified = Hash(), {}, Link(4), []

            def verify() -> None:
                verified.append(sink.h.hexdigest())
                if verified[-1] != entry.sha256:
                    raise IntegrityError("sha256 mismatch")

            n = await fetch_file(
                client,
                client.resolve_url("main", path),
                sink,
                what=path,
                size=entry.size,
                link=link,
                stats=stats,
                verify=verify,
            )
            assert n == entry.size and link.busy == 0
            return sink, stats, verified

    with MirrorThread([repo], wan=wan, faults=fault) as m:
        sink, stats, verified = asyncio.run(go(m.endpoint))
        resolves = [p for _, p in m.hub_requests if "/resolve/" in p]
        starts = [int(r["range"][6:].split("-")[0]) for r in m.cdn_requests if r["range"]]
    assert verified[-1] == entry.sha256 and sink.n == entry.size
    assert len(resolves) == 1
    assert stats["splits"] >= 1, stats
    assert any(s % (512 * 1024) for s in starts), starts  # a piece starting inside a block
    if fault is not None:
        assert fault.injected


async def test_a_server_ignoring_range_gets_one_plain_stream(aiohttp_server, monkeypatch):
    monkeypatch.setattr(download, "WHOLE", 64 * 1024)
    monkeypatch.setattr(download, "BLOCK", 32 * 1024)
    body = bytes(range(256)) * 1024  # 256 KB
    seen: list[str | None] = []

    async def whole(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Range"))
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/f", whole)
    server = await aiohttp_server(app)
    async with make_session(4, FAST) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=FAST)
        sink = Hash()
        verified = []
        await fetch_file(
            client,
            str(server.make_url("/f")),
            sink,
            what="f",
            size=len(body),
            link=Link(4),
            verify=lambda: verified.append(sink.h.hexdigest()),
        )
    assert verified == [hashlib.sha256(body).hexdigest()] and sink.n == len(body)
    assert seen[0] is not None and seen[-1] is None  # Range asked, ignored, then one plain GET


def _shards(out: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("**/*.npy"))]


@pytest.mark.slow
def test_segmented_and_faulty_wan_runs_give_the_loopback_shards(sample_dir, tmp_path, monkeypatch):
    """Tiny segments (every file split), a round trip and rate caps, then the same with resets,
    cut bodies, 503s, 429s and corrupted bytes: byte-identical shards to a loopback run."""
    repo = MirrorRepo(DEFAULT_REPO_ID, sample_dir)
    opts = {"data_fraction": 1.0, "tokenizer": "byte", "progress": False, "processes": 1}
    with MirrorThread([repo]) as m:
        bolmo_async.prepare(tmp_path / "ref", endpoint=m.endpoint, **opts)
    want = _shards(tmp_path / "ref")
    assert want
    monkeypatch.setattr(download, "WHOLE", 16 * 1024)
    monkeypatch.setattr(download, "BLOCK", 8 * 1024)
    wan = WanConfig(rtt=0.01, response_rate=4e6, link_rate=16e6)
    with MirrorThread([repo], wan=wan) as m:
        bolmo_async.prepare(tmp_path / "wan", endpoint=m.endpoint, **opts)
        assert sum(1 for r in m.cdn_requests if r["range"]) > 50
        # One resolve per LFS file, whatever its segments and parquet ranges (the Hub's
        # resolver budget); non-LFS files are served by the Hub itself.
        lfs = {p for p, e in repo.files.items() if e.lfs}
        resolves = Counter(p.split("/resolve/")[1].split("/", 1)[1] for _, p in m.hub_requests if "/resolve/" in p)
        assert {p: n for p, n in resolves.items() if p in lfs} == dict.fromkeys(lfs, 1)
        # A prefix of a parquet file: its footer and row groups by Range, from one resolve too.
        m.hub_requests.clear()
        bolmo_async.prepare(tmp_path / "part", endpoint=m.endpoint, **{**opts, "data_fraction": 0.3})
        resolves = Counter(p.split("/resolve/")[1].split("/", 1)[1] for _, p in m.hub_requests if "/resolve/" in p)
        parquet = {p: n for p, n in resolves.items() if p.endswith(".parquet")}
        assert parquet and set(parquet.values()) == {1}
    assert _shards(tmp_path / "wan") == want
    faults = FaultConfig(rate=0.05, seed=3, kinds=("reset", "cut", "http503", "http429", "corrupt"), max_per_path=2)
    with MirrorThread([repo], wan=wan, faults=faults) as m:
        bolmo_async.prepare(tmp_path / "faulty", endpoint=m.endpoint, retries=8, **opts)
    assert faults.injected and _shards(tmp_path / "faulty") == want


@pytest.fixture
def small_repo(tmp_path: Path) -> Path:
    """A repo of 10 small .jsonl.zst files (LFS, as the Hub keeps them), ~40 KB each."""
    import json
    import random

    import zstandard

    d = tmp_path / "small" / "data" / "web"
    d.mkdir(parents=True)
    rng = random.Random(5)
    for k in range(10):
        lines = [json.dumps({"id": f"{k}-{i}", "text": rng.randbytes(600).hex()}) for i in range(60)]
        (d / f"part-{k:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    return tmp_path / "small"


def test_files_are_resolved_ahead_once_each_over_reused_connections(small_repo, tmp_path):
    """The next files are resolved while the current ones transfer (a file handed out goes
    straight to the CDN: its resolve was answered well before its transfer began), exactly once
    each (the Hub's resolver budget), over a few kept-alive connections."""
    rtt = 0.1
    wan = WanConfig(rtt=rtt, response_rate=0.4e6)  # ~40 KB a file: 0.1 s of body after the round trip
    repo = MirrorRepo(DEFAULT_REPO_ID, small_repo)
    lfs = {p for p, e in repo.files.items() if e.lfs}
    assert len(lfs) == 10
    opts = {"data_fraction": 1.0, "tokenizer": "byte", "progress": False, "processes": 1}
    with MirrorThread([repo], wan=wan) as m:
        bolmo_async.prepare(tmp_path / "out", endpoint=m.endpoint, concurrency=2, connections=2, **opts)
        timeline = list(m.timeline)
        # A resumed run resolves only the files it fetches again, not the staged ones.
        out = open_output(tmp_path / "out")
        plan = load_plan(out)
        assert plan is not None
        lost = plan.files[3:6]
        for pf in lost:
            Staging(out).remove(pf)
        m.timeline.clear()
        bolmo_async.prepare(tmp_path / "out", endpoint=m.endpoint, concurrency=2, connections=2, **opts)
        again = Counter(p for _, kind, p, _ in m.timeline if kind == "resolve" and p in lfs)
    assert again == {pf.path: 1 for pf in lost}
    resolves = {p: t for t, kind, p, _ in timeline if kind == "resolve" and p in lfs}
    assert Counter(p for _, kind, p, _ in timeline if kind == "resolve" and p in lfs) == dict.fromkeys(lfs, 1)
    cdn = {p: t for t, kind, p, _ in timeline if kind == "cdn"}
    assert set(cdn) == lfs
    # Two files are in flight; each later one was resolved while the ones before it transferred:
    # at least a round trip and a body before its own transfer (resolving it then would put its
    # resolve one round trip before its transfer, no more).
    ahead = sorted(cdn[p] - resolves[p] for p in lfs)
    assert sum(gap >= 2 * rtt for gap in ahead) >= len(lfs) - 4, ahead
    # Kept-alive connections: far fewer than one per request.
    assert len({port for _, kind, p, port in timeline if kind == "resolve"}) <= 4
    assert len({port for _, kind, p, port in timeline if kind == "cdn"}) <= 4


@pytest.fixture
def blob6(tmp_path: Path) -> Path:
    """A repo of one 12 MB LFS file (random bytes)."""
    return _random_repo(tmp_path / "repo6", 12)


@pytest.mark.slow
@pytest.mark.parametrize("link_rate", [0.0, 4e6])
def test_segments_grow_while_the_rate_grows(blob6, monkeypatch, link_rate):
    """Over a link that caps each connection at 1 MB/s: the segments of a file double while the
    aggregate rate still grows (no total cap: past 16), and stop growing once it does not (a
    4 MB/s link, full at 8 segments: 16 at most, the step that brought nothing)."""
    monkeypatch.setattr(download, "WHOLE", 64 * 1024)
    monkeypatch.setattr(download, "BLOCK", 64 * 1024)
    wan = WanConfig(rtt=0.05, response_rate=1e6, link_rate=link_rate)
    repo = MirrorRepo("a/b", blob6)
    path = "data/x/big.jsonl.zst"
    entry = repo.files[path]

    async def go(endpoint: str) -> tuple[Hash, dict]:
        async with make_session(64, FAST) as session:
            client = HubClient(session, endpoint=endpoint, repo_id="a/b", retry=FAST)
            sink, stats, link = Hash(), {}, Link(64)
            await fetch_file(
                client, client.resolve_url("main", path), sink, what=path, size=entry.size, link=link, stats=stats
            )
            assert link.busy == 0
            return sink, stats

    with MirrorThread([repo], wan=wan) as m:
        sink, stats = asyncio.run(go(m.endpoint))
        resolves = [p for _, p in m.hub_requests if "/resolve/" in p]
    assert sink.h.hexdigest() == entry.sha256 and len(resolves) == 1
    lanes = [n for n, _ in stats["history"]]
    if not link_rate:
        assert stats["lanes_max"] > 16 and lanes[:2] == [8, 16], stats
    else:
        assert stats["lanes_max"] == 16 and lanes == [8, 16], stats
        (_, at8), (_, at16) = stats["history"]
        assert at16 < 1.25 * at8  # the link was full at 8: 16 brought little, growth stopped


def test_mirror_serve_emulates_a_wan_from_the_command_line(blob, tmp_path):
    """`mirror serve --wan-rtt-ms ...` answers after the round trip; the emulation is refused
    off loopback with one line naming the fix."""
    import subprocess
    import sys
    import urllib.request

    ready = tmp_path / "ready"
    cmd = [sys.executable, "-m", "bolmo_async", "mirror", "serve", str(blob), "--repo-id", "a/b"]
    bad = subprocess.run([*cmd, "--host", "0.0.0.0", "--wan-rtt-ms", "50"], capture_output=True, text=True)
    assert bad.returncode == 2 and "loopback" in bad.stderr and "Traceback" not in bad.stderr
    proc = subprocess.Popen(
        [*cmd, "--wan-rtt-ms", "300", "--wan-response-mbs", "1", "--ready-file", str(ready)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = wait_for_endpoint(ready)
        t0 = time.monotonic()
        with urllib.request.urlopen(f"{endpoint}/api/datasets/a/b/revision/main") as r:
            r.read()
        assert time.monotonic() - t0 >= 0.3
    finally:
        proc.terminate()
        out, _ = finish(proc, 10)
    assert proc.returncode == 0 and "round trip 300 ms" in out


def _text_repo(root: Path, files: int, docs: int, seed: int = 7) -> Path:
    """A repo of ``files`` .jsonl.zst files of real-looking text (words, code lines, escapes),
    ``docs`` documents each (~1.2 MB of text a file), one document of ~700 KB in each (larger
    than the shards of the tests below: cut across shards)."""
    import json
    import random

    import zstandard

    rng = random.Random(seed)
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "def",
        "return",
        "self",
        "if",
        "else",
    ]
    d = root / "data" / "web"
    d.mkdir(parents=True)
    for f in range(files):
        lines = []
        for i in range(docs):
            n = 240_000 if i == docs // 2 else rng.randint(50, 4000)
            text = " ".join(rng.choice(words) for _ in range(n // 4))
            if i % 7 == 0:
                text += '\n    print("a\\tb", x["k"])\n'
            lines.append(json.dumps({"id": f"{f}-{i}", "text": text}))
        (d / f"part-{f}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines).encode()))
    return root


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith((".npy", ".csv.gz"))}


@pytest.mark.parametrize("files", [1, 3])
def test_a_file_placed_in_the_layout_writes_its_shards_while_it_is_staged(tmp_path, monkeypatch, files):
    """A file handed out when every file before it is laid out writes the shards it fills while
    it is staged (one large file: its shards no longer wait for all of it, then the disk alone):
    no shard is left for a shard task, every shard is one the run keeps, and they are
    byte-identical (shards and csv.gz) to a finalize writing them all from the staging. With
    three files handed out one at a time, a shard opened by one file is carried into the next
    (its earlier pieces read from the staging), and the last file completes the last shard."""
    import bolmo_async.finalizer as finalizer_module
    from bolmo_async.worker import Worker

    repo = MirrorRepo("a/b", _text_repo(tmp_path / "repo", files, docs=700))
    shard_tasks: list[int] = []
    real_shard = Worker._shard

    async def counted(self, k, pieces, executor):  # the real shard writer, counted
        shard_tasks.append(k)
        await real_shard(self, k, pieces, executor)

    monkeypatch.setattr(Worker, "_shard", counted)
    kept: dict = {}
    real_finalize_dir = finalizer_module.finalize_dir  # (the API imports it where it uses it)

    def observe(*args, **kw):
        kept.update(kw.get("written") or {})
        return real_finalize_dir(*args, **kw)

    monkeypatch.setattr(finalizer_module, "finalize_dir", observe)
    bound = 300_000
    out = tmp_path / "out"
    with MirrorThread([repo]) as m:
        # One file at a time: each later file is handed out once the ones before are laid out.
        manifest = bolmo_async.prepare(
            out,
            endpoint=m.endpoint,
            repo_id="a/b",
            data_fraction=1.0,
            tokenizer="byte",
            progress=False,
            processes=1,
            concurrency=1,
            connections=1,
            max_tokens_per_file=bound,
        )
    shards = manifest["shards"]
    assert len(shards) >= 4 * files and shard_tasks == []
    assert sorted(kept) == list(range(len(shards)))
    assert not [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    ahead = _shard_bytes(out)
    again = bolmo_async.finalize(out, max_tokens_per_file=bound)  # every shard from the staging
    assert again["shards"] == shards and _shard_bytes(out) == ahead
    cut = [s for s in shards if np.memmap(s["path"], dtype=np.uint32, mode="r")[-1] != 1]
    assert not cut  # every shard ends with an EOS, the cut document's pieces too


@pytest.mark.slow
def test_shards_written_ahead_survive_restarts_and_worker_processes(tmp_path):
    """Over a WAN link with corrupted bodies (the file fails its sha256 and starts over, so its
    shards ahead are dropped and written again), in a worker process: the same shards as a
    loopback run, and no temporary left behind."""
    repo = MirrorRepo("a/b", _text_repo(tmp_path / "repo", 1, docs=1500, seed=3))
    opts = {"repo_id": "a/b", "data_fraction": 1.0, "tokenizer": "byte", "progress": False}
    bound = 250_000
    with MirrorThread([repo]) as m:
        bolmo_async.prepare(tmp_path / "ref", endpoint=m.endpoint, max_tokens_per_file=bound, processes=1, **opts)
    want = _shard_bytes(tmp_path / "ref")
    assert len(want) >= 16
    wan = WanConfig(rtt=0.02, response_rate=2e6, link_rate=8e6)
    faults = FaultConfig(rate=1.0, seed=5, kinds=("corrupt", "cut"), max_per_path=2)
    with MirrorThread([repo], wan=wan, faults=faults) as m:
        bolmo_async.prepare(
            tmp_path / "wan", endpoint=m.endpoint, max_tokens_per_file=bound, processes=2, retries=8, **opts
        )
    assert sum(faults.injected.values()) == 2
    assert _shard_bytes(tmp_path / "wan") == want
    assert not [p.name for p in (tmp_path / "wan").rglob("*") if p.name.endswith(".tmp")]


def test_shards_ahead_keep_only_complete_shards_and_leave_nothing_when_stopped(tmp_path):
    """``ShardsAhead`` on its own, with a real output folder: the shards a file closes are put in
    place with exactly the pieces ``LayoutBuilder`` gives, byte-identical to ``write_shard``
    from the staged file; the shard open at the file's end is dropped (it is not the plan's
    last file); stopped halfway (abort, from another thread), it leaves no temporary."""
    import random
    import threading

    import pyarrow as pa

    from bolmo_async.filetask import ShardsAhead
    from bolmo_async.finalizer import LayoutBuilder, write_shard
    from bolmo_async.messages import LayoutAt
    from bolmo_async.models import PlannedFile, SkipCounter
    from bolmo_async.outdir import staged_name
    from bolmo_async.staging import Staging, staging_schema
    from bolmo_async.tokenize import ByteTokenizer

    rng = random.Random(1)
    tok = ByteTokenizer()
    batches = []
    for b in range(6):
        texts = pa.array(["x" * rng.randint(1, 90) + "\\é" for _ in range(40)], pa.large_string())
        ids = pa.array([f"{b}-{i}" for i in range(40)])
        locs = pa.array(range(b * 40 + 1, b * 40 + 41), pa.int64())
        batches.append(pa.RecordBatch.from_arrays([ids, locs, tok.tokens_column(texts)], schema=staging_schema("byte")))
    lengths = [np.diff(np.frombuffer(b.column(2).buffers()[1], np.int64, len(b) + 1)) for b in batches]
    out = open_output(tmp_path / "o")
    out.create()
    # The same batches staged, for write_shard to read back.
    pf = PlannedFile(path="data/a.jsonl", source="data", size=1, oid="0" * 40, sha256=None)
    writer = Staging(out).writer(pf, "f", "byte")
    for b in batches:
        writer.write(b.column(0), b.column(1), b.column(2))
    writer.commit({}, SkipCounter())
    bound = 1500
    want = LayoutBuilder(bound)
    for i, lens in enumerate(lengths):
        want.add(0, i, lens)
    layout = want.shards()
    ahead = ShardsAhead(out, 0, LayoutAt(bound, 0, 0, [], last=False), {0: staged_name(pf.key)}, {0: "s"}, 1)
    for i, (b, lens) in enumerate(zip(batches, lengths, strict=True)):
        ahead.put(i, b, lens)
    ahead.finish()
    written = ahead.commit()
    assert sorted(written) == list(range(len(layout) - 1))  # every shard but the open one
    for k, (pieces, rec) in written.items():
        assert pieces == layout[k]
        data = Path(rec["path"]).read_bytes()
        again = write_shard(out, k, pieces, {0: staged_name(pf.key)}, {0: "s"}, 1, threading.Event())
        assert Path(again["path"]).read_bytes() == data and again == rec
    assert not (tmp_path / "o" / f"part-{len(layout) - 1:05d}.npy").exists()
    assert not [p.name for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp")]
    for p in (tmp_path / "o").iterdir():
        if p.name.startswith("part-"):
            p.unlink()
    stopped = ShardsAhead(out, 0, LayoutAt(bound, 0, 0, [], last=True), {}, {0: "s"}, 1)
    for i, (b, lens) in enumerate(zip(batches[:4], lengths[:4], strict=True)):
        stopped.put(i, b, lens)
    threading.Thread(target=stopped.abort).start()
    assert stopped._thread is not None
    stopped._thread.join(10)
    stopped.finish()
    assert stopped.commit() == {}
    assert not [p.name for p in (tmp_path / "o").iterdir() if p.name.endswith(".tmp") or p.name.startswith("part-")]


def _fetch_in_lanes(endpoint: str, policy: RetryPolicy, path: str, size: int, sink: Hash) -> dict:
    """``fetch_file`` of ``path`` into ``sink`` with up to 16 segments (``Link(16)``); its stats."""

    async def go() -> dict:
        async with make_session(16, policy) as session:
            client = HubClient(session, endpoint=endpoint, repo_id="a/b", retry=policy)
            stats: dict = {}
            await fetch_file(
                client, client.resolve_url("main", path), sink, what=path, size=size, link=Link(16), stats=stats
            )
            return stats

    return asyncio.run(go())


def test_the_segments_of_a_file_whose_signed_url_expires_share_one_resolve(blob, monkeypatch):
    """The CDN refusing the signed URL mid-file (expired: 403) made each segment in flight resolve
    the file again on its own: with 16 segments, 16 resolves of one file against the Hub's resolver
    budget (3,000 per 5 minutes). The segments share one: the file's first resolve, then one more."""
    import secrets

    monkeypatch.setattr(download, "WHOLE", 256 * 1024)
    monkeypatch.setattr(download, "BLOCK", 512 * 1024)
    monkeypatch.setattr(download, "SEGMENT_BLOCK", 96 * 1024)
    wan = WanConfig(rtt=0.04, response_rate=0.5e6, link_rate=4e6)
    repo = MirrorRepo("a/b", blob)
    path = "data/x/big.jsonl.zst"
    entry = repo.files[path]

    with MirrorThread([repo], wan=wan) as m:

        class Expiring(Hash):
            def feed(self, data: bytes) -> None:
                if self.n < 1 << 20 <= self.n + len(data):
                    m._secret = secrets.token_bytes(16)  # every URL signed so far is refused from now on
                super().feed(data)

        sink = Expiring()
        stats = _fetch_in_lanes(m.endpoint, FAST, path, entry.size, sink)
        resolves = [p for _, p in m.hub_requests if "/resolve/" in p]
    assert sink.h.hexdigest() == entry.sha256 and sink.n == entry.size
    assert stats["lanes_max"] >= 8, stats
    assert len(resolves) == 2, len(resolves)


def test_segments_told_to_wait_at_once_count_one_wait_against_the_files_rate_limit_bound(blob, monkeypatch):
    """A rate-limit window (every request answered 429, t=0.3, for 0.3 s) met by a file's segments
    in flight: each is told to wait, and they wait together. The file's bound on rate-limit waits
    (``max_rate_wait``, 1 s here) summed their waits: 8 segments x 0.3 s, past the bound at the
    first window, and the file failed after 0.3 s on the clock (at the defaults, a file of 16
    segments failed at the first 429 of t >= 38 s). Counted on the clock, it waits and completes."""
    import dataclasses
    import time

    from bolmo_async.mirror import FaultConfig

    class Window(FaultConfig):
        opened: float | None = None

        def draw(self, path: str, *, cdn: bool, body: bool = True) -> str | None:
            if cdn and self.opened is not None and time.monotonic() < self.opened + 0.3:
                self.injected["http429"] = self.injected.get("http429", 0) + 1
                return "http429"
            return None

    monkeypatch.setattr(download, "WHOLE", 256 * 1024)
    monkeypatch.setattr(download, "BLOCK", 512 * 1024)
    monkeypatch.setattr(download, "SEGMENT_BLOCK", 96 * 1024)
    repo = MirrorRepo("a/b", blob)
    path = "data/x/big.jsonl.zst"
    entry = repo.files[path]
    faults = Window(retry_after=0.3)
    policy = dataclasses.replace(FAST, max_rate_wait=1.0)

    with MirrorThread([repo], wan=WanConfig(rtt=0.04, response_rate=0.5e6, link_rate=4e6), faults=faults) as m:

        class Limited(Hash):
            def feed(self, data: bytes) -> None:
                if faults.opened is None and self.n >= 1 << 20:
                    faults.opened = time.monotonic()  # the window opens with segments in flight
                super().feed(data)

        sink = Limited()
        stats = _fetch_in_lanes(m.endpoint, policy, path, entry.size, sink)
    assert sink.h.hexdigest() == entry.sha256 and stats["lanes_max"] >= 8, stats
    assert faults.injected.get("http429", 0) >= 4, faults.injected  # (summed: 1.2 s or more, past 1 s)

"""Over an emulated wide-area link (the mirror's round trip and rate caps): Range segments in
parallel from one resolve, read-ahead, the Range-less fallback, and the same shards as on
loopback, with faults too."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

import bolmo_async
from bolmo_async import download
from bolmo_async.download import Link, fetch_file
from bolmo_async.hub import HubClient, make_session
from bolmo_async.mirror import FaultConfig, MirrorRepo, MirrorThread, WanConfig
from bolmo_async.models import DEFAULT_REPO_ID
from bolmo_async.retry import RetryPolicy

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


@pytest.fixture
def blob(tmp_path: Path) -> Path:
    """A repo of one 3 MB LFS file (random bytes: no two segments alike)."""
    d = tmp_path / "repo" / "data" / "x"
    d.mkdir(parents=True)
    (d / "big.jsonl.zst").write_bytes(
        b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(3 << 15))
    )
    return tmp_path / "repo"


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
    assert len(ranges) == 24 and all(r and r.startswith("bytes=") for r in ranges)
    assert took < 1.8  # one connection alone needs 3 s


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

"""The one retry helper (``bolmo_async.retry``): the policy as data, the Hub's rate-limit
hints, the attempt budget, the sync twin, and the module layering it sits in."""

from __future__ import annotations

import ast
import asyncio
import logging
import time
from pathlib import Path

import pytest
from aiohttp import web

import bolmo_async
from bolmo_async.download import BytesSink, fetch_file, stream
from bolmo_async.errors import DownloadError, HubError
from bolmo_async.hub import HubClient, make_session
from bolmo_async.mirror import FaultConfig, MirrorRepo, MirrorThread
from bolmo_async.models import DEFAULT_REPO_ID
from bolmo_async.retry import Retry, RetryPolicy, retry_hint, retrying_sync

FAST = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=5.0, read_timeout=5)


def test_ratelimit_t_alone_is_a_hint():
    assert retry_hint({"RateLimit": '"api";r=0;t=7'}) == 7.0
    assert retry_hint({"Retry-After": "2", "RateLimit": '"api";r=0;t=7'}) == 2.0
    assert retry_hint({"RateLimit": '"api";r=12'}) is None


def test_a_429_with_only_ratelimit_is_honoured_by_a_download(sample_dir, caplog):
    """The mirror answers the resolve with 429 and only ``RateLimit: "resolvers";r=0;t=1``
    (no Retry-After): the download waits the second it was told, not the 10 ms backoff."""
    faults = FaultConfig(rate=1.0, kinds=("http429",), max_per_path=1, retry_after=1.0, retry_after_header=False)
    repo = MirrorRepo(DEFAULT_REPO_ID, sample_dir)
    path = next(p for p in sorted(repo.files) if repo.files[p].lfs)

    async def go(endpoint: str) -> tuple[bytes, float]:
        async with make_session(2, FAST) as session:
            client = HubClient(session, endpoint=endpoint, repo_id=DEFAULT_REPO_ID, retry=FAST)
            sink = BytesSink()
            t0 = time.monotonic()
            await stream(client, client.resolve_url("main", path), sink, what=path, size=repo.files[path].size)
            return bytes(sink.buf), time.monotonic() - t0

    with caplog.at_level(logging.WARNING, "bolmo_async"), MirrorThread([repo], faults=faults) as m:
        body, took = asyncio.run(go(m.endpoint))
        assert faults.injected == {"http429": 1}
    assert body == Path(repo.files[path].abspath).read_bytes()
    assert took >= 1.0
    assert any("HTTP 429 [retry 1/3 in 1." in r.getMessage() for r in caplog.records)


async def test_a_429_with_only_ratelimit_is_honoured_by_an_api_call(aiohttp_server, caplog):
    calls: list[float] = []

    async def revision(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) == 1:
            return web.Response(status=429, text="slow down", headers={"RateLimit": '"api";r=0;t=1'})
        return web.json_response({"sha": "a" * 40})

    app = web.Application()
    app.router.add_get("/api/datasets/a/b/revision/{rev}", revision)
    server = await aiohttp_server(app)
    async with make_session(2, FAST) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=FAST)
        with caplog.at_level(logging.WARNING, "bolmo_async"):
            assert await client.resolve_commit("main") == "a" * 40
    assert len(calls) == 2 and calls[1] - calls[0] >= 1.0
    assert any("[retry 1/3 in 1." in r.getMessage() for r in caplog.records)


async def test_a_rate_limit_is_waited_out_whole_and_an_absurd_wait_fails_at_once(aiohttp_server):
    """The Hub's ``t`` is the seconds until its 5-minute window resets; hints were cut to
    ``max_delay`` (30 s), so each retry met the same limit and a file failed after 8 of them
    (measured: t=250 on every resolve, 3 files of 12 'gave up after 8 attempts; last error: HTTP
    429' at 220 s; huggingface_hub waits t + 1). Here a window of 1 s against a 20 ms
    ``max_delay``. A hint no Hub gives (1e9 s) fails the request at once, saying so."""
    window: dict[str, float] = {}

    async def limited(request: web.Request) -> web.Response:
        started = window.setdefault("t0", time.monotonic())
        if time.monotonic() - started < 1.0:
            return web.Response(status=429, headers={"RateLimit": '"resolvers";r=0;t=1'})
        return web.Response(body=b"abc")

    async def absurd(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "1000000000"})

    app = web.Application()
    app.router.add_get("/f", limited)
    app.router.add_get("/g", absurd)
    server = await aiohttp_server(app)
    tight = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02, read_timeout=5)
    async with make_session(2, tight) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=tight)
        sink = BytesSink()
        await asyncio.wait_for(stream(client, str(server.make_url("/f")), sink, what="f", size=3), 30)
        assert bytes(sink.buf) == b"abc"
        t0 = time.monotonic()
        with pytest.raises(
            DownloadError, match=r"g: gave up after 1 attempt; .*asks to wait forever .*try again later"
        ):
            await asyncio.wait_for(stream(client, str(server.make_url("/g")), BytesSink(), what="g", size=3), 30)
        assert time.monotonic() - t0 < 1


async def test_an_api_call_gives_up_after_its_budget(aiohttp_server):
    calls = []

    async def revision(request: web.Request) -> web.Response:
        calls.append(1)
        return web.Response(status=503, text="down")

    app = web.Application()
    app.router.add_get("/api/datasets/a/b/revision/{rev}", revision)
    server = await aiohttp_server(app)
    async with make_session(2, FAST) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=FAST)
        with pytest.raises(HubError, match=r"HTTP 503 after 3 attempts"):
            await client.resolve_commit("main")
    assert len(calls) == 3
    once = RetryPolicy(max_attempts=1, base_delay=0.01, max_delay=0.02, read_timeout=5)
    async with make_session(2, once) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=once)
        with pytest.raises(HubError, match=r"HTTP 503 after 1 attempt;"):
            await client.resolve_commit("main")


def test_the_sync_twin_has_the_same_policy(caplog):
    """Blocking callers (an object-store backend in a thread): Retry and transient errors are
    retried with the policy's hints and budget; other errors pass at once."""
    slept: list[float] = []
    tries = []

    def flaky() -> str:
        tries.append(1)
        if len(tries) == 1:
            raise Retry("HTTP 503 SlowDown", {"Retry-After": "2"})
        if len(tries) == 2:
            raise ConnectionResetError("reset")
        return "ok"

    with caplog.at_level(logging.WARNING, "bolmo_async"):
        assert retrying_sync(FAST, "put x", flaky, sleep=slept.append) == "ok"
    assert len(tries) == 3 and 2.0 <= slept[0] <= 2.1 and slept[1] < 0.02
    assert "put x: HTTP 503 SlowDown [retry 1/3 in 2." in caplog.records[0].getMessage()

    def always() -> None:
        raise Retry("HTTP 500")

    with pytest.raises(bolmo_async.errors.BolmoError, match="put y: gave up after 3 attempts; last error: HTTP 500"):
        retrying_sync(FAST, "put y", always, sleep=slept.append)
    # one attempt is one (it read "gave up after 1 attempts")
    once = RetryPolicy(max_attempts=1, base_delay=0.01, max_delay=0.02, read_timeout=5)
    with pytest.raises(bolmo_async.errors.BolmoError, match="put z: gave up after 1 attempt; last error: HTTP 500"):
        retrying_sync(once, "put z", always, sleep=slept.append)
    with pytest.raises(KeyError):
        retrying_sync(FAST, "put z", lambda: {}["k"], sleep=slept.append)


def _imports(path: Path) -> set[str]:
    """Every ``bolmo_async`` module ``path`` imports, at the top or inside a function."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out


def test_the_network_layers_import_only_downwards():
    """retry <- hub <- download <- filetask: no module imports one above it, even in a function."""
    pkg = Path(bolmo_async.__file__).parent
    order = ["errors", "models", "retry", "hub", "download", "filetask"]
    for i, name in enumerate(order):
        above = set(order[i + 1 :])
        assert not (_imports(pkg / f"{name}.py") & above), name


# -- hostile bodies: every API answer capped, every body held to a minimum rate ------------


async def _endless(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    await resp.write(b"[")
    for _ in range(100_000):  # 6.5 GB if nobody stops reading
        await resp.write(b'{"type": "file", "path": "x"},' * 2048)
    return resp


@pytest.mark.parametrize("endpoint", ["revision", "tree"])
async def test_an_endless_api_body_is_stopped_at_the_cap(aiohttp_server, endpoint):
    app = web.Application()
    app.router.add_get(f"/api/datasets/a/b/{endpoint}/{{rev}}", _endless)
    server = await aiohttp_server(app)
    t0 = time.monotonic()
    async with make_session(2, FAST) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=FAST)
        with pytest.raises(HubError, match=f"/api/datasets/a/b/{endpoint}/.* is longer than 64 MiB") as info:
            if endpoint == "revision":
                await asyncio.wait_for(client.resolve_commit("main"), 30)
            else:
                await asyncio.wait_for(client.list_files("0" * 40), 30)
    assert time.monotonic() - t0 < 10 and "\n" not in str(info.value)


def _trickle(total: int, every: float, step: int = 1) -> web.Application:
    """A body of ``total`` bytes sent ``step`` bytes every ``every`` seconds."""

    async def body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(total)})
        await resp.prepare(request)
        for _ in range(0, total, step):
            await resp.write(b"x" * step)
            await asyncio.sleep(every)
        return resp

    app = web.Application()
    app.router.add_get("/f", body)
    app.router.add_get("/api/datasets/a/b/revision/{rev}", body)
    return app


SLOW = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, read_timeout=5, min_rate=1000, progress_window=1.0)


async def test_a_body_trickling_one_byte_a_second_fails_within_its_bound(aiohttp_server):
    """Each read returns within --read-timeout, yet the body would take 12 hours: each attempt
    fails after one progress window, the file after the attempt budget, with a clear message."""
    server = await aiohttp_server(_trickle(46_000, 1.0))
    t0 = time.monotonic()
    async with make_session(2, SLOW) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=SLOW)
        with pytest.raises(DownloadError, match=r"f: gave up after 2 attempts; .*less than 1000 bytes in 1s"):
            await asyncio.wait_for(stream(client, str(server.make_url("/f")), BytesSink(), what="f", size=46_000), 30)
        with pytest.raises(HubError, match=r"less than 1000 bytes in 1s.* after 2 attempts"):
            await asyncio.wait_for(client.resolve_commit("main"), 30)
    assert time.monotonic() - t0 < 2 * (SLOW.worst_case() + 1)


async def test_a_file_body_dripping_faster_than_the_read_timeout_fails_within_its_bound(aiohttp_server):
    """A file's download (``fetch_file``: every run's path) hands each chunk to its block as it
    comes; that hand-over restarted the progress deadline, so a byte every 0.1 s (every read well
    within --read-timeout) was never cut: 46 KB would have held the file 77 minutes, a 768 KiB
    segment at a byte a second 9 days. The deadline counts the bytes, as for any other body."""
    server = await aiohttp_server(_trickle(46_000, 0.1))
    t0 = time.monotonic()
    async with make_session(2, SLOW) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=SLOW)
        with pytest.raises(DownloadError, match=r"f: gave up after 2 attempts; .*less than 1000 bytes in 1s"):
            await asyncio.wait_for(
                fetch_file(client, str(server.make_url("/f")), BytesSink(), what="f", size=46_000), 30
            )
    assert time.monotonic() - t0 < SLOW.worst_case() + 1


async def test_a_slow_but_honest_body_completes(aiohttp_server):
    """4 KB/s sustained, over several windows, against a minimum of 1000 bytes a second."""
    server = await aiohttp_server(_trickle(12_000, 0.25, 1000))
    async with make_session(2, SLOW) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=SLOW)
        sink = BytesSink()
        await asyncio.wait_for(stream(client, str(server.make_url("/f")), sink, what="f", size=12_000), 30)
    assert bytes(sink.buf) == b"x" * 12_000


async def _rate_limited(aiohttp_server, t: float, asked: list[str]):  # type: ignore[no-untyped-def]
    """A server answering every ``GET /f`` 429 with ``RateLimit: ...;t=<t>``; ``asked`` gets each path."""

    async def limited(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.Response(status=429, headers={"RateLimit": f'"resolvers";r=0;t={t:g}'})

    app = web.Application()
    app.router.add_get("/f", limited)
    return await aiohttp_server(app)


async def test_a_rate_limit_that_never_lifts_fails_the_file_within_its_bound_saying_so(aiohttp_server):
    """A server answering 429 with RateLimit t=300 forever held each request up to 7 x 300 s
    (35 minutes) before the file failed: each wait is honoured whole, but one file waits at most
    ``max_rate_wait`` in all (600 s at the defaults), then fails saying so."""
    asked: list[str] = []
    server = await _rate_limited(aiohttp_server, 0.3, asked)
    policy = RetryPolicy(max_attempts=8, base_delay=0.01, max_delay=0.02, read_timeout=5, max_rate_wait=1.0)
    async with make_session(2, policy) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=policy)
        for fetch in (stream, fetch_file):
            asked.clear()
            t0 = time.monotonic()
            with pytest.raises(DownloadError) as info:
                await asyncio.wait_for(fetch(client, str(server.make_url("/f")), BytesSink(), what="f", size=10), 30)
            assert time.monotonic() - t0 < 1.5 and 2 <= len(asked) <= 5, (len(asked), time.monotonic() - t0)
            said = str(info.value)
            assert "HTTP 429, and the server asks to wait 0.3 s more after" in said, said
            assert "past the 1 s one file waits in all for a rate limit; try again later" in said
    assert RetryPolicy().max_rate_wait == 600


async def test_two_waits_of_the_longest_hint_fit_the_files_rate_limit_bound(aiohttp_server):
    """``max_rate_wait`` is two of ``max_hint``: a server asking ``t=max_hint`` forever is waited
    out twice, then the file fails. The bound counted our jitter too (each wait ``t`` + up to
    0.1 s), so the second wait of ``t=300`` was past 600 s: the file failed after one wait,
    saying it had waited 300 s of 600."""
    asked: list[str] = []
    server = await _rate_limited(aiohttp_server, 0.4, asked)
    policy = RetryPolicy(max_attempts=8, base_delay=0.01, read_timeout=5, max_hint=0.4, max_rate_wait=0.8)
    async with make_session(2, policy) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=policy)
        with pytest.raises(DownloadError, match="after 1 s of waiting: past the 1 s one file waits"):
            await asyncio.wait_for(stream(client, str(server.make_url("/f")), BytesSink(), what="f", size=10), 30)
    assert len(asked) == 3, asked  # two waits of t=0.4, then the third 429 fails it


@pytest.mark.parametrize(("t", "outage"), [(0.1, True), (0.04, False)])
async def test_retries_spent_on_a_rate_limit_that_outlasts_a_window_are_an_outage_cause(aiohttp_server, t, outage):
    """A server answering 429 with t=60 forever: each wait fits (7 x 60 s < 600 s), so each file
    spent its --retries on it (7 minutes), failed as a file's own trouble, and the next file did
    the same: a large plan never stopped (hours, file after file). A file that still meets the
    limit when its retries are spent after waiting one of the Hub's windows (``max_hint``) in all
    carries the rate-limit outage cause (3 files in a row stop the hand-out); shorter waits do not
    (a burst of 429s that lifts stops nothing)."""
    from bolmo_async.retry import RATE_LIMITED, host_of

    server = await _rate_limited(aiohttp_server, t, [])
    policy = RetryPolicy(max_attempts=4, base_delay=0.01, read_timeout=5, max_hint=0.25)
    async with make_session(2, policy) as session:
        client = HubClient(session, endpoint=str(server.make_url("")).rstrip("/"), repo_id="a/b", retry=policy)
        with pytest.raises(DownloadError, match="gave up after 4 attempts; last error: HTTP 429") as info:
            await asyncio.wait_for(stream(client, str(server.make_url("/f")), BytesSink(), what="f", size=10), 30)
    assert info.value.outage == ((host_of(str(server.make_url(""))), RATE_LIMITED) if outage else None)

"""A Hub (or CDN) that is down ends the run with one line (``outage.OutageWatch``), and only then:
a Hub that recovers, one broken file among good ones, and a rate limit never stop a run.

Measured before the rule (an 18-file plan, every resolve answered 503, --concurrency 2
--connections 2, default --retries): every file failed one wave after the other, 2 at a time
(~30 s each), 277 resolves and 244 retry lines for the default 16 connections; a 5,000-file plan
retried for hours. Real in-process mirror, its fault layer, the real CLI."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import bolmo_async
from bolmo_async.errors import FetchIncomplete
from bolmo_async.mirror import FaultConfig, MirrorThread
from bolmo_async.outage import STREAK, OutageWatch
from bolmo_async.outdir import marker_name
from bolmo_async.retry import host_of

from .helpers import run_cli

FRACTION = 0.5
#: One file in flight at a time: the files fail one after the other, as a large plan's do.
NARROW = {"concurrency": 1, "connections": 1, "processes": 1}


def _prepare(out: Path, endpoint: str, **kw):
    kw.setdefault("progress", False)
    return bolmo_async.prepare(out, endpoint=endpoint, data_fraction=FRACTION, **kw)


def _resolves(m) -> int:
    return sum(1 for _, p in m.hub_requests if "/resolve/" in p)


def test_the_rule_counts_files_in_a_row_for_one_host_and_cause():
    now = [0.0]
    w = OutageWatch(streak=3, clock=lambda: now[0])
    hub = ("hub:1", "HTTP 503")
    assert not w.failed(hub) and not w.failed(hub)
    assert not w.failed(("cdn:2", "HTTP 503"))  # another host: a new run of failures
    assert not w.failed(None)  # a file's own trouble (a bad hash, a 429) breaks the run
    assert not w.failed(hub) and not w.failed(hub)
    w.staged()  # a file fetched: the server answers
    assert not w.failed(hub) and not w.failed(hub)
    now[0] = 42.0
    assert w.failed(hub) and w.down == hub
    line = w.says(7)
    assert line.startswith("every request to hub:1 failed (HTTP 503) for 42 s: 3 file(s) in a row")
    assert "7 file(s) not started" in line and "rerun the same command to resume" in line
    w.staged()  # a file in flight staged after the stop: the stop is lifted
    assert w.down is None


def test_what_counts_as_a_server_down():
    import asyncio

    import aiohttp

    from bolmo_async.errors import Retry
    from bolmo_async.retry import outage_cause

    assert outage_cause(Retry("HTTP 503", status=503)) == "HTTP 503"
    assert outage_cause(Retry("HTTP 408", status=408)) == "HTTP 408"
    assert outage_cause(Retry("HTTP 429", status=429)) is None  # a rate limit, honoured
    assert outage_cause(Retry("body cut short at byte 5 of 9")) is None  # the file's own trouble
    assert outage_cause(ConnectionRefusedError()) == "connection refused"
    assert outage_cause(aiohttp.ServerDisconnectedError()) == "connection reset"
    assert outage_cause(asyncio.TimeoutError()) == "no answer (timeout)"
    assert outage_cause(ValueError("x")) is None


def test_a_hub_down_ends_the_run_with_one_line_and_the_failed_exit(repos, tmp_path):
    """Every resolve answered 503: the run stops after STREAK files, the others not started (not
    listed), one line naming the host, the status, how long, and that a rerun resumes; the exit
    code is the failed files' (1); the retry lines are a few, not one per attempt per file."""
    faults = FaultConfig(rate=0.0, kinds=("http503",), max_per_path=10**9)
    out = tmp_path / "o"
    with MirrorThread(repos, faults=faults) as m:
        planned = len(bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION).files)
        assert planned >= STREAK + 4
        faults.rate = 1.0
        t0 = time.monotonic()
        r = run_cli(
            "prepare",
            "--output-dir",
            str(out),
            "--endpoint",
            m.endpoint,
            "--data-fraction",
            str(FRACTION),
            "--retries",
            "3",
            "--concurrency",
            "1",
            "--connections",
            "1",
            "--processes",
            "1",
            "--no-progress",
        )
        took = time.monotonic() - t0
        resolves = _resolves(m)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    host = host_of(m.endpoint)
    said = [line for line in r.stderr.splitlines() if "every request to" in line]
    assert len(said) == 1, r.stderr
    assert f"every request to {host} failed (HTTP 503) for " in said[0]
    assert f"{STREAK} file(s) in a row" in said[0] and f"{planned - STREAK} file(s) not started" in said[0]
    assert "rerun the same command to resume" in said[0]
    assert "not started" not in r.stderr.replace(said[0], "")  # the files never tried are not listed
    retry_lines = [line for line in r.stderr.splitlines() if "[retry " in line]
    assert len(retry_lines) <= 6, retry_lines  # (each file: 2 retries; the resolves ahead as many)
    # Each tried file: one resolve ahead (the transfer retries, not both: 21 resolves here when the
    # resolve ahead spent a budget of its own) and its own within --retries; one ahead for the next.
    assert resolves <= (1 + 3) * (STREAK + 1), resolves
    assert took < 60, took


def test_files_in_flight_tell_an_outage_without_a_second_wave(repos, tmp_path):
    """STREAK files in flight at once, the Hub down: once one gave up, no new file is handed out
    while the others are in flight (each would spend a whole retry budget more); the run stops
    after exactly the first wave."""
    faults = FaultConfig(rate=1.0, kinds=("http503",), max_per_path=10**9)
    with MirrorThread(repos, faults=faults) as m, pytest.raises(FetchIncomplete) as info:
        _prepare(tmp_path / "o", m.endpoint, retries=3, concurrency=STREAK, connections=STREAK, processes=1)
    tried = [p for p, why in info.value.failed.items() if not why.startswith("not started")]
    assert len(tried) == STREAK, tried
    assert f"{STREAK} file(s) in a row" in str(info.value)


@pytest.mark.parametrize("kept", ["staged", "raw"])
def test_files_done_without_a_request_do_not_hide_an_outage(repos, tmp_path, kept):
    """A rerun against a Hub that is down: the files an earlier run staged (``staged``), or whose
    whole download raw/ keeps with their staging gone (``raw``, --no-streaming), are done without a
    request, between the ones that fail; they say nothing of the server and must not reset the count."""
    faults = FaultConfig(rate=0.0, kinds=("http503",), max_per_path=10**9)
    out = tmp_path / "o"
    streaming = kept == "staged"
    with MirrorThread(repos, faults=faults) as m:
        plan = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        faults.rate, faults.only = 1.0, tuple(f.path for f in plan.files[1::2])
        with pytest.raises(FetchIncomplete) as first:
            _prepare(out, m.endpoint, retries=2, streaming=streaming, **NARROW)
        assert "every request to" not in str(first.value)  # (failed, staged, failed: no stop)
        if kept == "raw":
            for pf in plan.files[0::2]:  # kept whole in raw/, no longer staged: read from raw/ again
                (out / marker_name(pf.key)).unlink()
        faults.only = ()
        with pytest.raises(FetchIncomplete) as again:
            _prepare(out, m.endpoint, retries=2, streaming=streaming, **NARROW)
    assert str(again.value).startswith("every request to") and f"{STREAK} file(s) in a row" in str(again.value)


def test_a_cdn_down_is_named(repos, tmp_path):
    """The Hub resolves, the CDN it sends every file to answers 503: the line names the CDN."""
    faults = FaultConfig(rate=1.0, kinds=("cdn_fail",), max_per_path=10**9)
    with MirrorThread(repos, faults=faults) as m:
        with pytest.raises(FetchIncomplete) as info:
            _prepare(tmp_path / "o", m.endpoint, retries=2, **NARROW)
        cdn = host_of(m.cdn_endpoint)
    said = str(info.value)
    assert said.startswith(f"every request to {cdn} failed (HTTP 503)") and "\n" not in said
    assert info.value.exit_code == 1
    assert sum(why.startswith("not started") for why in info.value.failed.values()) >= 1


def test_a_hub_that_recovers_completes_the_run(repos, tmp_path):
    """Every resolve fails for the first 1.5 s, then the Hub answers: within a file's retry
    budget, so nothing stops and every file is staged."""
    faults = FaultConfig(rate=1.0, kinds=("http503",), max_per_path=10**9)
    with MirrorThread(repos, faults=faults) as m:
        back = threading.Timer(1.5, lambda: setattr(faults, "rate", 0.0))
        back.start()
        try:
            manifest = _prepare(tmp_path / "o", m.endpoint, retries=6, **NARROW)
        finally:
            back.cancel()
    assert manifest["complete"]
    assert faults.injected.get("http503", 0) >= 3


def test_a_hub_down_for_fewer_files_than_the_streak_does_not_stop_the_run(repos, tmp_path):
    """The first STREAK - 1 files handed out meet a Hub answering 503 until they give up, then it
    answers: they fail (a rerun fetches them), every other file is staged, nothing "not started"."""
    faults = FaultConfig(rate=0.0, kinds=("http503",), max_per_path=10**9)
    out = tmp_path / "o"
    with MirrorThread(repos, faults=faults) as m:
        plan = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        first = tuple(f.path for f in plan.files[: STREAK - 1])
        faults.rate, faults.only = 1.0, first
        with pytest.raises(FetchIncomplete) as info:
            _prepare(out, m.endpoint, retries=2, **NARROW)
    assert set(info.value.failed) == set(first)
    assert f"{STREAK - 1} file(s) failed" in str(info.value) and "every request to" not in str(info.value)
    assert len(list((out / "staging").glob("*.json"))) == len(plan.files) - len(first)


def _one_file_broken(repos, out: Path, **kw):
    """A prepare where one planned file (a verified one) answers 503 to every resolve: that file
    and the FetchIncomplete raised."""
    faults = FaultConfig(rate=0.0, kinds=("http503",), max_per_path=10**9)
    with MirrorThread(repos, faults=faults) as m:
        plan = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        victim = next(f.path for f in plan.files if f.sha256)
        faults.rate, faults.only = 1.0, (victim,)
        with pytest.raises(FetchIncomplete) as info:
            _prepare(out, m.endpoint, retries=2, **kw)
    return victim, info


def test_one_broken_file_fails_alone(repos, tmp_path):
    """One file whose every resolve is a 503, alone in flight (nothing staged meanwhile): that
    file fails, the others are staged; no stop."""
    victim, info = _one_file_broken(repos, tmp_path / "o", **NARROW)
    assert set(info.value.failed) == {victim}
    assert "1 file(s) failed" in str(info.value) and "every request to" not in str(info.value)


def test_one_broken_file_among_files_in_flight_fails_alone(repos, tmp_path):
    """The hold after a file gave up lasts until another is staged: then the run goes on."""
    victim, info = _one_file_broken(repos, tmp_path / "o", concurrency=2, connections=4, processes=2)
    assert set(info.value.failed) == {victim} and "every request to" not in str(info.value)


def test_a_rate_limit_is_not_an_outage(repos, tmp_path):
    """429 on every resolve, each with a short Retry-After: honoured as before; files that spend
    their budget on it fail one by one, listed, and none is "not started"."""
    faults = FaultConfig(rate=1.0, kinds=("http429",), max_per_path=10**9, retry_after=0.05)
    with MirrorThread(repos, faults=faults) as m, pytest.raises(FetchIncomplete) as info:
        _prepare(tmp_path / "o", m.endpoint, retries=2, **NARROW)
    assert "every request to" not in str(info.value)
    assert info.value.failed and not any(w.startswith("not started") for w in info.value.failed.values())
    assert all("HTTP 429" in w for w in info.value.failed.values())


def test_a_rate_limit_that_does_not_lift_stops_the_hand_out(repos, tmp_path):
    """429 on every resolve asking to wait longer than a file waits (RateLimit t=1000, past
    ``RetryPolicy.max_hint``): each file gives up at once saying so, and STREAK of them in a row
    stop the run as an outage does (one line naming the host and the cause, the rest not
    started), instead of each file of a large plan meeting the same limit in turn (up to 600 s
    each when the waits fit the bound one by one)."""
    from bolmo_async.retry import RATE_LIMITED

    faults = FaultConfig(rate=0.0, kinds=("http429",), max_per_path=10**9, retry_after=1000)
    out = tmp_path / "o"
    with MirrorThread(repos, faults=faults) as m:
        planned = len(bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION).files)
        faults.rate = 1.0
        t0 = time.monotonic()
        with pytest.raises(FetchIncomplete) as info:
            _prepare(out, m.endpoint, retries=3, **NARROW)
        took = time.monotonic() - t0
    said = str(info.value)
    assert f"every request to {host_of(m.endpoint)} failed ({RATE_LIMITED}) for " in said, said
    assert (
        "gave up waiting and none was fetched" in said and f"once the rate limit of {host_of(m.endpoint)} lifts" in said
    )
    assert f"{planned - STREAK} file(s) not started" in said, said
    tried = [w for w in info.value.failed.values() if not w.startswith("not started")]
    assert len(tried) == STREAK and all("asks to wait 1000 s" in w for w in tried), tried
    assert took < 30, took


@pytest.fixture(scope="module")
def large_repos(tmp_path_factory: pytest.TempPathFactory, repos):
    """The sample at 16 MB: files large enough that one is still transferring, bytes flowing,
    when a file beside it gives up."""
    from bolmo_async.mirror import MirrorRepo, build_sample
    from bolmo_async.models import DEFAULT_REPO_ID

    d = tmp_path_factory.mktemp("sample16")
    build_sample(d, size_mb=16.0, seed=0)
    return [MirrorRepo(DEFAULT_REPO_ID, d), *repos[1:]]


def test_one_broken_file_does_not_idle_its_slot_while_others_transfer(large_repos, tmp_path):
    """Two files in flight, one answering 503 to every resolve: once it gives up, the next file is
    handed out as soon as the other shows bytes arriving, not when it is staged. Measured on the
    mirror's timeline (100 kB/s per response): the next hand-out came 2.1 s into the run, once the
    206 kB file beside it was staged; now at 0.8 s, once its first bytes arrived."""
    from bolmo_async.mirror import WanConfig

    rate = 100_000
    faults = FaultConfig(rate=0.0, kinds=("http503",), max_per_path=10**9)
    out = tmp_path / "o"
    with MirrorThread(large_repos, faults=faults, wan=WanConfig(response_rate=rate)) as m:
        include = ["data/arxiv/*", "data/character_understanding/*", "data/stack_edu/*"]
        plan = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION, include=include)
        size = {f.path: f.size for f in plan.files}
        victim = plan.files[0].path
        faults.rate, faults.only = 1.0, (victim,)
        t0 = time.monotonic()
        with pytest.raises(FetchIncomplete) as info:
            _prepare(out, m.endpoint, include=include, retries=2, concurrency=2, connections=2, processes=1)
        timeline = [(t - t0, kind, p) for t, kind, p, _ in m.timeline if t >= t0]
    assert set(info.value.failed) == {victim}
    gave_up = max(t for t, kind, p in timeline if kind == "resolve" and p == victim)
    started = {}
    for t, kind, p in timeline:
        if kind == "cdn":
            started.setdefault(p, t)
    beside = [p for p, t in started.items() if t < gave_up]
    assert len(beside) == 1, (beside, timeline)
    (neighbour,) = beside
    nxt = min(t for p, t in started.items() if t > gave_up)
    # Staged no sooner than its bytes arrived: the old hand-out came after this.
    done_at_best = started[neighbour] + size[neighbour] / rate
    assert nxt < started[neighbour] + 0.6 * (done_at_best - started[neighbour]), (nxt, done_at_best, timeline)

"""The fraction plan: per-source share, determinism, monotonicity, hostile listings."""

from __future__ import annotations

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from bolmo_async.errors import UnsafePathError, UsageError
from bolmo_async.hub import HubClient, make_session
from bolmo_async.models import RepoFile, check_repo_path, validate_fraction
from bolmo_async.planner import default_source_depth, make_plan, source_of
from bolmo_async.retry import RetryPolicy

files_st = st.lists(st.tuples(st.sampled_from(["a", "b/c", "d"]), st.integers(1, 10_000)), min_size=1, max_size=40).map(
    lambda xs: [RepoFile(f"{src}/f{i:03d}.jsonl.zst", size, f"oid{i}") for i, (src, size) in enumerate(xs)]
)


def _plan(files, fraction, seed=42):
    return make_plan(
        files, data_fraction=fraction, seed=seed, repo_id="a/b", revision="main", commit="0" * 40, listing_digest="x"
    )


@settings(max_examples=200, deadline=None)
@given(files_st, st.floats(0.001, 1.0), st.floats(0.001, 1.0), st.integers(0, 2**32))
def test_plan_is_monotone_and_deterministic(files, f1, f2, seed):
    small, big = sorted((f1, f2))
    a, b = _plan(files, small, seed), _plan(files, big, seed)
    assert a == _plan(files, small, seed)
    whole_small = {f.path for f in a.files if f.whole}
    whole_big = {f.path for f in b.files if f.whole}
    assert whole_small <= whole_big
    # A prefix in the small plan is whole or a no-shorter prefix in the big plan.
    big_by_path = {f.path: f for f in b.files}
    for f in a.files:
        if not f.whole:
            g = big_by_path[f.path]
            assert g.whole or g.limit >= f.limit


@settings(max_examples=200, deadline=None)
@given(files_st, st.floats(0.0001, 1.0))
def test_each_source_gets_its_share(files, fraction):
    p = _plan(files, fraction)
    depth = default_source_depth(files)
    by_source = {}
    for f in files:
        by_source.setdefault(source_of(f.path, depth), []).append(f)
    for s in p.sources:
        total = sum(f.size for f in by_source[s.source])
        target = total * fraction
        assert s.bytes_total == total
        planned = sum(f.planned_bytes for f in p.files if f.source == s.source)
        assert planned == s.bytes_planned
        # Every source keeps at least something, and never more than its target + 1 byte of rounding
        # (the prefix reader takes whole documents up to that byte count, at least one).
        assert s.files_planned >= 1
        assert planned <= max(target + 1, 1)
        assert planned >= min(total, target - 1) or planned == 1


def test_fraction_one_takes_every_file_whole():
    files = [RepoFile(f"s/{i}.jsonl.zst", 100 + i, "o") for i in range(10)]
    p = _plan(files, 1.0)
    assert len(p.files) == 10 and all(f.whole for f in p.files)


def test_seed_changes_the_order():
    files = [RepoFile(f"s/{i}.jsonl.zst", 100, "o") for i in range(50)]
    assert [f.path for f in _plan(files, 0.3, 1).files] != [f.path for f in _plan(files, 0.3, 2).files]


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, 2, float("nan")])
def test_fraction_outside_range_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="--data-fraction"):
        validate_fraction(bad)


@pytest.mark.parametrize(
    "path", ["../x.jsonl", "a/../../x", "/etc/passwd", "a\\b.jsonl", "a/\x00b", "a//b", "./a", "C:/x", "a/b\n"]
)
def test_hostile_paths_refused(path):
    with pytest.raises(UnsafePathError, match="unsafe path"):
        check_repo_path(path)


def test_ordinary_paths_accepted():
    for p in ("data/cc/part-0001.jsonl.zst", "a b/ü.json.gz", "x.parquet"):
        assert check_repo_path(p) == p


async def _list_from(aiohttp_server, tree_handler) -> None:
    """List repo a/b through a real aiohttp server whose tree endpoint is ``tree_handler``."""
    app = web.Application()
    app.router.add_get("/api/datasets/a/b/tree/{rev}", tree_handler)
    server = await aiohttp_server(app)
    retry = RetryPolicy(max_attempts=1)
    async with make_session(2, retry) as session:
        client = HubClient(session, endpoint=str(server.make_url("")), repo_id="a/b", retry=retry)
        await client.list_files("0" * 40)


async def test_hostile_listing_from_server_is_refused(aiohttp_server):
    async def tree(request):
        return web.json_response(
            [{"type": "file", "path": "data/../../../etc/cron.d/x.jsonl.zst", "size": 5, "oid": "0"}]
        )

    with pytest.raises(UnsafePathError):
        await _list_from(aiohttp_server, tree)


async def test_an_odd_entry_of_a_file_that_is_not_data_is_ignored_not_fatal(aiohttp_server):
    """A backslash in a file's name is legal in git: one in a file the tool never reads (a note,
    an image) refused the whole listing, with advice to check --endpoint. Only data files are
    held to the safe-path rule now, and the data of the repo is listed."""
    ok = {"type": "file", "path": "data/a/x.jsonl", "size": 5, "oid": "0" * 40}
    odd = [
        {"type": "file", "path": "notes\\windows.md", "size": 5, "oid": "1" * 40},
        {"type": "file", "path": "c:readme.txt", "size": 5, "oid": "2" * 40},
        {"type": "file", "path": "img/../a.png", "size": 5},
    ]

    async def tree(request):
        return web.json_response([*odd, ok])

    app = web.Application()
    app.router.add_get("/api/datasets/a/b/tree/{rev}", tree)
    server = await aiohttp_server(app)
    retry = RetryPolicy(max_attempts=1)
    async with make_session(2, retry) as session:
        client = HubClient(session, endpoint=str(server.make_url("")), repo_id="a/b", retry=retry)
        assert [f.path for f in await client.list_files("0" * 40)] == ["data/a/x.jsonl"]

    async def bad_data(request):  # a data file's path is still held to the rule
        return web.json_response([ok, {**ok, "path": "data\\b.jsonl"}])

    with pytest.raises(UnsafePathError, match="backslash"):
        await _list_from(aiohttp_server, bad_data)


async def test_listing_next_page_to_another_host_is_refused(aiohttp_server):
    async def tree(request):
        return web.json_response([], headers={"Link": '<http://example.invalid/x>; rel="next"'})

    with pytest.raises(Exception, match="another host"):
        await _list_from(aiohttp_server, tree)

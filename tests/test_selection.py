"""Choosing what to take: include/exclude globs, source grouping, per-source fractions, field names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bolmo_async
from bolmo_async.errors import StateError, UsageError
from bolmo_async.mirror import MirrorRepo, MirrorThread
from bolmo_async.models import DEFAULT_REPO_ID, RepoFile, Selection
from bolmo_async.planner import default_source_depth, make_plan

from .helpers import run_cli, shard_documents


def _plan(files, fraction=0.5, seed=1, **sel):
    return make_plan(
        files,
        data_fraction=fraction,
        seed=seed,
        repo_id="a/b",
        revision="main",
        commit="0" * 40,
        listing_digest="x",
        selection=Selection(**sel),
    )


NESTED = [
    RepoFile(f"data/{src}/{sub}/part-{i}.jsonl.zst", 1000 + i, f"{i:040x}")
    for src in ("cc", "code", "math")
    for sub in ("a", "b", "c")
    for i in range(4)
]


def test_sources_group_at_the_top_level_folders_holding_data():
    assert default_source_depth(NESTED) == 2
    assert {s.source for s in _plan(NESTED).sources} == {"data/cc", "data/code", "data/math"}
    assert len(_plan(NESTED, source_depth=3).sources) == 9
    flat = [RepoFile(f"f{i}.jsonl", 10, f"{i:040x}") for i in range(3)]
    assert [s.source for s in _plan(flat).sources] == ["."]


def test_include_exclude_and_per_source_fractions():
    p = _plan(NESTED, fraction=1.0, include=("data/code/*", "data/math/*"), exclude=("*/c/*",))
    assert {f.path.split("/")[1] for f in p.files} == {"code", "math"}
    assert not any("/c/" in f.path for f in p.files)
    assert dict(p.matched) == {"include data/code/*": 12, "include data/math/*": 12, "exclude */c/*": 8}
    q = _plan(NESTED, fraction=0.001, source_fractions=(("data/math", 1.0), ("data/code/a", 0.5)))
    by = {s.source: s for s in q.sources}
    assert by["data/math"].target_bytes == by["data/math"].bytes_total
    assert by["data/cc"].files_planned == 1
    with pytest.raises(UsageError, match=r"no such source.*data/cc, data/code, data/math"):
        _plan(NESTED, source_fractions=(("data/nope", 0.5),))
    with pytest.raises(UsageError, match="leave no data files"):
        _plan(NESTED, include=("nothing/*",))


@settings(max_examples=100, deadline=None)
@given(st.floats(0.001, 1.0), st.floats(0.001, 1.0), st.integers(0, 1000))
def test_growing_one_sources_fraction_keeps_everything_planned_for_it(f1, f2, seed):
    small, big = sorted((f1, f2))
    a = _plan(NESTED, 0.2, seed, source_fractions=(("data/code", small),))
    b = _plan(NESTED, 0.2, seed, source_fractions=(("data/code", big),))
    assert {f.path for f in a.files if "/code/" not in f.path} == {f.path for f in b.files if "/code/" not in f.path}
    whole_a = {f.path for f in a.files if "/code/" in f.path and f.whole}
    assert whole_a <= {f.path for f in b.files if "/code/" in f.path}
    assert a == _plan(NESTED, 0.2, seed, source_fractions=(("data/code", small),))  # deterministic


def _write(folder: Path, rel: str, table: pa.Table) -> None:
    (folder / rel).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / rel, row_group_size=50)


@pytest.fixture
def fineweb_like(tmp_path) -> Path:
    """A repo laid out like another pretraining set: parquet, text in `content`, no id."""
    d = tmp_path / "fw"
    for name in ("CC-MAIN-2024-10", "CC-MAIN-2024-18"):
        for part in range(2):
            texts = [f"{name} part {part} document {i} " + "words " * (i % 17 + 3) for i in range(200)]
            _write(d, f"data/{name}/train-{part:05d}.parquet", pa.table({"content": texts, "url": ["u"] * len(texts)}))
    return d


def test_a_fineweb_style_parquet_repo_with_other_field_names(fineweb_like, tmp_path):
    out = tmp_path / "o"
    with MirrorThread([MirrorRepo(DEFAULT_REPO_ID, fineweb_like)]) as m:
        with pytest.raises(StateError, match="no documents"):  # `text` is not there: every row counted, none kept
            bolmo_async.prepare(tmp_path / "wrong", endpoint=m.endpoint, data_fraction=1.0, progress=False)
        manifest = bolmo_async.prepare(
            out,
            endpoint=m.endpoint,
            data_fraction=1.0,
            progress=False,
            selection=Selection(text_field="content", include=("data/CC-MAIN-2024-10/*",)),
        )
        plan = json.loads((out / "plan.json").read_text())
        assert plan["selection"]["text_field"] == "content"
        with pytest.raises(StateError, match="another selection"):
            bolmo_async.prepare(out, endpoint=m.endpoint, data_fraction=1.0, progress=False)
    docs = shard_documents(manifest)
    assert len(docs) == 400 and manifest["totals"]["documents"] == 400
    assert all(d[0].startswith("data/CC-MAIN-2024-10/train-") and ":" in d[0] for d in docs)  # ids are path:row
    first = docs[0][3]
    assert first[-1] == 1 and bytes((first[:-1] - 4).astype(np.uint8)).decode().startswith("CC-MAIN-2024-10")


def test_cli_code_only_slice_and_math_heavy_mix(tmp_path, mirror):
    r = run_cli(
        "plan", "-o", str(tmp_path / "code"), "--endpoint", mirror.endpoint, "--data-fraction", "1",
        "--include", "data/stack_edu/*",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (
        "data/stack_edu" in r.stdout and "data/common_crawl" not in r.stdout and "include data/stack_edu/*" in r.stdout
    )
    r = run_cli("plan", "-o", str(tmp_path / "half"), "--endpoint", mirror.endpoint, "--data-fraction", "0.5")
    assert r.returncode == 0 and "fraction 0.5" in r.stdout, r.stderr
    assert "fractions:" not in r.stdout  # one fraction for all: said once, in the header
    r = run_cli(
        "plan", "-o", str(tmp_path / "math"), "--endpoint", mirror.endpoint, "--data-fraction", "0.05",
        "--source-fraction", "data/finemath=1", "--source-fraction", "data/common_crawl=0.01",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "fractions:" in r.stdout and "data/finemath 1" in r.stdout
    r = run_cli(
        "plan", "-o", str(tmp_path / "bad"), "--endpoint", mirror.endpoint, "--source-fraction", "data/nope=0.5"
    )
    assert r.returncode == 2 and "no such source" in r.stderr and "data/finemath" in r.stderr


def test_a_source_given_two_fractions_is_refused():
    """Which of the two won depended on their sorted order, not the command line's."""
    with pytest.raises(UsageError, match=r"--source-fraction data/arxiv is given twice \(0.5 and 0.7\)"):
        Selection(source_fractions=(("data/arxiv", 0.5), ("data/arxiv/", 0.7)))
    assert Selection(source_fractions=(("data/arxiv", 0.5), ("data/arxiv", 0.5))).source_fractions  # the same: fine

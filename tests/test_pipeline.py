"""End to end against the in-process mirror: plan -> fetch -> finalize, byte and subword."""

from __future__ import annotations

import gzip
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bolmo_async
from bolmo_async.errors import StateError
from bolmo_async.inspector import read_index
from bolmo_async.tokenize import SubwordTokenizer, decode_bytes, load_tokenizer_source

from .conftest import DOLMA2, needs_dolma2
from .helpers import read_documents, shard_documents, shard_hashes


def _prepare(out: Path, mirror, **kw):
    kw.setdefault("progress", False)
    return bolmo_async.prepare(out, endpoint=mirror.endpoint, **kw)


def test_byte_prepare_round_trips_every_document(tmp_path, mirror, sample_dir):
    m = _prepare(tmp_path / "o", mirror, data_fraction=1.0, max_tokens_per_file=300_000)
    docs = shard_documents(m)
    expected = {}
    for p in sorted((sample_dir / "data").rglob("*")):
        if p.is_file():
            rel = p.relative_to(sample_dir).as_posix()
            for loc, doc_id, text in read_documents(p):
                expected[(rel, loc)] = (doc_id, text)
    got = {}
    for doc_id, src, loc, ids in docs:
        rel = src.split("@", 1)[1].split("/", 1)[1]
        got.setdefault((rel, loc), [doc_id, []])[1].append(ids)
    assert set(got) == set(expected)
    for key, (doc_id, pieces) in got.items():
        ids = np.concatenate(pieces)
        assert ids[-1] == 1 and doc_id == expected[key][0]
        assert decode_bytes(ids[:-1]) == expected[key][1]
    # Format facts: raw uint32 little-endian, no .npy header, bounded shards, abs paths listed.
    for s in m["shards"]:
        raw = Path(s["path"]).read_bytes()
        assert not raw.startswith(b"\x93NUMPY")
        assert len(raw) == 4 * s["tokens"] <= 4 * 300_000
        assert np.frombuffer(raw, "<u4").max() <= 259
    listed = (tmp_path / "o" / "data_sources.txt").read_text().splitlines()
    assert listed == [s["path"] for s in m["shards"]] and all(
        Path(p).is_absolute() and Path(p).exists() for p in listed
    )
    assert [Path(p).name for p in listed] == [f"bolmo_data_{i:05d}.npy" for i in range(len(listed))]
    assert m["complete"] and m["totals"]["skipped_documents"] == {"empty_text": 1}
    assert m["revision"] == mirror.repos[("dataset", "allenai/bolmo_mix")].commit
    for key in ("repo_id", "data_fraction", "seed", "tokenizer", "shards", "totals"):
        assert key in m
    assert set(m["tokenizer"]) >= {"kind", "identifier", "eos_token_id", "fingerprint"}


def test_split_document_gets_a_row_in_each_shard(tmp_path, mirror):
    m = _prepare(tmp_path / "o", mirror, data_fraction=1.0, max_tokens_per_file=100_000)
    rows = [(s, r) for s in m["shards"] for r in read_index(s["csv"])]
    by_doc: dict = {}
    for s, (start, end, _doc_id, src, loc) in rows:
        by_doc.setdefault((src, loc), []).append((s["path"], start, end))
    split = [v for v in by_doc.values() if len(v) > 1]
    assert split, "the several-MB document must be split at this bound"
    for pieces in split:
        assert len({p for p, _, _ in pieces}) == len(pieces)
    for s in m["shards"]:
        idx = read_index(s["csv"])
        assert idx[0][0] == 0 and idx[-1][1] == s["tokens"] <= 100_000
        assert all(a[1] == b[0] for a, b in itertools.pairwise(idx))  # contiguous, end exclusive
    # Only oversized documents are split.
    for pieces in split:
        assert sum(e - s for _, s, e in pieces) > 100_000


def test_csv_gz_has_no_header_and_five_columns(tmp_path, mirror):
    m = _prepare(tmp_path / "o", mirror, data_fraction=0.2)
    with gzip.open(m["shards"][0]["csv"], "rt") as f:
        first = f.readline().strip().split(",")
    assert first[0] == "0" and len(first) == 5 and first[4].isdigit()


def test_concurrency_and_streaming_give_identical_shards(tmp_path, mirror):
    a = _prepare(tmp_path / "a", mirror, data_fraction=0.3, concurrency=1, max_tokens_per_file=200_000)
    b = _prepare(tmp_path / "b", mirror, data_fraction=0.3, concurrency=8, max_tokens_per_file=200_000)
    c = _prepare(tmp_path / "c", mirror, data_fraction=0.3, concurrency=8, streaming=False, max_tokens_per_file=200_000)
    assert shard_hashes(a) == shard_hashes(b) == shard_hashes(c)
    assert (tmp_path / "c" / "raw").is_dir() and not (tmp_path / "a" / "raw").exists()
    # --no-streaming reuses verified raw files: a rerun from scratch staging downloads nothing.
    import shutil

    shutil.rmtree(tmp_path / "c" / "staging")
    before = len(mirror.cdn_requests)
    d = _prepare(tmp_path / "c", mirror, data_fraction=0.3, streaming=False, max_tokens_per_file=200_000)
    assert shard_hashes(d) == shard_hashes(a)
    assert len(mirror.cdn_requests) == before


def test_decoding_slots_go_to_the_earliest_file_in_plan_order():
    """A worker's files decode in plan order (shards, made in that order, can then be written
    while later files decode), whatever order their downloads ask in; a slot waits for an earlier
    file that has not asked yet (briefly), and goes on past a file whose task ends without
    decoding or is cancelled while it waits."""
    import asyncio

    from bolmo_async.util import PlanOrderSlots

    async def run() -> tuple[list[int], list[int]]:
        slots = PlanOrderSlots(1)
        turns = {u: slots.turn(u) for u in range(8)}
        order: list[int] = []

        async def decode(u: int, ask_after: float) -> None:
            await asyncio.sleep(ask_after)
            await turns[u].acquire()
            order.append(u)
            await asyncio.sleep(0.01)
            turns[u].release()
            turns[u].retire()

        # Asks come in a scrambled order; 0 asks last of all; 3 never asks (staged before: its
        # task just ends); 5 is cancelled while it waits.
        delays = {0: 0.05, 1: 0.0, 2: 0.01, 4: 0.02, 5: 0.0, 6: 0.03, 7: 0.0}
        tasks = {u: asyncio.create_task(decode(u, d)) for u, d in delays.items()}
        await asyncio.sleep(0.04)
        assert order == []  # 0, the earliest, has not asked: the slot waits for it
        tasks[5].cancel()
        turns[5].retire()
        turns[3].retire()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        # An earlier file that does not ask (its download is slow) holds a free slot only briefly.
        late = PlanOrderSlots(1)
        head, nxt = late.turn(20), late.turn(21)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(nxt.acquire(), 5)
        waited = asyncio.get_running_loop().time() - started
        assert PlanOrderSlots.HOLD * 0.9 <= waited < PlanOrderSlots.HOLD + 1.0
        head.retire()
        # Two at once: the two earliest that asked, then each freed slot to the next in order.
        two = PlanOrderSlots(2)
        held: list[int] = []
        t2 = {u: two.turn(u) for u in (10, 11, 12)}

        async def hold(u: int) -> None:
            await t2[u].acquire()
            held.append(u)

        waiting = [asyncio.create_task(hold(u)) for u in (12, 11, 10)]
        await asyncio.sleep(0.01)
        for t in waiting:
            t.cancel()
        return order, held

    order, held = asyncio.run(run())
    assert order == [0, 1, 2, 4, 6, 7]
    assert held == [10, 11]


@pytest.mark.parametrize("tokenizer", ["byte", pytest.param("subword", marks=needs_dolma2)])
def test_any_number_of_worker_processes_gives_identical_shards(tmp_path, mirror, tokenizer):
    """One worker in this process, or 2 or 3 worker processes each doing whole files (and
    writing shards while others fetch): byte-identical shards and csv.gz."""
    runs = [
        _prepare(
            tmp_path / f"p{n}", mirror, data_fraction=0.5, max_tokens_per_file=50_000, tokenizer=tokenizer, processes=n
        )
        for n in (1, 2, 3)
    ]
    assert len(runs[0]["shards"]) > 3
    assert shard_hashes(runs[0]) == shard_hashes(runs[1]) == shard_hashes(runs[2])
    csvs = [[gzip.decompress(Path(s["csv"]).read_bytes()) for s in r["shards"]] for r in runs]
    assert csvs[0] == csvs[1] == csvs[2]


def test_partial_plan_is_a_prefix_of_each_partial_file(tmp_path, mirror, sample_dir):
    _prepare(tmp_path / "o", mirror, data_fraction=0.05)
    plan = json.loads((tmp_path / "o" / "plan.json").read_text())
    partial = [f for f in plan["files"] if f["limit"] is not None]
    assert partial
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    docs = shard_documents(m)
    for f in partial:
        locs = sorted(loc for _, src, loc, _ in docs if src.endswith("/" + f["path"]))
        assert locs and locs == list(range(locs[0], locs[0] + len(locs)))  # contiguous from the start
        if not f["path"].endswith(".parquet"):
            assert locs[0] in (1, 2)


def test_growing_the_fraction_reuses_staged_files(tmp_path, mirror):
    out = tmp_path / "o"
    _prepare(out, mirror, data_fraction=0.1)
    staged = {p.name: p.stat().st_mtime_ns for p in (out / "staging").glob("*.arrow")}
    m = _prepare(out, mirror, data_fraction=0.5)
    plan = json.loads((out / "plan.json").read_text())
    again = {p.name: p.stat().st_mtime_ns for p in (out / "staging").glob("*.arrow")}
    reused = [n for n in staged if n in again and again[n] == staged[n]]
    assert reused and plan["data_fraction"] == 0.5 and m["complete"]
    fresh = _prepare(tmp_path / "fresh", mirror, data_fraction=0.5)
    assert shard_hashes(m) == shard_hashes(fresh)


def test_output_dir_with_other_seed_or_tokenizer_is_refused(tmp_path, mirror):
    out = tmp_path / "o"
    _prepare(out, mirror, data_fraction=0.1)
    with pytest.raises(StateError, match="force=True"):
        _prepare(out, mirror, data_fraction=0.1, seed=7)
    m = _prepare(out, mirror, data_fraction=0.1, seed=7, force=True)
    assert m["seed"] == 7


def test_a_small_run_gives_every_worker_process_files(tmp_path, mirror, caplog):
    """Files go one at a time to the least busy worker. Filling each worker's slots in turn (sized
    for a wide-area link's read-ahead: 8 per worker here) gave a small run's every file to the
    first worker while the second idled."""
    caplog.set_level(logging.DEBUG, logger="bolmo_async")
    m = _prepare(tmp_path / "o", mirror, data_fraction=1.0, processes=2, include=["data/common_crawl/*"])
    staged = [r.getMessage().split() for r in caplog.records if r.getMessage().startswith("worker ")]
    by_worker = {int(words[1]) for words in staged if words[2] == "staged"}
    assert m["complete"] and by_worker == {0, 1}


def test_worker_processes_asked_for_start_before_the_listing(tmp_path, mirror, monkeypatch):
    """``processes=N``: the workers are started before the repo is listed (they import meanwhile,
    or the fork server does), so they are there when the plan is made; a run that stops before
    handing them anything (a tokenizer that does not load) stops them too. (Spawned here: a fork
    server's workers appear only once its imports are done, on a thread of their own.)"""
    import multiprocessing

    from bolmo_async.errors import TokenizerError
    from bolmo_async.executors.local import START_METHOD_ENV

    monkeypatch.setenv(START_METHOD_ENV, "spawn")

    def workers() -> list[str]:
        return sorted(p.name for p in multiprocessing.active_children() if p.name.startswith("bolmo-worker"))

    seen: list[list[str]] = []
    m = _prepare(tmp_path / "o", mirror, data_fraction=0.1, processes=2, on_plan=lambda p: seen.append(workers()))
    assert m["complete"] and seen == [["bolmo-worker-0", "bolmo-worker-1"]]
    assert workers() == []
    bad = tmp_path / "empty-vocabulary.json"
    bad.write_text('{"model": {"type": "BPE", "vocab": {}, "merges": []}}')
    with pytest.raises(TokenizerError, match="vocabulary is empty"):
        _prepare(tmp_path / "o2", mirror, processes=2, tokenizer="subword", tokenizer_identifier=str(bad))
    assert workers() == []


@needs_dolma2
def test_subword_shards_equal_an_independent_encoding(tmp_path, mirror, sample_dir):
    m = _prepare(tmp_path / "o", mirror, data_fraction=0.3, tokenizer="subword", engine="fastokens", processes=2)
    assert m["tokenizer"]["eos_token_id"] == 100257 and m["tokenizer"]["identifier"] == "allenai/dolma2-tokenizer"
    assert m["tokenizer"]["engine"] == "fastokens"
    ref = SubwordTokenizer(load_tokenizer_source(str(DOLMA2)), engine="tokenizers")
    texts = {}
    for p in (sample_dir / "data").rglob("*"):
        if p.is_file():
            for loc, _, text in read_documents(p):
                texts[(p.relative_to(sample_dir).as_posix(), loc)] = text
    docs = shard_documents(m)
    assert len(docs) > 100
    for _, src, loc, ids in docs:
        rel = src.split("@", 1)[1].split("/", 1)[1]
        assert ids.tolist() == [*ref.encode_reference(texts[(rel, loc)]), 100257]
    # The subword run via a tokenizer.json path (no Hub) gives the same shards.
    m2 = _prepare(tmp_path / "p", mirror, data_fraction=0.3, tokenizer="subword", tokenizer_identifier=str(DOLMA2))
    assert shard_hashes(m2) == shard_hashes(m)
    rep = bolmo_async.inspect(tmp_path / "o", decode=3)
    assert not rep["problems"] and len(rep["documents"]) == 3 and rep["documents"][0]["text"]


def test_inspect_detects_tampering(tmp_path, mirror):
    out = tmp_path / "o"
    m = _prepare(out, mirror, data_fraction=0.1)
    assert bolmo_async.inspect(out, decode=2)["problems"] == []
    p = Path(m["shards"][0]["path"])
    data = bytearray(p.read_bytes())
    data[0] ^= 1
    p.write_bytes(bytes(data))
    assert any("xxh3_128" in x for x in bolmo_async.inspect(out)["problems"])


def test_an_earlier_plan_of_another_source_fraction_names_that_fraction(tmp_path, mirror):
    """Re-planned at another --source-fraction (the same --data-fraction), inspect said the shards
    were of an earlier plan '(--data-fraction 0.5) than plan.json (now 0.5)': it names what differs."""
    out = tmp_path / "o"
    _prepare(out, mirror, data_fraction=0.5, source_fractions={"data/arxiv": 0.5})
    bolmo_async.plan(out, data_fraction=0.5, source_fractions={"data/arxiv": 0.25}, endpoint=mirror.endpoint)
    problems = bolmo_async.inspect(out)["problems"]
    assert len(problems) == 1 and "--data-fraction" not in problems[0], problems
    said = problems[0]
    assert "earlier plan (--source-fraction data/arxiv=0.5) than " in said and "(now data/arxiv=0.25)" in said, said


def test_inspect_says_the_shards_are_of_an_earlier_plan(tmp_path, mirror):
    """Another fraction re-plans a finalized folder (`plan`, or `fetch --data-fraction`): until
    finalize, its shards and data_sources.txt are still the old plan's, and inspect said
    "complete: True", exit 0, for a fraction plan.json no longer holds. It says which plan the
    shards are of and what to run; once finalized again, all is well."""
    out = tmp_path / "o"
    _prepare(out, mirror, data_fraction=0.05)
    assert bolmo_async.inspect(out)["problems"] == []
    bolmo_async.plan(out, data_fraction=0.2, endpoint=mirror.endpoint)
    problems = bolmo_async.inspect(out)["problems"]
    assert len(problems) == 1, problems
    assert "of an earlier plan (--data-fraction 0.05)" in problems[0] and "now 0.2" in problems[0], problems
    assert "finalize --output-dir" in problems[0], problems
    bolmo_async.fetch(out, endpoint=mirror.endpoint, progress=False)
    bolmo_async.finalize(out)
    assert bolmo_async.inspect(out)["problems"] == []


def test_inspect_reads_a_manifest_with_sha256_checksums(tmp_path, mirror):
    """Folders finalized by earlier versions recorded sha256: inspect still verifies them."""
    import hashlib

    out = tmp_path / "o"
    m = _prepare(out, mirror, data_fraction=0.1)
    for s in m["shards"]:
        s["sha256"] = hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest()
        del s["xxh3_128"]
    (out / "manifest.json").write_text(json.dumps(m))
    assert bolmo_async.inspect(out)["problems"] == []
    p = Path(m["shards"][0]["path"])
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    assert any("sha256" in x for x in bolmo_async.inspect(out)["problems"])


def test_step_by_step_api_equals_prepare(tmp_path, mirror):
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.2)
    bolmo_async.fetch(out, endpoint=mirror.endpoint, progress=False)
    m = bolmo_async.finalize(out, max_tokens_per_file=50_000)
    ref = _prepare(tmp_path / "ref", mirror, data_fraction=0.2, max_tokens_per_file=50_000)
    assert shard_hashes(m) == shard_hashes(ref)
    # Finalizing again with a larger bound rewrites the shards and drops the extra ones.
    m2 = bolmo_async.finalize(out, max_tokens_per_file=10_000_000)
    assert len(m2["shards"]) == 1 and not (out / "bolmo_data_00001.npy").exists()
    assert (out / "data_sources.txt").read_text().count("\n") == 1


def test_byte_mode_stages_utf8_bytes_and_older_staging_is_refetched(tmp_path, mirror):
    """Byte staging holds the text bytes and a 0 where each EOS goes (a quarter of the ids'
    size); a staged unit written in another staging format is redone, never misread, and the
    shards come out the same."""
    import pyarrow as pa

    out = tmp_path / "o"
    m = _prepare(out, mirror, data_fraction=0.3)
    arrows = sorted((out / "staging").glob("*.arrow"))
    staged_bytes = 0
    for a in arrows:
        with pa.memory_map(str(a)) as src:
            table = pa.ipc.open_file(src).read_all()
        assert table.schema.field("tokens").type == pa.large_binary()
        values = table.column("tokens").to_pylist()
        assert all(v.endswith(b"\0") and b"\0" not in v[:-1] for v in values)  # the EOS's place
        staged_bytes += sum(len(x) for x in values)
    assert staged_bytes == m["totals"]["tokens"]  # one id per byte, and the EOS
    marker = arrows[0].with_suffix(".json")
    rec = json.loads(marker.read_text())
    marker.write_text(json.dumps({**rec, "format": 1}))
    before = arrows[0].stat().st_mtime_ns
    again = _prepare(out, mirror, data_fraction=0.3)
    assert arrows[0].stat().st_mtime_ns != before  # refetched
    assert shard_hashes(again) == shard_hashes(m)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.sampled_from('ab,"\r\n é東'), max_size=6), min_size=1, max_size=8), st.text(max_size=5))
def test_csv_rows_are_what_csv_writer_writes(ids, src):
    """Byte for byte what ``csv.writer`` writes with minimal quoting once CR and LF are written
    as ``\\r`` / ``\\n``, each row ended by LF and on one line, whatever the ids."""
    import csv
    import io

    import pyarrow as pa

    from bolmo_async.finalizer import csv_rows

    starts = np.arange(len(ids), dtype=np.int64) * 7
    want = ""
    for s, i, n in zip(starts.tolist(), ids, range(1, len(ids) + 1), strict=True):
        buf = io.StringIO()
        one_line = [x.replace("\r", "\\r").replace("\n", "\\n") for x in (i, src)]
        csv.writer(buf, lineterminator="\r\n").writerow([s, s + 7, *one_line, n])
        want += buf.getvalue()[:-2] + "\n"
    got = csv_rows(starts, starts + 7, pa.array(ids, pa.string()), src, pa.array(range(1, len(ids) + 1), pa.int64()))
    assert got == want.encode("utf-8")
    assert got.count(b"\n") == len(ids) and b"\r" not in got


def test_csv_rows_quote_hostile_ids_and_read_back():
    """Document ids are data: commas and quotes survive a csv reader; CR and LF come back as
    ``\\r`` / ``\\n`` (a row is one line: OLMo-core reads it so, below)."""
    import csv
    import io

    import pyarrow as pa

    from bolmo_async.finalizer import csv_rows

    ids = ["plain", "a,b", 'say "hi"', "two\nlines", "cr\rhere", "", " lead", "é東"]
    starts = np.arange(len(ids)) * 10
    data = csv_rows(starts, starts + 10, pa.array(ids), "hf://datasets/r@c/d,x/f.jsonl", pa.array(range(1, 9)))
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    one_line = [i.replace("\n", "\\n").replace("\r", "\\r") for i in ids]
    assert one_line[3:5] == ["two\\nlines", "cr\\rhere"]
    assert rows == [
        [str(s), str(s + 10), i, "hf://datasets/r@c/d,x/f.jsonl", str(n)]
        for s, i, n in zip(starts.tolist(), one_line, range(1, 9), strict=True)
    ]
    assert data.startswith(b'0,10,plain,"hf://') and b'\n10,20,"a,b",' in data
    assert csv_rows(np.array([], np.int64), np.array([], np.int64), pa.array([], pa.string()), "s", pa.array([])) == b""


def olmo_core_document_indices(csv_gz: Path) -> list[tuple[int, int]]:
    """OLMo-core 3.0.0's reading of a ``.csv.gz`` (``olmo_core.data.utils.iter_document_indices``,
    its only source of document boundaries for a remote shard): text lines, universal newlines,
    the first two comma-separated fields of each; not a CSV reader."""
    out = []
    with gzip.open(csv_gz, "rt") as f:
        for line in f:
            start, end, *_ = line.split(",")
            out.append((int(start), int(end)))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(st.sampled_from('ab,"\r\n 5é'), max_size=8), min_size=1, max_size=8), st.text(max_size=5))
def test_csv_rows_read_line_by_line_as_olmo_core_does(tmp_path_factory, ids, src):
    """Whatever the ids and source path hold (a line break then ``5,7,`` would be read as a
    document [5, 7); a quote, a comma), OLMo-core's line-by-line reading finds our rows' start
    and end, no more, no fewer."""
    import pyarrow as pa

    from bolmo_async.finalizer import csv_rows

    starts = np.arange(len(ids), dtype=np.int64) * 7
    path = tmp_path_factory.mktemp("csv") / "bolmo_data_00000.csv.gz"
    path.write_bytes(
        gzip.compress(csv_rows(starts, starts + 7, pa.array(ids, pa.string()), src, pa.array(range(len(ids)))))
    )
    assert olmo_core_document_indices(path) == [(s, s + 7) for s in starts.tolist()]


def test_hostile_ids_give_one_csv_row_per_document(tmp_path):
    """End to end: ids with LF and CR (one made to look like ``start,end`` after its line break)
    through the mirror and ``prepare``: the shard's .csv.gz gives OLMo-core's reading exactly
    our documents, and ``inspect`` reads the escaped ids back."""
    from bolmo_async import api
    from bolmo_async.mirror import MirrorRepo, MirrorThread
    from bolmo_async.models import DEFAULT_REPO_ID

    ids = ["plain-0", "two\nlines", "cr\rhere", "x\n5,7,z", 'q"u,ote']
    mix = tmp_path / "mix"
    (mix / "data" / "web").mkdir(parents=True)
    (mix / "data" / "web" / "web-0000.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": f"document {k} " * 20}) + "\n" for k, i in enumerate(ids))
    )
    out = tmp_path / "out"
    with MirrorThread([MirrorRepo(DEFAULT_REPO_ID, mix)]) as m:
        _prepare(out, m, data_fraction=1.0)
    tokens = np.fromfile(out / "bolmo_data_00000.npy", dtype="<u4")
    eos = np.flatnonzero(tokens == 1) + 1
    assert olmo_core_document_indices(out / "bolmo_data_00000.csv.gz") == list(zip([0, *eos[:-1]], eos, strict=True))
    rows = api.inspect(out, decode=len(ids))
    assert not rows["problems"]
    assert [d["id"] for d in rows["documents"]] == [i.replace("\n", "\\n").replace("\r", "\\r") for i in ids]


@pytest.mark.parametrize("tokenizer", ["byte", pytest.param("subword", marks=needs_dolma2)])
def test_ids_written_in_small_chunks_give_the_same_shards(tmp_path, mirror, monkeypatch, tokenizer):
    """finalize builds ids WRITE_TOKENS at a time (long documents in slices): the chunking never
    shows in the output."""
    import sys

    out = tmp_path / "o"
    m = _prepare(out, mirror, data_fraction=0.3, max_tokens_per_file=150_000, tokenizer=tokenizer)
    index = [Path(s["csv"]).read_bytes() for s in m["shards"]]
    monkeypatch.setattr(sys.modules["bolmo_async.finalizer"], "WRITE_TOKENS", 777)
    again = bolmo_async.finalize(out, max_tokens_per_file=150_000)
    assert shard_hashes(again) == shard_hashes(m)
    assert [Path(s["csv"]).read_bytes() for s in again["shards"]] == index
    assert any(d["tokens"] > 777 for d in again["shards"])


@pytest.mark.parametrize("bound", [20_000, 10_000_000])
def test_prepare_writes_shards_while_fetching_byte_identical_to_finalize(tmp_path, mirror, monkeypatch, bound):
    """prepare writes each shard as soon as the files before it are staged; those are the very
    shards (and csv.gz) that a separate fetch + finalize writes, and finalize rewrites none of them.
    A bound of 20k tokens also cuts documents larger than a shard across shards."""
    import xxhash

    import bolmo_async.finalizer as finalizer_module  # (the API imports it where it is used)

    streamed: dict = {}
    real_finalize_dir = finalizer_module.finalize_dir

    def observe(*args, **kw):
        streamed.update(kw.get("written") or {})
        return real_finalize_dir(*args, **kw)

    monkeypatch.setattr(finalizer_module, "finalize_dir", observe)
    m = _prepare(tmp_path / "a", mirror, data_fraction=1.0, max_tokens_per_file=bound)
    assert sorted(streamed) == list(range(len(m["shards"])))
    assert all(rec == s for (_, rec), s in zip((streamed[k] for k in sorted(streamed)), m["shards"], strict=True))

    b = tmp_path / "b"
    bolmo_async.plan(b, endpoint=mirror.endpoint, data_fraction=1.0)
    bolmo_async.fetch(b, endpoint=mirror.endpoint, progress=False)
    m2 = bolmo_async.finalize(b, max_tokens_per_file=bound)
    assert len(m["shards"]) == len(m2["shards"]) and (bound > 1e6 or len(m["shards"]) > 10)
    for s1, s2 in zip(m["shards"], m2["shards"], strict=True):
        data = Path(s1["path"]).read_bytes()
        assert data == Path(s2["path"]).read_bytes() and xxhash.xxh3_128(data).hexdigest() == s1["xxh3_128"]
        assert gzip.decompress(Path(s1["csv"]).read_bytes()) == gzip.decompress(Path(s2["csv"]).read_bytes())
    if bound == 20_000:
        rows = [r for s in m["shards"] for r in read_index(Path(s["csv"]))]
        docs = [(r[2], r[3], r[4]) for r in rows]
        assert len(docs) > len(set(docs)), "some document is cut across shards"
    # Read as the trainer does: every shard ends with EOS, every csv.gz row ends at one.
    for s in m["shards"]:
        arr = np.memmap(s["path"], dtype=np.uint32, mode="r")
        assert len(arr) <= bound and arr[-1] == 1
        ends = [r[1] for r in read_index(Path(s["csv"]))]
        assert ends[-1] == len(arr) and all(arr[e - 1] == 1 for e in ends)
        assert np.flatnonzero(arr == 1).tolist() == [e - 1 for e in ends]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.lists(st.lists(st.integers(2, 60), min_size=1, max_size=12), min_size=1, max_size=3), min_size=1, max_size=4
    ),
    st.integers(2, 80),
)
def test_shard_layout_is_bounded_ordered_and_splits_only_oversized_documents(units, bound):
    """Shards hold at most ``bound`` tokens, documents in plan order, each token once; only
    documents over the bound are cut, and every piece of a cut one but the last gets its own EOS
    (counted in the shard's size), so every shard ends with an EOS."""
    from bolmo_async.finalizer import LayoutBuilder

    lengths = [[np.array(b, dtype=np.int64) for b in batches] for batches in units]
    builder = LayoutBuilder(bound)
    for unit, batches in enumerate(lengths):
        for b, lens in enumerate(batches):
            builder.add(unit, b, lens)
    shards = builder.shards()
    flat = []  # (unit, batch, doc, tokens) in shard order
    for pieces in shards:
        assert pieces
        size = 0
        for p in pieces:
            lens = lengths[p.unit][p.batch]
            if p.tok_lo >= 0:
                assert p.doc_hi == p.doc_lo + 1 and lens[p.doc_lo] > bound  # only oversized docs are cut
                assert p.tok_hi > p.tok_lo
                flat.append((p.unit, p.batch, p.doc_lo, p.tok_hi - p.tok_lo))
                size += p.tok_hi - p.tok_lo + (1 if p.tok_hi < lens[p.doc_lo] else 0)  # + its EOS
            else:
                for d in range(p.doc_lo, p.doc_hi):
                    flat.append((p.unit, p.batch, d, int(lens[d])))
                    size += int(lens[d])
        assert 0 < size <= bound
    merged: dict = {}
    for u, b, d, n in flat:
        merged[(u, b, d)] = merged.get((u, b, d), 0) + n
    expected = [
        ((u, b, d), int(n))
        for u, batches in enumerate(lengths)
        for b, lens in enumerate(batches)
        for d, n in enumerate(lens)
    ]
    assert list(merged.items()) == expected  # every token once, documents in plan order


def test_subword_mode_with_a_bpe_trained_on_the_sample(tmp_path, sample_dir):
    """Subword mode end to end without the dolma2 file: the demo's BPE, served as a model repo and
    fetched by the run's own client; shards equal `tokenizers` + EOS, document for document."""
    from tokenizers import Tokenizer

    from bolmo_async.mirror import MirrorRepo, MirrorThread
    from bolmo_async.mirror.sample import train_demo_tokenizer
    from bolmo_async.models import DEFAULT_REPO_ID

    from .helpers import read_documents

    path = train_demo_tokenizer(sample_dir, tmp_path / "bpe", vocab_size=600)
    ref = Tokenizer.from_file(str(path))
    ref.encode_special_tokens = True
    eos = ref.token_to_id("<|endoftext|>")
    repos = [MirrorRepo(DEFAULT_REPO_ID, sample_dir), MirrorRepo("demo/bpe", tmp_path / "bpe", "model")]
    with MirrorThread(repos) as m:
        manifest = bolmo_async.prepare(
            tmp_path / "o", endpoint=m.endpoint, data_fraction=0.3, tokenizer="subword",
            tokenizer_identifier="demo/bpe", progress=False, max_tokens_per_file=10_000_000, engine="fastokens",
        )  # fmt: skip
    assert manifest["tokenizer"]["eos_token_id"] == eos and manifest["tokenizer"]["engine"] == "fastokens"
    with MirrorThread(repos) as m:  # auto: a plan this small runs the reference engine itself, same ids
        small = bolmo_async.prepare(
            tmp_path / "auto", endpoint=m.endpoint, data_fraction=0.3, tokenizer="subword",
            tokenizer_identifier="demo/bpe", progress=False, max_tokens_per_file=10_000_000,
        )  # fmt: skip
    assert small["tokenizer"]["engine"] == "tokenizers" and shard_hashes(small) == shard_hashes(manifest)
    texts = {
        (p.relative_to(sample_dir).as_posix(), loc): t
        for p in sample_dir.rglob("data/*/*")
        for loc, _, t in read_documents(p)
    }
    docs = shard_documents(manifest)
    assert len(docs) > 50
    for _doc_id, src, loc, ids in docs[:300]:
        text = texts[(src.split("@", 1)[1].split("/", 1)[1], loc)]
        assert ids.tolist() == [*ref.encode(text, add_special_tokens=False).ids, eos]


def test_direct_io_and_block_size_never_show_in_the_shards(tmp_path, mirror, monkeypatch):
    """Shards go to disk in page-aligned blocks with O_DIRECT where the filesystem takes it; the
    bytes on disk (read back as the trainer reads them) and their manifest checksums are the
    same with it off and with blocks of one page (every block boundary, an unaligned tail)."""
    import sys

    import xxhash

    import bolmo_async.outdir.local as outdir_local

    out = tmp_path / "o"
    m = _prepare(out, mirror, data_fraction=0.3, max_tokens_per_file=150_000)

    def on_disk(manifest):
        files = [Path(s["path"]).read_bytes() for s in manifest["shards"]]
        for s, data in zip(manifest["shards"], files, strict=True):
            assert xxhash.xxh3_128(data).hexdigest() == s["xxh3_128"]
            assert len(data) == 4 * s["tokens"]
        return files

    direct = on_disk(m)
    monkeypatch.setattr(outdir_local, "DIRECT_IO", False)
    assert on_disk(bolmo_async.finalize(out, max_tokens_per_file=150_000)) == direct
    monkeypatch.setattr(outdir_local, "DIRECT_IO", True)
    monkeypatch.setattr(sys.modules["bolmo_async.finalizer"], "BLOCK_BYTES", 4096)
    assert on_disk(bolmo_async.finalize(out, max_tokens_per_file=150_000)) == direct
    assert any(s["tokens"] % 1024 for s in m["shards"])  # a tail that is not a whole page


def test_output_file_falls_back_to_ordinary_writes(tmp_path):
    """Memory O_DIRECT refuses (not page-aligned), an unaligned tail, and a filesystem without
    O_DIRECT all end with the same bytes on disk."""
    from bolmo_async.outdir.local import LocalNewFile, aligned_buffer

    block = aligned_buffer(8192)
    block[:] = bytes(range(256)) * 32
    unaligned = memoryview(b"x" + bytes(range(256)) * 16)[1:]  # 4096 bytes, off by one in memory
    path = tmp_path / "f.bin"
    f = LocalNewFile(path, str(tmp_path), direct=True)
    f.write(block)
    f.write(unaligned)
    f.write(block[:100])
    f.commit()
    assert path.read_bytes() == bytes(block) + bytes(unaligned) + bytes(block[:100])
    shm = Path("/dev/shm")
    if shm.is_dir():
        p = shm / f"bolmo-async-test-{tmp_path.name}.bin"
        try:
            g = LocalNewFile(p, str(shm), direct=True)
            g.write(block)
            g.write(block[:10])
            g.commit()
            assert p.read_bytes() == bytes(block) + bytes(block[:10])
        finally:
            p.unlink(missing_ok=True)


@pytest.mark.parametrize("tokenizer", ["byte", pytest.param("subword", marks=needs_dolma2)])
def test_a_small_new_plan_runs_in_process_with_the_cheapest_engine(tmp_path, mirror, monkeypatch, tokenizer):
    """With --processes 0 and no plan yet, the pool is sized once the plan is known: a smoke
    test (here the whole sample, a few MB to decode) runs in this process instead of spawning,
    and in subword mode `--engine auto` runs the tokenizers reference (no fastokens build)."""
    import bolmo_async.api as api

    sizes: list[int] = []
    real = api.choose

    def sized_pool(*, processes: int, **kw):
        sizes.append(processes)
        return real(processes=processes, **kw)

    monkeypatch.setattr(api, "choose", sized_pool)
    m = _prepare(tmp_path / "o", mirror, data_fraction=0.05, tokenizer=tokenizer)
    assert sizes == [1]
    assert m["totals"]["documents"] > 0
    if tokenizer == "subword":
        assert m["tokenizer"]["engine"] == "tokenizers"


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.lists(st.lists(st.integers(1, 60), min_size=0, max_size=8), min_size=0, max_size=3), min_size=1, max_size=5
    ),
    st.integers(2, 80),
    st.randoms(use_true_random=False),
)
def test_the_fetchs_layout_is_finalizes_whatever_order_files_are_staged_in(units, bound, rng):
    """``ShardPlanner``, fed files as they are staged (any order), ends with exactly the layout and
    totals ``finalize`` computes from the staged lengths in plan order; not before the last file."""
    from bolmo_async.finalizer import LayoutBuilder, ShardPlanner
    from bolmo_async.models import Plan, PlannedFile

    lengths = [[np.array(b, dtype=np.int64) for b in batches] for batches in units]
    builder = LayoutBuilder(bound)
    for unit, batches in enumerate(lengths):
        for b, lens in enumerate(batches):
            builder.add(unit, b, lens)
    files = tuple(PlannedFile(f"data/f{i}.jsonl", "data", 1, "oid", None) for i in range(len(units)))
    plan = Plan("r", "main", "c" * 40, 1.0, 0, files, (), "")
    planner = ShardPlanner(plan, bound)
    order = list(range(len(units)))
    rng.shuffle(order)
    for u in order:
        assert planner.layout() is None
        planner.staged(u, lengths[u])
    planner.finish()
    layout = planner.layout()
    assert layout is not None and layout.bound == bound
    assert layout.shards == builder.shards()
    assert layout.documents == sum(len(x) for b in lengths for x in b)
    assert layout.tokens == sum(int(x.sum()) for b in lengths for x in b)


def test_prepare_finalizes_from_its_workers_reports_without_reading_the_staging_again(tmp_path, mirror, monkeypatch):
    """A complete prepare's finalize lays shards out from what its worker processes reported (no
    staged file's lengths read again in the coordinator: 1-2 ms a file, serial, at the very end);
    a finalize that reads them all gives the same shards and totals."""
    from bolmo_async.staging import Staging

    reads: list[str] = []
    lengths = Staging.lengths
    monkeypatch.setattr(Staging, "lengths", lambda self, pf: reads.append(pf.path) or lengths(self, pf))
    out = tmp_path / "o"
    m = _prepare(out, mirror, data_fraction=0.5, max_tokens_per_file=100_000, processes=2)
    assert m["complete"] and len(m["shards"]) > 1
    assert reads == []
    again = bolmo_async.finalize(out, max_tokens_per_file=100_000)
    assert len(reads) == m["planned_files"]  # this one read every staged file's lengths
    assert shard_hashes(again) == shard_hashes(m) and again["totals"] == m["totals"]
    assert [s["tokens"] for s in again["shards"]] == [s["tokens"] for s in m["shards"]]


def test_a_workers_event_loop_never_creates_a_file(tmp_path, mirror, monkeypatch):
    """Staging files (and markers, claims) are made on the worker's threads, never on its event
    loop (file I/O there holds up every download of the worker)."""
    import threading

    from bolmo_async.outdir.local import LocalDir

    where: list[str] = []
    new_file = LocalDir.new_file

    def spy(self, name, **kw):  # type: ignore[no-untyped-def]
        where.append(threading.current_thread().name)
        return new_file(self, name, **kw)

    monkeypatch.setattr(LocalDir, "new_file", spy)
    _prepare(tmp_path / "o", mirror, data_fraction=0.3, processes=1)  # the worker on a thread of this process
    assert where and "bolmo-worker" not in where, sorted(set(where))


def test_a_run_that_holds_its_folder_stages_without_claims(tmp_path, mirror):
    """``prepare`` and ``fetch`` hold the folder's lock exclusively, so no other run writes in it:
    their files are staged without a per-file claim (a lock file opened and locked, and two trips
    to a thread, per file). A ``--worker`` share holds the lock shared: it claims every file."""
    out = tmp_path / "o"
    m = _prepare(out, mirror, data_fraction=0.5, processes=2)
    assert m["complete"] and m["planned_files"] > 1
    assert not list((out / "staging").glob(".*.lock"))
    share = tmp_path / "s"
    plan = bolmo_async.plan(share, endpoint=mirror.endpoint, data_fraction=0.5)
    bolmo_async.fetch(share, endpoint=mirror.endpoint, worker="0/1", progress=False)
    assert len(list((share / "staging").glob(".*.lock"))) == len(plan.files)


def test_another_fraction_reuses_whole_files_and_names_the_staged_prefixes_it_leaves(tmp_path, mirror, caplog):
    """A larger fraction reuses the whole files staged before; each source's partly-taken file is
    staged per prefix length, so it is fetched again, and the run says the old prefixes stay."""
    from bolmo_async.outdir import open_output
    from bolmo_async.planner import load_plan

    out = tmp_path / "o"
    small = bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=0.05, progress=False)
    old = load_plan(open_output(out))
    with caplog.at_level(logging.INFO, logger="bolmo_async"):
        big = bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=0.2, progress=False)
    new = load_plan(open_output(out))
    assert old is not None and new is not None
    reused = {f.key for f in old.files} & {f.key for f in new.files}
    assert all(f.whole for f in old.files if f.key in reused)
    assert big["fetched_now"] == len(new.files) - len(reused) and small["fetched_now"] == len(old.files)
    prefixes = [f for f in old.files if not f.whole]
    assert prefixes and not reused & {f.key for f in prefixes}
    said = [r.getMessage() for r in caplog.records if "not reused by this plan" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"{len(old.files) - len(reused)} file(s) staged for --data-fraction 0.05"), said
    assert "--drop-staging" in said[0], said
    with caplog.at_level(logging.INFO, logger="bolmo_async"):  # the same fraction again: nothing to say
        caplog.clear()
        bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=0.2, progress=False)
    assert not [r for r in caplog.records if "not reused" in r.getMessage()]

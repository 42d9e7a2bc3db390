"""The shard being filled is streamed to one worker while later files are staged (``ShardStream``):
the same bytes as a shard written at once, never a shard missing a piece, no temporaries left."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

import bolmo_async
from bolmo_async import messages as m
from bolmo_async.finalizer import LayoutBuilder, Piece, write_shard
from bolmo_async.mirror import MirrorThread, WanConfig
from bolmo_async.outdir import open_output, staged_name
from bolmo_async.planner import load_plan
from bolmo_async.staging import Staging
from bolmo_async.tokenize import TokenizerSpec
from bolmo_async.util import CHECKSUM
from bolmo_async.worker import Worker

from .helpers import cli, finish, shard_hashes, worker_spec

BOUND = 150_000


@pytest.fixture(scope="module")
def staged(repos: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[Piece]]]:
    """A folder staged by a real run, and its layout (every shard's pieces)."""
    out = tmp_path_factory.mktemp("staged") / "o"
    with MirrorThread(repos) as mirror:
        bolmo_async.prepare(
            out, endpoint=mirror.endpoint, data_fraction=0.5, max_tokens_per_file=BOUND, progress=False, processes=1
        )
    folder = open_output(out)
    plan = load_plan(folder)
    assert plan is not None
    staging = Staging(folder)
    layout = LayoutBuilder(BOUND)
    for u, pf in enumerate(plan.files):
        for b, lens in enumerate(staging.lengths(pf)):
            layout.add(u, b, lens)
    return out, layout.shards()


def _worker(out: Path) -> tuple[queue.Queue[Any], queue.Queue[Any], threading.Thread]:
    folder = open_output(out)
    plan = load_plan(folder)
    assert plan is not None
    spec = worker_spec(out, plan, plan.endpoint, TokenizerSpec("byte"), 1, claims=False)
    inbox: queue.Queue[Any] = queue.Queue()
    outbox: queue.Queue[Any] = queue.Queue()
    worker = Worker(0, spec, inbox.get, outbox.put)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return inbox, outbox, thread


def _answers(outbox: queue.Queue[Any], kinds: tuple[type, ...]) -> Any:
    while True:
        msg = outbox.get(timeout=60)
        if isinstance(msg, kinds):
            return msg


def _temporaries(out: Path) -> list[str]:
    return [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def _longest(shards: list[list[Piece]]) -> tuple[int, list[Piece]]:
    k = max(range(len(shards)), key=lambda i: len(shards[i]))
    assert len(shards[k]) >= 3, "the sample gives a shard of several pieces"
    return k, shards[k]


def test_a_streamed_shard_is_byte_identical_to_one_written_at_once(staged):
    out, shards = staged
    k, pieces = _longest(shards)
    folder = open_output(out)
    plan = load_plan(folder)
    assert plan is not None
    prefix = json.loads((out / "manifest.json").read_text())
    arrows = {p.unit: staged_name(plan.files[p.unit].key) for p in pieces}
    srcs = {p.unit: plan.files[p.unit].path for p in pieces}
    assert prefix  # the run finished
    whole = write_shard(folder, k, pieces, arrows, srcs, 1, threading.Event())
    inbox, outbox, thread = _worker(out)
    try:
        # In three messages, the last one empty but for the end (a shard completed by a file
        # whose pieces were all streamed already).
        inbox.put(m.ShardStream(k, 0, pieces[:1]))
        inbox.put(m.ShardStream(k, 1, pieces[1:]))
        inbox.put(m.ShardStream(k, len(pieces), [], end=True))
        got = _answers(outbox, (m.ShardWritten, m.ShardFailed, m.Fatal))
        assert isinstance(got, m.ShardWritten) and got.index == k
        assert got.record[CHECKSUM] == whole[CHECKSUM] and got.record["tokens"] == whole["tokens"]
        assert got.record["documents"] == whole["documents"]
    finally:
        inbox.put(m.Stop())
        thread.join(30)
    assert _temporaries(out) == []


def _counted_stream(staged: Any, monkeypatch: Any, messages: Any) -> tuple[str, int, list[Piece], list[int], list[Any]]:
    """A worker's ``_stream`` of the longest shard of ``staged``, its messages (``messages(k,
    pieces)``) all queued before its first step: (output, shard, its pieces, the pieces of each
    ``append_pieces`` call, what the worker sent)."""
    import asyncio

    from bolmo_async import finalizer

    out, shards = staged
    k, pieces = _longest(shards)
    plan = load_plan(open_output(out))
    assert plan is not None
    appends: list[int] = []
    real = finalizer.append_pieces

    def counted(shard: Any, run: list[Piece], *args: Any) -> None:
        appends.append(len(run))
        real(shard, run, *args)

    monkeypatch.setattr(finalizer, "append_pieces", counted)
    spec = worker_spec(out, plan, plan.endpoint, TokenizerSpec("byte"), 1, claims=False)
    sent: list[Any] = []
    worker = Worker(0, spec, lambda: None, sent.append)

    async def stream() -> None:
        q: asyncio.Queue[m.ShardStream] = asyncio.Queue()
        for msg in messages(k, pieces):
            q.put_nowait(msg)
        await worker._stream(k, {k: q})

    asyncio.run(stream())
    return out, k, pieces, appends, sent


def test_the_messages_queued_behind_a_streamed_piece_are_appended_in_one_trip(staged, monkeypatch):
    """Every ShardStream message queued for a shard when its thread is free goes with it in one
    append (one per file staged: they piled up during an append, and a trip to the thread each
    kept the stream behind the files); the same bytes, and the end still puts it in place."""

    def messages(k: int, pieces: list[Piece]) -> list[m.ShardStream]:  # one a piece, then the end
        return [m.ShardStream(k, i, pieces[i : i + 1]) for i in range(len(pieces))] + [
            m.ShardStream(k, len(pieces), [], end=True)
        ]

    out, k, pieces, appends, sent = _counted_stream(staged, monkeypatch, messages)
    assert appends == [len(pieces)]
    folder = open_output(out)
    plan = load_plan(folder)
    assert plan is not None
    arrows = {p.unit: staged_name(plan.files[p.unit].key) for p in pieces}
    srcs = {p.unit: plan.files[p.unit].path for p in pieces}
    whole = write_shard(folder, k, pieces, arrows, srcs, 1, threading.Event())  # the same bytes at once
    assert len(sent) == 1 and isinstance(sent[0], m.ShardWritten) and sent[0].index == k
    assert sent[0].record[CHECKSUM] == whole[CHECKSUM] and sent[0].record["documents"] == whole["documents"]
    assert _temporaries(out) == []


@pytest.mark.parametrize("last", ["drop", "gap"])
def test_queued_pieces_followed_by_a_drop_or_a_gap_are_not_appended(staged, monkeypatch, last):
    """Taken together, queued messages ending in a drop append nothing (its temporaries go) and
    ones with a piece missing fail the stream before any append: never a shard missing a piece."""

    def messages(k: int, pieces: list[Piece]) -> list[m.ShardStream]:
        end = m.ShardStream(k, 0, [], drop=True) if last == "drop" else m.ShardStream(k, 3, pieces[3:], end=True)
        return [m.ShardStream(k, 0, pieces[:1]), m.ShardStream(k, 1, pieces[1:2]), end]

    out, _, _, appends, sent = _counted_stream(staged, monkeypatch, messages)
    assert appends == []
    if last == "drop":
        assert sent == []
    else:
        assert len(sent) == 1 and isinstance(sent[0], m.ShardFailed) and "from 3 came after 2" in sent[0].reason
    assert _temporaries(out) == []


def test_a_stream_missing_a_piece_fails_and_a_dropped_one_leaves_no_temporaries(staged):
    out, shards = staged
    k, pieces = _longest(shards)
    inbox, outbox, thread = _worker(out)
    try:
        inbox.put(m.ShardStream(k, 0, pieces[:1]))
        inbox.put(m.ShardStream(k, 2, pieces[2:], end=True))  # piece 1 never came
        got = _answers(outbox, (m.ShardWritten, m.ShardFailed, m.Fatal))
        assert isinstance(got, m.ShardFailed) and got.index == k and "came after" in got.reason
        # Messages still in flight for it do not start it again from the middle.
        inbox.put(m.ShardStream(k, 3, pieces[3:], end=True))
        other = (k + 1) % len(shards)
        inbox.put(m.ShardStream(other, 0, shards[other][:1]))
        inbox.put(m.ShardStream(other, 0, [], drop=True))
        inbox.put(m.Stop())
        thread.join(30)
        assert not thread.is_alive()
        rest = []
        while not outbox.empty():
            rest.append(outbox.get())
        assert not any(isinstance(r, m.ShardWritten | m.ShardFailed) for r in rest), rest
    finally:
        inbox.put(m.Stop())
        thread.join(30)
    assert _temporaries(out) == []


def test_a_stream_left_open_when_the_worker_stops_leaves_no_temporaries(staged):
    out, shards = staged
    k, pieces = _longest(shards)
    inbox, _, thread = _worker(out)
    inbox.put(m.ShardStream(k, 0, pieces[:2]))
    inbox.put(m.Stop())  # the coordinator stops this worker while the shard waits for its next files
    thread.join(30)
    assert not thread.is_alive() and _temporaries(out) == []


@pytest.mark.slow
@pytest.mark.parametrize("stream", ["1", "0"])
def test_prepare_streams_the_shard_being_filled_and_finalize_writes_the_same_bytes(repos, tmp_path, stream):
    """Real processes over the mirror: the shard being filled goes to a worker while the next files
    are staged (not with BOLMO_ASYNC_SHARD_STREAM=0: each shard is written once its files are
    staged), and every shard is what ``finalize`` writes from the staging at once."""
    out = tmp_path / "o"
    with MirrorThread(repos) as mirror:
        args = ["prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "1", "--processes", "2"]
        r = subprocess.run(
            cli(*args, "--max-tokens-per-file", str(BOUND), "--no-progress", "-v"),
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "BOLMO_ASYNC_SHARD_STREAM": stream},
        )
    assert r.returncode == 0, r.stderr[-2000:]
    assert ("streaming shard" in r.stderr) == (stream == "1")
    streamed = shard_hashes(json.loads((out / "manifest.json").read_text()))
    for shard in out.glob("bolmo_data_*"):
        shard.unlink()
    again = bolmo_async.finalize(out)
    assert shard_hashes(again) == streamed and len(streamed) > 2
    assert _temporaries(out) == []


@pytest.mark.slow
def test_the_streaming_worker_killed_mid_run_loses_nothing_and_a_rerun_gives_the_same_shards(repos, tmp_path):
    """kill -9 of the worker a shard streams to, while its files are still staged (a slow link):
    the run goes on or fails only that worker's files, never a shard missing a piece, no temporary
    left; the rerun resumes to the shards of a run never interrupted."""
    clean, out = tmp_path / "clean", tmp_path / "o"
    opts = ("--data-fraction", "1", "--processes", "2", "--max-tokens-per-file", str(BOUND), "--no-progress")
    with MirrorThread(repos, wan=WanConfig(rtt=0.03, response_rate=2e6)) as mirror:
        r = subprocess.run(cli("prepare", "-o", str(clean), "--endpoint", mirror.endpoint, *opts), capture_output=True)
        assert r.returncode == 0, r.stderr[-2000:]
        args = cli("prepare", "-o", str(out), "--endpoint", mirror.endpoint, *opts, "-v")
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert proc.stderr is not None
        killed = None
        err = []
        for line in proc.stderr:
            err.append(line)
            found = re.search(r"streaming shard \d+ to worker \d+ \(pid (\d+)\)", line)
            if found:
                killed = int(found.group(1))
                os.kill(killed, signal.SIGKILL)
                break
        err.append(finish(proc, 120)[1])
        assert killed is not None, "".join(err)[-2000:]
        assert proc.returncode in (0, 1), "".join(err)[-2000:]
        assert "Traceback" not in "".join(err)
        assert not [n for n in os.listdir(out) if f".{killed}-" in n]
        again = subprocess.run(
            cli("prepare", "-o", str(out), "--endpoint", mirror.endpoint, *opts), capture_output=True
        )
        assert again.returncode == 0, again.stderr[-2000:]
    assert shard_hashes(json.loads((out / "manifest.json").read_text())) == shard_hashes(
        json.loads((clean / "manifest.json").read_text())
    )
    assert _temporaries(out) == []


@pytest.mark.slow
def test_a_file_is_verified_and_staged_in_one_trip_to_a_thread(repos, tmp_path, monkeypatch):
    """A streamed file's verify and its commit run in one trip to a worker's CPU thread (each trip
    costs thread handoffs, per file: on many small files that counts): no trip of its own for the
    commit, and the shards are the same bytes."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    import bolmo_async.worker as worker_module

    trips: collections.Counter[str] = collections.Counter()

    class Counting(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            if self._thread_name_prefix == "bolmo-cpu":
                trips[getattr(fn, "__qualname__", type(fn).__name__)] += 1
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(worker_module, "ThreadPoolExecutor", Counting)
    out = tmp_path / "o"
    with MirrorThread(repos) as mirror:
        manifest = bolmo_async.prepare(
            out, endpoint=mirror.endpoint, data_fraction=0.5, max_tokens_per_file=BOUND, progress=False, processes=1
        )
    plan = load_plan(open_output(out))
    assert plan is not None
    streamed = [pf for pf in plan.files if not pf.path.endswith(".parquet")]
    assert streamed, "the sample has files decoded as they stream"
    assert trips["run_file_task.<locals>.<lambda>"] == len(streamed), trips  # verify, then commit
    assert trips["Processor.commit"] == len(plan.files) - len(streamed), trips  # parquet's: on its own
    for shard in out.glob("bolmo_data_*"):
        shard.unlink()
    assert shard_hashes(bolmo_async.finalize(out)) == shard_hashes(manifest)


def test_a_shards_csv_rows_never_wait_for_its_block_being_written(tmp_path):
    """A shard's csv.gz rows go to a lane of their own: queued behind a block's write (depth 1),
    every piece's rows waited for the disk, and the next block was not built meanwhile (the
    streamed shard of many small files fell behind, then ended the run alone, disk-bound)."""
    import gzip

    import numpy as np
    import pyarrow as pa

    from bolmo_async import finalizer
    from bolmo_async.finalizer import ShardWriter

    folder = open_output(tmp_path)
    writer = ShardWriter(folder, 0)
    held, writing = threading.Event(), threading.Event()
    real = writer._write

    def slow_disk(data: Any) -> None:  # the block's write takes as long as the test holds it
        writing.set()
        held.wait(60)
        real(data)

    writer._write = slow_disk  # type: ignore[method-assign]
    ids = np.arange(finalizer.BLOCK_BYTES // 4 + 5, dtype=np.uint32)
    try:
        writer.write(ids)  # one whole block handed to the disk, 5 ids in the next
        assert writing.wait(30)
        rows = threading.Thread(
            target=writer.rows,
            args=(np.array([0]), np.array([len(ids)]), pa.array(["doc"]), "src", pa.array([0])),
            daemon=True,
        )
        rows.start()
        rows.join(5)
        assert not rows.is_alive(), "the rows waited for the block's write"
    finally:
        held.set()
    rec = writer.close()
    assert rec["tokens"] == len(ids) and rec["documents"] == 1
    assert (tmp_path / Path(rec["path"]).name).read_bytes() == ids.astype("<u4").tobytes()
    assert gzip.decompress((tmp_path / Path(rec["csv"]).name).read_bytes()) == f"0,{len(ids)},doc,src,0\n".encode()


@pytest.mark.parametrize(
    ("value", "streams"), [(None, True), ("1", True), ("on", True), ("0", False), ("false", False), ("Off", False)]
)
def test_the_stream_switch_reads_on_and_off_when_a_pool_is_made(monkeypatch, value, streams):
    """``BOLMO_ASYNC_SHARD_STREAM`` is read when a pool is made (an API user may set it between
    runs), and its usual spellings of on and off mean what they say."""
    from bolmo_async.executors.local import Pool

    if value is None:
        monkeypatch.delenv("BOLMO_ASYNC_SHARD_STREAM", raising=False)
    else:
        monkeypatch.setenv("BOLMO_ASYNC_SHARD_STREAM", value)
    assert Pool(1)._streams is streams


def test_a_stream_switch_that_is_neither_on_nor_off_is_refused_before_any_work(repos, tmp_path):
    """``BOLMO_ASYNC_SHARD_STREAM=maybe`` is a usage error naming the variable and its values (exit
    2, one line, no traceback), not read silently as on."""
    out = tmp_path / "o"
    with MirrorThread(repos) as mirror:
        r = subprocess.run(
            cli("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.01", "--no-progress"),
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "BOLMO_ASYNC_SHARD_STREAM": "maybe"},
        )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "BOLMO_ASYNC_SHARD_STREAM='maybe'" in r.stderr and "use 1" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list(out.glob("bolmo_data_*"))

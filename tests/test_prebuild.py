"""The subword reference engine built once, by the fork server, for every worker forked from it
(``tokenize.prebuild_reference``), from the tokenizer JSON this machine knows (``tokcache``), and
the entry point that starts that server before anything else loads (``entry``)."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import bolmo_async
from bolmo_async import messages, tokcache, tokenize
from bolmo_async.entry import early_workers
from bolmo_async.executors.forkserver import FORK_SERVER
from bolmo_async.executors.local import START_METHOD_ENV
from bolmo_async.worker import Worker

from .conftest import DOLMA2, needs_dolma2
from .helpers import readme_bpe_json, report_prebuilt, worker_spec

TEXTS = ["Hello world", "def f(x):\n    return x  # <|endoftext|>", "é东京 ß 🚀", ""]


@pytest.fixture
def no_prebuilt():
    tokenize._PREBUILT.clear()
    yield
    tokenize._PREBUILT.clear()
    tokenize.forget_probed()


def _reference_ids(special_tokens_as_text: bool) -> tuple[list[int], list[int]]:
    """The ids and offsets of ``TEXTS`` from a reference engine built here."""
    tok = tokenize.SubwordTokenizer(
        tokenize.load_tokenizer_source(str(DOLMA2)), engine="tokenizers", special_tokens_as_text=special_tokens_as_text
    )
    ids, offsets = tok.encode_batch(TEXTS)
    tokenize.forget_probed()
    return ids.tolist(), offsets.tolist()


@needs_dolma2
def test_workers_forked_from_the_server_start_with_the_reference_engine_it_built(monkeypatch, capfd, no_prebuilt):
    """Started with a tokenizer JSON to build ahead, the fork server builds the reference engine
    once; each worker forked from it takes it (with its own special-tokens option) instead of
    building its own, and encodes exactly as a fresh build does, its thread pool working: the
    server only built it, so ``tokenizers`` did not turn its parallelism off after the fork. The
    server lets its own copy go once it has forked the workers it was built for: a third builds
    its own."""
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    FORK_SERVER.start_early(str(DOLMA2), 2)
    assert tokcache.PREBUILD_ENV not in os.environ  # for the server only
    ctx = FORK_SERVER.acquire()  # takes over the early hold, as a pool does
    try:
        out = ctx.Queue()
        procs = [ctx.Process(target=report_prebuilt, args=(str(DOLMA2), s, TEXTS, out)) for s in (True, False)]
        for p in procs:
            p.start()
        got = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(30)
        third = ctx.Process(target=report_prebuilt, args=(str(DOLMA2), True, TEXTS, out))
        third.start()
        late = out.get(timeout=120)
        third.join(30)
    finally:
        FORK_SERVER.release(reap=True)
    results = {g[0]: g[1:] for g in got}
    for special in (True, False):
        had, left, ids, offsets = results[special]
        assert (had, left) == (1, 0)  # found it, took it
        assert (ids, offsets) == _reference_ids(special)
    assert results[True] != results[False]  # each took it with its own option (<|endoftext|> in TEXTS)
    assert late[1:3] == (0, 0) and tuple(late[3:]) == _reference_ids(True)  # built its own
    assert "parallelism" not in capfd.readouterr().err


# The same through a fork server forked from a fresh process (the command line's way): that
# process imports the workers' modules, forks the server, which builds the engine and forks them.
_FORKED_SERVER_PREBUILDS = """
import json, os, sys
from multiprocessing import forkserver
from bolmo_async.executors.forkserver import FORK_SERVER, start_fork_server
path, texts = sys.argv[1], json.loads(sys.argv[2])
start_fork_server(path, 2, fork=True)
from tests.helpers import report_prebuilt  # (numpy: after the server's thread settings)
pid = forkserver._forkserver._forkserver_pid
with open(f"/proc/{pid}/cmdline", "rb") as a, open("/proc/self/cmdline", "rb") as b:
    forked = a.read() == b.read()  # a copy of this process, not a new interpreter
ctx = FORK_SERVER.acquire()
out = ctx.Queue()
procs = [ctx.Process(target=report_prebuilt, args=(path, s, texts, out)) for s in (True, False)]
for p in procs:
    p.start()
got = [out.get(timeout=120) for _ in procs]
for p in procs:
    p.join(30)
FORK_SERVER.release(reap=True)
print(json.dumps({"forked": forked, "got": got}))
"""


@needs_dolma2
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_fork_server_forked_from_the_command_builds_the_engine_ahead_for_its_workers(monkeypatch):
    """The command line forks its fork server from its own process once it has imported the
    workers' modules (``entry.start_workers_early``): that server builds the reference engine
    ahead as a spawned one does, and its workers take it and encode exactly as a fresh build."""
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run(
        [sys.executable, "-c", _FORKED_SERVER_PREBUILDS, str(DOLMA2), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.splitlines()[-1])
    assert seen["forked"]
    results = {g[0]: g[1:] for g in seen["got"]}
    for special in (True, False):
        had, left, ids, offsets = results[special]
        assert (had, left) == (1, 0)  # found it, took it
        assert (ids, offsets) == _reference_ids(special)
    assert "parallelism" not in r.stderr


@needs_dolma2
def test_a_tokenizer_takes_the_engine_built_ahead_only_for_its_very_json(tmp_path, monkeypatch, no_prebuilt):
    src = tokenize.load_tokenizer_source(str(DOLMA2))
    info = tokenize.checked_info(src, engine="tokenizers")  # the coordinator's check
    tokenize.forget_probed()
    monkeypatch.setenv(tokcache.PREBUILD_ENV, str(DOLMA2))
    tokenize.prebuild_reference()
    assert tokcache.PREBUILD_ENV not in os.environ and len(tokenize._PREBUILT) == 1
    built = tokenize._PREBUILT[0][1]
    other = tmp_path / "tokenizer.json"
    other.write_text(readme_bpe_json())
    small = tokenize.SubwordTokenizer(tokenize.load_tokenizer_source(str(other)), engine="tokenizers")
    assert small._reference() is not built and not tokenize._PREBUILT  # not its JSON: let go
    monkeypatch.setenv(tokcache.PREBUILD_ENV, str(DOLMA2))
    tokenize.prebuild_reference()
    built = tokenize._PREBUILT[0][1]
    # A worker's tokenizer: built from what the coordinator checked (no probe of its own).
    spec = tokenize.TokenizerSpec("subword", src, info.eos_token_id, False, "tokenizers", 1000, info)
    worker = spec.build()
    assert worker._reference() is built and not tokenize._PREBUILT
    assert built.encode_special_tokens is False


@needs_dolma2
def test_a_worker_holds_its_engine_to_its_end(tmp_path, mirror, no_prebuilt):
    """Freeing dolma2's reference engine took 50-60 ms at the end of every worker process, which
    then ends with os._exit anyway: the worker keeps its tokenizer, engine built, past its loop."""
    out = tmp_path / "o"
    p = bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.2, include=["data/common_crawl/*"])
    src = tokenize.load_tokenizer_source(str(DOLMA2))
    info = tokenize.checked_info(src, engine="tokenizers")
    tokenize.forget_probed()
    tok = tokenize.TokenizerSpec("subword", src, info.eos_token_id, True, "tokenizers", 1000, info)
    spec = worker_spec(out, p, mirror.endpoint, tok, info.eos_token_id)
    inbox: queue.Queue[Any] = queue.Queue()
    outbox: queue.Queue[Any] = queue.Queue()
    worker = Worker(0, spec, inbox.get, outbox.put)
    inbox.put(messages.FileTask(0))
    inbox.put(messages.Stop())  # after its file
    worker.run()
    sent = [type(outbox.get_nowait()) for _ in range(outbox.qsize())]
    assert messages.Staged in sent and sent[-1] is messages.Exit
    assert worker._tokenizer is not None and worker._tokenizer._hf_obj is not None


@pytest.mark.parametrize("content", ["not json", '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}'])
def test_a_file_the_engine_refuses_is_not_built_ahead_and_says_nothing(
    tmp_path, monkeypatch, capfd, content, no_prebuilt
):
    bad = tmp_path / "tokenizer.json"
    bad.write_text(content)
    monkeypatch.setenv(tokcache.PREBUILD_ENV, str(bad))
    tokenize.prebuild_reference()
    assert not tokenize._PREBUILT
    assert capfd.readouterr().err == ""  # the run itself says what is wrong with a tokenizer, once


def test_the_json_a_hub_identifier_gave_is_kept_for_the_next_run(tmp_path, monkeypatch):
    assert tokcache.json_to_prebuild("allenai/dolma2-tokenizer") is None  # nothing yet
    tokcache.remember_json("allenai/dolma2-tokenizer", '{"a": "é"}')
    kept = tokcache.json_to_prebuild("allenai/dolma2-tokenizer")
    assert kept is not None and kept.read_text(encoding="utf-8") == '{"a": "é"}'
    assert tokcache.json_to_prebuild("someone/else") is None
    tokcache.remember_json("allenai/dolma2-tokenizer", '{"a": "b"}')  # the repo changed: the copy follows
    assert kept.read_text(encoding="utf-8") == '{"a": "b"}'
    # A local file is built from as it is, and never copied.
    local = tmp_path / "tok"
    local.mkdir()
    (local / "tokenizer.json").write_text("{}")
    assert tokcache.json_to_prebuild(str(local)) == local / "tokenizer.json"
    before = sorted(p.name for p in kept.parent.iterdir())
    tokcache.remember_json(str(local), "{}")
    assert sorted(p.name for p in kept.parent.iterdir()) == before
    monkeypatch.setenv("BOLMO_ASYNC_CACHE", "")  # nothing remembered
    assert tokcache.json_to_prebuild("allenai/dolma2-tokenizer") is None


@pytest.mark.parametrize(
    ("argv", "want"),
    [
        (["prepare", "-o", "out", "--processes", "2"], (2, "out", "byte", None)),
        (["-v", "prepare", "--output-dir=out", "--processes=4", "--tokenizer", "subword"], (4, "out", "subword", None)),
        (
            ["--scratch-dir", "s", "fetch", "-o", "o", "--tokenizer-processes", "2", "--tokenizer-identifier", "x/y"],
            (2, "o", "byte", "x/y"),
        ),
        (["prepare", "-o", "out"], (0, "out", "byte", None)),  # --processes 0: one per core
        (["fetch", "-o", "out", "--processes", "2", "--ray"], None),
        (["prepare", "-o", "out", "--processes", "2", "--help"], None),
        (["finalize", "-o", "out", "--processes", "2"], None),
        (["prepare", "-o", "out", "--processes", "two"], None),  # typer says what is wrong
        (["prepare", "--", "-o", "out", "--processes", "2"], None),
    ],
)
def test_the_entry_point_reads_only_what_starts_the_workers(argv, want):
    assert early_workers(argv) == want

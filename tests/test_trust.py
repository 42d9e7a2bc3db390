"""Trust: what the tool writes is right, complete and readable by others, and its state never lies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import bolmo_async
from bolmo_async.errors import BolmoError, StateError
from bolmo_async.mirror import MirrorRepo, MirrorThread
from bolmo_async.outdir import open_output, staged_name

from .helpers import cli, finish, is_fork_server, shard_hashes, worker_processes

FRACTION = 0.3
BOUND = 60_000


def _prepare(out: Path, endpoint: str, **kw):
    return bolmo_async.prepare(
        out, endpoint=endpoint, data_fraction=FRACTION, max_tokens_per_file=BOUND, progress=False, **kw
    )


@pytest.fixture(scope="module")
def clean(repos, tmp_path_factory):
    with MirrorThread(repos) as m:
        return shard_hashes(_prepare(tmp_path_factory.mktemp("clean") / "o", m.endpoint))


def _flip(path: Path, offset: int, n: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_staging_is_caught_refetched_and_never_finalized(repos, tmp_path, clean):
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        _prepare(out, m.endpoint)
        plan = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        victims = [Path(open_output(out).ref(staged_name(pf.key))) for pf in plan.files[:2]]
        _flip(victims[0], victims[0].stat().st_size // 2)  # one bit pattern in the middle
        _flip(victims[1], 200, 1000)  # 1000 bytes: enough to crash a reader that trusted it
        before = (out / "data_sources.txt").read_text()
        with pytest.raises(StateError, match="no longer match") as info:
            bolmo_async.finalize(out)
        assert plan.files[0].path in str(info.value) and "fetch" in str(info.value)
        assert (out / "data_sources.txt").read_text() == before  # a failed finalize leaves the output alone
        # A rerun fetches exactly the damaged files again and gives the clean shards.
        manifest = _prepare(out, m.endpoint)
    assert manifest["complete"] and shard_hashes(manifest) == clean


def test_a_damaged_kept_download_is_fetched_again(repos, tmp_path, clean):
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        _prepare(out, m.endpoint, streaming=False)
        raws = sorted(p for p in (out / "raw").rglob("*") if p.is_file())
        assert raws
        _flip(raws[0], 10)
        shutil.rmtree(out / "staging")  # force the raw files to be used again
        manifest = _prepare(out, m.endpoint, streaming=False)
        cdn = list(m.cdn_requests)
    assert shard_hashes(manifest) == clean
    assert cdn, "the damaged raw file was downloaded again"


def test_outputs_get_the_modes_an_ordinary_open_would(repos, tmp_path):
    old = os.umask(0o022)
    try:
        with MirrorThread(repos) as m:
            out = tmp_path / "o"
            _prepare(out, m.endpoint, tokenizer="byte")
    finally:
        os.umask(old)
    for name in ("data_sources.txt", "manifest.json", "plan.json", "run.json"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    for p in [*out.glob("bolmo_data_*"), *(out / "staging").glob("*.arrow"), *(out / "staging").glob("*.json")]:
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_inspect_checks_the_folder_it_is_given(repos, tmp_path):
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        _prepare(out, m.endpoint)
    assert bolmo_async.inspect(out)["problems"] == []
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = sorted(copy.glob("bolmo_data_*.npy"))[0]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 2)
    problems = bolmo_async.inspect(copy)["problems"]
    assert any(shard.name in p and "not a whole number" in p for p in problems)
    assert any("points outside" in p and "finalize" in p for p in problems)
    moved = tmp_path / "moved"
    out.rename(moved)
    problems = bolmo_async.inspect(moved)["problems"]
    assert len(problems) == 1 and "points outside" in problems[0]
    bolmo_async.finalize(moved)  # rewrites data_sources.txt for the new place
    assert bolmo_async.inspect(moved)["problems"] == []
    assert all(line.startswith(str(moved)) for line in (moved / "data_sources.txt").read_text().splitlines())
    with pytest.raises(StateError, match="does not exist"):
        bolmo_async.inspect(tmp_path / "nowhere")


def test_finalize_remembers_the_layout(repos, tmp_path):
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        first = _prepare(out, m.endpoint)
    assert len(first["shards"]) > 2
    again = bolmo_async.finalize(out)  # no bound given: the folder's own
    assert again["max_tokens_per_file"] == BOUND and shard_hashes(again) == shard_hashes(first)
    other = bolmo_async.finalize(out, max_tokens_per_file=10**9)
    assert len(other["shards"]) == 1


def test_a_failed_rerun_never_makes_a_finished_output_worse(repos, tmp_path):
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        _prepare(out, m.endpoint)
        endpoint = m.endpoint
    before = (out / "data_sources.txt").read_text()
    with pytest.raises(BolmoError):  # the mirror is gone: the listing fails
        _prepare(out, endpoint, retries=1)
    assert (out / "data_sources.txt").read_text() == before


def test_a_folder_moves_to_an_endpoint_listing_the_same_files_and_the_token_goes_only_there(
    repos, tmp_path, monkeypatch
):
    """A mirror restarted on another port (or the Hub instead of a mirror of it) serves the same
    pinned commit: the folder goes on from it, no --force, no refetch. The listing that checks this
    goes to this run's endpoint, and the token with it: never to the endpoint plan.json names."""
    out = tmp_path / "o"
    with MirrorThread(repos) as first:
        bolmo_async.plan(out, endpoint=first.endpoint, data_fraction=FRACTION)
        monkeypatch.setenv("HF_TOKEN", "hf_never_to_the_planned_endpoint")
        planned_requests = len(first.hub_requests)
        with MirrorThread(repos) as moved:
            report = bolmo_async.fetch(out, endpoint=moved.endpoint, progress=False)
        assert len(first.hub_requests) == planned_requests and not first.cdn_requests
    assert report["fetched_now"] > 0 and moved.hub_authorized > 0 and moved.cdn_requests
    assert json.loads((out / "plan.json").read_text())["endpoint"] == first.endpoint  # shares agree on it
    done = bolmo_async.finalize(out, max_tokens_per_file=BOUND)
    with MirrorThread(repos) as m:
        assert shard_hashes(done) == shard_hashes(_prepare(tmp_path / "ref", m.endpoint))


def test_a_folder_refuses_an_endpoint_that_lists_other_files(repos, sample_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(sample_dir, other)
    next(p for p in sorted(other.rglob("*")) if p.is_file() and ".git" not in p.parts).unlink()
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        planned = m.endpoint
    with MirrorThread([MirrorRepo(repos[0].repo_id, other)]) as m:
        for run in (
            lambda: bolmo_async.fetch(out, endpoint=m.endpoint, progress=False),
            lambda: bolmo_async.prepare(out, endpoint=m.endpoint, data_fraction=FRACTION, progress=False),
            lambda: bolmo_async.prepare(out, endpoint=m.endpoint, data_fraction=FRACTION / 2, progress=False),
        ):
            with pytest.raises(StateError, match="planned against") as info:
                run()
            assert planned in str(info.value) and m.endpoint in str(info.value) and "force=True" in str(info.value)


def test_an_edited_plan_is_detected(repos, tmp_path):
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        data = json.loads((out / "plan.json").read_text())
        data["files"] = data["files"][:1]
        (out / "plan.json").write_text(json.dumps(data))
        with pytest.raises(StateError, match="digest"):
            bolmo_async.fetch(out, endpoint=m.endpoint, progress=False)


def test_every_shard_ends_with_eos_when_documents_are_cut(repos, tmp_path):
    """Subword or byte, a document longer than the bound is cut into pieces that each end with
    EOS; read as the trainer reads (raw memmap, EOS boundaries) every shard stands alone."""
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        manifest = bolmo_async.prepare(
            out, endpoint=m.endpoint, data_fraction=FRACTION, max_tokens_per_file=700, progress=False
        )
    from bolmo_async.inspector import read_index

    cut = 0
    for s in manifest["shards"]:
        arr = np.memmap(s["path"], dtype=np.uint32, mode="r")
        rows = read_index(s["csv"])
        assert arr[-1] == 1 and len(arr) <= 700
        assert [e - 1 for _, e, _, _, _ in rows] == np.flatnonzero(arr == 1).tolist()
        cut += sum(1 for r in rows if r[1] - r[0] == 700)
    assert cut > 0, "some document was cut"


def test_a_script_without_a_main_guard_gets_the_fix(repos, tmp_path):
    with MirrorThread(repos) as m:
        script = tmp_path / "no_guard.py"
        script.write_text(
            textwrap.dedent(
                f"""
                import bolmo_async
                bolmo_async.prepare({str(tmp_path / "o")!r}, endpoint={m.endpoint!r}, data_fraction=0.1,
                                    progress=False, processes=2)
                """
            )
        )
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0
        assert '__name__ == "__main__"' in r.stderr and "processes=1" in r.stderr
        script.write_text(script.read_text().replace("processes=2", "processes=1"))
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
@pytest.mark.parametrize("when", ["starting", "running"])
def test_workers_die_with_a_killed_coordinator(repos, tmp_path, when, method):
    """kill -9 of the coordinator while its workers are still starting (the fork server importing,
    or spawned workers importing, before any spec) or in the middle of their files: none of its
    processes (workers, fork server) outlives it."""
    import psutil

    from bolmo_async.mirror import FaultConfig

    faults = FaultConfig(rate=1.0, seed=0, kinds=("stall",), stall_seconds=4)
    out = tmp_path / "o"
    with MirrorThread(repos, faults=faults) as m:
        proc = subprocess.Popen(
            cli("fetch", "-o", str(out), "--endpoint", m.endpoint, "--data-fraction", "1", "--processes", "2"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "BOLMO_ASYNC_START_METHOD": method},
        )
        try:
            deadline = time.monotonic() + 30
            children: list = []
            coordinator = psutil.Process(proc.pid)
            marker = "spawn_main" if method == "spawn" else "forkserver"

            def cmdline(p: psutil.Process) -> str:  # "" once it is gone
                try:
                    return " ".join(p.cmdline())
                except psutil.Error:
                    return ""

            while time.monotonic() < deadline:
                time.sleep(0.02)
                children = coordinator.children(recursive=True)
                # (a child shows its own command line once it has exec'd: before, a copy of ours)
                starting = any(
                    is_fork_server(coordinator, c) if method == "forkserver" else marker in cmdline(c) for c in children
                )
                if when == "starting" and starting:
                    break
                if when == "running" and len(worker_processes(coordinator)) >= 2 and (out / "run.json").exists():
                    time.sleep(1.0)
                    children = coordinator.children(recursive=True)
                    break
            assert any(
                is_fork_server(coordinator, c) if method == "forkserver" else marker in cmdline(c) for c in children
            )
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            _, alive = psutil.wait_procs(children, timeout=20)
            assert alive == []
        finally:
            if proc.poll() is None:
                proc.kill()


def test_a_worker_killed_while_writing_shards_leaves_no_temporaries_behind(mirror, tmp_path):
    """kill -9 of a worker while it writes the shards of the file it stages (and stages files):
    the run fails its files (rerun resumes), and the temporaries that worker left, up to a file's
    whole shards, are removed when its loss is seen, not only by the next run."""
    import re

    out = tmp_path / "o"
    args = ("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "1")
    proc = subprocess.Popen(
        cli(*args, "--processes", "2", "--max-tokens-per-file", "50000", "--no-progress"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid = None
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        names = [n for n in (os.listdir(out) if out.is_dir() else []) if re.match(r"^\.bolmo_data.*\.tmp$", n)]
        if names:
            pid = int(re.search(r"\.(\d+)-[0-9a-f]{8}-[0-9a-f]{8}\.tmp$", names[0]).group(1))  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    _, err = finish(proc, 120)
    if pid is None:
        pytest.skip("the run ended before a shard was written ahead (nothing to kill)")
    # Exit 1: the worker's files failed (rerun resumes). Exit 0 only when the kill found it holding
    # no file but the streamed shard, which another worker then wrote whole (test_stream): the run is
    # complete. Either way its loss is named and its temporaries are gone.
    assert proc.returncode in (0, 1), err
    if proc.returncode == 0:
        assert json.loads((out / "manifest.json").read_text())["complete"], err
    assert f"(pid {pid}) was killed by SIGKILL" in err and "Traceback" not in err
    left = [n for d in (out, out / "staging") for n in os.listdir(d) if f".{pid}-" in n]
    assert left == []


@pytest.mark.parametrize("how", ["--endpoint", "HF_ENDPOINT"])
def test_an_endpoint_carrying_a_password_is_refused_without_saying_it(mirror, tmp_path, how):
    """`--endpoint http://user:PASSWORD@host` (or HF_ENDPOINT): the endpoint is said back in
    progress lines and errors and written into plan.json, so the password went wherever the
    endpoint is named. Refused in one line that names the fix and never says the password."""
    secret = "s3cr3t-pw-9f2c"
    host = mirror.endpoint.removeprefix("http://")
    url = f"http://someone:{secret}@{host}"
    env = {**os.environ, "HF_ENDPOINT": url} if how == "HF_ENDPOINT" else None
    args = ["--endpoint", url] if how == "--endpoint" else []
    r = subprocess.run(
        cli("prepare", "-o", str(tmp_path / "o"), *args, "--data-fraction", "0.05", "--no-progress"),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert secret not in r.stdout + r.stderr and "HF_TOKEN" in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (tmp_path / "o" / "plan.json").exists()

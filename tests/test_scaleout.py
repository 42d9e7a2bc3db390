"""Scale-out: --worker I/N shares of one plan, run at once against one folder."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bolmo_async
from bolmo_async.errors import StateError, UsageError
from bolmo_async.mirror import FaultConfig, MirrorThread
from bolmo_async.models import RepoFile
from bolmo_async.outdir import open_output
from bolmo_async.planner import assign_workers, load_plan, make_plan, parse_worker, save_plan, share_files
from bolmo_async.staging import Staging

from .conftest import DOLMA2, needs_dolma2
from .helpers import cli, finish, readme_bpe_json, run_cli, shard_hashes

FRACTION = 0.6


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 10_000), min_size=1, max_size=60), st.integers(1, 9))
def test_assignment_is_a_balanced_stable_partition(sizes, n):
    files = [RepoFile(f"s{i % 3}/f{i:03d}.jsonl.zst", size, "o") for i, size in enumerate(sizes)]
    plan = make_plan(
        files, data_fraction=1.0, seed=1, repo_id="a/b", revision="main", commit="0" * 40, listing_digest="x"
    )
    shares = assign_workers(plan, n)
    assert shares == assign_workers(plan, n)  # stable
    flat = [f.path for share in shares for f in share]
    assert sorted(flat) == sorted(f.path for f in plan.files)  # a partition
    order = {f.path: i for i, f in enumerate(plan.files)}
    for share in shares:
        assert [order[f.path] for f in share] == sorted(order[f.path] for f in share)  # plan order kept
    loads = [sum(f.planned_bytes for f in share) for share in shares]
    assert max(loads) - min(loads) <= max(f.planned_bytes for f in plan.files)  # greedy balance bound


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=40), st.integers(1, 70))
def test_the_split_is_the_greedy_one_over_every_share_whatever_n(sizes, n):
    """``_owners`` keeps a heap of only the shares that can own a file (at most one per file):
    the same split as the greedy choice over all ``n`` shares (written out here), shares beyond
    the files (n > files: a job array larger than the plan) empty."""
    files = [RepoFile(f"s{i % 3}/f{i:03d}.jsonl.zst", size, "o") for i, size in enumerate(sizes)]
    plan = make_plan(
        files, data_fraction=1.0, seed=1, repo_id="a/b", revision="main", commit="0" * 40, listing_digest="x"
    )
    loads, want = [0] * n, {}
    for f in sorted(plan.files, key=lambda f: (-f.planned_bytes, f.path)):
        w = min(range(n), key=lambda k: (loads[k], k))
        want[f.path] = w
        loads[w] += f.planned_bytes
    shares = assign_workers(plan, n)
    assert len(shares) == n
    assert {f.path: i for i, share in enumerate(shares) for f in share} == want
    assert all(share_files(plan, n, i) == shares[i] for i in range(n))


def test_a_share_of_a_huge_job_array_is_found_without_a_pass_over_every_share(tmp_path):
    """``--worker 5/1000000000`` (a typo, or N from the wrong variable): its files, and finalize's
    naming of missing shares, without N time or memory (they took minutes, and N memory, in
    every share, finalize and inspect)."""
    from bolmo_async.planner import missing_shares, record_shares

    files = [RepoFile(f"s/f{i:03d}.jsonl.zst", 1000 + i, "o") for i in range(50)]
    plan = make_plan(
        files, data_fraction=1.0, seed=1, repo_id="a/b", revision="main", commit="0" * 40, listing_digest="x"
    )
    n = 10**9
    assert share_files(plan, n, 5) == [f for f in plan.files if f.path == "s/f044.jsonl.zst"]  # 6th largest
    assert share_files(plan, n, 10**8) == []
    out = open_output(tmp_path / "o")
    out.create()
    save_plan(plan, out)
    record_shares(out, plan, n)
    assert missing_shares(out, plan, ["s/f049.jsonl.zst", "s/f000.jsonl.zst"]) == (n, {0: 1, 49: 1})


@pytest.mark.parametrize("bad", ["1", "2/2", "-1/3", "a/b", "0/0"])
def test_bad_worker_spec(bad):
    with pytest.raises(UsageError, match="I/N"):
        parse_worker(bad)


def test_a_share_numbered_from_one_is_told_shares_count_from_zero():
    """`sbatch --array=1-16` with --worker $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT: the last
    task is refused with the message's own Slurm advice, while share 0 is never run by any task."""
    with pytest.raises(UsageError, match=r"I counts from 0.*--array=0-15.*SLURM_ARRAY_TASK_ID - 1"):
        parse_worker("16/16")
    with pytest.raises(UsageError) as other:
        parse_worker("17/16")
    assert "counts from 0" not in str(other.value)


def test_workers_need_a_plan_first(tmp_path, mirror):
    with pytest.raises(StateError, match="bolmo-async plan"):
        bolmo_async.fetch(tmp_path / "o", endpoint=mirror.endpoint, worker=(0, 2), progress=False)


def _worker_cmd(out, endpoint, i, n):
    return [
        sys.executable,
        "-m",
        "bolmo_async",
        "fetch",
        "--output-dir",
        str(out),
        "--endpoint",
        endpoint,
        "--worker",
        f"{i}/{n}",
        "--no-progress",
        "--concurrency",
        "2",
    ]


@pytest.mark.slow
def test_two_workers_at_once_then_finalize_equals_single_run(repos, tmp_path):
    with MirrorThread(repos) as m:
        single = bolmo_async.prepare(tmp_path / "single", endpoint=m.endpoint, data_fraction=FRACTION, progress=False)
        out = tmp_path / "shared"
        bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        procs = [
            subprocess.Popen(_worker_cmd(out, m.endpoint, i, 2), stderr=subprocess.PIPE, text=True) for i in range(2)
        ]
        for p in procs:
            _, err = finish(p, 300)
            assert p.returncode == 0, err
        manifest = bolmo_async.finalize(out)
    assert manifest["complete"]
    assert shard_hashes(manifest) == shard_hashes(single)


@pytest.mark.slow
def test_killed_worker_rerun_completes_and_finalize_waits_for_it(repos, tmp_path):
    with MirrorThread(repos) as m:
        single = bolmo_async.prepare(tmp_path / "single", endpoint=m.endpoint, data_fraction=FRACTION, progress=False)
    # Share 1's bodies trickle until it is killed: it is always caught holding a file.
    faults = FaultConfig(rate=1.0, kinds=("trickle",), trickle_delay=0.2, max_per_path=10**6)
    with MirrorThread(repos, faults=faults) as m:
        out = tmp_path / "shared"
        plan = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        share1 = {f.path for f in assign_workers(plan, 3)[1]}
        faults.only = tuple(share1)
        # Worker 1 is killed outright (SIGKILL: no clean-up at all) while it downloads a file.
        victim = subprocess.Popen(_worker_cmd(out, m.endpoint, 1, 3), stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not faults.injected.get("trickle"):
            assert victim.poll() is None and time.monotonic() < deadline, "share 1 never started a download"
            time.sleep(0.01)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        faults.rate = 0.0
        for i in (0, 2):
            r = subprocess.run(_worker_cmd(out, m.endpoint, i, 3), capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, r.stderr
        staging = Staging(open_output(out))
        missing = sorted(pf.path for pf in plan.files if pf.path in share1 and staging.done(pf) is None)
        assert missing  # the killed share left work undone, always
        with pytest.raises(StateError) as info:
            bolmo_async.finalize(out)
        assert all(path in str(info.value) for path in missing[:20])
        r = subprocess.run(_worker_cmd(out, m.endpoint, 1, 3), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        manifest = bolmo_async.finalize(out)
    assert manifest["complete"] and shard_hashes(manifest) == shard_hashes(single)
    assert not [p for p in (out / "staging").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_overlapping_shares_both_finish_once_the_share_is_staged(repos, tmp_path):
    """The same share started twice at once (a job array retry): both exit 0, and say so."""
    with MirrorThread(repos) as m:
        single = bolmo_async.prepare(tmp_path / "single", endpoint=m.endpoint, data_fraction=FRACTION, progress=False)
    faults = FaultConfig(rate=1.0, kinds=("trickle",), trickle_delay=0.05, max_per_path=10**6)
    with MirrorThread(repos, faults=faults) as m:
        out = tmp_path / "shared"
        bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        procs = [
            subprocess.Popen(
                _worker_cmd(out, m.endpoint, 0, 2), stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            for _ in range(2)
        ]
        outs = [finish(p, 300) for p in procs]
        for p, (so, se) in zip(procs, outs, strict=True):
            assert p.returncode == 0, se
            assert "Share 0/2 is done" in so
        r = subprocess.run(_worker_cmd(out, m.endpoint, 1, 2), capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        manifest = bolmo_async.finalize(out)
    assert manifest["complete"] and shard_hashes(manifest) == shard_hashes(single)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bolmo_async", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"},
    )


@pytest.mark.slow
def test_ray_local_cluster_gives_identical_shards(repos, tmp_path):
    pytest.importorskip("ray", reason="the [ray] extra is installed by `make test`; without it this cannot run")
    with MirrorThread(repos) as m:
        single = bolmo_async.prepare(tmp_path / "single", endpoint=m.endpoint, data_fraction=FRACTION, progress=False)
        out = tmp_path / "ray"
        r = _cli(
            "fetch",
            "--output-dir",
            str(out),
            "--endpoint",
            m.endpoint,
            "--data-fraction",
            str(FRACTION),
            "--ray",
            "--ray-tasks",
            "3",
            "--no-progress",
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert "Ray" in r.stdout
        local = bolmo_async.finalize(out, max_tokens_per_file=120_000)
        r = _cli("finalize", "--output-dir", str(out), "--ray", "--max-tokens-per-file", "120000")
        assert r.returncode == 0, r.stderr[-3000:]
        with_ray = json.loads((out / "manifest.json").read_text())
    assert len(local["shards"]) > 2 and shard_hashes(with_ray) == shard_hashes(local)
    assert shard_hashes(bolmo_async.finalize(out, max_tokens_per_file=100_000_000)) == shard_hashes(single)


def test_ray_missing_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *a, **k):
        level = a[3] if len(a) > 3 else k.get("level", 0)
        if name == "ray" and level == 0:  # Ray itself, not our executors.ray
            raise ImportError("No module named 'ray'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UsageError, match=r"bolmo-async\[ray\]"):
        bolmo_async.fetch(tmp_path, ray=True)


def _slow(repos) -> MirrorThread:
    """A mirror whose every body trickles: a run lasts a few seconds, long enough to meet it."""
    return MirrorThread(repos, faults=FaultConfig(rate=1.0, kinds=("trickle",), trickle_delay=0.1, max_per_path=10**6))


def _wait_for(path, proc, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_finalize_while_shares_run_says_to_wait_for_them(repos, tmp_path):
    """finalize (or prepare, fetch) while `fetch --worker` shares run: told the shares are running
    and that it runs once they have ended, not "use another --output-dir" (the shares' own folder)."""
    out = tmp_path / "o"
    with _slow(repos) as m:
        assert run_cli("plan", "-o", str(out), "--endpoint", m.endpoint, "--data-fraction", "0.3").returncode == 0
        share = subprocess.Popen(
            cli("fetch", "-o", str(out), "--endpoint", m.endpoint, "--worker", "0/2", "--no-progress"),
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _wait_for(out / "run.json", share)
            r = run_cli("finalize", "--output-dir", str(out))
            assert share.poll() is None, "the share must still run for this test to mean anything"
        finally:
            share.kill()
            finish(share, 60)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "`fetch --worker` shares are running" in last and "--output-dir" not in last, last


@pytest.mark.slow
def test_a_second_run_in_a_busy_folder_is_refused_at_once(repos, tmp_path):
    """Two runs in one output folder would stage and write the same files: the second one stops
    at once with a message naming the first; once the first is done, the folder is free again."""
    out = tmp_path / "o"
    with _slow(repos) as m:
        first = subprocess.Popen(
            cli(
                "prepare",
                "--output-dir",
                str(out),
                "--endpoint",
                m.endpoint,
                "--data-fraction",
                str(FRACTION),
                "--no-progress",
            ),
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for(out / "run.json", first)  # planned, tokenizer loaded: fetching
        busy = rf"another bolmo-async run \(process {first.pid}\) is using"
        with pytest.raises(StateError, match=busy):
            bolmo_async.prepare(out, endpoint=m.endpoint, data_fraction=FRACTION, progress=False)
        with pytest.raises(StateError, match=busy):
            bolmo_async.finalize(out)
        with pytest.raises(StateError, match=busy):
            bolmo_async.fetch(out, endpoint=m.endpoint, worker=(0, 2), progress=False)
        r = run_cli("finalize", "--output-dir", str(out))
        assert first.poll() is None, "the first run must still be running for this test to mean anything"
        assert r.returncode != 0 and "another bolmo-async run" in r.stderr and "Traceback" not in r.stderr
        _, err = finish(first, 300)
        assert first.returncode == 0, err
        assert bolmo_async.finalize(out)["complete"]  # released when the run ended


@pytest.mark.slow
def test_worker_shares_run_together_but_no_other_command_beside_them(repos, tmp_path):
    out = tmp_path / "o"
    with _slow(repos) as m:
        bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        w0 = subprocess.Popen(_worker_cmd(out, m.endpoint, 0, 2), stderr=subprocess.PIPE, text=True)
        _wait_for(out / "run.json", w0)
        with pytest.raises(StateError, match="`fetch --worker` shares"):
            bolmo_async.finalize(out)
        assert w0.poll() is None, "worker 0 must still be running for this test to mean anything"
        bolmo_async.fetch(out, endpoint=m.endpoint, worker=(1, 2), progress=False)  # beside worker 0
        _, err = finish(w0, 300)
        assert w0.returncode == 0, err
        assert bolmo_async.finalize(out)["complete"]


def test_overlapping_shares_never_touch_each_others_files(repos, tmp_path):
    """Two runs of overlapping shares (0/2 and 0/3) at once against a slow mirror: no run removes
    or trips over the other's temporaries (a per-file lock); a file held by one is reported by the
    other, clearly; what both leave is consistent and completes to a single run's shards."""
    faults = FaultConfig(rate=1.0, seed=0, kinds=("trickle",), trickle_delay=0.01)
    with MirrorThread(repos) as clean_m:
        single = bolmo_async.prepare(
            tmp_path / "single", endpoint=clean_m.endpoint, data_fraction=FRACTION, progress=False
        )
    out = tmp_path / "shared"
    with MirrorThread(repos, faults=faults) as m:
        bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        args = ["fetch", "-o", str(out), "--endpoint", m.endpoint, "--processes", "1"]
        procs = [
            subprocess.Popen(cli(*args, "--worker", w), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for w in ("0/2", "0/3")
        ]
        results = [finish(p, 300) for p in procs]
        for p, (_, err) in zip(procs, results, strict=True):
            assert p.returncode in (0, 1), err
            assert "unexpected" not in err and "Traceback" not in err, err
            if p.returncode == 1:
                assert "being staged by another bolmo-async run" in err
        r = run_cli(*args)  # the rest of the plan
        assert r.returncode == 0, r.stderr
    assert shard_hashes(bolmo_async.finalize(out, max_tokens_per_file=100_000_000)) == shard_hashes(single)


def test_a_share_accepts_the_plans_own_flags_and_refuses_others(tmp_path, mirror):
    """A job array uses one command line: the plan's own --data-fraction/--seed are accepted,
    another value is refused naming both; the share then says finalize runs once all are staged."""
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.2, seed=7)
    with pytest.raises(UsageError, match=r"--data-fraction 0.5 \(the plan has 0.2\)"):
        bolmo_async.fetch(out, endpoint=mirror.endpoint, worker=(0, 2), data_fraction=0.5, progress=False)
    r = run_cli(
        "fetch", "-o", str(out), "--endpoint", mirror.endpoint, "--worker", "0/2", "--data-fraction", "0.2",
        "--seed", "7", "--processes", "1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Share 0/2 is done" in r.stdout and "Once all shares are staged" in r.stdout


def test_drop_staging_after_a_complete_output(tmp_path, mirror):
    out = tmp_path / "o"
    r = run_cli("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.1")
    assert r.returncode == 0 and "the staging holds" in r.stdout and "--drop-staging" in r.stdout
    m = bolmo_async.finalize(out, drop_staging=True)
    assert not (out / "staging").exists() and m["complete"]
    assert bolmo_async.inspect(out)["problems"] == []


def _closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_a_ray_address_nothing_answers_is_one_line_not_a_hang(mirror, tmp_path, monkeypatch):
    """Ray's own connect retries for minutes, printing its own lines; the address is probed
    first: nothing there, something that is not Ray, RAY_ADDRESS behind `auto`: one line each."""
    pytest.importorskip("ray", reason="the [ray] extra is installed by `make test`")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    port = _closed_port()
    http = mirror.endpoint.rsplit("/", 1)[-1]  # the mirror's HTTP/1 port: answers, but is not Ray
    t0 = time.monotonic()
    for address, expected in [
        (
            f"127.0.0.1:{port}",
            rf"--ray-address 127.0.0.1:{port}: nothing answers at 127.0.0.1:{port} .*ray start --head",
        ),
        (http, rf"--ray-address {http}: {http} answers, but not as a Ray cluster"),
        (f"ray://127.0.0.1:{port}", "nothing answers"),
        ("127.0.0.1", "not a Ray address"),
    ]:
        with pytest.raises(UsageError, match=expected):
            bolmo_async.fetch(out, endpoint=mirror.endpoint, ray=True, ray_address=address, progress=False)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    with pytest.raises(UsageError, match=rf"RAY_ADDRESS=127.0.0.1:{port}: nothing answers.*unset RAY_ADDRESS"):
        bolmo_async.fetch(out, endpoint=mirror.endpoint, ray=True, ray_address="auto", progress=False)
    assert time.monotonic() - t0 < 60
    monkeypatch.delenv("RAY_ADDRESS")
    r = run_cli("fetch", "-o", str(out), "--endpoint", mirror.endpoint, "--ray", "--ray-address", f"127.0.0.1:{port}")
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if not line.startswith("bolmo-async: INFO")]
    assert len(errors) == 1 and errors[0].startswith("error: --ray-address"), r.stderr
    assert not any(Staging(open_output(out)).done(pf) for pf in load_plan(open_output(out)).files)  # nothing ran


@pytest.mark.timeout(120)
def test_ray_is_not_contacted_when_every_file_is_staged(mirror, tmp_path, monkeypatch):
    """A rerun of a finished fetch --ray has nothing for the cluster: no connect at all (the
    address here answers nothing). A damaged staged file is work again, so the cluster is asked."""
    ray = pytest.importorskip("ray", reason="the [ray] extra is installed by `make test`")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "o"
    bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=FRACTION, processes=1, progress=False)
    address = f"127.0.0.1:{_closed_port()}"
    res = bolmo_async.fetch(out, endpoint=mirror.endpoint, ray=True, ray_address=address, progress=False)
    assert res["fetched_now"] == 0 and res["files"] == len(load_plan(open_output(out)).files)
    assert not ray.is_initialized()
    staged = sorted((out / "staging").glob("*.arrow"))
    data = bytearray(staged[0].read_bytes())
    data[-20] ^= 0xFF  # same size, another checksum
    staged[0].write_bytes(bytes(data))
    with pytest.raises(UsageError, match="nothing answers"):
        bolmo_async.fetch(out, endpoint=mirror.endpoint, ray=True, ray_address=address, progress=False)


@needs_dolma2
def test_a_share_whose_tokenizer_cannot_be_had_is_told_the_folders(mirror, tmp_path):
    """A share naming another tokenizer identifier than the folder was fetched with (left out:
    the default Hub repo, which a mirror or an offline node may not have) failed on that repo
    alone; the error now names the flags the folder was fetched with."""
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    bolmo_async.fetch(
        out,
        endpoint=mirror.endpoint,
        worker=(0, 2),
        tokenizer="subword",
        tokenizer_identifier=str(DOLMA2),
        progress=False,
    )
    with pytest.raises(bolmo_async.BolmoError) as info:
        bolmo_async.fetch(
            out,
            endpoint=mirror.endpoint,
            worker=(1, 2),
            tokenizer="subword",
            tokenizer_identifier="allenai/no-such-tok",
        )
    said = str(info.value)
    assert "allenai/no-such-tok not found" in said
    assert f"pass --tokenizer subword --tokenizer-identifier {shlex.quote(str(DOLMA2))} --eos-token-id" in said
    assert "to go on with it" in said


def test_inspect_before_finalize_names_the_step_that_is_missing(mirror, tmp_path):
    """inspect of a folder never finalized said "run finalize", which refuses while planned files
    are not staged: it names the fetch (with the plan's endpoint and the folder's tokenizer) until
    every file is staged, and the finalize then."""
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    n = len(load_plan(open_output(out)).files)
    with pytest.raises(StateError, match=rf"0 of {n} planned file\(s\) are staged: run `bolmo-async fetch "):
        bolmo_async.inspect(out)
    bolmo_async.fetch(out, endpoint=mirror.endpoint, worker=(0, 2), progress=False)
    with pytest.raises(StateError) as info:
        bolmo_async.inspect(out)
    said = str(info.value)  # (the share missing named: the shares' count is recorded)
    assert f"--endpoint {mirror.endpoint} --tokenizer byte --worker 1/2` again to finish them, then finalize" in said
    bolmo_async.fetch(out, endpoint=mirror.endpoint, worker=(1, 2), progress=False)
    with pytest.raises(StateError, match=f"run `bolmo-async finalize --output-dir {out}`"):
        bolmo_async.inspect(out)


@needs_dolma2
def test_a_finalize_too_early_names_the_fetch_that_finishes_it(mirror, tmp_path):
    """The fetch that finalize names with a share missing (refused, or with --allow-incomplete,
    whose finalizing again fetches nothing) runs as printed: with the plan's --endpoint and the
    tokenizer flags the shares fetched with. It left out the tokenizer (a fetch of the default,
    --tokenizer byte, which a subword folder refuses) and, after --allow-incomplete, the endpoint
    too (a fetch from the Hub, which a folder planned against a mirror refuses)."""
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    tok = dict(tokenizer="subword", tokenizer_identifier=str(DOLMA2))
    bolmo_async.fetch(out, endpoint=mirror.endpoint, worker=(0, 2), progress=False, **tok)
    r = run_cli("finalize", "-o", str(out))
    assert r.returncode == 1, r.stderr
    hint = re.search(
        r"They are share 1/2 \(\d+ file\(s\)\) of the job array: run `(bolmo-async fetch [^`]+) --worker 1/2` again",
        r.stderr,
    )
    assert hint, r.stderr
    fetch = hint.group(1)
    assert f"--endpoint {mirror.endpoint}" in fetch
    assert f"--tokenizer subword --tokenizer-identifier {shlex.quote(str(DOLMA2))}" in fetch
    r = run_cli("finalize", "-o", str(out), "--allow-incomplete")
    assert r.returncode == 0, r.stderr
    assert f"`{fetch} --worker 1/2` again to finish them" in r.stdout
    assert "rerun the same command" not in r.stdout and "export DATA_SOURCE" not in r.stdout
    r = run_cli(*shlex.split(fetch)[1:], "--no-progress")  # as printed
    assert r.returncode == 0, r.stderr
    r = run_cli("finalize", "-o", str(out))
    assert r.returncode == 0 and "export DATA_SOURCE" in r.stdout, r.stderr


def test_ray_address_auto_without_a_cluster_is_one_line(tmp_path, monkeypatch):
    """`auto` with no cluster recorded on this machine (and no RAY_ADDRESS): named, before Ray."""
    pytest.importorskip("ray", reason="the [ray] extra is installed by `make test`")
    from bolmo_async.executors.ray import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` records its cluster: nothing here
    with pytest.raises(UsageError, match=r"--ray-address auto: no Ray cluster was started on this machine"):
        cluster_address("auto")
    assert cluster_address(None) == (None, "--ray-address None")  # a local Ray: nothing to probe
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address("auto") == ("10.0.0.1:6379", "RAY_ADDRESS=10.0.0.1:6379")


@pytest.mark.parametrize(("users", "expected"), [(None, "1"), ("3", "3")])
def test_a_ray_task_encodes_on_its_one_cpu_unless_the_user_says_otherwise(users, expected):
    """A Ray task has one CPU (num_cpus=1), but fastokens splits a batch over every core of the
    node by default, each thread with its own 100-200 MB of word caches: 64 tasks on a 64-core
    node held 64 x 64 cache sets. A task now sets one BPE thread before it encodes (as the local
    pool gives each worker its share); a user's own FASTOKENS_BPE_THREADS wins."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "FASTOKENS_BPE_THREADS"}
    if users is not None:
        env["FASTOKENS_BPE_THREADS"] = users
    code = (
        "import os\n"
        "from bolmo_async.executors.ray import run_units\n"
        "try:\n    run_units(None, [])\nexcept Exception:\n    pass\n"  # no spec: it stops at once
        "print(os.environ.get('FASTOKENS_BPE_THREADS'))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.stdout.strip() == expected, r.stderr


def test_shares_starting_together_with_other_tokenizers_never_both_go_on(tmp_path, monkeypatch):
    """Two shares of a fresh plan, one with another tokenizer (here another --eos-token-id), each
    read run.json before either had written it: both found none, both wrote their own and went on
    staging with it (the last write won run.json; the other share's files then counted as not
    staged, and that share was refused on its rerun). The first write is a conditional create, so
    exactly one goes on and the other is refused as a share started after it is."""
    import threading

    from bolmo_async import api
    from bolmo_async.models import TokenizerInfo
    from bolmo_async.outdir import RUN_STATE, LocalDir

    out = LocalDir(tmp_path / "o")
    out.create()
    both_read = threading.Barrier(2, timeout=10)
    first = threading.local()
    real = LocalDir.read_bytes

    def read_bytes(self, name):  # the interleaving of two processes, made certain: both read, then write
        got = real(self, name)
        if name == RUN_STATE and not getattr(first, "done", False):
            first.done = True
            both_read.wait()
        return got

    monkeypatch.setattr(LocalDir, "read_bytes", read_bytes)
    infos = [TokenizerInfo("subword", "t", eos, 100278, "f") for eos in (100257, 5)]
    refused: list[StateError] = []

    def share(info: TokenizerInfo) -> None:
        try:
            api._check_state(out, info, False, share=True)
        except StateError as exc:
            refused.append(exc)

    threads = [threading.Thread(target=share, args=(info,)) for info in infos]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(refused) == 1 and "was fetched with tokenizer" in str(refused[0]), refused
    kept = json.loads(real(out, RUN_STATE))["tokenizer"]
    assert kept in [i.to_json() for i in infos] and f"eos {kept['eos_token_id']}," in str(refused[0])


def test_a_share_refused_for_its_tokenizer_flags_is_told_which_differ(mirror, tmp_path):
    """A share started with a tokenizer flag the others lack (--special-tokens-as-ids, --eos-token-id)
    was refused with both tokenizers described alike ("... (eos 6, fingerprint f) ..., this run uses
    ... (eos 6, fingerprint f)") and only "Use another --output-dir": which flag differs, and the
    command line that goes on with the folder, were left to guess (newuser16). The folder's plan is
    named too: a share pointed at another run's folder is told whose folder it is."""
    tok = tmp_path / "tok.json"
    tok.write_text(readme_bpe_json())
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    subword = {"tokenizer": "subword", "tokenizer_identifier": str(tok), "processes": 1, "progress": False}
    bolmo_async.fetch(out, endpoint=mirror.endpoint, worker=(0, 2), **subword)
    base = (
        "fetch", "-o", str(out), "--endpoint", mirror.endpoint, "--worker", "1/2", "--tokenizer", "subword",
        "--tokenizer-identifier", str(tok), "--processes", "1",
    )  # fmt: skip
    plan_said = f"(its plan: allenai/bolmo_mix, --data-fraction {FRACTION:g}, seed 42)"
    for extra, differs, fix in [
        (
            ["--special-tokens-as-ids"],
            "it was fetched without --special-tokens-as-ids, this run has it",
            f"Fetch with --tokenizer subword --tokenizer-identifier {tok} --eos-token-id 6 and without --special-tokens-as-ids",
        ),
        (
            ["--eos-token-id", "5"],
            "EOS 6 there, 5 here (--eos-token-id)",
            f"Fetch with --tokenizer subword --tokenizer-identifier {tok} --eos-token-id 6",
        ),
    ]:
        r = run_cli(*base, *extra)
        errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert r.returncode == 1 and len(errors) == 1, r.stderr
        assert plan_said in errors[0] and differs in errors[0] and fix in errors[0], errors[0]
        assert "--force" not in errors[0]  # (refused with --worker)
    r = run_cli(*base)
    assert r.returncode == 0, r.stderr


def test_finalize_names_the_shares_that_are_missing(mirror, tmp_path, caplog):
    """finalize (and inspect) said "run the missing --worker shares" without naming one: the number
    of shares was recorded nowhere, and a job array's user had to match file names to shares by
    hand. The first share records it; a share of another split is warned (newuser16)."""
    out = tmp_path / "o"
    plan = bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    owners = assign_workers(plan, 3)
    assert all(owners)  # (every share has files)
    for i in (0, 2):
        bolmo_async.fetch(out, endpoint=mirror.endpoint, worker=(i, 3), processes=1, progress=False)
    with pytest.raises(StateError) as info:
        bolmo_async.finalize(out)
    said = str(info.value)
    assert f"They are share 1/3 ({len(owners[1])} file(s)) of the job array: run `" in said, said
    assert "--worker 1/3` again to finish them" in said
    assert "0/3" not in said and "2/3" not in said
    with pytest.raises(StateError, match=r"share 1/3 .*--worker 1/3"):
        bolmo_async.inspect(out)
    with caplog.at_level("WARNING"):
        bolmo_async.fetch(out, endpoint=mirror.endpoint, worker=(0, 2), processes=1, progress=False)
    assert any("--worker I/3" in r.getMessage() and "0/2" in r.getMessage() for r in caplog.records), caplog.text
    bolmo_async.fetch(out, endpoint=mirror.endpoint, worker=(1, 3), processes=1, progress=False)
    assert bolmo_async.finalize(out)["complete"]


def test_the_fetch_finalize_names_keeps_the_shares_eos_token_id(mirror, tmp_path):
    """Shares fetched with --eos-token-id (not the tokenizer's own EOS): the fetch that finalize and
    inspect name for the missing share left it out, so the command as printed was refused ("EOS 5
    there, 6 here (--eos-token-id)"). Whether the EOS was chosen is not recorded: it is always said."""
    tok = tmp_path / "tok.json"
    tok.write_text(readme_bpe_json())
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    bolmo_async.fetch(
        out, endpoint=mirror.endpoint, worker=(0, 2), tokenizer="subword", tokenizer_identifier=str(tok),
        eos_token_id=5, processes=1, progress=False,
    )  # fmt: skip
    for step in ("finalize", "inspect"):
        r = run_cli(step, "-o", str(out))
        hint = re.search(r"run `(bolmo-async fetch [^`]+ --worker 1/2)` again", r.stderr)
        assert r.returncode == 1 and hint, r.stderr
    r = run_cli(*shlex.split(hint.group(1))[1:], "--processes", "1", "--no-progress")  # as printed
    assert r.returncode == 0, r.stderr
    assert bolmo_async.finalize(out)["complete"]


def test_shares_of_two_splits_after_a_new_plan_are_told_they_overlap(mirror, tmp_path):
    """A plan of other files (another --data-fraction, no --force: the staging is kept) left the
    shares.json of the previous plan: every share of the new job array found a record not of its
    plan, its conditional create refused, and wrote its own N over it unconditionally, so shares of
    two splits started at once (I/3 and I/4) were never told that they overlap (the last one wins)."""
    from bolmo_async.outdir import SHARES
    from bolmo_async.planner import record_shares, recorded_shares

    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    bolmo_async.fetch(out, endpoint=mirror.endpoint, worker=(0, 2), processes=1, progress=False)
    assert (out / SHARES).exists()
    for k in range(6):
        plan = bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=(0.3, 0.5)[k % 2])
        assert not (out / SHARES).exists()  # (the previous plan's record goes with it)
        start = threading.Barrier(2)
        told: dict[int, int | None] = {}

        def share(n: int, plan: Any = plan, start: Any = start, told: Any = told) -> None:
            o = open_output(out)
            start.wait()
            told[n] = record_shares(o, plan, n)

        threads = [threading.Thread(target=share, args=(n,)) for n in (3, 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        kept = recorded_shares(open_output(out), plan)
        assert kept in (3, 4) and told == {kept: None, 7 - kept: kept}, (k, kept, told)


def test_a_share_the_folder_refuses_records_no_split(mirror, tmp_path):
    """A share pointed at a folder fetched with another tokenizer (another run's folder) is
    refused; it recorded its N in that folder's shares.json first, so the folder's finalize then
    named shares of a job array that never ran there."""
    from bolmo_async.outdir import SHARES

    out = tmp_path / "o"
    bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=0.05, processes=1, progress=False)
    (tmp_path / "tok.json").write_text(readme_bpe_json())
    with pytest.raises(StateError):
        bolmo_async.fetch(
            out, endpoint=mirror.endpoint, worker=(0, 3), tokenizer="subword",
            tokenizer_identifier=str(tmp_path / "tok.json"), processes=1, progress=False,
        )  # fmt: skip
    assert not (out / SHARES).exists()
    bolmo_async.fetch(out, endpoint=mirror.endpoint, worker=(0, 3), processes=1, progress=False)
    assert (out / SHARES).exists()  # (a share it takes records its split)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sigterm_stops_a_ray_fetch_as_it_stops_any_run(repos, tmp_path, monkeypatch):
    """A scheduler's SIGTERM (scancel, a preempted node) to `fetch --ray`: the same stop as
    without Ray, exit 143 and the one line naming the resume. ``ray.init`` put its own SIGTERM
    handler in (``sys.exit(15)``) and Ray's core one printed a stack dump: exit 1, no stop line."""
    pytest.importorskip("ray", reason="the [ray] extra is installed by `make test`")
    from bolmo_async.mirror import WanConfig

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "o"
    with MirrorThread(repos, wan=WanConfig(link_rate=100_000)) as m:  # files still coming when it stops
        cmd = [sys.executable, "-m", "bolmo_async", "fetch", "-o", str(out), "--endpoint", m.endpoint]
        proc = subprocess.Popen(
            [*cmd, "--data-fraction", str(FRACTION), "--ray", "--ray-tasks", "2", "--no-progress"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"},
        )
        assert proc.stderr is not None
        seen: list[str] = []
        for line in proc.stderr:  # until the tasks are submitted: Ray is up, its handlers set
            seen.append(line)
            if "ray: 2 task(s)" in line:
                break
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, rest = finish(proc, 120)
    err = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted (SIGTERM)" in err and "resume" in err, err
    assert "SIGTERM received" not in err, err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_resumed_ray_fetch_counts_only_what_it_fetched(mirror, tmp_path, monkeypatch):
    """A ``fetch --ray`` rerun after a stop: its tasks are handed every planned file and skip the
    staged ones, and their documents, tokens and bytes were counted as this run's ("this run
    fetched 2 of them (<every file's tokens>)", the progress at the whole plan's bytes at once)."""
    ray = pytest.importorskip("ray", reason="the [ray] extra is installed by `make test`")
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    out = tmp_path / "o"
    bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=FRACTION, processes=1, progress=False)
    markers = sorted((out / "staging").glob("*.json"))[:2]
    redo = [json.loads(p.read_text()) for p in markers]
    for p in markers:
        p.unlink()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        res = bolmo_async.fetch(out, endpoint=mirror.endpoint, ray=True, ray_tasks=2, progress=False)
    finally:
        ray.shutdown()
    assert res["fetched_now"] == 2, res
    assert res["tokens_now"] == sum(int(r["tokens"]) for r in redo), res
    assert res["documents_now"] == sum(int(r["documents"]) for r in redo), res


def test_a_ray_task_of_another_install_says_to_restart_the_cluster(tmp_path):
    """A Ray cluster started from an older checkout than the command failed every file with
    'TypeError: run_units() takes 2 positional arguments but 4 were given'. A task's entry takes
    any arguments and compares the command's task protocol and version with its own first, before
    it unpickles the rest: another install is one line naming the fix, whatever the signatures."""
    from bolmo_async.errors import OutputError
    from bolmo_async.executors import ray as rayx

    for protocol, version in [(rayx.PROTOCOL + 1, bolmo_async.__version__), (rayx.PROTOCOL, "0.0.0-other")]:
        value = rayx.task(protocol, version, b"not even a pickle", extra="a future argument")
        with pytest.raises(UsageError) as info:
            rayx._result(value)
        said = str(info.value)
        assert "another bolmo-async" in said and "ray stop" in said and "ray start" in said, said
        assert f"protocol {protocol}" in said and "\n" not in said, said
    # the same install: the task runs (this one refuses an output it does not see as planned)
    payload = rayx.task_args("write_one_shard", str(tmp_path), 0, [], {}, {}, 0, None, "0" * 64)
    with pytest.raises(OutputError, match="does not see"):
        rayx._result(rayx.task(rayx.PROTOCOL, bolmo_async.__version__, payload))

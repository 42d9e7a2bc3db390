"""HF_HUB_OFFLINE: a login node with internet fetches (``--no-streaming`` keeps whole files in raw/),
compute nodes without it rerun fetch / prepare / finalize / inspect with HF_HUB_OFFLINE=1 set.
No request may reach any host (the mirror counts its requests; the endpoint named is a closed
port), and the shards equal an online run's; what is missing is one line naming the fix."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

import bolmo_async
from bolmo_async.errors import FetchIncomplete, OfflineError
from bolmo_async.offline import hub_offline

from .conftest import needs_dolma2
from .helpers import run_cli, shard_hashes

FRACTION = 0.3  # whole files and prefixes of others (the sample's files are small)
BOUND = 200_000


def _closed_port() -> str:
    """An endpoint nothing listens on: any request to it would fail the run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _requests(mirror) -> int:
    return len(mirror.hub_requests) + len(mirror.cdn_requests)


def _login_node(out: Path, mirror, **kw) -> None:
    """What a login node leaves: a plan, whole downloads in raw/ (and staged files, which the
    callers remove where they want the offline run to read raw/)."""
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    bolmo_async.fetch(out, endpoint=mirror.endpoint, streaming=False, progress=False, **kw)
    assert any(p.is_file() for p in (out / "raw").rglob("*"))


def _unstage(out: Path, every: int = 1) -> int:
    """Remove the completion markers of every ``every``-th staged file (those files are then not staged)."""
    markers = sorted((out / "staging").glob("*.json"))
    for m in markers[::every]:
        m.unlink()
    return len(markers[::every])


@pytest.mark.parametrize("value", ["1", "true", "YES", "On"])
def test_the_variable_is_read_as_huggingface_hub_reads_it(monkeypatch, value):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub_offline()
    for off in ("0", "false", "no", "off", " 1"):
        monkeypatch.setenv("HF_HUB_OFFLINE", off)
        assert not hub_offline(), off
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", value)
    assert hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # (huggingface_hub: the first one set decides)
    assert not hub_offline()


def test_offline_prepare_reads_staged_and_kept_files_and_equals_an_online_run(tmp_path, mirror, monkeypatch):
    online = bolmo_async.prepare(
        tmp_path / "online", endpoint=mirror.endpoint, data_fraction=FRACTION, max_tokens_per_file=BOUND, progress=False
    )
    d = tmp_path / "d"
    _login_node(d, mirror)
    assert _unstage(d, every=2) >= 2  # half staged, the other half only in raw/
    raw = sorted(p for p in (d / "raw").rglob("*") if p.is_file())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _requests(mirror)
    # Another endpoint than the plan's (online: listed to check it) and a closed one: no request at all.
    got = bolmo_async.prepare(
        d, endpoint=_closed_port(), data_fraction=FRACTION, max_tokens_per_file=BOUND, progress=False
    )
    assert _requests(mirror) == before
    assert got["complete"] and shard_hashes(got) == shard_hashes(online)
    assert sorted(p for p in (d / "raw").rglob("*") if p.is_file()) == raw  # read, kept
    # finalize (at another bound: shards written again) and inspect make no request either.
    again = bolmo_async.finalize(d, max_tokens_per_file=BOUND // 2)
    assert again["complete"] and len(again["shards"]) > len(got["shards"])
    assert not bolmo_async.inspect(d, decode=1)["problems"]
    r = run_cli("inspect", str(d))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _requests(mirror) == before


def test_a_finished_output_whose_staging_was_dropped_is_current_offline(tmp_path, mirror, monkeypatch):
    """A login node's whole prepare with --drop-staging: a compute node's rerun offline has nothing
    to do, as an online rerun (it is not refused for files neither staged nor in raw/)."""
    d = tmp_path / "d"
    kw = {"data_fraction": FRACTION, "max_tokens_per_file": BOUND, "progress": False}
    first = bolmo_async.prepare(d, endpoint=mirror.endpoint, drop_staging=True, **kw)
    assert not (d / "staging").exists() and not (d / "raw").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _requests(mirror)
    again = bolmo_async.prepare(d, endpoint=_closed_port(), **kw)
    assert again["complete"] and shard_hashes(again) == shard_hashes(first)
    assert _requests(mirror) == before
    with pytest.raises(OfflineError, match=r"neither staged nor kept whole"):  # (another bound needs the files)
        bolmo_async.prepare(d, endpoint=_closed_port(), **{**kw, "max_tokens_per_file": BOUND // 2})


def test_offline_fetch_says_in_one_line_what_is_missing_before_any_work(tmp_path, mirror, monkeypatch):
    d = tmp_path / "d"
    _login_node(d, mirror)
    n = _unstage(d)
    gone = sorted(p for p in (d / "raw").rglob("*") if p.is_file())[:2]
    for p in gone:
        p.unlink()
    run_json = (d / "run.json").read_bytes()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _requests(mirror)
    with pytest.raises(OfflineError) as err:
        bolmo_async.fetch(d, endpoint=mirror.endpoint, progress=False)
    said = str(err.value)
    assert f"2 of the {n} planned file(s) are neither staged nor kept whole in {d / 'raw'}/" in said, said
    assert all(p.name in said for p in gone), said
    assert "HF_HUB_OFFLINE is set" in said and "--no-streaming" in said and "unset HF_HUB_OFFLINE" in said, said
    assert (d / "run.json").read_bytes() == run_json and not list((d / "staging").glob("*.json"))
    r = run_cli("fetch", "-o", str(d), "--endpoint", mirror.endpoint, "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "2 of the" in lines[0] and "HF_HUB_OFFLINE" in lines[0], r.stderr
    assert _requests(mirror) == before


def test_a_kept_download_that_does_not_match_fails_its_file_offline(tmp_path, mirror, monkeypatch):
    d = tmp_path / "d"
    _login_node(d, mirror)
    _unstage(d)
    bad = sorted(p for p in (d / "raw").rglob("*") if p.is_file())[0]
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _requests(mirror)
    with pytest.raises(FetchIncomplete) as err:
        bolmo_async.fetch(d, endpoint=mirror.endpoint, progress=False, processes=1)
    assert "1 file(s) failed" in str(err.value) and "does not match the listing" in str(err.value), err.value
    assert "HF_HUB_OFFLINE is set" in str(err.value)
    assert _requests(mirror) == before and bad.exists()


def test_planning_offline_is_refused_with_the_fix(tmp_path, mirror, monkeypatch):
    d = tmp_path / "d"
    bolmo_async.plan(d, endpoint=mirror.endpoint, data_fraction=FRACTION)
    plan = (d / "plan.json").read_bytes()
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    before = _requests(mirror)
    with pytest.raises(OfflineError, match=r"has no plan.json: planning needs the repository's listing"):
        bolmo_async.fetch(tmp_path / "new", endpoint=mirror.endpoint, progress=False)
    # The defaults' 1% re-plans the folder: the plan's own fractions are named.
    with pytest.raises(OfflineError, match=rf"Pass the plan's own \(--data-fraction {FRACTION:g}\)"):
        bolmo_async.prepare(d, endpoint=mirror.endpoint, progress=False)
    with pytest.raises(OfflineError, match="force=True plans again"):
        bolmo_async.fetch(d, endpoint=mirror.endpoint, force=True, progress=False)
    assert (d / "plan.json").read_bytes() == plan  # (--force reset nothing)
    assert bolmo_async.plan(d, endpoint=mirror.endpoint, data_fraction=FRACTION).commit  # the same plan: fine
    assert _requests(mirror) == before


def test_the_offline_refusals_advice_works_when_run(tmp_path, mirror, monkeypatch):
    """Offline, a run at other fractions than the folder's plan (or in a folder with no plan) is
    refused with a fetch to run where the Hub is reachable: run as said, it plans what the refused
    run asked for and keeps the files whole, so the refused command then runs offline. (A bare
    `fetch --no-streaming` kept the folder's own plan: the same refusal again.)"""
    import shlex

    d = tmp_path / "d"
    bolmo_async.plan(d, endpoint=mirror.endpoint, data_fraction=FRACTION)
    kw = {"endpoint": mirror.endpoint, "data_fraction": 0.2, "source_fractions": {"data/stack_edu": 0.5}}
    for out in (d, tmp_path / "new"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        with pytest.raises(OfflineError) as refused:
            bolmo_async.prepare(out, progress=False, **kw)
        said = str(refused.value)
        advice = said.split("(there, `", 1)[1].split("`", 1)[0]
        monkeypatch.delenv("HF_HUB_OFFLINE")
        for step in advice.split(" && "):  # run as a shell would
            argv = shlex.split(step)
            assert argv[0] == "bolmo-async", said
            r = run_cli(*argv[1:], *(["--no-progress"] if argv[1] == "fetch" else []))
            assert r.returncode == 0, (advice, r.stderr)
        assert "--no-streaming" in advice
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        before = _requests(mirror)
        assert bolmo_async.prepare(out, progress=False, **kw)["complete"]
        assert _requests(mirror) == before
        monkeypatch.delenv("HF_HUB_OFFLINE")


@needs_dolma2
def test_subword_offline_takes_the_tokenizer_from_the_folder_or_the_cache(tmp_path, mirror, monkeypatch):
    """The default identifier (a Hub repo id, served by the mirror): online, the run keeps its JSON in
    the folder and the cache; offline, either is enough, and without both the run is refused."""
    kw = {"tokenizer": "subword", "max_tokens_per_file": BOUND, "progress": False}
    online = bolmo_async.prepare(tmp_path / "online", endpoint=mirror.endpoint, data_fraction=FRACTION, **kw)
    d = tmp_path / "d"
    _login_node(d, mirror, tokenizer="subword")
    bare = tmp_path / "bare"  # the plan and raw/ only: nothing says which tokenizer
    bare.mkdir()
    shutil.copy(d / "plan.json", bare / "plan.json")
    shutil.copytree(d / "raw", bare / "raw")
    _unstage(d)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _requests(mirror)
    monkeypatch.setenv("BOLMO_ASYNC_CACHE", "")  # no cache: the folder's tokenizer/tokenizer.json
    got = bolmo_async.prepare(d, endpoint=mirror.endpoint, data_fraction=FRACTION, **kw)
    assert shard_hashes(got) == shard_hashes(online)
    with pytest.raises(OfflineError, match=r"tokenizer allenai/dolma2-tokenizer is not on this machine"):
        bolmo_async.prepare(bare, endpoint=mirror.endpoint, data_fraction=FRACTION, **kw)
    assert not (bare / "run.json").exists()
    monkeypatch.delenv("BOLMO_ASYNC_CACHE")  # the cache the online runs wrote
    got = bolmo_async.prepare(bare, endpoint=mirror.endpoint, data_fraction=FRACTION, **kw)
    assert shard_hashes(got) == shard_hashes(online)
    assert (
        json.loads((bare / "run.json").read_text())["tokenizer"]
        == json.loads((d / "run.json").read_text())["tokenizer"]
    )
    assert _requests(mirror) == before


def test_offline_on_a_bucket_says_the_login_nodes_raw_is_not_shared(tmp_path, mirror, monkeypatch, s3):
    """An ``s3://`` output: the bucket is all the machines share, and a ``--no-streaming`` run's
    whole downloads stay in raw/ of that machine's scratch. The login node itself reads them
    offline; a compute node (another scratch) is told the fix that works there (a full fetch on
    the login node stages every file into the bucket), not to keep raw/ with --no-streaming,
    which it had done."""
    out = s3.url("off")
    login_scratch = os.environ["BOLMO_ASYNC_SCRATCH"]
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    bolmo_async.fetch(out, endpoint=mirror.endpoint, streaming=False, progress=False)
    markers = sorted(k for k in s3.objects("off") if k.startswith("staging/") and k.endswith(".json"))
    s3.client.delete_objects(Bucket=s3.bucket, Delete={"Objects": [{"Key": f"off/{k}"} for k in markers[:2]]})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BOLMO_ASYNC_SCRATCH", str(tmp_path / "compute-node"))
    with pytest.raises(OfflineError) as err:
        bolmo_async.fetch(out, endpoint=_closed_port(), progress=False)
    said = str(err.value)
    assert "2 of the" in said and "neither staged nor kept whole" in said, said
    assert "also keeps whole files" not in said and "stages every file in s3://" in said, said
    assert "stay in that machine's scratch" in said, said
    with pytest.raises(OfflineError) as err:  # a plan to make: the same advice
        bolmo_async.fetch(s3.url("other"), endpoint=_closed_port(), progress=False)
    assert "also keeps whole files" not in str(err.value) and "stages every file in s3://" in str(err.value)
    monkeypatch.setenv("BOLMO_ASYNC_SCRATCH", login_scratch)  # the login node: its raw/ serves it offline
    res = bolmo_async.fetch(out, endpoint=_closed_port(), progress=False, processes=1)
    assert res["files"] == len(markers) and res["from_raw_now"] == 2, res


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offline_ray_tasks_read_the_scratch_the_command_names(tmp_path, mirror, monkeypatch, s3):
    """``--scratch-dir`` (BOLMO_ASYNC_SCRATCH) reaches the Ray tasks: a cluster started before it
    (``ray start``) gave its workers another environment, so a task looked for the login node's
    raw/ in a temporary folder of its own and failed its file offline, after the driver had said
    the files would be read from there (and online, it put a bucket run's files in flight in
    /tmp, where the README says to name a local disk)."""
    ray = pytest.importorskip("ray", reason="the [ray] extra is installed by `make test`")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    out = s3.url("off")
    login_scratch = str(tmp_path / "login-scratch")
    monkeypatch.setenv("BOLMO_ASYNC_SCRATCH", login_scratch)
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=FRACTION)
    bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=FRACTION, streaming=False, progress=False)
    online = {k: v for k, v in s3.objects("off").items() if k.endswith(".npy")}
    s3.client.delete_objects(Bucket=s3.bucket, Delete={"Objects": [{"Key": f"off/{k}"} for k in online]})
    markers = sorted(k for k in s3.objects("off") if k.startswith("staging/") and k.endswith(".json"))
    s3.client.delete_objects(Bucket=s3.bucket, Delete={"Objects": [{"Key": f"off/{k}"} for k in markers[:2]]})
    monkeypatch.setenv("BOLMO_ASYNC_SCRATCH", str(tmp_path / "cluster-env"))  # what `ray start` saw
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        monkeypatch.setenv("BOLMO_ASYNC_SCRATCH", login_scratch)  # this command's --scratch-dir
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        res = bolmo_async.fetch(out, endpoint=_closed_port(), ray=True, ray_tasks=2, progress=False)
        assert res["from_raw_now"] == 2, res
        bolmo_async.finalize(out, ray=True)
    finally:
        ray.shutdown()
    assert online and {k: v for k, v in s3.objects("off").items() if k.endswith(".npy")} == online

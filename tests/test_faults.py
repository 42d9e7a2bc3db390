"""Reliability: a faulty network, interruption and resume, bad data, hostile state, secrets."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import bolmo_async
from bolmo_async.errors import AuthError, FetchIncomplete, StateError
from bolmo_async.inspector import read_index
from bolmo_async.mirror import FaultConfig, MirrorRepo, MirrorThread
from bolmo_async.mirror.faults import FAULT_KINDS
from bolmo_async.models import DEFAULT_REPO_ID
from bolmo_async.outdir import marker_name, open_output, staged_name

from .helpers import finish, run_cli, shard_hashes

FRACTION = 0.5
BOUND = 200_000


def _cli_prepare(out: Path, endpoint: str, *extra: str) -> list[str]:
    """`bolmo-async prepare` as a user types it, with this module's fraction and shard bound."""
    return [
        sys.executable,
        "-m",
        "bolmo_async",
        "prepare",
        "--output-dir",
        str(out),
        "--endpoint",
        endpoint,
        "--data-fraction",
        str(FRACTION),
        "--max-tokens-per-file",
        str(BOUND),
        "--no-progress",
        *extra,
    ]


def _prepare(out: Path, endpoint: str, **kw):
    kw.setdefault("progress", False)
    return bolmo_async.prepare(out, endpoint=endpoint, data_fraction=FRACTION, max_tokens_per_file=BOUND, **kw)


@pytest.fixture(scope="module")
def clean(repos, tmp_path_factory):
    """Shard sha256s of an undisturbed run: what every faulty or interrupted run must reproduce."""
    with MirrorThread(repos) as m:
        manifest = _prepare(tmp_path_factory.mktemp("clean") / "o", m.endpoint)
    assert manifest["complete"]
    return shard_hashes(manifest)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_faulty_network_gives_identical_shards(repos, tmp_path, clean, seed):
    faults = FaultConfig(rate=0.6, seed=seed, retry_after=0.1)
    with MirrorThread(repos, faults=faults) as m:
        manifest = _prepare(tmp_path / "o", m.endpoint, concurrency=4, processes=seed)
    assert manifest["complete"] and shard_hashes(manifest) == clean
    assert sum(faults.injected.values()) >= 5, faults.injected


@pytest.mark.parametrize("kind", [k for k in FAULT_KINDS if k not in ("trickle", "stall")])
def test_each_fault_kind_alone_is_survived(repos, tmp_path, clean, kind):
    faults = FaultConfig(rate=1.0, seed=0, kinds=(kind,), max_per_path=2, retry_after=0.05)
    with MirrorThread(repos, faults=faults) as m:
        manifest = _prepare(tmp_path / "o", m.endpoint, streaming=kind != "corrupt")
    assert faults.injected.get(kind, 0) >= 2
    assert shard_hashes(manifest) == clean


def test_stalled_read_times_out_and_resumes(repos, tmp_path, clean):
    faults = FaultConfig(rate=1.0, seed=0, kinds=("stall",), max_per_path=1, stall_seconds=4.0)
    with MirrorThread(repos, faults=faults) as m:
        manifest = _prepare(tmp_path / "o", m.endpoint, read_timeout=0.5, concurrency=8)
        resumed = [r for r in m.cdn_requests if r["range"] and not r["range"].startswith("bytes=0-")]
    assert faults.injected.get("stall", 0) >= 5
    # Without the read timeout each stalled body would simply finish after the pause, un-resumed.
    assert len(resumed) >= 3, "a stalled read must time out and resume with a Range request"
    assert shard_hashes(manifest) == clean


def test_resume_uses_range_not_a_restart(repos, tmp_path, clean):
    faults = FaultConfig(rate=1.0, seed=0, kinds=("cut",), max_per_path=1)
    with MirrorThread(repos, faults=faults) as m:
        manifest = _prepare(tmp_path / "o", m.endpoint)
        resumed = [r for r in m.cdn_requests if r["range"] and not r["range"].startswith("bytes=0-")]
    assert shard_hashes(manifest) == clean
    assert resumed, "a cut body must resume with a Range request from the last byte received"


def test_retry_budget_exhaustion_reports_the_file_and_others_go_on(repos, tmp_path, clean):
    faults = FaultConfig(rate=0.0, seed=0, kinds=("http503",), max_per_path=10_000)
    out = tmp_path / "o"
    with MirrorThread(repos, faults=faults) as m:
        plan = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        victim = next(f.path for f in plan.files if f.whole and f.path.endswith(".zst"))
        faults.rate, faults.only = 1.0, (victim,)
        with pytest.raises(FetchIncomplete) as info:
            _prepare(out, m.endpoint, retries=2)
        assert set(info.value.failed) == {victim}
        assert "call bolmo_async.prepare() again" in str(info.value).lower() and victim in str(info.value)
        # Named once: its line was "data/x.zst: repo/data/x.zst: gave up after 2 attempts; ..."
        (line,) = [x for x in str(info.value).splitlines() if victim in x]
        assert line.count(victim) == 1 and line.strip().startswith(f"{victim}: gave up after 2 attempts"), line
        # Complete, or clearly not: no data_sources.txt for partial data unless asked for.
        assert not (out / "data_sources.txt").exists() and not (out / "manifest.json").exists()
        assert len(list((out / "staging").glob("*.json"))) == len(plan.files) - 1
        with pytest.raises(FetchIncomplete):
            _prepare(out, m.endpoint, retries=2, allow_incomplete=True)
        manifest = json.loads((out / "manifest.json").read_text())
        assert not manifest["complete"] and manifest["missing_files"] == [victim]
        assert (out / "data_sources.txt").exists()
        faults.rate = 0.0
        assert shard_hashes(_prepare(out, m.endpoint)) == clean


def test_cli_failed_files_exit_non_zero(repos, tmp_path):
    faults = FaultConfig(rate=1.0, seed=0, kinds=("http500",), max_per_path=10_000, only=("common_crawl",))
    with MirrorThread(repos, faults=faults) as m:
        r = run_cli(
            "prepare",
            "--output-dir",
            str(tmp_path / "o"),
            "--endpoint",
            m.endpoint,
            "--retries",
            "2",
            "--no-progress",
            "--data-fraction",
            "0.3",
        )
    assert r.returncode == 1
    assert "common_crawl" in r.stderr and "Rerun the same command" in r.stderr
    assert "Traceback" not in r.stderr


def _staging_is_consistent(out: Path) -> None:
    import pyarrow as pa

    staging = out / "staging"
    assert not list(out.glob(".*.tmp")), "nor the temporaries of shards written while their file was staged"
    if not staging.exists():
        return
    assert not list(staging.glob(".*.tmp")), "temporary files must not survive a graceful stop"
    for marker in staging.glob("*.json"):
        arrow = marker.with_suffix(".arrow")
        rec = json.loads(marker.read_text())
        with pa.memory_map(str(arrow)) as src:
            reader = pa.ipc.open_file(src)
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
        assert rows == rec["documents"]


@pytest.mark.slow
def test_kill_and_resume_repeatedly_gives_identical_shards(repos, tmp_path, clean):
    """SIGINT/SIGTERM at random points of a `prepare` against a faulty, slow mirror, always while
    files are still being fetched: every stop exits 128 + the signal (130, 143) with consistent
    staging and no temporary left; the final shards equal an undisturbed run's."""
    # Every body trickles (a whole run takes tens of seconds), and some requests fail on top.
    faults = FaultConfig(rate=1.0, seed=11, trickle_delay=0.15, max_per_path=6, retry_after=0.1)
    out = tmp_path / "o"
    rng = random.Random(20261125)
    with MirrorThread(repos, faults=faults) as m:
        plan_files = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION).files
        cmd = _cli_prepare(out, m.endpoint, "--concurrency", "2", "--connections", "2", "--processes", "2")
        stops = 0
        for round_ in range(8):
            started = time.time()
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            state = out / "run.json"  # rewritten by every run once it has planned and loaded its tokenizer
            deadline = time.monotonic() + 20
            while proc.poll() is None and time.monotonic() < deadline:
                if state.exists() and state.stat().st_mtime >= started:
                    break
                time.sleep(0.01)  # interpreter start-up and imports are not a point of the run
            time.sleep(rng.uniform(0.0, 1.0))
            if _staged(out) >= len(plan_files):  # nothing left to interrupt: the rounds are over
                proc.communicate()
                break
            sig = signal.SIGINT if round_ % 2 == 0 else signal.SIGTERM
            proc.send_signal(sig)
            _, err = finish(proc, 30)  # a hang fails here
            stops += 1
            assert proc.returncode == 128 + sig, err
            assert "resume" in err and "Traceback" not in err
            _staging_is_consistent(out)
            assert not (out / "data_sources.txt").exists()
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr
    assert stops >= 2
    assert shard_hashes(json.loads((out / "manifest.json").read_text())) == clean


def _staged(out: Path) -> int:
    """Planned files staged now (a marker vouching for a staged file of the recorded size)."""
    from bolmo_async.planner import load_plan
    from bolmo_async.staging import Staging

    od = open_output(out)
    plan = load_plan(od)
    return 0 if plan is None else sum(Staging(od).done(pf) is not None for pf in plan.files)


def test_finalize_after_interrupted_fetch_marks_incomplete(repos, tmp_path, clean):
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        plan = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        bolmo_async.fetch(out, endpoint=m.endpoint, progress=False)
        # Lose a few staged files, as an interrupted run would have.
        for pf in plan.files[:3]:
            (out / "staging" / f"{pf.key}.json").unlink()
        with pytest.raises(StateError, match=r"3 of .* not staged") as info:
            bolmo_async.finalize(out, max_tokens_per_file=BOUND)
        assert all(pf.path in str(info.value) for pf in plan.files[:3]) and "--allow-incomplete" in str(info.value)
        manifest = bolmo_async.finalize(out, max_tokens_per_file=BOUND, allow_incomplete=True)
        assert manifest["complete"] is False and len(manifest["missing_files"]) == 3
        assert bolmo_async.inspect(out)["problems"] == []
        assert shard_hashes(_prepare(out, m.endpoint)) == clean


def test_a_new_run_removes_what_a_killed_one_was_writing(repos, tmp_path, clean):
    """SIGKILL leaves temporaries behind (no clean-up runs): half-written downloads in raw/ and
    in staging/. The next run removes those of its files and keeps everything else."""
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        plan = bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        pf = plan.files[0]
        od = open_output(out)
        # What a killed run leaves, made by the writers themselves (never by copying their names):
        # a --no-streaming download and staged batches being written, a streaming run's whole file.
        writers = [
            od.new_local_file(od.download_path(pf.key, pf.path, keep=True)),
            od.new_file(staged_name(pf.key)),
            od.new_file(marker_name(pf.key)),
        ]
        for w in writers:
            w.write(b"partial")
            w.flush()
        dead = [Path(w.tmp) for w in writers]  # type: ignore[attr-defined]
        whole = od.download_path(pf.key, pf.path, keep=False)
        whole.write_bytes(b"partial")
        dead.append(whole)
        other = out / "raw" / "0123456789abcdef0123"  # another file's folder: another run may own it
        other.mkdir()
        keep = [whole.with_name("notes.txt"), other / ".other-file.jsonl.zst.1.2.tmp"]
        for p in keep:
            p.write_bytes(b"partial")
        manifest = _prepare(out, m.endpoint, streaming=False)
    assert shard_hashes(manifest) == clean
    assert [p for p in dead if p.exists()] == []
    assert all(p.exists() for p in keep)


def test_disk_full_mid_run_stops_cleanly_and_resumes(repos, tmp_path, clean):
    out = tmp_path / "o"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    with MirrorThread(repos) as m:
        cmd = _cli_prepare(out, m.endpoint)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=small_files)
        assert r.returncode == 1 and "full" in r.stderr and "rerun" in r.stderr.lower(), r.stderr
        assert "Traceback" not in r.stderr
        _staging_is_consistent(out)
        assert not (out / "data_sources.txt").exists()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert shard_hashes(json.loads((out / "manifest.json").read_text())) == clean


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_bad_data_is_counted_and_the_rest_survives(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from .test_decode import BAD_LINES

    root = tmp_path / "repo"
    good = b"".join(json.dumps({"id": f"g{i}", "text": f"good document {i}"}).encode() + b"\n" for i in range(3))
    _write(root / "data/good/a.jsonl.zst", zstandard.ZstdCompressor().compress(good))
    _write(root / "data/bad/garbage.jsonl.zst", os.urandom(4096))
    rng = random.Random(0)
    big = b"".join(
        json.dumps({"id": str(i), "text": f"{rng.getrandbits(4000):x}"}).encode() + b"\n" for i in range(400)
    )
    z = zstandard.ZstdCompressor().compress(big)
    _write(root / "data/bad/trunc.jsonl.zst", z[: len(z) // 2])
    _write(root / "data/bad/lines.jsonl", b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    _write(root / "data/bad/notparquet.parquet", b"this is not parquet" * 100)
    (root / "data/pq").mkdir(parents=True)
    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "text": ["row one", None, ""]}), root / "data/pq/nulls.parquet")
    pq.write_table(pa.table({"id": ["q1"], "body": ["no text column"]}), root / "data/pq/notext.parquet")
    gz = bytearray(gzip.compress(good * 50, mtime=0))
    gz[len(gz) // 2] ^= 0xFF
    _write(root / "data/bad/corrupt.jsonl.gz", bytes(gz))
    with MirrorThread([MirrorRepo(DEFAULT_REPO_ID, root)]) as m:
        manifest = bolmo_async.prepare(tmp_path / "o", endpoint=m.endpoint, data_fraction=1.0, progress=False)
    skipped = manifest["totals"]["skipped_documents"]
    assert skipped["corrupt_stream"] >= 1  # garbage.zst, maybe corrupt.gz
    assert skipped["truncated_stream"] == 1
    assert "corrupt_file" not in skipped  # notparquet: an unreadable file, not a skipped document
    assert list(manifest["totals"]["unreadable_files"]) == ["data/bad/notparquet.parquet"]
    assert skipped["invalid_json"] == 1 and skipped["invalid_utf8"] == 1 and skipped["lone_surrogate"] == 1
    assert skipped["missing_text"] == 3  # a line without text, a null parquet text, a parquet without a text column
    assert skipped["empty_text"] == 1 + 1  # a line + a parquet row
    assert skipped["text_not_string"] == 1
    ids = {d for s in manifest["shards"] for (_, _, d, _, _) in read_index(s["csv"])}
    assert {"g0", "g1", "g2", "a", "b", "h", "p1"} <= ids
    assert manifest["complete"]
    examples = manifest["totals"]["skipped_examples"]
    assert any("lines.jsonl:3" in e for e in examples["invalid_json"])


def test_listing_changed_under_pinned_commit_is_detected(repos, sample_dir, tmp_path):
    out = tmp_path / "o"
    with MirrorThread(repos) as m:
        bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=FRACTION)
        port = int(m.endpoint.rsplit(":", 1)[1])
    changed = tmp_path / "changed"
    shutil.copytree(sample_dir, changed)
    (changed / "data/common_crawl/extra.jsonl").write_text('{"id": "x", "text": "new"}\n')
    repo = MirrorRepo(DEFAULT_REPO_ID, changed)
    repo.commit = repos[0].commit  # a server that changes content under the same commit
    with MirrorThread([repo], port=port) as m, pytest.raises(StateError, match="changed"):
        bolmo_async.fetch(out, endpoint=m.endpoint, progress=False)


TOKEN = "hf_secret_token_do_not_leak_123"


def test_netrc_is_honoured_and_a_token_next_to_it_wins(repos, tmp_path, monkeypatch):
    """~/.netrc and the proxy variables keep aiohttp's ``trust_env`` rules, read once per run
    instead of on every request: a netrc entry for the Hub's host is sent where there is no token;
    with a token, the token (aiohttp refused the pair: "Cannot combine AUTHORIZATION header with
    AUTH argument", so a netrc entry for the Hub ended every authenticated run)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # bypassed by NO_PROXY, as before
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with MirrorThread(repos) as m:
        assert "127.0.0.1" in m.endpoint
        manifest = bolmo_async.prepare(tmp_path / "a", endpoint=m.endpoint, data_fraction=0.2, progress=False)
        assert manifest["complete"] and m.hub_authorized > 0
    with MirrorThread(repos, token=TOKEN) as m:
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        manifest = bolmo_async.prepare(tmp_path / "b", endpoint=m.endpoint, data_fraction=0.2, progress=False)
        assert manifest["complete"] and m.hub_authorized > 0


def test_the_environment_is_read_once_however_many_requests_start_together(repos, monkeypatch):
    """The proxies and ~/.netrc are read once per client: a run's first requests start together
    (a worker's files in flight, the files resolved ahead), and each read its own copy (2 ms of
    CPU each)."""
    import asyncio

    from bolmo_async import hub
    from bolmo_async.retry import RetryPolicy

    made: list[int] = []

    class Counted(hub._EnvNet):
        def __init__(self) -> None:
            made.append(1)
            super().__init__()

    monkeypatch.setattr(hub, "_EnvNet", Counted)

    async def requests(endpoint: str) -> list[int]:
        async with hub.make_session(8, RetryPolicy()) as session:
            client = hub.HubClient(session, endpoint=endpoint, repo_id=DEFAULT_REPO_ID)
            url = client.resolve_url(repos[0].commit, sorted(repos[0].files)[0])

            async def one() -> int:
                async with client.get(url, headers=client.headers_for(url)) as r:
                    await r.read()
                    return r.status

            return await asyncio.gather(*(one() for _ in range(8)))

    with MirrorThread(repos) as m:
        assert asyncio.run(requests(m.endpoint)) == [200] * 8
    assert len(made) == 1


def test_token_goes_to_the_hub_only_and_is_never_written(repos, tmp_path, monkeypatch):
    out = tmp_path / "o"
    with MirrorThread(repos, token=TOKEN) as m:
        with pytest.raises(AuthError, match="HF_TOKEN"):
            bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=0.2)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        manifest = bolmo_async.prepare(out, endpoint=m.endpoint, data_fraction=0.2, progress=False)
        assert manifest["complete"]
        assert m.cdn_requests and not any(r["authorization"] for r in m.cdn_requests)
        assert m.hub_authorized > 0
        # The CLI never prints it, even with debug logging.
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "bolmo_async",
                "-v",
                "prepare",
                "--output-dir",
                str(tmp_path / "cli"),
                "--endpoint",
                m.endpoint,
                "--data-fraction",
                "0.2",
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HF_TOKEN": TOKEN},
        )
        assert r.returncode == 0, r.stderr
        assert TOKEN not in r.stdout + r.stderr
        # A token revoked mid-run: a clear error, not a traceback.
        m.token = "rotated"
        shutil.rmtree(out / "staging")
        with pytest.raises(AuthError, match="HF_TOKEN"):
            bolmo_async.fetch(out, endpoint=m.endpoint, progress=False)
    for d in (out, tmp_path / "cli"):
        for p in d.rglob("*"):
            if p.is_file():
                assert TOKEN.encode() not in p.read_bytes(), p


def test_auth_error_cli_message(repos, tmp_path):
    with MirrorThread(repos, token=TOKEN) as m:
        r = run_cli(
            "plan",
            "--output-dir",
            str(tmp_path / "o"),
            "--endpoint",
            m.endpoint,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "HF_TOKEN"},
        )
    assert r.returncode == 1
    assert "HF_TOKEN" in r.stderr and "terms" in r.stderr and "Traceback" not in r.stderr
    assert len([x for x in r.stderr.strip().splitlines() if not x.startswith("bolmo-async: INFO:")]) == 1


def test_a_refused_token_is_named_by_where_it_came_from_never_by_its_value(repos, tmp_path):
    """A researcher with a stale ``HF_TOKEN`` in their shell profile and a good ``hf auth login``
    (or the reverse) was told "Set HF_TOKEN (or run `hf auth login`)" whichever was sent, or
    none: the line did not say which token the endpoint refused, nor that HF_TOKEN hides the
    saved login. Each case names its source (never the token) and the fix."""
    home = tmp_path / "hfhome"
    home.mkdir()
    saved = home / "token"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_HOME"] = str(home)
    wrong = "hf_stale_token_from_a_profile_456"

    def last_line(extra: dict[str, str], n: int) -> str:
        r = run_cli("plan", "-o", str(tmp_path / f"o{n}"), "--endpoint", m.endpoint, timeout=60, env={**env, **extra})
        assert r.returncode == 1, r.stderr
        assert TOKEN not in r.stderr + r.stdout and wrong not in r.stderr + r.stdout, r.stderr
        (line,) = [x for x in r.stderr.strip().splitlines() if not x.startswith("bolmo-async: INFO:")]
        return line

    with MirrorThread(repos, token=TOKEN) as m:
        said = last_line({}, 0)  # none anywhere
        assert "no token was sent" in said and "HF_TOKEN" in said and "hf auth login" in said, said
        saved.write_text(TOKEN)
        said = last_line({"HF_TOKEN": wrong}, 1)  # a stale HF_TOKEN before a good saved login
        assert "the token in HF_TOKEN" in said and str(saved) in said and "unset HF_TOKEN" in said, said
        saved.write_text(wrong + "\n")
        said = last_line({}, 2)  # a stale saved login
        assert f"the token saved at {saved}" in said and "hf auth login" in said, said
        assert "no token was sent" not in said, said


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MB tmpfs (needs root, as CI and this machine run); skipped where mounting is refused."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_not_enough_disk_for_the_plan_is_refused_before_downloading(mirror, tiny_disk):
    from bolmo_async.errors import DiskSpaceError

    before = len(mirror.cdn_requests)
    with pytest.raises(DiskSpaceError, match="free") as info:
        bolmo_async.fetch(tiny_disk / "o", endpoint=mirror.endpoint, data_fraction=1.0, progress=False)
    assert "--data-fraction" in str(info.value) and "another output folder" in str(info.value)
    assert len(mirror.cdn_requests) == before  # nothing was downloaded

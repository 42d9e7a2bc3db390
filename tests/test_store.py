"""The output folder on object storage (``StoreDir``), against a real S3 server on loopback (moto's
server mode) behind a fault proxy, through the client code a user's run uses."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from bolmo_async.errors import OutputError, StateError, UsageError
from bolmo_async.outdir import LocalDir, open_output
from bolmo_async.outdir.store import PART, StoreDir
from tests.conftest import S3
from tests.helpers import cli, finish
from tests.s3server import SECRET, Fault

pytest.importorskip("obstore")


def test_open_output_routes_bucket_urls(s3: S3) -> None:
    d = open_output(s3.url("a/b/"))
    assert isinstance(d, StoreDir)
    assert d.location == f"s3://{s3.bucket}/a/b"
    assert d.ref("bolmo_data_00000.npy") == f"s3://{s3.bucket}/a/b/bolmo_data_00000.npy"
    with pytest.raises(UsageError, match="name a bucket"):
        open_output("s3://")


def test_documents_roundtrip_and_listing(s3: S3) -> None:
    d = open_output(s3.url())
    d.create()
    assert not d.exists()  # the probe leaves nothing
    assert d.read_bytes("plan.json") is None and d.size("plan.json") is None
    d.write_text("plan.json", '{"a": 1}')
    assert d.read_text("plan.json") == '{"a": 1}' and d.is_output() and d.exists()
    d.write_bytes("bolmo_data_00001.npy", b"\1" * 8)
    d.write_bytes("bolmo_data_00000.npy", b"\0" * 4)
    d.write_bytes("bolmo_data_00000.csv.gz", b"gz")
    d.write_bytes("staging/k-1.arrow", b"x" * 10)
    d.write_bytes("notes.txt", b"not ours")
    assert d.shards() == {"bolmo_data_00000.csv.gz": 2, "bolmo_data_00000.npy": 4, "bolmo_data_00001.npy": 8}
    assert d.staging_bytes() == 10
    d.remove_shards_except({"bolmo_data_00000.npy"})
    assert list(d.shards()) == ["bolmo_data_00000.npy"]
    d.reset()
    assert set(s3.objects()) == {"notes.txt"}  # what is not the tool's stays


def test_streamed_upload_is_invisible_until_commit_and_exact(s3: S3) -> None:
    d = open_output(s3.url())
    block = bytearray(PART)
    f = d.new_file("bolmo_data_00000.npy", direct=True)
    h = hashlib.sha256()
    for i in range(3):
        block[:] = bytes([i]) * PART  # the writer reuses its block after each write
        f.write(block)
        h.update(block)
    f.write(b"tail")
    h.update(b"tail")
    time.sleep(0.3)
    assert d.size("bolmo_data_00000.npy") is None  # parts are up, the object is not
    assert f.commit() == 3 * PART + 4
    assert hashlib.sha256(s3.objects()["bolmo_data_00000.npy"]).hexdigest() == h.hexdigest()
    assert d.checksum("bolmo_data_00000.npy") == LocalDir_checksum(s3.objects()["bolmo_data_00000.npy"])


def LocalDir_checksum(data: bytes) -> str:
    from bolmo_async.util import new_checksum

    h = new_checksum()
    h.update(data)
    return str(h.hexdigest())


def test_aborted_upload_leaves_nothing(s3: S3) -> None:
    d = open_output(s3.url())
    f = d.new_file("staging/k-1.arrow")
    f.write(b"a" * (2 * PART + 1))
    f.abort()
    assert d.size("staging/k-1.arrow") is None
    assert not s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")


def test_open_input_is_a_random_access_arrow_file(s3: S3) -> None:
    import pyarrow as pa

    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    d = open_output(s3.url())
    d.write_bytes("staging/k.arrow", sink.getvalue().to_pybytes())
    for _ in range(2):  # the second read comes from the scratch cache
        with d.open_input("staging/k.arrow") as source:
            assert pa.ipc.open_file(source).read_all().equals(table)
    with pytest.raises(FileNotFoundError):
        d.open_input("staging/absent.arrow").__enter__()
    # A staged file written on this machine is kept in the scratch cache as it streams out: the
    # shards made from it here read it without a download.
    f = d.new_file("staging/mine.arrow")
    f.write(sink.getvalue())
    f.commit()
    with d.open_input("staging/mine.arrow") as source:
        assert pa.ipc.open_file(source).read_all().equals(table)
    assert not [r for r in s3.proxy.seen if r.startswith("GET") and "mine.arrow" in r]


def test_conditional_create_on_both_backends(s3: S3, tmp_path: Path) -> None:
    for d in (open_output(s3.url()), LocalDir(tmp_path / "out")):
        d.create()
        assert d.create_bytes("staging/x.json", b"first")
        assert not d.create_bytes("staging/x.json", b"second")
        assert d.read_bytes("staging/x.json") == b"first"
    link = tmp_path / "out" / "staging" / "y.json"
    os.symlink(tmp_path / "elsewhere", link)
    assert not LocalDir(tmp_path / "out").create_bytes("staging/y.json", b"z")  # a link is never written through
    assert not (tmp_path / "elsewhere").exists()


def two_runs(s3: S3, n: int = 2) -> list[StoreDir]:
    """``n`` runs on one folder, as from separate processes (each its own lease holder)."""
    runs = [StoreDir(s3.url()) for _ in range(n)]
    for i, d in enumerate(runs):
        d._holder = f"run-{i}"
    return runs


def test_lock_is_a_lease_between_runs(s3: S3) -> None:
    a, b, c = two_runs(s3, 3)
    with a.lock():
        with pytest.raises(StateError, match="another bolmo-async run"), b.lock():
            pass
        with pytest.raises(StateError), b.lock(shared=True):
            pass
    with a.lock(shared=True), b.lock(shared=True), pytest.raises(StateError), c.lock():  # shares run together
        pass
    with b.lock():
        pass
    assert not any(n.startswith(".bolmo-async") for n in s3.objects())  # released leases go


def test_a_killed_runs_lock_expires_and_a_live_one_is_renewed(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    from bolmo_async.outdir import store

    # A lease's age is read from the store's Last-Modified, whole seconds (up to 1 s too old), and
    # it is renewed every LEASE/4 s: at the suite's 2 s lease that left 0.3 s for a renewal's PUT,
    # which a loaded machine overran once. 5 s leaves 2.5 s; the checks are the same.
    monkeypatch.setattr(store, "LEASE", 5.0)
    s3.proxy.faults.append(Fault("PUT", r"\.bolmo-async\.lock", "slow", 1000))  # every renewal lands late
    a, b = two_runs(s3)
    held = a.lock()
    held.__enter__()
    deadline = time.monotonic() + store.LEASE + 1.5  # past the lease, looked at all along: kept fresh
    while time.monotonic() < deadline:
        with pytest.raises(StateError), b.lock():
            pass
        time.sleep(0.5)
    store._heartbeat().drop(a, a.key(".bolmo-async.lock"))  # the holder "dies": no more heartbeats
    time.sleep(store.LEASE + 0.5)
    with b.lock():  # taken over
        pass


def test_a_store_refusing_renewals_is_said_once_not_five_times_a_second(
    s3: S3, caplog: pytest.LogCaptureFixture
) -> None:
    """A renewal that fails is tried again at the next beat, 0.2 s later: a store down or
    refusing for a minute printed 300 warnings while the run's own requests waited out their
    retries. The first failure is said, the next tries are spaced out, and a renewal that
    succeeds again says so; the lease is kept fresh once the store answers."""
    from bolmo_async.outdir import store

    d = open_output(s3.url())
    d.create()
    with caplog.at_level(logging.INFO, "bolmo_async"), d.lock():
        s3.proxy.faults.append(Fault("PUT", r"\.bolmo-async\.lock", "500", 1000))
        time.sleep(3 * store.LEASE / 2)
        s3.proxy.faults.clear()
        time.sleep(store.LEASE / 2)
        assert d.holder() is not None
    said = [r.getMessage() for r in caplog.records if "lease" in r.getMessage()]
    assert len(said) == 2 and "could not renew" in said[0] and "renewed again" in said[1], said


def test_a_store_answering_500_is_said_so_not_unreachable(s3: S3) -> None:
    """A store error that is not retried again (an upload part after obstore's own retries) with
    the store's 500 in it said to check that the store is reachable (AWS_ENDPOINT_URL, the
    network): it is up and reachable, the wrong place to look (attack17). The line says what the
    store answered; one that did not answer still points at the network."""
    import obstore.exceptions as oe

    d = open_output(s3.url())
    answered = oe.GenericError(
        "Generic S3 error: Error performing PUT http://127.0.0.1/b/run/staging/x.arrow?partNumber=2 - "
        "Server returned non-2xx status code: 500 Internal Server Error (InternalError)"
    )
    said = str(d.failed("staging/x.arrow", answered, "upload"))  # type: ignore[attr-defined]
    assert "answered 500" in said and "reachable" not in said, said
    silent = oe.GenericError("Generic S3 error: error sending request: connection refused")
    assert "reachable" in str(d.failed("staging/x.arrow", silent, "upload"))  # type: ignore[attr-defined]


def test_claims(s3: S3) -> None:
    a, b = two_runs(s3)
    with a.claim("k-1") as mine:
        assert mine
        with b.claim("k-1") as theirs:
            assert not theirs
        with b.claim("k-2") as other:
            assert other
    with b.claim("k-1") as now:  # released
        assert now
    # A conditional create done by the store whose answer was lost: the retry finds our own lease.
    s3.proxy.faults.append(Fault("PUT", r"\.k-3\.claim", "lose", 1))
    with a.claim("k-3") as mine:
        assert mine and s3.proxy.injected == 1


def test_a_share_waiting_for_a_dead_runs_claim_says_how_long(
    s3: S3, mirror, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """On a bucket a killed share's claim lives until it expires (a flock dies with its process):
    the rerun's "waiting for it" says so, instead of waiting a minute without a word of why."""
    import bolmo_async
    from bolmo_async.outdir import store
    from bolmo_async.planner import load_plan

    monkeypatch.setattr("bolmo_async.outdir.store.LEASE", 8.0)  # outlives the fetch's start on a busy machine
    bolmo_async.plan(s3.url(), endpoint=mirror.endpoint, data_fraction=float(FRACTION))
    dead = open_output(s3.url())
    first = load_plan(dead).files[0]  # type: ignore[union-attr]
    held = dead.claim(first.key)
    assert held.__enter__()
    store._heartbeat().drop(dead, dead.key(dead._claim_name(first.key)))  # type: ignore[attr-defined]
    with caplog.at_level(logging.INFO, "bolmo_async"):
        res = bolmo_async.fetch(s3.url(), endpoint=mirror.endpoint, worker=(0, 1), processes=1, progress=False)
    assert res["fetched_now"] == res["files"]
    said = [r.getMessage() for r in caplog.records if "waiting for it" in r.getMessage()]
    assert said and f"{first.path} is being staged by another run" in said[0], said
    assert "until its claim expires, within 8 s" in said[0], said


def test_transient_faults_are_retried(s3: S3, caplog: pytest.LogCaptureFixture) -> None:
    d = open_output(s3.url())
    s3.proxy.faults += [Fault("PUT", r"plan\.json", "503", 2), Fault("GET", r"plan\.json", "cut", 1)]
    s3.proxy.faults += [Fault("PUT", r"partNumber=2", "500", 1), Fault("PUT", r"partNumber=3", "cut", 1)]
    with caplog.at_level(logging.WARNING, "bolmo_async"):
        d.write_text("plan.json", "{}")
        assert d.read_text("plan.json") == "{}"
        f = d.new_file("bolmo_data_00000.npy")
        data = os.urandom(3 * PART + 5)
        f.write(data)
        f.commit()
    assert s3.objects()["bolmo_data_00000.npy"] == data
    assert s3.proxy.injected == 5, s3.proxy.faults
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3 and "SlowDown" in retries[0], retries


def test_an_exhausted_budget_names_the_object_and_the_fix(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    from bolmo_async.outdir import store

    monkeypatch.setattr(store, "retrying", _fast(store.retrying))
    s3.proxy.faults.append(Fault("PUT", r"manifest\.json", "503", 100))
    with pytest.raises(OutputError, match=r"manifest\.json: write still failing after 3 attempts .*SlowDown.*rerun"):
        open_output(s3.url()).write_text("manifest.json", "{}")


def test_a_download_longer_than_the_request_timeout_completes_while_bytes_flow(
    s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A staged object is downloaded whole (the finalize of another machine, a cache miss): the
    client's overall timeout (300 s) cut a download that was still flowing, and each retry began
    from the top, so an object needing longer at the link's rate (1 GB at 3 MB/s) never arrived.
    A transfer is bounded by TRANSFER_TIMEOUT without a byte (1 s here), not from start to end
    (this one takes 3 s)."""
    from bolmo_async.outdir import store
    from bolmo_async.util import new_checksum

    monkeypatch.setattr(store, "TRANSFER_TIMEOUT", 1.0)
    monkeypatch.setattr(store, "retrying", _fast(store.retrying))
    d = open_output(s3.url())
    data = os.urandom(3 << 20)
    d.write_bytes("staging/x.arrow", data)
    s3.proxy.faults.append(Fault("GET", r"x\.arrow", "trickle", 3))  # every attempt
    h = new_checksum()
    h.update(data)
    assert d.checksum("staging/x.arrow") == h.hexdigest()
    s3.proxy.faults[:] = [Fault("GET", r"x\.arrow", "stall", 3)]  # and a download with no byte at all fails
    t = time.monotonic()
    with pytest.raises(OutputError, match=r"x\.arrow: read still failing after 3 attempts"):
        d.checksum("staging/x.arrow")
    assert time.monotonic() - t < 15


def test_documents_of_megabytes_are_not_held_to_the_small_request_bound(
    s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A document of a few MB (a subword run's tokenizer JSON, 7 MB; a large plan) is one PUT and
    one GET: at REQUEST_TIMEOUT from start to end (60 s; 1 s here) it needed 140 KB/s, so a slow
    link failed it for good. Its PUT has the upload parts' bound and its GET the downloads' (no
    byte for TRANSFER_TIMEOUT); a small one keeps REQUEST_TIMEOUT."""
    from bolmo_async.outdir import store

    for setting in ("REQUEST_TIMEOUT", "TRANSFER_TIMEOUT"):
        monkeypatch.setattr(store, setting, 1.0)
    monkeypatch.setattr(store, "retrying", _fast(store.retrying))
    d = open_output(s3.url())
    data = os.urandom(2 << 20)
    s3.proxy.faults += [Fault("PUT", r"tokenizer\.json", "slow", 3), Fault("GET", r"tokenizer\.json", "trickle", 3)]
    d.write_bytes("tokenizer.json", data)
    assert d.read_bytes("tokenizer.json") == data
    s3.proxy.faults[:] = [Fault("PUT", r"run\.json", "slow", 3)]
    with pytest.raises(OutputError, match=r"run\.json: write still failing after 3 attempts .*no answer within 1 s"):
        d.write_bytes("run.json", b"{}")


def _fast(real):  # type: ignore[no-untyped-def]
    def call(what, attempt, fail, attempts=0):  # type: ignore[no-untyped-def]
        return real(what, attempt, fail, 3)

    return call


def test_wrong_credentials_fail_in_one_line_without_the_secret(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    with pytest.raises(UsageError) as err:
        open_output(s3.url()).create()
    msg = str(err.value)
    assert "\n" not in msg and "InvalidAccessKeyId" in msg and "AWS_ACCESS_KEY_ID" in msg
    assert SECRET not in msg


def test_missing_bucket_and_unreachable_store_fail_in_one_line(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="does not exist; create it first") as err:
        open_output(f"s3://no-such-bucket-{os.getpid()}/run").create()
    assert "\n" not in str(err.value)
    from tests.s3server import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    t = time.monotonic()
    with pytest.raises(UsageError, match="cannot reach the store") as err:
        open_output(s3.url()).create()
    assert "\n" not in str(err.value) and SECRET not in str(err.value)
    assert time.monotonic() - t < 10
    # inspect only reads: the same one line (not 8 attempts, then "rerun ... the run resumes")
    import bolmo_async

    t = time.monotonic()
    with pytest.raises(UsageError, match=r"cannot reach the store .*Check the endpoint") as err:
        bolmo_async.inspect(s3.url())
    assert "rerun" not in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - t < 10


def test_a_store_that_never_answers_is_given_up_on_in_bounded_time(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store that accepts connections and never answers (a hung server, the wrong port): every
    request waited 300 s, so the probe (3 attempts) said nothing for 15 minutes and any other
    request (8 attempts) for 40. The probe waits PROBE_TIMEOUT a request and every small request
    REQUEST_TIMEOUT (1 s here): one line each, soon."""
    from bolmo_async.outdir import store
    from tests.s3server import silent_store

    assert 3 * store.PROBE_TIMEOUT <= 60 and store.REQUEST_TIMEOUT <= 60
    monkeypatch.setattr(store, "PROBE_TIMEOUT", 1.0)
    monkeypatch.setattr(store, "REQUEST_TIMEOUT", 1.0)
    monkeypatch.setattr(store, "retrying", _fast(store.retrying))
    with silent_store() as (endpoint, _):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        t = time.monotonic()
        with pytest.raises(UsageError, match=r"cannot reach the store .*no answer within 1 s") as err:
            open_output(s3.url()).create()
        assert "\n" not in str(err.value) and time.monotonic() - t < 10
        t = time.monotonic()
        with pytest.raises(
            OutputError, match=r"plan\.json: write still failing after 3 attempts .*no answer within 1 s"
        ):
            open_output(s3.url()).write_text("plan.json", "{}")
        assert time.monotonic() - t < 10


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_a_request_the_store_never_answers_stops_at_once(s3: S3, sig: int) -> None:
    """Ctrl+C or SIGTERM (a job scheduler's) while a store request hangs: the client's call held
    the main thread, where Python runs signal handlers, until the request's timeout (300 s). The
    call runs on a helper thread the main thread waits for, so the stop is handled at once."""
    import subprocess

    from tests.s3server import silent_store

    with silent_store() as (endpoint, accepted):
        p = subprocess.Popen(
            cli("plan", "-o", s3.url(), "--data-fraction", "0.1"),
            env={**os.environ, "AWS_ENDPOINT_URL": endpoint},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while not accepted:  # the probe's request is in flight
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        p.send_signal(sig)
        t = time.monotonic()
        _out, err = finish(p, 30)
        took = time.monotonic() - t
    assert took < 5, (took, err)
    assert p.returncode == 128 + sig and err.strip().splitlines()[-1].startswith("interrupted"), err


@pytest.mark.slow
def test_a_stop_while_the_store_hangs_mid_run_ends_within_a_minute(s3: S3, mirror) -> None:  # type: ignore[no-untyped-def]
    """The store stops answering mid-run (after the probe and the lock), then SIGTERM: the stop's
    clean-up releases the folder's lease, which waited for a renewal in flight and then retried
    its delete 8 times, a minute each: the command ended after 8 minutes or more. A release (and
    a renewal) is one short attempt: a lease left behind expires by itself (30 s measured)."""
    import subprocess

    s3.proxy.faults.append(Fault("PUT", r"plan\.json", "stall", 1000))
    args = ("prepare", "-o", s3.url(), "--endpoint", mirror.endpoint, "--data-fraction", "0.1", "--no-progress")
    p = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any(seen.startswith("PUT") and "plan.json" in seen for seen in s3.proxy.seen):
        assert p.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    s3.proxy.faults.append(Fault("*", r".", "stall", 1000))  # from now on nothing is answered
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    t = time.monotonic()
    _out, err = finish(p, 120)
    took = time.monotonic() - t
    assert took < 45, (took, err)
    assert p.returncode == 128 + signal.SIGTERM and err.strip().splitlines()[-1].startswith("interrupted"), err


@pytest.mark.parametrize("prefix", ["../x", "a/./x", "a//x", "a/\x01/x"])
def test_a_prefix_no_store_takes_is_a_usage_error(prefix: str) -> None:
    """Not a probe failure with advice to rerun: the location itself is wrong."""
    with pytest.raises(UsageError, match=r"an object key cannot hold .* name the prefix plainly") as err:
        open_output(f"s3://bucket/{prefix}")
    assert "rerun" not in str(err.value)


# -- whole runs: the command line a user runs, the bucket compared with a local run ------------------
FRACTION = "0.3"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _local_run(tmp_path: Path, mirror: object) -> dict[str, str]:
    """sha256 of every shard and index file of a local run of the same plan."""
    import bolmo_async

    out = tmp_path / "local"
    bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=float(FRACTION), progress=False)  # type: ignore[attr-defined]
    return {p.name: _sha(p.read_bytes()) for p in sorted(out.iterdir()) if p.name.startswith("bolmo_data_")}


def _cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300):  # type: ignore[no-untyped-def]
    import subprocess

    return subprocess.run(
        cli(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})}
    )


def _shards_of(s3: S3, prefix: str = "run") -> dict[str, str]:
    return {n: _sha(b) for n, b in sorted(s3.objects(prefix).items()) if n.startswith("bolmo_data_")}


def _no_credentials_anywhere(s3: S3, *texts: str) -> None:
    from tests.s3server import KEY_ID

    for text in texts:
        assert SECRET not in text and KEY_ID not in text
    for name, data in s3.objects("").items():
        assert SECRET.encode() not in data and KEY_ID.encode() not in data, name


@pytest.mark.slow
def test_prepare_to_a_bucket_equals_a_local_run_and_inspects(s3: S3, mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    local = _local_run(tmp_path, mirror)
    r = _cli("prepare", "-o", s3.url(), "--endpoint", mirror.endpoint, "--data-fraction", FRACTION, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert _shards_of(s3) == local  # object by object, byte for byte
    objects = s3.objects()
    assert {"plan.json", "run.json", "manifest.json", "data_sources.txt"} <= set(objects)
    assert any(n.startswith("staging/") and n.endswith(".json") for n in objects)
    sources = objects["data_sources.txt"].decode().split()
    assert sources == [f"{s3.url()}/{n}" for n in sorted(local) if n.endswith(".npy")]
    for url in sources:
        name = url.rsplit("/", 1)[1]
        assert name in objects and name.replace(".npy", ".csv.gz") in objects
    assert f"{s3.url()}/data_sources.txt" in r.stdout
    # bolmo-core open()s DATA_SOURCE: the summary has it copied, never exported as a URL
    assert "export DATA_SOURCE=s3" not in r.stdout
    copy = f'aws s3 cp {s3.url()}/data_sources.txt data_sources.txt && export DATA_SOURCE="$PWD/data_sources.txt"'
    assert copy in r.stdout, r.stdout
    ok = _cli("inspect", s3.url())
    assert ok.returncode == 0, ok.stderr
    _no_credentials_anywhere(s3, r.stdout, r.stderr, ok.stdout, ok.stderr)
    # A truncated shard is found (the store has no partial objects of ours: someone else wrote it).
    shard = next(n for n in sorted(objects) if n.endswith(".npy"))
    s3.client.put_object(Bucket=s3.bucket, Key=f"run/{shard}", Body=objects[shard][:-4])
    bad = _cli("inspect", s3.url())
    assert bad.returncode != 0 and shard in bad.stdout + bad.stderr, bad.stdout + bad.stderr
    assert "bolmo-async finalize" in bad.stderr
    # While a run holds the folder (its lease, or a share's), that is its work in progress.
    for shared, who in ((False, "a bolmo-async run"), (True, "a job-array share (`fetch --worker`)")):
        with two_runs(s3, 1)[0].lock(shared=shared):
            busy = _cli("inspect", s3.url())
        assert busy.returncode != 0 and f"{who} is writing this folder now" in busy.stderr, busy.stderr
        assert "bolmo-async finalize" not in busy.stderr


def test_worker_processes_share_the_coordinators_scratch_which_it_removes(s3: S3, mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``--processes 2`` to a bucket: the workers (which exit without clean-up) write in the
    scratch folder the coordinator made before they started, and removes at exit: none is left."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "BOLMO_ASYNC_SCRATCH"}
    args = ("prepare", "-o", s3.url(), "--endpoint", mirror.endpoint, "--data-fraction", FRACTION, "--no-progress")
    import subprocess

    r = subprocess.run(
        cli(*args, "--processes", "2"), capture_output=True, text=True, timeout=300, env={**env, "TMPDIR": str(tmp)}
    )
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp.iterdir()] == []


@pytest.mark.slow
def test_shares_on_machines_sharing_only_the_bucket(s3: S3, mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """share 0 and share 1 at once, each from its own working directory and scratch, then finalize
    from a third: the same bytes as one local run."""
    import subprocess

    local = _local_run(tmp_path, mirror)
    r = _cli("plan", "-o", s3.url(), "--endpoint", mirror.endpoint, "--data-fraction", FRACTION)
    assert r.returncode == 0, r.stderr
    machines = [tmp_path / f"machine{i}" for i in range(3)]
    for m in machines:
        (m / "scratch").mkdir(parents=True)
    shares = [
        subprocess.Popen(
            cli(
                "--scratch-dir",
                str(machines[i] / "scratch"),
                "fetch",
                "-o",
                s3.url(),
                "--worker",
                f"{i}/2",
                "--endpoint",
                mirror.endpoint,
                "--no-progress",
            ),
            cwd=machines[i],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for p in shares:
        out, err = finish(p, 300)
        assert p.returncode == 0, err
        _no_credentials_anywhere(s3, out, err)
    # The third machine's scratch may cache one staged object at a time: scratch stays bounded.
    fin = _cli(
        "finalize",
        "-o",
        s3.url(),
        cwd=machines[2],
        env={"BOLMO_ASYNC_SCRATCH": str(machines[2] / "scratch"), "BOLMO_ASYNC_SCRATCH_CACHE": "1"},
    )
    assert fin.returncode == 0, fin.stderr
    assert _shards_of(s3) == local
    cached = [p for p in (machines[2] / "scratch").rglob("*") if p.is_file() and p.name != "output-dir.txt"]
    assert len(cached) <= 1, cached
    for m in machines:  # nothing of the output on any machine's disk
        assert not [p for p in m.rglob("*") if p.name.startswith(("bolmo_data_", "plan.json", "manifest.json"))]


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_same_bytes(s3: S3, repos, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import signal
    import subprocess

    from bolmo_async.mirror import FaultConfig, MirrorThread

    with MirrorThread(repos) as m:
        local = _local_run(tmp_path, m)
    slow = FaultConfig(rate=1.0, kinds=("trickle",), trickle_delay=0.05, max_per_path=10**6)
    with MirrorThread(repos, faults=slow) as m:
        args = ("prepare", "-o", s3.url(), "--endpoint", m.endpoint, "--data-fraction", FRACTION, "--no-progress")
        victim = subprocess.Popen(cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until some files are staged, not all
            staged = [n for n in _names(s3) if n.startswith("staging/") and n.endswith(".json")]
            if staged:
                break
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        names = _names(s3)
        assert staged and "data_sources.txt" not in names  # killed mid-run
        time.sleep(2.5)  # the killed run's lease (2 s here, 60 s by default) expires
        r = _cli(*args)
        assert r.returncode == 0, r.stderr
    assert _shards_of(s3) == local


def _names(s3: S3, prefix: str = "run") -> list[str]:
    got = s3.client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix + "/").get("Contents", [])
    return [o["Key"][len(prefix) + 1 :] for o in got]


def test_wrong_credentials_stop_before_any_hub_request(s3: S3, mirror, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    r = _cli("prepare", "-o", s3.url(), "--endpoint", mirror.endpoint, "--data-fraction", FRACTION, "--no-progress")
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "InvalidAccessKeyId" in lines[0] and "AWS_ACCESS_KEY_ID" in lines[0], r.stderr
    assert SECRET not in r.stderr + r.stdout
    assert not mirror.hub_requests and not mirror.cdn_requests


@pytest.mark.slow
def test_ray_with_a_bucket(s3: S3, mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``fetch --ray`` then ``finalize --ray`` into the bucket: Ray tasks read and write it (a local
    Ray cluster inherits the AWS variables; a real one needs them, or a role, on every node)."""
    pytest.importorskip("ray", reason="the [ray] extra is installed by `make test`; without it this cannot run")
    local = _local_run(tmp_path, mirror)
    env = {"RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    args = ("-o", s3.url(), "--endpoint", mirror.endpoint, "--data-fraction", FRACTION)
    r = _cli("fetch", *args, "--ray", "--ray-tasks", "2", "--no-progress", env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("finalize", "-o", s3.url(), "--ray", env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _shards_of(s3) == local
    _no_credentials_anywhere(s3, r.stdout, r.stderr)


@pytest.mark.slow
def test_a_whole_run_through_store_faults_gives_the_same_bytes(s3: S3, mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """503 SlowDown, 500 and connections cut mid-request on staged files, markers, shard parts and
    reads, during a real `prepare`: retried, and the output is the local run's."""
    local = _local_run(tmp_path, mirror)
    s3.proxy.faults += [
        Fault("PUT", r"staging/[^.?]+\.arrow", "503", 3),
        Fault("PUT", r"staging/[^.?]+\.json", "cut", 2),
        Fault("GET", r"staging/[^.?]+\.json", "500", 2),
        Fault("HEAD", r"staging/", "503", 2),
        Fault("PUT", r"bolmo_data_\d+\.csv\.gz", "cut", 1),
        Fault("GET", r"plan\.json", "503", 1),
    ]
    r = _cli("prepare", "-o", s3.url(), "--endpoint", mirror.endpoint, "--data-fraction", FRACTION, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert s3.proxy.injected == 11, s3.proxy.faults
    assert "retry" in r.stderr
    assert _shards_of(s3) == local


def test_aws_profile_from_the_credentials_file(s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.s3server import KEY_ID

    creds = tmp_path / "credentials"
    creds.write_text(f"[train]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "train")
    d = open_output(s3.url())
    d.create()
    d.write_text("plan.json", "{}")
    assert d.read_text("plan.json") == "{}"
    creds.write_text("[train]\naws_access_key_id = AKIAWRONGWRONGWRONG1\naws_secret_access_key = x\n")
    with pytest.raises(UsageError, match="InvalidAccessKeyId"):
        open_output(s3.url()).create()


def test_credentials_never_found_are_named_not_blamed_on_the_store(
    s3: S3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Half a key pair, no credentials at all (the instance metadata service, here a closed port,
    gives no role) and an AWS_PROFILE the machine lacks each say what to set, at once: they said
    "Check that the store is reachable (AWS_ENDPOINT_URL, the network)", or were retried as a
    network error and then said "cannot reach the store", or named only boto3's exception text."""
    from tests.s3server import free_port

    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UsageError, match="AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not: set both") as e:
        open_output(s3.url()).create()
    assert "reachable" not in str(e.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(UsageError, match="AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not"):
        open_output(s3.url()).check_reachable()
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(UsageError, match="found no credentials: AWS_ACCESS_KEY_ID") as e:
        open_output(s3.url()).create()
    assert "each task of a job array" in str(e.value) and "cannot reach" not in str(e.value)
    assert time.monotonic() - started < 5  # not retried as a network error
    pytest.importorskip("boto3")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "training")
    with pytest.raises(UsageError, match=r"AWS_PROFILE=training: no such profile in .*config or .*credentials"):
        open_output(s3.url()).create()
    assert not s3.objects()


@pytest.mark.slow
def test_a_second_run_on_a_busy_bucket_folder_is_refused(s3: S3, repos) -> None:  # type: ignore[no-untyped-def]
    """No flock on a bucket: the lease (a conditional create) refuses a second `prepare` at once,
    in one line, while the first runs; the first finishes as if alone."""
    import subprocess

    from bolmo_async.mirror import FaultConfig, MirrorThread

    slow = FaultConfig(rate=1.0, kinds=("trickle",), trickle_delay=0.05, max_per_path=10**6)
    with MirrorThread(repos, faults=slow) as m:
        args = ("prepare", "-o", s3.url(), "--endpoint", m.endpoint, "--data-fraction", FRACTION, "--no-progress")
        first = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while ".bolmo-async.lock" not in _names(s3):
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        second = _cli(*args)
        _out, err = finish(first, 300)
    assert first.returncode == 0, err
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode != 0 and len(lines) == 1 and "another bolmo-async run" in lines[0], second.stderr
    assert "data_sources.txt" in _names(s3) and ".bolmo-async.lock" not in _names(s3)


@pytest.mark.parametrize("setting", ["BOLMO_ASYNC_LEASE=abc", "BOLMO_ASYNC_LEASE=-5", "BOLMO_ASYNC_SCRATCH_CACHE=lots"])
def test_a_setting_that_is_no_number_is_one_line(setting: str) -> None:
    """Was "unexpected ValueError ... rerun"; a negative lease would have made every lease stale."""
    name, _, value = setting.partition("=")
    r = _cli("plan", "-o", "s3://bucket/run", env={name: value})
    assert r.returncode == 2 and r.stderr.startswith(f"error: {name}={value!r}: takes") and "unset it" in r.stderr, (
        r.stderr
    )


def test_scratch_dir_after_the_command_is_the_runs(s3: S3, mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A job array's line with --scratch-dir among the command's options ("No such option") runs
    with that scratch: a file there is refused as one, a folder holds the run's cache."""
    env = {"BOLMO_ASYNC_SCRATCH": ""}
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    args = ("plan", "-o", s3.url(), "--endpoint", mirror.endpoint, "--data-fraction", FRACTION)
    r = _cli(*args, "--scratch-dir", str(a_file), env=env)
    assert r.returncode == 2 and f"--scratch-dir {a_file}" in r.stderr, r.stderr
    scratch = tmp_path / "scratch"
    r = _cli(
        "fetch", "-o", s3.url(), "--endpoint", mirror.endpoint, f"--scratch-dir={scratch}", "--no-progress", env=env
    )
    assert r.returncode == 0, r.stderr
    assert any(scratch.rglob("*")), "the run's cache is in the scratch it was given"


def test_a_full_scratch_says_which_outputs_fill_it(s3: S3, mirror, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A user-named --scratch-dir outlives its runs: another output's files there (its cache of
    staged objects, or the downloads a --no-streaming run that did not finish keeps to resume) are
    what a later run finds filling the disk. Its "is full" line says how much each output's
    folder holds and whose it is (review16 left it: the user was not told what fills it)."""
    import resource
    import subprocess

    scratch = tmp_path / "scratch"
    env = {**os.environ, "BOLMO_ASYNC_SCRATCH": str(scratch)}
    first = ("prepare", "-o", s3.url("first"), "--endpoint", mirror.endpoint, "--data-fraction", FRACTION)
    r = subprocess.run(cli(*first, "--no-progress"), capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    kept = sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file())
    assert kept > 20_000  # the first output's cache of staged objects stays in a scratch the user named

    def small_files() -> None:  # a full disk, as the system reports it (EFBIG past the limit)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    second = ("prepare", "-o", s3.url("second"), "--endpoint", mirror.endpoint, "--data-fraction", FRACTION)
    r = subprocess.run(
        cli(*second, "--no-streaming", "--processes", "1", "--no-progress"),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=small_files,
    )
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert "is full" in errors[0] and "It holds" in errors[0], errors[0]
    assert f"(for --output-dir {s3.url('first')})" in errors[0], errors[0]
    assert str(scratch) in errors[0]


def test_the_local_copy_of_a_remote_data_sources_txt_is_named_per_store() -> None:
    """R2 is copied through the S3 API (the AWS CLI reads AWS_ENDPOINT_URL), GCS with gcloud; the
    line always ends by exporting the copy, quoted for a $PWD with a space."""
    from bolmo_async.guidance import local_copy_command

    assert local_copy_command("r2://b/p/data_sources.txt").startswith("aws s3 cp s3://b/p/data_sources.txt ")
    assert local_copy_command("gs://b/p q/data_sources.txt").startswith(
        "gcloud storage cp 'gs://b/p q/data_sources.txt' "
    )
    for url in ("s3://b/data_sources.txt", "az://c/data_sources.txt"):
        assert local_copy_command(url).endswith('&& export DATA_SOURCE="$PWD/data_sources.txt"')


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "http://", "http://a b:1", "s3://x", "http://127.0.0.1:x"])
def test_an_endpoint_that_is_no_http_url_is_refused_in_one_line(
    s3: S3, monkeypatch: pytest.MonkeyPatch, endpoint: str
) -> None:
    """AWS_ENDPOINT_URL without its scheme (or with no host) made the S3 client panic at its first
    request: a Rust panic, a BaseException that no handler caught, printed as a traceback."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    with pytest.raises(UsageError, match=r"AWS_ENDPOINT_URL=.* is not an http\(s\) URL of the store: write it as"):
        open_output(s3.url()).create()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)  # the S3-only variable wins, and is named
    with pytest.raises(UsageError, match=r"AWS_ENDPOINT_URL_S3="):
        open_output(s3.url()).check_reachable()


def test_what_would_make_the_s3_client_panic_is_refused_or_named(s3: S3, monkeypatch: pytest.MonkeyPatch) -> None:
    """A credential with a carriage return (copied from a file), a bucket name with a space: the
    S3 client panicked on them (a traceback); they are refused first, naming the variable (never
    its value), and any other panic of the client is one line naming the object."""
    import obstore
    from obstore.store import S3Store

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET + "\r")
    with pytest.raises(UsageError, match="AWS_SECRET_ACCESS_KEY holds a control character") as e:
        open_output(s3.url()).create()
    assert SECRET not in str(e.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with pytest.raises(UsageError, match="a bucket name holds no spaces"):
        open_output(f"s3://{s3.bucket} x/run")
    try:  # the client's own panic, as it is raised
        list(obstore.list(S3Store("b", config={"endpoint": "http://"}, client_options={"allow_http": True})))
    except BaseException as exc:  # (a PanicException derives from BaseException only)
        panic = exc
    assert type(panic).__name__ == "PanicException"

    def raise_it() -> None:
        raise panic

    d = open_output(s3.url())
    with pytest.raises(OutputError, match=r"/run: the S3 client refused the request it was to make for this list"):
        d._call("list", "", raise_it)  # type: ignore[attr-defined]


@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
def test_a_full_scratch_names_the_scratch_dir(s3: S3, mirror, tmp_path: Path, streaming: str) -> None:  # type: ignore[no-untyped-def]
    """The local scratch of a bucket output full (a small /tmp tmpfs, the README's warning): a
    staged object read into the scratch cache said "read failed (No space left on device). Check
    that the store is reachable (AWS_ENDPOINT_URL, the network)", and a --no-streaming download
    "Free space (or choose another --output-dir)": neither named --scratch-dir (newuser16)."""
    import resource
    import subprocess

    def small_files() -> None:  # a full disk, as the system reports it (EFBIG past the limit)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    args = ("prepare", "-o", s3.url(), "--endpoint", mirror.endpoint, "--data-fraction", FRACTION, "--no-progress")
    r = subprocess.run(
        cli(*args, streaming, "--processes", "1"), capture_output=True, text=True, timeout=300, preexec_fn=small_files
    )
    errors = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert "--scratch-dir" in errors[0] and "is full" in errors[0], errors[0]
    assert "store is reachable" not in errors[0] and "another --output-dir" not in errors[0]
    r = _cli(*args, streaming)  # room again: the run resumes
    assert r.returncode == 0, r.stderr


def test_the_lease_thread_ends_once_no_lease_is_held(s3: S3) -> None:
    """The thread that renews leases beat five times a second for the rest of the process once a
    bucket output had been used (a notebook, a driver script calling the API again and again):
    tests/test_pool.py's check that runs leave no thread behind failed after any store test. It
    ends when the last lease is released, and a later lock starts it again."""
    import threading

    def beating() -> bool:
        return any(t.name == "bolmo-async-leases" and t.is_alive() for t in threading.enumerate())

    d = open_output(s3.url())
    for _ in range(2):
        with d.lock():
            assert beating()
        deadline = time.monotonic() + 5
        while beating() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not beating()


@pytest.mark.parametrize("lock_body", [b"", b"12345\n"])  # a finished run's lock file, one copied mid-run
def test_a_local_folder_copied_into_a_bucket_is_finalized_there(
    s3: S3, mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lock_body: bytes
) -> None:  # type: ignore[no-untyped-def]
    """`aws s3 sync` of a finished local output copies its flock file, ``.bolmo-async.lock``, which
    is the name of a bucket folder's lease: read as a run holding the folder (the copy is new), so
    inspect said a run "is writing this folder now" and finalize was refused for a minute. It is
    no lease (not one's body): inspect names the finalize that writes data_sources.txt for the
    bucket, and that finalize runs at once."""
    monkeypatch.setenv("BOLMO_ASYNC_LEASE", "60")  # (the fixture's 2 s would hide it)
    monkeypatch.setattr("bolmo_async.outdir.store.LEASE", 60.0)
    local = _local_run(tmp_path, mirror)
    folder = tmp_path / "local"
    (folder / ".bolmo-async.lock").write_bytes(lock_body)
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            s3.client.upload_file(str(p), s3.bucket, f"copy/{p.relative_to(folder)}")
    r = _cli("inspect", s3.url("copy"))
    assert r.returncode == 1 and "data_sources.txt points outside" in r.stderr, r.stderr
    assert "writing this folder now" not in r.stderr, r.stderr
    assert f"bolmo-async finalize --output-dir {s3.url('copy')}" in r.stderr, r.stderr
    r = _cli("finalize", "--output-dir", s3.url("copy"))
    assert r.returncode == 0, r.stderr
    assert _cli("inspect", s3.url("copy")).returncode == 0
    assert _shards_of(s3, "copy") == local


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_tasks_that_reach_another_store_stop_the_run(s3: S3, mirror, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """A Ray task has the environment its cluster was started in: there AWS_ENDPOINT_URL named
    another store (with a bucket of that name), and `fetch --ray` wrote the plan to this shell's
    store, the staged files to the other one, and said every file was staged (exit 0). A task
    that does not see the command's plan.json now stops the run in one line naming the fix."""
    ray = pytest.importorskip("ray", reason="the [ray] extra is installed by `make test`")
    import socket
    import subprocess
    import sys

    import bolmo_async
    from tests.s3server import client, free_port, make_bucket

    monkeypatch.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    port = free_port()  # another store: moto in its own process (in one process, moto's data is shared)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto did not start"
                time.sleep(0.2)
        other = f"http://127.0.0.1:{port}"
        make_bucket(other, s3.bucket)  # with a bucket of the same name
        monkeypatch.setenv("AWS_ENDPOINT_URL", other)  # what `ray start` saw
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        try:
            monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)  # this shell's
            with pytest.raises(OutputError, match=r"Ray task .* does not see .*plan\.json.*AWS_ENDPOINT_URL"):
                bolmo_async.fetch(s3.url(), endpoint=mirror.endpoint, data_fraction=0.3, ray=True, progress=False)
        finally:
            ray.shutdown()
        assert not client(other).list_objects_v2(Bucket=s3.bucket).get("KeyCount")  # nothing written there
    finally:
        server.terminate()
        server.wait(timeout=30)

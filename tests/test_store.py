"""The output folder on object storage (``StoreDir``), against a real S3 server on loopback (moto's
server mode) behind a fault proxy, through the client code a user's run uses."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from bolmo_async.errors import OutputError, StateError, UsageError
from bolmo_async.outdir import LocalDir, open_output
from bolmo_async.outdir.store import PART, StoreDir
from tests.conftest import S3
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


def test_a_killed_runs_lock_expires_and_a_live_one_is_renewed(s3: S3) -> None:
    a, b = two_runs(s3)
    held = a.lock()
    held.__enter__()
    time.sleep(3.0)  # past the 2 s lease: the heartbeat kept it
    with pytest.raises(StateError), b.lock():
        pass
    from bolmo_async.outdir import store

    store._heartbeat().drop(a, a.key(".bolmo-async.lock"))  # the holder "dies": no more heartbeats
    time.sleep(2.5)
    with b.lock():  # taken over
        pass


def test_claims(s3: S3) -> None:
    a, b = two_runs(s3)
    with a.claim("k-1") as mine:
        assert mine
        with b.claim("k-1") as theirs:
            assert not theirs
        with b.claim("k-2") as other:
            assert other
    b.wait_claim("k-1", poll=0.05)
    with b.claim("k-1") as now:
        assert now


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
    with pytest.raises(UsageError, match="cannot be reached") as err:
        open_output(s3.url()).create()
    assert "\n" not in str(err.value) and SECRET not in str(err.value)
    assert time.monotonic() - t < 10

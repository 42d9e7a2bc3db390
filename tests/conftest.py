"""Hermetic fixtures: temp HF cache, no token, no endpoint; a generated sample mix served by a real
in-process mirror (aiohttp) on loopback."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from bolmo_async.mirror import Mirror, MirrorRepo, MirrorThread, build_sample
from bolmo_async.models import DEFAULT_REPO_ID

DOLMA2 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "dolma2-tokenizer.json"
if not DOLMA2.exists():  # a clean clone sits beside shared/ too, under another folder name
    DOLMA2 = Path(os.environ.get("BOLMO_DOLMA2_JSON", DOLMA2))

#: Marks a test that needs the real dolma2 tokenizer: `-m needs_dolma2` selects these tests, and
#: they are skipped when the file is absent (below).
needs_dolma2 = pytest.mark.needs_dolma2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if DOLMA2.exists():
        return
    skip = pytest.mark.skip(reason="../shared/tokenizers/dolma2-tokenizer.json is absent (or set BOLMO_DOLMA2_JSON)")
    for item in items:
        if item.get_closest_marker("needs_dolma2") is not None:
            item.add_marker(skip)


#: The stop signals' handlers as the session started: a test that changes one in this process (a
#: module imported for its side effects, an API run's handler) must not leave it to the next, nor
#: to the CLIs later tests start, which inherit an ignored signal as under nohup.
_STOP_SIGNALS = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


@pytest.fixture(autouse=True)
def stop_signals_restored() -> Iterator[None]:
    yield
    for sig, handler in _STOP_SIGNALS.items():
        if signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


@pytest.fixture(autouse=True)
def hermetic(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("hfhome")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))  # bolmo-async's remembered probes
    monkeypatch.delenv("BOLMO_ASYNC_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("BOLMO_ASYNC_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sample")
    build_sample(d, size_mb=2.0, seed=0)
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    if not DOLMA2.exists():
        return None
    d = tmp_path_factory.mktemp("dolma2")
    (d / "tokenizer.json").write_bytes(DOLMA2.read_bytes())
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}')
    return d


@pytest.fixture(scope="session")
def repos(sample_dir: Path, tokenizer_dir: Path | None) -> list[MirrorRepo]:
    out = [MirrorRepo(DEFAULT_REPO_ID, sample_dir)]
    if tokenizer_dir is not None:
        out.append(MirrorRepo("allenai/dolma2-tokenizer", tokenizer_dir, "model"))
    return out


@pytest.fixture
def mirror(repos: list[MirrorRepo]) -> Iterator[Mirror]:
    with MirrorThread(repos) as m:
        yield m


# -- object storage: moto's S3 server on loopback behind a fault proxy (tests/s3server.py) ------------
@pytest.fixture(scope="session")
def s3_upstream() -> Iterator[str]:
    pytest.importorskip("moto.server")
    from tests.s3server import moto_server

    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_upstream: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """A fresh bucket reached through the fault proxy with the usual AWS variables set (as a user's
    run would be); ``s3.url(prefix)`` is an ``--output-dir``; locks expire after 2 s."""
    from tests.s3server import KEY_ID, REGION, SECRET, fault_proxy, make_bucket

    bucket = f"bolmo-{os.getpid()}-{next(_buckets)}"
    make_bucket(s3_upstream, bucket)
    with fault_proxy(s3_upstream) as (endpoint, proxy):
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        monkeypatch.setenv("AWS_REGION", REGION)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("BOLMO_ASYNC_LEASE", "2")
        monkeypatch.setenv("BOLMO_ASYNC_SCRATCH", str(tmp_path_factory.mktemp("scratch")))
        monkeypatch.setattr("bolmo_async.outdir.store.LEASE", 2.0)
        yield S3(bucket, endpoint, s3_upstream, proxy)


class S3:
    def __init__(self, bucket: str, endpoint: str, upstream: str, proxy: object):
        from tests.s3server import client

        self.bucket, self.endpoint, self.upstream, self.proxy = bucket, endpoint, upstream, proxy
        self.client = client(upstream)  # the tests' own view of the bucket (boto3, straight to moto)

    def url(self, prefix: str = "run") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def objects(self, prefix: str = "run") -> dict[str, bytes]:
        """Every object under ``prefix``: name relative to it -> bytes."""
        out: dict[str, bytes] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/"):
            for o in page.get("Contents", []):
                body = self.client.get_object(Bucket=self.bucket, Key=o["Key"])["Body"].read()
                out[o["Key"][len(prefix) + 1 :]] = body
        return out


_buckets = __import__("itertools").count()

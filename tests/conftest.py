"""Hermetic fixtures: temp HF cache, no token, no endpoint; a generated sample mix served by a real
in-process mirror (aiohttp) on loopback."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bolmo_async.mirror import Mirror, MirrorRepo, MirrorThread, build_sample
from bolmo_async.models import DEFAULT_REPO_ID

DOLMA2 = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "dolma2-tokenizer.json"
if not DOLMA2.exists():  # a clean clone sits beside shared/ too, under another folder name
    DOLMA2 = Path(os.environ.get("BOLMO_DOLMA2_JSON", DOLMA2))

needs_dolma2 = pytest.mark.skipif(not DOLMA2.exists(), reason="../shared/tokenizers/dolma2-tokenizer.json is absent")


@pytest.fixture(autouse=True)
def hermetic(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("hfhome")
    monkeypatch.setenv("HF_HOME", str(home))
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

"""The mirror against the real huggingface_hub client and raw aiohttp requests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import aiohttp
import pytest
from huggingface_hub import HfApi, hf_hub_download

from bolmo_async.mirror import MirrorRepo, MirrorThread
from bolmo_async.models import DEFAULT_REPO_ID

from .helpers import run_cli, wait_for_endpoint


def _sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_hfapi_lists_every_file_with_sizes_and_lfs_sha(mirror, sample_dir):
    api = HfApi(endpoint=mirror.endpoint)
    entries = list(api.list_repo_tree(DEFAULT_REPO_ID, repo_type="dataset", recursive=True))
    files = {e.path: e for e in entries if e.__class__.__name__ == "RepoFile"}
    on_disk = {str(p.relative_to(sample_dir)) for p in sample_dir.rglob("*") if p.is_file()}
    assert set(files) == on_disk
    for path, e in files.items():
        assert e.size == (sample_dir / path).stat().st_size
        if path.endswith((".zst", ".gz", ".parquet")):
            assert e.lfs is not None and e.lfs.sha256 == _sha256(sample_dir / path)
    assert any(e.__class__.__name__ == "RepoFolder" and e.path == "data/finemath" for e in entries)


def test_pagination_with_link_header(repos, sample_dir):
    with MirrorThread(repos, page_size=3) as m:
        api = HfApi(endpoint=m.endpoint)
        entries = list(api.list_repo_tree(DEFAULT_REPO_ID, repo_type="dataset", recursive=True))
        tree_calls = [p for _, p in m.hub_requests if "/tree/" in p]
    n_files = sum(1 for p in sample_dir.rglob("*") if p.is_file())
    assert len([e for e in entries if e.__class__.__name__ == "RepoFile"]) == n_files
    assert len(tree_calls) == -(-len(entries) // 3) > 1


def test_revision_resolves_to_content_derived_sha(mirror, repos, tmp_path):
    info = HfApi(endpoint=mirror.endpoint).dataset_info(DEFAULT_REPO_ID, revision="main")
    assert info.sha == repos[0].commit and len(info.sha) == 40
    # The sha is derived from content: change a file, get another sha.
    (tmp_path / "a.jsonl").write_text('{"id": "1", "text": "x"}\n')
    first = MirrorRepo(DEFAULT_REPO_ID, tmp_path).commit
    (tmp_path / "a.jsonl").write_text('{"id": "1", "text": "y"}\n')
    assert MirrorRepo(DEFAULT_REPO_ID, tmp_path).commit != first


def test_every_listed_file_downloads_with_listed_size_and_sha(mirror, sample_dir, tmp_path):
    api = HfApi(endpoint=mirror.endpoint)
    files = [
        e
        for e in api.list_repo_tree(DEFAULT_REPO_ID, repo_type="dataset", recursive=True)
        if e.__class__.__name__ == "RepoFile"
    ]
    for e in files:
        local = Path(
            hf_hub_download(DEFAULT_REPO_ID, e.path, repo_type="dataset", endpoint=mirror.endpoint, cache_dir=tmp_path)
        )
        assert local.stat().st_size == e.size
        if e.lfs is not None:
            assert _sha256(local) == e.lfs.sha256
        else:
            git = hashlib.sha1(f"blob {e.size}\0".encode() + local.read_bytes()).hexdigest()
            assert git == e.blob_id
    # LFS files went through the CDN listener (302), the others did not.
    cdn_paths = {r["path"] for r in mirror.cdn_requests}
    assert {e.path for e in files if e.lfs is not None} <= cdn_paths
    assert not {e.path for e in files if e.lfs is None} & cdn_paths


async def _get(url: str, headers: dict | None = None, allow_redirects: bool = True):
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.get(url, headers=headers or {}, allow_redirects=allow_redirects) as r,
    ):
        return r.status, dict(r.headers), await r.read()


async def test_resolve_headers_range_and_416(mirror, sample_dir, repos):
    path = "data/common_crawl/common_crawl-0001.jsonl.zst"
    data = (sample_dir / path).read_bytes()
    url = f"{mirror.endpoint}/datasets/{DEFAULT_REPO_ID}/resolve/main/{path}"
    status, headers, _ = await _get(url, allow_redirects=False)
    assert status == 302
    assert headers["X-Repo-Commit"] == repos[0].commit
    assert headers["X-Linked-Size"] == str(len(data))
    assert headers["X-Linked-Etag"].strip('"') == hashlib.sha256(data).hexdigest()
    assert headers["Location"].startswith(mirror.cdn_endpoint)
    status, headers, body = await _get(url, {"Range": "bytes=10-99"})
    assert status == 206 and body == data[10:100] and headers["Content-Range"] == f"bytes 10-99/{len(data)}"
    status, _, body = await _get(url, {"Range": "bytes=-5"})
    assert status == 206 and body == data[-5:]
    status, headers, _ = await _get(url, {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    # Plain (non-LFS) files are served by the Hub listener itself, with Range too.
    plain = "data/wikipedia_wikibooks/wikipedia_wikibooks-0002.jsonl"
    status, headers, body = await _get(
        f"{mirror.endpoint}/datasets/{DEFAULT_REPO_ID}/resolve/main/{plain}", {"Range": "bytes=0-9"}
    )
    assert status == 206 and body == (sample_dir / plain).read_bytes()[:10]


@pytest.mark.parametrize(
    "evil",
    ["../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "data/..%2f..%2f..%2fetc/passwd", "%2Fetc%2Fpasswd", "data/%00x"],
)
async def test_traversal_gets_404(mirror, evil):
    for prefix in (f"/datasets/{DEFAULT_REPO_ID}/resolve/main/", f"/api/datasets/{DEFAULT_REPO_ID}/tree/main/"):
        status, _, body = await _get(mirror.endpoint + prefix + evil)
        assert status in (404, 400), (prefix, evil, status)
        assert b"root:" not in body


async def test_unknown_revision_and_repo_404(mirror):
    status, headers, _ = await _get(f"{mirror.endpoint}/api/datasets/{DEFAULT_REPO_ID}/revision/nope")
    assert status == 404 and headers.get("X-Error-Code") == "RevisionNotFound"
    status, _, _ = await _get(f"{mirror.endpoint}/api/datasets/someone/else/revision/main")
    assert status == 404


def test_cli_sample_and_serve_subprocess(tmp_path):
    """`mirror sample` then `mirror serve` as a user runs them; HfApi lists and downloads in full."""
    import subprocess
    import sys

    d = tmp_path / "s"
    subprocess.run(
        [sys.executable, "-m", "bolmo_async", "mirror", "sample", str(d), "--size-mb", "0.3"],
        check=True,
        capture_output=True,
    )
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "bolmo_async", "mirror", "serve", str(d), "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL,
    )
    try:
        endpoint = wait_for_endpoint(ready)
        assert endpoint.startswith("http://127.0.0.1:")
        api = HfApi(endpoint=endpoint)
        files = [
            e
            for e in api.list_repo_tree(DEFAULT_REPO_ID, repo_type="dataset", recursive=True)
            if e.__class__.__name__ == "RepoFile"
        ]
        assert len(files) == sum(1 for p in d.rglob("*") if p.is_file())
        for e in files:
            local = Path(
                hf_hub_download(
                    DEFAULT_REPO_ID, e.path, repo_type="dataset", endpoint=endpoint, cache_dir=tmp_path / "c"
                )
            )
            assert local.read_bytes() == (d / e.path).read_bytes()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize("given", ["flag", "file", "env"])
def test_serve_with_require_token_says_the_client_needs_it_in_hf_token_without_printing_it(sample_dir, tmp_path, given):
    """`mirror serve --require-token T` printed "use it with: HF_ENDPOINT=... bolmo-async prepare"
    alone: the run it suggests answered 401. It says to set HF_TOKEN to the value, never the value.
    The token on the command line is seen by every user in `ps`: from a file
    (--require-token-file) or BOLMO_ASYNC_MIRROR_TOKEN it is out of the process's arguments."""
    import subprocess
    import sys

    secret = "hf_mirror_secret_77"
    ready = tmp_path / "ready"
    cmd = [sys.executable, "-m", "bolmo_async", "mirror", "serve", str(sample_dir), "--ready-file", str(ready)]
    env = dict(os.environ)
    if given == "flag":
        cmd += ["--require-token", secret]
    elif given == "file":
        (tmp_path / "token").write_text(secret + "\n")
        cmd += ["--require-token-file", str(tmp_path / "token")]
    else:
        env["BOLMO_ASYNC_MIRROR_TOKEN"] = secret
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    try:
        endpoint = wait_for_endpoint(ready)
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")
        assert (secret in argv) == (given == "flag")  # what `ps` shows of it
        plan = ("plan", "-o", str(tmp_path / "o"), "--endpoint", endpoint)
        refused = run_cli(*plan, env={k: v for k, v in os.environ.items() if k != "HF_TOKEN"})
        assert refused.returncode != 0 and "401" in refused.stderr, refused.stderr  # the token is required
        r = run_cli(*plan, env={**os.environ, "HF_TOKEN": secret})
        assert r.returncode == 0, r.stderr
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert "set HF_TOKEN to it" in out and secret not in out, out


def test_serve_refuses_an_empty_token_file_and_two_tokens(sample_dir, tmp_path):
    (tmp_path / "empty").write_text("\n")
    r = run_cli("mirror", "serve", str(sample_dir), "--require-token-file", str(tmp_path / "empty"))
    assert r.returncode == 2 and "holds no token" in r.stderr and "Traceback" not in r.stderr, r.stderr
    (tmp_path / "t").write_text("x\n")
    r = run_cli("mirror", "serve", str(sample_dir), "--require-token-file", str(tmp_path / "t"), "--require-token", "y")
    assert r.returncode == 2 and "pass the token once" in r.stderr, r.stderr


def test_sample_is_deterministic_and_has_the_edge_documents(tmp_path):
    from bolmo_async.mirror import build_sample

    from .helpers import read_documents

    a, b = tmp_path / "a", tmp_path / "b"
    build_sample(a, size_mb=0.5, seed=3)
    build_sample(b, size_mb=0.5, seed=3)
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in fa)
    sources = {p.parent.name for p in fa if p.parent.name != "."}
    assert len(sources) >= 5
    suffixes = {"".join(p.suffixes[-2:]) if p.suffix != ".parquet" else ".parquet" for p in fa}
    assert {".jsonl.zst", ".parquet", ".jsonl.gz"} <= suffixes
    texts = [t for p in fa if p.parent.name != "." and p.name != "README.md" for _, _, t in read_documents(a / p)]
    joined = "\n".join(texts)
    assert "<|endoftext|>" in joined and "東京" in joined and "🚀" in joined and "é" in joined
    sizes = sorted(len(t.encode()) for t in texts)
    assert sizes[-1] >= 50_000 and sizes[-1] > 3 * sizes[-2]  # the several-MB document, scaled to the sample
    assert 0.95 * 500_000 <= sum(sizes) <= 1.1 * 500_000  # --size-mb is honoured
    raw = (a / "data/common_crawl/common_crawl-0000.jsonl.zst").read_bytes()
    import zstandard

    assert b'"text": ""' in zstandard.ZstdDecompressor().decompressobj().decompress(raw)


def test_mirror_serve_refuses_a_port_out_of_range(sample_dir):
    for flag in ("--port", "--cdn-port"):
        r = run_cli("mirror", "serve", str(sample_dir), flag, "99999", timeout=60)
        assert r.returncode == 2 and "is not in the range 0<=x<=65535" in r.stderr and "Traceback" not in r.stderr, (
            r.stderr
        )

"""A JSON-lines prefix (a plan's partly taken file) unverified asks the server only for its own
bytes; verified (the default over plain http) it reads the whole file and checks its hash."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import pytest
import zstandard

import bolmo_async
from bolmo_async.download import READ_CHUNK, READ_ON_FEED
from bolmo_async.mirror import MirrorRepo, MirrorThread
from bolmo_async.models import DEFAULT_REPO_ID, verifies_prefixes
from bolmo_async.outdir import marker_name, open_output
from bolmo_async.planner import load_plan
from bolmo_async.progress import Progress
from bolmo_async.util import human_bytes

from .helpers import run_cli, shard_documents, shard_hashes


def _prefixes(out: Path) -> dict[str, dict]:
    plan = json.loads((out / "plan.json").read_text())
    return {
        f["path"]: f
        for f in plan["files"]
        if f["limit"] is not None and f["limit"] < f["size"] and not f["path"].endswith(".parquet")
    }


def _markers(out: Path) -> dict[str, dict]:
    od = open_output(out)
    return {pf.path: json.loads(od.read_bytes(marker_name(pf.key)) or b"null") for pf in load_plan(od).files}


def test_a_json_lines_prefix_asks_only_its_bytes_and_stages_what_the_whole_file_gives(tmp_path, mirror):
    """Every request for a prefix's file is a Range inside the prefix; the shards equal those of
    a run that downloads every file whole and verifies it (``--no-streaming``)."""
    got = bolmo_async.prepare(
        tmp_path / "a", endpoint=mirror.endpoint, data_fraction=0.3, progress=False, verify_prefixes=False
    )
    prefixes = _prefixes(tmp_path / "a")
    lfs = {p for p in prefixes if p.endswith((".zst", ".gz"))}
    assert lfs, "the sample's plan at 30% has compressed JSON-lines prefixes"
    asked = [r for r in mirror.cdn_requests if r["path"] in prefixes]
    assert {r["path"] for r in asked} == lfs
    markers = _markers(tmp_path / "a")
    on = set()  # prefixes whose limit cuts their first document: read on from the limit
    for r in asked:
        assert r["range"], r  # never the whole file
        lo, _, hi = r["range"].removeprefix("bytes=").partition("-")
        limit = prefixes[r["path"]]["limit"]
        if int(lo) == limit:
            on.add(r["path"])
        else:
            assert int(lo) < int(hi) < limit, r
    for path, f in prefixes.items():
        if path in on and markers[path]["sha256"]:
            continue  # read on to the file's end (a small file): then it is verified whole
        assert markers[path]["sha256"] is None, (path, f)
        assert markers[path]["read_bytes"] > f["limit"] if path in on else markers[path]["read_bytes"] == f["limit"]
    assert len(on) < len(lfs)
    plan = json.loads((tmp_path / "a" / "plan.json").read_text())
    whole = [markers[f["path"]] for f in plan["files"] if f["limit"] is None]
    assert whole and all(m["sha256"] for m in whole)  # whole files are still verified

    want = bolmo_async.prepare(
        tmp_path / "b", endpoint=mirror.endpoint, data_fraction=0.3, progress=False, streaming=False
    )
    assert shard_hashes(got) == shard_hashes(want)


def _doc(i: int, rng: random.Random, n: int) -> bytes:
    text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 \n") for _ in range(n))
    return json.dumps({"id": f"d{i}", "text": text}).encode() + b"\n"


def test_a_prefix_holding_no_whole_document_reads_on_to_its_first_and_stops(tmp_path):
    """The plan takes at least one document: a prefix shorter than the first document reads past
    its limit until that document ends, and stops there, not at the end of the file."""
    rng = random.Random(7)
    lines = [_doc(0, rng, 600_000)] + [_doc(i, rng, 2_000) for i in range(1, 4_000)]
    folder = tmp_path / "repo" / "data" / "big"
    folder.mkdir(parents=True)
    raw = zstandard.ZstdCompressor(level=3).compress(b"".join(lines))
    (folder / "big-0000.jsonl.zst").write_bytes(raw)
    first_end = len(zstandard.ZstdCompressor(level=3).compress(lines[0]))  # roughly where doc 0 ends
    with MirrorThread([MirrorRepo(DEFAULT_REPO_ID, tmp_path / "repo")]) as m:
        got = bolmo_async.prepare(
            tmp_path / "a", endpoint=m.endpoint, data_fraction=0.01, progress=False, verify_prefixes=False
        )
        want = bolmo_async.prepare(
            tmp_path / "b", endpoint=m.endpoint, data_fraction=0.01, progress=False, streaming=False
        )
    (f,) = _prefixes(tmp_path / "a").values()
    assert f["limit"] < first_end < f["size"] // 2
    assert [d[2] for d in shard_documents(got)] == [1]  # one document, the first
    assert shard_hashes(got) == shard_hashes(want)
    read = _markers(tmp_path / "a")[f["path"]]["read_bytes"]
    # past the document's end by at most a hand-over (64 KiB) and the reads it came in (256 KiB
    # each); the compressed document's end is only roughly ``first_end``, hence one more hand-over
    assert first_end <= read <= first_end + 2 * READ_CHUNK + 2 * READ_ON_FEED < f["size"], (read, first_end)


def test_by_default_a_prefix_is_read_whole_and_verified_over_plain_http(tmp_path, mirror):
    """Over http nothing but TCP's checksum guards the bytes: the whole file is read and its hash
    checked, as a corrupting network then still gives the same shards (test_faults)."""
    bolmo_async.prepare(tmp_path / "a", endpoint=mirror.endpoint, data_fraction=0.3, progress=False)
    prefixes = _prefixes(tmp_path / "a")
    asked = [r for r in mirror.cdn_requests if r["path"] in prefixes]
    assert asked and all(r["range"] is None for r in asked)
    markers = _markers(tmp_path / "a")
    for p, f in prefixes.items():  # the LFS sha256, or the git blob id of a small file
        assert markers[p]["sha256"] == (f["sha256"] or f["oid"]) and "read_bytes" not in markers[p], p


def test_over_https_a_prefix_reads_only_its_bytes_unless_asked():
    assert verifies_prefixes(None, "http://127.0.0.1:8080")
    assert not verifies_prefixes(None, None)  # the Hub
    assert not verifies_prefixes(None, "https://huggingface.co")
    assert not verifies_prefixes(None, "HTTPS://hf-mirror.example")
    assert verifies_prefixes(True, "https://huggingface.co")
    assert not verifies_prefixes(False, "http://127.0.0.1:8080")


def test_the_plan_table_says_what_each_way_downloads(tmp_path, mirror):
    """The table's download column counts a JSON-lines prefix's whole file when it is read whole
    (over http by default) and only its bytes when not."""
    totals = {}
    for flags, whole in (
        (("--verify-prefixes",), True),
        (("--no-verify-prefixes",), False),
        (("--no-verify-prefixes", "--no-streaming"), True),  # whole files kept (as over https by default)
    ):
        out = tmp_path / "-".join(flags)
        args = ("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.3", "--no-progress")
        r = run_cli(*args, *flags)
        assert r.returncode == 0, r.stderr
        (line,) = [x for x in r.stdout.splitlines() if x.startswith("TOTAL")]
        files = load_plan(open_output(out)).files
        want = human_bytes(sum(f.read_bytes(whole) for f in files))
        assert line.split()[2] + " " + line.split()[3] == want, (line, want)
        totals[whole] = sum(f.read_bytes(whole) for f in files)
    assert totals[True] > totals[False]


def test_the_progress_total_counts_the_whole_files_no_streaming_reads(tmp_path, mirror, monkeypatch):
    """``--no-streaming`` reads and keeps whole files, a JSON-lines prefix's too, however prefixes
    are verified (over https by default they are not): its progress total counts them whole from
    the start, so the bytes read never pass it (they did until each file was staged: 198 KB read
    of a total of 36 KB here). Parquet prefixes are left out: the footer and whole row groups a
    streaming read takes past the limit are known only once read."""
    seen: list[tuple[int, int]] = []
    add_bytes = Progress.add_bytes

    def spy(self: Progress, n: int) -> None:
        add_bytes(self, n)
        seen.append((self.bytes, self.total_bytes))

    monkeypatch.setattr(Progress, "add_bytes", spy)
    for verify in (None, False):
        seen.clear()
        out = tmp_path / str(verify)
        bolmo_async.prepare(
            out,
            endpoint=mirror.endpoint,
            data_fraction=0.05,
            exclude=["*.parquet"],
            progress=True,
            processes=1,
            streaming=False,
            verify_prefixes=verify,
        )
        assert _prefixes(out)
        assert seen and all(read <= total for read, total in seen), (verify, seen)


def test_a_run_that_verifies_prefixes_stages_again_those_staged_unverified(tmp_path, mirror):
    """A prefix staged without its hash checked is not reused by a rerun that checks them (here
    ``--verify-prefixes``; the default over http alike): it is read whole and verified, while a
    rerun that does not check them reuses it. The shards stay those of ``--no-streaming``."""
    out = tmp_path / "a"
    bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.3, progress=False, verify_prefixes=False)
    unverified = {p for p, m in _markers(out).items() if m["sha256"] is None and "read_bytes" in m}
    assert unverified
    mirror.cdn_requests.clear()
    bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.3, progress=False, verify_prefixes=False)
    assert not mirror.cdn_requests  # nothing to fetch: every file is staged
    got = bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.3, progress=False, verify_prefixes=True)
    prefixes = _prefixes(out)
    markers = _markers(out)
    for p in unverified:  # the LFS sha256, or the git blob id of a small file
        assert markers[p]["sha256"] == (prefixes[p]["sha256"] or prefixes[p]["oid"]) and "read_bytes" not in markers[p]
    asked = {r["path"] for r in mirror.cdn_requests}
    assert asked == {p for p in unverified if p.endswith((".zst", ".gz"))}  # only those, read whole
    assert all(r["range"] is None for r in mirror.cdn_requests)
    want = bolmo_async.prepare(
        tmp_path / "b", endpoint=mirror.endpoint, data_fraction=0.3, progress=False, streaming=False
    )
    assert shard_hashes(got) == shard_hashes(want)


def test_over_https_a_prefix_reads_only_its_bytes_by_default(tmp_path, repos):
    """The default end to end over TLS (the mirror with a test CA's certificate, trusted by the
    command through SSL_CERT_FILE as a user's system CAs would be): only the prefixes' bytes."""
    import os
    import ssl

    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SSL_CERT", "HF_ENDPOINT"))}
    env.update(SSL_CERT_FILE=str(tmp_path / "ca.pem"), SSL_CERT_DIR=str(tmp_path / "none"))
    out = tmp_path / "o"
    with MirrorThread(repos, ssl_context=server_ctx) as m:
        assert m.endpoint.startswith("https://") and m.cdn_endpoint.startswith("https://")
        args = ("prepare", "-o", str(out), "--endpoint", m.endpoint, "--data-fraction", "0.3", "--no-progress")
        r = run_cli(*args, env=env)
        assert r.returncode == 0, r.stderr
        prefixes = _prefixes(out)
        asked = [q for q in m.cdn_requests if q["path"] in prefixes]
    assert asked and all(q["range"] for q in asked)
    markers = _markers(out)
    unchecked = [p for p in prefixes if markers[p]["sha256"] is None]
    assert unchecked and all(markers[p]["read_bytes"] >= prefixes[p]["limit"] for p in unchecked)


def test_progress_never_shows_more_read_than_its_total(caplog):
    """A prefix read on past its limit reads more than the plan foresaw; its total follows only
    when the file is staged, so meanwhile the shown total is what was read, never under it."""
    with caplog.at_level(logging.INFO, logger="bolmo_async"), Progress(1, 100_000, enabled=True) as p:
        p.add_bytes(150_000)  # the read-on, before its Staged message
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert re.search(r"progress: (\S+ \S+) / \1 ", line) and "ETA 0s" in line, line

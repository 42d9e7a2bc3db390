"""The output folder's owner (``bolmo_async.outdir``): links are replaced, never written through;
every name fits the filesystem; a failed first command leaves nothing; errors cross executors."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bolmo_async
from bolmo_async import errors
from bolmo_async.mirror import MirrorRepo, MirrorThread
from bolmo_async.outdir import DATA_SOURCES, MANIFEST, shard_name
from bolmo_async.outdir.local import LOCK

from .helpers import readme_bpe_json, run_cli, shard_hashes, worker_processes


def _prepare(out: Path, endpoint: str, **kw):
    kw.setdefault("progress", False)
    return bolmo_async.prepare(out, endpoint=endpoint, data_fraction=0.2, max_tokens_per_file=200_000, **kw)


def test_a_link_planted_at_a_shard_name_is_replaced_not_written_through(mirror, tmp_path):
    out, outside = tmp_path / "o", tmp_path / "outside"
    outside.mkdir()
    clean = _prepare(tmp_path / "clean", mirror.endpoint)
    bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=0.2, progress=False)
    victim = outside / "precious.bin"
    victim.write_bytes(b"do not touch")
    (out / shard_name(0)).symlink_to(victim)
    (out / "bolmo_data_00000.csv.gz").symlink_to(outside / "index.csv.gz")  # a dangling link too
    (out / MANIFEST).symlink_to(outside / "m.json")
    manifest = bolmo_async.finalize(out, max_tokens_per_file=200_000)
    assert victim.read_bytes() == b"do not touch"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.bin"]  # nothing created outside
    for s in manifest["shards"]:
        for p in (Path(s["path"]), Path(s["csv"])):
            assert p.parent == out.resolve() and p.is_file() and not p.is_symlink()
    listed = (out / DATA_SOURCES).read_text().split()
    assert listed and all(Path(p).parent == out.resolve() for p in listed)
    assert not (out / MANIFEST).is_symlink()
    assert shard_hashes(manifest) == shard_hashes(clean)
    assert bolmo_async.inspect(out)["problems"] == []


@pytest.mark.parametrize("command", ["plan", "fetch", "prepare", "finalize"])
def test_a_link_at_the_lock_never_truncates_its_target(mirror, tmp_path, command):
    out = tmp_path / "o"
    if command == "finalize":
        bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=0.05, progress=False)
        (out / LOCK).unlink()
    else:
        out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / LOCK).symlink_to(victim)
    if command == "plan":
        bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.05)
    elif command == "fetch":
        bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=0.05, progress=False)
    elif command == "prepare":
        _prepare(out, mirror.endpoint)
    else:
        bolmo_async.finalize(out)
    assert victim.read_text() == "precious\n"
    assert not (out / LOCK).is_symlink()


def test_a_listed_name_longer_than_the_filesystem_allows_is_kept_under_a_name_that_fits(tmp_path, sample_dir):
    """100 emoji: 406 bytes as a file name, which no common filesystem takes (255 a name)."""
    src = tmp_path / "src" / "data" / "web"
    src.mkdir(parents=True)
    real = next(p for p in sorted((sample_dir / "data").rglob("*.jsonl.zst")))
    shutil.copy(real, src / "f.jsonl.zst")
    repo = MirrorRepo("allenai/bolmo_mix", tmp_path / "src")
    long = "data/web/" + "\U0001f600" * 100 + ".jsonl"  # served under a name no disk could hold
    (entry,) = repo.files.values()
    repo.files = {long: dataclasses.replace(entry, path=long)}
    # The .zst content under a .jsonl name would not decode: serve a plain JSON-lines file instead.
    import zstandard

    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(zstandard.ZstdDecompressor().decompressobj().decompress(real.read_bytes()))
    from bolmo_async.mirror.server import _hash_file

    oid, sha, size = _hash_file(str(plain))
    repo.files = {long: dataclasses.replace(entry, abspath=str(plain), oid=oid, sha256=sha, size=size)}
    assert len(long.rsplit("/", 1)[1].encode()) == 406
    out = tmp_path / "o"
    with MirrorThread([repo]) as m:
        manifest = bolmo_async.prepare(
            out, endpoint=m.endpoint, data_fraction=1.0, streaming=False, progress=False, processes=1
        )
    assert manifest["complete"] and manifest["totals"]["documents"] > 0
    kept = [p for p in (out / "raw").rglob("*") if p.is_file()]
    assert len(kept) == 1 and len(kept[0].name.encode()) <= 200 and kept[0].name.endswith(".jsonl")


def test_a_failed_first_command_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "e1"
    with pytest.raises(errors.BolmoError):
        bolmo_async.plan(out, endpoint="http://127.0.0.1:9")  # nothing listens there
    assert not out.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    with pytest.raises(errors.BolmoError):
        bolmo_async.plan(existing, endpoint="http://127.0.0.1:9")
    assert existing.is_dir()  # the user's own folder stays


def _listing(folder: Path) -> dict[str, tuple[bool, bytes]]:
    return {str(p.relative_to(folder)): (p.is_dir(), b"" if p.is_dir() else p.read_bytes()) for p in folder.rglob("*")}


@pytest.mark.parametrize(
    "found",
    [
        # the original script's output: refused (not a plan of ours)
        {"bolmo_data_00000.npy": b"x", "data_sources.txt": b"x"},
        {"plan.json/notes.txt": b"x"},  # a folder where plan.json goes: refused
        {"plan.json": b"{not json"},  # refused: not a readable plan
    ],
    ids=["original-output", "folder-in-the-way", "unreadable-plan"],
)
def test_a_refused_first_run_leaves_the_users_folder_as_it_was(mirror, tmp_path, found):
    """A first command refused on a folder the user already had leaves no .bolmo-async.lock there:
    the folder lists exactly as before (the CLI, as a user runs it)."""
    out = tmp_path / "mine"
    for name, data in found.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = _listing(out)
    r = run_cli("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.05", "--no-progress")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert _listing(out) == before, r.stderr
    # ... and the next run takes the folder's lock as usual (made again, held, released)
    assert bolmo_async.plan(tmp_path / "mine2", endpoint=mirror.endpoint, data_fraction=0.05).files


def test_a_lock_file_removed_while_a_run_takes_it_is_told(tmp_path):
    """The lock a refused run made goes (``discard_if_unused``); a run that opened it just before
    sees that its file is no longer the folder's lock (``lock`` opens it again): a lock on a
    removed file would keep no other run out."""
    from bolmo_async.outdir.local import _replaced

    lock = tmp_path / LOCK
    lock.write_bytes(b"")
    fd = os.open(lock, os.O_RDWR)
    try:
        assert not _replaced(fd, lock)
        lock.unlink()
        assert _replaced(fd, lock)  # gone
        (tmp_path / "keep").write_bytes(b"")  # (so that the new file gets another inode)
        lock.write_bytes(b"")
        assert _replaced(fd, lock)  # made again: another file
    finally:
        os.close(fd)


def test_an_unwritable_folder_names_the_folder_and_the_permission(mirror, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: a read-only folder needs another user")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(errors.UsageError, match=r"permission") as info:
            bolmo_async.plan(out, endpoint=mirror.endpoint)
        assert str(out) in str(info.value)
    finally:
        out.chmod(0o755)


def test_a_read_only_mount_names_the_folder_and_the_permission(mirror, tmp_path):
    """As root a chmod does not stop writes: a read-only bind mount does."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount")
    import subprocess

    out = tmp_path / "ro"
    _prepare(out, mirror.endpoint)
    if subprocess.run(["mount", "--bind", "-o", "ro", str(out), str(out)], capture_output=True).returncode:
        pytest.skip("bind mounts are not allowed here")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(out)], capture_output=True)
        with pytest.raises(errors.UsageError) as info:
            _prepare(out, mirror.endpoint)
        assert str(out.resolve()) in str(info.value) and "read-only" in str(info.value).lower()
        assert "rerun" not in str(info.value)
    finally:
        subprocess.run(["umount", "-l", str(out)], check=False)


@pytest.mark.parametrize("name", ["marker", "bolmo_data_00000.npy", "bolmo_data_00000.csv.gz", DATA_SOURCES, MANIFEST])
def test_a_folder_made_at_a_name_the_run_writes_is_one_line_naming_it(mirror, tmp_path, name):
    """A folder (made by hand, a copy gone wrong) where a run writes a file: the rename onto it
    failed with "unexpected IsADirectoryError ... rerun the same command ... report the traceback",
    and a rerun failed the same way for good (inspect too, reading it). One line names it and the
    fix; the folder is kept."""
    out = tmp_path / "o"
    bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=0.2, progress=False)
    command = ["finalize", "-o", str(out)]
    if name == "marker":
        marker = sorted((out / "staging").glob("*.json"))[0]
        marker.unlink()
        name = f"staging/{marker.name}"
        command = ["fetch", "-o", str(out), "--endpoint", mirror.endpoint, "--no-progress"]
    (out / name / "kept").mkdir(parents=True)
    done = run_cli(*command)
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and "unexpected" not in done.stderr and "traceback" not in done.stderr, done.stderr
    said = [line for line in lines if f"{out / name} is a folder" in line]
    assert said and "move it away" in said[-1], done.stderr
    assert (out / name / "kept").is_dir()
    looked = run_cli("inspect", str(out))  # reading it failed as "unexpected IsADirectoryError"
    assert looked.returncode == 1 and "unexpected" not in looked.stderr, looked.stderr


def test_a_removed_plan_json_is_named_with_the_plan_that_repairs_it(mirror, tmp_path):
    """plan.json removed by hand after a fetch: inspect said to run finalize, and finalize to run
    fetch, which plans at the default --data-fraction 0.01, not the folder's. Both name what is
    missing and the plan that repairs it; that plan takes the staged files, and the shards are
    a clean run's."""
    clean = _prepare(tmp_path / "clean", mirror.endpoint)
    out = tmp_path / "o"
    bolmo_async.fetch(out, endpoint=mirror.endpoint, data_fraction=0.2, progress=False)
    (out / "plan.json").unlink()
    for args in (("inspect", str(out)), ("finalize", "-o", str(out))):
        done = run_cli(*args)
        lines = done.stderr.strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1, done.stderr
        assert "no plan.json" in lines[0] and f"bolmo-async plan --output-dir {out} --data-fraction" in lines[0], lines
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.2)
    res = bolmo_async.fetch(out, endpoint=mirror.endpoint, progress=False)
    assert res["fetched_now"] == 0
    done = bolmo_async.finalize(out, max_tokens_per_file=200_000)
    assert shard_hashes(done) == shard_hashes(clean)


def test_a_removed_plan_json_is_named_with_the_plan_its_manifest_records(mirror, tmp_path):
    """plan.json removed after a finalize: the advice quotes the plan the manifest records
    (revision, fraction, seed, selection), not `--data-fraction F (and --seed, ... if they were
    set)`, and following it gives the same shards from the staging. A bare fetch there (which
    keeps a folder's plan) says the same: it planned the defaults (1% of every source) and rewrote
    the output for them without a word."""
    out = tmp_path / "o"
    bolmo_async.plan(
        out,
        endpoint=mirror.endpoint,
        data_fraction=0.3,
        seed=7,
        include=["data/arxiv/*", "data/common_crawl/*", "data/wikipedia*"],
        source_fractions={"data/arxiv": 0.5},
    )
    bolmo_async.fetch(out, endpoint=mirror.endpoint, progress=False)
    clean = bolmo_async.finalize(out, max_tokens_per_file=200_000)
    (out / "plan.json").unlink()
    said = set()
    for args in (("finalize", "-o", str(out)), ("fetch", "-o", str(out))):
        done = run_cli(*args, *(("--endpoint", mirror.endpoint) if args[0] != "finalize" else ()))
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and "no plan.json" in lines[0], done.stderr
        said.add(lines[0].split("`")[1])
    assert not (out / "plan.json").exists() and (out / DATA_SOURCES).exists()
    assert len(said) == 1, said
    again = shlex.split(said.pop())
    assert again[:4] == ["bolmo-async", "plan", "--output-dir", str(out)], again
    for flag in ("--revision", clean["revision"], "--data-fraction", "0.3", "--seed", "7", "--include", "data/arxiv/*"):
        assert flag in again, again
    assert "data/arxiv=0.5" in again and "F" not in again, again
    done = run_cli(*again[1:], "--endpoint", mirror.endpoint)
    assert done.returncode == 0, done.stderr
    res = bolmo_async.fetch(out, endpoint=mirror.endpoint, progress=False)
    assert res["fetched_now"] == 0
    assert shard_hashes(bolmo_async.finalize(out)) == shard_hashes(clean)


def test_inspect_of_a_folder_that_is_not_ours_says_so(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(errors.StateError, match="not an output folder of bolmo-async"):
        bolmo_async.inspect(tmp_path)


def test_inspect_decode_of_a_damaged_output_reports_it_instead_of_failing(mirror, tmp_path):
    """inspect --decode read a truncated shard short ("unexpected ValueError: buffer size must be
    a multiple of element size", its report lost) and a cut .csv.gz crashed it as well: the tool
    meant to find damage failed on it. Shards that fail their check are not decoded, an index that
    does not read is one more problem, and the documents come from the sound shards."""
    out = tmp_path / "o"
    bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.2, max_tokens_per_file=50_000, progress=False)
    names = [r["path"] for r in bolmo_async.inspect(out)["shards"]]
    assert len(names) >= 3
    with open(out / names[0], "r+b") as f:
        f.truncate(6)
    index = out / names[1].replace(".npy", ".csv.gz")
    index.write_bytes(index.read_bytes()[:-20])
    rep = bolmo_async.inspect(out, decode=3)
    assert len(rep["problems"]) == 2, rep["problems"]
    assert "6 bytes, not a whole number" in rep["problems"][0] and "cannot be read" in rep["problems"][1]
    assert len(rep["documents"]) == 3 and all(d["text"] for d in rep["documents"])
    done = run_cli("inspect", str(out), "--decode", "3")
    assert done.returncode == 1 and "unexpected" not in done.stderr and done.stderr.count("problem:") == 2, done.stderr


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        (lambda m: {**m, "shards": [{}]}, "shard entry 0 has no valid"),
        (lambda m: {k: v for k, v in m.items() if k != "repo_id"}, "no valid 'repo_id'"),
        (lambda m: {**m, "shards": "abc"}, "no valid 'shards'"),
        (lambda m: {**m, "tokenizer": {"kind": "byte"}}, "no valid 'tokenizer'"),
        (lambda m: [m], "not a JSON object"),
    ],
)
def test_inspect_of_a_damaged_manifest_is_one_line_not_a_traceback(mirror, tmp_path, edit, says):
    """A manifest that parses but is not one (hand-edited, damaged, another program's): a shard
    entry without its path ended inspect in "unexpected KeyError", one without repo_id in a full
    Python traceback from the report's first line."""
    import json

    out = tmp_path / "o"
    manifest = _prepare(out, mirror.endpoint)
    (out / MANIFEST).write_text(json.dumps(edit(manifest)))
    with pytest.raises(errors.StateError, match=r"manifest\.json is unreadable"):
        bolmo_async.inspect(out)
    done = run_cli("inspect", str(out))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and says in lines[0] and "finalize" in lines[0], done.stderr


@pytest.mark.parametrize(
    "field, edit",
    [
        ("data_fraction", lambda m: {**m, "data_fraction": 0.5}),
        ("seed", lambda m: {**m, "seed": 7}),
        ("selection", lambda m: {**m, "selection": {**m["selection"], "include": ["data/*"]}}),
        ("planned_files", lambda m: {**m, "planned_files": m["planned_files"] + 1}),
        ("complete", lambda m: {**m, "complete": False}),
        ("totals", lambda m: {**m, "totals": {**m["totals"], "tokens": m["totals"]["tokens"] + 1}}),
        ("tokenizer", lambda m: {**m, "tokenizer": {**m["tokenizer"], "eos_token_id": 2}}),
    ],
)
def test_inspect_flags_a_manifest_header_that_disagrees_with_the_folder(mirror, tmp_path, field, edit):
    """Hand-edited header fields (attack17): the shards still matched their entries, so inspect
    said all was well, and its first line reported the edited fraction, seed or tokenizer as the
    output's. Each is checked against what the folder holds (plan.json, run.json, the shard
    entries, the missing files), and finalize puts it right."""
    import json

    out = tmp_path / "o"
    manifest = _prepare(out, mirror.endpoint)
    (out / MANIFEST).write_text(json.dumps(edit(manifest)))
    problems = bolmo_async.inspect(out)["problems"]
    assert len(problems) == 1 and f"{field}" in problems[0] and "finalize --output-dir" in problems[0], problems
    done = run_cli("inspect", str(out))
    assert done.returncode == 1 and f"{field}" in done.stdout + done.stderr, (done.stdout, done.stderr)
    bolmo_async.finalize(out)
    assert bolmo_async.inspect(out)["problems"] == []


_HOLD = """
import sys
from bolmo_async.outdir import open_output
with open_output(sys.argv[1]).lock(shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def _held(out: Path, how: str) -> Iterator[int]:
    """Another process holds ``out``'s lock as a run does (``alone``) or as a share (``shared``); its pid."""
    import subprocess

    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out), how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield holder.pid
    finally:
        holder.communicate("", timeout=30)


def test_inspect_while_a_run_writes_the_folder_says_so_instead_of_advising_a_repair(mirror, tmp_path):
    """inspect during a finalize reported the shards it was rewriting as damage ("holds 49947
    tokens, the manifest says 997749: run `finalize`"), advice a busy folder refuses. It now sees
    the run's lock (without taking it: a run starting meanwhile must not be refused) and says the
    run is writing; once the run ends the same damage gets the repair advice."""
    out = tmp_path / "o"
    _prepare(out, mirror.endpoint)
    assert bolmo_async.inspect(out)["running"] is None
    first = bolmo_async.inspect(out)["shards"][0]["path"]
    with open(out / first, "r+b") as f:  # what a finalize rewriting it looks like midway
        f.truncate(8)
    for how, who in (("alone", "a bolmo-async run"), ("shared", "a job-array share (`fetch --worker`,")):
        with _held(out, how) as pid:
            rep = bolmo_async.inspect(out)
            assert rep["running"].startswith(who) and rep["running"].endswith(f"process {pid})"), rep["running"]
            assert rep["problems"] and all(
                "is writing this folder now: inspect it again once that ends" in p and "finalize" not in p
                for p in rep["problems"]
            ), rep["problems"]
            if how == "shared":  # shares run beside each other: an inspect never refuses the next one
                done = run_cli("fetch", "-o", str(out), "--worker", "0/1", "--endpoint", mirror.endpoint)
                assert done.returncode == 0, done.stderr
    rep = bolmo_async.inspect(out)
    assert rep["running"] is None and "run `bolmo-async finalize" in rep["problems"][0]
    (out / MANIFEST).unlink()
    with _held(out, "alone"), pytest.raises(errors.StateError, match=r"has no manifest.json yet: a bolmo-async run"):
        bolmo_async.inspect(out)


def test_inspect_after_drop_staging_advises_the_fetch_that_repairs_not_finalize_alone(mirror, tmp_path):
    """After --drop-staging, inspect's advice for a damaged shard was `finalize` ("it rewrites what
    is wrong from the staging"), which refuses there: nothing is staged (fixer18 left it). It
    names the fetch (with the folder's endpoint and tokenizer) and then finalize, and following
    it word for word repairs the folder."""
    out = tmp_path / "o"
    _prepare(out, mirror.endpoint)
    done = run_cli("finalize", "-o", str(out), "--drop-staging")
    assert done.returncode == 0, done.stderr
    first = bolmo_async.inspect(out)["shards"][0]["path"]
    with open(out / first, "r+b") as f:
        f.truncate(8)
    problems = bolmo_async.inspect(out)["problems"]
    assert len(problems) == 1 and "its staging was dropped" in problems[0], problems
    steps = [shlex.split(c) for c in problems[0].split("`")[1::2]]
    assert [c[:2] for c in steps] == [["bolmo-async", "fetch"], ["bolmo-async", "finalize"]], steps
    assert "--endpoint" in steps[0]
    for c in steps:
        done = run_cli(*c[1:], *(["--no-progress"] if c[1] == "fetch" else []))
        assert done.returncode == 0, done.stderr
    assert bolmo_async.inspect(out)["problems"] == []


# -- errors cross executors as themselves ----------------------------------------------------


def _raise(name: str, message: str) -> None:
    raise getattr(errors, name)(message)


CROSSING = sorted(
    n
    for n in errors.__all__
    if isinstance(getattr(errors, n), type) and issubclass(getattr(errors, n), errors.BolmoError)
    if n not in ("BolmoError", "FetchIncomplete")
)


def test_every_error_class_is_in_errors_py():
    import importlib
    import inspect as pyinspect
    import pkgutil

    import bolmo_async as pkg

    outside = []
    for info in pkgutil.walk_packages(pkg.__path__, "bolmo_async."):
        # ``preload`` is the fork server's own import (it ignores SIGTERM and SIGHUP, as the server
        # must): imported here it left them ignored in this process and every CLI a later test
        # started inherited that, as under nohup.
        if info.name.endswith(("__main__", ".errors", ".preload")):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if pyinspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == info.name:
                outside.append(f"{info.name}.{name}")
    assert outside == [], "exceptions outside errors.py"
    assert set(CROSSING) <= set(errors.__all__)


@pytest.mark.parametrize("name", CROSSING)
def test_an_error_rebuilt_from_a_worker_is_the_same_class_with_the_same_message(name):
    cls = getattr(errors, name)
    rebuilt = errors.rebuild(name, "the message")
    assert type(rebuilt) is cls and str(rebuilt) == "the message"


def _readme_bpe(path: Path) -> Path:
    path.write_text(readme_bpe_json())
    return path


def test_an_engine_mismatch_in_a_worker_process_arrives_as_engine_mismatch(mirror, tmp_path):
    """A worker process's fatal error reaches the coordinator as the same class and message."""
    tok = _readme_bpe(tmp_path / "tokenizer.json")
    with pytest.raises(errors.EngineMismatch) as info:
        bolmo_async.fetch(
            tmp_path / "o",
            endpoint=mirror.endpoint,
            data_fraction=0.2,
            progress=False,
            processes=2,
            tokenizer="subword",
            tokenizer_identifier=str(tok),
            engine="fastokens",
            check_every=1,
        )
    assert type(info.value) is errors.EngineMismatch and "fastokens" in str(info.value)


def test_a_worker_process_dying_in_a_local_pool_fails_only_its_files_and_a_rerun_finishes(repos, tmp_path):
    import threading

    import psutil

    from bolmo_async.mirror import FaultConfig

    with MirrorThread(repos) as m:
        clean = _prepare(tmp_path / "clean", m.endpoint)
    faults = FaultConfig(rate=1.0, kinds=("trickle",), trickle_delay=0.05, max_per_path=10**6)
    out = tmp_path / "o"
    with MirrorThread(repos, faults=faults) as m:
        bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=0.2)
        caught: list[BaseException] = []

        def run() -> None:
            try:
                bolmo_async.fetch(out, endpoint=m.endpoint, progress=False, processes=2)
            except BaseException as exc:
                caught.append(exc)

        t = threading.Thread(target=run)
        t.start()
        deadline = __import__("time").monotonic() + 60
        while len(faults._per_path) < 3:  # 3 files in flight, at most 2 a worker: both hold files
            assert t.is_alive() and __import__("time").monotonic() < deadline
            __import__("time").sleep(0.01)
        workers = worker_processes(psutil.Process())
        assert len(workers) == 2
        workers[0].kill()
        t.join(120)
        assert not t.is_alive()
        faults.rate = 0.0
        (exc,) = caught
        assert isinstance(exc, errors.FetchIncomplete)
        assert exc.failed
        for why in exc.failed.values():  # what happened, exactly, and what to do
            assert f"(pid {workers[0].pid}) was killed by SIGKILL" in why, why
            assert "out-of-memory killer" in why and "rerun to fetch it again" in why, why
        assert "call bolmo_async.fetch() again with the same arguments to resume" in str(exc).lower(), exc
        manifest = _prepare(out, m.endpoint)
    assert manifest["complete"] and shard_hashes(manifest) == shard_hashes(clean)


def test_rerunning_a_finished_prepare_touches_nothing(mirror, tmp_path, caplog):
    out = tmp_path / "o"
    first = _prepare(out, mirror.endpoint)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name != LOCK}
    caplog.set_level("INFO", logger="bolmo_async")
    again = bolmo_async.prepare(
        out, endpoint=mirror.endpoint, data_fraction=0.2, max_tokens_per_file=200_000, progress=False
    )
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name != LOCK}
    assert again == first and after == before
    assert "complete and current" in caplog.text and "nothing rewritten" in caplog.text
    # Another bound is not "finished": the shards are rewritten for it.
    other = bolmo_async.prepare(
        out, endpoint=mirror.endpoint, data_fraction=0.2, max_tokens_per_file=100_000, progress=False
    )
    assert other["max_tokens_per_file"] == 100_000 and len(other["shards"]) > len(first["shards"])


def test_a_wrong_keyword_names_the_public_function_and_touches_nothing(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(
        TypeError, match=r"^prepare\(\) got an unexpected keyword argument 'tokeniser'; did you mean 'tokenizer'"
    ):
        bolmo_async.prepare(out, tokeniser="byte")
    with pytest.raises(TypeError, match=r"^fetch\(\) got an unexpected keyword argument 'fraction'"):
        bolmo_async.fetch(out, fraction=0.1)
    # A job array's share is fetch's (the CLI's prepare has no --worker): prepare(worker="0/2")
    # fetched one share, then its finalize failed on the other's files.
    with pytest.raises(TypeError, match=r"^prepare\(\) got an unexpected keyword argument 'worker'.*fetch\("):
        bolmo_async.prepare(out, worker="0/2")
    assert not out.exists()


def test_a_script_without_the_main_guard_gets_one_clear_error(mirror, tmp_path):
    """Worker processes import the calling script again; one that calls the API at top level must
    not stack up tracebacks or blame another run for the folder."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(
        "import bolmo_async\n"
        f"bolmo_async.prepare({str(tmp_path / 'o')!r}, endpoint={mirror.endpoint!r}, data_fraction=0.3, "
        "processes=2, progress=False)\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1
    assert 'if __name__ == "__main__":' in r.stderr and "another bolmo-async run" not in r.stderr
    assert r.stderr.count("Traceback") <= 1, r.stderr


def test_a_script_read_from_standard_input_is_told_to_be_a_file(mirror, tmp_path):
    """`python - <<EOF` (a script on standard input, guarded): worker processes import the calling
    script by its path, '<stdin>', which is no file; the error told the user to add the
    `if __name__ == "__main__":` they had. It names the script that cannot be imported and the fix."""
    import subprocess
    import sys

    script = (
        "import bolmo_async\n"
        "if __name__ == '__main__':\n"
        f"    bolmo_async.prepare({str(tmp_path / 'o')!r}, endpoint={mirror.endpoint!r}, data_fraction=0.3, "
        "processes=2, progress=False)\n"
    )
    r = subprocess.run([sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert "'<stdin>'" in last and "processes=1" in last and "__main__" not in last, last


def test_only_outdir_spells_the_folders_names():
    """Code (not docstrings, comments or --help text) outside ``outdir/`` names no file of the folder."""
    import ast

    import bolmo_async as pkg

    names = ("plan.json", "run.json", "manifest.json", "data_sources.txt", ".bolmo-async.lock", "staging/", "raw/")
    root = Path(pkg.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if "outdir" in path.parts or "mirror" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        skip: set[int] = set()
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            first = body[0] if isinstance(body, list) and body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))  # a docstring
            if isinstance(node, ast.keyword) and node.arg in ("help", "short_help", "epilog"):
                skip.update(id(n) for n in ast.walk(node.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                found += [f"{path.relative_to(root)}:{node.lineno}: {n}" for n in names if n in node.value]
    assert found == []


def test_a_staging_folder_replaced_by_a_link_is_neither_read_nor_written_through(mirror, tmp_path):
    out, elsewhere = tmp_path / "o", tmp_path / "elsewhere"
    first = _prepare(out, mirror.endpoint)
    shutil.move(out / "staging", elsewhere)
    (out / "staging").symlink_to(elsewhere)
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir() if p.is_file()}
    with pytest.raises(errors.StateError, match="not staged"):
        bolmo_async.finalize(out)  # what lies behind the link is not this folder's staging
    again = _prepare(out, mirror.endpoint)  # fetched again into a real folder
    assert not (out / "staging").is_symlink() and (out / "staging").is_dir()
    assert {p.name: p.read_bytes() for p in elsewhere.iterdir() if p.is_file()} == before
    assert shard_hashes(again) == shard_hashes(first)


@pytest.mark.parametrize(
    ("location", "says"), [("", "is empty"), ("  ", "is empty"), ("s3:/bucket/run", "did you mean s3://bucket/run")]
)
def test_output_locations_that_are_mistakes_are_usage_errors(tmp_path, location, says):
    with pytest.raises(errors.UsageError, match=says):
        bolmo_async.plan(location)
    assert list(tmp_path.iterdir()) == []


def test_a_path_the_os_refuses_by_name_is_a_usage_error_naming_the_name(tmp_path, monkeypatch):
    """A name longer than the filesystem takes (or a path too long to hold the folder's own names,
    or a NUL) is a usage error naming it, for every command, not "unexpected OSError ... rerun"."""
    long = "a" * 300
    for call in (
        lambda: bolmo_async.plan(tmp_path / long / "x"),
        lambda: bolmo_async.finalize(tmp_path / long),
        lambda: bolmo_async.inspect(tmp_path / long),
    ):
        with pytest.raises(errors.UsageError, match=r"the name 'a{40}\.\.\.' is 300 bytes long, over the 255 bytes"):
            call()
    with pytest.raises(errors.UsageError, match=r"the path is \d+ bytes long; .* limit of 4096 bytes"):
        bolmo_async.plan(tmp_path / ("b/" * 2000))
    with pytest.raises(errors.UsageError, match="cannot hold a NUL"):
        bolmo_async.plan(f"{tmp_path}/a\0b")
    with pytest.raises(errors.UsageError, match=r"--tokenizer-identifier a+: cannot be read \(File name too long\)"):
        bolmo_async.fetch(tmp_path / "o", tokenizer="subword", tokenizer_identifier=long)
    assert list(tmp_path.iterdir()) == []
    r = run_cli("finalize", "-o", str(tmp_path / long / "x"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "300 bytes long" in r.stderr, r.stderr
    r = run_cli("--scratch-dir", str(tmp_path / long), "inspect", "s3://bucket/run")
    assert r.returncode == 2 and r.stderr.startswith("error: --scratch-dir") and "300 bytes" in r.stderr, r.stderr


def test_force_on_a_folder_that_holds_no_run_deletes_nothing(tmp_path, mirror):
    """`-o .` in a project with --force removed the project's own raw/ and tokenizer/ folders
    (the names a run uses): --force resets only a folder that holds a run (a plan, a run state
    or a manifest)."""
    project = tmp_path / "project"
    for rel in ("raw/data.txt", "tokenizer/tok.json", "staging/notes.md"):
        (project / rel).parent.mkdir(parents=True)
        (project / rel).write_text("mine")
    bolmo_async.plan(project, endpoint=mirror.endpoint, force=True)
    assert all(
        (project / rel).read_text() == "mine" for rel in ("raw/data.txt", "tokenizer/tok.json", "staging/notes.md")
    )
    bolmo_async.plan(project, endpoint=mirror.endpoint, force=True, seed=7)  # now it holds a run: reset
    assert not (project / "raw").exists() and (project / "plan.json").exists()


def test_the_root_folder_and_a_file_are_no_output_folders(tmp_path):
    """-o "$DIR/" with DIR unset is -o /: plan.json and the staging went into the filesystem's root."""
    from bolmo_async.outdir import open_output

    for root in ("/", "//", "/.."):
        with pytest.raises(errors.UsageError, match="filesystem's root"):
            open_output(root)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(errors.UsageError, match="a file, not an output folder"):
        bolmo_async.finalize(a_file)  # was "has no plan.json: run fetch first"


def test_cleaning_a_files_temporaries_lists_the_staging_folder_once_not_once_per_file(tmp_path, monkeypatch):
    """A run of N files used to list ``staging/`` (2N names) for every file: N x 2N names. Now
    one listing serves a second's worth of files; each file still loses only its own leftovers,
    and one left after that listing goes at the next (here: a listing at most 0 s old)."""
    from bolmo_async.outdir import local
    from bolmo_async.outdir.base import staged_name

    od = local.LocalDir(tmp_path / "o")
    od.create()
    keys = [f"{k:020x}" for k in range(50)]
    for key in keys:
        od.write_text(staged_name(key), "staged")
    dead = [od.new_file(staged_name(key)) for key in keys[:2]]  # what a killed run leaves
    for w in dead:
        w.write(b"partial")
        w.flush()
    listings = []
    real = local._names
    monkeypatch.setattr(local, "_names", lambda folder: listings.append(folder) or real(folder))
    assert od.clean_temporaries(keys[1]) == 1
    assert [Path(w.tmp).exists() for w in dead] == [True, False]  # type: ignore[attr-defined]
    assert sum(od.clean_temporaries(key) for key in keys) == 1
    assert not Path(dead[0].tmp).exists()  # type: ignore[attr-defined]
    assert sum(folder.name == "staging" for folder in listings) == 1
    monkeypatch.setattr(local, "_TMP_LIST_AGE", 0.0)
    late = od.new_file(staged_name(keys[3]))
    late.write(b"partial")
    late.flush()
    time.sleep(0.01)
    assert od.clean_temporaries(keys[3]) == 1 and not Path(late.tmp).exists()  # type: ignore[attr-defined]


def test_workers_replacing_the_same_linked_folder_at_once_all_succeed(tmp_path):
    """Workers replace a link standing at staging/ by a real folder when they first write there.
    Two at once: the second found the first's new folder where it had seen the link, and its
    unlink failed with "Is a directory" (the flaky failure of the test above, seen in a suite run)."""
    import threading

    from bolmo_async.outdir.local import real_dir

    for i in range(60):
        root, behind = tmp_path / f"r{i}", tmp_path / f"behind{i}"
        root.mkdir()
        behind.mkdir()
        (behind / "theirs").write_text("x")
        (root / "staging").symlink_to(behind)
        start, failures = threading.Barrier(4), []

        def replace(root: Path = root, start: threading.Barrier = start, failures: list = failures) -> None:
            start.wait()
            try:
                real_dir(root / "staging", root)
            except OSError as exc:
                failures.append(exc)

        threads = [threading.Thread(target=replace) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        assert (root / "staging").is_dir() and not (root / "staging").is_symlink()
        assert [p.name for p in behind.iterdir()] == ["theirs"]


def test_cleaning_temporaries_never_lists_or_removes_through_a_linked_staging_folder(tmp_path):
    from bolmo_async.outdir import local
    from bolmo_async.outdir.base import staged_name

    od = local.LocalDir(tmp_path / "o")
    od.create()
    key = f"{7:020x}"
    od.write_text(staged_name(key), "staged")
    behind = tmp_path / "behind"
    shutil.move(tmp_path / "o" / "staging", behind)
    (tmp_path / "o" / "staging").symlink_to(behind)
    theirs = behind / f".{key}.1234-abcd.tmp"  # named like our temporaries, but not in our folder
    theirs.write_text("not ours")
    assert od.clean_temporaries(key) == 0
    assert theirs.read_text() == "not ours"


def test_temporaries_a_killed_run_left_beside_the_shards_go_when_a_run_next_holds_the_folder_alone(tmp_path):
    """A file that writes its shards while it is staged leaves, when killed, up to all of them as
    temporaries in the folder (gigabytes). The next run that holds the folder alone (plan, fetch,
    finalize, prepare) removes them; `fetch --worker` shares (a shared lock: others may be writing)
    and files of the user's own that merely look alike are left."""
    from bolmo_async.outdir import local

    od = local.LocalDir(tmp_path / "o")
    od.create()
    dead = [od.new_file(shard_name(0)), od.new_file("bolmo_data_00000.csv.gz"), od.new_file(MANIFEST)]
    for w in dead:
        w.write(b"partial")
        w.flush()
    names = [Path(w.tmp).name for w in dead]  # type: ignore[attr-defined]
    mine = [tmp_path / "o" / n for n in (".my-notes.tmp", ".notes.txt.123-deadbeef.tmp")]  # shaped alike
    for p in mine:
        p.write_text("mine")
    with od.lock(shared=True):
        assert all((tmp_path / "o" / n).exists() for n in names)
    with od.lock():
        assert not any((tmp_path / "o" / n).exists() for n in names)
    assert [p.read_text() for p in mine] == ["mine", "mine"]


def _temporaries_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_stop_signal_right_after_a_temporary_is_opened_leaves_nothing(tmp_path, monkeypatch):
    """A stop right after plan.json left `.run.json.<pid>-<hex>.tmp`: the signal landed between
    the temporary's open and the ``try`` that would abort it. A real SIGINT to this process, sent
    as the open returns (Python raises it at once, in the constructor)."""
    import signal

    from bolmo_async.outdir import local

    od = local.LocalDir(tmp_path / "o")
    od.create()
    real_open = os.open

    def open_then_signal(*args, **kwargs):  # type: ignore[no-untyped-def]
        fd = real_open(*args, **kwargs)
        if str(args[0]).endswith(".tmp"):
            os.kill(os.getpid(), signal.SIGINT)
        return fd

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with monkeypatch.context() as m:
            m.setattr(local.os, "open", open_then_signal)
            with pytest.raises(KeyboardInterrupt):
                od.write_text("run.json", "{}")
    finally:
        signal.signal(signal.SIGINT, old)
    assert _temporaries_in(tmp_path / "o") == []
    assert [t for t in local._open_temporaries if t.is_relative_to(tmp_path)] == []


def test_a_stop_signal_after_a_temporary_is_made_leaves_nothing_at_exit(tmp_path):
    """The signal can also land after the temporary's constructor returned and before its
    writer's ``try`` (``new_file`` and ``write_bytes`` run no handler there, but any code that
    makes a file can have such a gap): the process's exit handlers remove what it did not commit
    or abort. A real SIGINT, raised as a ``NewFile`` is handed back; the interpreter exits on it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from bolmo_async.outdir import local
        od = local.LocalDir({str(tmp_path / "o")!r})
        od.create()
        class Late(local.LocalNewFile):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                os.kill(os.getpid(), signal.SIGINT)
        local.LocalNewFile = Late
        od.write_text("run.json", "{{}}")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "KeyboardInterrupt" in r.stderr, r.stderr
    assert _temporaries_in(tmp_path / "o") == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pid namespaces")
def test_a_dead_writers_temporaries_are_found_by_pid_and_pid_space_not_pid_alone(tmp_path):
    """`fetch --worker` shares in containers over one shared folder: a pid means one process only
    inside its pid namespace. A share removing the temporaries of its dead worker with pid P
    removed those of another share's live process of the same pid P. A process in a pid namespace
    of its own (``unshare``) holds a temporary in the folder; the pid it has there is dead here."""
    import shutil as sh
    import subprocess
    import textwrap

    from bolmo_async.outdir import local

    if sh.which("unshare") is None:
        pytest.skip("unshare(1)")
    out = tmp_path / "o"
    od = local.LocalDir(out)
    od.create()
    (out / "staging").mkdir(exist_ok=True)
    code = textwrap.dedent(
        f"""
        import os, sys
        from bolmo_async.outdir import local
        od = local.LocalDir({str(out)!r})
        f = od.new_file("staging/a.npy")
        f.write(b"live")
        f.flush()
        print(os.getpid(), flush=True)
        sys.stdin.read()  # alive until told
        f.abort()
        """
    )
    args = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", sys.executable, "-c", code]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        line = proc.stdout.readline()
        if not line:
            pytest.skip(f"no pid namespace here: {proc.stderr.read() if proc.stderr else ''}")
        theirs = int(line)
        live = _temporaries_in(out / "staging")
        assert len(live) == 1 and f".{theirs}-" in live[0], live
        assert od.remove_temporaries_of(theirs) == 0  # their pid, but not in this pid space
        assert _temporaries_in(out / "staging") == live
        mine = od.new_file("staging/b.npy")  # (a dead writer of this space is still found)
        mine.write(b"x")
        mine.flush()
        assert od.remove_temporaries_of(os.getpid()) == 1
        assert _temporaries_in(out / "staging") == live
    finally:
        if proc.poll() is None:
            proc.communicate("", timeout=30)
    assert _temporaries_in(out / "staging") == []


def test_a_killed_workers_whole_download_temporary_goes_with_its_other_temporaries(tmp_path):
    """A worker killed -9 while a streaming run's parquet downloaded whole to raw/KEY/ left
    ``..KEY.whole.<pid>-....tmp`` behind (the coordinator removed its pid's temporaries from the
    folder and staging/ only) until a rerun cleaned that file's scratch. A real process, killed
    mid-write; another writer's temporary and a kept raw file beside it stay."""
    import signal
    import subprocess
    import textwrap

    from bolmo_async.outdir import local

    out = tmp_path / "o"
    od = local.LocalDir(out)
    od.create()
    key = f"{9:020x}"
    code = textwrap.dedent(
        f"""
        import os, sys
        from bolmo_async.outdir import local
        od = local.LocalDir({str(out)!r})
        f = od.new_local_file(od.download_path({key!r}, "data/a.parquet", keep=False))
        f.write(b"part of a parquet")
        f.flush()
        print(os.getpid(), flush=True)
        sys.stdin.read()
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    dead = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)  # (closes its pipes)
    scratch = od.scratch(key)
    left = _temporaries_in(scratch)
    assert len(left) == 1 and f".{dead}-" in left[0], left
    alive = od.new_local_file(od.download_path(f"{10:020x}", "data/b.parquet", keep=False))  # this process's
    alive.write(b"live")
    alive.flush()
    (od.scratch(f"{11:020x}") / "c.jsonl.zst").parent.mkdir(parents=True)
    (od.scratch(f"{11:020x}") / "c.jsonl.zst").write_bytes(b"kept raw file")
    assert od.remove_temporaries_of(dead) == 1
    assert _temporaries_in(scratch) == []
    assert len(_temporaries_in(od.scratch(f"{10:020x}"))) == 1
    assert (od.scratch(f"{11:020x}") / "c.jsonl.zst").read_bytes() == b"kept raw file"
    alive.abort()


def test_a_full_scratch_names_only_the_folders_of_outputs_never_the_users_own(tmp_path):
    """--scratch-dir may name a shared disk (an HPC node's /scratch, /tmp, a data disk): a full
    scratch's line listed every folder there with "remove the folder of an output you are done
    with", so another job's or the user's own data (largest first) read as an output's cache to
    delete. Only the outputs' folders (named by a hash of their --output-dir, output-dir.txt in
    them) are counted and named."""
    from bolmo_async.outdir.local import SCRATCH_OWNER, scratch_usage

    root = tmp_path / "scratch"
    theirs = root / "results-of-another-job"
    theirs.mkdir(parents=True)
    (theirs / "model.bin").write_bytes(b"x" * 50_000)
    ours = root / "0123456789abcdef"
    (ours / "cache").mkdir(parents=True)
    (ours / "cache" / "staged").write_bytes(b"y" * 10_000)
    (ours / SCRATCH_OWNER).write_text("s3://bucket/first\n", encoding="utf-8")
    older = root / "fedcba9876543210"  # an earlier version's folder: no output-dir.txt, a hash name
    older.mkdir()
    (older / "kept").write_bytes(b"z" * 5_000)
    said = scratch_usage(root)
    assert "(for --output-dir s3://bucket/first)" in said and str(older) in said, said
    assert str(theirs) not in said and "It holds 15.0 KB" in said, said
    shutil.rmtree(ours)
    shutil.rmtree(older)
    assert scratch_usage(root) == ""  # nothing of ours there: nothing said

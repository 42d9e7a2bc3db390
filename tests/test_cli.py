"""The command line as a user meets it: entry points, the original flags, one-line errors, progress."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path, PurePosixPath

import numpy as np
import pytest

import bolmo_async
from bolmo_async.errors import UsageError

from .conftest import DOLMA2, needs_dolma2
from .helpers import cli, readme_bpe_json, run_cli, shard_hashes

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(cwd)},
    )


def test_entry_points_from_a_checkout():
    for args in (["cli.py", "--help"], ["-m", "bolmo_async", "--help"]):
        r = _run(*args)
        assert r.returncode == 0, r.stderr
        for cmd in ("plan", "fetch", "finalize", "prepare", "inspect", "mirror"):
            assert cmd in r.stdout


def test_help_and_usage_errors_answer_without_loading_the_api():
    """``--help``, ``--version`` and a bad flag answer from typer and the small modules: the API
    (the HTTP stack, numpy, pyarrow: half a second of CPU) loads only for a command that runs."""
    script = (
        "import sys\n"
        "from bolmo_async import cli\n"
        "sys.argv = ['bolmo-async', *sys.argv[1:]]\n"
        "try:\n"
        "    cli.app()\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = ('bolmo_async.api', 'aiohttp', 'numpy', 'pyarrow', 'bolmo_async.tokenize')\n"
        "print('LOADED', code, sorted(m for m in heavy if m in sys.modules))\n"
    )
    for args, status in (
        (["--help"], 0),
        (["--version"], 0),
        (["prepare", "--help"], 0),
        (["fetch", "--help"], 0),
        (["prepare", "-o", "x", "--processes", "-1"], 2),
        (["prepare", "-o", "x", "--data-fraction", "2"], 2),
        (["plan", "-o", "x", "--source-fraction", "nonsense"], 2),
        (["inspect"], 2),
    ):
        r = _run("-c", script, *args)
        assert f"LOADED {status} []" in r.stdout, (args, r.stdout, r.stderr)


def test_prepare_keeps_the_original_flags_and_defaults():
    r = _run("cli.py", "prepare", "--help")
    text = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", r.stdout))
    for flag, default in (
        ("--output-dir", None),
        ("--data-fraction", "0.01"),
        ("--tokenizer ", "byte"),
        ("--tokenizer-identifier", "allenai/dolma2-tokenizer"),
        ("--max-tokens-per-file", "100000000"),
        ("--seed", "42"),
        ("--no-streaming", None),
        ("--repo-id", "allenai/bolmo_mix"),
        ("--revision", "main"),
        ("--endpoint", None),
    ):
        assert flag in text, flag
        if default:
            assert re.search(re.escape(flag.strip()) + r"\b.*?\[default: " + re.escape(default) + r"[\];]", text), flag


@pytest.mark.parametrize("bad", ["0", "1.5", "-0.1"])
def test_bad_fraction_is_a_usage_error_without_traceback(tmp_path, bad):
    r = _run("cli.py", "prepare", "--output-dir", str(tmp_path), "--data-fraction", bad)
    assert r.returncode == 2
    assert "--data-fraction" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(("bad", "says"), [("1%", "0.01 for 1%"), ("0.5%", "0.005 for 0.5%"), ("half", "not a number")])
def test_a_percentage_for_a_fraction_is_refused_with_the_fraction_it_means(tmp_path, bad, says):
    """``--data-fraction 1%`` said only "'1%' is not a valid float": now the fraction to give."""
    for cmd in ("plan", "fetch"):
        r = run_cli(cmd, "--output-dir", str(tmp_path / "o"), "--data-fraction", bad)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()


def test_missing_output_dir_is_a_usage_error():
    r = _run("cli.py", "prepare")
    assert r.returncode == 2 and "--output-dir" in r.stderr


def test_finalize_without_fetch_names_the_command_to_run(tmp_path):
    r = _run("cli.py", "finalize", "--output-dir", str(tmp_path))
    assert r.returncode == 1
    assert "bolmo-async fetch" in r.stderr and "Traceback" not in r.stderr
    assert len([x for x in r.stderr.strip().splitlines() if not x.startswith("bolmo-async: INFO:")]) == 1


def test_progress_degrades_to_log_lines_off_a_terminal(tmp_path, mirror, caplog):
    with caplog.at_level(logging.INFO, logger="bolmo_async"):
        bolmo_async.fetch(tmp_path / "o", endpoint=mirror.endpoint, data_fraction=0.2, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert lines, caplog.text
    assert all(k in lines[-1] for k in ("B / ", "ETA", "docs", "tokens", "/s"))
    done, total = re.search(r"progress: ([\d.]+ [KMG]?B) / ([\d.]+ [KMG]?B)", lines[-1]).groups()
    assert done == total, "the bytes counted reach the total at the end"


def test_plan_prints_a_summary_table(tmp_path, mirror):
    r = run_cli("plan", "--output-dir", str(tmp_path / "o"), "--endpoint", mirror.endpoint, "--data-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    for source in ("data/common_crawl", "data/finemath", "TOTAL"):
        assert source in r.stdout
    assert "download" in r.stdout and "tokens" in r.stdout
    # The staging beside the shards until --drop-staging (a new user sized the disk by the shard
    # column alone): byte mode's a byte a token, subword's as much as the shards.
    total = next(x for x in r.stdout.splitlines() if x.startswith("TOTAL")).split()
    staging = next(x for x in r.stdout.splitlines() if x.startswith("staging/ (until --drop-staging)")).split()
    assert staging[-5] + staging[-4][0] == total[4], (total, staging)  # "62.6 MB" of staging for 62.6M bytes
    assert staging[-2:] == total[-2:], (total, staging)  # dolma2: the shards' size


def _error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.strip().splitlines() if not x.startswith("bolmo-async: INFO:")]


def test_first_hour_errors_are_one_line_with_the_fix(tmp_path, mirror):
    import socket
    import time

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    r = run_cli("prepare", "-o", str(a_file), "--endpoint", mirror.endpoint)
    assert r.returncode == 2 and "choose another --output-dir" in r.stderr and len(_error_lines(r.stderr)) == 1

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    r = run_cli("plan", "-o", str(tmp_path / "o"), "--endpoint", f"http://127.0.0.1:{port}")
    assert time.monotonic() - t0 < 10 and r.returncode == 1
    assert "connection refused" in r.stderr and "--endpoint" in r.stderr and len(_error_lines(r.stderr)) == 1

    r = run_cli(
        "prepare", "-o", str(tmp_path / "t"), "--endpoint", mirror.endpoint, "--tokenizer", "subword",
        "--tokenizer-identifier", "allenai/nope-tokenizer", "--data-fraction", "0.05",
    )  # fmt: skip
    assert r.returncode == 1 and len(_error_lines(r.stderr)) == 1, r.stderr
    assert "allenai/nope-tokenizer" in r.stderr and "--model-repo" in r.stderr and "HF_TOKEN" in r.stderr

    r = run_cli("prepare", "-o", str(tmp_path / "u"), "--endpoint", mirror.endpoint, "--tokenizer", "bpe")
    assert r.returncode == 2 and not (tmp_path / "u" / "plan.json").exists()


@needs_dolma2
def test_an_error_while_the_tokenizer_is_probed_is_said(tmp_path, mirror):
    """A subword run probes its tokenizer on a thread while the repo is listed, with file
    descriptor 2 held (a Rust panic's message, said by the run itself): an error of the listing
    meanwhile (a typo in --repo-id) was written into that hold and lost with the exit, so a
    machine's first subword run (nothing remembered of the probe yet: a job array's fresh node)
    ended in exit 1 without a word, in most runs (newuser16)."""
    for k in range(4):  # the listing must fail while the probe runs: most of the time, not always
        env = {**os.environ, "BOLMO_ASYNC_CACHE": str(tmp_path / f"cache{k}")}  # nothing remembered: it probes
        r = run_cli(
            "prepare", "-o", str(tmp_path / "o"), "--endpoint", mirror.endpoint, "--repo-id", "allenai/bolmo_mx",
            "--tokenizer", "subword", "--tokenizer-identifier", str(DOLMA2), "--data-fraction", "0.05", env=env,
        )  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert "error: resolving revision 'main' of allenai/bolmo_mx: not found" in r.stderr, (k, r.stderr)
        assert r.stderr.index("listing allenai/bolmo_mx@main") < r.stderr.index("error:")  # said in order


def test_an_option_of_another_step_names_the_steps_that_take_it(tmp_path):
    """A job array's user gives every step the same flags: `fetch --max-tokens-per-file` was
    refused with click's guess "(Possible options: --tokenizer-identifier)", a flag that has
    nothing to do with it (newuser16). The refusal names the commands that take the option."""
    r = run_cli("fetch", "-o", str(tmp_path / "o"), "--max-tokens-per-file", "1000000")
    assert r.returncode == 2 and not (tmp_path / "o").exists(), r.stderr
    assert "--max-tokens-per-file is an option of finalize, prepare, not of fetch" in r.stderr, r.stderr
    assert "Possible options" not in r.stderr
    r = run_cli("finalize", "-o", str(tmp_path / "o"), "--worker", "0/3")
    assert r.returncode == 2 and "--worker is an option of fetch, not of finalize" in r.stderr, r.stderr
    r = run_cli("fetch", "-o", str(tmp_path / "o"), "--tokenizer-identifer", "x")  # a typo: click's guess stays
    assert r.returncode == 2 and "--tokenizer-identifier" in r.stderr, r.stderr


def test_the_original_scripts_flags_without_a_command_name_prepare(tmp_path):
    """The original tool took its flags alone (`python prepare_bolmo_data.py --output-dir D
    --data-fraction 0.01`); its user typing them after `bolmo-async` got click's "No such option:
    --output-dir", an option every command has. The refusal names `prepare` with their flags."""
    out = tmp_path / "o"
    r = run_cli("--output-dir", str(out), "--data-fraction", "0.01", "--tokenizer", "byte")
    assert r.returncode == 2 and not out.exists(), r.stderr
    assert f"bolmo-async prepare --output-dir {out} --data-fraction 0.01 --tokenizer byte" in r.stderr, r.stderr
    assert "No such option" not in r.stderr
    r = run_cli("--nonsense")  # not an option of any command: click's own line stays
    assert r.returncode == 2 and "No such option: --nonsense" in r.stderr, r.stderr


def test_tokenizer_dolma2_as_the_original_scripts_docstring_wrote_it_names_subword(tmp_path):
    """The original script's own --help (its docstring) shows `--tokenizer dolma2`; here, as
    there, the kind is byte or subword: the refusal says which one gives dolma2 ids."""
    r = run_cli("prepare", "-o", str(tmp_path / "o"), "--tokenizer", "dolma2")
    assert r.returncode == 2 and not (tmp_path / "o").exists(), r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "'dolma2'" in line and "--tokenizer subword" in line and "--tokenizer-identifier" in line, line


@pytest.mark.parametrize("command", ["prepare", "finalize"])
def test_max_tokens_per_file_written_as_the_original_readme_wrote_its_default_names_the_number(tmp_path, command):
    """The original README gives the default as "100M"; `--max-tokens-per-file 100M` said only
    "'100M' is not a valid int range". The line names the number to give."""
    r = run_cli(command, "-o", str(tmp_path / "o"), "--max-tokens-per-file", "100M")
    assert r.returncode == 2 and not (tmp_path / "o").exists(), r.stderr
    assert "100000000 for 100M" in r.stderr, r.stderr
    r = run_cli(command, "-o", str(tmp_path / "o"), "--max-tokens-per-file", "1")  # the range is kept
    assert r.returncode == 2 and "x>=2" in r.stderr, r.stderr


@pytest.mark.parametrize("written", ["nanM", "infK", "0.0000001M", "-3K"])
def test_max_tokens_per_file_with_a_suffix_names_no_number_the_flag_refuses(written):
    """The number a suffixed value means is named only when the flag takes it: "nanM" was told
    "give the tokens, nan for nanM", "0.0000001M" "0 for 0.0000001M" (then out of the range)."""
    import typer

    from bolmo_async.cli import _parse_tokens

    with pytest.raises(typer.BadParameter) as got:
        _parse_tokens(written)
    said = got.value.message
    assert "e.g. 100000000 for 100M" in said and f"for {written}" not in said, said
    with pytest.raises(typer.BadParameter, match=r"2500 for 2\.5K"):
        _parse_tokens("2.5K")


def test_an_endpoint_whose_name_does_not_resolve_names_the_network_not_a_server(tmp_path):
    """Offline, the default endpoint (https://huggingface.co) said "Check --endpoint / HF_ENDPOINT
    and that the server runs": a user who set neither, on a machine without DNS, was sent to
    check a server. A name that does not resolve says so, and names the network and the proxy."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    r = run_cli("plan", "-o", str(tmp_path / "o"), "--endpoint", "https://hub.invalid", env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "hub.invalid" in line and "does not resolve" in line and "HTTPS_PROXY" in line, line
    assert "that the server runs" not in line, line
    assert "HF_HUB_OFFLINE=1" in line, line  # (a compute node without internet: run from the folder)


def test_help_matches_the_cli():
    r = run_cli("fetch", "--help")
    assert r.returncode == 0
    assert "<bool>" not in r.stdout and "'bolmo-async[ray]'" in r.stdout
    assert "byte | subword" in r.stdout and "auto | fastokens | tokenizers | tiktoken" in r.stdout
    assert " inspect [OPTIONS] [D]\n" in run_cli("inspect", "--help").stdout
    for args in (
        ["inspect", ".", "--decode", "-1"],
        ["fetch", "-o", "x", "--read-timeout", "0"],
        ["fetch", "-o", "x", "--read-timeout", "inf"],  # a stall would never be noticed
        ["fetch", "-o", "x", "--read-timeout", "nan"],
    ):
        r = run_cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


# -- issue 23: the first hour, round 2 ---------------------------------------------------------


def test_verbose_is_taken_after_the_command_too(tmp_path):
    for args in (["-v", "finalize", "-o", str(tmp_path)], ["finalize", "-o", str(tmp_path), "-v"]):
        r = run_cli(*args)
        assert r.returncode == 1 and "No such option" not in r.stderr, r.stderr
        assert "bolmo-async fetch" in r.stderr  # the command ran: it names what to run first


def test_scratch_dir_is_taken_after_the_command_too():
    from bolmo_async.cli import global_options_first

    line = ["fetch", "-o", "s3://b/p", "--scratch-dir", "/s", "--worker", "0/2"]
    assert global_options_first(line) == ["--scratch-dir", "/s", "fetch", "-o", "s3://b/p", "--worker", "0/2"]
    line = ["-v", "fetch", "--scratch-dir=/s", "-o", "x"]
    assert global_options_first(line) == ["-v", "--scratch-dir=/s", "fetch", "-o", "x"]
    for same in (["--scratch-dir", "/s", "fetch", "-o", "x"], ["fetch", "-o", "x", "--", "--scratch-dir", "/s"], []):
        assert global_options_first(same) == same


def test_version_is_taken_after_a_command_too():
    for line in (["fetch", "--version"], ["mirror", "serve", "--version"], ["--version"]):
        r = run_cli(*line)
        assert r.returncode == 0 and r.stdout.startswith("bolmo-async "), (line, r.stdout, r.stderr)


def test_mirror_sample_into_a_file_fails_at_once_in_one_line(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for target, why in ((a_file, "is a file"), (a_file / "sub", "cannot be written")):
        r = run_cli("mirror", "sample", str(target))
        assert r.returncode == 2, r.stderr
        assert _error_lines(r.stderr) == [x for x in r.stderr.splitlines() if x.startswith("error:")]
        assert len(_error_lines(r.stderr)) == 1 and why in r.stderr and str(target) in r.stderr
        assert "Traceback" not in r.stderr
    assert a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_mirror_serve_on_a_port_in_use_names_the_way_out(tmp_path):
    """A mirror restarted on its fixed --port while the last one still runs said only "address
    already in use": now what holds it and the flags to change."""
    import socket

    (tmp_path / "repo").mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        r = run_cli("mirror", "serve", str(tmp_path / "repo"), "--port", str(s.getsockname()[1]))
    assert r.returncode == 2 and len(_error_lines(r.stderr)) == 1, r.stderr
    assert "address already in use" in r.stderr and "another --port" in r.stderr and "0: a free one" in r.stderr


def test_a_text_field_the_data_lacks_stops_the_run_naming_the_fields_found(tmp_path, mirror):
    out = tmp_path / "o"
    r = run_cli("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "1",
                "--text-field", "content", "--concurrency", "1", "--connections", "1", "--processes", "1")  # fmt: skip
    assert r.returncode == 2, r.stderr
    [line] = _error_lines(r.stderr)
    assert "--text-field 'content'" in line and "'text'" in line and "'id'" in line
    assert "Pass --text-field text" in line
    assert not (out / "data_sources.txt").exists() and not list((out / "staging").glob("*.done*"))
    planned = len(json.loads((out / "plan.json").read_text())["files"])
    fetched = {req["path"] for req in mirror.cdn_requests}
    assert len(fetched) < planned / 2, "the run stops at the first file, not after fetching everything"

    # parquet: the columns there are
    r = run_cli("prepare", "-o", str(tmp_path / "p"), "--endpoint", mirror.endpoint, "--include",
                "data/finemath/*", "--text-field", "content")  # fmt: skip
    assert r.returncode == 2 and "columns have" in r.stderr and "'text'" in r.stderr, r.stderr


def test_a_bad_tokenizer_is_reported_before_the_listing_and_the_plan_table(tmp_path, mirror):
    import socket

    with socket.socket() as s:  # nothing listens there: an error naming the network would be too late
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    not_json = tmp_path / "tokenizer.model"
    not_json.write_bytes(b"\x0a\x0bsentencepiece")
    cases = (
        (str(tmp_path / "nope.json"), "no such file"),
        (str(not_json), "not a tokenizers JSON file"),
        (str(tmp_path), "has no tokenizer.json"),
    )
    for ident, why in cases:
        for cmd in ("prepare", "fetch"):
            out = tmp_path / f"o-{cmd}"
            r = run_cli(cmd, "-o", str(out), "--endpoint", dead, "--tokenizer", "subword",
                        "--tokenizer-identifier", ident)  # fmt: skip
            assert r.returncode == 2, r.stderr
            assert len(_error_lines(r.stderr)) == 1 and why in r.stderr and "refused" not in r.stderr
            assert not out.exists()
    # A repo that does not exist: found while listing, before the plan table.
    r = run_cli("prepare", "-o", str(tmp_path / "r"), "--endpoint", mirror.endpoint, "--tokenizer", "subword",
                "--tokenizer-identifier", "allenai/no-such-tokenizer")  # fmt: skip
    assert r.returncode == 1 and "allenai/no-such-tokenizer" in r.stderr and "plan:" not in r.stdout


def test_a_tokenizer_repo_that_does_not_exist_is_told_from_one_without_tokenizer_json(tmp_path, sample_dir):
    """A typo'd --tokenizer-identifier (allenai/dolma2) said "has no tokenizer.json", sending the user
    after a file when the repo id was wrong: the server's RepoNotFound is named as such, with the id
    to check; a repo that exists without the file still says so."""
    from bolmo_async.errors import TokenizerError
    from bolmo_async.mirror import MirrorRepo, MirrorThread
    from bolmo_async.models import DEFAULT_REPO_ID

    empty = tmp_path / "empty-repo"
    empty.mkdir()
    (empty / "README.md").write_text("no tokenizer here\n")
    repos = [MirrorRepo(DEFAULT_REPO_ID, sample_dir), MirrorRepo("demo/no-json", empty, "model")]
    with MirrorThread(repos) as m:
        kw = {"endpoint": m.endpoint, "data_fraction": 0.05, "tokenizer": "subword", "progress": False}
        with pytest.raises(TokenizerError) as info:
            bolmo_async.fetch(tmp_path / "a", tokenizer_identifier="allenai/dolma2", **kw)
        said = str(info.value)
        assert "tokenizer repo allenai/dolma2 not found" in said and "has no tokenizer.json" not in said, said
        assert "--tokenizer-identifier" in said and "allenai/dolma2-tokenizer" in said and "HF_TOKEN" in said, said
        with pytest.raises(TokenizerError, match=re.escape("demo/no-json has no tokenizer.json")) as info:
            bolmo_async.fetch(tmp_path / "b", tokenizer_identifier="demo/no-json", **kw)
        # The original tool loaded such a repo (vocab.json + merges.txt) through transformers: the
        # line says how transformers writes the file this tool reads.
        assert "AutoTokenizer.from_pretrained('demo/no-json').save_pretrained(" in str(info.value), info.value
    r = run_cli("prepare", "-o", str(tmp_path / "c"), "--tokenizer", "subword", "--tokenizer-identifier", str(empty))
    assert r.returncode == 2 and "has no tokenizer.json" in r.stderr, r.stderr
    assert f"AutoTokenizer.from_pretrained({str(empty)!r}).save_pretrained(" in r.stderr, r.stderr


def test_a_folder_of_the_other_tokenizer_kind_is_refused_before_the_listing_and_the_plan_table(tmp_path, mirror):
    """prepare / fetch --tokenizer subword into a folder fetched in byte mode: one line naming both,
    before the repo is listed (a dead endpoint here), no plan table, plan.json left as it was (it was
    rewritten for the new fraction and the table printed, then the run refused)."""
    import socket

    out = tmp_path / "o"
    r = run_cli("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.05", "--no-progress")
    assert r.returncode == 0, r.stderr
    planned = (out / "plan.json").read_bytes()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for cmd in ("prepare", "fetch"):
        r = run_cli(cmd, "-o", str(out), "--endpoint", dead, "--data-fraction", "0.1", "--tokenizer", "subword")
        assert r.returncode == 1, r.stderr
        (line,) = _error_lines(r.stderr)
        said = f"{out} (its plan: allenai/bolmo_mix, --data-fraction 0.05, seed 42) was fetched with tokenizer byte"
        assert said in line and "asks for --tokenizer subword" in line, line
        assert "--force" in line
        assert "plan:" not in r.stdout and (out / "plan.json").read_bytes() == planned


def test_a_share_of_another_tokenizer_or_with_force_is_told_the_flags_that_go_on(tmp_path, mirror):
    """A job array's share that left out --tokenizer (or added --force) was told "--force to reset
    this one", which --worker then refused with "the plan ... differs" of a plan no option differed
    from. The refusal now names the tokenizer flags the folder was fetched with, and a share is
    never sent to --force."""
    from bolmo_async.errors import StateError

    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.05)
    bolmo_async.fetch(out, endpoint=mirror.endpoint, worker="0/2", progress=False)
    with pytest.raises(StateError) as info:
        bolmo_async.fetch(out, endpoint=mirror.endpoint, worker="1/2", tokenizer="subword", progress=False)
    said = str(info.value)
    assert "Pass --tokenizer byte to go on with it" in said and "--force" not in said, said
    with pytest.raises(UsageError) as info:
        bolmo_async.fetch(out, endpoint=mirror.endpoint, worker="1/2", force=True, progress=False)
    said = str(info.value)
    assert "differs" not in said and "Drop force=True" in said and f"plan --output-dir {out} --force`" in said, said
    # Without --worker, force=True stays one of the ways out.
    with pytest.raises(StateError, match=r"Pass --tokenizer byte to go on .* or force=True to reset this one"):
        bolmo_async.fetch(out, endpoint=mirror.endpoint, tokenizer="subword", progress=False)


@needs_dolma2
def test_a_subword_folder_fetched_again_without_tokenizer_is_told_byte_is_the_default(tmp_path, mirror):
    """`fetch -o D` again on a subword folder, --tokenizer left out, was refused with "this run asks
    for --tokenizer byte": a flag the user never gave (newuser17). It says the default is byte."""
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.05, include=["data/arxiv/*"])
    r = run_cli(
        "fetch",
        "-o",
        str(out),
        "--endpoint",
        mirror.endpoint,
        "--tokenizer",
        "subword",
        "--tokenizer-identifier",
        str(DOLMA2),
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    r = run_cli("fetch", "-o", str(out), "--endpoint", mirror.endpoint)
    (line,) = _error_lines(r.stderr)
    assert r.returncode == 1 and "--tokenizer byte (the default when --tokenizer is not given)" in line, line
    assert f"Pass --tokenizer subword --tokenizer-identifier {DOLMA2}" in line, line


def test_fetch_force_keeps_the_folders_plan_options(tmp_path, mirror):
    """The refusal of a folder fetched with the other tokenizer offers "--force to reset this one";
    `fetch --force --tokenizer subword` then planned again at the defaults (--data-fraction 0.01),
    not at the folder's 0.05: the same data in the other tokenizer became other data, said only by
    the plan table's fraction (newuser17). A forced fetch keeps the plan's repo, revision,
    fraction, seed and selection unless given; a fraction given still wins."""
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.05, seed=7, include=["data/arxiv/*"])
    bolmo_async.fetch(out, endpoint=mirror.endpoint, progress=False)
    before = json.loads((out / "plan.json").read_text())
    bolmo_async.fetch(out, endpoint=mirror.endpoint, force=True, progress=False)
    after = json.loads((out / "plan.json").read_text())
    for key in ("repo_id", "revision", "data_fraction", "seed", "selection", "files"):
        assert after[key] == before[key], key
    r = run_cli("fetch", "-o", str(out), "--endpoint", mirror.endpoint, "--force", "--data-fraction", "0.1")
    assert r.returncode == 0, r.stderr
    again = json.loads((out / "plan.json").read_text())
    assert again["data_fraction"] == 0.1 and again["seed"] == 7 and again["selection"] == before["selection"]


def test_fetch_force_says_when_the_revision_moved_since_the_folders_plan(tmp_path, sample_dir, caplog):
    """fetch --force keeps the folder's plan options to keep its data (the way out of a refusal of
    the other tokenizer), but plans again at the revision's name: where the Hub's main moved on
    since, the files and their contents change with the commit, without a word (the plan table
    shows neither commit). It says both commits and the --revision that keeps the folder's."""
    import shutil

    from bolmo_async.mirror import MirrorRepo, MirrorThread

    repo = tmp_path / "repo"
    shutil.copytree(sample_dir, repo)
    out = tmp_path / "o"
    with MirrorThread([MirrorRepo("allenai/bolmo_mix", repo)]) as m:
        bolmo_async.plan(out, endpoint=m.endpoint, data_fraction=0.05, seed=7)
    before = json.loads((out / "plan.json").read_text())["commit"]
    some = next(repo.rglob("*.jsonl.zst"))
    shutil.copy(some, some.with_name("added-later.jsonl.zst"))  # the Hub moves on
    with MirrorThread([MirrorRepo("allenai/bolmo_mix", repo)]) as m, caplog.at_level(logging.INFO, "bolmo_async"):
        bolmo_async.fetch(out, endpoint=m.endpoint, force=True, progress=False)
    after = json.loads((out / "plan.json").read_text())["commit"]
    assert after != before
    said = [r.getMessage() for r in caplog.records if before[:12] in r.getMessage()]
    assert len(said) == 1 and after[:12] in said[0] and f"--revision {before}" in said[0], said


def test_an_option_without_effect_is_named(tmp_path, mirror):
    r = run_cli("fetch", "-o", str(tmp_path / "o"), "--endpoint", mirror.endpoint, "--data-fraction", "0.05",
                "--tokenizer", "byte", "--tokenizer-identifier", "./nope.json", "--engine", "tokenizers",
                "--ray-tasks", "3", "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    warned = [x for x in r.stderr.splitlines() if "no effect" in x]
    assert any("--tokenizer-identifier, --engine have no effect with --tokenizer byte" in x for x in warned), warned
    assert any("--ray-tasks has no effect without --ray" in x for x in warned), warned


def _next_steps(stdout: str) -> list[list[str]]:
    """The commands after the last ``Next:``, each checked pasteable as printed: one command a
    line that bash parses, whose words (comment dropped) are ``bolmo-async`` and its arguments."""
    lines = stdout.splitlines()
    start = max(i for i, x in enumerate(lines) if x == "Next:") + 1
    steps = [x.strip() for x in lines[start:] if x.startswith("  ")]
    assert steps, stdout
    argvs = []
    for step in steps:
        checked = subprocess.run(["bash", "-n", "-c", step], capture_output=True, text=True)
        assert checked.returncode == 0, (step, checked.stderr)
        argv = shlex.split(step, comments=True)
        assert argv[0] == "bolmo-async", step
        argvs.append(argv[1:])
    return argvs


def _accepted(argv: list[str]) -> None:
    """The CLI takes these arguments (a wrong command or option fails its parse, --help or not)."""
    r = run_cli(*argv, "--help")
    assert r.returncode == 0, (argv, r.stderr)


def test_plan_says_what_next_and_a_fetch_that_plans_prints_the_plan(tmp_path, mirror):
    out = tmp_path / "my run $HOME"  # a space and a $: the printed commands quote it
    r = run_cli("plan", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.05")
    assert r.returncode == 0, r.stderr
    assert "est. byte tokens" in r.stdout and "est. dolma2 tokens" in r.stdout  # no tokenizer yet: both
    fetch, finalize = _next_steps(r.stdout)
    for argv in (fetch, finalize):
        _accepted(argv)
        assert argv[argv.index("--output-dir") + 1] == str(out)
    assert fetch[0] == "fetch" and finalize[0] == "finalize"
    # The next step runs as printed: planned against a mirror, it names the mirror (without it, the
    # fetch talked to the Hub and refused the folder).
    assert fetch[fetch.index("--endpoint") + 1] == mirror.endpoint
    fetch[fetch.index("subword")] = "byte"
    r = run_cli(*fetch, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert _next_steps(r.stdout) == [finalize]
    r = run_cli(*fetch, "--worker", "0/2", "--no-progress")  # a share says the same finalize, once
    assert r.returncode == 0, r.stderr
    # Which plan it fetched into (a task pointed at the wrong folder would see another fraction):
    assert "is done (the plan of" in r.stdout and "--data-fraction 0.05, seed 42)." in r.stdout, r.stdout
    assert _next_steps(r.stdout) == [finalize]
    r = run_cli(*finalize, "--max-tokens-per-file", "1000000")
    assert r.returncode == 0, r.stderr
    drop = re.search(r"`(bolmo-async [^`]*--drop-staging)`", r.stdout)
    assert drop and shlex.split(drop[1])[1:] == [*finalize, "--drop-staging"], r.stdout
    export = next(x for x in r.stdout.splitlines() if x.startswith("export DATA_SOURCE="))
    assert shlex.split(export) == ["export", f"DATA_SOURCE={out / 'data_sources.txt'}"], export

    r = run_cli("fetch", "-o", str(tmp_path / "f"), "--endpoint", mirror.endpoint, "--data-fraction", "0.05")
    assert r.returncode == 0, r.stderr
    assert "plan: allenai/bolmo_mix@" in r.stdout and "TOTAL" in r.stdout
    assert "est. byte tokens" in r.stdout and "dolma2" not in r.stdout  # the run's tokenizer only
    r = run_cli("fetch", "-o", str(tmp_path / "f"), "--endpoint", mirror.endpoint)
    assert r.returncode == 0 and "plan:" not in r.stdout  # planned already: no table


@needs_dolma2
def test_a_relative_tokenizer_path_is_recorded_absolute_and_named_in_the_plan_table(tmp_path, mirror):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(DOLMA2.read_bytes())
    r = subprocess.run(
        cli("prepare", "-o", "out", "--endpoint", mirror.endpoint, "--data-fraction", "0.02",
            "--tokenizer", "subword", "--tokenizer-identifier", "tok/tokenizer.json", "--no-progress"),
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    absolute = str(tmp_path / "tok" / "tokenizer.json")
    assert "est. subword* tokens" in r.stdout and f"* {absolute}, estimated at dolma2's" in r.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizer"]["identifier"] == absolute
    assert json.loads((tmp_path / "out" / "run.json").read_text())["tokenizer"]["identifier"] == absolute
    assert f"hold {absolute} subword ids" in r.stdout


def test_prepare_keeps_the_bound_a_folder_was_finalized_with(tmp_path, mirror):
    out = tmp_path / "o"
    base = ("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.05", "--no-progress")
    r = run_cli(*base, "--max-tokens-per-file", "3000")
    assert r.returncode == 0, r.stderr
    [warning] = [x for x in r.stderr.splitlines() if "is small for training" in x]
    assert "952 (32%) at 2048" in warning and "3000 (100%) at 4096" in warning and "--sequence-length" in warning
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    assert len(shards) > 1
    r = run_cli(*base)
    assert r.returncode == 0, r.stderr
    assert "--max-tokens-per-file 3000: the bound this folder was finalized with" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["max_tokens_per_file"] == 3000 and len(m["shards"]) == len(shards)
    assert max(s["tokens"] for s in m["shards"]) <= 3000

    # what a fixed-length reader makes of them, counted from the shard files themselves
    sizes = [Path(s["path"]).stat().st_size // 4 for s in m["shards"]]
    r = run_cli("inspect", str(out), "--sequence-length", "2048", "--json")
    assert r.returncode == 0, r.stderr
    fl = json.loads(r.stdout)["fixed_length"]
    facts = json.loads(r.stdout)["manifest"]  # what the text report's first line says, for machines too
    assert facts["complete"] is True and facts["tokenizer"]["kind"] == "byte" and "shards" not in facts
    assert facts["totals"]["shards"] == len(sizes) and facts["data_fraction"] == 0.05
    assert fl["instances"] == sum(n // 2048 for n in sizes)
    assert fl["dropped_tokens"] == sum(n % 2048 for n in sizes) and fl["tokens"] == sum(sizes)
    assert fl["shards_dropped_whole"] == sum(n < 2048 for n in sizes)
    r = run_cli("inspect", str(out), "--sequence-length", "2048")
    assert f"drops {fl['dropped_tokens']} of {fl['tokens']} tokens" in r.stdout
    # ("0 of 1 shard(s) whole" read as "no shard is whole"; it counts the shards dropped entirely)
    assert (
        f"and {fl['shards_dropped_whole']} of the {len(sizes)} shard(s) whole (shorter than one sequence)" in r.stdout
    )
    assert run_cli("inspect", str(out), "--sequence-length", "0").returncode == 2


def test_a_rerun_says_whether_it_reads_the_kept_downloads_in_raw(tmp_path, mirror):
    """--no-streaming "keeps them and reuses them on a rerun": a rerun at another --data-fraction
    read them without a word (a new user could not tell the promise was kept), and a streaming
    rerun downloaded them again, also without a word (newuser17). One line says which."""
    out = tmp_path / "o"
    base = ("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--no-progress")
    r = run_cli(*base, "--data-fraction", "0.05", "--no-streaming")
    assert r.returncode == 0, r.stderr
    kept = {p.name for p in (out / "raw").rglob("*") if p.is_file()}
    assert kept
    mirror.cdn_requests.clear()
    mirror.hub_requests.clear()
    r = run_cli(*base, "--data-fraction", "0.2", "--no-streaming")
    assert r.returncode == 0, r.stderr
    said = re.search(r"(\d+) of the (\d+) file\(s\) to fetch are in .*raw already \(", r.stderr)
    assert said and int(said[1]) > 0, r.stderr
    assert "read from there" in r.stderr and "not downloaded again" in r.stderr, r.stderr
    fetched = {req["path"] for req in mirror.cdn_requests}
    assert not {f for f in fetched if f.rsplit("/", 1)[-1] in kept}, fetched
    # Nor resolved (the Hub's resolver budget): the coordinator resolved every kept file ahead.
    resolved = [path for _, path in mirror.hub_requests if "/resolve/" in path]
    assert resolved and not [p for p in resolved if p.rsplit("/", 1)[-1] in kept], resolved
    r = run_cli(*base, "--data-fraction", "0.3")
    assert r.returncode == 0, r.stderr
    assert "a streaming run downloads them again (--no-streaming reads them)" in r.stderr, r.stderr


def test_the_summary_says_what_raw_holds(tmp_path, mirror):
    """--no-streaming keeps whole files in raw/ (on the Hub, a 0.1% plan keeps whole 750 MB files):
    the summary named the staging and how to drop it, never raw/, which --drop-staging leaves, so
    a user freeing disk did not know of the larger part (newuser17)."""
    out = tmp_path / "o"
    base = ("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.05", "--no-progress")
    r = run_cli(*base, "--no-streaming", "--drop-staging")
    assert r.returncode == 0, r.stderr
    raw = out / "raw"
    size = sum(p.stat().st_size for p in raw.rglob("*") if p.is_file())
    from bolmo_async.util import human_bytes

    said = f"{raw} holds {human_bytes(size)}: the whole files --no-streaming kept"
    assert said in r.stdout and f"`rm -r {raw}` frees them" in r.stdout, r.stdout
    r = run_cli("prepare", "-o", str(tmp_path / "s"), *base[3:])
    assert r.returncode == 0 and "--no-streaming kept" not in r.stdout, r.stdout


def test_inspect_of_a_healthy_folder_says_what_it_checked_in_words(tmp_path, mirror):
    """A new user's reading of inspect (newuser17): "complete: True" (Python's word), an "ok yes"
    column without saying what was checked, no totals, and "fraction 0.05 seed 42" where the
    flags are --data-fraction and --seed. Each line now says itself."""
    out = tmp_path / "o"
    m = bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.05, progress=False)
    r = run_cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "True" not in r.stdout and "False" not in r.stdout, r.stdout
    assert lines[0].startswith(f"{out}: allenai/bolmo_mix@") and "--data-fraction 0.05, --seed 42" in lines[0]
    assert "--tokenizer byte (bolmo-byte, EOS 1)" in lines[0], lines[0]
    n = m["planned_files"]
    assert lines[1] == f"complete: all {n} planned file(s) are in the shards", lines[1]
    t = m["totals"]
    assert any(re.fullmatch(rf"total\s+{t['tokens']}\s+{t['documents']}", x) for x in lines), lines
    assert lines[-1] == (
        f"checked: each of the {t['shards']} shard(s) has the size, whole uint32 tokens and XXH3-128 checksum "
        "manifest.json records, and its .csv.gz index; data_sources.txt lists exactly them"
    ), lines[-1]


def test_the_top_level_help_says_where_to_start():
    """`bolmo-async --help` cut every command's line short ("plan + fetch + finalize in one command
    (the original tool's..."), and said nowhere which command to run first (newuser17)."""
    r = _run("cli.py", "--help")
    assert r.returncode == 0, r.stderr
    commands = r.stdout.split("Commands:", 1)[1]
    assert "..." not in commands, commands
    for name in ("plan", "fetch", "finalize", "prepare", "inspect", "mirror"):
        assert re.search(rf"^  {name}\s+\S", commands, re.M), name
    text = re.sub(r"\s+", " ", r.stdout)
    assert "Start here: bolmo-async prepare -o D --data-fraction 0.001" in text, text
    assert "then bolmo-async inspect D" in text and "plan, fetch (--worker I/N in each task), finalize" in text, text
    r = _run("cli.py", "mirror", "--help")
    assert "..." not in r.stdout.split("Commands:", 1)[1], r.stdout


def test_help_says_what_the_readme_says():
    assert "XXH3-128" in run_cli("inspect", "--help").stdout
    fetch = re.sub(r"\s+", " ", run_cli("fetch", "--help").stdout)
    assert (
        "Plan option." not in fetch and fetch.count("used only when this fetch plans (the folder has no plan yet)") == 4
    )
    text = re.sub(r"\s+", " ", run_cli("prepare", "--help").stdout)
    assert "one per 16 MB of planned download, up to the usable cores" in text
    assert "the plan table, warnings, errors and the summary still print" in text


# -- the Python API -----------------------------------------------------------------------------


def test_api_takes_numpys_bools_and_numbers_as_the_plain_ones(tmp_path, mirror):
    """Values read through numpy or pandas: np.True_ was refused as 'must be True or False, got
    np.True_ (bool)' while numpy's ints and floats were taken."""
    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=np.float64(0.1), seed=np.int64(42))
    again = bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.1, force=np.bool_(True))
    assert again.data_fraction == 0.1 and again.seed == 42


def test_api_names_itself_for_a_wrong_keyword_and_touches_nothing(tmp_path):
    for fn, kw in ((bolmo_async.fetch, {"tokenizr": "subword"}), (bolmo_async.prepare, {"data_fractoin": 0.1}),
                   (bolmo_async.plan, {"tokenizer": "byte"}), (bolmo_async.finalize, {"max_tokens": 5})):  # fmt: skip
        with pytest.raises(TypeError, match=rf"^{fn.__name__}\(\) got an unexpected keyword") as e:
            fn(tmp_path / "o", **kw)
        assert "_fetch" not in str(e.value) and next(iter(kw)) in str(e.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda o: bolmo_async.fetch(o, streaming="no"), r"streaming must be True or False .*--no-streaming.*'no'"),
        (lambda o: bolmo_async.plan(o, data_fraction=True), r"data_fraction must be a number .*got True \(bool\)"),
        (lambda o: bolmo_async.prepare(o, data_fraction="0.5"), r"data_fraction must be a number .*--data-fraction"),
        (lambda o: bolmo_async.fetch(o, worker="2/2"), r"--worker takes I/N with 0 <= I < N"),
        (lambda o: bolmo_async.fetch(o, worker=(0, 2, 1)), r"worker takes \(I, N\) or 'I/N'"),
        (lambda o: bolmo_async.fetch(o, worker=[True, 2]), r"worker takes \(I, N\) or 'I/N'"),
        (
            lambda o: bolmo_async.fetch(o, concurrency="8"),
            r"concurrency must be an integer \(the CLI's --concurrency\)",
        ),
        (lambda o: bolmo_async.fetch(o, processes=1.5), r"processes must be an integer"),
        (lambda o: bolmo_async.fetch(o, progress="false"), r"progress must be True or False"),
        (lambda o: bolmo_async.fetch(o, eos_token_id="1"), r"eos_token_id must be an integer or None"),
        (lambda o: bolmo_async.fetch(o, ray_tasks=-1), r"--ray-tasks must be 0"),
        (lambda o: bolmo_async.fetch(o, tokenizer=None), r"tokenizer must be a string \(the CLI's --tokenizer\)"),
        (lambda o: bolmo_async.plan(o, seed="42"), r"seed must be an integer"),
        (lambda o: bolmo_async.plan(o, include=[1]), r"include takes a list of globs"),
        (lambda o: bolmo_async.plan(o, source_fractions={"data/a": True}), r"--source-fraction data/a must be in"),
        (lambda o: bolmo_async.plan(o, source_fractions=["data/a"]), r"source_fractions takes \{source: fraction\}"),
        (lambda o: bolmo_async.plan(o, source_depth=1.0), r"source_depth must be an integer"),
        (lambda o: bolmo_async.plan(o, selection={"include": ["a"]}), r"selection must be a bolmo_async.Selection"),
        (
            lambda o: bolmo_async.finalize(o, max_tokens_per_file="1000"),
            r"max_tokens_per_file must be an integer or None",
        ),
        (lambda o: bolmo_async.finalize(o, allow_incomplete=1), r"allow_incomplete must be True or False"),
        (lambda o: bolmo_async.inspect(o, decode="2"), r"decode must be an integer"),
        (lambda o: bolmo_async.inspect(o, decode=-1), r"--decode must be 0 or more"),
        (lambda o: bolmo_async.inspect(o, verify="yes"), r"verify must be True or False"),
        (lambda o: bolmo_async.plan(str(o).encode()), r"output_dir must be a folder path"),
        (lambda o: bolmo_async.inspect(123), r"output_dir must be a folder path"),
        (lambda o: bolmo_async.Selection(include="data/*"), r"--include takes a tuple of globs"),
        (  # any path object is a path (a PurePath was passed on as is: 'not JSON serializable')
            lambda o: bolmo_async.fetch(
                o, tokenizer="subword", tokenizer_identifier=PurePosixPath(f"{o}-nothing/tokenizer.json")
            ),
            r"--tokenizer-identifier .*-nothing/tokenizer.json: no such file or folder",
        ),
    ],
)
def test_api_refuses_a_value_of_the_wrong_type_naming_it_and_its_flag(tmp_path, call, says):
    """The CLI's flags parse their values; the API's keywords are checked the same way, before
    any disk or network: a wrong type is never taken for something else (streaming="no" ran
    streaming, data_fraction=True planned everything)."""
    with pytest.raises(UsageError, match=says):
        call(tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_api_takes_the_clis_worker_form(tmp_path, mirror):
    bolmo_async.plan(tmp_path / "o", endpoint=mirror.endpoint, data_fraction=0.5)
    shares = [
        bolmo_async.fetch(tmp_path / "o", endpoint=mirror.endpoint, worker=w, progress=False) for w in ("0/2", [1, 2])
    ]
    assert sum(s["files"] for s in shares) == len(
        bolmo_async.plan(tmp_path / "o", endpoint=mirror.endpoint, data_fraction=0.5).files
    )
    with pytest.raises(TypeError, match=r"^plan\(\) takes the output folder as its one positional argument"):
        bolmo_async.plan(tmp_path / "o", 0.5)


def test_api_takes_the_selection_as_keywords_and_the_cli_spelling_of_special_tokens(tmp_path, mirror):
    p = bolmo_async.plan(tmp_path / "o", endpoint=mirror.endpoint, include=["data/stack_edu/*"], data_fraction=0.5)
    assert p.selection == bolmo_async.Selection(include=("data/stack_edu/*",))
    assert p.files and all(f.path.startswith("data/stack_edu/") for f in p.files)
    with pytest.raises(TypeError, match="selection= and include"):
        bolmo_async.plan(tmp_path / "x", include=["a"], selection=bolmo_async.Selection())
    with pytest.warns(DeprecationWarning, match="special_tokens_as_ids"):
        bolmo_async.fetch(tmp_path / "o", endpoint=mirror.endpoint, special_tokens_as_text=True, progress=False)
    with pytest.raises(TypeError, match="pass special_tokens_as_ids only"):
        bolmo_async.fetch(tmp_path / "o", special_tokens_as_ids=True, special_tokens_as_text=False)
    seen = []
    bolmo_async.fetch(tmp_path / "n", endpoint=mirror.endpoint, data_fraction=0.05, on_plan=seen.append, progress=False)
    assert len(seen) == 1 and seen[0].data_fraction == 0.05


def test_api_is_discoverable():
    names = dir(bolmo_async)
    for name in ("plan", "fetch", "finalize", "prepare", "inspect", "Selection", "BolmoError"):
        assert name in names and getattr(bolmo_async, name).__doc__, name
    assert "sequence_length" in bolmo_async.inspect.__doc__
    assert "special_tokens_as_ids" in bolmo_async.fetch.__doc__


def test_an_eos_id_outside_the_tokenizer_is_refused_or_named(tmp_path, mirror, caplog):
    """A negative EOS is a usage error before anything runs (it was a TokenizerError after the
    listing); one past the vocabulary is allowed (a model may have more embeddings) but said."""
    with pytest.raises(UsageError, match=r"--eos-token-id must be a token id .* got -5"):
        bolmo_async.fetch(tmp_path / "o", tokenizer="subword", eos_token_id=-5)
    assert not (tmp_path / "o").exists()
    tok = tmp_path / "tokenizer.json"
    tok.write_text(readme_bpe_json())
    with caplog.at_level(logging.WARNING, "bolmo_async"):
        bolmo_async.fetch(
            tmp_path / "o", endpoint=mirror.endpoint, data_fraction=0.05, tokenizer="subword",
            tokenizer_identifier=str(tok), eos_token_id=50, engine="tokenizers", progress=False,
        )  # fmt: skip
    assert any(
        "--eos-token-id 50 is not one of" in r.getMessage() and "7 ids" in r.getMessage() for r in caplog.records
    )


def test_inspect_takes_the_folder_as_the_other_commands_do_and_version(tmp_path):
    """`inspect -o D` (every other command takes -o) was "No such option: -o"."""
    missing = tmp_path / "nothing"
    for args in (["inspect", str(missing)], ["inspect", "-o", str(missing)], ["inspect", "--output-dir", str(missing)]):
        r = run_cli(*args)
        assert r.returncode == 1 and "does not exist" in r.stderr, (args, r.stderr)
    r = run_cli("inspect", str(missing), "-o", str(tmp_path / "other"))
    assert r.returncode == 2 and "two folders given" in r.stderr
    # A shard given for its folder: said to be a file, with the command that checks its folder
    # (it said "does not exist", of a file right there).
    shard = tmp_path / "bolmo_data_00000.npy"
    shard.write_bytes(b"\0" * 8)
    r = run_cli("inspect", str(shard))
    assert r.returncode == 1 and "does not exist" not in r.stderr, r.stderr
    assert "is a file, not an output folder" in r.stderr and f"bolmo-async inspect {tmp_path}" in r.stderr
    r = run_cli("inspect")
    assert r.returncode == 2 and "name the output folder" in r.stderr
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("bolmo-async ")


def test_finalize_over_staging_of_an_earlier_format_says_so_not_that_it_is_gone(tmp_path, mirror):
    """After an upgrade that changed the staging format, finalize said the staging 'is gone
    (--drop-staging removes it)' while staging/ was there, in the earlier format."""
    out = tmp_path / "o"
    bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.1, progress=False)
    for marker in (out / "staging").glob("*.json"):
        rec = json.loads(marker.read_text())
        marker.write_text(json.dumps({**rec, "format": rec["format"] - 1}))
    with pytest.raises(
        bolmo_async.BolmoError,
        match=r"written by an earlier bolmo-async \(staging format \d+, now \d+\).*fetch --output-dir .* again",
    ):
        bolmo_async.finalize(out, max_tokens_per_file=5000)


@pytest.mark.parametrize(
    "edit",
    [
        {"skipped": 5},
        {"skipped": {"counts": {"invalid_json": "many"}, "examples": {}}},
        {"skipped": {"counts": {}, "examples": {"invalid_json": "x.jsonl:3"}}},
        {"documents": "12"},
        {"tokens": True},
        {"tokenizer_fingerprint": 7},
        {"unreadable": ["why"]},
        {"sha256": 5},
        {"tokens": None},
    ],
)
def test_a_hand_edited_staging_marker_is_named_with_its_fix_never_a_crash(tmp_path, mirror, edit):
    """A marker read back is checked field by field: ``"skipped": 5`` ended finalize in
    "unexpected AttributeError". The file is named with the fix (a fetch stages it again), and
    the fetch does, giving the output of the untouched staging."""
    out = tmp_path / "o"
    done = bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.1, progress=False)
    marker = sorted((out / "staging").glob("*.json"))[0]
    rec = json.loads(marker.read_text())
    marker.write_text(json.dumps({**rec, **edit}))
    r = run_cli("finalize", "-o", str(out))
    assert r.returncode == 1 and "unexpected" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert f"{rec['path']}: its staging marker" in r.stderr and "is not staged" in r.stderr, r.stderr
    assert f"Run `bolmo-async fetch --output-dir {out}" in r.stderr, r.stderr
    if edit == {"skipped": 5}:  # every marker: not "the staging is gone (--drop-staging removes it)"
        for other in (out / "staging").glob("*.json"):
            other.write_text(json.dumps({**json.loads(other.read_text()), **edit}))
        r = run_cli("finalize", "-o", str(out))
        assert r.returncode == 1 and "staging markers are damaged" in r.stderr and "gone" not in r.stderr, r.stderr
    again = bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.1, progress=False)
    assert [s["xxh3_128"] for s in again["shards"]] == [s["xxh3_128"] for s in done["shards"]]


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_truncated_or_removed_staged_file_is_named_not_only_counted(tmp_path, mirror, damage):
    """A staged .arrow cut short (a full disk, a copy gone wrong) or removed by hand, its marker
    intact, was only counted in finalize's "N of M planned file(s) are not staged" (attack17): it
    is named, with what is wrong and the fix, and the fetch stages it again."""
    out = tmp_path / "o"
    done = bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.1, progress=False)
    marker = sorted((out / "staging").glob("*.json"))[0]
    rec = json.loads(marker.read_text())
    staged = marker.with_suffix(".arrow")
    assert staged.stat().st_size == rec["staged_bytes"]
    if damage == "truncate":
        with open(staged, "r+b") as f:
            f.truncate(rec["staged_bytes"] // 2)
    else:
        staged.unlink()
    r = run_cli("finalize", "-o", str(out))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    what = f"has {rec['staged_bytes'] // 2} bytes" if damage == "truncate" else "is missing"
    assert f"{rec['path']}: its staged file" in r.stderr and what in r.stderr, r.stderr
    assert f"records {rec['staged_bytes']} bytes" in r.stderr and "a fetch stages it again" in r.stderr, r.stderr
    again = bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.1, progress=False)
    assert [s["xxh3_128"] for s in again["shards"]] == [s["xxh3_128"] for s in done["shards"]]


def test_finalize_never_replaces_an_output_with_an_empty_one(tmp_path, mirror):
    """After --drop-staging, finalize's advice used to include --allow-incomplete, which then wrote
    0 shards and an empty data_sources.txt over the finished output, exit 0."""
    out = tmp_path / "o"
    done = bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.1, drop_staging=True, progress=False)
    listed = (out / "data_sources.txt").read_text()
    for allow in (False, True):
        with pytest.raises(
            bolmo_async.BolmoError,
            match=r"the staging of .* finished output is gone \(--drop-staging removes it\).*fetch --output-dir",
        ):
            bolmo_async.finalize(out, max_tokens_per_file=5000, allow_incomplete=allow)
    assert (out / "data_sources.txt").read_text() == listed and shard_hashes(done)  # the shards are all there
    assert json.loads((out / "manifest.json").read_text())["shards"] == done["shards"]
    # Another bound is told its shards stay as they were; the same finalize again (a job's retry) has
    # nothing to remake: exit 0, nothing rewritten, where it was refused naming a refetch (newuser17).
    r = run_cli("finalize", "-o", str(out), "--max-tokens-per-file", "1000000")
    (line,) = _error_lines(r.stderr)
    assert r.returncode == 1 and "at --max-tokens-per-file 1000000 (they stay as they are, at 100000000)" in line, line
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    for again in ([], ["--max-tokens-per-file", "100000000"], ["--drop-staging"]):
        r = run_cli("finalize", "-o", str(out), *again)
        assert r.returncode == 0 and "complete and current" in r.stderr and "nothing rewritten" in r.stderr, r.stderr
        assert f"export DATA_SOURCE={out / 'data_sources.txt'}" in r.stdout, r.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")} == before
    (out / "bolmo_data_00000.npy").write_bytes(b"")  # a damaged output is not "current": refused as before
    r = run_cli("finalize", "-o", str(out))
    assert r.returncode == 1 and "finished output is gone" in r.stderr, r.stderr
    bolmo_async.plan(tmp_path / "new", endpoint=mirror.endpoint)
    r = run_cli("finalize", "-o", str(tmp_path / "new"), "--allow-incomplete")
    assert r.returncode == 1 and "are not staged yet. Run `bolmo-async fetch" in r.stderr and "again" not in r.stderr, (
        r.stderr
    )
    assert f"--endpoint {mirror.endpoint}`" in r.stderr  # the fetch to run, as it must be run
    assert not (tmp_path / "new" / "data_sources.txt").exists()


def test_the_same_prepare_again_after_drop_staging_has_nothing_to_do(tmp_path, mirror):
    """A finished prepare run again is "nothing to do, nothing rewritten"; after --drop-staging it
    downloaded and tokenized every file again (hours on the real mix), rewrote the same shards
    and left a staging the user had dropped (newuser17). It has nothing to do there either."""
    out = tmp_path / "o"
    cmd = ("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.05", "--no-progress")
    r = run_cli(*cmd, "--drop-staging")
    assert r.returncode == 0 and not (out / "staging").exists(), r.stderr
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}
    mirror.cdn_requests.clear()
    for again in (["--drop-staging"], []):
        r = run_cli(*cmd, *again)
        assert r.returncode == 0 and "complete and current" in r.stderr and "nothing rewritten" in r.stderr, r.stderr
        assert not mirror.cdn_requests and not (out / "staging").exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")} == before


def test_a_rerun_checking_prefixes_checks_those_an_output_after_drop_staging_never_checked(tmp_path, mirror, caplog):
    """With the staging kept, a --verify-prefixes rerun stages again the prefixes read unchecked
    (--no-verify-prefixes, the default over https) and checks their files' sha256; after
    --drop-staging the same rerun called the output "complete and current" and checked nothing.
    The manifest counts the prefixes its shards took unchecked: such a rerun remakes them."""
    out = tmp_path / "o"

    def prepare(**kw):  # type: ignore[no-untyped-def]
        return bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=0.2, progress=False, **kw)

    first = prepare(verify_prefixes=False, drop_staging=True)
    assert first["unverified_prefixes"] > 0
    before = shard_hashes(first)
    mirror.cdn_requests.clear()
    with caplog.at_level(logging.INFO, "bolmo_async"):
        again = prepare(verify_prefixes=True)
    assert "complete and current" not in caplog.text and mirror.cdn_requests
    assert again["unverified_prefixes"] == 0 and shard_hashes(again) == before
    caplog.clear()
    with caplog.at_level(logging.INFO, "bolmo_async"):
        prepare(verify_prefixes=True, drop_staging=True)
        prepare(verify_prefixes=False)  # (checked once is enough for a run that does not check)
    assert caplog.text.count("complete and current") == 2


@pytest.mark.parametrize("drop", [True, False])
def test_a_finished_output_of_another_tokenizer_is_never_current(tmp_path, mirror, drop):
    """ "Nothing to do" compared the plan and the bound with the manifest, and left the tokenizer to
    run.json's check: with run.json gone (a copy of the folder without it, a hand clean-up), a
    prepare with another tokenizer wrote its own run.json and called the byte shards "complete and
    current", with the staging kept or dropped. The manifest says what made the shards: they are
    remade (a staging kept is of the other tokenizer: that is said)."""
    out = tmp_path / "o"
    bpe = tmp_path / "bpe.json"
    bpe.write_text(readme_bpe_json())
    cmd = ("prepare", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.05", "--no-progress")
    r = run_cli(*cmd, *(["--drop-staging"] if drop else []))
    assert r.returncode == 0, r.stderr
    (out / "run.json").unlink()
    r = run_cli(*cmd, "--tokenizer", "subword", "--tokenizer-identifier", str(bpe), "--processes", "1")
    assert "complete and current" not in r.stderr, r.stderr
    if not drop:
        assert r.returncode == 1 and "was made with another tokenizer" in r.stderr, r.stderr
        return
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "subword" and manifest["complete"], manifest["tokenizer"]


def test_a_stopped_refinalize_never_leaves_data_sources_naming_shards_of_two_layouts(tmp_path, mirror):
    """A finalize at another --max-tokens-per-file (or for a grown fraction) writes its shards under
    the names the finished output's data_sources.txt lists: stopped among them, it left that file,
    a complete output's, naming shards of which the first held the new layout (a trainer read 0.5%
    of the data without a word). It goes first now, and comes back once the output is complete;
    rewriting the same layout keeps it."""
    from bolmo_async.errors import Interrupted
    from bolmo_async.finalizer import finalize_dir, write_shards_locally

    out = tmp_path / "o"
    done = bolmo_async.prepare(
        out, endpoint=mirror.endpoint, data_fraction=0.2, max_tokens_per_file=80_000, progress=False
    )
    assert len(done["shards"]) >= 3
    sources = out / "data_sources.txt"

    def stopped_after_the_first(out_dir, shards, *args):  # the real writer, stopped (Ctrl+C) after shard 0
        write_shards_locally(out_dir, shards[:1], *args)
        raise Interrupted()

    with pytest.raises(Interrupted):
        finalize_dir(out, 20_000, write_shards=stopped_after_the_first)
    assert not sources.exists(), "data_sources.txt names a shard rewritten for another layout"
    again = bolmo_async.finalize(out, max_tokens_per_file=20_000)
    assert sources.read_text().split() == [s["path"] for s in again["shards"]]
    assert not bolmo_async.inspect(out)["problems"]
    # The same plan at the same bound: the same bytes, and the file stays while they are rewritten.
    listed = sources.read_text()
    with pytest.raises(Interrupted):
        finalize_dir(out, 20_000, write_shards=stopped_after_the_first)
    assert sources.read_text() == listed and not bolmo_async.inspect(out)["problems"]


def test_planning_into_a_folder_of_the_users_own_files_says_so_once(mirror, tmp_path):
    """`-o ~/project` puts plan.json, staging/, raw/, shards and data_sources.txt among the
    project's own files: said once, when the folder is first planned, naming what was there."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("notes.txt", "train.py", "configs", "data"):
        (project / name).write_text("mine")
    args = ("plan", "-o", str(project), "--endpoint", mirror.endpoint, "--data-fraction", "0.1")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    assert "already holds files of its own (configs, data, notes.txt and 1 more)" in r.stderr, r.stderr
    assert "a new --output-dir keeps them apart" in r.stderr
    assert (project / "notes.txt").read_text() == "mine"
    for again in (args, ("plan", "-o", str(tmp_path / "fresh"), "--endpoint", mirror.endpoint)):
        r = run_cli(*again)  # planned already / an empty new folder: nothing to say
        assert r.returncode == 0 and "files of its own" not in r.stderr, r.stderr


def test_the_original_scripts_output_folder_is_refused_not_silently_replaced(mirror, tmp_path):
    """The original tool's user points `prepare` at the folder prepare_bolmo_data.py filled (its
    bolmo_data_00000.npy ... and data_sources.txt, the same names, hours of downloading): the run
    rewrote shard 0, removed the others and data_sources.txt with one INFO line calling them "its
    shards". Files of our names that no plan of ours made are refused, kept as they were; --force
    replaces them."""
    old = tmp_path / "bolmo_test"
    old.mkdir()
    for i in range(3):
        (old / f"bolmo_data_{i:05d}.npy").write_bytes(bytes(4000))
    (old / "data_sources.txt").write_text("".join(f"{old}/bolmo_data_{i:05d}.npy\n" for i in range(3)))
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    args = ("prepare", "--output-dir", str(old), "--endpoint", mirror.endpoint, "--data-fraction", "0.1")
    r = run_cli(*args)
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "bolmo_data_00000.npy" in line and "data_sources.txt" in line and "--force" in line, line
    after = {p.name: p.read_bytes() for p in old.iterdir() if p.name != ".bolmo-async.lock"}
    assert after == before, "the old output was touched"
    r = run_cli(*args, "--force")
    assert r.returncode == 0, r.stderr
    listed = (old / "data_sources.txt").read_text().split()
    assert listed and all(bytes(4000) != Path(p).read_bytes() for p in listed)
    assert not bolmo_async.inspect(old)["problems"]


def test_output_cut_short_by_its_reader_ends_quietly_as_unix_tools_do(tmp_path, mirror):
    """`bolmo-async inspect D | head`: the reader goes after a few lines. It exited 1 (Typer's
    handling of the broken pipe); it ends as `cat` or `seq` do there: without a word, status 141
    (128 + SIGPIPE). Every command prints through the same ``_say``."""
    import shlex
    import shutil

    if shutil.which("bash") is None or shutil.which("head") is None:
        pytest.skip("a shell pipeline")
    out = tmp_path / "o"
    bolmo_async.prepare(out, endpoint=mirror.endpoint, data_fraction=1, progress=False)
    err = tmp_path / "stderr"
    for args in (["inspect", str(out), "--decode", "100000"], ["inspect", str(out), "--json", "--decode", "100000"]):
        full = run_cli(*args)
        assert full.returncode == 0 and len(full.stdout) > 1 << 18, ("more than a pipe holds", len(full.stdout))
        line = f"{shlex.join(cli(*args))} 2>{shlex.quote(str(err))} | head -2 >/dev/null; exit ${{PIPESTATUS[0]}}"
        r = subprocess.run(["bash", "-c", line], timeout=120)
        # (the JSON is one large write: the pipe took part of it, the rest was lost and status 0)
        assert r.returncode == 141, err.read_text()
        assert err.read_text() == ""


@pytest.mark.slow
def test_a_run_piped_into_head_finishes_its_work_and_says_its_report_was_cut(tmp_path, mirror):
    """`prepare ... | head -1` stopped the run silently after the plan table's first line, while
    `fetch ... | head -1` (nothing printed while it fetches) fetched everything: their report's
    reader decided whether the work was done. A command's stdout is its report, not its work:
    every command that does work finishes it, drops the rest of the report, and exits 141 (what
    `pipefail` sees of a cut report), as `inspect` alone ends at once."""
    import shlex
    import shutil

    if shutil.which("bash") is None or shutil.which("head") is None:
        pytest.skip("a shell pipeline")
    err = tmp_path / "stderr"
    for command, done in (("prepare", "manifest.json"), ("fetch", "run.json")):
        out = tmp_path / command
        args = [command, "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.5", "--no-progress"]
        line = f"{shlex.join(cli(*args))} 2>{shlex.quote(str(err))} | head -1 >/dev/null; exit ${{PIPESTATUS[0]}}"
        r = subprocess.run(["bash", "-c", line], timeout=300)
        assert r.returncode == 141, (command, err.read_text())
        assert "Traceback" not in err.read_text()
        assert (out / done).exists(), command
        again = run_cli(*args)  # nothing left to do: the first run did it all
        assert again.returncode == 0, again.stderr
        assert "this run fetched 0 of them" in again.stdout or "nothing to do" in again.stderr, (command, again.stdout)


def test_a_stop_signal_handled_inside_a_weakref_callback_is_not_lost():
    """The stop handler raises where the signal lands; inside a weakref callback (or a ``__del__``
    the garbage collector calls) Python cannot raise: it printed "Exception ignored in ...
    Interrupted: 1" and the run went on to exit 0, its SIGHUP lost (1 of 20 SIGHUPs just after
    plan.json). A real SIGTERM, sent from inside a real weakref callback, still stops."""
    code = (
        "import os, signal, time, weakref\n"
        "from bolmo_async import cli\n"
        "cli._stop_handling()\n"
        "class A: pass\n"
        "a = A()\n"
        "r = weakref.ref(a, lambda _: os.kill(os.getpid(), signal.SIGTERM))\n"
        "try:\n"
        "    del a\n"
        "    time.sleep(5)\n"
        "    print('went on')\n"
        "except KeyboardInterrupt as exc:\n"
        "    print('stopped by', exc.signum)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == f"stopped by {int(signal.SIGTERM)}", (r.stdout, r.stderr)
    assert "Exception ignored" not in r.stderr, r.stderr


def test_the_fetch_summary_tells_downloads_from_reads_of_raw(tmp_path, mirror):
    """A --no-streaming rerun reads the files kept in raw/ without a request: its summary counted
    them as fetched (newuser17), so "this run fetched 9 of them" could mean 9 downloads or none.
    They are counted apart."""
    out = tmp_path / "o"
    base = ("fetch", "-o", str(out), "--endpoint", mirror.endpoint, "--no-progress", "--no-streaming")
    r = run_cli(*base, "--data-fraction", "0.05")
    assert r.returncode == 0, r.stderr
    mirror.hub_requests.clear()
    r = run_cli(*base, "--data-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    said = re.search(r"(\d+) of the (\d+) file\(s\) to fetch are in .*raw already \(", r.stderr)
    assert said and int(said[1]) > 0, r.stderr
    in_raw, to_fetch = int(said[1]), int(said[2])
    assert f"this run fetched {to_fetch - in_raw} of them and read {in_raw} from the downloads kept in" in r.stdout, (
        r.stdout
    )
    downloaded = {path for _, path in mirror.hub_requests if "/resolve/" in path and "/data/" in path}
    assert len(downloaded) == to_fetch - in_raw, downloaded


def test_api_errors_name_keywords_and_the_cli_its_flags(tmp_path, mirror, repos):
    """The same refusal, said to a Python caller and to a shell: bolmo_async.plan() was told
    "--force to reset this one" and "rerun the same command", flags it has no way to pass. The
    API's errors name force=True and the call to make again (a `quoted command` stays a shell line);
    the command line keeps its flags. One place words them (guidance.say_to_caller)."""
    from bolmo_async.errors import FetchIncomplete, StateError
    from bolmo_async.mirror import FaultConfig, MirrorThread

    out = tmp_path / "o"
    bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.05)
    with pytest.raises(StateError) as info:
        bolmo_async.plan(out, endpoint=mirror.endpoint, data_fraction=0.05, seed=7)
    said = str(info.value)
    assert "Use another output folder, or force=True to reset this one" in said and "--force" not in said, said
    r = run_cli("plan", "-o", str(out), "--endpoint", mirror.endpoint, "--data-fraction", "0.05", "--seed", "7")
    assert r.returncode == 1 and "Use another --output-dir, or --force to reset this one" in r.stderr, r.stderr
    assert "force=True" not in r.stderr

    faults = FaultConfig(rate=1.0, kinds=("http503",), max_per_path=10**9, only=("stack_edu-0000",))
    with MirrorThread(repos, faults=faults) as m:
        args = {"endpoint": m.endpoint, "data_fraction": 0.3, "retries": 1, "progress": False}
        with pytest.raises(FetchIncomplete) as failed:
            bolmo_async.prepare(tmp_path / "p", **args)
        said = str(failed.value)
        assert "Call bolmo_async.prepare() again with the same arguments to resume" in said, said
        assert "rerun the same command" not in said.lower() and failed.value.failed, said
        flags = ["--endpoint", m.endpoint, "--data-fraction", "0.3", "--retries", "1", "--no-progress"]
        r = run_cli("prepare", "-o", str(tmp_path / "c"), *flags)
    assert r.returncode == 1 and "Rerun the same command to resume" in r.stderr, r.stderr

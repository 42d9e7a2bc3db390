"""The command line as a user meets it: entry points, the original flags, one-line errors, progress."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bolmo_async

from .helpers import run_cli

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


def test_help_matches_the_cli():
    r = run_cli("fetch", "--help")
    assert r.returncode == 0
    assert "<bool>" not in r.stdout and "'bolmo-async[ray]'" in r.stdout
    assert "byte | subword" in r.stdout and "auto | fastokens | tokenizers | tiktoken" in r.stdout
    assert "OUTPUT_DIR" in run_cli("inspect", "--help").stdout
    for args in (["inspect", ".", "--decode", "-1"], ["fetch", "-o", "x", "--read-timeout", "0"]):
        r = run_cli(*args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr

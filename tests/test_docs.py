"""The README's option tables and the CLI's options are the same: names, the commands that take
them, and defaults. A flag added, renamed or given another default without the README fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import typer.main

from bolmo_async.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
HEADER = "| option | commands | default | meaning |"
FLAG = re.compile(r"(?<![\w-])(--?[a-z][a-z0-9-]*)")


def _commands() -> dict[str, click.Command]:
    """Every command by its full name ("prepare", "mirror serve"); "bolmo-async": the options
    taken before the command."""
    root = typer.main.get_command(app)
    out: dict[str, click.Command] = {"bolmo-async": root}

    def walk(group: click.Group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):  # a group (typer may carry its own copy of click's classes)
                walk(cmd, f"{prefix}{name} ")
            else:
                out[prefix + name] = cmd

    walk(root, "")  # type: ignore[arg-type]
    return out


def _documented_default(p: click.Option) -> str:
    """The default as the README writes it: empty for none (or a flag off), "required", the flag's
    name for a --x/--no-x pair ("auto" for a pair left unset: decided per run), else the value."""
    if p.required:
        return "required"
    if p.is_flag and p.secondary_opts and p.default is None:
        return "auto"
    if p.is_flag and p.secondary_opts:
        return p.opts[0] if p.default else p.secondary_opts[0]
    if p.default is None or p.default is False or (isinstance(p.default, list | tuple) and not p.default):
        return ""
    if isinstance(p.default, float) and p.default.is_integer():
        return str(int(p.default))
    return str(p.default)


def _readme_rows() -> list[tuple[list[str], list[str], str, str]]:
    """(flags, commands, default, line) of every row of the README's option tables."""
    rows = []
    in_table = False
    for line in README.read_text().splitlines():
        if line.strip() == HEADER:
            in_table = True
            continue
        if not in_table or line.startswith("|---"):
            continue
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        option, commands, default = cells[0], cells[1], cells[2]
        flags = [f for f in FLAG.findall(option.replace("`", " "))]
        names = list(_commands()) if commands == "every command" else [c.strip() for c in commands.split(",")]
        rows.append((flags, names, default.strip("`"), line))
    return rows


def _cli_options() -> dict[tuple[str, str], click.Option]:
    """(command, flag) -> option, for every flag name of every option (aliases included)."""
    out = {}
    for name, cmd in _commands().items():
        for p in cmd.params:
            if p.param_type_name == "option" and "--help" not in p.opts:
                for f in p.opts + p.secondary_opts:
                    out[(name, f)] = p
    return out


def test_every_readme_option_row_matches_the_cli():
    cli = _cli_options()
    commands = _commands()
    rows = _readme_rows()
    assert len(rows) > 40, "the option tables were not found"
    for flags, names, default, line in rows:
        assert flags, line
        for name in names:
            assert name in commands, f"README names a command the CLI lacks: {name!r} in {line}"
            for f in flags:
                assert (name, f) in cli, f"README: `{name} {f}` is not an option of the CLI ({line})"
                got = _documented_default(cli[(name, f)])
                assert got == default, f"`{name} {f}`: README default {default!r}, CLI {got!r} ({line})"


def test_every_cli_option_is_in_the_readme():
    documented = {(name, f) for flags, names, _, _ in _readme_rows() for name in names for f in flags}
    missing: list[Any] = []
    for name, cmd in _commands().items():
        for p in cmd.params:
            options = p.opts + p.secondary_opts
            if p.param_type_name != "option" or "--help" in options:
                continue
            if not any((name, f) in documented for f in options):
                missing.append(f"{name} {p.opts[0]}")
    assert not missing, f"options of the CLI the README's tables do not list: {missing}"


def test_every_flag_the_readme_mentions_exists():
    """Prose and examples too: a flag the README names anywhere is an option of some command
    (a renamed or removed flag cannot linger in an example)."""
    known = {f for (_, f) in _cli_options()} | {"--help"}
    outside = {
        *("--array", "--cpus-per-task", "--wrap", "--dependency"),  # sbatch's, in the Slurm example
        *("--sample", "--skip-dolma", "--only", "--wan-also"),  # the exactness harness's and bench/run.py's
    }
    text = README.read_text()
    mentioned = set(re.findall(r"(?<![\w/-])(--[a-z][a-z0-9-]*)", text))
    unknown = sorted(mentioned - known - outside)
    assert not unknown, f"the README names flags no command has: {unknown}"


def test_every_readme_command_line_parses(tmp_path, monkeypatch):
    """Each `bolmo-async ...` line of the README's code blocks parses with the CLI (no run). (In an
    empty folder where the folders `mirror serve` is given exist, as the lines before it made them.)"""
    monkeypatch.chdir(tmp_path)
    commands = _commands()
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = []
    for block in blocks:
        for raw in block.replace("\\\n", " ").splitlines():
            line = raw.split("#", 1)[0].strip().removesuffix("&").strip().strip("'")  # (`&`: run in the background)
            if line.startswith("bolmo-async "):
                lines.append(line)
    assert len(lines) >= 5, lines
    for line in lines:
        words = ["X" if w.startswith("$") else w.strip("'") for w in re.findall(r"'[^']*'|\S+", line)[1:]]
        root = {f: p for p in commands["bolmo-async"].params for f in p.opts}
        while words and words[0] in root:  # options before the command
            words = words[1 if root[words[0]].is_flag else 2 :]
        for n in (2, 1):
            if " ".join(words[:n]) in commands:
                cmd = commands[" ".join(words[:n])]
                args = [w for w in words[n:] if not w.startswith("<")]
                break
        else:
            raise AssertionError(f"no command in README line: {line}")
        if cmd is commands["mirror serve"] and args:
            (tmp_path / args[0]).mkdir(parents=True, exist_ok=True)
        ctx = cmd.make_context(cmd.name, list(args))  # a flag it does not know raises
        ctx.close()


def test_help_names_each_value_as_the_readme_does():
    """`--help` said `-o, --output-dir <str>`, `--data-fraction <float>`, `--worker <str>` and
    `mirror sample {folder}` where the README says `--output-dir D`, `--data-fraction F`,
    `--worker I/N` and `mirror sample DIR` (newuser17): the help's value names are the README's."""
    cli = _cli_options()
    value = re.compile(r"`(--?[a-z][a-z0-9-]*) ([^`]+)`")
    checked = 0
    for _, names, _, line in _readme_rows():
        option = line.strip().strip("|").split("|")[0]
        for flag, word in value.findall(option):
            for name in names:
                assert cli[(name, flag)].metavar == word, (
                    f"`{name} {flag}`: --help says {cli[(name, flag)].metavar!r}, README {word!r}"
                )
                checked += 1
    assert checked > 50
    commands = _commands()
    for name, words in (
        ("mirror sample", ["DIR"]),
        ("mirror serve", ["DIR"]),
        ("mirror demo-tokenizer", ["SAMPLE", "DIR"]),
        ("inspect", ["D"]),  # (it said OUTPUT_DIR)
    ):
        got = [p.metavar for p in commands[name].params if p.param_type_name == "argument"]
        assert got == words, (name, got)
        assert f"bolmo-async {name} {' '.join(words)}" in README.read_text(), name
        # The usage line names them the same: typer wrote a required one as `{DIR}`.
        with click.Context(commands[name], info_name=f"bolmo-async {name}") as ctx:
            usage = commands[name].get_usage(ctx)
        pieces = [w if p.required else f"[{w}]" for w, p in zip(words, _arguments(commands[name]), strict=True)]
        assert usage.endswith(f"bolmo-async {name} [OPTIONS] {' '.join(pieces)}"), usage


def _arguments(cmd: click.Command) -> list[click.Parameter]:
    return [p for p in cmd.params if p.param_type_name == "argument"]

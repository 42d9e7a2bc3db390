"""``HF_HUB_OFFLINE``: runs that make no request to any host.

huggingface_hub's variable (``HF_HUB_OFFLINE``, else ``TRANSFORMERS_OFFLINE``; ``1``, ``true``,
``yes``, ``on`` in any case, as its ``constants._is_true`` reads them) says "make no HTTP request";
clusters set it on compute nodes that have no internet. A fetch (or prepare) then works from what
the folder holds: ``plan.json`` (its pinned commit, never listed again), the staged files, the
whole downloads kept in ``raw/`` (each checked against the listing's sha256, as on any run), and the
tokenizer as the folder (``tokenizer/tokenizer.json``, with ``run.json``'s EOS) or the cache
(``tokcache``) has it, or a local path. What is missing is said in one line before any work,
naming the fix; never a connection error.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from .errors import BolmoError, OfflineError
from .guidance import command, endpoint_flags, fetch_command, fetched_with, selection_flags
from .models import DEFAULT_REPO_ID, DEFAULT_SEED, Plan, PlannedFile, Selection, check_repo_path, tokenizer_fingerprint
from .outdir import PLAN, RAW, TOKENIZER, OutputDir

log = logging.getLogger("bolmo_async")

#: huggingface_hub's ``ENV_VARS_TRUE_VALUES``.
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})
#: How many planned files the refusal names.
NAMED = 3


def _variable() -> str | None:
    """The variable that makes this run offline (huggingface_hub's order), or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value:  # (huggingface_hub reads ``HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE``: the first non-empty)
            return name if value.upper() in _TRUE else None
    return None


def hub_offline() -> bool:
    """Whether this run may make no request to the Hub (``HF_HUB_OFFLINE``, read when asked)."""
    return _variable() is not None


def _is_set() -> str:
    return f"{_variable() or 'HF_HUB_OFFLINE'} is set (no request to the Hub)"


def _unset() -> str:
    return f"unset {_variable() or 'HF_HUB_OFFLINE'}"


def online_fetch(
    out: OutputDir,
    endpoint: str | None,
    data_fraction: float,
    selection: Selection,
    *,
    repo_id: str = DEFAULT_REPO_ID,
    revision: str | None = None,
    seed: int = DEFAULT_SEED,
    force: bool = False,
) -> str:
    """What to run where the Hub is reachable for a run refused offline: a plan of what that run
    asked for (its fractions and selection; a bare fetch keeps the folder's plan, or plans the
    defaults) at its ``endpoint``, then a fetch that keeps whole files in raw/ for the offline
    runs after it."""
    flags: list[Any] = ["--repo-id", repo_id] if repo_id != DEFAULT_REPO_ID else []
    if revision is not None and revision != "main":
        flags += ["--revision", revision]
    if seed != DEFAULT_SEED:
        flags += ["--seed", seed]
    flags += ["--data-fraction", repr(data_fraction), *selection_flags(selection), *(["--force"] if force else [])]
    plan = command("plan", "--output-dir", out, *endpoint_flags(endpoint), *flags)
    return f"{plan} && {fetch_command(out, endpoint, fetched_with(out))} --no-streaming"


def planning_refused(out: OutputDir, why: str, again: str, fix: str = "") -> OfflineError:
    """A plan this run would have to make (``why``): it needs the repository's listing. ``again``:
    the fetch that plans it where the Hub is reachable (``online_fetch``)."""
    keep = (
        f"{fix} run this command where the Hub is reachable" if fix else "Run this command where the Hub is reachable"
    )
    there = (
        f"there, `{again}` plans it and keeps whole files in {RAW}/ for offline runs"
        if out.local
        else f"there, `{again.removesuffix(' --no-streaming')}` plans it; {_bucket_fix(out)}"
    )
    return OfflineError(
        f"{_is_set()}, and {why}: planning needs the repository's listing. {keep} ({there}), or {_unset()}."
    )


def _bucket_fix(out: OutputDir) -> str:
    """The offline advice for an object-store output: the bucket is what the machines share, and a
    ``--no-streaming`` run's whole downloads stay in raw/ of that machine's scratch."""
    return (
        f"a full fetch there stages every file in {out.location}, which every machine reads; the whole downloads "
        f"a --no-streaming run keeps in {RAW}/ stay in that machine's scratch (--scratch-dir)"
    )


def refuse_unplanned(
    out: OutputDir, existing: Plan | None, data_fraction: float, selection: Selection, again: str
) -> None:
    """``_plan`` would list the repo: no plan.json yet, or this run's fractions re-plan it."""
    if existing is None:
        raise planning_refused(out, f"{out} has no {PLAN}", again)
    ours = [f"--data-fraction {data_fraction:g}"] + [
        f"--source-fraction {n}={f:g}" for n, f in selection.source_fractions
    ]
    theirs = [f"--data-fraction {existing.data_fraction:g}"] + [
        f"--source-fraction {n}={f:g}" for n, f in existing.selection.source_fractions
    ]
    raise planning_refused(
        out,
        f"this run's fractions ({' '.join(ours)}) are not those of the plan in {out} ({' '.join(theirs)})",
        again,
        f"Pass the plan's own ({' '.join(theirs)}) to use it as it is, or",
    )


def _kept(out: OutputDir, pf: PlannedFile) -> bool:
    """``pf``'s whole download is in raw/ at its listed size (its sha256 is checked by the worker)."""
    try:
        return out.download_path(pf.key, check_repo_path(pf.path), keep=True).stat().st_size == pf.size
    except (OSError, BolmoError):
        return False


def check_files(out: OutputDir, plan: Plan, units: Iterable[int], whole: bool, endpoint: str | None) -> None:
    """Every file of ``units`` is staged (as this run takes a staged file: ``whole``, a JSON-lines
    prefix read unchecked is staged again) or kept whole in raw/; else one line naming a few of
    those that are neither, and the fix. Before any work: nothing is written."""
    from .staging import Staging, unverified_prefix

    staging = Staging(out)
    units = list(units)
    missing: list[PlannedFile] = []
    from_raw = 0
    for u in units:
        pf = plan.files[u]
        rec = staging.done(pf)
        if rec is not None and not (whole and unverified_prefix(rec)):
            continue
        if _kept(out, pf):
            from_raw += 1
        else:
            missing.append(pf)
    if missing:
        raw = out.download_path(missing[0].key, check_repo_path(missing[0].path), keep=True).parent.parent
        names = ", ".join(pf.path for pf in missing[:NAMED]) + (", ..." if len(missing) > NAMED else "")
        again = fetch_command(out, endpoint, fetched_with(out))
        there = (
            f"`{again}`: {_bucket_fix(out)}"
            if not out.local
            else f"`{again} --no-streaming` also keeps whole files in {RAW}/ for offline runs"
        )
        raise OfflineError(
            f"{_is_set()}, and {len(missing)} of the {len(units)} planned file(s) are neither staged nor kept whole "
            f"in {raw}/ ({names}). Run this fetch where the Hub is reachable ({there}), or {_unset()}."
        )
    log.info(
        "%s: using the plan's pinned commit %s, %d staged file(s) and %d download(s) kept in %s/",
        _is_set(),
        plan.commit[:12],
        len(units) - from_raw,
        from_raw,
        RAW,
    )


def tokenizer_fetch(out: OutputDir | None) -> Callable[[str, str], bytes | None]:
    """``tokenize.load_tokenizer_source``'s ``fetch`` for a Hub repo id, offline: the tokenizer
    JSON the folder keeps (``tokenizer/tokenizer.json``, when ``run.json`` says it is this
    identifier's), else the one the cache remembers of the last run that fetched it; its
    ``tokenizer_config.json`` stands for the EOS run.json records when that JSON is the one the
    folder was fetched with (the cache keeps no config: else the EOS is found by its usual names)."""

    def fetch(repo_id: str, name: str) -> bytes | None:
        text = _folder_json(out, repo_id) or _cached_json(repo_id)
        if text is None:
            where = f"{out}'s {TOKENIZER} nor " if out is not None else ""
            raise OfflineError(
                f"{_is_set()}, and tokenizer {repo_id} is not on this machine (neither {where}the cache of an "
                "earlier run holds it). Pass a local tokenizer.json (or its folder) as --tokenizer-identifier, "
                f"run this fetch where the Hub is reachable, or {_unset()}."
            )
        if name == "tokenizer.json":
            return text.encode("utf-8", "surrogatepass")
        if name == "tokenizer_config.json":
            eos = _folder_eos(out, repo_id, text)
            return None if eos is None else json.dumps({"eos_token": eos}).encode("utf-8")
        return None

    return fetch


def _folder_tokenizer(out: OutputDir | None, repo_id: str) -> dict[str, Any] | None:
    said = fetched_with(out) if out is not None else None
    if said is None or said.get("kind") != "subword" or said.get("identifier") != repo_id:
        return None
    return said


def _folder_json(out: OutputDir | None, repo_id: str) -> str | None:
    said = _folder_tokenizer(out, repo_id)
    if out is None or said is None:
        return None
    try:
        text = out.read_text(TOKENIZER)
    except (OSError, BolmoError, UnicodeDecodeError):
        return None
    return text if text is not None and tokenizer_fingerprint(text) == said.get("fingerprint") else None


def _cached_json(repo_id: str) -> str | None:
    from .tokcache import json_to_prebuild

    path = json_to_prebuild(repo_id)  # (the remembered copy: a repo id is no local path here)
    try:
        return path.read_text(encoding="utf-8") if path is not None else None
    except (OSError, UnicodeDecodeError):
        return None


def _folder_eos(out: OutputDir | None, repo_id: str, text: str) -> str | None:
    """The EOS token's text run.json records for this very JSON, or None."""
    said = _folder_tokenizer(out, repo_id)
    eos = said.get("eos_token_id") if said is not None else None
    if not isinstance(eos, int) or tokenizer_fingerprint(text) != said.get("fingerprint"):  # type: ignore[union-attr]
        return None
    try:
        spec = json.loads(text)
        tokens = {a["id"]: a["content"] for a in spec.get("added_tokens") or ()}
        tokens.update({i: t for t, i in ((spec.get("model") or {}).get("vocab") or {}).items() if i not in tokens})
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    got = tokens.get(eos)
    return got if isinstance(got, str) else None


__all__ = ["check_files", "hub_offline", "online_fetch", "planning_refused", "refuse_unplanned", "tokenizer_fetch"]

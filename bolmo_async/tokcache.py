"""What the tokenizer side keeps between runs, outside any output folder: the folder itself
(``cache_dir``: passed probes, ``tokenize.checked_info``) and the tokenizer JSON the last run got
for a Hub identifier, from which the fork server builds the reference engine ahead of the next
run (``json_to_prebuild``, ``tokenize.prebuild_reference``).

Light to import (no numpy, no tokenizers): the command line uses it before the fork server starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger("bolmo_async")

#: Set (to a tokenizer JSON's path) for the fork server only, while it starts: its preload builds
#: the reference engine from that file for the workers it forks (``tokenize.prebuild_reference``).
PREBUILD_ENV = "BOLMO_ASYNC_PREBUILD_TOKENIZER"
#: With it: the number of workers the server forks with that engine; then it lets its own go.
PREBUILD_WORKERS_ENV = "BOLMO_ASYNC_PREBUILD_WORKERS"


def cache_dir() -> Path | None:
    """Where passed probes and tokenizer JSONs are remembered: ``$BOLMO_ASYNC_CACHE``, else
    ``$XDG_CACHE_HOME/bolmo-async``, else ``~/.cache/bolmo-async`` (never the output folder);
    None when ``BOLMO_ASYNC_CACHE`` is set empty (nothing remembered)."""
    explicit = os.environ.get("BOLMO_ASYNC_CACHE")
    if explicit is not None:
        return Path(explicit).expanduser() if explicit else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bolmo-async"


def _local(identifier: str) -> Path | None:
    """The tokenizer.json ``identifier`` names on this machine (a file, or a folder holding one)."""
    p = Path(identifier).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    return p if p.is_file() else None


def _remembered_path(identifier: str) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    return folder / f"tokenizer-{hashlib.sha256(identifier.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}.json"


def json_to_prebuild(identifier: str) -> Path | None:
    """The tokenizer JSON to build the reference engine from before ``identifier``'s is loaded:
    the file itself when it is local, else the copy the last run kept of what the Hub gave for
    it (None: none yet). A guess: a worker uses the engine only when its JSON is exactly the run's."""
    local = _local(identifier)
    if local is not None:
        return local
    path = _remembered_path(identifier)
    return path if path is not None and path.is_file() else None


def remember_json(identifier: str, json_text: str) -> None:
    """Keep the JSON a Hub identifier gave (a tokenizer that passed the probe) for the next run's
    fork server; written (whole, then renamed) only when it changed. A failure costs only that
    build ahead."""
    if _local(identifier) is not None:
        return
    path = _remembered_path(identifier)
    if path is None:
        return
    import tempfile  # not at import: the entry point reads this module before the fork server starts

    data = json_text.encode("utf-8", "surrogatepass")
    tmp = None
    try:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_size == len(data) and path.read_bytes() == data:
                return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tokenizer-", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        log.debug("tokenizer cache: could not write to %s (%s)", path.parent, exc)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


__all__ = ["PREBUILD_ENV", "PREBUILD_WORKERS_ENV", "cache_dir", "json_to_prebuild", "remember_json"]
